/*
 * fuzz_http: arbitrary bytes as one client connection to the coordinator's HTTP server
 * (common/net/net_http.c: llhttp callbacks, head and body limits, keep-alive, pipelining,
 * 100-continue, chunked bodies, error answers, draining). The handler checks what the
 * server promises about each request and answers it in one of four ways chosen by the
 * path: whole (most paths), streamed in chunks (/stream...), later from a timer
 * (/later...: the resume of pipelined bytes), or only when the server is otherwise stuck
 * (/never...): the client's end of stream then aborts it (the abort callback), unless the
 * server stopped reading behind it.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "fz_http.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_MAX_HEADER_BYTES 4096
#define FZ_MAX_HEADERS      16
#define FZ_MAX_BODY         (64u << 10)

static fz_http_t g_h;
static uv_timer_t g_later_timer;
static net_http_req_t *g_later; /* the request answered from the timer, NULL if none */
static net_http_req_t *g_never; /* the request left unanswered, NULL if none */

/* A broken promise of the server is a crash the fuzzer reports. */
#define FZ_CHECK(cond)                                                                             \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_http: check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void check_request(const net_http_req_t *r)
{
    FZ_CHECK(r->method && r->method[0]);
    FZ_CHECK(r->path && r->query && r->body);
    FZ_CHECK(!strchr(r->path, '?') && !strchr(r->path, '#'));
    FZ_CHECK(r->body_len <= FZ_MAX_BODY);
    FZ_CHECK(r->body[r->body_len] == 0);
    const char *hdrs[] = {"host",       "content-type", "content-length", "transfer-encoding",
                          "connection", "expect",       "authorization"};
    for (size_t i = 0; i < sizeof(hdrs) / sizeof(hdrs[0]); i++) {
        const char *v = net_http_header(r, hdrs[i]);
        if (v) FZ_CHECK(strlen(v) < FZ_MAX_HEADER_BYTES);
    }
}

static void answer(net_http_req_t *r)
{
    if (!strncmp(r->path, "/stream", 7)) {
        net_http_stream_begin(r, 200, "text/event-stream", NULL);
        static const char ev[] = "data: {\"x\":1}\n\n";
        if (net_http_stream_write(r, ev, sizeof(ev) - 1) == AFD_OK)
            net_http_stream_write(r, r->body, r->body_len);
        net_http_stream_end(r);
        return;
    }
    int status = !strcmp(r->path, "/") ? 204 : 200;
    net_http_respond(r, status, "application/octet-stream", r->body, r->body_len,
                     r->query[0] ? "X-Query: yes\r\n" : NULL);
}

static void on_later(uv_timer_t *t)
{
    (void)t;
    net_http_req_t *r = g_later;
    g_later = NULL;
    if (r) answer(r);
}

static void on_abort(void *ud, net_http_req_t *r)
{
    (void)ud;
    FZ_CHECK(r == g_later || r == g_never);
    if (r == g_later) {
        g_later = NULL;
        uv_timer_stop(&g_later_timer);
    } else {
        g_never = NULL;
    }
}

/* the server waits for the unanswered request (it stopped reading): answer it */
static void on_stuck(void *arg)
{
    (void)arg;
    net_http_req_t *r = g_never;
    g_never = NULL;
    if (r) answer(r);
}

static void handler(void *arg, net_http_req_t *r)
{
    (void)arg;
    check_request(r);
    FZ_CHECK(g_later == NULL && g_never == NULL); /* one request per connection at a time */
    if (!strncmp(r->path, "/never", 6)) {
        g_never = r;
        net_http_set_abort(r, on_abort, NULL);
        return;
    }
    if (!strncmp(r->path, "/later", 6)) {
        g_later = r;
        net_http_set_abort(r, on_abort, NULL);
        uv_timer_start(&g_later_timer, on_later, 0, 0);
        return;
    }
    answer(r);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_http");
    net_http_limits_t lim = {.max_header_bytes = FZ_MAX_HEADER_BYTES,
                             .max_headers = FZ_MAX_HEADERS,
                             .max_body = FZ_MAX_BODY,
                             .max_conns = 4,
                             .idle_timeout_ms = 0};
    if (fz_http_init(&g_h, &lim, handler, NULL)) abort();
    uv_timer_init(&g_h.loop, &g_later_timer);
    fz_http_mark(&g_h);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_http_exchange(&g_h, data, size, fz_piece_size(data, size), on_stuck, NULL);
    FZ_CHECK(g_later == NULL && g_never == NULL);
    return 0;
}
