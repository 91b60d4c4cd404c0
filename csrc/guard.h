/*
 * guard.h: file memory shrunk under the data plane (guard.c).
 *
 * Guest RAM and QEMU's dirty log are files a front-end owns.  If it shrinks
 * one after SET_MEM_TABLE (a compromised QEMU, or a memory-backend-file
 * someone truncates; hugetlbfs files cannot be sealed), the next access to a
 * page past the new end raises SIGBUS, whose default action kills the whole
 * proxy with every device it serves.  Each mapping of front-end memory is
 * registered here; a SIGBUS inside one replaces that mapping with anonymous
 * zero pages, so that the faulting access completes, and marks it lost.  The
 * data plane notices (guard_faults changed), refuses the memory and the
 * control plane ends that session.  A SIGBUS anywhere else keeps its default
 * action.
 */
#ifndef FSDP_GUARD_H
#define FSDP_GUARD_H

#include "base.h"

/* Register [start, start + len) (a whole mapping, as mmap returned it); the
 * SIGBUS handler is installed at the first call.  0, or -ENOSPC when every
 * slot is taken, or -errno of sigaction. */
int guard_add(void *start, size_t len);
/* Before munmap of a registered mapping. */
void guard_remove(void *start);
/* True if the mapping that starts at `start` was replaced after a SIGBUS. */
bool guard_lost(const void *start);
/* Faults caught so far (any mapping): cheap to poll, changes rarely. */
uint32_t guard_faults(void);

#endif
