/*
 * clock_cost.c: what a time stamp costs the data plane (csrc/hist.c).
 *
 * Times N back-to-back reads of each candidate clock and prints ns per read:
 *   clock_gettime(CLOCK_MONOTONIC)         through the vDSO (no syscall when the
 *                                          clocksource is tsc or kvm-clock)
 *   clock_gettime(CLOCK_MONOTONIC_COARSE)  the tick-granular one (4 ms here: too coarse)
 *   rdtsc                                  the raw counter (needs a calibration to ns)
 *   rdtscp                                 ordered against earlier loads
 * Not part of the extension (build_ffi.py compiles only csrc/*.c):
 *
 *   gcc -O2 -o /tmp/clock_cost csrc/bench/clock_cost.c && /tmp/clock_cost [reads]
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

static uint64_t ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static volatile uint64_t sink;

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000000;
    unsigned aux;

    for (int rep = 0; rep < 3; rep++) {
        uint64_t t0 = ns(CLOCK_MONOTONIC), acc = 0;
        for (long i = 0; i < n; i++)
            acc += ns(CLOCK_MONOTONIC);
        uint64_t t1 = ns(CLOCK_MONOTONIC);
        for (long i = 0; i < n; i++)
            acc += ns(CLOCK_MONOTONIC_COARSE);
        uint64_t t2 = ns(CLOCK_MONOTONIC);
        for (long i = 0; i < n; i++)
            acc += __rdtsc();
        uint64_t t3 = ns(CLOCK_MONOTONIC);
        for (long i = 0; i < n; i++)
            acc += __rdtscp(&aux);
        uint64_t t4 = ns(CLOCK_MONOTONIC);
        sink = acc;
        printf("monotonic %.1f ns  coarse %.1f ns  rdtsc %.1f ns  rdtscp %.1f ns  (per read, %ld reads)\n",
               (double)(t1 - t0) / n, (double)(t2 - t1) / n, (double)(t3 - t2) / n, (double)(t4 - t3) / n, n);
    }
    return 0;
}
