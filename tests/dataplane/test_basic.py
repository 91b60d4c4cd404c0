"""Valid requests through the synchronous engine: data both ways, 1:1 shadow chains,
region-crossing buffers, indirect tables, shadow region properties."""

import fcntl
import os
import select
import struct

import pytest

from fastshadow.dataplane import SHADOW_GPA_BASE, SHADOW_UADDR_BASE, DataPlane, InvalidRequest

from .harness import F_NEXT, F_WRITE, PAGE, Buf, read_counter


def roundtrip(rig, q=0):
    """poll -> backend sees requests -> backend serves them -> poll -> used elements."""
    rig.poll()
    reqs = rig.be[q].pending()
    written = rig.serve(q, reqs)
    rig.poll()
    return reqs, written, rig.gq[q].take_used()


@pytest.mark.parametrize("indirect", [False, True])
def test_blk_read_data_reaches_guest(make_rig, indirect):
    rig = make_rig()
    head, bufs = rig.blk_read(0, 8192, indirect=indirect)
    rig.poll()
    assert read_counter(rig.be[0].kick_fd) == 1
    [req] = rig.be[0].pending()
    # 1:1 descriptor boundaries, flags preserved, NEXT only inside the chain.
    assert [d.len for d in req.descs] == [16, 8192, 1]
    assert [d.flags for d in req.descs] == [F_NEXT, F_WRITE | F_NEXT, F_WRITE]
    # The header was bounced in.
    assert rig.be[0].read(req.descs[0]) == struct.pack("<IIQ", 0, 0, 7)
    # Large buffers page aligned, small ones 64-byte aligned, all in the shadow region.
    assert req.descs[1].addr % PAGE == 0
    assert req.descs[0].addr % 64 == 0 and req.descs[2].addr % 64 == 0
    written = rig.serve(0, [req])[req.head]
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 8193)]
    assert read_counter(rig.call[0]) == 1
    assert rig.mem.read(bufs[1].gpa, 8192) == written[:8192]
    assert rig.mem.read(bufs[2].gpa, 1) == written[8192:]
    rig.mem.expect_write(bufs[1].gpa, written[:8192])
    rig.mem.expect_write(bufs[2].gpa, written[8192:])
    st = rig.dev.stats(0)
    assert (st.requests, st.completed, st.bytes_in, st.bytes_out, st.inflight) == (1, 1, 16, 8193, 0)


@pytest.mark.parametrize("indirect", [False, True])
def test_blk_write_data_reaches_backend(make_rig, indirect):
    rig = make_rig()
    payload = os.urandom(12288)
    head, bufs = rig.blk_write(0, payload, indirect=indirect)
    rig.poll()
    [req] = rig.be[0].pending()
    assert [d.len for d in req.descs] == [16, 12288, 1]
    assert rig.be[0].read(req.descs[1]) == payload
    rig.be[0].write(req.descs[2], b"\x00")
    rig.be[0].complete(req.head, 1)
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 1)]
    rig.mem.expect_write(bufs[2].gpa, b"\x00")


def test_partial_used_len_copies_only_len_bytes(make_rig):
    rig = make_rig()
    head, bufs = rig.blk_read(0, 4096)
    rig.poll()
    [req] = rig.be[0].pending()
    rig.be[0].write(req.descs[1], b"\xee" * 4096)
    rig.be[0].write(req.descs[2], b"\x01")
    rig.be[0].complete(req.head, 100)      # only 100 bytes "written"
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 100)]
    rig.mem.expect_write(bufs[1].gpa, b"\xee" * 100)   # the rest must be untouched canary


@pytest.mark.parametrize("before", [1, 512, 4095])
def test_buffer_crossing_two_regions_is_split(make_rig, before):
    rig = make_rig()
    payload = os.urandom(8192)
    head_w, _ = rig.blk_write(0, payload, crossing=before)
    rig.poll()
    [req] = rig.be[0].pending()
    assert rig.be[0].read(req.descs[1]) == payload     # read across the boundary
    rig.be[0].complete(req.head, 0)
    rig.poll()
    assert rig.gq[0].take_used() == [(head_w, 0)]


def test_read_crossing_two_regions_is_split(make_rig):
    rig = make_rig()
    head, bufs = rig.blk_read(0, 10000, crossing=3000)
    _, written, used = roundtrip(rig)
    assert used == [(head, 10001)]
    data = list(written.values())[0]
    assert rig.mem.read(bufs[1].gpa, 10000) == data[:10000]
    rig.mem.expect_write(bufs[1].gpa, data[:10000])
    rig.mem.expect_write(bufs[2].gpa, data[10000:])


def test_many_requests_out_of_order_completion(make_rig):
    rig = make_rig(num=64)
    heads = {}
    for i in range(20):
        h, bufs = rig.blk_read(0, 512 * (i + 1))
        heads[h] = bufs
    rig.poll()
    reqs = rig.be[0].pending()
    assert len(reqs) == 20
    reqs.reverse()
    written = rig.serve(0, reqs)
    rig.poll()
    used = rig.gq[0].take_used()
    assert len(used) == 20 and {u[0] for u in used} == set(heads)
    # used elements come in completion order: pair them with the shadow requests
    for (gh, ln), r in zip(used, reqs):
        data = written[r.head]
        assert ln == len(data)
        bufs = heads[gh]
        assert rig.mem.read(bufs[1].gpa, bufs[1].len) == data[:bufs[1].len]
        rig.mem.expect_write(bufs[1].gpa, data[:bufs[1].len])
        rig.mem.expect_write(bufs[2].gpa, data[bufs[1].len:])


def test_ring_wraparound_many_rounds(make_rig):
    rig = make_rig(num=8)
    for rnd in range(60):          # 120 indirect requests on an 8-entry ring: slots wrap 15 times
        hs = [rig.blk_write(0, bytes([rnd]) * 64, indirect=True)[0] for _ in range(2)]
        rig.poll()
        reqs = rig.be[0].pending()
        assert len(reqs) == 2
        for r in reqs:
            rig.be[0].complete(r.head, 0)
        rig.poll()
        assert [u[0] for u in rig.gq[0].take_used()] == hs


def test_indirect_requests_flatten_into_shadow_descriptors(make_rig):
    """Guest indirect chains become direct shadow chains: 5 requests of 3 segments
    need 15 shadow descriptors on an 8-entry ring, so they go through in waves."""
    rig = make_rig(num=8)
    hs = [rig.blk_write(0, bytes([i]) * 64, indirect=True)[0] for i in range(5)]
    done = []
    for _ in range(5):
        rig.poll()
        for r in rig.be[0].pending():
            assert len(r.descs) == 3
            rig.be[0].complete(r.head, 0)
        rig.poll()
        done += [u[0] for u in rig.gq[0].take_used()]
    assert done == hs
    assert rig.dev.stats(0).throttled >= 1


def test_u16_index_wrap(make_rig):
    rig = make_rig(num=16, start=False)
    base = 0xFFFC
    g = rig.gq[0]
    g.avail_idx = base
    g.publish()
    g.mem.write(g.used + 2, struct.pack("<H", base))
    g.last_used = base
    rig.dev.queue_set_base(0, base)
    rig.start(0)
    for _ in range(3):
        hs = [rig.blk_write(0, b"x" * 32)[0] for _ in range(3)]
        rig.poll()
        for r in rig.be[0].pending():
            rig.be[0].complete(r.head, 0)
        rig.poll()
        assert [u[0] for u in rig.gq[0].take_used()] == hs
    assert g.used_idx() == (base + 9) & 0xFFFF


def test_zero_length_buffer_is_refused(make_rig):
    """A 0-length descriptor never reaches a backend (QEMU and libvhost-user treat one as
    fatal): the chain is refused; this device defines no error, so len 0, nothing written."""
    rig = make_rig()
    hdr = rig.mem.alloc(16)
    rig.mem.write(hdr, b"h" * 16)
    st = rig.mem.alloc(1)
    head = rig.gq[0].add([Buf(hdr, 16), Buf(0xDEAD0000, 0, True), Buf(st, 1, True)])
    rig.poll()
    assert rig.be[0].pending() == []
    assert rig.gq[0].take_used() == [(head, 0)]
    [ev] = rig.events()
    assert ev.name == "ZERO_LENGTH" and ev.a == 1 and ev.head == head
    st_ = rig.dev.stats(0)
    assert (st_.refused, st_.failed) == (1, 1)


def test_shadow_region_properties(make_rig):
    rig = make_rig(nq=2)
    dev = rig.dev
    # the fake addresses the README documents (guest-physical 0x100000000, user 0x7e0000000000)
    assert dev.shadow_gpa == SHADOW_GPA_BASE == 0x1_0000_0000
    assert dev.shadow_uaddr == SHADOW_UADDR_BASE == 0x7E00_0000_0000
    # memfd name visible in /proc/self/maps, sealed against shrink/grow.
    link = os.readlink(f"/proc/self/fd/{dev.shadow_fd}")
    assert link.startswith("/memfd:fastshadow-shadow:test0")
    maps = open("/proc/self/maps").read()
    assert "fastshadow-shadow:test0" in maps
    seals = fcntl.fcntl(dev.shadow_fd, 1034)   # F_GET_SEALS
    assert seals & 0x2 and seals & 0x4 and seals & 0x1  # SHRINK, GROW, SEAL
    with pytest.raises(OSError):
        os.ftruncate(dev.shadow_fd, dev.shadow_size // 2)
    # Rings of the two queues: inside the region, aligned, not overlapping.
    spans = []
    for q in range(2):
        d, a, u = dev.queue_shadow_addrs(q)
        for addr, size in ((d, 16 * rig.num), (a, 6 + 2 * rig.num), (u, 6 + 8 * rig.num)):
            off = addr - SHADOW_UADDR_BASE
            assert off % PAGE == 0 and 0 <= off and off + size <= dev.shadow_size
            spans.append((off, off + size))
    spans.sort()
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))
    # No real host address goes into the shadow: descriptors point into the fake GPA range.
    head, bufs = rig.blk_read(1, 4096)
    rig.poll()
    [req] = rig.be[1].pending()
    for d in req.descs:
        assert SHADOW_GPA_BASE <= d.addr < SHADOW_GPA_BASE + dev.shadow_size
    rig.serve(1, [req])
    rig.poll()
    assert rig.gq[1].take_used() == [(head, 4097)]
    rig.mem.accept(bufs[1].gpa, 4096)
    rig.mem.accept(bufs[2].gpa, 1)


def test_config_errors():
    with DataPlane() as dp:
        with pytest.raises(InvalidRequest):
            dp.add_device("x", num_queues=0)
        with pytest.raises(InvalidRequest):
            dp.add_device("y" * 100, num_queues=1)
        with pytest.raises(OSError):
            dp.add_device("z", num_queues=1, shadow_size=4096)
        dev = dp.add_device("ok", num_queues=1, bounce_per_queue=1 << 16, max_queue_size=256)
        with pytest.raises(InvalidRequest):
            dev.queue_set_num(0, 0)
        with pytest.raises(InvalidRequest):
            dev.queue_set_num(0, 512)            # over max_queue_size
        with pytest.raises(InvalidRequest):
            dev.queue_set_num(5, 16)             # no such queue
        with pytest.raises(InvalidRequest):
            dev.queue_shadow_addrs(0)            # num not set yet
        with pytest.raises(InvalidRequest):
            dev.queue_start(0, event_idx=False)  # not configured
        dp.remove_device(dev)


def test_event_ring_overflow_counts_lost(make_rig):
    rig = make_rig(num=32)
    rig.dp.close()
    # a fresh data plane with a 4-record event ring around the same guest
    dp = DataPlane(event_ring_size=4)
    try:
        dev = dp.add_device("small", num_queues=1, bounce_per_queue=1 << 16, max_queue_size=64)
        dev.set_mem_table(rig.mem.regions)
        g = rig.gq[0]
        dev.queue_set_num(0, g.num)
        dev.queue_set_addr(0, rig.mem.uaddr(g.desc), rig.mem.uaddr(g.avail), rig.mem.uaddr(g.used))
        dev.queue_start(0, event_idx=False)
        for i in range(10):
            g.write_desc(i, 0x4000_0000, 8, 0, 0)
            g.put_avail(i)
        dev.poll()
        r, _, _ = select.select([dp.event_fd], [], [], 1)
        assert r
        evs = dp.drain_events()
        assert [e.name for e in evs] == ["ADDR_UNMAPPED"] * 4 + ["EVENTS_LOST"]
        assert evs[-1].a == 6 and "6 event records lost" in evs[-1].message
        assert dp.drain_events() == []
        assert len(g.take_used()) == 10
    finally:
        dp.close()


def test_usdt_probes_are_compiled_in():
    import shutil
    import subprocess

    from fastshadow.dataplane import EXTENSION_PATH
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    out = subprocess.run([readelf, "-n", EXTENSION_PATH], capture_output=True, text=True).stdout
    names = {ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.strip().startswith("Name:")}
    assert {"guest_kick", "request_shadowed", "backend_kick", "backend_call", "request_completed",
            "guest_call", "request_refused"} <= names
    assert "Provider: fastshadow" in out
