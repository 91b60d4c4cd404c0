"""The wire numbers fastshadow uses, checked against the specifications, written down
here literally (not read back from the product's enums): every other test names
requests and bits through these enums, so a wrong number there would otherwise be
agreed on by the product and its tests alike.

Sources: docs/interop/vhost-user.rst in qemu/qemu ("Front-end message types",
"Back-end message types", "Protocol features"); VIRTIO 1.2 §6 (reserved feature bits);
include/standard-headers/linux/vhost_types.h (VHOST_F_LOG_ALL = 26).
"""

from fastshadow.protocol.features import ProtocolFeature, VirtioFeature
from fastshadow.protocol.messages import BackendReq, FrontendReq

FRONTEND = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4, "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10,
    "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13, "SET_VRING_ERR": 14,
    "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16, "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18,
    "SEND_RARP": 19, "NET_SET_MTU": 20, "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23,
    "GET_CONFIG": 24, "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39, "GET_STATUS": 40,
    "GET_SHARED_OBJECT": 41, "SET_DEVICE_STATE_FD": 42, "CHECK_DEVICE_STATE": 43, "GET_SHMEM_CONFIG": 44,
}
BACKEND = {
    "IOTLB_MSG": 1, "CONFIG_CHANGE_MSG": 2, "VRING_HOST_NOTIFIER_MSG": 3, "VRING_CALL": 4, "VRING_ERR": 5,
    "SHARED_OBJECT_ADD": 6, "SHARED_OBJECT_REMOVE": 7, "SHARED_OBJECT_LOOKUP": 8, "SHMEM_MAP": 9,
    "SHMEM_UNMAP": 10,
}
PROTOCOL_BITS = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5, "CROSS_ENDIAN": 6,
    "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11,
    "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15,
    "STATUS": 16, "XEN_MMAP": 17, "SHARED_OBJECT": 18, "DEVICE_STATE": 19, "SHMEM": 20,
}
DEVICE_BITS = {
    "NOTIFY_ON_EMPTY": 24, "LOG_ALL": 26, "ANY_LAYOUT": 27, "RING_INDIRECT_DESC": 28, "RING_EVENT_IDX": 29,
    "PROTOCOL_FEATURES": 30, "VERSION_1": 32, "ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35,
    "ORDER_PLATFORM": 36, "SR_IOV": 37, "NOTIFICATION_DATA": 38, "NOTIF_CONFIG_DATA": 39, "RING_RESET": 40,
    "ADMIN_VQ": 41,
}


def test_frontend_request_codes():
    assert {r.name: r.value for r in FrontendReq} == FRONTEND


def test_backend_request_codes():
    assert {r.name: r.value for r in BackendReq} == BACKEND


def test_protocol_feature_bits():
    assert {f.name: f.value for f in ProtocolFeature} == {n: 1 << b for n, b in PROTOCOL_BITS.items()}


def test_device_feature_bits():
    assert {f.name: f.value for f in VirtioFeature} == {n: 1 << b for n, b in DEVICE_BITS.items()}
