"""Start ``virtiofsd`` as a vhost-user-fs backend for tests and the demo.

::

    with Virtiofsd(tmp_path / "fs.sock", shared_dir=tmp_path / "share") as vfs:
        ...  # QEMU: -device vhost-user-fs-pci,chardev=...,tag=myfs

Debian 12 ships QEMU's C virtiofsd in qemu-system-common at
/usr/lib/qemu/virtiofsd. By default it sandboxes itself in new namespaces by
forking: the device is served by a child, so isolation checks look at the
whole process tree (:func:`fastshadow.isolation.check_isolation` does). It
serves one front-end connection and exits when that front-end goes away.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from .daemon import BackendDaemon

__all__ = ["Virtiofsd", "VirtiofsdError", "find_virtiofsd"]

_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "virtiofsd")


class VirtiofsdError(RuntimeError):
    pass


def find_virtiofsd() -> str | None:
    for c in _CANDIDATES:
        path = shutil.which(c)
        if path:
            return path
    return None


class Virtiofsd(BackendDaemon):
    name = "virtiofsd"
    error = VirtiofsdError

    def __init__(self, socket_path: str | os.PathLike[str], *, shared_dir: str | os.PathLike[str],
                 cache: str = "auto", extra_args: Iterable[str] = (),
                 log_path: str | os.PathLike[str] | None = None, start_timeout: float = 20.0) -> None:
        super().__init__(socket_path, log_path=log_path, start_timeout=start_timeout)
        self.shared_dir = Path(shared_dir)
        self.cache = cache
        self.extra_args = list(extra_args)

    @property
    def command(self) -> list[str]:
        path = find_virtiofsd()
        if path is None:
            raise VirtiofsdError("virtiofsd not found (/usr/lib/qemu/virtiofsd): apt-get install qemu-system-common")
        return [path, f"--socket-path={self.socket_path}", "-o", f"source={self.shared_dir}",
                "-o", f"cache={self.cache}", *self.extra_args]

    def prepare(self) -> None:
        self.shared_dir.mkdir(parents=True, exist_ok=True)
