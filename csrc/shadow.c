/*
 * shadow.c: the engine of one queue: guest split ring <-> shadow split ring.
 *
 * Owns: the hot path of a started queue: intake (guest avail -> chain ->
 * shadow descriptors, copy in), harvest (shadow used -> copy back -> guest
 * used), publishing both avail and used indices, the notification decisions
 * and the one path that sends them (queue_notify, for the loop and for the
 * inline mode alike).  Setting a queue up, starting and stopping it is
 * queue.c's.
 * Calls: chain, fail, bounce, mem, log, vring, probes (and events, via dev_event).
 *
 * Toward the guest we are the DEVICE: we read the guest avail ring and its
 * descriptors, write the guest used ring, and (event idx) write avail_event.
 * Toward the backend we are the DRIVER: we write the shadow descriptors and
 * avail ring, read the shadow used ring, and (event idx) write used_event.
 *
 * Everything we know about a request in flight lives in private arrays
 * indexed by shadow descriptor (q->sd, q->req, q->sstate): the guest head,
 * the validated guest segments, the bounce offsets and the writable size.
 * The shadow region is write-only for us except for three values the
 * backend owns there: the used idx, the used elements (each read once and
 * validated) and the notification fields (used flags / avail_event), which
 * can only make us kick more or less.
 *
 * Ring indices are free-running uint16_t; slots are idx % num (num need not
 * be a power of two).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shadow.h"
#include "base.h"
#include "bounce.h"
#include "chain.h"
#include "fail.h"
#include "guard.h"
#include "hist.h"
#include "log.h"
#include "iotlb.h"
#include "mem.h"
#include "probes.h"
#include "vring.h"

enum take_result { TAKEN, REFUSED, NOSPACE, BROKEN, IOTLB_WAIT };

/* ------------------------------------------------------------------------ */
/* Guest used ring: push, publish, and the call decision.                     */

/* Buffers of stream_min bytes or more are copied with streaming stores (copy.c). */
static bool use_stream(const struct fsdp_queue *q, uint64_t len)
{
    return q->dev->stream_min && len >= q->dev->stream_min;
}

static void log_gpa(void *arg, uint64_t gpa, uint64_t len)
{
    struct fsdp_queue *q = arg;
    q->st.log_pages += log_write(&q->dev->log, q->dev->events, q->dev->id, q->idx, gpa, len);
}

/* Guest bytes [gpa, gpa + len) were written: mark them in the dirty log.
 * With the device IOTLB on the range is an IOVA range: the log is of
 * guest-physical pages, so each translated piece is marked. */
static inline void log_guest(struct fsdp_queue *q, uint64_t gpa, uint64_t len)
{
    if (!q->dev->log.on)
        return;     /* not migrating: the common case, no call */
    if (q->dev->mem.iotlb && q->dev->mem.iotlb->on)
        mem_for_each_gpa(&q->dev->mem, gpa, len, log_gpa, q);
    else
        log_gpa(q, gpa, len);
}

/* A write of len bytes at offset off of the guest used ring was made. */
static void log_used(struct fsdp_queue *q, uint64_t off, uint64_t len)
{
    if (q->log_used)
        log_guest(q, q->log_used_gpa + off, len);
}

void push_guest_used(struct fsdp_queue *q, uint16_t head, uint32_t len)
{
    size_t off = USED_RING(ring_slot(q, q->used_idx));
    uint8_t *e = q->g_used + off;

    vr_store32(e, head);
    vr_store32(e + 4, len);
    log_used(q, off, 8);
    q->used_idx++;
    q->guest_used_dirty = true;
    q->st.completed++;
    PROBE_REQUEST_COMPLETED(q->dev->id, q->idx, head, len);
}

/* Publish the guest used idx once per pass and decide whether to call. */
void publish_guest_used(struct fsdp_queue *q)
{
    uint16_t old, ev;
    bool valid, call;

    if (!q->guest_used_dirty)
        return;
    q->guest_used_dirty = false;
    /* Release: the used elements and every byte copied into the guest's
     * buffers are visible before the idx that hands them to the driver. */
    vr_store16_release(q->g_used + USED_IDX, q->used_idx);
    log_used(q, USED_IDX, 2);
    /* Full fence: our idx store must be visible before we read the driver's
     * used_event/flags.  Otherwise the driver may arm used_event after
     * reading our old idx while we read its old used_event: both sleep. */
    vr_mb();
    old = q->signalled_used;
    valid = q->signalled_used_valid;
    q->signalled_used = q->used_idx;
    q->signalled_used_valid = true;
    if (q->guest_event_idx) {
        ev = vr_load16(q->g_avail + AVAIL_USED_EVENT(q->num));
        call = !valid || vring_need_event(ev, q->used_idx, old);
    } else {
        call = !(vr_load16(q->g_avail + AVAIL_FLAGS) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (call)
        q->need_guest_call = true;
}

/* ------------------------------------------------------------------------ */
/* Failing a request toward the guest: the device's error (fail.c).           */

/* The error this queue's requests fail with: queues below
 * failure_first_queue carry another layout (virtio-scsi control and event
 * queues), so they fail with len 0. */
static uint32_t queue_failure(const struct fsdp_queue *q)
{
    return q->idx < q->dev->failure_first_queue ? FSDP_FAIL_LEN0 : q->dev->failure;
}

/* Write the device's error into the guest buffers segs[0..n) of a request
 * and log it like any copy-back; returns the used.len to complete with.
 * fail_plan checked every piece against the memory table, so no copy
 * below stops midway. */
static uint32_t write_failure(struct fsdp_queue *q, const struct fsdp_seg *segs, uint32_t n)
{
    struct fail_plan p;

    if (!fail_plan(&q->dev->mem, queue_failure(q), segs, n, &p))
        return 0;
    for (uint32_t i = 0; i < p.n; i++) {
        mem_copy_to_guest(&q->dev->mem, p.piece[i].gpa, p.bytes + p.piece[i].off,
                          p.piece[i].len, false);
        log_guest(q, p.piece[i].gpa, p.piece[i].len);
    }
    return p.used_len;
}

/* Complete guest head with the device's error, placed in segs[0..n). */
static void complete_failed(struct fsdp_queue *q, uint16_t guest_head,
                            const struct fsdp_seg *segs, uint32_t n)
{
    push_guest_used(q, guest_head, write_failure(q, segs, n));
    q->st.failed++;
}

void fail_request(struct fsdp_queue *q, uint16_t head)
{
    struct fsdp_seg *segs = q->scratch;     /* free outside take_one */
    uint16_t s = head;
    uint16_t n = q->req[head].ndesc;

    /* The guest segments as validated when the request was taken: private. */
    for (uint16_t i = 0; i < n; i++) {
        segs[i] = (struct fsdp_seg){.gpa = q->sd[s].gpa, .len = q->sd[s].len,
                                    .flags = q->sd[s].flags};
        s = q->sd[s].next;
    }
    complete_failed(q, q->req[head].guest_head, segs, n);
    release_request(q, head);
}

/* ------------------------------------------------------------------------ */
/* Shadow ring: publish, and the kick decision.                               */

/* One shadow descriptor, written field by field into the shadow table. */
static inline void put_shadow_desc(struct fsdp_queue *q, uint16_t s, uint64_t off, uint32_t len,
                                   uint16_t flags, uint16_t next)
{
    uint8_t *p = q->s_desc + 16u * s;

    vr_store64(p, FSDP_SHADOW_GPA_BASE + q->s_bounce_off + off);
    vr_store32(p + 8, len);
    vr_store16(p + 12, flags);
    vr_store16(p + 14, next);
}

/* The avail entry of shadow head (published by the next pass). */
static inline void put_shadow_avail(struct fsdp_queue *q, uint16_t head)
{
    vr_store16(q->s_avail + AVAIL_RING(ring_slot(q, q->s_avail_idx)), head);
    q->req[head].sidx = q->s_avail_idx;
    q->s_avail_idx++;
    q->s_num_added++;
}

void write_shadow_chain(struct fsdp_queue *q, uint16_t head)
{
    uint16_t s = head;
    uint16_t n = q->req[head].ndesc;

    for (uint16_t i = 0; i < n; i++) {
        struct fsdp_sdesc *sd = &q->sd[s];
        bool last = i + 1u == n;
        put_shadow_desc(q, s, sd->off, sd->len, sd->flags | (last ? 0 : VRING_DESC_F_NEXT),
                        last ? 0 : sd->next);
        s = sd->next;
    }
    put_shadow_avail(q, head);
}

/* Copy the readable guest bytes of a request into its bounce space.  The
 * ranges were validated against the current memory table. */
uint64_t copy_in(struct fsdp_queue *q, uint16_t head)
{
    uint16_t s = head;
    uint64_t bytes = 0;

    for (uint16_t i = 0; i < q->req[head].ndesc; i++) {
        struct fsdp_sdesc *sd = &q->sd[s];
        if (!(sd->flags & VRING_DESC_F_WRITE) && sd->len) {
            if (mem_copy_from_guest(&q->dev->mem, q->s_bounce + sd->off, sd->gpa, sd->len,
                                    use_stream(q, sd->len)) == 0)
                bytes += sd->len;
        }
        s = sd->next;
    }
    return bytes;
}

static void publish_shadow_avail(struct fsdp_queue *q)
{
    uint16_t old, new_idx;
    bool kick;

    if (!q->s_num_added)
        return;
    /* Release: shadow descriptors, bounce bytes and ring entries written
     * above are visible before the backend can observe the new idx. */
    vr_store16_release(q->s_avail + AVAIL_IDX, q->s_avail_idx);
    /* Full fence (virtio_mb in Linux's virtqueue_kick_prepare): the idx store
     * must be visible before we read the backend's avail_event/flags, or the
     * backend may go to sleep on our old idx while we skip the kick. */
    vr_mb();
    new_idx = q->s_avail_idx;
    old = (uint16_t)(new_idx - q->s_num_added);
    q->s_num_added = 0;
    if (q->backend_event_idx)
        kick = vring_need_event(vr_load16(q->s_used + USED_AVAIL_EVENT(q->num)), new_idx, old);
    else
        kick = !(vr_load16(q->s_used + USED_FLAGS) & VRING_USED_F_NO_NOTIFY);
    if (kick)
        q->need_backend_kick = true;
}

/* ------------------------------------------------------------------------ */
/* Notifications: sending what publish_guest_used / publish_shadow_avail      */
/* decided.  The one path for the loop and for the inline mode.               */

/* One eventfd write: added to the loop's batch, or written now. */
static void signal_fd(struct fsdp_queue *q, int fd, bool blocking, const struct fsdp_batch *batch)
{
    static const uint64_t one = 1;
    ssize_t w;

    if (batch && !blocking) {
        batch->add(batch->arg, q, fd);
        return;
    }
    /* Inline mode, or a blocking fd: io_uring would punt the write to an
     * io-wq worker (see loop.c's top comment), a direct write is cheaper. */
    w = write(fd, &one, sizeof(one));
    (void)w;   /* EAGAIN: counter saturated, the peer is already woken */
}

uint32_t queue_notify(struct fsdp_queue *q, const struct fsdp_batch *batch)
{
    uint32_t flags = 0;

    if (q->need_backend_kick) {
        q->need_backend_kick = false;
        signal_fd(q, q->backend_kick_fd, false, batch);   /* ours: non-blocking */
        q->st.backend_kicks++;
        PROBE_BACKEND_KICK(q->dev->id, q->idx);
        flags |= FSDP_POLL_BACKEND_KICKED;
    }
    if (q->need_guest_call) {
        q->need_guest_call = false;
        if (q->guest_call_fd >= 0) {
            signal_fd(q, q->guest_call_fd, q->guest_call_blocking, batch);
            q->st.guest_calls++;
            PROBE_GUEST_CALL(q->dev->id, q->idx);
            flags |= FSDP_POLL_GUEST_CALLED;
        }
    }
    return flags;
}

/* ------------------------------------------------------------------------ */
/* Intake: guest avail -> shadow.                                             */

/*
 * A request is done with: forget the device IOTLB's translations of the pages
 * it named (unless the proxy runs with --iotlb-keep-completed).  A Linux guest unmaps them right after the completion, and in its
 * default lazy mode (iommu.strict=0) the invalidation that tells the device
 * comes late or, through QEMU 7.2, not at all, while the IOVA is soon mapped
 * again to another page: a translation kept past the request would read or
 * write the old page (seen: indirect tables read from pages the guest had
 * reused).  A device IOTLB may drop any entry at any time; the next request
 * on those pages asks QEMU again.  Pages are whole IOVA pages (a mapping is
 * page-granular); another live buffer on the same page only costs a miss.
 */
static bool on_ring_page(const struct fsdp_queue *q, uint64_t page)
{
    const uint64_t at[3] = {q->desc_uaddr, q->avail_uaddr, q->used_uaddr};
    const uint64_t len[3] = {16ull * q->num, 6 + 2ull * q->num, 6 + 8ull * q->num};

    for (int i = 0; i < 3; i++)
        if (page < at[i] + len[i] && at[i] < page + FSDP_PAGE)
            return true;
    return false;
}

static void iotlb_forget_pages(struct fsdp_queue *q, uint64_t addr, uint64_t len);

/* Inline: without a vIOMMU (nearly always) the four calls per request cost
 * one test each, not a call each. */
static inline void iotlb_forget(struct fsdp_queue *q, uint64_t addr, uint64_t len)
{
    const struct fsdp_iotlb *t = q->dev->mem.iotlb;

    if (t && t->on && !t->keep_completed)
        iotlb_forget_pages(q, addr, len);
}

static void iotlb_forget_pages(struct fsdp_queue *q, uint64_t addr, uint64_t len)
{
    struct fsdp_iotlb *t = q->dev->mem.iotlb;
    uint64_t first, end;

    if (!t || !t->on || t->keep_completed || !len || len > UINT64_MAX - addr)
        return;
    first = addr & ~(uint64_t)(FSDP_PAGE - 1);
    end = addr + len;
    end = end > UINT64_MAX - (FSDP_PAGE - 1) ? UINT64_MAX : FSDP_ALIGN_UP(end, FSDP_PAGE);
    /* The queue's own rings stay (a guest that puts buffers on a ring page
     * would otherwise lose the ring's translation at every completion). */
    for (uint64_t page = first; page < end && page >= first; page += FSDP_PAGE)
        if (!on_ring_page(q, page))
            iotlb_invalidate(t, page, FSDP_PAGE);
}

void release_request(struct fsdp_queue *q, uint16_t head)
{
    struct fsdp_req *r = &q->req[head];
    uint16_t s = head;
    uint16_t n = r->ndesc;      /* once: the stores below could alias it for the compiler */

    iotlb_forget(q, r->ind_addr, r->ind_len);
    r->ind_len = 0;
    for (uint16_t i = 0; i < n; i++) {
        struct fsdp_sdesc *sd = &q->sd[s];
        uint16_t next = sd->next;
        iotlb_forget(q, sd->gpa, sd->len);
        if (sd->own_npages) {   /* a fragmented request's segment (alloc_per_segment) */
            bounce_free(&q->bounce, sd->own_page, sd->own_npages);
            sd->own_npages = 0;
        }
        q->sstate[s] = SD_FREE;
        q->freelist[q->nfree++] = s;
        s = next;
    }
    /* A completed head stays SD_DONE until reused, so that a second
     * completion of it is told apart from a made-up id. */
    q->sstate[head] = SD_DONE;
    if (r->slab_npages)
        bounce_free(&q->bounce, r->slab_page, r->slab_npages);
    r->slab_npages = 0;
    r->ndesc = 0;
    if (r->parked) {
        r->parked = false;
        q->parked--;
    }
    q->inflight--;
    q->st.inflight = q->inflight;
}

/* Fallback when no contiguous slab is free: one allocation per segment,
 * recorded in q->offs[i] as page | npages << 32.  All or nothing. */
static bool alloc_per_segment(struct fsdp_queue *q, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        uint32_t np = (uint32_t)(FSDP_ALIGN_UP((uint64_t)q->scratch[i].len, FSDP_PAGE) / FSDP_PAGE);
        int64_t p = np ? bounce_alloc(&q->bounce, np) : 0;
        if (p < 0) {
            for (uint32_t j = 0; j < i; j++)
                bounce_free(&q->bounce, (uint32_t)q->offs[j], (uint32_t)(q->offs[j] >> 32));
            return false;
        }
        q->offs[i] = (uint64_t)p | (uint64_t)np << 32;
    }
    return true;
}

/*
 * The chain at head names an IOVA the device IOTLB has no translation for
 * (ch->err_a, access ch->err_b).  Ask QEMU once (the control plane sends
 * VHOST_IOTLB_MISS on the back-end channel and, once QEMU has answered,
 * calls fsdp_queue_iotlb_answered): false, the entry stays in the guest ring.
 * If QEMU answered and it is still missing: walk again with misses refused,
 * so the chain is refused like any bad one (the device's error where the
 * walk can place it): true, *ch holds that walk.
 */
static bool iotlb_wait(struct fsdp_queue *q, uint16_t head, struct fsdp_chain *ch, uint32_t *steps)
{
    struct fsdp_devctx *dev = q->dev;
    struct fsdp_iotlb *t = dev->mem.iotlb;
    int ask = iotlb_missed(t, q->idx, ch->err_a);

    if (ask == FSDP_EV_IOTLB_MISS)
        dev_event(dev, q->idx, FSDP_EV_IOTLB_MISS, head, ch->err_a, ch->err_b);
    if (ask != FSDP_EV_IOVA_UNMAPPED)
        return false;
    t->refuse_misses = true;
    chain_walk(&dev->mem, q->g_desc, q->num, head, dev->max_request_bytes, q->scratch, q->ind, ch);
    t->refuse_misses = false;
    *steps += ch->steps;
    return true;
}

static enum take_result take_one(struct fsdp_queue *q, uint32_t *steps)
{
    struct fsdp_devctx *dev = q->dev;
    struct fsdp_chain ch;
    uint16_t head;
    uint64_t slab;
    uint32_t npages, n;
    int64_t first;
    bool fragmented = false;
    int rc;

    head = vr_load16(q->g_avail + AVAIL_RING(ring_slot(q, q->last_avail)));
    if (head >= q->num) {
        /* A head outside the table: the ring itself is corrupt. */
        dev_event(dev, q->idx, FSDP_EV_BAD_HEAD, head, head, q->num);
        q->broken = true;
        return BROKEN;
    }

    rc = chain_walk(&dev->mem, q->g_desc, q->num, head, dev->max_request_bytes,
                    q->scratch, q->ind, &ch);
    *steps = ch.steps;
    if (rc == FSDP_EV_IOTLB_MISS) {
        if (!iotlb_wait(q, head, &ch, steps))
            return IOTLB_WAIT;
        rc = (int)ch.err;
    }
    if (dev->mem.iotlb && dev->mem.iotlb->on)
        iotlb_settled(dev->mem.iotlb, q->idx);
    if (rc == 0 && q->idx >= dev->failure_first_queue &&
        (ch.readable < dev->min_readable || ch.writable < dev->min_writable)) {
        /* Too short for the device's request layout: a backend would read
         * past the chain, or have nowhere to put its status. */
        rc = FSDP_EV_BAD_LAYOUT;
        ch.err_a = ch.readable;
        ch.err_b = ch.writable;
    }
    if (rc == 0) {
        n = ch.n;
        if (n > q->nfree)
            return NOSPACE;
        slab = bounce_layout(q->scratch, n, q->offs, false);
        if (slab / FSDP_PAGE > q->bounce.npages)   /* pathological: many mid-size buffers */
            slab = bounce_layout(q->scratch, n, q->offs, true);
        if (slab / FSDP_PAGE > q->bounce.npages) {
            /* Would never fit, even in an empty pool: refuse, don't wait forever. */
            rc = FSDP_EV_REQUEST_TOO_LARGE;
            ch.err_a = slab;
            ch.err_b = (uint64_t)q->bounce.npages * FSDP_PAGE;
        }
    }
    if (rc) {
        dev_event(dev, q->idx, (uint32_t)rc, head, ch.err_a, ch.err_b);
        PROBE_REQUEST_REFUSED(dev->id, q->idx, head, rc);
        q->st.refused++;
        q->st.refused_by[(uint32_t)rc < 16u ? (uint32_t)rc : 0u]++;
        /* The device's error where the walk saw the whole chain; a broken
         * structure (loop, bad next, bad indirect) has no safe place for
         * it: len 0. */
        complete_failed(q, head, q->scratch, ch.complete ? ch.n : 0);
        iotlb_forget(q, ch.ind_addr, ch.ind_len);
        for (uint32_t i = 0; i < ch.n; i++)
            iotlb_forget(q, q->scratch[i].gpa, q->scratch[i].len);
        q->last_avail++;
        return REFUSED;
    }

    npages = (uint32_t)(slab / FSDP_PAGE);
    first = npages ? bounce_alloc(&q->bounce, npages) : 0;
    if (first < 0) {
        /* No contiguous run free: one allocation per segment (pages kept in
         * q->offs, no longer needed for the slab layout). */
        if (q->bounce.nfree < npages || !alloc_per_segment(q, n))
            return NOSPACE;
        fragmented = true;
    }

    /* Shadow descriptors: the top n of the free stack, linked privately.
     * One pass per descriptor does what copy_in and write_shadow_chain do
     * for a re-published request: the private record, the shadow
     * descriptor, and the copy of a readable buffer. */
    uint64_t bytes = 0;
#define SIDX(i) (q->freelist[q->nfree - 1u - (i)])
    uint16_t shead = SIDX(0);
    for (uint32_t i = 0; i < n; i++) {
        uint16_t s = SIDX(i);
        uint16_t next = i + 1 < n ? SIDX(i + 1) : 0;
        struct fsdp_sdesc *sd = &q->sd[s];
        const struct fsdp_seg *g = &q->scratch[i];
        if (fragmented) {
            sd->own_page = (uint32_t)q->offs[i];
            sd->own_npages = (uint32_t)(q->offs[i] >> 32);
            sd->off = (uint64_t)sd->own_page * FSDP_PAGE;
        } else {
            sd->own_npages = 0;
            sd->off = (uint64_t)first * FSDP_PAGE + q->offs[i];
        }
        sd->gpa = g->gpa;
        sd->len = g->len;
        sd->flags = g->flags;
        sd->next = next;
        q->sstate[s] = i ? SD_BODY : SD_HEAD;
        put_shadow_desc(q, s, sd->off, g->len,
                        g->flags | (i + 1 < n ? VRING_DESC_F_NEXT : 0), next);
        /* Validated by chain_walk against the current memory table, and
         * never 0 bytes long. */
        if (!(g->flags & VRING_DESC_F_WRITE) &&
            mem_copy_from_guest(&dev->mem, q->s_bounce + sd->off, g->gpa, g->len,
                                use_stream(q, g->len)) == 0)
            bytes += g->len;
    }
#undef SIDX
    q->nfree -= n;

    struct fsdp_req *r = &q->req[shead];
    r->guest_head = head;
    r->ndesc = (uint16_t)n;
    r->slab_page = fragmented ? 0 : (uint32_t)first;
    r->slab_npages = fragmented ? 0 : npages;
    r->writable = ch.writable;
    r->readable = ch.readable;
    r->seq = q->seq++;
    r->gidx = q->last_avail;
    r->ind_addr = ch.ind_addr;
    r->ind_len = ch.ind_len;
    r->published = 1;
    r->parked = false;

    hist_taken(&q->h, &r->start_ns, &r->shadowed_ns);
    put_shadow_avail(q, shead);
    q->inflight++;
    q->st.inflight = q->inflight;
    q->st.requests++;
    q->st.bytes_in += bytes;
    q->last_avail++;
    PROBE_REQUEST_SHADOWED(dev->id, q->idx, head, bytes);
    return TAKEN;
}

/* Ask the guest for a kick at its next avail entry (event idx); the caller
 * looks at the avail idx again afterwards: the driver may have published
 * after our load but before seeing the new avail_event. */
static void arm_guest_kick(struct fsdp_queue *q)
{
    vr_store16(q->g_used + USED_AVAIL_EVENT(q->num), q->last_avail);
    log_used(q, USED_AVAIL_EVENT(q->num), 2);
    /* Full fence: the avail_event store must be visible before the idx
     * re-load (store->load ordering). */
    vr_mb();
}

/* Ask the backend for a call at its next completion (event idx); the caller
 * looks at the used idx again afterwards, as above. */
static void arm_backend_call(struct fsdp_queue *q)
{
    vr_store16(q->s_avail + AVAIL_USED_EVENT(q->num), q->s_last_used);
    /* Full fence: store used_event, then load idx. */
    vr_mb();
}

/*
 * Work budget of one pass over one queue.  A guest can make every chain cost
 * up to num descriptor reads (a loop is only detected after num steps), and
 * keep refilling its ring as fast as we drain it; without a bound one queue
 * could keep the loop thread for itself (num^2 steps per pass at num =
 * 32768).  When the budget runs out the queue sets q->more and the loop comes
 * back to it after a turn over every other queue, without sleeping.
 */
static int64_t intake_budget(const struct fsdp_queue *q) { return 4 * (int64_t)q->num + 256; }

static bool intake(struct fsdp_queue *q)
{
    bool any = false, armed = false;
    int64_t budget = intake_budget(q);

    for (;;) {
        /* Acquire: pairs with the driver's write barrier before its idx
         * store, so the ring entries and descriptors it published are
         * visible to the loads that follow. */
        uint16_t avail = vr_load16_acquire(q->g_avail + AVAIL_IDX);
        uint16_t n = (uint16_t)(avail - q->last_avail);

        if (n > q->num) {
            /* More new entries than the ring holds: corrupt.  Walking them
             * would make one kick cost up to 65535 refusals (a cheap denial
             * of service), so the queue stops instead. */
            dev_event(q->dev, q->idx, FSDP_EV_AVAIL_IDX_JUMP, 0, avail, q->last_avail);
            q->broken = true;
            break;
        }
        if (n == 0) {
            /* defer_arm: the loop keeps polling this ring, a kick would
             * only cost the guest a syscall and us a wakeup; queue_arm
             * asks for one before the loop sleeps. */
            if (!q->guest_event_idx || armed || q->defer_arm)
                break;
            arm_guest_kick(q);
            armed = true;
            continue;
        }
        while (n) {
            uint32_t steps = 0;
            enum take_result r;

            if (budget <= 0) {
                q->more = true;
                return any;
            }
            r = take_one(q, &steps);
            budget -= steps ? steps : 1;
            if (r == NOSPACE) {
                /* Back-pressure: leave the entry in the guest ring;
                 * completions will free space and bring us back here. */
                if (!q->throttled) {
                    q->st.throttled++;
                    hist_throttle_begin(&q->h);
                }
                q->throttled = true;
                return any;
            }
            if (r == BROKEN || r == IOTLB_WAIT)
                return any;     /* IOTLB_WAIT: fsdp_queue_iotlb_answered brings us back */
            if (q->throttled)
                q->st.throttled_ns += hist_throttle_end(&q->h);
            q->throttled = false;
            any = true;
            armed = false;
            n--;
        }
    }
    return any;
}

/* ------------------------------------------------------------------------ */
/* Harvest: shadow used -> guest.                                             */

static uint32_t copy_back(struct fsdp_queue *q, uint16_t head, uint32_t len)
{
    uint16_t s = head;
    uint32_t left = len;
    uint16_t n = q->req[head].ndesc;    /* once: the copies below may alias nothing of ours,
                                           but the compiler cannot know */

    for (uint16_t i = 0; i < n && left; i++) {
        struct fsdp_sdesc *sd = &q->sd[s];
        if (sd->flags & VRING_DESC_F_WRITE) {
            uint32_t take = sd->len < left ? sd->len : left;
            if (take) {
                /* Private offset and length: whatever the backend did to
                 * the shadow descriptors, we copy from where WE put it. */
                int rc = mem_copy_to_guest(&q->dev->mem, sd->gpa, q->s_bounce + sd->off, take,
                                           use_stream(q, take));
                /* Logged whatever rc says: a copy that failed midway may
                 * have written its first pieces. */
                log_guest(q, sd->gpa, take);
                if (rc) {
                    dev_event(q->dev, q->idx, FSDP_EV_COPYBACK_UNMAPPED,
                              q->req[head].guest_head, sd->gpa, take);
                    return UINT32_MAX;
                }
            }
            left -= take;
        }
        s = sd->next;
    }
    return len - left;
}

/* One shadow used element, read once (id, len): validated, then the
 * request completes toward the guest, or fails with the device's error. */
static void complete_one(struct fsdp_queue *q, uint32_t id, uint32_t len)
{
    struct fsdp_req *r;
    uint32_t copied;

    if (id >= q->num || q->sstate[id] != SD_HEAD) {
        /* Not a request in flight: a made-up id, a body descriptor, one
         * given back or dropped at a stop (SD_FREE), or one completed
         * already (SD_DONE).  Skipped; the others keep their chance. */
        uint32_t code = (id < q->num && q->sstate[id] == SD_DONE)
                            ? FSDP_EV_USED_DOUBLE_COMPLETION : FSDP_EV_USED_UNKNOWN_ID;
        dev_event(q->dev, q->idx, code, 0, id, len);
        q->st.backend_errors++;
        return;
    }
    r = &q->req[id];
    if (len > r->writable) {
        dev_event(q->dev, q->idx, FSDP_EV_USED_LEN_TOO_LARGE, r->guest_head, len, r->writable);
        q->st.backend_errors++;
        fail_request(q, (uint16_t)id);
        return;
    }
    copied = copy_back(q, (uint16_t)id, len);
    if (copied == UINT32_MAX) {
        fail_request(q, (uint16_t)id);
        return;
    }
    q->st.bytes_out += copied;
    hist_completed(&q->h, r->start_ns, r->shadowed_ns, trace_ctl_sampled(r->seq), q->dev->id, q->idx,
                   r->guest_head);
    push_guest_used(q, r->guest_head, len);
    release_request(q, (uint16_t)id);
}

static bool harvest(struct fsdp_queue *q)
{
    bool any = false, armed = false;
    uint32_t budget = q->num;   /* entries per pass: see intake_budget */

    for (;;) {
        /* Acquire: pairs with the backend's release of its used idx, so the
         * used elements below are at least as new as the idx. */
        uint16_t used = vr_load16_acquire(q->s_used + USED_IDX);
        uint16_t n = (uint16_t)(used - q->s_last_used);

        if (n == 0) {
            if (!q->backend_event_idx || armed || q->defer_arm)
                break;      /* defer_arm: as in intake */
            arm_backend_call(q);
            armed = true;
            continue;
        }
        if (budget == 0) {
            q->more = true;
            break;
        }
        if (n > q->num) {
            /* More completions than the ring holds: the backend's used idx
             * is garbage and no entry of the ring can be trusted.  Stop
             * reading it until the next start; requests stay ours.  The
             * control plane drops the backend on this event, reconnects,
             * and queue_start re-publishes them (DESIGN.md sections 3.8,
             * 7).  Fewer than num new entries are read one by one below:
             * a lie among them costs only itself. */
            dev_event(q->dev, q->idx, FSDP_EV_BACKEND_FAILED, 0, used, q->s_last_used);
            q->st.backend_errors++;
            q->backend_broken = true;
            break;
        }
        if (n > budget)
            n = (uint16_t)budget;
        budget -= n;
        for (uint16_t i = 0; i < n; i++) {
            const uint8_t *e = q->s_used + USED_RING(ring_slot(q, q->s_last_used));
            uint32_t id = vr_load32(e);          /* each read once */
            uint32_t len = vr_load32(e + 4);
            q->s_last_used++;
            complete_one(q, id, len);
        }
        any = true;
        armed = false;
    }
    return any;
}

/*
 * The front-end shrank a file of guest RAM (or the dirty log) under us: the
 * guard replaced it with zeros (guard.c), so what this pass read from it is
 * not the guest's.  The queue stops for good: nothing more is published to
 * the backend, no more intake; one GUEST_MEMORY_LOST event per device, on
 * which the control plane ends the session.  Checked only when the process's
 * fault count moved: one load per pass otherwise.
 */
static bool memory_lost(struct fsdp_queue *q)
{
    struct fsdp_devctx *d = q->dev;
    const struct fsdp_region *lost = NULL;

    q->guard_seen = guard_faults();
    if (q->mem_lost)
        return true;
    for (uint32_t i = 0; i < d->mem.n && !lost; i++)
        if (mem_region_lost(&d->mem.r[i]))
            lost = &d->mem.r[i];
    if (!lost && mem_region_lost(&d->log.map))
        lost = &d->log.map;
    if (!lost)
        return false;
    q->mem_lost = q->broken = true;
    q->more = false;
    /* One event per device, whichever of its queues (threads) sees it first. */
    if (!__atomic_exchange_n(&d->mem_lost_reported, true, __ATOMIC_RELAXED))
        dev_event(d, q->idx, FSDP_EV_GUEST_MEMORY_LOST, 0, lost->gpa, lost->size);
    return true;
}

bool queue_process(struct fsdp_queue *q)
{
    bool any = false;

    q->more = false;
    if (!q->started || !q->rings_ok || q->mem_lost)
        return false;
    if (!q->backend_broken)
        any |= harvest(q);
    /* After each half: a copy-back that faulted must not let intake read the
     * zeroed ring (a made-up AVAIL_IDX_JUMP). */
    if (__builtin_expect(guard_faults() != q->guard_seen, 0) && memory_lost(q)) {
        hist_pass_end(&q->h, q->throttled);   /* the requests of the pass keep no stamp pending */
        return any;
    }
    if (!q->stopping && !q->broken && !q->backend_broken)
        any |= intake(q);
    hist_pass_end(&q->h, q->throttled);
    if (__builtin_expect(guard_faults() != q->guard_seen, 0) && memory_lost(q))
        return any;
    publish_guest_used(q);
    publish_shadow_avail(q);
    return any;
}

bool queue_has_work(struct fsdp_queue *q)
{
    if (!q->started || !q->rings_ok || q->backend_broken || q->mem_lost)
        return false;
    if (q->more)
        return true;
    if (q->inflight && vr_load16(q->s_used + USED_IDX) != q->s_last_used)
        return true;
    if (!q->stopping && !q->broken && !q->throttled &&
        vr_load16(q->g_avail + AVAIL_IDX) != q->last_avail)
        return true;
    return false;
}

/* Intake stopped at an entry whose IOVA QEMU has not translated yet: the
 * entry stays in the guest ring, so its avail idx says nothing new until
 * fsdp_queue_iotlb_answered (a command) brings the loop back. */
static bool iotlb_waiting(const struct fsdp_queue *q)
{
    const struct fsdp_iotlb *t = q->dev->mem.iotlb;

    return t && t->on && q->idx < FSDP_MAX_QUEUES && t->state[q->idx] == IOTLB_WAITING;
}

bool queue_arm(struct fsdp_queue *q)
{
    bool work = false;

    if (!q->defer_arm || !q->started || !q->rings_ok || q->backend_broken || q->mem_lost)
        return false;   /* mem_lost: stopped for good, its rings read as zeros */
    /* What intake and harvest would have armed at the end of a pass, with
     * the same re-check after each fence. */
    if (q->backend_event_idx) {
        arm_backend_call(q);
        work |= vr_load16_acquire(q->s_used + USED_IDX) != q->s_last_used;
    }
    if (q->guest_event_idx && !q->stopping && !q->broken && !q->throttled &&
        !iotlb_waiting(q)) {
        arm_guest_kick(q);
        work |= vr_load16_acquire(q->g_avail + AVAIL_IDX) != q->last_avail;
    }
    return work;
}
