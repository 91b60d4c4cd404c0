/*
 * events.h: the event ring (events.c): refusals, broken queues, backend
 * violations, for the control plane to drain.  Knows nothing of devices or
 * of the loop: a record names its device and queue by number.
 */
#ifndef FSDP_EVENTS_H
#define FSDP_EVENTS_H

#include <pthread.h>

#include "base.h"

struct fsdp_evring {
    pthread_mutex_t lock;
    struct fsdp_event *ev;
    uint32_t size, head, count;
    uint64_t lost;
    int efd;
};
int evring_init(struct fsdp_evring *r, uint32_t size);
void evring_destroy(struct fsdp_evring *r);
void evring_push(struct fsdp_evring *r, const struct fsdp_event *e);
/* Copies up to max records out; *lost = records dropped since the last call. */
int evring_drain(struct fsdp_evring *r, struct fsdp_event *out, uint32_t max, uint64_t *lost);
/* One record about queue q of device dev. */
void ev_emit(struct fsdp_evring *r, uint32_t dev, uint32_t q, uint32_t code, uint32_t head,
             uint64_t a, uint64_t b);

#endif
