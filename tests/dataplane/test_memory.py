"""Memory table and queue configuration: validation, hot add/remove, unaligned
mmap offsets, device reset."""

import os
import select

import pytest

from fastshadow.dataplane import (AddressUntranslatable, InvalidRequest, MemRegion, NotFound,
                                  QueueBusy)

from .harness import REGION_SIZE, UADDR0, Buf, read_counter


def roundtrip_write(rig, q=0, n=300):
    payload = os.urandom(n)
    head, bufs = rig.blk_write(q, payload)
    rig.poll()
    [r] = rig.be[q].pending()
    assert rig.be[q].read(r.descs[1]) == payload
    rig.be[q].complete(r.head, 0)
    rig.poll()
    assert rig.gq[q].take_used() == [(head, 0)]


def test_bad_tables_are_refused_and_old_table_kept(make_rig):
    rig = make_rig()
    R = REGION_SIZE
    fd = rig.mem.fd
    overlapping = [MemRegion(0, R, UADDR0, fd, R), MemRegion(R - 4096, R, UADDR0 + 2 * R, fd, 0)]
    with pytest.raises(InvalidRequest):
        rig.dev.set_mem_table(overlapping)
    with pytest.raises(InvalidRequest):
        rig.dev.set_mem_table([MemRegion(0, 4 * R, UADDR0, fd, 0)])   # past end of file
    with pytest.raises(InvalidRequest):
        rig.dev.set_mem_table([MemRegion(2**64 - 4096, 8192, UADDR0, fd, 0)])   # gpa wraps
    with pytest.raises(InvalidRequest):
        rig.dev.set_mem_table([MemRegion(0, 0, UADDR0, fd, 0)])
    with pytest.raises(OSError):
        rig.dev.set_mem_table([MemRegion(0, R, UADDR0, 9999, 0)])      # bad fd
    with pytest.raises(InvalidRequest):
        rig.dev.set_mem_table([MemRegion(i * 4096, 4096, UADDR0 + i * 4096, fd, 0)
                               for i in range(65)])
    roundtrip_write(rig)        # the valid table is still in place
    with pytest.raises(InvalidRequest):
        rig.dev.add_mem_region(MemRegion(100, 4096, 0x9000_0000_0000, fd, 0))   # overlaps
    with pytest.raises(NotFound):
        rig.dev.remove_mem_region(0, 4096)
    assert rig.events() == []


def test_ring_address_checks(make_rig):
    rig = make_rig(start=False)
    g = rig.gq[0]
    dev = rig.dev
    ok = (rig.mem.uaddr(g.desc), rig.mem.uaddr(g.avail), rig.mem.uaddr(g.used))
    with pytest.raises(AddressUntranslatable):
        dev.queue_set_addr(0, 0x1234_0000, ok[1], ok[2])             # not in any region
    with pytest.raises(AddressUntranslatable):
        dev.queue_set_addr(0, ok[0] + 8, ok[1], ok[2])               # desc not 16-aligned
    with pytest.raises(AddressUntranslatable):
        dev.queue_set_addr(0, ok[0], ok[1], ok[2] + 2)               # used not 4-aligned
    with pytest.raises(AddressUntranslatable):
        dev.queue_set_addr(0, UADDR0 + REGION_SIZE - 64, ok[1], ok[2])   # runs off the region
    # the previous valid addresses are kept
    rig.start(0)
    roundtrip_write(rig)
    with pytest.raises(QueueBusy):
        dev.queue_set_num(0, 8)
    with pytest.raises(QueueBusy):
        dev.queue_set_addr(0, *ok)
    with pytest.raises(QueueBusy):
        dev.queue_set_base(0, 3)
    rig.start(0)                 # idempotent
    roundtrip_write(rig)


def test_unaligned_mmap_offset_and_split(make_rig):
    """Region 0 described as two regions, the second with a file offset that is not
    page aligned; a buffer crossing their boundary is split."""
    rig = make_rig()
    R = REGION_SIZE
    cut = 0x20800
    fd = rig.mem.fd
    rig.dev.set_mem_table([
        MemRegion(0, cut, UADDR0, fd, R),
        MemRegion(cut, R - cut, UADDR0 + cut, fd, R + cut),
        rig.mem.regions[1],
    ])
    payload = os.urandom(0x300)
    data = cut - 0x100
    rig.mem._bump[0] = max(rig.mem._bump[0], cut + 0x400)
    rig.mem.write(data, payload)
    st = rig.mem.alloc(1)
    head = rig.gq[0].add([Buf(data, len(payload)), Buf(st, 1, True)])
    rig.poll()
    [r] = rig.be[0].pending()
    assert rig.be[0].read(r.descs[0]) == payload
    rig.be[0].write(r.descs[1], b"\x07")
    rig.be[0].complete(r.head, 1)
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 1)]
    rig.mem.expect_write(st, b"\x07")


def test_region_removed_under_in_flight_request(make_rig):
    rig = make_rig()
    head, bufs = rig.blk_read(0, 4096, region=1)     # buffers in region 1, rings in region 0
    rig.poll()
    [r] = rig.be[0].pending()
    rig.dev.remove_mem_region(REGION_SIZE, REGION_SIZE)
    w = rig.serve(0, [r])
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 0)]      # failed, nothing written
    [ev] = rig.events()
    assert ev.name == "COPYBACK_UNMAPPED" and ev.a == bufs[1].gpa
    # new requests into the removed region are refused...
    h2, _ = rig.blk_read(0, 64, region=1)
    rig.poll()
    assert rig.gq[0].take_used() == [(h2, 0)]
    assert [e.name for e in rig.events()] == ["ADDR_UNMAPPED"]
    # ...until it is added back
    rig.dev.add_mem_region(rig.mem.regions[1])
    h3, b3 = rig.blk_read(0, 64, region=1)
    rig.poll()
    [r3] = rig.be[0].pending()
    w = rig.serve(0, [r3])
    rig.poll()
    assert rig.gq[0].take_used() == [(h3, 65)]
    rig.mem.expect_write(b3[1].gpa, w[r3.head][:64])
    rig.mem.expect_write(b3[2].gpa, w[r3.head][64:])


def test_region_with_rings_removed_pauses_queue(make_rig):
    rig = make_rig()
    rig.dev.remove_mem_region(0, REGION_SIZE)
    [ev] = rig.events()
    assert ev.name == "RING_UNMAPPED"
    rig.poll()                                       # nothing happens, no crash
    rig.dev.add_mem_region(rig.mem.regions[0])
    roundtrip_write(rig)                             # re-translated: resumes


def test_set_mem_table_replaces_mapping(make_rig):
    rig = make_rig()
    rig.dev.set_mem_table(list(reversed(rig.mem.regions)))   # same regions, other order
    roundtrip_write(rig)
    assert rig.events() == []


def test_reset_drops_in_flight_without_touching_guest(make_rig):
    rig = make_rig()
    head, bufs = rig.blk_read(0, 1024)
    rig.poll()
    [r] = rig.be[0].pending()
    rig.dev.reset()
    rig.serve(0, [r])                                # too late: ignored
    rig.poll()
    assert rig.gq[0].take_used() == []
    assert rig.dev.stats(0).inflight == 0
    with pytest.raises(InvalidRequest):
        rig.start(0)                                 # rings forgotten
    # reconfigure from scratch (as QEMU does after a reset)
    g = rig.gq[0]
    g.mem.write(g.used, bytes(6 + 8 * g.num))
    g.mem.write(g.avail, bytes(6 + 2 * g.num))
    g.avail_idx = g.last_used = 0
    g.free = list(range(g.num))
    g.outstanding.clear()
    rig.dev.queue_set_num(0, g.num)
    rig.dev.queue_set_base(0, 0)
    rig.dev.queue_set_addr(0, rig.mem.uaddr(g.desc), rig.mem.uaddr(g.avail), rig.mem.uaddr(g.used))
    rig.dev.queue_set_guest_kick(0, rig.kick[0])
    rig.dev.queue_set_guest_call(0, rig.call[0])
    rig.start(0)
    rig.be[0].restart()
    read_counter(rig.be[0].kick_fd)
    roundtrip_write(rig)


def test_guest_call_fd_none_and_replacement(make_rig):
    rig = make_rig()
    rig.dev.queue_set_guest_call(0, None)
    roundtrip_write(rig)
    assert read_counter(rig.call[0]) == 0
    other = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rig.dev.queue_set_guest_call(0, other)
        roundtrip_write(rig)
        assert read_counter(other) == 1
    finally:
        os.close(other)                              # ours: the data plane keeps a dup
    roundtrip_write(rig)                             # writing into its dup is fine


def eventfds_open() -> int:
    return sum(os.readlink(f"/proc/self/fd/{n}") == "anon_inode:[eventfd]" for n in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{n}"))


def test_fds_passed_in_stay_the_callers(make_rig):
    """The data plane keeps a duplicate of the eventfds it is given: the caller's fd
    stays open and the caller's to close; the data plane's dup keeps working after
    the caller closed its own, and is closed (not leaked) when replaced."""
    rig = make_rig()
    kfd = os.eventfd(0, os.EFD_NONBLOCK)
    other_name = os.dup(kfd)                         # the same eventfd, to kick after kfd is closed
    try:
        before = eventfds_open()
        rig.dev.queue_set_guest_kick(0, kfd)         # replaces rig.kick[0]: one dup closed, one taken
        assert eventfds_open() == before
        os.fstat(kfd)                                # ours, still open
        os.close(kfd)                                # does not affect the data plane
        rig.dp.start()
        head, bufs = rig.blk_write(0, b"k" * 100)
        os.write(other_name, (1).to_bytes(8, "little"))
        r, _, _ = select.select([rig.be[0].kick_fd], [], [], 5)
        assert r, "the kick did not reach the data plane through its own dup"
        # the wakeup is counted once the loop read the eventfd: wait for that event, not for a time
        for _ in range(500):
            if rig.dev.stats(0).guest_kicks:
                break
            select.select([], [], [], 0.01)
        assert rig.dev.stats(0).guest_kicks == 1
        [req] = rig.be[0].pending()
        assert rig.be[0].read(req.descs[1]) == b"k" * 100
        rig.dp.stop()
        # the loop polls kick fds and never reads them (csrc/loop.c, "Why no read")
        assert read_counter(other_name) == 1
        before = eventfds_open()
        rig.dev.queue_set_guest_kick(0, None)        # the data plane closes its dup ...
        assert eventfds_open() == before - 1
        os.write(other_name, (1).to_bytes(8, "little"))   # ... and only its dup
        assert read_counter(other_name) == 1
    finally:
        os.close(other_name)
