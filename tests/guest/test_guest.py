"""Tests of the test-guest tooling: the checker, the image builder, the QEMU
runner and the qemu-storage-daemon helper.  Everything runs for real (gcc,
apt, QEMU TCG, qemu-storage-daemon); nothing is mocked.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastshadow.guest import image as image_mod
from fastshadow.guest.image import GUEST_PROGRAMS, GuestImage, build_guest_image, compile_checker
from fastshadow.guest.qemu import GuestPanic, GuestVM, run_check
from fastshadow.guest.qsd import StorageDaemon, StorageDaemonError

MiB = 1 << 20


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def checker_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_checker(tmp_path_factory.mktemp("checker") / "checker")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    t0 = time.monotonic()
    image = build_guest_image()
    print(f"guest image ready in {time.monotonic() - t0:.1f}s: {image}")
    return image


def _disk(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"{path.parent} does not support O_DIRECT ({e}); the checker needs it")
    os.close(fd)
    return path


def _checker(checker_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(checker_bin), *args], capture_output=True, text=True, timeout=120)


def _markers(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FASTSHADOW-CHECK")]


# ------------------------------------------------------------- the checker


@pytest.mark.parametrize("name", sorted(GUEST_PROGRAMS))
def test_guest_programs_compile_without_warnings(tmp_path: Path, name: str) -> None:
    # a warning fails the compiler (-Werror), which compile_checker raises as GuestImageError
    out = compile_checker(tmp_path / name, extra_flags=["-Werror", "-Wshadow", "-Wformat=2"],
                          source=GUEST_PROGRAMS[name])
    assert out.read_bytes()[:4] == b"\x7fELF" and os.access(out, os.X_OK)


@pytest.mark.parametrize("region", [
    ("0", "64M"),            # whole file
    ("3584", "32M"),         # region start 512- but not 4 KiB-aligned
    ("1M", "1536K"),         # small region: heavy overlap of extents
])
def test_checker_passes_on_file(checker_bin: Path, tmp_path: Path, region: tuple[str, str]) -> None:
    disk = _disk(tmp_path / "disk.img")
    offset, length = region
    r = _checker(checker_bin, "--offset", offset, "--length", length, "--total", "8M",
                 "--min", "512", "--max", "1M", "--seed", "3", "--cpu", "0", "--tag", "h0", str(disk))
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = _markers(r.stdout)
    m = re.fullmatch(r"FASTSHADOW-CHECK PASS tag=h0 written=(\d+) ops=(\d+)", line)
    assert m, line
    assert int(m.group(1)) >= 8 * MiB and int(m.group(2)) > 32


def test_checker_detects_corruption(checker_bin: Path, tmp_path: Path) -> None:
    disk = _disk(tmp_path / "disk.img")
    r = _checker(checker_bin, "--total", "4M", "--min", "512", "--max", "64K", "--seed", "5",
                 "--tag", "c0", "--corrupt-after-write", str(disk))
    assert r.returncode == 1, r.stdout + r.stderr
    corrupted = re.search(r"corrupted byte at offset=(\d+)", r.stderr)
    assert corrupted, r.stderr
    (line,) = _markers(r.stdout)
    assert line.startswith("FASTSHADOW-CHECK FAIL tag=c0 phase=direct-readback ")
    assert f" offset={corrupted.group(1)} " in line
    exp, got = re.search(r"expected=0x([0-9a-f]{2}) got=0x([0-9a-f]{2})", line).groups()
    assert int(exp, 16) ^ int(got, 16) == 0x5A  # the hook's bit flip, nothing else


def test_checker_is_deterministic_per_seed_and_generation(checker_bin: Path, tmp_path: Path) -> None:
    """Same seed and generation: same bytes (a failure can be replayed); a new
    generation (the guest passes its boot count) writes different data, so
    stale data left by an earlier boot cannot pass as current."""
    args = ["--total", "2M", "--min", "512", "--max", "64K", "--seed", "9"]
    images = []
    for name, gen in (("a", "1"), ("b", "1"), ("c", "2")):
        disk = _disk(tmp_path / f"{name}.img", 8 * MiB)
        r = _checker(checker_bin, *args, "--gen", gen, str(disk))
        assert r.returncode == 0, r.stdout + r.stderr
        images.append(disk.read_bytes())
    assert images[0] == images[1]
    assert images[0] != images[2]


def test_checker_usage_errors_give_one_fail_marker(checker_bin: Path, tmp_path: Path) -> None:
    disk = _disk(tmp_path / "disk.img", 4 * MiB)
    for args in (["--min", "100"], ["--offset", "0", "--length", "8M"], ["--bogus"], []):
        r = _checker(checker_bin, "--tag", "u0", *args, *([str(disk)] if args else []))
        assert r.returncode == 1, (args, r.stdout)
        (line,) = _markers(r.stdout)
        assert line.startswith("FASTSHADOW-CHECK FAIL tag=u0 "), line


# ------------------------------------------------------------ the net checker


@pytest.fixture(scope="session")
def netcheck_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_checker(tmp_path_factory.mktemp("netcheck") / "netcheck", source=GUEST_PROGRAMS["netcheck"])


def _in_fresh_netns(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a new network namespace (only lo, nothing answers)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (unshare -n)")
    return subprocess.run(["unshare", "-n", "sh", "-ec", script], capture_output=True, text=True, timeout=60)


def test_netcheck_verifies_every_echo(netcheck_bin: Path) -> None:
    # The kernel's own echo replies on lo: every byte must come back.  (Small
    # windows: the kernel rate-limits ICMP to a burst of 50.)
    r = _in_fresh_netns(f"ip link set lo up; {netcheck_bin} --dst 127.0.0.1 --count 400 --window 8 "
                        f"--timeout-ms 200 --tag lo")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.fullmatch(r"FASTSHADOW-NET PASS tag=lo sent=400 received=400 bytes=(\d+) resent=\d+\n", r.stdout)
    assert m and int(m.group(1)) > 400 * 600, r.stdout


def test_netcheck_min_ms_holds_the_run_open(netcheck_bin: Path) -> None:
    # --min-ms keeps sending past --count until the time is up (a test that kills the
    # backend mid-traffic needs traffic to still run), and says when traffic flows.
    # (How long it ran is not asserted: no test asserts wall time. Sending past --count,
    # in full windows, is what --min-ms does.)
    r = _in_fresh_netns(f"ip link set lo up; {netcheck_bin} --dst 127.0.0.1 "
                        f"--count 4 --window 4 --min-ms 400 --timeout-ms 200 --tag lo")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "FASTSHADOW-NET FLOWING tag=lo received=4", r.stdout
    m = re.fullmatch(r"FASTSHADOW-NET PASS tag=lo sent=(\d+) received=(\d+) bytes=\d+ resent=\d+", lines[1])
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 4, r.stdout
    assert int(m.group(1)) % 4 == 0, r.stdout          # full windows past --count
    assert len(lines) == 2, r.stdout


def test_netcheck_fails_when_nothing_answers(netcheck_bin: Path) -> None:
    # A veth pair whose other end owns no address: ARP goes unanswered.
    script = (f"ip link add v0 type veth peer name v1; ip addr add 10.9.0.1/24 dev v0; "
              f"ip link set v1 up; ip link set v0 up; "
              f"{netcheck_bin} --dst 10.9.0.2 --count 4 --timeout-ms 50 --tag none")
    r = _in_fresh_netns(script)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("FASTSHADOW-NET FAIL tag=none seq 0: no reply after 3 tries"), r.stdout


def test_netcheck_usage_errors_give_one_fail_marker(netcheck_bin: Path) -> None:
    for args in ([], ["--dst", "not-an-ip"], ["--dst", "127.0.0.1", "--min", "100", "--max", "10"],
                 ["--dst", "127.0.0.1", "--max", "1473"], ["--bogus", "1"], ["--count"]):
        r = subprocess.run([str(netcheck_bin), *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 1, (args, r.stdout)
        assert r.stdout.startswith("FASTSHADOW-NET FAIL tag=net0 ") and r.stdout.count("\n") == 1, r.stdout


def test_checker_bootcount(checker_bin: Path, tmp_path: Path) -> None:
    disk = _disk(tmp_path / "disk.img", 1 * MiB)
    for n in (1, 2, 3):
        r = _checker(checker_bin, "--bootcount", str(disk))
        assert (r.returncode, r.stdout) == (0, f"FASTSHADOW-BOOT count={n}\n")
    data = bytearray(disk.read_bytes())
    assert data[-4096:-4096 + 8] == b"FSBOOT01" and data[:-4096] == bytes(len(data) - 4096)
    data[-4096 + 8] ^= 1  # damage the count: must be reported, not silently reset
    disk.write_bytes(bytes(data))
    r = _checker(checker_bin, "--bootcount", str(disk))
    assert r.returncode == 1 and r.stdout.startswith("FASTSHADOW-BOOT FAIL corrupted boot record")


# ------------------------------------------------------------ image builder


def test_image_is_cached_and_complete(guest_image: GuestImage, tmp_path: Path) -> None:
    again = build_guest_image(log=lambda msg: pytest.fail(f"rebuilt: {msg}"))   # any step logged fails
    assert again == guest_image
    assert guest_image.kernel_version.startswith("6.1.0-") and guest_image.kernel_version.endswith("-amd64")
    manifest = json.loads((guest_image.kernel.parent / "manifest.json").read_text())
    order = manifest["modules"]
    for before, after in [("virtio_ring", "virtio"), ("virtio", "virtio_pci"),
                          ("virtio_pci_modern_dev", "virtio_pci"), ("virtio", "virtio_blk"),
                          ("fuse", "virtiofs"), ("failover", "net_failover"),
                          ("net_failover", "virtio_net")]:
        assert order.index(before) < order.index(after)
    # The system cpio must read our hand-written newc archive.
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=gzip.decompress(guest_image.initrd.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()
    for entry in ["init", "checker", "bin/busybox", "bin/sh", "sbin/insmod", "dev/console",
                  "lib/modules/order", "lib/modules/virtio_blk.ko", "lib/modules/virtiofs.ko"]:
        assert entry in listing, entry


def test_image_key_tracks_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    busybox = image_mod._find_busybox()
    key = image_mod._image_key("linux-image-x", "1", busybox)
    assert image_mod._image_key("linux-image-x", "1", busybox) == key
    assert image_mod._image_key("linux-image-x", "2", busybox) != key
    init = tmp_path / "init.sh"
    init.write_text(image_mod.INIT_SOURCE.read_text() + "# changed\n")
    monkeypatch.setattr(image_mod, "INIT_SOURCE", init)
    key2 = image_mod._image_key("linux-image-x", "1", busybox)
    assert key2 != key
    net = tmp_path / "netcheck.c"
    net.write_text(image_mod.NETCHECK_SOURCE.read_text() + "/* changed */\n")
    monkeypatch.setitem(image_mod.GUEST_PROGRAMS, "netcheck", net)
    assert image_mod._image_key("linux-image-x", "1", busybox) not in (key, key2)


def test_concurrent_builds_share_one_image(tmp_path: Path, guest_image: GuestImage) -> None:
    """Two builders racing on an empty cache: one builds, the other waits and
    reuses the result; no temporary directory is left behind."""
    manifest = json.loads((guest_image.kernel.parent / "manifest.json").read_text())
    debs = tmp_path / "cache" / "guest" / "debs"
    debs.mkdir(parents=True)
    # Seed the new cache with the already downloaded package: no second download.
    deb = image_mod._deb_filename(manifest["kernel_package"], manifest["kernel_package_version"])
    os.link(image_mod.default_cache_dir() / "guest" / "debs" / deb, debs / deb)
    code = ("import sys; from fastshadow.guest.image import build_guest_image; "
            "print(build_guest_image(sys.argv[1], log=lambda m: None).initrd)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    entries = sorted(p.name for p in (tmp_path / "cache" / "guest").iterdir())
    assert [e for e in entries if e.startswith("image-")] == [guest_image.kernel.parent.name]
    assert not [e for e in entries if e.startswith(".tmp-")]
    assert Path(outs[0][0].strip()).read_bytes() == guest_image.initrd.read_bytes()  # reproducible


# ---------------------------------------------------------- qemu-storage-daemon


def test_kernel_package_pinned_by_the_meta_package() -> None:
    """The image package `apt-cache show linux-image-amd64` pins, as apt prints it here: the
    release's kernel, and the backports one (its ABI name ends +deb12, not -N)."""
    assert image_mod.parse_kernel_depends(
        "Package: linux-image-amd64\nVersion: 6.1.192-3\nDepends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\n"
    ) == ("linux-image-6.1.0-57-amd64", "6.1.192-3")
    assert image_mod.parse_kernel_depends(
        "Package: linux-image-amd64\nVersion: 6.12.95-1~bpo12+1\n"
        "Depends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)\n"
    ) == ("linux-image-6.12.95+deb12-amd64", "6.12.95-1~bpo12+1")
    # Not the meta package itself, nor a depends without an exact version.
    assert image_mod.parse_kernel_depends("Depends: linux-image-amd64 (= 6.1.192-3)\n") is None
    assert image_mod.parse_kernel_depends("Depends: linux-image-6.1.0-57-amd64\n") is None


def test_kernel_config_check(tmp_path: Path) -> None:
    """The virtio-iommu guest's kernel needs the driver (module or built in) and ACPI VIOT."""
    config = tmp_path / "config-6.1.0-57-amd64"
    config.write_text("CONFIG_VIRTIO=m\n# CONFIG_VIRTIO_IOMMU is not set\nCONFIG_INTEL_IOMMU=y\n")
    assert image_mod._kernel_config_lacks(config, image_mod.VIRTIO_IOMMU_CONFIG) == [
        "CONFIG_VIRTIO_IOMMU", "CONFIG_ACPI_VIOT"]
    config.write_text("CONFIG_ACPI_VIOT=y\nCONFIG_VIRTIO_IOMMU=m\n")
    assert image_mod._kernel_config_lacks(config, image_mod.VIRTIO_IOMMU_CONFIG) == []
    assert image_mod._kernel_config_lacks(tmp_path / "absent", ["CONFIG_ACPI_VIOT"]) == ["CONFIG_ACPI_VIOT"]


def test_virtio_iommu_image(virtio_iommu_image: GuestImage, guest_image: GuestImage) -> None:
    """The guest behind a virtio-iommu: an image of its own (another kernel, in the cache
    beside the default one), with virtio_iommu loaded before the disk's drivers, and cached."""
    assert virtio_iommu_image.kernel.parent != guest_image.kernel.parent
    assert virtio_iommu_image.kernel_version != guest_image.kernel_version
    manifest = json.loads((virtio_iommu_image.kernel.parent / "manifest.json").read_text())
    assert "~bpo" in manifest["kernel_package_version"]
    order = manifest["modules"]
    # virtio_pci and virtio are built into the backports kernel (then not in the list).
    for driver in ("virtio_pci", "virtio_blk"):
        if driver in order:
            assert order.index("virtio_iommu") < order.index(driver), order
    assert "virtio_blk" in order
    listing = subprocess.run(["cpio", "-it", "--quiet"],
                             input=gzip.decompress(virtio_iommu_image.initrd.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()
    assert "lib/modules/virtio_iommu.ko" in listing and "lib/modules/virtio_blk.ko" in listing
    again = build_guest_image(log=lambda msg: pytest.fail(f"rebuilt: {msg}"), virtio_iommu=True)
    assert again == virtio_iommu_image


def test_storage_daemon_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(StorageDaemonError, match="not found"):
        StorageDaemon(tmp_path / "s.sock", driver="null", binary="no-such-qemu-storage-daemon").start()


def test_storage_daemon_null_starts_and_stops(tmp_path: Path) -> None:
    sock = tmp_path / "null.sock"
    with StorageDaemon(sock, driver="null", size="16M", num_queues=2) as qsd:
        assert qsd.pid and sock.is_socket() and qsd.returncode is None
        pid = qsd.pid
    assert qsd.returncode is not None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


# ------------------------------------------------------------------ QEMU guests


def test_qemu_command_line(guest_image: GuestImage) -> None:
    vm = GuestVM(guest_image, blk_socket="/run/x.sock", blk_num_queues=2, smp=2, mem_mb=512,
                 reconnect=1, cmdline={"fastshadow.check": "--total 8M", "fastshadow.boots": "2",
                                       "quiet": None}, extra_args=["-cpu", "max"])
    argv = vm.command
    joined = " ".join(argv)
    for part in ("-accel tcg", "-nodefaults", "-no-user-config", "-display none", "-m 512M",
                 "memory-backend-memfd,id=mem,size=512M,share=on", "-numa node,memdev=mem",
                 "-smp 2", "socket,id=blk0,path=/run/x.sock,reconnect=1",
                 "vhost-user-blk-pci,chardev=blk0,num-queues=2"):
        assert part in joined, part
    assert argv[-2:] == ["-cpu", "max"] and "-no-reboot" not in argv
    append = argv[argv.index("-append") + 1]
    assert append == 'console=ttyS0 panic=-1 fastshadow.check="--total 8M" fastshadow.boots=2 quiet'
    with pytest.raises(ValueError):
        GuestVM(guest_image, cmdline={"fastshadow.cmd": 'echo "x"'}).command


def test_qemu_command_line_virtio_iommu(guest_image: GuestImage) -> None:
    """viommu="virtio": the IOMMU is created before the disk (a PCI device realized before it
    would not sit behind it), the disk is modern-only with iommu_platform=on and no ATS (the
    virtio-iommu has no device IOTLB), and the guest gets no intel_iommu=on."""
    argv = GuestVM(guest_image, blk_socket="/run/x.sock", viommu="virtio").command
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices == ["virtio-iommu-pci",
                       "vhost-user-blk-pci,chardev=blk0,num-queues=1,iommu_platform=on,disable-legacy=on"]
    assert argv[argv.index("-M") + 1] == "q35"
    append = argv[argv.index("-append") + 1]
    assert "intel_iommu" not in append and "deferred_probe_timeout=120" in append.split()
    with pytest.raises(ValueError):
        GuestVM(guest_image, viommu="smmuv3")



@pytest.mark.vm
def test_guest_boots_and_powers_off(guest_image: GuestImage, tmp_path: Path) -> None:
    with GuestVM(guest_image, log_path=tmp_path / "console.log") as vm:
        t0 = time.monotonic()
        vm.start()
        vm.wait_for(r"^FASTSHADOW-GUEST READY$", 60)
        m = vm.wait_for(r"FASTSHADOW-GUEST DONE boot=(\d+) result=(\w+)", 30)
        assert m.groups() == ("1", "PASS")
        assert vm.wait_exit(30) == 0
        print(f"boot to poweroff: {time.monotonic() - t0:.1f}s")
    assert "-no-reboot" not in vm.command
    assert "Run /init as init process" in (tmp_path / "console.log").read_text()


@pytest.mark.vm
def test_guest_command_failure_is_reported(guest_image: GuestImage) -> None:
    with GuestVM(guest_image, cmdline={"fastshadow.cmd": "echo hello from cmd; exit 3"}) as vm:
        result = run_check(vm, timeout=90)
    assert "hello from cmd" in result.console
    assert not result.passed
    (boot,) = result.boots
    assert (boot.result, boot.reason) == ("FAIL", "cmd_exit_3")


@pytest.mark.vm
def test_guest_check_failure_stops_the_run(guest_image: GuestImage, tmp_path: Path) -> None:
    """A checker FAIL inside the guest ends the run (no further boots) and is reported."""
    disk = _disk(tmp_path / "disk.img", 16 * MiB)
    with StorageDaemon(tmp_path / "blk.sock", disk=disk) as qsd:
        with GuestVM(guest_image, blk_socket=str(qsd.socket_path),
                     cmdline={"fastshadow.check": "--total 2M --max 64K --corrupt-after-write",
                              "fastshadow.boots": "2"}) as vm:
            result = run_check(vm, timeout=90)
    assert not result.passed
    (boot,) = result.boots
    assert (boot.boot, boot.result) == (1, "FAIL")
    (check,) = boot.checks
    corrupted = re.search(r"corrupted byte at offset=(\d+)", result.console).group(1)
    assert not check.passed and f" offset={corrupted} " in check.line
    assert any("only 1 of 2 boots" in f for f in result.failures())
    assert result.exit_code == 0


@pytest.mark.vm
def test_guest_kernel_panic_fails_fast(guest_image: GuestImage) -> None:
    # No /init to run and no root device: the kernel panics, and with panic=-1
    # would reboot forever; the runner must notice and stop.
    # (Fast: the runner raises GuestPanic on the panic line; without noticing it, wait_for
    # would end in its 90 s timeout with another error, and pytest.raises would fail.)
    with GuestVM(guest_image, cmdline={"rdinit": "/no-such-init"}) as vm:
        vm.start()
        with pytest.raises(GuestPanic, match="Kernel panic"):
            vm.wait_for("FASTSHADOW-GUEST READY", 90)
        vm.kill()
        assert vm.returncode is not None


@pytest.mark.vm
def test_guest_blk_two_queues_two_boots(guest_image: GuestImage, tmp_path: Path) -> None:
    """The data check through qemu-storage-daemon's vhost-user-blk, 2 queues, 2 boots."""
    disk = _disk(tmp_path / "disk.img")
    t0 = time.monotonic()
    with StorageDaemon(tmp_path / "blk.sock", disk=disk, num_queues=2,
                       log_path=tmp_path / "qsd.log") as qsd:
        with GuestVM(guest_image, blk_socket=str(qsd.socket_path), blk_num_queues=2, smp=2,
                     log_path=tmp_path / "console.log",
                     cmdline={"fastshadow.queues": "2",
                              "fastshadow.check": "--total 8M --min 512 --max 1M",
                              "fastshadow.boots": "2"}) as vm:
            vm.start()
            result = run_check(vm, timeout=150)
        assert qsd.returncode is None, qsd.output  # the backend survived both boots
    print(f"two boots with checks: {time.monotonic() - t0:.1f}s\n{result.summary()}")
    result.assert_passed()
    assert [b.boot for b in result.boots] == [1, 2]
    assert [b.bootcount for b in result.boots] == [1, 2]
    for b in result.boots:
        assert sorted(c.tag for c in b.checks) == ["q0", "q1"]
        assert all(c.written is not None and c.written >= 8 * MiB for c in b.checks)
    # Both blk-mq queues were set up (and so both pinned checkers had their own).
    assert re.search(r"virtio_blk virtio\d+: 2/0/0 default/read/poll queues", result.console)
