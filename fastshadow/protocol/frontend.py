"""A vhost-user front-end (the role QEMU plays), for tools and tests.

The benchmark's load generator and the protocol tests drive real backends
with it. Every reply goes through the same validating receive pipeline as
everything else; REPLY_ACK is requested (and checked) when negotiated.
"""

from __future__ import annotations

import socket

from . import payloads as p
from .connection import Channel, Connection
from .errors import ProtocolError, VhostUserError
from .features import ProtocolFeature
from .messages import FLAG_NEED_REPLY, VERSION, FrontendReq, Message, Negotiation


class BackendRefused(VhostUserError):
    """The backend answered a request with a non-zero REPLY_ACK."""


class Frontend:
    def __init__(self, sock: socket.socket, *, timeout: float = 30.0, name: str = "backend"):
        self.conn = Connection(sock, Channel.MAIN, receives_replies=True, name=name)
        self.neg = Negotiation()
        self.timeout = timeout

    @classmethod
    def connect(cls, path: str, **kw) -> "Frontend":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        return cls(sock, **kw)

    def close(self) -> None:
        self.conn.close()

    # -- generic ----------------------------------------------------------------
    def call(self, request: FrontendReq, payload: p.Payload | None = None, fds: list[int] | None = None,
             *, ack: bool = True) -> Message | None:
        """Send a request; return its reply (explicit), or check the REPLY_ACK when one was asked for."""
        flags = VERSION
        if ack and self.neg.has(ProtocolFeature.REPLY_ACK):
            flags |= FLAG_NEED_REPLY
        msg = Message(request, payload or p.Empty(), list(fds or []), flags)
        self.neg.observe(msg)
        reply = self.conn.request(msg, expect_reply=self.neg.expects_reply(msg), timeout=self.timeout)
        if reply is not None and not self._has_explicit_reply(request) and isinstance(reply.payload, p.U64):
            if reply.payload.value != 0:
                raise BackendRefused(f"backend refused {request.name} (REPLY_ACK {reply.payload.value})")
        return reply

    def _has_explicit_reply(self, request: FrontendReq) -> bool:
        from .messages import FRONTEND_SPECS
        return bool(FRONTEND_SPECS[request].reply) and request not in (FrontendReq.SET_MEM_TABLE,
                                                                        FrontendReq.SET_LOG_BASE)

    def _u64(self, request: FrontendReq) -> int:
        reply = self.call(request)
        if not isinstance(reply.payload, p.U64):
            raise ProtocolError(f"{request.name} reply is not a u64")
        return reply.payload.value

    # -- requests -------------------------------------------------------------------
    def get_features(self) -> int:
        return self._u64(FrontendReq.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.call(FrontendReq.SET_FEATURES, p.U64(features))

    def get_protocol_features(self) -> int:
        return self._u64(FrontendReq.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.call(FrontendReq.SET_PROTOCOL_FEATURES, p.U64(features), ack=False)

    def set_owner(self) -> None:
        self.call(FrontendReq.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._u64(FrontendReq.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(FrontendReq.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, regions: list[p.MemoryRegion], fds: list[int]) -> None:
        self.call(FrontendReq.SET_MEM_TABLE, p.MemTable(regions), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self.call(FrontendReq.SET_VRING_NUM, p.VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.call(FrontendReq.SET_VRING_BASE, p.VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        reply = self.call(FrontendReq.GET_VRING_BASE, p.VringState(index, 0))
        return reply.payload.num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> None:
        self.call(FrontendReq.SET_VRING_ADDR, p.VringAddr(index, flags, desc, used, avail, log))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self.call(FrontendReq.SET_VRING_KICK, p.VringFd.make(index, fd is None), [] if fd is None else [fd])

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self.call(FrontendReq.SET_VRING_CALL, p.VringFd.make(index, fd is None), [] if fd is None else [fd])

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self.call(FrontendReq.SET_VRING_ERR, p.VringFd.make(index, fd is None), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call(FrontendReq.SET_VRING_ENABLE, p.VringState(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.call(FrontendReq.GET_CONFIG, p.Config(offset, 0, bytes(size)))
        if not isinstance(reply.payload, p.Config):
            raise BackendRefused("backend refused GET_CONFIG (empty reply)")
        return reply.payload.data

    def get_status(self) -> int:
        return self._u64(FrontendReq.GET_STATUS)

    def set_status(self, status: int) -> None:
        self.call(FrontendReq.SET_STATUS, p.U64(status))

    def reset_device(self) -> None:
        self.call(FrontendReq.RESET_DEVICE)

    def set_backend_req_fd(self, fd: int) -> None:
        self.call(FrontendReq.SET_BACKEND_REQ_FD, p.Empty(), [fd])
