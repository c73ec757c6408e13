/*
 * mdl_runner: one whole forward step of the model in one process (attention and
 * FFN halves back to back), with the A2F/F2A wire roundings applied at the same
 * points the cluster applies them, so the single-process runner and the cluster
 * compute the same function.
 */
#ifndef MDL_RUNNER_H
#define MDL_RUNNER_H

#include "mdl_kv.h"
#include "mdl_model.h"

typedef struct mdl_runner {
    const mdl_model_t *m;
    mdl_ws_t ws;
    afd_dtype_t a2f, f2a; /* wire precisions: rounding applied to g and to the FFN output */
    float *x, *g, *part;  /* (cap, H) backend */
    int32_t *ids;         /* (cap, top_k) backend */
    float *wts;
    int32_t *h_ids; /* host copies for the FFN half */
    float *h_wts;
    int cap;
    double attn_s, ffn_s; /* time spent in the attention and FFN halves (benchmarks) */
} mdl_runner_t;

afd_status_t mdl_runner_init(mdl_runner_t *r, const mdl_model_t *m, afd_dtype_t a2f,
                             afd_dtype_t f2a);
void mdl_runner_fini(mdl_runner_t *r);
/*
 * Runs the batch through every layer; logits (nrows, vocab) host memory for the batch
 * tokens at rows[] (host indices into the batch).
 */
afd_status_t mdl_runner_step(mdl_runner_t *r, const kn_kv_t *kv, const mdl_batch_t *b,
                             const int32_t *rows, int nrows, float *logits);

#endif
