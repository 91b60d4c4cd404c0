"""A ring restarted without SET_VRING_CALL: isolated mode still calls the guest.

vhost-user.rst says that GET_VRING_BASE stops a ring, and nothing of what becomes of
the ring's call fd. libvhost-user (qemu-storage-daemon) closes it there
(vu_get_vring_base_exec), so a front-end that starts the ring again (SET_VRING_NUM,
BASE, ADDR, KICK) without sending SET_VRING_CALL again leaves the backend with none.
QEMU always sends it again; the scripted front-end here (blkfront.py) does not, and
keeps expecting its calls on the call fd it gave before the stop.

Direct mode forwards that as it is: qemu-storage-daemon serves the next request into
the used ring, then its notify writes to fd -1 and fails (vu_panic "Error writing
eventfd"): the driver is never called. In isolated mode the backend's call fd is
fastshadow's own, so fastshadow gives it again before the kick (give_backend_call in
fastshadow/proxy/isolated.py), and the guest is called as before: isolated mode is
more available than direct mode here (DESIGN §3.8 asks for at least as available).
"""

from __future__ import annotations

import os
import re
import select

from .blkfront import T_IN, BlkFront
from ..dataplane.test_threads import wait_until

#: What qemu-storage-daemon prints when a completion's notify finds no call fd
#: (libvhost-user _vu_queue_notify: eventfd_write(-1) fails, vu_panic).
QSD_NO_CALL_FD = "vu_panic: Error writing eventfd"


def start(workdir, start_qsd, start_proxy, mode: str, *extra):
    qsd = start_qsd(str(workdir / f"qsd-{mode}.sock"), disk=workdir / f"{mode}.img", size=8 << 20)
    sock = str(workdir / f"fs-{mode}.sock")
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / f"qsd-{mode}.sock"), "--mode", mode,
                         *extra], [sock], name=f"proxy-{mode}")
    return qsd, proxy, sock


def to_backend(log: str) -> list[str]:
    """The requests the proxy sent the backend, in order (its --log-level debug trace)."""
    return re.findall(r" msg dev=dev0 dir=fastshadow->backend req=(\w+) reply=False", log)


def test_ring_restarted_without_set_vring_call(workdir, start_qsd, start_proxy):
    data = os.urandom(4096)

    # Direct mode: the request is served, nobody is called.
    qsd, proxy, sock = start(workdir, start_qsd, start_proxy, "direct")
    with BlkFront(sock) as blk:
        blk.bring_up()
        blk.write(8, data)
        assert blk.stop() == 1
        blk.restart(1, call=False)
        head, buf, st = blk.request(T_IN, 8, 4096)
        wait_until(lambda: QSD_NO_CALL_FD in qsd.output, "qemu-storage-daemon's failed notify")
        # The notify it failed was the call: none came, none will.
        assert not select.select([blk.call], [], [], 0)[0], "direct mode: the guest was called"
        # The request itself was served (libvhost-user pushes the used element, then notifies).
        assert blk.q.take_used() == [(head, 4097)]
        assert blk.mem.read(buf, 4096) == data and blk.mem.read(st, 1) == b"\0"

    # Isolated mode: the same front-end is called. No busy-poll: the data plane then learns
    # of a completion from the backend's call only (a spin can see the shadow used ring
    # without it, which hides a lost call until the next request).
    qsd, proxy, sock = start(workdir, start_qsd, start_proxy, "isolated", "--busy-poll-us", "0",
                             "--log-level", "debug")
    with BlkFront(sock) as blk:
        blk.bring_up()
        blk.write(8, data)
        assert blk.stop() == 1
        blk.restart(1, call=False)
        assert blk.read(8, 4096) == data                # wait_used: the guest's call fd; status OK
        more = os.urandom(4096)
        blk.write(16, more)
        assert blk.read(16, 4096) == more
        # QEMU's way (SET_VRING_CALL again before the kick) needs nothing of fastshadow's own.
        assert blk.stop() == 4
        blk.restart(4)
        assert blk.read(8, 4096) == data
    assert QSD_NO_CALL_FD not in qsd.output, qsd.output
    log = proxy.wait_log(r"session\.end dev=dev0") and proxy.log()
    assert "backend.lost" not in log and "session.refused" not in log, log[-3000:]
    assert log.count("vring.call_given dev=dev0 queue=0") == 1, log[-3000:]
    sent = to_backend(log)
    stops = [i for i, r in enumerate(sent) if r == "GET_VRING_BASE"]
    assert len(stops) >= 2, sent
    # The call fd before the kick, which starts the ring in libvhost-user; QEMU's own after
    # the second stop, and no second one of fastshadow's.
    assert sent[stops[0]:stops[0] + 6] == ["GET_VRING_BASE", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                                           "SET_VRING_CALL", "SET_VRING_KICK"], sent
    assert sent[stops[1]:stops[1] + 6] == ["GET_VRING_BASE", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                                           "SET_VRING_CALL", "SET_VRING_KICK"], sent
