/*
 * eventfd_wait.c: how should the data plane loop wait on eventfds?
 *
 * Ping-pong between a "peer" thread and an io_uring "loop" thread through two
 * eventfds, the loop waiting in one of two ways:
 *   read:      an IORING_OP_READ of 8 bytes armed on the eventfd, re-armed
 *              after each completion (what csrc/loop.c did until it moved to
 *              multishot polls that never read: bench/RESULTS.md, "Waiting");
 *   multishot: IORING_OP_POLL_ADD with IORING_POLL_ADD_MULTI, plus a read(2)
 *              per wakeup to reset the counter.
 * The loop answers with an io_uring write submitted together with the re-arm
 * (read) or alone (multishot), then waits again: one io_uring_enter per
 * round trip either way; or (third mode) with a plain write(2) on the
 * eventfd.  The read mode runs with three io_uring setups (SINGLE_ISSUER |
 * DEFER_TASKRUN as csrc/loop.c, COOP_TASKRUN, none).  Prints ns per round trip.  Not part of the
 * extension (build_ffi.py only compiles the .c files directly in csrc/):
 *
 *   gcc -O2 -o /tmp/eventfd_wait csrc/bench/eventfd_wait.c -luring -lpthread
 *   /tmp/eventfd_wait [iterations] [cpu-of-peer cpu-of-loop]
 */
#define _GNU_SOURCE
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static int efd_in, efd_out, iters, mode, cpu_peer = -1, cpu_loop = -1;
static unsigned ring_flags;

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof(s), &s);
}

static void *loop(void *arg __attribute__((unused)))
{
    struct io_uring ring;
    struct io_uring_params p = {.flags = ring_flags};
    static uint64_t sink, one = 1;
    int done = 0;

    pin(cpu_loop);
    if (io_uring_queue_init_params(64, &ring, &p) < 0)
        abort();
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (mode != 1)
        io_uring_prep_read(sqe, efd_in, &sink, 8, 0);
    else
        io_uring_prep_poll_multishot(sqe, efd_in, POLLIN);
    io_uring_sqe_set_data64(sqe, 1);
    while (done < iters) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_submit_and_wait(&ring, 1);
        io_uring_for_each_cqe(&ring, head, cqe) {
            n++;
            if (cqe->user_data != 1)
                continue;
            if (mode != 1) {
                sqe = io_uring_get_sqe(&ring);      /* re-arm, rides with the write */
                io_uring_prep_read(sqe, efd_in, &sink, 8, 0);
                io_uring_sqe_set_data64(sqe, 1);
            } else {
                uint64_t v;
                if (read(efd_in, &v, 8) != 8)       /* reset the counter */
                    continue;
                if (!(cqe->flags & IORING_CQE_F_MORE)) {
                    sqe = io_uring_get_sqe(&ring);
                    io_uring_prep_poll_multishot(sqe, efd_in, POLLIN);
                    io_uring_sqe_set_data64(sqe, 1);
                }
            }
            if (mode == 2) {
                if (write(efd_out, &one, 8) != 8)
                    abort();
            } else {
                sqe = io_uring_get_sqe(&ring);
                io_uring_prep_write(sqe, efd_out, &one, 8, 0);
                io_uring_sqe_set_data64(sqe, 2);
            }
            done++;
        }
        io_uring_cq_advance(&ring, n);
    }
    /* the last answer must really go out before the ring is torn down */
    for (int pending = mode != 2; pending;) {
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait(&ring, 1);
        if (io_uring_peek_cqe(&ring, &cqe) == 0) {
            pending = cqe->user_data != 2;
            io_uring_cqe_seen(&ring, cqe);
        }
    }
    io_uring_queue_exit(&ring);
    return NULL;
}

int main(int argc, char **argv)
{
    iters = argc > 1 ? atoi(argv[1]) : 100000;
    if (argc > 3) {
        cpu_peer = atoi(argv[2]);
        cpu_loop = atoi(argv[3]);
    }
    static const struct {
        int mode;
        unsigned flags;
        const char *name;
    } runs[] = {
        {0, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
         "read + uring write, SINGLE_ISSUER|DEFER_TASKRUN"},
        {0, IORING_SETUP_COOP_TASKRUN, "read + uring write, COOP_TASKRUN"},
        {0, 0, "read + uring write, no flags"},
        {1, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
         "multishot + uring write, SINGLE_ISSUER|DEFER_TASKRUN"},
        {2, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
         "read + write(2), SINGLE_ISSUER|DEFER_TASKRUN"},
    };
    for (size_t r = 0; r < sizeof(runs) / sizeof(runs[0]); r++) {
        pthread_t t;
        mode = runs[r].mode;
        ring_flags = runs[r].flags;
        struct timespec a, b;
        uint64_t one = 1, v;

        efd_in = eventfd(0, 0);
        /* Non-blocking, like QEMU's and our own eventfds: io_uring can then
         * issue the write inline instead of punting it to an io-wq worker. */
        efd_out = eventfd(0, EFD_NONBLOCK);
        pin(cpu_peer);
        pthread_create(&t, NULL, loop, NULL);
        usleep(10000);
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < iters; i++) {
            struct pollfd pfd = {.fd = efd_out, .events = POLLIN};
            if (write(efd_in, &one, 8) != 8)
                abort();
            while (read(efd_out, &v, 8) != 8)
                poll(&pfd, 1, -1);
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        pthread_join(t, NULL);
        close(efd_in);
        close(efd_out);
        printf("%-52s %8.0f ns per round trip\n", runs[r].name,
               ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / iters);
    }
    return 0;
}
