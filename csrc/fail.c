/*
 * fail.c: the device's error for a request fastshadow refuses or fails.
 *
 * Owns: fail_plan.
 * Calls: mem (range checks, the read of a fuse_in_header), chain (segments),
 * vring (descriptor flags).
 *
 * DESIGN.md section 3.7: no completion lies to the guest.  A request that is
 * refused (bad chain) or failed (lying backend, abort, poison) completes
 * with the device's own error where the device defines one, not with a
 * len-0 completion the driver could take for success (virtio-blk would read
 * whatever its status byte held).  Where the error goes, per device
 * (VIRTIO 1.2):
 *   - blk (5.2.6): the status byte is the last byte of the device-writable
 *     part: VIRTIO_BLK_S_IOERR, used.len 1;
 *   - scsi (5.6.6.1): the device-writable part starts with
 *     virtio_scsi_cmd_resp {le32 sense_len, le32 resid, le16
 *     status_qualifier, u8 status, u8 response}: all 0 but response =
 *     VIRTIO_SCSI_S_FAILURE, used.len 12 (a zero sense_len and resid so the
 *     driver reads no stale sense data nor a residual count);
 *   - fs (5.11.6): the device-readable part starts with fuse_in_header {le32
 *     len, le32 opcode, le64 unique, ...}, the device-writable part with
 *     fuse_out_header {le32 len, le32 error, le64 unique}: {16, -EIO,
 *     unique}, used.len 16.
 * The "parts" are the byte streams of the readable and of the writable
 * segments in chain order (0-length segments hold no byte).  Only segments
 * the walker found sound are touched, and only after the pieces are checked
 * against the memory table as it is now (it may have changed since a request
 * in flight was taken): nothing is written unless all of it can be.
 */
#include <endian.h>
#include <string.h>

#include "fail.h"
#include "chain.h"
#include "mem.h"
#include "vring.h"

#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_SCSI_S_FAILURE 9
#define SCSI_RESP_BYTES 12u
#define FUSE_HEADER_BYTES 16u   /* fuse_out_header; the first 16 of fuse_in_header */
#define FUSE_EIO (-5)

/* Total bytes of the readable or writable stream. */
static uint64_t stream_len(const struct fsdp_seg *segs, uint32_t n, bool writable)
{
    uint64_t t = 0;

    for (uint32_t i = 0; i < n; i++)
        if (!!(segs[i].flags & VRING_DESC_F_WRITE) == writable)
            t += segs[i].len;
    return t;
}

/*
 * Map bytes [off, off + len) of the readable or writable stream to pieces
 * appended to p (bytes taken from p->bytes[boff...]).  False if the stream is
 * shorter, or a piece falls in a bad segment or outside guest memory now.
 */
static bool locate(struct fsdp_mem *m, const struct fsdp_seg *segs, uint32_t n, bool writable,
                   uint64_t off, uint32_t len, uint32_t boff, struct fail_plan *p)
{
    uint64_t pos = 0;   /* stream offset of segs[i] */

    for (uint32_t i = 0; i < n && len; i++) {
        const struct fsdp_seg *s = &segs[i];
        uint64_t in, take;

        if (!!(s->flags & VRING_DESC_F_WRITE) != writable)
            continue;
        if (off >= pos + s->len) {
            pos += s->len;
            continue;
        }
        in = off - pos;
        take = s->len - in < len ? s->len - in : len;
        if (s->bad || p->n >= FAIL_MAX_BYTES || mem_check_range(m, s->gpa + in, take))
            return false;
        p->piece[p->n++] = (struct fail_piece){.gpa = s->gpa + in, .off = boff,
                                               .len = (uint32_t)take};
        boff += (uint32_t)take;
        off += take;
        len -= (uint32_t)take;
        pos += s->len;
    }
    return len == 0;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, 4);
}

static void put_le64(uint8_t *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, 8);
}

/* virtio-fs: the request's unique, read once from its fuse_in_header into
 * private memory (the guest may rewrite it; only this copy is used). */
static bool fuse_unique(struct fsdp_mem *m, const struct fsdp_seg *segs, uint32_t n,
                        uint64_t *unique)
{
    struct fail_plan in = {0};
    uint8_t hdr[FUSE_HEADER_BYTES];

    if (!locate(m, segs, n, false, 0, FUSE_HEADER_BYTES, 0, &in))
        return false;
    for (uint32_t i = 0; i < in.n; i++)
        if (mem_copy_from_guest(m, hdr + in.piece[i].off, in.piece[i].gpa, in.piece[i].len,
                                false))
            return false;
    memcpy(unique, hdr + 8, 8);
    *unique = le64toh(*unique);
    return true;
}

uint32_t fail_plan(struct fsdp_mem *m, uint32_t kind, const struct fsdp_seg *segs, uint32_t n,
                   struct fail_plan *out)
{
    uint64_t wlen = stream_len(segs, n, true), unique;
    uint32_t len;
    bool ok = false;

    memset(out, 0, sizeof(*out));
    switch (kind) {
    case FSDP_FAIL_BLK_STATUS:
        len = 1;
        out->bytes[0] = VIRTIO_BLK_S_IOERR;
        ok = wlen >= 1 && locate(m, segs, n, true, wlen - 1, 1, 0, out);
        break;
    case FSDP_FAIL_SCSI_RESPONSE:
        len = SCSI_RESP_BYTES;
        out->bytes[11] = VIRTIO_SCSI_S_FAILURE;     /* response; the rest stays 0 */
        ok = locate(m, segs, n, true, 0, len, 0, out);
        break;
    case FSDP_FAIL_FUSE_ERROR:
        len = FUSE_HEADER_BYTES;
        ok = fuse_unique(m, segs, n, &unique) && locate(m, segs, n, true, 0, len, 0, out);
        if (ok) {
            put_le32(out->bytes, FUSE_HEADER_BYTES);
            put_le32(out->bytes + 4, (uint32_t)FUSE_EIO);
            put_le64(out->bytes + 8, unique);
        }
        break;
    default:                /* FSDP_FAIL_LEN0 */
        len = 0;
        break;
    }
    if (!ok) {
        memset(out, 0, sizeof(*out));
        return 0;
    }
    out->used_len = len;
    return len;
}
