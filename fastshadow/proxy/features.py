"""Which feature bits isolated mode can shadow, in both directions (DESIGN §4).

GET_FEATURES / GET_PROTOCOL_FEATURES replies travel backend -> QEMU and are
masked here: QEMU never learns of a capability the data plane cannot
shadow. SET_* travel QEMU -> backend: QEMU may only set what it was offered
(anything else is refused), and the backend gets only what it offered.
"""

from __future__ import annotations

from ..protocol.features import ProtocolFeature as PF
from ..protocol.features import VirtioFeature as VF

#: Device feature bits removed from what QEMU is offered, with the reason.
MASKED_DEVICE_FEATURES: dict[VF, str] = {
    VF.RING_PACKED: "the data plane shadows split rings only",
    VF.IN_ORDER: "shadow completions may be reordered against the guest ring",
    VF.NOTIFICATION_DATA: "kicks carry no data through the eventfd-based shadow path",
    VF.NOTIF_CONFIG_DATA: "kicks carry no data through the eventfd-based shadow path",
    VF.RING_RESET: "per-queue reset is not shadowed yet",
    VF.ADMIN_VQ: "admin virtqueue commands are not shadowed",
}

#: Protocol feature bits removed from what QEMU is offered, with the reason.
MASKED_PROTOCOL_FEATURES: dict[PF, str] = {
    PF.HOST_NOTIFIER: "host notifiers would map backend memory into the guest, bypassing the proxy",
    PF.PAGEFAULT: "postcopy needs the backend to register guest RAM with userfaultfd",
    PF.INFLIGHT_SHMFD: "inflight tracking buffers name guest ring state the backend never sees",
    PF.SHARED_OBJECT: "shared objects would pass memory between backends and the guest",
    PF.XEN_MMAP: "Xen grant mappings are guest memory",
    PF.INBAND_NOTIFICATIONS: "the data plane intercepts notifications as eventfds",
    PF.DEVICE_STATE: "device state migration is not implemented in isolated mode",
    PF.SHMEM: "VIRTIO shared memory regions map backend memory into the guest",
    PF.BACKEND_SEND_FD: "the back-end channel may not pass fds toward the guest",
    PF.CROSS_ENDIAN: "the data plane reads little-endian (VIRTIO 1.x) rings only",
}

#: Device features fastshadow provides itself toward QEMU, whatever the backend offers, and
#: never passes on. LOG_ALL: dirty logging for migration is done by the data plane, the only
#: writer of guest memory on the data path (the backend writes the shadow region only).
#: ACCESS_PLATFORM (VIRTIO 1.2 §6: the device accesses memory through the platform's rules,
#: e.g. an IOMMU or a confidential guest's shared pages): the data plane is the one that
#: touches guest memory, so it is its feature; the backend's shadow ring is plain memory.
PROVIDED_DEVICE_FEATURES = VF.LOG_ALL | VF.ACCESS_PLATFORM

#: Protocol features fastshadow provides itself toward QEMU, whatever the backend offers.
PROVIDED_PROTOCOL_FEATURES = PF.CONFIGURE_MEM_SLOTS | PF.LOG_SHMFD
#: ... of which these are terminated here (the backend never gets SET_LOG_BASE).
TERMINATED_PROTOCOL_FEATURES = PF.LOG_SHMFD

DEVICE_MASK = sum(MASKED_DEVICE_FEATURES)
PROTOCOL_MASK = sum(MASKED_PROTOCOL_FEATURES)


class FeatureRefused(ValueError):
    """QEMU set a bit it was not offered."""


def device_features_for_qemu(backend_offered: int) -> int:
    return (backend_offered & ~DEVICE_MASK) | PROVIDED_DEVICE_FEATURES


def device_features_for_backend(qemu_set: int, offered_to_qemu: int | None) -> int:
    extra = qemu_set & ~(offered_to_qemu if offered_to_qemu is not None else ~DEVICE_MASK)
    if extra:
        raise FeatureRefused(f"QEMU set device features {_names(extra, VF)} that fastshadow did not offer")
    return qemu_set & ~PROVIDED_DEVICE_FEATURES


def protocol_features_for_qemu(backend_offered: int) -> int:
    return (backend_offered & ~PROTOCOL_MASK) | PROVIDED_PROTOCOL_FEATURES


def protocol_features_for_backend(qemu_set: int, backend_offered: int) -> int:
    offered = protocol_features_for_qemu(backend_offered)
    extra = qemu_set & ~offered
    if extra:
        raise FeatureRefused(f"QEMU set protocol features {_names(extra, PF)} that fastshadow did not offer")
    # The backend gets what it offered, except what fastshadow terminates itself.
    return qemu_set & backend_offered & ~TERMINATED_PROTOCOL_FEATURES


def masked_reasons(backend_offered: int, table: dict) -> list[tuple[str, str]]:
    """(name, reason) for each bit the backend offered and isolation removed."""
    return [(bit.name, why) for bit, why in table.items() if backend_offered & bit]


def _names(value: int, flag_type) -> str:
    from ..protocol.features import names
    return names(value, flag_type)
