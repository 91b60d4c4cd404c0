/*
 * fsdp.h: the public interface of fastshadow's C data plane.
 *
 * This header is also the cffi cdef (csrc/build_ffi.py strips preprocessor
 * lines and the FSDP_C_ONLY sections), so outside those sections it holds
 * plain declarations only: fixed-width types, structs, enums, prototypes.
 * Functions return 0 (or a count) or a negative errno; the Python layer
 * (fastshadow/dataplane.py) turns those into exceptions.
 *
 * Objects:
 *   struct fsdp_dp   one data-plane loop: its thread (io_uring), command
 *                    channel, event ring and device table.  A process may
 *                    have several, each serving its own devices (the Python
 *                    DataPlane spreads devices over them); nothing is shared
 *                    between two of them.  When its loop is not running,
 *                    every call executes on the caller's thread (the
 *                    synchronous engine used by tests: fsdp_dev_poll).
 *   struct fsdp_dev  one per vhost-user device in isolated mode: guest memory
 *                    table, the shadow region (a sealed memfd) and one shadow
 *                    split virtqueue per guest queue.
 *
 * Threading: every fsdp_dev_* / fsdp_queue_* call may come from any thread;
 * while the loop runs it is executed ON the thread of the device's loop (the
 * dp it was added to) between two batches (the caller blocks until it is
 * done), otherwise inline under that dp's lock.
 * fsdp_dev_poll is refused (-EBUSY) while the loop runs.
 */
#ifndef FSDP_H
#define FSDP_H
/* FSDP_C_ONLY_BEGIN */
#include <stdint.h>
#include <stddef.h>

/* Where the backend is told the shadow region lives.  Both are fake and
 * stable: no real host virtual address ever reaches the backend.  Non-zero
 * GPA so that a zeroed descriptor never points into the region. */
#define FSDP_SHADOW_GPA_BASE   0x100000000ULL
#define FSDP_SHADOW_UADDR_BASE 0x7e0000000000ULL
/* FSDP_C_ONLY_END */

/* Bumped whenever this interface changes; checked at import. */
#define FSDP_ABI_VERSION 7
int fsdp_abi_version(void);

/* Limits and flags (enums so that cffi sees them as constants too). */
enum {
    FSDP_MAX_MEM_REGIONS = 64,
    FSDP_MAX_QUEUE_SIZE = 32768,
    FSDP_MAX_QUEUES = 64,
    FSDP_NAME_MAX = 64,
};

/* Device IOTLB access permissions (struct vhost_iotlb_msg perm:
 * VHOST_ACCESS_RO = 1, VHOST_ACCESS_WO = 2, VHOST_ACCESS_RW = 3). */
enum {
    FSDP_IOTLB_RO = 1,              /* the device may read */
    FSDP_IOTLB_WO = 2,              /* the device may write */
    FSDP_IOTLB_MAX_ENTRIES = 1048576, /* the largest cap fsdp_dev_iotlb_enable takes */
};

/* fsdp_queue_start flags. */
enum {
    FSDP_QF_GUEST_EVENT_IDX = 1,    /* VIRTIO_RING_F_EVENT_IDX on the guest ring */
    FSDP_QF_BACKEND_EVENT_IDX = 2,  /* ... and on the shadow ring */
    FSDP_QF_BACKEND_LOST = 4,       /* the backend that held the kept requests died with
                                       them: their re-publication counts toward
                                       max_replays (a ring stop it survived does not) */
};

/* How a refused or failed request is completed toward the guest
 * (fsdp_dev_config.failure; DESIGN.md section 3.7: no completion lies). */
enum {
    FSDP_FAIL_LEN0 = 0,             /* used.len 0, nothing written (no device error defined) */
    FSDP_FAIL_BLK_STATUS = 1,       /* virtio-blk: last writable byte = VIRTIO_BLK_S_IOERR, len 1 */
    FSDP_FAIL_SCSI_RESPONSE = 2,    /* virtio-scsi: virtio_scsi_cmd_resp, response
                                       VIRTIO_SCSI_S_FAILURE, len 12 */
    FSDP_FAIL_FUSE_ERROR = 3,       /* virtio-fs: fuse_out_header {16, -EIO, unique}, len 16 */
};

/* fsdp_dev_poll out_flags. */
enum {
    FSDP_POLL_BACKEND_KICKED = 1,
    FSDP_POLL_GUEST_CALLED = 2,
    FSDP_POLL_PROGRESS = 4,         /* something moved on some ring */
    FSDP_POLL_MORE = 8,             /* a queue ran out of its per-pass budget: poll again */
};

/*
 * Event codes.  One event record is emitted per refused request, per broken
 * queue and per backend protocol violation.  The meaning of a and b is given
 * per code (see fsdp_event_str and fastshadow/dataplane.py).
 */
enum fsdp_event_code {
    FSDP_EV_NONE = 0,
    /* A guest chain refused: completed toward the guest with the device's
     * error (fsdp_dev_config.failure), or len 0 where it cannot be placed. */
    FSDP_EV_DESC_NEXT_OUT_OF_RANGE = 1,   /* a = next, b = table size */
    FSDP_EV_CHAIN_TOO_LONG = 2,           /* a = limit (loop or > queue size) */
    FSDP_EV_ADDR_UNMAPPED = 3,            /* a = gpa, b = len */
    FSDP_EV_ADDR_OVERFLOW = 4,            /* a = gpa, b = len */
    FSDP_EV_INDIRECT_NESTED = 5,          /* a = descriptor index in the table */
    FSDP_EV_INDIRECT_BAD_LEN = 6,         /* a = len, b = max len */
    FSDP_EV_INDIRECT_WITH_NEXT = 7,       /* a = descriptor index */
    FSDP_EV_WRITABLE_BEFORE_READABLE = 8, /* a = position in the chain */
    FSDP_EV_REQUEST_TOO_LARGE = 9,        /* a = bytes, b = cap */
    FSDP_EV_ZERO_LENGTH = 10,             /* a = chain position of the 0-length descriptor */
    FSDP_EV_BAD_LAYOUT = 11,              /* a = readable bytes, b = writable bytes */
    FSDP_EV_IOVA_UNMAPPED = 12,           /* a = iova, b = len: QEMU answered the miss
                                             without a translation */
    FSDP_EV_IOVA_PERM = 13,               /* a = iova, b = len: the mapping lacks the
                                             access (a device write to a read-only IOVA) */
    /* A corrupt guest ring: the queue is broken and stops. */
    FSDP_EV_BAD_HEAD = 16,                /* a = head, b = queue size */
    FSDP_EV_AVAIL_IDX_JUMP = 17,          /* a = avail idx, b = last avail idx */
    FSDP_EV_RING_UNMAPPED = 18,           /* a = ring uaddr: memory table change */
    /* A backend protocol violation on the shadow used ring. */
    FSDP_EV_USED_UNKNOWN_ID = 32,         /* a = id */
    FSDP_EV_USED_DOUBLE_COMPLETION = 33,  /* a = id */
    FSDP_EV_USED_LEN_TOO_LARGE = 34,      /* a = len, b = writable bytes; failed toward guest */
    FSDP_EV_BAD_STOP_INDEX = 36,          /* a = backend's next avail, b = our shadow avail idx */
    FSDP_EV_REQUEST_POISONED = 37,        /* a = times published; failed toward guest */
    FSDP_EV_BACKEND_FAILED = 38,          /* a = backend used idx, b = our last used: the
                                             shadow used ring is untrusted, harvest stops
                                             until the next start (drop the backend) */
    /* Other. */
    FSDP_EV_COPYBACK_UNMAPPED = 48,       /* a = gpa, b = len; request failed toward guest */
    FSDP_EV_INFLIGHT_ABORTED = 49,        /* a = requests failed toward guest */
    FSDP_EV_EVENTS_LOST = 50,             /* a = count (synthesised by the reader) */
    FSDP_EV_LOOP_ERROR = 51,              /* a = -errno from io_uring */
    FSDP_EV_LOG_OUT_OF_RANGE = 52,        /* a = gpa, b = log bytes; once per log */
    FSDP_EV_GUEST_MEMORY_LOST = 53,       /* a = gpa, b = size of the region whose file the
                                             front-end shrank (SIGBUS caught): device stopped */
    /* Not a refusal: the queue waits for a translation QEMU must send
     * (VHOST_IOTLB_MISS), then fsdp_queue_iotlb_answered. */
    FSDP_EV_IOTLB_MISS = 54,              /* a = iova, b = access (FSDP_IOTLB_*) */
};

struct fsdp_event {
    uint32_t dev;
    uint32_t queue;
    uint32_t code;
    uint32_t head;      /* guest head index where relevant, else 0 */
    uint64_t a;
    uint64_t b;
};

struct fsdp_queue_stats {
    uint64_t requests;       /* guest requests shadowed (published to the backend) */
    uint64_t bytes_in;       /* bytes copied guest -> bounce (to the backend) */
    uint64_t bytes_out;      /* bytes copied bounce -> guest */
    uint64_t refused;        /* guest chains refused (failed toward the guest) */
    uint64_t guest_kicks;    /* guest kick eventfd completions seen */
    uint64_t backend_kicks;  /* eventfd writes toward the backend */
    uint64_t backend_calls;  /* backend call eventfd completions seen */
    uint64_t guest_calls;    /* eventfd writes toward the guest */
    uint64_t throttled;      /* intake stalls for lack of bounce space/descriptors */
    uint64_t inflight;       /* requests currently owned by the backend */
    uint64_t completed;      /* requests completed toward the guest (any len) */
    uint64_t backend_errors; /* shadow used entries refused */
    uint64_t log_pages;      /* dirty-log page marks made (migration logging) */
    uint64_t failed;         /* completed toward the guest with the device's error (or
                                len 0): refused, lied about, aborted, poisoned */
    uint64_t poisoned;       /* failed instead of a publication beyond 1 + max_replays */
    uint64_t discarded;      /* kept requests dropped untouched (fsdp_queue_discard) */
    uint64_t bounce_bytes;   /* bounce space held by requests now (a gauge, bytes) */
    uint64_t throttled_ns;   /* time intake waited for bounce space/descriptors
                                (back-pressure), cumulative, ns */
    uint64_t refused_by[16]; /* refused, by enum fsdp_event_code (the chain and IOVA
                                refusals: codes 1..15); [0]: any other code */
};

/*
 * Latency histograms the data plane keeps itself (hist.c; always on unless
 * fsdp_dp_config.no_latency_hist).  Per queue and hop, log2 buckets of
 * microseconds: bucket 0 counts durations below 1 us, bucket s (1..31)
 * durations in [2^(s-1), 2^s) us; the last one also everything longer.
 * Timed: every request the backend completed (one sample per hop; a request
 * still in flight has only its kick_to_shadowed sample); not timed: refused
 * requests, and those failed toward the guest (lying backend, abort, poison).
 */
enum {
    FSDP_HOP_KICK_SHADOWED = 0,   /* guest kick seen -> request shadowed (copied, published) */
    FSDP_HOP_BACKEND = 1,         /* request shadowed -> backend call seen for its completion */
    FSDP_HOP_CALL_USED = 2,       /* backend call seen -> guest used element written */
    FSDP_HOP_END_TO_END = 3,      /* guest kick seen -> guest used element written */
    FSDP_HIST_HOPS = 4,
    FSDP_HIST_SLOTS = 32,
};

struct fsdp_queue_hist {
    uint64_t count[4][32];   /* [FSDP_HIST_HOPS][FSDP_HIST_SLOTS] */
    uint64_t sum_ns[4];      /* per hop: sum of the durations counted, ns */
};

struct fsdp_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uaddr;        /* QEMU's user address (to translate SET_VRING_ADDR) */
    uint64_t mmap_offset;
    int32_t fd;            /* the caller's; mapped, never kept */
};

struct fsdp_dp_config {
    uint32_t busy_poll_us;      /* spin on the rings up to this long before sleeping (adaptive) */
    uint32_t poll_interval_us;  /* wait timeout while a queue has no kick fd (0: 100) */
    uint32_t event_ring_size;   /* records (0: 1024) */
    uint64_t stream_copy_min;   /* buffers of at least this many bytes are copied
                                   (both ways) with streaming stores (0: never) */
    uint32_t no_latency_hist;   /* 1: keep no latency histograms (hist.c; to measure
                                   what they cost) */
    uint32_t idle_trim_ms;      /* a queue whose bounce area was used and has held no
                                   request this long gets its bounce pages given back
                                   (MADV_REMOVE on the shadow memfd); 0: never */
    uint32_t loop_index;        /* names the thread "fsdp-loop<index>" */
};

struct fsdp_dev_config {
    uint32_t num_queues;          /* 1..FSDP_MAX_QUEUES */
    uint32_t max_queue_size;      /* shadow ring space reserved per queue (0: 32768) */
    uint64_t shadow_size;         /* 0: computed; else >= the computed minimum */
    uint64_t max_request_bytes;   /* cap of one request's total length (0: 4 MiB) */
    uint64_t bounce_per_queue;    /* bytes (0: 16 MiB), rounded up to pages */
    uint32_t failure;             /* FSDP_FAIL_*: how refused/failed requests complete */
    uint32_t failure_first_queue; /* queues below it use FSDP_FAIL_LEN0 and no layout check */
    uint32_t min_readable;        /* layout: a chain needs at least this many readable */
    uint32_t min_writable;        /* ... and writable bytes, or it is refused (BAD_LAYOUT) */
    uint32_t max_replays;         /* re-publications of one request (queue start) before
                                     it is failed as poison instead (0: never re-published) */
};

struct fsdp_dev_info {
    uint32_t id;                 /* unique in the process while the device exists (events, probes) */
    uint32_t num_queues;
    uint32_t max_queue_size;
    int32_t shadow_fd;           /* owned by the data plane; hand to the backend (each
                                    fsdp_dev_renew_backend_side replaces it) */
    uint64_t shadow_size;
    uint64_t shadow_gpa;         /* FSDP_SHADOW_GPA_BASE */
    uint64_t shadow_uaddr;       /* FSDP_SHADOW_UADDR_BASE */
    uint64_t queue_slot_size;    /* bytes of shadow region per queue */
    uint64_t bounce_per_queue;
};

struct fsdp_dp;
struct fsdp_dev;

/* Data plane: loop, commands, events. */
int fsdp_dp_new(const struct fsdp_dp_config *cfg, struct fsdp_dp **out);
void fsdp_dp_free(struct fsdp_dp *dp);          /* stops the loop, frees devices */
int fsdp_dp_start(struct fsdp_dp *dp);
int fsdp_dp_stop(struct fsdp_dp *dp);           /* joins the thread */
int fsdp_dp_running(struct fsdp_dp *dp);
/* The loop thread's kernel tid (for sched_setaffinity), 0 if not running. */
int fsdp_dp_thread_id(struct fsdp_dp *dp);
/* Bounce pages given back to the kernel by idle trims since the dp was made. */
uint64_t fsdp_dp_trimmed_pages(struct fsdp_dp *dp);
int fsdp_dp_event_fd(struct fsdp_dp *dp);
/* The loop's current busy-poll window (adapts between 0 and busy_poll_us). */
uint64_t fsdp_dp_poll_window_ns(struct fsdp_dp *dp);
/* Copies up to max events out; returns the count; *lost = records dropped
 * because the ring was full since the last call. */
int fsdp_dp_drain_events(struct fsdp_dp *dp, struct fsdp_event *out, uint32_t max,
                         uint64_t *lost);
const char *fsdp_event_name(uint32_t code);
const char *fsdp_event_str(uint32_t code);

/* Devices. */
int fsdp_dev_add(struct fsdp_dp *dp, const char *name, const struct fsdp_dev_config *cfg,
                 struct fsdp_dev **out);
int fsdp_dev_remove(struct fsdp_dev *dev);      /* frees dev */
int fsdp_dev_info(struct fsdp_dev *dev, struct fsdp_dev_info *out);
int fsdp_dev_set_mem_table(struct fsdp_dev *dev, const struct fsdp_mem_region *regions,
                           uint32_t n);
int fsdp_dev_add_mem_region(struct fsdp_dev *dev, const struct fsdp_mem_region *region);
int fsdp_dev_remove_mem_region(struct fsdp_dev *dev, uint64_t gpa, uint64_t size);
int fsdp_dev_reset(struct fsdp_dev *dev);
/* Each new backend connection: a new shadow memfd (same size, sealed, mapped
 * at the old one's address) and new backend kick and call eventfds for every
 * queue, the old ones closed.  A previous backend that is still alive (cut
 * off for lying, or finishing the requests of a deleted export) then keeps
 * nothing that reaches the device: its writes to the old shadow rings and
 * bounce buffers, its reads of the old kick eventfds and writes to the old
 * call eventfds have no effect.  The bounce bytes of requests the queues
 * keep are copied; the shadow rings start zeroed.  fds taken from
 * fsdp_dev_info / fsdp_queue_backend_fds before are closed: take them again.
 * Only while no queue is started: -EBUSY otherwise; -errno (ENOMEM, EMFILE,
 * ...) if the new fds cannot be made, and nothing changed. */
int fsdp_dev_renew_backend_side(struct fsdp_dev *dev);
/* Dirty log for migration: QEMU's log (SET_LOG_BASE: fd mapped, never kept;
 * fd < 0 unmaps), and whether writes are logged (VHOST_F_LOG_ALL). */
int fsdp_dev_set_log_base(struct fsdp_dev *dev, int fd, uint64_t size, uint64_t offset);
int fsdp_dev_set_logging(struct fsdp_dev *dev, int on);
/* Device IOTLB (VIRTIO_F_ACCESS_PLATFORM with a vIOMMU; vhost-user.rst
 * "IOMMU support"): while on, ring and buffer addresses are IOVAs,
 * translated through the translations QEMU sent (VHOST_USER_IOTLB_MSG), at
 * most cap of them (1..FSDP_IOTLB_MAX_ENTRIES).  Unless keep_completed, the
 * translations of the pages a request named are forgotten when it is done
 * (a Linux guest in lazy invalidation mode reuses IOVAs QEMU 7.2 never
 * invalidates); keep_completed trusts the guest's invalidations instead
 * (strict-mode guests, or guests whose concurrent requests share IOVA pages).  Turning it on or off
 * forgets every translation.  Update: 0, -EINVAL, -ENOSPC (cap reached);
 * invalidate: entries removed or cut (>= 0).  Both take effect before they
 * return: no access after an invalidation uses the old translation (a request
 * in flight whose writable buffer lost its translation is failed toward the
 * guest at completion, FSDP_EV_COPYBACK_UNMAPPED). */
int fsdp_dev_iotlb_enable(struct fsdp_dev *dev, int on, uint32_t cap, int keep_completed);
int fsdp_dev_iotlb_update(struct fsdp_dev *dev, uint64_t iova, uint64_t size, uint64_t uaddr,
                          uint32_t perm);
int fsdp_dev_iotlb_invalidate(struct fsdp_dev *dev, uint64_t iova, uint64_t size);
int fsdp_dev_iotlb_entries(struct fsdp_dev *dev);
/* The table's translation of iova for an access perm: 0 with *uaddr and
 * *avail (bytes of the entry from iova on), or -ENOENT (no entry), -EACCES
 * (the entry lacks perm). For tests and diagnostics. */
int fsdp_dev_iotlb_translate(struct fsdp_dev *dev, uint64_t iova, uint32_t perm, uint64_t *uaddr,
                             uint64_t *avail);
/* Synchronous engine pass over every started queue (loop not running). */
int fsdp_dev_poll(struct fsdp_dev *dev, uint32_t *out_flags);

/* Queues. */
int fsdp_queue_set_num(struct fsdp_dev *dev, uint32_t q, uint32_t num);
int fsdp_queue_set_base(struct fsdp_dev *dev, uint32_t q, uint32_t avail_idx);
int fsdp_queue_set_addr(struct fsdp_dev *dev, uint32_t q, uint64_t desc_uaddr,
                        uint64_t avail_uaddr, uint64_t used_uaddr);
int fsdp_queue_set_guest_kick(struct fsdp_dev *dev, uint32_t q, int fd);  /* -1: poll */
int fsdp_queue_set_guest_call(struct fsdp_dev *dev, uint32_t q, int fd);  /* -1: none */
/* The eventfds to send the backend (SET_VRING_KICK / CALL): the data
 * plane's, the caller dups what it sends; valid until the next
 * fsdp_dev_renew_backend_side. */
int fsdp_queue_backend_fds(struct fsdp_dev *dev, uint32_t q, int *kick_fd, int *call_fd);
int fsdp_queue_shadow_addrs(struct fsdp_dev *dev, uint32_t q, uint64_t *desc,
                            uint64_t *avail, uint64_t *used);
int fsdp_queue_start(struct fsdp_dev *dev, uint32_t q, uint32_t flags);
/* VIRTIO_RING_F_EVENT_IDX toggled (SET_FEATURES) while the queue may run:
 * flags = FSDP_QF_*.  Both sides decide notifications the new way from now
 * on, and one kick and one call are sent (spurious ones are allowed) so that
 * no side keeps waiting on a notification decided the old way. */
int fsdp_queue_set_event_idx(struct fsdp_dev *dev, uint32_t q, uint32_t flags);
/* VHOST_VRING_F_LOG: log used ring writes at used_gpa (its guest-physical address). */
int fsdp_queue_set_log_used(struct fsdp_dev *dev, uint32_t q, int on, uint64_t used_gpa);
/* What a stop did.  avail_idx: the guest's next avail index (the answer to
 * GET_VRING_BASE), filled in every case. */
struct fsdp_stop_result {
    uint32_t avail_idx;
    uint32_t returned;   /* never taken by the backend: given back to the guest ring */
    uint32_t kept;       /* never taken, but not the newest guest entries: kept */
    uint32_t inflight;   /* still in flight when the stop returned */
};

/* Stop intake (no more guest requests are shadowed; completions still flow). */
int fsdp_queue_pause(struct fsdp_dev *dev, uint32_t q);
/* Stop intake and wait up to timeout_ms for in-flight requests to complete;
 * returns -ETIMEDOUT if requests are still in flight (they stay owned by the
 * data plane: fsdp_queue_start re-publishes them, fsdp_queue_abort fails
 * them).  backend_next_avail >= 0 is the backend's answer to GET_VRING_BASE
 * (its next shadow avail index): requests published at or after it were never
 * taken by the backend and are not waited for; when they are the newest
 * entries taken from the guest they are given back (the guest's avail index
 * is rewound over them), else kept like timed-out ones.  -1: unknown, wait
 * for everything. */
int fsdp_queue_stop(struct fsdp_dev *dev, uint32_t q, uint32_t timeout_ms,
                    int64_t backend_next_avail, struct fsdp_stop_result *out);
/* Fail the requests a stopped queue keeps toward the guest (the device's
 * error); returns requests failed. */
int fsdp_queue_abort(struct fsdp_dev *dev, uint32_t q);
/* Drop the requests a stopped queue keeps WITHOUT touching guest memory (the
 * guest re-initialised the ring: reboot); returns requests dropped. */
int fsdp_queue_discard(struct fsdp_dev *dev, uint32_t q);
/* Zero the shadow rings of a stopped queue (requests it keeps stay ours and
 * are re-published at the next start): a new backend told the ring
 * addresses reads fresh indices (libvhost-user reads used->idx then). */
int fsdp_queue_clear_shadow(struct fsdp_dev *dev, uint32_t q);
int fsdp_queue_stats(struct fsdp_dev *dev, uint32_t q, struct fsdp_queue_stats *out);
/* The queue's latency histograms since the device was added (zeros when off). */
int fsdp_queue_hist(struct fsdp_dev *dev, uint32_t q, struct fsdp_queue_hist *out);
/* QEMU answered queue q's FSDP_EV_IOTLB_MISS at iova (ok != 0: with a
 * translation, installed before this call): the queue takes up where it
 * waited.  After "no translation" the page is refused (FSDP_EV_IOVA_UNMAPPED);
 * a page gone again after "yes" is asked again, a bounded number of times.
 * The answer to an older miss of the queue is ignored. */
int fsdp_queue_iotlb_answered(struct fsdp_dev *dev, uint32_t q, uint64_t iova, int ok);

#endif
