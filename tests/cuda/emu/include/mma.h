/*
 * The CPU emulator's warp matrix operations (nvcuda::wmma) at the 16x16x16 shape: each
 * thread holds a whole tile, so a load, an mma or a store by every lane of a warp computes
 * what the warp's collective operation computes (products in float, summed in float).
 * Loads and stores are collective: every lane of the warp arrives before any lane goes
 * on, so no lane loads what another lane's store of the same operation sequence wrote.
 */
#ifndef KN_EMU_MMA_H
#define KN_EMU_MMA_H

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

#include <stddef.h>
#include <type_traits>

namespace nvcuda
{
namespace wmma
{

struct matrix_a {
};
struct matrix_b {
};
struct accumulator {
};
struct row_major {
};
struct col_major {
};
enum layout_t { mem_row_major, mem_col_major };

static inline float to_f(float v)
{
    return v;
}
static inline float to_f(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
static inline float to_f(__half v)
{
    return __half2float(v);
}

template <class Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> {
    static const int rows = M, cols = K;
};
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> {
    static const int rows = K, cols = N;
};
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> {
    static const int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static const int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
    static const int num_elements = rows * cols;
    float x[rows * cols]; /* row-major whole tile, as float */
};

template <class Use, int M, int N, int K, class T, class L>
static inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, float v)
{
    for (int i = 0; i < f.num_elements; i++)
        f.x[i] = v;
}

/* matrix_a / matrix_b with the layout in the fragment's type */
template <class Use, int M, int N, int K, class T, class L, class P>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const P *p, unsigned ldm)
{
    typedef fragment<Use, M, N, K, T, L> F;
    kn_emu::syncwarp();
    for (int r = 0; r < F::rows; r++)
        for (int c = 0; c < F::cols; c++)
            f.x[r * F::cols + c] = to_f(std::is_same<L, row_major>::value ? p[(size_t)r * ldm + c]
                                                                          : p[(size_t)c * ldm + r]);
}

/* the accumulator, with the layout given at the call */
template <int M, int N, int K, class T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void> &f, const T *p,
                                    unsigned ldm, layout_t layout)
{
    kn_emu::syncwarp();
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++)
            f.x[r * N + c] =
                layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}

template <int M, int N, int K, class T>
static inline void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T, void> &f,
                                     unsigned ldm, layout_t layout)
{
    kn_emu::syncwarp();
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++)
            (layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]) =
                f.x[r * N + c];
}

template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
static inline void mma_sync(fragment<accumulator, M, N, K, TC, void> &d,
                            const fragment<matrix_a, M, N, K, TA, LA> &a,
                            const fragment<matrix_b, M, N, K, TB, LB> &b,
                            const fragment<accumulator, M, N, K, TC, void> &c)
{
    float out[M * N];
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = c.x[m * N + n];
            for (int k = 0; k < K; k++)
                s += a.x[m * K + k] * b.x[k * N + n];
            out[m * N + n] = s;
        }
    for (int i = 0; i < M * N; i++)
        d.x[i] = out[i];
}

} // namespace wmma
} // namespace nvcuda

#endif
