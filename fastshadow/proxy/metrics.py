"""Prometheus metrics of a running proxy (`--metrics-listen ADDR:PORT` or a unix path).

One custom collector (prometheus_client) reads the same snapshot as the
`stats` log line and the stats file (stats.take_snapshot), at each scrape:
nothing is counted twice, nothing is kept here. The data plane's counters
are per queue and per session, so a new session starts a device's queue
counters from 0 (a counter reset, which rate() handles).

Served over HTTP (GET /metrics, any path) by a small threaded server of the
standard library; prometheus_client chooses the text format (0.0.4, or
OpenMetrics when the scraper asks for it). A unix socket path is created as
the listen sockets are (endpoints.Listener: locked, stale one replaced).
"""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import threading

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   StateSetMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from ..logs import kv
from .config import parse_metrics_listen
from .endpoints import EndpointError, Listener

log = logging.getLogger("fastshadow.proxy")

#: The isolation states of a device (DeviceSnapshot.isolation).
ISOLATION_STATES = ("direct", "waiting", "enforced", "shared_uid", "refused")

#: Queue counters: (metric name without fastshadow_queue_ and _total, QueueStats field, help).
QUEUE_COUNTERS = (
    ("requests", "requests", "guest requests taken from the guest ring"),
    ("completed", "completed", "requests completed toward the guest"),
    ("refused", "refused", "guest chains or backend used entries refused (bad chain, lying backend)"),
    ("failed", "failed", "requests completed toward the guest with the device's error"),
    ("poisoned", "poisoned", "requests failed after --max-replays re-publications"),
    ("discarded", "discarded", "kept requests dropped untouched (the guest re-initialised the ring)"),
    ("throttled", "throttled", "times the queue waited for bounce space (back-pressure)"),
    ("backend_errors", "backend_errors", "backend used entries that broke the rules"),
    ("dirty_log_pages", "log_pages", "guest pages marked dirty for live migration"),
)
#: Bytes each way: (direction label, QueueStats field).
QUEUE_BYTES = (("to_backend", "bytes_in"), ("to_guest", "bytes_out"))
#: Notifications: (kind label, QueueStats field).
QUEUE_NOTIFICATIONS = (("guest_kick", "guest_kicks"), ("backend_kick", "backend_kicks"),
                       ("backend_call", "backend_calls"), ("guest_call", "guest_calls"))


#: The latency histogram's bucket bounds, seconds: the data plane's log2 buckets of microseconds
#: (csrc/hist.c; bucket s < 31 holds [2^(s-1), 2^s) us, bucket 0 under 1 us), so `le` is 2^s us.
#: Bucket 31 (2^30 us and longer) is only in +Inf.
LATENCY_BOUNDS_S = tuple((1 << s) / 1e6 for s in range(31))


def latency_buckets(counts: list[int]) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs of one hop's data-plane histogram, +Inf last."""
    out, acc = [], 0
    for s, le in enumerate(LATENCY_BOUNDS_S):
        acc += counts[s] if s < len(counts) else 0
        out.append((repr(le), acc))
    out.append(("+Inf", sum(counts)))
    return out


class ProxyCollector(Collector):
    """The metric families of every device of `proxy` (server.Proxy), from one snapshot."""

    def __init__(self, proxy):
        self.proxy = proxy

    def collect(self):
        snap = self.proxy.snapshot()
        dev_labels = ["device"]
        q_labels = ["device", "queue"]
        info = GaugeMetricFamily("fastshadow_device_info", "a configured device (always 1)",
                                 labels=["device", "type", "mode"])
        connected = GaugeMetricFamily("fastshadow_device_connected", "1 while a front-end (QEMU) is connected",
                                      labels=dev_labels)
        sessions = CounterMetricFamily("fastshadow_device_sessions", "front-end sessions served", labels=dev_labels)
        reconnects = CounterMetricFamily("fastshadow_device_backend_reconnects",
                                         "backend connections made after a session's first (restarted backend)",
                                         labels=dev_labels)
        isolation = StateSetMetricFamily("fastshadow_device_isolation",
                                         "isolation state: direct, waiting (no session yet), enforced, shared_uid "
                                         "(backend identity could reach guest RAM, --allow-shared-uid), refused",
                                         labels=dev_labels)
        peer_uid = GaugeMetricFamily("fastshadow_device_peer_uid", "uid of the last session's peers (SO_PEERCRED)",
                                     labels=["device", "peer"])
        peer_pid = GaugeMetricFamily("fastshadow_device_peer_pid", "pid of the last session's peers (SO_PEERCRED)",
                                     labels=["device", "peer"])
        counters = {name: CounterMetricFamily(f"fastshadow_queue_{name}", text, labels=q_labels)
                    for name, _, text in QUEUE_COUNTERS}
        nbytes = CounterMetricFamily("fastshadow_queue_bytes", "request bytes copied: to_backend (readable "
                                     "buffers into the shadow), to_guest (device-written bytes back)",
                                     labels=q_labels + ["direction"])
        notes = CounterMetricFamily("fastshadow_queue_notifications", "eventfd notifications by kind",
                                    labels=q_labels + ["kind"])
        inflight = GaugeMetricFamily("fastshadow_queue_inflight", "requests owned by fastshadow now",
                                     labels=q_labels)
        resident = GaugeMetricFamily("fastshadow_device_shadow_resident_bytes",
                                     "bytes of the device's shadow memfd holding pages (rings, bounce pages used "
                                     "and not yet given back by the idle trim)", labels=dev_labels)
        thread = GaugeMetricFamily("fastshadow_device_dataplane_thread",
                                   "the data-plane thread (loop index) serving the device's queues",
                                   labels=dev_labels)
        refused_by = CounterMetricFamily("fastshadow_queue_refused_by_reason", "guest chains refused, by reason "
                                         "(the data plane's event name, lower case)", labels=q_labels + ["reason"])
        bounce = GaugeMetricFamily("fastshadow_queue_bounce_bytes", "bounce space held by requests in flight now",
                                   labels=q_labels, unit="bytes")
        backpressure = CounterMetricFamily("fastshadow_queue_backpressure_seconds", "time the queue's intake "
                                           "waited for bounce space or shadow descriptors (back-pressure)",
                                           labels=q_labels)
        latency = HistogramMetricFamily("fastshadow_queue_latency_seconds", "per-request latency the data plane "
                                        "measures itself, by hop: kick_to_shadowed (guest kick seen -> request "
                                        "copied and published), backend (-> backend call seen), call_to_used (-> "
                                        "guest used element written), end_to_end (kick -> used)",
                                        labels=q_labels + ["hop"])
        for d in snap.devices:
            if d.dataplane_thread is not None:
                resident.add_metric([d.name], d.shadow_resident_bytes)
                thread.add_metric([d.name], d.dataplane_thread)
            info.add_metric([d.name, d.device, d.mode], 1)
            connected.add_metric([d.name], int(d.connected))
            sessions.add_metric([d.name], d.sessions)
            reconnects.add_metric([d.name], d.backend_reconnects)
            isolation.add_metric([d.name], {s: d.isolation == s for s in ISOLATION_STATES})
            for peer, cred in (("qemu", d.qemu), ("backend", d.backend)):
                if cred is not None:
                    peer_uid.add_metric([d.name, peer], cred.uid)
                    peer_pid.add_metric([d.name, peer], cred.pid)
            for q in d.queues:
                labels = [d.name, str(q.index)]
                for name, field, _ in QUEUE_COUNTERS:
                    counters[name].add_metric(labels, q.stats[field])
                for direction, field in QUEUE_BYTES:
                    nbytes.add_metric(labels + [direction], q.stats[field])
                for kind, field in QUEUE_NOTIFICATIONS:
                    notes.add_metric(labels + [kind], q.stats[field])
                inflight.add_metric(labels, q.stats["inflight"])
                for reason, n in sorted(q.refused_by_reason.items()):
                    refused_by.add_metric(labels + [reason], n)
                bounce.add_metric(labels, q.stats.get("bounce_bytes", 0))
                backpressure.add_metric(labels, q.stats.get("throttled_ns", 0) / 1e9)
                for h in q.latency:
                    latency.add_metric(labels + [h.hop], latency_buckets(h.counts), h.sum_ns / 1e9)
        uptime = GaugeMetricFamily("fastshadow_uptime_seconds", "seconds since the proxy started",
                                   value=snap.uptime_s)
        yield from (uptime, info, connected, sessions, reconnects, isolation, peer_uid, peer_pid,
                    *counters.values(), nbytes, notes, inflight, refused_by, bounce, backpressure, latency,
                    resident, thread)


def _handler(registry: CollectorRegistry):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(registry)
            except Exception as e:  # never let a scrape take the proxy down
                kv(log, logging.WARNING, "metrics.failed", reason=f"{type(e).__name__}: {e}")
                self.send_error(500, "metrics unavailable")
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one line per scrape would drown the log
            pass

        def address_string(self):  # a unix socket peer has no address
            return str(self.client_address) if self.client_address else "unix"
    return Handler


class _TCPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """Serves `proxy`'s metrics on `address` (config.parse_metrics_listen) from a thread."""

    def __init__(self, address: str, proxy):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))
        where = parse_metrics_listen(address)
        handler = _handler(self.registry)
        self._listener: Listener | None = None
        if isinstance(where, str):
            self._listener = Listener.create(where)
            self.server = _UnixServer(where, handler, bind_and_activate=False)
            self.server.socket.close()
            self.server.socket = self._listener.sock
            self.description = where
        else:
            host, port = where
            try:
                family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)[0][0]
            except socket.gaierror as e:
                raise EndpointError(f"--metrics-listen {address}: {e.strerror}") from None
            cls = type("_Server", (_TCPServer,), {"address_family": family})
            try:
                self.server = cls((host, port), handler)
            except OSError as e:
                raise EndpointError(e.errno, f"--metrics-listen {address}: {e.strerror}") from None
            self.description = f"http://{host or '*'}:{self.server.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
