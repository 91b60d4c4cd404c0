"""VIRTIO and vhost-user feature bits, by name.

Sources: the VIRTIO 1.2 specification (device-independent bits, §6) and
docs/interop/vhost-user.rst in qemu/qemu (protocol feature bits).
"""

from __future__ import annotations

import enum


class VirtioFeature(enum.IntFlag):
    """Device feature bits that the vhost-user GET/SET_FEATURES messages carry."""

    # Device-type specific bits 0-23 are not named here: fastshadow.devices names those a device needs.
    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    #: Reserved bit 30 reused by vhost-user: the back-end speaks protocol features.
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33  # a.k.a. IOMMU_PLATFORM
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40
    ADMIN_VQ = 1 << 41
    #: vhost feature: the back-end logs its writes for live migration.
    LOG_ALL = 1 << 26


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    SHMEM = 1 << 20


def names(value: int, flag_type: type[enum.IntFlag]) -> str:
    """'A|B|bit45' for a bit mask: every bit named if known, numbered if not."""
    parts = []
    bit = 0
    while value >> bit:
        if value >> bit & 1:
            try:
                parts.append(flag_type(1 << bit).name or f"bit{bit}")
            except ValueError:
                parts.append(f"bit{bit}")
        bit += 1
    return "|".join(parts) or "0"
