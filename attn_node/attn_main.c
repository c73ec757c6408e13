/*
 * attn_node: holds embed, attention, norms, routers, the final norm and lm_head,
 * and a paged MFA KV cache sized from a memory budget. It runs the steps the
 * coordinator plans: per layer and micro-batch it computes attention, sends the
 * post-attention-normed hidden state and the router's top-k (A2F) to every FFN
 * node and goes on with the next micro-batch while the FFN side works; it sums
 * the FFN partials (F2A) into the residual, and after the last layer samples.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "afd_opts.h"
#include "afd_trace.h"
#include "mdl_kv.h"
#include "mdl_model.h"
#include "mdl_sampler.h"
#include "net_metrics.h"
#include "net_node.h"
#include "net_ucx.h"
#include "net_wire.h"

#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ATTN_MAX_FFN NET_MAX_PEERS
#define ATTN_MAX_MB  NET_WIRE_MAX_MB

typedef struct attn_opts {
    char *coordinator, *cluster_token, *model, *backend, *name, *kv_dtype, *a2f_dtype, *f2a_dtype,
        *trace_file, *data_plane;
    long trace_events, threads, cpu, kv_block, kv_budget_mb, max_batch_tokens, busy_poll_us,
        step_deadline_ms, coordinator_wait_s, heartbeat_ms, max_seqs, metrics_port;
    int ucx_peer_errors;
} attn_opts_t;

#define O(f) offsetof(attn_opts_t, f)
static const afd_opt_t attn_table[] = {
    {"coordinator", AFD_OPT_STRING, "127.0.0.1:7000", O(coordinator), 0, 0, 0,
     "coordinator control address host:port"},
    {"cluster-token", AFD_OPT_STRING, NULL, O(cluster_token), 0, 0, AFD_OPT_SECRET,
     "token nodes present to join the cluster (required)"},
    {"model", AFD_OPT_STRING, NULL, O(model), 0, 0, 0, "checkpoint directory (required)"},
    {"backend", AFD_OPT_STRING, "cpu", O(backend), 0, 0, 0,
     "cpu or cuda (cpu-dev: the cpu backend taking the device code paths, for tests)"},
    {"name", AFD_OPT_STRING, NULL, O(name), 0, 0, 0, "node name (default attn-PID)"},
    {"threads", AFD_OPT_INT, "1", O(threads), 0, 1024, 0, "GEMM threads"},
    {"cpu", AFD_OPT_INT, "-1", O(cpu), -1, 4095, 0, "pin the process to this CPU (-1: no)"},
    {"kv-dtype", AFD_OPT_STRING, "bf16", O(kv_dtype), 0, 0, 0, "KV cache storage: bf16, fp8, f32"},
    {"kv-block", AFD_OPT_INT, "16", O(kv_block), 1, 4096, 0, "KV cache block size (tokens)"},
    {"kv-budget-mb", AFD_OPT_INT, "256", O(kv_budget_mb), 1, 1 << 24, 0, "KV cache memory in MiB"},
    {"a2f-dtype", AFD_OPT_STRING, "fp8", O(a2f_dtype), 0, 0, 0,
     "hidden state sent to FFN nodes: fp8 (per-128 scales), bf16, f32"},
    {"f2a-dtype", AFD_OPT_STRING, "bf16", O(f2a_dtype), 0, 0, 0,
     "partial output FFN nodes send back: bf16, f32"},
    {"max-batch-tokens", AFD_OPT_INT, "512", O(max_batch_tokens), 1, 1 << 20, 0,
     "prefill tokens per step (chunked prefill); decode tokens always run"},
    {"max-seqs", AFD_OPT_INT, "1024", O(max_seqs), 1, 1 << 20, 0, "running sequences at most"},
    {"data-plane", AFD_OPT_STRING, "auto", O(data_plane), 0, 0, 0,
     "device backends: A2F sent from and F2A received into device memory (device), or staged "
     "through pinned host buffers (host); auto: device when the UCX in use moves CUDA memory"},
    {"busy-poll-us", AFD_OPT_INT, "200", O(busy_poll_us), 0, 1000000, 0,
     "spin this long for FFN answers before sleeping on the event fd"},
    {"step-deadline-ms", AFD_OPT_INT, "30000", O(step_deadline_ms), 10, 3600000, 0,
     "a step not finished by then fails (a stuck or dead FFN node)"},
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

typedef struct attn_seq {
    uint64_t id;
    int32_t *tokens; /* prompt, then generated */
    int prompt_len, len, cap, cached;
    int32_t *blocks;
    int nblocks;
    mdl_sampling_t sp;
    int max_tokens, ignore_eos, ngen;
    int32_t *stop;
    int nstop;
    mdl_rng_t rng;
    int mb;            /* the micro-batch it runs in, for its whole life */
    int abort_pending; /* aborted while its micro-batch was in flight */
    struct attn_seq *next;
} attn_seq_t;

/* one micro-batch: a stream of steps (step s+1 starts as soon as its step s is sampled) */
/* A micro-batch's A2F buffer and the count of sends still reading it. A failed step retires
 * the buffer with its sends (they finish or are cancelled later) and the micro-batch takes
 * a fresh one, so nothing rewrites memory a send may still read. */
typedef struct attn_tx {
    net_ucx_buf_t buf;
    void *dev; /* --data-plane device: the packed A2F in device memory, sent from there */
    size_t dev_cap;
    kn_backend_t *dev_be; /* the queue that allocated it */
    int pending;
    struct attn_tx *next; /* on the retired list */
} attn_tx_t;

/* What a recorded layer depends on besides its weights and the KV cache: the backend's
 * launch shapes, the batch, and every buffer it reads or writes (a reallocated one has
 * another address). Compared whole (built from zeroed memory: no stray padding). */
typedef struct attn_graph_key {
    uint64_t shape;
    int ntok, nseq, cap;
    const void *bufs[6];
} attn_graph_key_t;

/* A decode layer recorded as a graph (backends with graph ops), for one key. */
#define ATTN_GRAPH_WAYS 4 /* keys kept per layer */
typedef struct attn_graph {
    void *g;
    attn_graph_key_t key;
    uint64_t used;
} attn_graph_t;

typedef struct attn_mb {
    kn_backend_t *be; /* this micro-batch's queue (cuda: its own stream), a kn_fork */
    void *ev;         /* recorded after the A2F rows' copy to the host */
    int a2f_queued;   /* that copy is queued; the A2F goes out once ev is done */
    int busy;         /* a step is in flight */
    uint64_t step;
    int nmb;
    uint64_t deadline_us;
    int nseq, ntok, nrows;
    int cap_tok, cap_seq;
    int32_t *tok, *pos, *rows;
    attn_seq_t **row_seq;
    kn_seq_t *ks;
    attn_seq_t **seqs;
    int32_t *take;
    float *x, *g, *wts; /* backend (cap_tok, H) */
    int32_t *ids;
    void *d_wire;       /* device backends: packed A2F rows on their way out, F2A rows coming in */
    struct attn_tx *tx; /* packed A2F */
    net_wire_hdr_t txh;
    net_ucx_buf_t rx[ATTN_MAX_FFN]; /* F2A answers, one per FFN node */
    void *d_rx[ATTN_MAX_FFN];       /* --data-plane device: F2A answers pulled into the device */
    size_t d_rx_cap;                /* bytes of each d_rx */
    int rx_dev[ATTN_MAX_FFN];       /* this layer's answer from node f is in d_rx[f] */
    int got;                        /* F2A answers received for `want_layer` */
    uint64_t sent_us;               /* when that layer's A2F went out */
    int want_layer;
    mdl_ws_t ws;
    /* mdl_attn_prepare ran for this step's batch; its tables are on the device (graphable)
     * with launch shapes `shape` */
    int prepared, graphable;
    uint64_t shape;
    attn_graph_t *graphs; /* (num_layers, ATTN_GRAPH_WAYS), allocated at the first graph */
    uint64_t graph_tick;
} attn_mb_t;

#define ATTN_MAX_PLANS 16

typedef struct attn_plan {
    Afd__Frame *f;    /* owns the frame; f->plan is the plan */
    int applied;      /* admissions and aborts done */
    unsigned started; /* bit i: micro-batch i started this step */
    int prefill_left; /* this step's prefill token budget, spent in micro-batch order */
} attn_plan_t;

typedef struct attn_acc { /* one step's result, gathered over its micro-batches */
    int used, nmb, done;
    uint64_t step;
    Afd__StepResult res;
    Afd__SeqToken **arr;
    size_t cap;
    uint32_t tokens;
    uint64_t t0;
} attn_acc_t;

typedef struct attn_node {
    attn_opts_t o;
    mdl_config_t cfg;
    mdl_model_t *m;
    mdl_kv_t *kv;
    mdl_sampler_t *smp;
    afd_dtype_t a2f, f2a;
    net_node_t ctl;
    net_ucx_t *ucx;
    uint32_t epoch;
    net_peer_set_t ffn; /* the FFN nodes, by share index */
    attn_seq_t *seqs;   /* running, in admission order */
    int nseqs;
    attn_mb_t mb[ATTN_MAX_MB];
    int step_failed;
    uint64_t last_hb_us;
    net_metrics_server_t *metrics;
    net_wire_limits_t lim;             /* what an F2A header must agree with */
    int cur_nmb;                       /* micro-batches the sequences are spread over */
    attn_plan_t plans[ATTN_MAX_PLANS]; /* received, not yet started by every micro-batch */
    int nplans;
    attn_acc_t acc[ATTN_MAX_PLANS]; /* results of steps in flight */
    Afd__Frame *pending_peers;      /* a peer table waiting for the pipeline to drain */
    attn_tx_t *retired;             /* A2F buffers of failed steps, sends still in flight */
    float *logits;
    int logits_cap;
    int32_t *top_ids; /* device backends: each row's best candidates (rows, KN_TOP_K_MAX) */
    float *top_logits;
    double *top_lse;
    afd_trace_t *trace; /* --trace-file: the pipeline's timeline */
    int dev_plane;      /* A2F sent from, F2A received into device memory */
    /* stats */
    uint64_t attn_us, wait_us, idle_us, xfer_us, step_us, steps, a2f_bytes, f2a_bytes, tokens,
        preemptions;
    uint64_t graph_launches, graph_captures, graph_fallbacks;
    uint64_t f2a_in_device, f2a_staged; /* F2A answers added from device / host memory */
} attn_node_t;

static volatile sig_atomic_t g_stop;
static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

/* ---- data plane callbacks ---- */

static uint8_t g_empty[8];

static void *attn_alloc(void *arg, const void *hdr, size_t hdr_len, size_t len, int rndv,
                        int *device)
{
    attn_node_t *a = arg;
    const char *why;
    if (net_wire_check(hdr, hdr_len, &a->lim, &why)) {
        afd_error("dropping a malformed data-plane message: %s", why);
        return NULL;
    }
    net_wire_hdr_t h;
    memcpy(&h, hdr, sizeof(h));
    int fi = net_peer_set_index(&a->ffn, h.src);
    if (h.kind != NET_WIRE_F2A || fi < 0 || h.epoch != a->epoch || h.payload != len ||
        h.mb >= ATTN_MAX_MB || !a->mb[h.mb].busy || a->mb[h.mb].step != h.step) {
        afd_warn("dropping an F2A message from node %u (step %llu, epoch %u): not expected", h.src,
                 (unsigned long long)h.step, h.epoch);
        return NULL;
    }
    attn_mb_t *mb = &a->mb[h.mb];
    if (h.layer != (uint32_t)mb->want_layer || h.ntok != (uint32_t)mb->ntok ||
        h.dtype != (uint8_t)a->f2a) {
        afd_warn("dropping an F2A message from node %u: layer %u / %u tokens not expected", h.src,
                 h.layer, h.ntok);
        return NULL;
    }
    if (len == 0) return g_empty;
    /* a rendezvous answer goes straight into the device; an eager one (a peer that sends
     * from host memory, a short answer) to the host, uploaded by add_f2a */
    mb->rx_dev[fi] = a->dev_plane && rndv && mb->d_rx[fi] && len <= mb->d_rx_cap;
    if (mb->rx_dev[fi]) {
        *device = 1;
        return mb->d_rx[fi];
    }
    if (net_ucx_buf_reserve(a->ucx, &mb->rx[fi], len)) return NULL;
    return mb->rx[fi].p;
}

static void attn_recv(void *arg, const void *hdr, size_t hdr_len, void *data, size_t len,
                      afd_status_t status)
{
    attn_node_t *a = arg;
    (void)hdr_len;
    (void)data;
    net_wire_hdr_t h;
    memcpy(&h, hdr, sizeof(h));
    if (status) {
        afd_error("F2A transfer from node %u failed: %s", h.src, afd_status_str(status));
        return;
    }
    int fi = net_peer_set_index(&a->ffn, h.src);
    if (fi < 0) return;
    net_lat_record(&a->ffn.lat[fi], h.send_ns);
    net_lat_answer(&a->ffn.lat[fi], net_now_us() - a->mb[h.mb].sent_us);
    a->f2a_bytes += len;
    a->mb[h.mb].got++;
}

static void attn_send_done(void *arg, afd_status_t status)
{
    attn_tx_t *t = arg;
    if (status) afd_error("A2F send failed: %s", afd_status_str(status));
    t->pending--;
}

/* Frees the retired A2F buffers whose sends are all over. */
static void tx_sweep(attn_node_t *a)
{
    for (attn_tx_t **p = &a->retired; *p;) {
        attn_tx_t *t = *p;
        if (t->pending > 0) {
            p = &t->next;
            continue;
        }
        *p = t->next;
        net_ucx_buf_free(a->ucx, &t->buf);
        if (t->dev) t->dev_be->ops->free(t->dev_be, t->dev);
        free(t);
    }
}

/* A failed step: a buffer some send may still read is retired, not reused. */
static void tx_retire(attn_node_t *a, attn_mb_t *mb)
{
    if (!mb->tx || mb->tx->pending <= 0) return;
    mb->tx->next = a->retired;
    a->retired = mb->tx;
    mb->tx = NULL; /* the next send allocates a fresh one */
}

static void attn_peer_err(void *arg, uint32_t peer, afd_status_t status)
{
    attn_node_t *a = arg;
    afd_error("FFN node %u failed: %s", peer, afd_status_str(status));
    a->step_failed = 1;
}

/* ---- sequences ---- */

static void seq_free(attn_node_t *a, attn_seq_t *s)
{
    if (s->nblocks) mdl_kv_release(a->kv, s->blocks, s->nblocks);
    free(s->blocks);
    free(s->tokens);
    free(s->stop);
    free(s);
}

static void seq_remove(attn_node_t *a, attn_seq_t *s)
{
    for (attn_seq_t **p = &a->seqs; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            a->nseqs--;
            seq_free(a, s);
            return;
        }
}

static attn_seq_t *seq_find(attn_node_t *a, uint64_t id)
{
    for (attn_seq_t *s = a->seqs; s; s = s->next)
        if (s->id == id) return s;
    return NULL;
}

static void add_token(Afd__StepResult *res, Afd__SeqToken ***arr, size_t *cap, Afd__SeqToken *t)
{
    if (res->n_tokens == *cap) {
        *cap = *cap ? 2 * *cap : 16;
        *arr = realloc(*arr, sizeof(**arr) * *cap);
        AFD_ASSERT(*arr);
    }
    (*arr)[res->n_tokens++] = t;
    res->tokens = *arr;
}

static Afd__SeqToken *new_token(uint64_t id, Afd__Finish fin, const char *err)
{
    Afd__SeqToken *t = calloc(1, sizeof(*t));
    AFD_ASSERT(t);
    afd__seq_token__init(t);
    t->seq_id = id;
    t->token = -1;
    t->finish = fin;
    t->error = err ? strdup(err) : NULL;
    return t;
}

/* Admits a sequence; on failure returns the error text for its result. */
static const char *seq_admit(attn_node_t *a, const Afd__SeqAdmit *ad)
{
    const mdl_config_t *c = &a->cfg;
    const Afd__Sampling *sp = ad->sampling;
    if (!sp || ad->n_prompt == 0) return "empty prompt or no sampling parameters";
    if (seq_find(a, ad->seq_id)) return "duplicate sequence id";
    if (a->nseqs >= a->o.max_seqs) return "too many running sequences on this node";
    for (size_t i = 0; i < ad->n_prompt; i++)
        if (ad->prompt[i] < 0 || ad->prompt[i] >= c->vocab_size) return "token id out of range";
    if (sp->max_tokens < 1 || ad->n_prompt + sp->max_tokens > (size_t)c->max_position)
        return "prompt + max_tokens exceed the model's context";
    mdl_sampling_t p = {
        .temperature = sp->temperature,
        .top_p = sp->top_p > 0 ? sp->top_p : 1.0,
        .top_k = sp->top_k < 0 ? 0 : sp->top_k,
        .seed = sp->seed,
        .logprobs = (int)(sp->logprobs > MDL_MAX_LOGPROBS ? MDL_MAX_LOGPROBS + 1 : sp->logprobs)};
    const char *why;
    if (mdl_sampling_validate(&p, &why)) return why;
    attn_seq_t *s = calloc(1, sizeof(*s));
    if (!s) return "out of memory";
    s->id = ad->seq_id;
    s->cap = (int)(ad->n_prompt + sp->max_tokens);
    s->tokens = malloc(sizeof(int32_t) * (size_t)s->cap);
    /* KV blocks are taken as the sequence grows (mb_start); the table has room for all */
    s->blocks = malloc(sizeof(int32_t) * (size_t)mdl_kv_blocks_for(a->kv, s->cap));
    s->nblocks = 0;
    s->nstop = (int)ad->sampling->n_stop_token_ids;
    s->stop = malloc(sizeof(int32_t) * (size_t)(s->nstop + 1));
    if (!s->tokens || !s->blocks || !s->stop) {
        seq_free(a, s);
        return "out of memory";
    }
    for (size_t i = 0; i < ad->n_prompt; i++)
        s->tokens[i] = ad->prompt[i];
    for (int i = 0; i < s->nstop; i++)
        s->stop[i] = sp->stop_token_ids[i];
    s->prompt_len = s->len = (int)ad->n_prompt;
    s->sp = p;
    s->max_tokens = (int)sp->max_tokens;
    s->ignore_eos = sp->ignore_eos;
    mdl_rng_seed(&s->rng, sp->seed);
    attn_seq_t **tail = &a->seqs;
    while (*tail)
        tail = &(*tail)->next;
    *tail = s;
    a->nseqs++;
    return NULL;
}

static int seq_stops(const attn_node_t *a, const attn_seq_t *s, int32_t t)
{
    for (int i = 0; i < s->nstop; i++)
        if (s->stop[i] == t) return 1;
    if (!s->ignore_eos)
        for (int i = 0; i < a->cfg.num_eos; i++)
            if (a->cfg.eos_token_ids[i] == t) return 1;
    return 0;
}

/* ---- micro-batch buffers ---- */

static afd_status_t mb_reserve(attn_node_t *a, attn_mb_t *mb, int ntok, int nseq)
{
    if (!mb->be) { /* its own queue on the model's device, its buffers allocated there */
        if (!(mb->be = kn_fork(a->m->be))) return AFD_ERR_NOMEM;
        mb->ev = kn_event_new(mb->be);
        mb->ws.be = mb->be;
    }
    kn_backend_t *be = mb->be;
    size_t H = (size_t)a->cfg.hidden_size, k = (size_t)(a->cfg.top_k ? a->cfg.top_k : 1);
    if (nseq > mb->cap_seq) {
        int c = nseq * 2;
        free(mb->rows);
        free(mb->row_seq);
        free(mb->ks);
        free(mb->seqs);
        free(mb->take);
        mb->rows = malloc(4 * (size_t)c);
        mb->row_seq = malloc(sizeof(*mb->row_seq) * (size_t)c);
        mb->ks = malloc(sizeof(*mb->ks) * (size_t)c);
        mb->seqs = malloc(sizeof(*mb->seqs) * (size_t)c);
        mb->take = malloc(4 * (size_t)c);
        if (!mb->rows || !mb->row_seq || !mb->ks || !mb->seqs || !mb->take) return AFD_ERR_NOMEM;
        mb->cap_seq = c;
    }
    if (ntok > mb->cap_tok) {
        int c = ntok < 64 ? 64 : ntok;
        free(mb->tok);
        free(mb->pos);
        if (mb->d_wire) be->ops->free(be, mb->d_wire);
        if (mb->x) be->ops->free(be, mb->x);
        if (mb->g) be->ops->free(be, mb->g);
        if (mb->ids) be->ops->free(be, mb->ids);
        if (mb->wts) be->ops->free(be, mb->wts);
        mb->tok = malloc(4 * (size_t)c);
        mb->pos = malloc(4 * (size_t)c);
        /* packed rows are at most float32 rows */
        mb->d_wire = be->ops->host_memory ? NULL : be->ops->alloc(be, 4 * (size_t)c * H);
        mb->x = be->ops->alloc(be, 4 * (size_t)c * H);
        mb->g = be->ops->alloc(be, 4 * (size_t)c * H);
        mb->ids = be->ops->alloc(be, 4 * (size_t)c * k);
        mb->wts = be->ops->alloc(be, 4 * (size_t)c * k);
        mb->cap_tok = 0;
        if (!mb->tok || !mb->pos || (!be->ops->host_memory && !mb->d_wire) || !mb->x || !mb->g ||
            !mb->ids || !mb->wts)
            return AFD_ERR_NOMEM;
        mb->cap_tok = c;
    }
    if (a->dev_plane) { /* an F2A answer per FFN node, at most float32 rows of cap_tok */
        size_t need = 4 * (size_t)mb->cap_tok * H;
        for (int f = 0; f < ATTN_MAX_FFN; f++) /* no answer is in flight between steps */
            if (mb->d_rx[f] && (mb->d_rx_cap < need || f >= a->ffn.n)) {
                be->ops->free(be, mb->d_rx[f]);
                mb->d_rx[f] = NULL;
            }
        mb->d_rx_cap = need;
        for (int f = 0; f < a->ffn.n; f++)
            if (!mb->d_rx[f] && !(mb->d_rx[f] = be->ops->alloc(be, need))) return AFD_ERR_NOMEM;
    }
    return mdl_ws_reserve(a->m, &mb->ws, ntok > 0 ? ntok : 1);
}

/* Frees a micro-batch's buffers and queue (at exit). */
static void mb_free(attn_node_t *a, attn_mb_t *mb)
{
    kn_backend_t *be = mb->be;
    if (!be) return;
    be->ops->sync(be);
    if (mb->graphs) {
        for (int i = 0; i < a->cfg.num_layers * ATTN_GRAPH_WAYS; i++)
            if (mb->graphs[i].g) be->ops->graph_free(be, mb->graphs[i].g);
        free(mb->graphs);
    }
    mdl_ws_free(a->m, &mb->ws);
    void *dev[] = {mb->x, mb->g, mb->wts, mb->ids, mb->d_wire};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        if (dev[i]) be->ops->free(be, dev[i]);
    for (int f = 0; f < ATTN_MAX_FFN; f++)
        if (mb->d_rx[f]) be->ops->free(be, mb->d_rx[f]);
    free(mb->tok);
    free(mb->pos);
    free(mb->rows);
    free(mb->row_seq);
    free(mb->ks);
    free(mb->seqs);
    free(mb->take);
    kn_event_free(be, mb->ev);
    be->ops->destroy(be);
    memset(mb, 0, sizeof(*mb));
}

/* ---- the pipeline ---- */

static void send_heartbeat(attn_node_t *a);

/* Heartbeats go out during long steps too, so the coordinator never takes a busy node
 * for a dead one. */
static void maybe_heartbeat(attn_node_t *a)
{
    uint64_t now = net_now_us();
    if (now - a->last_hb_us > (uint64_t)a->o.heartbeat_ms * 1000) send_heartbeat(a);
}

/* Waits for the sends of a micro-batch's previous A2F (its buffer is reused). */
static afd_status_t wait_tx(attn_node_t *a, attn_mb_t *mb)
{
    if (!mb->tx && !(mb->tx = calloc(1, sizeof(*mb->tx)))) return AFD_ERR_NOMEM;
    while (mb->tx->pending > 0) {
        if (a->step_failed) return AFD_ERR_PEER;
        if (net_now_us() > mb->deadline_us) return AFD_ERR_TIMEOUT;
        net_node_wait(&a->ctl, a->ucx, (int)a->o.busy_poll_us, 5);
    }
    return AFD_OK;
}

/*
 * Packs micro-batch mb's A2F for a layer (hidden states in the wire dtype, expert ids and
 * weights) into its send buffer. On a device backend the packing runs on the device,
 * behind the layer's attention on the micro-batch's stream, and only the packed bytes are
 * copied into the (pinned) send buffer; a2f_send sends once the event recorded after the
 * copy says so, while the other micro-batches go on.
 */
static afd_status_t a2f_queue(attn_node_t *a, attn_mb_t *mb, int layer)
{
    const mdl_config_t *c = &a->cfg;
    kn_backend_t *be = mb->be;
    mb->got = 0; /* the answers to this layer's A2F, counted from now */
    mb->want_layer = layer;
    afd_status_t st = wait_tx(a, mb);
    if (st) return st;
    uint32_t H = (uint32_t)c->hidden_size, k = c->is_moe[layer] ? (uint32_t)c->top_k : 0;
    uint64_t bytes = net_wire_payload_bytes(NET_WIRE_A2F, (uint32_t)mb->ntok, H, a->a2f, k);
    size_t n = (size_t)mb->ntok, rb = afd_rows_bytes(a->a2f, n, H), rk = 4 * n * k;
    attn_tx_t *t = mb->tx;
    if (a->dev_plane) { /* packed in device memory, sent from there once the event is done */
        if (bytes > t->dev_cap) { /* no send reads it any more (wait_tx) */
            if (t->dev) t->dev_be->ops->free(t->dev_be, t->dev);
            t->dev_cap = 0;
            if (!(t->dev = be->ops->alloc(be, bytes))) return AFD_ERR_NOMEM;
            t->dev_cap = bytes;
            t->dev_be = be;
        }
        uint8_t *d = t->dev;
        kn_rows_encode(be, a->a2f, mb->g, (int)n, (int)H, d);
        if (n && k) { /* the routing behind the rows, copied on the device */
            kn_copy(be, d + rb, mb->ids, rk);
            kn_copy(be, d + rb + rk, mb->wts, rk);
        }
    } else {
        if ((st = net_ucx_buf_reserve(a->ucx, &t->buf, bytes))) return st;
        uint8_t *p = t->buf.p;
        if (n && be->ops->host_memory) {
            kn_rows_encode(be, a->a2f, mb->g, (int)n, (int)H, p);
            memcpy(p + rb, mb->ids, rk);
            memcpy(p + rb + rk, mb->wts, rk);
        } else if (n) {
            kn_rows_encode(be, a->a2f, mb->g, (int)n, (int)H, mb->d_wire);
            kn_download_async(be, p, mb->d_wire, rb);
            if (k) {
                kn_download_async(be, p + rb, mb->ids, rk);
                kn_download_async(be, p + rb + rk, mb->wts, rk);
            }
        }
    }
    kn_event_record(be, mb->ev);
    mb->a2f_queued = 1;
    return AFD_OK;
}

/* Sends micro-batch mb's packed A2F to every FFN node. */
static afd_status_t a2f_send(attn_node_t *a, attn_mb_t *mb, int mbi)
{
    const mdl_config_t *c = &a->cfg;
    int layer = mb->want_layer;
    mb->a2f_queued = 0;
    uint32_t H = (uint32_t)c->hidden_size, k = c->is_moe[layer] ? (uint32_t)c->top_k : 0;
    uint64_t bytes = net_wire_payload_bytes(NET_WIRE_A2F, (uint32_t)mb->ntok, H, a->a2f, k);
    net_wire_hdr_t *h = &mb->txh;
    memset(h, 0, sizeof(*h));
    h->magic = NET_WIRE_MAGIC;
    h->version = NET_WIRE_VERSION;
    h->kind = NET_WIRE_A2F;
    h->epoch = a->epoch;
    h->src = a->ctl.node_id;
    h->step = mb->step;
    h->layer = (uint16_t)layer;
    h->mb = (uint8_t)mbi;
    h->nmb = (uint8_t)mb->nmb;
    h->ntok = (uint32_t)mb->ntok;
    h->hidden = H;
    h->dtype = (uint8_t)a->a2f;
    h->topk = (uint8_t)k;
    h->reply_dtype = (uint8_t)a->f2a;
    h->payload = bytes;
    mb->sent_us = net_now_us();
    for (int f = 0; f < a->ffn.n; f++) {
        h->send_ns = net_wire_now_ns();
        attn_tx_t *t = mb->tx;
        t->pending++;
        afd_status_t st = a->dev_plane
                              ? net_ucx_send(a->ffn.ep[f], h, sizeof(*h), t->dev, bytes, NULL,
                                             NET_UCX_DEVICE, attn_send_done, t)
                              : net_ucx_send(a->ffn.ep[f], h, sizeof(*h), t->buf.p, bytes,
                                             bytes ? t->buf.memh : NULL, 0, attn_send_done, t);
        if (st) {
            t->pending--;
            return st;
        }
        a->a2f_bytes += bytes;
    }
    return AFD_OK;
}

/* Sends micro-batch i's A2F if its rows have reached the host (its span, "a2f send", from
 * t0, or from now when 0); 1 when it went out. */
static int a2f_poll(attn_node_t *a, int i, uint64_t t0, afd_status_t *st)
{
    attn_mb_t *mb = &a->mb[i];
    *st = AFD_OK;
    if (!mb->a2f_queued || !kn_event_done(mb->be, mb->ev)) return 0;
    if (!t0) t0 = net_now_us();
    *st = a2f_send(a, mb, i);
    uint64_t t1 = net_now_us();
    a->xfer_us += t1 - t0;
    afd_trace_span(a->trace, "a2f send", t0, t1, mb->step, mb->want_layer, i, mb->ntok);
    return 1;
}

/* Adds the FFN partials of micro-batch mb into its residual (on a device backend: each
 * node's packed rows uploaded and added on the micro-batch's stream). */
static void add_f2a(attn_node_t *a, attn_mb_t *mb)
{
    int n = mb->ntok, H = a->cfg.hidden_size;
    if (!n) return;
    kn_backend_t *be = mb->be;
    size_t rb = afd_rows_bytes(a->f2a, (size_t)n, (size_t)H);
    for (int f = 0; f < a->ffn.n; f++) {
        if (be->ops->host_memory) {
            kn_rows_add(be, a->f2a, mb->rx[f].p, n, H, mb->x);
        } else if (mb->rx_dev[f]) { /* pulled into the device by the data plane */
            kn_rows_add(be, a->f2a, mb->d_rx[f], n, H, mb->x);
            a->f2a_in_device++;
        } else {
            a->f2a_staged++;
            be->ops->upload(be, mb->d_wire, mb->rx[f].p, rb);
            kn_rows_add(be, a->f2a, mb->d_wire, n, H, mb->x);
        }
    }
}

static void graph_key(const attn_mb_t *mb, attn_graph_key_t *k)
{
    memset(k, 0, sizeof(*k));
    k->shape = mb->shape;
    k->ntok = mb->ntok;
    k->nseq = mb->nseq;
    k->cap = mb->ws.cap;
    const void *bufs[] = {mb->x, mb->g, mb->ids, mb->wts, mb->ws.h, mb->ws.pos};
    memcpy(k->bufs, bufs, sizeof(bufs));
}

/*
 * One layer's attention of a prepared decode batch as a graph (backends with graph ops):
 * the layer's graph for this key is replayed, or recorded and then replayed. 0 when the
 * caller runs the layer directly (graphs disabled, or the recording could not hold it:
 * nothing of it ran).
 */
static int layer_graph(attn_node_t *a, attn_mb_t *mb, int layer, const mdl_batch_t *b)
{
    kn_backend_t *be = mb->be;
    const kn_ops_t *op = be->ops;
    if (!mb->graphable || !op->graph_begin) return 0;
    attn_graph_key_t key;
    graph_key(mb, &key);
    attn_graph_t *set = mb->graphs ? mb->graphs + (size_t)layer * ATTN_GRAPH_WAYS : NULL;
    for (int w = 0; set && w < ATTN_GRAPH_WAYS; w++) {
        if (!set[w].g || memcmp(&set[w].key, &key, sizeof(key))) continue;
        if (op->graph_launch(be, set[w].g) == 0) {
            set[w].used = ++mb->graph_tick;
            a->graph_launches++;
            return 1;
        }
        op->graph_free(be, set[w].g); /* stale: record it again */
        set[w].g = NULL;
    }
    if (!op->graph_begin(be)) return 0;
    mdl_attn(a->m, &mb->ws, layer, &a->kv->store, b, mb->x, mb->g, mb->ids, mb->wts);
    void *g = op->graph_end(be);
    if (g && !mb->graphs &&
        !(mb->graphs = calloc((size_t)a->cfg.num_layers * ATTN_GRAPH_WAYS, sizeof(attn_graph_t)))) {
        op->graph_free(be, g);
        g = NULL;
    }
    if (!g || op->graph_launch(be, g) != 0) {
        if (g) op->graph_free(be, g);
        a->graph_fallbacks++;
        return 0;
    }
    set = mb->graphs + (size_t)layer * ATTN_GRAPH_WAYS;
    attn_graph_t *slot = &set[0]; /* an empty way, else the least recently used */
    for (int w = 0; w < ATTN_GRAPH_WAYS && slot->g; w++)
        if (!set[w].g || set[w].used < slot->used) slot = &set[w];
    if (slot->g) op->graph_free(be, slot->g);
    *slot = (attn_graph_t){g, key, ++mb->graph_tick};
    if (!a->graph_captures)
        afd_info("attention: decode layers replay as CUDA graphs (%d sequences, layer %d recorded "
                 "first)",
                 mb->nseq, layer);
    a->graph_captures++;
    a->graph_launches++;
    return 1;
}

/* Attention of one layer for micro-batch i, then its A2F (sent at once when the packed
 * rows are already on the host, else by a later a2f_poll). */
static afd_status_t mb_layer(attn_node_t *a, int i, int layer)
{
    attn_mb_t *mb = &a->mb[i];
    uint64_t t0 = net_now_us();
    if (mb->ntok) {
        mdl_batch_t b = {.nseq = mb->nseq,
                         .ntok = mb->ntok,
                         .tokens = mb->tok,
                         .pos = mb->pos,
                         .seqs = mb->ks,
                         .prepared = mb->prepared};
        if (!layer_graph(a, mb, layer, &b))
            mdl_attn(a->m, &mb->ws, layer, &a->kv->store, &b, mb->x, mb->g, mb->ids, mb->wts);
    }
    uint64_t t1 = net_now_us();
    afd_trace_span(a->trace, "attention", t0, t1, mb->step, layer, i, mb->ntok);
    afd_status_t st = a2f_queue(a, mb, layer);
    if (st) return st;
    a2f_poll(a, i, t1, &st); /* packed on this thread: packing and sends in one span */
    return st;
}

static attn_acc_t *acc_get(attn_node_t *a, uint64_t step, int nmb)
{
    attn_acc_t *fr = NULL;
    for (int k = 0; k < ATTN_MAX_PLANS; k++) {
        if (a->acc[k].used && a->acc[k].step == step) return &a->acc[k];
        if (!a->acc[k].used && !fr) fr = &a->acc[k];
    }
    AFD_ASSERT(fr); /* at most a few steps are in flight */
    memset(fr, 0, sizeof(*fr));
    afd__step_result__init(&fr->res);
    fr->used = 1;
    fr->step = step;
    fr->nmb = nmb;
    fr->t0 = net_now_us();
    fr->res.step = step;
    return fr;
}

static void acc_send(attn_node_t *a, attn_acc_t *acc, const char *error)
{
    acc->res.tokens_in_step = acc->tokens;
    acc->res.error = (char *)error;
    Afd__Frame f = AFD__FRAME__INIT;
    f.body_case = AFD__FRAME__BODY_RESULT;
    f.result = &acc->res;
    net_node_send(&a->ctl, &f);
    for (size_t i = 0; i < acc->res.n_tokens; i++) {
        free(acc->res.tokens[i]->top_ids);
        free(acc->res.tokens[i]->top_logprobs);
        free(acc->res.tokens[i]->error);
        free(acc->res.tokens[i]);
    }
    free(acc->arr);
    a->step_us += net_now_us() - acc->t0;
    a->steps++;
    acc->used = 0;
}

/* The earliest plan micro-batch i has not started; NULL when none has arrived. */
static attn_plan_t *next_plan(attn_node_t *a, int i)
{
    for (int k = 0; k < a->nplans; k++)
        if (!(a->plans[k].started & (1u << i))) return &a->plans[k];
    return NULL;
}

static int all_idle(const attn_node_t *a)
{
    for (int i = 0; i < ATTN_MAX_MB; i++)
        if (a->mb[i].busy) return 0;
    return 1;
}

/* Drops plans every micro-batch has started. */
static void plans_gc(attn_node_t *a)
{
    int k = 0;
    for (int j = 0; j < a->nplans; j++) {
        attn_plan_t *p = &a->plans[j];
        unsigned all = (1u << p->f->plan->micro_batches) - 1;
        if (p->applied && (p->started & all) == all)
            net_frame_free(p->f);
        else
            a->plans[k++] = *p;
    }
    a->nplans = k;
}

/* Spreads the sequences over nmb micro-batches (a barrier: nothing is in flight). */
static void rebalance(attn_node_t *a, int nmb)
{
    int i = 0;
    for (attn_seq_t *s = a->seqs; s; s = s->next)
        s->mb = i++ % nmb;
    a->cur_nmb = nmb;
}

/* Admissions and aborts of a plan, done when its first micro-batch starts. */
static void plan_apply(attn_node_t *a, attn_plan_t *p)
{
    const Afd__StepPlan *plan = p->f->plan;
    attn_acc_t *acc = acc_get(a, plan->step, (int)plan->micro_batches);
    for (size_t i = 0; i < plan->n_abort; i++) {
        attn_seq_t *s = seq_find(a, plan->abort[i]);
        if (!s) continue;
        if (a->mb[s->mb].busy)
            s->abort_pending = 1; /* its micro-batch is in flight: removed when it lands */
        else
            seq_remove(a, s);
    }
    for (size_t i = 0; i < plan->n_admit; i++) {
        const char *err = seq_admit(a, plan->admit[i]);
        if (err) {
            add_token(&acc->res, &acc->arr, &acc->cap,
                      new_token(plan->admit[i]->seq_id, AFD__FINISH__FINISH_ERROR, err));
            continue;
        }
        /* the new sequence joins the micro-batch with the fewest sequences */
        int cnt[ATTN_MAX_MB] = {0};
        attn_seq_t *added = NULL;
        for (attn_seq_t *s = a->seqs; s; s = s->next) {
            if (s->id == plan->admit[i]->seq_id)
                added = s;
            else
                cnt[s->mb]++;
        }
        int best = 0;
        for (int m = 1; m < a->cur_nmb; m++)
            if (cnt[m] < cnt[best]) best = m;
        if (added) added->mb = best;
    }
    p->applied = 1;
    p->prefill_left = (int)a->o.max_batch_tokens;
}

/* Starts micro-batch i on plan p: builds its work, embeds and runs layer 0. */
static afd_status_t mb_start(attn_node_t *a, int i, attn_plan_t *p)
{
    const Afd__StepPlan *plan = p->f->plan;
    attn_mb_t *mb = &a->mb[i];
    uint64_t t0 = net_now_us();
    if (!p->applied) plan_apply(a, p);
    p->started |= 1u << i;
    acc_get(a, plan->step, (int)plan->micro_batches);
    /* aborted sequences of this micro-batch leave now that it is idle */
    for (attn_seq_t *s = a->seqs, *nx; s; s = nx) {
        nx = s->next;
        if (s->mb == i && s->abort_pending) seq_remove(a, s);
    }
    /* KV blocks for what this step writes; when the cache is full the latest admitted
     * sequences of this micro-batch give theirs back (preempted: the coordinator re-admits
     * them with their tokens so far, and they are recomputed) */
    for (int restart = 1; restart;) {
        restart = 0;
        int left = p->prefill_left;
        for (attn_seq_t *s = a->seqs; s; s = s->next) {
            if (s->mb != i) continue;
            int take = s->len - s->cached;
            if (s->cached < s->len - 1 || s->cached < s->prompt_len) {
                if (take > left) take = left;
                if (take <= 0) continue;
                left -= take;
            } else {
                take = 1;
            }
            int need = mdl_kv_blocks_for(a->kv, s->cached + take) - s->nblocks;
            if (need <= 0) continue;
            if (mdl_kv_alloc(a->kv, need, s->blocks + s->nblocks) == AFD_OK) {
                s->nblocks += need;
                continue;
            }
            attn_seq_t *victim = NULL;
            for (attn_seq_t *v = a->seqs; v; v = v->next)
                if (v->mb == i) victim = v; /* the latest admitted of this micro-batch */
            attn_acc_t *acc = acc_get(a, plan->step, (int)plan->micro_batches);
            add_token(&acc->res, &acc->arr, &acc->cap,
                      new_token(victim->id, AFD__FINISH__FINISH_PREEMPTED, NULL));
            a->preemptions++;
            seq_remove(a, victim); /* it may be s itself: leave the loop before s->next */
            restart = 1;
            break;
        }
    }
    int ntok = 0, nseq = 0, left = p->prefill_left;
    for (attn_seq_t *s = a->seqs; s; s = s->next) {
        if (s->mb != i) continue;
        int take = s->len - s->cached;
        if (s->cached < s->len - 1 || s->cached < s->prompt_len) {
            if (take > left) take = left;
            if (take <= 0) continue;
            left -= take;
        } else {
            take = 1;
        }
        ntok += take;
        nseq++;
    }
    afd_status_t st = mb_reserve(a, mb, ntok, nseq);
    if (st) return st;
    mb->nseq = mb->ntok = mb->nrows = 0;
    for (attn_seq_t *s = a->seqs; s; s = s->next) {
        if (s->mb != i) continue;
        int take = s->len - s->cached;
        if (s->cached < s->len - 1 || s->cached < s->prompt_len) {
            if (take > p->prefill_left) take = p->prefill_left;
            if (take <= 0) continue;
            p->prefill_left -= take;
        } else {
            take = 1;
        }
        mb->seqs[mb->nseq] = s;
        mb->take[mb->nseq] = take;
        mb->ks[mb->nseq] = (kn_seq_t){s->blocks, s->cached, take};
        for (int k = 0; k < take; k++) {
            mb->tok[mb->ntok + k] = s->tokens[s->cached + k];
            mb->pos[mb->ntok + k] = s->cached + k;
        }
        mb->ntok += take;
        if (s->cached + take == s->len) {
            mb->rows[mb->nrows] = mb->ntok - 1;
            mb->row_seq[mb->nrows++] = s;
        }
        mb->nseq++;
    }
    mb->busy = 1;
    mb->step = plan->step;
    mb->nmb = (int)plan->micro_batches;
    mb->deadline_us = net_now_us() + (uint64_t)a->o.step_deadline_ms * 1000;
    mb->prepared = mb->graphable = 0;
    if (mb->ntok) {
        mdl_batch_t b = {
            .nseq = mb->nseq, .ntok = mb->ntok, .tokens = mb->tok, .pos = mb->pos, .seqs = mb->ks};
        mdl_embed(a->m, &mb->ws, &b, mb->x);
        /* what the step's layers share goes to the backend once (positions, and on
         * devices the decode tables: then the layers can replay as graphs) */
        mb->graphable = mdl_attn_prepare(a->m, &mb->ws, &a->kv->store, &b, &mb->shape);
        mb->prepared = b.prepared;
    }
    plans_gc(a);
    afd_trace_span(a->trace, "schedule+embed", t0, net_now_us(), mb->step, -1, i, mb->ntok);
    return mb_layer(a, i, 0);
}

/* The last FFN answer of micro-batch i is in: final norm, lm_head and sampling. */
static afd_status_t mb_finish(attn_node_t *a, int i)
{
    attn_mb_t *mb = &a->mb[i];
    const mdl_config_t *c = &a->cfg;
    kn_backend_t *be = mb->be;
    attn_acc_t *acc = acc_get(a, mb->step, mb->nmb);
    for (int j = 0; j < mb->nseq; j++)
        mb->seqs[j]->cached += mb->take[j];
    size_t V = (size_t)c->vocab_size;
    if (mb->nrows > a->logits_cap) {
        kn_host_free(a->m->be, a->logits);
        free(a->top_ids);
        free(a->top_logits);
        free(a->top_lse);
        a->logits = kn_host_alloc(a->m->be, 4 * V * (size_t)mb->nrows);
        a->top_ids = malloc(sizeof(int32_t) * KN_TOP_K_MAX * (size_t)mb->nrows);
        a->top_logits = malloc(sizeof(float) * KN_TOP_K_MAX * (size_t)mb->nrows);
        a->top_lse = malloc(sizeof(double) * (size_t)mb->nrows);
        a->logits_cap = a->logits && a->top_ids && a->top_logits && a->top_lse ? mb->nrows : 0;
        if (!a->logits_cap) return AFD_ERR_NOMEM;
    }
    /* On a device backend the logits stay there: it hands over each row's best candidates
     * and log-sum-exp, enough for greedy and top-k requests; a row that needs more (top-p
     * over the whole vocabulary, say) is copied over alone. */
    float *dl = a->logits;
    int have_top = 0;
    if (mb->nrows) {
        if (!be->ops->host_memory) {
            dl = be->ops->alloc(be, 4 * V * (size_t)mb->nrows);
            if (!dl) return AFD_ERR_NOMEM;
        }
        mdl_final(a->m, &mb->ws, mb->x, mb->rows, mb->nrows, dl);
        if (dl != a->logits) {
            have_top = be->ops->logits_top &&
                       be->ops->logits_top(be, dl, mb->nrows, (int)V, KN_TOP_K_MAX, a->top_ids,
                                           a->top_logits, a->top_lse) == AFD_OK;
            if (!have_top) be->ops->download(be, a->logits, dl, 4 * V * (size_t)mb->nrows);
        }
    }
    for (int r = 0; r < mb->nrows; r++) {
        attn_seq_t *s = mb->row_seq[r];
        if (s->abort_pending) continue; /* removed below: nobody waits for its token */
        mdl_sample_t out;
        if (have_top && mdl_sampler_top_enough(a->smp, &s->sp, KN_TOP_K_MAX)) {
            mdl_sampler_pick_top(a->smp, a->top_ids + (size_t)r * KN_TOP_K_MAX,
                                 a->top_logits + (size_t)r * KN_TOP_K_MAX, KN_TOP_K_MAX,
                                 a->top_lse[r], &s->sp, &s->rng, &out);
        } else {
            if (have_top)
                be->ops->download(be, a->logits + (size_t)r * V, dl + (size_t)r * V, 4 * V);
            mdl_sampler_pick(a->smp, a->logits + (size_t)r * V, &s->sp, &s->rng, &out);
        }
        s->tokens[s->len++] = out.token;
        s->ngen++;
        Afd__Finish fin = AFD__FINISH__FINISH_NONE;
        if (seq_stops(a, s, out.token))
            fin = AFD__FINISH__FINISH_STOP;
        else if (s->ngen >= s->max_tokens)
            fin = AFD__FINISH__FINISH_LENGTH;
        Afd__SeqToken *t = new_token(s->id, fin, NULL);
        t->token = out.token;
        t->logprob = out.logprob;
        t->prompt_tokens = (uint32_t)s->prompt_len;
        if (out.ntop > 0) {
            t->n_top_ids = t->n_top_logprobs = (size_t)out.ntop;
            t->top_ids = malloc(4 * (size_t)out.ntop);
            t->top_logprobs = malloc(4 * (size_t)out.ntop);
            AFD_ASSERT(t->top_ids && t->top_logprobs);
            memcpy(t->top_ids, out.top_ids, 4 * (size_t)out.ntop);
            memcpy(t->top_logprobs, out.top_logprobs, 4 * (size_t)out.ntop);
        }
        add_token(&acc->res, &acc->arr, &acc->cap, t);
        if (fin != AFD__FINISH__FINISH_NONE) seq_remove(a, s);
    }
    if (dl != a->logits) be->ops->free(be, dl);
    for (attn_seq_t *s = a->seqs, *nx; s; s = nx) {
        nx = s->next;
        if (s->mb == i && s->abort_pending) seq_remove(a, s);
    }
    a->tokens += (uint64_t)mb->ntok;
    acc->tokens += (uint32_t)mb->ntok;
    mb->busy = 0;
    if (++acc->done == acc->nmb) acc_send(a, acc, NULL);
    return AFD_OK;
}

/* A step failed (deadline, dead peer): every sequence here ends with the error, every step
 * in flight reports it, and the pipeline starts empty. */
static void pipeline_fail(attn_node_t *a, afd_status_t st, const char *why)
{
    char msg[200];
    snprintf(msg, sizeof(msg), "attention node %u: step failed: %s", a->ctl.node_id,
             why ? why : afd_status_str(st));
    afd_error("%s", msg);
    attn_acc_t *first = NULL;
    for (int k = 0; k < ATTN_MAX_PLANS; k++)
        if (a->acc[k].used && (!first || a->acc[k].step < first->step)) first = &a->acc[k];
    for (int i = 0; i < ATTN_MAX_MB; i++)
        if (a->mb[i].busy && !first) first = acc_get(a, a->mb[i].step, a->mb[i].nmb);
    while (a->seqs) {
        if (first)
            add_token(&first->res, &first->arr, &first->cap,
                      new_token(a->seqs->id, AFD__FINISH__FINISH_ERROR, msg));
        seq_remove(a, a->seqs);
    }
    for (int k = 0; k < ATTN_MAX_PLANS; k++)
        if (a->acc[k].used) acc_send(a, &a->acc[k], msg);
    for (int i = 0; i < ATTN_MAX_MB; i++) {
        /* queued device work ends before its buffers and KV blocks are reused */
        if (a->mb[i].be) a->mb[i].be->ops->sync(a->mb[i].be);
        a->mb[i].a2f_queued = 0;
        a->mb[i].busy = 0;
        tx_retire(a, &a->mb[i]);
    }
    tx_sweep(a);
    /* plans some micro-batches started are over; the others run later, empty */
    int k = 0;
    for (int j = 0; j < a->nplans; j++) {
        if (a->plans[j].started)
            net_frame_free(a->plans[j].f);
        else
            a->plans[k++] = a->plans[j];
    }
    a->nplans = k;
    a->step_failed = 0;
}

/*
 * Runs the next task of the pipeline, in (step, layer, micro-batch) order: a micro-batch
 * whose FFN answers are all in goes on with its next layer (or is sampled after the last),
 * an idle micro-batch starts its next step as soon as that step's plan is here. Returns 1
 * when it did something.
 */
static int pipeline_run(attn_node_t *a)
{
    int L = a->cfg.num_layers, best = -1;
    uint64_t bstep = 0;
    int blayer = 0;
    attn_plan_t *bplan = NULL;
    /* A2F rows that reached the host go out first: the FFN nodes are waiting for them */
    for (int i = 0; i < a->cur_nmb; i++) {
        afd_status_t st;
        if (!a2f_poll(a, i, 0, &st)) continue;
        if (st) pipeline_fail(a, st, NULL);
        return 1;
    }
    for (int i = 0; i < a->cur_nmb; i++) {
        attn_mb_t *mb = &a->mb[i];
        uint64_t step;
        int layer;
        attn_plan_t *p = NULL;
        if (mb->busy) {
            if (mb->a2f_queued || mb->got < a->ffn.n) continue;
            step = mb->step;
            layer = mb->want_layer + 1;
        } else {
            p = next_plan(a, i);
            if (!p) continue;
            const Afd__StepPlan *pl = p->f->plan;
            /* a new micro-batch count or placement is a barrier, handled below once
             * every micro-batch is idle */
            if ((int)pl->micro_batches != a->cur_nmb || pl->epoch != a->epoch) continue;
            step = pl->step;
            layer = 0;
        }
        if (best < 0 || step < bstep || (step == bstep && layer < blayer)) {
            best = i;
            bstep = step;
            blayer = layer;
            bplan = p;
        }
    }
    if (best < 0) {
        /* the barrier case: micro-batch count or epoch changes, every micro-batch idle */
        if (a->nplans && all_idle(a) && !a->plans[0].started) {
            attn_plan_t *p = &a->plans[0];
            const Afd__StepPlan *pl = p->f->plan;
            if (pl->epoch != a->epoch) {
                attn_acc_t *acc = acc_get(a, pl->step, (int)pl->micro_batches);
                (void)acc;
                pipeline_fail(a, AFD_ERR_PEER, "placement epoch changed");
                /* the plan itself never ran: report its step too and drop it */
                net_frame_free(p->f);
                memmove(&a->plans[0], &a->plans[1], sizeof(a->plans[0]) * (size_t)(--a->nplans));
                return 1;
            }
            if ((int)pl->micro_batches != a->cur_nmb) {
                int nmb = (int)pl->micro_batches;
                if (nmb < 1 || nmb > ATTN_MAX_MB) nmb = 1;
                rebalance(a, nmb);
                return 1;
            }
        }
        return 0;
    }
    afd_status_t st;
    attn_mb_t *mb = &a->mb[best];
    /* attn_us: everything this core does for the pipeline (attention, packing and sending
     * A2F, summing F2A, sampling), the attention stage's busy time */
    uint64_t t0 = net_now_us();
    if (!mb->busy) {
        st = mb_start(a, best, bplan);
    } else {
        add_f2a(a, mb);
        afd_trace_span(a->trace, "f2a add", t0, net_now_us(), mb->step, blayer - 1, best, mb->ntok);
        if (blayer < L) {
            st = mb_layer(a, best, blayer);
        } else {
            uint64_t t1 = net_now_us();
            uint64_t step = mb->step;
            int rows = mb->nrows;
            st = mb_finish(a, best);
            afd_trace_span(a->trace, "lm_head+sample", t1, net_now_us(), step, -1, best, rows);
        }
    }
    a->attn_us += net_now_us() - t0;
    if (st) pipeline_fail(a, st, NULL);
    return 1;
}

static void queue_plan(attn_node_t *a, Afd__Frame *f)
{
    const Afd__StepPlan *pl = f->plan;
    if (pl->micro_batches < 1 || pl->micro_batches > ATTN_MAX_MB || a->nplans == ATTN_MAX_PLANS) {
        afd_error("plan for step %llu refused: %u micro-batches, %d plans queued",
                  (unsigned long long)pl->step, pl->micro_batches, a->nplans);
        Afd__StepResult res = AFD__STEP_RESULT__INIT;
        res.step = pl->step;
        res.error = "plan refused by the attention node";
        Afd__Frame out = AFD__FRAME__INIT;
        out.body_case = AFD__FRAME__BODY_RESULT;
        out.result = &res;
        net_node_send(&a->ctl, &out);
        net_frame_free(f);
        return;
    }
    a->plans[a->nplans++] = (attn_plan_t){.f = f};
}

static void send_heartbeat(attn_node_t *a)
{
    a->last_hb_us = net_now_us();
    Afd__NodeStats ns = AFD__NODE_STATS__INIT;
    Afd__StageTimes busy = AFD__STAGE_TIMES__INIT;
    busy.attn_us = a->attn_us;
    busy.wait_us = a->wait_us;
    busy.other_us = a->idle_us;
    busy.xfer_us = a->xfer_us;
    busy.step_us = a->step_us;
    ns.busy = &busy;
    ns.kv_blocks_total = (uint64_t)a->kv->store.num_blocks;
    ns.kv_blocks_used = (uint64_t)(a->kv->store.num_blocks - a->kv->nfree);
    ns.running = (uint32_t)a->nseqs;
    ns.steps = a->steps;
    ns.a2f_bytes = a->a2f_bytes;
    ns.f2a_bytes = a->f2a_bytes;
    ns.tokens = a->tokens;
    ns.data_plane_device = a->dev_plane;
    ns.f2a_in_device = a->f2a_in_device;
    ns.f2a_staged = a->f2a_staged;
    Afd__LatencyHist hs[ATTN_MAX_FFN], *hp[ATTN_MAX_FFN];
    net_lat_to_proto(a->ffn.lat, a->ffn.n, hs, hp);
    ns.n_peer_latency = (size_t)a->ffn.n;
    ns.peer_latency = hp;
    net_node_send_heartbeat(&a->ctl, &ns);
    if (a->metrics) {
        size_t len;
        char *txt = net_metrics_render_node(&ns, "attention", a->ctl.node_id, &len);
        if (txt) net_metrics_publish(a->metrics, txt, len);
        free(txt);
    }
}

static afd_status_t apply_peers(attn_node_t *a, const Afd__PeerTable *pt)
{
    afd_status_t st = net_peer_set_apply(&a->ffn, a->ucx, pt, AFD__ROLE__ROLE_FFN);
    if (st) return st;
    a->epoch = pt->epoch;
    afd_info("epoch %u: %d FFN nodes", a->epoch, a->ffn.n);
    return AFD_OK;
}

/* Joins the coordinator (trying again for --coordinator-wait-s) and announces this node
 * ready once UCX is up; a coordinator gone again before Ready is joined again. */
static afd_status_t attn_join(attn_node_t *a, Afd__Hello *hello)
{
    for (;;) {
        Afd__Welcome *w;
        afd_status_t st = net_node_join_wait(&a->ctl, a->o.coordinator, hello,
                                             a->o.coordinator_wait_s, &g_stop, &w);
        if (st) return st;
        afd_info("joined as node %u: %d KV blocks of %ld tokens", w->node_id,
                 a->kv->store.num_blocks, a->o.kv_block);
        afd__welcome__free_unpacked(w, NULL);
        if (!a->ucx) return AFD_OK; /* first join: Ready follows once UCX is up */
        if (net_node_send_ready(&a->ctl, a->ucx) == AFD_OK) return AFD_OK;
        net_node_close(&a->ctl);
    }
}

/*
 * The coordinator is gone, and with it every client this node was answering: the
 * sequences, plans and steps in flight are dropped (their KV blocks return), the FFN
 * endpoints close, and the node starts over as a fresh member, keeping its weights, KV
 * pool and UCX worker.
 */
static void attn_reset(attn_node_t *a)
{
    net_node_close(&a->ctl);
    int n = a->nseqs;
    pipeline_fail(a, AFD_ERR_PEER, "lost the coordinator");
    for (int k = 0; k < a->nplans; k++)
        net_frame_free(a->plans[k].f);
    a->nplans = 0;
    if (a->pending_peers) net_frame_free(a->pending_peers);
    a->pending_peers = NULL;
    net_peer_set_close(&a->ffn);
    a->epoch = 0;
    a->cur_nmb = 0;
    afd_warn("lost the coordinator: dropped %d sequences; %d KV blocks free; rejoining", n,
             a->kv->nfree);
}

int main(int argc, char **argv)
{
    afd_log_init("attn_node");
    static attn_node_t a;
    int first;
    afd_status_t st = afd_opts_parse(attn_table, &a.o, argc, argv,
                                     "usage: attn_node --model DIR --coordinator HOST:PORT "
                                     "--cluster-token T [options]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (!a.o.model || !a.o.cluster_token) {
        afd_error("--model and --cluster-token are required");
        return 2;
    }
    if (!net_plane_mode_ok(a.o.data_plane)) {
        afd_error("--data-plane: '%s' is not auto, host or device", a.o.data_plane);
        return 2;
    }
    afd_dtype_t kvdt = afd_dtype_parse(a.o.kv_dtype);
    a.a2f = afd_dtype_parse(a.o.a2f_dtype);
    a.f2a = afd_dtype_parse(a.o.f2a_dtype);
    if (kvdt == AFD_DTYPE_COUNT || kvdt == AFD_DTYPE_F16 || a.a2f == AFD_DTYPE_COUNT ||
        a.a2f == AFD_DTYPE_F16 || (a.f2a != AFD_DTYPE_BF16 && a.f2a != AFD_DTYPE_F32)) {
        afd_error("--kv-dtype bf16|fp8|f32, --a2f-dtype fp8|bf16|f32, --f2a-dtype bf16|f32");
        return 2;
    }
    net_node_pin_cpu(a.o.cpu);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    kn_backend_t *be;
    mdl_ckpt_t *ck;
    if (mdl_config_load(a.o.model, &a.cfg) ||
        kn_backend_create(a.o.backend, (int)a.o.threads, &be) || mdl_ckpt_open(a.o.model, &ck))
        return 1;
    mdl_role_t role = {.attn = 1};
    if (mdl_model_load(ck, &a.cfg, be, &role, isatty(2), &a.m) ||
        mdl_kv_create(be, &a.cfg, kvdt, (int)a.o.kv_block, (size_t)a.o.kv_budget_mb << 20, &a.kv) ||
        mdl_sampler_create(a.cfg.vocab_size, &a.smp))
        return 1;
    char name[128];
    snprintf(name, sizeof(name), "attn-%d", (int)getpid());
    Afd__Hello hello = AFD__HELLO__INIT;
    hello.protocol = 1;
    hello.cluster_token = a.o.cluster_token;
    hello.role = AFD__ROLE__ROLE_ATTN;
    hello.name = a.o.name ? a.o.name : name;
    hello.model_id = a.o.model;
    hello.pid = (uint32_t)getpid();
    hello.kv_blocks = (uint64_t)a.kv->store.num_blocks;
    hello.kv_block_size = (uint32_t)a.o.kv_block;
    hello.max_batch_tokens = (uint32_t)a.o.max_batch_tokens;
    hello.max_seqs = (uint32_t)a.o.max_seqs;
    hello.backend = a.o.backend;
    hello.ranks = 1;
    if (a.o.trace_file && afd_trace_open(&a.trace, a.o.trace_file, (size_t)a.o.trace_events,
                                         hello.name, (uint32_t)getpid()))
        return 1;
    if (attn_join(&a, &hello)) return 1;
    a.lim = (net_wire_limits_t){.hidden = (uint32_t)a.cfg.hidden_size,
                                .topk = (uint32_t)a.cfg.top_k,
                                .num_layers = (uint32_t)a.cfg.num_layers,
                                .max_tok = 1u << 22};
    net_ucx_opts_t uo = {.err_mode_peer = a.o.ucx_peer_errors,
                         .max_hdr = sizeof(net_wire_hdr_t),
                         .max_payload = (size_t)1 << 32,
                         .alloc_cb = attn_alloc,
                         .recv_cb = attn_recv,
                         .err_cb = attn_peer_err,
                         .arg = &a};
    int dev = !be->ops->host_memory, cuda = be->ops->cuda_memory;
    if (dev) { /* data-plane buffers the device copies into and out of */
        uo.host_alloc = kn_host_alloc_cb;
        uo.host_free = kn_host_free_cb;
        uo.host_arg = be;
        uo.device_host = net_plane_device_host(dev, cuda);
    }
    if (net_ucx_create(&uo, &a.ucx)) return 1;
    if ((a.dev_plane = net_plane_choose(a.o.data_plane, dev, cuda, a.ucx)) < 0) return 2;
    if (a.dev_plane)
        afd_info("data plane: A2F packed on the device and sent from device memory; F2A "
                 "pulled into device memory and added there (short answers sent eagerly "
                 "from host memory are uploaded)");
    else if (dev)
        afd_info("data plane: A2F packed and F2A added on the device, sent and received "
                 "through pinned, registered host buffers (this UCX %s CUDA memory)",
                 net_ucx_cuda_memory(a.ucx) ? "also moves" : "does not move");
    if (a.o.metrics_port >= 0) {
        if (net_metrics_start("0.0.0.0", (int)a.o.metrics_port, &a.metrics)) return 1;
        afd_info("metrics on port %d", net_metrics_port(a.metrics));
    }
    if (net_node_send_ready(&a.ctl, a.ucx)) return 1;
    int rc = 0;
    while (!g_stop) {
        Afd__Frame *in;
        while ((st = net_node_next(&a.ctl, &in)) == AFD_OK) {
            if (in->body_case == AFD__FRAME__BODY_PLAN) {
                queue_plan(&a, in); /* owns the frame now */
                continue;
            }
            if (in->body_case == AFD__FRAME__BODY_PEERS) {
                /* the coordinator publishes a placement only when no step is in flight,
                 * or when a node was lost: steps still running here then belong to a
                 * cluster that is gone (the coordinator has sent their sequences back to
                 * its queue), so they end now rather than at their deadline */
                if (!all_idle(&a)) pipeline_fail(&a, AFD_ERR_PEER, "the placement changed");
                if (a.pending_peers) net_frame_free(a.pending_peers);
                a.pending_peers = in;
                continue;
            }
            net_frame_free(in);
        }
        if (st == AFD_ERR_PEER) {
            if (!a.o.coordinator_wait_s) {
                afd_error("lost the coordinator; exiting");
                rc = 1;
                break;
            }
            attn_reset(&a);
            if (attn_join(&a, &hello)) {
                afd_error("could not rejoin the coordinator; exiting");
                rc = 1;
                break;
            }
            continue;
        }
        if (a.retired) tx_sweep(&a);
        if (a.pending_peers && all_idle(&a)) {
            if (apply_peers(&a, a.pending_peers->peers) == AFD_OK)
                net_node_send_connected(&a.ctl, a.epoch);
            net_frame_free(a.pending_peers);
            a.pending_peers = NULL;
        }
        maybe_heartbeat(&a);
        if (a.step_failed) {
            pipeline_fail(&a, AFD_ERR_PEER, "an FFN node failed");
            continue;
        }
        if (pipeline_run(&a)) continue;
        /* nothing runnable: wait for FFN answers (spinning briefly while a step is in
         * flight) or for the coordinator; check the step deadlines */
        int inflight = !all_idle(&a), queued = 0;
        for (int i = 0; i < ATTN_MAX_MB; i++)
            queued |= a.mb[i].a2f_queued;
        uint64_t t0 = net_now_us();
        /* a queued copy to the host finishes on its own: poll, never sleep past it */
        net_node_wait(&a.ctl, a.ucx, inflight ? (int)a.o.busy_poll_us : 0,
                      queued     ? 0
                      : inflight ? 5
                                 : 100);
        if (!inflight) a.idle_us += net_now_us() - t0; /* no step to run: no plan yet */
        if (inflight) {
            uint64_t t1 = net_now_us();
            a.wait_us += t1 - t0;
            afd_trace_span(a.trace, "wait", t0, t1, AFD_TRACE_NO_STEP, -1, -1, -1);
            for (int i = 0; i < ATTN_MAX_MB; i++)
                if (a.mb[i].busy && net_now_us() > a.mb[i].deadline_us) {
                    pipeline_fail(&a, AFD_ERR_TIMEOUT,
                                  "step deadline passed (FFN answers missing)");
                    break;
                }
        }
    }
    afd_info("stopping");
    if (a.graph_launches || a.graph_fallbacks)
        afd_info("graphs: %llu decode layers replayed, %llu recorded, %llu run directly after a "
                 "recording that could not hold them",
                 (unsigned long long)a.graph_launches, (unsigned long long)a.graph_captures,
                 (unsigned long long)a.graph_fallbacks);
    if (a.dev_plane)
        afd_info("data plane: %llu F2A answers pulled into device memory, %llu staged through "
                 "host memory",
                 (unsigned long long)a.f2a_in_device, (unsigned long long)a.f2a_staged);
    net_metrics_stop(a.metrics);
    net_node_close(&a.ctl);
    for (int k = 0; k < a.nplans; k++)
        net_frame_free(a.plans[k].f);
    if (a.pending_peers) net_frame_free(a.pending_peers);
    while (a.seqs)
        seq_remove(&a, a.seqs);
    net_peer_set_close(&a.ffn);
    for (int i = 0; i < ATTN_MAX_MB; i++) {
        if (a.mb[i].tx) { /* retired with the others: freed once no send reads it */
            a.mb[i].tx->next = a.retired;
            a.retired = a.mb[i].tx;
            a.mb[i].tx = NULL;
        }
        for (int f = 0; f < ATTN_MAX_FFN; f++)
            net_ucx_buf_free(a.ucx, &a.mb[i].rx[f]);
    }
    tx_sweep(&a);
    net_ucx_destroy(a.ucx); /* runs the callbacks of sends still pending */
    while (a.retired) {     /* their registrations went with the worker */
        attn_tx_t *t = a.retired;
        a.retired = t->next;
        net_ucx_buf_forget(&t->buf);
        if (t->dev) t->dev_be->ops->free(t->dev_be, t->dev);
        free(t);
    }
    if (a.trace) {
        afd_info("trace: %llu spans to %s", (unsigned long long)afd_trace_count(a.trace),
                 a.o.trace_file);
        afd_trace_close(a.trace);
    }
    mdl_sampler_destroy(a.smp);
    for (int i = 0; i < ATTN_MAX_MB; i++)
        mb_free(&a, &a.mb[i]);
    kn_host_free(be, a.logits);
    free(a.top_ids);
    free(a.top_logits);
    free(a.top_lse);
    mdl_kv_destroy(a.kv);
    mdl_model_free(a.m);
    mdl_ckpt_close(ck);
    be->ops->destroy(be);
    afd_opts_free(attn_table, &a.o);
    return rc;
}
