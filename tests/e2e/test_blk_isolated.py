"""End-to-end isolation proof with real peers: a QEMU TCG guest (2 vCPUs,
vhost-user-blk with 2 queues) through `fastshadow proxy --mode isolated` to
qemu-storage-daemon (file export). The guest checker writes and verifies
16 MiB+ per boot from both queues, reboots once in the same QEMU run (device
reset and re-initialisation), and checks again.

Isolation is checked over the whole run (tests/e2e/isolation_watch.py): the
backend's /proc/PID/maps and /proc/PID/fd at each boot, while the checkers run,
must show fastshadow's shadow memfd and no guest RAM; and every fd fastshadow
sent the backend during the run (recorded on the backend socket) must be no
guest RAM memfd of QEMU's. The same checks in direct mode must see guest RAM
(so they can fail)."""

from __future__ import annotations

import pytest

from fastshadow.guest import GuestVM, run_check

from ..proxy.interposer import Interposer
from .isolation_watch import IsolationWatch

pytestmark = pytest.mark.vm

CHECK = {"fastshadow.check": "--total 8M --min 512 --max 1M", "fastshadow.queues": "2",
         "fastshadow.boots": "2"}


def run_guest(image, workdir, qsd, sock, watch: IsolationWatch):
    with GuestVM(image, blk_socket=sock, blk_num_queues=2, smp=2, cmdline=CHECK,
                 log_path=workdir / "console.log") as vm:
        vm.start()
        for boot in (1, 2):
            # The rings of this boot are live once its second checker reports its device.
            vm.wait_for(rf"FASTSHADOW-BOOT count={boot}\b", timeout=180, from_start=True)
            vm.wait_for(r"checker\[q1\]: device=", timeout=120)
            watch.check(f"boot {boot}", qsd.pid, vm.pid)
        vm.wait_for(r"\A", timeout=0, from_start=True)   # run_check reads the boots from the start
        result = run_check(vm, timeout=600)
    return result


@pytest.mark.parametrize("mode", ["isolated", "direct"])
def test_guest_io_and_backend_memory(mode, guest_image, workdir, start_qsd, start_proxy):
    qsd = start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", num_queues=2)
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"))
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                         "--mode", mode], [str(workdir / "fs.sock")])
    watch = IsolationWatch(rec)
    try:
        result = run_guest(guest_image, workdir, qsd, str(workdir / "fs.sock"), watch)
    finally:
        rec.close()
    assert result.passed, result.summary()
    assert [b.result for b in result.boots] == ["PASS", "PASS"]
    for boot in result.boots:
        assert {c.tag for c in boot.checks} == {"q0", "q1"}
        assert sum(c.written for c in boot.checks) >= 16 << 20
    print("\n".join(watch.lines()))
    if mode == "isolated":
        watch.assert_isolated(points=2)
        assert all(any("fastshadow-shadow:dev0" in m.path for m in rep.shadow_maps) for _, rep in watch.points)
        log = proxy.log()
        assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
    else:
        watch.assert_guest_ram_reached()
