"""A vhost-user backend as a child process: started, awaited on its socket, stopped.

The backends of the tests, the demo and the benchmarks (qemu-storage-daemon,
virtiofsd, dpdk-testpmd) are all started the same way: remove a stale socket, spawn the
daemon in its own session (so stopping it also stops what it forked), collect
its output, and wait until it *listens* on its unix socket. A probe connect()
would be taken as the vhost-user front-end, so readiness is read from
/proc/net/unix instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from ._children import die_with_parent

__all__ = ["BackendDaemon", "BackendDaemonError", "NotListening", "is_listening", "wait_listening"]


class BackendDaemonError(RuntimeError):
    pass


class NotListening(RuntimeError):
    """A process did not come to listen on its unix socket (it exited, or timed out)."""


def wait_listening(path: str | os.PathLike[str], proc: subprocess.Popen, timeout: float,
                   what: str = "the process") -> None:
    """Wait until `proc` listens on `path` (the path alone appears at bind(), and a
    connect() before listen() is refused). Raises NotListening."""
    deadline = time.monotonic() + timeout
    while not is_listening(path):
        if proc.poll() is not None:
            raise NotListening(f"{what} exited with {proc.returncode} before it listened on {path}")
        if time.monotonic() > deadline:
            raise NotListening(f"{what} did not listen on {path} within {timeout:g} s")
        time.sleep(0.02)


def is_listening(path: str | os.PathLike[str]) -> bool:
    """True if a unix socket bound to `path` is in listen() state (__SO_ACCEPTCON)."""
    want = str(path)
    try:
        with open("/proc/net/unix") as f:
            next(f)
            return any(len(fl) >= 8 and fl[7] == want and int(fl[3], 16) & 0x10000
                       for fl in (ln.split() for ln in f))
    except OSError:
        return Path(path).is_socket()  # no procfs: the bound path is the best we have


class BackendDaemon:
    """Base of the backend helpers: subclasses give `name`, `error` and `command`."""

    name = "backend"
    error: type[Exception] = BackendDaemonError

    def __init__(self, socket_path: str | os.PathLike[str], *, log_path: str | os.PathLike[str] | None = None,
                 start_timeout: float = 20.0, user: str | None = None) -> None:
        #: Run the daemon as this user (name or uid) and its primary group, with no
        #: supplementary groups (setpriv): a backend identity of its own (DESIGN §3.9).
        #: The socket's directory must be writable by that user.
        self.user = user
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path) if log_path is not None else None
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: list[str] = []
        self._reader: threading.Thread | None = None
        self._log: IO[str] | None = None

    @property
    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create what the daemon needs before it starts (a disk image, a directory)."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def output(self) -> str:
        """Everything the daemon printed (stdout and stderr) so far."""
        return "".join(self._output)

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def run_as(self) -> list[str]:
        """The setpriv prefix that runs the daemon as `user` (empty when it runs as we do)."""
        if self.user is None:
            return []
        import pwd
        pw = pwd.getpwuid(int(self.user)) if str(self.user).isdigit() else pwd.getpwnam(self.user)
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]

    def start(self):
        if self._proc is not None:
            raise self.error("already started")
        argv = [*self.run_as(), *self.command]
        self.prepare()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.socket_path.unlink()  # daemons refuse to bind an existing path
        except FileNotFoundError:
            pass
        if self.log_path is not None:
            self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
            self._log.write("# " + " ".join(argv) + "\n")
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{self.name}-output-{self._proc.pid}")
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
                raise self.error(f"{self.name} exited with {self._proc.returncode} during start:\n"
                                 f"{self.output.strip()}\ncommand: {' '.join(self.command)}")
            if self.socket_path.exists() and is_listening(self.socket_path):
                return
            time.sleep(0.02)
        self.kill()
        raise self.error(f"{self.name} did not create {self.socket_path} within "
                         f"{self.start_timeout}s:\n{self.output.strip()}")

    def wait(self, timeout: float) -> int | None:
        """Wait for the daemon to exit by itself; its exit code, or None if it still runs."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
