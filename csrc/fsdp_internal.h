/*
 * fsdp_internal.h: private structures of the data plane.
 *
 * Nothing here is visible to Python.  Two kinds of memory appear below and
 * must never be confused:
 *   - SHARED memory: guest RAM (guest rings and buffers; the guest may rewrite
 *     any byte at any time) and the shadow region (the backend may rewrite any
 *     byte at any time).  It is only touched through the vr_* accessors below,
 *     each of which performs exactly one load or store.
 *   - PRIVATE memory: everything allocated with malloc.  All bookkeeping of a
 *     request (its guest head, its validated segments, its bounce offsets,
 *     its writable size) lives here and only here.
 */
#ifndef FSDP_INTERNAL_H
#define FSDP_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <endian.h>

#include "fsdp.h"

#define FSDP_PAGE 4096u
#define FSDP_ALIGN_UP(x, a) (((x) + ((a) - 1)) / (a) * (a))

/* ------------------------------------------------------------------------ */
/* Split virtqueue layout (virtio 1.x, little endian).                        */

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* avail: flags u16, idx u16, ring[num] u16, used_event u16 */
static inline size_t vring_desc_size(uint32_t num) { return 16u * (size_t)num; }
static inline size_t vring_avail_size(uint32_t num) { return 6u + 2u * (size_t)num; }
static inline size_t vring_used_size(uint32_t num) { return 6u + 8u * (size_t)num; }

/* Offsets inside the avail and used rings. */
#define AVAIL_FLAGS 0
#define AVAIL_IDX 2
#define AVAIL_RING(i) (4 + 2 * (size_t)(i))
#define AVAIL_USED_EVENT(num) AVAIL_RING(num)
#define USED_FLAGS 0
#define USED_IDX 2
#define USED_RING(i) (4 + 8 * (size_t)(i))
#define USED_AVAIL_EVENT(num) USED_RING(num)

/* Linux's vring_need_event: true if event_idx lies in (old, new]. */
static inline bool vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

/*
 * Accessors for shared memory.  Each is one single-copy-atomic access of a
 * naturally aligned field (ring and descriptor-table alignment is checked at
 * SET_VRING_ADDR time), so the compiler can neither tear nor repeat it: a
 * value read once is the value used.  Ordering is requested explicitly where
 * the protocol needs it (acquire on the producer's idx, release on ours).
 */
static inline uint16_t vr_load16(const void *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED));
}
static inline uint16_t vr_load16_acquire(const void *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE));
}
static inline uint32_t vr_load32(const void *p)
{
    return le32toh(__atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED));
}
static inline uint64_t vr_load64(const void *p)
{
    return le64toh(__atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED));
}
static inline void vr_store16(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELAXED);
}
static inline void vr_store16_release(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELEASE);
}
static inline void vr_store32(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, htole32(v), __ATOMIC_RELAXED);
}
static inline void vr_store64(void *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, htole64(v), __ATOMIC_RELAXED);
}
/* Full fence: orders an earlier store before a later load (the one ordering
 * acquire/release cannot give).  Used around notification decisions. */
static inline void vr_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* One descriptor read from shared memory field by field into private memory. */
static inline struct vring_desc vr_read_desc(const uint8_t *p)
{
    struct vring_desc d;
    d.addr = vr_load64(p);
    d.len = vr_load32(p + 8);
    d.flags = vr_load16(p + 12);
    d.next = vr_load16(p + 14);
    return d;
}

/* ------------------------------------------------------------------------ */
/* Guest memory (mem.c).                                                      */

struct fsdp_region {
    uint64_t gpa, size, uaddr;
    uint8_t *host;          /* host pointer of gpa */
    void *map_base;         /* what mmap returned (host - alignment slack) */
    size_t map_len;
};

struct fsdp_mem {
    uint32_t n;
    uint32_t last;          /* index of the last region hit (lookup cache) */
    struct fsdp_region r[FSDP_MAX_MEM_REGIONS];   /* sorted by gpa, disjoint */
};

/* A contiguous host piece of a guest range. */
struct fsdp_piece {
    uint8_t *host;
    uint64_t len;
};

int mem_map_region(const struct fsdp_mem_region *in, struct fsdp_region *out);
void mem_unmap_region(struct fsdp_region *r);
int mem_validate_table(const struct fsdp_region *r, uint32_t n);
void mem_sort(struct fsdp_region *r, uint32_t n);
/* 0 if [gpa, gpa+len) is entirely mapped (possibly across adjacent regions),
 * else FSDP_EV_ADDR_OVERFLOW or FSDP_EV_ADDR_UNMAPPED. */
int mem_check_range(struct fsdp_mem *m, uint64_t gpa, uint64_t len);
/* Copies; return 0 or the event code (range not mapped). */
int mem_copy_from_guest(struct fsdp_mem *m, void *dst, uint64_t gpa, uint64_t len, bool stream);
/* stream: write guest RAM with streaming stores (copy.c). */
int mem_copy_to_guest(struct fsdp_mem *m, uint64_t gpa, const void *src, uint64_t len,
                      bool stream);
/* copy.c: memcpy with non-temporal stores (x86; memcpy elsewhere). */
void copy_stream(void *dst, const void *src, size_t n);
static inline void copy_bytes(void *dst, const void *src, size_t n, bool stream)
{
    if (stream)
        copy_stream(dst, src, n);
    else
        memcpy(dst, src, n);
}
/* Host pointer of [uaddr, uaddr+len) if it lies within one region. */
uint8_t *mem_uaddr_to_host(struct fsdp_mem *m, uint64_t uaddr, uint64_t len);

/* ------------------------------------------------------------------------ */
/* Event ring (events.c).                                                     */

struct fsdp_evring {
    pthread_mutex_t lock;
    struct fsdp_event *ev;
    uint32_t size, head, count;
    uint64_t lost;
    int efd;
};
int evring_init(struct fsdp_evring *r, uint32_t size);
void evring_destroy(struct fsdp_evring *r);
void evring_push(struct fsdp_evring *r, const struct fsdp_event *e);
/* Copies up to max records out; *lost = records dropped since the last call. */
int evring_drain(struct fsdp_evring *r, struct fsdp_event *out, uint32_t max, uint64_t *lost);
/* One record about queue q of device dev. */
void ev_emit(struct fsdp_evring *r, uint32_t dev, uint32_t q, uint32_t code, uint32_t head,
             uint64_t a, uint64_t b);

/* ------------------------------------------------------------------------ */
/* Dirty log for migration (log.c).                                           */

struct fsdp_log {
    /* Mapped like a guest region (mem.c): map.host is the bitmap (bit p % 8
     * of byte p / 8: guest page p written), map.size its bytes. */
    struct fsdp_region map;
    bool overflow_reported; /* FSDP_EV_LOG_OUT_OF_RANGE said once per log */
    bool on;                /* VHOST_F_LOG_ALL negotiated: writes are logged */
};

struct fsdp_evring;
int log_map(int fd, uint64_t size, uint64_t offset, struct fsdp_log *out);
void log_unmap(struct fsdp_log *l);
/* Mark the guest pages of [gpa, gpa + len) if logging is on; returns pages
 * marked.  A page past the log is reported once per log on ev as device
 * dev, queue q. */
uint64_t log_write(struct fsdp_log *l, struct fsdp_evring *ev, uint32_t dev, uint32_t q,
                   uint64_t gpa, uint64_t len);

/* ------------------------------------------------------------------------ */
/* Chain walker (chain.c).                                                    */

struct fsdp_seg {
    uint64_t gpa;
    uint32_t len;
    uint16_t flags;         /* VRING_DESC_F_WRITE only */
};

struct fsdp_chain {
    uint32_t n;             /* segments */
    uint32_t steps;         /* descriptors read (cost, for the per-pass budget) */
    uint64_t readable;      /* bytes */
    uint64_t writable;
    /* on refusal */
    uint32_t err;           /* event code */
    uint64_t err_a, err_b;
};

/* Walk and validate the chain at head (< num).  table points at the guest
 * descriptor table (shared); segs has room for num entries; ind is private
 * scratch of 16*num bytes for indirect tables.  Returns 0 or an event code. */
int chain_walk(struct fsdp_mem *m, const uint8_t *table, uint32_t num, uint16_t head,
               uint64_t max_bytes, struct fsdp_seg *segs, uint8_t *ind,
               struct fsdp_chain *out);

/* ------------------------------------------------------------------------ */
/* Bounce allocator (bounce.c): pages of one queue's bounce area.             */

struct fsdp_bounce {
    uint32_t npages;
    uint32_t nfree;
    uint32_t cursor;        /* next-fit start */
    uint64_t *bitmap;       /* 1 = used */
};

int bounce_init(struct fsdp_bounce *b, uint32_t npages);
void bounce_destroy(struct fsdp_bounce *b);
void bounce_reset(struct fsdp_bounce *b);
/* First page of a free run of n pages, or -1. */
int64_t bounce_alloc(struct fsdp_bounce *b, uint32_t n);
void bounce_free(struct fsdp_bounce *b, uint32_t first, uint32_t n);

/* Layout of a request inside a slab: small buffers (<= 64 B) packed at 64-B
 * alignment first, then larger ones each page aligned (compact: all at 64 B).  Returns the slab size in bytes and
 * fills offs[i] (offset of segment i inside the slab). */
uint64_t bounce_layout(const struct fsdp_seg *segs, uint32_t n, uint64_t *offs, bool compact);

/* ------------------------------------------------------------------------ */
/* Queues and devices (shadow.c, device.c).                                   */

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
    bool parked;            /* never taken by the stopped backend: not waited for */
};

struct fsdp_devctx;

struct fsdp_queue {
    struct fsdp_devctx *dev;
    uint32_t idx;
    uint32_t num;           /* 0: not configured */

    /* guest side */
    uint64_t desc_uaddr, avail_uaddr, used_uaddr;
    bool addr_set;
    uint8_t *g_desc, *g_avail, *g_used;   /* translated; valid if rings_ok */
    bool rings_ok;
    uint16_t last_avail;    /* next guest avail entry to take */
    uint16_t used_idx;      /* our guest used idx */
    uint16_t signalled_used;
    bool signalled_used_valid;
    int guest_kick_fd, guest_call_fd;     /* dup'd, or -1 */
    bool guest_call_blocking;             /* no O_NONBLOCK: signal with write(2), see loop.c */

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
    uint32_t parked;        /* of which parked (see queue_backend_stopped) */

    struct fsdp_bounce bounce;
    struct fsdp_queue_stats st;

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
    uint64_t stream_min;        /* buffers of this many bytes or more are copied
                                   with streaming stores (copy.c); 0: never */
    uint8_t *shadow;            /* the shadow region, mapped */
    uint64_t ring_reserve;      /* ring bytes reserved per queue slot */
    uint64_t slot_size;         /* ring_reserve + bounce: queue q's slot at q * slot_size */
    uint32_t num_queues;
    struct fsdp_queue *q;
};

static inline void dev_event(const struct fsdp_devctx *d, uint32_t q, uint32_t code,
                             uint32_t head, uint64_t a, uint64_t b)
{
    ev_emit(d->events, d->id, q, code, head, a, b);
}

/* shadow.c: the engine (hot path). */
void push_guest_used(struct fsdp_queue *q, uint16_t head, uint32_t len);
void publish_guest_used(struct fsdp_queue *q);
void write_shadow_chain(struct fsdp_queue *q, uint16_t head);
uint64_t copy_in(struct fsdp_queue *q, uint16_t head);
void release_request(struct fsdp_queue *q, uint16_t head);
/* One pass: harvest the shadow used ring, take from the guest avail ring,
 * publish both indices, decide notifications (sets need_* flags).  Returns
 * true if anything moved. */
bool queue_process(struct fsdp_queue *q);

/* queue.c: the lifecycle. */
void queue_init(struct fsdp_queue *q, struct fsdp_devctx *dev, uint32_t idx);
int queue_open(struct fsdp_queue *q);
void queue_destroy(struct fsdp_queue *q);
int queue_set_num(struct fsdp_queue *q, uint32_t num);
int queue_set_base(struct fsdp_queue *q, uint32_t avail_idx);
int queue_set_addr(struct fsdp_queue *q, uint64_t desc, uint64_t avail, uint64_t used);
int queue_translate_rings(struct fsdp_queue *q, bool emit);
int queue_start(struct fsdp_queue *q, uint32_t flags);
bool queue_pause(struct fsdp_queue *q);
void queue_stop(struct fsdp_queue *q, int64_t backend_next_avail, struct fsdp_stop_result *res);
void queue_stop_result(const struct fsdp_queue *q, struct fsdp_stop_result *res);
/* Finish a stop: the queue leaves the started state; requests still in
 * flight stay ours.  Fills res (if given) with queue_stop_result. */
void queue_stop_finish(struct fsdp_queue *q, struct fsdp_stop_result *res);
void queue_reset(struct fsdp_queue *q);
int queue_abort(struct fsdp_queue *q);
int queue_clear_shadow(struct fsdp_queue *q);
/* A stop is waiting for requests the backend took. */
static inline bool queue_draining(const struct fsdp_queue *q) { return q->inflight > q->parked; }
/* True if the rings hold work (used by busy-poll; read-only). */
bool queue_has_work(struct fsdp_queue *q);
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

/* loop.c: command channel. */
struct fsdp_dp;
struct fsdp_cmd;
typedef int (*fsdp_cmd_fn)(struct fsdp_dp *dp, struct fsdp_cmd *c);
/* The loop's part of a command: what to run, and how it ended.  The caller
 * embeds it in its own record with the command's arguments (device.c's
 * struct dev_cmd). */
struct fsdp_cmd {
    fsdp_cmd_fn fn;
    int rc;
    bool done;
    bool deferrable;        /* running on the loop: fn may leave it pending */
    bool deferred;          /* fn left it pending; completed later by the loop */
    struct fsdp_cmd *next;
};
int dp_exec(struct fsdp_dp *dp, struct fsdp_cmd *c);
/* Wait at most timeout_ms (< 0: forever); on timeout run cancel (which
 * lets go of c) on the loop and wait for both. */
int dp_exec_timed(struct fsdp_dp *dp, struct fsdp_cmd *c, int64_t timeout_ms,
                  struct fsdp_cmd *cancel);
/* Only inline: -EBUSY while the loop runs (synchronous engine entry). */
int dp_exec_inline(struct fsdp_dp *dp, struct fsdp_cmd *c);
void dp_cmd_complete(struct fsdp_dp *dp, struct fsdp_cmd *c, int rc);
const struct fsdp_dp_config *dp_config(struct fsdp_dp *dp);
struct fsdp_evring *dp_events(struct fsdp_dp *dp);
/* The loop's device table (on the loop).  dp_detach fails a stop still
 * waiting on one of the device's queues with -ENODEV. */
int dp_attach(struct fsdp_dp *dp, struct fsdp_devctx *d);
void dp_detach(struct fsdp_dp *dp, struct fsdp_devctx *d);
/* Loop stopped: detach a device still in the table and return it (NULL:
 * none left), then free the dp itself (fsdp_dp_free, device.c). */
struct fsdp_devctx *dp_take_dev(struct fsdp_dp *dp);
void dp_destroy(struct fsdp_dp *dp);
/* The guest kick fd of q was replaced (on loop): cancel the read armed on the old one. */
void dp_kick_fd_changed(struct fsdp_dp *dp, struct fsdp_queue *q);
/* Stops that wait for a queue to drain (on loop).  dp_stop_wait parks c
 * (deferred) until nothing the backend took is left in flight; the loop then
 * finishes the stop (queue_stop_finish fills res) and completes c with 0.
 * dp_stop_end finishes it early with rc (only: that command, or any). */
bool dp_stop_waiting(struct fsdp_dp *dp, const struct fsdp_queue *q);
int dp_stop_wait(struct fsdp_dp *dp, struct fsdp_queue *q, struct fsdp_cmd *c,
                 struct fsdp_stop_result *res);
bool dp_stop_end(struct fsdp_dp *dp, struct fsdp_queue *q, const struct fsdp_cmd *only, int rc);

#endif
