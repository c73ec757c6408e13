/*
 * test_config: common/model/mdl_config.h.
 *   - a plain text config and the step3_vl wrapper (text_config) parse to the same values;
 *     the released Step3 config (moe_layers_enum "4,5,...,59") parses with its real sizes;
 *   - defaults (max_position_embedding, rope_theta, rms_norm_eps, head_dim derived,
 *     every layer MoE when moe_layers_enum is absent), max_position_embeddings alias;
 *   - moe_layers_enum as a string (with spaces) and as a list;
 *   - quantization_config at the top level of the wrapper and inside text_config;
 *   - eos_token_id as a number and a list, at the top level and in text_config;
 *   - one error per field kind, each with its specific status: missing required field,
 *     wrong type, out of range, duplicate or out-of-range MoE layer, num_attention_groups
 *     != 1, bad quantization method / format / block size, rope_scaling non-null, invalid
 *     JSON; on error the output struct is left untouched (outputs set only on success);
 *   - mdl_config_load from a directory, and its missing-file error.
 * test_regression_* documents a library bug found while writing this file; it fails until fixed.
 * Configs are built with cJSON from one base object that each case edits.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "mdl_config.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

/* silences stderr (the library logs every error) around loops that provoke thousands */
static int quiet_begin(void)
{
    fflush(stderr);
    int saved = dup(2), nul = open("/dev/null", O_WRONLY);
    dup2(nul, 2);
    close(nul);
    return saved;
}
static void quiet_end(int saved)
{
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
}

/* a tiny valid text config: 4 layers, layers 1 and 3 MoE */
static cJSON *base_text(void)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "hidden_size", 64);
    cJSON_AddNumberToObject(o, "num_hidden_layers", 4);
    cJSON_AddNumberToObject(o, "num_attention_heads", 4);
    cJSON_AddNumberToObject(o, "num_attention_groups", 1);
    cJSON_AddNumberToObject(o, "head_dim", 32);
    cJSON_AddNumberToObject(o, "share_q_dim", 48);
    cJSON_AddNumberToObject(o, "rope_theta", 500000);
    cJSON_AddNumberToObject(o, "vocab_size", 1000);
    cJSON_AddNumberToObject(o, "max_position_embedding", 4096);
    cJSON_AddNumberToObject(o, "moe_num_experts", 8);
    cJSON_AddNumberToObject(o, "moe_top_k", 3);
    cJSON_AddNumberToObject(o, "moe_intermediate_size", 40);
    cJSON_AddNumberToObject(o, "share_expert_dim", 40);
    cJSON_AddNumberToObject(o, "intermediate_size", 96);
    cJSON_AddFalseToObject(o, "norm_expert_weight");
    cJSON_AddNumberToObject(o, "rms_norm_eps", 1e-6);
    cJSON_AddStringToObject(o, "moe_layers_enum", "1,3");
    cJSON_AddNullToObject(o, "rope_scaling");
    cJSON_AddNumberToObject(o, "bos_token_id", 0);
    cJSON_AddNumberToObject(o, "eos_token_id", 1);
    cJSON_AddStringToObject(o, "model_type", "step3_text"); /* unknown keys are ignored */
    return o;
}

static cJSON *wrap(cJSON *text)
{
    cJSON *w = cJSON_CreateObject();
    cJSON_AddStringToObject(w, "model_type", "step3_vl");
    cJSON_AddItemToObject(w, "vision_config", cJSON_CreateObject());
    cJSON_AddItemToObject(w, "text_config", text);
    return w;
}

static cJSON *quant_obj(void)
{
    cJSON *q = cJSON_CreateObject();
    cJSON_AddStringToObject(q, "quant_method", "fp8");
    cJSON_AddStringToObject(q, "fmt", "e4m3");
    cJSON_AddStringToObject(q, "activation_scheme", "dynamic");
    cJSON *bs = cJSON_CreateArray();
    cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
    cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
    cJSON_AddItemToObject(q, "weight_block_size", bs);
    return q;
}

static void set(cJSON *o, const char *key, cJSON *v)
{
    if (cJSON_GetObjectItemCaseSensitive(o, key))
        cJSON_ReplaceItemInObjectCaseSensitive(o, key, v);
    else
        cJSON_AddItemToObject(o, key, v);
}

/* parses o (and deletes it); returns the status, cfg filled on success */
static afd_status_t parse_obj(cJSON *o, mdl_config_t *cfg)
{
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    assert_non_null(s);
    afd_status_t st = mdl_config_parse(s, "test", cfg);
    free(s);
    return st;
}

/* the error must be `want` and cfg must be left as it was */
static void expect_error(cJSON *o, afd_status_t want)
{
    static mdl_config_t cfg, before;
    memset(&cfg, 0xab, sizeof(cfg));
    before = cfg;
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    afd_status_t st = mdl_config_parse(s, "test", &cfg);
    char shown[160];
    snprintf(shown, sizeof(shown), "%s", s);
    free(s); /* before any failure: a failing check must not also leak */
    if (st != want)
        fail_msg("config %s...: status %d (%s), want %d (%s)", shown, st, afd_status_str(st), want,
                 afd_status_str(want));
    assert_memory_equal(&cfg, &before, sizeof(cfg));
}

static void check_base(const mdl_config_t *c)
{
    assert_int_equal(c->hidden_size, 64);
    assert_int_equal(c->num_layers, 4);
    assert_int_equal(c->num_heads, 4);
    assert_int_equal(c->num_kv_heads, 1);
    assert_int_equal(c->head_dim, 32);
    assert_int_equal(c->share_q_dim, 48);
    assert_true(c->rope_theta == 500000.0);
    assert_int_equal(c->vocab_size, 1000);
    assert_int_equal(c->max_position, 4096);
    assert_int_equal(c->num_experts, 8);
    assert_int_equal(c->top_k, 3);
    assert_int_equal(c->moe_inter, 40);
    assert_int_equal(c->share_expert_dim, 40);
    assert_int_equal(c->dense_inter, 96);
    assert_int_equal(c->norm_expert_weight, 0);
    assert_true(c->rms_eps == 1e-6f);
    assert_int_equal(c->is_moe[0], 0);
    assert_int_equal(c->is_moe[1], 1);
    assert_int_equal(c->is_moe[2], 0);
    assert_int_equal(c->is_moe[3], 1);
    assert_int_equal(mdl_config_num_moe(c), 2);
    assert_int_equal(c->bos_token_id, 0);
    assert_int_equal(c->num_eos, 1);
    assert_int_equal(c->eos_token_ids[0], 1);
}

static void test_plain_and_wrapper(void **state)
{
    (void)state;
    mdl_config_t a, b;
    assert_int_equal(parse_obj(base_text(), &a), AFD_OK);
    check_base(&a);
    assert_int_equal(a.quant, MDL_QUANT_NONE);
    assert_int_equal(parse_obj(wrap(base_text()), &b), AFD_OK);
    check_base(&b);
    assert_int_equal(b.quant, MDL_QUANT_NONE);
    assert_int_equal(mdl_config_validate(&a, "test"), AFD_OK);
}

static void test_real_step3(void **state)
{
    (void)state;
    cJSON *t = cJSON_CreateObject();
    cJSON_AddNumberToObject(t, "hidden_size", 7168);
    cJSON_AddNumberToObject(t, "num_hidden_layers", 61);
    cJSON_AddNumberToObject(t, "num_attention_heads", 64);
    cJSON_AddNumberToObject(t, "num_attention_groups", 1);
    cJSON_AddNumberToObject(t, "head_dim", 256);
    cJSON_AddNumberToObject(t, "share_q_dim", 2048);
    cJSON_AddNumberToObject(t, "rope_theta", 500000);
    cJSON_AddNumberToObject(t, "vocab_size", 128815);
    cJSON_AddNumberToObject(t, "max_position_embedding", 65536);
    cJSON_AddNumberToObject(t, "moe_num_experts", 48);
    cJSON_AddNumberToObject(t, "moe_top_k", 3);
    cJSON_AddNumberToObject(t, "moe_intermediate_size", 5120);
    cJSON_AddNumberToObject(t, "share_expert_dim", 5120);
    cJSON_AddNumberToObject(t, "intermediate_size", 18432);
    cJSON_AddFalseToObject(t, "norm_expert_weight");
    cJSON_AddNumberToObject(t, "rms_norm_eps", 1e-5);
    char layers[512] = "";
    for (int l = 4; l <= 59; l++)
        snprintf(layers + strlen(layers), sizeof(layers) - strlen(layers), "%s%d", l > 4 ? "," : "",
                 l);
    cJSON_AddStringToObject(t, "moe_layers_enum", layers);
    cJSON *w = wrap(t);
    cJSON_AddItemToObject(w, "quantization_config", quant_obj());
    mdl_config_t c;
    assert_int_equal(parse_obj(w, &c), AFD_OK);
    assert_int_equal(c.hidden_size, 7168);
    assert_int_equal(c.num_layers, 61);
    assert_int_equal(c.num_heads, 64);
    assert_int_equal(c.head_dim, 256);
    assert_int_equal(c.share_q_dim, 2048);
    assert_int_equal(c.vocab_size, 128815);
    assert_int_equal(c.num_experts, 48);
    assert_int_equal(c.dense_inter, 18432);
    assert_true(c.rms_eps == 1e-5f);
    assert_int_equal(mdl_config_num_moe(&c), 56);
    for (int l = 0; l < 61; l++)
        assert_int_equal(c.is_moe[l], l >= 4 && l <= 59);
    assert_int_equal(c.quant, MDL_QUANT_FP8_BLOCK);
    assert_int_equal(c.quant_block[0], 128);
    assert_int_equal(c.quant_block[1], 128);
    assert_int_equal(c.bos_token_id, -1); /* absent */
    assert_int_equal(c.num_eos, 0);
}

static void test_defaults(void **state)
{
    (void)state;
    cJSON *o = base_text();
    cJSON_DeleteItemFromObject(o, "max_position_embedding");
    cJSON_DeleteItemFromObject(o, "rope_theta");
    cJSON_DeleteItemFromObject(o, "rms_norm_eps");
    cJSON_DeleteItemFromObject(o, "head_dim");
    cJSON_DeleteItemFromObject(o, "moe_layers_enum");
    cJSON_DeleteItemFromObject(o, "num_attention_groups");
    cJSON_DeleteItemFromObject(o, "norm_expert_weight");
    cJSON_DeleteItemFromObject(o, "rope_scaling");
    cJSON_DeleteItemFromObject(o, "bos_token_id");
    cJSON_DeleteItemFromObject(o, "eos_token_id");
    mdl_config_t c;
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_int_equal(c.max_position, 65536);
    assert_true(c.rope_theta == 10000.0);
    assert_true(c.rms_eps == 1e-5f);
    assert_int_equal(c.head_dim, 16); /* hidden_size / num_attention_heads */
    assert_int_equal(c.num_kv_heads, 1);
    assert_int_equal(c.norm_expert_weight, 0);
    assert_int_equal(mdl_config_num_moe(&c), 4); /* no enumeration: every layer */
    assert_int_equal(c.bos_token_id, -1);
    assert_int_equal(c.num_eos, 0);

    o = base_text();
    cJSON_DeleteItemFromObject(o, "max_position_embedding");
    cJSON_AddNumberToObject(o, "max_position_embeddings", 1234); /* the HF spelling */
    set(o, "norm_expert_weight", cJSON_CreateTrue());
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_int_equal(c.max_position, 1234);
    assert_int_equal(c.norm_expert_weight, 1);

    /* a dense model: no experts, no MoE fields needed */
    o = base_text();
    set(o, "moe_num_experts", cJSON_CreateNumber(0));
    cJSON_DeleteItemFromObject(o, "moe_top_k");
    cJSON_DeleteItemFromObject(o, "moe_intermediate_size");
    cJSON_DeleteItemFromObject(o, "moe_layers_enum");
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_int_equal(mdl_config_num_moe(&c), 0);
}

static void test_moe_layers_forms(void **state)
{
    (void)state;
    mdl_config_t c;
    cJSON *o = base_text();
    set(o, "moe_layers_enum", cJSON_CreateString("0, 2,3"));
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_true(c.is_moe[0] && !c.is_moe[1] && c.is_moe[2] && c.is_moe[3]);

    o = base_text();
    int ids[] = {3, 0};
    set(o, "moe_layers_enum", cJSON_CreateIntArray(ids, 2));
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_true(c.is_moe[0] && !c.is_moe[1] && !c.is_moe[2] && c.is_moe[3]);
    assert_int_equal(mdl_config_num_moe(&c), 2);

    o = base_text();
    set(o, "moe_layers_enum", cJSON_CreateString(""));
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_int_equal(mdl_config_num_moe(&c), 0);

    o = base_text();
    set(o, "moe_layers_enum", cJSON_CreateArray());
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_int_equal(mdl_config_num_moe(&c), 0);
}

static void test_quant_placement(void **state)
{
    (void)state;
    mdl_config_t c;
    /* top level of the wrapper */
    cJSON *w = wrap(base_text());
    cJSON_AddItemToObject(w, "quantization_config", quant_obj());
    assert_int_equal(parse_obj(w, &c), AFD_OK);
    assert_int_equal(c.quant, MDL_QUANT_FP8_BLOCK);
    /* inside text_config */
    cJSON *t = base_text();
    cJSON_AddItemToObject(t, "quantization_config", quant_obj());
    assert_int_equal(parse_obj(wrap(t), &c), AFD_OK);
    assert_int_equal(c.quant, MDL_QUANT_FP8_BLOCK);
    /* a plain config */
    t = base_text();
    cJSON_AddItemToObject(t, "quantization_config", quant_obj());
    assert_int_equal(parse_obj(t, &c), AFD_OK);
    assert_int_equal(c.quant, MDL_QUANT_FP8_BLOCK);
    /* the optional fields may be absent; null means unquantised */
    t = base_text();
    cJSON *q = cJSON_CreateObject();
    cJSON_AddStringToObject(q, "quant_method", "fp8");
    cJSON_AddItemToObject(t, "quantization_config", q);
    assert_int_equal(parse_obj(t, &c), AFD_OK);
    assert_int_equal(c.quant, MDL_QUANT_FP8_BLOCK);
    t = base_text();
    cJSON_AddNullToObject(t, "quantization_config");
    assert_int_equal(parse_obj(t, &c), AFD_OK);
    assert_int_equal(c.quant, MDL_QUANT_NONE);
}

static void test_eos_forms(void **state)
{
    (void)state;
    mdl_config_t c;
    int list[] = {5, 7, 9};
    cJSON *t = base_text();
    set(t, "eos_token_id", cJSON_CreateIntArray(list, 3));
    assert_int_equal(parse_obj(t, &c), AFD_OK);
    assert_int_equal(c.num_eos, 3);
    assert_int_equal(c.eos_token_ids[2], 9);
    /* wrapper: top-level eos used when text_config has none */
    t = base_text();
    cJSON_DeleteItemFromObject(t, "eos_token_id");
    cJSON *w = wrap(t);
    cJSON_AddItemToObject(w, "eos_token_id", cJSON_CreateIntArray(list, 2));
    assert_int_equal(parse_obj(w, &c), AFD_OK);
    assert_int_equal(c.num_eos, 2);
    assert_int_equal(c.eos_token_ids[1], 7);
    /* both: the text config's wins */
    w = wrap(base_text());
    cJSON_AddItemToObject(w, "eos_token_id", cJSON_CreateIntArray(list, 2));
    assert_int_equal(parse_obj(w, &c), AFD_OK);
    assert_int_equal(c.num_eos, 1);
    assert_int_equal(c.eos_token_ids[0], 1);
}

static void test_err_missing(void **state)
{
    (void)state;
    const char *required[] = {
        "hidden_size",      "num_hidden_layers", "num_attention_heads", "share_q_dim",
        "vocab_size",       "moe_num_experts",   "moe_top_k",           "moe_intermediate_size",
        "intermediate_size"};
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        cJSON *o = base_text();
        cJSON_DeleteItemFromObject(o, required[i]);
        expect_error(o, AFD_ERR_FORMAT);
        o = base_text();
        set(o, required[i], cJSON_CreateNull()); /* null is missing */
        expect_error(o, AFD_ERR_FORMAT);
    }
    /* the wrapper's text config must hold them: top-level values do not count */
    cJSON *t = base_text();
    cJSON_DeleteItemFromObject(t, "hidden_size");
    cJSON *w = wrap(t);
    cJSON_AddNumberToObject(w, "hidden_size", 64);
    expect_error(w, AFD_ERR_FORMAT);
    /* head_dim missing and not derivable */
    cJSON *o = base_text();
    cJSON_DeleteItemFromObject(o, "head_dim");
    set(o, "hidden_size", cJSON_CreateNumber(66));
    expect_error(o, AFD_ERR_FORMAT);
}

static void test_err_type(void **state)
{
    (void)state;
    const char *keys[] = {"hidden_size", "vocab_size",   "norm_expert_weight",
                          "rope_theta",  "rms_norm_eps", "moe_layers_enum"};
    /* strings where numbers / bools are wanted, and a number where a list or string is */
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        cJSON *o = base_text();
        set(o, keys[i],
            strcmp(keys[i], "moe_layers_enum") ? cJSON_CreateString("64") : cJSON_CreateNumber(3));
        expect_error(o, AFD_ERR_FORMAT);
    }
    cJSON *o = base_text();
    set(o, "hidden_size", cJSON_CreateNumber(64.5)); /* not an integer */
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    set(o, "num_hidden_layers", cJSON_CreateTrue());
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    set(o, "norm_expert_weight", cJSON_CreateNumber(0));
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    set(o, "eos_token_id", cJSON_CreateString("1"));
    expect_error(o, AFD_ERR_FORMAT);
    o = wrap(base_text());
    set(o, "text_config", cJSON_CreateString("{}"));
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    set(o, "quantization_config", cJSON_CreateString("fp8"));
    expect_error(o, AFD_ERR_FORMAT);
}

static void test_err_range(void **state)
{
    (void)state;
    struct {
        const char *key;
        double v;
        afd_status_t want;
    } cases[] = {
        {"hidden_size", 0, AFD_ERR_RANGE},
        {"hidden_size", MDL_MAX_DIM + 1, AFD_ERR_RANGE},
        {"num_hidden_layers", MDL_MAX_LAYERS + 1, AFD_ERR_RANGE},
        {"num_hidden_layers", -1, AFD_ERR_RANGE},
        {"num_attention_heads", 0, AFD_ERR_RANGE},
        {"vocab_size", MDL_MAX_VOCAB + 1, AFD_ERR_RANGE},
        {"moe_num_experts", MDL_MAX_EXPERTS + 1, AFD_ERR_RANGE},
        {"moe_num_experts", -1, AFD_ERR_RANGE},
        {"moe_top_k", 9, AFD_ERR_RANGE}, /* more than the 8 experts */
        {"moe_top_k", 0, AFD_ERR_RANGE},
        {"moe_intermediate_size", 0, AFD_ERR_RANGE},
        {"head_dim", 1, AFD_ERR_RANGE},
        {"head_dim", 33, AFD_ERR_FORMAT}, /* odd: rotary needs pairs */
        {"rope_theta", 0.5, AFD_ERR_RANGE},
        {"rms_norm_eps", 0, AFD_ERR_RANGE},
        {"rms_norm_eps", 2, AFD_ERR_RANGE},
        {"bos_token_id", 1000, AFD_ERR_RANGE}, /* not below vocab_size */
        {"bos_token_id", -2, AFD_ERR_RANGE},
        {"max_position_embedding", 0, AFD_ERR_RANGE},
        {"eos_token_id", 1000, AFD_ERR_FORMAT},
        {"eos_token_id", -1, AFD_ERR_FORMAT},
        {"hidden_size", 1e300, AFD_ERR_RANGE},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cJSON *o = base_text();
        set(o, cases[i].key, cJSON_CreateNumber(cases[i].v));
        expect_error(o, cases[i].want);
    }
    /* too many eos ids */
    int many[MDL_MAX_EOS + 1];
    for (int i = 0; i <= MDL_MAX_EOS; i++)
        many[i] = i;
    cJSON *o = base_text();
    set(o, "eos_token_id", cJSON_CreateIntArray(many, MDL_MAX_EOS + 1));
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    set(o, "eos_token_id", cJSON_CreateIntArray(many, MDL_MAX_EOS));
    mdl_config_t c;
    assert_int_equal(parse_obj(o, &c), AFD_OK);
    assert_int_equal(c.num_eos, MDL_MAX_EOS);
}

static void test_err_moe_layers(void **state)
{
    (void)state;
    struct {
        const char *s;
        afd_status_t want;
    } strs[] = {
        {"1,1", AFD_ERR_FORMAT}, /* duplicate */
        {"3, 1, 3", AFD_ERR_FORMAT},
        {"4", AFD_ERR_RANGE}, /* 4 layers: 0..3 */
        {"1,-1", AFD_ERR_RANGE},
        {"99999999999999999999999", AFD_ERR_FORMAT}, /* overflows long */
        {"a,b", AFD_ERR_FORMAT},
        {"1;2", AFD_ERR_FORMAT},
        {"1,,2", AFD_ERR_FORMAT},
        {"1 2", AFD_ERR_FORMAT},
    };
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
        cJSON *o = base_text();
        set(o, "moe_layers_enum", cJSON_CreateString(strs[i].s));
        expect_error(o, strs[i].want);
    }
    int dup[] = {1, 1}, big[] = {0, 4}, neg[] = {-1};
    cJSON *o = base_text();
    set(o, "moe_layers_enum", cJSON_CreateIntArray(dup, 2));
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    set(o, "moe_layers_enum", cJSON_CreateIntArray(big, 2));
    expect_error(o, AFD_ERR_RANGE);
    o = base_text();
    set(o, "moe_layers_enum", cJSON_CreateIntArray(neg, 1));
    expect_error(o, AFD_ERR_RANGE);
    o = base_text();
    cJSON *l = cJSON_CreateArray();
    cJSON_AddItemToArray(l, cJSON_CreateNumber(1.5));
    set(o, "moe_layers_enum", l);
    expect_error(o, AFD_ERR_RANGE);
    o = base_text();
    l = cJSON_CreateArray();
    cJSON_AddItemToArray(l, cJSON_CreateString("1"));
    set(o, "moe_layers_enum", l);
    expect_error(o, AFD_ERR_RANGE);
    /* MoE layers listed but no experts */
    o = base_text();
    set(o, "moe_num_experts", cJSON_CreateNumber(0));
    expect_error(o, AFD_ERR_FORMAT);
}

/* Regression (fixed; common/model/mdl_config.c:172 and 180): eos_token_id values are not checked to
 * be integers, so 1.5 is silently truncated to token 1 while every other integer field rejects a
 * fraction with AFD_ERR_FORMAT. Expected: AFD_ERR_FORMAT for 1.5 and for [2, 2.5]. */
static void test_regression_eos_not_integer(void **state)
{
    (void)state;
    cJSON *o = base_text();
    set(o, "eos_token_id", cJSON_CreateNumber(1.5));
    expect_error(o, AFD_ERR_FORMAT);
    o = base_text();
    cJSON *l = cJSON_CreateArray();
    cJSON_AddItemToArray(l, cJSON_CreateNumber(2));
    cJSON_AddItemToArray(l, cJSON_CreateNumber(2.5));
    set(o, "eos_token_id", l);
    expect_error(o, AFD_ERR_FORMAT);
}

static void test_err_kv_groups(void **state)
{
    (void)state;
    cJSON *o = base_text();
    set(o, "num_attention_groups", cJSON_CreateNumber(2));
    expect_error(o, AFD_ERR_UNSUPPORTED);
    o = base_text();
    set(o, "num_attention_groups", cJSON_CreateNumber(8));
    expect_error(o, AFD_ERR_UNSUPPORTED);
    o = base_text();
    set(o, "num_attention_groups", cJSON_CreateNumber(0));
    expect_error(o, AFD_ERR_RANGE);
}

static void test_err_quant(void **state)
{
    (void)state;
    struct {
        const char *key;
        cJSON *v;
    } cases[] = {
        {"quant_method", cJSON_CreateString("awq")},
        {"quant_method", cJSON_CreateNumber(8)},
        {"quant_method", NULL}, /* deleted */
        {"fmt", cJSON_CreateString("e5m2")},
        {"activation_scheme", cJSON_CreateString("static")},
        {"weight_block_size", cJSON_CreateIntArray((int[]){64, 64}, 2)},
        {"weight_block_size", cJSON_CreateIntArray((int[]){128, 64}, 2)},
        {"weight_block_size", cJSON_CreateIntArray((int[]){128}, 1)},
        {"weight_block_size", cJSON_CreateIntArray((int[]){128, 128, 128}, 3)},
        {"weight_block_size", cJSON_CreateNumber(128)},
    };
    for (int top = 0; top < 2; top++) {
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
            cJSON *q = quant_obj();
            if (cases[i].v)
                set(q, cases[i].key, cJSON_Duplicate(cases[i].v, 1));
            else
                cJSON_DeleteItemFromObject(q, cases[i].key);
            cJSON *t = base_text(), *w;
            if (top) {
                w = wrap(t);
                cJSON_AddItemToObject(w, "quantization_config", q);
            } else {
                cJSON_AddItemToObject(t, "quantization_config", q);
                w = wrap(t);
            }
            expect_error(w, AFD_ERR_UNSUPPORTED);
        }
    }
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        cJSON_Delete(cases[i].v);
}

static void test_err_rope_scaling(void **state)
{
    (void)state;
    cJSON *o = base_text();
    cJSON *rs = cJSON_CreateObject();
    cJSON_AddStringToObject(rs, "type", "yarn");
    cJSON_AddNumberToObject(rs, "factor", 4);
    set(o, "rope_scaling", rs);
    expect_error(o, AFD_ERR_UNSUPPORTED);
    o = base_text();
    set(o, "rope_scaling", cJSON_CreateString("linear"));
    expect_error(o, AFD_ERR_UNSUPPORTED);
}

static void test_err_json(void **state)
{
    (void)state;
    const char *bad[] = {
        "",         "{",   "{\"hidden_size\": }", "{'hidden_size': 64}", "nul", "[1, 2]", "42",
        "\"text\"", "null"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        mdl_config_t c, before;
        memset(&c, 0x5a, sizeof(c));
        before = c;
        afd_status_t st = mdl_config_parse(bad[i], "test", &c);
        if (st != AFD_ERR_FORMAT) fail_msg("'%s': status %d", bad[i], st);
        assert_memory_equal(&c, &before, sizeof(c));
    }
    /* truncations of a valid config are all errors and never crash */
    cJSON *o = wrap(base_text());
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    size_t n = strlen(s);
    int bad_prefix = -1, q = quiet_begin();
    for (size_t k = 0; k < n && bad_prefix < 0; k++) {
        char *p = strndup(s, k);
        mdl_config_t c;
        if (mdl_config_parse(p, "test", &c) == AFD_OK) bad_prefix = (int)k;
        free(p);
    }
    quiet_end(q);
    free(s);
    assert_int_equal(bad_prefix, -1);
}

static void test_load_dir(void **state)
{
    (void)state;
    char dir[512];
    const char *tmp = getenv("TEST_TMP");
    snprintf(dir, sizeof(dir), "%s/afd_test_config_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    assert_non_null(mkdtemp(dir));
    mdl_config_t c;
    assert_int_equal(mdl_config_load(dir, &c), AFD_ERR_IO); /* no config.json */
    char path[600];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    cJSON *o = wrap(base_text());
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(s, f);
    fclose(f);
    free(s);
    assert_int_equal(mdl_config_load(dir, &c), AFD_OK);
    check_base(&c);
    f = fopen(path, "w");
    fputs("{\"hidden_size\": 64", f);
    fclose(f);
    assert_int_equal(mdl_config_load(dir, &c), AFD_ERR_FORMAT);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_and_wrapper),
        cmocka_unit_test(test_real_step3),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_moe_layers_forms),
        cmocka_unit_test(test_quant_placement),
        cmocka_unit_test(test_eos_forms),
        cmocka_unit_test(test_err_missing),
        cmocka_unit_test(test_err_type),
        cmocka_unit_test(test_err_range),
        cmocka_unit_test(test_err_moe_layers),
        cmocka_unit_test(test_regression_eos_not_integer),
        cmocka_unit_test(test_err_kv_groups),
        cmocka_unit_test(test_err_quant),
        cmocka_unit_test(test_err_rope_scaling),
        cmocka_unit_test(test_err_json),
        cmocka_unit_test(test_load_dir),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, NULL, NULL);
}
