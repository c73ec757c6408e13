/*
 * coord_nodes: the control-plane server. Nodes connect over TCP, present the
 * cluster token (Hello), get an id and their placement (Welcome), report their
 * UCX address once loaded (Ready); when every expected node is ready the
 * coordinator publishes a peer table under a new epoch and the cluster serves
 * once every node has connected to its peers. Frames that do not parse, or come
 * out of order, close that node's connection only.
 */
#define _GNU_SOURCE
#include "coord.h"
#include "afd_log.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

uint64_t coord_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000ull + (uint64_t)ts.tv_nsec / 1000;
}

static void node_closed(uv_handle_t *h)
{
    coord_node_t *n = h->data;
    net_frame_reader_fini(&n->rd);
    free(n->ucx_addr);
    n->ucx_addr = NULL;
    if (n->last_hb) afd__heartbeat__free_unpacked(n->last_hb, NULL);
    n->last_hb = NULL;
    n->open = 0;
    n->state = NODE_FREE;
}

static void node_drop(coord_node_t *n, const char *why)
{
    coord_t *c = n->c;
    if (!n->open || uv_is_closing((uv_handle_t *)&n->tcp)) return;
    if (n->state != NODE_FREE && n->id)
        afd_warn("node %u (%s, %s %d) left: %s", n->id, n->name,
                 n->role == AFD__ROLE__ROLE_ATTN ? "attention" : "ffn", n->index, why);
    int was = n->state;
    n->state = NODE_FREE;
    uv_close((uv_handle_t *)&n->tcp, node_closed);
    if (was != NODE_FREE && n->id) coord_sched_node_lost(c, n, why);
}

typedef struct write_req {
    uv_write_t w;
    uint8_t *buf;
    coord_node_t *close_after; /* a refusal: close once the answer is out */
} write_req_t;

static void on_written(uv_write_t *w, int status)
{
    write_req_t *wr = (write_req_t *)w;
    (void)status;
    if (wr->close_after) node_drop(wr->close_after, "refused");
    free(wr->buf);
    free(wr);
}

void coord_nodes_send(coord_node_t *n, Afd__Frame *f)
{
    if (!n->open || uv_is_closing((uv_handle_t *)&n->tcp)) return;
    write_req_t *wr = calloc(1, sizeof(*wr));
    size_t len;
    if (!wr || net_frame_encode(f, &wr->buf, &len)) {
        free(wr);
        node_drop(n, "cannot encode a frame");
        return;
    }
    uv_buf_t b = uv_buf_init((char *)wr->buf, (unsigned)len);
    if (uv_write(&wr->w, (uv_stream_t *)&n->tcp, &b, 1, on_written)) {
        free(wr->buf);
        free(wr);
        node_drop(n, "write failed");
    }
}

static int token_ok(const char *want, const char *got)
{
    if (!got) return 0;
    size_t a = strlen(want), b = strlen(got);
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < a; i++)
        diff |= (unsigned)(want[i] ^ got[i < b ? i : 0]);
    return diff == 0;
}

static void welcome_error(coord_node_t *n, const char *err)
{
    Afd__Welcome w = AFD__WELCOME__INIT;
    w.error = (char *)err;
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_WELCOME;
    f.welcome = &w;
    afd_warn("refusing node %s: %s", n->name[0] ? n->name : "(unnamed)", err);
    write_req_t *wr = calloc(1, sizeof(*wr));
    size_t len;
    if (!wr || net_frame_encode(&f, &wr->buf, &len)) {
        free(wr);
        return node_drop(n, err);
    }
    wr->close_after = n;
    uv_read_stop((uv_stream_t *)&n->tcp);
    uv_buf_t b = uv_buf_init((char *)wr->buf, (unsigned)len);
    if (uv_write(&wr->w, (uv_stream_t *)&n->tcp, &b, 1, on_written)) {
        free(wr->buf);
        free(wr);
        node_drop(n, err);
    }
}

static void on_hello(coord_node_t *n, const Afd__Hello *h)
{
    coord_t *c = n->c;
    snprintf(n->name, sizeof(n->name), "%s", h->name ? h->name : "");
    if (h->protocol != 1) return welcome_error(n, "unsupported protocol version");
    if (!token_ok(c->o.cluster_token, h->cluster_token))
        return welcome_error(n, "bad cluster token");
    if (h->role != AFD__ROLE__ROLE_ATTN && h->role != AFD__ROLE__ROLE_FFN)
        return welcome_error(n, "unknown role");
    /* FFN shares are fixed; attention nodes may come and go once the cluster is formed */
    int want = h->role == AFD__ROLE__ROLE_ATTN ? (c->formed ? 64 : (int)c->o.attn) : (int)c->o.ffn;
    /* an FFN node that already holds a share's experts gets it back when it is free;
     * otherwise the lowest index no live node of the role holds */
    int idx = -1, held = -1;
    if (h->role == AFD__ROLE__ROLE_FFN && h->ffn_share_held > 0 &&
        h->ffn_share_count == (uint32_t)c->o.ffn && h->ffn_share_held <= (uint32_t)c->o.ffn)
        held = (int)h->ffn_share_held - 1;
    for (int pass = held >= 0 ? 0 : 1; pass < 2 && idx < 0; pass++)
        for (int i = pass ? 0 : held; i < (pass ? want : held + 1) && idx < 0; i++) {
            int taken = 0;
            for (int k = 0; k < COORD_MAX_NODES; k++) {
                coord_node_t *o = &c->nodes[k];
                if (o != n && o->open && o->state != NODE_FREE && o->role == h->role &&
                    o->index == i)
                    taken = 1;
            }
            if (!taken) idx = i;
        }
    if (idx < 0) return welcome_error(n, "the cluster already has every node of this role");
    if (h->role == AFD__ROLE__ROLE_ATTN &&
        (h->kv_blocks == 0 || h->kv_block_size == 0 || h->kv_block_size > 4096))
        return welcome_error(n, "attention node reports no KV cache");
    n->role = h->role;
    n->index = idx;
    n->id = ++c->next_node_id;
    n->state = NODE_HELLO;
    n->kv_blocks = h->kv_blocks;
    n->kv_block_size = h->kv_block_size;
    n->max_batch_tokens = h->max_batch_tokens;
    n->max_seqs = h->max_seqs;
    /* shown to operators only: bounded and reduced to a plain name */
    size_t bl = 0;
    for (const char *b = h->backend ? h->backend : ""; *b && bl < sizeof(n->backend) - 1; b++)
        if ((*b >= 'a' && *b <= 'z') || (*b >= '0' && *b <= '9') || *b == '-')
            n->backend[bl++] = *b;
    n->backend[bl] = 0;
    n->ranks = h->ranks >= 1 && h->ranks <= 1024 ? h->ranks : 1;
    n->kv_reserved = 0;
    n->running = 0;
    n->member = 0;
    n->drained = 0;
    Afd__Welcome w = AFD__WELCOME__INIT;
    w.node_id = n->id;
    w.epoch = c->epoch;
    w.num_layers = (uint32_t)c->cfg.num_layers;
    if (h->role == AFD__ROLE__ROLE_FFN) {
        w.ffn_index = (uint32_t)idx;
        w.ffn_count = (uint32_t)c->o.ffn;
        w.expert_begin = (uint32_t)((long)idx * c->cfg.num_experts / c->o.ffn);
        w.expert_end = (uint32_t)((long)(idx + 1) * c->cfg.num_experts / c->o.ffn);
        n->expert_begin = w.expert_begin;
        n->expert_end = w.expert_end;
    }
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_WELCOME;
    f.welcome = &w;
    coord_nodes_send(n, &f);
    afd_info("node %u (%s) joined as %s %d", n->id, n->name,
             h->role == AFD__ROLE__ROLE_ATTN ? "attention" : "ffn", idx);
}

static int is_member_candidate(const coord_node_t *n)
{
    if (!n->open || n->state < NODE_READY) return 0;
    return !(n->role == AFD__ROLE__ROLE_ATTN && n->drained && n->running == 0);
}

int coord_nodes_publish(coord_t *c)
{
    int nattn = 0, nffn = 0;
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        const coord_node_t *n = &c->nodes[i];
        if (!is_member_candidate(n)) continue;
        if (n->role == AFD__ROLE__ROLE_ATTN)
            nattn++;
        else
            nffn++;
    }
    /* the first time, every expected node; later every FFN share and any attention node */
    if (nffn != c->o.ffn || nattn < 1 || (!c->formed && nattn != c->o.attn)) return 0;
    c->epoch++;
    Afd__Peer peers[COORD_MAX_NODES], *pp[COORD_MAX_NODES];
    size_t np = 0;
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        coord_node_t *n = &c->nodes[i];
        n->member = is_member_candidate(n);
        if (!n->member) continue;
        afd__peer__init(&peers[np]);
        peers[np].node_id = n->id;
        peers[np].role = n->role;
        peers[np].index = (uint32_t)n->index;
        peers[np].ucx_address.data = n->ucx_addr;
        peers[np].ucx_address.len = n->ucx_len;
        peers[np].expert_begin = n->expert_begin;
        peers[np].expert_end = n->expert_end;
        pp[np] = &peers[np];
        np++;
        n->state = NODE_READY; /* until it confirms the new epoch */
    }
    Afd__PeerTable pt = AFD__PEER_TABLE__INIT;
    pt.epoch = c->epoch;
    pt.n_peers = np;
    pt.peers = pp;
    pt.num_attn = (uint32_t)nattn;
    pt.num_ffn = (uint32_t)nffn;
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_PEERS;
    f.peers = &pt;
    for (int i = 0; i < COORD_MAX_NODES; i++)
        if (c->nodes[i].member) coord_nodes_send(&c->nodes[i], &f);
    c->ready = 0;
    c->reconfig = 0;
    afd_info("epoch %u: peer table sent to %zu nodes (%d attention, %d FFN)", c->epoch, np, nattn,
             nffn);
    return 1;
}

static void on_frame(coord_node_t *n, Afd__Frame *f)
{
    coord_t *c = n->c;
    n->last_seen_us = coord_now_us();
    switch (f->body_case) {
    case AFD__FRAME__BODY_HELLO:
        if (n->state != NODE_FREE) return node_drop(n, "second hello");
        return on_hello(n, f->hello);
    case AFD__FRAME__BODY_READY:
        if (n->state != NODE_HELLO) return node_drop(n, "ready out of order");
        if (f->ready->ucx_address.len == 0 || f->ready->ucx_address.len > 65536)
            return node_drop(n, "bad UCX address");
        n->ucx_addr = malloc(f->ready->ucx_address.len);
        if (!n->ucx_addr) return node_drop(n, "out of memory");
        memcpy(n->ucx_addr, f->ready->ucx_address.data, f->ready->ucx_address.len);
        n->ucx_len = f->ready->ucx_address.len;
        n->state = NODE_READY;
        afd_info("node %u ready", n->id);
        if (!c->formed) {
            coord_nodes_publish(c);
        } else { /* joins a serving cluster: a new epoch once nothing is in flight */
            c->reconfig = 1;
            coord_sched_kick(c);
        }
        return;
    case AFD__FRAME__BODY_CONNECTED:
        if (n->state < NODE_READY) return node_drop(n, "connected out of order");
        if (f->connected->epoch != c->epoch) return; /* an older table */
        n->state = NODE_CONNECTED;
        n->epoch_connected = f->connected->epoch;
        {
            int waiting = 0, na = 0, nf = 0;
            for (int i = 0; i < COORD_MAX_NODES; i++) {
                const coord_node_t *m = &c->nodes[i];
                if (!m->open || !m->member) continue;
                if (m->state != NODE_CONNECTED)
                    waiting++;
                else if (m->role == AFD__ROLE__ROLE_ATTN)
                    na++;
                else
                    nf++;
            }
            if (waiting || c->reconfig) return;
            c->ready = 1;
            c->formed = 1;
            afd_info("cluster ready: %d attention and %d FFN nodes, epoch %u", na, nf, c->epoch);
            coord_sched_kick(c);
        }
        return;
    case AFD__FRAME__BODY_RESULT:
        /* a node between epochs (ready, not yet connected) may still report the steps that
         * failed when the old placement broke: those are not in flight and are ignored */
        if (n->role != AFD__ROLE__ROLE_ATTN || n->state < NODE_READY)
            return node_drop(n, "step result from a node that runs no steps");
        return coord_sched_on_result(c, n, f->result);
    case AFD__FRAME__BODY_HEARTBEAT:
        if (n->state == NODE_FREE) return node_drop(n, "heartbeat before hello");
        if (n->last_hb) afd__heartbeat__free_unpacked(n->last_hb, NULL);
        n->last_hb = f->heartbeat;
        f->heartbeat = NULL; /* kept */
        f->body_case = AFD__FRAME__BODY__NOT_SET;
        return;
    default:
        return node_drop(n, "unexpected frame");
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    static char slab[65536]; /* one loop thread: reads are consumed before the next */
    (void)suggested;
    *buf = uv_buf_init(slab, sizeof(slab));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    coord_node_t *n = s->data;
    if (nread < 0)
        return node_drop(n, nread == UV_EOF ? "connection closed" : uv_strerror((int)nread));
    if (nread == 0) return;
    if (net_frame_reader_feed(&n->rd, buf->base, (size_t)nread))
        return node_drop(n, "frame too large");
    for (;;) {
        Afd__Frame *f;
        afd_status_t st = net_frame_reader_next(&n->rd, &f);
        if (st == AFD_INPROGRESS) return;
        if (st) return node_drop(n, "malformed frame");
        on_frame(n, f);
        net_frame_free(f);
        if (!n->open || uv_is_closing((uv_handle_t *)&n->tcp)) return;
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    coord_t *c = server->data;
    if (status < 0) return;
    coord_node_t *n = NULL;
    for (int i = 0; i < COORD_MAX_NODES && !n; i++)
        if (!c->nodes[i].open) n = &c->nodes[i];
    uv_tcp_t tmp;
    if (!n) { /* full: accept and close at once */
        uv_tcp_init(c->loop, &tmp);
        if (uv_accept(server, (uv_stream_t *)&tmp) == 0)
            afd_warn("control connection refused: too many nodes");
        uv_close((uv_handle_t *)&tmp, NULL);
        return;
    }
    memset(n, 0, sizeof(*n));
    n->c = c;
    n->index = -1;
    net_frame_reader_init(&n->rd);
    uv_tcp_init(c->loop, &n->tcp);
    n->tcp.data = n;
    n->open = 1;
    n->last_seen_us = coord_now_us();
    if (uv_accept(server, (uv_stream_t *)&n->tcp)) {
        uv_close((uv_handle_t *)&n->tcp, node_closed);
        return;
    }
    uv_tcp_nodelay(&n->tcp, 1);
    uv_read_start((uv_stream_t *)&n->tcp, on_alloc, on_read);
}

void coord_nodes_check_timeouts(coord_t *c)
{
    uint64_t now = coord_now_us();
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        coord_node_t *n = &c->nodes[i];
        if (n->open && n->state >= NODE_READY &&
            now - n->last_seen_us > (uint64_t)c->o.node_timeout_ms * 1000)
            node_drop(n, "missed heartbeats");
    }
}

afd_status_t coord_nodes_listen(coord_t *c)
{
    struct sockaddr_storage addr;
    if (uv_ip4_addr(c->o.host, (int)c->o.ctrl_port, (struct sockaddr_in *)&addr) &&
        uv_ip6_addr(c->o.host, (int)c->o.ctrl_port, (struct sockaddr_in6 *)&addr)) {
        afd_error("--host %s is not an IP address", c->o.host);
        return AFD_ERR_INVALID;
    }
    uv_tcp_init(c->loop, &c->ctrl);
    c->ctrl.data = c;
    int rc = uv_tcp_bind(&c->ctrl, (struct sockaddr *)&addr, 0);
    if (!rc) rc = uv_listen((uv_stream_t *)&c->ctrl, 128, on_connection);
    if (rc) {
        afd_error("control port %s:%ld: %s", c->o.host, c->o.ctrl_port, uv_strerror(rc));
        return AFD_ERR_IO;
    }
    return AFD_OK;
}
