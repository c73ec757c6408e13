/* afd_sbuf: printf into a buffer that grows. */
#include "afd_sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int afd_sbuf_init(afd_sbuf_t *b, size_t cap)
{
    b->p = malloc(cap ? cap : 1);
    b->len = 0;
    b->cap = b->p ? (cap ? cap : 1) : 0;
    if (b->p) b->p[0] = 0;
    return b->p ? 0 : -1;
}

void afd_sbuf_printf(afd_sbuf_t *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = 2 * b->cap + (size_t)n + 1;
        char *np = realloc(b->p, cap);
        if (!np) {
            b->p[b->len] = 0; /* keep what fitted */
            return;
        }
        b->p = np;
        b->cap = cap;
    }
}
