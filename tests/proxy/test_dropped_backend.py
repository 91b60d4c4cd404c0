"""A dropped backend that lives on reaches nothing (isolated mode).

A recording interposer (tests/proxy/interposer.py) sits between fastshadow and a
real qemu-storage-daemon and keeps, from the first backend connection, dups of
the fds a backend is given: the shadow memfd and queue 0's kick and call
eventfds. The connection is then dropped; fastshadow reconnects (through the
interposer, to the same qemu-storage-daemon) and replays. From then on the test
plays the first backend living on with what it was given -- a liar that was cut
off, or qemu-storage-daemon finishing the requests of a deleted export: it
keeps publishing fake used elements and scribbling over the bounce area through
its mapping, reading the kick eventfd (swallowing kicks) and writing the call
eventfd. The guest's I/O against the real backend must not notice: its data is
the real backend's, every request completes once and with success, and the
proxy logs no refusal ("backend completed id 0 (len 0) a second time" was seen
after qemu-storage-daemon reconnects).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

from fastshadow.dataplane import MAX_QUEUE_SIZE, SHADOW_UADDR_BASE
from fastshadow.protocol.messages import FrontendReq as R

from .blkfront import BlkFront
from .interposer import Interposer

PAGE = 4096
KEPT = (R.SET_MEM_TABLE, R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_VRING_CALL)


def align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


#: Where queue 0's bounce area starts in the shadow region (csrc/README.md, "Shadow region").
BOUNCE0 = align(16 * MAX_QUEUE_SIZE) + align(6 + 2 * MAX_QUEUE_SIZE) + align(6 + 8 * MAX_QUEUE_SIZE)


class Zombie(threading.Thread):
    """The first backend, after its connection was dropped, with everything it was given."""

    def __init__(self, kept: dict, num: int):
        super().__init__(name="zombie-backend", daemon=True)
        [shadow], table = kept[R.SET_MEM_TABLE]
        [region] = table.regions
        self.map = mmap.mmap(shadow, region.memory_size)
        self.used = kept[R.SET_VRING_ADDR][1].used - SHADOW_UADDR_BASE
        [self.kick], _ = kept[R.SET_VRING_KICK]
        [self.call], _ = kept[R.SET_VRING_CALL]
        self.num = num
        self.halt = threading.Event()
        self.swallowed = self.faked = 0

    def run(self) -> None:
        while not self.halt.wait(0.0002):
            try:
                os.eventfd_read(self.kick)                # a kick meant for the new backend
                self.swallowed += 1
            except BlockingIOError:
                pass
            idx = struct.unpack_from("<H", self.map, self.used + 2)[0]
            struct.pack_into("<II", self.map, self.used + 4 + 8 * (idx % self.num), self.faked % self.num, 0)
            struct.pack_into("<H", self.map, self.used + 2, (idx + 1) & 0xFFFF)
            self.faked += 1
            self.map[BOUNCE0:BOUNCE0 + 16 * PAGE] = b"\xee" * (16 * PAGE)
            os.eventfd_write(self.call, 1)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.map.close()


def test_a_dropped_backend_that_lives_on_reaches_nothing(workdir, start_qsd, start_proxy):
    disk = workdir / "disk.img"
    start_qsd(str(workdir / "qsd.sock"), disk=disk, size=1 << 20)
    kept: dict = {}

    def keep(msg):
        if len(rec.seen) == 1 and msg.request in KEPT:    # the first backend connection only
            kept[msg.request] = ([os.dup(fd) for fd in msg.fds], msg.payload)
        return msg
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"), request_hook=keep)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                         "--mode", "isolated"], [str(workdir / "fs.sock")])
    first = os.urandom(4096)
    written = {}
    zombie = None
    try:
        with BlkFront(str(workdir / "fs.sock")) as blk:
            blk.bring_up()
            blk.write(8, first)
            rec.drop()
            proxy.wait_log(r"backend\.reconnected dev=dev0")
            zombie = Zombie(kept, blk.num)
            zombie.start()
            while zombie.faked < 10:                      # it acts before the I/O, and all along
                assert zombie.is_alive(), "the old backend's thread died"
                time.sleep(0.01)
            n = 0
            while n < 24 or (zombie.faked < 50 and n < 80):    # 80: what the test RAM holds
                sector = 16 + 8 * (n % 12)
                written[sector] = os.urandom(4096)
                blk.write(sector, written[sector])        # asserts exactly one completion, status OK
                assert blk.read(sector, 4096) == written[sector]
                n += 1
            assert blk.read(8, 4096) == first
            zombie.stop()
            print(f"the old backend faked {zombie.faked} used elements and swallowed {zombie.swallowed} kicks "
                  f"during {2 * n + 1} requests")
            assert zombie.faked >= 50, zombie.faked
            assert blk.q.take_used() == []                # no completion beyond one per request
            assert blk.stop() == 1 + 2 * n + 1            # the guest's next avail index
    finally:
        if zombie is not None and zombie.is_alive():
            zombie.stop()
        rec.close()
        for fds, _ in kept.values():
            for fd in fds:
                os.close(fd)
    with open(disk, "rb") as f:
        for sector, data in [(8, first), *written.items()]:
            f.seek(sector * 512)
            assert f.read(4096) == data, sector
    log = proxy.wait_log(r"session\.end dev=dev0", timeout=10) and proxy.log()
    assert "a second time" not in log and "dataplane.refused" not in log, log[-3000:]
    assert log.count("backend.lost dev=dev0") == 1 and log.count("backend.reconnected dev=dev0") == 1, log[-3000:]
    assert log.count("backend.renewed dev=dev0") == 1, log[-3000:]
