/*
 * loadgen.h: the virtio-blk driver emulation of fastshadow's benchmark.
 *
 * This header is also the cffi cdef of fastshadow.bench._loadgen
 * (bench/build_loadgen.py strips the preprocessor lines), so it holds only
 * plain declarations.
 *
 * The "guest" is this process: lg_new() creates a memfd ("guest RAM", guest
 * physical address 0 = offset 0 of the memfd), maps it, and lays out per
 * queue a split virtqueue (desc table, avail ring, used ring) and
 * `max_qd` request slots (16-byte virtio_blk_outhdr, a data buffer of
 * `max_block_size` bytes, a 1-byte status).  Python (bench/loadgen.py) is the
 * vhost-user front-end: it hands the memfd, the ring addresses and the
 * kick/call eventfds to the backend, then calls lg_run() to drive requests.
 *
 * Every request is a 3-descriptor chain: header (device-readable), data
 * (device-readable for writes, device-writable for reads), status
 * (device-writable).  Slot i always uses descriptors 3i, 3i+1, 3i+2 (head 3i).
 *
 * All functions return 0 (or a count) on success and -errno on failure;
 * lg_run() also writes a message into result->error.
 *
 * USDT probes, provider "fastshadow_loadgen":
 *   submit(q, head, bytes)                 request made available to the device
 *   complete(q, head, bytes, latency_ns)   used element harvested (bytes = data bytes)
 */
#ifndef FASTSHADOW_LOADGEN_H
#define FASTSHADOW_LOADGEN_H

#include <stdint.h>
#include <stddef.h>

#define LG_ABI_VERSION 1
#define LG_MAX_QUEUES 16

enum lg_rw { LG_READ = 0, LG_WRITE = 1 };

/* How the driver's thread(s) wait for completions. */
enum lg_threads {
    LG_THREADS_ONE = 1,       /* the calling thread drives every queue (poll() over the call fds) */
    LG_THREADS_PER_QUEUE = 0  /* one thread per queue, the caller joins them */
};

struct lg_config {
    uint32_t num_queues;      /* 1..LG_MAX_QUEUES */
    uint32_t queue_size;      /* power of two, 4..32768 */
    uint32_t max_qd;          /* request slots per queue; 3 * max_qd <= queue_size */
    uint32_t max_block_size;  /* data buffer per slot, a multiple of 512 */
};

struct lg_queue_info {
    uint64_t desc_gpa;        /* guest physical addresses (= offsets in the memfd) */
    uint64_t avail_gpa;
    uint64_t used_gpa;
    int kick_fd;              /* the driver writes it (backend's SET_VRING_KICK) */
    int call_fd;              /* the device writes it (backend's SET_VRING_CALL) */
};

struct lg_run_params {
    uint32_t rw;              /* enum lg_rw */
    uint32_t random;          /* 0: sequential offsets, 1: uniform random, block aligned */
    uint32_t qd;              /* requests in flight per queue, 1..max_qd */
    uint32_t block_size;      /* bytes per request, multiple of 512, <= max_block_size */
    uint32_t num_queues;      /* queues 0..num_queues-1 are driven, <= config num_queues */
    uint32_t threads;         /* enum lg_threads */
    uint64_t requests;        /* total requests to complete over all queues (0: no limit) */
    uint64_t duration_ns;     /* stop submitting after this long (0: no limit) */
    uint64_t span_bytes;      /* offsets fall in [offset_base, offset_base + span_bytes) */
    uint64_t offset_base;
    uint64_t seed;            /* random offsets and the data pattern */
    uint32_t event_idx;       /* VIRTIO_RING_F_EVENT_IDX was negotiated */
    uint32_t busy_poll_us;    /* spin on the used rings this long before sleeping (0: sleep at once) */
    uint32_t pattern;         /* writes store a pattern of (disk offset, seed); reads verify it */
    uint32_t timeout_ms;      /* no completion for this long while requests are in flight: fail */
    uint64_t *lat_ns;         /* caller's array: queue q records into its slice */
    uint64_t lat_cap;         /* entries in lat_ns; each of the num_queues gets lat_cap / num_queues */
};

struct lg_queue_result {
    uint64_t submitted;
    uint64_t completed;
    uint64_t bytes;           /* data bytes of completed requests */
    uint64_t errors;          /* status byte != VIRTIO_BLK_S_OK */
    uint64_t len_mismatch;    /* used.len != data bytes written by the device + 1 */
    uint64_t verify_errors;   /* read data that did not match the pattern (pattern runs) */
    uint64_t kicks;           /* kick eventfd writes */
    uint64_t kicks_skipped;   /* publishes where the ring said no kick was needed */
    uint64_t sleeps;          /* poll() calls */
    uint64_t wakeups;         /* call eventfd reads that returned a count */
    uint64_t lat_offset;      /* this queue's slice in lat_ns */
    uint64_t recorded;        /* latencies stored in the slice (<= completed) */
};

struct lg_result {
    uint64_t elapsed_ns;      /* first submit to last completion */
    uint64_t submitted;
    uint64_t completed;
    uint64_t bytes;
    uint64_t errors;
    uint64_t len_mismatch;
    uint64_t verify_errors;
    uint64_t kicks;
    uint64_t sleeps;
    uint64_t wakeups;
    struct lg_queue_result q[16];
    char error[256];
};

struct lg;

int lg_abi_version(void);

/* Create the guest RAM memfd, map it, lay out the rings and slots, make the eventfds. */
int lg_new(const struct lg_config *cfg, struct lg **out);
void lg_free(struct lg *lg);

int lg_mem_fd(struct lg *lg);
uint64_t lg_mem_size(struct lg *lg);
/* Where this process mapped guest RAM: SET_MEM_TABLE's userspace_addr, and the
 * base of the user addresses SET_VRING_ADDR carries. */
uint64_t lg_mem_uaddr(struct lg *lg);
int lg_queue_info(struct lg *lg, uint32_t q, struct lg_queue_info *out);

/* Drive requests until `requests` completed or `duration_ns` passed, then
 * drain: it returns with no request in flight, except after a timeout or a
 * device error (then the caller must reset the device: end the session). */
int lg_run(struct lg *lg, const struct lg_run_params *p, struct lg_result *result);

/* From another thread: stop submitting; lg_run drains and returns. */
void lg_stop(struct lg *lg);

/* Single-core memcpy bandwidth: copy `bytes` between two buffers of that size
 * (pre-faulted) `iters` times; ns_per_iter[i] receives each copy's duration. */
int lg_memcpy_bench(uint64_t bytes, uint32_t iters, uint64_t *ns_per_iter);

#endif
