/*
 * The CPU emulator's CUDA C++ (tests/cuda/emu): the kernels of common/kernels/cuda build
 * as plain C++ against this header, and kn_emu.cc runs them. A block's threads are fibers
 * on one host thread: each runs until it reaches __syncthreads, a warp operation or its
 * end, so the block barrier, __syncwarp and __shfl_xor_sync mean what they mean on a GPU,
 * and a barrier that some threads never reach is reported as a deadlock. Blocks run one
 * after another and launches one at a time in the process, so __shared__ variables are
 * static ones. What the emulator checks on every launch (kn_emu.cc): the launch shape, the
 * dynamic shared memory against the kernel's limit, and that every pointer argument is
 * device memory, pinned host memory or NULL.
 */
#ifndef KN_EMU_CUDA_RUNTIME_H
#define KN_EMU_CUDA_RUNTIME_H

#include "cuda_runtime_api.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
    unsigned x, y, z;
};

struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};

static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w)
{
    return uint4{x, y, z, w};
}

struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace kn_emu
{

extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
const uint3 &thread_idx();
void syncthreads();
void syncwarp();
uint64_t shfl_xor(uint64_t v, int lane_mask, unsigned mask);
void *dyn_smem();
/* what a launch hands over: the kernel (its attributes), its name (for messages), the
 * shape and a call of the kernel with a copy of the arguments; the launch is queued on
 * the stream. arg_check looks at each pointer argument first. */
cudaError_t launch(const void *kernel, const char *name, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, std::function<void()> body);
void arg_check(const void *kernel, const char *name, int index, const void *p);

template <class... P> struct launch_t {
    void (*k)(P...);
    const char *name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    void operator()(P... a) const /* the arguments convert as in a real launch */
    {
        std::tuple<std::decay_t<P>...> args(a...);
        check_args(args, std::index_sequence_for<P...>{});
        void (*kk)(P...) = k;
        launch(reinterpret_cast<const void *>(k), name, grid, block, smem, stream,
               [kk, args]() { std::apply(kk, args); });
    }
    template <class T, size_t... I> void check_args(const T &args, std::index_sequence<I...>) const
    {
        (check_one((int)I, std::get<I>(args)), ...);
    }
    template <class V> void check_one(int i, const V &v) const
    {
        if constexpr (std::is_pointer_v<V>)
            arg_check(reinterpret_cast<const void *>(k), name, i, (const void *)v);
    }
};

template <class... P>
launch_t<P...> launcher(void (*k)(P...), const char *name, dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream)
{
    return launch_t<P...>{k, name, grid, block, smem, stream};
}

} // namespace kn_emu

#define threadIdx (kn_emu::thread_idx())
#define blockIdx  (kn_emu::block_idx)
#define blockDim  (kn_emu::block_dim)
#define gridDim   (kn_emu::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__      static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

#define KN_EMU_MINMAX(T)                                                                           \
    static inline T min(T a, T b)                                                                  \
    {                                                                                              \
        return b < a ? b : a;                                                                      \
    }                                                                                              \
    static inline T max(T a, T b)                                                                  \
    {                                                                                              \
        return a < b ? b : a;                                                                      \
    }
KN_EMU_MINMAX(int)
KN_EMU_MINMAX(unsigned)
KN_EMU_MINMAX(long)
KN_EMU_MINMAX(unsigned long)
KN_EMU_MINMAX(long long)
KN_EMU_MINMAX(unsigned long long)
#undef KN_EMU_MINMAX
static inline float min(float a, float b)
{
    return fminf(a, b);
}
static inline float max(float a, float b)
{
    return fmaxf(a, b);
}

static inline void __syncthreads()
{
    kn_emu::syncthreads();
}

static inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    (void)mask;
    kn_emu::syncwarp();
}

template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask)
{
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    u = kn_emu::shfl_xor(u, lane_mask, mask);
    T r;
    memcpy(&r, &u, sizeof(T));
    return r;
}

/* the threads of a block never run at the same time: plain read-modify-writes are atomic */
template <class T> static inline T atomicAdd(T *p, T v)
{
    T old = *p;
    *p = old + v;
    return old;
}

static inline float __uint_as_float(unsigned u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline unsigned __float_as_uint(float f)
{
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float __fdividef(float a, float b)
{
    return a / b;
}

static inline float rsqrtf(float x)
{
    return 1.0f / sqrtf(x);
}

template <class T> static inline T __ldg(const T *p)
{
    return *p;
}

#endif /* __cplusplus */

#endif
