/*
 * log.h: the dirty log for live migration (log.c): QEMU's bitmap, mapped,
 * and the pages the data plane writes marked in it.
 */
#ifndef FSDP_LOG_H
#define FSDP_LOG_H

#include "events.h"
#include "mem.h"

struct fsdp_log {
    /* Mapped like a guest region (mem.c): map.host is the bitmap (bit p % 8
     * of byte p / 8: guest page p written), map.size its bytes. */
    struct fsdp_region map;
    bool overflow_reported; /* FSDP_EV_LOG_OUT_OF_RANGE said once per log */
    bool on;                /* VHOST_F_LOG_ALL negotiated: writes are logged */
};

int log_map(int fd, uint64_t size, uint64_t offset, struct fsdp_log *out);
void log_unmap(struct fsdp_log *l);
/* Mark the guest pages of [gpa, gpa + len) if logging is on; returns pages
 * marked.  A page past the log is reported once per log on ev as device
 * dev, queue q. */
uint64_t log_write(struct fsdp_log *l, struct fsdp_evring *ev, uint32_t dev, uint32_t q,
                   uint64_t gpa, uint64_t len);

#endif
