"""A compromised backend asks, on its back-end request channel, for what would
break isolation: a host notifier area or a shared-memory mapping into the guest
(each with an fd of its own), IOTLB traffic. Isolated mode refuses each with a
REPLY_ACK failure to the backend and one log line, QEMU never hears of them and
fastshadow keeps none of their fds; a harmless request (config change) still
reaches QEMU, and the device keeps doing verified I/O through a real
qemu-storage-daemon. The hostile requests come from tests/proxy/interposer.py,
which takes the channel in the daemon's place."""

from __future__ import annotations

import os
import socket
import threading

from fastshadow.protocol import Channel, Connection
from fastshadow.protocol import payloads as p
from fastshadow.protocol.messages import FLAG_NEED_REPLY, VERSION, BackendReq, FrontendReq, Message

from .blkfront import BlkFront
from .interposer import Answer, Interposer

HOSTILE = [
    (BackendReq.VRING_HOST_NOTIFIER_MSG, p.VringArea(0, 4096, 0), True,
     "it would map backend memory into the guest, bypassing the proxy"),
    (BackendReq.SHMEM_MAP, p.ShmemMap(0, 0, 0, 4096, 3), True, "it would map backend memory into the guest"),
    (BackendReq.IOTLB_MSG, p.IotlbMsg(0x1000, 4096, 0, 3, 1), False,
     "the backend has no device IOTLB: fastshadow translates IOVAs itself"),
]


def proxy_fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_isolation_breaking_backend_requests_are_refused(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=1 << 20)
    taken: dict[str, Connection] = {}

    def take_channel(msg: Message):
        if msg.request == FrontendReq.SET_BACKEND_REQ_FD:   # the hostile backend keeps the channel
            taken["chan"] = Connection(socket.socket(fileno=msg.fds.pop()), Channel.BACKEND,
                                       receives_replies=True, name="proxy (request channel)")
            return Answer(msg.ack() if msg.need_reply else None)
        return msg

    mitm = Interposer(str(workdir / "mitm.sock"), str(workdir / "qsd.sock"), request_hook=take_channel)
    sock = str(workdir / "fs.sock")
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "mitm.sock"), "--mode", "isolated"], [sock])
    qemu_end, ours = socket.socketpair()
    qemu_chan = Connection(qemu_end, Channel.BACKEND, receives_replies=False, name="qemu (request channel)")
    seen_by_qemu: list[str] = []

    def play_qemu_channel():
        try:
            while True:
                msg = qemu_chan.recv()
                seen_by_qemu.append(msg.request.name)
                msg.close_fds()
                if msg.need_reply:
                    qemu_chan.send(msg.ack())
        except Exception:
            pass
    threading.Thread(target=play_qemu_channel, daemon=True).start()

    data = os.urandom(4096)
    try:
        with BlkFront(sock) as blk:
            blk.bring_up(backend_channel=ours.fileno())
            ours.close()
            chan = taken["chan"]
            for req, payload, with_fd, _ in HOSTILE:
                fds = [os.memfd_create(f"hostile-{req.name}", os.MFD_CLOEXEC)] if with_fd else []
                reply = chan.request(Message(req, payload, fds, VERSION | FLAG_NEED_REPLY), expect_reply=True,
                                     timeout=10)
                for fd in fds:
                    os.close(fd)
                assert reply.payload.value != 0, f"{req.name} was acknowledged"
            reply = chan.request(Message(BackendReq.CONFIG_CHANGE_MSG, p.Empty(), [], VERSION | FLAG_NEED_REPLY),
                                 expect_reply=True, timeout=10)
            assert reply.payload.value == 0           # QEMU's answer, relayed
            assert [n for n in proxy_fd_targets(proxy.pid) if "hostile" in n] == []
            blk.write(7, data)
            assert blk.read(7, len(data)) == data
    finally:
        mitm.close()
        qemu_chan.close()
    assert seen_by_qemu == ["CONFIG_CHANGE_MSG"]
    for req, _, _, reason in HOSTILE:
        [line] = proxy.wait_log(rf"backend_request\.refused dev=dev0 req={req.name} ")
        assert reason in line, line
    log = proxy.log()
    assert "session.refused" not in log and "session.failed" not in log and "dataplane.refused" not in log, log
