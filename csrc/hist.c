/*
 * hist.c: the data plane's own latency histograms (see hist.h for the
 * clock, the stamps and what each hop measures).
 *
 * Owns: struct fsdp_qhist (one per queue, inside struct fsdp_queue): the
 * counts, the stamps of the current pass and the requests waiting for its
 * end stamp.  Calls: nothing but the clock.  Runs on the loop thread only
 * (or inline under the dp lock): no atomics, the counts are read by a
 * command between two passes, like the counters.
 */
#include "hist.h"
#include "probes.h"

static void observe(struct fsdp_qhist *h, uint32_t hop, uint64_t from, uint64_t to)
{
    /* A stamp after the end (a request re-published after a backend
     * restart keeps its first stamps; clocks never go back) counts as 0. */
    uint64_t ns = to > from ? to - from : 0;

    h->pub.count[hop][hist_slot(ns)]++;
    h->pub.sum_ns[hop] += ns;
}

/* The stamp of this pass's begin, read at most once per pass. */
static uint64_t pass_stamp(struct fsdp_qhist *h)
{
    if (!h->pass_at)
        h->pass_at = hist_clock();
    return h->pass_at;
}

/* Stamp the waiting requests with now. */
static void flush(struct fsdp_qhist *h)
{
    uint64_t now;

    if (!h->npend)
        return;
    now = hist_clock();
    for (uint32_t i = 0; i < h->npend; i++) {
        struct hist_pend *p = &h->pend[i];
        if (p->shadowed) {
            *p->shadowed = now;
            observe(h, FSDP_HOP_KICK_SHADOWED, p->start, now);
        } else {
            observe(h, FSDP_HOP_CALL_USED, h->seen_at, now);
            observe(h, FSDP_HOP_END_TO_END, p->start, now);
            if (p->sampled)
                PROBE_REQUEST_SAMPLED(p->dev, p->q, p->head, p->start, p->shadowed_at, h->seen_at, now);
        }
    }
    h->npend = 0;
}

static struct hist_pend *pend(struct fsdp_qhist *h, uint64_t start, uint64_t *shadowed)
{
    struct hist_pend *p;

    if (h->npend == HIST_PEND)
        flush(h);
    p = &h->pend[h->npend++];
    p->start = start;
    p->shadowed = shadowed;
    p->sampled = false;
    return p;
}

void hist_taken(struct fsdp_qhist *h, uint64_t *start, uint64_t *shadowed)
{
    if (!h->on)
        return;
    *start = h->kick_at ? h->kick_at : pass_stamp(h);
    *shadowed = 0;
    pend(h, *start, shadowed);
}

void hist_completed(struct fsdp_qhist *h, uint64_t start, uint64_t shadowed, uint64_t seq,
                    uint32_t dev, uint32_t q, uint16_t head)
{
    struct hist_pend *p;

    if (!h->on)
        return;
    if (!h->seen_at)
        h->seen_at = h->call_at ? h->call_at : pass_stamp(h);
    /* Taken before the histograms were on for it (start 0): not timed. */
    if (!start)
        return;
    observe(h, FSDP_HOP_BACKEND, shadowed, h->seen_at);
    p = pend(h, start, NULL);
    if (trace_ctl_sampled(seq)) {
        p->sampled = true;
        p->shadowed_at = shadowed;
        p->dev = dev;
        p->q = q;
        p->head = head;
    }
}

void hist_pass_end(struct fsdp_qhist *h, bool throttled)
{
    if (!h->on)
        return;
    flush(h);
    if (!throttled)
        h->kick_at = 0;
    h->call_at = 0;
    h->pass_at = 0;
    h->seen_at = 0;
}

void hist_throttle_begin(struct fsdp_qhist *h)
{
    h->throttled_at = hist_clock();
}

uint64_t hist_throttle_end(struct fsdp_qhist *h)
{
    uint64_t ns = h->throttled_at ? hist_clock() - h->throttled_at : 0;

    h->throttled_at = 0;
    return ns;
}

uint64_t hist_throttle_now(const struct fsdp_qhist *h)
{
    return h->throttled_at ? hist_clock() - h->throttled_at : 0;
}
