"""`fastshadow trace` per device, sampled, and from the stats file: two isolated devices in
one proxy (two real qemu-storage-daemons), a known number of requests on each.

- every histogram names its device; the two devices' counts stay apart;
- `--device NAME` traces that device only;
- `--sample N` follows exactly one request in N per queue (the data plane's choice, by
  publish order) through every hop, from one probe hit per request;
- `--quiet` still prints the whole run's histograms at exit;
- `--from-stats` prints the data plane's own histograms (no bcc), per device, and their
  counts are the requests served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastshadow.trace import environment

from .test_trace_live import start_trace, stop_trace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bcc needs root (CI runs as root)")

N0, N1 = 1000, 2000           # requests on dev0 and dev1
SAMPLED_HOPS = {"kick_to_shadowed", "backend", "call_to_used", "end_to_end"}


@pytest.fixture
def two_devices(workdir, start_qsd, start_proxy):
    for i in range(2):
        start_qsd(str(workdir / f"qsd{i}.sock"), driver="null", size="256M", num_queues=2)
    stats = workdir / "stats.json"
    proxy = start_proxy(["--listen", str(workdir / "fs0.sock"), "--name", "dev0", "--backend",
                         str(workdir / "qsd0.sock"), "--mode", "isolated",
                         "--listen", str(workdir / "fs1.sock"), "--name", "dev1", "--backend",
                         str(workdir / "qsd1.sock"), "--mode", "isolated",
                         "--stats-interval", "0.1", "--stats-file", str(stats)],
                        [str(workdir / "fs0.sock"), str(workdir / "fs1.sock")])
    return proxy, stats


def completed(stats_path) -> dict[str, int]:
    """{device: requests completed} of the proxy's stats file ({} until its first write)."""
    try:
        snap = json.loads(stats_path.read_text())
    except (OSError, ValueError):   # not written yet (replaced atomically, never partial)
        return {}
    return {d["name"]: sum(q["stats"]["completed"] for q in d["queues"]) for d in snap["devices"]}


def sessions(workdir):
    from fastshadow.bench.loadgen import Session
    return [Session(str(workdir / f"fs{i}.sock"), num_queues=2, max_qd=8, max_block_size=4096) for i in range(2)]


def by_device(run, hops=None) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for h in run.merged():
        if hops is None or h.hop in hops:
            out[(h.device, h.hop)] = out.get((h.device, h.hop), 0) + h.total
    return out


@pytest.fixture(autouse=True)
def _tracing_possible(request):
    if "from_stats" in request.node.name:
        return                      # needs no bcc
    missing = [c for c in environment.checks() if not c.ok]
    if missing:
        pytest.skip("tracing not possible here: " + "; ".join(f"{c.name}: {c.fix}" for c in missing))


def test_devices_stay_apart_and_device_filter(workdir, two_devices):
    proxy, _ = two_devices
    s0, s1 = sessions(workdir)
    with s0, s1:                                 # both devices have a data plane now
        proc, out = start_trace(workdir, "--pid", str(proxy.pid))
        assert s0.run("read", 4096, 8, requests=N0, queues=2).requests == N0
        assert s1.run("read", 4096, 8, requests=N1, queues=2).requests == N1
        run = stop_trace(workdir, proc, out, "request_completed", N0 + N1)
        counts = by_device(run)
        assert counts[("dev0", "end_to_end")] == N0 and counts[("dev1", "end_to_end")] == N1
        assert run.totals()["request_shadowed"] == N0 + N1
        assert {d for d, _ in counts} == {"dev0", "dev1"}
        text = (workdir / "trace.out").read_text()
        assert "[device dev0, queue 0]" in text and "[device dev1, queue 1]" in text

        (workdir / "trace.out").unlink()
        proc, out = start_trace(workdir, "--pid", str(proxy.pid), "--device", "dev1")
        assert s0.run("read", 4096, 8, requests=N0, queues=2).requests == N0
        assert s1.run("read", 4096, 8, requests=N1, queues=2).requests == N1
        run = stop_trace(workdir, proc, out, "request_completed", N1)
    assert run.totals()["request_completed"] == N1     # dev0's requests never counted
    assert {d for d, _ in by_device(run)} == {"dev1"}
    assert run.device == "dev1"


def test_sampled_trace_follows_one_request_in_n(workdir, two_devices):
    proxy, _ = two_devices
    every = 4
    proc, out = start_trace(workdir, "--pid", str(proxy.pid), "--sample", str(every), "--quiet")
    s0, s1 = sessions(workdir)                   # new devices: publish order starts at 0 per queue
    with s0, s1:
        assert s0.run("read", 4096, 8, requests=N0, queues=2).requests == N0
        assert s1.run("read", 4096, 8, requests=N1, queues=2).requests == N1
        want = {"dev0": N0 // 2 // every * 2, "dev1": N1 // 2 // every * 2}   # per queue: seq 0, 4, 8, ...
        import signal
        import time
        deadline = time.monotonic() + 60
        # Every request_sampled hit was counted before its request completed (the probe fires before
        # the pass publishes the used index); the stats file says the proxy completed them all.
        while True:
            if sum(completed(workdir / "stats.json").values()) == N0 + N1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        out.close()
    from fastshadow.trace.tool import load_json
    run = load_json(str(workdir / "trace.json"))
    assert run.sample_every == every
    assert run.totals().get("request_sampled") == sum(want.values())
    assert run.totals().get("request_completed", 0) == 0      # the per-hop probes were not attached
    counts = by_device(run)
    for dev, n in want.items():
        for hop in SAMPLED_HOPS:
            assert counts[(dev, hop)] == n, (dev, hop, counts)
    text = (workdir / "trace.out").read_text()
    assert "whole run" in text and "[device dev1, queue 1]" in text   # printed at exit, --quiet or not
    assert "events:" not in text.split("whole run")[0]             # --quiet: no interval printed


def test_device_traced_from_when_it_connects(workdir, two_devices):
    """--device for a device not connected yet: the tracer waits for its name, then follows its id
    (a map the BPF program reads, not a constant compiled in); the other device is never counted."""
    import signal
    import time
    proxy, _ = two_devices
    every = 4
    proc, out = start_trace(workdir, "--pid", str(proxy.pid), "--device", "dev1", "--sample", str(every))
    assert "device dev1 (not connected yet: waiting for it)" in (workdir / "trace.out").read_text()
    s0, s1 = sessions(workdir)
    with s0, s1:
        deadline = time.monotonic() + 30
        while "device dev1: data-plane id" not in (workdir / "trace.out").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:   # a deadline that raises
                raise AssertionError("the tracer never found dev1:\n" + (workdir / "trace.out").read_text())
            time.sleep(0.05)
        assert s0.run("read", 4096, 8, requests=N0, queues=2).requests == N0
        assert s1.run("read", 4096, 8, requests=N1, queues=2).requests == N1
        proc.send_signal(signal.SIGINT)         # every hit was counted before its request completed
        assert proc.wait(30) == 0
        out.close()
    from fastshadow.trace.tool import load_json
    run = load_json(str(workdir / "trace.json"))
    assert run.totals().get("request_sampled") == N1 // 2 // every * 2
    assert {d for d, _ in by_device(run)} == {"dev1"}


def test_from_stats_without_bcc(workdir, two_devices):
    _, stats = two_devices
    s0, s1 = sessions(workdir)
    with s0, s1:
        assert s0.run("read", 4096, 8, requests=N0, queues=2).requests == N0
        assert s1.run("write", 4096, 8, requests=N1, queues=2).requests == N1
        import time
        deadline = time.monotonic() + 30
        while True:
            if completed(stats) == {"dev0": N0, "dev1": N1} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "trace", "--from-stats", str(stats),
                            "--device", "dev1", "--json", str(workdir / "fs.json")],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[device dev1, queue 0]" in r.stdout and "dev0" not in r.stdout
    assert "0 -> 1" in r.stdout and "1 -> 2" in r.stdout          # [lo, hi) microseconds
    data = json.loads((workdir / "fs.json").read_text())
    assert data["unit"] == "us" and "ns / 1000" in data["buckets"]
    per_hop: dict[str, int] = {}
    for h in data["intervals"][0]["histograms"]:
        assert h["device"] == "dev1"
        per_hop[h["hop"]] = per_hop.get(h["hop"], 0) + sum(h["slots"].values())
    assert per_hop == {hop: N1 for hop in SAMPLED_HOPS}
    bad = subprocess.run([sys.executable, "-m", "fastshadow.cli", "trace", "--from-stats", str(stats),
                          "--device", "nosuch"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no device 'nosuch'" in bad.stderr
