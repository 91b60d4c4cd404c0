"""Deployed as operators deploy it: a real libvirtd (started here) boots the test guest
as a transient TCG domain whose `<disk type='vhostuser'>` goes through
`fastshadow proxy --mode isolated` to qemu-storage-daemon, and again with an
`<interface type='vhostuser'>` through `--device net` to dpdk-testpmd (icmpecho), with
three identities:

- QEMU runs as `libvirt-qemu` (Debian's libvirt default, nothing configured here);
- the backend runs as `fs-backend`, a user of its own (created if missing);
- fastshadow runs as `fastshadow` (created if missing), with `libvirt-qemu` as a
  supplementary group, and opens its socket to QEMU with `--socket-group libvirt-qemu
  --socket-mode 0660`: without those, libvirt's QEMU cannot connect. It reaches the
  backend's socket through a group: the backend's directory is setgid `fastshadow`, and
  the backend binds under umask 007.

The guest checker writes and verifies data on the disk (the NIC: ICMP echoes of 0 to 1472
bytes, every reply byte checked); while it runs, the backend's
/proc/PID/maps and fds must hold fastshadow's shadow memory and no guest RAM
(fastshadow.isolation.check_isolation), and the proxy must have served the session
without --allow-shared-uid (its run-time identity check passed).

A third domain has a `<filesystem>` (virtio-fs) whose `<binary>` libvirt starts itself:
contrib/fastshadow-virtiofsd, `fastshadow run` (root, as libvirt runs it) in front of
virtiofsd (`fs-backend`, root of a user namespace of its own).

Every piece of XML is read from README.md ("Deployment with libvirt"), so the README shows
what is tested.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from fastshadow.guest import parse_console
from fastshadow.guest.daemon import wait_listening
from fastshadow.guest.qsd import StorageDaemon
from fastshadow.guest.testpmd import Testpmd
from fastshadow.guest.virtiofsd import find_virtiofsd
from fastshadow.isolation import check_isolation, process_tree

from ..conftest import need_binary
from .virtiofs_guest import GUEST_CMD, guest_script

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="starts libvirtd and runs peers as other users: needs root")]

ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
QEMU_USER = "libvirt-qemu"
BACKEND_USER = "fs-backend"
PROXY_USER = "fastshadow"
# A name of this run's own (libvirt's cgroups are named after the domain, across daemons).
DOMAIN = f"fastshadow-libvirt-test-{os.getpid()}"

BLK_CMDLINE = 'console=ttyS0 panic=-1 fastshadow.check="--total 8M --min 512 --max 1M" fastshadow.queues=1'
NET_COUNT = 500
NET_CMDLINE = ('console=ttyS0 panic=-1 fastshadow.cmd="ip link set eth0 up && ip addr add 10.7.0.1/24 dev eth0 && '
               f'/netcheck --dst 10.7.0.2 --count {NET_COUNT} --min-ms 3000 --window 16 --min 0 --max 1472 --seed 7"')

# The XML comes from README.md ("Deployment with libvirt"): the blocks marked
# `<!-- test_libvirt.py: NAME -->`, with the README's example paths replaced by the test's.
# QEMU 7.2 under TCG crashes on vhost-user-net with MSI-X, hence the README's
# `nic-override` block (vectors=0 on libvirt's device `net0`). `<binary>` of the
# `filesystem` block names contrib/fastshadow-virtiofsd, which libvirt starts as root as it
# would start virtiofsd (--fd=N -o source=DIR,...).
README = ROOT / "README.md"


def readme_xml(name: str, **replace: str) -> str:
    """README block `name`, each key (an example value the README shows) replaced; every
    key must occur, so the README and this test cannot drift apart silently."""
    m = re.search(rf"<!-- test_libvirt\.py: {re.escape(name)} -->\n```xml\n(.*?)```", README.read_text(), re.S)
    assert m, f"README.md has no XML block marked <!-- test_libvirt.py: {name} -->"
    xml = m.group(1)
    for old, new in replace.items():
        assert old in xml, f"README block {name!r} no longer shows {old!r}"
        xml = xml.replace(old, new)
    return xml


README_SOCKETS = {"blk": "/run/fastshadow/disk0.sock", "net": "/run/fastshadow/net0.sock"}
README_CMDLINE = BLK_CMDLINE  # the README's domain shows the disk test's guest command line


FS_CMDLINE = f'console=ttyS0 panic=-1 fastshadow.cmd="{GUEST_CMD}"'
# The guest's reads and writes between the host's "go" and "go2" (virtiofs_guest.py).
FS_GUEST_WORK = """\
sha256sum /mnt/in.bin > /mnt/guest-read.sha
dd if=/dev/urandom of=/mnt/guest.bin bs=64k count=32 2>/dev/null
sha256sum /mnt/guest.bin > /mnt/guest-write.sha
"""

def virsh(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


class Libvirtd:
    """A libvirtd (and the virtlogd it writes QEMU's logs through) of this test's own, for
    qemu:///system, in a mount namespace where /run/libvirt, /var/lib/libvirt and
    /var/log/libvirt are directories under `base`: other engineers' test runs on the same
    machine, and a system libvirtd, each have theirs (sockets, pid files, domain state,
    logs). /etc/libvirt (configuration) and /var/cache/libvirt (QEMU capabilities) are
    shared, read as usual. No systemd needed."""

    MOUNTS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt")

    def __init__(self, base: Path):
        self.base = base
        self.dirs = {m: base / m.rsplit("/", 1)[0].strip("/").replace("/", "-") for m in self.MOUNTS}
        self.run_dir = self.dirs["/run/libvirt"]        # as libvirtd sees it: /run/libvirt
        self.lib_dir = self.dirs["/var/lib/libvirt"]
        self.log_dir = self.dirs["/var/log/libvirt"]
        self.uri = f"qemu:///system?socket={self.run_dir}/libvirt-sock"
        self.proc: subprocess.Popen | None = None

    def start(self, log) -> None:
        self.base.chmod(0o755)  # QEMU (libvirt-qemu) reaches its domain's directories below
        for d in self.dirs.values():
            d.mkdir()
            d.chmod(0o755)
        mounts = " && ".join(f"mkdir -p {m} && mount --bind {d} {m}" for m, d in self.dirs.items())
        script = (f"set -e; {mounts}; virtlogd -p {self.base}/virtlogd.pid & "
                  f"exec libvirtd -p {self.base}/libvirtd.pid")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        """libvirtd and virtlogd (its process group; the domains' QEMUs are daemonized apart)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def libvirtd(workdir):
    """A libvirtd of this test's own (Libvirtd), stopped at the end; virsh() talks to it."""
    global URI
    need_binary("libvirtd")
    need_binary("virsh")
    need_binary("virtlogd")
    need_binary("unshare")
    daemon = Libvirtd(Path(tempfile.mkdtemp(prefix="fs-libvirtd-")))
    log = open(workdir / "libvirtd.log", "wb")
    saved, URI = URI, daemon.uri
    try:
        daemon.start(log)
        deadline = time.monotonic() + 60
        while virsh("version", check=False).returncode != 0:
            if daemon.proc.poll() is not None:
                pytest.fail(f"libvirtd exited with {daemon.proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"libvirtd not answering on {URI} within 60 s: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield daemon
    finally:
        daemon.stop()
        URI = saved
        log.close()


def proc_uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


def wait_console(path: Path, text: str, timeout: float, domain_alive) -> str:
    deadline = time.monotonic() + timeout
    while True:
        console = path.read_text(errors="replace") if path.exists() else ""
        if text in console:
            return console
        if "Kernel panic" in console or not domain_alive():
            raise AssertionError(f"guest ended before {text!r}:\n" + "\n".join(console.splitlines()[-40:]))
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} on the console within {timeout} s:\n"
                                 + "\n".join(console.splitlines()[-40:]))
        time.sleep(0.2)


class Deployment:
    """The three identities and their directories (README "Deployment with libvirt"):
    `top/backend` is the backend's (setgid `fastshadow`: its socket gets fastshadow's
    group), `top/run` fastshadow's; all of `top` is searchable by libvirt-qemu (pytest's
    tmp dirs are root's, mode 0700), and holds copies of the guest's kernel and initrd."""

    def __init__(self, guest_image, workdir: Path, libvirt: Libvirtd):
        self.libvirt = libvirt
        self.qemu_pw = pwd.getpwnam(QEMU_USER)            # created by libvirt-daemon-system
        self.socket_gid = grp.getgrnam(QEMU_USER).gr_gid
        self.backend_pw = ensure_user(BACKEND_USER)
        self.proxy_pw = ensure_user(PROXY_USER)
        self.top = Path(tempfile.mkdtemp(prefix="fs-virt-"))
        self.top.chmod(0o755)
        self.backend_dir = self.top / "backend"
        self.backend_dir.mkdir()
        os.chown(self.backend_dir, self.backend_pw.pw_uid, self.proxy_pw.pw_gid)
        self.backend_dir.chmod(0o2750)
        self.run_dir = self.top / "run"
        self.run_dir.mkdir()
        os.chown(self.run_dir, self.proxy_pw.pw_uid, self.proxy_pw.pw_gid)
        self.run_dir.chmod(0o755)
        for name in ("kernel", "initrd"):
            shutil.copyfile(getattr(guest_image, name), self.top / name)
            (self.top / name).chmod(0o644)
        self.console = self.top / "console.log"
        self.proxy_log = workdir / "proxy.log"
        self.proxy: subprocess.Popen | None = None
        self.backend = None
        self.domain_started = False
        self.qemu_pid: int | None = None

    def start_backend(self, daemon):
        """Start `daemon` as the backend user, its socket bound under umask 007 (group rwx)."""
        daemon.user = BACKEND_USER
        self.backend = daemon
        umask = os.umask(0o007)
        try:
            daemon.start()
        finally:
            os.umask(umask)
        assert proc_uids(daemon.pid)[0] == self.backend_pw.pw_uid
        return daemon

    def start_proxy(self, device: str, backend_sock: Path) -> Path:
        sock = self.run_dir / f"{device}0.sock"
        with open(self.proxy_log, "wb") as out:
            self.proxy = subprocess.Popen(
                ["setpriv", f"--reuid={self.proxy_pw.pw_uid}", f"--regid={self.proxy_pw.pw_gid}",
                 f"--groups={self.socket_gid}",
                 sys.executable, "-m", "fastshadow.cli", "proxy", "--listen", str(sock),
                 "--backend", str(backend_sock), "--device", device,
                 "--mode", "isolated", "--socket-group", QEMU_USER, "--socket-mode", "0660"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(sock, self.proxy, 15, what="fastshadow proxy")
        assert proc_uids(self.proxy.pid)[0] == self.proxy_pw.pw_uid
        st = sock.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, self.socket_gid)
        return sock

    def create_domain(self, device_xml: str, cmdline: str, extra: str = "") -> int:
        """The README's domain, its `<disk>` replaced by `device_xml` and `extra` added at the end."""
        domain = readme_xml("domain", **{"/path/to/vmlinuz": str(self.top / "kernel"),
                                         "/path/to/initrd": str(self.top / "initrd"),
                                         "/path/to/console.log": str(self.console),
                                         README_CMDLINE: escape(cmdline),
                                         "<name>fastshadow-libvirt-test</name>": f"<name>{DOMAIN}</name>"})
        [disk] = re.findall(r"    <disk .*?</disk>\n", domain, re.S)
        domain = domain.replace(disk, device_xml.rstrip("\n") + "\n").replace("</domain>", extra + "</domain>")
        xml = self.top / "domain.xml"
        xml.write_text(domain)
        virsh("create", str(xml), timeout=60)
        self.domain_started = True
        self.qemu_pid = int((self.libvirt.run_dir / "qemu" / f"{DOMAIN}.pid").read_text())
        assert proc_uids(self.qemu_pid) == [self.qemu_pw.pw_uid] * 4, "QEMU does not run as libvirt-qemu"
        return self.qemu_pid

    def alive(self) -> bool:
        return virsh("domstate", DOMAIN, check=False).stdout.strip() == "running"

    def wait_console(self, text: str, timeout: float, while_running: bool = True) -> str:
        return wait_console(self.console, text, timeout, self.alive if while_running else (lambda: True))

    def check_isolated(self) -> None:
        rep = check_isolation(self.backend.pid, self.qemu_pid)
        print("\n".join(rep.lines()))
        assert rep.isolated, "\n".join(rep.lines())

    def check_proxy_log(self) -> str:
        log = self.proxy_log.read_text(errors="replace")
        [ident] = [ln for ln in log.splitlines() if "isolation.identities" in ln]
        assert (f"qemu_pid={self.qemu_pid} qemu_uid={self.qemu_pw.pw_uid} backend_pid={self.backend.pid} "
                f"backend_uid={self.backend_pw.pw_uid} fastshadow_uid={self.proxy_pw.pw_uid}") in ident, ident
        assert "session.start dev=dev0 mode=isolated" in log
        for bad in ("isolation.refused", "isolation.shared_uid", "session.refused", "dataplane.refused"):
            assert bad not in log, log[-3000:]
        return log

    def close(self) -> int | None:
        """Destroy the domain, stop fastshadow (its exit status) and the backend."""
        if self.domain_started:
            virsh("destroy", DOMAIN, check=False)
        rc = None
        if self.proxy is not None:
            if self.proxy.poll() is None:
                self.proxy.terminate()
                try:
                    self.proxy.wait(10)
                except subprocess.TimeoutExpired:
                    self.proxy.kill()
                    self.proxy.wait()
            rc = self.proxy.returncode
        if self.backend is not None:
            self.backend.kill()
            if isinstance(self.backend, Testpmd):
                # Not root, testpmd keeps its runtime directory under $XDG_RUNTIME_DIR or /tmp.
                base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "dpdk"
                shutil.rmtree(base / self.backend.file_prefix, ignore_errors=True)
                try:
                    base.rmdir()
                except OSError:
                    pass
        shutil.rmtree(self.top, ignore_errors=True)
        return rc


@pytest.fixture
def deployment(libvirtd, guest_image, workdir):
    need_binary("setpriv")
    d = Deployment(guest_image, workdir, libvirtd)
    yield d
    rc = d.close()
    assert rc in (None, 0), f"fastshadow exited with {rc}:\n" + d.proxy_log.read_text(errors="replace")[-3000:]


def test_libvirt_domain_with_isolated_vhostuser_disk(deployment):
    need_binary("qemu-storage-daemon")
    d = deployment
    disk = d.backend_dir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    os.chown(disk, d.backend_pw.pw_uid, d.backend_pw.pw_gid)
    qsd = d.start_backend(StorageDaemon(d.backend_dir / "qsd.sock", disk=disk, log_path=d.top / "qsd.log"))
    sock = d.start_proxy("blk", qsd.socket_path)
    [disk] = re.findall(r"    <disk .*?</disk>\n", readme_xml("domain"), re.S)
    assert README_SOCKETS["blk"] in disk
    d.create_domain(disk.replace(README_SOCKETS["blk"], str(sock)), BLK_CMDLINE)

    # While the checker runs, the backend reaches the shadow region and no guest RAM.
    d.wait_console("checker[q0]: device=", 120)
    d.check_isolated()

    text = d.wait_console("FASTSHADOW-GUEST DONE", 120, while_running=False)
    result = parse_console(text, expected_boots=1, expected_checks=1, exit_code=0)
    assert result.passed, result.summary()
    assert "FASTSHADOW-CHECK PASS" in text
    assert result.boots[0].checks[0].written >= 8 << 20
    d.check_proxy_log()


def test_libvirt_domain_with_isolated_vhostuser_nic(deployment):
    need_binary("dpdk-testpmd")
    d = deployment
    pmd = d.start_backend(Testpmd(d.backend_dir / "pmd.sock", log_path=d.top / "testpmd.log"))
    sock = d.start_proxy("net", pmd.socket_path)
    d.create_domain(readme_xml("nic", **{README_SOCKETS["net"]: str(sock)}), NET_CMDLINE,
                    extra=readme_xml("nic-override"))

    # While traffic flows, testpmd reaches the shadow region and no guest RAM.
    d.wait_console("FASTSHADOW-NET FLOWING", 120)
    d.check_isolated()

    text = d.wait_console("FASTSHADOW-GUEST DONE", 120, while_running=False)
    m = re.search(r"FASTSHADOW-NET PASS tag=\S+ sent=(\d+) received=(\d+) bytes=(\d+)", text)
    assert m, text[-3000:]
    sent, received, nbytes = map(int, m.groups())
    assert sent == received >= NET_COUNT
    assert re.search(r"FASTSHADOW-GUEST DONE boot=\d+ result=PASS", text), text[-3000:]
    d.check_proxy_log()


def test_libvirt_domain_with_isolated_virtiofs(deployment):
    """libvirt starts fastshadow in front of virtiofsd itself: `<binary path>` names
    contrib/fastshadow-virtiofsd, which runs `fastshadow run` as root (libvirt's choice for
    virtiofsd); fastshadow takes libvirt's --fd=N for QEMU's side and starts virtiofsd as
    fs-backend, root of a user namespace of its own, on a private socket. The guest reads a
    host file and writes one of its own, both checked byte for byte on the host; while the
    share is mounted virtiofsd's process tree maps no guest RAM; the session passed the
    identity check (three uids: libvirt-qemu, fastshadow -- started as root by libvirt, it
    becomes `fastshadow` once virtiofsd runs -- and fs-backend)."""
    virtiofsd = find_virtiofsd()
    if virtiofsd is None:
        pytest.skip("virtiofsd is not installed (setup installs qemu-system-common)")
    need_binary("unshare")
    d = deployment
    script = (ROOT / "contrib" / "fastshadow-virtiofsd").read_text()
    installed = "/usr/local/bin/fastshadow run"
    assert installed in script and "/usr/lib/qemu/virtiofsd" in script
    binary = d.top / "fastshadow-virtiofsd"
    binary.write_text(script.replace(installed, f"{sys.executable} -m fastshadow.cli run")
                      .replace("/usr/lib/qemu/virtiofsd", virtiofsd))
    binary.chmod(0o755)
    # The share is the backend user's: inside its user namespace only that uid is mapped.
    share = d.top / "share"
    share.mkdir()
    data = random.Random(11).randbytes((4 << 20) + 4097)
    (share / "in.bin").write_bytes(data)
    (share / "run.sh").write_text(guest_script(FS_GUEST_WORK))
    for p in (share, *share.iterdir()):
        os.chown(p, d.backend_pw.pw_uid, d.backend_pw.pw_gid)

    qemu_pid = d.create_domain(readme_xml("filesystem", **{"/usr/local/libexec/fastshadow-virtiofsd": str(binary),
                                                           "/srv/share": str(share)}), FS_CMDLINE)
    d.wait_console("FS-MOUNTED", 120)
    # libvirt's pid file of the program it started for the filesystem (alias fs0).
    lv = d.libvirt
    [pidfile] = [p for run in (lv.run_dir / "qemu", *(lv.lib_dir / "qemu").glob("domain-*"))
                 for p in run.glob("*fs0-fs.pid")]
    proxy_pid = int(pidfile.read_text())
    # libvirt runs <binary> as root; fastshadow left root once virtiofsd ran (--proxy-user).
    assert proc_uids(proxy_pid) == [d.proxy_pw.pw_uid] * 4
    tree = process_tree(proxy_pid)
    backend = [p for p in tree if p != proxy_pid and proc_uids(p)[0] == d.backend_pw.pw_uid]
    assert backend, f"no process of {BACKEND_USER} under fastshadow (pid {proxy_pid}): {tree}"
    vfs_pid = min(backend)  # the one fastshadow started; virtiofsd serves from a sandboxed child
    # libvirt's virtiofsd options reached the real virtiofsd; its --fd is the private socket's.
    argv = Path(f"/proc/{vfs_pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[0] == virtiofsd and argv[1].startswith("--fd=") and "--thread-pool-size=4" in argv, argv
    assert f"source={share},cache=always" in argv, argv
    assert all(proc_uids(p) == [d.backend_pw.pw_uid] * 4 for p in process_tree(vfs_pid))
    rep = check_isolation(vfs_pid, qemu_pid)
    print("\n".join(rep.lines()))
    assert rep.isolated and len(rep.pids) >= 2, "\n".join(rep.lines())

    (share / "go").touch()
    d.wait_console("FS-WRITTEN", 120)
    rep = check_isolation(vfs_pid, qemu_pid)
    assert rep.isolated, "\n".join(rep.lines())
    (share / "go2").touch()
    text = d.wait_console("FASTSHADOW-GUEST DONE", 120, while_running=False)
    assert re.search(r"FASTSHADOW-GUEST DONE boot=\d+ result=PASS", text), text[-3000:]
    assert "FS-UNMOUNTED" in text

    read_sum, name = (share / "guest-read.sha").read_text().split()
    assert name == "/mnt/in.bin" and read_sum == hashlib.sha256(data).hexdigest()
    wrote, name = (share / "guest-write.sha").read_text().split()
    assert name == "/mnt/guest.bin" and hashlib.sha256((share / "guest.bin").read_bytes()).hexdigest() == wrote
    assert (share / "guest.bin").stat().st_size == 2 << 20
    assert (share / "guest.bin").stat().st_uid == d.backend_pw.pw_uid  # the guest's root, mapped

    # The guest powered off: QEMU, then virtiofsd, then fastshadow are gone (libvirt may also
    # have sent its SIGTERM, which fastshadow forwards); one line says how the backend ended.
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() for p in (proxy_pid, vfs_pid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"fastshadow {proxy_pid} or virtiofsd {vfs_pid} outlived the domain")
        time.sleep(0.1)
    log = (lv.log_dir / "qemu" / f"{DOMAIN}-fs0-virtiofsd.log").read_text(errors="replace")
    log = log[log.rindex("backend.started"):]  # this run's lines (libvirt appends)
    [ended] = [ln for ln in log.splitlines() if "backend.exited" in ln]
    assert f"backend.exited pid={vfs_pid} status=0" in ended, ended
    [ident] = [ln for ln in log.splitlines() if "isolation.identities" in ln]
    assert (f"qemu_pid={qemu_pid} qemu_uid={d.qemu_pw.pw_uid} backend_pid={vfs_pid} "
            f"backend_uid={d.backend_pw.pw_uid} fastshadow_uid={d.proxy_pw.pw_uid}") in ident, ident
    assert "session.start dev=dev0 mode=isolated" in log
    for bad in ("isolation.refused", "isolation.shared_uid", "session.refused", "dataplane.refused"):
        assert bad not in log, log[-3000:]
