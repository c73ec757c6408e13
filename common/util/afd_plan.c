/*
 * afd_plan: pipeline sizing rules: the MegaScale-Infer micro-batch rule the
 * coordinator uses, and the deployment planner's cost model and search (afd_plan).
 */
#include "afd_plan.h"

#include "afd_log.h"

#include <math.h>
#include <string.h>

int afd_plan_micro_batches(double t_comm, double t_ffn, int lo, int hi)
{
    if (!(t_ffn > 0) || !(t_comm >= 0)) return lo;
    double m = ceil(2.0 * (1.0 + t_comm / t_ffn) - 1e-9);
    if (m < lo) return lo;
    if (m > hi) return hi;
    return (int)m;
}

void afd_plan_paper(afd_plan_in_t *in)
{
    memset(in, 0, sizeof(*in));
    in->tpot_ms = 50;
    in->layers = 61;
    in->hidden = 7168;
    in->context = 4096;
    in->gpus_per_inst = 8;
    /* The paper's 2A2F run: 4039 tokens/s/GPU from 32 GPUs on a batch of 6144, so one
     * token every 6144 / (4039 * 32) s = 47.5 ms, i.e. a stage of 47.5 ms / 61 / 3 =
     * 260 us with 128 sequences of 4K context per attention GPU. MFA decode attention
     * reads the KV cache: its cost goes with sequences x context. */
    double stage_us = 6144.0 / (4039.0 * 32.0) * 1e6 / 61.0 / 3.0;
    in->attn_ctx_us = stage_us / (128.0 * 4096.0);
    /* FFN: reading a MoE layer's weights (routed 5.285e9 + shared 0.1101e9 fp8 bytes)
     * at the H800's 1979 TFLOP/s / 591 FLOP/byte = 3.35 TB/s, shared by the 8 GPUs of
     * an instance; the per-token part is the rest of the same 260 us stage at 128
     * tokens per FFN GPU (2A2F: 2048 tokens over 16 GPUs): the stages balance. */
    double hbm = 1979e12 / 591.0;
    in->ffn_fixed_us = (5.285e9 + 0.1101e9) / (8.0 * hbm) * 1e6;
    in->ffn_tok_us = (stage_us - in->ffn_fixed_us / 2.0) / 128.0;
    in->link_gbps = 400; /* one 400 Gbps NIC per GPU */
    in->link_lat_us = 0; /* not given */
    in->a2f_bytes = 1;   /* fp8 (the scales are under 1%) */
    in->f2a_bytes = 2;   /* bf16 */
    in->kv_bytes_tok = 31232;
    in->kv_gb = 60;       /* 80 GB less weights and activations */
    in->batch_align = 64; /* Hopper GEMM tiles are 64 rows */
    in->max_attn = 8;
    in->max_ffn = 8;
    in->max_gpus = 48; /* the largest deployment the paper reports (4A2F) */
    in->m_lo = 2;
    in->m_hi = 4;
}

afd_status_t afd_plan_check(const afd_plan_in_t *in)
{
#define NEED(cond, what)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            afd_error("plan: %s", what);                                                           \
            return AFD_ERR_INVALID;                                                                \
        }                                                                                          \
    } while (0)
    NEED(in->tpot_ms > 0 && in->tpot_ms <= 1e6, "tpot must be in (0, 1e6] ms");
    NEED(in->layers >= 1 && in->layers <= 100000, "layers must be in [1, 100000]");
    NEED(in->hidden >= 1 && in->hidden <= 1 << 24, "hidden must be in [1, 2^24]");
    NEED(in->context >= 0 && in->context <= 1e9, "context must be in [0, 1e9]");
    NEED(in->gpus_per_inst >= 1 && in->gpus_per_inst <= 4096, "gpus per instance in [1, 4096]");
    NEED(in->attn_fixed_us >= 0 && in->attn_seq_us >= 0 && in->attn_ctx_us >= 0,
         "attention costs must be >= 0");
    NEED(in->attn_seq_us + in->attn_ctx_us * in->context > 0,
         "attention cost per sequence must be > 0 (attn-seq-us or attn-ctx-us)");
    NEED(in->ffn_fixed_us >= 0 && in->ffn_tok_us >= 0 && in->ffn_fixed_us + in->ffn_tok_us > 0,
         "FFN costs must be >= 0 and not both 0 (ffn-fixed-us, ffn-tok-us)");
    NEED(in->link_gbps > 0 && in->link_lat_us >= 0, "link-gbps > 0 and link-lat-us >= 0");
    NEED(in->a2f_bytes > 0 && in->a2f_bytes <= 8 && in->f2a_bytes > 0 && in->f2a_bytes <= 8,
         "a2f/f2a bytes per element in (0, 8]");
    NEED(in->kv_bytes_tok >= 0 && in->kv_gb >= 0, "kv bytes and kv-gb must be >= 0");
    NEED(in->batch_align >= 1 && in->batch_align <= 1 << 20, "batch-align in [1, 2^20]");
    NEED(in->max_attn >= 1 && in->max_attn <= 256 && in->max_ffn >= 1 && in->max_ffn <= 256,
         "max-attn and max-ffn in [1, 256]");
    NEED(in->max_gpus >= 0, "max-gpus must be >= 0");
    NEED(in->m_lo >= 1 && in->m_hi >= in->m_lo && in->m_hi <= 64,
         "micro-batches: 1 <= lo <= hi <= 64");
#undef NEED
    return AFD_OK;
}

static double dmax(double a, double b)
{
    return a > b ? a : b;
}

int afd_plan_eval(const afd_plan_in_t *in, int attn, int ffn, int m, int b, afd_plan_out_t *o)
{
    memset(o, 0, sizeof(*o));
    o->attn = attn;
    o->ffn = ffn;
    o->m = m;
    o->b = b;
    double g = in->gpus_per_inst;
    o->micro_batch = (long)b * attn * in->gpus_per_inst;
    o->batch = o->micro_batch * m;
    o->budget_us = in->tpot_ms * 1000.0 / in->layers / m;
    o->t_attn_us = in->attn_fixed_us + b * (in->attn_seq_us + in->attn_ctx_us * in->context);
    double n = (double)b * attn / ffn; /* tokens per FFN GPU: the union of A g GPUs over F g */
    o->t_ffn_us = in->ffn_fixed_us / ffn + n * in->ffn_tok_us;
    double bits = (double)ffn * b * in->hidden * (in->a2f_bytes + in->f2a_bytes) * 8.0;
    o->t_comm_us = in->link_lat_us + bits / (in->link_gbps * 1e3);
    o->link_need_gbps = bits / (o->budget_us * 1e3);
    o->layer_us = dmax(dmax(m * o->t_attn_us, m * o->t_ffn_us),
                       dmax(m * o->t_comm_us, o->t_attn_us + o->t_ffn_us + 2 * o->t_comm_us));
    o->tpot_ms = in->layers * o->layer_us / 1000.0;
    o->tokens_s = o->tpot_ms > 0 ? o->batch / (o->tpot_ms / 1000.0) : 0;
    o->tokens_s_gpu = o->tokens_s / ((attn + ffn) * g);
    o->kv_gb_used = (double)m * b * (in->context + 1) * in->kv_bytes_tok / 1e9;
    o->m_rule = afd_plan_micro_batches(o->t_comm_us, o->t_ffn_us, 1, 1 << 20);
    const double eps = 1e-9;
    if (b < 1) return 0;
    if (o->tpot_ms > in->tpot_ms * (1 + eps)) return 0;
    if (o->t_attn_us > o->budget_us * (1 + eps) || o->t_ffn_us > o->budget_us * (1 + eps) ||
        o->t_comm_us > o->budget_us * (1 + eps))
        return 0;
    if (m < o->m_rule) return 0;
    if (in->kv_bytes_tok > 0 && in->kv_gb > 0 && o->kv_gb_used > in->kv_gb) return 0;
    return 1;
}

/* the largest multiple of batch_align that fits (every constraint grows with b); 0 if none */
static int largest_b(const afd_plan_in_t *in, int attn, int ffn, int m, afd_plan_out_t *out)
{
    afd_plan_out_t t;
    long a = in->batch_align, lo = 0, hi = 1;
    if (!afd_plan_eval(in, attn, ffn, m, (int)a, &t)) return 0;
    while (hi * a < (1L << 24) && afd_plan_eval(in, attn, ffn, m, (int)(hi * a), &t)) {
        lo = hi;
        hi *= 2;
    }
    if (hi * a >= (1L << 24) && afd_plan_eval(in, attn, ffn, m, (int)(hi * a), &t)) lo = hi;
    while (hi - lo > 1) { /* lo fits, hi does not */
        long mid = (lo + hi) / 2;
        if (afd_plan_eval(in, attn, ffn, m, (int)(mid * a), &t))
            lo = mid;
        else
            hi = mid;
    }
    afd_plan_eval(in, attn, ffn, m, (int)(lo * a), out);
    return (int)(lo * a);
}

afd_status_t afd_plan_search(const afd_plan_in_t *in, afd_plan_out_t *best)
{
    afd_status_t st = afd_plan_check(in);
    if (st) return st;
    afd_plan_out_t cur, top;
    int found = 0;
    for (int a = 1; a <= in->max_attn; a++)
        for (int f = 1; f <= in->max_ffn; f++) {
            if (in->max_gpus > 0 && (long)(a + f) * in->gpus_per_inst > in->max_gpus) continue;
            for (int m = in->m_lo; m <= in->m_hi; m++) {
                if (!largest_b(in, a, f, m, &cur)) continue;
                int better = !found;
                if (found) {
                    double d = cur.tokens_s_gpu - top.tokens_s_gpu;
                    double tol = 1e-9 * top.tokens_s_gpu;
                    if (d > tol)
                        better = 1;
                    else if (d >= -tol)
                        better = cur.attn + cur.ffn < top.attn + top.ffn ||
                                 (cur.attn + cur.ffn == top.attn + top.ffn && cur.m < top.m);
                }
                if (better) {
                    top = cur;
                    found = 1;
                }
            }
        }
    if (!found) {
        afd_error("plan: no deployment meets TPOT %.3g ms within the bounds", in->tpot_ms);
        return AFD_ERR_NOT_FOUND;
    }
    *best = top;
    return AFD_OK;
}
