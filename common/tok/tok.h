/*
 * tok: text in, text out. A loader for Hugging Face tokenizer.json files of the byte-level
 * BPE kind (DeepSeek-V3 / Step3: Split regexes + ByteLevel pre-tokenizer, ranked merges,
 * added and special tokens), encode and decode, a streaming detokenizer that never emits a
 * broken UTF-8 sequence and cuts at stop strings across token boundaries, a bounded
 * Jinja-subset renderer for chat templates, and a byte-level BPE trainer.
 *
 * A tok_t is immutable after loading except for its word cache and regex scratch space:
 * encode from one thread at a time (decode and the stream only read it).
 */
#ifndef TOK_H
#define TOK_H

#include "afd_status.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#define TOK_MAX_FILE        (256u << 20) /* tokenizer.json / tokenizer_config.json */
#define TOK_MAX_VOCAB       (1 << 22)
#define TOK_MAX_TOKEN_BYTES 1024 /* one vocabulary entry */
#define TOK_MAX_SPLITS      16   /* regex stages of the pre-tokenizer */
#define TOK_MAX_STOPS       16
#define TOK_MAX_STOP_LEN    256

typedef struct tok tok_t;

/* A growing list of token ids. */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids_t;

/* A growing byte string, NUL-terminated when non-empty. */
typedef struct tok_buf {
    char *p;
    size_t len, cap;
} tok_buf_t;

void tok_ids_free(tok_ids_t *ids);
void tok_buf_free(tok_buf_t *b);
afd_status_t tok_buf_add(tok_buf_t *b, const void *p, size_t n);

/* Loads a tokenizer.json file. Unsupported features are a load error naming them. */
afd_status_t tok_load(const char *path, tok_t **out);
/* The same from the file's text (len bytes). */
afd_status_t tok_load_json(const char *text, size_t len, tok_t **out);
void tok_free(tok_t *t);

/* One past the largest id (vocabulary and added tokens). */
int tok_vocab_size(const tok_t *t);
/* The id of a token written as in the file (e.g. "<|EOT|>"), or -1. */
int32_t tok_token_id(const tok_t *t, const char *token);
/* Whether id is an added token flagged special. */
int tok_is_special(const tok_t *t, int32_t id);

/* Encodes len bytes of text (any bytes: invalid UTF-8 is kept as byte tokens) and appends
 * the ids to out. Added tokens are matched first and never split. */
afd_status_t tok_encode(tok_t *t, const char *text, size_t len, tok_ids_t *out);
/* Appends the bytes of ids to out (raw: may be invalid UTF-8 if ids cut a character).
 * skip_special leaves out added tokens flagged special. Unknown ids are AFD_ERR_RANGE. */
afd_status_t tok_decode(const tok_t *t, const int32_t *ids, size_t n, int skip_special,
                        tok_buf_t *out);
/* Appends src to out with each maximal invalid UTF-8 subpart replaced by one U+FFFD (as
 * Python's errors="replace" and Rust's from_utf8_lossy do). */
afd_status_t tok_utf8_clean(const char *src, size_t n, tok_buf_t *out);
/* Length of the longest prefix of s (n bytes) that is valid UTF-8 up to an incomplete
 * sequence at the end; *bad is set when an invalid (not merely incomplete) one is met. */
size_t tok_utf8_valid_prefix(const char *s, size_t n, int *bad);
/* At an invalid or cut sequence: how many bytes one U+FFFD replaces (at least 1). */
size_t tok_utf8_bad_len(const char *s, size_t n);

/* Streaming detokenizer: one per generated sequence. */
typedef struct tok_stream {
    const tok_t *t;
    tok_buf_t text;       /* clean UTF-8 text decoded so far (cut at a stop string) */
    unsigned char raw[8]; /* bytes of an incomplete UTF-8 sequence held back */
    size_t nraw;          /* how many */
    size_t emitted;       /* bytes of text already handed out */
    char *stops[TOK_MAX_STOPS];
    size_t stop_len[TOK_MAX_STOPS];
    size_t nstop, max_stop; /* stop strings; the longest one's length */
    int skip_special;
    int stopped; /* a stop string matched: no more text */
    int matched; /* which stop string (-1: none) */
} tok_stream_t;

/* stops: nstop stop strings (at most TOK_MAX_STOPS, each 1..TOK_MAX_STOP_LEN bytes). */
afd_status_t tok_stream_init(tok_stream_t *s, const tok_t *t, const char *const *stops,
                             size_t nstop, int skip_special);
/* Adds one token. delta, dlen: the text that became safe to show (inside s, valid until
 * the next call). Sets s->stopped when a stop string matched: the text ends before it. */
afd_status_t tok_stream_push(tok_stream_t *s, int32_t id, const char **delta, size_t *dlen);
/* At the end of generation: hands out what was held back (an incomplete sequence as U+FFFD). */
afd_status_t tok_stream_flush(tok_stream_t *s, const char **delta, size_t *dlen);
void tok_stream_fini(tok_stream_t *s);

/* Chat templates (a bounded Jinja subset; see docs/tokenizer.md). */
typedef struct tok_tmpl tok_tmpl_t;
/* Parses a template; anything outside the subset is an error written to err. */
afd_status_t tok_tmpl_parse(const char *src, tok_tmpl_t **out, char *err, size_t errlen);
void tok_tmpl_free(tok_tmpl_t *t);
/* Renders with the variables of ctx (a JSON object: messages, add_generation_prompt,
 * bos_token, ...). Errors (raise_exception, type errors, limits) go to err. */
afd_status_t tok_tmpl_render(const tok_tmpl_t *t, const cJSON *ctx, tok_buf_t *out, char *err,
                             size_t errlen);

/* The model directory's chat setup, from tokenizer_config.json. */
typedef struct tok_chat {
    tok_tmpl_t *tmpl;            /* NULL: the file has no chat_template */
    char *bos_token, *eos_token; /* strings, or NULL */
    int add_bos_token;           /* text prompts start with bos_token */
} tok_chat_t;
/* Reads tokenizer_config.json; a chat_template outside the subset is an error (logged). */
afd_status_t tok_chat_load(const char *config_path, tok_chat_t *out);
void tok_chat_fini(tok_chat_t *c);

/* Byte-level BPE training (used by afd_mkmodel): learns merges over text with the
 * DeepSeek-V3 pre-tokenizer and writes a tokenizer.json of exactly vocab_size ids: the
 * special tokens first (ids 0..nspecial-1), the 256 bytes, the merges, then placeholder
 * special tokens when the text holds fewer merges than room. */
typedef struct tok_special {
    const char *content;
    int special; /* 0: an added token that decodes as text */
} tok_special_t;
afd_status_t tok_train_write(const char *text, size_t len, int vocab_size,
                             const tok_special_t *specials, int nspecial, const char *path,
                             int *nmerges);
/* The bundled training sample (varied text: English, code, digits, CJK, emoji). */
const char *tok_sample_text(size_t *len);
/* The DeepSeek-V3 pre-tokenizer's Split patterns, in file order. */
extern const char *const tok_deepseek_patterns[3];

#endif
