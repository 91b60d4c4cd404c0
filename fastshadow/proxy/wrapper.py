"""`fastshadow run`: fastshadow in front of a backend it starts itself, as one program.

    fastshadow run --device fs --backend-user fs-backend --backend-userns -- \\
        /usr/lib/qemu/virtiofsd --fd=3 -o source=/srv/share

A supervisor (libvirt's `<filesystem><binary path=.../>`, a systemd unit) starts one
program; that program is fastshadow in front of the real backend:

- the backend listens on a private socket: fastshadow binds it in a directory of its own
  (mode 0700: nobody else can reach it) and passes it to the backend as an inherited fd;
  the backend command says where that fd goes, either with `{fd}` (qemu-storage-daemon:
  `addr.type=fd,addr.str={fd}`) or with virtiofsd's own `--fd=N` / `--socket-path=PATH`,
  which fastshadow *takes over*: that socket becomes QEMU's side of fastshadow, and the
  backend gets `--fd=M` on the private one instead. So the backend command is written as
  if fastshadow were not there, and `fastshadow run ... -- virtiofsd "$@"` is usable
  wherever virtiofsd is;
- the backend runs as `--backend-user` (its uid, primary group and supplementary groups;
  never root, never fastshadow's uid), set by the child before exec. The child also calls
  listen() on the private socket after that identity change, so the SO_PEERCRED fastshadow
  reads on each connection names the backend's pid and uid: the session's run-time
  identity check (fastshadow/isolation.py) judges the real backend. With
  `--backend-userns` the backend is root of a new user namespace mapped to that user only
  (made as util-linux `unshare --map-root-user` makes it, before listen()): a program that
  wants to be root (virtiofsd: its namespace or chroot sandbox, switching to the guest's
  uid per request) gets root inside, and no capability over anything outside it, QEMU
  included; the session's identity check is told so (a non-root fastshadow cannot read
  another uid's /proc/PID/ns to find out);
- with `--proxy-user`, fastshadow then leaves root itself, keeping CAP_KILL alone (to
  signal the backend, another uid), no_new_privs and an empty bounding set besides;
- SIGTERM and SIGINT are forwarded to the backend; fastshadow stops when the backend exits
  (one `backend.exited` line) and exits with its status (128+N for a signal N); after a
  forwarded stop signal it exits 0. The backend dies with fastshadow (PR_SET_PDEATHSIG).
  It is not restarted: a virtio-fs session does not survive its backend (FUSE state),
  virtiofsd exits when its front-end leaves, and whether to start again is the
  supervisor's decision (libvirt: never; systemd: `Restart=`), which it makes from that
  exit status.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field

from ..logs import kv

log = logging.getLogger("fastshadow.run")

#: Where the backend command takes the private socket's fd number.
FD_PLACEHOLDER = "{fd}"

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_CLONE_NEWUSER = 0x10000000


class RunError(ValueError):
    """`fastshadow run` cannot start as asked; the message says what to change."""


@dataclass
class BackendPlan:
    """The backend command after fastshadow took its socket option over."""

    argv: list[str]
    #: QEMU's side, taken from the backend's own options (virtiofsd's --fd / --socket-path /
    #: --socket-group), or None when fastshadow's own options give it.
    listen: str | None = None
    listen_fd: int | None = None
    socket_group: str | None = None
    #: the backend command asked for --print-capabilities (QEMU's backend conventions)
    print_capabilities: bool = False
    _fd_at: list[int] = field(default_factory=list)

    def with_fd(self, fd: int) -> list[str]:
        """The command with the private socket's fd number filled in."""
        return [a.replace(FD_PLACEHOLDER, str(fd)) if i in self._fd_at else a for i, a in enumerate(self.argv)]


#: virtiofsd's socket options (QEMU 7.2's C virtiofsd and the Rust one spell them alike).
_TAKEN = ("--fd", "--socket-path", "--socket-group")


def plan_backend(argv: list[str], own_frontend: bool) -> BackendPlan:
    """Where the private socket goes in `argv`: `{fd}`, or virtiofsd's socket options taken over."""
    if not argv:
        raise RunError("no backend command: give it after --, e.g. -- /usr/lib/qemu/virtiofsd --fd=3 -o source=DIR")
    plan = BackendPlan(argv=[argv[0]])
    taken: dict[str, str] = {}
    args = argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if name in _TAKEN and not any(FD_PLACEHOLDER in x for x in argv):
            if not eq:
                if i + 1 >= len(args):
                    raise RunError(f"backend option {a} has no value")
                i += 1
                value = args[i]
            if name in taken:
                raise RunError(f"backend option {name} given twice")
            taken[name] = value
        elif a == "--print-capabilities":
            plan.print_capabilities = True
        else:
            if FD_PLACEHOLDER in a:
                plan._fd_at.append(len(plan.argv))
            plan.argv.append(a)
        i += 1
    if plan.print_capabilities:
        return plan
    if "--fd" in taken and "--socket-path" in taken:
        raise RunError("the backend command gives both --fd and --socket-path: give one")
    if taken.get("--fd") is not None or taken.get("--socket-path") is not None:
        if own_frontend:
            raise RunError(f"QEMU's socket is given twice: by fastshadow's --listen/--fd and by the backend's "
                           f"{'--fd' if '--fd' in taken else '--socket-path'}; give one")
        if "--fd" in taken:
            if not taken["--fd"].isdigit():
                raise RunError(f"backend option --fd={taken['--fd']}: not a file descriptor number")
            plan.listen_fd = int(taken["--fd"])
        else:
            plan.listen = taken["--socket-path"]
        plan.socket_group = taken.get("--socket-group")
        plan.argv.insert(1, "--fd=" + FD_PLACEHOLDER)
        plan._fd_at.append(1)
        return plan
    if taken.get("--socket-group") is not None:
        raise RunError("the backend command gives --socket-group without --fd or --socket-path")
    if not plan._fd_at:
        raise RunError(f"the backend command must take the socket fastshadow gives it: write {FD_PLACEHOLDER} "
                       f"where its fd number goes (qemu-storage-daemon: addr.type=fd,addr.str={FD_PLACEHOLDER}), "
                       f"or give virtiofsd's --fd=N or --socket-path=PATH, which fastshadow takes over")
    if not own_frontend:
        raise RunError("no socket for QEMU: give --listen PATH (or --fd N), or virtiofsd's --fd/--socket-path in the "
                       "backend command")
    return plan


@dataclass(frozen=True)
class BackendUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str = "/"


def lookup_user(spec: str, option: str) -> BackendUser:
    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        raise RunError(f"{option} {spec}: no such user") from None
    return BackendUser(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)), pw.pw_dir)


def proxy_user(spec: str | None) -> BackendUser | None:
    """--proxy-user: the identity fastshadow takes once the backend runs (None: keep ours)."""
    if spec is None:
        return None
    user = lookup_user(spec, "--proxy-user")
    if os.geteuid() != 0:
        raise RunError(f"--proxy-user {spec}: fastshadow runs as uid {os.geteuid()} and cannot switch users "
                       f"(start it as root)")
    if user.uid == 0:
        raise RunError(f"--proxy-user {spec}: that is root; give fastshadow a user of its own")
    return user


def backend_user(spec: str | None, allow_shared_uid: bool, proxy: BackendUser | None = None) -> BackendUser | None:
    """The identity the backend runs as: a user of its own (fastshadow/isolation.py: never root,
    never fastshadow's uid -- the --proxy-user's if given; QEMU's uid is refused by each
    session's check). None: as we run, only with --allow-shared-uid (test beds)."""
    me = proxy.uid if proxy is not None else os.geteuid()
    if spec is None:
        if allow_shared_uid:
            return None
        raise RunError("--backend-user USER is required: the backend must run as a user of its own (not root, "
                       "not QEMU's or fastshadow's user); --allow-shared-uid runs it as fastshadow runs")
    pw = lookup_user(spec, "--backend-user")
    if not allow_shared_uid:
        if pw.uid == 0:
            raise RunError(f"--backend-user {spec}: root can open QEMU's /proc/PID/fd and map guest RAM without "
                           f"fastshadow; give a user of its own")
        if pw.uid == me:
            raise RunError(f"--backend-user {spec}: that is fastshadow's own uid (fastshadow maps guest RAM); give "
                           f"a user of its own")
    if os.geteuid() != 0 and pw.uid != os.geteuid():
        raise RunError(f"--backend-user {spec}: fastshadow runs as uid {os.geteuid()} and cannot switch to another "
                       f"user (start it as root, and --proxy-user to leave root once the backend runs)")
    return pw


class PrivateSocket:
    """A unix socket bound in a 0700 directory of fastshadow's, not yet listening: the backend
    child calls listen() after it took its own identity (so SO_PEERCRED names it)."""

    def __init__(self) -> None:
        base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None  # systemd RuntimeDirectory=
        self.dir = tempfile.mkdtemp(prefix="fastshadow-run-", dir=base)
        self.path = os.path.join(self.dir, "backend.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.set_inheritable(self.sock.fileno(), True)

    def give_to(self, user: BackendUser) -> None:
        """fastshadow will connect as `user`: the directory and the socket become its."""
        for path in (self.dir, self.path):
            os.chown(path, user.uid, user.gid)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
CAP_KILL = 5
_CAP_VERSION_3 = 0x20080522


def become(user: BackendUser) -> None:
    """fastshadow leaves root for `user` (and its groups), keeping CAP_KILL alone: enough to
    forward SIGTERM/SIGINT to a backend of another uid, nothing to reach another process's
    memory or files. The bounding set is emptied but for CAP_KILL and no_new_privs set, so
    nothing it executes later regains more."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise RunError(f"--proxy-user {user.name}: {what}: {os.strerror(err)}")
    for cap in range(64):
        if cap != CAP_KILL and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break  # past the kernel's last capability
            check(-1, f"PR_CAPBSET_DROP {cap}")
    check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    data = (Data * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_KILL
    check(libc.capset(ctypes.byref(Header(_CAP_VERSION_3, 0)), data), "capset(CAP_KILL)")
    check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "PR_SET_KEEPCAPS")
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


#: fastshadow's own, from its supervisor: never the backend's (it would take systemd's
#: notification socket or the listen fds' description for its own).
_NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC")


def backend_environment(user: BackendUser | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return env


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


class BackendChild:
    """The backend process: started as its user on the private socket, watched, stopped."""

    def __init__(self, argv: list[str], user: BackendUser | None, userns: bool, private: PrivateSocket):
        self.user = user
        self.private = private
        self.userns = userns
        if userns and user is None:
            raise RunError("--backend-userns needs --backend-user (the one uid the namespace maps)")
        self.argv = argv
        # Supplementary groups: the user's, except in a user namespace of its own, where they
        # would show as unmapped (nogroup) and cannot be dropped there (setgroups is denied
        # in a namespace mapped by an unprivileged user; virtiofsd exits on that).
        self.groups = [] if userns or user is None else list(user.groups)
        self.proc: subprocess.Popen | None = None
        self.stop_signal: int | None = None

    def _in_child(self) -> None:
        # Runs after the uid/gid change, before exec. --backend-userns: a new user namespace
        # mapping root to the backend user alone (as `unshare --map-root-user` does), made
        # here so that it exists before listen(). A change of credentials clears the
        # parent-death signal, so it is set after both; then listen(), as the backend.
        libc = ctypes.CDLL(None, use_errno=True)
        if self.userns:
            # The uid change made this process non-dumpable, which makes /proc/self/*_map
            # root's; exec would reset it anyway (as it does for `unshare`).
            libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
            if libc.unshare(_CLONE_NEWUSER) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {self.user.uid} 1"),
                               ("gid_map", f"0 {self.user.gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        self.private.sock.listen(16)

    def start(self) -> int:
        u = self.user
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, pass_fds=[self.private.sock.fileno()],
                env=backend_environment(u),
                user=u.uid if u else None, group=u.gid if u else None, extra_groups=self.groups if u else None,
                preexec_fn=self._in_child)
        except OSError as e:
            raise RunError(f"cannot start the backend {self.argv[0]}: {e.strerror or e}") from None
        except subprocess.SubprocessError as e:
            raise RunError(f"cannot start the backend {self.argv[0]}: {e}"
                           + (" (--backend-userns: are unprivileged user namespaces allowed?)" if self.userns else "")
                           ) from None
        # listen() happened in the child before exec, which Popen waited for.
        kv(log, logging.INFO, "backend.started", pid=self.proc.pid, user=u.name if u else str(os.geteuid()),
           uid=u.uid if u else os.geteuid(), user_namespace=self.userns, socket=self.private.path,
           command=" ".join(self.argv))
        return self.proc.pid

    def forward(self, signum: int) -> None:
        self.stop_signal = signum
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Make sure the backend is gone: SIGTERM, then SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.stop_signal is None:
            self.forward(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def exit_status(self) -> int:
        """One `backend.exited` line; our exit status: the backend's (128+N for signal N), or 0
        when it ended on a stop signal fastshadow forwarded."""
        rc = self.proc.wait()
        fields = dict(pid=self.proc.pid, status=rc if rc >= 0 else 128 - rc)
        if rc < 0:
            fields["signal"] = _signame(-rc)
        if self.stop_signal is not None:
            kv(log, logging.INFO, "backend.exited", **fields, reason=f"stopped ({_signame(self.stop_signal)})")
            return 0
        kv(log, logging.INFO if rc == 0 else logging.WARNING, "backend.exited", **fields,
           action="fastshadow exits with its status (no restart: the supervisor decides)")
        return fields["status"]

