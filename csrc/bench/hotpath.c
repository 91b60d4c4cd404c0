/*
 * hotpath.c: the data plane's per-request work, driven in-process with no
 * loop thread, for exact counts under valgrind (bench/callgrind.py).
 *
 * One isolated virtio-blk device, one queue, as `fastshadow bench` loads
 * it: the guest side is bench/loadgen.c's driver (slot i = descriptors 3i,
 * 3i+1, 3i+2: a 16-byte header, a block-sized data buffer, a status byte;
 * event idx on), the backend side plays qemu-storage-daemon null-co with
 * read-zeroes (it fills the data buffer of a read, writes status OK).
 * Everything lives in one process; the engine runs inline through
 * fsdp_dev_poll, so its kicks and calls are write(2)s on eventfds (counted
 * as calls to `write` by callgrind; the loop thread sends them as io_uring
 * writes instead).
 *
 * One round: the guest refills every free slot and publishes the avail idx
 * once; the engine polls; the backend completes `batch` requests (oldest
 * first) and publishes its used idx; the engine polls; the guest harvests.
 * Counting is meant to cover only the engine: run with
 *   valgrind --tool=callgrind --toggle-collect=queue_process
 *            --toggle-collect=queue_notify ./hotpath ...
 * and divide by the requests printed at the end.
 *
 *   gcc -O2 -g -Icsrc -o hotpath csrc/bench/hotpath.c csrc/[a-z]*.c -luring -lpthread
 *   ./hotpath [requests] [qd] [batch] [block] [read|write]
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fsdp.h"

#define NUM 256u
#define UADDR 0x7f0000000000ull
#define DESC_OFF 0x0ull
#define AVAIL_OFF 0x1000ull
#define USED_OFF 0x2000ull
#define SLOTS_OFF 0x10000ull

static uint8_t *guest, *shadow;
static uint32_t qd, batch, block;
static int is_read;

static void die(const char *what, int rc)
{
    fprintf(stderr, "hotpath: %s: %d\n", what, rc);
    exit(1);
}

/* Guest layout of slot i: header at hdr(i), status at hdr(i) + 16, data at data(i). */
static uint64_t hdr_gpa(uint32_t i) { return SLOTS_OFF + 64ull * i; }
static uint64_t data_gpa(uint32_t i) { return SLOTS_OFF + 0x10000ull + (uint64_t)i * block; }

static uint16_t *u16(uint8_t *base, uint64_t off) { return (uint16_t *)(base + off); }

static void put_desc(uint32_t d, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    uint8_t *p = guest + DESC_OFF + 16ull * d;
    memcpy(p, &addr, 8);
    memcpy(p + 8, &len, 4);
    memcpy(p + 12, &flags, 2);
    memcpy(p + 14, &next, 2);
}

/* --- guest driver ------------------------------------------------------- */
static uint16_t g_avail, g_last_used;
static uint32_t g_free[NUM], g_nfree;
static uint64_t g_done;

static void guest_refill(uint64_t *budget)
{
    while (g_nfree && *budget) {
        uint32_t slot = g_free[--g_nfree];
        uint32_t d = 3 * slot;
        put_desc(d, hdr_gpa(slot), 16, 1, (uint16_t)(d + 1));
        put_desc(d + 1, data_gpa(slot), block, is_read ? 3 : 1, (uint16_t)(d + 2));
        put_desc(d + 2, hdr_gpa(slot) + 16, 1, 2, 0);
        uint32_t type = is_read ? 0 : 1;
        memcpy(guest + hdr_gpa(slot), &type, 4);
        *u16(guest, AVAIL_OFF + 4 + 2ull * (g_avail % NUM)) = (uint16_t)d;
        g_avail++;
        (*budget)--;
    }
    __atomic_store_n(u16(guest, AVAIL_OFF + 2), g_avail, __ATOMIC_RELEASE);
}

static void guest_harvest(void)
{
    uint16_t used = __atomic_load_n(u16(guest, USED_OFF + 2), __ATOMIC_ACQUIRE);
    for (; g_last_used != used; g_last_used++) {
        uint8_t *e = guest + USED_OFF + 4 + 8ull * (g_last_used % NUM);
        uint32_t id;
        memcpy(&id, e, 4);
        if (id % 3 || id / 3 >= qd || guest[hdr_gpa(id / 3) + 16] != 0)
            die("bad completion", (int)id);
        g_free[g_nfree++] = id / 3;
        g_done++;
    }
    /* used_event: interrupt at the next completion (as loadgen when it sleeps) */
    *u16(guest, AVAIL_OFF + 4 + 2ull * NUM) = g_last_used;
}

/* --- backend (qsd null-co, read-zeroes) --------------------------------- */
static uint64_t s_desc, s_avail, s_used;   /* offsets in the shadow region */
static uint16_t b_last_avail, b_used;
static uint16_t b_pending[NUM];
static uint32_t b_npending;

static uint8_t *shadow_ptr(uint64_t gpa) { return shadow + (gpa - FSDP_SHADOW_GPA_BASE); }

static void backend_take(void)
{
    uint16_t avail = __atomic_load_n(u16(shadow, s_avail + 2), __ATOMIC_ACQUIRE);
    for (; b_last_avail != avail; b_last_avail++)
        b_pending[b_npending++] = *u16(shadow, s_avail + 4 + 2ull * (b_last_avail % NUM));
    /* avail_event: kick at the next entry */
    *u16(shadow, s_used + 4 + 8ull * NUM) = b_last_avail;
}

static void backend_complete(uint32_t n)
{
    uint32_t i;

    for (i = 0; i < n && i < b_npending; i++) {
        uint16_t head = b_pending[i], d = head;
        uint32_t written = 0;
        for (;;) {
            uint8_t *p = shadow + s_desc + 16ull * d;
            uint64_t addr;
            uint32_t len;
            uint16_t flags, next;
            memcpy(&addr, p, 8);
            memcpy(&len, p + 8, 4);
            memcpy(&flags, p + 12, 2);
            memcpy(&next, p + 14, 2);
            if (flags & 2) {
                if (len == 1)
                    *shadow_ptr(addr) = 0;          /* VIRTIO_BLK_S_OK */
                else
                    memset(shadow_ptr(addr), 0, len);
                written += len;
            }
            if (!(flags & 1))
                break;
            d = next;
        }
        uint8_t *e = shadow + s_used + 4 + 8ull * (b_used % NUM);
        uint32_t id = head;
        memcpy(e, &id, 4);
        memcpy(e + 4, &written, 4);
        b_used++;
    }
    memmove(b_pending, b_pending + i, (b_npending - i) * sizeof(b_pending[0]));
    b_npending -= i;
    __atomic_store_n(u16(shadow, s_used + 2), b_used, __ATOMIC_RELEASE);
}

int main(int argc, char **argv)
{
    uint64_t requests = argc > 1 ? strtoull(argv[1], NULL, 0) : 100000;
    qd = argc > 2 ? (uint32_t)atoi(argv[2]) : 32;
    batch = argc > 3 ? (uint32_t)atoi(argv[3]) : qd;
    block = argc > 4 ? (uint32_t)atoi(argv[4]) : 4096;
    is_read = argc > 5 ? strcmp(argv[5], "write") != 0 : 1;
    if (qd == 0 || 3 * qd > NUM || batch == 0)
        die("qd must be 1..85, batch > 0", 0);

    struct fsdp_dp_config dcfg = {.stream_copy_min = 65536};
    struct fsdp_dp *dp;
    int rc = fsdp_dp_new(&dcfg, &dp);
    if (rc)
        die("dp_new", rc);
    struct fsdp_dev_config cfg = {.num_queues = 1, .max_queue_size = NUM,
                                  .failure = FSDP_FAIL_BLK_STATUS, .min_readable = 16,
                                  .min_writable = 1, .bounce_per_queue = 16u << 20};
    struct fsdp_dev *dev;
    if ((rc = fsdp_dev_add(dp, "hotpath", &cfg, &dev)))
        die("dev_add", rc);
    struct fsdp_dev_info info;
    fsdp_dev_info(dev, &info);

    uint64_t gsize = SLOTS_OFF + 0x10000ull + (uint64_t)qd * block + 0x10000;
    gsize = (gsize + 0xfff) & ~0xfffull;
    int gfd = memfd_create("hotpath-guest", MFD_CLOEXEC);
    if (gfd < 0 || ftruncate(gfd, (off_t)gsize))
        die("memfd", -1);
    guest = mmap(NULL, gsize, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
    shadow = mmap(NULL, info.shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED, info.shadow_fd, 0);
    if (guest == MAP_FAILED || shadow == MAP_FAILED)
        die("mmap", -1);
    struct fsdp_mem_region reg = {.gpa = 0, .size = gsize, .uaddr = UADDR, .fd = gfd};
    if ((rc = fsdp_dev_set_mem_table(dev, &reg, 1)))
        die("mem table", rc);
    if ((rc = fsdp_queue_set_num(dev, 0, NUM)) || (rc = fsdp_queue_set_base(dev, 0, 0)) ||
        (rc = fsdp_queue_set_addr(dev, 0, UADDR + DESC_OFF, UADDR + AVAIL_OFF, UADDR + USED_OFF)))
        die("queue setup", rc);
    int call = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if ((rc = fsdp_queue_set_guest_kick(dev, 0, -1)) || (rc = fsdp_queue_set_guest_call(dev, 0, call)))
        die("queue fds", rc);
    uint64_t d, a, u;
    if ((rc = fsdp_queue_shadow_addrs(dev, 0, &d, &a, &u)))
        die("shadow addrs", rc);
    s_desc = d - FSDP_SHADOW_UADDR_BASE;
    s_avail = a - FSDP_SHADOW_UADDR_BASE;
    s_used = u - FSDP_SHADOW_UADDR_BASE;
    if ((rc = fsdp_queue_start(dev, 0, FSDP_QF_GUEST_EVENT_IDX | FSDP_QF_BACKEND_EVENT_IDX)))
        die("start", rc);

    for (uint32_t i = 0; i < qd; i++)
        g_free[g_nfree++] = qd - 1 - i;
    uint64_t left = requests, rounds = 0;
    uint32_t flags;
    while (g_done < requests) {
        guest_refill(&left);
        fsdp_dev_poll(dev, &flags);        /* intake */
        backend_take();
        backend_complete(batch);
        fsdp_dev_poll(dev, &flags);        /* harvest (+ intake of nothing new) */
        guest_harvest();
        rounds++;
        if (rounds > 4 * requests + 100)
            die("stalled", (int)g_done);
    }
    struct fsdp_queue_stats st;
    fsdp_queue_stats(dev, 0, &st);
    printf("{\"requests\": %llu, \"rounds\": %llu, \"qd\": %u, \"batch\": %u, \"block\": %u, "
           "\"op\": \"%s\", \"backend_kicks\": %llu, \"guest_calls\": %llu, "
           "\"completed\": %llu, \"failed\": %llu}\n",
           (unsigned long long)g_done, (unsigned long long)rounds, qd, batch, block,
           is_read ? "read" : "write", (unsigned long long)st.backend_kicks,
           (unsigned long long)st.guest_calls, (unsigned long long)st.completed,
           (unsigned long long)st.failed);
    fsdp_dp_free(dp);
    return st.failed || st.completed != g_done;
}
