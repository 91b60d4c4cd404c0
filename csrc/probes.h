/*
 * probes.h: USDT probes of the data plane (provider "fastshadow"), and what
 * a tracer may set in a running proxy (probes.c).
 *
 * Each probe is a single nop in the hot path until a tracer attaches (its
 * arguments are values the code has anyway).  A tracer that asks for a
 * coarse view (fastshadow trace --sample N) attaches request_sampled only,
 * which the data plane fires for the requests the tracer asked for (the
 * trace control block below): the other probes stay nops.  USDT is-enabled
 * semaphores (_SDT_HAS_SEMAPHORES) were tried: bcc 0.26 attached to the
 * probes of this shared library but never raised their semaphores here (no
 * event reached the tracer), so the control block gates the one probe whose
 * arguments cost something to gather.
 *
 * Arguments: dev = the device's small integer id (its name: trace_ctl
 * below), q = queue index, head = the GUEST head index, bytes = byte count.
 *
 *   guest_kick(dev, q)                     guest kick eventfd completion seen
 *   request_shadowed(dev, q, head, bytes)  published to the shadow ring (bytes copied in)
 *   backend_kick(dev, q)                   eventfd write toward the backend queued
 *   backend_call(dev, q)                   backend call eventfd completion seen
 *   request_completed(dev, q, head, bytes) guest used element written (bytes = used len)
 *   guest_call(dev, q)                     eventfd write toward the guest queued
 *   request_refused(dev, q, head, code)    chain refused (code = enum fsdp_event_code)
 *   request_sampled(dev, q, head, start_ns, shadowed_ns, seen_ns, used_ns)
 *       one request in fastshadow_trace_ctl.sample_every (per queue, by
 *       publish order), completed: the data plane's own stamps of it
 *       (hist.h; CLOCK_MONOTONIC ns, the clock of bpf_ktime_get_ns), so a
 *       tracer follows the whole request through every hop from ONE probe
 *       hit.  Needs the latency histograms on (the default).
 */
#ifndef FSDP_PROBES_H
#define FSDP_PROBES_H

#include <stdint.h>

#include <sys/sdt.h>

#ifdef FSDP_NO_PROBES
/* Measurement builds only (csrc/build_ffi.py, FASTSHADOW_NO_PROBES=1). */
#undef DTRACE_PROBE2
#undef DTRACE_PROBE4
#undef DTRACE_PROBE7
#define DTRACE_PROBE2(p, n, a, b) ((void)0)
#define DTRACE_PROBE4(p, n, a, b, c, d) ((void)0)
#define DTRACE_PROBE7(p, n, a, b, c, d, e, f, g) ((void)0)
#endif

#define PROBE_GUEST_KICK(dev, q) DTRACE_PROBE2(fastshadow, guest_kick, dev, q)
#define PROBE_REQUEST_SHADOWED(dev, q, head, bytes) \
    DTRACE_PROBE4(fastshadow, request_shadowed, dev, q, head, bytes)
#define PROBE_BACKEND_KICK(dev, q) DTRACE_PROBE2(fastshadow, backend_kick, dev, q)
#define PROBE_BACKEND_CALL(dev, q) DTRACE_PROBE2(fastshadow, backend_call, dev, q)
#define PROBE_REQUEST_COMPLETED(dev, q, head, bytes) \
    DTRACE_PROBE4(fastshadow, request_completed, dev, q, head, bytes)
#define PROBE_GUEST_CALL(dev, q) DTRACE_PROBE2(fastshadow, guest_call, dev, q)
#define PROBE_REQUEST_REFUSED(dev, q, head, code) \
    DTRACE_PROBE4(fastshadow, request_refused, dev, q, head, code)
#define PROBE_REQUEST_SAMPLED(dev, q, head, start, shadowed, seen, used) \
    DTRACE_PROBE7(fastshadow, request_sampled, dev, q, head, start, shadowed, seen, used)

/*
 * What a tracer reads and writes in a running proxy, through /proc/PID/mem
 * at the address of the exported symbol fastshadow_trace_ctl (root only,
 * like attaching the probes): no control socket, no option to restart the
 * proxy with.  The magic is checked before anything is written.
 */
enum { TRACE_CTL_DEVS = 256, TRACE_CTL_NAME = 64 };

struct fsdp_trace_ctl {
    char magic[16];             /* TRACE_CTL_MAGIC */
    uint32_t sample_every;      /* written by the tracer: 0 no request_sampled, N: 1 in N */
    uint32_t pad;
    char names[TRACE_CTL_DEVS][TRACE_CTL_NAME];  /* device names by id; "" free */
};

#define TRACE_CTL_MAGIC "fastshadow-tctl1"

extern struct fsdp_trace_ctl fastshadow_trace_ctl;

/* Device id's name (NULL or "": none).  Kept after the device is removed,
 * until the id is given to another device.  The proxy has one data plane; a
 * second one in the same process shares the table (tests). */
void trace_ctl_name(uint32_t id, const char *name);

/* Is the request of publish order `seq` one the tracer asked for? */
static inline int trace_ctl_sampled(uint64_t seq)
{
    /* Relaxed: written by another process between two requests; one stale
     * read samples one request more or less. */
    uint32_t every = __atomic_load_n(&fastshadow_trace_ctl.sample_every, __ATOMIC_RELAXED);

    return every && seq % every == 0;
}

#endif
