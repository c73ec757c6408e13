/*
 * ffn_node: hosts a share of the FFN: experts [i*E/F, (i+1)*E/F) of every MoE
 * layer and a 1/F slice of the shared expert and of the dense MLPs. For every
 * (step, layer, micro-batch) it waits for one A2F slice from each attention node
 * (possibly empty), runs its share over the union as one batch, and returns each
 * attention node its rows of the partial output (F2A). With --tp N the share runs on N
 * tensor-parallel ranks (GPUs) whose outputs are summed in the node (ffn_exec).
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "afd_opts.h"
#include "afd_trace.h"
#include "ffn_exec.h"
#include "mdl_model.h"
#include "net_metrics.h"
#include "net_node.h"
#include "net_ucx.h"
#include "net_wire.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FFN_MAX_ATTN  NET_MAX_PEERS
#define FFN_MAX_SLOTS 32

typedef struct ffn_opts {
    char *coordinator, *cluster_token, *model, *backend, *name, *trace_file, *devices, *data_plane;
    long trace_events, threads, tp, busy_poll_us, max_tokens, cpu, heartbeat_ms, metrics_port,
        coordinator_wait_s;
    int ucx_peer_errors;
} ffn_opts_t;

#define O(f) offsetof(ffn_opts_t, f)
static const afd_opt_t ffn_table[] = {
    {"coordinator", AFD_OPT_STRING, "127.0.0.1:7000", O(coordinator), 0, 0, 0,
     "coordinator control address host:port"},
    {"cluster-token", AFD_OPT_STRING, NULL, O(cluster_token), 0, 0, AFD_OPT_SECRET,
     "token nodes present to join the cluster (required)"},
    {"model", AFD_OPT_STRING, NULL, O(model), 0, 0, 0, "checkpoint directory (required)"},
    {"backend", AFD_OPT_STRING, "cpu", O(backend), 0, 0, 0,
     "cpu or cuda (cpu-dev: the cpu backend taking the device code paths, for tests)"},
    {"name", AFD_OPT_STRING, NULL, O(name), 0, 0, 0, "node name (default host:pid)"},
    {"threads", AFD_OPT_INT, "1", O(threads), 0, 1024, 0, "GEMM threads (per rank)"},
    {"tp", AFD_OPT_INT, "1", O(tp), 1, KN_GROUP_MAX, 0,
     "tensor-parallel ranks: the share's expert, shared-expert and dense-MLP intermediate "
     "dimensions split this many ways, one GPU each (cuda), outputs summed in the node"},
    {"devices", AFD_OPT_STRING, NULL, O(devices), 0, 0, 0,
     "the ranks' devices, comma-separated (default: AFD_CUDA_DEVICE or 0, and the ones "
     "after it)"},
    {"cpu", AFD_OPT_INT, "-1", O(cpu), -1, 4095, 0, "pin the process to this CPU (-1: no)"},
    {"data-plane", AFD_OPT_STRING, "auto", O(data_plane), 0, 0, 0,
     "device backends: F2A answers sent from device memory (device) or staged through "
     "pinned host buffers (host); auto: device when the UCX in use moves CUDA memory"},
    {"busy-poll-us", AFD_OPT_INT, "200", O(busy_poll_us), 0, 1000000, 0,
     "spin this long for data-plane messages before sleeping on the event fd"},
    {"max-tokens", AFD_OPT_INT, "65536", O(max_tokens), 1, 1 << 22, 0,
     "most tokens one attention node may send per micro-batch"},
    {"heartbeat-ms", AFD_OPT_INT, "1000", O(heartbeat_ms), 50, 60000, 0, "heartbeat period"},
    {"metrics-port", AFD_OPT_INT, "-1", O(metrics_port), -1, 65535, 0,
     "serve Prometheus /metrics on this port (-1: off, 0: any free port)"},
    {"ucx-peer-errors", AFD_OPT_BOOL, "false", O(ucx_peer_errors), 0, 0, 0,
     "UCX peer failure detection (UCP_ERR_HANDLING_MODE_PEER)"},
    {"coordinator-wait-s", AFD_OPT_INT, "300", O(coordinator_wait_s), 0, 86400, 0,
     "how long to keep trying to reach the coordinator, at start and after losing it "
     "(then the node rejoins, keeping its weights; 0: exit at once)"},
    {"trace-file", AFD_OPT_STRING, NULL, O(trace_file), 0, 0, 0,
     "write a timeline of the pipeline (Chrome trace JSON) here at exit"},
    {"trace-events", AFD_OPT_INT, "262144", O(trace_events), 1, AFD_TRACE_MAX_EVENTS, 0,
     "spans the timeline keeps (the latest ones; 48 bytes each)"},
    AFD_OPTS_END};
#undef O

typedef struct ffn_slot {
    int used, complete, sends;
    net_wire_hdr_t key; /* step, layer, mb, nmb of the first slice */
    int arrived[FFN_MAX_ATTN];
    net_wire_hdr_t hdr[FFN_MAX_ATTN];
    net_ucx_buf_t rx[FFN_MAX_ATTN]; /* A2F slices, one per attention node */
    net_ucx_buf_t tx[FFN_MAX_ATTN]; /* F2A answers */
    void *dtx[FFN_MAX_ATTN];        /* F2A answers in device memory (--data-plane device) */
    size_t dtx_cap[FFN_MAX_ATTN];
    net_wire_hdr_t txh[FFN_MAX_ATTN];
    int have;
    uint64_t first_us;
} ffn_slot_t;

typedef struct ffn_node {
    ffn_opts_t o;
    mdl_config_t cfg;
    ffn_exec_t x; /* the share on its ranks */
    net_node_t ctl;
    net_ucx_t *ucx;
    uint32_t epoch;
    net_peer_set_t attn; /* the attention nodes, by index */
    ffn_slot_t slots[FFN_MAX_SLOTS];
    net_metrics_server_t *metrics;
    net_wire_limits_t lim;
    afd_trace_t *trace; /* --trace-file: the pipeline's timeline */
    int dev_plane;      /* F2A answers go out from device memory */
    /* stats */
    uint64_t ffn_us, wait_us, idle_us, steps, a2f_bytes, f2a_bytes, tokens, errors;
} ffn_node_t;

static volatile sig_atomic_t g_stop;
static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static ffn_slot_t *slot_find(ffn_node_t *f, const net_wire_hdr_t *h, int create)
{
    ffn_slot_t *free_slot = NULL;
    for (int i = 0; i < FFN_MAX_SLOTS; i++) {
        ffn_slot_t *s = &f->slots[i];
        /* a slot some attention node never completed (its step failed there) goes stale:
         * steps in flight are at most a few apart */
        if (create && s->used && s->have >= 0 && !s->complete && s->key.step + 8 < h->step) {
            afd_warn("dropping the unfinished step %llu layer %u micro-batch %u",
                     (unsigned long long)s->key.step, s->key.layer, s->key.mb);
            s->used = 0;
        }
        /* a processed slot (have -1) waits only for its sends: it never takes new data */
        if (s->used && s->have >= 0 && s->key.epoch == h->epoch && s->key.step == h->step &&
            s->key.layer == h->layer && s->key.mb == h->mb)
            return s;
        if (!s->used && !free_slot) free_slot = s;
    }
    if (!create || !free_slot) return NULL;
    free_slot->used = 1;
    free_slot->complete = 0;
    free_slot->have = 0;
    free_slot->key = *h;
    free_slot->first_us = net_now_us();
    memset(free_slot->arrived, 0, sizeof(free_slot->arrived));
    return free_slot;
}

static uint8_t g_empty[8];

/* A2F slices land in host memory whatever the data plane: the routing in them is read on
 * the host, and the rows are uploaded once to rank 0 and broadcast. */
static void *ffn_alloc(void *arg, const void *hdr, size_t hdr_len, size_t len, int rndv,
                       int *device)
{
    ffn_node_t *f = arg;
    (void)rndv;
    (void)device;
    const char *why;
    if (net_wire_check(hdr, hdr_len, &f->lim, &why)) {
        afd_error("dropping a malformed data-plane message: %s", why);
        f->errors++;
        return NULL;
    }
    net_wire_hdr_t h;
    memcpy(&h, hdr, sizeof(h));
    int ai = net_peer_set_index(&f->attn, h.src);
    if (h.kind != NET_WIRE_A2F || ai < 0 || h.epoch != f->epoch || h.payload != len) {
        afd_error("dropping a data-plane message from node %u (kind %u, epoch %u, %zu bytes)",
                  h.src, h.kind, h.epoch, len);
        f->errors++;
        return NULL;
    }
    ffn_slot_t *s = slot_find(f, &h, 1);
    if (!s || s->arrived[ai]) {
        afd_error("dropping A2F step %llu layer %u mb %u from node %u: %s",
                  (unsigned long long)h.step, h.layer, h.mb, h.src,
                  s ? "duplicate" : "too many micro-batches in flight");
        f->errors++;
        return NULL;
    }
    if (len == 0) return g_empty;
    if (net_ucx_buf_reserve(f->ucx, &s->rx[ai], len)) return NULL;
    return s->rx[ai].p;
}

static void ffn_recv(void *arg, const void *hdr, size_t hdr_len, void *data, size_t len,
                     afd_status_t status)
{
    ffn_node_t *f = arg;
    (void)data;
    (void)hdr_len;
    net_wire_hdr_t h;
    memcpy(&h, hdr, sizeof(h));
    int ai = net_peer_set_index(&f->attn, h.src);
    ffn_slot_t *s = slot_find(f, &h, 0);
    if (status || ai < 0 || !s) {
        if (status)
            afd_error("A2F transfer from node %u failed: %s", h.src, afd_status_str(status));
        return;
    }
    net_lat_record(&f->attn.lat[ai], h.send_ns);
    f->a2f_bytes += len;
    s->arrived[ai] = 1;
    s->hdr[ai] = h;
    if (++s->have == f->attn.live) s->complete = 1; /* one slice from every attention node */
}

static void ffn_send_done(void *arg, afd_status_t status)
{
    ffn_slot_t *s = arg;
    if (status) afd_error("F2A send failed: %s", afd_status_str(status));
    s->sends--;
}

static void ffn_peer_err(void *arg, uint32_t peer, afd_status_t status)
{
    ffn_node_t *f = arg;
    afd_error("attention node %u failed: %s", peer, afd_status_str(status));
    f->errors++;
}

/* Runs one complete (step, layer, micro-batch) and answers every attention node. */
static void ffn_process(ffn_node_t *f, ffn_slot_t *s)
{
    uint64_t t0 = net_now_us();
    const mdl_config_t *c = &f->cfg;
    int H = c->hidden_size, layer = s->key.layer, n = 0;
    int k = c->is_moe[layer] ? c->top_k : 0;
    for (int a = 0; a < f->attn.n; a++)
        if (s->arrived[a]) n += (int)s->hdr[a].ntok;
    if (ffn_exec_reserve(&f->x, n > 0 ? n : 1)) {
        afd_error("out of memory for %d tokens", n);
        s->used = 0;
        return;
    }
    int off = 0, bad = 0;
    for (int a = 0; a < f->attn.n; a++) {
        if (!s->arrived[a]) continue; /* an index whose node left */
        const net_wire_hdr_t *h = &s->hdr[a];
        if (h->topk != (uint32_t)k) {
            afd_error("A2F from node %u: top-k %u for layer %d (expected %d)", h->src, h->topk,
                      layer, k);
            bad = 1;
            break;
        }
        if (h->ntok && net_wire_unpack_routing(s->rx[a].p, h->ntok, (uint32_t)H, h->dtype, h->topk,
                                               (uint32_t)c->num_experts, f->x.ids + (size_t)off * k,
                                               f->x.wts + (size_t)off * k)) {
            afd_error("A2F from node %u: expert id or weight out of range", h->src);
            bad = 1;
            break;
        }
        off += (int)h->ntok;
    }
    if (bad) { /* answer nothing: the step fails at its deadline on the attention side */
        f->errors++;
        s->used = 0;
        return;
    }
    /* the rows, once every slice is known good: unpacked on the ranks */
    off = 0;
    for (int a = 0; a < f->attn.n; a++) {
        if (!s->arrived[a]) continue;
        const net_wire_hdr_t *h = &s->hdr[a];
        ffn_exec_put_rows(&f->x, off, s->rx[a].p, (int)h->ntok, (afd_dtype_t)h->dtype);
        off += (int)h->ntok;
    }
    uint64_t t1 = net_now_us();
    if (n > 0) ffn_exec_run(&f->x, layer, n);
    f->tokens += (uint64_t)n;
    /* every answer packed (on the device: copied into the send buffers), then sent */
    off = 0;
    int ok[FFN_MAX_ATTN] = {0};
    for (int a = 0; a < f->attn.n; a++) {
        if (!s->arrived[a]) continue;
        const net_wire_hdr_t *h = &s->hdr[a];
        afd_dtype_t rdt = (afd_dtype_t)h->reply_dtype;
        size_t bytes = (size_t)h->ntok * H * afd_dtype_size(rdt);
        if (f->dev_plane) { /* packed into this slot's device buffer, sent from there */
            if (bytes > s->dtx_cap[a]) { /* the slot's earlier sends are over */
                ffn_exec_dev_free(&f->x, s->dtx[a]);
                s->dtx_cap[a] = 0;
                if (!(s->dtx[a] = ffn_exec_dev_alloc(&f->x, bytes))) {
                    afd_error("out of device memory for the F2A buffer");
                    off += (int)h->ntok;
                    continue;
                }
                s->dtx_cap[a] = bytes;
            }
            ffn_exec_get_rows_device(&f->x, off, (int)h->ntok, rdt, s->dtx[a]);
        } else {
            if (net_ucx_buf_reserve(f->ucx, &s->tx[a], bytes)) {
                afd_error("out of memory for the F2A buffer");
                off += (int)h->ntok;
                continue;
            }
            ffn_exec_get_rows(&f->x, off, (int)h->ntok, rdt, s->tx[a].p);
        }
        off += (int)h->ntok;
        ok[a] = 1;
    }
    ffn_exec_wait(&f->x); /* a device's compute and packing end here: the "ffn" span */
    uint64_t t2 = net_now_us();
    for (int a = 0; a < f->attn.n; a++) {
        if (!ok[a]) continue;
        const net_wire_hdr_t *h = &s->hdr[a];
        afd_dtype_t rdt = (afd_dtype_t)h->reply_dtype;
        size_t bytes = (size_t)h->ntok * H * afd_dtype_size(rdt);
        net_wire_hdr_t *r = &s->txh[a];
        *r = *h;
        r->kind = NET_WIRE_F2A;
        r->src = f->ctl.node_id;
        r->dtype = (uint8_t)rdt;
        r->topk = 0;
        r->payload = bytes;
        r->send_ns = net_wire_now_ns();
        s->sends++;
        afd_status_t st = f->dev_plane
                              ? net_ucx_send(f->attn.ep[a], r, sizeof(*r), s->dtx[a], bytes, NULL,
                                             NET_UCX_DEVICE, ffn_send_done, s)
                              : net_ucx_send(f->attn.ep[a], r, sizeof(*r), s->tx[a].p, bytes,
                                             bytes ? s->tx[a].memh : NULL, 0, ffn_send_done, s);
        if (st) {
            s->sends--;
            afd_error("F2A to node %u: %s", h->src, afd_status_str(st));
        }
        f->f2a_bytes += bytes;
    }
    /* ffn_us: the FFN stage's busy time, unpacking, compute, packing and sending */
    uint64_t t3 = net_now_us();
    f->ffn_us += t3 - t0;
    afd_trace_span(f->trace, "a2f unpack", t0, t1, s->key.step, layer, s->key.mb, n);
    afd_trace_span(f->trace, "ffn", t1, t2, s->key.step, layer, s->key.mb, n);
    afd_trace_span(f->trace, "f2a send", t2, t3, s->key.step, layer, s->key.mb, n);
    if (layer == c->num_layers - 1 && s->key.mb == s->key.nmb - 1) f->steps++;
    s->complete = 0;
    s->have = -1; /* processed: freed once the sends complete */
}

static void send_heartbeat(ffn_node_t *f)
{
    Afd__NodeStats ns = AFD__NODE_STATS__INIT;
    Afd__StageTimes busy = AFD__STAGE_TIMES__INIT;
    busy.ffn_us = f->ffn_us;
    busy.wait_us = f->wait_us;
    busy.other_us = f->idle_us;
    ns.busy = &busy;
    ns.steps = f->steps;
    ns.a2f_bytes = f->a2f_bytes;
    ns.f2a_bytes = f->f2a_bytes;
    ns.tokens = f->tokens;
    ns.data_plane_device = f->dev_plane;
    Afd__LatencyHist hs[FFN_MAX_ATTN], *hp[FFN_MAX_ATTN];
    net_lat_to_proto(f->attn.lat, f->attn.n, hs, hp);
    ns.n_peer_latency = (size_t)f->attn.n;
    ns.peer_latency = hp;
    net_node_send_heartbeat(&f->ctl, &ns);
    if (f->metrics) {
        size_t len;
        char *txt = net_metrics_render_node(&ns, "ffn", f->ctl.node_id, &len);
        if (txt) net_metrics_publish(f->metrics, txt, len);
        free(txt);
    }
}

/* Connects to every attention node of a peer table; slots of the old epoch are dropped. */
static void slots_drop(ffn_node_t *f)
{
    for (int i = 0; i < FFN_MAX_SLOTS; i++) {
        ffn_slot_t *s = &f->slots[i];
        s->complete = 0;
        if (s->sends > 0)
            s->have = -1; /* its answers still read the buffers: freed when they are out */
        else
            s->used = 0;
    }
}

static afd_status_t apply_peers(ffn_node_t *f, const Afd__PeerTable *pt)
{
    slots_drop(f);
    afd_status_t st = net_peer_set_apply(&f->attn, f->ucx, pt, AFD__ROLE__ROLE_ATTN);
    if (st) return st;
    f->epoch = pt->epoch;
    afd_info("epoch %u: serving %d attention nodes", f->epoch, f->attn.live);
    return AFD_OK;
}

/* Joins the coordinator (trying again for --coordinator-wait-s); the welcome names the
 * expert share this node is to hold. */
static afd_status_t ffn_join(ffn_node_t *f, Afd__Hello *hello, mdl_role_t *role)
{
    Afd__Welcome *w;
    afd_status_t st =
        net_node_join_wait(&f->ctl, f->o.coordinator, hello, f->o.coordinator_wait_s, &g_stop, &w);
    if (st) return st;
    afd_info("joined as node %u: FFN share %u of %u (experts %u..%u)", w->node_id, w->ffn_index,
             w->ffn_count, w->expert_begin, w->expert_end);
    *role = (mdl_role_t){.ffn = 1, .ffn_index = (int)w->ffn_index, .ffn_count = (int)w->ffn_count};
    afd__welcome__free_unpacked(w, NULL);
    return AFD_OK;
}

int main(int argc, char **argv)
{
    afd_log_init("ffn_node");
    static ffn_node_t f;
    int first;
    afd_status_t st = afd_opts_parse(ffn_table, &f.o, argc, argv,
                                     "usage: ffn_node --model DIR --coordinator HOST:PORT "
                                     "--cluster-token T [options]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (!f.o.model || !f.o.cluster_token) {
        afd_error("--model and --cluster-token are required");
        return 2;
    }
    if (!net_plane_mode_ok(f.o.data_plane)) {
        afd_error("--data-plane: '%s' is not auto, host or device", f.o.data_plane);
        return 2;
    }
    net_node_pin_cpu(f.o.cpu);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    if (mdl_config_load(f.o.model, &f.cfg)) return 1;
    char name[128];
    snprintf(name, sizeof(name), "ffn-%d", (int)getpid());
    Afd__Hello hello = AFD__HELLO__INIT;
    hello.protocol = 1;
    hello.cluster_token = f.o.cluster_token;
    hello.role = AFD__ROLE__ROLE_FFN;
    hello.name = f.o.name ? f.o.name : name;
    hello.model_id = f.o.model;
    hello.pid = (uint32_t)getpid();
    hello.backend = f.o.backend;
    hello.ranks = (uint32_t)f.o.tp;
    if (f.o.trace_file && afd_trace_open(&f.trace, f.o.trace_file, (size_t)f.o.trace_events,
                                         hello.name, (uint32_t)getpid()))
        return 1;
    int devices[KN_GROUP_MAX], ndev = 0;
    if (f.o.devices) {
        char why[160];
        if ((ndev = ffn_parse_devices(f.o.devices, devices, why, sizeof(why))) < 0) {
            afd_error("--devices: %s", why);
            return 2;
        }
        if (ndev != f.o.tp) {
            afd_error("--devices names %d devices for --tp %ld ranks", ndev, f.o.tp);
            return 2;
        }
    }
    mdl_role_t role;
    if (ffn_join(&f, &hello, &role)) return 1;
    mdl_ckpt_t *ck;
    if (ffn_exec_open(&f.x, f.o.backend, (int)f.o.threads, (int)f.o.tp, ndev ? devices : NULL) ||
        mdl_ckpt_open(f.o.model, &ck) || ffn_exec_load(&f.x, ck, &f.cfg, &role, isatty(2)))
        return 1;
    f.lim = (net_wire_limits_t){.hidden = (uint32_t)f.cfg.hidden_size,
                                .topk = (uint32_t)f.cfg.top_k,
                                .num_layers = (uint32_t)f.cfg.num_layers,
                                .max_tok = (uint32_t)f.o.max_tokens};
    net_ucx_opts_t uo = {.err_mode_peer = f.o.ucx_peer_errors,
                         .max_hdr = sizeof(net_wire_hdr_t),
                         .max_payload = net_wire_payload_bytes(
                             NET_WIRE_A2F, (uint32_t)f.o.max_tokens, (uint32_t)f.cfg.hidden_size,
                             AFD_DTYPE_F32, (uint32_t)f.cfg.top_k),
                         .alloc_cb = ffn_alloc,
                         .recv_cb = ffn_recv,
                         .err_cb = ffn_peer_err,
                         .arg = &f};
    kn_backend_t *be = f.x.grp->rank[0];
    int dev = !be->ops->host_memory, cuda = be->ops->cuda_memory;
    if (dev) { /* data-plane buffers the device copies into and out of */
        uo.host_alloc = kn_host_alloc_cb;
        uo.host_free = kn_host_free_cb;
        uo.host_arg = be;
        uo.device_host = net_plane_device_host(dev, cuda);
    }
    if (net_ucx_create(&uo, &f.ucx)) return 1;
    if ((f.dev_plane = net_plane_choose(f.o.data_plane, dev, cuda, f.ucx)) < 0) return 2;
    if (f.dev_plane)
        afd_info("data plane: A2F received into pinned host buffers (the routing is read on "
                 "the host) and unpacked on the device; F2A packed on the device and sent "
                 "from device memory");
    else if (dev)
        afd_info("data plane: A2F unpacked and F2A packed on the device, received and sent "
                 "through pinned, registered host buffers (this UCX %s CUDA memory)",
                 net_ucx_cuda_memory(f.ucx) ? "also moves" : "does not move");
    if (f.o.metrics_port >= 0) {
        if (net_metrics_start("0.0.0.0", (int)f.o.metrics_port, &f.metrics)) return 1;
        afd_info("metrics on port %d", net_metrics_port(f.metrics));
    }
    if (net_node_send_ready(&f.ctl, f.ucx)) {
        afd_error("coordinator gone before ready");
        return 1;
    }
    if (f.o.tp > 1)
        afd_info("ready: %.1f MB of weights on %ld tensor-parallel ranks",
                 ffn_exec_bytes(&f.x) / 1e6, f.o.tp);
    else
        afd_info("ready: %.1f MB of weights", ffn_exec_bytes(&f.x) / 1e6);
    uint64_t last_hb = 0;
    int rc = 0;
    while (!g_stop) {
        Afd__Frame *in;
        while ((st = net_node_next(&f.ctl, &in)) == AFD_OK) {
            if (in->body_case == AFD__FRAME__BODY_PEERS) {
                if (apply_peers(&f, in->peers) == AFD_OK) net_node_send_connected(&f.ctl, f.epoch);
            }
            net_frame_free(in);
        }
        if (st == AFD_ERR_PEER) {
            if (!f.o.coordinator_wait_s) {
                afd_error("lost the coordinator; exiting");
                rc = 1;
                break;
            }
            /* everything in flight was for the coordinator's clients: drop it, keep the
             * weights, and join again asking for the same share */
            afd_warn("lost the coordinator; rejoining");
            net_node_close(&f.ctl);
            slots_drop(&f);
            net_peer_set_close(&f.attn);
            f.epoch = 0;
            hello.ffn_share_held = (uint32_t)role.ffn_index + 1;
            hello.ffn_share_count = (uint32_t)role.ffn_count;
            mdl_role_t nr;
            if (ffn_join(&f, &hello, &nr)) {
                afd_error("could not rejoin the coordinator; exiting");
                rc = 1;
                break;
            }
            if (nr.ffn_index != role.ffn_index || nr.ffn_count != role.ffn_count) {
                afd_info("loading the experts of share %d of %d", nr.ffn_index, nr.ffn_count);
                if (ffn_exec_load(&f.x, ck, &f.cfg, &nr, isatty(2))) {
                    rc = 1;
                    break;
                }
                role = nr;
            }
            net_node_send_ready(&f.ctl, f.ucx); /* a failure shows as a loss: next round */
            continue;
        }
        int did = 0;
        for (int i = 0; i < FFN_MAX_SLOTS; i++) {
            ffn_slot_t *s = &f.slots[i];
            if (s->used && s->complete) {
                ffn_process(&f, s);
                did = 1;
            }
            if (s->used && s->have == -1 && s->sends == 0) s->used = 0;
        }
        uint64_t now = net_now_us();
        if (now - last_hb > (uint64_t)f.o.heartbeat_ms * 1000) {
            send_heartbeat(&f);
            last_hb = now;
        }
        if (!did) {
            uint64_t tw = net_now_us();
            int inflight = 0;
            for (int i = 0; i < FFN_MAX_SLOTS; i++)
                inflight |= f.slots[i].used;
            net_node_wait(&f.ctl, f.ucx, inflight ? (int)f.o.busy_poll_us : 0, 100);
            if (inflight) {
                uint64_t t1 = net_now_us();
                f.wait_us += t1 - tw;
                afd_trace_span(f.trace, "wait", tw, t1, AFD_TRACE_NO_STEP, -1, -1, -1);
            } else
                f.idle_us += net_now_us() - tw; /* nothing from any attention node */
        }
    }
    afd_info("stopping");
    net_metrics_stop(f.metrics);
    net_node_close(&f.ctl);
    net_peer_set_close(&f.attn);
    for (int i = 0; i < FFN_MAX_SLOTS; i++)
        for (int a = 0; a < FFN_MAX_ATTN; a++) {
            net_ucx_buf_free(f.ucx, &f.slots[i].rx[a]);
            net_ucx_buf_free(f.ucx, &f.slots[i].tx[a]);
        }
    net_ucx_destroy(f.ucx); /* no send reads the device buffers after this */
    for (int i = 0; i < FFN_MAX_SLOTS; i++)
        for (int a = 0; a < FFN_MAX_ATTN; a++)
            ffn_exec_dev_free(&f.x, f.slots[i].dtx[a]);
    ffn_exec_unload(&f.x);
    mdl_ckpt_close(ck);
    if (f.trace) {
        afd_info("trace: %llu spans to %s", (unsigned long long)afd_trace_count(f.trace),
                 f.o.trace_file);
        afd_trace_close(f.trace);
    }
    ffn_exec_close(&f.x);
    afd_opts_free(ffn_table, &f.o);
    return rc;
}
