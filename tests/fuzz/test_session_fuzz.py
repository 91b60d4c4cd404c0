"""A live isolated session under a hostile backend and a hostile guest driver (hypothesis).

One real `fastshadow proxy --mode isolated` serves two devices:
- device A: its backend is tests/fuzz/hostile_backend.py (scripted, in this process); its
  front-end is fastshadow's own Frontend with guest RAM from tests/dataplane/harness.py
  (GuestMem: a canary pattern everywhere, mirrored in a model);
- device B: a real qemu-storage-daemon.

Each hypothesis example is one QEMU-like session on device A: bring-up with drawn
features, then a short sequence of steps: post a virtio-blk-like chain (mostly valid,
sometimes hostile: unmapped or wrapping addresses, loops, next out of range, writable
before readable, zero-length, over the size limit, bad indirect tables, buffers
crossing the region boundary or shared with another request), kick, let the backend
tell the truth or a lie, stop the ring (GET_VRING_BASE, with the backend draining,
holding, lying about its index or hanging up) and start it again, SET_FEATURES,
SET_VRING_ENABLE, other control requests (even a device reset or one isolated mode
refuses).

After every step:
- guest RAM is unchanged outside the device-writable buffers of requests in flight,
  the first used.len bytes of completed requests' writable buffers and the used ring
  (a completion of len 1 may also be a failure status in the last writable byte);
- each used entry names a guest head in flight (each request completes at most once)
  and its len is at most the request's writable bytes (0 or 1 for a refused chain);
- the proxy process is alive.
At the end: the backend behaves (completes everything correctly), and every request
must complete (any status) or the session end within a bounded time; the proxy log
shows no crash; device B serves a verified write and read.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fastshadow.protocol import VhostUserError
from fastshadow.protocol import payloads as p
from fastshadow.protocol.features import ProtocolFeature as PF
from fastshadow.protocol.features import VirtioFeature as VF
from fastshadow.protocol.frontend import Frontend
from fastshadow.protocol.messages import HEADER, VERSION
from fastshadow.protocol.messages import FrontendReq as R

from ..dataplane.harness import F_INDIRECT, F_NEXT, F_WRITE, GuestMem, GuestQueue, make_eventfd
from ..dataplane.test_fuzz import Ref
from ..proxy.blkfront import BlkFront
from .hostile_backend import ACTIONS, STOP_MODES, HostileBackend

pytestmark = pytest.mark.fuzz

NUM = 16                    # guest queue size
MAX_REQUEST = 64 << 10      # --max-request-bytes
BOUNCE = 256 << 10          # --bounce-per-queue: four big requests fill it (back-pressure)
REPLY_TIMEOUT = 0.5         # --reply-timeout: bounds a ring stop the backend does not drain
FE_TIMEOUT = 10.0           # our front-end's wait for any reply
SETTLE_TIMEOUT = 3.0        # "no hang": after the backend behaves, everything completes within this
ITAB_AREA = 32 << 10        # indirect tables live here (region 1 start), never reused in an example
U64_MAX = (1 << 64) - 1

#: Log line of a lie the current code cannot ride out without the backend being dropped
#: (see test_regression_used_idx_jump_then_honest_backend): the fuzzer then checks that
#: dropping the backend unblocks the guest instead. Empty this once the bug is fixed.
KNOWN_HANG_LOG = ()  # none since the ring is no longer abandoned


# -- the steps a scenario is made of --------------------------------------------------------

@dataclass(frozen=True)
class Post:
    """Post one virtio-blk-like request (and kick unless `kick` is false)."""
    kind: int = 0                     # VIRTIO_BLK_T_IN 0, OUT 1, FLUSH 4, GET_ID 8
    segs: tuple[int, ...] = (4096,)   # data segment lengths
    indirect: bool = False
    hostile: str = ""                 # "" or one of HOSTILE
    pick: int = 0                     # drives the choices a hostile variant makes
    kick: bool = True


@dataclass(frozen=True)
class Kick:
    pass


@dataclass(frozen=True)
class Act:
    """The backend does something on the shadow ring (ACTIONS: truths and lies)."""
    action: str = "honest"
    arg: int = 0


@dataclass(frozen=True)
class Stop:
    """GET_VRING_BASE (the backend answering as `mode` says), then start the ring again
    (SET_VRING_NUM / BASE / ADDR / CALL / KICK) unless `restart` is false."""
    mode: str = "drain"
    restart: bool = True


@dataclass(frozen=True)
class Control:
    """Another control request: see Driver.control."""
    what: str = "get_features"
    arg: int = 0


HOSTILE = ("bad_addr", "wrap_addr", "past_end", "loop", "next_oob", "w_before_r", "zero_len", "huge",
           "wild", "overlap", "crossing", "ind_nested", "ind_bad_len", "ind_next")
CONTROLS = ("get_features", "get_protocol_features", "get_queue_num", "get_config", "get_max_mem_slots",
            "set_config", "get_status", "set_status", "set_vring_call", "set_vring_err", "set_vring_kick",
            "set_vring_enable", "set_features", "set_features_bad", "reset_device", "refused", "malformed",
            "rem_region1", "add_region1", "set_mem_table")


@dataclass(frozen=True)
class Scenario:
    reply_ack: bool = True
    event_idx: bool = False
    reply_delay_ms: int = 0
    steps: tuple = ()
    busy_ms: int = 0        # >0: meanwhile a backend thread also completes correctly, every busy_ms ms


seg_len = st.one_of(st.sampled_from([0, 1, 16, 511, 512, 4096, 8192, 16384]), st.integers(0, 20000))
posts = st.builds(Post, kind=st.sampled_from([0, 0, 1, 1, 4, 8]), segs=st.lists(seg_len, max_size=3).map(tuple),
                  indirect=st.booleans(),
                  hostile=st.one_of(st.just(""), st.just(""), st.just(""), st.sampled_from(HOSTILE)),
                  pick=st.integers(0, 255), kick=st.booleans() | st.just(True))
acts = st.builds(Act, st.sampled_from(ACTIONS), st.integers(0, 2**16))
steps = st.one_of(
    posts, posts, posts,
    acts, acts,
    st.builds(Act, st.sampled_from(["honest", "partial", "reorder"]), st.integers(0, 2**16)),
    st.just(Kick()),
    st.builds(Stop, st.sampled_from(STOP_MODES), st.booleans() | st.just(True)),
    st.builds(Control, st.sampled_from(CONTROLS), st.integers(0, 255)),
)
scenarios = st.builds(Scenario, st.booleans(), st.booleans(), st.sampled_from([0, 0, 0, 5, 20]),
                      st.lists(steps, min_size=3, max_size=16).map(tuple), st.sampled_from([0, 0, 0, 1, 5]))


# -- the guest driver model -----------------------------------------------------------------------

@dataclass
class Req:
    head: int
    label: str
    reach: set[int]                 # main-table descriptors it occupies until completed
    refused: str | None             # why the reference walker refuses the chain (None: valid)
    segs: list[tuple[int, int, bool]] = field(default_factory=list)  # valid chains: (gpa, len, writable)
    status_candidates: list[int] = field(default_factory=list)       # refused chains: last writable bytes

    @property
    def writable(self) -> int:
        return sum(ln for _, ln, w in self.segs if w)

    def writable_ranges(self) -> list[tuple[int, int]]:
        if self.refused:
            return [(g, 1) for g in self.status_candidates]
        return [(g, ln) for g, ln, w in self.segs if w and ln]


class Guest:
    """Guest RAM (canary model), queue 0 as the driver sees it, the requests in flight."""

    def __init__(self, seed: int = 1):
        self.mem = GuestMem(seed=seed)
        self.q = GuestQueue(self.mem, NUM)        # the rings: the start of region 0
        self.itab = self.mem.alloc(ITAB_AREA, region=1)
        self.itab_used = 0
        self.data_lo = self.itab + ITAB_AREA       # "wild" buffers land in region 1 past the tables
        self.ref = Ref(self.mem, NUM, MAX_REQUEST)
        self.inflight: dict[int, Req] = {}
        self.completions: list[tuple[int, int, str]] = []
        self.crossing_used = False

    def close(self) -> None:
        self.mem.close()

    def reinit_ring(self) -> None:
        """After a device reset: the driver starts over with empty rings."""
        q = self.q
        self.mem.write(q.desc, bytes(16 * NUM))
        self.mem.write(q.avail, bytes(6 + 2 * NUM))
        self.mem.write(q.used, bytes(6 + 8 * NUM))
        q.avail_idx = q.last_used = 0
        self.inflight.clear()

    # -- posting --------------------------------------------------------------------------------
    def free_descs(self) -> list[int]:
        busy = set().union(*(r.reach for r in self.inflight.values())) if self.inflight else set()
        return [i for i in range(NUM) if i not in busy]

    def alloc(self, n: int, align: int = 16) -> int:
        try:
            return self.mem.alloc(max(n, 1), align=align)
        except MemoryError:
            return self.mem.alloc(max(n, 1), align=align, region=1)

    def alloc_itab(self, n: int) -> int | None:
        if self.itab_used + 16 * n > ITAB_AREA:
            return None
        gpa = self.itab + self.itab_used
        self.itab_used += 16 * n + 16
        return gpa

    def build(self, post: Post) -> list[list[int]] | None:
        """The chain's descriptors [addr, len, flags, next-or-None] before placement."""
        mem, h = self.mem, post.hostile
        hdr = self.alloc(16)
        mem.write(hdr, struct.pack("<IIQ", post.kind, 0, post.pick % 2048))
        descs = [[hdr, 16, 0]]
        segs = post.segs if post.kind in (0, 1) else ((20,) if post.kind == 8 else ())
        writable = post.kind in (0, 8)
        for k, n in enumerate(segs):
            if h == "crossing" and k == 0 and not self.crossing_used and n > 1:
                try:
                    gpa = mem.alloc_crossing(n, max(1, n // 2))
                    self.crossing_used = True
                except MemoryError:
                    gpa = self.alloc(n, 512)
            else:
                gpa = self.alloc(n, 512 if n % 512 == 0 else 16)
            if not writable and n:
                mem.write(gpa, bytes([(post.pick + i) & 0xFF for i in range(min(n, 64))]).ljust(n, b"\x5a"))
            descs.append([gpa, n, F_WRITE if writable else 0])
        st_ = self.alloc(1)
        descs.append([st_, 1, F_WRITE])
        pick = post.pick
        victim = descs[pick % len(descs)]
        if h == "bad_addr":
            victim[0] = [0x4000_0000, 0x1_0000_0000, 0xFFFF_F000][pick % 3]
        elif h == "wrap_addr":
            victim[0], victim[1] = U64_MAX - pick % 64, max(victim[1], 2 + pick % 200)
        elif h == "past_end":
            victim[1] = max(victim[1], 1 + pick)
            victim[0] = mem.size - victim[1] + 1 + pick % max(1, victim[1] - 1)
        elif h == "w_before_r":
            descs[0][2] |= F_WRITE
        elif h == "zero_len":
            for d in descs[:: 1 + pick % 2]:
                d[1] = 0
        elif h == "huge":
            victim[0], victim[1] = self.data_lo, MAX_REQUEST + 1 + pick * 97
        elif h == "wild":
            n = 1 + pick * 31
            victim[0] = self.data_lo + (pick * 7919) % (mem.size - self.data_lo - n)
            victim[1], victim[2] = n, victim[2] | F_WRITE
        elif h == "overlap":
            others = [r for r in self.inflight.values() if r.writable_ranges() and not r.refused]
            if others:
                g, n = others[pick % len(others)].writable_ranges()[0]
                descs[-1][0], descs[-1][1] = g, n
        return descs

    def post(self, post: Post) -> Req | None:
        descs = self.build(post)
        h, pick = post.hostile, post.pick
        free = self.free_descs()
        q = self.q
        if post.indirect or h.startswith("ind_"):
            if not free:
                return None
            table = self.alloc_itab(len(descs) + 1)
            if table is None:
                return None
            entries = []
            for k, (addr, ln, fl) in enumerate(descs):
                last = k == len(descs) - 1
                entries.append([addr, ln, fl | (0 if last else F_NEXT), 0 if last else k + 1])
            tlen = 16 * len(entries)
            head_flags = F_INDIRECT
            if h == "loop":
                entries[-1][2] |= F_NEXT
                entries[-1][3] = pick % len(entries)
            elif h == "next_oob":
                entries[-1][2] |= F_NEXT
                entries[-1][3] = len(entries) + pick % 4
            elif h == "ind_nested":
                entries[pick % len(entries)][2] |= F_INDIRECT
            elif h == "ind_bad_len":
                tlen = [0, tlen - 1, tlen + 8, 16 * (NUM + 1)][pick % 4]
            elif h == "ind_next":
                head_flags |= F_NEXT
            self.mem.write(table, b"".join(struct.pack("<QIHH", a & U64_MAX, ln & 0xFFFFFFFF, fl, nx)
                                           for a, ln, fl, nx in entries))
            head = free[0]
            q.write_desc(head, table, tlen, head_flags, free[1 % len(free)] if len(free) > 1 else 0)
        else:
            if len(free) < len(descs):
                return None
            idx = free[:len(descs)]
            for k, (i, (addr, ln, fl)) in enumerate(zip(idx, descs)):
                last = k == len(descs) - 1
                nxt, flags = (0, fl) if last else (idx[k + 1], fl | F_NEXT)
                if last and h == "loop":
                    nxt, flags = idx[pick % len(idx)], fl | F_NEXT
                elif last and h == "next_oob":
                    nxt, flags = NUM + pick % 4, fl | F_NEXT
                q.write_desc(i, addr & U64_MAX, ln & 0xFFFFFFFF, flags, nxt)
            head = idx[0]
        code, segs = self.ref.walk(q.desc, head)
        req = Req(head, f"{h or 'valid'}{' indirect' if post.indirect else ''} kind {post.kind} "
                        f"segs {post.segs}", self.reach(head), code, segs or [])
        if code:
            req.status_candidates = self.status_candidates(head)
        self.inflight[head] = req
        q.put_avail(head)
        return req

    def raw_desc(self, i: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", self.mem.read(self.q.desc + 16 * i, 16))

    def reach(self, head: int) -> set[int]:
        """Main-table descriptors a walk from `head` may read (following next, bounded)."""
        out, i = set(), head
        for _ in range(NUM + 1):
            if i >= NUM or i in out:
                break
            out.add(i)
            _, _, fl, nx = self.raw_desc(i)
            if not fl & F_NEXT or fl & F_INDIRECT:
                break
            i = nx
        return out

    def status_candidates(self, head: int) -> list[int]:
        """Last bytes of the writable buffers a refused chain names (inside RAM): where a
        device-specific failure status may be written (DESIGN §3, §7)."""
        out = []
        tables = [[self.raw_desc(i) for i in sorted(self.reach(head))]]
        for addr, ln, fl, _ in tables[0]:
            if fl & F_INDIRECT and ln % 16 == 0 and 0 < ln <= 16 * NUM and addr + ln <= self.mem.size:
                raw = self.mem.read(addr, ln)
                tables.append([struct.unpack_from("<QIHH", raw, 16 * k) for k in range(ln // 16)])
        for table in tables:
            for addr, ln, fl, _ in table:
                if fl & F_WRITE and ln and addr + ln <= self.mem.size:
                    out.append(addr + ln - 1)
        return out

    # -- completions and the canary --------------------------------------------------------------------
    def harvest(self) -> list[tuple[int, int]]:
        """New used entries, checked: a head in flight, len within bounds; accepted writes."""
        q, mem = self.q, self.mem
        out = []
        idx = q.used_idx()
        ahead = (idx - q.last_used) & 0xFFFF
        assert ahead <= len(self.inflight), (
            f"guest used idx {idx} is {ahead} entries past the last seen ({q.last_used}) with only "
            f"{len(self.inflight)} requests in flight")
        while q.last_used != idx:
            head, ln = struct.unpack("<II", mem.read(q.used + 4 + 8 * (q.last_used % NUM), 8))
            q.last_used = (q.last_used + 1) & 0xFFFF
            req = self.inflight.pop(head, None)
            assert req is not None, (
                f"used entry for guest head {head} (len {ln}), which is not in flight: a request completed "
                f"twice or a made-up head; completions so far {self.completions[-8:]}")
            if req.refused:
                assert ln <= 1, f"refused chain ({req.refused}, {req.label}) completed with len {ln}"
                for g in req.status_candidates if ln else []:
                    mem.accept(g, 1)
            else:
                assert ln <= req.writable, (
                    f"head {head} ({req.label}) completed with len {ln} > its {req.writable} writable bytes")
                self.accept_first(req, ln)
            self.completions.append((head, ln, req.label))
            out.append((head, ln))
        return out

    def accept_first(self, req: Req, ln: int) -> None:
        left = ln
        wsegs = [(g, n) for g, n, w in req.segs if w and n]
        for g, n in wsegs:
            take = min(n, left)
            if take:
                self.mem.accept(g, take)
            left -= take
        if ln == 1 and wsegs:  # a failure status in the last writable byte
            g, n = wsegs[-1]
            self.mem.accept(g + n - 1, 1)

    def check_canary(self) -> None:
        mem = self.mem
        actual = bytearray(mem.map[:])

        def allow(gpa: int, n: int) -> None:
            for foff, take in mem._pieces(gpa, n):
                actual[foff:foff + take] = mem.expect[foff:foff + take]
        allow(self.q.used, 6 + 8 * NUM)
        for req in self.inflight.values():
            for g, n in req.writable_ranges():
                allow(g, n)
        if actual != mem.expect:
            first = next(i for i in range(mem.size) if actual[i] != mem.expect[i])
            gpa = first + mem.region_size if first < mem.region_size else first - mem.region_size
            n = sum(1 for i in range(first, min(mem.size, first + 4096)) if actual[i] != mem.expect[i])
            raise AssertionError(f"guest RAM changed outside the writable buffers of requests in flight: at gpa "
                                 f"{gpa:#x} ({n} bytes in the next 4 KiB); in flight: "
                                 f"{[(r.head, r.label, r.writable_ranges()) for r in self.inflight.values()]}; "
                                 f"last completions {self.completions[-6:]}")


# -- the front-end (QEMU's part) ---------------------------------------------------------------

class SessionEnded(Exception):
    pass


class Driver:
    def __init__(self, sock: str, backend: HostileBackend, proxy, scenario: Scenario):
        self.sock_path = sock
        self.backend = backend
        self.proxy = proxy
        self.scenario = scenario
        self.guest = Guest()
        self.kick, self.call = make_eventfd(), make_eventfd()
        self.fe = Frontend.connect(sock, timeout=FE_TIMEOUT, name="fastshadow")
        self.ended: str | None = None
        self.stopped = False
        self.disabled = False
        self.next_base = 0
        self.features = 0
        self.offered = 0
        self.region1_mapped = True
        self.busy: threading.Thread | None = None

    def close(self) -> None:
        self.stop_busy()
        self.fe.close()
        os.close(self.kick)
        os.close(self.call)
        self.guest.close()

    # -- requests that may find the session gone ---------------------------------------------------
    def fe_call(self, fn, *args):
        if self.ended:
            raise SessionEnded(self.ended)
        try:
            return fn(*args)
        except VhostUserError as e:
            if self.session_gone(2.0):
                self.ended = f"{type(e).__name__}: {e}"
                raise SessionEnded(self.ended) from None
            raise AssertionError(f"front-end request failed but the session is still open: "
                                 f"{type(e).__name__}: {e}") from e

    def session_gone(self, wait: float = 0.0) -> bool:
        """The proxy closed our connection (EOF), within `wait` seconds."""
        sock = self.fe.conn.sock
        if sock.fileno() < 0:
            return True
        r, _, _ = select.select([sock], [], [], wait)
        if not r:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def sync(self) -> None:
        """A round trip answered by fastshadow itself: every earlier request was handled."""
        self.fe_call(self.fe.get_max_mem_slots)

    # -- bring-up, ring start -------------------------------------------------------------------
    def bring_up(self) -> None:
        fe, sc = self.fe, self.scenario
        self.offered = self.fe_call(fe.get_features)
        self.fe_call(fe.set_owner)
        pf = self.fe_call(fe.get_protocol_features)
        self.fe_call(fe.set_protocol_features, pf if sc.reply_ack else pf & ~PF.REPLY_ACK)
        assert self.fe_call(fe.get_queue_num) >= 1
        self.fe_call(fe.get_config, 0, 8)
        self.set_mem_table()
        self.negotiate_features()
        self.start_ring(0)

    def region_msg(self, i: int) -> p.MemoryRegion:
        r = self.guest.mem.regions[i]
        return p.MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset)

    def set_mem_table(self) -> None:
        mem = self.guest.mem
        self.fe_call(self.fe.set_mem_table, [self.region_msg(i) for i in range(len(mem.regions))],
                     [r.fd for r in mem.regions])

    def negotiate_features(self) -> None:
        # ACCESS_PLATFORM: QEMU keeps it from a vhost device without a vIOMMU (that guest is
        # tests/proxy/test_iotlb.py's); set, every address would be an IOVA.
        want = self.offered & ~(VF.LOG_ALL | VF.ACCESS_PLATFORM)
        if not self.scenario.event_idx:
            want &= ~VF.RING_EVENT_IDX
        self.features = want
        self.fe_call(self.fe.set_features, want)

    def start_ring(self, base: int) -> None:
        fe, q, mem = self.fe, self.guest.q, self.guest.mem
        self.fe_call(fe.set_vring_num, 0, NUM)
        self.fe_call(fe.set_vring_base, 0, base)
        self.fe_call(fe.set_vring_addr, 0, mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail))
        self.fe_call(fe.set_vring_call, 0, self.call)
        self.fe_call(fe.set_vring_kick, 0, self.kick)
        self.stopped = False

    # -- steps ----------------------------------------------------------------------------------
    def step(self, s) -> None:
        if isinstance(s, Post):
            if self.guest.post(s) is not None and s.kick:
                os.eventfd_write(self.kick, 1)
        elif isinstance(s, Kick):
            os.eventfd_write(self.kick, 1)
        elif isinstance(s, Act):
            self.settle()
            self.backend.act(s.action, s.arg)
        elif isinstance(s, Stop):
            self.stop(s.mode, s.restart)
        elif isinstance(s, Control):
            self.control(s.what, s.arg)

    def stop(self, mode: str, restart: bool) -> None:
        if self.stopped:
            if restart:
                self.start_ring(self.next_base)
            return
        self.settle()
        self.backend.stop_mode = mode
        self.next_base = self.fe_call(self.fe.get_vring_base, 0)
        self.stopped = True
        self.check()
        if restart:
            self.start_ring(self.next_base)

    def control(self, what: str, arg: int) -> None:
        fe = self.fe
        if what in ("get_features", "get_protocol_features", "get_queue_num", "get_max_mem_slots", "get_status"):
            self.fe_call(getattr(fe, what))
        elif what == "get_config":
            off = arg % 64
            self.fe_call(fe.get_config, off, 1 + (arg * 7) % (256 - off))
        elif what == "set_config":
            self.fe_call(fe.call, R.SET_CONFIG, p.Config(arg % 60, 0, bytes([arg]) * (1 + arg % 4)))
        elif what == "set_status":
            self.fe_call(fe.set_status, [0, 1, 3, 7, 15, 0x80][arg % 6])
        elif what == "set_vring_call":
            fd = make_eventfd()
            os.close(self.call)
            self.call = fd
            self.fe_call(fe.set_vring_call, 0, fd)
        elif what == "set_vring_err":
            fd = make_eventfd()
            try:
                self.fe_call(fe.set_vring_err, 0, fd)
            finally:
                os.close(fd)
        elif what == "set_vring_kick":
            if not self.stopped:  # a new kick fd on a running ring (QEMU does this)
                fd = make_eventfd()
                os.close(self.kick)
                self.kick = fd
                self.fe_call(fe.set_vring_kick, 0, fd)
        elif what == "set_vring_enable":
            self.disabled = not arg & 1
            self.fe_call(fe.set_vring_enable, 0, bool(arg & 1))
        elif what == "set_features":
            # a subset of what was offered, LOG_ALL aside (migration is another fuzzer's job)
            bits = self.offered & ~(VF.LOG_ALL | VF.ACCESS_PLATFORM)
            keep = bits & ~(VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC) if arg & 1 else bits
            self.features = keep
            self.fe_call(fe.set_features, keep)
        elif what == "set_features_bad":
            self.fe_call(fe.set_features, self.offered | VF.RING_PACKED)  # not offered: the session ends
        elif what == "reset_device":
            self.fe_call(fe.reset_device)
            self.sync()
            self.guest.harvest()   # what completed before the reset; then the driver starts over
            self.guest.reinit_ring()
            self.stopped = True
            self.next_base = 0
            self.negotiate_features()
            self.start_ring(0)
        elif what == "rem_region1" and self.region1_mapped:
            # the region holding the indirect tables and later buffers: requests in flight there
            # fail at completion, new ones are refused, until it comes back
            self.region1_mapped = False
            self.fe_call(fe.call, R.REM_MEM_REG, p.MemRegionMsg(self.region_msg(1)))
            self.sync()
        elif what == "add_region1" and not self.region1_mapped:
            self.region1_mapped = True
            self.fe_call(fe.call, R.ADD_MEM_REG, p.MemRegionMsg(self.region_msg(1)), [self.guest.mem.fd])
            self.sync()
        elif what == "set_mem_table":  # the whole table again (QEMU does on memory hot-plug)
            self.region1_mapped = True
            self.set_mem_table()
            self.sync()
        elif what == "malformed":  # a broken message from QEMU's side: the session ends, nothing else
            sock = self.fe.conn.sock
            bad = [HEADER.pack(int(R.GET_FEATURES), 0, 0), HEADER.pack(999, VERSION, 0),
                   HEADER.pack(int(R.GET_FEATURES), VERSION, 3) + b"abc",
                   HEADER.pack(int(R.SET_MEM_TABLE), VERSION, 8) + struct.pack("<II", 9, 0)][arg % 5 % 4]
            if arg % 5 == 4:  # a kick with two fds
                sock.sendmsg([HEADER.pack(int(R.SET_VRING_KICK), VERSION, 8) + p.VringFd.make(0).encode()],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<ii", self.kick, self.call))])
            else:
                sock.sendall(bad)
            self.sync()
        elif what == "refused":
            self.fe_call(fe.call, [R.GET_INFLIGHT_FD, R.VRING_KICK, R.SET_LOG_FD][arg % 3],
                         [p.Inflight(0, 0, 1, NUM), p.VringState(0, 0), p.Empty()][arg % 3],
                         [] if arg % 3 != 2 else [self.call])

    def settle(self, quiet: float = 0.01, limit: float = 0.2) -> None:
        """Let the data plane catch up: wait until the guest's used idx and the shadow
        avail idx stay still for `quiet` seconds (at most `limit`)."""
        deadline = time.monotonic() + limit
        last = None
        while time.monotonic() < deadline:
            now = (self.guest.q.used_idx(), self.backend.shadow_avail_idx())
            if now == last:
                return
            last = now
            time.sleep(quiet)

    def check(self) -> None:
        self.guest.harvest()
        self.guest.check_canary()
        assert self.proxy.alive(), "the proxy process died:\n" + self.proxy.log()[-3000:]

    # -- the end: no hang --------------------------------------------------------------------------
    def start_busy(self) -> None:
        """A backend thread completing correctly all the time, racing every step (busy_ms)."""
        if not self.scenario.busy_ms:
            return
        self.busy_stop = threading.Event()

        def run():
            while not self.busy_stop.wait(self.scenario.busy_ms / 1000):
                self.backend.act("honest")
        self.busy = threading.Thread(target=run, name="busy-backend", daemon=True)
        self.busy.start()

    def stop_busy(self) -> None:
        if self.busy is not None:
            self.busy_stop.set()
            self.busy.join(5)
            self.busy = None

    def finish(self, log_start: int, strict: bool) -> str:
        """The backend behaves; every request completes or the session ends. Returns how."""
        self.stop_busy()
        self.backend.stop_mode = "drain"
        if not self.ended:
            try:
                if self.stopped:
                    self.start_ring(self.next_base)
                if self.disabled:
                    self.fe_call(self.fe.set_vring_enable, 0, True)
            except SessionEnded:
                pass
        if self.wait_all("honest"):
            return "completed" if not self.ended else f"session ended ({self.ended})"
        known = [m for m in KNOWN_HANG_LOG if m in self.proxy.log()[log_start:]]
        stuck = [(r.head, r.label) for r in self.guest.inflight.values()]
        if strict or not known:
            raise AssertionError(f"guest requests still in flight {SETTLE_TIMEOUT} s after the backend behaves, "
                                 f"session open: {stuck}; lies told: {self.backend.lies}")
        # The known bug: only a backend that hangs up unblocks the guest. It must, then.
        self.backend.act("close")
        assert self.wait_all("honest", SETTLE_TIMEOUT + 5), (
            f"guest requests still in flight after the backend behaved and then hung up: {stuck}")
        return f"completed after the backend hung up ({known})"

    def wait_all(self, action: str, timeout: float = SETTLE_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self.ended:
                os.eventfd_write(self.kick, 1)
            self.backend.act(action)
            time.sleep(0.01)
            self.check()
            if not self.guest.inflight:
                return True
            if self.ended or self.session_gone():
                self.ended = self.ended or "the proxy closed the session"
                return True
            if time.monotonic() > deadline:
                return False


# -- fixtures ---------------------------------------------------------------------------------------

class Rig:
    """One proxy (devices A and B), the hostile backend of A, qsd behind B, for all examples."""

    def __init__(self, workdir, start_proxy, start_qsd):
        self.workdir = workdir
        self.start_proxy = start_proxy
        self.a_sock = str(workdir / "a.sock")
        self.b_sock = str(workdir / "b.sock")
        self.backend = HostileBackend(str(workdir / "hostile.sock"))
        self.qsd = start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=1 << 20)
        self.proxy = None
        self.proxies = 0
        self.b_writes = 0
        self.ensure_proxy()

    def ensure_proxy(self):
        if self.proxy is None or not self.proxy.alive():
            self.proxies += 1
            self.proxy = self.start_proxy(
                ["--reply-timeout", str(REPLY_TIMEOUT), "--backend-timeout", "5",
                 "--max-request-bytes", str(MAX_REQUEST), "--bounce-per-queue", str(BOUNCE),
                 "--listen", self.a_sock, "--backend", self.backend.path, "--mode", "isolated", "--name", "devA",
                 "--listen", self.b_sock, "--backend", str(self.workdir / "qsd.sock"), "--mode", "isolated",
                 "--name", "devB"], [self.a_sock, self.b_sock], name=f"proxy{self.proxies}")
        return self.proxy

    def close(self):
        self.backend.close()

    def device_b_serves(self) -> None:
        self.b_writes += 1
        data = os.urandom(4096)
        sector = 8 * (self.b_writes % 200)
        with BlkFront(self.b_sock, timeout=10) as blk:
            blk.bring_up()
            blk.write(sector, data)
            assert blk.read(sector, len(data)) == data, "device B returned other data than written"


@pytest.fixture
def rig(workdir, start_proxy, start_qsd):
    r = Rig(workdir, start_proxy, start_qsd)
    yield r
    r.close()


def run_scenario(rig: Rig, scenario: Scenario, *, strict: bool = False, survive: bool = False) -> list[str]:
    """One session on device A, checked; returns what happened (for hypothesis statistics).
    strict: no allowance for the known hang (KNOWN_HANG_LOG); survive: the session must not end."""
    proxy = rig.ensure_proxy()
    log_start = len(proxy.log())
    waiting = proxy.log().count("device.waiting dev=devA")
    rig.backend.reset_script()
    rig.backend.reply_delay = scenario.reply_delay_ms / 1000
    d = Driver(rig.a_sock, rig.backend, proxy, scenario)
    try:
        try:
            d.bring_up()
            d.start_busy()
            for s in scenario.steps:
                d.step(s)
                d.check()
        except SessionEnded:
            pass
        outcome = d.finish(log_start, strict)
        d.check()
        if survive:
            assert not d.ended, f"the session ended: {d.ended}\n" + "\n".join(
                ln for ln in proxy.log()[log_start:].splitlines() if "devA" in ln and "stats" not in ln)
        events = [outcome.split(" (")[0], *{f"completed: {label.split(' ')[0]}" for _, _, label in d.guest.completions},
                  *{f"lie: {lie}" for lie in rig.backend.lies}]
        if os.environ.get("FASTSHADOW_FUZZ_VERBOSE"):
            print(f"\n{scenario}\n  -> {outcome}; completions {d.guest.completions}; lies {rig.backend.lies}")
    finally:
        d.close()
        rig.backend.reply_delay = 0.0
    # The session's end (teardown included) is in the log before the next one starts.
    proxy.wait_log(r"device\.waiting dev=devA", timeout=15, count=waiting + 1)
    assert proxy.alive(), "the proxy process died:\n" + proxy.log()[-3000:]
    new_log = proxy.log()[log_start:]
    for bad in ("Traceback", "session.crashed", "internal error"):
        assert bad not in new_log, f"{bad!r} in the proxy log:\n{new_log[-4000:]}"
    rig.device_b_serves()
    for line in new_log.splitlines():
        m = re.search(r"(session\.(?:refused|failed)|backend\.lost|vring\.drain_timeout) dev=devA "
                      r".*?reason=\"?(.{0,70})", line)
        if m:
            events.append(f"{m.group(1)}: {re.sub(r'[0-9]+', 'N', m.group(2))}")
    return events


# -- the fuzzer --------------------------------------------------------------------------------------

#: FASTSHADOW_FUZZ_EXAMPLES=N runs more examples; FASTSHADOW_FUZZ_RANDOM=1 draws new ones (exploration,
#: not CI: CI runs the same derandomized examples every time); FASTSHADOW_FUZZ_VERBOSE=1 prints each
#: scenario and what came of it (with pytest -s).
FUZZ = settings(max_examples=int(os.environ.get("FASTSHADOW_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=not os.environ.get("FASTSHADOW_FUZZ_RANDOM"), database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

V = Post()                                     # a valid 4 KiB read, kicked


@FUZZ
@given(scenario=scenarios)
@example(scenario=Scenario(steps=(V, Post(kind=1), Act("honest"), Post(hostile="loop"),
                                  Post(hostile="wild", pick=9), Act("reorder"))))
@example(scenario=Scenario(steps=(V, V, Act("take"), Act("idx_jump", 3), V)))   # a used idx jump: refused entry by entry
@example(scenario=Scenario(steps=(V, Post(indirect=True), Act("take"), Stop("hold"), Act("honest"))))
@example(scenario=Scenario(steps=(V, Post(segs=(16384,) * 3), Post(segs=(16384,) * 3), Post(segs=(16384,) * 3),
                                  Post(segs=(16384,) * 3), Post(segs=(16384,) * 3), Act("partial", 5),
                                  Stop("lie"), Act("close"), V)))   # back-pressure, a lying stop, a hang-up
@example(scenario=Scenario(event_idx=True, steps=(V, Act("take"), Control("reset_device"), V, Act("double"),
                                                  Act("len_too_large"), Act("unknown_id", 7))))
@example(scenario=Scenario(reply_ack=False, steps=(V, Act("take"), Act("scribble_desc", 1), Post(hostile="overlap"),
                                                   Act("scribble_avail", 2), Act("stale_id"), Stop("close"))))
# A tour of every hostile chain, lie and control request (hypothesis' own draws cluster):
@example(scenario=Scenario(steps=tuple(Post(segs=(512, 100), hostile=h, pick=k) for k, h in enumerate(
    ("bad_addr", "wrap_addr", "past_end", "next_oob", "w_before_r", "zero_len", "huge", "crossing")))
    + (Act("honest"),)))
@example(scenario=Scenario(steps=(Post(indirect=True, hostile="ind_nested"), Post(hostile="ind_bad_len", pick=1),
                                  Post(hostile="ind_next"), Post(indirect=True, hostile="loop", pick=2),
                                  Post(indirect=True, segs=(0, 300, 4096)), Post(indirect=True, hostile="next_oob"),
                                  Act("reorder"))))
@example(scenario=Scenario(reply_delay_ms=5, steps=(V, Post(kind=8), Act("take"), Act("chaos", 11), V,
                                                    Act("scribble_bounce", 4), Act("delay", 30), Kick(),
                                                    Act("partial", 2), Act("honest"))))
@example(scenario=Scenario(steps=(V, Post(kind=1, segs=(1, 2, 3)), Act("take"), Control("set_vring_call"),
                                  Control("set_vring_err"), Control("set_vring_kick"), Control("set_vring_enable", 0),
                                  Control("get_config", 9), Control("set_config", 3), Control("set_status", 3),
                                  Control("get_status"), Control("set_features", 1), V, Act("partial", 1),
                                  Stop("drain"), Control("set_vring_enable", 1), Act("honest"))))
@example(scenario=Scenario(steps=(Post(hostile="wild", pick=3), Post(indirect=True), Act("take"),
                                  Control("rem_region1"), Act("honest"), Post(hostile="wild", pick=5),
                                  Control("add_region1"), Post(indirect=True), Control("set_mem_table"),
                                  Act("honest"))))
@example(scenario=Scenario(steps=(V, Act("take"), V, Control("malformed", 3))))
@example(scenario=Scenario(steps=(V, V, Act("take"), Act("close"), V, Post(kind=1), Act("honest"), Act("close"),
                                  Post(kind=4), Act("honest"))))
@example(scenario=Scenario(event_idx=True, reply_delay_ms=20, steps=(V, Post(kick=False), Stop("drain"),
                                                                     Post(kind=1, kick=False), Kick(),
                                                                     Act("honest"), Stop("drain", restart=False),
                                                                     V, Stop("close"), Act("honest"))))
@example(scenario=Scenario(busy_ms=1, steps=(V, V, Post(kind=1), Stop("drain"), V, Post(indirect=True),
                                              Control("set_mem_table"), V, Control("reset_device"), V, V,
                                              Stop("lie"), V, Act("idx_jump"), V)))
def test_isolated_session_under_hostile_backend_and_guest(rig, scenario):
    for what in run_scenario(rig, scenario):
        event(what)



# -- regressions -------------------------------------------------------------------------------------

# Regression found by the fuzzer, fixed: a used idx jump abandons the shadow ring for good: with the backend
#   behaving again, the guest's requests in flight never complete (only a backend hang-up or a ring stop frees
#   them)
def test_regression_used_idx_jump_then_honest_backend(rig):
    run_scenario(rig, Scenario(steps=(V, V, Act("take"), Act("idx_jump", 3))), strict=True)


# Regression found by the fuzzer, fixed: a duplicate completion published in the same batch as the real one,
#   with one request in flight, is taken for a used idx jump: the shadow ring is abandoned and the real
#   completion is never delivered, the guest's request hangs
def test_regression_double_completion_in_one_batch(rig):
    run_scenario(rig, Scenario(steps=(V, Act("take"), Act("double"))), strict=True)


# Regression found by the fuzzer, fixed: after a ring stop whose drain timed out (the backend held requests),
#   the next ring start fails: SET_VRING_NUM is refused by the data plane (EBUSY: requests kept in flight) and
#   QEMU's session ends
def test_regression_ring_restart_after_drain_timeout(rig):
    run_scenario(rig, Scenario(steps=(V, Act("take"), Stop("hold"))), survive=True)


# Regression found by the fuzzer, fixed: a backend that sends part of a reply and stops blocks the session
#   thread forever: --reply-timeout bounds only the wait for the reply's first byte, so QEMU's GET_VRING_BASE
#   is never answered and the session never ends
def test_regression_backend_stalls_mid_reply(rig):
    proxy = rig.ensure_proxy()
    d = Driver(rig.a_sock, rig.backend, proxy, Scenario())
    try:
        d.bring_up()
        d.step(V)
        d.step(Act("take"))
        d.check()
        rig.backend.stop_mode = "stall"
        d.fe.timeout = 2 * REPLY_TIMEOUT + 2  # a stop may take one reply timeout plus one drain timeout
        try:
            d.fe_call(d.fe.get_vring_base, 0)   # answered (any index) or the session ends: both fine
        except SessionEnded:
            pass
        d.check()
    finally:
        c = rig.backend.current
        if c is not None:
            c.drop()   # frees the session thread, whatever the outcome
        d.close()
    assert proxy.alive()
    rig.device_b_serves()
