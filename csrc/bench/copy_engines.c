/*
 * copy_engines.c: which engine should copy request bytes between guest RAM
 * and the bounce area?  (issue 4, item 5: "compare copy engines")
 *
 * Both memories are memfds, as in the proxy: "guest" (QEMU's memfd, mapped
 * by the data plane) and "bounce" (fastshadow's shadow region).  One batch =
 * QD copies of BS bytes from random BS-aligned offsets of the guest memfd
 * (large enough not to stay in cache) into distinct slots of the bounce
 * area (the copy-in direction of a write; the copy-back of a read is the
 * same work in the other direction: `--dir out`).  Engines:
 *
 *   memcpy      glibc memcpy between the two mappings, on the calling
 *               thread (what csrc/shadow.c does);
 *   movsb       `rep movsb` (ERMS/FSRM microcode copy);
 *   nt-store    16-byte loads and non-temporal (streaming) stores: the
 *               destination lines are not read first (no read-for-
 *               ownership) and do not evict the cache;
 *   uring       IORING_OP_READ (in) / IORING_OP_WRITE (out) on the guest
 *               memfd at the guest offset, the bounce mapping as the user
 *               buffer: the kernel copies; QD SQEs, one submit-and-wait;
 *   uring-async the same with IOSQE_ASYNC: every copy is handed to an io-wq
 *               worker, so a batch can spread over several CPUs.
 *
 * Prints, per engine and block size: GB/s of wall time, ns per copy, and CPU
 * seconds per GB of the whole process (io-wq workers are threads of it, so
 * getrusage(RUSAGE_SELF) counts them).  Not part of the extension:
 *
 *   gcc -O2 -o /tmp/copy_engines csrc/bench/copy_engines.c -luring
 *   /tmp/copy_engines [--dir in|out] [--qd N] [--cpu C] [--seconds S]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <emmintrin.h>

#define GUEST_BYTES (1024ull << 20)     /* 1 GiB: far beyond any cache */
#define MAX_QD 64

enum engine { E_MEMCPY, E_MOVSB, E_NT, E_URING, E_URING_ASYNC, E_COUNT };
static const char *engine_name[E_COUNT] = {"memcpy", "movsb", "nt-store", "uring",
                                           "uring-async"};

static int guest_fd, bounce_fd;
static uint8_t *guest, *bounce;
static struct io_uring ring;
static int copy_out;                    /* 0: guest -> bounce, 1: bounce -> guest */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void copy_movsb(void *dst, const void *src, size_t n)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

/* dst and src 16-byte aligned, n a multiple of 64 (true for every size here). */
static void copy_nt(void *dst, const void *src, size_t n)
{
    __m128i *d = dst;
    const __m128i *s = src;

    for (size_t i = 0; i < n / 16; i += 4) {
        __m128i a = _mm_load_si128(s + i), b = _mm_load_si128(s + i + 1);
        __m128i c = _mm_load_si128(s + i + 2), e = _mm_load_si128(s + i + 3);
        _mm_stream_si128(d + i, a);
        _mm_stream_si128(d + i + 1, b);
        _mm_stream_si128(d + i + 2, c);
        _mm_stream_si128(d + i + 3, e);
    }
    _mm_sfence();
}

static void die(const char *what, int err)
{
    fprintf(stderr, "copy_engines: %s: %s\n", what, strerror(err));
    exit(1);
}

static uint8_t *map_memfd(const char *name, uint64_t size, int *fd)
{
    void *p;

    *fd = memfd_create(name, MFD_CLOEXEC);
    if (*fd < 0 || ftruncate(*fd, (off_t)size) < 0)
        die("memfd", errno);
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, *fd, 0);
    if (p == MAP_FAILED)
        die("mmap", errno);
    memset(p, 0x5a, size);              /* real pages, not the zero page */
    return p;
}

/* One batch of qd copies; returns bytes moved. */
static uint64_t batch(enum engine e, uint32_t bs, uint32_t qd, uint64_t *rng)
{
    uint64_t nblocks = GUEST_BYTES / bs;
    uint64_t off[MAX_QD];

    for (uint32_t i = 0; i < qd; i++) {
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        off[i] = (*rng >> 17) % nblocks * bs;
    }
    if (e == E_MEMCPY || e == E_MOVSB || e == E_NT) {
        void (*fn)(void *, const void *, size_t) =
            e == E_MEMCPY ? (void (*)(void *, const void *, size_t))memcpy
            : e == E_MOVSB ? copy_movsb : copy_nt;
        for (uint32_t i = 0; i < qd; i++) {
            if (copy_out)
                fn(guest + off[i], bounce + (uint64_t)i * bs, bs);
            else
                fn(bounce + (uint64_t)i * bs, guest + off[i], bs);
        }
        return (uint64_t)qd * bs;
    }
    for (uint32_t i = 0; i < qd; i++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        if (copy_out)
            io_uring_prep_write(sqe, guest_fd, bounce + (uint64_t)i * bs, bs, off[i]);
        else
            io_uring_prep_read(sqe, guest_fd, bounce + (uint64_t)i * bs, bs, off[i]);
        if (e == E_URING_ASYNC)
            sqe->flags |= IOSQE_ASYNC;
    }
    int rc = io_uring_submit_and_wait(&ring, qd);
    if (rc < 0)
        die("io_uring_submit_and_wait", -rc);
    uint64_t bytes = 0;
    for (uint32_t got = 0; got < qd;) {
        struct io_uring_cqe *cqe;
        rc = io_uring_wait_cqe(&ring, &cqe);
        if (rc < 0)
            die("io_uring_wait_cqe", -rc);
        if (cqe->res < 0)
            die("copy", -cqe->res);
        bytes += (uint64_t)cqe->res;
        io_uring_cqe_seen(&ring, cqe);
        got++;
    }
    return bytes;
}

static void run(enum engine e, uint32_t bs, uint32_t qd, double seconds)
{
    uint64_t rng = 42, bytes = 0, copies = 0;
    double t0, c0, t, c;

    batch(e, bs, qd, &rng);             /* warm-up: io-wq workers, page tables */
    t0 = now_s();
    c0 = cpu_s();
    do {
        bytes += batch(e, bs, qd, &rng);
        copies += qd;
    } while (now_s() - t0 < seconds);
    t = now_s() - t0;
    c = cpu_s() - c0;
    printf("%-12s %8u %4u %8.2f %10.0f %10.3f\n", engine_name[e], bs, qd,
           bytes / t / 1e9, t * 1e9 / (double)copies, c / (bytes / 1e9));
}

int main(int argc, char **argv)
{
    static const uint32_t sizes[] = {4096, 65536, 262144, 1048576};
    uint32_t qd = 32;
    int cpu = -1;
    double seconds = 1.0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            copy_out = !strcmp(argv[++i], "out");
        else if (!strcmp(argv[i], "--qd") && i + 1 < argc)
            qd = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cpu") && i + 1 < argc)
            cpu = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--dir in|out] [--qd N] [--cpu C] [--seconds S]\n",
                    argv[0]);
            return 2;
        }
    }
    if (qd < 1 || qd > MAX_QD) {
        fprintf(stderr, "copy_engines: --qd must be 1..%d\n", MAX_QD);
        return 2;
    }
    if (cpu >= 0) {
        cpu_set_t s;
        CPU_ZERO(&s);
        CPU_SET(cpu, &s);
        sched_setaffinity(0, sizeof(s), &s);   /* io-wq workers inherit it */
    }
    guest = map_memfd("copy-engines-guest", GUEST_BYTES, &guest_fd);
    bounce = map_memfd("copy-engines-bounce", (uint64_t)MAX_QD << 20, &bounce_fd);
    int rc = io_uring_queue_init(MAX_QD * 2, &ring, 0);
    if (rc < 0)
        die("io_uring_queue_init", -rc);

    printf("# direction %s, qd %u, cpu %d, %.1f s per point\n",
           copy_out ? "out (bounce -> guest)" : "in (guest -> bounce)", qd, cpu, seconds);
    printf("%-12s %8s %4s %8s %10s %10s\n", "engine", "bytes", "qd", "GB/s", "ns/copy",
           "cpu-s/GB");
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++)
        for (int e = 0; e < E_COUNT; e++)
            run((enum engine)e, sizes[s], qd, seconds);
    return 0;
}
