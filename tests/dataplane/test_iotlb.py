"""The device IOTLB (csrc/iotlb.c) against a reference model, through the data plane's
Python face: VHOST_USER_IOTLB_MSG updates and invalidations (vhost-user.rst "IOMMU
support"), their permissions, the cap, and QEMU's global flush (size 0)."""

from __future__ import annotations

import errno
import random

import struct

import pytest

from fastshadow.dataplane import IOTLB_RO, IOTLB_WO, DataPlane, DataPlaneError, InvalidRequest, NoSpace

PAGE = 4096


@pytest.fixture
def dev():
    dp = DataPlane()
    d = dp.add_device("iotlb", num_queues=1)
    yield d
    dp.close()


class Model:
    """Byte-exact reference: page -> (uaddr of the page, perm), pages only."""

    def __init__(self):
        self.pages: dict[int, tuple[int, int]] = {}

    def update(self, iova, size, uaddr, perm):
        for off in range(0, size, PAGE):
            self.pages[iova + off] = (uaddr + off, perm)

    def invalidate(self, iova, size):
        last = (1 << 64) - 1 if size == 0 or iova + size > 1 << 64 else iova + size - 1
        for page in [p for p in self.pages if iova <= p <= last]:
            del self.pages[page]


def test_lookup_follows_updates_and_invalidations(dev):
    rng = random.Random(7)
    dev.iotlb_enable(True, 4096)
    model = Model()
    for _ in range(3000):
        iova = rng.randrange(0, 256) * PAGE
        size = rng.randrange(1, 9) * PAGE
        if rng.random() < 0.6:
            uaddr = rng.randrange(0, 1 << 20) * PAGE
            perm = rng.choice([1, 2, 3])
            dev.iotlb_update(iova, size, uaddr, perm)
            model.update(iova, size, uaddr, perm)
        else:
            dev.iotlb_invalidate(iova, size)
            model.invalidate(iova, size)
    for page in range(0, 270 * PAGE, PAGE):
        for probe in (page, page + 123):
            got = dev.iotlb_translate(probe, 0)
            want = model.pages.get(page)
            if want is None:
                assert got is None, f"iova {probe:#x}: stale translation {got}"
            else:
                assert got is not None and got[0] == want[0] + (probe - page), f"iova {probe:#x}: {got} != {want}"


def test_permissions_are_enforced(dev):
    dev.iotlb_enable(True, 16)
    dev.iotlb_update(0x1000, PAGE, 0x7000_0000, IOTLB_RO)
    dev.iotlb_update(0x2000, PAGE, 0x7000_1000, IOTLB_WO)
    assert dev.iotlb_translate(0x1000, IOTLB_RO) == (0x7000_0000, PAGE)
    assert dev.iotlb_translate(0x2000, IOTLB_WO) == (0x7000_1000, PAGE)
    for iova, perm in ((0x1000, IOTLB_WO), (0x2000, IOTLB_RO), (0x1000, IOTLB_RO | IOTLB_WO)):
        with pytest.raises(DataPlaneError) as e:
            dev.iotlb_translate(iova, perm)
        assert e.value.errno == errno.EACCES


def test_global_flush_size_zero_removes_everything(dev):
    # QEMU's vhost_iommu_unmap_notify sends addr_mask + 1, which wraps to 0 for a flush of the
    # whole address space (Linux's lazy-mode device-IOTLB flush): it must not mean "nothing".
    dev.iotlb_enable(True, 16)
    for i in range(4):
        dev.iotlb_update(0xFFFF_0000 + i * PAGE, PAGE, 0x7000_0000 + i * PAGE, 3)
    assert dev.iotlb_invalidate(0, 0) == 4
    assert dev.iotlb_entries() == 0


def test_invalidation_cuts_an_entry_in_two(dev):
    dev.iotlb_enable(True, 16)
    dev.iotlb_update(0x10000, 4 * PAGE, 0x7000_0000, 3)
    assert dev.iotlb_invalidate(0x11000, PAGE) == 1
    assert dev.iotlb_translate(0x10fff, 3) == (0x7000_0fff, 1)
    assert dev.iotlb_translate(0x11000, 3) is None
    assert dev.iotlb_translate(0x12000, 3) == (0x7000_2000, 2 * PAGE)


def test_cap_bounds_the_table(dev):
    dev.iotlb_enable(True, 8)
    for i in range(8):
        dev.iotlb_update(i * PAGE, PAGE, 0x7000_0000 + i * PAGE, 3)
    with pytest.raises(NoSpace):
        dev.iotlb_update(100 * PAGE, PAGE, 0x7100_0000, 3)
    assert dev.iotlb_entries() == 8
    dev.iotlb_update(3 * PAGE, PAGE, 0x7200_0000, 1)   # replacing an entry needs no room
    dev.iotlb_invalidate(0, PAGE)
    dev.iotlb_update(100 * PAGE, PAGE, 0x7100_0000, 3)
    assert dev.iotlb_entries() == 8


@pytest.mark.parametrize("iova, size, uaddr, perm", [
    (0x1000, 0, 0x7000_0000, 3),                  # empty
    ((1 << 64) - PAGE, 2 * PAGE, 0x7000_0000, 3),  # wraps
    (0x1000, PAGE, 0x7000_0000, 0),               # no access
])
def test_malformed_updates_are_refused(dev, iova, size, uaddr, perm):
    dev.iotlb_enable(True, 8)
    with pytest.raises(InvalidRequest):
        dev.iotlb_update(iova, size, uaddr, perm)
    assert dev.iotlb_entries() == 0


# -- the data path through the IOTLB ------------------------------------------------

SHIFT = 1 << 20     # IOVA = gpa + SHIFT: an IOVA read as a gpa would name other pages


def iotlb_rig(make_rig, keep_completed=False):
    """A started queue whose rings and buffers are IOVAs, every page of test RAM mapped."""
    rig = make_rig(start=False)
    rig.dev.iotlb_enable(True, 4096, keep_completed)
    for gpa in range(0, rig.mem.size, PAGE):
        rig.dev.iotlb_update(gpa + SHIFT, PAGE, rig.mem.uaddr(gpa), IOTLB_RO | IOTLB_WO)
    g = rig.gq[0]
    rig.dev.queue_set_addr(0, g.desc + SHIFT, g.avail + SHIFT, g.used + SHIFT)
    rig.start(0)
    return rig


def test_dirty_log_marks_guest_physical_pages_not_iovas(make_rig):
    from .harness import Buf
    from .test_log import Log, pages, serve_all, used_ring_pages
    rig = iotlb_rig(make_rig)
    log = Log(rig.mem.size // PAGE // 8 + SHIFT // PAGE // 8 + 64)
    try:
        rig.dev.set_log_base(log.fd, log.size, log.offset)
        rig.dev.set_logging(True)
        g = rig.gq[0]
        rig.dev.queue_set_log_used(0, g.used + SHIFT)      # QEMU sends the used ring's IOVA
        hdr, data, st = rig.mem.alloc(16), rig.mem.alloc(3 * PAGE, align=PAGE), rig.mem.alloc(1)
        rig.mem.write(hdr, struct.pack("<IIQ", 0, 0, 7))
        head = g.add([Buf(hdr + SHIFT, 16), Buf(data + SHIFT, 3 * PAGE, True), Buf(st + SHIFT, 1, True)])
        assert serve_all(rig) == [(head, 3 * PAGE + 1)]
        rig.mem.accept(data, 3 * PAGE)
        rig.mem.accept(st, 1)
        assert log.pages() == pages(data, 3 * PAGE) | pages(st, 1) | used_ring_pages(rig, 0, 0)
        assert log.outside_untouched()
    finally:
        log.close()


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-completed"])
def test_a_completed_request_leaves_no_translation_behind(make_rig, keep):
    """Linux unmaps a request's buffers when it completes; in its default lazy mode the
    invalidation may never reach fastshadow (QEMU 7.2) while the IOVA is soon mapped to
    another page. So the data plane forgets the translations of every page a request
    named (buffers and indirect table) when it is done, refused requests included; the
    queue's own ring pages stay. With --iotlb-keep-completed they all stay."""
    from .harness import Buf
    from .test_log import serve_all
    rig = iotlb_rig(make_rig, keep_completed=keep)
    g = rig.gq[0]
    hdr, data, st = rig.mem.alloc(16), rig.mem.alloc(2 * PAGE, align=PAGE), rig.mem.alloc(1)
    rig.mem.write(hdr, struct.pack("<IIQ", 0, 0, 7))
    bufs = [Buf(hdr + SHIFT, 16), Buf(data + SHIFT, 2 * PAGE, True), Buf(st + SHIFT, 1, True)]
    head = g.add(bufs)
    assert serve_all(rig) == [(head, 2 * PAGE + 1)]
    rig.mem.accept(data, 2 * PAGE)
    rig.mem.accept(st, 1)
    rings = {p & ~(PAGE - 1) for p in (g.desc, g.avail, g.used)}
    for b in bufs:
        for page in range(b.gpa & ~(PAGE - 1), b.gpa + b.len, PAGE):
            if keep:
                assert rig.dev.iotlb_translate(page, 0) is not None, f"iova {page:#x} forgotten"
            elif page - SHIFT not in rings:
                assert rig.dev.iotlb_translate(page, 0) is None, f"iova {page:#x} still translated"
    ring = g.desc + SHIFT
    assert rig.dev.iotlb_translate(ring, 0) is not None    # the rings are not a request's


def missing_header_request(rig):
    """A blk read whose header page has no translation: the queue misses on it."""
    from .harness import Buf
    hdr_page = rig.mem.alloc(PAGE, align=PAGE)
    hdr, data, st = hdr_page + 0x100, rig.mem.alloc(512, align=512), rig.mem.alloc(1)
    rig.mem.write(hdr, struct.pack("<IIQ", 0, 0, 7))
    rig.dev.iotlb_invalidate(hdr_page + SHIFT, PAGE)
    head = rig.gq[0].add([Buf(hdr + SHIFT, 16), Buf(data + SHIFT, 512, True), Buf(st + SHIFT, 1, True)])
    rig.poll()
    [ev] = rig.events()
    assert (ev.name, ev.a) == ("IOTLB_MISS", hdr + SHIFT)
    return head, hdr_page, hdr, st


def test_an_answer_to_an_older_miss_on_the_same_page_is_not_taken_for_the_current_one(make_rig):
    """Found under load (tests/proxy/test_iotlb.py flaked): the answer to an older miss of the
    queue arrived after its update had already let the queue go on; a request that completed
    meanwhile dropped that page (forget on completion), and the next request's miss on
    another address of the page took the late answer for its own: refused, IOERR."""
    rig = iotlb_rig(make_rig)
    head, hdr_page, hdr, st = missing_header_request(rig)
    rig.dev.queue_iotlb_answered(0, hdr_page + SHIFT, ok=True)     # an older miss, same page
    rig.poll()
    assert rig.events() == [] and rig.be[0].pending() == []        # still waiting for its own
    rig.dev.iotlb_update(hdr_page + SHIFT, PAGE, rig.mem.uaddr(hdr_page), IOTLB_RO | IOTLB_WO)
    rig.dev.queue_iotlb_answered(0, hdr + SHIFT, ok=True)
    rig.poll()
    assert rig.events() == [] and len(rig.be[0].pending()) == 1
    rig.mem.accept(st, 1)


def test_a_page_gone_again_after_yes_is_asked_again_a_bounded_number_of_times(make_rig):
    """QEMU said "yes" but the page is not there when the queue walks again (dropped by a
    completion in between, or a front-end that acks and never sends): asked again, up to 8
    times in a row, then refused with the device's error; "no" is refused at once."""
    rig = iotlb_rig(make_rig)
    head, _, hdr, st = missing_header_request(rig)
    for _ in range(8):
        rig.dev.queue_iotlb_answered(0, hdr + SHIFT, ok=True)
        rig.poll()
        [ev] = rig.events()
        assert (ev.name, ev.a) == ("IOTLB_MISS", hdr + SHIFT)
    rig.dev.queue_iotlb_answered(0, hdr + SHIFT, ok=True)
    rig.poll()
    assert [e.name for e in rig.events()] == ["IOVA_UNMAPPED"]
    # the walk cannot reach the status byte past an untranslatable header: len 0, nothing written
    assert rig.gq[0].take_used() == [(head, 0)]
    head2, _, hdr2, st2 = missing_header_request(rig)
    rig.dev.queue_iotlb_answered(0, hdr2 + SHIFT, ok=False)
    rig.poll()
    assert [e.name for e in rig.events()] == ["IOVA_UNMAPPED"]
    assert rig.gq[0].take_used() == [(head2, 0)]
