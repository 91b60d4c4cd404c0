"""End-to-end, real peers: a QEMU 7.2 TCG guest with vhost-user-blk-pci, through
`fastshadow proxy --mode direct`, to qemu-storage-daemon serving a file; the guest's
checker writes, reads back and compares data. The same guest straight against
qemu-storage-daemon is the control."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fastshadow.guest import GuestVM, run_check

pytestmark = pytest.mark.vm

CHECK = {"fastshadow.check": "--total 8M --min 512 --max 1M", "fastshadow.queues": "2",
         "fastshadow.boots": "1"}


def boot_and_check(image, sock, workdir, name, cmdline=CHECK, timeout=240):
    with GuestVM(image, blk_socket=sock, blk_num_queues=2, smp=2, cmdline=cmdline,
                 log_path=workdir / f"{name}-console.log") as vm:
        result = run_check(vm, timeout=timeout)
    assert result.passed, result.summary()
    return result


def test_control_guest_against_qsd_without_proxy(guest_image, workdir, start_qsd):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", num_queues=2)
    result = boot_and_check(guest_image, str(workdir / "qsd.sock"), workdir, "control")
    assert all(c.passed for b in result.boots for c in b.checks)
    assert len(result.boots[0].checks) == 2


def test_guest_through_direct_proxy(guest_image, workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", num_queues=2)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "direct", "--log-level", "debug"], [str(workdir / "fs.sock")])
    result = boot_and_check(guest_image, str(workdir / "fs.sock"), workdir, "direct")
    written = sum(c.written or 0 for b in result.boots for c in b.checks)
    assert written >= 16 << 20
    # QEMU's real session went through the proxy: memory table with fds, kicks, calls, the
    # back-end channel, and GET_VRING_BASE at shutdown.
    # (QEMU 7.2 sends the memory table as ADD_MEM_REG when the backend offers CONFIGURE_MEM_SLOTS.)
    for req in ("(SET_MEM_TABLE|ADD_MEM_REG)", "SET_VRING_KICK", "SET_VRING_CALL", "SET_BACKEND_REQ_FD",
                "GET_VRING_BASE"):
        proxy.wait_log(rf"dir=fastshadow->backend req={req} ")
    log = proxy.log()
    assert "session.start dev=dev0 mode=direct" in log
    assert "session.refused" not in log and "session.failed" not in log


@pytest.mark.parametrize("mode,extra", [("direct", []), ("isolated", ["--backend-reconnect", "off"]),
                                        ("isolated", [])], ids=["direct", "isolated-off", "isolated-auto"])
def test_backend_killed_under_connected_qemu(mode, extra, guest_image, workdir, start_qsd, start_proxy):
    """The backend dies and stays away: the session ends, the proxy keeps serving.

    With --backend-reconnect auto (isolated blk), fastshadow first waits for a
    new backend (here 1 s, --backend-timeout) before it gives up the session;
    test_backend_restart.py covers a backend that comes back in time."""
    qsd_sock = str(workdir / "qsd.sock")
    qsd = start_qsd(qsd_sock, disk=workdir / "disk.img", num_queues=1)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", qsd_sock, "--backend-timeout", "1",
                         "--mode", mode, *extra],
                        [str(workdir / "fs.sock")])
    # A guest that stays up (no checker, no power-off) with QEMU reconnecting.
    cmdline = {"fastshadow.cmd": "sleep 600"}
    with GuestVM(guest_image, blk_socket=str(workdir / "fs.sock"), cmdline=cmdline, reconnect=1,
                 log_path=workdir / "console.log") as vm:
        vm.start()
        vm.wait_for("FASTSHADOW-GUEST READY", timeout=120)
        proxy.wait_log("session.start dev=dev0")
        os.kill(qsd.pid, signal.SIGKILL)
        (end,) = proxy.wait_log(r'session.end dev=dev0 reason="backend closed the connection')
        if mode == "isolated" and not extra:
            proxy.wait_log(r"backend\.lost dev=dev0")
            assert "no backend came back" in end, end
        else:
            assert "backend.lost" not in proxy.log()
        # QEMU comes back (reconnect=1); with no backend the proxy says so and keeps serving.
        proxy.wait_log("backend.unavailable dev=dev0", timeout=30)
        assert proxy.alive()
        # The backend returns: QEMU's next reconnect gets a full new session.
        start_qsd(qsd_sock, disk=workdir / "disk.img", num_queues=1)
        proxy.wait_log("session.start dev=dev0", count=2, timeout=60)
        assert vm.returncode is None
    assert proxy.alive()
    if mode == "isolated":
        # The first session's shadow memory was freed before the second one made its own.
        assert proxy.log().count("shadow.freed dev=dev0") >= 1
