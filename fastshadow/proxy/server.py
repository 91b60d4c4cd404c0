"""The proxy process: one listening socket per device, one session at a time per device.

The main thread accepts QEMU connections; each accepted connection gets a
thread that obtains the backend connection and runs the session. When a
session ends (either side left or misbehaved) the device waits for the
next QEMU connection, which is what QEMU's `reconnect=` expects.

Before an isolated session starts, and again for each backend connection it
makes later (a restarted backend), both peers' credentials are read
(SO_PEERCRED): a backend running as root, as QEMU's uid or as fastshadow's
could open QEMU's /proc/PID/fd and map guest RAM without fastshadow, so
such a session is refused with one `isolation.refused` line, unless
--allow-shared-uid (one `isolation.shared_uid` warning per session).

As a daemon: SIGINT and SIGTERM end it cleanly (sessions closed, sockets
and locks removed, exit 0), SIGHUP is ignored (logs go to stderr; there is
nothing to re-open), systemd hears READY=1 once every socket listens.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time

from ..isolation import PeerCred, identity_risk, peer_credentials
from ..logs import kv
from . import systemd
from .config import DeviceConfig, Mode, ProxyConfig
from .endpoints import BackendEndpoint, EndpointError, Listener, backend_socket_problem, inherited_socket
from .session import DirectSession, Session

log = logging.getLogger("fastshadow.proxy")


class Device:
    """A configured device: where QEMU connects, how we reach the backend, its current session."""

    def __init__(self, cfg: DeviceConfig, proxy: "Proxy", passed: dict[str, socket.socket] | None = None):
        self.cfg = cfg
        self.proxy = proxy
        self.session: Session | None = None
        self.thread: threading.Thread | None = None
        self.sessions_served = 0
        #: Backend connections made by sessions after their first (a restarted backend).
        self.backend_reconnects = 0
        #: The isolation state of the current (or last) session, for stats and metrics:
        #: "direct", "waiting" (no session yet), "enforced", "shared_uid" (allowed by
        #: --allow-shared-uid), "refused".
        self.isolation = "direct" if cfg.mode is Mode.DIRECT else "waiting"
        self.qemu_cred: PeerCred | None = None
        self.backend_cred: PeerCred | None = None
        #: --fd given one end of a connected socketpair: its one session, then the proxy ends.
        self.preconnected: socket.socket | None = None
        self.listener: Listener | None = None
        passed = passed if passed is not None else {}
        self.backend: BackendEndpoint | None = None
        try:
            if cfg.listen_fd is not None:
                sock = inherited_socket(cfg.listen_fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    self.listener = Listener.adopt(sock, f"--fd {cfg.listen_fd}")
                else:
                    sock.setblocking(True)
                    self.preconnected = sock
            elif cfg.listen in passed:
                self.listener = Listener.adopt(passed.pop(cfg.listen),
                                               f"the socket systemd passed for {cfg.listen}")
            else:
                self.listener = Listener.create(cfg.listen, cfg.access())
            self.backend = BackendEndpoint(connect=cfg.backend, listen=cfg.backend_listen,
                                           timeout=cfg.backend_timeout, access=cfg.backend_access(),
                                           inherited=passed.pop(cfg.backend_listen, None) if cfg.backend_listen
                                           else None)
        except BaseException:
            self.close()
            raise

    def check_backend(self) -> None:
        """One warning if the backend socket is not there yet (the proxy keeps waiting for it)."""
        cfg = self.cfg
        if cfg.backend is not None:
            problem = backend_socket_problem(cfg.backend)
            if problem is not None:
                kv(log, logging.WARNING, "backend.absent", dev=cfg.name, backend=cfg.backend, reason=problem,
                   action=f"connecting when QEMU does, retrying for up to {cfg.backend_timeout:g} s")

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.setblocking(True)
        prev = self.thread if self.busy else None
        if prev is not None and self.session is None:
            # A front-end is already waiting to take over (or for its backend).
            self._refuse(sock)
            return
        self.start_session(sock, prev)

    def start_session(self, sock: socket.socket, prev: threading.Thread | None = None) -> None:
        kv(log, logging.INFO, "qemu.connected", dev=self.cfg.name, listen=self.cfg.where)
        prev_session, self.session = self.session, None
        self.thread = threading.Thread(target=self._serve, args=(sock, prev, prev_session),
                                       name=f"session-{self.cfg.name}", daemon=True)
        self.thread.start()

    def _refuse(self, sock: socket.socket) -> None:
        kv(log, logging.WARNING, "qemu.refused", dev=self.cfg.name,
           reason="a session is already active on this device; vhost-user allows one front-end")
        sock.close()

    #: How long a new front-end waits for the previous session to notice its peer left.
    TAKEOVER_GRACE = 2.0

    def _serve(self, qemu_sock: socket.socket, prev: threading.Thread | None = None,
               prev_session: Session | None = None) -> None:
        if prev is not None:
            # A front-end that reconnects at once may find the previous session still
            # tearing down: wait for it, but refuse a second front-end of a live session.
            deadline = time.monotonic() + self.TAKEOVER_GRACE
            while prev.is_alive() and not (prev_session is not None and prev_session.closing):
                if time.monotonic() > deadline:
                    self.thread, self.session = prev, prev_session  # the live session stays the device's
                    self._refuse(qemu_sock)
                    return
                time.sleep(0.01)
            prev.join(30)
        try:
            self._run_session(qemu_sock)
        finally:
            if self.preconnected is not None:
                # The front-end's only connection (--fd, a socketpair) is gone: so is the device.
                kv(log, logging.INFO, "device.done", dev=self.cfg.name,
                   reason=f"the front-end's connection ({self.cfg.where}) ended")
                self.proxy.stop()
            else:
                kv(log, logging.INFO, "device.waiting", dev=self.cfg.name, listen=self.cfg.where)

    def _run_session(self, qemu_sock: socket.socket) -> None:
        try:
            backend_sock = self.backend.get()
        except EndpointError as e:
            kv(log, logging.ERROR, "backend.unavailable", dev=self.cfg.name, backend=self.backend.description,
               reason=str(e))
            qemu_sock.close()
            return
        try:
            checker = IdentityCheck(self, qemu_sock) if self.cfg.mode is Mode.ISOLATED else None
            allowed = checker is None or checker.allows(backend_sock)
        except OSError as e:  # a peer's credentials could not be read: no isolation claim without them
            kv(log, logging.ERROR, "session.setup_failed", dev=self.cfg.name,
               reason=f"cannot read the peers' credentials: {e}")
            allowed = False
        if not allowed:
            qemu_sock.close()
            backend_sock.close()
            return

        def reconnect() -> socket.socket:
            sock = self.backend.get()
            self.backend_reconnects += 1
            if checker is not None and not checker.allows(sock):
                sock.close()
                raise EndpointError(f"the new backend's identity was refused ({checker.last_refusal})")
            return sock
        try:
            self.session = self.proxy.make_session(self.cfg, qemu_sock, backend_sock, reconnect=reconnect)
        except Exception as e:
            kv(log, logging.ERROR, "session.setup_failed", dev=self.cfg.name, reason=str(e))
            qemu_sock.close()
            backend_sock.close()
            return
        self.sessions_served += 1
        self.session.run()

    def close(self) -> None:
        if self.session is not None:
            self.session.abort("proxy shutting down")
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.preconnected is not None and self.thread is None:
            self.preconnected.close()  # never served


class IdentityCheck:
    """The run-time isolation check of one isolated session (DESIGN §3.9): QEMU's and each
    backend connection's SO_PEERCRED; a backend identity that could open QEMU's
    /proc/PID/fd (isolation.identity_risk) is refused, or allowed with one warning per
    session under --allow-shared-uid."""

    def __init__(self, device: Device, qemu_sock: socket.socket):
        self.device = device
        self.qemu = peer_credentials(qemu_sock)
        self.warned = False
        self.last_refusal: str | None = None

    def allows(self, backend_sock: socket.socket) -> bool:
        d = self.device
        backend = peer_credentials(backend_sock)
        d.qemu_cred, d.backend_cred = self.qemu, backend
        peers = dict(qemu_pid=self.qemu.pid, qemu_uid=self.qemu.uid, backend_pid=backend.pid,
                     backend_uid=backend.uid, fastshadow_uid=os.geteuid())
        risk = identity_risk(self.qemu, backend, own_user_namespace=backend.pid in d.proxy.own_userns_backends)
        if risk is None:
            d.isolation = "enforced"
            kv(log, logging.INFO, "isolation.identities", dev=d.cfg.name, **peers)
            return True
        why = f"{risk}: it can open /proc/{self.qemu.pid}/fd and map guest RAM without fastshadow"
        if d.proxy.cfg.allow_shared_uid:
            d.isolation = "shared_uid"
            if not self.warned:
                self.warned = True
                kv(log, logging.WARNING, "isolation.shared_uid", dev=d.cfg.name, **peers, reason=why,
                   action="serving anyway (--allow-shared-uid)")
            return True
        d.isolation = "refused"
        self.last_refusal = why
        kv(log, logging.ERROR, "isolation.refused", dev=d.cfg.name, **peers, reason=why,
           action="session ended; run the backend as a user of its own, or pass --allow-shared-uid")
        return False


class Proxy:
    def __init__(self, cfg: ProxyConfig):
        cfg.validate()
        self.cfg = cfg
        self.devices: list[Device] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        self.dataplane = None
        self.stats = None
        self.metrics = None
        self.started_at = time.monotonic()
        self._served = False
        #: Backend pids `fastshadow run --backend-userns` put into a user namespace of their own.
        self.own_userns_backends: set[int] = set()
        try:
            passed = systemd.listen_fds()
            for dcfg in cfg.device:
                self.devices.append(Device(dcfg, self, passed))
            for path, sock in passed.items():
                kv(log, logging.WARNING, "systemd.socket_unused", path=path,
                   reason="no device listens on this path; it is closed")
                sock.close()
            if cfg.metrics_listen is not None:
                try:
                    from .metrics import MetricsServer  # prometheus_client only when asked for
                except ImportError as e:
                    raise EndpointError(f"--metrics-listen needs prometheus_client, which cannot be imported "
                                        f"({e}); pip install prometheus_client") from None
                self.metrics = MetricsServer(cfg.metrics_listen, self)
            if any(d.mode is Mode.ISOLATED for d in cfg.device):
                # Start the data plane now: a build problem shows at start-up, not at
                # QEMU's first connection, and tracers find its probes right away.
                self.get_dataplane()
        except Exception:
            self.close()
            raise
        # Only once start-up cannot fail: a refused start is its one error line, nothing before.
        for d in self.devices:
            d.check_backend()

    def make_session(self, cfg: DeviceConfig, qemu_sock: socket.socket, backend_sock: socket.socket,
                     reconnect=None) -> Session:
        """`reconnect()` returns a new backend connection (isolated sessions that outlive their backend)."""
        if cfg.mode is Mode.DIRECT:
            return DirectSession(cfg, qemu_sock, backend_sock)
        from .isolated import IsolatedSession  # imports the C data plane only when needed
        return IsolatedSession(cfg, qemu_sock, backend_sock, self.get_dataplane(), reconnect=reconnect)

    def get_dataplane(self):
        if self.dataplane is None:
            from ..dataplane import DataPlane
            cpus = self.cfg.cpu_list()
            self.dataplane = DataPlane(busy_poll_us=self.cfg.busy_poll_us,
                                       stream_copy_min=self.cfg.stream_copy_min,
                                       latency_histograms=self.cfg.latency_histograms,
                                       threads=self.cfg.thread_count(), cpus=[{c} for c in cpus] or None,
                                       idle_trim_ms=self.cfg.idle_trim_ms)
            self.dataplane.start()
            kv(log, logging.INFO, "dataplane.started", threads=self.dataplane.threads,
               tids=",".join(map(str, self.dataplane.thread_ids())),
               cpus=self.cfg.cpus or "any", idle_trim_ms=self.cfg.idle_trim_ms)
            self._events_thread = threading.Thread(target=self._log_dataplane_events, args=(self.dataplane,),
                                                   name="dataplane-events", daemon=True)
            self._events_thread.start()
        return self.dataplane

    def _log_dataplane_events(self, dp) -> None:
        """One log line per data-plane event (a refused request, a broken queue, ...)."""
        import select
        fd = dp.event_fd
        while not self._stop.is_set() and self.dataplane is dp:
            r, _, _ = select.select([fd], [], [], 0.5)
            if not r:
                continue
            try:
                events = dp.drain_events()
            except Exception as e:  # the data plane is gone (shutdown)
                kv(log, logging.DEBUG, "dataplane.events_stopped", reason=str(e))
                return
            for ev in events:
                if ev.iotlb_miss:   # not a refusal: the session asks QEMU
                    self._iotlb_miss(ev)
                    continue
                kv(log, logging.WARNING, "request.poisoned" if ev.poisoned else "dataplane.refused", dev=ev.dev_name,
                   queue=ev.queue, code=ev.name, detail=ev.message)
                if ev.backend_failed or ev.frontend_failed:
                    self._peer_failed(ev)

    def _iotlb_miss(self, ev) -> None:
        """A queue waits for an IOVA's translation: its session asks QEMU (VHOST_IOTLB_MISS)."""
        for d in self.devices:
            s = d.session
            if s is not None and getattr(s, "dev", None) is not None and s.dev.id == ev.dev:
                s.iotlb_miss(ev.queue, ev.a, ev.b)

    def _peer_failed(self, ev) -> None:
        """The data plane no longer trusts a device's backend (its shadow used ring is beyond
        repair: that session drops the backend, then reconnects and replays where it may) or
        its front-end (guest memory shrunk under the proxy: that session ends)."""
        for d in self.devices:
            s = d.session
            if s is not None and getattr(s, "dev", None) is not None and s.dev.id == ev.dev:
                if ev.frontend_failed:
                    s.frontend_failed(ev.message)
                else:
                    s.backend_failed(ev.message)

    def snapshot(self):
        """The counters of every device now (stats.ProxySnapshot): what the stats line, the
        stats file and the metrics endpoint all report."""
        from .stats import take_snapshot
        return take_snapshot(self, self.cfg.stats_period)

    def serve_forever(self) -> None:
        self._served = True
        for d in self.devices:
            kv(log, logging.INFO, "device.listening", dev=d.cfg.name, listen=d.cfg.where,
               backend=d.backend.description, mode=d.cfg.mode.value, device=d.cfg.device.value)
        if self.cfg.stats_period > 0:
            from .stats import StatsReporter
            self.stats = StatsReporter(self, self.cfg.stats_period, self.cfg.stats_file)
            self.stats.start()
        if self.metrics is not None:
            self.metrics.start()
            kv(log, logging.INFO, "metrics.listening", address=self.metrics.description)
        for d in self.devices:
            if d.preconnected is not None:
                d.start_session(d.preconnected)
        systemd.sd_notify(f"READY=1\nSTATUS=serving {len(self.devices)} device(s)\nMAINPID={os.getpid()}")
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for d in self.devices:
                if d.listener is not None:
                    sel.register(d.listener, selectors.EVENT_READ, d)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.data is None:
                        continue
                    try:
                        key.data.accept()
                    except OSError as e:
                        kv(log, logging.WARNING, "accept.failed", dev=key.data.cfg.name, reason=str(e))
        self.close()

    def stop(self) -> None:
        """Ask serve_forever to return (safe from signal handlers and other threads)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        """SIGINT, SIGTERM: a clean, quick exit (QEMU's backend conventions: end quickly on
        SIGTERM). SIGHUP: ignored, with one line (a terminal closing or `systemctl reload`
        must not kill the proxy; logs go to stderr, so there is no log file to re-open)."""
        def on_stop(signum, frame):
            kv(log, logging.INFO, "proxy.stopping", signal=signal.Signals(signum).name)
            self.stop()

        def on_hup(signum, frame):
            kv(log, logging.INFO, "signal.ignored", signal="SIGHUP",
               reason="logs go to stderr: nothing to re-open; SIGTERM stops the proxy")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def close(self) -> None:
        systemd.sd_notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.stats is not None:
            self.stats.stop()
            self.stats = None
        for d in self.devices:
            d.close()
        self.devices = []
        if self.dataplane is not None:
            dp, self.dataplane = self.dataplane, None
            self._stop.set()
            self._events_thread.join()  # never drain events from a stopped data plane
            dp.stop()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self._served:
            kv(log, logging.INFO, "proxy.stopped")
