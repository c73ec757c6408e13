/* fz_http: socket pairs in place of accepted connections, fed to the project's servers. */
#define _GNU_SOURCE
#include "fz_http.h"
#include "afd_log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct walk_ctx {
    const void *data;
    uv_stream_t *found;
    int count;
} walk_ctx_t;

static void walk_cb(uv_handle_t *hd, void *arg)
{
    walk_ctx_t *w = arg;
    w->count++;
    if (hd->type == UV_TCP && hd->data == w->data && !w->found) w->found = (uv_stream_t *)hd;
}

uv_stream_t *fz_listener_find(uv_loop_t *loop, const void *data)
{
    walk_ctx_t w = {data, NULL, 0};
    uv_walk(loop, walk_cb, &w);
    return w.found;
}

int fz_loop_handles(uv_loop_t *loop)
{
    walk_ctx_t w = {NULL, NULL, 0};
    uv_walk(loop, walk_cb, &w);
    return w.count;
}

afd_status_t fz_conn_open(uv_stream_t *listener, int *fd)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
        afd_error("fuzz: socketpair: %m");
        return AFD_ERR_IO;
    }
    /* what accept() would have returned: the listener's connection callback takes it */
    listener->accepted_fd = sv[0];
    listener->connection_cb(listener, 0);
    *fd = sv[1];
    return AFD_OK;
}

size_t fz_drain(int fd)
{
    char buf[65536];
    size_t got = 0;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        return got;
    }
}

void fz_conn_send(uv_loop_t *loop, int fd, const uint8_t *data, size_t len, size_t piece)
{
    if (piece == 0 || piece > len) piece = len;
    size_t off = 0;
    while (off < len) {
        size_t n = len - off < piece ? len - off : piece;
        ssize_t w = send(fd, data + off, n, MSG_NOSIGNAL);
        if (w > 0)
            off += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EINTR)
            return; /* the server closed its end: the rest is not read */
        uv_run(loop, UV_RUN_NOWAIT);
        fz_drain(fd);
    }
    uv_run(loop, UV_RUN_NOWAIT);
    fz_drain(fd);
}

void fz_conns_finish(uv_loop_t *loop, const int *fds, int n, int base, void (*stuck)(void *),
                     void *arg)
{
    for (int i = 0; i < n; i++)
        shutdown(fds[i], SHUT_WR);
    /* polling turns without a handle closing or a byte coming back: the server waits */
    int idle = 0;
    while (fz_loop_handles(loop) > base) {
        int before = fz_loop_handles(loop);
        uv_run(loop, idle < 64 ? UV_RUN_NOWAIT : UV_RUN_ONCE); /* ONCE: a timer is due */
        size_t got = 0;
        for (int i = 0; i < n; i++)
            got += fz_drain(fds[i]);
        if (got || fz_loop_handles(loop) != before) {
            idle = 0;
        } else if (++idle == 32 && stuck) {
            stuck(arg);
        }
    }
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

size_t fz_piece_size(const uint8_t *data, size_t len)
{
    static const size_t sizes[] = {0, 0, 0, 0, 1, 2, 3, 7, 16, 61, 256, 4099};
    uint32_t x = 2166136261u;
    for (size_t i = 0; i < len; i++)
        x = (x ^ data[i]) * 16777619u;
    size_t p = sizes[x % (sizeof(sizes) / sizeof(sizes[0]))];
    if (p && p < len / 256) p = len / 256; /* bounds the loop turns of a long input */
    return p;
}

afd_status_t fz_http_init(fz_http_t *h, const net_http_limits_t *lim, net_http_handler_cb cb,
                          void *arg)
{
    memset(h, 0, sizeof(*h));
    if (uv_loop_init(&h->loop) < 0) return AFD_ERR_IO;
    afd_status_t st = net_http_server_create(&h->loop, "127.0.0.1", 0, lim, cb, arg, &h->srv);
    if (st) return st;
    /* the listener is the server's one TCP handle, its data the server */
    h->listener = fz_listener_find(&h->loop, h->srv);
    if (!h->listener) {
        afd_error("fuzz: the http server's listener was not found on its loop");
        return AFD_ERR_NOT_FOUND;
    }
    fz_http_mark(h);
    return AFD_OK;
}

void fz_http_mark(fz_http_t *h)
{
    h->base_handles = fz_loop_handles(&h->loop);
}

afd_status_t fz_http_exchange(fz_http_t *h, const uint8_t *data, size_t len, size_t piece,
                              void (*stuck)(void *), void *arg)
{
    int fd;
    afd_status_t st = fz_conn_open(h->listener, &fd);
    if (st) return st;
    fz_conn_send(&h->loop, fd, data, len, piece);
    fz_conns_finish(&h->loop, &fd, 1, h->base_handles, stuck, arg);
    return AFD_OK;
}

const char fz_tiny_config[] =
    "{\"hidden_size\":320,\"intermediate_size\":384,\"num_attention_heads\":4,"
    "\"num_attention_groups\":1,\"num_hidden_layers\":4,\"vocab_size\":1024,"
    "\"rms_norm_eps\":1e-05,\"moe_intermediate_size\":192,\"moe_num_experts\":8,\"moe_top_k\":3,"
    "\"rope_theta\":500000,\"max_position_embedding\":4096,\"share_expert_dim\":192,"
    "\"share_q_dim\":160,\"head_dim\":64,\"norm_expert_weight\":false,\"moe_layers_enum\":\"1,2\","
    "\"bos_token_id\":0,\"eos_token_id\":1}";
