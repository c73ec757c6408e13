/*
 * test_kernels: the cpu backend through its ops table (common/kernels/kn_ops.h), every op
 * against a naive reference written here, mostly in double:
 *   - matmul with and without accumulate; rmsnorm; rope (NeoX rotate-half over the whole
 *     head, inv_freq = theta^(-2i/d)); swiglu; add; embed; gather / scatter_add with
 *     repeated rows; router_topk (float softmax, top-k, ties to the lower id, renorm on/off);
 *   - weight_load of kn_src_t slices: F32, BF16, F16, and E4M3 with 128x128 block scales
 *     (edge blocks, slices starting at non-aligned rows/cols, one expert of a fused 3-D
 *     tensor), also with data and scales at odd byte offsets, against kn_src_get and an
 *     independent decode;
 *   - kv_write + attention on a paged cache for f32 / bf16 / fp8 KV, block sizes 1, 4, 16,
 *     several sequences with different pos0 / ntok sharing one cache through shuffled
 *     block tables, chunked history writes, another layer written with other data,
 *     prefill where causality matters, head_dim 256, and a long prefill that crosses the
 *     backend's query tiles. The cache contents are decoded here from the documented
 *     layout; attention is compared (A) with causal attention in double over those
 *     decoded K/V (tolerance 1e-5 max|v|: float32 arithmetic only) and (B) with attention
 *     over the original K/V (tolerance derived from the KV dtype's rounding at check_attn);
 *   - the round op for f32 / bf16 / f16 / fp8.
 * Tolerances are stated next to each check. Data come from fixed seeds.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_dtype.h"
#include "kn_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define EPS32 (1.0 / 16777216.0) /* 2^-24: unit roundoff of float32 */

static kn_backend_t *be;
static const kn_ops_t *op;

static int setup(void **state)
{
    (void)state;
    if (kn_cpu_create(1, &be) != AFD_OK) return -1;
    op = be->ops;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    op->destroy(be);
    return 0;
}

static uint64_t g_rng;
static uint64_t rnd(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double unif(double lo, double hi)
{
    return lo + (hi - lo) * (double)(rnd() >> 11) * (1.0 / 9007199254740992.0);
}
static void fill(float *x, size_t n, double lo, double hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)unif(lo, hi);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static void check_close(const char *what, size_t i, double got, double want, double tol)
{
    if (!(fabs(got - want) <= tol))
        fail_msg("%s[%zu]: got %.9g, want %.9g (|diff| %.3g > tol %.3g)", what, i, got, want,
                 fabs(got - want), tol);
}

/* independent decodes */
static double dec_e4m3(uint8_t x)
{
    int s = x >> 7, e = (x >> 3) & 15, m = x & 7;
    double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}
static double dec_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static double dec_f16(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return s ? -v : v;
}

static kn_weight_t load_f32(const float *w, int rows, int cols)
{
    kn_src_t src = {.dtype = AFD_DTYPE_F32,
                    .data = w,
                    .full_rows = rows,
                    .full_cols = cols,
                    .row0 = 0,
                    .rows = rows,
                    .col0 = 0,
                    .cols = cols,
                    .scale = NULL};
    kn_weight_t kw;
    assert_int_equal(op->weight_load(be, &src, &kw), AFD_OK);
    assert_int_equal(kw.rows, rows);
    assert_int_equal(kw.cols, cols);
    return kw;
}

/* ---- dense ops ---- */

/*
 * matmul tolerance: any summation order of K float products errs by at most
 * gamma = (K + 2) * 2^-24 relative to sum |x_k w_k| (+ |y0| when accumulating).
 */
static void test_matmul(void **state)
{
    (void)state;
    g_rng = 1;
    const int shapes[][3] = {{1, 23, 37}, {5, 23, 37}, {7, 130, 300}, {3, 1, 1}};
    for (size_t s = 0; s < 4; s++) {
        int n = shapes[s][0], R = shapes[s][1], C = shapes[s][2];
        float *x = xmalloc(sizeof(float) * n * C), *w = xmalloc(sizeof(float) * R * C);
        float *y = xmalloc(sizeof(float) * n * R), *y0 = xmalloc(sizeof(float) * n * R);
        fill(x, (size_t)n * C, -1, 1);
        fill(w, (size_t)R * C, -1, 1);
        fill(y0, (size_t)n * R, -2, 2);
        kn_weight_t kw = load_f32(w, R, C);
        for (int acc = 0; acc < 2; acc++) {
            memcpy(y, y0, sizeof(float) * n * R);
            op->matmul(be, x, n, &kw, y, acc);
            for (int i = 0; i < n; i++)
                for (int r = 0; r < R; r++) {
                    double ref = acc ? y0[i * R + r] : 0, mag = acc ? fabs(y0[i * R + r]) : 0;
                    for (int c = 0; c < C; c++) {
                        ref += (double)x[i * C + c] * w[r * C + c];
                        mag += fabs((double)x[i * C + c] * w[r * C + c]);
                    }
                    check_close(acc ? "matmul+acc" : "matmul", (size_t)(i * R + r), y[i * R + r],
                                ref, (C + 2) * EPS32 * mag);
                }
        }
        op->weight_free(be, &kw);
        free(x);
        free(w);
        free(y);
        free(y0);
    }
}

/*
 * The reference modes for device checks (AFD_CPU_GEMM_ROUND): bf16 rounds a float32
 * weight to bf16 at load and the activations to bf16 per call; device keeps a weight of
 * whole 128x128 e4m3 blocks exact, quantises the activations to e4m3 per 128 columns and
 * rounds the product to bf16 before adding it; an unknown value is refused. Reference in
 * double from the rounded operands; tolerance: float32 sums, plus one bf16 unit of the
 * result where the product is rounded.
 */
static void test_matmul_device_rounding(void **state)
{
    (void)state;
    g_rng = 11;
    enum { N = 3, R = 128, C = 256 };
    float *x = xmalloc(sizeof(float) * N * C), *y = xmalloc(sizeof(float) * N * R);
    float *y0 = xmalloc(sizeof(float) * N * R), *w = xmalloc(sizeof(float) * R * C);
    float *xr = xmalloc(sizeof(float) * N * C);
    uint8_t *q = xmalloc((size_t)R * C);
    float scales[2] = {0.03125f, 0.0078125f}; /* (1, 2) blocks */
    fill(x, (size_t)N * C, -2, 2);
    fill(y0, (size_t)N * R, -1, 1);
    for (int i = 0; i < R * C; i++) {
        float v;
        fill(&v, 1, -300, 300);
        q[i] = afd_f32_to_e4m3(v);
    }
    kn_src_t e4 = {.dtype = AFD_DTYPE_E4M3,
                   .data = q,
                   .full_rows = R,
                   .full_cols = C,
                   .rows = R,
                   .cols = C,
                   .scale = scales};
    kn_src_t f32 = {
        .dtype = AFD_DTYPE_F32, .data = w, .full_rows = R, .full_cols = C, .rows = R, .cols = C};
    fill(w, (size_t)R * C, -1, 1);
    const char *modes[] = {"bf16", "device"};
    for (int m = 0; m < 2; m++) {
        setenv("AFD_CPU_GEMM_ROUND", modes[m], 1);
        kn_backend_t *rb = NULL;
        assert_int_equal(kn_cpu_create(1, &rb), AFD_OK);
        for (int src = 0; src < 2; src++) { /* the e4m3 weight, then the float32 one */
            kn_weight_t kw;
            assert_int_equal(rb->ops->weight_load(rb, src ? &f32 : &e4, &kw), AFD_OK);
            int fp8 = m == 1 && src == 0; /* what the device keeps in fp8 */
            memcpy(xr, x, sizeof(float) * N * C);
            if (fp8)
                afd_fp8_round_rows(xr, N, C);
            else
                for (int i = 0; i < N * C; i++)
                    xr[i] = afd_round_bf16(x[i]);
            for (int acc = 0; acc < 2; acc++) {
                memcpy(y, y0, sizeof(float) * N * R);
                rb->ops->matmul(rb, x, N, &kw, y, acc);
                for (int i = 0; i < N; i++)
                    for (int r = 0; r < R; r++) {
                        double ref = 0, mag = 0;
                        for (int c = 0; c < C; c++) {
                            double wv =
                                src ? (double)afd_round_bf16(w[r * C + c])
                                    : (double)afd_e4m3_to_f32(q[r * C + c]) * scales[c / 128];
                            if (!fp8 && !src) wv = afd_round_bf16((float)wv);
                            ref += (double)xr[i * C + c] * wv;
                            mag += fabs((double)xr[i * C + c] * wv);
                        }
                        double tol = (C + 2) * EPS32 * mag + (fp8 ? fabs(ref) / 256 : 0);
                        if (acc) {
                            ref += y0[i * R + r];
                            tol += 2 * EPS32 * fabs(ref);
                        }
                        check_close(fp8 ? "matmul device fp8" : "matmul device bf16",
                                    (size_t)(i * R + r), y[i * R + r], ref, tol);
                    }
            }
            rb->ops->weight_free(rb, &kw);
        }
        rb->ops->destroy(rb);
    }
    setenv("AFD_CPU_GEMM_ROUND", "fp4", 1);
    kn_backend_t *bad = NULL;
    assert_int_equal(kn_cpu_create(1, &bad), AFD_ERR_INVALID);
    unsetenv("AFD_CPU_GEMM_ROUND");
    free(x);
    free(y);
    free(y0);
    free(w);
    free(xr);
    free(q);
}

/* rmsnorm: the sum of squares is in double; 1/rms rounded to float, then two float
 * products: <= 1.5 ulp; we allow 4 * 2^-24 relative. */
static void test_rmsnorm(void **state)
{
    (void)state;
    g_rng = 2;
    enum { N = 4, D = 257 };
    float x[N * D], w[D], out[N * D];
    fill(x, N * D, -3, 3);
    fill(w, D, 0.5, 1.5);
    for (int j = 0; j < D; j++)
        x[2 * D + j] = 0; /* a zero row: eps keeps it finite */
    for (int j = 0; j < D; j++)
        x[3 * D + j] *= 1e-4f;
    const float eps = 1e-5f;
    op->rmsnorm(be, x, N, D, w, eps, out);
    for (int i = 0; i < N; i++) {
        double ss = 0;
        for (int j = 0; j < D; j++)
            ss += (double)x[i * D + j] * x[i * D + j];
        double r = 1.0 / sqrt(ss / D + eps);
        for (int j = 0; j < D; j++) {
            double ref = x[i * D + j] * r * w[j];
            check_close("rmsnorm", (size_t)(i * D + j), out[i * D + j], ref, 4 * EPS32 * fabs(ref));
        }
    }
}

/* rope: cos/sin come from double angles rounded to float; x1 c - x2 s costs ~3 roundings,
 * so |err| <= 4 * 2^-24 * (|x1| + |x2|). */
static void check_rope(int n, int nheads, int hd, const int32_t *pos, double theta)
{
    size_t total = (size_t)n * nheads * hd;
    float *x = xmalloc(sizeof(float) * total), *x0 = xmalloc(sizeof(float) * total);
    fill(x0, total, -2, 2);
    memcpy(x, x0, sizeof(float) * total);
    op->rope(be, x, n, nheads, hd, pos, theta);
    int half = hd / 2;
    for (int i = 0; i < n; i++)
        for (int h = 0; h < nheads; h++) {
            const float *a = x0 + ((size_t)i * nheads + h) * hd;
            const float *b = x + ((size_t)i * nheads + h) * hd;
            for (int j = 0; j < half; j++) {
                double inv = pow(theta, -2.0 * j / hd), ang = pos[i] * inv;
                double x1 = a[j], x2 = a[j + half];
                double r1 = x1 * cos(ang) - x2 * sin(ang), r2 = x2 * cos(ang) + x1 * sin(ang);
                double tol = 4 * EPS32 * (fabs(x1) + fabs(x2));
                check_close("rope lo", (size_t)j, b[j], r1, tol);
                check_close("rope hi", (size_t)(j + half), b[j + half], r2, tol);
                if (pos[i] == 0) assert_true(b[j] == a[j] && b[j + half] == a[j + half]);
            }
        }
    free(x);
    free(x0);
}

static void test_rope(void **state)
{
    (void)state;
    g_rng = 3;
    const int32_t pos1[] = {0, 1, 2, 100, 65535};
    check_rope(5, 3, 8, pos1, 500000.0);
    check_rope(5, 2, 16, pos1, 10000.0);
    const int32_t pos2[] = {0, 7, 4095, 65535};
    check_rope(4, 2, 256, pos2, 500000.0); /* Step3: head_dim 256, theta 5e5 */
    /* a hand-computed case: head_dim 4, pos 1, theta 100: inv_freq = {1, 0.1};
     * pairs are (0, 2) and (1, 3), not (0, 1) and (2, 3) */
    float v[4] = {1, 0, 0, 0}, w4[4] = {0, 1, 0, 0};
    int32_t p1 = 1;
    op->rope(be, v, 1, 1, 4, &p1, 100.0);
    check_close("rope4", 0, v[0], cos(1.0), 1e-7);
    check_close("rope4", 2, v[2], sin(1.0), 1e-7);
    assert_true(v[1] == 0 && v[3] == 0);
    op->rope(be, w4, 1, 1, 4, &p1, 100.0);
    check_close("rope4", 1, w4[1], cos(0.1), 1e-7);
    check_close("rope4", 3, w4[3], sin(0.1), 1e-7);
}

/* swiglu: expf (<= 1 ulp), one add, one divide, one product: 4 * 2^-24 relative; absolute
 * 1e-38 covers results in the float subnormal range. */
static void test_swiglu_add(void **state)
{
    (void)state;
    g_rng = 4;
    enum { N = 1000 };
    float g[N], u[N], out[N];
    fill(g, N, -20, 20);
    fill(u, N, -3, 3);
    const float special[] = {0.0f, -0.0f, 100.0f, -100.0f, -1000.0f, 88.0f, -88.0f, 1e-20f};
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
        g[i] = special[i];
    op->swiglu(be, g, u, N, out);
    for (int i = 0; i < N; i++) {
        double ref = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
        assert_false(isnan(out[i]));
        check_close("swiglu", (size_t)i, out[i], ref, 4 * EPS32 * fabs(ref) + 1e-38);
    }
    float y[N], y0[N];
    fill(y0, N, -5, 5);
    memcpy(y, y0, sizeof(y));
    op->add(be, y, g, N);
    for (int i = 0; i < N; i++)
        assert_true(y[i] == y0[i] + g[i]); /* exact float adds */
    op->add(be, y, g, 0);                  /* n = 0 touches nothing */
}

static void test_gather_scatter_embed(void **state)
{
    (void)state;
    g_rng = 5;
    enum { SR = 10, D = 7, N = 6 };
    float src[SR * D], dst[N * D];
    fill(src, SR * D, -1, 1);
    const int32_t rows[N] = {3, 3, 0, 9, 3, 0};
    op->gather(be, src, D, rows, N, dst);
    for (int i = 0; i < N; i++)
        assert_memory_equal(dst + i * D, src + rows[i] * D, sizeof(float) * D);

    /* scatter_add: dst[rows[i]] += scale[i] * src[i], rows repeat; reference in double.
     * Each output sums at most N + 1 terms: tol (N + 2) * 2^-24 * sum |terms| */
    enum { DR = 6 };
    float acc[DR * D], acc0[DR * D], s[N], val[N * D];
    fill(acc0, DR * D, -1, 1);
    fill(s, N, -2, 2);
    fill(val, N * D, -1, 1);
    const int32_t to[N] = {2, 0, 2, 5, 2, 0};
    memcpy(acc, acc0, sizeof(acc));
    op->scatter_add(be, acc, D, to, s, N, val);
    for (int r = 0; r < DR; r++)
        for (int j = 0; j < D; j++) {
            double ref = acc0[r * D + j], mag = fabs(acc0[r * D + j]);
            for (int i = 0; i < N; i++)
                if (to[i] == r) {
                    ref += (double)s[i] * val[i * D + j];
                    mag += fabs((double)s[i] * val[i * D + j]);
                }
            check_close("scatter_add", (size_t)(r * D + j), acc[r * D + j], ref,
                        (N + 2) * EPS32 * mag);
        }
    for (int j = 0; j < D; j++) { /* untouched rows stay bit-identical */
        assert_true(acc[1 * D + j] == acc0[1 * D + j]);
        assert_true(acc[3 * D + j] == acc0[3 * D + j]);
    }

    /* embed from a bf16 table: exact rows */
    enum { VOC = 20, ED = 9 };
    uint16_t tb[VOC * ED];
    for (int i = 0; i < VOC * ED; i++)
        tb[i] = (uint16_t)(0x3c00 + (rnd() % 0x0800)) ^ (uint16_t)(rnd() & 0x8000);
    kn_src_t es = {.dtype = AFD_DTYPE_BF16,
                   .data = tb,
                   .full_rows = VOC,
                   .full_cols = ED,
                   .row0 = 0,
                   .rows = VOC,
                   .col0 = 0,
                   .cols = ED,
                   .scale = NULL};
    kn_weight_t table;
    assert_int_equal(op->weight_load(be, &es, &table), AFD_OK);
    const int32_t ids[5] = {5, 5, 0, 19, 7};
    float e[5 * ED];
    op->embed(be, &table, ids, 5, e);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < ED; j++)
            assert_true(e[i * ED + j] == dec_bf16(tb[ids[i] * ED + j]));
    op->weight_free(be, &table);
}

/* router: float softmax over <= 48 logits and a renormalisation over k: each weight has
 * relative error <= (nexp + k + 4) * 2^-24. Orders are compared exactly: the test logits are
 * either equal (ties) or far apart. */
static void check_router(const float *l, int n, int nexp, int k, int renorm)
{
    int32_t *ids = xmalloc(sizeof(int32_t) * n * k);
    float *w = xmalloc(sizeof(float) * n * k);
    op->router_topk(be, l, n, nexp, k, renorm, ids, w);
    for (int i = 0; i < n; i++) {
        const float *li = l + (size_t)i * nexp;
        double mx = -INFINITY, sum = 0, p[4096];
        int used[4096] = {0};
        for (int e = 0; e < nexp; e++)
            mx = fmax(mx, li[e]);
        for (int e = 0; e < nexp; e++)
            sum += (p[e] = exp((double)li[e] - mx));
        double ksum = 0;
        int want[64];
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < nexp; e++)
                if (!used[e] && (best < 0 || li[e] > li[best])) best = e; /* ties: lower id */
            used[best] = 1;
            want[j] = best;
            ksum += p[best] / sum;
        }
        for (int j = 0; j < k; j++) {
            int got = ids[(size_t)i * k + j];
            if (got != want[j])
                fail_msg("router row %d slot %d: expert %d, want %d", i, j, got, want[j]);
            double ref = p[want[j]] / sum / (renorm ? ksum : 1.0);
            check_close("router weight", (size_t)(i * k + j), w[(size_t)i * k + j], ref,
                        (nexp + k + 4) * EPS32 * ref);
        }
        if (renorm) {
            double s = 0;
            for (int j = 0; j < k; j++)
                s += w[(size_t)i * k + j];
            check_close("renormalised sum", (size_t)i, s, 1.0, 2 * (k + 4) * EPS32);
        }
    }
    free(ids);
    free(w);
}

static void test_router_topk(void **state)
{
    (void)state;
    g_rng = 6;
    enum { N = 6, E = 48 };
    float l[N * E];
    for (int i = 0; i < N; i++) { /* distinct logits 0.05 apart, in a random order */
        int perm[E];
        for (int e = 0; e < E; e++)
            perm[e] = e;
        for (int e = E - 1; e > 0; e--) {
            int j = (int)(rnd() % (uint64_t)(e + 1)), t = perm[e];
            perm[e] = perm[j];
            perm[j] = t;
        }
        for (int e = 0; e < E; e++)
            l[i * E + e] = (float)(perm[e] * 0.05 - 1.2 + i);
    }
    for (int renorm = 0; renorm < 2; renorm++) {
        check_router(l, N, E, 3, renorm);
        check_router(l, N, E, 1, renorm);
        check_router(l, N, E, E, renorm); /* k = nexp: a full ordering */
    }
    /* ties: all equal -> ids 0, 1, 2 with weights 1/48 */
    float t[E];
    for (int e = 0; e < E; e++)
        t[e] = 0.5f;
    int32_t ids[4];
    float w[4];
    op->router_topk(be, t, 1, E, 3, 0, ids, w);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[1], 1);
    assert_int_equal(ids[2], 2);
    check_close("uniform weight", 0, w[0], 1.0 / E, 4 * EPS32);
    /* ties at the k border: 3 tops, then two equal seconds at 40 and 5 */
    t[30] = t[10] = t[20] = 3.0f;
    t[40] = t[5] = 2.0f;
    op->router_topk(be, t, 1, E, 4, 1, ids, w);
    assert_int_equal(ids[0], 10);
    assert_int_equal(ids[1], 20);
    assert_int_equal(ids[2], 30);
    assert_int_equal(ids[3], 5);
    check_close("tie weight", 0, w[0], w[1], 0);
    check_router(t, 1, E, 4, 0);
    check_router(t, 1, E, 5, 1);
    /* large logits: softmax subtracts the max, no overflow */
    for (int e = 0; e < E; e++)
        t[e] = 80.0f + 0.5f * (float)(e % 7);
    t[13] = 100.0f;
    op->router_topk(be, t, 1, E, 2, 0, ids, w);
    assert_int_equal(ids[0], 13);
    assert_true(isfinite(w[0]) && isfinite(w[1]) && w[0] > 0.99f);
    check_router(t, 1, E, 3, 1);
}

/* ---- weight slices ---- */

static void check_slice(const kn_src_t *src, double (*dec)(const void *, size_t),
                        const float *scale_base)
{
    kn_weight_t w;
    assert_int_equal(op->weight_load(be, src, &w), AFD_OK);
    assert_int_equal(w.rows, src->rows);
    assert_int_equal(w.cols, src->cols);
    const float *d = w.data;
    int64_t bc = (src->full_cols + 127) / 128;
    for (int64_t r = 0; r < src->rows; r++)
        for (int64_t c = 0; c < src->cols; c++) {
            int64_t R = src->row0 + r, C = src->col0 + c;
            float want = (float)dec(src->data, (size_t)(R * src->full_cols + C));
            if (scale_base) { /* the scales may be unaligned: read them with memcpy */
                float sv;
                memcpy(&sv, (const uint8_t *)scale_base + 4 * (size_t)((R / 128) * bc + C / 128),
                       4);
                want = want * sv;
            }
            float got = d[r * src->cols + c], viaget = kn_src_get(src, r, c);
            if (got != want || viaget != want)
                fail_msg("slice rows %lld+%lld cols %lld+%lld: (%lld, %lld) = %a, get %a, want %a",
                         (long long)src->row0, (long long)src->rows, (long long)src->col0,
                         (long long)src->cols, (long long)r, (long long)c, got, viaget, want);
        }
    float *dq = xmalloc(sizeof(float) * (size_t)(src->rows * src->cols));
    kn_src_dequant(src, dq);
    assert_memory_equal(dq, d, sizeof(float) * (size_t)(src->rows * src->cols));
    free(dq);
    op->weight_free(be, &w);
    assert_null(w.data);
}

static double at_f32(const void *p, size_t i)
{
    float f;
    memcpy(&f, (const uint8_t *)p + 4 * i, 4);
    return f;
}
static double at_bf16(const void *p, size_t i)
{
    return dec_bf16(((const uint16_t *)p)[i]);
}
static double at_f16(const void *p, size_t i)
{
    return dec_f16(((const uint16_t *)p)[i]);
}
static double at_bf16u(const void *p, size_t i) /* any alignment */
{
    uint16_t h;
    memcpy(&h, (const uint8_t *)p + 2 * i, 2);
    return dec_bf16(h);
}
static double at_f16u(const void *p, size_t i)
{
    uint16_t h;
    memcpy(&h, (const uint8_t *)p + 2 * i, 2);
    return dec_f16(h);
}
static double at_e4m3(const void *p, size_t i)
{
    return dec_e4m3(((const uint8_t *)p)[i]);
}

/* not multiples of 128 (edge blocks of 44 rows and 6 columns), and 3 x 4 blocks so that a
 * row / column mix-up in the scale index shows */
enum { FR = 300, FC = 390, NE = 3 };

static const int64_t slices[][4] = {
    /* row0, rows, col0, cols */
    {0, FR, 0, FC},       /* whole matrix */
    {100, 150, 127, 100}, /* crosses row blocks at 128 and 256, col block at 128 */
    {299, 1, 389, 1},     /* the last element: corner edge block */
    {129, 127, 1, 389},   /* starts one past a block edge */
    {256, 44, 384, 6},    /* exactly the bottom-right edge block */
    {0, 300, 255, 2},     /* two columns across the edge at 256 */
    {5, 0, 3, 10},        /* an empty slice */
};

static void test_weight_load_dense(void **state)
{
    (void)state;
    g_rng = 7;
    float *f = xmalloc(sizeof(float) * FR * FC);
    uint16_t *b = xmalloc(2 * FR * FC), *h = xmalloc(2 * FR * FC);
    fill(f, FR * FC, -4, 4);
    for (int i = 0; i < FR * FC; i++) {
        b[i] = (uint16_t)rnd() & 0xbfff; /* finite: exponent below 0x7f80 */
        h[i] = (uint16_t)rnd() & 0xbbff; /* finite f16 */
    }
    /* the same matrices at an odd byte offset (safetensors does not align tensors) */
    uint8_t *fu = xmalloc(sizeof(float) * FR * FC + 1), *bu = xmalloc(2 * FR * FC + 1),
            *hu = xmalloc(2 * FR * FC + 1);
    memcpy(fu + 1, f, sizeof(float) * FR * FC);
    memcpy(bu + 1, b, 2 * FR * FC);
    memcpy(hu + 1, h, 2 * FR * FC);
    for (size_t s = 0; s < sizeof(slices) / sizeof(slices[0]); s++) {
        kn_src_t src = {.full_rows = FR,
                        .full_cols = FC,
                        .row0 = slices[s][0],
                        .rows = slices[s][1],
                        .col0 = slices[s][2],
                        .cols = slices[s][3]};
        src.dtype = AFD_DTYPE_F32;
        src.data = fu + 1;
        check_slice(&src, at_f32, NULL);
        src.dtype = AFD_DTYPE_BF16;
        src.data = bu + 1;
        check_slice(&src, at_bf16u, NULL);
        src.dtype = AFD_DTYPE_F16;
        src.data = hu + 1;
        check_slice(&src, at_f16u, NULL);
    }
    free(fu);
    free(bu);
    free(hu);
    for (size_t s = 0; s < sizeof(slices) / sizeof(slices[0]); s++) {
        kn_src_t src = {.full_rows = FR,
                        .full_cols = FC,
                        .row0 = slices[s][0],
                        .rows = slices[s][1],
                        .col0 = slices[s][2],
                        .cols = slices[s][3]};
        src.dtype = AFD_DTYPE_F32;
        src.data = f;
        check_slice(&src, at_f32, NULL);
        src.dtype = AFD_DTYPE_BF16;
        src.data = b;
        check_slice(&src, at_bf16, NULL);
        src.dtype = AFD_DTYPE_F16;
        src.data = h;
        check_slice(&src, at_f16, NULL);
    }
    free(f);
    free(b);
    free(h);
}

static void test_weight_load_fp8_blocks(void **state)
{
    (void)state;
    g_rng = 8;
    /* a fused [NE, FR, FC] expert tensor and its [NE, 3, 3] scales */
    const int BR = (FR + 127) / 128, BC = (FC + 127) / 128;
    assert_int_equal(BR, 3);
    assert_int_equal(BC, 4);
    uint8_t *q = xmalloc((size_t)NE * FR * FC);
    float *sc = xmalloc(sizeof(float) * NE * BR * BC);
    for (size_t i = 0; i < (size_t)NE * FR * FC; i++) {
        q[i] = (uint8_t)rnd();
        if ((q[i] & 0x7f) == 0x7f) q[i] ^= 1; /* no NaN codes */
    }
    /* distinct scales per block so a wrong block index cannot go unnoticed */
    for (int i = 0; i < NE * BR * BC; i++)
        sc[i] = (float)ldexp(1.0 + i / 32.0, -8 + i % 5);
    for (int e = 0; e < NE; e++)
        for (size_t s = 0; s < sizeof(slices) / sizeof(slices[0]); s++) {
            kn_src_t src = {.dtype = AFD_DTYPE_E4M3,
                            .data = q + (size_t)e * FR * FC,
                            .full_rows = FR,
                            .full_cols = FC,
                            .row0 = slices[s][0],
                            .rows = slices[s][1],
                            .col0 = slices[s][2],
                            .cols = slices[s][3],
                            .scale = sc + e * BR * BC};
            check_slice(&src, at_e4m3, sc + e * BR * BC);
        }
    /* spot check by hand: element (130, 129) of expert 1 uses block (1, 1) of expert 1 */
    kn_src_t src = {.dtype = AFD_DTYPE_E4M3,
                    .data = q + (size_t)FR * FC,
                    .full_rows = FR,
                    .full_cols = FC,
                    .row0 = 130,
                    .rows = 1,
                    .col0 = 129,
                    .cols = 1,
                    .scale = sc + BR * BC};
    float want = (float)dec_e4m3(q[(size_t)FR * FC + 130 * FC + 129]) * sc[BR * BC + 1 * BC + 1];
    assert_true(kn_src_get(&src, 0, 0) == want);

    /* safetensors does not align tensors: data and scales at odd byte offsets (an unaligned
     * load would trip UBSan in the SANITIZE=1 build) */
    uint8_t *qu = xmalloc((size_t)FR * FC + 1), *su = xmalloc(sizeof(float) * BR * BC + 3);
    memcpy(qu + 1, q, (size_t)FR * FC);
    memcpy(su + 3, sc, sizeof(float) * BR * BC);
    for (size_t s = 0; s < sizeof(slices) / sizeof(slices[0]); s++) {
        kn_src_t us = {.dtype = AFD_DTYPE_E4M3,
                       .data = qu + 1,
                       .full_rows = FR,
                       .full_cols = FC,
                       .row0 = slices[s][0],
                       .rows = slices[s][1],
                       .col0 = slices[s][2],
                       .cols = slices[s][3],
                       .scale = (const float *)(const void *)(su + 3)};
        check_slice(&us, at_e4m3, us.scale);
    }
    free(qu);
    free(su);
    free(q);
    free(sc);
}

/* ---- paged KV cache and attention ---- */

typedef struct seqspec {
    int pos0, ntok;
} seqspec_t;

typedef struct attn_case {
    afd_dtype_t dt;
    int block_size, head_dim, nheads, num_layers, layer;
    int nseq;
    const seqspec_t *seqs;
    int check_every; /* check every query (1) or a subset (tile test) */
} attn_case_t;

/* decodes position p of a sequence from the cache, following the documented layout */
static void cache_read(const kn_kv_t *kv, int layer, const int32_t *table, int p, int which,
                       float *out)
{
    int blk = table[p / kv->block_size], slot = p % kv->block_size;
    size_t tok = ((size_t)layer * kv->num_blocks + (size_t)blk) * kv->block_size + (size_t)slot;
    const uint8_t *base = which ? kv->v : kv->k;
    size_t hd = (size_t)kv->head_dim, es = afd_dtype_size(kv->dtype);
    const uint8_t *src = base + tok * hd * es;
    for (size_t j = 0; j < hd; j++) {
        switch (kv->dtype) {
        case AFD_DTYPE_F32:
            out[j] = (float)at_f32(src, j);
            break;
        case AFD_DTYPE_BF16:
            out[j] = (float)at_bf16(src, j);
            break;
        case AFD_DTYPE_F16:
            out[j] = (float)at_f16(src, j);
            break;
        default:
            out[j] = (float)dec_e4m3(src[j]) * (which ? kv->v_scale : kv->k_scale)[tok];
            break;
        }
    }
    if (kv->dtype == AFD_DTYPE_E4M3) { /* one scale per token vector, using the full range */
        float s = (which ? kv->v_scale : kv->k_scale)[tok];
        assert_true(s > 0);
        double cmax = 0;
        for (size_t j = 0; j < hd; j++)
            cmax = fmax(cmax, fabs(dec_e4m3(src[j])));
        assert_true(cmax == 448.0 || cmax == 0); /* the largest element maps to +-448 */
    }
}

/* |stored - x| allowed by the KV dtype's rounding (see check_attn) */
static double kv_elem_bound(afd_dtype_t dt, double x, double amax)
{
    switch (dt) {
    case AFD_DTYPE_F32:
        return 0;
    case AFD_DTYPE_BF16:
        return ldexp(fabs(x), -8); /* 8 significant bits: half ulp <= 2^-8 |x| */
    case AFD_DTYPE_F16:
        return ldexp(fabs(x), -11) + ldexp(1, -25); /* 11 bits; subnormals */
    default: /* e4m3 of x / s, s = amax / 448: 2^-4 relative, 2^-10 * s in the subnormals;
              * 2^-20 relative for the float division and product */
        return ldexp(fabs(x), -4) + ldexp(amax / 448, -10) + ldexp(fabs(x) + amax, -20);
    }
}

/* causal attention in double for query q (hd) at absolute position `pos` over K/V rows */
static void ref_attn(const float *q, const float *K, const float *V, int pos, int hd, double scale,
                     double *out)
{
    int n = pos + 1;
    double *s = xmalloc(sizeof(double) * n), mx = -INFINITY, sum = 0;
    for (int j = 0; j < n; j++) {
        double d = 0;
        for (int i = 0; i < hd; i++)
            d += (double)q[i] * K[(size_t)j * hd + i];
        s[j] = d * scale;
        mx = fmax(mx, s[j]);
    }
    for (int j = 0; j < n; j++)
        sum += (s[j] = exp(s[j] - mx));
    for (int i = 0; i < hd; i++)
        out[i] = 0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < hd; i++)
            out[i] += s[j] / sum * V[(size_t)j * hd + i];
    free(s);
}

/*
 * Tolerances.
 * (A) against the decoded cache: only float32 arithmetic differs. Scores err by about
 *     hd * 2^-24 * scale * sum|q||k| (< 1e-6 here); a score error D changes each softmax
 *     weight by a factor within e^(+-2D), so the output moves by <= (e^(2D) - 1) max|v|;
 *     the PV sum over <= 640 keys adds <= 640 * 2^-24 * max|v| ~ 4e-5 max|v| in the worst
 *     case, far less in practice. We use 1e-5 * max|v| + (e^(2D)-1) max|v| with D computed
 *     per query, so for short contexts the tolerance is ~1e-5 as required for f32.
 * (B) against the original K/V: each stored element errs by at most b(x) (kv_elem_bound:
 *     bf16 2^-8 |x|; e4m3 2^-4 |x| + 2^-10 amax/448). Then the scores err by at most
 *     D' = scale * sum_i |q_i| b(k_ji), and
 *     |o' - o| <= sum_j p'_j |v'_j - v_j| + sum_j |p'_j - p_j| |v_j|
 *              <= max_j b(v_ji) + (e^(2D') - 1) max_j |v_ji|,
 *     plus the (A) tolerance.
 */
static double g_worst_ratio[AFD_DTYPE_COUNT];

static void run_attn_case(const attn_case_t *ac)
{
    int hd = ac->head_dim, H = ac->nheads, bs = ac->block_size;
    kn_kv_t kv = {.dtype = ac->dt, .num_layers = ac->num_layers, .block_size = bs, .head_dim = hd};
    int total_blocks = 0;
    for (int s = 0; s < ac->nseq; s++)
        total_blocks += (ac->seqs[s].pos0 + ac->seqs[s].ntok + bs - 1) / bs;
    kv.num_blocks = total_blocks + 3; /* a few never used */
    size_t slots = (size_t)kv.num_layers * kv.num_blocks * bs, es = afd_dtype_size(ac->dt);
    kv.k = op->alloc(be, slots * hd * es);
    kv.v = op->alloc(be, slots * hd * es);
    assert_non_null(kv.k);
    assert_non_null(kv.v);
    if (ac->dt == AFD_DTYPE_E4M3) {
        kv.k_scale = op->alloc(be, slots * sizeof(float));
        kv.v_scale = op->alloc(be, slots * sizeof(float));
    }
    /* shuffled physical blocks, dealt out to the sequences in order */
    int32_t *perm = xmalloc(sizeof(int32_t) * kv.num_blocks);
    for (int i = 0; i < kv.num_blocks; i++)
        perm[i] = i;
    for (int i = kv.num_blocks - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int32_t **tables = xmalloc(sizeof(int32_t *) * ac->nseq);
    float **K = xmalloc(sizeof(float *) * ac->nseq), **V = xmalloc(sizeof(float *) * ac->nseq);
    float **Q = xmalloc(sizeof(float *) * ac->nseq);
    int next = 0;
    for (int s = 0; s < ac->nseq; s++) {
        int ctx = ac->seqs[s].pos0 + ac->seqs[s].ntok, nb = (ctx + bs - 1) / bs;
        tables[s] = xmalloc(sizeof(int32_t) * nb);
        for (int b = 0; b < nb; b++)
            tables[s][b] = perm[next++];
        K[s] = xmalloc(sizeof(float) * ctx * hd);
        V[s] = xmalloc(sizeof(float) * ctx * hd);
        Q[s] = xmalloc(sizeof(float) * ac->seqs[s].ntok * H * hd);
        for (int p = 0; p < ctx; p++) { /* per-token magnitudes 2^-3 .. 2^2 */
            double m = ldexp(1, (int)(rnd() % 6) - 3);
            fill(K[s] + (size_t)p * hd, hd, -m, m);
            fill(V[s] + (size_t)p * hd, hd, -m, m);
        }
        fill(Q[s], (size_t)ac->seqs[s].ntok * H * hd, -1, 1);
    }
    /* other layers first get unrelated data at the same positions */
    for (int layer = 0; layer < ac->num_layers; layer++) {
        if (layer == ac->layer) continue;
        for (int s = 0; s < ac->nseq; s++) {
            int ctx = ac->seqs[s].pos0 + ac->seqs[s].ntok;
            float *junk = xmalloc(sizeof(float) * ctx * hd);
            fill(junk, (size_t)ctx * hd, -9, 9);
            kn_seq_t sq = {.block_table = tables[s], .pos0 = 0, .ntok = ctx};
            op->kv_write(be, &kv, layer, &sq, junk, junk);
            free(junk);
        }
    }
    /* the history [0, pos0) of every sequence in chunks of 1..7 tokens, round-robin */
    int *done = calloc((size_t)ac->nseq, sizeof(int)), left = 1;
    while (left) {
        left = 0;
        for (int s = 0; s < ac->nseq; s++) {
            int p0 = done[s], rem = ac->seqs[s].pos0 - p0;
            if (rem <= 0) continue;
            int len = 1 + (int)(rnd() % 7);
            if (len > rem) len = rem;
            kn_seq_t sq = {.block_table = tables[s], .pos0 = p0, .ntok = len};
            op->kv_write(be, &kv, ac->layer, &sq, K[s] + (size_t)p0 * hd, V[s] + (size_t)p0 * hd);
            done[s] += len;
            left = 1;
        }
    }
    free(done);
    /* the new tokens, then attention */
    for (int s = 0; s < ac->nseq; s++) {
        kn_seq_t sq = {
            .block_table = tables[s], .pos0 = ac->seqs[s].pos0, .ntok = ac->seqs[s].ntok};
        op->kv_write(be, &kv, ac->layer, &sq, K[s] + (size_t)sq.pos0 * hd,
                     V[s] + (size_t)sq.pos0 * hd);
    }
    const double scale = 1.0 / sqrt((double)hd);
    double *ra = xmalloc(sizeof(double) * hd), *rb = xmalloc(sizeof(double) * hd);
    for (int s = 0; s < ac->nseq; s++) {
        int pos0 = ac->seqs[s].pos0, nt = ac->seqs[s].ntok, ctx = pos0 + nt;
        /* the cache holds what the dtype promises, where the layout says */
        float *Kc = xmalloc(sizeof(float) * ctx * hd), *Vc = xmalloc(sizeof(float) * ctx * hd);
        for (int p = 0; p < ctx; p++) {
            cache_read(&kv, ac->layer, tables[s], p, 0, Kc + (size_t)p * hd);
            cache_read(&kv, ac->layer, tables[s], p, 1, Vc + (size_t)p * hd);
            double ak = 0, av = 0;
            for (int i = 0; i < hd; i++) {
                ak = fmax(ak, fabs(K[s][(size_t)p * hd + i]));
                av = fmax(av, fabs(V[s][(size_t)p * hd + i]));
            }
            for (int i = 0; i < hd; i++) {
                size_t x = (size_t)p * hd + i;
                if (fabs(Kc[x] - K[s][x]) > kv_elem_bound(ac->dt, K[s][x], ak) ||
                    fabs(Vc[x] - V[s][x]) > kv_elem_bound(ac->dt, V[s][x], av))
                    fail_msg("seq %d pos %d elem %d: cache holds k %g v %g for %g %g", s, p, i,
                             Kc[x], Vc[x], K[s][x], V[s][x]);
            }
        }
        float *out = xmalloc(sizeof(float) * nt * H * hd);
        kn_seq_t sq = {.block_table = tables[s], .pos0 = pos0, .ntok = nt};
        op->attention(be, &kv, ac->layer, &sq, Q[s], H, (float)scale, out);
        /* per-token amax of the original K / V, and the element bounds b(x) */
        double *bK = xmalloc(sizeof(double) * ctx * hd), *bV = xmalloc(sizeof(double) * ctx * hd);
        for (int p = 0; p < ctx; p++) {
            double ak = 0, av = 0;
            for (int i = 0; i < hd; i++) {
                ak = fmax(ak, fabs(K[s][(size_t)p * hd + i]));
                av = fmax(av, fabs(V[s][(size_t)p * hd + i]));
            }
            for (int i = 0; i < hd; i++) {
                bK[(size_t)p * hd + i] = kv_elem_bound(ac->dt, K[s][(size_t)p * hd + i], ak);
                bV[(size_t)p * hd + i] = kv_elem_bound(ac->dt, V[s][(size_t)p * hd + i], av);
            }
        }
        for (int t = 0; t < nt; t++) {
            int ce = ac->check_every;
            if (ce > 1 && t > 2 && t != nt - 1 && t % ce != 0 && t % ce != 1 && t % ce != ce - 1)
                continue;
            int pos = pos0 + t;
            double vmax_c = 0;
            for (size_t x = 0; x < (size_t)(pos + 1) * hd; x++)
                vmax_c = fmax(vmax_c, fabs(Vc[x]));
            for (int h = 0; h < H; h++) {
                const float *q = Q[s] + ((size_t)t * H + h) * hd;
                const float *o = out + ((size_t)t * H + h) * hd;
                /* score error bounds: float arithmetic (A) and the dtype's rounding (B) */
                double dA = 0, dB = 0;
                for (int j = 0; j <= pos; j++) {
                    double sa = 0, sb = 0;
                    for (int i = 0; i < hd; i++) {
                        sa += fabs(q[i] * (double)Kc[(size_t)j * hd + i]);
                        sb += fabs((double)q[i]) * bK[(size_t)j * hd + i];
                    }
                    dA = fmax(dA, (hd + 4) * EPS32 * scale * sa + 4 * EPS32);
                    dB = fmax(dB, scale * sb);
                }
                double tolA = 1e-5 * vmax_c + expm1(2 * dA) * vmax_c;
                ref_attn(q, Kc, Vc, pos, hd, scale, ra);
                ref_attn(q, K[s], V[s], pos, hd, scale, rb);
                for (int i = 0; i < hd; i++) {
                    double bv = 0, amaxv = 0;
                    for (int j = 0; j <= pos; j++) {
                        amaxv = fmax(amaxv, fabs(V[s][(size_t)j * hd + i]));
                        bv = fmax(bv, bV[(size_t)j * hd + i]);
                    }
                    double tolB = tolA + bv + expm1(2 * dB) * amaxv;
                    if (!(fabs(o[i] - ra[i]) <= tolA))
                        fail_msg("%s bs %d seq %d (pos0 %d ntok %d) t %d head %d dim %d: %.9g, "
                                 "decoded-cache reference %.9g, tol %.3g",
                                 afd_dtype_name(ac->dt), bs, s, pos0, nt, t, h, i, o[i], ra[i],
                                 tolA);
                    if (!(fabs(o[i] - rb[i]) <= tolB))
                        fail_msg("%s bs %d seq %d t %d head %d dim %d: %.9g, exact-K/V reference "
                                 "%.9g, tol %.3g",
                                 afd_dtype_name(ac->dt), bs, s, t, h, i, o[i], rb[i], tolB);
                    if (ac->dt != AFD_DTYPE_F32)
                        g_worst_ratio[ac->dt] =
                            fmax(g_worst_ratio[ac->dt], fabs(o[i] - rb[i]) / tolB);
                }
                /* causality made explicit: the first token of a fresh prefill sees only itself */
                if (pos == 0)
                    for (int i = 0; i < hd; i++)
                        check_close("first-token output", (size_t)i, o[i], Vc[i], 1e-6 * vmax_c);
            }
        }
        free(bK);
        free(bV);
        free(out);
        free(Kc);
        free(Vc);
    }
    free(ra);
    free(rb);
    for (int s = 0; s < ac->nseq; s++) {
        free(tables[s]);
        free(K[s]);
        free(V[s]);
        free(Q[s]);
    }
    free(tables);
    free(K);
    free(V);
    free(Q);
    free(perm);
    op->free(be, kv.k);
    op->free(be, kv.v);
    if (kv.k_scale) {
        op->free(be, kv.k_scale);
        op->free(be, kv.v_scale);
    }
}

static const seqspec_t g_seqs[] = {
    {0, 1},   /* first decode step of a one-token prompt */
    {0, 9},   /* prefill: causality across 9 queries */
    {5, 1},   /* decode */
    {13, 4},  /* chunked prefill continuing a history */
    {31, 3},  /* crosses block edges for bs 4 and 16 */
    {16, 16}, /* starts exactly on a block edge */
    {40, 2},
};

static void test_attention_dtypes_blocks(void **state)
{
    (void)state;
    const afd_dtype_t dts[] = {AFD_DTYPE_F32, AFD_DTYPE_BF16, AFD_DTYPE_E4M3};
    const int bss[] = {1, 4, 16};
    g_rng = 9;
    for (int d = 0; d < 3; d++)
        for (int b = 0; b < 3; b++) {
            attn_case_t ac = {.dt = dts[d],
                              .block_size = bss[b],
                              .head_dim = 64,
                              .nheads = 4,
                              .num_layers = 2,
                              .layer = 1,
                              .nseq = (int)(sizeof(g_seqs) / sizeof(g_seqs[0])),
                              .seqs = g_seqs,
                              .check_every = 1};
            run_attn_case(&ac);
        }
    /* layer 0 of two, and an f16 cache */
    attn_case_t ac = {.dt = AFD_DTYPE_F16,
                      .block_size = 4,
                      .head_dim = 32,
                      .nheads = 2,
                      .num_layers = 2,
                      .layer = 0,
                      .nseq = 3,
                      .seqs = g_seqs + 1,
                      .check_every = 1};
    run_attn_case(&ac);
    for (int d = 1; d < AFD_DTYPE_COUNT; d++)
        print_message("%s: worst |out - exact-K/V ref| / derived bound = %.3f\n", afd_dtype_name(d),
                      g_worst_ratio[d]);
}

static void test_attention_head256(void **state)
{
    (void)state;
    g_rng = 10;
    const seqspec_t seqs[] = {{20, 3}, {0, 5}};
    const afd_dtype_t dts[] = {AFD_DTYPE_F32, AFD_DTYPE_BF16, AFD_DTYPE_E4M3};
    for (int d = 0; d < 3; d++) {
        attn_case_t ac = {.dt = dts[d],
                          .block_size = 16,
                          .head_dim = 256,
                          .nheads = 4,
                          .num_layers = 1,
                          .layer = 0,
                          .nseq = 2,
                          .seqs = seqs,
                          .check_every = 1};
        run_attn_case(&ac);
    }
}

/* 64 heads x 600 tokens: the cpu backend splits the queries into tiles of
 * 4M / (64 * 600) = 109 tokens; the queries on both sides of every tile edge
 * (t % 109 in {108, 0, 1}), the first three and the last are checked */
static void test_attention_tiled_prefill(void **state)
{
    (void)state;
    g_rng = 11;
    const seqspec_t seqs[] = {{0, 600}};
    attn_case_t ac = {.dt = AFD_DTYPE_F32,
                      .block_size = 16,
                      .head_dim = 8,
                      .nheads = 64,
                      .num_layers = 1,
                      .layer = 0,
                      .nseq = 1,
                      .seqs = seqs,
                      .check_every = 109};
    run_attn_case(&ac);
}

/* ---- round ---- */

static void test_round(void **state)
{
    (void)state;
    g_rng = 12;
    enum { R = 3, D = 300 };
    float x0[R * D], x[R * D], ref[R * D];
    fill(x0, R * D, -50, 50);
    for (int j = 128; j < 256; j++)
        x0[D + j] = 0; /* an all-zero group */
    for (int j = 0; j < 10; j++)
        x0[2 * D + j] *= 1e-6f;
    /* f32: untouched */
    memcpy(x, x0, sizeof(x));
    op->round(be, x, R, D, AFD_DTYPE_F32);
    assert_memory_equal(x, x0, sizeof(x));
    /* bf16: nearest even on the upper 16 bits, checked against the two neighbours */
    memcpy(x, x0, sizeof(x));
    op->round(be, x, R, D, AFD_DTYPE_BF16);
    for (int i = 0; i < R * D; i++) {
        uint32_t u, g;
        memcpy(&u, &x0[i], 4);
        memcpy(&g, &x[i], 4);
        assert_int_equal(g & 0xffff, 0);
        uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
        float fl, fh;
        memcpy(&fl, &lo, 4);
        memcpy(&fh, &hi, 4);
        double dl = fabs((double)x0[i] - fl), dh = fabs((double)fh - x0[i]);
        uint32_t want = dl < dh ? lo : dh < dl ? hi : ((lo >> 16) & 1 ? hi : lo);
        assert_int_equal(g, want);
    }
    /* f16 */
    memcpy(x, x0, sizeof(x));
    op->round(be, x, R, D, AFD_DTYPE_F16);
    for (int i = 0; i < R * D; i++) {
        assert_true(x[i] == (float)dec_f16(afd_f32_to_f16(x0[i])));
        assert_true(fabs(x[i] - x0[i]) <= ldexp(fabs(x0[i]), -11) + ldexp(1, -25));
    }
    /* fp8 with per-128 groups: equal to afd_fp8_round_rows, within the e4m3 bound
     * 2^-4 |x| + 2^-10 amax / 448 (derived in test_dtype), zero groups stay zero */
    memcpy(x, x0, sizeof(x));
    op->round(be, x, R, D, AFD_DTYPE_E4M3);
    memcpy(ref, x0, sizeof(ref));
    afd_fp8_round_rows(ref, R, D);
    assert_memory_equal(x, ref, sizeof(x));
    for (int r = 0; r < R; r++)
        for (int g0 = 0; g0 < D; g0 += 128) {
            int g1 = g0 + 128 < D ? g0 + 128 : D;
            double amax = 0;
            for (int j = g0; j < g1; j++)
                amax = fmax(amax, fabs(x0[r * D + j]));
            for (int j = g0; j < g1; j++) {
                double xv = x0[r * D + j];
                check_close("fp8 round", (size_t)(r * D + j), x[r * D + j], xv,
                            ldexp(fabs(xv), -4) + ldexp(amax / 448, -10) +
                                ldexp(fabs(xv) + amax, -20));
                if (amax == 0) assert_true(x[r * D + j] == 0);
            }
        }
}

static void test_backend_misc(void **state)
{
    (void)state;
    assert_string_equal(op->name, "cpu");
    kn_backend_t *b2 = NULL;
    assert_int_equal(kn_backend_create("cpu", 0, &b2), AFD_OK);
    b2->ops->destroy(b2);
    assert_int_equal(kn_backend_create("tpu", 0, &b2), AFD_ERR_INVALID);
    /* alloc returns zeroed memory; upload / download / zero copy bytes */
    uint8_t *p = op->alloc(be, 100), host[100];
    assert_non_null(p);
    for (int i = 0; i < 100; i++)
        assert_int_equal(p[i], 0);
    for (int i = 0; i < 100; i++)
        host[i] = (uint8_t)i;
    op->upload(be, p, host, 100);
    uint8_t back[100];
    op->download(be, back, p, 100);
    assert_memory_equal(back, host, 100);
    op->zero(be, p, 50);
    op->sync(be);
    for (int i = 0; i < 50; i++)
        assert_int_equal(p[i], 0);
    assert_int_equal(p[50], 50);
    op->free(be, p);
}

/* tensor-parallel groups on the cpu: bounds, and the sum against an explicit one */
static void test_group(void **state)
{
    (void)state;
    kn_group_t *g = NULL;
    assert_int_equal(kn_group_create("cpu", 1, 0, NULL, &g), AFD_ERR_RANGE);
    assert_null(g);
    assert_int_equal(kn_group_create("cpu", 1, KN_GROUP_MAX + 1, NULL, &g), AFD_ERR_RANGE);
    assert_int_equal(kn_group_create("tpu", 1, 2, NULL, &g), AFD_ERR_INVALID);
    assert_null(g);
    enum { N = 3, C = 1000 };
    assert_int_equal(kn_group_create("cpu", 1, N, NULL, &g), AFD_OK);
    assert_int_equal(g->n, N);
    float *bufs[N], want[C];
    for (int i = 0; i < N; i++) {
        kn_backend_t *r = g->rank[i];
        assert_string_equal(r->ops->name, "cpu");
        bufs[i] = r->ops->alloc(r, sizeof(float) * C);
        assert_non_null(bufs[i]);
    }
    for (int k = 0; k < C; k++) {
        want[k] = 0;
        for (int i = 0; i < N; i++) {
            bufs[i][k] = (float)((k * 7 + i * 13) % 29) - 14.0f;
            want[k] += bufs[i][k];
        }
    }
    kn_group_reduce(g, bufs, C);
    for (int k = 0; k < C; k++)
        assert_true(bufs[0][k] == want[k]); /* small integers: exact */
    for (int i = 0; i < N; i++)
        g->rank[i]->ops->free(g->rank[i], bufs[i]);
    kn_group_destroy(g);
    /* staging memory */
    void *h = kn_host_alloc(be, 64);
    assert_non_null(h);
    kn_host_free(be, h);
    /* a sibling queue: on the cpu a backend of its own whose ops finish in order, so
     * events are always done and the asynchronous copy is a copy */
    kn_backend_t *sib = kn_fork(be);
    assert_non_null(sib);
    assert_true(sib != be);
    assert_string_equal(sib->ops->name, "cpu");
    float src[5] = {1, 2, 3, 4, 5}, dst[5] = {0};
    kn_download_async(sib, dst, src, sizeof(src));
    void *ev = kn_event_new(sib);
    kn_event_record(sib, ev);
    assert_true(kn_event_done(sib, ev));
    assert_memory_equal(dst, src, sizeof(src));
    kn_event_free(sib, ev);
    sib->ops->destroy(sib);
}

/* cpu-dev: a device backend to its callers, the cpu's numbers */
static void test_cpu_dev(void **state)
{
    (void)state;
    kn_backend_t *d = NULL;
    assert_int_equal(kn_backend_create("cpu-dev", 1, &d), AFD_OK);
    assert_string_equal(d->ops->name, "cpu-dev");
    assert_int_equal(d->ops->host_memory, 0);
    assert_non_null(d->ops->rows_encode);
    assert_non_null(d->ops->logits_top);
    float x[3 * 130];
    for (int i = 0; i < 3 * 130; i++)
        x[i] = (float)((i * 37) % 101) / 7.0f - 7.0f;
    uint8_t a[3 * 130 * 4], b[3 * 130 * 4];
    size_t rb = afd_rows_bytes(AFD_DTYPE_E4M3, 3, 130);
    kn_rows_encode(d, AFD_DTYPE_E4M3, x, 3, 130, a);
    afd_rows_encode(AFD_DTYPE_E4M3, x, 3, 130, b);
    assert_memory_equal(a, b, rb);
    /* the best candidates of a vocabulary smaller than k: every id, then the last repeated */
    float l[2 * 5] = {1, 3, 3, -1, 0, 2, 2, 2, 2, 2};
    int32_t ids[2 * KN_TOP_K_MAX];
    float tl[2 * KN_TOP_K_MAX];
    double lse[2];
    assert_int_equal(d->ops->logits_top(d, l, 2, 5, KN_TOP_K_MAX, ids, tl, lse), AFD_OK);
    static const int32_t want0[5] = {1, 2, 0, 4, 3};
    for (int j = 0; j < 5; j++) {
        assert_int_equal(ids[j], want0[j]);
        assert_int_equal(ids[KN_TOP_K_MAX + j], j); /* ties: lower id first */
    }
    assert_int_equal(ids[KN_TOP_K_MAX - 1], 3);
    assert_true(fabs(lse[1] - (2.0 + log(5.0))) < 1e-12);
    kn_backend_t *sib = kn_fork(d);
    assert_non_null(sib);
    assert_string_equal(sib->ops->name, "cpu-dev");
    sib->ops->destroy(sib);
    kn_group_t *g = NULL;
    assert_int_equal(kn_group_create("cpu-dev", 1, 2, NULL, &g), AFD_OK);
    float *b0 = g->rank[0]->ops->alloc(g->rank[0], 16),
          *b1 = g->rank[1]->ops->alloc(g->rank[1], 16);
    for (int i = 0; i < 4; i++) {
        b0[i] = (float)i;
        b1[i] = 10.0f * (float)i;
    }
    float *bufs[2] = {b0, b1};
    kn_group_reduce(g, bufs, 4);
    for (int i = 0; i < 4; i++)
        assert_true(b0[i] == 11.0f * (float)i);
    g->rank[0]->ops->free(g->rank[0], b0);
    g->rank[1]->ops->free(g->rank[1], b1);
    kn_group_destroy(g);
    d->ops->destroy(d);
}

int main(void)
{
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_device_rounding),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_swiglu_add),
        cmocka_unit_test(test_gather_scatter_embed),
        cmocka_unit_test(test_router_topk),
        cmocka_unit_test(test_weight_load_dense),
        cmocka_unit_test(test_weight_load_fp8_blocks),
        cmocka_unit_test(test_attention_dtypes_blocks),
        cmocka_unit_test(test_attention_head256),
        cmocka_unit_test(test_attention_tiled_prefill),
        cmocka_unit_test(test_round),
        cmocka_unit_test(test_backend_misc),
        cmocka_unit_test(test_group),
        cmocka_unit_test(test_cpu_dev),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, setup, teardown);
}
