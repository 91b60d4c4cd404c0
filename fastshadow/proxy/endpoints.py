"""Unix-socket endpoints: where QEMU connects to us and how we reach a backend.

Backends either listen (qemu-storage-daemon, virtiofsd: fastshadow
connects) or connect out (DPDK in client mode: fastshadow listens for them,
`--backend-listen`). Both are hidden behind BackendEndpoint.get().

The sockets fastshadow listens on are Listeners: created with a lock
(`PATH.lock`, flock) so that a second fastshadow refuses a live path, with
their group and mode set before listen(); or inherited (`--fd`, systemd
socket activation), which fastshadow uses as they are and never removes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import threading
import time


class EndpointError(OSError):
    """A socket could not be set up or reached; the message says which and why."""


class PathBusy(EndpointError):
    """Another live process serves this socket path (a fastshadow holding its lock, or any
    process listening on it): fastshadow refuses to take it over."""


#: os.umask is process-wide: one socket is bound under a restrictive umask at a time.
_UMASK_LOCK = threading.Lock()


def is_listening(path: str) -> bool:
    """A unix socket bound to `path` is in listen() state (a live server), read from
    /proc/net/unix: a probe connect() would be taken as a peer by the server."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            return any(len(fl) >= 8 and fl[7] == path and int(fl[3], 16) & 0x10000
                       for fl in (ln.split() for ln in f))
    except (OSError, StopIteration, ValueError):
        return False


def lock_path(path: str) -> int:
    """Take `path`.lock (flock, held until the fd is closed) and write our pid in it; PathBusy
    naming the holder's pid if a live process holds it. The lock file survives a crash but
    the lock does not, so a stale one is simply taken over."""
    lock = path + ".lock"
    for _ in range(8):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise EndpointError(e.errno, f"cannot create the lock {lock}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise PathBusy(errno.EADDRINUSE, f"{path} is served by another fastshadow (pid {holder}, holding "
                                             f"{lock}); stop it first or choose another path") from None
        # The previous holder unlinks the lock file as it exits: if it did so between our
        # open() and flock(), we hold a lock nobody else will look at. Try again then.
        try:
            st = os.stat(lock, follow_symlinks=False)
            fst = os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise EndpointError(errno.EAGAIN, f"cannot take the lock {lock}: it keeps being replaced")


def _apply_access(path: str, access) -> None:
    """Give the socket file at `path` its group and mode. Through an O_PATH fd of the file,
    checked to be the socket we just bound (ours, not a symlink someone put there): chown and
    chmod by name would follow a planted symlink."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise EndpointError(errno.EPERM, f"{path} was replaced while fastshadow set it up")
        via = f"/proc/self/fd/{fd}"
        if access.gid is not None:
            os.chown(via, -1, access.gid)
        if access.mode is not None:
            os.chmod(via, access.mode)
    finally:
        os.close(fd)


class Listener:
    """A listening unix socket: created here (`create`: locked, its mode and group set
    before listen()) or inherited (`adopt`: --fd, systemd), which fastshadow never removes."""

    def __init__(self, sock: socket.socket, path: str | None, *, lock_fd: int | None = None,
                 ino: tuple[int, int] | None = None):
        self.sock = sock
        self.path = path
        self._lock_fd = lock_fd
        self._ino = ino          # (dev, ino) of the socket file we created; None: not ours to remove

    @classmethod
    def create(cls, path: str, access=None, backlog: int = 16) -> "Listener":
        """Lock `path`.lock, replace a stale socket (never a live one, never another kind of
        file), bind, set group and mode, then listen. Between bind() and listen() a connect()
        is refused, so nobody connects before the mode and group are right; the bind itself
        happens under umask 0177 when a mode or group is asked for, so the file never has
        looser permissions than asked, even for a moment."""
        lock_fd = lock_path(path)
        try:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise EndpointError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
                if is_listening(path) or is_listening(os.path.abspath(path)):
                    raise PathBusy(errno.EADDRINUSE, f"{path}: another process listens on it; refusing to take "
                                                     f"it over")
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            bound = False
            try:
                if access is not None and access.given:
                    with _UMASK_LOCK:
                        old = os.umask(0o177)
                        try:
                            sock.bind(path)
                            bound = True
                        finally:
                            os.umask(old)
                    _apply_access(path, access)
                else:
                    sock.bind(path)
                    bound = True
                st = os.lstat(path)
                sock.listen(backlog)
            except OSError as e:
                sock.close()
                if bound:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                if isinstance(e, EndpointError):
                    raise
                raise EndpointError(e.errno, f"cannot listen on {path}: {e.strerror}") from e
        except BaseException:
            _unlock(path, lock_fd)
            raise
        return cls(sock, path, lock_fd=lock_fd, ino=(st.st_dev, st.st_ino))

    @classmethod
    def adopt(cls, sock: socket.socket, what: str) -> "Listener":
        """An inherited socket, which must be a listening unix stream socket."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise EndpointError(errno.ENOTSOCK, f"{what} is not a unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise EndpointError(errno.EINVAL, f"{what} is not listening")
        sock.setblocking(True)
        name = sock.getsockname()
        return cls(sock, name.decode(errors="replace") if isinstance(name, bytes) else (name or None))

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        return self.sock.accept()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        """Stop listening; remove the socket file if we created it and it is still ours, then the lock."""
        self.sock.close()
        if self._ino is not None and self.path is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
            self._ino = None
        if self._lock_fd is not None:
            _unlock(self.path, self._lock_fd)
            self._lock_fd = None


def _unlock(path: str, fd: int) -> None:
    # Unlink while still holding the lock: a process that opened the old file meanwhile
    # finds it unlinked after its flock() and starts again (lock_path).
    try:
        os.unlink(path + ".lock")
    except OSError:
        pass
    os.close(fd)


def inherited_socket(fd: int) -> socket.socket:
    """The socket of an inherited fd (--fd N): EndpointError if it is not an open unix stream socket."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise EndpointError(e.errno, f"--fd {fd}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointError(errno.ENOTSOCK, f"--fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise EndpointError(errno.ENOTSOCK, f"--fd {fd} is not a unix stream socket")
    os.set_inheritable(fd, False)
    return sock


def listen_unix(path: str, backlog: int = 16, access=None) -> Listener:
    """Listen on `path` (Listener.create)."""
    return Listener.create(path, access, backlog)


def backend_socket_problem(path: str) -> str | None:
    """Why a backend socket fastshadow will connect to looks absent, or None if something
    listens on it. Read from the file system and /proc/net/unix, never by connecting (the
    backend would take a probe for its front-end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such socket yet"
    except OSError as e:
        return e.strerror
    if not stat.S_ISSOCK(st.st_mode):
        return "it is not a socket"
    if os.path.exists("/proc/net/unix") and not is_listening(os.path.abspath(path)) and not is_listening(path):
        return "nothing listens on it (a stale socket)"
    return None


def connect_unix(path: str, timeout: float) -> socket.socket:
    """Connect to `path`, retrying while the backend is not there yet (restarting)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise EndpointError(e.errno, f"backend socket {path} did not accept a connection "
                                             f"within {timeout:g} s ({e.strerror})") from e
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except OSError as e:
            sock.close()
            raise EndpointError(e.errno, f"cannot connect to backend socket {path}: {e.strerror}") from e


class BackendEndpoint:
    """How a session obtains its backend connection."""

    def __init__(self, *, connect: str | None = None, listen: str | None = None, timeout: float = 10.0,
                 access=None, inherited: socket.socket | None = None):
        self.connect_path = connect
        self.listen_path = listen
        self.timeout = timeout
        self._listener = None
        if listen:
            self._listener = (Listener.adopt(inherited, f"the socket systemd passed for {listen}")
                              if inherited is not None else Listener.create(listen, access))

    @property
    def description(self) -> str:
        return f"connect:{self.connect_path}" if self.connect_path else f"listen:{self.listen_path}"

    def get(self) -> socket.socket:
        if self._listener is None:
            return connect_unix(self.connect_path, self.timeout)
        self._listener.settimeout(self.timeout)
        try:
            sock, _ = self._listener.accept()
        except socket.timeout:
            raise EndpointError(errno.ETIMEDOUT, f"no backend connected to {self.listen_path} "
                                                 f"within {self.timeout:g} s") from None
        sock.setblocking(True)
        return sock

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
