/*
 * bn_http: a small HTTP/1.1 client on libuv for the benchmarks: one request per
 * connection ("Connection: close"), the response parsed by llhttp as it arrives, the
 * body handed to the caller chunk by chunk (so streamed SSE answers are timed per
 * event). Also URL parsing and SSE event splitting.
 */
#ifndef BN_HTTP_H
#define BN_HTTP_H

#include "afd_status.h"

#include <netinet/in.h>
#include <stddef.h>
#include <uv.h>

/* http://host[:port][/base]; host resolved once (IPv4 or IPv6). */
typedef struct bn_url {
    char host[256];
    int port;
    char base[512]; /* path prefix without a trailing '/', may be empty */
    struct sockaddr_storage addr;
} bn_url_t;

/* Parses and resolves url; AFD_ERR_INVALID (logged) for anything but http:// URLs. */
afd_status_t bn_url_parse(const char *url, bn_url_t *out);

typedef struct bn_http_cb {
    void (*on_status)(void *ud, int status);                     /* headers complete */
    void (*on_body)(void *ud, const char *at, size_t n);         /* each body span */
    void (*on_done)(void *ud, afd_status_t st, const char *why); /* exactly once */
} bn_http_cb_t;

/*
 * Sends one request (body may be NULL) with an optional bearer token; the callbacks
 * run on loop's thread. timeout_ms bounds the whole exchange (0: none). On AFD_OK
 * on_done will be called; on error nothing is.
 */
afd_status_t bn_http_request(uv_loop_t *loop, const bn_url_t *url, const char *method,
                             const char *path, const char *bearer, const char *body,
                             size_t body_len, unsigned timeout_ms, const bn_http_cb_t *cb,
                             void *ud);

/*
 * Splits a text/event-stream into events: feed body spans, get each event's data
 * (the "data:" lines joined by '\n', NUL-terminated) through the callback.
 */
typedef struct bn_sse {
    char *buf; /* (cap) pending bytes of the current line and event */
    size_t len, cap, max;
    size_t ev; /* bytes of buf holding the current event's data */
    int overflow;
    void (*on_event)(void *ud, const char *data, size_t n);
    void *ud;
} bn_sse_t;

/* max bounds one event's size (larger ones are dropped and counted as an overflow). */
void bn_sse_init(bn_sse_t *s, size_t max, void (*on_event)(void *, const char *, size_t), void *ud);
void bn_sse_feed(bn_sse_t *s, const char *at, size_t n);
void bn_sse_fini(bn_sse_t *s);

#endif
