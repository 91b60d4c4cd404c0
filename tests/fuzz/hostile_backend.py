"""A scripted hostile vhost-user-blk backend, in Python, for the session fuzzer.

fastshadow (isolated mode) connects to it like to qemu-storage-daemon. It answers
the control requests plausibly (features with VERSION_1 | PROTOCOL_FEATURES | ...,
protocol features MQ | REPLY_ACK | CONFIG | ..., one queue, a virtio-blk config
space, acks), maps the one memory region it is given (the shadow region: the only
memory it ever sees) and serves queue 0 of it. What it does on the shadow ring is
scripted by the test thread, one action at a time (`act`): correct completions, or a
lie (unknown ids, duplicate completions, used.len over the writable size, used idx
jumps, rewritten descriptors / avail ring / bounce bytes, a dropped connection).
How it answers GET_VRING_BASE is scripted too (`stop_mode`).

fastshadow reconnects when the connection drops; every connection is served by
its own thread, and the test's actions apply to the newest one.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from fastshadow.protocol import Channel, Connection, VhostUserError
from fastshadow.protocol import payloads as p
from fastshadow.protocol.features import ProtocolFeature as PF
from fastshadow.protocol.features import VirtioFeature as VF
from fastshadow.protocol.messages import FrontendReq as R
from fastshadow.protocol.messages import Message, Negotiation

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH = 1 << 2, 1 << 6, 1 << 9

FEATURES = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX
               | BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH)
PROTOCOL_FEATURES = int(PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.RESET_DEVICE | PF.STATUS)
CAPACITY = 2048  # sectors
#: struct virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry, blk_size.
CONFIG = struct.pack("<QIIHBBI", CAPACITY, 0, 126, 0, 0, 0, 512).ljust(60, b"\0")

#: What `act` can be told to do on the shadow ring.
HONEST_ACTIONS = ("honest", "partial", "reorder", "take", "delay")
LIES = ("unknown_id", "double", "len_too_large", "idx_jump", "scribble_desc", "scribble_avail",
        "scribble_bounce", "stale_id", "chaos", "close")
ACTIONS = HONEST_ACTIONS + LIES
#: How GET_VRING_BASE is answered: complete what was taken first, or keep it, or name a
#: made-up stop index, or drop the connection instead of answering. ("stall": send half a
#: reply and nothing more, keeping the connection open; a regression case, not fuzzed.)
STOP_MODES = ("drain", "hold", "lie", "close")


@dataclass
class SReq:
    """A request as the backend read it from the shadow ring (its own copy)."""

    head: int
    descs: list[tuple[int, int, int, int]] = field(default_factory=list)  # (addr, len, flags, next)

    @property
    def writable(self) -> int:
        return sum(ln for _, ln, fl, _ in self.descs if fl & F_WRITE)


@dataclass
class Ring:
    num: int = 0
    desc: int | None = None    # offsets in the shadow mapping
    avail: int | None = None
    used: int | None = None
    last_avail: int = 0
    used_idx: int = 0
    kick: int | None = None
    call: int | None = None
    started: bool = False
    enabled: bool = False
    held: dict[int, SReq] = field(default_factory=dict)   # taken, not completed (by shadow head)
    done: list[int] = field(default_factory=list)        # heads completed on this ring

    def close_fds(self) -> None:
        for fd in (self.kick, self.call):
            if fd is not None:
                os.close(fd)
        self.kick = self.call = None


class BackendConn:
    """One connection from fastshadow: the control requests, the mapping, the rings."""

    def __init__(self, owner: "HostileBackend", sock: socket.socket, number: int):
        self.owner = owner
        self.number = number
        self.conn = Connection(sock, Channel.MAIN, receives_replies=False, name="proxy")
        self.neg = Negotiation()
        self.map: mmap.mmap | None = None
        self.gpa = self.uaddr = self.size = 0
        self.rings: dict[int, Ring] = {}
        self.status = 0
        self.alive = True
        self.thread = threading.Thread(target=self._serve, name=f"hostile-{number}", daemon=True)

    # -- control ------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                with self.owner.lock:
                    self.owner.log.append((self.number, msg.request.name))
                    if self.owner.reply_delay:
                        time.sleep(self.owner.reply_delay)
                    if not self._handle(msg):
                        return
        except (VhostUserError, OSError):
            pass
        finally:
            with self.owner.lock:
                self._close()

    def _close(self) -> None:
        self.alive = False
        self.conn.close()
        for r in self.rings.values():
            r.close_fds()
        if self.map is not None:
            self.map.close()
            self.map = None

    def drop(self) -> None:
        """Close the connection, as a backend that dies."""
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def ring(self, q: int) -> Ring:
        return self.rings.setdefault(q, Ring())

    def _handle(self, msg: Message) -> bool:
        """Answer one request; False: the connection is dropped instead."""
        self.neg.observe(msg)
        req, pl = msg.request, msg.payload
        reply: p.Payload | None = None
        try:
            if req == R.GET_FEATURES:
                reply = p.U64(FEATURES)
            elif req == R.GET_PROTOCOL_FEATURES:
                reply = p.U64(PROTOCOL_FEATURES)
            elif req == R.GET_QUEUE_NUM:
                reply = p.U64(1)
            elif req == R.GET_MAX_MEM_SLOTS:
                reply = p.U64(8)
            elif req == R.GET_STATUS:
                reply = p.U64(self.status)
            elif req == R.SET_STATUS:
                self.status = pl.value & 0xFF
            elif req == R.GET_CONFIG:
                data = CONFIG[pl.offset:pl.offset + len(pl.data)]
                reply = p.Config(pl.offset, pl.flags, data.ljust(len(pl.data), b"\0"))
            elif req == R.SET_MEM_TABLE:
                self._map(pl.regions, msg.fds)
            elif req == R.SET_VRING_NUM:
                self.ring(pl.index).num = pl.num
            elif req == R.SET_VRING_ADDR:
                r = self.ring(pl.index)
                r.desc, r.avail, r.used = (a - self.uaddr for a in (pl.desc, pl.avail, pl.used))
            elif req == R.SET_VRING_BASE:
                r = self.ring(pl.index)
                r.last_avail = r.used_idx = pl.num & 0xFFFF
                r.held.clear()
            elif req in (R.SET_VRING_KICK, R.SET_VRING_CALL):
                r = self.ring(pl.index)
                fd = os.dup(msg.fds[0]) if msg.fds else None
                if req == R.SET_VRING_KICK:
                    if r.kick is not None:
                        os.close(r.kick)
                    r.kick, r.started = fd, True
                else:
                    if r.call is not None:
                        os.close(r.call)
                    r.call = fd
            elif req == R.SET_VRING_ENABLE:
                self.ring(pl.index).enabled = bool(pl.num)
            elif req == R.GET_VRING_BASE:
                r = self.ring(pl.index)
                mode, self.owner.stop_mode = self.owner.stop_mode, "drain"
                if mode == "close":
                    self.owner.lies.append("stop:close")
                    self.drop()
                    return False
                if mode == "stall":  # half a reply header, then nothing: the connection stays open
                    self.owner.lies.append("stop:stall")
                    self.conn.sock.sendall(msg.reply(p.VringState(pl.index, r.last_avail)).encode()[:6])
                    return True
                if mode == "drain":
                    self._take(r)
                    for sreq in list(r.held.values()):
                        self._complete(r, sreq, sreq.writable)
                nxt = r.last_avail
                if mode == "lie":
                    self.owner.lies.append("stop:lie")
                    nxt = random.Random(len(self.owner.log)).choice([r.last_avail + 1, r.last_avail + 999, 0x7777,
                                                                      (r.last_avail - 1) & 0xFFFF])
                elif mode == "hold" and r.held:
                    self.owner.lies.append("stop:hold")
                r.started = False
                r.held.clear()
                reply = p.VringState(pl.index, nxt & 0xFFFF)
            elif req in (R.RESET_DEVICE, R.RESET_OWNER):
                for r in self.rings.values():
                    r.close_fds()
                self.rings.clear()
        finally:
            msg.close_fds()
        if reply is not None:
            self.conn.send(msg.reply(reply))
        elif self.neg.expects_reply(msg):
            self.conn.send(msg.ack())
        return True

    def _map(self, regions: list[p.MemoryRegion], fds: list[int]) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        r = regions[0]
        self.map = mmap.mmap(fds[0], r.memory_size, offset=r.mmap_offset)
        self.gpa, self.uaddr, self.size = r.guest_phys_addr, r.userspace_addr, r.memory_size

    # -- the shadow ring ----------------------------------------------------------------------
    def _ready(self, r: Ring) -> bool:
        return (self.alive and self.map is not None and r.num > 0 and r.started
                and None not in (r.desc, r.avail, r.used))

    def _u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.map, off)[0]

    def _take(self, r: Ring) -> list[SReq]:
        """Read what fastshadow published since last time (bounded, whatever the ring says)."""
        if not self._ready(r):
            return []
        out = []
        idx = self._u16(r.avail + 2)
        for _ in range(r.num):
            if r.last_avail == idx:
                break
            head = self._u16(r.avail + 4 + 2 * (r.last_avail % r.num))
            r.last_avail = (r.last_avail + 1) & 0xFFFF
            sreq = SReq(head)
            i = head
            for _ in range(r.num):
                if i >= r.num:
                    break
                addr, ln, fl, nx = struct.unpack_from("<QIHH", self.map, r.desc + 16 * i)
                sreq.descs.append((addr, ln, fl, nx))
                if not fl & F_NEXT:
                    break
                i = nx
            r.held[head] = sreq
            out.append(sreq)
        return out

    def _write_used(self, r: Ring, head: int, length: int, *, publish: bool = True) -> None:
        struct.pack_into("<II", self.map, r.used + 4 + 8 * (r.used_idx % r.num), head & 0xFFFFFFFF,
                         length & 0xFFFFFFFF)
        r.used_idx = (r.used_idx + 1) & 0xFFFF
        if publish:
            struct.pack_into("<H", self.map, r.used + 2, r.used_idx)

    def _call(self, r: Ring) -> None:
        if r.call is not None:
            try:
                os.eventfd_write(r.call, 1)
            except OSError:
                pass

    def _fill(self, sreq: SReq, length: int) -> None:
        """Write `length` bytes of data into the writable buffers, inside the shadow only."""
        left = length
        for addr, ln, fl, _ in sreq.descs:
            if not fl & F_WRITE or not left:
                continue
            take = min(ln, left)
            off = addr - self.gpa
            if 0 <= off and off + take <= self.size:
                self.map[off:off + take] = bytes([(sreq.head + k) & 0xFF for k in range(min(take, 64))]) \
                    .ljust(take, b"\xa5")
            left -= take

    def _complete(self, r: Ring, sreq: SReq, length: int) -> None:
        self._fill(sreq, min(length, sreq.writable))
        self._write_used(r, sreq.head, length)
        r.held.pop(sreq.head, None)
        r.done.append(sreq.head)
        self._call(r)

    def act(self, action: str, arg: int) -> None:
        r = self.rings.get(0)
        if r is None or not self._ready(r):
            if action == "close":
                self.owner.lies.append("close")
                self.drop()
            return
        rnd = random.Random(arg)
        lies = self.owner.lies
        if action in ("honest", "delay", "reorder", "partial"):
            self._take(r)
            held = list(r.held.values())
            if action == "reorder":
                held.reverse()
            for k, sreq in enumerate(held):
                if action == "partial" and not (arg >> k) & 1:
                    continue
                length = sreq.writable if action != "partial" else rnd.randint(0, sreq.writable)
                self._complete(r, sreq, length)
        elif action == "take":
            self._take(r)
        elif action == "unknown_id":
            lies.append(action)
            self._take(r)
            inner = [i for s in r.held.values() for i in _chain_indices(s)[1:]]
            bad = rnd.choice([r.num + arg % 100, 0xFFFFFFFF, 0x10000 + r.num, *inner[:3]])
            self._write_used(r, bad, rnd.randint(0, 4096))
            self._call(r)
        elif action == "double":
            lies.append(action)
            self._take(r)
            if r.held:
                sreq = r.held[rnd.choice(sorted(r.held))]
                self._complete(r, sreq, sreq.writable)
                self._write_used(r, sreq.head, sreq.writable)
            elif r.done:
                self._write_used(r, r.done[-1], 1)
            self._call(r)
        elif action == "len_too_large":
            lies.append(action)
            self._take(r)
            if r.held:
                sreq = r.held[rnd.choice(sorted(r.held))]
                self._complete(r, sreq, rnd.choice([sreq.writable + 1, sreq.writable + 4096, 0xFFFFFFFF]))
        elif action == "idx_jump":
            lies.append(action)
            r.used_idx = (r.used_idx + len(r.held) + 1 + arg % 1000) & 0xFFFF
            struct.pack_into("<H", self.map, r.used + 2, r.used_idx)
            self._call(r)
        elif action == "scribble_desc":
            lies.append(action)
            self._take(r)
            for i in range(r.num):
                if rnd.random() < 0.5:
                    struct.pack_into("<QIHH", self.map, r.desc + 16 * i, rnd.choice(
                        [rnd.randrange(self.gpa, self.gpa + self.size), 0, 2**64 - 16, self.gpa]),
                        rnd.choice([0, 1, 4096, 1 << 20, 0xFFFFFFFF]), rnd.randrange(8), rnd.randrange(r.num + 4))
            for sreq in list(r.held.values()):
                if rnd.random() < 0.6:  # "complete" as the rewritten ring says
                    self._write_used(r, sreq.head, rnd.choice([sreq.writable, 4096, 1 << 20]))
                    r.held.pop(sreq.head)
                    r.done.append(sreq.head)
            self._call(r)
        elif action == "scribble_avail":
            # Garbage in the whole avail ring fastshadow writes (which it must never read back);
            # the backend took everything first and puts the index back after a while, so that
            # it can behave again (fastshadow rewrites the ring when it publishes more).
            lies.append(action)
            self._take(r)
            size = 6 + 2 * r.num
            idx = self.map[r.avail + 2:r.avail + 4]
            garbage = rnd.randbytes(size)
            self.map[r.avail:r.avail + size] = garbage
            self._call(r)
            self._restore_later(r.avail + 2, garbage[2:4], idx)
        elif action == "scribble_bounce":
            # Garbage in the bounce area (and the descriptor table) of requests in flight.
            lies.append(action)
            lo, hi = r.avail, r.used + 6 + 8 * r.num  # the avail and used rings: see the lies above
            for _ in range(8):
                off = rnd.randrange(0, self.size - 4096)
                if off < hi and off + 4096 > lo:
                    continue
                self.map[off:off + 4096] = rnd.randbytes(4096)
        elif action == "stale_id":
            lies.append(action)
            if r.done:
                self._write_used(r, rnd.choice(r.done), 0)
                self._call(r)
        elif action == "chaos":
            # Garbage in the whole used ring for a moment, then the backend's own state back: what
            # fastshadow read meanwhile it must survive (and it may decide the ring is broken).
            lies.append(action)
            size = 6 + 8 * r.num
            before = self.map[r.used:r.used + size]
            garbage = rnd.randbytes(size)
            self.map[r.used:r.used + size] = garbage
            self._call(r)
            self._restore_later(r.used, garbage, before)
        elif action == "close":
            lies.append(action)
            self.drop()


    def _restore_later(self, off: int, garbage: bytes, good: bytes) -> None:
        """After a moment (HostileBackend.act, the lock released meanwhile) put `good` back at
        `off`, unless the bytes there changed from `garbage` (fastshadow wrote them since)."""
        self.owner.restores.append((self, off, garbage, good))


def _chain_indices(sreq: SReq) -> list[int]:
    out = [sreq.head]
    for _, _, _, nx in sreq.descs[:-1]:
        out.append(nx)
    return out


class HostileBackend:
    """Listens on `path`; each connection from fastshadow gets a BackendConn."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.RLock()
        self.conns: list[BackendConn] = []
        self.log: list[tuple[int, str]] = []   # (connection number, request name)
        self.lies: list[str] = []
        self.restores: list[tuple] = []   # lies that undo themselves (BackendConn._restore_later)
        self.stop_mode = "drain"
        self.reply_delay = 0.0
        if os.path.exists(path):
            os.unlink(path)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._srv.bind(path)
        self._srv.listen(8)
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="hostile-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._srv.accept()
            except OSError:
                return
            with self.lock:
                c = BackendConn(self, sock, len(self.conns))
                self.conns.append(c)
            c.thread.start()

    @property
    def current(self) -> BackendConn | None:
        with self.lock:
            return self.conns[-1] if self.conns and self.conns[-1].alive else None

    def reset_script(self) -> None:
        """A new example: forget the lies told and answer the next stop honestly."""
        with self.lock:
            self.lies.clear()
            self.stop_mode = "drain"
            self.reply_delay = 0.0

    def act(self, action: str, arg: int = 0) -> None:
        if action == "delay":
            time.sleep((arg % 40) / 1000)
        with self.lock:
            c = self.current
            if c is not None:
                c.act(action, arg)
        if self.restores:
            time.sleep(0.02)  # fastshadow sees the garbage meanwhile (the backend called it)
            with self.lock:
                for c, off, garbage, good in self.restores:
                    if c.map is not None and c.map[off:off + len(garbage)] == garbage:
                        c.map[off:off + len(good)] = good
                self.restores.clear()

    def shadow_avail_idx(self) -> int | None:
        """The avail idx fastshadow published on queue 0 of the current connection."""
        with self.lock:
            c = self.current
            r = c.rings.get(0) if c is not None else None
            if r is None or c.map is None or r.avail is None:
                return None
            return c._u16(r.avail + 2)

    def close(self) -> None:
        self._closing = True
        try:
            self._srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._srv.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.drop()
        for c in conns:
            c.thread.join(5)
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass
