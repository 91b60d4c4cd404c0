/*
 * loop.h: the data plane thread (loop.c): the command channel, the device
 * table, the stops that wait for a queue to drain.  struct fsdp_dp is
 * private to loop.c.
 */
#ifndef FSDP_LOOP_H
#define FSDP_LOOP_H

#include "shadow.h"

struct fsdp_cmd;
typedef int (*fsdp_cmd_fn)(struct fsdp_dp *dp, struct fsdp_cmd *c);
/* The loop's part of a command: what to run, and how it ended.  The caller
 * embeds it in its own record with the command's arguments (device.c's
 * struct dev_cmd). */
struct fsdp_cmd {
    fsdp_cmd_fn fn;
    int rc;
    bool done;
    bool deferrable;        /* running on the loop: fn may leave it pending */
    bool deferred;          /* fn left it pending; completed later by the loop */
    struct fsdp_cmd *next;
};
int dp_exec(struct fsdp_dp *dp, struct fsdp_cmd *c);
/* Wait at most timeout_ms (< 0: forever); on timeout run cancel (which
 * lets go of c) on the loop and wait for both. */
int dp_exec_timed(struct fsdp_dp *dp, struct fsdp_cmd *c, int64_t timeout_ms,
                  struct fsdp_cmd *cancel);
/* Only inline: -EBUSY while the loop runs (synchronous engine entry). */
int dp_exec_inline(struct fsdp_dp *dp, struct fsdp_cmd *c);
void dp_cmd_complete(struct fsdp_dp *dp, struct fsdp_cmd *c, int rc);
const struct fsdp_dp_config *dp_config(struct fsdp_dp *dp);
struct fsdp_evring *dp_events(struct fsdp_dp *dp);
/* The loop's device table (on the loop).  dp_detach fails a stop still
 * waiting on one of the device's queues with -ENODEV. */
int dp_attach(struct fsdp_dp *dp, struct fsdp_devctx *d);
void dp_detach(struct fsdp_dp *dp, struct fsdp_devctx *d);
/* Loop stopped: detach a device still in the table and return it (NULL:
 * none left), then free the dp itself (fsdp_dp_free, device.c). */
struct fsdp_devctx *dp_take_dev(struct fsdp_dp *dp);
void dp_destroy(struct fsdp_dp *dp);
/* The guest kick fd of q was replaced (on loop): cancel the poll armed on the old one. */
void dp_kick_fd_changed(struct fsdp_dp *dp, struct fsdp_queue *q);
/* The backend call fd of q was replaced (on loop): the same for it. */
void dp_call_fd_changed(struct fsdp_dp *dp, struct fsdp_queue *q);
/* Stops that wait for a queue to drain (on loop).  dp_stop_wait parks c
 * (deferred) until nothing the backend took is left in flight; the loop then
 * finishes the stop (queue_stop_finish fills res) and completes c with 0.
 * dp_stop_end finishes it early with rc (only: that command, or any). */
bool dp_stop_waiting(struct fsdp_dp *dp, const struct fsdp_queue *q);
int dp_stop_wait(struct fsdp_dp *dp, struct fsdp_queue *q, struct fsdp_cmd *c,
                 struct fsdp_stop_result *res);
bool dp_stop_end(struct fsdp_dp *dp, struct fsdp_queue *q, const struct fsdp_cmd *only, int rc);

#endif
