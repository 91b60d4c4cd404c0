"""Hostile guest chains: each is refused (used len 0, one event naming why, nothing
published to the backend) and the queue keeps serving; corrupt rings break only
their own queue."""

import struct

import pytest

from .harness import F_INDIRECT, F_NEXT, F_WRITE, read_counter

NUM = 8


def post_raw(rig, descs, head=0, q=0):
    """Write raw descriptors {index: (addr, len, flags, next)} and make `head` available."""
    g = rig.gq[q]
    for i, (addr, ln, fl, nx) in descs.items():
        g.write_desc(i, addr, ln, fl, nx)
    g.put_avail(head)


def indirect_table(rig, entries):
    t = rig.mem.alloc(16 * max(1, len(entries)), align=16)
    rig.mem.write(t, b"".join(struct.pack("<QIHH", a & (2**64 - 1), ln, fl, nx)
                              for a, ln, fl, nx in entries))
    return t


def still_works(rig, q=0):
    payload = bytes(range(200))
    head, _ = rig.blk_write(q, payload)
    rig.poll()
    [req] = rig.be[q].pending()
    assert rig.be[q].read(req.descs[1]) == payload
    rig.be[q].complete(req.head, 0)
    rig.poll()
    assert rig.gq[q].take_used() == [(head, 0)]


def expect_refused(rig, head, code, q=0):
    rig.poll()
    assert rig.be[q].pending() == [], "a refused chain must not reach the backend"
    assert read_counter(rig.be[q].kick_fd) == 0
    assert rig.gq[q].take_used() == [(head, 0)]
    assert read_counter(rig.call[q]) == 1
    evs = rig.events()
    assert [e.name for e in evs] == [code], [e.message for e in evs]
    assert evs[0].head == head and f"refused request head {head}" in evs[0].message
    st = rig.dev.stats(q)
    assert st.refused == 1 and st.requests == 0 and st.inflight == 0
    return evs[0]


@pytest.fixture
def rig(make_rig):
    return make_rig(num=NUM, max_request_bytes=64 << 10)


def buf(rig, n=64):
    return rig.mem.alloc(n)


def test_descriptor_loop(rig):
    a, b = buf(rig), buf(rig)
    post_raw(rig, {5: (a, 64, F_NEXT, 6), 6: (b, 64, F_NEXT, 5)}, head=5)
    ev = expect_refused(rig, 5, "CHAIN_TOO_LONG")
    assert ev.a == NUM, ev.message              # the bound: the queue's size
    still_works(rig)


def test_self_loop_writable(rig):
    a = buf(rig)
    post_raw(rig, {3: (a, 64, F_WRITE | F_NEXT, 3)}, head=3)
    expect_refused(rig, 3, "CHAIN_TOO_LONG")
    still_works(rig)


def test_next_out_of_range(rig):
    a = buf(rig)
    post_raw(rig, {2: (a, 64, F_NEXT, NUM + 3)}, head=2)
    ev = expect_refused(rig, 2, "DESC_NEXT_OUT_OF_RANGE")
    assert (ev.a, ev.b) == (NUM + 3, NUM)
    still_works(rig)


def test_address_outside_every_region(rig):
    post_raw(rig, {1: (0x4000_0000, 64, 0, 0)}, head=1)
    ev = expect_refused(rig, 1, "ADDR_UNMAPPED")
    assert ev.a == 0x4000_0000
    still_works(rig)


def test_address_runs_past_end_of_ram(rig):
    end = rig.mem.size
    post_raw(rig, {1: (end - 32, 64, F_WRITE, 0)}, head=1)
    expect_refused(rig, 1, "ADDR_UNMAPPED")
    still_works(rig)


def test_address_overflow_wraps(rig):
    post_raw(rig, {1: (2**64 - 16, 32, F_WRITE, 0)}, head=1)
    expect_refused(rig, 1, "ADDR_OVERFLOW")
    still_works(rig)


def test_nested_indirect(rig):
    inner = indirect_table(rig, [(buf(rig), 64, 0, 0)])
    outer = indirect_table(rig, [(buf(rig), 16, F_NEXT, 1), (inner, 16, F_INDIRECT, 0)])
    post_raw(rig, {0: (outer, 32, F_INDIRECT, 0)})
    expect_refused(rig, 0, "INDIRECT_NESTED")
    still_works(rig)


@pytest.mark.parametrize("length", [24, 0, 16 * NUM + 16])
def test_indirect_bad_len(rig, length):
    t = indirect_table(rig, [(buf(rig), 64, 0, 0)] * (NUM + 1))
    post_raw(rig, {4: (t, length, F_INDIRECT, 0)}, head=4)
    ev = expect_refused(rig, 4, "INDIRECT_BAD_LEN")
    assert ev.a == length
    still_works(rig)


def test_indirect_with_next(rig):
    t = indirect_table(rig, [(buf(rig), 64, 0, 0)])
    post_raw(rig, {0: (t, 16, F_INDIRECT | F_NEXT, 1), 1: (buf(rig), 1, F_WRITE, 0)})
    expect_refused(rig, 0, "INDIRECT_WITH_NEXT")
    still_works(rig)


def test_indirect_table_unmapped(rig):
    post_raw(rig, {0: (0x5000_0000, 32, F_INDIRECT, 0)})
    expect_refused(rig, 0, "ADDR_UNMAPPED")
    still_works(rig)


def test_loop_inside_indirect_table(rig):
    t = indirect_table(rig, [(buf(rig), 16, F_NEXT, 1), (buf(rig), 16, F_NEXT, 0)])
    post_raw(rig, {0: (t, 32, F_INDIRECT, 0)})
    ev = expect_refused(rig, 0, "CHAIN_TOO_LONG")
    # Bounded by the table's own 2 entries (a third read is the loop), not by the queue size.
    assert ev.a == 2, ev.message
    still_works(rig)


def test_next_out_of_range_inside_indirect_table(rig):
    t = indirect_table(rig, [(buf(rig), 16, F_NEXT, 1), (buf(rig), 16, F_NEXT, 2)])
    post_raw(rig, {0: (t, 32, F_INDIRECT, 0)})
    ev = expect_refused(rig, 0, "DESC_NEXT_OUT_OF_RANGE")
    assert (ev.a, ev.b) == (2, 2)
    still_works(rig)


def test_writable_before_readable(rig):
    post_raw(rig, {0: (buf(rig), 64, F_WRITE | F_NEXT, 1), 1: (buf(rig), 64, 0, 0)})
    ev = expect_refused(rig, 0, "WRITABLE_BEFORE_READABLE")
    assert ev.a == 1
    still_works(rig)


def test_writable_before_readable_in_indirect(rig):
    t = indirect_table(rig, [(buf(rig), 16, F_NEXT, 1), (buf(rig), 16, F_WRITE | F_NEXT, 2),
                             (buf(rig), 16, 0, 0)])
    post_raw(rig, {0: (t, 48, F_INDIRECT, 0)})
    expect_refused(rig, 0, "WRITABLE_BEFORE_READABLE")
    still_works(rig)


def test_chain_longer_than_queue(rig):
    """Direct descriptors before an indirect table of queue size: NUM + 1 segments."""
    t = indirect_table(rig, [(buf(rig, 16), 16, F_NEXT, k + 1) for k in range(NUM - 1)]
                       + [(buf(rig, 16), 16, 0, 0)])
    post_raw(rig, {0: (buf(rig), 16, F_NEXT, 1), 1: (t, 16 * NUM, F_INDIRECT, 0)})
    expect_refused(rig, 0, "CHAIN_TOO_LONG")
    still_works(rig)


def test_request_over_cap(rig):
    big = rig.mem.alloc(65 << 10)
    post_raw(rig, {0: (buf(rig, 16), 16, F_NEXT, 1), 1: (big, 65 << 10, F_WRITE, 0)})
    ev = expect_refused(rig, 0, "REQUEST_TOO_LARGE")
    assert ev.b == 64 << 10
    still_works(rig)


def test_refusal_between_valid_requests_keeps_order(rig):
    h1, _ = rig.blk_write(0, b"1" * 32)
    post_raw(rig, {7: (0x4000_0000, 8, 0, 0)}, head=7)
    h3, _ = rig.blk_write(0, b"3" * 32)
    rig.poll()
    reqs = rig.be[0].pending()
    assert len(reqs) == 2
    assert rig.gq[0].take_used() == [(7, 0)]
    for r in reqs:
        rig.be[0].complete(r.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(h1, 0), (h3, 0)]
    assert [e.name for e in rig.events()] == ["ADDR_UNMAPPED"]


# ---------------------------------------------------------------------------
# corrupt rings: the queue breaks, nothing else does


def test_head_out_of_range_breaks_queue(make_rig):
    rig = make_rig(num=NUM, nq=2)
    rig.gq[0].put_avail(NUM + 1)
    rig.poll()
    evs = rig.events()
    assert [e.name for e in evs] == ["BAD_HEAD"]
    assert "queue broken" in evs[0].message
    assert rig.gq[0].take_used() == []
    # broken: later requests are not taken, no further events
    rig.blk_write(0, b"x" * 16)
    rig.poll()
    rig.poll()
    assert rig.be[0].pending() == [] and rig.events() == []
    still_works(rig, q=1)


def test_avail_idx_jump_breaks_only_that_queue(make_rig):
    rig = make_rig(num=NUM, nq=2)
    h, _ = rig.blk_write(0, b"a" * 16)     # one valid request in flight first
    rig.poll()
    [req] = rig.be[0].pending()
    rig.gq[0].set_avail_idx(1 + NUM + 1)   # 9 new entries on an 8-entry ring
    rig.poll()
    evs = rig.events()
    assert [e.name for e in evs] == ["AVAIL_IDX_JUMP"]
    assert (evs[0].a, evs[0].b) == (NUM + 2, 1)
    still_works(rig, q=1)
    # the request already in flight still completes (nothing is lost)
    rig.be[0].complete(req.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 0)]
    rig.poll()
    assert rig.events() == []
    # and the broken queue can be restarted after reconfiguration
    rig.dev.queue_stop(0)
    rig.gq[0].set_avail_idx(1)
    rig.dev.queue_set_base(0, 1)
    rig.start(0)
    rig.be[0].restart()
    still_works(rig, q=0)


def test_indirect_table_crossing_regions_is_fine(make_rig):
    rig = make_rig(num=NUM)
    payload = b"p" * 100
    data = rig.mem.alloc(100)
    rig.mem.write(data, payload)
    st = rig.mem.alloc(1)
    entries = struct.pack("<QIHH", data, 100, F_NEXT, 1) + struct.pack("<QIHH", st, 1, F_WRITE, 0)
    t = rig.mem.alloc_crossing(32, 8)      # 8 bytes in region 0, 24 in region 1
    rig.mem.write(t, entries)
    post_raw(rig, {0: (t, 32, F_INDIRECT, 0)})
    rig.poll()
    [req] = rig.be[0].pending()
    assert rig.be[0].read(req.descs[0]) == payload
    rig.be[0].write(req.descs[1], b"\x00")
    rig.be[0].complete(req.head, 1)
    rig.poll()
    assert rig.gq[0].take_used() == [(0, 1)]
    rig.mem.expect_write(st, b"\x00")
    assert rig.events() == []


def test_ring_full_of_loops_is_bounded_per_pass(make_rig):
    """num chains that each cost num steps: the work is spread over several passes
    (fairness toward other queues), every one is refused exactly once."""
    from fastshadow.dataplane import POLL_MORE
    num = 256
    rig = make_rig(num=num, nq=2)
    g = rig.gq[0]
    a = rig.mem.alloc(64)
    for i in range(num):
        g.write_desc(i, a, 64, F_NEXT, (i + 1) % num)        # one big cycle
    for i in range(num):
        g.put_avail(i, publish=False)
    g.publish()
    passes = 0
    refused = []
    while True:
        passes += 1
        flags = rig.poll()
        refused += g.take_used()
        if not flags & POLL_MORE:
            break
        assert passes < 1000
    assert passes > 10
    assert refused == [(i, 0) for i in range(num)]
    evs = rig.events()
    assert len(evs) == num and {e.name for e in evs} == {"CHAIN_TOO_LONG"}
    still_works(rig, q=1)
    still_works(rig, q=0)
