"""`fastshadow bench --scale`: many devices in one isolated proxy, and what each costs.

For each point (D devices x Q queues) of the matrix, one qemu-storage-daemon
with D null-co exports (Q queues each) and one `fastshadow proxy` serving D
isolated devices (one `--listen`/`--backend` pair each, its data-plane
threads as `--dataplane-threads` says, default one per device up to the CPUs)
are started; D load-generator sessions (bench/loadgen.c, one driver thread
each) connect, then all run 4 KiB random reads at QD32 per queue at once:

    D sessions -> fastshadow proxy (D devices, T loop threads) -> qsd (D exports)

Measured per point: aggregate IOPS, proxy CPU per request (utime+stime of the
whole proxy over the run, over the requests), p50/p99 latency over every
request of every session, and the proxy's memory at four moments: no session
(base), sessions set up but idle, right after the load (busy), and once the
idle trim has given the bounce pages back (trimmed): RSS split into anonymous
and shared, and the shadow memfds' resident bytes (their allocated blocks, read
through /proc/PID/fd).  A second, memory-only sweep repeats a point with
several --bounce-per-queue sizes: memory before use must not depend on it.

    fastshadow bench --scale --out bench/results/scale
    python -m fastshadow.bench.scale bench/results/scale/results.json --markdown
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import msgspec
import numpy as np

from fastshadow.guest._children import die_with_parent
from fastshadow.guest.daemon import NotListening, wait_listening
from fastshadow.guest.qsd import StorageDaemon

from . import report as rp
from .loadgen import LoadGenError
from .runner import cpu_seconds, machine_info, memcpy_baseline, open_session, self_cpu_seconds

SCHEMA_VERSION = 1
SHADOW_PREFIX = "/memfd:fastshadow-shadow:"


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class ScaleConfig:
    devices: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    queues: list[int] = field(default_factory=lambda: [1, 2, 4])
    duration: float = 2.0
    block_size: int = 4096
    qd: int = 32
    threads: int = 0                 # --dataplane-threads (0: the proxy's default)
    bounce_per_queue: int = 16 << 20
    bounce_sweep: list[int] = field(default_factory=lambda: [2 << 20, 16 << 20, 64 << 20])
    sweep_devices: int = 8
    sweep_queues: int = 4
    idle_trim_ms: int = 3000
    direct: bool = False             # also each point without the proxy (the load generator on qsd)
    proxy_args: list[str] = field(default_factory=list)
    out: Path = Path("out/bench-scale")
    workdir: Path | None = None
    keep: bool = False
    timeout: float = 10.0
    plots: bool = True
    command: str = ""


# ---- results (the JSON) -------------------------------------------------------------------------
class Memory(msgspec.Struct):
    """The proxy's memory at one moment, bytes."""
    rss: int
    rss_anon: int
    rss_shmem: int
    shadow_resident: int           # allocated blocks of every shadow memfd
    shadow_size: int               # their sizes (address space, not memory)


class Point(msgspec.Struct):
    mode: str                      # "isolated", or "direct" (no proxy: the baseline)
    devices: int
    queues: int
    threads: int                   # data-plane threads the proxy ran
    bounce_per_queue: int
    block_size: int
    qd: int
    duration_s: float
    requests: int
    iops: float
    lat_p50_ns: int
    lat_p99_ns: int
    proxy_cpu_s: float
    backend_cpu_s: float
    loadgen_cpu_s: float
    proxy_cpu_us_per_request: float
    base: Memory                   # proxy started, no session
    idle: Memory                   # every session set up, no request yet
    busy: Memory                   # right after the load
    trimmed: Memory                # after the idle trim (or its deadline)
    trim_seen: bool                # the shadow came back to its idle size before the deadline


class ScaleResults(msgspec.Struct):
    schema: int
    created: str
    command: str
    machine: rp.Machine
    settings: dict
    points: list[Point]
    sweep: list[Point]             # memory vs --bounce-per-queue
    memcpy: rp.Memcpy | None = None  # one core's memcpy (for the projection's copy bound)
    wall_s: float = 0.0
    plots: list[str] = []


# ---- measurements -------------------------------------------------------------------------------
def proxy_memory(pid: int) -> Memory:
    """RSS (anonymous, shared) from /proc/PID/status; the shadow memfds' resident bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssShmem"):
                fields[k] = int(v.split()[0]) * 1024
    resident = size = 0
    seen = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not os.readlink(path).startswith(SHADOW_PREFIX):
                continue
            st = os.stat(path)
        except OSError:
            continue                   # closed meanwhile
        if st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        resident += st.st_blocks * 512
        size += st.st_size
    return Memory(fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssShmem", 0), resident, size)


def wait_trimmed(pid: int, idle: Memory, deadline_s: float) -> tuple[Memory, bool]:
    """Until the shadow is back to its idle residency (the trim ran), or the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        m = proxy_memory(pid)
        if m.shadow_resident <= idle.shadow_resident:
            return m, True
        if time.monotonic() > end:
            return m, False
        time.sleep(0.05)


# ---- processes ----------------------------------------------------------------------------------
def start_qsd(workdir: Path, devices: int, queues: int, log_path: Path) -> StorageDaemon:
    """One qemu-storage-daemon, `devices` null-co exports of `queues` queues each."""
    extra = []
    for i in range(1, devices):
        extra += ["--blockdev", f"driver=null-co,node-name=disk{i},size={8 << 30},read-zeroes=on",
                  "--export", f"type=vhost-user-blk,id=export{i},node-name=disk{i},addr.type=unix,"
                              f"addr.path={workdir / f'qsd{i}.sock'},writable=on,num-queues={queues}"]
    for i in range(devices):
        try:
            (workdir / f"qsd{i}.sock").unlink()
        except FileNotFoundError:
            pass
    qsd = StorageDaemon(workdir / "qsd0.sock", driver="null", size=8 << 30, num_queues=queues,
                        extra_args=extra, log_path=log_path).start()
    for i in range(1, devices):
        wait_listening(workdir / f"qsd{i}.sock", qsd._proc, 20, what="qemu-storage-daemon")
    return qsd


class ScaleProxy:
    """`fastshadow proxy` with one isolated device per export."""

    def __init__(self, workdir: Path, devices: int, cfg: ScaleConfig, bounce: int, log_path: Path):
        self.socks = [workdir / f"fs{i}.sock" for i in range(devices)]
        # Requests are 4 KiB: a 1 MiB cap lets the bounce sweep go down to 2 MiB per queue.
        argv = [sys.executable, "-m", "fastshadow.cli", "proxy", "--allow-shared-uid", "--max-request-bytes", "1M",
                "--bounce-per-queue", str(bounce), "--idle-trim-ms", str(cfg.idle_trim_ms)]
        if cfg.threads:
            argv += ["--dataplane-threads", str(cfg.threads)]
        for i, s in enumerate(self.socks):
            argv += ["--listen", str(s), "--backend", str(workdir / f"qsd{i}.sock"), "--name", f"vm{i}"]
        argv += cfg.proxy_args
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        try:
            for s in self.socks:
                wait_listening(s, self.proc, 30, what="the fastshadow proxy")
        except NotListening as e:
            self.stop()
            raise RuntimeError(f"{e}: {log_path.read_text(errors='replace')[-500:]}") from None

    def threads(self) -> int:
        """Data-plane threads, from the proxy's dataplane.started line."""
        import re
        m = re.search(r"dataplane\.started threads=(\d+)", self.log_path.read_text(errors="replace"))
        return int(m.group(1)) if m else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- one point ----------------------------------------------------------------------------------
def drive_all(sessions: list, how: dict, queues: int, cfg: ScaleConfig) -> list:
    """Every session runs 4 KiB random reads at once (`how`: requests or duration); their results."""
    results: list = [None] * len(sessions)
    errors: list[str] = []

    def drive(i: int) -> None:
        try:
            results[i] = sessions[i].run("read", cfg.block_size, cfg.qd, random=True, queues=queues,
                                         seed=i + 1, stall_timeout=cfg.timeout, **how)
        except (LoadGenError, OSError) as e:
            errors.append(f"vm{i}: {type(e).__name__}: {e}")
    ts = [threading.Thread(target=drive, args=(i,), name=f"scale-{i}") for i in range(len(sessions))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return results


def run_point(cfg: ScaleConfig, workdir: Path, devices: int, queues: int, bounce: int, duration: float,
              log: Callable[[str], None], mode: str = "isolated") -> Point:
    """Everything started fresh, D sessions driven at once, everything stopped.  Direct: the
    sessions connect to qsd's exports themselves (no proxy; its figures are 0)."""
    tag = f"{mode}-d{devices}-q{queues}-b{rp.size_label(bounce)}"
    qsd = start_qsd(workdir, devices, queues, workdir / f"qsd-{tag}.log")
    proxy = None
    sessions = []
    none = Memory(0, 0, 0, 0, 0)
    try:
        if mode == "direct":
            socks = [workdir / f"qsd{i}.sock" for i in range(devices)]
            base = none
        else:
            proxy = ScaleProxy(workdir, devices, cfg, bounce, workdir / f"proxy-{tag}.log")
            socks = proxy.socks
            base = proxy_memory(proxy.proc.pid)
        qsize = 256
        while qsize < 3 * cfg.qd:
            qsize *= 2
        for s in socks:
            sessions.append(open_session(str(s), num_queues=queues, queue_size=qsize, max_qd=cfg.qd,
                                         max_block_size=cfg.block_size, timeout=cfg.timeout))
        time.sleep(0.2)            # the last SET_VRING_* reach the data plane
        pid = proxy.proc.pid if proxy is not None else None
        idle = proxy_memory(pid) if pid else none
        # Warm-up, not measured: the first requests fault fresh shadow pages in, in the proxy AND
        # in the backend (its own page tables); with the next-fit allocator of the time, bench
        # --scale measured 7 us of proxy CPU per request then, against 1.2-1.8 steady. The count
        # is still the one that made next-fit walk the whole area, so that runs before and after
        # the LIFO bounce reuse are taken after the same load. idle_trim_ms is long enough that a
        # session done early is not trimmed while the others finish.
        warm = queues * (bounce // (2 * 4096) + cfg.qd) if pid else queues * cfg.qd * 8
        log(f"  warm-up: {warm} requests per device" + (" (first touch of the bounce areas)" if pid else ""))
        drive_all(sessions, dict(requests=warm, duration=None), queues, cfg)
        c0 = (cpu_seconds(pid) if pid else 0.0, cpu_seconds(qsd.pid), self_cpu_seconds())
        results = drive_all(sessions, dict(requests=None, duration=duration), queues, cfg)
        c1 = (cpu_seconds(pid) if pid else 0.0, cpu_seconds(qsd.pid), self_cpu_seconds())
        busy = proxy_memory(pid) if pid else none
        trimmed, seen = wait_trimmed(pid, idle, cfg.idle_trim_ms / 1000 * 4 + 3) if pid else (none, True)
        requests = sum(r.requests for r in results)
        seconds = max(r.seconds for r in results)
        lat = np.concatenate([r.latencies_ns for r in results])
        p50, p99 = (int(x) for x in np.percentile(lat, [50, 99])) if len(lat) else (0, 0)
        proxy_cpu = c1[0] - c0[0]
        return Point(mode=mode, devices=devices, queues=queues, threads=proxy.threads() if proxy else 0, bounce_per_queue=bounce,
                     block_size=cfg.block_size, qd=cfg.qd, duration_s=round(seconds, 4), requests=requests,
                     iops=round(requests / seconds, 1) if seconds else 0.0, lat_p50_ns=p50, lat_p99_ns=p99,
                     proxy_cpu_s=round(proxy_cpu, 3), backend_cpu_s=round(c1[1] - c0[1], 3),
                     loadgen_cpu_s=round(c1[2] - c0[2], 3),
                     proxy_cpu_us_per_request=round(proxy_cpu / requests * 1e6, 3) if requests else 0.0,
                     base=base, idle=idle, busy=busy, trimmed=trimmed, trim_seen=seen)
    finally:
        for s in sessions:
            s.close()
        if proxy is not None:
            proxy.stop()
        qsd.kill()


# ---- the whole run ------------------------------------------------------------------------------
def run_scale(cfg: ScaleConfig, log: Callable[[str], None] = print) -> ScaleResults:
    """The matrix, then the bounce sweep; progress on `log`, results.json (and scale.png) in cfg.out."""
    t0 = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    own = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fsscale-")) if own else cfg.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    modes = ["isolated", "direct"] if cfg.direct else ["isolated"]
    plan = [(m, d, q, cfg.bounce_per_queue, cfg.duration) for d in cfg.devices for q in cfg.queues for m in modes]
    sweep_plan = [("isolated", cfg.sweep_devices, cfg.sweep_queues, b, min(cfg.duration, 0.5))
                  for b in cfg.bounce_sweep]
    res = ScaleResults(schema=SCHEMA_VERSION, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       command=cfg.command, machine=machine_info(),
                       settings={"devices": cfg.devices, "queues": cfg.queues, "duration_s": cfg.duration,
                                 "block_size": cfg.block_size, "qd": cfg.qd, "threads": cfg.threads,
                                 "bounce_per_queue": cfg.bounce_per_queue, "bounce_sweep": cfg.bounce_sweep,
                                 "idle_trim_ms": cfg.idle_trim_ms, "proxy_args": cfg.proxy_args,
                                 "direct": cfg.direct},
                       points=[], sweep=[])
    total = len(plan) + len(sweep_plan)
    res.memcpy = memcpy_baseline(cold_bytes=64 << 20, cold_iters=4, hot_iters=100)
    log(f"memcpy, one core: {res.memcpy.cold_gb_per_s:.1f} GB/s cold, {res.memcpy.hot_gb_per_s:.1f} GB/s hot")
    try:
        for n, (m, d, q, b, dur) in enumerate(plan + sweep_plan, 1):
            what = f"[{n}/{total}] {m}, {d} device(s) x {q} queue(s), bounce {rp.size_label(b)}"
            log(f"{what}: starting ({time.monotonic() - t0:.0f} s so far)")
            try:
                p = run_point(cfg, workdir, d, q, b, dur, log, m)
            except (RuntimeError, LoadGenError, OSError) as e:
                log(f"{what}: FAILED: {e}")
                continue
            (res.points if n <= len(plan) else res.sweep).append(p)
            if m == "direct":
                log(f"{what}: {p.iops / 1e3:.1f}k IOPS, p99 {p.lat_p99_ns / 1e3:.0f} us, backend "
                    f"{backend_us(p):.2f} CPU us/request")
                continue
            log(f"{what}: {p.iops / 1e3:.1f}k IOPS, p99 {p.lat_p99_ns / 1e3:.0f} us, proxy "
                f"{p.proxy_cpu_us_per_request:.2f} CPU us/request on {p.threads} thread(s), RSS/device idle "
                f"{per_device(p, 'idle', 'rss') / 1024:.0f} KiB, shadow/device busy "
                f"{per_device(p, 'busy', 'shadow_resident') / 1024:.0f} KiB, trimmed "
                f"{per_device(p, 'trimmed', 'shadow_resident') / 1024:.0f} KiB")
    finally:
        if own and not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory (logs): {workdir}")
    if cfg.plots:
        res.plots = write_plot(res, cfg.out, log)
    res.wall_s = round(time.monotonic() - t0, 1)
    (cfg.out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(res), indent=1) + b"\n")
    return res


# ---- report -------------------------------------------------------------------------------------
def per_device(p: Point, moment: str, what: str) -> float:
    """Bytes per device at `moment` above the proxy with no session (shadow: the whole of it)."""
    m: Memory = getattr(p, moment)
    if what == "shadow_resident":
        return m.shadow_resident / p.devices
    return (getattr(m, what) - getattr(p.base, what)) / p.devices


def backend_us(p: Point) -> float:
    """qemu-storage-daemon's CPU µs per request over the run."""
    return p.backend_cpu_s / p.requests * 1e6 if p.requests else 0.0


def _kib(x: float) -> str:
    return f"{x / 1024:.0f}"


def markdown(res: ScaleResults) -> str:
    """The scale table and the bounce sweep table, as bench/RESULTS.md quotes them."""
    direct = {(p.devices, p.queues): p for p in res.points if p.mode == "direct"}
    lines = ["| devices | queues | threads | IOPS | direct IOPS | proxy CPU µs/request | backend CPU µs/request "
             "| p50 µs | p99 µs | RSS/device idle KiB "
             "| anon/device idle KiB | shadow/device idle KiB | shadow/device busy KiB | shadow/device trimmed KiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in (p for p in res.points if p.mode == "isolated"):
        d = direct.get((p.devices, p.queues))
        lines.append(f"| {p.devices} | {p.queues} | {p.threads} | {p.iops / 1e3:.1f}k | "
                     f"{f'{d.iops / 1e3:.1f}k' if d else '-'} | "
                     f"{p.proxy_cpu_us_per_request:.2f} | {backend_us(p):.2f} | {p.lat_p50_ns / 1e3:.0f} | "
                     f"{p.lat_p99_ns / 1e3:.0f} | "
                     f"{_kib(per_device(p, 'idle', 'rss'))} | {_kib(per_device(p, 'idle', 'rss_anon'))} | "
                     f"{_kib(per_device(p, 'idle', 'shadow_resident'))} | "
                     f"{_kib(per_device(p, 'busy', 'shadow_resident'))} | "
                     f"{_kib(per_device(p, 'trimmed', 'shadow_resident'))} |")
    lines += ["", "| bounce per queue | devices x queues | shadow size/device MiB | RSS/device idle KiB | "
                  "shadow/device idle KiB | shadow/device busy KiB | shadow/device trimmed KiB |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res.sweep:
        lines.append(f"| {rp.size_label(p.bounce_per_queue)} | {p.devices} x {p.queues} | "
                     f"{p.idle.shadow_size / p.devices / (1 << 20):.0f} | {_kib(per_device(p, 'idle', 'rss'))} | "
                     f"{_kib(per_device(p, 'idle', 'shadow_resident'))} | "
                     f"{_kib(per_device(p, 'busy', 'shadow_resident'))} | "
                     f"{_kib(per_device(p, 'trimmed', 'shadow_resident'))} |")
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else 0.0


def projection(res: ScaleResults, cores: int = 64, vms: int = 100, queues: int = 4,
               dataplane_cores: int = 16) -> str:
    """Part 4 of issue 12, on paper: this run's per-request costs and per-device memory applied
    to a `cores`-core host with `vms` VMs of `queues` queues each (bench/RESULTS.md quotes it)."""
    iso = [p for p in res.points if p.mode == "isolated"]
    many = [p for p in iso if p.devices >= 8] or iso
    cpu = _median([p.proxy_cpu_us_per_request for p in many])
    backend = _median([backend_us(p) for p in many])
    top = max(iso, key=lambda p: (p.devices, p.queues))
    rss = per_device(top, "idle", "rss") / (1 << 20)
    ring = top.idle.shadow_resident / (top.devices * top.queues) / 1024
    busy_q = top.busy.shadow_resident / (top.devices * top.queues) / (1 << 20)
    per_core = 1 / cpu                                   # M requests/s of one data-plane thread
    total = dataplane_cores * per_core
    idle_mib = vms * (rss + queues * ring / 1024)
    busy_gib = vms * queues * busy_q / 1024
    cold = res.memcpy.cold_gb_per_s if res.memcpy else 0.0
    than = "more" if backend > cpu else "less"
    return (
        f"**{cores} cores, {vms} VMs of {queues} queues, on paper** (from `bench/results/scale/results.json`). "
        f"The proxy spends {cpu:.2f} µs of CPU per 4 KiB request (median of the {len(many)} points with 8 or "
        f"more devices), the backend {backend:.2f} µs: each million requests per second costs {cpu:.2f} cores "
        f"of fastshadow on top of the backend's {backend:.2f}. A data-plane thread shares nothing with the "
        f"others, so one carries at most {per_core * 1000:.0f}k requests/s and {dataplane_cores} of the "
        f"{cores} cores {total:.1f}M/s, {total * 1000 / vms:.0f}k per VM when all {vms} are busy; one VM's "
        f"queues are all on one thread, so a single VM tops out at {per_core * 1000:.0f}k/s. Memory: an idle "
        f"device costs {rss:.2f} MiB of proxy RSS (averaged over the {top.devices} devices of the largest point: "
        f"the control plane's session) and {ring:.0f} KiB of shadow (the rings) per queue whatever --bounce-per-queue is: "
        f"{idle_mib:.0f} MiB for {vms} idle VMs. A busy queue holds {busy_q:.1f} MiB of shadow (the slabs of its "
        f"requests in flight: freed bounce runs are reused last in, first out), {busy_gib:.1f} GiB if all {vms * queues} queues are busy "
        f"at once, given back --idle-trim-ms after each goes idle ({res.settings['idle_trim_ms']} ms in this "
        f"run). What bounds it then: the backend's {backend:.2f} µs per request ({than} than the proxy's), "
        f"the copies at large blocks (every byte crosses memory twice; one core copied {cold:.1f} GB/s cold "
        f"at this run's start, and {dataplane_cores} cores copying at once share the socket's memory "
        f"bandwidth, not {dataplane_cores}x that). The proxy's CPU per request includes its busy-poll spin "
        f"(--busy-poll-us), which a data-plane thread with more work than one CPU no longer spends: the "
        f"per-thread ceiling above is a floor.")


def write_plot(res: ScaleResults, out: Path, log: Callable[[str], None] = print) -> list[str]:
    """scale.png: IOPS, CPU per request, p99 and memory per device against the number of devices."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: matplotlib is not installed (pip install 'fastshadow[plot]')")
        return []
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (ax[0][0], "aggregate IOPS (k)", lambda p: p.iops / 1e3),
        (ax[0][1], "proxy CPU per request (µs)", lambda p: p.proxy_cpu_us_per_request),
        (ax[1][0], "p99 latency (µs)", lambda p: p.lat_p99_ns / 1e3),
        (ax[1][1], "memory per device (KiB, log): RSS idle —, shadow busy --, trimmed :",
         lambda p: per_device(p, "idle", "rss") / 1024),
    ]
    for k, q in enumerate(sorted({p.queues for p in res.points})):
        color = f"C{k}"
        pts = sorted((p for p in res.points if p.queues == q and p.mode == "isolated"), key=lambda p: p.devices)
        xs = [p.devices for p in pts]
        for a, title, fn in panels:
            a.plot(xs, [fn(p) for p in pts], marker="o", color=color, label=f"{q} queue(s)")
        dpts = sorted((p for p in res.points if p.queues == q and p.mode == "direct"), key=lambda p: p.devices)
        if dpts:
            ax[0][0].plot([p.devices for p in dpts], [p.iops / 1e3 for p in dpts], marker=".", linestyle=":",
                          color=color, label=f"{q} queue(s), direct (no proxy)")
        ax[1][1].plot(xs, [per_device(p, "busy", "shadow_resident") / 1024 for p in pts], marker="x",
                      linestyle="--", color=color, label=f"{q} queue(s), shadow busy")
        ax[1][1].plot(xs, [per_device(p, "trimmed", "shadow_resident") / 1024 for p in pts], marker="+",
                      linestyle=":", color=color, label=f"{q} queue(s), shadow after idle trim")
    ax[1][1].set_yscale("log")
    for a, title, _ in panels:
        a.set_xscale("log", base=2)
        a.set_xlabel("devices in one proxy")
        a.set_title(title, fontsize=10)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"fastshadow isolated, 4 KiB randread QD{res.settings['qd']} per queue, null-co backend "
                 f"({res.machine.nproc} CPUs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=90)
    plt.close(fig)
    return ["scale.png"]


def read_json(path: Path) -> ScaleResults:
    return msgspec.json.decode(Path(path).read_bytes(), type=ScaleResults)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fastshadow.bench.scale",
                                 description="print (and re-plot) a scale results.json")
    ap.add_argument("results", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print the Markdown tables (as bench/RESULTS.md)")
    ap.add_argument("--plot", action="store_true", help="rewrite scale.png next to results.json")
    args = ap.parse_args(argv)
    res = rp.read_or_say(read_json, args.results, ap.prog, "`fastshadow bench --scale`",
                         lambda path: "; python -m fastshadow.bench.report reads the others")
    if res is None:
        return 2
    print(markdown(res))
    if args.markdown:
        print()
        print(projection(res))
    if args.plot:
        write_plot(res, args.results.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
