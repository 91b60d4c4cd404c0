"""cffi build script for fastshadow's C data plane (fastshadow._dataplane).

Lives outside the installed package, as in pyca/cryptography: the public
header ``csrc/fsdp.h`` is the single source of the cdef (preprocessor lines
are stripped before cffi sees it), and every ``csrc/*.c`` file is compiled
into the one extension, linked against Debian's liburing.
"""

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "fsdp.h"


def cdef_text() -> str:
    """The public header without preprocessor lines and C-only sections."""
    text = HEADER.read_text()
    # Anything between FSDP_C_ONLY_BEGIN/END markers is for C callers only.
    text = re.sub(r"/\* FSDP_C_ONLY_BEGIN \*/.*?/\* FSDP_C_ONLY_END \*/", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def sources() -> list[str]:
    return sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))


#: FASTSHADOW_NO_PROBES=1 compiles the USDT probes out (csrc/probes.h): only for measuring what an
#: unattached probe costs (csrc/bench/hist_instructions.py --probes); a normal build always has them.
DEFINES = [("FSDP_NO_PROBES", "1")] if os.environ.get("FASTSHADOW_NO_PROBES") == "1" else []

ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "fastshadow._dataplane",
    '#include "fsdp.h"\n',
    sources=sources(),
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    libraries=["uring", "pthread"],
    define_macros=DEFINES,
    extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fno-strict-aliasing"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
