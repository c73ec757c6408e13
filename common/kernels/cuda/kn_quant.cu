/* kn_quant: dtype conversions: float32 <-> bf16 around the GEMMs, per-128 fp8 activation
 * quantisation, the wire-format rounding and packed rows (afd_rows_*), checkpoint weights
 * to bf16, seeded fills. */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

#define KN_GRID(n) ((unsigned)((n) + 255) / 256 > 65536u ? 65536u : (unsigned)(((n) + 255) / 256))

__global__ void kn_f32_to_bf16_kernel(const float *x, uint16_t *out, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = kn_f32_to_bf16(x[i]);
}

__global__ void kn_bf16_to_f32_kernel(const uint16_t *d, float *y, size_t n, int accumulate)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = kn_bf16_to_f32(d[i]);
        y[i] = accumulate ? y[i] + v : v;
    }
}

/* one warp per (row, group of 128): 4 values per lane */
__global__ void kn_quant_fp8_kernel(const float *x, int n, int dim, uint8_t *q, float *scales,
                                    kn_scale_order_t order, int dequant)
{
    int groups = dim / 128;
    size_t wid = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (wid >= (size_t)n * groups) return;
    int row = (int)(wid / groups), g = (int)(wid % groups);
    const float *xr = x + (size_t)row * dim + (size_t)g * 128;
    float v[4], amax = 0;
    for (int i = 0; i < 4; i++) {
        v[i] = xr[lane + 32 * i];
        amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = kn_warp_max(amax);
    float s = amax > 0 ? amax / KN_E4M3_MAX : 1.0f, inv = 1.0f / s;
    for (int i = 0; i < 4; i++) {
        uint8_t b = kn_f32_to_e4m3(v[i] * inv);
        if (dequant)
            ((float *)xr)[lane + 32 * i] = kn_e4m3_to_f32(b) * s;
        else
            q[(size_t)row * dim + (size_t)g * 128 + lane + 32 * i] = b;
    }
    if (!dequant && lane == 0) scales[kn_sidx(order, n, groups, row, g)] = s;
}

/* fp8 rounding of a row whose length is not a multiple of 128: one thread per group */
__global__ void kn_round_fp8_tail_kernel(float *x, int n, int dim)
{
    int groups = (dim + 127) / 128;
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)n * groups) return;
    int row = (int)(t / groups), g = (int)(t % groups);
    float *xr = x + (size_t)row * dim;
    int c0 = g * 128, c1 = c0 + 128 < dim ? c0 + 128 : dim;
    float amax = 0;
    for (int c = c0; c < c1; c++)
        amax = fmaxf(amax, fabsf(xr[c]));
    float s = amax > 0 ? amax / KN_E4M3_MAX : 1.0f, inv = 1.0f / s;
    for (int c = c0; c < c1; c++)
        xr[c] = kn_e4m3_to_f32(kn_f32_to_e4m3(xr[c] * inv)) * s;
}

__global__ void kn_round_kernel(float *x, size_t n, int dtype)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (dtype == AFD_DTYPE_BF16)
            x[i] = kn_bf16_to_f32(kn_f32_to_bf16(x[i]));
        else
            x[i] = __half2float(__float2half_rn(x[i]));
    }
}

__global__ void kn_weight_to_bf16_kernel(int src_dtype, const void *raw, int64_t rows, int64_t cols,
                                         const float *scale, int64_t row0, int64_t col0,
                                         int64_t full_bc, uint16_t *out)
{
    size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v;
        switch (src_dtype) {
        case AFD_DTYPE_F32:
            v = ((const float *)raw)[i];
            break;
        case AFD_DTYPE_F16:
            v = __half2float(__ushort_as_half(((const uint16_t *)raw)[i]));
            break;
        case AFD_DTYPE_E4M3: {
            int64_t r = (int64_t)(i / cols) + row0, c = (int64_t)(i % cols) + col0;
            v = kn_e4m3_to_f32(((const uint8_t *)raw)[i]) * scale[(r / 128) * full_bc + c / 128];
            break;
        }
        default:
            v = kn_bf16_to_f32(((const uint16_t *)raw)[i]);
        }
        out[i] = kn_f32_to_bf16(v);
    }
}

__device__ __forceinline__ float kn_hash_unit(uint64_t seed, size_t i) /* [0, 1) */
{
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

__global__ void kn_fill_kernel(void *p, int dtype, size_t n, uint64_t seed, float amp)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float u = kn_hash_unit(seed, i);
        if (dtype == AFD_DTYPE_F32)
            ((float *)p)[i] = amp * (0.5f + 0.5f * u);
        else if (dtype == AFD_DTYPE_E4M3)
            ((uint8_t *)p)[i] = kn_f32_to_e4m3(amp * (2.0f * u - 1.0f));
        else
            ((uint16_t *)p)[i] = kn_f32_to_bf16(amp * (2.0f * u - 1.0f));
    }
}

/* packed rows (afd_rows_encode): one warp per (row, group of up to 128 columns); the scales
 * follow the rows' bytes, (row, group) row-major, written bytewise (rows * dim need not be
 * a multiple of 4) */
__global__ void kn_rows_encode_fp8_kernel(const float *x, int rows, int dim, uint8_t *q,
                                          uint8_t *scales)
{
    int groups = (dim + 127) / 128;
    size_t wid = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (wid >= (size_t)rows * groups) return;
    int row = (int)(wid / groups), g = (int)(wid % groups);
    int c0 = g * 128, c1 = c0 + 128 < dim ? c0 + 128 : dim;
    const float *xr = x + (size_t)row * dim;
    float v[4], amax = 0;
    for (int i = 0; i < 4; i++) {
        int c = c0 + lane + 32 * i;
        v[i] = c < c1 ? xr[c] : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = kn_warp_max(amax);
    float s = amax > 0 ? amax / KN_E4M3_MAX : 1.0f, inv = 1.0f / s;
    for (int i = 0; i < 4; i++) {
        int c = c0 + lane + 32 * i;
        if (c < c1) q[(size_t)row * dim + c] = kn_f32_to_e4m3(v[i] * inv);
    }
    if (lane < 4) {
        uint32_t bits = __float_as_uint(s);
        scales[((size_t)row * groups + g) * 4 + lane] = (uint8_t)(bits >> (8 * lane));
    }
}

__global__ void kn_rows_decode_fp8_kernel(const uint8_t *q, const uint8_t *scales, int rows,
                                          int dim, float *x)
{
    size_t n = (size_t)rows * dim;
    int groups = (dim + 127) / 128;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / (size_t)dim, c = i % (size_t)dim;
        const uint8_t *sp = scales + (r * groups + c / 128) * 4;
        uint32_t bits =
            (uint32_t)sp[0] | (uint32_t)sp[1] << 8 | (uint32_t)sp[2] << 16 | (uint32_t)sp[3] << 24;
        x[i] = kn_e4m3_to_f32(q[i]) * __uint_as_float(bits);
    }
}

extern "C" cudaError_t kn_cu_rows_encode_fp8(const float *x, int rows, int dim, void *dst,
                                             cudaStream_t stream)
{
    if (rows <= 0 || dim <= 0) return cudaSuccess;
    size_t warps = (size_t)rows * (size_t)((dim + 127) / 128);
    uint8_t *q = (uint8_t *)dst;
    KN_LAUNCH(kn_rows_encode_fp8_kernel, (unsigned)((warps + 7) / 8), 256, 0, stream)
    (x, rows, dim, q, q + (size_t)rows * dim);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_rows_decode_fp8(const void *src, int rows, int dim, float *x,
                                             cudaStream_t stream)
{
    size_t n = (size_t)(rows > 0 ? rows : 0) * (size_t)(dim > 0 ? dim : 0);
    if (n == 0) return cudaSuccess;
    const uint8_t *q = (const uint8_t *)src;
    KN_LAUNCH(kn_rows_decode_fp8_kernel, KN_GRID(n), 256, 0, stream)(q, q + n, rows, dim, x);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_f32_to_bf16(const float *x, uint16_t *out, size_t n,
                                         cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KN_LAUNCH(kn_f32_to_bf16_kernel, KN_GRID(n), 256, 0, stream)(x, out, n);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_bf16_to_f32(const uint16_t *d, float *y, size_t n, int accumulate,
                                         cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KN_LAUNCH(kn_bf16_to_f32_kernel, KN_GRID(n), 256, 0, stream)(d, y, n, accumulate);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_quant_fp8(const float *x, int n, int dim, uint8_t *q, float *scales,
                                       kn_scale_order_t order, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    if (dim <= 0 || dim % 128) return cudaErrorInvalidValue;
    size_t warps = (size_t)n * (dim / 128);
    KN_LAUNCH(kn_quant_fp8_kernel, (unsigned)((warps + 7) / 8), 256, 0, stream)
    (x, n, dim, q, scales, order, 0);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_round(float *x, int rows, int dim, int dtype, cudaStream_t stream)
{
    size_t n = (size_t)(rows > 0 ? rows : 0) * (size_t)(dim > 0 ? dim : 0);
    if (n == 0 || dtype == AFD_DTYPE_F32) return cudaSuccess;
    if (dtype == AFD_DTYPE_E4M3) {
        if (dim % 128 == 0) {
            size_t warps = (size_t)rows * (dim / 128);
            KN_LAUNCH(kn_quant_fp8_kernel, (unsigned)((warps + 7) / 8), 256, 0, stream)
            (x, rows, dim, NULL, NULL, KN_SCALE_OUTER_FAST, 1);
        } else {
            size_t groups = (size_t)rows * ((dim + 127) / 128);
            KN_LAUNCH(kn_round_fp8_tail_kernel, (unsigned)((groups + 127) / 128), 128, 0, stream)
            (x, rows, dim);
        }
        KN_LAUNCH_CHECK();
    }
    if (dtype != AFD_DTYPE_BF16 && dtype != AFD_DTYPE_F16) return cudaErrorInvalidValue;
    KN_LAUNCH(kn_round_kernel, KN_GRID(n), 256, 0, stream)(x, n, dtype);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_weight_to_bf16(int src_dtype, const void *raw, int64_t rows,
                                            int64_t cols, const float *scale, int64_t row0,
                                            int64_t col0, int64_t full_bc, uint16_t *out,
                                            cudaStream_t stream)
{
    size_t n = (size_t)rows * (size_t)cols;
    if (n == 0) return cudaSuccess;
    if (src_dtype == AFD_DTYPE_E4M3 && !scale) return cudaErrorInvalidValue;
    KN_LAUNCH(kn_weight_to_bf16_kernel, KN_GRID(n), 256, 0, stream)
    (src_dtype, raw, rows, cols, scale, row0, col0, full_bc, out);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_fill(void *p, int dtype, size_t n, uint64_t seed, float amp,
                                  cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KN_LAUNCH(kn_fill_kernel, KN_GRID(n), 256, 0, stream)(p, dtype, n, seed, amp);
    KN_LAUNCH_CHECK();
}
