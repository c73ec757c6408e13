/* kn_rope: NeoX rotary embedding (rotate_half over all of head_dim), in place. */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

/* grid (n tokens), threads over (head, pair); angles in double, as the CPU reference */
__global__ void kn_rope_kernel(float *x, int nheads, int head_dim, const int32_t *pos, double theta)
{
    int half = head_dim / 2;
    int i = blockIdx.x;
    double p = (double)pos[i];
    for (int t = threadIdx.x; t < nheads * half; t += blockDim.x) {
        int h = t / half, j = t % half;
        double a = p * pow(theta, -2.0 * j / head_dim);
        float c = (float)cos(a), s = (float)sin(a);
        float *v = x + ((size_t)i * nheads + h) * head_dim;
        float x1 = v[j], x2 = v[j + half];
        v[j] = x1 * c - x2 * s;
        v[j + half] = x2 * c + x1 * s;
    }
}

extern "C" cudaError_t kn_cu_rope(float *x, int n, int nheads, int head_dim, const int32_t *pos,
                                  double theta, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    if (nheads <= 0 || head_dim <= 0 || head_dim % 2) return cudaErrorInvalidValue;
    int work = nheads * head_dim / 2;
    int threads = work >= 512 ? 512 : (work + 31) / 32 * 32;
    KN_LAUNCH(kn_rope_kernel, n, threads, 0, stream)(x, nheads, head_dim, pos, theta);
    KN_LAUNCH_CHECK();
}
