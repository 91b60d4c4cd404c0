"""Isolated mode refuses control requests it cannot honour safely, one precise line
each, and loses nothing else: requests out of order (a ring started before its size
or addresses, ring addresses before any guest memory), rings outside guest memory,
impossible ring sizes, a memory region its fd cannot back, removing a region that
does not exist. QEMU's session ends (`session.refused`, naming the request and the
reason); the proxy serves the next session, which does verified I/O through a real
qemu-storage-daemon."""

from __future__ import annotations

import os
import re

import pytest

from fastshadow.protocol import payloads as p
from fastshadow.protocol.messages import FrontendReq as R

from ..dataplane.harness import GuestQueue
from .blkfront import BlkFront


def addr_outside(blk):
    blk.negotiate()
    blk.fe.set_vring_num(0, 64)
    blk.fe.set_vring_addr(0, 0x1234_0000_0000, 0x1234_0000_1000, 0x1234_0000_2000)


def ring_crosses_region_end(blk):
    blk.negotiate()
    blk.fe.set_vring_num(0, 64)
    end = blk.mem.regions[1].uaddr + blk.mem.regions[1].size   # the last region's last bytes
    blk.fe.set_vring_addr(0, end - 16 * 8, end - 0x3000, end - 0x2000)


def addr_before_memory(blk):
    blk.negotiate(memory=False)
    blk.fe.set_vring_num(0, 64)
    blk.fe.set_vring_addr(0, blk.mem.regions[0].uaddr, blk.mem.regions[0].uaddr + 0x1000,
                          blk.mem.regions[0].uaddr + 0x2000)


def kick_before_addr(blk):
    blk.negotiate()
    blk.fe.set_vring_num(0, 64)
    blk.fe.set_vring_call(0, blk.call)
    blk.fe.set_vring_kick(0, blk.kick)


def kick_before_num_and_addr(blk):
    blk.negotiate()
    blk.fe.set_vring_kick(0, blk.kick)


def ring_size(num):
    def run(blk):
        blk.negotiate()
        blk.fe.set_vring_num(0, num)
    return run


def num_while_running(blk):
    blk.bring_up()
    blk.fe.set_vring_num(0, 128)


def queue_out_of_range(blk):
    blk.negotiate()
    blk.fe.set_vring_num(5, 64)


def remove_unknown_region(blk):
    blk.negotiate()
    blk.fe.call(R.REM_MEM_REG, p.MemRegionMsg(p.MemoryRegion(0x5000_0000, 0x1000, 0x7A00_0000_0000, 0)))


def add_overlapping_region(blk):
    blk.negotiate()
    fd = os.memfd_create("more-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x100000)
    try:
        blk.fe.call(R.ADD_MEM_REG, p.MemRegionMsg(p.MemoryRegion(0x80000, 0x100000, 0x7A00_0000_0000, 0)), [fd])
    finally:
        os.close(fd)


def fd_shorter_than_region(blk):
    blk.negotiate(memory=False)
    fd = os.memfd_create("short-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    try:
        blk.fe.set_mem_table([p.MemoryRegion(0, 0x100000, 0x7F00_0000_0000, 0)], [fd])
    finally:
        os.close(fd)


def not_an_eventfd(request):
    """QEMU's ring notifiers are eventfds (vhost-user.rst, "Ring states"). /dev/null passed as
    a kick fd was taken: the data plane's poll found it readable forever and spun a CPU
    (over a million guest_kicks a second) on a ring nobody kicked."""
    def run(blk):
        blk.negotiate()
        blk.fe.set_vring_num(0, 64)
        q = blk.q = GuestQueue(blk.mem, 64)
        blk.fe.set_vring_addr(0, blk.mem.uaddr(q.desc), blk.mem.uaddr(q.used), blk.mem.uaddr(q.avail))
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            getattr(blk.fe, request)(0, fd)
        finally:
            os.close(fd)
    return run


CASES = {
    "ring-outside-memory": (addr_outside, r"SET_VRING_ADDR for queue 0: desc 0x123400000000, avail 0x123400002000 "
                                          r"or used 0x123400001000 \(QEMU addresses\) is not inside the guest memory"),
    "ring-crosses-region-end": (ring_crosses_region_end, r"SET_VRING_ADDR for queue 0: .* is not inside the guest "
                                                         r"memory QEMU described, or the ring crosses its end"),
    "ring-before-memory": (addr_before_memory, r"SET_VRING_ADDR for queue 0 before any guest memory"),
    "kick-before-addr": (kick_before_addr, r"SET_VRING_KICK for queue 0 before its SET_VRING_ADDR: "),
    "kick-first": (kick_before_num_and_addr, r"SET_VRING_KICK for queue 0 before its SET_VRING_NUM and "
                                             r"SET_VRING_ADDR"),
    "size-1000": (ring_size(1000), r"SET_VRING_NUM 1000 for queue 0: a split virtqueue's size is a power of 2 "
                                   r"from 1 to 32768"),
    "size-0": (ring_size(0), r"SET_VRING_NUM 0 for queue 0: a split"),
    "size-65536": (ring_size(65536), r"SET_VRING_NUM 65536 for queue 0: a split"),
    "size-while-running": (num_while_running, r"SET_VRING_NUM 128 for queue 0 while its ring runs"),
    "queue-out-of-range": (queue_out_of_range, r"QEMU named queue 5, but the device has 1 queues"),
    "remove-unknown-region": (remove_unknown_region, r"REM_MEM_REG gpa 0x50000000 size 0x1000: no such region in "
                                                     r"the guest memory table \(it holds 0x0\+0x100000, "
                                                     r"0x100000\+0x100000\)"),
    "add-overlapping-region": (add_overlapping_region, r"ADD_MEM_REG region gpa 0x80000 size 0x100000 overlaps the "
                                                       r"guest memory region 0x0\+0x100000"),
    "kick-not-eventfd": (not_an_eventfd("set_vring_kick"), r"SET_VRING_KICK for queue 0: its fd is "
                                                           r"/dev/null, not an eventfd"),
    "call-not-eventfd": (not_an_eventfd("set_vring_call"), r"SET_VRING_CALL for queue 0: its fd is "
                                                           r"/dev/null, not an eventfd"),
    "err-not-eventfd": (not_an_eventfd("set_vring_err"), r"SET_VRING_ERR for queue 0: its fd is "
                                                         r"/dev/null, not an eventfd"),
    "fd-too-short": (fd_shorter_than_region, r"SET_MEM_TABLE region gpa 0x0 size 0x100000: its fd holds 0x1000 "
                                             r"bytes, the region needs 0x100000"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_with_one_precise_line_and_next_session_works(case, workdir, start_qsd, start_proxy):
    run, reason = CASES[case]
    disk = workdir / "disk.img"
    start_qsd(str(workdir / "qsd.sock"), disk=disk, size=1 << 20)
    sock = str(workdir / "fs.sock")
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "qsd.sock"), "--mode", "isolated"], [sock])
    with BlkFront(sock, timeout=10) as blk:
        with pytest.raises(Exception):   # the session is closed under the front-end
            run(blk)
            blk.fe.get_features()        # a request sent without a reply owed: this one sees the close
    [line] = proxy.wait_log(r"session\.refused dev=dev0")
    assert re.search(reason, line), line
    proxy.wait_log(r"device\.waiting dev=dev0")
    log = proxy.log()
    assert "session.failed" not in log and "session.crashed" not in log and "Traceback" not in log, log[-3000:]

    # Nothing lost: the next front-end gets a working device.
    data = os.urandom(4096)
    with BlkFront(sock) as blk:
        blk.bring_up()
        blk.write(5, data)
        assert blk.read(5, len(data)) == data
    assert proxy.log().count("session.refused") == 1
