/*
 * afd_gemm_bench: the CPU backend's GEMM against raw OpenBLAS, at the shapes the
 * model runs. For each weight shape [out, in] (bf16 in the checkpoint, loaded
 * through be->ops->weight_load) and token count n, it times y = x W^T through
 * be->ops->matmul and a direct cblas_sgemm on the same float32 buffers,
 * interleaving the two calls so that both see the same machine state, and prints
 * GFLOP/s (2 n out in / median call time) for both and their ratio (ours / OpenBLAS;
 * 1.0 means the ops table costs nothing). Each point runs until both sides have
 * --min-time seconds of calls (at least 3 calls, at most 100000).
 *
 *   afd_gemm_bench [--threads N] [--quick] [--json FILE] [--min-time S] [--info]
 */
#define _GNU_SOURCE
#include "afd_dtype.h"
#include "afd_log.h"
#include "afd_opts.h"
#include "kn_ops.h"

#include <cblas.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct bench_opts {
    long threads;
    int quick, info;
    double min_time;
    char *json;
} bench_opts_t;

#define O(f) offsetof(bench_opts_t, f)
static const afd_opt_t bench_table[] = {
    {"threads", AFD_OPT_INT, "1", O(threads), 1, 1024, AFD_OPT_NOENV, "OpenBLAS threads"},
    {"quick", AFD_OPT_BOOL, "false", O(quick), 0, 0, AFD_OPT_NOENV,
     "fewer shapes and token counts"},
    {"json", AFD_OPT_STRING, NULL, O(json), 0, 0, AFD_OPT_NOENV, "also write the results here"},
    {"min-time", AFD_OPT_DOUBLE, "0.2", O(min_time), 0.001, 60, AFD_OPT_NOENV,
     "seconds of timed calls per point and side (bounded by 100000 calls)"},
    {"info", AFD_OPT_BOOL, "false", O(info), 0, 0, AFD_OPT_NOENV,
     "print the machine and OpenBLAS build, then exit"},
    AFD_OPTS_END};
#undef O

/* One GEMM shape of the model: y[n, out] = x[n, in] W^T with W [out, in]. */
typedef struct shape {
    const char *name;
    int out, in;
    int max_n; /* n above this is skipped (large shapes: keeps the run short) */
    int quick; /* part of the --quick set */
} shape_t;

/* mini preset: hidden 1024, 16 heads x 128, share_q 512, experts 1024, dense 2048,
 * vocab 8192. step3: hidden 7168, share_q 2048, moe/shared expert 5120. */
static const shape_t shapes[] = {
    {"mini q_proj", 512, 1024, 1 << 30, 1},          {"mini wq", 2048, 512, 1 << 30, 0},
    {"mini k_proj/v_proj", 128, 1024, 1 << 30, 0},   {"mini o_proj", 1024, 2048, 1 << 30, 0},
    {"mini expert gate/up", 1024, 1024, 1 << 30, 1}, {"mini expert down", 1024, 1024, 1 << 30, 0},
    {"mini dense gate/up", 2048, 1024, 1 << 30, 0},  {"mini dense down", 1024, 2048, 1 << 30, 0},
    {"mini lm_head", 8192, 1024, 1 << 30, 1},        {"step3 expert gate/up", 5120, 7168, 16, 1},
    {"step3 expert down", 7168, 5120, 16, 0},        {"step3 q_proj", 2048, 7168, 64, 0},
};
#define NSHAPES ((int)(sizeof(shapes) / sizeof(shapes[0])))

static const int ns_full[] = {1, 16, 64, 256};
static const int ns_quick[] = {1, 64};

#define MAX_REPS 100000 /* bound on timed calls per side and point */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* xorshift64*: uniform in [-1, 1) */
static float rnd(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    uint64_t r = *s * 0x2545F4914F6CDD1DULL;
    return (float)((double)(r >> 40) / (double)(1ULL << 23) - 1.0);
}

static void blas_gemm(const float *x, int n, const float *w, int out, int in, float *y)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y,
                out);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* median of v[0..n) (sorts v) */
static double median(double *v, long n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

typedef struct point {
    const shape_t *sh;
    int n;
    double ours_s, blas_s;           /* median seconds per call */
    double ours_mean_s, blas_mean_s; /* mean seconds per call */
    long reps;
    double max_rel_diff;
} point_t;

static void print_info(FILE *f)
{
    char *core = openblas_get_corename();
    char *conf = openblas_get_config();
    fprintf(f, "cpu cores (online): %ld, OpenBLAS procs: %d, OpenBLAS core: %s\n",
            sysconf(_SC_NPROCESSORS_ONLN), openblas_get_num_procs(), core ? core : "?");
    fprintf(f, "OpenBLAS config: %s\n", conf ? conf : "?");
}

int main(int argc, char **argv)
{
    afd_log_init(argv[0]);
    bench_opts_t o;
    memset(&o, 0, sizeof(o));
    int first, rc = 1;
    afd_status_t st =
        afd_opts_parse(bench_table, &o, argc, argv,
                       "usage: afd_gemm_bench [--threads N] [--quick] [--json FILE]", &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        afd_opts_free(bench_table, &o);
        return 2;
    }
    if (o.info) {
        print_info(stdout);
        afd_opts_free(bench_table, &o);
        return 0;
    }
    kn_backend_t *be = NULL;
    if (kn_cpu_create((int)o.threads, &be)) {
        afd_error("cannot create the cpu backend");
        afd_opts_free(bench_table, &o);
        return 1;
    }
    const int *ns = o.quick ? ns_quick : ns_full;
    int nn = o.quick ? (int)(sizeof(ns_quick) / sizeof(int)) : (int)(sizeof(ns_full) / sizeof(int));
    int maxn = ns[nn - 1];

    point_t *pts = calloc((size_t)NSHAPES * (size_t)nn, sizeof(*pts));
    double *ours_t = malloc(sizeof(double) * MAX_REPS), *blas_t = malloc(sizeof(double) * MAX_REPS);
    int npts = 0;
    if (!pts || !ours_t || !blas_t) goto out;

    printf("backend %s, %d OpenBLAS thread(s), core %s; %.2f s per point and side, "
           "interleaved; GFLOP/s = 2*n*out*in / median call time\n",
           be->ops->name, be->threads, openblas_get_corename(), o.min_time);
    printf("%-22s %11s %5s %13s %13s %7s %7s\n", "shape", "[out,in]", "n", "ours GF/s",
           "OpenBLAS GF/s", "ratio", "calls");
    fflush(stdout);

    double t_start = now_s();
    uint64_t seed = 0x9E3779B97F4A7C15ULL;
    for (int si = 0; si < NSHAPES; si++) {
        const shape_t *sh = &shapes[si];
        if (o.quick && !sh->quick) continue;
        size_t wel = (size_t)sh->out * (size_t)sh->in;
        /* the checkpoint side: bf16, as afd_mkmodel writes it */
        uint16_t *wbf = malloc(sizeof(uint16_t) * wel);
        if (!wbf) goto out;
        float wstd = 1.0f / sqrtf((float)sh->in);
        for (size_t i = 0; i < wel; i++)
            wbf[i] = afd_f32_to_bf16(rnd(&seed) * wstd);
        kn_src_t src = {.dtype = AFD_DTYPE_BF16,
                        .data = wbf,
                        .full_rows = sh->out,
                        .full_cols = sh->in,
                        .row0 = 0,
                        .rows = sh->out,
                        .col0 = 0,
                        .cols = sh->in,
                        .scale = NULL};
        kn_weight_t w;
        memset(&w, 0, sizeof(w));
        if ((st = be->ops->weight_load(be, &src, &w))) {
            afd_error("weight_load %s: %s", sh->name, afd_status_str(st));
            free(wbf);
            goto out;
        }
        /* the load must be exact bf16 -> f32 */
        const float *wf = w.data;
        for (size_t i = 0; i < wel; i += 4099)
            if (wf[i] != afd_bf16_to_f32(wbf[i])) {
                afd_error("weight_load %s: element %zu is %g, expected %g", sh->name, i,
                          (double)wf[i], (double)afd_bf16_to_f32(wbf[i]));
                be->ops->weight_free(be, &w);
                free(wbf);
                goto out;
            }
        free(wbf);
        int nmax = maxn < sh->max_n ? maxn : sh->max_n;
        float *x = malloc(sizeof(float) * (size_t)nmax * (size_t)sh->in);
        float *y1 = malloc(sizeof(float) * (size_t)nmax * (size_t)sh->out);
        float *y2 = malloc(sizeof(float) * (size_t)nmax * (size_t)sh->out);
        if (!x || !y1 || !y2) {
            free(x);
            free(y1);
            free(y2);
            be->ops->weight_free(be, &w);
            goto out;
        }
        for (size_t i = 0; i < (size_t)nmax * (size_t)sh->in; i++)
            x[i] = rnd(&seed);

        for (int ni = 0; ni < nn; ni++) {
            int n = ns[ni];
            if (n > sh->max_n) continue;
            /* warm-up (first-touch of y, OpenBLAS buffers), then the correctness check */
            be->ops->matmul(be, x, n, &w, y1, 0);
            be->ops->sync(be);
            blas_gemm(x, n, wf, sh->out, sh->in, y2);
            double md = 0, mref = 0;
            for (size_t i = 0; i < (size_t)n * (size_t)sh->out; i++) {
                md = fmax(md, fabs((double)y1[i] - y2[i]));
                mref = fmax(mref, fabs((double)y2[i]));
            }
            double t_ours = 0, t_blas = 0;
            long reps = 0;
            while (reps < MAX_REPS && (reps < 3 || t_ours < o.min_time || t_blas < o.min_time)) {
                /* alternate which side goes first so neither always gets the warmer cache */
                for (int k = 0; k < 2; k++) {
                    double t0 = now_s(), dt;
                    if ((k ^ (int)(reps & 1)) == 0) {
                        be->ops->matmul(be, x, n, &w, y1, 0);
                        be->ops->sync(be);
                        dt = now_s() - t0;
                        t_ours += dt;
                        ours_t[reps] = dt;
                    } else {
                        blas_gemm(x, n, wf, sh->out, sh->in, y2);
                        dt = now_s() - t0;
                        t_blas += dt;
                        blas_t[reps] = dt;
                    }
                }
                reps++;
            }
            point_t *p = &pts[npts++];
            p->sh = sh;
            p->n = n;
            p->reps = reps;
            p->ours_s = median(ours_t, reps);
            p->blas_s = median(blas_t, reps);
            p->ours_mean_s = t_ours / reps;
            p->blas_mean_s = t_blas / reps;
            p->max_rel_diff = mref > 0 ? md / mref : md;
            double flop = 2.0 * n * sh->out * (double)sh->in;
            char dims[32];
            snprintf(dims, sizeof(dims), "[%d,%d]", sh->out, sh->in);
            printf("%-22s %11s %5d %13.2f %13.2f %7.3f %7ld%s\n", sh->name, dims, n,
                   flop / p->ours_s * 1e-9, flop / p->blas_s * 1e-9, p->blas_s / p->ours_s, reps,
                   p->max_rel_diff > 1e-5 ? "  MISMATCH" : "");
            fflush(stdout);
        }
        free(x);
        free(y1);
        free(y2);
        be->ops->weight_free(be, &w);
    }
    double t_all = now_s() - t_start;
    /* geometric mean of the ratios */
    double lg = 0;
    int bad = 0;
    for (int i = 0; i < npts; i++) {
        lg += log(pts[i].blas_s / pts[i].ours_s);
        if (pts[i].max_rel_diff > 1e-5) bad++;
    }
    printf("%d points in %.1f s; geometric-mean ratio ours/OpenBLAS %.3f%s\n", npts, t_all,
           npts ? exp(lg / npts) : 0.0, bad ? "; OUTPUT MISMATCHES (see rows)" : "");

    if (o.json) {
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "backend", be->ops->name);
        cJSON_AddNumberToObject(root, "threads", be->threads);
        cJSON_AddStringToObject(root, "openblas_core", openblas_get_corename());
        cJSON_AddStringToObject(root, "openblas_config", openblas_get_config());
        cJSON_AddNumberToObject(root, "cpu_cores", (double)sysconf(_SC_NPROCESSORS_ONLN));
        cJSON_AddNumberToObject(root, "min_time_s", o.min_time);
        cJSON_AddBoolToObject(root, "quick", o.quick);
        cJSON *arr = cJSON_AddArrayToObject(root, "results");
        for (int i = 0; i < npts; i++) {
            point_t *p = &pts[i];
            double flop = 2.0 * p->n * p->sh->out * (double)p->sh->in;
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "shape", p->sh->name);
            cJSON_AddNumberToObject(e, "out", p->sh->out);
            cJSON_AddNumberToObject(e, "in", p->sh->in);
            cJSON_AddNumberToObject(e, "n", p->n);
            cJSON_AddNumberToObject(e, "ours_s", p->ours_s);
            cJSON_AddNumberToObject(e, "openblas_s", p->blas_s);
            cJSON_AddNumberToObject(e, "ours_mean_s", p->ours_mean_s);
            cJSON_AddNumberToObject(e, "openblas_mean_s", p->blas_mean_s);
            cJSON_AddNumberToObject(e, "ours_gflops", flop / p->ours_s * 1e-9);
            cJSON_AddNumberToObject(e, "openblas_gflops", flop / p->blas_s * 1e-9);
            cJSON_AddNumberToObject(e, "ratio", p->blas_s / p->ours_s);
            cJSON_AddNumberToObject(e, "calls", (double)p->reps);
            cJSON_AddNumberToObject(e, "max_rel_diff", p->max_rel_diff);
            cJSON_AddItemToArray(arr, e);
        }
        char *txt = cJSON_Print(root);
        FILE *f = fopen(o.json, "w");
        if (!f || fputs(txt, f) < 0 || fputc('\n', f) < 0) {
            afd_error("cannot write %s", o.json);
            if (f) fclose(f);
            free(txt);
            cJSON_Delete(root);
            goto out;
        }
        if (fclose(f)) {
            afd_error("cannot write %s", o.json);
            free(txt);
            cJSON_Delete(root);
            goto out;
        }
        free(txt);
        cJSON_Delete(root);
    }
    rc = bad ? 1 : 0;
out:
    free(pts);
    free(ours_t);
    free(blas_t);
    if (be) be->ops->destroy(be);
    afd_opts_free(bench_table, &o);
    return rc;
}
