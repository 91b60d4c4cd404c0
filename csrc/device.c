/*
 * device.c: devices, their shadow region, and the control-plane API.
 *
 * Owns: struct fsdp_dev (a struct fsdp_devctx, what the engine and the loop
 * see, plus the name, configuration and shadow memfd), the shadow region,
 * and every public fsdp_dev_* / fsdp_queue_* function and fsdp_dp_free.
 * Calls: loop (command channel, device table, stop waiters), queue, shadow
 * (a pass and its notifications for fsdp_dev_poll), mem, log, vring, base.
 * Nothing calls it: it is the top of csrc/ (see README.md, "Layers").
 *
 * Every public function packs its arguments into a struct dev_cmd (one
 * named argument struct per command, in a union tagged by the command) and
 * hands it to dp_exec (loop.c), which runs it ON the loop thread between two
 * batches (or inline when the loop is not running).  Slow work that needs no
 * engine state (mmap of guest regions, memfd creation, munmap of old regions,
 * dup of fds) is done on the caller's thread before or after the command, so
 * the loop only swaps pointers.
 *
 * Shadow region layout (offsets from the start of the memfd; the backend sees
 * GPA FSDP_SHADOW_GPA_BASE + offset and user address FSDP_SHADOW_UADDR_BASE +
 * offset):
 *
 *   queue q's slot starts at q * slot_size, slot_size = ring_reserve + bounce
 *     +0                     desc table   16 * num          (page aligned)
 *     +A = align4k(16*num)   avail ring   6 + 2 * num       (page aligned)
 *     +A + align4k(6+2*num)  used ring    6 + 8 * num       (page aligned)
 *     +ring_reserve          bounce area  bounce_per_queue  (page aligned)
 *   ring_reserve = the three ring sizes for max_queue_size, each rounded up
 *   to a page, so the slot does not move when num changes.  queue.c places
 *   the rings (queue_set_num) and the bounce area (queue_open) in the slot.
 *
 * One backend, one shadow: each new backend connection gets a new memfd
 * and new backend kick/call eventfds (fsdp_dev_renew_backend_side), mapped
 * at the same address, so that a dropped backend that lives on with the old
 * ones mapped and open (a liar we cut off, qemu-storage-daemon finishing a
 * deleted export's requests) reaches nothing of the device any more.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base.h"
#include "hist.h"
#include "iotlb.h"
#include "log.h"
#include "loop.h"
#include "mem.h"
#include "probes.h"
#include "queue.h"
#include "shadow.h"
#include "vring.h"

#define DEFAULT_MAX_REQUEST (4ull << 20)
#define DEFAULT_BOUNCE (16ull << 20)
#define MAX_BOUNCE (64ull << 30)

struct fsdp_dev {
    struct fsdp_devctx ctx;     /* what the engine and the loop see (first member) */
    struct fsdp_dp *dp;
    char name[FSDP_NAME_MAX];
    struct fsdp_dev_config cfg;
    int shadow_fd;
    uint64_t shadow_size;
    struct fsdp_iotlb iotlb;    /* ctx.mem.iotlb points here (kept across table swaps) */
};

static struct fsdp_dev *dev_of(struct fsdp_devctx *d)
{
    return (struct fsdp_dev *)((char *)d - offsetof(struct fsdp_dev, ctx));
}

/* ------------------------------------------------------------------------ */
/* Commands.                                                                  */

enum dev_op {
    /* device */
    CMD_ATTACH,
    CMD_DETACH,
    CMD_SET_MEM,
    CMD_ADD_REGION,
    CMD_REMOVE_REGION,
    CMD_RESET,
    CMD_RENEW_BACKEND_SIDE,
    CMD_SET_LOG_BASE,
    CMD_SET_LOGGING,
    CMD_POLL,
    /* queue c->q */
    CMD_SET_LOG_USED,
    CMD_SET_NUM,
    CMD_SET_BASE,
    CMD_SET_ADDR,
    CMD_SET_GUEST_FD,
    CMD_BACKEND_FDS,
    CMD_SHADOW_ADDRS,
    CMD_START,
    CMD_SET_EVENT_IDX,
    CMD_PAUSE,
    CMD_STOP,
    CMD_STOP_CANCEL,
    CMD_CLEAR_SHADOW,
    CMD_ABORT,
    CMD_DISCARD,
    CMD_STATS,
    CMD_HIST,
    CMD_IOTLB_ENABLE,
    CMD_IOTLB_UPDATE,
    CMD_IOTLB_INVALIDATE,
    CMD_IOTLB_ENTRIES,
    CMD_IOTLB_ANSWERED,
    CMD_IOTLB_TRANSLATE,
};

/* One command: the loop's record, which command, and its arguments.  Members
 * marked "out" are written by the command for the caller. */
struct dev_cmd {
    struct fsdp_cmd link;       /* queued and completed by loop.c */
    enum dev_op op;             /* names the member of arg in use */
    struct fsdp_dev *dev;
    uint32_t q;                 /* queue commands: the queue index */
    union {
        struct {
            struct fsdp_mem *mem;          /* in: the new table; out: the replaced one */
        } set_mem;
        struct {
            struct fsdp_region *region;    /* mapped; zeroed once the table owns it */
        } add_region;
        struct {
            uint64_t gpa, size;
            struct fsdp_region *out;       /* out: the region, to unmap */
        } remove_region;
        struct {
            struct fsdp_iotlb *iotlb;      /* in: the new table; out: the replaced one */
        } iotlb_enable;
        struct {
            uint64_t iova, size, uaddr;
            uint32_t perm;
            uint64_t *out;                 /* translate: uaddr, avail */
        } iotlb_msg;
        struct {
            int shadow_fd;                 /* in: the new memfd; out: the one to close */
            int *kick, *call;              /* per queue, the same: new eventfds in, old out */
        } renew;
        struct {
            struct fsdp_log *log;          /* in: the new log; out: the replaced one */
        } set_log_base;
        struct {
            bool on;
        } set_logging;
        struct {
            uint32_t *flags;               /* out: FSDP_POLL_* */
        } poll;
        struct {
            bool on;
            uint64_t used_gpa;
        } set_log_used;
        struct {
            uint32_t num;
        } set_num;
        struct {
            uint32_t avail_idx;
        } set_base;
        struct {
            uint64_t desc, avail, used;    /* QEMU user addresses */
        } set_addr;
        struct {
            int fd;                        /* ours (dup'd), -1 once the queue took it */
            bool call;                     /* guest call fd, else guest kick fd */
            bool blocking;                 /* fd lacks O_NONBLOCK */
        } set_guest_fd;
        struct {
            int kick, call;                /* out: the backend eventfds, ours */
        } backend_fds;
        struct {
            uint64_t desc, avail, used;    /* out: the backend's user addresses */
        } shadow_addrs;
        struct {
            uint32_t flags;                /* FSDP_QF_* */
        } start;
        struct {
            uint32_t flags;                /* FSDP_QF_* */
        } set_event_idx;
        struct {
            int64_t backend_next_avail;    /* < 0: unknown */
            struct fsdp_stop_result *res;  /* out */
        } stop;
        struct {
            const struct dev_cmd *target;  /* the stop whose caller gave up */
        } stop_cancel;
        struct {
            struct fsdp_queue_stats *out;
        } stats;
        struct {
            struct fsdp_queue_hist *out;
        } hist;
    } arg;
};

static int run_cmd(struct fsdp_dp *dp, struct fsdp_cmd *link);

/* Run c on the loop (or inline) and wait for it. */
static int exec(struct dev_cmd *c)
{
    c->link.fn = run_cmd;
    return dp_exec(c->dev->dp, &c->link);
}

/* ------------------------------------------------------------------------ */
/* Creation and destruction (caller's thread).                                */

static uint64_t ring_reserve(uint32_t maxq)
{
    return FSDP_ALIGN_UP(vring_desc_size(maxq), FSDP_PAGE) +
           FSDP_ALIGN_UP(vring_avail_size(maxq), FSDP_PAGE) +
           FSDP_ALIGN_UP(vring_used_size(maxq), FSDP_PAGE);
}

static void dev_destroy(struct fsdp_dev *dev)
{
    if (!dev)
        return;
    for (uint32_t i = 0; dev->ctx.q && i < dev->ctx.num_queues; i++)
        queue_destroy(&dev->ctx.q[i]);
    free(dev->ctx.q);
    for (uint32_t i = 0; i < dev->ctx.mem.n; i++)
        mem_unmap_region(&dev->ctx.mem.r[i]);
    log_unmap(&dev->ctx.log);
    iotlb_free(&dev->iotlb);
    if (dev->ctx.shadow)
        munmap(dev->ctx.shadow, dev->shadow_size);
    if (dev->shadow_fd >= 0)
        close(dev->shadow_fd);
    free(dev);
}

/* A new shadow memfd for dev: sized, sealed, not mapped.  The fd, or -errno.
 * Used at creation and for each new backend (fsdp_dev_renew_backend_side). */
static int shadow_memfd(const struct fsdp_dev *dev)
{
    char name[sizeof("fastshadow-shadow:") + FSDP_NAME_MAX];
    int fd, rc;

    snprintf(name, sizeof(name), "fastshadow-shadow:%s", dev->name);
    fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    /* The size is fixed for good: the backend cannot shrink it under our
     * mapping (SIGBUS) nor grow it; F_SEAL_SEAL so nobody changes that. */
    if (ftruncate(fd, (off_t)dev->shadow_size) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

static int make_shadow(struct fsdp_dev *dev)
{
    void *p;

    dev->shadow_fd = shadow_memfd(dev);
    if (dev->shadow_fd < 0)
        return dev->shadow_fd;
    p = mmap(NULL, dev->shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED, dev->shadow_fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    dev->ctx.shadow = p;
    return 0;
}

static int cmd_attach(struct fsdp_dp *dp, struct dev_cmd *c)
{
    int rc = dp_attach(dp, &c->dev->ctx);

    if (rc == 0)
        trace_ctl_name(c->dev->ctx.id, c->dev->name);   /* for tracers: id -> name */
    return rc;
}

int fsdp_dev_add(struct fsdp_dp *dp, const char *name, const struct fsdp_dev_config *cfg,
                 struct fsdp_dev **out)
{
    struct fsdp_dev_config k = *cfg;
    struct fsdp_dev *dev;
    uint64_t min_size;
    struct dev_cmd c = {.op = CMD_ATTACH};
    int rc;

    if (!name || !*name || strlen(name) >= FSDP_NAME_MAX)
        return -EINVAL;
    if (k.num_queues == 0 || k.num_queues > FSDP_MAX_QUEUES)
        return -EINVAL;
    if (k.max_queue_size == 0)
        k.max_queue_size = FSDP_MAX_QUEUE_SIZE;
    if (k.max_queue_size > FSDP_MAX_QUEUE_SIZE)
        return -EINVAL;
    if (k.max_request_bytes == 0)
        k.max_request_bytes = DEFAULT_MAX_REQUEST;
    if (k.max_request_bytes > UINT32_MAX)   /* used.len is 32 bits */
        return -EINVAL;
    if (k.bounce_per_queue == 0)
        k.bounce_per_queue = DEFAULT_BOUNCE;
    if (k.bounce_per_queue > MAX_BOUNCE)
        return -EINVAL;
    if (k.failure > FSDP_FAIL_FUSE_ERROR)
        return -EINVAL;
    k.bounce_per_queue = FSDP_ALIGN_UP(k.bounce_per_queue, FSDP_PAGE);

    dev = calloc(1, sizeof(*dev));
    if (!dev)
        return -ENOMEM;
    dev->dp = dp;
    dev->ctx.events = dp_events(dp);
    dev->ctx.mem.iotlb = &dev->iotlb;   /* off until fsdp_dev_iotlb_enable */
    dev->ctx.max_request_bytes = k.max_request_bytes;
    dev->ctx.failure = k.failure;
    dev->ctx.failure_first_queue = k.failure_first_queue;
    dev->ctx.min_readable = k.min_readable;
    dev->ctx.min_writable = k.min_writable;
    dev->ctx.max_replays = k.max_replays;
    dev->ctx.stream_min = dp_config(dp)->stream_copy_min;
    dev->shadow_fd = -1;
    strcpy(dev->name, name);
    dev->cfg = k;
    dev->ctx.num_queues = k.num_queues;
    dev->ctx.ring_reserve = ring_reserve(k.max_queue_size);
    dev->ctx.slot_size = dev->ctx.ring_reserve + k.bounce_per_queue;
    min_size = dev->ctx.slot_size * k.num_queues;
    if (k.shadow_size && FSDP_ALIGN_UP(k.shadow_size, FSDP_PAGE) < min_size) {
        rc = -ENOSPC;
        goto fail;
    }
    dev->shadow_size = k.shadow_size ? FSDP_ALIGN_UP(k.shadow_size, FSDP_PAGE) : min_size;
    dev->cfg.shadow_size = dev->shadow_size;
    rc = make_shadow(dev);
    if (rc)
        goto fail;

    dev->ctx.q = calloc(k.num_queues, sizeof(*dev->ctx.q));
    if (!dev->ctx.q) {
        rc = -ENOMEM;
        goto fail;
    }
    for (uint32_t i = 0; i < k.num_queues; i++) {
        queue_init(&dev->ctx.q[i], &dev->ctx, i);
        dev->ctx.q[i].h.on = !dp_config(dp)->no_latency_hist;
    }
    for (uint32_t i = 0; i < k.num_queues; i++) {
        rc = queue_open(&dev->ctx.q[i]);
        if (rc)
            goto fail;
    }

    c.dev = dev;
    rc = exec(&c);
    if (rc)
        goto fail;
    *out = dev;
    return 0;
fail:
    dev_destroy(dev);
    return rc;
}

int fsdp_dev_info(struct fsdp_dev *dev, struct fsdp_dev_info *out)
{
    /* Immutable after creation, but for shadow_fd, which each new backend
     * replaces (on the loop, cmd_renew_backend_side): read atomically, no
     * command needed. */
    memset(out, 0, sizeof(*out));
    out->id = dev->ctx.id;
    out->num_queues = dev->ctx.num_queues;
    out->max_queue_size = dev->cfg.max_queue_size;
    out->shadow_fd = __atomic_load_n(&dev->shadow_fd, __ATOMIC_RELAXED);
    out->shadow_size = dev->shadow_size;
    out->shadow_gpa = FSDP_SHADOW_GPA_BASE;
    out->shadow_uaddr = FSDP_SHADOW_UADDR_BASE;
    out->queue_slot_size = dev->ctx.slot_size;
    out->bounce_per_queue = dev->cfg.bounce_per_queue;
    return 0;
}

void fsdp_dp_free(struct fsdp_dp *dp)
{
    struct fsdp_devctx *d;

    if (!dp)
        return;
    fsdp_dp_stop(dp);
    while ((d = dp_take_dev(dp))) {   /* devices never removed */
        trace_ctl_name(d->id, NULL);
        dev_destroy(dev_of(d));
    }
    dp_destroy(dp);
}

/* ------------------------------------------------------------------------ */
/* Helpers run on the loop (or inline).                                       */

static void after_cmd(struct dev_cmd *c, struct fsdp_queue *q)
{
    if (!c->link.deferrable)
        queue_notify(q, NULL);
    /* on the loop: the loop sends them after the command batch */
}

static struct fsdp_queue *get_q(struct fsdp_dev *dev, uint32_t q)
{
    return q < dev->ctx.num_queues ? &dev->ctx.q[q] : NULL;
}

static void retranslate_all(struct fsdp_dev *dev)
{
    for (uint32_t i = 0; i < dev->ctx.num_queues; i++)
        if (dev->ctx.q[i].addr_set)
            queue_translate_rings(&dev->ctx.q[i], true);
}

/* ------------------------------------------------------------------------ */
/* Device commands.                                                           */

static int cmd_detach(struct fsdp_dp *dp, struct dev_cmd *c)
{
    /* Its name stays in the trace control block until the id is reused: a
     * tracer still labels the events it read before the device went away. */
    dp_detach(dp, &c->dev->ctx);    /* a stop still waiting fails with -ENODEV */
    return 0;
}

int fsdp_dev_remove(struct fsdp_dev *dev)
{
    struct dev_cmd c = {.op = CMD_DETACH, .dev = dev};
    int rc = exec(&c);

    if (rc)
        return rc;
    dev_destroy(dev);
    return 0;
}

static int cmd_set_mem(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_mem *nm = c->arg.set_mem.mem;
    struct fsdp_mem tmp = c->dev->ctx.mem;

    c->dev->ctx.mem = *nm;
    *nm = tmp;          /* the old table goes back to the caller to unmap */
    c->dev->ctx.mem.last = 0;
    c->dev->ctx.mem.iotlb = &c->dev->iotlb;
    retranslate_all(c->dev);
    return 0;
}

int fsdp_dev_set_mem_table(struct fsdp_dev *dev, const struct fsdp_mem_region *regions,
                           uint32_t n)
{
    struct fsdp_mem *nm;
    struct dev_cmd c = {.op = CMD_SET_MEM, .dev = dev};
    int rc = 0;

    if (n > FSDP_MAX_MEM_REGIONS)
        return -E2BIG;
    nm = calloc(1, sizeof(*nm));
    if (!nm)
        return -ENOMEM;
    for (uint32_t i = 0; i < n && !rc; i++) {
        rc = mem_map_region(&regions[i], &nm->r[i]);
        if (!rc)
            nm->n++;
    }
    if (!rc) {
        mem_sort(nm->r, nm->n);
        rc = mem_validate_table(nm->r, nm->n);
    }
    if (!rc) {
        c.arg.set_mem.mem = nm;
        rc = exec(&c);
    }
    /* nm now holds either the rejected new table or the replaced old one. */
    for (uint32_t i = 0; i < nm->n; i++)
        mem_unmap_region(&nm->r[i]);
    free(nm);
    return rc;
}

static int cmd_add_region(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_mem *m = &c->dev->ctx.mem;
    struct fsdp_region *nr = c->arg.add_region.region;
    struct fsdp_region save[FSDP_MAX_MEM_REGIONS];
    uint32_t n = m->n;

    if (n >= FSDP_MAX_MEM_REGIONS)
        return -ENOSPC;
    memcpy(save, m->r, n * sizeof(*save));
    m->r[n] = *nr;
    mem_sort(m->r, n + 1);
    if (mem_validate_table(m->r, n + 1)) {
        memcpy(m->r, save, n * sizeof(*save));
        return -EINVAL;
    }
    m->n = n + 1;
    m->last = 0;
    memset(nr, 0, sizeof(*nr));    /* now owned by the table */
    retranslate_all(c->dev);
    return 0;
}

int fsdp_dev_add_mem_region(struct fsdp_dev *dev, const struct fsdp_mem_region *region)
{
    struct fsdp_region r;
    struct dev_cmd c = {.op = CMD_ADD_REGION, .dev = dev, .arg.add_region = {.region = &r}};
    int rc = mem_map_region(region, &r);

    if (rc)
        return rc;
    rc = exec(&c);
    if (rc)
        mem_unmap_region(&r);
    return rc;
}

static int cmd_remove_region(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_mem *m = &c->dev->ctx.mem;
    uint64_t gpa = c->arg.remove_region.gpa, size = c->arg.remove_region.size;

    for (uint32_t i = 0; i < m->n; i++) {
        if (m->r[i].gpa == gpa && m->r[i].size == size) {
            *c->arg.remove_region.out = m->r[i];
            memmove(&m->r[i], &m->r[i + 1], (m->n - i - 1) * sizeof(m->r[0]));
            m->n--;
            m->last = 0;
            retranslate_all(c->dev);
            return 0;
        }
    }
    return -ENOENT;
}

int fsdp_dev_remove_mem_region(struct fsdp_dev *dev, uint64_t gpa, uint64_t size)
{
    struct fsdp_region r = {0};
    struct dev_cmd c = {.op = CMD_REMOVE_REGION, .dev = dev,
                        .arg.remove_region = {.gpa = gpa, .size = size, .out = &r}};
    int rc = exec(&c);

    if (!rc)
        mem_unmap_region(&r);   /* after the loop stopped using it */
    return rc;
}

static int cmd_reset(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_dev *dev = c->dev;

    dev->ctx.log.on = false;   /* features are renegotiated after a reset */
    iotlb_clear(&dev->iotlb);   /* ... and QEMU sends the IOTLB anew */
    for (uint32_t i = 0; i < dev->ctx.num_queues; i++) {
        struct fsdp_queue *q = &dev->ctx.q[i];
        dp_stop_end(dp, q, NULL, 0);
        queue_reset(q);
        if (q->guest_kick_fd >= 0) {
            int fd = q->guest_kick_fd;
            q->guest_kick_fd = -1;
            dp_kick_fd_changed(dp, q);
            close(fd);
        }
        if (q->guest_call_fd >= 0) {
            close(q->guest_call_fd);
            q->guest_call_fd = -1;
        }
    }
    return 0;
}

int fsdp_dev_reset(struct fsdp_dev *dev)
{
    struct dev_cmd c = {.op = CMD_RESET, .dev = dev};
    return exec(&c);
}

/* ------------------------------------------------------------------------ */
/* A new backend: new shadow memory and eventfds.                             */

/* Copy what old_fd holds in [off, end) into new_fd, reading it through the
 * old mapping src: only the ranges that hold data (SEEK_DATA / SEEK_HOLE),
 * so that holes -- pages never touched, bounce areas given back by an idle
 * trim -- are not faulted in on either side. */
static int copy_data(int old_fd, const uint8_t *src, int new_fd, uint64_t off, uint64_t end)
{
    while (off < end) {
        off_t d = lseek(old_fd, (off_t)off, SEEK_DATA), h;

        if (d < 0)
            return errno == ENXIO ? 0 : -errno;     /* ENXIO: no data past off */
        if ((uint64_t)d >= end)
            return 0;
        h = lseek(old_fd, d, SEEK_HOLE);
        if (h < 0)
            return -errno;
        if ((uint64_t)h > end)
            h = (off_t)end;
        for (off_t at = d; at < h;) {
            ssize_t n = pwrite(new_fd, src + at, (size_t)(h - at), at);
            if (n < 0 && errno != EINTR)
                return -errno;
            if (n > 0)
                at += n;
        }
        off = (uint64_t)h;
    }
    return 0;
}

/* The bounce bytes of the requests the queues keep (parked, re-published at
 * the next start) go to the new memfd: writes carry guest data there.  The
 * shadow rings are not copied: the new region starts with zeroed rings,
 * which is what queue_clear_shadow leaves for a new backend, so nothing the
 * old backend wrote after its queues were parked (a used index, a fake used
 * element) reaches the new one.  Bounce areas holding no request are not
 * copied either (stale bytes, or the old backend's scribbles). */
static int copy_kept_bounce(struct fsdp_dev *dev, int new_fd)
{
    for (uint32_t i = 0; i < dev->ctx.num_queues; i++) {
        struct fsdp_queue *q = &dev->ctx.q[i];
        uint64_t len = (uint64_t)q->bounce.npages * FSDP_PAGE;
        int rc;

        if (q->bounce.nfree == q->bounce.npages)
            continue;                               /* holds no request */
        rc = copy_data(dev->shadow_fd, dev->ctx.shadow, new_fd, q->s_bounce_off,
                       q->s_bounce_off + len);
        if (rc)
            return rc;
    }
    return 0;
}

/*
 * On the loop, between two passes, no queue started: the data plane does not
 * touch the shadow region meanwhile.  The old backend may: what it writes
 * from now on lands in the old memfd, or in kept bounce bytes being copied,
 * whose readable part the re-publication copies again from the guest
 * (copy_in) and whose writable part the new backend writes.  The new memfd
 * is mapped over the old mapping at the same address (MAP_FIXED), so every
 * pointer into the region (rings, bounce areas, requests' offsets) stays
 * valid.  Swaps: the caller gets back the old fds to close (or, on failure,
 * its new ones).
 */
static int cmd_renew_backend_side(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_dev *dev = c->dev;
    int new_fd = c->arg.renew.shadow_fd, rc;

    for (uint32_t i = 0; i < dev->ctx.num_queues; i++)
        if (dev->ctx.q[i].started)
            return -EBUSY;      /* the backend being replaced may still run it */
    rc = copy_kept_bounce(dev, new_fd);
    if (rc)
        return rc;
    if (mmap(dev->ctx.shadow, dev->shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
             new_fd, 0) == MAP_FAILED) {
        rc = -errno;
        /* A failed MAP_FIXED may have unmapped the range already: map the
         * old memfd back, so that the region stays what it was. */
        mmap(dev->ctx.shadow, dev->shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
             dev->shadow_fd, 0);
        return rc;
    }
    c->arg.renew.shadow_fd = dev->shadow_fd;
    __atomic_store_n(&dev->shadow_fd, new_fd, __ATOMIC_RELAXED);   /* fsdp_dev_info */
    for (uint32_t i = 0; i < dev->ctx.num_queues; i++) {
        struct fsdp_queue *q = &dev->ctx.q[i];
        int kick = q->backend_kick_fd, call = q->backend_call_fd;

        q->backend_kick_fd = c->arg.renew.kick[i];
        q->backend_call_fd = c->arg.renew.call[i];
        c->arg.renew.kick[i] = kick;
        c->arg.renew.call[i] = call;
        dp_call_fd_changed(dp, q);      /* its poll moves to the new call fd */
    }
    return 0;
}

int fsdp_dev_renew_backend_side(struct fsdp_dev *dev)
{
    uint32_t n = dev->ctx.num_queues;
    struct dev_cmd c = {.op = CMD_RENEW_BACKEND_SIDE, .dev = dev,
                        .arg.renew = {.shadow_fd = -1}};
    int *fds = malloc(2 * n * sizeof(*fds));
    int rc = fds ? 0 : -ENOMEM;

    /* Slow work on the caller's thread: the new fds are made here, the old
     * ones closed here once the loop has let go of them. */
    for (uint32_t i = 0; fds && i < 2 * n; i++)
        fds[i] = -1;
    for (uint32_t i = 0; !rc && i < 2 * n; i++) {
        fds[i] = queue_backend_eventfd();
        if (fds[i] < 0)
            rc = fds[i];
    }
    if (!rc) {
        c.arg.renew.shadow_fd = shadow_memfd(dev);
        if (c.arg.renew.shadow_fd < 0)
            rc = c.arg.renew.shadow_fd;
    }
    if (!rc) {
        c.arg.renew.kick = fds;
        c.arg.renew.call = fds + n;
        rc = exec(&c);
    }
    if (!rc) {
        /* The old memfd lives on in a backend that kept it: give its pages
         * back now (they would stay resident as long as that process lives),
         * and that backend reads only zeros from then on. */
        (void)fallocate(c.arg.renew.shadow_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                        (off_t)dev->shadow_size);
    }
    if (c.arg.renew.shadow_fd >= 0)
        close(c.arg.renew.shadow_fd);   /* the old memfd, or the new one not taken */
    for (uint32_t i = 0; fds && i < 2 * n; i++)
        if (fds[i] >= 0)
            close(fds[i]);              /* the same for the eventfds */
    free(fds);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Dirty log (log.c).                                                         */

static int cmd_set_log_base(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_log *nl = c->arg.set_log_base.log, old = c->dev->ctx.log;

    c->dev->ctx.log = *nl;
    c->dev->ctx.log.on = old.on;   /* VHOST_F_LOG_ALL goes with the device, not the map */
    *nl = old;          /* the old log goes back to the caller to unmap */
    return 0;
}

int fsdp_dev_set_log_base(struct fsdp_dev *dev, int fd, uint64_t size, uint64_t offset)
{
    struct fsdp_log nl = {0};
    struct dev_cmd c = {.op = CMD_SET_LOG_BASE, .dev = dev, .arg.set_log_base = {.log = &nl}};
    int rc = fd < 0 ? 0 : log_map(fd, size, offset, &nl);

    if (rc)
        return rc;
    rc = exec(&c);
    log_unmap(&nl);     /* the replaced log, after the loop stopped using it */
    return rc;
}

static int cmd_set_logging(struct fsdp_dp *dp, struct dev_cmd *c)
{
    c->dev->ctx.log.on = c->arg.set_logging.on;
    return 0;
}

int fsdp_dev_set_logging(struct fsdp_dev *dev, int on)
{
    struct dev_cmd c = {.op = CMD_SET_LOGGING, .dev = dev, .arg.set_logging = {.on = on != 0}};
    return exec(&c);
}

static int cmd_set_log_used(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    q->log_used = c->arg.set_log_used.on;
    q->log_used_gpa = c->arg.set_log_used.used_gpa;
    return 0;
}

int fsdp_queue_set_log_used(struct fsdp_dev *dev, uint32_t q, int on, uint64_t used_gpa)
{
    struct dev_cmd c = {.op = CMD_SET_LOG_USED, .dev = dev, .q = q,
                        .arg.set_log_used = {.on = on != 0, .used_gpa = used_gpa}};
    return exec(&c);
}

/* ------------------------------------------------------------------------ */
/* Synchronous engine (loop not running).                                     */

static int cmd_poll(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_dev *dev = c->dev;
    uint32_t flags = 0;

    for (uint32_t i = 0; i < dev->ctx.num_queues; i++) {
        struct fsdp_queue *q = &dev->ctx.q[i];
        if (queue_process(q))
            flags |= FSDP_POLL_PROGRESS;
        if (q->more)
            flags |= FSDP_POLL_MORE;
        flags |= queue_notify(q, NULL);
    }
    *c->arg.poll.flags = flags;
    return 0;
}

int fsdp_dev_poll(struct fsdp_dev *dev, uint32_t *out_flags)
{
    uint32_t flags = 0;
    struct dev_cmd c = {.link.fn = run_cmd, .op = CMD_POLL, .dev = dev,
                        .arg.poll = {.flags = &flags}};
    int rc = dp_exec_inline(dev->dp, &c.link);

    if (out_flags)
        *out_flags = flags;
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Queue commands.                                                            */

static int cmd_set_num(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    uint32_t num = c->arg.set_num.num;

    if (!q || num == 0 || num > c->dev->cfg.max_queue_size)
        return -EINVAL;
    return queue_set_num(q, num);
}

int fsdp_queue_set_num(struct fsdp_dev *dev, uint32_t q, uint32_t num)
{
    struct dev_cmd c = {.op = CMD_SET_NUM, .dev = dev, .q = q, .arg.set_num = {.num = num}};
    return exec(&c);
}

static int cmd_set_base(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    return queue_set_base(q, c->arg.set_base.avail_idx);
}

int fsdp_queue_set_base(struct fsdp_dev *dev, uint32_t q, uint32_t avail_idx)
{
    struct dev_cmd c = {.op = CMD_SET_BASE, .dev = dev, .q = q,
                        .arg.set_base = {.avail_idx = avail_idx}};
    return exec(&c);
}

static int cmd_set_addr(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    return queue_set_addr(q, c->arg.set_addr.desc, c->arg.set_addr.avail, c->arg.set_addr.used);
}

int fsdp_queue_set_addr(struct fsdp_dev *dev, uint32_t q, uint64_t desc_uaddr,
                        uint64_t avail_uaddr, uint64_t used_uaddr)
{
    struct dev_cmd c = {.op = CMD_SET_ADDR, .dev = dev, .q = q,
                        .arg.set_addr = {.desc = desc_uaddr, .avail = avail_uaddr,
                                         .used = used_uaddr}};
    return exec(&c);
}

static int cmd_set_guest_fd(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    bool call = c->arg.set_guest_fd.call;
    int *slot, old;

    if (!q)
        return -EINVAL;
    slot = call ? &q->guest_call_fd : &q->guest_kick_fd;
    old = *slot;
    *slot = c->arg.set_guest_fd.fd;
    if (call)
        q->guest_call_blocking = c->arg.set_guest_fd.blocking;
    c->arg.set_guest_fd.fd = -1;        /* consumed */
    if (!call)
        dp_kick_fd_changed(dp, q);      /* cancel the poll armed on the old kick fd */
    if (old >= 0)
        close(old);
    return 0;
}

static int set_guest_fd(struct fsdp_dev *dev, uint32_t q, int fd, bool call)
{
    struct dev_cmd c = {.op = CMD_SET_GUEST_FD, .dev = dev, .q = q,
                        .arg.set_guest_fd = {.fd = -1, .call = call}};
    int rc;

    if (fd >= 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0)
            return -errno;
        c.arg.set_guest_fd.fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);   /* the caller keeps its own */
        if (c.arg.set_guest_fd.fd < 0)
            return -errno;
        c.arg.set_guest_fd.blocking = !(fl & O_NONBLOCK);
    }
    rc = exec(&c);
    if (c.arg.set_guest_fd.fd >= 0)
        close(c.arg.set_guest_fd.fd);   /* not consumed */
    return rc;
}

int fsdp_queue_set_guest_kick(struct fsdp_dev *dev, uint32_t q, int fd)
{
    return set_guest_fd(dev, q, fd, false);
}

int fsdp_queue_set_guest_call(struct fsdp_dev *dev, uint32_t q, int fd)
{
    return set_guest_fd(dev, q, fd, true);
}

static int cmd_backend_fds(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    c->arg.backend_fds.kick = q->backend_kick_fd;
    c->arg.backend_fds.call = q->backend_call_fd;
    return 0;
}

int fsdp_queue_backend_fds(struct fsdp_dev *dev, uint32_t q, int *kick_fd, int *call_fd)
{
    /* Created with the device, replaced for each new backend (on the loop,
     * cmd_renew_backend_side): read on the loop too.  Still ours: the
     * caller dups what it sends. */
    struct dev_cmd c = {.op = CMD_BACKEND_FDS, .dev = dev, .q = q,
                        .arg.backend_fds = {.kick = -1, .call = -1}};
    int rc = exec(&c);

    *kick_fd = c.arg.backend_fds.kick;
    *call_fd = c.arg.backend_fds.call;
    return rc;
}

static int cmd_shadow_addrs(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q || !q->num)
        return -EINVAL;
    c->arg.shadow_addrs.desc = FSDP_SHADOW_UADDR_BASE + q->s_desc_off;
    c->arg.shadow_addrs.avail = FSDP_SHADOW_UADDR_BASE + q->s_avail_off;
    c->arg.shadow_addrs.used = FSDP_SHADOW_UADDR_BASE + q->s_used_off;
    return 0;
}

int fsdp_queue_shadow_addrs(struct fsdp_dev *dev, uint32_t q, uint64_t *desc,
                            uint64_t *avail, uint64_t *used)
{
    struct dev_cmd c = {.op = CMD_SHADOW_ADDRS, .dev = dev, .q = q};
    int rc = exec(&c);

    *desc = c.arg.shadow_addrs.desc;
    *avail = c.arg.shadow_addrs.avail;
    *used = c.arg.shadow_addrs.used;
    return rc;
}

static int cmd_start(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    int rc;

    if (!q)
        return -EINVAL;
    rc = queue_start(q, c->arg.start.flags);
    if (rc)
        return rc;
    after_cmd(c, q);
    return 0;
}

int fsdp_queue_start(struct fsdp_dev *dev, uint32_t q, uint32_t flags)
{
    struct dev_cmd c = {.op = CMD_START, .dev = dev, .q = q, .arg.start = {.flags = flags}};
    return exec(&c);
}

static int cmd_set_event_idx(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    int rc;

    if (!q)
        return -EINVAL;
    rc = queue_set_event_idx(q, c->arg.set_event_idx.flags);
    if (rc)
        return rc;
    after_cmd(c, q);
    return 0;
}

int fsdp_queue_set_event_idx(struct fsdp_dev *dev, uint32_t q, uint32_t flags)
{
    struct dev_cmd c = {.op = CMD_SET_EVENT_IDX, .dev = dev, .q = q,
                        .arg.set_event_idx = {.flags = flags}};
    return exec(&c);
}

static int cmd_pause(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    if (queue_pause(q))
        after_cmd(c, q);
    return 0;
}

int fsdp_queue_pause(struct fsdp_dev *dev, uint32_t q)
{
    struct dev_cmd c = {.op = CMD_PAUSE, .dev = dev, .q = q};
    return exec(&c);
}

static int cmd_stop(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    struct fsdp_stop_result *res = c->arg.stop.res;

    if (!q)
        return -EINVAL;
    if (dp_stop_waiting(dp, q))
        return -EBUSY;
    if (!q->started) {
        queue_stop_result(q, res);
        return q->inflight ? -ETIMEDOUT : 0;
    }
    queue_stop(q, c->arg.stop.backend_next_avail, res);
    after_cmd(c, q);
    if (queue_draining(q) && c->link.deferrable && dp_stop_wait(dp, q, &c->link, res) == 0)
        return 0;               /* the loop completes it (or cmd_stop_cancel) */
    queue_stop_finish(q, res);
    return queue_draining(q) ? -ETIMEDOUT : 0;
}

static int cmd_stop_cancel(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (q)
        dp_stop_end(dp, q, &c->arg.stop_cancel.target->link, -ETIMEDOUT);
    return 0;
}

int fsdp_queue_stop(struct fsdp_dev *dev, uint32_t q, uint32_t timeout_ms,
                    int64_t backend_next_avail, struct fsdp_stop_result *out)
{
    struct fsdp_stop_result res = {0};
    struct dev_cmd c = {.link.fn = run_cmd, .op = CMD_STOP, .dev = dev, .q = q,
                        .arg.stop = {.backend_next_avail = backend_next_avail, .res = &res}};
    /* Run on the loop only if the caller's timeout expires first. */
    struct dev_cmd cancel = {.link.fn = run_cmd, .op = CMD_STOP_CANCEL, .dev = dev, .q = q,
                             .arg.stop_cancel = {.target = &c}};
    int rc = dp_exec_timed(dev->dp, &c.link, (int64_t)timeout_ms, &cancel.link);

    if (out)
        *out = res;
    return rc;
}

static int cmd_clear_shadow(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    return queue_clear_shadow(q);
}

int fsdp_queue_clear_shadow(struct fsdp_dev *dev, uint32_t q)
{
    struct dev_cmd c = {.op = CMD_CLEAR_SHADOW, .dev = dev, .q = q};
    return exec(&c);
}

static int cmd_abort(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    int n;

    if (!q)
        return -EINVAL;
    n = queue_abort(q);
    if (n > 0)
        after_cmd(c, q);
    return n;
}

int fsdp_queue_abort(struct fsdp_dev *dev, uint32_t q)
{
    struct dev_cmd c = {.op = CMD_ABORT, .dev = dev, .q = q};
    return exec(&c);
}

static int cmd_discard(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    return queue_discard(q);
}

int fsdp_queue_discard(struct fsdp_dev *dev, uint32_t q)
{
    struct dev_cmd c = {.op = CMD_DISCARD, .dev = dev, .q = q};
    return exec(&c);
}

static int cmd_stats(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    *c->arg.stats.out = q->st;
    c->arg.stats.out->bounce_bytes = (uint64_t)(q->bounce.npages - q->bounce.nfree) * FSDP_PAGE;
    c->arg.stats.out->throttled_ns += hist_throttle_now(&q->h);   /* a stall still going on */
    return 0;
}

static int cmd_hist(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    *c->arg.hist.out = q->h.pub;
    return 0;
}

int fsdp_queue_stats(struct fsdp_dev *dev, uint32_t q, struct fsdp_queue_stats *out)
{
    struct dev_cmd c = {.op = CMD_STATS, .dev = dev, .q = q, .arg.stats = {.out = out}};
    return exec(&c);
}

int fsdp_queue_hist(struct fsdp_dev *dev, uint32_t q, struct fsdp_queue_hist *out)
{
    struct dev_cmd c = {.op = CMD_HIST, .dev = dev, .q = q, .arg.hist = {.out = out}};
    return exec(&c);
}

/* ------------------------------------------------------------------------ */
/* Device IOTLB (iotlb.c): vIOMMU translations QEMU sends.                    */

static int cmd_iotlb_enable(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_iotlb *nt = c->arg.iotlb_enable.iotlb, old = c->dev->iotlb;

    c->dev->iotlb = *nt;
    *nt = old;          /* the replaced table goes back to the caller to free */
    retranslate_all(c->dev);
    return 0;
}

int fsdp_dev_iotlb_enable(struct fsdp_dev *dev, int on, uint32_t cap, int keep_completed)
{
    struct fsdp_iotlb nt = {0};
    struct dev_cmd c = {.op = CMD_IOTLB_ENABLE, .dev = dev, .arg.iotlb_enable = {.iotlb = &nt}};
    int rc = 0;

    if (on) {
        if (cap > FSDP_IOTLB_MAX_ENTRIES)
            return -EINVAL;
        rc = iotlb_init(&nt, cap);     /* allocated here, not on the loop */
        nt.on = true;
        nt.keep_completed = keep_completed != 0;
    }
    if (!rc)
        rc = exec(&c);
    iotlb_free(&nt);
    return rc;
}

static int cmd_iotlb_update(struct fsdp_dp *dp, struct dev_cmd *c)
{
    int rc;

    if (!c->dev->iotlb.on)
        return -EPERM;
    rc = iotlb_update(&c->dev->iotlb, c->arg.iotlb_msg.iova, c->arg.iotlb_msg.size,
                      c->arg.iotlb_msg.uaddr, c->arg.iotlb_msg.perm);
    if (!rc)
        retranslate_all(c->dev);    /* rings waiting for it start; a replaced one moves */
    return rc;
}

int fsdp_dev_iotlb_update(struct fsdp_dev *dev, uint64_t iova, uint64_t size, uint64_t uaddr,
                          uint32_t perm)
{
    struct dev_cmd c = {.op = CMD_IOTLB_UPDATE, .dev = dev,
                        .arg.iotlb_msg = {.iova = iova, .size = size, .uaddr = uaddr, .perm = perm}};
    return exec(&c);
}

/* On the loop, between two passes: once it returns, no access uses the old
 * translation.  Requests in flight keep IOVAs, not host pointers: their
 * copy-back translates again and fails the request if the buffer is gone. */
static int cmd_iotlb_invalidate(struct fsdp_dp *dp, struct dev_cmd *c)
{
    uint32_t n;

    if (!c->dev->iotlb.on)
        return -EPERM;
    n = iotlb_invalidate(&c->dev->iotlb, c->arg.iotlb_msg.iova, c->arg.iotlb_msg.size);
    if (n)
        retranslate_all(c->dev);    /* a ring that lost its translation waits (miss) */
    return (int)n;
}

int fsdp_dev_iotlb_invalidate(struct fsdp_dev *dev, uint64_t iova, uint64_t size)
{
    struct dev_cmd c = {.op = CMD_IOTLB_INVALIDATE, .dev = dev,
                        .arg.iotlb_msg = {.iova = iova, .size = size}};
    return exec(&c);
}

int fsdp_dev_iotlb_entries(struct fsdp_dev *dev)
{
    struct dev_cmd c = {.op = CMD_IOTLB_ENTRIES, .dev = dev};
    return exec(&c);
}

static int cmd_iotlb_translate(struct fsdp_dp *dp, struct dev_cmd *c)
{
    int rc = iotlb_lookup(&c->dev->iotlb, c->arg.iotlb_msg.iova, c->arg.iotlb_msg.perm,
                          c->arg.iotlb_msg.out, c->arg.iotlb_msg.out + 1);
    return rc == FSDP_EV_IOTLB_MISS ? -ENOENT : rc == FSDP_EV_IOVA_PERM ? -EACCES : 0;
}

int fsdp_dev_iotlb_translate(struct fsdp_dev *dev, uint64_t iova, uint32_t perm, uint64_t *uaddr,
                             uint64_t *avail)
{
    uint64_t out[2] = {0, 0};
    struct dev_cmd c = {.op = CMD_IOTLB_TRANSLATE, .dev = dev,
                        .arg.iotlb_msg = {.iova = iova, .perm = perm, .out = out}};
    int rc = exec(&c);

    *uaddr = out[0];
    *avail = out[1];
    return rc;
}

static int cmd_iotlb_answered(struct fsdp_dp *dp, struct dev_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    iotlb_answered(&c->dev->iotlb, c->q, c->arg.iotlb_msg.iova, c->arg.iotlb_msg.perm != 0);
    if (q->addr_set && !q->rings_ok)
        queue_translate_rings(q, true);
    /* A chain that waited is walked again by the loop's next pass. */
    return 0;
}

int fsdp_queue_iotlb_answered(struct fsdp_dev *dev, uint32_t q, uint64_t iova, int ok)
{
    /* .perm carries ok: the answer names no access of its own */
    struct dev_cmd c = {.op = CMD_IOTLB_ANSWERED, .dev = dev, .q = q,
                        .arg.iotlb_msg = {.iova = iova, .perm = ok != 0}};
    return exec(&c);
}

/* ------------------------------------------------------------------------ */
/* Dispatch (on the loop, or inline).                                         */

static int run_cmd(struct fsdp_dp *dp, struct fsdp_cmd *link)
{
    struct dev_cmd *c = (struct dev_cmd *)((char *)link - offsetof(struct dev_cmd, link));

    switch (c->op) {
    case CMD_ATTACH:        return cmd_attach(dp, c);
    case CMD_DETACH:        return cmd_detach(dp, c);
    case CMD_SET_MEM:       return cmd_set_mem(dp, c);
    case CMD_ADD_REGION:    return cmd_add_region(dp, c);
    case CMD_REMOVE_REGION: return cmd_remove_region(dp, c);
    case CMD_RESET:         return cmd_reset(dp, c);
    case CMD_RENEW_BACKEND_SIDE: return cmd_renew_backend_side(dp, c);
    case CMD_SET_LOG_BASE:  return cmd_set_log_base(dp, c);
    case CMD_SET_LOGGING:   return cmd_set_logging(dp, c);
    case CMD_POLL:          return cmd_poll(dp, c);
    case CMD_SET_LOG_USED:  return cmd_set_log_used(dp, c);
    case CMD_SET_NUM:       return cmd_set_num(dp, c);
    case CMD_SET_BASE:      return cmd_set_base(dp, c);
    case CMD_SET_ADDR:      return cmd_set_addr(dp, c);
    case CMD_SET_GUEST_FD:  return cmd_set_guest_fd(dp, c);
    case CMD_BACKEND_FDS:   return cmd_backend_fds(dp, c);
    case CMD_SHADOW_ADDRS:  return cmd_shadow_addrs(dp, c);
    case CMD_START:         return cmd_start(dp, c);
    case CMD_SET_EVENT_IDX: return cmd_set_event_idx(dp, c);
    case CMD_PAUSE:         return cmd_pause(dp, c);
    case CMD_STOP:          return cmd_stop(dp, c);
    case CMD_STOP_CANCEL:   return cmd_stop_cancel(dp, c);
    case CMD_CLEAR_SHADOW:  return cmd_clear_shadow(dp, c);
    case CMD_ABORT:         return cmd_abort(dp, c);
    case CMD_DISCARD:       return cmd_discard(dp, c);
    case CMD_STATS:         return cmd_stats(dp, c);
    case CMD_HIST:          return cmd_hist(dp, c);
    case CMD_IOTLB_ENABLE:  return cmd_iotlb_enable(dp, c);
    case CMD_IOTLB_UPDATE:  return cmd_iotlb_update(dp, c);
    case CMD_IOTLB_INVALIDATE: return cmd_iotlb_invalidate(dp, c);
    case CMD_IOTLB_ENTRIES: return (int)c->dev->iotlb.n;
    case CMD_IOTLB_ANSWERED: return cmd_iotlb_answered(dp, c);
    case CMD_IOTLB_TRANSLATE: return cmd_iotlb_translate(dp, c);
    }
    return -EINVAL;
}
