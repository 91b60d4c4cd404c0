/*
 * hops.bpf.c: where a notification spends its time inside fastshadow.
 *
 * Attached by fastshadow/trace to the data plane's USDT probes (provider
 * "fastshadow", csrc/probes.h) of one running proxy.  Per hop and per queue
 * Per hop, device and queue it keeps a log2 histogram of MICROSECONDS
 * (ns / 1000, a division, then log2: bucket 0 holds [0, 1) us, bucket s
 * [2^(s-1), 2^s) us; fastshadow/trace/report.py, BUCKET_RULE):
 *
 *   0 kick_to_shadowed      guest kick seen        -> each request it shadowed
 *   1 shadowed_to_kick      first request shadowed -> the backend kick that carried it
 *   2 call_to_completed     backend call seen      -> each request completed to the guest
 *   3 completed_to_call     first completion       -> the guest call that announced it
 *   4 end_to_end            guest kick seen        -> that request completed to the guest
 *
 * Sampled (--sample N): only request_sampled is attached; it fires for 1
 * request in N per queue, once, with the data plane's own stamps of that
 * request (csrc/hist.h), and gives hops 6-9 (kick_to_shadowed, backend,
 * call_to_used, end_to_end) with no per-queue state at all.
 *
 * QUEUE_FILTER and DEVICE_FILTER are replaced by the loader (empty, or a
 * test on q / on dev against the dev_filter map).
 * Requests are keyed by (device, queue, guest head): a head is unique while
 * the request is in flight, which is exactly the span measured.
 */
#include <uapi/linux/ptrace.h>

struct qkey { u32 dev; u32 q; };
struct rkey { u32 dev; u32 q; u32 head; u32 pad; };
struct hkey { u32 hop; u32 dev; u32 q; u32 slot; };

enum { HOP_KICK_SHADOWED, HOP_SHADOWED_KICK, HOP_CALL_COMPLETED, HOP_COMPLETED_CALL, HOP_END_TO_END };
enum { HOP_S_KICK_SHADOWED = 6, HOP_S_BACKEND, HOP_S_CALL_USED, HOP_S_END_TO_END };
enum {
    C_GUEST_KICK, C_SHADOWED, C_BACKEND_KICK, C_BACKEND_CALL, C_COMPLETED, C_GUEST_CALL, C_REFUSED,
    C_NO_START, C_MAP_FULL, C_SAMPLED, C_MAX
};

BPF_HASH(last_kick, struct qkey, u64, 1024);
BPF_HASH(first_shadowed, struct qkey, u64, 1024);
BPF_HASH(last_call, struct qkey, u64, 1024);
BPF_HASH(first_completed, struct qkey, u64, 1024);
BPF_HASH(start, struct rkey, u64, 65536);
/* Shared between CPUs (atomic increments): a BPF_PERCPU_HASH with .increment()
 * was tried and bcc 0.26 returned no entries from it here; the counters below
 * are per-CPU. */
BPF_HISTOGRAM(hist, struct hkey, 4096);
/* --device: the wanted device's id + 1, set and kept up to date by the loader
 * (DEVICE_FILTER); 0: not connected yet, nothing passes. */
BPF_ARRAY(dev_filter, u32, 1);
/* Per-CPU: a counter is never contended between CPUs (summed by the loader). */
BPF_PERCPU_ARRAY(counts, u64, C_MAX);

static inline void count(int what)
{
    u32 k = what;
    u64 *v = counts.lookup(&k);
    if (v)
        (*v)++;
}

/* ns -> the bucket of BUCKET_RULE: us = ns / 1000 (true microseconds). */
static inline u32 us_slot(u64 ns)
{
    u64 us = ns / 1000;
    return us ? bpf_log2l(us) : 0;
}

static inline void observe(u32 hop, u32 dev, u32 q, u64 delta)
{
    struct hkey k = { .hop = hop, .dev = dev, .q = q, .slot = us_slot(delta) };
    hist.increment(k);
}

/*
 * READ_DQ(k) is expanded by the loader (fastshadow/trace/tool.py) into the
 * two bpf_usdt_readarg() calls: bcc rewrites those per probe function (each
 * attachment point has its own argument locations), so they must sit in the
 * probe function's own body, and bcc refuses them inside C macros.  It reads
 * dev and q (u32, as csrc/probes.h declares them) into k and returns from the
 * probe when QUEUE_FILTER or DEVICE_FILTER rejects it.
 */

int on_guest_kick(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u64 now = bpf_ktime_get_ns();
    last_kick.update(&k, &now);
    count(C_GUEST_KICK);
    return 0;
}

int on_request_shadowed(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u16 head = 0;   /* the guest head index: u16 */
    bpf_usdt_readarg(3, ctx, &head);
    u64 now = bpf_ktime_get_ns();
    count(C_SHADOWED);
    /* A request taken while busy-polling has no kick of its own: it starts now. */
    u64 t0 = now;
    u64 *kick = last_kick.lookup(&k);
    if (kick && *kick <= now) {
        t0 = *kick;
        observe(HOP_KICK_SHADOWED, k.dev, k.q, now - *kick);
    }
    struct rkey r = { .dev = k.dev, .q = k.q, .head = head };
    if (start.update(&r, &t0) != 0)
        count(C_MAP_FULL);
    first_shadowed.lookup_or_try_init(&k, &now);
    return 0;
}

int on_backend_kick(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u64 now = bpf_ktime_get_ns();
    count(C_BACKEND_KICK);
    u64 *first = first_shadowed.lookup(&k);
    if (first) {
        observe(HOP_SHADOWED_KICK, k.dev, k.q, now - *first);
        first_shadowed.delete(&k);
    }
    return 0;
}

int on_backend_call(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u64 now = bpf_ktime_get_ns();
    last_call.update(&k, &now);
    count(C_BACKEND_CALL);
    return 0;
}

int on_request_completed(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u16 head = 0;   /* the guest head index: u16 */
    bpf_usdt_readarg(3, ctx, &head);
    u64 now = bpf_ktime_get_ns();
    count(C_COMPLETED);
    u64 *call = last_call.lookup(&k);
    if (call && *call <= now)
        observe(HOP_CALL_COMPLETED, k.dev, k.q, now - *call);
    struct rkey r = { .dev = k.dev, .q = k.q, .head = head };
    u64 *t0 = start.lookup(&r);
    if (t0) {
        observe(HOP_END_TO_END, k.dev, k.q, now - *t0);
        start.delete(&r);
    } else {
        count(C_NO_START);   /* shadowed before tracing began, or refused */
    }
    first_completed.lookup_or_try_init(&k, &now);
    return 0;
}

int on_guest_call(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u64 now = bpf_ktime_get_ns();
    count(C_GUEST_CALL);
    u64 *first = first_completed.lookup(&k);
    if (first) {
        observe(HOP_COMPLETED_CALL, k.dev, k.q, now - *first);
        first_completed.delete(&k);
    }
    return 0;
}

int on_request_refused(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    count(C_REFUSED);
    return 0;
}

/* request_sampled(dev, q, head, start_ns, shadowed_ns, seen_ns, used_ns):
 * one probe hit per sampled request, every hop from the data plane's stamps. */
int on_request_sampled(struct pt_regs *ctx)
{
    struct qkey k = {};
    READ_DQ(k);
    u64 start = 0, shadowed = 0, seen = 0, used = 0;
    bpf_usdt_readarg(4, ctx, &start);
    bpf_usdt_readarg(5, ctx, &shadowed);
    bpf_usdt_readarg(6, ctx, &seen);
    bpf_usdt_readarg(7, ctx, &used);
    count(C_SAMPLED);
    observe(HOP_S_KICK_SHADOWED, k.dev, k.q, shadowed - start);
    observe(HOP_S_BACKEND, k.dev, k.q, seen - shadowed);
    observe(HOP_S_CALL_USED, k.dev, k.q, used - seen);
    observe(HOP_S_END_TO_END, k.dev, k.q, used - start);
    return 0;
}

/*
 * The load generator's own probes (provider "fastshadow_loadgen", bench/):
 * the driver's view of each request, submit -> complete, with the latency
 * it measured itself.  Attached only with --driver-pid.
 */
enum { HOP_DRIVER = 5 };
BPF_PERCPU_ARRAY(driver_counts, u64, 2);

int on_driver_complete(struct pt_regs *ctx)
{
    u32 q = 0;      /* complete(u32 q, u32 head, u32 bytes, u64 latency_ns) */
    u64 lat = 0;
    bpf_usdt_readarg(1, ctx, &q);
    bpf_usdt_readarg(4, ctx, &lat);
    u32 k = 1;
    u64 *v = driver_counts.lookup(&k);
    if (v)
        (*v)++;
    observe(HOP_DRIVER, 0, q, lat);
    return 0;
}

int on_driver_submit(struct pt_regs *ctx)
{
    u32 k = 0;
    u64 *v = driver_counts.lookup(&k);
    if (v)
        (*v)++;
    return 0;
}
