/*
 * kn_cuda_host: the host-side planning of the cuda backend, in plain C so that it
 * builds and is tested without CUDA: the device arena's bookkeeping, the grouping of
 * routed rows by expert, the layouts of fp8 block scales for cuBLASLt, and the launch
 * plan of the MFA decode attention kernel (threads per head, split-K over context).
 */
#ifndef KN_CUDA_HOST_H
#define KN_CUDA_HOST_H

#include "afd_status.h"
#include "kn_ops.h"

#include <stddef.h>
#include <stdint.h>

/* ---- arena: a bump allocator over one device region, kept as offsets ---- */

typedef struct kn_arena {
    size_t cap;  /* bytes in the region */
    size_t used; /* bytes handed out since the last reset */
    size_t high; /* the most ever asked for (used + the failed request): what to grow to */
} kn_arena_t;

void kn_arena_init(kn_arena_t *a, size_t cap);
/* Hands out `bytes` at an offset aligned to `align` (a power of two); returns OK and sets
 * *off, or AFD_ERR_NOMEM (and raises high) when the region is too small. */
afd_status_t kn_arena_take(kn_arena_t *a, size_t bytes, size_t align, size_t *off);
/* Forgets everything handed out (the next step reuses the region). */
void kn_arena_reset(kn_arena_t *a);

/* (the routed rows grouped by expert, kn_moe_group, are in kn_ops.h) */

/* ---- fp8 block scales in cuBLASLt's layouts ---- */

/*
 * Order of a scale matrix in memory, for `outer` rows (weight row blocks, or tokens) of
 * `inner` blocks along K. cuBLASLt's VEC128/BLK128x128 scale tensors are described for
 * column-major operands; which layout it reads is checked against a reference GEMM
 * when the backend starts, for the weights and the activations separately:
 *   OUTER_FAST:  scale(o, kb) at kb * ld + o, ld = round_up(outer, 4)  (16-byte columns)
 *   INNER_FAST:  scale(o, kb) at o * ld + kb, ld = inner
 *   OUTER_TIGHT: scale(o, kb) at kb * ld + o, ld = outer
 */
typedef enum kn_scale_order {
    KN_SCALE_OUTER_FAST = 0,
    KN_SCALE_INNER_FAST = 1,
    KN_SCALE_OUTER_TIGHT = 2
} kn_scale_order_t;
#define KN_SCALE_ORDERS 3
/* A short name of an order, for logs. */
const char *kn_scale_order_name(kn_scale_order_t order);

/* The leading dimension of a scale matrix with `outer` rows of `inner` (k) blocks. */
int64_t kn_scale_ld(kn_scale_order_t order, int64_t outer, int64_t inner);
/* The number of floats such a scale matrix takes (padding included). */
size_t kn_scale_count(kn_scale_order_t order, int64_t outer, int64_t inner);
/* The index of scale (o, kb). */
size_t kn_scale_index(kn_scale_order_t order, int64_t outer, int64_t inner, int64_t o, int64_t kb);

/* Whether an e4m3 slice can stay fp8 on the device: blocks of the slice are whole 128x128
 * checkpoint blocks and the dimensions suit the block-scaled GEMM. */
int kn_fp8_native_ok(const kn_src_t *src);
/*
 * The slice's 128x128 weight scales, (rows/128, cols/128), laid out in `order` into dst
 * (kn_scale_count floats, padding zeroed). Needs kn_fp8_native_ok(src).
 */
afd_status_t kn_fp8_weight_scales(const kn_src_t *src, kn_scale_order_t order, float *dst,
                                  size_t dst_count);

/* ---- MFA decode attention: launch plan ---- */

typedef struct kn_attn_plan {
    int ept;     /* elements of one head's 256 dims per thread (q and accumulator in registers) */
    int tph;     /* threads per head: head_dim / ept, a power of two <= 32 */
    int threads; /* nheads * tph */
    int splits;  /* blocks over the context per sequence (split-K) */
    int chunk;   /* positions per split, a multiple of tile */
    int tile;    /* KV positions per shared-memory tile (loaded once for all heads) */
} kn_attn_plan_t;

/* The largest ept a kernel is built for. */
#define KN_ATTN_MAX_EPT 64
/* The most threads a block of a given ept may have: the kernel's launch bounds, which
 * leave each thread registers for its 2 * ept values (64 -> 256 threads, 32 -> 512). */
#define KN_ATTN_MAX_THREADS(ept) ((ept) >= 64 ? 256 : (ept) >= 32 ? 512 : 1024)
/* The most splits of one sequence (bounds the partial-result workspace). */
#define KN_ATTN_MAX_SPLITS 64

/*
 * Plans the decode kernel for nseq sequences of at most max_ctx positions on a device of
 * num_sms multiprocessors. AFD_ERR_UNSUPPORTED when no thread layout fits the shape (the
 * backend then uses the generic attention kernel).
 */
afd_status_t kn_attn_plan(int nheads, int head_dim, int max_ctx, int nseq, int num_sms,
                          kn_attn_plan_t *p);
/* Bytes of the split-K workspace of a plan: partial outputs and (max, sum) pairs. */
size_t kn_attn_ws_bytes(const kn_attn_plan_t *p, int nseq, int nheads, int head_dim);

#endif
