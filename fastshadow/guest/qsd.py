"""Start ``qemu-storage-daemon`` as a vhost-user-blk backend for tests.

::

    with StorageDaemon(tmp_path / "blk.sock", disk=tmp_path / "disk.img", num_queues=2) as qsd:
        ...  # connect QEMU (or fastshadow) to qsd.socket_path

``driver="file"`` serves a disk image (created sparse with `size` if it does
not exist) with ``cache.direct=on,aio=io_uring``, as the data checks want;
``driver="null"`` serves a zero-reading null-co device of `size`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from ..sizes import parse_size
from .daemon import BackendDaemon

__all__ = ["StorageDaemon", "StorageDaemonError", "parse_size"]


class StorageDaemonError(RuntimeError):
    pass


class StorageDaemon(BackendDaemon):
    """A ``qemu-storage-daemon`` exporting one vhost-user-blk device on a unix socket.

    The socket is removed before start (qsd refuses to bind an existing path)
    and the context manager waits until qsd is listening on it.  ``kill()``
    (or leaving the ``with``) stops the daemon.
    """

    name = "qemu-storage-daemon"
    error = StorageDaemonError

    def __init__(self, socket_path: str | os.PathLike[str], *, driver: str = "file",
                 disk: str | os.PathLike[str] | None = None, size: str | int = "64M",
                 num_queues: int = 1, writable: bool = True, aio: str = "io_uring", locking: bool = True,
                 throttle_iops: int | None = None, extra_args: Iterable[str] = (),
                 log_path: str | os.PathLike[str] | None = None,
                 binary: str = "qemu-storage-daemon", start_timeout: float = 20.0,
                 user: str | None = None) -> None:
        if driver not in ("file", "null"):
            raise ValueError(f"driver must be 'file' or 'null', not {driver!r}")
        if driver == "file" and disk is None:
            raise ValueError("driver='file' needs disk=PATH")
        super().__init__(socket_path, log_path=log_path, start_timeout=start_timeout, user=user)
        self.driver = driver
        self.disk = Path(disk) if disk is not None else None
        self.size = parse_size(size)
        self.num_queues = num_queues
        self.writable = writable
        self.aio = aio
        self.locking = locking  # off: two daemons may open one image (migration source and target)
        #: A throttle filter on top of the disk: requests stay in flight (tests of dying peers).
        self.throttle_iops = throttle_iops
        self.extra_args = list(extra_args)
        self.binary = binary

    @property
    def command(self) -> list[str]:
        path = shutil.which(self.binary)
        if path is None:
            raise StorageDaemonError(
                f"{self.binary} not found in PATH: apt-get install qemu-system-x86 "
                "(Debian ships qemu-storage-daemon there) or qemu-utils")
        if self.driver == "file":
            blockdev = (f"driver=file,node-name=disk0,filename={self.disk},"
                        f"cache.direct=on,aio={self.aio}{'' if self.locking else ',locking=off'}")
        else:
            blockdev = f"driver=null-co,node-name=disk0,size={self.size},read-zeroes=on"
        args = [path, "--blockdev", blockdev]
        node = "disk0"
        if self.throttle_iops is not None:
            args += ["--object", f"throttle-group,id=tg0,x-iops-total={self.throttle_iops}",
                     "--blockdev", "driver=throttle,node-name=throttled0,throttle-group=tg0,file=disk0"]
            node = "throttled0"
        export = (f"type=vhost-user-blk,id=export0,node-name={node},addr.type=unix,"
                  f"addr.path={self.socket_path},writable={'on' if self.writable else 'off'},"
                  f"num-queues={self.num_queues}")
        return [*args, "--export", export, *self.extra_args]

    def prepare(self) -> None:
        if self.driver == "file" and not self.disk.exists():  # type: ignore[union-attr]
            with open(self.disk, "wb") as f:  # type: ignore[arg-type]
                f.truncate(self.size)        # sparse
