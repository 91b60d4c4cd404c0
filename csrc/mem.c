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

/*
 * Calls fn on each contiguous host piece of [gpa, gpa+len).  Stops at the
 * first hole.  Returns 0, FSDP_EV_ADDR_OVERFLOW or FSDP_EV_ADDR_UNMAPPED.
 */
#define FOR_EACH_PIECE(m, gpa, len, host, take, body)                         \
    do {                                                                      \
        uint64_t _g = (gpa), _l = (len);                                      \
        if (_l > UINT64_MAX - _g)                                             \
            return FSDP_EV_ADDR_OVERFLOW;                                     \
        while (_l) {                                                          \
            struct fsdp_region *_r = find_gpa((m), _g);                       \
            if (!_r)                                                          \
                return FSDP_EV_ADDR_UNMAPPED;                                 \
            uint64_t take = _r->gpa + _r->size - _g;                          \
            if (take > _l)                                                    \
                take = _l;                                                    \
            uint8_t *host = _r->host + (_g - _r->gpa);                        \
            body;                                                             \
            _g += take;                                                       \
            _l -= take;                                                       \
        }                                                                     \
    } while (0)

int mem_check_range_split(struct fsdp_mem *m, uint64_t gpa, uint64_t len)
{
    FOR_EACH_PIECE(m, gpa, len, host, take, (void)host);
    return 0;
}

int mem_copy_from_guest_split(struct fsdp_mem *m, void *dst, uint64_t gpa, uint64_t len,
                              bool stream)
{
    uint8_t *d = dst;
    FOR_EACH_PIECE(m, gpa, len, host, take, {
        copy_bytes(d, host, take, stream);
        d += take;
    });
    return 0;
}

int mem_copy_to_guest_split(struct fsdp_mem *m, uint64_t gpa, const void *src, uint64_t len,
                            bool stream)
{
    const uint8_t *s = src;
    FOR_EACH_PIECE(m, gpa, len, host, take, {
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
