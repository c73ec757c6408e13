/*
 * kn_cuda: the cuda backend's ops table. Activations are float32 in device memory, as
 * the ops table says; weights are bf16, or e4m3 with their 128x128 block scales when
 * the device's block-scaled fp8 GEMM passed the start-up probe (else fp8 checkpoints
 * are dequantised to bf16 at load: the documented fallback). GEMMs go through
 * cuBLASLt (kn_cuda_gemm), everything else through the kernels of kn_cuda_kernels.h,
 * all on one stream. Per-op temporaries come from one device arena that grows to its
 * high-water mark and is then reused, and freed buffers are kept for reuse by size,
 * so a steady decode step allocates nothing.
 *
 * A failed launch or a device error is a broken device, not bad input: it is logged
 * with the CUDA error and the process aborts.
 */
#include "kn_cuda.h"
#include "kn_cuda_gemm.h"
#include "kn_cuda_host.h"
#include "kn_cuda_kernels.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KN_CACHE_MAX      32
#define KN_CACHE_MAX_SIZE ((size_t)256 << 20)
#define KN_GEMM_WS        ((size_t)32 << 20)
#define KN_ARENA_INITIAL  ((size_t)64 << 20)
#define KN_SEG_REDO_MAX   64 /* segments of one call redone alone, tracked one by one */

typedef struct kn_cu_block {
    void *p;
    size_t bytes;
} kn_cu_block_t;

typedef struct kn_cuda {
    kn_backend_t base;
    int device, num_sms;
    cudaStream_t stream;
    kn_gemm_t *gemm;
    int fp8_native;                    /* block-scaled fp8 GEMM verified at start */
    kn_scale_order_t order_w, order_x; /* its scale layouts (weights, activations) */
    void *arena_mem;                   /* per-op temporaries */
    kn_arena_t arena;
    kn_cu_block_t *live; /* alloc'd buffers and their sizes */
    int nlive, live_cap;
    kn_cu_block_t cache[KN_CACHE_MAX]; /* freed buffers kept for reuse */
    int ncache;
    int warned_fp8_shape;
    int attn_tc;     /* decode attention on the tensor cores (AFD_CUDA_ATTN=tc) */
    int moe_grouped; /* bf16 expert GEMMs in one launch (AFD_CUDA_MOE=grouped) */
    void *hbuf;      /* host (pageable) scratch for per-call tables: copied when queued */
    size_t hbuf_cap;
    /* graphs (AFD_CUDA_GRAPHS=1): whether enabled, a recording in progress and whether
     * it holds something it could not record; generations of the memory graphs refer
     * to (the arena, the prepared tables), bumped when it is replaced */
    int graphs, capturing, capture_bad;
    uint64_t arena_gen;
    /* the tables of the batch batch_prepare was last given (valid when ok) */
    struct {
        const kn_seq_t *seqs;
        int nseq, ok, stride, nheads;
        kn_attn_plan_t plan;
        int64_t *slots; /* (nseq) layer-relative cache slots */
        int32_t *bt;    /* (nseq, stride) block tables */
        int32_t *len;   /* (nseq) context lengths */
        int cap;        /* nseq the buffers hold */
        size_t bt_cap;  /* int32 the block-table buffer holds */
        uint64_t gen;   /* bumped when the buffers are replaced */
    } prep;
} kn_cuda_t;

/* what a weight's aux points at */
typedef struct kn_cu_weight {
    int fp8;         /* data is e4m3 (rows, cols); else bf16 (rows, cols) */
    float *scale;    /* fp8: block scales in the GEMM's order */
    float *scale_rm; /* fp8: the same, row-major (rows/128, cols/128), for dequantising */
} kn_cu_weight_t;

static const kn_cuda_env_t *g_env;

__attribute__((format(printf, 2, 3))) static void cu_log(int level, const char *fmt, ...)
{
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (g_env && g_env->log)
        g_env->log(level, buf);
    else
        fprintf(stderr, "%s\n", buf);
}

#define LOG_ERROR 0
#define LOG_WARN  1
#define LOG_INFO  2

static void cu_fail(const char *what, const char *err, const char *file, int line)
{
    cu_log(LOG_ERROR, "backend cuda: %s failed: %s (%s:%d)", what, err, file, line);
    abort();
}

#define CU_CHECK(call)                                                                             \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) cu_fail(#call, cudaGetErrorString(e_), __FILE__, __LINE__);         \
    } while (0)

#define CU_ASSERT(cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) cu_fail("check", #cond, __FILE__, __LINE__);                                  \
    } while (0)

/* Set once backends on two devices are open in this process: every op then makes its
 * backend's device current first (a thread may drive several devices). */
static int g_multi_device = -2; /* -2: none open yet; else the one device, or -1: several */

static kn_cuda_t *cu(kn_backend_t *be)
{
    kn_cuda_t *c = (kn_cuda_t *)be;
    if (g_multi_device == -1) CU_CHECK(cudaSetDevice(c->device));
    return c;
}

/* ---- memory ---- */

/* Makes the arena hold at least `bytes` and empties it; growing waits for queued work. */
static void scratch_begin(kn_cuda_t *c, size_t bytes)
{
    if (bytes > c->arena.cap && c->capturing) { /* no growing inside a graph recording */
        c->capture_bad = 1;
        kn_arena_reset(&c->arena);
        return;
    }
    if (bytes > c->arena.cap) {
        c->arena_gen++;
        size_t cap = c->arena.cap * 2 > bytes ? c->arena.cap * 2 : bytes;
        cap = (cap + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
        CU_CHECK(cudaStreamSynchronize(c->stream));
        if (c->arena_mem) CU_CHECK(cudaFree(c->arena_mem));
        c->arena_mem = NULL;
        CU_CHECK(cudaMalloc(&c->arena_mem, cap));
        kn_arena_init(&c->arena, cap);
    }
    kn_arena_reset(&c->arena);
}

static void *scratch_take(kn_cuda_t *c, size_t bytes)
{
    size_t off;
    if (kn_arena_take(&c->arena, bytes, 256, &off) != AFD_OK) {
        /* only while recording a graph that will be dropped (it needed a larger arena):
         * what is recorded never runs */
        CU_ASSERT(c->capturing && c->capture_bad);
        return c->arena_mem;
    }
    return (char *)c->arena_mem + off;
}

#define SCR(bytes) (((size_t)(bytes) + 255) / 256 * 256)

static void live_add(kn_cuda_t *c, void *p, size_t bytes)
{
    if (c->nlive == c->live_cap) {
        int cap = c->live_cap ? 2 * c->live_cap : 256;
        kn_cu_block_t *n = realloc(c->live, sizeof(*n) * (size_t)cap);
        CU_ASSERT(n);
        c->live = n;
        c->live_cap = cap;
    }
    c->live[c->nlive++] = (kn_cu_block_t){p, bytes};
}

static void *cuda_alloc(kn_backend_t *be, size_t bytes)
{
    kn_cuda_t *c = cu(be);
    if (!bytes) bytes = 1;
    void *p = NULL;
    for (int i = 0; i < c->ncache; i++)
        if (c->cache[i].bytes == bytes) {
            p = c->cache[i].p;
            c->cache[i] = c->cache[--c->ncache];
            break;
        }
    if (!p && cudaMalloc(&p, bytes) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    CU_CHECK(cudaMemsetAsync(p, 0, bytes, c->stream));
    live_add(c, p, bytes);
    return p;
}

static void cuda_free(kn_backend_t *be, void *p)
{
    kn_cuda_t *c = cu(be);
    if (!p) return;
    size_t bytes = 0;
    for (int i = c->nlive - 1; i >= 0; i--)
        if (c->live[i].p == p) {
            bytes = c->live[i].bytes;
            c->live[i] = c->live[--c->nlive];
            break;
        }
    CU_ASSERT(bytes > 0);
    /* stream order: a later alloc of this size reuses it only behind the work queued so far */
    if (c->ncache < KN_CACHE_MAX && bytes <= KN_CACHE_MAX_SIZE) {
        c->cache[c->ncache++] = (kn_cu_block_t){p, bytes};
        return;
    }
    CU_CHECK(cudaStreamSynchronize(c->stream));
    CU_CHECK(cudaFree(p));
}

/* Host work a graph recording cannot hold: the recording is dropped (the caller runs the
 * work directly), and the call does nothing now. */
static int capture_refuses(kn_cuda_t *c)
{
    if (c->capturing) c->capture_bad = 1;
    return c->capturing;
}

static void cuda_upload(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes || capture_refuses(cu(be))) return;
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cu(be)->stream));
}

static void cuda_download(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes || capture_refuses(cu(be))) return;
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cu(be)->stream));
    CU_CHECK(cudaStreamSynchronize(cu(be)->stream)); /* the host reads it next */
}

static void cuda_download_async(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes) return;
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cu(be)->stream));
}

static void cuda_copy(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes) return;
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cu(be)->stream));
}

static void *cuda_event_new(kn_backend_t *be)
{
    (void)cu(be);
    cudaEvent_t ev;
    CU_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    return (void *)ev;
}

static void cuda_event_record(kn_backend_t *be, void *ev)
{
    CU_CHECK(cudaEventRecord((cudaEvent_t)ev, cu(be)->stream));
}

static int cuda_event_done(kn_backend_t *be, void *ev)
{
    (void)cu(be);
    cudaError_t e = cudaEventQuery((cudaEvent_t)ev);
    if (e == cudaErrorNotReady) {
        cudaGetLastError();
        return 0;
    }
    CU_CHECK(e);
    return 1;
}

static void cuda_event_free(kn_backend_t *be, void *ev)
{
    (void)cu(be);
    CU_CHECK(cudaEventDestroy((cudaEvent_t)ev));
}

/* ---- sampling support ---- */

static afd_status_t cuda_logits_top(kn_backend_t *be, const float *logits, int rows, int vocab,
                                    int k, int32_t *top_ids, float *top_logits, double *lse)
{
    kn_cuda_t *c = cu(be);
    if (rows <= 0) return AFD_OK;
    if (k < 1 || k > KN_TOP_MAX) return AFD_ERR_RANGE;
    size_t ws = kn_cu_logits_top_ws(rows, vocab, k);
    size_t ib = sizeof(int32_t) * (size_t)rows * k, vb = sizeof(float) * (size_t)rows * k;
    size_t lb = sizeof(double) * (size_t)rows;
    scratch_begin(c, SCR(ws) + SCR(ib) + SCR(vb) + SCR(lb));
    void *w = scratch_take(c, ws);
    int32_t *di = scratch_take(c, ib);
    float *dv = scratch_take(c, vb);
    double *dl = scratch_take(c, lb);
    cudaError_t e = kn_cu_logits_top(logits, rows, vocab, k, w, di, dv, dl, c->stream);
    if (e == cudaErrorInvalidValue) {
        cudaGetLastError();
        return AFD_ERR_UNSUPPORTED;
    }
    CU_CHECK(e);
    CU_CHECK(cudaMemcpyAsync(top_ids, di, ib, cudaMemcpyDeviceToHost, c->stream));
    CU_CHECK(cudaMemcpyAsync(top_logits, dv, vb, cudaMemcpyDeviceToHost, c->stream));
    CU_CHECK(cudaMemcpyAsync(lse, dl, lb, cudaMemcpyDeviceToHost, c->stream));
    CU_CHECK(cudaStreamSynchronize(c->stream));
    return AFD_OK;
}

/* ---- packed rows (the data plane's format) ---- */

static void cuda_rows_encode(kn_backend_t *be, afd_dtype_t dt, const float *x, int rows, int dim,
                             void *dst)
{
    kn_cuda_t *c = cu(be);
    size_t n = (size_t)rows * (size_t)dim;
    switch (dt) {
    case AFD_DTYPE_E4M3:
        CU_CHECK(kn_cu_rows_encode_fp8(x, rows, dim, dst, c->stream));
        break;
    case AFD_DTYPE_BF16:
        CU_CHECK(kn_cu_f32_to_bf16(x, (uint16_t *)dst, n, c->stream));
        break;
    case AFD_DTYPE_F32:
        CU_CHECK(cudaMemcpyAsync(dst, x, n * sizeof(float), cudaMemcpyDeviceToDevice, c->stream));
        break;
    default:
        CU_ASSERT(0 && "packed rows: e4m3, bf16 or f32");
    }
}

static void cuda_rows_decode(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim,
                             float *x)
{
    kn_cuda_t *c = cu(be);
    size_t n = (size_t)rows * (size_t)dim;
    switch (dt) {
    case AFD_DTYPE_E4M3:
        CU_CHECK(kn_cu_rows_decode_fp8(src, rows, dim, x, c->stream));
        break;
    case AFD_DTYPE_BF16:
        CU_CHECK(kn_cu_bf16_to_f32((const uint16_t *)src, x, n, 0, c->stream));
        break;
    case AFD_DTYPE_F32:
        CU_CHECK(cudaMemcpyAsync(x, src, n * sizeof(float), cudaMemcpyDeviceToDevice, c->stream));
        break;
    default:
        CU_ASSERT(0 && "packed rows: e4m3, bf16 or f32");
    }
}

static void cuda_rows_add(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim,
                          float *y)
{
    kn_cuda_t *c = cu(be);
    size_t n = (size_t)rows * (size_t)dim;
    switch (dt) {
    case AFD_DTYPE_BF16:
        CU_CHECK(kn_cu_bf16_to_f32((const uint16_t *)src, y, n, 1, c->stream));
        break;
    case AFD_DTYPE_F32:
        CU_CHECK(kn_cu_add(y, (const float *)src, n, c->stream));
        break;
    default:
        CU_ASSERT(0 && "packed rows to add: bf16 or f32");
    }
}

static void *cuda_host_alloc(kn_backend_t *be, size_t bytes)
{
    (void)cu(be);
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cuda_host_free(kn_backend_t *be, void *p)
{
    (void)cu(be);
    CU_CHECK(cudaFreeHost(p));
}

static void cuda_zero(kn_backend_t *be, void *p, size_t bytes)
{
    if (!bytes) return;
    CU_CHECK(cudaMemsetAsync(p, 0, bytes, cu(be)->stream));
}

static void cuda_sync(kn_backend_t *be)
{
    if (capture_refuses(cu(be))) return;
    CU_CHECK(cudaStreamSynchronize(cu(be)->stream));
}

static void cuda_destroy(kn_backend_t *be)
{
    kn_cuda_t *c = cu(be);
    cudaStreamSynchronize(c->stream);
    for (int i = 0; i < c->ncache; i++)
        cudaFree(c->cache[i].p);
    for (int i = 0; i < c->nlive; i++) /* buffers the caller never freed */
        cudaFree(c->live[i].p);
    free(c->live);
    free(c->hbuf);
    cudaFree(c->prep.slots);
    cudaFree(c->prep.bt);
    cudaFree(c->prep.len);
    if (c->arena_mem) cudaFree(c->arena_mem);
    kn_gemm_destroy(c->gemm);
    cudaStreamDestroy(c->stream);
    free(c);
}

/* ---- weights ---- */

static size_t dtype_size(afd_dtype_t dt)
{
    return dt == AFD_DTYPE_F32 ? 4 : dt == AFD_DTYPE_E4M3 ? 1 : 2;
}

/* the whole block-scale matrix of an e4m3 source, 4-byte aligned on the host */
static float *src_scales(const kn_src_t *s, size_t *count)
{
    int64_t br = (s->full_rows + 127) / 128, bc = (s->full_cols + 127) / 128;
    *count = (size_t)(br * bc);
    float *h = malloc(sizeof(float) * (*count ? *count : 1));
    if (h) memcpy(h, s->scale, sizeof(float) * *count);
    return h;
}

static afd_status_t cuda_weight_load(kn_backend_t *be, const kn_src_t *s, kn_weight_t *w)
{
    kn_cuda_t *c = cu(be);
    if (s->row0 < 0 || s->col0 < 0 || s->rows < 0 || s->cols < 0 ||
        s->row0 + s->rows > s->full_rows || s->col0 + s->cols > s->full_cols ||
        (s->dtype == AFD_DTYPE_E4M3 && !s->scale) || s->dtype >= AFD_DTYPE_COUNT)
        return AFD_ERR_RANGE;
    kn_cu_weight_t *aux = calloc(1, sizeof(*aux));
    if (!aux) return AFD_ERR_NOMEM;
    size_t es = dtype_size(s->dtype), nel = (size_t)(s->rows * s->cols);
    const char *origin = (const char *)s->data + (size_t)(s->row0 * s->full_cols + s->col0) * es;
    void *data = NULL, *raw = NULL;
    float *dscale = NULL, *hs = NULL;
    afd_status_t st = AFD_ERR_NOMEM;
    aux->fp8 = c->fp8_native && kn_fp8_native_ok(s);
    if (aux->fp8) {
        int64_t br = s->rows / 128, bc = s->cols / 128;
        size_t n1 = kn_scale_count(c->order_w, br, bc), n2 = (size_t)(br * bc);
        hs = malloc(sizeof(float) * (n1 > n2 ? n1 : n2));
        if (!hs || cudaMalloc(&data, nel) != cudaSuccess ||
            cudaMalloc((void **)&aux->scale, sizeof(float) * n1) != cudaSuccess ||
            cudaMalloc((void **)&aux->scale_rm, sizeof(float) * n2) != cudaSuccess)
            goto err;
        CU_CHECK(cudaMemcpy2DAsync(data, (size_t)s->cols, origin, (size_t)s->full_cols,
                                   (size_t)s->cols, (size_t)s->rows, cudaMemcpyHostToDevice,
                                   c->stream));
        if ((st = kn_fp8_weight_scales(s, c->order_w, hs, n1))) goto err;
        CU_CHECK(cudaMemcpy(aux->scale, hs, sizeof(float) * n1, cudaMemcpyHostToDevice));
        if ((st = kn_fp8_weight_scales(s, KN_SCALE_INNER_FAST, hs, n2))) goto err;
        CU_CHECK(cudaMemcpy(aux->scale_rm, hs, sizeof(float) * n2, cudaMemcpyHostToDevice));
    } else {
        if (cudaMalloc(&data, 2 * (nel ? nel : 1)) != cudaSuccess) goto err;
        void *dst = data;
        if (s->dtype != AFD_DTYPE_BF16) { /* packed raw slice, then converted */
            if (cudaMalloc(&raw, es * (nel ? nel : 1)) != cudaSuccess) goto err;
            dst = raw;
        }
        if (nel)
            CU_CHECK(cudaMemcpy2DAsync(dst, (size_t)s->cols * es, origin, (size_t)s->full_cols * es,
                                       (size_t)s->cols * es, (size_t)s->rows,
                                       cudaMemcpyHostToDevice, c->stream));
        if (raw) {
            int64_t full_bc = (s->full_cols + 127) / 128;
            if (s->dtype == AFD_DTYPE_E4M3) {
                size_t cnt;
                if (!(hs = src_scales(s, &cnt))) goto err;
                if (cudaMalloc((void **)&dscale, sizeof(float) * (cnt ? cnt : 1)) != cudaSuccess)
                    goto err;
                CU_CHECK(cudaMemcpy(dscale, hs, sizeof(float) * cnt, cudaMemcpyHostToDevice));
            }
            CU_CHECK(kn_cu_weight_to_bf16(s->dtype, raw, s->rows, s->cols, dscale, s->row0, s->col0,
                                          full_bc, data, c->stream));
        }
    }
    CU_CHECK(cudaStreamSynchronize(c->stream)); /* the source may be unmapped after this */
    if (raw) cudaFree(raw);
    if (dscale) cudaFree(dscale);
    free(hs);
    w->rows = s->rows;
    w->cols = s->cols;
    w->data = data;
    w->aux = aux;
    return AFD_OK;
err:
    cudaGetLastError();
    cudaStreamSynchronize(c->stream);
    if (data) cudaFree(data);
    if (raw) cudaFree(raw);
    if (dscale) cudaFree(dscale);
    if (aux->scale) cudaFree(aux->scale);
    if (aux->scale_rm) cudaFree(aux->scale_rm);
    free(aux);
    free(hs);
    return st;
}

static void cuda_weight_free(kn_backend_t *be, kn_weight_t *w)
{
    kn_cu_weight_t *aux = w->aux;
    CU_CHECK(cudaStreamSynchronize(cu(be)->stream));
    if (w->data) cudaFree(w->data);
    if (aux) {
        if (aux->scale) cudaFree(aux->scale);
        if (aux->scale_rm) cudaFree(aux->scale_rm);
        free(aux);
    }
    w->data = NULL;
    w->aux = NULL;
}

/* Host scratch for tables built per call (uploads from pageable memory are staged when
 * queued, so the next call may overwrite it). */
static void *host_scratch(kn_cuda_t *c, size_t bytes)
{
    if (bytes > c->hbuf_cap) {
        void *p = realloc(c->hbuf, bytes);
        CU_ASSERT(p);
        c->hbuf = p;
        c->hbuf_cap = bytes;
    }
    return c->hbuf;
}

/* ---- GEMM ---- */

static void matmul_bf16(kn_cuda_t *c, const float *x, int n, const uint16_t *wb, int M, int K,
                        float *y, int accumulate, uint16_t *xb)
{
    CU_CHECK(kn_cu_f32_to_bf16(x, xb, (size_t)n * K, c->stream));
    afd_status_t st = kn_gemm_bf16(c->gemm, wb, xb, M, n, K, y, accumulate, c->stream);
    if (st) {
        cu_log(LOG_ERROR, "backend cuda: bf16 GEMM %dx%dx%d: %s", M, n, K, afd_status_str(st));
        abort();
    }
}

static void cuda_matmul(kn_backend_t *be, const float *x, int n, const kn_weight_t *w, float *y,
                        int accumulate)
{
    kn_cuda_t *c = cu(be);
    const kn_cu_weight_t *aux = w->aux;
    int M = (int)w->rows, K = (int)w->cols;
    if (n <= 0) return;
    if (M == 0 || K == 0) {
        if (!accumulate) cuda_zero(be, y, sizeof(float) * (size_t)n * (size_t)M);
        return;
    }
    size_t nk = (size_t)n * K, nm = (size_t)n * M;
    if (!aux->fp8) {
        scratch_begin(c, SCR(2 * nk));
        matmul_bf16(c, x, n, w->data, M, K, y, accumulate, scratch_take(c, 2 * nk));
        return;
    }
    size_t ns = kn_scale_count(c->order_x, n, K / 128);
    scratch_begin(c, SCR(nk) + SCR(4 * ns) + SCR(2 * nm));
    uint8_t *xq = scratch_take(c, nk);
    float *xs = scratch_take(c, 4 * ns);
    uint16_t *d = scratch_take(c, 2 * nm);
    CU_CHECK(kn_cu_quant_fp8(x, n, K, xq, xs, c->order_x, c->stream));
    afd_status_t st = kn_gemm_fp8(c->gemm, w->data, aux->scale, xq, xs, M, n, K, d, c->stream);
    if (st == AFD_OK) {
        CU_CHECK(kn_cu_bf16_to_f32(d, y, nm, accumulate, c->stream));
        return;
    }
    /* no block-scaled algorithm for this shape: dequantise the weight for this call */
    if (!c->warned_fp8_shape) {
        cu_log(LOG_WARN,
               "backend cuda: no block-scaled fp8 GEMM for %dx%dx%d (%s); "
               "such calls dequantise their weight to bf16",
               M, n, K, afd_status_str(st));
        c->warned_fp8_shape = 1;
    }
    scratch_begin(c, SCR(2 * (size_t)M * K) + SCR(2 * nk));
    uint16_t *wb = scratch_take(c, 2 * (size_t)M * K);
    uint16_t *xb = scratch_take(c, 2 * nk);
    CU_CHECK(kn_cu_weight_to_bf16(AFD_DTYPE_E4M3, w->data, M, K, aux->scale_rm, 0, 0, K / 128, wb,
                                  c->stream));
    matmul_bf16(c, x, n, wb, M, K, y, accumulate, xb);
}

/*
 * The experts' GEMMs of a layer: x converted (bf16) or quantised (fp8, when the
 * activation scales' order lets a segment's rows be addressed as a slice) once for all
 * rows, one GEMM per non-empty segment, and for fp8 one widening of every output. A
 * segment whose shape has no block-scaled algorithm is redone alone by cuda_matmul after
 * the widening (which wrote its rows from an output the GEMM never filled).
 */
/*
 * The grouped GEMM's inputs besides x: its tile list and, for each of nptr kinds, the
 * segments' device addresses (ptrs[p * nseg + s], filled by the caller), in host scratch
 * of tb + pb bytes; the number of tiles.
 */
static int grouped_lists(kn_cuda_t *c, const int32_t *off, int nseg, int nptr, int32_t **tiles,
                         const void ***ptrs, size_t *tb, size_t *pb)
{
    int max_tiles = (off[nseg] - off[0]) / 64 + nseg;
    *tb = sizeof(int32_t) * 3 * (size_t)max_tiles;
    *pb = sizeof(void *) * (size_t)nseg * (size_t)nptr;
    char *h = host_scratch(c, SCR(*tb) + *pb);
    *tiles = (int32_t *)h;
    *ptrs = (const void **)(h + SCR(*tb));
    int ntiles = kn_cu_grouped_gemm_tiles(off, nseg, *tiles, max_tiles);
    CU_ASSERT(ntiles >= 0);
    return ntiles;
}

/* Puts grouped_lists's tables in the scratch arena (after the caller's scratch_begin). */
static void grouped_upload(kn_cuda_t *c, const int32_t *tiles, int ntiles, const void **ptrs,
                           size_t tb, size_t pb, int32_t **dt, const void ***dp)
{
    *dt = scratch_take(c, tb);
    *dp = scratch_take(c, pb);
    cuda_upload(&c->base, *dt, tiles, sizeof(int32_t) * 3 * (size_t)ntiles);
    cuda_upload(&c->base, *dp, ptrs, pb);
}

static void cuda_matmul_segments(kn_backend_t *be, const float *x, const int32_t *off, int nseg,
                                 const kn_weight_t *w, float *y)
{
    kn_cuda_t *c = cu(be);
    int M = (int)w[0].rows, K = (int)w[0].cols, fp8 = ((const kn_cu_weight_t *)w[0].aux)->fp8;
    int total = off[nseg] - off[0], same = 1;
    for (int s = 1; s < nseg; s++)
        same &= w[s].rows == M && w[s].cols == K && ((const kn_cu_weight_t *)w[s].aux)->fp8 == fp8;
    int32_t *tiles, *dt;
    const void **ptrs, **dp;
    size_t tb, pb, nk = (size_t)total * K, nm = (size_t)total * M;
    if (same && fp8 && c->moe_grouped && kn_cu_grouped_gemm_fp8_ok(M, K) && total > 0) {
        /* block-scaled experts in one launch: the activations quantised once (row-major
         * scales, the kernel's layout), the weights' data and block scales by address */
        int ntiles = grouped_lists(c, off, nseg, 2, &tiles, &ptrs, &tb, &pb);
        for (int s = 0; s < nseg; s++) {
            ptrs[s] = w[s].data;
            ptrs[nseg + s] = ((const kn_cu_weight_t *)w[s].aux)->scale_rm;
        }
        size_t xsb = sizeof(float) * (size_t)total * (size_t)(K / 128);
        scratch_begin(c, SCR(nk) + SCR(xsb) + SCR(tb) + SCR(pb));
        uint8_t *xq = scratch_take(c, nk);
        float *xs = scratch_take(c, xsb);
        grouped_upload(c, tiles, ntiles, ptrs, tb, pb, &dt, &dp);
        CU_CHECK(kn_cu_quant_fp8(x + (size_t)off[0] * K, total, K, xq, xs, KN_SCALE_INNER_FAST,
                                 c->stream));
        CU_CHECK(kn_cu_grouped_gemm_fp8(xq, xs, (const uint8_t *const *)dp,
                                        (const float *const *)(dp + nseg), dt, ntiles, M, K,
                                        y + (size_t)off[0] * M, c->stream));
        return;
    }
    if (!same || M == 0 || K == 0 || (fp8 && c->order_x != KN_SCALE_INNER_FAST)) {
        for (int s = 0; s < nseg; s++) /* the general path, segment by segment */
            if (off[s + 1] > off[s])
                cuda_matmul(be, x + (size_t)off[s] * K, off[s + 1] - off[s], &w[s],
                            y + (size_t)off[s] * M, 0);
        return;
    }
    const float *x0 = x + (size_t)off[0] * K;
    float *y0 = y + (size_t)off[0] * M;
    if (!fp8 && c->moe_grouped && kn_cu_grouped_gemm_ok(M, K)) {
        /* every segment's tiles in one launch: the tile list and the weights' addresses
         * go up with the call */
        int ntiles = grouped_lists(c, off, nseg, 1, &tiles, &ptrs, &tb, &pb);
        for (int s = 0; s < nseg; s++)
            ptrs[s] = w[s].data;
        scratch_begin(c, SCR(2 * nk) + SCR(tb) + SCR(pb));
        uint16_t *xb = scratch_take(c, 2 * nk);
        grouped_upload(c, tiles, ntiles, ptrs, tb, pb, &dt, &dp);
        CU_CHECK(kn_cu_f32_to_bf16(x0, xb, nk, c->stream));
        CU_CHECK(kn_cu_grouped_gemm_bf16(xb, (const uint16_t *const *)dp, dt, ntiles, M, K, y0,
                                         c->stream));
        return;
    }
    if (!fp8) {
        scratch_begin(c, SCR(2 * nk));
        uint16_t *xb = scratch_take(c, 2 * nk);
        CU_CHECK(kn_cu_f32_to_bf16(x0, xb, nk, c->stream));
        for (int s = 0; s < nseg; s++) {
            int n = off[s + 1] - off[s];
            if (n <= 0) continue;
            afd_status_t st = kn_gemm_bf16(c->gemm, w[s].data, xb + (size_t)(off[s] - off[0]) * K,
                                           M, n, K, y + (size_t)off[s] * M, 0, c->stream);
            if (st) {
                cu_log(LOG_ERROR, "backend cuda: bf16 GEMM %dx%dx%d: %s", M, n, K,
                       afd_status_str(st));
                abort();
            }
        }
        return;
    }
    /* INNER_FAST scales are (row, K / 128) row-major: a segment's are a slice, 16-byte
     * aligned when a row has a multiple of 4 of them; else each segment is quantised into
     * a region of its own that starts aligned */
    int kb = K / 128, one = kb % 4 == 0;
    size_t ns = (size_t)total * (size_t)kb + (one ? 0 : 4 * (size_t)nseg);
    scratch_begin(c, SCR(nk) + SCR(4 * ns) + SCR(2 * nm));
    uint8_t *xq = scratch_take(c, nk);
    float *xs = scratch_take(c, 4 * ns);
    uint16_t *d = scratch_take(c, 2 * nm);
    if (one) CU_CHECK(kn_cu_quant_fp8(x0, total, K, xq, xs, c->order_x, c->stream));
    int redo[KN_SEG_REDO_MAX], nredo = 0, all_redo = 0;
    size_t sat = 0; /* the next segment's scales (separate regions) */
    for (int s = 0; s < nseg; s++) {
        int n = off[s + 1] - off[s];
        if (n <= 0) continue;
        size_t r0 = (size_t)(off[s] - off[0]);
        const kn_cu_weight_t *aux = w[s].aux;
        float *sx = one ? xs + r0 * (size_t)kb : xs + sat;
        if (!one) {
            CU_CHECK(kn_cu_quant_fp8(x + (size_t)off[s] * K, n, K, xq + r0 * K, sx, c->order_x,
                                     c->stream));
            sat += ((size_t)n * kb + 3) / 4 * 4;
        }
        afd_status_t st = kn_gemm_fp8(c->gemm, w[s].data, aux->scale, xq + r0 * K, sx, M, n, K,
                                      d + r0 * M, c->stream);
        if (st == AFD_OK) continue;
        if (nredo < KN_SEG_REDO_MAX)
            redo[nredo++] = s;
        else
            all_redo = 1;
    }
    CU_CHECK(kn_cu_bf16_to_f32(d, y0, nm, 0, c->stream));
    /* rows of a shape without a block-scaled algorithm (a tiny segment, say): alone */
    for (int i = 0; i < (all_redo ? nseg : nredo); i++) {
        int s = all_redo ? i : redo[i];
        if (off[s + 1] > off[s])
            cuda_matmul(be, x + (size_t)off[s] * K, off[s + 1] - off[s], &w[s],
                        y + (size_t)off[s] * M, 0);
    }
}

/* ---- elementwise and small ops ---- */

static void cuda_rmsnorm(kn_backend_t *be, const float *x, int n, int dim, const float *weight,
                         float eps, float *out)
{
    /* add is NULL: x is only read */
    CU_CHECK(kn_cu_rmsnorm((float *)x, NULL, n, dim, weight, eps, out, cu(be)->stream));
}

static void cuda_rope(kn_backend_t *be, float *x, int n, int nheads, int head_dim,
                      const int32_t *pos, double theta)
{
    CU_CHECK(kn_cu_rope(x, n, nheads, head_dim, pos, theta, cu(be)->stream));
}

static void cuda_embed(kn_backend_t *be, const kn_weight_t *table, const int32_t *ids, int n,
                       float *out)
{
    kn_cuda_t *c = cu(be);
    const kn_cu_weight_t *aux = table->aux;
    CU_CHECK(kn_cu_embed(table->data, aux->fp8 ? aux->scale : NULL, c->order_w, table->rows,
                         table->cols, ids, n, out, c->stream));
}

static void cuda_swiglu(kn_backend_t *be, const float *gate, const float *up, size_t n, float *out)
{
    CU_CHECK(kn_cu_swiglu(gate, up, n, out, cu(be)->stream));
}

static void cuda_gather(kn_backend_t *be, const float *src, int dim, const int32_t *rows, int n,
                        float *dst)
{
    CU_CHECK(kn_cu_gather(src, dim, rows, n, dst, cu(be)->stream));
}

static void cuda_scatter_add(kn_backend_t *be, float *dst, int dim, const int32_t *rows,
                             const float *scale, int n, const float *src)
{
    CU_CHECK(kn_cu_scatter_add(dst, dim, rows, scale, n, src, cu(be)->stream));
}

static void cuda_add(kn_backend_t *be, float *y, const float *x, size_t n)
{
    CU_CHECK(kn_cu_add(y, x, n, cu(be)->stream));
}

static void cuda_router_topk(kn_backend_t *be, const float *logits, int n, int nexp, int k,
                             int renorm, int32_t *ids, float *weights)
{
    CU_CHECK(kn_cu_router_topk(logits, n, nexp, k, renorm, ids, weights, cu(be)->stream));
}

static void cuda_round(kn_backend_t *be, float *x, int rows, int dim, afd_dtype_t dt)
{
    CU_CHECK(kn_cu_round(x, rows, dim, (int)dt, cu(be)->stream));
}

/* ---- KV cache and attention ---- */

static kn_cu_kv_t cu_kv(const kn_kv_t *kv)
{
    kn_cu_kv_t k = {.dtype = (int)kv->dtype,
                    .num_blocks = kv->num_blocks,
                    .block_size = kv->block_size,
                    .head_dim = kv->head_dim,
                    .k = kv->k,
                    .v = kv->v,
                    .k_scale = kv->k_scale,
                    .v_scale = kv->v_scale};
    return k;
}

/* the sequence's block table (host) into the scratch arena; entries are checked here */
static int32_t *upload_table(kn_cuda_t *c, const kn_kv_t *kv, const kn_seq_t *seq, int ctx)
{
    int nb = (ctx + kv->block_size - 1) / kv->block_size;
    for (int i = 0; i < nb; i++)
        CU_ASSERT(seq->block_table[i] >= 0 && seq->block_table[i] < kv->num_blocks);
    int32_t *d = scratch_take(c, sizeof(int32_t) * (size_t)(nb ? nb : 1));
    cuda_upload(&c->base, d, seq->block_table, sizeof(int32_t) * (size_t)nb);
    return d;
}

static void cuda_kv_write(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seq,
                          const float *k, const float *v)
{
    kn_cuda_t *c = cu(be);
    if (seq->ntok <= 0) return;
    int ctx = seq->pos0 + seq->ntok;
    scratch_begin(c, SCR(sizeof(int32_t) * ((size_t)ctx / kv->block_size + 1)));
    int32_t *bt = upload_table(c, kv, seq, ctx);
    kn_cu_kv_t dk = cu_kv(kv);
    CU_CHECK(kn_cu_kv_write(&dk, layer, bt, seq->pos0, seq->ntok, k, v, c->stream));
}

static void cuda_attention(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seq,
                           const float *q, int nheads, float scale, float *out)
{
    kn_cuda_t *c = cu(be);
    if (seq->ntok <= 0) return;
    int ctx = seq->pos0 + seq->ntok;
    kn_cu_kv_t dk = cu_kv(kv);
    size_t bt_bytes = SCR(sizeof(int32_t) * ((size_t)ctx / kv->block_size + 1));
    kn_attn_plan_t plan;
    if (seq->ntok == 1 && kn_attn_plan(nheads, kv->head_dim, ctx, 1, c->num_sms, &plan) == AFD_OK) {
        size_t ws = kn_attn_ws_bytes(&plan, 1, nheads, kv->head_dim);
        scratch_begin(c, bt_bytes + SCR(sizeof(int32_t)) + SCR(ws));
        int32_t *bt = upload_table(c, kv, seq, ctx);
        int32_t *len = scratch_take(c, sizeof(int32_t));
        float *wsp = scratch_take(c, ws);
        cuda_upload(be, len, &ctx, sizeof(int32_t));
        if (c->attn_tc && kn_cu_attn_decode_tc_ok(nheads, kv->head_dim, (int)kv->dtype))
            CU_CHECK(kn_cu_attn_decode_tc(&plan, &dk, layer, bt, 0, len, 1, q, nheads, scale, wsp,
                                          out, c->stream));
        else
            CU_CHECK(kn_cu_attn_decode(&plan, &dk, layer, bt, 0, len, 1, q, nheads, scale, wsp, out,
                                       c->stream));
        return;
    }
    scratch_begin(c, bt_bytes);
    int32_t *bt = upload_table(c, kv, seq, ctx);
    CU_CHECK(
        kn_cu_attn_prefill(&dk, layer, bt, seq->pos0, seq->ntok, q, nheads, scale, out, c->stream));
}

/* whether seqs/nseq is the batch batch_prepare put on the device */
static int prepared(const kn_cuda_t *c, const kn_seq_t *seqs, int nseq)
{
    return c->prep.ok && c->prep.seqs == seqs && c->prep.nseq == nseq;
}

/* The KV rows of a whole batch in one launch: each token's cache slot computed here (or
 * by batch_prepare), the layer's offset added on the device. */
static void cuda_kv_write_batch(kn_backend_t *be, const kn_kv_t *kv, int layer,
                                const kn_seq_t *seqs, int nseq, const float *k, const float *v)
{
    kn_cuda_t *c = cu(be);
    kn_cu_kv_t dk = cu_kv(kv);
    int64_t slot0 = (int64_t)layer * kv->num_blocks * kv->block_size;
    if (prepared(c, seqs, nseq)) {
        CU_CHECK(kn_cu_kv_write_slots(&dk, c->prep.slots, slot0, nseq, k, v, c->stream));
        return;
    }
    size_t total = 0;
    for (int i = 0; i < nseq; i++)
        total += (size_t)(seqs[i].ntok > 0 ? seqs[i].ntok : 0);
    if (!total) return;
    int64_t *slots = host_scratch(c, sizeof(int64_t) * total);
    size_t t = 0;
    for (int i = 0; i < nseq; i++)
        for (int j = 0; j < seqs[i].ntok; j++) {
            int p = seqs[i].pos0 + j;
            int32_t blk = seqs[i].block_table[p / kv->block_size];
            CU_ASSERT(blk >= 0 && blk < kv->num_blocks);
            slots[t++] = (int64_t)blk * kv->block_size + p % kv->block_size;
        }
    scratch_begin(c, SCR(sizeof(int64_t) * total));
    int64_t *d = scratch_take(c, sizeof(int64_t) * total);
    cuda_upload(be, d, slots, sizeof(int64_t) * total);
    CU_CHECK(kn_cu_kv_write_slots(&dk, d, slot0, (int)total, k, v, c->stream));
}

/* Attention of a batch: each run of one-token (decode) sequences in one launch of the
 * decode kernel over a (run, longest block table) table; prefill sequences one by one. */
static void cuda_attention_batch(kn_backend_t *be, const kn_kv_t *kv, int layer,
                                 const kn_seq_t *seqs, int nseq, const float *q, int nheads,
                                 float scale, float *out)
{
    kn_cuda_t *c = cu(be);
    size_t row = (size_t)nheads * (size_t)kv->head_dim, off = 0;
    kn_cu_kv_t dk = cu_kv(kv);
    if (prepared(c, seqs, nseq) && nheads == c->prep.nheads) {
        const kn_attn_plan_t *plan = &c->prep.plan;
        size_t ws = kn_attn_ws_bytes(plan, nseq, nheads, kv->head_dim);
        scratch_begin(c, SCR(ws));
        float *wsp = scratch_take(c, ws);
        if (c->attn_tc && kn_cu_attn_decode_tc_ok(nheads, kv->head_dim, (int)kv->dtype))
            CU_CHECK(kn_cu_attn_decode_tc(plan, &dk, layer, c->prep.bt, c->prep.stride, c->prep.len,
                                          nseq, q, nheads, scale, wsp, out, c->stream));
        else
            CU_CHECK(kn_cu_attn_decode(plan, &dk, layer, c->prep.bt, c->prep.stride, c->prep.len,
                                       nseq, q, nheads, scale, wsp, out, c->stream));
        return;
    }
    for (int i = 0; i < nseq;) {
        if (seqs[i].ntok != 1) {
            cuda_attention(be, kv, layer, &seqs[i], q + off * row, nheads, scale, out + off * row);
            off += (size_t)(seqs[i].ntok > 0 ? seqs[i].ntok : 0);
            i++;
            continue;
        }
        int j = i, max_ctx = 0;
        while (j < nseq && seqs[j].ntok == 1) {
            int ctx = seqs[j].pos0 + 1;
            if (ctx > max_ctx) max_ctx = ctx;
            j++;
        }
        int nd = j - i;
        kn_attn_plan_t plan;
        if (kn_attn_plan(nheads, kv->head_dim, max_ctx, nd, c->num_sms, &plan) != AFD_OK) {
            for (; i < j; i++, off++) /* no layout for this shape: the generic kernel */
                cuda_attention(be, kv, layer, &seqs[i], q + off * row, nheads, scale,
                               out + off * row);
            continue;
        }
        int stride = (max_ctx + kv->block_size - 1) / kv->block_size;
        size_t tb = sizeof(int32_t) * (size_t)nd * (size_t)stride, lb = sizeof(int32_t) * nd;
        int32_t *h = host_scratch(c, tb + lb);
        for (int r = 0; r < nd; r++) {
            const kn_seq_t *sq = &seqs[i + r];
            int ctx = sq->pos0 + 1, nb = (ctx + kv->block_size - 1) / kv->block_size;
            for (int b = 0; b < stride; b++) {
                int32_t blk = b < nb ? sq->block_table[b] : 0; /* beyond ctx: never read */
                CU_ASSERT(blk >= 0 && blk < kv->num_blocks);
                h[(size_t)r * stride + b] = blk;
            }
            h[(size_t)nd * stride + r] = ctx;
        }
        size_t ws = kn_attn_ws_bytes(&plan, nd, nheads, kv->head_dim);
        scratch_begin(c, SCR(tb) + SCR(lb) + SCR(ws));
        int32_t *bt = scratch_take(c, tb);
        int32_t *len = scratch_take(c, lb);
        float *wsp = scratch_take(c, ws);
        cuda_upload(be, bt, h, tb);
        cuda_upload(be, len, h + (size_t)nd * stride, lb);
        if (c->attn_tc && kn_cu_attn_decode_tc_ok(nheads, kv->head_dim, (int)kv->dtype))
            CU_CHECK(kn_cu_attn_decode_tc(&plan, &dk, layer, bt, stride, len, nd, q + off * row,
                                          nheads, scale, wsp, out + off * row, c->stream));
        else
            CU_CHECK(kn_cu_attn_decode(&plan, &dk, layer, bt, stride, len, nd, q + off * row,
                                       nheads, scale, wsp, out + off * row, c->stream));
        off += (size_t)nd;
        i = j;
    }
}

/* ---- decode layers as graphs ---- */

/* contexts are planned in steps of this many positions, so that a batch keeps its launch
 * shapes (and its graphs) while its sequences grow */
#define KN_PREP_CTX_STEP 256

static uint64_t mix64(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h * 0xff51afd7ed558ccdull;
}

static int cuda_batch_prepare(kn_backend_t *be, const kn_kv_t *kv, const kn_seq_t *seqs, int nseq,
                              int nheads, uint64_t *shape)
{
    kn_cuda_t *c = cu(be);
    c->prep.ok = 0;
    if (nseq <= 0 || c->capturing) return 0;
    int max_ctx = 0;
    for (int i = 0; i < nseq; i++) {
        if (seqs[i].ntok != 1) return 0; /* prefill: the per-call path */
        if (seqs[i].pos0 + 1 > max_ctx) max_ctx = seqs[i].pos0 + 1;
    }
    int ctx_b = (max_ctx + KN_PREP_CTX_STEP - 1) / KN_PREP_CTX_STEP * KN_PREP_CTX_STEP;
    kn_attn_plan_t plan;
    if (kn_attn_plan(nheads, kv->head_dim, ctx_b, nseq, c->num_sms, &plan) != AFD_OK) return 0;
    int stride = (ctx_b + kv->block_size - 1) / kv->block_size;
    size_t nbt = (size_t)nseq * (size_t)stride;
    if (nseq > c->prep.cap || nbt > c->prep.bt_cap) { /* grow: graphs using the old go stale */
        CU_CHECK(cudaStreamSynchronize(c->stream));
        cudaFree(c->prep.slots);
        cudaFree(c->prep.bt);
        cudaFree(c->prep.len);
        int cap = nseq > c->prep.cap ? nseq : c->prep.cap;
        size_t bcap = nbt > c->prep.bt_cap ? nbt : c->prep.bt_cap;
        if (cudaMalloc((void **)&c->prep.slots, sizeof(int64_t) * (size_t)cap) != cudaSuccess ||
            cudaMalloc((void **)&c->prep.bt, sizeof(int32_t) * bcap) != cudaSuccess ||
            cudaMalloc((void **)&c->prep.len, sizeof(int32_t) * (size_t)cap) != cudaSuccess) {
            cudaGetLastError();
            c->prep.slots = NULL;
            c->prep.bt = c->prep.len = NULL;
            c->prep.cap = 0;
            c->prep.bt_cap = 0;
            c->prep.gen++;
            return 0;
        }
        c->prep.cap = cap;
        c->prep.bt_cap = bcap;
        c->prep.gen++;
    }
    size_t sb = sizeof(int64_t) * (size_t)nseq, bb = sizeof(int32_t) * nbt;
    char *h = host_scratch(c, sb + bb + sizeof(int32_t) * (size_t)nseq);
    int64_t *slots = (int64_t *)h;
    int32_t *bt = (int32_t *)(h + sb), *len = (int32_t *)(h + sb + bb);
    for (int i = 0; i < nseq; i++) {
        int p = seqs[i].pos0, ctx = p + 1, nb = (ctx + kv->block_size - 1) / kv->block_size;
        for (int b = 0; b < stride; b++) {
            int32_t blk = b < nb ? seqs[i].block_table[b] : 0; /* beyond ctx: never read */
            CU_ASSERT(blk >= 0 && blk < kv->num_blocks);
            bt[(size_t)i * stride + b] = blk;
        }
        slots[i] =
            (int64_t)seqs[i].block_table[p / kv->block_size] * kv->block_size + p % kv->block_size;
        len[i] = ctx;
    }
    cuda_upload(be, c->prep.slots, slots, sb);
    cuda_upload(be, c->prep.bt, bt, bb);
    cuda_upload(be, c->prep.len, len, sizeof(int32_t) * (size_t)nseq);
    c->prep.seqs = seqs;
    c->prep.nseq = nseq;
    c->prep.stride = stride;
    c->prep.nheads = nheads;
    c->prep.plan = plan;
    c->prep.ok = 1;
    uint64_t sig = mix64(0, (uint64_t)nseq);
    sig = mix64(sig, (uint64_t)stride);
    sig = mix64(sig, (uint64_t)nheads);
    sig = mix64(sig, ((uint64_t)plan.splits << 32) | (uint64_t)plan.chunk);
    sig = mix64(sig, ((uint64_t)plan.tile << 32) | (uint64_t)plan.threads);
    sig = mix64(sig, (uint64_t)plan.ept);
    *shape = mix64(sig, c->prep.gen);
    return 1;
}

typedef struct kn_cu_graph {
    cudaGraphExec_t exec;
    uint64_t arena_gen, prep_gen;
} kn_cu_graph_t;

static int cuda_graph_begin(kn_backend_t *be)
{
    kn_cuda_t *c = cu(be);
    if (!c->graphs || c->capturing) return 0;
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    c->capturing = 1;
    c->capture_bad = 0;
    return 1;
}

static void *cuda_graph_end(kn_backend_t *be)
{
    kn_cuda_t *c = cu(be);
    if (!c->capturing) return NULL;
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    c->capturing = 0;
    kn_cu_graph_t *out = NULL;
    if (e == cudaSuccess && g && !c->capture_bad && (out = calloc(1, sizeof(*out))) &&
        cudaGraphInstantiate(&out->exec, g, 0) == cudaSuccess) {
        out->arena_gen = c->arena_gen;
        out->prep_gen = c->prep.gen;
    } else {
        free(out);
        out = NULL;
    }
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    return out;
}

static int cuda_graph_launch(kn_backend_t *be, void *graph)
{
    kn_cuda_t *c = cu(be);
    kn_cu_graph_t *g = graph;
    if (g->arena_gen != c->arena_gen || g->prep_gen != c->prep.gen) return -1;
    CU_CHECK(cudaGraphLaunch(g->exec, c->stream));
    return 0;
}

static void cuda_graph_free(kn_backend_t *be, void *graph)
{
    kn_cu_graph_t *g = graph;
    (void)be;
    if (!g) return;
    cudaGraphExecDestroy(g->exec);
    free(g);
}

/* ---- tensor-parallel groups ---- */

/* The few NCCL entry points a group uses, loaded with dlopen so that the library needs
 * NCCL only where a node spans several GPUs (values as in nccl.h: ncclFloat32 = 7,
 * ncclUint8 = 1, ncclSum = 0, ncclSuccess = 0). */
typedef struct kn_nccl {
    void *lib;
    int (*comm_init_all)(void **comms, int ndev, const int *devlist);
    int (*comm_destroy)(void *comm);
    int (*reduce)(const void *send, void *recv, size_t count, int dtype, int op, int root,
                  void *comm, cudaStream_t stream);
    int (*bcast)(const void *send, void *recv, size_t count, int dtype, int root, void *comm,
                 cudaStream_t stream);
    int (*group_start)(void);
    int (*group_end)(void);
    const char *(*error_string)(int result);
} kn_nccl_t;

#define KN_NCCL_UINT8   1
#define KN_NCCL_FLOAT32 7
#define KN_NCCL_SUM     0

typedef struct kn_cu_group {
    int n;
    kn_cuda_t *r[KN_GROUP_MAX];
    cudaEvent_t ev[KN_GROUP_MAX]; /* rank i's work queued before a reduce */
    cudaEvent_t done;             /* rank 0's reduce */
    kn_nccl_t nccl;
    void *comm[KN_GROUP_MAX]; /* NCCL communicators (nccl.lib set) */
    float *stage;             /* rank 0: a peer's buffer, copied over (no NCCL, other device) */
    size_t stage_cap;
} kn_cu_group_t;

static int nccl_load(kn_nccl_t *x, char *why, size_t why_len)
{
    memset(x, 0, sizeof(*x));
    const char *off = getenv("AFD_CUDA_NCCL");
    if (off && !strcmp(off, "0")) { /* peer copies instead, e.g. to rule NCCL out */
        snprintf(why, why_len, "NCCL disabled by AFD_CUDA_NCCL=0");
        return -1;
    }
    x->lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!x->lib) {
        snprintf(why, why_len, "%s", dlerror());
        return -1;
    }
    *(void **)&x->comm_init_all = dlsym(x->lib, "ncclCommInitAll");
    *(void **)&x->comm_destroy = dlsym(x->lib, "ncclCommDestroy");
    *(void **)&x->reduce = dlsym(x->lib, "ncclReduce");
    *(void **)&x->bcast = dlsym(x->lib, "ncclBroadcast");
    *(void **)&x->group_start = dlsym(x->lib, "ncclGroupStart");
    *(void **)&x->group_end = dlsym(x->lib, "ncclGroupEnd");
    *(void **)&x->error_string = dlsym(x->lib, "ncclGetErrorString");
    if (!x->comm_init_all || !x->comm_destroy || !x->reduce || !x->bcast || !x->group_start ||
        !x->group_end || !x->error_string) {
        snprintf(why, why_len, "libnccl.so.2 lacks an entry point");
        dlclose(x->lib);
        x->lib = NULL;
        return -1;
    }
    return 0;
}

#define NCCL_CHECK(g, call)                                                                        \
    do {                                                                                           \
        int r_ = (call);                                                                           \
        if (r_ != 0) cu_fail(#call, (g)->nccl.error_string(r_), __FILE__, __LINE__);               \
    } while (0)

static void cuda_group_close(void *grp)
{
    kn_cu_group_t *g = grp;
    if (!g) return;
    for (int i = 0; i < g->n; i++) {
        if (!g->r[i]) continue;
        cudaSetDevice(g->r[i]->device);
        cudaStreamSynchronize(g->r[i]->stream);
        if (g->ev[i]) cudaEventDestroy(g->ev[i]);
        if (g->comm[i]) g->nccl.comm_destroy(g->comm[i]);
    }
    if (g->r[0]) {
        cudaSetDevice(g->r[0]->device);
        if (g->done) cudaEventDestroy(g->done);
        if (g->stage) cudaFree(g->stage);
    }
    if (g->nccl.lib) dlclose(g->nccl.lib);
    free(g);
}

static afd_status_t cuda_group_open(kn_backend_t *const *ranks, int n, void **out)
{
    if (n < 1 || n > KN_GROUP_MAX) return AFD_ERR_RANGE;
    kn_cu_group_t *g = calloc(1, sizeof(*g));
    if (!g) return AFD_ERR_NOMEM;
    g->n = n;
    int distinct = 1, devs[KN_GROUP_MAX];
    for (int i = 0; i < n; i++) {
        if (ranks[i]->ops != ranks[0]->ops) {
            free(g);
            return AFD_ERR_INVALID;
        }
        g->r[i] = (kn_cuda_t *)ranks[i];
        devs[i] = g->r[i]->device;
        for (int j = 0; j < i; j++)
            if (devs[j] == devs[i]) distinct = 0;
    }
    for (int i = 0; i < n; i++) {
        CU_CHECK(cudaSetDevice(devs[i]));
        CU_CHECK(cudaEventCreateWithFlags(&g->ev[i], cudaEventDisableTiming));
    }
    CU_CHECK(cudaSetDevice(devs[0]));
    CU_CHECK(cudaEventCreateWithFlags(&g->done, cudaEventDisableTiming));
    char why[256] = "ranks share a device";
    if (distinct && nccl_load(&g->nccl, why, sizeof(why)) == 0) {
        int r = g->nccl.comm_init_all(g->comm, n, devs);
        if (r != 0) {
            snprintf(why, sizeof(why), "ncclCommInitAll: %s", g->nccl.error_string(r));
            memset(g->comm, 0, sizeof(g->comm));
            dlclose(g->nccl.lib);
            g->nccl.lib = NULL;
        }
    }
    if (g->nccl.lib)
        cu_log(LOG_INFO, "backend cuda: %d tensor-parallel ranks on devices %d..%d: NCCL reduce", n,
               devs[0], devs[n - 1]);
    else {
        /* rank 0 reads its peers' buffers: directly on one device, else after a peer copy
         * (over NVLink/PCIe; peer access enabled where the devices allow it) */
        for (int i = 1; i < n; i++) {
            int can = 0;
            if (devs[i] != devs[0] &&
                cudaDeviceCanAccessPeer(&can, devs[0], devs[i]) == cudaSuccess && can) {
                CU_CHECK(cudaSetDevice(devs[0]));
                cudaError_t e = cudaDeviceEnablePeerAccess(devs[i], 0);
                if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) CU_CHECK(e);
                cudaGetLastError();
            }
        }
        cu_log(LOG_INFO,
               "backend cuda: %d tensor-parallel ranks: reduced by copies and an add "
               "on device %d (no NCCL: %s)",
               n, devs[0], why);
    }
    g_multi_device = -1; /* the ranks' ops set their device from now on */
    *out = g;
    return AFD_OK;
}

static void cuda_group_reduce(void *grp, float *const *bufs, size_t count)
{
    kn_cu_group_t *g = grp;
    kn_cuda_t *r0 = g->r[0];
    if (g->nccl.lib) {
        NCCL_CHECK(g, g->nccl.group_start());
        for (int i = 0; i < g->n; i++) {
            CU_CHECK(cudaSetDevice(g->r[i]->device));
            NCCL_CHECK(g, g->nccl.reduce(bufs[i], bufs[i], count, KN_NCCL_FLOAT32, KN_NCCL_SUM, 0,
                                         g->comm[i], g->r[i]->stream));
        }
        NCCL_CHECK(g, g->nccl.group_end());
        return;
    }
    size_t bytes = count * sizeof(float);
    for (int i = 1; i < g->n; i++) { /* rank 0 waits for each peer's queued work */
        CU_CHECK(cudaSetDevice(g->r[i]->device));
        CU_CHECK(cudaEventRecord(g->ev[i], g->r[i]->stream));
    }
    CU_CHECK(cudaSetDevice(r0->device));
    for (int i = 1; i < g->n; i++) {
        CU_CHECK(cudaStreamWaitEvent(r0->stream, g->ev[i], 0));
        const float *src = bufs[i];
        if (g->r[i]->device != r0->device) {
            if (bytes > g->stage_cap) {
                CU_CHECK(cudaStreamSynchronize(r0->stream));
                if (g->stage) CU_CHECK(cudaFree(g->stage));
                g->stage = NULL;
                CU_CHECK(cudaMalloc((void **)&g->stage, bytes));
                g->stage_cap = bytes;
            }
            CU_CHECK(cudaMemcpyPeerAsync(g->stage, r0->device, bufs[i], g->r[i]->device, bytes,
                                         r0->stream));
            src = g->stage;
        }
        CU_CHECK(kn_cu_add(bufs[0], src, count, r0->stream));
    }
    /* the peers' next work (which may overwrite their buffers) waits for the sum */
    CU_CHECK(cudaEventRecord(g->done, r0->stream));
    for (int i = 1; i < g->n; i++) {
        CU_CHECK(cudaSetDevice(g->r[i]->device));
        CU_CHECK(cudaStreamWaitEvent(g->r[i]->stream, g->done, 0));
    }
    CU_CHECK(cudaSetDevice(r0->device));
}

static kn_backend_t *cuda_fork(kn_backend_t *be);

static void cuda_group_bcast(void *grp, void *const *bufs, size_t bytes)
{
    kn_cu_group_t *g = grp;
    kn_cuda_t *r0 = g->r[0];
    if (g->nccl.lib) {
        NCCL_CHECK(g, g->nccl.group_start());
        for (int i = 0; i < g->n; i++) {
            CU_CHECK(cudaSetDevice(g->r[i]->device));
            NCCL_CHECK(g, g->nccl.bcast(bufs[0], bufs[i], bytes, KN_NCCL_UINT8, 0, g->comm[i],
                                        g->r[i]->stream));
        }
        NCCL_CHECK(g, g->nccl.group_end());
        return;
    }
    /* each peer copies after rank 0's work so far; rank 0 goes on after every copy */
    CU_CHECK(cudaSetDevice(r0->device));
    CU_CHECK(cudaEventRecord(g->done, r0->stream));
    for (int i = 1; i < g->n; i++) {
        kn_cuda_t *ri = g->r[i];
        CU_CHECK(cudaSetDevice(ri->device));
        CU_CHECK(cudaStreamWaitEvent(ri->stream, g->done, 0));
        if (ri->device == r0->device)
            CU_CHECK(
                cudaMemcpyAsync(bufs[i], bufs[0], bytes, cudaMemcpyDeviceToDevice, ri->stream));
        else
            CU_CHECK(
                cudaMemcpyPeerAsync(bufs[i], ri->device, bufs[0], r0->device, bytes, ri->stream));
        CU_CHECK(cudaEventRecord(g->ev[i], ri->stream));
    }
    CU_CHECK(cudaSetDevice(r0->device));
    for (int i = 1; i < g->n; i++)
        CU_CHECK(cudaStreamWaitEvent(r0->stream, g->ev[i], 0));
}

static const kn_ops_t cuda_ops = {
    .name = "cuda",
    .host_memory = 0,
    .cuda_memory = 1,
    .destroy = cuda_destroy,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .zero = cuda_zero,
    .sync = cuda_sync,
    .weight_load = cuda_weight_load,
    .weight_free = cuda_weight_free,
    .matmul = cuda_matmul,
    .rmsnorm = cuda_rmsnorm,
    .rope = cuda_rope,
    .embed = cuda_embed,
    .swiglu = cuda_swiglu,
    .gather = cuda_gather,
    .scatter_add = cuda_scatter_add,
    .add = cuda_add,
    .router_topk = cuda_router_topk,
    .kv_write = cuda_kv_write,
    .attention = cuda_attention,
    .round = cuda_round,
    .matmul_segments = cuda_matmul_segments,
    .kv_write_batch = cuda_kv_write_batch,
    .attention_batch = cuda_attention_batch,
    .fork = cuda_fork,
    .download_async = cuda_download_async,
    .copy = cuda_copy,
    .event_new = cuda_event_new,
    .event_record = cuda_event_record,
    .event_done = cuda_event_done,
    .event_free = cuda_event_free,
    .logits_top = cuda_logits_top,
    .rows_encode = cuda_rows_encode,
    .rows_decode = cuda_rows_decode,
    .rows_add = cuda_rows_add,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .group_open = cuda_group_open,
    .group_reduce = cuda_group_reduce,
    .group_bcast = cuda_group_bcast,
    .group_close = cuda_group_close,
    .batch_prepare = cuda_batch_prepare,
    .graph_begin = cuda_graph_begin,
    .graph_end = cuda_graph_end,
    .graph_launch = cuda_graph_launch,
    .graph_free = cuda_graph_free,
};

/* A sibling on the same device: its own stream, cuBLASLt handle (plans, workspace) and
 * arena, the parent's start-up findings (fp8 probe, scale orders, attention kernel). */
/* A backend's queue: its stream, cuBLASLt handle (plans, workspace) and arena; logged
 * and undone on failure. */
static afd_status_t queue_open(kn_cuda_t *c)
{
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        cu_log(LOG_ERROR, "backend cuda: stream: %s", cudaGetErrorString(e));
        cudaGetLastError();
        return AFD_ERR_UNSUPPORTED;
    }
    afd_status_t st = kn_gemm_create(KN_GEMM_WS, &c->gemm);
    if (st) {
        cu_log(LOG_ERROR, "backend cuda: cuBLASLt: %s", afd_status_str(st));
        cudaStreamDestroy(c->stream);
        return st;
    }
    if (cudaMalloc(&c->arena_mem, KN_ARENA_INITIAL) != cudaSuccess) {
        cu_log(LOG_ERROR, "backend cuda: no device memory for the %zu MiB arena",
               KN_ARENA_INITIAL >> 20);
        cudaGetLastError();
        kn_gemm_destroy(c->gemm);
        cudaStreamDestroy(c->stream);
        return AFD_ERR_NOMEM;
    }
    kn_arena_init(&c->arena, KN_ARENA_INITIAL);
    return AFD_OK;
}

/* A sibling on the same device: a queue of its own, the parent's start-up findings (fp8
 * probe, scale orders, attention kernel). */
static kn_backend_t *cuda_fork(kn_backend_t *be)
{
    kn_cuda_t *p = cu(be);
    kn_cuda_t *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->base = p->base;
    c->device = p->device;
    c->num_sms = p->num_sms;
    c->fp8_native = p->fp8_native;
    c->order_w = p->order_w;
    c->order_x = p->order_x;
    c->attn_tc = p->attn_tc;
    c->moe_grouped = p->moe_grouped;
    c->graphs = p->graphs;
    c->warned_fp8_shape = p->warned_fp8_shape;
    if (queue_open(c)) {
        free(c);
        return NULL;
    }
    /* the parent's queued work (weight and cache set-up) is visible to the sibling */
    CU_CHECK(cudaStreamSynchronize(p->stream));
    return &c->base;
}

/* a status string without common/util (the library keeps no copy of it) */
const char *afd_status_str(afd_status_t st)
{
    switch (st) {
    case AFD_OK:
        return "ok";
    case AFD_ERR_NOMEM:
        return "out of memory";
    case AFD_ERR_UNSUPPORTED:
        return "not supported";
    case AFD_ERR_INVALID:
        return "invalid argument";
    case AFD_ERR_RANGE:
        return "out of range";
    default:
        return "error";
    }
}

KN_EXPORT afd_status_t kn_cuda_open(const kn_cuda_env_t *env, int threads, int device,
                                    kn_backend_t **out)
{
    (void)threads;
    if (!env || env->abi != KN_CUDA_ABI) {
        fprintf(stderr, "backend cuda: %s does not match this program (abi)\n", KN_CUDA_LIB);
        return AFD_ERR_UNSUPPORTED;
    }
    g_env = env;
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        cu_log(LOG_ERROR, "backend cuda: no CUDA device (%s)",
               e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        cudaGetLastError();
        return AFD_ERR_UNSUPPORTED;
    }
    int dev = device;
    if (device < 0) { /* KN_DEVICE_NEXT(k): k after the default */
        const char *ds = getenv("AFD_CUDA_DEVICE");
        dev = (ds && *ds ? atoi(ds) : 0) + (-1 - device);
    }
    if (dev < 0 || dev >= ndev) {
        cu_log(LOG_ERROR,
               "backend cuda: device %d (AFD_CUDA_DEVICE or --devices), but there "
               "are %d devices",
               dev, ndev);
        return AFD_ERR_RANGE;
    }
    struct cudaDeviceProp prop;
    if ((e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, dev)) != cudaSuccess) {
        cu_log(LOG_ERROR, "backend cuda: device %d: %s", dev, cudaGetErrorString(e));
        return AFD_ERR_UNSUPPORTED;
    }
    if (prop.major < 9) { /* the kernels are built for sm_90 */
        cu_log(LOG_ERROR, "backend cuda: %s is sm_%d%d; this build needs sm_90 (Hopper) or newer",
               prop.name, prop.major, prop.minor);
        return AFD_ERR_UNSUPPORTED;
    }
    kn_cuda_t *c = calloc(1, sizeof(*c));
    if (!c) return AFD_ERR_NOMEM;
    c->base.ops = &cuda_ops;
    c->base.threads = 1;
    c->device = dev;
    c->num_sms = prop.multiProcessorCount;
    afd_status_t st = queue_open(c);
    if (st) {
        free(c);
        return st;
    }
    if (g_multi_device == -2)
        g_multi_device = dev;
    else if (g_multi_device != dev)
        g_multi_device = -1;
    const char *at = getenv("AFD_CUDA_ATTN");
    c->attn_tc = at && !strcmp(at, "tc");
    const char *moe = getenv("AFD_CUDA_MOE");
    c->moe_grouped = moe && !strcmp(moe, "grouped");
    const char *gr = getenv("AFD_CUDA_GRAPHS");
    c->graphs = gr && !strcmp(gr, "1");
    const char *f8 = getenv("AFD_CUDA_FP8");
    char why[160] = "disabled by AFD_CUDA_FP8=0";
    double rel = 0;
    if (!(f8 && !strcmp(f8, "0")) &&
        kn_gemm_fp8_probe(c->gemm, &c->order_w, &c->order_x, &rel, why, sizeof(why)) == AFD_OK)
        c->fp8_native = 1;
    if (c->fp8_native)
        cu_log(LOG_INFO,
               "backend cuda: %s (sm_%d%d, %d SMs, %.1f GiB); fp8 weights: block-scaled "
               "cuBLASLt GEMM (scales: weights %s, activations %s; probe error %.2g)",
               prop.name, prop.major, prop.minor, prop.multiProcessorCount,
               (double)prop.totalGlobalMem / (1 << 30), kn_scale_order_name(c->order_w),
               kn_scale_order_name(c->order_x), rel);
    else
        cu_log(LOG_INFO,
               "backend cuda: %s (sm_%d%d, %d SMs, %.1f GiB); fp8 weights: dequantised to bf16 "
               "at load (%s)",
               prop.name, prop.major, prop.minor, prop.multiProcessorCount,
               (double)prop.totalGlobalMem / (1 << 30), why);
    *out = &c->base;
    return AFD_OK;
}

/* Whether the backend keeps whole-block fp8 weights as fp8 (for the checks). */
KN_EXPORT int kn_cuda_fp8_native(const kn_backend_t *be)
{
    return ((const kn_cuda_t *)be)->fp8_native;
}
