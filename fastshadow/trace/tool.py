"""fastshadow trace: notification latency inside a running fastshadow, per hop and queue.

Attaches bcc programs (bpf/hops.bpf.c, installed as fastshadow.trace.bpf) to
the data plane's USDT probes of one proxy process and prints log2 histograms
every interval, in the manner of bcc's biolatency. Ctrl-C (or --duration)
ends it cleanly, printing the last interval and writing --json / --plot.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import msgspec

from . import environment
from .report import COUNTERS, HOPS, Histogram, Interval, TraceRun, format_interval, plot

PROBES = ["guest_kick", "request_shadowed", "backend_kick", "backend_call", "request_completed", "guest_call",
          "request_refused"]
ALL_HOPS = HOPS + ["driver_end_to_end"]

EXAMPLES = """\
examples:
  fastshadow trace --check                  # can this machine trace? what is missing?
  fastshadow trace --pid 4242               # histograms every 5 s until Ctrl-C
  fastshadow trace --pid 4242 --duration 30 --interval 10 --queue 0
  fastshadow trace --pid 4242 --duration 10 --json trace.json --plot trace.png
  fastshadow trace --pid 4242 --driver-pid 4343   # also the load generator's own view
"""


class TraceError(RuntimeError):
    pass


def configure(p: argparse.ArgumentParser) -> None:
    """`fastshadow trace`'s options, on the subparser fastshadow/cli.py made."""
    p.description = __doc__
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--pid", type=int, help="the fastshadow proxy process to trace")
    p.add_argument("--driver-pid", type=int, help="also trace a bench load generator process (its own latency)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between printed histograms (default 5)")
    p.add_argument("--queue", type=int, help="only this queue index")
    p.add_argument("--json", metavar="FILE", help="write every interval as JSON records")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of the histograms over the whole run")
    p.add_argument("--check", action="store_true", help="say whether root, kernel headers, tracefs and bcc are there")
    p.add_argument("--quiet", action="store_true", help="no per-interval output (only the final summary)")
    p.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


READ_DQ = """{ u32 dev_ = 0, q_ = 0;
      bpf_usdt_readarg(1, ctx, &dev_);
      bpf_usdt_readarg(2, ctx, &q_);
      K.dev = dev_; K.q = q_;
      QUEUE_FILTER }"""


def bpf_text(queue: int | None) -> str:
    """The BPF program with its placeholders filled (no option branches in kernel code)."""
    import re
    text = environment.probe_program().read_text()
    text = re.sub(r"READ_DQ\((\w+)\);", lambda m: READ_DQ.replace("K.", m.group(1) + "."), text)
    filt = f"if (q_ != {int(queue)}) return 0;" if queue is not None else ""
    return text.replace("QUEUE_FILTER", filt)


def run(args) -> int:
    if args.check:
        return check_cmd()
    if args.ebpf:
        print(bpf_text(args.queue))
        return 0
    if args.pid is None and args.driver_pid is None:
        print("fastshadow trace: --pid is required (or --driver-pid, or --check)", file=sys.stderr)
        return 2
    problem = value_problem(args) or output_problem(args.json, args.plot)
    if problem is not None:  # said now, not after the whole trace
        print(f"fastshadow trace: {problem}", file=sys.stderr)
        return 2
    try:
        environment.require()
        tracer = Tracer(args.pid, driver_pid=args.driver_pid, queue=args.queue)
    except (environment.TraceEnvironmentError, TraceError) as e:
        print(f"fastshadow trace: {e}", file=sys.stderr)
        return 1
    return tracer.loop(duration=args.duration, interval=args.interval, json_path=args.json, plot_path=args.plot,
                       quiet=args.quiet)


def value_problem(args) -> str | None:
    """Why --interval, --duration or --queue cannot be used (None: they can), said before attaching."""
    import math
    for opt, value in (("--interval", args.interval), ("--duration", args.duration)):
        if value is not None and not (math.isfinite(value) and value > 0):   # NaN compares false
            return f"{opt} {value:g}: want seconds > 0"
    if args.queue is not None and args.queue < 0:
        return f"--queue {args.queue}: want a queue index >= 0"
    return None


def output_problem(json_path: str | None, plot_path: str | None) -> str | None:
    """Why --json or --plot could not be written at the end of the trace (None: they can):
    a missing directory, or --plot without matplotlib (the [plot] extra)."""
    import os
    for opt, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                return f"{opt} {path}: directory {parent} does not exist"
            if os.path.isdir(path):
                return f"{opt} {path}: is a directory"
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib, which is not installed (pip install 'fastshadow[plot]')"
    return None


def check_cmd() -> int:
    ok = True
    for c in environment.checks():
        mark = "ok " if c.ok else "MISSING"
        print(f"[{mark:>7}] {c.name:<15} {c.detail}")
        if not c.ok:
            print(f"{'':>10}fix: {c.fix}")
            ok = False
    print("tracing is possible" if ok else "tracing is NOT possible until the above is fixed")
    return 0 if ok else 1


class Tracer:
    def __init__(self, pid: int | None, *, driver_pid: int | None = None, queue: int | None = None):
        bcc = environment.import_bcc()
        for p in (pid, driver_pid):
            if p is not None and not os.path.exists(f"/proc/{p}"):
                raise TraceError(f"no process {p}")
        self.pid, self.driver_pid, self.queue = pid, driver_pid, queue
        contexts = []
        if pid is not None:
            try:
                u = bcc.USDT(pid=pid)       # raises itself for a process it cannot instrument
                for probe in PROBES:
                    u.enable_probe(probe=probe, fn_name=f"on_{probe}")
            except Exception as e:
                raise TraceError(f"process {pid} has no fastshadow data plane probes ({e}); is it a fastshadow "
                                 "proxy with an isolated device? (direct mode has no data plane: trace the "
                                 "load generator with --driver-pid)") from None
            contexts.append(u)
        if driver_pid is not None:
            try:
                d = bcc.USDT(pid=driver_pid)
                d.enable_probe(probe="submit", fn_name="on_driver_submit")
                d.enable_probe(probe="complete", fn_name="on_driver_complete")
            except Exception as e:
                raise TraceError(f"process {driver_pid} has no fastshadow_loadgen probes ({e})") from None
            contexts.append(d)
        self.bpf = bcc.BPF(text=bpf_text(queue), usdt_contexts=contexts)
        self.intervals: list[Interval] = []

    def snapshot(self, t0: int) -> Interval:
        """Read and clear this interval's histograms and counters."""
        hist = self.bpf["hist"]
        hists: dict[tuple[int, int], dict[int, int]] = {}
        for k, v in hist.items():
            hists.setdefault((k.hop, k.q), {})[int(k.slot)] = int(v.value)
        hist.clear()
        counts_map = self.bpf["counts"]
        counts = {name: int(counts_map[counts_map.Key(i)].value) for i, name in enumerate(COUNTERS)}
        counts_map.clear()
        if self.driver_pid is not None:
            dm = self.bpf["driver_counts"]
            counts["driver_submit"] = int(dm[dm.Key(0)].value)
            counts["driver_complete"] = int(dm[dm.Key(1)].value)
            dm.clear()
        histograms = [Histogram(ALL_HOPS[hop], q, dict(sorted(s.items()))) for (hop, q), s in sorted(hists.items())]
        return Interval(self.pid or 0, t0, time.monotonic_ns(), counts, histograms, lost=counts.get("map_full", 0))

    def loop(self, *, duration, interval, json_path, plot_path, quiet) -> int:
        stop = {"now": False}
        prev = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        started = time.monotonic()
        who = [f"fastshadow pid {self.pid}"] if self.pid else []
        who += [f"load generator pid {self.driver_pid}"] if self.driver_pid else []
        print("Tracing " + " and ".join(who) +
              (f", queue {self.queue}" if self.queue is not None else "") + "... Hit Ctrl-C to end.", flush=True)
        t0 = time.monotonic_ns()
        try:
            while not stop["now"]:
                left = None if duration is None else duration - (time.monotonic() - started)
                if left is not None and left <= 0:
                    break
                nap = interval if left is None else min(interval, left)
                end = time.monotonic() + nap
                while not stop["now"] and time.monotonic() < end:
                    time.sleep(min(0.1, max(0.0, end - time.monotonic())))
                if any(p is not None and not os.path.exists(f"/proc/{p}") for p in (self.pid, self.driver_pid)):
                    stop["now"] = True  # the traced process is gone: print what we have and end
                iv = self.snapshot(t0)
                t0 = iv.end_ns
                self.intervals.append(iv)
                if not quiet:
                    print(time.strftime("\n%H:%M:%S"), format_interval(iv), flush=True)
        finally:
            signal.signal(signal.SIGINT, prev)
        result = TraceRun(self.pid or 0, self.driver_pid, self.queue, self.intervals)
        totals = result.totals()
        print("\ntotal events: " + "  ".join(f"{k}={v}" for k, v in totals.items() if v), flush=True)
        if json_path:
            Path(json_path).write_bytes(msgspec.json.encode(result))
        if plot_path:
            plot(result, plot_path)
        return 0


def load_json(path: str) -> TraceRun:
    return msgspec.json.decode(Path(path).read_bytes(), type=TraceRun)
