/*
 * coord_chat: OpenAI /v1/chat/completions and Anthropic /v1/messages. With a tokenizer and
 * a chat template loaded, text messages (a string or text content parts; Anthropic's
 * top-level "system" first) are rendered through the template and encoded; the answer is
 * the detokenized text, cut at any stop string. A message's content may instead be a list
 * of token ids: the prompt is then the messages' ids concatenated in order (the only form
 * without a tokenizer, when answers read "token_id:N"). The generated ids are also given
 * ("token_ids", an extension).
 * Answers follow each API's shapes: chat.completion / chat.completion.chunk SSE ending
 * in [DONE]; Anthropic's message object and its named SSE events (message_start,
 * content_block_start, content_block_delta, content_block_stop, message_delta,
 * message_stop); errors in each API's own error object.
 */
#define _GNU_SOURCE
#include "coord_api.h"
#include "mdl_sampler.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHAT_MAX_MESSAGES 1024

/* ---- errors ---- */

static const char *anthropic_error_type(int status)
{
    switch (status) {
    case 400:
        return "invalid_request_error";
    case 401:
        return "authentication_error";
    case 403:
        return "permission_error";
    case 404:
        return "not_found_error";
    case 413:
        return "request_too_large";
    case 429:
        return "rate_limit_error";
    case 503:
    case 529:
        return "overloaded_error";
    default:
        return "api_error";
    }
}

static void anthropic_error(net_http_req_t *req, int status, const char *msg)
{
    cJSON *root = cJSON_CreateObject(), *e;
    cJSON_AddStringToObject(root, "type", "error");
    e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "type", anthropic_error_type(status));
    cJSON_AddStringToObject(e, "message", msg);
    coord_api_json(req, status, root, status == 429 ? "Retry-After: 1\r\n" : NULL);
    cJSON_Delete(root);
}

/* One request being parsed: which API answers, and where. */
typedef struct chat_ctx {
    coord_t *c;
    net_http_req_t *req;
    int anth;
} chat_ctx_t;

/* Answers an error in the request's API's shape. param: the field (OpenAI's "param"). */
static void chat_err(const chat_ctx_t *x, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void chat_err(const chat_ctx_t *x, int status, const char *param, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (x->anth)
        anthropic_error(x->req, status, msg);
    else
        coord_api_error(x->req, status, status >= 500 ? "server_error" : "invalid_request_error",
                        param, "%s", msg);
}

/* Typed optional fields in the request's error shape (OpenAI: coord_api_*). */
static int chat_int(const chat_ctx_t *x, const cJSON *o, const char *k, long min, long max,
                    long def, long *out)
{
    if (!x->anth) return coord_api_int(o, k, min, max, def, out, x->req);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble)) {
        chat_err(x, 400, k, "%s: must be an integer", k);
        return -1;
    }
    if (v->valuedouble < (double)min || v->valuedouble > (double)max) {
        chat_err(x, 400, k, "%s: must be in [%ld, %ld]", k, min, max);
        return -1;
    }
    *out = (long)v->valuedouble;
    return 0;
}

static int chat_num(const chat_ctx_t *x, const cJSON *o, const char *k, double min, double max)
{
    double d;
    if (!x->anth) return coord_api_num(o, k, min, max, 0, &d, x->req);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= min && v->valuedouble <= max)) {
        chat_err(x, 400, k, "%s: must be a number in [%g, %g]", k, min, max);
        return -1;
    }
    return 0;
}

static int chat_bool(const chat_ctx_t *x, const cJSON *o, const char *k, int def, int *out)
{
    if (!x->anth) return coord_api_bool(o, k, def, out, x->req);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) {
        chat_err(x, 400, k, "%s: must be true or false", k);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 0;
}

/* present: not absent and not null */
static const cJSON *field(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

/* an empty value: null, false, 0, "", [] or {} */
static int is_empty(const cJSON *v)
{
    if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return 1;
    if (cJSON_IsNumber(v)) return v->valuedouble == 0;
    if (cJSON_IsString(v)) return v->valuestring[0] == 0;
    if (cJSON_IsArray(v) || cJSON_IsObject(v)) return cJSON_GetArraySize(v) == 0;
    return 0;
}

/* ---- messages ---- */

/* Checks that content (named where) is a list of token ids: returns its length, or -1
 * after answering 400. */
static int content_ids(const chat_ctx_t *x, const cJSON *content, const char *where)
{
    if (!content || cJSON_IsNull(content)) {
        chat_err(x, 400, where, "%s is required", where);
        return -1;
    }
    if (cJSON_IsString(content)) {
        chat_err(
            x, 400, where,
            "%s: text content needs a tokenizer, and none is loaded: send token ids as content",
            where);
        return -1;
    }
    if (!cJSON_IsArray(content)) {
        chat_err(x, 400, where, "%s must be a list of token ids", where);
        return -1;
    }
    int j = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, content)
    {
        if (cJSON_IsObject(e)) {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "type");
            if (cJSON_IsString(t) && !strcmp(t->valuestring, "text"))
                chat_err(x, 400, where,
                         "%s[%d]: text content needs a tokenizer, and none is loaded: send token "
                         "ids as content",
                         where, j);
            else
                chat_err(x, 400, where, "%s[%d]: content of type '%s' is not supported", where, j,
                         cJSON_IsString(t) ? t->valuestring : "?");
            return -1;
        }
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble >= x->c->cfg.vocab_size) {
            chat_err(x, 400, where, "%s[%d] must be a token id: an integer in [0, %d)", where, j,
                     x->c->cfg.vocab_size);
            return -1;
        }
        j++;
    }
    return j;
}

static int role_ok(const char *role, int anth)
{
    static const char *openai[] = {"system", "user", "assistant", "developer", NULL};
    static const char *anthropic[] = {"user", "assistant", NULL};
    for (const char **p = anth ? anthropic : openai; *p; p++)
        if (!strcmp(role, *p)) return 1;
    return 0;
}

/* How a content is given: token ids, text (a string or text parts), or -1 after a 400. */
enum { CONTENT_IDS, CONTENT_TEXT };

static int content_kind(const chat_ctx_t *x, const cJSON *content, const char *where)
{
    if (!content || cJSON_IsNull(content)) {
        chat_err(x, 400, where, "%s is required", where);
        return -1;
    }
    if (cJSON_IsString(content)) return CONTENT_TEXT;
    if (cJSON_IsArray(content) && cJSON_IsObject(cJSON_GetArrayItem(content, 0)))
        return CONTENT_TEXT;
    return CONTENT_IDS;
}

/* Appends a text content (a string, or text parts joined by newlines) to out. */
static int content_text(const chat_ctx_t *x, const cJSON *content, const char *where,
                        tok_buf_t *out)
{
    if (cJSON_IsString(content)) {
        if (!tok_buf_add(out, content->valuestring, strlen(content->valuestring))) return 0;
        chat_err(x, 500, NULL, "out of memory");
        return -1;
    }
    int j = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, content)
    {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "type");
        const cJSON *txt = cJSON_GetObjectItemCaseSensitive(e, "text");
        if (!cJSON_IsObject(e) || !cJSON_IsString(t)) {
            chat_err(x, 400, where, "%s[%d] must be a content part with a type", where, j);
            return -1;
        }
        if (strcmp(t->valuestring, "text")) {
            chat_err(x, 400, where, "%s[%d]: content of type '%.64s' is not supported", where, j,
                     t->valuestring);
            return -1;
        }
        if (!cJSON_IsString(txt)) {
            chat_err(x, 400, where, "%s[%d].text must be a string", where, j);
            return -1;
        }
        if ((j && tok_buf_add(out, "\n", 1)) ||
            tok_buf_add(out, txt->valuestring, strlen(txt->valuestring))) {
            chat_err(x, 500, NULL, "out of memory");
            return -1;
        }
        j++;
    }
    return 0;
}

/* Renders text messages through the chat template and encodes the result. */
static int render_chat(const chat_ctx_t *x, const cJSON *const *parts, const char **roles, int nmsg,
                       int add_gen, coord_req_t *r)
{
    coord_t *c = x->c;
    if (!c->chat.tmpl) {
        chat_err(x, 400, "messages",
                 "text content needs a chat template, and the model has none: send token ids "
                 "as content");
        return -1;
    }
    cJSON *ctx = cJSON_CreateObject(), *list = cJSON_AddArrayToObject(ctx, "messages");
    tok_buf_t text = {0};
    char where[64];
    int rc = -1;
    for (int p = 0; p <= nmsg; p++) {
        if (!parts[p]) continue;
        tok_buf_t t = {0};
        snprintf(where, sizeof(where), p ? "messages[%d].content" : "system", p - 1);
        if (content_text(x, parts[p], where, &t)) {
            tok_buf_free(&t);
            goto out;
        }
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", roles[p]);
        cJSON_AddStringToObject(m, "content", t.p ? t.p : "");
        cJSON_AddItemToArray(list, m);
        tok_buf_free(&t);
    }
    cJSON_AddBoolToObject(ctx, "add_generation_prompt", add_gen);
    if (c->chat.bos_token) cJSON_AddStringToObject(ctx, "bos_token", c->chat.bos_token);
    if (c->chat.eos_token) cJSON_AddStringToObject(ctx, "eos_token", c->chat.eos_token);
    char err[512];
    afd_status_t st = tok_tmpl_render(c->chat.tmpl, ctx, &text, err, sizeof(err));
    if (st == AFD_ERR_NOMEM) {
        chat_err(x, 500, NULL, "out of memory");
        goto out;
    }
    if (st) {
        chat_err(x, 400, "messages", "%s", err);
        goto out;
    }
    rc = coord_api_encode(c, x->req, "messages", text.p, text.len, 0, &r->prompts[0],
                          &r->prompt_len[0]);
out:
    tok_buf_free(&text);
    cJSON_Delete(ctx);
    return rc;
}

/* Builds the prompt from "system" (Anthropic) and "messages" into r->prompts[0]: text
 * messages through the chat template, token-id messages concatenated in order. */
static int parse_messages(const chat_ctx_t *x, const cJSON *body, coord_req_t *r)
{
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(body, "messages");
    if (!msgs || cJSON_IsNull(msgs)) {
        chat_err(x, 400, "messages", "messages: field required");
        return -1;
    }
    if (!cJSON_IsArray(msgs)) {
        chat_err(x, 400, "messages", "messages must be a list of message objects");
        return -1;
    }
    int nmsg = cJSON_GetArraySize(msgs);
    if (nmsg == 0) {
        chat_err(x, 400, "messages", "messages must not be empty");
        return -1;
    }
    if (nmsg > CHAT_MAX_MESSAGES) {
        chat_err(x, 400, "messages", "messages: at most %d messages per request (got %d)",
                 CHAT_MAX_MESSAGES, nmsg);
        return -1;
    }
    int add_gen = 1;
    if (!x->anth && coord_api_bool(body, "add_generation_prompt", 1, &add_gen, x->req)) return -1;
    /* parts[0]: Anthropic's system (or NULL); parts[1 + i]: messages[i].content */
    const cJSON *parts[CHAT_MAX_MESSAGES + 1] = {0};
    const char *roles[CHAT_MAX_MESSAGES + 1] = {0};
    int ntext = 0, nids = 0;
    char where[64];
    if (x->anth) {
        const cJSON *sys = field(body, "system");
        if (sys) {
            int k = content_kind(x, sys, "system");
            if (k < 0) return -1;
            parts[0] = sys;
            roles[0] = "system";
            k == CONTENT_TEXT ? ntext++ : nids++;
        }
    }
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs)
    {
        snprintf(where, sizeof(where), "messages[%d]", i);
        if (!cJSON_IsObject(m)) {
            chat_err(x, 400, where, "%s must be an object with role and content", where);
            return -1;
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        snprintf(where, sizeof(where), "messages[%d].role", i);
        if (!cJSON_IsString(role)) {
            chat_err(x, 400, where, "%s is required (a string)", where);
            return -1;
        }
        if (!x->anth &&
            (!strcmp(role->valuestring, "tool") || !strcmp(role->valuestring, "function"))) {
            chat_err(x, 400, where, "%s '%s' is not supported: no tool calling", where,
                     role->valuestring);
            return -1;
        }
        if (!role_ok(role->valuestring, x->anth)) {
            chat_err(x, 400, where, "%s '%.64s' is not one of %s", where, role->valuestring,
                     x->anth ? "user, assistant" : "system, user, assistant, developer");
            return -1;
        }
        if (!x->anth && !is_empty(cJSON_GetObjectItemCaseSensitive(m, "tool_calls"))) {
            snprintf(where, sizeof(where), "messages[%d].tool_calls", i);
            chat_err(x, 400, where, "%s is not supported: no tool calling", where);
            return -1;
        }
        snprintf(where, sizeof(where), "messages[%d].content", i);
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        int k = content_kind(x, content, where);
        if (k < 0) return -1;
        parts[1 + i] = content;
        /* developer: the system role of newer clients */
        roles[1 + i] = !strcmp(role->valuestring, "developer") ? "system" : role->valuestring;
        k == CONTENT_TEXT ? ntext++ : nids++;
        i++;
    }
    if (ntext && x->c->tok) {
        if (nids) {
            chat_err(x, 400, "messages",
                     "messages mix text and token-id content: use one kind in a request");
            return -1;
        }
        return render_chat(x, parts, roles, nmsg, add_gen, r);
    }
    /* token ids: checked (text content without a tokenizer is refused there) */
    long total = 0;
    for (int p = 0; p <= nmsg; p++) {
        if (!parts[p]) continue;
        snprintf(where, sizeof(where), p ? "messages[%d].content" : "system", p - 1);
        int n = content_ids(x, parts[p], where);
        if (n < 0) return -1;
        total += n;
    }
    if (total == 0) {
        chat_err(x, 400, "messages", "messages hold no token ids: the prompt would be empty");
        return -1;
    }
    if (total > x->c->o.max_prompt) {
        chat_err(x, 400, "messages", "the prompt must have at most %ld tokens (got %ld)",
                 x->c->o.max_prompt, total);
        return -1;
    }
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)total);
    if (!ids) {
        chat_err(x, 500, NULL, "out of memory");
        return -1;
    }
    int k = 0;
    for (int p = 0; p <= nmsg; p++) {
        const cJSON *e;
        if (!parts[p]) continue;
        cJSON_ArrayForEach(e, parts[p]) ids[k++] = (int32_t)e->valuedouble;
    }
    r->prompts[0] = ids;
    r->prompt_len[0] = k;
    return 0;
}

int coord_chat_prompt(coord_t *c, net_http_req_t *req, const cJSON *body, coord_req_t *r)
{
    chat_ctx_t x = {c, req, 0};
    return parse_messages(&x, body, r);
}

/* ---- OpenAI's and Anthropic's own fields ---- */

static int openai_fields(const chat_ctx_t *x, const cJSON *body, coord_req_t *r)
{
    net_http_req_t *req = x->req;
    const char *mt = field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if (coord_api_sampling(x->c, req, body, r, mt, 0)) return -1;
    const cJSON *nv = field(body, "n");
    if (nv && !(cJSON_IsNumber(nv) && nv->valuedouble == 1)) {
        chat_err(x, 400, "n", "n: only n=1 is supported");
        return -1;
    }
    int stream, logprobs;
    long top = -1;
    if (coord_api_bool(body, "stream", 0, &stream, req) ||
        coord_api_bool(body, "logprobs", 0, &logprobs, req) ||
        coord_api_int(body, "top_logprobs", 0, MDL_MAX_LOGPROBS, -1, &top, req) ||
        coord_api_stream_options(body, stream, &stream, req))
        return -1;
    if (top > 0 && !logprobs) {
        chat_err(x, 400, "top_logprobs", "top_logprobs needs logprobs set to true");
        return -1;
    }
    const cJSON *stop = field(body, "stop");
    if (stop && !is_empty(stop) && !x->c->tok) {
        chat_err(x, 400, "stop",
                 "stop strings need a tokenizer, and none is loaded: use stop_token_ids");
        return -1;
    }
    if (coord_api_stops(x->c, req, stop, "stop", r)) return -1;
    /* what changes the answer and is not implemented: refused, never silently ignored */
    static const char *tools[] = {"tools", "functions", "function_call"};
    for (size_t i = 0; i < sizeof(tools) / sizeof(*tools); i++)
        if (!is_empty(cJSON_GetObjectItemCaseSensitive(body, tools[i]))) {
            chat_err(x, 400, tools[i], "%s is not supported: no tool calling", tools[i]);
            return -1;
        }
    const cJSON *tc = field(body, "tool_choice");
    if (tc && !(cJSON_IsString(tc) &&
                (!strcmp(tc->valuestring, "none") || !strcmp(tc->valuestring, "auto")))) {
        chat_err(x, 400, "tool_choice", "tool_choice is not supported: no tool calling");
        return -1;
    }
    const cJSON *rf = field(body, "response_format");
    if (rf) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(rf, "type");
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "text")) {
            chat_err(x, 400, "response_format",
                     "response_format: only {\"type\": \"text\"} is supported");
            return -1;
        }
    }
    static const char *unsupported[] = {"frequency_penalty", "presence_penalty", "logit_bias",
                                        "audio", "prediction"};
    for (size_t i = 0; i < sizeof(unsupported) / sizeof(*unsupported); i++)
        if (!is_empty(cJSON_GetObjectItemCaseSensitive(body, unsupported[i]))) {
            chat_err(x, 400, unsupported[i], "%s is not supported", unsupported[i]);
            return -1;
        }
    const cJSON *mod = field(body, "modalities"), *e;
    if (mod) {
        int ok = cJSON_IsArray(mod);
        cJSON_ArrayForEach(e, mod) if (!cJSON_IsString(e) || strcmp(e->valuestring, "text")) ok = 0;
        if (!ok) {
            chat_err(x, 400, "modalities", "modalities: only [\"text\"] is supported");
            return -1;
        }
    }
    r->stream = stream;
    r->logprobs = logprobs ? (int)(top > 0 ? top : 0) : -1;
    return 0;
}

static int anthropic_fields(const chat_ctx_t *x, const cJSON *body, coord_req_t *r)
{
    coord_t *c = x->c;
    long max_tokens, top_k;
    int stream;
    /* checked here first so that their errors have Anthropic's shape */
    if (!field(body, "max_tokens")) {
        chat_err(x, 400, "max_tokens", "max_tokens: field required");
        return -1;
    }
    if (chat_int(x, body, "max_tokens", 1, c->cfg.max_position, 0, &max_tokens) ||
        chat_num(x, body, "temperature", 0, 1) || chat_num(x, body, "top_p", 1e-9, 1) ||
        chat_int(x, body, "top_k", -1, c->cfg.vocab_size, 0, &top_k) ||
        chat_bool(x, body, "stream", 0, &stream))
        return -1;
    const cJSON *ss = field(body, "stop_sequences");
    if (ss && !is_empty(ss) && !c->tok) {
        chat_err(x, 400, "stop_sequences",
                 "stop_sequences need a tokenizer, and none is loaded: use stop_token_ids");
        return -1;
    }
    if (ss && !cJSON_IsArray(ss)) {
        chat_err(x, 400, "stop_sequences", "stop_sequences must be a list of strings");
        return -1;
    }
    if (coord_api_stops(c, x->req, ss, "stop_sequences", r)) return -1;
    if (!is_empty(cJSON_GetObjectItemCaseSensitive(body, "tools"))) {
        chat_err(x, 400, "tools", "tools: tool use is not supported");
        return -1;
    }
    const cJSON *tc = field(body, "tool_choice");
    if (tc) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(tc, "type");
        if (!cJSON_IsString(t) ||
            (strcmp(t->valuestring, "none") && strcmp(t->valuestring, "auto"))) {
            chat_err(x, 400, "tool_choice", "tool_choice: tool use is not supported");
            return -1;
        }
    }
    const cJSON *th = field(body, "thinking");
    if (th) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(th, "type");
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "disabled")) {
            chat_err(x, 400, "thinking", "thinking: extended thinking is not supported");
            return -1;
        }
    }
    long plen = r->prompt_len[0];
    if (plen + max_tokens > c->cfg.max_position) {
        chat_err(x, 400, "max_tokens",
                 "prompt (%ld tokens) + max_tokens (%ld) exceed the context of %d", plen,
                 max_tokens, c->cfg.max_position);
        return -1;
    }
    if (coord_api_sampling(c, x->req, body, r, "max_tokens", 1)) return -1;
    r->stream = stream;
    r->logprobs = -1;
    return 0;
}

void coord_chat_handle(coord_t *c, net_http_req_t *req, int anthropic)
{
    chat_ctx_t x = {c, req, anthropic};
    cJSON *body = cJSON_ParseWithLength(req->body, req->body_len);
    if (!body || !cJSON_IsObject(body)) {
        cJSON_Delete(body);
        return chat_err(&x, 400, NULL, "the body must be a JSON object");
    }
    coord_req_t *r = calloc(1, sizeof(*r));
    if (!r) {
        cJSON_Delete(body);
        return chat_err(&x, 500, NULL, "out of memory");
    }
    r->api = anthropic ? COORD_API_MESSAGES : COORD_API_CHAT;
    if (anthropic) {
        const cJSON *model = field(body, "model");
        if (model && (!cJSON_IsString(model) || strcmp(model->valuestring, c->o.model_name))) {
            chat_err(&x, 404, "model", "model: %.128s",
                     cJSON_IsString(model) ? model->valuestring : "must be a string");
            goto fail;
        }
    } else if (coord_api_check_model(c, req, body)) {
        goto fail;
    }
    if (coord_api_req_init(c, req, r, 1) || parse_messages(&x, body, r)) goto fail;
    if (anthropic ? anthropic_fields(&x, body, r) : openai_fields(&x, body, r)) goto fail;
    if (anthropic && !c->ready) {
        chat_err(&x, 503, NULL, "the cluster is not ready (nodes missing or joining)");
        goto fail;
    }
    cJSON_Delete(body);
    coord_api_submit(c, req, r);
    return;
fail:
    cJSON_Delete(body);
    coord_req_free(r);
}

/* ---- answers ---- */

static cJSON *chat_base(const coord_t *c, const coord_req_t *r, const char *object)
{
    cJSON *root = cJSON_CreateObject();
    char id[48];
    snprintf(id, sizeof(id), "chatcmpl-%llu", (unsigned long long)r->id);
    cJSON_AddStringToObject(root, "id", id);
    cJSON_AddStringToObject(root, "object", object);
    cJSON_AddNumberToObject(root, "created", (double)r->created);
    cJSON_AddStringToObject(root, "model", c->o.model_name);
    return root;
}

/* OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}...]} */
static cJSON *chat_logprobs(const coord_t *c, const coord_req_t *r, const coord_seq_t *s, int from,
                            int to)
{
    cJSON *lp = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(lp, "content");
    int L = r->logprobs > 0 ? r->logprobs : 0;
    char b[API_TOKEN_TEXT];
    for (int g = from; g < to; g++) {
        cJSON *e = cJSON_CreateObject();
        coord_api_token_text(c, s->out[g], b, sizeof(b));
        cJSON_AddStringToObject(e, "token", b);
        cJSON_AddNumberToObject(e, "logprob", (double)s->lp[g]);
        cJSON_AddNullToObject(e, "bytes");
        cJSON *top = cJSON_AddArrayToObject(e, "top_logprobs");
        for (int k = 0; k < L; k++) {
            int32_t id = s->top_ids[g * L + k];
            if (id < 0) continue;
            cJSON *t = cJSON_CreateObject();
            coord_api_token_text(c, id, b, sizeof(b));
            cJSON_AddStringToObject(t, "token", b);
            cJSON_AddNumberToObject(t, "logprob", (double)s->top_lp[g * L + k]);
            cJSON_AddNullToObject(t, "bytes");
            cJSON_AddItemToArray(top, t);
        }
        cJSON_AddItemToArray(content, e);
    }
    return lp;
}

/* the text of a sequence (malloc'd) */
static char *seq_text(const coord_seq_t *s)
{
    return coord_api_text_dup(s);
}

static const char *anthropic_stop_reason(const coord_seq_t *s)
{
    if (s->stop_hit) return "stop_sequence";
    return s->finish && !strcmp(s->finish, "stop") ? "end_turn" : "max_tokens";
}

/* the stop string that ended s (Anthropic's stop_sequence), or NULL */
static const char *stop_string(const coord_seq_t *s)
{
    if (!s->stop_hit || !s->ts || s->ts->matched < 0) return NULL;
    return s->ts->stops[s->ts->matched];
}

static void add_stop_sequence(cJSON *o, const coord_seq_t *s)
{
    const char *ss = stop_string(s);
    if (ss)
        cJSON_AddStringToObject(o, "stop_sequence", ss);
    else
        cJSON_AddNullToObject(o, "stop_sequence");
}

/* Sends "event: NAME\ndata: JSON\n\n" and deletes j; -1 when the client is gone. */
static int sse_event(net_http_req_t *http, const char *name, cJSON *j)
{
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!txt) return -1;
    size_t n = strlen(txt), nl = strlen(name), len = 7 + nl + 7 + n + 2;
    char *buf = malloc(len + 1);
    int rc = -1;
    if (buf) {
        snprintf(buf, len + 1, "event: %s\ndata: %s\n\n", name, txt);
        rc = net_http_stream_write(http, buf, len) == AFD_OK ? 0 : -1;
        free(buf);
    }
    free(txt);
    return rc;
}

static cJSON *typed(const char *type)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    return o;
}

/* Anthropic's message object: content [] (stream start) or the whole text. */
static cJSON *anthropic_message(const coord_t *c, const coord_req_t *r, const coord_seq_t *s,
                                int whole)
{
    cJSON *m = cJSON_CreateObject();
    char id[48];
    snprintf(id, sizeof(id), "msg_%llu", (unsigned long long)r->id);
    cJSON_AddStringToObject(m, "id", id);
    cJSON_AddStringToObject(m, "type", "message");
    cJSON_AddStringToObject(m, "role", "assistant");
    cJSON_AddStringToObject(m, "model", c->o.model_name);
    cJSON *content = cJSON_AddArrayToObject(m, "content");
    if (whole) {
        cJSON *blk = typed("text");
        char *text = seq_text(s);
        cJSON_AddStringToObject(blk, "text", text ? text : "");
        free(text);
        cJSON_AddItemToArray(content, blk);
        cJSON_AddStringToObject(m, "stop_reason", anthropic_stop_reason(s));
        add_stop_sequence(m, s);
    } else {
        cJSON_AddNullToObject(m, "stop_reason");
        cJSON_AddNullToObject(m, "stop_sequence");
    }
    cJSON *u = cJSON_AddObjectToObject(m, "usage");
    cJSON_AddNumberToObject(u, "input_tokens", r->prompt_len[0]);
    cJSON_AddNumberToObject(u, "output_tokens", whole ? s->ngen : 0);
    if (whole) cJSON_AddItemToObject(m, "token_ids", cJSON_CreateIntArray(s->out, s->ngen));
    return m;
}

/* message_start and content_block_start */
static int anthropic_start(const coord_t *c, const coord_req_t *r, const coord_seq_t *s,
                           net_http_req_t *http)
{
    cJSON *ev = typed("message_start");
    cJSON_AddItemToObject(ev, "message", anthropic_message(c, r, s, 0));
    if (sse_event(http, "message_start", ev)) return -1;
    ev = typed("content_block_start");
    cJSON_AddNumberToObject(ev, "index", 0);
    cJSON *blk = typed("text");
    cJSON_AddStringToObject(blk, "text", "");
    cJSON_AddItemToObject(ev, "content_block", blk);
    return sse_event(http, "content_block_start", ev);
}

/* One OpenAI chunk of sequence s: its token g (or, g < 0, no token) with its text delta
 * (NULL: the token's own text), role on the first. */
static void openai_chunk(const coord_t *c, const coord_req_t *r, const coord_seq_t *s,
                         net_http_req_t *http, int g, int role, const char *finish,
                         const char *delta, size_t dlen)
{
    cJSON *root = chat_base(c, r, "chat.completion.chunk");
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", s->choice);
    cJSON *d = cJSON_AddObjectToObject(ch, "delta");
    if (role) cJSON_AddStringToObject(d, "role", "assistant");
    char b[API_TOKEN_TEXT] = "";
    if (delta) {
        char *t = strndup(delta, dlen);
        cJSON_AddStringToObject(d, "content", t ? t : "");
        free(t);
    } else {
        if (g >= 0) coord_api_token_text(c, s->out[g], b, sizeof(b));
        cJSON_AddStringToObject(d, "content", b);
    }
    cJSON_AddItemToObject(d, "token_ids",
                          g >= 0 ? cJSON_CreateIntArray(&s->out[g], 1) : cJSON_CreateArray());
    if (r->logprobs >= 0 && g >= 0)
        cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(c, r, s, g, g + 1));
    else
        cJSON_AddNullToObject(ch, "logprobs");
    if (finish)
        cJSON_AddStringToObject(ch, "finish_reason", finish);
    else
        cJSON_AddNullToObject(ch, "finish_reason");
    cJSON_AddItemToArray(choices, ch);
    coord_api_sse(http, root);
    cJSON_Delete(root);
}

void coord_chat_token(coord_t *c, coord_req_t *r, coord_seq_t *s, const char *delta, size_t dlen)
{
    if (!r->stream || !r->http || s->ngen < 1) return;
    int g = s->ngen - 1;
    if (!s->ts) delta = NULL;
    if (r->api == COORD_API_CHAT)
        return openai_chunk(c, r, s, r->http, g, g == 0,
                            s->finish || s->stop_hit ? coord_api_seq_finish(s) : NULL, delta, dlen);
    if (g == 0 && anthropic_start(c, r, s, r->http)) return;
    cJSON *ev = typed("content_block_delta");
    cJSON_AddNumberToObject(ev, "index", 0);
    cJSON *d = typed("text_delta");
    char b[API_TOKEN_TEXT];
    if (delta) {
        char *t = strndup(delta, dlen);
        cJSON_AddStringToObject(d, "text", t ? t : "");
        free(t);
    } else {
        coord_api_token_text(c, s->out[g], b, sizeof(b));
        cJSON_AddStringToObject(d, "text", b);
    }
    cJSON_AddItemToObject(d, "token_ids", cJSON_CreateIntArray(&s->out[g], 1));
    cJSON_AddItemToObject(ev, "delta", d);
    sse_event(r->http, "content_block_delta", ev);
}

static void openai_finish(coord_t *c, coord_req_t *r, net_http_req_t *http, const char *err)
{
    coord_seq_t *s = &r->seqs[0];
    if (r->stream) {
        if (err) {
            cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
            cJSON_AddStringToObject(e, "message", err);
            cJSON_AddStringToObject(e, "type", "server_error");
            cJSON_AddNullToObject(e, "param");
            cJSON_AddNumberToObject(e, "code", 500);
            coord_api_sse(http, root);
            cJSON_Delete(root);
        } else {
            /* no token was streamed: still one chunk with the role and the reason */
            if (s->ngen == 0)
                openai_chunk(c, r, s, http, -1, 1, s->finish ? s->finish : "stop", NULL, 0);
            if (r->stream == 2) { /* stream_options.include_usage */
                cJSON *root = chat_base(c, r, "chat.completion.chunk");
                cJSON_AddArrayToObject(root, "choices");
                cJSON_AddItemToObject(root, "usage", coord_api_usage(r));
                coord_api_sse(http, root);
                cJSON_Delete(root);
            }
        }
        net_http_stream_write(http, "data: [DONE]\n\n", 14);
        net_http_stream_end(http);
        return;
    }
    if (err) return coord_api_error(http, 500, "server_error", NULL, "%s", err);
    cJSON *root = chat_base(c, r, "chat.completion");
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", 0);
    cJSON *m = cJSON_AddObjectToObject(ch, "message");
    cJSON_AddStringToObject(m, "role", "assistant");
    char *text = seq_text(s);
    cJSON_AddStringToObject(m, "content", text ? text : "");
    free(text);
    cJSON_AddNullToObject(m, "refusal");
    cJSON_AddItemToObject(m, "token_ids", cJSON_CreateIntArray(s->out, s->ngen));
    if (r->logprobs >= 0)
        cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(c, r, s, 0, s->ngen));
    else
        cJSON_AddNullToObject(ch, "logprobs");
    cJSON_AddStringToObject(ch, "finish_reason", coord_api_seq_finish(s));
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddItemToObject(root, "usage", coord_api_usage(r));
    coord_api_json(http, 200, root, NULL);
    cJSON_Delete(root);
}

static void anthropic_finish(coord_t *c, coord_req_t *r, net_http_req_t *http, const char *err)
{
    coord_seq_t *s = &r->seqs[0];
    if (!r->stream) {
        if (err) return anthropic_error(http, 500, err);
        cJSON *m = anthropic_message(c, r, s, 1);
        coord_api_json(http, 200, m, NULL);
        cJSON_Delete(m);
        return;
    }
    /* the token events sent message_start with the first token; a stream without one
     * still starts with it, so that clients parse what follows */
    int ok = s->ngen > 0 || anthropic_start(c, r, s, http) == 0;
    if (ok && err) {
        cJSON *ev = typed("error"), *e = typed("api_error");
        cJSON_AddStringToObject(e, "message", err);
        cJSON_AddItemToObject(ev, "error", e);
        sse_event(http, "error", ev);
    } else if (ok) {
        cJSON *ev = typed("content_block_stop");
        cJSON_AddNumberToObject(ev, "index", 0);
        if (sse_event(http, "content_block_stop", ev) == 0) {
            ev = typed("message_delta");
            cJSON *d = cJSON_AddObjectToObject(ev, "delta");
            cJSON_AddStringToObject(d, "stop_reason", anthropic_stop_reason(s));
            add_stop_sequence(d, s);
            cJSON *u = cJSON_AddObjectToObject(ev, "usage");
            cJSON_AddNumberToObject(u, "output_tokens", s->ngen);
            if (sse_event(http, "message_delta", ev) == 0)
                sse_event(http, "message_stop", typed("message_stop"));
        }
    }
    net_http_stream_end(http);
}

void coord_chat_finish(coord_t *c, coord_req_t *r, net_http_req_t *http, const char *err)
{
    if (!http || r->nseq < 1) return;
    if (r->api == COORD_API_MESSAGES)
        anthropic_finish(c, r, http, err);
    else
        openai_finish(c, r, http, err);
}
