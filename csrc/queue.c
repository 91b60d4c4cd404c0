/*
 * queue.c: the lifecycle of one shadowed queue.
 *
 * Owns: creation and destruction of a queue (its backend eventfds, bounce
 * allocator and private arrays), its configuration (SET_VRING_NUM / BASE /
 * ADDR, the translation of the guest rings through the memory table), start
 * (with the re-publishing of requests kept from an earlier run), pause and
 * stop (GET_VRING_BASE: the backend's stop index, the stop result), reset,
 * abort, and clearing the shadow rings.  The per-request work of a started
 * queue is shadow.c's.
 *
 * Calls: shadow (the pass, and its per-request steps for re-publishing and
 * failing requests; events via dev_event), bounce, mem, vring, base.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "queue.h"
#include "base.h"
#include "bounce.h"
#include "hist.h"
#include "iotlb.h"
#include "mem.h"
#include "shadow.h"
#include "vring.h"

/* ------------------------------------------------------------------------ */
/* Creation and destruction (caller's thread).                                */

/* Identity only, and no fds yet: whatever fails later, queue_destroy works. */
void queue_init(struct fsdp_queue *q, struct fsdp_devctx *dev, uint32_t idx)
{
    q->dev = dev;
    q->idx = idx;
    q->guest_kick_fd = q->guest_call_fd = -1;
    q->backend_kick_fd = q->backend_call_fd = -1;
}

int queue_backend_eventfd(void)
{
    /* Non-blocking like QEMU's own event notifiers: the file status
     * flags are shared with the backend once it receives the fd. */
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

    return fd < 0 ? -errno : fd;
}

int queue_open(struct fsdp_queue *q)
{
    struct fsdp_devctx *dev = q->dev;

    q->backend_kick_fd = queue_backend_eventfd();
    q->backend_call_fd = queue_backend_eventfd();
    if (q->backend_kick_fd < 0 || q->backend_call_fd < 0)
        return q->backend_kick_fd < 0 ? q->backend_kick_fd : q->backend_call_fd;
    q->s_bounce_off = (uint64_t)q->idx * dev->slot_size + dev->ring_reserve;
    q->s_bounce = dev->shadow + q->s_bounce_off;
    return bounce_init(&q->bounce, (uint32_t)((dev->slot_size - dev->ring_reserve) / FSDP_PAGE));
}

static void free_arrays(struct fsdp_queue *q)
{
    free(q->sd);
    free(q->req);
    free(q->sstate);
    free(q->freelist);
    free(q->scratch);
    free(q->offs);
    free(q->ind);
    q->sd = NULL;
    q->req = NULL;
    q->sstate = NULL;
    q->freelist = NULL;
    q->scratch = NULL;
    q->offs = NULL;
    q->ind = NULL;
    q->cap = 0;
    q->nfree = 0;
}

static void reset_freelist(struct fsdp_queue *q)
{
    /* Pop order 0, 1, 2, ...: the stack holds them reversed. */
    for (uint32_t i = 0; i < q->cap; i++)
        q->freelist[i] = (uint16_t)(q->cap - 1 - i);
    q->nfree = q->cap;
    memset(q->sstate, SD_FREE, q->cap);
}

static int alloc_arrays(struct fsdp_queue *q, uint32_t num)
{
    if (q->cap == num) {
        reset_freelist(q);
        return 0;
    }
    free_arrays(q);
    q->sd = calloc(num, sizeof(*q->sd));
    q->req = calloc(num, sizeof(*q->req));
    q->sstate = calloc(num, 1);
    q->freelist = calloc(num, sizeof(*q->freelist));
    q->scratch = calloc(num, sizeof(*q->scratch));
    q->offs = calloc(num, sizeof(*q->offs));
    q->ind = calloc(num, 16);
    if (!q->sd || !q->req || !q->sstate || !q->freelist || !q->scratch || !q->offs ||
        !q->ind) {
        free_arrays(q);
        return -ENOMEM;
    }
    q->cap = num;
    reset_freelist(q);
    return 0;
}

void queue_destroy(struct fsdp_queue *q)
{
    if (q->guest_kick_fd >= 0)
        close(q->guest_kick_fd);
    if (q->guest_call_fd >= 0)
        close(q->guest_call_fd);
    if (q->backend_kick_fd >= 0)
        close(q->backend_kick_fd);
    if (q->backend_call_fd >= 0)
        close(q->backend_call_fd);
    free_arrays(q);
    bounce_destroy(&q->bounce);
}

/* ------------------------------------------------------------------------ */
/* Configuration (SET_VRING_NUM / BASE / ADDR).                               */

static void clear_shadow(struct fsdp_queue *q)
{
    memset(q->s_desc, 0, vring_desc_size(q->num));
    memset(q->s_avail, 0, vring_avail_size(q->num));
    memset(q->s_used, 0, vring_used_size(q->num));
}

int queue_set_num(struct fsdp_queue *q, uint32_t num)
{
    struct fsdp_devctx *dev = q->dev;
    uint64_t base;
    int rc;

    if (q->started)
        return -EBUSY;
    if (q->inflight) {
        /* Requests kept from an earlier run live in the arrays and in the
         * shadow slot as laid out for this num: the same num (QEMU sends
         * SET_VRING_NUM at every ring start) changes nothing; another num
         * needs them discarded first (fsdp_queue_discard). */
        return num == q->num ? 0 : -EBUSY;
    }
    rc = alloc_arrays(q, num);
    if (rc)
        return rc;
    q->num = num;
    q->num_pow2 = (num & (num - 1u)) == 0;
    base = (uint64_t)q->idx * dev->slot_size;
    q->s_desc_off = base;
    q->s_avail_off = base + FSDP_ALIGN_UP(vring_desc_size(num), FSDP_PAGE);
    q->s_used_off = q->s_avail_off + FSDP_ALIGN_UP(vring_avail_size(num), FSDP_PAGE);
    q->s_desc = dev->shadow + q->s_desc_off;
    q->s_avail = dev->shadow + q->s_avail_off;
    q->s_used = dev->shadow + q->s_used_off;
    if (q->addr_set)
        queue_translate_rings(q, false);
    return 0;
}

int queue_set_base(struct fsdp_queue *q, uint32_t avail_idx)
{
    if (avail_idx > 0xffff)
        return -EINVAL;
    if (q->started)
        return -EBUSY;
    q->last_avail = (uint16_t)avail_idx;
    return 0;
}

static uint8_t *ring_ptr(struct fsdp_queue *q, uint64_t uaddr, uint64_t len, uint64_t align,
                        uint32_t perm, int *why)
{
    uint8_t *p = mem_ring_to_host(&q->dev->mem, uaddr, len, perm, why);
    if (p && ((uintptr_t)p % align))
        return NULL;
    return p;
}

/* A started queue's IOVA ring has no translation yet (QEMU sends the used
 * ring's unasked after the start, the others on a miss): ask once; once QEMU
 * has answered without one, the queue cannot run (RING_UNMAPPED). */
static void ring_missed(struct fsdp_queue *q, uint64_t ring)
{
    struct fsdp_iotlb *t = q->dev->mem.iotlb;
    int ask = iotlb_missed(t, q->idx, t->miss_at);

    if (ask == FSDP_EV_IOTLB_MISS)
        dev_event(q->dev, q->idx, FSDP_EV_IOTLB_MISS, 0, t->miss_at, t->miss_perm);
    else if (ask == FSDP_EV_IOVA_UNMAPPED)
        dev_event(q->dev, q->idx, FSDP_EV_RING_UNMAPPED, 0, ring, 0);
}

static int finish_start(struct fsdp_queue *q);

/* (Re)translate the guest rings through the current memory table (and the
 * device IOTLB while it is on).  Called on SET_VRING_ADDR, after every
 * memory table change and every IOTLB change. */
int queue_translate_rings(struct fsdp_queue *q, bool emit)
{
    uint8_t *d = NULL, *a = NULL, *u = NULL;
    bool was_ok = q->rings_ok;
    uint64_t bad = 0;
    int why = 0;

    q->rings_ok = false;
    if (!q->addr_set || !q->num)
        return -EINVAL;
    /* One at a time: a miss names the first ring that has none. */
    if (!(d = ring_ptr(q, q->desc_uaddr, vring_desc_size(q->num), 16, FSDP_IOTLB_RO, &why)))
        bad = q->desc_uaddr;
    else if (!(a = ring_ptr(q, q->avail_uaddr, vring_avail_size(q->num), 2, FSDP_IOTLB_RO, &why)))
        bad = q->avail_uaddr;
    else if (!(u = ring_ptr(q, q->used_uaddr, vring_used_size(q->num), 4, FSDP_IOTLB_WO, &why)))
        bad = q->used_uaddr;
    if (!d || !a || !u) {
        if (why == FSDP_EV_IOTLB_MISS) {
            /* Not unmapped: not translated yet.  The queue waits. */
            if (q->started)
                ring_missed(q, bad);
            return -EAGAIN;
        }
        if (emit && (was_ok || q->start_pending) && q->started)
            dev_event(q->dev, q->idx, FSDP_EV_RING_UNMAPPED, 0, bad, 0);
        return -EFAULT;
    }
    q->g_desc = d;
    q->g_avail = a;
    q->g_used = u;
    q->rings_ok = true;
    if (q->start_pending)
        return finish_start(q);
    return 0;
}

int queue_set_addr(struct fsdp_queue *q, uint64_t desc, uint64_t avail, uint64_t used)
{
    uint64_t od, oa, ou;
    bool oset;
    int rc;

    if (!q->num)
        return -EINVAL;
    if (q->started)
        return -EBUSY;
    od = q->desc_uaddr;
    oa = q->avail_uaddr;
    ou = q->used_uaddr;
    oset = q->addr_set;
    q->desc_uaddr = desc;
    q->avail_uaddr = avail;
    q->used_uaddr = used;
    q->addr_set = true;
    rc = queue_translate_rings(q, false);
    if (rc == -EAGAIN)
        rc = 0;     /* IOVA rings QEMU has not translated yet: at the start */
    if (rc) {
        /* keep the previous (valid) configuration */
        q->desc_uaddr = od;
        q->avail_uaddr = oa;
        q->used_uaddr = ou;
        q->addr_set = oset;
        if (oset)
            queue_translate_rings(q, false);
    } else if (!q->inflight) {
        /* The backend reads used->idx when it is told the ring addresses
         * (libvhost-user does, at SET_VRING_ADDR), before any kick starts
         * our side: the shadow ring must already read as fresh then, not
         * hold the indices of the previous run (guest reset, reboot). */
        clear_shadow(q);
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Start, pause, stop.                                                        */

/* Drop a request the backend never completed (given back at a stop, or
 * discarded): its head becomes free, not done, so that a later "completion"
 * of it is an unknown id. */
static void forget_request(struct fsdp_queue *q, uint16_t head)
{
    release_request(q, head);
    q->sstate[head] = SD_FREE;
}

static int cmp_seq(const void *a, const void *b, void *arg)
{
    const struct fsdp_queue *q = arg;
    uint64_t x = q->req[*(const uint16_t *)a].seq, y = q->req[*(const uint16_t *)b].seq;
    return x < y ? -1 : x > y;
}

/*
 * A kept request at a start: published again.  A request after whose
 * publication the backend dies again and again may be what kills it: once
 * its backend died with it 1 + max_replays times, it is failed toward the
 * guest as poison instead of taking every restarted backend down with it
 * (DESIGN.md section 7, no replay storms).  Only deaths count (`lost`): a
 * request a live backend held across a ring stop (VM stop, migration) is no
 * sign of poison, and failing it would make isolated mode less available
 * than direct mode, where the backend simply keeps it.
 */
static void republish_or_fail(struct fsdp_queue *q, uint16_t head, bool lost)
{
    struct fsdp_req *r = &q->req[head];

    r->parked = false;
    if (lost && r->published >= 1u + q->dev->max_replays) {
        dev_event(q->dev, q->idx, FSDP_EV_REQUEST_POISONED, r->guest_head, r->published, 0);
        q->st.poisoned++;
        fail_request(q, head);
        return;
    }
    if (lost)
        r->published++;
    q->st.bytes_in += copy_in(q, head);
    write_shadow_chain(q, head);
}

static int do_start(struct fsdp_queue *q, uint32_t flags)
{
    if (q->started)
        return 0;           /* idempotent: SET_VRING_KICK may come again */
    if (!q->num || !q->addr_set)
        return -EINVAL;
    /* IOVA rings (device IOTLB on) may not translate yet: QEMU sends their
     * translations after the start (vhost_dev_start: the used ring's
     * unasked, the others on a miss).  The queue then counts as started and
     * its guest side starts once they translate (queue_translate_rings ->
     * finish_start). */
    if (!q->rings_ok && !(q->dev->mem.iotlb && q->dev->mem.iotlb->on))
        return -EINVAL;

    /* Fresh shadow ring: the region is ours, clear it. */
    clear_shadow(q);
    q->s_avail_idx = 0;
    q->s_last_used = 0;
    q->s_num_added = 0;
    q->guest_event_idx = !!(flags & FSDP_QF_GUEST_EVENT_IDX);
    q->backend_event_idx = !!(flags & FSDP_QF_BACKEND_EVENT_IDX);
    q->broken = false;
    q->backend_broken = false;
    if (q->throttled)   /* the stall ends here: its time is back-pressure time */
        q->st.throttled_ns += hist_throttle_end(&q->h);
    q->throttled = false;
    q->stopping = false;
    q->guest_used_dirty = false;
    q->need_backend_kick = q->need_guest_call = false;
    q->start_flags = flags;
    q->start_pending = true;
    q->started = true;
    if (q->rings_ok)
        return finish_start(q);
    queue_translate_rings(q, true);   /* asks QEMU, or finishes the start */
    return 0;
}

/* The part of a start that needs the guest rings. */
static int finish_start(struct fsdp_queue *q)
{
    uint32_t flags = q->start_flags;

    q->start_pending = false;
    q->used_idx = vr_load16(q->g_used + USED_IDX);
    q->signalled_used_valid = false;

    /* Requests kept from a previous run (backend died or did not drain):
     * re-published, in their original order, with their readable bytes
     * copied again (the old backend may have scribbled on the bounce), or
     * failed as poison (republish_or_fail). */
    if (q->inflight) {
        uint16_t *heads = (uint16_t *)q->offs;   /* scratch, num entries of 8 B */
        uint32_t k = 0;
        for (uint32_t s = 0; s < q->num; s++)
            if (q->sstate[s] == SD_HEAD)
                heads[k++] = (uint16_t)s;
        qsort_r(heads, k, sizeof(*heads), cmp_seq, q);
        q->parked = 0;
        for (uint32_t i = 0; i < k; i++)
            republish_or_fail(q, heads[i], flags & FSDP_QF_BACKEND_LOST);
    }
    if (q->s_avail_idx)
        q->need_backend_kick = true;    /* re-published requests (a late start too) */
    return 0;
}

int queue_start(struct fsdp_queue *q, uint32_t flags)
{
    int rc = do_start(q, flags);

    if (rc)
        return rc;
    /* Kicks may have been consumed before the start, and re-published
     * requests need a kick: one pass now. */
    queue_process(q);
    if (q->s_avail_idx)
        q->need_backend_kick = true;
    return 0;
}

bool queue_pause(struct fsdp_queue *q)
{
    if (!q->started)
        return false;
    q->stopping = true;         /* no more intake; harvest goes on */
    queue_process(q);
    return true;
}

/*
 * The backend answered GET_VRING_BASE with `next`, its next shadow avail
 * index: the requests we published at shadow positions [next, s_avail_idx)
 * were never taken.  A backend may legitimately hold requests forever (a NIC
 * holds receive buffers until a packet arrives), so waiting for those would
 * only stall the stop; they are settled here instead:
 *
 *  - when they are exactly the newest entries taken from the guest avail ring
 *    (positions [last_avail - k, last_avail)), they are given back: released,
 *    and last_avail rewound over them, so the guest's ring still holds them
 *    for whoever starts the queue next;
 *  - otherwise (a refused chain completed after them, or they were kept from
 *    an earlier run) rewinding would re-expose completed entries, so they are
 *    parked: kept by us, not waited for, re-published at the next start.
 *
 * `next` is the backend's word: it must name a position among the requests
 * still in flight, or it is refused (one event) and every request is treated
 * as taken.
 */
static void backend_stopped(struct fsdp_queue *q, uint16_t next, struct fsdp_stop_result *res)
{
    uint16_t untaken = (uint16_t)(q->s_avail_idx - next);
    uint16_t *heads = (uint16_t *)q->offs;   /* scratch, num entries of 8 B */
    uint8_t *seen = (uint8_t *)q->scratch;   /* scratch, >= num bytes */
    uint32_t k = 0;
    bool suffix = true;

    if (!untaken)
        return;
    if (untaken <= q->inflight) {
        for (uint32_t s = 0; s < q->num; s++)
            if (q->sstate[s] == SD_HEAD && (uint16_t)(q->req[s].sidx - next) < untaken)
                heads[k++] = (uint16_t)s;
    }
    if (k != untaken) {
        /* More untaken than in flight, or an "untaken" position already
         * completed: the index is made up. */
        dev_event(q->dev, q->idx, FSDP_EV_BAD_STOP_INDEX, 0, next, q->s_avail_idx);
        q->st.backend_errors++;
        return;
    }
    memset(seen, 0, k);
    for (uint32_t i = 0; i < k && suffix; i++) {
        uint16_t d = (uint16_t)(q->last_avail - 1u - q->req[heads[i]].gidx);
        suffix = d < k && !seen[d];
        if (suffix)
            seen[d] = 1;
    }
    for (uint32_t i = 0; i < k; i++) {
        if (suffix) {
            forget_request(q, heads[i]);
        } else if (!q->req[heads[i]].parked) {
            q->req[heads[i]].parked = true;
            q->parked++;
        }
    }
    if (suffix) {
        q->last_avail = (uint16_t)(q->last_avail - k);
        q->st.requests -= k;
        res->returned = k;
    } else {
        res->kept = k;
    }
}

void queue_stop(struct fsdp_queue *q, int64_t backend_next_avail, struct fsdp_stop_result *res)
{
    q->stopping = true;         /* no more intake from now on */
    queue_process(q);           /* harvest what is already completed */
    if (backend_next_avail < 0)
        return;                 /* unknown: every request is waited for */
    if (backend_next_avail <= UINT16_MAX) {
        backend_stopped(q, (uint16_t)backend_next_avail, res);
    } else {                    /* a split ring index has 16 bits */
        dev_event(q->dev, q->idx, FSDP_EV_BAD_STOP_INDEX, 0, (uint64_t)backend_next_avail,
                  q->s_avail_idx);
        q->st.backend_errors++;
    }
}

void queue_stop_result(const struct fsdp_queue *q, struct fsdp_stop_result *res)
{
    res->avail_idx = q->last_avail;
    res->inflight = q->inflight;
}

void queue_stop_finish(struct fsdp_queue *q, struct fsdp_stop_result *res)
{
    q->started = false;
    q->start_pending = false;
    q->stopping = false;
    if (res)
        queue_stop_result(q, res);
    /* The loop polls the kick eventfd and never reads it (loop.c, "How the
     * loop waits"): clear it now, as a backend that reads its kicks would
     * have, so that QEMU's test-and-clear of the kick notifier when it stops
     * vhost (virtio_bus_cleanup_host_notifier) sees only kicks made after
     * the stop, and runs its own handle_output only for those.
     * RWF_NOWAIT, not read(2): the fd may be blocking (the front-end's
     * choice, shared file flags we must not change), and a read of an empty
     * blocking eventfd would hang the loop thread and every device on it.
     * EAGAIN: no kick pending; EOPNOTSUPP (a kernel without FMODE_NOWAIT on
     * eventfds): not cleared, nothing lost. */
    if (q->guest_kick_fd >= 0) {
        uint64_t v;
        struct iovec iov = {.iov_base = &v, .iov_len = sizeof(v)};
        ssize_t r = preadv2(q->guest_kick_fd, &iov, 1, -1, RWF_NOWAIT);
        (void)r;
    }
}

/* ------------------------------------------------------------------------ */
/* Reset, abort, clear.                                                       */

/* Drop everything without touching the guest (device reset). */
void queue_reset(struct fsdp_queue *q)
{
    q->started = false;
    q->start_pending = false;
    q->stopping = false;
    q->broken = false;
    q->backend_broken = false;
    if (q->throttled)
        q->st.throttled_ns += hist_throttle_end(&q->h);
    q->throttled = false;
    q->inflight = 0;
    q->parked = 0;
    q->st.inflight = 0;
    if (q->cap)
        reset_freelist(q);
    if (q->bounce.bitmap)
        bounce_reset(&q->bounce);
    q->last_avail = 0;
    q->used_idx = 0;
    q->signalled_used_valid = false;
    q->addr_set = false;
    q->rings_ok = false;
    q->guest_event_idx = q->backend_event_idx = false;
    q->need_backend_kick = q->need_guest_call = false;
    q->guest_used_dirty = false;
    q->s_avail_idx = q->s_last_used = q->s_num_added = 0;
    q->log_used = false;
}

/* Fail every request in flight toward the guest (the device's error).
 * Needs the guest rings; returns the count. */
static uint32_t abort_inflight(struct fsdp_queue *q)
{
    uint32_t k = 0;

    if (!q->inflight || !q->rings_ok)
        return 0;
    for (uint32_t s = 0; s < q->num && q->inflight; s++) {
        if (q->sstate[s] != SD_HEAD)
            continue;
        fail_request(q, (uint16_t)s);
        k++;
    }
    dev_event(q->dev, q->idx, FSDP_EV_INFLIGHT_ABORTED, 0, k, 0);
    publish_guest_used(q);
    return k;
}

int queue_abort(struct fsdp_queue *q)
{
    if (q->started)
        return -EBUSY;      /* stop it first */
    if (!q->inflight)
        return 0;
    if (!q->rings_ok)
        return -EFAULT;
    return (int)abort_inflight(q);
}

int queue_discard(struct fsdp_queue *q)
{
    uint32_t k = 0;

    if (q->started)
        return -EBUSY;      /* stop it first */
    for (uint32_t s = 0; s < q->num && q->inflight; s++) {
        if (q->sstate[s] != SD_HEAD)
            continue;
        forget_request(q, (uint16_t)s);
        k++;
    }
    q->st.discarded += k;
    return (int)k;
}

int queue_set_event_idx(struct fsdp_queue *q, uint32_t flags)
{
    q->guest_event_idx = !!(flags & FSDP_QF_GUEST_EVENT_IDX);
    q->backend_event_idx = !!(flags & FSDP_QF_BACKEND_EVENT_IDX);
    /* The last call was decided the old way: the next is decided afresh. */
    q->signalled_used_valid = false;
    if (!q->started || !q->rings_ok)
        return 0;           /* queue_start sets both modes anyway */
    /* The backend's suppression fields (in the shadow region, ours) may be
     * stale for the new mode: a NO_NOTIFY left from flags mode, an
     * avail_event never written under event idx (a backend writes it only
     * when it takes an entry).  Put both in the "kick me at the next entry"
     * state a backend that has taken everything would leave; the backend
     * rewrites them as it runs. */
    vr_store16(q->s_used + USED_FLAGS, 0);
    vr_store16(q->s_used + USED_AVAIL_EVENT(q->num), q->s_avail_idx);
    /* A pass under the new mode (it arms avail_event / used_event where
     * event idx is now on), then one kick and one call whatever it
     * decided: a peer may be asleep waiting for a notification decided the
     * old way (a kick we suppressed through flags while it now watches
     * used_event, or the reverse).  Spurious notifications are allowed
     * (virtio 2.7.7, 2.7.10); a lost one hangs the ring. */
    queue_process(q);
    q->need_backend_kick = true;
    q->need_guest_call = true;
    return 0;
}

int queue_clear_shadow(struct fsdp_queue *q)
{
    if (q->started)
        return -EBUSY;      /* stop it first */
    if (q->rings_ok)
        clear_shadow(q);
    return 0;
}
