/*
 * chain.c: walk and validate one guest descriptor chain.
 *
 * Owns: chain_walk.
 * Calls: mem (range checks, the copy of an indirect table), iotlb (where a
 * miss was), vring.
 *
 * Every descriptor is read exactly once from guest memory into a private
 * local (an indirect table is copied whole into private memory first), and
 * only the private copy is used afterwards.  The whole chain is validated
 * before anything is written anywhere: the caller gets either a complete list
 * of segments or one refusal code with its two arguments.  Two kinds of
 * refusal: a chain whose structure is broken (loop, next out of range, bad
 * indirect) ends the walk at once (out->complete false); a sound structure
 * with a bad part (a buffer outside guest memory, a 0-length descriptor,
 * readable after writable, too large) is walked to its end first, so that
 * the caller still knows every segment and can complete the request with
 * the device's error in the buffers that are fine (fail.c).  The first such
 * reason is the one reported.
 *
 * Rules (DESIGN.md section 3, as in rust-vmm virtio-queue):
 *   - at most `num` steps in the main table and at most table-size steps in an
 *     indirect table (a loop ends as CHAIN_TOO_LONG), and at most `num` data
 *     segments in total (the shadow ring holds `num` descriptors);
 *   - next < size of the table being walked;
 *   - indirect: length a non-zero multiple of 16, at most 16 * num, no NEXT
 *     flag on the indirect descriptor, no indirect inside an indirect table;
 *     the WRITE flag of an indirect descriptor is ignored (virtio 2.7.5.3.2);
 *   - every buffer lies inside mapped guest memory, without wrapping (a
 *     buffer crossing two adjacent regions is fine: the copier splits it);
 *     with the device IOTLB on, its IOVA range is translated with the
 *     access it gets (read or write); a range QEMU has not translated yet
 *     ends the walk with FSDP_EV_IOTLB_MISS (the caller asks and waits);
 *   - no buffer of length 0: QEMU's virtqueue_map_desc and libvhost-user's
 *     vu_queue_map_desc treat a zero-sized buffer as fatal (the whole device
 *     stops; qemu-storage-daemon panics), so it never reaches a backend;
 *   - all device-readable segments before all device-writable ones;
 *   - total length <= max_bytes.
 */
#include <string.h>

#include "chain.h"
#include "iotlb.h"
#include "mem.h"
#include "vring.h"

/* A broken structure: the walk ends here, incomplete. */
static int refuse(struct fsdp_chain *out, uint32_t code, uint64_t a, uint64_t b)
{
    out->err = code;   /* out->steps stays what was spent */
    out->err_a = a;
    out->err_b = b;
    out->complete = false;
    return (int)code;
}

/* A bad part of a sound structure: remembered (the first one), the walk goes on. */
static void note(struct fsdp_chain *out, uint32_t code, uint64_t a, uint64_t b)
{
    if (out->err)
        return;
    out->err = code;
    out->err_a = a;
    out->err_b = b;
}

static struct vring_desc read_private_desc(const uint8_t *p)
{
    struct vring_desc d;
    memcpy(&d, p, sizeof(d));
    d.addr = le64toh(d.addr);
    d.len = le32toh(d.len);
    d.flags = le16toh(d.flags);
    d.next = le16toh(d.next);
    return d;
}

int chain_walk(struct fsdp_mem *m, const uint8_t *table, uint32_t num, uint16_t head,
               uint64_t max_bytes, struct fsdp_seg *segs, uint8_t *ind,
               struct fsdp_chain *out)
{
    const uint8_t *t = table;       /* table being walked: shared or private */
    uint32_t tsize = num;
    uint32_t idx = head;            /* caller checked head < num */
    uint32_t steps = 0;             /* descriptors read in this table */
    bool indirect = false, seen_write = false;
    uint32_t n = 0;
    uint64_t readable = 0, writable = 0;
    int rc;

    memset(out, 0, sizeof(*out));
    for (;;) {
        struct vring_desc d;

        out->steps++;
        if (++steps > tsize)
            return refuse(out, FSDP_EV_CHAIN_TOO_LONG, tsize, 0);
        if (indirect)
            d = read_private_desc(t + 16u * idx);
        else
            d = vr_read_desc(t + 16u * idx);   /* the one read of this descriptor */

        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (indirect)
                return refuse(out, FSDP_EV_INDIRECT_NESTED, idx, 0);
            if (d.flags & VRING_DESC_F_NEXT)
                return refuse(out, FSDP_EV_INDIRECT_WITH_NEXT, idx, 0);
            if (d.len == 0 || d.len % 16u || d.len > 16u * num)
                return refuse(out, FSDP_EV_INDIRECT_BAD_LEN, d.len, 16ull * num);
            /* Read the table once, into private memory (split if needed). */
            rc = mem_copy_from_guest(m, ind, d.addr, d.len, false);
            if (rc == FSDP_EV_IOTLB_MISS && !m->iotlb->refuse_misses)
                return refuse(out, (uint32_t)rc, m->iotlb->miss_at, m->iotlb->miss_perm);
            if (rc)
                return refuse(out, rc == FSDP_EV_IOTLB_MISS ? FSDP_EV_IOVA_UNMAPPED : (uint32_t)rc,
                              d.addr, d.len);
            out->steps += d.len / 16u;
            out->ind_addr = d.addr;
            out->ind_len = d.len;
            t = ind;
            tsize = d.len / 16u;
            idx = 0;
            steps = 0;
            indirect = true;
            continue;
        }

        if (n >= num)
            return refuse(out, FSDP_EV_CHAIN_TOO_LONG, num, 0);
        segs[n].gpa = d.addr;
        segs[n].len = d.len;
        segs[n].flags = d.flags & VRING_DESC_F_WRITE;
        segs[n].bad = false;
        if (d.len == 0) {
            note(out, FSDP_EV_ZERO_LENGTH, n, 0);
        } else {
            rc = mem_check_access(m, d.addr, d.len, d.flags & VRING_DESC_F_WRITE);
            if (rc == FSDP_EV_IOTLB_MISS) {
                /* Not a refusal: the caller asks QEMU and waits; once QEMU
                 * has answered without a translation, a bad buffer. */
                if (!m->iotlb->refuse_misses)
                    return refuse(out, (uint32_t)rc, m->iotlb->miss_at, m->iotlb->miss_perm);
                rc = FSDP_EV_IOVA_UNMAPPED;
            }
            if (rc) {
                segs[n].bad = true;
                note(out, (uint32_t)rc, d.addr, d.len);
            }
        }
        if (d.flags & VRING_DESC_F_WRITE) {
            seen_write = true;
            writable += d.len;
        } else {
            if (seen_write)
                note(out, FSDP_EV_WRITABLE_BEFORE_READABLE, n, 0);
            readable += d.len;
        }
        /* No overflow: at most 32768 segments of at most 2^32-1 bytes. */
        if (readable + writable > max_bytes)
            note(out, FSDP_EV_REQUEST_TOO_LARGE, readable + writable, max_bytes);
        n++;

        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        if (d.next >= tsize)
            return refuse(out, FSDP_EV_DESC_NEXT_OUT_OF_RANGE, d.next, tsize);
        idx = d.next;
    }
    out->n = n;
    out->readable = readable;
    out->writable = writable;
    out->complete = true;
    return (int)out->err;
}
