"""A new backend gets a shadow of its own (Device.renew_backend_side): a previous backend that
lives on with the old shadow memfd mapped and the old kick and call eventfds open (a liar that
was cut off, qemu-storage-daemon finishing a deleted export's requests) reaches nothing of the
device any more. The old backend is played through the fds it was given (its mapping, dups of
its eventfds), exactly as a process that kept them would act; the new one through the fds the
device gives after the renewal."""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
import types

import pytest

from fastshadow.dataplane import DrainTimeout, QueueBusy

from .harness import Backend, read_counter
from .test_loop import kick, loop_rig, wait_fd  # noqa: F401 (loop_rig is a fixture)

NUM = 16


class OldBackend:
    """What a dropped backend still holds: its mapping of the shadow memfd and its eventfds."""

    def __init__(self, be: Backend):
        self.be = be                                  # its mapping stays open
        self.kick = os.dup(be.kick_fd)                # the data plane closes its own at the renewal
        self.call = os.dup(be.call_fd)
        self.shadow = os.dup(be.dev.shadow_fd)
        read_counter(self.kick)                       # it had read the kicks it was sent

    def fake_used(self, head: int, length: int) -> None:
        """A used element for `head` published after everything the ring had."""
        idx = struct.unpack_from("<H", self.be.map, self.be.used + 2)[0]
        struct.pack_into("<II", self.be.map, self.be.used + 4 + 8 * (idx % self.be.num), head, length)
        struct.pack_into("<H", self.be.map, self.be.used + 2, (idx + 1) & 0xFFFF)

    def scribble(self, off: int, n: int) -> None:
        self.be.map[off:off + n] = b"\xee" * n

    def close(self) -> None:
        self.be.close()
        for fd in (self.kick, self.call, self.shadow):
            os.close(fd)


def park(rig, q: int = 0) -> None:
    """What recover_backend does with a started queue when its backend goes: stop it keeping
    its requests, fresh shadow rings."""
    with pytest.raises(DrainTimeout):
        rig.dev.queue_stop(q, timeout_ms=0)
    rig.dev.queue_clear_shadow(q)


def renew(rig, q: int = 0) -> OldBackend:
    """Park, renew, and hand queue q to a new backend (rig.be[q]); returns the old one."""
    old = OldBackend(rig.be[q])
    park(rig, q)
    rig.dev.renew_backend_side()
    rig.be[q] = Backend(rig.dev, q, rig.num, rig.backend_event_idx)
    return old


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def eventfd_id(fd: int) -> int:
    """Which eventfd this is (all eventfds share one anonymous inode)."""
    for line in open(f"/proc/self/fdinfo/{fd}"):
        if line.startswith("eventfd-id:"):
            return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not an eventfd")


def resident(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def serve_one_read(rig, nbytes: int) -> None:
    """A blk read of nbytes on queue 0, served by the backend and completed to the guest
    (nbytes and the status byte), its buffers accepted as written."""
    head, bufs = rig.blk_read(0, nbytes)
    rig.poll()
    rig.serve(0, rig.be[0].pending())
    rig.poll()
    assert rig.gq[0].take_used() == [(head, nbytes + 1)]
    rig.accept_writable(bufs)


def test_refused_while_a_queue_runs(make_rig):
    rig = make_rig(num=NUM)
    with pytest.raises(QueueBusy):
        rig.dev.renew_backend_side()
    # nothing changed: the queue runs on with the same fds
    serve_one_read(rig, 64)


def test_new_fds_kept_bounce_copied_rings_fresh_old_memfd_emptied(make_rig):
    rig = make_rig(num=NUM, nq=2)
    payload = os.urandom(8192)
    head, bufs = rig.blk_write(0, payload)
    rig.poll()
    [r] = rig.be[0].pending()
    data_off = rig.be[0].offset(r.descs[1].addr)
    assert rig.be[0].read(r.descs[1]) == payload
    # queue 1 served requests (its bounce pages are resident) and keeps none
    h1, b1 = rig.blk_read(1, 65536)
    rig.poll()
    rig.serve(1, rig.be[1].pending())
    rig.poll()
    assert rig.gq[1].take_used() == [(h1, 65537)]
    rig.accept_writable(b1)
    old1 = {eventfd_id(fd) for fd in rig.dev.queue_backend_fds(1)}
    rig.dev.queue_stop(1, timeout_ms=0)               # every queue stops before a renewal
    old = renew(rig)
    try:
        assert identity(rig.dev.shadow_fd) != identity(old.shadow)
        assert os.readlink(f"/proc/self/fd/{rig.dev.shadow_fd}").startswith("/memfd:fastshadow-shadow:test0")
        assert os.fstat(rig.dev.shadow_fd).st_size == rig.dev.shadow_size
        seals = fcntl.fcntl(rig.dev.shadow_fd, 1034)                  # F_GET_SEALS
        assert seals & 0x7 == 0x7                                     # SEAL, SHRINK, GROW
        # every queue's eventfds are new, queue 1's too
        assert {eventfd_id(rig.be[0].kick_fd), eventfd_id(rig.be[0].call_fd)}.isdisjoint(
            {eventfd_id(old.kick), eventfd_id(old.call)})
        assert {eventfd_id(fd) for fd in rig.dev.queue_backend_fds(1)}.isdisjoint(old1)
        # the kept request's bytes are in the new memfd, at the same offset; nothing else is
        assert bytes(rig.be[0].map[data_off:data_off + len(payload)]) == payload
        assert resident(rig.dev.shadow_fd) < 65536, resident(rig.dev.shadow_fd)   # not queue 1's 64 KiB
        # the new backend finds fresh rings; the old memfd's pages went back to the kernel
        assert rig.be[0].avail_idx() == 0 and struct.unpack_from("<H", rig.be[0].map, rig.be[0].used + 2)[0] == 0
        assert resident(old.shadow) == 0
        rig.start(0, backend_lost=True)
        [r2] = rig.be[0].pending()
        assert rig.be[0].read(r2.descs[1]) == payload
        rig.serve(0, [r2])
        rig.poll()
        assert rig.gq[0].take_used() == [(head, 1)]
        rig.accept_writable(bufs)
        assert rig.events() == []
    finally:
        old.close()


def test_old_backend_reaches_nothing(make_rig):
    """Synchronous engine: the old backend writes fake used elements and data through its
    mapping, reads its kick eventfd; the guest sees the new backend's completions only."""
    rig = make_rig(num=NUM)
    payload = os.urandom(4096)
    hw, bw = rig.blk_write(0, payload)
    hr, br = rig.blk_read(0, 4096)
    rig.poll()
    assert len(rig.be[0].pending()) == 2
    old = renew(rig)
    try:
        old.fake_used(0, 4097)                         # before the start ...
        rig.start(0, backend_lost=True)
        assert read_counter(old.kick) == 0             # ... the kick went to the new backend only
        assert read_counter(rig.be[0].kick_fd) >= 1
        old.fake_used(0, 4097)                         # ... and after it
        old.fake_used(1, 4097)
        rig.poll()
        assert rig.gq[0].take_used() == [] and rig.events() == []
        new = rig.be[0]
        reqs = new.pending()
        assert len(reqs) == 2
        assert new.read(reqs[0].descs[1]) == payload   # the write's data, the guest's
        # the old backend scribbles over the whole bounce area of the queue, after the new
        # backend wrote the read's data and before the data plane copies it back
        bounce = rig.dev.queue_slot_size - rig.dev.bounce_per_queue
        written = rig.serve(0, reqs)
        old.scribble(bounce, rig.dev.bounce_per_queue)
        old.fake_used(reqs[0].head, 1)
        os.write(old.call, (1).to_bytes(8, "little"))
        rig.poll()
        assert sorted(rig.gq[0].take_used()) == sorted([(hw, 1), (hr, 4097)])
        assert rig.mem.read(br[1].gpa, 4096) == written[reqs[1].head][:4096]
        rig.accept_writable(bw)
        rig.accept_writable(br)
        assert rig.events() == []
        st = rig.dev.stats(0)
        assert (st.completed, st.inflight, st.backend_errors) == (2, 0, 0)
    finally:
        old.close()


@pytest.mark.parametrize("busy_poll_us", [0, 200])
def test_old_eventfds_reach_nothing_with_the_loop(loop_rig, busy_poll_us):
    """The loop: its poll moved to the new call eventfd (calls on the old one wake nobody);
    the re-published request is kicked on the new kick eventfd only; a parked write
    completes with the new backend's answer."""
    rig = loop_rig(num=NUM, busy_poll_us=busy_poll_us)
    payload = os.urandom(2048)
    head, bufs = rig.blk_write(0, payload)
    kick(rig)
    wait_fd(rig.be[0].kick_fd)                        # published to the first backend, never served
    rig.be[0].pending()
    old = renew(rig)
    try:
        rig.start(0, backend_lost=True)
        new = rig.be[0]
        assert wait_fd(new.kick_fd) >= 1
        assert read_counter(old.kick) == 0
        calls = rig.dev.stats(0).backend_calls
        for _ in range(3):
            old.fake_used(head, 1)
            os.write(old.call, (1).to_bytes(8, "little"))
            time.sleep(0.05)
        assert rig.dev.stats(0).backend_calls == calls
        assert rig.gq[0].take_used() == [] and rig.events() == []
        [r] = new.pending()
        assert new.read(r.descs[1]) == payload
        rig.serve(0, [r])
        os.write(new.call_fd, (1).to_bytes(8, "little"))
        assert wait_fd(rig.call[0]) >= 1
        assert rig.gq[0].take_used() == [(head, 1)]
        assert rig.dev.stats(0).backend_calls > calls
        rig.accept_writable(bufs)
        assert rig.events() == []
    finally:
        old.close()


def test_stats_never_fstat_the_shadow_fd_a_renewal_closes(make_rig, monkeypatch):
    """The stats thread's figure of resident shadow bytes (proxy/stats.py) against a renewal on
    the session thread, which closes the old shadow fd. The renewal is made to come exactly
    between the stats thread's read of the fd's number and its fstat (which waits for it, at
    most 0.5 s): the figure must be the old memfd's, not 0 (EBADF on the closed number) nor
    that of another file given the number meanwhile."""
    from fastshadow.proxy.stats import _shadow
    rig = make_rig(num=NUM)
    serve_one_read(rig, 65536)
    rig.dev.queue_stop(0, timeout_ms=0)               # every queue stops before a renewal
    session = types.SimpleNamespace(dev=rig.dev)      # what the stats read of an isolated session
    before = _shadow(session)
    assert before[0] == rig.dev.loop and before[1] >= 65536, before   # the read's bounce pages
    in_fstat, renewed = threading.Event(), threading.Event()
    real_fstat = os.fstat

    def fstat(fd, *a, **kw):
        if threading.current_thread() is reader and not in_fstat.is_set():
            in_fstat.set()
            renewed.wait(0.5)     # bounds what must not happen: the renewal closing the fd now
        return real_fstat(fd, *a, **kw)
    got = []
    reader = threading.Thread(target=lambda: got.append(_shadow(session)), name="stats")
    monkeypatch.setattr(os, "fstat", fstat)
    reader.start()
    assert in_fstat.wait(10), "the stats read never reached its fstat"
    rig.dev.renew_backend_side()                      # as the session thread does (recover_backend)
    renewed.set()
    reader.join(10)
    monkeypatch.undo()
    assert got == [before]
    assert _shadow(session)[1] < before[1]            # the new memfd holds no served bytes


@pytest.mark.parametrize("read", ["stats", "latency"])
def test_a_device_is_never_freed_under_a_stats_read(make_rig, monkeypatch, read):
    """The stats thread reads a queue's counters and histograms (Device.stats / latency, through
    proxy/stats.py) while the session thread may remove the device as its session ends. A read
    that has passed its check that the device lives must finish before the device is freed: it
    hands the C side the device's pointer. The removal is made to come exactly then (the read
    waits for it, at most 0.5 s); it must wait for the read, and the read must see the device
    whole."""
    import fastshadow.dataplane as dpmod
    rig = make_rig(num=NUM)
    serve_one_read(rig, 4096)
    name = {"stats": "fsdp_queue_stats", "latency": "fsdp_queue_hist"}[read]
    in_read, removed = threading.Event(), threading.Event()
    real_lib = dpmod.lib

    class PausingLib:
        def __getattr__(self, attr):
            fn = getattr(real_lib, attr)
            if attr != name or threading.current_thread() is not reader:
                return fn

            def paused(*a):
                in_read.set()
                removed.wait(0.5)       # bounds what must not happen: the removal freeing it now
                return fn(*a)
            return paused
    got = []
    reader = threading.Thread(target=lambda: got.append(getattr(rig.dev, read)(0)), name="stats")
    monkeypatch.setattr(dpmod, "lib", PausingLib())
    reader.start()
    assert in_read.wait(10), "the stats read never reached the data plane"
    remover = threading.Thread(target=rig.dp.remove_device, args=(rig.dev,), name="session")
    remover.start()
    remover.join(0.3)
    removed_first = not remover.is_alive()
    removed.set()
    reader.join(10)
    remover.join(10)
    monkeypatch.undo()
    assert not removed_first, "the device was freed while a stats read was inside the data plane"
    assert len(got) == 1
    if read == "stats":
        assert got[0].completed == 1
