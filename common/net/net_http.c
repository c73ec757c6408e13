/*
 * net_http: the HTTP/1.1 server behind the coordinator's OpenAI-compatible API.
 *
 * One connection = one uv_tcp_t + one uv_timer_t + one llhttp parser + a fixed
 * read buffer. Bytes are parsed as they arrive; every span llhttp reports is
 * copied at once into the request's fixed-size header arena (so a head larger
 * than max_header_bytes is refused before it is stored), the body into a buffer
 * grown by doubling up to max_body. When a request is complete the parser pauses
 * (on_message_complete returns HPE_PAUSED) and the request goes to the handler;
 * bytes that follow (pipelined requests) stay in the read buffer, unparsed, until
 * the request is answered. Reading goes on meanwhile so that a disconnect is seen
 * (and the request aborted) while the handler works; it stops when the read
 * buffer is full, which bounds memory.
 *
 * The connection timer has three uses, never at once: the idle timeout (armed
 * while no request is outstanding; the head of a request must arrive within one
 * timeout of its first byte, body bytes re-arm it), a zero-delay "resume" that
 * parses pipelined bytes after an answer given outside the parse loop (so that
 * a handler is never re-entered from its own net_http_respond), and the linger
 * after a final answer (shutdown, then discard input until EOF, so that the
 * client reads the answer instead of a reset).
 *
 * Lifetimes: a connection is freed only in the close callback of its last
 * handle; the abort callback of an unanswered request runs there too, never from
 * inside a net_http_* call made by the handler. Everything runs on the loop
 * thread.
 */
#define _GNU_SOURCE
#include "net_http.h"
#include "afd_log.h"

#include "llhttp.h"

#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define HTTP_RBUF_SIZE 16384      /* per-connection read buffer */
#define HTTP_LINGER_MS 1000       /* after a final answer: wait this long for EOF */
#define HTTP_WQ_MAX    (8u << 20) /* bytes queued on a stream before the client is dropped */

#define HTTP_DEFAULT_HEADER_BYTES 16384
#define HTTP_DEFAULT_HEADERS      64
#define HTTP_DEFAULT_BODY         (8u << 20)
#define HTTP_DEFAULT_CONNS        1024

typedef struct http_conn http_conn_t;

typedef struct http_hdr {
    const char *name;  /* into the request's arena, NUL-terminated */
    const char *value; /* idem, trailing whitespace removed */
} http_hdr_t;

enum { PH_HEAD, PH_BODY, PH_DONE };
enum { HS_NONE, HS_FIELD, HS_VALUE };
enum { TM_IDLE, TM_RESUME, TM_LINGER };

typedef struct http_req {
    net_http_req_t pub; /* first: the handler's pointer is this struct's */
    http_conn_t *conn;
    net_http_abort_cb abort_cb;
    void *abort_ud;
    http_hdr_t *hdr; /* (max_headers) */
    int nhdr;
    char *arena; /* url, then header names and values, NUL-separated */
    size_t alen, acap;
    size_t url_len;
    size_t head_raw;  /* head bytes in buffers parsed before the current one */
    const char *mark; /* where the head starts in the current buffer, NULL: before it */
    char *body;       /* (body_cap): body_len bytes and a NUL */
    size_t body_len, body_cap;
    int phase, hstate;
    unsigned keep_alive : 1, http10 : 1, head_only : 1;
    unsigned dispatched : 1, streaming : 1, chunked : 1, aborted : 1;
} http_req_t;

struct http_conn {
    uv_tcp_t tcp; /* data = this */
    uv_timer_t timer;
    uv_shutdown_t shut;
    llhttp_t parser;
    net_http_server_t *srv;
    http_conn_t *prev, *next;
    http_req_t *req;  /* being parsed, or dispatched and not yet answered */
    size_t wq_bytes;  /* bytes handed to uv_write and not yet completed */
    int write_err;    /* first uv error seen on a write, 0 if none */
    int open_handles; /* freed when this drops to 0 */
    int tmode;
    int err_status; /* set by a parser callback that refuses the request */
    const char *err_msg;
    const char *exec_base; /* the buffer llhttp_execute is working on */
    unsigned closing : 1, draining : 1, reading : 1, outstanding : 1;
    unsigned resume_pending : 1, in_process : 1, arm_timer : 1;
    size_t rlen; /* unparsed bytes at rbuf */
    char rbuf[HTTP_RBUF_SIZE];
};

struct net_http_server {
    uv_tcp_t listener; /* data = this */
    uv_loop_t *loop;
    net_http_limits_t lim;
    net_http_handler_cb cb;
    void *arg;
    int port;
    int nconns;   /* accepted connections not yet freed */
    int nrejects; /* over-limit connections being closed */
    int closing, listener_open;
    http_conn_t *conns;
};

/* one uv_write: the request and the bytes it owns, in one allocation */
typedef struct http_wreq {
    uv_write_t req;
    http_conn_t *conn;
    size_t len;
    char data[];
} http_wreq_t;

static void conn_close(http_conn_t *c);
static void conn_process(http_conn_t *c);
static void conn_update(http_conn_t *c, int fresh_idle);
static void conn_fail(http_conn_t *c, int status, const char *msg);

/* ---- small helpers ---------------------------------------------------------------------- */

static const char *http_reason(int status)
{
    static const struct {
        int code;
        const char *text;
    } reasons[] = {
        {100, "Continue"},
        {200, "OK"},
        {201, "Created"},
        {202, "Accepted"},
        {204, "No Content"},
        {301, "Moved Permanently"},
        {302, "Found"},
        {304, "Not Modified"},
        {400, "Bad Request"},
        {401, "Unauthorized"},
        {403, "Forbidden"},
        {404, "Not Found"},
        {405, "Method Not Allowed"},
        {408, "Request Timeout"},
        {409, "Conflict"},
        {413, "Payload Too Large"},
        {415, "Unsupported Media Type"},
        {422, "Unprocessable Entity"},
        {429, "Too Many Requests"},
        {431, "Request Header Fields Too Large"},
        {500, "Internal Server Error"},
        {501, "Not Implemented"},
        {502, "Bad Gateway"},
        {503, "Service Unavailable"},
        {504, "Gateway Timeout"},
    };
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
        if (reasons[i].code == status) return reasons[i].text;
    return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
}

static http_wreq_t *wreq_alloc(size_t cap)
{
    http_wreq_t *w = malloc(sizeof(*w) + cap);
    if (!w) {
        afd_error("http: cannot allocate a %zu-byte write buffer", cap);
        return NULL;
    }
    w->len = 0;
    return w;
}

static void on_write(uv_write_t *req, int status)
{
    http_wreq_t *w = (http_wreq_t *)req;
    http_conn_t *c = w->conn;
    c->wq_bytes -= w->len;
    free(w);
    if (status < 0 && status != UV_ECANCELED) {
        if (!c->write_err) c->write_err = status;
        afd_debug("http: write: %s", uv_strerror(status));
        conn_close(c);
    }
}

/* Queues w (ownership passes) on c; returns 0 or a uv error (the connection is then closing). */
static int conn_write(http_conn_t *c, http_wreq_t *w)
{
    if (!w) {
        conn_close(c);
        return UV_ENOMEM;
    }
    if (c->closing) {
        free(w);
        return UV_EPIPE;
    }
    AFD_ASSERT(w->len <= UINT_MAX);
    w->conn = c;
    uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc < 0) {
        free(w);
        if (!c->write_err) c->write_err = rc;
        afd_debug("http: write: %s", uv_strerror(rc));
        conn_close(c);
        return rc;
    }
    c->wq_bytes += w->len;
    return 0;
}

/* Formats a status line and headers into a new write buffer with room for body_room more
 * bytes. clen < 0: no Content-Length. */
static http_wreq_t *head_format(int status, const char *ctype, long long clen, int chunked,
                                int keep, const char *extra, size_t body_room)
{
    const char *ex = extra ? extra : "";
    size_t exl = strlen(ex);
    const char *ex_end = exl > 0 && (exl < 2 || memcmp(ex + exl - 2, "\r\n", 2) != 0) ? "\r\n" : "";
    char cl[48] = "";
    int nocache = ctype && strncasecmp(ctype, "text/event-stream", 17) == 0;
    if (clen >= 0) snprintf(cl, sizeof(cl), "Content-Length: %lld\r\n", clen);
    const char *fmt = "HTTP/1.1 %d %s\r\n%s%s%s%s%s%sConnection: %s\r\n%s%s\r\n";
    const char *ct1 = ctype ? "Content-Type: " : "", *ct2 = ctype ? ctype : "",
               *ct3 = ctype ? "\r\n" : "";
    const char *te = chunked ? "Transfer-Encoding: chunked\r\n" : "";
    const char *cc = nocache ? "Cache-Control: no-cache\r\n" : "";
    const char *conn = keep ? "keep-alive" : "close";
    int n = snprintf(NULL, 0, fmt, status, http_reason(status), ct1, ct2, ct3, cl, te, cc, conn, ex,
                     ex_end);
    AFD_ASSERT(n > 0);
    http_wreq_t *w = wreq_alloc((size_t)n + 1 + body_room);
    if (!w) return NULL;
    snprintf(w->data, (size_t)n + 1, fmt, status, http_reason(status), ct1, ct2, ct3, cl, te, cc,
             conn, ex, ex_end);
    w->len = (size_t)n;
    return w;
}

/* JSON string body without quotes: escapes what JSON requires, drops other controls */
static size_t json_escape(char *dst, size_t cap, const char *s)
{
    size_t n = 0;
    for (; *s && n + 2 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            dst[n++] = '\\';
            dst[n++] = (char)ch;
        } else if (ch >= 0x20) {
            dst[n++] = (char)ch;
        }
    }
    dst[n] = 0;
    return n;
}

/* ---- requests --------------------------------------------------------------------------- */

static http_req_t *req_create(http_conn_t *c)
{
    const net_http_limits_t *lim = &c->srv->lim;
    size_t nh = (size_t)lim->max_headers;
    size_t acap = lim->max_header_bytes + 8;
    http_req_t *q = malloc(sizeof(*q) + nh * sizeof(http_hdr_t) + acap);
    if (!q) return NULL;
    memset(q, 0, sizeof(*q));
    q->conn = c;
    q->hdr = (http_hdr_t *)(q + 1);
    q->arena = (char *)(q->hdr + nh);
    q->acap = acap;
    q->pub.method = "";
    q->pub.path = "";
    q->pub.query = "";
    q->pub.body = "";
    return q;
}

static void req_free(http_req_t *q)
{
    free(q->body);
    free(q);
}

/* Appends n bytes to the arena, keeping room for a NUL; -1 when full. */
static int arena_put(http_req_t *q, const char *at, size_t n)
{
    if (q->alen + n + 1 > q->acap) return -1;
    memcpy(q->arena + q->alen, at, n);
    q->alen += n;
    return 0;
}

static void arena_nul(http_req_t *q)
{
    AFD_ASSERT(q->alen < q->acap);
    q->arena[q->alen++] = 0;
}

/* ---- parser callbacks ------------------------------------------------------------------- */

static int refuse(http_conn_t *c, int status, const char *msg)
{
    if (!c->err_status) {
        c->err_status = status;
        c->err_msg = msg;
    }
    return -1;
}

/* The head is measured in raw bytes, from the method to the end of a span (whitespace
 * llhttp skips included): positions within the buffer being parsed plus the bytes of
 * earlier buffers. Only the final CRLFs escape the span checks; conn_process checks
 * between buffers. */
static int head_check(http_conn_t *c, const char *end)
{
    http_req_t *q = c->req;
    const char *start = q->mark ? q->mark : c->exec_base;
    if (q->head_raw + (size_t)(end - start) > c->srv->lim.max_header_bytes)
        return refuse(c, 431, "request line and headers too large");
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    http_conn_t *c = p->data;
    AFD_ASSERT(!c->req);
    c->req = req_create(c);
    if (!c->req) return refuse(c, 503, "server out of memory");
    c->arm_timer = 1; /* the head must arrive within one idle timeout of its first byte */
    return 0;
}

static int on_method(llhttp_t *p, const char *at, size_t n)
{
    http_conn_t *c = p->data;
    if (!c->req->mark && c->req->head_raw == 0) c->req->mark = at; /* the message starts here */
    return head_check(c, at + n);
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    if (head_check(c, at + n) < 0) return -1;
    if (arena_put(q, at, n) < 0) return refuse(c, 431, "request line and headers too large");
    q->url_len += n;
    return 0;
}

static int on_url_complete(llhttp_t *p)
{
    http_conn_t *c = p->data;
    if (c->req->alen != c->req->url_len) return refuse(c, 400, "malformed url");
    arena_nul(c->req);
    return 0;
}

/* NUL-terminates a header value still open (its end callback may not come for "") */
static void value_close(http_req_t *q)
{
    if (q->hstate != HS_VALUE) return;
    const char *v = q->hdr[q->nhdr - 1].value;
    while (q->arena + q->alen > v &&
           (q->arena[q->alen - 1] == ' ' || q->arena[q->alen - 1] == '\t'))
        q->alen--;
    arena_nul(q);
    q->hstate = HS_NONE;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    if (q->hstate != HS_FIELD) {
        value_close(q);
        if (q->nhdr >= c->srv->lim.max_headers) return refuse(c, 431, "too many header fields");
        q->hdr[q->nhdr].name = q->arena + q->alen;
        q->hdr[q->nhdr].value = "";
        q->nhdr++;
        q->hstate = HS_FIELD;
    }
    if (head_check(c, at + n) < 0) return -1;
    if (arena_put(q, at, n) < 0) return refuse(c, 431, "request line and headers too large");
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    if (q->hstate != HS_FIELD) return refuse(c, 400, "malformed header");
    arena_nul(q);
    q->hdr[q->nhdr - 1].value = q->arena + q->alen;
    q->hstate = HS_VALUE;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    if (q->hstate != HS_VALUE) return refuse(c, 400, "malformed header");
    if (head_check(c, at + n) < 0) return -1;
    if (arena_put(q, at, n) < 0) return refuse(c, 431, "request line and headers too large");
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    value_close(((http_conn_t *)p->data)->req);
    return 0;
}

/* Splits the url in the arena into path and query (in place). */
static void url_split(http_req_t *q)
{
    char *u = q->arena;
    u[q->url_len] = 0;
    if (u[0] != '/' && u[0] != '*') {
        /* absolute form: scheme://authority/path */
        char *s = strstr(u, "://");
        if (s) {
            char *slash = strchr(s + 3, '/');
            u = slash ? slash : (char *)"/";
        }
    }
    char *hash = strchr(u, '#');
    if (hash) *hash = 0;
    char *qm = strchr(u, '?');
    q->pub.query = "";
    if (qm) {
        *qm = 0;
        q->pub.query = qm + 1;
    }
    q->pub.path = u;
}

static int on_headers_complete(llhttp_t *p)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    const net_http_limits_t *lim = &c->srv->lim;
    value_close(q);
    q->phase = PH_BODY;
    uint8_t method = llhttp_get_method(p);
    if (method == HTTP_CONNECT) return refuse(c, 400, "CONNECT is not supported");
    q->pub.method = llhttp_method_name((llhttp_method_t)method);
    url_split(q);
    q->http10 = p->http_major < 1 || (p->http_major == 1 && p->http_minor == 0);
    q->head_only = method == HTTP_HEAD;
    /* an upgrade is answered as a plain request; the connection closes after it */
    q->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
    int has_body = 0;
    if (p->flags & F_CHUNKED) {
        has_body = 1;
    } else if (p->flags & F_CONTENT_LENGTH) {
        if (p->content_length > lim->max_body) return refuse(c, 413, "request body too large");
        if (p->content_length > 0) {
            q->body_cap = (size_t)p->content_length + 1;
            q->body = malloc(q->body_cap);
            if (!q->body) return refuse(c, 503, "server out of memory");
            has_body = 1;
        }
    }
    const char *expect = net_http_header(&q->pub, "expect");
    if (has_body && expect && !q->http10 && strcasecmp(expect, "100-continue") == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        http_wreq_t *w = wreq_alloc(sizeof(cont));
        if (w) {
            memcpy(w->data, cont, sizeof(cont) - 1);
            w->len = sizeof(cont) - 1;
        }
        if (conn_write(c, w) < 0) return refuse(c, 503, "write failed");
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    size_t max = c->srv->lim.max_body;
    if (n > max - q->body_len) return refuse(c, 413, "request body too large");
    if (q->body_len + n + 1 > q->body_cap) { /* chunked: grow by doubling up to max_body + 1 */
        size_t cap = q->body_cap ? q->body_cap * 2 : 4096;
        if (cap < q->body_len + n + 1) cap = q->body_len + n + 1;
        if (cap > max + 1) cap = max + 1;
        char *nb = realloc(q->body, cap);
        if (!nb) return refuse(c, 503, "server out of memory");
        q->body = nb;
        q->body_cap = cap;
    }
    memcpy(q->body + q->body_len, at, n);
    q->body_len += n;
    c->arm_timer = 1; /* body bytes are progress */
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    http_conn_t *c = p->data;
    http_req_t *q = c->req;
    q->phase = PH_DONE;
    if (q->body) {
        q->body[q->body_len] = 0;
        q->pub.body = q->body;
        q->pub.body_len = q->body_len;
    }
    return HPE_PAUSED; /* the rest of the buffer waits until this request is answered */
}

static const llhttp_settings_t http_settings = {
    .on_message_begin = on_message_begin,
    .on_method = on_method,
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- connections ------------------------------------------------------------------------ */

static void server_maybe_free(net_http_server_t *s)
{
    if (s->closing && !s->listener_open && s->nconns == 0 && s->nrejects == 0) free(s);
}

static void conn_teardown(http_conn_t *c)
{
    net_http_server_t *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    http_req_t *q = c->req;
    c->req = NULL;
    if (q) {
        if (q->dispatched && q->abort_cb) {
            q->aborted = 1;
            q->abort_cb(q->abort_ud, &q->pub);
        }
        req_free(q);
    }
    free(c);
    s->nconns--;
    server_maybe_free(s);
}

static void on_conn_handle_closed(uv_handle_t *h)
{
    http_conn_t *c = h->data;
    if (--c->open_handles == 0) conn_teardown(c);
}

/* Starts closing c; the memory goes (and an unanswered request is aborted) in the close
 * callbacks. */
static void conn_close(http_conn_t *c)
{
    if (c->closing) return;
    c->closing = 1;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    http_conn_t *c = req->data;
    if (status < 0 && status != UV_ECANCELED) conn_close(c);
}

static void on_timer(uv_timer_t *t);

/* After the last answer: send FIN once the writes are out, then discard input until EOF
 * (or the linger time) so that the client reads the answer rather than a reset. */
static void conn_start_drain(http_conn_t *c)
{
    if (c->closing || c->draining) return;
    c->draining = 1;
    c->rlen = 0;
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        conn_close(c);
        return;
    }
    c->tmode = TM_LINGER;
    uv_timer_start(&c->timer, on_timer, HTTP_LINGER_MS, 0);
    conn_update(c, 0); /* reading must go on to see the EOF */
}

/* Answers a refused request with a JSON error and closes the connection after it. */
static void conn_fail(http_conn_t *c, int status, const char *msg)
{
    if (c->closing || c->draining) return;
    if (c->req) {
        AFD_ASSERT(!c->req->dispatched);
        req_free(c->req);
        c->req = NULL;
    }
    char esc[256], body[512];
    json_escape(esc, sizeof(esc), msg);
    int n = snprintf(body, sizeof(body),
                     "{\"error\":{\"message\":\"%s\",\"type\":\"invalid_request_error\","
                     "\"code\":%d}}",
                     esc, status);
    AFD_ASSERT(n > 0 && (size_t)n < sizeof(body));
    http_wreq_t *w = head_format(status, "application/json", n, 0, 0, NULL, (size_t)n);
    if (w) {
        memcpy(w->data + w->len, body, (size_t)n);
        w->len += (size_t)n;
    }
    if (conn_write(c, w) < 0) return;
    conn_start_drain(c);
}

static void conn_dispatch(http_conn_t *c)
{
    http_req_t *q = c->req;
    AFD_ASSERT(q && q->phase == PH_DONE && !q->dispatched);
    q->dispatched = 1;
    c->outstanding = 1;
    c->arm_timer = 0;
    uv_timer_stop(&c->timer); /* no idle timeout while the handler works */
    c->srv->cb(c->srv->arg, &q->pub);
}

/* Parses buffered bytes until they run out, a request is dispatched and not yet answered,
 * or the connection fails. */
static void conn_process(http_conn_t *c)
{
    c->in_process = 1;
    while (!c->closing && !c->draining && !c->outstanding && c->rlen > 0) {
        size_t n = c->rlen, used = n;
        c->exec_base = c->rbuf;
        llhttp_errno_t err = llhttp_execute(&c->parser, c->rbuf, n);
        if (err == HPE_PAUSED) {
            used = (size_t)(llhttp_get_error_pos(&c->parser) - c->rbuf);
            AFD_ASSERT(used <= n);
            llhttp_resume(&c->parser);
        } else if (err != HPE_OK) {
            int status = c->err_status ? c->err_status : 400;
            const char *msg = c->err_msg;
            char buf[160];
            if (!msg) {
                snprintf(buf, sizeof(buf), "malformed request: %s",
                         llhttp_get_error_reason(&c->parser));
                msg = buf;
            }
            afd_debug("http: refusing a request (%d): %s", status, msg);
            conn_fail(c, status, msg);
            break;
        }
        memmove(c->rbuf, c->rbuf + used, n - used);
        c->rlen = n - used;
        if (err == HPE_PAUSED) {
            conn_dispatch(c);
        } else if (c->req && c->req->phase == PH_HEAD) {
            /* the head goes on in the next buffer */
            http_req_t *q = c->req;
            q->head_raw += (size_t)(c->rbuf + used - (q->mark ? q->mark : c->rbuf));
            q->mark = NULL;
            if (q->head_raw > c->srv->lim.max_header_bytes) {
                conn_fail(c, 431, "request line and headers too large");
                break;
            }
        }
    }
    c->in_process = 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    http_conn_t *c = h->data;
    if (c->draining) { /* discarded */
        *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
        return;
    }
    *buf = uv_buf_init(c->rbuf + c->rlen, (unsigned)(sizeof(c->rbuf) - c->rlen));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    http_conn_t *c = st->data;
    if (nread == 0 || c->closing) return;
    if (nread == UV_ENOBUFS) {
        uv_read_stop(st);
        c->reading = 0;
        return;
    }
    if (nread < 0) {
        /* EOF or error; a request still outstanding is aborted in the close callback */
        if (nread != UV_EOF) afd_debug("http: read: %s", uv_strerror((int)nread));
        conn_close(c);
        return;
    }
    if (c->draining) return;
    c->rlen += (size_t)nread;
    AFD_ASSERT(c->rlen <= sizeof(c->rbuf));
    if (!c->outstanding && !c->resume_pending) conn_process(c);
    conn_update(c, 0);
}

static void on_timer(uv_timer_t *t)
{
    http_conn_t *c = t->data;
    switch (c->tmode) {
    case TM_RESUME:
        c->resume_pending = 0;
        conn_process(c);
        conn_update(c, 1);
        break;
    case TM_IDLE:
        afd_debug("http: closing an idle connection");
        conn_close(c);
        break;
    default:
        conn_close(c);
        break;
    }
}

/* Sets reading and the idle timer to fit the connection's state. fresh_idle: the
 * connection just became idle (arm a full timeout). */
static void conn_update(http_conn_t *c, int fresh_idle)
{
    if (c->closing) return;
    int want = c->draining || c->rlen < sizeof(c->rbuf);
    if (want && !c->reading) {
        int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        if (rc < 0) {
            afd_debug("http: read start: %s", uv_strerror(rc));
            conn_close(c);
            return;
        }
        c->reading = 1;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
    if (c->draining || c->outstanding || c->resume_pending) return;
    if (fresh_idle || c->arm_timer) {
        int ms = c->srv->lim.idle_timeout_ms;
        if (ms > 0) {
            c->tmode = TM_IDLE;
            uv_timer_start(&c->timer, on_timer, (uint64_t)ms, 0);
        } else {
            uv_timer_stop(&c->timer);
        }
    }
    c->arm_timer = 0;
}

/* The handler is done with q: free it and carry on with the connection. */
static void conn_req_done(http_conn_t *c, http_req_t *q, int keep)
{
    AFD_ASSERT(c->req == q);
    req_free(q);
    c->req = NULL;
    c->outstanding = 0;
    if (c->closing) return;
    if (!keep || c->write_err) {
        conn_start_drain(c);
        return;
    }
    c->arm_timer = 1;
    if (c->in_process) return; /* the parse loop goes on by itself */
    if (c->rlen == 0) {
        conn_update(c, 1);
        return;
    }
    /* pipelined bytes: parse them from the loop, not from inside the handler's call */
    c->resume_pending = 1;
    c->tmode = TM_RESUME;
    uv_timer_start(&c->timer, on_timer, 0, 0);
}

static void on_reject_closed(uv_handle_t *h)
{
    net_http_server_t *s = h->data;
    free(h);
    s->nrejects--;
    server_maybe_free(s);
}

static void on_connection(uv_stream_t *ls, int status)
{
    net_http_server_t *s = ls->data;
    if (status < 0) {
        afd_warn("http: accept: %s", uv_strerror(status));
        return;
    }
    if (s->closing) return;
    if (s->nconns >= s->lim.max_conns) {
        uv_tcp_t *t = malloc(sizeof(*t));
        if (!t || uv_tcp_init(s->loop, t) < 0) {
            afd_error("http: cannot allocate a handle to refuse a connection");
            free(t);
            return;
        }
        t->data = s;
        s->nrejects++;
        uv_accept(ls, (uv_stream_t *)t);
        afd_debug("http: %d connections open, refusing one more", s->nconns);
        uv_close((uv_handle_t *)t, on_reject_closed);
        return;
    }
    http_conn_t *c = calloc(1, sizeof(*c));
    if (!c) {
        afd_error("http: cannot allocate a connection");
        return;
    }
    if (uv_tcp_init(s->loop, &c->tcp) < 0) {
        free(c);
        return;
    }
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->srv = s;
    c->open_handles = 2;
    llhttp_init(&c->parser, HTTP_REQUEST, &http_settings);
    c->parser.data = c;
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    int rc = uv_accept(ls, (uv_stream_t *)&c->tcp);
    if (rc < 0) {
        afd_warn("http: accept: %s", uv_strerror(rc));
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    conn_update(c, 1);
}

/* ---- public API ------------------------------------------------------------------------- */

static void on_listener_closed(uv_handle_t *h)
{
    net_http_server_t *s = h->data;
    s->listener_open = 0;
    server_maybe_free(s);
}

afd_status_t net_http_server_create(uv_loop_t *loop, const char *host, int port,
                                    const net_http_limits_t *lim, net_http_handler_cb cb, void *arg,
                                    net_http_server_t **out)
{
    if (!loop || !cb || !out || port < 0 || port > 65535) {
        afd_error("http: invalid server arguments (port %d)", port);
        return AFD_ERR_INVALID;
    }
    net_http_limits_t l = {HTTP_DEFAULT_HEADER_BYTES, HTTP_DEFAULT_HEADERS, HTTP_DEFAULT_BODY,
                           HTTP_DEFAULT_CONNS, 0};
    if (lim) {
        if (lim->max_headers < 0 || lim->max_conns < 0 || lim->idle_timeout_ms < 0) {
            afd_error("http: negative limits");
            return AFD_ERR_INVALID;
        }
        if (lim->max_header_bytes) l.max_header_bytes = lim->max_header_bytes;
        if (lim->max_headers) l.max_headers = lim->max_headers;
        if (lim->max_body) l.max_body = lim->max_body;
        if (lim->max_conns) l.max_conns = lim->max_conns;
        l.idle_timeout_ms = lim->idle_timeout_ms;
    }
    if (l.max_header_bytes > (64u << 20) || l.max_body > ((size_t)1 << 40)) {
        afd_error("http: limits out of range");
        return AFD_ERR_RANGE;
    }
    if (!host || !*host) host = "0.0.0.0";
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
        uv_getaddrinfo_t gai;
        struct addrinfo hints;
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        int rc = uv_getaddrinfo(loop, &gai, NULL, host, NULL, &hints);
        if (rc < 0 || !gai.addrinfo) {
            afd_error("http: cannot resolve '%s': %s", host, uv_strerror(rc));
            return AFD_ERR_NOT_FOUND;
        }
        memcpy(&ss, gai.addrinfo->ai_addr, gai.addrinfo->ai_addrlen);
        uv_freeaddrinfo(gai.addrinfo);
        if (ss.ss_family == AF_INET)
            ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)port);
        else
            ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)port);
    }
    net_http_server_t *s = calloc(1, sizeof(*s));
    if (!s) return AFD_ERR_NOMEM;
    s->loop = loop;
    s->lim = l;
    s->cb = cb;
    s->arg = arg;
    int rc = uv_tcp_init(loop, &s->listener);
    if (rc < 0) {
        afd_error("http: tcp init: %s", uv_strerror(rc));
        free(s);
        return AFD_ERR_IO;
    }
    s->listener.data = s;
    s->listener_open = 1;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&ss, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
    struct sockaddr_storage bound;
    int blen = sizeof(bound);
    if (rc == 0) rc = uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &blen);
    if (rc < 0) {
        afd_error("http: cannot listen on %s:%d: %s", host, port, uv_strerror(rc));
        s->closing = 1; /* freed by the loop's close callback */
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
        return AFD_ERR_IO;
    }
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    /* a write to a reset socket must be an error, not the death of the daemon */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
    *out = s;
    return AFD_OK;
}

int net_http_port(const net_http_server_t *s)
{
    return s->port;
}

void net_http_server_close(net_http_server_t *s)
{
    if (!s || s->closing) return;
    s->closing = 1;
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    for (http_conn_t *c = s->conns; c; c = c->next)
        conn_close(c);
}

const char *net_http_header(const net_http_req_t *r, const char *name)
{
    const http_req_t *q = (const http_req_t *)r;
    for (int i = 0; i < q->nhdr; i++)
        if (strcasecmp(q->hdr[i].name, name) == 0) return q->hdr[i].value;
    return NULL;
}

void net_http_set_abort(net_http_req_t *r, net_http_abort_cb cb, void *ud)
{
    http_req_t *q = (http_req_t *)r;
    q->abort_cb = cb;
    q->abort_ud = ud;
}

void net_http_respond(net_http_req_t *r, int status, const char *content_type, const char *body,
                      size_t len, const char *extra_headers)
{
    http_req_t *q = (http_req_t *)r;
    AFD_ASSERT(q->dispatched && !q->streaming);
    if (q->aborted) return; /* from inside its abort callback: freed when that returns */
    http_conn_t *c = q->conn;
    int keep = q->keep_alive && !c->srv->closing;
    if (!c->closing) {
        int nobody = status == 204 || status == 304 || (status >= 100 && status < 200);
        size_t blen = nobody || q->head_only ? 0 : len;
        http_wreq_t *w = head_format(status, content_type, nobody ? -1 : (long long)len, 0, keep,
                                     extra_headers, blen);
        if (w && blen) {
            memcpy(w->data + w->len, body, blen);
            w->len += blen;
        }
        conn_write(c, w);
    }
    conn_req_done(c, q, keep);
}

void net_http_stream_begin(net_http_req_t *r, int status, const char *content_type,
                           const char *extra_headers)
{
    http_req_t *q = (http_req_t *)r;
    AFD_ASSERT(q->dispatched && !q->streaming);
    if (q->aborted) return;
    http_conn_t *c = q->conn;
    q->streaming = 1;
    /* HTTP/1.0 has no chunked coding: the body ends with the connection */
    q->chunked = !q->http10;
    if (!q->chunked || c->srv->closing) q->keep_alive = 0;
    if (c->closing) return;
    conn_write(c,
               head_format(status, content_type, -1, q->chunked, q->keep_alive, extra_headers, 0));
}

afd_status_t net_http_stream_write(net_http_req_t *r, const char *data, size_t len)
{
    http_req_t *q = (http_req_t *)r;
    AFD_ASSERT(q->streaming);
    if (q->aborted) return AFD_ERR_PEER;
    http_conn_t *c = q->conn;
    if (c->closing || c->write_err) return AFD_ERR_PEER;
    if (len == 0 || q->head_only) return AFD_OK; /* an empty chunk would end the stream */
    if (c->wq_bytes > 0 && c->wq_bytes + len > HTTP_WQ_MAX) {
        afd_debug("http: client is not reading (%zu bytes queued), dropping it", c->wq_bytes);
        conn_close(c);
        return AFD_ERR_PEER;
    }
    http_wreq_t *w = wreq_alloc(len + 24);
    if (w) {
        int n = q->chunked ? snprintf(w->data, 24, "%zx\r\n", len) : 0;
        memcpy(w->data + n, data, len);
        w->len = (size_t)n + len;
        if (q->chunked) {
            memcpy(w->data + w->len, "\r\n", 2);
            w->len += 2;
        }
    }
    return conn_write(c, w) < 0 ? AFD_ERR_PEER : AFD_OK;
}

void net_http_stream_end(net_http_req_t *r)
{
    http_req_t *q = (http_req_t *)r;
    AFD_ASSERT(q->streaming);
    if (q->aborted) return;
    http_conn_t *c = q->conn;
    if (!c->closing && !c->write_err && q->chunked && !q->head_only) {
        static const char last[] = "0\r\n\r\n";
        http_wreq_t *w = wreq_alloc(sizeof(last));
        if (w) {
            memcpy(w->data, last, sizeof(last) - 1);
            w->len = sizeof(last) - 1;
        }
        conn_write(c, w);
    }
    conn_req_done(c, q, q->keep_alive);
}
