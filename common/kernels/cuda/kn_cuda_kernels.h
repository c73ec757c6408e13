/*
 * kn_cuda_kernels: C-callable launchers of the cuda backend's kernels (one .cu file per
 * op). Every pointer is device memory unless said; activations are float32 row-major;
 * bf16 is stored as uint16_t and e4m3 as uint8_t. A launcher checks its shape, queues
 * the kernel on `stream` and returns the launch status (cudaSuccess when queued).
 */
#ifndef KN_CUDA_KERNELS_H
#define KN_CUDA_KERNELS_H

#include "kn_cuda_host.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* out[n, dim] = x / rms(x) * w; with add != NULL first x += add (written back): the
 * residual add fused into the norm. out may be x. */
cudaError_t kn_cu_rmsnorm(float *x, const float *add, int n, int dim, const float *w, float eps,
                          float *out, cudaStream_t stream);

/* NeoX rotary embedding over all of head_dim, in place; x (n, nheads, head_dim), pos (n). */
cudaError_t kn_cu_rope(float *x, int n, int nheads, int head_dim, const int32_t *pos, double theta,
                       cudaStream_t stream);

/* out[i] = silu(gate[i]) * up[i]; out may alias gate or up. */
cudaError_t kn_cu_swiglu(const float *gate, const float *up, size_t n, float *out,
                         cudaStream_t stream);

/*
 * Softmax (float32) over nexp logits per row, then the top k (ties to the lower id);
 * weights are the probabilities, divided by their sum when renorm. nexp <= 4096.
 */
cudaError_t kn_cu_router_topk(const float *logits, int n, int nexp, int k, int renorm, int32_t *ids,
                              float *weights, cudaStream_t stream);

/* dst[i] = src[rows[i]] (rows of dim floats). */
cudaError_t kn_cu_gather(const float *src, int dim, const int32_t *rows, int n, float *dst,
                         cudaStream_t stream);
/* dst[rows[i]] += scale[i] * src[i]; rows may repeat (atomic adds). */
cudaError_t kn_cu_scatter_add(float *dst, int dim, const int32_t *rows, const float *scale, int n,
                              const float *src, cudaStream_t stream);
/* y[i] += x[i] */
cudaError_t kn_cu_add(float *y, const float *x, size_t n, cudaStream_t stream);

/*
 * Embedding rows out[i] = table[ids[i]] as float32. The table is bf16 (scale NULL) or e4m3
 * with 128x128 block scales in `order` (cols a multiple of 128).
 */
cudaError_t kn_cu_embed(const void *table, const float *scale, kn_scale_order_t order, int64_t rows,
                        int64_t cols, const int32_t *ids, int n, float *out, cudaStream_t stream);

/* ---- conversions and fp8 ---- */

cudaError_t kn_cu_f32_to_bf16(const float *x, uint16_t *out, size_t n, cudaStream_t stream);

/* ---- grouped expert GEMMs (kn_grouped_gemm.cu) ---- */

/* Whether the grouped GEMM takes (M, K): K a multiple of 32. */
int kn_cu_grouped_gemm_ok(int M, int K);
/* The tiles of segments off[0..nseg] (rows relative to off[0]) as (segment, first row,
 * rows) triples into tiles (3 x max_tiles ints, host); their number, or -1 if more. At
 * most total / 64 + nseg. */
int kn_cu_grouped_gemm_tiles(const int32_t *off, int nseg, int32_t *tiles, int max_tiles);
/* y[r, M] = x[r, K] . w[seg]^T for every row r of every tile, in one launch: x bf16 (rows,
 * K), w a device array of the segments' bf16 (M, K) weights, tiles a device copy of
 * kn_cu_grouped_gemm_tiles's triples, y float32 (rows, M). */
cudaError_t kn_cu_grouped_gemm_bf16(const uint16_t *x, const uint16_t *const *w,
                                    const int32_t *tiles, int ntiles, int M, int K, float *y,
                                    cudaStream_t stream);
/* Whether the fp8 grouped GEMM takes (M, K): whole 128x128 blocks. */
int kn_cu_grouped_gemm_fp8_ok(int M, int K);
/* The same for block-scaled e4m3: xq e4m3 (rows, K) with per-128 scales xs (rows, K / 128)
 * row-major (kn_cu_quant_fp8 with KN_SCALE_INNER_FAST), w and ws device arrays of the
 * segments' e4m3 (M, K) weights and row-major (M / 128, K / 128) block scales; y float32
 * (rows, M), each value rounded to bf16 as the block-scaled GEMM's output. */
cudaError_t kn_cu_grouped_gemm_fp8(const uint8_t *xq, const float *xs, const uint8_t *const *w,
                                   const float *const *ws, const int32_t *tiles, int ntiles, int M,
                                   int K, float *y, cudaStream_t stream);
/* y = (accumulate ? y : 0) + float(d) for bf16 d */
cudaError_t kn_cu_bf16_to_f32(const uint16_t *d, float *y, size_t n, int accumulate,
                              cudaStream_t stream);
/*
 * Per-128 activation quantisation: for each row and group of 128 columns, scale = amax /
 * 448 (1 when all zero) and q = e4m3(x / scale); scale (row, group) goes to
 * scales[kn_scale_index(order, n, groups, row, group)]. dim is a multiple of 128.
 */
cudaError_t kn_cu_quant_fp8(const float *x, int n, int dim, uint8_t *q, float *scales,
                            kn_scale_order_t order, cudaStream_t stream);
/*
 * Each of `rows` logits rows (vocab floats): its k (<= KN_TOP_MAX) best ids and logits by
 * (logit descending, id ascending) into top_id/top_v (rows, k), and its log-sum-exp (in
 * double) into lse (rows); all device memory, ws of kn_cu_logits_top_ws bytes.
 * cudaErrorInvalidValue for a vocabulary too large for the merge's shared memory.
 */
#define KN_TOP_MAX      64
#define KN_TOP_MAX_SMEM (200 * 1024)
size_t kn_cu_logits_top_ws(int rows, int vocab, int k);
cudaError_t kn_cu_logits_top(const float *logits, int rows, int vocab, int k, void *ws, int *top_id,
                             float *top_v, double *lse, cudaStream_t stream);

/* Packed e4m3 rows (afd_rows_encode / afd_rows_decode): rows * dim bytes, then the
 * (row, group of 128) float32 scales; any dim. */
cudaError_t kn_cu_rows_encode_fp8(const float *x, int rows, int dim, void *dst,
                                  cudaStream_t stream);
cudaError_t kn_cu_rows_decode_fp8(const void *src, int rows, int dim, float *x,
                                  cudaStream_t stream);
/* x <- dequant(quant(x)) in dtype (AFD_DTYPE_*: e4m3 per 128 columns, bf16, f16, f32). */
cudaError_t kn_cu_round(float *x, int rows, int dim, int dtype, cudaStream_t stream);
/*
 * A checkpoint slice converted to bf16 (rows, cols). raw holds the slice packed (rows,
 * cols) in src_dtype; for e4m3, scale is the matrix's full (ceil(full_rows/128),
 * full_bc) block-scale matrix and (row0, col0) the slice origin.
 */
cudaError_t kn_cu_weight_to_bf16(int src_dtype, const void *raw, int64_t rows, int64_t cols,
                                 const float *scale, int64_t row0, int64_t col0, int64_t full_bc,
                                 uint16_t *out, cudaStream_t stream);
/* Fills n elements of dtype (bf16 or e4m3; f32 for scales) with seeded values uniform in
 * [-amp, amp] ([amp/2, amp] for f32), for benchmarks at real shapes. */
cudaError_t kn_cu_fill(void *p, int dtype, size_t n, uint64_t seed, float amp, cudaStream_t stream);

/* ---- KV cache and attention ---- */

/* The paged cache as the kernels see it (device pointers; kn_kv_t's fields). */
typedef struct kn_cu_kv {
    int dtype; /* AFD_DTYPE_F32, BF16 or E4M3 */
    int num_blocks, block_size, head_dim;
    void *k, *v;              /* (layer, block, block_size, head_dim) */
    float *k_scale, *v_scale; /* (layer, block, block_size), e4m3 only */
} kn_cu_kv_t;

/* Writes k, v (ntok, head_dim) at positions pos0.. of one sequence (block_table: device). */
cudaError_t kn_cu_kv_write(const kn_cu_kv_t *kv, int layer, const int32_t *block_table, int pos0,
                           int ntok, const float *k, const float *v, cudaStream_t stream);

/* Writes k, v (ntok, head_dim) at cache slots slot0 + slots[t], where slots[t] = block *
 * block_size + offset (device; checked on the host) and slot0 = layer * num_blocks *
 * block_size, one launch for a whole batch. */
cudaError_t kn_cu_kv_write_slots(const kn_cu_kv_t *kv, const int64_t *slots, int64_t slot0,
                                 int ntok, const float *k, const float *v, cudaStream_t stream);

/*
 * MFA decode attention: one new query token per sequence, nheads heads sharing the one KV
 * head. Each block loads a tile of KV positions once into shared memory for all heads,
 * over its split of the context (plan from kn_attn_plan); a second kernel merges the
 * splits. q, out: (nseq, nheads, head_dim); block_tables (nseq, bt_stride); ctx_lens
 * (nseq) positions including the new one; ws: kn_attn_ws_bytes of device memory.
 */
cudaError_t kn_cu_attn_decode(const kn_attn_plan_t *plan, const kn_cu_kv_t *kv, int layer,
                              const int32_t *block_tables, int bt_stride, const int32_t *ctx_lens,
                              int nseq, const float *q, int nheads, float scale, float *ws,
                              float *out, cudaStream_t stream);

/*
 * The same on the tensor cores (bf16 WMMA, float32 accumulation; q and the probabilities
 * rounded to bf16): same arguments, plan and workspace. kn_cu_attn_decode_tc_ok says
 * which shapes it takes (16..64 heads in multiples of 16, head_dim a multiple of 16 up
 * to 256, bf16 or fp8 KV).
 */
int kn_cu_attn_decode_tc_ok(int nheads, int head_dim, int kv_dtype);
cudaError_t kn_cu_attn_decode_tc(const kn_attn_plan_t *plan, const kn_cu_kv_t *kv, int layer,
                                 const int32_t *block_tables, int bt_stride,
                                 const int32_t *ctx_lens, int nseq, const float *q, int nheads,
                                 float scale, float *ws, float *out, cudaStream_t stream);

/* Causal attention of ntok queries at positions pos0.. of one sequence (prefill, or any
 * shape the decode plan does not take); head_dim <= 1024. */
cudaError_t kn_cu_attn_prefill(const kn_cu_kv_t *kv, int layer, const int32_t *block_table,
                               int pos0, int ntok, const float *q, int nheads, float scale,
                               float *out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
