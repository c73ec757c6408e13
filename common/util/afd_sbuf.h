/*
 * afd_sbuf: a growing text buffer for rendering (metrics, tables). A failed allocation
 * stops the appends; the text so far stays valid.
 */
#ifndef AFD_SBUF_H
#define AFD_SBUF_H

#include <stddef.h>

typedef struct afd_sbuf {
    char *p; /* NUL-terminated; owned */
    size_t len, cap;
} afd_sbuf_t;

/* Starts an empty buffer; returns -1 when out of memory. */
int afd_sbuf_init(afd_sbuf_t *b, size_t cap);
void afd_sbuf_printf(afd_sbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
