"""A virtio-blk front-end in Python for protocol-level proxy tests: fastshadow's own
vhost-user front-end (fastshadow.protocol.frontend) plays QEMU, and the data-plane
test harness's guest RAM and split ring (tests/dataplane/harness.py) play the guest
driver. It brings up queue 0 the way QEMU does, submits block reads and writes,
waits for their completions and stops the ring.
"""

from __future__ import annotations

import os
import select
import struct

from fastshadow.protocol import payloads as p
from fastshadow.protocol.features import VirtioFeature as VF
from fastshadow.protocol.frontend import Frontend

from ..dataplane.harness import Buf, GuestMem, GuestQueue, make_eventfd

T_IN, T_OUT = 0, 1       # VIRTIO_BLK_T_IN (read), VIRTIO_BLK_T_OUT (write)
#: viommu=True: the guest's IOVA of a guest-physical address (a linear map, far from any gpa).
IOVA_BASE = 0x40_0000_0000


class BlkFront:
    def __init__(self, sock: str, *, num: int = 64, timeout: float = 30, viommu: bool = False):
        self.fe = Frontend.connect(sock, timeout=timeout)
        #: Play QEMU with a vIOMMU: ACCESS_PLATFORM is set, ring and buffer addresses are IOVAs
        #: (iova(gpa)), and the test answers the proxy's IOTLB misses.
        self.viommu = viommu
        self.mem = GuestMem()
        self.num = num
        self.kick, self.call = make_eventfd(), make_eventfd()
        self.q: GuestQueue | None = None

    def close(self) -> None:
        self.fe.close()
        os.close(self.kick)
        os.close(self.call)
        self.mem.close()

    def __enter__(self) -> "BlkFront":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def negotiate(self, *, memory: bool = True, backend_channel: int | None = None) -> int:
        """QEMU's sequence before any ring: features, protocol features, queue count,
        config, the guest memory table (unless `memory` is false); returns the disk's
        capacity in sectors. `backend_channel`: QEMU's back-end request channel (an fd,
        sent as SET_BACKEND_REQ_FD)."""
        fe, mem = self.fe, self.mem
        features = fe.get_features()
        fe.set_owner()
        fe.set_protocol_features(fe.get_protocol_features())
        if backend_channel is not None:
            fe.set_backend_req_fd(backend_channel)
        assert fe.get_queue_num() >= 1
        capacity = struct.unpack("<Q", fe.get_config(0, 8))[0]
        if memory:
            fe.set_mem_table([p.MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in mem.regions],
                             [r.fd for r in mem.regions])
        # ACCESS_PLATFORM: QEMU keeps it from a vhost device unless there is a vIOMMU
        # (hw/virtio/vhost.c vhost_dev_set_features); tests/proxy/test_iotlb.py plays one.
        fe.set_features(features & ~(VF.LOG_ALL | VF.RING_EVENT_IDX | VF.ACCESS_PLATFORM)
                        | (VF.ACCESS_PLATFORM if self.viommu else 0))
        return capacity

    def bring_up(self, backend_channel: int | None = None) -> int:
        """negotiate(), then queue 0 set up and started; returns the disk's capacity in sectors."""
        fe, mem = self.fe, self.mem
        capacity = self.negotiate(backend_channel=backend_channel)
        self.q = GuestQueue(mem, self.num)
        fe.set_vring_num(0, self.num)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, *self.ring_addrs())
        fe.set_vring_call(0, self.call)
        fe.set_vring_kick(0, self.kick)
        return capacity

    def ring_addrs(self) -> tuple[int, int, int]:
        """Queue 0's (desc, used, avail) as SET_VRING_ADDR names them: QEMU user addresses, or
        IOVAs with a vIOMMU (QEMU's vhost_memory_map)."""
        q, mem = self.q, self.mem
        if self.viommu:
            return self.iova(q.desc), self.iova(q.used), self.iova(q.avail)
        return mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail)

    def request(self, kind: int, sector: int, data: bytes | int) -> tuple[int, int, int]:
        """Post one request (T_OUT writes `data`, T_IN reads `data` bytes) and kick;
        returns (head, data gpa, status gpa)."""
        mem = self.mem
        hdr = mem.alloc(16)
        mem.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        n = len(data) if isinstance(data, bytes) else data
        buf = mem.alloc(n, align=512)
        if isinstance(data, bytes):
            mem.write(buf, data)
        st = mem.alloc(1)
        head = self.q.add([Buf(self.iova(hdr), 16), Buf(self.iova(buf), n, writable=kind == T_IN),
                           Buf(self.iova(st), 1, writable=True)])
        os.eventfd_write(self.kick, 1)
        return head, buf, st

    def iova(self, gpa: int) -> int:
        """The address the device is given for gpa: itself, or its IOVA (viommu)."""
        return gpa + IOVA_BASE if self.viommu else gpa

    def wait_used(self, want: int, timeout: float = 20) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        while len(got) < want:
            assert select.select([self.call], [], [], timeout)[0], f"no completion within {timeout} s ({got})"
            os.eventfd_read(self.call)
            got += self.q.take_used()
        return got

    def write(self, sector: int, data: bytes) -> None:
        head, _, st = self.request(T_OUT, sector, data)
        assert self.wait_used(1) == [(head, 1)]
        assert self.mem.read(st, 1) == b"\0", "VIRTIO_BLK_S_OK expected"

    def read(self, sector: int, n: int) -> bytes:
        head, buf, st = self.request(T_IN, sector, n)
        assert self.wait_used(1) == [(head, n + 1)]
        assert self.mem.read(st, 1) == b"\0", "VIRTIO_BLK_S_OK expected"
        return self.mem.read(buf, n)

    def stop(self) -> int:
        """GET_VRING_BASE: the ring stops; returns the guest's next avail index."""
        return self.fe.get_vring_base(0)

    def restart(self, base: int, *, call: bool = True) -> None:
        """QEMU resuming a stopped ring (vhost_virtqueue_start): the same size and addresses, the
        base it was told, its call fd again (a backend may close it at GET_VRING_BASE:
        libvhost-user does), then the kick. call=False: a front-end that does not send
        SET_VRING_CALL again (the guest's call fd is still the one given before the stop)."""
        fe = self.fe
        fe.set_vring_num(0, self.num)
        fe.set_vring_base(0, base)
        fe.set_vring_addr(0, *self.ring_addrs())
        if call:
            fe.set_vring_call(0, self.call)
        fe.set_vring_kick(0, self.kick)
