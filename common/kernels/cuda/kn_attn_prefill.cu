/*
 * kn_attn_prefill: causal attention for the new tokens of one sequence against its
 * cached positions (prefill chunks; any shape). One block per (token, head): a warp
 * per key for the scores of a tile of 32 keys, then an online softmax and the V sum
 * with one thread per dim.
 */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

#define KN_PF_THREADS 128
#define KN_PF_TILE    32
#define KN_PF_DIMS    (1024 / KN_PF_THREADS) /* dims per thread: head_dim <= 1024 */

__global__ void __launch_bounds__(KN_PF_THREADS)
    kn_attn_prefill_kernel(kn_cu_kv_t kv, int layer, const int32_t *bt, int pos0, const float *q,
                           int nheads, float scale, float *out)
{
    KN_DYN_SMEM(float, sm);
    const int t = blockIdx.x, h = blockIdx.y, hd = kv.head_dim;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float *qs = sm, *S = sm + hd;
    const float *qv = q + ((size_t)t * nheads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        qs[d] = qv[d] * scale;
    const size_t layer_base = (size_t)layer * kv.num_blocks;
    const int visible = pos0 + t + 1;
    float acc[KN_PF_DIMS];
#pragma unroll
    for (int i = 0; i < KN_PF_DIMS; i++)
        acc[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int k0 = 0; k0 < visible; k0 += KN_PF_TILE) {
        int nk = min(KN_PF_TILE, visible - k0);
        __syncthreads(); /* qs written; S of the previous tile consumed */
        for (int j = warp; j < nk; j += nw) {
            int pos = k0 + j;
            size_t tok = (layer_base + (size_t)bt[pos / kv.block_size]) * kv.block_size +
                         (size_t)(pos % kv.block_size);
            float s = 0.0f;
            for (int d = lane; d < hd; d += 32)
                s += qs[d] * kn_kv_elem(kv.k, tok * hd + d, kv.dtype);
            s = kn_warp_sum(s);
            if (kv.dtype == AFD_DTYPE_E4M3) s *= kv.k_scale[tok];
            if (lane == 0) S[j] = s;
        }
        __syncthreads();
        float mt = -INFINITY;
        for (int j = 0; j < nk; j++)
            mt = fmaxf(mt, S[j]);
        float mn = fmaxf(m, mt), corr = expf(m - mn);
        l *= corr;
#pragma unroll
        for (int i = 0; i < KN_PF_DIMS; i++)
            acc[i] *= corr;
        for (int j = 0; j < nk; j++) {
            int pos = k0 + j;
            size_t tok = (layer_base + (size_t)bt[pos / kv.block_size]) * kv.block_size +
                         (size_t)(pos % kv.block_size);
            float p = expf(S[j] - mn);
            l += p;
            if (kv.dtype == AFD_DTYPE_E4M3) p *= kv.v_scale[tok];
#pragma unroll
            for (int i = 0; i < KN_PF_DIMS; i++) {
                int d = threadIdx.x + i * KN_PF_THREADS;
                if (d < hd) acc[i] += p * kn_kv_elem(kv.v, tok * hd + d, kv.dtype);
            }
        }
        m = mn;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float *o = out + ((size_t)t * nheads + h) * hd;
#pragma unroll
    for (int i = 0; i < KN_PF_DIMS; i++) {
        int d = threadIdx.x + i * KN_PF_THREADS;
        if (d < hd) o[d] = acc[i] * inv;
    }
}

extern "C" cudaError_t kn_cu_attn_prefill(const kn_cu_kv_t *kv, int layer,
                                          const int32_t *block_table, int pos0, int ntok,
                                          const float *q, int nheads, float scale, float *out,
                                          cudaStream_t stream)
{
    if (ntok <= 0) return cudaSuccess;
    if (kv->head_dim <= 0 || kv->head_dim > 1024 || nheads <= 0 || nheads > 65535)
        return cudaErrorInvalidValue;
    size_t smem = sizeof(float) * ((size_t)kv->head_dim + KN_PF_TILE);
    KN_LAUNCH(kn_attn_prefill_kernel, dim3(ntok, nheads), KN_PF_THREADS, smem, stream)
    (*kv, layer, block_table, pos0, q, nheads, scale, out);
    KN_LAUNCH_CHECK();
}
