"""QEMU dies under a running guest (SIGKILL, mid I/O), isolated mode: fastshadow ends
that session, releases its guest memory and shadow, keeps serving, and a new QEMU on
the same socket and disk (the VM restarted) runs the data checker to PASS through the
same fastshadow process and the same qemu-storage-daemon, which maps no guest RAM.

The daemon is throttled (20 requests per second): whenever QEMU is killed, requests
are at the backend, and the test asserts that the session ended with them
(`vring.abandoned ... inflight=N`, N > 0) rather than hoping for it."""

from __future__ import annotations

import re

import pytest

from fastshadow.guest import GuestVM, run_check

from ..proxy.interposer import Interposer
from .isolation_watch import IsolationWatch
from .test_backend_restart import rec_closed, wait_for_allocated

pytestmark = pytest.mark.vm


def test_qemu_killed_mid_io_then_restarted(guest_image, workdir, start_qsd, start_proxy):
    disk = workdir / "disk.img"
    qsd = start_qsd(str(workdir / "qsd.sock"), disk=disk, num_queues=2, throttle_iops=20)
    sock = str(workdir / "fs.sock")
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"))   # records every fd sent to qsd
    watch = IsolationWatch(rec)
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "rec.sock"), "--mode", "isolated"], [sock])
    long_check = {"fastshadow.check": "--total 96M --min 512 --max 256K", "fastshadow.queues": "2"}
    with GuestVM(guest_image, blk_socket=sock, blk_num_queues=2, smp=2, cmdline=long_check,
                 log_path=workdir / "console1.log") as vm:
        vm.start()
        vm.wait_for(r"checker\[q1\]: device=", timeout=120)
        wait_for_allocated(disk, 2 << 20)      # the checkers' I/O is flowing
        assert "FASTSHADOW-CHECK" not in vm.console, "the checker finished before the kill: make it longer"
        watch.check("first QEMU, mid-I/O", qsd.pid, vm.pid)
        vm.kill()                              # SIGKILL: no ring stop, no goodbye
    proxy.wait_log(r"session\.end dev=dev0 reason=\"qemu closed the connection\"", timeout=30)
    proxy.wait_log(r"shadow\.freed dev=dev0")
    proxy.wait_log(r"device\.waiting dev=dev0")

    check = {"fastshadow.check": "--total 8M --min 512 --max 1M", "fastshadow.queues": "2"}
    with rec_closed(rec), GuestVM(guest_image, blk_socket=sock, blk_num_queues=2, smp=2, cmdline=check,
                                  log_path=workdir / "console2.log") as vm2:
        vm2.start()
        vm2.wait_for(r"checker\[q1\]: device=", timeout=120)
        watch.check("new QEMU", qsd.pid, vm2.pid)
        result = run_check(vm2, timeout=600)
    assert result.passed, result.summary() + "\n" + vm2.console[-3000:]
    print("\n".join(watch.lines()))
    watch.assert_isolated(points=2)           # both sessions' fds and both QEMUs' guest RAM
    log = proxy.log()
    print("\n" + "\n".join(ln for ln in log.splitlines() if "abandoned" in ln or "session." in ln))
    # The first session ended with requests in flight at the backend (what this test is about).
    abandoned = [int(n) for n in re.findall(r"vring\.abandoned dev=dev0 queue=\d+ inflight=(\d+)", log)]
    assert sum(abandoned) > 0, log[-3000:]
    assert log.count("session.start dev=dev0") == 2, log[-3000:]
    assert "session.crashed" not in log and "Traceback" not in log and "dataplane.refused" not in log, log[-3000:]
