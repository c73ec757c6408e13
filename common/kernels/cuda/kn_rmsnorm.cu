/* kn_rmsnorm: RMSNorm over rows, optionally fused with the residual add before it. */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

/* one block per row; sum of squares in double, as the CPU reference */
__global__ void kn_rmsnorm_kernel(float *x, const float *add, int dim, const float *w, float eps,
                                  float *out)
{
    __shared__ double red[32];
    size_t row = (size_t)blockIdx.x * dim;
    double ss = 0;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = x[row + j];
        if (add) {
            v += add[row + j];
            x[row + j] = v;
        }
        ss += (double)v * v;
    }
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    double t = lane < nw ? red[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1)
        t += __shfl_xor_sync(0xffffffffu, t, o);
    float r = (float)(1.0 / sqrt(t / dim + eps));
    for (int j = threadIdx.x; j < dim; j += blockDim.x)
        out[row + j] = x[row + j] * r * w[j];
}

extern "C" cudaError_t kn_cu_rmsnorm(float *x, const float *add, int n, int dim, const float *w,
                                     float eps, float *out, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    if (dim <= 0) return cudaErrorInvalidValue;
    int threads = dim >= 1024 ? 1024 : (dim + 31) / 32 * 32;
    KN_LAUNCH(kn_rmsnorm_kernel, n, threads, 0, stream)(x, add, dim, w, eps, out);
    KN_LAUNCH_CHECK();
}
