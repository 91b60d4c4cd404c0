"""Start ``qemu-storage-daemon`` as a vhost-user-blk backend for tests.

::

    with StorageDaemon(tmp_path / "blk.sock", disk=tmp_path / "disk.img", num_queues=2) as qsd:
        ...  # connect QEMU (or fastshadow) to qsd.socket_path

``driver="file"`` serves a disk image (created sparse with `size` if it does
not exist) with ``cache.direct=on,aio=io_uring``, as the data checks want;
``driver="null"`` serves a zero-reading null-co device of `size`.
"""

from __future__ import annotations

from ._children import die_with_parent

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Iterable

__all__ = ["StorageDaemon", "StorageDaemonError", "parse_size"]


class StorageDaemonError(RuntimeError):
    pass


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(size: str | int) -> int:
    """``"64M"`` -> 67108864 (binary units, as QEMU reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"bad size {size!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _is_listening(path: Path) -> bool:
    """True if a unix socket bound to `path` is in listen() state (__SO_ACCEPTCON)."""
    want = str(path)
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == want and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        return path.is_socket()  # no procfs: the bound path is the best we have
    return False


class StorageDaemon:
    """A ``qemu-storage-daemon`` exporting one vhost-user-blk device on a unix socket.

    The socket is removed before start (qsd refuses to bind an existing path)
    and the context manager waits until qsd is listening on it.  ``kill()``
    (or leaving the ``with``) stops the daemon.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, driver: str = "file",
                 disk: str | os.PathLike[str] | None = None, size: str | int = "64M",
                 num_queues: int = 1, writable: bool = True, aio: str = "io_uring",
                 extra_args: Iterable[str] = (), log_path: str | os.PathLike[str] | None = None,
                 binary: str = "qemu-storage-daemon", start_timeout: float = 20.0) -> None:
        if driver not in ("file", "null"):
            raise ValueError(f"driver must be 'file' or 'null', not {driver!r}")
        if driver == "file" and disk is None:
            raise ValueError("driver='file' needs disk=PATH")
        self.socket_path = Path(socket_path)
        self.driver = driver
        self.disk = Path(disk) if disk is not None else None
        self.size = parse_size(size)
        self.num_queues = num_queues
        self.writable = writable
        self.aio = aio
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path is not None else None
        self.binary = binary
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: list[str] = []
        self._reader: threading.Thread | None = None
        self._log: IO[str] | None = None

    @property
    def command(self) -> list[str]:
        path = shutil.which(self.binary)
        if path is None:
            raise StorageDaemonError(
                f"{self.binary} not found in PATH: apt-get install qemu-system-x86 "
                "(Debian ships qemu-storage-daemon there) or qemu-utils")
        if self.driver == "file":
            blockdev = (f"driver=file,node-name=disk0,filename={self.disk},"
                        f"cache.direct=on,aio={self.aio}")
        else:
            blockdev = f"driver=null-co,node-name=disk0,size={self.size},read-zeroes=on"
        export = (f"type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
                  f"addr.path={self.socket_path},writable={'on' if self.writable else 'off'},"
                  f"num-queues={self.num_queues}")
        return [path, "--blockdev", blockdev, "--export", export, *self.extra_args]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def output(self) -> str:
        """Everything qsd printed (stdout and stderr) so far."""
        return "".join(self._output)

    def start(self) -> "StorageDaemon":
        if self._proc is not None:
            raise StorageDaemonError("already started")
        argv = self.command
        if self.driver == "file" and not self.disk.exists():  # type: ignore[union-attr]
            with open(self.disk, "wb") as f:  # type: ignore[arg-type]
                f.truncate(self.size)        # sparse
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        if self.log_path is not None:
            self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
            self._log.write("# " + " ".join(argv) + "\n")
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"qsd-output-{self._proc.pid}")
        self._reader.start()
        self._wait_listening()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self._output.append(line)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()

    def _wait_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=2)
                raise StorageDaemonError(
                    f"qemu-storage-daemon exited with {self._proc.returncode} during start:\n"
                    f"{self.output.strip()}\ncommand: {' '.join(self.command)}")
            # A probe connect() would count as the vhost-user client, so look
            # for the listening socket in /proc/net/unix instead.
            if self.socket_path.exists() and _is_listening(self.socket_path):
                return
            time.sleep(0.02)
        self.kill()
        raise StorageDaemonError(f"qemu-storage-daemon did not create {self.socket_path} within "
                                 f"{self.start_timeout}s:\n{self.output.strip()}")

    def kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def __enter__(self) -> "StorageDaemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

