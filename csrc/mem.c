/*
 * mem.c: the guest memory table of one device.
 *
 * Owns: the mapping of guest regions, the memory table (struct fsdp_mem),
 * gpa and uaddr translation, copies to and from guest memory.
 * Calls: guard, copy, base.
 *
 * The data plane maps every guest RAM region itself (MAP_SHARED, read/write)
 * and keeps the pointer; the caller's fd is not kept.  Guest-physical ranges
 * are translated into contiguous host pieces: a range that crosses two
 * adjacent regions is split (the regions need not be adjacent in host
 * memory), never refused.  Ring addresses arrive as QEMU user addresses and
 * must each lie inside one region.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mem.h"
#include "base.h"
#include "copy.h"
#include "guard.h"

int mem_map_region(const struct fsdp_mem_region *in, struct fsdp_region *out)
{
    struct stat st;
    uint64_t slack, len;
    void *p;

    if (in->fd < 0 || in->size == 0)
        return -EINVAL;
    /* No wrap of any of the three address spaces. */
    if (in->gpa > UINT64_MAX - in->size || in->uaddr > UINT64_MAX - in->size ||
        in->mmap_offset > UINT64_MAX - in->size)
        return -EINVAL;
    if (fstat(in->fd, &st) < 0)
        return -errno;
    /* A mapping past the end of a file would SIGBUS on first touch. */
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < in->mmap_offset + in->size)
        return -EINVAL;
    slack = in->mmap_offset % FSDP_PAGE;
    len = in->size + slack;
    if (len < in->size || len > SIZE_MAX)
        return -EINVAL;
    p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, in->fd,
             (off_t)(in->mmap_offset - slack));
    if (p == MAP_FAILED)
        return -errno;
    /* The front-end may shrink the file later: a SIGBUS then must not kill
     * the proxy (guard.c). */
    int rc = guard_add(p, (size_t)len);
    if (rc < 0) {
        munmap(p, (size_t)len);
        return rc;
    }
    out->gpa = in->gpa;
    out->size = in->size;
    out->uaddr = in->uaddr;
    out->map_base = p;
    out->map_len = (size_t)len;
    out->host = (uint8_t *)p + slack;
    return 0;
}

void mem_unmap_region(struct fsdp_region *r)
{
    if (r->map_base) {
        guard_remove(r->map_base);
        munmap(r->map_base, r->map_len);
    }
    memset(r, 0, sizeof(*r));
}

bool mem_region_lost(const struct fsdp_region *r)
{
    return r->map_base && guard_lost(r->map_base);
}

void mem_sort(struct fsdp_region *r, uint32_t n)
{
    /* insertion sort: n <= 64 */
    for (uint32_t i = 1; i < n; i++) {
        struct fsdp_region t = r[i];
        uint32_t j = i;
        while (j > 0 && r[j - 1].gpa > t.gpa) {
            r[j] = r[j - 1];
            j--;
        }
        r[j] = t;
    }
}

/* Sorted table: guest-physical ranges must not overlap. */
int mem_validate_table(const struct fsdp_region *r, uint32_t n)
{
    if (n > FSDP_MAX_MEM_REGIONS)
        return -E2BIG;
    for (uint32_t i = 1; i < n; i++)
        if (r[i - 1].gpa + r[i - 1].size > r[i].gpa)
            return -EINVAL;
    return 0;
}

static struct fsdp_region *find_gpa(struct fsdp_mem *m, uint64_t gpa)
{
    struct fsdp_region *r;

    if (m->last < m->n) {
        r = &m->r[m->last];
        if (gpa - r->gpa < r->size)
            return r;
    }
    for (uint32_t i = 0; i < m->n; i++) {
        r = &m->r[i];
        if (gpa - r->gpa < r->size) {   /* unsigned: also false when gpa < r->gpa */
            m->last = i;
            return r;
        }
    }
    return NULL;
}

static struct fsdp_region *find_uaddr(struct fsdp_mem *m, uint64_t uaddr)
{
    for (uint32_t i = 0; i < m->n; i++)
        if (uaddr - m->r[i].uaddr < m->r[i].size)
            return &m->r[i];
    return NULL;
}

/*
 * The contiguous host piece at addr (at most len bytes): *host, *take and
 * its guest-physical address *gpa.  addr is guest-physical, or with the
 * IOTLB on an IOVA: IOVA -> QEMU user address (the IOTLB, with perm) -> the
 * region holding it.  0 or an event code.
 */
static inline int piece_at(struct fsdp_mem *m, uint64_t addr, uint64_t len, uint32_t perm,
                           uint8_t **host, uint64_t *take, uint64_t *gpa)
{
    struct fsdp_region *r;
    uint64_t off, avail = UINT64_MAX;

    if (m->iotlb && m->iotlb->on) {
        uint64_t uaddr;
        int rc = iotlb_lookup_run(m->iotlb, addr, perm, len, &uaddr, &avail);
        if (rc) {
            m->iotlb->miss_at = addr;
            m->iotlb->miss_perm = perm;
            return rc;
        }
        r = find_uaddr(m, uaddr);
        if (!r)
            return FSDP_EV_ADDR_UNMAPPED;   /* QEMU's translation is outside the table */
        off = uaddr - r->uaddr;
    } else {
        r = find_gpa(m, addr);
        if (!r)
            return FSDP_EV_ADDR_UNMAPPED;
        off = addr - r->gpa;
    }
    *take = r->size - off;
    if (*take > avail)
        *take = avail;
    if (*take > len)
        *take = len;
    *host = r->host + off;
    *gpa = r->gpa + off;
    return 0;
}

/*
 * Calls body on each contiguous host piece of [gpa, gpa+len), accessed with
 * perm (FSDP_IOTLB_RO / _WO, used with the IOTLB on).  Stops at the first
 * hole.  Returns 0, FSDP_EV_ADDR_OVERFLOW, FSDP_EV_ADDR_UNMAPPED, or with the
 * IOTLB on FSDP_EV_IOTLB_MISS / FSDP_EV_IOVA_PERM.
 */
#define FOR_EACH_PIECE(m, gpa, len, perm, host, take, body)                   \
    do {                                                                      \
        uint64_t _g = (gpa), _l = (len), _pg;                                 \
        if (_l > UINT64_MAX - _g)                                             \
            return FSDP_EV_ADDR_OVERFLOW;                                     \
        while (_l) {                                                          \
            uint8_t *host;                                                    \
            uint64_t take;                                                    \
            int _rc = piece_at((m), _g, _l, (perm), &host, &take, &_pg);      \
            if (_rc)                                                          \
                return _rc;                                                   \
            body;                                                             \
            _g += take;                                                       \
            _l -= take;                                                       \
        }                                                                     \
    } while (0)

int mem_check_range_split(struct fsdp_mem *m, uint64_t gpa, uint64_t len)
{
    return mem_check_access_split(m, gpa, len, false);
}

int mem_check_access_split(struct fsdp_mem *m, uint64_t addr, uint64_t len, bool write)
{
    FOR_EACH_PIECE(m, addr, len, write ? FSDP_IOTLB_WO : FSDP_IOTLB_RO, host, take, (void)host);
    return 0;
}

int mem_copy_from_guest_split(struct fsdp_mem *m, void *dst, uint64_t gpa, uint64_t len,
                              bool stream)
{
    uint8_t *d = dst;
    FOR_EACH_PIECE(m, gpa, len, FSDP_IOTLB_RO, host, take, {
        copy_bytes(d, host, take, stream);
        d += take;
    });
    return 0;
}

int mem_copy_to_guest_split(struct fsdp_mem *m, uint64_t gpa, const void *src, uint64_t len,
                            bool stream)
{
    const uint8_t *s = src;
    FOR_EACH_PIECE(m, gpa, len, FSDP_IOTLB_WO, host, take, {
        copy_bytes(host, s, take, stream);
        s += take;
    });
    return 0;
}

uint8_t *mem_uaddr_to_host(struct fsdp_mem *m, uint64_t uaddr, uint64_t len)
{
    if (len > UINT64_MAX - uaddr)
        return NULL;
    for (uint32_t i = 0; i < m->n; i++) {
        struct fsdp_region *r = &m->r[i];
        if (uaddr - r->uaddr < r->size && len <= r->size - (uaddr - r->uaddr))
            return r->host + (uaddr - r->uaddr);
    }
    return NULL;
}

/* IOVA -> one run of user addresses: every IOTLB entry the range crosses must
 * continue the previous one's user addresses (a ring is one host run). */
static int iova_run(struct fsdp_mem *m, uint64_t iova, uint64_t len, uint32_t perm, uint64_t *uaddr)
{
    uint64_t expect = 0, u, avail;
    bool first = true;

    if (len > UINT64_MAX - iova)
        return FSDP_EV_ADDR_OVERFLOW;
    while (len) {
        int rc = iotlb_lookup(m->iotlb, iova, perm, &u, &avail);
        if (rc) {
            m->iotlb->miss_at = iova;
            m->iotlb->miss_perm = perm;
            return rc;
        }
        if (first)
            *uaddr = u;
        else if (u != expect)
            return FSDP_EV_ADDR_UNMAPPED;
        first = false;
        if (avail > len)
            avail = len;
        expect = u + avail;
        iova += avail;
        len -= avail;
    }
    return 0;
}

uint8_t *mem_ring_to_host(struct fsdp_mem *m, uint64_t addr, uint64_t len, uint32_t perm, int *why)
{
    *why = 0;
    if (m->iotlb && m->iotlb->on) {
        uint64_t uaddr = 0;
        int rc = iova_run(m, addr, len, perm, &uaddr);
        if (rc) {
            *why = rc;
            return NULL;
        }
        addr = uaddr;
    }
    return mem_uaddr_to_host(m, addr, len);
}

void mem_for_each_gpa(struct fsdp_mem *m, uint64_t addr, uint64_t len,
                      void (*fn)(void *arg, uint64_t gpa, uint64_t n), void *arg)
{
    if (len > UINT64_MAX - addr)
        return;
    while (len) {
        uint8_t *host;
        uint64_t take, gpa;
        if (piece_at(m, addr, len, FSDP_IOTLB_WO, &host, &take, &gpa)) {
            /* Not translatable: nothing was written there; go on a page. */
            take = FSDP_PAGE - (addr & (FSDP_PAGE - 1));
            if (take > len)
                take = len;
        } else {
            fn(arg, gpa, take);
        }
        addr += take;
        len -= take;
    }
}
