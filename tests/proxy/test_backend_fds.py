"""Every fd the backend is sent, over a whole session and a reconnect (isolated mode).

A recording Interposer (tests/proxy/interposer.py) sits on the backend socket in
front of a real qemu-storage-daemon and keeps the identity (st_dev, st_ino and
/proc/self/fd name) of each fd that each message carried. The front-end's guest
RAM is a memfd of its own: in isolated mode no fd sent to the backend may be it,
and the only memory the backend is given is fastshadow's shadow region; in direct
mode the guest RAM fd itself reaches the backend (the comparison can fail).
"""

from __future__ import annotations

import os

import pytest

from fastshadow.protocol.messages import FrontendReq as R

from .blkfront import BlkFront
from .interposer import Interposer

MEMORY_REQUESTS = {R.SET_MEM_TABLE, R.ADD_MEM_REG}


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@pytest.fixture
def recorded(workdir, start_qsd, start_proxy):
    def start(mode: str):
        start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=1 << 20)
        rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"))
        proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                             "--mode", mode], [str(workdir / "fs.sock")])
        return rec, proxy, str(workdir / "fs.sock")
    return start


def test_isolated_backend_never_gets_a_guest_ram_fd_across_a_reconnect(recorded):
    rec, proxy, sock = recorded("isolated")
    data = os.urandom(4096)
    try:
        with BlkFront(sock) as blk:
            guest = identity(blk.mem.fd)
            blk.bring_up()
            blk.write(8, data)
            rec.drop()                                        # the backend connection drops ...
            proxy.wait_log(r"backend\.reconnected dev=dev0")  # ... and the setup is replayed
            assert blk.read(8, 4096) == data
        sent = rec.received_fds()
    finally:
        rec.close()
    assert len(rec.seen) == 2
    assert sent, "no fd reached the backend"
    assert all((fd.dev, fd.ino) != guest for _, _, fd in sent), sent
    # The memory the backend was given, on each connection: the shadow region, one memfd.
    for n in (0, 1):
        mem = [fd for c, req, fd in sent if c == n and req in MEMORY_REQUESTS]
        assert mem and all(fd.target.startswith("/memfd:fastshadow-shadow:dev0") for fd in mem), mem
        assert len({(fd.dev, fd.ino) for fd in mem}) == 1, mem
    # A shadow region of its own for each connection (a backend that was dropped may live
    # on with the old one mapped: it must reach nothing of the device), never the guest's.
    shadows = [{(fd.dev, fd.ino) for c, req, fd in sent if c == n and req in MEMORY_REQUESTS} for n in (0, 1)]
    assert shadows[0].isdisjoint(shadows[1]), shadows
    assert guest not in shadows[0] | shadows[1]
    # Every other fd is an eventfd or the back-end channel's socket: no memory at all.
    others = [fd for _, req, fd in sent if req not in MEMORY_REQUESTS]
    assert others and all(fd.target == "anon_inode:[eventfd]" or fd.target.startswith("socket:")
                          for fd in others), others


def test_direct_backend_gets_the_guest_ram_fd(recorded):
    rec, proxy, sock = recorded("direct")
    try:
        with BlkFront(sock) as blk:
            guest = identity(blk.mem.fd)
            blk.bring_up()
            blk.write(8, os.urandom(512))
        sent = rec.received_fds()
    finally:
        rec.close()
    assert any((fd.dev, fd.ino) == guest and req in MEMORY_REQUESTS for _, req, fd in sent), sent
