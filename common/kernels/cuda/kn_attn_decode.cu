/*
 * kn_attn_decode: MFA decode attention over the paged KV cache. All query heads share
 * the one KV head, so a block loads each tile of KV positions once into shared memory
 * and every head uses it (the arithmetic intensity that makes MFA cheap); split-K over
 * the context gives long sequences enough blocks, and a second kernel merges the
 * splits with their (max, sum) pairs.
 */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

/*
 * grid (splits, nseq); thread = (head h, lane r of tph); the thread holds dims
 * r, r + tph, ... of its head (EPT of them) so a warp reads a tile row without bank
 * conflicts. Partial results: ws_o (nseq, splits, nheads, head_dim) unnormalised,
 * ws_ml (nseq, splits, nheads, 2) the running max and sum.
 */
template <int EPT>
__global__ void __launch_bounds__(KN_ATTN_MAX_THREADS(EPT))
    kn_attn_decode_kernel(kn_cu_kv_t kv, int layer, const int32_t *block_tables, int bt_stride,
                          const int32_t *ctx_lens, const float *q, int nheads, float scale,
                          int chunk, int tile, int splits, float *ws_o, float *ws_ml)
{
    KN_DYN_SMEM(float, sm);
    const int hd = kv.head_dim, tph = hd / EPT;
    const int seq = blockIdx.y, split = blockIdx.x;
    const int h = threadIdx.x / tph, r = threadIdx.x % tph;
    const int ctx = ctx_lens[seq];
    const int c0 = split * chunk, c1 = min(ctx, c0 + chunk);
    const int32_t *bt = block_tables + (size_t)seq * bt_stride;
    const size_t layer_base = (size_t)layer * kv.num_blocks;
    float *Ks = sm, *Vs = sm + (size_t)tile * hd;
    float qr[EPT], acc[EPT];
    const float *qh = q + ((size_t)seq * nheads + h) * hd;
#pragma unroll
    for (int e = 0; e < EPT; e++) {
        qr[e] = qh[r + e * tph] * scale;
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int t0 = c0; t0 < c1; t0 += tile) {
        const int nt = min(tile, c1 - t0);
        __syncthreads(); /* the previous tile is consumed */
        for (int idx = threadIdx.x; idx < nt * hd; idx += blockDim.x) {
            int j = idx / hd, d = idx - j * hd, pos = t0 + j;
            int blk = bt[pos / kv.block_size];
            size_t tok = (layer_base + (size_t)blk) * kv.block_size + (size_t)(pos % kv.block_size);
            float ks = 1.0f, vs = 1.0f;
            if (kv.dtype == AFD_DTYPE_E4M3) {
                ks = kv.k_scale[tok];
                vs = kv.v_scale[tok];
            }
            Ks[idx] = kn_kv_elem(kv.k, tok * hd + d, kv.dtype) * ks;
            Vs[idx] = kn_kv_elem(kv.v, tok * hd + d, kv.dtype) * vs;
        }
        __syncthreads();
        for (int j = 0; j < nt; j++) {
            const float *kj = Ks + (size_t)j * hd, *vj = Vs + (size_t)j * hd;
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < EPT; e++)
                s += qr[e] * kj[r + e * tph];
            for (int o = tph >> 1; o > 0; o >>= 1)
                s += __shfl_xor_sync(0xffffffffu, s, o);
            float mn = fmaxf(m, s);
            float corr = expf(m - mn), p = expf(s - mn);
            l = l * corr + p;
#pragma unroll
            for (int e = 0; e < EPT; e++)
                acc[e] = acc[e] * corr + p * vj[r + e * tph];
            m = mn;
        }
    }
    size_t part = ((size_t)seq * splits + split) * nheads + h;
    float *o = ws_o + part * hd;
#pragma unroll
    for (int e = 0; e < EPT; e++)
        o[r + e * tph] = acc[e];
    if (r == 0) {
        ws_ml[2 * part] = m;
        ws_ml[2 * part + 1] = l;
    }
}

/* grid (nheads, nseq), one thread per dim */
__global__ void kn_attn_combine_kernel(const float *ws_o, const float *ws_ml, int splits,
                                       int nheads, int hd, float *out)
{
    int h = blockIdx.x, seq = blockIdx.y;
    float M = -INFINITY;
    for (int s = 0; s < splits; s++)
        M = fmaxf(M, ws_ml[2 * (((size_t)seq * splits + s) * nheads + h)]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float L = 0.0f, o = 0.0f;
        for (int s = 0; s < splits; s++) {
            size_t part = ((size_t)seq * splits + s) * nheads + h;
            float ms = ws_ml[2 * part];
            if (ms == -INFINITY) continue; /* an empty split */
            float w = expf(ms - M);
            L += ws_ml[2 * part + 1] * w;
            o += ws_o[part * hd + d] * w;
        }
        out[((size_t)seq * nheads + h) * hd + d] = L > 0.0f ? o / L : 0.0f;
    }
}

/* merges the splits' partial results into out (nseq, nheads, hd) */
cudaError_t kn_attn_combine(const float *ws_o, const float *ws_ml, int splits, int nheads, int hd,
                            int nseq, float *out, cudaStream_t stream)
{
    int threads = hd >= 1024 ? 1024 : (hd + 31) / 32 * 32;
    KN_LAUNCH(kn_attn_combine_kernel, dim3(nheads, nseq), threads, 0, stream)
    (ws_o, ws_ml, splits, nheads, hd, out);
    return cudaGetLastError();
}

template <int EPT>
static cudaError_t kn_decode_launch(const kn_attn_plan_t *p, const kn_cu_kv_t *kv, int layer,
                                    const int32_t *bts, int bt_stride, const int32_t *ctx_lens,
                                    int nseq, const float *q, int nheads, float scale, float *ws_o,
                                    float *ws_ml, cudaStream_t stream)
{
    static size_t smem_set; /* the dynamic shared-memory limit raised so far */
    size_t smem = 2 * sizeof(float) * (size_t)p->tile * kv->head_dim;
    if (smem > 48 * 1024 && smem > smem_set) {
        cudaError_t e = cudaFuncSetAttribute(
            kn_attn_decode_kernel<EPT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        smem_set = smem;
    }
    dim3 grid(p->splits, nseq);
    KN_LAUNCH(kn_attn_decode_kernel<EPT>, grid, p->threads, smem, stream)
    (*kv, layer, bts, bt_stride, ctx_lens, q, nheads, scale, p->chunk, p->tile, p->splits, ws_o,
     ws_ml);
    return cudaGetLastError();
}

extern "C" cudaError_t kn_cu_attn_decode(const kn_attn_plan_t *p, const kn_cu_kv_t *kv, int layer,
                                         const int32_t *block_tables, int bt_stride,
                                         const int32_t *ctx_lens, int nseq, const float *q,
                                         int nheads, float scale, float *ws, float *out,
                                         cudaStream_t stream)
{
    if (nseq <= 0) return cudaSuccess;
    if (p->threads != nheads * p->tph || p->tph * p->ept != kv->head_dim ||
        p->threads > KN_ATTN_MAX_THREADS(p->ept))
        return cudaErrorInvalidValue;
    float *ws_o = ws;
    float *ws_ml = ws + (size_t)nseq * p->splits * nheads * kv->head_dim;
    cudaError_t e;
    switch (p->ept) {
#define KN_EPT_CASE(n)                                                                             \
    case n:                                                                                        \
        e = kn_decode_launch<n>(p, kv, layer, block_tables, bt_stride, ctx_lens, nseq, q, nheads,  \
                                scale, ws_o, ws_ml, stream);                                       \
        break;
        KN_EPT_CASE(1)
        KN_EPT_CASE(2)
        KN_EPT_CASE(4)
        KN_EPT_CASE(8)
        KN_EPT_CASE(16)
        KN_EPT_CASE(32)
        KN_EPT_CASE(64)
#undef KN_EPT_CASE
    default:
        return cudaErrorInvalidValue;
    }
    if (e != cudaSuccess) return e;
    return kn_attn_combine(ws_o, ws_ml, p->splits, nheads, kv->head_dim, nseq, out, stream);
}
