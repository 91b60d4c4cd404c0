"""`fastshadow proxy` with several data-plane threads, against real qemu-storage-daemons.

Two isolated disks in one proxy: each device is served by its own loop thread
(named fsdp-loop<i>, as the dataplane.started line lists their tids), data
written through one is read back through it, and after both front-ends
disconnect and reconnect in the other order each device is served by the other
thread, with its data intact.  --cpus pins the loop threads; bad thread and CPU
options are one-line errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .blkfront import BlkFront


def loop_tids(proxy) -> list[int]:
    [line] = proxy.wait_log(r"dataplane\.started ")
    return [int(t) for t in re.search(r"tids=([\d,]+)", line).group(1).split(",")]


def comm(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()


def two_disks(workdir, start_qsd, start_proxy, *extra):
    socks = []
    for i in range(2):
        start_qsd(str(workdir / f"qsd{i}.sock"), disk=workdir / f"disk{i}.img", size=1 << 20)
        socks += ["--listen", str(workdir / f"fs{i}.sock"), "--backend", str(workdir / f"qsd{i}.sock")]
    return start_proxy([*socks, *extra], [str(workdir / f"fs{i}.sock") for i in range(2)])


def session(workdir, i: int) -> BlkFront:
    blk = BlkFront(str(workdir / f"fs{i}.sock"))
    blk.bring_up()
    blk.fe.set_vring_enable(0, True)
    return blk


def test_two_disks_two_threads_and_reconnect_swaps_threads(workdir, start_qsd, start_proxy):
    proxy = two_disks(workdir, start_qsd, start_proxy)       # default: one thread per isolated device
    tids = loop_tids(proxy)
    assert len(tids) == 2
    assert [comm(proxy.pid, t) for t in tids] == ["fsdp-loop0", "fsdp-loop1"]
    data = [os.urandom(8192), os.urandom(8192)]
    with session(workdir, 0) as b0, session(workdir, 1) as b1:
        for i, b in enumerate((b0, b1)):
            b.write(8, data[i])
            assert b.read(8, 8192) == data[i]
    proxy.wait_log(r"shadow\.created dev=dev0 .*dataplane_thread=0")
    proxy.wait_log(r"shadow\.created dev=dev1 .*dataplane_thread=1")
    proxy.wait_log(r"shadow\.freed dev=dev0")
    proxy.wait_log(r"shadow\.freed dev=dev1")
    # Both disconnected: reconnect in the other order. Loads are equal, so placement goes on
    # round the loops: dev1 lands on thread 0, dev0 on thread 1.
    with session(workdir, 1) as b1:
        proxy.wait_log(r"shadow\.created dev=dev1 .*dataplane_thread=0")
        with session(workdir, 0) as b0:
            proxy.wait_log(r"shadow\.created dev=dev0 .*dataplane_thread=1")
            for i, b in enumerate((b0, b1)):
                assert b.read(8, 8192) == data[i]
                b.write(32, data[1 - i])
                assert b.read(32, 8192) == data[1 - i]
    assert proxy.alive()


def test_cpus_pins_each_loop_thread(workdir, start_qsd, start_proxy):
    cpus = sorted(os.sched_getaffinity(0))
    want = [cpus[-1], cpus[0]]
    proxy = two_disks(workdir, start_qsd, start_proxy, "--dataplane-threads", "2",
                      "--cpus", f"{want[0]},{want[1]}")
    tids = loop_tids(proxy)
    assert [os.sched_getaffinity(t) for t in tids] == [{want[0]}, {want[1]}]
    with session(workdir, 0) as b0:
        payload = os.urandom(4096)
        b0.write(0, payload)
        assert b0.read(0, 4096) == payload


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastshadow.cli", "proxy", *args],
                          capture_output=True, text=True, timeout=60)


def test_thread_and_cpu_options_refused_in_one_line(workdir):
    base = ["--listen", str(workdir / "a.sock"), "--backend", str(workdir / "b.sock")]
    cases = {
        ("--cpus", "99999"): "cpus '99999': CPU(s) [99999] are not among",
        ("--cpus", "3-1"): "want a CPU list such as 0-3,8",
        ("--dataplane-threads", "65"): "dataplane_threads 65: want 1 to 64",
        ("--dataplane-threads", "2", "--dataplane-thread", "2"): "dataplane_thread 2 but the data plane runs 2",
        ("--idle-trim-ms", "-1"): "idle_trim_ms -1",
    }
    for opts, msg in cases.items():
        r = run_cli(*base, *opts)
        assert r.returncode == 2, (opts, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (opts, r.stderr)


def test_config_file_thread_keys_and_the_default_count(workdir):
    """The brief's default: one data-plane thread per isolated device, up to the CPUs given by
    cpus (or the process's affinity); direct devices need none."""
    from fastshadow.proxy.config import load_toml
    devs = "".join(f'[[device]]\nname = "d{i}"\nlisten = "{workdir}/l{i}"\nbackend = "{workdir}/b{i}"\n'
                   f'{"mode = " + chr(34) + "direct" + chr(34) if i == 3 else ""}\n' for i in range(4))
    path = workdir / "p.toml"
    path.write_text(devs)
    cfg = load_toml(path)
    assert cfg.thread_count() == min(3, len(os.sched_getaffinity(0)))
    assert cfg.idle_trim_ms == 2000 and cfg.cpus is None
    cpu = min(os.sched_getaffinity(0))
    path.write_text(f'cpus = "{cpu}"\nidle_trim_ms = 0\n' + devs.replace('name = "d1"', 'name = "d1"\ndataplane_thread = 0'))
    cfg = load_toml(path)
    assert cfg.thread_count() == 1 and cfg.cpu_list() == [cpu] and cfg.idle_trim_ms == 0
    assert cfg.device[1].dataplane_thread == 0
    path.write_text('dataplane_threads = 5\n' + devs)
    assert load_toml(path).thread_count() == 5


def test_backend_reconnect_on_the_second_thread(workdir, start_qsd, start_proxy):
    """The backend of the device on thread 1 drops between two requests: the proxy reconnects and
    replays (queue stop, shadow clear, restart: commands run by thread 1), that disk goes on with
    its data intact on the same thread, and the disk on thread 0 is not disturbed."""
    from .interposer import Interposer
    for i in range(2):
        start_qsd(str(workdir / f"qsd{i}.sock"), disk=workdir / f"disk{i}.img", size=1 << 20)
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd1.sock"))
    proxy = start_proxy(["--dataplane-threads", "2",
                         "--listen", str(workdir / "fs0.sock"), "--backend", str(workdir / "qsd0.sock"),
                         "--listen", str(workdir / "fs1.sock"), "--backend", str(workdir / "rec.sock")],
                        [str(workdir / "fs0.sock"), str(workdir / "fs1.sock")])
    a, b, c = os.urandom(4096), os.urandom(4096), os.urandom(4096)
    try:
        with session(workdir, 0) as b0, session(workdir, 1) as b1:
            proxy.wait_log(r"shadow\.created dev=dev1 .*dataplane_thread=1")
            b0.write(8, a)
            b1.write(8, b)
            rec.drop()
            proxy.wait_log(r"backend\.reconnected dev=dev1")
            b1.write(16, c)
            assert b1.read(8, 4096) == b and b1.read(16, 4096) == c
            assert b0.read(8, 4096) == a
        assert len(rec.seen) == 2
        assert proxy.log().count("shadow.created dev=dev1") == 1      # the same device, on the same thread
    finally:
        rec.close()
