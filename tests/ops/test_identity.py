"""Isolation checked at run time (DESIGN §3.9): each isolated session reads QEMU's and the
backend's credentials (SO_PEERCRED) and refuses a backend whose identity could open QEMU's
/proc/PID/fd (root, QEMU's uid, fastshadow's uid, CAP_SYS_PTRACE/CAP_SETUID), unless
--allow-shared-uid. Here the front-end (tests/proxy/blkfront.py, playing QEMU) and the
proxy run as root; qemu-storage-daemon runs as `nobody` (setpriv) or as root."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess

import pytest

from fastshadow.isolation import (CAP_SYS_PTRACE, PeerCred, effective_capabilities, identity_risk, peer_credentials,
                                  user_namespace_below)
from fastshadow.protocol import PeerClosed

from ..proxy.blkfront import BlkFront

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs peers as other users: needs root")

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def user_dir():
    """A directory `nobody` may create its socket in (pytest's own are root's, mode 0700)."""
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="fs-be-"))
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_backend_of_its_own_user_is_served(workdir, user_dir, start_qsd, start_proxy):
    sock = user_dir / "qsd.sock"
    qsd = start_qsd(str(sock), driver="null", user="nobody")
    assert os.stat(f"/proc/{qsd.pid}").st_uid == NOBODY.pw_uid
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(sock)],  # isolated: the default
                        [str(workdir / "fs.sock")], allow_shared_uid=False)
    data = os.urandom(4096)
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        blk.write(0, data)
        assert blk.read(0, len(data)) == bytes(len(data))  # null-co reads zeroes
    [line] = proxy.wait_log(r"isolation\.identities dev=dev0")
    assert (f"qemu_pid={os.getpid()} qemu_uid=0 backend_pid={qsd.pid} backend_uid={NOBODY.pw_uid} "
            f"fastshadow_uid=0") in line
    assert "isolation.refused" not in proxy.log() and "isolation.shared_uid" not in proxy.log()
    assert "session.start dev=dev0 mode=isolated" in proxy.log()


def test_backend_as_the_front_ends_uid_is_refused(workdir, start_qsd, start_proxy):
    """The front-end runs as root, so a root backend shares its uid: refused, one line
    naming both pids and uids, the session ends before any request reaches the backend."""
    qsd = start_qsd(str(workdir / "qsd.sock"), driver="null")
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock")],
                        [str(workdir / "fs.sock")], allow_shared_uid=False)
    with BlkFront(str(workdir / "fs.sock"), timeout=10) as blk:
        with pytest.raises((PeerClosed, ConnectionError, OSError)):
            blk.bring_up()
    [line] = proxy.wait_log(r"isolation\.refused")
    assert re.search(rf"error isolation\.refused dev=dev0 qemu_pid={os.getpid()} qemu_uid=0 "
                     rf"backend_pid={qsd.pid} backend_uid=0 fastshadow_uid=0 "
                     rf"reason=\"the backend runs as root: it can open /proc/{os.getpid()}/fd and map guest RAM",
                     line), line
    assert "session.start" not in proxy.log()
    assert proxy.alive()
    proxy.wait_log(r"device\.waiting dev=dev0")  # the device serves the next front-end


def test_shared_uid_allowed_warns_once_per_session(workdir, start_qsd, start_proxy):
    """--allow-shared-uid: served, one warning per session, also across a backend restart."""
    qsd_sock = str(workdir / "qsd.sock")
    qsd = start_qsd(qsd_sock, driver="null")
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", qsd_sock],
                        [str(workdir / "fs.sock")])  # the fixture passes --allow-shared-uid
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        blk.write(0, b"x" * 512)
        qsd.kill()
        proxy.wait_log(r"backend\.lost dev=dev0")
        start_qsd(qsd_sock, driver="null")
        proxy.wait_log(r"backend\.reconnected dev=dev0")
        blk.write(1, b"y" * 512)
    lines = proxy.wait_log(r"warning isolation\.shared_uid dev=dev0 .*backend_uid=0 .*--allow-shared-uid")
    assert len(lines) == 1, lines


def test_a_restarted_backend_is_checked_too(workdir, user_dir, start_qsd, start_proxy):
    """The first backend runs as nobody; the one that replaces it runs as root: the
    reconnect is refused and the session ends (the guest's requests are not handed to it)."""
    sock = user_dir / "qsd.sock"
    qsd = start_qsd(str(sock), driver="null", user="nobody")
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(sock), "--backend-timeout", "5"],
                        [str(workdir / "fs.sock")], allow_shared_uid=False)
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        blk.write(0, b"x" * 512)
        qsd.kill()
        proxy.wait_log(r"backend\.lost dev=dev0")
        start_qsd(str(sock), driver="null")  # root this time
        proxy.wait_log(r"isolation\.refused dev=dev0 .*backend_uid=0")
        proxy.wait_log(r"session\.end dev=dev0 .*identity was refused")
    assert "backend.reconnected" not in proxy.log()


def test_identity_rule():
    me = os.geteuid()
    qemu = PeerCred(pid=1, uid=107, gid=107)
    assert identity_risk(qemu, PeerCred(2, 0, 0), proxy_uid=998) == "the backend runs as root"
    assert identity_risk(qemu, PeerCred(2, 107, 50), proxy_uid=998) == "the backend runs as QEMU's uid"
    assert "fastshadow's uid" in identity_risk(qemu, PeerCred(2, 998, 998), proxy_uid=998)
    assert identity_risk(qemu, PeerCred(-1, 4242, 4242), proxy_uid=998) is None  # no process to read
    if me == 0:  # a process holding root's capabilities under another uid is flagged by them
        assert identity_risk(qemu, PeerCred(os.getpid(), 4242, 4242), proxy_uid=998) == \
            "the backend holds CAP_SYS_PTRACE and CAP_SETUID"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_capabilities_are_seen():
    """A backend of an unprivileged uid holding CAP_SYS_PTRACE could still open /proc/PID/fd."""
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
                          "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace", "sleep", "30"])
    try:
        for _ in range(100):
            caps = effective_capabilities(p.pid)
            if caps and os.stat(f"/proc/{p.pid}").st_uid == NOBODY.pw_uid:
                break
            subprocess.run(["sleep", "0.02"])
        risk = identity_risk(PeerCred(1, 107, 107), PeerCred(p.pid, NOBODY.pw_uid, NOBODY.pw_gid), proxy_uid=0)
        assert risk == "the backend holds CAP_SYS_PTRACE", risk
    finally:
        p.kill()
        p.wait()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing")
def test_capabilities_of_a_user_namespace_below_do_not_count():
    """Root of a user namespace of its own (fastshadow run --backend-userns) shows every
    capability in /proc/PID/status, held over that namespace only: not QEMU's, not ours."""
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
                          "unshare", "--user", "--map-root-user", "sleep", "30"])
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{p.pid}/exe").endswith("/sleep"):
                break
            subprocess.run(["sleep", "0.02"])
        assert effective_capabilities(p.pid) >> CAP_SYS_PTRACE & 1
        assert user_namespace_below(p.pid, os.getpid()) and not user_namespace_below(os.getpid(), p.pid)
        assert not user_namespace_below(os.getpid(), os.getpid())
        # QEMU: this process (root, the initial user namespace); fastshadow: this process too.
        assert identity_risk(PeerCred(os.getpid(), 107, 107), PeerCred(p.pid, NOBODY.pw_uid, NOBODY.pw_gid),
                             proxy_uid=0) is None
        # A QEMU in the backend's own user namespace would be within its capabilities' reach.
        risk = identity_risk(PeerCred(p.pid, 107, 107), PeerCred(p.pid, NOBODY.pw_uid, NOBODY.pw_gid), proxy_uid=0)
        assert risk == "the backend holds CAP_SYS_PTRACE and CAP_SETUID", risk
    finally:
        p.kill()
        p.wait()


def test_peer_credentials_of_a_socketpair():
    import socket
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == PeerCred(os.getpid(), os.geteuid(), os.getegid())
