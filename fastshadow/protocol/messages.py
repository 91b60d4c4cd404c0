"""vhost-user requests, their wire rules, and the Message type.

Every front-end request (QEMU -> back-end, on the main socket) and every
back-end request (back-end -> QEMU, on the channel set up by
SET_BACKEND_REQ_FD) of docs/interop/vhost-user.rst has a code in an IntEnum
and a `Spec`: which payload types it may carry, how many fds, and what its
reply carries. The receive pipeline (connection.py) applies these rules to
every message before anyone else looks at it.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

from . import payloads as p
from .errors import MissingFds, PayloadSizeMismatch, TooManyFds, UnexpectedFds
from .features import ProtocolFeature

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Largest payload any message may announce. The largest real one is the
#: GET_SHMEM_CONFIG reply (2056 bytes); this bound stops a peer from making
#: us allocate or wait for arbitrary amounts.
MAX_PAYLOAD_SIZE = 4096
#: Most fds one message may carry (a SET_MEM_TABLE with 8 regions).
MAX_FDS = p.MAX_MEM_TABLE_REGIONS


class FrontendReq(enum.IntEnum):
    """Requests the front-end (QEMU) sends on the main socket."""

    GET_FEATURES = 1            # get the device feature bits
    SET_FEATURES = 2            # set the negotiated device feature bits
    SET_OWNER = 3               # session start
    RESET_OWNER = 4             # deprecated: disable all rings
    SET_MEM_TABLE = 5           # the guest memory regions, one fd each
    SET_LOG_BASE = 6            # dirty log area for migration
    SET_LOG_FD = 7              # eventfd to signal log changes
    SET_VRING_NUM = 8           # queue size
    SET_VRING_ADDR = 9          # desc/avail/used ring addresses
    SET_VRING_BASE = 10         # next avail index
    GET_VRING_BASE = 11         # stop the ring, return next avail index
    SET_VRING_KICK = 12         # eventfd the driver kicks
    SET_VRING_CALL = 13         # eventfd the device calls
    SET_VRING_ERR = 14          # eventfd for ring errors
    GET_PROTOCOL_FEATURES = 15  # get the vhost-user protocol feature bits
    SET_PROTOCOL_FEATURES = 16  # set the negotiated protocol feature bits
    GET_QUEUE_NUM = 17          # how many queues the back-end supports
    SET_VRING_ENABLE = 18       # enable or disable a ring
    SEND_RARP = 19              # broadcast a fake RARP after migration
    NET_SET_MTU = 20            # host MTU for virtio-net
    SET_BACKEND_REQ_FD = 21     # socket for back-end initiated requests
    IOTLB_MSG = 22              # device IOTLB update/invalidate
    SET_VRING_ENDIAN = 23       # legacy ring endianness
    GET_CONFIG = 24             # read device config space
    SET_CONFIG = 25             # write device config space
    CREATE_CRYPTO_SESSION = 26  # virtio-crypto session create
    CLOSE_CRYPTO_SESSION = 27   # virtio-crypto session close
    POSTCOPY_ADVISE = 28        # postcopy migration: open a userfaultfd
    POSTCOPY_LISTEN = 29        # postcopy migration: register memory
    POSTCOPY_END = 30           # postcopy migration: done
    GET_INFLIGHT_FD = 31        # get the inflight tracking buffer
    SET_INFLIGHT_FD = 32        # hand back the inflight tracking buffer
    GPU_SET_SOCKET = 33         # vhost-user-gpu protocol socket
    RESET_DEVICE = 34           # reset all rings and device state
    VRING_KICK = 35             # in-band kick
    GET_MAX_MEM_SLOTS = 36      # how many memory slots the back-end supports
    ADD_MEM_REG = 37            # add one guest memory region
    REM_MEM_REG = 38            # remove one guest memory region
    SET_STATUS = 39             # virtio device status byte
    GET_STATUS = 40             # read the device status byte
    GET_SHARED_OBJECT = 41      # look up a shared object by UUID
    SET_DEVICE_STATE_FD = 42    # pipe for device state transfer
    CHECK_DEVICE_STATE = 43     # did the state transfer succeed
    GET_SHMEM_CONFIG = 44       # VIRTIO shared memory region sizes


class BackendReq(enum.IntEnum):
    """Requests the back-end sends on the back-end request channel."""

    IOTLB_MSG = 1               # IOTLB miss / access failure
    CONFIG_CHANGE_MSG = 2       # device config space changed
    VRING_HOST_NOTIFIER_MSG = 3  # map a host notifier area into the guest
    VRING_CALL = 4              # in-band call
    VRING_ERR = 5               # in-band error
    SHARED_OBJECT_ADD = 6       # export a shared object
    SHARED_OBJECT_REMOVE = 7    # withdraw a shared object
    SHARED_OBJECT_LOOKUP = 8    # find a shared object
    SHMEM_MAP = 9               # map memory into a VIRTIO shared memory region
    SHMEM_UNMAP = 10            # unmap it


@dataclass(frozen=True)
class FdRule:
    """How many fds a message may carry, possibly depending on its payload."""

    name: str
    bounds: Callable[[p.Payload], tuple[int, int]]

    def check(self, request: enum.IntEnum, payload: p.Payload, nfds: int) -> None:
        lo, hi = self.bounds(payload)
        if nfds > hi:
            cls = UnexpectedFds if hi == 0 else TooManyFds
            raise cls(f"{request.name} carries {nfds} fds, {_fd_words(lo, hi)} allowed")
        if nfds < lo:
            raise MissingFds(f"{request.name} carries {nfds} fds, {_fd_words(lo, hi)} required")


def _fd_words(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


NO_FDS = FdRule("none", lambda _: (0, 0))
ONE_FD = FdRule("one", lambda _: (1, 1))
OPTIONAL_FD = FdRule("optional", lambda _: (0, 1))
#: One fd per region of the memory table.
PER_REGION = FdRule("per-region", lambda pl: (len(pl.regions),) * 2 if isinstance(pl, p.MemTable) else (0, 0))
#: SET_VRING_KICK/CALL/ERR: one fd unless the no-fd flag is set.
VRING_FD = FdRule("vring", lambda pl: (0, 0) if pl.nofd else (1, 1))
#: VRING_HOST_NOTIFIER_MSG: one fd unless the no-fd flag (bit 8 of u64) is set.
AREA_FD = FdRule("area", lambda pl: (0, 0) if pl.nofd else (1, 1))


@dataclass(frozen=True)
class Spec:
    """Wire rules of one request."""

    payload: tuple[type[p.Payload], ...]
    fds: FdRule = NO_FDS
    #: Payload types of the reply this request always gets; () means it gets
    #: a reply only through REPLY_ACK (a U64).
    reply: tuple[type[p.Payload], ...] = ()
    reply_fds: FdRule = NO_FDS


E, U64, VS = (p.Empty,), (p.U64,), (p.VringState,)

FRONTEND_SPECS: dict[FrontendReq, Spec] = {
    FrontendReq.GET_FEATURES: Spec(E, reply=U64),
    FrontendReq.SET_FEATURES: Spec(U64),
    FrontendReq.SET_OWNER: Spec(E),
    FrontendReq.RESET_OWNER: Spec(E),
    # The postcopy reply (the back-end's mapped bases) is a MemTable.
    FrontendReq.SET_MEM_TABLE: Spec((p.MemTable,), PER_REGION, reply=(p.U64, p.MemTable)),
    # QEMU sends the 16-byte log description; the spec says u64. Accept both.
    FrontendReq.SET_LOG_BASE: Spec((p.U64, p.Log), OPTIONAL_FD, reply=U64),
    FrontendReq.SET_LOG_FD: Spec(E, ONE_FD),
    FrontendReq.SET_VRING_NUM: Spec(VS),
    FrontendReq.SET_VRING_ADDR: Spec((p.VringAddr,)),
    FrontendReq.SET_VRING_BASE: Spec(VS),
    FrontendReq.GET_VRING_BASE: Spec(VS, reply=VS),
    FrontendReq.SET_VRING_KICK: Spec((p.VringFd,), VRING_FD),
    FrontendReq.SET_VRING_CALL: Spec((p.VringFd,), VRING_FD),
    FrontendReq.SET_VRING_ERR: Spec((p.VringFd,), VRING_FD),
    FrontendReq.GET_PROTOCOL_FEATURES: Spec(E, reply=U64),
    FrontendReq.SET_PROTOCOL_FEATURES: Spec(U64),
    FrontendReq.GET_QUEUE_NUM: Spec(E, reply=U64),
    FrontendReq.SET_VRING_ENABLE: Spec(VS),
    FrontendReq.SEND_RARP: Spec(U64),
    FrontendReq.NET_SET_MTU: Spec(U64),
    FrontendReq.SET_BACKEND_REQ_FD: Spec(E, ONE_FD),
    FrontendReq.IOTLB_MSG: Spec((p.IotlbMsg,), reply=U64),
    FrontendReq.SET_VRING_ENDIAN: Spec(VS),
    # A zero-length GET_CONFIG reply is how a back-end reports failure.
    FrontendReq.GET_CONFIG: Spec((p.Config,), reply=(p.Config, p.Empty)),
    FrontendReq.SET_CONFIG: Spec((p.Config,)),
    FrontendReq.CREATE_CRYPTO_SESSION: Spec((p.Opaque,), reply=(p.Opaque,)),
    FrontendReq.CLOSE_CRYPTO_SESSION: Spec(U64),
    FrontendReq.POSTCOPY_ADVISE: Spec(E, reply=(p.Empty, p.U64), reply_fds=OPTIONAL_FD),
    FrontendReq.POSTCOPY_LISTEN: Spec(E),
    FrontendReq.POSTCOPY_END: Spec(E, reply=U64),
    FrontendReq.GET_INFLIGHT_FD: Spec((p.Inflight,), reply=(p.Inflight,), reply_fds=OPTIONAL_FD),
    FrontendReq.SET_INFLIGHT_FD: Spec((p.Inflight,), ONE_FD),
    FrontendReq.GPU_SET_SOCKET: Spec(E, ONE_FD),
    FrontendReq.RESET_DEVICE: Spec(E),
    FrontendReq.VRING_KICK: Spec(VS),
    FrontendReq.GET_MAX_MEM_SLOTS: Spec(E, reply=U64),
    FrontendReq.ADD_MEM_REG: Spec((p.MemRegionMsg,), ONE_FD),
    # The spec allows one stray fd here for old front-ends; it must be closed unused.
    FrontendReq.REM_MEM_REG: Spec((p.MemRegionMsg,), OPTIONAL_FD),
    FrontendReq.SET_STATUS: Spec(U64),
    FrontendReq.GET_STATUS: Spec(E, reply=U64),
    FrontendReq.GET_SHARED_OBJECT: Spec((p.Uuid,), reply=U64, reply_fds=OPTIONAL_FD),
    FrontendReq.SET_DEVICE_STATE_FD: Spec((p.DeviceStateTransfer,), ONE_FD, reply=U64, reply_fds=OPTIONAL_FD),
    FrontendReq.CHECK_DEVICE_STATE: Spec(E, reply=U64),
    FrontendReq.GET_SHMEM_CONFIG: Spec(E, reply=(p.ShmemConfig,)),
}

BACKEND_SPECS: dict[BackendReq, Spec] = {
    BackendReq.IOTLB_MSG: Spec((p.IotlbMsg,)),
    BackendReq.CONFIG_CHANGE_MSG: Spec(E),
    BackendReq.VRING_HOST_NOTIFIER_MSG: Spec((p.VringArea,), AREA_FD),
    BackendReq.VRING_CALL: Spec(VS),
    BackendReq.VRING_ERR: Spec(VS),
    BackendReq.SHARED_OBJECT_ADD: Spec((p.Uuid,)),
    BackendReq.SHARED_OBJECT_REMOVE: Spec((p.Uuid,)),
    BackendReq.SHARED_OBJECT_LOOKUP: Spec((p.Uuid,), reply=U64, reply_fds=OPTIONAL_FD),
    BackendReq.SHMEM_MAP: Spec((p.ShmemMap,), ONE_FD),
    BackendReq.SHMEM_UNMAP: Spec((p.ShmemMap,)),
}

assert set(FRONTEND_SPECS) == set(FrontendReq) and set(BACKEND_SPECS) == set(BackendReq)


def choose_payload_type(request: enum.IntEnum, types: tuple[type[p.Payload], ...], size: int) -> type[p.Payload]:
    """Pick the payload type for `size` bytes among a request's alternatives.

    A fixed-size type whose size matches wins; otherwise the variable-size
    type (if any) decides. No match is a PayloadSizeMismatch naming what was
    expected.
    """
    variable = None
    for t in types:
        if t.SIZE is None:
            variable = t
        elif t.SIZE == size:
            return t
    if variable is not None:
        return variable
    sizes = " or ".join(str(t.SIZE) for t in types)
    raise PayloadSizeMismatch(f"{request.name} payload must be {sizes} bytes, got {size}")


@dataclass
class Message:
    """One vhost-user message: request code, header flags, typed payload, fds.

    The fds belong to the message until they are sent (then the sender's
    copies are closed by `Connection.send(..., close_fds=True)`) or closed
    with `close_fds()`.
    """

    request: FrontendReq | BackendReq
    payload: p.Payload = field(default_factory=p.Empty)
    fds: list[int] = field(default_factory=list)
    flags: int = VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def encode(self) -> bytes:
        body = self.payload.encode()
        return HEADER.pack(int(self.request), self.flags, len(body)) + body

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def reply(self, payload: p.Payload, fds: list[int] | None = None) -> "Message":
        """A reply to this request (reply bit set, need_reply cleared)."""
        return Message(self.request, payload, fds or [], VERSION | FLAG_REPLY)

    def ack(self, ok: bool = True) -> "Message":
        """The REPLY_ACK reply: u64 zero for success, non-zero for failure."""
        return self.reply(p.U64(0 if ok else 1))

    def describe(self) -> str:
        """A short human description for debug logs (no fd numbers of meaning)."""
        kind = "reply" if self.is_reply else "request"
        extra = " need_reply" if self.need_reply else ""
        return f"{self.request.name} {kind}{extra} {self.payload!r} fds={len(self.fds)}"


def spec_of(request: FrontendReq | BackendReq) -> Spec:
    if isinstance(request, FrontendReq):
        return FRONTEND_SPECS[request]
    return BACKEND_SPECS[request]


@dataclass
class Negotiation:
    """What a session has negotiated, as far as deciding who answers what.

    Both roles need it: a back-end must know whether to send a REPLY_ACK,
    a front-end (or a proxy relaying) whether to wait for one.
    """

    features: int = 0
    protocol_features: int = 0
    postcopy_listening: bool = False

    def observe(self, msg: Message) -> None:
        """Update from a front-end request as it passes."""
        if msg.is_reply:
            return
        req = msg.request
        if req == FrontendReq.SET_FEATURES:
            self.features = msg.payload.value
        elif req == FrontendReq.SET_PROTOCOL_FEATURES:
            self.protocol_features = msg.payload.value
        elif req == FrontendReq.POSTCOPY_LISTEN:
            self.postcopy_listening = True
        elif req == FrontendReq.POSTCOPY_END:
            self.postcopy_listening = False

    def has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def expects_reply(self, msg: Message) -> bool:
        """Does the receiver of request `msg` owe the sender a reply?"""
        req = msg.request
        if isinstance(req, FrontendReq):
            if req == FrontendReq.SET_LOG_BASE:
                # Answered only when the log is shared memory.
                return self.has(ProtocolFeature.LOG_SHMFD) or self._ack(msg)
            if req == FrontendReq.SET_MEM_TABLE and self.postcopy_listening:
                return True
            if FRONTEND_SPECS[req].reply and req != FrontendReq.SET_MEM_TABLE:
                return True
            # QEMU waits for an IOTLB ack whenever it sets need_reply.
            if req == FrontendReq.IOTLB_MSG:
                return msg.need_reply
            return self._ack(msg)
        if BACKEND_SPECS[req].reply:
            return True
        # QEMU answers any back-end request that asks for a reply.
        return msg.need_reply

    def _ack(self, msg: Message) -> bool:
        return msg.need_reply and self.has(ProtocolFeature.REPLY_ACK)
