"""The isolated-mode feature-masking table, both directions (DESIGN §4)."""

import pytest

from fastshadow.protocol.features import ProtocolFeature as PF
from fastshadow.protocol.features import VirtioFeature as VF
from fastshadow.proxy import features as feat

# What qemu-storage-daemon 7.2 offers (seen on the wire), plus everything masked.

ALL_MASKED_DEVICE = sum(feat.MASKED_DEVICE_FEATURES)
ALL_MASKED_PROTOCOL = sum(feat.MASKED_PROTOCOL_FEATURES)


@pytest.mark.parametrize("bit", list(feat.MASKED_DEVICE_FEATURES), ids=lambda b: b.name)
def test_device_bits_masked_toward_qemu(bit):
    offered = VF.VERSION_1 | VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC | bit
    to_qemu = feat.device_features_for_qemu(offered)
    assert not to_qemu & bit
    assert to_qemu == VF.VERSION_1 | VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC | VF.LOG_ALL


@pytest.mark.parametrize("bit", list(feat.MASKED_DEVICE_FEATURES), ids=lambda b: b.name)
def test_device_bits_qemu_was_not_offered_are_refused(bit):
    offered = feat.device_features_for_qemu(VF.VERSION_1 | bit)
    with pytest.raises(feat.FeatureRefused, match=bit.name):
        feat.device_features_for_backend(VF.VERSION_1 | bit, offered)


def test_device_bits_pass_through_unchanged_toward_backend():
    offered_by_backend = VF.VERSION_1 | VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC | VF.PROTOCOL_FEATURES | 0x6E46
    offered = feat.device_features_for_qemu(offered_by_backend | ALL_MASKED_DEVICE)
    assert offered == offered_by_backend | VF.LOG_ALL
    assert feat.device_features_for_backend(offered, offered) == offered_by_backend


@pytest.mark.parametrize("backend_logs", [False, True], ids=["backend-without-log-all", "backend-with-log-all"])
def test_log_all_is_provided_by_fastshadow_never_forwarded(backend_logs):
    # Migration works whatever the backend offers: the data plane does the logging, and the
    # backend (which never writes guest memory) never gets LOG_ALL.
    backend = VF.VERSION_1 | VF.RING_EVENT_IDX | (VF.LOG_ALL if backend_logs else 0)
    offered = feat.device_features_for_qemu(backend)
    assert offered & VF.LOG_ALL
    assert feat.device_features_for_backend(offered, offered) == VF.VERSION_1 | VF.RING_EVENT_IDX


def test_device_specific_bits_are_kept():
    # Bits 0-23 belong to the device type (e.g. virtio-blk SEG_MAX, BLK_SIZE, FLUSH...).
    assert feat.device_features_for_qemu(0xFFFFFF) == 0xFFFFFF | VF.LOG_ALL


@pytest.mark.parametrize("bit", list(feat.MASKED_PROTOCOL_FEATURES), ids=lambda b: b.name)
def test_protocol_bits_masked_toward_qemu(bit):
    offered = PF.MQ | PF.REPLY_ACK | PF.CONFIG | bit
    to_qemu = feat.protocol_features_for_qemu(offered)
    assert not to_qemu & bit
    assert to_qemu & (PF.MQ | PF.REPLY_ACK | PF.CONFIG) == PF.MQ | PF.REPLY_ACK | PF.CONFIG


@pytest.mark.parametrize("bit", list(feat.MASKED_PROTOCOL_FEATURES), ids=lambda b: b.name)
def test_protocol_bits_qemu_was_not_offered_are_refused(bit):
    with pytest.raises(feat.FeatureRefused, match=bit.name):
        feat.protocol_features_for_backend(PF.MQ | bit, PF.MQ | bit)


def test_mem_slots_and_log_shmfd_are_provided_by_fastshadow_not_forwarded():
    backend = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ
    to_qemu = feat.protocol_features_for_qemu(backend)
    assert to_qemu & PF.CONFIGURE_MEM_SLOTS and to_qemu & PF.LOG_SHMFD
    # QEMU accepts everything offered; the backend gets only what it offered itself.
    assert feat.protocol_features_for_backend(to_qemu, backend) == backend
    # A backend that offers LOG_SHMFD still never gets it: SET_LOG_BASE ends here.
    assert feat.protocol_features_for_backend(to_qemu, backend | PF.LOG_SHMFD) == backend


def test_qsd_protocol_features():
    qsd = (PF.MQ | PF.LOG_SHMFD | PF.REPLY_ACK | PF.BACKEND_REQ | PF.PAGEFAULT | PF.CONFIG |
           PF.BACKEND_SEND_FD | PF.HOST_NOTIFIER | PF.CONFIGURE_MEM_SLOTS)
    to_qemu = feat.protocol_features_for_qemu(qsd)
    assert to_qemu == PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.LOG_SHMFD
    assert feat.protocol_features_for_backend(to_qemu, qsd) == to_qemu & ~PF.LOG_SHMFD
    reasons = dict(feat.masked_reasons(qsd, feat.MASKED_PROTOCOL_FEATURES))
    assert set(reasons) == {"PAGEFAULT", "BACKEND_SEND_FD", "HOST_NOTIFIER"}
