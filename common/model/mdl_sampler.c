/* mdl_sampler: greedy / temperature / top-k / top-p sampling and log-probabilities. */
#define _GNU_SOURCE
#include "mdl_sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* top_k up to this is drawn from its sorted candidates (the same as from a device's list) */
#define SORTED_TOP_K 1024

struct mdl_sampler {
    int vocab;
    int32_t *idx; /* candidate ids */
    double *p;    /* candidate probabilities */
    float *cl;    /* sorted candidates' logits (SORTED_TOP_K) */
};

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void mdl_rng_seed(mdl_rng_t *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t mdl_rng_next(mdl_rng_t *r)
{
    uint64_t *s = r->s; /* xoshiro256** */
    uint64_t res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return res;
}

double mdl_rng_uniform(mdl_rng_t *r)
{
    return (double)(mdl_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

afd_status_t mdl_sampler_create(int vocab, mdl_sampler_t **out)
{
    mdl_sampler_t *s = calloc(1, sizeof(*s));
    if (!s) return AFD_ERR_NOMEM;
    s->vocab = vocab;
    s->idx = malloc(sizeof(int32_t) * (size_t)vocab);
    s->p = malloc(sizeof(double) * (size_t)vocab);
    s->cl = malloc(sizeof(float) * SORTED_TOP_K);
    if (!s->idx || !s->p || !s->cl) {
        mdl_sampler_destroy(s);
        return AFD_ERR_NOMEM;
    }
    *out = s;
    return AFD_OK;
}

void mdl_sampler_destroy(mdl_sampler_t *s)
{
    if (!s) return;
    free(s->idx);
    free(s->p);
    free(s->cl);
    free(s);
}

afd_status_t mdl_sampling_validate(const mdl_sampling_t *p, const char **why)
{
    if (!(p->temperature >= 0 && p->temperature <= 100)) {
        *why = "temperature must be in [0, 100]";
        return AFD_ERR_RANGE;
    }
    if (!(p->top_p > 0 && p->top_p <= 1)) {
        *why = "top_p must be in (0, 1]";
        return AFD_ERR_RANGE;
    }
    if (p->top_k < 0) {
        *why = "top_k must be >= 0 (0 or -1 disables it)";
        return AFD_ERR_RANGE;
    }
    if (p->logprobs < 0 || p->logprobs > MDL_MAX_LOGPROBS) {
        *why = "logprobs must be in [0, 20]";
        return AFD_ERR_RANGE;
    }
    return AFD_OK;
}

/* larger logit first; ties to the lower id */
static int before(const float *l, int32_t a, int32_t b)
{
    return l[a] > l[b] || (l[a] == l[b] && a < b);
}

/* Moves the m best ids (by `before`) of idx[0..n) to the front, in no particular order. */
static void select_top(const float *l, int32_t *idx, int n, int m)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int32_t pivot = idx[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (before(l, idx[i], pivot))
                i++;
            while (before(l, pivot, idx[j]))
                j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i++] = idx[j];
                idx[j--] = t;
            }
        }
        if (m - 1 <= j)
            hi = j;
        else if (m - 1 >= i)
            lo = i;
        else
            break;
    }
}

static int cmp_desc(const void *a, const void *b, void *ctx)
{
    const float *l = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return before(l, x, y) ? -1 : before(l, y, x) ? 1 : 0;
}

static void sort_desc(const float *l, int32_t *idx, int n)
{
    qsort_r(idx, (size_t)n, sizeof(int32_t), cmp_desc, (void *)l);
}

/* Draws from candidates ids[0..n) sorted best first with logits cl (the row's max mx):
 * the nucleus of top_p first, then one draw in that order. */
static int32_t pick_sorted(mdl_sampler_t *s, const int32_t *ids, const float *cl, int n, float mx,
                           const mdl_sampling_t *p, mdl_rng_t *rng)
{
    int keep = n;
    if (p->top_p < 1.0) {
        double tot = 0, cum = 0;
        for (int i = 0; i < n; i++)
            tot += exp(((double)cl[i] - mx) / p->temperature);
        for (int i = 0; i < n; i++) {
            cum += exp(((double)cl[i] - mx) / p->temperature);
            if (cum >= p->top_p * tot) {
                keep = i + 1;
                break;
            }
        }
    }
    double tot = 0;
    for (int i = 0; i < keep; i++)
        tot += (s->p[i] = exp(((double)cl[i] - mx) / p->temperature));
    double u = mdl_rng_uniform(rng) * tot, cum = 0;
    for (int i = 0; i < keep; i++) {
        cum += s->p[i];
        if (u < cum) return ids[i];
    }
    return ids[keep - 1];
}

static int is_greedy(const mdl_sampling_t *p)
{
    return p->temperature < 1e-6 || p->top_k == 1;
}

static int clamp_logprobs(const mdl_sampling_t *p, int v)
{
    int n = p->logprobs < 0 ? 0 : p->logprobs > MDL_MAX_LOGPROBS ? MDL_MAX_LOGPROBS : p->logprobs;
    return n > v ? v : n;
}

int mdl_sampler_top_enough(const mdl_sampler_t *s, const mdl_sampling_t *p, int n)
{
    if (n < 1 || clamp_logprobs(p, s->vocab) > n) return 0;
    if (is_greedy(p)) return 1;
    return p->top_k > 0 && p->top_k <= n && p->top_k < s->vocab && p->top_k <= SORTED_TOP_K;
}

void mdl_sampler_pick_top(mdl_sampler_t *s, const int32_t *ids, const float *logits, int n,
                          double lse, const mdl_sampling_t *p, mdl_rng_t *rng, mdl_sample_t *out)
{
    int32_t tok = ids[0];
    float lt = logits[0];
    if (!is_greedy(p)) {
        tok = pick_sorted(s, ids, logits, p->top_k < n ? p->top_k : n, logits[0], p, rng);
        for (int i = 0; i < n; i++)
            if (ids[i] == tok) lt = logits[i];
    }
    out->token = tok;
    out->logprob = (float)((double)lt - lse);
    out->ntop = clamp_logprobs(p, n);
    for (int j = 0; j < out->ntop; j++) {
        out->top_ids[j] = ids[j];
        out->top_logprobs[j] = (float)((double)logits[j] - lse);
    }
}

void mdl_sampler_pick(mdl_sampler_t *s, const float *l, const mdl_sampling_t *p, mdl_rng_t *rng,
                      mdl_sample_t *out)
{
    int V = s->vocab;
    float mx = l[0];
    int32_t amax = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > mx) {
            mx = l[i];
            amax = i;
        }
    double sum = 0;
    for (int i = 0; i < V; i++)
        sum += exp((double)l[i] - mx);
    double lse = mx + log(sum);

    int32_t tok = amax;
    int greedy = is_greedy(p);
    if (!greedy && p->top_k > 0 && p->top_k < V && p->top_k <= SORTED_TOP_K) {
        /* the top_k best in order, as a device hands them over (mdl_sampler_pick_top) */
        for (int i = 0; i < V; i++)
            s->idx[i] = i;
        select_top(l, s->idx, V, p->top_k);
        sort_desc(l, s->idx, p->top_k);
        for (int i = 0; i < p->top_k; i++)
            s->cl[i] = l[s->idx[i]];
        tok = pick_sorted(s, s->idx, s->cl, p->top_k, mx, p, rng);
    } else if (!greedy) {
        int n = V;
        for (int i = 0; i < V; i++)
            s->idx[i] = i;
        if (p->top_k > 0 && p->top_k < V) {
            select_top(l, s->idx, V, p->top_k);
            n = p->top_k;
        }
        if (p->top_p < 1.0) {
            /* the nucleus is usually small: try the best 1024 before sorting everything */
            int m = n > 1024 ? 1024 : n;
            for (;;) {
                if (m < n) select_top(l, s->idx, n, m);
                sort_desc(l, s->idx, m);
                double tot = 0, cum = 0;
                for (int i = 0; i < n; i++)
                    tot += exp(((double)l[s->idx[i]] - mx) / p->temperature);
                int keep = m;
                for (int i = 0; i < m; i++) {
                    cum += exp(((double)l[s->idx[i]] - mx) / p->temperature);
                    if (cum >= p->top_p * tot) {
                        keep = i + 1;
                        break;
                    }
                }
                if (cum >= p->top_p * tot || m == n) {
                    n = keep;
                    break;
                }
                m = n; /* not enough mass in the best m: sort all candidates */
            }
        }
        double tot = 0;
        for (int i = 0; i < n; i++)
            tot += (s->p[i] = exp(((double)l[s->idx[i]] - mx) / p->temperature));
        double u = mdl_rng_uniform(rng) * tot, cum = 0;
        tok = s->idx[n - 1];
        for (int i = 0; i < n; i++) {
            cum += s->p[i];
            if (u < cum) {
                tok = s->idx[i];
                break;
            }
        }
    }
    out->token = tok;
    out->logprob = (float)((double)l[tok] - lse);
    out->ntop = clamp_logprobs(p, V);
    if (out->ntop > 0) {
        /* a small insertion list: N <= 20 */
        int cnt = 0;
        for (int32_t i = 0; i < V; i++) {
            if (cnt == out->ntop && !before(l, i, out->top_ids[cnt - 1])) continue;
            int j = cnt < out->ntop ? cnt++ : cnt - 1;
            while (j > 0 && before(l, i, out->top_ids[j - 1])) {
                out->top_ids[j] = out->top_ids[j - 1];
                j--;
            }
            out->top_ids[j] = i;
        }
        for (int j = 0; j < out->ntop; j++)
            out->top_logprobs[j] = (float)((double)l[out->top_ids[j]] - lse);
    }
}
