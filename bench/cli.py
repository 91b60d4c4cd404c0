"""`fastshadow bench`: direct against proxied against isolated, in one run.

fastshadow/cli.py makes the `bench` subparser and, only when that is the
command given, imports this module and calls ``configure(p)``, which adds the
options and sets ``func=run`` (like ``fastshadow trace``). It also runs on its
own: ``python -m fastshadow.bench.cli --quick``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  fastshadow bench                          # the quick preset (< 60 s): null backend, all modes
  fastshadow bench --full --out out/full    # the full preset (~10 min): null and file, 3 reps
  fastshadow bench --modes direct,proxy-direct --backend file --duration 5
  fastshadow bench --quick --proxy-args="--busy-poll-us 50"   # tune the proxy under test
  fastshadow bench --modes direct,isolated --variant memcpy="--stream-copy-min 0" \
      --workload write:1m:8                 # an isolated-mode option A/B, interleaved in one run
  fastshadow bench --modes isolated --variant nohist="--no-latency-histograms" \
      --traced bcc="" --traced sampled="--sample 64" --workload randread:4k:32 --reps 5
                                            # what tracing costs: ratios to isolated, one run
  fastshadow bench --scale --out bench/results/scale   # 1-32 devices x 1-4 queues in one proxy
  fastshadow bench --scale --scale-devices 1,4 --scale-queues 1 --duration 1   # a short one

results.json (msgspec schema in bench/report.py), throughput-<backend>.png and
latency-cdf-<backend>.png are written to --out; `python -m
fastshadow.bench.report results.json` prints the table again.
"""


def configure(p: argparse.ArgumentParser) -> None:
    """`fastshadow bench`'s options, on the subparser fastshadow/cli.py made."""
    p.description = ("Drive qemu-storage-daemon with bench/'s vhost-user load generator (a virtio-blk driver "
                     "emulation in C) directly, through `fastshadow proxy --mode direct` and through "
                     "`--mode isolated`, interleaving the modes, and report IOPS, MB/s, latency percentiles, "
                     "CPU seconds per process and the ratios to direct.")
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import BACKENDS, MODES  # nothing heavy at parse time
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="quick preset (default): null backend, 4 workloads, 2 s each, 1 rep; under 60 s")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="full preset: null and file backends, 512 B-1 MiB, QD1/QD32/QD8, read and write, "
                             "1 and 2 queues, 3 reps; about 10 min")
    preset.add_argument("--scale", dest="preset", action="store_const", const="scale",
                        help="scale preset: 1, 2, 4, 8, 16, 32 isolated devices x 1, 2, 4 queues in ONE proxy, "
                             "4 KiB randread QD32 per queue on null-co exports of one qemu-storage-daemon: "
                             "aggregate IOPS, proxy CPU per request, p99, proxy memory per device (RSS, shadow "
                             "pages resident idle / busy / after the idle trim), plus memory against "
                             "--bounce-per-queue; results.json and scale.png (bench/scale.py). Uses --out, "
                             "--duration (default 2), --proxy-args, --workdir, --keep, --timeout, --no-plots")
    p.add_argument("--scale-devices", default="1,2,4,8,16,32", metavar="LIST",
                   help="--scale: device counts (default 1,2,4,8,16,32)")
    p.add_argument("--scale-queues", default="1,2,4", metavar="LIST", help="--scale: queues per device (default 1,2,4)")
    p.add_argument("--scale-threads", type=int, default=0, metavar="N",
                   help="--scale: the proxy's --dataplane-threads (default: its own default, one per device up to "
                        "the CPUs)")
    p.add_argument("--scale-direct", action="store_true",
                   help="--scale: also run each point without the proxy (the sessions on qsd's exports): the "
                        "baseline that shows what the machine and the backend give")
    p.add_argument("--scale-bounce", default="2M,16M,64M", metavar="LIST",
                   help="--scale: the --bounce-per-queue sizes of the memory sweep, each more than 1M (the "
                        "scale proxies' --max-request-bytes) (default 2M,16M,64M, at 8 devices x 4 queues, or the "
                        "largest point below that)")
    p.add_argument("--modes", default=",".join(MODES), metavar="LIST",
                   help=f"comma-separated modes to compare (default {','.join(MODES)})")
    p.add_argument("--backend", action="append", choices=BACKENDS, dest="backends",
                   help="qemu-storage-daemon block driver: null (null-co, pure overhead) or file "
                        "(an image with cache.direct=on, aio=io_uring); repeat for both "
                        "(default: quick null, full both)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), metavar="DIR",
                   help="where results.json and the PNGs go (default out/bench)")
    p.add_argument("--duration", type=float, metavar="S", help="seconds per run (default: the preset's)")
    p.add_argument("--requests", type=int, metavar="N", help="requests per run instead of a duration")
    p.add_argument("--reps", type=int, metavar="N", help="repetitions (default: the preset's)")
    p.add_argument("--workload", action="append", metavar="RW:BS:QD[:QUEUES]",
                   help="instead of the preset's workloads, e.g. randread:4k:32 or write:1m:8:2 "
                        "(rw: randread, read, randwrite, write); repeatable")
    p.add_argument("--proxy-args", default="", metavar="ARGS",
                   help="extra arguments for every `fastshadow proxy` started, e.g. \"--busy-poll-us 50\"")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="one more mode, NAME: an isolated proxy started with ARGS (after --proxy-args), "
                        "interleaved with the other modes, e.g. nopoll=\"--busy-poll-us 0\"; ARGS starting "
                        "with @PYTHON run that interpreter's fastshadow instead (another checkout's "
                        ".venv/bin/python: its code against this one's, interleaved); repeatable")
    p.add_argument("--traced", action="append", default=[], metavar="NAME=ARGS",
                   help="one more mode, NAME: an isolated proxy (as the isolated mode's) with `fastshadow trace "
                        "--pid PROXY --quiet ARGS` attached for the whole run, e.g. bcc=\"\" or "
                        "sampled=\"--sample 64\"; the table gives its IOPS over isolated's; repeatable (root, bcc)")
    p.add_argument("--loadgen-busy-poll-us", type=int, default=0, metavar="US",
                   help="the load generator spins this long before sleeping on a call eventfd (default 0)")
    p.add_argument("--retry-noisy", type=int, default=2, metavar="N",
                   help="run again, at most N times, a run that shared the machine (other work above 10 %% of "
                        "a CPU, or hypervisor steal above 5 %%); the last attempt counts (default 2, 0: never)")
    p.add_argument("--guest-halt-poll-ns", type=_halt_poll_ns, metavar="NS",
                   help="set haltpoll.guest_halt_poll_ns (how long an idle vCPU of this KVM guest polls before "
                        "it halts: what a wake-up costs here) for the bench, and put the old value back after "
                        "(root; results.json records the value either way)")
    p.add_argument("--loadgen-threads", choices=["one", "per-queue"], default="one",
                   help="one thread drives all queues (default), or one thread per queue")
    p.add_argument("--pin", choices=["split", "split-free-proxy", "own", "none"], default="split",
                   help="split (default): the load generator on the first CPU, qemu-storage-daemon and the proxy "
                        "on the others, as a guest's vCPU and its backend would be; split-free-proxy: the same "
                        "but the proxy may run on any CPU; own: the load generator on the first CPU, "
                        "qemu-storage-daemon on the second, the proxy on the rest (3+ CPUs); none: the scheduler "
                        "decides (a wakeup on the same CPU is ~10x cheaper here, so results then vary with "
                        "placement)")
    p.add_argument("--no-event-idx", action="store_true", help="do not negotiate VIRTIO_RING_F_EVENT_IDX")
    p.add_argument("--queue-size", type=int, default=256, help="virtqueue size (default 256; raised for QD > 85)")
    p.add_argument("--file-size", default="512M", help="size of the file backend's image (default 512M)")
    p.add_argument("--workdir", type=Path, help="sockets, logs and the image go here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (proxy and qsd logs)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="a peer that does not answer a request, or a device that completes nothing, "
                        "for this long fails the run (default 5)")
    p.add_argument("--no-memcpy", action="store_true", help="skip the memcpy baseline")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(preset=None)


#: --guest-halt-poll-ns at most. The kernel takes up to 2^32-1 ns; 1 s is already far past any
#: useful window (the driver's default is 200 µs) and makes an idle vCPU burn its CPU.
HALT_POLL_MAX_NS = 1_000_000_000


def _halt_poll_ns(text: str) -> int:
    try:
        n = int(text) if text.isdigit() else -1
    except ValueError:
        n = -1
    if not 0 <= n <= HALT_POLL_MAX_NS:
        raise argparse.ArgumentTypeError(f"{text!r}: want a whole number of ns, 0 to {HALT_POLL_MAX_NS} (1 s)")
    return n


def parse_workload(text: str):
    from fastshadow.sizes import SizeError, parse_size

    from .report import Workload
    want = "want RW:BS:QD[:QUEUES], e.g. randread:4k:32 (rw: randread, read, randwrite, write)"
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("randread", "read", "randwrite", "write"):
        raise ValueError(f"bad workload {text!r}: {want}")
    try:
        bs = parse_size(parts[1])
    except SizeError as e:
        raise ValueError(f"bad workload {text!r}: block size {e}") from None
    counts = parts[2:]
    if not all(c.isdigit() for c in counts):
        raise ValueError(f"bad workload {text!r}: queue depth and queues are whole numbers; {want}")
    return Workload(parts[0], bs, int(parts[2]), int(parts[3]) if len(parts) == 4 else 1)


def parse_variants(texts: list[str]) -> dict[str, list[str]]:
    """NAME=ARGS options -> {NAME: [args]}: extra isolated-mode proxies to compare."""
    import re

    from . import MODES
    out: dict[str, list[str]] = {}
    for text in texts:
        name, sep, args = text.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_-]{0,11}", name):
            raise ValueError(f"bad variant {text!r}: want NAME=ARGS, NAME of up to 12 lower-case letters, "
                             f"digits, - or _, e.g. memcpy=\"--stream-copy-min 0\"")
        if name in MODES or name in out:
            raise ValueError(f"variant name {name!r} is already a mode")
        out[name] = _split(f"--variant {name}", args)
    return out


def _split(what: str, text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ValueError(f"{what} {text!r}: {e}") from None


def _creatable(path: Path) -> bool:
    """`path` (a directory to be) can be made: its nearest existing ancestor is a writable directory."""
    import os
    for parent in path.absolute().parents:
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


def config_from_args(args):
    from . import MODES, OPTIONAL_MODES
    from fastshadow.sizes import parse_size
    from .runner import PRESETS, Config, placement
    preset = PRESETS[args.preset or "quick"]
    placement(args.pin)                     # a policy this machine cannot give fails here, not mid-run
    variants = parse_variants(args.variant)
    traced = parse_variants(args.traced)
    clash = set(traced) & set(variants)
    if clash:
        raise ValueError(f"{', '.join(sorted(clash))}: both a --variant and a --traced name")
    variants.update({name: [] for name in traced})      # a traced mode is an isolated proxy with default args
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES + OPTIONAL_MODES and m not in variants]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none)'}: choose from "
                         f"{', '.join(MODES + OPTIONAL_MODES)} "
                         f"or a --variant")
    modes += [v for v in variants if v not in modes]
    workloads = [parse_workload(w) for w in args.workload] if args.workload else list(preset.workloads)
    for w in workloads:
        if w.bs < 512 or w.bs % 512 or w.bs > 1 << 20 or not 1 <= w.queues <= 4 or not 1 <= w.qd <= 4096:
            raise ValueError(f"workload {w.label}: block size 512 B..1 MiB (multiple of 512), 1-4 queues, "
                             f"qd 1..4096")
    # virtio 1.x 2.7 (split virtqueues): the queue size is a power of 2, at most 32768
    if not 2 <= args.queue_size <= 32768 or args.queue_size & (args.queue_size - 1):
        raise ValueError(f"--queue-size {args.queue_size}: want a power of 2 from 2 to 32768")
    duration = args.duration if args.duration is not None else (None if args.requests else preset.duration)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory (results.json and the plots go in a "
                         f"directory)")
    if not out.exists() and not _creatable(out):
        raise ValueError(f"--out {out}: cannot create it")
    for name, value in (("--duration", args.duration), ("--timeout", args.timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):   # NaN compares false
            raise ValueError(f"{name} {value:g}: want seconds > 0")
    for name, value in (("--requests", args.requests), ("--reps", args.reps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value}: want 1 or more")
    if args.retry_noisy < 0:
        raise ValueError(f"--retry-noisy {args.retry_noisy}: want 0 or more")
    try:
        file_size = parse_size(args.file_size)
    except ValueError as e:
        raise ValueError(f"--file-size: {e}") from None
    if file_size < 1 << 20 or file_size % 512:
        raise ValueError(f"--file-size {args.file_size}: want at least 1M, a multiple of 512 bytes")
    return Config(
        preset=preset.name if not args.workload else f"{preset.name}+custom",
        modes=modes, backends=list(dict.fromkeys(args.backends or preset.backends)), workloads=workloads,
        duration=duration, requests=args.requests, reps=args.reps or preset.reps, out=args.out,
        workdir=args.workdir, keep=args.keep, queue_size=args.queue_size, event_idx=not args.no_event_idx,
        busy_poll_us=args.loadgen_busy_poll_us, loadgen_threads=args.loadgen_threads,
        proxy_args=_split("--proxy-args", args.proxy_args), variants=variants, traced=traced, file_size=file_size,
        pin=args.pin, retry_noisy=args.retry_noisy, setup_timeout=args.timeout, stall_timeout=args.timeout,
        memcpy=not args.no_memcpy,
        plots=not args.no_plots,
        command=getattr(args, "command_line", None) or "fastshadow bench " + " ".join(
            shlex.quote(a) for a in sys.argv[2:]))


def scale_config_from_args(args):
    """--scale: the ScaleConfig of bench/scale.py."""
    from fastshadow.sizes import SizeError, parse_size

    from .scale import ScaleConfig

    def ints(name: str, text: str, hi: int) -> list[int]:
        try:
            xs = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            xs = []
        if not xs or not all(1 <= x <= hi for x in xs):
            raise ValueError(f"{name} {text!r}: want a comma-separated list of whole numbers 1..{hi}")
        return xs
    if args.pin != "split":
        raise ValueError(f"--pin {args.pin}: --scale does not pin its processes (one proxy serves every device "
                         f"there); --pin is for the other presets")
    devices = ints("--scale-devices", args.scale_devices, 64)
    queues = ints("--scale-queues", args.scale_queues, 4)
    try:
        bounce = [parse_size(b) for b in args.scale_bounce.split(",") if b.strip()]
    except SizeError as e:
        raise ValueError(f"--scale-bounce: {e}") from None
    if not bounce or min(bounce) < 2 << 20:
        raise ValueError(f"--scale-bounce {args.scale_bounce!r}: want sizes of at least 2M (one request of the "
                         f"scale proxies' --max-request-bytes 1M and its header must fit)")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration {args.duration:g}: want seconds > 0")
    if not 0 <= args.scale_threads <= 64:
        raise ValueError(f"--scale-threads {args.scale_threads}: want 1..64 (0: the proxy's default)")
    small = [d for d in devices if d <= 8] or devices
    return ScaleConfig(devices=devices, queues=queues, duration=args.duration or 2.0, threads=args.scale_threads,
                       bounce_sweep=bounce, sweep_devices=max(small), sweep_queues=max(queues),
                       direct=args.scale_direct,
                       proxy_args=_split("--proxy-args", args.proxy_args),
                       out=Path(args.out if args.out != Path("out/bench") else "out/bench-scale"),
                       workdir=args.workdir, keep=args.keep, timeout=max(args.timeout, 10.0),
                       plots=not args.no_plots,
                       command=getattr(args, "command_line", None) or "fastshadow bench " + " ".join(
                           shlex.quote(a) for a in sys.argv[2:]))


def plots_possible(wanted: bool) -> bool:
    """Whether plots can be drawn: the [plot] extra is checked before the long work, not
    after it (one line if matplotlib is missing; the run goes on without plots)."""
    if not wanted:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastshadow bench: no plots: matplotlib is not installed (pip install 'fastshadow[plot]'; "
              "--no-plots says you know)", file=sys.stderr)
        return False
    return True


#: Signals that end a bench as Ctrl-C does: the run drains, sessions close, qsd and the proxies
#: stop, the idle policy is put back. SIGHUP is a closed terminal or a dropped ssh session.
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


def _run_body(args, body):
    """(exit code, what body returned or None): body run under --guest-halt-poll-ns, with
    STOP_SIGNALS raised as KeyboardInterrupt in it."""
    import signal
    import threading

    from .runner import GUEST_HALT_POLL_NS, IdlePolicyError, guest_halt_poll
    old = {}
    if threading.current_thread() is threading.main_thread():
        def _stop(signum, frame):
            raise KeyboardInterrupt
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            old[sig] = signal.signal(sig, _stop)
    try:
        with guest_halt_poll(args.guest_halt_poll_ns) as old_ns:
            if args.guest_halt_poll_ns is not None:
                print(f"fastshadow bench: haltpoll.guest_halt_poll_ns {old_ns} -> {args.guest_halt_poll_ns} "
                      f"for this bench; it is put back after (if the bench is killed with SIGKILL: "
                      f"echo {old_ns} > {GUEST_HALT_POLL_NS})", flush=True)
            return 0, body()
    except IdlePolicyError as e:
        print(f"fastshadow bench: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("fastshadow bench: interrupted", file=sys.stderr)
        return 130, None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_scale(args) -> int:
    """`fastshadow bench --scale`."""
    try:
        cfg = scale_config_from_args(args)
    except ValueError as e:
        print(f"fastshadow bench: {e}", file=sys.stderr)
        return 2
    cfg.plots = plots_possible(cfg.plots)
    from .scale import markdown, run_scale as run_it
    n = len(cfg.devices) * len(cfg.queues) * (2 if cfg.direct else 1) + len(cfg.bounce_sweep)
    print(f"fastshadow bench: scale preset, {n} points ({cfg.duration:g} s of load each), devices "
          f"{','.join(map(str, cfg.devices))} x queues {','.join(map(str, cfg.queues))}", flush=True)
    rc, res = _run_body(args, lambda: run_it(cfg, log=lambda s: print(s, flush=True)))
    if res is None:
        return rc
    print()
    print(markdown(res))
    print()
    print(f"wrote {cfg.out / 'results.json'}" + "".join(f", {cfg.out / p}" for p in res.plots)
          + f" ({res.wall_s:.0f} s)")
    return 0 if res.points else 1


def run(args) -> int:
    from . import report as rp
    if args.preset == "scale":
        return run_scale(args)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"fastshadow bench: {e}", file=sys.stderr)
        return 2
    from .runner import run_bench
    cfg.plots = plots_possible(cfg.plots)
    runs = len(cfg.backends) * cfg.reps * len(cfg.workloads) * len(cfg.modes)
    what = f"{cfg.duration:g} s each" if cfg.duration else f"{cfg.requests} requests each"
    print(f"fastshadow bench: {cfg.preset} preset, {runs} runs ({what}), modes {', '.join(cfg.modes)}, "
          f"backends {', '.join(cfg.backends)}", flush=True)
    rc, results = _run_body(args, lambda: run_bench(cfg, log=lambda s: print(s, flush=True)))
    if results is None:
        return rc
    print()
    print(rp.table(results))
    print()
    print(f"wrote {cfg.out / 'results.json'}" + "".join(f", {cfg.out / p}" for p in results.plots)
          + f" ({results.wall_s:.0f} s)")
    return 0 if results.runs else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastshadow.bench.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    args.command_line = "python -m fastshadow.bench.cli " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
