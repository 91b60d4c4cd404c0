"""The vhost-user wire protocol: requests, payloads, feature bits, fd passing.

Usable in both roles: as the back-end QEMU talks to and as the front-end
that talks to a back-end (see connection.Connection).
"""

from .connection import Channel, Connection
from .errors import *  # noqa: F401,F403
from .features import ProtocolFeature, VirtioFeature
from .messages import (BACKEND_SPECS, FRONTEND_SPECS, MAX_FDS, MAX_PAYLOAD_SIZE, BackendReq, FrontendReq, Message,
                       Negotiation)

__all__ = ["Channel", "Connection", "ProtocolFeature", "VirtioFeature", "BACKEND_SPECS", "FRONTEND_SPECS",
           "MAX_FDS", "MAX_PAYLOAD_SIZE", "BackendReq", "FrontendReq", "Message", "Negotiation"]
