/*
 * kn_grouped_gemm: the experts' GEMMs of a MoE layer in one launch. Rows of x are sorted
 * by expert (segment s: rows [off[s], off[s+1])); every segment is cut into tiles of up
 * to 64 rows, and one block computes a 64-row x 64-column tile of y = x . W[s]^T on the
 * tensor cores (bf16 WMMA, float32 accumulation), so a layer's E experts take one launch
 * per projection instead of E. The tiles are listed by the host (it knows the segments):
 * (segment, first row, rows) triples. Block-scaled e4m3 weights have a kernel of their own
 * (below) with the block-scaled GEMM's arithmetic.
 */
#include "kn_cuda_common.cuh"
#include "kn_cuda_kernels.h"

#include <mma.h>

using namespace nvcuda;

#define KN_GG_BM      64  /* rows of a tile */
#define KN_GG_BN      64  /* columns of a tile */
#define KN_GG_BK      32  /* K per step */
#define KN_GG_LD      40  /* smem row pitch of the bf16 tiles (elements; a multiple of 8) */
#define KN_GG_LDC     68  /* smem row pitch of the float output tile (a multiple of 4) */
#define KN_GG_THREADS 128 /* 4 warps, 2 x 2, each 32 x 32 of the tile */

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> kn_gg_acc_t;

/* One KN_GG_BK step of a warp's 32 x 32 part of the tile from the bf16 tiles in shared
 * memory (Xs: rows x K, Ws: W's rows, i.e. y's columns, x K). */
__device__ __forceinline__ void kn_gg_mma(const __nv_bfloat16 *Xs, const __nv_bfloat16 *Ws, int wr,
                                          int wc, kn_gg_acc_t (&acc)[2][2])
{
    for (int kk = 0; kk < KN_GG_BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
        for (int i = 0; i < 2; i++)
            wmma::load_matrix_sync(a[i], Xs + (wr + 16 * i) * KN_GG_LD + kk, KN_GG_LD);
        for (int j = 0; j < 2; j++) /* W rows are y's columns: W^T column-major */
            wmma::load_matrix_sync(b[j], Ws + (wc + 16 * j) * KN_GG_LD + kk, KN_GG_LD);
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
                wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
}

/* A warp's 32 x 32 part into the float tile in shared memory. */
__device__ __forceinline__ void kn_gg_store(float *Cs, int wr, int wc, kn_gg_acc_t (&acc)[2][2])
{
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(Cs + (wr + 16 * i) * KN_GG_LDC + wc + 16 * j, acc[i][j],
                                    KN_GG_LDC, wmma::mem_row_major);
}

__global__ void __launch_bounds__(KN_GG_THREADS)
    kn_grouped_gemm_kernel(const uint16_t *x, const uint16_t *const *w, const int32_t *tiles, int M,
                           int K, float *y)
{
    __shared__ __align__(128) __nv_bfloat16 Xs[KN_GG_BM * KN_GG_LD];
    __shared__ __align__(128) __nv_bfloat16 Ws[KN_GG_BN * KN_GG_LD];
    __shared__ __align__(128) float Cs[KN_GG_BM * KN_GG_LDC];
    const int seg = tiles[3 * blockIdx.y], r0 = tiles[3 * blockIdx.y + 1],
              nr = tiles[3 * blockIdx.y + 2];
    const int n0 = blockIdx.x * KN_GG_BN, nc = min(KN_GG_BN, M - n0);
    const uint16_t *W = w[seg];
    const int tid = threadIdx.x, warp = tid >> 5, wr = (warp >> 1) * 32, wc = (warp & 1) * 32;

    kn_gg_acc_t acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::fill_fragment(acc[i][j], 0.0f);

    for (int k0 = 0; k0 < K; k0 += KN_GG_BK) {
        /* 64 rows x 32 bf16 of each operand: 256 vectors of 8, two per thread each */
        for (int v = tid; v < KN_GG_BM * KN_GG_BK / 8; v += KN_GG_THREADS) {
            int r = v / (KN_GG_BK / 8), c = (v % (KN_GG_BK / 8)) * 8;
            uint4 xv = make_uint4(0, 0, 0, 0), wv = make_uint4(0, 0, 0, 0);
            if (r < nr) xv = *(const uint4 *)(x + (size_t)(r0 + r) * K + k0 + c);
            if (r < nc) wv = *(const uint4 *)(W + (size_t)(n0 + r) * K + k0 + c);
            *(uint4 *)(Xs + r * KN_GG_LD + c) = xv;
            *(uint4 *)(Ws + r * KN_GG_LD + c) = wv;
        }
        __syncthreads();
        kn_gg_mma(Xs, Ws, wr, wc, acc);
        __syncthreads(); /* the tiles are consumed before the next step overwrites them */
    }
    kn_gg_store(Cs, wr, wc, acc);
    __syncthreads();
    for (int e = tid; e < KN_GG_BM * KN_GG_BN; e += KN_GG_THREADS) {
        int r = e / KN_GG_BN, c = e % KN_GG_BN;
        if (r < nr && c < nc) y[(size_t)(r0 + r) * M + n0 + c] = Cs[r * KN_GG_LDC + c];
    }
}

/*
 * The same for e4m3 weights with 128x128 block scales and e4m3 activations with per-128
 * row scales (xs: (rows, K / 128) row-major), the block-scaled GEMM's arithmetic:
 * y = sum over K blocks of sx[r, kb] * sw[n / 128, kb] * (xq[r, kb] . wq[n, kb]), each
 * block's products on the tensor cores (e4m3 values are exact in bf16, float32
 * accumulation), then rounded to bf16 as the cuBLASLt path's output is. A block's partial
 * tile goes through shared memory so that each row's scale reaches it; a 64-column tile
 * lies inside one 128-row block of W, whose scale is the tile's.
 */
__global__ void __launch_bounds__(KN_GG_THREADS)
    kn_grouped_gemm_fp8_kernel(const uint8_t *xq, const float *xs, const uint8_t *const *w,
                               const float *const *ws, const int32_t *tiles, int M, int K, float *y)
{
    __shared__ __align__(128) __nv_bfloat16 Xs[KN_GG_BM * KN_GG_LD];
    __shared__ __align__(128) __nv_bfloat16 Ws[KN_GG_BN * KN_GG_LD];
    __shared__ __align__(128) float Cs[KN_GG_BM * KN_GG_LDC];
    __shared__ float rs[KN_GG_BM]; /* this K block's scale of each row, times W's */
    const int seg = tiles[3 * blockIdx.y], r0 = tiles[3 * blockIdx.y + 1],
              nr = tiles[3 * blockIdx.y + 2];
    const int n0 = blockIdx.x * KN_GG_BN, nc = min(KN_GG_BN, M - n0), kbn = K / 128;
    const uint8_t *W = w[seg];
    const float *sw = ws[seg] + (size_t)(n0 / 128) * kbn;
    const int tid = threadIdx.x, warp = tid >> 5, wr = (warp >> 1) * 32, wc = (warp & 1) * 32;
    float acc[KN_GG_BM * KN_GG_BN / KN_GG_THREADS]; /* element e = tid + 128 i of the tile */
    for (int i = 0; i < KN_GG_BM * KN_GG_BN / KN_GG_THREADS; i++)
        acc[i] = 0.0f;

    for (int kb = 0; kb < kbn; kb++) {
        kn_gg_acc_t part[2][2];
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
                wmma::fill_fragment(part[i][j], 0.0f);
        for (int kc = 0; kc < 128; kc += KN_GG_BK) {
            int k0 = kb * 128 + kc;
            /* 64 rows x 32 bytes of each operand: one 16-byte vector per thread each,
             * widened to bf16 (exact) */
            int r = tid / 2, c = (tid % 2) * 16;
            uint4 xv = make_uint4(0, 0, 0, 0), wv = make_uint4(0, 0, 0, 0);
            if (r < nr) xv = *(const uint4 *)(xq + (size_t)(r0 + r) * K + k0 + c);
            if (r < nc) wv = *(const uint4 *)(W + (size_t)(n0 + r) * K + k0 + c);
            const uint8_t *xb = (const uint8_t *)&xv, *wb = (const uint8_t *)&wv;
            for (int t = 0; t < 16; t++) {
                Xs[r * KN_GG_LD + c + t] = __float2bfloat16_rn(kn_e4m3_to_f32(xb[t]));
                Ws[r * KN_GG_LD + c + t] = __float2bfloat16_rn(kn_e4m3_to_f32(wb[t]));
            }
            __syncthreads();
            kn_gg_mma(Xs, Ws, wr, wc, part);
            __syncthreads(); /* the tiles are consumed before the next step overwrites them */
        }
        kn_gg_store(Cs, wr, wc, part);
        if (tid < KN_GG_BM) rs[tid] = tid < nr ? xs[(size_t)(r0 + tid) * kbn + kb] * sw[kb] : 0.0f;
        __syncthreads();
        for (int i = 0; i < KN_GG_BM * KN_GG_BN / KN_GG_THREADS; i++) {
            int e = tid + KN_GG_THREADS * i, rr = e / KN_GG_BN, cc = e % KN_GG_BN;
            acc[i] += rs[rr] * Cs[rr * KN_GG_LDC + cc];
        }
        __syncthreads(); /* Cs and rs are read before the next block's partials land */
    }
    for (int i = 0; i < KN_GG_BM * KN_GG_BN / KN_GG_THREADS; i++) {
        int e = tid + KN_GG_THREADS * i, rr = e / KN_GG_BN, cc = e % KN_GG_BN;
        if (rr < nr && cc < nc)
            y[(size_t)(r0 + rr) * M + n0 + cc] = kn_bf16_to_f32(kn_f32_to_bf16(acc[i]));
    }
}

extern "C" int kn_cu_grouped_gemm_fp8_ok(int M, int K)
{
    return M > 0 && K > 0 && M % 128 == 0 && K % 128 == 0;
}

extern "C" cudaError_t kn_cu_grouped_gemm_fp8(const uint8_t *xq, const float *xs,
                                              const uint8_t *const *w, const float *const *ws,
                                              const int32_t *tiles, int ntiles, int M, int K,
                                              float *y, cudaStream_t stream)
{
    if (ntiles <= 0) return cudaSuccess;
    if (!kn_cu_grouped_gemm_fp8_ok(M, K) || ntiles > 65535) return cudaErrorInvalidValue;
    KN_LAUNCH(kn_grouped_gemm_fp8_kernel, dim3((unsigned)(M / KN_GG_BN), ntiles), KN_GG_THREADS, 0,
              stream)
    (xq, xs, w, ws, tiles, M, K, y);
    return cudaGetLastError();
}

extern "C" int kn_cu_grouped_gemm_ok(int M, int K)
{
    return M > 0 && K > 0 && K % KN_GG_BK == 0;
}

extern "C" int kn_cu_grouped_gemm_tiles(const int32_t *off, int nseg, int32_t *tiles, int max_tiles)
{
    int n = 0;
    for (int s = 0; s < nseg; s++)
        for (int r = off[s]; r < off[s + 1]; r += KN_GG_BM) {
            if (n >= max_tiles) return -1;
            tiles[3 * n] = s;
            tiles[3 * n + 1] = r - off[0];
            tiles[3 * n + 2] = off[s + 1] - r < KN_GG_BM ? off[s + 1] - r : KN_GG_BM;
            n++;
        }
    return n;
}

extern "C" cudaError_t kn_cu_grouped_gemm_bf16(const uint16_t *x, const uint16_t *const *w,
                                               const int32_t *tiles, int ntiles, int M, int K,
                                               float *y, cudaStream_t stream)
{
    if (ntiles <= 0) return cudaSuccess;
    if (!kn_cu_grouped_gemm_ok(M, K) || ntiles > 65535) return cudaErrorInvalidValue;
    KN_LAUNCH(kn_grouped_gemm_kernel, dim3((unsigned)((M + KN_GG_BN - 1) / KN_GG_BN), ntiles),
              KN_GG_THREADS, 0, stream)
    (x, w, tiles, M, K, y);
    return cudaGetLastError();
}
