"""`fastshadow trace --from-stats FILE`: the latency histograms the data plane keeps itself.

The proxy's data plane keeps, per device and queue, log2 histograms of four
hops (csrc/hist.c) whether or not anyone traces; `--stats-file` writes them
with the counters. This reads that file (no bcc, no root, no kernel headers)
and prints them as `fastshadow trace` prints its own, with the same bucket
rule (report.BUCKET_RULE). With `duration`, it reads the file twice and
prints what that time added (a counter reset by a new session shows as the
new session's counts).

The schema here is the part of fastshadow.proxy.stats.ProxySnapshot this
reads (the tracer does not import the proxy, ARCHITECTURE.md); msgspec
ignores the rest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

from .report import BUCKET_RULE, UNIT, Histogram, TraceRun, Interval, format_histograms


class _Hop(msgspec.Struct):
    hop: str
    counts: list[int]
    sum_ns: int = 0
    unit: str = "us"


class _Queue(msgspec.Struct):
    index: int
    latency: list[_Hop] = []


class _Device(msgspec.Struct):
    name: str
    mode: str
    queues: list[_Queue] = []


class _Snapshot(msgspec.Struct):
    time: float
    devices: list[_Device]


class StatsFileError(RuntimeError):
    """The stats file cannot be read as a fastshadow stats snapshot."""


def read(path: str) -> _Snapshot:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=_Snapshot)
    except OSError as e:
        raise StatsFileError(f"{path}: {e.strerror}; start the proxy with --stats-file {path}") from None
    except msgspec.DecodeError as e:
        raise StatsFileError(f"{path}: not a fastshadow stats snapshot ({e})") from None


def histograms(snap: _Snapshot, device: str | None = None, queue: int | None = None) -> list[Histogram]:
    out = []
    for d in snap.devices:
        if device is not None and d.name != device:
            continue
        for q in d.queues:
            if queue is not None and q.index != queue:
                continue
            for h in q.latency:
                if h.unit != UNIT:
                    raise StatsFileError(f"device {d.name} queue {q.index}: histogram unit {h.unit!r}, want {UNIT}")
                out.append(Histogram(h.hop, q.index, {s: c for s, c in enumerate(h.counts) if c}, device=d.name))
    return out


def difference(after: list[Histogram], before: list[Histogram]) -> list[Histogram]:
    """What `after` added to `before`, per (hop, device, queue); a reset counter counts from 0."""
    prev = {(h.hop, h.device, h.queue): h for h in before}
    out = []
    for h in after:
        b = prev.get((h.hop, h.device, h.queue))
        if b is None or any(h.slots.get(s, 0) < c for s, c in b.slots.items()):
            out.append(h)
            continue
        out.append(Histogram(h.hop, h.queue, {s: c - b.slots.get(s, 0) for s, c in h.slots.items()
                                              if c - b.slots.get(s, 0)}, device=h.device))
    return out


def from_stats(path: str, *, device: str | None, queue: int | None, duration: float | None,
               json_path: str | None) -> int:
    """Print the histograms of `path` (filtered); exit status 0, or 1 with one line on stderr."""
    try:
        first = read(path)
        hists = histograms(first, device, queue)
        if device is not None and not any(d.name == device for d in first.devices):
            raise StatsFileError(f"{path}: no device {device!r} (devices: "
                                 f"{', '.join(d.name for d in first.devices) or 'none'})")
        t0 = time.monotonic_ns()
        if duration:
            time.sleep(duration)
            hists = difference(histograms(read(path), device, queue), hists)
    except StatsFileError as e:
        print(f"fastshadow trace: {e}", file=sys.stderr)
        return 1
    span = f"the last {duration:g} s" if duration else "since each session began"
    print(f"Latency histograms kept by the data plane ({path}, {span}; {BUCKET_RULE})")
    if not hists:
        print("\nno isolated queue with histograms (direct-mode devices have no data plane; "
              "a device shows queues while a front-end is connected)")
    else:
        print(format_histograms(hists))
    if json_path:
        run = TraceRun(0, None, queue, [Interval(0, t0, time.monotonic_ns(), {}, hists)], device=device)
        Path(json_path).write_bytes(msgspec.json.encode(run))
    return 0
