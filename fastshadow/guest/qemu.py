"""Run the test guest in QEMU (TCG) and follow its serial console.

Used by the tests, the demo and the benchmarks::

    image = build_guest_image()
    with GuestVM(image, blk_socket=sock, blk_num_queues=2, smp=2,
                 cmdline={"fastshadow.check": "--total 8M", "fastshadow.queues": "2"}) as vm:
        vm.start()
        result = run_check(vm, timeout=120)
        result.assert_passed()

The console is read by a background thread into a buffer, so QEMU never
blocks on a full pipe whatever the caller does.  ``-no-reboot`` is not used:
a guest reboot must reset and re-initialise the vhost-user device inside the
same QEMU process.  Because ``panic=-1`` then turns a kernel panic into a
reboot loop, the reader watches for the panic text and kills QEMU at once.
"""

from __future__ import annotations

from ._children import die_with_parent

import codecs
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Mapping

from .image import GuestImage

__all__ = [
    "BootResult",
    "CheckLine",
    "CheckResult",
    "GuestError",
    "GuestExited",
    "GuestPanic",
    "GuestTimeout",
    "GuestVM",
    "QemuNotFound",
    "find_qemu",
    "parse_console",
    "run_check",
]

_PANIC_RE = re.compile(r"Kernel panic - not syncing[^\n]*")
_TAIL_LINES = 40


class GuestError(RuntimeError):
    """Base class of guest/QEMU failures."""


class QemuNotFound(GuestError):
    pass


class GuestTimeout(GuestError, TimeoutError):
    pass


class GuestExited(GuestError):
    """QEMU exited before the awaited output appeared."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class GuestPanic(GuestError):
    """The guest kernel panicked (QEMU was killed to stop the panic=-1 reboot loop)."""


def find_qemu(name: str = "qemu-system-x86_64") -> str:
    path = shutil.which(name)
    if not path:
        raise QemuNotFound(f"{name} not found in PATH: apt-get install qemu-system-x86")
    return path


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _kernel_param(key: str, value: str | None) -> str:
    if value is None:
        return key
    value = str(value)
    if '"' in value or "\n" in value:
        # The kernel's command line parser has no escapes for these.
        raise ValueError(f"kernel parameter {key}: value may not contain '\"' or newlines: {value!r}")
    if value == "" or any(c.isspace() for c in value):
        return f'{key}="{value}"'
    return f"{key}={value}"


class GuestVM:
    """One QEMU TCG guest booting the fastshadow test image.

    `cmdline` entries are kernel parameters, passed verbatim by name (e.g.
    ``{"fastshadow.check": "--total 8M", "fastshadow.boots": "2"}``); a value
    of ``None`` gives a bare flag.  Values with spaces are double-quoted.
    """

    def __init__(self, image: GuestImage, *, blk_socket: str | os.PathLike[str] | None = None,
                 blk_num_queues: int = 1, fs_socket: str | os.PathLike[str] | None = None,
                 fs_tag: str = "myfs", net_socket: str | os.PathLike[str] | None = None,
                 smp: int = 1, mem_mb: int = 256,
                 cmdline: Mapping[str, str | None] | None = None, extra_args: Iterable[str] = (),
                 log_path: Path | str | None = None, reconnect: int | None = None,
                 machine: str = "q35", qemu: str | None = None, iommu_platform: bool = False,
                 viommu: str | None = None) -> None:
        self.image = image
        self.blk_socket = str(blk_socket) if blk_socket is not None else None
        self.blk_num_queues = blk_num_queues
        self.fs_socket = str(fs_socket) if fs_socket is not None else None
        self.fs_tag = fs_tag
        self.net_socket = str(net_socket) if net_socket is not None else None
        self.smp = smp
        self.mem_mb = mem_mb
        self.cmdline: dict[str, str | None] = dict(cmdline or {})
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path is not None else None
        self.reconnect = reconnect
        self.machine = machine
        #: VIRTIO_F_ACCESS_PLATFORM on the vhost-user devices (confidential-guest and vIOMMU users).
        self.iommu_platform = iommu_platform or viommu is not None
        if viommu not in (None, "intel", "virtio"):
            raise ValueError(f"viommu {viommu!r}: 'intel' (intel-iommu with a device IOTLB) or 'virtio' "
                             f"(virtio-iommu-pci; the image of build_guest_image(virtio_iommu=True))")
        self.viommu = viommu
        self._qemu = qemu or find_qemu()

        self._proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._chunks: list[str] = []
        self._text = ""           # joined lazily from _chunks (under _cond)
        self._stderr: list[str] = []
        self._eof = False         # console reader reached EOF: QEMU is gone
        self._panic: str | None = None
        self._cursor = 0
        self._threads: list[threading.Thread] = []
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()  # both reader threads write the log

    # ------------------------------------------------------------ command

    @property
    def append(self) -> str:
        params = ["console=ttyS0", "panic=-1"]
        if self.viommu == "intel":
            params.append("intel_iommu=on")   # the guest's DMA goes through the vIOMMU's mappings
        elif self.viommu == "virtio":
            # The disk's PCI function is probed at boot (virtio_pci is built into the backports
            # kernel) and waits for virtio_iommu, a module /init loads. Linux stops waiting 10 s
            # after its initcalls and then drives the device without its IOMMU
            # (driver_deferred_probe_timeout); under TCG on a busy machine /init can be later.
            params.append("deferred_probe_timeout=120")
        params += [_kernel_param(k, v) for k, v in self.cmdline.items()]
        return " ".join(params)

    @property
    def command(self) -> list[str]:
        mem = f"{self.mem_mb}M"
        argv = [
            self._qemu, "-accel", "tcg", "-M", self.machine,
            "-nodefaults", "-no-user-config", "-display", "none",
            # signal=off: bytes on stdin are never turned into SIGINT for QEMU.
            "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
            "-m", mem,
            # vhost-user backends map guest RAM: it must be a shareable memfd.
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-smp", str(self.smp),
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", self.append,
        ]
        if self.viommu == "intel":
            # device-iotlb=on: QEMU sends vhost-user IOTLB updates and invalidations; the
            # device needs ats=on for it. intremap=on needs a split irqchip, which TCG
            # takes too (QEMU 7.2 refuses intremap without kernel-irqchip=split).
            argv[argv.index(self.machine)] = f"{self.machine},kernel-irqchip=split"
            argv += ["-device", "intel-iommu,intremap=on,device-iotlb=on"]
        elif self.viommu == "virtio":
            # Before the other PCI devices: a device takes its DMA address space when it is
            # realized, so only those created after the IOMMU sit behind it. No device IOTLB
            # (QEMU 7.2's virtio-iommu has none): vhost gets its unmap notifications instead.
            argv += ["-device", "virtio-iommu-pci"]
        if self.blk_socket is not None:
            argv += ["-chardev", self._chardev("blk0", self.blk_socket),
                     "-device", f"vhost-user-blk-pci,chardev=blk0,num-queues={self.blk_num_queues}"
                     + self._platform_options()]
        if self.fs_socket is not None:
            argv += ["-chardev", self._chardev("fs0", self.fs_socket),
                     "-device", f"vhost-user-fs-pci,chardev=fs0,tag={self.fs_tag}"
                     + self._platform_options(transitional=False)]
        if self.net_socket is not None:
            # vectors=0: QEMU 7.2 under TCG crashes on vhost-user-net with MSI-X.
            argv += ["-chardev", self._chardev("net0c", self.net_socket),
                     "-netdev", "vhost-user,id=net0,chardev=net0c",
                     "-device", "virtio-net-pci,netdev=net0,vectors=0"]
        return argv + self.extra_args

    def _platform_options(self, transitional: bool = True) -> str:
        """Device properties for VIRTIO_F_ACCESS_PLATFORM: none, or iommu_platform=on on a
        modern-only device (QEMU 7.2: "VIRTIO_F_IOMMU_PLATFORM was supported by neither legacy
        nor transitional device"; vhost-user-fs-pci is modern-only and has no disable-legacy),
        with intel-iommu also ats=on (the device IOTLB; virtio-iommu has no ATS)."""
        if not self.iommu_platform:
            return ""
        opts = ",iommu_platform=on" + (",disable-legacy=on" if transitional else "")
        return opts + ",ats=on" if self.viommu == "intel" else opts

    def _chardev(self, name: str, path: str) -> str:
        chardev = f"socket,id={name},path={path}"
        if self.reconnect is not None:
            chardev += f",reconnect={self.reconnect}"
        return chardev

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._proc is not None:
            raise GuestError("GuestVM already started")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
            self._log.write("# " + " ".join(self.command) + "\n")
            self._log.flush()
        try:
            # Own session: kill() takes down QEMU and anything it spawned, nothing else.
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          start_new_session=True, preexec_fn=die_with_parent)
        except OSError as e:
            if self._log is not None:
                self._log.close()
                self._log = None
            raise GuestError(f"cannot start {self._qemu}: {e}") from e
        for target, stream, name in ((self._read_console, self._proc.stdout, "console"),
                                     (self._read_stderr, self._proc.stderr, "stderr")):
            t = threading.Thread(target=target, args=(stream,), name=f"qemu-{name}-{self._proc.pid}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def __enter__(self) -> "GuestVM":
        # Entering does not start QEMU (call start(), or let run_check do it).
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop QEMU (if running) and wait for the reader threads."""
        proc = self._proc
        if proc is None:
            return
        self._kill_now()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        for t in self._threads:
            t.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None and not any(t.is_alive() for t in self._threads):
                stream.close()
        with self._log_lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    # ------------------------------------------------------------ readers

    def _read_console(self, stream: IO[bytes]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = stream.fileno()
        tail = ""
        while True:
            data = os.read(fd, 65536)
            text = decoder.decode(data, final=not data).replace("\r", "")
            if text:
                with self._cond:
                    self._chunks.append(text)
                    m = _PANIC_RE.search(tail + text) if self._panic is None else None
                    if m:
                        self._panic = m.group(0)
                    self._cond.notify_all()
                self._write_log(text)
                tail = (tail + text)[-256:]
                if m:
                    # panic=-1 reboots into the same panic forever: give the
                    # kernel a moment to print the reason and trace, then stop.
                    killer = threading.Timer(1.0, self._kill_now)
                    killer.daemon = True
                    killer.start()
            if not data:
                break
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _kill_now(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._cond:
                self._stderr.append(line)
                self._cond.notify_all()
            self._write_log("[qemu stderr] " + line)

    def _write_log(self, text: str) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.write(text)
                self._log.flush()

    # ------------------------------------------------------------ queries

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def _console_locked(self) -> str:
        if self._chunks:
            self._text += "".join(self._chunks)
            self._chunks.clear()
        return self._text

    @property
    def console(self) -> str:
        """The whole serial console output so far (``\\r`` removed)."""
        with self._cond:
            return self._console_locked()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._stderr)

    @property
    def panic(self) -> str | None:
        """The kernel panic line, if the guest panicked."""
        return self._panic

    def _describe(self, text: str) -> str:
        parts = [f"last {_TAIL_LINES} console lines:\n{_tail(text)}"]
        err = self.stderr.strip()
        if err:
            parts.append(f"qemu stderr:\n{_tail(err, 20)}")
        return "\n".join(parts)

    def _settle_panic_locked(self) -> str:
        """After a panic, let the kill timer stop QEMU so the panic report is complete."""
        deadline = time.monotonic() + 5
        while not self._eof and time.monotonic() < deadline:
            self._cond.wait(0.2)
        text = self._console_locked()
        m = _PANIC_RE.search(text)
        if m:
            self._panic = m.group(0)
        return text

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, *,
                 from_start: bool = False) -> re.Match[str]:
        """Wait until `pattern` (a regex, MULTILINE) appears on the console, in complete lines.

        The search starts where the previous successful :meth:`wait_for`
        match ended (or at the beginning with ``from_start=True``), so waiting
        twice for the same marker finds its first and then its second
        occurrence (e.g. one per boot).  Raises :class:`GuestTimeout`,
        :class:`GuestPanic` or :class:`GuestExited`.
        """
        if self._proc is None:
            raise GuestError("GuestVM not started")
        rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._console_locked()
                # Complete lines only: the console arrives in pieces, and a pattern ending in
                # \w+ would match half a word ("result=PAS" of "result=PASS").
                m = rx.search(text, 0 if from_start else self._cursor, text.rfind("\n") + 1)
                if m:
                    self._cursor = m.end()
                    return m
                if self._panic is not None:
                    text = self._settle_panic_locked()
                    raise GuestPanic(f"guest kernel panic while waiting for {rx.pattern!r}: "
                                     f"{self._panic}\n{self._describe(text)}")
                if self._eof:
                    rc = self._proc.wait()
                    raise GuestExited(f"qemu exited with status {rc} before {rx.pattern!r} "
                                      f"appeared\n{self._describe(text)}", rc)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"timed out after {timeout:.0f}s waiting for "
                                       f"{rx.pattern!r}\n{self._describe(text)}")
                self._cond.wait(min(left, 1.0))

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit (guest poweroff) and return its exit status."""
        if self._proc is None:
            raise GuestError("GuestVM not started")
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._eof:
                if self._panic is not None:
                    text = self._settle_panic_locked()
                    raise GuestPanic(f"guest kernel panic: {self._panic}\n{self._describe(text)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"qemu still running after {timeout:.0f}s\n"
                                       f"{self._describe(self._console_locked())}")
                self._cond.wait(min(left, 1.0))
        try:
            rc = self._proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"qemu closed its console but did not exit within {timeout:.0f}s") from None
        for t in self._threads:
            t.join(timeout=5)
        if self._panic is not None:
            raise GuestPanic(f"guest kernel panic: {self._panic}\n{self._describe(self.console)}")
        return rc


# ---------------------------------------------------------------- check runs

_READY = "FASTSHADOW-GUEST READY"
_DONE_RE = re.compile(r"FASTSHADOW-GUEST DONE boot=(\d+) result=(PASS|FAIL)(?: reason=(\S+))?")
_CHECK_RE = re.compile(r"FASTSHADOW-CHECK (PASS|FAIL) tag=(\S+)(.*)")
_BOOT_RE = re.compile(r"FASTSHADOW-BOOT count=(\d+)")


@dataclass
class CheckLine:
    tag: str
    passed: bool
    written: int | None
    ops: int | None
    detail: str
    line: str


@dataclass
class BootResult:
    index: int                  # 1-based position in this QEMU run
    boot: int | None            # boot number from the DONE line (the disk's boot counter)
    result: str | None          # "PASS" / "FAIL" / None when the boot never finished
    reason: str | None
    checks: list[CheckLine] = field(default_factory=list)
    bootcount: int | None = None


@dataclass
class CheckResult:
    boots: list[BootResult]
    expected_boots: int
    expected_checks: int        # checker instances expected per boot
    exit_code: int | None
    console: str

    def failures(self) -> list[str]:
        out = []
        if len(self.boots) < self.expected_boots:
            out.append(f"only {len(self.boots)} of {self.expected_boots} boots reached READY")
        for b in self.boots:
            name = f"boot #{b.index}"
            if b.result is None:
                out.append(f"{name}: no DONE marker")
            elif b.result != "PASS":
                out.append(f"{name}: result={b.result} reason={b.reason}")
            if len(b.checks) != self.expected_checks:
                out.append(f"{name}: {len(b.checks)} checker results, expected {self.expected_checks}")
            out += [f"{name}: {c.line}" for c in b.checks if not c.passed]
        if self.exit_code != 0:
            out.append(f"qemu exit status {self.exit_code}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> str:
        lines = [f"{'PASS' if self.passed else 'FAIL'}: {len(self.boots)}/{self.expected_boots} "
                 f"boots, qemu exit {self.exit_code}"]
        for b in self.boots:
            lines.append(f"  boot #{b.index} (count={b.boot}): {b.result}"
                         + "".join(f"\n    {c.line}" for c in b.checks))
        lines += [f"  ! {f}" for f in self.failures()]
        return "\n".join(lines)

    def assert_passed(self) -> None:
        if not self.passed:
            raise AssertionError(f"{self.summary()}\nlast {_TAIL_LINES} console lines:\n"
                                 f"{_tail(self.console)}")


def parse_console(console: str, *, expected_boots: int = 1, expected_checks: int = 0,
                  exit_code: int | None = None) -> CheckResult:
    """Split a console log into boots (at each READY marker) and collect their markers."""
    segments = console.split(_READY)[1:]
    boots = []
    for i, seg in enumerate(segments, 1):
        b = BootResult(index=i, boot=None, result=None, reason=None)
        m = _BOOT_RE.search(seg)
        if m:
            b.bootcount = int(m.group(1))
        for m in _CHECK_RE.finditer(seg):
            rest = m.group(3).strip()
            w = re.search(r"\bwritten=(\d+)", rest)
            o = re.search(r"\bops=(\d+)", rest)
            b.checks.append(CheckLine(tag=m.group(2), passed=m.group(1) == "PASS",
                                      written=int(w.group(1)) if w else None,
                                      ops=int(o.group(1)) if o else None,
                                      detail=rest, line=m.group(0).strip()))
        m = _DONE_RE.search(seg)
        if m:
            b.boot, b.result, b.reason = int(m.group(1)), m.group(2), m.group(3)
        boots.append(b)
    return CheckResult(boots=boots, expected_boots=expected_boots,
                       expected_checks=expected_checks, exit_code=exit_code, console=console)


def run_check(vm: GuestVM, timeout: float) -> CheckResult:
    """Wait for every boot's DONE marker and for the final poweroff; parse the results.

    The expected number of boots comes from ``fastshadow.boots`` (default 1)
    and of checker instances per boot from ``fastshadow.queues`` when
    ``fastshadow.check`` is set.  Starts the VM if needed.  A boot that reports
    FAIL powers the guest off, so fewer boots than expected is a (reported)
    failure, not an exception; timeouts and kernel panics raise.
    """
    if vm.pid is None:
        vm.start()
    deadline = time.monotonic() + timeout
    expected_boots = int(vm.cmdline.get("fastshadow.boots") or 1)
    has_check = vm.cmdline.get("fastshadow.check") is not None and not vm.cmdline.get("fastshadow.cmd")
    expected_checks = int(vm.cmdline.get("fastshadow.queues") or 1) if has_check else 0
    for _ in range(expected_boots):
        try:
            m = vm.wait_for(_DONE_RE, max(0.0, deadline - time.monotonic()))
        except GuestExited:
            if _DONE_RE.search(vm.console):
                break  # a failed boot powered the guest off early
            raise
        if m.group(2) != "PASS":
            break
    exit_code = vm.wait_exit(max(1.0, deadline - time.monotonic()))
    return parse_console(vm.console, expected_boots=expected_boots,
                         expected_checks=expected_checks, exit_code=exit_code)
