/*
 * afd_plan: the pipeline sizing rules the coordinator (and the planner) use.
 */
#ifndef AFD_PLAN_H
#define AFD_PLAN_H

#include "afd_status.h"

/*
 * The MegaScale-Infer ping-pong rule: with m micro-batches the FFN stays busy when
 * m * T_f >= 2 (T_f + T_c), so m = ceil(2 (1 + T_c / T_f)), clamped to [lo, hi].
 * t_comm and t_ffn are one micro-batch's transfer and FFN times (any one unit); a
 * non-positive t_ffn gives lo.
 */
int afd_plan_micro_batches(double t_comm, double t_ffn, int lo, int hi);

/*
 * The deployment planner's inputs. Times are microseconds per layer and per
 * micro-batch on one GPU (or one node on the CPU); an "instance" is gpus_per_inst
 * GPUs that act as one attention or one FFN node.
 *
 *   attention GPU, b sequences at context C:  T_a = attn_fixed_us + b (attn_seq_us + attn_ctx_us C)
 *   FFN GPU, n tokens (n = b A / F):           T_f = ffn_fixed_us / F + n ffn_tok_us
 *   link per attention GPU:                    T_c = link_lat_us + F b hidden (a2f_b + f2a_b) 8 /
 * link_gbps
 *
 * ffn_fixed_us is the fixed cost (reading the layer's FFN weights) of one FFN
 * instance: F instances share it.
 */
typedef struct afd_plan_in {
    double tpot_ms;        /* TPOT target */
    int layers;            /* decoder layers per token */
    int hidden;            /* hidden size (elements per token on the wire) */
    double context;        /* tokens of context per sequence */
    int gpus_per_inst;     /* GPUs per attention or FFN instance */
    double attn_fixed_us;  /* per attention GPU and micro-batch */
    double attn_seq_us;    /* per sequence */
    double attn_ctx_us;    /* per sequence and token of context */
    double ffn_fixed_us;   /* per micro-batch, one FFN instance's share when F = 1 */
    double ffn_tok_us;     /* per token on one FFN GPU */
    double link_gbps;      /* per attention GPU, each direction summed as the paper does */
    double link_lat_us;    /* per micro-batch transfer */
    double a2f_bytes;      /* bytes per element, attention to FFN (1: fp8) */
    double f2a_bytes;      /* bytes per element, FFN to attention (2: bf16) */
    double kv_bytes_tok;   /* KV bytes per token over all layers (0: no memory bound) */
    double kv_gb;          /* KV memory per attention GPU, GB (1e9 bytes) */
    int batch_align;       /* sequences per attention GPU per micro-batch: a multiple of it */
    int max_attn, max_ffn; /* instances to consider */
    int max_gpus;          /* 0: no bound on A + F instances' GPUs */
    int m_lo, m_hi;        /* micro-batch counts to consider */
} afd_plan_in_t;

/* One candidate deployment and its figures. */
typedef struct afd_plan_out {
    int attn, ffn, m; /* instances and micro-batches */
    int b;            /* sequences per attention GPU per micro-batch */
    long batch;       /* whole decode batch: m b A gpus */
    long micro_batch; /* tokens per micro-batch: b A gpus */
    double budget_us; /* per-stage budget: TPOT / layers / m */
    double t_attn_us, t_ffn_us, t_comm_us;
    double layer_us; /* max(m T_a, m T_f, m T_c, T_a + T_f + 2 T_c) */
    double tpot_ms;  /* layers x layer_us */
    double tokens_s, tokens_s_gpu;
    double link_need_gbps; /* bandwidth the transfer needs to fit in the stage budget */
    double kv_gb_used;     /* per attention GPU */
    int m_rule;            /* afd_plan_micro_batches(T_c, T_f) */
} afd_plan_out_t;

/* Fills in the paper's 2A2F inputs (Hopper, FP8, 4K context, TPOT 50 ms; see docs/benchmarks.md).
 */
void afd_plan_paper(afd_plan_in_t *in);

/* Checks every input; AFD_ERR_INVALID (logged, naming the field) when one is out of range. */
afd_status_t afd_plan_check(const afd_plan_in_t *in);

/*
 * Evaluates one deployment (A, F, m, b) under the cost model; returns 1 when it
 * meets the TPOT target, the stage budget, the link, the micro-batch rule and the
 * KV memory, 0 otherwise (out is filled either way).
 */
int afd_plan_eval(const afd_plan_in_t *in, int attn, int ffn, int m, int b, afd_plan_out_t *out);

/*
 * Searches A in 1..max_attn, F in 1..max_ffn, m in m_lo..m_hi and the largest b
 * (a multiple of batch_align) for the deployment with the most tokens/s per GPU;
 * ties go to fewer GPUs, then fewer micro-batches. AFD_ERR_NOT_FOUND when nothing
 * meets the target.
 */
afd_status_t afd_plan_search(const afd_plan_in_t *in, afd_plan_out_t *best);

#endif
