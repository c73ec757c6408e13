/* kn_logits_top: each logits row's best candidates and log-sum-exp, for sampling on the
 * host from a few hundred bytes instead of the whole vocabulary. */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

#include <climits>

#define KN_TOP_CHUNK 8192 /* vocabulary entries per block of the first pass */
#define KN_TOP_WARPS 8

/* the candidates' order: larger logit first, ties to the lower id */
__device__ __forceinline__ bool kn_top_before(float av, int ai, float bv, int bi)
{
    return av > bv || (av == bv && ai < bi);
}

/*
 * Pass 1, block (chunk, row): the chunk's maximum and sum of exp(l - max) in double, and
 * each warp's k best of its slice of the chunk, found in k rounds of a warp argmax over
 * the entries after the previous pick (the slice sits in shared memory). A slice with
 * fewer than k entries pads with (-inf, INT_MAX), after every real entry.
 */
__global__ void kn_top_part_kernel(const float *logits, int vocab, int k, int nchunks,
                                   float *cand_v, int *cand_id, float *part_max, double *part_sum)
{
    __shared__ float sv[KN_TOP_CHUNK];
    __shared__ float red_m[KN_TOP_WARPS];
    __shared__ double red_s[KN_TOP_WARPS];
    int row = blockIdx.y, chunk = blockIdx.x;
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float *l = logits + (size_t)row * vocab;
    int c0 = chunk * KN_TOP_CHUNK, n = vocab - c0 < KN_TOP_CHUNK ? vocab - c0 : KN_TOP_CHUNK;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float x = l[c0 + i];
        sv[i] = x;
        m = fmaxf(m, x);
    }
    m = kn_warp_max(m);
    if (lane == 0) red_m[w] = m;
    __syncthreads();
    m = red_m[0];
    for (int i = 1; i < KN_TOP_WARPS; i++)
        m = fmaxf(m, red_m[i]);
    double s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += exp((double)sv[i] - (double)m);
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) red_s[w] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int i = 0; i < KN_TOP_WARPS; i++)
            t += red_s[i];
        part_max[(size_t)row * nchunks + chunk] = m;
        part_sum[(size_t)row * nchunks + chunk] = t;
    }
    int per = (n + KN_TOP_WARPS - 1) / KN_TOP_WARPS, w0 = w * per;
    int w1 = w0 + per < n ? w0 + per : n;
    float pv = INFINITY; /* the previous pick: everything comes after the start */
    int pid = -1;
    size_t at = (((size_t)row * nchunks + chunk) * KN_TOP_WARPS + w) * k;
    for (int r = 0; r < k; r++) {
        float bv = -INFINITY;
        int bid = INT_MAX;
        for (int i = w0 + lane; i < w1; i += 32) {
            float x = sv[i];
            int id = c0 + i;
            if (kn_top_before(pv, pid, x, id) && kn_top_before(x, id, bv, bid)) {
                bv = x;
                bid = id;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oid = __shfl_xor_sync(0xffffffffu, bid, o);
            if (kn_top_before(ov, oid, bv, bid)) {
                bv = ov;
                bid = oid;
            }
        }
        if (lane == 0) {
            cand_v[at + r] = bv;
            cand_id[at + r] = bid;
        }
        pv = bv;
        pid = bid;
    }
}

/* Pass 2, one block per row: a bitonic sort of the row's candidates (padded to p, a power
 * of two) in shared memory, the first k out; the row's log-sum-exp from the chunks'. */
__global__ void kn_top_merge_kernel(const float *cand_v, const int *cand_id, int ncand, int p,
                                    int k, const float *part_max, const double *part_sum,
                                    int nchunks, int *top_id, float *top_v, double *lse)
{
    KN_DYN_SMEM(unsigned char, smem);
    float *v = (float *)smem;
    int *id = (int *)(v + p);
    int row = blockIdx.x;
    for (int i = threadIdx.x; i < p; i += blockDim.x) {
        v[i] = i < ncand ? cand_v[(size_t)row * ncand + i] : -INFINITY;
        id[i] = i < ncand ? cand_id[(size_t)row * ncand + i] : INT_MAX;
    }
    __syncthreads();
    for (int size = 2; size <= p; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < p; i += blockDim.x) {
                int j = i ^ stride;
                if (j <= i) continue;
                bool best_first = (i & size) == 0;
                bool swap = best_first ? kn_top_before(v[j], id[j], v[i], id[i])
                                       : kn_top_before(v[i], id[i], v[j], id[j]);
                if (swap) {
                    float tv = v[i];
                    v[i] = v[j];
                    v[j] = tv;
                    int ti = id[i];
                    id[i] = id[j];
                    id[j] = ti;
                }
            }
            __syncthreads();
        }
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        top_v[(size_t)row * k + i] = v[i];
        top_id[(size_t)row * k + i] = id[i];
    }
    if (threadIdx.x == 0) {
        float m = -INFINITY;
        for (int c = 0; c < nchunks; c++)
            m = fmaxf(m, part_max[(size_t)row * nchunks + c]);
        double s = 0;
        for (int c = 0; c < nchunks; c++)
            s += part_sum[(size_t)row * nchunks + c] *
                 exp((double)part_max[(size_t)row * nchunks + c] - (double)m);
        lse[row] = (double)m + log(s);
    }
}

extern "C" size_t kn_cu_logits_top_ws(int rows, int vocab, int k)
{
    size_t nchunks = (size_t)(vocab + KN_TOP_CHUNK - 1) / KN_TOP_CHUNK;
    size_t ncand = nchunks * KN_TOP_WARPS * (size_t)k;
    return (size_t)rows * (ncand * 8 + nchunks * 12);
}

extern "C" cudaError_t kn_cu_logits_top(const float *logits, int rows, int vocab, int k, void *ws,
                                        int *top_id, float *top_v, double *lse, cudaStream_t stream)
{
    if (rows <= 0) return cudaSuccess;
    if (vocab <= 0 || k < 1 || k > KN_TOP_MAX) return cudaErrorInvalidValue;
    int nchunks = (vocab + KN_TOP_CHUNK - 1) / KN_TOP_CHUNK;
    int ncand = nchunks * KN_TOP_WARPS * k, p = 1;
    while (p < ncand)
        p <<= 1;
    size_t smem = (size_t)p * 8;
    if (smem > KN_TOP_MAX_SMEM) return cudaErrorInvalidValue; /* the caller samples on the host */
    /* workspace: candidates, then the chunks' (max, sum) */
    float *cand_v = (float *)ws;
    int *cand_id = (int *)(cand_v + (size_t)rows * ncand);
    double *part_sum = (double *)(cand_id + (size_t)rows * ncand); /* 8-byte aligned */
    float *part_max = (float *)(part_sum + (size_t)rows * nchunks);
    KN_LAUNCH(kn_top_part_kernel, dim3((unsigned)nchunks, (unsigned)rows), KN_TOP_WARPS * 32, 0,
              stream)
    (logits, vocab, k, nchunks, cand_v, cand_id, part_max, part_sum);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (smem > 48 * 1024) {
        e = cudaFuncSetAttribute(kn_top_merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem);
        if (e != cudaSuccess) return e;
    }
    KN_LAUNCH(kn_top_merge_kernel, (unsigned)rows, 1024, smem, stream)
    (cand_v, cand_id, ncand, p, k, part_max, part_sum, nchunks, top_id, top_v, lse);
    KN_LAUNCH_CHECK();
}
