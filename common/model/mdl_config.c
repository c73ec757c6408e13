/* mdl_config: config.json parsing and validation with cJSON. */
#define _GNU_SOURCE
#include "mdl_config.h"
#include "afd_log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MDL_CONFIG_MAX_BYTES (16 << 20)

static afd_status_t get_int(const cJSON *o, const char *key, const char *alt, int required,
                            long def, long min, long max, const char *what, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v && alt) v = cJSON_GetObjectItemCaseSensitive(o, alt);
    if (!v || cJSON_IsNull(v)) {
        if (required) {
            afd_error("%s: missing field '%s'", what, key);
            return AFD_ERR_FORMAT;
        }
        *out = (int)def;
        return AFD_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble)) {
        afd_error("%s: field '%s' must be an integer", what, key);
        return AFD_ERR_FORMAT;
    }
    if (v->valuedouble < (double)min || v->valuedouble > (double)max) {
        afd_error("%s: field '%s' = %.0f is outside [%ld, %ld]", what, key, v->valuedouble, min,
                  max);
        return AFD_ERR_RANGE;
    }
    *out = (int)v->valuedouble;
    return AFD_OK;
}

static afd_status_t get_num(const cJSON *o, const char *key, double def, double min, double max,
                            const char *what, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return AFD_OK;
    }
    if (!cJSON_IsNumber(v)) {
        afd_error("%s: field '%s' must be a number", what, key);
        return AFD_ERR_FORMAT;
    }
    if (!(v->valuedouble >= min && v->valuedouble <= max)) {
        afd_error("%s: field '%s' = %g is outside [%g, %g]", what, key, v->valuedouble, min, max);
        return AFD_ERR_RANGE;
    }
    *out = v->valuedouble;
    return AFD_OK;
}

static afd_status_t parse_moe_layers(const cJSON *v, const char *what, mdl_config_t *cfg)
{
    memset(cfg->is_moe, 0, sizeof(cfg->is_moe));
    if (!v || cJSON_IsNull(v)) {
        /* no enumeration: every layer is MoE when the model has experts */
        for (int l = 0; l < cfg->num_layers; l++)
            cfg->is_moe[l] = cfg->num_experts > 0;
        return AFD_OK;
    }
    if (cJSON_IsString(v)) {
        const char *p = v->valuestring;
        while (*p) {
            char *end;
            errno = 0;
            long l = strtol(p, &end, 10);
            if (end == p || errno) {
                afd_error("%s: field 'moe_layers_enum' is not a comma list of layer indices", what);
                return AFD_ERR_FORMAT;
            }
            if (l < 0 || l >= cfg->num_layers) {
                afd_error("%s: field 'moe_layers_enum' names layer %ld, but num_hidden_layers "
                          "is %d",
                          what, l, cfg->num_layers);
                return AFD_ERR_RANGE;
            }
            if (cfg->is_moe[l]) {
                afd_error("%s: field 'moe_layers_enum' names layer %ld twice", what, l);
                return AFD_ERR_FORMAT;
            }
            cfg->is_moe[l] = 1;
            p = end;
            while (*p == ' ')
                p++;
            if (*p == ',')
                p++;
            else if (*p) {
                afd_error("%s: field 'moe_layers_enum' is not a comma list of layer indices", what);
                return AFD_ERR_FORMAT;
            }
        }
        return AFD_OK;
    }
    if (cJSON_IsArray(v)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) ||
                e->valuedouble < 0 || e->valuedouble >= cfg->num_layers) {
                afd_error("%s: field 'moe_layers_enum' has an entry that is not a layer index "
                          "below %d",
                          what, cfg->num_layers);
                return AFD_ERR_RANGE;
            }
            int l = (int)e->valuedouble;
            if (cfg->is_moe[l]) {
                afd_error("%s: field 'moe_layers_enum' names layer %d twice", what, l);
                return AFD_ERR_FORMAT;
            }
            cfg->is_moe[l] = 1;
        }
        return AFD_OK;
    }
    afd_error("%s: field 'moe_layers_enum' must be a string or a list", what);
    return AFD_ERR_FORMAT;
}

static afd_status_t parse_quant(const cJSON *q, const char *what, mdl_config_t *cfg)
{
    cfg->quant = MDL_QUANT_NONE;
    cfg->quant_block[0] = cfg->quant_block[1] = 128;
    if (!q || cJSON_IsNull(q)) return AFD_OK;
    if (!cJSON_IsObject(q)) {
        afd_error("%s: field 'quantization_config' must be an object", what);
        return AFD_ERR_FORMAT;
    }
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(q, "quant_method");
    if (!cJSON_IsString(m) || strcmp(m->valuestring, "fp8") != 0) {
        afd_error("%s: field 'quantization_config.quant_method' must be \"fp8\"", what);
        return AFD_ERR_UNSUPPORTED;
    }
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(q, "fmt");
    if (fmt && (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "e4m3") != 0)) {
        afd_error("%s: field 'quantization_config.fmt' must be \"e4m3\"", what);
        return AFD_ERR_UNSUPPORTED;
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(q, "activation_scheme");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "dynamic") != 0)) {
        afd_error("%s: field 'quantization_config.activation_scheme' must be \"dynamic\"", what);
        return AFD_ERR_UNSUPPORTED;
    }
    const cJSON *bs = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
    if (bs) {
        if (!cJSON_IsArray(bs) || cJSON_GetArraySize(bs) != 2 ||
            !cJSON_IsNumber(cJSON_GetArrayItem(bs, 0)) ||
            !cJSON_IsNumber(cJSON_GetArrayItem(bs, 1)) ||
            cJSON_GetArrayItem(bs, 0)->valuedouble != 128 ||
            cJSON_GetArrayItem(bs, 1)->valuedouble != 128) {
            afd_error("%s: field 'quantization_config.weight_block_size' must be [128, 128]", what);
            return AFD_ERR_UNSUPPORTED;
        }
    }
    cfg->quant = MDL_QUANT_FP8_BLOCK;
    return AFD_OK;
}

static afd_status_t parse_eos(const cJSON *o, const char *what, mdl_config_t *cfg)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "eos_token_id");
    cfg->num_eos = 0;
    if (!v || cJSON_IsNull(v)) return AFD_OK;
    if (cJSON_IsNumber(v)) {
        if (v->valuedouble < 0 || v->valuedouble >= cfg->vocab_size ||
            v->valuedouble != floor(v->valuedouble))
            goto bad;
        cfg->eos_token_ids[cfg->num_eos++] = (int)v->valuedouble;
        return AFD_OK;
    }
    if (cJSON_IsArray(v)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= cfg->vocab_size ||
                e->valuedouble != floor(e->valuedouble) || cfg->num_eos == MDL_MAX_EOS)
                goto bad;
            cfg->eos_token_ids[cfg->num_eos++] = (int)e->valuedouble;
        }
        return AFD_OK;
    }
bad:
    afd_error("%s: field 'eos_token_id' must be a token id below vocab_size or a list of at most "
              "%d",
              what, MDL_MAX_EOS);
    return AFD_ERR_FORMAT;
}

afd_status_t mdl_config_parse(const char *json, const char *what, mdl_config_t *out)
{
    afd_status_t st = AFD_OK;
    mdl_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cJSON *root = cJSON_Parse(json);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        afd_error("%s: invalid JSON near '%.20s'", what, at ? at : "");
        return AFD_ERR_FORMAT;
    }
    if (!cJSON_IsObject(root)) {
        afd_error("%s: top level must be an object", what);
        st = AFD_ERR_FORMAT;
        goto out;
    }
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    if (tc && !cJSON_IsObject(tc)) {
        afd_error("%s: field 'text_config' must be an object", what);
        st = AFD_ERR_FORMAT;
        goto out;
    }
    const cJSON *o = tc ? tc : root;
    if ((st = get_int(o, "hidden_size", NULL, 1, 0, 1, MDL_MAX_DIM, what, &cfg.hidden_size)) ||
        (st = get_int(o, "num_hidden_layers", NULL, 1, 0, 1, MDL_MAX_LAYERS, what,
                      &cfg.num_layers)) ||
        (st = get_int(o, "num_attention_heads", NULL, 1, 0, 1, 4096, what, &cfg.num_heads)) ||
        (st = get_int(o, "num_attention_groups", NULL, 0, 1, 1, 4096, what, &cfg.num_kv_heads)) ||
        (st = get_int(o, "head_dim", NULL, 0, 0, 2, 4096, what, &cfg.head_dim)) ||
        (st = get_int(o, "share_q_dim", NULL, 1, 0, 1, MDL_MAX_DIM, what, &cfg.share_q_dim)) ||
        (st = get_int(o, "vocab_size", NULL, 1, 0, 1, MDL_MAX_VOCAB, what, &cfg.vocab_size)) ||
        (st = get_int(o, "max_position_embedding", "max_position_embeddings", 0, 65536, 1, 1 << 24,
                      what, &cfg.max_position)) ||
        (st = get_int(o, "moe_num_experts", NULL, 1, 0, 0, MDL_MAX_EXPERTS, what,
                      &cfg.num_experts)) ||
        (st = get_int(o, "moe_top_k", NULL, cfg.num_experts > 0, 0, 0, MDL_MAX_EXPERTS, what,
                      &cfg.top_k)) ||
        (st = get_int(o, "moe_intermediate_size", NULL, cfg.num_experts > 0, 0, 0, MDL_MAX_DIM,
                      what, &cfg.moe_inter)) ||
        (st = get_int(o, "share_expert_dim", NULL, 0, 0, 0, MDL_MAX_DIM, what,
                      &cfg.share_expert_dim)) ||
        (st =
             get_int(o, "intermediate_size", NULL, 1, 0, 1, MDL_MAX_DIM, what, &cfg.dense_inter)) ||
        (st = get_int(o, "bos_token_id", NULL, 0, -1, -1, MDL_MAX_VOCAB, what, &cfg.bos_token_id)))
        goto out;
    if (cfg.head_dim == 0) {
        if (cfg.hidden_size % cfg.num_heads) {
            afd_error("%s: field 'head_dim' missing and hidden_size is not a multiple of "
                      "num_attention_heads",
                      what);
            st = AFD_ERR_FORMAT;
            goto out;
        }
        cfg.head_dim = cfg.hidden_size / cfg.num_heads;
    }
    double theta, eps;
    if ((st = get_num(o, "rope_theta", 10000.0, 1.0, 1e12, what, &theta)) ||
        (st = get_num(o, "rms_norm_eps", 1e-5, 1e-12, 1.0, what, &eps)))
        goto out;
    cfg.rope_theta = theta;
    cfg.rms_eps = (float)eps;
    const cJSON *nw = cJSON_GetObjectItemCaseSensitive(o, "norm_expert_weight");
    if (nw && !cJSON_IsBool(nw)) {
        afd_error("%s: field 'norm_expert_weight' must be true or false", what);
        st = AFD_ERR_FORMAT;
        goto out;
    }
    cfg.norm_expert_weight = nw && cJSON_IsTrue(nw);
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "rope_scaling");
    if (rs && !cJSON_IsNull(rs)) {
        afd_error("%s: field 'rope_scaling' is not supported (must be null)", what);
        st = AFD_ERR_UNSUPPORTED;
        goto out;
    }
    if ((st = parse_moe_layers(cJSON_GetObjectItemCaseSensitive(o, "moe_layers_enum"), what,
                               &cfg)) ||
        (st = parse_eos(o, what, &cfg)) || (st = parse_eos(root, what, &cfg)))
        goto out;
    /* quantization_config sits at the top level of the wrapper, or in the text config */
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (!q) q = cJSON_GetObjectItemCaseSensitive(o, "quantization_config");
    if ((st = parse_quant(q, what, &cfg))) goto out;
    if (tc) { /* the wrapper may carry eos at the top: keep the text config's when both exist */
        const cJSON *te = cJSON_GetObjectItemCaseSensitive(tc, "eos_token_id");
        if (te && (st = parse_eos(tc, what, &cfg))) goto out;
    }
    if ((st = mdl_config_validate(&cfg, what))) goto out;
    *out = cfg;
out:
    cJSON_Delete(root);
    return st;
}

afd_status_t mdl_config_validate(const mdl_config_t *c, const char *what)
{
    if (c->num_kv_heads != 1) {
        afd_error("%s: field 'num_attention_groups' = %d: MFA needs exactly one shared KV head",
                  what, c->num_kv_heads);
        return AFD_ERR_UNSUPPORTED;
    }
    if (c->head_dim % 2) {
        afd_error("%s: field 'head_dim' = %d must be even for rotary embeddings", what,
                  c->head_dim);
        return AFD_ERR_FORMAT;
    }
    if ((long)c->num_heads * c->head_dim > MDL_MAX_DIM) {
        afd_error("%s: fields 'num_attention_heads' x 'head_dim' exceed %d", what, MDL_MAX_DIM);
        return AFD_ERR_RANGE;
    }
    int nmoe = mdl_config_num_moe(c);
    if (nmoe > 0 && c->num_experts == 0) {
        afd_error("%s: field 'moe_layers_enum' lists MoE layers but moe_num_experts is 0", what);
        return AFD_ERR_FORMAT;
    }
    if (nmoe > 0 && (c->top_k < 1 || c->top_k > c->num_experts)) {
        afd_error("%s: field 'moe_top_k' = %d must be in [1, moe_num_experts = %d]", what, c->top_k,
                  c->num_experts);
        return AFD_ERR_RANGE;
    }
    if (nmoe > 0 && c->moe_inter < 1) {
        afd_error("%s: field 'moe_intermediate_size' must be positive", what);
        return AFD_ERR_RANGE;
    }
    if (c->bos_token_id >= c->vocab_size) {
        afd_error("%s: field 'bos_token_id' = %d is not below vocab_size", what, c->bos_token_id);
        return AFD_ERR_RANGE;
    }
    return AFD_OK;
}

int mdl_config_num_moe(const mdl_config_t *c)
{
    int n = 0;
    for (int l = 0; l < c->num_layers; l++)
        n += c->is_moe[l];
    return n;
}

afd_status_t mdl_config_load(const char *dir, mdl_config_t *cfg)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        afd_error("%s: %m", path);
        return AFD_ERR_IO;
    }
    char *buf = malloc(MDL_CONFIG_MAX_BYTES + 1);
    if (!buf) {
        fclose(f);
        return AFD_ERR_NOMEM;
    }
    size_t n = fread(buf, 1, MDL_CONFIG_MAX_BYTES + 1, f);
    int err = ferror(f);
    fclose(f);
    afd_status_t st;
    if (err) {
        afd_error("%s: read failed", path);
        st = AFD_ERR_IO;
    } else if (n > MDL_CONFIG_MAX_BYTES) {
        afd_error("%s: larger than %d bytes", path, MDL_CONFIG_MAX_BYTES);
        st = AFD_ERR_RANGE;
    } else {
        buf[n] = 0;
        st = mdl_config_parse(buf, path, cfg);
    }
    free(buf);
    return st;
}
