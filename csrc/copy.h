/*
 * copy.h: the copy engine (copy.c): memcpy, or streaming stores for
 * buffers of at least stream_copy_min bytes.
 */
#ifndef FSDP_COPY_H
#define FSDP_COPY_H

#include "base.h"

/* memcpy with non-temporal stores (x86; memcpy elsewhere). */
void copy_stream(void *dst, const void *src, size_t n);

static inline void copy_bytes(void *dst, const void *src, size_t n, bool stream)
{
    if (stream)
        copy_stream(dst, src, n);
    else
        memcpy(dst, src, n);
}

#endif
