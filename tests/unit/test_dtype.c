/*
 * test_dtype: common/util/afd_dtype.h.
 *   - the e4m3 table against a decode written here from the OCP E4M3FN definition
 *     (bias 7, subnormals m * 2^-9, 0x7f/0xff NaN, no infinities, max 448);
 *   - f32 -> e4m3: every representable value maps to its own code; for every pair of
 *     adjacent representable values the exact midpoint goes to the even code and the
 *     floats just above / below it go to the nearer one; saturation to +-448 (also for
 *     infinities); NaN; a random sweep against a brute-force nearest-even search;
 *   - bf16: round to nearest even checked at every code's exact value, midpoint and the
 *     floats beside the midpoint, plus a random sweep; NaN stays NaN (also payloads that
 *     truncation would turn into infinity); overflow to infinity;
 *   - f16: all 65536 codes decode like an independent decode and round-trip (NaN aside);
 *     midpoints between adjacent codes round to even, overflow at 65520;
 *   - afd_fp8_quantize_rows / dequantize_rows / round_rows with a short last group,
 *     all-zero groups and the error bound derived in test_fp8_rows_error_bound.
 * Everything is deterministic (fixed seeds) and exact unless a tolerance is stated.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_dtype.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define assert_near(a, b, tol)                                                                     \
    do {                                                                                           \
        double a_ = (a), b_ = (b), t_ = (tol);                                                     \
        if (!(fabs(a_ - b_) <= t_)) fail_msg("%s = %.9g, want %.9g +- %.3g", #a, a_, b_, t_);      \
    } while (0)

static uint64_t rng_state;
static uint64_t rnd64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rnd_unit(void) /* [0, 1) */
{
    return (double)(rnd64() >> 11) * (1.0 / 9007199254740992.0);
}

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- independent references ---- */

/* E4M3FN: s eeee mmm, bias 7; e == 0: subnormal m/8 * 2^-6; e == 15 && m == 7: NaN. */
static double ref_e4m3(uint8_t x)
{
    int s = x >> 7, e = (x >> 3) & 15, m = x & 7;
    if (e == 15 && m == 7) return NAN;
    double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}

/* IEEE binary16: s eeeee mmmmmmmmmm, bias 15. */
static double ref_f16(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(m, -24);
    else
        v = ldexp(1024 + m, e - 25);
    return s ? -v : v;
}

/* bf16 round to nearest even, by comparing the two truncation candidates in double. */
static uint16_t ref_bf16(float f)
{
    uint32_t u = f2u(f);
    if (isnan(f)) return 0x7fc0;
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u; /* hi: next magnitude up */
    double dl = fabs((double)f - (double)u2f(lo));
    if ((lo & 0x7fffffffu) == 0x7f7f0000u) { /* the next magnitude up is infinity */
        /* RNE against the virtual value 2^128: the midpoint is 0x7f7f8000 */
        return (u & 0x7fffffffu) >= 0x7f7f8000u ? (uint16_t)((u >> 16 & 0x8000) | 0x7f80)
                                                : (uint16_t)(lo >> 16);
    }
    if ((lo & 0x7fffffffu) == 0x7f800000u) return (uint16_t)(lo >> 16); /* infinity */
    double dh = fabs((double)u2f(hi) - (double)f);
    if (dl < dh) return (uint16_t)(lo >> 16);
    if (dh < dl) return (uint16_t)(hi >> 16);
    return (lo >> 16) & 1 ? (uint16_t)(hi >> 16) : (uint16_t)(lo >> 16);
}

/* brute-force nearest e4m3 code with ties to the even code (saturating, for |f| finite) */
static uint8_t ref_f32_to_e4m3(float f)
{
    uint8_t sign = signbit(f) ? 0x80 : 0;
    double a = fabs((double)f);
    if (a >= 448) return sign | 0x7e;
    int best = 0;
    double bd = INFINITY;
    for (int c = 0; c <= 0x7e; c++) {
        double d = fabs(a - ref_e4m3((uint8_t)c));
        if (d < bd || (d == bd && (c & 1) == 0)) {
            bd = d;
            best = c;
        }
    }
    return sign | (uint8_t)best;
}

/* ---- e4m3 ---- */

static void test_e4m3_table(void **state)
{
    (void)state;
    for (int c = 0; c < 256; c++) {
        double r = ref_e4m3((uint8_t)c);
        float t = afd_e4m3_table[c];
        if (isnan(r)) {
            assert_true(isnan(t));
            assert_true(c == 0x7f || c == 0xff);
            continue;
        }
        assert_false(isnan(t));
        assert_false(isinf(t));
        if ((double)t != r || !signbit(t) != !signbit(r))
            fail_msg("code 0x%02x: table %a, ref %a", c, t, r);
        assert_true(afd_e4m3_to_f32((uint8_t)c) == t || isnan(t));
        float conv;
        uint8_t b = (uint8_t)c;
        afd_convert_to_f32(AFD_DTYPE_E4M3, &b, &conv, 1);
        assert_memory_equal(&conv, &t, 4);
    }
    assert_true(afd_e4m3_table[0x7e] == 448.0f && afd_e4m3_table[0xfe] == -448.0f);
    assert_true(AFD_E4M3_MAX == 448.0f);
    assert_true(afd_e4m3_table[0x01] == ldexpf(1, -9)); /* smallest subnormal */
    assert_true(afd_e4m3_table[0x08] == ldexpf(1, -6)); /* smallest normal */
    assert_true(signbit(afd_e4m3_table[0x80]) && afd_e4m3_table[0x80] == 0.0f);
}

static void test_e4m3_exact_values(void **state)
{
    (void)state;
    for (int c = 0; c < 256; c++) {
        if ((c & 0x7f) == 0x7f) continue;
        uint8_t got = afd_f32_to_e4m3(afd_e4m3_table[c]);
        if (got != c)
            fail_msg("value %a of code 0x%02x converts to 0x%02x", afd_e4m3_table[c], c, got);
    }
}

/* every midpoint between adjacent codes goes to the even code; the floats beside it go to
 * the nearer code */
static void test_e4m3_rne_midpoints(void **state)
{
    (void)state;
    for (int sgn = 0; sgn < 2; sgn++) {
        for (int c = 0; c < 0x7e; c++) {
            double lo = ref_e4m3((uint8_t)c), hi = ref_e4m3((uint8_t)(c + 1));
            float mid = (float)((lo + hi) / 2); /* exact: e4m3 values have 4 significant bits */
            assert_true((double)mid == (lo + hi) / 2);
            uint8_t even = (uint8_t)((c & 1) ? c + 1 : c), s = sgn ? 0x80 : 0;
            float m = sgn ? -mid : mid;
            float above = nextafterf(mid, INFINITY), below = nextafterf(mid, 0);
            if (sgn) {
                above = -above;
                below = -below;
            }
            uint8_t g = afd_f32_to_e4m3(m), ga = afd_f32_to_e4m3(above),
                    gb = afd_f32_to_e4m3(below);
            if (g != (s | even)) fail_msg("midpoint %a -> 0x%02x, want 0x%02x", m, g, s | even);
            if (ga != (s | (c + 1))) fail_msg("%a -> 0x%02x, want 0x%02x", above, ga, s | (c + 1));
            if (gb != (s | c)) fail_msg("%a -> 0x%02x, want 0x%02x", below, gb, s | c);
        }
    }
    /* below half the smallest subnormal: zero with the sign kept */
    assert_int_equal(afd_f32_to_e4m3(ldexpf(1, -10)), 0x00); /* tie -> even (0) */
    assert_int_equal(afd_f32_to_e4m3(nextafterf(ldexpf(1, -10), 1)), 0x01);
    assert_int_equal(afd_f32_to_e4m3(1e-30f), 0x00);
    assert_int_equal(afd_f32_to_e4m3(-1e-30f), 0x80);
    assert_int_equal(afd_f32_to_e4m3(-0.0f), 0x80);
    assert_int_equal(afd_f32_to_e4m3(0.0f), 0x00);
    assert_int_equal(afd_f32_to_e4m3(ldexpf(1, -149)), 0x00); /* float denormal */
}

static void test_e4m3_saturation_nan(void **state)
{
    (void)state;
    const float big[] = {448.0f,   nextafterf(448, INFINITY),
                         464.0f,   479.0f,
                         480.0f,   1000.0f,
                         65504.0f, 1e30f,
                         3.4e38f,  INFINITY};
    for (size_t i = 0; i < sizeof(big) / sizeof(big[0]); i++) {
        assert_int_equal(afd_f32_to_e4m3(big[i]), 0x7e);
        assert_int_equal(afd_f32_to_e4m3(-big[i]), 0xfe);
    }
    /* just below 448: the midpoint to 416 is 432 */
    assert_int_equal(afd_f32_to_e4m3(432.0f), 0x7e); /* 416 = 0x7d is odd, 448 = 0x7e even */
    assert_int_equal(afd_f32_to_e4m3(nextafterf(432, 0)), 0x7d);
    const float nans[] = {NAN, -NAN, u2f(0x7f800001u), u2f(0xffc12345u)};
    for (size_t i = 0; i < 4; i++) {
        uint8_t c = afd_f32_to_e4m3(nans[i]);
        assert_true(isnan(afd_e4m3_table[c]));
        assert_true((c & 0x7f) == 0x7f);
    }
}

static void test_e4m3_random_sweep(void **state)
{
    (void)state;
    rng_state = 11;
    for (int i = 0; i < 100000; i++) {
        /* log-uniform magnitudes from 2^-12 to 2^10 so every binade and saturation is hit */
        float f = (float)ldexp(1.0 + rnd_unit(), (int)(rnd64() % 23) - 12);
        if (rnd64() & 1) f = -f;
        uint8_t got = afd_f32_to_e4m3(f), want = ref_f32_to_e4m3(f);
        if (got != want) fail_msg("%a -> 0x%02x, want 0x%02x", f, got, want);
    }
    uint8_t buf[64];
    float src[64], back[64];
    for (int i = 0; i < 64; i++)
        src[i] = (float)(rnd_unit() * 900 - 450);
    afd_convert_from_f32(AFD_DTYPE_E4M3, src, buf, 64);
    afd_convert_to_f32(AFD_DTYPE_E4M3, buf, back, 64);
    for (int i = 0; i < 64; i++) {
        assert_int_equal(buf[i], ref_f32_to_e4m3(src[i]));
        assert_true(back[i] == (float)ref_e4m3(buf[i]));
    }
}

/* ---- bf16 ---- */

static void check_bf16(float f)
{
    uint16_t got = afd_f32_to_bf16(f), want = ref_bf16(f);
    if (isnan(f)) {
        if (!isnan(afd_bf16_to_f32(got))) fail_msg("nan %08x -> %04x is not nan", f2u(f), got);
        return;
    }
    if (got != want) fail_msg("%a (%08x) -> %04x, want %04x", f, f2u(f), got, want);
    float r = afd_round_bf16(f);
    assert_memory_equal(&r, &(float){u2f((uint32_t)want << 16)}, 4);
}

static void test_bf16_rne(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        uint32_t base = h << 16;
        const uint32_t offs[] = {0, 1, 0x7fff, 0x8000, 0x8001, 0xffff};
        for (size_t k = 0; k < 6; k++)
            check_bf16(u2f(base | offs[k]));
    }
    /* spot checks that do not rely on the reference */
    assert_int_equal(afd_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(afd_f32_to_bf16(u2f(0x3f808000u)), 0x3f80); /* tie, even is down */
    assert_int_equal(afd_f32_to_bf16(u2f(0x3f818000u)), 0x3f82); /* tie, even is up */
    assert_int_equal(afd_f32_to_bf16(u2f(0x3f808001u)), 0x3f81);
    assert_int_equal(afd_f32_to_bf16(u2f(0x7f7fffffu)), 0x7f80); /* FLT_MAX -> inf */
    assert_int_equal(afd_f32_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(afd_f32_to_bf16(-INFINITY), 0xff80);
    assert_int_equal(afd_f32_to_bf16(-0.0f), 0x8000);
    assert_true(
        isnan(afd_bf16_to_f32(afd_f32_to_bf16(u2f(0x7f800001u))))); /* payload in low bits */
    assert_true(isnan(afd_bf16_to_f32(afd_f32_to_bf16(u2f(0xff80ffffu)))));
    assert_true(isnan(afd_bf16_to_f32(afd_f32_to_bf16(NAN))));
    rng_state = 12;
    for (int i = 0; i < 1000000; i++)
        check_bf16(u2f((uint32_t)rnd64()));
    /* bulk conversion agrees with the scalar one */
    float src[33], back[33];
    uint16_t b[33];
    for (int i = 0; i < 33; i++)
        src[i] = u2f((uint32_t)rnd64() & 0xbfffffffu);
    afd_convert_from_f32(AFD_DTYPE_BF16, src, b, 33);
    afd_convert_to_f32(AFD_DTYPE_BF16, b, back, 33);
    for (int i = 0; i < 33; i++) {
        assert_int_equal(b[i], afd_f32_to_bf16(src[i]));
        assert_true(back[i] == u2f((uint32_t)b[i] << 16));
    }
}

/* ---- f16 ---- */

static void test_f16_all_codes(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        double r = ref_f16((uint16_t)h);
        float f = afd_f16_to_f32((uint16_t)h);
        if (isnan(r)) {
            assert_true(isnan(f));
            assert_true(isnan(afd_f16_to_f32(afd_f32_to_f16(f))));
            continue;
        }
        if ((double)f != r || !signbit(f) != !signbit(r))
            fail_msg("f16 %04x: %a, want %a", h, f, r);
        uint16_t back = afd_f32_to_f16(f);
        if (back != h) fail_msg("f16 %04x -> %a -> %04x", h, f, back);
    }
}

static void test_f16_rounding(void **state)
{
    (void)state;
    for (int sgn = 0; sgn < 2; sgn++) {
        uint16_t s = sgn ? 0x8000 : 0;
        for (uint32_t h = 0; h < 0x7bff; h++) { /* adjacent finite positive codes h, h+1 */
            double lo = ref_f16((uint16_t)h), hi = ref_f16((uint16_t)(h + 1));
            float mid = (float)((lo + hi) / 2); /* 12 significant bits: exact in float */
            assert_true((double)mid == (lo + hi) / 2);
            float above = nextafterf(mid, INFINITY), below = nextafterf(mid, 0);
            if (sgn) {
                mid = -mid;
                above = -above;
                below = -below;
            }
            uint16_t even = (uint16_t)((h & 1) ? h + 1 : h);
            uint16_t g = afd_f32_to_f16(mid), ga = afd_f32_to_f16(above),
                     gb = afd_f32_to_f16(below);
            if (g != (s | even)) fail_msg("midpoint %a -> %04x, want %04x", mid, g, s | even);
            if (ga != (s | (h + 1))) fail_msg("%a -> %04x, want %04x", above, ga, s | (h + 1));
            if (gb != (s | h)) fail_msg("%a -> %04x, want %04x", below, gb, s | h);
        }
    }
    /* 65504 is the largest finite value; 65520 is the midpoint to 2^16 and rounds to inf */
    assert_int_equal(afd_f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(afd_f32_to_f16(nextafterf(65520.0f, 0)), 0x7bff);
    assert_int_equal(afd_f32_to_f16(65520.0f), 0x7c00);
    assert_int_equal(afd_f32_to_f16(-1e10f), 0xfc00);
    assert_int_equal(afd_f32_to_f16(INFINITY), 0x7c00);
    assert_int_equal(afd_f32_to_f16(ldexpf(1, -25)), 0x0000); /* half the smallest subnormal */
    assert_int_equal(afd_f32_to_f16(nextafterf(ldexpf(1, -25), 1)), 0x0001);
    assert_int_equal(afd_f32_to_f16(-1e-30f), 0x8000);
    assert_true(isnan(afd_f16_to_f32(afd_f32_to_f16(NAN))));
    assert_true(isnan(afd_f16_to_f32(afd_f32_to_f16(u2f(0x7f800001u)))));
}

static void test_dtype_names(void **state)
{
    (void)state;
    assert_int_equal(afd_dtype_size(AFD_DTYPE_F32), 4);
    assert_int_equal(afd_dtype_size(AFD_DTYPE_BF16), 2);
    assert_int_equal(afd_dtype_size(AFD_DTYPE_F16), 2);
    assert_int_equal(afd_dtype_size(AFD_DTYPE_E4M3), 1);
    assert_int_equal(afd_dtype_size(AFD_DTYPE_COUNT), 0);
    assert_int_equal(afd_dtype_parse("bf16"), AFD_DTYPE_BF16);
    assert_int_equal(afd_dtype_parse("fp8"), AFD_DTYPE_E4M3);
    assert_int_equal(afd_dtype_parse("e4m3"), AFD_DTYPE_E4M3);
    assert_int_equal(afd_dtype_parse("fp16"), AFD_DTYPE_F16);
    assert_int_equal(afd_dtype_parse("fp32"), AFD_DTYPE_F32);
    assert_int_equal(afd_dtype_parse("int8"), AFD_DTYPE_COUNT);
    assert_int_equal(afd_dtype_parse(NULL), AFD_DTYPE_COUNT);
    for (int d = 0; d < AFD_DTYPE_COUNT; d++) {
        assert_int_equal(afd_dtype_from_safetensors(afd_dtype_safetensors_name(d)), d);
        assert_int_equal(afd_dtype_parse(afd_dtype_name(d)), d);
    }
    assert_int_equal(afd_dtype_from_safetensors("F8_E5M2"), AFD_DTYPE_COUNT);
    assert_int_equal(afd_dtype_from_safetensors("f32"), AFD_DTYPE_COUNT);
}

/* ---- fp8 rows ---- */

#define ROWS 4
#define DIM  300 /* groups of 128, 128 and a short last group of 44 */
#define NG   3

static void make_rows(float *x)
{
    rng_state = 13;
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < DIM; c++) {
            /* magnitudes over several binades so that subnormal codes are used too */
            double v = (rnd_unit() * 2 - 1) * ldexp(1, (int)(rnd64() % 16) - 8);
            x[r * DIM + c] = (float)(v * (r + 1));
        }
    for (int c = 128; c < 256; c++)
        x[1 * DIM + c] = 0.0f; /* an all-zero middle group */
    for (int c = 256; c < DIM; c++)
        x[2 * DIM + c] = 0.0f; /* an all-zero short group */
    for (int c = 0; c < 128; c++)
        x[3 * DIM + c] = 1e-3f; /* a constant group */
}

static void test_fp8_rows_layout(void **state)
{
    (void)state;
    float x[ROWS * DIM], deq[ROWS * DIM], rr[ROWS * DIM], scales[ROWS * NG + 1];
    uint8_t q[ROWS * DIM];
    make_rows(x);
    scales[ROWS * NG] = 12345.0f; /* sentinel: exactly rows * ceil(dim / 128) are written */
    afd_fp8_quantize_rows(x, ROWS, DIM, q, scales);
    assert_true(scales[ROWS * NG] == 12345.0f);
    for (int r = 0; r < ROWS; r++)
        for (int g = 0; g < NG; g++) {
            int c0 = g * 128, c1 = c0 + 128 < DIM ? c0 + 128 : DIM;
            float amax = 0;
            for (int c = c0; c < c1; c++)
                amax = fmaxf(amax, fabsf(x[r * DIM + c]));
            float s = scales[r * NG + g];
            if (amax == 0) {
                assert_true(s == 1.0f); /* documented: 1 for an all-zero group */
                for (int c = c0; c < c1; c++)
                    assert_true(q[r * DIM + c] == 0 || q[r * DIM + c] == 0x80);
            } else {
                assert_true(s == amax / 448.0f);
            }
            for (int c = c0; c < c1; c++) /* q is the nearest-even code of x / scale */
                assert_int_equal(q[r * DIM + c], afd_f32_to_e4m3(x[r * DIM + c] * (1.0f / s)));
        }
    afd_fp8_dequantize_rows(q, scales, ROWS, DIM, deq);
    for (int i = 0; i < ROWS * DIM; i++)
        assert_true(deq[i] == afd_e4m3_table[q[i]] * scales[(i / DIM) * NG + (i % DIM) / 128]);
    for (int c = 128; c < 256; c++)
        assert_true(deq[1 * DIM + c] == 0.0f);
    for (int c = 256; c < DIM; c++)
        assert_true(deq[2 * DIM + c] == 0.0f);
    for (int c = 0; c < 128; c++)
        assert_near(deq[3 * DIM + c], 1e-3f, 1e-9); /* 448 * s */
    /* round_rows is exactly dequant(quant(x)) */
    memcpy(rr, x, sizeof(x));
    afd_fp8_round_rows(rr, ROWS, DIM);
    assert_memory_equal(rr, deq, sizeof(deq));
}

/*
 * Error bound. In a group with amax > 0, s = amax / 448 and y = x / s lies in [-448, 448]
 * (the e4m3 range, so nothing saturates beyond a float rounding of amax itself).
 * E4M3 has 3 stored mantissa bits: in a normal binade [2^e, 2^(e+1)) (|y| >= 2^-6) the
 * spacing is 2^(e-3), so round-to-nearest errs by at most 2^(e-4) <= 2^-4 |y|; in the
 * subnormal range (|y| < 2^-6) the spacing is 2^-9, so the error is at most 2^-10.
 * Scaling back by s:  |deq - x| <= 2^-4 |x| + 2^-10 * amax / 448
 * (and therefore <= 2^-4 * amax * (1 + 2^-6 / 448) for every element of the group).
 * The float products x * (1/s) and q * s add a few ulps: we allow 2^-20 |x| + 2^-30 amax.
 */
static void test_fp8_rows_error_bound(void **state)
{
    (void)state;
    float x[ROWS * DIM], deq[ROWS * DIM], scales[ROWS * NG];
    uint8_t q[ROWS * DIM];
    make_rows(x);
    afd_fp8_quantize_rows(x, ROWS, DIM, q, scales);
    afd_fp8_dequantize_rows(q, scales, ROWS, DIM, deq);
    int worst_used = 0;
    for (int r = 0; r < ROWS; r++)
        for (int g = 0; g < NG; g++) {
            int c0 = g * 128, c1 = c0 + 128 < DIM ? c0 + 128 : DIM;
            double amax = 0;
            for (int c = c0; c < c1; c++)
                amax = fmax(amax, fabs(x[r * DIM + c]));
            for (int c = c0; c < c1; c++) {
                double xv = x[r * DIM + c], e = fabs((double)deq[r * DIM + c] - xv);
                double bound = ldexp(fabs(xv), -4) + ldexp(amax / 448, -10) + ldexp(fabs(xv), -20) +
                               ldexp(amax, -30);
                if (e > bound)
                    fail_msg("row %d col %d: x %g deq %g err %g > %g", r, c, xv, deq[r * DIM + c],
                             e, bound);
                assert_true(e <= ldexp(amax, -4) * (1 + ldexp(1, -6) / 448) + ldexp(amax, -20));
                if (e > 0.5 * ldexp(fabs(xv), -4)) worst_used = 1;
            }
            /* the largest element is reproduced (y = 448 exactly, up to float rounding) */
            for (int c = c0; c < c1; c++)
                if (fabs(x[r * DIM + c]) == amax && amax > 0)
                    assert_true(fabs(fabs(deq[r * DIM + c]) - amax) <= ldexp(amax, -22));
        }
    assert_true(worst_used); /* the bound is not vacuous: some errors come near it */
}

static void test_fp8_rows_small(void **state)
{
    (void)state;
    /* dim below one group, one row, and rows of a single element */
    float x[5] = {1.0f, -2.0f, 0.5f, 3.0f, -0.001f}, y[5], s[1];
    uint8_t q[5];
    afd_fp8_quantize_rows(x, 1, 5, q, s);
    assert_true(s[0] == 3.0f / 448.0f);
    assert_int_equal(q[3], 0x7e);
    afd_fp8_dequantize_rows(q, s, 1, 5, y);
    for (int i = 0; i < 5; i++)
        assert_true(fabsf(y[i] - x[i]) <=
                    ldexpf(fabsf(x[i]), -4) + ldexpf(3.0f / 448, -10) + 1e-7f);
    float one[3] = {-7.0f, 0.0f, 1e-20f}, sc[3];
    uint8_t q1[3];
    afd_fp8_quantize_rows(one, 3, 1, q1, sc);
    assert_true(sc[0] == 7.0f / 448 && sc[1] == 1.0f && sc[2] == 1e-20f / 448);
    afd_fp8_dequantize_rows(q1, sc, 3, 1, one);
    assert_near(one[0], -7.0f, 1e-6);
    assert_true(one[1] == 0.0f);
    assert_near(one[2], 1e-20f, 1e-26);
}

/* packed rows: e4m3 bytes then the row-major scales, exactly the quantiser's output;
 * bf16/f32 plain rows; decode and add invert them */
static void test_rows_packed(void **state)
{
    (void)state;
    float x[ROWS * DIM], scales[ROWS * NG], deq[ROWS * DIM], y[ROWS * DIM], z[ROWS * DIM];
    uint8_t q[ROWS * DIM];
    make_rows(x);
    assert_int_equal(afd_rows_bytes(AFD_DTYPE_E4M3, ROWS, DIM), ROWS * DIM + ROWS * NG * 4);
    assert_int_equal(afd_rows_bytes(AFD_DTYPE_BF16, ROWS, DIM), ROWS * DIM * 2);
    assert_int_equal(afd_rows_bytes(AFD_DTYPE_F32, ROWS, DIM), ROWS * DIM * 4);
    static uint8_t buf[ROWS * DIM * 4 + 16];
    afd_rows_encode(AFD_DTYPE_E4M3, x, ROWS, DIM, buf);
    afd_fp8_quantize_rows(x, ROWS, DIM, q, scales);
    assert_memory_equal(buf, q, sizeof(q));
    assert_memory_equal(buf + sizeof(q), scales, sizeof(scales));
    afd_rows_decode(AFD_DTYPE_E4M3, buf, ROWS, DIM, y);
    afd_fp8_dequantize_rows(q, scales, ROWS, DIM, deq);
    assert_memory_equal(y, deq, sizeof(y));
    afd_rows_encode(AFD_DTYPE_BF16, x, ROWS, DIM, buf);
    for (int i = 0; i < ROWS * DIM; i++) {
        uint16_t b;
        memcpy(&b, buf + 2 * i, 2);
        assert_int_equal(b, afd_f32_to_bf16(x[i]));
    }
    afd_rows_decode(AFD_DTYPE_BF16, buf, ROWS, DIM, y);
    for (int i = 0; i < ROWS * DIM; i++) {
        uint16_t b;
        memcpy(&b, buf + 2 * i, 2);
        assert_true(y[i] == afd_bf16_to_f32(b));
        z[i] = 0.25f * (float)i;
    }
    /* add: out += the unpacked rows, for each dtype a node may answer in */
    memcpy(deq, z, sizeof(z));
    afd_rows_add(AFD_DTYPE_BF16, buf, ROWS, DIM, z);
    for (int i = 0; i < ROWS * DIM; i++)
        assert_true(z[i] == deq[i] + y[i]);
    afd_rows_encode(AFD_DTYPE_F32, x, ROWS, DIM, buf);
    assert_memory_equal(buf, x, sizeof(x));
    afd_rows_add(AFD_DTYPE_F32, buf, ROWS, DIM, z);
    for (int i = 0; i < ROWS * DIM; i++)
        assert_true(z[i] == (deq[i] + y[i]) + x[i]);
    /* e4m3 add goes through the unpacked rows */
    afd_rows_encode(AFD_DTYPE_E4M3, x, ROWS, DIM, buf);
    afd_rows_decode(AFD_DTYPE_E4M3, buf, ROWS, DIM, y);
    memset(z, 0, sizeof(z));
    afd_rows_add(AFD_DTYPE_E4M3, buf, ROWS, DIM, z);
    for (int i = 0; i < ROWS * DIM; i++)
        assert_true(z[i] == y[i]); /* (0 + -0 is +0: compare values) */
}

int main(void)
{
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_table),
        cmocka_unit_test(test_e4m3_exact_values),
        cmocka_unit_test(test_e4m3_rne_midpoints),
        cmocka_unit_test(test_e4m3_saturation_nan),
        cmocka_unit_test(test_e4m3_random_sweep),
        cmocka_unit_test(test_bf16_rne),
        cmocka_unit_test(test_f16_all_codes),
        cmocka_unit_test(test_f16_rounding),
        cmocka_unit_test(test_dtype_names),
        cmocka_unit_test(test_fp8_rows_layout),
        cmocka_unit_test(test_fp8_rows_error_bound),
        cmocka_unit_test(test_fp8_rows_small),
        cmocka_unit_test(test_rows_packed),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, NULL, NULL);
}
