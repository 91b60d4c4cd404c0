"""fastshadow command line: `fastshadow proxy`, `fastshadow demo`, ..."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .proxy.config import STREAM_COPY_MIN_DEFAULT

PROXY_EPILOG = """\
Per-device options (--backend, --backend-listen, --mode, --device, --name)
given after a --listen apply to that device; given before the first --listen
they are defaults for every device. One process serves any number of devices.

examples:
  # one disk, isolated: QEMU connects to /run/fs/disk0.sock, the backend
  # (qemu-storage-daemon) listens on /run/qsd/disk0.sock
  fastshadow proxy --listen /run/fs/disk0.sock --backend /run/qsd/disk0.sock \\
      --mode isolated --device blk

  # two devices in one process, both direct
  fastshadow proxy --mode direct \\
      --listen /run/fs/a.sock --backend /run/qsd/a.sock \\
      --listen /run/fs/b.sock --backend /run/qsd/b.sock

  # a backend that connects out to us (e.g. DPDK vhost in client mode)
  fastshadow proxy --listen /run/fs/net0.sock --backend-listen /run/fs/net0-be.sock --device net

  # the same from a config file (TOML, [[device]] tables; see README)
  fastshadow proxy --config /etc/fastshadow.toml
"""

_PER_DEVICE = ("backend", "backend_listen", "mode", "device", "name")

#: The subcommands and their one-line help (`fastshadow --help`). Only the chosen
#: one's parser is built, and its module imported then: `fastshadow proxy` loads
#: neither the tracer, the benchmark, the demo nor the test guest (ARCHITECTURE.md).
COMMANDS = {
    "proxy": "run the vhost-user proxy",
    "demo": "boot a tiny VM whose disk goes through fastshadow and verify its I/O",
    "trace": "trace notification latency inside a running fastshadow (bcc, root)",
    "bench": "measure direct vs proxied vs isolated I/O with a vhost-user load generator",
}


class _DeviceOption(argparse.Action):
    """Collects --listen and the per-device options in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        devices = getattr(namespace, "devices", None)
        if devices is None:
            devices = []
            namespace.devices = devices
        defaults = getattr(namespace, "device_defaults", None)
        if defaults is None:
            defaults = {}
            namespace.device_defaults = defaults
        if self.dest == "listen":
            devices.append({"listen": value})
        elif devices:
            if self.dest in devices[-1]:
                parser.error(f"{option_string} given twice for the device listening on {devices[-1]['listen']}")
            devices[-1][self.dest] = value
        else:
            defaults[self.dest] = value


def _add_proxy_parser(sub) -> None:
    _configure_proxy(sub.add_parser("proxy", help=COMMANDS["proxy"]))


def _configure_proxy(p: argparse.ArgumentParser) -> None:
    p.description = ("Sit between QEMU (vhost-user front-end) and a vhost-user backend. In direct mode every "
                     "message is forwarded; in isolated mode the backend never receives guest RAM.")
    p.epilog = PROXY_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--listen", metavar="SOCK", action=_DeviceOption,
                   help="unix socket QEMU connects to (its -chardev socket,path=SOCK); starts a new device")
    p.add_argument("--backend", metavar="SOCK", action=_DeviceOption,
                   help="unix socket of the backend, which fastshadow connects to (the backend listens)")
    p.add_argument("--backend-listen", metavar="SOCK", action=_DeviceOption,
                   help="unix socket fastshadow listens on for a backend that connects out")
    p.add_argument("--mode", choices=["direct", "isolated"], action=_DeviceOption,
                   help="direct: forward everything (default); isolated: the backend sees only a shadow region")
    from . import devices
    refused = [d.name for d in devices.DEVICES if d.refused]
    p.add_argument("--device", choices=devices.names(), action=_DeviceOption,
                   help=f"virtio device type behind the socket (default blk); {' and '.join(refused)} are refused "
                        f"in isolated mode because their payloads carry guest addresses")
    p.add_argument("--name", action=_DeviceOption,
                   help="device name used in logs and in the shadow memfd name (default: dev0, dev1, ...)")
    p.add_argument("--config", metavar="FILE", help="TOML config file with [[device]] tables instead of options")
    p.add_argument("--backend-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the backend to accept or connect (default 10)")
    p.add_argument("--reply-timeout", type=float, default=30.0, metavar="S",
                   help="seconds the backend may take to answer a request (default 30)")
    p.add_argument("--max-request-bytes", type=int, default=None, metavar="N",
                   help="isolated: largest guest request data accepted, in bytes (the device's request header and "
                        "status not counted; default 4 MiB, raised to what the device advertises, e.g. virtio-blk "
                        "seg_max x size_max); a larger request fails with the device's error (blk: I/O error)")
    p.add_argument("--stop-timeout", type=float, default=2.0, metavar="S",
                   help="isolated: a ring stop (GET_VRING_BASE: VM stop, reboot, migration) answers QEMU within S "
                        "seconds whatever the backend does; requests it still holds are kept and re-published when "
                        "the ring resumes (default 2)")
    p.add_argument("--max-replays", type=int, default=1, metavar="N",
                   help="isolated: a request is handed again to the backend at most N times (after the backend died "
                        "with it or held it across a ring stop), then failed toward the guest with the device's "
                        "error and logged as poisoned, so one request cannot kill a backend forever (default 1)")
    p.add_argument("--bounce-per-queue", type=int, default=16 << 20, metavar="N",
                   help="isolated: bounce space per queue in the shadow region, bytes (default 16 MiB)")
    p.add_argument("--backend-reconnect", choices=["auto", "on", "off"], default="auto",
                   help="isolated: when the backend dies, keep the session and the guest's requests, reconnect, "
                        "replay the backend's setup and re-submit what was in flight, so the guest sees a delay; "
                        "auto (default) does it for blk, scsi and net, whose requests are safe to run twice; "
                        "off ends the session (QEMU reconnects)")
    p.add_argument("--busy-poll-us", type=int, default=30, metavar="US",
                   help="isolated: the data plane keeps polling the rings up to this long after the last activity "
                        "before it sleeps on eventfds; the window adapts to how soon work arrives and the spin "
                        "yields the CPU to other runnable tasks (default 30; 0 never spins: idle proxies sleep "
                        "either way)")
    p.add_argument("--stream-copy-min", type=int, default=STREAM_COPY_MIN_DEFAULT, metavar="BYTES",
                   help="isolated: buffers of at least this many bytes are copied between guest RAM and the bounce "
                        "area with streaming (non-temporal) stores, about twice as fast into memory that is not in "
                        "cache "
                        f"(default {STREAM_COPY_MIN_DEFAULT}; 0: always plain memcpy)")
    p.add_argument("--stats-interval", type=float, default=0.0, metavar="S",
                   help="every S seconds, log one `stats` line per device: connected or not, sessions served, "
                        "and in isolated mode the data plane's totals (requests, in flight, refused, throttled) "
                        "and rates (requests/s, MB/s each way) (default 0: no stats lines)")
    p.add_argument("--stats-file", metavar="PATH",
                   help="keep the latest stats snapshot in PATH as JSON, per device and per queue, replaced "
                        "atomically every interval (--stats-interval, 5 s if not given)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug logs one line per vhost-user message (default info)")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format (default text)")
    p.set_defaults(func=cmd_proxy, devices=None, device_defaults=None)


def build_proxy_config(args):
    from .proxy.config import ConfigError, DeviceConfig, DeviceType, Mode, ProxyConfig, load_toml

    if args.config:
        if args.devices:
            raise ConfigError("give either --config or --listen options, not both")
        cfg = load_toml(args.config)
        return cfg
    defaults = args.device_defaults or {}
    devices = []
    for i, d in enumerate(args.devices or []):
        merged = {**defaults, **d}
        devices.append(DeviceConfig(
            name=merged.get("name") or f"dev{i}",
            listen=merged["listen"],
            backend=merged.get("backend"),
            backend_listen=merged.get("backend_listen"),
            mode=Mode(merged.get("mode", "direct")),
            device=DeviceType(merged.get("device", "blk")),
            backend_timeout=args.backend_timeout,
            reply_timeout=args.reply_timeout,
            stop_timeout=args.stop_timeout,
            max_replays=args.max_replays,
            max_request_bytes=args.max_request_bytes,
            bounce_per_queue=args.bounce_per_queue,
            backend_reconnect=args.backend_reconnect,
        ))
    cfg = ProxyConfig(device=devices, log_level=args.log_level, log_format=args.log_format,
                      busy_poll_us=args.busy_poll_us, stream_copy_min=args.stream_copy_min,
                      stats_interval=args.stats_interval, stats_file=args.stats_file)
    cfg.validate()
    return cfg


def cmd_proxy(args) -> int:
    from . import logs
    from .proxy.config import ConfigError
    from .proxy.endpoints import EndpointError
    from .proxy.server import Proxy

    try:
        cfg = build_proxy_config(args)
    except ConfigError as e:
        print(f"fastshadow proxy: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level if args.config else args.log_level, cfg.log_format)
    try:
        proxy = Proxy(cfg)
    except EndpointError as e:
        print(f"fastshadow proxy: {e}", file=sys.stderr)
        return 1
    proxy.install_signal_handlers()
    proxy.serve_forever()
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(mode=args.mode, keep=args.keep)


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.description = ("Build (once, cached) a small guest, start qemu-storage-daemon, fastshadow and QEMU; the "
                     "guest writes and verifies data on its disk; print the verification and, in isolated mode, "
                     "the proof that the backend never mapped guest RAM.")
    p.add_argument("--mode", choices=["direct", "isolated"], default="isolated",
                   help="proxy mode (default isolated)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, sockets) for inspection")
    p.set_defaults(func=cmd_demo)


def _configure(name: str, p: argparse.ArgumentParser) -> None:
    """Give subcommand `name`'s parser its options and ``func``; its module is imported only now."""
    if name == "proxy":
        _configure_proxy(p)
    elif name == "demo":
        _configure_demo(p)
    elif name == "trace":
        from .trace.tool import configure
        configure(p)
    elif name == "bench":
        from .bench.cli import configure
        configure(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fastshadow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastshadow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # The command is the first word that is not an option (the top-level options take no value).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, one_line in COMMANDS.items():
        p = sub.add_parser(name, help=one_line)
        if name == chosen:
            _configure(name, p)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
