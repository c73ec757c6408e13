/*
 * fuzz_json: request bodies for the coordinator's OpenAI/Anthropic API, through the real
 * HTTP server and the real handler (coord_api_handle: routing, authorization, JSON parsing
 * and the validation of every field in coord_api.c and coord_chat.c). The coordinator has
 * the tiny model's configuration, its default options and no nodes: a valid request is
 * refused at admission (503, not ready), after all its fields were checked. With
 * AFD_FUZZ_TOKENIZER=DIR (tests/fuzz/run.sh sets it to the tiny fixture when there is
 * one) it loads DIR/tokenizer.json and DIR/tokenizer_config.json as the coordinator
 * does, so that text prompts, chat templates and stop strings are checked too; without
 * it, token ids only.
 *
 * Input: the first line is the path (e.g. "/v1/chat/completions"), the rest the body,
 * sent as "POST <path>" with a Content-Length.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "coord.h"
#include "fz_http.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const afd_opt_t coord_table[];

static coord_t g_c;
static fz_http_t g_h;

static void load_tokenizer(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    if (tok_load(path, &g_c.tok)) abort();
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    if (tok_chat_load(path, &g_c.chat)) abort();
    if (g_c.chat.add_bos_token && g_c.chat.bos_token)
        g_c.bos_id = tok_token_id(g_c.tok, g_c.chat.bos_token);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_json");
    char *args[] = {"fuzz_json", NULL};
    int first;
    if (afd_opts_parse(coord_table, &g_c.o, 1, args, "", &first)) abort();
    if (mdl_config_parse(fz_tiny_config, "tiny config", &g_c.cfg)) abort();
    coord_metrics_init(&g_c.metrics);
    g_c.bos_id = -1;
    g_c.micro_batches = 1;
    const char *tok_dir = getenv("AFD_FUZZ_TOKENIZER");
    if (tok_dir && *tok_dir) load_tokenizer(tok_dir);
    net_http_limits_t lim = {.max_header_bytes = 16384,
                             .max_headers = 64,
                             .max_body = (size_t)g_c.o.max_body_kb << 10,
                             .max_conns = 4,
                             .idle_timeout_ms = 0};
    if (fz_http_init(&g_h, &lim, coord_api_handle, &g_c)) abort();
    g_c.loop = &g_h.loop;
    uv_timer_init(g_c.loop, &g_c.stop_timer);
    g_c.stop_timer.data = &g_c;
    fz_http_mark(&g_h);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t plen = nl ? (size_t)(nl - data) : size;
    if (plen > 256) return 0;
    const uint8_t *body = nl ? nl + 1 : data + size;
    size_t blen = size - (size_t)(body - data);
    char head[512];
    int n = snprintf(head, sizeof(head),
                     "POST %.*s HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     (int)plen, (const char *)data, blen);
    uint8_t *msg = malloc((size_t)n + blen);
    if (!msg) return 0;
    memcpy(msg, head, (size_t)n);
    memcpy(msg + n, body, blen);
    fz_http_exchange(&g_h, msg, (size_t)n + blen, 0, NULL, NULL);
    free(msg);
    /* nothing may stay queued or running: the cluster has no nodes */
    coord_sched_reap(&g_c);
    if (g_c.nwaiting || g_c.nrunning) abort();
    return 0;
}
