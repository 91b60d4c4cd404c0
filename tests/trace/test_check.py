"""`fastshadow trace --check` and the tool's error paths: each missing piece is named with its fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastshadow.trace import environment


def trace(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastshadow.cli", "trace", *args], capture_output=True,
                          text=True, env=e, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="the all-present case needs root (CI runs as root)")
def test_check_all_present():
    r = trace("--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tracing is possible" in r.stdout
    for name in ("probe program", "root", "kernel headers", "tracefs", "bcc"):
        assert name in r.stdout


def test_check_tracefs_missing(tmp_path):
    r = trace("--check", env={"FASTSHADOW_TRACEFS": str(tmp_path / "no-tracefs")})
    assert r.returncode == 1
    assert "[MISSING] tracefs" in r.stdout and "mount -t tracefs" in r.stdout


def test_check_headers_missing(tmp_path):
    r = trace("--check", env={"FASTSHADOW_KERNEL_BUILD": str(tmp_path / "no-build")})
    assert r.returncode == 1
    assert "[MISSING] kernel headers" in r.stdout and "linux-headers-amd64" in r.stdout


def test_check_not_root():
    """Run the checks in a forked child that dropped to nobody."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            c = {c.name: c for c in environment.checks()}["root"]
            os.write(w, f"{c.ok}|{c.fix}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    ok, fix = out.split("|", 1)
    assert ok == "False" and "run as root" in fix


def test_trace_refuses_to_start_without_tracefs(tmp_path):
    r = trace("--pid", str(os.getpid()), env={"FASTSHADOW_TRACEFS": str(tmp_path / "none")})
    assert r.returncode == 1
    assert "cannot trace: tracefs" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (CI runs as root)")
def test_trace_a_process_without_probes():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        r = trace("--pid", str(sleeper.pid), "--duration", "1")
    finally:
        sleeper.kill()
    assert r.returncode == 1
    assert "no fastshadow data plane probes" in r.stderr


def test_trace_requires_pid():
    r = trace()
    assert r.returncode == 2 and "--pid is required" in r.stderr


def _build_for(tmp_path, release: str):
    build = tmp_path / "build"
    (build / "include" / "config").mkdir(parents=True)
    (build / "include" / "config" / "kernel.release").write_text(release + "\n")
    return build


def test_check_says_when_headers_are_another_kernels(tmp_path):
    """Here: a 6.18 kernel with Debian's 6.1 headers linked. Not fatal (the program reads no kernel
    structure), but said, with what to do."""
    import platform
    r = trace("--check", env={"FASTSHADOW_KERNEL_BUILD": str(_build_for(tmp_path, "5.10.0-99-amd64"))})
    [line] = [ln for ln in r.stdout.splitlines() if "headers match" in ln]
    assert line.startswith("[   warn]") and "headers 5.10.0-99-amd64" in line and platform.release() in line
    assert "--from-stats" in r.stdout
    assert "[MISSING] headers match" not in r.stdout


def test_check_headers_of_the_running_kernel(tmp_path):
    import platform
    r = trace("--check", env={"FASTSHADOW_KERNEL_BUILD": str(_build_for(tmp_path, platform.release()))})
    [line] = [ln for ln in r.stdout.splitlines() if "headers match" in ln]
    assert line.startswith("[    ok ]"), line
