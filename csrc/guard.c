/*
 * guard.c: SIGBUS from front-end file memory shrunk under the data plane.
 *
 * Owns: the table of guarded mappings, the process's SIGBUS handler.
 * Calls: base.
 *
 * The handler runs on the thread whose load or store faulted (a loop thread,
 * or a command executed there).  It only reads the table and makes one
 * mmap(MAP_FIXED) system call, both async-signal-safe.  Slots are written
 * under a mutex by guard_add/guard_remove and read without it by the
 * handler: `start` is stored last on add (release) and first on remove, so
 * the handler never sees a slot whose `end` belongs to another mapping.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "guard.h"

#define GUARD_SLOTS 1024    /* devices x (64 regions + log) in one process */

struct guard_slot {
    _Atomic uintptr_t start;    /* 0: free */
    _Atomic uintptr_t end;
    _Atomic bool lost;
};

static struct guard_slot slots[GUARD_SLOTS];
static _Atomic uint32_t faults;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static bool installed;

/* Give a SIGBUS that is not ours to whoever had it before (or the default
 * action: returning re-executes the access, which faults again). */
static void not_ours(int sig, siginfo_t *si, void *uctx)
{
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction) {
        previous.sa_sigaction(sig, si, uctx);
        return;
    }
    if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL);
    if (si->si_code <= 0)       /* sent by kill(): no access to re-execute */
        raise(SIGBUS);
}

static void on_sigbus(int sig, siginfo_t *si, void *uctx)
{
    uintptr_t a = (uintptr_t)si->si_addr;

    if (si->si_code > 0) {      /* a fault, not a kill() */
        for (size_t i = 0; i < GUARD_SLOTS; i++) {
            uintptr_t s = atomic_load_explicit(&slots[i].start, memory_order_acquire);
            uintptr_t e = atomic_load_explicit(&slots[i].end, memory_order_relaxed);
            if (!s || a < s || a >= e)
                continue;
            /* The whole mapping at once: its start is aligned as the file's
             * page size wants (hugetlbfs), a single page might not be. */
            if (mmap((void *)s, e - s, PROT_READ | PROT_WRITE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) == MAP_FAILED)
                break;
            atomic_store_explicit(&slots[i].lost, true, memory_order_relaxed);
            /* release: a poller that sees the new count sees `lost` */
            atomic_fetch_add_explicit(&faults, 1, memory_order_release);
            return;
        }
    }
    not_ours(sig, si, uctx);
}

static int install(void)
{
    struct sigaction sa = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_ONSTACK};

    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) < 0)
        return -errno;
    installed = true;
    return 0;
}

int guard_add(void *start, size_t len)
{
    int rc = 0;

    pthread_mutex_lock(&lock);
    if (!installed)
        rc = install();
    for (size_t i = 0; rc == 0; i++) {
        if (i == GUARD_SLOTS) {
            rc = -ENOSPC;
            break;
        }
        if (atomic_load_explicit(&slots[i].start, memory_order_relaxed))
            continue;
        atomic_store_explicit(&slots[i].end, (uintptr_t)start + len, memory_order_relaxed);
        atomic_store_explicit(&slots[i].lost, false, memory_order_relaxed);
        /* release: the handler that sees `start` sees this `end` */
        atomic_store_explicit(&slots[i].start, (uintptr_t)start, memory_order_release);
        break;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

void guard_remove(void *start)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < GUARD_SLOTS; i++)
        if (atomic_load_explicit(&slots[i].start, memory_order_relaxed) == (uintptr_t)start) {
            atomic_store_explicit(&slots[i].start, 0, memory_order_release);
            break;
        }
    pthread_mutex_unlock(&lock);
}

bool guard_lost(const void *start)
{
    for (size_t i = 0; i < GUARD_SLOTS; i++)
        if (atomic_load_explicit(&slots[i].start, memory_order_acquire) == (uintptr_t)start)
            return atomic_load_explicit(&slots[i].lost, memory_order_relaxed);
    return false;
}

uint32_t guard_faults(void)
{
    /* acquire: pairs with the handler's release (see on_sigbus) */
    return atomic_load_explicit(&faults, memory_order_acquire);
}
