"""Time to answer GET_VRING_BASE through isolated fastshadow to qemu-storage-daemon, with an
idle ring and with a backend holding requests (throttled to 1 IOPS); counts the held,
poisoned and backend-lost lines. A measurement, not a test:

    .venv/bin/python tests/proxy/measure_stop.py
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fastshadow.guest.qsd import StorageDaemon
from fastshadow.guest.daemon import wait_listening
from tests.proxy.blkfront import BlkFront, T_OUT

def run(label, throttle, extra):
    d = Path(tempfile.mkdtemp(prefix="fsm-"))
    with StorageDaemon(str(d / "q.sock"), disk=d / "disk.img", size=8 << 20, throttle_iops=throttle):
        p = subprocess.Popen([sys.executable, "-m", "fastshadow.cli", "proxy", "--listen", str(d / "f.sock"),
                              "--backend", str(d / "q.sock"), "--mode", "isolated", "--allow-shared-uid", *extra],
                             stdout=open(d / "proxy.log", "wb"), stderr=subprocess.STDOUT)
        wait_listening(str(d / "f.sock"), p, 15, what="proxy")
        times = []
        with BlkFront(str(d / "f.sock")) as blk:
            blk.bring_up()
            for i in range(5):
                for k in range(4 if throttle else 1):
                    blk.request(T_OUT, 8 * k, os.urandom(4096))
                if not throttle:
                    blk.wait_used(1)
                t0 = time.monotonic(); idx = blk.stop(); times.append(time.monotonic() - t0)
                fe, qq, mem = blk.fe, blk.q, blk.mem
                fe.set_vring_num(0, blk.num); fe.set_vring_base(0, idx)
                fe.set_vring_addr(0, mem.uaddr(qq.desc), mem.uaddr(qq.used), mem.uaddr(qq.avail))
                fe.set_vring_call(0, blk.call); fe.set_vring_kick(0, blk.kick)
        p.terminate(); p.wait()
        log = (d / "proxy.log").read_text()
        print(f"{label}: GET_VRING_BASE answered in " + ", ".join(f"{t*1000:.1f}" for t in times) + " ms;",
              "held lines:", log.count("vring.held"), "poisoned:", log.count("request.poisoned"),
              "backend.lost:", log.count("backend.lost"))

run("idle ring, responsive backend", None, [])
run("backend holding requests (throttled 1 IOPS), default --stop-timeout 2", 1, [])
