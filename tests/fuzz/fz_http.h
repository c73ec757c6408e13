/*
 * fz_http: drives the real servers of the project (the net_http server, the
 * coordinator's control-plane listener) with bytes from a fuzz input. A connected
 * AF_UNIX socket pair stands in for an accepted TCP connection: one end is handed to the
 * server's listening handle as if accept() had returned it, so the server reads it
 * through libuv exactly as it reads a client; the harness writes into the other end.
 */
#ifndef FZ_HTTP_H
#define FZ_HTTP_H

#include "afd_status.h"
#include "net_http.h"

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* ---- any listener ---- */

/* The TCP handle of loop whose data is `data` (a server's listener), or NULL. */
uv_stream_t *fz_listener_find(uv_loop_t *loop, const void *data);
/* Handles on the loop, closing ones included (a connection is gone when they are). */
int fz_loop_handles(uv_loop_t *loop);
/* Opens a connection to the listener; *fd gets the client's end (non-blocking). */
afd_status_t fz_conn_open(uv_stream_t *listener, int *fd);
/* Sends len bytes in pieces of `piece` (0: at once), running the loop after each piece and
 * reading what the server answers; stops early when the server closed its end. */
void fz_conn_send(uv_loop_t *loop, int fd, const uint8_t *data, size_t len, size_t piece);
/* Reads whatever the server sent (discarded); returns the byte count. */
size_t fz_drain(int fd);
/* Half-closes the client ends and runs the loop until the server released every
 * connection (the loop is back to `base` handles), then closes them. When the server
 * makes no progress (it waits for an answer and has stopped reading), `stuck` runs
 * (if given): it should answer what the server waits for. */
void fz_conns_finish(uv_loop_t *loop, const int *fds, int n, int base, void (*stuck)(void *),
                     void *arg);

/* A piece size derived from the input itself, so that one input always replays the same
 * way: whole, or split in small pieces to cross the parsers' buffer boundaries. */
size_t fz_piece_size(const uint8_t *data, size_t len);

/* ---- the HTTP server ---- */

typedef struct fz_http {
    uv_loop_t loop;
    net_http_server_t *srv;
    uv_stream_t *listener; /* the server's listening handle */
    int base_handles;      /* handles on the loop with no connection open */
} fz_http_t;

/* Starts a server on 127.0.0.1 (an ephemeral port nobody connects to) on h's own loop.
 * Call fz_http_mark after creating any long-lived handles of the caller's own. */
afd_status_t fz_http_init(fz_http_t *h, const net_http_limits_t *lim, net_http_handler_cb cb,
                          void *arg);
/* Records the loop's idle handle count (what an exchange waits to return to). */
void fz_http_mark(fz_http_t *h);
/* One connection: sends data (see fz_conn_send), half-closes, and runs the loop until the
 * server has released the connection (see fz_conns_finish for `stuck`). */
afd_status_t fz_http_exchange(fz_http_t *h, const uint8_t *data, size_t len, size_t piece,
                              void (*stuck)(void *), void *arg);

/* config.json of afd_mkmodel's tiny preset (vocabulary 1024, context 4096), for the
 * targets that set up a coordinator */
extern const char fz_tiny_config[];

#endif
