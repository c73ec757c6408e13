/* kn_router: float32 softmax over the experts, then the top k (ties to the lower id). */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

#define KN_ROUTER_THREADS 128
#define KN_ROUTER_MAX_EXP 4096

/* one block per token; probabilities in shared memory, k rounds of a block argmax */
__global__ void kn_router_kernel(const float *logits, int nexp, int k, int renorm, int32_t *ids,
                                 float *weights)
{
    KN_DYN_SMEM(float, p);
    __shared__ float red[32];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float *l = logits + (size_t)blockIdx.x * nexp;
    float mx = -INFINITY;
    for (int e = threadIdx.x; e < nexp; e += blockDim.x)
        mx = fmaxf(mx, l[e]);
    mx = kn_block_reduce(mx, red, 1);
    float sum = 0;
    for (int e = threadIdx.x; e < nexp; e += blockDim.x)
        sum += (p[e] = expf(l[e] - mx));
    sum = kn_block_reduce(sum, red, 0);
    for (int e = threadIdx.x; e < nexp; e += blockDim.x)
        p[e] /= sum;
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float wsum = 0;
    for (int j = 0; j < k; j++) {
        float bv = -2.0f;
        int bi = nexp;
        for (int e = threadIdx.x; e < nexp; e += blockDim.x)
            if (p[e] > bv || (p[e] == bv && e < bi)) {
                bv = p[e];
                bi = e;
            }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            best_v[warp] = bv;
            best_i[warp] = bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float v = best_v[0];
            int id = best_i[0];
            for (int w = 1; w < nw; w++)
                if (best_v[w] > v || (best_v[w] == v && best_i[w] < id)) {
                    v = best_v[w];
                    id = best_i[w];
                }
            ids[(size_t)blockIdx.x * k + j] = id;
            weights[(size_t)blockIdx.x * k + j] = v;
            wsum += v;
            p[id] = -1.0f; /* taken */
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && renorm)
        for (int j = 0; j < k; j++)
            weights[(size_t)blockIdx.x * k + j] /= wsum;
}

extern "C" cudaError_t kn_cu_router_topk(const float *logits, int n, int nexp, int k, int renorm,
                                         int32_t *ids, float *weights, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    if (nexp < 1 || nexp > KN_ROUTER_MAX_EXP || k < 1 || k > nexp) return cudaErrorInvalidValue;
    KN_LAUNCH(kn_router_kernel, n, KN_ROUTER_THREADS, sizeof(float) * (size_t)nexp, stream)
    (logits, nexp, k, renorm, ids, weights);
    KN_LAUNCH_CHECK();
}
