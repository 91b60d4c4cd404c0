"""Proxy configuration: from the command line or a TOML file, typed by msgspec.

A config file serves several devices from one process:

    [[device]]
    name = "disk0"
    listen = "/run/fastshadow/disk0.sock"     # QEMU connects here
    backend = "/run/qsd/disk0.sock"           # fastshadow connects to the backend
    mode = "isolated"                         # the default; "direct" for baselines and tracing
    device = "blk"
    socket_group = "libvirt-qemu"             # QEMU's group may connect (mode 0660 unless socket_mode)

Sizes (bounce_per_queue, max_request_bytes, stream_copy_min) are bytes or
strings such as "16M" (fastshadow/sizes.py).

Data-plane threads (top level): dataplane_threads = 4 (default: one per
isolated device, up to the CPUs), cpus = "2-5" (loop i pinned to the i-th),
idle_trim_ms = 2000; a device may name its thread: dataplane_thread = 1.
"""

from __future__ import annotations

import enum
import grp
import math
import os
import tomllib
from pathlib import Path

import msgspec

from ..devices import DEFAULT_REQUEST_DATA, DeviceType, kind
from ..sizes import SizeError, parse_size


#: Limits of the data plane (csrc/device.c, csrc/fsdp.h), checked at start so that a value it
#: cannot take is one line and exit 2, not a failure of every session later.
MAX_BOUNCE_PER_QUEUE = 64 << 30          # MAX_BOUNCE
MAX_REQUEST_BYTES = 2**32 - 1            # used.len is 32 bits
MAX_NAME_BYTES = 63                      # FSDP_NAME_MAX (64) with its NUL
#: sockaddr_un's sun_path (108 bytes) with its NUL.
MAX_SOCKET_PATH = 107
#: The longest timeout or interval taken, in seconds (one day): the socket and select
#: timeouts beneath refuse what no clock can reach (1e300, inf), and NaN compares false.
MAX_SECONDS = 86400.0


def check_seconds(what: str, value: float, *, zero: bool = False) -> None:
    """A number of seconds: finite, positive (or zero when `zero`), at most MAX_SECONDS."""
    low_ok = value >= 0 if zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= MAX_SECONDS):
        raise ConfigError(f"{what} {value:g}: want seconds {'>= 0' if zero else '> 0'} and at most "
                          f"{MAX_SECONDS:g}")


class Mode(str, enum.Enum):
    DIRECT = "direct"
    ISOLATED = "isolated"


class ConfigError(ValueError):
    """The configuration is not usable; the message says which setting and why."""


def parse_socket_mode(value: str | int, what: str = "socket_mode") -> int:
    """An octal permission mode ("0660", "660" or TOML's 0o660) for a socket file."""
    try:
        mode = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 8)
    except ValueError:
        raise ConfigError(f"{what} {value!r}: want an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{what} {value!r}: want permission bits only, 0 to 0777 (e.g. 0660)")
    return mode


def resolve_group(value: str | int, what: str = "socket_group") -> int:
    """A group name or number -> gid; the group must exist."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(f"{what} {value!r}: no such group") from None


class SocketAccess(msgspec.Struct, frozen=True):
    """Who may connect to a socket fastshadow creates: its mode and group, set before listen()."""

    mode: int | None = None
    gid: int | None = None

    @property
    def given(self) -> bool:
        return self.mode is not None or self.gid is not None


def socket_access(mode: str | int | None, group: str | int | None, what: str = "socket") -> SocketAccess:
    """The access of a socket; a group without a mode gives 0660 (owner and group read-write)."""
    gid = resolve_group(group, f"{what}_group") if group is not None else None
    m = parse_socket_mode(mode, f"{what}_mode") if mode is not None else (0o660 if gid is not None else None)
    return SocketAccess(m, gid)


class DeviceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    #: Where QEMU connects: a path fastshadow creates (or systemd passed, by the same path) ...
    listen: str | None = None
    #: ... or a socket fastshadow inherits as this fd (--fd, QEMU's backend program convention):
    #: a listening socket, or one end of a connected socketpair (one session, then exit).
    listen_fd: int | None = None
    backend: str | None = None
    backend_listen: str | None = None
    #: Isolated is the default; direct forwards guest RAM to the backend (baselines, tracing).
    mode: Mode = Mode.ISOLATED
    #: Who may connect to the listen socket (mode: octal, group: name or gid). Applied
    #: between bind() and listen(), so no one connects before it is right.
    socket_mode: str | int | None = None
    socket_group: str | int | None = None
    #: The same for the --backend-listen socket (the backend's user must connect to it).
    backend_socket_mode: str | int | None = None
    backend_socket_group: str | int | None = None
    device: DeviceType = DeviceType.BLK
    #: Seconds to wait for the backend (connect retries or its connection).
    backend_timeout: float = 10.0
    #: Seconds the backend may take to answer a request.
    reply_timeout: float = 30.0
    #: Seconds a ring stop (GET_VRING_BASE) may take in isolated mode, backend included.
    stop_timeout: float = 2.0
    #: Isolated mode: how often one request is handed again to a backend (after the backend
    #: died with it, or held it across a ring stop) before it is failed toward the guest.
    max_replays: int = 1
    #: Isolated mode, vIOMMU guests: the most IOVA translations fastshadow keeps per device
    #: (VHOST_USER_IOTLB_MSG updates past it are refused, one line): bounds the memory a
    #: front-end can make it use. Page-sized entries: 65536 cover 256 MiB of mapped buffers.
    iotlb_max_entries: int = 65536
    #: Isolated mode, vIOMMU guests: keep a completed request's IOVA translations, trusting the
    #: guest's invalidations, instead of forgetting them (the default, safe for Linux guests in
    #: lazy invalidation mode; it makes every request ask QEMU for its pages).
    iotlb_keep_completed: bool = False
    #: Isolated mode: the largest request data (buffer bytes, the device's request header and
    #: status excluded) accepted from the guest. None: 4 MiB, or what the device advertises
    #: if more (blk: seg_max x size_max).
    max_request_bytes: int | None = None
    #: Isolated mode: bounce space per queue in the shadow region.
    bounce_per_queue: int = 16 << 20
    #: Isolated mode, when the backend dies: "auto" keeps the session and the guest's
    #: requests and reconnects for devices whose requests are safe to run twice
    #: (devices.py replay_safe: blk, scsi, net); "on" for every device type; "off" ends
    #: the session (QEMU reconnects).
    backend_reconnect: str = "auto"
    #: Isolated mode: the data-plane thread (loop index, 0..threads-1) serving every queue of
    #: this device; None: the thread serving the fewest queues when the session starts.
    dataplane_thread: int | None = None

    def reconnects_backend(self) -> bool:
        if self.mode is not Mode.ISOLATED or self.backend_reconnect == "off":
            return False
        return self.backend_reconnect == "on" or kind(self.device).replay_safe

    @property
    def where(self) -> str:
        """The listen side, for logs: its path, or fd:N."""
        return self.listen if self.listen is not None else f"fd:{self.listen_fd}"

    def access(self) -> SocketAccess:
        return socket_access(self.socket_mode, self.socket_group, "socket")

    def backend_access(self) -> SocketAccess:
        return socket_access(self.backend_socket_mode, self.backend_socket_group, "backend_socket")

    def validate(self) -> None:
        if (self.listen is None) == (self.listen_fd is None):
            raise ConfigError(f"device {self.name!r}: give exactly one of listen (a path) or listen_fd (--fd)")
        if self.listen_fd is not None and self.listen_fd < 0:
            raise ConfigError(f"device {self.name!r}: listen_fd {self.listen_fd}: want a file descriptor >= 0")
        if (self.backend is None) == (self.backend_listen is None):
            raise ConfigError(f"device {self.name!r}: give exactly one of backend (connect) or backend_listen")
        for what, path in (("listen", self.listen), ("backend", self.backend),
                           ("backend_listen", self.backend_listen)):
            if path is not None and len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ConfigError(f"device {self.name!r}: {what} {path}: a unix socket path holds at most "
                                  f"{MAX_SOCKET_PATH} bytes, this one {len(os.fsencode(path))}")
        try:
            access = self.access()
            self.backend_access()
        except ConfigError as e:
            raise ConfigError(f"device {self.name!r}: {e}") from None
        if access.given and self.listen is None:
            raise ConfigError(f"device {self.name!r}: socket_mode and socket_group apply to a socket fastshadow "
                              f"creates (listen), not to an inherited fd")
        refused = kind(self.device).refused
        if self.mode is Mode.ISOLATED and refused:
            raise ConfigError(f"device {self.name!r}: isolated mode cannot serve {self.device.value}: "
                              f"{refused}; use --mode direct or another device type")
        if self.backend_reconnect not in ("auto", "on", "off"):
            raise ConfigError(f"device {self.name!r}: backend_reconnect must be auto, on or off, "
                              f"not {self.backend_reconnect!r}")
        try:
            for what in ("stop_timeout", "backend_timeout", "reply_timeout"):
                check_seconds(what, getattr(self, what))
        except ConfigError as e:
            raise ConfigError(f"device {self.name!r}: {e}") from None
        if self.dataplane_thread is not None and self.dataplane_thread < 0:
            raise ConfigError(f"device {self.name!r}: dataplane_thread {self.dataplane_thread}: want a thread "
                              f"index >= 0")
        if not 0 <= self.max_replays <= 100:
            raise ConfigError(f"device {self.name!r}: max_replays {self.max_replays}: want 0 to 100")
        if not 1 <= self.iotlb_max_entries <= 1 << 20:
            raise ConfigError(f"device {self.name!r}: iotlb_max_entries {self.iotlb_max_entries}: "
                              f"want 1 to {1 << 20}")
        if len(self.name.encode()) > MAX_NAME_BYTES:
            raise ConfigError(f"device {self.name!r}: name is {len(self.name.encode())} bytes, at most "
                              f"{MAX_NAME_BYTES} bytes")
        if self.bounce_per_queue > MAX_BOUNCE_PER_QUEUE:
            raise ConfigError(f"device {self.name!r}: bounce_per_queue ({self.bounce_per_queue}) is over the "
                              f"data plane's limit of 64 GiB per queue")
        if self.max_request_bytes is not None and self.max_request_bytes > MAX_REQUEST_BYTES:
            raise ConfigError(f"device {self.name!r}: max_request_bytes ({self.max_request_bytes}) is over "
                              f"{MAX_REQUEST_BYTES} (a request's length must fit used.len's 32 bits)")
        cap = DEFAULT_REQUEST_DATA if self.max_request_bytes is None else self.max_request_bytes
        if cap <= 0 or self.bounce_per_queue < cap + kind(self.device).request_overhead:
            raise ConfigError(f"device {self.name!r}: bounce_per_queue ({self.bounce_per_queue}) must hold at "
                              f"least one request of max_request_bytes ({cap}) and its header")


STREAM_COPY_MIN_DEFAULT = 64 * 1024


class ProxyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device: list[DeviceConfig]
    log_level: str = "info"
    log_format: str = "text"
    #: Data plane: at most this many microseconds of polling after the last activity before sleeping
    #: (0: never); the window adapts (csrc/loop.c, busy_poll).
    #: 200 µs (KVM's halt_poll_ns default) measured best on the 2-vCPU VM of bench/RESULTS.md
    #: ("The spin window"), where waking an idle vCPU costs ~50 µs: 30 µs (the earlier default,
    #: chosen where a wake-up cost 6-25 µs) gave 0.4x the IOPS at 4k QD32 and QD1.
    busy_poll_us: int = 200
    #: Data plane: buffers of at least this many bytes are copied (guest <-> bounce) with streaming
    #: (non-temporal) stores, which skip reading the destination first (0: never; csrc/copy.c).
    stream_copy_min: int = STREAM_COPY_MIN_DEFAULT
    #: Data plane: keep per-queue latency histograms (csrc/hist.c; stats, metrics, `fastshadow trace
    #: --from-stats`). On by default: their cost is measured by `fastshadow bench --variant`.
    latency_histograms: bool = True
    #: Seconds between two `stats` log lines per device (0: none; stats_file alone means 5).
    stats_interval: float = 0.0
    #: Where the latest stats snapshot is kept, as JSON (replaced atomically each interval).
    stats_file: str | None = None
    #: Isolated mode: serve a session even when the backend runs as root, as QEMU's uid or as
    #: fastshadow's own (identities that can open QEMU's /proc/PID/fd), with one warning per
    #: session. Without it such a session is refused (fastshadow/isolation.py, identity_risk).
    allow_shared_uid: bool = False
    #: Serve Prometheus metrics on HOST:PORT, [HOST]:PORT, :PORT or a unix socket path (None: off).
    metrics_listen: str | None = None
    #: Data plane: how many loop threads (each its own io_uring) serve the isolated devices.
    #: 0: one per isolated device, at most one per CPU of `cpus` (or of the process's affinity).
    dataplane_threads: int = 0
    #: Data plane: CPU list ("2-5,8"); loop thread i runs on CPU number i (mod the list's length)
    #: of it. None: no pinning (the threads run where the process may).
    cpus: str | None = None
    #: Data plane: a queue's bounce pages are given back to the kernel once it has held no
    #: request for this long (ms; 0: never), so idle devices cost no bounce memory.
    idle_trim_ms: int = 2000

    def cpu_list(self) -> list[int]:
        """The CPUs of `cpus`, in the order given (empty: not given)."""
        return parse_cpu_list(self.cpus) if self.cpus is not None else []

    def thread_count(self) -> int:
        """Data-plane threads to run: `dataplane_threads`, or one per isolated device up to the CPUs."""
        if self.dataplane_threads:
            return self.dataplane_threads
        isolated = sum(1 for d in self.device if d.mode is Mode.ISOLATED)
        cpus = len(self.cpu_list()) or len(os.sched_getaffinity(0))
        return max(1, min(isolated, cpus))

    @property
    def stats_period(self) -> float:
        return self.stats_interval or (5.0 if self.stats_file else 0.0)

    def validate(self) -> None:
        if self.busy_poll_us < 0 or self.stream_copy_min < 0:
            raise ConfigError("busy_poll_us and stream_copy_min must not be negative")
        if self.busy_poll_us > 2**32 - 1:      # uint32_t in csrc/fsdp.h
            raise ConfigError(f"busy_poll_us {self.busy_poll_us}: at most 4294967295 (microseconds)")
        if self.stream_copy_min > MAX_REQUEST_BYTES + 1:   # no buffer is larger: streaming never happens
            raise ConfigError(f"stream_copy_min {self.stream_copy_min}: at most {MAX_REQUEST_BYTES + 1} "
                              f"(4 GiB: no buffer is larger; 0 turns streaming off)")
        if not 0 <= self.dataplane_threads <= 64:
            raise ConfigError(f"dataplane_threads {self.dataplane_threads}: want 1 to 64 (0: one per isolated "
                              f"device, up to the CPUs)")
        if not 0 <= self.idle_trim_ms <= 2**32 - 1:      # uint32_t in csrc/fsdp.h
            raise ConfigError(f"idle_trim_ms {self.idle_trim_ms}: want milliseconds 0 to 4294967295 (0: never "
                              f"give back)")
        allowed = os.sched_getaffinity(0)
        outside = [c for c in self.cpu_list() if c not in allowed]
        if outside:
            raise ConfigError(f"cpus {self.cpus!r}: CPU(s) {outside} are not among those this process may run "
                              f"on ({format_cpu_list(sorted(allowed))})")
        threads = self.thread_count()
        for d in self.device:
            if d.dataplane_thread is not None and d.dataplane_thread >= threads:
                raise ConfigError(f"device {d.name!r}: dataplane_thread {d.dataplane_thread} but the data plane "
                                  f"runs {threads} thread(s) (0..{threads - 1}); raise dataplane_threads")
        if self.stats_interval < 0:
            raise ConfigError(f"stats_interval {self.stats_interval:g}: want seconds >= 0 (0: no stats)")
        check_seconds("stats_interval", self.stats_interval, zero=True)
        if self.stats_file is not None and not os.path.isdir(os.path.dirname(os.path.abspath(self.stats_file))):
            raise ConfigError(f"stats_file {self.stats_file}: its directory does not exist")
        if self.stats_file is not None and os.path.isdir(self.stats_file):
            raise ConfigError(f"stats_file {self.stats_file}: is a directory (want a file path)")
        if not self.device:
            raise ConfigError("no device configured: give --listen/--backend or a config file with [[device]]")
        if self.metrics_listen is not None:
            parse_metrics_listen(self.metrics_listen)
        seen: set = set()
        for d in self.device:
            d.validate()
            for key in (d.name, d.listen, d.listen_fd, d.backend_listen):
                if key is None:
                    continue
                if key in seen:
                    raise ConfigError(f"{key!r} is used by two devices")
                seen.add(key)
        ours = {d.listen for d in self.device} | {d.backend_listen for d in self.device}
        if self.metrics_listen is not None and "/" in self.metrics_listen and \
                os.path.abspath(self.metrics_listen) in {os.path.abspath(p) for p in ours if p}:
            raise ConfigError(f"metrics_listen {self.metrics_listen} is also a device socket: give it a path "
                              f"of its own")
        if self.stats_file is not None:
            sockets = {os.path.abspath(p) for p in ours | {self.metrics_listen} if p and "/" in p}
            if os.path.abspath(self.stats_file) in sockets:
                raise ConfigError(f"stats_file {self.stats_file} is one of fastshadow's own sockets: each "
                                  f"snapshot would replace it")
        for d in self.device:
            if d.backend is not None and d.backend in ours:
                raise ConfigError(f"device {d.name!r}: backend {d.backend} is one of fastshadow's own "
                                  f"sockets: it would connect to itself")


def parse_cpu_list(text: str) -> list[int]:
    """`--cpus`: "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ConfigError(f"cpus {text!r}: want a CPU list such as 0-3,8 (numbers and ascending ranges)")
        for c in range(int(lo), int(hi if sep else lo) + 1):
            if c not in cpus:
                cpus.append(c)
    return cpus


def format_cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    for c in cpus:
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def parse_metrics_listen(text: str) -> tuple[str, int] | str:
    """`--metrics-listen`: (host, port) for HOST:PORT, [V6]:PORT or :PORT (every address),
    or a unix socket path (containing a /)."""
    if "/" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics_listen {text!r}: want HOST:PORT (e.g. 127.0.0.1:9177), :PORT or a unix "
                          f"socket path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


#: Config keys holding sizes: bytes, or strings such as "16M" (sizes.py).
SIZE_KEYS = ("bounce_per_queue", "max_request_bytes", "stream_copy_min")


def _sizes(table: dict, where: str) -> None:
    for key in SIZE_KEYS:
        if key in table and table[key] is not None:
            try:
                table[key] = parse_size(table[key])
            except SizeError as e:
                raise ConfigError(f"{where}{key}: {e}") from None


def load_toml(path: str | Path) -> ProxyConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    _sizes(raw, "")
    devices = raw.get("device")
    # Anything but a list of tables is msgspec's to name (`device = 3`: "Expected `array`").
    for i, d in enumerate(devices if isinstance(devices, list) else []):
        if isinstance(d, dict):
            _sizes(d, f"device {d.get('name', i)!r}: ")
    try:
        cfg = msgspec.convert(raw, ProxyConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    cfg.validate()
    return cfg
