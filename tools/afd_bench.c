/*
 * afd_bench: the serving and decode benchmarks.
 *
 *   afd_bench serve   drives any OpenAI-compatible /v1/completions endpoint (ours, vLLM,
 *                     SGLang) with synthetic token-id prompts at a Poisson request rate or
 *                     a fixed concurrency, streaming, and prints the block `vllm bench
 *                     serve` prints (throughputs, TTFT, TPOT, ITL, E2EL, goodput); --result-file
 *                     writes it as JSON.
 *   afd_bench decode  the Step3 paper's measurement: a steady decode batch of B sequences
 *                     at context C on a cluster (a running one, --url/--admin, or one it starts
 *                     with afdctl local-up): tokens/s in total, per attention and per FFN node,
 *                     TPOT p50/p99, per-node busy fractions and the pipeline efficiency from the
 *                     nodes' stage times, and afd_run (the monolithic baseline) on the same batch.
 *   afd_bench sweep   decode over lists of A:F ratios, micro-batch counts, batch sizes and
 *                     context lengths: a results file and an SVG plot of tokens/s against TPOT,
 *                     one line per configuration.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "afd_opts.h"
#include "bn_http.h"
#include "bn_stats.h"
#include "bn_svg.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define MAX_PROMPTS 1000000
#define MAX_LEN     (1 << 20)

static double now_s(void)
{
    return (double)uv_hrtime() / 1e9;
}

/* ---- a load run: N streamed completions at a rate or a concurrency ---- */

typedef struct load_req {
    struct load *ld;
    int idx, in_len, max_tokens;
    int32_t *prompt; /* (in_len) */
    double t_start, t_first, t_last, t_end;
    int ntok, usage_tok, status, ok, failed;
    char err[200];
    double *itl; /* (nitl) seconds */
    size_t nitl, citl;
    bn_sse_t sse;
} load_req_t;

typedef struct load {
    uv_loop_t *loop;
    bn_url_t url;
    const char *endpoint, *model, *api_key;
    double rate; /* requests/s; inf: all at once */
    int max_conc, ignore_eos, progress;
    unsigned timeout_ms;
    load_req_t *reqs;
    int n, next, running, done, peak;
    double t0, t_last_done;
    double *arrive; /* (n) seconds after t0 */
    uv_timer_t arrival;
    /* token events for the peak output rate: (time, tokens) */
    double *ev_t;
    int *ev_n;
    size_t nev, cev;
    int tty;
    double last_progress;
    /* an optional sampler: called every poll_ms while requests run */
    uv_timer_t poll;
    unsigned poll_ms;
    void (*on_poll)(void *ud);
    void *poll_ud;
} load_t;

static void load_start_one(load_t *ld);

static void itl_push(load_req_t *r, double v)
{
    if (r->nitl == r->citl) {
        size_t nc = r->citl ? 2 * r->citl : 64;
        double *n = realloc(r->itl, nc * sizeof(double));
        if (!n) return;
        r->itl = n;
        r->citl = nc;
    }
    r->itl[r->nitl++] = v;
}

static void ev_push(load_t *ld, double t, int n)
{
    if (ld->nev == ld->cev) {
        size_t nc = ld->cev ? 2 * ld->cev : 1024;
        double *a = realloc(ld->ev_t, nc * sizeof(double));
        if (a) ld->ev_t = a;
        int *b = realloc(ld->ev_n, nc * sizeof(int));
        if (b) ld->ev_n = b;
        if (!a || !b) return;
        ld->cev = nc;
    }
    ld->ev_t[ld->nev] = t;
    ld->ev_n[ld->nev++] = n;
}

static void on_event(void *ud, const char *data, size_t n)
{
    load_req_t *r = ud;
    if (n == 6 && !memcmp(data, "[DONE]", 6)) return;
    double t = now_s();
    cJSON *j = cJSON_ParseWithLength(data, n);
    if (!j) {
        if (!r->failed) snprintf(r->err, sizeof(r->err), "malformed event: %.60s", data);
        r->failed = 1;
        return;
    }
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    if (e) {
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(e, "message");
        snprintf(r->err, sizeof(r->err), "error event: %s",
                 cJSON_IsString(m) ? m->valuestring : "(no message)");
        r->failed = 1;
    }
    int ntok = 0;
    const cJSON *ch = cJSON_GetObjectItemCaseSensitive(j, "choices");
    const cJSON *c0 = cJSON_IsArray(ch) ? cJSON_GetArrayItem(ch, 0) : NULL;
    if (c0) {
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(c0, "token_ids");
        const cJSON *txt = cJSON_GetObjectItemCaseSensitive(c0, "text");
        if (cJSON_IsArray(ids))
            ntok = cJSON_GetArraySize(ids);
        else if (cJSON_IsString(txt) && txt->valuestring[0])
            ntok = 1; /* servers without token ids stream one token a chunk */
    }
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(j, "usage");
    const cJSON *ct = u ? cJSON_GetObjectItemCaseSensitive(u, "completion_tokens") : NULL;
    if (cJSON_IsNumber(ct) && ct->valuedouble >= 0 && ct->valuedouble <= MAX_LEN)
        r->usage_tok = (int)ct->valuedouble;
    cJSON_Delete(j);
    if (ntok <= 0) return;
    if (r->ntok == 0)
        r->t_first = t;
    else
        itl_push(r, t - r->t_last);
    r->t_last = t;
    r->ntok += ntok;
    ev_push(r->ld, t, ntok);
}

static void on_status(void *ud, int status)
{
    load_req_t *r = ud;
    r->status = status;
}

static void on_body(void *ud, const char *at, size_t n)
{
    load_req_t *r = ud;
    if (r->status != 200) { /* keep the start of an error body for the message */
        size_t have = strlen(r->err);
        if (have + 1 < sizeof(r->err)) {
            size_t k = n < sizeof(r->err) - have - 1 ? n : sizeof(r->err) - have - 1;
            memcpy(r->err + have, at, k);
            r->err[have + k] = 0;
        }
        return;
    }
    bn_sse_feed(&r->sse, at, n);
}

static void progress(load_t *ld, int final)
{
    if (!ld->progress) return;
    double t = now_s();
    if (!final && ld->tty && t - ld->last_progress < 0.1) return;
    if (!final && !ld->tty && (ld->done * 10 / ld->n) == ((ld->done - 1) * 10 / ld->n)) return;
    ld->last_progress = t;
    long toks = 0;
    for (size_t i = 0; i < ld->nev; i++)
        toks += ld->ev_n[i];
    fprintf(stderr, "%s[%*d/%d] %d running, %.1f s, %ld tokens%s", ld->tty ? "\r" : "",
            (int)snprintf(NULL, 0, "%d", ld->n), ld->done, ld->n, ld->running, t - ld->t0, toks,
            ld->tty ? "   " : "\n");
    if (final && ld->tty) fputc('\n', stderr);
}

static void on_done(void *ud, afd_status_t st, const char *why)
{
    load_req_t *r = ud;
    load_t *ld = r->ld;
    r->t_end = now_s();
    if (st && !r->failed) {
        snprintf(r->err, sizeof(r->err), "%s", why ? why : afd_status_str(st));
        r->failed = 1;
    }
    if (r->status != 200 && !r->failed) r->failed = 1;
    if (r->status != 200 && r->status) {
        char tmp[sizeof(r->err)];
        memcpy(tmp, r->err, sizeof(tmp));
        snprintf(r->err, sizeof(r->err), "HTTP %d: %.150s", r->status, tmp);
    }
    if (!r->failed && r->ntok == 0) {
        snprintf(r->err, sizeof(r->err), "no tokens in the answer");
        r->failed = 1;
    }
    r->ok = !r->failed;
    bn_sse_fini(&r->sse);
    ld->running--;
    ld->done++;
    ld->t_last_done = r->t_end;
    progress(ld, ld->done == ld->n);
    if (ld->done == ld->n) {
        uv_timer_stop(&ld->arrival);
        if (ld->on_poll) {
            uv_timer_stop(&ld->poll);
            ld->on_poll(ld->poll_ud); /* a last sample */
        }
        return;
    }
    load_start_one(ld);
}

static char *request_body(const load_t *ld, const load_req_t *r, size_t *len)
{
    cJSON *b = cJSON_CreateObject();
    if (ld->model) cJSON_AddStringToObject(b, "model", ld->model);
    cJSON_AddItemToObject(b, "prompt", cJSON_CreateIntArray(r->prompt, r->in_len));
    cJSON_AddNumberToObject(b, "max_tokens", r->max_tokens);
    cJSON_AddNumberToObject(b, "temperature", 0);
    if (ld->ignore_eos) cJSON_AddBoolToObject(b, "ignore_eos", 1);
    cJSON_AddBoolToObject(b, "stream", 1);
    cJSON_AddBoolToObject(cJSON_AddObjectToObject(b, "stream_options"), "include_usage", 1);
    char *txt = cJSON_PrintUnformatted(b);
    cJSON_Delete(b);
    *len = txt ? strlen(txt) : 0;
    return txt;
}

/* starts the next arrived request if the concurrency allows */
static void load_start_one(load_t *ld)
{
    double t = now_s() - ld->t0;
    while (ld->next < ld->n && ld->arrive[ld->next] <= t + 1e-6 &&
           (ld->max_conc <= 0 || ld->running < ld->max_conc)) {
        load_req_t *r = &ld->reqs[ld->next++];
        size_t len;
        char *body = request_body(ld, r, &len);
        bn_sse_init(&r->sse, 1 << 20, on_event, r);
        static const bn_http_cb_t cb = {on_status, on_body, on_done};
        r->t_start = now_s();
        ld->running++;
        if (ld->running > ld->peak) ld->peak = ld->running;
        afd_status_t st = body ? bn_http_request(ld->loop, &ld->url, "POST", ld->endpoint,
                                                 ld->api_key, body, len, ld->timeout_ms, &cb, r)
                               : AFD_ERR_NOMEM;
        free(body);
        if (st) {
            ld->running++; /* on_done takes it back */
            on_done(r, st, "could not send the request");
            ld->running--;
        }
    }
}

static void on_arrival(uv_timer_t *t)
{
    load_t *ld = t->data;
    load_start_one(ld);
    if (ld->next < ld->n && (ld->max_conc <= 0 || ld->running < ld->max_conc)) {
        double wait = ld->arrive[ld->next] - (now_s() - ld->t0);
        uv_timer_start(&ld->arrival, on_arrival, wait > 0 ? (uint64_t)(wait * 1000) : 0, 0);
    } else if (ld->next < ld->n) {
        uv_timer_start(&ld->arrival, on_arrival, 5, 0); /* waits for a free slot */
    }
}

static void on_poll_timer(uv_timer_t *t)
{
    load_t *ld = t->data;
    ld->on_poll(ld->poll_ud);
}

/* Runs the whole load on ld->loop; returns when every request has finished. */
static void load_run(load_t *ld, unsigned seed)
{
    ld->arrive = calloc((size_t)ld->n, sizeof(double));
    double t = 0;
    srand48(seed);
    for (int i = 0; i < ld->n && ld->arrive; i++) {
        ld->arrive[i] = t;
        if (isfinite(ld->rate) && ld->rate > 0) t += -log(1.0 - drand48()) / ld->rate;
    }
    ld->tty = isatty(2);
    ld->t0 = now_s();
    uv_timer_init(ld->loop, &ld->arrival);
    ld->arrival.data = ld;
    if (ld->on_poll) {
        uv_timer_init(ld->loop, &ld->poll);
        ld->poll.data = ld;
        uv_timer_start(&ld->poll, on_poll_timer, 0, ld->poll_ms);
    }
    uv_timer_start(&ld->arrival, on_arrival, 0, 0);
    uv_run(ld->loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&ld->arrival, NULL);
    if (ld->on_poll) uv_close((uv_handle_t *)&ld->poll, NULL);
    uv_run(ld->loop, UV_RUN_DEFAULT);
}

static void load_free(load_t *ld)
{
    for (int i = 0; ld->reqs && i < ld->n; i++) {
        free(ld->reqs[i].prompt);
        free(ld->reqs[i].itl);
    }
    free(ld->reqs);
    free(ld->arrive);
    free(ld->ev_t);
    free(ld->ev_n);
}

/* ---- the serve benchmark ---- */

typedef struct metrics {
    int completed, failed, peak;
    double duration;
    long in_tok, out_tok;
    double req_tput, out_tput, tot_tput, peak_out_tput, goodput;
    int good;
    double ttft[4], tpot[4], itl[4], e2el[4]; /* mean, median, p99, stdev unused */
} metrics_t;

static void summarize(double *x, size_t n, double out[4])
{
    out[0] = bn_mean(x, n);
    out[1] = bn_percentile(x, n, 50);
    out[2] = bn_percentile(x, n, 99);
}

typedef struct slo {
    double ttft_ms, tpot_ms, e2el_ms; /* 0: none */
} slo_t;

static void compute_metrics(load_t *ld, const slo_t *slo, metrics_t *m, cJSON *detail)
{
    memset(m, 0, sizeof(*m));
    size_t n = (size_t)ld->n, nitl = 0;
    for (size_t i = 0; i < n; i++)
        nitl += ld->reqs[i].nitl;
    double *ttft = calloc(n + 1, sizeof(double)), *tpot = calloc(n + 1, sizeof(double)),
           *e2el = calloc(n + 1, sizeof(double)), *itl = calloc(nitl + 1, sizeof(double));
    size_t nt = 0, np = 0, ni = 0;
    cJSON *ins = cJSON_CreateArray(), *outs = cJSON_CreateArray(), *tts = cJSON_CreateArray(),
          *its = cJSON_CreateArray(), *errs = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) {
        load_req_t *r = &ld->reqs[i];
        cJSON_AddItemToArray(ins, cJSON_CreateNumber(r->in_len));
        int out = r->usage_tok > 0 ? r->usage_tok : r->ntok;
        cJSON_AddItemToArray(outs, cJSON_CreateNumber(r->ok ? out : 0));
        cJSON_AddItemToArray(tts, cJSON_CreateNumber(r->ok ? r->t_first - r->t_start : 0));
        cJSON *il = cJSON_CreateArray();
        for (size_t k = 0; r->ok && k < r->nitl; k++)
            cJSON_AddItemToArray(il, cJSON_CreateNumber(r->itl[k]));
        cJSON_AddItemToArray(its, il);
        cJSON_AddItemToArray(errs, cJSON_CreateString(r->ok ? "" : r->err));
        if (!r->ok) {
            m->failed++;
            continue;
        }
        m->completed++;
        m->in_tok += r->in_len;
        m->out_tok += out;
        double ft = (r->t_first - r->t_start) * 1e3, lat = (r->t_end - r->t_start) * 1e3;
        double tp = out > 1 ? (lat - ft) / (out - 1) : 0;
        ttft[nt++] = ft;
        e2el[nt - 1] = lat;
        if (out > 1) tpot[np++] = tp;
        for (size_t k = 0; k < r->nitl; k++)
            itl[ni++] = r->itl[k] * 1e3;
        if ((!slo->ttft_ms || ft <= slo->ttft_ms) && (!slo->tpot_ms || tp <= slo->tpot_ms) &&
            (!slo->e2el_ms || lat <= slo->e2el_ms))
            m->good++;
    }
    m->duration = ld->t_last_done - ld->t0;
    if (m->duration <= 0) m->duration = 1e-9;
    m->peak = ld->peak;
    m->req_tput = m->completed / m->duration;
    m->out_tput = (double)m->out_tok / m->duration;
    m->tot_tput = (double)(m->in_tok + m->out_tok) / m->duration;
    m->goodput = m->good / m->duration;
    /* the most tokens in any one second of the run */
    int nb = (int)ceil(m->duration) + 1;
    long *bucket = calloc((size_t)nb, sizeof(long));
    for (size_t i = 0; bucket && i < ld->nev; i++) {
        int b = (int)floor(ld->ev_t[i] - ld->t0);
        if (b >= 0 && b < nb) bucket[b] += ld->ev_n[i];
    }
    for (int b = 0; bucket && b < nb; b++)
        if (bucket[b] > m->peak_out_tput) m->peak_out_tput = (double)bucket[b];
    free(bucket);
    summarize(ttft, nt, m->ttft);
    summarize(tpot, np, m->tpot);
    summarize(itl, ni, m->itl);
    summarize(e2el, nt, m->e2el);
    free(ttft);
    free(tpot);
    free(e2el);
    free(itl);
    if (detail) {
        cJSON_AddItemToObject(detail, "input_lens", ins);
        cJSON_AddItemToObject(detail, "output_lens", outs);
        cJSON_AddItemToObject(detail, "ttfts", tts);
        cJSON_AddItemToObject(detail, "itls", its);
        cJSON_AddItemToObject(detail, "errors", errs);
    } else {
        cJSON_Delete(ins);
        cJSON_Delete(outs);
        cJSON_Delete(tts);
        cJSON_Delete(its);
        cJSON_Delete(errs);
    }
}

static void line_i(const char *k, long v)
{
    printf("%-40s %-10ld\n", k, v);
}

static void line_f(const char *k, double v)
{
    printf("%-40s %-10.2f\n", k, v);
}

static void rule(const char *title, char c)
{
    int n = (int)strlen(title), l = (50 - n) / 2, r = 50 - n - l;
    for (int i = 0; i < l; i++)
        putchar(c);
    printf("%s", title);
    for (int i = 0; i < r; i++)
        putchar(c);
    putchar('\n');
}

static void print_block(const metrics_t *m, const slo_t *slo, int has_slo)
{
    rule(" Serving Benchmark Result ", '=');
    line_i("Successful requests:", m->completed);
    line_i("Failed requests:", m->failed);
    line_f("Benchmark duration (s):", m->duration);
    line_i("Total input tokens:", m->in_tok);
    line_i("Total generated tokens:", m->out_tok);
    line_f("Request throughput (req/s):", m->req_tput);
    if (has_slo) line_f("Request goodput (req/s):", m->goodput);
    line_f("Output token throughput (tok/s):", m->out_tput);
    line_f("Peak output token throughput (tok/s):", m->peak_out_tput);
    line_i("Peak concurrent requests:", m->peak);
    line_f("Total Token throughput (tok/s):", m->tot_tput);
    static const char *titles[] = {"Time to First Token", "Time per Output Token (excl. 1st token)",
                                   "Inter-token Latency", "End-to-end Latency"};
    static const char *names[] = {"TTFT", "TPOT", "ITL", "E2EL"};
    const double *v[] = {m->ttft, m->tpot, m->itl, m->e2el};
    for (int i = 0; i < 4; i++) {
        rule(titles[i], '-');
        char k[64];
        snprintf(k, sizeof(k), "Mean %s (ms):", names[i]);
        line_f(k, v[i][0]);
        snprintf(k, sizeof(k), "Median %s (ms):", names[i]);
        line_f(k, v[i][1]);
        snprintf(k, sizeof(k), "P99 %s (ms):", names[i]);
        line_f(k, v[i][2]);
    }
    if (has_slo)
        printf("goodput SLOs: ttft <= %g ms, tpot <= %g ms, e2el <= %g ms (0: none)\n",
               slo->ttft_ms, slo->tpot_ms, slo->e2el_ms);
    rule("", '=');
}

static cJSON *metrics_json(const metrics_t *m)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "duration", m->duration);
    cJSON_AddNumberToObject(o, "completed", m->completed);
    cJSON_AddNumberToObject(o, "failed", m->failed);
    cJSON_AddNumberToObject(o, "total_input_tokens", (double)m->in_tok);
    cJSON_AddNumberToObject(o, "total_output_tokens", (double)m->out_tok);
    cJSON_AddNumberToObject(o, "request_throughput", m->req_tput);
    cJSON_AddNumberToObject(o, "request_goodput", m->goodput);
    cJSON_AddNumberToObject(o, "output_throughput", m->out_tput);
    cJSON_AddNumberToObject(o, "total_token_throughput", m->tot_tput);
    cJSON_AddNumberToObject(o, "max_output_tokens_per_s", m->peak_out_tput);
    cJSON_AddNumberToObject(o, "max_concurrent_requests", m->peak);
    static const char *names[] = {"ttft", "tpot", "itl", "e2el"};
    const double *v[] = {m->ttft, m->tpot, m->itl, m->e2el};
    for (int i = 0; i < 4; i++) {
        char k[64];
        snprintf(k, sizeof(k), "mean_%s_ms", names[i]);
        cJSON_AddNumberToObject(o, k, v[i][0]);
        snprintf(k, sizeof(k), "median_%s_ms", names[i]);
        cJSON_AddNumberToObject(o, k, v[i][1]);
        snprintf(k, sizeof(k), "p99_%s_ms", names[i]);
        cJSON_AddNumberToObject(o, k, v[i][2]);
    }
    return o;
}

static afd_status_t write_json(const char *path, cJSON *root)
{
    char *txt = cJSON_Print(root);
    FILE *f = txt ? fopen(path, "w") : NULL;
    int ok = f && fputs(txt, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f)) ok = 0;
    free(txt);
    if (!ok) {
        afd_error("cannot write %s: %m", path);
        return AFD_ERR_IO;
    }
    return AFD_OK;
}

/* "ttft:500 tpot:50" (spaces or commas) into SLOs */
static afd_status_t parse_slo(const char *s, slo_t *out)
{
    char *dup = strdup(s), *save = NULL;
    if (!dup) return AFD_ERR_NOMEM;
    afd_status_t st = AFD_OK;
    for (char *t = strtok_r(dup, " ,", &save); t; t = strtok_r(NULL, " ,", &save)) {
        char *colon = strchr(t, ':'), *end;
        double v = colon ? strtod(colon + 1, &end) : 0;
        if (!colon || *end || !(v > 0) || !isfinite(v)) {
            afd_error("--goodput: '%s' is not NAME:MS with MS > 0", t);
            st = AFD_ERR_INVALID;
            break;
        }
        *colon = 0;
        if (!strcmp(t, "ttft"))
            out->ttft_ms = v;
        else if (!strcmp(t, "tpot"))
            out->tpot_ms = v;
        else if (!strcmp(t, "e2el"))
            out->e2el_ms = v;
        else {
            afd_error("--goodput: unknown metric '%s' (ttft, tpot or e2el)", t);
            st = AFD_ERR_INVALID;
            break;
        }
    }
    free(dup);
    return st;
}

typedef struct serve_opts {
    char *base_url, *endpoint, *model, *api_key, *result_file, *goodput, *request_rate;
    long num_prompts, input_len, output_len, max_concurrency, seed, vocab, timeout_s;
    double range_ratio;
    int ignore_eos, progress;
} serve_opts_t;

#define O(f) offsetof(serve_opts_t, f)
static const afd_opt_t serve_table[] = {
    {"base-url", AFD_OPT_STRING, "http://127.0.0.1:8000", O(base_url), 0, 0, AFD_OPT_NOENV,
     "server URL"},
    {"endpoint", AFD_OPT_STRING, "/v1/completions", O(endpoint), 0, 0, AFD_OPT_NOENV,
     "completions path"},
    {"model", AFD_OPT_STRING, NULL, O(model), 0, 0, AFD_OPT_NOENV, "model name sent (if any)"},
    {"api-key", AFD_OPT_STRING, NULL, O(api_key), 0, 0, AFD_OPT_SECRET,
     "Authorization: Bearer KEY (or env AFD_API_KEY)"},
    {"num-prompts", AFD_OPT_INT, "100", O(num_prompts), 1, MAX_PROMPTS, AFD_OPT_NOENV,
     "requests to send"},
    {"input-len", AFD_OPT_INT, "128", O(input_len), 1, MAX_LEN, AFD_OPT_NOENV,
     "prompt tokens (mean with --range-ratio)"},
    {"output-len", AFD_OPT_INT, "64", O(output_len), 1, MAX_LEN, AFD_OPT_NOENV,
     "max_tokens (mean with --range-ratio)"},
    {"range-ratio", AFD_OPT_DOUBLE, "0", O(range_ratio), 0, 1, AFD_OPT_NOENV,
     "lengths uniform in [len (1 - r), len (1 + r)]"},
    {"vocab", AFD_OPT_INT, "1000", O(vocab), 2, 1 << 24, AFD_OPT_NOENV,
     "prompt token ids are drawn from [1, vocab)"},
    {"request-rate", AFD_OPT_STRING, "inf", O(request_rate), 0, 0, AFD_OPT_NOENV,
     "requests/s, Poisson arrivals (inf: all at once)"},
    {"max-concurrency", AFD_OPT_INT, "0", O(max_concurrency), 0, MAX_PROMPTS, AFD_OPT_NOENV,
     "requests in flight at most (0: no bound)"},
    {"goodput", AFD_OPT_STRING, NULL, O(goodput), 0, 0, AFD_OPT_NOENV,
     "SLOs for goodput: 'ttft:MS tpot:MS e2el:MS'"},
    {"seed", AFD_OPT_INT, "0", O(seed), 0, 1L << 31, AFD_OPT_NOENV, "prompts and arrivals"},
    {"ignore-eos", AFD_OPT_BOOL, "true", O(ignore_eos), 0, 0, AFD_OPT_NOENV,
     "generate exactly the output length"},
    {"timeout-s", AFD_OPT_INT, "600", O(timeout_s), 1, 86400, AFD_OPT_NOENV, "per request"},
    {"result-file", AFD_OPT_STRING, NULL, O(result_file), 0, 0, AFD_OPT_NOENV,
     "write the results as JSON"},
    {"progress", AFD_OPT_BOOL, "true", O(progress), 0, 0, AFD_OPT_NOENV, "show progress on stderr"},
    AFD_OPTS_END};
#undef O

/* vllm spells --goodput ttft:500 tpot:50 as separate words: join them into one */
static int join_goodput(int argc, char **argv, char **joined)
{
    int out = 1;
    *joined = NULL;
    for (int i = 1; i < argc; i++) {
        argv[out++] = argv[i];
        if (strcmp(argv[i], "--goodput") || i + 1 >= argc) continue;
        size_t len = 0;
        int j = i + 1;
        for (; j < argc && argv[j][0] != '-'; j++)
            len += strlen(argv[j]) + 1;
        free(*joined);
        *joined = calloc(1, len + 1);
        if (!*joined) return argc;
        for (int k = i + 1; k < j; k++) {
            strcat(*joined, argv[k]);
            strcat(*joined, " ");
        }
        argv[out++] = *joined;
        i = j - 1;
    }
    return out;
}

static int cmd_serve(int argc, char **argv)
{
    char *joined;
    argc = join_goodput(argc, argv, &joined);
    serve_opts_t o;
    memset(&o, 0, sizeof(o));
    int first, rc = 2;
    afd_status_t st = afd_opts_parse(serve_table, &o, argc, argv,
                                     "usage: afd_bench serve --base-url URL [--num-prompts N] "
                                     "[--input-len I --output-len O] [--request-rate R | "
                                     "--max-concurrency C] [--goodput 'ttft:MS tpot:MS'] "
                                     "[--result-file F]",
                                     &first);
    if (st == AFD_ERR_CANCELED) {
        free(joined);
        return 0;
    }
    if (st) {
        free(joined);
        return 2;
    }
    load_t ld;
    memset(&ld, 0, sizeof(ld));
    slo_t slo = {0};
    int has_slo = o.goodput != NULL;
    char *end;
    ld.rate = strcmp(o.request_rate, "inf") ? strtod(o.request_rate, &end) : INFINITY;
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        goto out;
    }
    if (isfinite(ld.rate) && (*end || !(ld.rate > 0))) {
        afd_error("--request-rate must be a positive number or inf");
        goto out;
    }
    if (has_slo && parse_slo(o.goodput, &slo)) goto out;
    if (!o.api_key && getenv("AFD_API_KEY")) o.api_key = strdup(getenv("AFD_API_KEY"));
    if (bn_url_parse(o.base_url, &ld.url)) goto out;
    uv_loop_t loop;
    uv_loop_init(&loop);
    ld.loop = &loop;
    ld.endpoint = o.endpoint;
    ld.model = o.model;
    ld.api_key = o.api_key;
    ld.max_conc = (int)o.max_concurrency;
    ld.ignore_eos = o.ignore_eos;
    ld.progress = o.progress;
    ld.timeout_ms = (unsigned)(o.timeout_s * 1000);
    ld.n = (int)o.num_prompts;
    ld.reqs = calloc((size_t)ld.n, sizeof(load_req_t));
    if (!ld.reqs) goto out_loop;
    srand48(o.seed + 1);
    for (int i = 0; i < ld.n; i++) {
        load_req_t *r = &ld.reqs[i];
        double lo = 1 - o.range_ratio, hi = 1 + o.range_ratio;
        r->ld = &ld;
        r->idx = i;
        r->in_len = (int)fmax(1, floor(o.input_len * (lo + (hi - lo) * drand48()) + 0.5));
        r->max_tokens = (int)fmax(1, floor(o.output_len * (lo + (hi - lo) * drand48()) + 0.5));
        if (r->in_len > MAX_LEN) r->in_len = MAX_LEN;
        if (!(r->prompt = malloc((size_t)r->in_len * sizeof(int32_t)))) goto out_loop;
        for (int k = 0; k < r->in_len; k++)
            r->prompt[k] = 1 + (int32_t)(drand48() * (double)(o.vocab - 1));
    }
    fprintf(stderr,
            "serve: %d requests to %s%s, input %ld, output %ld tokens, rate %s, "
            "concurrency %s\n",
            ld.n, o.base_url, o.endpoint, o.input_len, o.output_len, o.request_rate,
            o.max_concurrency ? "bounded" : "unbounded");
    load_run(&ld, (unsigned)o.seed);
    metrics_t m;
    cJSON *root = cJSON_CreateObject();
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof(date), "%Y%m%d-%H%M%S", gmtime(&now));
    cJSON_AddStringToObject(root, "date", date);
    cJSON_AddStringToObject(root, "backend", "openai");
    cJSON_AddStringToObject(root, "base_url", o.base_url);
    if (o.model) cJSON_AddStringToObject(root, "model_id", o.model);
    cJSON_AddNumberToObject(root, "num_prompts", ld.n);
    cJSON_AddNumberToObject(root, "input_len", o.input_len);
    cJSON_AddNumberToObject(root, "output_len", o.output_len);
    cJSON_AddNumberToObject(root, "range_ratio", o.range_ratio);
    if (isfinite(ld.rate))
        cJSON_AddNumberToObject(root, "request_rate", ld.rate);
    else
        cJSON_AddStringToObject(root, "request_rate", "inf");
    cJSON_AddNumberToObject(root, "max_concurrency", (double)o.max_concurrency);
    cJSON *detail = cJSON_CreateObject();
    compute_metrics(&ld, &slo, &m, detail);
    cJSON *mj = metrics_json(&m);
    for (cJSON *e = mj->child; e; e = e->next)
        cJSON_AddItemToObject(root, e->string, cJSON_Duplicate(e, 1));
    cJSON_Delete(mj);
    if (has_slo) {
        cJSON *s = cJSON_AddObjectToObject(root, "goodput_slo_ms");
        if (slo.ttft_ms) cJSON_AddNumberToObject(s, "ttft", slo.ttft_ms);
        if (slo.tpot_ms) cJSON_AddNumberToObject(s, "tpot", slo.tpot_ms);
        if (slo.e2el_ms) cJSON_AddNumberToObject(s, "e2el", slo.e2el_ms);
    }
    for (cJSON *e = detail->child; e; e = e->next)
        cJSON_AddItemToObject(root, e->string, cJSON_Duplicate(e, 1));
    cJSON_Delete(detail);
    print_block(&m, &slo, has_slo);
    for (int i = 0, shown = 0; i < ld.n && shown < 3; i++)
        if (!ld.reqs[i].ok) {
            fprintf(stderr, "request %d failed: %s\n", i, ld.reqs[i].err);
            shown++;
        }
    rc = m.failed ? 1 : 0;
    if (o.result_file && write_json(o.result_file, root)) rc = 1;
    cJSON_Delete(root);
out_loop:
    uv_loop_close(&loop);
    load_free(&ld);
out:
    afd_opts_free(serve_table, &o);
    free(joined);
    return rc;
}

/* ---- child processes: afdctl local-up and afd_run ---- */

static char g_bindir[PATH_MAX];

static void find_bindir(const char *opt)
{
    if (opt) {
        snprintf(g_bindir, sizeof(g_bindir), "%s", opt);
        return;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0) {
        snprintf(g_bindir, sizeof(g_bindir), ".");
        return;
    }
    self[n] = 0;
    snprintf(g_bindir, sizeof(g_bindir), "%s", dirname(self));
}

/* forks argv with stdout to a pipe (*out_fd) and stderr to errpath (NULL: inherited) */
static pid_t spawn(char *const *argv, int *out_fd, const char *errpath)
{
    int p[2];
    if (pipe(p)) {
        afd_error("pipe: %m");
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        afd_error("fork: %m");
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        if (errpath) {
            int fd = open(errpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 2);
                close(fd);
            }
        }
        execv(argv[0], argv);
        fprintf(stderr, "afd_bench: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(p[1]);
    *out_fd = p[0];
    return pid;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    int port = 0;
    if (fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof(a)) &&
        !getsockname(fd, (struct sockaddr *)&a, &l))
        port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

typedef struct cluster {
    pid_t pid;
    FILE *out;
    char url[512], admin[512], logdir[PATH_MAX];
} cluster_t;

typedef struct decode_opts {
    char *url, *admin, *admin_token, *api_key, *model, *bin_dir, *result_file, *out_dir;
    char *micro_batches, *af, *batches, *contexts;
    afd_strlist_t local_up_args;
    long attn, ffn, batch, context, tokens, threads, heartbeat_ms, poll_ms, vocab, timeout_s;
    int baseline, pin, progress;
} decode_opts_t;

static afd_status_t cluster_start(const decode_opts_t *o, int attn, int ffn, const char *mb,
                                  long max_batch_tokens, cluster_t *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->logdir, sizeof(c->logdir), "%s/afd_bench-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(c->logdir)) {
        afd_error("mkdtemp %s: %m", c->logdir);
        return AFD_ERR_IO;
    }
    char exe[PATH_MAX + 16], sa[16], sf[16], sp[16], sap[16], mbt[24], errp[PATH_MAX + 16];
    snprintf(exe, sizeof(exe), "%s/afdctl", g_bindir);
    snprintf(sa, sizeof(sa), "%d", attn);
    snprintf(sf, sizeof(sf), "%d", ffn);
    snprintf(sp, sizeof(sp), "%d", free_port());
    snprintf(sap, sizeof(sap), "%d", free_port());
    snprintf(mbt, sizeof(mbt), "%ld", max_batch_tokens);
    snprintf(errp, sizeof(errp), "%s/local-up.log", c->logdir);
    char *argv[64 + 32];
    int n = 0;
    char *fixed[] = {exe,
                     "local-up",
                     "--model",
                     o->model,
                     "--attn",
                     sa,
                     "--ffn",
                     sf,
                     "--port",
                     sp,
                     "--admin-port",
                     sap,
                     "--micro-batches",
                     (char *)mb,
                     "--max-batch-tokens",
                     mbt,
                     "--log-dir",
                     c->logdir};
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
        argv[n++] = fixed[i];
    if (o->pin) argv[n++] = "--pin";
    for (int i = 0; i < o->local_up_args.n && n < 64 + 30; i++)
        argv[n++] = o->local_up_args.v[i];
    argv[n] = NULL;
    char hb[24];
    snprintf(hb, sizeof(hb), "%ld", o->heartbeat_ms);
    setenv("AFD_HEARTBEAT_MS", hb, 1); /* the nodes report their stage times this often */
    int fd;
    c->pid = spawn(argv, &fd, errp);
    if (c->pid < 0) return AFD_ERR_IO;
    c->out = fdopen(fd, "r");
    char line[480];
    int got = 0;
    while (c->out && got < 2 && fgets(line, sizeof(line), c->out)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!strncmp(line, "ready: ", 7)) snprintf(c->url, sizeof(c->url), "%s", line + 7), got++;
        if (!strncmp(line, "admin: ", 7))
            snprintf(c->admin, sizeof(c->admin), "%s", line + 7), got++;
    }
    if (got < 2) {
        afd_error("afdctl local-up did not start (%dA%dF); its log: %s", attn, ffn, errp);
        return AFD_ERR_PEER;
    }
    return AFD_OK;
}

static void cluster_stop(cluster_t *c, int keep_logs);

/* a start that failed is tried once more (on a loaded machine a node may give up on a
 * coordinator that is not listening yet); the first attempt's logs are kept */
static afd_status_t cluster_start_retry(const decode_opts_t *o, int attn, int ffn, const char *mb,
                                        long max_batch_tokens, cluster_t *c)
{
    if (cluster_start(o, attn, ffn, mb, max_batch_tokens, c) == AFD_OK) return AFD_OK;
    cluster_stop(c, 1);
    afd_warn("starting the cluster again");
    return cluster_start(o, attn, ffn, mb, max_batch_tokens, c);
}

/* removes a log directory of plain files */
static void remove_logdir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[PATH_MAX + 256];
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

/* stops the cluster; its logs are kept only when keep_logs (a failed run) */
static void cluster_stop(cluster_t *c, int keep_logs)
{
    if (c->pid > 0) {
        kill(c->pid, SIGINT);
        int status;
        for (int i = 0; i < 200; i++) {
            if (waitpid(c->pid, &status, WNOHANG) == c->pid) goto reaped;
            usleep(100000);
        }
        kill(c->pid, SIGKILL);
        waitpid(c->pid, &status, 0);
    reaped:
        c->pid = 0;
    }
    if (c->out) fclose(c->out);
    c->out = NULL;
    if (c->logdir[0]) {
        if (keep_logs)
            afd_info("cluster logs kept in %s", c->logdir);
        else
            remove_logdir(c->logdir);
        c->logdir[0] = 0;
    }
}

/* reads a child's whole stdout */
static char *slurp_fd(int fd, size_t max)
{
    size_t len = 0, cap = 1 << 16;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) break;
        if (len + 1 >= cap) {
            if (cap >= max) break;
            char *nb = realloc(buf, cap * 2);
            if (!nb) break;
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        len += (size_t)n;
    }
    close(fd);
    if (buf) buf[len] = 0;
    return buf;
}

/* deterministic distinct prompts: B of C tokens in [10, vocab) */
static int32_t *make_prompt(int i, int len, int vocab)
{
    int32_t *p = malloc((size_t)len * sizeof(int32_t));
    for (int j = 0; p && j < len; j++)
        p[j] = 10 + (int32_t)(((long)7 * i + 13L * j + (long)i * j) % (vocab - 10));
    return p;
}

typedef struct baseline {
    int ok;
    double tokens_s, tpot_ms;
    long decode_tokens, decode_steps;
} baseline_t;

static afd_status_t run_baseline(const decode_opts_t *o, int B, int C, baseline_t *out)
{
    memset(out, 0, sizeof(*out));
    char exe[PATH_MAX + 16], mt[24], th[24], chunk[24];
    snprintf(exe, sizeof(exe), "%s/afd_run", g_bindir);
    snprintf(mt, sizeof(mt), "%ld", o->tokens);
    snprintf(th, sizeof(th), "%ld", o->threads);
    snprintf(chunk, sizeof(chunk), "%ld", (long)B * C);
    char **argv = calloc((size_t)(2 * B + 24), sizeof(char *));
    char **texts = calloc((size_t)B, sizeof(char *));
    afd_status_t st = AFD_ERR_NOMEM;
    if (!argv || !texts) goto out;
    int n = 0;
    char *fixed[] = {
        exe,         "--model", o->model,          "--max-tokens", mt,       "--ignore-eos",
        "--threads", th,        "--prefill-chunk", chunk,          "--json", "--progress=false"};
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
        argv[n++] = fixed[i];
    for (int i = 0; i < B; i++) {
        int32_t *p = make_prompt(i, C, (int)o->vocab);
        if (!p || !(texts[i] = malloc((size_t)C * 12 + 1))) {
            free(p);
            goto out;
        }
        size_t k = 0;
        for (int j = 0; j < C; j++)
            k += (size_t)sprintf(texts[i] + k, "%s%d", j ? "," : "", p[j]);
        free(p);
        argv[n++] = "--prompt";
        argv[n++] = texts[i];
    }
    argv[n] = NULL;
    int fd;
    pid_t pid = spawn(argv, &fd, NULL);
    st = AFD_ERR_IO;
    if (pid < 0) goto out;
    char *txt = slurp_fd(fd, 1 << 30);
    int status;
    waitpid(pid, &status, 0);
    cJSON *j = txt ? cJSON_Parse(txt) : NULL;
    free(txt);
    const cJSON *t = j ? cJSON_GetObjectItemCaseSensitive(j, "timing") : NULL;
    const cJSON *dt = t ? cJSON_GetObjectItemCaseSensitive(t, "decode_tokens") : NULL;
    const cJSON *ds = t ? cJSON_GetObjectItemCaseSensitive(t, "decode_s") : NULL;
    const cJSON *dn = t ? cJSON_GetObjectItemCaseSensitive(t, "decode_steps") : NULL;
    if (!WIFEXITED(status) || WEXITSTATUS(status) || !cJSON_IsNumber(dt) || !cJSON_IsNumber(ds) ||
        !cJSON_IsNumber(dn) || ds->valuedouble <= 0 || dn->valuedouble <= 0) {
        afd_error("afd_run (the monolithic baseline) failed or printed no timing");
        cJSON_Delete(j);
        goto out;
    }
    out->ok = 1;
    out->decode_tokens = (long)dt->valuedouble;
    out->decode_steps = (long)dn->valuedouble;
    out->tokens_s = dt->valuedouble / ds->valuedouble;
    out->tpot_ms = 1e3 * ds->valuedouble / dn->valuedouble;
    cJSON_Delete(j);
    st = AFD_OK;
out:
    for (int i = 0; texts && i < B; i++)
        free(texts[i]);
    free(texts);
    free(argv);
    return st;
}

/* ---- the decode benchmark ---- */

#define MAX_NODES 128

typedef struct node_sample {
    int id, attn;
    double steps, busy; /* the node's own stage: attn_us or ffn_us */
    double xfer, wait, idle;
} node_sample_t;

typedef struct sample {
    double t, tokens;
    int nn;
    node_sample_t n[MAX_NODES];
} sample_t;

typedef struct poller {
    uv_loop_t *loop;
    bn_url_t admin;
    const char *token;
    int inflight;
    char *buf;
    size_t len, cap;
    sample_t *s;
    int ns, cs;
    int micro_batches; /* the cluster's, from the status */
} poller_t;

static void poll_status(void *ud, int status)
{
    (void)ud;
    (void)status;
}

static void poll_body(void *ud, const char *at, size_t n)
{
    poller_t *p = ud;
    if (p->len + n + 1 > p->cap) {
        size_t nc = (p->len + n + 1) * 2;
        if (nc > (64u << 20)) return;
        char *b = realloc(p->buf, nc);
        if (!b) return;
        p->buf = b;
        p->cap = nc;
    }
    memcpy(p->buf + p->len, at, n);
    p->len += n;
}

static void poll_done(void *ud, afd_status_t st, const char *why)
{
    (void)why;
    poller_t *p = ud;
    p->inflight = 0;
    cJSON *j = (!st && p->buf) ? cJSON_ParseWithLength(p->buf, p->len) : NULL;
    p->len = 0;
    const cJSON *cl = j ? cJSON_GetObjectItemCaseSensitive(j, "cluster") : NULL;
    const cJSON *tg = cl ? cJSON_GetObjectItemCaseSensitive(cl, "tokens_generated") : NULL;
    const cJSON *mb = cl ? cJSON_GetObjectItemCaseSensitive(cl, "micro_batches") : NULL;
    if (cJSON_IsNumber(mb) && mb->valuedouble >= 1 && mb->valuedouble <= 64)
        p->micro_batches = (int)mb->valuedouble;
    const cJSON *nodes = j ? cJSON_GetObjectItemCaseSensitive(j, "nodes") : NULL;
    if (!cJSON_IsNumber(tg) || !cJSON_IsArray(nodes)) {
        cJSON_Delete(j);
        return;
    }
    if (p->ns == p->cs) {
        int nc = p->cs ? 2 * p->cs : 256;
        sample_t *s = realloc(p->s, (size_t)nc * sizeof(sample_t));
        if (!s) {
            cJSON_Delete(j);
            return;
        }
        p->s = s;
        p->cs = nc;
    }
    sample_t *s = &p->s[p->ns++];
    memset(s, 0, sizeof(*s));
    s->t = now_s();
    s->tokens = tg->valuedouble;
    const cJSON *n;
    cJSON_ArrayForEach(n, nodes)
    {
        if (s->nn >= MAX_NODES) break;
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(n, "id");
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(n, "role");
        const cJSON *steps = cJSON_GetObjectItemCaseSensitive(n, "steps");
        const cJSON *busy = cJSON_GetObjectItemCaseSensitive(n, "busy");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(role) || !cJSON_IsNumber(steps) || !busy)
            continue;
        node_sample_t *ns = &s->n[s->nn++];
        ns->id = (int)id->valuedouble;
        ns->attn = !strcmp(role->valuestring, "attention");
        ns->steps = steps->valuedouble;
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(busy, ns->attn ? "attn_us" : "ffn_us");
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(busy, "xfer_us");
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(busy, "wait_us");
        const cJSON *id_ = cJSON_GetObjectItemCaseSensitive(busy, "idle_us");
        ns->busy = cJSON_IsNumber(b) ? b->valuedouble : 0;
        ns->xfer = cJSON_IsNumber(x) ? x->valuedouble : 0;
        ns->wait = cJSON_IsNumber(w) ? w->valuedouble : 0;
        ns->idle = cJSON_IsNumber(id_) ? id_->valuedouble : 0;
    }
    cJSON_Delete(j);
}

static void poll_tick(void *ud)
{
    poller_t *p = ud;
    if (p->inflight) return;
    static const bn_http_cb_t cb = {poll_status, poll_body, poll_done};
    if (!bn_http_request(p->loop, &p->admin, "GET", "/admin/status", p->token, NULL, 0, 5000, &cb,
                         p))
        p->inflight = 1;
}

typedef struct node_fig {
    int id, attn;
    double busy_frac, xfer_frac; /* of the node's own time over the window */
    double busy_ms_step;
} node_fig_t;

typedef struct decode_res {
    int attn, ffn, B, C, N;
    int layers, hidden; /* the model's, when known (--model) */
    char mb[16];
    int ok, failed;
    double tokens_s, per_attn, per_ffn, tpot_p50, tpot_p99, step_ms, efficiency;
    double steps;
    int nnodes;
    node_fig_t nodes[MAX_NODES];
    baseline_t base;
} decode_res_t;

/* attention nodes first, then by id */
static int by_role(const void *a, const void *b)
{
    const node_fig_t *x = a, *y = b;
    if (x->attn != y->attn) return y->attn - x->attn;
    return x->id - y->id;
}

/* One steady-decode measurement on a running cluster. */
static afd_status_t decode_measure(const decode_opts_t *o, const char *url, const char *admin,
                                   int B, int C, decode_res_t *r)
{
    load_t ld;
    memset(&ld, 0, sizeof(ld));
    poller_t pl;
    memset(&pl, 0, sizeof(pl));
    afd_status_t st = AFD_ERR_INVALID;
    if (bn_url_parse(url, &ld.url) || bn_url_parse(admin, &pl.admin)) return st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    ld.loop = pl.loop = &loop;
    pl.token = o->admin_token;
    ld.endpoint = "/v1/completions";
    ld.api_key = o->api_key;
    ld.ignore_eos = 1;
    ld.progress = o->progress;
    ld.rate = INFINITY;
    ld.timeout_ms = (unsigned)(o->timeout_s * 1000);
    ld.n = B;
    ld.on_poll = poll_tick;
    ld.poll_ud = &pl;
    ld.poll_ms = (unsigned)o->poll_ms;
    st = AFD_ERR_NOMEM;
    if (!(ld.reqs = calloc((size_t)B, sizeof(load_req_t)))) goto out;
    for (int i = 0; i < B; i++) {
        ld.reqs[i].ld = &ld;
        ld.reqs[i].idx = i;
        ld.reqs[i].in_len = C;
        ld.reqs[i].max_tokens = (int)o->tokens;
        if (!(ld.reqs[i].prompt = make_prompt(i, C, (int)o->vocab))) goto out;
    }
    load_run(&ld, 1);
    r->B = B;
    r->C = C;
    r->N = (int)o->tokens;
    if (pl.micro_batches) snprintf(r->mb, sizeof(r->mb), "%d", pl.micro_batches);
    /* the steady window, by the clients' clocks: from the moment every sequence has its
     * first token (all prefills done) to the moment the first one ends */
    double ta = 0, tb = INFINITY;
    size_t nitl = 0;
    for (int i = 0; i < B; i++) {
        load_req_t *q = &ld.reqs[i];
        if (!q->ok) {
            if (!r->failed) afd_error("decode: request %d failed: %s", i, q->err);
            r->failed++;
            continue;
        }
        if (q->t_first > ta) ta = q->t_first;
        if (q->t_last < tb) tb = q->t_last;
        nitl += q->nitl;
    }
    /* TPOT: the gaps between a sequence's tokens that end inside the window */
    double *gaps = calloc(nitl + 1, sizeof(double));
    size_t ng = 0;
    for (int i = 0; gaps && i < B; i++) {
        load_req_t *q = &ld.reqs[i];
        double t = q->t_first;
        for (size_t k = 0; q->ok && k < q->nitl; k++) {
            t += q->itl[k];
            if (t > ta && t <= tb + 1e-9) gaps[ng++] = 1e3 * q->itl[k];
        }
    }
    r->tpot_p50 = bn_percentile(gaps, ng, 50);
    r->tpot_p99 = bn_percentile(gaps, ng, 99);
    free(gaps);
    int a = -1, z = -1;
    for (int i = 0; i < pl.ns; i++)
        if (pl.s[i].t >= ta && pl.s[i].t <= tb) {
            if (a < 0) a = i;
            z = i;
        }
    st = AFD_OK;
    if (r->failed) {
        st = AFD_ERR_PEER;
        goto out;
    }
    if (a < 0 || z <= a || pl.s[z].tokens <= pl.s[a].tokens) {
        /* too short for the status samples: the tokens the clients saw in the window */
        double toks = 0;
        for (size_t i = 0; i < ld.nev; i++)
            if (ld.ev_t[i] > ta && ld.ev_t[i] <= tb) toks += ld.ev_n[i];
        if (!(tb > ta) || toks <= 0) {
            afd_error("decode: the steady window is too short to measure; raise --tokens");
            st = AFD_ERR_RANGE;
            goto out;
        }
        r->tokens_s = toks / (tb - ta);
        r->step_ms = 1e3 * B / r->tokens_s;
        r->efficiency = NAN;
        for (int i = 0; pl.ns > 0 && i < pl.s[pl.ns - 1].nn; i++) {
            node_fig_t *f = &r->nodes[r->nnodes++];
            f->id = pl.s[pl.ns - 1].n[i].id;
            f->attn = pl.s[pl.ns - 1].n[i].attn;
            f->attn ? r->attn++ : r->ffn++;
            f->busy_frac = f->xfer_frac = f->busy_ms_step = NAN;
        }
        r->per_attn = r->attn ? r->tokens_s / r->attn : NAN;
        r->per_ffn = r->ffn ? r->tokens_s / r->ffn : NAN;
        r->ok = 1;
        goto out;
    }
    const sample_t *s0 = &pl.s[a], *s1 = &pl.s[z];
    r->tokens_s = (s1->tokens - s0->tokens) / (s1->t - s0->t);
    r->step_ms = 1e3 * B / r->tokens_s;
    int na = 0, nf = 0;
    r->efficiency = 0;
    for (int i = 0; i < s1->nn; i++) {
        const node_sample_t *n1 = &s1->n[i], *n0 = NULL;
        for (int k = 0; k < s0->nn; k++)
            if (s0->n[k].id == n1->id) n0 = &s0->n[k];
        n1->attn ? na++ : nf++;
        node_fig_t *f = &r->nodes[r->nnodes++];
        f->id = n1->id;
        f->attn = n1->attn;
        double dsteps = n0 ? n1->steps - n0->steps : 0;
        if (dsteps <= 0) {
            f->busy_frac = f->xfer_frac = NAN;
            f->busy_ms_step = NAN;
            continue;
        }
        /* busy time per step; the busy fraction is of the node's own clock over the same
         * heartbeats (busy + waiting + idle), so steps that straddle the window's ends do
         * not bend it */
        double db = n1->busy - n0->busy, dt = db + (n1->wait - n0->wait) + (n1->idle - n0->idle);
        f->busy_ms_step = db / dsteps / 1e3;
        f->busy_frac = dt > 0 ? db / dt : NAN;
        f->xfer_frac = dt > 0 ? (n1->xfer - n0->xfer) / dt : NAN;
        if (isnan(f->busy_frac)) continue;
        if (f->busy_frac > r->efficiency) r->efficiency = f->busy_frac;
        if (n1->attn && dsteps > r->steps) r->steps = dsteps;
    }
    if (r->efficiency == 0) r->efficiency = NAN;
    qsort(r->nodes, (size_t)r->nnodes, sizeof(r->nodes[0]), by_role);
    r->attn = na;
    r->ffn = nf;
    r->per_attn = na ? r->tokens_s / na : NAN;
    r->per_ffn = nf ? r->tokens_s / nf : NAN;
    r->ok = 1;
out:
    uv_loop_close(&loop);
    free(pl.buf);
    free(pl.s);
    load_free(&ld);
    return st;
}

static void print_decode(const decode_res_t *r)
{
    printf("AFD %dA%dF m=%s, batch %d, context %d, %d tokens each:\n", r->attn, r->ffn, r->mb, r->B,
           r->C, r->N);
    printf("  %.1f decode tokens/s (%.1f per attention node, %.1f per FFN node); "
           "TPOT p50 %.1f ms, p99 %.1f ms; %.1f ms per step achieved\n",
           r->tokens_s, r->per_attn, r->per_ffn, r->tpot_p50, r->tpot_p99, r->step_ms);
    printf("  busy per step:");
    for (int i = 0; i < r->nnodes; i++) {
        const node_fig_t *f = &r->nodes[i];
        if (isnan(f->busy_frac))
            printf(" %s node %d n/a;", f->attn ? "attention" : "FFN", f->id);
        else
            printf(" %s node %d %.0f%% (%.1f ms, transfer %.0f%%);", f->attn ? "attention" : "FFN",
                   f->id, 100 * f->busy_frac, f->busy_ms_step, 100 * f->xfer_frac);
    }
    if (isnan(r->efficiency))
        printf(" pipeline efficiency n/a (no heartbeat in the window; raise --tokens)\n");
    else
        printf(" pipeline efficiency %.0f%% (%.0f steps)\n", 100 * r->efficiency, r->steps);
    if (r->base.ok)
        printf("  monolithic afd_run: %.1f decode tokens/s, TPOT %.1f ms; AFD / monolithic "
               "%.2fx\n",
               r->base.tokens_s, r->base.tpot_ms, r->tokens_s / r->base.tokens_s);
}

static cJSON *num_or_null(double v)
{
    return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull();
}

static cJSON *decode_json(const decode_res_t *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "attn_nodes", r->attn);
    cJSON_AddNumberToObject(o, "ffn_nodes", r->ffn);
    char *end;
    long m = strtol(r->mb, &end, 10);
    if (!*end && m > 0)
        cJSON_AddNumberToObject(o, "micro_batches", (double)m);
    else
        cJSON_AddStringToObject(o, "micro_batches", r->mb);
    if (r->layers > 0) cJSON_AddNumberToObject(o, "layers", r->layers);
    if (r->hidden > 0) cJSON_AddNumberToObject(o, "hidden", r->hidden);
    cJSON_AddNumberToObject(o, "batch", r->B);
    cJSON_AddNumberToObject(o, "context", r->C);
    cJSON_AddNumberToObject(o, "tokens", r->N);
    cJSON_AddNumberToObject(o, "failed", r->failed);
    cJSON_AddItemToObject(o, "tokens_per_s", num_or_null(r->tokens_s));
    cJSON_AddItemToObject(o, "tokens_per_s_per_attn_node", num_or_null(r->per_attn));
    cJSON_AddItemToObject(o, "tokens_per_s_per_ffn_node", num_or_null(r->per_ffn));
    cJSON_AddItemToObject(o, "tpot_p50_ms", num_or_null(r->tpot_p50));
    cJSON_AddItemToObject(o, "tpot_p99_ms", num_or_null(r->tpot_p99));
    cJSON_AddItemToObject(o, "step_ms", num_or_null(r->step_ms));
    cJSON_AddItemToObject(o, "pipeline_efficiency", num_or_null(r->efficiency));
    cJSON *arr = cJSON_AddArrayToObject(o, "nodes");
    for (int i = 0; i < r->nnodes; i++) {
        cJSON *n = cJSON_CreateObject();
        cJSON_AddNumberToObject(n, "id", r->nodes[i].id);
        cJSON_AddStringToObject(n, "role", r->nodes[i].attn ? "attention" : "ffn");
        cJSON_AddItemToObject(n, "busy_fraction", num_or_null(r->nodes[i].busy_frac));
        cJSON_AddItemToObject(n, "busy_ms_per_step", num_or_null(r->nodes[i].busy_ms_step));
        cJSON_AddItemToObject(n, "transfer_fraction", num_or_null(r->nodes[i].xfer_frac));
        cJSON_AddItemToArray(arr, n);
    }
    if (r->base.ok) {
        cJSON *b = cJSON_AddObjectToObject(o, "monolithic");
        cJSON_AddNumberToObject(b, "tokens_per_s", r->base.tokens_s);
        cJSON_AddNumberToObject(b, "tpot_ms", r->base.tpot_ms);
        cJSON_AddNumberToObject(b, "speedup", r->tokens_s / r->base.tokens_s);
    }
    return o;
}

#define O(f) offsetof(decode_opts_t, f)
#define DECODE_COMMON                                                                              \
    {"url",                                                                                        \
     AFD_OPT_STRING,                                                                               \
     NULL,                                                                                         \
     O(url),                                                                                       \
     0,                                                                                            \
     0,                                                                                            \
     AFD_OPT_NOENV,                                                                                \
     "a running cluster's API (else one is started with --model)"},                                \
        {"admin",                                                                                  \
         AFD_OPT_STRING,                                                                           \
         NULL,                                                                                     \
         O(admin),                                                                                 \
         0,                                                                                        \
         0,                                                                                        \
         AFD_OPT_NOENV,                                                                            \
         "its admin API (needed with --url)"},                                                     \
        {"admin-token",  AFD_OPT_STRING,      NULL, O(admin_token), 0, 0,                          \
         AFD_OPT_SECRET, "admin bearer token"},                                                    \
        {"api-key", AFD_OPT_STRING, NULL, O(api_key), 0, 0, AFD_OPT_SECRET, "API key"},            \
        {"model",                                                                                  \
         AFD_OPT_STRING,                                                                           \
         NULL,                                                                                     \
         O(model),                                                                                 \
         0,                                                                                        \
         0,                                                                                        \
         AFD_OPT_NOENV,                                                                            \
         "checkpoint: starts the cluster and runs the afd_run baseline"},                          \
        {"bin-dir",                                                                                \
         AFD_OPT_STRING,                                                                           \
         NULL,                                                                                     \
         O(bin_dir),                                                                               \
         0,                                                                                        \
         0,                                                                                        \
         AFD_OPT_NOENV,                                                                            \
         "where afdctl and afd_run are (default: next to afd_bench)"},                             \
        {"local-up-arg",                                                                           \
         AFD_OPT_LIST,                                                                             \
         NULL,                                                                                     \
         O(local_up_args),                                                                         \
         0,                                                                                        \
         0,                                                                                        \
         AFD_OPT_NOENV,                                                                            \
         "extra argument for afdctl local-up (repeat)"},                                           \
        {"pin", AFD_OPT_BOOL, "false", O(pin), 0, 0, AFD_OPT_NOENV, "pin each node to a core"},    \
        {"tokens", AFD_OPT_INT, "16",          O(tokens),                                          \
         4,        MAX_LEN,     AFD_OPT_NOENV, "tokens generated per sequence"},                   \
        {"threads", AFD_OPT_INT, "1",           O(threads),                                        \
         0,         1024,        AFD_OPT_NOENV, "afd_run GEMM threads (the baseline)"},            \
        {"baseline",                                                                               \
         AFD_OPT_BOOL,                                                                             \
         "true",                                                                                   \
         O(baseline),                                                                              \
         0,                                                                                        \
         0,                                                                                        \
         AFD_OPT_NOENV,                                                                            \
         "run afd_run on the same batch (needs --model)"},                                         \
        {"vocab", AFD_OPT_INT, "1000",        O(vocab),                                            \
         11,      1 << 24,     AFD_OPT_NOENV, "prompt ids from [10, vocab)"},                      \
        {"heartbeat-ms",                                                                           \
         AFD_OPT_INT,                                                                              \
         "100",                                                                                    \
         O(heartbeat_ms),                                                                          \
         50,                                                                                       \
         60000,                                                                                    \
         AFD_OPT_NOENV,                                                                            \
         "node heartbeat period of a started cluster"},                                            \
        {"poll-ms", AFD_OPT_INT, "100",         O(poll_ms),                                        \
         10,        60000,       AFD_OPT_NOENV, "admin status sampling period"},                   \
        {"timeout-s", AFD_OPT_INT, "900", O(timeout_s), 1, 86400, AFD_OPT_NOENV, "per request"},   \
        {"progress",    AFD_OPT_BOOL,           "false", O(progress), 0, 0,                        \
         AFD_OPT_NOENV, "show request progress"},                                                  \
    {                                                                                              \
        "result-file", AFD_OPT_STRING, NULL, O(result_file), 0, 0, AFD_OPT_NOENV,                  \
            "write the results as JSON"                                                            \
    }

static const afd_opt_t decode_table[] = {
    DECODE_COMMON,
    {"attn", AFD_OPT_INT, "1", O(attn), 1, 64, AFD_OPT_NOENV, "attention nodes (started cluster)"},
    {"ffn", AFD_OPT_INT, "1", O(ffn), 1, 64, AFD_OPT_NOENV, "FFN nodes (started cluster)"},
    {"micro-batches", AFD_OPT_STRING, "3", O(micro_batches), 0, 0, AFD_OPT_NOENV,
     "1..8 or auto (started cluster)"},
    {"batch", AFD_OPT_INT, "32", O(batch), 1, 65536, AFD_OPT_NOENV, "sequences decoded together"},
    {"context", AFD_OPT_INT, "64", O(context), 1, MAX_LEN, AFD_OPT_NOENV,
     "prompt tokens per sequence"},
    AFD_OPTS_END};

static const afd_opt_t sweep_table[] = {
    DECODE_COMMON,
    {"af", AFD_OPT_STRING, "1x1", O(af), 0, 0, AFD_OPT_NOENV, "A:F ratios, e.g. 1x1,1x2,2x2"},
    {"micro-batches", AFD_OPT_STRING, "3", O(micro_batches), 0, 0, AFD_OPT_NOENV,
     "micro-batch counts, e.g. 2,3"},
    {"batches", AFD_OPT_STRING, "8,16,32", O(batches), 0, 0, AFD_OPT_NOENV, "batch sizes"},
    {"contexts", AFD_OPT_STRING, "64", O(contexts), 0, 0, AFD_OPT_NOENV, "context lengths"},
    {"out-dir", AFD_OPT_STRING, ".", O(out_dir), 0, 0, AFD_OPT_NOENV,
     "writes sweep.json and sweep.svg there"},
    AFD_OPTS_END};
#undef O

/* the model's layer count and hidden size from its config.json (0 when unreadable) */
static void model_shape(const char *dir, int *layers, int *hidden)
{
    *layers = *hidden = 0;
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    char *txt = slurp_fd(fd, 1 << 20);
    cJSON *j = txt ? cJSON_Parse(txt) : NULL;
    free(txt);
    const cJSON *tc = j ? cJSON_GetObjectItemCaseSensitive(j, "text_config") : NULL;
    if (!tc) tc = j;
    const cJSON *l = tc ? cJSON_GetObjectItemCaseSensitive(tc, "num_hidden_layers") : NULL;
    const cJSON *h = tc ? cJSON_GetObjectItemCaseSensitive(tc, "hidden_size") : NULL;
    if (cJSON_IsNumber(l) && l->valuedouble >= 1 && l->valuedouble <= 100000)
        *layers = (int)l->valuedouble;
    if (cJSON_IsNumber(h) && h->valuedouble >= 1 && h->valuedouble <= (1 << 24))
        *hidden = (int)h->valuedouble;
    cJSON_Delete(j);
}

static afd_status_t valid_mb(const char *mb)
{
    char *end;
    long v = strtol(mb, &end, 10);
    if (!strcmp(mb, "auto") || (!*end && v >= 1 && v <= 8)) return AFD_OK;
    afd_error("--micro-batches: '%s' is not 1..8 or auto", mb);
    return AFD_ERR_INVALID;
}

static int cmd_decode(int argc, char **argv)
{
    decode_opts_t o;
    memset(&o, 0, sizeof(o));
    int first, rc = 2;
    afd_status_t st = afd_opts_parse(decode_table, &o, argc, argv,
                                     "usage: afd_bench decode (--model DIR [--attn A --ffn F "
                                     "--micro-batches M] | --url URL --admin URL) --batch B "
                                     "--context C [--tokens N]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    cluster_t cl = {0};
    decode_res_t r;
    memset(&r, 0, sizeof(r));
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        goto out;
    }
    if (!o.url && !o.model) {
        afd_error("give --model DIR (a cluster is started) or --url and --admin");
        goto out;
    }
    if (o.url && !o.admin) {
        afd_error("--url needs --admin (the nodes' stage times come from /admin/status)");
        goto out;
    }
    if (valid_mb(o.micro_batches)) goto out;
    find_bindir(o.bin_dir);
    rc = 1;
    const char *url = o.url, *admin = o.admin;
    if (!url) {
        if (cluster_start_retry(&o, (int)o.attn, (int)o.ffn, o.micro_batches,
                                o.batch * o.context + o.batch, &cl))
            goto out;
        url = cl.url;
        admin = cl.admin;
    }
    snprintf(r.mb, sizeof(r.mb), "%s", o.url ? "?" : o.micro_batches);
    /* a started cluster with auto reports the count it chose in its status */
    st = decode_measure(&o, url, admin, (int)o.batch, (int)o.context, &r);
    cluster_stop(&cl, st != AFD_OK);
    if (st) goto out;
    if (o.model) model_shape(o.model, &r.layers, &r.hidden);
    if (o.baseline && o.model) run_baseline(&o, (int)o.batch, (int)o.context, &r.base);
    print_decode(&r);
    rc = 0;
    if (o.result_file) {
        cJSON *j = decode_json(&r);
        if (write_json(o.result_file, j)) rc = 1;
        cJSON_Delete(j);
    }
out:
    cluster_stop(&cl, 1);
    afd_opts_free(decode_table, &o);
    return rc;
}

static int cmd_sweep(int argc, char **argv)
{
    decode_opts_t o;
    memset(&o, 0, sizeof(o));
    int first, rc = 2;
    afd_status_t st = afd_opts_parse(sweep_table, &o, argc, argv,
                                     "usage: afd_bench sweep --model DIR [--af 1x1,1x2] "
                                     "[--micro-batches 2,3] [--batches 8,16,32] [--contexts 64] "
                                     "[--out-dir DIR]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    int *bs = NULL, *cs = NULL, *ms = NULL, nb = 0, nc = 0, nm = 0, naf = 0;
    int af[32][2];
    decode_res_t *res = NULL;
    int nres = 0;
    cJSON *root = NULL;
    if (first < argc) {
        afd_error("unexpected argument '%s'", argv[first]);
        goto out;
    }
    if (!o.model) {
        afd_error("sweep needs --model DIR (it starts a cluster per configuration)");
        goto out;
    }
    if (afd_parse_int_list(o.batches, 1, 65536, &bs, &nb) ||
        afd_parse_int_list(o.contexts, 1, MAX_LEN, &cs, &nc) ||
        afd_parse_int_list(o.micro_batches, 1, 8, &ms, &nm))
        goto out;
    {
        char *dup = strdup(o.af), *save = NULL;
        for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            int a, f;
            char extra;
            if (naf >= 32 || sscanf(t, "%dx%d%c", &a, &f, &extra) != 2 || a < 1 || a > 64 ||
                f < 1 || f > 64) {
                afd_error("--af: '%s' is not AxF (e.g. 1x2), at most 32 of them", t);
                free(dup);
                goto out;
            }
            af[naf][0] = a;
            af[naf++][1] = f;
        }
        free(dup);
    }
    if (naf == 0 || nb == 0 || nc == 0 || nm == 0) {
        afd_error("sweep: empty list");
        goto out;
    }
    mkdir(o.out_dir, 0755);
    find_bindir(o.bin_dir);
    rc = 1;
    res = calloc((size_t)(naf * nm * nb * nc), sizeof(decode_res_t));
    if (!res) goto out;
    int maxb = 0, maxc = 0;
    for (int i = 0; i < nb; i++)
        if (bs[i] > maxb) maxb = bs[i];
    for (int i = 0; i < nc; i++)
        if (cs[i] > maxc) maxc = cs[i];
    for (int i = 0; i < naf; i++)
        for (int k = 0; k < nm; k++) {
            cluster_t cl;
            char mb[16];
            snprintf(mb, sizeof(mb), "%d", ms[k]);
            if (cluster_start_retry(&o, af[i][0], af[i][1], mb, (long)maxb * maxc + maxb, &cl)) {
                cluster_stop(&cl, 1);
                goto out;
            }
            int bad = 0;
            for (int c = 0; c < nc; c++)
                for (int b = 0; b < nb; b++) {
                    decode_res_t *r = &res[nres];
                    snprintf(r->mb, sizeof(r->mb), "%s", mb);
                    fprintf(stderr, "sweep: %dA%dF m=%s batch %d context %d\n", af[i][0], af[i][1],
                            mb, bs[b], cs[c]);
                    if (decode_measure(&o, cl.url, cl.admin, bs[b], cs[c], r) == AFD_OK) {
                        model_shape(o.model, &r->layers, &r->hidden);
                        print_decode(r);
                        nres++;
                    } else {
                        memset(r, 0, sizeof(*r));
                        bad = 1;
                    }
                    fflush(stdout);
                }
            cluster_stop(&cl, bad);
        }
    /* the monolithic baseline once per batch and context */
    decode_res_t base[64];
    int nbase = 0;
    for (int c = 0; o.baseline && c < nc; c++)
        for (int b = 0; b < nb && nbase < 64; b++) {
            decode_res_t *r = &base[nbase];
            memset(r, 0, sizeof(*r));
            r->B = bs[b];
            r->C = cs[c];
            if (run_baseline(&o, bs[b], cs[c], &r->base) == AFD_OK) {
                printf("monolithic afd_run, batch %d, context %d: %.1f tokens/s, TPOT %.1f ms\n",
                       bs[b], cs[c], r->base.tokens_s, r->base.tpot_ms);
                nbase++;
            }
        }
    /* results file */
    root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "model", o.model);
    cJSON_AddNumberToObject(root, "tokens", (double)o.tokens);
    cJSON *pts = cJSON_AddArrayToObject(root, "points");
    for (int i = 0; i < nres; i++)
        cJSON_AddItemToArray(pts, decode_json(&res[i]));
    cJSON *bj = cJSON_AddArrayToObject(root, "monolithic");
    for (int i = 0; i < nbase; i++) {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddNumberToObject(p, "batch", base[i].B);
        cJSON_AddNumberToObject(p, "context", base[i].C);
        cJSON_AddNumberToObject(p, "tokens_per_s", base[i].base.tokens_s);
        cJSON_AddNumberToObject(p, "tpot_ms", base[i].base.tpot_ms);
        cJSON_AddItemToArray(bj, p);
    }
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/sweep.json", o.out_dir);
    if (write_json(path, root)) goto out;
    printf("results: %s\n", path);
    /* the plot: tokens/s against TPOT p50, one line per (A:F, m, context) in batch order */
    int nser = 0;
    bn_series_t ser[256];
    char names[256][64];
    double xs[256][64], ys[256][64];
    for (int i = 0; i < nres; i++) {
        char nm[64];
        snprintf(nm, sizeof(nm), "%dA%dF m=%s ctx %d", res[i].attn, res[i].ffn, res[i].mb,
                 res[i].C);
        int s = 0;
        while (s < nser && strcmp(names[s], nm))
            s++;
        if (s == nser) {
            if (nser == 255) continue;
            snprintf(names[nser], sizeof(names[nser]), "%s", nm);
            ser[nser] = (bn_series_t){names[nser], xs[nser], ys[nser], 0};
            nser++;
        }
        if (ser[s].n < 64) {
            xs[s][ser[s].n] = res[i].tpot_p50;
            ys[s][ser[s].n++] = res[i].tokens_s;
        }
    }
    for (int c = 0; c < nc && nbase > 0 && nser < 255; c++) {
        snprintf(names[nser], sizeof(names[nser]), "afd_run ctx %d", cs[c]);
        ser[nser] = (bn_series_t){names[nser], xs[nser], ys[nser], 0};
        for (int i = 0; i < nbase; i++)
            if (base[i].C == cs[c] && ser[nser].n < 64) {
                xs[nser][ser[nser].n] = base[i].base.tpot_ms;
                ys[nser][ser[nser].n++] = base[i].base.tokens_s;
            }
        nser++;
    }
    snprintf(path, sizeof(path), "%s/sweep.svg", o.out_dir);
    if (bn_svg_plot(path, "decode throughput against TPOT", "TPOT p50 (ms)", "decode tokens/s", ser,
                    (size_t)nser))
        goto out;
    printf("plot: %s\n", path);
    rc = nres == naf * nm * nb * nc ? 0 : 1;
out:
    cJSON_Delete(root);
    free(res);
    free(bs);
    free(cs);
    free(ms);
    afd_opts_free(sweep_table, &o);
    return rc;
}

int main(int argc, char **argv)
{
    afd_log_init(argv[0]);
    signal(SIGPIPE, SIG_IGN);
    const char *usage = "usage: afd_bench serve|decode|sweep [options] (--help after the command)";
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        puts(usage);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "serve")) return cmd_serve(argc - 1, argv + 1);
    if (!strcmp(argv[1], "decode")) return cmd_decode(argc - 1, argv + 1);
    if (!strcmp(argv[1], "sweep")) return cmd_sweep(argc - 1, argv + 1);
    afd_error("unknown command '%s'; %s", argv[1], usage);
    return 2;
}
