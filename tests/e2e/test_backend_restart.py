"""The backend dies under a running guest and comes back (DESIGN §7), isolated mode.

A QEMU TCG guest runs the data checker on its vhost-user-blk disk through
`fastshadow proxy --mode isolated` to qemu-storage-daemon. In the middle of
the I/O, qemu-storage-daemon is killed with SIGKILL and a new one is started
on the same socket and image. fastshadow keeps the guest's requests, replays
the backend's setup to the new daemon and re-submits what was in flight:
the guest sees a delay, QEMU never notices (one session, no reconnect), and
every byte the checker wrote and read back is right.

The first daemon is throttled (a few requests per second): whenever it is killed
it holds requests, so the re-submission is always exercised, and asserted
(`backend.lost ... parked=N`, `backend.reconnected ... requeued=N`, N > 0).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

import pytest

from fastshadow.guest import GuestVM, run_check
from fastshadow.protocol.messages import FrontendReq

from ..proxy.interposer import Cutter, Interposer
from .isolation_watch import IsolationWatch

pytestmark = pytest.mark.vm

CHECK = {"fastshadow.check": "--total 96M --min 512 --max 256K", "fastshadow.queues": "2"}


@contextlib.contextmanager
def rec_closed(rec):
    try:
        yield rec
    finally:
        rec.close()


def wait_for_allocated(path, nbytes, timeout=60.0):
    """Wait until `nbytes` of the sparse image `path` are allocated (written by the backend)."""
    deadline = time.monotonic() + timeout
    while os.stat(path).st_blocks * 512 < nbytes:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: under {nbytes} bytes written by the backend after {timeout} s")
        time.sleep(0.01)


def test_backend_killed_and_restarted_mid_io(guest_image, workdir, start_qsd, start_proxy):
    qsd_sock = str(workdir / "qsd.sock")
    disk = workdir / "disk.img"
    # 4 IOPS: each request waits about 250 ms in the daemon, the guest resubmits within
    # milliseconds: both checkers' queues always have requests in the daemon.
    qsd = start_qsd(qsd_sock, disk=disk, num_queues=2, throttle_iops=4)
    # Every fd sent to either daemon is recorded (tests/e2e/isolation_watch.py).
    rec = Interposer(str(workdir / "rec.sock"), qsd_sock)
    watch = IsolationWatch(rec)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                         "--mode", "isolated", "--backend-timeout", "20"], [str(workdir / "fs.sock")])
    with rec_closed(rec), GuestVM(guest_image, blk_socket=str(workdir / "fs.sock"), blk_num_queues=2, smp=2,
                                  cmdline=CHECK, log_path=workdir / "console.log") as vm:
        vm.start()
        # Kill once the checkers' writes reach the image: I/O flows through the data plane,
        # and at 4 IOPS the 96 MiB check has minutes of it still to come.
        vm.wait_for(r"checker\[q1\]: device=", timeout=120)
        wait_for_allocated(disk, 256 << 10)
        assert "FASTSHADOW-CHECK" not in vm.console, "the checker finished before the kill: make it longer"
        watch.check("first daemon, before the kill", qsd.pid, vm.pid)
        os.kill(qsd.pid, signal.SIGKILL)
        lost = proxy.wait_log(r"backend\.lost dev=dev0", timeout=30)[0]
        time.sleep(0.5)                   # the guest keeps submitting while there is no backend
        qsd2 = start_qsd(qsd_sock, disk=disk, num_queues=2)     # not throttled: the check completes
        back = proxy.wait_log(r"backend\.reconnected dev=dev0", timeout=30)[0]
        watch.check("new daemon, after the reconnect", qsd2.pid, vm.pid)
        result = run_check(vm, timeout=600)
    assert result.passed, result.summary() + "\n" + vm.console[-3000:]
    assert sum(c.written for b in result.boots for c in b.checks) >= 128 << 20
    log = proxy.log()
    print("\n" + lost + "\n" + back)
    # Requests were in flight at the kill, kept by fastshadow, and re-submitted to the new daemon.
    parked = int(re.search(r" parked=(\d+)", lost).group(1))
    requeued = int(re.search(r" requeued=(\d+)", back).group(1))
    assert parked > 0 and requeued > 0, (lost, back)
    # QEMU never saw the backend go: one front-end connection, one session.
    assert log.count("qemu.connected dev=dev0") == 1 and log.count("session.start dev=dev0") == 1, log[-3000:]
    ends = [ln for ln in log.splitlines() if "session.end" in ln]
    assert len(ends) == 1 and 'reason="qemu closed the connection"' in ends[0], ends  # the guest's poweroff
    assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
    # Both daemons isolated, and no fd sent to either (two connections) was guest RAM.
    print("\n".join(watch.lines()))
    assert len(rec.seen) == 2, [len(c) for c in rec.seen]
    watch.assert_isolated(points=2)


@pytest.mark.parametrize("cut_at,when", [(FrontendReq.SET_VRING_KICK, "before"),
                                         (FrontendReq.GET_VRING_BASE, "after")],
                         ids=["ring-start", "ring-stop-at-reboot"])
def test_backend_dies_in_the_middle_of_a_request(cut_at, when, guest_image, workdir, start_qsd, start_proxy):
    """The backend's connection drops while QEMU waits on a request: when the first ring
    starts (the kick fd never reached the backend), or when the guest reboots and QEMU
    stops the rings (the backend stopped its ring, its answer is lost).  The guest checks
    its data in both boots; QEMU never notices (tests/proxy/interposer.py drops the connection
    in front of a real qemu-storage-daemon, which the proxy then reaches again)."""
    qsd_sock = str(workdir / "qsd.sock")
    qsd = start_qsd(qsd_sock, disk=workdir / "disk.img", num_queues=2)
    cutter = Cutter(str(workdir / "cut.sock"), qsd_sock, cut_at, when)
    watch = IsolationWatch(cutter)           # the cutter records every fd it forwards
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "cut.sock"),
                         "--mode", "isolated", "--backend-timeout", "20"], [str(workdir / "fs.sock")])
    check = {"fastshadow.check": "--total 8M --min 512 --max 256K", "fastshadow.queues": "2",
             "fastshadow.boots": "2"}
    try:
        with GuestVM(guest_image, blk_socket=str(workdir / "fs.sock"), blk_num_queues=2, smp=2, cmdline=check,
                     log_path=workdir / "console.log") as vm:
            vm.start()
            for boot in (1, 2):
                vm.wait_for(rf"FASTSHADOW-BOOT count={boot}\b", timeout=180, from_start=True)
                vm.wait_for(r"checker\[q1\]: device=", timeout=120)
                watch.check(f"boot {boot}", qsd.pid, vm.pid)
            vm.wait_for(r"\A", timeout=0, from_start=True)   # run_check reads the boots from the start
            result = run_check(vm, timeout=600)
    finally:
        cutter.close()
    assert cutter.cut.is_set(), f"QEMU never sent {cut_at.name}"
    assert result.passed, result.summary() + "\n" + vm.console[-3000:]
    assert [b.result for b in result.boots] == ["PASS", "PASS"]
    log = proxy.log()
    print("\n" + "\n".join(ln for ln in log.splitlines() if "backend." in ln or "request.retried" in ln))
    assert log.count("qemu.connected dev=dev0") == 1 and log.count("session.start dev=dev0") == 1, log[-3000:]
    assert log.count("backend.lost dev=dev0") == 1 and log.count("backend.reconnected dev=dev0") == 1, log[-3000:]
    # GET_VRING_BASE waits on the backend's answer, so the loss is seen there and the
    # request handled again.  QEMU asks no ack for SET_VRING_KICK: that loss is seen when
    # the socket reports EOF, between requests or at the next one, whichever comes first,
    # and the kick fd reaches the new backend in the replay.
    if cut_at == FrontendReq.GET_VRING_BASE:
        assert "request.retried dev=dev0 req=GET_VRING_BASE " in log, log[-3000:]
    assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
    # Isolated at each boot (one before or after the cut, one after), and over both connections.
    assert len(cutter.seen) == 2, [len(c) for c in cutter.seen]
    watch.assert_isolated(points=2)
