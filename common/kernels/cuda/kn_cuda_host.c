/*
 * kn_cuda_host: host-side planning for the cuda backend (no CUDA headers; built in every
 * configuration so the unit tests check it on machines without a GPU).
 */
#include "kn_cuda_host.h"

#include <string.h>

#define KN_BLK 128

void kn_arena_init(kn_arena_t *a, size_t cap)
{
    a->cap = cap;
    a->used = 0;
    a->high = 0;
}

afd_status_t kn_arena_take(kn_arena_t *a, size_t bytes, size_t align, size_t *off)
{
    if (align == 0 || (align & (align - 1))) return AFD_ERR_INVALID;
    size_t o = (a->used + align - 1) & ~(align - 1);
    if (o < a->used || o + bytes < o || o + bytes > a->cap) {
        size_t want = (o < a->used ? a->used : o) + bytes;
        if (want > a->high) a->high = want;
        return AFD_ERR_NOMEM;
    }
    a->used = o + bytes;
    if (a->used > a->high) a->high = a->used;
    *off = o;
    return AFD_OK;
}

void kn_arena_reset(kn_arena_t *a)
{
    a->used = 0;
}

const char *kn_scale_order_name(kn_scale_order_t order)
{
    switch (order) {
    case KN_SCALE_OUTER_FAST:
        return "outer-fast";
    case KN_SCALE_INNER_FAST:
        return "inner-fast";
    case KN_SCALE_OUTER_TIGHT:
        return "outer-fast-unpadded";
    }
    return "?";
}

int64_t kn_scale_ld(kn_scale_order_t order, int64_t outer, int64_t inner)
{
    return order == KN_SCALE_OUTER_FAST   ? (outer + 3) / 4 * 4
           : order == KN_SCALE_INNER_FAST ? inner
                                          : outer;
}

size_t kn_scale_count(kn_scale_order_t order, int64_t outer, int64_t inner)
{
    int64_t ld = kn_scale_ld(order, outer, inner);
    return (size_t)(order == KN_SCALE_INNER_FAST ? outer * ld : ld * inner);
}

size_t kn_scale_index(kn_scale_order_t order, int64_t outer, int64_t inner, int64_t o, int64_t kb)
{
    int64_t ld = kn_scale_ld(order, outer, inner);
    return (size_t)(order == KN_SCALE_INNER_FAST ? o * ld + kb : kb * ld + o);
}

int kn_fp8_native_ok(const kn_src_t *s)
{
    if (s->dtype != AFD_DTYPE_E4M3 || !s->scale) return 0;
    /* whole checkpoint blocks, and dimensions the fp8 tensor cores take (multiples of 128
     * keep every 128-wide scale block full) */
    return s->rows > 0 && s->cols > 0 && s->row0 % KN_BLK == 0 && s->col0 % KN_BLK == 0 &&
           s->rows % KN_BLK == 0 && s->cols % KN_BLK == 0;
}

afd_status_t kn_fp8_weight_scales(const kn_src_t *s, kn_scale_order_t order, float *dst,
                                  size_t dst_count)
{
    if (!kn_fp8_native_ok(s)) return AFD_ERR_INVALID;
    int64_t br = s->rows / KN_BLK, bc = s->cols / KN_BLK;
    int64_t full_bc = (s->full_cols + KN_BLK - 1) / KN_BLK;
    int64_t rb0 = s->row0 / KN_BLK, cb0 = s->col0 / KN_BLK;
    if (dst_count < kn_scale_count(order, br, bc)) return AFD_ERR_RANGE;
    memset(dst, 0, sizeof(float) * dst_count);
    for (int64_t r = 0; r < br; r++)
        for (int64_t c = 0; c < bc; c++) {
            float v;
            size_t src_i = (size_t)((rb0 + r) * full_bc + cb0 + c);
            memcpy(&v, (const unsigned char *)s->scale + 4 * src_i, 4);
            dst[kn_scale_index(order, br, bc, r, c)] = v;
        }
    return AFD_OK;
}

static int ilog2_dist(int a, int b) /* |log2(a / b)| for powers of two */
{
    int d = 0;
    while (a > b) {
        a /= 2;
        d++;
    }
    while (b > a) {
        b /= 2;
        d++;
    }
    return d;
}

afd_status_t kn_attn_plan(int nheads, int head_dim, int max_ctx, int nseq, int num_sms,
                          kn_attn_plan_t *p)
{
    if (nheads < 1 || head_dim < 1 || max_ctx < 0 || nseq < 1) return AFD_ERR_INVALID;
    int best = 0, best_d = 1 << 30;
    for (int ept = KN_ATTN_MAX_EPT; ept >= 1; ept /= 2) {
        if (head_dim % ept) continue;
        int tph = head_dim / ept;
        if (tph > 32 || (tph & (tph - 1))) continue;
        long threads = (long)nheads * tph;
        if (threads > KN_ATTN_MAX_THREADS(ept) || threads % 32) continue;
        int d = ilog2_dist((int)threads, 256); /* 256 threads: a good block on Hopper */
        if (d < best_d) {
            best_d = d;
            best = ept;
        }
    }
    if (!best) return AFD_ERR_UNSUPPORTED;
    memset(p, 0, sizeof(*p));
    p->ept = best;
    p->tph = head_dim / best;
    p->threads = nheads * p->tph;
    /* K and V tiles as float32 in shared memory: at most 64 KiB */
    int tile = 32;
    while (tile > 1 && (size_t)tile * (size_t)head_dim * 8 > 65536)
        tile /= 2;
    p->tile = tile;
    /* split-K: enough blocks to fill the device twice, each over at least 256 positions */
    int sms = num_sms > 0 ? num_sms : 1;
    int splits = (2 * sms + nseq - 1) / nseq;
    int max_by_ctx = (max_ctx + 255) / 256;
    if (splits > max_by_ctx) splits = max_by_ctx;
    if (splits > KN_ATTN_MAX_SPLITS) splits = KN_ATTN_MAX_SPLITS;
    if (splits < 1) splits = 1;
    int chunk = (max_ctx + splits - 1) / splits;
    chunk = (chunk + tile - 1) / tile * tile;
    if (chunk < tile) chunk = tile;
    p->chunk = chunk;
    p->splits = (max_ctx + chunk - 1) / chunk;
    if (p->splits < 1) p->splits = 1;
    return AFD_OK;
}

size_t kn_attn_ws_bytes(const kn_attn_plan_t *p, int nseq, int nheads, int head_dim)
{
    size_t parts = (size_t)nseq * (size_t)p->splits;
    return parts * (size_t)nheads * ((size_t)head_dim + 2) * sizeof(float);
}
