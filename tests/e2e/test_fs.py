"""virtio-fs with real peers: a QEMU TCG guest (vhost-user-fs-pci) through
`fastshadow proxy --device fs` to virtiofsd, in both modes.

The guest mounts the share, reads files the host wrote (one large, many
small, of sizes that straddle pages), copies them back onto the share, writes
a file of its own, and unmounts. The host then checks every byte: what the
guest read (its sha256 list), what it copied, what it wrote. virtio-fs chains
are FUSE requests (a readable header and arguments, writable reply buffers),
not block requests, so this is the data plane on a second device type.

Twice the guest waits for the host: once the share is mounted, and once it has
read, copied and written everything (the share still mounted). Each time the
isolation check runs against virtiofsd's whole process tree (it serves the
device from a sandboxed child), then the host lets the guest go on. Every fd
sent to virtiofsd is recorded on its socket and compared with QEMU's guest RAM
(tests/e2e/isolation_watch.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import re

import pytest

from fastshadow.guest import GuestVM, run_check
from fastshadow.guest.virtiofsd import Virtiofsd, find_virtiofsd

from ..proxy.interposer import Interposer
from .isolation_watch import IsolationWatch
from .virtiofs_guest import GUEST_CMD, guest_script

pytestmark = pytest.mark.vm

# The guest's reads and writes between the host's "go" and "go2" (virtiofs_guest.py).
GUEST_WORK = """\
cd /mnt/in
sha256sum * > /mnt/guest-read.sha
mkdir /mnt/out
cp * /mnt/out/
dd if=/dev/urandom of=/mnt/guest.bin bs=64k count=64 2>/dev/null
sha256sum /mnt/guest.bin > /mnt/guest-write.sha
"""


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_share(share) -> dict[str, str]:
    """Input files: 8 MiB, and 40 small ones of sizes around page and FUSE boundaries."""
    rng = random.Random(1234)
    (share / "in").mkdir(parents=True)
    sizes = {"big.bin": 8 << 20}
    for i, base in enumerate([1, 511, 4095, 4096, 4097, 65535, 65536, 131073, 262144 + 17, 1 << 20] * 4):
        sizes[f"f{i:02d}.bin"] = base + rng.randrange(0, 3)
    for name, size in sizes.items():
        (share / "in" / name).write_bytes(rng.randbytes(size))
    (share / "run.sh").write_text(guest_script(GUEST_WORK))
    return {name: sha256(share / "in" / name) for name in sizes}


@pytest.mark.parametrize("mode, iommu_platform", [("isolated", False), ("direct", False), ("isolated", True),
                                                   ("isolated", "intel"), ("isolated", "virtio")],
                         ids=["isolated", "direct", "isolated-iommu_platform", "isolated-intel-iommu",
                              "isolated-virtio-iommu"])
def test_virtiofs_through_proxy(mode, iommu_platform, request, workdir, start_proxy):
    """iommu_platform: VIRTIO_F_ACCESS_PLATFORM without a vIOMMU (issue 10): virtiofsd 7.2 offers
    no ACCESS_PLATFORM, isolated mode offers it to QEMU itself; "intel": with intel-iommu and a
    device IOTLB, fastshadow translating every IOVA (the guest in Linux's default lazy
    invalidation mode); "virtio": the same behind virtio-iommu-pci (no device IOTLB: QEMU turns
    the guest's unmaps into invalidations), the guest on the backports kernel."""
    if find_virtiofsd() is None:
        pytest.skip("virtiofsd is not installed (the README's test command installs qemu-system-common)")
    viommu_kind = iommu_platform if iommu_platform in ("intel", "virtio") else None
    guest_image = request.getfixturevalue("virtio_iommu_image" if viommu_kind == "virtio" else "guest_image")
    share = workdir / "share"
    want = make_share(share)
    with Virtiofsd(workdir / "vfs.sock", shared_dir=share, log_path=workdir / "virtiofsd.log") as vfs:
        rec = Interposer(str(workdir / "rec.sock"), str(workdir / "vfs.sock"))
        watch = IsolationWatch(rec)
        proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                             "--mode", mode, "--device", "fs"], [str(workdir / "fs.sock")])
        try:
            viommu = {"viommu": viommu_kind} if viommu_kind else {"iommu_platform": iommu_platform}
            cmdline = {"fastshadow.cmd": GUEST_CMD}
            with GuestVM(guest_image, fs_socket=workdir / "fs.sock", smp=2, cmdline=cmdline,
                         log_path=workdir / "console.log", **viommu) as vm:
                vm.start()
                vm.wait_for("^FS-MOUNTED", timeout=120)
                watch.check("share mounted", vfs.pid, vm.pid)
                (share / "go").touch()
                vm.wait_for("^FS-WRITTEN", timeout=240)
                watch.check("files read, copied and written", vfs.pid, vm.pid)
                (share / "go2").touch()
                result = run_check(vm, timeout=300)
        finally:
            rec.close()
        assert vfs.wait(10) is not None, "virtiofsd did not exit after the guest went away"
    assert result.passed, result.summary() + "\n" + vm.console[-3000:]
    assert "FS-UNMOUNTED" in vm.console
    if iommu_platform:
        # The guest's driver accepted VIRTIO_F_ACCESS_PLATFORM (bit 33; sysfs: a character per bit).
        fs = re.findall(r"^FASTSHADOW-VIRTIO \S+ device=0x001a features=([01]+) iommu=(\S+)", vm.console, re.M)
        assert fs and fs[0][0][33] == "1", vm.console[-3000:]
        # Behind a vIOMMU the guest put the device in a translated domain (lazy: DMA-FQ).
        assert fs[0][1] == ("DMA-FQ" if viommu_kind else "none"), vm.console[-3000:]
        # With the vIOMMU, QEMU passed the bit on and fastshadow translated every IOVA itself.
        assert ("iotlb.enabled" in proxy.log()) == bool(viommu_kind)
        assert "session.refused" not in proxy.log(), proxy.log()[-3000:]

    # What the guest read, copied and wrote, byte for byte.
    read = dict(reversed(line.split()) for line in (share / "guest-read.sha").read_text().splitlines())
    assert read == want
    assert {p.name: sha256(p) for p in (share / "out").iterdir()} == want
    wrote, name = (share / "guest-write.sha").read_text().split()
    assert name == "/mnt/guest.bin" and sha256(share / "guest.bin") == wrote
    assert os.path.getsize(share / "guest.bin") == 4 << 20

    print("\n".join(watch.lines()))
    log = proxy.log()
    assert all(len(rep.pids) >= 2 for _, rep in watch.points), \
        "virtiofsd serves from a sandboxed child: the check must cover it"
    if mode == "isolated":
        watch.assert_isolated(points=2)
        assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
        # The requests went through the data plane (the request queue is queue 1).
        served = [ln for ln in log.splitlines() if "vring.stats" in ln and "queue=1 " in ln]
        assert served and int(served[-1].split("requests=")[1].split()[0]) > 100, log[-3000:]
    else:
        watch.assert_guest_ram_reached()     # direct mode: the same witnesses see guest RAM
