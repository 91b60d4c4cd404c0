"""VIRTIO_F_ACCESS_PLATFORM through isolated mode, with real peers (issue 10).

qemu-storage-daemon 7.2 offers no ACCESS_PLATFORM, so QEMU alone refuses
`iommu_platform=on` ("iommu_platform=true is not supported by the device").
In isolated mode fastshadow's data plane is the one that touches guest
memory: it offers the bit to QEMU itself and the backend keeps its plain
shadow ring. Each test boots a real QEMU TCG guest, checks every byte the
guest wrote and read, and checks the backend mapped no guest RAM
(tests/e2e/isolation_watch.py).

- no vIOMMU (the confidential-guest case): addresses stay guest-physical;
- q35 + intel-iommu with device-iotlb=on and ats=on: addresses are IOVAs, fastshadow
  keeps the device IOTLB itself (tests/proxy/test_iotlb.py tests it at the protocol level);
- q35 + virtio-iommu-pci, the paravirtual IOMMU: no device IOTLB, so QEMU 7.2's vhost
  takes the IOMMU's unmap notifications instead (vhost_iommu_region_add falls back to
  IOMMU_NOTIFIER_UNMAP), split into power-of-two ranges as large as the guest's unmaps
  (virtio_iommu_notify_map_unmap); the guest runs the backports kernel
  (build_guest_image(virtio_iommu=True): Debian 12's own has no virtio-iommu driver).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from fastshadow.guest import GuestVM, run_check

from ..proxy.interposer import Interposer
from .isolation_watch import IsolationWatch

pytestmark = pytest.mark.vm

CHECK = {"fastshadow.check": "--total 8M --min 512 --max 1M", "fastshadow.queues": "2"}


def run_blk(guest_image, workdir, start_qsd, start_proxy, extra_cmdline=None, *, guest_iommu: str,
            proxy_args=(), **vm_options):
    """One boot, two queues of checked I/O through the isolated proxy; returns (result, proxy log).
    guest_iommu: the IOMMU domain type the guest must have put the disk in (init.sh), "none"
    without an IOMMU: a guest that silently drove the disk untranslated must not pass."""
    qsd = start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", num_queues=2)
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"))
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                         "--mode", "isolated", *proxy_args], [str(workdir / "fs.sock")])
    watch = IsolationWatch(rec)
    try:
        with GuestVM(guest_image, blk_socket=str(workdir / "fs.sock"), blk_num_queues=2, smp=2,
                     cmdline={**CHECK, **(extra_cmdline or {})},
                     log_path=workdir / "console.log", **vm_options) as vm:
            vm.start()
            vm.wait_for(r"checker\[q1\]: device=", timeout=300)
            watch.check("checkers running", qsd.pid, vm.pid)
            result = run_check(vm, timeout=600)
            console = vm.console
    finally:
        rec.close()
    assert result.passed, result.summary() + "\n" + vm.console[-3000:]
    assert {c.tag for c in result.boots[0].checks} == {"q0", "q1"}
    assert sum(c.written for c in result.boots[0].checks) >= 16 << 20
    print("\n".join(watch.lines()))
    watch.assert_isolated(points=1)
    log = proxy.log()
    assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
    features, iommu = guest_virtio_line(console, "0x0002")
    # The guest's driver accepted VIRTIO_F_ACCESS_PLATFORM (bit 33; sysfs: one character per bit).
    assert features[33] == "1"
    assert iommu == guest_iommu, console[-3000:]
    return result, log


def guest_virtio_line(console: str, device_id: str) -> tuple[str, str]:
    """(features, IOMMU domain type) of the guest's virtio device `device_id` (init.sh)."""
    found = re.findall(rf"^FASTSHADOW-VIRTIO \S+ device={device_id} features=([01]+) iommu=(\S+)",
                       console, re.M)
    assert found, console[-3000:]
    return found[0]


def test_qemu_refuses_iommu_platform_with_qsd_alone(guest_image, workdir, start_qsd):
    """The witness that the feature comes from fastshadow: QEMU 7.2 against qemu-storage-daemon
    itself refuses iommu_platform=on (the backend offers no ACCESS_PLATFORM)."""
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", num_queues=1)
    vm = GuestVM(guest_image, blk_socket=str(workdir / "qsd.sock"), iommu_platform=True)
    proc = subprocess.run(vm.command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "iommu_platform=true is not supported by the device" in proc.stderr, proc.stderr


def test_blk_iommu_platform_without_viommu(guest_image, workdir, start_qsd, start_proxy):
    """iommu_platform=on, no vIOMMU: QEMU starts (it refuses with qsd alone) and the guest's I/O
    is checked byte for byte; the backend's features never include ACCESS_PLATFORM."""
    _, log = run_blk(guest_image, workdir, start_qsd, start_proxy, iommu_platform=True, guest_iommu="none")
    # No vIOMMU: QEMU keeps the bit from the vhost device (vhost_dev_set_features) and sends no
    # IOTLB traffic; addresses are guest-physical and the backend's features never had it.
    assert "IOTLB" not in log


@pytest.mark.parametrize("strict", [False, True], ids=["lazy", "strict"])
def test_blk_intel_iommu(strict, guest_image, workdir, start_qsd, start_proxy):
    """q35 + intel-iommu with a device IOTLB, the guest with intel_iommu=on: every ring and
    descriptor address fastshadow sees is an IOVA, translated through its own IOTLB (QEMU's
    updates, answers to fastshadow's misses, and invalidations); qemu-storage-daemon sees a
    plain shadow ring. Both of Linux's invalidation policies: lazy (its default: the
    invalidation of an unmapped IOVA comes late, or through QEMU 7.2 not at all, so
    fastshadow forgets a request's translations when it completes) and strict."""
    result, log = run_blk(guest_image, workdir, start_qsd, start_proxy, viommu="intel",
                          extra_cmdline={"iommu.strict": "1" if strict else "0"},
                          guest_iommu="DMA" if strict else "DMA-FQ")
    assert "iotlb.enabled" in log
    assert "iotlb.miss_unanswered" not in log, log[-3000:]


@pytest.mark.parametrize("keep", [False, True], ids=["forget-completed", "keep-completed"])
def test_blk_virtio_iommu(keep, virtio_iommu_image, workdir, start_qsd, start_proxy):
    """q35 + virtio-iommu-pci, the guest in Linux's default lazy mode: every address fastshadow
    sees is an IOVA; QEMU answers its misses from the guest's MAP requests and turns the
    guest's UNMAP requests into invalidations (no device IOTLB). qemu-storage-daemon sees a
    plain shadow ring. The proxy logs at debug level, one line per IOTLB message: that is
    how the test sees the invalidations arrive.

    keep-completed (--iotlb-keep-completed): fastshadow keeps translations until QEMU
    invalidates them, which is right only if the invalidation of an unmapped IOVA arrives
    before the guest maps that IOVA again: with virtio-iommu Linux sends its UNMAP requests
    before its flush queue frees the IOVAs, so the data check holds."""
    args = ["--log-level", "debug"] + (["--iotlb-keep-completed"] if keep else [])
    _, log = run_blk(virtio_iommu_image, workdir, start_qsd, start_proxy, viommu="virtio",
                     guest_iommu="DMA-FQ", proxy_args=args)
    assert "iotlb.enabled" in log
    assert "iotlb.miss_unanswered" not in log, log[-3000:]
    updates = re.findall(r"iotlb\.update .*?iova=(0x[0-9a-f]+)", log)
    invalidations = re.findall(r"iotlb\.invalidate .*?iova=(0x[0-9a-f]+) size=(\d+)", log)
    # The guest's unmaps reached fastshadow as invalidations (QEMU 7.2's vhost takes virtio-iommu's
    # unmap notifications: nothing else would send any here).
    assert invalidations, log[-3000:]
    # IOVAs, not guest-physical addresses: Linux hands out IOVAs from the top of the 32-bit
    # space down, the guest's RAM (256 MiB) sits at the bottom.
    assert any(int(iova, 16) >= 1 << 28 for iova in updates), updates[:20]
    print(f"{len(updates)} updates, {len(invalidations)} invalidations, sizes "
          f"{sorted({int(n) for _, n in invalidations})[:12]}")
