"""Structure-aware fuzzing of the vhost-user codec (fastshadow.protocol), both channels,
requests and replies, through a real unix socketpair with SCM_RIGHTS fds.

Each case is built from the wire rules (messages.FRONTEND_SPECS / BACKEND_SPECS): a
known request code, a payload of one of its types with random field values and the
fds its rule asks for; then at most one mutation: a random body, a body of the wrong
size, bad version or flag bits, the reply bit of the other direction, an unknown code,
too many / too few / unexpected fds (up to more than the receiver has room for), a
header cut short, a payload announced but not sent, an oversize announcement; and the
byte stream is cut into chunks, the fds riding on one of them (or split over two).

Invariants of Connection.recv():
- it returns a Message or raises a VhostUserError (ProtocolError family, PeerClosed,
  ReplyTimeout), never another exception, and never hangs (the sender's end is shut
  down after sending and a receive timeout is given);
- a well-formed message is accepted: same code, flags and bytes (padding aside), its
  fds the very files sent (same inodes), in order; its encoding round-trips through
  another socketpair;
- after a failure no fd that arrived is left open (/proc/self/fd before and after),
  and after success exactly the message's fds are new.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import threading
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fastshadow.protocol import payloads as p
from fastshadow.protocol.connection import Channel, Connection
from fastshadow.protocol.errors import (BadFlags, BadVersion, PayloadTooLarge, PeerClosed, ShortHeader,
                                        ShortPayload, UnknownRequest, VhostUserError)
from fastshadow.protocol.messages import (FLAG_NEED_REPLY, FLAG_REPLY, HEADER, HEADER_SIZE, KNOWN_FLAGS,
                                          MAX_PAYLOAD_SIZE, VERSION, VERSION_MASK, BackendReq, FrontendReq, Message,
                                          spec_of)

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: (channel, receives_replies): who reads what.
DIRECTIONS = [(Channel.MAIN, False), (Channel.MAIN, True), (Channel.BACKEND, False), (Channel.BACKEND, True)]

#: Payload bytes the codec does not keep (C struct padding): (type, slice of the body).
PADDING = {p.IotlbMsg: slice(26, 32), p.Inflight: slice(20, 24), p.ShmemConfig: slice(4, 8),
           p.ShmemMap: slice(1, 8)}


# -- field strategies ----------------------------------------------------------------

def uint(bits: int):
    """An unsigned integer, biased toward the edges."""
    hi = (1 << bits) - 1
    return st.one_of(st.integers(0, hi), st.sampled_from(sorted({0, 1, 2, hi, hi - 1, 1 << (bits - 1)})))


def aligned(n: int):
    """A 64-bit address, mostly n-aligned."""
    return st.one_of(st.integers(0, ((1 << 64) - 1) // n).map(lambda x: x * n), uint(64))


regions_any = st.builds(p.MemoryRegion, uint(64), uint(64), uint(64), uint(64))


@st.composite
def region_lists(draw):
    """Up to 8 (sometimes 9) regions: a plausible layout (disjoint, ascending) or anything."""
    n = draw(st.integers(0, 8) | st.just(9))
    if draw(st.booleans()):
        gpa = draw(st.integers(0, 1 << 40))
        out = []
        for _ in range(n):
            size = draw(st.integers(1, 1 << 32))
            out.append(p.MemoryRegion(gpa, size, draw(st.integers(0, 1 << 47)), draw(st.integers(0, 1 << 30))))
            gpa += size + draw(st.integers(0, 1 << 20))
        return out
    return draw(st.lists(regions_any, min_size=n, max_size=n))


@st.composite
def shmem_configs(draw):
    sizes = [0] * 256
    for i, v in draw(st.dictionaries(st.integers(0, 255), uint(64), max_size=6)).items():
        sizes[i] = v
    return p.ShmemConfig(draw(st.integers(0, 256) | uint(32)), tuple(sizes))


PAYLOADS = {
    p.Empty: st.just(p.Empty()),
    p.U64: st.builds(p.U64, uint(64)),
    p.VringFd: st.one_of(st.builds(p.VringFd.make, st.integers(0, 255), st.booleans()), st.builds(p.VringFd, uint(64))),
    p.VringState: st.builds(p.VringState, uint(32), uint(32)),
    p.VringAddr: st.builds(p.VringAddr, uint(32), st.sampled_from([0, 1]) | uint(32), aligned(16), aligned(4),
                           aligned(2), uint(64)),
    p.MemTable: st.builds(p.MemTable, region_lists(), uint(32)),
    p.MemRegionMsg: st.builds(p.MemRegionMsg, regions_any, uint(64)),
    p.Log: st.builds(p.Log, uint(64), uint(64)),
    p.IotlbMsg: st.builds(p.IotlbMsg, uint(64), uint(64), uint(64), st.integers(0, 3) | uint(8),
                          st.integers(1, 4) | uint(8)),
    p.Config: st.builds(p.Config, st.integers(0, 256) | uint(32), st.sampled_from([0, 1]) | uint(32),
                        st.binary(max_size=300)),
    p.VringArea: st.builds(p.VringArea, uint(64), uint(64), uint(64)),
    p.Inflight: st.builds(p.Inflight, uint(64), uint(64), uint(16), uint(16)),
    p.Uuid: st.builds(p.Uuid, st.binary(min_size=16, max_size=16)),
    p.DeviceStateTransfer: st.builds(p.DeviceStateTransfer, st.integers(0, 1) | uint(32), uint(32)),
    p.ShmemConfig: shmem_configs(),
    p.ShmemMap: st.builds(p.ShmemMap, uint(8), uint(64), uint(64), uint(64), uint(64)),
    p.Opaque: st.builds(p.Opaque, st.binary(max_size=400)),
}


def test_every_payload_type_has_a_strategy():
    from fastshadow.protocol.messages import BACKEND_SPECS, FRONTEND_SPECS
    used = {t for s in [*FRONTEND_SPECS.values(), *BACKEND_SPECS.values()] for t in (*s.payload, *s.reply)}
    assert used | {p.U64} <= set(PAYLOADS)


# -- one wire case -----------------------------------------------------------------------

MUTATIONS = ["none", "raw_body", "resize", "flags", "reply_bit", "code", "fds", "many_fds",
             "trunc_header", "short_body", "oversize"]
KNOWN_CODES = {Channel.MAIN: {int(r) for r in FrontendReq}, Channel.BACKEND: {int(r) for r in BackendReq}}


@dataclass
class Wire:
    channel: Channel
    receives_replies: bool
    request: int               # the code the message was built for
    code: int                  # the code on the wire
    flags: int
    payload_type: type
    body: bytes
    announced: int             # the header's size field
    nfds: int
    fd_kind: str
    cuts: tuple[int, ...]      # the byte stream is sent in chunks cut here
    fd_chunks: tuple[int, ...]  # chunk(s) carrying the fds (split in order when two)
    mutation: str
    trunc: int | None = None   # only this many bytes are sent (a cut header)

    def stream(self) -> bytes:
        data = HEADER.pack(self.code, self.flags, self.announced) + self.body
        return data if self.trunc is None else data[:self.trunc]

    def chunks(self) -> list[tuple[int, bytes]]:
        data = self.stream()
        points = [0, *sorted({c for c in self.cuts if 0 < c < len(data)}), len(data)]
        return [(a, data[a:b]) for a, b in zip(points, points[1:]) if b > a]

    def fds_in_header(self) -> bool:
        """Every fd rides on a chunk that starts inside the header (a receiver reads
        the fds with the header; the kernel drops fds that come with body bytes)."""
        starts = [start for start, _ in self.chunks()]
        return all(starts[min(i, len(starts) - 1)] < HEADER_SIZE for i in self.fd_chunks) if starts else True


def fd_bounds(rule, payload) -> tuple[int, int]:
    try:
        return rule.bounds(payload)
    except AttributeError:  # a rule that reads a field this payload type lacks
        return (0, 0)


@st.composite
def wires(draw, mutation: str | None = None):
    channel, replies = draw(st.sampled_from(DIRECTIONS))
    request = draw(st.sampled_from(list(channel.request_type)))
    spec = spec_of(request)
    types = (spec.reply or (p.U64,)) if replies else spec.payload
    ptype = draw(st.sampled_from(types))
    payload = draw(PAYLOADS[ptype])
    body = payload.encode()
    lo, hi = fd_bounds(spec.reply_fds if replies else spec.fds, payload)
    nfds = draw(st.integers(lo, hi)) if hi >= lo else 0
    flags = VERSION | (FLAG_REPLY if replies else 0) | (FLAG_NEED_REPLY if draw(st.booleans()) else 0)
    code, announced, trunc = int(request), len(body), None
    if mutation is None:
        mutation = draw(st.sampled_from(["none"] * 6 + MUTATIONS[1:]))
    if mutation == "raw_body":
        n = len(body) if ptype.SIZE is not None else draw(st.integers(0, 600))
        body = draw(st.binary(min_size=n, max_size=n))
        announced = len(body)
    elif mutation == "resize":
        if body and draw(st.booleans()):
            body = body[:draw(st.integers(0, len(body) - 1))]
        else:
            body += draw(st.binary(min_size=1, max_size=64))
        announced = len(body)
    elif mutation == "flags":
        flags = draw(st.one_of(uint(32), st.sampled_from([0, 2, 3, flags & ~VERSION_MASK | 2, flags | 1 << 4,
                                                         flags | 1 << 31])))
    elif mutation == "reply_bit":
        flags ^= FLAG_REPLY
    elif mutation == "code":
        code = draw(uint(32).filter(lambda c: c not in KNOWN_CODES[channel]))
    elif mutation == "fds":
        nfds = (nfds + draw(st.integers(1, 12))) % 13
    elif mutation == "many_fds":
        nfds = draw(st.integers(60, 80))
    elif mutation == "trunc_header":
        trunc = draw(st.integers(0, HEADER_SIZE - 1))
    elif mutation == "short_body":
        announced = min(MAX_PAYLOAD_SIZE, len(body) + draw(st.integers(1, 200)))
        if announced == len(body):
            body = body[:-1]
    elif mutation == "oversize":
        announced = draw(st.integers(MAX_PAYLOAD_SIZE + 1, (1 << 32) - 1))
        body = draw(st.binary(max_size=64))
    cuts = tuple(draw(st.lists(st.integers(1, HEADER_SIZE + len(body)), max_size=3)))
    fd_chunks = draw(st.sampled_from([(0,), (0,), (0,), (1,), (2,), (0, 1)]))
    wire = Wire(channel, replies, int(request), code, flags, ptype, body, announced, nfds,
                draw(st.sampled_from(["memfd", "eventfd", "pipe", "socket"])), cuts, fd_chunks, mutation, trunc)
    if not wire.stream():
        wire.nfds = 0  # fds need at least one byte to ride on
    return wire


# -- plumbing -------------------------------------------------------------------------

def open_fds() -> set[int]:
    """The process's open fds (without the one listdir used to read the directory)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fcntl.fcntl(int(name), fcntl.F_GETFD)
        except OSError:
            continue
        out.add(int(name))
    return out


def make_fds(kind: str, n: int) -> list[int]:
    out = []
    for i in range(n):
        if kind == "memfd":
            out.append(os.memfd_create(f"fuzz{i}", os.MFD_CLOEXEC))
        elif kind == "eventfd":
            out.append(os.eventfd(0, os.EFD_CLOEXEC))
        elif kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            out.append(r)
        else:
            s1, s2 = socket.socketpair()
            s2.close()
            out.append(s1.detach())
    return out


def inode(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


def send_wire(sock: socket.socket, wire: Wire) -> list[tuple[int, int]]:
    """Send the case's chunks with its fds; returns the inodes of the fds sent, in order."""
    fds = make_fds(wire.fd_kind, wire.nfds)
    ids = [inode(fd) for fd in fds]
    chunks = wire.chunks()
    try:
        if len(wire.fd_chunks) == 2 and len(fds) > 1:
            half = len(fds) // 2
            groups = {min(wire.fd_chunks[0], len(chunks) - 1): fds[:half]}
            groups.setdefault(min(wire.fd_chunks[1], len(chunks) - 1), []).extend(fds[half:])
        else:
            groups = {min(wire.fd_chunks[0], len(chunks) - 1): fds} if chunks else {}
        for i, (_, data) in enumerate(chunks):
            group = groups.get(i)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", group).tobytes())] if group else []
            sent = sock.sendmsg([data], anc)
            if sent < len(data):
                sock.sendall(data[sent:])
    finally:
        for fd in fds:
            os.close(fd)
    return ids


def masked(data: bytes, ptype: type) -> bytes:
    pad = PADDING.get(ptype)
    if pad is None or len(data) < HEADER_SIZE + pad.stop:
        return data
    b = bytearray(data)
    s = slice(HEADER_SIZE + pad.start, HEADER_SIZE + pad.stop)
    b[s] = bytes(len(b[s]))
    return bytes(b)


def decodes(wire: Wire) -> bool:
    """The body, as the type the codec would pick, decodes and passes its own checks."""
    from fastshadow.protocol.messages import choose_payload_type
    spec = spec_of(wire.channel.request_type(wire.request))
    types = (spec.reply or (p.U64,)) if wire.receives_replies else spec.payload
    try:
        t = choose_payload_type(wire.channel.request_type(wire.request), types, len(wire.body))
        t.decode(wire.body).check()
        return True
    except VhostUserError:
        return False


def expected_error(wire: Wire) -> type[VhostUserError] | None:
    """The error class a single mutation must produce, where the receive order fixes it."""
    if wire.trunc is not None:
        return PeerClosed if wire.trunc == 0 else ShortHeader
    if wire.flags & VERSION_MASK != VERSION:
        return BadVersion
    if wire.flags & ~KNOWN_FLAGS:
        return BadFlags
    if wire.code not in KNOWN_CODES[wire.channel]:
        return UnknownRequest
    if bool(wire.flags & FLAG_REPLY) != wire.receives_replies:
        return BadFlags
    if wire.mutation == "oversize" and wire.nfds == 0:
        return PayloadTooLarge
    if wire.mutation == "short_body" and wire.nfds == 0 and wire.announced <= MAX_PAYLOAD_SIZE:
        return ShortPayload
    return None


def receive(wire: Wire, conn: Connection, base: set[int], sent_ids) -> Message | None:
    """recv() under the invariants; returns the message (its fds still open) or None."""
    try:
        msg = conn.recv(timeout=5)
    except VhostUserError as e:
        event(f"refused: {type(e).__name__}")
        leaked = open_fds() - base
        assert not leaked, f"{type(e).__name__} ({e}) left received fds open: {sorted(leaked)}"
        want = expected_error(wire)
        if want is not None:
            assert isinstance(e, want), f"{wire.mutation}: want {want.__name__}, got {type(e).__name__}: {e}"
        well_formed = wire.mutation == "none" and wire.fds_in_header() and decodes(wire)
        assert not well_formed, f"a well-formed message was refused: {type(e).__name__}: {e}"
        return None
    except Exception as e:  # noqa: BLE001 - the property under test
        leaked = open_fds() - base
        pytest.fail(f"recv raised {type(e).__name__} (not a VhostUserError): {e}; fds left open: {sorted(leaked)}")
    event("accepted" + (" with fds" if msg.fds else ""))
    new = open_fds() - base
    assert new == set(msg.fds) and len(msg.fds) == len(new), (new, msg.fds)
    return msg


def check_accepted(wire: Wire, msg: Message, sent_ids) -> None:
    assert expected_error(wire) is None, f"{wire.mutation}: accepted {msg.describe()}"
    assert int(msg.request) == wire.code and msg.flags == wire.flags
    sent = wire.stream()
    assert masked(msg.encode(), type(msg.payload)) == masked(sent, type(msg.payload)), "encode() does not round-trip"
    got_ids = [inode(fd) for fd in msg.fds]
    if wire.fds_in_header():
        assert got_ids == sent_ids, "the fds received are not the ones sent, in order"
    else:
        assert set(got_ids) <= set(sent_ids)
    # And once more through another socketpair, as Connection.send sends it.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        Connection(a, wire.channel, receives_replies=not wire.receives_replies).send(
            Message(msg.request, msg.payload, list(msg.fds), msg.flags))
        again = Connection(b, wire.channel, receives_replies=wire.receives_replies).recv(timeout=5)
        try:
            assert (again.request, again.flags, again.payload) == (msg.request, msg.flags, msg.payload)
            assert [inode(fd) for fd in again.fds] == got_ids
        finally:
            again.close_fds()
    finally:
        a.close()
        b.close()


def run_case(wire: Wire) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sent_ids = send_wire(a, wire)
        a.shutdown(socket.SHUT_WR)  # whatever was cut short ends here: no receive waits forever
        conn = Connection(b, wire.channel, receives_replies=wire.receives_replies, name="fuzz")
        base = open_fds()
        msg = receive(wire, conn, base, sent_ids)
        if msg is not None:
            try:
                check_accepted(wire, msg, sent_ids)
            finally:
                msg.close_fds()
            assert open_fds() == base
    finally:
        a.close()
        b.close()


# -- the fuzzers ------------------------------------------------------------------------

@SETTINGS
@given(wire=wires())
@example(wire=Wire(Channel.MAIN, False, 5, 5, VERSION, p.MemTable, p.MemTable([]).encode(), 8, 70, "memfd",
                   (), (0,), "many_fds"))  # more fds than the receiver has room for: MSG_CTRUNC
@example(wire=Wire(Channel.MAIN, False, 12, 12, VERSION, p.VringFd, p.VringFd.make(0).encode(), 8, 1, "eventfd",
                   (12,), (1,), "none"))  # the kick fd rides on the body bytes: the kernel drops it
@example(wire=Wire(Channel.BACKEND, True, 8, 8, VERSION | FLAG_REPLY, p.U64, p.U64(0).encode(), 8, 1, "memfd",
                   (4, 8), (0, 1), "none"))  # fds split over two header chunks
def test_recv_any_message(wire):
    run_case(wire)


@settings(SETTINGS, max_examples=150)
@given(cases=st.lists(wires(mutation="none"), min_size=2, max_size=4), cut=st.integers(1, 40))
def test_recv_back_to_back_messages(cases, cut):
    """Several messages in one byte stream, cut anywhere: each recv() returns the next
    one with its own fds (never its neighbour's), or fails without leaking any fd."""
    cases = [c for c in cases if c.channel == cases[0].channel and c.receives_replies == cases[0].receives_replies]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        ids = []
        for c in cases:
            c.cuts, c.fd_chunks = (cut,), (0,)
            ids.append(send_wire(a, c))
        a.shutdown(socket.SHUT_WR)
        conn = Connection(b, cases[0].channel, receives_replies=cases[0].receives_replies, name="fuzz")
        for c, sent_ids in zip(cases, ids):
            base = open_fds()
            msg = receive(c, conn, base, sent_ids)
            if msg is None:
                return  # the stream is out of step after a refused message: the session would end here
            try:
                check_accepted(c, msg, sent_ids)
            finally:
                msg.close_fds()
        with pytest.raises(PeerClosed):
            conn.recv(timeout=5)
    finally:
        a.close()
        b.close()


# -- regressions: a peer that stops in the middle of a message ------------------------------

def stalled_recv(data: bytes, timeout: float) -> tuple[bool, BaseException | None]:
    """Send `data` (part of a message), keep the connection open, and recv(timeout) on the
    other end; returns (returned within timeout + 2 s, what recv raised)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn = Connection(b, Channel.MAIN, receives_replies=True, name="backend")
    out: list[BaseException | None] = []

    def run():
        try:
            conn.recv(timeout=timeout)
            out.append(None)
        except BaseException as e:  # noqa: BLE001
            out.append(e)
    a.sendall(data)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout + 2)
    done = not t.is_alive()
    a.close()  # unblocks a receive still waiting
    t.join(5)
    b.close()
    return done, out[0] if out else None


# Regression found by the fuzzer, fixed: Connection.recv(timeout) bounds only the wait for the first byte: a
#   peer that sends part of a header and stops blocks the receiver forever
def test_recv_timeout_bounds_a_stalled_header():
    done, err = stalled_recv(HEADER.pack(int(FrontendReq.GET_FEATURES), VERSION | FLAG_REPLY, 8)[:5], 0.5)
    assert done, "recv(timeout=0.5) still blocked 2 s later"
    assert isinstance(err, VhostUserError), err


# Regression found by the fuzzer, fixed: Connection.recv(timeout) bounds only the wait for the first byte: a
#   peer that sends a header and stops before its payload blocks the receiver forever
def test_recv_timeout_bounds_a_stalled_payload():
    done, err = stalled_recv(HEADER.pack(int(FrontendReq.GET_FEATURES), VERSION | FLAG_REPLY, 8), 0.5)
    assert done, "recv(timeout=0.5) still blocked 2 s later"
    assert isinstance(err, VhostUserError), err
