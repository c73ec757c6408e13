/* kn_gather: row gather (expert inputs, embeddings), weighted scatter-add (expert outputs
 * back to their tokens) and the elementwise add. */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

__global__ void kn_gather_kernel(const float *src, int dim, const int32_t *rows, float *dst)
{
    const float *s = src + (size_t)rows[blockIdx.x] * dim;
    float *d = dst + (size_t)blockIdx.x * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x)
        d[j] = s[j];
}

__global__ void kn_scatter_add_kernel(float *dst, int dim, const int32_t *rows, const float *scale,
                                      const float *src)
{
    float *d = dst + (size_t)rows[blockIdx.x] * dim;
    const float *s = src + (size_t)blockIdx.x * dim;
    float w = scale[blockIdx.x];
    for (int j = threadIdx.x; j < dim; j += blockDim.x)
        atomicAdd(d + j, w * s[j]);
}

__global__ void kn_add_kernel(float *y, const float *x, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

__global__ void kn_embed_kernel(const void *table, const float *scale, kn_scale_order_t order,
                                int64_t rows, int64_t cols, const int32_t *ids, float *out)
{
    int64_t r = ids[blockIdx.x];
    float *o = out + (size_t)blockIdx.x * cols;
    if (r < 0 || r >= rows) { /* the caller checks ids; never read outside the table */
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
            o[j] = 0.0f;
        return;
    }
    if (!scale) {
        const uint16_t *t = (const uint16_t *)table + (size_t)r * cols;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
            o[j] = kn_bf16_to_f32(t[j]);
        return;
    }
    const uint8_t *t = (const uint8_t *)table + (size_t)r * cols;
    int64_t br = rows / 128, bc = cols / 128;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        o[j] = kn_e4m3_to_f32(t[j]) * scale[kn_sidx(order, br, bc, r / 128, j / 128)];
}

static int kn_row_threads(int dim)
{
    return dim >= 256 ? 256 : (dim + 31) / 32 * 32;
}

extern "C" cudaError_t kn_cu_gather(const float *src, int dim, const int32_t *rows, int n,
                                    float *dst, cudaStream_t stream)
{
    if (n <= 0 || dim <= 0) return cudaSuccess;
    KN_LAUNCH(kn_gather_kernel, n, kn_row_threads(dim), 0, stream)(src, dim, rows, dst);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_scatter_add(float *dst, int dim, const int32_t *rows,
                                         const float *scale, int n, const float *src,
                                         cudaStream_t stream)
{
    if (n <= 0 || dim <= 0) return cudaSuccess;
    KN_LAUNCH(kn_scatter_add_kernel, n, kn_row_threads(dim), 0, stream)(dst, dim, rows, scale, src);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_add(float *y, const float *x, size_t n, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65536) blocks = 65536;
    KN_LAUNCH(kn_add_kernel, (unsigned)blocks, 256, 0, stream)(y, x, n);
    KN_LAUNCH_CHECK();
}

extern "C" cudaError_t kn_cu_embed(const void *table, const float *scale, kn_scale_order_t order,
                                   int64_t rows, int64_t cols, const int32_t *ids, int n,
                                   float *out, cudaStream_t stream)
{
    if (n <= 0 || cols <= 0) return cudaSuccess;
    if (scale && (rows % 128 || cols % 128)) return cudaErrorInvalidValue;
    KN_LAUNCH(kn_embed_kernel, n, kn_row_threads((int)(cols < 256 ? cols : 256)), 0, stream)
    (table, scale, order, rows, cols, ids, out);
    KN_LAUNCH_CHECK();
}
