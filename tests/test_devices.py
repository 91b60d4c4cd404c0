"""The device table (fastshadow/devices.py): the expectations here are written
from the virtio spec and QEMU's vhost-user devices, not read from the table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastshadow import devices
from fastshadow.devices import Failure
from fastshadow.proxy.config import ConfigError, DeviceConfig, Mode


def test_net_queue_numbers_count_pairs():
    # vhost-user-net answers GET_QUEUE_NUM in queue pairs; QEMU adds a control queue after them.
    net = devices.kind("net")
    assert net.queues_for(1) == 3
    assert net.queue_num_limit(64) == 31 and net.queues_for(31) == 63
    blk = devices.kind("blk")
    assert blk.queues_for(4) == 4 and blk.queue_num_limit(64) == 64


@pytest.mark.parametrize("name, queues", [("blk", 1), ("net", 3), ("fs", 2), ("vsock", 3), ("scsi", 3)])
def test_queues_without_get_queue_num(name, queues):
    # virtio-blk: one request queue; net: rx, tx, ctrl; fs: hiprio + one request queue;
    # vsock: rx, tx, event; scsi: control, event, one request queue (VIRTIO 1.2 §5).
    assert devices.kind(name).initial_queues(None, 64) == queues


@pytest.mark.parametrize("name, failure", [("blk", Failure.BLK_STATUS), ("scsi", Failure.SCSI_RESPONSE),
                                           ("fs", Failure.FUSE_ERROR), ("net", Failure.LEN0)])
def test_refused_requests_fail_with_the_device_error(name, failure):
    assert devices.kind(name).failure is failure


@pytest.mark.parametrize("name", ["gpu", "balloon"])
def test_devices_carrying_guest_addresses_are_refused_in_isolated_mode(name):
    assert devices.kind(name).refused
    cfg = DeviceConfig(name="d", listen="/tmp/x", backend="/tmp/y", mode=Mode.ISOLATED, device=devices.DeviceType(name))
    with pytest.raises(ConfigError, match=f"cannot serve {name}"):
        cfg.validate()
    DeviceConfig(name="d", listen="/tmp/x", backend="/tmp/y", mode=Mode.DIRECT, device=devices.DeviceType(name)).validate()


def test_replay_only_where_requests_may_run_twice():
    assert {d.name for d in devices.DEVICES if d.replay_safe} == {"blk", "net", "scsi"}


def test_unknown_device_names_the_known_ones():
    with pytest.raises(KeyError, match="known: blk, net"):
        devices.kind("floppy")


def test_cli_device_choices_come_from_the_table():
    out = subprocess.run([sys.executable, "-m", "fastshadow.cli", "proxy", "--device", "floppy"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    for d in devices.DEVICES:
        assert f"'{d.name}'" in out.stderr, out.stderr


def test_blk_request_cap_counts_data_and_follows_the_device():
    import struct
    blk = devices.kind("blk")
    # struct virtio_blk_config: capacity, size_max 64 KiB, seg_max 126 (what qemu-storage-daemon says).
    config = struct.pack("<QII", 1 << 21, 64 << 10, 126)
    size_and_seg = 1 << 1 | 1 << 2                        # VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX
    assert blk.request_cap(None, config, size_and_seg)[0] == 126 * (64 << 10)
    assert blk.request_cap(None, config, 0)[0] == 4 << 20          # limits not offered: the default
    assert blk.request_cap(None, b"", 0)[0] == 4 << 20
    assert blk.request_cap(65536, config, size_and_seg)[0] == 65536  # the operator's cap wins
    assert blk.request_overhead == 16 + 1                           # header and status are not data
