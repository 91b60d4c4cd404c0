"""Build (and cache) the test guest: a Debian kernel plus a busybox initramfs.

The image is built from the host's own packages, no network beyond the
Debian mirror:

* kernel: Debian's ``linux-image-<abi>-amd64`` (the one ``linux-image-amd64``
  depends on), fetched with ``apt-get download`` and unpacked with
  ``dpkg -x``; the virtio drivers are modules, so the needed ``.ko`` files
  (and their dependencies, from ``modules.dep``) go into the initramfs.  The
  guest behind a virtio-iommu (``build_guest_image(virtio_iommu=True)``)
  takes ``linux-image-amd64`` from the release's backports suite instead (see
  ``VIRTIO_IOMMU_CONFIG``);
* userland: ``busybox-static`` with its applet symlinks, ``/init`` (init.sh)
  and ``/checker`` (checker.c, compiled ``gcc -static``).

The result lives in ``<cache>/guest/image-<key>/`` where ``key`` hashes every
input, so it is rebuilt only when one of them changed.  Builds run in a
temporary directory renamed into place at the end and are serialised with a
lock file, so a concurrent or interrupted build never leaves a half image.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "GUEST_MODULES",
    "GuestImage",
    "GuestImageError",
    "KernelUnavailable",
    "VIRTIO_IOMMU_MODULES",
    "backports_release",
    "build_guest_image",
    "compile_checker",
    "default_cache_dir",
]

#: Modules shipped in the initramfs, loaded by /init (dependencies are added
#: automatically and everything is loaded in dependency order).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "fuse",
    "virtiofs",
    "failover",
    "net_failover",
    "virtio_net",
)

#: The virtio-iommu guest's extra module: the paravirtual IOMMU's driver (the
#: vhost-user device behind it is probed once it has registered).
VIRTIO_IOMMU_MODULES: tuple[str, ...] = ("virtio_iommu",)


def with_virtio_iommu(modules: tuple[str, ...]) -> tuple[str, ...]:
    """`modules` with VIRTIO_IOMMU_MODULES loaded as early as they can be, before virtio_pci:
    a PCI device behind the IOMMU is not probed until the IOMMU's driver has registered
    (Linux defers it), so the sooner it loads, the sooner the disk appears. (The backports
    kernel has virtio_pci built in: its probe of the disk waits for this module; see
    GuestVM's deferred_probe_timeout.)"""
    i = modules.index("virtio_pci")
    return modules[:i] + VIRTIO_IOMMU_MODULES + modules[i:]


#: What the virtio-iommu guest's kernel must have been built with: the driver,
#: and on x86 the ACPI VIOT table, the only way the guest learns which PCI
#: devices sit behind a virtio-iommu-pci (QEMU writes it; there is no device
#: tree).  Debian 12's 6.1 kernel has neither ("# CONFIG_VIRTIO_IOMMU is not
#: set"); its backports kernel (6.12) has both, the driver as a module.
VIRTIO_IOMMU_CONFIG: tuple[str, ...] = ("CONFIG_VIRTIO_IOMMU", "CONFIG_ACPI_VIOT")

#: Bump when the build recipe changes in a way the hashed inputs do not show.
BUILD_FORMAT = 1

_HERE = Path(__file__).resolve().parent
CHECKER_SOURCE = _HERE / "checker.c"
NETCHECK_SOURCE = _HERE / "netcheck.c"
#: The guest's own static programs: /<name> in the initramfs, from <source>.
GUEST_PROGRAMS = {"checker": CHECKER_SOURCE, "netcheck": NETCHECK_SOURCE}
INIT_SOURCE = _HERE / "init.sh"
#: Included by the guest programs (their shared failure marker).
GUEST_HEADERS = (_HERE / "marker.h",)
_KERNEL_META = "linux-image-amd64"

Log = Callable[[str], None]


class GuestImageError(RuntimeError):
    """The guest image could not be built; the message says what to do."""


class KernelUnavailable(GuestImageError):
    """apt knows no kernel package of the kind asked for (the virtio-iommu guest's needs the
    release's backports suite in apt's sources, which scripts/setup adds)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str


def default_cache_dir() -> Path:
    """``$FASTSHADOW_CACHE``, else ``$XDG_CACHE_HOME/fastshadow``, else ``~/.cache/fastshadow``."""
    if os.environ.get("FASTSHADOW_CACHE"):
        return Path(os.environ["FASTSHADOW_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fastshadow"
    return Path.home() / ".cache" / "fastshadow"


# --------------------------------------------------------------- utilities


def _run(argv: list[str], what: str, *, cwd: Path | None = None, hint: str = "",
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise GuestImageError(f"{what}: `{argv[0]}` not found. {hint}".strip()) from None
    except subprocess.TimeoutExpired:
        raise GuestImageError(f"{what}: `{' '.join(argv)}` timed out after {timeout}s") from None
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise GuestImageError(
            f"{what}: `{' '.join(argv)}` exited with {proc.returncode}:\n{out}\n{hint}".rstrip())
    return proc


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _elf_is_static(path: Path) -> bool:
    """True if the ELF executable has no PT_INTERP (i.e. needs no dynamic loader)."""
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", hdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


# -------------------------------------------------------------------- kernel


#: The exact image package in the meta package's Depends, e.g. "linux-image-6.1.0-56-amd64
#: (= 6.1.192-2)" or, from backports, "linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)".
_IMAGE_DEPENDS = re.compile(r"^Depends:.*?\b(linux-image-\d[^\s,|()]*-amd64)\s*\(=\s*([^)\s]+)\)", re.M)


def parse_kernel_depends(show: str) -> tuple[str, str] | None:
    """(package, version) of the kernel image an `apt-cache show linux-image-amd64` stanza pins."""
    m = _IMAGE_DEPENDS.search(show)
    return (m.group(1), m.group(2)) if m else None


def _apt_kernel_package(release: str | None = None) -> tuple[str, str]:
    """(package name, version) of the kernel image ``linux-image-amd64`` points to: the
    candidate apt would install, or with `release` the one from that suite (``apt-cache -t``)."""
    target = ["-t", release] if release else []
    # The meta package pins the exact image: "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
    show = _run(["apt-cache", *target, "show", "--no-all-versions", _KERNEL_META],
                "looking up the kernel package", timeout=120).stdout
    found = parse_kernel_depends(show)
    if found and release and not _is_backport(found[1]):
        # A suite in the sources whose index apt has not fetched yet: -t falls back quietly.
        raise GuestImageError(f"apt has no index of {release} yet (its candidate {found[0]} {found[1]} "
                              f"is the release's own)")
    if found:
        return found
    if release:
        raise GuestImageError(f"`apt-cache -t {release} show {_KERNEL_META}` names no linux-image-*-amd64:\n{show}")
    # Otherwise ask `apt-cache depends` for the name and look its version up.
    out = _run(["apt-cache", "depends", _KERNEL_META], "looking up the kernel package",
               timeout=120).stdout
    m = re.search(r"^\s*Depends:\s*(linux-image-\d+\.\d+\.\d+-\d+-amd64)\s*$", out, re.M)
    if not m:
        raise GuestImageError(f"`apt-cache depends {_KERNEL_META}` names no linux-image-*-amd64:\n{out}")
    name = m.group(1)
    show = _run(["apt-cache", "show", "--no-all-versions", name], f"looking up {name}",
                timeout=120).stdout
    v = re.search(r"^Version:\s*(\S+)", show, re.M)
    if not v:
        raise GuestImageError(f"`apt-cache show {name}` gives no version")
    return name, v.group(1)


def backports_release() -> str:
    """The host release's backports suite (Debian 12: bookworm-backports), where the
    virtio-iommu guest's kernel comes from."""
    codename = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if not codename:
        raise KernelUnavailable("the guest kernel of this release is built without CONFIG_VIRTIO_IOMMU, "
                                "and /etc/os-release has no VERSION_CODENAME to name the backports "
                                "suite of one built with it")
    return f"{codename}-backports"


def _apt_knows_release(release: str) -> bool:
    out = _run(["apt-get", "indextargets", "--format", "$(RELEASE)"], "listing apt's suites",
               timeout=120).stdout
    return release in out.split()


def _is_backport(version: str) -> bool:
    return "~bpo" in version


def _resolve_kernel(debs: Path, log: Log, release: str | None = None) -> tuple[str, str]:
    if release and not _apt_knows_release(release):
        # apt-cache -t with an unknown suite quietly answers with the default candidate.
        raise KernelUnavailable(
            f"the guest kernel (Debian's {_KERNEL_META} of this release) is built without "
            f"CONFIG_VIRTIO_IOMMU and CONFIG_ACPI_VIOT, and apt knows no {release} suite to take "
            f"one built with them from: run scripts/setup as root (it adds {release} to apt's sources)")
    try:
        return _apt_kernel_package(release)
    except GuestImageError as first:
        log(f"fastshadow guest: kernel lookup failed ({first}); running apt-get update")
        try:
            _run(["apt-get", "update"], "apt-get update", timeout=600)
            return _apt_kernel_package(release)
        except GuestImageError as second:
            # The cache holds both kinds of kernel: only the one of the kind asked for will do.
            cached = sorted((p for p in debs.glob("linux-image-*-amd64_*.deb")
                             if _is_backport(p.name) == bool(release)),
                            key=lambda p: p.stat().st_mtime)
            if cached:
                name, version = cached[-1].name.split("_")[:2]
                log(f"fastshadow guest: apt unavailable, using cached {cached[-1].name}")
                return name, version.replace("%3a", ":")
            raise GuestImageError(
                "cannot determine the guest kernel package: "
                f"{second}\nCheck that the Debian mirror is reachable (apt-get update) "
                f"and that `apt-cache depends {_KERNEL_META}` works.") from None


def _kernel_config_lacks(config: Path, options: Iterable[str]) -> list[str]:
    """The options of `options` the kernel's boot/config-* does not set (=y or =m)."""
    text = config.read_text(errors="replace") if config.exists() else ""
    return [o for o in options if not re.search(rf"^{o}=[ym]$", text, re.M)]


def _deb_filename(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_amd64.deb"


def _fetch_deb(name: str, version: str, debs: Path, log: Log) -> Path:
    target = debs / _deb_filename(name, version)
    if target.exists():
        return target
    debs.mkdir(parents=True, exist_ok=True)
    local = Path("/var/cache/apt/archives") / target.name
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=debs))
    try:
        if local.exists():
            log(f"fastshadow guest: using {local}")
            shutil.copyfile(local, tmp / target.name)
        else:
            log(f"fastshadow guest: apt-get download {name}={version}")
            # apt drops privileges to _apt for downloads; let it write here.
            os.chmod(tmp, 0o777)
            _run(["apt-get", "download", f"{name}={version}"], f"downloading {name}", cwd=tmp,
                 hint="The guest kernel comes from the Debian mirror: check apt sources and "
                      "network, or run `apt-get update`.")
        got = list(tmp.glob(f"{name}_*.deb"))
        if len(got) != 1:
            raise GuestImageError(f"apt-get download {name} produced {[p.name for p in got]}")
        os.replace(got[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {module name: (relative path, [relative paths of dependencies])}."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path.strip(), rest.split())
    return deps


def _module_name(path: str) -> str:
    base = os.path.basename(path.strip())
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressing .ko.xz/.gz/.zst (busybox insmod wants plain ELF)."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        try:
            return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise GuestImageError(f"cannot decompress {name} ({e}): apt-get install zstd") from None
    return path.read_bytes()


def _modinfo_depends(elf: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo section (fallback without modules.dep)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if elf[stroff + name:].split(b"\0", 1)[0] == b".modinfo":
            for field in elf[off:off + size].split(b"\0"):
                if field.startswith(b"depends="):
                    return [d for d in field[8:].decode().split(",") if d]
    return []


def _module_table(moddir: Path, version: str, root: Path,
                  log: Log) -> tuple[dict[str, tuple[str, list[str]]], bool]:
    """{module name: (path relative to moddir, dependency paths)} and whether the
    dependencies still have to be read from each module's .modinfo."""
    dep = moddir / "modules.dep"
    if not dep.exists() and shutil.which("depmod") and moddir == root / "lib" / "modules" / version:
        # Debian's package ships no modules.dep (its postinst runs depmod): do
        # the same on the unpacked tree.
        try:
            _run(["depmod", "-b", str(root), version], "depmod")
        except GuestImageError as e:
            log(f"fastshadow guest: {e}; reading .modinfo instead")
    if dep.exists():
        return _parse_modules_dep(dep.read_text()), False
    return {_module_name(str(p)): (str(p.relative_to(moddir)), [])
            for p in moddir.rglob("*.ko*")}, True


def _module_order(wanted: Iterable[str], table: dict[str, tuple[str, list[str]]], lazy: bool,
                  moddir: Path, builtin: set[str]) -> list[tuple[str, Path]]:
    """Closure of `wanted` over dependencies, dependencies first (stable)."""
    order: list[tuple[str, Path]] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def deps_of(name: str) -> list[str]:
        rel, deps = table[name]
        if lazy:
            return [d.replace("-", "_") for d in _modinfo_depends(_read_module(moddir / rel))]
        return [_module_name(d) for d in deps]

    def visit(name: str) -> None:
        if state.get(name) == 2 or name in builtin:
            return
        if state.get(name) == 1:
            raise GuestImageError(f"module dependency cycle through {name}")
        if name not in table:
            raise GuestImageError(f"kernel module {name} is not in the kernel package")
        state[name] = 1
        for dep in deps_of(name):
            visit(dep)
        state[name] = 2
        order.append((name, moddir / table[name][0]))

    for name in wanted:
        visit(name)
    return order


# ----------------------------------------------------------------- initramfs


class _Cpio:
    """Writer for the ``newc`` cpio format the kernel unpacks (same as ``cpio -H newc``).

    Written in Python so device nodes and ownership need no root and the
    archive is byte-for-byte reproducible.
    """

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + name_b)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def compile_checker(output: Path, *, static: bool = True, cc: str = "gcc",
                    extra_flags: Iterable[str] = (), source: Path = CHECKER_SOURCE) -> Path:
    """Compile a guest program (checker.c by default) to `output` (static by
    default, as shipped in the guest)."""
    output = Path(output)
    argv = [cc, "-O2", "-Wall", "-Wextra", *(["-static"] if static else []), *extra_flags,
            "-o", str(output), str(source)]
    _run(argv, f"compiling the guest program {Path(source).name}",
         hint="Needs gcc and the static C library (Debian: apt-get install gcc libc6-dev).")
    return output


def _find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if cand and Path(cand).is_file() and _elf_is_static(Path(cand)):
            return Path(cand).resolve()
    raise GuestImageError("no statically linked busybox found: apt-get install busybox-static")


def _build_initramfs(busybox: Path, programs: dict[str, Path], modules: list[tuple[str, Path]]) -> bytes:
    cpio = _Cpio()
    for d in (".", "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
              "run", "mnt", "etc", "root", "lib", "lib/modules"):
        cpio.dir(d)
    # The kernel opens /dev/console for init before anything is mounted.
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for path in sorted(set(applets)):
        if path and path != "bin/busybox" and path.count("/") in (1, 2):
            cpio.symlink(path, "/bin/busybox")
    cpio.file("init", INIT_SOURCE.read_bytes(), 0o755)
    for name, path in programs.items():
        cpio.file(name, path.read_bytes(), 0o755)
    for name, path in modules:
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
    cpio.file("lib/modules/order", "".join(f"{name}\n" for name, _ in modules).encode())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------- build


def _image_key(name: str, version: str, busybox: Path, modules: Iterable[str] = GUEST_MODULES) -> str:
    h = hashlib.sha256()
    for part in (f"format={BUILD_FORMAT}", f"kernel={name}={version}", f"busybox={busybox}",
                 f"busybox-sha={_sha256_file(busybox)}", f"modules={','.join(modules)}"):
        h.update(part.encode() + b"\n")
    for src in (*GUEST_PROGRAMS.values(), *GUEST_HEADERS, INIT_SOURCE):
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _load(final: Path) -> GuestImage | None:
    manifest = final / "manifest.json"
    if not manifest.exists():
        return None
    meta = json.loads(manifest.read_text())
    image = GuestImage(kernel=final / "vmlinuz", initrd=final / "initrd.img",
                       kernel_version=meta["kernel_version"])
    if image.kernel.exists() and image.initrd.exists():
        return image
    return None


def build_guest_image(cache_dir: Path | str | None = None, log: Log = print, *,
                      virtio_iommu: bool = False) -> GuestImage:
    """Return the cached guest image, building it first if any input changed.

    virtio_iommu: the guest for ``GuestVM(viommu="virtio")``: the backports kernel
    (``VIRTIO_IOMMU_CONFIG``) and the ``virtio_iommu`` module; a separate image.

    Raises :class:`GuestImageError` with an actionable message when a tool or
    package is missing or a step fails (:class:`KernelUnavailable` when apt
    knows no such kernel).
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "guest"
    root.mkdir(parents=True, exist_ok=True)
    debs = root / "debs"
    busybox = _find_busybox()
    release = backports_release() if virtio_iommu else None
    wanted = with_virtio_iommu(GUEST_MODULES) if virtio_iommu else GUEST_MODULES
    name, version = _resolve_kernel(debs, log, release)
    key = _image_key(name, version, busybox, wanted)
    final = root / f"image-{key}"
    image = _load(final)
    if image:
        return image

    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # serialise builders; the loser finds the image
        image = _load(final)
        if image:
            return image
        # Leftovers of interrupted builds (we hold the lock, so nobody owns them).
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        log(f"fastshadow guest: building image {final.name} ({name} {version})")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            deb = _fetch_deb(name, version, debs, log)
            unpacked = tmp / "unpacked"
            _run(["dpkg", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}",
                 hint="Needs dpkg (Debian/Ubuntu host).")
            kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
            if len(kernels) != 1:
                raise GuestImageError(f"{deb.name}: expected one boot/vmlinuz-*, found {kernels}")
            kver = kernels[0].name[len("vmlinuz-"):]
            moddir = next((d for d in (unpacked / "lib/modules" / kver,
                                       unpacked / "usr/lib/modules" / kver) if d.is_dir()), None)
            if moddir is None:
                raise GuestImageError(f"{deb.name}: no lib/modules/{kver}")
            if virtio_iommu:
                lacks = _kernel_config_lacks(unpacked / "boot" / f"config-{kver}", VIRTIO_IOMMU_CONFIG)
                if lacks:
                    raise GuestImageError(f"{deb.name} ({release}) is built without {', '.join(lacks)}: "
                                          f"its guest cannot use a virtio-iommu")
            builtin_file = moddir / "modules.builtin"
            builtin = ({_module_name(p) for p in builtin_file.read_text().split()}
                       if builtin_file.exists() else set())
            table, lazy = _module_table(moddir, kver, unpacked, log)
            modules = _module_order(wanted, table, lazy, moddir, builtin)
            log("fastshadow guest: modules (load order): " + " ".join(n for n, _ in modules))

            programs = {name: compile_checker(tmp / name, source=src) for name, src in GUEST_PROGRAMS.items()}
            initrd = _build_initramfs(busybox, programs, modules)

            out = tmp / "image"
            out.mkdir()
            shutil.copyfile(kernels[0], out / "vmlinuz")
            (out / "initrd.img").write_bytes(initrd)
            (out / "manifest.json").write_text(json.dumps({
                "kernel_package": name, "kernel_package_version": version,
                "kernel_version": kver, "busybox": str(busybox),
                "modules": [n for n, _ in modules], "format": BUILD_FORMAT,
            }, indent=2) + "\n")
            # The atomic step: the image appears complete or not at all.
            os.rename(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"fastshadow guest: built {final} in {time.monotonic() - t0:.1f}s "
            f"(initrd {len(initrd) // 1024} KiB)")
    image = _load(final)
    assert image is not None
    return image
