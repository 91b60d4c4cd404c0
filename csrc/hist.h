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

enum { HIST_PEND = 64, HIST_SAMPLED = 8 };

/* A sampled request of this pass (probes.h request_sampled), until its used stamp. */
struct hist_sampled {
    uint64_t start, shadowed;
    uint32_t dev, q;
    uint16_t head;
};

/*
 * Per pass, every request TAKEN shares its start stamp (the kick seen
 * before the pass, or the pass's begin: both fixed during a pass) and its
 * shadowed stamp (the pass's end), and every request COMPLETED shares its
 * seen and used stamps: so kick_to_shadowed and call_to_used are one bucket
 * per pass, counted n times.  Only backend (its own shadowed stamp) and
 * end_to_end (its own start) are per request.  That is what keeps the
 * per-request cost to two folds and two stores (csrc/bench/hist_instructions.py).
 */
struct fsdp_qhist {
    struct fsdp_queue_hist pub;     /* the counts (fsdp.h) */
    bool on;                        /* false: keep nothing (--no-latency-histograms) */
    uint64_t kick_at;               /* first guest kick seen since the last pass, 0: none */
    uint64_t call_at;               /* first backend call seen since the last pass, 0: none */
    uint64_t pass_at;               /* this pass's begin stamp, 0: not read yet */
    uint64_t start_at;              /* start stamp of the requests taken in this pass, 0: none yet */
    uint64_t seen_at;               /* seen stamp of the requests completed in this pass, 0: none yet */
    uint64_t throttled_at;          /* intake stalled since (back-pressure), 0: not stalled */
    uint32_t ntaken, ndone, nsampled;
    uint64_t *taken[HIST_PEND];     /* where each taken request's shadowed stamp goes */
    uint64_t done_start[HIST_PEND]; /* each completed request's start stamp */
    struct hist_sampled sampled[HIST_SAMPLED];
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

/* Out of line, once per pass or per HIST_PEND requests (hist.c). */
void hist_flush(struct fsdp_qhist *h);
uint64_t hist_pass_stamp(struct fsdp_qhist *h);
void hist_sample(struct fsdp_qhist *h, uint64_t start, uint64_t shadowed, uint32_t dev, uint32_t q,
                 uint16_t head);

/* One duration into hop's histogram, n times. */
static inline void hist_observe(struct fsdp_qhist *h, uint32_t hop, uint64_t from, uint64_t to, uint64_t n)
{
    /* A stamp after the end (a request re-published after a backend
     * restart keeps its first stamps; clocks never go back) counts as 0. */
    uint64_t ns = to > from ? to - from : 0;

    h->pub.count[hop][hist_slot(ns)] += n;
    h->pub.sum_ns[hop] += ns * n;
}

/* A request was taken from the guest ring: *start now and *shadowed at the
 * pass's end get its stamps (private memory of the request's record). */
static inline void hist_taken(struct fsdp_qhist *h, uint64_t *start, uint64_t *shadowed)
{
    if (!h->on)
        return;
    if (!h->start_at)
        h->start_at = h->kick_at ? h->kick_at : hist_pass_stamp(h);
    if (h->ntaken == HIST_PEND)
        hist_flush(h);
    *start = h->start_at;
    *shadowed = 0;
    h->taken[h->ntaken++] = shadowed;
}

/* A request the backend completed was written to the guest used ring.
 * `sampled` (trace_ctl_sampled of its publish order): also fire
 * request_sampled for it at the pass's end. */
static inline void hist_completed(struct fsdp_qhist *h, uint64_t start, uint64_t shadowed, bool sampled,
                                  uint32_t dev, uint32_t q, uint16_t head)
{
    if (!h->on)
        return;
    if (!h->seen_at)
        h->seen_at = h->call_at ? h->call_at : hist_pass_stamp(h);
    /* Taken before the histograms were on for it (start 0): not timed. */
    if (!start)
        return;
    hist_observe(h, FSDP_HOP_BACKEND, shadowed, h->seen_at, 1);
    if (h->ndone == HIST_PEND)
        hist_flush(h);
    h->done_start[h->ndone++] = start;
    if (sampled)
        hist_sample(h, start, shadowed, dev, q, head);
}

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
