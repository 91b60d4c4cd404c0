"""The backend dies in the middle of a control request (isolated mode, DESIGN §7).

fastshadow's own vhost-user front-end plays QEMU bringing up a virtio-blk
queue, doing I/O and stopping the ring; between fastshadow and a real
qemu-storage-daemon (file export) sits tests/proxy/cutter.py, which drops the
backend connection once, at one request: before the backend saw it, or after
(its reply lost). For every request of the bring-up and both moments, the
front-end must see every request answered as if nothing happened, the data
written must be read back, and fastshadow must log one loss and one
reconnection, in one session. The guest-level kill tests (tests/e2e) cover
a backend dying between requests.
"""

from __future__ import annotations

import os
import select
import struct

import pytest

from fastshadow.protocol import payloads as p
from fastshadow.protocol.features import VirtioFeature as VF
from fastshadow.protocol.frontend import Frontend
from fastshadow.protocol.messages import FrontendReq as R

from ..dataplane.harness import Buf, GuestMem, GuestQueue, make_eventfd
from .cutter import Cutter

NUM = 64
SECTOR = 9           # where the request writes (512-byte sectors)
CUT_AT = [R.GET_FEATURES, R.SET_OWNER, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
          R.GET_CONFIG, R.SET_MEM_TABLE, R.SET_FEATURES, R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR,
          R.SET_VRING_CALL, R.SET_VRING_KICK, R.GET_VRING_BASE]


def blk_request(mem: GuestMem, q: GuestQueue, kind: int, data: bytes | int) -> tuple[int, int, int]:
    """A virtio-blk request: kind 1 writes `data` at SECTOR, kind 0 reads `data` bytes.
    Returns (head, data gpa, status gpa)."""
    hdr = mem.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", kind, 0, SECTOR))
    n = len(data) if isinstance(data, bytes) else data
    buf = mem.alloc(n, align=512)
    if isinstance(data, bytes):
        mem.write(buf, data)
    st = mem.alloc(1)
    head = q.add([Buf(hdr, 16), Buf(buf, n, writable=kind == 0), Buf(st, 1, writable=True)])
    return head, buf, st


def wait_used(q: GuestQueue, call: int, want: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    while len(got) < want:
        assert select.select([call], [], [], 20)[0], f"no completion within 20 s ({got})"
        os.eventfd_read(call)
        got += q.take_used()
    return got


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("cut_at", CUT_AT, ids=lambda r: r.name)
def test_backend_dies_in_the_middle_of_a_request(cut_at, when, workdir, start_qsd, start_proxy):
    disk = workdir / "disk.img"
    start_qsd(str(workdir / "qsd.sock"), disk=disk, size=1 << 20)
    cutter = Cutter(str(workdir / "cut.sock"), str(workdir / "qsd.sock"), cut_at, when)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "cut.sock"),
                         "--mode", "isolated", "--backend-timeout", "20"], [str(workdir / "fs.sock")])
    fe = Frontend.connect(str(workdir / "fs.sock"), timeout=30)
    mem = GuestMem()
    kick, call = make_eventfd(), make_eventfd()
    try:
        features = fe.get_features()
        fe.set_owner()
        fe.set_protocol_features(fe.get_protocol_features())
        assert fe.get_queue_num() >= 1
        capacity = struct.unpack("<Q", fe.get_config(0, 8))[0]
        assert capacity == (1 << 20) // 512
        fe.set_mem_table([p.MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in mem.regions],
                         [r.fd for r in mem.regions])
        fe.set_features(features & ~(VF.LOG_ALL | VF.RING_EVENT_IDX))
        q = GuestQueue(mem, NUM)
        fe.set_vring_num(0, NUM)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail))
        fe.set_vring_call(0, call)
        fe.set_vring_kick(0, kick)

        data = os.urandom(4096)
        head_w, _, st_w = blk_request(mem, q, 1, data)
        os.eventfd_write(kick, 1)
        assert wait_used(q, call, 1) == [(head_w, 1)]
        head_r, buf_r, st_r = blk_request(mem, q, 0, len(data))
        os.eventfd_write(kick, 1)
        assert wait_used(q, call, 1) == [(head_r, len(data) + 1)]
        assert mem.read(st_w, 1) == mem.read(st_r, 1) == b"\0"      # VIRTIO_BLK_S_OK
        assert mem.read(buf_r, len(data)) == data
        assert fe.get_vring_base(0) == 2                             # the guest's next avail index
    finally:
        fe.close()
        os.close(kick)
        os.close(call)
        mem.close()
        cutter.close()
    with open(disk, "rb") as f:
        f.seek(SECTOR * 512)
        assert f.read(len(data)) == data
    assert cutter.cut.is_set(), f"the cutter never saw {cut_at.name}"
    log = proxy.wait_log(r"session\.end dev=dev0", timeout=10) and proxy.log()
    assert log.count("session.start dev=dev0") == 1, log[-3000:]
    assert log.count("backend.lost dev=dev0") == 1 and log.count("backend.reconnected dev=dev0") == 1, log[-3000:]
    assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
