"""The proxy process: one listening socket per device, one session at a time per device.

The main thread accepts QEMU connections; each accepted connection gets a
thread that obtains the backend connection and runs the session. When a
session ends (either side left or misbehaved) the device waits for the
next QEMU connection, which is what QEMU's `reconnect=` expects.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time

from ..logs import kv
from .config import DeviceConfig, Mode, ProxyConfig
from .endpoints import BackendEndpoint, EndpointError, listen_unix
from .session import DirectSession, Session

log = logging.getLogger("fastshadow.proxy")


class Device:
    """A configured device: where QEMU connects, how we reach the backend, its current session."""

    def __init__(self, cfg: DeviceConfig, proxy: "Proxy"):
        self.cfg = cfg
        self.proxy = proxy
        self.listener = listen_unix(cfg.listen)
        self.backend = BackendEndpoint(connect=cfg.backend, listen=cfg.backend_listen, timeout=cfg.backend_timeout)
        self.session: Session | None = None
        self.thread: threading.Thread | None = None
        self.sessions_served = 0

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
        kv(log, logging.INFO, "qemu.connected", dev=self.cfg.name, listen=self.cfg.listen)
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
            backend_sock = self.backend.get()
        except EndpointError as e:
            kv(log, logging.ERROR, "backend.unavailable", dev=self.cfg.name, backend=self.backend.description,
               reason=str(e))
            qemu_sock.close()
            return
        try:
            self.session = self.proxy.make_session(self.cfg, qemu_sock, backend_sock, reconnect=self.backend.get)
        except Exception as e:
            kv(log, logging.ERROR, "session.setup_failed", dev=self.cfg.name, reason=str(e))
            qemu_sock.close()
            backend_sock.close()
            return
        self.sessions_served += 1
        self.session.run()
        kv(log, logging.INFO, "device.waiting", dev=self.cfg.name, listen=self.cfg.listen)

    def close(self) -> None:
        if self.session is not None:
            self.session.abort("proxy shutting down")
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.listener.close()
        self.backend.close()
        try:
            os.unlink(self.cfg.listen)
        except OSError:
            pass


class Proxy:
    def __init__(self, cfg: ProxyConfig):
        cfg.validate()
        self.cfg = cfg
        self.devices: list[Device] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        self.dataplane = None
        self.stats = None
        try:
            for dcfg in cfg.device:
                self.devices.append(Device(dcfg, self))
            if any(d.mode is Mode.ISOLATED for d in cfg.device):
                # Start the data plane now: a build problem shows at start-up, not at
                # QEMU's first connection, and tracers find its probes right away.
                self.get_dataplane()
        except Exception:
            self.close()
            raise

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
            self.dataplane = DataPlane(busy_poll_us=self.cfg.busy_poll_us,
                                       stream_copy_min=self.cfg.stream_copy_min)
            self.dataplane.start()
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
                kv(log, logging.WARNING, "request.poisoned" if ev.poisoned else "dataplane.refused", detail=ev.message)
                if ev.backend_failed:
                    self._backend_failed(ev)

    def _backend_failed(self, ev) -> None:
        """The data plane no longer trusts a device's backend (its shadow used ring is beyond
        repair): that session drops the backend, then reconnects and replays where it may."""
        for d in self.devices:
            s = d.session
            if s is not None and getattr(s, "dev", None) is not None and s.dev.id == ev.dev:
                s.backend_failed(ev.message)

    def serve_forever(self) -> None:
        for d in self.devices:
            kv(log, logging.INFO, "device.listening", dev=d.cfg.name, listen=d.cfg.listen,
               backend=d.backend.description, mode=d.cfg.mode.value, device=d.cfg.device.value)
        if self.cfg.stats_period > 0:
            from .stats import StatsReporter
            self.stats = StatsReporter(self, self.cfg.stats_period, self.cfg.stats_file)
            self.stats.start()
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for d in self.devices:
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
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def close(self) -> None:
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
        kv(log, logging.INFO, "proxy.stopped")
