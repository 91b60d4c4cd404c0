"""Isolated mode's side of live migration at the protocol level, against a real
qemu-storage-daemon, driven by fastshadow's own vhost-user front-end: dirty
logging is offered by fastshadow and ends there (the backend never hears of
it); a malformed SET_LOG_BASE closes only that session. The guest-level proof
(a real QEMU migration) is tests/e2e/test_migration.py."""

from __future__ import annotations

import os
import re

import pytest

from fastshadow.protocol import payloads as p
from fastshadow.protocol.features import ProtocolFeature as PF
from fastshadow.protocol.features import VirtioFeature as VF
from fastshadow.protocol.frontend import Frontend
from fastshadow.protocol.messages import FrontendReq

RAM = 1 << 20
UADDR = 0x7F00_0000_0000
NUM = 64
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000   # guest-physical ring addresses


@pytest.fixture
def isolated(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), driver="null")
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "isolated", "--log-level", "debug"], [str(workdir / "fs.sock")])
    return proxy, str(workdir / "fs.sock")


def negotiate(fe: Frontend) -> int:
    # ACCESS_PLATFORM: QEMU keeps it from a vhost device without a vIOMMU (vhost_dev_set_features).
    features = fe.get_features() & ~VF.ACCESS_PLATFORM
    fe.set_owner()
    fe.set_protocol_features(fe.get_protocol_features())
    fe.get_queue_num()
    return features


def guest_ram(fe: Frontend) -> int:
    fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    fe.set_mem_table([p.MemoryRegion(0, RAM, UADDR, 0)], [fd])
    return fd


def forwarded(proxy, req: str) -> int:
    return len(re.findall(rf"dir=fastshadow->backend req={req} ", proxy.log()))


def test_dirty_logging_is_offered_and_ends_at_fastshadow(isolated):
    proxy, sock = isolated
    fe = Frontend.connect(sock, timeout=10)
    ram = log = None
    try:
        features = negotiate(fe)
        assert features & VF.LOG_ALL, "fastshadow offers dirty logging whatever the backend does"
        assert fe.neg.has(PF.LOG_SHMFD) and fe.neg.has(PF.REPLY_ACK)
        ram = guest_ram(fe)
        fe.set_features(features & ~VF.LOG_ALL)
        fe.set_vring_num(0, NUM)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, UADDR + DESC, UADDR + USED, UADDR + AVAIL)
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        fe.set_vring_call(0, call)
        fe.set_vring_kick(0, kick)                      # the ring runs
        assert forwarded(proxy, "SET_FEATURES") == 1 and forwarded(proxy, "SET_VRING_ADDR") == 1

        # Migration starts: SET_LOG_BASE, SET_FEATURES + LOG_ALL, SET_VRING_ADDR + VRING_F_LOG.
        log = os.memfd_create("test-vhost-log", os.MFD_CLOEXEC)
        os.ftruncate(log, RAM // 4096 // 8)
        reply = fe.call(FrontendReq.SET_LOG_BASE, p.Log(RAM // 4096 // 8, 0), [log])
        assert reply is not None and reply.is_reply and reply.request == FrontendReq.SET_LOG_BASE
        fe.set_features(features)                       # REPLY_ACK 0 checked by the front-end
        fe.set_vring_addr(0, UADDR + DESC, UADDR + USED, UADDR + AVAIL, flags=p.VRING_F_LOG, log=USED)
        proxy.wait_log(r"migration\.logging dev=dev0 on=True")
        proxy.wait_log(r"migration\.log_base dev=dev0 bytes=32 ")
        # None of it reached the backend, whose running ring was left alone.
        assert forwarded(proxy, "SET_LOG_BASE") == 0
        assert forwarded(proxy, "SET_FEATURES") == 1 and forwarded(proxy, "SET_VRING_ADDR") == 1

        # Migration cancelled: logging off, again without the backend.
        fe.set_features(features & ~VF.LOG_ALL)
        fe.set_vring_addr(0, UADDR + DESC, UADDR + USED, UADDR + AVAIL)
        proxy.wait_log(r"migration\.logging dev=dev0 on=False")
        assert forwarded(proxy, "SET_FEATURES") == 1 and forwarded(proxy, "SET_VRING_ADDR") == 1
        assert fe.get_vring_base(0) == 0
        assert "session.end" not in proxy.log()
    finally:
        fe.close()
        for fd in (ram, log):
            if fd is not None:
                os.close(fd)


def test_log_base_without_a_shared_log_closes_only_that_session(isolated):
    proxy, sock = isolated
    fe = Frontend.connect(sock, timeout=10)
    try:
        negotiate(fe)
        with pytest.raises(Exception):
            fe.call(FrontendReq.SET_LOG_BASE, p.Log(4096, 0), [])
    finally:
        fe.close()
    proxy.wait_log(r"SET_LOG_BASE without a shared log")
    # The proxy serves the next session.
    fe = Frontend.connect(sock, timeout=10)
    try:
        assert negotiate(fe) & VF.LOG_ALL
    finally:
        fe.close()
