"""The benchmark run: processes, the run matrix, measurements.

For each backend (qemu-storage-daemon with a ``null-co`` or a ``file``
block device) one qemu-storage-daemon is started, plus one ``fastshadow
proxy`` subprocess per proxied mode, all kept for the whole backend:

    direct        load generator -> qsd socket
    proxy-direct  load generator -> fastshadow proxy --mode direct -> qsd
    isolated      load generator -> fastshadow proxy --mode isolated -> qsd

Every run is a fresh vhost-user session (a guest RAM sized for its
workload), so every mode sees the same set-up and teardown. Repetitions are
interleaved (for rep: for workload: for mode, the mode order rotating), so
machine noise spreads evenly over the modes. A mode that cannot be set up
(the proxy does not start, the session is refused, requests do not
complete) is skipped with a printed reason; the others still run.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from fastshadow.guest._children import die_with_parent
from fastshadow.guest.daemon import NotListening, wait_listening
from fastshadow.guest.qsd import StorageDaemon, StorageDaemonError

from . import MODES
from . import report as rp
from .loadgen import LoadGenError, RunResult, Session, SetupError, memcpy_bandwidth
from .report import Workload

CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---- presets ------------------------------------------------------------------------------------
QUICK_WORKLOADS = [
    Workload("randread", 4096, 32),
    Workload("read", 256 << 10, 8),
    Workload("read", 1 << 20, 4),
    Workload("randread", 4096, 1),
]


def full_workloads() -> list[Workload]:
    out = []
    for bs in (512, 4096, 64 << 10, 256 << 10, 1 << 20):
        deep = 32 if bs <= 64 << 10 else 8
        for rw in ("read", "write"):
            name = ("rand" + rw) if bs <= 4096 else rw  # small blocks random, large sequential
            out += [Workload(name, bs, 1), Workload(name, bs, deep), Workload(name, bs, deep, queues=2)]
    return out


@dataclass
class Preset:
    name: str
    workloads: list[Workload]
    backends: list[str]
    duration: float
    reps: int


PRESETS = {
    "quick": Preset("quick", QUICK_WORKLOADS, ["null"], duration=2.0, reps=1),
    "full": Preset("full", full_workloads(), ["null", "file"], duration=1.0, reps=3),
}


@dataclass
class Config:
    preset: str = "quick"
    modes: list[str] = field(default_factory=lambda: list(MODES))
    backends: list[str] = field(default_factory=lambda: ["null"])
    workloads: list[Workload] = field(default_factory=lambda: list(QUICK_WORKLOADS))
    duration: float | None = 2.0
    requests: int | None = None
    reps: int = 1
    out: Path = Path("out/bench")
    workdir: Path | None = None      # sockets, logs, the file backend's image (default: a temp dir)
    keep: bool = False               # keep the workdir
    queue_size: int = 256
    event_idx: bool = True
    busy_poll_us: int = 0            # the driver's busy-poll window before sleeping
    loadgen_threads: str = "one"     # "one" or "per-queue"
    proxy_args: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)  # extra isolated modes: name -> args
    traced: dict[str, list[str]] = field(default_factory=dict)    # of which traced: name -> trace args
    file_size: int = 512 << 20
    null_size: int = 8 << 30
    setup_timeout: float = 5.0       # seconds the peer may take to answer a vhost-user request
    stall_timeout: float = 5.0       # seconds without a completion (requests in flight) before failing
    retry_noisy: int = 0             # a run that shared the machine (Cpu.noisy) runs again, at most this often
    warmup: float = 0.3              # seconds of unrecorded I/O per mode and backend before measuring
    pin: str = "split"               # see placement(): "split", "split-free-proxy", "own", "none"
    memcpy: bool = True
    plots: bool = True
    command: str = ""


# ---- processes ----------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads, dead ones included), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


PIN_POLICIES = ("split", "split-free-proxy", "own", "none")


@dataclass
class Placement:
    """CPU sets for the load generator, the backend and the proxies (None: the scheduler decides)."""
    loadgen: set[int] | None = None
    backend: set[int] | None = None
    proxy: set[int] | None = None


def placement(pin: str) -> Placement:
    """The CPUs of each process under a pinning policy.

    On these VMs a wakeup across CPUs costs ~25 us and one on the same CPU ~2 us, so where the
    scheduler happens to put the load generator and the backend decides a QD1 run's latency by a
    factor of ten. "split" fixes the placement a real guest has (its vCPU on one CPU, the backend
    and the proxy on the others); "split-free-proxy" lets the proxy run on any CPU (the load
    generator's CPU is mostly idle at large blocks); "own" gives each of the three its own
    CPU(s), the proxy all but the first two: the only placement where the proxy's CPU per
    request is not also its peers' (needs 3 CPUs; ValueError otherwise); "none" pins nothing.
    """
    if pin not in PIN_POLICIES:
        raise ValueError(f"pinning policy {pin!r}: choose from {', '.join(PIN_POLICIES)}")
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "own":
        if len(cpus) < 3:
            raise ValueError(f"--pin own needs 3 CPUs (load generator, backend, proxy), this process may use "
                             f"{len(cpus)}: run it on a machine with 3 or more CPUs")
        return Placement(loadgen={cpus[0]}, backend={cpus[1]}, proxy=set(cpus[2:]))
    if pin == "none" or len(cpus) < 2:
        return Placement()
    rest = set(cpus[1:])
    # Children inherit the (pinned) bench's mask, so "any CPU" must be set explicitly too.
    return Placement(loadgen={cpus[0]}, backend=rest, proxy=rest if pin == "split" else set(cpus))


def pin_process(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread a process has now (threads it creates later inherit the mask)."""
    if cpus is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in lines[-n:])


def _proxy_extra(common: list[str], variant: list[str]) -> list[str]:
    """--proxy-args then the variant's; a variant's @PYTHON stays first (ProxyProcess)."""
    if variant and variant[0].startswith("@"):
        return [variant[0], *common, *variant[1:]]
    return [*common, *variant]


class ProxyProcess:
    """``python -m fastshadow.cli proxy --listen S --backend B --mode M`` as a subprocess."""

    def __init__(self, mode: str, listen: Path, backend: Path, log_path: Path, extra: list[str],
                 proxy_mode: str = "direct"):
        self.mode = mode
        self.listen = listen
        self.log_path = log_path
        # The bench runs the load generator (QEMU's part), qsd and the proxy as one user: an
        # isolated proxy would refuse that backend identity without --allow-shared-uid.
        shared = ["--allow-shared-uid"] if proxy_mode == "isolated" else []
        # A variant's "@PYTHON" first argument: another checkout's interpreter, so that two
        # builds of the data plane are compared interleaved in one run (bench/README.md).
        # -P: not the working directory's fastshadow (python -m puts it first on sys.path).
        python = [sys.executable]
        if extra and extra[0].startswith("@"):
            python, extra = [extra[0][1:], "-P"], extra[1:]
        self.argv = [*python, "-m", "fastshadow.cli", "proxy", "--listen", str(listen),
                     "--backend", str(backend), "--mode", proxy_mode, *shared,
                     "--name", f"bench-{mode}", *extra]
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        try:
            self.listen.unlink()
        except FileNotFoundError:
            pass
        self._log = open(self.log_path, "ab")
        self._log.write(("# " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)  # a killed bench leaves no proxy behind

    def wait_ready(self, timeout: float = 20.0) -> None:
        try:
            wait_listening(self.listen, self.proc, timeout, what=f"the fastshadow proxy for {self.mode}")
        except NotListening as e:
            raise RuntimeError(f"{e}: {_tail(self.log_path)}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


class TracerProcess:
    """``python -m fastshadow.cli trace --pid PROXY --quiet ARGS`` attached to one proxy for a whole backend."""

    def __init__(self, mode: str, pid: int, args: list[str], log_path: Path):
        self.mode, self.log_path = mode, log_path
        self.argv = [sys.executable, "-m", "fastshadow.cli", "trace", "--pid", str(pid), "--quiet",
                     "--interval", "5", *args]
        self._log = open(log_path, "ab")
        self._log.write(("# " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)

    def wait_attached(self, timeout: float = 180.0) -> None:
        """Until the tracer says it traces (bcc compiles its program first: seconds, more on a busy host)."""
        deadline = time.monotonic() + timeout
        while b"Tracing " not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fastshadow trace did not attach: {_tail(self.log_path)}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)         # Ctrl-C: it prints the whole run and exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class Testbed:
    """One backend (qemu-storage-daemon) and a fastshadow proxy per proxied mode."""

    def __init__(self, backend: str, cfg: Config, workdir: Path, num_queues: int, log: Callable[[str], None],
                 place: Placement | None = None):
        self.backend = backend
        self.cfg = cfg
        self.dir = workdir
        self.num_queues = num_queues
        self.log = log
        self.qsd_sock = workdir / f"qsd-{backend}.sock"
        self.disk = workdir / "disk.img" if backend == "file" else None
        self.qsd: StorageDaemon | None = None
        self.proxies: dict[str, ProxyProcess] = {}
        self.tracers: dict[str, TracerProcess] = {}
        self.skipped: dict[str, str] = {}
        self.place = place or Placement()

    def _new_qsd(self) -> StorageDaemon:
        if self.backend == "file":
            return StorageDaemon(self.qsd_sock, driver="file", disk=self.disk, size=self.cfg.file_size,
                                 num_queues=self.num_queues, log_path=self.dir / f"qsd-{self.backend}.log")
        return StorageDaemon(self.qsd_sock, driver="null", size=self.cfg.null_size, num_queues=self.num_queues,
                             log_path=self.dir / f"qsd-{self.backend}.log")

    def start(self, modes: list[str]) -> None:
        if self.backend == "file":
            self._prefill()
        self.qsd = self._new_qsd().start()
        pin_process(self.qsd.pid, self.place.backend)
        for mode in modes:
            if mode == "direct":
                continue
            px = ProxyProcess(mode, self.dir / f"fs-{self.backend}-{mode}.sock", self.qsd_sock,
                              self.dir / f"proxy-{self.backend}-{mode}.log",
                              _proxy_extra(self.cfg.proxy_args, self.cfg.variants.get(mode, []))
                              + (["--iotlb-keep-completed"] if mode == "isolated-iotlb" else []),
                              "isolated" if mode in ("isolated", "isolated-iotlb") or mode in self.cfg.variants
                              else "direct")
            px.start()
            pin_process(px.pid, self.place.proxy)
            self.proxies[mode] = px
        for mode, px in list(self.proxies.items()):
            try:
                px.wait_ready()
                pin_process(px.pid, self.place.proxy)
            except RuntimeError as e:
                self.skip(mode, str(e))
        for mode, args in self.cfg.traced.items():
            if mode in self.proxies and mode not in self.skipped:
                tr = TracerProcess(mode, self.proxies[mode].pid, args, self.dir / f"trace-{self.backend}-{mode}.log")
                self.tracers[mode] = tr
                try:
                    tr.wait_attached()
                    self.log(f"{mode}: fastshadow trace {' '.join(args)} attached to proxy {self.proxies[mode].pid}")
                except RuntimeError as e:
                    self.skip(mode, str(e))
        pids = [f"qemu-storage-daemon {self.qsd.pid}"] + [f"{m} proxy {px.pid}" for m, px in self.proxies.items()
                                                          if m not in self.skipped]
        self.log(f"backend {self.backend}: pids: {', '.join(pids)}, load generator {os.getpid()} "
                 f"(fastshadow trace --pid PROXY --driver-pid {os.getpid()})")

    def _prefill(self) -> None:
        """Write the whole image once, so that reads hit allocated blocks, not holes."""
        size = self.cfg.file_size
        if self.disk.exists() and self.disk.stat().st_size == size and self.disk.stat().st_blocks * 512 >= size:
            return
        chunk = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        with open(self.disk, "wb") as f:
            for off in range(0, size, len(chunk)):
                f.write(chunk[:min(len(chunk), size - off)])
            f.flush()
            os.fsync(f.fileno())

    def skip(self, mode: str, reason: str) -> None:
        if mode not in self.skipped:
            self.skipped[mode] = reason
            self.log(f"skip {mode} on {self.backend}: {reason}")
        px = self.proxies.get(mode)
        if px is not None:
            px.stop()

    def socket(self, mode: str) -> Path:
        return self.qsd_sock if mode == "direct" else self.proxies[mode].listen

    def pids(self, mode: str) -> tuple[int, int | None]:
        return self.qsd.pid, (self.proxies[mode].pid if mode != "direct" else None)

    def other_pids(self, mode: str) -> list[int]:
        """The proxies of the other modes (idle during this run)."""
        return [px.pid for m, px in self.proxies.items() if m != mode and px.alive()]

    def healthy_after_failure(self, mode: str) -> None:
        """After a failed session: restart qsd if it died (it serves the other modes too)."""
        if self.qsd is not None and self.qsd.returncode is not None:
            self.log(f"qemu-storage-daemon ({self.backend}) exited with {self.qsd.returncode}: "
                     f"{self.qsd.output.strip()[-300:]}; restarting it")
            self.qsd.kill()
            self.qsd = self._new_qsd().start()
            pin_process(self.qsd.pid, self.place.backend)
        px = self.proxies.get(mode)
        if px is not None and not px.alive() and mode not in self.skipped:
            self.skip(mode, f"the proxy exited with {px.proc.returncode}: {_tail(px.log_path)}")

    def stop(self) -> None:
        for tr in self.tracers.values():
            tr.stop()
        for px in self.proxies.values():
            px.stop()
        if self.qsd is not None:
            self.qsd.kill()


# ---- one run ------------------------------------------------------------------------------------
def _queue_size(cfg: Config, wl: Workload) -> int:
    n = cfg.queue_size
    while n < 3 * wl.qd:
        n *= 2
    return n


def open_session(path: str, retry_for: float = 3.0, **kw) -> Session:
    """Session.open, again while the peer closes at once: the proxy may still be ending the
    previous session (it refuses a second front-end until then), as QEMU's reconnect= retries."""
    deadline = time.monotonic() + retry_for
    while True:
        s = Session(path, **kw)
        try:
            s.open()
            return s
        except SetupError as e:
            if not e.at_start or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_once(tb: Testbed, mode: str, wl: Workload, cfg: Config, *, duration: float | None,
             requests: int | None, seed: int) -> tuple[RunResult, rp.Cpu]:
    """One session: set up, drive `wl`, tear down. CPU is measured around the I/O only."""
    with open_session(str(tb.socket(mode)), num_queues=wl.queues, queue_size=_queue_size(cfg, wl), max_qd=wl.qd,
                      max_block_size=wl.bs, event_idx=cfg.event_idx, timeout=cfg.setup_timeout,
                      iotlb=mode == "isolated-iotlb") as s:
        qsd_pid, proxy_pid = tb.pids(mode)
        others = tb.other_pids(mode)
        m0 = machine_cpu_seconds()
        c0 = (self_cpu_seconds(), cpu_seconds(qsd_pid), cpu_seconds(proxy_pid) if proxy_pid else None,
              sum(cpu_seconds(p) for p in others))
        r = s.run("read" if wl.is_read else "write", wl.bs, wl.qd, random=wl.is_random, queues=wl.queues,
                  duration=duration, requests=requests, seed=seed, busy_poll_us=cfg.busy_poll_us,
                  threads=cfg.loadgen_threads, stall_timeout=cfg.stall_timeout)
        c1 = (self_cpu_seconds(), cpu_seconds(qsd_pid), cpu_seconds(proxy_pid) if proxy_pid else None,
              sum(cpu_seconds(p) for p in others))
        m1 = machine_cpu_seconds()
    ours = sum(b - a for a, b in zip(c0, c1) if a is not None)  # idle proxies of other modes count as ours
    cpu = rp.Cpu(loadgen=round(c1[0] - c0[0], 6), backend=round(c1[1] - c0[1], 6),
                 proxy=round(c1[2] - c0[2], 6) if proxy_pid else None,
                 other=round(max(0.0, m1[0] - m0[0] - ours), 3), steal=round(m1[1] - m0[1], 3))
    return r, cpu


def to_run(index: int, rep: int, mode: str, backend: str, wl: Workload, r: RunResult, cpu: rp.Cpu) -> rp.Run:
    lat = r.latencies_ns
    if len(lat):
        p50, p99, p999 = (int(x) for x in np.percentile(lat, [50, 99, 99.9]))
        mean, lo, hi = int(lat.mean()), int(lat.min()), int(lat.max())
    else:
        p50 = p99 = p999 = mean = lo = hi = 0
    return rp.Run(index=index, rep=rep, mode=mode, backend=backend, workload=wl, requests=r.requests,
                  duration_s=round(r.seconds, 6), iops=round(r.iops, 1), mb_per_s=round(r.mb_per_s, 2),
                  lat_p50_ns=p50, lat_p99_ns=p99, lat_p999_ns=p999, lat_mean_ns=mean, lat_min_ns=lo,
                  lat_max_ns=hi, cpu_s=cpu,
                  cpu_us_per_request=round(cpu.total / r.requests * 1e6, 3) if r.requests else 0.0,
                  kicks=r.kicks, sleeps=r.sleeps, wakeups=r.wakeups)


# ---- machine info and memcpy --------------------------------------------------------------------
def machine_info() -> rp.Machine:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        qsd = "unknown"
    from fastshadow import __version__
    u = platform.uname()
    return rp.Machine(hostname=socket.gethostname(), nproc=os.cpu_count() or 0, kernel=f"{u.release} {u.machine}",
                      cpu_model=model, mem_total_bytes=mem, python=platform.python_version(),
                      qemu_storage_daemon=qsd, fastshadow=__version__, wake_rtt_us=wake_round_trip_us(),
                      **idle_policy())


class IdlePolicyError(RuntimeError):
    """The machine's idle policy cannot be set as asked (--guest-halt-poll-ns)."""


CPUIDLE_GOVERNOR = Path("/sys/devices/system/cpu/cpuidle/current_governor")
GUEST_HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def idle_policy(governor: Path = CPUIDLE_GOVERNOR, halt_poll: Path = GUEST_HALT_POLL_NS) -> dict:
    """{"cpuidle_governor": str | None, "guest_halt_poll_ns": int | None}: what an idle CPU does
    here (Documentation/virt/guest-halt-polling.rst in the kernel). None where the file is
    absent: no cpuidle, or not a guest with the haltpoll driver."""
    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip() or None
        except OSError:
            return None
    ns = read(halt_poll)
    return {"cpuidle_governor": read(governor) or read(governor.with_name("current_governor_ro")),
            "guest_halt_poll_ns": int(ns) if ns and ns.isdigit() else None}


#: Held (flock) by a bench that set guest_halt_poll_ns, until it has put the old value back:
#: two benches that both set it would each restore the other's value.
HALT_POLL_LOCK = Path("/run/lock/fastshadow-bench-halt-poll.lock")


@contextmanager
def guest_halt_poll(ns: int | None, path: Path = GUEST_HALT_POLL_NS, governor: Path = CPUIDLE_GOVERNOR,
                    lock: Path = HALT_POLL_LOCK) -> Iterator[str | None]:
    """Set haltpoll.guest_halt_poll_ns (Documentation/virt/guest-halt-polling.rst: the most an
    idle vCPU polls before it halts) to `ns` for the block, then put the old value back, unless
    something else changed it meanwhile (then it is left, with a line on stderr). None: leave
    it. Yields the old value (None when not asked). Raises IdlePolicyError when the machine has
    no such setting, its cpuidle governor is not haltpoll (the value would do nothing), another
    bench holds it, or it cannot be written."""
    if ns is None:
        yield None
        return
    gov = idle_policy(governor, path)["cpuidle_governor"]
    if gov != "haltpoll":
        raise IdlePolicyError(f"--guest-halt-poll-ns {ns}: the cpuidle governor here is {gov or 'none'}, not "
                              f"haltpoll, so the value would change nothing (it needs a KVM guest kernel with "
                              f"the haltpoll cpuidle driver)")
    import fcntl
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = open(lock, "a")
    except OSError as e:
        raise IdlePolicyError(f"--guest-halt-poll-ns {ns}: cannot open the lock {lock} ({e.strerror or e}); "
                              f"it needs root") from None
    with held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IdlePolicyError(f"--guest-halt-poll-ns {ns}: another bench has set the value and not yet "
                                  f"put it back ({lock} is locked); wait for it to end") from None
        try:
            old = path.read_text().strip()
            path.write_text(f"{ns}\n")
        except OSError as e:
            raise IdlePolicyError(f"--guest-halt-poll-ns {ns}: cannot set {path} ({e.strerror or e}); it needs "
                                  f"root and a KVM guest kernel with the haltpoll cpuidle driver") from None
        try:
            yield old
        finally:
            now = path.read_text().strip()
            if now == str(ns):
                path.write_text(f"{old}\n")
            else:
                print(f"fastshadow bench: {path} is {now}, set by someone else during the bench: left as it "
                      f"is, not put back to {old}", file=sys.stderr)


def wake_round_trip_us(rounds: int = 2000) -> float | None:
    """Median µs for a thread pinned on one CPU to wake a thread sleeping on another through an
    eventfd and be woken back the same way (blocking reads: each side sleeps every time, as a
    vhost-user peer that does not poll). Includes a few µs of the interpreter per round trip.
    None if the process may use fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    ping, pong = os.eventfd(0), os.eventfd(0)

    def peer():
        os.sched_setaffinity(0, {cpus[1]})
        for _ in range(rounds):
            os.eventfd_read(ping)
            os.eventfd_write(pong, 1)
    saved = os.sched_getaffinity(0)
    t = threading.Thread(target=peer, daemon=True)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        t.start()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            times.append(time.perf_counter_ns() - t0)
        t.join()
    finally:
        os.sched_setaffinity(0, saved)
        os.close(ping)
        os.close(pong)
    return round(statistics.median(times[rounds // 10:]) / 1e3, 1)


def memcpy_baseline(cold_bytes: int = 256 << 20, hot_bytes: int = 1 << 20,
                    cold_iters: int = 6, hot_iters: int = 400) -> rp.Memcpy:
    """One core, median of the copies (the first copy of each size is a warm-up and dropped)."""
    cold = memcpy_bandwidth(cold_bytes, cold_iters + 1)[1:]
    hot = memcpy_bandwidth(hot_bytes, hot_iters + 1)[1:]
    return rp.Memcpy(cold_gb_per_s=round(cold_bytes / statistics.median(cold), 3), cold_bytes=cold_bytes,
                     hot_gb_per_s=round(hot_bytes / statistics.median(hot), 3), hot_bytes=hot_bytes,
                     iterations_cold=cold_iters, iterations_hot=hot_iters)


# ---- the whole benchmark ------------------------------------------------------------------------
def _fmt_iops(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def run_bench(cfg: Config, log: Callable[[str], None] = print) -> rp.Results:
    t_start = time.monotonic()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cfg.out.mkdir(parents=True, exist_ok=True)
    own_workdir = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fsbench-")) if own_workdir else Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    machine = machine_info()
    saved_affinity = os.sched_getaffinity(0)
    place = placement(cfg.pin)
    if place.loadgen:
        os.sched_setaffinity(0, place.loadgen)  # this thread; the driver threads it starts inherit it
        log(f"pinning: load generator on CPU {_cpulist(place.loadgen)}, backend on CPU {_cpulist(place.backend)}, "
            f"proxy on CPU {_cpulist(place.proxy)}")
    try:
        return _run_bench(cfg, log, t_start, created, workdir, own_workdir, machine, place)
    finally:
        os.sched_setaffinity(0, saved_affinity)


def _cpulist(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _run_bench(cfg: Config, log, t_start, created, workdir, own_workdir, machine, place) -> rp.Results:
    if cfg.memcpy:
        memcpy = memcpy_baseline()
        log(f"memcpy, one core: {memcpy.cold_gb_per_s:.1f} GB/s cold ({rp.size_label(memcpy.cold_bytes)}), "
            f"{memcpy.hot_gb_per_s:.1f} GB/s hot ({rp.size_label(memcpy.hot_bytes)})")
    else:
        memcpy = rp.Memcpy(0.0, 0, 0.0, 0, 0, 0)

    total = len(cfg.backends) * cfg.reps * len(cfg.workloads) * len(cfg.modes)
    runs: list[rp.Run] = []
    skipped: list[rp.Skip] = []
    qd1_lat: dict[tuple, list[np.ndarray]] = {}
    n = 0
    num_queues = max(w.queues for w in cfg.workloads)
    try:
        for backend in cfg.backends:
            tb = Testbed(backend, cfg, workdir, num_queues, log, place)
            try:
                log(f"backend {backend}: starting qemu-storage-daemon"
                    + (f" and fastshadow ({', '.join(m for m in cfg.modes if m != 'direct')})"
                       if any(m != "direct" for m in cfg.modes) else ""))
                tb.start(cfg.modes)
                # Warm-up: also the check that each mode works at all.
                for mode in cfg.modes:
                    if mode in tb.skipped:
                        continue
                    try:
                        run_once(tb, mode, Workload("randread", 4096, 8), cfg, duration=cfg.warmup, requests=None,
                                 seed=99)
                    except (LoadGenError, OSError) as e:
                        tb.skip(mode, f"{type(e).__name__}: {e}" + _proxy_hint(tb, mode))
                        tb.healthy_after_failure(mode)
                failures: dict[str, int] = {}
                for rep in range(cfg.reps):
                    for wi, wl in enumerate(cfg.workloads):
                        k = (rep + wi) % len(cfg.modes)
                        for mode in cfg.modes[k:] + cfg.modes[:k]:
                            n += 1
                            tag = f"[{n}/{total}] {mode} {backend} {wl.label}"
                            if mode in tb.skipped:
                                log(f"{tag}: skipped")
                                continue
                            try:
                                for attempt in range(cfg.retry_noisy + 1):
                                    r, cpu = run_once(tb, mode, wl, cfg, duration=cfg.duration,
                                                      requests=cfg.requests, seed=1000 * rep + wi + 1)
                                    if attempt == cfg.retry_noisy or not cpu.noisy(r.seconds):
                                        break
                                    log(f"{tag}: shared the machine (other {cpu.other:.2f} CPU s, steal "
                                        f"{cpu.steal:.2f} s in {r.seconds:.1f} s): again")
                            except (LoadGenError, OSError) as e:
                                reason = f"{type(e).__name__}: {e}" + _proxy_hint(tb, mode)
                                log(f"{tag}: FAILED: {reason}")
                                skipped.append(rp.Skip(backend, mode, reason, wl))
                                failures[mode] = failures.get(mode, 0) + 1
                                tb.healthy_after_failure(mode)
                                if failures[mode] >= 2:
                                    tb.skip(mode, f"{failures[mode]} runs failed; last: {reason}")
                                continue
                            run = to_run(len(runs), rep, mode, backend, wl, r, cpu)
                            runs.append(run)
                            if wl.qd == 1:
                                qd1_lat.setdefault((backend, wl, mode), []).append(r.latencies_ns)
                            noisy = (f", machine busy elsewhere: {cpu.other:.2f} CPU s"
                                     if cpu.other > 0.1 * run.duration_s else "")
                            log(f"{tag}: {_fmt_iops(run.iops)} IOPS, {run.mb_per_s:.0f} MB/s, "
                                f"p50 {run.lat_p50_ns / 1000:.1f} us, p99 {run.lat_p99_ns / 1000:.1f} us, "
                                f"CPU {cpu.total:.2f} s{noisy}")
                for mode, reason in tb.skipped.items():
                    skipped.append(rp.Skip(backend, mode, reason))
            except StorageDaemonError as e:  # qsd would not (re)start: nothing more to measure here
                log(f"backend {backend} abandoned: {e}")
                skipped += [rp.Skip(backend, m, f"qemu-storage-daemon failed: {e}") for m in cfg.modes]
            finally:
                tb.stop()
    finally:
        if own_workdir and not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif cfg.keep or not own_workdir:
            log(f"work directory (sockets, logs): {workdir}")

    cdfs = []
    for (backend, wl, mode), parts in qd1_lat.items():
        lat = np.concatenate(parts)
        if len(lat):
            q = np.quantile(lat, rp.CDF_LEVELS)
            cdfs.append(rp.Cdf(backend=backend, workload=wl, mode=mode, samples=len(lat),
                               latency_ns=[int(x) for x in q]))
    summary = rp.summarize(runs)
    settings = rp.Settings(preset=cfg.preset, modes=list(cfg.modes), backends=list(cfg.backends),
                           duration_s=cfg.duration, requests=cfg.requests, reps=cfg.reps, queue_size=cfg.queue_size,
                           event_idx=cfg.event_idx, busy_poll_us=cfg.busy_poll_us,
                           loadgen_threads=cfg.loadgen_threads, proxy_args=list(cfg.proxy_args),
                           variants={k: list(v) for k, v in cfg.variants.items()},
                           traced={k: list(v) for k, v in cfg.traced.items()},
                           file_size=cfg.file_size, null_size=cfg.null_size, pin=cfg.pin,
                           workloads=list(cfg.workloads), retry_noisy=cfg.retry_noisy)
    results = rp.Results(schema=rp.SCHEMA_VERSION, created=created, command=cfg.command, settings=settings,
                         machine=machine, memcpy=memcpy, runs=runs, skipped=skipped, summary=summary,
                         ratios=rp.ratios(summary), cdf_levels=list(rp.CDF_LEVELS), cdfs=cdfs, wall_s=0.0)
    if cfg.plots:
        results.plots = rp.write_plots(results, cfg.out, log)
    results.wall_s = round(time.monotonic() - t_start, 1)
    rp.write_json(results, cfg.out / "results.json")
    return results


def _proxy_hint(tb: Testbed, mode: str) -> str:
    px = tb.proxies.get(mode)
    if px is None:
        return ""
    tail = _tail(px.log_path, 3)
    return f" (proxy log: {tail})" if tail else ""
