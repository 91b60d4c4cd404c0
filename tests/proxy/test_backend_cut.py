"""The backend dies in the middle of a control request (isolated mode, DESIGN §7).

fastshadow's own vhost-user front-end plays QEMU bringing up a virtio-blk
queue, doing I/O and stopping the ring; between fastshadow and a real
qemu-storage-daemon (file export) sits tests/proxy/interposer.py (Cutter), which drops the
backend connection once, at one request: before the backend saw it, or after
(its reply lost). For every request of the bring-up and both moments, the
front-end must see every request answered as if nothing happened, the data
written must be read back, and fastshadow must log one loss and one
reconnection, in one session. The guest-level kill tests (tests/e2e) cover
a backend dying between requests.
"""

from __future__ import annotations

import os

import pytest

from fastshadow.protocol.messages import FrontendReq as R

from .blkfront import BlkFront
from .interposer import Cutter

SECTOR = 9
CUT_AT = [R.GET_FEATURES, R.SET_OWNER, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
          R.GET_CONFIG, R.SET_MEM_TABLE, R.SET_FEATURES, R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR,
          R.SET_VRING_CALL, R.SET_VRING_KICK, R.GET_VRING_BASE]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("cut_at", CUT_AT, ids=lambda r: r.name)
def test_backend_dies_in_the_middle_of_a_request(cut_at, when, workdir, start_qsd, start_proxy):
    disk = workdir / "disk.img"
    start_qsd(str(workdir / "qsd.sock"), disk=disk, size=1 << 20)
    cutter = Cutter(str(workdir / "cut.sock"), str(workdir / "qsd.sock"), cut_at, when)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "cut.sock"),
                         "--mode", "isolated", "--backend-timeout", "20"], [str(workdir / "fs.sock")])
    data = os.urandom(4096)
    try:
        with BlkFront(str(workdir / "fs.sock")) as blk:
            assert blk.bring_up() == (1 << 20) // 512
            blk.write(SECTOR, data)
            assert blk.read(SECTOR, len(data)) == data
            assert blk.stop() == 2                                   # the guest's next avail index
    finally:
        cutter.close()
    with open(disk, "rb") as f:
        f.seek(SECTOR * 512)
        assert f.read(len(data)) == data
    assert cutter.cut.is_set(), f"the cutter never saw {cut_at.name}"
    log = proxy.wait_log(r"session\.end dev=dev0", timeout=10) and proxy.log()
    assert log.count("session.start dev=dev0") == 1, log[-3000:]
    assert log.count("backend.lost dev=dev0") == 1 and log.count("backend.reconnected dev=dev0") == 1, log[-3000:]
    assert "session.refused" not in log and "dataplane.refused" not in log, log[-3000:]
