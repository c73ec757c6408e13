/*
 * mdl_sampler: next-token selection from logits: greedy, temperature, top-k,
 * top-p, seeded (reproducible per request), with log-probabilities of the chosen
 * token and the top-N tokens of the model's own (untempered) distribution.
 */
#ifndef MDL_SAMPLER_H
#define MDL_SAMPLER_H

#include "afd_status.h"

#include <stdint.h>

#define MDL_MAX_LOGPROBS 20

typedef struct mdl_sampling {
    double temperature; /* 0: greedy */
    double top_p;       /* (0, 1]; 1: off */
    int top_k;          /* 0: off */
    uint64_t seed;
    int logprobs; /* top-N log-probabilities to report, 0..MDL_MAX_LOGPROBS */
} mdl_sampling_t;

typedef struct mdl_rng {
    uint64_t s[4];
} mdl_rng_t;

void mdl_rng_seed(mdl_rng_t *r, uint64_t seed);
uint64_t mdl_rng_next(mdl_rng_t *r);
/* Uniform in [0, 1). */
double mdl_rng_uniform(mdl_rng_t *r);

typedef struct mdl_sample {
    int32_t token;
    float logprob; /* of token under the model's distribution */
    int ntop;
    int32_t top_ids[MDL_MAX_LOGPROBS];
    float top_logprobs[MDL_MAX_LOGPROBS];
} mdl_sample_t;

typedef struct mdl_sampler mdl_sampler_t;

afd_status_t mdl_sampler_create(int vocab, mdl_sampler_t **out);
void mdl_sampler_destroy(mdl_sampler_t *s);
/* Checks a request's parameters; errors describe the field. */
afd_status_t mdl_sampling_validate(const mdl_sampling_t *p, const char **why);
/* Picks the next token from logits (vocab floats). */
void mdl_sampler_pick(mdl_sampler_t *s, const float *logits, const mdl_sampling_t *p,
                      mdl_rng_t *rng, mdl_sample_t *out);

/*
 * Picking from a row's best candidates only, for backends that keep the logits on the
 * device (kn_ops logits_top): ids/logits are the row's n best by (logit descending, id
 * ascending) and lse its log-sum-exp. The pick equals mdl_sampler_pick on the whole row
 * (the same candidates in the same order, the same random draw) whenever
 * mdl_sampler_top_enough says the request needs no more than n candidates: greedy, or a
 * top_k of at most n, and at most n log-probabilities.
 */
int mdl_sampler_top_enough(const mdl_sampler_t *s, const mdl_sampling_t *p, int n);
void mdl_sampler_pick_top(mdl_sampler_t *s, const int32_t *ids, const float *logits, int n,
                          double lse, const mdl_sampling_t *p, mdl_rng_t *rng, mdl_sample_t *out);

#endif
