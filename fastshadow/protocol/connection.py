"""Sending and receiving vhost-user messages on a unix socket, fds included.

One receive pipeline for both roles and both channels, in a fixed order
(as rust-vmm's vhost does): read the header, validate it, collect the fds
and check the request may carry fds at all, check the announced size, read
the body, decode and check its form, check the fd count against the
payload. Any failure closes every fd that arrived and raises a typed
ProtocolError; the caller closes the session.
"""

from __future__ import annotations

import array
import enum
import logging
import os
import select
import time
import socket

from . import payloads as p
from .errors import (BadFlags, BadVersion, MessageStalled, PayloadTooLarge, PeerClosed, ReplyTimeout,
                     ShortHeader, ShortPayload, TooManyFds, UnexpectedFds, UnexpectedMessage, UnknownRequest)
from .messages import (BACKEND_SPECS, FRONTEND_SPECS, FLAG_REPLY, HEADER, HEADER_SIZE, KNOWN_FLAGS,
                       MAX_FDS, MAX_PAYLOAD_SIZE, NO_FDS, VERSION, VERSION_MASK, BackendReq, FrontendReq, Message,
                       choose_payload_type, spec_of)

log = logging.getLogger("fastshadow.protocol")

#: Seconds the rest of a message may take once its first byte arrived (when recv is given no
#: timeout): a peer that stops in the middle of a message must not block its reader forever.
MESSAGE_STALL_S = 5.0

#: Room for more fds than any message may carry, so that a peer sending too
#: many is seen (and its fds closed) instead of silently truncated.
_FD_ROOM = 64


class Channel(enum.Enum):
    """Which request set a socket carries."""

    MAIN = "main"          # front-end requests, back-end replies
    BACKEND = "backend"    # back-end requests, front-end replies

    @property
    def request_type(self) -> type[enum.IntEnum]:
        return FrontendReq if self is Channel.MAIN else BackendReq

    @property
    def specs(self) -> dict:
        return FRONTEND_SPECS if self is Channel.MAIN else BACKEND_SPECS


class Connection:
    """One end of a vhost-user socket.

    `receives_replies` says which way messages flow in: the end that sends
    requests (a front-end on the main channel, QEMU's end of the back-end
    channel) receives replies; the other end receives requests. A message
    with the wrong reply bit is a protocol error.
    """

    def __init__(self, sock: socket.socket, channel: Channel, *, receives_replies: bool, name: str = "peer"):
        self.sock = sock
        self.channel = channel
        self.receives_replies = receives_replies
        self.name = name
        self._deadline = 0.0
        self._rest_s = MESSAGE_STALL_S

    # -- life cycle -------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    # -- sending ----------------------------------------------------------
    def send(self, msg: Message, *, close_fds: bool = False) -> None:
        """Send one message with its fds in the ancillary data of its first byte."""
        data = msg.encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())] if msg.fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerClosed(f"{self.name} closed the connection while we sent {msg.request.name}: {e}") from e
        finally:
            if close_fds:
                msg.close_fds()

    # -- receiving --------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Message:
        """Receive and validate one message.

        `timeout`: seconds to wait for it to start (ReplyTimeout), and then for the rest
        of it (MessageStalled); None waits for the start without a bound and gives the
        rest MESSAGE_STALL_S. Raises PeerClosed on a clean EOF, a ProtocolError on
        anything the spec does not allow (every fd received is closed first)."""
        if timeout is not None and not self._wait_readable(timeout):
            raise ReplyTimeout(f"{self.name} sent nothing within {timeout:g} s")
        self._rest_s = MESSAGE_STALL_S if timeout is None else timeout
        header, fds = self._recv_header()
        try:
            return self._parse(header, fds)
        except BaseException:
            for fd in fds:
                _close(fd)
            raise

    def request(self, msg: Message, *, expect_reply: bool, timeout: float | None = None) -> Message | None:
        """Send a request and, when one is owed, return the validated reply."""
        self.send(msg)
        if not expect_reply:
            return None
        reply = self.recv(timeout)
        if reply.request != msg.request:
            reply.close_fds()
            raise UnexpectedMessage(
                f"{self.name} answered {msg.request.name} with a reply to {reply.request.name}")
        return reply

    def _wait_readable(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def _wait_rest(self, got: int, size: int, what: str) -> None:
        """Wait for more of a message until the deadline recv set; MessageStalled after it."""
        left = self._deadline - time.monotonic()
        if left <= 0 or not self._wait_readable(left):
            raise MessageStalled(f"{self.name} sent {got} of {size} {what} bytes and then nothing "
                                 f"until the deadline")

    def _recv_header(self) -> tuple[bytes, list[int]]:
        fds: list[int] = []
        buf = b""
        while len(buf) < HEADER_SIZE:
            if buf:
                try:
                    self._wait_rest(len(buf), HEADER_SIZE, "header")
                except MessageStalled:
                    _close_all(fds)
                    raise
            try:
                data, anc, flags, _ = self.sock.recvmsg(HEADER_SIZE - len(buf), socket.CMSG_SPACE(_FD_ROOM * 4))
            except ConnectionResetError as e:
                data, anc, flags = b"", [], 0
                if buf:
                    raise ShortHeader(f"{self.name} reset the connection inside a header ({len(buf)} of 12 bytes)") from e
            fds.extend(_fds_from(anc))
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise TooManyFds(f"{self.name} sent more than {_FD_ROOM} fds with one message")
            if not data:
                _close_all(fds)
                if buf:
                    raise ShortHeader(f"{self.name} closed the connection inside a header ({len(buf)} of 12 bytes)")
                raise PeerClosed(f"{self.name} closed the connection")
            if not buf:  # the message started: the rest of it has until this deadline
                self._deadline = time.monotonic() + self._rest_s
            buf += data
        return buf, fds

    def _recv_exact(self, size: int, what: str) -> bytes:
        chunks, got = [], 0
        while got < size:
            self._wait_rest(got, size, what)
            try:
                chunk = self.sock.recv(size - got)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ShortPayload(f"{self.name} closed the connection after {got} of {size} {what} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _parse(self, header: bytes, fds: list[int]) -> Message:
        code, flags, size = HEADER.unpack(header)
        if flags & VERSION_MASK != VERSION:
            raise BadVersion(f"{self.name} sent version {flags & VERSION_MASK}, only version 1 exists "
                             f"(request {code}, flags {flags:#x})")
        if flags & ~KNOWN_FLAGS:
            raise BadFlags(f"{self.name} set unknown header flags {flags & ~KNOWN_FLAGS:#x} on request {code}")
        try:
            request = self.channel.request_type(code)
        except ValueError:
            raise UnknownRequest(f"{self.name} sent unknown {self.channel.value}-channel request code {code}") from None
        is_reply = bool(flags & FLAG_REPLY)
        if is_reply != self.receives_replies:
            want = "replies" if self.receives_replies else "requests"
            raise BadFlags(f"{self.name} sent {request.name} as a {'reply' if is_reply else 'request'}; "
                           f"this end receives only {want}")
        spec = spec_of(request)
        fd_rule = spec.reply_fds if is_reply else spec.fds
        if fds and fd_rule is NO_FDS:
            # Refuse before reading the body: this request never carries fds.
            raise UnexpectedFds(f"{request.name} carries {len(fds)} fds, 0 allowed")
        if len(fds) > MAX_FDS:
            raise TooManyFds(f"{request.name} carries {len(fds)} fds, at most {MAX_FDS} allowed")
        if size > MAX_PAYLOAD_SIZE:
            raise PayloadTooLarge(f"{self.name} announces a {size}-byte {request.name} payload, "
                                  f"at most {MAX_PAYLOAD_SIZE} allowed")
        body = self._recv_exact(size, f"{request.name} payload")
        if is_reply:
            types = spec.reply or (p.U64,)  # REPLY_ACK replies are a u64
        else:
            types = spec.payload
        payload_type = choose_payload_type(request, types, size)
        payload = payload_type.decode(body)
        payload.check()
        fd_rule.check(request, payload, len(fds))
        return Message(request, payload, fds, flags)


def _fds_from(anc) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)
