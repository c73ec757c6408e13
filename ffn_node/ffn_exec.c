/* ffn_exec: an FFN share on tensor-parallel ranks, with host staging for device backends. */
#include "ffn_exec.h"
#include "afd_log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void rank_run(ffn_exec_t *x, int i, int layer, int n)
{
    kn_backend_t *be = x->grp->rank[i];
    if (be->ops->host_memory) {
        mdl_ffn(x->m[i], &x->ws[i], layer, x->g[0], n, x->ids, x->wts, x->out[i]);
        return;
    }
    for (int s = 0; s < x->nslice; s++) /* this rank's copy of the slices, unpacked */
        kn_rows_decode(be, x->slice_dt[s], (uint8_t *)x->d_in[i] + x->slice_at[s], x->slice_ntok[s],
                       x->hidden, x->g[i] + (size_t)x->slice_off[s] * (size_t)x->hidden);
    mdl_ffn(x->m[i], &x->ws[i], layer, x->g[i], n, x->ids, x->wts, x->out[i]);
}

static void *rank_main(void *arg)
{
    ffn_rank_arg_t *ra = arg;
    ffn_exec_t *x = ra->x;
    unsigned seen = 0;
    pthread_mutex_lock(&x->mu);
    for (;;) {
        while (x->gen == seen && !x->quit)
            pthread_cond_wait(&x->go, &x->mu);
        if (x->quit) break;
        seen = x->gen;
        int layer = x->job_layer, n = x->job_n;
        pthread_mutex_unlock(&x->mu);
        rank_run(x, ra->rank, layer, n);
        pthread_mutex_lock(&x->mu);
        if (--x->pending == 0) pthread_cond_signal(&x->done);
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

afd_status_t ffn_exec_open(ffn_exec_t *x, const char *backend, int threads, int tp,
                           const int *devices)
{
    memset(x, 0, sizeof(*x));
    afd_status_t st = kn_group_create(backend, threads, tp, devices, &x->grp);
    if (st) return st;
    x->tp = tp;
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->go, NULL);
    pthread_cond_init(&x->done, NULL);
    for (int i = 1; i < tp; i++) {
        x->arg[i] = (ffn_rank_arg_t){x, i};
        if (pthread_create(&x->th[i], NULL, rank_main, &x->arg[i])) {
            afd_error("tensor-parallel rank %d: no thread", i);
            ffn_exec_close(x);
            return AFD_ERR_NOMEM;
        }
        x->nth = i;
    }
    return AFD_OK;
}

static int host_backend(const ffn_exec_t *x)
{
    return x->grp->rank[0]->ops->host_memory;
}

static void buffers_free(ffn_exec_t *x)
{
    for (int i = 0; i < x->tp; i++) {
        kn_backend_t *be = x->grp->rank[i];
        if (x->m[i]) mdl_ws_free(x->m[i], &x->ws[i]);
        if (x->g[i]) be->ops->free(be, x->g[i]);
        if (x->out[i]) be->ops->free(be, x->out[i]);
        if (x->d_in[i]) be->ops->free(be, x->d_in[i]);
        x->g[i] = x->out[i] = NULL;
        x->d_in[i] = NULL;
    }
    if (x->d_out) x->grp->rank[0]->ops->free(x->grp->rank[0], x->d_out);
    x->d_out = NULL;
    free(x->ids);
    free(x->wts);
    x->ids = NULL;
    x->wts = NULL;
    x->cap = 0;
    x->nslice = 0;
    x->in_bytes = 0;
}

afd_status_t ffn_exec_load(ffn_exec_t *x, const mdl_ckpt_t *ck, const mdl_config_t *cfg,
                           const mdl_role_t *role, int progress)
{
    ffn_exec_unload(x);
    x->hidden = cfg->hidden_size;
    x->topk = cfg->top_k > 0 ? cfg->top_k : 1;
    for (int i = 0; i < x->tp; i++) {
        mdl_role_t r = *role;
        r.tp_index = i;
        r.tp_count = x->tp;
        afd_status_t st = mdl_model_load(ck, cfg, x->grp->rank[i], &r, progress, &x->m[i]);
        if (st) {
            if (x->tp > 1) afd_error("tensor-parallel rank %d of %d: loading failed", i, x->tp);
            ffn_exec_unload(x);
            return st;
        }
    }
    return AFD_OK;
}

void ffn_exec_unload(ffn_exec_t *x)
{
    if (!x->grp) return;
    buffers_free(x);
    for (int i = 0; i < x->tp; i++) {
        mdl_model_free(x->m[i]);
        x->m[i] = NULL;
    }
}

afd_status_t ffn_exec_reserve(ffn_exec_t *x, int n)
{
    if (n <= x->cap) return AFD_OK;
    buffers_free(x);
    /* packed rows take at most 4 bytes per value (f32; e4m3 with its scales takes less) */
    size_t rows = (size_t)n * (size_t)x->hidden * sizeof(float);
    int host = host_backend(x), ok = 1;
    for (int i = 0; i < x->tp && ok; i++) {
        kn_backend_t *be = x->grp->rank[i];
        /* host-memory ranks all read rank 0's input rows */
        if (i == 0 || !host) ok = (x->g[i] = be->ops->alloc(be, rows)) != NULL;
        ok = ok && (x->out[i] = be->ops->alloc(be, rows)) != NULL;
        if (!host) /* packed slices, each starting 16-byte aligned */
            ok = ok && (x->d_in[i] = be->ops->alloc(be, rows + 16 * FFN_EXEC_MAX_SLICES)) != NULL;
        ok = ok && mdl_ws_reserve(x->m[i], &x->ws[i], n) == AFD_OK;
    }
    if (ok && !host) ok = (x->d_out = x->grp->rank[0]->ops->alloc(x->grp->rank[0], rows)) != NULL;
    x->ids = malloc(sizeof(int32_t) * (size_t)n * (size_t)x->topk);
    x->wts = malloc(sizeof(float) * (size_t)n * (size_t)x->topk);
    if (!ok || !x->ids || !x->wts) {
        buffers_free(x);
        return AFD_ERR_NOMEM;
    }
    x->cap = n;
    return AFD_OK;
}

void ffn_exec_put_rows(ffn_exec_t *x, int off, const void *src, int ntok, afd_dtype_t dt)
{
    AFD_ASSERT(off >= 0 && ntok >= 0 && off + ntok <= x->cap);
    if (!ntok) return;
    size_t at = (size_t)off * (size_t)x->hidden;
    if (host_backend(x)) {
        kn_rows_decode(x->grp->rank[0], dt, src, ntok, x->hidden, x->g[0] + at);
        return;
    }
    AFD_ASSERT(x->nslice < FFN_EXEC_MAX_SLICES);
    size_t rb = afd_rows_bytes(dt, (size_t)ntok, (size_t)x->hidden);
    kn_backend_t *be = x->grp->rank[0];
    be->ops->upload(be, (uint8_t *)x->d_in[0] + x->in_bytes, src, rb);
    int s = x->nslice++;
    x->slice_off[s] = off;
    x->slice_ntok[s] = ntok;
    x->slice_dt[s] = dt;
    x->slice_at[s] = x->in_bytes;
    x->in_bytes += (rb + 15) & ~(size_t)15;
}

void ffn_exec_run(ffn_exec_t *x, int layer, int n)
{
    AFD_ASSERT(n <= x->cap);
    if (!host_backend(x) && x->tp > 1 && x->in_bytes) /* the slices to every rank */
        kn_group_bcast(x->grp, x->d_in, x->in_bytes);
    /* every rank queues its work on its own thread; rank 0 on this one */
    pthread_mutex_lock(&x->mu);
    x->job_layer = layer;
    x->job_n = n;
    x->pending = x->nth;
    x->gen++;
    pthread_cond_broadcast(&x->go);
    pthread_mutex_unlock(&x->mu);
    rank_run(x, 0, layer, n);
    pthread_mutex_lock(&x->mu);
    while (x->pending > 0)
        pthread_cond_wait(&x->done, &x->mu);
    pthread_mutex_unlock(&x->mu);
    kn_group_reduce(x->grp, x->out, (size_t)n * (size_t)x->hidden);
    x->nslice = 0;
    x->in_bytes = 0;
}

void ffn_exec_get_rows(ffn_exec_t *x, int off, int ntok, afd_dtype_t dt, void *dst)
{
    AFD_ASSERT(off >= 0 && ntok >= 0 && off + ntok <= x->cap);
    if (!ntok) return;
    kn_backend_t *be = x->grp->rank[0];
    size_t at = (size_t)off * (size_t)x->hidden;
    if (host_backend(x)) {
        kn_rows_encode(be, dt, x->out[0] + at, ntok, x->hidden, dst);
        return;
    }
    uint8_t *stage = (uint8_t *)x->d_out + at * sizeof(float);
    kn_rows_encode(be, dt, x->out[0] + at, ntok, x->hidden, stage);
    kn_download_async(be, dst, stage, afd_rows_bytes(dt, (size_t)ntok, (size_t)x->hidden));
}

void ffn_exec_get_rows_device(ffn_exec_t *x, int off, int ntok, afd_dtype_t dt, void *dst)
{
    AFD_ASSERT(off >= 0 && ntok >= 0 && off + ntok <= x->cap && !host_backend(x));
    if (!ntok) return;
    kn_rows_encode(x->grp->rank[0], dt, x->out[0] + (size_t)off * (size_t)x->hidden, ntok,
                   x->hidden, dst);
}

void *ffn_exec_dev_alloc(ffn_exec_t *x, size_t bytes)
{
    kn_backend_t *be = x->grp->rank[0];
    return be->ops->alloc(be, bytes);
}

void ffn_exec_dev_free(ffn_exec_t *x, void *p)
{
    kn_backend_t *be = x->grp->rank[0];
    if (p) be->ops->free(be, p);
}

void ffn_exec_wait(ffn_exec_t *x)
{
    kn_backend_t *be = x->grp->rank[0];
    be->ops->sync(be);
}

uint64_t ffn_exec_bytes(const ffn_exec_t *x)
{
    uint64_t b = 0;
    for (int i = 0; i < x->tp; i++)
        if (x->m[i]) b += x->m[i]->bytes_loaded;
    return b;
}

void ffn_exec_close(ffn_exec_t *x)
{
    if (!x->grp) return;
    pthread_mutex_lock(&x->mu);
    x->quit = 1;
    pthread_cond_broadcast(&x->go);
    pthread_mutex_unlock(&x->mu);
    for (int i = 1; i <= x->nth; i++)
        pthread_join(x->th[i], NULL);
    x->nth = 0;
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->go);
    pthread_cond_destroy(&x->done);
    ffn_exec_unload(x);
    kn_group_destroy(x->grp);
    x->grp = NULL;
}

int ffn_parse_devices(const char *s, int *devices, char *why, size_t why_len)
{
    int n = 0;
    const char *p = s;
    if (!s || !*s) {
        snprintf(why, why_len, "an empty device list");
        return -1;
    }
    while (*p) {
        if (n == KN_GROUP_MAX) {
            snprintf(why, why_len, "more than %d devices", KN_GROUP_MAX);
            return -1;
        }
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 1023 || (*end && *end != ',')) {
            snprintf(why, why_len, "'%s' is not a list of device indices (0..1023)", s);
            return -1;
        }
        devices[n++] = (int)v;
        p = *end ? end + 1 : end;
        if (*end == ',' && !*p) {
            snprintf(why, why_len, "'%s' ends with a comma", s);
            return -1;
        }
    }
    return n;
}
