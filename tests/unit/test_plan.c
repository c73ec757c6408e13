/*
 * test_plan: the micro-batch rule m = ceil(2 (1 + T_c / T_f)) clamped to [lo, hi], and the
 * deployment planner: the paper's 2A2F sizing from the paper's own inputs, and the cost
 * model's figures against a hand computation.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_plan.h"

#include <math.h>

static void test_rule(void **state)
{
    (void)state;
    /* no communication: the ping-pong needs two */
    assert_int_equal(afd_plan_micro_batches(0, 100, 2, 4), 2);
    /* T_c = T_f / 2: 2 * 1.5 = 3 */
    assert_int_equal(afd_plan_micro_batches(50, 100, 2, 4), 3);
    /* just over: 2 * 1.51 = 3.02 -> 4 */
    assert_int_equal(afd_plan_micro_batches(51, 100, 2, 4), 4);
    /* communication dominates: clamped */
    assert_int_equal(afd_plan_micro_batches(1000, 100, 2, 4), 4);
    /* the paper's setting (3 micro-batches) holds for T_c up to T_f / 2 */
    assert_int_equal(afd_plan_micro_batches(30, 100, 2, 4), 3);
}

static void test_degenerate(void **state)
{
    (void)state;
    assert_int_equal(afd_plan_micro_batches(10, 0, 2, 4), 2);
    assert_int_equal(afd_plan_micro_batches(-1, 100, 2, 4), 2);
    assert_int_equal(afd_plan_micro_batches(0, 100, 1, 8), 2);
}

/* The paper's deployment: 2A2F, 3 micro-batches of 2048 (128 per attention GPU), batch
 * 6144 at 4K context and TPOT 50 ms; 819 us per layer, 273 us per stage; the transfer
 * needs 161.3 Gbps of the 400 Gbps link; 4039 tokens/s/GPU. */
static void test_paper_2a2f(void **state)
{
    (void)state;
    afd_plan_in_t in;
    afd_plan_paper(&in);
    afd_plan_out_t p;
    assert_int_equal(afd_plan_search(&in, &p), AFD_OK);
    assert_int_equal(p.attn, 2);
    assert_int_equal(p.ffn, 2);
    assert_int_equal(p.m, 3);
    assert_int_equal(p.b, 128);
    assert_int_equal(p.micro_batch, 2048);
    assert_int_equal(p.batch, 6144);
    assert_true(fabs(p.budget_us - 50000.0 / 61 / 3) < 1e-6);
    assert_true(fabs(p.budget_us * 3 - 819.67) < 0.01);
    /* 2 FFN nodes x 128 x 7168 x (1 + 2) bytes in 273.2 us */
    assert_true(fabs(p.link_need_gbps - 161.2) < 0.15);
    assert_true(p.t_comm_us <= p.budget_us);
    assert_true(fabs(p.tokens_s_gpu - 4039) < 1.0);
    assert_true(p.tpot_ms <= 50.0);
}

/* At 8K context the same inputs choose the paper's 4A2F (64 sequences per attention GPU). */
static void test_paper_8k(void **state)
{
    (void)state;
    afd_plan_in_t in;
    afd_plan_paper(&in);
    in.context = 8192;
    afd_plan_out_t p;
    assert_int_equal(afd_plan_search(&in, &p), AFD_OK);
    assert_int_equal(p.attn, 4);
    assert_int_equal(p.ffn, 2);
    assert_int_equal(p.b, 64);
}

/* one evaluation against the formulas worked by hand */
static void test_eval(void **state)
{
    (void)state;
    afd_plan_in_t in = {.tpot_ms = 12,
                        .layers = 10,
                        .hidden = 1000,
                        .context = 100,
                        .gpus_per_inst = 1,
                        .attn_fixed_us = 10,
                        .attn_seq_us = 1,
                        .attn_ctx_us = 0.01,
                        .ffn_fixed_us = 40,
                        .ffn_tok_us = 0.5,
                        .link_gbps = 8,
                        .link_lat_us = 5,
                        .a2f_bytes = 1,
                        .f2a_bytes = 2,
                        .batch_align = 1,
                        .max_attn = 4,
                        .max_ffn = 4,
                        .m_lo = 2,
                        .m_hi = 4};
    afd_plan_out_t o;
    /* A=2, F=1, m=3, b=100: T_a = 10 + 100 * 2 = 210; n = 200, T_f = 40 + 100 = 140;
     * bits = 1 * 100 * 1000 * 3 * 8 = 2.4e6 over 8 Gbps = 300 us, + 5 = 305 us */
    int ok = afd_plan_eval(&in, 2, 1, 3, 100, &o);
    assert_true(fabs(o.t_attn_us - 210) < 1e-9);
    assert_true(fabs(o.t_ffn_us - 140) < 1e-9);
    assert_true(fabs(o.t_comm_us - 305) < 1e-9);
    assert_true(fabs(o.budget_us - 400) < 1e-9);
    /* layer: max(630, 420, 915, 210 + 140 + 610 = 960) = 960 us; TPOT 9.6 ms */
    assert_true(fabs(o.layer_us - 960) < 1e-9);
    assert_true(fabs(o.tpot_ms - 9.6) < 1e-9);
    assert_int_equal(o.batch, 600);
    assert_true(fabs(o.tokens_s - 600 / 9.6e-3) < 1e-6);
    /* rule: ceil(2 (1 + 305 / 140)) = 7 > 3: rejected */
    assert_int_equal(o.m_rule, 7);
    assert_int_equal(ok, 0);
    /* the search returns a feasible plan that no other candidate beats */
    afd_plan_out_t best, c;
    assert_int_equal(afd_plan_search(&in, &best), AFD_OK);
    assert_true(afd_plan_eval(&in, best.attn, best.ffn, best.m, best.b, &c));
    for (int a = 1; a <= 4; a++)
        for (int f = 1; f <= 4; f++)
            for (int m = 2; m <= 4; m++)
                for (int b = 1; b <= 400; b++)
                    if (afd_plan_eval(&in, a, f, m, b, &c))
                        assert_true(c.tokens_s_gpu <= best.tokens_s_gpu * (1 + 1e-9));
}

static void test_bad_inputs(void **state)
{
    (void)state;
    afd_plan_in_t in;
    afd_plan_paper(&in);
    afd_plan_out_t p;
    in.tpot_ms = 0;
    assert_int_equal(afd_plan_search(&in, &p), AFD_ERR_INVALID);
    afd_plan_paper(&in);
    in.tpot_ms = 0.01; /* nothing fits */
    assert_int_equal(afd_plan_search(&in, &p), AFD_ERR_NOT_FOUND);
    afd_plan_paper(&in);
    in.m_hi = 1000;
    assert_int_equal(afd_plan_search(&in, &p), AFD_ERR_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rule),       cmocka_unit_test(test_degenerate),
        cmocka_unit_test(test_paper_2a2f), cmocka_unit_test(test_paper_8k),
        cmocka_unit_test(test_eval),       cmocka_unit_test(test_bad_inputs)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
