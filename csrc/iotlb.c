/*
 * iotlb.c: the device IOTLB terminated by fastshadow (vIOMMU guests).
 *
 * Owns: the table of IOVA -> QEMU user address translations QEMU sent
 * (VHOST_USER_IOTLB_MSG, type VHOST_IOTLB_UPDATE / VHOST_IOTLB_INVALIDATE,
 * docs/interop/vhost-user.rst "IOMMU support"), their permissions, and the
 * per-queue miss state.
 * Calls: base.
 *
 * With VIRTIO_F_ACCESS_PLATFORM and a vIOMMU every address the guest
 * writes in its rings (and QEMU's SET_VRING_ADDR) is an IOVA.  QEMU answers a
 * miss (VHOST_USER_BACKEND_IOTLB_MSG, VHOST_IOTLB_MISS) with an update whose
 * uaddr is its own user address of the page, the same address space as the
 * memory table's userspace_addr (hw/virtio/vhost.c vhost_device_iotlb_miss):
 * mem.c turns it into a host pointer and a guest-physical address.
 *
 * The table is sorted and disjoint (an update replaces what it overlaps), so
 * a lookup is a binary search.  It is bounded: a front-end that floods it
 * gets -ENOSPC past cap (the control plane refuses that update with one line),
 * never an allocation.  Entries are page sized with intel-iommu (a 1 MiB
 * buffer is 256 of them), so the cap is in the tens of thousands.
 */
#include <errno.h>
#include <stdlib.h>

#include "iotlb.h"
#include "base.h"

int iotlb_init(struct fsdp_iotlb *t, uint32_t cap)
{
    memset(t, 0, sizeof(*t));
    if (cap == 0)
        return -EINVAL;
    /* One spare slot: an invalidation that cuts an entry in two needs it
     * before it can drop the middle. */
    t->e = calloc((size_t)cap + 1, sizeof(*t->e));
    if (!t->e)
        return -ENOMEM;
    t->cap = cap;
    return 0;
}

void iotlb_free(struct fsdp_iotlb *t)
{
    free(t->e);
    memset(t, 0, sizeof(*t));
}

void iotlb_clear(struct fsdp_iotlb *t)
{
    t->n = 0;
    memset(t->state, 0, sizeof(t->state));
    t->generation++;
}

/* Index of the first entry ending after iova (n if none). */
static uint32_t first_after(const struct fsdp_iotlb *t, uint64_t iova)
{
    uint32_t lo = 0, hi = t->n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const struct fsdp_iotlb_entry *e = &t->e[mid];
        if (e->iova + e->size <= iova)   /* entries never wrap */
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void remove_at(struct fsdp_iotlb *t, uint32_t i)
{
    memmove(&t->e[i], &t->e[i + 1], (t->n - i - 1) * sizeof(t->e[0]));
    t->n--;
}

static void insert_at(struct fsdp_iotlb *t, uint32_t i, const struct fsdp_iotlb_entry *e)
{
    memmove(&t->e[i + 1], &t->e[i], (t->n - i) * sizeof(t->e[0]));
    t->e[i] = *e;
    t->n++;
}

/*
 * The last byte of an invalidation, as the kernel's vhost reads it
 * (vhost_iotlb_del_range(iova, iova + size - 1)): a size that runs past the
 * end of the address space, or 0, means "to the end".  QEMU sends size 0 for
 * a global device-IOTLB flush: vhost_iommu_unmap_notify passes addr_mask + 1,
 * which wraps to 0 when the mask is all ones (Linux flushes a device's
 * whole IOTLB that way in lazy mode); reading it as "nothing" would keep
 * every stale translation.
 */
static uint64_t inval_last(uint64_t iova, uint64_t size)
{
    uint64_t last = iova + size - 1;    /* wraps on purpose */
    return (size == 0 || last < iova) ? UINT64_MAX : last;
}

uint32_t iotlb_invalidate(struct fsdp_iotlb *t, uint64_t iova, uint64_t size)
{
    uint64_t last = inval_last(iova, size);
    uint32_t i = first_after(t, iova), touched = 0;

    while (i < t->n && t->e[i].iova <= last) {
        struct fsdp_iotlb_entry *e = &t->e[i];
        uint64_t e_end = e->iova + e->size;     /* no wrap: checked at update */
        touched++;
        if (e->iova < iova && e_end - 1 > last) {
            /* Cut in two: keep both ends (the spare slot makes room); past
             * cap the tail is dropped instead, which is always safe (a later
             * access misses and asks again). */
            uint64_t end = last + 1;     /* last < e_end - 1: no wrap */
            struct fsdp_iotlb_entry tail = {end, e_end - end, e->uaddr + (end - e->iova), e->perm};
            e->size = iova - e->iova;
            if (t->n < t->cap)
                insert_at(t, i + 1, &tail);
            break;
        }
        if (e->iova < iova) {            /* keep the head */
            e->size = iova - e->iova;
            i++;
        } else if (e_end - 1 > last) {   /* keep the tail */
            uint64_t end = last + 1;
            e->uaddr += end - e->iova;
            e->size = e_end - end;
            e->iova = end;
            break;
        } else {
            remove_at(t, i);
        }
    }
    if (touched)
        t->generation++;
    return touched;
}

int iotlb_update(struct fsdp_iotlb *t, uint64_t iova, uint64_t size, uint64_t uaddr, uint32_t perm)
{
    struct fsdp_iotlb_entry e = {iova, size, uaddr, perm};

    if (size == 0 || size > UINT64_MAX - iova || size > UINT64_MAX - uaddr)
        return -EINVAL;
    if (perm == 0 || perm > (FSDP_IOTLB_RO | FSDP_IOTLB_WO))
        return -EINVAL;
    /* What it overlaps goes first: the newest translation wins (QEMU sends
     * the same page again after the guest re-mapped it). */
    iotlb_invalidate(t, iova, size);
    if (t->n >= t->cap)
        return -ENOSPC;
    insert_at(t, first_after(t, iova), &e);
    t->generation++;
    return 0;
}

int iotlb_lookup(const struct fsdp_iotlb *t, uint64_t iova, uint32_t perm, uint64_t *uaddr,
                 uint64_t *avail)
{
    return iotlb_lookup_run(t, iova, perm, 0, uaddr, avail);
}

/*
 * The hot path's lookup: with want > 0, following entries that continue both
 * the IOVA and the user address (a Linux guest maps a physically contiguous
 * buffer page by page, each page its own entry) with the access are joined,
 * up to want bytes: one piece, one copy, instead of one per page.  Measured
 * with `fastshadow bench --modes isolated,isolated-iotlb`: 4 KiB pieces cost
 * 40 % of 1 MiB read throughput before the join.
 */
int iotlb_lookup_run(const struct fsdp_iotlb *t, uint64_t iova, uint32_t perm, uint64_t want,
                     uint64_t *uaddr, uint64_t *avail)
{
    uint32_t i = first_after(t, iova);
    const struct fsdp_iotlb_entry *e;
    uint64_t run;

    if (i == t->n || t->e[i].iova > iova)
        return FSDP_EV_IOTLB_MISS;
    e = &t->e[i];
    if ((e->perm & perm) != perm)
        return FSDP_EV_IOVA_PERM;
    *uaddr = e->uaddr + (iova - e->iova);
    run = e->size - (iova - e->iova);
    while (run < want && ++i < t->n) {
        const struct fsdp_iotlb_entry *next = &t->e[i];
        if (next->iova != e->iova + e->size || next->uaddr != e->uaddr + e->size ||
            (next->perm & perm) != perm)
            break;
        run += next->size;
        e = next;
    }
    *avail = run;
    return 0;
}

int iotlb_missed(struct fsdp_iotlb *t, uint32_t q, uint64_t iova)
{
    const uint64_t mask = ~(uint64_t)(FSDP_PAGE - 1);
    bool same;

    if (q >= FSDP_MAX_QUEUES)
        return FSDP_EV_IOVA_UNMAPPED;
    same = (t->miss_iova[q] & mask) == (iova & mask);
    switch (t->state[q]) {
    case IOTLB_WAITING:
        return 0;
    case IOTLB_REFUSED:
        if (same) {
            t->state[q] = IOTLB_IDLE;
            return FSDP_EV_IOVA_UNMAPPED;
        }
        break;      /* another page of the same chain: ask for it too */
    default:
        break;
    }
    if (same && t->reasks[q] >= IOTLB_MAX_REASKS) {
        t->reasks[q] = 0;
        return FSDP_EV_IOVA_UNMAPPED;   /* answered "yes" again and again, never sent */
    }
    t->reasks[q] = same ? t->reasks[q] + 1 : 0;
    t->state[q] = IOTLB_WAITING;
    t->miss_iova[q] = iova;
    return FSDP_EV_IOTLB_MISS;
}

void iotlb_answered(struct fsdp_iotlb *t, uint32_t q, uint64_t iova, bool ok)
{
    /* The exact address: an answer to an older miss of the queue (its
     * request went on when the update came, before the ack) must not be
     * taken for the answer to the current one, even on the same page. */
    if (q < FSDP_MAX_QUEUES && t->state[q] == IOTLB_WAITING && t->miss_iova[q] == iova)
        t->state[q] = ok ? IOTLB_IDLE : IOTLB_REFUSED;
}

void iotlb_settled(struct fsdp_iotlb *t, uint32_t q)
{
    if (q < FSDP_MAX_QUEUES) {
        t->state[q] = IOTLB_IDLE;
        t->reasks[q] = 0;
    }
}
