"""Prometheus metrics (--metrics-listen): scraped while a block front-end does I/O through an
isolated proxy to a real qemu-storage-daemon, and checked against the work done."""

from __future__ import annotations

import http.client
import os
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ..proxy.blkfront import BlkFront


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_tcp(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def scrape_unix(path: str) -> str:
    c = _UnixHTTP(path)
    c.request("GET", "/metrics")
    r = c.getresponse()
    assert r.status == 200
    return r.read().decode()


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def q(name: str, **labels) -> tuple:
    return (name, tuple(sorted({"device": "disk0", "queue": "0", **labels}.items())))


def d(name: str, **labels) -> tuple:
    return (name, tuple(sorted({"device": "disk0", **labels}.items())))


def check_work(m: dict, writes: int, reads: int, size: int) -> None:
    n = writes + reads
    assert m[q("fastshadow_queue_requests_total")] == n
    assert m[q("fastshadow_queue_completed_total")] == n
    assert m[q("fastshadow_queue_inflight")] == 0
    # To the backend: every header (16 B) and the written data; to the guest: the read data and
    # every status byte.
    assert m[q("fastshadow_queue_bytes_total", direction="to_backend")] == 16 * n + writes * size
    assert m[q("fastshadow_queue_bytes_total", direction="to_guest")] == reads * size + n
    for name in ("refused", "failed", "poisoned", "discarded", "backend_errors"):
        assert m[q(f"fastshadow_queue_{name}_total")] == 0, name
    assert m[q("fastshadow_queue_notifications_total", kind="guest_kick")] >= 1
    assert m[q("fastshadow_queue_bounce_bytes")] == 0                 # nothing in flight between requests
    assert m[q("fastshadow_queue_backpressure_seconds_total")] >= 0
    assert not [k for k in m if k[0] == "fastshadow_queue_refused_by_reason_total"]
    # The data plane's own latency histogram: every request served is one sample of every hop,
    # and the buckets are cumulative up to +Inf.
    for hop in ("kick_to_shadowed", "backend", "call_to_used", "end_to_end"):
        assert m[q("fastshadow_queue_latency_seconds_count", hop=hop)] == n, hop
        assert m[q("fastshadow_queue_latency_seconds_bucket", hop=hop, le="+Inf")] == n, hop
        bounds = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                        if k[0] == "fastshadow_queue_latency_seconds_bucket" and dict(k[1])["hop"] == hop
                        and dict(k[1])["le"] != "+Inf")
        assert bounds[0][0] == 1e-6 and bounds[1][0] == 2e-6     # true microseconds, in seconds
        assert [v for _, v in bounds] == sorted(v for _, v in bounds)


def test_metrics_scraped_during_io(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=4 << 20)
    port = free_port()
    p = start_proxy(["--name", "disk0", "--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                     "--metrics-listen", f"127.0.0.1:{port}"], [str(workdir / "fs.sock")])
    p.wait_log(r"metrics\.listening address=http://127\.0\.0\.1:\d+/metrics")
    idle = samples(scrape_tcp(port))
    assert idle[d("fastshadow_device_connected")] == 0
    assert idle[d("fastshadow_device_isolation", fastshadow_device_isolation="waiting")] == 1
    assert idle[d("fastshadow_device_info", type="blk", mode="isolated")] == 1
    size = 8192
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        for i in range(5):
            blk.write(16 * i, os.urandom(size))
        mid = samples(scrape_tcp(port))          # the session is live, the queue running
        check_work(mid, writes=5, reads=0, size=size)
        for i in range(3):
            blk.read(16 * i, size)
        m = samples(scrape_tcp(port))
        check_work(m, writes=5, reads=3, size=size)
        assert m[d("fastshadow_device_connected")] == 1
        assert m[d("fastshadow_device_sessions_total")] == 1
        assert m[d("fastshadow_device_backend_reconnects_total")] == 0
        # The tests run the backend as root with --allow-shared-uid: the state says so.
        assert m[d("fastshadow_device_isolation", fastshadow_device_isolation="shared_uid")] == 1
        assert m[d("fastshadow_device_isolation", fastshadow_device_isolation="enforced")] == 0
        assert m[d("fastshadow_device_peer_uid", peer="backend")] == 0
        assert m[d("fastshadow_device_peer_pid", peer="qemu")] == os.getpid()
    assert m[("fastshadow_uptime_seconds", ())] > 0
    assert p.stop() == 0


def test_metrics_on_a_unix_socket_match_the_stats_file(workdir, start_qsd, start_proxy):
    import json
    import time
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    msock, stats = str(workdir / "m.sock"), workdir / "stats.json"
    start_proxy(["--name", "disk0", "--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                 "--metrics-listen", msock, "--stats-interval", "0.1", "--stats-file", str(stats)],
                [str(workdir / "fs.sock"), msock])
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        for i in range(4):
            blk.read(i, 4096)
        m = samples(scrape_unix(msock))
        check_work(m, writes=0, reads=4, size=4096)
        for _ in range(200):  # the stats file reports the same counters (one snapshot behind at most)
            snap = json.loads(stats.read_text()) if stats.exists() else {"devices": []}
            qs = [q for dev in snap["devices"] for q in dev["queues"]]
            if qs and qs[0]["stats"]["completed"] == 4:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the stats file never reported the 4 reads: {snap}")
        st = qs[0]["stats"]
        assert (st["requests"], st["bytes_in"], st["bytes_out"]) == (
            m[q("fastshadow_queue_requests_total")], m[q("fastshadow_queue_bytes_total", direction="to_backend")],
            m[q("fastshadow_queue_bytes_total", direction="to_guest")])
        assert snap["devices"][0]["isolation"] == "shared_uid" and snap["devices"][0]["backend"]["uid"] == 0
