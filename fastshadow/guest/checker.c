/*
 * fastshadow guest data checker.
 *
 * Runs inside the test guest (statically linked, no libc beyond glibc.a) and
 * checks that a block device behind a vhost-user chain returns exactly the
 * data that was written to it.  It is deliberately nasty to the data path:
 *
 *  - O_DIRECT writes of many sizes (powers of two and odd multiples of 512)
 *    at 512-byte aligned offsets of which a good share is NOT 4 KiB aligned,
 *    from user buffers that are 512-aligned but often not page aligned, so
 *    that guest descriptors straddle pages in odd ways;
 *  - an O_DIRECT read-back of every extent written;
 *  - a buffered pass at byte-unaligned offsets and lengths (the page cache
 *    then does read-modify-write of partial sectors), fsync, cache drop,
 *    buffered re-read and an O_DIRECT re-read of the enclosing sectors.
 *
 * The data written at absolute device byte p by write number `op` is a pure
 * function of (seed, generation, op, p).  Because the pattern depends on the
 * absolute position, misdirected I/O is caught; because it depends on the op
 * number, a lost write that overlaps an earlier one is caught; because it
 * depends on the generation (the guest passes its boot count), stale data
 * surviving from a previous boot is caught.
 *
 * Output: exactly one final marker line
 *     FASTSHADOW-CHECK PASS tag=<tag> written=<bytes> ops=<n>
 *     FASTSHADOW-CHECK FAIL tag=<tag> <reason>
 * and exit status 0 / 1.  Progress and diagnostics go to stderr.
 *
 * `checker --bootcount DEVICE` instead increments a boot counter kept in the
 * last 4 KiB of the device and prints `FASTSHADOW-BOOT count=<n>`.
 *
 * `checker --expect-eio BYTES DEVICE` checks a refusal path instead: it
 * writes and reads back 4 KiB blocks (which must work), then reads BYTES at
 * once with O_DIRECT, which a proxy capping requests below BYTES must fail:
 * PASS only if that read fails with EIO.  A read that "succeeds" would hand
 * the program whatever the buffer held before (stale data): FAIL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "marker.h"

#define SECTOR 512u
#define PAGE 4096u
#define BOOT_AREA 4096u
#define BOOT_MAGIC "FSBOOT01"

/* Upper bound for the per-sector owner map: 8 GiB region = 64 MiB of map. */
#define MAX_REGION_SECTORS (16u * 1024u * 1024u)

static const char *g_tag = "q0";

/* ------------------------------------------------------------------ output */

/* Every failure path ends here: exactly one marker line (marker.h). */
static void __attribute__((noreturn, format(printf, 1, 2)))
fail(const char *fmt, ...)
{
    char head[96];
    va_list ap;

    snprintf(head, sizeof(head), "FASTSHADOW-CHECK FAIL tag=%s ", g_tag);
    va_start(ap, fmt);
    marker_fail(head, fmt, ap);
}

static void __attribute__((format(printf, 1, 2)))
note(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof(line), "checker[%s]: ", g_tag);
    va_list ap;

    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof(line))
        n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(line) - 1)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    if (write(STDERR_FILENO, line, (size_t)n) < 0) {
        /* Nothing sensible to do if stderr is gone. */
    }
}

/* ----------------------------------------------------------------- pattern */

/* splitmix64 finaliser: a cheap, well-mixing 64-bit bijection. */
static inline uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
    r->s += 0x9e3779b97f4a7c15ull;
    return mix64(r->s);
}

/* Uniform-ish value in [0, n); n == 0 yields 0. The modulo bias is irrelevant here. */
static uint64_t rng_below(struct rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

static uint64_t g_seed = 1, g_gen = 1;

/* Key of one write: all its bytes derive from this and the absolute offset. */
static uint64_t op_key(uint32_t op)
{
    return mix64(mix64(mix64(g_seed) ^ g_gen) ^ op);
}

static inline uint8_t pattern_byte(uint64_t key, uint64_t pos)
{
    return (uint8_t)(mix64(key ^ (pos >> 3)) >> (8 * (pos & 7)));
}

/* Fill buf with the pattern of write `key` for absolute offsets [pos, pos+len). */
static void fill_pattern(uint8_t *buf, uint64_t pos, size_t len, uint64_t key)
{
    size_t i = 0;

    while (i < len && ((pos + i) & 7))
        buf[i] = pattern_byte(key, pos + i), i++;
    for (; i + 8 <= len; i += 8) {
        uint64_t w = mix64(key ^ ((pos + i) >> 3));
        /* Store little-endian explicitly so the pattern does not depend on the host. */
        for (unsigned b = 0; b < 8; b++)
            buf[i + b] = (uint8_t)(w >> (8 * b));
    }
    for (; i < len; i++)
        buf[i] = pattern_byte(key, pos + i);
}

/* ------------------------------------------------------------------- model */

/*
 * What the region should contain.  Direct writes are sector granular, so a
 * per-sector "last writer" map is exact for them (0 = never written in this
 * run, content unknown).  Buffered writes are byte granular but are placed so
 * that they never overlap each other; they are kept as a sorted list that
 * overrides the sector map.
 */
struct bextent {
    uint64_t off, len;
    uint32_t op;
};

struct model {
    uint64_t base;   /* absolute offset of the region */
    uint64_t nsect;  /* sectors in the region */
    uint32_t *owner; /* per-sector last direct writer */
    struct bextent *bx;
    size_t nbx;
};

/*
 * Build in `exp` what [pos, pos+len) should read as.  Bytes whose content is
 * unknown are copied from `got`, so that a plain memcmp() afterwards compares
 * only what the model knows.
 */
static void model_expect(const struct model *m, uint8_t *exp, const uint8_t *got,
                         uint64_t pos, size_t len)
{
    size_t i = 0;

    while (i < len) {
        uint64_t p = pos + i;
        uint64_t s = (p - m->base) / SECTOR;
        size_t run = (size_t)(SECTOR - (p - m->base) % SECTOR);
        uint32_t op = m->owner[s];

        if (run > len - i)
            run = len - i;
        if (op)
            fill_pattern(exp + i, p, run, op_key(op));
        else
            memcpy(exp + i, got + i, run);
        i += run;
    }

    /* Overlay the buffered extents intersecting the range (binary search for the first). */
    size_t lo = 0, hi = m->nbx;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (m->bx[mid].off + m->bx[mid].len <= pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t k = lo; k < m->nbx && m->bx[k].off < pos + len; k++) {
        uint64_t a = m->bx[k].off > pos ? m->bx[k].off : pos;
        uint64_t b = m->bx[k].off + m->bx[k].len;
        if (b > pos + len)
            b = pos + len;
        fill_pattern(exp + (a - pos), a, (size_t)(b - a), op_key(m->bx[k].op));
    }
}

/* Which write should own absolute byte p (for failure messages); 0 if unknown. */
static uint32_t model_owner(const struct model *m, uint64_t p)
{
    for (size_t k = 0; k < m->nbx; k++)
        if (p >= m->bx[k].off && p < m->bx[k].off + m->bx[k].len)
            return m->bx[k].op;
    return m->owner[(p - m->base) / SECTOR];
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/*
 * Compare `got` (read from [pos, pos+len)) against the model; on mismatch
 * report the first differing byte with enough context to find it again.
 */
static void verify(const struct model *m, const char *phase, uint8_t *exp, const uint8_t *got,
                   uint64_t pos, size_t len, uint32_t op, uint64_t ext_off, uint64_t ext_len)
{
    model_expect(m, exp, got, pos, len);
    if (memcmp(exp, got, len) == 0)
        return;

    size_t i = 0;
    while (exp[i] == got[i])
        i++;
    uint64_t bad = pos + i;
    uint64_t sec = bad - (bad - m->base) % SECTOR;
    size_t sec_start = sec > pos ? (size_t)(sec - pos) : 0;
    size_t sec_len = len - sec_start < SECTOR ? len - sec_start : SECTOR;
    size_t ndiff = 0;
    for (size_t j = i; j < len; j++)
        ndiff += exp[j] != got[j];
    fail("phase=%s offset=%" PRIu64 " expected=0x%02x got=0x%02x owner-op=%" PRIu32
         " extent=%" PRIu64 "+%" PRIu64 " (op %" PRIu32 ") differing-bytes-in-read=%zu%s",
         phase, bad, exp[i], got[i], model_owner(m, bad), ext_off, ext_len, op, ndiff,
         all_zero(got + sec_start, sec_len) ? " sector-reads-as-zeros" : "");
}

/* --------------------------------------------------------------------- I/O */

static void pwrite_full(int fd, const void *buf, size_t len, uint64_t off, const char *what)
{
    const uint8_t *p = buf;

    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("phase=%s pwrite offset=%" PRIu64 " len=%zu: %s", what, off, len,
                 n < 0 ? strerror(errno) : "wrote 0 bytes");
        p += n, len -= (size_t)n, off += (uint64_t)n;
    }
}

static void pread_full(int fd, void *buf, size_t len, uint64_t off, const char *what)
{
    uint8_t *p = buf;

    while (len) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("phase=%s pread offset=%" PRIu64 " len=%zu: %s", what, off, len,
                 n < 0 ? strerror(errno) : "unexpected end of device");
        p += n, len -= (size_t)n, off += (uint64_t)n;
    }
}

static uint64_t device_size(int fd, const char *dev)
{
    struct stat st;
    uint64_t size = 0;

    if (fstat(fd, &st) < 0)
        fail("fstat %s: %s", dev, strerror(errno));
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            fail("BLKGETSIZE64 %s: %s", dev, strerror(errno));
        return size;
    }
    if (S_ISREG(st.st_mode))
        return (uint64_t)st.st_size;
    fail("%s is neither a block device nor a regular file", dev);
}

static int open_dev(const char *dev, int flags)
{
    int fd = open(dev, flags | O_RDWR | O_CLOEXEC);

    if (fd < 0)
        fail("open %s%s: %s", dev, (flags & O_DIRECT) ? " with O_DIRECT" : "", strerror(errno));
    return fd;
}

static uint8_t *alloc_aligned(size_t len)
{
    void *p = NULL;
    int err = posix_memalign(&p, PAGE, len);

    if (err)
        fail("cannot allocate %zu bytes: %s", len, strerror(err));
    return p;
}

/* ---------------------------------------------------------------- options */

struct opts {
    uint64_t offset, length, total, min, max;
    bool have_length;
    int cpu;
    unsigned buffered_ops;
    bool drop_caches, corrupt, bootcount;
    uint64_t expect_eio;
    const char *dev;
};

static uint64_t parse_size(const char *opt, const char *s)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-')
        fail("bad value for %s: '%s'", opt, s);
    switch (*end) {
    case 'k': case 'K': v <<= 10, end++; break;
    case 'm': case 'M': v <<= 20, end++; break;
    case 'g': case 'G': v <<= 30, end++; break;
    default: break;
    }
    if (*end == 'i' && end[1] == 'B')
        end += 2;
    else if (*end == 'B')
        end++;
    if (*end)
        fail("bad value for %s: '%s'", opt, s);
    return v;
}

static void __attribute__((noreturn)) usage_fail(const char *why)
{
    fail("usage: %s; checker [--offset B] [--length B] [--total B] [--min B] [--max B] "
         "[--seed N] [--gen N] [--cpu N] [--tag T] [--buffered-ops N] [--drop-caches] "
         "[--corrupt-after-write] DEVICE | checker --bootcount DEVICE | checker --expect-eio B DEVICE", why);
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){ .offset = 0, .total = 16u << 20, .min = SECTOR, .max = 1u << 20,
                        .cpu = -1, .buffered_ops = 32 };

    /* The tag is set first so that errors about other options already carry it. */
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--tag"))
            g_tag = argv[i + 1];

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
#define VAL() (has_val ? argv[++i] : (usage_fail("missing value"), ""))
        if (!strcmp(a, "--offset"))
            o->offset = parse_size(a, VAL());
        else if (!strcmp(a, "--length"))
            o->length = parse_size(a, VAL()), o->have_length = true;
        else if (!strcmp(a, "--total"))
            o->total = parse_size(a, VAL());
        else if (!strcmp(a, "--min"))
            o->min = parse_size(a, VAL());
        else if (!strcmp(a, "--max"))
            o->max = parse_size(a, VAL());
        else if (!strcmp(a, "--seed"))
            g_seed = parse_size(a, VAL());
        else if (!strcmp(a, "--gen"))
            g_gen = parse_size(a, VAL());
        else if (!strcmp(a, "--cpu"))
            o->cpu = (int)parse_size(a, VAL());
        else if (!strcmp(a, "--tag"))
            g_tag = VAL();
        else if (!strcmp(a, "--buffered-ops"))
            o->buffered_ops = (unsigned)parse_size(a, VAL());
        else if (!strcmp(a, "--drop-caches"))
            o->drop_caches = true;
        else if (!strcmp(a, "--corrupt-after-write"))
            o->corrupt = true;
        else if (!strcmp(a, "--expect-eio"))
            o->expect_eio = parse_size(a, VAL());
        else if (!strcmp(a, "--bootcount"))
            o->bootcount = true;
        else if (a[0] == '-' && a[1])
            usage_fail("unknown option");
        else if (o->dev)
            usage_fail("more than one device given");
        else
            o->dev = a;
#undef VAL
    }
    if (!o->dev)
        usage_fail("no device given");
}

/* ------------------------------------------------------------ boot counter */

struct boot_record {
    char magic[8];
    uint32_t count;
    uint32_t count_inv; /* ~count: distinguishes a real record from garbage */
};

static int bootcount(const char *dev)
{
    int fd = open(dev, O_RDWR | O_DIRECT | O_CLOEXEC);
    uint8_t *buf;
    struct boot_record rec;
    uint64_t size, off;
    uint32_t count = 0;

#define BOOT_FAIL(...) do { printf("FASTSHADOW-BOOT FAIL " __VA_ARGS__); putchar('\n'); return 1; } while (0)
    if (fd < 0)
        BOOT_FAIL("open %s: %s", dev, strerror(errno));
    {
        struct stat st;
        if (fstat(fd, &st) < 0)
            BOOT_FAIL("fstat %s: %s", dev, strerror(errno));
        if (S_ISBLK(st.st_mode)) {
            if (ioctl(fd, BLKGETSIZE64, &size) < 0)
                BOOT_FAIL("BLKGETSIZE64 %s: %s", dev, strerror(errno));
        } else {
            size = (uint64_t)st.st_size;
        }
    }
    if (size < 2 * BOOT_AREA)
        BOOT_FAIL("device %s too small (%" PRIu64 " bytes)", dev, size);
    off = (size - BOOT_AREA) & ~(uint64_t)(SECTOR - 1);
    buf = alloc_aligned(BOOT_AREA);
    if (pread(fd, buf, BOOT_AREA, (off_t)off) != (ssize_t)BOOT_AREA)
        BOOT_FAIL("read boot record at %" PRIu64 ": %s", off, strerror(errno));
    memcpy(&rec, buf, sizeof(rec));
    if (!memcmp(rec.magic, BOOT_MAGIC, sizeof(rec.magic))) {
        if (rec.count_inv != ~rec.count)
            BOOT_FAIL("corrupted boot record at %" PRIu64 " (count=%" PRIu32 " check=%" PRIu32 ")",
                      off, rec.count, rec.count_inv);
        count = rec.count;
    }
    /* Anything else (a fresh, zeroed disk) counts as "never booted". */
    count++;
    memset(buf, 0, BOOT_AREA);
    memcpy(rec.magic, BOOT_MAGIC, sizeof(rec.magic));
    rec.count = count;
    rec.count_inv = ~count;
    memcpy(buf, &rec, sizeof(rec));
    if (pwrite(fd, buf, BOOT_AREA, (off_t)off) != (ssize_t)BOOT_AREA)
        BOOT_FAIL("write boot record at %" PRIu64 ": %s", off, strerror(errno));
    /* The guest reboots with `reboot -f` right after: the record must be durable. */
    if (fdatasync(fd) < 0)
        BOOT_FAIL("fdatasync %s: %s", dev, strerror(errno));
    printf("FASTSHADOW-BOOT count=%" PRIu32 "\n", count);
#undef BOOT_FAIL
    free(buf);
    close(fd);
    return 0;
}

/* ------------------------------------------------------------------ checks */

/* A write size from [min, max]: half powers of two, half odd multiples of 512. */
static size_t pick_size(struct rng *r, uint64_t min, uint64_t max)
{
    if (rng_next(r) & 1) {
        uint64_t pows[64];
        unsigned n = 0;
        for (uint64_t p = SECTOR; p && p <= max; p <<= 1)
            if (p >= min)
                pows[n++] = p;
        if (n)
            return (size_t)pows[rng_below(r, n)];
    }
    uint64_t kmin = min / SECTOR, kmax = max / SECTOR;
    uint64_t k = kmin + rng_below(r, kmax - kmin + 1);
    if (!(k & 1))
        k = (k + 1 <= kmax) ? k + 1 : (k > kmin ? k - 1 : k);
    return (size_t)(k * SECTOR);
}

/*
 * A 512-aligned offset for `size` bytes inside [base, base+len).  Half of the
 * time 4 KiB aligned, otherwise deliberately not 4 KiB aligned: backends and
 * proxies that silently assume page alignment break on the latter.
 */
static uint64_t pick_offset(struct rng *r, uint64_t base, uint64_t len, size_t size)
{
    uint64_t first = base / SECTOR, last = (base + len - size) / SECTOR;
    uint64_t s = first + rng_below(r, last - first + 1);
    const uint64_t spp = PAGE / SECTOR;

    if (rng_next(r) & 1) {
        uint64_t a = s - s % spp;
        if (a >= first)
            s = a;
        else if (a + spp <= last)
            s = a + spp;
    } else if (s % spp == 0) {
        uint64_t d = 1 + rng_below(r, spp - 1);
        if (s + d <= last)
            s += d;
        else if (s >= first + 1)
            s -= 1;
    }
    return s * SECTOR;
}

static void drop_caches(int fd, bool global)
{
    /* Drop this device's clean pages so the re-read really goes to the device. */
    int err = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    if (err)
        note("posix_fadvise(DONTNEED): %s", strerror(err));
    if (!global)
        return;
    /* In the guest also drop everything else; failure only weakens the check. */
    int dfd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
    if (dfd < 0 || write(dfd, "3\n", 2) != 2)
        note("cannot write /proc/sys/vm/drop_caches: %s", strerror(errno));
    if (dfd >= 0)
        close(dfd);
}

struct dextent {
    uint64_t off;
    uint32_t len;
    uint32_t op;
};

static int run_checks(const struct opts *o)
{
    int dfd = open_dev(o->dev, O_DIRECT);
    uint64_t size = device_size(dfd, o->dev);
    uint64_t base = o->offset, len = o->have_length ? o->length : (size > base ? size - base : 0);
    uint64_t min = o->min, max = o->max;
    struct rng rng = { mix64(g_seed ^ mix64(g_gen ^ mix64(base))) };
    uint64_t written = 0, ops = 0;

    if (base % SECTOR || len % SECTOR)
        fail("offset %" PRIu64 " and length %" PRIu64 " must be multiples of 512", base, len);
    if (len == 0 || base + len > size || base + len < base)
        fail("region %" PRIu64 "+%" PRIu64 " does not fit in %s (%" PRIu64 " bytes)", base, len,
             o->dev, size);
    if (len / SECTOR > MAX_REGION_SECTORS)
        fail("region of %" PRIu64 " bytes too large (max %u sectors)", len, MAX_REGION_SECTORS);
    if (min % SECTOR || max % SECTOR || min == 0 || min > max)
        fail("--min %" PRIu64 " / --max %" PRIu64 " must be non-zero multiples of 512, min <= max",
             min, max);
    if (max > len)
        max = len;
    if (min > max)
        min = max;
    if (max > UINT32_MAX / 2)
        fail("--max %" PRIu64 " too large", max);

    if (o->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(o->cpu, &set);
        /* Pinned instances on different CPUs drive different blk-mq queues. */
        if (sched_setaffinity(0, sizeof(set), &set) < 0)
            fail("sched_setaffinity(cpu %d): %s", o->cpu, strerror(errno));
    }

    struct model m = { .base = base, .nsect = len / SECTOR };
    m.owner = calloc(m.nsect, sizeof(*m.owner));
    /* One extra page so the buffer can start at any 512-byte offset within a page. */
    uint8_t *wbuf = alloc_aligned(max + PAGE), *rbuf = alloc_aligned(max + 2 * PAGE),
            *ebuf = alloc_aligned(max + 2 * PAGE);
    size_t cap = 1024, nd = 0;
    struct dextent *dx = malloc(cap * sizeof(*dx));
    if (!m.owner || !dx)
        fail("out of memory for a %" PRIu64 "-byte region", len);

    note("device=%s region=%" PRIu64 "+%" PRIu64 " total=%" PRIu64 " size=%" PRIu64 "..%" PRIu64
         " seed=%" PRIu64 " gen=%" PRIu64 " cpu=%d",
         o->dev, base, len, o->total, min, max, g_seed, g_gen, o->cpu);

    /* Phase 1: O_DIRECT writes. */
    while (written < o->total) {
        size_t sz = pick_size(&rng, min, max);
        uint64_t off = pick_offset(&rng, base, len, sz);
        /* Half the buffers start off page alignment (still 512-aligned for O_DIRECT). */
        uint8_t *b = wbuf + ((rng_next(&rng) & 1) ? SECTOR * rng_below(&rng, PAGE / SECTOR) : 0);
        uint32_t op = (uint32_t)++ops;

        if (ops >= UINT32_MAX / 2)
            fail("too many operations");
        fill_pattern(b, off, sz, op_key(op));
        pwrite_full(dfd, b, sz, off, "direct-write");
        for (uint64_t s = (off - base) / SECTOR; s < (off - base + sz) / SECTOR; s++)
            m.owner[s] = op;
        if (nd == cap) {
            cap *= 2;
            dx = realloc(dx, cap * sizeof(*dx));
            if (!dx)
                fail("out of memory for the extent list");
        }
        dx[nd++] = (struct dextent){ off, (uint32_t)sz, op };
        written += sz;
    }

    if (o->corrupt) {
        /*
         * Test hook: flip one byte behind the checker's back, as a broken data
         * path would, to prove the read-back catches it.  Pick a byte whose
         * sector is still owned by a write so the model knows its value.
         */
        const struct dextent *e = &dx[rng_below(&rng, nd)];
        uint64_t p = e->off + rng_below(&rng, e->len);
        uint64_t sec = p - (p - base) % SECTOR;
        pread_full(dfd, rbuf, SECTOR, sec, "corrupt");
        rbuf[p - sec] ^= 0x5a;
        pwrite_full(dfd, rbuf, SECTOR, sec, "corrupt");
        note("test hook: corrupted byte at offset=%" PRIu64, p);
    }

    /* Phase 2: O_DIRECT read-back of every extent, into a differently aligned buffer. */
    for (size_t k = 0; k < nd; k++) {
        uint8_t *b = rbuf + SECTOR * (k % (PAGE / SECTOR));
        pread_full(dfd, b, dx[k].len, dx[k].off, "direct-readback");
        verify(&m, "direct-readback", ebuf, b, dx[k].off, dx[k].len, dx[k].op, dx[k].off,
               dx[k].len);
    }

    /* Phase 3: buffered writes at byte granularity, in disjoint chunks of the region. */
    unsigned nb = o->buffered_ops;
    if (nb && len / nb < 64)
        nb = (unsigned)(len / 64);
    if (nb) {
        int bfd = open_dev(o->dev, 0);
        uint64_t chunk = len / nb;
        uint64_t bmax = max < (128u << 10) ? max : (128u << 10);
        if (bmax > chunk / 2)
            bmax = chunk / 2;
        m.bx = calloc(nb, sizeof(*m.bx));
        if (!m.bx)
            fail("out of memory");
        for (unsigned k = 0; k < nb; k++) {
            uint64_t l = 1 + rng_below(&rng, bmax);
            uint64_t off = base + k * chunk + rng_below(&rng, chunk / 2);
            uint32_t op = (uint32_t)++ops;
            fill_pattern(wbuf, off, (size_t)l, op_key(op));
            pwrite_full(bfd, wbuf, (size_t)l, off, "buffered-write");
            m.bx[m.nbx++] = (struct bextent){ off, l, op };
            written += l;
        }
        if (fsync(bfd) < 0)
            fail("phase=buffered-write fsync: %s", strerror(errno));
        drop_caches(bfd, o->drop_caches);

        /* Buffered re-read: exactly the bytes written (page cache refilled from the device). */
        for (size_t k = 0; k < m.nbx; k++) {
            pread_full(bfd, rbuf, (size_t)m.bx[k].len, m.bx[k].off, "buffered-reread");
            verify(&m, "buffered-reread", ebuf, rbuf, m.bx[k].off, (size_t)m.bx[k].len,
                   m.bx[k].op, m.bx[k].off, m.bx[k].len);
        }
        /*
         * O_DIRECT re-read of the enclosing sectors: proves the bytes are on
         * the device and that the partial-sector read-modify-write kept the
         * neighbouring bytes written in phase 1.
         */
        for (size_t k = 0; k < m.nbx; k++) {
            uint64_t a = m.bx[k].off - (m.bx[k].off - base) % SECTOR;
            uint64_t e = m.bx[k].off + m.bx[k].len;
            e += (SECTOR - (e - base) % SECTOR) % SECTOR;
            pread_full(dfd, rbuf, (size_t)(e - a), a, "buffered-direct-reread");
            verify(&m, "buffered-direct-reread", ebuf, rbuf, a, (size_t)(e - a), m.bx[k].op,
                   m.bx[k].off, m.bx[k].len);
        }
        close(bfd);
    }

    close(dfd);
    printf("FASTSHADOW-CHECK PASS tag=%s written=%" PRIu64 " ops=%" PRIu64 "\n", g_tag, written,
           ops);
    fflush(stdout);
    free(m.owner);
    free(m.bx);
    free(dx);
    free(wbuf);
    free(rbuf);
    free(ebuf);
    return 0;
}

/* --expect-eio: small O_DIRECT I/O works, one large read fails with EIO. */
static int expect_eio(const struct opts *o)
{
    int fd = open_dev(o->dev, O_DIRECT);
    uint64_t big = o->expect_eio;
    uint8_t *wbuf = alloc_aligned(PAGE), *rbuf = alloc_aligned(big);

    for (uint32_t i = 0; i < 16; i++) {
        memset(wbuf, 0x30 + i, PAGE);
        if (pwrite(fd, wbuf, PAGE, (off_t)i * PAGE) != (ssize_t)PAGE)
            fail("4 KiB O_DIRECT write at %u: %s", i * PAGE, strerror(errno));
        memset(rbuf, 0, PAGE);
        if (pread(fd, rbuf, PAGE, (off_t)i * PAGE) != (ssize_t)PAGE || memcmp(rbuf, wbuf, PAGE))
            fail("4 KiB O_DIRECT read-back at %u failed or differs", i * PAGE);
    }
    /* What the buffer holds before: a read that "succeeds" without data shows it. */
    memset(rbuf, 0xa5, big);
    ssize_t n = pread(fd, rbuf, big, 0);
    int err = errno;
    if (n >= 0)
        fail("O_DIRECT read of %" PRIu64 " bytes returned %zd (success) where EIO was expected%s",
             big, n, rbuf[0] == 0xa5 ? ": the buffer still holds its old bytes (stale data)" : "");
    if (err != EIO)
        fail("O_DIRECT read of %" PRIu64 " bytes failed with %s, not EIO", big, strerror(err));
    printf("FASTSHADOW-CHECK PASS tag=%s written=%u ops=16 eio_bytes=%" PRIu64 "\n", g_tag, 16 * PAGE, big);
    fflush(stdout);
    free(wbuf);
    free(rbuf);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o;

    parse_opts(argc, argv, &o);
    if (o.bootcount)
        return bootcount(o.dev);
    if (o.expect_eio)
        return expect_eio(&o);
    return run_checks(&o);
}
