"""`fastshadow trace` against a running proxy: the load generator issues exactly N
requests while tracing, and the trace counts exactly N (root, bcc; CI runs both)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fastshadow.trace import environment
from fastshadow.trace.tool import load_json

N = 3000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bcc needs root (CI runs as root)")


@pytest.fixture(autouse=True)
def _tracing_possible():
    missing = [c for c in environment.checks() if not c.ok]
    if missing:
        pytest.skip("tracing not possible here: " + "; ".join(f"{c.name}: {c.fix}" for c in missing))


def start_trace(workdir, *args):
    out = open(workdir / "trace.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fastshadow.cli", "trace", *args, "--interval", "1",
                             "--json", str(workdir / "trace.json"), "--plot", str(workdir / "trace.png")],
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90  # compiling the BPF program takes a few seconds
    while "Tracing" not in (workdir / "trace.out").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("trace did not start:\n" + (workdir / "trace.out").read_text())
        time.sleep(0.1)
    return proc, out


def counted(workdir, key: str) -> int:
    """The sum of `key` over the intervals the trace printed so far ("events: k=v ..." lines)."""
    total = 0
    for line in (workdir / "trace.out").read_text().splitlines():
        if line.startswith("events: "):
            total += sum(int(v) for k, v in re.findall(r"(\w+)=(\d+)", line) if k == key)
    return total


def stop_trace(workdir, proc, out, key: str, n: int):
    """Ctrl-C once the trace has printed `n` events `key` (the last probe of each request:
    every count and histogram sample of a request was made by then), not after a fixed
    wait. The final interval is read at exit, so anything counted later still shows."""
    deadline = time.monotonic() + 60
    while counted(workdir, key) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the trace printed {counted(workdir, key)} {key} of {n}:\n"
                                 + (workdir / "trace.out").read_text()[-3000:])
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit that still writes the files
    assert proc.wait(30) == 0, (workdir / "trace.out").read_text()
    out.close()
    return load_json(str(workdir / "trace.json"))


def test_isolated_exact_counts(workdir, start_qsd, start_proxy):
    from fastshadow.bench.loadgen import Session
    start_qsd(str(workdir / "qsd.sock"), driver="null", size="256M", num_queues=2)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "isolated"], [str(workdir / "fs.sock")])
    proc, out = start_trace(workdir, "--pid", str(proxy.pid))
    with Session(str(workdir / "fs.sock"), num_queues=2, max_qd=8, max_block_size=64 << 10) as s:
        r = s.run("read", 4096, 8, requests=N, queues=2)
        assert r.requests == N
    run = stop_trace(workdir, proc, out, "request_completed", N)
    totals = run.totals()
    assert totals["request_shadowed"] == N
    assert totals["request_completed"] == N
    assert totals["completed_without_start"] == 0 and totals["map_full"] == 0
    assert totals["guest_kick"] > 0 and totals["backend_kick"] > 0 and totals["guest_call"] > 0
    merged = {}
    for h in run.merged():
        merged[h.hop] = merged.get(h.hop, 0) + h.total
    # The complete path: every completion is one sample of each of these.
    assert merged["call_to_completed"] == N
    assert merged["end_to_end"] == N
    assert {h.queue for h in run.merged()} == {0, 1}
    assert (workdir / "trace.png").stat().st_size > 0
    text = (workdir / "trace.out").read_text()
    assert "usecs" in text and "guest kick -> request completed" in text
    assert "[device dev0, queue 0]" in text      # named, although the device was gone at the end


def test_direct_mode_driver_view(workdir, start_qsd, start_proxy):
    """Direct mode has no data plane in fastshadow: the hops that exist are the driver's own."""
    from fastshadow.bench.loadgen import Session
    start_qsd(str(workdir / "qsd.sock"), driver="null", size="256M")
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "direct"], [str(workdir / "fs.sock")])
    # Attaching to the proxy itself says why it cannot.
    r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "trace", "--pid", str(proxy.pid), "--duration", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "direct mode has no data plane" in r.stderr
    with Session(str(workdir / "fs.sock"), num_queues=1, max_qd=4, max_block_size=4096) as s:
        proc, out = start_trace(workdir, "--driver-pid", str(os.getpid()))  # the load generator runs here
        res = s.run("read", 4096, 4, requests=N)
        assert res.requests == N
        run = stop_trace(workdir, proc, out, "driver_complete", N)
    totals = run.totals()
    assert totals["driver_complete"] == N and totals["driver_submit"] == N
    assert sum(h.total for h in run.merged() if h.hop == "driver_end_to_end") == N
