"""A fault injector for the backend side: a vhost-user forwarder placed between
fastshadow and a real backend that drops the connection once, at a chosen request.

It plays the backend dying at the worst moment: `when="before"` closes both
connections as the request arrives (the backend never saw it), `when="after"`
passes the request on and then closes (the backend acted on it, its reply is
lost). Every later connection is forwarded untouched, so a reconnecting proxy
reaches the same real backend again (which takes it as a new front-end).

It supplements the real-peer tests; it does not replace the backend: every
request still ends at a real qemu-storage-daemon.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading

from fastshadow.protocol import Channel, Connection, PeerClosed
from fastshadow.protocol.messages import FrontendReq


class Cutter:
    def __init__(self, listen: str, backend: str, cut_at: FrontendReq, when: str = "before"):
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        self.backend = backend
        self.cut_at, self.when = cut_at, when
        self.cut = threading.Event()          # set once the connection was dropped
        self.connections = 0
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if os.path.exists(listen):
            os.unlink(listen)
        self._srv.bind(listen)
        self._srv.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="cutter", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self._srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._srv.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                front, _ = self._srv.accept()
            except OSError:
                return
            self.connections += 1
            back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            back.connect(self.backend)
            threading.Thread(target=self._pump, args=(front, back), daemon=True).start()

    def _pump(self, front_sock: socket.socket, back_sock: socket.socket) -> None:
        front = Connection(front_sock, Channel.MAIN, receives_replies=False, name="proxy")
        back = Connection(back_sock, Channel.MAIN, receives_replies=True, name="backend")
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(front_sock, selectors.EVENT_READ, (front, back))
                sel.register(back_sock, selectors.EVENT_READ, (back, front))
                while True:
                    for key, _ in sel.select():
                        src, dst = key.data
                        msg = src.recv()
                        cutting = src is front and msg.request == self.cut_at and not self.cut.is_set()
                        if cutting and self.when == "before":
                            msg.close_fds()
                            self.cut.set()
                            return
                        dst.send(msg, close_fds=True)
                        if cutting:
                            self.cut.set()
                            return
        except (PeerClosed, OSError):
            pass
        finally:
            front.close()
            back.close()
