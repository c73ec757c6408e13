/* mdl_model: role-based weight loading and the forward pieces over the ops table. */
#define _GNU_SOURCE
#include "mdl_model.h"
#include "afd_log.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void mdl_role_experts(const mdl_config_t *cfg, int i, int n, int *e0, int *e1)
{
    *e0 = (int)((long)i * cfg->num_experts / n);
    *e1 = (int)((long)(i + 1) * cfg->num_experts / n);
}

void mdl_role_slice(int dim, int i, int n, int *d0, int *d1)
{
    *d0 = (int)((long)i * dim / n);
    *d1 = (int)((long)(i + 1) * dim / n);
}

void mdl_role_slice_aligned(int dim, int i, int n, int align, int *d0, int *d1)
{
    if (align > 0 && dim % align == 0 && dim / align >= n) {
        mdl_role_slice(dim / align, i, n, d0, d1);
        *d0 *= align;
        *d1 *= align;
    } else
        mdl_role_slice(dim, i, n, d0, d1);
}

/* ---- loading ---- */

typedef struct loader {
    const mdl_ckpt_t *ck;
    mdl_model_t *m;
    uint64_t total, done;
    int progress;
    double last_print;
} loader_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void loader_tick(loader_t *ld, uint64_t bytes, int final)
{
    ld->done += bytes;
    if (!ld->progress) return;
    double t = now_s();
    if (!final && t - ld->last_print < 0.25) return;
    ld->last_print = t;
    fprintf(stderr, "\rloading weights: %.2f / %.2f GB (%3.0f%%)%s", ld->done / 1e9,
            ld->total / 1e9, ld->total ? 100.0 * ld->done / ld->total : 100.0, final ? "\n" : "");
    fflush(stderr);
}

/* Finds a tensor and checks it has the expected shape; errors name the file and tensor. */
static afd_status_t find_tensor(loader_t *ld, const char *name, int ndim, const int64_t *shape,
                                const mdl_st_tensor_t **out)
{
    const mdl_st_tensor_t *t = mdl_ckpt_find(ld->ck, name);
    if (!t) {
        afd_error("%s: tensor '%s' is missing from the checkpoint", ld->ck->dir, name);
        return AFD_ERR_NOT_FOUND;
    }
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        ok = t->shape[i] == shape[i];
    if (!ok) {
        char got[128], want[128];
        mdl_st_tensor_t w = {.ndim = ndim};
        memcpy(w.shape, shape, sizeof(int64_t) * (size_t)ndim);
        afd_error("%s: tensor '%s' has shape %s, expected %s", t->file->base, name,
                  mdl_st_shape_str(t, got, sizeof(got)), mdl_st_shape_str(&w, want, sizeof(want)));
        return AFD_ERR_FORMAT;
    }
    *out = t;
    return AFD_OK;
}

/*
 * Describes matrix `expert` (or the only matrix when ndim is 2) of tensor `name` with
 * logical shape [rows, cols], sliced to [r0, r0+nr) x [c0, c0+nc); finds and checks the
 * block scales of an fp8 tensor.
 */
static afd_status_t make_src(loader_t *ld, const char *name, int nexp, int expert, int64_t rows,
                             int64_t cols, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                             kn_src_t *src)
{
    const mdl_st_tensor_t *t;
    int64_t shape[3];
    int nd = 0;
    if (nexp > 0) shape[nd++] = nexp;
    shape[nd++] = rows;
    shape[nd++] = cols;
    afd_status_t st = find_tensor(ld, name, nd, shape, &t);
    if (st) return st;
    size_t es = afd_dtype_size(t->dtype);
    memset(src, 0, sizeof(*src));
    src->dtype = t->dtype;
    src->data = t->data + (size_t)(nexp > 0 ? expert : 0) * (size_t)(rows * cols) * es;
    src->full_rows = rows;
    src->full_cols = cols;
    src->row0 = r0;
    src->rows = nr;
    src->col0 = c0;
    src->cols = nc;
    if (t->dtype == AFD_DTYPE_E4M3) {
        char sname[MDL_ST_MAX_NAME + 16];
        snprintf(sname, sizeof(sname), "%s_scale_inv", name);
        int64_t br = (rows + AFD_FP8_BLOCK - 1) / AFD_FP8_BLOCK;
        int64_t bc = (cols + AFD_FP8_BLOCK - 1) / AFD_FP8_BLOCK;
        int64_t sshape[3];
        int snd = 0;
        if (nexp > 0) sshape[snd++] = nexp;
        sshape[snd++] = br;
        sshape[snd++] = bc;
        const mdl_st_tensor_t *s;
        if ((st = find_tensor(ld, sname, snd, sshape, &s))) return st;
        if (s->dtype != AFD_DTYPE_F32) {
            afd_error("%s: tensor '%s' must be F32", s->file->base, sname);
            return AFD_ERR_FORMAT;
        }
        /* byte arithmetic: the scale tensor need not be 4-byte aligned in its shard */
        src->scale = (const float *)(const void *)(s->data + (size_t)(nexp > 0 ? expert : 0) *
                                                                 (size_t)(br * bc) * 4);
    }
    return AFD_OK;
}

static afd_status_t load_w(loader_t *ld, const char *name, int nexp, int expert, int64_t rows,
                           int64_t cols, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                           kn_weight_t *w)
{
    kn_src_t src;
    afd_status_t st = make_src(ld, name, nexp, expert, rows, cols, r0, nr, c0, nc, &src);
    if (st) return st;
    if ((st = ld->m->be->ops->weight_load(ld->m->be, &src, w))) {
        afd_error("%s: tensor '%s': %s", ld->ck->dir, name, afd_status_str(st));
        return st;
    }
    loader_tick(ld, (uint64_t)(nr * nc) * afd_dtype_size(src.dtype), 0);
    return AFD_OK;
}

static afd_status_t load_full(loader_t *ld, const char *name, int64_t rows, int64_t cols,
                              kn_weight_t *w)
{
    return load_w(ld, name, 0, 0, rows, cols, 0, rows, 0, cols, w);
}

/* A norm vector: float32 in the backend. */
static afd_status_t load_vec(loader_t *ld, const char *name, int64_t n, float **out)
{
    const mdl_st_tensor_t *t;
    afd_status_t st = find_tensor(ld, name, 1, &n, &t);
    if (st) return st;
    if (t->dtype == AFD_DTYPE_E4M3) {
        afd_error("%s: tensor '%s': a norm weight cannot be fp8", t->file->base, name);
        return AFD_ERR_FORMAT;
    }
    float *h = malloc(sizeof(float) * (size_t)n);
    kn_backend_t *be = ld->m->be;
    float *d = be->ops->alloc(be, sizeof(float) * (size_t)n);
    if (!h || !d) {
        free(h);
        if (d) be->ops->free(be, d);
        return AFD_ERR_NOMEM;
    }
    afd_convert_to_f32(t->dtype, t->data, h, (size_t)n);
    be->ops->upload(be, d, h, sizeof(float) * (size_t)n);
    free(h);
    *out = d;
    loader_tick(ld, t->nbytes, 0);
    return AFD_OK;
}

static uint64_t bytes_of(const mdl_ckpt_t *ck, const char *name, double fraction)
{
    const mdl_st_tensor_t *t = mdl_ckpt_find(ck, name);
    return t ? (uint64_t)(t->nbytes * fraction) : 0;
}

static afd_status_t load_attn_layer(loader_t *ld, int l)
{
    const mdl_config_t *c = &ld->m->cfg;
    mdl_attn_layer_t *a = &ld->m->attn[l];
    int64_t H = c->hidden_size, Q = c->share_q_dim, HD = c->head_dim,
            QH = (int64_t)c->num_heads * c->head_dim;
    char n[256];
    afd_status_t st;
#define P(fmt) (snprintf(n, sizeof(n), "model.layers.%d." fmt, l), n)
    if ((st = load_vec(ld, P("input_layernorm.weight"), H, &a->in_norm)) ||
        (st = load_vec(ld, P("self_attn.inter_norm.weight"), Q, &a->inter_norm)) ||
        (st = load_vec(ld, P("post_attention_layernorm.weight"), H, &a->post_norm)) ||
        (st = load_full(ld, P("self_attn.q_proj.weight"), Q, H, &a->q_proj)) ||
        (st = load_full(ld, P("self_attn.wq.weight"), QH, Q, &a->wq)) ||
        (st = load_full(ld, P("self_attn.k_proj.weight"), HD, H, &a->k_proj)) ||
        (st = load_full(ld, P("self_attn.v_proj.weight"), HD, H, &a->v_proj)) ||
        (st = load_full(ld, P("self_attn.o_proj.weight"), H, QH, &a->o_proj)))
        return st;
    if (c->is_moe[l] && (st = load_full(ld, P("moe.gate.weight"), c->num_experts, H, &a->router)))
        return st;
#undef P
    return AFD_OK;
}

static afd_status_t load_ffn_layer(loader_t *ld, int l)
{
    mdl_model_t *m = ld->m;
    const mdl_config_t *c = &m->cfg;
    mdl_ffn_layer_t *f = &m->ffn[l];
    int64_t H = c->hidden_size;
    char n[256];
    afd_status_t st;
    f->is_moe = c->is_moe[l];
    int inter = f->is_moe ? c->share_expert_dim : c->dense_inter;
    const char *pre = f->is_moe ? "share_expert" : "mlp";
    mdl_role_slice(inter, m->role.ffn_index, m->role.ffn_count, &f->i0, &f->i1);
    if (m->role.tp_count > 1) { /* this rank's part of the node's slice */
        int t0, t1;
        mdl_role_slice_aligned(f->i1 - f->i0, m->role.tp_index, m->role.tp_count, AFD_FP8_BLOCK,
                               &t0, &t1);
        f->i1 = f->i0 + t1;
        f->i0 += t0;
    }
    int64_t ni = f->i1 - f->i0;
    if (inter > 0) {
        snprintf(n, sizeof(n), "model.layers.%d.%s.gate_proj.weight", l, pre);
        if ((st = load_w(ld, n, 0, 0, inter, H, f->i0, ni, 0, H, &f->gate))) return st;
        snprintf(n, sizeof(n), "model.layers.%d.%s.up_proj.weight", l, pre);
        if ((st = load_w(ld, n, 0, 0, inter, H, f->i0, ni, 0, H, &f->up))) return st;
        snprintf(n, sizeof(n), "model.layers.%d.%s.down_proj.weight", l, pre);
        if ((st = load_w(ld, n, 0, 0, H, inter, 0, H, f->i0, ni, &f->down))) return st;
    }
    if (!f->is_moe) return AFD_OK;
    mdl_role_experts(c, m->role.ffn_index, m->role.ffn_count, &f->e0, &f->e1);
    int ne = f->e1 - f->e0, I = c->moe_inter, E = c->num_experts;
    f->ei0 = 0;
    f->ei1 = I;
    if (m->role.tp_count > 1)
        mdl_role_slice_aligned(I, m->role.tp_index, m->role.tp_count, AFD_FP8_BLOCK, &f->ei0,
                               &f->ei1);
    int EI = f->ei1 - f->ei0;
    f->egate = calloc((size_t)(ne ? ne : 1), sizeof(kn_weight_t));
    f->eup = calloc((size_t)(ne ? ne : 1), sizeof(kn_weight_t));
    f->edown = calloc((size_t)(ne ? ne : 1), sizeof(kn_weight_t));
    if (!f->egate || !f->eup || !f->edown) return AFD_ERR_NOMEM;
    for (int e = 0; e < ne; e++) {
        int ge = f->e0 + e;
        snprintf(n, sizeof(n), "model.layers.%d.moe.gate_proj.weight", l);
        if ((st = load_w(ld, n, E, ge, I, H, f->ei0, EI, 0, H, &f->egate[e]))) return st;
        snprintf(n, sizeof(n), "model.layers.%d.moe.up_proj.weight", l);
        if ((st = load_w(ld, n, E, ge, I, H, f->ei0, EI, 0, H, &f->eup[e]))) return st;
        snprintf(n, sizeof(n), "model.layers.%d.moe.down_proj.weight", l);
        if ((st = load_w(ld, n, E, ge, H, I, 0, H, f->ei0, EI, &f->edown[e]))) return st;
    }
    return AFD_OK;
}

static uint64_t role_bytes(const mdl_ckpt_t *ck, const mdl_config_t *c, const mdl_role_t *r)
{
    uint64_t b = 0;
    char n[256];
    double share = r->ffn ? 1.0 / r->ffn_count / (r->tp_count > 1 ? r->tp_count : 1) : 0;
    if (r->attn) {
        b += bytes_of(ck, "model.embed_tokens.weight", 1) + bytes_of(ck, "lm_head.weight", 1);
        for (int l = 0; l < c->num_layers; l++) {
            static const char *names[] = {"input_layernorm",
                                          "post_attention_layernorm",
                                          "self_attn.inter_norm",
                                          "self_attn.q_proj",
                                          "self_attn.wq",
                                          "self_attn.k_proj",
                                          "self_attn.v_proj",
                                          "self_attn.o_proj",
                                          "moe.gate"};
            for (int k = 0; k < 9; k++) {
                snprintf(n, sizeof(n), "model.layers.%d.%s.weight", l, names[k]);
                b += bytes_of(ck, n, 1);
            }
        }
    }
    if (r->ffn) {
        for (int l = 0; l < c->num_layers; l++) {
            static const char *names[] = {
                "mlp.gate_proj",          "mlp.up_proj",          "mlp.down_proj",
                "share_expert.gate_proj", "share_expert.up_proj", "share_expert.down_proj",
                "moe.gate_proj",          "moe.up_proj",          "moe.down_proj"};
            for (int k = 0; k < 9; k++) {
                snprintf(n, sizeof(n), "model.layers.%d.%s.weight", l, names[k]);
                b += bytes_of(ck, n, share);
            }
        }
    }
    return b;
}

afd_status_t mdl_model_load(const mdl_ckpt_t *ck, const mdl_config_t *cfg, kn_backend_t *be,
                            const mdl_role_t *role, int progress, mdl_model_t **out)
{
    afd_status_t st;
    if (role->ffn &&
        (role->ffn_count < 1 || role->ffn_index < 0 || role->ffn_index >= role->ffn_count ||
         role->ffn_count > cfg->num_experts || (cfg->num_experts == 0 && role->ffn_count > 1))) {
        afd_error("ffn share %d of %d: needs 0 <= i < n <= moe_num_experts (%d)", role->ffn_index,
                  role->ffn_count, cfg->num_experts);
        return AFD_ERR_RANGE;
    }
    if (role->ffn && role->tp_count > 1) {
        /* every rank needs a non-empty part of every intermediate slice it splits: all of
         * moe_inter, the node's 1/ffn_count of the shared expert and dense MLP */
        int dmin = cfg->moe_inter > 0 ? cfg->moe_inter : INT32_MAX;
        if (cfg->share_expert_dim > 0 && cfg->share_expert_dim / role->ffn_count < dmin)
            dmin = cfg->share_expert_dim / role->ffn_count;
        if (cfg->dense_inter > 0 && cfg->dense_inter / role->ffn_count < dmin)
            dmin = cfg->dense_inter / role->ffn_count;
        if (role->tp_index < 0 || role->tp_index >= role->tp_count || role->tp_count > dmin) {
            afd_error("tensor-parallel rank %d of %d: needs 0 <= i < n <= %d (the smallest "
                      "intermediate slice)",
                      role->tp_index, role->tp_count, dmin);
            return AFD_ERR_RANGE;
        }
    }
    mdl_model_t *m = calloc(1, sizeof(*m));
    if (!m) return AFD_ERR_NOMEM;
    m->cfg = *cfg;
    m->be = be;
    m->role = *role;
    if (!role->ffn) m->role.ffn_count = 1;
    if (m->role.tp_count < 1) {
        m->role.tp_count = 1;
        m->role.tp_index = 0;
    }
    loader_t ld = {.ck = ck, .m = m, .progress = progress, .total = role_bytes(ck, cfg, role)};
    int64_t H = cfg->hidden_size, V = cfg->vocab_size;
    if (role->attn) {
        if (!(m->attn = calloc((size_t)cfg->num_layers, sizeof(*m->attn)))) goto err_nomem;
        if ((st = load_full(&ld, "model.embed_tokens.weight", V, H, &m->embed)) ||
            (st = load_vec(&ld, "model.norm.weight", H, &m->final_norm)) ||
            (st = load_full(&ld, "lm_head.weight", V, H, &m->lm_head)))
            goto err;
        for (int l = 0; l < cfg->num_layers; l++)
            if ((st = load_attn_layer(&ld, l))) goto err;
    }
    if (role->ffn) {
        if (!(m->ffn = calloc((size_t)cfg->num_layers, sizeof(*m->ffn)))) goto err_nomem;
        for (int l = 0; l < cfg->num_layers; l++)
            if ((st = load_ffn_layer(&ld, l))) goto err;
    }
    loader_tick(&ld, 0, 1);
    m->bytes_loaded = ld.done;
    *out = m;
    return AFD_OK;
err_nomem:
    st = AFD_ERR_NOMEM;
err:
    if (progress) fputc('\n', stderr);
    mdl_model_free(m);
    return st;
}

static void wfree(kn_backend_t *be, kn_weight_t *w)
{
    if (w->data) be->ops->weight_free(be, w);
}

void mdl_model_free(mdl_model_t *m)
{
    if (!m) return;
    kn_backend_t *be = m->be;
    wfree(be, &m->embed);
    wfree(be, &m->lm_head);
    if (m->final_norm) be->ops->free(be, m->final_norm);
    for (int l = 0; m->attn && l < m->cfg.num_layers; l++) {
        mdl_attn_layer_t *a = &m->attn[l];
        if (a->in_norm) be->ops->free(be, a->in_norm);
        if (a->inter_norm) be->ops->free(be, a->inter_norm);
        if (a->post_norm) be->ops->free(be, a->post_norm);
        wfree(be, &a->q_proj);
        wfree(be, &a->wq);
        wfree(be, &a->k_proj);
        wfree(be, &a->v_proj);
        wfree(be, &a->o_proj);
        wfree(be, &a->router);
    }
    for (int l = 0; m->ffn && l < m->cfg.num_layers; l++) {
        mdl_ffn_layer_t *f = &m->ffn[l];
        wfree(be, &f->gate);
        wfree(be, &f->up);
        wfree(be, &f->down);
        for (int e = 0; e < f->e1 - f->e0; e++) {
            if (f->egate) wfree(be, &f->egate[e]);
            if (f->eup) wfree(be, &f->eup[e]);
            if (f->edown) wfree(be, &f->edown[e]);
        }
        free(f->egate);
        free(f->eup);
        free(f->edown);
    }
    free(m->attn);
    free(m->ffn);
    free(m);
}

/* ---- workspace ---- */

/* The backend a workspace's work is queued on: its own (a stream of the model's device),
 * else the model's. */
static kn_backend_t *ws_be(const mdl_model_t *m, const mdl_ws_t *ws)
{
    return ws->be ? ws->be : m->be;
}

/* The widest intermediate slice this model's FFN share runs (its expert work buffers). */
static int ws_inter_max(const mdl_model_t *m)
{
    int w = 1;
    for (int l = 0; m->ffn && l < m->cfg.num_layers; l++) {
        const mdl_ffn_layer_t *f = &m->ffn[l];
        if (f->i1 - f->i0 > w) w = f->i1 - f->i0;
        if (f->is_moe && f->e1 > f->e0 && f->ei1 - f->ei0 > w) w = f->ei1 - f->ei0;
    }
    return w;
}

void mdl_ws_free(const mdl_model_t *m, mdl_ws_t *ws)
{
    kn_backend_t *be = ws_be(m, ws);
    void **dev[] = {(void **)&ws->h,   (void **)&ws->ql, (void **)&ws->q,        (void **)&ws->k,
                    (void **)&ws->v,   (void **)&ws->o,  (void **)&ws->logits_r, (void **)&ws->xe,
                    (void **)&ws->ge,  (void **)&ws->ue, (void **)&ws->ye,       (void **)&ws->rows,
                    (void **)&ws->pos, (void **)&ws->rw};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++) {
        if (*dev[i]) be->ops->free(be, *dev[i]);
        *dev[i] = NULL;
    }
    free(ws->h_rows);
    free(ws->h_w);
    free(ws->h_off);
    ws->h_rows = NULL;
    ws->h_w = NULL;
    ws->h_off = NULL;
    ws->cap = 0;
}

afd_status_t mdl_ws_reserve(const mdl_model_t *m, mdl_ws_t *ws, int ntok)
{
    if (ntok <= ws->cap) return AFD_OK;
    mdl_ws_free(m, ws);
    const mdl_config_t *c = &m->cfg;
    kn_backend_t *be = ws_be(m, ws);
    size_t n = (size_t)ntok, H = (size_t)c->hidden_size, QH = (size_t)c->num_heads * c->head_dim;
    size_t k = (size_t)(c->top_k > 0 ? c->top_k : 1);
    size_t E = (size_t)(c->num_experts > 0 ? c->num_experts : 1);
    /* expert work buffers hold every routed row at once (n * k), plus the shared expert's
     * or dense MLP's n rows in ge/ue */
    size_t nk = n * k, I = (size_t)ws_inter_max(m);
    int ok = 1;
#define A(p, bytes) (ok = ok && ((p) = be->ops->alloc(be, (bytes))) != NULL)
    A(ws->rows, 4 * (nk > n ? nk : n));
    if (m->role.attn) {
        A(ws->h, 4 * n * H);
        A(ws->ql, 4 * n * (size_t)c->share_q_dim);
        A(ws->q, 4 * n * QH);
        A(ws->k, 4 * n * (size_t)c->head_dim);
        A(ws->v, 4 * n * (size_t)c->head_dim);
        A(ws->o, 4 * n * QH);
        A(ws->logits_r, 4 * n * E);
        A(ws->pos, 4 * n);
    }
    if (m->role.ffn) {
        A(ws->xe, 4 * nk * H);
        A(ws->ge, 4 * nk * I);
        A(ws->ue, 4 * nk * I);
        A(ws->ye, 4 * nk * H);
        A(ws->rw, 4 * nk);
    }
#undef A
    ws->h_rows = malloc(4 * nk);
    ws->h_w = malloc(4 * nk);
    ws->h_off = malloc(4 * (E + 1));
    if (!ok || !ws->h_rows || !ws->h_w || !ws->h_off) {
        mdl_ws_free(m, ws);
        return AFD_ERR_NOMEM;
    }
    ws->cap = ntok;
    return AFD_OK;
}

/* ---- forward pieces ---- */

void mdl_embed(const mdl_model_t *m, mdl_ws_t *ws, const mdl_batch_t *b, float *x)
{
    kn_backend_t *be = ws_be(m, ws);
    AFD_ASSERT(b->ntok <= ws->cap);
    be->ops->upload(be, ws->rows, b->tokens, sizeof(int32_t) * (size_t)b->ntok);
    be->ops->embed(be, &m->embed, ws->rows, b->ntok, x);
}

int mdl_attn_prepare(const mdl_model_t *m, mdl_ws_t *ws, const kn_kv_t *kv, mdl_batch_t *b,
                     uint64_t *shape)
{
    kn_backend_t *be = ws_be(m, ws);
    AFD_ASSERT(b->ntok <= ws->cap);
    *shape = 0;
    if (b->ntok > 0) be->ops->upload(be, ws->pos, b->pos, sizeof(int32_t) * (size_t)b->ntok);
    b->prepared = 1;
    if (!be->ops->batch_prepare || b->ntok <= 0) return 0;
    return be->ops->batch_prepare(be, kv, b->seqs, b->nseq, m->cfg.num_heads, shape);
}

void mdl_attn(const mdl_model_t *m, mdl_ws_t *ws, int layer, const kn_kv_t *kv,
              const mdl_batch_t *b, float *x, float *g, int32_t *ids, float *weights)
{
    const mdl_config_t *c = &m->cfg;
    const mdl_attn_layer_t *a = &m->attn[layer];
    kn_backend_t *be = ws_be(m, ws);
    const kn_ops_t *op = be->ops;
    int n = b->ntok, H = c->hidden_size, HD = c->head_dim, NH = c->num_heads;
    AFD_ASSERT(n <= ws->cap);
    if (n == 0) return;
    op->rmsnorm(be, x, n, H, a->in_norm, c->rms_eps, ws->h);
    op->matmul(be, ws->h, n, &a->q_proj, ws->ql, 0);
    op->rmsnorm(be, ws->ql, n, c->share_q_dim, a->inter_norm, c->rms_eps, ws->ql);
    op->matmul(be, ws->ql, n, &a->wq, ws->q, 0);
    op->matmul(be, ws->h, n, &a->k_proj, ws->k, 0);
    op->matmul(be, ws->h, n, &a->v_proj, ws->v, 0);
    if (!b->prepared) op->upload(be, ws->pos, b->pos, sizeof(int32_t) * (size_t)n);
    op->rope(be, ws->q, n, NH, HD, ws->pos, c->rope_theta);
    op->rope(be, ws->k, n, 1, HD, ws->pos, c->rope_theta);
    float scale = 1.0f / sqrtf((float)HD);
    if (op->kv_write_batch && op->attention_batch) { /* the sequences' caches are disjoint */
        op->kv_write_batch(be, kv, layer, b->seqs, b->nseq, ws->k, ws->v);
        op->attention_batch(be, kv, layer, b->seqs, b->nseq, ws->q, NH, scale, ws->o);
    } else {
        size_t off = 0;
        for (int s = 0; s < b->nseq; s++) {
            const kn_seq_t *sq = &b->seqs[s];
            op->kv_write(be, kv, layer, sq, ws->k + off * HD, ws->v + off * HD);
            op->attention(be, kv, layer, sq, ws->q + off * NH * HD, NH, scale,
                          ws->o + off * NH * HD);
            off += (size_t)sq->ntok;
        }
        AFD_ASSERT((int)off == n);
    }
    op->matmul(be, ws->o, n, &a->o_proj, x, 1); /* residual: x += o_proj(o) */
    op->rmsnorm(be, x, n, H, a->post_norm, c->rms_eps, g);
    if (c->is_moe[layer]) {
        op->matmul(be, g, n, &a->router, ws->logits_r, 0);
        op->router_topk(be, ws->logits_r, n, c->num_experts, c->top_k, c->norm_expert_weight, ids,
                        weights);
    }
}

/* out (+)= down(silu(gate x) * up x) over n rows; ge, ue: (n, gate rows) scratch */
static void mlp(kn_backend_t *be, const kn_weight_t *gate, const kn_weight_t *up,
                const kn_weight_t *down, const float *x, int n, float *ge, float *ue, float *out,
                int accumulate)
{
    size_t ni = (size_t)gate->rows;
    be->ops->matmul(be, x, n, gate, ge, 0);
    be->ops->matmul(be, x, n, up, ue, 0);
    be->ops->swiglu(be, ge, ue, (size_t)n * ni, ge);
    be->ops->matmul(be, ge, n, down, out, accumulate);
}

void mdl_ffn(const mdl_model_t *m, mdl_ws_t *ws, int layer, const float *g, int n,
             const int32_t *ids, const float *weights, float *out)
{
    const mdl_config_t *c = &m->cfg;
    const mdl_ffn_layer_t *f = &m->ffn[layer];
    kn_backend_t *be = ws_be(m, ws);
    int H = c->hidden_size;
    AFD_ASSERT(n <= ws->cap);
    if (n == 0) return;
    if (f->i1 > f->i0)
        mlp(be, &f->gate, &f->up, &f->down, g, n, ws->ge, ws->ue, out, 0);
    else
        be->ops->zero(be, out, sizeof(float) * (size_t)n * H);
    if (!f->is_moe || f->e1 <= f->e0) return;
    /* the routed rows sorted by local expert: one upload, one gather and one scatter for
     * the layer, and each expert's GEMMs over its contiguous segment. ids were checked
     * against num_experts by whoever produced them (the router, the A2F unpacking). */
    int ne = f->e1 - f->e0;
    afd_status_t st = kn_moe_group(ids, weights, n, c->top_k, c->num_experts, f->e0, f->e1,
                                   ws->h_off, ws->h_rows, ws->h_w);
    AFD_ASSERT(st == AFD_OK);
    int total = ws->h_off[ne];
    if (!total) return;
    be->ops->upload(be, ws->rows, ws->h_rows, sizeof(int32_t) * (size_t)total);
    be->ops->upload(be, ws->rw, ws->h_w, sizeof(float) * (size_t)total);
    be->ops->gather(be, g, H, ws->rows, total, ws->xe);
    size_t ni = (size_t)(f->ei1 - f->ei0);
    if (be->ops->matmul_segments) {
        /* a device: each projection of every expert in one segmented call (a few launches
         * for the layer), one SwiGLU over all rows */
        be->ops->matmul_segments(be, ws->xe, ws->h_off, ne, f->egate, ws->ge);
        be->ops->matmul_segments(be, ws->xe, ws->h_off, ne, f->eup, ws->ue);
        be->ops->swiglu(be, ws->ge, ws->ue, (size_t)total * ni, ws->ge);
        be->ops->matmul_segments(be, ws->ge, ws->h_off, ne, f->edown, ws->ye);
    } else {
        /* the cpu: expert by expert, so that each one's intermediate rows stay in cache
         * between its GEMMs */
        for (int e = 0; e < ne; e++) {
            size_t o = (size_t)ws->h_off[e];
            int cnt = ws->h_off[e + 1] - ws->h_off[e];
            if (cnt)
                mlp(be, &f->egate[e], &f->eup[e], &f->edown[e], ws->xe + o * H, cnt, ws->ge, ws->ue,
                    ws->ye + o * H, 0);
        }
    }
    be->ops->scatter_add(be, out, H, ws->rows, ws->rw, total, ws->ye);
}

void mdl_final(const mdl_model_t *m, mdl_ws_t *ws, const float *x, const int32_t *rows, int nrows,
               float *logits)
{
    const mdl_config_t *c = &m->cfg;
    kn_backend_t *be = ws_be(m, ws);
    AFD_ASSERT(nrows <= ws->cap);
    be->ops->upload(be, ws->rows, rows, sizeof(int32_t) * (size_t)nrows);
    be->ops->gather(be, x, c->hidden_size, ws->rows, nrows, ws->h);
    be->ops->rmsnorm(be, ws->h, nrows, c->hidden_size, m->final_norm, c->rms_eps, ws->h);
    be->ops->matmul(be, ws->h, nrows, &m->lm_head, logits, 0);
}
