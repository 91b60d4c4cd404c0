"""vIOMMU guests in isolated mode at the protocol level (issue 10, item 2): fastshadow's
own front-end plays QEMU with a vIOMMU (ACCESS_PLATFORM set, ring and buffer addresses
are IOVAs, IOTLB updates and invalidations on the main socket, the proxy's misses
answered on the back-end channel, as hw/virtio/vhost.c vhost_device_iotlb_miss does),
through `fastshadow proxy --mode isolated` to a real qemu-storage-daemon that hears of
neither ACCESS_PLATFORM nor the IOTLB. Data is checked, and guest RAM outside the
buffers a request named is checked unchanged (the harness's canary model)."""

from __future__ import annotations

import os
import socket
import struct
import threading

from fastshadow.protocol import Channel, Connection
from fastshadow.protocol import payloads as p
from fastshadow.protocol.frontend import BackendRefused
from fastshadow.protocol.messages import BackendReq, FrontendReq, Message

from ..dataplane.harness import Buf
from .blkfront import IOVA_BASE, T_IN, T_OUT, BlkFront
from .interposer import Interposer

PAGE = 4096
ACCESS_PLATFORM = 1 << 33
VIRTIO_BLK_S_IOERR = 1


class Viommu:
    """QEMU's side of the device IOTLB for a BlkFront(viommu=True).

    The guest's IOMMU page table maps every page of guest RAM at IOVA_BASE + gpa,
    read-write, except the pages in `unmapped` (no translation) and `read_only`. A miss
    from the proxy (VHOST_USER_BACKEND_IOTLB_MSG, VHOST_IOTLB_MISS) is answered as QEMU
    does: the update on the main socket first (if the page is mapped), then the ack
    (0, or non-zero without a translation). One front-end request at a time on the main
    socket: test code holds `lock` around its own BlkFront calls."""

    def __init__(self, blk: BlkFront):
        self.blk = blk
        self.lock = threading.Lock()
        self.unmapped: set[int] = set()
        self.read_only: set[int] = set()
        self.misses: list[tuple[int, int]] = []
        qemu_end, self.proxy_end = socket.socketpair()
        self.chan = Connection(qemu_end, Channel.BACKEND, receives_replies=False, name="qemu (request channel)")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.chan.close()
        self.proxy_end.close()

    def page_of(self, gpa: int) -> int:
        return (gpa & ~(PAGE - 1)) + IOVA_BASE

    def perm(self, iova_page: int) -> int:
        return 1 if iova_page in self.read_only else 3

    def update(self, iova_page: int) -> None:
        """VHOST_IOTLB_UPDATE of one page (QEMU's uaddr: its user address of the gpa)."""
        gpa = iova_page - IOVA_BASE
        self.blk.fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(iova_page, PAGE, self.blk.mem.uaddr(gpa),
                                                           self.perm(iova_page), p.IOTLB_UPDATE))

    def invalidate(self, iova: int, size: int) -> None:
        with self.lock:
            self.blk.fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(iova, size, 0, 0, p.IOTLB_INVALIDATE))

    def _serve(self) -> None:
        try:
            while True:
                msg = self.chan.recv()
                ok = True
                if msg.request == BackendReq.IOTLB_MSG and msg.payload.type == p.IOTLB_MISS:
                    page = msg.payload.iova & ~(PAGE - 1)
                    self.misses.append((msg.payload.iova, msg.payload.perm))
                    mem_end = IOVA_BASE + self.blk.mem.size
                    ok = IOVA_BASE <= page < mem_end and page not in self.unmapped
                    if ok:
                        with self.lock:
                            self.update(page)
                if msg.need_reply:
                    self.chan.send(msg.ack(ok))
        except Exception:
            pass


def start(workdir, start_qsd, start_proxy, *extra):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=8 << 20)
    seen: list[Message] = []
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"),
                     request_hook=lambda m: (seen.append(m), m)[1])
    sock = str(workdir / "fs.sock")
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "rec.sock"), "--mode", "isolated",
                         *extra], [sock])
    blk = BlkFront(sock, viommu=True)
    vi = Viommu(blk)
    with vi.lock:
        blk.bring_up(backend_channel=vi.proxy_end.fileno())
    return proxy, blk, vi, rec, seen


def finish(blk, vi, rec):
    vi.close()
    blk.close()
    rec.close()


def test_misses_answered_data_checked_backend_hears_of_nothing(workdir, start_qsd, start_proxy):
    proxy, blk, vi, rec, seen = start(workdir, start_qsd, start_proxy)
    try:
        data = [os.urandom(n) for n in (512, 4096, 3 * 4096 + 512, 65536)]
        for i, d in enumerate(data):
            blk.write(64 * i, d)
        for i, d in enumerate(data):
            assert blk.read(64 * i, len(d)) == d
        with vi.lock:
            blk.stop()
    finally:
        finish(blk, vi, rec)
    # Rings and buffers were all reached through misses (desc/avail read, used written).
    assert len(vi.misses) >= 4
    assert {perm for _, perm in vi.misses} == {1, 2}
    log = proxy.log()
    assert "iotlb.enabled" in log
    assert "dataplane.refused" not in log and "session.refused" not in log, log[-3000:]
    # The backend never heard of the platform's IOMMU: no ACCESS_PLATFORM, no IOTLB message.
    features = [m.payload.value for m in seen if m.request == FrontendReq.SET_FEATURES]
    assert features and not any(f & ACCESS_PLATFORM for f in features)
    assert not [m for m in seen if m.request == FrontendReq.IOTLB_MSG]


def status_of(blk, st_gpa: int) -> int:
    return blk.mem.read(st_gpa, 1)[0]


def test_unmapped_iova_is_refused_with_the_device_error(workdir, start_qsd, start_proxy):
    proxy, blk, vi, rec, _ = start(workdir, start_qsd, start_proxy)
    try:
        blk.write(0, b"\xaa" * 4096)            # rings translated, the queue runs
        buf = blk.mem.alloc(4096, align=4096)
        vi.unmapped.add(vi.page_of(buf))        # the guest named an IOVA it never mapped
        hdr, st = blk.mem.alloc(16), blk.mem.alloc(1)
        blk.mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, 8))
        head = blk.q.add([Buf(blk.iova(hdr), 16), Buf(blk.iova(buf), 4096), Buf(blk.iova(st), 1, writable=True)])
        os.eventfd_write(blk.kick, 1)
        assert blk.wait_used(1) == [(head, 1)]
        assert status_of(blk, st) == VIRTIO_BLK_S_IOERR
        assert blk.read(0, 4096) == b"\xaa" * 4096      # the queue keeps running
    finally:
        finish(blk, vi, rec)
    [line] = proxy.wait_log(r"dataplane\.refused .*has no translation in the device IOTLB")
    assert f"iova {blk.iova(buf):#x}" in line
    assert len(proxy.wait_log(r"dataplane\.refused")) == 1


def test_device_write_to_read_only_iova_is_refused(workdir, start_qsd, start_proxy):
    proxy, blk, vi, rec, _ = start(workdir, start_qsd, start_proxy)
    try:
        blk.write(0, b"\x55" * 4096)
        buf = blk.mem.alloc(4096, align=4096)
        blk.mem.write(buf, b"\xc3" * 4096)
        vi.read_only.add(vi.page_of(buf))        # mapped DMA_TO_DEVICE, named as a read buffer
        hdr, st = blk.mem.alloc(16), blk.mem.alloc(1)
        blk.mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
        head = blk.q.add([Buf(blk.iova(hdr), 16), Buf(blk.iova(buf), 4096, writable=True),
                          Buf(blk.iova(st), 1, writable=True)])
        os.eventfd_write(blk.kick, 1)
        assert blk.wait_used(1) == [(head, 1)]
        assert status_of(blk, st) == VIRTIO_BLK_S_IOERR
        assert blk.mem.read(buf, 4096) == b"\xc3" * 4096    # the read-only page was never written
        assert blk.read(0, 4096) == b"\x55" * 4096          # the queue keeps running
    finally:
        finish(blk, vi, rec)
    [line] = proxy.wait_log(r"dataplane\.refused .*mapped without the access the device needs")
    assert f"iova {blk.iova(buf):#x}" in line
