/*
 * marker.h: the one failure marker line of the guest programs (checker.c,
 * netcheck.c), shared by #include: each is compiled on its own, statically.
 *
 * Every failure path of a program ends in marker_fail, so that the guest's
 * /init (and the Python side parsing the console) always sees exactly one
 * marker line.  The line is built in one buffer and written with a single
 * write(2), so that program instances running in parallel cannot interleave
 * inside it.
 */
#ifndef FASTSHADOW_GUEST_MARKER_H
#define FASTSHADOW_GUEST_MARKER_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Writes "<head><fmt...>\n" to stdout and exits 1 (2 if stdout is gone). */
static void __attribute__((noreturn, format(printf, 2, 0)))
marker_fail(const char *head, const char *fmt, va_list ap)
{
    char line[1024];
    int n = snprintf(line, sizeof(line), "%s", head);

    if (n > 0 && (size_t)n < sizeof(line))
        n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    if (n < 0 || (size_t)n >= sizeof(line) - 1)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    fflush(stdout);
    if (write(STDOUT_FILENO, line, (size_t)n) < 0)
        exit(2);
    exit(1);
}

#endif
