"""`fastshadow run`: fastshadow in front of a backend it starts itself (README "Operating
fastshadow", wrapper mode). Real backends: qemu-storage-daemon on `{fd}`, virtiofsd with its
own --socket-path taken over; the front-end is fastshadow's own (tests/proxy/blkfront.py) or
a bare vhost-user front-end, running as root like the proxy, the backend as `nobody`."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastshadow.guest.daemon import wait_listening
from fastshadow.guest.virtiofsd import find_virtiofsd
from fastshadow.isolation import CAP_SYS_PTRACE, effective_capabilities, process_tree
from fastshadow.protocol.frontend import Frontend

from ..conftest import need_binary
from ..proxy.blkfront import BlkFront

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs the backend as another user: needs root")

NOBODY = pwd.getpwnam("nobody")


class Run:
    """`fastshadow run ...` as a process, its output (fastshadow's and the backend's) in a file."""

    def __init__(self, workdir: Path, args: list[str], name: str = "run", env: dict | None = None):
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fastshadow.cli", "run", *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m.group(0)
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def backend_pid(self) -> int:
        return int(self.wait_log(r"backend\.started pid=(\d+)").split("pid=")[1].split()[0])

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"fastshadow run did not exit within {timeout} s:\n{self.log()[-3000:]}")


@pytest.fixture
def user_dir():
    """A directory `nobody` owns and reaches (pytest's are root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="fs-run-"))
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def runs(workdir):
    started: list[Run] = []

    def start(args: list[str], name: str = "run", env: dict | None = None) -> Run:
        r = Run(workdir, args, name, env)
        started.append(r)
        return r
    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def proc_status(pid: int, key: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def qsd_command(disk: Path) -> list[str]:
    return [need_binary("qemu-storage-daemon"),
            "--blockdev", f"driver=file,node-name=d0,filename={disk},cache.direct=on,aio=threads",
            "--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=fd,addr.str={fd},writable=on"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_serves_qsd_started_as_backend_user(workdir, user_dir, runs, stop):
    """The backend runs as --backend-user with that user's groups, on a socket in a 0700
    directory of fastshadow's; the session's identity check names it (pid and uid); data
    written through the proxy is on the disk; SIGTERM or SIGINT reaches the backend, exit 0,
    nothing left behind."""
    disk = user_dir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    os.chown(disk, NOBODY.pw_uid, NOBODY.pw_gid)
    sock = workdir / "fs.sock"
    run = runs(["--listen", str(sock), "--backend-user", "nobody", "--", *qsd_command(disk)],
               env={**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock")})  # fastshadow's, not the backend's
    wait_listening(sock, run.proc, 20, what="fastshadow run")
    pid = run.backend_pid()
    assert proc_status(pid, "Uid") == [str(NOBODY.pw_uid)] * 4
    assert sorted(proc_status(pid, "Groups")) == sorted(str(g) for g in os.getgrouplist("nobody", NOBODY.pw_gid))
    assert proc_status(pid, "CapEff") == ["0000000000000000"]
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert env["USER"] == "nobody" and env["HOME"] == NOBODY.pw_dir and "NOTIFY_SOCKET" not in env
    private = Path(run.wait_log(r"socket=\S+").split("=", 1)[1])
    assert private.parent.stat().st_mode & 0o777 == 0o700 and private.parent.stat().st_uid == 0

    data = os.urandom(64 << 10)
    with BlkFront(str(sock)) as blk:
        blk.bring_up()
        blk.write(8, data)  # sector 8: byte 4096
        assert blk.read(8, len(data)) == data
    with open(disk, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data
    ident = run.wait_log(r"isolation\.identities .*")
    assert f"backend_pid={pid} backend_uid={NOBODY.pw_uid} fastshadow_uid=0" in ident
    assert "isolation.refused" not in run.log() and "isolation.shared_uid" not in run.log()

    run.proc.send_signal(stop)
    assert run.wait() == 0, run.log()[-3000:]
    assert not Path(f"/proc/{pid}").exists()
    assert f"proxy.stopping signal={stop.name} action=\"forwarded to the backend\"" in run.log()
    [ended] = [ln for ln in run.log().splitlines() if "backend.exited" in ln]
    assert f"backend.exited pid={pid} status=0 reason=\"stopped ({stop.name})\"" in ended  # qsd exits 0 on both
    assert not sock.exists() and not private.parent.exists()


@pytest.mark.parametrize("script, status, tail", [("exit 3", 3, ""), ("kill -KILL $$", 137, " signal=SIGKILL")])
def test_run_exits_with_the_backends_status(workdir, user_dir, runs, script, status, tail):
    """A backend that ends by itself ends fastshadow, with its status, in one line; no restart."""
    run = runs(["--listen", str(workdir / "fs.sock"), "--backend-user", "nobody", "--",
                "sh", "-c", f"while [ ! -e {user_dir}/go ]; do sleep 0.05; done; {script}", "{fd}"])
    wait_listening(workdir / "fs.sock", run.proc, 20, what="fastshadow run")
    pid = run.backend_pid()
    (user_dir / "go").touch()
    assert run.wait() == status, run.log()[-3000:]
    lines = [ln for ln in run.log().splitlines() if "backend.exited" in ln]
    assert lines == [lines[0]] and f"backend.exited pid={pid} status={status}{tail} " in lines[0], lines
    assert run.log().count("backend.started") == 1


def test_run_takes_over_virtiofsds_socket_in_a_user_namespace(workdir, user_dir, runs):
    """virtiofsd's own --socket-path becomes QEMU's side of fastshadow; virtiofsd gets --fd on
    the private socket and runs as root of a user namespace mapped to nobody: its capabilities
    (all of them, in that namespace) reach nothing outside, so the session is served."""
    virtiofsd = find_virtiofsd()
    if virtiofsd is None:
        pytest.skip("virtiofsd is not installed (setup installs qemu-system-common)")
    share = user_dir
    sock = workdir / "vfs.sock"
    run = runs(["--device", "fs", "--backend-user", "nobody", "--backend-userns", "--",
                virtiofsd, f"--socket-path={sock}", "-o", f"source={share}"])
    wait_listening(sock, run.proc, 20, what="fastshadow run")
    pid = run.backend_pid()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1] == b"--fd=3" and not any(a.startswith(b"--socket-path") for a in cmdline), cmdline
    assert proc_status(pid, "Uid") == [str(NOBODY.pw_uid)] * 4
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert effective_capabilities(pid) >> CAP_SYS_PTRACE & 1  # root of its own namespace

    fe = Frontend.connect(str(sock), timeout=10)
    try:
        assert fe.get_features() >> 32 & 1  # VIRTIO_F_VERSION_1, from virtiofsd through the proxy
        ident = run.wait_log(r"isolation\.identities .*")
        assert f"backend_pid={pid} backend_uid={NOBODY.pw_uid}" in ident
        assert "isolation.refused" not in run.log()
        assert all(proc_status(p, "Uid")[0] == str(NOBODY.pw_uid) for p in process_tree(pid))
    finally:
        fe.close()
    # virtiofsd exits when its front-end leaves; so does fastshadow, with its status.
    assert run.wait() == 0, run.log()[-3000:]
    assert f"backend.exited pid={pid} status=0" in run.log()


@pytest.mark.parametrize("args, message", [
    (["--listen", "S", "--"], "no backend command"),
    (["--listen", "S", "--backend-user", "root", "--", "qsd", "{fd}"], "--backend-user root: root can open"),
    (["--listen", "S", "--backend-user", "no-such-user-here", "--", "qsd", "{fd}"], "no such user"),
    (["--listen", "S", "--", "qsd", "{fd}"], "--backend-user USER is required"),
    (["--listen", "S", "--backend-user", "nobody", "--", "qsd", "--x"], "must take the socket fastshadow gives it"),
    (["--listen", "S", "--backend", "B", "--backend-user", "nobody", "--", "qsd", "{fd}"],
     "starts the backend itself"),
    (["--listen", "S", "--backend-user", "nobody", "--", "virtiofsd", "--fd=4"], "QEMU's socket is given twice"),
    (["--backend-user", "nobody", "--", "qsd", "{fd}"], "no socket for QEMU"),
    (["--listen", "S", "--proxy-user", "nobody", "--backend-user", "nobody", "--", "qsd", "{fd}"],
     "--backend-user nobody: that is fastshadow's own uid"),
    (["--listen", "S", "--proxy-user", "root", "--backend-user", "nobody", "--", "qsd", "{fd}"],
     "--proxy-user root: that is root"),
    (["--listen", "S", "--backend-user", "nobody", "--", "/no/such/backend", "{fd}"],
     "cannot start the backend /no/such/backend"),
])
def test_run_bad_input_is_one_line(workdir, args, message):
    args = [str(workdir / a) if a in ("S", "B") else a for a in args]
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "run", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("fastshadow run: ")
    assert not (workdir / "S").exists()


def test_run_print_capabilities_as_the_backend_would():
    """libvirt (vhost-user descriptors) asks the binary for its capabilities: the wrapped
    command line answers with fastshadow's, for --device."""
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "run", "--device", "fs", "--",
                        "virtiofsd", "--print-capabilities"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"type": "fs"' in r.stdout


def test_run_leaves_root_for_proxy_user(workdir, user_dir, runs):
    """--proxy-user: once the backend runs, fastshadow becomes that user, with CAP_KILL alone
    (and nothing in its bounding set besides, no_new_privs), serves the session as that uid,
    and still stops the backend (another uid) on SIGTERM."""
    pw = pwd.getpwnam("fastshadow") if _has_user("fastshadow") else _add_user("fastshadow")
    run_dir = Path(tempfile.mkdtemp(prefix="fs-run-proxy-"))  # fastshadow's socket directory
    try:
        os.chown(run_dir, pw.pw_uid, pw.pw_gid)
        sock = run_dir / "fs.sock"
        run = runs(["--listen", str(sock), "--proxy-user", "fastshadow", "--backend-user", "nobody", "--",
                    need_binary("qemu-storage-daemon"), "--blockdev",
                    "driver=null-co,node-name=d0,size=67108864,read-zeroes=on", "--export",
                    "type=vhost-user-blk,id=e0,node-name=d0,addr.type=fd,addr.str={fd},writable=on"])
        wait_listening(sock, run.proc, 20, what="fastshadow run")
        pid = run.backend_pid()
        run.wait_log(r"proxy\.user user=fastshadow")
        assert proc_status(run.proc.pid, "Uid") == [str(pw.pw_uid)] * 4
        assert proc_status(run.proc.pid, "CapEff") == proc_status(run.proc.pid, "CapBnd") == ["0000000000000020"]
        assert proc_status(run.proc.pid, "NoNewPrivs") == ["1"]
        assert os.stat(sock).st_uid == pw.pw_uid
        with BlkFront(str(sock)) as blk:
            blk.bring_up()
            blk.write(0, os.urandom(4096))
            assert blk.read(0, 4096) == bytes(4096)  # null-co reads zeroes
        ident = run.wait_log(r"isolation\.identities .*")
        assert f"backend_pid={pid} backend_uid={NOBODY.pw_uid} fastshadow_uid={pw.pw_uid}" in ident
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.log()[-3000:]
        assert not Path(f"/proc/{pid}").exists()
        assert f"backend.exited pid={pid} status=0 reason=\"stopped (SIGTERM)\"" in run.log()
        assert not sock.exists()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_run_backend_userns_under_proxy_user(workdir, runs):
    """--backend-userns with --proxy-user: fastshadow is no longer root and cannot read the
    backend's /proc/PID/ns, and the backend (qemu-storage-daemon, root of its namespace)
    keeps every capability there: the session is served because fastshadow made that
    namespace itself, below its own, before the backend listened."""
    pw = pwd.getpwnam("fastshadow") if _has_user("fastshadow") else _add_user("fastshadow")
    run_dir = Path(tempfile.mkdtemp(prefix="fs-run-userns-"))
    try:
        os.chown(run_dir, pw.pw_uid, pw.pw_gid)
        sock = run_dir / "fs.sock"
        run = runs(["--listen", str(sock), "--proxy-user", "fastshadow", "--backend-user", "nobody",
                    "--backend-userns", "--", need_binary("qemu-storage-daemon"), "--blockdev",
                    "driver=null-co,node-name=d0,size=67108864,read-zeroes=on", "--export",
                    "type=vhost-user-blk,id=e0,node-name=d0,addr.type=fd,addr.str={fd},writable=on"])
        wait_listening(sock, run.proc, 20, what="fastshadow run")
        pid = run.backend_pid()
        assert effective_capabilities(pid) >> CAP_SYS_PTRACE & 1  # root of its own namespace
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        with BlkFront(str(sock)) as blk:
            blk.bring_up()
            blk.write(0, os.urandom(4096))
            assert blk.read(0, 4096) == bytes(4096)
        ident = run.wait_log(r"isolation\.identities .*")
        assert f"backend_pid={pid} backend_uid={NOBODY.pw_uid} fastshadow_uid={pw.pw_uid}" in ident
        assert "isolation.refused" not in run.log()
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.log()[-3000:]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _add_user(name: str) -> pwd.struct_passwd:
    """The README's deployment creates it; so does the test, where missing."""
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True)
    return pwd.getpwnam(name)
