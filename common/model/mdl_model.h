/*
 * mdl_model: the Step3 weights a role needs, loaded from a checkpoint into a
 * backend, and the forward pieces the daemons and afd_run share:
 *   attention side: embed -> per layer mdl_attn (attention, residual, post-norm,
 *   router top-k) -> mdl_final (final norm, lm_head)
 *   FFN side: per layer mdl_ffn (this node's experts + its slice of the shared
 *   expert or dense MLP) -> a partial output the attention side sums.
 */
#ifndef MDL_MODEL_H
#define MDL_MODEL_H

#include "kn_ops.h"
#include "mdl_config.h"
#include "mdl_st.h"

/* What to load. attn and ffn may both be set (the single-process runner). */
typedef struct mdl_role {
    int attn;
    int ffn;
    int ffn_index; /* this FFN node's share i of ffn_count */
    int ffn_count;
    /* tensor parallel inside the node: this rank holds the intermediate slice tp_index of
     * tp_count of every expert, shared expert and dense MLP of the share (0: one rank).
     * The ranks' outputs sum to the share's output. */
    int tp_index;
    int tp_count;
} mdl_role_t;

typedef struct mdl_attn_layer {
    float *in_norm;     /* (H) */
    float *inter_norm;  /* (share_q) */
    float *post_norm;   /* (H) */
    kn_weight_t q_proj; /* [share_q, H] */
    kn_weight_t wq;     /* [heads * head_dim, share_q] */
    kn_weight_t k_proj; /* [head_dim, H] */
    kn_weight_t v_proj; /* [head_dim, H] */
    kn_weight_t o_proj; /* [H, heads * head_dim] */
    kn_weight_t router; /* [E, H], MoE layers only */
} mdl_attn_layer_t;

typedef struct mdl_ffn_layer {
    int is_moe;
    /* dense MLP (dense layers) or shared expert (MoE layers): the intermediate slice
     * [i0, i1) of this node */
    int i0, i1;
    kn_weight_t gate, up; /* [i1 - i0, H] */
    kn_weight_t down;     /* [H, i1 - i0] */
    /* local experts [e0, e1) of MoE layers, their intermediate slice [ei0, ei1) (all of
     * moe_inter unless tensor parallel) */
    int e0, e1;
    int ei0, ei1;
    kn_weight_t *egate, *eup; /* [ei1 - ei0, H] each */
    kn_weight_t *edown;       /* [H, ei1 - ei0] each */
} mdl_ffn_layer_t;

typedef struct mdl_model {
    mdl_config_t cfg;
    kn_backend_t *be;
    mdl_role_t role;
    kn_weight_t embed;      /* [vocab, H] */
    float *final_norm;      /* (H) */
    kn_weight_t lm_head;    /* [vocab, H] */
    mdl_attn_layer_t *attn; /* (layers) when role.attn */
    mdl_ffn_layer_t *ffn;   /* (layers) when role.ffn */
    uint64_t bytes_loaded;  /* checkpoint bytes this role read */
} mdl_model_t;

/* The expert range [e0, e1) and intermediate slice of share i of n. */
void mdl_role_experts(const mdl_config_t *cfg, int i, int n, int *e0, int *e1);
void mdl_role_slice(int dim, int i, int n, int *d0, int *d1);
/* Like mdl_role_slice, in whole units of `align` when dim is made of at least n of them
 * (tensor-parallel slices keep fp8 128x128 blocks whole). */
void mdl_role_slice_aligned(int dim, int i, int n, int align, int *d0, int *d1);

/*
 * Loads the tensors the role needs from ck into be: only those bytes are read (fused
 * expert tensors are sliced to the expert range). Each tensor's dtype and shape are
 * checked; errors name the file and tensor. progress: print bytes and percent on
 * stderr while loading (for a TTY).
 */
afd_status_t mdl_model_load(const mdl_ckpt_t *ck, const mdl_config_t *cfg, kn_backend_t *be,
                            const mdl_role_t *role, int progress, mdl_model_t **out);
void mdl_model_free(mdl_model_t *m);

/* Scratch space for the forward pieces, grown to the largest batch seen; only the
 * buffers of the model's role are allocated. be: the backend the pieces run on with this
 * workspace (NULL: the model's; else one of its kn_fork siblings, e.g. a stream per
 * micro-batch); set it before the first mdl_ws_reserve. */
typedef struct mdl_ws {
    kn_backend_t *be;
    int cap;                                  /* tokens */
    float *h, *ql, *q, *k, *v, *o, *logits_r; /* attention side */
    float *xe, *ge, *ue, *ye; /* FFN side: routed rows sorted by expert, expert work */
    int32_t *rows, *pos;      /* backend copies of indices */
    float *rw;                /* routing weight of each sorted row */
    int32_t *h_rows;          /* host: the sorted rows, their weights, expert offsets */
    float *h_w;
    int32_t *h_off;
} mdl_ws_t;

afd_status_t mdl_ws_reserve(const mdl_model_t *m, mdl_ws_t *ws, int ntok);
void mdl_ws_free(const mdl_model_t *m, mdl_ws_t *ws);

/* A batch of sequences, each with ntok new tokens, laid out consecutively. */
typedef struct mdl_batch {
    int nseq, ntok;
    const int32_t *tokens; /* (ntok) host */
    const int32_t *pos;    /* (ntok) host: each token's position */
    const kn_seq_t *seqs;  /* (nseq) */
    int prepared;          /* mdl_attn_prepare ran for this batch (positions are on the
                            * backend); the caller keeps pos and seqs as they are meanwhile */
} mdl_batch_t;

/*
 * What every layer's mdl_attn of a batch shares, done once: the positions uploaded, and
 * on backends with batch_prepare the KV slots, block tables and context lengths too. Sets
 * b->prepared. Returns 1 when the backend prepared its tables (every sequence decodes one
 * token), with *shape the signature of the layer's launch shapes (what a graph of the
 * layer depends on besides the buffers), else 0.
 */
int mdl_attn_prepare(const mdl_model_t *m, mdl_ws_t *ws, const kn_kv_t *kv, mdl_batch_t *b,
                     uint64_t *shape);

/* x (ntok, H) <- embedding rows of the batch tokens */
void mdl_embed(const mdl_model_t *m, mdl_ws_t *ws, const mdl_batch_t *b, float *x);
/*
 * One layer's attention half for the batch: writes K,V into the cache, x <- x + attn(x);
 * g (ntok, H) <- post-attention RMSNorm(x); for MoE layers ids/weights (ntok, top_k)
 * (backend memory) <- router top-k of g.
 */
void mdl_attn(const mdl_model_t *m, mdl_ws_t *ws, int layer, const kn_kv_t *kv,
              const mdl_batch_t *b, float *x, float *g, int32_t *ids, float *weights);
/*
 * One layer's FFN half on this node's share: out (n, H) <- sum over local experts of
 * weight * expert(g) + shared/dense slice(g). ids/weights are host arrays (n, top_k)
 * for MoE layers.
 */
void mdl_ffn(const mdl_model_t *m, mdl_ws_t *ws, int layer, const float *g, int n,
             const int32_t *ids, const float *weights, float *out);
/* logits (nrows, vocab) <- lm_head(RMSNorm_final(x[rows[i]])), rows host indices */
void mdl_final(const mdl_model_t *m, mdl_ws_t *ws, const float *x, const int32_t *rows, int nrows,
               float *logits);

#endif
