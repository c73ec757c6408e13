/*
 * kn_cpu: the cpu backend. Weights are dequantised to float32 at load; GEMMs go
 * through OpenBLAS; everything else is plain C in float32. This is the reference
 * every other backend is checked against.
 */
#define _GNU_SOURCE
#include "kn_ops.h"
#include "afd_log.h"
#include "kn_cuda_host.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/*
 * The reference for device backends (AFD_CPU_GEMM_ROUND, read at creation): GEMM inputs
 * rounded as the cuda backend rounds them, so that a check can hold it to a tight bound.
 *   bf16:   every GEMM's activations to bf16 (bf16 weights, or fp8 ones dequantised to
 *           bf16 at load: the cuda backend without the block-scaled fp8 GEMM)
 *   device: the same, except weights the device keeps in fp8 (whole 128x128 blocks,
 *           kn_fp8_native_ok): e4m3 activations with per-128 scales and a bf16 result
 *           (the cuda backend with the block-scaled fp8 GEMM)
 * Unset (the default), the cpu computes in float32 throughout.
 */
enum { KN_CPU_ROUND_NONE, KN_CPU_ROUND_BF16, KN_CPU_ROUND_DEVICE };

typedef struct kn_cpu {
    kn_backend_t base;
    float *scratch; /* attention: gathered K, V and scores */
    size_t scratch_cap;
    int gemm_round; /* KN_CPU_ROUND_* */
} kn_cpu_t;

/* a cpu weight's aux: set (to this marker) for weights a device keeps in fp8 */
static const char kn_cpu_fp8_marker;

#define KN_ATTN_MAX_SCORES (1u << 22) /* floats of scores per query tile */

/* scales may sit at any byte offset in a shard: read them with memcpy */
static float kn_src_scale(const kn_src_t *s, int64_t i)
{
    float v;
    memcpy(&v, (const uint8_t *)s->scale + 4 * (size_t)i, 4);
    return v;
}

float kn_src_get(const kn_src_t *s, int64_t r, int64_t c)
{
    int64_t R = s->row0 + r, C = s->col0 + c;
    size_t idx = (size_t)(R * s->full_cols + C);
    float v;
    afd_convert_to_f32(s->dtype, (const uint8_t *)s->data + idx * afd_dtype_size(s->dtype), &v, 1);
    if (s->scale) {
        int64_t bc = (s->full_cols + AFD_FP8_BLOCK - 1) / AFD_FP8_BLOCK;
        v *= kn_src_scale(s, (R / AFD_FP8_BLOCK) * bc + C / AFD_FP8_BLOCK);
    }
    return v;
}

void kn_src_dequant(const kn_src_t *s, float *dst)
{
    size_t es = afd_dtype_size(s->dtype);
    int64_t bc = (s->full_cols + AFD_FP8_BLOCK - 1) / AFD_FP8_BLOCK;
    for (int64_t r = 0; r < s->rows; r++) {
        int64_t R = s->row0 + r;
        float *d = dst + r * s->cols;
        const uint8_t *src = (const uint8_t *)s->data + (size_t)(R * s->full_cols + s->col0) * es;
        afd_convert_to_f32(s->dtype, src, d, (size_t)s->cols);
        if (!s->scale) continue;
        int64_t srow = (R / AFD_FP8_BLOCK) * bc;
        for (int64_t c0 = 0; c0 < s->cols;) { /* one scale per 128-column block */
            int64_t blk = (s->col0 + c0) / AFD_FP8_BLOCK;
            int64_t c1 = (blk + 1) * AFD_FP8_BLOCK - s->col0;
            if (c1 > s->cols) c1 = s->cols;
            float sc = kn_src_scale(s, srow + blk);
            for (int64_t c = c0; c < c1; c++)
                d[c] *= sc;
            c0 = c1;
        }
    }
}

static void cpu_destroy(kn_backend_t *be)
{
    kn_cpu_t *c = (kn_cpu_t *)be;
    free(c->scratch);
    free(c);
}

static void *cpu_alloc(kn_backend_t *be, size_t bytes)
{
    (void)be;
    return calloc(1, bytes ? bytes : 1);
}

static void cpu_free(kn_backend_t *be, void *p)
{
    (void)be;
    free(p);
}

static void cpu_copy(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    memcpy(dst, src, bytes);
}

static void cpu_zero(kn_backend_t *be, void *p, size_t bytes)
{
    (void)be;
    memset(p, 0, bytes);
}

static void cpu_sync(kn_backend_t *be)
{
    (void)be;
}

static afd_status_t cpu_weight_load(kn_backend_t *be, const kn_src_t *src, kn_weight_t *w)
{
    int mode = ((kn_cpu_t *)be)->gemm_round;
    AFD_ASSERT(src->row0 >= 0 && src->col0 >= 0 && src->row0 + src->rows <= src->full_rows &&
               src->col0 + src->cols <= src->full_cols);
    size_t nel = (size_t)(src->rows * src->cols);
    float *d = malloc(sizeof(float) * (nel ? nel : 1));
    if (!d) return AFD_ERR_NOMEM;
    kn_src_dequant(src, d);
    int fp8 = kn_fp8_native_ok(src);
    /* the reference modes: a device keeps every other weight in bf16 */
    if (mode != KN_CPU_ROUND_NONE && !(mode == KN_CPU_ROUND_DEVICE && fp8))
        for (size_t i = 0; i < nel; i++)
            d[i] = afd_round_bf16(d[i]);
    w->rows = src->rows;
    w->cols = src->cols;
    w->data = d;
    w->aux = fp8 ? (void *)&kn_cpu_fp8_marker : NULL;
    return AFD_OK;
}

static void cpu_weight_free(kn_backend_t *be, kn_weight_t *w)
{
    (void)be;
    free(w->data);
    w->data = NULL;
}

/* the reference modes' GEMM (AFD_CPU_GEMM_ROUND): inputs rounded to bf16, or for fp8
 * weights to e4m3 with per-128 scales and the product to bf16 before it is added */
static void matmul_rounded(const float *x, int n, const kn_weight_t *w, float *y, int accumulate,
                           int fp8)
{
    size_t nk = (size_t)n * (size_t)w->cols, nm = (size_t)n * (size_t)w->rows;
    float *xr = malloc(sizeof(float) * nk), *t = fp8 ? malloc(sizeof(float) * nm) : NULL;
    AFD_ASSERT(xr && (t || !fp8));
    memcpy(xr, x, sizeof(float) * nk);
    if (fp8) {
        afd_fp8_round_rows(xr, (size_t)n, (size_t)w->cols);
    } else {
        for (size_t i = 0; i < nk; i++)
            xr[i] = afd_round_bf16(xr[i]);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, (int)w->rows, (int)w->cols, 1.0f, xr,
                (int)w->cols, w->data, (int)w->cols, accumulate && !fp8 ? 1.0f : 0.0f, fp8 ? t : y,
                (int)w->rows);
    if (fp8)
        for (size_t i = 0; i < nm; i++)
            y[i] = (accumulate ? y[i] : 0.0f) + afd_round_bf16(t[i]);
    free(xr);
    free(t);
}

static void cpu_matmul(kn_backend_t *be, const float *x, int n, const kn_weight_t *w, float *y,
                       int accumulate)
{
    if (n <= 0) return;
    if (w->rows == 0 || w->cols == 0) {
        if (!accumulate) memset(y, 0, sizeof(float) * (size_t)n * (size_t)w->rows);
        return;
    }
    int mode = ((kn_cpu_t *)be)->gemm_round;
    if (mode != KN_CPU_ROUND_NONE) {
        matmul_rounded(x, n, w, y, accumulate, mode == KN_CPU_ROUND_DEVICE && w->aux);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, (int)w->rows, (int)w->cols, 1.0f, x,
                (int)w->cols, w->data, (int)w->cols, accumulate ? 1.0f : 0.0f, y, (int)w->rows);
}

static void cpu_rmsnorm(kn_backend_t *be, const float *x, int n, int dim, const float *weight,
                        float eps, float *out)
{
    (void)be;
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * dim;
        float *oi = out + (size_t)i * dim;
        double ss = 0;
        for (int j = 0; j < dim; j++)
            ss += (double)xi[j] * xi[j];
        float r = (float)(1.0 / sqrt(ss / dim + eps));
        for (int j = 0; j < dim; j++)
            oi[j] = xi[j] * r * weight[j];
    }
}

static void cpu_rope(kn_backend_t *be, float *x, int n, int nheads, int head_dim,
                     const int32_t *pos, double theta)
{
    (void)be;
    int half = head_dim / 2;
    float cs[2048], sn[2048];
    double inv[2048]; /* the frequencies depend on the head only: once per call */
    AFD_ASSERT(half <= 2048);
    for (int j = 0; j < half; j++)
        inv[j] = pow(theta, -2.0 * j / head_dim);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < half; j++) {
            double a = (double)pos[i] * inv[j];
            cs[j] = (float)cos(a);
            sn[j] = (float)sin(a);
        }
        for (int h = 0; h < nheads; h++) {
            float *v = x + ((size_t)i * nheads + h) * head_dim;
            for (int j = 0; j < half; j++) {
                float x1 = v[j], x2 = v[j + half];
                v[j] = x1 * cs[j] - x2 * sn[j];
                v[j + half] = x2 * cs[j] + x1 * sn[j];
            }
        }
    }
}

static void cpu_embed(kn_backend_t *be, const kn_weight_t *table, const int32_t *ids, int n,
                      float *out)
{
    (void)be;
    const float *t = table->data;
    for (int i = 0; i < n; i++) {
        AFD_ASSERT(ids[i] >= 0 && ids[i] < table->rows);
        memcpy(out + (size_t)i * table->cols, t + (size_t)ids[i] * table->cols,
               sizeof(float) * (size_t)table->cols);
    }
}

static void cpu_swiglu(kn_backend_t *be, const float *gate, const float *up, size_t n, float *out)
{
    (void)be;
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static void cpu_gather(kn_backend_t *be, const float *src, int dim, const int32_t *rows, int n,
                       float *dst)
{
    (void)be;
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)i * dim, src + (size_t)rows[i] * dim, sizeof(float) * (size_t)dim);
}

static void cpu_scatter_add(kn_backend_t *be, float *dst, int dim, const int32_t *rows,
                            const float *scale, int n, const float *src)
{
    (void)be;
    for (int i = 0; i < n; i++) {
        float *d = dst + (size_t)rows[i] * dim;
        const float *s = src + (size_t)i * dim;
        float w = scale[i];
        for (int j = 0; j < dim; j++)
            d[j] += w * s[j];
    }
}

static void cpu_add(kn_backend_t *be, float *y, const float *x, size_t n)
{
    (void)be;
    for (size_t i = 0; i < n; i++)
        y[i] += x[i];
}

static void cpu_router_topk(kn_backend_t *be, const float *logits, int n, int nexp, int k,
                            int renorm, int32_t *ids, float *weights)
{
    (void)be;
    float p[4096];
    AFD_ASSERT(nexp <= 4096 && k <= nexp);
    for (int i = 0; i < n; i++) {
        const float *l = logits + (size_t)i * nexp;
        float mx = l[0];
        for (int e = 1; e < nexp; e++)
            mx = fmaxf(mx, l[e]);
        float sum = 0;
        for (int e = 0; e < nexp; e++)
            sum += (p[e] = expf(l[e] - mx));
        for (int e = 0; e < nexp; e++)
            p[e] /= sum;
        float wsum = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < nexp; e++)
                if (p[e] >= 0 && (best < 0 || p[e] > p[best])) best = e;
            ids[(size_t)i * k + j] = best;
            weights[(size_t)i * k + j] = p[best];
            wsum += p[best];
            p[best] = -1.0f; /* taken */
        }
        if (renorm)
            for (int j = 0; j < k; j++)
                weights[(size_t)i * k + j] /= wsum;
    }
}

static size_t kv_index(const kn_kv_t *kv, int layer, int block, int slot)
{
    return (((size_t)layer * kv->num_blocks + (size_t)block) * kv->block_size + (size_t)slot);
}

static void kv_store(const kn_kv_t *kv, void *base, float *scales, size_t tok, const float *x)
{
    size_t hd = (size_t)kv->head_dim;
    if (kv->dtype == AFD_DTYPE_E4M3) {
        float amax = 0;
        for (size_t j = 0; j < hd; j++)
            amax = afd_maxf(amax, fabsf(x[j]));
        float s = amax > 0 ? amax / AFD_E4M3_MAX : 1.0f;
        uint8_t *d = (uint8_t *)base + tok * hd;
        for (size_t j = 0; j < hd; j++)
            d[j] = afd_f32_to_e4m3(x[j] / s);
        scales[tok] = s;
    } else {
        afd_convert_from_f32(kv->dtype, x, (uint8_t *)base + tok * hd * afd_dtype_size(kv->dtype),
                             hd);
    }
}

static void kv_load(const kn_kv_t *kv, const void *base, const float *scales, size_t tok, float *x)
{
    size_t hd = (size_t)kv->head_dim;
    afd_convert_to_f32(kv->dtype, (const uint8_t *)base + tok * hd * afd_dtype_size(kv->dtype), x,
                       hd);
    if (kv->dtype == AFD_DTYPE_E4M3)
        for (size_t j = 0; j < hd; j++)
            x[j] *= scales[tok];
}

static void cpu_kv_write(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seq,
                         const float *k, const float *v)
{
    (void)be;
    for (int t = 0; t < seq->ntok; t++) {
        int p = seq->pos0 + t;
        int blk = seq->block_table[p / kv->block_size];
        AFD_ASSERT(blk >= 0 && blk < kv->num_blocks);
        size_t tok = kv_index(kv, layer, blk, p % kv->block_size);
        kv_store(kv, kv->k, kv->k_scale, tok, k + (size_t)t * kv->head_dim);
        kv_store(kv, kv->v, kv->v_scale, tok, v + (size_t)t * kv->head_dim);
    }
}

static float *cpu_scratch(kn_cpu_t *c, size_t floats)
{
    if (floats > c->scratch_cap) {
        free(c->scratch);
        c->scratch = malloc(sizeof(float) * floats);
        AFD_ASSERT(c->scratch);
        c->scratch_cap = floats;
    }
    return c->scratch;
}

static void cpu_attention(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seq,
                          const float *q, int nheads, float scale, float *out)
{
    kn_cpu_t *c = (kn_cpu_t *)be;
    int hd = kv->head_dim, ctx = seq->pos0 + seq->ntok;
    if (seq->ntok <= 0) return;
    /* query tile: as many tokens as keep the score matrix bounded */
    int tile = (int)(KN_ATTN_MAX_SCORES / ((size_t)nheads * (size_t)ctx));
    if (tile < 1) tile = 1;
    if (tile > seq->ntok) tile = seq->ntok;
    size_t kvf = (size_t)ctx * hd;
    float *K = cpu_scratch(c, 2 * kvf + (size_t)tile * nheads * ctx);
    float *V = K + kvf, *S = V + kvf;
    for (int p = 0; p < ctx; p++) {
        int blk = seq->block_table[p / kv->block_size];
        AFD_ASSERT(blk >= 0 && blk < kv->num_blocks);
        size_t tok = kv_index(kv, layer, blk, p % kv->block_size);
        kv_load(kv, kv->k, kv->k_scale, tok, K + (size_t)p * hd);
        kv_load(kv, kv->v, kv->v_scale, tok, V + (size_t)p * hd);
    }
    for (int t0 = 0; t0 < seq->ntok; t0 += tile) {
        int nt = seq->ntok - t0 < tile ? seq->ntok - t0 : tile;
        /* keys visible to the last query of the tile */
        int kmax = seq->pos0 + t0 + nt;
        int rows = nt * nheads;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kmax, hd, scale,
                    q + (size_t)t0 * nheads * hd, hd, K, hd, 0.0f, S, kmax);
        for (int t = 0; t < nt; t++) {
            int visible = seq->pos0 + t0 + t + 1;
            for (int h = 0; h < nheads; h++) {
                float *s = S + ((size_t)t * nheads + h) * kmax;
                float mx = -INFINITY;
                for (int j = 0; j < visible; j++)
                    mx = afd_maxf(mx, s[j]);
                float sum = 0;
                for (int j = 0; j < visible; j++)
                    sum += (s[j] = expf(s[j] - mx));
                float inv = 1.0f / sum;
                for (int j = 0; j < visible; j++)
                    s[j] *= inv;
                for (int j = visible; j < kmax; j++)
                    s[j] = 0.0f;
            }
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, kmax, 1.0f, S, kmax, V, hd,
                    0.0f, out + (size_t)t0 * nheads * hd, hd);
    }
}

static void cpu_round(kn_backend_t *be, float *x, int rows, int dim, afd_dtype_t dt)
{
    (void)be;
    size_t n = (size_t)rows * dim;
    switch (dt) {
    case AFD_DTYPE_F32:
        break;
    case AFD_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            x[i] = afd_round_bf16(x[i]);
        break;
    case AFD_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            x[i] = afd_f16_to_f32(afd_f32_to_f16(x[i]));
        break;
    case AFD_DTYPE_E4M3:
        afd_fp8_round_rows(x, (size_t)rows, (size_t)dim);
        break;
    default:
        AFD_ASSERT(0 && "invalid dtype");
    }
}

static afd_status_t cpu_create_with(const kn_ops_t *ops, int threads, kn_backend_t **out);

/* a sibling: a backend of its own with the same ops (they finish in order anyway) */
static kn_backend_t *cpu_fork(kn_backend_t *be)
{
    kn_backend_t *out = NULL;
    return cpu_create_with(be->ops, be->threads, &out) == AFD_OK ? out : NULL;
}

static const kn_ops_t cpu_ops = {
    .name = "cpu",
    .host_memory = 1,
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .weight_load = cpu_weight_load,
    .weight_free = cpu_weight_free,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .embed = cpu_embed,
    .swiglu = cpu_swiglu,
    .gather = cpu_gather,
    .scatter_add = cpu_scatter_add,
    .add = cpu_add,
    .router_topk = cpu_router_topk,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
    .round = cpu_round,
    .fork = cpu_fork,
};

static afd_status_t cpu_create_with(const kn_ops_t *ops, int threads, kn_backend_t **out)
{
    kn_cpu_t *c = calloc(1, sizeof(*c));
    if (!c) return AFD_ERR_NOMEM;
    c->base.ops = ops;
    const char *r = getenv("AFD_CPU_GEMM_ROUND");
    if (r && *r) {
        if (!strcmp(r, "bf16")) {
            c->gemm_round = KN_CPU_ROUND_BF16;
        } else if (!strcmp(r, "device")) {
            c->gemm_round = KN_CPU_ROUND_DEVICE;
        } else {
            afd_error("backend cpu: AFD_CPU_GEMM_ROUND=%s: expected bf16 or device", r);
            free(c);
            return AFD_ERR_INVALID;
        }
    }
    if (threads > 0) openblas_set_num_threads(threads);
    c->base.threads = openblas_get_num_threads();
    *out = &c->base;
    return AFD_OK;
}

afd_status_t kn_cpu_create(int threads, kn_backend_t **out)
{
    return cpu_create_with(&cpu_ops, threads, out);
}

/*
 * cpu-dev: the cpu backend presenting itself as a device backend (host_memory 0), with
 * the optional ops a device backend has. Its memory is still host memory and its ops
 * finish in order, so it computes exactly what cpu does; what it adds is that the nodes
 * and the runner take their device paths (staging, packing through the backend, sibling
 * queues, tensor-parallel groups, segmented expert GEMMs, sampling from candidates),
 * which the tests then run on machines without a GPU.
 */
static kn_ops_t cpu_dev_ops;

/* the segmented GEMMs a device has, here segment by segment: callers take the path a
 * device takes (one SwiGLU over all rows) */
static void cpu_dev_matmul_segments(kn_backend_t *be, const float *x, const int32_t *off, int nseg,
                                    const kn_weight_t *w, float *y)
{
    for (int s = 0; s < nseg; s++)
        if (off[s + 1] > off[s])
            cpu_matmul(be, x + (size_t)off[s] * (size_t)w[s].cols, off[s + 1] - off[s], &w[s],
                       y + (size_t)off[s] * (size_t)w[s].rows, 0);
}

static void cpu_dev_download_async(kn_backend_t *be, void *dst, const void *src, size_t bytes)
{
    cpu_copy(be, dst, src, bytes);
}

static void cpu_dev_rows_encode(kn_backend_t *be, afd_dtype_t dt, const float *x, int rows, int dim,
                                void *dst)
{
    (void)be;
    afd_rows_encode(dt, x, (size_t)rows, (size_t)dim, dst);
}

static void cpu_dev_rows_decode(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows,
                                int dim, float *x)
{
    (void)be;
    afd_rows_decode(dt, src, (size_t)rows, (size_t)dim, x);
}

static void cpu_dev_rows_add(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim,
                             float *y)
{
    (void)be;
    afd_rows_add(dt, src, (size_t)rows, (size_t)dim, y);
}

/* each row's k best (logit descending, id ascending) by insertion, and its log-sum-exp */
static afd_status_t cpu_dev_logits_top(kn_backend_t *be, const float *logits, int rows, int vocab,
                                       int k, int32_t *top_ids, float *top_logits, double *lse)
{
    (void)be;
    if (k < 1 || k > KN_TOP_K_MAX) return AFD_ERR_RANGE;
    for (int r = 0; r < rows; r++) {
        const float *l = logits + (size_t)r * vocab;
        int32_t *ids = top_ids + (size_t)r * k;
        int cnt = 0;
        for (int32_t i = 0; i < vocab; i++) {
#define BEFORE(a, b) (l[a] > l[b] || (l[a] == l[b] && (a) < (b)))
            if (cnt == k && !BEFORE(i, ids[k - 1])) continue;
            int j = cnt < k ? cnt++ : k - 1;
            while (j > 0 && BEFORE(i, ids[j - 1])) {
                ids[j] = ids[j - 1];
                j--;
            }
            ids[j] = i;
#undef BEFORE
        }
        for (int j = cnt; j < k; j++) /* a vocabulary smaller than k */
            ids[j] = ids[cnt - 1];
        for (int j = 0; j < k; j++)
            top_logits[(size_t)r * k + j] = l[ids[j]];
        double mx = l[ids[0]], sum = 0;
        for (int i = 0; i < vocab; i++)
            sum += exp((double)l[i] - mx);
        lse[r] = mx + log(sum);
    }
    return AFD_OK;
}

typedef struct cpu_dev_group {
    int n;
} cpu_dev_group_t;

static afd_status_t cpu_dev_group_open(kn_backend_t *const *ranks, int n, void **grp)
{
    (void)ranks;
    cpu_dev_group_t *g = calloc(1, sizeof(*g));
    if (!g) return AFD_ERR_NOMEM;
    g->n = n;
    *grp = g;
    return AFD_OK;
}

static void cpu_dev_group_reduce(void *grp, float *const *bufs, size_t count)
{
    cpu_dev_group_t *g = grp;
    for (int i = 1; i < g->n; i++)
        for (size_t k = 0; k < count; k++)
            bufs[0][k] += bufs[i][k];
}

static void cpu_dev_group_bcast(void *grp, void *const *bufs, size_t bytes)
{
    cpu_dev_group_t *g = grp;
    for (int i = 1; i < g->n; i++)
        memcpy(bufs[i], bufs[0], bytes);
}

static void cpu_dev_group_close(void *grp)
{
    free(grp);
}

afd_status_t kn_cpu_dev_create(int threads, kn_backend_t **out)
{
    if (!cpu_dev_ops.name) {
        cpu_dev_ops = cpu_ops;
        cpu_dev_ops.name = "cpu-dev";
        cpu_dev_ops.host_memory = 0;
        cpu_dev_ops.download_async = cpu_dev_download_async;
        cpu_dev_ops.copy = cpu_copy;
        cpu_dev_ops.matmul_segments = cpu_dev_matmul_segments;
        cpu_dev_ops.rows_encode = cpu_dev_rows_encode;
        cpu_dev_ops.rows_decode = cpu_dev_rows_decode;
        cpu_dev_ops.rows_add = cpu_dev_rows_add;
        cpu_dev_ops.logits_top = cpu_dev_logits_top;
        cpu_dev_ops.group_open = cpu_dev_group_open;
        cpu_dev_ops.group_reduce = cpu_dev_group_reduce;
        cpu_dev_ops.group_bcast = cpu_dev_group_bcast;
        cpu_dev_ops.group_close = cpu_dev_group_close;
    }
    return cpu_create_with(&cpu_dev_ops, threads, out);
}
