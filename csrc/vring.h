/*
 * vring.h: the split virtqueue as it lies in shared memory (virtio 1.x,
 * little endian): layout, and the one-access accessors (vr_*) through which
 * guest rings and the shadow region are read and written.
 */
#ifndef FSDP_VRING_H
#define FSDP_VRING_H

#include <endian.h>

#include "base.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* avail: flags u16, idx u16, ring[num] u16, used_event u16 */
static inline size_t vring_desc_size(uint32_t num) { return 16u * (size_t)num; }
static inline size_t vring_avail_size(uint32_t num) { return 6u + 2u * (size_t)num; }
static inline size_t vring_used_size(uint32_t num) { return 6u + 8u * (size_t)num; }

/* Offsets inside the avail and used rings. */
#define AVAIL_FLAGS 0
#define AVAIL_IDX 2
#define AVAIL_RING(i) (4 + 2 * (size_t)(i))
#define AVAIL_USED_EVENT(num) AVAIL_RING(num)
#define USED_FLAGS 0
#define USED_IDX 2
#define USED_RING(i) (4 + 8 * (size_t)(i))
#define USED_AVAIL_EVENT(num) USED_RING(num)

/* Linux's vring_need_event: true if event_idx lies in (old, new]. */
static inline bool vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

/*
 * Accessors for shared memory.  Each is one single-copy-atomic access of a
 * naturally aligned field (ring and descriptor-table alignment is checked at
 * SET_VRING_ADDR time), so the compiler can neither tear nor repeat it: a
 * value read once is the value used.  Ordering is requested explicitly where
 * the protocol needs it (acquire on the producer's idx, release on ours).
 */
static inline uint16_t vr_load16(const void *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED));
}
static inline uint16_t vr_load16_acquire(const void *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE));
}
static inline uint32_t vr_load32(const void *p)
{
    return le32toh(__atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED));
}
static inline uint64_t vr_load64(const void *p)
{
    return le64toh(__atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED));
}
static inline void vr_store16(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELAXED);
}
static inline void vr_store16_release(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELEASE);
}
static inline void vr_store32(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, htole32(v), __ATOMIC_RELAXED);
}
static inline void vr_store64(void *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, htole64(v), __ATOMIC_RELAXED);
}
/* Full fence: orders an earlier store before a later load (the one ordering
 * acquire/release cannot give).  Used around notification decisions. */
static inline void vr_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* One descriptor read from shared memory field by field into private memory. */
static inline struct vring_desc vr_read_desc(const uint8_t *p)
{
    struct vring_desc d;
    d.addr = vr_load64(p);
    d.len = vr_load32(p + 8);
    d.flags = vr_load16(p + 12);
    d.next = vr_load16(p + 14);
    return d;
}

#endif
