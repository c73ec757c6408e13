/*
 * fuzz_tmpl: a chat template (common/tok/tok_tmpl.c: the bounded Jinja subset read from
 * a model's tokenizer_config.json), parsed and, when accepted, rendered with a fixed
 * conversation (system, user, assistant and user messages, string and list contents,
 * bos/eos tokens, add_generation_prompt) as the coordinator renders a chat request.
 * AFD_LOG_LEVEL=debug shows each input's parse or render error.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "tok.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char ctx_json[] =
    "{\"messages\":["
    "{\"role\":\"system\",\"content\":\"be brief\"},"
    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hello \"},"
    "{\"type\":\"text\",\"text\":\"there\"}]},"
    "{\"role\":\"assistant\",\"content\":\"hi\"},"
    "{\"role\":\"user\",\"content\":\"2+2? \\u00e9\\u4e2d\"}],"
    "\"add_generation_prompt\":true,\"bos_token\":\"<s>\",\"eos_token\":\"</s>\","
    "\"tools\":null}";

static cJSON *g_ctx;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_tmpl");
    g_ctx = cJSON_Parse(ctx_json);
    if (!g_ctx) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *src = malloc(size + 1);
    if (!src) return 0;
    memcpy(src, data, size);
    src[size] = 0;
    char err[256];
    tok_tmpl_t *t = NULL;
    if (tok_tmpl_parse(src, &t, err, sizeof(err)) == AFD_OK) {
        tok_buf_t out = {0};
        if (tok_tmpl_render(t, g_ctx, &out, err, sizeof(err)) == AFD_OK)
            afd_debug("rendered %zu bytes", out.len);
        else
            afd_debug("render: %s", err);
        tok_buf_free(&out);
        tok_tmpl_free(t);
    } else {
        afd_debug("parse: %s", err);
    }
    free(src);
    return 0;
}
