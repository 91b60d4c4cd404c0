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

uint64_t hist_pass_stamp(struct fsdp_qhist *h)
{
    if (!h->pass_at)
        h->pass_at = hist_clock();
    return h->pass_at;
}

/* Fire request_sampled for the sampled requests of this pass, used at now. */
static void fire_sampled(struct fsdp_qhist *h, uint64_t now)
{
    for (uint32_t i = 0; i < h->nsampled; i++) {
        struct hist_sampled *s = &h->sampled[i];
        PROBE_REQUEST_SAMPLED(s->dev, s->q, s->head, s->start, s->shadowed, h->seen_at, now);
    }
    h->nsampled = 0;
}

void hist_sample(struct fsdp_qhist *h, uint64_t start, uint64_t shadowed, uint32_t dev, uint32_t q,
                 uint16_t head)
{
    if (h->nsampled == HIST_SAMPLED)
        hist_flush(h);
    h->sampled[h->nsampled++] = (struct hist_sampled){start, shadowed, dev, q, head};
}

/* Stamp the requests waiting for it with now: the taken ones are shadowed,
 * the completed ones used. */
void hist_flush(struct fsdp_qhist *h)
{
    uint64_t now;

    if (!h->ntaken && !h->ndone && !h->nsampled)
        return;
    now = hist_clock();
    if (h->ntaken) {
        for (uint32_t i = 0; i < h->ntaken; i++)
            *h->taken[i] = now;
        hist_observe(h, FSDP_HOP_KICK_SHADOWED, h->start_at, now, h->ntaken);
        h->ntaken = 0;
    }
    if (h->ndone) {
        for (uint32_t i = 0; i < h->ndone; i++)
            hist_observe(h, FSDP_HOP_END_TO_END, h->done_start[i], now, 1);
        hist_observe(h, FSDP_HOP_CALL_USED, h->seen_at, now, h->ndone);
        h->ndone = 0;
    }
    fire_sampled(h, now);
}

void hist_pass_end(struct fsdp_qhist *h, bool throttled)
{
    if (!h->on)
        return;
    hist_flush(h);
    if (!throttled)
        h->kick_at = 0;
    h->call_at = 0;
    h->pass_at = 0;
    h->start_at = 0;
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
