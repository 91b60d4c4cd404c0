"""Back-pressure: when bounce space or shadow descriptors run out, requests wait in the
guest ring (never dropped, never reordered) until completions free space."""

import os
import random

from .harness import read_counter


def drive(rig, expected_heads, serve_order=None, max_rounds=200, q=0):
    """Serve whatever the backend sees each round until every head is completed.
    Returns (used elements in order, {guest head: data written})."""
    be, g = rig.be[q], rig.gq[q]
    used = []
    rounds = 0
    while len(used) < len(expected_heads):
        rounds += 1
        assert rounds < max_rounds, f"stalled with {len(used)}/{len(expected_heads)} done"
        rig.poll()
        reqs = be.pending()
        if serve_order:
            serve_order(reqs)
        rig.serve(q, reqs)
        rig.poll()
        used += g.take_used()
    return used


def test_tiny_pool_serialises_requests(make_rig):
    # 4 pages of bounce; each 8 KiB read needs 3 (header+status page, 2 data pages).
    rig = make_rig(num=64, bounce=4 * 4096)
    reqs = [rig.blk_read(0, 8192) for _ in range(6)]
    heads = [h for h, _ in reqs]
    rig.poll()
    first = rig.be[0].pending()
    assert len(first) == 1                    # only one fits
    st = rig.dev.stats(0)
    assert st.throttled == 1 and st.inflight == 1
    # the guest's avail ring was not consumed beyond what fits
    assert rig.gq[0].avail_event() == 0       # (event idx off: field untouched)
    w = rig.serve(0, first)
    used = []
    rig.poll()
    used += rig.gq[0].take_used()
    used += drive(rig, heads[1:])
    assert [u[0] for u in used] == heads      # FIFO, none lost
    assert all(ln == 8193 for _, ln in used)
    for _, bufs in reqs:
        rig.mem.accept(bufs[1].gpa, 8192)
        rig.mem.accept(bufs[2].gpa, 1)
    st = rig.dev.stats(0)
    assert st.requests == 6 and st.completed == 6 and st.inflight == 0 and st.refused == 0
    assert w


def test_backpressure_with_out_of_order_completion(make_rig):
    rnd = random.Random(7)
    rig = make_rig(num=128, bounce=24 * 4096)
    reqs = []
    for i in range(40):
        n = rnd.choice([512, 4096, 8192, 12000, 20000])
        if rnd.random() < 0.5:
            reqs.append(("r", n) + rig.blk_read(0, n))
        else:
            payload = os.urandom(n)
            reqs.append(("w", payload) + rig.blk_write(0, payload))
    heads = [r[2] for r in reqs]
    used = drive(rig, heads, serve_order=rnd.shuffle)
    assert sorted(u[0] for u in used) == sorted(heads)
    assert len(used) == len(set(u[0] for u in used)) == 40
    for kind, arg, head, bufs in reqs:
        for b in bufs:
            if b.writable:
                rig.mem.accept(b.gpa, b.len)
    st = rig.dev.stats(0)
    assert st.throttled >= 1 and st.completed == 40 and st.inflight == 0


def test_request_larger_than_pool_is_refused_not_stalled(make_rig):
    rig = make_rig(num=16, bounce=4 * 4096, max_request_bytes=1 << 20)
    h, bufs = rig.blk_read(0, 5 * 4096)       # fits the cap, never fits the pool
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 0)]
    [ev] = rig.events()
    assert ev.name == "REQUEST_TOO_LARGE" and ev.b == 4 * 4096
    assert read_counter(rig.be[0].kick_fd) == 0
    # and a small one right after goes through
    h2, bufs2 = rig.blk_read(0, 4096)
    used = drive(rig, [h2])
    assert used == [(h2, 4097)]
    rig.mem.accept(bufs2[1].gpa, 4096)
    rig.mem.accept(bufs2[2].gpa, 1)


def test_fragmented_pool_falls_back_to_per_segment_allocation(make_rig):
    # 8 pages.  Four 4 KiB writes (2 pages each: header+status, data) fill it;
    # free the 2nd and 4th: two 2-page holes, no 3-page run.
    rig = make_rig(num=64, bounce=8 * 4096)
    fill = [rig.blk_write(0, b"f" * 4096) for _ in range(4)]
    rig.poll()
    r = rig.be[0].pending()
    assert len(r) == 4
    rig.be[0].complete(r[1].head, 0)
    rig.be[0].complete(r[3].head, 0)
    rig.poll()
    assert [u[0] for u in rig.gq[0].take_used()] == [fill[1][0], fill[3][0]]
    # 8 KiB read: slab of 3 pages does not fit contiguously; per segment it does
    # (1 page each for header and status, 2 for data).
    payload_read = 8192
    h, bufs = rig.blk_read(0, payload_read)
    rig.poll()
    [nr] = rig.be[0].pending()
    assert rig.be[0].read(nr.descs[0]) == rig.mem.read(bufs[0].gpa, 16)
    w = rig.serve(0, [nr])
    rig.poll()
    assert rig.gq[0].take_used() == [(h, 8193)]
    assert rig.mem.read(bufs[1].gpa, 8192) == w[nr.head][:8192]
    rig.mem.accept(bufs[1].gpa, 8192)
    rig.mem.accept(bufs[2].gpa, 1)
    for x in (r[0], r[2]):
        rig.be[0].complete(x.head, 0)
    rig.poll()
    assert len(rig.gq[0].take_used()) == 2
    assert rig.dev.stats(0).inflight == 0


def test_shadow_descriptor_exhaustion(make_rig):
    """Guest indirect requests take several shadow descriptors each."""
    rig = make_rig(num=4)
    reqs = [rig.blk_write(0, bytes([i]) * 100, indirect=True) for i in range(4)]
    heads = [h for h, _ in reqs]
    rig.poll()
    first = rig.be[0].pending()
    assert len(first) == 1                    # 3 of 4 shadow descriptors used
    rig.serve(0, first)
    rig.poll()
    used = rig.gq[0].take_used()
    used += drive(rig, heads[1:])
    assert [u[0] for u in used] == heads
    for _, bufs in reqs:
        rig.accept_writable(bufs)


def test_pages_kept_for_reuse_still_serve_a_large_request(make_rig):
    # 16 pages of bounce.  Eight 4 KiB reads (2 pages each: header+status, data) fill it;
    # once they complete, their runs are kept for the next small requests (bounce.c, hot
    # reuse), yet a request needing 13 contiguous pages must still get them at once, not wait.
    rig = make_rig(num=64, bounce=16 * 4096)
    small = [rig.blk_read(0, 4096) for _ in range(8)]
    used = drive(rig, [h for h, _ in small])
    assert sorted(u[0] for u in used) == sorted(h for h, _ in small)
    big = rig.blk_read(0, 12 * 4096)
    rig.poll()
    taken = rig.be[0].pending()
    st = rig.dev.stats(0)
    assert len(taken) == 1 and st.throttled == 0 and st.inflight == 1    # taken at once
    rig.serve(0, taken)
    rig.poll()
    assert rig.gq[0].take_used() == [(big[0], 12 * 4096 + 1)]
    # and small requests after it reuse space again: every one completes (the last may
    # wait for a completion: the free pages left are not contiguous, as without reuse)
    again = [rig.blk_read(0, 4096) for _ in range(8)]
    used = drive(rig, [h for h, _ in again])
    assert sorted(u[0] for u in used) == sorted(h for h, _ in again)
    for _, bufs in small + [big] + again:
        rig.mem.accept(bufs[1].gpa, bufs[1].len)
        rig.mem.accept(bufs[2].gpa, 1)
    st = rig.dev.stats(0)
    assert st.completed == 17 and st.inflight == 0 and st.refused == 0
