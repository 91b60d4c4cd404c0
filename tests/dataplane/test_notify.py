"""Notification suppression on both sides: flags without event idx, event idx with
avail_event/used_event, and the values we publish ourselves."""

import os
import select
import threading

import pytest

from .harness import read_counter

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1


def complete_all(rig, q=0, length=0):
    for r in rig.be[q].pending():
        rig.be[q].complete(r.head, length)


def test_flags_without_event_idx(make_rig):
    rig = make_rig(event_idx=False)
    g, be = rig.gq[0], rig.be[0]
    # Backend asks for no kicks: we must not kick.
    be.set_used_flags(VRING_USED_F_NO_NOTIFY)
    rig.blk_write(0, b"a" * 100)
    rig.poll()
    assert read_counter(be.kick_fd) == 0
    be.set_used_flags(0)
    rig.blk_write(0, b"b" * 100)
    rig.poll()
    assert read_counter(be.kick_fd) == 1
    # We never ask the backend to suppress calls.
    assert be.avail_flags() == 0
    # Guest asks for no interrupts: we must not call.
    g.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    complete_all(rig)
    rig.poll()
    assert len(g.take_used()) == 2
    assert read_counter(rig.call[0]) == 0
    g.set_avail_flags(0)
    rig.blk_write(0, b"c" * 100)
    rig.poll()
    complete_all(rig)
    rig.poll()
    assert len(g.take_used()) == 1
    assert read_counter(rig.call[0]) == 1
    st = rig.dev.stats(0)
    assert (st.backend_kicks, st.guest_calls) == (2, 1)


def test_guest_event_idx(make_rig):
    rig = make_rig(event_idx=True, backend_event_idx=False, num=32)
    g, be = rig.gq[0], rig.be[0]
    # avail_event: we ask the guest to kick at the next entry after what we took.
    for _ in range(3):
        rig.blk_write(0, b"x" * 10)
    rig.poll()
    assert g.avail_event() == 3
    reqs = be.pending()
    # Guest wants a call only once used idx passes 2 (i.e. after the 3rd completion).
    g.set_used_event(2)
    be.complete(reqs[0].head, 0)
    rig.poll()
    assert read_counter(rig.call[0]) == 1     # first evaluation after start always calls
    be.complete(reqs[1].head, 0)
    rig.poll()
    assert read_counter(rig.call[0]) == 0     # used idx 2: event not crossed
    be.complete(reqs[2].head, 0)
    rig.poll()
    assert read_counter(rig.call[0]) == 1     # used idx 3 crosses used_event 2
    assert len(g.take_used()) == 3
    # Guest far behind: no call.
    g.set_used_event(1000)
    rig.blk_write(0, b"y" * 10)
    rig.poll()
    assert g.avail_event() == 4
    complete_all(rig)
    rig.poll()
    assert read_counter(rig.call[0]) == 0
    assert len(g.take_used()) == 1


def test_backend_event_idx(make_rig):
    rig = make_rig(event_idx=False, backend_event_idx=True, num=32)
    be = rig.be[0]
    # Backend's avail_event = 0: kick when our avail idx moves past 0.
    be.set_avail_event(0)
    rig.blk_write(0, b"x" * 10)
    rig.poll()
    assert read_counter(be.kick_fd) == 1
    # Backend says it will look by itself until idx 5: no kick for entries 2..5.
    be.set_avail_event(5)
    for _ in range(3):
        rig.blk_write(0, b"x" * 10)
        rig.poll()
    assert read_counter(be.kick_fd) == 0        # avail idx now 4
    rig.blk_write(0, b"x" * 10)
    rig.blk_write(0, b"x" * 10)
    rig.poll()
    assert read_counter(be.kick_fd) == 1        # 4 -> 6 crosses 5
    # used_event in the shadow avail ring: we want a call at the next completion.
    reqs = be.pending()
    assert len(reqs) == 6
    assert be.used_event() == 0
    for r in reqs[:4]:
        be.complete(r.head, 0)
    rig.poll()
    assert be.used_event() == 4
    for r in reqs[4:]:
        be.complete(r.head, 0)
    rig.poll()
    assert be.used_event() == 6
    assert len(rig.gq[0].take_used()) == 6


@pytest.mark.parametrize("guest_ei,backend_ei", [(False, False), (True, True), (True, False), (False, True)])
def test_every_request_completes_and_notifies_once_per_pass(make_rig, guest_ei, backend_ei):
    """With default (zeroed) suppression fields the guest gets one call per pass
    and the backend one kick per pass, whatever the combination."""
    rig = make_rig(event_idx=guest_ei, backend_event_idx=backend_ei, num=64)
    g, be = rig.gq[0], rig.be[0]
    for rnd in range(5):
        if guest_ei:
            g.set_used_event(g.used_idx())    # driver: call me at the next used entry
        if backend_ei:
            be.set_avail_event(be.avail_idx())
        for _ in range(4):
            rig.blk_write(0, b"z" * 8)
        rig.poll()
        assert read_counter(be.kick_fd) == 1
        complete_all(rig)
        rig.poll()
        assert read_counter(rig.call[0]) == 1
        assert len(g.take_used()) == 4


def test_a_stop_clears_the_kick_counter_once_and_keeps_later_kicks(make_rig):
    """The loop polls the guest's kick eventfd and never reads it (csrc/loop.c): the queue's stop
    clears it once, so QEMU's test-and-clear when it stops vhost sees only kicks made after the
    stop (found by review: QEMU creates the notifier with a count of 1 and would always see it set)."""
    rig = make_rig()
    kick = os.dup(rig.kick[0])
    try:
        rig.dp.start()
        rig.blk_write(0, b"s" * 100)
        os.eventfd_write(kick, 1)
        for _ in range(500):
            if rig.dev.stats(0).guest_kicks:
                break
            select.select([], [], [], 0.01)
        assert rig.dev.stats(0).guest_kicks >= 1
        complete_all(rig)
        rig.dev.queue_stop(0)
        assert read_counter(kick) == 0                  # cleared by the stop
        os.eventfd_write(kick, 1)                       # a kick after the stop ...
        assert read_counter(kick) == 1                  # ... is QEMU's to see
    finally:
        os.close(kick)
        rig.dp.stop()


def test_a_stop_never_blocks_on_a_blocking_kick_fd(make_rig):
    """The front-end chooses its kick eventfd's flags. A blocking one with no kick pending
    must not hang the stop's clearing read, which runs on the loop thread and would take
    every device of that loop with it (found: CI's proxy under strace never exited)."""
    rig = make_rig()
    kfd = os.eventfd(0)                              # blocking, counter 0
    try:
        rig.dev.queue_set_guest_kick(0, kfd)
        rig.dp.start()
        done = []
        t = threading.Thread(target=lambda: done.append(rig.dev.queue_stop(0)), daemon=True)
        t.start()
        t.join(5)
        assert done, "queue_stop hung on a blocking, empty kick eventfd"
        os.eventfd_write(kfd, 1)                     # and a kick after the stop stays QEMU's
        assert read_counter(kfd) == 1
    finally:
        rig.dp.stop()
        os.close(kfd)
