"""Wire-format tests: every request and reply round-trips through a real
unix socket with its fds, and each kind of malformed input raises its typed
error, closes every fd that came with it, and names what was wrong."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from fastshadow.protocol import payloads as p
from fastshadow.protocol.connection import Channel, Connection
from fastshadow.protocol.errors import (BadFlags, BadVersion, InvalidPayload, MissingFds, PayloadSizeMismatch,
                                        PayloadTooLarge, PeerClosed, ShortHeader, ShortPayload, TooManyFds,
                                        UnexpectedFds, UnknownRequest)
from fastshadow.protocol.messages import (BACKEND_SPECS, FLAG_NEED_REPLY, FLAG_REPLY, FRONTEND_SPECS, HEADER,
                                          VERSION, BackendReq, FrontendReq, Message, Negotiation)
from fastshadow.protocol.features import ProtocolFeature

SAMPLES: dict[type, p.Payload] = {
    p.Empty: p.Empty(),
    p.U64: p.U64(0x1234_5678_9ABC_DEF0),
    p.VringFd: p.VringFd.make(3),
    p.VringState: p.VringState(1, 256),
    p.VringAddr: p.VringAddr(1, 0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0),
    p.MemTable: p.MemTable([p.MemoryRegion(0, 1 << 30, 0x7F00_0000_0000, 0),
                            p.MemoryRegion(1 << 32, 1 << 30, 0x7F80_0000_0000, 4096)]),
    p.MemRegionMsg: p.MemRegionMsg(p.MemoryRegion(1 << 32, 1 << 20, 0x7F00_0000_0000, 0)),
    p.Log: p.Log(1 << 20, 0),
    p.IotlbMsg: p.IotlbMsg(0x1000, 0x2000, 0x7F00_0000_0000, 3, p.IOTLB_UPDATE),
    p.Config: p.Config(0, 0, bytes(range(60))),
    p.VringArea: p.VringArea(2, 4096, 0),
    p.Inflight: p.Inflight(8192, 0, 2, 256),
    p.Uuid: p.Uuid(bytes(range(16))),
    p.DeviceStateTransfer: p.DeviceStateTransfer(0, 0),
    p.ShmemConfig: p.ShmemConfig(2, (4096, 8192) + (0,) * 254),
    p.ShmemMap: p.ShmemMap(1, 0, 4096, 8192, 3),
    p.Opaque: p.Opaque(b"\x01" * 40),
}


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def open_fds() -> set[int]:
    return set(int(x) for x in os.listdir("/proc/self/fd"))


def make_fds(n: int) -> list[int]:
    return [os.memfd_create(f"t{i}") for i in range(n)]


def fds_needed(rule, payload) -> int:
    lo, hi = rule.bounds(payload)
    return lo


def roundtrip(pair, msg: Message, channel: Channel, *, reply: bool) -> Message:
    a, b = pair
    sender = Connection(a, channel, receives_replies=not reply)
    receiver = Connection(b, channel, receives_replies=reply)
    sender.send(msg)
    return receiver.recv(timeout=5)


def check_same(sent: Message, got: Message) -> None:
    assert got.request == sent.request
    assert got.flags == sent.flags
    assert got.payload.encode() == sent.payload.encode()
    assert type(got.payload) is type(sent.payload) or isinstance(got.payload, type(sent.payload))
    assert len(got.fds) == len(sent.fds)
    for mine, theirs in zip(sent.fds, got.fds):
        assert os.fstat(mine).st_ino == os.fstat(theirs).st_ino
    got.close_fds()
    sent.close_fds()


def request_cases():
    for specs, channel in ((FRONTEND_SPECS, Channel.MAIN), (BACKEND_SPECS, Channel.BACKEND)):
        for req, spec in specs.items():
            for t in spec.payload:
                yield pytest.param(channel, req, t, id=f"{req.__class__.__name__}.{req.name}-{t.__name__}")


@pytest.mark.parametrize("channel,req,ptype", list(request_cases()))
def test_request_roundtrip(pair, channel, req, ptype):
    payload = SAMPLES[ptype]
    spec = (FRONTEND_SPECS if channel is Channel.MAIN else BACKEND_SPECS)[req]
    msg = Message(req, payload, make_fds(fds_needed(spec.fds, payload)), VERSION | FLAG_NEED_REPLY)
    check_same(msg, roundtrip(pair, msg, channel, reply=False))


def reply_cases():
    for specs, channel in ((FRONTEND_SPECS, Channel.MAIN), (BACKEND_SPECS, Channel.BACKEND)):
        for req, spec in specs.items():
            for t in spec.reply or (p.U64,):
                yield pytest.param(channel, req, t, id=f"{req.__class__.__name__}.{req.name}-reply-{t.__name__}")


@pytest.mark.parametrize("channel,req,ptype", list(reply_cases()))
def test_reply_roundtrip(pair, channel, req, ptype):
    spec = (FRONTEND_SPECS if channel is Channel.MAIN else BACKEND_SPECS)[req]
    payload = SAMPLES[ptype]
    msg = Message(req, payload, make_fds(spec.reply_fds.bounds(payload)[1]), VERSION | FLAG_REPLY)
    check_same(msg, roundtrip(pair, msg, channel, reply=True))


def test_every_request_of_the_spec_is_covered():
    assert [r.value for r in FrontendReq] == list(range(1, 45))
    assert [r.value for r in BackendReq] == list(range(1, 11))


def test_vring_fd_without_fd_when_nofd_flag(pair):
    msg = Message(FrontendReq.SET_VRING_CALL, p.VringFd.make(1, nofd=True))
    got = roundtrip(pair, msg, Channel.MAIN, reply=False)
    assert got.payload.nofd and got.payload.index == 1 and got.fds == []


# -- malformed input ------------------------------------------------------------

def raw_send(sock, code, flags, payload=b"", fds=(), size=None):
    import array
    data = HEADER.pack(code, flags, len(payload) if size is None else size) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def expect_error(pair, exc, send, *, channel=Channel.MAIN, reply=False, words=()):
    a, b = pair
    receiver = Connection(b, channel, receives_replies=reply, name="peer")
    before = open_fds()
    send(a)
    with pytest.raises(exc) as info:
        receiver.recv(timeout=5)
    # Every fd that arrived with the bad message is closed again.
    assert open_fds() <= before | set()
    for w in words:
        assert w in str(info.value), str(info.value)
    return info.value


def send_with_fds(n, code, flags=VERSION, payload=b""):
    def send(sock):
        fds = make_fds(n)
        raw_send(sock, code, flags, payload, fds)
        for fd in fds:
            os.close(fd)
    return send


def test_short_header(pair):
    def send(sock):
        sock.send(b"\x01\x00\x00\x00\x01")
        sock.shutdown(socket.SHUT_WR)
    expect_error(pair, ShortHeader, send, words=["5 of 12"])


def test_clean_eof_is_peer_closed(pair):
    expect_error(pair, PeerClosed, lambda s: s.shutdown(socket.SHUT_WR))


def test_wrong_version(pair):
    expect_error(pair, BadVersion, lambda s: raw_send(s, 1, 0x2), words=["version 2"])


def test_unknown_flags(pair):
    expect_error(pair, BadFlags, lambda s: raw_send(s, 1, VERSION | 0x100), words=["0x100"])


def test_reply_bit_on_a_request(pair):
    expect_error(pair, BadFlags, lambda s: raw_send(s, 1, VERSION | FLAG_REPLY, b"\0" * 8),
                 words=["GET_FEATURES", "reply"])


def test_unknown_request(pair):
    expect_error(pair, UnknownRequest, lambda s: raw_send(s, 99, VERSION), words=["99"])


def test_unknown_backend_request(pair):
    expect_error(pair, UnknownRequest, lambda s: raw_send(s, 11, VERSION), channel=Channel.BACKEND,
                 words=["11"])


def test_payload_size_mismatch(pair):
    expect_error(pair, PayloadSizeMismatch, lambda s: raw_send(s, FrontendReq.SET_FEATURES, VERSION, b"\0" * 4),
                 words=["SET_FEATURES", "8", "got 4"])


def test_payload_on_request_that_takes_none(pair):
    expect_error(pair, PayloadSizeMismatch, lambda s: raw_send(s, FrontendReq.GET_FEATURES, VERSION, b"\0" * 8),
                 words=["GET_FEATURES"])


def test_payload_too_large(pair):
    expect_error(pair, PayloadTooLarge, lambda s: raw_send(s, FrontendReq.SET_CONFIG, VERSION, size=1 << 20),
                 words=["1048576"])


def test_short_payload(pair):
    def send(sock):
        raw_send(sock, FrontendReq.SET_FEATURES, VERSION, b"\0" * 3, size=8)
        sock.shutdown(socket.SHUT_WR)
    expect_error(pair, ShortPayload, send, words=["3 of 8"])


def test_fds_on_request_that_takes_none(pair):
    expect_error(pair, UnexpectedFds, send_with_fds(1, FrontendReq.GET_FEATURES), words=["GET_FEATURES", "1 fds"])


def test_more_fds_than_regions(pair):
    table = SAMPLES[p.MemTable].encode()  # 2 regions
    expect_error(pair, TooManyFds, send_with_fds(3, FrontendReq.SET_MEM_TABLE, payload=table),
                 words=["3 fds", "2 allowed"])


def test_more_fds_than_the_protocol_allows(pair):
    table = p.MemTable([p.MemoryRegion(i << 30, 1 << 30, i << 31, 0) for i in range(8)]).encode()
    expect_error(pair, TooManyFds, send_with_fds(9, FrontendReq.SET_MEM_TABLE, payload=table), words=["9 fds"])


def test_many_more_fds_than_room(pair):
    expect_error(pair, TooManyFds, send_with_fds(80, FrontendReq.SET_MEM_TABLE, payload=b"\0" * 8))


def test_missing_fds(pair):
    table = SAMPLES[p.MemTable].encode()
    expect_error(pair, MissingFds, send_with_fds(1, FrontendReq.SET_MEM_TABLE, payload=table),
                 words=["1 fds", "2 required"])


def test_kick_without_fd_and_without_nofd_flag(pair):
    expect_error(pair, MissingFds, lambda s: raw_send(s, FrontendReq.SET_VRING_KICK, VERSION, struct.pack("=Q", 0)))


def test_kick_with_fd_and_nofd_flag(pair):
    expect_error(pair, UnexpectedFds, send_with_fds(1, FrontendReq.SET_VRING_KICK,
                                                    payload=struct.pack("=Q", 0x100)))


def test_mem_table_too_many_regions(pair):
    payload = struct.pack("=II", 9, 0) + b"\0" * 32 * 9
    expect_error(pair, InvalidPayload, lambda s: raw_send(s, FrontendReq.SET_MEM_TABLE, VERSION, payload),
                 words=["9 regions"])


def test_mem_table_count_disagrees_with_size(pair):
    payload = struct.pack("=II", 2, 0) + b"\0" * 32
    expect_error(pair, PayloadSizeMismatch, lambda s: raw_send(s, FrontendReq.SET_MEM_TABLE, VERSION, payload))


def test_mem_region_zero_size(pair):
    payload = p.MemTable([p.MemoryRegion(0, 0, 0, 0)]).encode()
    expect_error(pair, InvalidPayload, send_with_fds(1, FrontendReq.SET_MEM_TABLE, payload=payload),
                 words=["size 0"])


def test_mem_region_wraps(pair):
    payload = p.MemTable([p.MemoryRegion((1 << 64) - 4096, 8192, 0, 0)]).encode()
    expect_error(pair, InvalidPayload, send_with_fds(1, FrontendReq.SET_MEM_TABLE, payload=payload),
                 words=["wraps"])


def test_mem_regions_overlap(pair):
    payload = p.MemTable([p.MemoryRegion(0, 8192, 0, 0), p.MemoryRegion(4096, 8192, 1 << 40, 0)]).encode()
    expect_error(pair, InvalidPayload, send_with_fds(2, FrontendReq.SET_MEM_TABLE, payload=payload),
                 words=["overlap"])


def test_mem_regions_overlap_in_user_addresses(pair):
    # A trial finding: accepted silently; a ring address in both would mean two places.
    payload = p.MemTable([p.MemoryRegion(0, 8192, 1 << 40, 0), p.MemoryRegion(1 << 32, 8192, (1 << 40) + 4096,
                                                                              0)]).encode()
    expect_error(pair, InvalidPayload, send_with_fds(2, FrontendReq.SET_MEM_TABLE, payload=payload),
                 words=["overlap in user addresses"])


def test_vring_addr_misaligned(pair):
    payload = p.VringAddr(0, 0, 0x1008, 0x2000, 0x3000, 0).encode()
    expect_error(pair, InvalidPayload, lambda s: raw_send(s, FrontendReq.SET_VRING_ADDR, VERSION, payload),
                 words=["16-byte"])


def test_config_size_disagrees(pair):
    payload = struct.pack("=III", 0, 10, 0) + b"\0" * 4
    expect_error(pair, PayloadSizeMismatch, lambda s: raw_send(s, FrontendReq.SET_CONFIG, VERSION, payload),
                 words=["10 data bytes"])


def test_vring_fd_reserved_bits(pair):
    expect_error(pair, InvalidPayload, send_with_fds(1, FrontendReq.SET_VRING_CALL,
                                                     payload=struct.pack("=Q", 0x1_0000)))


def test_iotlb_invalidation_with_any_perm_and_uaddr(pair):
    """QEMU 7.2 sends VHOST_IOTLB_INVALIDATE with perm and uaddr uninitialized (vhost-backend.c
    vhost_backend_invalidate_device_iotlb sets iova, size and type only); a virtio-iommu guest's
    unmap arrived with perm 67. An invalidation grants no access: it decodes as sent."""
    payload = p.IotlbMsg(0xFFFF_E000, 0x2000, 0x7F3A_DEAD_B000, 67, p.IOTLB_INVALIDATE).encode()
    a, b = pair
    raw_send(a, FrontendReq.IOTLB_MSG, VERSION, payload)
    got = Connection(b, Channel.MAIN, receives_replies=False, name="peer").recv(timeout=5)
    assert (got.payload.type, got.payload.iova, got.payload.size, got.payload.perm) == (
        p.IOTLB_INVALIDATE, 0xFFFF_E000, 0x2000, 67)


@pytest.mark.parametrize("kind", [p.IOTLB_UPDATE, p.IOTLB_MISS, p.IOTLB_ACCESS_FAIL])
def test_iotlb_perm_out_of_range_where_it_means_an_access(pair, kind):
    """Where perm is an access (VHOST_ACCESS_RO 1, WO 2, RW 3), anything above 3 is refused."""
    payload = p.IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 67, kind).encode()
    expect_error(pair, InvalidPayload, lambda s: raw_send(s, FrontendReq.IOTLB_MSG, VERSION, payload),
                 words=["IOTLB permission 67 is not 0-3"])


def test_iotlb_unknown_type(pair):
    payload = p.IotlbMsg(0x1000, 0x1000, 0, 3, 5).encode()
    expect_error(pair, InvalidPayload, lambda s: raw_send(s, FrontendReq.IOTLB_MSG, VERSION, payload),
                 words=["type 5 is not 1-4"])


def test_stream_split_in_pieces(pair):
    """A message may arrive in several pieces; the fds come with the first byte."""
    a, b = pair
    fd = os.memfd_create("x")
    msg = Message(FrontendReq.SET_VRING_CALL, p.VringFd.make(2), [fd])
    data = msg.encode()
    import array
    a.sendmsg([data[:5]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
    a.send(data[5:14])
    a.send(data[14:])
    got = Connection(b, Channel.MAIN, receives_replies=False).recv(timeout=5)
    check_same(msg, got)


# -- who answers what -----------------------------------------------------------

def test_reply_expectations():
    neg = Negotiation()
    get = Message(FrontendReq.GET_FEATURES)
    setf = Message(FrontendReq.SET_FEATURES, p.U64(0), flags=VERSION | FLAG_NEED_REPLY)
    assert neg.expects_reply(get)
    assert not neg.expects_reply(setf)  # REPLY_ACK not negotiated yet
    neg.observe(Message(FrontendReq.SET_PROTOCOL_FEATURES, p.U64(ProtocolFeature.REPLY_ACK)))
    assert neg.expects_reply(setf)
    assert not neg.expects_reply(Message(FrontendReq.SET_FEATURES, p.U64(0)))
    log_base = Message(FrontendReq.SET_LOG_BASE, p.Log(4096, 0))
    assert not neg.expects_reply(log_base)
    neg.observe(Message(FrontendReq.SET_PROTOCOL_FEATURES, p.U64(ProtocolFeature.LOG_SHMFD)))
    assert neg.expects_reply(log_base)
    mem = Message(FrontendReq.SET_MEM_TABLE, SAMPLES[p.MemTable])
    assert not neg.expects_reply(mem)
    neg.observe(Message(FrontendReq.POSTCOPY_LISTEN))
    assert neg.expects_reply(mem)
    assert neg.expects_reply(Message(BackendReq.SHARED_OBJECT_LOOKUP, SAMPLES[p.Uuid]))
    assert not neg.expects_reply(Message(BackendReq.CONFIG_CHANGE_MSG))
    assert neg.expects_reply(Message(BackendReq.CONFIG_CHANGE_MSG, flags=VERSION | FLAG_NEED_REPLY))
