"""GET_VRING_BASE with the backend's answer: requests the backend never took are
not waited for (a NIC holds receive buffers until a packet arrives).

The backend's index is untrusted: a made-up one is refused with one event and
everything in flight is waited for, as without it.  The canary model of the
rig checks after each test that nothing outside the named buffers was written.
"""

import os
import random
import threading
import time

import pytest

from fastshadow.dataplane import DrainTimeout

from .harness import Buf
from .test_loop import kick, loop_rig, wait_fd  # noqa: F401 (loop_rig is a fixture)


def wait_used(rig, n, timeout=5.0):
    """The next n guest used entries (the call eventfd may hold older signals)."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += rig.gq[0].take_used()
        time.sleep(0.005)
    assert len(got) == n, got
    return got


def publish_reads(rig, n, size=512):
    out = [rig.blk_read(0, size) for _ in range(n)]
    kick(rig)
    wait_fd(rig.be[0].kick_fd)
    return out


def test_untaken_newest_requests_go_back_to_the_guest_ring(loop_rig):
    rig = loop_rig()
    reqs = publish_reads(rig, 3)
    be = rig.be[0]
    first, *_ = be.pending()                   # the backend takes one ...
    be.last_avail = 1                          # ... and stops before the other two
    rig.serve(0, [first])
    rig.dev.queue_pause(0)
    # Nobody will ever complete the two untaken requests: a stop that waited for them could
    # only end in DrainTimeout; a result is the proof it did not wait (no clock involved).
    res = rig.dev.queue_stop_result(0, timeout_ms=30000, backend_next_avail=be.last_avail)
    assert (res.avail_idx, res.returned, res.kept, res.inflight) == (1, 2, 0, 0)
    assert rig.gq[0].take_used() == [(reqs[0][0], 513)]
    rig.accept_writable(reqs[0][1])
    assert rig.dev.stats(0).inflight == 0

    # The next start takes them again from the guest ring, where they still are.
    be.restart()
    rig.dev.queue_set_base(0, res.avail_idx)
    rig.start(0)
    wait_fd(be.kick_fd)
    again = be.pending()
    assert len(again) == 2
    rig.serve(0, again)
    os.write(be.call_fd, (1).to_bytes(8, "little"))
    assert sorted(h for h, _ in wait_used(rig, 2)) == sorted(h for h, _ in reqs[1:])
    for _, bufs in reqs[1:]:
        rig.accept_writable(bufs)
    assert rig.dev.stats(0).requests == 3      # each guest request counted once


def test_untaken_behind_a_refused_chain_are_kept_and_republished(loop_rig):
    rig = loop_rig()
    head, bufs = rig.blk_read(0, 256)          # shadowed
    bad = rig.gq[0].add([Buf(0x4000_0000, 8)]) # refused at once (outside guest memory)
    kick(rig)
    wait_fd(rig.be[0].kick_fd)
    assert [h for h, _ in rig.gq[0].take_used()] == [bad]
    rig.dev.queue_pause(0)
    res = rig.dev.queue_stop_result(0, timeout_ms=5000, backend_next_avail=0)
    # Rewinding over the refused (completed) entry would re-expose it: keep instead.
    assert (res.avail_idx, res.returned, res.kept, res.inflight) == (2, 0, 1, 1)
    assert [e.name for e in rig.dp.drain_events()] == ["ADDR_UNMAPPED"]

    rig.be[0].restart()
    rig.start(0)                               # re-published on the fresh shadow ring
    wait_fd(rig.be[0].kick_fd)
    reqs = rig.be[0].pending()
    assert len(reqs) == 1
    rig.serve(0, reqs)
    os.write(rig.be[0].call_fd, (1).to_bytes(8, "little"))
    assert wait_used(rig, 1) == [(head, 257)]
    rig.accept_writable(bufs)


def test_taken_requests_completed_after_the_stop_without_a_call(loop_rig):
    """A stopped backend (libvhost-user) closes its call fd but still completes
    what it took: the stop must look at the used ring, not wait for a call."""
    rig = loop_rig()
    (head, bufs), = publish_reads(rig, 1)
    be = rig.be[0]
    reqs = be.pending()
    rig.dev.queue_pause(0)

    t = threading.Timer(0.2, lambda: rig.serve(0, reqs))   # no call eventfd write
    t.start()
    try:
        res = rig.dev.queue_stop_result(0, timeout_ms=5000, backend_next_avail=be.last_avail)
    finally:
        t.join()
    assert (res.avail_idx, res.returned, res.kept, res.inflight) == (1, 0, 0, 0)
    assert rig.gq[0].take_used() == [(head, 513)]
    rig.accept_writable(bufs)


@pytest.mark.parametrize("claim", ["more_than_in_flight", "completed_position", "not_16_bit"])
def test_made_up_stop_index_is_refused(loop_rig, claim):
    rig = loop_rig()
    reqs = publish_reads(rig, 2)
    be = rig.be[0]
    shadow = be.pending()
    if claim == "more_than_in_flight":
        rig.serve(0, shadow)                   # both completed, yet "never took" both
        nxt = 0
    elif claim == "completed_position":
        rig.serve(0, shadow[1:])               # completed the second, "never took" it
        nxt = 1
    else:
        nxt = 1 << 20
    rig.dev.queue_pause(0)
    if claim == "more_than_in_flight":
        res = rig.dev.queue_stop_result(0, timeout_ms=2000, backend_next_avail=nxt)
        assert (res.returned, res.kept, res.inflight) == (0, 0, 0)
    else:
        with pytest.raises(DrainTimeout) as ei:    # everything in flight is waited for
            rig.dev.queue_stop_result(0, timeout_ms=200, backend_next_avail=nxt)
        assert ei.value.inflight == (1 if claim == "completed_position" else 2)
    evs = [e for e in rig.dp.drain_events() if e.name == "BAD_STOP_INDEX"]
    assert len(evs) == 1 and f"avail index {nxt}" in evs[0].message
    assert rig.dev.stats(0).backend_errors == 1
    # Nothing was given back or written beyond what the backend completed.
    for (head, bufs), done in zip(reqs, [claim == "more_than_in_flight",
                                         claim != "not_16_bit"]):
        if done:
            rig.accept_writable(bufs)
    rig.gq[0].take_used()


def test_stop_without_backend_index_waits_for_all(loop_rig):
    rig = loop_rig()
    publish_reads(rig, 2)
    rig.be[0].pending()
    rig.dev.queue_pause(0)
    with pytest.raises(DrainTimeout) as ei:
        rig.dev.queue_stop_result(0, timeout_ms=100)
    assert ei.value.inflight == 2


def test_inline_stop_with_backend_index(make_rig):
    """Not started: the same command runs inline on the caller's thread."""
    rig = make_rig()
    reqs = [rig.blk_read(0, 128) for _ in range(2)]
    rig.poll()
    be = rig.be[0]
    first, _ = be.pending()
    be.last_avail = 1
    rig.serve(0, [first])
    res = rig.dev.queue_stop_result(0, timeout_ms=0, backend_next_avail=1)
    assert (res.avail_idx, res.returned, res.kept, res.inflight) == (1, 1, 0, 0)
    assert rig.gq[0].take_used() == [(reqs[0][0], 129)]
    rig.accept_writable(reqs[0][1])


@pytest.mark.parametrize("seed", range(40))
def test_random_stops_complete_every_request_exactly_once(make_rig, seed):
    """Random mixes of shadowed and refused requests, a backend that took and
    completed a random part, and a stop index that is right or made up; then a
    restart that serves everything.  Every guest request must complete exactly
    once, with the bytes the backend wrote; guest RAM is checked by the canary
    model (nothing else written)."""
    rng = random.Random(seed)
    rig = make_rig(num=rng.choice([16, 32]))
    g, be = rig.gq[0], rig.be[0]
    want: dict[int, tuple[int, list]] = {}               # head -> (used len, bufs)
    for _ in range(rng.randint(1, 10)):
        if rng.random() < 0.2:
            want[g.add([Buf(0x4000_0000, 8)])] = (0, [])  # refused at intake
        else:
            size = rng.choice([1, 512, 4096, 7000])
            head, bufs = rig.blk_read(0, size, indirect=True)
            want[head] = (size + 1, bufs)
    rig.poll()
    published = be.pending()
    taken = rng.randint(0, len(published))
    rig.serve(0, rng.sample(published[:taken], rng.randint(0, taken)))
    nxt = taken if rng.random() < 0.7 else rng.choice([rng.randint(0, 0xFFFF), taken + 1, max(0, taken - 1)])

    done: dict[int, int] = {}

    def collect():
        for head, ln in g.take_used():
            assert head not in done, f"guest head {head} completed twice"
            done[head] = ln

    try:
        idx = rig.dev.queue_stop_result(0, timeout_ms=0, backend_next_avail=nxt).avail_idx
    except DrainTimeout as e:
        idx = e.avail_idx
    collect()
    be.restart()
    rig.dev.queue_set_base(0, idx)
    rig.start(0)
    for _ in range(20):
        rig.poll()
        rig.serve(0, be.pending())
        rig.poll()
        collect()
        if len(done) == len(want):
            break
    assert done == {h: ln for h, (ln, _) in want.items()}
    for ln, bufs in want.values():
        if ln:
            rig.accept_writable(bufs)
    assert rig.dev.stats(0).inflight == 0
    rig.events()
