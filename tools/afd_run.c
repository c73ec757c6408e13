/*
 * afd_run: the single-process runner. Loads a checkpoint directory, runs prefill
 * and decode for a batch of token-id prompts with the same kernels the daemons
 * use, and prints the tokens, log-probabilities and timing (--json for tools).
 * It is the monolithic baseline the AFD cluster is compared with. When the checkpoint
 * has a tokenizer.json, --prompt-text takes text prompts and the output shows text too.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "afd_opts.h"
#include "mdl_config.h"
#include "mdl_kv.h"
#include "mdl_model.h"
#include "mdl_runner.h"
#include "mdl_sampler.h"
#include "tok.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct run_opts {
    char *model, *backend, *kv_dtype, *a2f_dtype, *f2a_dtype, *stop_ids;
    afd_strlist_t prompts, texts;
    long max_tokens, top_k, seed, logprobs, threads, kv_block, kv_budget_mb, prefill_chunk, repeat;
    double temperature, top_p;
    int json, ignore_eos, progress;
} run_opts_t;

#define O(f) offsetof(run_opts_t, f)
static const afd_opt_t run_table[] = {
    {"model", AFD_OPT_STRING, NULL, O(model), 0, 0, 0, "checkpoint directory (required)"},
    {"prompt", AFD_OPT_LIST, NULL, O(prompts), 0, 0, 0,
     "a prompt as comma-separated token ids; prompts run together as one batch"},
    {"prompt-text", AFD_OPT_LIST, NULL, O(texts), 0, 0, 0,
     "a text prompt, encoded with the checkpoint's tokenizer.json (bos first when its "
     "tokenizer_config.json asks); runs in the batch after the --prompt ones"},
    {"repeat", AFD_OPT_INT, "1", O(repeat), 1, 65536, 0,
     "run each prompt this many times in the batch (seed + i for copy i)"},
    {"max-tokens", AFD_OPT_INT, "16", O(max_tokens), 1, 1 << 20, 0, "tokens to generate"},
    {"temperature", AFD_OPT_DOUBLE, "0", O(temperature), 0, 100, 0, "0 is greedy"},
    {"top-p", AFD_OPT_DOUBLE, "1", O(top_p), 1e-9, 1, 0, "nucleus sampling mass"},
    {"top-k", AFD_OPT_INT, "0", O(top_k), -1, 1 << 21, 0, "keep the k best tokens (0: all)"},
    {"seed", AFD_OPT_INT, "0", O(seed), 0, 9.2e18, 0, "sampling seed"},
    {"logprobs", AFD_OPT_INT, "0", O(logprobs), 0, 20, 0, "report the top-N log-probabilities"},
    {"stop-token-ids", AFD_OPT_STRING, NULL, O(stop_ids), 0, 0, 0,
     "comma list of ids that end a sequence"},
    {"ignore-eos", AFD_OPT_BOOL, "false", O(ignore_eos), 0, 0, 0,
     "do not stop at the model's eos token"},
    {"json", AFD_OPT_BOOL, "false", O(json), 0, 0, 0, "print one JSON object"},
    {"threads", AFD_OPT_INT, "0", O(threads), 0, 1024, 0, "GEMM threads (0: OpenBLAS default)"},
    {"backend", AFD_OPT_STRING, "cpu", O(backend), 0, 0, 0,
     "cpu or cuda (cpu-dev: the cpu backend taking the device code paths, for tests)"},
    {"kv-dtype", AFD_OPT_STRING, "bf16", O(kv_dtype), 0, 0, 0, "KV cache storage: bf16, fp8, f32"},
    {"kv-block", AFD_OPT_INT, "16", O(kv_block), 1, 4096, 0, "KV cache block size (tokens)"},
    {"kv-budget-mb", AFD_OPT_INT, "0", O(kv_budget_mb), 0, 1 << 24, 0,
     "KV cache memory (0: just enough for the batch)"},
    {"a2f-dtype", AFD_OPT_STRING, "fp8", O(a2f_dtype), 0, 0, 0,
     "rounding of the attention->FFN hidden state, as on the wire: fp8, bf16, f32"},
    {"f2a-dtype", AFD_OPT_STRING, "bf16", O(f2a_dtype), 0, 0, 0,
     "rounding of the FFN output, as on the wire: bf16, f32"},
    {"prefill-chunk", AFD_OPT_INT, "512", O(prefill_chunk), 1, 1 << 20, 0,
     "tokens per prefill step (chunked prefill)"},
    {"progress", AFD_OPT_BOOL, "true", O(progress), 0, 0, 0, "show load progress on a TTY"},
    AFD_OPTS_END};
#undef O

typedef struct run_seq {
    int32_t *tokens; /* prompt then generated */
    int prompt_len, len, cap;
    int cached; /* positions in the KV cache */
    int32_t *blocks;
    int nblocks;
    int done;
    const char *finish;
    mdl_rng_t rng;
    float *lp;        /* (max_tokens) */
    int32_t *top_ids; /* (max_tokens, logprobs) */
    float *top_lp;
    int ngen;
} run_seq_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int is_stop(const run_opts_t *o, const mdl_config_t *c, const int *stop, int nstop,
                   int32_t t)
{
    for (int i = 0; i < nstop; i++)
        if (stop[i] == t) return 1;
    if (!o->ignore_eos)
        for (int i = 0; i < c->num_eos; i++)
            if (c->eos_token_ids[i] == t) return 1;
    return 0;
}

int main(int argc, char **argv)
{
    afd_log_init(argv[0]);
    run_opts_t o;
    memset(&o, 0, sizeof(o));
    int first, rc = 1;
    afd_status_t st = afd_opts_parse(
        run_table, &o, argc, argv,
        "usage: afd_run --model DIR --prompt 1,2,3 [--prompt 4,5 ...] --max-tokens N\n"
        "               [--temperature T --top-p P --top-k K --seed S] [--logprobs N] [--json]\n"
        "               [--threads N]",
        &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        return 2;
    }
    if (!o.model) {
        afd_error("--model DIR is required");
        return 2;
    }
    if (o.prompts.n + o.texts.n == 0) {
        afd_error("at least one --prompt or --prompt-text is required");
        return 2;
    }
    afd_dtype_t kvdt = afd_dtype_parse(o.kv_dtype), a2f = afd_dtype_parse(o.a2f_dtype),
                f2a = afd_dtype_parse(o.f2a_dtype);
    if (kvdt == AFD_DTYPE_COUNT || kvdt == AFD_DTYPE_F16) {
        afd_error("--kv-dtype must be bf16, fp8 or f32");
        return 2;
    }
    if (a2f == AFD_DTYPE_COUNT || a2f == AFD_DTYPE_F16) {
        afd_error("--a2f-dtype must be fp8, bf16 or f32");
        return 2;
    }
    if (f2a != AFD_DTYPE_BF16 && f2a != AFD_DTYPE_F32) {
        afd_error("--f2a-dtype must be bf16 or f32");
        return 2;
    }
    mdl_sampling_t sp = {.temperature = o.temperature,
                         .top_p = o.top_p,
                         .top_k = o.top_k < 0 ? 0 : (int)o.top_k,
                         .seed = (uint64_t)o.seed,
                         .logprobs = (int)o.logprobs};
    const char *why;
    if (mdl_sampling_validate(&sp, &why)) {
        afd_error("%s", why);
        return 2;
    }
    int *stop = NULL, nstop = 0;
    if (o.stop_ids && afd_parse_int_list(o.stop_ids, 0, 1 << 30, &stop, &nstop)) {
        afd_error("--stop-token-ids: '%s' is not a comma list of token ids", o.stop_ids);
        return 2;
    }

    double t0 = now_s();
    mdl_config_t cfg;
    mdl_ckpt_t *ck = NULL;
    kn_backend_t *be = NULL;
    mdl_model_t *m = NULL;
    mdl_kv_t *kv = NULL;
    mdl_sampler_t *smp = NULL;
    mdl_runner_t run = {0};
    tok_t *tk = NULL;
    int32_t bos = -1;
    int nseq = (o.prompts.n + o.texts.n) * (int)o.repeat;
    run_seq_t *seqs = calloc((size_t)nseq, sizeof(*seqs));
    if (!seqs) goto out;
    if (mdl_config_load(o.model, &cfg)) goto out;
    {
        char path[4096];
        snprintf(path, sizeof(path), "%s/tokenizer.json", o.model);
        if (access(path, F_OK) == 0) {
            if (tok_load(path, &tk)) goto out;
            tok_chat_t chat;
            snprintf(path, sizeof(path), "%s/tokenizer_config.json", o.model);
            if (access(path, F_OK) == 0 && tok_chat_load(path, &chat) == AFD_OK) {
                if (chat.add_bos_token && chat.bos_token) bos = tok_token_id(tk, chat.bos_token);
                tok_chat_fini(&chat);
            }
        } else if (o.texts.n) {
            afd_error("--prompt-text: %s has no tokenizer.json", o.model);
            goto out;
        }
    }
    for (int i = 0; i < nseq; i++) {
        run_seq_t *s = &seqs[i];
        int *ids, n;
        int k = i / (int)o.repeat;
        if (k >= o.prompts.n) { /* a text prompt */
            const char *t = o.texts.v[k - o.prompts.n];
            tok_ids_t enc = {0};
            if (tok_encode(tk, t, strlen(t), &enc)) {
                tok_ids_free(&enc);
                goto out;
            }
            n = (int)enc.n + (bos >= 0);
            ids = malloc(sizeof(int) * (size_t)(n ? n : 1));
            if (!ids) {
                tok_ids_free(&enc);
                goto out;
            }
            if (bos >= 0) ids[0] = bos;
            for (size_t j = 0; j < enc.n; j++)
                ids[j + (bos >= 0)] = enc.v[j];
            tok_ids_free(&enc);
            if (n == 0 || tok_vocab_size(tk) > cfg.vocab_size) {
                afd_error("--prompt-text '%.60s': no tokens, or a tokenizer larger than the "
                          "model's vocabulary",
                          t);
                free(ids);
                goto out;
            }
        } else if (afd_parse_int_list(o.prompts.v[k], 0, cfg.vocab_size - 1, &ids, &n) || n == 0) {
            const char *ptxt = o.prompts.v[k];
            afd_error("--prompt '%.60s': not a non-empty comma list of token ids below %d", ptxt,
                      cfg.vocab_size);
            goto out;
        }
        if (n + o.max_tokens > cfg.max_position) {
            afd_error("--prompt of %d tokens + --max-tokens %ld exceeds the model's %d positions",
                      n, o.max_tokens, cfg.max_position);
            free(ids);
            goto out;
        }
        s->cap = n + (int)o.max_tokens;
        s->tokens = malloc(sizeof(int32_t) * (size_t)s->cap);
        s->lp = malloc(sizeof(float) * (size_t)o.max_tokens);
        s->top_ids = malloc(sizeof(int32_t) * (size_t)(o.max_tokens * (o.logprobs + 1)));
        s->top_lp = malloc(sizeof(float) * (size_t)(o.max_tokens * (o.logprobs + 1)));
        if (!s->tokens || !s->lp || !s->top_ids || !s->top_lp) {
            free(ids);
            goto out;
        }
        for (int k = 0; k < n; k++)
            s->tokens[k] = ids[k];
        free(ids);
        s->prompt_len = s->len = n;
        mdl_rng_seed(&s->rng, (uint64_t)o.seed + (uint64_t)(i % o.repeat));
    }
    if (kn_backend_create(o.backend, (int)o.threads, &be)) goto out;
    if (mdl_ckpt_open(o.model, &ck)) goto out;
    mdl_role_t role = {.attn = 1, .ffn = 1, .ffn_index = 0, .ffn_count = 1};
    if (mdl_model_load(ck, &cfg, be, &role, o.progress && isatty(2), &m)) goto out;
    double t_load = now_s() - t0;

    int bs = (int)o.kv_block, need = 0;
    for (int i = 0; i < nseq; i++)
        need += (seqs[i].cap + bs - 1) / bs;
    size_t budget = o.kv_budget_mb ? (size_t)o.kv_budget_mb << 20
                                   : (size_t)need * mdl_kv_block_bytes(&cfg, kvdt, bs);
    if (mdl_kv_create(be, &cfg, kvdt, bs, budget, &kv)) goto out;
    for (int i = 0; i < nseq; i++) {
        run_seq_t *s = &seqs[i];
        s->nblocks = mdl_kv_blocks_for(kv, s->cap);
        s->blocks = malloc(sizeof(int32_t) * (size_t)s->nblocks);
        if (!s->blocks || mdl_kv_alloc(kv, s->nblocks, s->blocks)) {
            afd_error("kv cache: not enough blocks for %d sequences (raise --kv-budget-mb)", nseq);
            s->nblocks = 0;
            goto out;
        }
    }
    if (mdl_sampler_create(cfg.vocab_size, &smp)) goto out;
    if (mdl_runner_init(&run, m, a2f, f2a)) goto out;

    /* one step: every unfinished sequence contributes its pending tokens (chunked prefill)
     * or its last token (decode) */
    int chunk = (int)o.prefill_chunk;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(chunk + nseq));
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)(chunk + nseq));
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)nseq);
    int *row_seq = malloc(sizeof(int) * (size_t)nseq);
    kn_seq_t *ks = malloc(sizeof(kn_seq_t) * (size_t)nseq);
    float *logits = malloc(sizeof(float) * (size_t)nseq * cfg.vocab_size);
    if (!tok || !pos || !rows || !row_seq || !ks || !logits) goto out_free;
    double t_prefill = 0, t_decode = 0, attn_decode = 0, ffn_decode = 0;
    long decode_tokens = 0, prefill_tokens = 0, steps = 0, decode_steps = 0;
    for (;;) {
        int ntok = 0, nks = 0, nrows = 0, prefill = 0;
        for (int i = 0; i < nseq; i++) {
            run_seq_t *s = &seqs[i];
            if (s->done) continue;
            int pending = s->len - s->cached;
            if (pending > 1 || s->cached < s->prompt_len) { /* prefill */
                int take = pending;
                if (ntok + take > chunk) take = chunk - ntok;
                if (take <= 0) continue;
                prefill = 1;
                ks[nks++] = (kn_seq_t){s->blocks, s->cached, take};
                for (int k = 0; k < take; k++) {
                    tok[ntok + k] = s->tokens[s->cached + k];
                    pos[ntok + k] = s->cached + k;
                }
                ntok += take;
                if (s->cached + take == s->len) { /* the prompt is complete: sample */
                    rows[nrows] = ntok - 1;
                    row_seq[nrows++] = i;
                }
            } else {
                ks[nks++] = (kn_seq_t){s->blocks, s->cached, 1};
                tok[ntok] = s->tokens[s->len - 1];
                pos[ntok] = s->len - 1;
                ntok++;
                rows[nrows] = ntok - 1;
                row_seq[nrows++] = i;
            }
        }
        if (nks == 0) break;
        mdl_batch_t b = {.nseq = nks, .ntok = ntok, .tokens = tok, .pos = pos, .seqs = ks};
        double ts = now_s(), a0 = run.attn_s, f0 = run.ffn_s;
        if ((st = mdl_runner_step(&run, &kv->store, &b, rows, nrows, logits))) {
            afd_error("forward step failed: %s", afd_status_str(st));
            goto out_free;
        }
        steps++;
        /* advance the cache positions */
        for (int k = 0, i = 0; k < nks; k++) {
            while (seqs[i].done || ks[k].block_table != seqs[i].blocks)
                i++;
            seqs[i].cached += ks[k].ntok;
        }
        for (int r = 0; r < nrows; r++) {
            run_seq_t *s = &seqs[row_seq[r]];
            mdl_sample_t out;
            mdl_sampler_pick(smp, logits + (size_t)r * cfg.vocab_size, &sp, &s->rng, &out);
            s->tokens[s->len++] = out.token;
            s->lp[s->ngen] = out.logprob;
            for (int j = 0; j < out.ntop; j++) {
                s->top_ids[s->ngen * o.logprobs + j] = out.top_ids[j];
                s->top_lp[s->ngen * o.logprobs + j] = out.top_logprobs[j];
            }
            s->ngen++;
            if (is_stop(&o, &cfg, stop, nstop, out.token)) {
                s->done = 1;
                s->finish = "stop";
            } else if (s->ngen >= o.max_tokens) {
                s->done = 1;
                s->finish = "length";
            }
        }
        double dt = now_s() - ts;
        if (prefill) {
            t_prefill += dt;
            prefill_tokens += ntok;
        } else {
            t_decode += dt;
            decode_tokens += nrows;
            decode_steps++;
            attn_decode += run.attn_s - a0;
            ffn_decode += run.ffn_s - f0;
        }
    }
    double t_total = now_s() - t0;

    if (o.json) {
        cJSON *root = cJSON_CreateObject(), *outs = cJSON_AddArrayToObject(root, "outputs");
        for (int i = 0; i < nseq; i++) {
            run_seq_t *s = &seqs[i];
            cJSON *e = cJSON_CreateObject();
            cJSON_AddItemToObject(e, "prompt", cJSON_CreateIntArray(s->tokens, s->prompt_len));
            cJSON_AddItemToObject(e, "token_ids",
                                  cJSON_CreateIntArray(s->tokens + s->prompt_len, s->ngen));
            cJSON *lps = cJSON_AddArrayToObject(e, "logprobs");
            cJSON *tops = cJSON_AddArrayToObject(e, "top_logprobs");
            for (int g = 0; g < s->ngen; g++) {
                cJSON_AddItemToArray(lps, cJSON_CreateNumber(s->lp[g]));
                if (o.logprobs > 0) {
                    cJSON *tl = cJSON_CreateArray();
                    for (int j = 0; j < o.logprobs && j < cfg.vocab_size; j++) {
                        cJSON *pair = cJSON_CreateArray();
                        cJSON_AddItemToArray(pair,
                                             cJSON_CreateNumber(s->top_ids[g * o.logprobs + j]));
                        cJSON_AddItemToArray(pair,
                                             cJSON_CreateNumber(s->top_lp[g * o.logprobs + j]));
                        cJSON_AddItemToArray(tl, pair);
                    }
                    cJSON_AddItemToArray(tops, tl);
                }
            }
            cJSON_AddStringToObject(e, "finish_reason", s->finish ? s->finish : "length");
            if (tk) {
                tok_buf_t raw = {0}, text = {0};
                if (tok_decode(tk, s->tokens + s->prompt_len, (size_t)s->ngen, 1, &raw) == AFD_OK &&
                    tok_utf8_clean(raw.p, raw.len, &text) == AFD_OK)
                    cJSON_AddStringToObject(e, "text", text.p);
                tok_buf_free(&raw);
                tok_buf_free(&text);
            }
            cJSON_AddItemToArray(outs, e);
        }
        cJSON *tm = cJSON_AddObjectToObject(root, "timing");
        cJSON_AddNumberToObject(tm, "load_s", t_load);
        cJSON_AddNumberToObject(tm, "prefill_s", t_prefill);
        cJSON_AddNumberToObject(tm, "decode_s", t_decode);
        cJSON_AddNumberToObject(tm, "total_s", t_total);
        cJSON_AddNumberToObject(tm, "prefill_tokens", (double)prefill_tokens);
        cJSON_AddNumberToObject(tm, "decode_tokens", (double)decode_tokens);
        cJSON_AddNumberToObject(tm, "decode_tokens_per_s",
                                t_decode > 0 ? decode_tokens / t_decode : 0);
        cJSON_AddNumberToObject(tm, "steps", (double)steps);
        cJSON_AddNumberToObject(tm, "decode_steps", (double)decode_steps);
        cJSON_AddNumberToObject(tm, "decode_attn_s", attn_decode);
        cJSON_AddNumberToObject(tm, "decode_ffn_s", ffn_decode);
        cJSON_AddNumberToObject(tm, "batch", nseq);
        cJSON_AddNumberToObject(tm, "threads", be->threads);
        cJSON_AddNumberToObject(tm, "weight_bytes", (double)m->bytes_loaded);
        char *txt = cJSON_PrintUnformatted(root);
        puts(txt);
        free(txt);
        cJSON_Delete(root);
    } else {
        for (int i = 0; i < nseq; i++) {
            run_seq_t *s = &seqs[i];
            printf("[%d] prompt %d tokens ->", i, s->prompt_len);
            for (int g = 0; g < s->ngen; g++)
                printf(" %d", s->tokens[s->prompt_len + g]);
            printf("  (%s)\n", s->finish ? s->finish : "length");
            if (tk) {
                tok_buf_t raw = {0}, text = {0};
                if (tok_decode(tk, s->tokens + s->prompt_len, (size_t)s->ngen, 1, &raw) == AFD_OK &&
                    tok_utf8_clean(raw.p, raw.len, &text) == AFD_OK)
                    printf("    text: %s\n", text.p);
                tok_buf_free(&raw);
                tok_buf_free(&text);
            }
        }
        printf("load %.2f s, prefill %ld tokens in %.3f s, decode %ld tokens in %.3f s "
               "(%.1f tokens/s, batch %d, %d threads)\n",
               t_load, prefill_tokens, t_prefill, decode_tokens, t_decode,
               t_decode > 0 ? decode_tokens / t_decode : 0.0, nseq, be->threads);
    }
    rc = 0;
out_free:
    free(tok);
    free(pos);
    free(rows);
    free(row_seq);
    free(ks);
    free(logits);
out:
    mdl_runner_fini(&run);
    for (int i = 0; seqs && i < nseq; i++) {
        if (kv && seqs[i].nblocks) mdl_kv_release(kv, seqs[i].blocks, seqs[i].nblocks);
        free(seqs[i].blocks);
        free(seqs[i].tokens);
        free(seqs[i].lp);
        free(seqs[i].top_ids);
        free(seqs[i].top_lp);
    }
    free(seqs);
    free(stop);
    tok_free(tk);
    mdl_sampler_destroy(smp);
    mdl_kv_destroy(kv);
    mdl_model_free(m);
    mdl_ckpt_close(ck);
    if (be) be->ops->destroy(be);
    afd_opts_free(run_table, &o);
    return rc;
}
