"""The trace control block of a running proxy (csrc/probes.h, struct fsdp_trace_ctl).

The data plane exports one symbol, ``fastshadow_trace_ctl``: a magic, the
sample rate a tracer asks for (``request_sampled`` fires for 1 request in N per
queue) and the name of every device by its data-plane id (the ``dev`` argument
of every probe). The tracer finds the symbol in the extension's dynamic symbol
table (``readelf``, binutils), the extension's load address in
``/proc/PID/maps``, and reads and writes the block through ``/proc/PID/mem``
(root, as attaching the probes is). No control socket, nothing to restart.
The sample rate is one per proxy: two sampling tracers of one proxy share it
(the last one started sets it, the first one to end sets it back to 0).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

SYMBOL = "fastshadow_trace_ctl"
MAGIC = b"fastshadow-tctl1"
SAMPLE_OFFSET = 16          # after the 16-byte magic
NAMES_OFFSET = 24           # after sample_every and its padding
DEVS, NAME_LEN = 256, 64


class TraceControlError(RuntimeError):
    """The proxy's trace control block cannot be found or does not look like one."""


@dataclass
class _Where:
    path: str
    base: int


def _extension(pid: int) -> _Where:
    """The data-plane extension mapped by `pid`, and its load address (the mapping at file offset 0)."""
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
    except OSError as e:
        raise TraceControlError(f"cannot read /proc/{pid}/maps: {e.strerror}") from None
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and re.search(r"/_dataplane[^/]*\.so$", parts[5]) and int(parts[2], 16) == 0:
            return _Where(parts[5], int(parts[0].split("-")[0], 16))
    raise TraceControlError(f"process {pid} has no fastshadow data plane mapped (is it an isolated proxy?)")


def _symbol_value(path: str) -> int:
    readelf = shutil.which("readelf")
    if readelf is None:
        raise TraceControlError("readelf not found: apt-get install binutils")
    out = subprocess.run([readelf, "-sW", "--dyn-syms", path], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8 and f[7] == SYMBOL and f[3] == "OBJECT":
            return int(f[1], 16)
    raise TraceControlError(f"{path} exports no {SYMBOL}: a fastshadow older than sampling (ABI < 4)")


class TraceControl:
    """The control block of proxy `pid`. Raises TraceControlError."""

    def __init__(self, pid: int):
        self.pid = pid
        where = _extension(pid)
        self.addr = where.base + _symbol_value(where.path)
        if self._read(0, len(MAGIC)) != MAGIC:
            raise TraceControlError(f"process {pid}: {SYMBOL} at {self.addr:#x} has no magic: not written")

    def _read(self, off: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            f.seek(self.addr + off)
            return f.read(n)

    def names(self) -> dict[int, str]:
        """{data-plane id: device name} of the devices the proxy's data plane has now."""
        raw = self._read(NAMES_OFFSET, DEVS * NAME_LEN)
        out = {}
        for i in range(DEVS):
            name = raw[i * NAME_LEN:(i + 1) * NAME_LEN].split(b"\0", 1)[0]
            if name:
                out[i] = name.decode(errors="replace")
        return out

    @property
    def sample_every(self) -> int:
        return int.from_bytes(self._read(SAMPLE_OFFSET, 4), "little")

    @sample_every.setter
    def sample_every(self, n: int) -> None:
        """1 request in n per queue fires request_sampled (0: none). One aligned 4-byte write."""
        if not 0 <= n < 1 << 32:
            raise ValueError(f"sample rate {n}: want 0..2^32-1")
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as f:
            f.seek(self.addr + SAMPLE_OFFSET)
            f.write(n.to_bytes(4, "little"))
