/*
 * chain.h: the guest chain walker and validator (chain.c).
 */
#ifndef FSDP_CHAIN_H
#define FSDP_CHAIN_H

#include "mem.h"

struct fsdp_seg {
    uint64_t gpa;
    uint32_t len;
    uint16_t flags;         /* VRING_DESC_F_WRITE only */
    bool bad;               /* [gpa, gpa + len) not (all) mapped, or wraps: never touched */
};

struct fsdp_chain {
    uint32_t n;             /* segments (also on refusal: those walked) */
    uint32_t steps;         /* descriptors read (cost, for the per-pass budget) */
    uint64_t readable;      /* bytes */
    uint64_t writable;
    /* The walk reached the end of the chain: segs[0..n) is the whole chain,
     * structurally sound, even if it is refused (a bad buffer, a 0-length
     * descriptor, the order, the size).  The device's error can then be
     * placed in it (fail.c); an incomplete walk (loop, bad next, bad
     * indirect) completes with len 0. */
    bool complete;
    /* The indirect table the chain went through (its guest address and
     * length; ind_len 0: none). */
    uint64_t ind_addr;
    uint32_t ind_len;
    /* on refusal */
    uint32_t err;           /* event code */
    uint64_t err_a, err_b;
};

/* Walk and validate the chain at head (< num).  table points at the guest
 * descriptor table (shared); segs has room for num entries; ind is private
 * scratch of 16*num bytes for indirect tables.  Returns 0 or an event code
 * (out->err); see out->complete. */
int chain_walk(struct fsdp_mem *m, const uint8_t *table, uint32_t num, uint16_t head,
               uint64_t max_bytes, struct fsdp_seg *segs, uint8_t *ind,
               struct fsdp_chain *out);

#endif
