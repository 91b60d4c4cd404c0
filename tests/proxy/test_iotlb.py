"""vIOMMU guests in isolated mode at the protocol level (issue 10, item 2): fastshadow's
own front-end plays QEMU with a vIOMMU (ACCESS_PLATFORM set, ring and buffer addresses
are IOVAs, IOTLB updates and invalidations on the main socket, the proxy's misses
answered on the back-end channel, as hw/virtio/vhost.c vhost_device_iotlb_miss does),
through `fastshadow proxy --mode isolated` to a real qemu-storage-daemon that hears of
neither ACCESS_PLATFORM nor the IOTLB. Data is checked, and guest RAM outside the
buffers a request named is checked unchanged (the harness's canary model)."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading

import pytest

from fastshadow.protocol import Channel, Connection
from fastshadow.protocol import payloads as p
from fastshadow.protocol.errors import VhostUserError
from fastshadow.protocol.messages import BackendReq, FrontendReq, Message

from ..dataplane.harness import Buf
from .blkfront import IOVA_BASE, T_IN, T_OUT, BlkFront
from .interposer import Interposer

PAGE = 4096
ACCESS_PLATFORM = 1 << 33
#: What the uninitialized perm and uaddr of QEMU 7.2's invalidations held in a virtio-iommu run.
STALE_PERM, STALE_UADDR = 67, 0x7F3A_DEAD_B000
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
        reply = self.blk.fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(iova_page, PAGE, self.blk.mem.uaddr(gpa),
                                                                   self.perm(iova_page), p.IOTLB_UPDATE))
        assert reply.payload.value == 0, f"update of {iova_page:#x} refused"

    def invalidate(self, iova: int, size: int) -> None:
        """VHOST_IOTLB_INVALIDATE as QEMU 7.2 sends it: perm and uaddr are whatever its stack
        held (vhost_backend_invalidate_device_iotlb sets iova, size and type only; 67 and a
        stale address were seen with a virtio-iommu guest)."""
        with self.lock:
            reply = self.blk.fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(iova, size, STALE_UADDR, STALE_PERM,
                                                                       p.IOTLB_INVALIDATE))
        assert reply.payload.value == 0

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


def test_invalidation_while_a_request_is_in_flight_is_never_written_through(workdir, start_qsd, start_proxy):
    """A read request is published to the backend; before the backend runs it, the guest
    unmaps its data buffer (VHOST_IOTLB_INVALIDATE, acked). The completion must not write
    through the old translation: the request fails with the device's error, the page that
    was behind the IOVA keeps its bytes, and the queue runs on."""
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=8 << 20)
    gate = os.eventfd(0, os.EFD_CLOEXEC)     # the backend's kick: we decide when it sees one
    kicks: list[int] = []                    # the proxy's kick fd toward the backend

    def hold_kicks(msg: Message):
        if msg.request == FrontendReq.SET_VRING_KICK and msg.fds:
            kicks.append(msg.fds.pop())
            return Message(msg.request, msg.payload, [os.dup(gate)], msg.flags)
        return msg

    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"), request_hook=hold_kicks)
    sock = str(workdir / "fs.sock")
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "rec.sock"), "--mode", "isolated"], [sock])
    blk = BlkFront(sock, viommu=True)
    vi = Viommu(blk)
    try:
        with vi.lock:
            blk.bring_up(backend_channel=vi.proxy_end.fileno())
        [proxy_kick] = kicks

        def pass_kicks():
            while select.select([proxy_kick], [], [], 0)[0]:
                os.eventfd_read(proxy_kick)
                os.eventfd_write(gate, 1)

        head, _, _ = blk.request(T_OUT, 16, b"\x5a" * 4096)
        wait_readable(proxy_kick)                 # published on the shadow ring
        pass_kicks()
        assert blk.wait_used(1) == [(head, 1)]
        # The request under test: a read into a page holding a canary.
        buf = blk.mem.alloc(4096, align=4096)
        blk.mem.write(buf, b"\xc3" * 4096)
        hdr, st = blk.mem.alloc(16), blk.mem.alloc(1)
        blk.mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 16))
        head = blk.q.add([Buf(blk.iova(hdr), 16), Buf(blk.iova(buf), 4096, writable=True),
                          Buf(blk.iova(st), 1, writable=True)])
        os.eventfd_write(blk.kick, 1)
        wait_readable(proxy_kick)                 # walked, translated, published: in flight
        vi.unmapped.add(vi.page_of(buf))
        vi.invalidate(vi.page_of(buf), PAGE)      # acked: from now on the old translation is gone
        pass_kicks()                              # the backend runs it and completes it
        assert blk.wait_used(1) == [(head, 1)]
        assert status_of(blk, st) == VIRTIO_BLK_S_IOERR
        assert blk.mem.read(buf, 4096) == b"\xc3" * 4096   # not a byte through the stale mapping
        head, _, _ = blk.request(T_IN, 16, 4096)        # the queue runs on
        wait_readable(proxy_kick)
        pass_kicks()
        assert blk.wait_used(1) == [(head, 4096 + 1)]
    finally:
        finish(blk, vi, rec)
        os.close(gate)
    [line] = proxy.wait_log(r"dataplane\.refused .*unmapped before completion")
    assert f"{blk.iova(buf):#x}" in line


def test_invalidation_with_qemus_uninitialized_perm_is_applied(workdir, start_qsd, start_proxy):
    """QEMU 7.2 turns a virtio-iommu guest's unmaps into VHOST_IOTLB_INVALIDATE messages whose
    perm and uaddr are uninitialized (perm 67 in a real run, which the codec refused: QEMU's
    session ended mid-I/O and the guest hung). An invalidation carries no access: it is acked
    and applied whatever those fields hold (the page kept with --iotlb-keep-completed is asked
    for again), while an update with such a perm is still refused with one line."""
    proxy, blk, vi, rec, _ = start(workdir, start_qsd, start_proxy, "--iotlb-keep-completed")
    buf = blk.mem.alloc(4096, align=4096)
    page = vi.page_of(buf)

    def write_from_buf(sector: int, fill: int) -> None:
        blk.mem.write(buf, bytes([fill]) * 4096)
        hdr, st = blk.mem.alloc(16), blk.mem.alloc(1)
        blk.mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, sector))
        head = blk.q.add([Buf(blk.iova(hdr), 16), Buf(blk.iova(buf), 4096), Buf(blk.iova(st), 1, writable=True)])
        os.eventfd_write(blk.kick, 1)
        assert blk.wait_used(1) == [(head, 1)]
        assert status_of(blk, st) == 0

    def asked() -> int:
        return sum(1 for iova, _ in vi.misses if iova & ~(PAGE - 1) == page)

    try:
        write_from_buf(0, 0x11)
        write_from_buf(8, 0x22)
        assert asked() == 1                      # kept after the first request
        vi.invalidate(page, PAGE)                # perm STALE_PERM, uaddr STALE_UADDR
        write_from_buf(16, 0x33)
        assert asked() == 2                      # the translation was gone: asked again
        assert blk.read(8, 4096) == b"\x22" * 4096 and blk.read(16, 4096) == b"\x33" * 4096
        assert "session.refused" not in proxy.log()
        # Where perm is an access, 67 is no access: refused, one line (a malformed message ends
        # the session, QEMU reconnects).
        with vi.lock:
            with pytest.raises(VhostUserError):
                blk.fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(page, PAGE, blk.mem.uaddr(buf), STALE_PERM,
                                                              p.IOTLB_UPDATE))
    finally:
        finish(blk, vi, rec)
    [line] = proxy.wait_log(r"session\.refused")
    assert "IOTLB permission 67 is not 0-3" in line, line


def test_iotlb_flood_is_bounded_and_refused_with_one_line(workdir, start_qsd, start_proxy):
    """QEMU (or a confused front-end) sends more translations than --iotlb-max-entries: the
    table stops at the cap, each update past it gets a failing ack, one log line says why,
    and once QEMU invalidates (here: a global flush, size 0) the device works again."""
    proxy, blk, vi, rec, _ = start(workdir, start_qsd, start_proxy, "--iotlb-max-entries", "64")
    try:
        blk.write(0, b"\x11" * 4096)
        accepted = refused = 0
        for i in range(300):
            iova = IOVA_BASE + blk.mem.size + i * PAGE   # pages the guest never uses
            with vi.lock:
                reply = blk.fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(iova, PAGE, blk.mem.uaddr(0), 3, p.IOTLB_UPDATE))
            if reply.payload.value == 0:
                accepted += 1
            else:
                refused += 1
        assert accepted + refused == 300 and 0 < accepted < 64 and refused > 200
        vi.invalidate(0, 0)                              # QEMU's global flush: size 0 means everything
        data = os.urandom(8192)
        blk.write(8, data)                                # misses refill the table
        assert blk.read(8, len(data)) == data
    finally:
        finish(blk, vi, rec)
    lines = proxy.wait_log(r"request\.refused dev=dev0 req=IOTLB_MSG")
    assert len(lines) == 1 and "--iotlb-max-entries" in lines[0], lines
    assert "session.refused" not in proxy.log()


def wait_readable(fd: int, timeout: float = 20) -> None:
    assert select.select([fd], [], [], timeout)[0], f"fd {fd} not readable within {timeout} s"
