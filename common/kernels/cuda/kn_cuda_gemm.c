/* kn_cuda_gemm: cuBLASLt bf16 and block-scaled fp8 GEMMs with a plan cache. */
#include "kn_cuda_gemm.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KN_PLANS 256

typedef struct kn_plan {
    int used, fp8, M, N, K, accumulate;
    int ok; /* cuBLASLt has an algorithm */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
} kn_plan_t;

struct kn_gemm {
    cublasLtHandle_t lt;
    void *ws;
    size_t ws_bytes;
    kn_plan_t plans[KN_PLANS];
    int next; /* round-robin eviction */
};

static void plan_clear(kn_plan_t *p)
{
    if (!p->used) return;
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    memset(p, 0, sizeof(*p));
}

afd_status_t kn_gemm_create(size_t ws_bytes, kn_gemm_t **out)
{
    kn_gemm_t *g = calloc(1, sizeof(*g));
    if (!g) return AFD_ERR_NOMEM;
    if (cublasLtCreate(&g->lt) != CUBLAS_STATUS_SUCCESS) {
        free(g);
        return AFD_ERR_UNSUPPORTED;
    }
    if (ws_bytes && cudaMalloc(&g->ws, ws_bytes) != cudaSuccess) {
        cublasLtDestroy(g->lt);
        free(g);
        return AFD_ERR_NOMEM;
    }
    g->ws_bytes = ws_bytes;
    *out = g;
    return AFD_OK;
}

void kn_gemm_destroy(kn_gemm_t *g)
{
    if (!g) return;
    for (int i = 0; i < KN_PLANS; i++)
        plan_clear(&g->plans[i]);
    if (g->ws) cudaFree(g->ws);
    cublasLtDestroy(g->lt);
    free(g);
}

static kn_plan_t *plan_get(kn_gemm_t *g, int fp8, int M, int N, int K, int accumulate)
{
    for (int i = 0; i < KN_PLANS; i++) {
        kn_plan_t *p = &g->plans[i];
        if (p->used && p->fp8 == fp8 && p->M == M && p->N == N && p->K == K &&
            p->accumulate == accumulate)
            return p;
    }
    kn_plan_t *p = &g->plans[g->next];
    g->next = (g->next + 1) % KN_PLANS;
    plan_clear(p);
    p->used = 1;
    p->fp8 = fp8;
    p->M = M;
    p->N = N;
    p->K = K;
    p->accumulate = accumulate;
    cudaDataType_t ab = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF, cd = fp8 ? CUDA_R_16BF : CUDA_R_32F;
    cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
    int st = 0;
    st |= cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (st) return p;
    st |= cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT));
    st |= cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN));
    if (fp8) {
        int32_t am = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
        int32_t bm = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
        st |= cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &am,
                                             sizeof(am));
        st |= cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bm,
                                             sizeof(bm));
    }
    st |= cublasLtMatrixLayoutCreate(&p->a, ab, (uint64_t)K, (uint64_t)M, (int64_t)K);
    st |= cublasLtMatrixLayoutCreate(&p->b, ab, (uint64_t)K, (uint64_t)N, (int64_t)K);
    st |= cublasLtMatrixLayoutCreate(&p->c, cd, (uint64_t)M, (uint64_t)N, (int64_t)M);
    if (st) return p;
    cublasLtMatmulPreference_t pref;
    if (cublasLtMatmulPreferenceCreate(&pref)) return p;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                         &g->ws_bytes, sizeof(g->ws_bytes));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(g->lt, p->desc, p->a, p->b, p->c, p->c, pref, 1, &res,
                                       &found) == CUBLAS_STATUS_SUCCESS &&
        found > 0) {
        p->algo = res.algo;
        p->ok = 1;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    return p;
}

afd_status_t kn_gemm_bf16(kn_gemm_t *g, const uint16_t *w, const uint16_t *x, int M, int N, int K,
                          float *y, int accumulate, cudaStream_t stream)
{
    if (M <= 0 || N <= 0 || K <= 0) return AFD_ERR_INVALID;
    kn_plan_t *p = plan_get(g, 0, M, N, K, accumulate);
    if (!p->ok) return AFD_ERR_UNSUPPORTED;
    float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    cublasStatus_t st = cublasLtMatmul(g->lt, p->desc, &alpha, w, p->a, x, p->b, &beta, y, p->c, y,
                                       p->c, &p->algo, g->ws, g->ws_bytes, stream);
    return st == CUBLAS_STATUS_SUCCESS ? AFD_OK : AFD_ERR_IO;
}

afd_status_t kn_gemm_fp8(kn_gemm_t *g, const uint8_t *w, const float *w_scale, const uint8_t *x,
                         const float *x_scale, int M, int N, int K, uint16_t *d,
                         cudaStream_t stream)
{
    if (M <= 0 || N <= 0 || K <= 0) return AFD_ERR_INVALID;
    kn_plan_t *p = plan_get(g, 1, M, N, K, 0);
    if (!p->ok) return AFD_ERR_UNSUPPORTED;
    if (cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale,
                                       sizeof(w_scale)) ||
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale,
                                       sizeof(x_scale)))
        return AFD_ERR_IO;
    float alpha = 1.0f, beta = 0.0f;
    cublasStatus_t st = cublasLtMatmul(g->lt, p->desc, &alpha, w, p->a, x, p->b, &beta, d, p->c, d,
                                       p->c, &p->algo, g->ws, g->ws_bytes, stream);
    return st == CUBLAS_STATUS_SUCCESS ? AFD_OK : AFD_ERR_IO;
}

/* ---- the start-up probe ---- */

static float e4m3_value(uint8_t b) /* host decode: bias 7, 3 mantissa bits, no infinities */
{
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
    return s ? -v : v;
}

static float bf16_value(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint8_t probe_byte(unsigned *seed)
{
    *seed = *seed * 1103515245u + 12345u;
    uint8_t b = (uint8_t)((*seed >> 16) & 0xff);
    if ((b & 0x7f) >= 0x78) b &= 0xb7; /* keep |v| < 256 and away from NaN (0x7f, 0xff) */
    return b;
}

/* host operands of one probe: W (M, K) e4m3 with (M/128, K/128) scales, x (N, K) e4m3 with
 * (N, K/128) scales, and the reference (N, M) */
typedef struct probe {
    int M, N, K;
    uint8_t *hw, *hx;
    float *wsc, *xsc, *ref, *hs;
    uint16_t *hd;
    double rmax;
    uint8_t *dw, *dx;
    float *dws, *dxs;
    uint16_t *dd;
    size_t sbytes;
} probe_t;

static void probe_free(probe_t *p)
{
    cudaFree(p->dw);
    cudaFree(p->dx);
    cudaFree(p->dws);
    cudaFree(p->dxs);
    cudaFree(p->dd);
    free(p->hw);
    free(p->hx);
    free(p->wsc);
    free(p->xsc);
    free(p->ref);
    free(p->hs);
    free(p->hd);
    memset(p, 0, sizeof(*p));
}

static afd_status_t probe_init(probe_t *p, int M, int N, int K, unsigned seed)
{
    int MB = M / 128, KB = K / 128;
    memset(p, 0, sizeof(*p));
    p->M = M;
    p->N = N;
    p->K = K;
    p->sbytes = sizeof(float) * (size_t)((N + 4) * KB + (MB + 4) * KB);
    p->hw = malloc((size_t)M * K);
    p->hx = malloc((size_t)N * K);
    p->wsc = malloc(sizeof(float) * MB * KB);
    p->xsc = malloc(sizeof(float) * N * KB);
    p->ref = malloc(sizeof(float) * M * N);
    p->hs = malloc(p->sbytes);
    p->hd = malloc(2ul * M * N);
    if (!p->hw || !p->hx || !p->wsc || !p->xsc || !p->ref || !p->hs || !p->hd) return AFD_ERR_NOMEM;
    for (int i = 0; i < M * K; i++)
        p->hw[i] = probe_byte(&seed);
    for (int i = 0; i < N * K; i++)
        p->hx[i] = probe_byte(&seed);
    for (int i = 0; i < MB * KB; i++)
        p->wsc[i] = ldexpf(1.0f, i - 2) * 1.25f; /* distinct per block: a wrong layout shows */
    for (int i = 0; i < N * KB; i++)
        p->xsc[i] = ldexpf(1.0f, (i % 7) - 3) * (1.0f + (float)(i % 3) / 4.0f);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (double)e4m3_value(p->hw[m * K + k]) * p->wsc[(m / 128) * KB + k / 128] *
                     e4m3_value(p->hx[n * K + k]) * p->xsc[n * KB + k / 128];
            p->ref[n * M + m] = (float)s;
            if (fabs(s) > p->rmax) p->rmax = fabs(s);
        }
    if (cudaMalloc((void **)&p->dw, (size_t)M * K) || cudaMalloc((void **)&p->dx, (size_t)N * K) ||
        cudaMalloc((void **)&p->dws, p->sbytes) || cudaMalloc((void **)&p->dxs, p->sbytes) ||
        cudaMalloc((void **)&p->dd, 2ul * M * N)) {
        cudaGetLastError();
        return AFD_ERR_NOMEM;
    }
    if (cudaMemcpy(p->dw, p->hw, (size_t)M * K, cudaMemcpyHostToDevice) ||
        cudaMemcpy(p->dx, p->hx, (size_t)N * K, cudaMemcpyHostToDevice))
        return AFD_ERR_IO;
    return AFD_OK;
}

/* one GEMM with the scales laid out in (ow, ox); OK with *rel set, or why not */
static afd_status_t probe_run(kn_gemm_t *g, probe_t *p, kn_scale_order_t ow, kn_scale_order_t ox,
                              double *rel)
{
    int MB = p->M / 128, KB = p->K / 128;
    memset(p->hs, 0, p->sbytes);
    for (int m = 0; m < MB; m++)
        for (int k = 0; k < KB; k++)
            p->hs[kn_scale_index(ow, MB, KB, m, k)] = p->wsc[m * KB + k];
    if (cudaMemcpy(p->dws, p->hs, p->sbytes, cudaMemcpyHostToDevice)) return AFD_ERR_IO;
    memset(p->hs, 0, p->sbytes);
    for (int n = 0; n < p->N; n++)
        for (int k = 0; k < KB; k++)
            p->hs[kn_scale_index(ox, p->N, KB, n, k)] = p->xsc[n * KB + k];
    if (cudaMemcpy(p->dxs, p->hs, p->sbytes, cudaMemcpyHostToDevice) ||
        cudaMemset(p->dd, 0, 2ul * p->M * p->N))
        return AFD_ERR_IO;
    afd_status_t st = kn_gemm_fp8(g, p->dw, p->dws, p->dx, p->dxs, p->M, p->N, p->K, p->dd, 0);
    if (st) return st;
    if (cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(p->hd, p->dd, 2ul * p->M * p->N, cudaMemcpyDeviceToHost)) {
        cudaGetLastError();
        return AFD_ERR_IO;
    }
    double err = 0;
    for (int i = 0; i < p->M * p->N; i++) {
        double e = fabs((double)bf16_value(p->hd[i]) - p->ref[i]);
        if (!(e <= err)) err = e;
    }
    *rel = p->rmax > 0 ? err / p->rmax : err;
    return AFD_OK;
}

#define KN_PROBE_TOL 1e-2 /* bf16 output rounding is 2^-9 relative */

afd_status_t kn_gemm_fp8_probe(kn_gemm_t *g, kn_scale_order_t *order_w, kn_scale_order_t *order_x,
                               double *max_rel, char *why, size_t why_len)
{
    probe_t p;
    afd_status_t ret = AFD_ERR_UNSUPPORTED, st;
    double rel = INFINITY;
    *max_rel = INFINITY;
    snprintf(why, why_len, "no memory for the probe");
    /* 2 weight row blocks (padded columns differ from unpadded), 64 tokens */
    if ((st = probe_init(&p, 256, 64, 256, 12345))) goto out;
    int found = 0;
    kn_scale_order_t bw = KN_SCALE_OUTER_FAST, bx = KN_SCALE_OUTER_FAST;
    for (int ow = 0; ow < KN_SCALE_ORDERS && !found; ow++)
        for (int ox = 0; ox < KN_SCALE_ORDERS && !found; ox++) {
            st = probe_run(g, &p, (kn_scale_order_t)ow, (kn_scale_order_t)ox, &rel);
            if (st == AFD_ERR_UNSUPPORTED) {
                snprintf(why, why_len, "cuBLASLt has no block-scaled fp8 algorithm on this device");
                goto out;
            }
            if (st) {
                snprintf(why, why_len, "the block-scaled fp8 GEMM failed to run (%s)",
                         cudaGetErrorString(cudaGetLastError()));
                goto out;
            }
            if (rel < *max_rel) *max_rel = rel;
            if (rel < KN_PROBE_TOL) {
                found = 1;
                bw = (kn_scale_order_t)ow;
                bx = (kn_scale_order_t)ox;
            }
        }
    if (!found) {
        snprintf(why, why_len,
                 "the block-scaled fp8 GEMM disagrees with the reference in every "
                 "scale layout (best relative error %.3g)",
                 *max_rel);
        goto out;
    }
    /* 66 tokens: padded and unpadded activation columns differ */
    if (bx != KN_SCALE_INNER_FAST) {
        probe_free(&p);
        if (probe_init(&p, 256, 66, 256, 777) == AFD_OK) {
            kn_scale_order_t cand[2] = {KN_SCALE_OUTER_FAST, KN_SCALE_OUTER_TIGHT};
            for (int i = 0; i < 2; i++)
                if (probe_run(g, &p, bw, cand[i], &rel) == AFD_OK && rel < KN_PROBE_TOL) {
                    bx = cand[i];
                    break;
                }
        }
        cudaGetLastError();
    }
    *order_w = bw;
    *order_x = bx;
    ret = AFD_OK;
    snprintf(why, why_len, "ok");
out:
    probe_free(&p);
    return ret;
}
