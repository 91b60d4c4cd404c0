"""What bcc needs on this machine, checked one by one with what to do about it.

bcc compiles its programs against the running kernel's headers and attaches
through tracefs (DESIGN §6). `fastshadow trace --check` prints this list;
`fastshadow trace` refuses to start, naming the first missing piece.
"""

from __future__ import annotations

import importlib.resources
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False      # ok, but worth saying (headers of another kernel)


def kernel_build_dir() -> Path:
    return Path(os.environ.get("FASTSHADOW_KERNEL_BUILD", f"/lib/modules/{platform.release()}/build"))


def headers_release(build: Path) -> str | None:
    """The kernel release the header tree at `build` was made for (its kernel.release or UTS_RELEASE)."""
    try:
        return (build / "include" / "config" / "kernel.release").read_text().strip() or None
    except OSError:
        pass
    try:
        text = (build / "include" / "generated" / "utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    return m.group(1) if m else None


def _major_minor(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release)[:2])


def headers_match(build: Path) -> Check:
    """Do the headers bcc will compile against belong to the running kernel? A mismatch is a warning:
    fastshadow's program reads USDT arguments (uapi ptrace registers) and no kernel structure, so it
    is built and runs correctly (tests/trace prove it on a 6.18 kernel with Debian's 6.1 headers)."""
    running = platform.release()
    built_for = headers_release(build)
    if built_for is None:
        return Check("headers match", True, f"cannot tell which kernel {build} is for", warn=True)
    if _major_minor(built_for) == _major_minor(running):
        return Check("headers match", True, f"headers {built_for} for kernel {running}")
    return Check("headers match", True,
                 f"headers {built_for}, running kernel {running}: bcc compiles against them anyway; "
                 "fastshadow's program reads only USDT arguments (no kernel structure), so its results hold, "
                 "but kprobe/tracepoint tools built on these headers may read wrong offsets",
                 fix=f"install linux-headers-{running} if your distribution ships it; `fastshadow trace "
                     "--from-stats` needs no headers at all (the data plane's own histograms)", warn=True)


def tracefs_dir() -> Path:
    return Path(os.environ.get("FASTSHADOW_TRACEFS", "/sys/kernel/tracing"))


def import_bcc():
    """The bcc module: Debian installs it for the system Python only."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        if DIST_PACKAGES not in sys.path and os.path.isdir(DIST_PACKAGES):
            sys.path.append(DIST_PACKAGES)
        import bcc  # noqa: F401
    return sys.modules["bcc"]


def probe_program():
    """hops.bpf.c: the repository's bpf/ folder, installed as the package data of
    fastshadow.trace.bpf (a Traversable: a file in a source tree and in a wheel alike)."""
    return importlib.resources.files("fastshadow.trace.bpf") / "hops.bpf.c"


def _is_mountpoint(path: Path) -> bool:
    """True when `path` is a mount point (readable by anyone, unlike tracefs itself)."""
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def checks() -> list[Check]:
    out = []
    try:
        src = probe_program()
        found = src.is_file()
    except ImportError as e:
        src, found = f"fastshadow.trace.bpf: {e}", False
    out.append(Check("probe program", found, f"{src}" + ("" if found else " not found"),
                     "" if found else "reinstall fastshadow: its wheel ships fastshadow/trace/bpf/hops.bpf.c"))
    root = os.geteuid() == 0
    out.append(Check("root", root, f"running as uid {os.geteuid()}",
                     "" if root else "run as root (loading BPF programs needs CAP_BPF and CAP_PERFMON)"))
    build = kernel_build_dir()
    has_headers = (build / "include").is_dir() or (build / "Makefile").is_file()
    out.append(Check("kernel headers", has_headers, f"{build}" + (" -> " + os.path.realpath(build) if build.exists() else
                                                                   " does not exist"),
                     "" if has_headers else "apt-get install linux-headers-amd64 and link "
                     f"{build} (and ../source) to /usr/src/linux-headers-*-amd64 (scripts/setup does this)"))
    if has_headers:
        out.append(headers_match(build))
    tfs = tracefs_dir()
    mounted = _is_mountpoint(tfs)
    out.append(Check("tracefs", mounted, f"{tfs}" + (" mounted" if mounted else " not mounted"),
                     "" if mounted else f"mount -t tracefs nodev {tfs} (scripts/setup does this)"))
    try:
        bcc = import_bcc()
        out.append(Check("bcc", True, f"bcc {getattr(bcc, '__version__', '?')} from {os.path.dirname(bcc.__file__)}"))
    except Exception as e:  # ImportError, or libbcc missing underneath
        out.append(Check("bcc", False, f"cannot import bcc: {e}", "apt-get install python3-bpfcc"))
    return out


class TraceEnvironmentError(RuntimeError):
    """A prerequisite of tracing is missing; the message says which and how to fix it."""


def require() -> None:
    for c in checks():
        if not c.ok:
            raise TraceEnvironmentError(f"cannot trace: {c.name}: {c.detail}; fix: {c.fix}")
