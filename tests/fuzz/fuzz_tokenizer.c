/*
 * fuzz_tokenizer: a model's tokenizer.json (common/tok/tok_bpe.c: vocabulary, merges,
 * added tokens, the byte-level BPE setup), loaded from memory as tok_load does after
 * reading the file. An accepted tokenizer encodes a fixed mixed-script text, decodes the
 * ids back and streams them through the detokenizer with a stop string: every id it
 * produced must be inside its vocabulary.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "tok.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char sample[] = "Hello, world! 123 4567 def f(x):\n\treturn x*2  # ok\n"
                             "caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 \xff\xfe end";

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_tokenizer");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tok_t *t = NULL;
    if (tok_load_json((const char *)data, size, &t) != AFD_OK) return 0;
    int vocab = tok_vocab_size(t);
    tok_ids_t ids = {0};
    if (tok_encode(t, sample, sizeof(sample) - 1, &ids) == AFD_OK) {
        for (size_t i = 0; i < ids.n; i++)
            if (ids.v[i] < 0 || ids.v[i] >= vocab) abort();
        tok_buf_t text = {0};
        tok_decode(t, ids.v, ids.n, 0, &text);
        tok_buf_free(&text);
        const char *stops[] = {"world"};
        tok_stream_t s;
        if (tok_stream_init(&s, t, stops, 1, 1) == AFD_OK) {
            const char *delta;
            size_t dlen;
            for (size_t i = 0; i < ids.n && !s.stopped; i++)
                if (tok_stream_push(&s, ids.v[i], &delta, &dlen)) break;
            tok_stream_flush(&s, &delta, &dlen);
            tok_stream_fini(&s);
        }
    }
    tok_ids_free(&ids);
    tok_free(t);
    return 0;
}
