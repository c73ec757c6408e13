/*
 * afd_mkmodel: writes a Step3-architecture checkpoint in the release layout
 * (config.json with the step3_vl wrapper, 2+ safetensors shards, the index, the
 * real tensor names, experts fused as 3-D tensors) with seeded random weights,
 * in bf16 or block-fp8 (e4m3 + float32 _scale_inv per 128x128 block; embeddings,
 * norms, routers and lm_head stay bf16). The float32 master values depend only on
 * the seed, the tensor name and its shape, so a bf16 and an fp8 checkpoint of one
 * seed hold the same model up to rounding.
 *
 * Beside the weights it writes a real tokenizer: tokenizer.json (a byte-level BPE of the
 * DeepSeek-V3 shape, trained here over a bundled text sample to exactly vocab_size ids:
 * special tokens, the 256 bytes, the learned merges, then placeholder special tokens) and
 * tokenizer_config.json with a Step3-style chat template.
 */
#define _GNU_SOURCE
#include "afd_dtype.h"
#include "afd_log.h"
#include "afd_opts.h"
#include "mdl_config.h"
#include "mdl_sampler.h"
#include "tok.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct mk_opts {
    char *out, *preset, *dtype, *moe_layers;
    long seed, hidden, layers, heads, head_dim, share_q, experts, top_k, moe_inter, share_expert,
        dense_inter, vocab, shards, max_pos;
    double rope_theta;
    int norm_expert_weight, plain_config, force, vision_stub, tokenizer;
} mk_opts_t;

#define O(f) offsetof(mk_opts_t, f)
static const afd_opt_t mk_table[] = {
    {"out", AFD_OPT_STRING, NULL, O(out), 0, 0, AFD_OPT_NOENV, "output directory (required)"},
    {"preset", AFD_OPT_STRING, "tiny", O(preset), 0, 0, AFD_OPT_NOENV,
     "tiny (tests), mini (CPU benchmarks) or step3 (real shapes)"},
    {"dtype", AFD_OPT_STRING, "bf16", O(dtype), 0, 0, AFD_OPT_NOENV, "bf16 or fp8 (block e4m3)"},
    {"seed", AFD_OPT_INT, "1234", O(seed), 0, 1e15, AFD_OPT_NOENV, "weight seed"},
    {"hidden", AFD_OPT_INT, "0", O(hidden), 0, 131072, AFD_OPT_NOENV, "hidden_size (0: preset)"},
    {"layers", AFD_OPT_INT, "0", O(layers), 0, 1024, AFD_OPT_NOENV, "num_hidden_layers"},
    {"heads", AFD_OPT_INT, "0", O(heads), 0, 4096, AFD_OPT_NOENV, "num_attention_heads"},
    {"head-dim", AFD_OPT_INT, "0", O(head_dim), 0, 4096, AFD_OPT_NOENV, "head_dim"},
    {"share-q", AFD_OPT_INT, "0", O(share_q), 0, 131072, AFD_OPT_NOENV, "share_q_dim"},
    {"experts", AFD_OPT_INT, "0", O(experts), 0, 1024, AFD_OPT_NOENV, "moe_num_experts"},
    {"top-k", AFD_OPT_INT, "0", O(top_k), 0, 1024, AFD_OPT_NOENV, "moe_top_k"},
    {"moe-inter", AFD_OPT_INT, "0", O(moe_inter), 0, 131072, AFD_OPT_NOENV,
     "moe_intermediate_size"},
    {"share-expert", AFD_OPT_INT, "0", O(share_expert), 0, 131072, AFD_OPT_NOENV,
     "share_expert_dim"},
    {"dense-inter", AFD_OPT_INT, "0", O(dense_inter), 0, 131072, AFD_OPT_NOENV,
     "intermediate_size (dense MLP)"},
    {"vocab", AFD_OPT_INT, "0", O(vocab), 0, 1 << 21, AFD_OPT_NOENV, "vocab_size"},
    {"moe-layers", AFD_OPT_STRING, NULL, O(moe_layers), 0, 0, AFD_OPT_NOENV,
     "moe_layers_enum, e.g. \"1,2\" (default: the preset's, cut to the layer count)"},
    {"shards", AFD_OPT_INT, "0", O(shards), 0, 4096, AFD_OPT_NOENV, "number of shards"},
    {"max-pos", AFD_OPT_INT, "0", O(max_pos), 0, 1 << 24, AFD_OPT_NOENV, "max_position_embedding"},
    {"rope-theta", AFD_OPT_DOUBLE, "0", O(rope_theta), 0, 1e12, AFD_OPT_NOENV, "rope_theta"},
    {"norm-expert-weight", AFD_OPT_BOOL, "false", O(norm_expert_weight), 0, 0, AFD_OPT_NOENV,
     "renormalise the top-k routing weights"},
    {"plain-config", AFD_OPT_BOOL, "false", O(plain_config), 0, 0, AFD_OPT_NOENV,
     "write a plain text config instead of the step3_vl wrapper"},
    {"vision-stub", AFD_OPT_BOOL, "true", O(vision_stub), 0, 0, AFD_OPT_NOENV,
     "add a small vision_model tensor, as the release has (loaders skip it)"},
    {"force", AFD_OPT_BOOL, "false", O(force), 0, 0, AFD_OPT_NOENV,
     "overwrite an existing checkpoint"},
    {"tokenizer", AFD_OPT_BOOL, "true", O(tokenizer), 0, 0, AFD_OPT_NOENV,
     "write tokenizer.json (a BPE trained on a bundled sample) and tokenizer_config.json"},
    AFD_OPTS_END};
#undef O

typedef struct mk_shape {
    int hidden, layers, heads, head_dim, share_q, experts, top_k, moe_inter, share_expert,
        dense_inter, vocab, shards, max_pos;
    double theta;
    const char *moe_layers;
} mk_shape_t;

static const mk_shape_t presets[] = {
    {320, 4, 4, 64, 160, 8, 3, 192, 192, 384, 1024, 2, 4096, 500000, "1,2"},
    {1024, 6, 16, 128, 512, 16, 3, 1024, 1024, 2048, 8192, 3, 16384, 500000, "1,2,3,4"},
    {7168, 61, 64, 256, 2048, 48, 3, 5120, 5120, 18432, 128815, 8, 65536, 500000, NULL},
};
static const char *preset_names[] = {"tiny", "mini", "step3"};

/* how a tensor's master values are drawn */
typedef enum { INIT_NORMAL, INIT_NORM_WEIGHT } init_t;

typedef struct mk_tensor {
    char name[160];
    int ndim;
    int64_t shape[3];
    init_t init;
    float std;
    int quant; /* stored as e4m3 with block scales */
    int shard;
    afd_dtype_t dtype;
    uint64_t nbytes, off;
    int is_scale; /* the _scale_inv companion of the previous tensor */
} mk_tensor_t;

typedef struct mk_plan {
    mk_tensor_t *t;
    int n, cap;
} mk_plan_t;

static mk_tensor_t *plan_add(mk_plan_t *p, const char *name, int ndim, const int64_t *shape,
                             init_t init, float std, int quant)
{
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 256;
        p->t = realloc(p->t, sizeof(*p->t) * (size_t)p->cap);
        AFD_ASSERT(p->t);
    }
    mk_tensor_t *t = &p->t[p->n++];
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    t->init = init;
    t->std = std;
    t->quant = quant;
    t->dtype = quant ? AFD_DTYPE_E4M3 : AFD_DTYPE_BF16;
    uint64_t el = 1;
    for (int i = 0; i < ndim; i++)
        el *= (uint64_t)shape[i];
    t->nbytes = el * afd_dtype_size(t->dtype);
    if (quant) { /* the scale tensor follows */
        mk_tensor_t w = *t;
        if (p->n == p->cap) {
            p->cap *= 2;
            p->t = realloc(p->t, sizeof(*p->t) * (size_t)p->cap);
            AFD_ASSERT(p->t);
        }
        mk_tensor_t *s = &p->t[p->n++];
        memset(s, 0, sizeof(*s));
        snprintf(s->name, sizeof(s->name), "%s_scale_inv", name);
        s->ndim = ndim;
        for (int i = 0; i < ndim; i++)
            s->shape[i] = w.shape[i];
        s->shape[ndim - 1] = (w.shape[ndim - 1] + 127) / 128;
        s->shape[ndim - 2] = (w.shape[ndim - 2] + 127) / 128;
        s->dtype = AFD_DTYPE_F32;
        s->is_scale = 1;
        uint64_t se = 1;
        for (int i = 0; i < ndim; i++)
            se *= (uint64_t)s->shape[i];
        s->nbytes = se * 4;
        return &p->t[p->n - 2];
    }
    return t;
}

static void add_linear(mk_plan_t *p, const char *name, int64_t out, int64_t in, int fp8)
{
    int64_t s[2] = {out, in};
    plan_add(p, name, 2, s, INIT_NORMAL, 1.0f / sqrtf((float)in), fp8);
}

static void add_norm(mk_plan_t *p, const char *name, int64_t n)
{
    plan_add(p, name, 1, &n, INIT_NORM_WEIGHT, 0.1f, 0);
}

static void build_plan(const mk_shape_t *s, const uint8_t *is_moe, int fp8, int vision,
                       mk_plan_t *p)
{
    char n[160];
    int64_t H = s->hidden, QH = (int64_t)s->heads * s->head_dim;
    int64_t emb[2] = {s->vocab, H};
    plan_add(p, "model.embed_tokens.weight", 2, emb, INIT_NORMAL, 1.0f, 0);
    for (int l = 0; l < s->layers; l++) {
#define N(fmt) (snprintf(n, sizeof(n), "model.layers.%d." fmt, l), n)
        add_norm(p, N("input_layernorm.weight"), H);
        add_linear(p, N("self_attn.q_proj.weight"), s->share_q, H, fp8);
        add_norm(p, N("self_attn.inter_norm.weight"), s->share_q);
        add_linear(p, N("self_attn.wq.weight"), QH, s->share_q, fp8);
        add_linear(p, N("self_attn.k_proj.weight"), s->head_dim, H, fp8);
        add_linear(p, N("self_attn.v_proj.weight"), s->head_dim, H, fp8);
        add_linear(p, N("self_attn.o_proj.weight"), H, QH, fp8);
        add_norm(p, N("post_attention_layernorm.weight"), H);
        if (is_moe[l]) {
            int64_t r[2] = {s->experts, H};
            plan_add(p, N("moe.gate.weight"), 2, r, INIT_NORMAL, 3.0f / sqrtf((float)H), 0);
            int64_t gu[3] = {s->experts, s->moe_inter, H}, dn[3] = {s->experts, H, s->moe_inter};
            plan_add(p, N("moe.gate_proj.weight"), 3, gu, INIT_NORMAL, 1.0f / sqrtf((float)H), fp8);
            plan_add(p, N("moe.up_proj.weight"), 3, gu, INIT_NORMAL, 1.0f / sqrtf((float)H), fp8);
            plan_add(p, N("moe.down_proj.weight"), 3, dn, INIT_NORMAL,
                     1.0f / sqrtf((float)s->moe_inter), fp8);
            if (s->share_expert > 0) {
                add_linear(p, N("share_expert.gate_proj.weight"), s->share_expert, H, fp8);
                add_linear(p, N("share_expert.up_proj.weight"), s->share_expert, H, fp8);
                add_linear(p, N("share_expert.down_proj.weight"), H, s->share_expert, fp8);
            }
        } else {
            add_linear(p, N("mlp.gate_proj.weight"), s->dense_inter, H, fp8);
            add_linear(p, N("mlp.up_proj.weight"), s->dense_inter, H, fp8);
            add_linear(p, N("mlp.down_proj.weight"), H, s->dense_inter, fp8);
        }
#undef N
    }
    add_norm(p, "model.norm.weight", H);
    int64_t lm[2] = {s->vocab, H};
    plan_add(p, "lm_head.weight", 2, lm, INIT_NORMAL, 2.0f / sqrtf((float)H), 0);
    if (vision) {
        int64_t v[2] = {8, 8};
        plan_add(p, "vision_model.embeddings.patch_embedding.weight", 2, v, INIT_NORMAL, 1.0f, 0);
    }
}

static uint64_t name_seed(uint64_t seed, const char *name)
{
    uint64_t h = 1469598103934665603ull ^ seed;
    for (; *name; name++)
        h = (h ^ (uint8_t)*name) * 1099511628211ull;
    return h;
}

/* master values of one 2-D matrix (index `mat` of the tensor) */
static void gen_matrix(const mk_tensor_t *t, uint64_t seed, int64_t mat, float *dst, size_t n)
{
    mdl_rng_t rng;
    mdl_rng_seed(&rng, name_seed(seed, t->name) + (uint64_t)mat * 0x9e3779b97f4a7c15ull);
    for (size_t i = 0; i < n; i += 2) {
        double u1 = mdl_rng_uniform(&rng), u2 = mdl_rng_uniform(&rng);
        double r = sqrt(-2.0 * log(1.0 - u1)), a = 2 * M_PI * u2;
        float z0 = (float)(r * cos(a)), z1 = (float)(r * sin(a));
        if (t->init == INIT_NORM_WEIGHT) {
            z0 = 1.0f + t->std * z0;
            z1 = 1.0f + t->std * z1;
        } else {
            z0 *= t->std;
            z1 *= t->std;
        }
        dst[i] = z0;
        if (i + 1 < n) dst[i + 1] = z1;
    }
}

/* block-quantises one [rows, cols] matrix: q (rows*cols), scales (br*bc) */
static void quant_matrix(const float *w, int64_t rows, int64_t cols, uint8_t *q, float *scales)
{
    int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
    for (int64_t bi = 0; bi < br; bi++)
        for (int64_t bj = 0; bj < bc; bj++) {
            float amax = 0;
            int64_t r1 = (bi + 1) * 128 < rows ? (bi + 1) * 128 : rows;
            int64_t c1 = (bj + 1) * 128 < cols ? (bj + 1) * 128 : cols;
            for (int64_t r = bi * 128; r < r1; r++)
                for (int64_t c = bj * 128; c < c1; c++)
                    amax = fmaxf(amax, fabsf(w[r * cols + c]));
            float s = amax > 0 ? amax / AFD_E4M3_MAX : 1.0f;
            scales[bi * bc + bj] = s;
            for (int64_t r = bi * 128; r < r1; r++)
                for (int64_t c = bj * 128; c < c1; c++)
                    q[r * cols + c] = afd_f32_to_e4m3(w[r * cols + c] / s);
        }
}

static int write_all(FILE *f, const void *p, size_t n)
{
    return fwrite(p, 1, n, f) == n ? 0 : -1;
}

typedef struct progress {
    uint64_t total, done;
    int tty;
} progress_t;

static void progress_tick(progress_t *pg, uint64_t bytes)
{
    pg->done += bytes;
    if (pg->tty)
        fprintf(stderr, "\rwriting: %.2f / %.2f GB (%3.0f%%)", pg->done / 1e9, pg->total / 1e9,
                100.0 * pg->done / (pg->total ? pg->total : 1));
}

/* writes tensor t (and its scale tensor s when quantised) data */
static afd_status_t write_tensor_data(FILE *f, const mk_tensor_t *t, const mk_tensor_t *s,
                                      uint64_t seed, long *scale_pos, FILE *sf, progress_t *pg)
{
    int64_t rows = t->ndim == 1 ? 1 : t->shape[t->ndim - 2];
    int64_t cols = t->shape[t->ndim - 1];
    int64_t mats = t->ndim == 3 ? t->shape[0] : 1;
    size_t n = (size_t)(rows * cols);
    float *w = malloc(sizeof(float) * n);
    void *buf = malloc(n * 2);
    int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
    float *sc = s ? malloc(sizeof(float) * (size_t)(br * bc)) : NULL;
    afd_status_t st = AFD_OK;
    if (!w || !buf || (s && !sc)) {
        st = AFD_ERR_NOMEM;
        goto out;
    }
    for (int64_t m = 0; m < mats; m++) {
        gen_matrix(t, seed, m, w, n);
        if (t->quant) {
            quant_matrix(w, rows, cols, buf, sc);
            if (write_all(f, buf, n)) goto io;
            /* the scale tensor may live in another shard: write at its offset */
            if (fseek(sf, *scale_pos, SEEK_SET) ||
                write_all(sf, sc, sizeof(float) * (size_t)(br * bc)))
                goto io;
            *scale_pos += (long)(sizeof(float) * (size_t)(br * bc));
        } else {
            afd_convert_from_f32(AFD_DTYPE_BF16, w, buf, n);
            if (write_all(f, buf, n * 2)) goto io;
        }
        progress_tick(pg, n * afd_dtype_size(t->dtype));
    }
    goto out;
io:
    afd_error("write failed: %m");
    st = AFD_ERR_IO;
out:
    free(w);
    free(buf);
    free(sc);
    return st;
}

static afd_status_t write_config(const char *dir, const mk_shape_t *s, const char *moe_enum,
                                 int fp8, int norm_w, int plain)
{
    cJSON *tc = cJSON_CreateObject();
    cJSON_AddItemToObject(tc, "architectures",
                          cJSON_CreateStringArray((const char *[]){"Step3TextForCausalLM"}, 1));
    cJSON_AddStringToObject(tc, "model_type", "step3_text");
    cJSON_AddNumberToObject(tc, "hidden_size", s->hidden);
    cJSON_AddNumberToObject(tc, "intermediate_size", s->dense_inter);
    cJSON_AddNumberToObject(tc, "num_attention_heads", s->heads);
    cJSON_AddNumberToObject(tc, "num_attention_groups", 1);
    cJSON_AddNumberToObject(tc, "num_hidden_layers", s->layers);
    cJSON_AddNumberToObject(tc, "max_seq_len", s->max_pos);
    cJSON_AddNumberToObject(tc, "vocab_size", s->vocab);
    cJSON_AddNumberToObject(tc, "rms_norm_eps", 1e-5);
    cJSON_AddNumberToObject(tc, "moe_intermediate_size", s->moe_inter);
    cJSON_AddNumberToObject(tc, "moe_num_experts", s->experts);
    cJSON_AddNumberToObject(tc, "moe_top_k", s->top_k);
    cJSON_AddNumberToObject(tc, "rope_theta", s->theta);
    cJSON_AddNullToObject(tc, "rope_scaling");
    cJSON_AddNumberToObject(tc, "max_position_embedding", s->max_pos);
    cJSON_AddNumberToObject(tc, "share_expert_dim", s->share_expert);
    cJSON_AddNumberToObject(tc, "share_q_dim", s->share_q);
    cJSON_AddNumberToObject(tc, "head_dim", s->head_dim);
    cJSON_AddBoolToObject(tc, "norm_expert_weight", norm_w);
    cJSON_AddStringToObject(tc, "moe_layers_enum", moe_enum);
    cJSON_AddNumberToObject(tc, "bos_token_id", 0);
    cJSON_AddNumberToObject(tc, "eos_token_id", 1);
    cJSON_AddStringToObject(tc, "torch_dtype", "bfloat16");
    cJSON *q = NULL;
    if (fp8) {
        q = cJSON_CreateObject();
        cJSON_AddStringToObject(q, "quant_method", "fp8");
        cJSON_AddStringToObject(q, "fmt", "e4m3");
        cJSON_AddStringToObject(q, "activation_scheme", "dynamic");
        cJSON_AddItemToObject(q, "weight_block_size",
                              cJSON_CreateIntArray((const int[]){128, 128}, 2));
    }
    cJSON *root;
    if (plain) {
        root = tc;
        if (q) cJSON_AddItemToObject(root, "quantization_config", q);
    } else {
        root = cJSON_CreateObject();
        cJSON_AddItemToObject(
            root, "architectures",
            cJSON_CreateStringArray((const char *[]){"Step3VLForConditionalGeneration"}, 1));
        cJSON_AddStringToObject(root, "model_type", "step3_vl");
        cJSON_AddItemToObject(root, "text_config", tc);
        cJSON *vc = cJSON_CreateObject();
        cJSON_AddNumberToObject(vc, "hidden_size", 8);
        cJSON_AddItemToObject(root, "vision_config", vc);
        if (q) cJSON_AddItemToObject(root, "quantization_config", q);
        cJSON_AddStringToObject(root, "torch_dtype", "bfloat16");
    }
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    char path[4096];
    /* written under a temporary name: config.json appears last, when the shards are whole */
    snprintf(path, sizeof(path), "%s/config.json.tmp", dir);
    FILE *f = fopen(path, "w");
    afd_status_t st = AFD_OK;
    if (!f || fputs(txt, f) < 0 || fputc('\n', f) < 0) {
        afd_error("%s: %m", path);
        st = AFD_ERR_IO;
    }
    if (f && fclose(f)) st = AFD_ERR_IO;
    free(txt);
    return st;
}

/* The special tokens, in id order from 0 (bos_token_id 0 and eos_token_id 1, as the
 * config says); <think> and </think> are added tokens that decode as text. */
static const tok_special_t mk_specials[] = {
    {"<｜begin▁of▁sentence｜>", 1},
    {"<｜end▁of▁sentence｜>", 1},
    {"<｜▁pad▁｜>", 1},
    {"<|BOT|>", 1},
    {"<|EOT|>", 1},
    {"<think>", 0},
    {"</think>", 0},
};

/* Step3's chat format: the system prompt after the BOS, each other turn as
 * <|BOT|>role\ncontent<|EOT|>, and the generation prompt opening the assistant's turn;
 * content is a string or a list of text parts (render_content). */
static const char mk_chat_template[] =
    "{%- macro render_content(content) -%}\n"
    "{%- if content is string -%}{{- content -}}\n"
    "{%- elif content is mapping -%}{{- content['text'] -}}\n"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}"
    "{{- part['text'] -}}{%- endif -%}{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{{- bos_token -}}\n"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- render_content(messages[0]['content']) -}}{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- if not loop.first -%}"
    "{{- '<|BOT|>system\\n' + render_content(message['content']) + '<|EOT|>' -}}"
    "{%- endif -%}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{- '<|BOT|>user\\n' + render_content(message['content']) + '<|EOT|>' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '<|BOT|>assistant\\n' + (render_content(message['content']) if message['content'] "
    "else '') + '<|EOT|>' -}}\n"
    "{%- else -%}{{- raise_exception('unknown role: ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|BOT|>assistant\\n<think>\\n' -}}{%- endif -%}";

static afd_status_t write_tokenizer(const char *dir, int vocab, int max_pos)
{
    char path[4096];
    size_t n;
    const char *text = tok_sample_text(&n);
    int nspecial = (int)(sizeof(mk_specials) / sizeof(*mk_specials)), nmerges = 0;
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    afd_status_t st = tok_train_write(text, n, vocab, mk_specials, nspecial, path, &nmerges);
    if (st) return st;
    cJSON *c = cJSON_CreateObject();
    cJSON_AddBoolToObject(c, "add_bos_token", 1);
    cJSON_AddBoolToObject(c, "add_eos_token", 0);
    cJSON_AddStringToObject(c, "bos_token", mk_specials[0].content);
    cJSON_AddStringToObject(c, "eos_token", mk_specials[1].content);
    cJSON_AddStringToObject(c, "pad_token", mk_specials[2].content);
    cJSON_AddBoolToObject(c, "clean_up_tokenization_spaces", 0);
    cJSON_AddBoolToObject(c, "legacy", 1);
    cJSON_AddNumberToObject(c, "model_max_length", max_pos);
    cJSON_AddStringToObject(c, "tokenizer_class", "LlamaTokenizerFast");
    cJSON_AddStringToObject(c, "chat_template", mk_chat_template);
    char *txt = cJSON_Print(c);
    cJSON_Delete(c);
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    FILE *f = fopen(path, "w");
    st = AFD_OK;
    if (!txt || !f || fputs(txt, f) < 0 || fputc('\n', f) < 0) {
        afd_error("%s: %m", path);
        st = AFD_ERR_IO;
    }
    if (f && fclose(f)) st = AFD_ERR_IO;
    free(txt);
    /* check both load as the coordinator will load them */
    tok_t *t;
    tok_chat_t chat;
    if (!st && !(st = tok_chat_load(path, &chat))) tok_chat_fini(&chat);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    if (!st && !(st = tok_load(path, &t))) tok_free(t);
    if (!st)
        printf("tokenizer: %d ids (%d special, 256 bytes, %d merges)\n", vocab, nspecial, nmerges);
    return st;
}

int main(int argc, char **argv)
{
    afd_log_init(argv[0]);
    mk_opts_t o;
    memset(&o, 0, sizeof(o));
    int first;
    afd_status_t st = afd_opts_parse(mk_table, &o, argc, argv,
                                     "usage: afd_mkmodel --out DIR [--preset tiny|mini|step3] "
                                     "[--dtype bf16|fp8] [size flags]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        return 2;
    }
    if (!o.out) {
        afd_error("--out DIR is required");
        return 2;
    }
    int pi = -1;
    for (int i = 0; i < 3; i++)
        if (!strcmp(o.preset, preset_names[i])) pi = i;
    if (pi < 0) {
        afd_error("--preset must be tiny, mini or step3, not '%s'", o.preset);
        return 2;
    }
    afd_dtype_t dt = afd_dtype_parse(o.dtype);
    if (dt != AFD_DTYPE_BF16 && dt != AFD_DTYPE_E4M3) {
        afd_error("--dtype must be bf16 or fp8");
        return 2;
    }
    int fp8 = dt == AFD_DTYPE_E4M3;
    mk_shape_t s = presets[pi];
#define OV(f, v)                                                                                   \
    if (o.v) s.f = (int)o.v
    OV(hidden, hidden);
    OV(layers, layers);
    OV(heads, heads);
    OV(head_dim, head_dim);
    OV(share_q, share_q);
    OV(experts, experts);
    OV(top_k, top_k);
    OV(moe_inter, moe_inter);
    OV(share_expert, share_expert);
    OV(dense_inter, dense_inter);
    OV(vocab, vocab);
    OV(shards, shards);
    OV(max_pos, max_pos);
#undef OV
    if (o.rope_theta > 0) s.theta = o.rope_theta;
    if (s.shards < 1) s.shards = 1;

    /* the MoE layer list: given, or the preset's cut to the layer count */
    char moe_enum[8192] = "";
    size_t k = 0;
    uint8_t is_moe[MDL_MAX_LAYERS] = {0};
    if (o.moe_layers) {
        int *v, n;
        if (*o.moe_layers && afd_parse_int_list(o.moe_layers, 0, s.layers - 1, &v, &n)) {
            afd_error("--moe-layers: '%s' is not a comma list of layers below %d", o.moe_layers,
                      s.layers);
            return 2;
        }
        if (*o.moe_layers) {
            for (int i = 0; i < n; i++)
                is_moe[v[i]] = 1;
            free(v);
        }
    } else if (s.moe_layers) {
        int *v, n;
        afd_parse_int_list(s.moe_layers, 0, 1 << 20, &v, &n);
        for (int i = 0; i < n; i++)
            if (v[i] < s.layers) is_moe[v[i]] = 1;
        free(v);
    } else { /* step3: layers 4 .. L-2 are MoE */
        for (int l = 4; l < s.layers - 1; l++)
            is_moe[l] = 1;
    }
    for (int l = 0; l < s.layers; l++)
        if (is_moe[l] && k < sizeof(moe_enum) - 8)
            k += (size_t)snprintf(moe_enum + k, sizeof(moe_enum) - k, "%s%d", k ? "," : "", l);

    /* the directory and its missing parents, like mkdir -p */
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", o.out);
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(dir, 0755) && errno != EEXIST) {
            afd_error("%s: %m", dir);
            return 1;
        }
        *p = '/';
    }
    if (mkdir(o.out, 0755) && errno != EEXIST) {
        afd_error("%s: %m", o.out);
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", o.out);
    if (!o.force && access(path, F_OK) == 0) {
        afd_error("%s already holds a checkpoint (use --force to overwrite)", o.out);
        return 1;
    }
    snprintf(path, sizeof(path), "%s/config.json", o.out);
    unlink(path); /* an interrupted rewrite must not look complete */
    if ((st = write_config(o.out, &s, moe_enum, fp8, o.norm_expert_weight, o.plain_config)))
        return 1;
    if (o.tokenizer && write_tokenizer(o.out, s.vocab, s.max_pos)) return 1;

    mk_plan_t plan = {0};
    build_plan(&s, is_moe, fp8, o.vision_stub && !o.plain_config, &plan);
    uint64_t total = 0;
    for (int i = 0; i < plan.n; i++)
        total += plan.t[i].nbytes;
    /* shards: cut where the running size passes i/S of the total; a scale stays with its
     * weight */
    uint64_t run = 0;
    for (int i = 0; i < plan.n; i++) {
        mk_tensor_t *t = &plan.t[i];
        if (t->is_scale) {
            t->shard = plan.t[i - 1].shard;
        } else {
            t->shard = (int)((run * (uint64_t)s.shards) / (total ? total : 1));
            if (t->shard >= s.shards) t->shard = s.shards - 1;
        }
        run += t->nbytes;
    }
    progress_t pg = {.total = total, .tty = isatty(2)};
    cJSON *index = cJSON_CreateObject(), *meta = cJSON_CreateObject(), *wm = cJSON_CreateObject();
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    cJSON_AddItemToObject(index, "metadata", meta);
    cJSON_AddItemToObject(index, "weight_map", wm);
    for (int sh = 0; sh < s.shards; sh++) {
        char fname[128];
        snprintf(fname, sizeof(fname), "model-%05d-of-%05d.safetensors", sh + 1, s.shards);
        cJSON *hdr = cJSON_CreateObject();
        cJSON *hm = cJSON_CreateObject();
        cJSON_AddStringToObject(hm, "format", "pt");
        cJSON_AddItemToObject(hdr, "__metadata__", hm);
        uint64_t off = 0;
        for (int i = 0; i < plan.n; i++) {
            mk_tensor_t *t = &plan.t[i];
            if (t->shard != sh) continue;
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "dtype", afd_dtype_safetensors_name(t->dtype));
            cJSON *shp = cJSON_CreateArray();
            for (int d = 0; d < t->ndim; d++)
                cJSON_AddItemToArray(shp, cJSON_CreateNumber((double)t->shape[d]));
            cJSON_AddItemToObject(e, "shape", shp);
            cJSON *offs = cJSON_CreateArray();
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + t->nbytes)));
            cJSON_AddItemToObject(e, "data_offsets", offs);
            cJSON_AddItemToObject(hdr, t->name, e);
            cJSON_AddStringToObject(wm, t->name, fname);
            t->off = off;
            off += t->nbytes;
        }
        char *htxt = cJSON_PrintUnformatted(hdr);
        cJSON_Delete(hdr);
        size_t hlen = strlen(htxt), padded = (hlen + 7) & ~(size_t)7;
        snprintf(path, sizeof(path), "%s/%s", o.out, fname);
        FILE *f = fopen(path, "w+b");
        if (!f) {
            afd_error("%s: %m", path);
            return 1;
        }
        uint8_t lenb[8];
        for (int b = 0; b < 8; b++)
            lenb[b] = (uint8_t)(padded >> (8 * b));
        int bad = write_all(f, lenb, 8) || write_all(f, htxt, hlen);
        for (size_t pad = hlen; pad < padded && !bad; pad++)
            bad = fputc(' ', f) == EOF;
        free(htxt);
        long data0 = (long)(8 + padded);
        /* a second handle positions the scale companions while the weight streams */
        FILE *sf = fopen(path, "r+b");
        if (!sf) bad = 1;
        for (int i = 0; i < plan.n && !bad; i++) {
            mk_tensor_t *t = &plan.t[i];
            if (t->shard != sh || t->is_scale) continue;
            if (fseek(f, data0 + (long)t->off, SEEK_SET)) bad = 1;
            long spos = t->quant ? data0 + (long)plan.t[i + 1].off : 0;
            if (!bad && write_tensor_data(f, t, t->quant ? &plan.t[i + 1] : NULL, (uint64_t)o.seed,
                                          &spos, sf, &pg))
                bad = 1;
        }
        if (sf && fclose(sf)) bad = 1;
        if (fclose(f) || bad) {
            afd_error("%s: write failed", path);
            return 1;
        }
    }
    if (pg.tty) fputc('\n', stderr);
    char *itxt = cJSON_Print(index);
    cJSON_Delete(index);
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", o.out);
    FILE *f = fopen(path, "w");
    if (!f || fputs(itxt, f) < 0 || fclose(f)) {
        afd_error("%s: %m", path);
        return 1;
    }
    free(itxt);
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s/config.json.tmp", o.out);
    snprintf(path, sizeof(path), "%s/config.json", o.out);
    if (rename(tmp, path)) {
        afd_error("%s: %m", path);
        return 1;
    }
    /* check what was written parses as the loader will see it */
    mdl_config_t cfg;
    if (mdl_config_load(o.out, &cfg)) return 1;
    printf("wrote %s: preset %s, %s, %d layers (MoE: %s), %d tensors, %.1f MB in %d shards\n",
           o.out, o.preset, fp8 ? "fp8" : "bf16", s.layers, moe_enum[0] ? moe_enum : "none", plan.n,
           total / 1e6, s.shards);
    free(plan.t);
    afd_opts_free(mk_table, &o);
    return 0;
}
