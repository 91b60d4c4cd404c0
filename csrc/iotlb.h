/*
 * iotlb.h: the device IOTLB of one device (iotlb.c): IOVA -> QEMU user
 * address, with the access permissions QEMU gave, and the per-queue state of
 * a miss asked of QEMU.
 */
#ifndef FSDP_IOTLB_H
#define FSDP_IOTLB_H

#include "base.h"

struct fsdp_iotlb_entry {
    uint64_t iova, size;    /* [iova, iova + size), size > 0, no wrap */
    uint64_t uaddr;         /* QEMU's user address of iova (as in the memory table) */
    uint32_t perm;          /* FSDP_IOTLB_RO | FSDP_IOTLB_WO */
};

/* Per-queue miss state: a miss is asked once.  QEMU's answer "no
 * translation" makes the same page refused (REFUSED); an answer with one lets
 * the queue walk again, and a page missing again then (a request that
 * completed meanwhile dropped it, iotlb_forget) is asked again, up to
 * IOTLB_MAX_REASKS times in a row (a front-end that acks without ever
 * sending the update cannot keep a request waiting forever). */
enum { IOTLB_IDLE = 0, IOTLB_WAITING = 1, IOTLB_REFUSED = 2 };
#define IOTLB_MAX_REASKS 8

struct fsdp_iotlb {
    bool on;                /* addresses are IOVAs (ACCESS_PLATFORM with a vIOMMU) */
    uint32_t n, cap;        /* entries, and at most this many (fsdp_dev_iotlb_config) */
    struct fsdp_iotlb_entry *e;     /* sorted by iova, disjoint; cap + 1 slots */
    uint8_t state[FSDP_MAX_QUEUES];
    uint64_t miss_iova[FSDP_MAX_QUEUES];
    uint8_t reasks[FSDP_MAX_QUEUES];    /* the same page asked again in a row */
    uint64_t generation;    /* +1 at every change (update or invalidation) */
    uint64_t miss_at;       /* the last lookup that failed (mem.c): IOVA ... */
    uint32_t miss_perm;     /* ... and the access it needed */
    bool refuse_misses;     /* chain walk: a miss is a bad buffer (QEMU answered) */
    bool keep_completed;    /* keep a completed request's translations (shadow.c iotlb_forget) */
};

int iotlb_init(struct fsdp_iotlb *t, uint32_t cap);
void iotlb_free(struct fsdp_iotlb *t);
/* Forget every entry and miss (device reset, IOTLB turned off). */
void iotlb_clear(struct fsdp_iotlb *t);
/* Install [iova, iova+size) -> uaddr with perm, replacing what overlapped it.
 * 0, -EINVAL (size 0, a wrap, perm 0 or > 3), -ENOSPC (cap reached). */
int iotlb_update(struct fsdp_iotlb *t, uint64_t iova, uint64_t size, uint64_t uaddr, uint32_t perm);
/* Remove every translation of [iova, iova+size) (entries cut at its ends);
 * size 0, or a range past the end of the address space, runs to the end
 * (QEMU's global flush).  Returns the entries removed or cut. */
uint32_t iotlb_invalidate(struct fsdp_iotlb *t, uint64_t iova, uint64_t size);
/* Translate iova for an access needing perm (FSDP_IOTLB_RO to read,
 * FSDP_IOTLB_WO to write): 0 with *uaddr and *avail (bytes translatable from
 * iova on within this entry), FSDP_EV_IOTLB_MISS (no entry), or
 * FSDP_EV_IOVA_PERM (the entry lacks perm). */
int iotlb_lookup(const struct fsdp_iotlb *t, uint64_t iova, uint32_t perm, uint64_t *uaddr,
                 uint64_t *avail);
/* As iotlb_lookup; with want > 0, *avail also covers the following entries
 * that continue both the IOVA and the user address with perm, up to want. */
int iotlb_lookup_run(const struct fsdp_iotlb *t, uint64_t iova, uint32_t perm, uint64_t want,
                     uint64_t *uaddr, uint64_t *avail);
/* Queue q missed at iova: FSDP_EV_IOTLB_MISS (ask QEMU: emit the event),
 * 0 (asked already: wait), FSDP_EV_IOVA_UNMAPPED (QEMU answered "no
 * translation" for the page, or "yes" IOTLB_MAX_REASKS times in a row
 * without the page staying: refuse). */
int iotlb_missed(struct fsdp_iotlb *t, uint32_t q, uint64_t iova);
/* QEMU answered queue q's miss at iova (ok: with a translation, now
 * installed).  An answer to an older miss of the queue (another address,
 * even on the same page) changes nothing: the update it brought may already
 * have let the queue go on and miss elsewhere, and that newer miss has not
 * been answered yet. */
void iotlb_answered(struct fsdp_iotlb *t, uint32_t q, uint64_t iova, bool ok);
/* Queue q got past its miss (or was reset): forget it. */
void iotlb_settled(struct fsdp_iotlb *t, uint32_t q);

#endif
