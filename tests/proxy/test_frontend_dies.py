"""QEMU dies with requests in flight (isolated mode): the session ends, the device's
guest memory and shadow are released, late completions from the backend touch
nothing, and the next front-end (QEMU restarted) gets a working device. Here
fastshadow's own front-end is killed with its queue full of requests to a real
qemu-storage-daemon; tests/e2e/test_qemu_killed.py does it to a real QEMU."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

from .blkfront import T_IN, BlkFront


def test_frontend_killed_with_requests_in_flight(workdir, start_qsd, start_proxy):
    # 20 requests per second: most of the 20 below are still in flight when it dies.
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=8 << 20, throttle_iops=20)
    sock = str(workdir / "fs.sock")
    proxy = start_proxy(["--listen", sock, "--backend", str(workdir / "qsd.sock"), "--mode", "isolated",
                         "--reply-timeout", "5", "--log-level", "debug"], [sock])
    # The dying front-end is a process of its own, so that SIGKILL closes its socket and
    # its guest RAM the way QEMU's death does.
    script = textwrap.dedent(f"""
        import os, sys, time
        from tests.proxy.blkfront import BlkFront, T_IN
        blk = BlkFront({sock!r})
        blk.bring_up()
        for i in range(20):
            blk.request(T_IN, i * 64, 32 << 10)      # 20 x 32 KiB reads (60 of the 64 descriptors), kicked one by one
        print("submitted", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "submitted"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(10)
    proxy.wait_log(r"session\.end dev=dev0 reason=\"qemu closed the connection\"")
    [abandoned] = proxy.wait_log(r"vring\.abandoned dev=dev0 queue=0 inflight=(\d+)")
    assert 1 <= int(re.search(r"inflight=(\d+)", abandoned).group(1)) <= 20, abandoned
    proxy.wait_log(r"shadow\.freed dev=dev0")
    proxy.wait_log(r"device\.waiting dev=dev0")

    data = os.urandom(32 << 10)
    with BlkFront(sock) as blk:
        blk.bring_up()
        blk.write(300, data)
        assert blk.read(300, len(data)) == data
        head, _, st = blk.request(T_IN, 0, 4096)
        assert blk.wait_used(1) == [(head, 4097)]
    assert proxy.proc.poll() is None
    log = proxy.log()
    assert log.count("session.start dev=dev0") == 2, log[-3000:]
    assert "session.crashed" not in log and "Traceback" not in log and "session.failed" not in log, log[-3000:]
