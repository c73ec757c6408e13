/* net_node: node-side control-plane session and the combined control/UCX wait. */
#define _GNU_SOURCE
#include "net_node.h"
#include "afd_log.h"
#include "net_wire.h"

#include <sched.h>

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
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

afd_status_t net_node_join_wait(net_node_t *n, const char *coord, Afd__Hello *hello, long wait_s,
                                const volatile sig_atomic_t *stop, Afd__Welcome **welcome)
{
    uint64_t until = net_now_us() + (uint64_t)(wait_s > 0 ? wait_s : 0) * 1000000;
    int delay_ms = 200;
    for (int tries = 0;; tries++) {
        afd_status_t st = net_node_join(n, coord, hello, 10000, welcome);
        if (st == AFD_OK) return AFD_OK;
        if (st == AFD_ERR_AUTH || (stop && *stop) ||
            net_now_us() + (uint64_t)delay_ms * 1000 > until)
            return st;
        if (!tries) afd_info("coordinator %s: trying again for up to %ld s", coord, wait_s);
        usleep((useconds_t)delay_ms * 1000);
        delay_ms = delay_ms * 2 > 5000 ? 5000 : delay_ms * 2;
    }
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

void net_node_pin_cpu(long cpu)
{
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set)) afd_warn("pinning to cpu %ld: %m", cpu);
}

afd_status_t net_node_send_ready(net_node_t *n, net_ucx_t *ucx)
{
    const void *addr;
    size_t alen;
    afd_status_t st = net_ucx_address(ucx, &addr, &alen);
    if (st) return st;
    Afd__Ready rd = AFD__READY__INIT;
    rd.ucx_address.data = (uint8_t *)addr;
    rd.ucx_address.len = alen;
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_READY;
    f.ready = &rd;
    return net_node_send(n, &f);
}

afd_status_t net_node_send_connected(net_node_t *n, uint32_t epoch)
{
    Afd__Connected cn = AFD__CONNECTED__INIT;
    cn.epoch = epoch;
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_CONNECTED;
    f.connected = &cn;
    return net_node_send(n, &f);
}

void net_lat_record(net_lat_hist_t *h, uint64_t send_ns)
{
    uint64_t now = net_wire_now_ns();
    if (now <= send_ns) return; /* clocks of two hosts disagree: not a sample */
    uint64_t us = (now - send_ns) / 1000;
    int b = 0;
    while (b < NET_LAT_BUCKETS - 1 && (1ull << b) < us)
        b++;
    h->buckets[b]++;
    h->count++;
    h->sum_us += us;
}

void net_lat_answer(net_lat_hist_t *h, uint64_t us)
{
    h->answer_count++;
    h->answer_sum_us += us;
    if (us > h->answer_max_us) h->answer_max_us = us;
}

void net_lat_to_proto(net_lat_hist_t *h, int n, Afd__LatencyHist *pb, Afd__LatencyHist **pp)
{
    for (int i = 0; i < n; i++) {
        afd__latency_hist__init(&pb[i]);
        pb[i].peer_id = h[i].peer_id;
        pb[i].n_buckets = NET_LAT_BUCKETS;
        pb[i].buckets = h[i].buckets;
        pb[i].count = h[i].count;
        pb[i].sum_us = h[i].sum_us;
        pb[i].answer_count = h[i].answer_count;
        pb[i].answer_sum_us = h[i].answer_sum_us;
        pb[i].answer_max_us = h[i].answer_max_us;
        pp[i] = &pb[i];
    }
}

void net_peer_set_close(net_peer_set_t *ps)
{
    for (int i = 0; i < ps->n; i++)
        if (ps->ep[i]) net_ucx_disconnect(ps->ep[i]);
    memset(ps->ep, 0, sizeof(ps->ep));
    ps->n = 0;
    ps->live = 0;
}

afd_status_t net_peer_set_apply(net_peer_set_t *ps, net_ucx_t *ucx, const Afd__PeerTable *pt,
                                Afd__Role role)
{
    net_peer_set_close(ps);
    for (size_t i = 0; i < pt->n_peers; i++) {
        const Afd__Peer *p = pt->peers[i];
        if (p->role != role) continue;
        if (p->index >= NET_MAX_PEERS) {
            afd_error("peer table: index %u beyond %d", p->index, NET_MAX_PEERS);
            return AFD_ERR_RANGE;
        }
        afd_status_t st = net_ucx_connect(ucx, p->ucx_address.data, p->ucx_address.len, p->node_id,
                                          &ps->ep[p->index]);
        if (st) return st;
        ps->ids[p->index] = p->node_id;
        ps->lat[p->index].peer_id = p->node_id;
        ps->live++;
        if ((int)p->index + 1 > ps->n) ps->n = (int)p->index + 1;
    }
    return AFD_OK;
}

int net_peer_set_index(const net_peer_set_t *ps, uint32_t id)
{
    for (int i = 0; i < ps->n; i++)
        if (ps->ep[i] && ps->ids[i] == id) return i;
    return -1;
}

afd_status_t net_node_send_heartbeat(net_node_t *n, Afd__NodeStats *stats)
{
    Afd__Heartbeat hb = AFD__HEARTBEAT__INIT;
    hb.time_us = net_now_us();
    hb.stats = stats;
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_HEARTBEAT;
    f.heartbeat = &hb;
    return net_node_send(n, &f);
}

/* ---- the data plane's memory ---- */

int net_plane_mode_ok(const char *mode)
{
    return mode && (!strcmp(mode, "auto") || !strcmp(mode, "host") || !strcmp(mode, "device"));
}

int net_plane_device_host(int device_backend, int cuda_backend)
{
    if (!device_backend) return 0;
    if (!cuda_backend) return 1;
    const char *e = getenv("AFD_UCX_DEVICE_HOST");
    return e && !strcmp(e, "1");
}

int net_plane_choose(const char *mode, int device_backend, int cuda_backend, const net_ucx_t *u)
{
    if (!device_backend || !strcmp(mode, "host")) return 0;
    if (!strcmp(mode, "auto")) return cuda_backend && net_ucx_cuda_memory(u);
    if (!net_ucx_device_ok(u)) {
        afd_error("--data-plane device: this UCX does not move CUDA memory (no cuda_copy, "
                  "cuda_ipc or gdr_copy transport); use --data-plane host or a UCX built "
                  "with CUDA");
        return -1;
    }
    return 1;
}
