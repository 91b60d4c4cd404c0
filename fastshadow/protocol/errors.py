"""One exception family for everything a vhost-user peer can get wrong.

Each error says what was wrong in terms a person can act on. The session
that produced one is closed; nothing else in the process is affected.
"""

from __future__ import annotations


class VhostUserError(Exception):
    """Base of every error raised by the vhost-user layer."""


class PeerClosed(VhostUserError):
    """The peer closed its end of the socket at a message boundary."""


class ProtocolError(VhostUserError):
    """A peer sent something the vhost-user specification does not allow."""


class ShortHeader(ProtocolError):
    """The connection ended inside a 12-byte message header."""


class ShortPayload(ProtocolError):
    """The connection ended before the payload announced by the header arrived."""


class MessageStalled(ProtocolError):
    """The peer started a message and stopped sending before its end (within the allowed time)."""


class BadVersion(ProtocolError):
    """The header's version bits are not 0x1."""


class BadFlags(ProtocolError):
    """Reserved header flag bits are set, or the reply bit is wrong for the direction."""


class UnknownRequest(ProtocolError):
    """The request code is not defined by the specification."""


class PayloadTooLarge(ProtocolError):
    """The header announces more payload bytes than any request may carry."""


class PayloadSizeMismatch(ProtocolError):
    """The payload size does not match what the request carries."""


class InvalidPayload(ProtocolError):
    """The payload has the right size but its content breaks a rule of its type."""


class TooManyFds(ProtocolError):
    """More file descriptors arrived than the request (or the protocol) allows."""


class UnexpectedFds(ProtocolError):
    """File descriptors arrived with a request that takes none or fewer."""


class MissingFds(ProtocolError):
    """A request that needs file descriptors arrived without enough of them."""


class UnexpectedMessage(ProtocolError):
    """A well-formed message arrived where the protocol does not allow it (out of order)."""


class ReplyTimeout(VhostUserError):
    """The peer did not answer a request within the allowed time."""
