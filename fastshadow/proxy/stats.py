"""Live counters of a running proxy (`--stats-interval`, `--stats-file`).

Every interval, for each device: whether a front-end is connected, how many
sessions it served, and for isolated devices the data plane's counters of
every queue QEMU configured (requests, bytes each way, refusals and their
reasons, throttling and back-pressure time, bounce bytes in use,
notifications, requests in flight) and its latency histograms. One `stats` log line per device carries
the totals and the rates since the previous line; the file, when asked for,
holds the whole snapshot as JSON (msgspec), replaced atomically, so a
monitoring agent can read it at any time.

The counters are read by the data-plane thread itself (a command on its
queue), never from shared memory mid-update. The same snapshot
(`take_snapshot`) feeds the Prometheus endpoint (metrics.py), read at each
scrape. A device's queue counters are those of its current session: a new
session starts them from 0 again (Prometheus counts that as a counter reset).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import msgspec

from ..logs import kv

log = logging.getLogger("fastshadow.proxy")


class HopHistogram(msgspec.Struct, frozen=True):
    """One hop's latency histogram of one queue, kept by the data plane itself (csrc/hist.c)."""

    hop: str                  # dataplane.LATENCY_HOPS: kick_to_shadowed, backend, call_to_used, end_to_end
    #: counts[0]: durations under 1 us; counts[s]: in [2^(s-1), 2^s) us (the last one also longer)
    counts: list[int]
    sum_ns: int               # the sum of the durations counted, ns
    unit: str = "us"          # of the bucket bounds (sum_ns is ns, as its name says)


class QueueSnapshot(msgspec.Struct, frozen=True):
    index: int
    stats: dict[str, int]     # dataplane.QueueStats, by field name (cumulative over the session)
    refused_by_reason: dict[str, int] = {}   # refused chains by event name, lower case
    latency: list[HopHistogram] = []         # one per hop, since the session began


class Peer(msgspec.Struct, frozen=True):
    """A peer's credentials (SO_PEERCRED) as the last isolated session saw them."""

    pid: int
    uid: int
    gid: int


class DeviceSnapshot(msgspec.Struct, frozen=True):
    name: str
    mode: str
    device: str
    connected: bool
    sessions: int
    queues: list[QueueSnapshot]
    #: direct; isolated: waiting (no session yet), enforced, shared_uid (--allow-shared-uid), refused
    isolation: str = "direct"
    backend_reconnects: int = 0
    qemu: Peer | None = None
    backend: Peer | None = None
    #: isolated, in a session: the data-plane thread serving its queues, and the bytes of its
    #: shadow memfd that hold pages (rings, bounce pages in use or not yet trimmed)
    dataplane_thread: int | None = None
    shadow_resident_bytes: int = 0

    def total(self, field: str) -> int:
        return sum(q.stats[field] for q in self.queues)


class ProxySnapshot(msgspec.Struct, frozen=True):
    time: float               # Unix time of the snapshot
    uptime_s: float
    interval_s: float
    devices: list[DeviceSnapshot]


def _peer(cred) -> Peer | None:
    return Peer(cred.pid, cred.uid, cred.gid) if cred is not None else None


def queue_snapshot(q: int, st, latency=()) -> QueueSnapshot:
    """`st`: a dataplane.QueueStats; `latency`: its queue's [dataplane.HopLatency]."""
    counters = msgspec.structs.asdict(st)
    refused = counters.pop("refused_by_reason", {})
    return QueueSnapshot(q, counters, refused_by_reason=dict(refused),
                         latency=[HopHistogram(h.hop, list(h.counts), h.sum_ns) for h in latency])


def snapshot_device(dev) -> DeviceSnapshot:
    """`dev`: a server.Device. Queues are those of its current session, if any."""
    session = dev.session
    connected = session is not None and not session.closing
    queues = []
    thread, resident = _shadow(session)
    if session is not None:
        try:
            queues = [queue_snapshot(*row) for row in session.queue_stats()]
        except Exception as e:  # the session ended under us: its counters are gone with it
            kv(log, logging.DEBUG, "stats.skipped", dev=dev.cfg.name, reason=str(e))
    return DeviceSnapshot(dev.cfg.name, dev.cfg.mode.value, dev.cfg.device.value, connected,
                          dev.sessions_served, queues, isolation=dev.isolation,
                          backend_reconnects=dev.backend_reconnects, qemu=_peer(dev.qemu_cred),
                          backend=_peer(dev.backend_cred), dataplane_thread=thread, shadow_resident_bytes=resident)


def _shadow(session) -> tuple[int | None, int]:
    """(data-plane thread, shadow bytes resident) of an isolated session's device, else (None, 0)."""
    dpdev = getattr(session, "dev", None)
    if dpdev is None:
        return None, 0
    try:
        return dpdev.loop, dpdev.shadow_resident_bytes()    # safe against a renewal meanwhile
    except (OSError, AttributeError):      # the session ended under us: its device is gone
        return None, 0


def take_snapshot(proxy, interval: float) -> ProxySnapshot:
    """Every device of `proxy` (a server.Proxy) now."""
    return ProxySnapshot(time=time.time(), uptime_s=round(time.monotonic() - proxy.started_at, 3),
                         interval_s=interval, devices=[snapshot_device(d) for d in list(proxy.devices)])


class StatsReporter(threading.Thread):
    """Logs (and writes to `path`) a snapshot of `proxy` every `interval` seconds."""

    def __init__(self, proxy, interval: float, path: str | None = None):
        super().__init__(name="stats", daemon=True)
        self.proxy, self.interval, self.path = proxy, interval, path
        # Not `_stop`: threading.Thread has a method of that name, which join() calls.
        self._stopping = threading.Event()
        self._prev: dict[str, tuple[float, DeviceSnapshot]] = {}

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.report(self.snapshot())
            except Exception as e:  # never let monitoring take the proxy down
                kv(log, logging.WARNING, "stats.failed", reason=f"{type(e).__name__}: {e}")

    def snapshot(self) -> ProxySnapshot:
        return take_snapshot(self.proxy, self.interval)

    def report(self, snap: ProxySnapshot) -> None:
        now = time.monotonic()
        for d in snap.devices:
            fields = dict(dev=d.name, mode=d.mode, connected=d.connected, sessions=d.sessions)
            if d.queues:
                prev_t, prev = self._prev.get(d.name, (None, None))
                dt = now - prev_t if prev_t is not None else 0.0

                def rate(field: str, scale: float = 1.0) -> str:
                    before = prev.total(field) if prev is not None else 0
                    delta = d.total(field) - before
                    if dt <= 0 or delta < 0:        # first report, or a new session reset the counters
                        return "-"
                    return f"{delta / dt / scale:.1f}"
                fields.update(queues=len(d.queues), requests=d.total("requests"),
                              inflight=d.total("inflight"), refused=d.total("refused"),
                              throttled=d.total("throttled"), req_per_s=rate("requests"),
                              mb_in_per_s=rate("bytes_in", 1e6), mb_out_per_s=rate("bytes_out", 1e6),
                              failed=d.total("failed"), poisoned=d.total("poisoned"),
                              bounce_kib=d.total("bounce_bytes") // 1024,
                              backpressure_ms=round(d.total("throttled_ns") / 1e6, 1))
                self._prev[d.name] = (now, d)
            if d.mode != "direct":
                fields.update(backend_reconnects=d.backend_reconnects, isolation=d.isolation)
                if d.dataplane_thread is not None:
                    fields.update(thread=d.dataplane_thread, shadow_kib=d.shadow_resident_bytes // 1024)
            kv(log, logging.INFO, "stats", **fields)
        if self.path:
            write_atomically(self.path, msgspec.json.encode(snap))


def write_atomically(path: str, data: bytes) -> None:
    """Readers see the previous file or the new one, never a partial write.

    The temporary file is created exclusively under a random name (mkstemp): in a
    directory others can write to (/tmp), a predictable name could be a planted
    symlink that root would follow."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data + b"\n")
        os.chmod(tmp, 0o644)       # monitoring agents read it (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
