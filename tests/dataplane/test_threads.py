"""Several data-plane loops in one DataPlane (csrc/loop.c "Several loops"), and idle trim.

Each loop is its own thread with its own io_uring; a device is served by one
loop for its whole life.  These tests run real eventfds on both sides with a
backend thread per queue (test_loop.BackendThread) and check: exact counts on
every queue of every device while several loops run, stop/start and aborts on
a device of any loop, a device re-created after a disconnect landing on
another loop and served there, events of every loop through the one event fd
with the device's own id and name, affinity of each loop thread.  Idle trim:
the bounce pages a queue used are given back once it is idle (the shadow
memfd's allocated blocks fall back to what the rings take), nothing is given
back while a request owns bounce bytes, and memory before use does not depend
on the bounce size.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from contextlib import contextmanager

import pytest

from fastshadow.dataplane import DataPlane, DrainTimeout, InvalidRequest

from .harness import Buf, Rig
from .test_loop import BackendThread, kick, wait_fd


def loop_names() -> dict[int, str]:
    """{tid: thread name} of this process's threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except FileNotFoundError:  # a thread that just ended
            pass
    return out


def resident_bytes(dev) -> int:
    """Bytes of the shadow memfd that hold pages (allocated blocks)."""
    return os.fstat(dev.shadow_fd).st_blocks * 512


def wait_until(pred, what: str, timeout: float = 10.0):
    """Poll pred() until true; raise naming `what` if the deadline passes (no clock assert)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def shared_dp():
    """A factory of started multi-loop data planes, closed after the test's rigs."""
    made = []

    def make(**kw):
        dp = DataPlane(**kw)
        dp.start()
        made.append(dp)
        return dp
    yield make
    for dp in made:
        dp.close()


@contextmanager
def served(*rigs: Rig):
    """Queue 0 of each rig served by its own BackendThread for the with-block."""
    bts = [BackendThread(r) for r in rigs]
    for b in bts:
        b.start()
    try:
        yield bts
    finally:
        for b in bts:
            b.stop()


def roundtrip(rig: Rig, q: int, nbytes: int) -> None:
    """One read request on queue q, served by the queue's backend thread."""
    head, bufs = rig.blk_read(q, nbytes)
    kick(rig, q)
    assert wait_fd(rig.call[q]) >= 1
    assert rig.gq[q].take_used() == [(head, nbytes + 1)]
    rig.accept_writable(bufs)


def test_devices_spread_over_loops_each_served_exactly(shared_dp, make_rig):
    dp = shared_dp(threads=3)
    assert dp.threads == 3 and dp.running
    tids = dp.thread_ids()
    names = loop_names()
    assert [names[t] for t in tids] == ["fsdp-loop0", "fsdp-loop1", "fsdp-loop2"]
    # 2-queue devices: the least loaded loop takes the next one, in turn on ties.
    rigs = [make_rig(dp=dp, name=f"d{i}", nq=2, num=32) for i in range(4)]
    assert [r.dev.loop for r in rigs] == [0, 1, 2, 0]
    assert len({r.dev.id for r in rigs}) == 4              # ids are the process's, not the loop's
    bts = [BackendThread(r, q) for r in rigs for q in range(2)]
    for b in bts:
        b.start()
    n = 12
    try:
        for i in range(n):
            for r in rigs:
                for q in range(2):
                    roundtrip(r, q, 512 + 64 * q)
    finally:
        for b in bts:
            b.stop()
    for r in rigs:
        for q in range(2):
            st = r.dev.stats(q)
            assert (st.requests, st.completed, st.inflight) == (n, n, 0), (r.dev, q, st)
            assert st.bytes_out == n * (512 + 64 * q + 1)


def test_stop_start_and_abort_on_every_loop(shared_dp, make_rig):
    """A stop that must wait for the backend, then a restart that re-publishes, on a device of
    each loop while the other loop's device keeps serving."""
    dp = shared_dp(threads=2)
    rigs = [make_rig(dp=dp, name=f"d{i}") for i in range(2)]
    assert [r.dev.loop for r in rigs] == [0, 1]
    for held, busy in ((rigs[0], rigs[1]), (rigs[1], rigs[0])):
        hb, bb = BackendThread(held), BackendThread(busy)
        hb.paused.set()                                # held's backend hangs
        hb.start()
        bb.start()
        try:
            head, bufs = held.blk_read(0, 2048)
            kick(held)
            wait_fd(held.be[0].kick_fd)                # published, never served
            with pytest.raises(DrainTimeout) as ei:
                held.dev.queue_stop(0, timeout_ms=200)
            assert ei.value.inflight == 1
            roundtrip(busy, 0, 300)                    # the other loop is not held up
            held.be[0].restart()
            held.start(0)
            hb.paused.clear()
            assert wait_fd(held.call[0]) == 1
            assert held.gq[0].take_used() == [(head, 2049)]
            held.accept_writable(bufs)
            # and a stop that drains at once, then a restart, then I/O again
            assert held.dev.queue_stop(0) == held.gq[0].avail_idx
            held.be[0].restart()
            held.start(0)
            roundtrip(held, 0, 100)
        finally:
            hb.stop()
            bb.stop()
    # abort of a kept request on loop 1
    r = rigs[1]
    head, bufs = r.blk_read(0, 1000)
    kick(r)
    wait_fd(r.be[0].kick_fd)
    with pytest.raises(DrainTimeout):
        r.dev.queue_stop(0, timeout_ms=100)
    assert r.dev.queue_abort(0) == 1
    assert r.gq[0].take_used() == [(head, 0)]        # failed (len 0), not lost
    assert [e.name for e in dp.drain_events()] == ["INFLIGHT_ABORTED"]


def test_reconnect_lands_on_another_loop_and_is_served(shared_dp, make_rig):
    """A device removed (QEMU disconnected) and added again (it reconnected) goes to the next
    loop when loads are equal: its queues, commands and events move with it."""
    dp = shared_dp(threads=2)
    first = make_rig(dp=dp, name="vm0")
    assert first.dev.loop == 0
    with served(first):
        roundtrip(first, 0, 4096)
    old_id = first.dev.id
    dp.remove_device(first.dev)                      # QEMU went away
    again = make_rig(dp=dp, name="vm0")
    assert again.dev.loop == 1 and again.dev.id == old_id     # the lowest free id, now on loop 1
    with served(again):
        for _ in range(5):
            roundtrip(again, 0, 4096)
    st = again.dev.stats(0)
    assert (st.requests, st.completed) == (5, 5)
    # an event of the new device carries its id and name
    g = again.gq[0]
    head = g.add([Buf(again.mem.alloc(16), 16), Buf(again.mem.alloc(1), 0, True)])  # length 0: refused
    kick(again)
    wait_fd(again.call[0])
    r, _, _ = select.select([dp.event_fd], [], [], 5)
    assert r, "event fd not readable"
    [ev] = dp.drain_events()
    assert (ev.dev, ev.dev_name, ev.name) == (again.dev.id, "vm0", "ZERO_LENGTH")
    assert g.take_used() == [(head, 0)]


def test_events_of_every_loop_in_order_through_one_fd(shared_dp, make_rig):
    dp = shared_dp(threads=2)
    rigs = [make_rig(dp=dp, name=f"d{i}") for i in range(2)]
    heads = {}
    for r in rigs:
        g = r.gq[0]                                  # three refusals per queue, in this order
        heads[r.dev.id] = [g.add([Buf(r.mem.alloc(16), 16), Buf(r.mem.alloc(16), 0, True)])
                           for _ in range(3)]
        kick(r)
        wait_fd(r.call[0])
    evs = []
    wait_until(lambda: evs.extend(dp.drain_events()) or len(evs) >= 6, "6 events")
    for r in rigs:
        mine = [(e.dev_name, e.name, e.head) for e in evs if e.dev == r.dev.id]
        assert mine == [(r.dev.name, "ZERO_LENGTH", h) for h in heads[r.dev.id]]
        assert [h for h, ln in r.gq[0].take_used()] == heads[r.dev.id]


def test_loop_threads_pinned_and_repinned_after_restart(shared_dp):
    cpus = sorted(os.sched_getaffinity(0))
    dp = DataPlane(threads=2, cpus=[{cpus[-1]}, {cpus[0]}])
    try:
        dp.start()
        t0, t1 = dp.thread_ids()
        assert os.sched_getaffinity(t0) == {cpus[-1]} and os.sched_getaffinity(t1) == {cpus[0]}
        dp.pin(1, set(cpus))
        assert os.sched_getaffinity(t1) == set(cpus)
        dp.stop()
        assert dp.thread_ids() == [0, 0]
        dp.start()
        n0, n1 = dp.thread_ids()
        assert os.sched_getaffinity(n0) == {cpus[-1]} and os.sched_getaffinity(n1) == set(cpus)
        with pytest.raises(InvalidRequest, match="loop 5"):
            dp.add_device("x", num_queues=1, loop=5)
    finally:
        dp.close()


def test_one_loop_is_the_single_thread_data_plane():
    with DataPlane() as dp:
        dp.start()
        assert dp.threads == 1
        [tid] = dp.thread_ids()
        assert loop_names()[tid] == "fsdp-loop0"
        assert dp.event_fd > 0
        d = dp.add_device("a", num_queues=2, bounce_per_queue=1 << 16, max_queue_size=64)
        assert d.loop == 0


# --------------------------------------------------------------------------
# Idle trim: bounce pages given back


def fill_bounce(rig: Rig, q: int, nbytes: int, count: int) -> None:
    """`count` writes of `nbytes` (fresh bytes each) in flight at once, checked at the backend
    byte for byte, then completed: the bounce pages they used are resident."""
    be = rig.be[q]
    payloads = [os.urandom(nbytes) for _ in range(count)]
    sent = [rig.blk_write(q, p) for p in payloads]
    heads = [h for h, _ in sent]
    kick(rig, q)
    wait_fd(be.kick_fd)
    reqs = be.pending()
    assert len(reqs) == count
    for r, p in zip(reqs, payloads):
        data = b"".join(be.read(d) for d in r.descs if not d.writable)
        assert data[16:] == p                        # the header, then the payload
        for d in r.descs:
            if d.writable:
                be.write(d, b"\0")
        be.complete(r.head, 1)
    os.write(be.call_fd, struct.pack("<Q", 1))
    wait_fd(rig.call[q])
    assert sorted(h for h, _ in rig.gq[q].take_used()) == sorted(heads)
    for _, bufs in sent:
        rig.accept_writable(bufs)


def test_idle_queue_gives_bounce_pages_back(shared_dp, make_rig):
    dp = shared_dp(idle_trim_ms=50)
    rig = make_rig(dp=dp, nq=2, num=64, bounce=8 << 20, max_request_bytes=1 << 20)
    before = resident_bytes(rig.dev)
    fill_bounce(rig, 0, 96 << 10, 4)                 # 384 KiB of bounce on queue 0
    fill_bounce(rig, 1, 64 << 10, 2)                 # 128 KiB on queue 1
    assert resident_bytes(rig.dev) >= before + (384 << 10) + (128 << 10)
    wait_until(lambda: resident_bytes(rig.dev) == before, "the bounce pages to be given back")
    assert dp.trimmed_pages() == 2 * (8 << 20) // 4096
    # used again after the trim: fresh pages, same bytes through
    fill_bounce(rig, 0, 64 << 10, 2)
    assert resident_bytes(rig.dev) > before
    wait_until(lambda: resident_bytes(rig.dev) == before, "the second trim")


def test_no_trim_while_a_request_owns_bounce_bytes(shared_dp, make_rig):
    """A request kept across a stop (the backend never completed it) keeps its bounce bytes
    resident: re-published after far more than idle_trim_ms, the backend reads it intact."""
    dp = shared_dp(idle_trim_ms=20)
    rig = make_rig(dp=dp, num=16, bounce=1 << 20)
    payload = os.urandom(64 << 10)
    rig.blk_write(0, payload)
    kick(rig)
    wait_fd(rig.be[0].kick_fd)
    with pytest.raises(DrainTimeout):
        rig.dev.queue_stop(0, timeout_ms=50)
    held = resident_bytes(rig.dev)
    time.sleep(0.3)          # bounds an observation of what must not happen: a trim
    assert dp.trimmed_pages() == 0 and resident_bytes(rig.dev) == held
    rig.be[0].restart()
    rig.start(0)
    wait_fd(rig.be[0].kick_fd)
    [r] = rig.be[0].pending()
    assert b"".join(rig.be[0].read(d) for d in r.descs if not d.writable)[16:] == payload


def test_memory_before_use_does_not_grow_with_bounce_size(shared_dp, make_rig):
    """Rings configured, started, no request yet: the same resident bytes whatever the bounce
    size (pages come on first use); and both come back to that after use and idle."""
    dp = shared_dp(idle_trim_ms=30)
    small = make_rig(dp=dp, name="small", nq=4, num=256, bounce=1 << 20)
    big = make_rig(dp=dp, name="big", nq=4, num=256, bounce=64 << 20)
    assert big.dev.shadow_size - small.dev.shadow_size == 4 * (63 << 20)
    assert resident_bytes(small.dev) == resident_bytes(big.dev)
    idle = resident_bytes(big.dev)
    fill_bounce(big, 3, 128 << 10, 4)
    wait_until(lambda: resident_bytes(big.dev) == idle, "the big device's trim")
    assert resident_bytes(small.dev) == idle


def test_loops_stopped_and_started_with_devices_on_each(shared_dp, make_rig):
    """All loops stop (calls run inline, the engine is driven by poll) and start again: each
    device is served by its own loop again, requests taken while stopped complete."""
    dp = shared_dp(threads=2)
    rigs = [make_rig(dp=dp, name=f"d{i}") for i in range(2)]
    dp.stop()
    assert not dp.running and dp.thread_ids() == [0, 0]
    pending = []
    for r in rigs:
        head, bufs = r.blk_read(0, 512)
        r.poll()                                     # synchronous: published on the shadow ring
        [req] = r.be[0].pending()
        pending.append((r, head, bufs, req))
    dp.start()
    assert all(dp.thread_ids())
    for r, head, bufs, req in pending:
        r.serve(0, [req])
        os.write(r.be[0].call_fd, struct.pack("<Q", 1))
        assert wait_fd(r.call[0]) == 1
        assert r.gq[0].take_used() == [(head, 513)]
        r.accept_writable(bufs)
    for r in rigs:
        with served(r):
            roundtrip(r, 0, 2048)


def test_a_kick_flood_starves_no_other_device_of_its_loop(shared_dp, make_rig):
    """A hostile guest writing its kick eventfd as fast as it can: every write is a
    completion of the loop's multishot poll (csrc/loop.c "How the loop waits"), thousands
    a second. Another device on the same loop is still served, every request of it exactly
    once, and the flooded device's own request too."""
    dp = shared_dp(threads=1)
    flooded, other = make_rig(dp=dp, name="flooded", num=32), make_rig(dp=dp, name="other", num=32)
    stop = threading.Event()
    writes = [0]

    def flood():
        fd = os.dup(flooded.kick[0])
        try:
            while not stop.is_set():
                os.eventfd_write(fd, 1)
                writes[0] += 1
        finally:
            os.close(fd)
    t = threading.Thread(target=flood, daemon=True)
    with served(flooded, other):
        t.start()
        try:
            wait_until(lambda: flooded.dev.stats(0).guest_kicks > 1000, "the loop to see the flood")
            for _ in range(50):
                roundtrip(other, 0, 512)
            roundtrip(flooded, 0, 4096)
        finally:
            stop.set()
            t.join()
    assert writes[0] > 1000
    st = other.dev.stats(0)
    assert (st.requests, st.completed, st.inflight) == (50, 50, 0)
    fs = flooded.dev.stats(0)
    assert (fs.requests, fs.completed, fs.inflight) == (1, 1, 0)
    assert fs.guest_kicks >= 1000                    # the loop saw them: not a test of a quiet loop
    assert [e for e in other.events() if e.name == "LOOP_ERROR"] == []
