/*
 * fuzz_config: a checkpoint's config.json (common/model/mdl_config.c: the step3_vl
 * wrapper or a plain text config, every field typed and bounded, moe_layers_enum,
 * quantization_config, eos ids). An accepted configuration must pass validation again
 * and stay within the bounds the loader relies on.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "mdl_config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_config");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the loader reads the file into a NUL-terminated buffer */
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;
    mdl_config_t cfg;
    if (mdl_config_parse(text, "config.json", &cfg) == AFD_OK) {
        if (mdl_config_validate(&cfg, "config.json") != AFD_OK) abort();
        if (cfg.num_layers < 1 || cfg.num_layers > MDL_MAX_LAYERS) abort();
        if (cfg.hidden_size < 1 || cfg.hidden_size > MDL_MAX_DIM) abort();
        if (cfg.vocab_size < 1 || cfg.vocab_size > MDL_MAX_VOCAB) abort();
        if (cfg.num_experts < 0 || cfg.num_experts > MDL_MAX_EXPERTS) abort();
        if (cfg.num_eos < 0 || cfg.num_eos > MDL_MAX_EOS) abort();
        int moe = mdl_config_num_moe(&cfg);
        if (moe < 0 || moe > cfg.num_layers) abort();
        if (moe > 0 && (cfg.num_experts < 1 || cfg.top_k < 1 || cfg.top_k > cfg.num_experts))
            abort();
    }
    free(text);
    return 0;
}
