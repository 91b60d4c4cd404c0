"""The isolated-mode feature-masking table, both directions (DESIGN §4).

The expected masks are written down here, bit by bit, from the specifications
and the design; nothing is read from the product's own tables. A change to
what isolated mode masks must change this file on purpose (e.g. the vIOMMU
work will un-mask VIRTIO_F_ACCESS_PLATFORM here and in the product together).

Sources: VIRTIO 1.2 §6 "Reserved Feature Bits" (device bits 24-41),
docs/interop/vhost-user.rst in qemu/qemu ("Protocol features", bits 0-20,
and VHOST_F_LOG_ALL = 26), DESIGN §4 (what isolated mode masks and why).
"""

import pytest

from fastshadow.proxy import features as feat

# -- the expectations, literally ----------------------------------------------

#: Device feature bits isolated mode hides from QEMU: bit -> (name in fastshadow's messages, why).
MASKED_DEVICE_BITS = {
    34: ("RING_PACKED", "DESIGN §4: packed ring, the data plane shadows split rings"),
    35: ("IN_ORDER", "DESIGN §4: in-order, shadow completions may be reordered"),
    38: ("NOTIFICATION_DATA", "DESIGN §4: notification data, kicks are plain eventfds"),
    39: ("NOTIF_CONFIG_DATA", "notification data again (VIRTIO 1.2 §6: config-provided notification value)"),
    40: ("RING_RESET", "DESIGN §4: ring reset"),
    41: ("ADMIN_VQ", "VIRTIO 1.2 §6: admin virtqueue, commands name guest memory"),
}
#: Device bits fastshadow offers QEMU itself and never forwards: VHOST_F_LOG_ALL (26, the data plane
#: logs) and VIRTIO_F_ACCESS_PLATFORM (33, DESIGN §4: the data plane is the one that touches guest
#: memory, through the platform's rules; the backend's shadow ring is plain memory).
PROVIDED_DEVICE_BITS = {26, 33}

#: Protocol feature bits isolated mode hides from QEMU (vhost-user.rst numbering).
MASKED_PROTOCOL_BITS = {
    6: ("CROSS_ENDIAN", "the data plane reads VIRTIO 1.x little-endian rings only"),
    8: ("PAGEFAULT", "DESIGN §4: postcopy needs guest RAM in the backend"),
    10: ("BACKEND_SEND_FD", "backend channel fds toward the guest"),
    11: ("HOST_NOTIFIER", "DESIGN §4: host notifiers bypass the proxy"),
    12: ("INFLIGHT_SHMFD", "DESIGN §4: inflight fds, until §7"),
    14: ("INBAND_NOTIFICATIONS", "DESIGN §4: notifications are eventfds"),
    17: ("XEN_MMAP", "DESIGN §4: Xen mmap is guest memory"),
    18: ("SHARED_OBJECT", "DESIGN §4: shared objects"),
    19: ("DEVICE_STATE", "device state migration is not shadowed"),
    20: ("SHMEM", "DESIGN §4: shmem maps map backend memory into the guest"),
}
#: Protocol bits fastshadow offers QEMU itself: CONFIGURE_MEM_SLOTS (15), LOG_SHMFD (1) ...
PROVIDED_PROTOCOL_BITS = {1, 15}
#: ... of which LOG_SHMFD is terminated by fastshadow (the backend never gets SET_LOG_BASE).
TERMINATED_PROTOCOL_BITS = {1}

VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
INDIRECT_DESC = 1 << 28
PROTOCOL_FEATURES = 1 << 30
MQ, REPLY_ACK, BACKEND_REQ, CONFIG = 1 << 0, 1 << 3, 1 << 5, 1 << 9

DEVICE_MASK = sum(1 << b for b in MASKED_DEVICE_BITS)
PROTOCOL_MASK = sum(1 << b for b in MASKED_PROTOCOL_BITS)
LOG_ALL = 1 << 26
ACCESS_PLATFORM = 1 << 33
PROVIDED_DEVICE = LOG_ALL | ACCESS_PLATFORM
PROVIDED_PROTOCOL = sum(1 << b for b in PROVIDED_PROTOCOL_BITS)


def bits(*numbers):
    return sum(1 << b for b in numbers)


def bit_id(b):
    return f"bit{b}"


# -- toward QEMU: every one of the 64 bits, each alone ---------------------------

@pytest.mark.parametrize("b", range(64), ids=bit_id)
def test_each_device_bit_toward_qemu(b):
    to_qemu = feat.device_features_for_qemu(1 << b)
    if b in MASKED_DEVICE_BITS:
        assert to_qemu == PROVIDED_DEVICE, f"device bit {b} ({MASKED_DEVICE_BITS[b][0]}) must be masked"
    else:
        assert to_qemu == (1 << b) | PROVIDED_DEVICE, f"device bit {b} must pass unchanged"


@pytest.mark.parametrize("b", range(64), ids=bit_id)
def test_each_protocol_bit_toward_qemu(b):
    to_qemu = feat.protocol_features_for_qemu(1 << b)
    if b in MASKED_PROTOCOL_BITS:
        assert to_qemu == PROVIDED_PROTOCOL, f"protocol bit {b} ({MASKED_PROTOCOL_BITS[b][0]}) must be masked"
    else:
        assert to_qemu == (1 << b) | PROVIDED_PROTOCOL, f"protocol bit {b} must pass unchanged"


def test_everything_offered_at_once():
    every = (1 << 64) - 1
    assert feat.device_features_for_qemu(every) == every & ~DEVICE_MASK
    assert feat.protocol_features_for_qemu(every) == every & ~PROTOCOL_MASK


# -- toward the backend: QEMU may set only what it was offered ---------------------

@pytest.mark.parametrize("b", sorted(MASKED_DEVICE_BITS), ids=bit_id)
def test_device_bits_qemu_was_not_offered_are_refused(b):
    offered = feat.device_features_for_qemu(VERSION_1 | (1 << b))
    with pytest.raises(feat.FeatureRefused, match=MASKED_DEVICE_BITS[b][0]):
        feat.device_features_for_backend(VERSION_1 | (1 << b), offered)


@pytest.mark.parametrize("b", sorted(MASKED_PROTOCOL_BITS), ids=bit_id)
def test_protocol_bits_qemu_was_not_offered_are_refused(b):
    with pytest.raises(feat.FeatureRefused, match=MASKED_PROTOCOL_BITS[b][0]):
        feat.protocol_features_for_backend(MQ | (1 << b), MQ | (1 << b))


def test_device_bits_pass_through_unchanged_toward_backend():
    offered_by_backend = VERSION_1 | EVENT_IDX | INDIRECT_DESC | PROTOCOL_FEATURES | 0x6E46
    offered = feat.device_features_for_qemu(offered_by_backend | DEVICE_MASK)
    assert offered == offered_by_backend | PROVIDED_DEVICE
    assert feat.device_features_for_backend(offered, offered) == offered_by_backend


@pytest.mark.parametrize("backend_logs", [False, True], ids=["backend-without-log-all", "backend-with-log-all"])
def test_log_all_is_provided_by_fastshadow_never_forwarded(backend_logs):
    # Migration works whatever the backend offers: the data plane does the logging, and the
    # backend (which never writes guest memory) never gets LOG_ALL.
    backend = VERSION_1 | EVENT_IDX | (LOG_ALL if backend_logs else 0)
    offered = feat.device_features_for_qemu(backend)
    assert offered & LOG_ALL
    assert feat.device_features_for_backend(offered, offered) == VERSION_1 | EVENT_IDX


@pytest.mark.parametrize("backend_has_it", [False, True], ids=["backend-without", "backend-with"])
def test_access_platform_is_provided_by_fastshadow_never_forwarded(backend_has_it):
    # Issue 10: qemu-storage-daemon and virtiofsd 7.2 offer no ACCESS_PLATFORM, and QEMU then refuses
    # iommu_platform=on. In isolated mode the data plane is the one that touches guest memory: it is
    # offered to QEMU whatever the backend says, and the backend (plain shadow ring) never gets it.
    backend = VERSION_1 | EVENT_IDX | (ACCESS_PLATFORM if backend_has_it else 0)
    offered = feat.device_features_for_qemu(backend)
    assert offered & ACCESS_PLATFORM
    assert feat.device_features_for_backend(offered, offered) == VERSION_1 | EVENT_IDX
    # QEMU may also leave it unset (iommu_platform=off): nothing changes for the backend.
    assert feat.device_features_for_backend(offered & ~ACCESS_PLATFORM, offered) == VERSION_1 | EVENT_IDX


def test_device_specific_bits_are_kept():
    # Bits 0-23 belong to the device type (e.g. virtio-blk SEG_MAX, BLK_SIZE, FLUSH...).
    assert feat.device_features_for_qemu(0xFFFFFF) == 0xFFFFFF | PROVIDED_DEVICE


def test_mem_slots_and_log_shmfd_are_provided_by_fastshadow_not_forwarded():
    backend = MQ | REPLY_ACK | BACKEND_REQ
    to_qemu = feat.protocol_features_for_qemu(backend)
    assert to_qemu == backend | (1 << 15) | (1 << 1)
    # QEMU accepts everything offered; the backend gets only what it offered itself.
    assert feat.protocol_features_for_backend(to_qemu, backend) == backend
    # A backend that offers LOG_SHMFD still never gets it: SET_LOG_BASE ends here.
    assert feat.protocol_features_for_backend(to_qemu, backend | (1 << 1)) == backend
    # CONFIGURE_MEM_SLOTS is forwarded when the backend offered it itself.
    assert feat.protocol_features_for_backend(to_qemu, backend | (1 << 15)) == backend | (1 << 15)


def test_qsd_protocol_features():
    # What qemu-storage-daemon 7.2 offers (seen on the wire): bits 0 1 3 5 8 9 10 11 15.
    qsd = bits(0, 1, 3, 5, 8, 9, 10, 11, 15)
    to_qemu = feat.protocol_features_for_qemu(qsd)
    assert to_qemu == bits(0, 1, 3, 5, 9, 15)          # PAGEFAULT, BACKEND_SEND_FD, HOST_NOTIFIER gone
    assert feat.protocol_features_for_backend(to_qemu, qsd) == bits(0, 3, 5, 9, 15)   # and LOG_SHMFD
    reasons = dict(feat.masked_reasons(qsd, feat.MASKED_PROTOCOL_FEATURES))
    assert set(reasons) == {"PAGEFAULT", "BACKEND_SEND_FD", "HOST_NOTIFIER"}
    assert all(reasons.values())                       # each logged with its reason
