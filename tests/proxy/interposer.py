"""Fault injectors for the backend side: a vhost-user forwarder placed between
fastshadow and a real backend, with hooks that may drop the connection, change a
reply or answer a request in the backend's place.

They play a backend that dies at the worst moment (Cutter) or lies (hooks of
Interposer). They supplement the real-peer tests and do not replace the backend:
everything they do not change reaches a real qemu-storage-daemon, which answers
it.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from typing import Callable, NamedTuple

from fastshadow.protocol import Channel, Connection, PeerClosed
from fastshadow.protocol.messages import FrontendReq, Message

#: request_hook results, besides a Message to forward (the same or another one).
CUT_BEFORE, CUT_AFTER = "cut-before", "cut-after"


class FdId(NamedTuple):
    """The identity of one fd a message carried, taken when the interposer received it:
    what /proc/self/fd names it, and the (st_dev, st_ino) of the open file."""
    target: str
    dev: int
    ino: int
    size: int

    @classmethod
    def of(cls, fd: int) -> "FdId":
        st = os.fstat(fd)
        return cls(os.readlink(f"/proc/self/fd/{fd}"), st.st_dev, st.st_ino, st.st_size)

    @property
    def is_memfd(self) -> bool:
        return self.target.startswith("/memfd:")


class Seen(NamedTuple):
    """One request the proxy sent to the backend: what, its payload, and the fds it carried."""
    request: FrontendReq
    payload: bytes
    nfds: int
    fds: tuple[FdId, ...]


class Answer:
    """request_hook result: send `reply` to the proxy; the backend never sees the request."""

    def __init__(self, reply: Message | None):
        self.reply = reply


class Interposer:
    """Forwards every connection accepted on `listen` to the real backend at `backend`.

    `request_hook(msg)` sees each request from the proxy and returns the message to
    forward, CUT_BEFORE / CUT_AFTER (drop the connection before / after forwarding it),
    or Answer(reply). `reply_hook(request, reply)` sees each reply from the backend and
    returns the one to pass on.
    """

    def __init__(self, listen: str, backend: str, *,
                 request_hook: Callable[[Message], object] | None = None,
                 reply_hook: Callable[[Message, Message], Message] | None = None):
        self.backend = backend
        self.request_hook = request_hook or (lambda msg: msg)
        self.reply_hook = reply_hook or (lambda req, reply: reply)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if os.path.exists(listen):
            os.unlink(listen)
        self._srv.bind(listen)
        self._srv.listen(4)
        #: Per backend connection, every request the proxy sent on it, with every fd it carried.
        self.seen: list[list[Seen]] = []
        self._live: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="interposer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self._srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._srv.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                front, _ = self._srv.accept()
            except OSError:
                return
            back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                back.connect(self.backend)
            except OSError:
                # No backend there (yet): the proxy sees a backend that refused it and tries again.
                back.close()
                front.close()
                continue
            threading.Thread(target=self._pump, args=(front, back), daemon=True).start()

    def received_fds(self) -> list[tuple[int, FrontendReq, FdId]]:
        """(connection number, request, fd identity) of every fd the backend was sent."""
        return [(n, s.request, fd) for n, conn in enumerate(self.seen) for s in list(conn) for fd in s.fds]

    def drop(self) -> None:
        """Drop the current connection, as a backend that dies between two requests."""
        for sock in self._live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump(self, front_sock: socket.socket, back_sock: socket.socket) -> None:
        seen: list[Seen] = []
        self.seen.append(seen)
        self._live = [front_sock, back_sock]
        front = Connection(front_sock, Channel.MAIN, receives_replies=False, name="proxy")
        back = Connection(back_sock, Channel.MAIN, receives_replies=True, name="backend")
        pending: list[Message] = []     # requests forwarded, by order (replies come in order)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(front_sock, selectors.EVENT_READ, "front")
                sel.register(back_sock, selectors.EVENT_READ, "back")
                while True:
                    for key, _ in sel.select():
                        if key.data == "back":
                            reply = back.recv()
                            request = next((m for m in pending if m.request == reply.request), None)
                            if request is not None:
                                pending.remove(request)
                            front.send(self.reply_hook(request, reply), close_fds=True)
                            continue
                        msg = front.recv()
                        seen.append(Seen(msg.request, msg.payload.encode(), len(msg.fds),
                                         tuple(FdId.of(fd) for fd in msg.fds)))
                        action = self.request_hook(msg)
                        if action == CUT_BEFORE:
                            msg.close_fds()
                            return
                        if isinstance(action, Answer):
                            msg.close_fds()
                            if action.reply is not None:
                                front.send(action.reply, close_fds=True)
                            continue
                        out = msg if action == CUT_AFTER else action
                        pending.append(out)
                        back.send(out, close_fds=True)
                        if action == CUT_AFTER:
                            return
        except (PeerClosed, OSError):
            pass
        finally:
            front.close()
            back.close()


class Cutter(Interposer):
    """Drops the backend connection once, at the first `cut_at` request: `when="before"`
    the backend never saw it, `when="after"` it acted on it and its reply is lost. Later
    connections (a reconnecting proxy) are forwarded untouched."""

    def __init__(self, listen: str, backend: str, cut_at: FrontendReq, when: str = "before"):
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        self.cut = threading.Event()          # set once the connection was dropped
        action = CUT_BEFORE if when == "before" else CUT_AFTER

        def hook(msg: Message):
            if msg.request == cut_at and not self.cut.is_set():
                self.cut.set()
                return action
            return msg
        super().__init__(listen, backend, request_hook=hook)
