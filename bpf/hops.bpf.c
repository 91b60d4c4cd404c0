/*
 * hops.bpf.c: where a notification spends its time inside fastshadow.
 *
 * Attached by fastshadow/trace to the data plane's USDT probes (provider
 * "fastshadow", csrc/probes.h) of one running proxy.  Per hop and per queue
 * it keeps a log2 histogram of nanoseconds:
 *
 *   0 kick_to_shadowed      guest kick seen        -> each request it shadowed
 *   1 shadowed_to_kick      first request shadowed -> the backend kick that carried it
 *   2 call_to_completed     backend call seen      -> each request completed to the guest
 *   3 completed_to_call     first completion       -> the guest call that announced it
 *   4 end_to_end            guest kick seen        -> that request completed to the guest
 *
 * QUEUE_FILTER is replaced by the loader (empty, or a test on q).
 * Requests are keyed by (device, queue, guest head): a head is unique while
 * the request is in flight, which is exactly the span measured.
 */
#include <uapi/linux/ptrace.h>

struct qkey { u32 dev; u32 q; };
struct rkey { u32 dev; u32 q; u32 head; u32 pad; };
struct hkey { u32 hop; u32 q; u64 slot; };

enum { HOP_KICK_SHADOWED, HOP_SHADOWED_KICK, HOP_CALL_COMPLETED, HOP_COMPLETED_CALL, HOP_END_TO_END };
enum {
    C_GUEST_KICK, C_SHADOWED, C_BACKEND_KICK, C_BACKEND_CALL, C_COMPLETED, C_GUEST_CALL, C_REFUSED,
    C_NO_START, C_MAP_FULL, C_MAX
};

BPF_HASH(last_kick, struct qkey, u64, 1024);
BPF_HASH(first_shadowed, struct qkey, u64, 1024);
BPF_HASH(last_call, struct qkey, u64, 1024);
BPF_HASH(first_completed, struct qkey, u64, 1024);
BPF_HASH(start, struct rkey, u64, 65536);
BPF_HISTOGRAM(hist, struct hkey, 4096);
BPF_ARRAY(counts, u64, C_MAX);

static inline void count(int what)
{
    u32 k = what;
    u64 *v = counts.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static inline void observe(u32 hop, u32 q, u64 delta)
{
    struct hkey k = { .hop = hop, .q = q, .slot = bpf_log2l(delta) };
    hist.increment(k);
}

/*
 * READ_DQ(k) is expanded by the loader (fastshadow/trace/tool.py) into the
 * two bpf_usdt_readarg() calls: bcc rewrites those per probe function (each
 * attachment point has its own argument locations), so they must sit in the
 * probe function's own body, and bcc refuses them inside C macros.  It reads
 * dev and q (u32, as csrc/probes.h declares them) into k and returns from the
 * probe when QUEUE_FILTER rejects the queue.
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
        observe(HOP_KICK_SHADOWED, k.q, now - *kick);
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
        observe(HOP_SHADOWED_KICK, k.q, now - *first);
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
        observe(HOP_CALL_COMPLETED, k.q, now - *call);
    struct rkey r = { .dev = k.dev, .q = k.q, .head = head };
    u64 *t0 = start.lookup(&r);
    if (t0) {
        observe(HOP_END_TO_END, k.q, now - *t0);
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
        observe(HOP_COMPLETED_CALL, k.q, now - *first);
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

/*
 * The load generator's own probes (provider "fastshadow_loadgen", bench/):
 * the driver's view of each request, submit -> complete, with the latency
 * it measured itself.  Attached only with --driver-pid.
 */
enum { HOP_DRIVER = 5 };
BPF_ARRAY(driver_counts, u64, 2);

int on_driver_complete(struct pt_regs *ctx)
{
    u32 q = 0;      /* complete(u32 q, u32 head, u32 bytes, u64 latency_ns) */
    u64 lat = 0;
    bpf_usdt_readarg(1, ctx, &q);
    bpf_usdt_readarg(4, ctx, &lat);
    u32 k = 1;
    u64 *v = driver_counts.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    observe(HOP_DRIVER, q, lat);
    return 0;
}

int on_driver_submit(struct pt_regs *ctx)
{
    u32 k = 0;
    u64 *v = driver_counts.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
