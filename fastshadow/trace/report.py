"""Trace records (msgspec), biolatency-style histograms on the terminal, PNG plots."""

from __future__ import annotations

import msgspec

HOPS = ["kick_to_shadowed", "shadowed_to_kick", "call_to_completed", "completed_to_call", "end_to_end"]
HOP_TITLES = {
    "kick_to_shadowed": "guest kick -> request shadowed",
    "shadowed_to_kick": "request shadowed -> backend kicked",
    "call_to_completed": "backend call -> request completed to the guest",
    "completed_to_call": "request completed -> guest called",
    "end_to_end": "guest kick -> request completed (through the proxy)",
    "driver_end_to_end": "driver submit -> driver complete (load generator)",
}
COUNTERS = ["guest_kick", "request_shadowed", "backend_kick", "backend_call", "request_completed",
            "guest_call", "request_refused", "completed_without_start", "map_full"]


class Histogram(msgspec.Struct):
    hop: str
    queue: int
    #: log2 buckets: slot i counts deltas in [2^i, 2^(i+1)) ns (slot 0: 0-1 ns).
    slots: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.slots.values())


class Interval(msgspec.Struct):
    pid: int
    start_ns: int
    end_ns: int
    counts: dict[str, int]
    histograms: list[Histogram]
    lost: int = 0


class TraceRun(msgspec.Struct):
    pid: int
    driver_pid: int | None
    queue: int | None
    intervals: list[Interval]

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for iv in self.intervals:
            for k, v in iv.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def merged(self) -> list[Histogram]:
        acc: dict[tuple[str, int], dict[int, int]] = {}
        for iv in self.intervals:
            for h in iv.histograms:
                slots = acc.setdefault((h.hop, h.queue), {})
                for s, c in h.slots.items():
                    slots[s] = slots.get(s, 0) + c
        return [Histogram(hop, q, dict(sorted(s.items()))) for (hop, q), s in sorted(acc.items())]


def _range(slot: int) -> tuple[int, int]:
    return (0, 1) if slot == 0 else (1 << slot, (1 << (slot + 1)) - 1)


def format_histogram(h: Histogram, unit: str = "usecs") -> str:
    """Like bcc's print_log2_hist, in microseconds (ns slots folded by 2^10)."""
    div_shift = 10 if unit == "usecs" else 0
    folded: dict[int, int] = {}
    for s, c in h.slots.items():
        fs = max(0, s - div_shift)
        folded[fs] = folded.get(fs, 0) + c
    lines = [f"\n{HOP_TITLES.get(h.hop, h.hop)}  [queue {h.queue}]  {h.total} samples",
             f"{unit:>20} : count     distribution"]
    if not folded:
        return "\n".join(lines)
    top = max(folded)
    peak = max(folded.values())
    for s in range(0, top + 1):
        lo, hi = _range(s)
        c = folded.get(s, 0)
        bar = "*" * (round(40 * c / peak) if peak else 0)
        lines.append(f"{lo:>9} -> {hi:<9}: {c:<9} |{bar:<40}|")
    return "\n".join(lines)


def format_interval(iv: Interval) -> str:
    parts = [format_histogram(h) for h in sorted(iv.histograms, key=lambda h: (HOPS.index(h.hop)
                                                                                  if h.hop in HOPS else 99, h.queue))]
    counts = "  ".join(f"{k}={v}" for k, v in iv.counts.items() if v)
    parts.append(f"\nevents: {counts or 'none'}" + (f"  LOST={iv.lost}" if iv.lost else ""))
    return "\n".join(parts)


def plot(run: TraceRun, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = [h for h in run.merged() if h.total]
    if not hists:
        hists = []
    n = max(1, len(hists))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), squeeze=False)
    for ax, h in zip(axes[:, 0], hists):
        slots = sorted(h.slots)
        xs = list(range(min(slots), max(slots) + 1))
        ax.bar([str(_fmt_ns(1 << x)) for x in xs], [h.slots.get(x, 0) for x in xs], color="#3b7dd8")
        ax.set_title(f"{HOP_TITLES.get(h.hop, h.hop)} — queue {h.queue} ({h.total} samples)", fontsize=9)
        ax.set_ylabel("count")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    if not hists:
        axes[0, 0].text(0.5, 0.5, "no samples", ha="center")
    axes[-1, 0].set_xlabel("latency (log2 buckets, lower bound)")
    fig.suptitle(f"fastshadow notification latency, pid {run.pid or run.driver_pid}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_ns(ns: int) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1e6:g}ms"
    if ns >= 1000:
        return f"{ns / 1e3:g}us"
    return f"{ns}ns"
