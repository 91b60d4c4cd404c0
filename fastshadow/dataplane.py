"""The Python face of the C data plane (csrc/, built by cffi as fastshadow._dataplane)."""

from __future__ import annotations

from ._dataplane import ffi, lib  # noqa: F401  (re-exported for callers)

#: Must match FSDP_ABI_VERSION in csrc/fsdp.h; a stale build fails loudly here.
ABI_VERSION = 1

if lib.fsdp_abi_version() != ABI_VERSION:  # pragma: no cover - build mismatch
    raise ImportError(
        f"fastshadow._dataplane ABI {lib.fsdp_abi_version()} != {ABI_VERSION}: "
        "rebuild with `pip install -e .`"
    )
