/*
 * afd_layer_bench: one decode layer through the ops table, as the nodes run it, on any
 * backend, at Step3's shapes by default (smaller ones by option): the attention side
 * (mdl_attn: norms, projections, RoPE, the batch's KV writes and decode attention over
 * the paged cache, o_proj, router) for --batch sequences at --context positions, and the
 * FFN side (mdl_ffn: routed rows sorted by expert, the experts' segmented GEMMs, the
 * shared expert) for --tokens routed over --experts experts of which this GPU holds
 * --experts-here, each sliced to moe_inter / --tp columns. Weights are random (one
 * generated matrix loaded once per expert), the KV cache zeros: the time does not depend
 * on the values. Prints the time per layer and how long the host takes to queue it (on a
 * device backend, longer than the device's time means launch-bound).
 *
 *   afd_layer_bench [--backend cuda] [--dtype fp8] [--batch 128] [--context 4096]
 *                   [--tokens 2048] [--experts-here 24] [--tp 8] [--reps 5] [size options]
 */
#define _GNU_SOURCE
#include "afd_dtype.h"
#include "afd_log.h"
#include "afd_opts.h"
#include "kn_ops.h"
#include "mdl_kv.h"
#include "mdl_model.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct lb_opts {
    char *backend, *dtype;
    long batch, context, tokens, experts_here, tp, reps, threads;
    long hidden, heads, head_dim, share_q, experts, topk, moe_inter, share_inter;
} lb_opts_t;

#define O(f) offsetof(lb_opts_t, f)
static const afd_opt_t lb_table[] = {
    {"backend", AFD_OPT_STRING, "cpu", O(backend), 0, 0, AFD_OPT_NOENV, "cpu, cuda or cpu-dev"},
    {"dtype", AFD_OPT_STRING, "fp8", O(dtype), 0, 0, AFD_OPT_NOENV,
     "weights: fp8 (block e4m3) or bf16; the KV cache is fp8 with fp8 weights"},
    {"batch", AFD_OPT_INT, "128", O(batch), 1, 65536, AFD_OPT_NOENV, "sequences (attention)"},
    {"context", AFD_OPT_INT, "4096", O(context), 1, 1 << 20, AFD_OPT_NOENV,
     "positions each sequence attends to"},
    {"tokens", AFD_OPT_INT, "2048", O(tokens), 1, 1 << 20, AFD_OPT_NOENV, "FFN rows"},
    {"experts-here", AFD_OPT_INT, "48", O(experts_here), 1, 4096, AFD_OPT_NOENV,
     "experts this backend holds (the first ones)"},
    {"tp", AFD_OPT_INT, "1", O(tp), 1, 64, AFD_OPT_NOENV,
     "tensor-parallel ranks the experts' intermediate dimension is split over (one here)"},
    {"reps", AFD_OPT_INT, "5", O(reps), 1, 1000, AFD_OPT_NOENV, "timed layers of each side"},
    {"threads", AFD_OPT_INT, "1", O(threads), 0, 1024, AFD_OPT_NOENV, "cpu GEMM threads"},
    {"hidden", AFD_OPT_INT, "7168", O(hidden), 128, 65536, AFD_OPT_NOENV, "hidden size"},
    {"heads", AFD_OPT_INT, "64", O(heads), 1, 1024, AFD_OPT_NOENV, "query heads"},
    {"head-dim", AFD_OPT_INT, "256", O(head_dim), 16, 1024, AFD_OPT_NOENV, "head dimension"},
    {"share-q", AFD_OPT_INT, "2048", O(share_q), 16, 65536, AFD_OPT_NOENV, "low-rank query"},
    {"experts", AFD_OPT_INT, "48", O(experts), 1, 4096, AFD_OPT_NOENV, "routed experts"},
    {"topk", AFD_OPT_INT, "3", O(topk), 1, 64, AFD_OPT_NOENV, "experts per token"},
    {"moe-inter", AFD_OPT_INT, "5120", O(moe_inter), 16, 1 << 20, AFD_OPT_NOENV,
     "expert intermediate size"},
    {"share-inter", AFD_OPT_INT, "5120", O(share_inter), 0, 1 << 20, AFD_OPT_NOENV,
     "shared expert intermediate size (this backend's slice: / tp)"},
    AFD_OPTS_END};
#undef O

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static float frand(void) /* [-1, 1) */
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 4503599627370496.0 - 1.0);
}

/* A random [rows, cols] matrix in dt (block-fp8 with its scales), as a checkpoint holds. */
typedef struct mat {
    kn_src_t s;
    void *data;
    float *scale;
} mat_t;

static int mat_make(mat_t *m, afd_dtype_t dt, int64_t rows, int64_t cols, float amp)
{
    size_t n = (size_t)rows * (size_t)cols;
    memset(m, 0, sizeof(*m));
    m->data = malloc(n * afd_dtype_size(dt));
    if (!m->data) return -1;
    if (dt == AFD_DTYPE_E4M3) {
        int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
        m->scale = malloc(sizeof(float) * (size_t)(br * bc));
        if (!m->scale) return -1;
        for (int64_t i = 0; i < br * bc; i++)
            m->scale[i] = amp / 448.0f;
        for (size_t i = 0; i < n; i++)
            ((uint8_t *)m->data)[i] = afd_f32_to_e4m3(448.0f * frand());
    } else {
        uint16_t *d = m->data;
        for (size_t i = 0; i < n; i++)
            d[i] = afd_f32_to_bf16(amp * frand());
    }
    m->s = (kn_src_t){.dtype = dt,
                      .data = m->data,
                      .full_rows = rows,
                      .full_cols = cols,
                      .rows = rows,
                      .cols = cols,
                      .scale = m->scale};
    return 0;
}

static void mat_free(mat_t *m)
{
    free(m->data);
    free(m->scale);
}

static int load(kn_backend_t *be, afd_dtype_t dt, int64_t rows, int64_t cols, kn_weight_t *w)
{
    mat_t m;
    if (mat_make(&m, dt, rows, cols, 0.02f)) return -1;
    afd_status_t st = be->ops->weight_load(be, &m.s, w);
    mat_free(&m);
    return st ? -1 : 0;
}

static float *ones(kn_backend_t *be, int n)
{
    float *h = malloc(sizeof(float) * (size_t)n),
          *d = be->ops->alloc(be, sizeof(float) * (size_t)n);
    if (!h || !d) exit(1);
    for (int i = 0; i < n; i++)
        h[i] = 1.0f;
    be->ops->upload(be, d, h, sizeof(float) * (size_t)n);
    free(h);
    return d;
}

static float *rand_dev(kn_backend_t *be, size_t n, float amp)
{
    float *h = malloc(sizeof(float) * n), *d = be->ops->alloc(be, sizeof(float) * n);
    if (!h || !d) exit(1);
    for (size_t i = 0; i < n; i++)
        h[i] = amp * frand();
    be->ops->upload(be, d, h, sizeof(float) * n);
    free(h);
    return d;
}

int main(int argc, char **argv)
{
    afd_log_init("afd_layer_bench");
    static lb_opts_t o; /* zeroed: the parser frees what a field held */
    int first;
    afd_status_t st =
        afd_opts_parse(lb_table, &o, argc, argv, "usage: afd_layer_bench [options]", &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    afd_dtype_t wdt = !strcmp(o.dtype, "bf16") ? AFD_DTYPE_BF16 : AFD_DTYPE_E4M3;
    if (strcmp(o.dtype, "bf16") && strcmp(o.dtype, "fp8")) {
        afd_error("--dtype fp8 or bf16");
        return 2;
    }
    if (o.experts_here > o.experts || o.topk > o.experts || o.moe_inter / o.tp < 1) {
        afd_error("--experts-here and --topk at most --experts; --tp at most --moe-inter");
        return 2;
    }
    kn_backend_t *be;
    if (kn_backend_create(o.backend, (int)o.threads, &be)) return 1;
    int H = (int)o.hidden, NH = (int)o.heads, HD = (int)o.head_dim, Q = (int)o.share_q;
    int E = (int)o.experts, EH = (int)o.experts_here, K = (int)o.topk;
    int I = (int)(o.moe_inter / o.tp), SI = (int)(o.share_inter / o.tp);

    mdl_model_t m;
    memset(&m, 0, sizeof(m));
    mdl_config_t *c = &m.cfg;
    c->hidden_size = H;
    c->num_layers = 1;
    c->num_heads = NH;
    c->num_kv_heads = 1;
    c->head_dim = HD;
    c->share_q_dim = Q;
    c->rope_theta = 500000;
    c->vocab_size = 1024;
    c->max_position = (int)o.context + 16;
    c->num_experts = E;
    c->top_k = K;
    c->moe_inter = (int)o.moe_inter;
    c->share_expert_dim = (int)o.share_inter;
    c->rms_eps = 1e-5f;
    c->is_moe[0] = 1;
    m.be = be;
    m.role = (mdl_role_t){.attn = 1, .ffn = 1, .ffn_count = 1, .tp_count = 1};
    mdl_attn_layer_t al;
    mdl_ffn_layer_t fl;
    memset(&al, 0, sizeof(al));
    memset(&fl, 0, sizeof(fl));
    m.attn = &al;
    m.ffn = &fl;
    double t0 = now_s();
    al.in_norm = ones(be, H);
    al.inter_norm = ones(be, Q);
    al.post_norm = ones(be, H);
    if (load(be, wdt, Q, H, &al.q_proj) || load(be, wdt, (int64_t)NH * HD, Q, &al.wq) ||
        load(be, wdt, HD, H, &al.k_proj) || load(be, wdt, HD, H, &al.v_proj) ||
        load(be, wdt, H, (int64_t)NH * HD, &al.o_proj) || load(be, wdt, E, H, &al.router)) {
        afd_error("loading the attention weights failed");
        return 1;
    }
    fl.is_moe = 1;
    fl.i0 = 0;
    fl.i1 = SI;
    if (SI > 0 && (load(be, wdt, SI, H, &fl.gate) || load(be, wdt, SI, H, &fl.up) ||
                   load(be, wdt, H, SI, &fl.down))) {
        afd_error("loading the shared expert failed");
        return 1;
    }
    fl.e0 = 0;
    fl.e1 = EH;
    fl.ei0 = 0;
    fl.ei1 = I;
    fl.egate = calloc((size_t)EH, sizeof(kn_weight_t));
    fl.eup = calloc((size_t)EH, sizeof(kn_weight_t));
    fl.edown = calloc((size_t)EH, sizeof(kn_weight_t));
    mat_t gm, dm; /* one random expert, loaded once per expert */
    if (!fl.egate || !fl.eup || !fl.edown || mat_make(&gm, wdt, I, H, 0.02f) ||
        mat_make(&dm, wdt, H, I, 0.02f))
        return 1;
    for (int e = 0; e < EH; e++)
        if (be->ops->weight_load(be, &gm.s, &fl.egate[e]) ||
            be->ops->weight_load(be, &gm.s, &fl.eup[e]) ||
            be->ops->weight_load(be, &dm.s, &fl.edown[e])) {
            afd_error("loading expert %d failed (device memory?)", e);
            return 1;
        }
    mat_free(&gm);
    mat_free(&dm);
    be->ops->sync(be);
    double t_load = now_s() - t0;

    /* the attention side: batch sequences decoding their next token at `context` */
    int B = (int)o.batch, ctx = (int)o.context, bs = 16, nb = (ctx + bs - 1) / bs;
    afd_dtype_t kvdt = wdt == AFD_DTYPE_E4M3 ? AFD_DTYPE_E4M3 : AFD_DTYPE_BF16;
    mdl_kv_t *kv;
    size_t kv_bytes = (size_t)B * nb * bs * HD * 2 * afd_dtype_size(kvdt) +
                      (kvdt == AFD_DTYPE_E4M3 ? (size_t)B * nb * bs * 8 : 0) + (1u << 20);
    if (mdl_kv_create(be, c, kvdt, bs, kv_bytes, &kv)) {
        afd_error("no memory for the KV cache of %d x %d positions", B, ctx);
        return 1;
    }
    int32_t *tables = malloc(sizeof(int32_t) * (size_t)B * nb);
    kn_seq_t *seqs = malloc(sizeof(kn_seq_t) * (size_t)B);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)B), *pos = malloc(sizeof(int32_t) * (size_t)B);
    if (!tables || !seqs || !tok || !pos || mdl_kv_alloc(kv, B * nb, tables)) {
        afd_error("the KV cache has fewer than %d blocks", B * nb);
        return 1;
    }
    for (int s = 0; s < B; s++) {
        seqs[s] = (kn_seq_t){.block_table = tables + (size_t)s * nb, .pos0 = ctx - 1, .ntok = 1};
        tok[s] = s % 1000;
        pos[s] = ctx - 1;
    }
    mdl_batch_t b = {.nseq = B, .ntok = B, .tokens = tok, .pos = pos, .seqs = seqs};
    int N = (int)o.tokens, cap = B > N ? B : N;
    mdl_ws_t ws;
    memset(&ws, 0, sizeof(ws));
    if (mdl_ws_reserve(&m, &ws, cap)) {
        afd_error("no memory for the workspace");
        return 1;
    }
    float *x = rand_dev(be, (size_t)B * H, 1.0f), *g = be->ops->alloc(be, 4 * (size_t)B * H);
    int32_t *ids = be->ops->alloc(be, 4 * (size_t)B * K);
    float *wts = be->ops->alloc(be, 4 * (size_t)B * K);
    mdl_attn(&m, &ws, 0, &kv->store, &b, x, g, ids, wts); /* warm-up: plans, arena */
    be->ops->sync(be);
    double q = 0, t1 = now_s();
    for (int r = 0; r < o.reps; r++) {
        double a = now_s();
        mdl_attn(&m, &ws, 0, &kv->store, &b, x, g, ids, wts);
        q += now_s() - a;
    }
    be->ops->sync(be);
    double t_attn = (now_s() - t1) / (double)o.reps, q_attn = q / (double)o.reps;
    double kvb = (double)B * ctx * HD * 2 * afd_dtype_size(kvdt);
    printf("layer attention: %d sequences at context %d, %s weights, %s KV on %s: %.1f us per "
           "layer (%.1f GB/s of KV read); the host queues it in %.1f us\n",
           B, ctx, o.dtype, afd_dtype_name(kvdt), be->ops->name, t_attn * 1e6, kvb / t_attn / 1e9,
           q_attn * 1e6);

    /* the FFN side: N rows routed over E experts (k distinct each), this backend's EH */
    float *gin = rand_dev(be, (size_t)N * H, 1.0f), *out = be->ops->alloc(be, 4 * (size_t)N * H);
    int32_t *hid = malloc(sizeof(int32_t) * (size_t)N * K);
    float *hw = malloc(sizeof(float) * (size_t)N * K);
    if (!out || !hid || !hw) return 1;
    for (int t = 0; t < N; t++)
        for (int j = 0; j < K; j++) {
            int e, dup;
            do {
                e = (int)((frand() + 1.0f) * 0.5f * (float)E) % E;
                dup = 0;
                for (int p = 0; p < j; p++)
                    dup |= hid[t * K + p] == e;
            } while (dup);
            hid[t * K + j] = e;
            hw[t * K + j] = 1.0f / (float)K;
        }
    long routed = 0;
    for (int i = 0; i < N * K; i++)
        routed += hid[i] < EH;
    mdl_ffn(&m, &ws, 0, gin, N, hid, hw, out); /* warm-up */
    be->ops->sync(be);
    q = 0;
    t1 = now_s();
    for (int r = 0; r < o.reps; r++) {
        double a = now_s();
        mdl_ffn(&m, &ws, 0, gin, N, hid, hw, out);
        q += now_s() - a;
    }
    be->ops->sync(be);
    double t_ffn = (now_s() - t1) / (double)o.reps, q_ffn = q / (double)o.reps;
    double flops = 2.0 * 3.0 * ((double)routed * I + (double)N * SI) * H;
    printf("layer ffn: %d tokens x top %d over %d experts, %d here x %d columns (%ld routed "
           "rows) + shared expert x %d, %s on %s: %.1f us per layer, %.1f TFLOP/s; the host "
           "queues it in %.1f us\n",
           N, K, E, EH, I, routed, SI, o.dtype, be->ops->name, t_ffn * 1e6, flops / t_ffn / 1e12,
           q_ffn * 1e6);
    printf("(weights loaded in %.1f s)\n", t_load);

    free(hid);
    free(hw);
    free(tables);
    free(seqs);
    free(tok);
    free(pos);
    void *bufs[] = {gin, out, x, g, ids, wts, al.in_norm, al.inter_norm, al.post_norm};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        be->ops->free(be, bufs[i]);
    mdl_ws_free(&m, &ws);
    mdl_kv_destroy(kv);
    kn_weight_t *wl[] = {&al.q_proj, &al.wq,   &al.k_proj, &al.v_proj, &al.o_proj,
                         &al.router, &fl.gate, &fl.up,     &fl.down};
    for (size_t i = 0; i < sizeof(wl) / sizeof(wl[0]); i++)
        if (wl[i]->data) be->ops->weight_free(be, wl[i]);
    for (int e = 0; e < EH; e++) {
        be->ops->weight_free(be, &fl.egate[e]);
        be->ops->weight_free(be, &fl.eup[e]);
        be->ops->weight_free(be, &fl.edown[e]);
    }
    free(fl.egate);
    free(fl.eup);
    free(fl.edown);
    be->ops->destroy(be);
    afd_opts_free(lb_table, &o);
    return 0;
}
