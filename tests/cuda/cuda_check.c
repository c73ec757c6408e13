/*
 * cuda_check: every op of the cuda backend against the cpu backend (the reference), on
 * the same inputs, with an explicit tolerance. `cuda_check --list` names the checks;
 * `cuda_check NAME` runs one and prints
 *   ok - NAME max_err=E tol=T (detail)      or      not ok - NAME ...
 * Errors are relative to the reference's largest magnitude unless said. Each check
 * runs in its own process (tests/cuda/run.sh), so a crash stops only that check.
 */
#define _GNU_SOURCE
#include "afd_dtype.h"
#include "afd_log.h"
#include "kn_ops.h"

#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static kn_backend_t *cpu, *gpu;
/* --quick: leaves out the cases at Step3's full sizes (long contexts, the whole
 * vocabulary), for slow devices such as the CPU emulator (tests/cuda/emu) */
static int quick;
static int gpu_fp8; /* the backend keeps whole-block fp8 weights as fp8 (its probe passed) */

/* asks the loaded libafdcuda.so (kn_cuda_fp8_native) how it keeps fp8 weights */
static int query_fp8_native(void)
{
    char exe[PATH_MAX], path[PATH_MAX + 32];
    const char *env = getenv("AFD_CUDA_LIB");
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (env && *env) {
        snprintf(path, sizeof(path), "%s", env);
    } else if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        snprintf(path, sizeof(path), "%s/../lib/libafdcuda.so", exe);
    } else {
        return 0;
    }
    void *h = dlopen(path, RTLD_NOLOAD | RTLD_LAZY);
    if (!h) return 0;
    int (*fn)(const kn_backend_t *);
    *(void **)&fn = dlsym(h, "kn_cuda_fp8_native");
    int r = fn ? fn(gpu) : 0;
    dlclose(h);
    return r;
}
static uint64_t rng_state = 0x1234567;

static float frand(void) /* uniform [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static float *randv(size_t n, float amp)
{
    float *v = malloc(sizeof(float) * (n ? n : 1));
    if (!v) abort();
    for (size_t i = 0; i < n; i++)
        v[i] = amp * frand();
    return v;
}

/* device copy of host data */
static void *up(const void *h, size_t bytes)
{
    void *d = gpu->ops->alloc(gpu, bytes);
    if (!d) abort();
    gpu->ops->upload(gpu, d, h, bytes);
    return d;
}

static float *down(const void *d, size_t n)
{
    float *h = malloc(sizeof(float) * (n ? n : 1));
    if (!h) abort();
    gpu->ops->download(gpu, h, d, sizeof(float) * n);
    return h;
}

/* max |a - b| / max |ref| (abs when the reference is all zero) */
static double rel_err(const float *ref, const float *got, size_t n)
{
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)ref[i] - got[i]);
        if (!(d <= e)) e = d; /* NaN shows as NaN */
        if (fabs(ref[i]) > m) m = fabs(ref[i]);
    }
    return m > 0 ? e / m : e;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int report(const char *name, double err, double tol, const char *detail)
{
    int ok = err <= tol; /* NaN fails */
    printf("%s - %s max_err=%.3g tol=%.3g%s%s%s\n", ok ? "ok" : "not ok", name, err, tol,
           detail ? " (" : "", detail ? detail : "", detail ? ")" : "");
    return ok ? 0 : 1;
}

/* ---- checks ---- */

static int check_rmsnorm(void)
{
    int n = 7, dim = 7168;
    float *x = randv((size_t)n * dim, 3.0f), *w = randv((size_t)dim, 1.0f);
    float *ref = malloc(sizeof(float) * (size_t)n * dim);
    cpu->ops->rmsnorm(cpu, x, n, dim, w, 1e-5f, ref);
    float *dx = up(x, 4ul * n * dim), *dw = up(w, 4ul * dim);
    float *dout = gpu->ops->alloc(gpu, 4ul * n * dim);
    gpu->ops->rmsnorm(gpu, dx, n, dim, dw, 1e-5f, dout);
    float *got = down(dout, (size_t)n * dim);
    int rc = report("rmsnorm", rel_err(ref, got, (size_t)n * dim), 1e-5, "7 x 7168");
    /* in place, as mdl_attn does for the query norm */
    gpu->ops->rmsnorm(gpu, dx, n, dim, dw, 1e-5f, dx);
    free(got);
    got = down(dx, (size_t)n * dim);
    rc |= report("rmsnorm_inplace", rel_err(ref, got, (size_t)n * dim), 1e-5, NULL);
    return rc;
}

static int check_rope(void)
{
    int n = 5, nh = 64, hd = 256;
    size_t cnt = (size_t)n * nh * hd;
    float *x = randv(cnt, 2.0f), *ref = malloc(4 * cnt);
    int32_t pos[5] = {0, 1, 4095, 8191, 65535};
    memcpy(ref, x, 4 * cnt);
    cpu->ops->rope(cpu, ref, n, nh, hd, pos, 500000.0);
    float *dx = up(x, 4 * cnt);
    int32_t *dp = up(pos, sizeof(pos));
    gpu->ops->rope(gpu, dx, n, nh, hd, dp, 500000.0);
    float *got = down(dx, cnt);
    return report("rope", rel_err(ref, got, cnt), 1e-5, "64 heads x 256, positions to 65535");
}

static int check_swiglu(void)
{
    size_t n = 100003;
    float *g = randv(n, 8.0f), *u = randv(n, 2.0f), *ref = malloc(4 * n);
    cpu->ops->swiglu(cpu, g, u, n, ref);
    float *dg = up(g, 4 * n), *du = up(u, 4 * n);
    gpu->ops->swiglu(gpu, dg, du, n, dg); /* in place, as mdl_ffn */
    float *got = down(dg, n);
    return report("swiglu", rel_err(ref, got, n), 1e-6, NULL);
}

static int check_router(void)
{
    int rc = 0;
    for (int renorm = 0; renorm < 2; renorm++) {
        int n = 300, E = 48, k = 3;
        float *l = randv((size_t)n * E, 4.0f);
        int32_t *ids = malloc(4ul * n * k), *gids = malloc(4ul * n * k);
        float *w = malloc(4ul * n * k);
        cpu->ops->router_topk(cpu, l, n, E, k, renorm, ids, w);
        float *dl = up(l, 4ul * n * E);
        int32_t *dids = gpu->ops->alloc(gpu, 4ul * n * k);
        float *dw = gpu->ops->alloc(gpu, 4ul * n * k);
        gpu->ops->router_topk(gpu, dl, n, E, k, renorm, dids, dw);
        gpu->ops->download(gpu, gids, dids, 4ul * n * k);
        float *gw = down(dw, (size_t)n * k);
        int diff = 0;
        for (int i = 0; i < n * k; i++)
            diff += ids[i] != gids[i];
        char d[96];
        snprintf(d, sizeof(d), "48 experts top 3, %d of %d ids differ", diff, n * k);
        double err = rel_err(w, gw, (size_t)n * k);
        if (diff) err = INFINITY;
        rc |= report(renorm ? "router_topk_renorm" : "router_topk", err, 1e-5, d);
    }
    return rc;
}

static int check_gather_scatter(void)
{
    int n = 50, dim = 7168, rows = 20;
    float *src = randv((size_t)rows * dim, 1.0f), *dst = randv((size_t)rows * dim, 1.0f);
    int32_t idx[50];
    float sc[50];
    for (int i = 0; i < n; i++) {
        idx[i] = (i * 7) % rows; /* rows repeat: the adds must all land */
        sc[i] = frand();
    }
    float *g = malloc(4ul * n * dim), *ref = malloc(4ul * rows * dim);
    cpu->ops->gather(cpu, src, dim, idx, n, g);
    memcpy(ref, dst, 4ul * rows * dim);
    cpu->ops->scatter_add(cpu, ref, dim, idx, sc, n, g);
    cpu->ops->add(cpu, ref, src, (size_t)rows * dim);
    float *dsrc = up(src, 4ul * rows * dim), *ddst = up(dst, 4ul * rows * dim);
    int32_t *didx = up(idx, sizeof(idx));
    float *dsc = up(sc, sizeof(sc)), *dg = gpu->ops->alloc(gpu, 4ul * n * dim);
    gpu->ops->gather(gpu, dsrc, dim, didx, n, dg);
    float *gg = down(dg, (size_t)n * dim);
    int rc = report("gather", rel_err(g, gg, (size_t)n * dim), 0, NULL);
    gpu->ops->scatter_add(gpu, ddst, dim, didx, dsc, n, dg);
    gpu->ops->add(gpu, ddst, dsrc, (size_t)rows * dim);
    float *got = down(ddst, (size_t)rows * dim);
    rc |= report("scatter_add", rel_err(ref, got, (size_t)rows * dim), 1e-6,
                 "repeated rows, then add");
    return rc;
}

static int check_round(void)
{
    int rc = 0;
    struct {
        afd_dtype_t dt;
        int dim;
        const char *name;
    } cases[] = {{AFD_DTYPE_BF16, 7168, "round_bf16"},
                 {AFD_DTYPE_F16, 1000, "round_f16"},
                 {AFD_DTYPE_E4M3, 7168, "round_fp8"},
                 {AFD_DTYPE_E4M3, 320, "round_fp8_tail"}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        int rows = 9, dim = cases[c].dim;
        size_t cnt = (size_t)rows * dim;
        float *x = randv(cnt, 5.0f), *ref = malloc(4 * cnt);
        memcpy(ref, x, 4 * cnt);
        cpu->ops->round(cpu, ref, rows, dim, cases[c].dt);
        float *dx = up(x, 4 * cnt);
        gpu->ops->round(gpu, dx, rows, dim, cases[c].dt);
        float *got = down(dx, cnt);
        /* the same rounding rule: equal but for the last bit of a scale */
        rc |= report(cases[c].name, rel_err(ref, got, cnt), 1e-6, NULL);
    }
    return rc;
}

/* a checkpoint-like matrix: bf16, or e4m3 with 128x128 block scales */
typedef struct src_buf {
    kn_src_t s;
    void *data;
    float *scale;
} src_buf_t;

static void make_src(src_buf_t *b, afd_dtype_t dt, int64_t rows, int64_t cols, float amp)
{
    size_t n = (size_t)(rows * cols);
    float *v = randv(n, amp);
    memset(b, 0, sizeof(*b));
    b->data = malloc(n * afd_dtype_size(dt));
    if (dt == AFD_DTYPE_E4M3) {
        int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
        b->scale = malloc(sizeof(float) * (size_t)(br * bc));
        for (int64_t i = 0; i < br * bc; i++)
            b->scale[i] = amp / 448.0f * (0.5f + 0.5f * fabsf(frand()));
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) {
                float s = b->scale[(r / 128) * bc + c / 128];
                ((uint8_t *)b->data)[r * cols + c] = afd_f32_to_e4m3(v[r * cols + c] / s);
            }
    } else {
        afd_convert_from_f32(dt, v, b->data, n);
    }
    free(v);
    b->s = (kn_src_t){.dtype = dt,
                      .data = b->data,
                      .full_rows = rows,
                      .full_cols = cols,
                      .row0 = 0,
                      .rows = rows,
                      .col0 = 0,
                      .cols = cols,
                      .scale = b->scale};
}

/*
 * y = x W^T on both backends. The cuda GEMM feeds the tensor cores x in the weight's
 * input format (bf16, or e4m3 with per-128 scales): the reference gets x rounded the
 * same way first, so the check sees the GEMM and not the input format.
 */
static int matmul_case(const char *name, afd_dtype_t wdt, int64_t M, int64_t K, int n, int64_t row0,
                       int64_t col0, int64_t full_rows, int64_t full_cols, double tol)
{
    src_buf_t b;
    make_src(&b, wdt, full_rows, full_cols, 0.05f);
    b.s.row0 = row0;
    b.s.col0 = col0;
    b.s.rows = M;
    b.s.cols = K;
    kn_weight_t wc, wg;
    if (cpu->ops->weight_load(cpu, &b.s, &wc) || gpu->ops->weight_load(gpu, &b.s, &wg)) {
        printf("not ok - %s weight_load failed\n", name);
        return 1;
    }
    size_t nk = (size_t)n * K, nm = (size_t)n * M;
    float *x = randv(nk, 2.0f), *y0 = randv(nm, 1.0f);
    float *xr = malloc(4 * nk), *ref = malloc(4 * nm), *ref_acc = malloc(4 * nm);
    memcpy(xr, x, 4 * nk);
    /* does the device keep this weight fp8? (only then are activations fp8) */
    int fp8 = gpu_fp8 && wdt == AFD_DTYPE_E4M3 && M % 128 == 0 && K % 128 == 0 && row0 % 128 == 0 &&
              col0 % 128 == 0;
    cpu->ops->round(cpu, xr, n, (int)K, fp8 ? AFD_DTYPE_E4M3 : AFD_DTYPE_BF16);
    cpu->ops->matmul(cpu, xr, n, &wc, ref, 0);
    memcpy(ref_acc, y0, 4 * nm);
    cpu->ops->matmul(cpu, xr, n, &wc, ref_acc, 1);
    float *dx = up(x, 4 * nk), *dy = gpu->ops->alloc(gpu, 4 * nm), *dya = up(y0, 4 * nm);
    gpu->ops->matmul(gpu, dx, n, &wg, dy, 0);
    gpu->ops->matmul(gpu, dx, n, &wg, dya, 1);
    float *got = down(dy, nm), *got_acc = down(dya, nm);
    char d[160];
    snprintf(d, sizeof(d), "%s weight %lldx%lld, %d rows, %s activations", afd_dtype_name(wdt),
             (long long)M, (long long)K, n, fp8 ? "fp8 per-128" : "bf16");
    int rc = report(name, rel_err(ref, got, nm), tol, d);
    char an[96];
    snprintf(an, sizeof(an), "%s_accumulate", name);
    rc |= report(an, rel_err(ref_acc, got_acc, nm), tol, NULL);
    cpu->ops->weight_free(cpu, &wc);
    gpu->ops->weight_free(gpu, &wg);
    return rc;
}

/*
 * A MoE layer's expert GEMMs in one segmented call (matmul_segments) against the cpu
 * backend's matmul per segment on the same rounded input: empty segments, one-row
 * segments, and K/128 both a multiple of 4 (one quantisation for all rows) and not (one
 * per segment, the scales of each 16-byte aligned).
 */
static int segments_case(const char *name, afd_dtype_t wdt, int M, int K, double tol)
{
    enum { NS = 7 };
    static const int cnt[NS] = {0, 7, 130, 1, 64, 0, 33};
    int32_t off[NS + 1] = {0};
    for (int i = 0; i < NS; i++)
        off[i + 1] = off[i] + cnt[i];
    int total = off[NS];
    src_buf_t b[NS];
    kn_weight_t wc[NS], wg[NS];
    for (int i = 0; i < NS; i++) {
        make_src(&b[i], wdt, M, K, 0.05f);
        if (cpu->ops->weight_load(cpu, &b[i].s, &wc[i]) ||
            gpu->ops->weight_load(gpu, &b[i].s, &wg[i])) {
            printf("not ok - %s weight_load failed\n", name);
            return 1;
        }
    }
    if (!gpu->ops->matmul_segments) {
        printf("not ok - %s (the cuda backend has no segmented GEMM)\n", name);
        return 1;
    }
    size_t nk = (size_t)total * K, nm = (size_t)total * M;
    float *x = randv(nk, 2.0f), *xr = malloc(4 * nk), *ref = malloc(4 * nm);
    memcpy(xr, x, 4 * nk);
    int fp8 = gpu_fp8 && wdt == AFD_DTYPE_E4M3 && M % 128 == 0 && K % 128 == 0;
    cpu->ops->round(cpu, xr, total, K, fp8 ? AFD_DTYPE_E4M3 : AFD_DTYPE_BF16);
    for (int i = 0; i < NS; i++)
        if (cnt[i])
            cpu->ops->matmul(cpu, xr + (size_t)off[i] * K, cnt[i], &wc[i], ref + (size_t)off[i] * M,
                             0);
    float *dx = up(x, 4 * nk), *dy = gpu->ops->alloc(gpu, 4 * nm);
    gpu->ops->matmul_segments(gpu, dx, off, NS, wg, dy);
    float *got = down(dy, nm);
    char d[160];
    snprintf(d, sizeof(d), "%d segments of %s %dx%d weights, %d rows, %s activations", NS,
             afd_dtype_name(wdt), M, K, total, fp8 ? "fp8 per-128" : "bf16");
    int rc = report(name, rel_err(ref, got, nm), tol, d);
    for (int i = 0; i < NS; i++) {
        cpu->ops->weight_free(cpu, &wc[i]);
        gpu->ops->weight_free(gpu, &wg[i]);
    }
    return rc;
}

static int check_matmul(void)
{
    int rc = 0;
    /* bf16 weights: float32 accumulation of the same products */
    rc |= matmul_case("matmul_bf16", AFD_DTYPE_BF16, 384, 320, 17, 0, 0, 384, 320, 1e-4);
    rc |= matmul_case("matmul_bf16_slice", AFD_DTYPE_BF16, 100, 96, 3, 20, 32, 200, 160, 1e-4);
    rc |= matmul_case("matmul_bf16_decode", AFD_DTYPE_BF16, 2048, 7168, 1, 0, 0, 2048, 7168, 1e-4);
    /* fp8 at whole blocks: the block-scaled GEMM, bf16 output (2^-9 relative) */
    rc |= matmul_case("matmul_fp8", AFD_DTYPE_E4M3, 512, 1024, 33, 0, 0, 512, 1024, 1e-2);
    rc |= matmul_case("matmul_fp8_slice", AFD_DTYPE_E4M3, 256, 384, 64, 128, 256, 512, 768, 1e-2);
    rc |= matmul_case("matmul_fp8_decode", AFD_DTYPE_E4M3, 5120, 7168, 1, 0, 0, 5120, 7168, 1e-2);
    /* fp8 cut inside blocks (the tiny model, FFN slices): dequantised to bf16 at load */
    rc |= matmul_case("matmul_fp8_unaligned", AFD_DTYPE_E4M3, 192, 320, 9, 0, 0, 192, 320, 1e-2);
    rc |= segments_case("matmul_segments_bf16", AFD_DTYPE_BF16, 256, 512, 1e-4);
    /* M not a multiple of the grouped GEMM's 64-column tiles */
    rc |= segments_case("matmul_segments_bf16_m100", AFD_DTYPE_BF16, 100, 96, 1e-4);
    rc |= segments_case("matmul_segments_fp8", AFD_DTYPE_E4M3, 256, 512, 1e-2);
    rc |= segments_case("matmul_segments_fp8_k640", AFD_DTYPE_E4M3, 384, 640, 1e-2);
    return rc;
}

static int check_embed(void)
{
    int rc = 0;
    afd_dtype_t dts[2] = {AFD_DTYPE_BF16, AFD_DTYPE_E4M3};
    for (int t = 0; t < 2; t++) {
        src_buf_t b;
        make_src(&b, dts[t], 1024, 512, 1.0f);
        kn_weight_t wc, wg;
        if (cpu->ops->weight_load(cpu, &b.s, &wc) || gpu->ops->weight_load(gpu, &b.s, &wg)) {
            printf("not ok - embed weight_load failed\n");
            return 1;
        }
        int32_t ids[6] = {0, 1023, 5, 5, 700, 128};
        float *ref = malloc(4ul * 6 * 512);
        cpu->ops->embed(cpu, &wc, ids, 6, ref);
        int32_t *dids = up(ids, sizeof(ids));
        float *dout = gpu->ops->alloc(gpu, 4ul * 6 * 512);
        gpu->ops->embed(gpu, &wg, dids, 6, dout);
        float *got = down(dout, 6ul * 512);
        /* bf16 tables are exact; fp8 ones may pass through bf16 (2^-9) */
        rc |= report(t ? "embed_fp8" : "embed_bf16", rel_err(ref, got, 6ul * 512), t ? 4e-3 : 0,
                     NULL);
    }
    return rc;
}

/* a KV cache on a backend: the same layout mdl_kv builds */
static kn_kv_t kv_make(kn_backend_t *be, afd_dtype_t dt, int layers, int blocks, int bs, int hd)
{
    kn_kv_t kv = {
        .dtype = dt, .num_layers = layers, .num_blocks = blocks, .block_size = bs, .head_dim = hd};
    size_t toks = (size_t)layers * blocks * bs;
    kv.k = be->ops->alloc(be, toks * hd * afd_dtype_size(dt));
    kv.v = be->ops->alloc(be, toks * hd * afd_dtype_size(dt));
    if (dt == AFD_DTYPE_E4M3) {
        kv.k_scale = be->ops->alloc(be, toks * 4);
        kv.v_scale = be->ops->alloc(be, toks * 4);
    }
    return kv;
}

/*
 * Fills a sequence's cache through kv_write (prefill chunks) on both backends, then
 * compares the attention of `ntok` new queries at the end (1: the decode kernel with
 * split-K; more: the prefill kernel).
 */
static int attn_case(const char *name, afd_dtype_t dt, int nh, int hd, int ctx, int ntok,
                     double tol)
{
    int bs = 16, layers = 2, layer = 1;
    int nb = (ctx + bs - 1) / bs, blocks = nb + 7;
    kn_kv_t kc = kv_make(cpu, dt, layers, blocks, bs, hd);
    kn_kv_t kg = kv_make(gpu, dt, layers, blocks, bs, hd);
    int32_t *bt = malloc(sizeof(int32_t) * (size_t)nb);
    for (int i = 0; i < nb; i++)
        bt[i] = (int32_t)((i * 5 + 3) % blocks); /* scattered blocks */
    int fresh = 0;
    for (int i = 0; i < nb; i++) /* a permutation only when gcd(5, blocks) == 1 */
        for (int j = 0; j < i; j++)
            fresh |= bt[i] == bt[j];
    if (fresh)
        for (int i = 0; i < nb; i++)
            bt[i] = (int32_t)(nb - 1 - i);
    /* positions [0, ctx) written in chunks of up to 700 tokens */
    for (int p0 = 0; p0 < ctx;) {
        int cnt = ctx - p0 < 700 ? ctx - p0 : 700;
        float *k = randv((size_t)cnt * hd, 1.5f), *v = randv((size_t)cnt * hd, 1.5f);
        kn_seq_t s = {.block_table = bt, .pos0 = p0, .ntok = cnt};
        cpu->ops->kv_write(cpu, &kc, layer, &s, k, v);
        float *dk = up(k, 4ul * cnt * hd), *dv = up(v, 4ul * cnt * hd);
        gpu->ops->kv_write(gpu, &kg, layer, &s, dk, dv);
        gpu->ops->sync(gpu);
        gpu->ops->free(gpu, dk);
        gpu->ops->free(gpu, dv);
        free(k);
        free(v);
        p0 += cnt;
    }
    size_t qn = (size_t)ntok * nh * hd;
    float *q = randv(qn, 1.0f), *ref = malloc(4 * qn);
    kn_seq_t s = {.block_table = bt, .pos0 = ctx - ntok, .ntok = ntok};
    float scale = 1.0f / sqrtf((float)hd);
    cpu->ops->attention(cpu, &kc, layer, &s, q, nh, scale, ref);
    /* the tensor-core decode kernel rounds q and the probabilities to bf16 */
    const char *at = getenv("AFD_CUDA_ATTN");
    int tc = at && !strcmp(at, "tc") && ntok == 1 && nh % 16 == 0 && nh <= 64 && hd <= 256 &&
             dt != AFD_DTYPE_F32;
    if (tc && tol < 1e-2) tol = 1e-2;
    float *dq = up(q, 4 * qn), *dout = gpu->ops->alloc(gpu, 4 * qn);
    gpu->ops->attention(gpu, &kg, layer, &s, dq, nh, scale, dout);
    float *got = down(dout, qn);
    /* the caches themselves: the same bytes after the same rounding */
    size_t kvel = (size_t)layers * blocks * bs * hd;
    size_t kvb = kvel * afd_dtype_size(dt);
    unsigned char *hk = malloc(kvb);
    gpu->ops->download(gpu, hk, kg.k, kvb);
    size_t bad = 0;
    for (size_t i = 0; i < kvb; i++)
        bad += hk[i] != ((unsigned char *)kc.k)[i];
    char d[160];
    snprintf(d, sizeof(d),
             "%s KV, %d heads x %d, context %d, %d new%s; %zu of %zu K cache bytes differ",
             afd_dtype_name(dt), nh, hd, ctx, ntok, tc ? ", tensor cores" : "", bad, kvb);
    int rc = report(name, rel_err(ref, got, qn), tol, d);
    free(hk);
    return rc;
}

/*
 * A batch as mdl_attn hands it to the backend: sequences of different contexts, decode
 * (one new token) and one prefill chunk among them, each in its own blocks. The cpu runs
 * kv_write and attention per sequence; the gpu its batched ops (one KV-write launch, one
 * decode launch per run of one-token sequences). Outputs within tol, cache bytes equal.
 */
/* prepared: every sequence decodes one token and the batch's tables go up first
 * (batch_prepare, as the attention node does at the start of a step) */
static int attn_batch_case(const char *name, afd_dtype_t dt, int nh, int hd, double tol,
                           int prepared)
{
    enum { NS = 6 };
    static const int ctx[NS] = {1, 700, 33, 4096, 250, 17}; /* positions after this step */
    int nnew[NS] = {1, 1, 1, 1, prepared ? 1 : 9, 1};       /* sequence 4: a prefill chunk */
    int bs = 16, layers = 2, layer = 1, blocks = 0, nbs[NS];
    for (int i = 0; i < NS; i++)
        blocks += nbs[i] = (ctx[i] + bs - 1) / bs;
    blocks += 3;
    kn_kv_t kc = kv_make(cpu, dt, layers, blocks, bs, hd);
    kn_kv_t kg = kv_make(gpu, dt, layers, blocks, bs, hd);
    int32_t *bt[NS];
    kn_seq_t seqs[NS];
    int next = blocks - 1, ntot = 0;
    for (int i = 0; i < NS; i++) { /* blocks handed out from the top, interleaved */
        bt[i] = malloc(sizeof(int32_t) * (size_t)nbs[i]);
        for (int b = 0; b < nbs[i]; b++)
            bt[i][b] = next--;
        int hist = ctx[i] - nnew[i];
        if (hist > 0) { /* the history, written the same way on both */
            float *k = randv((size_t)hist * hd, 1.5f), *v = randv((size_t)hist * hd, 1.5f);
            kn_seq_t h = {.block_table = bt[i], .pos0 = 0, .ntok = hist};
            cpu->ops->kv_write(cpu, &kc, layer, &h, k, v);
            float *dk = up(k, 4ul * hist * hd), *dv = up(v, 4ul * hist * hd);
            gpu->ops->kv_write(gpu, &kg, layer, &h, dk, dv);
            gpu->ops->sync(gpu);
            gpu->ops->free(gpu, dk);
            gpu->ops->free(gpu, dv);
            free(k);
            free(v);
        }
        seqs[i] = (kn_seq_t){.block_table = bt[i], .pos0 = hist, .ntok = nnew[i]};
        ntot += nnew[i];
    }
    size_t qn = (size_t)ntot * nh * hd, kn = (size_t)ntot * hd;
    float *q = randv(qn, 1.0f), *k = randv(kn, 1.5f), *v = randv(kn, 1.5f);
    float *ref = malloc(4 * qn), scale = 1.0f / sqrtf((float)hd);
    size_t off = 0;
    for (int i = 0; i < NS; i++) {
        cpu->ops->kv_write(cpu, &kc, layer, &seqs[i], k + off * hd, v + off * hd);
        cpu->ops->attention(cpu, &kc, layer, &seqs[i], q + off * nh * hd, nh, scale,
                            ref + off * nh * hd);
        off += (size_t)nnew[i];
    }
    if (!gpu->ops->kv_write_batch || !gpu->ops->attention_batch) {
        printf("not ok - %s (the cuda backend has no batched attention)\n", name);
        return 1;
    }
    const char *at = getenv("AFD_CUDA_ATTN");
    int tc =
        at && !strcmp(at, "tc") && nh % 16 == 0 && nh <= 64 && hd <= 256 && dt != AFD_DTYPE_F32;
    if (tc && tol < 1e-2) tol = 1e-2;
    float *dq = up(q, 4 * qn), *dk = up(k, 4 * kn), *dv = up(v, 4 * kn);
    float *dout = gpu->ops->alloc(gpu, 4 * qn);
    uint64_t shape = 0;
    if (prepared && (!gpu->ops->batch_prepare ||
                     gpu->ops->batch_prepare(gpu, &kg, seqs, NS, nh, &shape) != 1)) {
        printf("not ok - %s (batch_prepare did not take a decode batch)\n", name);
        return 1;
    }
    gpu->ops->kv_write_batch(gpu, &kg, layer, seqs, NS, dk, dv);
    gpu->ops->attention_batch(gpu, &kg, layer, seqs, NS, dq, nh, scale, dout);
    float *got = down(dout, qn);
    size_t kvb = (size_t)layers * blocks * bs * hd * afd_dtype_size(dt);
    unsigned char *hk = malloc(kvb);
    gpu->ops->download(gpu, hk, kg.k, kvb);
    size_t bad = 0;
    for (size_t i = 0; i < kvb; i++)
        bad += hk[i] != ((unsigned char *)kc.k)[i];
    char d[160];
    snprintf(d, sizeof(d),
             "%s KV, %d heads x %d, %d sequences (%s)%s; %zu of %zu K "
             "cache bytes differ",
             afd_dtype_name(dt), nh, hd, NS, prepared ? "decode, tables prepared" : "one prefill",
             tc ? ", tensor cores" : "", bad, kvb);
    int rc = report(name, bad ? 1.0 : rel_err(ref, got, qn), tol, d);
    free(hk);
    return rc;
}

static int check_attention(void)
{
    int rc = 0;
    if (!quick) {
        rc |= attn_case("attn_decode_bf16", AFD_DTYPE_BF16, 64, 256, 4096, 1, 1e-4);
        rc |= attn_case("attn_decode_fp8", AFD_DTYPE_E4M3, 64, 256, 4096, 1, 1e-4);
        rc |= attn_case("attn_decode_long", AFD_DTYPE_BF16, 64, 256, 20000, 1, 1e-4);
        rc |= attn_case("attn_prefill_bf16", AFD_DTYPE_BF16, 64, 256, 600, 37, 1e-4);
    } else {
        printf("# attn_decode_bf16, attn_decode_fp8, attn_decode_long, attn_prefill_bf16: left "
               "out (--quick)\n");
    }
    rc |= attn_case("attn_decode_f32", AFD_DTYPE_F32, 64, 256, 777, 1, 1e-4);
    rc |= attn_case("attn_decode_short", AFD_DTYPE_BF16, 64, 256, 1, 1, 1e-4);
    rc |= attn_case("attn_decode_tiny", AFD_DTYPE_BF16, 4, 64, 300, 1, 1e-4);
    rc |= attn_case("attn_prefill_fp8", AFD_DTYPE_E4M3, 8, 128, 300, 300, 1e-4);
    rc |= attn_case("attn_prefill_tiny", AFD_DTYPE_BF16, 4, 64, 50, 50, 1e-4);
    rc |= attn_batch_case("attn_batch_bf16", AFD_DTYPE_BF16, 64, 256, 1e-4, 0);
    rc |= attn_batch_case("attn_batch_fp8", AFD_DTYPE_E4M3, 64, 256, 1e-4, 0);
    rc |= attn_batch_case("attn_batch_tiny", AFD_DTYPE_BF16, 4, 64, 1e-4, 0);
    rc |= attn_batch_case("attn_batch_prepared_fp8", AFD_DTYPE_E4M3, 64, 256, 1e-4, 1);
    rc |= attn_batch_case("attn_batch_prepared_tiny", AFD_DTYPE_BF16, 4, 64, 1e-4, 1);
    return rc;
}

/*
 * Tensor-parallel sums (kn_group_reduce) against the host sum: three ranks on one device
 * (rank 0 adds its peers' buffers after waiting for their streams), then, where there are
 * two devices, two ranks on devices 0 and 1 (NCCL when libnccl loads, else peer copies).
 * Right after the reduce every peer zeroes its buffer: its stream must wait for the sum,
 * or the sum misses that rank. Tolerance 1e-6 (float32 sums of three terms).
 */
static int group_case(const char *name, int n, const int *devices)
{
    kn_group_t *g = NULL;
    afd_status_t st = kn_group_create("cuda", 0, n, devices, &g);
    if (st) {
        if (devices[1] != devices[0] && st == AFD_ERR_RANGE) {
            printf("# %s: skipped (one device)\n", name);
            return 0;
        }
        printf("not ok - %s (kn_group_create: %s)\n", name, afd_status_str(st));
        return 1;
    }
    enum { C = 3 << 20 }; /* 12 MiB per rank: a step's output at Step3 width and ~440 rows */
    float *h[KN_GROUP_MAX], *d[KN_GROUP_MAX], *want = malloc(sizeof(float) * C);
    if (!want) abort();
    for (size_t k = 0; k < C; k++)
        want[k] = 0;
    for (int i = 0; i < n; i++) {
        kn_backend_t *r = g->rank[i];
        h[i] = randv(C, 1.0f + (float)i);
        for (size_t k = 0; k < C; k++)
            want[k] += h[i][k];
        d[i] = r->ops->alloc(r, sizeof(float) * C);
        if (!d[i]) abort();
        r->ops->upload(r, d[i], h[i], sizeof(float) * C);
    }
    double err = 0;
    for (int rep = 0; rep < 3; rep++) {
        for (int i = 0; i < n && rep; i++) /* put the data back after the zeroing below */
            g->rank[i]->ops->upload(g->rank[i], d[i], h[i], sizeof(float) * C);
        kn_group_reduce(g, d, C);
        for (int i = 1; i < n; i++)
            g->rank[i]->ops->zero(g->rank[i], d[i], sizeof(float) * C);
        float *got = malloc(sizeof(float) * C);
        if (!got) abort();
        g->rank[0]->ops->download(g->rank[0], got, d[0], sizeof(float) * C);
        double e = rel_err(want, got, C);
        if (!(e <= err)) err = e;
        free(got);
    }
    /* the broadcast: rank 0's bytes (an odd count) on every rank, exactly */
    size_t bb = 4 * (size_t)C - 3, bad = 0;
    g->rank[0]->ops->upload(g->rank[0], d[0], h[0], bb);
    kn_group_bcast(g, (void *const *)d, bb);
    unsigned char *hb = malloc(bb);
    if (!hb) abort();
    for (int i = 1; i < n; i++) {
        g->rank[i]->ops->download(g->rank[i], hb, d[i], bb);
        bad += memcmp(hb, h[0], bb) != 0;
    }
    free(hb);
    if (bad) err = 1;
    for (int i = 0; i < n; i++) {
        g->rank[i]->ops->free(g->rank[i], d[i]);
        free(h[i]);
    }
    free(want);
    kn_group_destroy(g);
    char detail[96];
    snprintf(detail, sizeof(detail), "%d ranks on devices %d%s%d, 3 rounds; broadcast %s", n,
             devices[0], n > 2 ? ".." : ",", devices[n - 1], bad ? "differs" : "exact");
    return report(name, err, 1e-6, detail);
}

static int check_group(void)
{
    int rc = 0;
    const char *ds = getenv("AFD_CUDA_DEVICE");
    int d0 = ds && *ds ? atoi(ds) : 0;
    int same[3] = {d0, d0, d0}, two[2] = {0, 1};
    rc |= group_case("group_one_device", 3, same);
    rc |= group_case("group_two_devices", 2, two);
    return rc;
}

/*
 * A sibling queue (kn_fork: its own stream, the parent's memory) and the asynchronous copy
 * to pinned host memory that the attention node's A2F uses: the sibling adds a buffer the
 * parent wrote into its own, copies it out with download_async, and an event reports the
 * copy; the bytes must be exact (a float add of x to zeros).
 */
static int check_streams(void)
{
    enum { C = 1 << 20 };
    float *hx = randv(C, 2.0f);
    float *dx = up(hx, sizeof(float) * C);
    kn_backend_t *sib = kn_fork(gpu);
    if (!sib) {
        printf("not ok - streams (kn_fork failed)\n");
        return 1;
    }
    float *dy = sib->ops->alloc(sib, sizeof(float) * C);
    float *hy = kn_host_alloc(sib, sizeof(float) * C);
    void *ev = kn_event_new(sib);
    if (!dy || !hy || !ev) abort();
    double err = 0;
    long polls = 0;
    for (int rep = 0; rep < 3; rep++) {
        memset(hy, 0, sizeof(float) * C);
        sib->ops->zero(sib, dy, sizeof(float) * C);
        sib->ops->add(sib, dy, dx, C);
        kn_download_async(sib, hy, dy, sizeof(float) * C);
        kn_event_record(sib, ev);
        double t0 = now_s();
        while (!kn_event_done(sib, ev)) {
            polls++;
            if (now_s() - t0 > 10) {
                printf("not ok - streams (the event never completed)\n");
                return 1;
            }
        }
        double e = rel_err(hx, hy, C);
        if (!(e <= err)) err = e;
    }
    kn_event_free(sib, ev);
    kn_host_free(sib, hy);
    sib->ops->free(sib, dy);
    sib->ops->destroy(sib);
    gpu->ops->free(gpu, dx);
    free(hx);
    char detail[80];
    snprintf(detail, sizeof(detail), "4 MiB through a sibling stream, %ld polls", polls);
    return report("streams", err, 0, detail);
}

/*
 * The packed rows of the data plane on the device (kn_rows_*: A2F packed on the attention
 * node, unpacked on the FFN ranks; F2A packed on the FFN node, added on the attention
 * node) against afd_rows_* on the host: the bytes must be equal (e4m3 with its scales,
 * bf16, f32), and unpacking and adding exact (tolerance 0). Shapes: Step3's hidden 7168
 * (56 groups), 300 (a short last group) and a single row of 1.
 */
static int rows_case(int rows, int dim)
{
    char name[64];
    int rc = 0;
    float *x = randv((size_t)rows * dim, 3.0f);
    x[0] = 0.0f; /* a zero and a large value among them */
    x[(size_t)rows * dim / 2] = 500.0f;
    float *dx = up(x, sizeof(float) * (size_t)rows * dim);
    static const afd_dtype_t dts[3] = {AFD_DTYPE_E4M3, AFD_DTYPE_BF16, AFD_DTYPE_F32};
    for (int t = 0; t < 3; t++) {
        afd_dtype_t dt = dts[t];
        size_t rb = afd_rows_bytes(dt, (size_t)rows, (size_t)dim), n = (size_t)rows * dim;
        uint8_t *want = malloc(rb), *got = malloc(rb);
        float *y = malloc(sizeof(float) * n), *base = randv(n, 1.0f),
              *ysum = malloc(sizeof(float) * n);
        if (!want || !got || !y || !ysum) abort();
        afd_rows_encode(dt, x, (size_t)rows, (size_t)dim, want);
        void *dp = gpu->ops->alloc(gpu, rb);
        float *dy = gpu->ops->alloc(gpu, sizeof(float) * n);
        if (!dp || !dy) abort();
        kn_rows_encode(gpu, dt, dx, rows, dim, dp);
        gpu->ops->download(gpu, got, dp, rb);
        size_t diff = 0;
        for (size_t i = 0; i < rb; i++)
            diff += want[i] != got[i];
        /* unpack the host's bytes on the device */
        gpu->ops->upload(gpu, dp, want, rb);
        kn_rows_decode(gpu, dt, dp, rows, dim, dy);
        float *dec = down(dy, n);
        afd_rows_decode(dt, want, (size_t)rows, (size_t)dim, y);
        double err = 0;
        for (size_t i = 0; i < n; i++)
            if (dec[i] != y[i]) err = fmax(err, fabs((double)dec[i] - y[i]) + 1e-30);
        if (dt != AFD_DTYPE_E4M3) { /* what the attention node adds */
            gpu->ops->upload(gpu, dy, base, sizeof(float) * n);
            kn_rows_add(gpu, dt, dp, rows, dim, dy);
            float *sum = down(dy, n);
            memcpy(ysum, base, sizeof(float) * n);
            afd_rows_add(dt, want, (size_t)rows, (size_t)dim, ysum);
            for (size_t i = 0; i < n; i++)
                if (sum[i] != ysum[i]) err = fmax(err, fabs((double)sum[i] - ysum[i]) + 1e-30);
            free(sum);
        }
        snprintf(name, sizeof(name), "rows_%s_%dx%d", afd_dtype_name(dt), rows, dim);
        char detail[96];
        snprintf(detail, sizeof(detail), "%zu of %zu packed bytes differ", diff, rb);
        rc |= report(name, diff ? 1.0 : err, 0, detail);
        gpu->ops->free(gpu, dp);
        gpu->ops->free(gpu, dy);
        free(want);
        free(got);
        free(y);
        free(base);
        free(ysum);
        free(dec);
    }
    gpu->ops->free(gpu, dx);
    free(x);
    return rc;
}

static int check_rows(void)
{
    return rows_case(128, 7168) | rows_case(5, 300) | rows_case(1, 1);
}

/*
 * The attention node's sampling support (logits_top): each row's 64 best (id, logit) by
 * (logit descending, id ascending) must equal a host insertion sort exactly, and the
 * log-sum-exp agree to 1e-12 relative (double sums in another order). Logits quantised
 * to quarter steps, so rows have many ties; Step3's vocabulary and two odd sizes.
 */
static int top_case(int rows, int vocab)
{
    enum { K = KN_TOP_K_MAX };
    size_t n = (size_t)rows * vocab;
    float *l = malloc(sizeof(float) * n);
    if (!l) abort();
    for (size_t i = 0; i < n; i++)
        l[i] = roundf(frand() * 24.0f) / 4.0f;
    float *dl = up(l, sizeof(float) * n);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)rows * K);
    float *vals = malloc(sizeof(float) * (size_t)rows * K);
    double *lse = malloc(sizeof(double) * (size_t)rows);
    if (!ids || !vals || !lse) abort();
    afd_status_t st = gpu->ops->logits_top
                          ? gpu->ops->logits_top(gpu, dl, rows, vocab, K, ids, vals, lse)
                          : AFD_ERR_UNSUPPORTED;
    char name[64];
    snprintf(name, sizeof(name), "logits_top_%dx%d", rows, vocab);
    if (st) {
        printf("not ok - %s (%s)\n", name, afd_status_str(st));
        return 1;
    }
    size_t bad = 0;
    double err = 0;
    int want[K];
    for (int r = 0; r < rows; r++) {
        const float *lr = l + (size_t)r * vocab;
        int cnt = 0, k = vocab < K ? vocab : K;
        for (int i = 0; i < vocab; i++) {
#define BEFORE(a, b) (lr[a] > lr[b] || (lr[a] == lr[b] && (a) < (b)))
            if (cnt == k && !BEFORE(i, want[k - 1])) continue;
            int j = cnt < k ? cnt++ : k - 1;
            while (j > 0 && BEFORE(i, want[j - 1])) {
                want[j] = want[j - 1];
                j--;
            }
            want[j] = i;
#undef BEFORE
        }
        for (int j = 0; j < k; j++)
            bad += ids[(size_t)r * K + j] != want[j] || vals[(size_t)r * K + j] != lr[want[j]];
        double mx = lr[want[0]], sum = 0;
        for (int i = 0; i < vocab; i++)
            sum += exp((double)lr[i] - mx);
        double ref = mx + log(sum), e = fabs(lse[r] - ref) / fmax(1.0, fabs(ref));
        if (!(e <= err)) err = e;
    }
    char detail[96];
    snprintf(detail, sizeof(detail), "%zu of %d candidates differ; lse relative error", bad,
             rows * (vocab < K ? vocab : K));
    int rc = report(name, bad ? 1.0 : err, 1e-12, detail);
    gpu->ops->free(gpu, dl);
    free(l);
    free(ids);
    free(vals);
    free(lse);
    return rc;
}

static int check_top(void)
{
    if (quick) printf("# logits_top_37x128815: left out (--quick)\n");
    return (quick ? 0 : top_case(37, 128815)) | top_case(3, 1000) | top_case(2, 16389) |
           top_case(1, 40);
}

typedef struct check {
    const char *name;
    int (*fn)(void);
} check_t;

static const check_t checks[] = {
    {"rmsnorm", check_rmsnorm},
    {"rope", check_rope},
    {"swiglu", check_swiglu},
    {"router", check_router},
    {"gather", check_gather_scatter},
    {"round", check_round},
    {"matmul", check_matmul},
    {"embed", check_embed},
    {"attention", check_attention},
    {"group", check_group},
    {"streams", check_streams},
    {"rows", check_rows},
    {"top", check_top},
};

int main(int argc, char **argv)
{
    afd_log_init("cuda_check");
    size_t nc = sizeof(checks) / sizeof(checks[0]);
    if (argc >= 2 && !strcmp(argv[1], "--quick")) {
        quick = 1;
        argv++;
        argc--;
    }
    if (argc == 2 && !strcmp(argv[1], "--list")) {
        for (size_t i = 0; i < nc; i++)
            printf("%s\n", checks[i].name);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "--probe")) { /* is there a device to check on? */
        kn_backend_t *g = NULL;
        if (kn_backend_create("cuda", 0, &g)) return 1; /* the reason is on stderr */
        g->ops->destroy(g);
        printf("cuda backend: a device is usable\n");
        return 0;
    }
    if (argc > 2 || (argc == 2 && argv[1][0] == '-')) {
        fprintf(stderr, "usage: cuda_check [--list | --probe | [--quick] NAME]  (no NAME: every "
                        "check)\n");
        return 2;
    }
    if (kn_cpu_create(0, &cpu)) return 1;
    if (kn_backend_create("cuda", 0, &gpu)) {
        printf("not ok - cuda_backend (the cuda backend did not start)\n");
        return 1;
    }
    gpu_fp8 = query_fp8_native();
    printf("# cuda backend keeps whole-block fp8 weights as %s\n",
           gpu_fp8 ? "fp8 (block-scaled GEMM)" : "bf16 (fallback)");
    int rc = 0, found = 0;
    for (size_t i = 0; i < nc; i++) {
        if (argc == 2 && strcmp(argv[1], checks[i].name)) continue;
        found = 1;
        rc |= checks[i].fn();
    }
    if (!found) {
        fprintf(stderr, "cuda_check: no check named '%s' (--list)\n", argv[1]);
        return 2;
    }
    /* buffers of a check process are left to its exit */
    gpu->ops->destroy(gpu);
    cpu->ops->destroy(cpu);
    return rc;
}
