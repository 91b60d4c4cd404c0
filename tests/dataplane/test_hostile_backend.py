"""Hostile backend: bad used elements are refused and logged, never trusted; rewriting
the shadow region after publish cannot steer the copy back into guest memory."""

import struct

import pytest

from fastshadow.dataplane import SHADOW_GPA_BASE, DrainTimeout

from .harness import F_WRITE, read_counter

NUM = 16


@pytest.fixture
def rig(make_rig):
    return make_rig(num=NUM)


def two_reads(rig, n=1024):
    a = rig.blk_read(0, n)
    b = rig.blk_read(0, n)
    rig.poll()
    reqs = rig.be[0].pending()
    assert len(reqs) == 2
    return (a, b), reqs


def accept_writes(rig, bufs, data):
    pos = 0
    for b in bufs:
        if b.writable:
            take = min(b.len, len(data) - pos)
            if take > 0:
                rig.mem.expect_write(b.gpa, data[pos:pos + take])
            pos += take


def test_unknown_id(rig):
    ((h1, b1), (h2, b2)), (r1, r2) = two_reads(rig)
    be = rig.be[0]
    be.complete(NUM + 5, 10)                 # outside the table
    be.complete(r1.descs[1].index, 10)       # a body descriptor of a request in flight
    rig.poll()
    assert rig.gq[0].take_used() == []
    evs = rig.events()
    assert [e.name for e in evs] == ["USED_UNKNOWN_ID", "USED_UNKNOWN_ID"]
    assert evs[0].a == NUM + 5 and "not in flight" in evs[0].message
    assert rig.dev.stats(0).backend_errors == 2
    # the real completions still work
    w = rig.serve(0, [r1, r2])
    rig.poll()
    assert rig.gq[0].take_used() == [(h1, 1025), (h2, 1025)]
    accept_writes(rig, b1, w[r1.head])
    accept_writes(rig, b2, w[r2.head])


def test_double_completion(rig):
    ((h1, b1), (h2, b2)), (r1, r2) = two_reads(rig)
    be = rig.be[0]
    be.write(r1.descs[1], b"A" * 1024)
    be.complete(r1.head, 1024)
    be.complete(r1.head, 1024)               # again
    rig.poll()
    assert rig.gq[0].take_used() == [(h1, 1024)]
    assert [e.name for e in rig.events()] == ["USED_DOUBLE_COMPLETION"]
    rig.mem.expect_write(b1[1].gpa, b"A" * 1024)
    be.complete(r2.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 0)]


def test_used_len_larger_than_writable(rig):
    h, bufs = rig.blk_read(0, 4096)
    rig.poll()
    [r] = rig.be[0].pending()
    rig.be[0].write(r.descs[1], b"\xaa" * 4096)
    rig.be[0].write(r.descs[2], b"\x00")
    rig.be[0].complete(r.head, 4097 + 1)      # one byte more than writable
    rig.poll()
    # failed toward the guest, nothing written into its buffers (canary check)
    assert rig.gq[0].take_used() == [(h, 0)]
    assert read_counter(rig.call[0]) == 1
    [ev] = rig.events()
    assert ev.name == "USED_LEN_TOO_LARGE" and (ev.a, ev.b) == (4098, 4097) and ev.head == h
    assert "request failed toward the guest" in ev.message
    # the queue goes on
    h2, bufs2 = rig.blk_read(0, 512)
    rig.poll()
    [r2] = rig.be[0].pending()
    w = rig.serve(0, [r2])
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 513)]
    accept_writes(rig, bufs2, w[r2.head])


def test_huge_used_len_is_refused(rig):
    h, _ = rig.blk_read(0, 64)
    rig.poll()
    [r] = rig.be[0].pending()
    rig.be[0].complete(r.head, 0xFFFFFFFF)
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 0)]
    assert [e.name for e in rig.events()] == ["USED_LEN_TOO_LARGE"]


def test_rewriting_shadow_descriptors_after_publish(rig):
    """The backend points the shadow descriptors elsewhere and enlarges them; the copy
    back uses our private offsets and lengths only."""
    (h1, b1), (h2, b2) = rig.blk_read(0, 4096), rig.blk_read(0, 4096)
    rig.poll()
    r1, r2 = rig.be[0].pending()
    be = rig.be[0]
    be.write(r1.descs[1], b"1" * 4096)
    be.write(r1.descs[2], b"\x00")
    be.write(r2.descs[1], b"2" * 4096)
    # Rewrite r1's chain: data descriptor now points at r2's data, 64 KiB long,
    # status descriptor at offset 0 of the region; plus garbage in the avail ring.
    be.write_desc(r1.descs[1].index, r2.descs[1].addr, 65536, F_WRITE | 1, r1.descs[2].index)
    be.write_desc(r1.descs[2].index, SHADOW_GPA_BASE, 4096, F_WRITE, 0)
    struct.pack_into("<HH", be.map, be.avail, 0xFFFF, 0x1234)
    be.complete(r1.head, 4097)
    rig.poll()
    assert rig.gq[0].take_used() == [(h1, 4097)]
    assert rig.mem.read(b1[1].gpa, 4096) == b"1" * 4096
    rig.mem.expect_write(b1[1].gpa, b"1" * 4096)
    rig.mem.expect_write(b1[2].gpa, b"\x00")
    be.complete(r2.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 0)]
    assert rig.events() == []


def test_backend_rewrites_bounce_of_readable_buffers(rig):
    """Scribbling on readable bounce data changes only what the backend itself reads."""
    payload = b"w" * 2048
    h, bufs = rig.blk_write(0, payload)
    rig.poll()
    [r] = rig.be[0].pending()
    rig.be[0].write(r.descs[0], b"\xff" * 16)
    rig.be[0].write(r.descs[1], b"\xff" * 2048)
    rig.be[0].complete(r.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 0)]
    # guest readable buffers untouched (canary check at teardown)


def test_used_idx_past_the_ring_fails_the_backend_then_restart_republishes(rig):
    """More new used entries than the ring holds: no entry can be trusted, the backend is
    treated as failed (BACKEND_FAILED, for the control plane to drop it); the request
    stays ours and a restarted backend gets it again, and completes it once."""
    h, bufs = rig.blk_read(0, 2048)
    rig.poll()
    [r] = rig.be[0].pending()
    be = rig.be[0]
    be.complete(r.head, 2049, publish=False)     # even a valid entry among them is not read
    be.set_used_idx(NUM + 1)
    rig.poll()
    [ev] = rig.events()
    assert ev.name == "BACKEND_FAILED" and (ev.a, ev.b) == (NUM + 1, 0) and ev.backend_failed
    assert rig.gq[0].take_used() == []
    assert rig.dev.stats(0).backend_errors == 1
    rig.poll()                                   # harvest stays off: no second event
    assert rig.events() == []
    # The control plane parks the queue (the synchronous engine cannot wait) ...
    with pytest.raises(DrainTimeout) as ei:
        rig.dev.queue_stop(0, timeout_ms=0)
    assert ei.value.avail_idx == 1 and ei.value.inflight == 1
    # ... and a new backend gets fresh shadow rings and the request re-published.
    rig.dev.queue_clear_shadow(0)
    be.restart()
    rig.start(0)
    assert read_counter(be.kick_fd) >= 1
    [r2] = be.pending()
    assert [d.len for d in r2.descs] == [16, 2048, 1]
    assert be.read(r2.descs[0]) == struct.pack("<IIQ", 0, 0, 7)   # header copied again
    w = rig.serve(0, [r2])
    be.complete(r2.head, 2049)                   # and a lie after it: refused
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 2049)]
    assert [e.name for e in rig.events()] == ["USED_DOUBLE_COMPLETION"]
    rig.mem.expect_write(bufs[1].gpa, w[r2.head][:2048])
    rig.mem.expect_write(bufs[2].gpa, w[r2.head][2048:])
    assert rig.dev.stats(0).inflight == 0


def test_double_completion_in_one_batch(rig):
    """One request in flight; the backend writes its completion and the same id again and
    bumps used idx by 2: the guest gets one completion (right len and data), one event,
    and the queue goes on."""
    h, bufs = rig.blk_read(0, 1024)
    rig.poll()
    [r] = rig.be[0].pending()
    be = rig.be[0]
    be.write(r.descs[1], b"D" * 1024)
    be.write(r.descs[2], b"\x00")
    be.complete(r.head, 1025, publish=False)
    be.complete(r.head, 1025, publish=False)
    be.publish()
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 1025)]
    [ev] = rig.events()
    assert ev.name == "USED_DOUBLE_COMPLETION" and ev.a == r.head
    rig.mem.expect_write(bufs[1].gpa, b"D" * 1024)
    rig.mem.expect_write(bufs[2].gpa, b"\x00")
    st = rig.dev.stats(0)
    assert (st.backend_errors, st.inflight, st.failed) == (1, 0, 0)
    # later requests on the queue complete normally
    h2, bufs2 = rig.blk_read(0, 512)
    rig.poll()
    [r2] = be.pending()
    w = rig.serve(0, [r2])
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 513)]
    accept_writes(rig, bufs2, w[r2.head])
    assert rig.events() == []


def test_unknown_ids_up_to_the_ring_size_are_read_one_by_one(rig):
    """NUM new entries (not more than the ring holds) with one request in flight: each
    entry is judged alone; the real completion among them goes through."""
    h, bufs = rig.blk_read(0, 64)
    rig.poll()
    [r] = rig.be[0].pending()
    be = rig.be[0]
    for _ in range(NUM - 1):
        be.complete(NUM + 3, 0, publish=False)      # made-up ids
    be.complete(r.head, 0, publish=False)
    be.publish()
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 0)]
    evs = rig.events()
    assert [e.name for e in evs] == ["USED_UNKNOWN_ID"] * (NUM - 1)
    assert rig.dev.stats(0).backend_errors == NUM - 1
