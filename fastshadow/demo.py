"""`fastshadow demo`: a tiny VM whose disk goes through fastshadow.

qemu-storage-daemon serves a 64 MiB file; fastshadow sits between it and a
QEMU TCG guest (2 vCPUs, 2 virtqueues); the guest's checker writes data
over many offsets and sizes with O_DIRECT, reads it back and compares,
reboots once and checks again. While the guest runs, the backend's
/proc/PID/maps and /proc/PID/fd are checked for guest RAM.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .guest import GuestVM, StorageDaemon, build_guest_image, run_check
from .guest.daemon import wait_listening
from .isolation import check_isolation


def step(msg: str) -> None:
    print(f"\033[1m==>\033[0m {msg}", flush=True)


def run_demo(mode: str = "isolated", keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="fastshadow-demo-"))
    ok = False
    try:
        step("building the test guest (cached after the first run)")
        image = build_guest_image(log=lambda m: print(f"    {m}", flush=True))
        step(f"starting qemu-storage-daemon (file export, 2 queues) in {work}")
        qsd = StorageDaemon(work / "qsd.sock", disk=work / "disk.img", num_queues=2,
                            log_path=work / "qsd.log").start()
        # The demo runs QEMU, fastshadow and the backend as one user (root): in isolated mode
        # fastshadow would refuse that backend's identity (it could open QEMU's /proc/PID/fd)
        # unless told it is a demo. A deployment gives each its own user (README, Deployment).
        shared = ["--allow-shared-uid"] if mode == "isolated" else []
        step(f"starting fastshadow proxy --mode {mode} {' '.join(shared)}".rstrip())
        proxy_log = open(work / "proxy.log", "w")
        proxy = subprocess.Popen([sys.executable, "-m", "fastshadow.cli", "proxy", "--name", "disk0",
                                  "--listen", str(work / "fs.sock"), "--backend", str(work / "qsd.sock"),
                                  "--mode", mode, *shared], stdout=proxy_log, stderr=subprocess.STDOUT)
        try:
            wait_listening(work / "fs.sock", proxy, 15, what="fastshadow")
            step("booting the guest: QEMU TCG, 2 vCPUs, vhost-user-blk with 2 queues, memfd guest RAM")
            cmdline = {"fastshadow.check": "--total 8M --min 512 --max 1M", "fastshadow.queues": "2",
                       "fastshadow.boots": "2"}
            with GuestVM(image, blk_socket=work / "fs.sock", blk_num_queues=2, smp=2, cmdline=cmdline,
                         log_path=work / "console.log") as vm:
                vm.start()
                vm.wait_for("FASTSHADOW-GUEST READY", timeout=120)
                time.sleep(1.0)  # the device is live: rings set up, I/O under way
                report = check_isolation(qsd.pid, vm.pid)
                result = run_check(vm, timeout=600)
            step("guest verification")
            for boot in result.boots:
                for c in boot.checks:
                    print(f"    boot {boot.boot}: {c.line}")
                print(f"    boot {boot.boot}: {boot.result}")
            step(f"what the backend (qemu-storage-daemon, pid {qsd.pid}) can reach")
            for line in report.lines():
                print(f"    {line}")
            ok = result.passed and (report.isolated if mode == "isolated" else True)
        finally:
            proxy.terminate()
            proxy.wait(10)
            proxy_log.close()
            qsd.kill()
        step("proxy log (last lines)")
        for line in (work / "proxy.log").read_text().splitlines()[-8:]:
            print(f"    {line}")
        verdict = "PASS" if ok else "FAIL"
        extra = " — the backend never mapped guest RAM" if mode == "isolated" and ok else ""
        print(f"\n\033[1mfastshadow demo ({mode}): {verdict}{extra}\033[0m")
        return 0 if ok else 1
    finally:
        if keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
