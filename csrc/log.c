/*
 * log.c: dirty-page logging for live migration (VHOST_F_LOG_ALL).
 *
 * Owns: the dirty log (struct fsdp_log): mapping it, marking pages.
 * Calls: mem (the log is mapped like a guest region), events.
 *
 * In isolated mode fastshadow is the only writer of guest memory on the data
 * path (the backend writes the shadow region, never guest RAM), so it is
 * fastshadow, not the backend, that marks the pages it writes in the log
 * QEMU shares with SET_LOG_BASE.  QEMU turns logging on with SET_FEATURES
 * (VHOST_F_LOG_ALL) and, per ring, SET_VRING_ADDR (VHOST_VRING_F_LOG with
 * the guest-physical address of the used ring).
 *
 * The log is a bitmap, one bit per 4 KiB guest page: page p is bit p % 8 of
 * byte p / 8 (vhost-user.rst, "Migration").  QEMU clears bits with an
 * atomic exchange while we set them, so setting is an atomic OR.  A bit is
 * set after the bytes of its page were written (release: the copy is visible
 * no later than the bit), so a page QEMU collects after clearing its bit
 * holds our data or its bit is set again.
 *
 * What is logged: the device-written bytes copied back into guest buffers,
 * and, on rings with VHOST_VRING_F_LOG, every write to the used ring (the
 * elements, the idx, avail_event).  QEMU's final sync runs after
 * GET_VRING_BASE, which returns only once every request the backend took was
 * completed (and so logged) here.
 */
#include "log.h"
#include "events.h"
#include "mem.h"

#define LOG_PAGE 4096u

/* The log is file memory at an offset, like a guest RAM region: mapped (and
 * its bounds checked) the same way. */
int log_map(int fd, uint64_t size, uint64_t offset, struct fsdp_log *out)
{
    struct fsdp_mem_region in = {.size = size, .mmap_offset = offset, .fd = fd};

    out->overflow_reported = false;
    return mem_map_region(&in, &out->map);
}

void log_unmap(struct fsdp_log *l)
{
    mem_unmap_region(&l->map);
    l->overflow_reported = false;
}

/* Mark the pages of [gpa, gpa + len).  Returns the pages marked. */
uint64_t log_write(struct fsdp_log *l, struct fsdp_evring *ev, uint32_t dev, uint32_t q,
                   uint64_t gpa, uint64_t len)
{
    uint8_t *bits = l->map.host;
    uint64_t first, last, n = 0;

    if (!l->on || !bits || !len)
        return 0;
    if (len - 1 > UINT64_MAX - gpa)
        last = UINT64_MAX / LOG_PAGE;
    else
        last = (gpa + len - 1) / LOG_PAGE;
    first = gpa / LOG_PAGE;
    for (uint64_t page = first; page <= last; page++) {
        if (page / 8 >= l->map.size) {
            /* QEMU sizes the log to cover guest memory: a page past it is a
             * log too small for the memory table.  Said once per log. */
            if (!l->overflow_reported) {
                l->overflow_reported = true;
                ev_emit(ev, dev, q, FSDP_EV_LOG_OUT_OF_RANGE, 0, page * LOG_PAGE, l->map.size);
            }
            break;
        }
        __atomic_fetch_or(&bits[page / 8], (uint8_t)(1u << (page % 8)), __ATOMIC_RELEASE);
        n++;
    }
    return n;
}
