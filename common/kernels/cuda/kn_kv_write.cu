/* kn_kv_write: new K and V vectors into the paged cache (fp8: one scale per token vector). */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

__device__ void kn_kv_store(const kn_cu_kv_t &kv, void *base, float *scales, size_t tok,
                            const float *x, float *red)
{
    int hd = kv.head_dim;
    if (kv.dtype == AFD_DTYPE_E4M3) {
        float amax = 0;
        for (int j = threadIdx.x; j < hd; j += blockDim.x)
            amax = fmaxf(amax, fabsf(x[j]));
        amax = kn_block_reduce(amax, red, 1);
        float s = amax > 0 ? amax / KN_E4M3_MAX : 1.0f;
        uint8_t *d = (uint8_t *)base + tok * hd;
        for (int j = threadIdx.x; j < hd; j += blockDim.x)
            d[j] = kn_f32_to_e4m3(x[j] / s);
        if (threadIdx.x == 0) scales[tok] = s;
    } else if (kv.dtype == AFD_DTYPE_BF16) {
        uint16_t *d = (uint16_t *)base + tok * hd;
        for (int j = threadIdx.x; j < hd; j += blockDim.x)
            d[j] = kn_f32_to_bf16(x[j]);
    } else {
        float *d = (float *)base + tok * hd;
        for (int j = threadIdx.x; j < hd; j += blockDim.x)
            d[j] = x[j];
    }
}

/* one block per new token */
__global__ void kn_kv_write_kernel(kn_cu_kv_t kv, int layer, const int32_t *block_table, int pos0,
                                   const float *k, const float *v)
{
    __shared__ float red[32];
    int t = blockIdx.x, p = pos0 + t;
    int blk = block_table[p / kv.block_size];
    if (blk < 0 || blk >= kv.num_blocks) return; /* checked on the host before the launch */
    size_t tok =
        ((size_t)layer * kv.num_blocks + (size_t)blk) * kv.block_size + (size_t)(p % kv.block_size);
    kn_kv_store(kv, kv.k, kv.k_scale, tok, k + (size_t)t * kv.head_dim, red);
    kn_kv_store(kv, kv.v, kv.v_scale, tok, v + (size_t)t * kv.head_dim, red);
}

extern "C" cudaError_t kn_cu_kv_write(const kn_cu_kv_t *kv, int layer, const int32_t *block_table,
                                      int pos0, int ntok, const float *k, const float *v,
                                      cudaStream_t stream)
{
    if (ntok <= 0) return cudaSuccess;
    if (kv->head_dim <= 0 || kv->block_size <= 0) return cudaErrorInvalidValue;
    int hd = kv->head_dim;
    int threads = hd >= 256 ? 256 : (hd + 31) / 32 * 32;
    KN_LAUNCH(kn_kv_write_kernel, ntok, threads, 0, stream)(*kv, layer, block_table, pos0, k, v);
    KN_LAUNCH_CHECK();
}

/* one block per token, its cache slot (block, offset) given, slot0 added (the layer's) */
__global__ void kn_kv_write_slots_kernel(kn_cu_kv_t kv, const int64_t *slots, int64_t slot0,
                                         const float *k, const float *v)
{
    __shared__ float red[32];
    int t = blockIdx.x;
    size_t tok = (size_t)(slot0 + slots[t]);
    kn_kv_store(kv, kv.k, kv.k_scale, tok, k + (size_t)t * kv.head_dim, red);
    kn_kv_store(kv, kv.v, kv.v_scale, tok, v + (size_t)t * kv.head_dim, red);
}

extern "C" cudaError_t kn_cu_kv_write_slots(const kn_cu_kv_t *kv, const int64_t *slots,
                                            int64_t slot0, int ntok, const float *k, const float *v,
                                            cudaStream_t stream)
{
    if (ntok <= 0) return cudaSuccess;
    if (kv->head_dim <= 0) return cudaErrorInvalidValue;
    int hd = kv->head_dim;
    int threads = hd >= 256 ? 256 : (hd + 31) / 32 * 32;
    KN_LAUNCH(kn_kv_write_slots_kernel, ntok, threads, 0, stream)(*kv, slots, slot0, k, v);
    KN_LAUNCH_CHECK();
}
