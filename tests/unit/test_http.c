/*
 * test_http: common/net/net_http.h. Each test runs a server on 127.0.0.1:0 in a libuv
 * loop on its own thread and talks to it with plain blocking sockets from the test
 * thread (all cmocka assertions stay on the test thread; the handler only counts):
 *   - GET and POST with body (method, path, query, headers, body reach the handler),
 *     absolute-form urls, extra headers, HEAD, 404;
 *   - keep-alive (two requests on one connection), Connection: close and HTTP/1.0;
 *   - pipelined requests in one write, answered in order even when the first is
 *     deferred; deferred answers from a uv_timer;
 *   - SSE: chunked stream of several events, then the connection is reused;
 *     HTTP/1.0 stream without chunks;
 *   - client disconnect mid-stream and while a deferred answer is pending: the abort
 *     callback runs exactly once and the server keeps serving; server close aborts;
 *   - limits: oversized head (431, also split and whitespace-padded), too many headers
 *     (431), Content-Length over max_body (413, no body sent), chunked body over
 *     max_body (413), malformed requests (400 with the JSON error), max_conns;
 *   - chunked request bodies sent in pieces, Expect: 100-continue;
 *   - idle timeout (not while a request is processed) and a slowloris head trickled
 *     slower than the timeout allows;
 *   - a seeded fuzz loop of mutated and random requests, after which the server still
 *     answers and the loop closes with every handle released.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "net_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

/* ---- server side: a loop thread and a handler with a few routes ------------------------- */

typedef struct srv {
    uv_loop_t loop;
    uv_async_t stop;
    net_http_server_t *http;
    pthread_t th;
    int port, running;
    atomic_int aborts;    /* abort callbacks */
    atomic_int bad_abort; /* an abort for a request the job did not hold */
    atomic_int peer_errs; /* stream writes that returned AFD_ERR_PEER */
    atomic_int requests;  /* handler calls */
    atomic_int jobs;      /* live deferred/stream jobs */
} srv_t;

static srv_t S;

enum { JOB_DEFER, JOB_SSE, JOB_FOREVER };

typedef struct job {
    uv_timer_t t;
    net_http_req_t *req;
    int kind, n, i;
} job_t;

static void job_closed(uv_handle_t *h)
{
    free(h->data);
    atomic_fetch_sub(&S.jobs, 1);
}

static void job_finish(job_t *j)
{
    j->req = NULL;
    uv_timer_stop(&j->t);
    uv_close((uv_handle_t *)&j->t, job_closed);
}

static void job_abort(void *ud, net_http_req_t *req)
{
    job_t *j = ud;
    if (j->req != req) atomic_fetch_add(&S.bad_abort, 1);
    atomic_fetch_add(&S.aborts, 1);
    job_finish(j);
}

static void job_tick(uv_timer_t *t)
{
    job_t *j = t->data;
    char ev[64];
    if (j->kind == JOB_DEFER) {
        int n = snprintf(ev, sizeof(ev), "deferred %d", j->n);
        net_http_respond(j->req, 200, "text/plain", ev, (size_t)n, NULL);
        job_finish(j);
        return;
    }
    int n = snprintf(ev, sizeof(ev), "data: %d\n\n", j->i);
    if (net_http_stream_write(j->req, ev, (size_t)n) != AFD_OK) {
        atomic_fetch_add(&S.peer_errs, 1);
        uv_timer_stop(t); /* the abort callback follows */
        return;
    }
    j->i++;
    if (j->kind == JOB_SSE && j->i == j->n) {
        net_http_stream_end(j->req);
        job_finish(j);
    }
}

static long qint(const char *q, const char *key, long def)
{
    size_t kl = strlen(key);
    for (const char *p = q; p && *p; p = strchr(p, '&'), p = p ? p + 1 : NULL)
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') return strtol(p + kl + 1, NULL, 10);
    return def;
}

static void job_start(uv_loop_t *loop, net_http_req_t *req, int kind)
{
    job_t *j = calloc(1, sizeof(*j));
    uv_timer_init(loop, &j->t);
    j->t.data = j;
    j->req = req;
    j->kind = kind;
    j->n = (int)qint(req->query, "n", 3);
    long ms = qint(req->query, "ms", 5);
    atomic_fetch_add(&S.jobs, 1);
    net_http_set_abort(req, job_abort, j);
    if (kind == JOB_DEFER) {
        uv_timer_start(&j->t, job_tick, (uint64_t)ms, 0);
    } else {
        net_http_stream_begin(req, 200, "text/event-stream", NULL);
        uv_timer_start(&j->t, job_tick, (uint64_t)ms, (uint64_t)ms);
    }
}

static void handler(void *arg, net_http_req_t *req)
{
    srv_t *s = arg;
    atomic_fetch_add(&s->requests, 1);
    if (strcmp(req->path, "/echo") == 0) {
        const char *xt = net_http_header(req, "X-Test");
        size_t cap =
            req->body_len + strlen(req->path) + strlen(req->query) + (xt ? strlen(xt) : 0) + 64;
        char *out = malloc(cap);
        int n = snprintf(out, cap, "%s %s %s %s %zu|", req->method, req->path, req->query,
                         xt ? xt : "-", req->body_len);
        memcpy(out + n, req->body, req->body_len);
        net_http_respond(req, 200, "text/plain", out, (size_t)n + req->body_len, NULL);
        free(out);
    } else if (strcmp(req->path, "/hdr") == 0) {
        net_http_respond(req, 201, "application/json", "{}", 2, "X-Extra: yes\r\nX-Two: 2");
    } else if (strcmp(req->path, "/defer") == 0) {
        job_start(&s->loop, req, JOB_DEFER);
    } else if (strcmp(req->path, "/sse") == 0) {
        job_start(&s->loop, req, JOB_SSE);
    } else if (strcmp(req->path, "/forever") == 0) {
        job_start(&s->loop, req, JOB_FOREVER);
    } else {
        static const char nf[] = "{\"error\":{\"message\":\"not found\"}}";
        net_http_respond(req, 404, "application/json", nf, sizeof(nf) - 1, NULL);
    }
}

static void *srv_main(void *arg)
{
    (void)arg;
    uv_run(&S.loop, UV_RUN_DEFAULT);
    return NULL;
}

static void on_stop(uv_async_t *a)
{
    net_http_server_close(S.http);
    uv_close((uv_handle_t *)a, NULL);
}

static void srv_start(int max_header_bytes, int max_headers, int max_body, int max_conns,
                      int idle_ms)
{
    memset(&S, 0, sizeof(S));
    net_http_limits_t lim = {(size_t)max_header_bytes, max_headers, (size_t)max_body, max_conns,
                             idle_ms};
    assert_int_equal(uv_loop_init(&S.loop), 0);
    assert_int_equal(net_http_server_create(&S.loop, "127.0.0.1", 0, &lim, handler, &S, &S.http),
                     AFD_OK);
    S.port = net_http_port(S.http);
    assert_true(S.port > 0);
    assert_int_equal(uv_async_init(&S.loop, &S.stop, on_stop), 0);
    assert_int_equal(pthread_create(&S.th, NULL, srv_main, NULL), 0);
    S.running = 1;
}

static void srv_default(void)
{
    srv_start(16384, 64, 1 << 20, 256, 0);
}

/* closes the server and joins its loop: every handle must be gone (uv_loop_close) */
static void srv_stop(void)
{
    if (!S.running) return;
    S.running = 0;
    uv_async_send(&S.stop);
    pthread_join(S.th, NULL);
    assert_int_equal(uv_loop_close(&S.loop), 0);
    assert_int_equal(atomic_load(&S.jobs), 0);
    assert_int_equal(atomic_load(&S.bad_abort), 0);
}

static int teardown(void **state)
{
    (void)state;
    srv_stop();
    return 0;
}

/* ---- client side: blocking sockets ------------------------------------------------------ */

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

typedef struct cli {
    int fd;
    size_t len;
    char buf[1 << 16];
} cli_t;

static cli_t *cli_open(void)
{
    cli_t *c = calloc(1, sizeof(*c));
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(c->fd >= 0);
    struct timeval tv = {3, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)S.port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(c->fd, (struct sockaddr *)&a, sizeof(a)), 0);
    return c;
}

static void cli_close(cli_t *c)
{
    if (!c) return;
    close(c->fd);
    free(c);
}

/* closes with a reset instead of a FIN */
static void cli_reset(cli_t *c)
{
    struct linger lg = {1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    cli_close(c);
}

static int cli_send(cli_t *c, const void *p, size_t n)
{
    const char *s = p;
    while (n > 0) {
        ssize_t k = send(c->fd, s, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        s += k;
        n -= (size_t)k;
    }
    return 0;
}

static int cli_sends(cli_t *c, const char *s)
{
    return cli_send(c, s, strlen(s));
}

/* reads more; returns bytes read, 0 on EOF, -1 on error or timeout */
static int cli_fill(cli_t *c)
{
    if (c->len == sizeof(c->buf)) return -1;
    ssize_t k;
    do
        k = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
    while (k < 0 && errno == EINTR);
    if (k > 0) c->len += (size_t)k;
    return (int)k;
}

static int cli_need(cli_t *c, size_t n)
{
    while (c->len < n)
        if (cli_fill(c) <= 0) return -1;
    return 0;
}

static void cli_take(cli_t *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

/* waits until the server closes the connection (EOF or reset); discards data */
static int cli_closed(cli_t *c, int ms)
{
    long end = now_ms() + ms;
    for (;;) {
        long left = end - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = {c->fd, POLLIN, 0};
        if (poll(&p, 1, (int)left) <= 0) continue;
        char tmp[4096];
        ssize_t k = recv(c->fd, tmp, sizeof(tmp), 0);
        if (k == 0 || (k < 0 && errno == ECONNRESET)) return 1;
        if (k < 0 && errno != EINTR && errno != EAGAIN) return 1;
    }
}

typedef struct resp {
    int status;
    char head[8192];
    char body[1 << 16];
    size_t body_len;
    int nchunks;
} resp_t;

static resp_t R; /* the last response read */

static int resp_hdr(const resp_t *r, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    for (const char *l = strstr(r->head, "\r\n"); l; l = strstr(l, "\r\n")) {
        l += 2;
        if (strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
            const char *v = l + nl + 1;
            while (*v == ' ')
                v++;
            size_t n = strcspn(v, "\r");
            if (n >= cap) n = cap - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return 1;
        }
    }
    return 0;
}

static int resp_has(const resp_t *r, const char *name, const char *value)
{
    char v[256];
    return resp_hdr(r, name, v, sizeof(v)) && strcasecmp(v, value) == 0;
}

/* reads one response (head_req: the request was HEAD, no body follows); 0 or -1 */
static int cli_read_resp_ex(cli_t *c, resp_t *r, int head_req)
{
    memset(r, 0, offsetof(resp_t, body));
    r->body_len = 0;
    r->nchunks = 0;
    r->body[0] = 0;
    char *e;
    while (!(e = memmem(c->buf, c->len, "\r\n\r\n", 4)))
        if (cli_fill(c) <= 0) return -1;
    size_t hl = (size_t)(e - c->buf) + 4;
    if (hl >= sizeof(r->head)) return -1;
    memcpy(r->head, c->buf, hl);
    r->head[hl] = 0;
    cli_take(c, hl);
    if (sscanf(r->head, "HTTP/1.%*d %d", &r->status) != 1) return -1;
    if (r->status < 200 || head_req) return 0;
    char v[64];
    if (resp_hdr(r, "transfer-encoding", v, sizeof(v)) && strcasecmp(v, "chunked") == 0) {
        for (;;) {
            char *le;
            while (!(le = memmem(c->buf, c->len, "\r\n", 2)))
                if (cli_fill(c) <= 0) return -1;
            size_t n = strtoul(c->buf, NULL, 16);
            cli_take(c, (size_t)(le - c->buf) + 2);
            if (cli_need(c, n + 2) < 0) return -1;
            if (memcmp(c->buf + n, "\r\n", 2) != 0) return -1;
            if (n == 0) {
                cli_take(c, 2);
                return 0;
            }
            if (r->body_len + n >= sizeof(r->body)) return -1;
            memcpy(r->body + r->body_len, c->buf, n);
            r->body_len += n;
            r->body[r->body_len] = 0;
            r->nchunks++;
            cli_take(c, n + 2);
        }
    }
    if (resp_hdr(r, "content-length", v, sizeof(v))) {
        size_t n = strtoul(v, NULL, 10);
        if (n >= sizeof(r->body) || cli_need(c, n) < 0) return -1;
        memcpy(r->body, c->buf, n);
        r->body_len = n;
        cli_take(c, n);
    } else { /* until the connection closes */
        while (cli_fill(c) > 0) {
        }
        size_t n = c->len < sizeof(r->body) - 1 ? c->len : sizeof(r->body) - 1;
        memcpy(r->body, c->buf, n);
        r->body_len = n;
        cli_take(c, c->len);
    }
    r->body[r->body_len] = 0;
    return 0;
}

static int cli_read_resp(cli_t *c, resp_t *r)
{
    return cli_read_resp_ex(c, r, 0);
}

/* sends raw and reads one response into R; returns its status (-1: none) */
static int roundtrip(cli_t *c, const char *raw)
{
    if (cli_sends(c, raw) < 0) return -1;
    if (cli_read_resp(c, &R) < 0) return -1;
    return R.status;
}

static int wait_counter(atomic_int *v, int want, int ms)
{
    long end = now_ms() + ms;
    while (atomic_load(v) < want && now_ms() < end)
        sleep_ms(2);
    return atomic_load(v);
}

static void assert_json_error(const resp_t *r, int code)
{
    char tail[96];
    snprintf(tail, sizeof(tail), "\",\"type\":\"invalid_request_error\",\"code\":%d}}", code);
    assert_int_equal(r->status, code);
    assert_true(resp_has(r, "content-type", "application/json"));
    assert_true(resp_has(r, "connection", "close"));
    assert_memory_equal(r->body, "{\"error\":{\"message\":\"", 21);
    assert_true(r->body_len > strlen(tail));
    assert_string_equal(r->body + r->body_len - strlen(tail), tail);
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_get_post(void **state)
{
    (void)state;
    srv_default();
    cli_t *c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo?a=1&b=2 HTTP/1.1\r\nHost: x\r\nx-test:  hv  \r\n\r\n"),
                     200);
    assert_string_equal(R.body, "GET /echo a=1&b=2 hv 0|");
    assert_true(resp_has(&R, "content-type", "text/plain"));
    assert_true(resp_has(&R, "connection", "keep-alive"));
    assert_true(resp_has(&R, "content-length", "23"));

    assert_int_equal(roundtrip(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
                                  "X-TEST: v\r\n\r\nhello world"),
                     200);
    assert_string_equal(R.body, "POST /echo  v 11|hello world");

    assert_int_equal(roundtrip(c, "GET /hdr HTTP/1.1\r\nHost: x\r\n\r\n"), 201);
    assert_true(resp_has(&R, "x-extra", "yes"));
    assert_true(resp_has(&R, "x-two", "2"));
    assert_string_equal(R.body, "{}");

    assert_int_equal(roundtrip(c, "GET http://x:1/echo?z=1#frag HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "GET /echo z=1 - 0|");

    assert_int_equal(roundtrip(c, "DELETE /nope HTTP/1.1\r\nHost: x\r\n\r\n"), 404);

    /* HEAD: the length of the body, not the body */
    assert_int_equal(cli_sends(c, "HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    assert_int_equal(cli_read_resp_ex(c, &R, 1), 0);
    assert_int_equal(R.status, 200);
    assert_true(resp_has(&R, "content-length", "16"));
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "GET /echo  - 0|");
    assert_int_equal(c->len, 0);
    cli_close(c);
    assert_int_equal(atomic_load(&S.requests), 7);
    srv_stop();
}

static void test_keepalive(void **state)
{
    (void)state;
    srv_default();
    cli_t *c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo?i=1 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "GET /echo i=1 - 0|");
    assert_int_equal(roundtrip(c, "GET /echo?i=2 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "GET /echo i=2 - 0|");
    assert_int_equal(roundtrip(c, "GET /echo?i=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                     200);
    assert_true(resp_has(&R, "connection", "close"));
    assert_int_equal(cli_closed(c, 2000), 1);
    cli_close(c);

    /* HTTP/1.0: closes unless asked to keep alive */
    c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.0\r\n\r\n"), 200);
    assert_true(resp_has(&R, "connection", "close"));
    assert_int_equal(cli_closed(c, 2000), 1);
    cli_close(c);
    c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), 200);
    assert_true(resp_has(&R, "connection", "keep-alive"));
    assert_int_equal(roundtrip(c, "GET /echo?x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), 200);
    cli_close(c);
    srv_stop();
}

static void test_pipelined(void **state)
{
    (void)state;
    srv_default();
    cli_t *c = cli_open();
    /* the first is answered 50 ms later; the others must wait for it */
    const char *raw = "GET /defer?ms=50&n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                      "GET /echo?i=2 HTTP/1.1\r\nHost: x\r\n\r\n"
                      "POST /echo?i=3 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                      "GET /defer?ms=1&n=4 HTTP/1.1\r\nHost: x\r\n\r\n"
                      "GET /echo?i=5 HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_int_equal(cli_sends(c, raw), 0);
    const char *want[] = {"deferred 1", "GET /echo i=2 - 0|", "POST /echo i=3 - 3|abc",
                          "deferred 4", "GET /echo i=5 - 0|"};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(cli_read_resp(c, &R), 0);
        assert_int_equal(R.status, 200);
        assert_string_equal(R.body, want[i]);
    }
    /* many small ones in one write, more than one read buffer's worth */
    char *big = malloc(64 * 1024);
    size_t n = 0;
    for (int i = 0; i < 800; i++)
        n += (size_t)sprintf(big + n, "GET /echo?i=%d HTTP/1.1\r\nHost: x\r\n\r\n", i);
    assert_int_equal(cli_send(c, big, n), 0);
    for (int i = 0; i < 800; i++) {
        char w[64];
        snprintf(w, sizeof(w), "GET /echo i=%d - 0|", i);
        assert_int_equal(cli_read_resp(c, &R), 0);
        assert_string_equal(R.body, w);
    }
    free(big);
    cli_close(c);
    srv_stop();
}

static void test_deferred(void **state)
{
    (void)state;
    srv_default();
    cli_t *c = cli_open();
    long t0 = now_ms();
    assert_int_equal(roundtrip(c, "GET /defer?ms=40&n=7 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_true(now_ms() - t0 >= 35);
    assert_string_equal(R.body, "deferred 7");
    assert_int_equal(roundtrip(c, "GET /defer?ms=1&n=8 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "deferred 8");
    cli_close(c);
    srv_stop();
    assert_int_equal(atomic_load(&S.aborts), 0);
}

static void test_sse(void **state)
{
    (void)state;
    srv_default();
    cli_t *c = cli_open();
    assert_int_equal(roundtrip(c, "GET /sse?n=5&ms=2 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_true(resp_has(&R, "content-type", "text/event-stream"));
    assert_true(resp_has(&R, "transfer-encoding", "chunked"));
    assert_true(resp_has(&R, "cache-control", "no-cache"));
    assert_true(resp_has(&R, "connection", "keep-alive"));
    char tmp[16];
    assert_false(resp_hdr(&R, "content-length", tmp, sizeof(tmp)));
    assert_int_equal(R.nchunks, 5);
    assert_string_equal(R.body, "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n");
    /* the connection is reused after the stream */
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_int_equal(roundtrip(c, "GET /sse?n=2&ms=1 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_int_equal(R.nchunks, 2);
    cli_close(c);

    /* HTTP/1.0 has no chunks: the body ends with the connection */
    c = cli_open();
    assert_int_equal(roundtrip(c, "GET /sse?n=3&ms=1 HTTP/1.0\r\n\r\n"), 200);
    assert_false(resp_hdr(&R, "transfer-encoding", tmp, sizeof(tmp)));
    assert_true(resp_has(&R, "connection", "close"));
    assert_string_equal(R.body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
    cli_close(c);
    srv_stop();
    assert_int_equal(atomic_load(&S.aborts), 0);
}

static void test_disconnect(void **state)
{
    (void)state;
    srv_default();
    cli_t *a = cli_open(), *b = cli_open();
    assert_int_equal(cli_sends(a, "GET /forever?ms=2 HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    while (!memmem(a->buf, a->len, "data: 1", 7))
        assert_true(cli_fill(a) > 0);
    assert_int_equal(roundtrip(b, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    cli_close(a); /* mid-stream */
    assert_int_equal(wait_counter(&S.aborts, 1, 2000), 1);
    assert_int_equal(roundtrip(b, "GET /echo?again HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    cli_t *c = cli_open();
    assert_int_equal(roundtrip(c, "GET /sse?n=2&ms=1 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_int_equal(R.nchunks, 2);

    /* a reset mid-stream */
    a = cli_open();
    assert_int_equal(cli_sends(a, "GET /forever?ms=1 HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    while (!memmem(a->buf, a->len, "data: 2", 7))
        assert_true(cli_fill(a) > 0);
    cli_reset(a);
    assert_int_equal(wait_counter(&S.aborts, 2, 2000), 2);

    /* gone while a deferred answer is pending (seen as EOF, not at the write) */
    a = cli_open();
    assert_int_equal(cli_sends(a, "GET /defer?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    assert_int_equal(wait_counter(&S.requests, 6, 2000), 6);
    cli_close(a);
    assert_int_equal(wait_counter(&S.aborts, 3, 2000), 3);

    sleep_ms(50);
    assert_int_equal(atomic_load(&S.aborts), 3);
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    cli_close(b);
    cli_close(c);
    srv_stop();
    assert_int_equal(atomic_load(&S.aborts), 3);
}

static void test_server_close_aborts(void **state)
{
    (void)state;
    srv_default();
    cli_t *a = cli_open(), *b = cli_open();
    assert_int_equal(cli_sends(a, "GET /defer?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    assert_int_equal(cli_sends(b, "GET /forever?ms=3 HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    assert_int_equal(wait_counter(&S.requests, 2, 2000), 2);
    srv_stop();
    assert_int_equal(atomic_load(&S.aborts), 2);
    assert_int_equal(cli_closed(a, 2000), 1);
    assert_int_equal(cli_closed(b, 2000), 1);
    cli_close(a);
    cli_close(b);
}

static void test_oversized_headers(void **state)
{
    (void)state;
    srv_start(1024, 64, 1 << 20, 64, 0);
    char *raw = malloc(16384);
    char *pad = malloc(8192);

    /* under the limit */
    memset(pad, 'a', 800);
    pad[800] = 0;
    cli_t *c = cli_open();
    snprintf(raw, 16384, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Test: %s\r\n\r\n", pad);
    assert_int_equal(roundtrip(c, raw), 200);
    cli_close(c);

    /* one header value over it */
    memset(pad, 'a', 2000);
    pad[2000] = 0;
    c = cli_open();
    snprintf(raw, 16384, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Test: %s\r\n\r\n", pad);
    assert_int_equal(roundtrip(c, raw), 431);
    assert_json_error(&R, 431);
    assert_int_equal(cli_closed(c, 2000), 1);
    cli_close(c);

    /* a long url, sent in small pieces */
    c = cli_open();
    snprintf(raw, 16384, "GET /echo?%s HTTP/1.1\r\nHost: x\r\n\r\n", pad);
    size_t n = strlen(raw);
    for (size_t off = 0; off < n; off += 100) {
        if (cli_send(c, raw + off, n - off < 100 ? n - off : 100) < 0) break;
    }
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_json_error(&R, 431);
    cli_close(c);

    /* many small headers adding up */
    c = cli_open();
    n = (size_t)sprintf(raw, "GET /echo HTTP/1.1\r\n");
    for (int i = 0; i < 60; i++)
        n += (size_t)sprintf(raw + n, "X-H%02d: %040d\r\n", i, i);
    strcpy(raw + n, "\r\n");
    assert_int_equal(roundtrip(c, raw), 431);
    cli_close(c);

    /* whitespace the parser skips (or the handler never sees) is still counted */
    memset(pad, ' ', 6000);
    pad[6000] = 0;
    static const char *ws_fmt[] = {"GET /echo HTTP/1.1\r\nHost: x\r\nX-Test:%sv\r\n\r\n",
                                   "GET /echo HTTP/1.1\r\nHost: x\r\nX-Test: v%s\r\n\r\n"};
    for (int i = 0; i < 2; i++) {
        c = cli_open();
        snprintf(raw, 16384, ws_fmt[i], pad);
        int st = roundtrip(c, raw);
        if (st != 431) print_error("whitespace-padded head %d: status %d\n", i, st);
        assert_json_error(&R, 431);
        assert_int_equal(cli_closed(c, 2000), 1);
        cli_close(c);
    }
    /* trailing whitespace is not part of a value */
    c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.1\r\nX-Test: \t v w \t \r\n\r\n"), 200);
    assert_string_equal(R.body, "GET /echo  v w 0|");
    cli_close(c);

    /* the server still answers */
    c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    cli_close(c);
    free(raw);
    free(pad);
    srv_stop();
}

static void test_too_many_headers(void **state)
{
    (void)state;
    srv_start(16384, 8, 1 << 20, 64, 0);
    char raw[4096];
    for (int nh = 8; nh <= 9; nh++) {
        size_t n = (size_t)sprintf(raw, "GET /echo HTTP/1.1\r\n");
        for (int i = 0; i < nh; i++)
            n += (size_t)sprintf(raw + n, "X-H%d: %d\r\n", i, i);
        strcpy(raw + n, "\r\n");
        cli_t *c = cli_open();
        if (nh == 8) {
            assert_int_equal(roundtrip(c, raw), 200);
        } else {
            assert_int_equal(roundtrip(c, raw), 431);
            assert_json_error(&R, 431);
            assert_int_equal(cli_closed(c, 2000), 1);
        }
        cli_close(c);
    }
    srv_stop();
}

static void test_body_limits(void **state)
{
    (void)state;
    srv_start(16384, 64, 1024, 64, 0);
    /* 413 from the header alone: the body is never sent */
    cli_t *c = cli_open();
    assert_int_equal(
        roundtrip(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"), 413);
    assert_json_error(&R, 413);
    assert_int_equal(cli_closed(c, 2000), 1);
    cli_close(c);

    /* exactly max_body is fine */
    char *raw = malloc(4096);
    c = cli_open();
    int n = sprintf(raw, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n");
    memset(raw + n, 'b', 1024);
    assert_int_equal(cli_send(c, raw, (size_t)n + 1024), 0);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_int_equal(R.status, 200);
    assert_int_equal(R.body_len, strlen("POST /echo  - 1024|") + 1024);
    cli_close(c);

    /* chunked over max_body */
    c = cli_open();
    assert_int_equal(
        cli_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), 0);
    memset(raw, 'c', 600);
    for (int i = 0; i < 2; i++) {
        if (cli_sends(c, "258\r\n") < 0 || cli_send(c, raw, 600) < 0 || cli_sends(c, "\r\n") < 0)
            break;
    }
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_json_error(&R, 413);
    cli_close(c);
    free(raw);
    srv_stop();
}

static void test_malformed(void **state)
{
    (void)state;
    srv_default();
    static const char *bad[] = {
        "GARBAGE\r\n\r\n",
        "GET /echo HTTP/1.1\r\nBad Header\r\n\r\n",
        "GET /echo HTTP/9.9\r\n\r\n",
        "GET /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "GET /ec\x01ho HTTP/1.1\r\n\r\n",
        "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cli_t *c = cli_open();
        assert_int_equal(roundtrip(c, bad[i]), 400);
        assert_json_error(&R, 400);
        assert_int_equal(cli_closed(c, 2000), 1);
        cli_close(c);
    }
    /* a NUL in the request line */
    cli_t *c = cli_open();
    assert_int_equal(cli_send(c, "GET /\0 HTTP/1.1\r\n\r\n", 19), 0);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_json_error(&R, 400);
    cli_close(c);
    /* a malformed second request after a good one: the first is answered */
    c = cli_open();
    assert_int_equal(cli_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n"), 0);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_int_equal(R.status, 200);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_json_error(&R, 400);
    cli_close(c);
    assert_int_equal(atomic_load(&S.requests), 1);
    srv_stop();
}

static void test_chunked_body(void **state)
{
    (void)state;
    srv_default();
    cli_t *c = cli_open();
    assert_int_equal(cli_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\n"
                                  "Transfer-Encoding: chunked\r\n\r\n5\r\nhel"),
                     0);
    sleep_ms(5);
    assert_int_equal(cli_sends(c, "lo\r\n6;ext=1\r\n world\r\n"), 0);
    sleep_ms(5);
    assert_int_equal(cli_sends(c, "0\r\nTrailer: x\r\n\r\n"), 0);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_int_equal(R.status, 200);
    assert_string_equal(R.body, "POST /echo  - 11|hello world");
    /* an empty chunked body */
    assert_int_equal(roundtrip(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                                  "\r\n\r\n0\r\n\r\n"),
                     200);
    assert_string_equal(R.body, "POST /echo  - 0|");

    /* Expect: 100-continue gets the interim answer before the body is sent */
    assert_int_equal(cli_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                  "Expect: 100-continue\r\n\r\n"),
                     0);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_int_equal(R.status, 100);
    assert_int_equal(cli_sends(c, "abcd"), 0);
    assert_int_equal(cli_read_resp(c, &R), 0);
    assert_int_equal(R.status, 200);
    assert_string_equal(R.body, "POST /echo  - 4|abcd");
    cli_close(c);
    srv_stop();
}

static void test_max_conns(void **state)
{
    (void)state;
    srv_start(16384, 64, 1 << 20, 2, 0);
    cli_t *a = cli_open(), *b = cli_open();
    assert_int_equal(roundtrip(a, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_int_equal(roundtrip(b, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    cli_t *c = cli_open();
    assert_int_equal(cli_closed(c, 2000), 1); /* closed at accept */
    cli_close(c);
    cli_close(a);
    /* once a is gone, a new one is served */
    int ok = 0;
    for (long end = now_ms() + 2000; !ok && now_ms() < end;) {
        c = cli_open();
        ok = roundtrip(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n") == 200;
        cli_close(c);
        if (!ok) sleep_ms(10);
    }
    assert_true(ok);
    assert_int_equal(roundtrip(b, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    cli_close(b);
    srv_stop();
}

static void test_idle_timeout(void **state)
{
    (void)state;
    srv_start(16384, 64, 1 << 20, 64, 200);
    /* nothing sent */
    cli_t *a = cli_open();
    long t0 = now_ms();
    assert_int_equal(cli_closed(a, 3000), 1);
    long dt = now_ms() - t0;
    assert_true(dt >= 150 && dt < 2000);
    cli_close(a);
    /* idle after an answer */
    a = cli_open();
    assert_int_equal(roundtrip(a, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    t0 = now_ms();
    assert_int_equal(cli_closed(a, 3000), 1);
    assert_true(now_ms() - t0 >= 150);
    cli_close(a);
    /* no timeout while the handler works (400 ms > 200 ms), nor while streaming */
    a = cli_open();
    assert_int_equal(roundtrip(a, "GET /defer?ms=400&n=1 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "deferred 1");
    assert_int_equal(roundtrip(a, "GET /sse?n=4&ms=100 HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_int_equal(R.nchunks, 4);
    /* activity keeps it open: requests every 100 ms for 600 ms */
    for (int i = 0; i < 6; i++) {
        sleep_ms(100);
        assert_int_equal(roundtrip(a, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    }
    cli_close(a);
    srv_stop();
    assert_int_equal(atomic_load(&S.aborts), 0);
}

static void test_slowloris(void **state)
{
    (void)state;
    srv_start(16384, 64, 1 << 20, 64, 300);
    cli_t *a = cli_open();
    long t0 = now_ms();
    assert_int_equal(cli_sends(a, "GET /echo HTTP/1.1\r\n"), 0);
    int closed = 0;
    while (!closed && now_ms() - t0 < 3000) {
        sleep_ms(50);
        if (cli_sends(a, "X-a: b\r\n") < 0) break;
        struct pollfd p = {a->fd, POLLIN, 0};
        if (poll(&p, 1, 0) > 0) closed = cli_closed(a, 100);
    }
    if (!closed) closed = cli_closed(a, 500);
    long dt = now_ms() - t0;
    assert_true(dt >= 250 && dt < 1500);
    cli_close(a);
    /* a slow body is progress, a complete request within the timeout is fine */
    a = cli_open();
    assert_int_equal(cli_sends(a, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n"),
                     0);
    for (int i = 0; i < 6; i++) {
        sleep_ms(100);
        assert_int_equal(cli_sends(a, "z"), 0);
    }
    assert_int_equal(cli_read_resp(a, &R), 0);
    assert_string_equal(R.body, "POST /echo  - 6|zzzzzz");
    cli_close(a);
    srv_stop();
}

static uint64_t rng_state;

static uint32_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return (uint32_t)(x >> 11);
}

static const char special[] = "\r\n :;\t\0?/#%0123456789abcdefHTP.-";

/* one random edit of msg[0..n): returns the new length (<= cap) */
static size_t mutate(char *msg, size_t n, size_t cap)
{
    size_t at = rnd() % n;
    uint32_t op = rnd() % 6;
    if (op == 0) {
        msg[at] = (char)rnd();
    } else if (op == 1) {
        msg[at] = special[rnd() % (sizeof(special) - 1)];
    } else if (op == 2 && n + 1 < cap) { /* insert */
        memmove(msg + at + 1, msg + at, n - at);
        msg[at] = special[rnd() % (sizeof(special) - 1)];
        n++;
    } else if (op == 3) { /* delete */
        memmove(msg + at, msg + at + 1, n - at - 1);
        n--;
    } else if (op == 4) { /* truncate */
        n = at;
    } else if (op == 5) { /* repeat a span */
        size_t len = 1 + rnd() % 64;
        if (at + len > n) len = n - at;
        if (n + len < cap) {
            memmove(msg + at + len, msg + at, n - at);
            n += len;
        }
    }
    return n;
}

static void test_fuzz(void **state)
{
    (void)state;
    srv_start(2048, 16, 4096, 64, 2000);
    static const char *base[] = {
        "POST /echo?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Test: t\r\n\r\nhello",
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "GET /defer?ms=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\n\r\n",
        "GET /sse?n=2&ms=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    };
    rng_state = 0x9e3779b97f4a7c15ull;
    char msg[2048];
    for (int it = 0; it < 400; it++) {
        size_t n;
        if (rnd() % 8 == 0) { /* pure noise */
            n = 1 + rnd() % 300;
            for (size_t i = 0; i < n; i++)
                msg[i] = (char)rnd();
        } else {
            const char *b = base[rnd() % 4];
            n = strlen(b);
            memcpy(msg, b, n);
            int muts = 1 + (int)(rnd() % 4);
            for (int m = 0; m < muts && n > 0; m++)
                n = mutate(msg, n, sizeof(msg));
        }
        cli_t *c = cli_open();
        size_t cut = n ? rnd() % (n + 1) : 0;
        if (cli_send(c, msg, cut) == 0) cli_send(c, msg + cut, n - cut); /* may be refused */
        if (it % 4 == 3) {
            cli_reset(c);
            continue;
        }
        shutdown(c->fd, SHUT_WR);
        /* whatever it makes of it, the server closes once the client is done */
        assert_int_equal(cli_closed(c, 3000), 1);
        cli_close(c);
    }
    cli_t *c = cli_open();
    assert_int_equal(roundtrip(c, "GET /echo?after HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    assert_string_equal(R.body, "GET /echo after - 0|");
    cli_close(c);
    srv_stop();
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_get_post, teardown),
        cmocka_unit_test_teardown(test_keepalive, teardown),
        cmocka_unit_test_teardown(test_pipelined, teardown),
        cmocka_unit_test_teardown(test_deferred, teardown),
        cmocka_unit_test_teardown(test_sse, teardown),
        cmocka_unit_test_teardown(test_disconnect, teardown),
        cmocka_unit_test_teardown(test_server_close_aborts, teardown),
        cmocka_unit_test_teardown(test_oversized_headers, teardown),
        cmocka_unit_test_teardown(test_too_many_headers, teardown),
        cmocka_unit_test_teardown(test_body_limits, teardown),
        cmocka_unit_test_teardown(test_malformed, teardown),
        cmocka_unit_test_teardown(test_chunked_body, teardown),
        cmocka_unit_test_teardown(test_max_conns, teardown),
        cmocka_unit_test_teardown(test_idle_timeout, teardown),
        cmocka_unit_test_teardown(test_slowloris, teardown),
        cmocka_unit_test_teardown(test_fuzz, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
