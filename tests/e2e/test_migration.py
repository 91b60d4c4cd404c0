"""Live migration of a guest whose disk goes through isolated fastshadow proxies.

Two QEMU TCG guests (source, and target started with -incoming), each with
vhost-user-blk through its own isolated fastshadow device, each to its own
qemu-storage-daemon on one shared image. The migration is held in its
iterative phase (low bandwidth, 1 ms downtime) until its first pass over RAM
is done; only then does the host tell the guest (a flag in the image) to
fill its page cache from the disk. Every one of those pages is written by
fastshadow's data plane, not by a vCPU, after the first pass sent it, so it
reaches the target only if fastshadow marked it in QEMU's dirty log. After
the switch-over the guest re-reads the disk from its page cache on the
target: every checksum must equal the host's checksum of the image. Without
the logging the target holds stale pages (checked by hand: with logging
disabled the target guest's kernel locks up in filemap_read and this test
fails)."""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest

from fastshadow.guest import GuestVM
from fastshadow.guest.qmp import QMP
from fastshadow.isolation import check_isolation

pytestmark = pytest.mark.vm

DISK_BYTES = 32 << 20
MD5_LINE = re.compile(r"^([0-9a-f]{32})  /dev/vda\s*$", re.M)
FLAG = b"FASTSHADOW-MIGRATE-GO"
FLAG_BLOCK = DISK_BYTES // 4096 - 1
DROP = "echo 3 > /proc/sys/vm/drop_caches"
# Wait for the host's flag (read from the disk, caches dropped each time); then
# fill the page cache from the disk during the migration; the later reads
# (after a pause) hit the page cache, on the target by then.
GUEST_CMD = (f"until {DROP} && dd if=/dev/vda bs=4096 skip={FLAG_BLOCK} count=1 2>/dev/null | "
             f"grep -q {FLAG.decode()}; do sleep 1; done; {DROP}; md5sum /dev/vda; "
             "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 2; md5sum /dev/vda; done")


def migration_status(qmp: QMP) -> str:
    return qmp.command("query-migrate").get("status", "none")


def test_live_migration_through_isolated_proxies(guest_image, workdir, start_qsd, start_proxy):
    disk = workdir / "disk.img"
    data = bytearray(os.urandom(DISK_BYTES))
    data[FLAG_BLOCK * 4096:] = bytes(4096)
    disk.write_bytes(data)
    qsd_src = start_qsd(str(workdir / "qsd-src.sock"), disk=disk, locking=False)
    qsd_dst = start_qsd(str(workdir / "qsd-dst.sock"), disk=disk, locking=False)
    cfg = workdir / "proxy.toml"
    cfg.write_text("".join(
        f'[[device]]\nname = "{n}"\nlisten = "{workdir / (n + ".sock")}"\n'
        f'backend = "{workdir / ("qsd-" + n + ".sock")}"\nmode = "isolated"\n' for n in ("src", "dst")))
    proxy = start_proxy(["--config", str(cfg)], [str(workdir / "src.sock"), str(workdir / "dst.sock")])

    cmdline = {"fastshadow.cmd": GUEST_CMD}
    mig = workdir / "migrate.sock"
    with GuestVM(guest_image, blk_socket=workdir / "src.sock", cmdline=cmdline, log_path=workdir / "src.log",
                 extra_args=["-qmp", f"unix:{workdir / 'qmp-src.sock'},server=on,wait=off"]) as src, \
         GuestVM(guest_image, blk_socket=workdir / "dst.sock", cmdline=cmdline, log_path=workdir / "dst.log",
                 extra_args=["-qmp", f"unix:{workdir / 'qmp-dst.sock'},server=on,wait=off",
                             "-incoming", f"unix:{mig}"]) as dst:
        src.start()
        dst.start()
        src.wait_for("FASTSHADOW-GUEST READY", timeout=120)
        with QMP(workdir / "qmp-src.sock") as qmp:
            # The migration cannot converge: an idle guest dirties more than 8 KB per 1 ms.
            qmp.command("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "downtime-limit": 1})
            qmp.command("migrate", uri=f"unix:{mig}")
            deadline = time.monotonic() + 120
            while qmp.command("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 2:
                assert time.monotonic() < deadline, qmp.command("query-migrate")
                time.sleep(0.2)
            # The first pass is over: now the guest may fill its page cache.
            data[FLAG_BLOCK * 4096:FLAG_BLOCK * 4096 + len(FLAG)] = FLAG
            with open(disk, "r+b") as f:
                f.seek(FLAG_BLOCK * 4096)
                f.write(FLAG)
                os.fsync(f.fileno())
            want = hashlib.md5(data).hexdigest()
            src.wait_for(MD5_LINE, timeout=180)
            assert migration_status(qmp) == "active", "the disk was read before the migration, not during it"
            proxy.wait_log(r"migration\.logging dev=src on=True", timeout=5)
            qmp.command("migrate-set-parameters", **{"max-bandwidth": 4 << 30, "downtime-limit": 5000})
            deadline = time.monotonic() + 180
            while (status := migration_status(qmp)) not in ("completed", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"migration still {status}"
                time.sleep(0.2)
            assert status == "completed", qmp.command("query-migrate")
        dst.wait_for(r"FASTSHADOW-GUEST DONE boot=1 result=(\w+)", timeout=180)
        report = check_isolation(qsd_dst.pid, dst.pid)
        sums_src = MD5_LINE.findall(src.console)
        sums_dst = MD5_LINE.findall(dst.console)
        done = re.search(r"FASTSHADOW-GUEST DONE boot=1 result=(\w+)", dst.console)

    print(f"checksums: source {len(sums_src)}, target {len(sums_dst)}; host {want}")
    assert sums_src and sums_dst, "the guest must have read the disk on both sides of the switch-over"
    assert set(sums_src + sums_dst) == {want}, f"guest read {set(sums_src + sums_dst)}, the image is {want}"
    assert len(sums_src) + len(sums_dst) == 11 and done.group(1) == "PASS"
    # The source device logged the pages it wrote; the target never needed to.
    stats = [line for line in proxy.log().splitlines() if "vring.stats dev=src" in line]
    assert stats and int(re.search(r"log_pages=(\d+)", stats[-1]).group(1)) > 0, stats
    # The target backend, like the source one, never saw guest RAM.
    assert report.guest_inodes and report.isolated, "\n".join(report.lines())
