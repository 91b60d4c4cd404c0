/*
 * queue.h: the lifecycle of one shadowed queue (queue.c): creation,
 * configuration, start / pause / stop, reset, abort.  Each runs in a command
 * (on the loop, or inline), except queue_init/open/destroy, which run on the
 * caller's thread while the device is not in the loop's table.
 */
#ifndef FSDP_QUEUE_H
#define FSDP_QUEUE_H

#include "shadow.h"

/* Queue idx of dev: identity only, no fds yet (queue_destroy works after it
 * whatever fails later). */
void queue_init(struct fsdp_queue *q, struct fsdp_devctx *dev, uint32_t idx);
/* Its backend eventfds and its bounce area (the tail of its shadow slot). */
int queue_open(struct fsdp_queue *q);
/* A new backend kick or call eventfd (the fd, or -errno); also what
 * fsdp_dev_renew_backend_side puts in place of the old ones. */
int queue_backend_eventfd(void);
void queue_destroy(struct fsdp_queue *q);

/* SET_VRING_NUM: private arrays for num entries, shadow rings placed in the slot. */
int queue_set_num(struct fsdp_queue *q, uint32_t num);
/* SET_VRING_BASE: the guest's next avail index. */
int queue_set_base(struct fsdp_queue *q, uint32_t avail_idx);
/* SET_VRING_ADDR (QEMU user addresses); a failed one keeps the previous rings. */
int queue_set_addr(struct fsdp_queue *q, uint64_t desc, uint64_t avail, uint64_t used);
/* (Re)translate the guest rings through the current memory table; emit:
 * report a started queue whose rings left guest memory. */
int queue_translate_rings(struct fsdp_queue *q, bool emit);

/* Start (idempotent): fresh shadow rings, requests kept from an earlier run
 * re-published, one pass. */
int queue_start(struct fsdp_queue *q, uint32_t flags);
/* No more intake (completions still flow); false if not started. */
bool queue_pause(struct fsdp_queue *q);
/* Stop a started queue (GET_VRING_BASE): no more intake, harvest, and settle
 * what the backend never took (backend_next_avail < 0: unknown). */
void queue_stop(struct fsdp_queue *q, int64_t backend_next_avail, struct fsdp_stop_result *res);
/* A stop is waiting for requests the backend took. */
static inline bool queue_draining(const struct fsdp_queue *q) { return q->inflight > q->parked; }
/* The answer to GET_VRING_BASE as it stands: avail_idx and inflight. */
void queue_stop_result(const struct fsdp_queue *q, struct fsdp_stop_result *res);
/* Finish a stop: the queue leaves the started state; requests still in
 * flight stay ours.  Fills res (if given) with queue_stop_result. */
void queue_stop_finish(struct fsdp_queue *q, struct fsdp_stop_result *res);

/* Drop everything without touching the guest (device reset). */
void queue_reset(struct fsdp_queue *q);
/* Fail every request in flight toward the guest (stopped queue); returns
 * the count or -errno. */
int queue_abort(struct fsdp_queue *q);
/* Drop every request a stopped queue keeps, guest memory untouched (the
 * guest re-initialised the ring); returns the count or -errno. */
int queue_discard(struct fsdp_queue *q);
/* VIRTIO_RING_F_EVENT_IDX changed (FSDP_QF_*), the queue possibly running:
 * a pass under the new mode, then one kick and one call (need_* flags). */
int queue_set_event_idx(struct fsdp_queue *q, uint32_t flags);
/* Zero the shadow rings of a stopped queue. */
int queue_clear_shadow(struct fsdp_queue *q);

#endif
