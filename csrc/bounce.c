/*
 * bounce.c: the bounce-space allocator of one queue.
 *
 * Owns: the page allocator (struct fsdp_bounce) and the slab layout.
 * Calls: chain (struct fsdp_seg), base.
 *
 * The queue's bounce area is cut into 4 KiB pages tracked by a bitmap
 * (1 = used).  A request takes one contiguous run of pages (its slab) found
 * next-fit from a rotating cursor, so consecutive requests tend to sit next
 * to each other and the search rarely rescans busy space; frees happen in
 * any order.  Inside a slab, buffers of at most 64 bytes (virtio-blk
 * headers, status bytes) are packed at 64-byte alignment at the start and
 * larger buffers each start on a page, so an O_DIRECT backend can use them
 * without a bounce of its own.  All of this state is private: the backend can scribble over the
 * bounce bytes but never over where we think they are.
 *
 * Hot reuse.  A freed run of at most BOUNCE_CACHE_SIZES pages is not given
 * back to the bitmap but pushed on a per-size stack, and the next request of
 * that size pops the run freed last.  Steady small I/O (a 4 KiB blk read is
 * a 2-page slab) then cycles through as many slabs as it has requests in
 * flight, which stay in the CPU's cache, where next-fit walked the whole
 * area (16 MiB by default) and every copy into the bounce area missed down
 * to memory (bench/RESULTS.md: 75 -> 4 L2 misses per 4 KiB request, with
 * no bitmap work at all).  Cached pages stay marked used in the bitmap and
 * counted free in nfree; when the bitmap has no run left, the caches are
 * given back to it and the search runs again, so caching never refuses an
 * allocation the bitmap alone would have served.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bounce.h"
#include "base.h"
#include "chain.h"

int bounce_init(struct fsdp_bounce *b, uint32_t npages)
{
    size_t words = (npages + 63u) / 64u;

    memset(b, 0, sizeof(*b));
    b->bitmap = calloc(words ? words : 1, sizeof(uint64_t));
    b->cache = calloc(BOUNCE_CACHE_SIZES * BOUNCE_CACHE_DEPTH, sizeof(uint32_t));
    if (!b->bitmap || !b->cache) {
        bounce_destroy(b);
        return -ENOMEM;
    }
    b->npages = npages;
    bounce_reset(b);
    return 0;
}

void bounce_destroy(struct fsdp_bounce *b)
{
    free(b->bitmap);
    free(b->cache);
    memset(b, 0, sizeof(*b));
}

void bounce_reset(struct fsdp_bounce *b)
{
    memset(b->bitmap, 0, (b->npages + 63u) / 64u * sizeof(uint64_t));
    b->nfree = b->npages;
    b->cursor = 0;
    b->cached = 0;
    memset(b->ncache, 0, sizeof(b->ncache));
}

static inline bool page_used(const struct fsdp_bounce *b, uint32_t i)
{
    return (b->bitmap[i / 64u] >> (i % 64u)) & 1u;
}

/* First page of a run of n free pages inside [from, to), or -1. */
static int64_t find_run(const struct fsdp_bounce *b, uint32_t from, uint32_t to, uint32_t n)
{
    uint32_t run = 0, start = from;
    uint32_t i = from;

    while (i < to) {
        uint64_t w = b->bitmap[i / 64u];
        if (i % 64u == 0 && to - i >= 64u) {
            if (w == ~0ull) {           /* whole word busy: skip it */
                run = 0;
                i += 64u;
                continue;
            }
            if (w == 0) {               /* whole word free */
                if (run == 0)
                    start = i;
                run += 64u;
                i += 64u;
                if (run >= n)
                    return start;
                continue;
            }
        }
        if ((w >> (i % 64u)) & 1u) {
            run = 0;
        } else {
            if (run == 0)
                start = i;
            if (++run >= n)
                return start;
        }
        i++;
    }
    return -1;
}

static void mark(struct fsdp_bounce *b, uint32_t first, uint32_t n, bool used)
{
    /* A word at a time: the bits of [first, first + n) within each word. */
    while (n) {
        uint32_t bit = first % 64u, take = 64u - bit < n ? 64u - bit : n;
        uint64_t m = (take == 64u ? ~0ull : ((1ull << take) - 1)) << bit;
        if (used)
            b->bitmap[first / 64u] |= m;
        else
            b->bitmap[first / 64u] &= ~m;
        first += take;
        n -= take;
    }
}

/* Give every cached run back to the bitmap (it found no run without them). */
static void uncache_all(struct fsdp_bounce *b)
{
    for (uint32_t s = 0; s < BOUNCE_CACHE_SIZES; s++) {
        for (uint32_t i = 0; i < b->ncache[s]; i++)
            mark(b, b->cache[s * BOUNCE_CACHE_DEPTH + i], s + 1, false);
        b->ncache[s] = 0;
    }
    b->cached = 0;
}

/* bounce_alloc without a kept run of that size (the pops are inline, bounce.h). */
int64_t bounce_alloc_run(struct fsdp_bounce *b, uint32_t n)
{
    int64_t r;

    if (n == 0 || n > b->nfree)
        return -1;
    r = find_run(b, b->cursor, b->npages, n);
    if (r < 0)
        r = find_run(b, 0, b->npages, n);
    if (r < 0 && b->cached) {
        uncache_all(b);
        r = find_run(b, 0, b->npages, n);
    }
    if (r < 0)
        return -1;
    mark(b, (uint32_t)r, n, true);
    b->nfree -= n;
    b->cursor = (uint32_t)r + n;
    if (b->cursor >= b->npages)
        b->cursor = 0;
    return r;
}

/* bounce_free of a run not kept for reuse (the pushes are inline, bounce.h). */
void bounce_free_run(struct fsdp_bounce *b, uint32_t first, uint32_t n)
{
    if (n == 0 || first >= b->npages || n > b->npages - first)
        return;   /* private bookkeeping is never wrong; be defensive anyway */
    mark(b, first, n, false);
    b->nfree += n;
}

uint64_t bounce_layout(const struct fsdp_seg *segs, uint32_t n, uint64_t *offs, bool compact)
{
    uint64_t off = 0;

    if (compact) {
        /* Everything packed at 64 bytes: only for requests that would not
         * fit the pool otherwise. */
        for (uint32_t i = 0; i < n; i++) {
            off = FSDP_ALIGN_UP(off, 64u);
            offs[i] = off;
            off += segs[i].len;
        }
        return FSDP_ALIGN_UP(off, FSDP_PAGE);
    }
    /* Small buffers first, packed at 64 bytes (a blk header and status byte
     * share one page), then every larger buffer on its own page boundary.
     * Shadow descriptors keep the guest's order; only their offsets differ. */
    for (uint32_t i = 0; i < n; i++) {
        if (segs[i].len <= 64u) {
            offs[i] = off;
            off += 64u;
        }
    }
    off = FSDP_ALIGN_UP(off, FSDP_PAGE);
    for (uint32_t i = 0; i < n; i++) {
        if (segs[i].len > 64u) {
            offs[i] = off;
            off = FSDP_ALIGN_UP(off + segs[i].len, FSDP_PAGE);
        }
    }
    return off;
}
