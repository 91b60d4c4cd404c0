"""The sockets an operator deploys with: mode and group set before anyone can connect, a lock
so that a second proxy refuses a live path, inherited sockets (--fd, systemd socket
activation), the backend socket checked at start."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys

import pytest

from fastshadow.proxy import endpoints
from fastshadow.proxy.config import SocketAccess
from fastshadow.protocol.frontend import Frontend
from fastshadow.proxy.endpoints import Listener, PathBusy, is_listening

from ..proxy.test_direct import handshake

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)


def proxy_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "fastshadow.cli", "proxy", *args]


def connect_as_nobody(path) -> str:
    """Try to connect to `path` as nobody:nogroup; 'ok' or the error's name."""
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('ok')\n"
            "except OSError as e:\n print(type(e).__name__)")
    r = subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
                        "/usr/bin/python3", "-c", code, str(path)], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or r.stderr.strip()


@pytest.fixture
def open_dir():
    """A directory others may traverse (pytest's tmp dirs are root's, mode 0700)."""
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="fs-ops-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root")
def test_socket_mode_and_group_let_qemus_group_connect(open_dir, start_qsd, start_proxy):
    start_qsd(str(open_dir / "qsd.sock"), driver="null")
    ok, no = open_dir / "ok.sock", open_dir / "no.sock"
    proxy = start_proxy(["--mode", "direct",
                         "--listen", str(ok), "--backend", str(open_dir / "qsd.sock"),
                         "--socket-group", NOGROUP.gr_name,
                         "--listen", str(no), "--backend", str(open_dir / "qsd.sock"), "--socket-mode", "0600"],
                        [str(ok), str(no)])
    st = os.stat(ok)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY.pw_gid and st.st_uid == 0
    assert stat.S_IMODE(os.stat(no).st_mode) == 0o600
    assert connect_as_nobody(ok) == "ok"                      # QEMU's group: allowed
    assert connect_as_nobody(no) == "PermissionError"         # anyone else: refused
    proxy.wait_log(r"qemu\.connected dev=dev0")
    assert proxy.stop() == 0
    assert not ok.exists() and not no.exists() and not (open_dir / "ok.sock.lock").exists()


def test_mode_and_group_are_set_before_listen(tmp_path, monkeypatch):
    """Nobody can connect before the mode is right: at the moment the group and mode are set,
    the socket is bound (under umask 0177, so mode 0600) but not listening yet."""
    seen = {}
    real = endpoints._apply_access

    def spy(path, access):
        seen["listening"] = is_listening(path)
        seen["mode"] = stat.S_IMODE(os.lstat(path).st_mode)
        real(path, access)
    monkeypatch.setattr(endpoints, "_apply_access", spy)
    path = str(tmp_path / "l.sock")
    lst = Listener.create(path, SocketAccess(0o666, os.getegid()))
    try:
        assert seen == {"listening": False, "mode": 0o600}
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 and is_listening(path)
    finally:
        lst.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def test_a_second_proxy_refuses_a_live_path(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    sock = str(workdir / "fs.sock")
    first = start_proxy(["--mode", "direct", "--listen", sock, "--backend", str(workdir / "qsd.sock")], [sock])
    r = subprocess.run(proxy_cmd("--mode", "direct", "--listen", sock, "--backend", str(workdir / "qsd.sock")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    [line] = r.stderr.strip().splitlines()
    assert line == (f"fastshadow proxy: {sock} is served by another fastshadow (pid {first.pid}, holding "
                    f"{sock}.lock); stop it first or choose another path")
    assert first.alive() and is_listening(sock)
    assert handshake(sock)["queues"] >= 1                    # the first one still serves


def test_a_stale_socket_and_lock_are_taken_over(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    sock = str(workdir / "fs.sock")
    args = ["--mode", "direct", "--listen", sock, "--backend", str(workdir / "qsd.sock")]
    crashed = start_proxy(args, [sock], name="crashed")
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.proc.wait()
    assert os.path.exists(sock) and os.path.exists(sock + ".lock")   # left behind by the crash
    start_proxy(args, [sock], name="next")
    assert handshake(sock)["queues"] >= 1


def test_another_programs_live_socket_and_other_files_are_not_replaced(workdir):
    path = str(workdir / "x.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    other.listen()
    with other:
        with pytest.raises(PathBusy, match="another process listens on it"):
            Listener.create(path)
        assert is_listening(path)
    os.unlink(path)
    (workdir / "x.sock").write_text("data")
    with pytest.raises(endpoints.EndpointError, match="exists and is not a socket"):
        Listener.create(path)
    assert (workdir / "x.sock").read_text() == "data"


def test_fd_listening_socket_and_socket_path_alias(workdir, start_qsd, start_proxy):
    """QEMU's conventions: --fd N (a listening socket the proxy inherits, never removes) and
    --socket-path PATH (the same as --listen)."""
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    path = str(workdir / "inherited.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    p = start_proxy(["--mode", "direct", "--fd", str(lsock.fileno()), "--backend", str(workdir / "qsd.sock"),
                     f"--socket-path={workdir / 'alias.sock'}", "--backend", str(workdir / "qsd.sock")],
                    [str(workdir / "alias.sock")], pass_fds=[lsock.fileno()])
    lsock.close()
    p.wait_log(rf"device\.listening dev=dev0 listen=fd:\d+ ")
    assert handshake(path)["queues"] >= 1 and handshake(str(workdir / "alias.sock"))["queues"] >= 1
    assert p.stop() == 0
    assert os.path.exists(path)                         # not ours: left for whoever made it
    assert not (workdir / "alias.sock").exists()


def test_fd_connected_socketpair_serves_one_session_then_exits(workdir, start_qsd, start_proxy):
    """libvirt's vhost-user-gpu way: one end of a socketpair as --fd; the session ends with it."""
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    ours, theirs = socket.socketpair()
    p = start_proxy(["--mode", "direct", "--fd", str(theirs.fileno()), "--backend", str(workdir / "qsd.sock")],
                    [], pass_fds=[theirs.fileno()])
    theirs.close()
    fe = Frontend(ours, timeout=10)
    assert fe.get_features()
    assert fe.get_queue_num() >= 1
    fe.close()
    p.wait_log(r"device\.done dev=dev0")
    assert p.proc.wait(15) == 0


def test_systemd_socket_activation_and_readiness(workdir, start_qsd):
    """Under systemd: the socket passed as fd 3 (LISTEN_FDS, LISTEN_PID) is used for the device
    whose --listen names its path; READY=1 goes to $NOTIFY_SOCKET once everything listens."""
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    path = str(workdir / "act.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(workdir / "notify"))
    # LISTEN_PID must be the proxy's own pid: a shell sets it, then becomes the proxy (bash:
    # dash cannot redirect an fd above 9).
    script = f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&{lsock.fileno()}'
    log = open(workdir / "proxy.log", "wb")
    proc = subprocess.Popen(["bash", "-c", script, "bash", *proxy_cmd("--mode", "direct", "--listen", path,
                                                                   "--backend", str(workdir / "qsd.sock"))],
                            env=env, pass_fds=[lsock.fileno()], stdout=log, stderr=subprocess.STDOUT)
    lsock.close()
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready.splitlines() and f"MAINPID={proc.pid}" in ready
        assert handshake(path)["queues"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "STOPPING=1" in notify.recv(4096).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        notify.close()
    text = (workdir / "proxy.log").read_text()
    assert f"device.listening dev=dev0 listen={path} " in text
    assert os.path.exists(path)       # systemd's socket: the proxy never removes it
    assert not os.path.exists(path + ".lock")


def test_absent_backend_socket_is_warned_at_start_and_waited_for(workdir, start_qsd, start_proxy):
    qsd_sock = str(workdir / "qsd.sock")
    p = start_proxy(["--mode", "direct", "--listen", str(workdir / "fs.sock"), "--backend", qsd_sock,
                     "--backend-timeout", "20"], [str(workdir / "fs.sock")])
    [line] = p.wait_log(r"backend\.absent")
    assert f'warning backend.absent dev=dev0 backend={qsd_sock} reason="no such socket yet"' in line
    start_qsd(qsd_sock, driver="null")
    assert handshake(str(workdir / "fs.sock"))["queues"] >= 1
    assert len(p.wait_log(r"backend\.absent")) == 1


def test_backend_listen_socket_gets_its_own_mode(workdir, start_proxy):
    be = str(workdir / "be.sock")
    start_proxy(["--mode", "direct", "--listen", str(workdir / "fs.sock"), "--backend-listen", be,
                 "--backend-socket-mode", "0604"], [str(workdir / "fs.sock"), be])
    assert stat.S_IMODE(os.stat(be).st_mode) == 0o604
    assert os.path.exists(be + ".lock")


def test_metrics_on_a_unix_socket_are_locked_too(workdir, start_proxy):
    m = str(workdir / "metrics.sock")
    p = start_proxy(["--mode", "direct", "--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "b.sock"),
                     "--metrics-listen", m], [str(workdir / "fs.sock"), m])
    assert os.path.exists(m + ".lock")
    assert p.stop() == 0
    assert not os.path.exists(m) and not os.path.exists(m + ".lock")
