"""A minimal QMP client: enough to drive a live migration between two test guests.

QMP speaks JSON lines over a unix socket: a greeting, then `qmp_capabilities`,
then commands answered by `{"return": ...}` or `{"error": ...}`; asynchronous
events (`{"event": ...}`) may arrive at any time and are kept aside.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QMPError(RuntimeError):
    """QEMU answered a command with an error, or the monitor went away."""


class QMP:
    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"no QMP monitor at {path} after {timeout:g} s") from None
                time.sleep(0.1)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QMPError("QMP monitor closed the connection")
        return json.loads(line)

    def command(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('class')}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
