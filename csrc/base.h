/*
 * base.h: what every module of the data plane uses: the public types
 * (fsdp.h), the C basics, the page size.
 *
 * Nothing here is visible to Python.  Two kinds of memory appear in the
 * data plane and must never be confused:
 *   - SHARED memory: guest RAM (guest rings and buffers; the guest may rewrite
 *     any byte at any time) and the shadow region (the backend may rewrite any
 *     byte at any time).  It is only touched through the vr_* accessors of
 *     vring.h, each of which performs exactly one load or store.
 *   - PRIVATE memory: everything allocated with malloc.  All bookkeeping of a
 *     request (its guest head, its validated segments, its bounce offsets,
 *     its writable size) lives here and only here.
 *
 * Layering (csrc/README.md, "Layers"): a header includes only headers of
 * lower layers, so that a file's #include "..." lines are its arrows.
 */
#ifndef FSDP_BASE_H
#define FSDP_BASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fsdp.h"

#define FSDP_PAGE 4096u
#define FSDP_ALIGN_UP(x, a) (((x) + ((a) - 1)) / (a) * (a))

#endif
