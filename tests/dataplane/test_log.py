"""Dirty logging for migration (csrc/log.c): with VHOST_F_LOG_ALL the data plane
marks exactly the guest pages it writes (device-written bytes, and the used ring
when its ring asks for it) in QEMU's log, and never writes outside the log."""

import mmap
import os

import pytest

from .harness import PAGE

CANARY = 0xA5


class Log:
    """QEMU's side of the log: a memfd holding `size` bytes of bitmap at
    `offset`, canary bytes before and after."""

    def __init__(self, size: int, offset: int = 24, tail: int = 64):
        self.size, self.offset = size, offset
        self.fd = os.memfd_create("test-vhost-log", os.MFD_CLOEXEC)
        self.total = offset + size + tail
        os.ftruncate(self.fd, self.total)
        self.map = mmap.mmap(self.fd, self.total)
        self.map[:] = bytes([CANARY]) * self.total
        self.clear()

    def clear(self) -> None:
        self.map[self.offset:self.offset + self.size] = bytes(self.size)

    def pages(self) -> set[int]:
        bits = self.map[self.offset:self.offset + self.size]
        return {8 * i + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1}

    def outside_untouched(self) -> bool:
        return (self.map[:self.offset] == bytes([CANARY]) * self.offset and
                self.map[self.offset + self.size:] == bytes([CANARY]) * (self.total - self.offset - self.size))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


@pytest.fixture
def log_rig(make_rig):
    made = []

    def factory(log_size=None, **kw):
        rig = make_rig(**kw)
        log = Log(log_size if log_size is not None else rig.mem.size // PAGE // 8)
        made.append(log)
        rig.dev.set_log_base(log.fd, log.size, log.offset)
        return rig, log
    yield factory
    for log in made:
        log.close()


def serve_all(rig, q=0):
    rig.poll()
    reqs = rig.be[q].pending()
    rig.serve(q, reqs)
    rig.poll()
    return rig.gq[q].take_used()


def used_ring_pages(rig, q, slot):
    used = rig.gq[q].used
    return pages(used + 2, 2) | pages(used + 4 + 8 * slot, 8)


def test_logs_exactly_the_written_pages(log_rig):
    rig, log = log_rig()
    rig.dev.set_logging(True)
    rig.dev.queue_set_log_used(0, rig.gq[0].used)
    # Data crossing the boundary of the two guest regions, over four pages.
    head, bufs = rig.blk_read(0, 3 * PAGE + 100, crossing=2 * PAGE)
    assert serve_all(rig) == [(head, 3 * PAGE + 101)]
    rig.accept_writable(bufs)
    expected = pages(bufs[1].gpa, bufs[1].len) | pages(bufs[2].gpa, 1) | used_ring_pages(rig, 0, 0)
    assert pages(bufs[0].gpa, 16).isdisjoint(pages(bufs[1].gpa, bufs[1].len) | pages(bufs[2].gpa, 1)), \
        "test layout: the readable header must sit on a page of its own"
    assert log.pages() == expected
    assert rig.dev.stats(0).log_pages >= len(expected)
    assert log.outside_untouched()


def test_readable_buffers_and_short_completions_are_not_logged(log_rig):
    rig, log = log_rig()
    rig.dev.set_logging(True)
    head, bufs = rig.blk_write(0, os.urandom(2 * PAGE))
    assert serve_all(rig) == [(head, 1)]
    rig.accept_writable(bufs)
    assert log.pages() == pages(bufs[2].gpa, 1)        # the status byte only; no used ring logging
    # A read completed with fewer bytes than its buffer: only those are logged.
    log.clear()
    head, bufs = rig.blk_read(0, 4 * PAGE)
    rig.poll()
    [req] = rig.be[0].pending()
    rig.be[0].write(req.descs[1], b"x" * 100)
    rig.be[0].complete(req.head, 100)
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 100)]
    rig.mem.expect_write(bufs[1].gpa, b"x" * 100)
    assert log.pages() == pages(bufs[1].gpa, 100)


def test_nothing_logged_without_log_all(log_rig):
    rig, log = log_rig()
    rig.dev.queue_set_log_used(0, rig.gq[0].used)      # VRING_F_LOG alone does not log
    head, bufs = rig.blk_read(0, PAGE)
    assert serve_all(rig) == [(head, PAGE + 1)]
    rig.accept_writable(bufs)
    assert log.pages() == set()
    assert rig.dev.stats(0).log_pages == 0


def test_event_idx_avail_event_is_logged(log_rig):
    rig, log = log_rig(event_idx=True)
    rig.dev.set_logging(True)
    rig.dev.queue_set_log_used(0, rig.gq[0].used)
    head, bufs = rig.blk_read(0, 512)
    assert serve_all(rig) == [(head, 513)]
    rig.accept_writable(bufs)
    used = rig.gq[0].used
    assert pages(used + 4 + 8 * rig.num, 2) <= log.pages()   # avail_event sits after the ring


def test_log_smaller_than_memory_is_refused_once_and_never_overrun(log_rig):
    rig, log = log_rig(log_size=1)                      # covers guest pages 0-7 only
    rig.dev.set_logging(True)
    for _ in range(3):
        head, bufs = rig.blk_read(0, PAGE, region=1)    # region 1 starts at page 256
        assert serve_all(rig) == [(head, PAGE + 1)]     # the request itself completes
        rig.accept_writable(bufs)
    evs = rig.events()
    assert [e.name for e in evs] == ["LOG_OUT_OF_RANGE"]
    assert "beyond the 1-byte dirty log" in evs[0].message
    assert log.outside_untouched()


def test_log_can_be_replaced_and_removed(log_rig):
    rig, log = log_rig()
    rig.dev.set_logging(True)
    bigger = Log(2 * log.size, offset=0)
    try:
        rig.dev.set_log_base(bigger.fd, bigger.size, bigger.offset)   # QEMU resizes the log
        head, bufs = rig.blk_read(0, PAGE)
        assert serve_all(rig) == [(head, PAGE + 1)]
        rig.accept_writable(bufs)
        assert log.pages() == set() and bigger.pages() == pages(bufs[1].gpa, PAGE) | pages(bufs[2].gpa, 1)
        rig.dev.set_log_base(None)
        bigger.clear()
        head, bufs = rig.blk_read(0, PAGE)
        assert serve_all(rig) == [(head, PAGE + 1)]
        rig.accept_writable(bufs)
        assert bigger.pages() == set()
    finally:
        bigger.close()


def test_device_error_of_a_refused_request_is_logged(log_rig):
    """The status byte written for a refused blk request is a guest write like any other."""
    from fastshadow.devices import Failure

    from .harness import Buf

    rig, log = log_rig(failure=Failure.BLK_STATUS)
    rig.dev.set_logging(True)
    hdr = rig.mem.alloc(16)
    st = rig.mem.alloc(1, region=1)
    head = rig.gq[0].add([Buf(hdr, 16), Buf(0xDEAD0000, 0, True), Buf(st, 1, True)])
    rig.poll()
    assert rig.gq[0].take_used() == [(head, 1)]
    rig.mem.expect_write(st, b"\x01")
    assert log.pages() == pages(st, 1)
    assert rig.dev.stats(0).log_pages == 1
    assert log.outside_untouched()
