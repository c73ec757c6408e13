/* kn_backend: backend selection by name. The cuda backend registers itself when built. */
#include "kn_ops.h"
#include "afd_log.h"

#include <stdlib.h>
#include <string.h>

/* Defined by the cuda backend when it is linked in (CUDA=1); weak so the CPU build links. */
afd_status_t kn_cuda_create(int threads, int device, kn_backend_t **out) __attribute__((weak));

afd_status_t kn_backend_create_on(const char *name, int threads, int device, kn_backend_t **out)
{
    if (!name || !strcmp(name, "cpu")) return kn_cpu_create(threads, out);
    if (!strcmp(name, "cpu-dev")) return kn_cpu_dev_create(threads, out);
    if (!strcmp(name, "cuda")) {
        if (!kn_cuda_create) {
            afd_error("backend cuda: this build has no CUDA support (build with CUDA=1)");
            return AFD_ERR_UNSUPPORTED;
        }
        return kn_cuda_create(threads, device, out);
    }
    afd_error("unknown backend '%s' (cpu, cuda, or cpu-dev for tests)", name);
    return AFD_ERR_INVALID;
}

afd_status_t kn_backend_create(const char *name, int threads, kn_backend_t **out)
{
    return kn_backend_create_on(name, threads, KN_DEVICE_DEFAULT, out);
}

void *kn_host_alloc(kn_backend_t *be, size_t bytes)
{
    if (be->ops->host_alloc) return be->ops->host_alloc(be, bytes ? bytes : 1);
    return malloc(bytes ? bytes : 1);
}

void *kn_host_alloc_cb(void *be, size_t bytes)
{
    return kn_host_alloc(be, bytes);
}

void kn_host_free_cb(void *be, void *p)
{
    kn_host_free(be, p);
}

void kn_host_free(kn_backend_t *be, void *p)
{
    if (!p) return;
    if (be->ops->host_free)
        be->ops->host_free(be, p);
    else
        free(p);
}

/* ---- queues and events ---- */

kn_backend_t *kn_fork(kn_backend_t *be)
{
    return be->ops->fork ? be->ops->fork(be) : NULL;
}

void kn_download_async(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (be->ops->download_async)
        be->ops->download_async(be, dst, src, bytes);
    else
        be->ops->download(be, dst, src, bytes);
}

void kn_copy(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes) return;
    if (be->ops->copy) {
        be->ops->copy(be, dst, src, bytes);
        return;
    }
    AFD_ASSERT(be->ops->host_memory);
    memmove(dst, src, bytes);
}

void *kn_event_new(kn_backend_t *be)
{
    return be->ops->event_new ? be->ops->event_new(be) : NULL;
}

void kn_event_record(kn_backend_t *be, void *ev)
{
    if (ev && be->ops->event_record) be->ops->event_record(be, ev);
}

int kn_event_done(kn_backend_t *be, void *ev)
{
    return ev && be->ops->event_done ? be->ops->event_done(be, ev) : 1;
}

void kn_event_free(kn_backend_t *be, void *ev)
{
    if (ev && be->ops->event_free) be->ops->event_free(be, ev);
}

/* ---- packed rows ---- */

void kn_rows_encode(kn_backend_t *be, afd_dtype_t dt, const float *x, int rows, int dim, void *dst)
{
    if (rows <= 0 || dim <= 0) return;
    if (be->ops->rows_encode) {
        be->ops->rows_encode(be, dt, x, rows, dim, dst);
        return;
    }
    AFD_ASSERT(be->ops->host_memory);
    afd_rows_encode(dt, x, (size_t)rows, (size_t)dim, dst);
}

void kn_rows_decode(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim, float *x)
{
    if (rows <= 0 || dim <= 0) return;
    if (be->ops->rows_decode) {
        be->ops->rows_decode(be, dt, src, rows, dim, x);
        return;
    }
    AFD_ASSERT(be->ops->host_memory);
    afd_rows_decode(dt, src, (size_t)rows, (size_t)dim, x);
}

void kn_rows_add(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim, float *y)
{
    if (rows <= 0 || dim <= 0) return;
    if (be->ops->rows_add) {
        be->ops->rows_add(be, dt, src, rows, dim, y);
        return;
    }
    AFD_ASSERT(be->ops->host_memory);
    afd_rows_add(dt, src, (size_t)rows, (size_t)dim, y);
}

/* ---- tensor-parallel groups ---- */

afd_status_t kn_group_create(const char *name, int threads, int n, const int *devices,
                             kn_group_t **out)
{
    *out = NULL;
    if (n < 1 || n > KN_GROUP_MAX) {
        afd_error("a tensor-parallel group has 1..%d ranks, not %d", KN_GROUP_MAX, n);
        return AFD_ERR_RANGE;
    }
    kn_group_t *g = calloc(1, sizeof(*g));
    if (!g) return AFD_ERR_NOMEM;
    afd_status_t st = AFD_OK;
    for (int i = 0; i < n && !st; i++) {
        st = kn_backend_create_on(name, threads, devices ? devices[i] : KN_DEVICE_NEXT(i),
                                  &g->rank[i]);
        if (!st) g->n = i + 1;
    }
    if (!st && n > 1 && g->rank[0]->ops->group_open)
        st = g->rank[0]->ops->group_open(g->rank, n, &g->impl);
    if (!st && n > 1 && !g->rank[0]->ops->group_open && !g->rank[0]->ops->host_memory) {
        afd_error("backend %s: no tensor-parallel groups", g->rank[0]->ops->name);
        st = AFD_ERR_UNSUPPORTED;
    }
    if (st) {
        kn_group_destroy(g);
        return st;
    }
    *out = g;
    return AFD_OK;
}

void kn_group_reduce(kn_group_t *g, float *const *bufs, size_t count)
{
    if (g->n < 2 || !count) return;
    kn_backend_t *be = g->rank[0];
    if (g->impl) {
        be->ops->group_reduce(g->impl, bufs, count);
        return;
    }
    /* host memory: every rank's buffer is readable from rank 0 */
    for (int i = 1; i < g->n; i++)
        be->ops->add(be, bufs[0], bufs[i], count);
}

void kn_group_bcast(kn_group_t *g, void *const *bufs, size_t bytes)
{
    if (g->n < 2 || !bytes) return;
    kn_backend_t *be = g->rank[0];
    if (g->impl && be->ops->group_bcast) {
        be->ops->group_bcast(g->impl, bufs, bytes);
        return;
    }
    /* host memory (the cpu backends): plain copies */
    for (int i = 1; i < g->n; i++)
        if (bufs[i] != bufs[0]) memcpy(bufs[i], bufs[0], bytes);
}

void kn_group_destroy(kn_group_t *g)
{
    if (!g) return;
    if (g->impl) g->rank[0]->ops->group_close(g->impl);
    for (int i = g->n - 1; i >= 0; i--)
        g->rank[i]->ops->destroy(g->rank[i]);
    free(g);
}

afd_status_t kn_moe_group(const int32_t *ids, const float *weights, int n, int k, int nexp, int e0,
                          int e1, int32_t *offsets, int32_t *rows, float *rw)
{
    if (n < 0 || k < 0 || e0 < 0 || e1 < e0 || e1 > nexp) return AFD_ERR_INVALID;
    int ne = e1 - e0;
    for (int e = 0; e <= ne; e++)
        offsets[e] = 0;
    size_t slots = (size_t)n * (size_t)k;
    /* counting sort: counts, then prefix sums, then a stable placement */
    for (size_t i = 0; i < slots; i++) {
        int id = ids[i];
        if (id < 0 || id >= nexp) return AFD_ERR_RANGE;
        if (id >= e0 && id < e1) offsets[id - e0 + 1]++;
    }
    for (int e = 0; e < ne; e++)
        offsets[e + 1] += offsets[e];
    /* offsets[e] doubles as the insertion cursor; restored below */
    for (size_t i = 0; i < slots; i++) {
        int id = ids[i];
        if (id < e0 || id >= e1) continue;
        int32_t at = offsets[id - e0]++;
        rows[at] = (int32_t)(i / (size_t)k);
        rw[at] = weights[i];
    }
    for (int e = ne; e > 0; e--)
        offsets[e] = offsets[e - 1];
    offsets[0] = 0;
    return AFD_OK;
}
