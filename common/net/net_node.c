/* net_node: node-side control-plane session and the combined control/UCX wait. */
#define _GNU_SOURCE
#include "net_node.h"
#include "afd_log.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

uint64_t net_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000ull + (uint64_t)ts.tv_nsec / 1000;
}

afd_status_t net_node_join(net_node_t *n, const char *coord, Afd__Hello *hello, int timeout_ms,
                           Afd__Welcome **welcome)
{
    memset(n, 0, sizeof(*n));
    n->fd = -1;
    snprintf(n->coord, sizeof(n->coord), "%s", coord);
    net_frame_reader_init(&n->rd);
    afd_status_t st = net_tcp_connect(coord, timeout_ms, &n->fd);
    if (st) {
        afd_error("coordinator %s: cannot connect", coord);
        return st;
    }
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_HELLO;
    f.hello = hello;
    if ((st = net_frame_send_fd(n->fd, &f))) {
        afd_error("coordinator %s: sending hello failed", coord);
        goto err;
    }
    Afd__Frame *r;
    if ((st = net_frame_recv_fd(n->fd, &n->rd, timeout_ms, &r))) {
        afd_error("coordinator %s: no welcome (%s)", coord, afd_status_str(st));
        goto err;
    }
    if (r->body_case != AFD__FRAME__BODY_WELCOME) {
        afd_error("coordinator %s: expected a welcome frame", coord);
        net_frame_free(r);
        st = AFD_ERR_PEER;
        goto err;
    }
    if (r->welcome->error && r->welcome->error[0]) {
        afd_error("coordinator %s refused this node: %s", coord, r->welcome->error);
        st = strstr(r->welcome->error, "token") ? AFD_ERR_AUTH : AFD_ERR_PEER;
        net_frame_free(r);
        goto err;
    }
    n->node_id = r->welcome->node_id;
    /* hand the welcome over inside its frame: the caller frees it with net_frame_free */
    *welcome = r->welcome;
    r->welcome = NULL;
    r->body_case = AFD__FRAME__BODY__NOT_SET;
    net_frame_free(r);
    return AFD_OK;
err:
    net_node_close(n);
    return st;
}

void net_node_close(net_node_t *n)
{
    if (n->fd >= 0) close(n->fd);
    n->fd = -1;
    net_frame_reader_fini(&n->rd);
}

afd_status_t net_node_send(net_node_t *n, Afd__Frame *f)
{
    if (n->fd < 0) return AFD_ERR_PEER;
    return net_frame_send_fd(n->fd, f);
}

afd_status_t net_node_next(net_node_t *n, Afd__Frame **out)
{
    if (n->fd < 0) return AFD_ERR_PEER;
    afd_status_t st = net_frame_reader_next(&n->rd, out);
    if (st != AFD_INPROGRESS) return st == AFD_OK ? AFD_OK : AFD_ERR_PEER;
    st = net_frame_pump_fd(n->fd, &n->rd);
    if (st) {
        /* the coordinator is gone: frames already buffered are still handed out */
        afd_status_t st2 = net_frame_reader_next(&n->rd, out);
        return st2 == AFD_OK ? AFD_OK : AFD_ERR_PEER;
    }
    st = net_frame_reader_next(&n->rd, out);
    return st == AFD_OK || st == AFD_INPROGRESS ? st : AFD_ERR_PEER;
}

void net_node_wait(net_node_t *n, net_ucx_t *ucx, int busy_us, int timeout_ms)
{
    uint64_t t0 = net_now_us();
    struct pollfd p[2];
    int np = 0;
    if (ucx) {
        do {
            if (net_ucx_progress(ucx)) return;
            if (n->fd >= 0) {
                struct pollfd c = {.fd = n->fd, .events = POLLIN};
                if (busy_us > 0 && poll(&c, 1, 0) > 0) return;
            }
        } while (net_now_us() - t0 < (uint64_t)busy_us);
        if (net_ucx_arm(ucx) != AFD_OK) return; /* events pending: progress again */
        p[np++] = (struct pollfd){.fd = net_ucx_fd(ucx), .events = POLLIN};
    }
    if (n->fd >= 0) p[np++] = (struct pollfd){.fd = n->fd, .events = POLLIN};
    if (np == 0) {
        usleep((useconds_t)timeout_ms * 1000);
        return;
    }
    if (poll(p, (nfds_t)np, timeout_ms) < 0 && errno != EINTR) afd_warn("poll: %m");
    if (ucx) net_ucx_progress(ucx);
}
