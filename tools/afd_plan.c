/*
 * afd_plan: the deployment planner. From stage costs (measured with afd_bench decode or
 * specified: attention time per sequence and token of context, FFN time per token and
 * per layer's weights, link bandwidth and latency) and a TPOT target it chooses the A:F
 * ratio, the micro-batch count and the batch that give the most tokens/s per GPU, and
 * prints the per-layer time budget and whether the transfer fits in it.
 * Inputs come from --paper (the Step3 paper's figures), a JSON file (--input, keys as the
 * flags with '_' or '-'), then flags, each overriding the one before.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "afd_opts.h"
#include "afd_plan.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* one planner input: flag name, field of afd_plan_in_t, int or double, bounds, doc */
typedef struct plan_field {
    const char *name;
    size_t off;
    int is_int;
    double max;
    const char *doc;
} plan_field_t;

#define F(f) offsetof(afd_plan_in_t, f)
static const plan_field_t fields[] = {
    {"tpot-ms", F(tpot_ms), 0, 1e6, "TPOT target (ms)"},
    {"layers", F(layers), 1, 1e5, "decoder layers"},
    {"hidden", F(hidden), 1, 1 << 24, "hidden size (elements per token on the wire)"},
    {"context", F(context), 0, 1e9, "context length (tokens)"},
    {"gpus-per-instance", F(gpus_per_inst), 1, 4096, "GPUs per attention or FFN instance"},
    {"attn-fixed-us", F(attn_fixed_us), 0, 1e9, "attention: fixed time per micro-batch (us)"},
    {"attn-seq-us", F(attn_seq_us), 0, 1e9, "attention: time per sequence (us)"},
    {"attn-ctx-us", F(attn_ctx_us), 0, 1e9, "attention: time per sequence and context token"},
    {"ffn-fixed-us", F(ffn_fixed_us), 0, 1e9, "FFN: fixed time per micro-batch with F = 1 (us)"},
    {"ffn-tok-us", F(ffn_tok_us), 0, 1e9, "FFN: time per token on one FFN GPU (us)"},
    {"link-gbps", F(link_gbps), 0, 1e9, "link bandwidth per attention GPU (Gbit/s)"},
    {"link-lat-us", F(link_lat_us), 0, 1e9, "link latency per micro-batch transfer (us)"},
    {"a2f-bytes", F(a2f_bytes), 0, 8, "bytes per element attention -> FFN (fp8: 1)"},
    {"f2a-bytes", F(f2a_bytes), 0, 8, "bytes per element FFN -> attention (bf16: 2)"},
    {"kv-bytes-per-token", F(kv_bytes_tok), 0, 1e12, "KV cache bytes per token, all layers"},
    {"kv-gb", F(kv_gb), 0, 1e9, "KV memory per attention GPU (GB; 0: unbounded)"},
    {"batch-align", F(batch_align), 1, 1 << 20, "sequences per GPU per micro-batch: multiple"},
    {"max-attn", F(max_attn), 1, 256, "attention instances to consider"},
    {"max-ffn", F(max_ffn), 1, 256, "FFN instances to consider"},
    {"max-gpus", F(max_gpus), 1, 1e9, "GPUs in all (0: unbounded)"},
    {"min-micro-batches", F(m_lo), 1, 64, "micro-batch counts from"},
    {"max-micro-batches", F(m_hi), 1, 64, "micro-batch counts to"},
};
#undef F
#define NFIELDS (sizeof(fields) / sizeof(fields[0]))

typedef struct plan_opts {
    double v[NFIELDS]; /* -1: not given */
    char *input, *output, *measured;
    int paper;
} plan_opts_t;

static afd_opt_t table[NFIELDS + 5];

static void build_table(void)
{
    for (size_t i = 0; i < NFIELDS; i++)
        table[i] = (afd_opt_t){fields[i].name,
                               AFD_OPT_DOUBLE,
                               "-1",
                               offsetof(plan_opts_t, v) + i * sizeof(double),
                               -1,
                               fields[i].max,
                               AFD_OPT_NOENV,
                               fields[i].doc};
    table[NFIELDS] = (afd_opt_t){"paper",
                                 AFD_OPT_BOOL,
                                 "false",
                                 offsetof(plan_opts_t, paper),
                                 0,
                                 0,
                                 AFD_OPT_NOENV,
                                 "start from the Step3 paper's figures (2A2F on H800, FP8)"};
    table[NFIELDS + 1] = (afd_opt_t){"input",
                                     AFD_OPT_STRING,
                                     NULL,
                                     offsetof(plan_opts_t, input),
                                     0,
                                     0,
                                     AFD_OPT_NOENV,
                                     "JSON file of inputs (keys as flags)"};
    table[NFIELDS + 2] = (afd_opt_t){
        "output",      AFD_OPT_STRING,          "text", offsetof(plan_opts_t, output), 0, 0,
        AFD_OPT_NOENV, "text or json (-o json)"};
    table[NFIELDS + 3] =
        (afd_opt_t){"measured",
                    AFD_OPT_STRING,
                    NULL,
                    offsetof(plan_opts_t, measured),
                    0,
                    0,
                    AFD_OPT_NOENV,
                    "afd_bench decode/sweep JSON files (comma list): stage costs from 1A1F runs"};
    table[NFIELDS + 4] = (afd_opt_t)AFD_OPTS_END;
}

static void set_field(afd_plan_in_t *in, size_t i, double v)
{
    char *p = (char *)in + fields[i].off;
    if (fields[i].is_int)
        *(int *)p = (int)v;
    else
        *(double *)p = v;
}

static double get_field(const afd_plan_in_t *in, size_t i)
{
    const char *p = (const char *)in + fields[i].off;
    return fields[i].is_int ? *(const int *)p : *(const double *)p;
}

static afd_status_t load_json(const char *path, afd_plan_in_t *in)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        afd_error("--input %s: %m", path);
        return AFD_ERR_IO;
    }
    char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof(buf), f);
    int big = !feof(f);
    fclose(f);
    if (big) {
        afd_error("--input %s: larger than %zu bytes", path, sizeof(buf));
        return AFD_ERR_RANGE;
    }
    cJSON *j = cJSON_ParseWithLength(buf, n);
    if (!j || !cJSON_IsObject(j)) {
        afd_error("--input %s: not a JSON object", path);
        cJSON_Delete(j);
        return AFD_ERR_FORMAT;
    }
    for (cJSON *e = j->child; e; e = e->next) {
        char key[64];
        snprintf(key, sizeof(key), "%s", e->string);
        for (char *c = key; *c; c++)
            if (*c == '_') *c = '-';
        size_t i = 0;
        while (i < NFIELDS && strcmp(fields[i].name, key))
            i++;
        if (i == NFIELDS || !cJSON_IsNumber(e) || e->valuedouble < 0 ||
            e->valuedouble > fields[i].max) {
            afd_error("--input %s: '%s' is %s", path, e->string,
                      i == NFIELDS ? "not a planner input" : "not a number in range");
            cJSON_Delete(j);
            return AFD_ERR_INVALID;
        }
        set_field(in, i, e->valuedouble);
    }
    cJSON_Delete(j);
    return AFD_OK;
}

/* one 1A1F measurement: per layer and micro-batch, b sequences (= tokens) and stage times */
typedef struct meas {
    double b, t_attn, t_ffn;
} meas_t;

static cJSON *read_json_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        afd_error("--measured %s: %m", path);
        return NULL;
    }
    size_t cap = 1 << 24, n;
    char *buf = malloc(cap);
    n = buf ? fread(buf, 1, cap, f) : 0;
    int big = buf && !feof(f);
    fclose(f);
    cJSON *j = (buf && !big) ? cJSON_ParseWithLength(buf, n) : NULL;
    free(buf);
    if (!j) afd_error("--measured %s: not JSON (or larger than 16 MiB)", path);
    return j;
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) ? v->valuedouble : -1;
}

/* takes the 1A1F points of a decode result or a sweep's "points" */
static void take_points(const cJSON *pt, meas_t *ms, int *nm, int cap, afd_plan_in_t *in)
{
    if (num(pt, "attn_nodes") != 1 || num(pt, "ffn_nodes") != 1) return;
    double m = num(pt, "micro_batches"), B = num(pt, "batch"), L = num(pt, "layers");
    double H = num(pt, "hidden"), C = num(pt, "context");
    const cJSON *nodes = cJSON_GetObjectItemCaseSensitive(pt, "nodes"), *n;
    double ta = -1, tf = -1;
    cJSON_ArrayForEach(n, nodes)
    {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(n, "role");
        double v = num(n, "busy_ms_per_step");
        if (!cJSON_IsString(role) || v < 0) continue;
        if (!strcmp(role->valuestring, "attention"))
            ta = v;
        else
            tf = v;
    }
    if (m < 1 || B < 1 || L < 1 || H < 1 || ta < 0 || tf < 0 || *nm >= cap) return;
    /* busy per step covers every layer and micro-batch */
    ms[*nm].b = B / m;
    ms[*nm].t_attn = ta * 1000.0 / (L * m);
    ms[*nm].t_ffn = tf * 1000.0 / (L * m);
    (*nm)++;
    in->layers = (int)L;
    in->hidden = (int)H;
    if (C >= 0) in->context = C;
}

/* least squares t = c0 + c1 b, both >= 0 (a negative intercept is refitted through 0) */
static void fit(const meas_t *ms, int n, int ffn, double *c0, double *c1)
{
    double sb = 0, st = 0, sbb = 0, sbt = 0;
    for (int i = 0; i < n; i++) {
        double t = ffn ? ms[i].t_ffn : ms[i].t_attn;
        sb += ms[i].b;
        st += t;
        sbb += ms[i].b * ms[i].b;
        sbt += ms[i].b * t;
    }
    double den = n * sbb - sb * sb;
    *c0 = 0;
    *c1 = sbb > 0 ? sbt / sbb : 0;
    if (n >= 2 && den > 1e-12 * sbb * n) {
        double a = (n * sbt - sb * st) / den, z = (st - a * sb) / n;
        if (a >= 0 && z >= 0)
            *c0 = z, *c1 = a;
        else if (a < 0 && ffn)
            *c0 = st / n, *c1 = 0; /* flat: reading the weights dominates */
        /* attention falling with the batch is noise: keep the proportional fit (its cost
         * per sequence must stay above 0 for the planner) */
    }
}

/* stage costs from afd_bench decode/sweep results of a 1A1F cluster at several batches */
static afd_status_t load_measured(const char *list, afd_plan_in_t *in)
{
    meas_t ms[256];
    int nm = 0;
    char *dup = strdup(list), *save = NULL;
    if (!dup) return AFD_ERR_NOMEM;
    for (char *f = strtok_r(dup, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        cJSON *j = read_json_file(f);
        if (!j) {
            free(dup);
            return AFD_ERR_FORMAT;
        }
        const cJSON *pts = cJSON_GetObjectItemCaseSensitive(j, "points"), *p;
        if (cJSON_IsArray(pts)) {
            cJSON_ArrayForEach(p, pts) take_points(p, ms, &nm, 256, in);
        } else {
            take_points(j, ms, &nm, 256, in);
        }
        cJSON_Delete(j);
    }
    free(dup);
    if (nm == 0) {
        afd_error("--measured: no 1A1F point with numeric micro-batches, layers, hidden and "
                  "both nodes' busy times (run afd_bench decode --model ... --attn 1 --ffn 1)");
        return AFD_ERR_NOT_FOUND;
    }
    fit(ms, nm, 0, &in->attn_fixed_us, &in->attn_seq_us);
    fit(ms, nm, 1, &in->ffn_fixed_us, &in->ffn_tok_us);
    in->attn_ctx_us = 0; /* one context: its cost is in the per-sequence part */
    fprintf(stderr,
            "measured (%d points): attention %.1f us + %.3f us per sequence, FFN %.1f us + "
            "%.3f us per token, per layer and micro-batch\n",
            nm, in->attn_fixed_us, in->attn_seq_us, in->ffn_fixed_us, in->ffn_tok_us);
    return AFD_OK;
}

static cJSON *plan_json(const afd_plan_out_t *p, int gpus)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "attn_instances", p->attn);
    cJSON_AddNumberToObject(o, "ffn_instances", p->ffn);
    cJSON_AddNumberToObject(o, "gpus", (p->attn + p->ffn) * gpus);
    cJSON_AddNumberToObject(o, "micro_batches", p->m);
    cJSON_AddNumberToObject(o, "seqs_per_attn_gpu_per_micro_batch", p->b);
    cJSON_AddNumberToObject(o, "micro_batch_tokens", (double)p->micro_batch);
    cJSON_AddNumberToObject(o, "batch", (double)p->batch);
    cJSON_AddNumberToObject(o, "layer_budget_us", p->budget_us * p->m);
    cJSON_AddNumberToObject(o, "stage_budget_us", p->budget_us);
    cJSON_AddNumberToObject(o, "attn_us", p->t_attn_us);
    cJSON_AddNumberToObject(o, "ffn_us", p->t_ffn_us);
    cJSON_AddNumberToObject(o, "comm_us", p->t_comm_us);
    cJSON_AddNumberToObject(o, "layer_us", p->layer_us);
    cJSON_AddNumberToObject(o, "tpot_ms", p->tpot_ms);
    cJSON_AddNumberToObject(o, "link_need_gbps", p->link_need_gbps);
    cJSON_AddNumberToObject(o, "micro_batch_rule", p->m_rule);
    cJSON_AddNumberToObject(o, "kv_gb_per_attn_gpu", p->kv_gb_used);
    cJSON_AddNumberToObject(o, "tokens_per_s", p->tokens_s);
    cJSON_AddNumberToObject(o, "tokens_per_s_per_gpu", p->tokens_s_gpu);
    return o;
}

static void print_text(const afd_plan_in_t *in, const afd_plan_out_t *p, afd_plan_out_t *alt,
                       int nalt)
{
    int g = in->gpus_per_inst;
    printf("plan: %dA%dF (%d GPUs: %d attention, %d FFN), %d micro-batches of %ld tokens "
           "(%d per attention GPU), batch %ld\n",
           p->attn, p->ffn, (p->attn + p->ffn) * g, p->attn * g, p->ffn * g, p->m, p->micro_batch,
           p->b, p->batch);
    printf("context %.0f tokens; TPOT target %.4g ms, modelled %.2f ms\n", in->context, in->tpot_ms,
           p->tpot_ms);
    printf("time budget: %.4g ms / %d layers = %.1f us per layer; / %d micro-batches = %.1f us "
           "per stage\n",
           in->tpot_ms, in->layers, p->budget_us * p->m, p->m, p->budget_us);
    printf("  attention  %8.1f us  (%3.0f%% of the stage)\n", p->t_attn_us,
           100 * p->t_attn_us / p->budget_us);
    printf("  FFN        %8.1f us  (%3.0f%%)\n", p->t_ffn_us, 100 * p->t_ffn_us / p->budget_us);
    printf("  transfer   %8.1f us  (%3.0f%%): needs %.1f Gbps of %.4g Gbps per attention GPU: "
           "%s\n",
           p->t_comm_us, 100 * p->t_comm_us / p->budget_us, p->link_need_gbps, in->link_gbps,
           p->t_comm_us <= p->budget_us ? "fits" : "does not fit");
    printf("  one micro-batch through a layer (T_a + T_f + 2 T_c): %.1f us of %.1f\n",
           p->t_attn_us + p->t_ffn_us + 2 * p->t_comm_us, p->budget_us * p->m);
    printf("micro-batch rule: m >= ceil(2 (1 + T_c / T_f)) = %d\n", p->m_rule);
    if (in->kv_bytes_tok > 0)
        printf("KV cache per attention GPU: %.1f GB of %.4g GB\n", p->kv_gb_used, in->kv_gb);
    printf("throughput: %.0f tokens/s, %.0f tokens/s per GPU\n", p->tokens_s, p->tokens_s_gpu);
    if (nalt > 0) {
        printf("best per A:F (tokens/s/GPU):");
        for (int i = 0; i < nalt; i++)
            printf("%s %dA%dF m=%d b=%d %.0f", i ? "," : "", alt[i].attn, alt[i].ffn, alt[i].m,
                   alt[i].b, alt[i].tokens_s_gpu);
        printf("\n");
    }
}

static int by_rate(const void *a, const void *b)
{
    double x = ((const afd_plan_out_t *)a)->tokens_s_gpu,
           y = ((const afd_plan_out_t *)b)->tokens_s_gpu;
    return x < y ? 1 : x > y ? -1 : 0;
}

int main(int argc, char **argv)
{
    afd_log_init(argv[0]);
    build_table();
    for (int i = 1; i < argc; i++) /* -o FORMAT is --output FORMAT */
        if (!strcmp(argv[i], "-o")) argv[i] = "--output";
    plan_opts_t o;
    memset(&o, 0, sizeof(o));
    int first;
    afd_status_t st = afd_opts_parse(table, &o, argc, argv,
                                     "usage: afd_plan [--paper | --measured A.json,B.json] "
                                     "[--input FILE.json] "
                                     "[--tpot-ms T --context C ...] [-o text|json]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    int rc = 2;
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        goto out;
    }
    if (strcmp(o.output, "text") && strcmp(o.output, "json")) {
        afd_error("-o must be text or json");
        goto out;
    }
    if (!o.paper && !o.measured && !o.input && o.v[0] < 0) {
        afd_error("give --paper, --measured FILES, --input FILE or the inputs as flags (--help)");
        goto out;
    }
    afd_plan_in_t in;
    memset(&in, 0, sizeof(in));
    if (o.paper) {
        afd_plan_paper(&in);
    } else { /* defaults for what a measurement does not give */
        in.gpus_per_inst = 1;
        in.a2f_bytes = 1;
        in.f2a_bytes = 2;
        in.batch_align = 1;
        in.max_attn = 8;
        in.max_ffn = 8;
        in.m_lo = 2;
        in.m_hi = 4;
    }
    if (o.measured) {
        in.link_gbps = 64; /* shared memory on one host moves about 8 GB/s (docs/benchmarks.md) */
        if (load_measured(o.measured, &in)) goto out;
    }
    if (o.input && load_json(o.input, &in)) goto out;
    for (size_t i = 0; i < NFIELDS; i++)
        if (o.v[i] >= 0) set_field(&in, i, o.v[i]);
    afd_plan_out_t best;
    st = afd_plan_search(&in, &best);
    if (st) {
        rc = 1;
        goto out;
    }
    /* the best of each A:F, for comparison */
    afd_plan_out_t alt[64];
    int nalt = 0;
    for (int a = 1; a <= in.max_attn && nalt < 64; a++)
        for (int f = 1; f <= in.max_ffn && nalt < 64; f++) {
            if (in.max_gpus > 0 && (a + f) * in.gpus_per_inst > in.max_gpus) continue;
            afd_plan_out_t c, t;
            int have = 0;
            for (int m = in.m_lo; m <= in.m_hi; m++)
                for (int b = in.batch_align; b <= (1 << 16); b += in.batch_align) {
                    if (!afd_plan_eval(&in, a, f, m, b, &t)) break;
                    if (!have || t.tokens_s_gpu > c.tokens_s_gpu) c = t, have = 1;
                }
            if (have) alt[nalt++] = c;
        }
    qsort(alt, (size_t)nalt, sizeof(alt[0]), by_rate);
    if (!strcmp(o.output, "json")) {
        cJSON *root = cJSON_CreateObject(), *ins = cJSON_AddObjectToObject(root, "inputs");
        for (size_t i = 0; i < NFIELDS; i++) {
            char key[64];
            snprintf(key, sizeof(key), "%s", fields[i].name);
            for (char *c = key; *c; c++)
                if (*c == '-') *c = '_';
            cJSON_AddNumberToObject(ins, key, get_field(&in, i));
        }
        cJSON_AddItemToObject(root, "plan", plan_json(&best, in.gpus_per_inst));
        cJSON *arr = cJSON_AddArrayToObject(root, "alternatives");
        for (int i = 0; i < nalt && i < 8; i++)
            cJSON_AddItemToArray(arr, plan_json(&alt[i], in.gpus_per_inst));
        char *txt = cJSON_Print(root);
        puts(txt);
        free(txt);
        cJSON_Delete(root);
    } else {
        print_text(&in, &best, alt, nalt < 6 ? nalt : 6);
    }
    rc = 0;
out:
    afd_opts_free(table, &o);
    return rc;
}
