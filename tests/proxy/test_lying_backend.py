"""A backend that lies in its replies (isolated mode), played by
tests/proxy/interposer.py in front of a real qemu-storage-daemon: each lie is
caught with one precise log line, and what fastshadow tells QEMU stays true."""

from __future__ import annotations

import os

import pytest

from fastshadow.protocol import payloads as p
from fastshadow.protocol.messages import FrontendReq as R

from .blkfront import BlkFront
from .interposer import Interposer


def replacing(req, make):
    def hook(request, reply):
        return make(reply) if reply.request == req else reply
    return hook


@pytest.fixture
def lying(workdir, start_qsd, start_proxy):
    def start(reply_hook):
        start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=1 << 20)
        Interposer(str(workdir / "liar.sock"), str(workdir / "qsd.sock"), reply_hook=reply_hook)
        sock = str(workdir / "fs.sock")
        proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "liar.sock"), "--mode", "isolated"],
                            [sock])
        return proxy, sock
    return start


def test_impossible_ring_stop_index(lying):
    """GET_VRING_BASE: the backend claims its ring stopped far beyond what was published."""
    proxy, sock = lying(replacing(R.GET_VRING_BASE, lambda r: r.reply(p.VringState(0, 0x7777))))
    data = os.urandom(4096)
    with BlkFront(sock) as blk:
        blk.bring_up()
        blk.write(3, data)
        assert blk.stop() == 1                # the guest's index, not the backend's claim
    [line] = proxy.wait_log(r"dataplane\.refused")
    assert "backend says its ring stopped at avail index 30583, impossible with 1 published" in line, line
    proxy.wait_log(r"vring\.stats dev=dev0 queue=0 requests=1 completed=1 .* backend_errors=1 ")


def test_queue_count_beyond_the_data_plane(lying):
    proxy, sock = lying(replacing(R.GET_QUEUE_NUM, lambda r: r.reply(p.U64(100000))))
    data = os.urandom(4096)
    with BlkFront(sock) as blk:
        assert blk.fe.get_features()
        blk.fe.set_protocol_features(blk.fe.get_protocol_features())   # GET_QUEUE_NUM needs MQ
        assert blk.fe.get_queue_num() == 64   # what QEMU hears: what fastshadow can serve (README)
        blk.bring_up()
        blk.write(3, data)
        assert blk.read(3, len(data)) == data
    proxy.wait_log(r"queues\.capped dev=dev0 backend=100000 offered=64 ")
    proxy.wait_log(r"shadow\.created dev=dev0 queues=64 ")


def test_shadow_memory_table_refused(lying):
    proxy, sock = lying(replacing(R.SET_MEM_TABLE, lambda r: r.reply(p.U64(1))))
    with BlkFront(sock, timeout=5) as blk, pytest.raises(Exception):
        blk.bring_up()
    [line] = proxy.wait_log(r"session\.refused dev=dev0")
    assert 'reason="UnexpectedMessage: backend refused the shadow memory table (ack 1)"' in line, line
    proxy.wait_log(r"shadow\.freed dev=dev0")


def test_config_reply_of_another_size(lying):
    """GET_CONFIG: the backend answers 4 bytes where QEMU asked for 8 (or another offset).
    It was relayed as is, without a line: QEMU then fails the device on "bad msg size"
    with nothing in fastshadow's log naming the backend."""
    proxy, sock = lying(replacing(R.GET_CONFIG, lambda r: r.reply(
        p.Config(r.payload.offset, r.payload.flags, bytes(r.payload.data)[:4]))))
    with BlkFront(sock, timeout=5) as blk, pytest.raises(Exception):
        blk.negotiate()
    [line] = proxy.wait_log(r"session\.refused dev=dev0")
    assert "backend answered GET_CONFIG offset 0 size 8 with 4 bytes at offset 0" in line, line
