"""Proxy configuration: from the command line or a TOML file, typed by msgspec.

A config file serves several devices from one process:

    [[device]]
    name = "disk0"
    listen = "/run/fastshadow/disk0.sock"     # QEMU connects here
    backend = "/run/qsd/disk0.sock"           # fastshadow connects to the backend
    mode = "isolated"
    device = "blk"
"""

from __future__ import annotations

import enum
import os
import tomllib
from pathlib import Path

import msgspec

from ..devices import DEFAULT_REQUEST_DATA, DeviceType, kind


class Mode(str, enum.Enum):
    DIRECT = "direct"
    ISOLATED = "isolated"


class ConfigError(ValueError):
    """The configuration is not usable; the message says which setting and why."""


class DeviceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    listen: str
    backend: str | None = None
    backend_listen: str | None = None
    mode: Mode = Mode.DIRECT
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

    def reconnects_backend(self) -> bool:
        if self.mode is not Mode.ISOLATED or self.backend_reconnect == "off":
            return False
        return self.backend_reconnect == "on" or kind(self.device).replay_safe

    def validate(self) -> None:
        if (self.backend is None) == (self.backend_listen is None):
            raise ConfigError(f"device {self.name!r}: give exactly one of backend (connect) or backend_listen")
        refused = kind(self.device).refused
        if self.mode is Mode.ISOLATED and refused:
            raise ConfigError(f"device {self.name!r}: isolated mode cannot serve {self.device.value}: "
                              f"{refused}; use --mode direct or another device type")
        if self.backend_reconnect not in ("auto", "on", "off"):
            raise ConfigError(f"device {self.name!r}: backend_reconnect must be auto, on or off, "
                              f"not {self.backend_reconnect!r}")
        if self.stop_timeout <= 0:
            raise ConfigError(f"device {self.name!r}: stop_timeout must be positive (seconds)")
        if not 0 <= self.max_replays <= 100:
            raise ConfigError(f"device {self.name!r}: max_replays {self.max_replays}: want 0 to 100")
        if self.backend_timeout <= 0 or self.reply_timeout <= 0:
            raise ConfigError(f"device {self.name!r}: timeouts must be positive")
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
    #: 30 µs measured best here (bench/RESULTS.md, tuning): a cross-CPU eventfd wake-up costs 6-25 µs.
    busy_poll_us: int = 30
    #: Data plane: buffers of at least this many bytes are copied (guest <-> bounce) with streaming
    #: (non-temporal) stores, which skip reading the destination first (0: never; csrc/copy.c).
    stream_copy_min: int = STREAM_COPY_MIN_DEFAULT
    #: Seconds between two `stats` log lines per device (0: none; stats_file alone means 5).
    stats_interval: float = 0.0
    #: Where the latest stats snapshot is kept, as JSON (replaced atomically each interval).
    stats_file: str | None = None

    @property
    def stats_period(self) -> float:
        return self.stats_interval or (5.0 if self.stats_file else 0.0)

    def validate(self) -> None:
        if self.busy_poll_us < 0 or self.stream_copy_min < 0:
            raise ConfigError("busy_poll_us and stream_copy_min must not be negative")
        if self.stats_interval < 0:
            raise ConfigError(f"stats_interval {self.stats_interval:g}: want seconds >= 0 (0: no stats)")
        if self.stats_file is not None and not os.path.isdir(os.path.dirname(os.path.abspath(self.stats_file))):
            raise ConfigError(f"stats_file {self.stats_file}: its directory does not exist")
        if not self.device:
            raise ConfigError("no device configured: give --listen/--backend or a config file with [[device]]")
        seen: set[str] = set()
        for d in self.device:
            d.validate()
            for key in (d.name, d.listen):
                if key in seen:
                    raise ConfigError(f"{key!r} is used by two devices")
                seen.add(key)


def load_toml(path: str | Path) -> ProxyConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        cfg = msgspec.convert(raw, ProxyConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    cfg.validate()
    return cfg
