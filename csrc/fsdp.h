/*
 * fsdp.h: the public interface of fastshadow's C data plane.
 *
 * This header is also the cffi cdef (csrc/build_ffi.py strips preprocessor
 * lines), so it holds plain declarations only: fixed-width types, structs,
 * enums, prototypes.  Functions return 0 or a negative errno; the Python
 * layer (fastshadow/dataplane.py) turns those into exceptions.
 */
#ifndef FSDP_H
#define FSDP_H
/* FSDP_C_ONLY_BEGIN */
#include <stdint.h>
#include <stddef.h>
/* FSDP_C_ONLY_END */

/* Bumped whenever this interface changes; checked at import. */
#define FSDP_ABI_VERSION 1
int fsdp_abi_version(void);

#endif
