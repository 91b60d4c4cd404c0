/*
 * mem.h: the guest memory table of one device (mem.c): regions mapped by the
 * data plane, gpa -> host pieces (split across regions), uaddr -> host for
 * rings.
 */
#ifndef FSDP_MEM_H
#define FSDP_MEM_H

#include "base.h"

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
/* 0 if [gpa, gpa+len) is entirely mapped (possibly across adjacent regions),
 * else FSDP_EV_ADDR_OVERFLOW or FSDP_EV_ADDR_UNMAPPED. */
int mem_check_range(struct fsdp_mem *m, uint64_t gpa, uint64_t len);
/* Copies; return 0 or the event code (range not mapped). */
int mem_copy_from_guest(struct fsdp_mem *m, void *dst, uint64_t gpa, uint64_t len, bool stream);
/* stream: write guest RAM with streaming stores (copy.c). */
int mem_copy_to_guest(struct fsdp_mem *m, uint64_t gpa, const void *src, uint64_t len,
                      bool stream);
/* Host pointer of [uaddr, uaddr+len) if it lies within one region. */
uint8_t *mem_uaddr_to_host(struct fsdp_mem *m, uint64_t uaddr, uint64_t len);

#endif
