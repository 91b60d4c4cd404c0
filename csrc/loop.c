/*
 * loop.c: the data plane thread, its io_uring, and the command channel.
 *
 * Owns: struct fsdp_dp (the thread, its io_uring, the command channel, the
 * event ring, the device table) and, per queue, what only the loop needs
 * (struct watch: the armed polls, and a stop waiting for the queue to
 * drain); the public fsdp_dp_* functions except fsdp_dp_free (device.c).
 * Calls: queue (finishing a stop), shadow (a pass, busy-poll, notifications),
 * events, probes.  Knows devices only as struct fsdp_devctx, and commands
 * only as struct fsdp_cmd.
 *
 * One thread owns one io_uring (SINGLE_ISSUER | DEFER_TASKRUN when the
 * kernel takes them: completions are then only run when this thread waits,
 * which is exactly when it wants them, with no IPI or extra wakeup).
 *
 * How the loop waits.  Every guest kick eventfd and every backend call
 * eventfd has one multishot IORING_OP_POLL_ADD (POLLIN) armed on it, which
 * posts a completion after every write the peer makes (writes that land
 * before the loop runs its task work share one completion) and stays armed
 * (IORING_CQE_F_MORE; re-armed in the next pass only if the kernel ended
 * it).  The loop never reads these eventfds: their counters only grow,
 * which nobody looks at (a 64-bit counter of notifications cannot fill),
 * and "kicked" is the completion itself.  A queue's stop clears its kick
 * counter once (queue_stop_finish: QEMU tests it when it stops vhost).  A
 * poll armed on a counter that is already non-zero completes at once, so a
 * re-arm never loses a wakeup (it only costs a spurious pass).  A replaced
 * fd (a guest kick fd QEMU sends again, the backend call fds a new backend
 * gets) has its poll cancelled (disarm) and the new one armed in the next
 * iteration: the poll holds the old file, so without the cancel a dropped
 * backend that kept the fd could still wake us.  The command
 * eventfd keeps an IORING_OP_READ (it is ours, and the read tells
 * "commands queued").
 *
 * Why no read: an eventfd read takes the eventfd's wait-queue lock, which
 * the writer holds while it wakes us -- and on this 2-vCPU VM that wake-up
 * (an IPI to an idle vCPU, a hypervisor exit) takes tens of microseconds, so
 * the read, run as task work right after that very wake-up, spun on the
 * lock.  Measured (perf on the proxy during bench 4k randread QD32,
 * split-free-proxy): with armed reads 39 % of the proxy's samples were
 * _raw_spin_unlock_irq under eventfd_read; with multishot polls eventfd_read
 * is gone from the profile (bench/RESULTS.md, "Waiting").
 * An earlier ping-pong on one CPU (csrc/bench/eventfd_wait.c) saw no
 * difference: there is no contention without a second CPU.
 *
 * Outgoing notifications are io_uring writes queued during the pass and
 * submitted with the wait, so N kicks/calls cost one syscall.  Caveat
 * measured on the same setup: eventfd has no write_iter, so io_uring can
 * issue the write inline only when the file is O_NONBLOCK; on a blocking
 * eventfd every write is punted to an io-wq worker thread (22.6 us instead
 * of 2.7 us per round trip).  Our backend eventfds and QEMU's are
 * non-blocking; a blocking guest call fd is signalled with write(2).
 *
 * One iteration:
 *   1. run queued control-plane commands (between two batches: no engine
 *      state changes under the engine's feet);
 *   2. arm the polls (and the command read) that are not armed;
 *   3. engine pass over every queue that is due (harvest shadow used ->
 *      guest, guest avail -> shadow), see "Which queues a pass visits";
 *   4. queue one eventfd write per backend to kick / guest to call;
 *   5. optional busy-poll on the rings, for an adaptive window of at most
 *      busy_poll_us (see busy_poll);
 *   6. before sleeping, ask for the kicks and calls the passes did not ask
 *      for while the loop was spinning (event idx; queue_arm): a ring that
 *      got work meanwhile means no sleep;
 *   7. submit everything (re-arms + writes) as ONE batch and wait for one
 *      completion (with a timeout if some queue has no kick fd and must be
 *      polled), then drain all completions with one cq_advance.
 *
 * Several loops.  A process may run N of these (fastshadow/dataplane.py
 * spreads devices over them): each is a struct fsdp_dp with its own thread,
 * io_uring, command channel, event ring and device table, and a device lives
 * in exactly one of them for its whole life.  So every queue, and every piece
 * of device-wide state (memory table and its lookup cache, dirty log), has
 * one writer, and the hot path takes no lock: scaling is by adding loops, not
 * by sharing one.  Splitting one device's queues over loops would need the
 * memory table to be shared (a quiesce of every owning loop around each
 * SET_MEM_TABLE) and buys nothing for the many-VM case this is for.
 *
 * Which queues a pass visits.  A pass over a queue reads the guest's avail
 * index and the backend's used index, cache lines other CPUs write, so
 * visiting every queue on every wakeup costs more per request the more
 * queues a loop serves.  Measured (bench --scale, 32 devices x 4 queues on 2
 * loops, 2 CPUs shared with the load and the backend, 2 runs each, noisy):
 * every queue 1.95-2.37 us of proxy CPU per request, due queues only
 * 1.39-1.62 us.  So a pass visits only
 * the queues that are due: a kick or call poll completed for it, busy-poll
 * saw work on it, it ran out of budget (q->more), it must be polled (no kick
 * fd, or its poll failed), a stop waits on it, or commands ran (every queue
 * then: commands are rare and may change anything).  Nothing is lost: a pass
 * that leaves a queue idle has armed the notifications that will make it due
 * again (avail_event/used_event re-armed and re-checked in shadow.c, the
 * eventfd polls stay armed), and a throttled queue
 * becomes due with the completion (a call) that frees space.
 *
 * Idle trim.  A queue's bounce pages become resident when requests use them
 * and stay so (shared memfd pages) until given back: a queue that held
 * requests, holds none now (its bounce allocator is empty) and has taken
 * none for idle_trim_ms gets madvise(MADV_REMOVE) on its bounce area, which
 * punches the pages out of the shadow memfd (for the backend's mapping too).
 * Nothing can be lost: no request owns a byte there, and the next request
 * faults in fresh zero pages.  The loop wakes for the next trim deadline.
 * A trim is not free (the madvise frees up to bounce_per_queue of pages on
 * the loop thread, and the pages are faulted in again by the proxy and the
 * backend): a queue used again soon after its trim (within 4 windows) gets
 * its window doubled, up to 64x, and one used again after a long idle
 * (beyond 4 windows) halves it back.  Measured (bench --scale, 16 devices x
 * 4 queues on 2 CPUs, 300 ms): without it, sessions that waited 300 ms for
 * the CPU were trimmed mid-run and the refaults cost more than the copies.
 * One trim per pass: freeing a 16 MiB area takes the loop a millisecond or
 * so, and a device whose queues all went idle together must not stall the
 * other devices of the loop for all of them at once; the others stay due and
 * the loop comes back for them after serving the rings.
 *
 * Device ids are the process's, not the loop's: events, USDT probes and the
 * tracer's name table (probes.h) name a device by its id alone, so two loops
 * must never hand out the same one (the lowest free id, so a proxy's first
 * devices still get 0, 1, ...).  A loop's table is indexed by its own slots.
 *
 * user_data = kind (8 bits) | device slot in this loop (16; the device id
 * for eventfd writes, whose completions only name it in an error event) |
 * queue (8) | token (32).  The
 * token identifies the armed poll of a queue; completions of polls that were
 * cancelled or replaced carry an old token and are ignored.  The command
 * read lands in a sink owned by the dp (the value is never used).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "loop.h"
#include "events.h"
#include "hist.h"
#include "probes.h"
#include "queue.h"
#include "shadow.h"

#define MAX_DEVS 256             /* devices per loop (slots) */
#define MAX_IDS 1024            /* device ids in the process (fit user_data's 16 bits) */
#define SQ_ENTRIES 256
#define CQ_ENTRIES 4096

enum { ST_STOPPED, ST_STARTING, ST_RUNNING, ST_STOPPING };
enum { K_CMD = 1, K_KICK = 2, K_CALL = 3, K_WRITE = 4, K_CANCEL = 5 };

/* What the loop keeps per queue; nobody else reads it. */
struct watch {
    uint32_t kick_token, call_token;    /* of the armed polls (see user_data) */
    bool kick_armed, call_armed;
    bool kick_failed;                   /* poll on the kick fd failed: poll this queue's ring */
    struct fsdp_cmd *stop;              /* a stop waiting for the queue to drain */
    struct fsdp_stop_result *stop_res;  /* ... and where its result goes */
    bool due;                           /* visit in the next pass (see the head comment) */
    uint64_t trim_seen;                 /* st.requests when last looked at (idle trim) */
    uint64_t busy_at;                   /* when the bounce area was last seen in use */
    uint64_t trimmed_at;                /* when it was last trimmed (0: never) */
    uint32_t trim_shift;                /* trim window = idle_trim_ms << trim_shift */
    bool resident;                      /* bounce pages may be resident: trim when idle */
};

/* One entry of the device table. */
struct loop_dev {
    struct fsdp_devctx *d;              /* NULL: free */
    struct watch *w;                    /* one per queue */
};

struct fsdp_dp {
    struct fsdp_dp_config cfg;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int state;                          /* under lock (the loop also reads it atomically) */
    bool inline_exec;                   /* a command runs inline with lock held */
    struct fsdp_cmd *cmd_head, *cmd_tail;
    atomic_int cmd_pending;
    int cmd_efd;
    pthread_t thread;
    int start_rc;
    bool start_done;

    struct loop_dev devs[MAX_DEVS];
    uint32_t ndevs;                     /* highest slot + 1 */

    struct fsdp_evring ev;

    /* loop thread only */
    struct io_uring ring;
    bool ring_ok;
    uint32_t token;
    bool cmd_armed;
    uint64_t sink;                      /* target of the command eventfd read */
    uint64_t one;                       /* source of every eventfd write */
    struct fsdp_batch batch;            /* queue_notify's way to our ring */
    unsigned ring_flags;
    unsigned ring_features;             /* IORING_FEAT_* of the ring */
    uint64_t poll_ns;                   /* current busy-poll window, <= busy_poll_us */
    bool all_due;                       /* commands ran: the next pass visits every queue */
    unsigned trims_left;                /* trims this pass may still do (one per pass) */
    uint64_t trim_at;                   /* earliest idle-trim deadline (0: none) */
    int tid;                            /* the loop thread's tid (0: not running) */
    uint64_t trimmed_pages;             /* read by other threads (relaxed) */
    uint64_t wake_ns;                   /* this drain's stamp (hist.h), 0: not read yet */
};

static inline uint64_t ud_make(unsigned kind, uint32_t dev, uint32_t q, uint32_t token)
{
    return (uint64_t)kind | (uint64_t)(dev & 0xffff) << 8 | (uint64_t)(q & 0xff) << 24 |
           (uint64_t)token << 32;
}
static inline unsigned ud_kind(uint64_t u) { return u & 0xff; }
static inline uint32_t ud_dev(uint64_t u) { return (u >> 8) & 0xffff; }
static inline uint32_t ud_q(uint64_t u) { return (u >> 24) & 0xff; }
static inline uint32_t ud_token(uint64_t u) { return (uint32_t)(u >> 32); }

struct fsdp_evring *dp_events(struct fsdp_dp *dp) { return &dp->ev; }

const struct fsdp_dp_config *dp_config(struct fsdp_dp *dp) { return &dp->cfg; }

static bool loop_running(struct fsdp_dp *dp)
{
    return __atomic_load_n(&dp->state, __ATOMIC_ACQUIRE) == ST_RUNNING;
}

/* ------------------------------------------------------------------------ */
/* Command channel.                                                           */

static void complete_locked(struct fsdp_dp *dp, struct fsdp_cmd *c, int rc)
{
    c->rc = rc;
    c->done = true;     /* c may vanish as soon as the lock is released */
    pthread_cond_broadcast(&dp->cond);
}

void dp_cmd_complete(struct fsdp_dp *dp, struct fsdp_cmd *c, int rc)
{
    if (dp->inline_exec) {          /* we already hold the lock */
        complete_locked(dp, c, rc);
        return;
    }
    pthread_mutex_lock(&dp->lock);
    complete_locked(dp, c, rc);
    pthread_mutex_unlock(&dp->lock);
}

static bool loop_accepts(struct fsdp_dp *dp)
{
    return dp->state == ST_RUNNING || dp->state == ST_STOPPING;
}

static int run_inline_locked(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    int rc;

    c->deferrable = false;
    dp->inline_exec = true;
    rc = c->fn(dp, c);
    dp->inline_exec = false;
    return rc;
}

static void enqueue_locked(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    uint64_t one = 1;
    ssize_t w;

    c->next = NULL;
    c->done = false;
    c->deferred = false;
    c->deferrable = true;
    if (dp->cmd_tail)
        dp->cmd_tail->next = c;
    else
        dp->cmd_head = c;
    dp->cmd_tail = c;
    atomic_store_explicit(&dp->cmd_pending, 1, memory_order_release);
    w = write(dp->cmd_efd, &one, sizeof(one));
    (void)w;   /* EAGAIN: counter saturated, already readable */
}

int dp_exec_timed(struct fsdp_dp *dp, struct fsdp_cmd *c, int64_t timeout_ms,
                  struct fsdp_cmd *cancel)
{
    struct timespec dl;
    int rc;

    pthread_mutex_lock(&dp->lock);
    if (!loop_accepts(dp)) {
        rc = run_inline_locked(dp, c);
        pthread_mutex_unlock(&dp->lock);
        return rc;
    }
    enqueue_locked(dp, c);
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (timeout_ms % 1000) * 1000000;
        if (dl.tv_nsec >= 1000000000) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000;
        }
    }
    while (!c->done) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&dp->cond, &dp->lock);
        } else if (pthread_cond_timedwait(&dp->cond, &dp->lock, &dl) == ETIMEDOUT) {
            break;
        }
    }
    if (!c->done) {
        /* The loop still holds c: ask it (on its own thread) to let go. */
        enqueue_locked(dp, cancel);
        while (!c->done || !cancel->done)
            pthread_cond_wait(&dp->cond, &dp->lock);
    }
    rc = c->rc;
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

int dp_exec(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    return dp_exec_timed(dp, c, -1, NULL);   /* never times out: no cancel */
}

int dp_exec_inline(struct fsdp_dp *dp, struct fsdp_cmd *c)
{
    int rc;

    pthread_mutex_lock(&dp->lock);
    rc = dp->state == ST_STOPPED ? run_inline_locked(dp, c) : -EBUSY;
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

static void run_commands(struct fsdp_dp *dp)
{
    struct fsdp_cmd *c, *next;

    if (!atomic_exchange_explicit(&dp->cmd_pending, 0, memory_order_acq_rel))
        return;
    pthread_mutex_lock(&dp->lock);
    c = dp->cmd_head;
    dp->cmd_head = dp->cmd_tail = NULL;
    pthread_mutex_unlock(&dp->lock);
    if (c)
        dp->all_due = true;
    for (; c; c = next) {
        int rc;
        next = c->next;     /* read before completion: c may vanish after */
        rc = c->fn(dp, c);
        if (!c->deferred)
            dp_cmd_complete(dp, c, rc);
    }
}

/* ------------------------------------------------------------------------ */
/* Devices in the loop.                                                       */

/* The process's device ids (see the head comment); under ids_lock. */
static pthread_mutex_t ids_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t ids_used[MAX_IDS / 64];

/* The lowest free device id, taken; -1 if none. */
static int id_take(void)
{
    int id = -1;

    pthread_mutex_lock(&ids_lock);
    for (uint32_t i = 0; i < MAX_IDS && id < 0; i++) {
        if (!(ids_used[i / 64] >> (i % 64) & 1u)) {
            ids_used[i / 64] |= 1ull << (i % 64);
            id = (int)i;
        }
    }
    pthread_mutex_unlock(&ids_lock);
    return id;
}

static void id_give(uint32_t id)
{
    pthread_mutex_lock(&ids_lock);
    if (id < MAX_IDS)
        ids_used[id / 64] &= ~(1ull << (id % 64));
    pthread_mutex_unlock(&ids_lock);
}

int dp_attach(struct fsdp_dp *dp, struct fsdp_devctx *d)
{
    for (uint32_t slot = 0; slot < MAX_DEVS; slot++) {
        if (!dp->devs[slot].d) {
            struct watch *w = calloc(d->num_queues, sizeof(*w));
            int id = id_take();
            if (!w || id < 0) {
                free(w);
                if (id >= 0)
                    id_give((uint32_t)id);
                return w ? -ENOSPC : -ENOMEM;
            }
            dp->devs[slot].d = d;
            dp->devs[slot].w = w;
            d->id = (uint32_t)id;
            if (slot + 1 > dp->ndevs)
                dp->ndevs = slot + 1;
            return 0;
        }
    }
    return -ENOSPC;
}

/* d's slot in this loop's table, or -1 (not in it).  Control paths only. */
static int slot_of(const struct fsdp_dp *dp, const struct fsdp_devctx *d)
{
    for (uint32_t slot = 0; slot < dp->ndevs; slot++)
        if (dp->devs[slot].d == d)
            return (int)slot;
    return -1;
}

/* The loop's record of q, or NULL if q's device is not in the table. */
static struct watch *watch_of(struct fsdp_dp *dp, const struct fsdp_queue *q)
{
    int slot = slot_of(dp, q->dev);

    return slot >= 0 && q->idx < q->dev->num_queues ? &dp->devs[slot].w[q->idx] : NULL;
}

static struct io_uring_sqe *get_sqe(struct fsdp_dp *dp)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&dp->ring);

    if (!sqe) {
        /* SQ full: flush what we have (rare: > SQ_ENTRIES ops in one batch). */
        io_uring_submit(&dp->ring);
        sqe = io_uring_get_sqe(&dp->ring);
    }
    return sqe;
}

static void cancel_watch(struct fsdp_dp *dp, uint32_t slot, struct fsdp_queue *q, unsigned kind,
                        uint32_t token)
{
    struct io_uring_sqe *sqe;

    if (!dp->ring_ok)
        return;
    sqe = get_sqe(dp);
    if (!sqe)
        return;   /* the stale completion will be ignored by its token */
    io_uring_prep_cancel64(sqe, ud_make(kind, slot, q->idx, token), 0);
    io_uring_sqe_set_data64(sqe, ud_make(K_CANCEL, 0, 0, 0));
}

/* Cancel q's armed poll of kind K_KICK or K_CALL, if any.  The poll holds
 * its eventfd's file: once cancelled, a write to that file (by a peer that
 * kept the fd) wakes nobody; arm_all arms the queue's current fd in the next
 * iteration, and a completion of the old poll already queued carries the old
 * token and is ignored. */
static void disarm(struct fsdp_dp *dp, uint32_t slot, struct fsdp_queue *q, struct watch *w, unsigned kind)
{
    bool *armed = kind == K_KICK ? &w->kick_armed : &w->call_armed;

    if (*armed)
        cancel_watch(dp, slot, q, kind, kind == K_KICK ? w->kick_token : w->call_token);
    *armed = false;
}

void dp_kick_fd_changed(struct fsdp_dp *dp, struct fsdp_queue *q)
{
    struct watch *w = watch_of(dp, q);

    if (!w)
        return;
    disarm(dp, (uint32_t)slot_of(dp, q->dev), q, w, K_KICK);
    w->kick_failed = false;
}

void dp_call_fd_changed(struct fsdp_dp *dp, struct fsdp_queue *q)
{
    struct watch *w = watch_of(dp, q);

    if (w)
        disarm(dp, (uint32_t)slot_of(dp, q->dev), q, w, K_CALL);
}

/* The stop waiting on q, finished (queue_stop_finish fills its result), for
 * the caller to complete. */
static struct fsdp_cmd *finish_stop(struct fsdp_queue *q, struct watch *w)
{
    struct fsdp_cmd *c = w->stop;

    w->stop = NULL;
    queue_stop_finish(q, w->stop_res);
    return c;
}

bool dp_stop_waiting(struct fsdp_dp *dp, const struct fsdp_queue *q)
{
    struct watch *w = watch_of(dp, q);
    return w && w->stop;
}

int dp_stop_wait(struct fsdp_dp *dp, struct fsdp_queue *q, struct fsdp_cmd *c,
                 struct fsdp_stop_result *res)
{
    struct watch *w = watch_of(dp, q);

    if (!w)
        return -ENODEV;
    w->stop = c;
    w->stop_res = res;
    /* Completed by the loop when nothing taken is left in flight
     * (process_all), or by dp_stop_end (the caller's timeout expired, the
     * device is reset or removed). */
    c->deferred = true;
    return 0;
}

bool dp_stop_end(struct fsdp_dp *dp, struct fsdp_queue *q, const struct fsdp_cmd *only, int rc)
{
    struct watch *w = watch_of(dp, q);

    if (!w || !w->stop || (only && w->stop != only))
        return false;
    dp_cmd_complete(dp, finish_stop(q, w), rc);
    return true;
}

void dp_detach(struct fsdp_dp *dp, struct fsdp_devctx *d)
{
    int slot = slot_of(dp, d);
    struct loop_dev *ld = slot >= 0 ? &dp->devs[slot] : NULL;

    if (!ld)
        return;
    for (uint32_t i = 0; i < d->num_queues; i++) {
        struct fsdp_queue *q = &d->q[i];
        struct watch *w = &ld->w[i];
        if (w->stop)
            dp_cmd_complete(dp, finish_stop(q, w), -ENODEV);
        disarm(dp, (uint32_t)slot, q, w, K_KICK);
        disarm(dp, (uint32_t)slot, q, w, K_CALL);
    }
    free(ld->w);
    ld->w = NULL;
    ld->d = NULL;
    id_give(d->id);
}

struct fsdp_devctx *dp_take_dev(struct fsdp_dp *dp)
{
    for (uint32_t slot = 0; slot < MAX_DEVS; slot++) {
        struct loop_dev *ld = &dp->devs[slot];
        if (ld->d) {
            struct fsdp_devctx *d = ld->d;
            free(ld->w);
            ld->w = NULL;
            ld->d = NULL;
            id_give(d->id);
            return d;
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The loop.                                                                  */

/* Arm the wait on one eventfd: the command read, or a kick/call multishot
 * poll (head comment, "How the loop waits"). */
static void arm_watch(struct fsdp_dp *dp, int fd, unsigned kind, uint32_t slot, struct fsdp_queue *q,
                      uint32_t *token, bool *armed)
{
    struct io_uring_sqe *sqe = get_sqe(dp);

    if (!sqe)
        return;
    *token = ++dp->token;
    *armed = true;
    if (kind == K_CMD)
        io_uring_prep_read(sqe, fd, &dp->sink, sizeof(dp->sink), 0);
    else
        io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud_make(kind, slot, q ? q->idx : 0, *token));
}

static void arm_all(struct fsdp_dp *dp)
{
    if (!dp->cmd_armed) {
        uint32_t t;
        arm_watch(dp, dp->cmd_efd, K_CMD, 0, NULL, &t, &dp->cmd_armed);
    }
    for (uint32_t d = 0; d < dp->ndevs; d++) {
        struct fsdp_devctx *dev = dp->devs[d].d;
        for (uint32_t i = 0; dev && i < dev->num_queues; i++) {
            struct fsdp_queue *q = &dev->q[i];
            struct watch *w = &dp->devs[d].w[i];
            if (!w->kick_armed && !w->kick_failed && q->guest_kick_fd >= 0)
                arm_watch(dp, q->guest_kick_fd, K_KICK, d, q, &w->kick_token, &w->kick_armed);
            if (!w->call_armed)
                arm_watch(dp, q->backend_call_fd, K_CALL, d, q, &w->call_token, &w->call_armed);
        }
    }
}

/* fsdp_batch.add: one eventfd write, submitted with the next wait. */
static void batch_write(void *arg, struct fsdp_queue *q, int fd)
{
    struct fsdp_dp *dp = arg;
    struct io_uring_sqe *sqe = get_sqe(dp);

    if (!sqe)
        return;
    io_uring_prep_write(sqe, fd, &dp->one, sizeof(dp->one), 0);
    /* Only a failed write needs a completion (loop_error): a successful one
     * would only make the next wait return at once, one io_uring_enter more
     * per batch. */
    if (dp->ring_features & IORING_FEAT_CQE_SKIP)
        io_uring_sqe_set_flags(sqe, IOSQE_CQE_SKIP_SUCCESS);
    io_uring_sqe_set_data64(sqe, ud_make(K_WRITE, q->dev->id, q->idx, 0));
}

static uint64_t now_ns(void);

/* Idle trim of q's bounce area (see the head comment).  now: this pass's
 * clock; dp->trim_at collects the earliest deadline still to come. */
static void trim_idle(struct fsdp_dp *dp, struct fsdp_queue *q, struct watch *w, uint64_t now)
{
    uint64_t deadline, window = ((uint64_t)dp->cfg.idle_trim_ms * 1000000u) << w->trim_shift;

    if (q->st.requests != w->trim_seen) {
        w->trim_seen = q->st.requests;  /* took requests: their pages are resident */
        if (!w->resident && w->trimmed_at) {
            /* First use since the trim: was it worth it? (head comment) */
            if (now - w->trimmed_at < 4 * window && w->trim_shift < 6)
                w->trim_shift++;
            else if (now - w->trimmed_at >= 4 * window && w->trim_shift > 0)
                w->trim_shift--;
            window = ((uint64_t)dp->cfg.idle_trim_ms * 1000000u) << w->trim_shift;
        }
        w->resident = true;
        w->busy_at = now;
    }
    if (!w->resident || !q->bounce.bitmap)
        return;
    if (q->bounce.nfree != q->bounce.npages) {
        w->busy_at = now;               /* a request (in flight or kept) owns bounce bytes */
        return;
    }
    deadline = w->busy_at + window;
    if (now < deadline || !dp->trims_left) {
        /* Not yet, or this pass trimmed already: come back (now, if due). */
        if (now >= deadline)
            deadline = now;
        if (!dp->trim_at || deadline < dp->trim_at)
            dp->trim_at = deadline;
        return;
    }
    dp->trims_left--;
    /* Nothing owns a byte of the area: its pages go back to the kernel
     * (punched out of the memfd; the next request faults in zero pages). */
    if (madvise(q->s_bounce, (size_t)q->bounce.npages * FSDP_PAGE, MADV_REMOVE) == 0)
        __atomic_add_fetch(&dp->trimmed_pages, q->bounce.npages, __ATOMIC_RELAXED);
    w->resident = false;
    w->trimmed_at = now;
}

/* Engine pass + outgoing notifications.  Returns true if anything moved;
 * *poll_mode is set if some started queue has to be polled, *again if some
 * queue ran out of its per-pass budget (do not sleep). */
static bool process_all(struct fsdp_dp *dp, bool *poll_mode, bool *again)
{
    bool any = false, all = dp->all_due;
    uint64_t now = dp->cfg.idle_trim_ms ? now_ns() : 0;
    /* Every queue's idle trim is looked at only once the earliest deadline
     * has passed; until then only the queues visited (re)register theirs. */
    bool trim_all = now && dp->trim_at && now >= dp->trim_at;

    dp->all_due = false;
    dp->trims_left = 1;
    if (trim_all)
        dp->trim_at = 0;
    for (uint32_t d = 0; d < dp->ndevs; d++) {
        struct fsdp_devctx *dev = dp->devs[d].d;
        for (uint32_t i = 0; dev && i < dev->num_queues; i++) {
            struct fsdp_queue *q = &dev->q[i];
            struct watch *w = &dp->devs[d].w[i];
            bool polled = q->started && (q->guest_kick_fd < 0 || w->kick_failed);
            if (!(all || w->due || q->more || polled || w->stop)) {
                if (trim_all)
                    trim_idle(dp, q, w, now);
                continue;
            }
            w->due = false;
            if (q->started) {
                /* While the loop spins after work it sees the rings itself:
                 * no event idx arming per pass (queue_arm before sleeping). */
                q->defer_arm = dp->cfg.busy_poll_us && dp->poll_ns;
                any |= queue_process(q);
                if (q->guest_kick_fd < 0 || w->kick_failed)
                    *poll_mode = true;
                if (q->more)
                    *again = true;
            }
            if (w->stop) {
                if (!queue_draining(q)) {
                    dp_cmd_complete(dp, finish_stop(q, w), 0);
                } else {
                    /* A stopped backend may have closed its call fd and
                     * still complete what it took: look, don't wait. */
                    *poll_mode = true;
                }
            }
            queue_notify(q, &dp->batch);
            if (now)
                trim_idle(dp, q, w, now);
        }
    }
    return any;
}

/* Before sleeping: arm the notifications the passes deferred (queue_arm).
 * True if some ring got work meanwhile: run a pass instead of sleeping. */
static bool arm_deferred(struct fsdp_dp *dp)
{
    bool work = false;

    for (uint32_t d = 0; d < dp->ndevs; d++) {
        struct fsdp_devctx *dev = dp->devs[d].d;
        for (uint32_t i = 0; dev && i < dev->num_queues; i++)
            if (queue_arm(&dev->q[i])) {
                dp->devs[d].w[i].due = true;    /* work seen outside a pass: visit it */
                work = true;
            }
    }
    return work;
}

/* The queue a completion is about, and the loop's record of it (NULL if gone). */
static struct fsdp_queue *lookup_q(struct fsdp_dp *dp, uint64_t ud, struct watch **w)
{
    uint32_t d = ud_dev(ud), i = ud_q(ud);
    struct fsdp_devctx *dev = d < MAX_DEVS ? dp->devs[d].d : NULL;

    if (!dev || i >= dev->num_queues)
        return NULL;
    *w = &dp->devs[d].w[i];
    return &dev->q[i];
}

static void loop_error(struct fsdp_dp *dp, uint32_t dev, uint32_t q, int res)
{
    struct fsdp_event e = {.dev = dev, .queue = q, .code = FSDP_EV_LOOP_ERROR,
                           .a = (uint64_t)(int64_t)res};
    evring_push(&dp->ev, &e);
}

/* The time of this drain's kicks and calls: one clock read per drain (hist.h). */
static uint64_t wake_stamp(struct fsdp_dp *dp)
{
    if (!dp->wake_ns)
        dp->wake_ns = hist_clock();
    return dp->wake_ns;
}

static void handle_cqe(struct fsdp_dp *dp, struct io_uring_cqe *cqe)
{
    uint64_t ud = cqe->user_data;
    struct fsdp_queue *q;
    struct watch *w;
    bool soft = cqe->res == -ECANCELED || cqe->res == -EINTR || cqe->res == -EAGAIN;

    switch (ud_kind(ud)) {
    case K_CMD:
        dp->cmd_armed = false;
        break;
    case K_KICK:
        q = lookup_q(dp, ud, &w);
        if (!q || !w->kick_armed || w->kick_token != ud_token(ud))
            break;      /* stale: cancelled or replaced */
        w->kick_armed = (cqe->flags & IORING_CQE_F_MORE) != 0;
        w->due = true;
        if (cqe->res >= 0) {
            q->st.guest_kicks++;
            if (q->h.on)
                hist_kick(&q->h, wake_stamp(dp));
            PROBE_GUEST_KICK(q->dev->id, q->idx);
        } else if (!soft) {
            /* Don't spin re-arming a broken fd: poll the ring instead. */
            w->kick_failed = true;
            loop_error(dp, q->dev->id, q->idx, cqe->res);
        }
        break;
    case K_CALL:
        q = lookup_q(dp, ud, &w);
        if (!q || !w->call_armed || w->call_token != ud_token(ud))
            break;
        w->call_armed = (cqe->flags & IORING_CQE_F_MORE) != 0;
        w->due = true;
        if (cqe->res >= 0) {
            q->st.backend_calls++;
            if (q->h.on)
                hist_call(&q->h, wake_stamp(dp));
            PROBE_BACKEND_CALL(q->dev->id, q->idx);
        } else if (!soft) {
            loop_error(dp, q->dev->id, q->idx, cqe->res);
        }
        break;
    case K_WRITE:
        if (cqe->res < 0 && cqe->res != -EAGAIN)    /* EAGAIN: counter saturated */
            loop_error(dp, ud_dev(ud), ud_q(ud), cqe->res);
        break;
    default:
        break;
    }
}

static unsigned drain_cqes(struct fsdp_dp *dp)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;

    dp->wake_ns = 0;
    io_uring_for_each_cqe(&dp->ring, head, cqe) {
        handle_cqe(dp, cqe);
        n++;
    }
    io_uring_cq_advance(&dp->ring, n);
    return n;
}

/* Run the completions the kernel deferred to us (DEFER_TASKRUN: poll
 * wake-ups of kicks and calls), without a syscall when there are none: the
 * kernel raises IORING_SQ_TASKRUN in the shared ring when it queues some
 * (IORING_SETUP_TASKRUN_FLAG; without the flag, always enter), and
 * IORING_SQ_CQ_OVERFLOW when completions wait in its overflow list (the
 * mask liburing's cq_ring_needs_flush uses). */
static void run_task_work(struct fsdp_dp *dp)
{
    if (!(dp->ring_flags & IORING_SETUP_TASKRUN_FLAG) ||
        (IO_URING_READ_ONCE(*dp->ring.sq.kflags) & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)))
        io_uring_get_events(&dp->ring);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Busy-polling.  Spin on the rings (not on io_uring: with DEFER_TASKRUN
 * completions only appear when we enter the kernel) until `end`.
 *
 * Every 64 rounds the spin yields the CPU.  The backend often runs on the
 * same CPU as the data plane (2 vCPUs for guest, backend and proxy), and the
 * completion we spin for can only come once the backend runs: without the
 * yield the spin just delays it.  If nothing else is runnable sched_yield()
 * returns at once.
 */
static bool busy_poll(struct fsdp_dp *dp, uint64_t end)
{
    unsigned spins = 0;

    do {
        bool found = false;

        if (atomic_load_explicit(&dp->cmd_pending, memory_order_acquire))
            return true;
        for (uint32_t d = 0; d < dp->ndevs; d++) {
            struct fsdp_devctx *dev = dp->devs[d].d;
            for (uint32_t i = 0; dev && i < dev->num_queues; i++)
                if (queue_has_work(&dev->q[i])) {
                    dp->devs[d].w[i].due = true;    /* seen without a notification */
                    found = true;
                }
        }
        if (found)
            return true;
        __builtin_ia32_pause();
        if ((++spins & 63) == 0)
            sched_yield();
    } while (now_ns() < end);
    return false;
}

/*
 * The window adapts, in the manner of KVM's halt-polling: idle_ns is how long
 * the loop had nothing to do (spin + sleep).  A long idle period means the
 * spin was wasted CPU: halve the window (down to 0).  A short one that the
 * spin did not catch means a longer spin would have: double it (from 4 us,
 * up to busy_poll_us).  A spin that catches work keeps its window.
 */
static void adapt_poll(struct fsdp_dp *dp, uint64_t idle_ns)
{
    uint64_t max = (uint64_t)dp->cfg.busy_poll_us * 1000u, w = dp->poll_ns;

    if (idle_ns > max) {
        w /= 2;
        if (w < 1000)
            w = 0;
    } else if (w < max) {
        w = w ? w * 2 : 4000;
        if (w > max)
            w = max;
    }
    /* Read by fsdp_dp_poll_window_ns from other threads. */
    __atomic_store_n(&dp->poll_ns, w, __ATOMIC_RELAXED);
}

static int setup_ring(struct fsdp_dp *dp)
{
    static const unsigned tries[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int rc = -EINVAL;

    for (size_t i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = tries[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = CQ_ENTRIES;
        rc = io_uring_queue_init_params(SQ_ENTRIES, &dp->ring, &p);
        if (rc == 0) {
            dp->ring_flags = p.flags;
            dp->ring_features = p.features;
            return 0;
        }
        if (rc != -EINVAL)
            break;
    }
    return rc;
}

static void *loop_main(void *arg)
{
    struct fsdp_dp *dp = arg;
    int rc = setup_ring(dp);
    char name[16];

    snprintf(name, sizeof(name), "fsdp-loop%u", dp->cfg.loop_index % 10000u);
    pthread_setname_np(pthread_self(), name);   /* top, perf and the bench tell loops apart */
    /* Read by fsdp_dp_thread_id (affinity from the control plane) only once
     * it has seen ST_RUNNING (acquire), which is stored below (release). */
    __atomic_store_n(&dp->tid, (int)gettid(), __ATOMIC_RELAXED);
    pthread_mutex_lock(&dp->lock);
    dp->start_rc = rc;
    dp->start_done = true;
    if (rc == 0) {
        dp->ring_ok = true;
        dp->cmd_armed = false;
        dp->all_due = true;             /* the rings moved while no loop ran */
        for (uint32_t d = 0; d < dp->ndevs; d++)
            for (uint32_t i = 0; dp->devs[d].d && i < dp->devs[d].d->num_queues; i++) {
                struct watch *w = &dp->devs[d].w[i];
                w->kick_armed = w->call_armed = w->kick_failed = false;
            }
        __atomic_store_n(&dp->state, ST_RUNNING, __ATOMIC_RELEASE);
    }
    pthread_cond_broadcast(&dp->cond);
    pthread_mutex_unlock(&dp->lock);
    if (rc)
        return NULL;

    /* When the rings last ran dry (0: they are busy, or busy-poll is off). */
    uint64_t idle_from = 0;

    for (;;) {
        bool poll_mode = false, again = false, any;
        struct __kernel_timespec ts, *tsp = NULL;
        struct io_uring_cqe *cqe;

        run_commands(dp);
        if (__atomic_load_n(&dp->state, __ATOMIC_ACQUIRE) == ST_STOPPING)
            break;
        arm_all(dp);
        any = process_all(dp, &poll_mode, &again);

        if (any && idle_from) {
            /* Work after an idle period the spin did not catch. */
            adapt_poll(dp, now_ns() - idle_from);
            idle_from = 0;
        }
        /* Spin only right after work: a wakeup that brought none (a
         * command, a poll completion for a ring a spin already served) goes
         * back to sleep, still counting the idle period from where it began. */
        if (dp->cfg.busy_poll_us && any) {
            io_uring_submit(&dp->ring);          /* notifications go out now */
            idle_from = now_ns();
            if (dp->poll_ns && busy_poll(dp, idle_from + dp->poll_ns)) {
                idle_from = 0;                   /* caught: the window stays */
                run_task_work(dp);
                drain_cqes(dp);
                continue;
            }
        }
        if (!again && arm_deferred(dp))
            again = true;       /* work arrived while arming: look before sleeping */
        if (again) {
            /* Fail-safe for the due-queue rule: a reason not to sleep found
             * outside a pass (a look at the rings that did not say which
             * queue) must not leave that queue unvisited; a queue out of
             * budget (q->more) is due anyway, so this costs one full pass
             * only when a pass was cut short. */
            dp->all_due = true;
            ts.tv_sec = 0;      /* submit, collect what is ready, don't sleep */
            ts.tv_nsec = 0;
            tsp = &ts;
        } else if (poll_mode) {
            ts.tv_sec = dp->cfg.poll_interval_us / 1000000u;
            ts.tv_nsec = (long long)(dp->cfg.poll_interval_us % 1000000u) * 1000;
            tsp = &ts;
        } else if (dp->trim_at) {
            /* Wake for the next idle trim (a pass computes the deadlines). */
            uint64_t now = now_ns(), left = dp->trim_at > now ? dp->trim_at - now : 0;
            ts.tv_sec = (long long)(left / 1000000000u);
            ts.tv_nsec = (long long)(left % 1000000000u) + 1000;   /* past it, not just before */
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            tsp = &ts;
        }
        /* One syscall: submit re-arms + all eventfd writes, wait for one. */
        rc = io_uring_submit_and_wait_timeout(&dp->ring, &cqe, 1, tsp, NULL);
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
            loop_error(dp, UINT32_MAX, 0, rc);
        drain_cqes(dp);
    }

    /* Exit: anything still queued runs inline; deferred stops time out. */
    pthread_mutex_lock(&dp->lock);
    __atomic_store_n(&dp->state, ST_STOPPED, __ATOMIC_RELEASE);
    while (dp->cmd_head) {
        struct fsdp_cmd *c = dp->cmd_head;
        dp->cmd_head = c->next;
        if (!dp->cmd_head)
            dp->cmd_tail = NULL;
        complete_locked(dp, c, run_inline_locked(dp, c));
    }
    atomic_store(&dp->cmd_pending, 0);
    for (uint32_t d = 0; d < dp->ndevs; d++)
        for (uint32_t i = 0; dp->devs[d].d && i < dp->devs[d].d->num_queues; i++) {
            struct watch *w = &dp->devs[d].w[i];
            if (w->stop)
                complete_locked(dp, finish_stop(&dp->devs[d].d->q[i], w), -ETIMEDOUT);
            w->kick_armed = w->call_armed = false;
        }
    dp->ring_ok = false;
    __atomic_store_n(&dp->tid, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&dp->lock);
    io_uring_queue_exit(&dp->ring);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Public.                                                                    */

int fsdp_dp_new(const struct fsdp_dp_config *cfg, struct fsdp_dp **out)
{
    struct fsdp_dp *dp = calloc(1, sizeof(*dp));
    int rc;

    if (!dp)
        return -ENOMEM;
    if (cfg)
        dp->cfg = *cfg;
    if (!dp->cfg.poll_interval_us)
        dp->cfg.poll_interval_us = 100;
    if (!dp->cfg.event_ring_size)
        dp->cfg.event_ring_size = 1024;
    dp->one = 1;
    dp->batch.add = batch_write;
    dp->batch.arg = dp;
    dp->state = ST_STOPPED;
    dp->poll_ns = (uint64_t)dp->cfg.busy_poll_us * 1000u;
    rc = evring_init(&dp->ev, dp->cfg.event_ring_size);
    if (rc) {
        free(dp);
        return rc;
    }
    dp->cmd_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (dp->cmd_efd < 0) {
        rc = -errno;
        evring_destroy(&dp->ev);
        free(dp);
        return rc;
    }
    pthread_mutex_init(&dp->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* timeouts immune to clock steps */
    pthread_cond_init(&dp->cond, &ca);
    pthread_condattr_destroy(&ca);
    *out = dp;
    return 0;
}

int fsdp_dp_start(struct fsdp_dp *dp)
{
    int rc;

    pthread_mutex_lock(&dp->lock);
    if (dp->state != ST_STOPPED) {
        pthread_mutex_unlock(&dp->lock);
        return -EALREADY;
    }
    dp->state = ST_STARTING;
    dp->start_done = false;
    rc = -pthread_create(&dp->thread, NULL, loop_main, dp);
    if (rc) {
        dp->state = ST_STOPPED;
        pthread_mutex_unlock(&dp->lock);
        return rc;
    }
    while (!dp->start_done)
        pthread_cond_wait(&dp->cond, &dp->lock);
    rc = dp->start_rc;
    if (rc)
        dp->state = ST_STOPPED;
    pthread_mutex_unlock(&dp->lock);
    if (rc)
        pthread_join(dp->thread, NULL);
    return rc;
}

int fsdp_dp_stop(struct fsdp_dp *dp)
{
    uint64_t one = 1;
    ssize_t w;

    pthread_mutex_lock(&dp->lock);
    if (dp->state != ST_RUNNING) {
        pthread_mutex_unlock(&dp->lock);
        return 0;
    }
    __atomic_store_n(&dp->state, ST_STOPPING, __ATOMIC_RELEASE);
    atomic_store(&dp->cmd_pending, 1);
    w = write(dp->cmd_efd, &one, sizeof(one));
    (void)w;
    pthread_mutex_unlock(&dp->lock);
    pthread_join(dp->thread, NULL);
    return 0;
}

int fsdp_dp_running(struct fsdp_dp *dp)
{
    return loop_running(dp);
}

int fsdp_dp_thread_id(struct fsdp_dp *dp)
{
    return loop_running(dp) ? __atomic_load_n(&dp->tid, __ATOMIC_RELAXED) : 0;
}

uint64_t fsdp_dp_trimmed_pages(struct fsdp_dp *dp)
{
    return __atomic_load_n(&dp->trimmed_pages, __ATOMIC_RELAXED);
}

uint64_t fsdp_dp_poll_window_ns(struct fsdp_dp *dp)
{
    return __atomic_load_n(&dp->poll_ns, __ATOMIC_RELAXED);
}

int fsdp_dp_event_fd(struct fsdp_dp *dp)
{
    return dp->ev.efd;
}

int fsdp_dp_drain_events(struct fsdp_dp *dp, struct fsdp_event *out, uint32_t max,
                         uint64_t *lost)
{
    return evring_drain(&dp->ev, out, max, lost);
}

/* fsdp_dp_free is device.c's: it stops the loop, frees the devices left in
 * the table (dp_take_dev), which only device.c knows how to, then calls this. */
void dp_destroy(struct fsdp_dp *dp)
{
    close(dp->cmd_efd);
    evring_destroy(&dp->ev);
    pthread_cond_destroy(&dp->cond);
    pthread_mutex_destroy(&dp->lock);
    free(dp);
}
