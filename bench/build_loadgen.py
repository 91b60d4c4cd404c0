"""cffi build script for the benchmark's driver emulation (fastshadow.bench._loadgen).

Same convention as csrc/build_ffi.py: the public header ``bench/loadgen.h``
is the cdef once its preprocessor lines are stripped.  No liburing: the
driver waits with poll() on its call eventfds (see loadgen.c).
"""

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "loadgen.h"


def cdef_text() -> str:
    lines = [ln for ln in HEADER.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "fastshadow.bench._loadgen",
    '#include "loadgen.h"\n',
    sources=[str((HERE / "loadgen.c").relative_to(HERE.parent))],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
