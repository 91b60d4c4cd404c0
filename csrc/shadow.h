/*
 * shadow.h: one shadowed queue and the device it belongs to, as the engine
 * sees them, and the engine's hot path (shadow.c): guest avail -> shadow,
 * shadow used -> guest, the notification decisions and sending them.
 */
#ifndef FSDP_SHADOW_H
#define FSDP_SHADOW_H

#include "bounce.h"
#include "chain.h"
#include "events.h"
#include "fail.h"
#include "hist.h"
#include "log.h"
#include "mem.h"

enum { SD_FREE = 0, SD_HEAD = 1, SD_BODY = 2, SD_DONE = 3 };

/* Per shadow descriptor private record (indexed by shadow descriptor). */
struct fsdp_sdesc {
    uint64_t gpa;           /* the guest segment this shadow descriptor mirrors */
    uint64_t off;           /* its bounce bytes, offset from the queue's bounce base */
    uint32_t len;
    uint16_t flags;         /* VRING_DESC_F_WRITE */
    uint16_t next;          /* private chain link */
    uint32_t own_page;      /* fallback allocation of this segment alone */
    uint32_t own_npages;    /* 0 if part of the request's slab */
};

/* Per shadow head private record. */
struct fsdp_req {
    uint16_t guest_head;
    uint16_t ndesc;
    uint32_t slab_page;
    uint32_t slab_npages;   /* 0: segments carry their own allocations */
    uint64_t writable;
    uint64_t readable;
    uint64_t seq;           /* publish order, for re-publishing */
    uint16_t gidx;          /* guest avail position it was taken from */
    uint16_t sidx;          /* shadow avail position it was last published at */
    uint32_t published;     /* backends it was handed to (poison bound: max_replays) */
    bool parked;            /* never taken by the stopped backend: not waited for */
    uint64_t start_ns;      /* latency stamps (hist.h): started, shadowed; 0: not timed */
    uint64_t shadowed_ns;
    uint64_t ind_addr;      /* its indirect table (device IOTLB: forgotten at release) */
    uint32_t ind_len;
};

struct fsdp_devctx;

/* One shadowed queue: the guest split ring, its shadow split ring, and the
 * private record of every request in flight.  The loop's own per-queue state
 * is not here (loop.c, struct watch). */
struct fsdp_queue {
    struct fsdp_devctx *dev;    /* the device, as the engine sees it (below) */
    uint32_t idx;
    uint32_t num;           /* 0: not configured */
    bool num_pow2;          /* num is a power of two: ring_slot masks instead of dividing */

    /* guest side */
    uint64_t desc_uaddr, avail_uaddr, used_uaddr;
    bool addr_set;
    uint8_t *g_desc, *g_avail, *g_used;   /* translated; valid if rings_ok */
    bool rings_ok;
    bool start_pending;     /* started while its IOVA rings did not translate yet (queue.c) */
    uint32_t start_flags;
    bool mem_lost;          /* guest memory shrunk under us (guard.c): stopped for good */
    uint32_t guard_seen;    /* guard_faults() when last checked */
    uint16_t last_avail;    /* next guest avail entry to take */
    uint16_t used_idx;      /* our guest used idx */
    uint16_t signalled_used;
    bool signalled_used_valid;
    int guest_kick_fd, guest_call_fd;     /* dup'd, or -1 */
    bool guest_call_blocking;             /* no O_NONBLOCK: write(2) it (queue_notify) */

    /* shadow side */
    uint8_t *s_desc, *s_avail, *s_used, *s_bounce;   /* in the shadow region */
    uint64_t s_desc_off, s_avail_off, s_used_off, s_bounce_off;
    uint16_t s_avail_idx;   /* our shadow avail idx */
    uint16_t s_last_used;   /* next shadow used entry to read */
    uint16_t s_num_added;   /* published since the last kick decision */
    int backend_kick_fd, backend_call_fd; /* ours */

    /* state */
    bool started;
    bool stopping;
    bool broken;            /* guest ring corrupt: no more intake */
    bool backend_broken;    /* shadow used ring corrupt: no more harvest */
    bool throttled;         /* currently stalled on bounce/desc space */
    bool guest_event_idx, backend_event_idx;
    bool need_backend_kick, need_guest_call;
    bool guest_used_dirty;  /* used entries pushed, idx not yet published */
    bool more;              /* a pass ran out of budget: come back without sleeping */
    bool defer_arm;         /* set by the loop while it busy-polls: passes leave the
                               event idx fields alone, queue_arm sets them before
                               the loop sleeps */
    uint64_t seq;

    /* private bookkeeping, sized by num */
    uint32_t cap;           /* num the arrays below were allocated for */
    struct fsdp_sdesc *sd;
    struct fsdp_req *req;
    uint8_t *sstate;        /* SD_* per shadow descriptor */
    uint16_t *freelist;
    uint32_t nfree;
    struct fsdp_seg *scratch;   /* chain walker output */
    uint64_t *offs;             /* layout scratch */
    uint8_t *ind;               /* indirect table private copy */
    uint32_t inflight;
    uint32_t parked;        /* of which parked (see backend_stopped, queue.c) */

    struct fsdp_bounce bounce;
    struct fsdp_queue_stats st;
    struct fsdp_qhist h;        /* latency histograms and back-pressure time (hist.h) */

    /* dirty log: used ring writes are logged at log_used_gpa + offset */
    bool log_used;
    uint64_t log_used_gpa;
};

/*
 * What the queues of one device share, as the engine and the loop see it.
 * device.c's struct fsdp_dev starts with it and owns it; it changes only in
 * commands, between two passes.
 */
struct fsdp_devctx {
    uint32_t id;                /* in the dp's device table: events, probes, user_data */
    struct fsdp_evring *events; /* the dp's event ring */
    struct fsdp_mem mem;        /* guest memory table */
    struct fsdp_log log;        /* QEMU's dirty log (SET_LOG_BASE), or unmapped */
    uint64_t max_request_bytes; /* cap of one request's total length */
    uint32_t failure;           /* FSDP_FAIL_*: the device's error (fail.c) */
    uint32_t failure_first_queue; /* queues below: FSDP_FAIL_LEN0, no layout check */
    uint32_t min_readable, min_writable;  /* request layout (BAD_LAYOUT) */
    uint32_t max_replays;       /* re-publications before a request is poison */
    uint64_t stream_min;        /* buffers of this many bytes or more are copied
                                   with streaming stores (copy.c); 0: never */
    uint8_t *shadow;            /* the shadow region, mapped */
    uint64_t ring_reserve;      /* ring bytes reserved per queue slot */
    uint64_t slot_size;         /* ring_reserve + bounce: queue q's slot at q * slot_size */
    uint32_t num_queues;
    struct fsdp_queue *q;
    bool mem_lost_reported;     /* GUEST_MEMORY_LOST said (any queue's thread) */
};

/* The ring slot of free-running index idx.  A mask when num is a power of
 * two (what virtio 1.x requires of a split ring, so every real driver), a
 * division only otherwise: the hot path takes four slots per request and a
 * 32-bit division costs tens of cycles where the mask costs one. */
static inline uint32_t ring_slot(const struct fsdp_queue *q, uint16_t idx)
{
    return q->num_pow2 ? idx & (q->num - 1u) : idx % q->num;
}

/* One event record about queue q of device d. */
static inline void dev_event(const struct fsdp_devctx *d, uint32_t q, uint32_t code,
                             uint32_t head, uint64_t a, uint64_t b)
{
    ev_emit(d->events, d->id, q, code, head, a, b);
}

/* One pass: harvest the shadow used ring, take from the guest avail ring,
 * publish both indices, decide notifications (sets need_* flags).  Returns
 * true if anything moved. */
bool queue_process(struct fsdp_queue *q);
/* True if the rings hold work (used by busy-poll; read-only). */
bool queue_has_work(struct fsdp_queue *q);
/* Before the loop sleeps on a queue whose passes ran with defer_arm: ask the
 * guest for a kick and the backend for a call at their next entry (event
 * idx), then look again.  True if work arrived meanwhile: don't sleep. */
bool queue_arm(struct fsdp_queue *q);

/* The loop's batch of outgoing eventfd writes: add(arg, q, fd) queues one,
 * sent with the loop's next submit. */
struct fsdp_batch {
    void (*add)(void *arg, struct fsdp_queue *q, int fd);
    void *arg;
};
/* Send the kick and call the last pass decided (need_* flags): through the
 * loop's batch, or with write(2) now when batch is NULL (inline mode).
 * Returns FSDP_POLL_BACKEND_KICKED / FSDP_POLL_GUEST_CALLED for what went. */
uint32_t queue_notify(struct fsdp_queue *q, const struct fsdp_batch *batch);

/* The steps of one request, for queue.c's re-publishing and aborts. */
/* Copy the readable guest bytes of a request into its bounce space. */
uint64_t copy_in(struct fsdp_queue *q, uint16_t head);
/* Write its shadow descriptors and avail entry (published by the next pass). */
void write_shadow_chain(struct fsdp_queue *q, uint16_t head);
/* Write a guest used element (published by publish_guest_used). */
void push_guest_used(struct fsdp_queue *q, uint16_t head, uint32_t len);
/* Publish the guest used idx and decide whether to call the guest. */
void publish_guest_used(struct fsdp_queue *q);
/* Free a request's shadow descriptors and bounce space. */
void release_request(struct fsdp_queue *q, uint16_t head);
/* Complete the request at shadow head toward the guest with the device's
 * error (fail.c) and release it; counted in st.failed. */
void fail_request(struct fsdp_queue *q, uint16_t head);

#endif
