/*
 * kn_cuda_gemm: the backend's GEMMs through cuBLASLt, y[n, M] = x[n, K] . W[M, K]^T with
 * row-major operands (column-major "TN" for cuBLASLt: A = W transposed, B = x):
 *   bf16:  W, x bf16; y float32, accumulated into when asked.
 *   fp8:   W e4m3 with 128x128 block scales (BLK128x128_32F), x e4m3 with per-128 scales
 *          along K (VEC128_32F); the result is bf16 (the block-scaled kernels' output).
 * Plans (descriptors, layouts, the heuristic's algorithm) are cached by shape; the
 * workspace is allocated once.
 */
#ifndef KN_CUDA_GEMM_H
#define KN_CUDA_GEMM_H

#include "afd_status.h"
#include "kn_cuda_host.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#define KN_EXPORT __attribute__((visibility("default")))

typedef struct kn_gemm kn_gemm_t;

/* Creates the cuBLASLt handle and a workspace of ws_bytes on the current device. */
KN_EXPORT afd_status_t kn_gemm_create(size_t ws_bytes, kn_gemm_t **out);
KN_EXPORT void kn_gemm_destroy(kn_gemm_t *g);

/* bf16 GEMM into float32 y (y += when accumulate). AFD_ERR_UNSUPPORTED when cuBLASLt has no
 * algorithm for the shape. */
KN_EXPORT afd_status_t kn_gemm_bf16(kn_gemm_t *g, const uint16_t *w, const uint16_t *x, int M,
                                    int N, int K, float *y, int accumulate, cudaStream_t stream);

/* Block-scaled fp8 GEMM into bf16 d (n, M); the scales laid out as the probe found
 * (outer = M blocks for w, N tokens for x). AFD_ERR_UNSUPPORTED when no algorithm takes
 * the shape. */
KN_EXPORT afd_status_t kn_gemm_fp8(kn_gemm_t *g, const uint8_t *w, const float *w_scale,
                                   const uint8_t *x, const float *x_scale, int M, int N, int K,
                                   uint16_t *d, cudaStream_t stream);

/*
 * Checks the block-scaled fp8 GEMM against a host reference on small problems with
 * distinct scales per block, trying every pair of scale orders for the weights and the
 * activations (and an activation count that is not a multiple of 4, which tells padded
 * from unpadded columns); sets *order_w and *order_x to the pair that matches and
 * returns OK, or AFD_ERR_UNSUPPORTED (no algorithm, or no pair matches: the backend
 * then keeps fp8 checkpoints as bf16 on the device). *max_rel gets the best relative
 * error seen; why says what happened.
 */
KN_EXPORT afd_status_t kn_gemm_fp8_probe(kn_gemm_t *g, kn_scale_order_t *order_w,
                                         kn_scale_order_t *order_x, double *max_rel, char *why,
                                         size_t why_len);

#endif
