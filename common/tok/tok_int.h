/*
 * tok_int: the tokenizer's internal layout, shared by the files of common/tok.
 */
#ifndef TOK_INT_H
#define TOK_INT_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include "tok.h"

#include <pcre2.h>

enum { TOK_F_PRESENT = 1, TOK_F_VOCAB = 2, TOK_F_SPECIAL = 4 };

typedef struct tok_merge {
    uint64_t key; /* (left id << 32) | right id */
    int32_t rank; /* -1: empty slot */
    int32_t res;  /* the merged token */
} tok_merge_t;

typedef struct tok_added {
    int32_t id;
    char *content;
    size_t len;
    int special;
} tok_added_t;

typedef struct tok_piece {
    size_t off, len;
} tok_piece_t;

typedef struct tok_cache {
    char *key; /* one block: the word's bytes, then its ids */
    int32_t *ids;
    uint32_t klen, nids;
} tok_cache_t;

struct tok {
    int nvocab; /* one past the largest id */
    /* id -> bytes */
    char *arena;
    size_t arena_len, arena_cap;
    uint32_t *off;  /* (nvocab) */
    uint16_t *len;  /* (nvocab) */
    uint8_t *flags; /* (nvocab) TOK_F_* */
    int32_t *vhash; /* open addressing: vocabulary bytes -> id; -1 empty */
    size_t vmask;
    tok_merge_t *merges; /* open addressing: (left, right) -> rank, result */
    size_t mmask;
    int32_t byte_id[256];
    int ignore_merges, bytelevel;
    uint32_t b2c[256];
    int16_t c2b[324];
    /* added tokens, and a byte trie over their contents: (node, byte) -> child in an open
     * addressing table; term[node]: the added token ending there, or -1 */
    tok_added_t *added;
    size_t nadded;
    struct tok_trie_slot {
        uint64_t key; /* (node + 1) << 8 | byte; 0: empty */
        int32_t child;
    } * trie;
    size_t tmask;
    int32_t *term;
    int32_t ntrie;
    uint8_t first[256]; /* a byte some added token starts with */
    struct {
        pcre2_code *code;
        int removed, jit;
    } split[TOK_MAX_SPLITS];
    int nsplit;
    /* scratch (encode only) */
    pcre2_match_data *md;
    tok_piece_t *pieces[2];
    size_t pcap[2];
    int cur;
    tok_cache_t *cache;
    uint64_t cache_hits;
};

uint64_t tok_hash(const void *p, size_t n);
/* Splits text with the Split stages into t->pieces[t->cur][0..*n). */
afd_status_t tok_pretokenize(tok_t *t, const char *text, size_t len, size_t *n);
/* The bytes of one token (0 when unknown). */
size_t tok_token_text(const tok_t *t, int32_t id, const char **p);
/* Writes the byte-level spelling of n raw bytes (up to 2n bytes) to o. */
size_t tok_bytelevel_spell(const tok_t *t, const char *b, size_t n, char *o);
/* A tokenizer that only pre-tokenizes (for training). */
afd_status_t tok_pretok_from_json(const cJSON *pretok, tok_t **out);

#endif
