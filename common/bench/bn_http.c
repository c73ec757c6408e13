/* bn_http: a one-request-per-connection HTTP/1.1 client on libuv with llhttp; SSE splitting. */
#define _GNU_SOURCE
#include "bn_http.h"

#include "afd_log.h"
#include "llhttp.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

afd_status_t bn_url_parse(const char *url, bn_url_t *out)
{
    bn_url_t u;
    memset(&u, 0, sizeof(u));
    if (strncmp(url, "http://", 7)) {
        afd_error("url '%s': only http:// URLs are supported", url);
        return AFD_ERR_INVALID;
    }
    const char *h = url + 7, *slash = strchr(h, '/');
    size_t hl = slash ? (size_t)(slash - h) : strlen(h);
    const char *hend = h + hl, *colon = NULL;
    if (hl && h[0] == '[') { /* [v6]:port */
        const char *rb = memchr(h, ']', hl);
        if (!rb) goto bad;
        if (rb + 1 < hend && rb[1] == ':') colon = rb + 1;
        if ((size_t)(rb - h - 1) >= sizeof(u.host)) goto bad;
        memcpy(u.host, h + 1, (size_t)(rb - h - 1));
    } else {
        colon = memchr(h, ':', hl);
        size_t n = colon ? (size_t)(colon - h) : hl;
        if (n == 0 || n >= sizeof(u.host)) goto bad;
        memcpy(u.host, h, n);
    }
    u.port = 80;
    if (colon) {
        char *end;
        long p = strtol(colon + 1, &end, 10);
        if (end != hend || p < 1 || p > 65535) goto bad;
        u.port = (int)p;
    }
    if (slash) {
        size_t bl = strlen(slash);
        while (bl > 0 && slash[bl - 1] == '/')
            bl--;
        if (bl >= sizeof(u.base)) goto bad;
        memcpy(u.base, slash, bl);
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    char port[16];
    snprintf(port, sizeof(port), "%d", u.port);
    int rc = getaddrinfo(u.host, port, &hints, &res);
    if (rc || !res) {
        afd_error("url '%s': cannot resolve '%s': %s", url, u.host, gai_strerror(rc));
        return AFD_ERR_NOT_FOUND;
    }
    memcpy(&u.addr, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    *out = u;
    return AFD_OK;
bad:
    afd_error("url '%s': expected http://host[:port][/path]", url);
    return AFD_ERR_INVALID;
}

/* ---- one exchange ---- */

typedef struct bn_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_connect_t connect;
    uv_write_t write;
    llhttp_t parser;
    bn_http_cb_t cb;
    void *ud;
    char *req; /* the request bytes */
    size_t req_len;
    char rbuf[64 * 1024];
    int closing, done, handles, timer_on;
} bn_conn_t;

static void conn_closed(uv_handle_t *h)
{
    bn_conn_t *c = h->data;
    if (--c->handles == 0) {
        free(c->req);
        free(c);
    }
}

/* reports the outcome once and closes the connection */
static void conn_finish(bn_conn_t *c, afd_status_t st, const char *why)
{
    if (!c->done) {
        c->done = 1;
        c->cb.on_done(c->ud, st, why);
    }
    if (c->closing) return;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    uv_close((uv_handle_t *)&c->timer, conn_closed);
}

static int on_headers_complete(llhttp_t *p)
{
    bn_conn_t *c = p->data;
    if (c->cb.on_status) c->cb.on_status(c->ud, p->status_code);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    bn_conn_t *c = p->data;
    if (c->cb.on_body && !c->done) c->cb.on_body(c->ud, at, n);
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    bn_conn_t *c = p->data;
    conn_finish(c, AFD_OK, NULL);
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    bn_conn_t *c = h->data;
    *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    bn_conn_t *c = s->data;
    if (c->closing || n == 0) return;
    if (n < 0) {
        if (c->done) return;
        if (n == UV_EOF && llhttp_finish(&c->parser) == HPE_OK) {
            conn_finish(c, AFD_OK, NULL); /* a body ended by the close */
            return;
        }
        char why[128];
        snprintf(why, sizeof(why), "connection: %s",
                 n == UV_EOF ? "closed before the response ended" : uv_strerror((int)n));
        conn_finish(c, AFD_ERR_PEER, why);
        return;
    }
    llhttp_errno_t e = llhttp_execute(&c->parser, buf->base, (size_t)n);
    if (e != HPE_OK && e != HPE_PAUSED) {
        char why[160];
        snprintf(why, sizeof(why), "malformed response: %s", llhttp_get_error_reason(&c->parser));
        conn_finish(c, AFD_ERR_FORMAT, why);
    }
}

static void on_written(uv_write_t *w, int status)
{
    bn_conn_t *c = w->data;
    if (status < 0 && !c->closing) {
        char why[128];
        snprintf(why, sizeof(why), "write: %s", uv_strerror(status));
        conn_finish(c, AFD_ERR_IO, why);
    }
}

static void on_connect(uv_connect_t *r, int status)
{
    bn_conn_t *c = r->data;
    if (c->closing) return;
    if (status < 0) {
        char why[128];
        snprintf(why, sizeof(why), "connect: %s", uv_strerror(status));
        conn_finish(c, AFD_ERR_IO, why);
        return;
    }
    uv_buf_t b = uv_buf_init(c->req, (unsigned)c->req_len);
    c->write.data = c;
    int rc = uv_write(&c->write, (uv_stream_t *)&c->tcp, &b, 1, on_written);
    if (!rc) rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc) {
        char why[128];
        snprintf(why, sizeof(why), "send: %s", uv_strerror(rc));
        conn_finish(c, AFD_ERR_IO, why);
    }
}

static void on_timeout(uv_timer_t *t)
{
    conn_finish(t->data, AFD_ERR_TIMEOUT, "timed out");
}

afd_status_t bn_http_request(uv_loop_t *loop, const bn_url_t *url, const char *method,
                             const char *path, const char *bearer, const char *body,
                             size_t body_len, unsigned timeout_ms, const bn_http_cb_t *cb, void *ud)
{
    bn_conn_t *c = calloc(1, sizeof(*c));
    if (!c) return AFD_ERR_NOMEM;
    c->cb = *cb;
    c->ud = ud;
    size_t cap = strlen(path) + strlen(url->base) + strlen(url->host) + 512 + body_len +
                 (bearer ? strlen(bearer) : 0);
    if (!(c->req = malloc(cap))) {
        free(c);
        return AFD_ERR_NOMEM;
    }
    int n = snprintf(c->req, cap,
                     "%s %s%s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: afd_bench\r\n"
                     "Accept: */*\r\nConnection: close\r\n%s%s%s",
                     method, url->base, path, url->host, url->port,
                     bearer ? "Authorization: Bearer " : "", bearer ? bearer : "",
                     bearer ? "\r\n" : "");
    if (body)
        n += snprintf(c->req + n, cap - (size_t)n,
                      "Content-Type: application/json\r\nContent-Length: %zu\r\n", body_len);
    n += snprintf(c->req + n, cap - (size_t)n, "\r\n");
    if (body) {
        memcpy(c->req + n, body, body_len);
        n += (int)body_len;
    }
    c->req_len = (size_t)n;
    llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
    c->parser.data = c;
    uv_tcp_init(loop, &c->tcp);
    uv_timer_init(loop, &c->timer);
    c->tcp.data = c->timer.data = c->connect.data = c;
    c->handles = 2;
    uv_tcp_nodelay(&c->tcp, 1);
    if (timeout_ms) uv_timer_start(&c->timer, on_timeout, timeout_ms, 0);
    int rc = uv_tcp_connect(&c->connect, &c->tcp, (const struct sockaddr *)&url->addr, on_connect);
    if (rc) {
        afd_error("connect %s:%d: %s", url->host, url->port, uv_strerror(rc));
        c->done = 1; /* no callback: the caller sees the status */
        c->closing = 1;
        uv_close((uv_handle_t *)&c->tcp, conn_closed);
        uv_close((uv_handle_t *)&c->timer, conn_closed);
        return AFD_ERR_IO;
    }
    return AFD_OK;
}

/* ---- SSE ---- */

void bn_sse_init(bn_sse_t *s, size_t max, void (*on_event)(void *, const char *, size_t), void *ud)
{
    memset(s, 0, sizeof(*s));
    s->max = max;
    s->on_event = on_event;
    s->ud = ud;
}

void bn_sse_fini(bn_sse_t *s)
{
    free(s->buf);
    s->buf = NULL;
}

/* one complete line of buf[ev..len) (without its '\n') */
static void sse_line(bn_sse_t *s, size_t start)
{
    char *line = s->buf + start;
    size_t n = s->len - start;
    if (n && line[n - 1] == '\r') n--;
    if (n == 0) { /* blank line: the event ends */
        if (s->ev > 0 && !s->overflow) {
            s->buf[s->ev - 1] = 0; /* the '\n' after the last data line */
            s->on_event(s->ud, s->buf, s->ev - 1);
        }
        s->ev = s->len = 0;
        s->overflow = 0;
        return;
    }
    if (n >= 5 && !memcmp(line, "data:", 5)) {
        size_t skip = (n > 5 && line[5] == ' ') ? 6 : 5;
        memmove(s->buf + s->ev, line + skip, n - skip);
        s->ev += n - skip;
        s->buf[s->ev++] = '\n';
    }
    s->len = s->ev; /* other fields (event:, id:, comments) are ignored */
}

void bn_sse_feed(bn_sse_t *s, const char *at, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s->len + 2 > s->cap) {
            if (s->cap >= s->max) { /* an event larger than max: dropped */
                s->overflow = 1;
                s->len = s->ev = 0;
            } else {
                size_t nc = s->cap ? 2 * s->cap : 4096;
                if (nc > s->max) nc = s->max;
                char *nb = realloc(s->buf, nc);
                if (!nb) {
                    s->overflow = 1;
                    s->len = s->ev = 0;
                    continue;
                }
                s->buf = nb;
                s->cap = nc;
            }
        }
        if (at[i] == '\n') {
            sse_line(s, s->ev);
        } else if (s->len + 2 <= s->cap) {
            s->buf[s->len++] = at[i];
        }
    }
}
