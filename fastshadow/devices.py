"""Every virtio device type fastshadow knows: one row each (DESIGN §4, §7).

A row holds everything device-specific that the proxy and the data plane
need, so that adding a device type is one row here plus its tests:

- how many queues the device has when QEMU never asks GET_QUEUE_NUM, and how
  a GET_QUEUE_NUM answer counts them (virtio-net counts queue pairs and adds
  a control queue);
- whether isolated mode can serve it at all, and if not, why (its payloads
  carry guest addresses that the backend would have to dereference);
- whether a request may be submitted again to a restarted backend;
- how a request fastshadow refuses or fails is completed toward the guest
  (`Failure`): with the device's own error where the device defines one,
  never with a completion that looks like a success;
- the layout every request must have (so that no chain the backend would
  panic on or silently drop reaches it), and how much of it is not data.

Zero-length descriptors are refused for every device type: no device of
VIRTIO 1.2 gives them a meaning, and QEMU's own virtqueue code
(hw/virtio/virtio.c, virtqueue_map_desc) and libvhost-user
(vu_queue_map_desc: "zero sized buffers are not allowed") treat one as a
fatal device error, which would kill the backend.

Sources: VIRTIO 1.2 §5 (device types, IDs, request layouts), QEMU's
hw/virtio/vhost-user-*.c (queue counts), docs/interop/vhost-user.rst
(GET_QUEUE_NUM).

This module imports nothing of fastshadow: the proxy and the CLI read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable


#: Request data accepted by default where the device advertises no larger limit (bytes).
DEFAULT_REQUEST_DATA = 4 << 20


class Failure(enum.IntEnum):
    """How a refused or failed request is completed toward the guest.

    The values are the data plane's (csrc/fsdp.h FSDP_FAIL_*)."""

    #: used.len = 0 and nothing written: the only choice where the device defines no error
    #: (net: the driver drops a 0-byte receive buffer; a transmit completion carries no status).
    LEN0 = 0
    #: virtio-blk (VIRTIO 1.2 §5.2.6): the last byte of the last device-writable descriptor is
    #: the status; VIRTIO_BLK_S_IOERR (1) is written there, used.len = 1.
    BLK_STATUS = 1
    #: virtio-scsi (VIRTIO 1.2 §5.6.6.1): the device-writable part starts with
    #: virtio_scsi_cmd_resp; its `response` byte (offset 11) gets VIRTIO_SCSI_S_FAILURE (9).
    SCSI_RESPONSE = 2
    #: virtio-fs (VIRTIO 1.2 §5.11.6): the device-writable part starts with fuse_out_header
    #: {len, error, unique}: len 16, error -EIO, the request's unique (from fuse_in_header).
    FUSE_ERROR = 3


def blk_request_limit(config: bytes, features: int) -> int | None:
    """virtio-blk: seg_max x size_max bytes of data per request, or None if not both given.

    struct virtio_blk_config (VIRTIO 1.2 §5.2.4): le32 size_max at 8, le32 seg_max at 12,
    valid under VIRTIO_BLK_F_SIZE_MAX (bit 1) and VIRTIO_BLK_F_SEG_MAX (bit 2)."""
    if len(config) < 16 or not (features >> 1 & 1 and features >> 2 & 1):
        return None
    size_max = int.from_bytes(config[8:12], "little")
    seg_max = int.from_bytes(config[12:16], "little")
    return size_max * seg_max or None


@dataclass(frozen=True)
class DeviceKind:
    """One virtio device type as fastshadow serves it."""

    #: The name on the command line (--device) and in config files.
    name: str
    #: The virtio spec's name (VIRTIO 1.2 §5) and device ID (0: not a single device type).
    title: str
    virtio_id: int
    #: Queues when QEMU never sends GET_QUEUE_NUM (no VHOST_USER_PROTOCOL_F_MQ).
    default_queues: int
    #: GET_QUEUE_NUM counts queue pairs (vhost-user-net), plus `extra_queues` after them.
    counts_pairs: bool = False
    extra_queues: int = 0
    #: Why isolated mode cannot serve this device (None: it can).
    refused: str | None = None
    #: A request may be handed again to a restarted backend (idempotent, or tolerated twice).
    replay_safe: bool = False
    #: Why (or why not) replay is safe, for the README and logs.
    replay_note: str = ""
    failure: Failure = Failure.LEN0
    #: Queues below this index carry other layouts (virtio-scsi control and event queues):
    #: their refused requests complete with len 0.
    failure_first_queue: int = 0
    #: The request layout every chain must have, checked before the backend sees it:
    #: (device-readable bytes at least, device-writable bytes at least). virtio-blk: a
    #: 16-byte header and a status byte (VIRTIO 1.2 §5.2.6); virtio-fs: fuse_in_header.
    layout: tuple[int, int] = (0, 0)
    #: Bytes of a request that are header and status, not data (not counted by the request cap).
    request_overhead: int = 0
    #: QEMU's name of the type in vhost-user backend descriptors and --print-capabilities
    #: (docs/interop/vhost-user.json, VHostUserBackendType); None: QEMU has none.
    qemu_type: str | None = None
    #: The request data the device allows, read from its configuration space under its
    #: device features (config bytes, features) -> bytes, or None where it says nothing.
    request_limit: Callable[[bytes, int], int | None] | None = None

    def request_cap(self, configured: int | None, config: bytes, features: int) -> tuple[int, str]:
        """(largest request data in bytes, why): `configured` (--max-request-bytes) when the
        operator gave one; by default DEFAULT_REQUEST_DATA or, if larger, what the backend's
        configuration space `config` advertises under device `features`."""
        advertised = self.request_limit(config, features) if self.request_limit else None
        if configured is not None:
            return configured, "--max-request-bytes" + (f" (the device advertises {advertised})"
                                                        if advertised is not None else "")
        if advertised is not None and advertised > DEFAULT_REQUEST_DATA:
            return advertised, f"the device advertises {advertised} bytes per request (its configuration space)"
        return DEFAULT_REQUEST_DATA, "the default" + (f" (the device advertises {advertised})"
                                                      if advertised is not None else "")

    def queues_for(self, queue_num: int) -> int:
        """Data-plane queues for a GET_QUEUE_NUM answer of `queue_num`."""
        return 2 * queue_num + self.extra_queues if self.counts_pairs else queue_num

    def queue_num_limit(self, max_queues: int) -> int:
        """The largest GET_QUEUE_NUM answer a data plane of `max_queues` queues can honour."""
        return (max_queues - self.extra_queues) // 2 if self.counts_pairs else max_queues

    def initial_queues(self, queue_num: int | None, max_queues: int) -> int:
        """Queues of the data-plane device: from GET_QUEUE_NUM when QEMU asked, else the default."""
        n = self.default_queues if queue_num is None else self.queues_for(queue_num)
        return max(1, min(n, max_queues))


#: The table. Queue counts: virtio-blk 1 (MQ: num-queues), virtio-net rx/tx pairs + control,
#: virtio-fs hiprio + request queues, vsock rx/tx/event, virtio-scsi control/event + request.
DEVICES: tuple[DeviceKind, ...] = (
    DeviceKind("blk", "virtio-blk", 2, default_queues=1, replay_safe=True,
               replay_note="a block read or write is idempotent", failure=Failure.BLK_STATUS,
               layout=(16, 1), request_overhead=17, qemu_type="block", request_limit=blk_request_limit),
    DeviceKind("net", "virtio-net", 1, default_queues=3, counts_pairs=True, extra_queues=1, replay_safe=True,
               replay_note="a packet sent twice is what networks tolerate", failure=Failure.LEN0,
               qemu_type="net"),
    DeviceKind("fs", "virtio-fs", 26, default_queues=2, replay_safe=False,
               replay_note="FUSE requests are not idempotent and the daemon's session state dies with it",
               failure=Failure.FUSE_ERROR, layout=(40, 0), request_overhead=40 + 16, qemu_type="fs"),
    DeviceKind("vsock", "virtio-vsock", 19, default_queues=3, replay_safe=False,
               replay_note="connection state dies with the backend", failure=Failure.LEN0, qemu_type="vsock"),
    DeviceKind("scsi", "virtio-scsi", 8, default_queues=3, replay_safe=True,
               replay_note="SCSI reads and writes are idempotent", failure=Failure.SCSI_RESPONSE,
               failure_first_queue=2, qemu_type="scsi"),
    DeviceKind("generic", "any vhost-user device", 0, default_queues=8, replay_safe=False,
               replay_note="nothing is known of its requests", failure=Failure.LEN0),
    DeviceKind("gpu", "virtio-gpu", 16, default_queues=2,
               refused="virtio-gpu resource commands carry guest physical addresses of framebuffers",
               qemu_type="gpu"),
    DeviceKind("balloon", "virtio-balloon", 5, default_queues=3,
               refused="virtio-balloon page lists are guest physical addresses the backend acts on",
               qemu_type="balloon"),
)

BY_NAME: dict[str, DeviceKind] = {d.name: d for d in DEVICES}

#: The device type as a config value (msgspec converts config strings to it).
DeviceType = enum.Enum("DeviceType", {d.name.upper(): d.name for d in DEVICES}, type=str)
DeviceType.__doc__ = "A device type name of the DEVICES table (config and --device values)."


def kind(device: str | enum.Enum) -> DeviceKind:
    """The row of a device type; KeyError names the known ones."""
    name = device.value if isinstance(device, enum.Enum) else device
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown device type {name!r}; known: {', '.join(BY_NAME)}") from None


def names() -> list[str]:
    """Every device type name, in table order (the --device choices)."""
    return [d.name for d in DEVICES]
