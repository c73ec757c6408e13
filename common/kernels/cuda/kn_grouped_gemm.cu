/*
 * kn_grouped_gemm: the experts' GEMMs of a MoE layer in one launch. Rows of x are sorted
 * by expert (segment s: rows [off[s], off[s+1])); every segment is cut into tiles of up
 * to 64 rows, and one block computes a 64-row x 64-column tile of y = x . W[s]^T on the
 * tensor cores (bf16 WMMA, float32 accumulation), so a layer's E experts take one launch
 * per projection instead of E. The tiles are listed by the host (it knows the segments):
 * (segment, first row, rows) triples.
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

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
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
        __syncthreads(); /* the tiles are consumed before the next step overwrites them */
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(Cs + (wr + 16 * i) * KN_GG_LDC + wc + 16 * j, acc[i][j],
                                    KN_GG_LDC, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < KN_GG_BM * KN_GG_BN; e += KN_GG_THREADS) {
        int r = e / KN_GG_BN, c = e % KN_GG_BN;
        if (r < nr && c < nc) y[(size_t)(r0 + r) * M + n0 + c] = Cs[r * KN_GG_LDC + c];
    }
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
