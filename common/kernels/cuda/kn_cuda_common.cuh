/*
 * kn_cuda_common: device helpers shared by the kernels (conversions that match the CPU
 * backend's rounding, block reductions, KV element loads).
 */
#ifndef KN_CUDA_COMMON_CUH
#define KN_CUDA_COMMON_CUH

/* the project headers are C11; this is their one keyword C++ spells differently */
#if !defined(_Noreturn)
#define _Noreturn [[noreturn]]
#endif

#include "afd_dtype.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define KN_E4M3_MAX 448.0f

__device__ __forceinline__ float kn_bf16_to_f32(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

/* round to nearest even, as afd_f32_to_bf16 */
__device__ __forceinline__ uint16_t kn_f32_to_bf16(float f)
{
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

__device__ __forceinline__ float kn_e4m3_to_f32(uint8_t x)
{
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)x, __NV_E4M3);
    return __half2float(__half(h));
}

/* round to nearest even, saturating at 448, as afd_f32_to_e4m3 */
__device__ __forceinline__ uint8_t kn_f32_to_e4m3(float f)
{
    return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float kn_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float kn_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block-wide sum or max; every thread gets the result. red: 32 floats of shared memory. */
__device__ __forceinline__ float kn_block_reduce(float v, float *red, int is_max)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = is_max ? kn_warp_max(v) : kn_warp_sum(v);
    __syncthreads(); /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : (is_max ? -INFINITY : 0.0f);
    r = is_max ? kn_warp_max(r) : kn_warp_sum(r);
    return r;
}

/* One KV element as float (the per-token scale is applied by the caller for e4m3). */
__device__ __forceinline__ float kn_kv_elem(const void *base, size_t i, int dtype)
{
    if (dtype == AFD_DTYPE_BF16) return kn_bf16_to_f32(((const uint16_t *)base)[i]);
    if (dtype == AFD_DTYPE_E4M3) return kn_e4m3_to_f32(((const uint8_t *)base)[i]);
    return ((const float *)base)[i];
}

/* kn_scale_index of kn_cuda_host.c, for device code */
__device__ __forceinline__ size_t kn_sidx(int order, int64_t outer, int64_t inner, int64_t o,
                                          int64_t kb)
{
    if (order == 1) return (size_t)(o * inner + kb);
    int64_t ld = order == 0 ? (outer + 3) / 4 * 4 : outer;
    return (size_t)(kb * ld + o);
}

#define KN_LAUNCH_CHECK() return cudaGetLastError()

/*
 * Launches and dynamic shared memory are spelled through these two macros so that the
 * kernels also build as plain C++ against the CPU emulator of tests/cuda/emu
 * (KN_CUDA_EMU), which runs them in make test:
 *   KN_LAUNCH(kernel, grid, block, smem, stream)(args...);
 *   KN_DYN_SMEM(type, name);   the block's dynamic shared memory as type name[],
 *                              128-byte aligned
 */
#ifdef KN_CUDA_EMU
#define KN_LAUNCH(k, grid, block, smem, stream) kn_emu::launcher(k, #k, grid, block, smem, stream)
#define KN_DYN_SMEM(type, name)                 type *name = (type *)kn_emu::dyn_smem()
#else
#define KN_LAUNCH(k, grid, block, smem, stream) k<<<grid, block, smem, stream>>>
#define KN_DYN_SMEM(type, name)                 extern __shared__ __align__(128) type name[]
#endif

#endif
