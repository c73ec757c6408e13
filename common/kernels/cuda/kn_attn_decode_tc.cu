/*
 * kn_attn_decode_tc: MFA decode attention on the tensor cores. The same work split as
 * kn_attn_decode (a block per (split, sequence), a KV tile loaded once for all heads,
 * the same partial results and merge kernel), but the two products of a tile, S = Q K^T
 * (heads x positions) and O += P V (heads x head_dim), are bf16 WMMA operations with
 * float32 accumulation, so the kernel is bound by reading the cache rather than by
 * the CUDA cores. q and the probabilities P are rounded to bf16 for the products (fp8
 * KV is dequantised to bf16 on its way into shared memory); the softmax statistics and
 * the output accumulator stay float32 (the accumulator in shared memory, where its
 * rows can be rescaled).
 */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

#include <mma.h>

using namespace nvcuda;

#define KN_TC_TILE    32  /* KV positions per tile */
#define KN_TC_THREADS 256 /* 8 warps */

/* shared-memory carve-up, all offsets multiples of 32 bytes (WMMA pointers) */
struct kn_tc_smem {
    size_t q, k, v, s, p, o, m, l, c, total;
};

__host__ __device__ static kn_tc_smem kn_tc_layout(int nh, int hd)
{
    kn_tc_smem L;
    size_t at = 0;
    L.q = at;
    at += (size_t)nh * hd * 2; /* Q, bf16 (nh, hd), pre-scaled */
    L.k = at;
    at += (size_t)KN_TC_TILE * hd * 2; /* K tile, bf16 (tile, hd) */
    L.v = at;
    at += (size_t)KN_TC_TILE * hd * 2; /* V tile */
    L.s = at;
    at += (size_t)nh * KN_TC_TILE * 4; /* scores, float (nh, tile) */
    L.p = at;
    at += (size_t)nh * KN_TC_TILE * 2; /* probabilities, bf16 (nh, tile) */
    L.o = at;
    at += (size_t)nh * hd * 4; /* output accumulator, float (nh, hd) */
    L.m = at;
    at += ((size_t)nh * 4 + 31) / 32 * 32;
    L.l = at;
    at += ((size_t)nh * 4 + 31) / 32 * 32;
    L.c = at;
    at += ((size_t)nh * 4 + 31) / 32 * 32;
    L.total = at;
    return L;
}

/* 16 bytes of KV (8 bf16 or 16 e4m3 elements) into bf16 shared memory */
__device__ __forceinline__ void kn_tc_load_row(const kn_cu_kv_t &kv, const void *base,
                                               const float *scales, size_t tok, int hd,
                                               __nv_bfloat16 *dst, int tid, int nthreads)
{
    if (kv.dtype == AFD_DTYPE_E4M3) {
        const uint4 *src = (const uint4 *)((const uint8_t *)base + tok * hd);
        float s = scales[tok];
        for (int i = tid; i < hd / 16; i += nthreads) {
            uint4 w = src[i];
            const uint8_t *b = (const uint8_t *)&w;
#pragma unroll
            for (int e = 0; e < 16; e++)
                dst[i * 16 + e] = __float2bfloat16_rn(kn_e4m3_to_f32(b[e]) * s);
        }
    } else {
        const uint4 *src = (const uint4 *)((const uint16_t *)base + tok * hd);
        uint4 *d = (uint4 *)dst;
        for (int i = tid; i < hd / 8; i += nthreads)
            d[i] = src[i];
    }
}

__global__ void __launch_bounds__(KN_TC_THREADS)
    kn_attn_decode_tc_kernel(kn_cu_kv_t kv, int layer, const int32_t *block_tables, int bt_stride,
                             const int32_t *ctx_lens, const float *q, int nh, float scale,
                             int chunk, int splits, float *ws_o, float *ws_ml)
{
    KN_DYN_SMEM(unsigned char, smem);
    const int hd = kv.head_dim, T = KN_TC_TILE;
    const kn_tc_smem L = kn_tc_layout(nh, hd);
    __nv_bfloat16 *Qs = (__nv_bfloat16 *)(smem + L.q), *Ks = (__nv_bfloat16 *)(smem + L.k),
                  *Vs = (__nv_bfloat16 *)(smem + L.v), *Ps = (__nv_bfloat16 *)(smem + L.p);
    float *Ss = (float *)(smem + L.s), *Os = (float *)(smem + L.o), *Ms = (float *)(smem + L.m),
          *Ls = (float *)(smem + L.l), *Cs = (float *)(smem + L.c);
    const int seq = blockIdx.y, split = blockIdx.x, tid = threadIdx.x;
    const int warp = tid >> 5, nwarps = KN_TC_THREADS / 32;
    const int ctx = ctx_lens[seq];
    const int c0 = split * chunk, c1 = min(ctx, c0 + chunk);
    const int32_t *bt = block_tables + (size_t)seq * bt_stride;
    const size_t layer_base = (size_t)layer * kv.num_blocks;

    const float *qs = q + (size_t)seq * nh * hd;
    for (int i = tid; i < nh * hd; i += KN_TC_THREADS) {
        Qs[i] = __float2bfloat16_rn(qs[i] * scale);
        Os[i] = 0.0f;
    }
    for (int h = tid; h < nh; h += KN_TC_THREADS) {
        Ms[h] = -INFINITY;
        Ls[h] = 0.0f;
    }
    const int rb = nh / 16, sb = T / 16, ob = hd / 16;
    /* threads per score row: 256 / nh (nh <= 64: 4 or more), each over tile / tpr columns */
    const int tpr = KN_TC_THREADS / nh, row = tid / tpr, sub = tid % tpr, cols = T / tpr;
    for (int t0 = c0; t0 < c1; t0 += T) {
        const int nt = min(T, c1 - t0);
        __syncthreads(); /* Q/O initialised; the previous tile consumed */
        /* the tile: one 32-thread group per position, 16-byte loads */
        for (int j = warp; j < T; j += nwarps) {
            __nv_bfloat16 *kd = Ks + (size_t)j * hd, *vd = Vs + (size_t)j * hd;
            if (j < nt) {
                int pos = t0 + j;
                size_t tok = (layer_base + (size_t)bt[pos / kv.block_size]) * kv.block_size +
                             (size_t)(pos % kv.block_size);
                kn_tc_load_row(kv, kv.k, kv.k_scale, tok, hd, kd, tid & 31, 32);
                kn_tc_load_row(kv, kv.v, kv.v_scale, tok, hd, vd, tid & 31, 32);
            } else {
                for (int i = tid & 31; i < hd; i += 32) {
                    kd[i] = __float2bfloat16_rn(0.0f);
                    vd[i] = __float2bfloat16_rn(0.0f);
                }
            }
        }
        __syncthreads();
        /* S = Q K^T: (nh, T) in 16x16 fragments, spread over the warps */
        for (int f = warp; f < rb * sb; f += nwarps) {
            int r = f / sb, c = f % sb;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int k = 0; k < hd; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
                wmma::load_matrix_sync(a, Qs + (size_t)r * 16 * hd + k, hd);
                wmma::load_matrix_sync(b, Ks + (size_t)c * 16 * hd + k, hd);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(Ss + (size_t)r * 16 * T + c * 16, acc, T, wmma::mem_row_major);
        }
        __syncthreads();
        /* online softmax per head row: tpr threads per row (a power of two within a warp) */
        {
            float *srow = Ss + (size_t)row * T;
            float mx = -INFINITY;
            for (int j = sub * cols; j < (sub + 1) * cols; j++)
                if (j < nt) mx = fmaxf(mx, srow[j]);
            for (int o = tpr >> 1; o > 0; o >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float m_old = Ms[row], m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int j = sub * cols; j < (sub + 1) * cols; j++) {
                float p = j < nt ? expf(srow[j] - m_new) : 0.0f;
                __nv_bfloat16 pb = __float2bfloat16_rn(p);
                Ps[(size_t)row * T + j] = pb;
                sum += __bfloat162float(pb); /* the sum of what the product uses */
            }
            for (int o = tpr >> 1; o > 0; o >>= 1)
                sum += __shfl_xor_sync(0xffffffffu, sum, o);
            __syncwarp();
            if (sub == 0) {
                float corr = expf(m_old - m_new); /* m_old = -inf: 0 */
                Cs[row] = corr;
                Ls[row] = Ls[row] * corr + sum;
                Ms[row] = m_new;
            }
        }
        __syncthreads();
        /* rescale the accumulator rows, then O += P V */
        for (int i = tid; i < nh * hd; i += KN_TC_THREADS)
            Os[i] *= Cs[i / hd];
        __syncthreads();
        for (int f = warp; f < rb * ob; f += nwarps) {
            int r = f / ob, c = f % ob;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            float *op = Os + (size_t)r * 16 * hd + c * 16;
            wmma::load_matrix_sync(acc, op, hd, wmma::mem_row_major);
            for (int k = 0; k < T; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
                wmma::load_matrix_sync(a, Ps + (size_t)r * 16 * T + k, T);
                wmma::load_matrix_sync(b, Vs + (size_t)k * hd + c * 16, hd);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(op, acc, hd, wmma::mem_row_major);
        }
    }
    __syncthreads();
    size_t part = ((size_t)seq * splits + split) * nh;
    for (int i = tid; i < nh * hd; i += KN_TC_THREADS)
        ws_o[part * hd + i] = Os[i];
    for (int h = tid; h < nh; h += KN_TC_THREADS) {
        ws_ml[2 * (part + h)] = Ms[h];
        ws_ml[2 * (part + h) + 1] = Ls[h];
    }
}

/* defined in kn_attn_decode.cu */
cudaError_t kn_attn_combine(const float *ws_o, const float *ws_ml, int splits, int nheads, int hd,
                            int nseq, float *out, cudaStream_t stream);

extern "C" int kn_cu_attn_decode_tc_ok(int nheads, int head_dim, int kv_dtype)
{
    return nheads >= 16 && nheads <= 64 && nheads % 16 == 0 && (KN_TC_THREADS / nheads) <= 32 &&
           head_dim >= 16 && head_dim <= 256 && head_dim % 16 == 0 &&
           (kv_dtype == AFD_DTYPE_BF16 || kv_dtype == AFD_DTYPE_E4M3);
}

extern "C" cudaError_t kn_cu_attn_decode_tc(const kn_attn_plan_t *p, const kn_cu_kv_t *kv,
                                            int layer, const int32_t *block_tables, int bt_stride,
                                            const int32_t *ctx_lens, int nseq, const float *q,
                                            int nheads, float scale, float *ws, float *out,
                                            cudaStream_t stream)
{
    if (nseq <= 0) return cudaSuccess;
    if (!kn_cu_attn_decode_tc_ok(nheads, kv->head_dim, kv->dtype) || p->chunk % KN_TC_TILE)
        return cudaErrorInvalidValue;
    static size_t smem_set;
    size_t smem = kn_tc_layout(nheads, kv->head_dim).total;
    if (smem > 48 * 1024 && smem > smem_set) {
        cudaError_t e = cudaFuncSetAttribute(
            kn_attn_decode_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        smem_set = smem;
    }
    float *ws_o = ws;
    float *ws_ml = ws + (size_t)nseq * p->splits * nheads * kv->head_dim;
    KN_LAUNCH(kn_attn_decode_tc_kernel, dim3(p->splits, nseq), KN_TC_THREADS, smem, stream)
    (*kv, layer, block_tables, bt_stride, ctx_lens, q, nheads, scale, p->chunk, p->splits, ws_o,
     ws_ml);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    return kn_attn_combine(ws_o, ws_ml, p->splits, nheads, kv->head_dim, nseq, out, stream);
}
