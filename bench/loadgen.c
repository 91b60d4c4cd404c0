/*
 * loadgen.c: virtio-blk driver emulation for fastshadow's benchmark (see loadgen.h).
 *
 * Waiting for completions, as Linux's virtio-blk driver does it: while the
 * driver is busy it keeps interrupts suppressed (with EVENT_IDX it simply
 * does not advance used_event; without it VRING_AVAIL_F_NO_INTERRUPT is set),
 * harvests the used ring, refills the avail ring and kicks only when the
 * device asks for it (avail_event / VRING_USED_F_NO_NOTIFY).  Only when a
 * pass finds nothing does it optionally spin (busy_poll_us), then re-arm the
 * interrupt (used_event = last seen used index), re-check the ring (the
 * device may have completed in between) and sleep in poll() on the call
 * eventfds.  This is the cost structure a real guest has, so the comparison
 * between modes measures what a guest would see.
 */
#define _GNU_SOURCE
#include "loadgen.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/sdt.h>
#include <time.h>
#include <unistd.h>

_Static_assert(LG_MAX_QUEUES == sizeof(((struct lg_result *)0)->q) / sizeof(struct lg_queue_result),
               "lg_result.q must have LG_MAX_QUEUES entries");

/* ---- virtio split ring (VIRTIO 1.2 §2.7) ---------------------------------------- */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];  /* then uint16_t used_event */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];  /* then uint16_t avail_event */
};

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

static inline bool vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

/* ---- state ------------------------------------------------------------------------ */
struct lg_slot {
    uint64_t t_submit;
    uint64_t offset;         /* disk byte offset of the request in flight */
    bool busy;
};

struct lg_queue {
    uint32_t index;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t *used_event;    /* in the avail ring, after ring[num] */
    uint16_t *avail_event;   /* in the used ring, after ring[num] */
    uint64_t desc_off, avail_off, used_off;
    struct virtio_blk_outhdr *hdr;  /* max_qd headers */
    uint64_t hdr_off;
    uint8_t *status;                /* max_qd status bytes */
    uint64_t status_off;
    uint8_t *data;                  /* max_qd buffers of data_stride bytes */
    uint64_t data_off;
    int kick_fd, call_fd;

    /* driver ring state: persists across lg_run calls within one session */
    uint16_t avail_idx;      /* next avail index to publish */
    uint16_t last_used;      /* next used index to consume */

    /* per-run state */
    struct lg_slot *slots;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t inflight;
    uint64_t quota;          /* requests this queue may submit (UINT64_MAX: no limit) */
    uint64_t seq_next;       /* sequential: k-th request of this queue */
    uint64_t rng;
    uint64_t *lat;
    uint64_t lat_cap;
    struct lg_queue_result *res;
};

struct lg {
    struct lg_config cfg;
    int memfd;
    uint8_t *mem;
    uint64_t mem_size;
    uint64_t data_stride;
    struct lg_queue q[LG_MAX_QUEUES];
    atomic_bool stop;
    bool running;
};

struct lg_worker {
    struct lg *lg;
    const struct lg_run_params *p;
    struct lg_queue **qs;
    uint32_t nq;
    uint64_t start_ns, deadline_ns;
    uint64_t last_completion_ns;
    int rc;
    char error[256];
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void set_error(char *buf, size_t len, const char *fmt, ...)
{
    if (buf[0])
        return;  /* keep the first error */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

/* ---- setup ------------------------------------------------------------------------ */
int lg_abi_version(void)
{
    return LG_ABI_VERSION;
}

int lg_new(const struct lg_config *cfg, struct lg **out)
{
    uint32_t n = cfg->queue_size;
    if (cfg->num_queues < 1 || cfg->num_queues > LG_MAX_QUEUES)
        return -EINVAL;
    if (n < 4 || n > 32768 || (n & (n - 1)))
        return -EINVAL;
    if (cfg->max_qd < 1 || 3ull * cfg->max_qd > n)
        return -EINVAL;
    if (cfg->max_block_size < 512 || cfg->max_block_size % 512)
        return -EINVAL;

    struct lg *lg = calloc(1, sizeof(*lg));
    if (!lg)
        return -ENOMEM;
    lg->cfg = *cfg;
    lg->memfd = -1;
    lg->data_stride = align_up(cfg->max_block_size, 4096);
    for (uint32_t i = 0; i < LG_MAX_QUEUES; i++)
        lg->q[i].kick_fd = lg->q[i].call_fd = -1;

    /* Layout, per queue: desc | avail | used | headers | status | data slots. */
    uint64_t off = 0;
    for (uint32_t i = 0; i < cfg->num_queues; i++) {
        struct lg_queue *q = &lg->q[i];
        off = align_up(off, 4096);
        q->desc_off = off;
        off += 16ull * n;
        q->avail_off = off;
        off += 4 + 2ull * n + 2;
        off = align_up(off, 4096);  /* used ring on its own page: the device writes it */
        q->used_off = off;
        off += 4 + 8ull * n + 2;
        off = align_up(off, 64);
        q->hdr_off = off;
        off += 16ull * cfg->max_qd;
        off = align_up(off, 64);
        q->status_off = off;
        off += cfg->max_qd;
        off = align_up(off, 4096);
        q->data_off = off;
        off += lg->data_stride * cfg->max_qd;
    }
    lg->mem_size = align_up(off, 2u << 20);

    int rc;
    lg->memfd = memfd_create("fastshadow-loadgen-guest-ram", MFD_CLOEXEC);
    if (lg->memfd < 0) {
        rc = -errno;
        goto fail;
    }
    if (ftruncate(lg->memfd, (off_t)lg->mem_size) < 0) {
        rc = -errno;
        goto fail;
    }
    void *m = mmap(NULL, lg->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, lg->memfd, 0);
    if (m == MAP_FAILED) {
        rc = -errno;
        goto fail;
    }
    lg->mem = m;

    for (uint32_t i = 0; i < cfg->num_queues; i++) {
        struct lg_queue *q = &lg->q[i];
        q->index = i;
        q->desc = (struct vring_desc *)(lg->mem + q->desc_off);
        q->avail = (struct vring_avail *)(lg->mem + q->avail_off);
        q->used = (struct vring_used *)(lg->mem + q->used_off);
        q->used_event = &q->avail->ring[n];
        q->avail_event = (uint16_t *)&q->used->ring[n];
        q->hdr = (struct virtio_blk_outhdr *)(lg->mem + q->hdr_off);
        q->status = lg->mem + q->status_off;
        q->data = lg->mem + q->data_off;
        q->slots = calloc(cfg->max_qd, sizeof(*q->slots));
        q->free_slots = calloc(cfg->max_qd, sizeof(*q->free_slots));
        if (!q->slots || !q->free_slots) {
            rc = -ENOMEM;
            goto fail;
        }
        /* Same flags as QEMU's event notifiers: the backend reads kicks non-blocking. */
        q->kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        q->call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (q->kick_fd < 0 || q->call_fd < 0) {
            rc = -errno;
            goto fail;
        }
        /* Interrupts suppressed until the driver sleeps (see the file comment). */
        q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    }
    *out = lg;
    return 0;
fail:
    lg_free(lg);
    return rc;
}

void lg_free(struct lg *lg)
{
    if (!lg)
        return;
    for (uint32_t i = 0; i < LG_MAX_QUEUES; i++) {
        struct lg_queue *q = &lg->q[i];
        if (q->kick_fd >= 0)
            close(q->kick_fd);
        if (q->call_fd >= 0)
            close(q->call_fd);
        free(q->slots);
        free(q->free_slots);
    }
    if (lg->mem)
        munmap(lg->mem, lg->mem_size);
    if (lg->memfd >= 0)
        close(lg->memfd);
    free(lg);
}

int lg_mem_fd(struct lg *lg)
{
    return lg->memfd;
}

uint64_t lg_mem_size(struct lg *lg)
{
    return lg->mem_size;
}

uint64_t lg_mem_uaddr(struct lg *lg)
{
    return (uint64_t)(uintptr_t)lg->mem;
}

int lg_queue_info(struct lg *lg, uint32_t qi, struct lg_queue_info *out)
{
    if (qi >= lg->cfg.num_queues)
        return -EINVAL;
    struct lg_queue *q = &lg->q[qi];
    out->desc_gpa = q->desc_off;
    out->avail_gpa = q->avail_off;
    out->used_gpa = q->used_off;
    out->kick_fd = q->kick_fd;
    out->call_fd = q->call_fd;
    return 0;
}

void lg_stop(struct lg *lg)
{
    atomic_store(&lg->stop, true);
}

/* ---- data pattern ----------------------------------------------------------------- */
static inline uint64_t pattern_word(uint64_t disk_off, uint64_t seed)
{
    return splitmix64(disk_off ^ (seed * 0x2545f4914f6cdd1dull));
}

static void pattern_fill(uint8_t *buf, uint64_t disk_off, uint32_t len, uint64_t seed)
{
    uint64_t *w = (uint64_t *)buf;
    for (uint32_t i = 0; i < len / 8; i++)
        w[i] = pattern_word(disk_off + 8ull * i, seed);
}

static bool pattern_check(const uint8_t *buf, uint64_t disk_off, uint32_t len, uint64_t seed)
{
    const uint64_t *w = (const uint64_t *)buf;
    for (uint32_t i = 0; i < len / 8; i++)
        if (w[i] != pattern_word(disk_off + 8ull * i, seed))
            return false;
    return true;
}

/* ---- the driver loop -------------------------------------------------------------- */
static inline bool may_submit(struct lg_worker *w, struct lg_queue *q, uint64_t now)
{
    if (q->res->submitted >= q->quota)
        return false;
    if (w->deadline_ns && now >= w->deadline_ns)
        return false;
    return !atomic_load_explicit(&w->lg->stop, memory_order_relaxed);
}

static uint64_t next_offset(struct lg_queue *q, const struct lg_run_params *p)
{
    uint64_t blocks = p->span_bytes / p->block_size;
    uint64_t k;
    if (p->random) {
        k = xorshift64(&q->rng) % blocks;
    } else {
        /* Queues interleave one stream: queue q takes blocks q, q + nq, q + 2nq, ... */
        k = (q->seq_next * p->num_queues + q->index) % blocks;
        q->seq_next++;
    }
    return p->offset_base + k * p->block_size;
}

/* Refill every free slot we may use; publish once; kick if the device asks. */
static void submit(struct lg_worker *w, struct lg_queue *q)
{
    const struct lg_run_params *p = w->p;
    uint32_t n = w->lg->cfg.queue_size;
    uint16_t old = q->avail_idx;
    uint64_t t = 0;

    while (q->nfree > 0) {
        if (t == 0)
            t = now_ns();
        if (!may_submit(w, q, t))
            break;
        uint32_t s = q->free_slots[--q->nfree];
        struct lg_slot *slot = &q->slots[s];
        uint64_t off = next_offset(q, p);
        q->hdr[s].sector = off / 512;
        q->status[s] = 0xff;
        if (p->pattern && p->rw == LG_WRITE)
            pattern_fill(q->data + s * w->lg->data_stride, off, p->block_size, p->seed);
        else if (p->pattern)  /* poison, so that a read the device never served cannot pass */
            memset(q->data + s * w->lg->data_stride, 0xa5, p->block_size);
        slot->offset = off;
        slot->busy = true;
        slot->t_submit = t;
        uint32_t head = 3 * s;
        q->avail->ring[q->avail_idx % n] = (uint16_t)head;
        q->avail_idx++;
        q->inflight++;
        q->res->submitted++;
        DTRACE_PROBE3(fastshadow_loadgen, submit, q->index, head, p->block_size);
    }
    if (q->avail_idx == old)
        return;
    __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
    /* The avail index store must be visible before we read the device's
     * notification suppression (virtio_mb in Linux). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool kick;
    if (p->event_idx)
        kick = vring_need_event(__atomic_load_n(q->avail_event, __ATOMIC_RELAXED), q->avail_idx, old);
    else
        kick = !(__atomic_load_n(&q->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        ssize_t r;
        do {
            r = write(q->kick_fd, &one, sizeof(one));
        } while (r < 0 && errno == EINTR);
        q->res->kicks++;
    } else {
        q->res->kicks_skipped++;
    }
}

/* Consume the used ring. Returns completions harvested, or -1 on a device error. */
static int harvest(struct lg_worker *w, struct lg_queue *q, uint64_t *t)
{
    const struct lg_run_params *p = w->p;
    uint32_t n = w->lg->cfg.queue_size;
    uint16_t used_idx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    int got = 0;

    if ((uint16_t)(used_idx - q->last_used) > q->inflight) {
        set_error(w->error, sizeof(w->error), "queue %u: used index %u is %u entries ahead with %u in flight",
                  q->index, used_idx, (uint16_t)(used_idx - q->last_used), q->inflight);
        return -1;
    }
    while (q->last_used != used_idx) {
        if (*t == 0)
            *t = now_ns();
        struct vring_used_elem e = q->used->ring[q->last_used % n];
        q->last_used++;
        uint32_t s = e.id / 3;
        if (e.id % 3 || s >= w->lg->cfg.max_qd || !q->slots[s].busy) {
            set_error(w->error, sizeof(w->error), "queue %u: used id %u is not a request in flight",
                      q->index, e.id);
            return -1;
        }
        struct lg_slot *slot = &q->slots[s];
        struct lg_queue_result *r = q->res;
        uint64_t lat = *t - slot->t_submit;
        uint32_t expect_len = (p->rw == LG_READ ? p->block_size : 0) + 1;
        if (q->status[s] != VIRTIO_BLK_S_OK) {
            r->errors++;
            set_error(w->error, sizeof(w->error), "queue %u: request at offset %llu completed with status %u",
                      q->index, (unsigned long long)slot->offset, q->status[s]);
        } else {
            r->bytes += p->block_size;
            if (p->pattern && p->rw == LG_READ &&
                !pattern_check(q->data + s * w->lg->data_stride, slot->offset, p->block_size, p->seed))
                r->verify_errors++;
        }
        if (e.len != expect_len)
            r->len_mismatch++;
        if (r->recorded < q->lat_cap)
            q->lat[r->recorded++] = lat;
        r->completed++;
        slot->busy = false;
        q->free_slots[q->nfree++] = s;
        q->inflight--;
        got++;
        DTRACE_PROBE4(fastshadow_loadgen, complete, q->index, e.id, p->block_size, lat);
    }
    if (got)
        w->last_completion_ns = *t;
    return got;
}

static int harvest_all(struct lg_worker *w, uint64_t *t)
{
    int total = 0;
    for (uint32_t i = 0; i < w->nq; i++) {
        int r = harvest(w, w->qs[i], t);
        if (r < 0)
            return -1;
        total += r;
    }
    return total;
}

static bool any_used(struct lg_worker *w)
{
    for (uint32_t i = 0; i < w->nq; i++) {
        struct lg_queue *q = w->qs[i];
        if (q->inflight && __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->last_used)
            return true;
    }
    return false;
}

static void arm(struct lg_worker *w, bool on)
{
    for (uint32_t i = 0; i < w->nq; i++) {
        struct lg_queue *q = w->qs[i];
        if (w->p->event_idx) {
            if (on)  /* interrupt on the next used entry */
                __atomic_store_n(q->used_event, q->last_used, __ATOMIC_RELAXED);
        } else {
            __atomic_store_n(&q->avail->flags, on ? 0 : VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
        }
    }
}

/* Nothing to harvest: spin a while, then arm the interrupts and sleep. 0, or -1 on timeout. */
static int wait_completions(struct lg_worker *w)
{
    const struct lg_run_params *p = w->p;
    if (p->busy_poll_us) {
        uint64_t until = now_ns() + (uint64_t)p->busy_poll_us * 1000;
        do {
            if (any_used(w))
                return 0;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } while (now_ns() < until);
    }
    arm(w, true);
    /* The arm store must be visible before re-reading used->idx, or a
     * completion published in between would never be signalled. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (any_used(w)) {
        arm(w, false);
        return 0;
    }
    struct pollfd pfd[LG_MAX_QUEUES];
    struct lg_queue *pq[LG_MAX_QUEUES];
    uint32_t np = 0;
    for (uint32_t i = 0; i < w->nq; i++) {
        if (w->qs[i]->inflight) {
            pfd[np].fd = w->qs[i]->call_fd;
            pfd[np].events = POLLIN;
            pq[np++] = w->qs[i];
        }
    }
    for (uint32_t i = 0; i < np; i++)
        pq[i]->res->sleeps++;
    int r;
    do {
        r = poll(pfd, np, p->timeout_ms ? (int)p->timeout_ms : -1);
    } while (r < 0 && errno == EINTR);
    arm(w, false);
    if (r == 0) {
        if (any_used(w))  /* completed but never signalled: count it as a late wakeup, go on */
            return 0;
        for (uint32_t i = 0; i < np; i++)
            set_error(w->error, sizeof(w->error),
                      "queue %u: no completion within %u ms with %u requests in flight (used idx %u, "
                      "avail idx %u)", pq[i]->index, p->timeout_ms, pq[i]->inflight,
                      __atomic_load_n(&pq[i]->used->idx, __ATOMIC_ACQUIRE), pq[i]->avail_idx);
        return -1;
    }
    for (uint32_t i = 0; i < np; i++) {
        if (pfd[i].revents & POLLIN) {
            uint64_t v;
            if (read(pfd[i].fd, &v, sizeof(v)) == sizeof(v))
                pq[i]->res->wakeups++;
        }
    }
    return 0;
}

static void *worker_main(void *arg)
{
    struct lg_worker *w = arg;
    for (;;) {
        for (uint32_t i = 0; i < w->nq; i++)
            submit(w, w->qs[i]);
        uint32_t inflight = 0;
        for (uint32_t i = 0; i < w->nq; i++)
            inflight += w->qs[i]->inflight;
        if (inflight == 0)
            break;  /* nothing in flight and nothing more may be submitted: drained */
        uint64_t t = 0;
        int got = harvest_all(w, &t);
        if (got < 0) {
            w->rc = -EIO;
            break;
        }
        if (got == 0 && wait_completions(w) < 0) {
            w->rc = -ETIMEDOUT;
            break;
        }
    }
    return NULL;
}

int lg_run(struct lg *lg, const struct lg_run_params *p, struct lg_result *result)
{
    memset(result, 0, sizeof(*result));
    const struct lg_config *c = &lg->cfg;
    if (p->num_queues < 1 || p->num_queues > c->num_queues || p->qd < 1 || p->qd > c->max_qd ||
        p->block_size < 512 || p->block_size % 512 || p->block_size > c->max_block_size ||
        p->rw > LG_WRITE || p->span_bytes < p->block_size || p->offset_base % 512 ||
        (p->requests == 0 && p->duration_ns == 0) || (p->lat_cap && !p->lat_ns)) {
        snprintf(result->error, sizeof(result->error), "invalid run parameters");
        return -EINVAL;
    }
    if (lg->running) {
        snprintf(result->error, sizeof(result->error), "lg_run already running");
        return -EBUSY;
    }
    for (uint32_t i = 0; i < p->num_queues; i++) {
        if (lg->q[i].avail_idx != lg->q[i].last_used) {
            snprintf(result->error, sizeof(result->error),
                     "queue %u still has requests in flight from an earlier run", i);
            return -EBUSY;
        }
    }
    lg->running = true;
    atomic_store(&lg->stop, false);

    uint32_t nq = p->num_queues;
    uint64_t per_q_cap = p->lat_cap / nq;
    for (uint32_t i = 0; i < nq; i++) {
        struct lg_queue *q = &lg->q[i];
        q->res = &result->q[i];
        q->res->lat_offset = per_q_cap * i;
        q->lat = p->lat_ns ? p->lat_ns + per_q_cap * i : NULL;
        q->lat_cap = per_q_cap;
        q->quota = p->requests ? p->requests / nq + (i < p->requests % nq) : UINT64_MAX;
        q->seq_next = 0;
        q->rng = splitmix64(p->seed + 0x1000 * (i + 1)) | 1;
        q->inflight = 0;
        q->nfree = 0;
        /* Descriptors: written once per run (direction and length are fixed). */
        for (uint32_t s = 0; s < p->qd; s++) {
            uint32_t h = 3 * s;
            q->desc[h] = (struct vring_desc){q->hdr_off + 16ull * s, 16, VRING_DESC_F_NEXT, (uint16_t)(h + 1)};
            q->desc[h + 1] = (struct vring_desc){q->data_off + lg->data_stride * s, p->block_size,
                                                 (uint16_t)(VRING_DESC_F_NEXT |
                                                            (p->rw == LG_READ ? VRING_DESC_F_WRITE : 0)),
                                                 (uint16_t)(h + 2)};
            q->desc[h + 2] = (struct vring_desc){q->status_off + s, 1, VRING_DESC_F_WRITE, 0};
            q->hdr[s] = (struct virtio_blk_outhdr){p->rw == LG_READ ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT, 0, 0};
            q->slots[s].busy = false;
        }
        for (uint32_t s = p->qd; s-- > 0;)
            q->free_slots[q->nfree++] = s;  /* slot 0 is used first */
        q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    uint32_t nw = p->threads == LG_THREADS_PER_QUEUE ? nq : 1;
    struct lg_worker workers[LG_MAX_QUEUES];
    struct lg_queue *qptr[LG_MAX_QUEUES];
    for (uint32_t i = 0; i < nq; i++)
        qptr[i] = &lg->q[i];
    uint64_t start = now_ns();
    for (uint32_t i = 0; i < nw; i++) {
        workers[i] = (struct lg_worker){
            .lg = lg, .p = p,
            .qs = nw == 1 ? qptr : &qptr[i],
            .nq = nw == 1 ? nq : 1,
            .start_ns = start,
            .deadline_ns = p->duration_ns ? start + p->duration_ns : 0,
            .last_completion_ns = start,
        };
    }
    int rc = 0;
    if (nw == 1) {
        worker_main(&workers[0]);
    } else {
        pthread_t tid[LG_MAX_QUEUES];
        uint32_t started = 0;
        for (; started < nw; started++) {
            int e = pthread_create(&tid[started], NULL, worker_main, &workers[started]);
            if (e) {
                lg_stop(lg);
                rc = -e;
                snprintf(result->error, sizeof(result->error), "pthread_create: %s", strerror(e));
                break;
            }
        }
        for (uint32_t i = 0; i < started; i++)
            pthread_join(tid[i], NULL);
    }

    uint64_t last = start;
    for (uint32_t i = 0; i < nw; i++) {
        if (workers[i].last_completion_ns > last)
            last = workers[i].last_completion_ns;
        if (workers[i].rc && !rc) {
            rc = workers[i].rc;
            snprintf(result->error, sizeof(result->error), "%s", workers[i].error);
        }
        if (!rc && workers[i].error[0] && !result->error[0])
            snprintf(result->error, sizeof(result->error), "%s", workers[i].error);
    }
    result->elapsed_ns = last - start;
    for (uint32_t i = 0; i < nq; i++) {
        struct lg_queue_result *r = &result->q[i];
        result->submitted += r->submitted;
        result->completed += r->completed;
        result->bytes += r->bytes;
        result->errors += r->errors;
        result->len_mismatch += r->len_mismatch;
        result->verify_errors += r->verify_errors;
        result->kicks += r->kicks;
        result->sleeps += r->sleeps;
        result->wakeups += r->wakeups;
        lg->q[i].res = NULL;
        lg->q[i].lat = NULL;
    }
    lg->running = false;
    return rc;
}

/* ---- memcpy baseline -------------------------------------------------------------- */
int lg_memcpy_bench(uint64_t bytes, uint32_t iters, uint64_t *ns_per_iter)
{
    if (bytes == 0 || iters == 0)
        return -EINVAL;
    uint8_t *src = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED)
        return -errno;
    uint8_t *dst = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dst == MAP_FAILED) {
        int e = -errno;
        munmap(src, bytes);
        return e;
    }
    /* Pre-fault both buffers (and give src non-zero content). */
    for (uint64_t i = 0; i < bytes; i += 64)
        src[i] = (uint8_t)i;
    memset(dst, 1, bytes);
    for (uint32_t i = 0; i < iters; i++) {
        uint64_t t0 = now_ns();
        memcpy(dst, src, bytes);
        __asm__ __volatile__("" : : "r"(dst) : "memory");  /* keep the copy */
        ns_per_iter[i] = now_ns() - t0;
    }
    munmap(src, bytes);
    munmap(dst, bytes);
    return 0;
}
