"""The two systemd interfaces a daemon needs, written out (each is a few lines of protocol):

- readiness: `sd_notify("READY=1")` sends one datagram to the unix socket
  named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading
  `@`); Type=notify units wait for it. Without $NOTIFY_SOCKET it does nothing.
- socket activation: systemd passes listening sockets as fds 3, 4, ...
  ($LISTEN_FDS of them) to the process whose pid is $LISTEN_PID. fastshadow
  matches each to a device by the path it is bound to (ListenStream= in the
  .socket unit equals the device's --listen), so the same command line works
  with or without activation.

Both follow sd_notify(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import os
import socket

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1") to systemd; False if not run by it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def listen_fds(unset_environment: bool = True) -> dict[str, socket.socket]:
    """The unix stream sockets systemd passed to this process, by the path each is bound to.
    Sockets of other kinds are left alone (their fds stay open and unused)."""
    try:
        pid, n = int(os.environ.get("LISTEN_PID", "")), int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    finally:
        if unset_environment:
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(var, None)
    if pid != os.getpid() or n <= 0:
        return {}
    out = {}
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            continue
        name = sock.getsockname()
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if name:
            out[name] = sock
        else:
            sock.detach()
    return out
