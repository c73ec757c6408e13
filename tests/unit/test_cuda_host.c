/*
 * test_cuda_host: the cuda backend's host-side planning, checked without a GPU: the
 * arena, grouping routed rows by expert, fp8 block-scale layouts, the decode
 * attention launch plan, and that asking for the cuda backend on a machine without
 * a usable device fails cleanly.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "kn_cuda_host.h"
#include "kn_ops.h"

#include <stdlib.h>
#include <string.h>

static uint32_t rng_next(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static void test_arena(void **state)
{
    (void)state;
    kn_arena_t a;
    size_t off;
    kn_arena_init(&a, 1000);
    assert_int_equal(kn_arena_take(&a, 10, 1, &off), AFD_OK);
    assert_int_equal(off, 0);
    assert_int_equal(kn_arena_take(&a, 100, 256, &off), AFD_OK);
    assert_int_equal(off, 256);
    assert_int_equal(kn_arena_take(&a, 1, 64, &off), AFD_OK);
    assert_int_equal(off, 384);
    /* too big: refused, and high says what the region should grow to */
    assert_int_equal(kn_arena_take(&a, 1000, 256, &off), AFD_ERR_NOMEM);
    assert_true(a.high >= 512 + 1000);
    assert_int_equal(a.used, 385);
    /* a bad alignment is a caller error */
    assert_int_equal(kn_arena_take(&a, 1, 3, &off), AFD_ERR_INVALID);
    kn_arena_reset(&a);
    assert_int_equal(kn_arena_take(&a, 1000, 256, &off), AFD_OK);
    assert_int_equal(off, 0);
    assert_int_equal(kn_arena_take(&a, 1, 1, &off), AFD_ERR_NOMEM);
    /* a size that would wrap around is refused, not wrapped */
    kn_arena_reset(&a);
    assert_int_equal(kn_arena_take(&a, SIZE_MAX - 8, 1, &off), AFD_ERR_NOMEM);
}

/* the grouping against the obvious per-expert scan (what mdl_ffn does on the host) */
static void test_moe_group(void **state)
{
    (void)state;
    enum { N = 97, K = 3, E = 48 };
    int32_t ids[N * K], offsets[E + 1], rows[N * K];
    float w[N * K], rw[N * K];
    uint32_t s = 7;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < K; j++) { /* distinct experts per token, like a top-k */
            int id;
            int dup;
            do {
                id = (int)(rng_next(&s) % E);
                dup = 0;
                for (int q = 0; q < j; q++)
                    dup |= ids[i * K + q] == id;
            } while (dup);
            ids[i * K + j] = id;
            w[i * K + j] = (float)(rng_next(&s) % 1000) / 1000.0f;
        }
    int ranges[][2] = {{0, E}, {16, 32}, {47, 48}, {5, 5}};
    for (size_t r = 0; r < sizeof(ranges) / sizeof(ranges[0]); r++) {
        int e0 = ranges[r][0], e1 = ranges[r][1];
        assert_int_equal(kn_moe_group(ids, w, N, K, E, e0, e1, offsets, rows, rw), AFD_OK);
        assert_int_equal(offsets[0], 0);
        int at = 0;
        for (int e = e0; e < e1; e++) {
            assert_int_equal(offsets[e - e0], at);
            for (int i = 0; i < N; i++)
                for (int j = 0; j < K; j++)
                    if (ids[i * K + j] == e) {
                        assert_int_equal(rows[at], i);
                        assert_true(rw[at] == w[i * K + j]);
                        at++;
                    }
        }
        assert_int_equal(offsets[e1 - e0], at);
    }
    /* an id from a peer outside [0, nexp) */
    ids[5] = E;
    assert_int_equal(kn_moe_group(ids, w, N, K, E, 0, E, offsets, rows, rw), AFD_ERR_RANGE);
    ids[5] = -1;
    assert_int_equal(kn_moe_group(ids, w, N, K, E, 0, E, offsets, rows, rw), AFD_ERR_RANGE);
    assert_int_equal(kn_moe_group(ids, w, N, K, E, 10, 5, offsets, rows, rw), AFD_ERR_INVALID);
    /* no tokens */
    assert_int_equal(kn_moe_group(ids, w, 0, K, E, 0, E, offsets, rows, rw), AFD_OK);
    assert_int_equal(offsets[E], 0);
}

static void test_scale_layout(void **state)
{
    (void)state;
    for (int order = 0; order < KN_SCALE_ORDERS; order++) {
        for (int64_t outer = 1; outer < 11; outer++)
            for (int64_t inner = 1; inner < 6; inner++) {
                size_t count = kn_scale_count((kn_scale_order_t)order, outer, inner);
                char *seen = calloc(count, 1);
                assert_non_null(seen);
                for (int64_t o = 0; o < outer; o++)
                    for (int64_t k = 0; k < inner; k++) {
                        size_t i = kn_scale_index((kn_scale_order_t)order, outer, inner, o, k);
                        assert_true(i < count);
                        assert_int_equal(seen[i], 0);
                        seen[i] = 1;
                    }
                free(seen);
            }
    }
    /* outer-fast columns are 16-byte aligned: ld rounds outer up to 4 */
    assert_int_equal(kn_scale_ld(KN_SCALE_OUTER_FAST, 5, 3), 8);
    assert_int_equal(kn_scale_index(KN_SCALE_OUTER_FAST, 5, 3, 2, 1), 8 + 2);
    assert_int_equal(kn_scale_index(KN_SCALE_INNER_FAST, 5, 3, 2, 1), 2 * 3 + 1);
    assert_int_equal(kn_scale_index(KN_SCALE_OUTER_TIGHT, 5, 3, 2, 1), 5 + 2);
    assert_int_equal(kn_scale_count(KN_SCALE_OUTER_TIGHT, 5, 3), 15);
    assert_int_equal(kn_scale_count(KN_SCALE_OUTER_FAST, 5, 3), 24);
    assert_string_equal(kn_scale_order_name(KN_SCALE_INNER_FAST), "inner-fast");
}

/* a slice's scales relaid from a checkpoint matrix whose scales sit unaligned */
static void test_weight_scales(void **state)
{
    (void)state;
    enum { FR = 640, FC = 384, BR = 5, BC = 3 };
    unsigned char *buf = malloc(1 + 4 * BR * BC);
    assert_non_null(buf);
    for (int i = 0; i < BR * BC; i++) {
        float v = 1.0f + (float)i; /* scale (r, c) = 1 + r * BC + c */
        memcpy(buf + 1 + 4 * i, &v, 4);
    }
    static uint8_t data[1];
    kn_src_t s = {.dtype = AFD_DTYPE_E4M3,
                  .data = data,
                  .full_rows = FR,
                  .full_cols = FC,
                  .row0 = 256,
                  .rows = 256,
                  .col0 = 128,
                  .cols = 256,
                  .scale = (const float *)(const void *)(buf + 1)};
    assert_true(kn_fp8_native_ok(&s));
    for (int order = 0; order < KN_SCALE_ORDERS; order++) {
        size_t n = kn_scale_count((kn_scale_order_t)order, 2, 2);
        float *dst = malloc(sizeof(float) * n);
        assert_non_null(dst);
        assert_int_equal(kn_fp8_weight_scales(&s, (kn_scale_order_t)order, dst, n), AFD_OK);
        for (int r = 0; r < 2; r++)
            for (int c = 0; c < 2; c++) {
                float want = 1.0f + (float)((2 + r) * BC + 1 + c);
                assert_true(dst[kn_scale_index((kn_scale_order_t)order, 2, 2, r, c)] == want);
            }
        assert_int_equal(kn_fp8_weight_scales(&s, (kn_scale_order_t)order, dst, 1), AFD_ERR_RANGE);
        free(dst);
    }
    /* slices that cut a 128x128 block stay bf16 on the device */
    kn_src_t t = s;
    t.col0 = 64;
    assert_false(kn_fp8_native_ok(&t));
    t = s;
    t.rows = 200;
    assert_false(kn_fp8_native_ok(&t));
    t = s;
    t.dtype = AFD_DTYPE_BF16;
    t.scale = NULL;
    assert_false(kn_fp8_native_ok(&t));
    float one;
    assert_int_equal(kn_fp8_weight_scales(&t, KN_SCALE_INNER_FAST, &one, 1), AFD_ERR_INVALID);
    free(buf);
}

static void check_plan(int nheads, int hd, int ctx, int nseq, int sms)
{
    kn_attn_plan_t p;
    assert_int_equal(kn_attn_plan(nheads, hd, ctx, nseq, sms, &p), AFD_OK);
    assert_int_equal(p.tph * p.ept, hd);
    assert_int_equal(p.threads, nheads * p.tph);
    assert_true(p.tph <= 32 && (p.tph & (p.tph - 1)) == 0);
    assert_true(p.threads % 32 == 0 && p.threads <= KN_ATTN_MAX_THREADS(p.ept));
    assert_true(p.ept <= KN_ATTN_MAX_EPT);
    assert_true((size_t)p.tile * (size_t)hd * 8 <= 65536);
    assert_int_equal(p.chunk % p.tile, 0);
    assert_true(p.splits >= 1 && p.splits <= KN_ATTN_MAX_SPLITS);
    /* the splits cover the context, and none is empty */
    assert_true((long)p.splits * p.chunk >= ctx);
    assert_true(ctx == 0 || (long)(p.splits - 1) * p.chunk < ctx);
    assert_true(kn_attn_ws_bytes(&p, nseq, nheads, hd) ==
                (size_t)nseq * p.splits * nheads * (hd + 2) * sizeof(float));
}

static void test_attn_plan(void **state)
{
    (void)state;
    kn_attn_plan_t p;
    /* Step3: 64 heads x 256 share one KV head: 4 threads per head, 64 dims each */
    assert_int_equal(kn_attn_plan(64, 256, 4096, 128, 132, &p), AFD_OK);
    assert_int_equal(p.ept, 64);
    assert_int_equal(p.tph, 4);
    assert_int_equal(p.threads, 256);
    assert_int_equal(p.tile, 32);
    /* 128 sequences fill 132 SMs twice with 3 splits of ~1.4K positions */
    assert_int_equal(p.splits, 3);
    /* one long sequence: split-K up to the cap */
    assert_int_equal(kn_attn_plan(64, 256, 65536, 1, 132, &p), AFD_OK);
    assert_int_equal(p.splits, KN_ATTN_MAX_SPLITS);
    /* a short one: one split */
    assert_int_equal(kn_attn_plan(64, 256, 100, 1, 132, &p), AFD_OK);
    assert_int_equal(p.splits, 1);
    /* the tiny test model: 4 heads x 64 */
    assert_int_equal(kn_attn_plan(4, 64, 10, 1, 132, &p), AFD_OK);
    assert_int_equal(p.threads, 128);
    int shapes[][5] = {{64, 256, 4096, 128, 132}, {64, 256, 8192, 128, 132}, {4, 64, 1, 1, 132},
                       {16, 128, 5000, 3, 132},   {64, 256, 1, 1, 1},        {8, 32, 777, 2, 0},
                       {64, 256, 0, 4, 132}};
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        check_plan(shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], shapes[i][4]);
    /* 32 heads x 256: 32 dims per thread give the 256-thread block */
    assert_int_equal(kn_attn_plan(32, 256, 100, 1, 132, &p), AFD_OK);
    assert_int_equal(p.ept, 32);
    assert_int_equal(p.threads, 256);
    /* 128 heads x 256 would need more threads than a block holds registers for */
    assert_int_equal(kn_attn_plan(128, 256, 100, 1, 132, &p), AFD_ERR_UNSUPPORTED);
    /* no thread layout: the generic kernel takes these */
    assert_int_equal(kn_attn_plan(3, 6, 10, 1, 132, &p), AFD_ERR_UNSUPPORTED);
    assert_int_equal(kn_attn_plan(0, 64, 10, 1, 132, &p), AFD_ERR_INVALID);
}

/* without a device (or without CUDA in the build) the backend says so and nothing breaks */
static void test_backend_create(void **state)
{
    (void)state;
#ifdef __SANITIZE_ADDRESS__
    skip(); /* cudart's own start-up allocations are not this project's to leak-check */
#endif
    kn_backend_t *be = NULL;
    afd_status_t st = kn_backend_create("cuda", 1, &be);
    if (st == AFD_OK) {
        assert_string_equal(be->ops->name, "cuda");
        assert_int_equal(be->ops->host_memory, 0);
        be->ops->destroy(be);
    } else {
        assert_int_equal(st, AFD_ERR_UNSUPPORTED);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_arena),        cmocka_unit_test(test_moe_group),
        cmocka_unit_test(test_scale_layout), cmocka_unit_test(test_weight_scales),
        cmocka_unit_test(test_attn_plan),    cmocka_unit_test(test_backend_create),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
