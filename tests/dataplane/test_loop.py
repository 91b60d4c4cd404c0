"""The threaded io_uring loop: real eventfds on both sides, a backend thread, exact
counts, control commands executed on the loop while traffic flows."""

import os
import select
import threading
import time

import pytest

from fastshadow.dataplane import DataPlane, DrainTimeout, QueueBusy

from .harness import Rig, read_counter


class BackendThread(threading.Thread):
    """Serves the shadow ring whenever its kick eventfd fires; then calls."""

    def __init__(self, rig: Rig, q: int = 0, delay: float = 0.0, length=None, gate: threading.Event | None = None):
        """delay: sleep that long (at least) before serving what a kick brought;
        gate: hold what a kick brought until the gate is set (`holding` is set meanwhile)."""
        super().__init__(daemon=True)
        self.rig, self.q, self.delay, self.length, self.gate = rig, q, delay, length, gate
        self.halt = threading.Event()
        self.paused = threading.Event()
        self.holding = threading.Event()
        self.served_event = threading.Event()
        self.kicks = 0
        self.served = 0
        self.error = None

    def run(self):
        be = self.rig.be[self.q]
        try:
            while not self.halt.is_set():
                r, _, _ = select.select([be.kick_fd], [], [], 0.02)
                if not r or self.paused.is_set():
                    continue
                self.kicks += 1
                read_counter(be.kick_fd)
                reqs = be.pending()
                if self.delay:
                    time.sleep(self.delay)
                if reqs and self.gate is not None:
                    self.holding.set()
                    while not self.gate.wait(0.02):
                        if self.halt.is_set():
                            return
                if reqs:
                    self.rig.serve(self.q, reqs)
                    self.served += len(reqs)
                    self.served_event.set()
                    os.write(be.call_fd, (1).to_bytes(8, "little"))
        except Exception as e:  # pragma: no cover - surfaced by the test
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(5)
        assert self.error is None, self.error


def wait_fd(fd, timeout=5.0):
    r, _, _ = select.select([fd], [], [], timeout)
    assert r, "eventfd did not fire"
    return read_counter(fd)


def settle(rig, pred, q=0, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        st = rig.dev.stats(q)
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def kick(rig, q=0):
    os.write(rig.kick[q], (1).to_bytes(8, "little"))


@pytest.fixture
def loop_rig(make_rig):
    def factory(**kw):
        rig = make_rig(**kw)
        rig.dp.start()
        return rig
    return factory


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("busy_poll_us", [0, 200])
def test_one_at_a_time_exact_counts(loop_rig, event_idx, busy_poll_us):
    rig = loop_rig(num=32, event_idx=event_idx, busy_poll_us=busy_poll_us)
    assert rig.dp.running
    bt = BackendThread(rig)
    bt.start()
    n = 25
    try:
        for i in range(n):
            if event_idx:
                rig.gq[0].set_used_event(rig.gq[0].used_idx())
            head, bufs = rig.blk_read(0, 4096)
            kick(rig)
            assert wait_fd(rig.call[0]) == 1
            assert rig.gq[0].take_used() == [(head, 4097)]
            rig.accept_writable(bufs)
    finally:
        bt.stop()
    # guest_kicks/backend_calls count eventfd wakeups.  A kick may be seen by
    # the ring scan before its eventfd read completes (the count catches up
    # within an iteration).  While busy-polling, the rings are served before the
    # loop enters the kernel, so two signals can land on one eventfd read:
    # then wakeups <= signals.  Our own writes are always exact.
    st = settle(rig, lambda st: st.guest_kicks == n and st.backend_calls == n)
    assert st.requests == st.completed == n
    if busy_poll_us:
        assert 1 <= st.guest_kicks <= n and 1 <= st.backend_calls <= n
    else:
        assert st.guest_kicks == n
        assert st.backend_calls == n
    assert st.backend_kicks == n and bt.kicks == n
    assert st.guest_calls == n
    assert st.inflight == 0
    assert st.bytes_out == n * 4097 and st.bytes_in == n * 16


def test_batch_of_requests_one_kick(loop_rig):
    rig = loop_rig(num=256, bounce=4 << 20)
    bt = BackendThread(rig)
    bt.start()
    try:
        reqs = [rig.blk_write(0, os.urandom(1000)) for _ in range(60)]
        kick(rig)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 60 and time.monotonic() < deadline:
            select.select([rig.call[0]], [], [], 0.5)
            read_counter(rig.call[0])
            got += rig.gq[0].take_used()
        assert sorted(u[0] for u in got) == sorted(h for h, _ in reqs)
        for _, bufs in reqs:
            rig.accept_writable(bufs)
    finally:
        bt.stop()
    st = settle(rig, lambda st: st.guest_kicks == 1)
    assert st.completed == 60 and st.inflight == 0 and st.guest_kicks == 1


def test_no_kick_fd_polls_the_ring(loop_rig):
    rig = loop_rig(kick=False)
    bt = BackendThread(rig)
    bt.start()
    try:
        head, bufs = rig.blk_read(0, 512)
        assert wait_fd(rig.call[0]) == 1          # found without any kick
        assert rig.gq[0].take_used() == [(head, 513)]
        rig.accept_writable(bufs)
    finally:
        bt.stop()


def test_events_signal_event_fd(loop_rig):
    rig = loop_rig()
    rig.gq[0].write_desc(3, 0x4000_0000, 8, 0, 0)
    rig.gq[0].put_avail(3)
    kick(rig)
    r, _, _ = select.select([rig.dp.event_fd], [], [], 5)
    assert r
    [ev] = rig.dp.drain_events()
    assert ev.name == "ADDR_UNMAPPED" and ev.dev_name == "test0" and ev.queue == 0
    assert ev.message.startswith("test0 q0: refused request head 3: buffer at gpa 0x40000000")
    assert wait_fd(rig.call[0]) == 1
    assert rig.gq[0].take_used() == [(3, 0)]


def test_queue_stop_drains_in_flight(loop_rig):
    """The stop returns only once the backend completed what it held (event order, no timing)."""
    rig = loop_rig()
    gate = threading.Event()
    bt = BackendThread(rig, gate=gate)
    bt.start()
    try:
        head, bufs = rig.blk_read(0, 1024)
        kick(rig)
        assert bt.holding.wait(5), "the backend never got the request"
        stop = {}

        def stopper():
            try:
                stop["idx"] = rig.dev.queue_stop(0, timeout_ms=30000)
                stop["served_before_return"] = bt.served_event.is_set()
            except Exception as e:  # pragma: no cover - surfaced below
                stop["error"] = e
        st = threading.Thread(target=stopper, daemon=True)
        st.start()
        st.join(0.2)                              # a window to catch a stop that does not wait
        assert st.is_alive(), f"the stop returned while the backend still held the request: {stop}"
        gate.set()                                # the backend completes only now
        st.join(30)
        assert not st.is_alive() and "error" not in stop, stop
        assert stop["served_before_return"], "the stop returned before the backend completed"
        assert stop["idx"] == 1
        assert rig.gq[0].take_used() == [(head, 1025)]
        rig.accept_writable(bufs)
        # stopped: new requests are not taken (checked after the loop saw the kick)
        rig.blk_write(0, b"z" * 10)
        kick(rig)
        time.sleep(0.1)
        assert rig.be[0].avail_idx() == 1
        with pytest.raises(QueueBusy):
            rig.dev.poll()                        # the loop owns the engine
    finally:
        bt.stop()


def test_queue_stop_timeout_then_restart_republishes(loop_rig):
    rig = loop_rig()
    bt = BackendThread(rig)
    bt.paused.set()                               # backend "hangs"
    bt.start()
    try:
        head, bufs = rig.blk_read(0, 2048)
        kick(rig)
        wait_fd(rig.be[0].kick_fd)                # published on the shadow ring, never served
        with pytest.raises(DrainTimeout) as ei:   # the timeout is the only way this stop can end
            rig.dev.queue_stop(0, timeout_ms=200)
        assert ei.value.avail_idx == 1 and ei.value.inflight == 1
        # "new backend": fresh shadow ring, request re-published, served.
        rig.be[0].restart()
        rig.start(0)
        bt.paused.clear()          # only now: the old ring must not be served
        assert wait_fd(rig.call[0]) == 1
        assert rig.gq[0].take_used() == [(head, 2049)]
        rig.accept_writable(bufs)
    finally:
        bt.stop()


def test_queue_stop_timeout_then_abort(loop_rig):
    rig = loop_rig()
    head, bufs = rig.blk_read(0, 64)
    kick(rig)
    wait_fd(rig.be[0].kick_fd)
    with pytest.raises(DrainTimeout):
        rig.dev.queue_stop(0, timeout_ms=50)
    assert rig.dev.queue_abort(0) == 1
    assert wait_fd(rig.call[0]) == 1
    assert rig.gq[0].take_used() == [(head, 0)]
    assert [e.name for e in rig.dp.drain_events()] == ["INFLIGHT_ABORTED"]
    assert rig.dev.stats(0).inflight == 0


def test_control_commands_while_traffic_flows(loop_rig):
    rig = loop_rig(num=64, nq=2)
    bts = [BackendThread(rig, q) for q in range(2)]
    for b in bts:
        b.start()
    stop = threading.Event()
    errors = []

    def control():
        try:
            while not stop.is_set():
                rig.dev.stats(0)
                rig.dev.queue_shadow_addrs(1)
                rig.dev.set_mem_table(rig.mem.regions)   # same table again: rings re-translated
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ct = threading.Thread(target=control, daemon=True)
    ct.start()
    try:
        for i in range(30):
            q = i % 2
            head, bufs = rig.blk_read(q, 700)
            kick(rig, q)
            wait_fd(rig.call[q])
            assert rig.gq[q].take_used() == [(head, 701)]
            rig.accept_writable(bufs)
    finally:
        stop.set()
        ct.join(5)
        for b in bts:
            b.stop()
    assert not errors


def test_loop_restart_and_device_add_remove_while_running(make_rig):
    rig = make_rig()
    dp = rig.dp
    dp.start()
    extra = dp.add_device("extra", num_queues=2, bounce_per_queue=1 << 16, max_queue_size=64)
    assert extra.id != rig.dev.id
    dp.remove_device(extra)
    dp.stop()
    assert not dp.running
    # synchronous again
    head, bufs = rig.blk_write(0, b"s" * 100)
    rig.poll()
    [r] = rig.be[0].pending()
    dp.start()
    rig.be[0].complete(r.head, 0)
    os.write(rig.be[0].call_fd, (1).to_bytes(8, "little"))
    assert wait_fd(rig.call[0]) == 1
    assert rig.gq[0].take_used() == [(head, 0)]
    dp.stop()
    dp.stop()                                     # idempotent


def test_many_devices_close_while_running():
    with DataPlane() as dp:
        dp.start()
        devs = [dp.add_device(f"d{i}", num_queues=1, bounce_per_queue=1 << 16, max_queue_size=64)
                for i in range(8)]
        for d in devs[::2]:
            dp.remove_device(d)
        assert len({d.id for d in devs}) == 8
    # close() with the loop running and devices left: no hang, no crash


def test_busy_poll_window_adapts(loop_rig):
    """When work always comes later than the window (a slow backend, a guest that
    thinks between requests) spinning is pointless: the window shrinks to 0.
    When it comes soon, the window grows back (never above the maximum).

    No assertion on time. The shrinking half is deterministic: every idle period
    is at least the 20 ms the backend and the guest wait (a sleep lasts at least
    what it asks), 4 times the 5 ms window, and each one halves the window: 10
    requests are 20 halvings, 5 ms reaches 0 after 14. The growing half needs one
    idle period within 5 ms once the window is 0 (the backend answers at once):
    the window is looked at after each request and must have come back above 0."""
    max_us = 5000
    rig = loop_rig(num=32, busy_poll_us=max_us)
    assert rig.dp.poll_window_us == max_us
    windows = []

    def one_at_a_time(n, think=0.0):
        for _ in range(n):
            head, bufs = rig.blk_read(0, 4096)
            kick(rig)
            assert wait_fd(rig.call[0]) >= 1
            assert rig.gq[0].take_used() == [(head, 4097)]
            rig.accept_writable(bufs)
            time.sleep(think)
            windows.append(rig.dp.poll_window_us)

    slow = BackendThread(rig, delay=0.020)
    slow.start()
    try:
        one_at_a_time(10, think=0.020)
    finally:
        slow.stop()
    assert rig.dp.poll_window_us == 0
    assert windows == sorted(windows, reverse=True)   # it only ever shrank

    windows.clear()
    quick = BackendThread(rig)
    quick.start()
    try:
        one_at_a_time(30)
    finally:
        quick.stop()
    assert max(windows) > 0, windows
    assert all(0 <= w <= max_us for w in windows), windows


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event on 16-bit indices."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class EventIdxBackend(BackendThread):
    """A backend that calls only when the shadow ring's used_event asks for it (as
    qemu-storage-daemon does), never unasked."""

    def run(self):
        be = self.rig.be[self.q]
        try:
            while not self.halt.is_set():
                r, _, _ = select.select([be.kick_fd], [], [], 0.02)
                if r:
                    self.kicks += 1
                    read_counter(be.kick_fd)
                reqs = be.pending()        # also asks for a kick at the next entry
                if not reqs:
                    continue
                old = be.used_idx
                self.rig.serve(self.q, reqs)
                self.served += len(reqs)
                if need_event(be.used_event(), be.used_idx, old):
                    os.write(be.call_fd, (1).to_bytes(8, "little"))
        except Exception as e:  # pragma: no cover - surfaced by the test
            self.error = e


@pytest.mark.parametrize("busy_poll_us", [0, 200])
def test_event_idx_peers_that_only_signal_when_asked_lose_no_request(loop_rig, busy_poll_us):
    # Both peers honour event idx strictly: the guest kicks only when avail_event asks, the
    # backend calls only when used_event asks.  The loop arms these fields itself, per pass
    # or (busy-polling) just before it sleeps: a wrong decision anywhere leaves a request
    # waiting forever, which the deadline turns into a failure.
    rig = loop_rig(num=64, event_idx=True, busy_poll_us=busy_poll_us)
    bt = EventIdxBackend(rig)
    bt.start()
    g = rig.gq[0]
    n, done, kicks = 150, 0, 0   # what the test RAM holds
    try:
        for i in range(n):
            g.set_used_event(g.used_idx())
            old = g.avail_idx
            head, bufs = rig.blk_read(0, 4096)
            if need_event(g.avail_event(), g.avail_idx, old):
                kick(rig)
                kicks += 1
            assert wait_fd(rig.call[0]) >= 1, f"request {i}: no call"   # asked for: must come
            assert g.take_used() == [(head, 4097)]
            rig.accept_writable(bufs)
            done += 1
    finally:
        bt.stop()
    st = settle(rig, lambda st: st.completed == n)
    assert done == n and st.requests == st.completed == n and st.inflight == 0
    assert kicks >= 1
