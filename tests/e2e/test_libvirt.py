"""Deployed as operators deploy it: a real libvirtd (started here) boots the test guest
as a transient TCG domain whose `<disk type='vhostuser'>` goes through
`fastshadow proxy --mode isolated` to qemu-storage-daemon, with three identities:

- QEMU runs as `libvirt-qemu` (Debian's libvirt default, nothing configured here);
- qemu-storage-daemon runs as `fs-backend`, a user of its own (created if missing);
- fastshadow runs as `fastshadow` (created if missing), with `libvirt-qemu` as a
  supplementary group, and opens its socket to QEMU with `--socket-group libvirt-qemu
  --socket-mode 0660`: without those, libvirt's QEMU cannot connect. It reaches the
  backend's socket through a group: the backend's directory is setgid `fastshadow`, and
  qemu-storage-daemon binds under umask 007.

The guest checker writes and verifies data on the disk; while it runs, the backend's
/proc/PID/maps and fds must hold fastshadow's shadow memory and no guest RAM
(fastshadow.isolation.check_isolation), and the proxy must have served the session
without --allow-shared-uid (its run-time identity check passed). The domain XML below
is the one the README shows.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastshadow.guest import parse_console
from fastshadow.guest.daemon import wait_listening
from fastshadow.guest.qsd import StorageDaemon
from fastshadow.isolation import check_isolation

from ..conftest import need_binary

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="starts libvirtd and runs peers as other users: needs root")]

URI = "qemu:///system"
QEMU_USER = "libvirt-qemu"
BACKEND_USER = "fs-backend"
PROXY_USER = "fastshadow"
DOMAIN = "fastshadow-libvirt-test"

CMDLINE = 'console=ttyS0 panic=-1 fastshadow.check="--total 8M --min 512 --max 1M" fastshadow.queues=1'

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='{socket}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
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


@pytest.fixture
def libvirtd(workdir):
    """A libvirtd for qemu:///system: the one running, else one started here (with the
    virtlogd it writes QEMU's logs through) and stopped at the end. No systemd needed."""
    need_binary("libvirtd")
    need_binary("virsh")
    need_binary("virtlogd")
    if virsh("version", check=False).returncode == 0:
        yield None
        return
    procs = []
    log = open(workdir / "libvirtd.log", "wb")
    try:
        for argv in (["virtlogd"], ["libvirtd"]):
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + 30
        while virsh("version", check=False).returncode != 0:
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"{p.args[0]} exited with {p.returncode}: {Path(log.name).read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"libvirtd not answering on {URI} within 30 s: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield procs[1]
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
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


def test_libvirt_domain_with_isolated_vhostuser_disk(libvirtd, guest_image, workdir):
    need_binary("qemu-storage-daemon")
    need_binary("setpriv")
    qemu_pw = pwd.getpwnam(QEMU_USER)            # created by libvirt-daemon-system
    socket_gid = grp.getgrnam(QEMU_USER).gr_gid
    backend_pw = ensure_user(BACKEND_USER)
    proxy_pw = ensure_user(PROXY_USER)

    # Every directory on the way to the socket, kernel and initrd must be searchable by
    # libvirt-qemu (pytest's tmp dirs are root's, mode 0700).
    top = Path(tempfile.mkdtemp(prefix="fs-virt-"))
    top.chmod(0o755)
    backend_dir = top / "backend"                # the backend's own: its socket and disk
    backend_dir.mkdir()
    os.chown(backend_dir, backend_pw.pw_uid, proxy_pw.pw_gid)
    backend_dir.chmod(0o2750)                    # its socket gets fastshadow's group
    run_dir = top / "run"                        # fastshadow's own: its socket to QEMU
    run_dir.mkdir()
    os.chown(run_dir, proxy_pw.pw_uid, proxy_pw.pw_gid)
    run_dir.chmod(0o755)
    disk = backend_dir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    os.chown(disk, backend_pw.pw_uid, backend_pw.pw_gid)
    for name in ("kernel", "initrd"):
        shutil.copyfile(getattr(guest_image, name), top / name)
        (top / name).chmod(0o644)
    console = top / "console.log"
    sock = run_dir / "disk0.sock"

    qsd = StorageDaemon(backend_dir / "qsd.sock", disk=disk, user=BACKEND_USER, log_path=top / "qsd.log")
    proxy_log = workdir / "proxy.log"
    proxy = None
    domain_started = False
    try:
        umask = os.umask(0o007)                  # qsd's socket: rwx for fastshadow's group
        try:
            qsd.start()
        finally:
            os.umask(umask)
        assert proc_uids(qsd.pid)[0] == backend_pw.pw_uid
        with open(proxy_log, "wb") as out:
            proxy = subprocess.Popen(
                ["setpriv", f"--reuid={proxy_pw.pw_uid}", f"--regid={proxy_pw.pw_gid}", f"--groups={socket_gid}",
                 sys.executable, "-m", "fastshadow.cli", "proxy", "--listen", str(sock),
                 "--backend", str(backend_dir / "qsd.sock"), "--device", "blk",
                 "--mode", "isolated", "--socket-group", QEMU_USER, "--socket-mode", "0660"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(sock, proxy, 15, what="fastshadow proxy")
        assert proc_uids(proxy.pid)[0] == proxy_pw.pw_uid
        st = sock.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, socket_gid)

        xml = top / "domain.xml"
        xml.write_text(DOMAIN_XML.format(name=DOMAIN, kernel=top / "kernel", initrd=top / "initrd",
                                         cmdline=CMDLINE, socket=sock, console=console))
        virsh("create", str(xml), timeout=60)
        domain_started = True
        qemu_pid = int(Path(f"/run/libvirt/qemu/{DOMAIN}.pid").read_text())
        assert proc_uids(qemu_pid) == [qemu_pw.pw_uid] * 4, "QEMU does not run as libvirt-qemu"

        def alive() -> bool:
            return virsh("domstate", DOMAIN, check=False).stdout.strip() == "running"

        # While the checker runs, the backend reaches the shadow region and no guest RAM.
        wait_console(console, "checker[q0]: device=", 120, alive)
        rep = check_isolation(qsd.pid, qemu_pid)
        print("\n".join(rep.lines()))
        assert rep.isolated, "\n".join(rep.lines())

        text = wait_console(console, "FASTSHADOW-GUEST DONE", 120, lambda: True)
        result = parse_console(text, expected_boots=1, expected_checks=1, exit_code=0)
        assert result.passed, result.summary()
        assert "FASTSHADOW-CHECK PASS" in text
        assert result.boots[0].checks[0].written >= 8 << 20

        log = proxy_log.read_text(errors="replace")
        [ident] = [ln for ln in log.splitlines() if "isolation.identities" in ln]
        assert f"qemu_pid={qemu_pid} qemu_uid={qemu_pw.pw_uid} backend_pid={qsd.pid} " \
               f"backend_uid={backend_pw.pw_uid} fastshadow_uid={proxy_pw.pw_uid}" in ident, ident
        assert "session.start dev=dev0 mode=isolated" in log
        for bad in ("isolation.refused", "isolation.shared_uid", "session.refused", "dataplane.refused"):
            assert bad not in log, log[-3000:]
    finally:
        if domain_started:
            virsh("destroy", DOMAIN, check=False)
        if proxy is not None and proxy.poll() is None:
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        qsd.kill()
        shutil.rmtree(top, ignore_errors=True)
    assert proxy.returncode == 0, proxy_log.read_text(errors="replace")[-3000:]
