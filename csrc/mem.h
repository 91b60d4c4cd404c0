/*
 * mem.h: the guest memory table of one device (mem.c): regions mapped by the
 * data plane, gpa -> host pieces (split across regions), uaddr -> host for
 * rings.
 */
#ifndef FSDP_MEM_H
#define FSDP_MEM_H

#include "base.h"
#include "copy.h"
#include "iotlb.h"

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
    /* The device's IOTLB (owned by device.c, kept across table swaps).  While
     * it is on, every address given to the functions below except uaddrs is
     * an IOVA, translated through it (with the access's permission) first. */
    struct fsdp_iotlb *iotlb;
};

int mem_map_region(const struct fsdp_mem_region *in, struct fsdp_region *out);
void mem_unmap_region(struct fsdp_region *r);
/* True if the front-end shrank the region's file under us and it now reads
 * as zeros (guard.c). */
bool mem_region_lost(const struct fsdp_region *r);
int mem_validate_table(const struct fsdp_region *r, uint32_t n);
void mem_sort(struct fsdp_region *r, uint32_t n);
/* The slow paths of the three below: any range, split across regions. */
int mem_check_range_split(struct fsdp_mem *m, uint64_t gpa, uint64_t len);
int mem_copy_from_guest_split(struct fsdp_mem *m, void *dst, uint64_t gpa, uint64_t len,
                              bool stream);
int mem_copy_to_guest_split(struct fsdp_mem *m, uint64_t gpa, const void *src, uint64_t len,
                            bool stream);

/* Host pointer of [gpa, gpa+len) if it lies whole in the region hit last,
 * else NULL (the caller takes the slow path).  Inline: nearly every buffer
 * of a request lies in the same region as the one before it, and this is
 * three compares instead of a call, a loop and a second lookup per piece.
 * Never with the IOTLB on: the address is an IOVA then, translated (with
 * its permission) only by the slow path. */
static inline uint8_t *mem_last_hit(const struct fsdp_mem *m, uint64_t gpa, uint64_t len)
{
    const struct fsdp_region *r;
    uint64_t off;

    if ((m->iotlb && m->iotlb->on) || m->last >= m->n)
        return NULL;
    r = &m->r[m->last];
    off = gpa - r->gpa;     /* unsigned: huge when gpa < r->gpa */
    if (off >= r->size || len > r->size - off)
        return NULL;
    return r->host + off;
}

/* 0 if [gpa, gpa+len) is entirely mapped (possibly across adjacent regions),
 * else FSDP_EV_ADDR_OVERFLOW or FSDP_EV_ADDR_UNMAPPED. */
static inline int mem_check_range(struct fsdp_mem *m, uint64_t gpa, uint64_t len)
{
    return mem_last_hit(m, gpa, len) ? 0 : mem_check_range_split(m, gpa, len);
}

/* Copies; return 0 or the event code (range not mapped). */
static inline int mem_copy_from_guest(struct fsdp_mem *m, void *dst, uint64_t gpa, uint64_t len,
                                      bool stream)
{
    uint8_t *host = mem_last_hit(m, gpa, len);

    if (!host)
        return mem_copy_from_guest_split(m, dst, gpa, len, stream);
    copy_bytes(dst, host, len, stream);
    return 0;
}

/* stream: write guest RAM with streaming stores (copy.c). */
static inline int mem_copy_to_guest(struct fsdp_mem *m, uint64_t gpa, const void *src,
                                    uint64_t len, bool stream)
{
    uint8_t *host = mem_last_hit(m, gpa, len);

    if (!host)
        return mem_copy_to_guest_split(m, gpa, src, len, stream);
    copy_bytes(host, src, len, stream);
    return 0;
}

/* Host pointer of [uaddr, uaddr+len) if it lies within one region. */
uint8_t *mem_uaddr_to_host(struct fsdp_mem *m, uint64_t uaddr, uint64_t len);
/* As mem_check_range, for an access that writes (else reads) the range: with
 * the IOTLB on also FSDP_EV_IOTLB_MISS (iotlb->miss_iova/perm say where) and
 * FSDP_EV_IOVA_PERM. */
int mem_check_access_split(struct fsdp_mem *m, uint64_t addr, uint64_t len, bool write);
static inline int mem_check_access(struct fsdp_mem *m, uint64_t addr, uint64_t len, bool write)
{
    /* The last region's fast path (IOTLB off only, see mem_last_hit). */
    return mem_last_hit(m, addr, len) ? 0 : mem_check_access_split(m, addr, len, write);
}
/* Host pointer of a guest ring [addr, addr+len): addr is QEMU's user address,
 * or an IOVA with the IOTLB on (then the range must translate to one
 * contiguous run of user addresses, with perm).  NULL if not; a missing
 * translation leaves FSDP_EV_IOTLB_MISS in *why (else 0). */
uint8_t *mem_ring_to_host(struct fsdp_mem *m, uint64_t addr, uint64_t len, uint32_t perm, int *why);
/* Calls fn(arg, gpa, n) for each guest-physical piece of the written range
 * [addr, addr+len) (dirty logging: an IOVA range is not a gpa range).
 * Pieces that do not translate are skipped. */
void mem_for_each_gpa(struct fsdp_mem *m, uint64_t addr, uint64_t len,
                      void (*fn)(void *arg, uint64_t gpa, uint64_t n), void *arg);

#endif
