/*
 * probes.c: the trace control block of probes.h: an exported, initialised
 * symbol, so a tracer finds it by name in the extension's dynamic symbol
 * table (fastshadow/trace/ctl.py).
 */
#include <stdint.h>
#include <string.h>

#include "probes.h"

struct fsdp_trace_ctl fastshadow_trace_ctl __attribute__((used, visibility("default"))) = {
    .magic = TRACE_CTL_MAGIC,
};

void trace_ctl_name(uint32_t id, const char *name)
{
    if (id >= TRACE_CTL_DEVS)
        return;
    memset(fastshadow_trace_ctl.names[id], 0, TRACE_CTL_NAME);
    if (name)
        strncpy(fastshadow_trace_ctl.names[id], name, TRACE_CTL_NAME - 1);
}
