/*
 * copy.c: the copy engine.
 *
 * Owns: copy_stream (copy_bytes, in copy.h, picks it or memcpy).
 * Calls: base only.
 *
 * Every request byte crosses between guest RAM and the bounce area exactly
 * once, on the data plane thread.  Two ways of copying, measured by
 * csrc/bench/copy_engines.c (2-vCPU AMD EPYC, random 1 GiB guest memfd):
 *
 *   - glibc memcpy: fastest when the destination is about to be read again
 *     by us or is already in cache, and for everything small;
 *   - streaming (non-temporal) stores: the destination lines are written
 *     without being read first (no read-for-ownership) and without evicting
 *     the cache.  Into cold guest memory this is about twice as fast as
 *     memcpy (1 MiB: 18.9 vs 8.4 GB/s; 64 KiB: 18.5 vs 8.8 GB/s), and the
 *     bounce area is cold by construction (the allocator's next-fit cursor
 *     walks all of it).  Through the whole proxy (bench, null-co, isolated)
 *     1 MiB writes went from 8-12 to 20-23 GB/s and 1 MiB reads from 4.0 to
 *     4.6-5.9 GB/s.  The cost: the next reader of the destination finds it
 *     in memory, not in cache, which is why small buffers stay on memcpy.
 *
 * io_uring reads/writes on the memfds (the kernel copies) lost everywhere
 * in the same measurement: ~3 us of fixed cost per copy (4 KiB: 1.1 vs
 * 6.5 GB/s) and 1.3-2x the CPU per GB for large copies, even with
 * IOSQE_ASYNC spreading them over io-wq workers.  So there is no io_uring
 * copy engine: a buffer is copied with memcpy, or with streaming stores when
 * it is at least fsdp_dp_config.stream_copy_min bytes (0: never), in both
 * directions (guest -> bounce at intake, bounce -> guest at completion).
 */
#include <stdint.h>
#include <string.h>

#include "copy.h"

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>

/* dst gets 16-byte aligned stores; src may be unaligned. */
void copy_stream(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    size_t head = (16u - ((uintptr_t)d & 15u)) & 15u;

    if (n < 64 + head) {
        memcpy(d, s, n);
        return;
    }
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s);
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    memcpy(d, s, n);
    /* Streaming stores are weakly ordered: fence them before the release
     * store of the used idx can make them visible to the guest. */
    _mm_sfence();
}
#else
void copy_stream(void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);   /* no streaming stores wired up for this architecture */
}
#endif
