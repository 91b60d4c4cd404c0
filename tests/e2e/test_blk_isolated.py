"""End-to-end isolation proof with real peers: a QEMU TCG guest (2 vCPUs,
vhost-user-blk with 2 queues) through `fastshadow proxy --mode isolated` to
qemu-storage-daemon (file export). The guest checker writes and verifies
16 MiB+ per boot from both queues, reboots once in the same QEMU run (device
reset and re-initialisation), and checks again. While the guest runs, the
backend's /proc/PID/maps and /proc/PID/fd must show fastshadow's shadow memfd
and no guest RAM; the same check in direct mode must show guest RAM (so the
check can fail)."""

from __future__ import annotations

import time

import pytest

from fastshadow.guest import GuestVM, run_check
from fastshadow.isolation import check_isolation

pytestmark = pytest.mark.vm

CHECK = {"fastshadow.check": "--total 8M --min 512 --max 1M", "fastshadow.queues": "2",
         "fastshadow.boots": "2"}


def run_guest(image, workdir, qsd, sock):
    with GuestVM(image, blk_socket=sock, blk_num_queues=2, smp=2, cmdline=CHECK,
                 log_path=workdir / "console.log") as vm:
        vm.start()
        vm.wait_for("FASTSHADOW-GUEST READY", timeout=120)
        time.sleep(0.5)  # rings are live and the checkers are running
        report = check_isolation(qsd.pid, vm.pid)
        result = run_check(vm, timeout=600)
    return report, result


@pytest.mark.parametrize("mode", ["isolated", "direct"])
def test_guest_io_and_backend_memory(mode, guest_image, workdir, start_qsd, start_proxy):
    qsd = start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", num_queues=2)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", mode], [str(workdir / "fs.sock")])
    report, result = run_guest(guest_image, workdir, qsd, str(workdir / "fs.sock"))
    assert result.passed, result.summary()
    assert [b.result for b in result.boots] == ["PASS", "PASS"]
    for boot in result.boots:
        assert {c.tag for c in boot.checks} == {"q0", "q1"}
        assert sum(c.written for c in boot.checks) >= 16 << 20
    print("\n".join(report.lines()))
    assert report.guest_inodes, "could not find QEMU's guest RAM memfd"
    if mode == "isolated":
        assert not report.guest_maps and not report.guest_fds, "\n".join(report.lines())
        assert any("fastshadow-shadow:dev0" in m.path for m in report.shadow_maps), "\n".join(report.lines())
        assert report.isolated
        log = proxy.log()
        assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
    else:
        assert report.guest_maps, "direct mode must show guest RAM in the backend (else the check proves nothing)"
        assert not report.isolated
