"""Refused and failed requests complete with the device's own error (DESIGN.md section
3.7, csrc/fail.c): virtio-blk's status byte, virtio-scsi's response, virtio-fs's
fuse_out_header, written only inside the chain's sound device-writable buffers (the
canary check of guest RAM sees every other byte untouched), or len 0 and nothing written
where the chain is too broken to place it."""

import struct

import pytest

from fastshadow.dataplane import DataPlane, DrainTimeout, InvalidRequest
from fastshadow.devices import Failure

from .harness import F_INDIRECT, F_NEXT, F_WRITE, Buf, read_counter

NUM = 16
CAP = 64 << 10
UNMAPPED = 0x4000_0000          # far past the 2 MiB of test RAM
UNIQUE = 0x1122_3344_5566_7788

BLK_IOERR = b"\x01"
SCSI_FAILURE = struct.pack("<IIHBB", 0, 0, 0, 0, 9)     # virtio_scsi_cmd_resp head, response 9
FUSE_EIO = struct.pack("<IiQ", 16, -5, UNIQUE)          # fuse_out_header


def rig_for(make_rig, kind, **kw):
    kw.setdefault("num", NUM)
    kw.setdefault("max_request_bytes", CAP)
    return make_rig(failure=kind, **kw)


def buf(rig, n, data=None, region=0):
    gpa = rig.mem.alloc(n, region=region)
    if data is not None:
        rig.mem.write(gpa, data)
    return gpa


def request(rig, kind, *, data_len=512, data_gpa=None, zero=False):
    """A typical request of the device: (bufs, where the error goes, its bytes, used.len).
    data_gpa: the data buffer's address (UNMAPPED: outside guest memory); zero: a 0-length
    writable descriptor in the middle."""
    data = Buf(data_gpa if data_gpa is not None else buf(rig, data_len), data_len, True)
    extra = [Buf(0xDEAD_0000, 0, True)] if zero else []
    if kind == Failure.BLK_STATUS:
        st = buf(rig, 1)
        bufs = [Buf(buf(rig, 16, struct.pack("<IIQ", 0, 0, 7)), 16), data, *extra, Buf(st, 1, True)]
        return bufs, st, BLK_IOERR, 1
    if kind == Failure.SCSI_RESPONSE:
        resp = buf(rig, 108)
        bufs = [Buf(buf(rig, 51, b"c" * 51), 51), Buf(resp, 108, True), *extra, data]
        return bufs, resp, SCSI_FAILURE, 12
    assert kind == Failure.FUSE_ERROR
    inh = struct.pack("<IIQQIIII", 48, 15, UNIQUE, 1, 0, 0, 0, 0)    # fuse_in_header, 40 B
    out = buf(rig, 16)
    bufs = [Buf(buf(rig, 40, inh), 40), Buf(buf(rig, 8, b"r" * 8), 8), Buf(out, 16, True),
            *extra, data]
    return bufs, out, FUSE_EIO, 16


def expect_failed(rig, head, code, where, err, used_len, q=0):
    rig.poll()
    assert rig.be[q].pending() == [], "a refused chain must not reach the backend"
    assert rig.gq[q].take_used() == [(head, used_len)]
    assert read_counter(rig.call[q]) == 1
    evs = rig.events()
    assert [e.name for e in evs] == [code], [e.message for e in evs]
    assert evs[0].head == head
    if err:
        assert rig.mem.read(where, len(err)) == err
        rig.mem.expect_write(where, err)
    st = rig.dev.stats(q)
    assert (st.refused, st.failed, st.requests, st.inflight) == (1, 1, 0, 0)
    return evs[0]


KINDS = [Failure.BLK_STATUS, Failure.SCSI_RESPONSE, Failure.FUSE_ERROR]
KIND_IDS = ["blk", "scsi", "fs"]


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_too_large(make_rig, kind):
    rig = rig_for(make_rig, kind)
    bufs, where, err, ln = request(rig, kind, data_len=CAP)
    head = rig.gq[0].add(bufs)
    ev = expect_failed(rig, head, "REQUEST_TOO_LARGE", where, err, ln)
    assert ev.b == CAP


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_zero_length_descriptor(make_rig, kind, indirect):
    rig = rig_for(make_rig, kind)
    bufs, where, err, ln = request(rig, kind, zero=True)
    g = rig.gq[0]
    head = (g.add_indirect if indirect else g.add)(bufs)
    ev = expect_failed(rig, head, "ZERO_LENGTH", where, err, ln)
    assert ev.a == [b.len for b in bufs].index(0)          # its chain position


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_bad_layout(make_rig, kind):
    probe = rig_for(make_rig, kind)
    bufs, *_ = request(probe, kind)
    r = sum(b.len for b in bufs if not b.writable)
    w = sum(b.len for b in bufs if b.writable)
    rig = rig_for(make_rig, kind, layout=(r + 1, 0))          # one readable byte short
    bufs, where, err, ln = request(rig, kind)
    head = rig.gq[0].add(bufs)
    ev = expect_failed(rig, head, "BAD_LAYOUT", where, err, ln)
    assert (ev.a, ev.b) == (r, w)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_unmapped_data_buffer_status_still_written(make_rig, kind):
    rig = rig_for(make_rig, kind)
    bufs, where, err, ln = request(rig, kind, data_gpa=UNMAPPED)
    head = rig.gq[0].add(bufs)
    ev = expect_failed(rig, head, "ADDR_UNMAPPED", where, err, ln)
    assert ev.a == UNMAPPED


def test_blk_layout_without_writable_byte_is_len0(make_rig):
    """virtio-blk layout (16, 1): a request with no writable byte has no status byte."""
    rig = rig_for(make_rig, Failure.BLK_STATUS, layout=(16, 1))
    hdr = buf(rig, 16, struct.pack("<IIQ", 1, 0, 0))
    head = rig.gq[0].add([Buf(hdr, 16), Buf(buf(rig, 512, b"w" * 512), 512)])
    ev = expect_failed(rig, head, "BAD_LAYOUT", None, None, 0)
    assert (ev.a, ev.b) == (528, 0)
    # the layout itself lets a well-formed request through
    h2, _ = rig.blk_write(0, b"x" * 64)
    rig.poll()
    [r] = rig.be[0].pending()
    rig.be[0].complete(r.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 0)]


def test_status_buffer_itself_unmapped_is_len0(make_rig):
    rig = rig_for(make_rig, Failure.BLK_STATUS)
    hdr = buf(rig, 16, struct.pack("<IIQ", 0, 0, 7))
    head = rig.gq[0].add([Buf(hdr, 16), Buf(buf(rig, 512), 512, True), Buf(UNMAPPED, 1, True)])
    expect_failed(rig, head, "ADDR_UNMAPPED", None, None, 0)


def test_scsi_too_few_writable_bytes_is_len0(make_rig):
    rig = rig_for(make_rig, Failure.SCSI_RESPONSE)
    head = rig.gq[0].add([Buf(buf(rig, 51, b"c" * 51), 51), Buf(buf(rig, 11), 11, True),
                          Buf(0xDEAD_0000, 0, True)])
    expect_failed(rig, head, "ZERO_LENGTH", None, None, 0)


def test_fuse_header_split_across_descriptors(make_rig):
    """fuse_in_header's unique and the fuse_out_header each span two descriptors (and
    the out header a region boundary): read and written piece by piece."""
    rig = rig_for(make_rig, Failure.FUSE_ERROR)
    inh = struct.pack("<IIQQIIII", 48, 15, UNIQUE, 1, 0, 0, 0, 0)
    a, b = buf(rig, 12, inh[:12]), buf(rig, 28, inh[12:])
    out0 = rig.mem.alloc_crossing(10, 4)                   # 4 bytes in region 0, 6 in region 1
    out1 = buf(rig, 64, region=1)
    head = rig.gq[0].add([Buf(a, 12), Buf(b, 28), Buf(out0, 10, True), Buf(out1, 64, True),
                          Buf(0xDEAD_0000, 0, True)])
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 16)]
    assert rig.mem.read(out0, 10) + rig.mem.read(out1, 6) == FUSE_EIO
    rig.mem.expect_write(out0, FUSE_EIO[:10])
    rig.mem.expect_write(out1, FUSE_EIO[10:])
    assert [e.name for e in rig.events()] == ["ZERO_LENGTH"]


@pytest.mark.parametrize("shape", ["loop", "next_out_of_range", "nested_indirect"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_too_broken_is_len0(make_rig, kind, shape):
    """The walk did not reach the chain's end: no safe place for the error."""
    rig = rig_for(make_rig, kind)
    bufs, *_ = request(rig, kind)
    g = rig.gq[0]
    head = g.add(bufs)
    last = g.outstanding[head][-1]
    if shape == "loop":
        g.write_desc(last, bufs[-1].gpa, bufs[-1].len, F_WRITE | F_NEXT, head)
        code = "CHAIN_TOO_LONG"
    elif shape == "next_out_of_range":
        g.write_desc(last, bufs[-1].gpa, bufs[-1].len, F_WRITE | F_NEXT, NUM + 1)
        code = "DESC_NEXT_OUT_OF_RANGE"
    else:
        inner = buf(rig, 16, struct.pack("<QIHH", bufs[-1].gpa, 1, F_WRITE, 0))
        outer = buf(rig, 32, struct.pack("<QIHH", bufs[0].gpa, bufs[0].len, F_NEXT, 1)
                    + struct.pack("<QIHH", inner, 16, F_INDIRECT, 0))
        g.write_desc(head, outer, 32, F_INDIRECT, 0)
        code = "INDIRECT_NESTED"
    expect_failed(rig, head, code, None, None, 0)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_used_len_too_large_writes_the_device_error(make_rig, kind):
    rig = rig_for(make_rig, kind)
    bufs, where, err, ln = request(rig, kind)
    head = rig.gq[0].add(bufs)
    rig.poll()
    [r] = rig.be[0].pending()
    for d in r.descs:
        if d.writable:
            rig.be[0].write(d, b"\xee" * d.len)           # never copied back
    rig.be[0].complete(r.head, r.writable_bytes + 1)
    rig.poll()
    assert rig.gq[0].take_used() == [(head, ln)]
    assert rig.mem.read(where, len(err)) == err
    rig.mem.expect_write(where, err)
    assert [e.name for e in rig.events()] == ["USED_LEN_TOO_LARGE"]
    st = rig.dev.stats(0)
    assert (st.failed, st.backend_errors, st.inflight, st.bytes_out) == (1, 1, 0, 0)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_abort_writes_the_device_error(make_rig, kind):
    rig = rig_for(make_rig, kind)
    reqs = [request(rig, kind) for _ in range(2)]
    heads = [rig.gq[0].add(b) for b, *_ in reqs]
    rig.poll()
    assert len(rig.be[0].pending()) == 2
    with pytest.raises(DrainTimeout):
        rig.dev.queue_stop(0, timeout_ms=0)
    assert rig.dev.queue_abort(0) == 2
    used = rig.gq[0].take_used()
    assert sorted(used) == sorted((h, r[3]) for h, r in zip(heads, reqs))
    for _, where, err, _ in reqs:
        assert rig.mem.read(where, len(err)) == err
        rig.mem.expect_write(where, err)
    assert [e.name for e in rig.events()] == ["INFLIGHT_ABORTED"]
    st = rig.dev.stats(0)
    assert (st.failed, st.inflight) == (2, 0)


def test_failure_first_queue(make_rig):
    """virtio-scsi: the control and event queues (0, 1) carry other layouts: len 0 there;
    request queues (2...) get the response."""
    rig = rig_for(make_rig, Failure.SCSI_RESPONSE, nq=3, failure_first_queue=2)
    for q, expect_err in ((0, False), (2, True)):
        bufs, where, err, ln = request(rig, Failure.SCSI_RESPONSE, zero=True)
        head = rig.gq[q].add(bufs)
        rig.poll()
        assert rig.gq[q].take_used() == [(head, ln if expect_err else 0)]
        if expect_err:
            assert rig.mem.read(where, 12) == err
            rig.mem.expect_write(where, err)
        assert [e.name for e in rig.events()] == ["ZERO_LENGTH"]
        assert rig.dev.stats(q).failed == 1


def test_layout_not_checked_below_failure_first_queue(make_rig):
    rig = rig_for(make_rig, Failure.SCSI_RESPONSE, nq=3, failure_first_queue=2, layout=(51, 12))
    head = rig.gq[0].add([Buf(buf(rig, 4, b"tmf!"), 4), Buf(buf(rig, 4), 4, True)])
    rig.poll()
    [r] = rig.be[0].pending()                              # control queue: goes through
    rig.be[0].complete(r.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 0)]
    bufs, where, err, ln = request(rig, Failure.SCSI_RESPONSE)
    head2 = rig.gq[2].add([Buf(bufs[0].gpa, 4), *bufs[1:]])   # request queue: 4 < 51 readable
    rig.poll()
    assert rig.gq[2].take_used() == [(head2, 12)]
    rig.mem.expect_write(where, err)
    assert [e.name for e in rig.events()] == ["BAD_LAYOUT"]
    assert (rig.dev.stats(0).failed, rig.dev.stats(2).failed) == (0, 1)


def test_len0_device_writes_nothing(make_rig):
    """failure LEN0 (net): a refused chain completes with len 0 and nothing written."""
    rig = rig_for(make_rig, Failure.LEN0)
    bufs, *_ = request(rig, Failure.BLK_STATUS, zero=True)
    head = rig.gq[0].add(bufs)
    expect_failed(rig, head, "ZERO_LENGTH", None, None, 0)


def test_bad_failure_kind_is_refused():
    with DataPlane() as dp, pytest.raises(InvalidRequest):
        dp.add_device("bad", num_queues=1, failure=4)
