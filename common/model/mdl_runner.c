/* mdl_runner: the monolithic forward step used by afd_run and the tests. */
#include "mdl_runner.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void runner_free_bufs(mdl_runner_t *r)
{
    kn_backend_t *be = r->m->be;
    if (r->x) be->ops->free(be, r->x);
    if (r->g) be->ops->free(be, r->g);
    if (r->part) be->ops->free(be, r->part);
    if (r->ids) be->ops->free(be, r->ids);
    if (r->wts) be->ops->free(be, r->wts);
    free(r->h_ids);
    free(r->h_wts);
    r->x = r->g = r->part = r->wts = NULL;
    r->ids = NULL;
    r->h_ids = NULL;
    r->h_wts = NULL;
    r->cap = 0;
}

static afd_status_t runner_reserve(mdl_runner_t *r, int n)
{
    if (n <= r->cap) return AFD_OK;
    runner_free_bufs(r);
    kn_backend_t *be = r->m->be;
    size_t H = (size_t)r->m->cfg.hidden_size, k = (size_t)(r->m->cfg.top_k ? r->m->cfg.top_k : 1);
    r->x = be->ops->alloc(be, 4 * (size_t)n * H);
    r->g = be->ops->alloc(be, 4 * (size_t)n * H);
    r->part = be->ops->alloc(be, 4 * (size_t)n * H);
    r->ids = be->ops->alloc(be, 4 * (size_t)n * k);
    r->wts = be->ops->alloc(be, 4 * (size_t)n * k);
    r->h_ids = malloc(4 * (size_t)n * k);
    r->h_wts = malloc(4 * (size_t)n * k);
    if (!r->x || !r->g || !r->part || !r->ids || !r->wts || !r->h_ids || !r->h_wts) {
        runner_free_bufs(r);
        return AFD_ERR_NOMEM;
    }
    r->cap = n;
    return mdl_ws_reserve(r->m, &r->ws, n);
}

afd_status_t mdl_runner_init(mdl_runner_t *r, const mdl_model_t *m, afd_dtype_t a2f,
                             afd_dtype_t f2a)
{
    memset(r, 0, sizeof(*r));
    if (!m->role.attn || !m->role.ffn || m->role.ffn_count != 1) return AFD_ERR_INVALID;
    r->m = m;
    r->a2f = a2f;
    r->f2a = f2a;
    return AFD_OK;
}

void mdl_runner_fini(mdl_runner_t *r)
{
    if (!r->m) return;
    runner_free_bufs(r);
    mdl_ws_free(r->m, &r->ws);
}

afd_status_t mdl_runner_step(mdl_runner_t *r, const kn_kv_t *kv, const mdl_batch_t *b,
                             const int32_t *rows, int nrows, float *logits)
{
    const mdl_model_t *m = r->m;
    kn_backend_t *be = m->be;
    const mdl_config_t *c = &m->cfg;
    int n = b->ntok, H = c->hidden_size, k = c->top_k;
    afd_status_t st = runner_reserve(r, n);
    if (st) return st;
    mdl_embed(m, &r->ws, b, r->x);
    for (int l = 0; l < c->num_layers; l++) {
        double t0 = now_s();
        mdl_attn(m, &r->ws, l, kv, b, r->x, r->g, r->ids, r->wts);
        double t1 = now_s();
        r->attn_s += t1 - t0;
        be->ops->round(be, r->g, n, H, r->a2f);
        if (c->is_moe[l]) {
            be->ops->download(be, r->h_ids, r->ids, sizeof(int32_t) * (size_t)n * k);
            be->ops->download(be, r->h_wts, r->wts, sizeof(float) * (size_t)n * k);
        }
        mdl_ffn(m, &r->ws, l, r->g, n, r->h_ids, r->h_wts, r->part);
        be->ops->round(be, r->part, n, H, r->f2a);
        be->ops->add(be, r->x, r->part, (size_t)n * H);
        r->ffn_s += now_s() - t1;
    }
    float *dl = logits;
    /* logits land in backend memory first when the backend is not the host */
    if (!be->ops->host_memory) {
        dl = be->ops->alloc(be, sizeof(float) * (size_t)nrows * c->vocab_size);
        if (!dl) return AFD_ERR_NOMEM;
    }
    mdl_final(m, &r->ws, r->x, rows, nrows, dl);
    if (dl != logits) {
        be->ops->download(be, logits, dl, sizeof(float) * (size_t)nrows * c->vocab_size);
        be->ops->free(be, dl);
    }
    be->ops->sync(be);
    return AFD_OK;
}
