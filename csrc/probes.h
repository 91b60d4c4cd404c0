/*
 * probes.h: USDT probes of the data plane (provider "fastshadow").
 *
 * Each probe is a single nop in the hot path until a tracer attaches
 * (fastshadow/trace, bcc USDT).  Arguments: dev = the device's small integer
 * id, q = queue index, head = the GUEST head index, bytes = byte count.
 *
 *   guest_kick(dev, q)                     guest kick eventfd completion seen
 *   request_shadowed(dev, q, head, bytes)  published to the shadow ring (bytes copied in)
 *   backend_kick(dev, q)                   eventfd write toward the backend queued
 *   backend_call(dev, q)                   backend call eventfd completion seen
 *   request_completed(dev, q, head, bytes) guest used element written (bytes = used len)
 *   guest_call(dev, q)                     eventfd write toward the guest queued
 *   request_refused(dev, q, head, code)    chain refused (code = enum fsdp_event_code)
 */
#ifndef FSDP_PROBES_H
#define FSDP_PROBES_H

#include <sys/sdt.h>

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

#endif
