/*
 * fail.h: the device's error for a refused or failed request (fail.c):
 * where it goes in the request's buffers and what it says.
 */
#ifndef FSDP_FAIL_H
#define FSDP_FAIL_H

#include "chain.h"
#include "mem.h"

/* The largest error any device writes (fuse_out_header). */
#define FAIL_MAX_BYTES 16u

/* One piece of the error: bytes[off, off + len) of the plan go to gpa. */
struct fail_piece {
    uint64_t gpa;
    uint32_t off, len;
};

/* What to write (private memory; the caller writes it, logs it). */
struct fail_plan {
    uint32_t used_len;      /* the completion's used.len; 0: nothing to write */
    uint32_t n;             /* pieces */
    struct fail_piece piece[FAIL_MAX_BYTES];
    uint8_t bytes[FAIL_MAX_BYTES];
};

/* The error of kind (FSDP_FAIL_*) for the request whose segments are
 * segs[0..n) (validated by the walker, possibly refused for a bad part).
 * Every piece lies inside a device-writable segment that is not bad and is
 * mapped in m now; readable bytes it needs (fuse unique) are read once into
 * private memory from a readable segment likewise checked.  If the place
 * cannot be found safely the plan is len 0, nothing written.  Returns
 * out->used_len. */
uint32_t fail_plan(struct fsdp_mem *m, uint32_t kind, const struct fsdp_seg *segs, uint32_t n,
                   struct fail_plan *out);

#endif
