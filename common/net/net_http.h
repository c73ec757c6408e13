/*
 * net_http: a small HTTP/1.1 server on a libuv loop, parsing with llhttp. Every
 * size from the client is bounded (request line, headers, header count, body).
 * A handler gets each complete request and answers it now or later: with one
 * response, or with a chunked stream (Server-Sent Events). If the client goes
 * away before the answer is complete, the request's abort callback runs and the
 * request is freed: the handler must drop its pointer then. Keep-alive is
 * supported; requests on one connection are answered in order (a second request
 * waits until the first is answered).
 */
#ifndef NET_HTTP_H
#define NET_HTTP_H

#include "afd_status.h"

#include <stddef.h>
#include <uv.h>

typedef struct net_http_server net_http_server_t;
typedef struct net_http_req net_http_req_t;

typedef struct net_http_limits {
    size_t max_header_bytes; /* request line + headers, e.g. 16 KiB */
    int max_headers;         /* e.g. 64 */
    size_t max_body;         /* e.g. 8 MiB: larger bodies get 413 without reaching the handler */
    int max_conns;           /* simultaneous connections; more are closed at accept */
    int idle_timeout_ms;     /* closes a connection idle this long (0: never) */
} net_http_limits_t;

typedef void (*net_http_handler_cb)(void *arg, net_http_req_t *req);
typedef void (*net_http_abort_cb)(void *ud, net_http_req_t *req);

struct net_http_req {
    const char *method; /* "GET", "POST", ... */
    const char *path;   /* without the query string, e.g. "/v1/completions" */
    const char *query;  /* after '?', or "" */
    const char *body;   /* NUL-terminated copy of the body */
    size_t body_len;
    void *user; /* for the handler */
};

/* Listens on host:port (port 0 picks one: see net_http_port). */
afd_status_t net_http_server_create(uv_loop_t *loop, const char *host, int port,
                                    const net_http_limits_t *lim, net_http_handler_cb cb, void *arg,
                                    net_http_server_t **out);
int net_http_port(const net_http_server_t *s);
/* Stops listening and closes every connection (pending requests get their abort
 * callback); the memory is released from the loop's close callbacks. */
void net_http_server_close(net_http_server_t *s);

/* Case-insensitive header lookup; NULL when absent. */
const char *net_http_header(const net_http_req_t *r, const char *name);
/* Sets the callback run if the client disconnects before the answer completes. */
void net_http_set_abort(net_http_req_t *r, net_http_abort_cb cb, void *ud);

/* Answers with a whole body. extra_headers: "Name: value\r\n..." or NULL. Frees the
 * request (the pointer is invalid after the call). */
void net_http_respond(net_http_req_t *r, int status, const char *content_type, const char *body,
                      size_t len, const char *extra_headers);
/* Starts a chunked answer (e.g. text/event-stream). */
void net_http_stream_begin(net_http_req_t *r, int status, const char *content_type,
                           const char *extra_headers);
/* Sends one chunk; returns AFD_ERR_PEER when the client is gone. */
afd_status_t net_http_stream_write(net_http_req_t *r, const char *data, size_t len);
/* Ends the stream and frees the request. */
void net_http_stream_end(net_http_req_t *r);

#endif
