"""A proxy session: one QEMU connection, one backend connection, in between.

The session thread reads QEMU's requests one at a time, hands each to
`on_frontend`, and when the backend owes a reply, waits for it on the
backend socket and passes it back. On the main socket a backend only ever
answers, so nothing arrives from it unasked; anything that does is a
protocol error (or, when it is an EOF, the backend went away).

Back-end initiated requests travel on a separate channel (SET_BACKEND_REQ_FD).
fastshadow never hands QEMU's end of that channel to the backend: it keeps
it, gives the backend one end of a socketpair of its own, and relays every
message in a thread (BackendChannelRelay), so that each one is logged and,
in isolated mode, filtered.

DirectSession forwards everything unchanged. IsolatedSession (isolated.py)
overrides the handlers that speak of guest memory.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading

from ..logs import kv
from ..protocol import (BackendReq, Channel, Connection, FrontendReq, Message, Negotiation, PeerClosed,
                        ProtocolError, ReplyTimeout, VhostUserError)
from ..protocol.errors import UnexpectedMessage
from .config import DeviceConfig

log = logging.getLogger("fastshadow.proxy")


class Session:
    """Base of both modes: connection handling, reply relaying, teardown."""

    mode = "direct"
    #: The session survives the backend's death (isolated mode, see IsolatedSession.recover_backend).
    survives_backend_loss = False

    def __init__(self, cfg: DeviceConfig, qemu_sock: socket.socket, backend_sock: socket.socket):
        self.cfg = cfg
        self.name = cfg.name
        self.qemu = Connection(qemu_sock, Channel.MAIN, receives_replies=False, name="qemu")
        self.backend = Connection(backend_sock, Channel.MAIN, receives_replies=True, name="backend")
        self.neg = Negotiation()
        self.relay: BackendChannelRelay | None = None
        self._closing = threading.Event()
        self.end_reason: str | None = None

    # -- life cycle --------------------------------------------------------
    @property
    def closing(self) -> bool:
        """The session is ending (its front-end or backend left); a new front-end may take over."""
        return self._closing.is_set()

    def run(self) -> None:
        """Serve until either side goes away or misbehaves. Never raises."""
        kv(log, logging.INFO, "session.start", dev=self.name, mode=self.mode)
        try:
            self._loop()
        except PeerClosed as e:
            self._end(logging.INFO, "session.end", str(e))
        except ProtocolError as e:
            self._end(logging.WARNING, "session.refused", f"{type(e).__name__}: {e}")
        except VhostUserError as e:
            self._end(logging.WARNING, "session.failed", f"{type(e).__name__}: {e}")
        except OSError as e:
            if self._closing.is_set():
                self._end(logging.INFO, "session.end", self.end_reason or "closed")
            else:
                # a socket or data-plane (errno) failure
                self._end(logging.WARNING, "session.failed", f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug of ours: log it fully, keep the process serving
            log.exception("session.crashed dev=%s", self.name)
            self.end_reason = f"internal error: {e!r}"
        finally:
            self.close()

    def _end(self, level: int, event: str, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        kv(log, level, event, dev=self.name, reason=self.end_reason)

    def abort(self, reason: str) -> None:
        """Stop the session from another thread: the session loop sees EOF and ends."""
        if self.end_reason is None:
            self.end_reason = reason
        self._closing.set()
        for conn in (self.qemu, self.backend):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closing.set()
        if self.relay is not None:
            self.relay.stop()
        self.qemu.close()
        self.backend.close()
        self.teardown()

    def teardown(self) -> None:
        """Mode-specific cleanup after both sockets are closed."""

    # -- the loop ------------------------------------------------------------
    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            self._sel = sel
            sel.register(self.qemu.sock, selectors.EVENT_READ, "qemu")
            sel.register(self.backend.sock, selectors.EVENT_READ, "backend")
            while True:
                for key, _ in sel.select():
                    if key.data == "qemu":
                        msg = self.qemu.recv()
                        self.trace("qemu->fastshadow", msg)
                        self.neg.observe(msg)
                        self.on_frontend(msg)
                    elif key.data == "backend":
                        # A handler in this same round may have replaced a dead backend
                        # (isolated mode): its stale event must not read the new socket.
                        if key.fileobj is self.backend.sock:
                            self._backend_unasked()
                    else:
                        key.data()

    def watch(self, fd: int, callback) -> None:
        """Call `callback()` in the session thread whenever `fd` is readable (handlers only)."""
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _backend_unasked(self) -> None:
        msg = self.backend.recv()  # PeerClosed: "backend closed the connection"
        msg.close_fds()
        raise UnexpectedMessage(f"backend sent {msg.request.name} on the main socket without being asked")

    # -- helpers for handlers -------------------------------------------------
    def trace(self, direction: str, msg: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            kv(log, logging.DEBUG, "msg", dev=self.name, dir=direction, req=msg.request.name,
               reply=msg.is_reply, need_reply=msg.need_reply, payload=repr(msg.payload), fds=len(msg.fds))

    def to_backend(self, msg: Message, *, expect_reply: bool | None = None,
                   timeout: float | None = None) -> Message | None:
        """Send `msg` to the backend (closing our fd copies) and return its reply, if one is owed
        (within `timeout` seconds, by default the reply timeout; else ReplyTimeout)."""
        if expect_reply is None:
            expect_reply = self.neg.expects_reply(msg)
        if timeout is None:
            timeout = self.cfg.reply_timeout
        self.trace("fastshadow->backend", msg)
        try:
            reply = self.backend.request(msg, expect_reply=expect_reply, timeout=timeout)
        except ReplyTimeout as e:
            raise ReplyTimeout(f"backend did not answer {msg.request.name} within {timeout:g} s") from e
        finally:
            msg.close_fds()
        if reply is not None:
            self.trace("backend->fastshadow", reply)
        return reply

    def to_qemu(self, msg: Message) -> None:
        self.trace("fastshadow->qemu", msg)
        self.qemu.send(msg, close_fds=True)

    def forward(self, msg: Message) -> None:
        """Forward a QEMU request as is, and its reply (if any) back to QEMU."""
        reply = self.to_backend(msg)
        if reply is not None:
            self.to_qemu(reply)

    def start_relay(self, msg: Message) -> Message:
        """SET_BACKEND_REQ_FD: keep QEMU's channel, give the backend one end of our own."""
        if self.relay is not None:
            self.relay.stop()
        qemu_end = socket.socket(fileno=msg.fds.pop())
        msg.close_fds()
        return Message(msg.request, msg.payload, [self._new_relay(qemu_end)], msg.flags)

    def _new_relay(self, qemu_end: socket.socket) -> int:
        """Relay QEMU's channel `qemu_end` through a new socketpair; returns the backend's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.relay = BackendChannelRelay(self, backend_side=ours, qemu_side=qemu_end,
                                         keep_qemu_side=self.survives_backend_loss)
        self.relay.start()
        return theirs.detach()

    def queue_stats(self) -> list:
        """[(queue, dataplane.QueueStats, [dataplane.HopLatency])] of the queues this session runs
        (none in direct mode).
        Called from the stats thread."""
        return []

    # -- handlers (overridden by modes) ------------------------------------------
    def on_frontend(self, msg: Message) -> None:
        raise NotImplementedError

    def filter_backend_request(self, msg: Message) -> str | None:
        """None to relay a back-end request to QEMU, or the reason it is refused."""
        return None


class DirectSession(Session):
    """Forward every message both ways unchanged (fds included)."""

    mode = "direct"

    def on_frontend(self, msg: Message) -> None:
        if msg.request == FrontendReq.SET_BACKEND_REQ_FD:
            msg = self.start_relay(msg)
        self.forward(msg)


class BackendChannelRelay(threading.Thread):
    """Relays back-end requests (and QEMU's replies) between two sockets."""

    def __init__(self, session: Session, *, backend_side: socket.socket, qemu_side: socket.socket,
                 keep_qemu_side: bool = False):
        super().__init__(name=f"relay-{session.name}", daemon=True)
        self.session = session
        #: When the backend's side closes, keep QEMU's open: a reconnected backend gets a new relay to it.
        self.keep_qemu_side = keep_qemu_side
        self.from_backend = Connection(backend_side, Channel.BACKEND, receives_replies=False,
                                       name="backend (request channel)")
        self.to_qemu = Connection(qemu_side, Channel.BACKEND, receives_replies=True,
                                  name="qemu (request channel)")
        #: One request (and its reply) at a time on QEMU's channel: the relay's and fastshadow's
        #: own (isolated mode's IOTLB misses, ask_qemu).
        self._qemu_lock = threading.Lock()
        self._stopping = threading.Event()

    def run(self) -> None:
        s = self.session
        try:
            while True:
                try:
                    msg = self.from_backend.recv()
                except ConnectionError:  # the backend died: the session decides what follows
                    raise PeerClosed("backend closed its request channel") from None
                s.trace("backend->fastshadow (channel)", msg)
                refusal = s.filter_backend_request(msg)
                expect = s.neg.expects_reply(msg)
                if refusal is not None:
                    kv(log, logging.WARNING, "backend_request.refused", dev=s.name, req=msg.request.name,
                       reason=refusal)
                    msg.close_fds()
                    if expect:
                        self.from_backend.send(msg.ack(ok=False))
                    continue
                try:
                    with self._qemu_lock:
                        reply = self.to_qemu.request(msg, expect_reply=expect, timeout=s.cfg.reply_timeout)
                finally:
                    msg.close_fds()
                if reply is not None:
                    s.trace("qemu->fastshadow (channel)", reply)
                    self.from_backend.send(reply, close_fds=True)
        except PeerClosed:
            if not self._stopping.is_set():
                kv(log, logging.DEBUG, "backend_channel.closed", dev=s.name)
        except (VhostUserError, OSError) as e:
            if not self._stopping.is_set():
                kv(log, logging.WARNING, "backend_channel.refused", dev=s.name, reason=f"{type(e).__name__}: {e}")
                s.abort(f"backend request channel: {e}")
        finally:
            self.from_backend.close()
            if not self.keep_qemu_side or self._stopping.is_set():
                self.to_qemu.close()

    def ask_qemu(self, msg: Message, timeout: float) -> Message | None:
        """Send a back-end request of fastshadow's own to QEMU (from any thread) and return its
        reply if msg asks for one (ReplyTimeout after `timeout` seconds)."""
        with self._qemu_lock:
            return self.to_qemu.request(msg, expect_reply=msg.need_reply, timeout=timeout)

    def stop(self) -> None:
        self._stopping.set()
        for conn in (self.from_backend, self.to_qemu):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if threading.current_thread() is not self:
            self.join(timeout=5)
        self.to_qemu.close()

    def take_qemu_side(self) -> socket.socket:
        """End the relay but keep QEMU's side open, for a new relay to a new backend."""
        assert self.keep_qemu_side
        try:
            self.from_backend.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.join(timeout=5)
        return self.to_qemu.sock


__all__ = ["Session", "DirectSession", "BackendChannelRelay", "BackendReq"]
