"""The load generator: a vhost-user front-end (fastshadow.protocol's Frontend)
driving the C virtio-blk driver emulation (bench/loadgen.c, built as fastshadow.bench._loadgen).

One :class:`Session` is one vhost-user session with a guest RAM of its own::

    with Session("/run/qsd.sock", num_queues=1, max_qd=32) as s:
        r = s.run("read", 4096, qd=32, random=True, duration=2.0)
        print(r.iops, np.percentile(r.latencies_ns, 99))

The set-up sequence is QEMU 7.2's for vhost-user-blk (as fastshadow's debug
log of a real QEMU session shows it), minus what the benchmark does not use
(the back-end request channel, memory slots, the inflight buffer):

    GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (MQ, REPLY_ACK,
    CONFIG as offered), GET_QUEUE_NUM, SET_OWNER, GET_CONFIG, SET_FEATURES,
    SET_VRING_CALL (per queue), SET_MEM_TABLE (one region: the memfd at guest
    physical 0), per queue SET_VRING_NUM / SET_VRING_BASE 0 / SET_VRING_ADDR /
    SET_VRING_KICK, then SET_VRING_ENABLE 1 per queue.

Teardown: SET_VRING_ENABLE 0 then GET_VRING_BASE per queue (the back-end
stops the rings), then the socket is closed.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from fastshadow.protocol import Channel, Connection
from fastshadow.protocol import payloads as p
from fastshadow.protocol.errors import PeerClosed, VhostUserError
from fastshadow.protocol.features import ProtocolFeature, VirtioFeature
from fastshadow.protocol.frontend import Frontend
from fastshadow.protocol.messages import BackendReq, FrontendReq

from ._loadgen import ffi, lib

ABI_VERSION = 1
if lib.lg_abi_version() != ABI_VERSION:  # a stale build of bench/loadgen.c
    raise ImportError(f"fastshadow.bench._loadgen ABI {lib.lg_abi_version()} != {ABI_VERSION}: rebuild (scripts/setup)")

# virtio-blk feature bits (VIRTIO 1.2 §5.2.3) the driver understands.
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_MQ = 1 << 12

#: Protocol features the load generator takes when offered.
WANTED_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
#: Bytes of virtio_blk_config read with GET_CONFIG (capacity .. num_queues and a bit).
CONFIG_SIZE = 60



class LoadGenError(RuntimeError):
    """Base of the load generator's errors."""


class SetupError(LoadGenError):
    """The vhost-user session could not be set up (the peer refused, closed, or timed out).

    ``at_start``: the peer closed the connection before answering the first request (a
    proxy still tearing down the previous session does that): worth trying again.
    """

    at_start: bool = False


class RunError(LoadGenError):
    """The device misbehaved during a run: a timeout, a bad used entry, an error status."""

    def __init__(self, message: str, result: "RunResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class QueueStats:
    submitted: int
    completed: int
    kicks: int
    kicks_skipped: int
    sleeps: int
    wakeups: int


@dataclass
class RunResult:
    rw: str
    block_size: int
    qd: int
    queues: int
    random: bool
    requests: int          # completed requests
    elapsed_ns: int        # first submit to last completion
    bytes: int             # data bytes of requests completed with VIRTIO_BLK_S_OK
    errors: int            # status != OK
    verify_errors: int     # pattern mismatches on reads (pattern runs)
    len_mismatch: int      # used.len not what the spec says the device writes
    kicks: int
    sleeps: int
    wakeups: int
    latencies_ns: np.ndarray = field(repr=False)
    per_queue: list[QueueStats] = field(default_factory=list, repr=False)
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.elapsed_ns / 1e9

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.elapsed_ns else 0.0

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10^6 bytes)."""
        return self.bytes / self.seconds / 1e6 if self.elapsed_ns else 0.0


def memcpy_bandwidth(nbytes: int, iters: int) -> list[int]:
    """ns per copy of `nbytes` between two pre-faulted buffers, `iters` times (one core)."""
    out = ffi.new("uint64_t[]", iters)
    rc = lib.lg_memcpy_bench(nbytes, iters, out)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return list(out)


class Session:
    """A vhost-user-blk session driven by the C driver emulation."""

    def __init__(self, socket_path: str, *, num_queues: int = 1, queue_size: int = 256, max_qd: int = 32,
                 max_block_size: int = 1 << 20, event_idx: bool = True, timeout: float = 10.0,
                 span_bytes: int | None = None, iotlb: bool = False):
        self.socket_path = str(socket_path)
        #: Play QEMU with a vIOMMU: ACCESS_PLATFORM set, ring and buffer addresses are IOVAs
        #: (IOVA == the load generator's gpa), the proxy's IOTLB misses answered page by page on
        #: a back-end channel (_serve_misses).
        self.iotlb = iotlb
        self.iotlb_misses = 0
        self._fe_lock = threading.Lock()
        self._chan: Connection | None = None
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.max_qd = max_qd
        self.max_block_size = max_block_size
        self.want_event_idx = event_idx
        self.timeout = timeout
        self._span_override = span_bytes
        self.fe: Frontend | None = None
        self._lg = ffi.NULL
        self.features = 0
        self.protocol_features = 0
        self.backend_queues: int | None = None
        self.capacity_bytes: int | None = None
        self.block_size: int | None = None
        self.last_avail: list[int] = []     # GET_VRING_BASE replies at close
        self.sent: list[str] = []           # request names, in order (for tests and debugging)

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        if self.fe is None:  # (open_session() hands over a session that is already open)
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def event_idx(self) -> bool:
        return bool(self.features & VirtioFeature.RING_EVENT_IDX)

    @property
    def span_bytes(self) -> int:
        if self._span_override is not None:
            return self._span_override
        if self.capacity_bytes is None:
            raise LoadGenError("the backend did not offer CONFIG: give span_bytes")
        return self.capacity_bytes

    def open(self) -> None:
        if self.fe is not None or self._lg != ffi.NULL:
            raise LoadGenError("session is already open")
        cfg = ffi.new("struct lg_config *", {"num_queues": self.num_queues, "queue_size": self.queue_size,
                                             "max_qd": self.max_qd, "max_block_size": self.max_block_size})
        out = ffi.new("struct lg **")
        rc = lib.lg_new(cfg, out)
        if rc < 0:
            raise LoadGenError(f"lg_new({self.num_queues} queues, size {self.queue_size}, max qd {self.max_qd}, "
                               f"max block {self.max_block_size}): {os.strerror(-rc)}")
        self._lg = out[0]
        try:
            self.fe = Frontend.connect(self.socket_path, timeout=self.timeout, name="backend")
            self._setup()
        except (OSError, VhostUserError) as e:
            at_start = len(self.sent) <= 1 and isinstance(e, (PeerClosed, ConnectionError))
            self.close(teardown=False)
            err = SetupError(f"vhost-user setup with {self.socket_path} failed: {type(e).__name__}: {e}")
            err.at_start = at_start
            raise err from e
        except BaseException:
            self.close(teardown=False)
            raise

    def _call(self, name: str, fn, *a):
        self.sent.append(name)
        with self._fe_lock:     # one request at a time on the main socket (the miss server's too)
            return fn(*a)

    def _setup(self) -> None:
        fe = self.fe
        offered = self._call("GET_FEATURES", fe.get_features)
        if not offered & VirtioFeature.VERSION_1:
            raise SetupError("the backend does not offer VIRTIO_F_VERSION_1")
        if offered & VIRTIO_BLK_F_RO:
            raise SetupError("the backend's disk is read-only (VIRTIO_BLK_F_RO)")
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            pf = self._call("GET_PROTOCOL_FEATURES", fe.get_protocol_features)
            self.protocol_features = pf & (WANTED_PROTOCOL | (ProtocolFeature.BACKEND_REQ if self.iotlb else 0))
            self._call("SET_PROTOCOL_FEATURES", fe.set_protocol_features, self.protocol_features)
            if self.protocol_features & ProtocolFeature.MQ:
                self.backend_queues = self._call("GET_QUEUE_NUM", fe.get_queue_num)
        if self.num_queues > (self.backend_queues or 1):
            raise SetupError(f"{self.num_queues} queues wanted, the backend has {self.backend_queues or 1}")
        self._call("SET_OWNER", fe.set_owner)
        if self.iotlb:
            if not self.protocol_features & ProtocolFeature.BACKEND_REQ:
                raise SetupError("iotlb: the peer offers no BACKEND_REQ (QEMU requires it with a vIOMMU)")
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._call("SET_BACKEND_REQ_FD", fe.set_backend_req_fd, theirs.fileno())
            theirs.close()
            self._chan = Connection(ours, Channel.BACKEND, receives_replies=False, name="proxy (request channel)")
            threading.Thread(target=self._serve_misses, daemon=True,
                             args=(self._chan, lib.lg_mem_size(self._lg), lib.lg_mem_uaddr(self._lg))).start()
        if self.protocol_features & ProtocolFeature.CONFIG:
            cfg = self._call("GET_CONFIG", fe.get_config, 0, CONFIG_SIZE)
            (capacity,) = struct.unpack_from("<Q", cfg, 0)
            self.capacity_bytes = capacity * 512
            (blk,) = struct.unpack_from("<I", cfg, 20)
            self.block_size = blk if offered & VIRTIO_BLK_F_BLK_SIZE and blk else 512

        want = VirtioFeature.VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            want |= VirtioFeature.PROTOCOL_FEATURES
        if self.want_event_idx:
            want |= VirtioFeature.RING_EVENT_IDX
        if self.num_queues > 1:
            want |= VIRTIO_BLK_F_MQ
        if self.iotlb:
            if not offered & VirtioFeature.ACCESS_PLATFORM:
                raise SetupError("iotlb: the peer does not offer VIRTIO_F_ACCESS_PLATFORM")
            want |= VirtioFeature.ACCESS_PLATFORM
        self.features = offered & want
        self._call("SET_FEATURES", fe.set_features, self.features)

        infos = [self.queue_info(q) for q in range(self.num_queues)]
        for q, info in enumerate(infos):
            self._call("SET_VRING_CALL", fe.set_vring_call, q, info.call_fd)
        size = lib.lg_mem_size(self._lg)
        uaddr = lib.lg_mem_uaddr(self._lg)
        self._call("SET_MEM_TABLE", fe.set_mem_table, [p.MemoryRegion(0, size, uaddr, 0)],
                   [lib.lg_mem_fd(self._lg)])
        ring_base = 0 if self.iotlb else uaddr     # IOVA == gpa under the played vIOMMU
        for q, info in enumerate(infos):
            self._call("SET_VRING_NUM", fe.set_vring_num, q, self.queue_size)
            self._call("SET_VRING_BASE", fe.set_vring_base, q, 0)
            self._call("SET_VRING_ADDR", fe.set_vring_addr, q, ring_base + info.desc_gpa,
                       ring_base + info.used_gpa, ring_base + info.avail_gpa)
            self._call("SET_VRING_KICK", fe.set_vring_kick, q, info.kick_fd)
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            for q in range(self.num_queues):
                self._call("SET_VRING_ENABLE", fe.set_vring_enable, q, True)

    def _serve_misses(self, chan: Connection, size: int, uaddr: int) -> None:
        """QEMU's side of the device IOTLB (hw/virtio/vhost.c vhost_device_iotlb_miss): a miss on
        the back-end channel is answered by an update of its 4 KiB page (IOVA == gpa) on the
        main socket, then the ack. fastshadow forgets a request's pages when it completes, as a
        Linux guest unmaps them, so every request's pages are asked for, as with a real guest."""
        try:
            while True:
                msg = chan.recv()
                ok = False
                if msg.request == BackendReq.IOTLB_MSG and msg.payload.type == p.IOTLB_MISS:
                    page = msg.payload.iova & ~4095
                    if page < size:
                        with self._fe_lock:
                            fe = self.fe
                            reply = fe.call(FrontendReq.IOTLB_MSG, p.IotlbMsg(page, 4096, uaddr + page, 3,
                                                                              p.IOTLB_UPDATE)) if fe else None
                        ok = reply is not None and reply.payload.value == 0
                        self.iotlb_misses += 1
                if msg.need_reply:
                    chan.send(msg.ack(ok))
        except (OSError, VhostUserError):
            pass    # the session is closing

    def queue_info(self, q: int):
        info = ffi.new("struct lg_queue_info *")
        rc = lib.lg_queue_info(self._lg, q, info)
        if rc < 0:
            raise LoadGenError(f"lg_queue_info({q}): {os.strerror(-rc)}")
        return info

    def close(self, teardown: bool = True) -> None:
        with self._fe_lock:     # the miss server uses fe too (iotlb)
            fe, self.fe = self.fe, None
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if fe is not None:
            try:
                if teardown:
                    if self.features & VirtioFeature.PROTOCOL_FEATURES:
                        for q in range(self.num_queues):
                            self._call("SET_VRING_ENABLE", fe.set_vring_enable, q, False)
                    self.last_avail = [self._call("GET_VRING_BASE", fe.get_vring_base, q)
                                       for q in range(self.num_queues)]
            except (OSError, VhostUserError):
                pass  # the peer is gone; closing the socket is all that is left
            finally:
                fe.close()
        if self._lg != ffi.NULL:
            lib.lg_free(self._lg)
            self._lg = ffi.NULL

    def stop(self) -> None:
        """From another thread: stop submitting; the running :meth:`run` drains and returns."""
        if self._lg != ffi.NULL:
            lib.lg_stop(self._lg)

    @property
    def mem_fd(self) -> int:
        return lib.lg_mem_fd(self._lg)

    def mem_view(self) -> memoryview:
        """Guest RAM as a writable memoryview (for tests)."""
        return ffi.buffer(ffi.cast("char *", lib.lg_mem_uaddr(self._lg)), lib.lg_mem_size(self._lg))

    # -- running -----------------------------------------------------------------------------
    def run(self, rw: str, block_size: int, qd: int, *, random: bool = True, queues: int | None = None,
            requests: int | None = None, duration: float | None = None, seed: int = 1,
            offset_base: int = 0, span_bytes: int | None = None, pattern: bool = False,
            busy_poll_us: int = 0, threads: str = "one", stall_timeout: float = 10.0,
            check: bool = True) -> RunResult:
        """Keep `qd` requests in flight on each of `queues` queues until `requests` completed
        (over all queues) or `duration` seconds passed, then drain.

        ``rw``: "read" or "write"; ``threads``: "one" (one thread drives all queues) or
        "per-queue". With ``check`` a run that saw an error status, a bad used entry or a
        timeout raises :class:`RunError` (its ``result`` holds what was measured).
        """
        if self._lg == ffi.NULL or self.fe is None:
            raise LoadGenError("session is not open")
        if rw not in ("read", "write"):
            raise ValueError(f"rw must be 'read' or 'write', not {rw!r}")
        if not requests and not duration:
            raise ValueError("give requests or duration")
        nq = queues or self.num_queues
        span = span_bytes if span_bytes is not None else self.span_bytes - offset_base
        if requests:
            per_q = math.ceil(requests / nq)
        else:
            per_q = int(duration * 2_000_000) + 65536  # room for 2M IOPS per queue
        lat = np.empty(per_q * nq, dtype=np.uint64)
        params = ffi.new("struct lg_run_params *", {
            "rw": lib.LG_READ if rw == "read" else lib.LG_WRITE,
            "random": int(random), "qd": qd, "block_size": block_size, "num_queues": nq,
            "threads": lib.LG_THREADS_ONE if threads == "one" else lib.LG_THREADS_PER_QUEUE,
            "requests": requests or 0, "duration_ns": int((duration or 0) * 1e9),
            "span_bytes": span, "offset_base": offset_base, "seed": seed,
            "event_idx": int(self.event_idx), "busy_poll_us": busy_poll_us, "pattern": int(pattern),
            "timeout_ms": int(stall_timeout * 1000),
            "lat_ns": ffi.cast("uint64_t *", lat.ctypes.data), "lat_cap": len(lat),
        })
        res = ffi.new("struct lg_result *")
        rc = self._run_interruptible(params, res)
        parts = [lat[res.q[i].lat_offset:res.q[i].lat_offset + res.q[i].recorded] for i in range(nq)]
        result = RunResult(
            rw=rw, block_size=block_size, qd=qd, queues=nq, random=random, requests=res.completed,
            elapsed_ns=res.elapsed_ns, bytes=res.bytes, errors=res.errors, verify_errors=res.verify_errors,
            len_mismatch=res.len_mismatch, kicks=res.kicks, sleeps=res.sleeps, wakeups=res.wakeups,
            latencies_ns=np.concatenate(parts) if nq > 1 else parts[0].copy(),
            per_queue=[QueueStats(res.q[i].submitted, res.q[i].completed, res.q[i].kicks, res.q[i].kicks_skipped,
                                  res.q[i].sleeps, res.q[i].wakeups) for i in range(nq)],
            error=ffi.string(res.error).decode(errors="replace"))
        if rc < 0:
            raise RunError(f"run failed ({os.strerror(-rc)}): {result.error}", result)
        if check and result.errors:
            raise RunError(f"{result.errors} requests completed with an error status: {result.error}", result)
        return result

    def _run_interruptible(self, params, res) -> int:
        """lg_run in a thread (cffi releases the GIL) so that Ctrl-C stops it cleanly."""
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(lib.lg_run(self._lg, params, res)),
                             name="loadgen-run", daemon=True)
        t.start()
        try:
            while t.is_alive():
                t.join(0.25)
        except KeyboardInterrupt:
            lib.lg_stop(self._lg)
            t.join()
            raise
        return box[0]
