"""fastshadow command line: `fastshadow proxy`, `fastshadow demo`, ..."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import __version__
from .proxy.config import STREAM_COPY_MIN_DEFAULT

PROXY_EPILOG = """\
Per-device options (--backend, --backend-listen, --mode, --device, --name,
--socket-mode, --socket-group, --backend-socket-mode, --backend-socket-group)
given after a --listen (or --fd) apply to that device; given before the first
--listen they are defaults for every device. One process serves any number of
devices. Sizes are bytes or e.g. 16M, 16MiB, 4k (powers of 1024).

Isolated mode is the default: the backend never sees guest RAM, and each
session checks who the backend runs as (it must be neither root, nor QEMU's
uid, nor fastshadow's). Direct mode hands the backend guest RAM: it is for
baselines and tracing.

examples:
  # one disk, isolated: QEMU (group libvirt-qemu) connects to /run/fastshadow/disk0.sock,
  # the backend (qemu-storage-daemon, its own user) listens on /run/qsd/disk0.sock
  fastshadow proxy --listen /run/fastshadow/disk0.sock --backend /run/qsd/disk0.sock \\
      --device blk --socket-group libvirt-qemu

  # two devices in one process, both direct (a baseline)
  fastshadow proxy --mode direct \\
      --listen /run/fs/a.sock --backend /run/qsd/a.sock \\
      --listen /run/fs/b.sock --backend /run/qsd/b.sock

  # a backend that connects out to us (e.g. DPDK vhost in client mode)
  fastshadow proxy --listen /run/fs/net0.sock --backend-listen /run/fs/net0-be.sock --device net

  # QEMU's backend program conventions: the socket as an inherited fd, capabilities
  fastshadow proxy --fd 3 --backend /run/qsd/disk0.sock
  fastshadow proxy --device fs --print-capabilities

  # the same from a config file (TOML, [[device]] tables; see README)
  fastshadow proxy --config /etc/fastshadow.toml --metrics-listen 127.0.0.1:9177
"""

_PER_DEVICE = ("backend", "backend_listen", "mode", "device", "name", "socket_mode", "socket_group",
               "backend_socket_mode", "backend_socket_group")

#: The subcommands and their one-line help (`fastshadow --help`). Only the chosen
#: one's parser is built, and its module imported then: `fastshadow proxy` loads
#: neither the tracer, the benchmark, the demo nor the test guest (ARCHITECTURE.md).
COMMANDS = {
    "proxy": "run the vhost-user proxy",
    "run": "run fastshadow in front of a backend it starts as another user (one program for libvirt or systemd)",
    "install-descriptors": "write QEMU vhost-user backend descriptors (JSON) for fastshadow, one per device type",
    "demo": "boot a tiny VM whose disk goes through fastshadow and verify its I/O",
    "trace": "trace notification latency inside a running fastshadow (bcc, root)",
    "bench": "measure direct vs proxied vs isolated I/O with a vhost-user load generator",
}


class OneLineParser(argparse.ArgumentParser):
    """A bad option or value is one line on stderr and exit status 2 (argparse prints the
    whole usage first, which buries the one line that matters)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def size_arg(text: str) -> int:
    """argparse type of every size option: bytes, or 16M, 16MiB, 4k ... (fastshadow/sizes.py)."""
    from .sizes import SizeError, parse_size
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fd_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number")
    return int(text)


class _DeviceOption(argparse.Action):
    """Collects --listen (--socket-path), --fd and the per-device options in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        devices = getattr(namespace, "devices", None)
        if devices is None:
            devices = []
            namespace.devices = devices
        defaults = getattr(namespace, "device_defaults", None)
        if defaults is None:
            defaults = {}
            namespace.device_defaults = defaults
        if self.dest in ("listen", "listen_fd"):
            devices.append({self.dest: value})
        elif devices:
            if self.dest in devices[-1]:
                parser.error(f"{option_string} given twice for the device on {_where(devices[-1])}")
            devices[-1][self.dest] = value
        else:
            defaults[self.dest] = value


def _where(d: dict) -> str:
    return d["listen"] if "listen" in d else f"fd {d['listen_fd']}"


def _add_proxy_parser(sub) -> None:
    _configure_proxy(sub.add_parser("proxy", help=COMMANDS["proxy"]))


def _configure_proxy(p: argparse.ArgumentParser) -> None:
    p.description = ("Sit between QEMU (vhost-user front-end) and a vhost-user backend. In isolated mode (the "
                     "default) the backend never receives guest RAM; in direct mode every message is forwarded "
                     "(for baselines and tracing).")
    p.epilog = PROXY_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--listen", "--socket-path", metavar="SOCK", dest="listen", action=_DeviceOption,
                   help="unix socket QEMU connects to (its -chardev socket,path=SOCK); starts a new device. "
                        "fastshadow creates it (replacing a stale socket, refusing one a live fastshadow holds: "
                        "SOCK.lock) and removes it at exit; under systemd socket activation (LISTEN_FDS) the "
                        "passed socket bound to SOCK is used instead")
    p.add_argument("--fd", metavar="FD", type=fd_arg, dest="listen_fd", action=_DeviceOption,
                   help="instead of --listen: the vhost-user socket is inherited as this file descriptor, either "
                        "listening (QEMU connects, as many times as it likes) or one end of a connected "
                        "socketpair (one session, then fastshadow exits); starts a new device")
    p.add_argument("--backend", metavar="SOCK", action=_DeviceOption,
                   help="unix socket of the backend, which fastshadow connects to (the backend listens)")
    p.add_argument("--backend-listen", metavar="SOCK", action=_DeviceOption,
                   help="unix socket fastshadow listens on for a backend that connects out")
    p.add_argument("--mode", choices=["direct", "isolated"], action=_DeviceOption,
                   help="isolated (default): the backend sees only a shadow region, never guest RAM; direct: "
                        "forward everything, guest RAM fds included (for baselines and tracing)")
    from . import devices
    refused = [d.name for d in devices.DEVICES if d.refused]
    p.add_argument("--device", choices=devices.names(), action=_DeviceOption,
                   help=f"virtio device type behind the socket (default blk); {' and '.join(refused)} are refused "
                        f"in isolated mode because their payloads carry guest addresses")
    p.add_argument("--name", action=_DeviceOption,
                   help="device name used in logs and in the shadow memfd name (default: dev0, dev1, ...)")
    p.add_argument("--socket-mode", metavar="MODE", action=_DeviceOption,
                   help="permissions of the --listen socket, octal (default: as the umask makes it; 0660 with "
                        "--socket-group); set before the socket listens, so nobody connects earlier")
    p.add_argument("--socket-group", metavar="GROUP", action=_DeviceOption,
                   help="group of the --listen socket, name or gid: the group QEMU runs as (libvirt: "
                        "libvirt-qemu), so that QEMU may connect")
    p.add_argument("--backend-socket-mode", metavar="MODE", action=_DeviceOption,
                   help="permissions of the --backend-listen socket, octal (as --socket-mode)")
    p.add_argument("--backend-socket-group", metavar="GROUP", action=_DeviceOption,
                   help="group of the --backend-listen socket: the backend's group, so that it may connect")
    p.add_argument("--config", metavar="FILE", help="TOML config file with [[device]] tables instead of options")
    p.add_argument("--allow-shared-uid", action="store_true", default=None,
                   help="isolated: serve a session whose backend runs as root, as QEMU's uid or as fastshadow's "
                        "(each can open QEMU's /proc/PID/fd and map guest RAM without fastshadow), with one "
                        "warning per session; without it such a session is refused. For test beds where "
                        "everything runs as one user")
    p.add_argument("--metrics-listen", metavar="ADDR", default=None,
                   help="serve Prometheus metrics (text format) on HOST:PORT, [HOST]:PORT, :PORT (every address) "
                        "or a unix socket PATH: per device and queue the counters of the stats line")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities JSON of --device (QEMU's backend program "
                        "conventions) and exit; every other option is ignored")
    p.add_argument("--backend-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the backend to accept or connect (default 10)")
    p.add_argument("--reply-timeout", type=float, default=30.0, metavar="S",
                   help="seconds the backend may take to answer a request (default 30)")
    p.add_argument("--max-request-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="isolated: largest guest request data accepted (the device's request header and "
                        "status not counted; default 4M, raised to what the device advertises, e.g. virtio-blk "
                        "seg_max x size_max); a larger request fails with the device's error (blk: I/O error)")
    p.add_argument("--stop-timeout", type=float, default=2.0, metavar="S",
                   help="isolated: a ring stop (GET_VRING_BASE: VM stop, reboot, migration) answers QEMU within S "
                        "seconds whatever the backend does; requests it still holds are kept and re-published when "
                        "the ring resumes (default 2)")
    p.add_argument("--max-replays", type=int, default=1, metavar="N",
                   help="isolated: a request the backend died with is handed to a restarted backend at most N times, "
                        "then failed toward the guest with the device's error and logged as poisoned, so one "
                        "request cannot kill a backend forever (default 1); requests a live backend held across "
                        "a ring stop are re-published without counting")
    p.add_argument("--iotlb-max-entries", type=int, default=65536, metavar="N",
                   help="isolated, vIOMMU guests: keep at most N IOVA translations per device; QEMU's "
                        "IOTLB updates past it are refused with one log line (default 65536: 256 MiB of "
                        "4 KiB pages mapped at once)")
    p.add_argument("--iotlb-keep-completed", action="store_true",
                   help="isolated, vIOMMU guests: keep the IOVA translations of completed requests, trusting "
                        "the guest's invalidations (guests in strict mode, iommu.strict=1, or whose concurrent "
                        "requests share IOVA pages); by default they are forgotten, which is safe with Linux's "
                        "lazy invalidation but makes every request ask QEMU for its pages")
    p.add_argument("--bounce-per-queue", type=size_arg, default=16 << 20, metavar="SIZE",
                   help="isolated: bounce space per queue in the shadow region (default 16M)")
    p.add_argument("--backend-reconnect", choices=["auto", "on", "off"], default="auto",
                   help="isolated: when the backend dies, keep the session and the guest's requests, reconnect, "
                        "replay the backend's setup and re-submit what was in flight, so the guest sees a delay; "
                        "auto (default) does it for blk, scsi and net, whose requests are safe to run twice; "
                        "off ends the session (QEMU reconnects)")
    p.add_argument("--dataplane-thread", type=int, metavar="K", action=_DeviceOption,
                   help="isolated: the data-plane thread (0..threads-1) serving every queue of this device "
                        "(default: the thread serving the fewest queues when QEMU connects)")
    p.add_argument("--dataplane-threads", type=int, default=0, metavar="N",
                   help="isolated: data-plane threads, each with its own io_uring; a device's queues are all "
                        "served by one of them (default: one per isolated device, at most one per CPU of --cpus "
                        "or of the process's affinity)")
    p.add_argument("--cpus", metavar="LIST", default=None,
                   help="isolated: pin data-plane thread i to CPU i (mod the list's length) of LIST, e.g. 2-5,8 "
                        "(the kernel's cpulist format); for hosts that pin vCPUs and backends (default: no pinning)")
    p.add_argument("--idle-trim-ms", type=int, default=2000, metavar="MS",
                   help="isolated: a queue that has held no request for MS milliseconds gives its bounce pages back "
                        "to the kernel (punched out of the shadow memfd), so idle devices cost no bounce memory "
                        "whatever --bounce-per-queue is (default 2000; 0: never)")
    p.add_argument("--busy-poll-us", type=int, default=200, metavar="US",
                   help="isolated: the data plane keeps polling the rings up to this long after the last activity "
                        "before it sleeps on eventfds; the window adapts to how soon work arrives and the spin "
                        "yields the CPU to other runnable tasks (default 200, as KVM's halt_poll_ns; 0 never spins: idle proxies sleep "
                        "either way)")
    p.add_argument("--stream-copy-min", type=size_arg, default=STREAM_COPY_MIN_DEFAULT, metavar="SIZE",
                   help="isolated: buffers of at least this size are copied between guest RAM and the bounce "
                        "area with streaming (non-temporal) stores, about twice as fast into memory that is not in "
                        "cache "
                        f"(default {STREAM_COPY_MIN_DEFAULT // 1024}k; 0: always plain memcpy)")
    p.add_argument("--no-latency-histograms", dest="latency_histograms", action="store_false",
                   help="isolated: keep no per-queue latency histograms in the data plane (they are on by "
                        "default, in the stats file, the metrics and `fastshadow trace --from-stats`; this "
                        "option is for measuring what they cost)")
    p.add_argument("--stats-interval", type=float, default=0.0, metavar="S",
                   help="every S seconds, log one `stats` line per device: connected or not, sessions served, "
                        "and in isolated mode the data plane's totals (requests, in flight, refused, throttled) "
                        "and rates (requests/s, MB/s each way) (default 0: no stats lines)")
    p.add_argument("--stats-file", metavar="PATH",
                   help="keep the latest stats snapshot in PATH as JSON, per device and per queue, replaced "
                        "atomically every interval (--stats-interval, 5 s if not given)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug logs one line per vhost-user message (default info)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="log line format (default text: ISO-8601 local time with offset, level, event, "
                        "key=value); logs go to stderr (journald under systemd). SIGHUP is ignored: there is "
                        "no log file to re-open")
    p.set_defaults(func=cmd_proxy, devices=None, device_defaults=None)


def build_proxy_config(args):
    from .proxy.config import DeviceConfig, DeviceType, Mode, ProxyConfig, load_toml

    if args.config:
        if args.devices:
            from .proxy.config import ConfigError
            raise ConfigError("give either --config or --listen/--fd options, not both")
        cfg = load_toml(args.config)
        # Options of the process given with --config add to the file.
        if args.allow_shared_uid:
            cfg.allow_shared_uid = True
        if args.metrics_listen is not None:
            cfg.metrics_listen = args.metrics_listen
        cfg.validate()
        return cfg
    defaults = args.device_defaults or {}
    devices = []
    for i, d in enumerate(args.devices or []):
        merged = {**defaults, **d}
        devices.append(DeviceConfig(
            name=merged.get("name") or f"dev{i}",
            listen=merged.get("listen"),
            listen_fd=merged.get("listen_fd"),
            backend=merged.get("backend"),
            backend_listen=merged.get("backend_listen"),
            mode=Mode(merged.get("mode", "isolated")),
            device=DeviceType(merged.get("device", "blk")),
            socket_mode=merged.get("socket_mode"),
            socket_group=merged.get("socket_group"),
            backend_socket_mode=merged.get("backend_socket_mode"),
            backend_socket_group=merged.get("backend_socket_group"),
            backend_timeout=args.backend_timeout,
            reply_timeout=args.reply_timeout,
            stop_timeout=args.stop_timeout,
            max_replays=args.max_replays,
            iotlb_max_entries=args.iotlb_max_entries,
            iotlb_keep_completed=args.iotlb_keep_completed,
            max_request_bytes=args.max_request_bytes,
            bounce_per_queue=args.bounce_per_queue,
            backend_reconnect=args.backend_reconnect,
            dataplane_thread=merged.get("dataplane_thread"),
        ))
    cfg = ProxyConfig(device=devices, log_level=args.log_level, log_format=args.log_format,
                      busy_poll_us=args.busy_poll_us, stream_copy_min=args.stream_copy_min,
                      latency_histograms=args.latency_histograms, stats_interval=args.stats_interval,
                      stats_file=args.stats_file,
                      allow_shared_uid=bool(args.allow_shared_uid), metrics_listen=args.metrics_listen,
                      dataplane_threads=args.dataplane_threads, cpus=args.cpus, idle_trim_ms=args.idle_trim_ms)
    cfg.validate()
    return cfg


def cmd_proxy(args) -> int:
    from . import logs
    from .proxy.config import ConfigError
    from .proxy.endpoints import EndpointError
    from .proxy.server import Proxy

    if args.print_capabilities:
        return print_capabilities(getattr(args, "device_defaults", None) or {}, args.devices or [])
    try:
        cfg = build_proxy_config(args)
    except ConfigError as e:
        print(f"fastshadow proxy: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level if args.config else args.log_level, cfg.log_format)
    # The listen socket exists (and a supervisor or test may signal us) before the handlers
    # can be installed: hold SIGINT/SIGTERM/SIGHUP until they are, so a SIGHUP in that window
    # is ignored like any other and a SIGTERM still removes the socket. Threads the proxy
    # starts meanwhile inherit the mask, so the signals always reach the main thread.
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        try:
            proxy = Proxy(cfg)
        except (EndpointError, ConfigError) as e:
            # A socket that cannot be created, a path a live fastshadow holds, an fd that is
            # no socket, a metrics address in use: one line, nothing left behind.
            print(f"fastshadow proxy: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
        proxy.install_signal_handlers()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    proxy.serve_forever()
    return 0


def print_capabilities(defaults: dict, devices: list[dict]) -> int:
    """QEMU's backend program conventions: the capabilities of the --device type as JSON."""
    from .proxy.descriptors import capabilities
    device = next((d["device"] for d in devices if "device" in d), defaults.get("device", "blk"))
    mode = next((d["mode"] for d in devices if "mode" in d), defaults.get("mode", "isolated"))
    try:
        print(capabilities(device, mode=str(getattr(mode, "value", mode))))
    except ValueError as e:
        print(f"fastshadow proxy: {e}", file=sys.stderr)
        return 2
    return 0


RUN_EPILOG = """\
The backend command follows --. It takes the private socket fastshadow gives it
either where {fd} is written, or through virtiofsd's own --fd=N/--socket-path=PATH,
which fastshadow takes over as QEMU's socket (the backend then gets --fd=M): so
`fastshadow run ... -- virtiofsd "$@"` works wherever virtiofsd is started.
The backend runs as --backend-user, is sent SIGTERM/SIGINT when fastshadow gets
them, and is not restarted: fastshadow exits when it exits, with its status.

examples:
  # libvirt's <filesystem><binary path='/usr/local/libexec/fastshadow-virtiofsd'/>:
  # that script holds (libvirt runs it with --fd=N -o source=... as root)
  exec fastshadow run --device fs --proxy-user fastshadow --backend-user fs-backend \\
      --backend-userns -- /usr/lib/qemu/virtiofsd "$@"

  # a disk: QEMU connects to /run/fastshadow/disk0.sock
  fastshadow run --listen /run/fastshadow/disk0.sock --socket-group libvirt-qemu \\
      --proxy-user fastshadow --backend-user fs-backend -- qemu-storage-daemon \\
      --blockdev driver=file,node-name=d0,filename=/srv/disk0.img \\
      --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=fd,addr.str={fd},writable=on
"""


def _configure_run(p: argparse.ArgumentParser) -> None:
    _configure_proxy(p)
    p.description = ("Start a vhost-user backend as a user of its own on a private socket and serve QEMU in "
                     "front of it (isolated by default), as one program: for libvirt's <binary path> of a "
                     "<filesystem> or a systemd unit. Proxy options as for `fastshadow proxy`, one device.")
    p.epilog = RUN_EPILOG
    p.add_argument("--backend-user", metavar="USER",
                   help="run the backend as this user (name or uid), its primary and supplementary groups; "
                        "never root or fastshadow's own user (required unless --allow-shared-uid)")
    p.add_argument("--proxy-user", metavar="USER",
                   help="once the backend runs, fastshadow itself becomes this user (and its groups), keeping "
                        "only CAP_KILL to stop the backend (default: stay as started; libvirt starts it as root)")
    p.add_argument("--backend-userns", action="store_true",
                   help="run the backend as root of a new user namespace mapped to --backend-user only "
                        "(as unshare --map-root-user does): for a backend that must be root (virtiofsd's sandbox and "
                        "per-request uid switch), with no capability outside that namespace")
    p.add_argument("backend_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                   help="the backend command line")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from . import logs
    from .proxy.config import ConfigError
    from .proxy.endpoints import EndpointError
    from .proxy.server import Proxy
    from .proxy.wrapper import BackendChild, PrivateSocket, RunError, backend_user, become, plan_backend, proxy_user

    command = args.backend_command[1:] if args.backend_command[:1] == ["--"] else args.backend_command
    private = None
    try:
        given = {k for d in (args.devices or []) for k in d} | set(args.device_defaults or {})
        if args.config or given & {"backend", "backend_listen"}:
            raise RunError("fastshadow run starts the backend itself: no --backend, --backend-listen or --config")
        if len(args.devices or []) > 1:
            raise RunError("one device per fastshadow run")
        plan = plan_backend(command, own_frontend=bool(args.devices))
        if args.print_capabilities or plan.print_capabilities:
            return print_capabilities(args.device_defaults or {}, args.devices or [])
        me = proxy_user(args.proxy_user)
        user = backend_user(args.backend_user, bool(args.allow_shared_uid), me)
        if not args.devices:
            args.devices = [{"listen": plan.listen} if plan.listen is not None else {"listen_fd": plan.listen_fd}]
            if plan.socket_group is not None:
                args.devices[0].setdefault("socket_group", plan.socket_group)
        private = PrivateSocket()
        args.devices[0]["backend"] = private.path
        cfg = build_proxy_config(args)
        child = BackendChild(plan.with_fd(private.sock.fileno()), user, args.backend_userns, private)
    except (RunError, ConfigError) as e:
        if private is not None:
            private.close()
        print(f"fastshadow run: {e}", file=sys.stderr)
        return 2
    logs.setup(args.log_level, cfg.log_format)
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)  # as in cmd_proxy; the child unblocks its own
    try:
        try:
            child.start()
        except RunError as e:
            private.close()
            print(f"fastshadow run: {e}", file=sys.stderr)
            return 2
        private.sock.close()  # the backend holds it now
        if me is not None:
            try:
                private.give_to(me)
                become(me)
            except (RunError, OSError) as e:
                print(f"fastshadow run: {e}", file=sys.stderr)
                child.stop()
                private.close()
                child.exit_status()
                return 2
            logs.kv(logging.getLogger("fastshadow.run"), logging.INFO, "proxy.user", user=me.name, uid=me.uid,
                    capabilities="CAP_KILL")
        try:
            proxy = Proxy(cfg)
        except (EndpointError, ConfigError) as e:
            print(f"fastshadow run: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            child.stop()
            private.close()
            child.exit_status()
            return 2
        proxy.install_signal_handlers()  # SIGHUP ignored, as the proxy does
        if args.backend_userns:
            proxy.own_userns_backends.add(child.proc.pid)

        def on_stop(signum, frame):
            logs.kv(logging.getLogger("fastshadow.run"), logging.INFO, "proxy.stopping",
                    signal=signal.Signals(signum).name, action="forwarded to the backend")
            child.forward(signum)
            proxy.stop()

        def on_child(signum, frame):
            if child.proc.poll() is not None:
                proxy.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGCHLD, on_child)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    if child.proc.poll() is not None:
        proxy.stop()
    proxy.serve_forever()
    child.stop()
    private.close()
    return child.exit_status()


def _configure_install_descriptors(p: argparse.ArgumentParser) -> None:
    from .proxy.descriptors import DESCRIPTOR_HELP
    p.description = DESCRIPTOR_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("dir", metavar="DIR", help="where the JSON files go, e.g. /usr/share/qemu/vhost-user or "
                                              "/etc/qemu/vhost-user")
    p.add_argument("--launcher-dir", metavar="DIR",
                   help="where the per-type launcher scripts go (the descriptors' binary; default: DIR)")
    p.add_argument("--device", action="append", metavar="TYPE",
                   help="only this device type (repeatable; default: every type isolated mode serves)")
    p.add_argument("--proxy-args", default="", metavar="ARGS",
                   help="arguments every launcher adds to `fastshadow proxy`, e.g. "
                        "\"--backend /run/qsd/disk0.sock --socket-group libvirt-qemu\"")
    p.add_argument("--fastshadow", metavar="PATH",
                   help="the fastshadow command the launchers run (default: this one)")
    p.add_argument("--virtiofsd", metavar="PATH",
                   help="the virtiofsd the fs launcher starts through `fastshadow run` (default: /usr/lib/qemu/"
                        "virtiofsd or /usr/libexec/virtiofsd)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_install_descriptors)


def cmd_install_descriptors(args) -> int:
    from .proxy.descriptors import DescriptorError, install
    try:
        for path in install(args.dir, launcher_dir=args.launcher_dir, types=args.device,
                            proxy_args=args.proxy_args, fastshadow=args.fastshadow, force=args.force,
                            virtiofsd=args.virtiofsd):
            print(f"wrote {path}")
    except DescriptorError as e:
        print(f"fastshadow install-descriptors: {e}", file=sys.stderr)
        return 2
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
    elif name == "run":
        _configure_run(p)
    elif name == "install-descriptors":
        _configure_install_descriptors(p)
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
    if argv[:1] == ["proxy"] and "--print-capabilities" in argv:
        # QEMU's backend program conventions: other options "should be ignored", so an option
        # the proxy does not know (virtiofsd's, say) must not turn this into an error.
        return print_capabilities({"device": _option_value(argv, "--device") or "blk",
                                   "mode": _option_value(argv, "--mode") or "isolated"}, [])
    parser = OneLineParser(prog="fastshadow", description=__doc__)
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


def _option_value(argv: list[str], name: str) -> str | None:
    """The last value of `name` in `argv` (`--name VALUE` or `--name=VALUE`)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


if __name__ == "__main__":
    sys.exit(main())
