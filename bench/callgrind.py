"""Exact per-request counts of the data plane's hot path, from valgrind.

``python -m fastshadow.bench.callgrind`` builds ``csrc/bench/hotpath.c`` with
the data plane's sources (gcc, the flags of csrc/build_ffi.py), runs it under
``valgrind --tool=callgrind --cache-sim=yes`` collecting only inside the
engine (``queue_process`` and ``queue_notify``, what the loop thread runs per
pass), and prints, per function (exclusive), instructions and cache misses
per request:

- ``Ir``: instructions executed;
- ``L1m``: L1 data misses, reads + writes (D1mr + D1mw);
- ``LLm``: last-level data misses, reads + writes (DLmr + DLmw), with the
  simulated last level sized as this machine's L2 (512 KiB, 8-way): a miss
  there goes to the shared L3 or memory;
- ``cyc``: kcachegrind's cycle estimate, Ir + 10 L1m + 100 LLm: what decides
  whether the copy (which the bounce cannot avoid) or the rest dominates.

The numbers are exact and repeatable (no wall clock): the way to decide a
change of the hot path on a noisy shared machine. Wall-clock effects stay the
business of ``fastshadow bench``. Needs the source tree (csrc/), gcc,
liburing-dev and valgrind.

    python -m fastshadow.bench.callgrind --label before --out bench/results/callgrind
    python -m fastshadow.bench.callgrind --compare bench/results/callgrind/before.json \\
        bench/results/callgrind/after.json        # the before/after table (Markdown)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CFLAGS = ["-O2", "-g", "-std=gnu11", "-fno-strict-aliasing"]
#: the engine's entry points per pass (loop.c process_all, device.c cmd_poll)
TOGGLES = ["queue_process", "queue_notify"]
LL = "524288,8,64"     # this machine's L2 per core (lscpu: 1 MiB over 2 instances)
EVENTS = ("Ir", "L1m", "LLm")


def build(out: Path, csrc: Path = CSRC) -> Path:
    """hotpath.c of this tree against the data plane of csrc (another checkout's: a before/after)."""
    exe = out / "hotpath"
    srcs = [str(CSRC / "bench" / "hotpath.c"), *sorted(str(p) for p in csrc.glob("*.c"))]
    subprocess.run(["gcc", *CFLAGS, f"-I{csrc}", "-o", str(exe), *srcs, "-luring", "-lpthread"],
                   check=True)
    return exe


LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*?)\s+(\S+:\S+)\s+\[(.*)\]\s*$")


def parse_annotate(text: str) -> tuple[list[str], dict[str, list[int]]]:
    """callgrind_annotate --inclusive=no output: event names, {function: counts}."""
    events: list[str] = []
    funcs: dict[str, list[int]] = {}
    for ln in text.splitlines():
        if ln.startswith("Events shown:"):
            events = ln.split(":", 1)[1].split()
            continue
        if not events or "PROGRAM TOTALS" in ln or not ln.strip() or not ln.lstrip()[0].isdigit() and \
                not ln.lstrip().startswith("."):
            continue
        body = re.sub(r"\(\s*[\d.]+%\)", "", ln)          # drop percentages
        parts = body.split()
        nums, rest = parts[:len(events)], parts[len(events):]
        if len(nums) < len(events) or not rest:
            continue
        try:
            counts = [0 if x == "." else int(x.replace(",", "")) for x in nums]
        except ValueError:
            continue
        fn = rest[0].split(":", 1)[-1]
        funcs[fn] = [a + b for a, b in zip(funcs.get(fn, [0] * len(events)), counts)]
    return events, funcs


def measure(requests: int, qd: int, batch: int, block: int, op: str, keep: Path | None,
            csrc: Path = CSRC) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastshadow-cg-") as tmp:
        out = Path(tmp)
        exe = build(out, csrc)
        cg = out / "callgrind.out"
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--cache-sim=yes", f"--LL={LL}",
             *(f"--toggle-collect={t}" for t in TOGGLES), f"--callgrind-out-file={cg}",
             str(exe), str(requests), str(qd), str(batch), str(block), op],
            capture_output=True, text=True, check=True)
        info = json.loads(run.stdout.strip().splitlines()[-1])
        ann = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", str(cg)],
                             capture_output=True, text=True, check=True).stdout
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(cg, keep / "callgrind.out")
    events, funcs = parse_annotate(ann)
    ix = {e: i for i, e in enumerate(events)}
    n = info["requests"]
    per: dict[str, dict[str, float]] = {}
    for fn, c in funcs.items():
        per[fn] = {"Ir": c[ix["Ir"]] / n,
                   "L1m": (c[ix["D1mr"]] + c[ix["D1mw"]]) / n,
                   "LLm": (c[ix["DLmr"]] + c[ix["DLmw"]]) / n}
    total = {e: sum(v[e] for v in per.values()) for e in EVENTS}
    return {"workload": info, "ll_cache": LL, "toggles": TOGGLES, "total": total,
            "functions": dict(sorted(per.items(), key=lambda kv: -kv[1]["Ir"]))}


def cycles(v: dict) -> float:
    """kcachegrind's cycle estimate (CEst) of one row."""
    return v["Ir"] + 10 * v["L1m"] + 100 * v["LLm"]


def table(res: dict, top: int = 25) -> str:
    lines = ["| function | Ir/req | L1 miss/req | LL miss/req | cyc/req |", "|---|--:|--:|--:|--:|"]
    for fn, v in [kv for kv in res["functions"].items() if kv[1]["Ir"] >= 0.5][:top]:
        lines.append(f"| `{fn}` | {v['Ir']:.1f} | {v['L1m']:.2f} | {v['LLm']:.2f} | {cycles(v):.0f} |")
    t = res["total"]
    lines.append(f"| **total** | **{t['Ir']:.1f}** | **{t['L1m']:.2f}** | **{t['LLm']:.2f}** | "
                 f"**{cycles(t):.0f}** |")
    return "\n".join(lines)


def compare(before: dict, after: dict, top: int = 25) -> str:
    """Markdown: each function of either run, before -> after, per request."""
    names = list(before["functions"])
    names += [f for f in after["functions"] if f not in names]
    zero = {"Ir": 0.0, "L1m": 0.0, "LLm": 0.0}
    rows = []
    for fn in names:
        b, a = before["functions"].get(fn, zero), after["functions"].get(fn, zero)
        if max(b["Ir"], a["Ir"]) < 0.5:
            continue
        rows.append((max(b["Ir"], a["Ir"]), f"| `{fn}` | {b['Ir']:.1f} | {a['Ir']:.1f} | "
                     f"{b['L1m']:.2f} | {a['L1m']:.2f} | {b['LLm']:.2f} | {a['LLm']:.2f} | "
                     f"{cycles(b):.0f} | {cycles(a):.0f} |"))
    rows.sort(key=lambda r: -r[0])
    tb, ta = before["total"], after["total"]
    return "\n".join(
        ["| function | Ir/req before | after | L1 miss/req before | after | LL miss/req before | after "
         "| cyc/req before | after |",
         "|---|--:|--:|--:|--:|--:|--:|--:|--:|", *[r for _, r in rows[:top]],
         f"| **total** | **{tb['Ir']:.1f}** | **{ta['Ir']:.1f}** | **{tb['L1m']:.2f}** | **{ta['L1m']:.2f}** | "
         f"**{tb['LLm']:.2f}** | **{ta['LLm']:.2f}** | **{cycles(tb):.0f}** | **{cycles(ta):.0f}** |"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastshadow.bench.callgrind", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--batch", type=int, default=0, help="completions per backend step (0: qd)")
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--op", choices=("read", "write"), default="read")
    p.add_argument("--label", default="run", help="JSON file name in --out")
    p.add_argument("--out", type=Path, help="directory for <label>.json")
    p.add_argument("--csrc", type=Path, default=CSRC,
                   help="the data plane sources to measure (default: this tree's; another checkout's "
                        "csrc/ for a before/after)")
    p.add_argument("--keep", type=Path, help="directory to keep callgrind.out in (callgrind_annotate)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                   help="print the before/after Markdown table of two JSON files and exit")
    a = p.parse_args(argv)
    if a.compare:
        b, c = (json.loads(x.read_text()) for x in a.compare)
        print(compare(b, c))
        return 0
    res = measure(a.requests, a.qd, a.batch or a.qd, a.block, a.op, a.keep, a.csrc.resolve())
    res["label"] = a.label
    print(json.dumps(res["workload"]))
    print(table(res))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.label}.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
