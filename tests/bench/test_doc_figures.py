"""The benchmark figures quoted in the docs are the ones in the JSON they cite.

README.md's "What isolation costs" paragraph and bench/RESULTS.md's tables
quote bench/results/results.json (and bench/results/free-proxy/results.json).
Each figure is recomputed here from the runs in those files, independently of
fastshadow.bench.report (median of the reps per workload and mode, ratios,
geometric means), formatted as the docs write it, and the doc must contain the
exact sentence or table row. A new run, or an edited figure, fails here until
the doc says what the data says; the assertion message gives the text to paste.
The tables `python -m fastshadow.bench.report results.json --markdown` generates
must appear verbatim in RESULTS.md.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "results.json"
FREE = ROOT / "bench" / "results" / "free-proxy" / "results.json"
KiB, MiB = 1 << 10, 1 << 20


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


class Data:
    def __init__(self, path: Path):
        self.raw = json.loads(path.read_text())
        reps: dict[tuple, list[dict]] = {}
        for r in self.raw["runs"]:
            w = r["workload"]
            reps.setdefault((r["backend"], r["mode"], w["rw"], w["bs"], w["qd"], w.get("queues", 1)), []).append(r)
        self.med = {k: {f: statistics.median(x[f] for x in v) for f in ("iops", "mb_per_s", "lat_p50_ns")}
                    for k, v in reps.items()}

    def get(self, mode, rw, bs, qd, queues=1, backend="null"):
        return self.med[(backend, mode, rw, bs, qd, queues)]

    def iops_ratios(self, backend: str, mode: str) -> list[float]:
        return [v["iops"] / self.med[(b, "direct", *rest)]["iops"]
                for (b, m, *rest), v in self.med.items() if b == backend and m == mode]

    def qd1_added_us(self) -> float:
        """Isolated's 4 KiB randread QD1 p50 minus direct's (null-co), µs."""
        return (self.get("isolated", "randread", 4 * KiB, 1)["lat_p50_ns"]
                - self.get("direct", "randread", 4 * KiB, 1)["lat_p50_ns"]) / 1e3

    @property
    def cold(self) -> float:
        return self.raw["memcpy"]["cold_gb_per_s"]


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def ratio(x: float) -> str:
    """As the docs write a ratio: two decimals, one significant digit below 0.1."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.1g}"


def assert_readme_says(want: str) -> None:
    readme = squash((ROOT / "README.md").read_text())
    assert want in readme, f"README.md must say, from the JSON:\n{want}"


def test_readme_paragraph_is_the_json():
    d, free = Data(RESULTS), Data(FREE)
    f, n = d.iops_ratios("file", "isolated"), d.iops_ratios("null", "isolated")
    qd1 = d.qd1_added_us()
    big = free.get("isolated", "read", MiB, 8)["mb_per_s"] / 1e3
    want = (f"on a real image (`file`), {ratio(geomean(f))}× the IOPS of direct mode (geometric mean over {len(f)} "
            f"workloads; {ratio(min(f))}-{ratio(max(f))}× by workload); on `null-co`, where direct mode does "
            f"almost nothing, {ratio(geomean(n))}× (geometric mean over {len(n)} workloads; "
            f"{ratio(min(n))}-{ratio(max(n))}× by workload, {sum(x < 0.2 for x in n)} of {len(n)} below 0.2×); "
            f"4 KiB QD1 p50 latency {qd1:+.1f} µs against direct (`null-co`). With a CPU of its own "
            f"(`bench/results/free-proxy/results.json`) the data plane copies 1 MiB reads at {big:.1f} GB/s "
            f"({big / free.cold:.2f}× a single-core cold memcpy).")
    assert_readme_says(want)


def test_results_md_headline_is_the_json():
    d = Data(RESULTS)
    modes = ("direct", "proxy-direct", "isolated")

    def row(label, values, last):
        return f"| {label} | " + " | ".join(values) + f" | {last} |"
    p50 = [d.get(m, "randread", 4 * KiB, 1)["lat_p50_ns"] / 1e3 for m in modes]
    q32 = [d.get(m, "randread", 4 * KiB, 32)["iops"] / 1e3 for m in modes]
    r256 = [d.get(m, "read", 256 * KiB, 8)["mb_per_s"] / 1e3 for m in modes]
    r1m = [d.get(m, "read", MiB, 8)["mb_per_s"] / 1e3 for m in modes]
    w1m = d.get("isolated", "write", MiB, 8)["mb_per_s"] / 1e3
    q32x2 = [d.get(m, "randread", 4 * KiB, 32, 2)["iops"] / 1e3 for m in modes]
    gm = {(b, m): geomean(d.iops_ratios(b, m)) for b in ("file", "null") for m in modes[1:]}
    count = {b: len(d.iops_ratios(b, "isolated")) for b in ("file", "null")}
    rows = [
        row("4 KiB randread QD1, p50", [f"{x:.1f} µs" for x in p50], f"added latency {p50[2] - p50[0]:+.1f} µs"),
        row("4 KiB randread QD32, 1 queue", [f"{x:.0f}k IOPS" for x in q32], f"{q32[2] / q32[0]:.2f} (target 0.90)"),
        row("256 KiB read QD8", [f"{x:.1f} GB/s" for x in r256],
            f"{r256[2] / r256[0]:.2f} (target 0.80; see below)"),
        row("1 MiB read QD8", [f"{x:.1f} GB/s" for x in r1m], f"{r1m[2] / d.cold:.2f}× cold memcpy (target 0.70)"),
        f"| 1 MiB write QD8 | (no data moved) | | {w1m:.1f} GB/s | {w1m / d.cold:.2f}× cold memcpy |",
        row("4 KiB randread QD32, 2 queues", [f"{x:.0f}k IOPS" for x in q32x2], f"{q32x2[2] / q32x2[0]:.2f}"),
        *(f"| {b}: geometric mean over {count[b]} workloads | | {gm[b, 'proxy-direct']:.2f} | "
          f"{gm[b, 'isolated']:.2f} | |" for b in ("file", "null")),
        f"**memcpy baseline, one core:** {d.cold:.1f} GB/s cold (256 MiB buffers), "
        f"{d.raw['memcpy']['hot_gb_per_s']:.1f} GB/s hot (1 MiB).",
    ]
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    missing = [r for r in rows if r not in text]
    assert not missing, "bench/RESULTS.md must say, from results.json:\n" + "\n".join(missing)
    assert f"{len(d.raw['runs'])} runs, {d.raw['wall_s']:.0f} s, none failed" in squash(text)
    assert d.raw["skipped"] == []


def test_results_md_own_cpu_table_is_the_json():
    d = Data(FREE)
    p50 = [d.get(m, "randread", 4 * KiB, 1)["lat_p50_ns"] / 1e3 for m in ("direct", "isolated")]
    q32 = [d.get(m, "randread", 4 * KiB, 32)["iops"] / 1e3 for m in ("direct", "isolated")]
    r256 = [d.get(m, "read", 256 * KiB, 8)["mb_per_s"] / 1e3 for m in ("direct", "isolated")]
    r1m = [d.get(m, "read", MiB, 8)["mb_per_s"] / 1e3 for m in ("direct", "isolated")]
    w1m = d.get("isolated", "write", MiB, 8)["mb_per_s"] / 1e3
    rows = [
        f"| 4 KiB randread QD1, p50 | {p50[0]:.1f} µs | {p50[1]:.1f} µs | {p50[1] - p50[0]:+.1f} µs |",
        f"| 4 KiB randread QD32 | {q32[0]:.0f}k IOPS | {q32[1]:.0f}k IOPS | {q32[1] / q32[0]:.2f} |",
        f"| 256 KiB read QD8 | {r256[0]:.1f} GB/s | {r256[1]:.1f} GB/s | {r256[1] / r256[0]:.2f} |",
        f"| 1 MiB read QD8 | {r1m[0]:.1f} GB/s | {r1m[1]:.1f} GB/s | **{r1m[1] / d.cold:.2f}× cold memcpy** |",
        f"| 1 MiB write QD8 | (no data moved) | {w1m:.1f} GB/s | {w1m / d.cold:.1f}× cold memcpy |",
        f"memcpy {d.cold:.1f} GB/s cold in that run",
    ]
    text = squash((ROOT / "bench" / "RESULTS.md").read_text())
    missing = [r for r in rows if squash(r) not in text]
    assert not missing, "bench/RESULTS.md (own CPU) must say, from free-proxy/results.json:\n" + "\n".join(missing)


def test_results_md_tables_are_generated_from_the_json():
    out = subprocess.run([sys.executable, "-m", "fastshadow.bench.report", str(RESULTS), "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("\n|") > 100                     # the geometric means and every workload
    assert out.strip() in (ROOT / "bench" / "RESULTS.md").read_text(), \
        "bench/RESULTS.md's tables differ from `python -m fastshadow.bench.report results.json --markdown`"


SCALE = ROOT / "bench" / "results" / "scale" / "results.json"


def test_results_md_scale_section_is_the_json():
    """bench/RESULTS.md's scale tables and its 64-core paragraph are `python -m fastshadow.bench.scale
    results.json --markdown`; a few figures are recomputed here from the raw points."""
    out = subprocess.run([sys.executable, "-m", "fastshadow.bench.scale", str(SCALE), "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    blocks = [b for b in out.strip().split("\n\n") if b.strip()]
    assert len(blocks) == 3                              # two tables and the 64-core paragraph
    missing = [b for b in blocks if b not in text]
    assert not missing, "bench/RESULTS.md's scale section differs from `python -m fastshadow.bench.scale " \
                        "bench/results/scale/results.json --markdown`:\n" + "\n\n".join(missing)
    d = json.loads(SCALE.read_text())
    iso = [p for p in d["points"] if p["mode"] == "isolated"]
    assert sorted({(p["devices"], p["queues"]) for p in iso}) == [(n, q) for n in (1, 2, 4, 8, 16, 32)
                                                                  for q in (1, 2, 4)]
    for p in iso:
        row = (f"| {p['devices']} | {p['queues']} | {p['threads']} | {p['iops'] / 1e3:.1f}k | ")
        assert row in text, f"no scale row starting {row}"
        assert p["idle"]["shadow_resident"] == p["trimmed"]["shadow_resident"], p   # everything given back
    many = [p["proxy_cpu_us_per_request"] for p in iso if p["devices"] >= 8]
    assert f"The proxy spends {statistics.median(many):.2f} µs of CPU per 4 KiB request" in squash(text)
    assert "fastshadow bench --scale --scale-direct --out bench/results/scale" in text


TRACING = ROOT / "bench" / "results" / "tracing" / "results.json"
HIST_INSTRUCTIONS = ROOT / "bench" / "results" / "tracing" / "hist_instructions.json"


def _variant_rows(path: Path) -> dict[str, dict[str, float]]:
    """Per mode against isolated, recomputed from the runs: median IOPS ratio, the per-rep range,
    and the proxy's CPU µs per request ratio (medians)."""
    raw = json.loads(path.read_text())
    by: dict[str, dict[int, dict]] = {}
    for r in raw["runs"]:
        by.setdefault(r["mode"], {})[r["rep"]] = r
    base = by["isolated"]

    def med(mode, f):
        return statistics.median(f(r) for r in by[mode].values())
    out = {}
    for mode in by:
        if mode == "isolated":
            continue
        paired = [by[mode][k]["iops"] / base[k]["iops"] for k in by[mode] if k in base]
        out[mode] = {
            "iops": med(mode, lambda r: r["iops"]) / med("isolated", lambda r: r["iops"]),
            "lo": min(paired), "hi": max(paired), "reps": len(paired),
            "proxy": med(mode, lambda r: r["cpu_s"]["proxy"] / r["requests"])
            / med("isolated", lambda r: r["cpu_s"]["proxy"] / r["requests"]),
        }
    return out


def test_results_md_tracing_overhead_is_the_json():
    one = _variant_rows(TRACING)
    b, s, s4, h = one["bcc"], one["sampled"], one["sampled256"], one["nohist"]
    ins = json.loads(HIST_INSTRUCTIONS.read_text())
    on, off, n = ins["instructions_on"] / ins["requests"], ins["instructions_off"] / ins["requests"], ins["requests"]
    rows = [
        f"| `fastshadow trace` (every probe of every request) | {b['iops']:.3f} | {b['lo']:.3f} – {b['hi']:.3f} | "
        f"{b['proxy']:.2f} |",
        f"| `fastshadow trace --sample 64` | {s['iops']:.3f} | {s['lo']:.3f} – {s['hi']:.3f} | {s['proxy']:.2f} |",
        f"| `fastshadow trace --sample 256` | {s4['iops']:.3f} | {s4['lo']:.3f} – {s4['hi']:.3f} | {s4['proxy']:.2f} |",
        f"| always-on histograms (isolated ÷ `--no-latency-histograms`) | {1 / h['iops']:.3f} | "
        f"{1 / h['hi']:.3f} – {1 / h['lo']:.3f} | {1 / h['proxy']:.2f} |",
        f"costs more than half the throughput ({b['iops']:.2f}×",
        f"keeps {s['iops']:.3f} of the throughput by the median",
        f"the proxy's CPU per request ×{s['proxy']:.2f}",
        f"`--sample 256`: {s4['iops']:.3f} and ×{s4['proxy']:.2f}",
        f"{1 / h['iops']:.3f}× by the median, the proxy's CPU per request ×{1 / h['proxy']:.2f}",
        f"{on:.0f} instructions per request with the histograms and {off:.0f} without ({n} requests): "
        f"+{on - off:.0f}, {100 * (on - off) / off:.1f} %",
        f"{len(json.loads(TRACING.read_text())['runs'])} runs",
        f"(each a nop): {(ins['instructions_probes'] - ins['instructions_no_probes']) / n:.1f} instructions per "
        f"request, {100 * (ins['instructions_probes'] - ins['instructions_no_probes']) / ins['instructions_no_probes']:.1f} %",
    ]
    iso_us = statistics.median(r["cpu_s"]["proxy"] / r["requests"] * 1e6
                               for r in json.loads(TRACING.read_text())["runs"] if r["mode"] == "isolated")
    rows.append(f"(isolated: {iso_us:.2f} µs per request), one trap costs the proxy about "
                f"{(s4['proxy'] - 1) * iso_us * 256:.0f} µs on this VM")
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    missing = [r for r in rows if r not in text and r not in squash(text)]
    assert not missing, "bench/RESULTS.md (tracing overhead) must say, from the tracing JSON:\n" + "\n".join(missing)
    out = subprocess.run([sys.executable, "-m", "fastshadow.bench.report", str(TRACING), "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    table = out.split("#### backend")[0].strip()
    assert "variants against isolated" in table and table in text, \
        "bench/RESULTS.md must hold `python -m fastshadow.bench.report bench/results/tracing/results.json " \
        "--markdown`'s variants table verbatim"


MINUTE = ROOT / "bench" / "results" / "tracing-minute" / "results.json"


def test_results_md_one_device_for_a_minute_is_the_json():
    m = _variant_rows(MINUTE)["minute"]
    row = (f"| one device traced for 60 s (`--device bench-minute --sample 256`) | {m['iops']:.3f} | "
           f"{m['lo']:.3f} – {m['hi']:.3f} | {m['proxy']:.2f} |")
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    assert row in text, f"bench/RESULTS.md must say, from {MINUTE.relative_to(ROOT)}:\n{row}"
    assert f"{m['reps']} reps of 60 s" in squash(text)
    iops = [r["iops"] for r in json.loads(MINUTE.read_text())["runs"]]
    assert f"{min(iops) / 1e3:.0f}-{max(iops) / 1e3:.0f}k IOPS" in squash(text)
    # The tracer's own output at exit, kept next to the JSON.
    sampled = re.search(r"request_sampled=(\d+)", (MINUTE.parent / "trace.txt").read_text()).group(1)
    assert f"{sampled} sampled requests" in squash(text)


# Issue 12 (per-request cost): the callgrind before/after tables and the interleaved runs of
# this tree against the code before it (`--variant base="@PYTHON"`), quoted in bench/RESULTS.md.
CALLGRIND = ROOT / "bench" / "results" / "callgrind"
ISSUE12 = ROOT / "bench" / "results" / "issue12"


def test_results_md_callgrind_tables_are_the_json():
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    full = subprocess.run([sys.executable, "-m", "fastshadow.bench.callgrind", "--compare",
                           str(CALLGRIND / "before-qd32.json"), str(CALLGRIND / "after-qd32.json")],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert full in text, "bench/RESULTS.md must hold `python -m fastshadow.bench.callgrind --compare " \
                         "before-qd32.json after-qd32.json` verbatim"
    missing = []
    for label in ("qd32-b4", "qd1", "qd32-write", "1m-qd8"):
        b, a = (json.loads((CALLGRIND / f"{w}-{label}.json").read_text())["total"] for w in ("before", "after"))

        def cyc(t):
            return t["Ir"] + 10 * t["L1m"] + 100 * t["LLm"]
        row = (f"| {label} | {b['Ir']:.0f} | {a['Ir']:.0f} | {b['L1m']:.1f} | {a['L1m']:.1f} | "
               f"{b['LLm']:.1f} | {a['LLm']:.1f} | {cyc(b):.0f} | {cyc(a):.0f} |")
        if row not in text:
            missing.append(row)
    assert not missing, "bench/RESULTS.md (issue 12, other workloads) must say:\n" + "\n".join(missing)


def issue12_row(path: Path, label: str) -> str:
    """One placement's 4 KiB randread QD32 figures: IOPS per mode, ratios, proxy CPU µs per request."""
    runs = json.loads(path.read_text())["runs"]

    def pick(mode):
        return [r for r in runs if r["mode"] == mode and r["workload"]["bs"] == 4 * KiB
                and r["workload"]["qd"] == 32]
    iops = {m: statistics.median(r["iops"] for r in pick(m)) for m in ("direct", "isolated", "base")}
    px = {m: statistics.median(r["cpu_s"]["proxy"] / r["requests"] * 1e6 for r in pick(m))
          for m in ("isolated", "base")}
    other = statistics.median(r["cpu_s"]["other"] / r["duration_s"] for r in runs)
    return (f"| {label} | {iops['direct'] / 1e3:.0f}k | {iops['base'] / 1e3:.0f}k | {iops['isolated'] / 1e3:.0f}k | "
            f"{iops['base'] / iops['direct']:.2f} | {iops['isolated'] / iops['direct']:.2f} | "
            f"{px['base']:.2f} | {px['isolated']:.2f} | {other:.2f} |")


def test_results_md_issue12_runs_are_the_json():
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    rows = [issue12_row(ISSUE12 / "free" / "results.json", "`split-free-proxy`"),
            issue12_row(ISSUE12 / "split" / "results.json", "`split`")]
    missing = [r for r in rows if r not in text]
    assert not missing, "bench/RESULTS.md (issue 12) must say, from bench/results/issue12/*/results.json:\n" + \
        "\n".join(missing)


def perf_stat(path: Path) -> dict[str, float]:
    """`perf stat` output: {event name without its group: count}."""
    out = {}
    for ln in path.read_text().splitlines():
        m = re.match(r"\s*([\d,.]+)\s+(?:msec\s+)?([\w:-]+)", ln)
        if m:
            out[m.group(2).split(":")[-1]] = float(m.group(1).replace(",", ""))
    return out


def test_results_md_issue12_syscalls_are_the_measurement():
    rows = {"syscalls": [], "io_uring_enter": [], "switches": [], "clock": []}
    for place in ("free", "split"):
        d = ISSUE12 / "syscalls" / place
        runs = json.loads((d / "results.json").read_text())["runs"]
        for mode in ("base", "isolated"):
            n = sum(r["requests"] for r in runs if r["mode"] == mode)
            st = perf_stat(d / f"{place}.{mode}.perfstat")
            rows["syscalls"].append(f"{st['sys_enter'] / n:.3f}")
            rows["io_uring_enter"].append(f"{st['sys_enter_io_uring_enter'] / n:.3f}")
            rows["switches"].append(f"{st['sched_switch'] / n:.3f}")
            rows["clock"].append(f"{st['task-clock'] * 1e3 / n:.2f}")
    want = [f"| syscalls | {' | '.join(rows['syscalls'])} |",
            f"| of which `io_uring_enter` | {' | '.join(rows['io_uring_enter'])} |",
            f"| context switches | {' | '.join(rows['switches'])} |",
            f"| task-clock µs (all threads, whole run) | {' | '.join(rows['clock'])} |"]
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    missing = [r for r in want if r not in text]
    assert not missing, "bench/RESULTS.md (issue 12 syscalls) must say:\n" + "\n".join(missing)



def test_results_md_issue12_full_run_is_the_json():
    d = Data(ISSUE12 / "full" / "results.json")
    runs = d.raw["runs"]

    def px(bs, qd):
        return statistics.median(r["cpu_s"]["proxy"] / r["requests"] * 1e6 for r in runs
                                 if r["backend"] == "null" and r["mode"] == "isolated" and
                                 r["workload"]["rw"] == "randread" and r["workload"]["bs"] == bs and
                                 r["workload"]["qd"] == qd and r["workload"].get("queues", 1) == 1)
    q32 = [d.get(m, "randread", 4 * KiB, 32)["iops"] / 1e3 for m in ("direct", "proxy-direct", "isolated")]
    gm = {b: geomean(d.iops_ratios(b, "isolated")) for b in ("null", "file")}
    other = statistics.median(r["cpu_s"]["other"] / r["duration_s"] for r in runs)
    want = [f"| 4 KiB randread QD32 (null) | {q32[0]:.0f}k | {q32[1]:.0f}k | {q32[2]:.0f}k | "
            f"{q32[2] / q32[0]:.2f} | {px(4 * KiB, 32):.2f} µs |",
            f"geometric mean of isolated ÷ direct IOPS: {gm['null']:.2f} on `null`, {gm['file']:.2f} on `file`",
            f"{len(runs)} runs, {d.raw['wall_s']:.0f} s, other work busy {other:.2f} CPUs (median)"]
    text = squash((ROOT / "bench" / "RESULTS.md").read_text())
    missing = [w for w in want if squash(w) not in text]
    assert not missing, "bench/RESULTS.md (issue 12 full run) must say:\n" + "\n".join(missing)


def idle_rows(path: Path, policy: str, place: str) -> list[str]:
    """bench/RESULTS.md, "The machine's idle policy": one row per mode of 4 KiB randread, from
    medians over the reps (CPU µs per request per process; the machine's busy share at QD32)."""
    raw = json.loads(path.read_text())
    ncpu = raw["machine"]["nproc"]
    by: dict[tuple, list[dict]] = {}
    for r in raw["runs"]:
        w = r["workload"]
        if w["bs"] == 4 * KiB and w["rw"] == "randread":
            by.setdefault((r["mode"], w["qd"]), []).append(r)

    def med(mode, qd, f):
        return statistics.median(f(r) for r in by[(mode, qd)])

    def per_req(proc):
        return lambda r: 1e6 * (r["cpu_s"].get(proc) or 0) / r["requests"]

    def busy(r):
        c = r["cpu_s"]
        return sum(c.get(k) or 0 for k in ("loadgen", "proxy", "backend", "other", "steal")) / (ncpu * r["duration_s"])
    direct = med("direct", 32, lambda r: r["iops"])
    rows = []
    for mode in ("direct", "isolated", "nopoll"):
        iops = med(mode, 32, lambda r: r["iops"])
        px = "-" if mode == "direct" else f"{med(mode, 32, per_req('proxy')):.2f}"
        rows.append(f"| {policy} | {place} | {raw['machine']['wake_rtt_us']:.0f} µs | {mode} | {iops / 1e3:.0f}k | "
                    f"{iops / direct:.2f} | {med(mode, 32, busy):.2f} | {med(mode, 32, per_req('loadgen')):.2f} / "
                    f"{px} / {med(mode, 32, per_req('backend')):.2f} | "
                    f"{med(mode, 1, lambda r: r['lat_p50_ns']) / 1e3:.1f} µs |")
    return rows


def test_results_md_idle_policy_runs_are_the_json():
    want = []
    for ns, policy in ((200000, "polls up to 200 µs"), (0, "halts at once")):
        for place in ("split-free-proxy", "split"):
            want += idle_rows(ISSUE12 / "idle" / f"hp{ns}-{place}" / "results.json", policy, f"`{place}`")
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    missing = [r for r in want if r not in text]
    assert not missing, "bench/RESULTS.md (idle policy) must say:\n" + "\n".join(missing)


def test_readme_polling_vcpus_sentence_is_the_json():
    """README's "What isolation costs": the same full run with idle vCPUs polling before they halt."""
    d = Data(ROOT / "bench" / "results" / "haltpoll" / "results.json")
    assert d.raw["machine"]["guest_halt_poll_ns"] == 200000
    f, n = d.iops_ratios("file", "isolated"), d.iops_ratios("null", "isolated")
    qd1 = d.qd1_added_us()
    want = (f"With the VM's idle vCPUs polling up to 200 µs before they halt (the haltpoll driver's default; "
            f"`bench/results/haltpoll/results.json`, wake-up round trip {d.raw['machine']['wake_rtt_us']:.0f} µs), "
            f"direct mode is faster and isolation keeps {ratio(geomean(f))}× on `file` "
            f"({ratio(min(f))}-{ratio(max(f))}× by workload) and {ratio(geomean(n))}× on `null-co` "
            f"({ratio(min(n))}-{ratio(max(n))}×, {sum(x < 0.2 for x in n)} of {len(n)} below 0.2×), and 4 KiB QD1 "
            f"p50 latency is {qd1:+.1f} µs against direct.")
    assert_readme_says(want)
