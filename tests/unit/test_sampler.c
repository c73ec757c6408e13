/*
 * test_sampler: common/model/mdl_sampler.h.
 *   - greedy (temperature 0, and top_k = 1 at any temperature) is the argmax, ties to the
 *     lower id;
 *   - the chosen token's logprob is the untempered log-softmax computed here in double;
 *   - top-N lists: sorted, ties to the lower id, equal to a full sort done here;
 *   - top_k = K: every sampled id is among the K best; top_p = P: every sampled id lies in
 *     the smallest prefix of the (tempered) sorted distribution with mass >= P;
 *   - empirical frequencies of 200k draws at temperature 1 and 0.5 against the softmax of
 *     logits / T (chi-square and a per-token 5-sigma bound, justified at check_freqs);
 *   - same seed reproduces, different seeds differ; the rng is uniform in [0, 1);
 *   - mdl_sampling_validate rejects bad values;
 *   - vocab 128815 with top_p 0.9 and near-uniform logits (nucleus > 1024: the fallback
 *     that sorts everything), and a peaked one (nucleus < 1024: the fast path);
 *   - picking from a row's 64 best candidates (what a device hands over) equals picking
 *     from the whole row, token, logprob and top lists bit for bit, for every request
 *     mdl_sampler_top_enough accepts; and it refuses those that need more.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "mdl_sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define assert_near(a, b, tol)                                                                     \
    do {                                                                                           \
        double a_ = (a), b_ = (b), t_ = (tol);                                                     \
        if (!(fabs(a_ - b_) <= t_)) fail_msg("%s = %.9g, want %.9g +- %.3g", #a, a_, b_, t_);      \
    } while (0)

static mdl_rng_t g_gen; /* generates the test data; separate from the sampler's rng */

static double unif(void)
{
    return mdl_rng_uniform(&g_gen);
}

static double gauss(void)
{
    double u = unif(), v = unif();
    return sqrt(-2 * log(1 - u)) * cos(2 * M_PI * v);
}

static mdl_sampling_t params(double t, double top_p, int top_k, int logprobs)
{
    mdl_sampling_t p = {
        .temperature = t, .top_p = top_p, .top_k = top_k, .seed = 1, .logprobs = logprobs};
    return p;
}

/* log-softmax of logits / temp in double */
static void log_softmax(const float *l, int V, double temp, double *out)
{
    double mx = -INFINITY, s = 0;
    for (int i = 0; i < V; i++)
        mx = fmax(mx, l[i] / temp);
    for (int i = 0; i < V; i++)
        s += exp(l[i] / temp - mx);
    for (int i = 0; i < V; i++)
        out[i] = l[i] / temp - mx - log(s);
}

static const float *g_sort_l;
static int by_logit(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (g_sort_l[x] != g_sort_l[y]) return g_sort_l[x] > g_sort_l[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* ids sorted by logit, descending, ties to the lower id */
static int32_t *sorted_ids(const float *l, int V)
{
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)V);
    for (int i = 0; i < V; i++)
        ids[i] = i;
    g_sort_l = l;
    qsort(ids, (size_t)V, sizeof(int32_t), by_logit);
    return ids;
}

/*
 * Marks the nucleus: the smallest prefix of the sorted tempered distribution with mass
 * >= top_p. Returns its size; fails when P lies within 1e-9 of a prefix mass (the set would
 * then depend on rounding, so the test data must avoid it).
 */
static int nucleus(const float *l, int V, double temp, double top_p, uint8_t *in)
{
    double *lp = malloc(sizeof(double) * (size_t)V);
    int32_t *ids = sorted_ids(l, V);
    log_softmax(l, V, temp, lp);
    double cum = 0;
    int k = 0;
    memset(in, 0, (size_t)V);
    while (k < V) {
        cum += exp(lp[ids[k]]);
        assert_true(fabs(cum - top_p) > 1e-9);
        in[ids[k++]] = 1;
        if (cum >= top_p) break;
    }
    free(lp);
    free(ids);
    return k;
}

static void test_greedy(void **state)
{
    (void)state;
    enum { V = 50 };
    float l[V];
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    mdl_rng_seed(&g_gen, 1);
    mdl_rng_t rng;
    mdl_rng_seed(&rng, 7);
    mdl_sample_t out;
    for (int trial = 0; trial < 200; trial++) {
        for (int i = 0; i < V; i++)
            l[i] = (float)(gauss() * 3);
        int want = 0;
        for (int i = 1; i < V; i++)
            if (l[i] > l[want]) want = i;
        mdl_sampling_t p = params(0, 1, 0, 0);
        mdl_sampler_pick(s, l, &p, &rng, &out);
        assert_int_equal(out.token, want);
        p = params(1.0 + trial % 3, 0.5, 1, 0); /* top_k 1 at any temperature */
        mdl_sampler_pick(s, l, &p, &rng, &out);
        assert_int_equal(out.token, want);
    }
    /* ties to the lower id, wherever the ties are */
    for (int i = 0; i < V; i++)
        l[i] = 0;
    mdl_sampling_t p = params(0, 1, 0, 0);
    mdl_sampler_pick(s, l, &p, &rng, &out);
    assert_int_equal(out.token, 0);
    l[17] = l[31] = l[44] = 2.5f;
    mdl_sampler_pick(s, l, &p, &rng, &out);
    assert_int_equal(out.token, 17);
    p = params(0.8, 1, 1, 0);
    mdl_sampler_pick(s, l, &p, &rng, &out);
    assert_int_equal(out.token, 17);
    l[0] = l[V - 1] = 2.5f;
    p = params(0, 1, 0, 0);
    mdl_sampler_pick(s, l, &p, &rng, &out);
    assert_int_equal(out.token, 0);
    /* negative logits and -inf entries */
    for (int i = 0; i < V; i++)
        l[i] = -100.0f - i;
    l[3] = -INFINITY;
    l[30] = -50.0f;
    mdl_sampler_pick(s, l, &p, &rng, &out);
    assert_int_equal(out.token, 30);
    mdl_sampler_destroy(s);
}

/* logprob tolerance: the result is a float, |logprob| < 40 here, so 2^-24 * 40 ~ 2.4e-6;
 * the library sums exp in double, so 1e-5 leaves room for float rounding of the inputs. */
#define LP_TOL 1e-5

static void test_logprobs(void **state)
{
    (void)state;
    enum { V = 64 };
    float l[V];
    double lp[V];
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    mdl_rng_seed(&g_gen, 2);
    mdl_rng_t rng;
    mdl_rng_seed(&rng, 8);
    for (int trial = 0; trial < 100; trial++) {
        for (int i = 0; i < V; i++)
            l[i] = (float)(gauss() * 4);
        if (trial % 5 == 0) l[trial % V] = l[(trial + 1) % V]; /* some exact ties */
        if (trial % 7 == 0)
            for (int i = 0; i < V; i += 3)
                l[i] = 1.0f; /* many ties */
        log_softmax(l, V, 1.0, lp);
        int32_t *ids = sorted_ids(l, V);
        int N = 1 + trial % MDL_MAX_LOGPROBS;
        /* the logprobs reported are those of the model, whatever the sampling temperature */
        mdl_sampling_t p = params(trial % 2 ? 0.0 : 0.7 + (trial % 4), 1, 0, N);
        mdl_sample_t out;
        mdl_sampler_pick(s, l, &p, &rng, &out);
        assert_true(out.token >= 0 && out.token < V);
        assert_near(out.logprob, lp[out.token], LP_TOL);
        assert_int_equal(out.ntop, N);
        for (int j = 0; j < N; j++) {
            if (out.top_ids[j] != ids[j])
                fail_msg("trial %d: top %d is %d (logit %g), want %d (logit %g)", trial, j,
                         out.top_ids[j], l[out.top_ids[j]], ids[j], l[ids[j]]);
            assert_near(out.top_logprobs[j], lp[ids[j]], LP_TOL);
            if (j) assert_true(out.top_logprobs[j] <= out.top_logprobs[j - 1]);
        }
        free(ids);
    }
    /* no logprobs requested; more than the vocabulary */
    mdl_sampling_t p = params(0, 1, 0, 0);
    mdl_sample_t out;
    mdl_sampler_pick(s, l, &p, &rng, &out);
    assert_int_equal(out.ntop, 0);
    mdl_sampler_destroy(s);

    enum { W = 5 };
    float m[W] = {0.5f, 2.0f, 2.0f, -1.0f, 0.5f};
    assert_int_equal(mdl_sampler_create(W, &s), AFD_OK);
    p = params(0, 1, 0, MDL_MAX_LOGPROBS);
    mdl_sampler_pick(s, m, &p, &rng, &out);
    assert_int_equal(out.ntop, W);
    const int32_t want[W] = {1, 2, 0, 4, 3};
    for (int j = 0; j < W; j++)
        assert_int_equal(out.top_ids[j], want[j]);
    double sum = 0;
    for (int j = 0; j < W; j++)
        sum += exp(out.top_logprobs[j]);
    assert_near(sum, 1.0, 1e-6); /* all of the vocabulary: the probabilities sum to 1 */
    mdl_sampler_destroy(s);
}

static void test_top_k(void **state)
{
    (void)state;
    enum { V = 40 };
    float l[V];
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    mdl_rng_seed(&g_gen, 3);
    mdl_rng_t rng;
    mdl_rng_seed(&rng, 9);
    for (int trial = 0; trial < 12; trial++) {
        /* a flat distribution so that ids outside the K best would be drawn often */
        for (int i = 0; i < V; i++)
            l[i] = (float)(gauss() * 0.3);
        if (trial % 3 == 0) l[5] = l[6] = l[7] = l[8] = 0.25f; /* ties at the border */
        int K = 2 + trial % 7;
        int32_t *ids = sorted_ids(l, V);
        uint8_t best[V] = {0};
        for (int j = 0; j < K; j++)
            best[ids[j]] = 1;
        int seen[V] = {0};
        mdl_sampling_t p = params(1.5, 1, K, 0);
        for (int d = 0; d < 4000; d++) {
            mdl_sample_t out;
            mdl_sampler_pick(s, l, &p, &rng, &out);
            if (!best[out.token]) fail_msg("top_k %d: drew %d, not among the best", K, out.token);
            seen[out.token]++;
        }
        for (int j = 0; j < K; j++)
            assert_true(seen[ids[j]] > 0); /* each of the K is drawn */
        free(ids);
    }
    /* top_k >= V is no restriction */
    for (int i = 0; i < V; i++)
        l[i] = 0;
    int seen[V] = {0};
    mdl_sampling_t p = params(1, 1, V + 5, 0);
    for (int d = 0; d < 4000; d++) {
        mdl_sample_t out;
        mdl_sampler_pick(s, l, &p, &rng, &out);
        seen[out.token]++;
    }
    for (int i = 0; i < V; i++)
        assert_true(seen[i] > 0);
    mdl_sampler_destroy(s);
}

static void test_top_p(void **state)
{
    (void)state;
    enum { V = 60 };
    float l[V];
    uint8_t in[V];
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    mdl_rng_seed(&g_gen, 4);
    mdl_rng_t rng;
    mdl_rng_seed(&rng, 10);
    const double ps[] = {0.05, 0.3, 0.5, 0.77, 0.9, 0.99};
    const double ts[] = {1.0, 0.6, 2.0};
    for (size_t pi = 0; pi < sizeof(ps) / sizeof(ps[0]); pi++)
        for (size_t ti = 0; ti < 3; ti++) {
            for (int i = 0; i < V; i++)
                l[i] = (float)(gauss() * 1.5);
            int n = nucleus(l, V, ts[ti], ps[pi], in);
            int K = (pi + ti) % 2 ? 0 : 30; /* also combined with top_k */
            if (K) {                        /* with top_k, the nucleus is taken inside the K best */
                int32_t *ids = sorted_ids(l, V);
                float l2[V];
                for (int i = 0; i < V; i++)
                    l2[i] = -INFINITY;
                for (int j = 0; j < K; j++)
                    l2[ids[j]] = l[ids[j]];
                n = nucleus(l2, V, ts[ti], ps[pi], in);
                free(ids);
            }
            int seen[V] = {0};
            mdl_sampling_t p = params(ts[ti], ps[pi], K, 0);
            for (int d = 0; d < 3000; d++) {
                mdl_sample_t out;
                mdl_sampler_pick(s, l, &p, &rng, &out);
                if (!in[out.token])
                    fail_msg("top_p %g T %g: drew %d outside the nucleus of %d", ps[pi], ts[ti],
                             out.token, n);
                seen[out.token]++;
            }
            int distinct = 0;
            for (int i = 0; i < V; i++)
                distinct += seen[i] > 0;
            assert_true(distinct <= n);
            assert_true(distinct >= (n < 4 ? n : n / 2)); /* the nucleus is actually sampled */
        }
    mdl_sampler_destroy(s);
}

/*
 * Frequencies of N draws against probabilities p. Each count is Binomial(N, p_i): sd =
 * sqrt(N p_i (1 - p_i)). (1) |count - N p_i| <= 5 sd + 1 for every i: a correct sampler
 * fails this with probability < V * 5.7e-7 (normal tail; +1 covers tiny p_i). (2) Pearson's
 * X^2 over the V categories is below the 1e-6 upper quantile of chi-square with V - 1
 * degrees of freedom (44.81 for V = 10). The seeds are fixed, so the test is deterministic;
 * these bounds only say a correct implementation passes for essentially every seed.
 */
static void check_freqs(const int *count, const double *p, int V, int N, double chi2_crit)
{
    double x2 = 0;
    for (int i = 0; i < V; i++) {
        double e = N * p[i], sd = sqrt(N * p[i] * (1 - p[i]));
        if (fabs(count[i] - e) > 5 * sd + 1)
            fail_msg("token %d: %d draws, expected %.1f (sd %.1f)", i, count[i], e, sd);
        if (e > 0)
            x2 += (count[i] - e) * (count[i] - e) / e;
        else
            assert_int_equal(count[i], 0);
    }
    print_message("chi-square %.2f (critical %.2f, %d dof)\n", x2, chi2_crit, V - 1);
    assert_true(x2 < chi2_crit);
}

static void draw_counts(mdl_sampler_t *s, const float *l, double temp, int N, uint64_t seed,
                        int *count, int V)
{
    mdl_rng_t rng;
    mdl_rng_seed(&rng, seed);
    memset(count, 0, sizeof(int) * (size_t)V);
    mdl_sampling_t p = params(temp, 1, 0, 0);
    for (int d = 0; d < N; d++) {
        mdl_sample_t out;
        mdl_sampler_pick(s, l, &p, &rng, &out);
        count[out.token]++;
    }
}

static void test_frequencies(void **state)
{
    (void)state;
    enum { V = 10, N = 200000 };
    const float l[V] = {1.0f, 0.5f, -0.3f, 2.0f, 1.9f, -2.0f, 0.0f, 0.7f, -1.0f, 1.2f};
    double lp[V], p1[V], p05[V];
    int c1[V], c05[V];
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    log_softmax(l, V, 1.0, lp);
    for (int i = 0; i < V; i++)
        p1[i] = exp(lp[i]);
    log_softmax(l, V, 0.5, lp);
    for (int i = 0; i < V; i++)
        p05[i] = exp(lp[i]);
    draw_counts(s, l, 1.0, N, 12345, c1, V);
    check_freqs(c1, p1, V, N, 44.81);
    draw_counts(s, l, 0.5, N, 54321, c05, V);
    check_freqs(c05, p05, V, N, 44.81);
    /* sharpening: p05_i = p1_i^2 / sum_j p1_j^2, so the best token gains and the tail loses */
    double sq = 0;
    for (int i = 0; i < V; i++)
        sq += p1[i] * p1[i];
    for (int i = 0; i < V; i++)
        assert_near(p05[i], p1[i] * p1[i] / sq, 1e-12);
    assert_true(c05[3] > c1[3] + 10000);
    assert_true(c05[5] < c1[5]);
    mdl_sampler_destroy(s);
}

static void test_reproducible(void **state)
{
    (void)state;
    enum { V = 100, N = 1000 };
    float l[V];
    mdl_rng_seed(&g_gen, 5);
    for (int i = 0; i < V; i++)
        l[i] = (float)(gauss() * 0.5);
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    static int32_t a[N], b[N], c[N];
    mdl_sampling_t p = params(1.0, 0.95, 50, 3);
    for (int run = 0; run < 3; run++) {
        mdl_rng_t rng;
        mdl_rng_seed(&rng, run == 2 ? 43 : 42);
        int32_t *dst = run == 0 ? a : run == 1 ? b : c;
        for (int d = 0; d < N; d++) {
            mdl_sample_t out;
            mdl_sampler_pick(s, l, &p, &rng, &out);
            dst[d] = out.token;
        }
    }
    assert_memory_equal(a, b, sizeof(a));
    int differ = 0;
    for (int d = 0; d < N; d++)
        differ += a[d] != c[d];
    assert_true(differ > N / 2); /* ~1 - sum p^2 of the draws differ; p is spread here */

    /* the rng itself: same seed same stream, uniform in [0, 1) with the right mean */
    mdl_rng_t r1, r2;
    mdl_rng_seed(&r1, 99);
    mdl_rng_seed(&r2, 99);
    double sum = 0;
    for (int i = 0; i < 100000; i++) {
        double u = mdl_rng_uniform(&r1);
        assert_true(u >= 0 && u < 1);
        assert_true(u == mdl_rng_uniform(&r2));
        sum += u;
    }
    /* mean of 1e5 uniforms: sd = sqrt(1/12 / 1e5) = 9.1e-4; 5 sd = 4.6e-3 */
    assert_near(sum / 100000, 0.5, 4.6e-3);
    mdl_rng_seed(&r2, 100);
    assert_true(mdl_rng_next(&r1) != mdl_rng_next(&r2));
    mdl_sampler_destroy(s);
}

static void test_validate(void **state)
{
    (void)state;
    const char *why = NULL;
    mdl_sampling_t ok[] = {params(0, 1, 0, 0), params(100, 1e-9, 1, 20), params(0.7, 0.95, 50, 5)};
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(mdl_sampling_validate(&ok[i], &why), AFD_OK);
    mdl_sampling_t bad[] = {
        params(-0.1, 1, 0, 0),
        params(100.5, 1, 0, 0),
        params(NAN, 1, 0, 0),
        params(INFINITY, 1, 0, 0),
        params(1, 0, 0, 0),
        params(1, -0.5, 0, 0),
        params(1, 1.0001, 0, 0),
        params(1, NAN, 0, 0),
        params(1, 1, -2, 0),
        params(1, 1, 0, -1),
        params(1, 1, 0, MDL_MAX_LOGPROBS + 1),
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        why = NULL;
        assert_int_equal(mdl_sampling_validate(&bad[i], &why), AFD_ERR_RANGE);
        assert_non_null(why);
    }
}

/* a Step3-size vocabulary with top_p 0.9 */
static void test_large_vocab(void **state)
{
    (void)state;
    enum { V = 128815 };
    float *l = malloc(sizeof(float) * V);
    uint8_t *in = malloc(V);
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    mdl_rng_seed(&g_gen, 6);
    mdl_rng_t rng;
    mdl_rng_seed(&rng, 11);
    /* near-uniform logits: the nucleus holds ~90% of the vocabulary, far above 1024 */
    for (int i = 0; i < V; i++)
        l[i] = (float)(unif() * 0.05);
    int n = nucleus(l, V, 1.0, 0.9, in);
    assert_true(n > 1024);
    mdl_sampling_t p = params(1.0, 0.9, 0, 5);
    double lp0 = 0;
    {
        double mx = 0, sm = 0;
        for (int i = 0; i < V; i++)
            mx = fmax(mx, l[i]);
        for (int i = 0; i < V; i++)
            sm += exp(l[i] - mx);
        lp0 = mx + log(sm);
    }
    int outside_best = 0, deep = 0;
    int32_t *order = sorted_ids(l, V);
    int32_t *rank = malloc(sizeof(int32_t) * V);
    for (int j = 0; j < V; j++)
        rank[order[j]] = j;
    for (int d = 0; d < 12; d++) { /* each draw sorts the whole vocabulary: keep it short */
        mdl_sample_t out;
        mdl_sampler_pick(s, l, &p, &rng, &out);
        if (!in[out.token]) fail_msg("drew %d outside the nucleus of %d", out.token, n);
        assert_near(out.logprob, l[out.token] - lp0, LP_TOL);
        assert_int_equal(out.ntop, 5);
        outside_best += out.token != out.top_ids[0];
        deep += rank[out.token] >= 1024;
    }
    assert_true(outside_best > 8);
    /* the whole nucleus is reachable, not only the best 1024: a draw lands beyond rank 1024
     * with probability ~ 1 - 1024 / n > 0.99, so at least 8 of 12 do for a correct sampler */
    assert_true(deep >= 8);
    free(order);
    free(rank);
    /* peaked: 200 strong tokens carry > 90%: the nucleus is found among the best 1024 */
    for (int i = 0; i < V; i++)
        l[i] = (float)(unif() * 0.05);
    for (int i = 0; i < 200; i++)
        l[(i * 641) % V] = 12.0f + (float)(unif());
    n = nucleus(l, V, 1.0, 0.9, in);
    assert_true(n > 1 && n <= 200);
    p = params(1.0, 0.9, 0, 0);
    for (int d = 0; d < 50; d++) {
        mdl_sample_t out;
        mdl_sampler_pick(s, l, &p, &rng, &out);
        if (!in[out.token]) fail_msg("peaked: drew %d outside the nucleus of %d", out.token, n);
    }
    /* top_k 2000 (above 1024) with top_p on the near-uniform logits */
    for (int i = 0; i < V; i++)
        l[i] = (float)(unif() * 0.05);
    int32_t *ids = sorted_ids(l, V);
    float *l2 = malloc(sizeof(float) * V);
    for (int i = 0; i < V; i++)
        l2[i] = -INFINITY;
    for (int j = 0; j < 2000; j++)
        l2[ids[j]] = l[ids[j]];
    n = nucleus(l2, V, 1.0, 0.9, in);
    assert_true(n > 1024 && n < 2000);
    p = params(1.0, 0.9, 2000, 0);
    for (int d = 0; d < 40; d++) {
        mdl_sample_t out;
        mdl_sampler_pick(s, l, &p, &rng, &out);
        if (!in[out.token]) fail_msg("top_k 2000: drew %d outside the nucleus of %d", out.token, n);
    }
    free(l2);
    free(ids);
    free(l);
    free(in);
    mdl_sampler_destroy(s);
}

static int cand_before(const float *l, int32_t a, int32_t b)
{
    return l[a] > l[b] || (l[a] == l[b] && a < b);
}

static void test_pick_top(void **state)
{
    (void)state;
    enum { V = 5000, N = 64 };
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(V, &s), AFD_OK);
    float *l = malloc(sizeof(float) * V);
    int32_t ids[N];
    float cl[N];
    int checked = 0;
    for (int trial = 0; trial < 12; trial++) {
        for (int i = 0; i < V; i++) /* quantised: ties in the head of the distribution */
            l[i] = (float)(round(gauss() * (trial % 2 ? 8 : 2)) / 4.0);
        /* the best N by (logit desc, id asc), by insertion, and the row's lse as pick has it */
        int cnt = 0;
        for (int32_t i = 0; i < V; i++) {
            if (cnt == N && !cand_before(l, i, ids[N - 1])) continue;
            int j = cnt < N ? cnt++ : N - 1;
            while (j > 0 && cand_before(l, i, ids[j - 1])) {
                ids[j] = ids[j - 1];
                j--;
            }
            ids[j] = i;
        }
        for (int j = 0; j < N; j++)
            cl[j] = l[ids[j]];
        double sum = 0;
        for (int i = 0; i < V; i++)
            sum += exp((double)l[i] - cl[0]);
        double lse = cl[0] + log(sum);
        static const int ks[] = {0, 1, 2, 5, 20, 40, 64, 65, 2000};
        static const double tps[] = {1.0, 0.9, 0.5, 0.05}, temps[] = {0, 0.5, 1.0, 1.7};
        for (size_t a = 0; a < sizeof(ks) / sizeof(ks[0]); a++)
            for (size_t b = 0; b < 4; b++)
                for (size_t c = 0; c < 4; c++) {
                    mdl_sampling_t p = params(temps[c], tps[b], ks[a], (int)((a + b + c) % 4) * 7);
                    p.logprobs = p.logprobs > MDL_MAX_LOGPROBS ? MDL_MAX_LOGPROBS : p.logprobs;
                    int greedy = temps[c] == 0 || ks[a] == 1;
                    int want = greedy || (ks[a] > 0 && ks[a] <= N);
                    assert_int_equal(mdl_sampler_top_enough(s, &p, N), want);
                    if (!want) continue;
                    for (uint64_t seed = 1; seed <= 3; seed++) {
                        mdl_rng_t r1, r2;
                        mdl_rng_seed(&r1, seed * 77 + trial);
                        mdl_rng_seed(&r2, seed * 77 + trial);
                        mdl_sample_t full, top;
                        mdl_sampler_pick(s, l, &p, &r1, &full);
                        mdl_sampler_pick_top(s, ids, cl, N, lse, &p, &r2, &top);
                        if (full.token != top.token || full.logprob != top.logprob ||
                            full.ntop != top.ntop)
                            fail_msg("k %d top_p %g T %g: whole row %d (%g), best %d: %d (%g)",
                                     ks[a], tps[b], temps[c], full.token, (double)full.logprob, N,
                                     top.token, (double)top.logprob);
                        assert_memory_equal(full.top_ids, top.top_ids, 4 * (size_t)full.ntop);
                        assert_memory_equal(full.top_logprobs, top.top_logprobs,
                                            4 * (size_t)full.ntop);
                        assert_true(mdl_rng_next(&r1) == mdl_rng_next(&r2)); /* same draws */
                        checked++;
                    }
                }
    }
    assert_true(checked > 1000);
    /* more log-probabilities than candidates: the whole row is needed */
    mdl_sampling_t p = params(0, 1.0, 0, 20);
    assert_false(mdl_sampler_top_enough(s, &p, 10));
    assert_true(mdl_sampler_top_enough(s, &p, 20));
    free(l);
    mdl_sampler_destroy(s);
}

int main(void)
{
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_frequencies),
        cmocka_unit_test(test_reproducible),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_large_vocab),
        cmocka_unit_test(test_pick_top),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, NULL, NULL);
}
