/*
 * hist.h: the data plane's own latency histograms, always on (hist.c).
 *
 * Per queue, one log2 histogram of microseconds per hop (enum FSDP_HOP_* in
 * fsdp.h), kept by the loop thread with CLOCK_MONOTONIC read through the
 * vDSO, and read by the control plane with fsdp_queue_hist (a command, like
 * the counters).  No tracer, no root, no kernel headers.
 *
 * The clock.  Measured here (csrc/bench/clock_cost.c, kernel 6.18,
 * clocksource tsc): clock_gettime(CLOCK_MONOTONIC) 30 ns per read, rdtsc
 * 12 ns, rdtscp 24 ns, CLOCK_MONOTONIC_COARSE 11 ns but 4 ms granular.
 * CLOCK_MONOTONIC is chosen: it is nanoseconds already (rdtsc needs a
 * calibration, and a migrated VM's TSC may change rate), it is the clock of
 * bpf_ktime_get_ns and of the load generator, and at the rate below its
 * extra 18 ns per read is noise: stamps are taken once per batch, never per
 * request:
 *   - once per drain of io_uring completions that holds a kick or a call
 *     (the loop's wake-up time: every kick and call of that drain has it);
 *   - at most once per queue pass for requests found without a kick or a
 *     call of their own (busy-poll, or a kick the guest suppressed);
 *   - once per HIST_PEND requests and at the end of every pass that moved
 *     a request (the time the requests of the pass were handed on).
 *
 * Which moments: a request STARTS when the guest kick that announced it was
 * seen (or, if none did, when the pass that found it began: the proxy
 * cannot know when the guest published it), is SHADOWED when the pass that
 * copied it ends, is SEEN back when the backend call that announced its
 * completion was seen (or the pass that found it began), and is USED when
 * the pass that wrote its guest used element ends.
 */
#ifndef FSDP_HIST_H
#define FSDP_HIST_H

#include <time.h>

#include "base.h"

enum { HIST_PEND = 64 };

/* A request of this pass waiting for the pass's end stamp. */
struct hist_pend {
    uint64_t start;         /* its start stamp */
    uint64_t *shadowed;     /* taken: where its shadowed stamp goes; NULL: completed */
    uint64_t shadowed_at;   /* completed and sampled (probes.h request_sampled): */
    uint32_t dev, q;        /* ... what the probe says of it */
    uint16_t head;
    bool sampled;
};

struct fsdp_qhist {
    struct fsdp_queue_hist pub;     /* the counts (fsdp.h) */
    bool on;                        /* false: keep nothing (--no-latency-histograms) */
    uint64_t kick_at;               /* first guest kick seen since the last pass, 0: none */
    uint64_t call_at;               /* first backend call seen since the last pass, 0: none */
    uint64_t pass_at;               /* this pass's begin stamp, 0: not read yet */
    uint64_t seen_at;               /* this pass's "seen back" stamp, 0: not decided yet */
    uint64_t throttled_at;          /* intake stalled since (back-pressure), 0: not stalled */
    uint32_t npend;
    struct hist_pend pend[HIST_PEND];
};

/* CLOCK_MONOTONIC in ns (vDSO: no system call). */
static inline uint64_t hist_clock(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The bucket of a duration: 0 below 1 us, s for [2^(s-1), 2^s) us.  The
 * ns -> us step is a division by 1000 (a multiply by the compiler), so the
 * buckets are true microseconds, not 1.024 us ones. */
static inline uint32_t hist_slot(uint64_t ns)
{
    uint64_t us = ns / 1000u;
    uint32_t s = us ? 64u - (uint32_t)__builtin_clzll(us) : 0u;

    return s < FSDP_HIST_SLOTS ? s : FSDP_HIST_SLOTS - 1u;
}

/* A guest kick / backend call completion seen at `now` (the drain's stamp). */
static inline void hist_kick(struct fsdp_qhist *h, uint64_t now)
{
    if (h->on && !h->kick_at)
        h->kick_at = now;
}

static inline void hist_call(struct fsdp_qhist *h, uint64_t now)
{
    if (h->on && !h->call_at)
        h->call_at = now;
}

/* A request was taken from the guest ring: *start and (at the pass's end)
 * *shadowed get its stamps, private memory of the request's record. */
void hist_taken(struct fsdp_qhist *h, uint64_t *start, uint64_t *shadowed);
/* A request the backend completed was written to the guest used ring.  `seq`
 * (its publish order), dev, q and head: for the request_sampled probe. */
void hist_completed(struct fsdp_qhist *h, uint64_t start, uint64_t shadowed, uint64_t seq,
                    uint32_t dev, uint32_t q, uint16_t head);
/* The pass of this queue ends (before publishing): stamps the requests of
 * the pass; the kick and call it consumed are forgotten (a kick is kept
 * while intake is stalled: its requests are still waiting). */
void hist_pass_end(struct fsdp_qhist *h, bool throttled);
/* Intake stalls / resumes (back-pressure); returns the ns of a stall that ended. */
void hist_throttle_begin(struct fsdp_qhist *h);
uint64_t hist_throttle_end(struct fsdp_qhist *h);
/* Back-pressure time of a stall still going on (for a stats read), ns. */
uint64_t hist_throttle_now(const struct fsdp_qhist *h);

#endif
