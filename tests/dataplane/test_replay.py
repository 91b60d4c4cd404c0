"""Kept requests across backend deaths and ring stops (DESIGN.md section 7): re-published
at each start; once their backend died with them 1 + max_replays times they are failed as
poison (ring stops a live backend survived do not count); restarting
with kept requests never fails (same SET_VRING_NUM, ADDR, BASE); discard drops them
without touching guest memory; requests given back or dropped are unknown ids from
then on."""

import os
import struct

import pytest

from fastshadow.dataplane import DrainTimeout, QueueBusy
from fastshadow.devices import Failure

from .harness import read_counter
from .test_loop import kick, loop_rig, wait_fd  # noqa: F401 (loop_rig is a fixture)

NUM = 16


def backend_dies(rig, q=0):
    """What the control plane does when the backend goes away: park the queue (zero-timeout
    stop, the requests stay ours), fresh shadow rings for the next backend, start."""
    with pytest.raises(DrainTimeout):
        rig.dev.queue_stop(q, timeout_ms=0)
    rig.dev.queue_clear_shadow(q)
    rig.be[q].restart()
    rig.start(q, backend_lost=True)


@pytest.mark.parametrize("max_replays", [0, 1, 3])
def test_poison_after_max_replays(make_rig, max_replays):
    rig = make_rig(num=NUM, failure=Failure.BLK_STATUS, max_replays=max_replays)
    be = rig.be[0]
    head, bufs = rig.blk_read(0, 1024)
    rig.poll()
    assert len(be.pending()) == 1                        # publication 1
    for k in range(max_replays):
        backend_dies(rig)
        [r] = be.pending()                               # publication k + 2
        assert be.read(r.descs[0]) == struct.pack("<IIQ", 0, 0, 7)
        assert rig.gq[0].take_used() == []
    assert rig.events() == []
    backend_dies(rig)                                    # one more would exceed 1 + max_replays
    assert be.pending() == []
    assert rig.gq[0].take_used() == [(head, 1)]
    assert read_counter(rig.call[0]) >= 1
    assert rig.mem.read(bufs[2].gpa, 1) == b"\x01"       # VIRTIO_BLK_S_IOERR
    rig.mem.expect_write(bufs[2].gpa, b"\x01")
    [ev] = rig.events()
    assert ev.name == "REQUEST_POISONED" and ev.a == 1 + max_replays and ev.head == head
    st = rig.dev.stats(0)
    assert (st.poisoned, st.failed, st.inflight) == (1, 1, 0)
    # a poisoned request's id is no longer in flight: a late completion is refused
    be.complete(0, 1025)
    rig.poll()
    assert rig.gq[0].take_used() == []
    assert [e.name for e in rig.events()] in (["USED_DOUBLE_COMPLETION"], ["USED_UNKNOWN_ID"])


def held_across_a_stop(rig, q=0):
    """A live backend still holds the request when the ring stops (drain timeout); the ring
    starts again on the same backend (QEMU's VM stop/cont, a migration that failed)."""
    with pytest.raises(DrainTimeout) as ei:
        rig.dev.queue_stop(q, timeout_ms=0)
    rig.dev.queue_set_base(q, ei.value.avail_idx)
    rig.dev.queue_clear_shadow(q)
    rig.be[q].restart()
    rig.start(q)


def test_held_across_many_stops_is_never_poisoned(make_rig):
    """Direct mode's backend keeps such a request for as long as it likes; isolated mode
    must not fail it only because the VM was stopped and resumed more than max_replays
    times meanwhile (found: a request held across two stop/cont cycles got IOERR)."""
    rig = make_rig(num=NUM, failure=Failure.BLK_STATUS, max_replays=1)
    head, bufs = rig.blk_read(0, 128)
    rig.poll()
    assert len(rig.be[0].pending()) == 1
    for _ in range(4):
        held_across_a_stop(rig)
        [r] = rig.be[0].pending()                        # re-published, uncounted
    assert rig.events() == [] and rig.dev.stats(0).poisoned == 0
    w = rig.serve(0, [r])
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 129)]
    rig.mem.expect_write(bufs[1].gpa, w[r.head][:128])
    rig.mem.expect_write(bufs[2].gpa, w[r.head][128:])
    # held across stops, then the backend dies with it twice: the deaths alone count
    h2, b2 = rig.blk_read(0, 64)
    rig.poll()
    rig.be[0].pending()
    held_across_a_stop(rig)
    backend_dies(rig)
    assert len(rig.be[0].pending()) == 1 and rig.dev.stats(0).poisoned == 0
    backend_dies(rig)
    assert rig.be[0].pending() == [] and rig.gq[0].take_used() == [(h2, 1)]
    rig.mem.expect_write(b2[2].gpa, b"\x01")              # VIRTIO_BLK_S_IOERR
    [ev] = rig.events()
    assert ev.name == "REQUEST_POISONED" and ev.head == h2


def test_completed_after_a_replay_is_not_poisoned(make_rig):
    rig = make_rig(num=NUM, failure=Failure.BLK_STATUS, max_replays=1)
    be = rig.be[0]
    head, bufs = rig.blk_read(0, 256)
    rig.poll()
    be.pending()
    backend_dies(rig)
    [r] = be.pending()
    w = rig.serve(0, [r])
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 257)]
    rig.mem.expect_write(bufs[1].gpa, w[r.head][:256])
    rig.mem.expect_write(bufs[2].gpa, w[r.head][256:])
    # the next request starts its own count
    h2, b2 = rig.blk_read(0, 64)
    rig.poll()
    be.pending()
    backend_dies(rig)
    [r2] = be.pending()
    w2 = rig.serve(0, [r2])
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 65)]
    rig.accept_writable(b2)
    assert rig.dev.stats(0).poisoned == 0


def test_restart_with_kept_requests_never_fails(make_rig):
    """QEMU's ring start after a stop that kept requests: SET_VRING_NUM (same num),
    SET_VRING_ADDR, SET_VRING_BASE all succeed; only another num is refused (the control
    plane discards first then)."""
    rig = make_rig(num=NUM)
    g, be = rig.gq[0], rig.be[0]
    head, bufs = rig.blk_read(0, 512)
    rig.poll()
    be.pending()
    with pytest.raises(DrainTimeout) as ei:
        rig.dev.queue_stop(0, timeout_ms=0)
    assert ei.value.inflight == 1
    rig.dev.queue_set_num(0, NUM)
    with pytest.raises(QueueBusy):
        rig.dev.queue_set_num(0, NUM * 2)
    rig.dev.queue_set_addr(0, rig.mem.uaddr(g.desc), rig.mem.uaddr(g.avail), rig.mem.uaddr(g.used))
    rig.dev.queue_set_base(0, ei.value.avail_idx)
    rig.dev.queue_clear_shadow(0)
    be.restart()
    rig.start(0)
    [r] = be.pending()
    w = rig.serve(0, [r])
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 513)]
    rig.mem.expect_write(bufs[1].gpa, w[r.head][:512])
    rig.mem.expect_write(bufs[2].gpa, w[r.head][512:])


def test_discard_drops_kept_requests_untouched(make_rig):
    rig = make_rig(num=NUM, failure=Failure.BLK_STATUS)
    g, be = rig.gq[0], rig.be[0]
    for _ in range(3):
        rig.blk_read(0, 700)
    rig.poll()
    old = be.pending()
    assert len(old) == 3
    with pytest.raises(QueueBusy):
        rig.dev.queue_discard(0)                         # running: stop it first
    with pytest.raises(DrainTimeout):
        rig.dev.queue_stop(0, timeout_ms=0)
    used_before = g.used_idx()
    assert rig.dev.queue_discard(0) == 3
    assert rig.dev.queue_discard(0) == 0
    st = rig.dev.stats(0)
    assert (st.discarded, st.inflight, st.failed, st.completed) == (3, 0, 0, 0)
    assert g.used_idx() == used_before                   # no completion, nothing written
    rig.mem.check()
    # the guest re-initialised the ring (reboot): any num now, a fresh start
    g2 = type(g)(rig.mem, NUM * 2)
    rig.gq[0] = g2
    rig.dev.queue_set_num(0, NUM * 2)
    rig.dev.queue_set_base(0, 0)
    rig.dev.queue_set_addr(0, rig.mem.uaddr(g2.desc), rig.mem.uaddr(g2.avail), rig.mem.uaddr(g2.used))
    be.close()
    rig.be[0] = be2 = type(be)(rig.dev, 0, NUM * 2)
    rig.start(0)
    assert be2.pending() == []                           # nothing re-published
    assert rig.events() == []
    # the old backend's completions of the dropped requests are made up now
    for r in old:
        be2.complete(r.head, 700)
    rig.poll()
    assert g2.take_used() == []
    assert [e.name for e in rig.events()] == ["USED_UNKNOWN_ID"] * 3


def test_returned_ids_are_unknown_afterwards(make_rig):
    """A request given back to the guest ring at a stop was never completed by anyone: a
    completion of its id by the old backend is a made-up id."""
    rig = make_rig(num=NUM)
    be = rig.be[0]
    rig.blk_read(0, 64)
    rig.blk_read(0, 64)
    rig.poll()
    r1, r2 = be.pending()
    res = rig.dev.queue_stop_result(0, timeout_ms=0, backend_next_avail=0)   # took neither
    assert (res.returned, res.avail_idx) == (2, 0)
    rig.dev.queue_set_base(0, rig.gq[0].avail_idx)      # (not taken again: the test's choice)
    rig.start(0)
    be.restart()
    for r in (r1, r2):
        be.complete(r.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == []
    assert [e.name for e in rig.events()] == ["USED_UNKNOWN_ID"] * 2


def test_set_event_idx_on_a_running_queue(make_rig):
    """SET_FEATURES toggles VIRTIO_RING_F_EVENT_IDX while the rings run: one kick and one
    call at the switch, the event fields armed at once, and no notification lost after."""
    rig = make_rig(num=NUM, event_idx=False)
    g, be = rig.gq[0], rig.be[0]

    def round_trip(expect_call=True):
        head, _ = rig.blk_write(0, b"p" * 32)
        rig.poll()
        assert read_counter(be.kick_fd) == 1, "backend kick lost"
        [r] = be.pending()
        be.complete(r.head, 0)
        rig.poll()
        assert g.take_used() == [(head, 0)]
        assert read_counter(rig.call[0]) == (1 if expect_call else 0), "guest call lost"

    round_trip()
    # on
    rig.dev.queue_set_event_idx(0, True)
    assert read_counter(be.kick_fd) == 1 and read_counter(rig.call[0]) == 1
    assert g.avail_event() == g.avail_idx                # a guest kicks at its next entry
    assert be.used_event() == be.used_idx                # a backend calls at its next completion
    be.event_idx = True
    g.set_used_event(g.last_used)                        # the guest wants the next one
    round_trip()
    g.set_used_event(g.last_used + 5)                    # now the guest wants no call
    round_trip(expect_call=False)
    # off: flags mode again, nothing suppressed by the old event fields
    be.event_idx = False
    g.set_used_event(g.last_used + 1000)
    rig.dev.queue_set_event_idx(0, False)
    assert read_counter(be.kick_fd) == 1 and read_counter(rig.call[0]) == 1
    be.set_avail_event(0)
    round_trip()
    round_trip()
    st = rig.dev.stats(0)
    assert st.inflight == 0 and rig.events() == []


def test_set_event_idx_on_a_stopped_queue_sends_nothing(make_rig):
    rig = make_rig(num=NUM, start=False)
    rig.dev.queue_set_event_idx(0, True)
    assert read_counter(rig.be[0].kick_fd) == 0 and read_counter(rig.call[0]) == 0


@pytest.mark.parametrize("on", [True, False])
def test_set_event_idx_on_the_loop(loop_rig, on):
    """The same on the loop thread: the kick and the call go out with the command batch,
    and a request after the switch still flows both ways."""
    rig = loop_rig(num=NUM, event_idx=not on)
    be = rig.be[0]
    rig.dev.queue_set_event_idx(0, on)
    assert wait_fd(be.kick_fd) == 1 and wait_fd(rig.call[0]) == 1
    be.event_idx = on
    head, _ = rig.blk_write(0, b"q" * 16)
    kick(rig)
    wait_fd(be.kick_fd)
    [r] = be.pending()
    be.complete(r.head, 0)
    os.write(be.call_fd, (1).to_bytes(8, "little"))
    wait_fd(rig.call[0])
    assert rig.gq[0].take_used() == [(head, 0)]
