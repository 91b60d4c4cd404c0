"""Shared fixtures: real processes (fastshadow proxy, qemu-storage-daemon) in a temp dir."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastshadow.guest._children import die_with_parent
from fastshadow.guest.daemon import wait_listening

from . import ci_skips


def pytest_configure(config):
    # CI=true: any skip fails the run (tests/ci_skips.py, tests/README.md).
    ci_skips.pytest_configure(config)


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (the README's test command installs it)")
    return path


class ProxyProcess:
    """`fastshadow proxy` as a real subprocess, its log in a file.

    The tests run the front-end, the proxy and the backends all as root, an identity an
    isolated session refuses for its backend (it could open QEMU's /proc/PID/fd): so the
    proxy is given --allow-shared-uid unless a test asks for the check
    (`allow_shared_uid=False`, tests/ops/test_identity.py)."""

    def __init__(self, workdir: Path, args: list[str], sockets: list[str], name: str = "proxy",
                 allow_shared_uid: bool = True, env: dict | None = None, pass_fds=()):
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        extra = ["--allow-shared-uid"] if allow_shared_uid else []
        self.proc = subprocess.Popen([sys.executable, "-m", "fastshadow.cli", "proxy", *args, *extra],
                                     stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                     env=env, pass_fds=pass_fds)
        for s in sockets:
            wait_listening(s, self.proc, 15, what="fastshadow proxy")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> list[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            lines = [ln for ln in self.log().splitlines() if rx.search(ln)]
            if len(lines) >= count:
                return lines
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited ({self.proc.returncode}) while waiting for {pattern!r}:\n"
                                     + self.log()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:\n" + self.log()[-3000:])
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def workdir(tmp_path_factory) -> Path:
    # Unix socket paths are limited to 108 bytes: keep them short.
    d = Path(tmp_path_factory.mktemp("fs", numbered=True))
    if len(str(d)) > 60:
        import tempfile
        d = Path(tempfile.mkdtemp(prefix="fs-"))
    return d


@pytest.fixture
def start_proxy(workdir):
    procs: list[ProxyProcess] = []

    def start(args: list[str], sockets: list[str], name: str = "proxy", **kw) -> ProxyProcess:
        p = ProxyProcess(workdir, args, sockets, name, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def start_qsd(workdir):
    need_binary("qemu-storage-daemon")
    from fastshadow.guest.qsd import StorageDaemon
    daemons = []

    def start(sock: str, **kw):
        d = StorageDaemon(sock, **kw)
        d.__enter__()
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.__exit__(None, None, None)


@pytest.fixture(scope="session")
def guest_image():
    """The test guest (Debian kernel + busybox initramfs + checker), built once and cached."""
    need_binary("qemu-system-x86_64")
    from fastshadow.guest import build_guest_image
    return build_guest_image(log=lambda *a: None)


@pytest.fixture(scope="session")
def virtio_iommu_image():
    """The guest behind a virtio-iommu-pci, built once and cached: the release's backports
    kernel (Debian 12's own is built without CONFIG_VIRTIO_IOMMU) with the virtio_iommu module.
    Skips (a failure in CI) when apt knows no such kernel; any other build error fails."""
    need_binary("qemu-system-x86_64")
    from fastshadow.guest import KernelUnavailable, build_guest_image
    try:
        return build_guest_image(log=lambda *a: None, virtio_iommu=True)
    except KernelUnavailable as e:
        pytest.skip(str(e))
