"""The Python face of the C data plane (csrc/, built by cffi as fastshadow._dataplane).

A thin layer: every C function returns 0 (or a count) or -errno, and
``_check`` turns a negative value into a :class:`DataPlaneError` subclass.
cffi releases the GIL around every call, so a call that waits for the loop
thread (every device/queue operation while the loop runs) does not stall the
rest of the control plane.

Typical use by the control plane (isolated mode)::

    dp = DataPlane(busy_poll_us=0)
    dp.start()
    dev = dp.add_device("blk0", num_queues=1)
    # backend gets: one memory region {gpa: dev.shadow_gpa, size: dev.shadow_size,
    #               uaddr: dev.shadow_uaddr, fd: dev.shadow_fd, offset 0}
    dev.set_mem_table([MemRegion(gpa, size, uaddr, fd, offset), ...])  # SET_MEM_TABLE
    dev.queue_set_num(0, 256)                                          # SET_VRING_NUM
    dev.queue_set_base(0, 0)                                           # SET_VRING_BASE
    dev.queue_set_addr(0, desc, avail, used)                           # SET_VRING_ADDR
    dev.queue_shadow_addrs(0)  -> addresses to send to the backend
    dev.queue_set_guest_kick(0, kick_fd); dev.queue_set_guest_call(0, call_fd)
    dev.queue_backend_fds(0)   -> (kick, call) eventfds to send to the backend
    dev.queue_start(0, event_idx=True)                                 # ENABLE / kick
    idx = dev.queue_stop(0)                                            # GET_VRING_BASE
    for ev in dp.drain_events(): log.warning(ev.message)              # when dp.event_fd is readable

Threads: ``DataPlane(threads=N)`` runs N loops (csrc/loop.c), each its own
thread, io_uring, command channel and event ring.  ``add_device`` places a
device on the loop serving the fewest queues (ties: the next loop after the
last one chosen, so a device that reconnects may land on another thread); the
device stays there until removed, so each of its calls reaches the one thread
that owns all its queues and the hot path shares nothing between loops.
``event_fd`` stays one fd (an epoll set over the loops' event fds) and
``drain_events`` drains every loop; a queue's events come from one loop, in
order.  Device ids are unique in the process (csrc/loop.c gives them out).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from typing import Iterable

import msgspec

# The only importer of the cffi extension (ARCHITECTURE.md): everything above this
# module sees typed methods, named constants and DataPlaneError subclasses.
from . import _dataplane
from ._dataplane import ffi, lib

#: Must match FSDP_ABI_VERSION in csrc/fsdp.h; a stale build fails loudly here.
ABI_VERSION = 7

if lib.fsdp_abi_version() != ABI_VERSION:  # pragma: no cover - build mismatch
    raise ImportError(
        f"fastshadow._dataplane ABI {lib.fsdp_abi_version()} != {ABI_VERSION}: "
        "rebuild with `pip install -e .`"
    )

#: Where the backend is told the shadow region lives (fake, stable).
SHADOW_GPA_BASE = 0x100000000
SHADOW_UADDR_BASE = 0x7E0000000000
#: Limits of the data plane (csrc/fsdp.h): ring size, memory regions per device
#: (the answer to GET_MAX_MEM_SLOTS), queues per device.
MAX_QUEUE_SIZE = lib.FSDP_MAX_QUEUE_SIZE
MAX_MEM_REGIONS = lib.FSDP_MAX_MEM_REGIONS
MAX_QUEUES = lib.FSDP_MAX_QUEUES
#: The built extension (its USDT notes are what `fastshadow trace` attaches to).
EXTENSION_PATH = _dataplane.__file__

POLL_BACKEND_KICKED = lib.FSDP_POLL_BACKEND_KICKED
POLL_GUEST_CALLED = lib.FSDP_POLL_GUEST_CALLED
POLL_PROGRESS = lib.FSDP_POLL_PROGRESS
POLL_MORE = lib.FSDP_POLL_MORE


# --------------------------------------------------------------------------
# Errors


class DataPlaneError(OSError):
    """A data plane call failed; ``errno`` is the C function's -return value."""


class InvalidRequest(DataPlaneError):
    """EINVAL / E2BIG: argument or state does not allow this (e.g. no SET_VRING_NUM yet)."""


class QueueBusy(DataPlaneError):
    """EBUSY: the queue (or the loop) is running; stop it first."""


class AddressUntranslatable(DataPlaneError):
    """EFAULT: a ring address is not inside one mapped guest memory region."""


class NoSpace(DataPlaneError):
    """ENOSPC: a table is full or the shadow region is too small."""


class NotFound(DataPlaneError):
    """ENOENT / ENODEV: no such region or device."""


class DrainTimeout(DataPlaneError):
    """ETIMEDOUT from queue_stop: requests are still in flight.

    ``avail_idx`` is the guest's next avail index all the same; the requests
    in flight stay owned by the data plane (``queue_start`` re-publishes them,
    ``queue_abort`` fails them toward the guest).
    """

    avail_idx: int = 0
    inflight: int = 0


_ERRNO_CLASS = {
    errno.EINVAL: InvalidRequest,
    errno.E2BIG: InvalidRequest,
    errno.EBUSY: QueueBusy,
    errno.EALREADY: QueueBusy,
    errno.EFAULT: AddressUntranslatable,
    errno.ENOSPC: NoSpace,
    errno.ENOENT: NotFound,
    errno.ENODEV: NotFound,
    errno.ETIMEDOUT: DrainTimeout,
}


def _error(rc: int, what: str) -> DataPlaneError:
    code = -rc
    cls = _ERRNO_CLASS.get(code, DataPlaneError)
    return cls(code, f"{what}: {os.strerror(code)}")


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise _error(rc, what)
    return rc


# --------------------------------------------------------------------------
# Plain data


class MemRegion(msgspec.Struct, frozen=True):
    """One guest RAM region as QEMU describes it in SET_MEM_TABLE / ADD_MEM_REG."""

    gpa: int
    size: int
    uaddr: int
    fd: int
    mmap_offset: int = 0


class QueueStats(msgspec.Struct, frozen=True):
    requests: int
    bytes_in: int
    bytes_out: int
    refused: int
    guest_kicks: int
    backend_kicks: int
    backend_calls: int
    guest_calls: int
    throttled: int
    inflight: int
    completed: int
    backend_errors: int
    log_pages: int
    failed: int          # completed toward the guest with the device's error (refused, lied about, poisoned)
    poisoned: int        # failed after --max-replays re-publications
    discarded: int       # kept requests dropped untouched (the guest re-initialised the ring)
    bounce_bytes: int = 0    # bounce space held by requests now (a gauge, bytes)
    throttled_ns: int = 0    # back-pressure: time intake waited for bounce space, cumulative, ns
    #: refused chains by reason (event name in lower case, e.g. "chain_too_long"; "other": any other code)
    refused_by_reason: dict[str, int] = {}


#: The hops of the data plane's own latency histograms (csrc/fsdp.h FSDP_HOP_*, in that order).
LATENCY_HOPS = ("kick_to_shadowed", "backend", "call_to_used", "end_to_end")
#: Buckets per histogram: 0 counts durations below 1 us, s in [2^(s-1), 2^s) us (the last also longer).
LATENCY_SLOTS = lib.FSDP_HIST_SLOTS


class HopLatency(msgspec.Struct, frozen=True):
    """One hop's log2 histogram of one queue, as the data plane kept it (csrc/hist.c).

    `counts[s]`: requests whose hop took [2^(s-1), 2^s) microseconds (s >= 1), under 1 us for
    s = 0; trailing empty buckets are left out. `sum_ns`: the sum of those durations, ns."""

    hop: str
    counts: list[int]
    sum_ns: int

    @property
    def total(self) -> int:
        return sum(self.counts)


class StopResult(msgspec.Struct, frozen=True):
    """What a queue stop did (GET_VRING_BASE)."""

    avail_idx: int      # the guest's next avail index: the answer to QEMU
    returned: int       # never taken by the backend, given back to the guest ring
    kept: int           # never taken, kept by the data plane (re-published at start)
    inflight: int       # still owned by the data plane when the stop returned


class Event(msgspec.Struct, frozen=True):
    """One event record; ``message`` is the log line."""

    dev: int
    dev_name: str
    queue: int
    code: int
    name: str
    head: int
    a: int
    b: int
    message: str

    @property
    def poisoned(self) -> bool:
        """A request was failed toward the guest after --max-replays re-publications."""
        return self.code == lib.FSDP_EV_REQUEST_POISONED

    @property
    def iotlb_miss(self) -> bool:
        """Not a refusal: queue ``queue`` waits for QEMU's translation of IOVA ``a`` (access ``b``)."""
        return self.code == lib.FSDP_EV_IOTLB_MISS

    @property
    def frontend_failed(self) -> bool:
        """The front-end shrank a guest memory file under the proxy: that session must end."""
        return self.code == lib.FSDP_EV_GUEST_MEMORY_LOST

    @property
    def backend_failed(self) -> bool:
        """The data plane no longer trusts this device's backend: the control plane must drop it."""
        return self.code == lib.FSDP_EV_BACKEND_FAILED


def event_name(code: int) -> str:
    return ffi.string(lib.fsdp_event_name(code)).decode()


def event_text(code: int) -> str:
    return ffi.string(lib.fsdp_event_str(code)).decode()


_REFUSALS = {
    lib.FSDP_EV_DESC_NEXT_OUT_OF_RANGE,
    lib.FSDP_EV_CHAIN_TOO_LONG,
    lib.FSDP_EV_ADDR_UNMAPPED,
    lib.FSDP_EV_ADDR_OVERFLOW,
    lib.FSDP_EV_INDIRECT_NESTED,
    lib.FSDP_EV_INDIRECT_BAD_LEN,
    lib.FSDP_EV_INDIRECT_WITH_NEXT,
    lib.FSDP_EV_WRITABLE_BEFORE_READABLE,
    lib.FSDP_EV_REQUEST_TOO_LARGE,
    lib.FSDP_EV_ZERO_LENGTH,
    lib.FSDP_EV_BAD_LAYOUT,
    lib.FSDP_EV_IOVA_UNMAPPED,
    lib.FSDP_EV_IOVA_PERM,
}

#: Device IOTLB access permissions (struct vhost_iotlb_msg perm: VHOST_ACCESS_RO/WO/RW).
IOTLB_RO, IOTLB_WO = lib.FSDP_IOTLB_RO, lib.FSDP_IOTLB_WO
IOTLB_MAX_ENTRIES = lib.FSDP_IOTLB_MAX_ENTRIES


def _access(perm: int) -> str:
    return {1: "read", 2: "write", 3: "read+write"}.get(perm, f"perm {perm}")

_DETAIL = {
    lib.FSDP_EV_DESC_NEXT_OUT_OF_RANGE: lambda a, b: f"descriptor next index {a} >= table size {b}",
    lib.FSDP_EV_CHAIN_TOO_LONG: lambda a, b: f"chain longer than {a} descriptors (loop or over the queue size)",
    lib.FSDP_EV_ADDR_UNMAPPED: lambda a, b: f"buffer at gpa {a:#x} len {b} is outside guest memory",
    lib.FSDP_EV_ADDR_OVERFLOW: lambda a, b: f"buffer at gpa {a:#x} len {b} wraps around the address space",
    lib.FSDP_EV_INDIRECT_NESTED: lambda a, b: f"indirect descriptor at index {a} inside an indirect table",
    lib.FSDP_EV_INDIRECT_BAD_LEN: lambda a, b: f"indirect table length {a} is not a non-zero multiple of 16 up to {b}",
    lib.FSDP_EV_INDIRECT_WITH_NEXT: lambda a, b: f"indirect descriptor at index {a} also has NEXT set",
    lib.FSDP_EV_WRITABLE_BEFORE_READABLE: lambda a, b: f"device-readable descriptor at chain position {a} follows a writable one",
    lib.FSDP_EV_REQUEST_TOO_LARGE: lambda a, b: f"request needs {a} bytes, over the limit of {b}",
    lib.FSDP_EV_ZERO_LENGTH: lambda a, b: f"descriptor at chain position {a} has length 0 (no device allows it; "
                                          f"backends treat it as fatal)",
    lib.FSDP_EV_BAD_LAYOUT: lambda a, b: f"request has {a} device-readable and {b} device-writable bytes, fewer "
                                         f"than the device's request layout needs",
    lib.FSDP_EV_REQUEST_POISONED: lambda a, b: f"request was handed to the backend {a} times without completing "
                                               f"(the backend died or held it each time): poisoned, failed toward "
                                               f"the guest",
    lib.FSDP_EV_BACKEND_FAILED: lambda a, b: f"backend used idx {a} is {(a - b) & 0xFFFF} entries past the last "
                                             f"used {b}, more than the ring holds: shadow ring untrusted, backend "
                                             f"treated as failed",
    lib.FSDP_EV_IOVA_UNMAPPED: lambda a, b: f"buffer at iova {a:#x} len {b} has no translation in the device "
                                            f"IOTLB (QEMU answered the miss without one, or its updates kept not arriving)",
    lib.FSDP_EV_IOVA_PERM: lambda a, b: f"buffer at iova {a:#x} len {b} is mapped without the access the device "
                                        f"needs (a device write to a read-only IOVA, or a read of a write-only one)",
    lib.FSDP_EV_IOTLB_MISS: lambda a, b: f"iova {a:#x} ({_access(b)}) is not in the device IOTLB: asking QEMU",
    lib.FSDP_EV_BAD_HEAD: lambda a, b: f"avail ring head {a} >= queue size {b}: queue broken, stopped",
    lib.FSDP_EV_AVAIL_IDX_JUMP: lambda a, b: f"avail idx {a} is {(a - b) & 0xFFFF} entries ahead of last avail {b}: queue broken, stopped",
    lib.FSDP_EV_RING_UNMAPPED: lambda a, b: f"ring at user address {a:#x} is no longer in guest memory: queue paused",
    lib.FSDP_EV_USED_UNKNOWN_ID: lambda a, b: f"backend used an id {a} (len {b}) that is not in flight: ignored",
    lib.FSDP_EV_USED_DOUBLE_COMPLETION: lambda a, b: f"backend completed id {a} (len {b}) a second time: ignored",
    lib.FSDP_EV_USED_LEN_TOO_LARGE: lambda a, b: f"backend used len {a} > {b} writable bytes: request failed toward the guest",
    lib.FSDP_EV_BAD_STOP_INDEX: lambda a, b: f"backend says its ring stopped at avail index {a}, impossible with {b} published and the requests in flight: all treated as taken",
    lib.FSDP_EV_COPYBACK_UNMAPPED: lambda a, b: f"writable buffer gpa {a:#x} len {b} unmapped before completion: request failed toward the guest",
    lib.FSDP_EV_INFLIGHT_ABORTED: lambda a, b: f"{a} requests in flight failed toward the guest (the device's error)",
    lib.FSDP_EV_EVENTS_LOST: lambda a, b: f"{a} event records lost (event ring full)",
    lib.FSDP_EV_LOOP_ERROR: lambda a, b: f"io_uring operation failed: {os.strerror(-_s64(a))}",
    lib.FSDP_EV_LOG_OUT_OF_RANGE: lambda a, b: f"write to guest page at gpa {a:#x} is beyond the {b}-byte dirty log "
                                               f"(QEMU's log is smaller than guest memory): not logged",
    lib.FSDP_EV_GUEST_MEMORY_LOST: lambda a, b: f"the file behind guest memory at gpa {a:#x} ({b} bytes) was shrunk "
                                                f"under the proxy (SIGBUS caught, the region now reads as zeros): "
                                                f"device stopped, session ended",
}


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _message(dev_name: str, queue: int, code: int, head: int, a: int, b: int) -> str:
    detail = _DETAIL.get(code, lambda a, b: f"{event_text(code)} (a={a:#x}, b={b:#x})")(a, b)
    where = f"{dev_name} q{queue}"
    if code in _REFUSALS:
        return f"{where}: refused request head {head}: {detail}"
    if code in (lib.FSDP_EV_USED_LEN_TOO_LARGE, lib.FSDP_EV_REQUEST_POISONED):
        return f"{where}: request head {head}: {detail}"
    return f"{where}: {detail}"


# --------------------------------------------------------------------------
# Data plane and devices


class _Loop:
    """One C loop (struct fsdp_dp): a thread, its io_uring, its devices."""

    def __init__(self, index: int, cfg):
        cfg.loop_index = index
        out = ffi.new("struct fsdp_dp **")
        _check(lib.fsdp_dp_new(cfg, out), f"data plane loop {index}")
        self.index = index
        self.dp = out[0]
        self.queues = 0                 # queues of the devices it serves (placement)
        self.cpus: set[int] | None = None

    def start(self) -> None:
        _check(lib.fsdp_dp_start(self.dp), f"start data plane loop {self.index}")
        if self.cpus:
            self.pin(self.cpus)

    def pin(self, cpus: set[int]) -> None:
        """Run this loop's thread on `cpus` only (now, and again after each start)."""
        self.cpus = set(cpus)
        tid = lib.fsdp_dp_thread_id(self.dp)
        if tid:
            try:
                os.sched_setaffinity(tid, self.cpus)
            except OSError as e:
                raise DataPlaneError(e.errno, f"pin data plane loop {self.index} to CPUs "
                                              f"{sorted(self.cpus)}: {e.strerror} (CPUs this "
                                              f"process may use: {sorted(os.sched_getaffinity(0))})"
                                     ) from None


class DataPlane:
    """The data plane of one process: ``threads`` loops, each its own thread.

    Not started, every call runs on the caller's thread and ``Device.poll``
    drives the engine synchronously (tests).  Started, every device/queue call
    runs on the thread of the device's loop between two batches; the caller
    blocks until done.  ``threads=1`` is one loop: the behaviour of a single
    data-plane thread.  `cpus`: one CPU set per loop (loop i gets
    ``cpus[i % len(cpus)]``), applied when the loops start.  `idle_trim_ms`:
    a queue's bounce pages are given back after it was idle that long (0:
    never).
    """

    def __init__(self, *, busy_poll_us: int = 0, poll_interval_us: int = 100,
                 event_ring_size: int = 1024, stream_copy_min: int = 0, latency_histograms: bool = True,
                 threads: int = 1, cpus: list[set[int]] | None = None, idle_trim_ms: int = 0):
        if not 1 <= threads <= 64:
            raise InvalidRequest(errno.EINVAL, f"data plane threads: {threads} is not within 1..64")
        cfg = ffi.new("struct fsdp_dp_config *")
        cfg.no_latency_hist = 0 if latency_histograms else 1
        cfg.busy_poll_us = busy_poll_us
        cfg.stream_copy_min = stream_copy_min
        cfg.poll_interval_us = poll_interval_us
        cfg.event_ring_size = event_ring_size
        cfg.idle_trim_ms = idle_trim_ms
        self._loops: list[_Loop] = []
        try:
            for i in range(threads):
                self._loops.append(_Loop(i, cfg))
        except DataPlaneError:
            self._free_loops()
            raise
        if cpus:
            for lp in self._loops:
                lp.cpus = set(cpus[lp.index % len(cpus)])
        self._dp = self._loops[0].dp        # None once closed
        self._devices: dict[int, Device] = {}
        self._names: dict[int, str] = {}
        self._next = 0                      # placement: where the next tie goes
        self._lock = threading.Lock()       # placement and the tables above
        self._epoll = None
        if threads > 1:
            self._epoll = select.epoll()
            for lp in self._loops:
                self._epoll.register(lib.fsdp_dp_event_fd(lp.dp), select.EPOLLIN)

    def _free_loops(self) -> None:
        for lp in self._loops:
            lib.fsdp_dp_free(lp.dp)
        self._loops = []

    # lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start every loop's thread (and pin it where `cpus` says)."""
        self._live()
        for lp in self._loops:
            lp.start()

    def stop(self) -> None:
        """Stop the loop threads (joins them).  Devices stay; calls run inline again."""
        if self._dp is not None:
            for lp in self._loops:
                _check(lib.fsdp_dp_stop(lp.dp), f"stop data plane loop {lp.index}")

    @property
    def running(self) -> bool:
        """Every loop's thread runs."""
        return self._dp is not None and all(lib.fsdp_dp_running(lp.dp) for lp in self._loops)

    @property
    def threads(self) -> int:
        """How many loops (data-plane threads) this data plane has."""
        return len(self._loops)

    def thread_ids(self) -> list[int]:
        """The kernel tid of each loop's thread (0: not running), by loop index."""
        self._live()
        return [lib.fsdp_dp_thread_id(lp.dp) for lp in self._loops]

    def pin(self, loop: int, cpus: set[int]) -> None:
        """Run loop `loop`'s thread on `cpus` only (kept across stop/start)."""
        self._live()
        self._loops[loop].pin(cpus)

    def trimmed_pages(self) -> int:
        """Bounce pages given back to the kernel by idle trims, over every loop."""
        self._live()
        return sum(lib.fsdp_dp_trimmed_pages(lp.dp) for lp in self._loops)

    def close(self) -> None:
        """Stop the loops and free every device (their fds and mappings included)."""
        if self._dp is not None:
            for dev in self._devices.values():
                with dev._free_lock:      # before the loops free it (shadow_resident_bytes)
                    dev._dev = None
            self._devices.clear()
            self._free_loops()
            self._dp = None
            if self._epoll is not None:
                self._epoll.close()

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _live(self):
        if self._dp is None:
            raise DataPlaneError(errno.EBADF, "data plane is closed")
        return self._dp

    # devices ---------------------------------------------------------------
    def _place(self, loop: int | None) -> _Loop:
        """The loop for a new device: `loop` if given, else the one serving the fewest
        queues; among equals the first from the one after the last chosen."""
        if loop is not None:
            if not 0 <= loop < len(self._loops):
                raise InvalidRequest(errno.EINVAL, f"data plane loop {loop}: there are "
                                                   f"{len(self._loops)} (0..{len(self._loops) - 1})")
            return self._loops[loop]
        n = len(self._loops)
        order = [self._loops[(self._next + i) % n] for i in range(n)]
        return min(order, key=lambda lp: lp.queues)

    def add_device(self, name: str, *, num_queues: int, shadow_size: int | None = None,
                   max_request_bytes: int = 4 << 20, bounce_per_queue: int = 16 << 20,
                   max_queue_size: int = MAX_QUEUE_SIZE, failure: int = 0, failure_first_queue: int = 0,
                   layout: tuple[int, int] = (0, 0), max_replays: int = 1,
                   loop: int | None = None) -> Device:
        """A device of `num_queues` shadow queues, served by one loop for its whole life.

        `max_request_bytes`: cap of one request's total buffer bytes; `failure`: how a refused
        or failed request completes toward the guest (devices.Failure, FSDP_FAIL_*; queues
        below `failure_first_queue` use len 0); `layout`: (readable, writable) bytes every
        chain must have; `max_replays`: re-publications of one request before it is poisoned;
        `loop`: the loop (thread) to serve it, else the least loaded.
        Raises InvalidRequest, NoSpace."""
        cfg = ffi.new("struct fsdp_dev_config *")
        cfg.num_queues = num_queues
        cfg.max_queue_size = max_queue_size
        cfg.shadow_size = shadow_size or 0
        cfg.max_request_bytes = max_request_bytes
        cfg.bounce_per_queue = bounce_per_queue
        cfg.failure = int(failure)
        cfg.failure_first_queue = failure_first_queue
        cfg.min_readable, cfg.min_writable = layout
        cfg.max_replays = max_replays
        out = ffi.new("struct fsdp_dev **")
        self._live()
        with self._lock:
            lp = self._place(loop)
            _check(lib.fsdp_dev_add(lp.dp, name.encode(), cfg, out), f"add device {name!r}")
            lp.queues += num_queues
            self._next = (lp.index + 1) % len(self._loops)
            dev = Device(self, out[0], name, lp.index)
            self._devices[dev.id] = dev
            self._names[dev.id] = name
        return dev

    def remove_device(self, dev: Device) -> None:
        """Detach `dev` from its loop and free it."""
        with dev._free_lock:      # the removal closes the shadow fd (shadow_resident_bytes)
            if dev._dev is None:
                return
            _check(lib.fsdp_dev_remove(dev._dev), f"remove device {dev.name!r}")
            dev._dev = None
        with self._lock:
            if self._devices.pop(dev.id, None) is not None:
                self._loops[dev.loop].queues -= dev.num_queues

    @property
    def poll_window_us(self) -> float:
        """Loop 0's current busy-poll window: adapts between 0 and ``busy_poll_us``."""
        return lib.fsdp_dp_poll_window_ns(self._live()) / 1000

    # events ----------------------------------------------------------------
    @property
    def event_fd(self) -> int:
        """Readable when events are waiting (on any loop); drain with :meth:`drain_events`."""
        self._live()
        if self._epoll is not None:
            return self._epoll.fileno()
        return lib.fsdp_dp_event_fd(self._dp)

    def drain_events(self) -> list[Event]:
        """Every loop's waiting events; those of one queue in the order they happened."""
        self._live()
        events: list[Event] = []
        for lp in self._loops:
            events += self._drain_loop(lp)
        return events

    def _drain_loop(self, lp: _Loop) -> list[Event]:
        buf = ffi.new("struct fsdp_event[]", 256)
        lost = ffi.new("uint64_t *")
        events: list[Event] = []
        total_lost = 0
        while True:
            n = _check(lib.fsdp_dp_drain_events(lp.dp, buf, 256, lost), "drain events")
            total_lost += lost[0]
            for i in range(n):
                e = buf[i]
                name = self._names.get(e.dev, f"dev{e.dev}")
                events.append(Event(e.dev, name, e.queue, e.code, event_name(e.code), e.head,
                                    e.a, e.b, _message(name, e.queue, e.code, e.head, e.a, e.b)))
            if n < 256:
                break
        if total_lost:
            code = lib.FSDP_EV_EVENTS_LOST
            events.append(Event(0xFFFFFFFF, "dataplane", 0, code, event_name(code), 0, total_lost, 0,
                                f"dataplane: {total_lost} event records lost (event ring full)"))
        return events


class Device:
    """One vhost-user device in isolated mode (created by :meth:`DataPlane.add_device`).

    ``shadow_fd`` (and the backend eventfds) belong to the data plane: send
    them to the backend, never close them; :meth:`renew_backend_side` replaces
    them for each new backend connection.  fds passed in (memory regions,
    guest kick/call) stay the caller's: the data plane maps or duplicates
    what it needs.
    """

    def __init__(self, dp: DataPlane, ptr, name: str, loop: int = 0):
        self._dp = dp
        self._dev = ptr
        self.name = name
        #: The loop (data-plane thread) serving every queue of this device.
        self.loop = loop
        info = ffi.new("struct fsdp_dev_info *")
        _check(lib.fsdp_dev_info(ptr, info), "device info")
        #: Unique in the process (events, probes and the tracer name the device by it).
        self.id: int = info.id
        self.num_queues: int = info.num_queues
        self.max_queue_size: int = info.max_queue_size
        self.shadow_size: int = info.shadow_size
        self.shadow_gpa: int = info.shadow_gpa
        self.shadow_uaddr: int = info.shadow_uaddr
        self.queue_slot_size: int = info.queue_slot_size
        self.bounce_per_queue: int = info.bounce_per_queue
        #: Held by whoever frees the C device or closes its shadow fd (DataPlane.remove_device and
        #: close, renew_backend_side) and by the readers other threads call while the session
        #: may end (stats, latency, shadow_resident_bytes): without it, a reader that passed
        #: _live() could hand the C side a freed device. Reentrant: the session thread reads
        #: stats of its own too.
        self._free_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<Device {self.name!r} id={self.id} queues={self.num_queues} loop={self.loop}>"

    @property
    def shadow_fd(self) -> int:
        """The shadow memfd to give the backend now (data plane's: send a dup); each
        :meth:`renew_backend_side` replaces it, so look it up when sending, never keep it."""
        info = ffi.new("struct fsdp_dev_info *")
        _check(lib.fsdp_dev_info(self._live(), info), f"{self.name}: device info")
        return info.shadow_fd

    def shadow_resident_bytes(self) -> int:
        """Bytes of the shadow memfd held in memory now; for other threads than the session's
        (the stats thread).

        The shadow fd's number is read, then fstat'ed: a renewal or a removal on the session
        thread must not close it in between, or the figure is 0 for one snapshot (EBADF) or,
        the number reused meanwhile, an unrelated file's. Both close it under this lock. A lock
        rather than a figure kept by the data plane: the kernel's count is the truth (the idle
        trim and a renewal's hole punching change it), and the wait is bounded by one
        renewal's copy of the kept bounce bytes. Raises NotFound once the device is removed."""
        with self._free_lock:
            return os.fstat(self.shadow_fd).st_blocks * 512

    def _live(self):
        if self._dev is None:
            raise NotFound(errno.ENODEV, f"device {self.name!r} was removed")
        return self._dev

    def _q(self, what: str, q: int) -> str:
        return f"{self.name} q{q}: {what}"

    # memory ----------------------------------------------------------------
    @staticmethod
    def _fill_region(c, r: MemRegion) -> None:
        c.gpa, c.size, c.uaddr, c.mmap_offset, c.fd = r.gpa, r.size, r.uaddr, r.mmap_offset, r.fd

    def set_mem_table(self, regions: Iterable[MemRegion]) -> None:
        regions = list(regions)
        arr = ffi.new("struct fsdp_mem_region[]", max(1, len(regions)))
        for i, r in enumerate(regions):
            self._fill_region(arr[i], r)
        _check(lib.fsdp_dev_set_mem_table(self._live(), arr, len(regions)),
               f"{self.name}: set memory table ({len(regions)} regions)")

    def add_mem_region(self, r: MemRegion) -> None:
        c = ffi.new("struct fsdp_mem_region *")
        self._fill_region(c, r)
        _check(lib.fsdp_dev_add_mem_region(self._live(), c),
               f"{self.name}: add memory region gpa {r.gpa:#x} size {r.size:#x}")

    def remove_mem_region(self, gpa: int, size: int) -> None:
        _check(lib.fsdp_dev_remove_mem_region(self._live(), gpa, size),
               f"{self.name}: remove memory region gpa {gpa:#x} size {size:#x}")

    def reset(self) -> None:
        """Device reset: every queue forgets its state; requests in flight are dropped."""
        _check(lib.fsdp_dev_reset(self._live()), f"{self.name}: reset")

    def renew_backend_side(self) -> None:
        """Give the next backend connection fds no earlier backend ever had: a new shadow memfd
        (mapped where the old one was) and new kick and call eventfds for every queue; the old
        ones are closed.

        Why: a backend that was dropped may live on (cut off for lying, or qemu-storage-daemon
        finishing the requests of a deleted export) with the old memfd mapped and the old
        eventfds open. Afterwards its writes to the old shadow rings and bounce buffers, its
        reads of the old kick eventfds (kicks swallowed) and writes to the old call eventfds
        reach nothing. The bounce bytes of the requests the queues keep are copied (they are
        re-published to the new backend); the shadow rings start zeroed. `shadow_fd` and
        `queue_backend_fds` give the new fds from now on.

        Raises QueueBusy while a queue is started (stop or park every queue first), and
        DataPlaneError (ENOMEM, EMFILE, ...) when the new memfd or eventfds cannot be made;
        then nothing changed."""
        with self._free_lock:     # it closes the old shadow fd (shadow_resident_bytes)
            _check(lib.fsdp_dev_renew_backend_side(self._live()),
                   f"{self.name}: new shadow memory and eventfds for a new backend")

    # device IOTLB (vIOMMU) -------------------------------------------------------
    def iotlb_enable(self, on: bool, cap: int = 0, keep_completed: bool = False) -> None:
        """VIRTIO_F_ACCESS_PLATFORM with a vIOMMU: ring and buffer addresses are IOVAs from now
        on, translated through at most `cap` translations (1..IOTLB_MAX_ENTRIES); off: they are
        guest-physical (rings: QEMU user addresses).  Either way every translation is forgotten.
        keep_completed: keep a completed request's translations (trust the guest's
        invalidations) instead of forgetting them (fsdp.h)."""
        _check(lib.fsdp_dev_iotlb_enable(self._live(), 1 if on else 0, cap, 1 if keep_completed else 0),
               f"{self.name}: device IOTLB {'on, at most ' + str(cap) + ' entries' if on else 'off'}")

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        """VHOST_IOTLB_UPDATE: [iova, iova+size) -> QEMU user address uaddr, access perm (1-3).
        NoSpace past the cap; InvalidRequest for an empty or wrapping range or perm 0."""
        _check(lib.fsdp_dev_iotlb_update(self._live(), iova, size, uaddr, perm),
               f"{self.name}: IOTLB update iova {iova:#x} size {size:#x} perm {perm}")

    def iotlb_invalidate(self, iova: int, size: int) -> int:
        """VHOST_IOTLB_INVALIDATE: in effect when this returns (no later access uses the old
        translation). Returns the entries removed or cut."""
        return _check(lib.fsdp_dev_iotlb_invalidate(self._live(), iova, size),
                      f"{self.name}: IOTLB invalidate iova {iova:#x} size {size:#x}")

    def iotlb_translate(self, iova: int, perm: int) -> tuple[int, int] | None:
        """(QEMU user address, bytes of the entry from iova on) for an access perm; None if
        no entry holds iova; PermissionError-like DataPlaneError (EACCES) if it lacks perm."""
        out = ffi.new("uint64_t[2]")
        rc = lib.fsdp_dev_iotlb_translate(self._live(), iova, perm, out, out + 1)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"{self.name}: IOTLB translate iova {iova:#x} perm {perm}")
        return out[0], out[1]

    def iotlb_entries(self) -> int:
        return _check(lib.fsdp_dev_iotlb_entries(self._live()), f"{self.name}: IOTLB entries")

    def queue_iotlb_answered(self, q: int, iova: int, ok: bool = True) -> None:
        """QEMU answered queue q's IOTLB miss at iova (ok: with a translation, installed
        before this call): the queue goes on. After "no translation" (ok False) the page is
        refused (IOVA_UNMAPPED); a page gone again after "yes" is asked again, a bounded
        number of times. An answer to an older miss of the queue is ignored."""
        _check(lib.fsdp_queue_iotlb_answered(self._live(), q, iova, int(ok)), self._q("IOTLB miss answered", q))

    # dirty log (migration) ---------------------------------------------------
    def set_log_base(self, fd: int | None, size: int = 0, offset: int = 0) -> None:
        """Use QEMU's dirty log (SET_LOG_BASE): `fd` is mapped, not kept; None unmaps."""
        _check(lib.fsdp_dev_set_log_base(self._live(), -1 if fd is None else fd, size, offset),
               f"{self.name}: map dirty log of {size} bytes at offset {offset}")

    def set_logging(self, on: bool) -> None:
        """VHOST_F_LOG_ALL: mark every guest page the data plane writes in the dirty log."""
        _check(lib.fsdp_dev_set_logging(self._live(), int(on)), f"{self.name}: set logging")

    def queue_set_log_used(self, q: int, used_gpa: int | None) -> None:
        """VHOST_VRING_F_LOG: log used ring writes at `used_gpa` (None: don't)."""
        _check(lib.fsdp_queue_set_log_used(self._live(), q, int(used_gpa is not None), used_gpa or 0),
               self._q("set used ring logging", q))

    def poll(self) -> int:
        """One synchronous engine pass over every started queue (loop not running).

        Returns POLL_* flags.  Notifications are written to the eventfds.
        """
        flags = ffi.new("uint32_t *")
        _check(lib.fsdp_dev_poll(self._live(), flags), f"{self.name}: poll")
        return flags[0]

    # queues ----------------------------------------------------------------
    def queue_set_num(self, q: int, num: int) -> None:
        _check(lib.fsdp_queue_set_num(self._live(), q, num), self._q(f"set num {num}", q))

    def queue_set_base(self, q: int, avail_idx: int) -> None:
        _check(lib.fsdp_queue_set_base(self._live(), q, avail_idx), self._q(f"set base {avail_idx}", q))

    def queue_set_addr(self, q: int, desc_uaddr: int, avail_uaddr: int, used_uaddr: int) -> None:
        _check(lib.fsdp_queue_set_addr(self._live(), q, desc_uaddr, avail_uaddr, used_uaddr),
               self._q(f"set ring addresses desc {desc_uaddr:#x} avail {avail_uaddr:#x} "
                       f"used {used_uaddr:#x}", q))

    def queue_set_guest_kick(self, q: int, fd: int | None) -> None:
        """The guest's kick eventfd (duplicated); None: no fd, poll the ring."""
        _check(lib.fsdp_queue_set_guest_kick(self._live(), q, -1 if fd is None else fd),
               self._q("set guest kick fd", q))

    def queue_set_guest_call(self, q: int, fd: int | None) -> None:
        """The guest's call eventfd (duplicated); None: never notify."""
        _check(lib.fsdp_queue_set_guest_call(self._live(), q, -1 if fd is None else fd),
               self._q("set guest call fd", q))

    def queue_backend_fds(self, q: int) -> tuple[int, int]:
        """(kick_fd, call_fd): eventfds owned by the data plane, to hand to the backend (send
        dups); replaced by :meth:`renew_backend_side`, so look them up when sending."""
        k = ffi.new("int *")
        c = ffi.new("int *")
        _check(lib.fsdp_queue_backend_fds(self._live(), q, k, c), self._q("backend fds", q))
        return k[0], c[0]

    def queue_shadow_addrs(self, q: int) -> tuple[int, int, int]:
        """(desc, avail, used) fake user addresses for SET_VRING_ADDR toward the backend."""
        d = ffi.new("uint64_t *")
        a = ffi.new("uint64_t *")
        u = ffi.new("uint64_t *")
        _check(lib.fsdp_queue_shadow_addrs(self._live(), q, d, a, u), self._q("shadow addresses", q))
        return d[0], a[0], u[0]

    def queue_start(self, q: int, *, event_idx: bool, backend_event_idx: bool | None = None,
                    backend_lost: bool = False) -> None:
        """Start the queue.  event_idx: VIRTIO_RING_F_EVENT_IDX negotiated (both
        sides unless backend_event_idx says otherwise).  backend_lost: the backend that
        held the kept requests died with them, so their re-publication counts toward
        max_replays (a request past it is failed as poison); after a ring stop the
        backend survived, kept requests are re-published without counting."""
        if backend_event_idx is None:
            backend_event_idx = event_idx
        flags = (lib.FSDP_QF_GUEST_EVENT_IDX if event_idx else 0) | (
            lib.FSDP_QF_BACKEND_EVENT_IDX if backend_event_idx else 0) | (
            lib.FSDP_QF_BACKEND_LOST if backend_lost else 0)
        _check(lib.fsdp_queue_start(self._live(), q, flags), self._q("start", q))

    def queue_pause(self, q: int) -> None:
        """Stop intake: no more guest requests are shadowed; completions still flow."""
        _check(lib.fsdp_queue_pause(self._live(), q), self._q("pause", q))

    def queue_stop(self, q: int, timeout_ms: int = 5000, backend_next_avail: int | None = None) -> int:
        """Stop intake, wait for in-flight requests, return the guest's next avail index.

        Raises :class:`DrainTimeout` (with ``avail_idx``) if requests remain in flight.
        See :meth:`queue_stop_result` for `backend_next_avail`.
        """
        return self.queue_stop_result(q, timeout_ms, backend_next_avail).avail_idx

    def queue_stop_result(self, q: int, timeout_ms: int = 5000,
                          backend_next_avail: int | None = None) -> StopResult:
        """:meth:`queue_stop`, telling what happened to the requests in flight.

        `backend_next_avail` is the backend's answer to GET_VRING_BASE (its next
        shadow avail index, after :meth:`queue_pause`): the requests it never
        took are not waited for; they are given back to the guest ring when
        they are its newest entries (``returned``), else kept for re-publishing
        (``kept``).  A made-up index is refused (a BAD_STOP_INDEX event) and
        everything is waited for.
        """
        res = ffi.new("struct fsdp_stop_result *")
        nxt = -1 if backend_next_avail is None else backend_next_avail
        rc = lib.fsdp_queue_stop(self._live(), q, timeout_ms, nxt, res)
        if rc < 0:
            err = _error(rc, self._q(f"stop (drain within {timeout_ms} ms)", q))
            if isinstance(err, DrainTimeout):
                err.avail_idx = res.avail_idx
                err.inflight = res.inflight
            raise err
        return StopResult(res.avail_idx, res.returned, res.kept, res.inflight)

    def queue_set_event_idx(self, q: int, on: bool) -> None:
        """VIRTIO_RING_F_EVENT_IDX changed (SET_FEATURES) on a running queue: both sides decide
        notifications the new way from now on; one kick and one call are sent so that
        nothing waits on a notification decided the old way."""
        flags = (lib.FSDP_QF_GUEST_EVENT_IDX | lib.FSDP_QF_BACKEND_EVENT_IDX) if on else 0
        _check(lib.fsdp_queue_set_event_idx(self._live(), q, flags), self._q("set event idx", q))

    def queue_discard(self, q: int) -> int:
        """Drop the requests a stopped queue keeps, without touching guest memory (the guest
        re-initialised the ring); returns how many."""
        return _check(lib.fsdp_queue_discard(self._live(), q), self._q("discard kept requests", q))

    def queue_clear_shadow(self, q: int) -> None:
        """Zero the shadow rings of a stopped queue, for a new backend (kept requests stay ours)."""
        _check(lib.fsdp_queue_clear_shadow(self._live(), q), self._q("clear the shadow ring", q))

    def queue_abort(self, q: int) -> int:
        """Fail every request kept in flight by a stopped queue toward the guest (the device's error)."""
        return _check(lib.fsdp_queue_abort(self._live(), q), self._q("abort in-flight requests", q))

    def stats(self, q: int) -> QueueStats:
        """Queue q's counters (cumulative since the device was added; bounce_bytes and inflight
        are gauges). Read by the loop thread itself (a command). Raises InvalidRequest."""
        s = ffi.new("struct fsdp_queue_stats *")
        with self._free_lock:       # the stats thread calls it while the session may remove the device
            _check(lib.fsdp_queue_stats(self._live(), q, s), self._q("stats", q))
        fields = {f: getattr(s, f) for f in QueueStats.__struct_fields__ if f != "refused_by_reason"}
        refused = {}
        for code in range(len(s.refused_by)):
            if s.refused_by[code]:
                refused["other" if code == 0 else event_name(code).lower()] = s.refused_by[code]
        return QueueStats(**fields, refused_by_reason=refused)

    def latency(self, q: int) -> list[HopLatency]:
        """Queue q's latency histograms, one per hop of LATENCY_HOPS (all zero when the data plane
        was made with latency_histograms=False). Raises InvalidRequest."""
        h = ffi.new("struct fsdp_queue_hist *")
        with self._free_lock:       # as stats
            _check(lib.fsdp_queue_hist(self._live(), q, h), self._q("latency histograms", q))
        out = []
        for i, hop in enumerate(LATENCY_HOPS):
            counts = list(h.count[i])
            while counts and not counts[-1]:
                counts.pop()
            out.append(HopLatency(hop, counts, int(h.sum_ns[i])))
        return out
