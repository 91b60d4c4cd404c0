"""Unix-socket endpoints: where QEMU connects to us and how we reach a backend.

Backends either listen (qemu-storage-daemon, virtiofsd: fastshadow
connects) or connect out (DPDK in client mode: fastshadow listens for them,
`--backend-listen`). Both are hidden behind BackendEndpoint.get().
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time


class EndpointError(OSError):
    """A socket could not be set up or reached; the message says which and why."""


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """Listen on `path`, replacing a stale socket file but never a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise EndpointError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise EndpointError(e.errno, f"cannot listen on {path}: {e.strerror}") from e
    return sock


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

    def __init__(self, *, connect: str | None = None, listen: str | None = None, timeout: float = 10.0):
        self.connect_path = connect
        self.listen_path = listen
        self.timeout = timeout
        self._listener = listen_unix(listen) if listen else None

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
            try:
                os.unlink(self.listen_path)
            except OSError:
                pass
