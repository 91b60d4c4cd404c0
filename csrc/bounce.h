/*
 * bounce.h: the bounce-space allocator of one queue (bounce.c): pages of the
 * queue's bounce area, and the layout of a request's segments in a slab.
 */
#ifndef FSDP_BOUNCE_H
#define FSDP_BOUNCE_H

#include "chain.h"

/* Freed runs of up to BOUNCE_CACHE_SIZES pages are kept per size, last freed
 * first out (bounce.c), up to BOUNCE_CACHE_DEPTH of each size. */
#define BOUNCE_CACHE_SIZES 16u
#define BOUNCE_CACHE_DEPTH 256u

struct fsdp_bounce {
    uint32_t npages;
    uint32_t nfree;         /* free pages, cached runs included */
    uint32_t cursor;        /* next-fit start */
    uint64_t *bitmap;       /* 1 = used or cached */
    uint32_t cached;        /* pages held in the per-size caches */
    uint32_t *cache;        /* [size - 1][BOUNCE_CACHE_DEPTH]: first pages, LIFO */
    uint16_t ncache[BOUNCE_CACHE_SIZES];
};

int bounce_init(struct fsdp_bounce *b, uint32_t npages);
void bounce_destroy(struct fsdp_bounce *b);
void bounce_reset(struct fsdp_bounce *b);
/* The bitmap paths of the two below (bounce.c). */
int64_t bounce_alloc_run(struct fsdp_bounce *b, uint32_t n);
void bounce_free_run(struct fsdp_bounce *b, uint32_t first, uint32_t n);

/* First page of a free run of n pages, or -1.  Inline: the run freed last of
 * that size when there is one (bounce.c, "Hot reuse"), the bitmap else. */
static inline int64_t bounce_alloc(struct fsdp_bounce *b, uint32_t n)
{
    uint32_t s = n - 1;

    if (n && n <= b->nfree && s < BOUNCE_CACHE_SIZES && b->ncache[s]) {
        b->cached -= n;
        b->nfree -= n;     /* still marked used in the bitmap */
        return b->cache[s * BOUNCE_CACHE_DEPTH + --b->ncache[s]];
    }
    return bounce_alloc_run(b, n);
}

/* Give back [first, first + n): kept for reuse when small, to the bitmap else. */
static inline void bounce_free(struct fsdp_bounce *b, uint32_t first, uint32_t n)
{
    uint32_t s = n - 1;

    if (n && first < b->npages && n <= b->npages - first && s < BOUNCE_CACHE_SIZES &&
        b->ncache[s] < BOUNCE_CACHE_DEPTH) {
        b->cache[s * BOUNCE_CACHE_DEPTH + b->ncache[s]++] = first;
        b->cached += n;
        b->nfree += n;
        return;
    }
    bounce_free_run(b, first, n);
}

/* Layout of a request's segments inside a slab: small buffers (<= 64 B)
 * packed at 64-B alignment first, then larger ones each page aligned
 * (compact: all at 64 B).  Returns the slab size in bytes and fills offs[i]
 * (offset of segment i inside the slab). */
uint64_t bounce_layout(const struct fsdp_seg *segs, uint32_t n, uint64_t *offs, bool compact);

#endif
