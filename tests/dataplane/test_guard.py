"""SIGBUS from guest memory a front-end shrank under the data plane (csrc/guard.c).

Each scenario runs in a child interpreter: a guard that failed would kill the process
that takes the SIGBUS, and that must not be the test runner."""

import pathlib
import signal
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]

PRELUDE = """
import mmap, os, struct, sys
from tests.dataplane.harness import Rig
rig = Rig(num=16)
"""


def run(body: str) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_copy_back_into_a_truncated_region_stops_the_device_not_the_process():
    p = run("""
        head, bufs = rig.blk_read(0, 4096)             # region 0: the file's second half
        rig.poll()
        [r] = rig.be[0].pending()
        os.ftruncate(rig.mem.fd, rig.mem.region_size)  # the front-end cuts region 0 away
        rig.serve(0, [r])
        rig.poll()                                     # copy-back faults: SIGBUS
        print([(e.name, e.a) for e in rig.events()])
        print(rig.poll(), rig.dev.stats(0).completed)
        sys.stdout.flush()
        os._exit(0)                                    # the test's own mapping of region 0 is cut
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    events, after = p.stdout.splitlines()
    assert events == "[('GUEST_MEMORY_LOST', 0)]"          # region 0 starts at gpa 0
    assert after.split()[0] == "0"                          # the queue moves no more


def test_a_sigbus_elsewhere_keeps_its_default_action():
    """The guard is installed (a region is mapped) but the fault is in memory of nobody's
    guest: the process dies of SIGBUS as it would without fastshadow."""
    p = run("""
        fd = os.memfd_create("other")
        os.ftruncate(fd, 8192)
        m = mmap.mmap(fd, 8192)
        os.ftruncate(fd, 0)
        m[4096] = 1
        print("survived")
    """)
    assert p.returncode == -signal.SIGBUS and "survived" not in p.stdout, (p.returncode, p.stderr[-2000:])


def test_a_sigbus_sent_by_kill_keeps_its_default_action():
    p = run("""
        os.kill(os.getpid(), 7)
        print("survived")
    """)
    assert p.returncode == -signal.SIGBUS and "survived" not in p.stdout, (p.returncode, p.stderr[-2000:])
