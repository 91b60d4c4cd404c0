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
from .runner import cpu_seconds, machine_info, open_session, self_cpu_seconds

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
    bounce_sweep: list[int] = field(default_factory=lambda: [4 << 20, 16 << 20, 64 << 20])
    sweep_devices: int = 8
    sweep_queues: int = 4
    idle_trim_ms: int = 300
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
        argv = [sys.executable, "-m", "fastshadow.cli", "proxy", "--allow-shared-uid",
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
def run_point(cfg: ScaleConfig, workdir: Path, devices: int, queues: int, bounce: int, duration: float,
              log: Callable[[str], None]) -> Point:
    """Everything started fresh, D sessions driven at once, everything stopped."""
    tag = f"d{devices}-q{queues}-b{rp.size_label(bounce)}"
    qsd = start_qsd(workdir, devices, queues, workdir / f"qsd-{tag}.log")
    proxy = None
    sessions = []
    try:
        proxy = ScaleProxy(workdir, devices, cfg, bounce, workdir / f"proxy-{tag}.log")
        base = proxy_memory(proxy.proc.pid)
        qsize = 256
        while qsize < 3 * cfg.qd:
            qsize *= 2
        for s in proxy.socks:
            sessions.append(open_session(str(s), num_queues=queues, queue_size=qsize, max_qd=cfg.qd,
                                         max_block_size=cfg.block_size, timeout=cfg.timeout))
        time.sleep(0.2)            # the last SET_VRING_* reach the data plane
        idle = proxy_memory(proxy.proc.pid)
        results: list = [None] * devices
        errors: list[str] = []

        def drive(i: int) -> None:
            try:
                results[i] = sessions[i].run("read", cfg.block_size, cfg.qd, random=True, queues=queues,
                                             duration=duration, seed=i + 1, stall_timeout=cfg.timeout)
            except (LoadGenError, OSError) as e:
                errors.append(f"vm{i}: {type(e).__name__}: {e}")
        c0 = (cpu_seconds(proxy.proc.pid), cpu_seconds(qsd.pid), self_cpu_seconds())
        ts = [threading.Thread(target=drive, args=(i,), name=f"scale-{i}") for i in range(devices)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        c1 = (cpu_seconds(proxy.proc.pid), cpu_seconds(qsd.pid), self_cpu_seconds())
        if errors:
            raise RuntimeError("; ".join(errors[:3]))
        busy = proxy_memory(proxy.proc.pid)
        trimmed, seen = wait_trimmed(proxy.proc.pid, idle, cfg.idle_trim_ms / 1000 * 4 + 3)
        requests = sum(r.requests for r in results)
        seconds = max(r.seconds for r in results)
        lat = np.concatenate([r.latencies_ns for r in results])
        p50, p99 = (int(x) for x in np.percentile(lat, [50, 99])) if len(lat) else (0, 0)
        proxy_cpu = c1[0] - c0[0]
        return Point(devices=devices, queues=queues, threads=proxy.threads(), bounce_per_queue=bounce,
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
    plan = [(d, q, cfg.bounce_per_queue, cfg.duration) for d in cfg.devices for q in cfg.queues]
    sweep_plan = [(cfg.sweep_devices, cfg.sweep_queues, b, min(cfg.duration, 0.5)) for b in cfg.bounce_sweep]
    res = ScaleResults(schema=SCHEMA_VERSION, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       command=cfg.command, machine=machine_info(),
                       settings={"devices": cfg.devices, "queues": cfg.queues, "duration_s": cfg.duration,
                                 "block_size": cfg.block_size, "qd": cfg.qd, "threads": cfg.threads,
                                 "bounce_per_queue": cfg.bounce_per_queue, "bounce_sweep": cfg.bounce_sweep,
                                 "idle_trim_ms": cfg.idle_trim_ms, "proxy_args": cfg.proxy_args},
                       points=[], sweep=[])
    total = len(plan) + len(sweep_plan)
    try:
        for n, (d, q, b, dur) in enumerate(plan + sweep_plan, 1):
            what = f"[{n}/{total}] {d} device(s) x {q} queue(s), bounce {rp.size_label(b)}"
            log(f"{what}: starting ({time.monotonic() - t0:.0f} s so far)")
            try:
                p = run_point(cfg, workdir, d, q, b, dur, log)
            except (RuntimeError, LoadGenError, OSError) as e:
                log(f"{what}: FAILED: {e}")
                continue
            (res.points if n <= len(plan) else res.sweep).append(p)
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


def _kib(x: float) -> str:
    return f"{x / 1024:.0f}"


def markdown(res: ScaleResults) -> str:
    """The scale table and the bounce sweep table, as bench/RESULTS.md quotes them."""
    lines = ["| devices | queues | threads | IOPS | proxy CPU µs/request | p50 µs | p99 µs | RSS/device idle KiB "
             "| anon/device idle KiB | shadow/device idle KiB | shadow/device busy KiB | shadow/device trimmed KiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res.points:
        lines.append(f"| {p.devices} | {p.queues} | {p.threads} | {p.iops / 1e3:.1f}k | "
                     f"{p.proxy_cpu_us_per_request:.2f} | {p.lat_p50_ns / 1e3:.0f} | {p.lat_p99_ns / 1e3:.0f} | "
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
        (ax[1][1], "memory per device (KiB): RSS idle —, shadow busy --",
         lambda p: per_device(p, "idle", "rss") / 1024),
    ]
    for q in sorted({p.queues for p in res.points}):
        pts = sorted((p for p in res.points if p.queues == q), key=lambda p: p.devices)
        xs = [p.devices for p in pts]
        for a, title, fn in panels:
            a.plot(xs, [fn(p) for p in pts], marker="o", label=f"{q} queue(s)")
        ax[1][1].plot(xs, [per_device(p, "busy", "shadow_resident") / 1024 for p in pts], marker="x",
                      linestyle="--", label=f"{q} queue(s), shadow busy")
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
    res = read_json(args.results)
    print(markdown(res))
    if args.plot:
        write_plot(res, args.results.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
