"""Isolated mode: the backend never receives a guest RAM fd (DESIGN §3-§4).

Everything that speaks of guest memory is terminated here and re-originated
toward the backend, pointing at the device's shadow region:

- SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG: guest RAM is mapped by the data
  plane only, fastshadow answers QEMU itself; the backend receives one table,
  once, holding the shadow region at fake addresses.
- SET_VRING_ADDR / BASE / KICK / CALL / ERR: the guest's values stay here;
  the backend gets the shadow ring's addresses, index 0 and eventfds of
  fastshadow's own, its call eventfd again at a ring's start if it may have
  dropped it since (give_backend_call).
- GET_VRING_BASE: stop taking from the guest ring, drain what the backend
  holds, complete it to the guest, stop the backend ring, answer with the
  guest's index.
- Feature bits the data plane cannot shadow are masked (features.py), and
  the requests that would need them are refused.
- Live migration: dirty logging (VHOST_F_LOG_ALL, SET_LOG_BASE, used-ring
  logging) is terminated here and done by the data plane, the only writer
  of guest memory on the data path; the backend never hears of it.
- VIRTIO_F_ACCESS_PLATFORM is offered to QEMU by fastshadow; with a vIOMMU
  (QEMU then sets it in SET_FEATURES) ring and buffer addresses are IOVAs:
  the device IOTLB (VHOST_USER_IOTLB_MSG updates and invalidations) is
  terminated here and kept by the data plane, which asks for what it lacks
  (an IOTLB_MISS event: VHOST_USER_BACKEND_IOTLB_MSG on QEMU's back-end
  channel, see iotlb_miss). The backend hears of neither.

The backend may die (DESIGN §7). Everything the guest has in flight lives in
the data plane's private bookkeeping, and everything the backend was told is
re-derivable here, so for devices whose requests are safe to run twice (blk,
net) the session survives: the queues are parked, a new backend connection
is obtained, every state-setting message the backend had received is
replayed (memory table, features, rings, eventfds, request channel), and the
parked requests are re-published. QEMU and the guest see a delay only.
This holds whether the backend dies between requests or in the middle of one
(its reply lost, or the request never delivered): the request QEMU is waiting
on is handled again, from the start, against the new backend; handlers are
written so that running one twice leaves the state of running it once.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import Callable

from .. import devices
from ..dataplane import (MAX_MEM_REGIONS, MAX_QUEUE_SIZE, MAX_QUEUES, AddressUntranslatable, DataPlane,
                         DataPlaneError, DrainTimeout, InvalidRequest, MemRegion, NoSpace)
from ..logs import kv
from ..protocol import Channel, Connection, PeerClosed, ReplyTimeout
from ..protocol import payloads as p
from ..protocol.errors import UnexpectedMessage
from ..protocol.features import ProtocolFeature, VirtioFeature
from ..protocol.messages import FLAG_NEED_REPLY, VERSION, BackendReq, FrontendReq, Message
from . import features as feat
from .config import DeviceConfig
from .replay import STATE_REQUESTS, BackendRecord, replay
from .session import Session

log = logging.getLogger("fastshadow.proxy")

#: How often one QEMU request is handled again after the backend died under it.
MAX_ATTEMPTS = 3


class BackendGone(PeerClosed):
    """The backend's connection failed while fastshadow was telling it something.

    Raised by IsolatedSession.to_backend when the session survives backend
    loss, so that on_frontend can tell the backend's death (recoverable) from
    QEMU's (the end of the session)."""


#: Requests whose fd is fastshadow's own and new for each backend connection (renew_backend_side):
#: the record keeps none of them, a replay sends the current one.
RENEWED_PER_BACKEND = frozenset({FrontendReq.SET_MEM_TABLE, FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL,
                                 FrontendReq.SET_VRING_ERR})

#: Requests refused in isolated mode, with the reason (their features are never offered).
REFUSED = {
    FrontendReq.SET_LOG_FD: "log-change notifications are not offered in isolated mode (QEMU reads the log "
                            "when it syncs)",
    FrontendReq.POSTCOPY_ADVISE: "postcopy migration would give the backend guest RAM",
    FrontendReq.POSTCOPY_LISTEN: "postcopy migration would give the backend guest RAM",
    FrontendReq.POSTCOPY_END: "postcopy migration would give the backend guest RAM",
    FrontendReq.GET_INFLIGHT_FD: "inflight tracking is not offered in isolated mode",
    FrontendReq.SET_INFLIGHT_FD: "inflight tracking is not offered in isolated mode",
    FrontendReq.GPU_SET_SOCKET: "virtio-gpu cannot be isolated",
    FrontendReq.VRING_KICK: "in-band notifications are not offered in isolated mode",
    FrontendReq.GET_SHARED_OBJECT: "shared objects are not offered in isolated mode",
    FrontendReq.SET_DEVICE_STATE_FD: "device state migration is not offered in isolated mode",
    FrontendReq.CHECK_DEVICE_STATE: "device state migration is not offered in isolated mode",
    FrontendReq.GET_SHMEM_CONFIG: "VIRTIO shared memory regions are not offered in isolated mode",
    FrontendReq.SET_VRING_ENDIAN: "legacy big-endian rings are not offered in isolated mode",
}

#: Requests that the spec allows only once a protocol feature is negotiated
#: (docs/interop/vhost-user.rst, each request's text): refused without it.
REQUIRES = {
    FrontendReq.GET_QUEUE_NUM: ProtocolFeature.MQ,
    FrontendReq.SEND_RARP: ProtocolFeature.RARP,
    FrontendReq.NET_SET_MTU: ProtocolFeature.NET_MTU,
    FrontendReq.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    FrontendReq.GET_CONFIG: ProtocolFeature.CONFIG,
    FrontendReq.SET_CONFIG: ProtocolFeature.CONFIG,
    FrontendReq.CREATE_CRYPTO_SESSION: ProtocolFeature.CRYPTO_SESSION,
    FrontendReq.CLOSE_CRYPTO_SESSION: ProtocolFeature.CRYPTO_SESSION,
    FrontendReq.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    FrontendReq.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.SET_STATUS: ProtocolFeature.STATUS,
    FrontendReq.GET_STATUS: ProtocolFeature.STATUS,
}

#: Back-end channel requests refused in isolated mode.
REFUSED_BACKEND = {
    "VRING_HOST_NOTIFIER_MSG": "it would map backend memory into the guest, bypassing the proxy",
    "SHARED_OBJECT_ADD": "shared objects are not offered in isolated mode",
    "SHARED_OBJECT_REMOVE": "shared objects are not offered in isolated mode",
    "SHARED_OBJECT_LOOKUP": "shared objects are not offered in isolated mode",
    "SHMEM_MAP": "it would map backend memory into the guest",
    "SHMEM_UNMAP": "VIRTIO shared memory regions are not offered in isolated mode",
    "IOTLB_MSG": "the backend has no device IOTLB: fastshadow translates IOVAs itself, the backend's "
                 "shadow ring holds plain addresses",
    "VRING_CALL": "in-band notifications are not offered in isolated mode",
    "VRING_ERR": "in-band notifications are not offered in isolated mode",
}


class IsolatedSession(Session):
    mode = "isolated"

    def __init__(self, cfg: DeviceConfig, qemu_sock, backend_sock, dataplane: DataPlane,
                 reconnect: Callable[[], socket.socket] | None = None):
        self.kind = devices.kind(cfg.device)
        if self.kind.refused:  # config validation refuses these first
            raise ValueError(f"{cfg.device.value} cannot be isolated: {self.kind.refused}")
        super().__init__(cfg, qemu_sock, backend_sock)
        self.reconnect = reconnect
        self.survives_backend_loss = reconnect is not None and cfg.reconnects_backend()
        #: What the backend has been told (filled by to_backend), to tell a restarted one.
        self.record = BackendRecord(renewed=RENEWED_PER_BACKEND)
        self._losses: list[float] = []  # monotonic times of backend losses (reconnect back-off)
        self.dp = dataplane
        self.dev = None
        self.queue_num: int | None = None
        self.backend_device_features: int | None = None
        self.offered_device_features: int | None = None
        self.backend_protocol_features = 0
        self.backend_has_table = False
        #: The current backend connection was sent fds of RENEWED_PER_BACKEND: the next one needs new ones.
        self.backend_side_given = False
        #: Queues whose call eventfd (the data plane's) the current backend connection holds: given by
        #: SET_VRING_CALL, taken away by the ring's GET_VRING_BASE, a reset or a new connection
        #: (to_backend keeps it; give_backend_call reads it).
        self.backend_has_call: set[int] = set()
        self.started: set[int] = set()
        self.err_fds: dict[int, tuple[int, int | None]] = {}  # queue -> (ours, QEMU's)
        self.qemu_features: int | None = None  # QEMU's last SET_FEATURES
        self.vring_addrs: dict[int, tuple[int, int, int]] = {}  # queue -> QEMU's (desc, avail, used)
        self.vring_nums: dict[int, int] = {}  # queue -> QEMU's SET_VRING_NUM (the data plane keeps it too)
        self.mem_regions: dict[int, p.MemoryRegion] = {}  # guest memory QEMU described, by gpa
        self.vring_bases: dict[int, int] = {}  # queue -> QEMU's last SET_VRING_BASE
        #: Queues stopped while the backend held requests: queue -> (ring addresses, avail index answered).
        self.stopped_with_kept: dict[int, tuple] = {}
        # Queues whose kept requests' backend died with them since their last start: the
        # next start counts the re-publication toward --max-replays (poison).
        self.lost_with_requests: set[int] = set()
        #: The backend's device configuration space (GET_CONFIG from offset 0), for its limits.
        self.backend_config = b""
        #: VIRTIO_F_ACCESS_PLATFORM set by QEMU: addresses are IOVAs (QEMU keeps the bit from a
        #: vhost device without a vIOMMU, hw/virtio/vhost.c vhost_dev_set_features).
        self.iotlb_on = False
        self._iotlb_full = False      # an update was refused for the cap (logged once per episode)
        #: (queue, iova, perm) for the miss thread, under its condition. Not queue.Queue: under
        #: `fastshadow run --proxy-user` no stdlib module can be imported after the drop.
        self._misses: list[tuple[int, int, int]] | None = None
        self._misses_cond = threading.Condition()
        self.handlers = {
            FrontendReq.GET_FEATURES: self.on_get_features,
            FrontendReq.SET_FEATURES: self.on_set_features,
            FrontendReq.GET_PROTOCOL_FEATURES: self.on_get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self.on_set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self.on_get_queue_num,
            FrontendReq.GET_MAX_MEM_SLOTS: self.on_get_max_mem_slots,
            FrontendReq.SET_MEM_TABLE: self.on_set_mem_table,
            FrontendReq.ADD_MEM_REG: self.on_add_mem_reg,
            FrontendReq.REM_MEM_REG: self.on_rem_mem_reg,
            FrontendReq.SET_VRING_NUM: self.on_set_vring_num,
            FrontendReq.SET_VRING_ADDR: self.on_set_vring_addr,
            FrontendReq.SET_VRING_BASE: self.on_set_vring_base,
            FrontendReq.GET_VRING_BASE: self.on_get_vring_base,
            FrontendReq.SET_VRING_KICK: self.on_set_vring_kick,
            FrontendReq.SET_VRING_CALL: self.on_set_vring_call,
            FrontendReq.SET_VRING_ERR: self.on_set_vring_err,
            FrontendReq.SET_BACKEND_REQ_FD: self.on_set_backend_req_fd,
            FrontendReq.SET_LOG_BASE: self.on_set_log_base,
            FrontendReq.IOTLB_MSG: self.on_iotlb_msg,
            FrontendReq.RESET_DEVICE: self.on_reset,
            FrontendReq.RESET_OWNER: self.on_reset,
        }
        self.handlers[FrontendReq.GET_CONFIG] = self.on_get_config
        self.handlers[FrontendReq.SET_VRING_ENABLE] = self.on_set_vring_enable
        for req in (FrontendReq.GET_STATUS, FrontendReq.SEND_RARP,
                    FrontendReq.CREATE_CRYPTO_SESSION, FrontendReq.CLOSE_CRYPTO_SESSION):
            self.handlers[req] = self.forward
        # Forwarded as they are (the record keeps those that set state).
        for req in (FrontendReq.SET_OWNER, FrontendReq.SET_CONFIG,
                    FrontendReq.SET_STATUS, FrontendReq.NET_SET_MTU):
            self.handlers[req] = self.forward

    # -- dispatch ------------------------------------------------------------------
    def on_frontend(self, msg: Message) -> None:
        handler = self.handlers.get(msg.request)
        if handler is None:
            msg.close_fds()
            raise UnexpectedMessage(f"QEMU sent {msg.request.name}, refused in isolated mode: "
                                    f"{REFUSED.get(msg.request, 'not supported in isolated mode')}")
        needed = REQUIRES.get(msg.request)
        if needed is not None and not self.neg.has(needed):
            # A backend that never offered the feature may not know the request at all
            # (qemu-storage-daemon panics on RESET_DEVICE): it never reaches the backend.
            why = f"it needs protocol feature {needed.name}, which was not negotiated"
            if msg.request.name.startswith("GET_"):
                msg.close_fds()
                raise UnexpectedMessage(f"QEMU sent {msg.request.name}: {why}")
            self.refuse(msg, why)
            return
        if not self.survives_backend_loss:
            self._handle(handler, msg)
            return
        for attempt in range(1, MAX_ATTEMPTS + 1):
            # Handlers consume the fds they are given: keep copies for another attempt.
            spare = [os.dup(fd) for fd in msg.fds]
            try:
                self._handle(handler, msg)
                return
            except BackendGone as e:
                if attempt == MAX_ATTEMPTS:
                    raise PeerClosed(f"{e}; QEMU's {msg.request.name} failed {attempt} times, "
                                     f"each time the backend died under it") from None
                self.recover_backend(f"{e} (while handling QEMU's {msg.request.name})")
                kv(log, logging.INFO, "request.retried", dev=self.name, req=msg.request.name, attempt=attempt + 1,
                   reason="the backend died under it; handled again against the new backend")
                msg, spare = Message(msg.request, msg.payload, spare, msg.flags), []
            finally:
                for fd in spare:
                    os.close(fd)

    def _handle(self, handler, msg: Message) -> None:
        try:
            handler(msg)
        except DataPlaneError as e:
            # The data plane refused what QEMU asked (its own checks, after ours): the
            # session ends with one line that names the request and the reason.
            raise UnexpectedMessage(f"QEMU's {msg.request.name} refused by the data plane: {e.strerror}") from None

    def to_backend(self, msg: Message, *, expect_reply: bool | None = None,
                   timeout: float | None = None) -> Message | None:
        """The one way a message reaches the backend: what it accepts is recorded for replay."""
        if expect_reply is None:
            expect_reply = self.neg.expects_reply(msg)
        if msg.request in RENEWED_PER_BACKEND and msg.fds:
            self.backend_side_given = True        # before the send: a failed one may have passed them
        gives_call = msg.request == FrontendReq.SET_VRING_CALL and bool(msg.fds)
        if msg.request == FrontendReq.GET_VRING_BASE:
            # The backend may close the ring's call fd as it stops the ring (libvhost-user does,
            # vu_get_vring_base_exec), answer or not: from the send on, it may hold none.
            self.backend_has_call.discard(msg.payload.index)
        elif msg.request in (FrontendReq.RESET_OWNER, FrontendReq.RESET_DEVICE):
            self.backend_has_call.clear()         # as its memory table (on_reset), it may forget them
        # super() closes msg's fds once sent; the record may keep one after the answer.
        kept = Message(msg.request, msg.payload, [os.dup(fd) for fd in msg.fds] if msg.request in STATE_REQUESTS
                       else [], msg.flags)
        try:
            reply = super().to_backend(msg, expect_reply=expect_reply, timeout=timeout)
            # State-setting requests are answered by an ack (u64, 0: success) when asked to.
            accepted = reply is None or getattr(reply.payload, "value", 0) == 0
            self.record.sent(kept, accepted=accepted)
            if gives_call and accepted:
                self.backend_has_call.add(msg.payload.index)
            elif gives_call:
                self.backend_has_call.discard(msg.payload.index)
            return reply
        except BackendGone:
            raise
        except PeerClosed as e:
            if not self.survives_backend_loss:
                raise
            raise BackendGone(str(e)) from None
        finally:
            kept.close_fds()

    def filter_backend_request(self, msg: Message) -> str | None:
        return REFUSED_BACKEND.get(msg.request.name)

    def refuse(self, msg: Message, reason: str) -> None:
        """Refuse one request of QEMU's and keep the session: one line, a failing ack if QEMU
        asked for one; the backend never hears of it (so a replay never repeats it)."""
        msg.close_fds()
        kv(log, logging.WARNING, "request.refused", dev=self.name, req=msg.request.name, reason=reason)
        self.ack(msg, ok=False)

    def ack(self, msg: Message, ok: bool = True) -> None:
        """Answer a request fastshadow terminated, if QEMU asked for a REPLY_ACK."""
        if self.neg.expects_reply(msg):
            self.to_qemu(msg.ack(ok))

    def to_backend_as(self, msg: Message, payload: p.Payload, fds: list[int] | None = None) -> None:
        """Send a re-originated request (QEMU's, with `payload` and `fds` of fastshadow's own)
        to the backend and relay its answer (if QEMU wanted one)."""
        out = Message(msg.request, payload, fds or [], msg.flags)
        reply = self.to_backend(out, expect_reply=self.neg.expects_reply(msg))
        if reply is not None:
            self.to_qemu(reply)

    # -- the backend's death -------------------------------------------------------------
    def backend_failed(self, reason: str) -> None:
        """The backend can no longer be trusted (a data-plane verdict, from another thread):
        drop its connection. The session thread then sees it gone and, where the device
        allows, reconnects and replays (recover_backend); otherwise the session ends."""
        kv(log, logging.WARNING, "backend.failed", dev=self.name, reason=reason,
           action="disconnecting it" + (", then reconnecting" if self.survives_backend_loss else ""))
        try:
            self.backend.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def frontend_failed(self, reason: str) -> None:
        """The front-end can no longer be served (a data-plane verdict, from another thread):
        the session ends (both connections shut; the session thread logs session.end)."""
        self.abort(f"the front-end broke its guest memory: {reason}")

    def _backoff(self) -> float:
        """Seconds to wait before reconnecting: doubles with each loss within the last 10 s
        (a backend that dies again at once is not hammered), from 0 up to 2 s."""
        now = time.monotonic()
        self._losses = [t for t in self._losses if now - t < 10.0] + [now]
        n = len(self._losses) - 1
        return 0.0 if n == 0 else min(2.0, 0.05 * 2 ** (n - 1))

    def _backend_unasked(self) -> None:
        try:
            super()._backend_unasked()
        except PeerClosed as e:
            if not self.survives_backend_loss:
                raise
            self.recover_backend(str(e))

    def recover_backend(self, reason: str) -> None:
        """The backend went away while the session was idle: park, reconnect, replay, resume.

        Raises PeerClosed (the session ends, as without recovery) when no backend
        comes back within the backend timeout.
        """
        t0 = time.monotonic()
        parked: dict[int, int] = {}
        self._park_queues(parked)
        delay = self._backoff()
        kv(log, logging.WARNING, "backend.lost", dev=self.name, reason=reason, parked=sum(parked.values()),
           queues=len(parked), reconnect_in=f"{delay:g}s",
           action="keeping the guest's requests, waiting for the backend to come back")
        time.sleep(delay)
        event_idx = bool(self.neg.features & VirtioFeature.RING_EVENT_IDX)

        def start_parked(q: int) -> None:
            # As in on_set_vring_kick: a fresh shadow ring (parked requests re-published)
            # before the backend gets the kick fd that starts its side.
            if q in parked:
                self.start_queue(q, event_idx)
        while True:
            self._sel.unregister(self.backend.sock)
            self.backend.close()
            try:
                sock = self.reconnect()
            except OSError as e:
                self._abort_parked(parked, "no backend came back within the backend timeout")
                raise PeerClosed(f"{reason}; no backend came back: {e}") from None
            self.backend = Connection(sock, Channel.MAIN, receives_replies=True, name="backend")
            self._sel.register(sock, selectors.EVENT_READ, "backend")
            self.backend_has_call.clear()         # the replay gives them
            try:
                # Each connection (a retry too, if the one that left got them) gets fds of its own.
                self.renew_backend_side()
            except DataPlaneError as e:
                self._abort_parked(parked, f"the new backend could not be given fresh shadow memory: {e}")
                raise PeerClosed(f"{reason}; the new backend could not be given fresh shadow memory and "
                                 f"eventfds: {e}") from None
            try:
                replay(self.record, lambda m, expect: self.to_backend(m, expect_reply=expect),
                       before_kick=start_parked, new_channel=lambda: self._new_relay(self.relay.take_qemu_side()),
                       fresh_fd=self.fresh_fd)
                break
            except PeerClosed as e:
                # A dying backend's listening socket can outlive its connection and take
                # one more; or the new one left. Try again while the timeout allows.
                if time.monotonic() - t0 >= self.cfg.backend_timeout:
                    self._abort_parked(parked, "no backend came back within the backend timeout")
                    raise PeerClosed(f"{reason}; no backend came back: the last one left during the replay ({e})") \
                        from None
                kv(log, logging.INFO, "backend.retry", dev=self.name, reason=f"left during the replay: {e}")
                self._park_queues(parked)
                time.sleep(max(0.05, self._backoff()))
        kv(log, logging.INFO, "backend.reconnected", dev=self.name, requeued=sum(parked.values()),
           queues=len(parked), seconds=f"{time.monotonic() - t0:.3f}")

    def renew_backend_side(self) -> None:
        """Before a new backend connection is told the device: everything of fastshadow's that the
        previous backend held and that reaches the device is replaced -- the shadow memory and every
        ring's kick and call eventfds (the data plane's), and the ring error eventfds (ours). A
        previous backend that is still alive (cut off for lying, or qemu-storage-daemon finishing the
        requests of a deleted export) can then no longer fake completions or data in the shadow
        ring, swallow the new backend's kicks, or signal calls and ring errors. The queues must be
        parked (QueueBusy otherwise). Nothing to do while no backend was given any of them yet (a
        connection that left before the replay reached them holds nothing)."""
        if self.dev is None or not self.backend_side_given:
            return
        self.dev.renew_backend_side()
        self.backend_side_given = False
        for q, (old, qemu_fd) in list(self.err_fds.items()):
            self.unwatch(old)
            os.close(old)
            ours = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.err_fds[q] = (ours, qemu_fd)
            self.watch(ours, lambda q=q: self._on_backend_err(q))
        kv(log, logging.INFO, "backend.renewed", dev=self.name, queues=self.dev.num_queues,
           what="new shadow memory and eventfds: the previous backend keeps nothing that reaches this device")

    def fresh_fd(self, request: FrontendReq, payload: p.Payload) -> int | None:
        """The fd a request of RENEWED_PER_BACKEND carries to the backend now (ours: send a dup)."""
        if request == FrontendReq.SET_MEM_TABLE:
            return self.dev.shadow_fd
        if request == FrontendReq.SET_VRING_ERR:
            pair = self.err_fds.get(payload.index)
            return pair[0] if pair is not None else None
        kick, call = self.dev.queue_backend_fds(payload.index)
        return kick if request == FrontendReq.SET_VRING_KICK else call

    def _abort_parked(self, parked: dict[int, int], why: str) -> None:
        """The session ends without a backend: the requests fastshadow kept for the next one
        are failed toward the guest with the device's error, so that each ends exactly once
        instead of hanging the guest's I/O forever. The data plane says so, one line per queue
        (`dataplane.refused ... code=INFLIGHT_ABORTED`)."""
        if self.started:                      # a replay had started some again
            self._park_queues(parked)
        for q in sorted(parked):
            try:
                self.dev.queue_abort(q)
            except Exception as e:            # the queue cannot be reached: say so, end anyway
                kv(log, logging.ERROR, "vring.abort_failed", dev=self.name, queue=q, reason=f"{why}: {e}")

    def _park_queues(self, parked: dict[int, int]) -> None:
        """Stop the started queues keeping their requests (-> parked: queue -> requests kept)."""
        for q in sorted(self.started):
            try:
                self.dev.queue_stop(q, timeout_ms=0)  # harvests what the backend completed
                parked[q] = 0
            except DrainTimeout as e:
                parked[q] = e.inflight
                self.lost_with_requests.add(q)
            self.dev.queue_clear_shadow(q)  # a new backend must read fresh ring indices
        self.started.clear()

    # -- device IOTLB (vIOMMU) -------------------------------------------------------
    def set_iotlb(self, on: bool) -> None:
        """ACCESS_PLATFORM in QEMU's SET_FEATURES: from now on addresses are IOVAs (on) or not.
        A change forgets every translation (QEMU sends them again)."""
        if on == self.iotlb_on:
            return
        self.iotlb_on = on
        if self.dev is not None:
            self.dev.iotlb_enable(on, self.cfg.iotlb_max_entries, self.cfg.iotlb_keep_completed)
        kv(log, logging.INFO, "iotlb.enabled" if on else "iotlb.disabled", dev=self.name,
           max_entries=self.cfg.iotlb_max_entries,
           what="ring and buffer addresses are IOVAs, translated by fastshadow's own device IOTLB; "
                "the backend's shadow ring holds plain addresses" if on else "addresses are guest-physical")

    def on_iotlb_msg(self, msg: Message) -> None:
        """VHOST_USER_IOTLB_MSG (vhost-user.rst "IOMMU support"): an update or an invalidation,
        in effect in the data plane before QEMU gets its ack; never forwarded."""
        m = msg.payload
        if not self.iotlb_on:
            self.refuse(msg, "IOTLB_MSG while VIRTIO_F_ACCESS_PLATFORM is not set (vhost-user.rst: only "
                             "once it is negotiated, with a vIOMMU)")
            return
        if m.type == p.IOTLB_UPDATE:
            self._iotlb_update(msg, m)
        elif m.type == p.IOTLB_INVALIDATE:
            if self.device().iotlb_invalidate(m.iova, m.size):
                self._iotlb_full = False
            kv(log, logging.DEBUG, "iotlb.invalidate", dev=self.name, iova=hex(m.iova), size=m.size)
            self.ack(msg)
        else:
            self.refuse(msg, f"IOTLB_MSG of type {m.type}: a front-end sends updates (2) and "
                             f"invalidations (3) only")

    def _iotlb_update(self, msg: Message, m: p.IotlbMsg) -> None:
        try:
            self.device().iotlb_update(m.iova, m.size, m.uaddr, m.perm)
        except NoSpace:
            # The cap bounds fastshadow's memory; the access that needed it is refused (the
            # miss is answered without a translation). One line per episode, not per message.
            msg.close_fds()
            kv(log, logging.WARNING if not self._iotlb_full else logging.DEBUG, "request.refused",
               dev=self.name, req="IOTLB_MSG", iova=hex(m.iova), size=m.size,
               reason=f"the device IOTLB holds its maximum of {self.cfg.iotlb_max_entries} translations "
                      f"(--iotlb-max-entries); further updates are refused until QEMU invalidates some")
            self._iotlb_full = True
            self.ack(msg, ok=False)
            return
        except InvalidRequest:
            self.refuse(msg, f"IOTLB update iova {m.iova:#x} size {m.size:#x} uaddr {m.uaddr:#x} perm "
                             f"{m.perm}: an empty or wrapping range, or no access")
            return
        kv(log, logging.DEBUG, "iotlb.update", dev=self.name, iova=hex(m.iova), size=m.size, perm=m.perm)
        self.ack(msg)

    def iotlb_miss(self, q: int, iova: int, perm: int) -> None:
        """The data plane's queue q waits for IOVA iova (access perm): ask QEMU. Called from the
        events thread; the asking happens in a thread of the session's own, since QEMU answers
        with an update on the main socket (handled by the session thread) before it acks."""
        kv(log, logging.DEBUG, "iotlb.miss", dev=self.name, queue=q, iova=hex(iova), perm=perm)
        with self._misses_cond:
            if self._misses is None:
                self._misses = []
                threading.Thread(target=self._ask_misses, name=f"iotlb-{self.name}", daemon=True).start()
            self._misses.append((q, iova, perm))
            self._misses_cond.notify()

    def _next_miss(self) -> tuple[int, int, int] | None:
        with self._misses_cond:
            if not self._misses:
                self._misses_cond.wait(timeout=0.5)
            return self._misses.pop(0) if self._misses else None

    def _ask_misses(self) -> None:
        while not self.closing:
            miss = self._next_miss()
            if miss is None:
                continue
            q, iova, perm = miss
            why = self._ask_qemu(iova, perm)
            if why is not None:
                kv(log, logging.WARNING, "iotlb.miss_unanswered", dev=self.name, queue=q, iova=hex(iova),
                   perm=perm, reason=why)
            dev = self.dev
            if dev is None:
                return      # the session ended meanwhile
            try:
                dev.queue_iotlb_answered(q, iova, ok=why is None)   # the queue goes on, or refuses the page
            except DataPlaneError as e:
                kv(log, logging.WARNING, "iotlb.miss_unanswered", dev=self.name, queue=q, iova=hex(iova),
                   reason=f"the data plane did not take the answer: {e}")

    def _ask_qemu(self, iova: int, perm: int) -> str | None:
        """VHOST_USER_BACKEND_IOTLB_MSG, type VHOST_IOTLB_MISS, on QEMU's back-end channel; QEMU
        sends the update (if it has a translation) before its ack. None, or why it failed."""
        relay = self.relay
        if relay is None:
            return "QEMU gave no back-end request channel (SET_BACKEND_REQ_FD) to ask on"
        ask = Message(BackendReq.IOTLB_MSG, p.IotlbMsg(iova, 0, 0, perm, p.IOTLB_MISS), [],
                      VERSION | FLAG_NEED_REPLY)
        try:
            reply = relay.ask_qemu(ask, timeout=self.cfg.reply_timeout)
        except (OSError, PeerClosed, ReplyTimeout) as e:
            return f"asking QEMU failed: {e}"
        value = getattr(reply.payload, "value", 0) if reply is not None else 0
        return None if value == 0 else f"QEMU has no translation for it (ack {value})"

    def start_queue(self, q: int, event_idx: bool) -> None:
        """Start ring q in the data plane; kept requests are re-published, counted toward
        --max-replays only if their backend died with them (DESIGN.md section 7)."""
        self.dev.queue_start(q, event_idx=event_idx, backend_lost=q in self.lost_with_requests)
        self.lost_with_requests.discard(q)
        self.started.add(q)

    # -- features ------------------------------------------------------------------
    def on_get_features(self, msg: Message) -> None:
        reply = self.to_backend(msg)
        self.backend_device_features = reply.payload.value
        offered = feat.device_features_for_qemu(reply.payload.value)
        self.offered_device_features = offered
        for name, why in feat.masked_reasons(reply.payload.value, feat.MASKED_DEVICE_FEATURES):
            kv(log, logging.INFO, "feature.masked", dev=self.name, feature=name, reason=why)
        self.to_qemu(msg.reply(p.U64(offered)))

    def on_set_features(self, msg: Message) -> None:
        try:
            value = feat.device_features_for_backend(msg.payload.value, self.offered_device_features)
        except feat.FeatureRefused as e:
            raise UnexpectedMessage(str(e)) from None
        was_logging, previous, self.qemu_features = self.log_all, self.qemu_features, msg.payload.value
        if msg.payload.value & VirtioFeature.ACCESS_PLATFORM and not (previous or 0) & VirtioFeature.ACCESS_PLATFORM:
            kv(log, logging.INFO, "feature.provided", dev=self.name, feature="ACCESS_PLATFORM",
               what="the data plane accesses guest memory by the platform's rules (vIOMMU IOTLB if QEMU sends "
                    "one); the backend's shadow ring is plain memory and never gets the bit")
        if self.log_all != was_logging:
            kv(log, logging.INFO, "migration.logging", dev=self.name, on=self.log_all,
               what="the data plane marks every guest page it writes in QEMU's dirty log")
        if self.dev is not None:
            self.dev.set_logging(self.log_all)
        self.set_iotlb(bool(msg.payload.value & VirtioFeature.ACCESS_PLATFORM))
        event_idx_changed = previous is not None and (previous ^ msg.payload.value) & VirtioFeature.RING_EVENT_IDX
        if event_idx_changed and self.started:
            # Rings run on: the data plane must decide notifications the new way on both
            # sides from now on, or kicks and calls are lost.
            on = bool(msg.payload.value & VirtioFeature.RING_EVENT_IDX)
            for q in sorted(self.started):
                self.dev.queue_set_event_idx(q, on)
            kv(log, logging.INFO, "vring.event_idx", dev=self.name, on=on, queues=len(self.started))
        if previous is not None and previous ^ msg.payload.value == VirtioFeature.LOG_ALL:
            # Only LOG_ALL changed (migration starts or ends on a running device):
            # nothing for the backend, whose features stay as they are.
            self.ack(msg)
            return
        self.to_backend_as(msg, p.U64(value))

    # -- migration: dirty logging --------------------------------------------------------
    @property
    def log_all(self) -> bool:
        """VHOST_F_LOG_ALL: QEMU is migrating, the data plane logs its writes."""
        return bool((self.qemu_features or 0) & VirtioFeature.LOG_ALL)

    def on_set_log_base(self, msg: Message) -> None:
        if not msg.fds or not isinstance(msg.payload, p.Log):
            msg.close_fds()
            raise UnexpectedMessage("SET_LOG_BASE without a shared log (an fd and its size): isolated mode "
                                    "logs only into a log shared with LOG_SHMFD")
        size, offset = msg.payload.mmap_size, msg.payload.mmap_offset
        try:
            self.device().set_log_base(msg.fds[0], size, offset)
        finally:
            msg.close_fds()
        kv(log, logging.INFO, "migration.log_base", dev=self.name, bytes=size, offset=offset,
           covers_bytes_of_guest_memory=size * 8 * 4096)
        if self.neg.expects_reply(msg):
            self.to_qemu(msg.reply(p.U64(0)))

    def on_get_protocol_features(self, msg: Message) -> None:
        reply = self.to_backend(msg)
        self.backend_protocol_features = reply.payload.value
        for name, why in feat.masked_reasons(reply.payload.value, feat.MASKED_PROTOCOL_FEATURES):
            kv(log, logging.INFO, "protocol_feature.masked", dev=self.name, feature=name, reason=why)
        self.to_qemu(msg.reply(p.U64(feat.protocol_features_for_qemu(reply.payload.value))))

    def on_set_protocol_features(self, msg: Message) -> None:
        try:
            value = feat.protocol_features_for_backend(msg.payload.value, self.backend_protocol_features)
        except feat.FeatureRefused as e:
            raise UnexpectedMessage(str(e)) from None
        self.to_backend_as(msg, p.U64(value))

    def on_get_queue_num(self, msg: Message) -> None:
        reply = self.to_backend(msg)
        value = reply.payload.value
        # Offer QEMU no more than the data plane serves, so that a QEMU configured for
        # more queues refuses at start-up (its own error) instead of at a later ring.
        offered = min(value, self.kind.queue_num_limit(MAX_QUEUES))
        if offered < value:
            kv(log, logging.INFO, "queues.capped", dev=self.name, backend=value, offered=offered,
               reason=f"the data plane serves at most {MAX_QUEUES} queues per device"
                      + (" (queue pairs, plus the control queue)" if self.kind.counts_pairs else ""))
        self.queue_num = offered
        self.to_qemu(msg.reply(p.U64(offered)))

    def on_get_max_mem_slots(self, msg: Message) -> None:
        self.to_qemu(msg.reply(p.U64(MAX_MEM_REGIONS)))

    # -- memory ----------------------------------------------------------------------
    def device(self):
        """The data-plane device, created once the queue count is known."""
        if self.dev is None:
            nq = self.kind.initial_queues(self.queue_num, MAX_QUEUES)
            data_cap, why = self.kind.request_cap(self.cfg.max_request_bytes, self.backend_config,
                                                  self.backend_device_features or 0)
            limit = data_cap + self.kind.request_overhead
            self.dev = self.dp.add_device(self.name, num_queues=nq, max_request_bytes=limit,
                                          bounce_per_queue=max(self.cfg.bounce_per_queue, limit),
                                          failure=self.kind.failure, failure_first_queue=self.kind.failure_first_queue,
                                          layout=self.kind.layout,
                                          max_replays=self.cfg.max_replays, loop=self.cfg.dataplane_thread)
            kv(log, logging.INFO, "limits", dev=self.name, request_data_bytes=data_cap, reason=why)
            kv(log, logging.INFO, "shadow.created", dev=self.name, queues=self.dev.num_queues,
               dataplane_thread=self.dev.loop,
               shadow_bytes=self.dev.shadow_size,
               shadow_gpa=hex(self.dev.shadow_gpa))
            if self.log_all:
                self.dev.set_logging(True)
            if self.iotlb_on:
                self.dev.iotlb_enable(True, self.cfg.iotlb_max_entries, self.cfg.iotlb_keep_completed)
        return self.dev

    def send_backend_table(self) -> None:
        """The backend's only memory: the shadow region, at fake addresses, sent once."""
        if self.backend_has_table:
            return
        dev = self.device()
        region_table = p.MemTable([p.MemoryRegion(dev.shadow_gpa, dev.shadow_size, dev.shadow_uaddr, 0)])
        flags = msg_flags(self.neg.has(ProtocolFeature.REPLY_ACK))
        out = Message(FrontendReq.SET_MEM_TABLE, region_table, [os.dup(dev.shadow_fd)], flags)
        reply = self.to_backend(out, expect_reply=bool(flags & FLAG_NEED_REPLY))
        if reply is not None and reply.payload.value != 0:
            raise UnexpectedMessage(f"backend refused the shadow memory table (ack {reply.payload.value})")
        self.backend_has_table = True

    def on_set_mem_table(self, msg: Message) -> None:
        regions = [MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, fd, r.mmap_offset)
                   for r, fd in zip(msg.payload.regions, msg.fds)]
        try:
            for region in regions:
                check_fd_backs(msg.request.name, region)
            self.device().set_mem_table(regions)
        finally:
            msg.close_fds()
        self.mem_regions = {r.guest_phys_addr: r for r in msg.payload.regions}
        kv(log, logging.INFO, "guest_memory.mapped", dev=self.name, regions=len(regions),
           bytes=sum(r.size for r in regions))
        self.send_backend_table()
        self.ack(msg)

    def on_add_mem_reg(self, msg: Message) -> None:
        r = msg.payload.region
        region = MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, msg.fds[0], r.mmap_offset)
        try:
            # The same region again is taken as done: a request handled a second time
            # (the backend died under it, see on_frontend) has mapped it already.
            if not self._has_region(r):
                # The codec checked the region itself; here: against the table it joins.
                for other in self.mem_regions.values():
                    if (space := r.overlaps(other)) is not None:
                        raise UnexpectedMessage(
                            f"ADD_MEM_REG region gpa {r.guest_phys_addr:#x} size {r.memory_size:#x} overlaps "
                            f"the guest memory region {other.guest_phys_addr:#x}+{other.memory_size:#x} in "
                            f"{space} addresses")
                check_fd_backs(msg.request.name, region)
                self.device().add_mem_region(region)
        finally:
            msg.close_fds()
        self.mem_regions[r.guest_phys_addr] = r
        self.send_backend_table()
        self.ack(msg)

    def on_rem_mem_reg(self, msg: Message) -> None:
        msg.close_fds()  # the spec allows a stray fd here; it is never used
        r = msg.payload.region
        if not self._has_region(r):
            raise UnexpectedMessage(f"REM_MEM_REG gpa {r.guest_phys_addr:#x} size {r.memory_size:#x}: no such region "
                                    f"in the guest memory table ({self._describe_regions()})")
        self.device().remove_mem_region(r.guest_phys_addr, r.memory_size)
        del self.mem_regions[r.guest_phys_addr]
        self.ack(msg)

    def _has_region(self, r: p.MemoryRegion) -> bool:
        """The table holds a region at r's guest address with r's size."""
        known = self.mem_regions.get(r.guest_phys_addr)
        return known is not None and known.memory_size == r.memory_size

    def _describe_regions(self) -> str:
        if not self.mem_regions:
            return "it is empty"
        return "it holds " + ", ".join(f"{g:#x}+{r.memory_size:#x}" for g, r in sorted(self.mem_regions.items()))

    # -- rings -------------------------------------------------------------------------
    def queue_index(self, index: int) -> int:
        dev = self.device()
        if index >= dev.num_queues:
            raise UnexpectedMessage(f"QEMU named queue {index}, but the device has {dev.num_queues} queues "
                                    f"(GET_QUEUE_NUM or the {self.cfg.device.value} default)")
        return index

    def require_eventfd(self, msg: Message, q: int) -> None:
        """A ring notifier (kick, call, err) is an eventfd (vhost-user.rst, "Ring states"):
        anything else is refused before the data plane polls or writes it (a /dev/null kick
        is readable forever: the data plane would spin on it)."""
        if msg.payload.nofd or not msg.fds:
            return
        try:
            what = os.readlink(f"/proc/self/fd/{msg.fds[0]}")
        except OSError as e:
            what = f"unreadable ({e.strerror})"
        if what != "anon_inode:[eventfd]":
            msg.close_fds()
            raise UnexpectedMessage(f"{msg.request.name} for queue {q}: its fd is {what}, not an eventfd")

    def on_set_vring_num(self, msg: Message) -> None:
        q, num = self.queue_index(msg.payload.index), msg.payload.num
        if num == 0 or num & (num - 1) or num > MAX_QUEUE_SIZE:
            raise UnexpectedMessage(f"SET_VRING_NUM {num} for queue {q}: a split virtqueue's size is a power of 2 "
                                    f"from 1 to {MAX_QUEUE_SIZE}")
        if q in self.started:
            raise UnexpectedMessage(f"SET_VRING_NUM {num} for queue {q} while its ring runs "
                                    f"(GET_VRING_BASE stops a ring first)")
        if q in self.stopped_with_kept and self.vring_nums.get(q) != num:
            self.drop_stale_requests(q, f"the ring was resized to {num} since it stopped with these requests kept")
        self.dev.queue_set_num(q, num)
        self.vring_nums[q] = num
        self.forward(msg)

    def on_set_vring_addr(self, msg: Message) -> None:
        a = msg.payload
        q = self.queue_index(a.index)
        # VHOST_VRING_F_LOG: used ring writes are logged at a.log, its guest-physical address.
        self.dev.queue_set_log_used(q, a.log if a.flags & p.VRING_F_LOG else None)
        if q in self.started and self.vring_addrs.get(q) == (a.desc, a.avail, a.used):
            # Only the log flag changed on a running ring (migration starts or ends): the
            # backend's shadow ring is untouched (telling it again could rewind its indices).
            self.ack(msg)
            return
        if not self.mem_regions:
            raise UnexpectedMessage(f"SET_VRING_ADDR for queue {q} before any guest memory (SET_MEM_TABLE or "
                                    f"ADD_MEM_REG comes first): its rings cannot be found")
        try:
            self.dev.queue_set_addr(q, a.desc, a.avail, a.used)
        except AddressUntranslatable:
            raise UnexpectedMessage(
                f"SET_VRING_ADDR for queue {q}: desc {a.desc:#x}, avail {a.avail:#x} or used {a.used:#x} (QEMU "
                f"addresses) is not inside the guest memory QEMU described, or the ring crosses its end") from None
        self.vring_addrs[q] = (a.desc, a.avail, a.used)
        desc, avail, used = self.dev.queue_shadow_addrs(q)
        self.to_backend_as(msg, p.VringAddr(q, 0, desc, used, avail, 0))

    def on_set_vring_base(self, msg: Message) -> None:
        q = self.queue_index(msg.payload.index)
        self.dev.queue_set_base(q, msg.payload.num)
        self.vring_bases[q] = msg.payload.num
        # The shadow ring always starts from index 0.
        self.to_backend_as(msg, p.VringState(q, 0))

    def on_get_vring_base(self, msg: Message) -> None:
        """Stop a ring within --stop-timeout whatever the backend does (DESIGN §7).

        Requests the backend still holds at the deadline stay owned by the data
        plane: re-published when the ring starts again (each re-publication counts
        toward --max-replays only when the backend dies with it), or dropped untouched
        if the guest re-initialises the ring."""
        q = self.queue_index(msg.payload.index)
        deadline = time.monotonic() + self.cfg.stop_timeout
        # Order matters: stop shadowing first, so that the backend's answer (its
        # next shadow avail index) is final; requests it never took (a NIC's
        # receive buffers, held until a packet comes) are then not waited for.
        self.dev.queue_pause(q)
        try:
            reply = self.to_backend(msg, timeout=self.cfg.stop_timeout)  # the backend stops its ring
        except ReplyTimeout:
            reply = None
            self.backend_failed(f"it did not answer GET_VRING_BASE for queue {q} within {self.cfg.stop_timeout:g} s")
        shadow_next = reply.payload.num if reply is not None else None
        left_ms = max(0, int((deadline - time.monotonic()) * 1000)) if reply is not None else 0
        try:
            res = self.dev.queue_stop_result(q, timeout_ms=left_ms, backend_next_avail=shadow_next)
            idx, kept = res.avail_idx, res.kept
            if res.returned or res.kept:
                kv(log, logging.INFO, "vring.untaken", dev=self.name, queue=q, returned_to_guest=res.returned,
                   kept=res.kept, reason="the backend never took them (its ring stopped before them)")
        except DrainTimeout as e:
            idx, kept = e.avail_idx, e.inflight
            kv(log, logging.WARNING, "vring.held", dev=self.name, queue=q, kept=e.inflight,
               reason=f"the backend still held {e.inflight} requests after {self.cfg.stop_timeout:g} s "
                      f"(--stop-timeout); kept by fastshadow: re-published if the ring resumes "
                      f"(as often as it is held: only backend deaths count toward --max-replays), dropped "
                      f"untouched if the guest re-initialises the ring")
        if kept:
            self.stopped_with_kept[q] = (self.vring_addrs.get(q), idx)
        self.started.discard(q)
        self.log_stats(q)
        kv(log, logging.DEBUG, "vring.stopped", dev=self.name, queue=q, guest_avail_idx=idx, shadow_idx=shadow_next)
        self.to_qemu(msg.reply(p.VringState(q, idx)))

    def queue_stats(self) -> list:
        dev = self.dev
        if dev is None:
            return []
        return [(q, dev.stats(q), dev.latency(q)) for q in sorted(list(self.vring_addrs))]  # the queues QEMU set up

    def log_stats(self, q: int, st=None) -> None:
        st = st if st is not None else self.dev.stats(q)
        kv(log, logging.INFO, "vring.stats", dev=self.name, queue=q, requests=st.requests, completed=st.completed,
           bytes_in=st.bytes_in, bytes_out=st.bytes_out, refused=st.refused, throttled=st.throttled,
           guest_kicks=st.guest_kicks, backend_kicks=st.backend_kicks, backend_calls=st.backend_calls,
           guest_calls=st.guest_calls, backend_errors=st.backend_errors, log_pages=st.log_pages)

    def drop_stale_requests(self, q: int, why: str) -> None:
        """Requests kept from a ring's previous run belong to a ring the guest has since
        re-initialised (reboot, driver reload): drop them without touching guest memory,
        whose buffers the guest may have reused. Direct mode loses them the same way."""
        self.stopped_with_kept.pop(q, None)
        dropped = self.dev.queue_discard(q)
        if dropped:
            kv(log, logging.WARNING, "vring.stale_dropped", dev=self.name, queue=q, dropped=dropped, reason=why)

    def on_set_vring_kick(self, msg: Message) -> None:
        q = self.queue_index(msg.payload.index)
        missing = [name for name, known in (("SET_VRING_NUM", self.vring_nums), ("SET_VRING_ADDR", self.vring_addrs))
                   if q not in known]
        if missing:
            msg.close_fds()
            raise UnexpectedMessage(f"SET_VRING_KICK for queue {q} before its {' and '.join(missing)}: "
                                    f"the kick starts a ring, which needs its size and addresses")
        self.require_eventfd(msg, q)
        try:
            self.dev.queue_set_guest_kick(q, None if msg.payload.nofd else msg.fds[0])
        finally:
            msg.close_fds()
        stopped = self.stopped_with_kept.pop(q, None)
        if stopped is not None and stopped != (self.vring_addrs.get(q), self.vring_bases.get(q)):
            self.stopped_with_kept[q] = stopped
            self.drop_stale_requests(q, "the ring was set up anew (other addresses or base) since it stopped "
                                        "with these requests kept")
        self.give_backend_call(q)
        # The kick fd starts the ring (vhost-user "Ring states").
        self.start_queue(q, bool(self.neg.features & VirtioFeature.RING_EVENT_IDX))
        kick, _ = self.dev.queue_backend_fds(q)
        self.to_backend_as(msg, p.VringFd.make(q), [os.dup(kick)])

    def give_backend_call(self, q: int) -> None:
        """Before ring q starts toward the backend: make sure the backend holds the ring's call
        eventfd, which is fastshadow's own (the data plane's).

        vhost-user.rst does not say what becomes of a ring's call fd when GET_VRING_BASE stops
        the ring; libvhost-user (qemu-storage-daemon) closes it there, and its next completion
        then signals fd -1: the notify fails, the device is marked broken, and nobody hears of
        the request. QEMU sends SET_VRING_CALL again before each start; a front-end that does not
        (or never sent one) leaves that backend without. Direct mode cannot help it, since the fd
        is the front-end's; here fastshadow gives its own again. QEMU's call fd is the data
        plane's to signal and stays there across the stop, whatever the backend does.

        Sent before SET_VRING_KICK, which starts the ring in libvhost-user: the requests the data
        plane re-publishes at the start may complete at once. The ack (asked for when REPLY_ACK is
        negotiated, as for the shadow memory table) is fastshadow's to read, never QEMU's, whose
        SET_VRING_KICK gets the kick's own."""
        if q in self.backend_has_call:
            return
        _, call = self.dev.queue_backend_fds(q)
        flags = msg_flags(self.neg.has(ProtocolFeature.REPLY_ACK))
        out = Message(FrontendReq.SET_VRING_CALL, p.VringFd.make(q), [os.dup(call)], flags)
        reply = self.to_backend(out, expect_reply=bool(flags & FLAG_NEED_REPLY))
        if reply is not None and reply.payload.value != 0:
            raise UnexpectedMessage(f"backend refused SET_VRING_CALL for queue {q} (ack {reply.payload.value}), "
                                    f"sent by fastshadow before the ring starts: its completions would never "
                                    f"be signalled")
        kv(log, logging.DEBUG, "vring.call_given", dev=self.name, queue=q,
           reason="the backend held no call fd for the ring (it may close it at GET_VRING_BASE) and QEMU "
                  "sent no SET_VRING_CALL since")

    def on_set_vring_enable(self, msg: Message) -> None:
        q = msg.payload.index
        if q >= self.device().num_queues:
            self.refuse(msg, f"queue {q} does not exist: the device has {self.dev.num_queues} queues "
                             f"(GET_QUEUE_NUM or the {self.kind.name} default)")
            return
        self.forward(msg)

    def on_get_config(self, msg: Message) -> None:
        reply = self.to_backend(msg)
        if reply is not None:
            asked = (msg.payload.offset, len(msg.payload.data))
            got = (reply.payload.offset, len(reply.payload.data)) if isinstance(reply.payload, p.Config) else None
            if got != asked:
                # QEMU would fail the device on the size ("bad msg size") with no word of why.
                told = f"{got[1]} bytes at offset {got[0]}" if got else type(reply.payload).__name__
                raise UnexpectedMessage(f"backend answered GET_CONFIG offset {asked[0]} size {asked[1]} "
                                        f"with {told}")
            if msg.payload.offset == 0 and isinstance(reply.payload, p.Config):
                self.backend_config = bytes(reply.payload.data)
            self.to_qemu(reply)

    def on_set_vring_call(self, msg: Message) -> None:
        q = self.queue_index(msg.payload.index)
        self.require_eventfd(msg, q)
        try:
            self.dev.queue_set_guest_call(q, None if msg.payload.nofd else msg.fds[0])
        finally:
            msg.close_fds()
        _, call = self.dev.queue_backend_fds(q)
        self.to_backend_as(msg, p.VringFd.make(q), [os.dup(call)])

    def on_set_vring_err(self, msg: Message) -> None:
        q = self.queue_index(msg.payload.index)
        self.require_eventfd(msg, q)
        qemu_fd = None if msg.payload.nofd else os.dup(msg.fds[0])
        msg.close_fds()
        old = self.err_fds.pop(q, None)
        if old is not None:
            self._close_err(old)
        ours = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fds[q] = (ours, qemu_fd)
        self.watch(ours, lambda: self._on_backend_err(q))
        self.to_backend_as(msg, p.VringFd.make(q), [os.dup(ours)])

    def _on_backend_err(self, q: int) -> None:
        ours, qemu_fd = self.err_fds[q]
        try:
            os.eventfd_read(ours)
        except BlockingIOError:
            return
        kv(log, logging.WARNING, "backend.vring_error", dev=self.name, queue=q)
        if qemu_fd is not None:
            os.eventfd_write(qemu_fd, 1)

    def _close_err(self, pair: tuple[int, int | None]) -> None:
        ours, qemu_fd = pair
        self.unwatch(ours)
        os.close(ours)
        if qemu_fd is not None:
            os.close(qemu_fd)

    def on_set_backend_req_fd(self, msg: Message) -> None:
        self.forward(self.start_relay(msg))  # replayed with a new relay to QEMU's same channel

    def on_reset(self, msg: Message) -> None:
        self.qemu_features = None  # features are negotiated again
        if self.dev is not None:
            self.dev.reset()  # requests kept in flight are dropped without touching the guest
        self.started.clear()
        self.stopped_with_kept.clear()
        # A reset backend may have forgotten its memory table: the next SET_MEM_TABLE sends it again.
        self.backend_has_table = False
        self.vring_addrs.clear()  # the data plane forgets ring addresses on reset (sizes stay)
        reply = self.to_backend(msg)
        if self.mem_regions:
            self.send_backend_table()
        # QEMU hears last: if the backend died on the way, the request is handled again
        # from the start (on_frontend) and QEMU still gets exactly one answer.
        if reply is not None:
            self.to_qemu(reply)

    # -- teardown ---------------------------------------------------------------------
    def teardown(self) -> None:
        self.record.close()
        for pair in self.err_fds.values():
            try:
                self._close_err(pair)
            except OSError:
                pass
        self.err_fds.clear()
        if self.dev is not None:
            for q in sorted(self.started):
                try:
                    st = self.dev.stats(q)
                except Exception:
                    continue
                self.log_stats(q, st)
                if st.inflight:
                    kv(log, logging.WARNING, "vring.abandoned", dev=self.name, queue=q, inflight=st.inflight,
                       reason="the session ended with requests at the backend; their guest memory is "
                              "unmapped, their completions land in the shadow only")
            self.dp.remove_device(self.dev)
            kv(log, logging.INFO, "shadow.freed", dev=self.name)
            self.dev = None


def check_fd_backs(request: str, region) -> None:
    """Refuse, naming the region, a region whose fd is shorter than the range QEMU says it
    holds (touching the missing part would SIGBUS). Empty, wrapping and overlapping ranges
    within one message are refused by the codec (payloads.MemoryRegion.check, MemTable.check);
    mem_map_region in C checks the same bound again, without saying which request."""
    st = os.fstat(region.fd)
    need = region.mmap_offset + region.size
    if stat.S_ISREG(st.st_mode) and st.st_size < need:
        raise UnexpectedMessage(f"{request} region gpa {region.gpa:#x} size {region.size:#x}: its fd holds "
                                f"{st.st_size:#x} bytes, the region needs {need:#x} (mmap offset "
                                f"{region.mmap_offset:#x} + size)")


def msg_flags(need_reply: bool) -> int:
    return VERSION | (FLAG_NEED_REPLY if need_reply else 0)
