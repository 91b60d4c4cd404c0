/*
 * device.c: devices, their shadow region, and the control-plane API.
 *
 * Every public fsdp_dev_* / fsdp_queue_* function packs its arguments into a
 * struct fsdp_cmd and hands it to dp_exec (loop.c), which runs cmd_* below ON
 * the loop thread between two batches (or inline when the loop is not
 * running).  Slow work that needs no engine state (mmap of guest regions,
 * memfd creation, munmap of old regions, dup of fds) is done on the caller's
 * thread before or after the command, so the loop only swaps pointers.
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
 *   to a page, so the slot does not move when num changes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fsdp_internal.h"
#include "probes.h"

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
};

static struct fsdp_dev *dev_of(struct fsdp_devctx *d)
{
    return (struct fsdp_dev *)((char *)d - offsetof(struct fsdp_dev, ctx));
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
    if (dev->ctx.shadow)
        munmap(dev->ctx.shadow, dev->shadow_size);
    if (dev->shadow_fd >= 0)
        close(dev->shadow_fd);
    free(dev);
}

static int make_shadow(struct fsdp_dev *dev)
{
    char name[16 + FSDP_NAME_MAX];
    void *p;

    snprintf(name, sizeof(name), "fastshadow-shadow:%s", dev->name);
    dev->shadow_fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (dev->shadow_fd < 0)
        return -errno;
    if (ftruncate(dev->shadow_fd, (off_t)dev->shadow_size) < 0)
        return -errno;
    /* The size is fixed for good: the backend cannot shrink it under our
     * mapping (SIGBUS) nor grow it; F_SEAL_SEAL so nobody changes that. */
    if (fcntl(dev->shadow_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        return -errno;
    p = mmap(NULL, dev->shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED, dev->shadow_fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    dev->ctx.shadow = p;
    return 0;
}

static int cmd_attach(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    return dp_attach(dp, &c->dev->ctx);
}

int fsdp_dev_add(struct fsdp_dp *dp, const char *name, const struct fsdp_dev_config *cfg,
                 struct fsdp_dev **out)
{
    struct fsdp_dev_config k = *cfg;
    struct fsdp_dev *dev;
    uint64_t min_size;
    struct fsdp_cmd c = {0};
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
    k.bounce_per_queue = FSDP_ALIGN_UP(k.bounce_per_queue, FSDP_PAGE);

    dev = calloc(1, sizeof(*dev));
    if (!dev)
        return -ENOMEM;
    dev->dp = dp;
    dev->ctx.events = dp_events(dp);
    dev->ctx.max_request_bytes = k.max_request_bytes;
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
    for (uint32_t i = 0; i < k.num_queues; i++)
        queue_init(&dev->ctx.q[i], &dev->ctx, i);
    for (uint32_t i = 0; i < k.num_queues; i++) {
        rc = queue_open(&dev->ctx.q[i]);
        if (rc)
            goto fail;
    }

    c.fn = cmd_attach;
    c.dev = dev;
    rc = dp_exec(dp, &c);
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
    /* Immutable after creation: no command needed. */
    memset(out, 0, sizeof(*out));
    out->id = dev->ctx.id;
    out->num_queues = dev->ctx.num_queues;
    out->max_queue_size = dev->cfg.max_queue_size;
    out->shadow_fd = dev->shadow_fd;
    out->shadow_size = dev->shadow_size;
    out->shadow_gpa = FSDP_SHADOW_GPA_BASE;
    out->shadow_uaddr = FSDP_SHADOW_UADDR_BASE;
    out->queue_slot_size = dev->ctx.slot_size;
    out->bounce_per_queue = dev->cfg.bounce_per_queue;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Helpers run on the loop (or inline).                                       */

static void after_cmd(struct fsdp_cmd *c, struct fsdp_queue *q)
{
    if (!c->deferrable)
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

static int cmd_detach(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_dev *dev = c->dev;

    dp_detach(dp, &dev->ctx);     /* a stop still waiting fails with -ENODEV */
    return 0;
}

int fsdp_dev_remove(struct fsdp_dev *dev)
{
    struct fsdp_cmd c = {.fn = cmd_detach, .dev = dev};
    int rc = dp_exec(dev->dp, &c);
    if (rc)
        return rc;
    dev_destroy(dev);
    return 0;
}

static int cmd_set_mem(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_mem *nm = c->out;
    struct fsdp_mem tmp = c->dev->ctx.mem;

    c->dev->ctx.mem = *nm;
    *nm = tmp;          /* the old table goes back to the caller to unmap */
    c->dev->ctx.mem.last = 0;
    retranslate_all(c->dev);
    return 0;
}

int fsdp_dev_set_mem_table(struct fsdp_dev *dev, const struct fsdp_mem_region *regions,
                           uint32_t n)
{
    struct fsdp_mem *nm;
    struct fsdp_cmd c = {.fn = cmd_set_mem, .dev = dev};
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
        c.out = nm;
        rc = dp_exec(dev->dp, &c);
    }
    /* nm now holds either the rejected new table or the replaced old one. */
    for (uint32_t i = 0; i < nm->n; i++)
        mem_unmap_region(&nm->r[i]);
    free(nm);
    return rc;
}

static int cmd_add_region(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_mem *m = &c->dev->ctx.mem;
    struct fsdp_region *nr = c->out;
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
    struct fsdp_cmd c = {.fn = cmd_add_region, .dev = dev, .out = &r};
    int rc = mem_map_region(region, &r);

    if (rc)
        return rc;
    rc = dp_exec(dev->dp, &c);
    if (rc)
        mem_unmap_region(&r);
    return rc;
}

static int cmd_remove_region(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_mem *m = &c->dev->ctx.mem;
    struct fsdp_region *out = c->out;

    for (uint32_t i = 0; i < m->n; i++) {
        if (m->r[i].gpa == c->u[0] && m->r[i].size == c->u[1]) {
            *out = m->r[i];
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
    struct fsdp_cmd c = {.fn = cmd_remove_region, .dev = dev, .out = &r, .u = {gpa, size}};
    int rc = dp_exec(dev->dp, &c);

    if (!rc)
        mem_unmap_region(&r);   /* after the loop stopped using it */
    return rc;
}

static int cmd_reset(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_dev *dev = c->dev;

    dev->ctx.log.on = false;   /* features are renegotiated after a reset */
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
    struct fsdp_cmd c = {.fn = cmd_reset, .dev = dev};
    return dp_exec(dev->dp, &c);
}

/* ------------------------------------------------------------------------ */
/* Dirty log (log.c).                                                         */

static int cmd_set_log_base(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_log *nl = c->out, old = c->dev->ctx.log;

    c->dev->ctx.log = *nl;
    c->dev->ctx.log.on = old.on;   /* VHOST_F_LOG_ALL goes with the device, not the map */
    *nl = old;          /* the old log goes back to the caller to unmap */
    return 0;
}

int fsdp_dev_set_log_base(struct fsdp_dev *dev, int fd, uint64_t size, uint64_t offset)
{
    struct fsdp_log nl = {0};
    struct fsdp_cmd c = {.fn = cmd_set_log_base, .dev = dev, .out = &nl};
    int rc = fd < 0 ? 0 : log_map(fd, size, offset, &nl);

    if (rc)
        return rc;
    rc = dp_exec(dev->dp, &c);
    log_unmap(&nl);     /* the replaced log, after the loop stopped using it */
    return rc;
}

static int cmd_set_logging(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    c->dev->ctx.log.on = c->u[0] != 0;
    return 0;
}

int fsdp_dev_set_logging(struct fsdp_dev *dev, int on)
{
    struct fsdp_cmd c = {.fn = cmd_set_logging, .dev = dev, .u = {on != 0}};
    return dp_exec(dev->dp, &c);
}

static int cmd_set_log_used(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    q->log_used = c->u[0] != 0;
    q->log_used_gpa = c->u[1];
    return 0;
}

int fsdp_queue_set_log_used(struct fsdp_dev *dev, uint32_t q, int on, uint64_t used_gpa)
{
    struct fsdp_cmd c = {.fn = cmd_set_log_used, .dev = dev, .q = q, .u = {on != 0, used_gpa}};
    return dp_exec(dev->dp, &c);
}

static int cmd_poll(struct fsdp_dp *dp, struct fsdp_cmd *c)
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
    *(uint32_t *)c->out = flags;
    return 0;
}

int fsdp_dev_poll(struct fsdp_dev *dev, uint32_t *out_flags)
{
    uint32_t flags = 0;
    struct fsdp_cmd c = {.fn = cmd_poll, .dev = dev, .out = &flags};
    int rc = dp_exec_inline(dev->dp, &c);

    if (out_flags)
        *out_flags = flags;
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Queue commands.                                                            */

static int cmd_set_num(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    uint32_t num = (uint32_t)c->u[0];

    if (!q || num == 0 || num > c->dev->cfg.max_queue_size)
        return -EINVAL;
    return queue_set_num(q, num);
}

int fsdp_queue_set_num(struct fsdp_dev *dev, uint32_t q, uint32_t num)
{
    struct fsdp_cmd c = {.fn = cmd_set_num, .dev = dev, .q = q, .u = {num}};
    return dp_exec(dev->dp, &c);
}

static int cmd_set_base(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q || c->u[0] > 0xffff)
        return -EINVAL;
    return queue_set_base(q, (uint32_t)c->u[0]);
}

int fsdp_queue_set_base(struct fsdp_dev *dev, uint32_t q, uint32_t avail_idx)
{
    struct fsdp_cmd c = {.fn = cmd_set_base, .dev = dev, .q = q, .u = {avail_idx}};
    return dp_exec(dev->dp, &c);
}

static int cmd_set_addr(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    return queue_set_addr(q, c->u[0], c->u[1], c->u[2]);
}

int fsdp_queue_set_addr(struct fsdp_dev *dev, uint32_t q, uint64_t desc_uaddr,
                        uint64_t avail_uaddr, uint64_t used_uaddr)
{
    struct fsdp_cmd c = {.fn = cmd_set_addr, .dev = dev, .q = q,
                         .u = {desc_uaddr, avail_uaddr, used_uaddr}};
    return dp_exec(dev->dp, &c);
}

static int cmd_set_fd(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    int *slot, old;

    if (!q)
        return -EINVAL;
    slot = c->u[1] ? &q->guest_call_fd : &q->guest_kick_fd;
    old = *slot;
    *slot = (int)(int64_t)c->u[0];
    if (c->u[1])
        q->guest_call_blocking = c->u[2];
    c->u[0] = (uint64_t)(int64_t)-1;   /* consumed */
    if (!c->u[1])
        dp_kick_fd_changed(dp, q);      /* cancel the read armed on the old kick fd */
    if (old >= 0)
        close(old);
    return 0;
}

static int set_guest_fd(struct fsdp_dev *dev, uint32_t q, int fd, bool call)
{
    int nfd = -1, rc;
    struct fsdp_cmd c = {.fn = cmd_set_fd, .dev = dev, .q = q};

    if (fd >= 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0)
            return -errno;
        nfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);   /* the caller keeps its own */
        if (nfd < 0)
            return -errno;
        c.u[2] = !(fl & O_NONBLOCK);
    }
    c.u[0] = (uint64_t)(int64_t)nfd;
    c.u[1] = call;
    rc = dp_exec(dev->dp, &c);
    if ((int64_t)c.u[0] >= 0)
        close(nfd);   /* not consumed */
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

int fsdp_queue_backend_fds(struct fsdp_dev *dev, uint32_t q, int *kick_fd, int *call_fd)
{
    /* Created with the device, never replaced: no command needed. */
    if (q >= dev->ctx.num_queues)
        return -EINVAL;
    *kick_fd = dev->ctx.q[q].backend_kick_fd;
    *call_fd = dev->ctx.q[q].backend_call_fd;
    return 0;
}

static int cmd_shadow_addrs(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    uint64_t *o = c->out;

    if (!q || !q->num)
        return -EINVAL;
    o[0] = FSDP_SHADOW_UADDR_BASE + q->s_desc_off;
    o[1] = FSDP_SHADOW_UADDR_BASE + q->s_avail_off;
    o[2] = FSDP_SHADOW_UADDR_BASE + q->s_used_off;
    return 0;
}

int fsdp_queue_shadow_addrs(struct fsdp_dev *dev, uint32_t q, uint64_t *desc,
                            uint64_t *avail, uint64_t *used)
{
    uint64_t o[3] = {0};
    struct fsdp_cmd c = {.fn = cmd_shadow_addrs, .dev = dev, .q = q, .out = o};
    int rc = dp_exec(dev->dp, &c);

    *desc = o[0];
    *avail = o[1];
    *used = o[2];
    return rc;
}

static int cmd_start(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    int rc;

    if (!q)
        return -EINVAL;
    rc = queue_start(q, (uint32_t)c->u[0]);
    if (rc)
        return rc;
    after_cmd(c, q);
    return 0;
}

int fsdp_queue_start(struct fsdp_dev *dev, uint32_t q, uint32_t flags)
{
    struct fsdp_cmd c = {.fn = cmd_start, .dev = dev, .q = q, .u = {flags}};
    return dp_exec(dev->dp, &c);
}

static int cmd_pause(struct fsdp_dp *dp, struct fsdp_cmd *c)
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
    struct fsdp_cmd c = {.fn = cmd_pause, .dev = dev, .q = q};
    return dp_exec(dev->dp, &c);
}

static int cmd_stop(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    struct fsdp_stop_result *res = c->out;

    if (!q)
        return -EINVAL;
    if (dp_stop_waiting(dp, q))
        return -EBUSY;
    if (!q->started) {
        queue_stop_result(q, res);
        return q->inflight ? -ETIMEDOUT : 0;
    }
    queue_stop(q, c->u[0] == UINT64_MAX ? -1 : (int64_t)c->u[0], res);
    after_cmd(c, q);
    if (queue_draining(q) && c->deferrable && dp_stop_wait(dp, q, c, res) == 0)
        return 0;               /* the loop completes it (or cmd_stop_cancel) */
    queue_stop_finish(q, res);
    return queue_draining(q) ? -ETIMEDOUT : 0;
}

static int cmd_stop_cancel(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);
    struct fsdp_cmd *target = (struct fsdp_cmd *)c->p;

    if (q)
        dp_stop_end(dp, q, target, -ETIMEDOUT);
    return 0;
}

int fsdp_queue_stop(struct fsdp_dev *dev, uint32_t q, uint32_t timeout_ms,
                    int64_t backend_next_avail, struct fsdp_stop_result *out)
{
    struct fsdp_stop_result res = {0};
    struct fsdp_cmd c = {.fn = cmd_stop, .dev = dev, .q = q, .out = &res,
                         .u = {backend_next_avail < 0 ? UINT64_MAX : (uint64_t)backend_next_avail}};
    int rc = dp_exec_timed(dev->dp, &c, (int64_t)timeout_ms, cmd_stop_cancel);

    if (out)
        *out = res;
    return rc;
}

static int cmd_clear_shadow(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    return queue_clear_shadow(q);
}

int fsdp_queue_clear_shadow(struct fsdp_dev *dev, uint32_t q)
{
    struct fsdp_cmd c = {.fn = cmd_clear_shadow, .dev = dev, .q = q};
    return dp_exec(dev->dp, &c);
}

static int cmd_abort(struct fsdp_dp *dp, struct fsdp_cmd *c)
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
    struct fsdp_cmd c = {.fn = cmd_abort, .dev = dev, .q = q};
    return dp_exec(dev->dp, &c);
}

static int cmd_stats(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    struct fsdp_queue *q = get_q(c->dev, c->q);

    if (!q)
        return -EINVAL;
    *(struct fsdp_queue_stats *)c->out = q->st;
    return 0;
}

int fsdp_queue_stats(struct fsdp_dev *dev, uint32_t q, struct fsdp_queue_stats *out)
{
    struct fsdp_cmd c = {.fn = cmd_stats, .dev = dev, .q = q, .out = out};
    return dp_exec(dev->dp, &c);
}

void fsdp_dp_free(struct fsdp_dp *dp)
{
    struct fsdp_devctx *d;

    if (!dp)
        return;
    fsdp_dp_stop(dp);
    while ((d = dp_take_dev(dp)))   /* devices never removed */
        dev_destroy(dev_of(d));
    dp_destroy(dp);
}
