"""The fastshadow test guest: image builder, QEMU runner and storage-daemon helper.

* :func:`build_guest_image` builds (once, cached) a Debian kernel + busybox
  initramfs whose ``/init`` runs the project's data checker on a virtio disk;
* :class:`GuestVM` / :func:`run_check` boot it in QEMU (TCG) and parse the
  console markers;
* :class:`StorageDaemon` starts ``qemu-storage-daemon`` as a vhost-user-blk
  backend.
"""

from .image import (
    GuestImage,
    GuestImageError,
    KernelUnavailable,
    build_guest_image,
    compile_checker,
    default_cache_dir,
)
from .qemu import (
    BootResult,
    CheckLine,
    CheckResult,
    GuestError,
    GuestExited,
    GuestPanic,
    GuestTimeout,
    GuestVM,
    QemuNotFound,
    parse_console,
    run_check,
)
from .qsd import StorageDaemon, StorageDaemonError

__all__ = [
    "BootResult",
    "CheckLine",
    "CheckResult",
    "GuestError",
    "GuestExited",
    "GuestImage",
    "GuestImageError",
    "GuestPanic",
    "GuestTimeout",
    "GuestVM",
    "KernelUnavailable",
    "QemuNotFound",
    "StorageDaemon",
    "StorageDaemonError",
    "build_guest_image",
    "compile_checker",
    "default_cache_dir",
    "parse_console",
    "run_check",
]
