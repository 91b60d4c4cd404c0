"""fastshadow trace: notification latency inside a running fastshadow, per hop, device and queue.

Attaches bcc programs (bpf/hops.bpf.c, installed as fastshadow.trace.bpf) to
the data plane's USDT probes of one proxy process and prints log2 histograms
(microseconds) every interval, in the manner of bcc's biolatency. Ctrl-C (or
--duration) ends it cleanly, printing the last interval, the whole run's
histograms (also with --quiet) and writing --json / --plot.

What it costs the proxy (bench/RESULTS.md, "Tracing overhead", measured with
`fastshadow bench --traced`): every probe hit is a uprobe trap, a few µs of
the data-plane thread's time. Attached to every hop of every request it cut
4 KiB QD32 throughput by more than half on this host. `--sample N` attaches
one probe only, fired by the data plane for 1 request in N per queue with the
data plane's own stamps of that request: whole requests are followed across
every hop from one trap, and the probes not attached stay nops (`--sample 256`
kept 0.97 of the throughput in that run). `--from-stats FILE` needs no bcc at all: it prints the
histograms the data plane keeps itself (always on, `--stats-file`).
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
from .report import COUNTERS, Histogram, Interval, TraceRun, format_histograms, format_interval, plot

PROBES = ["guest_kick", "request_shadowed", "backend_kick", "backend_call", "request_completed", "guest_call",
          "request_refused"]
#: --sample N attaches these only (csrc/probes.h).
SAMPLED_PROBES = ["request_sampled", "request_refused"]
#: The BPF program's hop numbers (bpf/hops.bpf.c): 0-4 every request, 5 the driver, 6-9 sampled.
BPF_HOPS = ["kick_to_shadowed", "shadowed_to_kick", "call_to_completed", "completed_to_call", "end_to_end",
            "driver_end_to_end", "kick_to_shadowed", "backend", "call_to_used", "end_to_end"]

EXAMPLES = """\
examples:
  fastshadow trace --check                  # can this machine trace? what is missing?
  fastshadow trace --pid 4242               # histograms every 5 s until Ctrl-C
  fastshadow trace --pid 4242 --duration 30 --interval 10 --queue 0
  fastshadow trace --pid 4242 --duration 10 --json trace.json --plot trace.png
  fastshadow trace --pid 4242 --driver-pid 4343   # also the load generator's own view
  fastshadow trace --pid 4242 --sample 256 --device disk0 --duration 60 --quiet  # cheap: 1 request in 256
  fastshadow trace --from-stats /run/fastshadow/stats.json --device disk0        # no bcc, no root
  fastshadow trace --from-stats stats.json --duration 10   # what the last 10 s added
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
    p.add_argument("--device", metavar="NAME", help="only this device (its --name in the proxy); waited for if "
                                                     "not connected yet, followed across sessions")
    p.add_argument("--sample", type=int, default=1, metavar="N",
                   help="follow 1 request in N per queue, chosen by the data plane, through every hop from one "
                        "probe with the data plane's own stamps (needs its latency histograms: not with a proxy "
                        "started with --no-latency-histograms); default 1: every probe of every request, the most "
                        "detailed and the costliest")
    p.add_argument("--from-stats", metavar="FILE",
                   help="print the latency histograms the data plane keeps itself, from a proxy's --stats-file "
                        "(no bcc, no root, no kernel headers); with --duration: what that time added")
    p.add_argument("--json", metavar="FILE", help="write every interval as JSON records")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of the histograms over the whole run")
    p.add_argument("--check", action="store_true", help="say whether root, kernel headers, tracefs and bcc are there")
    p.add_argument("--quiet", action="store_true", help="no per-interval output (only the whole run's histograms "
                                                          "and totals at the end)")
    p.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


READ_DQ = """{ u32 dev_ = 0, q_ = 0;
      bpf_usdt_readarg(1, ctx, &dev_);
      bpf_usdt_readarg(2, ctx, &q_);
      K.dev = dev_; K.q = q_;
      QUEUE_FILTER DEVICE_FILTER }"""


#: --device: the wanted device's data-plane id + 1 is in map dev_filter (0: not there yet, drop all). A map,
#: not a constant: the device may connect after the tracer starts, or come back with another id.
DEVICE_FILTER = """{ u32 z_ = 0; u32 *w_ = dev_filter.lookup(&z_);
      if (!w_ || *w_ != dev_ + 1) return 0; }"""


def bpf_text(queue: int | None, device: bool = False) -> str:
    """The BPF program with its placeholders filled (no option branches in kernel code)."""
    import re
    text = environment.probe_program().read_text()
    text = re.sub(r"READ_DQ\((\w+)\);", lambda m: READ_DQ.replace("K.", m.group(1) + "."), text)
    qf = f"if (q_ != {int(queue)}) return 0;" if queue is not None else ""
    return text.replace("QUEUE_FILTER", qf).replace("DEVICE_FILTER", DEVICE_FILTER if device else "")


def run(args) -> int:
    if args.check:
        return check_cmd()
    if args.ebpf:
        print(bpf_text(args.queue))
        return 0
    if args.pid is None and args.driver_pid is None and not args.from_stats:
        print("fastshadow trace: --pid is required (or --driver-pid, --from-stats, or --check)", file=sys.stderr)
        return 2
    problem = value_problem(args) or output_problem(args.json, args.plot)
    if problem is not None:  # said now, not after the whole trace
        print(f"fastshadow trace: {problem}", file=sys.stderr)
        return 2
    if args.from_stats:
        from .stats import from_stats
        return from_stats(args.from_stats, device=args.device, queue=args.queue, duration=args.duration,
                          json_path=args.json)
    try:
        environment.require()
        tracer = Tracer(args.pid, driver_pid=args.driver_pid, queue=args.queue, device=args.device,
                        sample=args.sample)
    except (environment.TraceEnvironmentError, TraceError) as e:
        print(f"fastshadow trace: {e}", file=sys.stderr)
        return 1
    return tracer.loop(duration=args.duration, interval=args.interval, json_path=args.json, plot_path=args.plot,
                       quiet=args.quiet)


def value_problem(args) -> str | None:
    """Why --interval, --duration, --queue or --sample cannot be used (None: they can), said before attaching."""
    import math
    for opt, value in (("--interval", args.interval), ("--duration", args.duration)):
        if value is not None and not (math.isfinite(value) and value > 0):   # NaN compares false
            return f"{opt} {value:g}: want seconds > 0"
    if args.queue is not None and args.queue < 0:
        return f"--queue {args.queue}: want a queue index >= 0"
    if args.sample < 1:
        return f"--sample {args.sample}: want N >= 1 (1 in N requests)"
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
        mark = ("warn" if c.warn else "ok ") if c.ok else "MISSING"
        print(f"[{mark:>7}] {c.name:<15} {c.detail}")
        if not c.ok or (c.warn and c.fix):
            print(f"{'':>10}{'fix' if not c.ok else 'note'}: {c.fix}")
        if not c.ok:
            ok = False
    print("tracing is possible" if ok else "tracing is NOT possible until the above is fixed")
    return 0 if ok else 1


def _sum(v) -> int:
    """A per-CPU map value (one per CPU) or a plain one, as one number."""
    if hasattr(v, "value"):
        return int(v.value)
    try:
        return sum(int(x) for x in v)
    except TypeError:
        return int(v)


class Tracer:
    def __init__(self, pid: int | None, *, driver_pid: int | None = None, queue: int | None = None,
                 device: str | None = None, sample: int = 1):
        bcc = environment.import_bcc()
        for p in (pid, driver_pid):
            if p is not None and not os.path.exists(f"/proc/{p}"):
                raise TraceError(f"no process {p}")
        self.pid, self.driver_pid, self.queue, self.device, self.sample = pid, driver_pid, queue, device, sample
        self.ctl = None
        self.names: dict[int, str] = {}
        self.device_id: int | None = None
        if pid is not None:
            from .ctl import TraceControl, TraceControlError
            try:
                self.ctl = TraceControl(pid)
                self.names = self.ctl.names()
            except TraceControlError as e:
                if device is not None or sample > 1:
                    raise TraceError(f"--device/--sample need the proxy's trace control block: {e}") from None
        contexts = []
        if pid is not None:
            try:
                u = bcc.USDT(pid=pid)       # raises itself for a process it cannot instrument
                for probe in (PROBES if sample == 1 else SAMPLED_PROBES):
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
        self.bpf = bcc.BPF(text=bpf_text(queue, device is not None), usdt_contexts=contexts)
        self.follow_device()
        if self.ctl is not None and sample > 1:
            self.ctl.sample_every = sample      # from now on the data plane fires request_sampled
        self.intervals: list[Interval] = []

    def refresh_names(self) -> None:
        """Learn the names of devices added since (a name stays in the block after its device is
        removed, until its id is reused: events read later are still labelled); with --device,
        point the BPF filter at the device's current id."""
        if self.ctl is not None:
            try:
                now = self.ctl.names()
            except OSError:                     # the proxy is gone: keep what we know
                return
            self.names.update(now)
            if self.device is not None:
                ids = [i for i, n in sorted(now.items()) if n == self.device]
                self._filter(ids[0] if ids else None)

    def follow_device(self) -> None:
        if self.device is not None:
            self._filter(None)                  # nothing passes until the name is found
            self.refresh_names()

    def _filter(self, dev: int | None) -> None:
        if dev == self.device_id and dev is not None:
            return
        table = self.bpf["dev_filter"]
        table[table.Key(0)] = table.Leaf(0 if dev is None else dev + 1)
        if dev is not None and getattr(self, "intervals", None) is not None:
            print(f"device {self.device}: data-plane id {dev}, traced from now on", flush=True)
        self.device_id = dev

    def device_name(self, dev: int) -> str:
        if dev not in self.names:
            self.refresh_names()
        return self.names.get(dev, str(dev))

    def snapshot(self, t0: int) -> Interval:
        """Read and clear this interval's histograms and counters."""
        hist = self.bpf["hist"]
        hists: dict[tuple[int, int, int], dict[int, int]] = {}
        for k, v in hist.items():
            hists.setdefault((k.hop, k.dev, k.q), {})[int(k.slot)] = _sum(v)
        hist.clear()
        counts_map = self.bpf["counts"]
        counts = {name: _sum(counts_map[counts_map.Key(i)]) for i, name in enumerate(COUNTERS)}
        counts_map.clear()
        if self.driver_pid is not None:
            dm = self.bpf["driver_counts"]
            counts["driver_submit"] = _sum(dm[dm.Key(0)])
            counts["driver_complete"] = _sum(dm[dm.Key(1)])
            dm.clear()
        histograms = [Histogram(BPF_HOPS[hop], q, dict(sorted(s.items())),
                                device="" if BPF_HOPS[hop] == "driver_end_to_end" else self.device_name(dev))
                      for (hop, dev, q), s in sorted(hists.items())]
        return Interval(self.pid or 0, t0, time.monotonic_ns(), counts, histograms, lost=counts.get("map_full", 0))

    def loop(self, *, duration, interval, json_path, plot_path, quiet) -> int:
        stop = {"now": False}
        prev = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        started = time.monotonic()
        who = [f"fastshadow pid {self.pid}"] if self.pid else []
        who += [f"load generator pid {self.driver_pid}"] if self.driver_pid else []
        waiting = self.device is not None and self.device_id is None
        print("Tracing " + " and ".join(who) +
              (f", device {self.device}" + (" (not connected yet: waiting for it)" if waiting else "")
               if self.device is not None else "") +
              (f", queue {self.queue}" if self.queue is not None else "") +
              (f", 1 request in {self.sample} per queue" if self.sample > 1 else "") +
              "... Hit Ctrl-C to end.", flush=True)
        t0 = time.monotonic_ns()
        named_at = time.monotonic()
        try:
            while not stop["now"]:
                left = None if duration is None else duration - (time.monotonic() - started)
                if left is not None and left <= 0:
                    break
                nap = interval if left is None else min(interval, left)
                end = time.monotonic() + nap
                while not stop["now"] and time.monotonic() < end:
                    time.sleep(min(0.1, max(0.0, end - time.monotonic())))
                    if time.monotonic() - named_at >= 0.5:
                        self.refresh_names()    # a device may come and go within one interval
                        named_at = time.monotonic()
                if any(p is not None and not os.path.exists(f"/proc/{p}") for p in (self.pid, self.driver_pid)):
                    stop["now"] = True  # the traced process is gone: print what we have and end
                iv = self.snapshot(t0)
                t0 = iv.end_ns
                self.intervals.append(iv)
                if not quiet:
                    print(time.strftime("\n%H:%M:%S"), format_interval(iv), flush=True)
        finally:
            signal.signal(signal.SIGINT, prev)
            if self.ctl is not None and self.sample > 1:
                try:
                    self.ctl.sample_every = 0   # the proxy may be gone: nothing to undo then
                except OSError:
                    pass
        result = TraceRun(self.pid or 0, self.driver_pid, self.queue, self.intervals, sample_every=self.sample,
                          device=self.device)
        totals = result.totals()
        whole = result.merged()
        if whole:
            print(f"\nwhole run ({(time.monotonic() - started):.1f} s):", flush=True)
            print(format_histograms(whole), flush=True)
        print("\ntotal events: " + "  ".join(f"{k}={v}" for k, v in totals.items() if v), flush=True)
        if json_path:
            Path(json_path).write_bytes(msgspec.json.encode(result))
        if plot_path:
            plot(result, plot_path)
        return 0


def load_json(path: str) -> TraceRun:
    return msgspec.json.decode(Path(path).read_bytes(), type=TraceRun)
