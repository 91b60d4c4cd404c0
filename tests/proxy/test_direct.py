"""Direct mode against a real qemu-storage-daemon, driven by fastshadow's own
vhost-user front-end (the QEMU guest end-to-end tests live in tests/e2e)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from fastshadow.protocol import payloads as p
from fastshadow.protocol.connection import Channel, Connection
from fastshadow.protocol.features import ProtocolFeature
from fastshadow.protocol.frontend import Frontend
from fastshadow.protocol.messages import HEADER, FrontendReq


def handshake(path: str) -> dict:
    fe = Frontend.connect(path, timeout=10)
    try:
        features = fe.get_features()
        fe.set_owner()
        pf = fe.get_protocol_features()
        fe.set_protocol_features(pf)
        out = {"features": features, "protocol_features": pf, "queues": fe.get_queue_num(),
               "config": fe.get_config(0, 60)}
        fe.set_features(features & ~(1 << 26))
        return out
    finally:
        fe.close()


def test_handshake_through_proxy_equals_direct(workdir, start_qsd, start_proxy):
    qsd = start_qsd(str(workdir / "qsd.sock"), driver="null", num_queues=2)
    direct = handshake(str(workdir / "qsd.sock"))
    proxy = start_proxy(["--mode", "direct",
                         "--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--log-level", "debug"], [str(workdir / "fs.sock")])
    via = handshake(str(workdir / "fs.sock"))
    assert via == direct
    assert direct["queues"] == 2
    # One debug line per message and direction: the GET_CONFIG request went through, and its reply came back.
    proxy.wait_log(r"dir=fastshadow->backend req=GET_CONFIG reply=False")
    proxy.wait_log(r"dir=fastshadow->qemu req=GET_CONFIG reply=True")
    assert qsd.returncode is None


def test_two_devices_from_a_config_file(workdir, start_qsd, start_proxy):
    for n in ("a", "b"):
        start_qsd(str(workdir / f"qsd-{n}.sock"), driver="null")
    cfg = workdir / "fs.toml"
    cfg.write_text("\n".join(
        f'[[device]]\nname = "disk-{n}"\nlisten = "{workdir}/fs-{n}.sock"\nbackend = "{workdir}/qsd-{n}.sock"\n'
        'mode = "direct"\n'
        for n in ("a", "b")))
    proxy = start_proxy(["--config", str(cfg)], [str(workdir / "fs-a.sock"), str(workdir / "fs-b.sock")])
    a = handshake(str(workdir / "fs-a.sock"))
    b = handshake(str(workdir / "fs-b.sock"))
    assert a == b
    proxy.wait_log(r"session.start dev=disk-a")
    proxy.wait_log(r"session.start dev=disk-b")


def test_malformed_message_closes_only_that_session(workdir, start_qsd, start_proxy):
    for n in ("a", "b"):
        start_qsd(str(workdir / f"qsd-{n}.sock"), driver="null")
    proxy = start_proxy(["--mode", "direct",
                         "--name", "A", "--listen", str(workdir / "fs-a.sock"), "--backend", str(workdir / "qsd-a.sock"),
                         "--listen", str(workdir / "fs-b.sock"), "--backend", str(workdir / "qsd-b.sock"),
                         "--name", "B"],
                        [str(workdir / "fs-a.sock"), str(workdir / "fs-b.sock")])
    # B is mid-session while A misbehaves.
    fe_b = Frontend.connect(str(workdir / "fs-b.sock"))
    features = fe_b.get_features()

    bad = socket.socket(socket.AF_UNIX)
    bad.connect(str(workdir / "fs-a.sock"))
    bad.sendall(HEADER.pack(FrontendReq.GET_FEATURES, 0x2, 0))  # version 2 does not exist
    bad.settimeout(10)
    assert bad.recv(1) == b""  # the proxy closed A's session
    bad.close()
    [line] = proxy.wait_log(r"session.refused dev=A")
    assert "BadVersion" in line and "version 2" in line

    # B's session is untouched, and A takes a new session.
    assert fe_b.get_features() == features
    fe_b.close()
    assert handshake(str(workdir / "fs-a.sock"))["features"] == features
    assert proxy.alive()


def test_fds_on_request_that_takes_none_is_refused(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    proxy = start_proxy(["--mode", "direct",
                         "--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock")],
                        [str(workdir / "fs.sock")])
    import array
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(workdir / "fs.sock"))
    fd = os.memfd_create("stray")
    s.sendmsg([HEADER.pack(FrontendReq.GET_FEATURES, 1, 0)],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
    s.settimeout(10)
    assert s.recv(1) == b""
    [line] = proxy.wait_log(r"session.refused")
    assert "UnexpectedFds" in line and "GET_FEATURES" in line
    # The stray fd did not stay open in the proxy.
    ino = os.fstat(fd).st_ino
    for entry in os.listdir(f"/proc/{proxy.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{proxy.pid}/fd/{entry}")
        except OSError:
            continue
        assert "memfd:stray" not in target, f"stray memfd (inode {ino}) still open in the proxy"
    os.close(fd)


def test_backend_death_is_logged_and_proxy_waits_for_next_session(workdir, start_qsd, start_proxy):
    qsd_sock = str(workdir / "qsd.sock")
    qsd = start_qsd(qsd_sock, driver="null")
    proxy = start_proxy(["--mode", "direct",
                         "--listen", str(workdir / "fs.sock"), "--backend", qsd_sock, "--backend-timeout", "1"],
                        [str(workdir / "fs.sock")])
    fe = Frontend.connect(str(workdir / "fs.sock"))
    fe.get_features()
    os.kill(qsd.pid, signal.SIGKILL)
    proxy.wait_log(r"session.end dev=dev0 reason=\"backend closed the connection")
    # The QEMU side is closed too, so QEMU (reconnect=) notices and comes back.
    fe.conn.sock.settimeout(10)
    assert fe.conn.sock.recv(1) == b""
    fe.close()
    assert proxy.alive()
    proxy.wait_log(r"device.waiting dev=dev0")
    # With no backend, a new QEMU connection is refused with a clear line, and the proxy stays up.
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(workdir / "fs.sock"))
    s.settimeout(30)
    assert s.recv(1) == b""
    proxy.wait_log(r"backend.unavailable dev=dev0")
    # A restarted backend serves the next session.
    start_qsd(qsd_sock, driver="null")
    assert handshake(str(workdir / "fs.sock"))["queues"] >= 1
    assert proxy.alive()


def test_backend_listen_mode(workdir, start_qsd, start_proxy):
    """A backend that connects out to fastshadow. qemu-storage-daemon only listens, so a
    small fd-passing bridge connects it out (it relays messages and fds verbatim)."""
    qsd_sock = str(workdir / "qsd.sock")
    start_qsd(qsd_sock, driver="null")
    be_sock = str(workdir / "be.sock")
    proxy = start_proxy(["--mode", "direct", "--listen", str(workdir / "fs.sock"), "--backend-listen", be_sock],
                        [str(workdir / "fs.sock"), be_sock])
    stop = threading.Event()

    def bridge():
        out = socket.socket(socket.AF_UNIX)
        out.connect(be_sock)
        inn = socket.socket(socket.AF_UNIX)
        inn.connect(qsd_sock)
        up = Connection(out, Channel.MAIN, receives_replies=False)
        down = Connection(inn, Channel.MAIN, receives_replies=True)
        from fastshadow.protocol.messages import Negotiation
        neg = Negotiation()
        try:
            while not stop.is_set():
                msg = up.recv(timeout=10)
                neg.observe(msg)
                reply = down.request(msg, expect_reply=neg.expects_reply(msg), timeout=10)
                msg.close_fds()
                if reply is not None:
                    up.send(reply, close_fds=True)
        except Exception:
            pass
        finally:
            out.close()
            inn.close()

    t = threading.Thread(target=bridge, daemon=True)
    # The proxy waits for the backend only once QEMU is there: start the bridge right after.
    fe_result = {}

    def frontend():
        fe_result.update(handshake(str(workdir / "fs.sock")))

    f = threading.Thread(target=frontend)
    f.start()
    time.sleep(0.2)
    t.start()
    f.join(20)
    stop.set()
    assert fe_result.get("queues", 0) >= 1
    proxy.wait_log(r"session.start dev=dev0")


def test_backend_request_channel_is_relayed(workdir, start_proxy):
    """Back-end requests reach QEMU's end of the channel through fastshadow's relay, and
    QEMU's replies come back. qemu-storage-daemon 7.2 sends none we can trigger, so this
    supplement uses a minimal hand-written backend (the QEMU guest tests cover the real
    SET_BACKEND_REQ_FD hand-over to qemu-storage-daemon)."""
    be_path = str(workdir / "fake-be.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(be_path)
    listener.listen(1)
    got_reply = {}

    def fake_backend():
        from fastshadow.protocol.messages import FLAG_NEED_REPLY, VERSION, BackendReq, Message
        sock, _ = listener.accept()
        conn = Connection(sock, Channel.MAIN, receives_replies=False)
        proto = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK
        while True:
            try:
                msg = conn.recv(timeout=10)
            except Exception:
                return
            if msg.request == FrontendReq.GET_FEATURES:
                conn.send(msg.reply(p.U64(1 << 30)))
            elif msg.request == FrontendReq.GET_PROTOCOL_FEATURES:
                conn.send(msg.reply(p.U64(proto)))
            elif msg.request == FrontendReq.SET_BACKEND_REQ_FD:
                chan = Connection(socket.socket(fileno=msg.fds.pop()), Channel.BACKEND, receives_replies=True)
                if msg.need_reply:
                    conn.send(msg.ack())
                reply = chan.request(Message(BackendReq.CONFIG_CHANGE_MSG, flags=VERSION | FLAG_NEED_REPLY),
                                     expect_reply=True, timeout=10)
                got_reply["value"] = reply.payload.value
            elif msg.need_reply:
                conn.send(msg.ack())

    t = threading.Thread(target=fake_backend, daemon=True)
    t.start()
    proxy = start_proxy(["--mode", "direct",
                         "--listen", str(workdir / "fs.sock"), "--backend", be_path, "--log-level", "debug"],
                        [str(workdir / "fs.sock")])
    fe = Frontend.connect(str(workdir / "fs.sock"))
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features())
    ours, theirs = socket.socketpair()
    fe.set_backend_req_fd(theirs.fileno())
    theirs.close()
    # We play QEMU's end of the channel: the request arrives, we acknowledge it.
    chan = Connection(ours, Channel.BACKEND, receives_replies=False)
    msg = chan.recv(timeout=10)
    assert msg.request.name == "CONFIG_CHANGE_MSG" and msg.need_reply
    chan.send(msg.ack())
    deadline = time.monotonic() + 10
    while "value" not in got_reply and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got_reply == {"value": 0}
    proxy.wait_log(r"dir=\"backend->fastshadow \(channel\)\" req=CONFIG_CHANGE_MSG")
    proxy.wait_log(r"dir=\"qemu->fastshadow \(channel\)\" req=CONFIG_CHANGE_MSG reply=True")
    fe.close()
    listener.close()


def test_immediate_reconnect_is_served_and_a_second_frontend_refused(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    proxy = start_proxy(["--mode", "direct",
                         "--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock")],
                        [str(workdir / "fs.sock")])
    for _ in range(20):  # close and reconnect at once, as QEMU's reconnect= or a benchmark does
        assert handshake(str(workdir / "fs.sock"))["queues"] >= 1
    fe = Frontend.connect(str(workdir / "fs.sock"))
    fe.get_features()
    second = socket.socket(socket.AF_UNIX)
    second.connect(str(workdir / "fs.sock"))
    second.settimeout(10)
    assert second.recv(1) == b""  # refused: the first front-end is still there
    proxy.wait_log("qemu.refused dev=dev0")
    fe.get_features()  # and the first is unaffected
    fe.close()

