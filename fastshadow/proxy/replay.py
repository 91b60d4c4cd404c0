"""What the backend has been told, kept to tell a restarted backend (DESIGN §7).

Isolated mode survives the backend's death for devices whose requests are
safe to run twice: the session reconnects and a new backend is told, in the
same order, everything the old one had been told. That list is kept here,
and it is filled by the message path itself: IsolatedSession.to_backend,
the one way a message reaches the backend, hands every message the backend
accepted to `BackendRecord.sent`. Handlers never record anything, so a new
handler cannot forget to; the rules of what is state, what supersedes what
and what a later message cancels are all in this file.

Rules (docs/interop/vhost-user.rst, "Ring states", "Starting and stopping
rings"):
- state-setting requests (`STATE_REQUESTS`) are kept, the latest per key
  (per queue for vring requests, per byte range for SET_CONFIG) in the
  position of the first;
- GET_VRING_BASE stops a ring: its SET_VRING_KICK is dropped (the kick
  starts a ring; a new backend must not start a stopped one);
- RESET_OWNER / RESET_DEVICE: every ring's state is dropped (the backend
  forgets them), features too (QEMU negotiates them again); the owner,
  protocol features, memory table and request channel stay;
- a request the backend refused (a failing REPLY_ACK) is not kept.

fds: the record keeps its own duplicate of each fd it was sent (closed when
superseded or at close()), except the back-end request channel, which is
re-created for each backend (`replay(new_channel=...)`): keeping the old
backend's end open would hide that backend's death from the relay; and
except the fds the session renews for each backend (`BackendRecord(renewed=...)`:
in isolated mode the shadow memory and the rings' eventfds), which
`replay(fresh_fd=...)` looks up when it sends them: a new backend must never
get what a previous one had, which may still be alive and holding it.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from ..protocol import payloads as p
from ..protocol.errors import UnexpectedMessage
from ..protocol.features import ProtocolFeature
from ..protocol.messages import FLAG_NEED_REPLY, VERSION, FrontendReq, Message

R = FrontendReq

#: Requests that set state the backend keeps until told otherwise.
STATE_REQUESTS = frozenset({
    R.SET_OWNER, R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_BACKEND_REQ_FD, R.SET_MEM_TABLE,
    R.SET_CONFIG, R.SET_STATUS, R.NET_SET_MTU,
    R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_CALL, R.SET_VRING_ERR,
    R.SET_VRING_KICK, R.SET_VRING_ENABLE,
})

#: Per-ring state, dropped by a device reset.
VRING_REQUESTS = frozenset({R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_CALL,
                            R.SET_VRING_ERR, R.SET_VRING_KICK, R.SET_VRING_ENABLE})

#: Requests that need no REPLY_ACK when replayed (answered before protocol features exist).
_NO_ACK = frozenset({R.SET_OWNER})


class Entry(NamedTuple):
    request: FrontendReq
    payload: p.Payload
    #: The record's own duplicate of the fd sent (None: no fd, or the request channel).
    fd: int | None


def key_of(request: FrontendReq, payload: p.Payload) -> tuple:
    """What a later request of the same kind supersedes: per queue, per config range, or one."""
    if request == R.SET_CONFIG:
        return (request, payload.offset, len(payload.data))
    index = getattr(payload, "index", None)  # vring requests
    return (request,) if index is None else (request, index)


class BackendRecord:
    """The state-setting requests the current backend accepted, in the order first sent."""

    def __init__(self, renewed: frozenset = frozenset()) -> None:
        """renewed: requests whose fd the session replaces for each backend: none is kept."""
        self._entries: dict[tuple, Entry] = {}
        self.renewed = renewed

    def sent(self, msg: Message, accepted: bool = True) -> None:
        """`msg` reached the backend (and, if it was asked to, acked it with `accepted`).

        `msg` holds the sender's own copies of the fds that went out: the record takes
        the one it keeps out of `msg.fds`; the caller closes what is left."""
        if msg.request == R.GET_VRING_BASE:
            self._drop((R.SET_VRING_KICK, msg.payload.index))
        elif msg.request in (R.RESET_OWNER, R.RESET_DEVICE):
            for key in [k for k in self._entries if k[0] in VRING_REQUESTS or k[0] == R.SET_FEATURES]:
                self._drop(key)
        if msg.request not in STATE_REQUESTS or not accepted:
            return
        keep_fd = msg.fds and msg.request != R.SET_BACKEND_REQ_FD and msg.request not in self.renewed
        fd = msg.fds.pop(0) if keep_fd else None
        key = key_of(msg.request, msg.payload)
        old = self._entries.get(key)
        if old is not None and old.fd is not None:
            os.close(old.fd)
        self._entries[key] = Entry(msg.request, msg.payload, fd)

    def get(self, request: FrontendReq, index: int | None = None) -> Entry | None:
        return self._entries.get((request,) if index is None else (request, index))

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def _drop(self, key: tuple) -> None:
        old = self._entries.pop(key, None)
        if old is not None and old.fd is not None:
            os.close(old.fd)

    def close(self) -> None:
        for key in list(self._entries):
            self._drop(key)


def replay(record: BackendRecord, send: Callable[[Message, bool], Message | None], *,
           before_kick: Callable[[int], None], new_channel: Callable[[], int],
           fresh_fd: Callable[[FrontendReq, p.Payload], int | None] = lambda request, payload: None) -> None:
    """Tell a new backend everything `record` holds, in order.

    `send(msg, expect_reply)` sends one message (closing its fds) and returns the
    reply; `before_kick(q)` runs before queue q's kick fd is sent (the data plane
    starts its side of the ring first); `new_channel()` gives the backend's end of
    a new back-end request channel; `fresh_fd(request, payload)` gives the fd to send
    now with a request of `record.renewed` (the session's own, which it may not close;
    None: none). Raises UnexpectedMessage when the new backend lacks a feature the
    session negotiated or refuses a request; the transport's errors (the backend
    left again) pass through.
    """
    _check_features(record, send)
    acks = False  # REPLY_ACK holds from the replayed SET_PROTOCOL_FEATURES on
    for request, payload, fd in record.entries():
        if request == R.SET_VRING_KICK:
            before_kick(payload.index)
        if request == R.SET_BACKEND_REQ_FD:
            fds = [new_channel()]
        elif request in record.renewed:
            now = fresh_fd(request, payload)   # looked up at send time, never the recorded one
            fds = [] if now is None else [os.dup(now)]
        else:
            fds = [os.dup(fd)] if fd is not None else []
        need = acks and request not in _NO_ACK
        reply = send(Message(request, payload, fds, VERSION | (FLAG_NEED_REPLY if need else 0)), need)
        if reply is not None and reply.payload.value != 0:
            raise UnexpectedMessage(f"the restarted backend refused {request.name} (ack {reply.payload.value})")
        if request == R.SET_PROTOCOL_FEATURES:
            acks = bool(payload.value & ProtocolFeature.REPLY_ACK)


def _check_features(record: BackendRecord, send) -> None:
    """The new backend must offer every bit the session set on the old one."""
    for get, set_ in ((R.GET_FEATURES, R.SET_FEATURES), (R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES)):
        offered = send(Message(get, p.Empty(), [], VERSION), True).payload.value
        entry = record.get(set_)
        missing = entry.payload.value & ~offered if entry else 0
        if missing:
            raise UnexpectedMessage(f"the restarted backend does not offer {set_.name[4:].lower()} "
                                    f"{missing:#x} that the session negotiated")
