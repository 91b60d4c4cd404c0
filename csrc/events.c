/*
 * events.c: the event ring (refusals, broken queues, backend violations).
 *
 * Owns: the event ring (struct fsdp_evring) and the names and texts of the
 * event codes (fsdp_event_name / fsdp_event_str).  A leaf: it knows nothing
 * of devices or of the loop (fsdp_dp_drain_events is loop.c's).
 * Calls: base only.
 *
 * Fixed size, written by the loop thread (or the caller in synchronous
 * mode), drained by the Python control plane.  When full, new records are
 * dropped and counted (the first records name the first cause, which is the
 * one worth keeping).  The eventfd is written when the ring goes from empty
 * to non-empty; the reader reads the eventfd BEFORE draining, so a record
 * pushed during a drain always leaves the eventfd readable.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "events.h"

int evring_init(struct fsdp_evring *r, uint32_t size)
{
    memset(r, 0, sizeof(*r));
    r->ev = calloc(size, sizeof(*r->ev));
    if (!r->ev)
        return -ENOMEM;
    r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->efd < 0) {
        int e = -errno;
        free(r->ev);
        return e;
    }
    r->size = size;
    pthread_mutex_init(&r->lock, NULL);
    return 0;
}

void evring_destroy(struct fsdp_evring *r)
{
    if (r->ev) {
        free(r->ev);
        close(r->efd);
        pthread_mutex_destroy(&r->lock);
    }
    memset(r, 0, sizeof(*r));
}

void evring_push(struct fsdp_evring *r, const struct fsdp_event *e)
{
    bool signal = false;

    pthread_mutex_lock(&r->lock);
    if (r->count == r->size) {
        r->lost++;
    } else {
        r->ev[(r->head + r->count) % r->size] = *e;
        signal = (r->count++ == 0);
    }
    pthread_mutex_unlock(&r->lock);
    if (signal) {
        uint64_t one = 1;
        ssize_t w = write(r->efd, &one, sizeof(one));
        (void)w;   /* EAGAIN only if the counter is saturated: already readable */
    }
}

void ev_emit(struct fsdp_evring *r, uint32_t dev, uint32_t q, uint32_t code, uint32_t head,
             uint64_t a, uint64_t b)
{
    struct fsdp_event e = {
        .dev = dev, .queue = q, .code = code,
        .head = head, .a = a, .b = b,
    };
    evring_push(r, &e);
}

int evring_drain(struct fsdp_evring *r, struct fsdp_event *out, uint32_t max, uint64_t *lost)
{
    uint64_t cnt;
    uint32_t n = 0;
    ssize_t rd;

    rd = read(r->efd, &cnt, sizeof(cnt));   /* first: see the comment on top */
    (void)rd;
    pthread_mutex_lock(&r->lock);
    while (r->count && n < max) {
        out[n++] = r->ev[r->head];
        r->head = (r->head + 1) % r->size;
        r->count--;
    }
    if (lost) {
        *lost = r->lost;
        r->lost = 0;
    }
    if (r->count) {
        /* The caller's buffer was too small: keep the fd readable. */
        uint64_t one = 1;
        ssize_t w = write(r->efd, &one, sizeof(one));
        (void)w;
    }
    pthread_mutex_unlock(&r->lock);
    return (int)n;
}

struct code_desc {
    uint32_t code;
    const char *name;
    const char *text;
};

static const struct code_desc codes[] = {
    {FSDP_EV_NONE, "NONE", "no event"},
    {FSDP_EV_DESC_NEXT_OUT_OF_RANGE, "DESC_NEXT_OUT_OF_RANGE",
     "descriptor next index outside the table"},
    {FSDP_EV_CHAIN_TOO_LONG, "CHAIN_TOO_LONG",
     "descriptor chain longer than the table (loop) or than the queue size"},
    {FSDP_EV_ADDR_UNMAPPED, "ADDR_UNMAPPED", "buffer outside mapped guest memory"},
    {FSDP_EV_ADDR_OVERFLOW, "ADDR_OVERFLOW", "buffer address + length wraps around"},
    {FSDP_EV_INDIRECT_NESTED, "INDIRECT_NESTED", "indirect descriptor inside an indirect table"},
    {FSDP_EV_INDIRECT_BAD_LEN, "INDIRECT_BAD_LEN",
     "indirect table length zero, not a multiple of 16, or over 16 * queue size"},
    {FSDP_EV_INDIRECT_WITH_NEXT, "INDIRECT_WITH_NEXT",
     "indirect descriptor with the NEXT flag"},
    {FSDP_EV_WRITABLE_BEFORE_READABLE, "WRITABLE_BEFORE_READABLE",
     "device-readable descriptor after a device-writable one"},
    {FSDP_EV_REQUEST_TOO_LARGE, "REQUEST_TOO_LARGE", "request larger than the configured cap"},
    {FSDP_EV_ZERO_LENGTH, "ZERO_LENGTH",
     "descriptor of length 0 (backends treat a zero-sized buffer as fatal)"},
    {FSDP_EV_BAD_LAYOUT, "BAD_LAYOUT",
     "fewer readable or writable bytes than the device's request layout needs"},
    {FSDP_EV_IOVA_UNMAPPED, "IOVA_UNMAPPED",
     "buffer IOVA has no translation in the device IOTLB (QEMU answered the miss without one)"},
    {FSDP_EV_IOVA_PERM, "IOVA_PERM",
     "buffer IOVA mapped without the access the device needs (a write to a read-only mapping)"},
    {FSDP_EV_BAD_HEAD, "BAD_HEAD", "avail ring head index >= queue size: queue broken"},
    {FSDP_EV_AVAIL_IDX_JUMP, "AVAIL_IDX_JUMP",
     "avail idx more than queue size ahead: queue broken"},
    {FSDP_EV_RING_UNMAPPED, "RING_UNMAPPED",
     "guest ring no longer inside guest memory after a memory table change: queue stopped"},
    {FSDP_EV_USED_UNKNOWN_ID, "USED_UNKNOWN_ID", "backend completed an id that is not in flight"},
    {FSDP_EV_USED_DOUBLE_COMPLETION, "USED_DOUBLE_COMPLETION",
     "backend completed a request twice"},
    {FSDP_EV_USED_LEN_TOO_LARGE, "USED_LEN_TOO_LARGE",
     "backend used len larger than the writable bytes: request failed toward the guest"},
    {FSDP_EV_BAD_STOP_INDEX, "BAD_STOP_INDEX",
     "backend's GET_VRING_BASE index contradicts the shadow ring: every request treated as taken"},
    {FSDP_EV_REQUEST_POISONED, "REQUEST_POISONED",
     "request published too many times without completing: failed toward the guest"},
    {FSDP_EV_BACKEND_FAILED, "BACKEND_FAILED",
     "backend used idx more than the ring size past the last used: backend treated as failed"},
    {FSDP_EV_COPYBACK_UNMAPPED, "COPYBACK_UNMAPPED",
     "writable buffer of a request in flight no longer mapped: request failed toward the guest"},
    {FSDP_EV_INFLIGHT_ABORTED, "INFLIGHT_ABORTED", "requests in flight failed toward the guest"},
    {FSDP_EV_EVENTS_LOST, "EVENTS_LOST", "event records lost (event ring full)"},
    {FSDP_EV_LOOP_ERROR, "LOOP_ERROR", "io_uring operation failed"},
    {FSDP_EV_GUEST_MEMORY_LOST, "GUEST_MEMORY_LOST",
     "a guest memory file was shrunk under the proxy (SIGBUS caught): device stopped"},
    {FSDP_EV_LOG_OUT_OF_RANGE, "LOG_OUT_OF_RANGE",
     "guest page beyond the dirty log's size: not logged (log smaller than guest memory)"},
    {FSDP_EV_IOTLB_MISS, "IOTLB_MISS",
     "IOVA not in the device IOTLB: asking QEMU for it, the queue waits"},
};

static const struct code_desc *find_code(uint32_t code)
{
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        if (codes[i].code == code)
            return &codes[i];
    return NULL;
}

const char *fsdp_event_name(uint32_t code)
{
    const struct code_desc *c = find_code(code);
    return c ? c->name : "UNKNOWN";
}

const char *fsdp_event_str(uint32_t code)
{
    const struct code_desc *c = find_code(code);
    return c ? c->text : "unknown event code";
}
