/*
 * fastshadow guest network checker: ICMP echo with verified payloads.
 *
 * Runs inside the test guest (static) against a peer that answers echo
 * requests, such as dpdk-testpmd in icmpecho forwarding mode behind a
 * vhost-user-net chain.  ping(1) only counts replies; this checks every byte
 * that came back, so a NIC data path that loses, truncates, reorders within a
 * packet or corrupts data is caught:
 *
 *  - `--count` echo requests, in windows of `--window` outstanding requests
 *    (several packets per kick and per interrupt, as a real load has);
 *  - payload sizes drawn between `--min` and `--max` (at most 1472: one
 *    Ethernet frame, no IP fragments), filled with a pattern that is a pure
 *    function of (seed, sequence number, position), so a reply carrying the
 *    payload of another request is caught too;
 *  - a request without a reply within `--timeout-ms` is sent again (at most
 *    3 times): a lost packet is counted, a corrupt one fails the run;
 *  - `--min-ms D` keeps sending windows past `--count` until D ms have passed,
 *    so a test that disturbs the path mid-traffic does not race a fast guest;
 *    with it, the line `FASTSHADOW-NET FLOWING` is printed once the first
 *    window is answered, so such a test knows when traffic runs.
 *
 * Output: exactly one final marker line
 *     FASTSHADOW-NET PASS tag=<tag> sent=<n> received=<n> bytes=<b> resent=<r>
 *     FASTSHADOW-NET FAIL tag=<tag> <reason>
 * and exit status 0 / 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "marker.h"

#define MAX_PAYLOAD 1472u   /* 1500 MTU - 20 IP - 8 ICMP */
#define MAX_WINDOW 256u
#define MAX_TRIES 3

static const char *g_tag = "net0";

static void __attribute__((noreturn, format(printf, 1, 2)))
fail(const char *fmt, ...)
{
    char head[96];
    va_list ap;

    snprintf(head, sizeof(head), "FASTSHADOW-NET FAIL tag=%s ", g_tag);
    va_start(ap, fmt);
    marker_fail(head, fmt, ap);
}

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint8_t pattern_byte(uint64_t seed, uint32_t seq, uint32_t pos)
{
    return (uint8_t)mix64(seed * 0x9e3779b97f4a7c15ULL + ((uint64_t)seq << 20) + pos);
}

static uint32_t payload_size(uint64_t seed, uint32_t seq, uint32_t min, uint32_t max)
{
    return min + (uint32_t)(mix64(seed ^ (0xa5a5ULL << 32) ^ seq) % (max - min + 1u));
}

static uint16_t inet_csum(const void *data, size_t len)
{
    const uint8_t *p = data;
    uint32_t sum = 0;

    for (; len > 1; p += 2, len -= 2)
        sum += (uint32_t)p[0] << 8 | p[1];
    if (len)
        sum += (uint32_t)p[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return htons((uint16_t)~sum);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

struct opts {
    struct in_addr dst;
    uint32_t count, window, min, max, timeout_ms, min_ms;
    uint64_t seed;
};

struct slot {
    uint32_t seq;
    int tries;
    bool done;
};

static void send_echo(int fd, const struct opts *o, uint16_t id, uint32_t seq)
{
    uint8_t pkt[sizeof(struct icmphdr) + MAX_PAYLOAD];
    struct icmphdr *h = (struct icmphdr *)pkt;
    uint32_t n = payload_size(o->seed, seq, o->min, o->max);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = o->dst};

    memset(h, 0, sizeof(*h));
    h->type = ICMP_ECHO;
    h->un.echo.id = htons(id);
    h->un.echo.sequence = htons((uint16_t)seq);
    for (uint32_t i = 0; i < n; i++)
        pkt[sizeof(*h) + i] = pattern_byte(o->seed, seq, i);
    h->checksum = inet_csum(pkt, sizeof(*h) + n);
    if (sendto(fd, pkt, sizeof(*h) + n, 0, (struct sockaddr *)&to, sizeof(to)) < 0)
        fail("sendto seq %u: %s", seq, strerror(errno));
}

/* Receive one reply; returns its sequence number's slot index or -1. Fails on
 * a corrupt reply to one of our requests. */
static int recv_echo(int fd, const struct opts *o, uint16_t id, struct slot *win, uint32_t nwin,
                     uint64_t *bytes)
{
    uint8_t buf[2048];
    ssize_t got = recv(fd, buf, sizeof(buf), 0);

    if (got < 0)
        return errno == EAGAIN || errno == EINTR ? -1 : (fail("recv: %s", strerror(errno)), -1);
    const struct iphdr *ip = (const struct iphdr *)buf;
    size_t ihl = (size_t)ip->ihl * 4u;
    if ((size_t)got < ihl + sizeof(struct icmphdr))
        return -1;
    const struct icmphdr *h = (const struct icmphdr *)(buf + ihl);
    if (h->type != ICMP_ECHOREPLY || ntohs(h->un.echo.id) != id)
        return -1;                         /* not ours (or our own request, looped) */
    uint16_t seq16 = ntohs(h->un.echo.sequence);
    for (uint32_t k = 0; k < nwin; k++) {
        if ((uint16_t)win[k].seq != seq16)
            continue;
        uint32_t want = payload_size(o->seed, win[k].seq, o->min, o->max);
        uint32_t n = (uint32_t)((size_t)got - ihl - sizeof(*h));
        if (inet_csum(h, (size_t)got - ihl) != 0)
            fail("seq %u: ICMP checksum of the reply is wrong", win[k].seq);
        if (n != want)
            fail("seq %u: reply payload is %u bytes, sent %u", win[k].seq, n, want);
        const uint8_t *p = (const uint8_t *)(h + 1);
        for (uint32_t i = 0; i < n; i++)
            if (p[i] != pattern_byte(o->seed, win[k].seq, i))
                fail("seq %u: reply payload byte %u is 0x%02x, sent 0x%02x", win[k].seq, i, p[i],
                     pattern_byte(o->seed, win[k].seq, i));
        if (win[k].done)
            return -1;                     /* a duplicate of a resent request */
        win[k].done = true;
        *bytes += n;
        return (int)k;
    }
    return -1;
}

static uint32_t parse_u32(const char *opt, const char *s, uint32_t lo, uint32_t hi)
{
    char *end;
    unsigned long v = strtoul(s, &end, 0);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi)
        fail("%s %s: want a number in [%u, %u]", opt, s, lo, hi);
    return (uint32_t)v;
}

int main(int argc, char **argv)
{
    struct opts o = {.count = 1000, .window = 16, .min = 0, .max = MAX_PAYLOAD, .timeout_ms = 1000,
                     .seed = 1};
    bool have_dst = false;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            fail("option %s needs a value (usage: netcheck --dst IP [--count N] [--window W] "
                 "[--min B] [--max B] [--timeout-ms T] [--min-ms D] [--seed S] [--tag T])", a);
        i++;
        if (!strcmp(a, "--dst"))
            have_dst = inet_pton(AF_INET, v, &o.dst) == 1;
        else if (!strcmp(a, "--count"))
            o.count = parse_u32(a, v, 1, 1000000);
        else if (!strcmp(a, "--window"))
            o.window = parse_u32(a, v, 1, MAX_WINDOW);
        else if (!strcmp(a, "--min"))
            o.min = parse_u32(a, v, 0, MAX_PAYLOAD);
        else if (!strcmp(a, "--max"))
            o.max = parse_u32(a, v, 0, MAX_PAYLOAD);
        else if (!strcmp(a, "--timeout-ms"))
            o.timeout_ms = parse_u32(a, v, 1, 600000);
        else if (!strcmp(a, "--min-ms"))
            o.min_ms = parse_u32(a, v, 0, 3600000);
        else if (!strcmp(a, "--seed"))
            o.seed = parse_u32(a, v, 0, UINT32_MAX);
        else if (!strcmp(a, "--tag"))
            g_tag = v;
        else
            fail("unknown option %s", a);
    }
    if (!have_dst)
        fail("--dst IPv4 address missing or invalid");
    if (o.min > o.max)
        fail("--min %u > --max %u", o.min, o.max);

    int fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);
    if (fd < 0)
        fail("raw ICMP socket: %s", strerror(errno));
    uint16_t id = (uint16_t)(getpid() ^ o.seed);
    uint64_t bytes = 0;
    uint32_t received = 0, resent = 0;
    struct slot win[MAX_WINDOW];
    uint64_t end_ms = now_ms() + o.min_ms;
    uint32_t base;

    for (base = 0; base < o.count || now_ms() < end_ms; base += o.window) {
        /* Past --count (only when --min-ms holds the run open) windows are full. */
        uint32_t nwin = base < o.count && o.count - base < o.window ? o.count - base : o.window;
        uint32_t left = nwin;
        for (uint32_t k = 0; k < nwin; k++) {
            win[k] = (struct slot){.seq = base + k, .tries = 1};
            send_echo(fd, &o, id, base + k);
        }
        uint64_t deadline = now_ms() + o.timeout_ms;
        while (left) {
            int64_t wait = (int64_t)(deadline - now_ms());
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            if (wait > 0 && poll(&pfd, 1, (int)wait) > 0) {
                if (recv_echo(fd, &o, id, win, nwin, &bytes) >= 0) {
                    left--;
                    received++;
                }
                continue;
            }
            /* Timeout: send what is missing again, or give up. */
            for (uint32_t k = 0; k < nwin; k++) {
                if (win[k].done)
                    continue;
                if (win[k].tries >= MAX_TRIES)
                    fail("seq %u: no reply after %d tries (%u of %u received)", win[k].seq,
                         MAX_TRIES, received, o.count);
                win[k].tries++;
                resent++;
                send_echo(fd, &o, id, win[k].seq);
            }
            deadline = now_ms() + o.timeout_ms;
        }
        if (base == 0 && o.min_ms) {
            printf("FASTSHADOW-NET FLOWING tag=%s received=%u\n", g_tag, received);
            fflush(stdout);
        }
    }
    printf("FASTSHADOW-NET PASS tag=%s sent=%u received=%u bytes=%llu resent=%u\n", g_tag, received,
           received, (unsigned long long)bytes, resent);
    return 0;
}
