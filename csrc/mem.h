/*
 * mem.h: the guest memory table of one device (mem.c): regions mapped by the
 * data plane, gpa -> host pieces (split across regions), uaddr -> host for
 * rings.
 */
#ifndef FSDP_MEM_H
#define FSDP_MEM_H

#include "base.h"
#include "copy.h"

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
 * three compares instead of a call, a loop and a second lookup per piece. */
static inline uint8_t *mem_last_hit(const struct fsdp_mem *m, uint64_t gpa, uint64_t len)
{
    const struct fsdp_region *r;
    uint64_t off;

    if (m->last >= m->n)
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

#endif
