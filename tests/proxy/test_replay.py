"""A restarted backend is told everything the old one was (isolated mode, DESIGN §7).

A recording interposer (tests/proxy/interposer.py) sits between fastshadow and
a real qemu-storage-daemon. The front-end brings a virtio-blk queue up and does
I/O; the interposer then drops the backend connection between two requests.
fastshadow reconnects and replays: every state-setting request the first
backend received must reach the second, with the same payload (its latest per
queue), and I/O must go on. The list of state-setting requests is written here
from docs/interop/vhost-user.rst, not taken from fastshadow: a request whose
handler's message is not replayed fails this test.
"""

from __future__ import annotations

import os
import socket

from fastshadow.protocol.messages import FrontendReq as R

from .blkfront import BlkFront
from .interposer import Interposer

#: Requests whose effect a vhost-user backend keeps until told otherwise ("Ring states",
#: "Memory regions", "Back-end communication" in the spec).
STATE = {R.SET_OWNER, R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_BACKEND_REQ_FD, R.SET_MEM_TABLE,
         R.SET_CONFIG, R.SET_STATUS, R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_CALL,
         R.SET_VRING_ERR, R.SET_VRING_KICK, R.SET_VRING_ENABLE}
VRING = {R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_CALL, R.SET_VRING_ERR,
         R.SET_VRING_KICK, R.SET_VRING_ENABLE}


def latest_state(seen):
    """{(request, queue index or None): (payload, fd count)}: the last of each, as a backend keeps it."""
    out = {}
    for req, payload, nfds, _fds in seen:
        if req in STATE:
            index = int.from_bytes(payload[:4], "little") & 0xFF if req in VRING else None
            out[(req, index)] = (payload, nfds)
    return out


def test_every_state_request_is_replayed_to_a_restarted_backend(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=1 << 20)
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"))
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                         "--mode", "isolated"], [str(workdir / "fs.sock")])
    a, b = os.urandom(4096), os.urandom(4096)
    channel, qemu_channel = socket.socketpair()
    try:
        with BlkFront(str(workdir / "fs.sock")) as blk:
            blk.bring_up(backend_channel=channel.fileno())
            blk.fe.set_vring_enable(0, True)
            blk.write(8, a)
            first = latest_state(rec.seen[0])
            rec.drop()
            proxy.wait_log(r"backend\.reconnected dev=dev0")
            blk.write(16, b)
            assert blk.read(8, 4096) == a and blk.read(16, 4096) == b
        assert len(rec.seen) == 2, [len(s) for s in rec.seen]
        second = latest_state(rec.seen[1])
    finally:
        rec.close()
        channel.close()
        qemu_channel.close()
    assert {k for k in first} >= {(R.SET_OWNER, None), (R.SET_FEATURES, None), (R.SET_PROTOCOL_FEATURES, None),
                                  (R.SET_BACKEND_REQ_FD, None), (R.SET_MEM_TABLE, None), (R.SET_VRING_NUM, 0),
                                  (R.SET_VRING_ADDR, 0), (R.SET_VRING_BASE, 0), (R.SET_VRING_CALL, 0),
                                  (R.SET_VRING_KICK, 0), (R.SET_VRING_ENABLE, 0)}, sorted(first, key=str)
    missing = {k: v for k, v in first.items() if second.get(k) != v}
    assert not missing, f"not replayed as sent: {sorted(missing, key=str)}"
    assert list(second) == list(first), "replayed in another order than first sent"
