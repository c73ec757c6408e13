/*
 * coord_api: the HTTP API. OpenAI-compatible /v1/completions (text or token-id prompts;
 * streamed as Server-Sent Events or answered whole), /tokenize and /detokenize (as vLLM
 * offers them), /v1/models, /health, /ready and /admin/status (what afdctl reads). Every
 * field from the client is type- and range-checked; errors use OpenAI's error object and
 * status codes. With a tokenizer loaded, answers carry text from a streaming detokenizer
 * per sequence (no broken UTF-8, stop strings cut across token boundaries); without one,
 * text fields read "token_id:N" and text inputs are refused.
 */
#define _GNU_SOURCE
#include "coord_api.h"
#include "afd_log.h"
#include "mdl_sampler.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void coord_api_json(net_http_req_t *req, int status, cJSON *j, const char *extra)
{
    char *txt = cJSON_PrintUnformatted(j);
    net_http_respond(req, status, "application/json", txt, strlen(txt), extra);
    free(txt);
}

void coord_api_error(net_http_req_t *req, int status, const char *type, const char *param,
                     const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (req->path && !strcmp(req->path, "/v1/messages")) { /* Anthropic's error shape */
        const char *t = status == 400   ? "invalid_request_error"
                        : status == 401 ? "authentication_error"
                        : status == 403 ? "permission_error"
                        : status == 404 ? "not_found_error"
                        : status == 413 ? "request_too_large"
                        : status == 429 ? "rate_limit_error"
                        : status == 503 ? "overloaded_error"
                                        : "api_error";
        cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
        cJSON_AddStringToObject(root, "type", "error");
        cJSON_AddStringToObject(e, "type", t);
        cJSON_AddStringToObject(e, "message", msg);
        coord_api_json(req, status, root, status == 429 ? "Retry-After: 1\r\n" : NULL);
        cJSON_Delete(root);
        (void)type;
        (void)param;
        return;
    }
    cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "message", msg);
    cJSON_AddStringToObject(e, "type", type);
    if (param)
        cJSON_AddStringToObject(e, "param", param);
    else
        cJSON_AddNullToObject(e, "param");
    cJSON_AddNumberToObject(e, "code", status);
    coord_api_json(req, status, root, status == 429 ? "Retry-After: 1\r\n" : NULL);
    cJSON_Delete(root);
}

void coord_req_free(coord_req_t *r)
{
    if (!r) return;
    for (int i = 0; i < r->nseq; i++) {
        free(r->prompts ? r->prompts[i] : NULL);
        if (r->seqs) {
            free(r->seqs[i].out);
            free(r->seqs[i].lp);
            free(r->seqs[i].top_ids);
            free(r->seqs[i].top_lp);
            free(r->seqs[i].error);
            free(r->seqs[i].resume);
            if (r->seqs[i].ts) tok_stream_fini(r->seqs[i].ts);
            free(r->seqs[i].ts);
        }
    }
    for (int i = 0; i < r->nstops; i++)
        free(r->stops[i]);
    free(r->prompts);
    free(r->prompt_len);
    free(r->seqs);
    free(r->stop_ids);
    free(r);
}

/* ---- response rendering ---- */

void coord_api_token_text(const coord_t *c, int32_t id, char *buf, size_t len)
{
    tok_buf_t raw = {0}, clean = {0};
    if (!c->tok || tok_decode(c->tok, &id, 1, 0, &raw) || tok_utf8_clean(raw.p, raw.len, &clean) ||
        clean.len >= len) {
        snprintf(buf, len, "token_id:%d", id);
    } else {
        memcpy(buf, clean.p, clean.len + 1);
    }
    tok_buf_free(&raw);
    tok_buf_free(&clean);
}

/* ---- text of the generated tokens ---- */

/* Ends the sequences that met a stop string, each at once (the other sequences of its
 * request go on): called from the loop, never from the scheduler's token callback (the
 * abort frees what that callback holds). */
static void on_stop_timer(uv_timer_t *t)
{
    coord_t *c = t->data;
again:
    for (coord_req_t *r = c->reqs; r; r = r->next) {
        if (!r->stop_pending || r->finished) continue;
        for (int i = 0; i < r->nseq; i++)
            if (r->seqs[i].stop_hit && !r->seqs[i].done) {
                coord_sched_abort_seq(c, &r->seqs[i], "stop");
                goto again; /* the request may be gone, the list changed */
            }
        r->stop_pending = 0;
    }
}

/* Feeds the newest token of s to its detokenizer; delta/dlen: the text now safe to show. */
static void text_step(coord_t *c, coord_req_t *r, coord_seq_t *s, const char **delta, size_t *dlen)
{
    tok_stream_t *ts = s->ts;
    *delta = "";
    *dlen = 0;
    if (!ts || ts->stopped || s->ngen < 1) return;
    size_t before = ts->emitted;
    const char *d;
    size_t n;
    if (tok_stream_push(ts, s->out[s->ngen - 1], &d, &n)) return;
    if (s->finish && !ts->stopped) tok_stream_flush(ts, &d, &n);
    *delta = ts->text.p + before;
    *dlen = ts->emitted - before;
    if (ts->stopped) {
        s->stop_hit = 1;
        if (!s->finish) {
            r->stop_pending = 1;
            uv_timer_start(&c->stop_timer, on_stop_timer, 0, 0);
        }
    }
}

const char *coord_api_seq_text(const coord_seq_t *s, size_t *len)
{
    if (!s->ts) return NULL;
    *len = s->ts->text.len;
    return s->ts->text.p ? s->ts->text.p : "";
}

const char *coord_api_seq_finish(const coord_seq_t *s)
{
    if (s->stop_hit) return "stop";
    return s->finish ? s->finish : "length";
}

int coord_api_stops(coord_t *c, net_http_req_t *req, const cJSON *v, const char *field,
                    coord_req_t *r)
{
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v) && !cJSON_IsArray(v)) {
        coord_api_error(req, 400, "invalid_request_error", field,
                        "'%s' must be a string or a list of strings", field);
        return -1;
    }
    int n = cJSON_IsString(v) ? 1 : cJSON_GetArraySize(v);
    if (n == 0) return 0;
    if (!c->tok) {
        coord_api_error(req, 400, "invalid_request_error", field,
                        "'%s' strings need a tokenizer, and none is loaded: use stop_token_ids",
                        field);
        return -1;
    }
    if (n > TOK_MAX_STOPS) {
        coord_api_error(req, 400, "invalid_request_error", field,
                        "'%s': at most %d stop strings (got %d)", field, TOK_MAX_STOPS, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_IsString(v) ? v : cJSON_GetArrayItem(v, i);
        size_t l = cJSON_IsString(e) ? strlen(e->valuestring) : 0;
        if (!cJSON_IsString(e) || l == 0 || l > TOK_MAX_STOP_LEN) {
            coord_api_error(req, 400, "invalid_request_error", field,
                            "'%s'[%d] must be a string of 1 to %d bytes", field, i,
                            TOK_MAX_STOP_LEN);
            return -1;
        }
        if (!(r->stops[r->nstops] = strdup(e->valuestring))) {
            coord_api_error(req, 500, "server_error", NULL, "out of memory");
            return -1;
        }
        r->nstops++;
    }
    return 0;
}

int coord_api_encode(coord_t *c, net_http_req_t *req, const char *field, const char *text,
                     size_t len, int add_bos, int32_t **out, int *n)
{
    tok_ids_t ids = {0};
    afd_status_t st = AFD_OK;
    if (add_bos && c->bos_id >= 0) {
        ids.v = malloc(sizeof(int32_t) * 64);
        if (ids.v) {
            ids.cap = 64;
            ids.v[ids.n++] = c->bos_id;
        } else
            st = AFD_ERR_NOMEM;
    }
    if (!st) st = tok_encode(c->tok, text, len, &ids);
    if (st) {
        tok_ids_free(&ids);
        coord_api_error(req, 500, "server_error", NULL, "tokenizer: %s", afd_status_str(st));
        return -1;
    }
    if (ids.n < 1 || ids.n > (size_t)c->o.max_prompt) {
        coord_api_error(req, 400, "invalid_request_error", field,
                        "a prompt must have 1 to %ld tokens (got %zu)", c->o.max_prompt, ids.n);
        tok_ids_free(&ids);
        return -1;
    }
    *out = ids.v;
    *n = (int)ids.n;
    return 0;
}

static cJSON *logprobs_json(const coord_t *c, const coord_req_t *r, const coord_seq_t *s, int from,
                            int to, int *offset)
{
    cJSON *lp = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(lp, "tokens");
    cJSON *tlp = cJSON_AddArrayToObject(lp, "token_logprobs");
    cJSON *top = cJSON_AddArrayToObject(lp, "top_logprobs");
    cJSON *off = cJSON_AddArrayToObject(lp, "text_offset");
    char b[API_TOKEN_TEXT];
    for (int g = from; g < to; g++) {
        coord_api_token_text(c, s->out[g], b, sizeof(b));
        cJSON_AddItemToArray(toks, cJSON_CreateString(b));
        cJSON_AddItemToArray(tlp, cJSON_CreateNumber(s->lp[g]));
        cJSON *t = cJSON_CreateObject();
        for (int k = 0; k < r->logprobs; k++) {
            int32_t id = s->top_ids[g * r->logprobs + k];
            if (id < 0) continue;
            coord_api_token_text(c, id, b, sizeof(b));
            if (!cJSON_GetObjectItemCaseSensitive(t, b))
                cJSON_AddNumberToObject(t, b, s->top_lp[g * r->logprobs + k]);
        }
        cJSON_AddItemToArray(top, t);
        cJSON_AddItemToArray(off, cJSON_CreateNumber(*offset));
        coord_api_token_text(c, s->out[g], b, sizeof(b));
        *offset += (int)strlen(b);
    }
    return lp;
}

static cJSON *completion_base(coord_t *c, const coord_req_t *r)
{
    cJSON *root = cJSON_CreateObject();
    char id[48];
    snprintf(id, sizeof(id), "cmpl-%llu", (unsigned long long)r->id);
    cJSON_AddStringToObject(root, "id", id);
    cJSON_AddStringToObject(root, "object", "text_completion");
    cJSON_AddNumberToObject(root, "created", (double)r->created);
    cJSON_AddStringToObject(root, "model", c->o.model_name);
    return root;
}

cJSON *coord_api_usage(const coord_req_t *r)
{
    int pt = 0, ct = 0;
    for (int i = 0; i < r->nseq; i++) {
        pt += r->prompt_len[i];
        ct += r->seqs[i].ngen;
    }
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", pt);
    cJSON_AddNumberToObject(u, "completion_tokens", ct);
    cJSON_AddNumberToObject(u, "total_tokens", pt + ct);
    return u;
}

void coord_api_sse(net_http_req_t *http, cJSON *j)
{
    char *txt = cJSON_PrintUnformatted(j);
    size_t n = strlen(txt);
    char *buf = malloc(n + 8);
    if (buf) {
        memcpy(buf, "data: ", 6);
        memcpy(buf + 6, txt, n);
        memcpy(buf + 6 + n, "\n\n", 2);
        net_http_stream_write(http, buf, n + 8);
        free(buf);
    }
    free(txt);
}

void coord_api_token(coord_t *c, coord_req_t *r, coord_seq_t *s)
{
    if (s->stop_hit) return; /* its text ended at a stop string */
    const char *delta;
    size_t dlen;
    text_step(c, r, s, &delta, &dlen);
    if (!r->stream || !r->http) return;
    if (r->api != COORD_API_COMPLETIONS) return coord_chat_token(c, r, s, delta, dlen);
    cJSON *root = completion_base(c, r);
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", s->choice);
    char b[API_TOKEN_TEXT];
    if (s->ts) {
        char *t = strndup(delta, dlen);
        cJSON_AddStringToObject(ch, "text", t ? t : "");
        free(t);
    } else {
        coord_api_token_text(c, s->out[s->ngen - 1], b, sizeof(b));
        cJSON_AddStringToObject(ch, "text", b);
    }
    cJSON_AddItemToObject(ch, "token_ids", cJSON_CreateIntArray(&s->out[s->ngen - 1], 1));
    if (r->logprobs >= 0) {
        int off = 0;
        for (int g = 0; g < s->ngen - 1; g++) {
            coord_api_token_text(c, s->out[g], b, sizeof(b));
            off += (int)strlen(b);
        }
        cJSON_AddItemToObject(ch, "logprobs", logprobs_json(c, r, s, s->ngen - 1, s->ngen, &off));
    } else {
        cJSON_AddNullToObject(ch, "logprobs");
    }
    if (s->finish || s->stop_hit)
        cJSON_AddStringToObject(ch, "finish_reason", coord_api_seq_finish(s));
    else
        cJSON_AddNullToObject(ch, "finish_reason");
    cJSON_AddItemToArray(choices, ch);
    coord_api_sse(r->http, root);
    cJSON_Delete(root);
}

void coord_api_finish(coord_t *c, coord_req_t *r)
{
    r->finished = 1;
    coord_hist_observe(&c->metrics.e2e, (double)(coord_now_us() - r->t_arrival_us) / 1e6);
    for (int i = 0; i < r->nseq; i++) {
        const coord_seq_t *s = &r->seqs[i];
        if (s->error)
            c->metrics.failed++;
        else if (s->stop_hit || (s->finish && !strcmp(s->finish, "stop")))
            c->metrics.success_stop++;
        else if (s->finish && !strcmp(s->finish, "abort"))
            c->metrics.success_abort++;
        else
            c->metrics.success_length++;
    }
    if (r->failed)
        c->req_err++;
    else if (!r->aborted)
        c->req_ok++;
    if (!r->http) return;
    net_http_req_t *http = r->http;
    r->http = NULL;
    const char *err = NULL;
    for (int i = 0; i < r->nseq && !err; i++)
        if (r->seqs[i].error) err = r->seqs[i].error;
    if (r->api != COORD_API_COMPLETIONS) return coord_chat_finish(c, r, http, err);
    if (r->stream) {
        if (err) {
            cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
            cJSON_AddStringToObject(e, "message", err);
            cJSON_AddStringToObject(e, "type", "server_error");
            cJSON_AddNumberToObject(e, "code", 500);
            coord_api_sse(http, root);
            cJSON_Delete(root);
        }
        if (!err && r->stream == 2) { /* stream_options.include_usage */
            cJSON *root = completion_base(c, r);
            cJSON_AddArrayToObject(root, "choices");
            cJSON_AddItemToObject(root, "usage", coord_api_usage(r));
            coord_api_sse(http, root);
            cJSON_Delete(root);
        }
        net_http_stream_write(http, "data: [DONE]\n\n", 14);
        net_http_stream_end(http);
        return;
    }
    if (err) {
        coord_api_error(http, 500, "server_error", NULL, "%s", err);
        return;
    }
    cJSON *root = completion_base(c, r);
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    for (int i = 0; i < r->nseq; i++) {
        coord_seq_t *s = &r->seqs[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", i);
        char *text = coord_api_text_dup(s);
        cJSON_AddStringToObject(ch, "text", text ? text : "");
        free(text);
        cJSON_AddItemToObject(ch, "token_ids", cJSON_CreateIntArray(s->out, s->ngen));
        if (r->logprobs >= 0) {
            int off = 0;
            cJSON_AddItemToObject(ch, "logprobs", logprobs_json(c, r, s, 0, s->ngen, &off));
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        cJSON_AddStringToObject(ch, "finish_reason", coord_api_seq_finish(s));
        cJSON_AddItemToArray(choices, ch);
    }
    cJSON_AddItemToObject(root, "usage", coord_api_usage(r));
    coord_api_json(http, 200, root, NULL);
    cJSON_Delete(root);
}

char *coord_api_text_dup(const coord_seq_t *s)
{
    size_t n;
    const char *t = coord_api_seq_text(s, &n);
    if (t) return strndup(t, n);
    size_t tl = (size_t)s->ngen * 20 + 1, k = 0;
    char *text = malloc(tl);
    if (text) {
        text[0] = 0;
        for (int g = 0; g < s->ngen; g++)
            k += (size_t)snprintf(text + k, tl - k, "token_id:%d", s->out[g]);
    }
    return text;
}

/* ---- request parsing ---- */

/* the coordinator of this process: the abort callback carries only the request */
static coord_t *g_coord;

static void on_client_gone(void *ud, net_http_req_t *req)
{
    coord_req_t *r = ud;
    (void)req;
    r->http = NULL;
    if (!r->finished) coord_sched_abort_req(g_coord, r);
}

int coord_api_int(const cJSON *o, const char *k, long min, long max, long def, long *out,
                  net_http_req_t *req)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble)) {
        coord_api_error(req, 400, "invalid_request_error", k, "'%s' must be an integer", k);
        return -1;
    }
    if (v->valuedouble < (double)min || v->valuedouble > (double)max) {
        coord_api_error(req, 400, "invalid_request_error", k, "'%s' must be in [%ld, %ld]", k, min,
                        max);
        return -1;
    }
    *out = (long)v->valuedouble;
    return 0;
}

int coord_api_num(const cJSON *o, const char *k, double min, double max, double def, double *out,
                  net_http_req_t *req)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= min && v->valuedouble <= max)) {
        coord_api_error(req, 400, "invalid_request_error", k, "'%s' must be a number in [%g, %g]",
                        k, min, max);
        return -1;
    }
    *out = v->valuedouble;
    return 0;
}

int coord_api_bool(const cJSON *o, const char *k, int def, int *out, net_http_req_t *req)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) {
        coord_api_error(req, 400, "invalid_request_error", k, "'%s' must be true or false", k);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 0;
}

/* Parses one prompt (a list of token ids) into a malloc'd array. */
int coord_api_ids(coord_t *c, const cJSON *a, int32_t **out, int *n, net_http_req_t *req)
{
    int cnt = cJSON_GetArraySize(a);
    if (cnt < 1 || cnt > c->o.max_prompt) {
        coord_api_error(req, 400, "invalid_request_error", "prompt",
                        "a prompt must have 1 to %ld tokens (got %d)", c->o.max_prompt, cnt);
        return -1;
    }
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cnt);
    if (!ids) {
        coord_api_error(req, 500, "server_error", NULL, "out of memory");
        return -1;
    }
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble >= c->cfg.vocab_size) {
            free(ids);
            coord_api_error(req, 400, "invalid_request_error", "prompt",
                            "prompt token ids must be integers in [0, %d)", c->cfg.vocab_size);
            return -1;
        }
        ids[i++] = (int32_t)e->valuedouble;
    }
    *out = ids;
    *n = cnt;
    return 0;
}

static uint64_t g_seed_counter;

int coord_api_check_model(coord_t *c, net_http_req_t *req, const cJSON *body)
{
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(body, "model");
    if (model && !cJSON_IsNull(model) &&
        (!cJSON_IsString(model) || strcmp(model->valuestring, c->o.model_name) != 0)) {
        coord_api_error(req, 404, "invalid_request_error", "model", "the model '%s' does not exist",
                        cJSON_IsString(model) ? model->valuestring : "?");
        return -1;
    }
    return 0;
}

int coord_api_stream_options(const cJSON *body, int stream, int *out, net_http_req_t *req)
{
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
    *out = stream;
    if (!so || cJSON_IsNull(so)) return 0;
    if (!cJSON_IsObject(so)) {
        coord_api_error(req, 400, "invalid_request_error", "stream_options",
                        "'stream_options' must be an object");
        return -1;
    }
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage")) && stream) *out = 2;
    return 0;
}

int coord_api_req_init(coord_t *c, net_http_req_t *req, coord_req_t *r, int nseq)
{
    (void)c;
    r->nseq = nseq;
    r->prompts = calloc((size_t)nseq, sizeof(*r->prompts));
    r->prompt_len = calloc((size_t)nseq, sizeof(int));
    r->seqs = calloc((size_t)nseq, sizeof(*r->seqs));
    if (!r->prompts || !r->prompt_len || !r->seqs) {
        coord_api_error(req, 500, "server_error", NULL, "out of memory");
        return -1;
    }
    return 0;
}

int coord_api_sampling(coord_t *c, net_http_req_t *req, const cJSON *body, coord_req_t *r,
                       const char *max_tokens_field, int max_tokens_required)
{
    long max_tokens, top_k, seed;
    double temperature, top_p;
    int ignore_eos;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(body, max_tokens_field);
    if (max_tokens_required && (!mt || cJSON_IsNull(mt))) {
        coord_api_error(req, 400, "invalid_request_error", max_tokens_field, "'%s' is required",
                        max_tokens_field);
        return -1;
    }
    if (coord_api_int(body, max_tokens_field, 1, c->cfg.max_position, c->o.default_max_tokens,
                      &max_tokens, req) ||
        coord_api_int(body, "top_k", -1, c->cfg.vocab_size, 0, &top_k, req) ||
        coord_api_int(body, "seed", 0, (long)9e18, -1, &seed, req) ||
        coord_api_num(body, "temperature", 0, 100, 1.0, &temperature, req) ||
        coord_api_num(body, "top_p", 1e-9, 1, 1.0, &top_p, req) ||
        coord_api_bool(body, "ignore_eos", 0, &ignore_eos, req))
        return -1;
    const cJSON *sti = cJSON_GetObjectItemCaseSensitive(body, "stop_token_ids");
    int nstop = 0;
    if (sti && !cJSON_IsNull(sti)) {
        if (!cJSON_IsArray(sti) || cJSON_GetArraySize(sti) > API_MAX_STOP_IDS) {
            coord_api_error(req, 400, "invalid_request_error", "stop_token_ids",
                            "'stop_token_ids' must be a list of at most %d token ids",
                            API_MAX_STOP_IDS);
            return -1;
        }
        r->stop_ids = malloc(sizeof(int32_t) * (size_t)(cJSON_GetArraySize(sti) + 1));
        if (!r->stop_ids) {
            coord_api_error(req, 500, "server_error", NULL, "out of memory");
            return -1;
        }
        const cJSON *e;
        cJSON_ArrayForEach(e, sti)
        {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= c->cfg.vocab_size ||
                e->valuedouble != floor(e->valuedouble)) {
                coord_api_error(req, 400, "invalid_request_error", "stop_token_ids",
                                "stop token ids must be integers in [0, %d)", c->cfg.vocab_size);
                return -1;
            }
            r->stop_ids[nstop++] = (int32_t)e->valuedouble;
        }
    }
    afd__sampling__init(&r->sp);
    r->sp.temperature = (float)temperature;
    r->sp.top_p = (float)top_p;
    r->sp.top_k = (int32_t)(top_k < 0 ? 0 : top_k);
    r->sp.seed = seed >= 0 ? (uint64_t)seed : (uint64_t)time(NULL) * 1000003u + ++g_seed_counter;
    r->sp.max_tokens = (uint32_t)max_tokens;
    r->sp.n_stop_token_ids = (size_t)nstop;
    r->sp.stop_token_ids = r->stop_ids;
    r->sp.ignore_eos = ignore_eos;
    return 0;
}

void coord_api_submit(coord_t *c, net_http_req_t *req, coord_req_t *r)
{
    long max_tokens = r->sp.max_tokens;
    for (int i = 0; i < r->nseq; i++)
        if (r->prompt_len[i] + max_tokens > c->cfg.max_position) {
            coord_api_error(req, 400, "invalid_request_error", "max_tokens",
                            "prompt (%d tokens) + max_tokens (%ld) exceed the context of %d",
                            r->prompt_len[i], max_tokens, c->cfg.max_position);
            coord_req_free(r);
            return;
        }
    r->sp.logprobs = r->logprobs > 0 ? (uint32_t)r->logprobs : 0;
    r->id = ++c->next_req_id;
    r->created = (uint64_t)time(NULL);
    r->t_arrival_us = coord_now_us();
    int L = r->logprobs > 0 ? r->logprobs : 0;
    for (int i = 0; i < r->nseq; i++) {
        coord_seq_t *s = &r->seqs[i];
        s->req = r;
        s->choice = i;
        s->out = malloc(sizeof(int32_t) * (size_t)max_tokens);
        s->lp = malloc(sizeof(float) * (size_t)max_tokens);
        s->top_ids = malloc(sizeof(int32_t) * (size_t)(max_tokens * L + 1));
        s->top_lp = malloc(sizeof(float) * (size_t)(max_tokens * L + 1));
        if (!s->out || !s->lp || !s->top_ids || !s->top_lp) {
            coord_api_error(req, 500, "server_error", NULL, "out of memory");
            coord_req_free(r);
            return;
        }
        if (c->tok) {
            s->ts = malloc(sizeof(*s->ts));
            if (!s->ts || tok_stream_init(s->ts, c->tok, (const char *const *)r->stops,
                                          (size_t)r->nstops, 1)) {
                free(s->ts);
                s->ts = NULL;
                coord_api_error(req, 500, "server_error", NULL, "out of memory");
                coord_req_free(r);
                return;
            }
        }
    }
    if (c->draining) {
        coord_api_error(req, 503, "server_error", NULL,
                        "the server is draining: it takes no new requests");
        coord_req_free(r);
        return;
    }
    if (!c->ready) {
        coord_api_error(req, 503, "server_error", NULL,
                        "the cluster is not ready (nodes missing or joining)");
        coord_req_free(r);
        return;
    }
    const char *why;
    if (coord_sched_submit(c, r, &why)) {
        coord_api_error(req, 429, "rate_limit_error", NULL, "%s", why);
        coord_req_free(r);
        return;
    }
    r->http = req;
    net_http_set_abort(req, on_client_gone, r);
    if (r->stream) net_http_stream_begin(req, 200, "text/event-stream", NULL);
}

static void handle_completions(coord_t *c, net_http_req_t *req)
{
    cJSON *body = cJSON_ParseWithLength(req->body, req->body_len);
    if (!body || !cJSON_IsObject(body)) {
        cJSON_Delete(body);
        return coord_api_error(req, 400, "invalid_request_error", NULL,
                               "the body must be a JSON object");
    }
    coord_req_t *r = calloc(1, sizeof(*r));
    if (!r) {
        cJSON_Delete(body);
        return coord_api_error(req, 500, "server_error", NULL, "out of memory");
    }
    r->api = COORD_API_COMPLETIONS;
    if (coord_api_check_model(c, req, body)) goto fail;
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(body, "prompt");
    if (!prompt) {
        coord_api_error(req, 400, "invalid_request_error", "prompt", "'prompt' is required");
        goto fail;
    }
    int text = cJSON_IsString(prompt) ||
               (cJSON_IsArray(prompt) && cJSON_IsString(cJSON_GetArrayItem(prompt, 0)));
    if (text && !c->tok) {
        coord_api_error(req, 400, "invalid_request_error", "prompt",
                        "text prompts need a tokenizer, and none is loaded: send token ids");
        goto fail;
    }
    if (!cJSON_IsString(prompt) && (!cJSON_IsArray(prompt) || cJSON_GetArraySize(prompt) == 0)) {
        coord_api_error(req, 400, "invalid_request_error", "prompt",
                        "'prompt' must be a string, a list of strings, a list of token ids or a "
                        "list of such lists");
        goto fail;
    }
    int add_special;
    if (coord_api_bool(body, "add_special_tokens", 1, &add_special, req)) goto fail;
    int batch = cJSON_IsArray(prompt) && (cJSON_IsArray(cJSON_GetArrayItem(prompt, 0)) || text);
    int nseq = batch ? cJSON_GetArraySize(prompt) : 1;
    if (nseq > API_MAX_PROMPTS) {
        coord_api_error(req, 400, "invalid_request_error", "prompt",
                        "at most %d prompts per request", API_MAX_PROMPTS);
        goto fail;
    }
    if (coord_api_req_init(c, req, r, nseq)) goto fail;
    for (int i = 0; i < r->nseq; i++) {
        const cJSON *p = batch ? cJSON_GetArrayItem(prompt, i) : prompt;
        if (text) {
            if (!cJSON_IsString(p)) {
                coord_api_error(req, 400, "invalid_request_error", "prompt",
                                "'prompt' must be a list of strings (prompt[%d] is not one)", i);
                goto fail;
            }
            if (coord_api_encode(c, req, "prompt", p->valuestring, strlen(p->valuestring),
                                 add_special, &r->prompts[i], &r->prompt_len[i]))
                goto fail;
            continue;
        }
        if (!cJSON_IsArray(p)) {
            coord_api_error(req, 400, "invalid_request_error", "prompt",
                            "'prompt' must be a list of token ids or a list of such lists");
            goto fail;
        }
        if (coord_api_ids(c, p, &r->prompts[i], &r->prompt_len[i], req)) goto fail;
    }
    long n, logprobs = -1;
    int stream, echo;
    if (coord_api_sampling(c, req, body, r, "max_tokens", 0) ||
        coord_api_int(body, "n", 1, 1, 1, &n, req) ||
        coord_api_bool(body, "stream", 0, &stream, req) ||
        coord_api_bool(body, "echo", 0, &echo, req))
        goto fail;
    const cJSON *lpv = cJSON_GetObjectItemCaseSensitive(body, "logprobs");
    if (lpv && !cJSON_IsNull(lpv) &&
        coord_api_int(body, "logprobs", 0, MDL_MAX_LOGPROBS, 0, &logprobs, req))
        goto fail;
    if (echo) {
        coord_api_error(req, 400, "invalid_request_error", "echo", "'echo' is not supported");
        goto fail;
    }
    if (coord_api_stops(c, req, cJSON_GetObjectItemCaseSensitive(body, "stop"), "stop", r))
        goto fail;
    if (coord_api_stream_options(body, stream, &stream, req)) goto fail;
    r->logprobs = (int)logprobs;
    r->stream = stream;
    cJSON_Delete(body);
    coord_api_submit(c, req, r);
    return;
fail:
    cJSON_Delete(body);
    coord_req_free(r);
}

/* POST /tokenize: {"prompt": TEXT, "add_special_tokens"} or {"messages": [...],
 * "add_generation_prompt"} -> {"count", "max_model_len", "tokens"} (as vLLM answers). */
static void handle_tokenize(coord_t *c, net_http_req_t *req)
{
    if (!c->tok)
        return coord_api_error(req, 400, "invalid_request_error", NULL,
                               "tokenizing needs a tokenizer, and none is loaded");
    cJSON *body = cJSON_ParseWithLength(req->body, req->body_len);
    coord_req_t *r = calloc(1, sizeof(*r));
    if (!body || !cJSON_IsObject(body)) {
        coord_api_error(req, 400, "invalid_request_error", NULL, "the body must be a JSON object");
        goto out;
    }
    if (!r || coord_api_req_init(c, req, r, 1) || coord_api_check_model(c, req, body)) {
        if (!r) coord_api_error(req, 500, "server_error", NULL, "out of memory");
        goto out;
    }
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(body, "prompt");
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(body, "messages");
    if (msgs && !cJSON_IsNull(msgs)) {
        if (coord_chat_prompt(c, req, body, r)) goto out;
    } else if (cJSON_IsString(prompt)) {
        int add_special;
        if (coord_api_bool(body, "add_special_tokens", 1, &add_special, req) ||
            coord_api_encode(c, req, "prompt", prompt->valuestring, strlen(prompt->valuestring),
                             add_special, &r->prompts[0], &r->prompt_len[0]))
            goto out;
    } else {
        coord_api_error(req, 400, "invalid_request_error", "prompt",
                        "give 'prompt' (a string) or 'messages'");
        goto out;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "count", r->prompt_len[0]);
    cJSON_AddNumberToObject(root, "max_model_len", c->cfg.max_position);
    cJSON_AddItemToObject(root, "tokens", cJSON_CreateIntArray(r->prompts[0], r->prompt_len[0]));
    cJSON_AddNullToObject(root, "token_strs");
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
out:
    cJSON_Delete(body);
    coord_req_free(r);
}

/* POST /detokenize: {"tokens": [ids]} -> {"prompt": TEXT} */
static void handle_detokenize(coord_t *c, net_http_req_t *req)
{
    if (!c->tok)
        return coord_api_error(req, 400, "invalid_request_error", NULL,
                               "detokenizing needs a tokenizer, and none is loaded");
    cJSON *body = cJSON_ParseWithLength(req->body, req->body_len);
    tok_buf_t raw = {0}, text = {0};
    int32_t *ids = NULL;
    if (!body || !cJSON_IsObject(body)) {
        coord_api_error(req, 400, "invalid_request_error", NULL, "the body must be a JSON object");
        goto out;
    }
    if (coord_api_check_model(c, req, body)) goto out;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(body, "tokens"), *e;
    int n = cJSON_IsArray(t) ? cJSON_GetArraySize(t) : -1;
    if (n < 0 || n > c->o.max_prompt + c->cfg.max_position) {
        coord_api_error(req, 400, "invalid_request_error", "tokens",
                        "'tokens' must be a list of at most %ld token ids",
                        c->o.max_prompt + (long)c->cfg.max_position);
        goto out;
    }
    ids = malloc(sizeof(int32_t) * (size_t)(n + 1));
    if (!ids) {
        coord_api_error(req, 500, "server_error", NULL, "out of memory");
        goto out;
    }
    int k = 0;
    cJSON_ArrayForEach(e, t)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble >= tok_vocab_size(c->tok)) {
            coord_api_error(req, 400, "invalid_request_error", "tokens",
                            "tokens[%d] must be a token id: an integer in [0, %d)", k,
                            tok_vocab_size(c->tok));
            goto out;
        }
        ids[k++] = (int32_t)e->valuedouble;
    }
    afd_status_t st = tok_decode(c->tok, ids, (size_t)k, 0, &raw);
    if (st == AFD_ERR_RANGE) {
        coord_api_error(req, 400, "invalid_request_error", "tokens",
                        "'tokens' holds an id the tokenizer does not have");
        goto out;
    }
    if (st || tok_utf8_clean(raw.p, raw.len, &text) || (!text.p && tok_buf_add(&text, "", 0))) {
        coord_api_error(req, 500, "server_error", NULL, "out of memory");
        goto out;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "prompt", text.p);
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
out:
    free(ids);
    tok_buf_free(&raw);
    tok_buf_free(&text);
    cJSON_Delete(body);
}

static void handle_models(coord_t *c, net_http_req_t *req)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", c->o.model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "afd");
    cJSON_AddNumberToObject(m, "max_model_len", c->cfg.max_position);
    cJSON_AddItemToArray(data, m);
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
}

static cJSON *times_json(const Afd__StageTimes *t)
{
    cJSON *o = cJSON_CreateObject();
    if (!t) return o;
    cJSON_AddNumberToObject(o, "attn_us", (double)t->attn_us);
    cJSON_AddNumberToObject(o, "ffn_us", (double)t->ffn_us);
    cJSON_AddNumberToObject(o, "wait_us", (double)t->wait_us);
    cJSON_AddNumberToObject(o, "xfer_us", (double)t->xfer_us);
    cJSON_AddNumberToObject(o, "step_us", (double)t->step_us);
    cJSON_AddNumberToObject(o, "idle_us", (double)t->other_us);
    return o;
}

static void handle_status(coord_t *c, net_http_req_t *req)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *cl = cJSON_AddObjectToObject(root, "cluster");
    cJSON_AddBoolToObject(cl, "ready", c->ready);
    cJSON_AddBoolToObject(cl, "draining", c->draining);
    cJSON_AddNumberToObject(cl, "epoch", c->epoch);
    cJSON_AddNumberToObject(cl, "micro_batches", c->micro_batches);
    cJSON_AddNumberToObject(cl, "attn_expected", (double)c->o.attn);
    cJSON_AddNumberToObject(cl, "ffn_expected", (double)c->o.ffn);
    cJSON_AddNumberToObject(cl, "steps", (double)c->steps_done);
    cJSON_AddNumberToObject(cl, "tokens_generated", (double)c->metrics.generation_tokens);
    cJSON_AddNumberToObject(cl, "mean_step_ms",
                            c->steps_done ? c->step_us_sum / 1000.0 / (double)c->steps_done : 0);
    cJSON_AddNumberToObject(cl, "mean_plan_us",
                            c->steps_done ? (double)c->sched_us_sum / (double)c->steps_done : 0);
    cJSON_AddStringToObject(cl, "model", c->o.model_name);
    cJSON *rq = cJSON_AddObjectToObject(root, "requests");
    cJSON_AddNumberToObject(rq, "running", c->nrunning);
    cJSON_AddNumberToObject(rq, "waiting", c->nwaiting);
    cJSON_AddNumberToObject(rq, "succeeded", (double)c->req_ok);
    cJSON_AddNumberToObject(rq, "failed", (double)c->req_err);
    cJSON *nodes = cJSON_AddArrayToObject(root, "nodes");
    static const char *states[] = {"free", "joining", "ready", "serving"};
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state == NODE_FREE) continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "id", n->id);
        cJSON_AddStringToObject(o, "name", n->name);
        cJSON_AddStringToObject(o, "role", n->role == AFD__ROLE__ROLE_ATTN ? "attention" : "ffn");
        cJSON_AddNumberToObject(o, "index", n->index);
        cJSON_AddStringToObject(o, "state",
                                n->drained && !n->member ? "drained"
                                : n->drained             ? "draining"
                                : n->state >= NODE_READY && !n->member && c->formed
                                    ? "joining"
                                    : states[n->state]);
        cJSON_AddBoolToObject(o, "member", n->member);
        cJSON_AddStringToObject(o, "backend", n->backend);
        cJSON_AddNumberToObject(o, "ranks", n->ranks);
        if (n->role == AFD__ROLE__ROLE_FFN) {
            cJSON *e = cJSON_AddArrayToObject(o, "experts");
            cJSON_AddItemToArray(e, cJSON_CreateNumber(n->expert_begin));
            cJSON_AddItemToArray(e, cJSON_CreateNumber(n->expert_end));
        } else {
            cJSON_AddNumberToObject(o, "kv_blocks_total", (double)n->kv_blocks);
            cJSON_AddNumberToObject(o, "kv_blocks_reserved", (double)n->kv_reserved);
            cJSON_AddNumberToObject(o, "running", n->running);
        }
        const Afd__NodeStats *st = n->last_hb ? n->last_hb->stats : NULL;
        if (st) {
            if (n->role == AFD__ROLE__ROLE_ATTN)
                cJSON_AddNumberToObject(o, "kv_blocks_used", (double)st->kv_blocks_used);
            cJSON_AddNumberToObject(o, "steps", (double)st->steps);
            cJSON_AddNumberToObject(o, "tokens", (double)st->tokens);
            cJSON_AddNumberToObject(o, "a2f_bytes", (double)st->a2f_bytes);
            cJSON_AddNumberToObject(o, "f2a_bytes", (double)st->f2a_bytes);
            /* where A2F/F2A travel from and to: device memory, or staged through the host */
            cJSON_AddStringToObject(o, "data_plane", st->data_plane_device ? "device" : "host");
            cJSON_AddItemToObject(o, "busy", times_json(st->busy));
            cJSON *lat = cJSON_AddArrayToObject(o, "peer_latency");
            for (size_t k = 0; k < st->n_peer_latency; k++) {
                const Afd__LatencyHist *h = st->peer_latency[k];
                cJSON *l = cJSON_CreateObject();
                cJSON_AddNumberToObject(l, "peer", h->peer_id);
                cJSON_AddNumberToObject(l, "count", (double)h->count);
                cJSON_AddNumberToObject(l, "mean_us",
                                        h->count ? (double)h->sum_us / (double)h->count : 0);
                if (h->answer_count) { /* attention nodes: how fast each FFN peer answers */
                    cJSON_AddNumberToObject(l, "answer_mean_us",
                                            (double)h->answer_sum_us / (double)h->answer_count);
                    cJSON_AddNumberToObject(l, "answer_max_us", (double)h->answer_max_us);
                }
                cJSON *b = cJSON_AddArrayToObject(l, "buckets_pow2_us");
                for (size_t q = 0; q < h->n_buckets; q++)
                    cJSON_AddItemToArray(b, cJSON_CreateNumber((double)h->buckets[q]));
                cJSON_AddItemToArray(lat, l);
            }
        }
        cJSON_AddItemToArray(nodes, o);
    }
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
}

/* constant-time comparison of a presented token with a configured one */
static int token_eq(const char *want, const char *got)
{
    size_t a = strlen(want), b = strlen(got);
    unsigned d = (unsigned)(a ^ b);
    for (size_t i = 0; i < a; i++)
        d |= (unsigned)(want[i] ^ got[b ? i % b : 0]);
    return d == 0 && a == b;
}

static const char *bearer(net_http_req_t *req)
{
    const char *h = net_http_header(req, "Authorization");
    if (h && !strncmp(h, "Bearer ", 7)) return h + 7;
    h = net_http_header(req, "x-api-key"); /* Anthropic's clients send the key this way */
    return h;
}

static int authorized(coord_t *c, net_http_req_t *req)
{
    if (c->napi_keys == 0) return 1;
    const char *k = bearer(req);
    int ok = 0;
    for (int i = 0; k && i < c->napi_keys; i++)
        ok |= token_eq(c->api_keys[i], k);
    return ok;
}

afd_status_t coord_api_keys_load(coord_t *c)
{
    if (c->o.api_key && c->o.api_key[0]) {
        c->api_keys = realloc(c->api_keys, sizeof(char *) * (size_t)(c->napi_keys + 1));
        if (!c->api_keys) return AFD_ERR_NOMEM;
        c->api_keys[c->napi_keys++] = strdup(c->o.api_key);
    }
    if (!c->o.api_keys_file) return AFD_OK;
    FILE *f = fopen(c->o.api_keys_file, "r");
    if (!f) {
        afd_error("--api-keys-file %s: %m", c->o.api_keys_file);
        return AFD_ERR_IO;
    }
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        char *p = line, *e;
        while (*p == ' ' || *p == '\t')
            p++;
        e = p + strlen(p);
        while (e > p && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
            *--e = 0;
        if (!*p || *p == '#') continue;
        if (c->napi_keys >= 100000) break;
        char **nk = realloc(c->api_keys, sizeof(char *) * (size_t)(c->napi_keys + 1));
        if (!nk) {
            fclose(f);
            return AFD_ERR_NOMEM;
        }
        c->api_keys = nk;
        c->api_keys[c->napi_keys++] = strdup(p);
    }
    fclose(f);
    afd_info("%d API keys loaded", c->napi_keys);
    return AFD_OK;
}

void coord_api_handle(void *arg, net_http_req_t *req)
{
    coord_t *c = arg;
    g_coord = c;
    const char *m = req->method, *p = req->path;
    if (!strcmp(p, "/health")) {
        const char ok[] = "{\"status\":\"ok\"}";
        return net_http_respond(req, 200, "application/json", ok, sizeof(ok) - 1, NULL);
    }
    if (!strcmp(p, "/ready")) {
        if (c->ready && !c->draining) {
            const char ok[] = "{\"ready\":true}";
            return net_http_respond(req, 200, "application/json", ok, sizeof(ok) - 1, NULL);
        }
        const char no[] = "{\"ready\":false}";
        return net_http_respond(req, 503, "application/json", no, sizeof(no) - 1, NULL);
    }
    int tokn = !strcmp(p, "/tokenize") || !strcmp(p, "/detokenize");
    if ((!strncmp(p, "/v1/", 4) || tokn) && !authorized(c, req))
        return coord_api_error(req, 401, "authentication_error", NULL,
                               "missing or invalid API key (Authorization: Bearer KEY)");
    if (!strcmp(p, "/v1/completions")) {
        if (strcmp(m, "POST"))
            return coord_api_error(req, 405, "invalid_request_error", NULL, "use POST");
        return handle_completions(c, req);
    }
    if (!strcmp(p, "/v1/chat/completions") || !strcmp(p, "/v1/messages")) {
        if (strcmp(m, "POST"))
            return coord_api_error(req, 405, "invalid_request_error", NULL, "use POST");
        return coord_chat_handle(c, req, !strcmp(p, "/v1/messages"));
    }
    if (tokn) {
        if (strcmp(m, "POST"))
            return coord_api_error(req, 405, "invalid_request_error", NULL, "use POST");
        return p[1] == 't' ? handle_tokenize(c, req) : handle_detokenize(c, req);
    }
    if (!strcmp(p, "/v1/models")) return handle_models(c, req);
    if (!strcmp(p, "/metrics")) {
        size_t n;
        char *txt = coord_metrics_render(c, &n);
        if (!txt) return coord_api_error(req, 500, "server_error", NULL, "out of memory");
        net_http_respond(req, 200, "text/plain; version=0.0.4", txt, n, NULL);
        free(txt);
        return;
    }
    coord_api_error(req, 404, "invalid_request_error", NULL, "no route for %s %s", m, p);
}

/* ---- the admin API ---- */

static void handle_requests(coord_t *c, net_http_req_t *req)
{
    cJSON *root = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(root, "requests");
    uint64_t now = coord_now_us();
    for (coord_req_t *r = c->reqs; r; r = r->next) {
        if (r->finished) continue;
        for (int i = 0; i < r->nseq; i++) {
            const coord_seq_t *s = &r->seqs[i];
            if (s->done) continue;
            cJSON *o = cJSON_CreateObject();
            char id[48];
            snprintf(id, sizeof(id), "%s-%llu",
                     r->api == COORD_API_MESSAGES ? "msg"
                     : r->api == COORD_API_CHAT   ? "chatcmpl"
                                                  : "cmpl",
                     (unsigned long long)r->id);
            cJSON_AddStringToObject(o, "request", id);
            cJSON_AddNumberToObject(o, "sequence", (double)s->id);
            cJSON_AddStringToObject(o, "state", s->node >= 0 ? "running" : "waiting");
            if (s->node >= 0) cJSON_AddNumberToObject(o, "node", c->nodes[s->node].id);
            cJSON_AddNumberToObject(o, "prompt_tokens", r->prompt_len[i]);
            cJSON_AddNumberToObject(o, "generated", s->ngen);
            cJSON_AddNumberToObject(o, "max_tokens", r->sp.max_tokens);
            cJSON_AddBoolToObject(o, "stream", r->stream != 0);
            cJSON_AddNumberToObject(o, "age_s", (double)(now - r->t_arrival_us) / 1e6);
            cJSON_AddItemToArray(arr, o);
        }
    }
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
}

static void handle_config(coord_t *c, net_http_req_t *req)
{
    /* the effective options, secrets hidden, as --print-config shows them */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return coord_api_error(req, 500, "server_error", NULL, "out of memory");
    extern const afd_opt_t coord_table[];
    afd_opts_print(f, coord_table, &c->o);
    fclose(f);
    cJSON *root = cJSON_CreateObject(), *o = cJSON_AddObjectToObject(root, "options");
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strstr(line, " = ");
        if (!eq) continue;
        *eq = 0;
        cJSON_AddStringToObject(o, line, eq + 3);
    }
    free(buf);
    cJSON_AddNumberToObject(root, "micro_batches_now", c->micro_batches);
    cJSON_AddNumberToObject(root, "api_keys", c->napi_keys);
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
}

/* Drains one attention node: it takes no new sequences and, once its sequences are done,
 * leaves the data plane under a new epoch (it may then be stopped); undrain takes it back. */
static void drain_node(coord_t *c, net_http_req_t *req, long id, int undo)
{
    coord_node_t *n = NULL;
    for (int i = 0; i < COORD_MAX_NODES; i++)
        if (c->nodes[i].open && c->nodes[i].state != NODE_FREE && c->nodes[i].id == (uint32_t)id)
            n = &c->nodes[i];
    if (!n) return coord_api_error(req, 404, "invalid_request_error", "node", "no node %ld", id);
    if (n->role != AFD__ROLE__ROLE_ATTN)
        return coord_api_error(req, 400, "invalid_request_error", "node",
                               "node %ld is an FFN node: its experts have no other home; replace "
                               "it (a new node takes its share under a new epoch)",
                               id);
    if (undo) {
        n->drained = 0;
        if (!n->member && n->state >= NODE_READY) c->reconfig = 1; /* back into the data plane */
        afd_info("admin: attention node %u admits sequences again", n->id);
    } else if (!n->drained) {
        n->drained = 1;
        afd_info("admin: draining attention node %u (%d running)", n->id, n->running);
        if (n->running == 0 && n->member) c->reconfig = 1;
    }
    coord_sched_kick(c);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "node", n->id);
    cJSON_AddBoolToObject(root, "draining", n->drained);
    cJSON_AddNumberToObject(root, "running", n->running);
    cJSON_AddBoolToObject(root, "member", n->member && !(n->drained && n->running == 0));
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
}

static void handle_drain(coord_t *c, net_http_req_t *req)
{
    cJSON *body = cJSON_ParseWithLength(req->body, req->body_len);
    const cJSON *all = body ? cJSON_GetObjectItemCaseSensitive(body, "all") : NULL;
    const cJSON *undo = body ? cJSON_GetObjectItemCaseSensitive(body, "undrain") : NULL;
    const cJSON *node = body ? cJSON_GetObjectItemCaseSensitive(body, "node") : NULL;
    if (node) {
        long id = cJSON_IsNumber(node) ? (long)node->valuedouble : -1;
        int u = cJSON_IsTrue(undo);
        cJSON_Delete(body);
        if (id < 0)
            return coord_api_error(req, 400, "invalid_request_error", "node",
                                   "'node' must be a node id");
        return drain_node(c, req, id, u);
    }
    if (!body || !cJSON_IsObject(body) || (!cJSON_IsTrue(all) && !cJSON_IsTrue(undo))) {
        cJSON_Delete(body);
        return coord_api_error(req, 400, "invalid_request_error", NULL,
                               "send {\"all\": true} or {\"node\": ID} to drain, with \"undrain\": "
                               "true to admit again");
    }
    if (cJSON_IsTrue(undo)) {
        c->draining = 0;
        c->stop_after_drain = 0;
        afd_info("admin: admitting requests again");
    } else if (!c->draining) {
        long t = 0;
        if (coord_api_int(body, "timeout_s", 0, 86400, c->o.drain_timeout_s, &t, req)) {
            cJSON_Delete(body);
            return;
        }
        c->draining = 1;
        c->drain_deadline_us = coord_now_us() + (uint64_t)t * 1000000u + 1;
        afd_info("admin: draining (%d running, %d waiting; at most %ld s)", c->nrunning,
                 c->nwaiting, t);
    }
    cJSON_Delete(body);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddBoolToObject(root, "draining", c->draining);
    cJSON_AddNumberToObject(root, "running", c->nrunning);
    cJSON_AddNumberToObject(root, "waiting", c->nwaiting);
    coord_api_json(req, 200, root, NULL);
    cJSON_Delete(root);
}

void coord_admin_handle(void *arg, net_http_req_t *req)
{
    coord_t *c = arg;
    const char *p = req->path, *m = req->method;
    if (!strcmp(p, "/health")) {
        const char ok[] = "{\"status\":\"ok\"}";
        return net_http_respond(req, 200, "application/json", ok, sizeof(ok) - 1, NULL);
    }
    if (c->o.admin_token && c->o.admin_token[0]) {
        const char *k = bearer(req);
        if (!k || !token_eq(c->o.admin_token, k))
            return coord_api_error(req, 401, "authentication_error", NULL,
                                   "missing or invalid admin token (Authorization: Bearer TOKEN)");
    }
    if (!strcmp(p, "/admin/status")) return handle_status(c, req);
    if (!strcmp(p, "/admin/requests")) return handle_requests(c, req);
    if (!strcmp(p, "/admin/config")) return handle_config(c, req);
    if (!strcmp(p, "/admin/drain")) {
        if (strcmp(m, "POST"))
            return coord_api_error(req, 405, "invalid_request_error", NULL, "use POST");
        return handle_drain(c, req);
    }
    if (!strcmp(p, "/metrics")) {
        size_t n;
        char *txt = coord_metrics_render(c, &n);
        if (!txt) return coord_api_error(req, 500, "server_error", NULL, "out of memory");
        net_http_respond(req, 200, "text/plain; version=0.0.4", txt, n, NULL);
        free(txt);
        return;
    }
    coord_api_error(req, 404, "invalid_request_error", NULL, "no admin route for %s %s", m, p);
}
