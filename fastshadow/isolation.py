"""The isolation proof, checked from outside: what memory can a process reach?

Guest RAM is a memfd of QEMU's (`memory-backend-memfd`). A process can reach
it only by mapping it or holding an fd of it, and both show in /proc: the
inode column of /proc/PID/maps and the targets of /proc/PID/fd/*. So the
proof compares inodes: QEMU's guest-RAM memfd inodes against everything
the backend maps or holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

SHADOW_PREFIX = "memfd:fastshadow-shadow"


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


def read_maps(pid: int) -> list[Mapping]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append(Mapping(start, end, parts[1], int(parts[4]), path))
    return out


def read_fds(pid: int) -> dict[int, tuple[str, int]]:
    """fd number -> (link target, inode) for every open fd of `pid`."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
            ino = os.stat(f"{base}/{name}").st_ino
        except OSError:
            continue
        out[int(name)] = (target, ino)
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (from the ppid field of /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm (field 2) may hold spaces and parentheses: split after its last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def guest_ram_inodes(qemu_pid: int, min_size: int = 16 << 20) -> set[int]:
    """Inodes of QEMU's shared memfd mappings large enough to be guest RAM."""
    inodes = set()
    for m in read_maps(qemu_pid):
        if m.path.startswith("/memfd:") and "s" in m.perms and m.size >= min_size:
            inodes.add(m.inode)
    return inodes


@dataclass
class IsolationReport:
    backend_pid: int
    guest_inodes: set[int]
    pids: list[int] = field(default_factory=list)                # the backend's process tree
    guest_maps: list[Mapping] = field(default_factory=list)      # backend mappings of guest RAM
    guest_fds: list[tuple[int, str]] = field(default_factory=list)  # backend fds of guest RAM
    shadow_maps: list[Mapping] = field(default_factory=list)     # backend mappings of shadow memfds
    shadow_fds: list[tuple[int, str]] = field(default_factory=list)

    @property
    def isolated(self) -> bool:
        """The backend reaches no guest RAM, and does reach a fastshadow shadow region."""
        return bool(self.guest_inodes) and not self.guest_maps and not self.guest_fds and bool(self.shadow_maps)

    def lines(self) -> list[str]:
        tree = f" (process tree {self.pids})" if len(self.pids) > 1 else ""
        out = [f"backend pid {self.backend_pid}{tree}: guest RAM memfd inodes {sorted(self.guest_inodes)}"]
        for m in self.guest_maps:
            out.append(f"  GUEST RAM MAPPED   {m.start:#x}-{m.end:#x} {m.perms} inode {m.inode} {m.path}")
        for fd, t in self.guest_fds:
            out.append(f"  GUEST RAM FD       fd {fd} -> {t}")
        for m in self.shadow_maps:
            out.append(f"  shadow mapped      {m.start:#x}-{m.end:#x} {m.perms} inode {m.inode} {m.path}")
        for fd, t in self.shadow_fds:
            out.append(f"  shadow fd          fd {fd} -> {t}")
        out.append("  verdict: " + ("ISOLATED: the backend maps no guest RAM and holds no fd of it"
                                    if self.isolated else "NOT ISOLATED: the backend can reach guest RAM"
                                    if self.guest_maps or self.guest_fds else "INCONCLUSIVE"))
        return out


def check_isolation(backend_pid: int, qemu_pid: int) -> IsolationReport:
    """What guest RAM the backend (`backend_pid` and its descendants) maps or holds."""
    inodes = guest_ram_inodes(qemu_pid)
    rep = IsolationReport(backend_pid, inodes, process_tree(backend_pid))
    for pid in rep.pids:
        try:
            maps, fds = read_maps(pid), read_fds(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a child that exited meanwhile reaches nothing
        for m in maps:
            if m.inode in inodes and m.path.startswith("/memfd:"):
                rep.guest_maps.append(m)
            elif m.path.startswith("/" + SHADOW_PREFIX):
                rep.shadow_maps.append(m)
        for fd, (target, ino) in fds.items():
            if ino in inodes and target.startswith("/memfd:"):
                rep.guest_fds.append((fd, target))
            elif target.startswith("/" + SHADOW_PREFIX):
                rep.shadow_fds.append((fd, target))
    return rep


# -- who runs what: checked by the proxy on every isolated session ----------------------------
#
# Isolation by shadow memory holds only if the backend's *identity* cannot reach guest RAM
# some other way. Guest RAM is a memfd that QEMU, and fastshadow, hold open and map; the
# kernel lets a process open /proc/<pid>/fd/N and /proc/<pid>/mem of another (and map the
# memfd read-write) when ptrace_may_access(PTRACE_MODE_READ_FSCREDS) allows it: same uid
# (and gid) as the target, or CAP_SYS_PTRACE. So the backend must be neither root, nor
# QEMU's uid, nor fastshadow's uid (fastshadow maps all guest RAM too), and hold neither
# CAP_SYS_PTRACE nor CAP_SETUID (which lets it become any of those). Three identities:
# QEMU, fastshadow, the backend.
#
# What this does not see: an LSM policy (SELinux/AppArmor, libvirt's sVirt) that confines a
# root backend anyway (then --allow-shared-uid is the operator's statement); a backend that
# changed identity after it connected or listened (SO_PEERCRED is taken at that moment) or
# whose process tree holds other identities; capabilities it can regain by executing a
# file-capability binary. Yama's ptrace_scope does not help either way: it restricts
# PTRACE_ATTACH only, and /proc/<pid>/fd is a READ access it never checks.
#
# User namespaces: a capability counts only in the holder's user namespace and the ones
# below it. A backend that is root of a user namespace of its own (`fastshadow run
# --backend-userns`, mapped to one unprivileged uid) holds every capability *there*, which
# /proc/PID/status shows as is; over QEMU and fastshadow, in the namespace above, it holds
# none. So its capabilities are ignored when its user namespace is shown to lie strictly
# below both QEMU's and fastshadow's (NS_GET_PARENT, walked up from the backend's), or when
# fastshadow itself created that namespace for it (`fastshadow run --backend-userns`: a
# fresh child of fastshadow's own, which only the backend's own processes are in; reading
# another uid's /proc/PID/ns needs ptrace rights a non-root fastshadow lacks); otherwise
# they count. Its uid is the one SO_PEERCRED gives in fastshadow's
# namespace (the unprivileged one it is mapped to).

CAP_SETUID = 7
CAP_SYS_PTRACE = 19


@dataclass(frozen=True)
class PeerCred:
    """A unix socket peer's credentials, from SO_PEERCRED (taken at connect() or listen())."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock) -> PeerCred:
    """SO_PEERCRED of a connected unix socket `sock`."""
    import socket
    import struct
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return PeerCred(pid, uid, gid)


def effective_capabilities(pid: int) -> int | None:
    """CapEff of `pid` from /proc/PID/status, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def identity_risk(qemu: PeerCred, backend: PeerCred, proxy_uid: int | None = None,
                  own_user_namespace: bool = False) -> str | None:
    """None if the backend's identity cannot open QEMU's (or fastshadow's) /proc/PID/fd,
    else why it can (see the comment above: uid 0, QEMU's or fastshadow's uid,
    CAP_SYS_PTRACE or CAP_SETUID in its effective set). `own_user_namespace`: the caller
    put the backend into a fresh user namespace below its own before it listened
    (`fastshadow run --backend-userns`), so its capabilities are known not to count even
    where /proc/PID/ns cannot be read (fastshadow no longer root)."""
    proxy_uid = os.geteuid() if proxy_uid is None else proxy_uid
    if backend.uid == 0:
        return "the backend runs as root"
    if backend.uid == qemu.uid:
        return "the backend runs as QEMU's uid"
    if backend.uid == proxy_uid:
        return "the backend runs as fastshadow's uid (fastshadow maps guest RAM)"
    caps = effective_capabilities(backend.pid) if backend.pid > 0 else None
    if caps is not None and not own_user_namespace and not (user_namespace_below(backend.pid, qemu.pid)
                                                            and user_namespace_below(backend.pid, os.getpid())):
        held = [name for bit, name in ((CAP_SYS_PTRACE, "CAP_SYS_PTRACE"), (CAP_SETUID, "CAP_SETUID"))
                if caps >> bit & 1]
        if held:
            return f"the backend holds {' and '.join(held)}"
    return None


_NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2), linux/nsfs.h


def user_namespace_below(pid: int, other: int) -> bool:
    """True if `pid`'s user namespace is a strict descendant of `other`'s, so that no
    capability `pid` holds applies to `other` (False when it is the same, an ancestor,
    unrelated, or cannot be read)."""
    import fcntl
    try:
        target = os.stat(f"/proc/{other}/ns/user")
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return False
        while True:
            try:
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            except OSError:  # EPERM: the top of what we can see, without meeting `other`'s
                return False
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                return True
    finally:
        os.close(fd)
