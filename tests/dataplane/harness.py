"""Test harness for the isolated-mode data plane: a guest driver and a backend in Python.

* :class:`GuestMem` is guest RAM: one memfd described to the data plane as two
  regions that are adjacent in guest-physical space but swapped in the file
  (and far apart in QEMU user address space), so any buffer crossing the
  boundary must be split by the copier.  Every byte starts with a pseudo-random
  canary pattern; everything the harness writes is mirrored in ``expect``, and
  :meth:`GuestMem.check` compares the whole RAM with it: the data plane may only
  have changed what a test explicitly accepted (the used ring, the first
  ``used.len`` bytes of writable buffers).
* :class:`GuestQueue` plays the guest driver on a split ring in that RAM.
* :class:`Backend` plays the backend by mapping the device's shadow memfd.
* :class:`Rig` wires one DataPlane + Device + queues together.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
from dataclasses import dataclass, field

from fastshadow.dataplane import SHADOW_GPA_BASE, SHADOW_UADDR_BASE, DataPlane, MemRegion

PAGE = 4096
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

REGION_SIZE = 1 << 20
UADDR0 = 0x7F00_0000_0000
UADDR1 = 0x7F10_0000_0000


def read_counter(fd: int) -> int:
    """Read (and reset) a non-blocking eventfd counter; 0 if not signalled."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def make_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class GuestMem:
    def __init__(self, region_size: int = REGION_SIZE, seed: int = 1):
        self.region_size = region_size
        self.size = 2 * region_size
        self.fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        rnd = random.Random(seed)
        pattern = rnd.randbytes(self.size)
        self.map[:] = pattern
        self.expect = bytearray(pattern)
        # gpa [0, R) -> file [R, 2R);  gpa [R, 2R) -> file [0, R)
        self.regions = [
            MemRegion(gpa=0, size=region_size, uaddr=UADDR0, fd=self.fd, mmap_offset=region_size),
            MemRegion(gpa=region_size, size=region_size, uaddr=UADDR1, fd=self.fd, mmap_offset=0),
        ]
        self._bump = [0, region_size]  # per region allocation cursor (gpa)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    # address translation ---------------------------------------------------
    def _pieces(self, gpa: int, n: int):
        """(file offset, length) pieces of [gpa, gpa+n)."""
        out = []
        while n:
            if not 0 <= gpa < self.size:
                raise ValueError(f"gpa {gpa:#x} outside test RAM")
            r = gpa // self.region_size
            within = gpa - r * self.region_size
            take = min(n, self.region_size - within)
            foff = (self.region_size if r == 0 else 0) + within
            out.append((foff, take))
            gpa += take
            n -= take
        return out

    def uaddr(self, gpa: int) -> int:
        r = gpa // self.region_size
        return (UADDR0 if r == 0 else UADDR1) + gpa - r * self.region_size

    # access ------------------------------------------------------------------
    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for foff, take in self._pieces(gpa, len(data)):
            self.map[foff:foff + take] = data[pos:pos + take]
            self.expect[foff:foff + take] = data[pos:pos + take]
            pos += take

    def read(self, gpa: int, n: int) -> bytes:
        return b"".join(self.map[foff:foff + take] for foff, take in self._pieces(gpa, n))

    def expect_write(self, gpa: int, data: bytes) -> None:
        """The data plane is allowed (and expected) to have written data at gpa."""
        pos = 0
        for foff, take in self._pieces(gpa, len(data)):
            self.expect[foff:foff + take] = data[pos:pos + take]
            pos += take

    def accept(self, gpa: int, n: int) -> None:
        """Whatever the data plane wrote in [gpa, gpa+n) is fine (checked elsewhere)."""
        for foff, take in self._pieces(gpa, n):
            self.expect[foff:foff + take] = self.map[foff:foff + take]

    def check(self) -> None:
        actual = self.map[:]
        if actual != bytes(self.expect):
            diffs = [i for i in range(self.size) if actual[i] != self.expect[i]]
            first = diffs[0]
            gpa = first + self.region_size if first < self.region_size else first - self.region_size
            raise AssertionError(
                f"guest RAM changed outside allowed ranges: {len(diffs)} bytes, first at "
                f"gpa {gpa:#x}: {actual[first]:#x} != expected {self.expect[first]:#x}")

    # allocation with canary gaps -------------------------------------------
    def alloc(self, size: int, align: int = 16, region: int = 0, gap: int = 64) -> int:
        cur = self._bump[region]
        cur = (cur + gap + align - 1) // align * align
        if cur + size > (region + 1) * self.region_size:
            raise MemoryError("test RAM exhausted")
        self._bump[region] = cur + size
        return cur

    def alloc_crossing(self, size: int, before: int) -> int:
        """A buffer crossing the region boundary with `before` bytes in region 0."""
        gpa = self.region_size - before
        if self._bump[0] > gpa - 64:
            raise MemoryError("region 0 tail already used")
        self._bump[0] = self.region_size
        self._bump[1] = max(self._bump[1], gpa + size)
        return gpa


@dataclass
class Buf:
    gpa: int
    len: int
    writable: bool = False


class GuestQueue:
    """The guest driver's side of one split virtqueue."""

    def __init__(self, mem: GuestMem, num: int, event_idx: bool = False):
        self.mem = mem
        self.num = num
        self.event_idx = event_idx
        self.desc = mem.alloc(16 * num, align=16)
        self.avail = mem.alloc(6 + 2 * num, align=2)
        self.used = mem.alloc(6 + 8 * num, align=4)
        mem.write(self.desc, bytes(16 * num))
        mem.write(self.avail, bytes(6 + 2 * num))
        mem.write(self.used, bytes(6 + 8 * num))
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.outstanding: dict[int, list[int]] = {}  # head -> descriptor indices

    # raw ring writes ---------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr & (2**64 - 1), length, flags, nxt))

    def put_avail(self, head: int, publish: bool = True) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, v: int) -> None:
        self.avail_idx = v & 0xFFFF
        self.publish()

    def set_avail_flags(self, v: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", v))

    def set_used_event(self, v: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.num, struct.pack("<H", v & 0xFFFF))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.num, 2))[0]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    # driver operations ---------------------------------------------------
    def add(self, bufs: list[Buf], *, publish: bool = True) -> int:
        """Post a direct chain; returns the head."""
        idx = [self.free.pop(0) for _ in bufs]
        for k, (i, b) in enumerate(zip(idx, bufs)):
            last = k == len(bufs) - 1
            flags = (F_WRITE if b.writable else 0) | (0 if last else F_NEXT)
            self.write_desc(i, b.gpa, b.len, flags, 0 if last else idx[k + 1])
        self.outstanding[idx[0]] = idx
        self.put_avail(idx[0], publish)
        return idx[0]

    def add_indirect(self, bufs: list[Buf], *, publish: bool = True) -> int:
        table = self.mem.alloc(16 * len(bufs), align=16)
        data = b""
        for k, b in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (F_WRITE if b.writable else 0) | (0 if last else F_NEXT)
            data += struct.pack("<QIHH", b.gpa, b.len, flags, 0 if last else k + 1)
        self.mem.write(table, data)
        i = self.free.pop(0)
        self.write_desc(i, table, 16 * len(bufs), F_INDIRECT)
        self.outstanding[i] = [i]
        self.put_avail(i, publish)
        return i

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len); accepts the used ring bytes as legit writes."""
        self.mem.accept(self.used, 6 + 8 * self.num)
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.num
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        for head, _ in out:
            for i in self.outstanding.pop(head, []):
                self.free.append(i)
        return out


@dataclass
class SDesc:
    index: int
    addr: int
    len: int
    flags: int
    next: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & F_WRITE)


@dataclass
class SReq:
    head: int
    descs: list[SDesc] = field(default_factory=list)

    @property
    def writable_bytes(self) -> int:
        return sum(d.len for d in self.descs if d.writable)


class Backend:
    """The backend's view: the shadow memfd mapped, one queue."""

    def __init__(self, dev, q: int, num: int, event_idx: bool = False):
        self.dev = dev
        self.event_idx = event_idx  # if set, pending() asks for a kick at the next entry
        self.q = q
        self.num = num
        self.map = mmap.mmap(dev.shadow_fd, dev.shadow_size)
        d, a, u = dev.queue_shadow_addrs(q)
        self.desc, self.avail, self.used = (x - SHADOW_UADDR_BASE for x in (d, a, u))
        self.kick_fd, self.call_fd = dev.queue_backend_fds(q)
        self.last_avail = 0
        self.used_idx = 0

    def close(self) -> None:
        self.map.close()

    def restart(self) -> None:
        """The shadow ring was re-created (queue_start after queue_stop): indices from 0."""
        self.last_avail = 0
        self.used_idx = 0

    def _u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.map, off)[0]

    def avail_idx(self) -> int:
        return self._u16(self.avail + 2)

    def avail_flags(self) -> int:
        return self._u16(self.avail)

    def used_event(self) -> int:
        return self._u16(self.avail + 4 + 2 * self.num)

    def set_used_flags(self, v: int) -> None:
        struct.pack_into("<H", self.map, self.used, v)

    def set_avail_event(self, v: int) -> None:
        struct.pack_into("<H", self.map, self.used + 4 + 8 * self.num, v & 0xFFFF)

    def read_desc(self, i: int) -> SDesc:
        addr, ln, fl, nx = struct.unpack_from("<QIHH", self.map, self.desc + 16 * i)
        return SDesc(i, addr, ln, fl, nx)

    def write_desc(self, i: int, addr: int, ln: int, fl: int, nx: int) -> None:
        struct.pack_into("<QIHH", self.map, self.desc + 16 * i, addr, ln, fl, nx)

    def pending(self) -> list[SReq]:
        out = []
        idx = self.avail_idx()
        while self.last_avail != idx:
            head = self._u16(self.avail + 4 + 2 * (self.last_avail % self.num))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            req = SReq(head)
            i = head
            for _ in range(self.num):
                d = self.read_desc(i)
                req.descs.append(d)
                if not d.flags & F_NEXT:
                    break
                i = d.next
            out.append(req)
        if self.event_idx:
            self.set_avail_event(self.last_avail)
        return out

    def offset(self, addr: int) -> int:
        off = addr - SHADOW_GPA_BASE
        assert 0 <= off < self.dev.shadow_size, f"shadow addr {addr:#x} outside the region"
        return off

    def read(self, d: SDesc) -> bytes:
        off = self.offset(d.addr)
        return bytes(self.map[off:off + d.len])

    def write(self, d: SDesc, data: bytes) -> None:
        off = self.offset(d.addr)
        assert len(data) <= d.len
        self.map[off:off + len(data)] = data

    def complete(self, head: int, length: int, *, publish: bool = True) -> None:
        struct.pack_into("<II", self.map, self.used + 4 + 8 * (self.used_idx % self.num), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        struct.pack_into("<H", self.map, self.used + 2, self.used_idx)

    def set_used_idx(self, v: int) -> None:
        self.used_idx = v & 0xFFFF
        self.publish()


class Rig:
    """DataPlane + one Device + guest queues + backends, synchronous by default."""

    def __init__(self, *, num: int = 16, nq: int = 1, event_idx: bool = False,
                 backend_event_idx: bool | None = None, bounce: int = 1 << 20,
                 max_request_bytes: int = 256 << 10, kick: bool = True, start: bool = True,
                 busy_poll_us: int = 0, stream_copy_min: int = 0, latency_histograms: bool = True,
                 dp: DataPlane | None = None, name: str = "test0", **dev_kw):
        """dev_kw: DataPlane.add_device's failure, failure_first_queue, layout, max_replays, loop.
        dp: a data plane shared with other rigs (closed by its owner, not by this rig)."""
        self.own_dp = dp is None
        self.dp = DataPlane(busy_poll_us=busy_poll_us, stream_copy_min=stream_copy_min,
                            latency_histograms=latency_histograms) if dp is None else dp
        self.mem = GuestMem()
        self.dev = self.dp.add_device(name, num_queues=nq, bounce_per_queue=bounce,
                                      max_request_bytes=max_request_bytes, max_queue_size=1024,
                                      **dev_kw)
        self.dev.set_mem_table(self.mem.regions)
        self.num = num
        self.event_idx = event_idx
        self.backend_event_idx = event_idx if backend_event_idx is None else backend_event_idx
        self.gq: list[GuestQueue] = []
        self.be: list[Backend] = []
        self.kick: list[int | None] = []
        self.call: list[int] = []
        for q in range(nq):
            g = GuestQueue(self.mem, num, event_idx)
            self.gq.append(g)
            self.dev.queue_set_num(q, num)
            self.dev.queue_set_base(q, 0)
            self.dev.queue_set_addr(q, self.mem.uaddr(g.desc), self.mem.uaddr(g.avail),
                                    self.mem.uaddr(g.used))
            k = make_eventfd() if kick else None
            c = make_eventfd()
            self.kick.append(k)
            self.call.append(c)
            self.dev.queue_set_guest_kick(q, k)
            self.dev.queue_set_guest_call(q, c)
            self.be.append(Backend(self.dev, q, num, self.backend_event_idx))
            if start:
                self.start(q)

    def start(self, q: int = 0, backend_lost: bool = False) -> None:
        self.dev.queue_start(q, event_idx=self.event_idx, backend_event_idx=self.backend_event_idx,
                             backend_lost=backend_lost)

    def close(self) -> None:
        for b in self.be:
            b.close()
        if self.own_dp:
            self.dp.close()
        else:
            self.dp.remove_device(self.dev)
        for fd in self.kick + self.call:
            if fd is not None:
                os.close(fd)
        self.mem.close()

    def poll(self) -> int:
        return self.dev.poll()

    def events(self):
        return self.dp.drain_events()

    # blk-like requests -----------------------------------------------------
    def blk_read(self, q: int, nbytes: int, *, region: int = 0, crossing: int | None = None,
                 indirect: bool = False, publish: bool = True):
        """Header (16 B, readable), data (writable), status (1 B, writable)."""
        g = self.gq[q]
        hdr = self.mem.alloc(16, region=region)
        self.mem.write(hdr, struct.pack("<IIQ", 0, 0, 7))
        if crossing is not None:
            data = self.mem.alloc_crossing(nbytes, crossing)
        else:
            data = self.mem.alloc(nbytes, align=512, region=region)
        st = self.mem.alloc(1, region=1 if crossing is not None else region)
        bufs = [Buf(hdr, 16), Buf(data, nbytes, True), Buf(st, 1, True)]
        head = (g.add_indirect if indirect else g.add)(bufs, publish=publish)
        return head, bufs

    def blk_write(self, q: int, payload: bytes, *, region: int = 0, crossing: int | None = None,
                  indirect: bool = False, publish: bool = True):
        g = self.gq[q]
        hdr = self.mem.alloc(16, region=region)
        self.mem.write(hdr, struct.pack("<IIQ", 1, 0, 9))
        if crossing is not None:
            data = self.mem.alloc_crossing(len(payload), crossing)
        else:
            data = self.mem.alloc(len(payload), align=512, region=region)
        self.mem.write(data, payload)
        st = self.mem.alloc(1, region=1 if crossing is not None else region)
        bufs = [Buf(hdr, 16), Buf(data, len(payload)), Buf(st, 1, True)]
        head = (g.add_indirect if indirect else g.add)(bufs, publish=publish)
        return head, bufs

    def accept_writable(self, bufs) -> None:
        """Accept whatever was copied into the writable buffers of a request."""
        for b in bufs:
            if b.writable and b.len:
                self.mem.accept(b.gpa, b.len)

    def serve(self, q: int, reqs: list[SReq], fill=None) -> dict[int, bytes]:
        """Backend: fill every writable descriptor completely, complete with the full
        writable length.  Returns {shadow head: concatenated written bytes}."""
        be = self.be[q]
        written = {}
        for r in reqs:
            out = b""
            for d in r.descs:
                if d.writable:
                    data = fill(r, d) if fill else bytes([(r.head * 7 + d.index + k) & 0xFF
                                                           for k in range(d.len)])
                    be.write(d, data)
                    out += data
            written[r.head] = out
            be.complete(r.head, len(out))
        return written
