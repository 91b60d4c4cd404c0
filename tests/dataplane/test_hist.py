"""The data plane's own latency histograms (csrc/hist.c) and the operators' counters
kept beside them: bounce bytes in use, back-pressure time, refusals by reason.

Counts are exact: every request the backend completed is one sample of each of the
four hops, a refused one is none. Durations are not asserted (the suite's rule), but
their arithmetic is: per request end_to_end = kick_to_shadowed + backend +
call_to_used, the same four stamps, so the sums add up to the nanosecond."""

import threading

from fastshadow.dataplane import LATENCY_HOPS

from .harness import read_counter
from .test_backpressure import drive
from .test_loop import BackendThread, kick, settle, wait_fd


def totals(rig, q=0):
    return {h.hop: h.total for h in rig.dev.latency(q)}


def sums(rig, q=0):
    return {h.hop: h.sum_ns for h in rig.dev.latency(q)}


def assert_stamps_add_up(rig, q=0):
    s = sums(rig, q)
    assert s["end_to_end"] == s["kick_to_shadowed"] + s["backend"] + s["call_to_used"], s


def test_every_completed_request_is_one_sample_of_each_hop(make_rig):
    rig = make_rig(num=64, bounce=4 << 20)
    reqs = [rig.blk_read(0, 4096) for _ in range(20)]
    used = drive(rig, [h for h, _ in reqs])
    for _, bufs in reqs:
        rig.accept_writable(bufs)
    assert len(used) == 20
    assert [h.hop for h in rig.dev.latency(0)] == list(LATENCY_HOPS)
    assert totals(rig) == {hop: 20 for hop in LATENCY_HOPS}
    assert_stamps_add_up(rig)


def test_in_flight_requests_are_shadowed_but_not_ended(make_rig):
    rig = make_rig(num=16)
    reqs = [rig.blk_read(0, 4096) for _ in range(3)]
    rig.poll()
    assert totals(rig) == {"kick_to_shadowed": 3, "backend": 0, "call_to_used": 0, "end_to_end": 0}
    rig.serve(0, rig.be[0].pending())
    rig.poll()
    assert len(rig.gq[0].take_used()) == 3
    for _, bufs in reqs:
        rig.accept_writable(bufs)
    assert totals(rig) == {hop: 3 for hop in LATENCY_HOPS}


def test_refused_requests_are_not_timed_but_counted_by_reason(make_rig):
    rig = make_rig(num=16, max_request_bytes=64 << 10)
    _, refused_bufs = rig.blk_read(0, 128 << 10)    # over the cap: refused
    head, bufs = rig.blk_read(0, 4096)
    rig.poll()
    rig.serve(0, rig.be[0].pending())
    rig.poll()
    used = dict(rig.gq[0].take_used())
    assert used[head] == 4097
    rig.accept_writable(bufs)
    rig.accept_writable(refused_bufs)               # its status byte says IOERR
    st = rig.dev.stats(0)
    assert st.refused == 1 and st.refused_by_reason == {"request_too_large": 1}
    assert totals(rig) == {hop: 1 for hop in LATENCY_HOPS}


def test_histograms_off_keep_nothing(make_rig):
    rig = make_rig(num=16, latency_histograms=False)
    reqs = [rig.blk_read(0, 4096) for _ in range(5)]
    drive(rig, [h for h, _ in reqs])
    for _, bufs in reqs:
        rig.accept_writable(bufs)
    assert rig.dev.stats(0).completed == 5
    assert totals(rig) == {hop: 0 for hop in LATENCY_HOPS}
    assert sums(rig) == {hop: 0 for hop in LATENCY_HOPS}


def test_bounce_bytes_in_use_and_back_pressure_time(make_rig):
    # 4 pages of bounce; an 8 KiB read takes 3 (header + status page, 2 data pages).
    rig = make_rig(num=64, bounce=4 * 4096)
    reqs = [rig.blk_read(0, 8192) for _ in range(2)]
    rig.poll()
    st = rig.dev.stats(0)
    assert st.bounce_bytes == 3 * 4096 and st.inflight == 1 and st.throttled == 1
    stalled = st.throttled_ns
    assert rig.dev.stats(0).throttled_ns > stalled   # a stall still going on is counted as it goes
    drive(rig, [h for h, _ in reqs])
    for _, bufs in reqs:
        rig.accept_writable(bufs)
    st = rig.dev.stats(0)
    assert st.bounce_bytes == 0 and st.inflight == 0
    ended = st.throttled_ns
    assert ended > stalled
    assert rig.dev.stats(0).throttled_ns == ended    # the stall ended: no longer growing
    assert totals(rig) == {hop: 2 for hop in LATENCY_HOPS}


def test_loop_thread_counts_exactly(make_rig):
    """The io_uring loop: kicks and calls seen as completions give the start and seen stamps."""
    rig = make_rig(num=64, bounce=4 << 20, nq=2)
    rig.dp.start()
    threads = [BackendThread(rig, q) for q in range(2)]
    for t in threads:
        t.start()
    n = 40
    try:
        for i in range(n):
            q = i % 2
            head, bufs = rig.blk_read(q, 4096)
            kick(rig, q)
            assert wait_fd(rig.call[q]) >= 1
            assert rig.gq[q].take_used() == [(head, 4097)]
            rig.accept_writable(bufs)
    finally:
        for t in threads:
            t.stop()
    for q in range(2):
        st = settle(rig, lambda st: st.completed == n // 2, q=q)
        assert st.completed == n // 2
        assert totals(rig, q) == {hop: n // 2 for hop in LATENCY_HOPS}
        assert_stamps_add_up(rig, q)
