/* kn_swiglu: out = silu(gate) * up, elementwise. */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

__global__ void kn_swiglu_kernel(const float *gate, const float *up, size_t n, float *out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" cudaError_t kn_cu_swiglu(const float *gate, const float *up, size_t n, float *out,
                                    cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65536) blocks = 65536;
    KN_LAUNCH(kn_swiglu_kernel, (unsigned)blocks, 256, 0, stream)(gate, up, n, out);
    KN_LAUNCH_CHECK();
}
