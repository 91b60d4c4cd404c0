"""Daemon basics and QEMU's backend program conventions: a clean, quick exit on SIGINT and
SIGTERM (with or without stats), SIGHUP ignored, ISO-8601 timestamps, isolated by default,
--print-capabilities, and the descriptors `fastshadow install-descriptors` writes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ..proxy.blkfront import BlkFront

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("stats", [True, False])
def test_signal_ends_the_proxy_cleanly(workdir, start_proxy, sig, stats):
    sock = str(workdir / "fs.sock")
    extra = ["--stats-interval", "0.1", "--stats-file", str(workdir / "stats.json")] if stats else []
    p = start_proxy(["--mode", "direct", "--listen", sock, "--backend", str(workdir / "b.sock"), *extra], [sock])
    if stats:
        p.wait_log(r"info stats dev=dev0")
    p.proc.send_signal(sig)
    assert p.proc.wait(10) == 0
    log = p.log()
    assert "Traceback" not in log and f"proxy.stopping signal={sig.name}" in log and "proxy.stopped" in log
    assert not os.path.exists(sock) and not os.path.exists(sock + ".lock")


def test_sigterm_mid_session_is_quick(workdir, start_qsd, start_proxy):
    """QEMU's conventions: end as quickly as possible on SIGTERM, here with an isolated
    session running and the stats thread on."""
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    sock = str(workdir / "fs.sock")
    p = start_proxy(["--listen", sock, "--backend", str(workdir / "qsd.sock"), "--stats-interval", "0.2"], [sock])
    with BlkFront(sock) as blk:
        blk.bring_up()
        blk.write(0, b"z" * 4096)
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0     # exits (0) with the session running, no waiting for it to end
    assert "Traceback" not in p.log() and not os.path.exists(sock)


def test_sighup_is_ignored(workdir, start_proxy):
    sock = str(workdir / "fs.sock")
    p = start_proxy(["--mode", "direct", "--listen", sock, "--backend", str(workdir / "b.sock")], [sock])
    p.proc.send_signal(signal.SIGHUP)
    p.wait_log(r"info signal\.ignored signal=SIGHUP")
    time.sleep(0.2)
    assert p.alive() and os.path.exists(sock)
    assert p.stop() == 0


def test_log_lines_have_iso_timestamps_and_isolated_is_the_default(workdir, start_proxy):
    sock = str(workdir / "fs.sock")
    p = start_proxy(["--listen", sock, "--backend", str(workdir / "b.sock")], [sock])
    [line] = p.wait_log(r"device\.listening")
    assert re.match(rf"{ISO} info device\.listening dev=dev0 listen={sock} .* mode=isolated device=blk$", line), line


def test_help_says_isolated_is_the_default():
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "proxy", "--help"], capture_output=True, text=True,
                       timeout=60)
    text = " ".join(r.stdout.split())
    assert "isolated (default): the backend sees only a shadow region" in text
    assert "direct: forward everything, guest RAM fds included (for baselines and tracing)" in text


@pytest.mark.parametrize("device,qemu_type", [("blk", "block"), ("fs", "fs"), ("net", "net"), ("scsi", "scsi"),
                                              ("vsock", "vsock")])
def test_print_capabilities(device, qemu_type):
    """docs/interop/vhost-user.rst: the capabilities JSON on stdout, exit 0, every other option
    ignored (here one fastshadow does not know, as libvirt may pass a backend's own)."""
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "proxy", "--device", device, "--print-capabilities",
                        "--socket-path=/nonexistent/x.sock", "--thread-pool-size=4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads(r.stdout) == {"type": qemu_type, "features": []}


def test_install_descriptors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "install-descriptors", str(tmp_path / "d"),
                        "--launcher-dir", str(tmp_path / "bin"), "--device", "blk",
                        "--proxy-args", "--backend /run/qsd/disk0.sock --socket-group kvm"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "install-descriptors", str(tmp_path / "d"),
                        "--launcher-dir", str(tmp_path / "bin"), "--device", "fs", "--virtiofsd", "/bin/true",
                        "--proxy-args", "--backend-user fs-backend --backend-userns"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    blk = json.loads((tmp_path / "d" / "50-fastshadow-blk.json").read_text())
    launcher = tmp_path / "bin" / "fastshadow-vhost-user-blk"
    assert blk == {"description": "fastshadow: virtio-blk with guest RAM kept away from the backend (isolated proxy)",
                   "type": "block", "binary": str(launcher), "tags": ["fastshadow", "isolated"]}
    assert json.loads((tmp_path / "d" / "50-fastshadow-fs.json").read_text())["type"] == "fs"
    assert os.access(launcher, os.X_OK)
    assert "proxy --device blk --backend /run/qsd/disk0.sock --socket-group kvm \"$@\"" in launcher.read_text()
    # What QEMU or libvirt runs first: the binary with --print-capabilities.
    caps = subprocess.run([str(launcher), "--print-capabilities"], capture_output=True, text=True, timeout=60)
    assert caps.returncode == 0 and json.loads(caps.stdout) == {"type": "block", "features": []}
    # Installed once: a second run refuses to overwrite, in one line.
    again = subprocess.run([sys.executable, "-m", "fastshadow.cli", "install-descriptors", str(tmp_path / "d"),
                            "--launcher-dir", str(tmp_path / "bin"), "--device", "blk"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr
    # libvirt runs the fs descriptor's binary with virtiofsd's options: fastshadow run in front
    # of virtiofsd (here /bin/true), and --backend makes no sense for it.
    fs_launcher = (tmp_path / "bin" / "fastshadow-vhost-user-fs").read_text()
    assert "run --device fs --backend-user fs-backend --backend-userns -- /bin/true \"$@\"" in fs_launcher, fs_launcher
    caps = subprocess.run([str(tmp_path / "bin" / "fastshadow-vhost-user-fs"), "--print-capabilities"],
                          capture_output=True, text=True, timeout=60)
    assert caps.returncode == 0 and json.loads(caps.stdout) == {"type": "fs", "features": []}
    mixed = subprocess.run([sys.executable, "-m", "fastshadow.cli", "install-descriptors", str(tmp_path / "m"),
                            "--device", "fs", "--proxy-args", "--backend /run/qsd/disk0.sock"],
                           capture_output=True, text=True, timeout=60)
    assert mixed.returncode == 2 and len(mixed.stderr.strip().splitlines()) == 1, mixed.stderr
    assert "not --backend" in mixed.stderr
    gpu = subprocess.run([sys.executable, "-m", "fastshadow.cli", "install-descriptors", str(tmp_path / "g"),
                          "--device", "gpu"], capture_output=True, text=True, timeout=60)
    assert gpu.returncode == 2 and "isolated mode cannot serve it" in gpu.stderr


@pytest.mark.parametrize("device", ["gpu", "balloon"])
def test_print_capabilities_of_a_type_isolated_mode_refuses(device):
    """QEMU must not be told a type can be served that every isolated session would then
    refuse (found by a new user's trial: gpu was advertised); --mode direct serves it."""
    cmd = [sys.executable, "-m", "fastshadow.cli", "proxy", "--device", device, "--print-capabilities"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert f"--device {device} is refused in isolated mode" in r.stderr
    r = subprocess.run(cmd + ["--mode", "direct"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["type"] == {"gpu": "gpu", "balloon": "balloon"}[device]
