"""The isolation checker itself (fastshadow/isolation.py) against real processes: each
branch of the verdict is made to fire, so that a green e2e check means something.

This process plays QEMU: it maps a 32 MiB shared memfd (guest RAM as
memory-backend-memfd makes it). Small child processes play the backend: one holds an
fd of guest RAM without mapping it, one maps it, one leaves it to its own child, one
maps only a shadow region, one reaches nothing.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

from fastshadow.isolation import check_isolation, guest_ram_inodes

SIZE = 32 << 20

# The child signals readiness with one line on stdout, then waits for stdin to close.
HOLD = "import sys; print('ready', flush=True); sys.stdin.read()"
# mmap(2) through libc (Python's mmap module keeps a dup of the fd, which a backend would not).
MAP = ("import ctypes, os, sys; fd = int(sys.argv[1]); libc = ctypes.CDLL(None, use_errno=True); "
       "libc.mmap.restype = ctypes.c_void_p; "
       "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, "
       "ctypes.c_long]; "
       "addr = libc.mmap(None, os.fstat(fd).st_size, 3, 1, fd, 0); "   # PROT_READ|WRITE, MAP_SHARED
       "assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno(); "
       "os.close(fd); print('ready', flush=True); sys.stdin.read()")
SPAWN_AND_FORGET = ("import os, subprocess, sys; fd = int(sys.argv[1]); "
                    "c = subprocess.Popen([sys.executable, '-c', sys.argv[2]], pass_fds=[fd], "
                    "stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True); "
                    "assert c.stdout.readline() == 'ready\\n'; os.close(fd); "
                    "print(c.pid, flush=True); sys.stdin.read(); c.stdin.close(); c.wait()")
NOTHING = HOLD


@pytest.fixture
def guest_ram():
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, SIZE)
    m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
    yield fd
    m.close()
    os.close(fd)


@pytest.fixture
def backend():
    procs = []

    def start(code: str, *args: str, pass_fds=()):
        p = subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=pass_fds, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        first = p.stdout.readline()
        assert first, "the backend child died"
        return p, first.strip()
    yield start
    for p in procs:
        p.stdin.close()
        p.wait(10)


def test_guest_ram_is_found_in_qemu(guest_ram):
    assert os.fstat(guest_ram).st_ino in guest_ram_inodes(os.getpid())


def test_backend_holding_a_guest_ram_fd_is_not_isolated(guest_ram, backend):
    p, _ = backend(HOLD, pass_fds=[guest_ram])
    rep = check_isolation(p.pid, os.getpid())
    assert [fd for fd, _ in rep.guest_fds] == [guest_ram], rep.lines()
    assert rep.guest_fds[0][1].startswith("/memfd:guest-ram")
    assert rep.guest_maps == []                   # it holds the fd, maps nothing
    assert not rep.isolated
    text = "\n".join(rep.lines())
    assert f"GUEST RAM FD       fd {guest_ram} -> /memfd:guest-ram" in text
    assert "verdict: NOT ISOLATED" in text


def test_backend_mapping_guest_ram_is_not_isolated(guest_ram, backend):
    p, _ = backend(MAP, str(guest_ram), pass_fds=[guest_ram])
    rep = check_isolation(p.pid, os.getpid())
    assert rep.guest_fds == []                    # it closed the fd after mapping, as backends do
    assert len(rep.guest_maps) == 1 and rep.guest_maps[0].size == SIZE, rep.lines()
    assert rep.guest_maps[0].inode == os.fstat(guest_ram).st_ino
    assert not rep.isolated and "verdict: NOT ISOLATED" in "\n".join(rep.lines())


def test_guest_ram_held_by_a_child_of_the_backend_counts(guest_ram, backend):
    # virtiofsd serves from a sandboxed child: the check covers the backend's process tree.
    p, child = backend(SPAWN_AND_FORGET, str(guest_ram), HOLD, pass_fds=[guest_ram])
    rep = check_isolation(p.pid, os.getpid())
    assert int(child) in rep.pids and p.pid in rep.pids
    assert len(rep.guest_fds) == 1 and not rep.isolated, rep.lines()


def test_backend_with_only_a_shadow_region_is_isolated(guest_ram, backend):
    shadow = os.memfd_create("fastshadow-shadow:dev0")
    os.ftruncate(shadow, 1 << 20)
    try:
        p, _ = backend(MAP, str(shadow), pass_fds=[shadow])
    finally:
        os.close(shadow)
    rep = check_isolation(p.pid, os.getpid())
    assert not rep.guest_maps and not rep.guest_fds and len(rep.shadow_maps) == 1, rep.lines()
    assert rep.isolated and "verdict: ISOLATED" in "\n".join(rep.lines())


def test_backend_reaching_no_memory_is_inconclusive(guest_ram, backend):
    # Neither guest RAM nor a shadow region: nothing proves the check looked at a backend.
    p, _ = backend(NOTHING)
    rep = check_isolation(p.pid, os.getpid())
    assert not rep.isolated and "verdict: INCONCLUSIVE" in "\n".join(rep.lines())
