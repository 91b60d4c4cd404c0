"""Trace records (msgspec), biolatency-style histograms on the terminal, PNG plots.

One bucket rule everywhere (the bcc programs, the data plane's own histograms,
the terminal, the PNG and the JSON): durations in microseconds, obtained from
nanoseconds by a division by 1000 (not a shift, so a bucket is 1 µs wide and
not 1.024 µs); bucket 0 holds [0, 1) µs and bucket s >= 1 holds
[2^(s-1), 2^s) µs. `bucket_bounds` and `bucket_label` are the only places
that turn a bucket number into words.
"""

from __future__ import annotations

import msgspec

#: In the order they are printed: a request's path, then end to end.
HOPS = ["kick_to_shadowed", "shadowed_to_kick", "backend", "call_to_completed", "call_to_used", "completed_to_call",
        "end_to_end", "driver_end_to_end"]
HOP_TITLES = {
    "kick_to_shadowed": "guest kick -> request shadowed",
    "shadowed_to_kick": "request shadowed -> backend kicked",
    "call_to_completed": "backend call -> request completed to the guest",
    "completed_to_call": "request completed -> guest called",
    "end_to_end": "guest kick -> request completed (through the proxy)",
    "driver_end_to_end": "driver submit -> driver complete (load generator)",
    "backend": "request shadowed -> backend call seen for it",
    "call_to_used": "backend call seen -> guest used element written",
}
COUNTERS = ["guest_kick", "request_shadowed", "backend_kick", "backend_call", "request_completed",
            "guest_call", "request_refused", "completed_without_start", "map_full", "request_sampled"]

#: The unit of every bucket bound, and the rule, as the JSON states them.
UNIT = "us"
BUCKET_RULE = "bucket 0: [0, 1) us; bucket s >= 1: [2^(s-1), 2^s) us (ns / 1000, then log2)"


def bucket_bounds(slot: int) -> tuple[int, int]:
    """[lo, hi) of bucket `slot`, in microseconds."""
    return (0, 1) if slot == 0 else (1 << (slot - 1), 1 << slot)


def bucket_label(slot: int) -> str:
    lo, hi = bucket_bounds(slot)
    return f"{lo} -> {hi}"


class Histogram(msgspec.Struct):
    hop: str
    queue: int
    #: bucket -> count; bucket rule: BUCKET_RULE (microseconds)
    slots: dict[int, int]
    #: the device's name in its proxy (the data plane's id as text when the name is unknown)
    device: str = ""

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
    unit: str = UNIT
    buckets: str = BUCKET_RULE
    #: 1: every request (probes at every hop); N > 1: 1 request in N per queue, chosen by the data plane
    sample_every: int = 1
    device: str | None = None

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for iv in self.intervals:
            for k, v in iv.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def merged(self) -> list[Histogram]:
        """The whole run's histograms, one per (hop, device, queue)."""
        return merge(h for iv in self.intervals for h in iv.histograms)


def merge(hists) -> list[Histogram]:
    acc: dict[tuple[str, str, int], dict[int, int]] = {}
    for h in hists:
        slots = acc.setdefault((h.hop, h.device, h.queue), {})
        for s, c in h.slots.items():
            slots[s] = slots.get(s, 0) + c
    return [Histogram(hop, q, dict(sorted(s.items())), device=dev)
            for (hop, dev, q), s in sorted(acc.items(), key=lambda kv: (_hop_order(kv[0][0]), kv[0][1], kv[0][2]))]


def _hop_order(hop: str) -> int:
    return HOPS.index(hop) if hop in HOPS else 99


def header(h: Histogram) -> str:
    where = f"device {h.device}, queue {h.queue}" if h.device else f"queue {h.queue}"
    return f"{HOP_TITLES.get(h.hop, h.hop)}  [{where}]  {h.total} samples"


def format_histogram(h: Histogram) -> str:
    """Like bcc's print_log2_hist, with the bucket bounds of BUCKET_RULE ([lo, hi) µs)."""
    lines = ["\n" + header(h), f"{'usecs':>20} : count     distribution"]
    if not h.slots:
        return "\n".join(lines)
    lo, top = min(h.slots), max(h.slots)
    peak = max(h.slots.values())
    for s in range(min(lo, 0), top + 1):
        c = h.slots.get(s, 0)
        bar = "*" * (round(40 * c / peak) if peak else 0)
        lines.append(f"{bucket_label(s):>20} : {c:<9} |{bar:<40}|")
    return "\n".join(lines)


def format_histograms(hists: list[Histogram]) -> str:
    return "\n".join(format_histogram(h) for h in merge(hists))


def format_interval(iv: Interval) -> str:
    parts = [format_histograms(iv.histograms)] if iv.histograms else []
    counts = "  ".join(f"{k}={v}" for k, v in iv.counts.items() if v)
    parts.append(f"\nevents: {counts or 'none'}" + (f"  LOST={iv.lost}" if iv.lost else ""))
    return "\n".join(parts)


def plot(run: TraceRun, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = [h for h in run.merged() if h.total]
    n = max(1, len(hists))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), squeeze=False)
    for ax, h in zip(axes[:, 0], hists):
        xs = list(range(min(h.slots), max(h.slots) + 1))
        ax.bar([bucket_label(x) for x in xs], [h.slots.get(x, 0) for x in xs], color="#3b7dd8")
        ax.set_title(header(h), fontsize=9)
        ax.set_ylabel("count")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    if not hists:
        axes[0, 0].text(0.5, 0.5, "no samples", ha="center")
    axes[-1, 0].set_xlabel(f"latency, {UNIT} (bucket [lo, hi): {BUCKET_RULE})")
    sampled = f", 1 request in {run.sample_every}" if run.sample_every > 1 else ""
    fig.suptitle(f"fastshadow notification latency, pid {run.pid or run.driver_pid}{sampled}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.4 * n)))   # room for the title above the first panel
    fig.savefig(path, dpi=110)
    plt.close(fig)
