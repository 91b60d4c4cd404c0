"""Randomised chain walker test (fixed seeds): random descriptor tables, indirect
tables and backend completions, checked against a Python reference model of the
validation rules; guest RAM is compared with the canary model after every round,
so an out-of-bounds or unrequested write anywhere in guest memory fails the test."""

import random
import struct

import pytest

from fastshadow.devices import Failure

from .harness import F_INDIRECT, F_NEXT, F_WRITE

NUM = 16
MAX_BYTES = 16 << 10
U64 = 2**64 - 1


class Ref:
    """Reference model of csrc/chain.c (rules of DESIGN.md section 3)."""

    def __init__(self, mem, num, max_bytes):
        self.mem, self.num, self.max = mem, num, max_bytes

    def range_code(self, gpa, ln):
        if ln > U64 - gpa:
            return "ADDR_OVERFLOW"
        if gpa + ln > self.mem.size:
            return "ADDR_UNMAPPED"
        return None

    def walk(self, table_gpa, head):
        """(None, segs) for an accepted chain; (code, segs) for a chain refused for a bad
        part of a sound structure (walked to its end first, the first reason reported);
        (code, None) for a broken structure (the walk stops there)."""
        def main_desc(i):
            return struct.unpack("<QIHH", self.mem.read(table_gpa + 16 * i, 16))

        get, tsize, idx, steps = main_desc, self.num, head, 0
        indirect = seen_w = False
        segs, total, soft = [], 0, []
        while True:
            steps += 1
            if steps > tsize:
                return "CHAIN_TOO_LONG", None
            addr, ln, fl, nx = get(idx)
            if fl & F_INDIRECT:
                if indirect:
                    return "INDIRECT_NESTED", None
                if fl & F_NEXT:
                    return "INDIRECT_WITH_NEXT", None
                if ln == 0 or ln % 16 or ln > 16 * self.num:
                    return "INDIRECT_BAD_LEN", None
                code = self.range_code(addr, ln)
                if code:
                    return code, None
                raw = self.mem.read(addr, ln)
                entries = [struct.unpack_from("<QIHH", raw, 16 * k) for k in range(ln // 16)]
                get, tsize, idx, steps, indirect = entries.__getitem__, ln // 16, 0, 0, True
                continue
            if len(segs) >= self.num:
                return "CHAIN_TOO_LONG", None
            if ln == 0:
                soft.append("ZERO_LENGTH")
            elif code := self.range_code(addr, ln):
                soft.append(code)
            w = bool(fl & F_WRITE)
            if w:
                seen_w = True
            elif seen_w:
                soft.append("WRITABLE_BEFORE_READABLE")
            total += ln
            if total > self.max:
                soft.append("REQUEST_TOO_LARGE")
            segs.append((addr, ln, w))
            if not fl & F_NEXT:
                return (soft[0] if soft else None), segs
            if nx >= tsize:
                return "DESC_NEXT_OUT_OF_RANGE", None
            idx = nx

    def blk_status(self, segs):
        """gpa of the status byte the device error goes to (last byte of the last
        non-empty writable buffer, if that buffer is sound), or None."""
        if not segs:
            return None
        ws = [(gpa, ln) for gpa, ln, w in segs if w and ln]
        if not ws or self.range_code(*ws[-1]):
            return None
        return ws[-1][0] + ws[-1][1] - 1


def rand_desc(rnd, arena, arena_len, itab, itab_len, mem_size, num, allow_indirect=True):
    r = rnd.random()
    if r < 0.80:
        ln = rnd.choice([0, 1, 16, 64, 100, 512, 4096, rnd.randrange(0, 2048), rnd.randrange(0, 9000)])
        ln = min(ln, arena_len)
        addr = arena + rnd.randrange(0, arena_len - ln + 1)
    elif r < 0.85:
        addr, ln = rnd.choice([0x4000_0000, 0x1_0000_0000, 0xFFFF_F000]), rnd.randrange(1, 4096)
    elif r < 0.90:
        addr, ln = U64 - rnd.randrange(0, 64), rnd.randrange(1, 256)
    else:
        ln = rnd.randrange(1, 8192)
        addr = mem_size - rnd.randrange(0, ln)                 # runs past the end of RAM
    flags = 0
    if rnd.random() < 0.65:
        flags |= F_NEXT
    if rnd.random() < 0.45:
        flags |= F_WRITE
    if allow_indirect and rnd.random() < 0.12:
        flags = F_INDIRECT | (F_NEXT if rnd.random() < 0.1 else 0)
        k = rnd.choice([1, 2, 3, 5, num, num + 1])
        ln = 16 * k if rnd.random() < 0.85 else rnd.randrange(0, 16 * num + 40)
        addr = itab + 16 * rnd.randrange(0, max(1, (itab_len - max(ln, 16)) // 16))
        if rnd.random() < 0.05:
            addr += rnd.randrange(1, 16)                       # unaligned table: allowed
    nxt = rnd.randrange(0, num + (3 if rnd.random() < 0.1 else 0))
    return addr, ln, flags, nxt


def valid_chain(rnd, g, arena, arena_len, start, n):
    """A well-formed chain (so the accept path gets exercised too)."""
    idx = [(start + k) % NUM for k in range(n)]
    nw = rnd.randrange(0, n + 1)
    for k, i in enumerate(idx):
        ln = rnd.randrange(0, 1500)
        addr = arena + rnd.randrange(0, arena_len - ln)
        fl = (F_WRITE if k >= n - nw else 0) | (F_NEXT if k < n - 1 else 0)
        g.write_desc(i, addr, ln, fl, idx[k + 1] if k < n - 1 else rnd.randrange(0, NUM))
    return idx[0]


@pytest.mark.parametrize("failure", [Failure.LEN0, Failure.BLK_STATUS], ids=["len0", "blk"])
@pytest.mark.parametrize("stream_copy_min", [0, 1], ids=["memcpy", "stream"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_chains(make_rig, seed, stream_copy_min, failure):
    """stream: every copy (both directions, any length or alignment) goes through
    copy.c's streaming-store path instead of memcpy.  blk: refused and failed requests
    get VIRTIO_BLK_S_IOERR in their status byte where the model can place it."""
    rnd = random.Random(seed)
    rig = make_rig(num=NUM, max_request_bytes=MAX_BYTES, bounce=2 << 20, stream_copy_min=stream_copy_min,
                   failure=failure)
    blk = failure == Failure.BLK_STATUS

    def failed(h, segs):
        """The completion of a refused or failed request; its status byte expected."""
        st = ref.blk_status(segs) if blk else None
        if st is None:
            return (h, 0)
        mem.expect_write(st, b"\x01")
        return (h, 1)

    mem, g, be = rig.mem, rig.gq[0], rig.be[0]
    arena_len = 48 << 10
    arena = mem.alloc_crossing(arena_len, 16 << 10)           # spans the region boundary
    itab_len = 4096
    itab = mem.alloc(itab_len, align=16, region=1)
    ref = Ref(mem, NUM, MAX_BYTES)
    counts = {}

    for rnd_no in range(250):
        # New random descriptor table and indirect tables.
        for i in range(NUM):
            g.write_desc(i, *rand_desc(rnd, arena, arena_len, itab, itab_len, mem.size, NUM))
        ientries = b"".join(struct.pack("<QIHH", *rand_desc(rnd, arena, arena_len, itab, itab_len,
                                                            mem.size, NUM, allow_indirect=rnd.random() < 0.3))
                            for _ in range(itab_len // 16))
        mem.write(itab, ientries)
        heads = []
        for _ in range(rnd.choice([1, 1, 2, 3])):
            if rnd.random() < 0.3:
                heads.append(valid_chain(rnd, g, arena, arena_len, rnd.randrange(NUM), rnd.randrange(1, 5)))
            else:
                heads.append(rnd.randrange(NUM))
        # Reference results, computed before anything runs (guest memory is stable).
        expected = [ref.walk(g.desc, h) for h in heads]
        for h in heads:
            g.put_avail(h, publish=False)
        g.publish()
        rig.poll()

        refused = [failed(h, segs) for h, (code, segs) in zip(heads, expected) if code]
        evs = rig.events()
        assert [e.name for e in evs] == [code for code, _ in expected if code]
        assert [e.head for e in evs] == [h for h, _ in refused]
        for code, _ in expected:
            counts[code] = counts.get(code, 0) + 1

        reqs = be.pending()
        accepted = [(h, segs) for h, (code, segs) in zip(heads, expected) if not code]
        assert len(reqs) == len(accepted)
        for r, (h, segs) in zip(reqs, accepted):
            assert [(d.len, d.writable) for d in r.descs] == [(ln, w) for _, ln, w in segs]
            for d, (gpa, ln, w) in zip(r.descs, segs):
                if not w:
                    assert be.read(d) == mem.read(gpa, ln)

        # Backend completes in random order with random lengths (sometimes too long).
        order = list(zip(reqs, accepted))
        rnd.shuffle(order)
        used_expect = list(refused)
        backend_events = []
        for r, (h, segs) in order:
            wbytes = sum(ln for _, ln, w in segs if w)
            data = {}
            for d in r.descs:
                if d.writable:
                    data[d.index] = rnd.randbytes(d.len)
                    be.write(d, data[d.index])
            if rnd.random() < 0.15:
                L = wbytes + rnd.randrange(1, 100)
            else:
                L = rnd.randrange(0, wbytes + 1)
            be.complete(r.head, L)
            if L > wbytes:
                used_expect.append(failed(h, segs))
                backend_events.append("USED_LEN_TOO_LARGE")
                continue
            used_expect.append((h, L))
            left = L
            for d, (gpa, ln, w) in zip(r.descs, segs):
                if w and left:
                    take = min(ln, left)
                    mem.expect_write(gpa, data[d.index][:take])
                    left -= take
        rig.poll()
        assert g.take_used() == used_expect
        assert [e.name for e in rig.events()] == backend_events
        mem.accept(g.used, 6 + 8 * NUM)
        mem.check()                                            # nothing else changed
        st = rig.dev.stats(0)
        assert st.inflight == 0

    # the generator reached the interesting cases
    for code in ("CHAIN_TOO_LONG", "DESC_NEXT_OUT_OF_RANGE", "ADDR_UNMAPPED", "ADDR_OVERFLOW",
                 "INDIRECT_BAD_LEN", "WRITABLE_BEFORE_READABLE", "ZERO_LENGTH", None):
        assert counts.get(code, 0) > 0, (code, counts)
