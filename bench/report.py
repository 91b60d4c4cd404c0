"""Benchmark results: the JSON schema (msgspec Structs), the summary and ratio
computations, the printed table, and the PNG plots (matplotlib, Agg backend).

Everything the plots and the table show is in results.json, so they can be
made again from it alone::

    python -m fastshadow.bench.report out/bench/results.json           # print the table
    python -m fastshadow.bench.report out/bench/results.json --plots   # and rewrite the PNGs next to it
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import msgspec

from . import MODES

SCHEMA_VERSION = 1
#: Quantile levels of the stored latency CDFs (dense in the tail).
CDF_LEVELS = ([i / 200 for i in range(200)] + [0.995, 0.9975, 0.999, 0.9995, 0.9999, 1.0])


# ---- schema -------------------------------------------------------------------------------------
class Workload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rw: str          # "randread", "read" (sequential), "randwrite", "write"
    bs: int          # bytes per request
    qd: int          # requests in flight per queue
    queues: int = 1

    @property
    def is_read(self) -> bool:
        return self.rw.endswith("read")

    @property
    def is_random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def label(self) -> str:
        q = f" q{self.queues}" if self.queues != 1 else ""
        return f"{size_label(self.bs)} {self.rw} qd{self.qd}{q}"


class Machine(msgspec.Struct):
    hostname: str
    nproc: int
    kernel: str
    cpu_model: str
    mem_total_bytes: int
    python: str
    qemu_storage_daemon: str
    fastshadow: str
    #: Median round trip (µs) of two threads on CPUs 0 and 1 waking each other through eventfds
    #: (runner.wake_round_trip_us): what one sleep/wake-up costs on this host. It differs by
    #: host far more than anything fastshadow changes (13 µs and 100 µs on two days of the same
    #: VM type), so runs of different days compare only through it. None: one CPU, or not measured.
    wake_rtt_us: float | None = None
    #: What an idle CPU of this (virtual) machine does (runner.idle_policy): the cpuidle governor
    #: and, with the haltpoll driver of a KVM guest, the most an idle vCPU polls before it halts
    #: (haltpoll.guest_halt_poll_ns; the haltpoll governor's, ignored by the others; each vCPU's
    #: window adapts below it). It sets wake_rtt_us: on the 2-vCPU test VM, 0 ns (its
    #: boot setting) gave a ~95 µs round trip and 200000 ns (the driver's default) ~8 µs, and
    #: direct mode's 4 KiB QD32 IOPS moved by up to 1.8x with it. None: not known here.
    cpuidle_governor: str | None = None
    guest_halt_poll_ns: int | None = None


class Memcpy(msgspec.Struct):
    """Single-core memcpy bandwidth (GB/s = 10^9 bytes/s), median of the timed copies."""
    cold_gb_per_s: float
    cold_bytes: int        # each buffer; larger than the caches
    hot_gb_per_s: float
    hot_bytes: int         # each buffer; stays in cache
    iterations_cold: int
    iterations_hot: int


class Cpu(msgspec.Struct):
    """CPU seconds (user + system) each process spent during the run."""
    loadgen: float             # this process (the driver threads + Python), getrusage
    backend: float             # qemu-storage-daemon, /proc/PID/stat
    proxy: float | None = None  # fastshadow proxy, /proc/PID/stat; None in direct mode
    #: Busy CPU seconds of the whole machine (/proc/stat) minus the three above: anything else
    #: that ran meanwhile (other people's work, kernel threads). Large values mean a noisy run.
    #: None: not measured.
    other: float | None = None
    #: Time the hypervisor ran something else on our vCPUs (/proc/stat steal), all CPUs.
    steal: float | None = None

    @property
    def total(self) -> float:
        return self.loadgen + self.backend + (self.proxy or 0.0)

    def noisy(self, duration_s: float) -> bool:
        """True if a run of `duration_s` seconds shared the machine: other work took more than
        10 % of a CPU, or the hypervisor stole more than 5 % of one (other VMs on the host)."""
        return (self.other or 0) > 0.1 * duration_s or (self.steal or 0) > 0.05 * duration_s


class Run(msgspec.Struct):
    index: int
    rep: int
    mode: str
    backend: str
    workload: Workload
    requests: int
    duration_s: float          # first submit to last completion
    iops: float
    mb_per_s: float            # 10^6 bytes/s
    lat_p50_ns: int
    lat_p99_ns: int
    lat_p999_ns: int
    lat_mean_ns: int
    lat_min_ns: int
    lat_max_ns: int
    cpu_s: Cpu
    cpu_us_per_request: float  # all three processes' CPU / requests
    kicks: int                 # kick eventfd writes by the driver
    sleeps: int                # times the driver slept waiting for a call
    wakeups: int               # call eventfd reads that returned a count


class Skip(msgspec.Struct):
    """A mode skipped on a backend (workload None), or one failed run (workload set)."""
    backend: str
    mode: str
    reason: str
    workload: Workload | None = None  # None: the whole mode was skipped on this backend


class Summary(msgspec.Struct):
    """Median over the repetitions of one (backend, workload, mode)."""
    backend: str
    workload: Workload
    mode: str
    reps: int
    iops: float
    mb_per_s: float
    lat_p50_ns: int
    lat_p99_ns: int
    lat_p999_ns: int
    cpu_loadgen_s: float
    cpu_backend_s: float
    cpu_proxy_s: float | None
    cpu_us_per_request: float
    cpu_other_s: float | None = None  # median of the runs' Cpu.other: how busy the rest of the machine was


class Ratio(msgspec.Struct):
    """mode / baseline of the medians (iops and mb_per_s > 1: faster; latency and CPU > 1: costlier)."""
    backend: str
    workload: Workload
    mode: str
    baseline: str
    iops: float
    mb_per_s: float
    lat_p50: float
    lat_p99: float
    lat_p999: float
    cpu_per_request: float


class Cdf(msgspec.Struct):
    """Latency quantiles of every request of a QD1 workload, all repetitions pooled:
    latency_ns[i] is the quantile at Results.cdf_levels[i]."""
    backend: str
    workload: Workload
    mode: str
    samples: int
    latency_ns: list[int]


class Settings(msgspec.Struct):
    preset: str
    modes: list[str]
    backends: list[str]
    duration_s: float | None
    requests: int | None
    reps: int
    queue_size: int
    event_idx: bool
    busy_poll_us: int
    loadgen_threads: str
    proxy_args: list[str]
    file_size: int
    null_size: int
    pin: str                   # "split": loadgen on CPU 0, backend and proxy on the others; "split-free-proxy"
                               # (the proxy on any CPU); "own" (loadgen CPU 0, backend CPU 1, proxy the
                               # rest); "none" (the scheduler decides)
    workloads: list[Workload]
    variants: dict[str, list[str]] = {}   # extra isolated modes: name -> proxy arguments
    traced: dict[str, list[str]] = {}     # of which traced: name -> `fastshadow trace` arguments
    retry_noisy: int = 0                  # a noisy run was run again at most this often (Cpu.noisy)


class Results(msgspec.Struct):
    schema: int
    created: str
    command: str
    settings: Settings
    machine: Machine
    memcpy: Memcpy
    runs: list[Run]
    skipped: list[Skip]
    summary: list[Summary]
    ratios: list[Ratio]
    cdf_levels: list[float]
    cdfs: list[Cdf]
    wall_s: float
    plots: list[str] = []


# ---- helpers ------------------------------------------------------------------------------------
def size_label(n: int) -> str:
    for unit, div in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def summarize(runs: list[Run]) -> list[Summary]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.backend, r.workload, r.mode), []).append(r)
    out = []
    for (backend, wl, mode), rs in groups.items():
        proxy = [r.cpu_s.proxy for r in rs if r.cpu_s.proxy is not None]
        out.append(Summary(
            backend=backend, workload=wl, mode=mode, reps=len(rs),
            iops=round(_median(r.iops for r in rs), 1), mb_per_s=round(_median(r.mb_per_s for r in rs), 2),
            lat_p50_ns=int(_median(r.lat_p50_ns for r in rs)), lat_p99_ns=int(_median(r.lat_p99_ns for r in rs)),
            lat_p999_ns=int(_median(r.lat_p999_ns for r in rs)),
            cpu_loadgen_s=round(_median(r.cpu_s.loadgen for r in rs), 4),
            cpu_backend_s=round(_median(r.cpu_s.backend for r in rs), 4),
            cpu_proxy_s=round(_median(proxy), 4) if proxy else None,
            cpu_us_per_request=round(_median(r.cpu_us_per_request for r in rs), 3),
            cpu_other_s=round(_median(r.cpu_s.other for r in rs if r.cpu_s.other is not None), 3)
            if any(r.cpu_s.other is not None for r in rs) else None))
    return out


def ratios(summary: list[Summary], baseline: str = "direct") -> list[Ratio]:
    base = {(s.backend, s.workload): s for s in summary if s.mode == baseline}
    out = []

    def div(a: float, b: float) -> float:
        return round(a / b, 4) if b else math.nan

    for s in summary:
        b = base.get((s.backend, s.workload))
        if s.mode == baseline or b is None:
            continue
        out.append(Ratio(backend=s.backend, workload=s.workload, mode=s.mode, baseline=baseline,
                         iops=div(s.iops, b.iops), mb_per_s=div(s.mb_per_s, b.mb_per_s),
                         lat_p50=div(s.lat_p50_ns, b.lat_p50_ns), lat_p99=div(s.lat_p99_ns, b.lat_p99_ns),
                         lat_p999=div(s.lat_p999_ns, b.lat_p999_ns),
                         cpu_per_request=div(s.cpu_us_per_request, b.cpu_us_per_request)))
    return out


def _mode_order(mode: str) -> int:
    return MODES.index(mode) if mode in MODES else len(MODES)


def _workload_order(wl: Workload) -> tuple:
    return (not wl.is_read, wl.qd != 1, wl.queues, wl.bs, wl.qd, wl.rw)


# ---- JSON ---------------------------------------------------------------------------------------
def write_json(results: Results, path: Path) -> None:
    data = msgspec.json.format(msgspec.json.encode(results), indent=1)
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_bytes(data + b"\n")
    tmp.replace(path)


def read_json(path: Path) -> Results:
    return msgspec.json.decode(Path(path).read_bytes(), type=Results)


# ---- geometric means of the ratios ----------------------------------------------------------------
class Overall(msgspec.Struct):
    backend: str
    mode: str
    workloads: int
    iops: float            # geometric means of the per-workload ratios to direct
    lat_p50: float
    lat_p99: float
    cpu_per_request: float
    iops_min: float
    iops_max: float


def overall(results: Results) -> list[Overall]:
    out = []

    def gmean(xs: list[float]) -> float:
        xs = [x for x in xs if x > 0 and not math.isnan(x)]
        return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 3) if xs else math.nan

    keys = sorted({(r.backend, r.mode) for r in results.ratios}, key=lambda k: (k[0] != "null", k[0],
                                                                                 _mode_order(k[1])))
    for backend, mode in keys:
        rs = [r for r in results.ratios if r.backend == backend and r.mode == mode]
        out.append(Overall(backend, mode, len(rs), gmean([r.iops for r in rs]), gmean([r.lat_p50 for r in rs]),
                           gmean([r.lat_p99 for r in rs]), gmean([r.cpu_per_request for r in rs]),
                           min(r.iops for r in rs), max(r.iops for r in rs)))
    return out


# ---- variants against isolated ------------------------------------------------------------------
class VariantRatio(msgspec.Struct):
    """A --variant or --traced mode against `isolated` on the same backend and workload, same run."""

    backend: str
    workload: Workload
    mode: str
    traced: bool
    reps: int
    iops: float            # median IOPS of the mode / median IOPS of isolated
    iops_rep_min: float    # the same ratio rep by rep (the modes of a rep run back to back)
    iops_rep_max: float
    cpu_per_request: float  # CPU µs per request (loadgen + proxy + backend), mode / isolated (medians)
    proxy_cpu_per_request: float = math.nan  # the proxy's CPU µs per request alone, mode / isolated (medians)


def _divide(a: float, b: float) -> float:
    """a / b; NaN (printed as nan) where b measured nothing: a short run's CPU time can be
    0 ticks (/proc counts in 10 ms steps)."""
    return a / b if b else math.nan


def variant_ratios(results: Results) -> list[VariantRatio]:
    s = results.settings
    runs: dict[tuple, dict[int, Run]] = {}
    for r in results.runs:
        runs.setdefault((r.backend, r.workload, r.mode), {})[r.rep] = r
    out = []
    for (backend, wl, mode), by_rep in sorted(runs.items(), key=lambda kv: (kv[0][0], _workload_order(kv[0][1]),
                                                                             kv[0][2])):
        base = runs.get((backend, wl, "isolated"))
        if mode not in s.variants or not base:
            continue
        paired = [by_rep[k].iops / base[k].iops for k in by_rep if k in base and base[k].iops]
        if not paired:
            continue
        med = _median(r.iops for r in by_rep.values()) / _median(r.iops for r in base.values())
        cpu = _divide(_median(r.cpu_us_per_request for r in by_rep.values()),
                      _median(r.cpu_us_per_request for r in base.values()))
        pcpu = _divide(_median(proxy_us_per_request(r) for r in by_rep.values()),
                       _median(proxy_us_per_request(r) for r in base.values()))
        out.append(VariantRatio(backend, wl, mode, mode in s.traced, len(paired), round(med, 4),
                                round(min(paired), 4), round(max(paired), 4), round(cpu, 4), round(pcpu, 4)))
    return out


def proxy_us_per_request(r: Run) -> float:
    """The proxy's own CPU µs per request of one run (all its threads; 10 ms ticks)."""
    return (r.cpu_s.proxy or 0.0) / r.requests * 1e6 if r.requests else math.nan


def _variant_what(s: Settings, mode: str) -> str:
    if mode in s.traced:
        return "isolated + `fastshadow trace --quiet" + "".join(f" {a}" for a in s.traced[mode]) + "`"
    return "isolated " + " ".join(s.variants[mode])


# ---- table --------------------------------------------------------------------------------------
def _us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def _ratio(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.2f}"


def idle_label(mach: Machine) -> str:
    """", idle: haltpoll, polls up to 200 us before halting" for the machine line ("" when
    unknown). guest_halt_poll_ns is the haltpoll governor's: other governors ignore it."""
    if mach.cpuidle_governor is None:
        return ""
    poll = ""
    if mach.cpuidle_governor == "haltpoll" and mach.guest_halt_poll_ns is not None:
        poll = (f", polls up to {mach.guest_halt_poll_ns / 1000:.0f} us before halting" if mach.guest_halt_poll_ns
                else ", halts at once (guest_halt_poll_ns 0)")
    return f", idle: {mach.cpuidle_governor}{poll}"


def table(results: Results) -> str:
    """The table people read: medians per backend, workload and mode, with ratios to direct."""
    lines = []
    m = results.memcpy
    mach = results.machine
    lines.append(f"machine: {mach.cpu_model}, {mach.nproc} CPUs, kernel {mach.kernel}"
                 + (f", cross-CPU wake-up round trip {mach.wake_rtt_us:.1f} us" if mach.wake_rtt_us else "")
                 + idle_label(mach))
    if m.cold_bytes:
        lines.append(f"memcpy, one core: {m.cold_gb_per_s:.1f} GB/s cold ({size_label(m.cold_bytes)} buffers), "
                     f"{m.hot_gb_per_s:.1f} GB/s hot ({size_label(m.hot_bytes)})")
    s = results.settings
    what = f"{s.duration_s:g} s" if s.duration_s else f"{s.requests} requests"
    lines.append(f"{s.preset} preset, {what} per run, {s.reps} rep{'s' if s.reps != 1 else ''}, pinning {s.pin}, "
                 f"event idx {'on' if s.event_idx else 'off'}"
                 + (f", proxy args {' '.join(s.proxy_args)}" if s.proxy_args else "")
                 + "".join(f", variant {k}: {_variant_what(s, k)}" for k in s.variants))
    rat = {(r.backend, r.workload, r.mode): r for r in results.ratios}
    hdr = (f"{'workload':<22} {'mode':<13} {'kIOPS':>8} {'MB/s':>8} {'p50 us':>8} {'p99 us':>8} "
           f"{'p99.9 us':>9} {'CPU s lg/px/be':>16} {'CPU us/IO':>9} {'IOPS x':>7} {'p99 x':>6} {'CPU/IO x':>8}")
    backends = sorted({s.backend for s in results.summary}, key=lambda b: (b != "null", b))
    for backend in backends:
        rows = [s for s in results.summary if s.backend == backend]
        reps = max((s.reps for s in rows), default=0)
        lines.append("")
        lines.append(f"backend {backend} (median of {reps} rep{'s' if reps != 1 else ''}; "
                     f"x = ratio to direct; CPU s: loadgen/proxy/backend)")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for wl in sorted({s.workload for s in rows}, key=_workload_order):
            first = True
            for s in sorted((s for s in rows if s.workload == wl), key=lambda s: _mode_order(s.mode)):
                r = rat.get((backend, wl, s.mode))
                px = "-" if s.cpu_proxy_s is None else f"{s.cpu_proxy_s:.2f}"
                cpu = f"{s.cpu_loadgen_s:.2f}/{px}/{s.cpu_backend_s:.2f}"
                lines.append(
                    f"{wl.label if first else '':<22} {s.mode:<13} {s.iops / 1000:>8.1f} {s.mb_per_s:>8.1f} "
                    f"{_us(s.lat_p50_ns):>8} {_us(s.lat_p99_ns):>8} {_us(s.lat_p999_ns):>9} {cpu:>16} "
                    f"{s.cpu_us_per_request:>9.2f} {_ratio(r.iops if r else None):>7} "
                    f"{_ratio(r.lat_p99 if r else None):>6} {_ratio(r.cpu_per_request if r else None):>8}")
                first = False
    ov = overall(results)
    if ov:
        lines.append("")
        lines.append("geometric mean over the workloads of the ratios to direct:")
        for o in ov:
            lines.append(f"  {o.backend:<5} {o.mode:<13} IOPS x {o.iops:.2f} (range {o.iops_min:.2f}-{o.iops_max:.2f}), "
                         f"p50 x {o.lat_p50:.2f}, p99 x {o.lat_p99:.2f}, CPU/IO x {o.cpu_per_request:.2f} "
                         f"({o.workloads} workloads)")
    vr = variant_ratios(results)
    if vr:
        lines.append("")
        lines.append("variants against isolated (same run; IOPS x: ratio of the medians, per rep: rep by rep):")
        for v in vr:
            lines.append(f"  {v.backend:<5} {v.workload.label:<18} {v.mode:<12} IOPS x {v.iops:.3f} "
                         f"(per rep {v.iops_rep_min:.3f}-{v.iops_rep_max:.3f}, {v.reps} reps), "
                         f"CPU/IO x {v.cpu_per_request:.3f}, proxy CPU/IO x {v.proxy_cpu_per_request:.3f}  "
                         f"[{_variant_what(results.settings, v.mode)}]")
    noisy = [r for r in results.runs if r.cpu_s.noisy(r.duration_s)]
    if noisy:
        lines.append("")
        lines.append(f"warning: {len(noisy)} of {len(results.runs)} runs shared the machine with other work "
                     f"(other busy CPU > 10 % of a CPU, or steal > 5 %): their numbers are noisier")
    if results.skipped:
        lines.append("")
        for sk in results.skipped:
            if sk.workload is None:
                lines.append(f"skipped: {sk.mode} on {sk.backend}: {sk.reason}")
            else:
                lines.append(f"failed run: {sk.mode} on {sk.backend}, {sk.workload.label}: {sk.reason}")
    return "\n".join(lines)


def markdown_table(results: Results) -> str:
    """The same medians as a Markdown table (for RESULTS.md)."""
    rat = {(r.backend, r.workload, r.mode): r for r in results.ratios}
    out = []
    ov = overall(results)
    if ov:
        out.append("\n#### geometric means of the ratios to direct\n")
        out.append("| backend | mode | workloads | IOPS × | p50 × | p99 × | CPU/IO × | IOPS × range |")
        out.append("|---|---|--:|--:|--:|--:|--:|--:|")
        for o in ov:
            out.append(f"| {o.backend} | {o.mode} | {o.workloads} | {o.iops:.2f} | {o.lat_p50:.2f} | {o.lat_p99:.2f} | "
                       f"{o.cpu_per_request:.2f} | {o.iops_min:.2f} – {o.iops_max:.2f} |")
    vr = variant_ratios(results)
    if vr:
        out.append("\n#### variants against isolated (same run)\n")
        out.append("| backend | workload | mode | what | reps | IOPS × isolated | per rep | CPU/IO × isolated "
                   "| proxy CPU/IO × isolated |")
        out.append("|---|---|---|---|--:|--:|--:|--:|--:|")
        for v in vr:
            out.append(f"| {v.backend} | {v.workload.label} | {v.mode} | {_variant_what(results.settings, v.mode)} | "
                       f"{v.reps} | {v.iops:.3f} | {v.iops_rep_min:.3f} – {v.iops_rep_max:.3f} | "
                       f"{v.cpu_per_request:.3f} | {v.proxy_cpu_per_request:.3f} |")
    backends = sorted({s.backend for s in results.summary}, key=lambda b: (b != "null", b))
    for backend in backends:
        rows = [s for s in results.summary if s.backend == backend]
        out.append(f"\n#### backend `{backend}`\n")
        out.append("| workload | mode | kIOPS | MB/s | p50 µs | p99 µs | p99.9 µs | CPU s loadgen/proxy/backend "
                   "| CPU µs/IO | IOPS × | p99 × | CPU/IO × |")
        out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for wl in sorted({s.workload for s in rows}, key=_workload_order):
            for s in sorted((s for s in rows if s.workload == wl), key=lambda s: _mode_order(s.mode)):
                r = rat.get((backend, wl, s.mode))
                px = "–" if s.cpu_proxy_s is None else f"{s.cpu_proxy_s:.2f}"
                out.append(
                    f"| {wl.label} | {s.mode} | {s.iops / 1000:.1f} | {s.mb_per_s:.1f} | {_us(s.lat_p50_ns)} | "
                    f"{_us(s.lat_p99_ns)} | {_us(s.lat_p999_ns)} | {s.cpu_loadgen_s:.2f} / {px} / "
                    f"{s.cpu_backend_s:.2f} | {s.cpu_us_per_request:.2f} | {_ratio(r.iops if r else None)} | "
                    f"{_ratio(r.lat_p99 if r else None)} | {_ratio(r.cpu_per_request if r else None)} |")
    return "\n".join(out)


# ---- plots --------------------------------------------------------------------------------------
MODE_COLORS = {"direct": "#4c72b0", "proxy-direct": "#55a868", "isolated": "#c44e52"}


def _panel_key(wl: Workload) -> tuple:
    return ("read" if wl.is_read else "write", "QD1" if wl.qd == 1 else "QD>1", wl.queues)


def plot_throughput(results: Results, backend: str, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results.runs if r.backend == backend]
    if not runs:
        return None
    modes = sorted({r.mode for r in runs}, key=_mode_order)
    panels: dict[tuple, list[Workload]] = {}
    for wl in sorted({r.workload for r in runs}, key=_workload_order):
        panels.setdefault(_panel_key(wl), []).append(wl)
    keys = sorted(panels, key=lambda k: (k[0] != "read", k[1] != "QD1", k[2]))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    width = 0.8 / max(1, len(modes))
    for ax, key in zip(axes.flat, keys):
        wls = panels[key]
        for mi, mode in enumerate(modes):
            med, lo, hi = [], [], []
            for wl in wls:
                vals = [r.mb_per_s for r in runs if r.workload == wl and r.mode == mode]
                m = _median(vals) if vals else 0.0
                med.append(m)
                lo.append(m - min(vals) if vals else 0)
                hi.append(max(vals) - m if vals else 0)
            xs = [i + (mi - (len(modes) - 1) / 2) * width for i in range(len(wls))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=mode, color=MODE_COLORS.get(mode))
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels([f"{size_label(w.bs)}\n{'rand' if w.is_random else 'seq'} qd{w.qd}" for w in wls],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("MB/s (median, min-max bars)")
        rw, qd, nq = key
        ax.set_title(f"{rw}, {qd}, {nq} queue{'s' if nq > 1 else ''}", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Throughput per mode and block size, backend {backend}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdf_workload(results: Results, backend: str) -> Workload | None:
    """The QD1 4 KiB workload of a backend (random read preferred), else the smallest QD1 one."""
    wls = {c.workload for c in results.cdfs if c.backend == backend}
    if not wls:
        return None
    return sorted(wls, key=lambda w: (w.bs != 4096, not w.is_read, not w.is_random, w.queues, w.bs))[0]


def plot_cdf(results: Results, backend: str, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wl = cdf_workload(results, backend)
    if wl is None:
        return None
    cdfs = sorted((c for c in results.cdfs if c.backend == backend and c.workload == wl),
                  key=lambda c: _mode_order(c.mode))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for c in cdfs:
        us = [x / 1000 for x in c.latency_ns]
        color = MODE_COLORS.get(c.mode)
        a1.plot(us, results.cdf_levels, label=f"{c.mode} ({c.samples} req)", color=color)
        tail = [(x, 1 - lv) for x, lv in zip(us, results.cdf_levels) if lv < 1]
        a2.plot([t[0] for t in tail], [t[1] for t in tail], label=c.mode, color=color)
    a1.set_xscale("log")
    a1.set_xlabel("latency (µs)")
    a1.set_ylabel("fraction of requests")
    a1.set_title("CDF")
    a1.grid(alpha=0.3, which="both")
    a1.legend(fontsize=8)
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("latency (µs)")
    a2.set_ylabel("fraction slower (1 - CDF)")
    a2.set_title("tail")
    a2.grid(alpha=0.3, which="both")
    fig.suptitle(f"Latency, {wl.label}, backend {backend}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: Results, out_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("no plots: matplotlib is not installed (pip install 'fastshadow[plot]')")
        return []
    written = []
    for backend in sorted({r.backend for r in results.runs}):
        for fn, name in ((plot_throughput, f"throughput-{backend}.png"), (plot_cdf, f"latency-cdf-{backend}.png")):
            p = fn(results, backend, Path(out_dir) / name)
            if p is not None:
                written.append(name)
    return written


T = TypeVar("T")


def read_or_say(read: Callable[[Path], T], path: Path, prog: str, run: str,
                hint: Callable[[Path], str] = lambda path: "") -> T | None:
    """read(path), or None after one line on stderr saying why it cannot be read (a missing
    file, or one that is not the results.json of a `run`, then with hint(path) after it), for
    the command-line readers."""
    try:
        return read(path)
    except OSError as e:
        print(f"{prog}: cannot read {path}: {e.strerror or e}", file=sys.stderr)
    except msgspec.DecodeError as e:      # ValidationError too: a file of another schema
        print(f"{prog}: {path} is not the results.json of a {run} run ({e}){hint(path)}", file=sys.stderr)
    return None


def _scale_hint(path: Path) -> str:
    """Where to read path instead, if it holds a --scale run's results (bench/scale.py: its
    points, no runs)."""
    try:
        raw = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return ""
    if isinstance(raw, dict) and "points" in raw and "runs" not in raw:
        return "; a --scale run's reads with python -m fastshadow.bench.scale"
    return ""


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fastshadow.bench.report", description="print (and re-plot) a results.json")
    ap.add_argument("results", type=Path)
    ap.add_argument("--plots", action="store_true", help="rewrite the PNGs next to results.json")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table instead")
    args = ap.parse_args(argv)
    res = read_or_say(read_json, args.results, ap.prog, "`fastshadow bench`", _scale_hint)
    if res is None:
        return 2
    print(markdown_table(res) if args.markdown else table(res))
    if args.plots:
        for name in write_plots(res, args.results.parent):
            print(f"wrote {args.results.parent / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
