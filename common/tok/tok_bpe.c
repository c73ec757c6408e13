/*
 * tok_bpe: tokenizer.json loading, encode and decode for byte-level BPE.
 *
 * Encode: added tokens are cut out first (leftmost, then longest); each remaining segment
 * goes through the pre-tokenizer's Split stages (PCRE2, UTF + Unicode properties, compiled
 * with PCRE2_MATCH_INVALID_UTF: an invalid byte never matches a pattern, so it lands in a
 * gap piece and is encoded as its byte token), then each piece is merged by rank with a
 * binary heap over a linked list of symbols (O(n log n) per word) behind a bounded
 * direct-mapped word cache.
 */
#define _GNU_SOURCE
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tok.h"
#include "tok_int.h"
#include "afd_file.h"
#include "afd_log.h"

#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CACHE_SLOTS    (1u << 15)
#define CACHE_MAX_WORD 128

/* ---- small containers ---- */

void tok_ids_free(tok_ids_t *ids)
{
    free(ids->v);
    memset(ids, 0, sizeof(*ids));
}

void tok_buf_free(tok_buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

afd_status_t tok_buf_add(tok_buf_t *b, const void *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) return AFD_ERR_NOMEM;
        b->p = q;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = 0;
    return AFD_OK;
}

static afd_status_t ids_push(tok_ids_t *o, int32_t id)
{
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        int32_t *v = realloc(o->v, cap * sizeof(*v));
        if (!v) return AFD_ERR_NOMEM;
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = id;
    return AFD_OK;
}

uint64_t tok_hash(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

/* ---- the byte-level alphabet (bytes <-> printable code points) ---- */

static void bytelevel_init(uint32_t b2c[256], int16_t c2b[324])
{
    int n = 0;
    for (int c = 0; c < 324; c++)
        c2b[c] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        b2c[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        c2b[b2c[b]] = (int16_t)b;
    }
}

static size_t utf8_put(uint32_t c, char *o)
{
    if (c < 0x80) {
        o[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        o[0] = (char)(0xC0 | (c >> 6));
        o[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | (c >> 12));
        o[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (c >> 18));
    o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* Decodes one UTF-8 sequence at s (n bytes left): its length, or 0 when invalid or cut. */
static size_t utf8_get(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xE0) == 0xC0) {
        len = 2, v = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        len = 3, v = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        len = 4, v = c & 0x07, min = 0x10000;
    } else
        return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
    *cp = v;
    return len;
}

size_t tok_utf8_bad_len(const char *p, size_t n)
{
    const unsigned char *s = (const unsigned char *)p;
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 1;
    if (n < 2 || s[1] < lo || s[1] > hi) return 1;
    size_t k = 2;
    while (k < need && k < n && (s[k] & 0xC0) == 0x80)
        k++;
    return k;
}

size_t tok_utf8_valid_prefix(const char *s, size_t n, int *bad)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    *bad = 0;
    while (i < n) {
        uint32_t cp;
        size_t l = utf8_get(u + i, n - i, &cp);
        if (l) {
            i += l;
            continue;
        }
        /* the start of a well-formed sequence cut by the end of the bytes: incomplete */
        size_t k = tok_utf8_bad_len(s + i, n - i);
        unsigned char c = u[i];
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        if (!(i + k == n && k < need && c >= 0xC2 && c <= 0xF4)) *bad = 1;
        return i;
    }
    return i;
}

afd_status_t tok_utf8_clean(const char *src, size_t n, tok_buf_t *out)
{
    size_t i = 0;
    while (i < n) {
        int bad;
        size_t k = tok_utf8_valid_prefix(src + i, n - i, &bad);
        if (tok_buf_add(out, src + i, k)) return AFD_ERR_NOMEM;
        i += k;
        if (i < n) { /* one replacement character per maximal invalid subpart */
            if (tok_buf_add(out, "\xEF\xBF\xBD", 3)) return AFD_ERR_NOMEM;
            i += tok_utf8_bad_len(src + i, n - i);
        }
    }
    if (!out->p && tok_buf_add(out, "", 0)) return AFD_ERR_NOMEM;
    return AFD_OK;
}

/* ---- loading ---- */

static afd_status_t lerr(afd_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static afd_status_t lerr(afd_status_t st, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    afd_error("tokenizer.json: %s", msg);
    return st;
}

/* token string (as in the file) -> bytes: through the byte-level alphabet when every
 * character is in it, else the string's own UTF-8 (as Hugging Face's ByteLevel decoder) */
static size_t token_bytes(const tok_t *t, const char *s, size_t n, char *o)
{
    size_t i = 0, k = 0;
    while (i < n) {
        uint32_t cp;
        size_t l = utf8_get((const unsigned char *)s + i, n - i, &cp);
        if (!l || cp >= 324 || t->c2b[cp] < 0) {
            memcpy(o, s, n);
            return n;
        }
        o[k++] = (char)t->c2b[cp];
        i += l;
    }
    return k;
}

static afd_status_t arena_add(tok_t *t, int32_t id, const char *b, size_t n)
{
    if (t->arena_len + n > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 1 << 16;
        while (cap < t->arena_len + n)
            cap *= 2;
        char *p = realloc(t->arena, cap);
        if (!p) return AFD_ERR_NOMEM;
        t->arena = p;
        t->arena_cap = cap;
    }
    memcpy(t->arena + t->arena_len, b, n);
    t->off[id] = (uint32_t)t->arena_len;
    t->len[id] = (uint16_t)n;
    t->arena_len += n;
    return AFD_OK;
}

/* bytes -> id over the vocabulary (not the added tokens) */
static int32_t lookup_bytes(const tok_t *t, const char *b, size_t n)
{
    uint64_t h = tok_hash(b, n);
    for (size_t i = h & t->vmask;; i = (i + 1) & t->vmask) {
        int32_t id = t->vhash[i];
        if (id < 0) return -1;
        if (t->len[id] == n && !memcmp(t->arena + t->off[id], b, n)) return id;
    }
}

static void vhash_insert(tok_t *t, int32_t id)
{
    uint64_t h = tok_hash(t->arena + t->off[id], t->len[id]);
    for (size_t i = h & t->vmask;; i = (i + 1) & t->vmask)
        if (t->vhash[i] < 0) {
            t->vhash[i] = id;
            return;
        }
}

static afd_status_t merge_insert(tok_t *t, int32_t a, int32_t b, int32_t rank, int32_t res)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t i = tok_hash(&key, 8) & t->mmask;; i = (i + 1) & t->mmask) {
        if (t->merges[i].rank < 0) {
            t->merges[i] = (tok_merge_t){key, rank, res};
            return AFD_OK;
        }
        if (t->merges[i].key == key) return AFD_OK; /* a repeated merge keeps its first rank */
    }
}

static const tok_merge_t *merge_find(const tok_t *t, int32_t a, int32_t b)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t i = tok_hash(&key, 8) & t->mmask;; i = (i + 1) & t->mmask) {
        if (t->merges[i].rank < 0) return NULL;
        if (t->merges[i].key == key) return &t->merges[i];
    }
}

static int is_null_or_false(const cJSON *v)
{
    return !v || cJSON_IsNull(v) || cJSON_IsFalse(v);
}

static afd_status_t add_split(tok_t *t, const cJSON *p)
{
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
    const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
    const cJSON *inv = cJSON_GetObjectItemCaseSensitive(p, "invert");
    const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pat, "String");
    if (t->nsplit == TOK_MAX_SPLITS)
        return lerr(AFD_ERR_RANGE, "more than %d Split pre-tokenizers", TOK_MAX_SPLITS);
    if (!cJSON_IsString(re) && !cJSON_IsString(lit))
        return lerr(AFD_ERR_FORMAT, "Split.pattern must be {\"Regex\": ...} or {\"String\": ...}");
    if (!cJSON_IsString(beh) ||
        (strcmp(beh->valuestring, "Isolated") && strcmp(beh->valuestring, "Removed")))
        return lerr(AFD_ERR_UNSUPPORTED, "Split.behavior '%s' is not supported (Isolated, Removed)",
                    cJSON_IsString(beh) ? beh->valuestring : "?");
    if (!is_null_or_false(inv)) return lerr(AFD_ERR_UNSUPPORTED, "Split.invert is not supported");
    const char *src = cJSON_IsString(re) ? re->valuestring : lit->valuestring;
    uint32_t flags = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
    if (!cJSON_IsString(re)) flags |= PCRE2_LITERAL;
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)src, PCRE2_ZERO_TERMINATED, flags, &ec, &eo, NULL);
    if (!code) {
        PCRE2_UCHAR m[256];
        pcre2_get_error_message(ec, m, sizeof(m));
        return lerr(AFD_ERR_FORMAT, "Split regex /%.80s/ at offset %zu: %s", src, (size_t)eo,
                    (char *)m);
    }
    /* JIT when this build of PCRE2 has it; the interpreter otherwise */
    t->split[t->nsplit].jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    t->split[t->nsplit].code = code;
    t->split[t->nsplit].removed = !strcmp(beh->valuestring, "Removed");
    t->nsplit++;
    return AFD_OK;
}

static afd_status_t load_pretok(tok_t *t, const cJSON *p, int depth)
{
    if (!p || cJSON_IsNull(p))
        return lerr(AFD_ERR_UNSUPPORTED, "pre_tokenizer null: a byte-level BPE needs one");
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(p, "type");
    if (!cJSON_IsString(ty)) return lerr(AFD_ERR_FORMAT, "pre_tokenizer without a type");
    if (!strcmp(ty->valuestring, "Sequence") && depth == 0) {
        const cJSON *e, *l = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(l)) return lerr(AFD_ERR_FORMAT, "Sequence.pretokenizers must be a list");
        cJSON_ArrayForEach(e, l)
        {
            afd_status_t st = load_pretok(t, e, 1);
            if (st) return st;
        }
        return AFD_OK;
    }
    if (!strcmp(ty->valuestring, "Split")) {
        if (t->bytelevel)
            return lerr(AFD_ERR_UNSUPPORTED, "a Split after ByteLevel is not supported");
        return add_split(t, p);
    }
    if (!strcmp(ty->valuestring, "ByteLevel")) {
        const cJSON *ur = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
        const cJSON *aps = cJSON_GetObjectItemCaseSensitive(p, "add_prefix_space");
        if (!is_null_or_false(aps))
            return lerr(AFD_ERR_UNSUPPORTED, "ByteLevel.add_prefix_space true is not supported");
        if (!cJSON_IsFalse(ur))
            return lerr(AFD_ERR_UNSUPPORTED,
                        "ByteLevel.use_regex must be false (give the split as Split regexes)");
        t->bytelevel = 1;
        return AFD_OK;
    }
    return lerr(AFD_ERR_UNSUPPORTED, "pre_tokenizer type '%s' is not supported", ty->valuestring);
}

static afd_status_t load_normalizer(const cJSON *n)
{
    if (!n || cJSON_IsNull(n)) return AFD_OK;
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(n, "type");
    const cJSON *l = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
    if (cJSON_IsString(ty) && !strcmp(ty->valuestring, "Sequence") && cJSON_IsArray(l) &&
        cJSON_GetArraySize(l) == 0)
        return AFD_OK; /* an empty sequence changes nothing */
    return lerr(AFD_ERR_UNSUPPORTED, "normalizer '%s' is not supported (only none)",
                cJSON_IsString(ty) ? ty->valuestring : "?");
}

static int32_t trie_child(const tok_t *t, int32_t node, unsigned char b)
{
    uint64_t key = ((uint64_t)(node + 1) << 8) | b;
    for (size_t i = tok_hash(&key, 8) & t->tmask;; i = (i + 1) & t->tmask) {
        if (!t->trie[i].key) return -1;
        if (t->trie[i].key == key) return t->trie[i].child;
    }
}

static afd_status_t trie_build(tok_t *t)
{
    size_t total = 1;
    for (size_t i = 0; i < t->nadded; i++)
        total += t->added[i].len;
    size_t cap = 16;
    while (cap < total * 2)
        cap *= 2;
    t->trie = calloc(cap, sizeof(*t->trie));
    t->term = malloc(total * sizeof(*t->term));
    if (!t->trie || !t->term) return AFD_ERR_NOMEM;
    t->tmask = cap - 1;
    t->ntrie = 1;
    t->term[0] = -1;
    for (size_t i = 0; i < t->nadded; i++) {
        const unsigned char *c = (const unsigned char *)t->added[i].content;
        int32_t node = 0;
        t->first[c[0]] = 1;
        for (size_t k = 0; k < t->added[i].len; k++) {
            int32_t ch = trie_child(t, node, c[k]);
            if (ch < 0) {
                uint64_t key = ((uint64_t)(node + 1) << 8) | c[k];
                size_t h = tok_hash(&key, 8) & t->tmask;
                while (t->trie[h].key)
                    h = (h + 1) & t->tmask;
                ch = t->ntrie++;
                t->trie[h].key = key;
                t->trie[h].child = ch;
                t->term[ch] = -1;
            }
            node = ch;
        }
        if (t->term[node] < 0) t->term[node] = (int32_t)i; /* a repeated content: the first */
    }
    return AFD_OK;
}

static afd_status_t load_added(tok_t *t, const cJSON *l)
{
    if (!l || cJSON_IsNull(l)) return AFD_OK;
    if (!cJSON_IsArray(l)) return lerr(AFD_ERR_FORMAT, "added_tokens must be a list");
    int n = cJSON_GetArraySize(l);
    t->added = calloc((size_t)n + 1, sizeof(*t->added));
    if (!t->added) return AFD_ERR_NOMEM;
    const cJSON *e;
    cJSON_ArrayForEach(e, l)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_VOCAB ||
            !cJSON_IsString(c) || !c->valuestring[0] ||
            strlen(c->valuestring) > TOK_MAX_TOKEN_BYTES)
            return lerr(AFD_ERR_FORMAT,
                        "added_tokens[%zu] needs an id in [0, %d) and a content "
                        "of 1..%d bytes",
                        t->nadded, TOK_MAX_VOCAB, TOK_MAX_TOKEN_BYTES);
        static const char *flags[] = {"single_word", "lstrip", "rstrip"};
        for (int k = 0; k < 3; k++)
            if (!is_null_or_false(cJSON_GetObjectItemCaseSensitive(e, flags[k])))
                return lerr(AFD_ERR_UNSUPPORTED, "added token '%s': %s is not supported",
                            c->valuestring, flags[k]);
        tok_added_t *a = &t->added[t->nadded++];
        a->id = (int32_t)id->valuedouble;
        a->content = strdup(c->valuestring);
        if (!a->content) return AFD_ERR_NOMEM;
        a->len = strlen(a->content);
        a->special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "special"));
        if (a->id + 1 > t->nvocab) t->nvocab = a->id + 1;
    }
    return AFD_OK;
}

static afd_status_t load_model(tok_t *t, const cJSON *m, const cJSON *added)
{
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(m, "type");
    if (!cJSON_IsObject(m) || (ty && !(cJSON_IsString(ty) && !strcmp(ty->valuestring, "BPE"))))
        return lerr(AFD_ERR_UNSUPPORTED, "model type '%s' is not supported (only BPE)",
                    cJSON_IsString(ty) ? ty->valuestring : "?");
    if (!is_null_or_false(cJSON_GetObjectItemCaseSensitive(m, "byte_fallback")))
        return lerr(AFD_ERR_UNSUPPORTED, "BPE.byte_fallback is not supported");
    const cJSON *dr = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dr && !cJSON_IsNull(dr) && !(cJSON_IsNumber(dr) && dr->valuedouble == 0))
        return lerr(AFD_ERR_UNSUPPORTED, "BPE.dropout is not supported");
    static const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, affix[k]);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
            return lerr(AFD_ERR_UNSUPPORTED, "BPE.%s is not supported", affix[k]);
    }
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "ignore_merges"));
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsObject(vocab)) return lerr(AFD_ERR_FORMAT, "model.vocab must be an object");
    if (!cJSON_IsArray(merges)) return lerr(AFD_ERR_FORMAT, "model.merges must be a list");
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= TOK_MAX_VOCAB ||
            e->valuedouble != (double)(int32_t)e->valuedouble)
            return lerr(AFD_ERR_FORMAT, "vocab['%.64s'] must be an id in [0, %d)", e->string,
                        TOK_MAX_VOCAB);
        if (strlen(e->string) > TOK_MAX_TOKEN_BYTES)
            return lerr(AFD_ERR_RANGE, "vocab entry longer than %d bytes", TOK_MAX_TOKEN_BYTES);
        if ((int)e->valuedouble + 1 > t->nvocab) t->nvocab = (int)e->valuedouble + 1;
    }
    afd_status_t st = load_added(t, added);
    if (st) return st;
    size_t nv = (size_t)t->nvocab;
    t->off = calloc(nv, sizeof(*t->off));
    t->len = calloc(nv, sizeof(*t->len));
    t->flags = calloc(nv, 1);
    size_t hcap = 16;
    while (hcap < nv * 2)
        hcap *= 2;
    t->vhash = malloc(hcap * sizeof(*t->vhash));
    if (!t->off || !t->len || !t->flags || !t->vhash) return AFD_ERR_NOMEM;
    memset(t->vhash, 0xff, hcap * sizeof(*t->vhash));
    t->vmask = hcap - 1;
    char tmp[TOK_MAX_TOKEN_BYTES];
    cJSON_ArrayForEach(e, vocab)
    {
        int32_t id = (int32_t)e->valuedouble;
        if (t->flags[id] & TOK_F_PRESENT)
            return lerr(AFD_ERR_FORMAT, "vocab id %d appears twice", id);
        size_t n = token_bytes(t, e->string, strlen(e->string), tmp);
        if ((st = arena_add(t, id, tmp, n))) return st;
        t->flags[id] |= TOK_F_PRESENT | TOK_F_VOCAB;
    }
    for (int32_t id = 0; id < t->nvocab; id++)
        if (t->flags[id] & TOK_F_VOCAB) vhash_insert(t, id);
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = lookup_bytes(t, &c, 1);
        if (t->byte_id[b] < 0)
            return lerr(AFD_ERR_FORMAT, "the vocabulary lacks the byte-level token of byte 0x%02x",
                        b);
    }
    /* added tokens: their content decodes as the ByteLevel decoder would */
    for (size_t i = 0; i < t->nadded; i++) {
        tok_added_t *a = &t->added[i];
        size_t n = token_bytes(t, a->content, a->len, tmp);
        if ((st = arena_add(t, a->id, tmp, n))) return st;
        t->flags[a->id] |= TOK_F_PRESENT | (a->special ? TOK_F_SPECIAL : 0);
    }
    size_t nm = (size_t)cJSON_GetArraySize(merges);
    if (nm >= (size_t)TOK_MAX_VOCAB)
        return lerr(AFD_ERR_RANGE, "more than %d merges", TOK_MAX_VOCAB);
    hcap = 16;
    while (hcap < nm * 2)
        hcap *= 2;
    t->merges = malloc(hcap * sizeof(*t->merges));
    if (!t->merges) return AFD_ERR_NOMEM;
    for (size_t i = 0; i < hcap; i++)
        t->merges[i].rank = -1;
    t->mmask = hcap - 1;
    int32_t rank = 0;
    char pa[TOK_MAX_TOKEN_BYTES * 2], pb[TOK_MAX_TOKEN_BYTES];
    cJSON_ArrayForEach(e, merges)
    {
        const char *a, *b;
        size_t la, lb;
        char *sp;
        if (cJSON_IsString(e) && (sp = strchr(e->valuestring, ' ')) && !strchr(sp + 1, ' ')) {
            a = e->valuestring, la = (size_t)(sp - a), b = sp + 1, lb = strlen(b);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            a = cJSON_GetArrayItem(e, 0)->valuestring, la = strlen(a);
            b = cJSON_GetArrayItem(e, 1)->valuestring, lb = strlen(b);
        } else
            return lerr(AFD_ERR_FORMAT, "merges[%d] must be \"A B\" or [\"A\", \"B\"]", rank);
        if (la > TOK_MAX_TOKEN_BYTES || lb > TOK_MAX_TOKEN_BYTES)
            return lerr(AFD_ERR_RANGE, "merges[%d] too long", rank);
        size_t na = token_bytes(t, a, la, pa), nb = token_bytes(t, b, lb, pb);
        int32_t ia = lookup_bytes(t, pa, na), ib = lookup_bytes(t, pb, nb);
        memcpy(pa + na, pb, nb);
        int32_t ir = lookup_bytes(t, pa, na + nb);
        if (ia < 0 || ib < 0 || ir < 0)
            return lerr(AFD_ERR_FORMAT,
                        "merges[%d] (%.*s %.*s) names a token not in the vocabulary", rank,
                        (int)(la > 40 ? 40 : la), a, (int)(lb > 40 ? 40 : lb), b);
        if ((st = merge_insert(t, ia, ib, rank, ir))) return st;
        rank++;
    }
    return trie_build(t);
}

afd_status_t tok_load_json(const char *text, size_t len, tok_t **out)
{
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root) return lerr(AFD_ERR_FORMAT, "not valid JSON");
    tok_t *t = calloc(1, sizeof(*t));
    afd_status_t st = AFD_ERR_NOMEM;
    if (!t) goto err_json;
    bytelevel_init(t->b2c, t->c2b);
    const cJSON *post = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
    (void)post; /* special tokens are added by the chat template, never by encode */
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    const cJSON *dty = cJSON_GetObjectItemCaseSensitive(dec, "type");
    if (!(cJSON_IsString(dty) && !strcmp(dty->valuestring, "ByteLevel"))) {
        st = lerr(AFD_ERR_UNSUPPORTED, "decoder must be ByteLevel");
        goto err_tok;
    }
    if ((st = load_normalizer(cJSON_GetObjectItemCaseSensitive(root, "normalizer"))) ||
        (st = load_pretok(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0)))
        goto err_tok;
    if (!t->bytelevel) {
        st = lerr(AFD_ERR_UNSUPPORTED, "the pre_tokenizer has no ByteLevel step");
        goto err_tok;
    }
    if ((st = load_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"),
                         cJSON_GetObjectItemCaseSensitive(root, "added_tokens"))))
        goto err_tok;
    t->md = pcre2_match_data_create(8, NULL);
    t->cache = calloc(CACHE_SLOTS, sizeof(*t->cache));
    if (!t->md || !t->cache) {
        st = AFD_ERR_NOMEM;
        goto err_tok;
    }
    cJSON_Delete(root);
    *out = t;
    return AFD_OK;
err_tok:
    tok_free(t);
err_json:
    cJSON_Delete(root);
    return st;
}

afd_status_t tok_load(const char *path, tok_t **out)
{
    char *text;
    size_t len;
    afd_status_t st = afd_read_file(path, TOK_MAX_FILE, &text, &len);
    if (st) return st;
    st = tok_load_json(text, len, out);
    free(text);
    if (st) afd_error("%s: cannot load the tokenizer: %s", path, afd_status_str(st));
    return st;
}

void tok_free(tok_t *t)
{
    if (!t) return;
    for (int i = 0; i < t->nsplit; i++)
        pcre2_code_free(t->split[i].code);
    if (t->md) pcre2_match_data_free(t->md);
    for (size_t i = 0; i < t->nadded; i++)
        free(t->added[i].content);
    if (t->cache)
        for (size_t i = 0; i < CACHE_SLOTS; i++)
            free(t->cache[i].key);
    free(t->cache);
    free(t->added);
    free(t->trie);
    free(t->term);
    free(t->arena);
    free(t->off);
    free(t->len);
    free(t->flags);
    free(t->vhash);
    free(t->merges);
    free(t->pieces[0]);
    free(t->pieces[1]);
    free(t);
}

int tok_vocab_size(const tok_t *t)
{
    return t->nvocab;
}

int32_t tok_token_id(const tok_t *t, const char *token)
{
    size_t n = strlen(token);
    for (size_t i = 0; i < t->nadded; i++)
        if (t->added[i].len == n && !memcmp(t->added[i].content, token, n)) return t->added[i].id;
    if (n > TOK_MAX_TOKEN_BYTES) return -1;
    char tmp[TOK_MAX_TOKEN_BYTES];
    size_t k = token_bytes(t, token, n, tmp);
    return lookup_bytes(t, tmp, k);
}

int tok_is_special(const tok_t *t, int32_t id)
{
    return id >= 0 && id < t->nvocab && (t->flags[id] & TOK_F_SPECIAL);
}

/* ---- encode ---- */

typedef struct heap_ent {
    int32_t rank, pos;
} heap_ent_t;

static int he_less(heap_ent_t a, heap_ent_t b)
{
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(heap_ent_t *h, size_t *n, heap_ent_t e)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!he_less(e, h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static heap_ent_t heap_pop(heap_ent_t *h, size_t *n)
{
    heap_ent_t top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        heap_ent_t best = last;
        if (l < *n && he_less(h[l], best)) m = l, best = h[l];
        if (r < *n && he_less(h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

/* Merges the bytes of one piece by rank and appends the ids. */
static afd_status_t bpe_word(tok_t *t, const unsigned char *w, size_t n, tok_ids_t *out)
{
    if (n == 1) return ids_push(out, t->byte_id[w[0]]);
    if (t->ignore_merges) {
        int32_t id = lookup_bytes(t, (const char *)w, n);
        if (id >= 0) return ids_push(out, id);
    }
    enum { STACK = 256 };
    int32_t sid[STACK], snext[STACK], sprev[STACK];
    heap_ent_t sheap[3 * STACK];
    int32_t *id = sid, *next = snext, *prev = sprev;
    heap_ent_t *heap = sheap;
    void *blk = NULL;
    if (n > STACK) {
        if (n > (size_t)INT32_MAX / 2) return AFD_ERR_RANGE;
        blk = malloc(n * (3 * sizeof(int32_t) + 3 * sizeof(heap_ent_t)));
        if (!blk) return AFD_ERR_NOMEM;
        heap = blk;
        id = (int32_t *)(heap + 3 * n);
        next = id + n;
        prev = next + n;
    }
    size_t nh = 0;
    for (size_t i = 0; i < n; i++) {
        id[i] = t->byte_id[w[i]];
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        prev[i] = (int32_t)i - 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        const tok_merge_t *m = merge_find(t, id[i], id[i + 1]);
        if (m) heap_push(heap, &nh, (heap_ent_t){m->rank, (int32_t)i});
    }
    while (nh) {
        heap_ent_t e = heap_pop(heap, &nh);
        int32_t p = e.pos, q = next[p];
        if (id[p] < 0 || q < 0) continue;
        const tok_merge_t *m = merge_find(t, id[p], id[q]);
        if (!m || m->rank != e.rank) continue; /* stale: a side changed since the push */
        id[p] = m->res;
        id[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        if (prev[p] >= 0 && (m = merge_find(t, id[prev[p]], id[p])))
            heap_push(heap, &nh, (heap_ent_t){m->rank, prev[p]});
        if (next[p] >= 0 && (m = merge_find(t, id[p], id[next[p]])))
            heap_push(heap, &nh, (heap_ent_t){m->rank, p});
    }
    afd_status_t st = AFD_OK;
    for (int32_t i = 0; i >= 0 && !st; i = next[i])
        st = ids_push(out, id[i]);
    free(blk);
    return st;
}

static afd_status_t bpe_cached(tok_t *t, const unsigned char *w, size_t n, tok_ids_t *out)
{
    if (n > CACHE_MAX_WORD || n == 1) return bpe_word(t, w, n, out);
    uint64_t h = tok_hash(w, n);
    tok_cache_t *c = &t->cache[h & (CACHE_SLOTS - 1)];
    if (c->key && c->klen == n && !memcmp(c->key, w, n)) {
        for (size_t i = 0; i < c->nids; i++)
            if (ids_push(out, c->ids[i])) return AFD_ERR_NOMEM;
        t->cache_hits++;
        return AFD_OK;
    }
    size_t start = out->n;
    afd_status_t st = bpe_word(t, w, n, out);
    if (st) return st;
    size_t nids = out->n - start;
    /* one block: the key then the ids (n bytes rounded up to 4) */
    size_t kal = (n + 3) & ~(size_t)3;
    char *blk = realloc(c->key, kal + nids * sizeof(int32_t));
    if (!blk) return AFD_OK; /* the cache is an optimisation only */
    memcpy(blk, w, n);
    memcpy(blk + kal, out->v + start, nids * sizeof(int32_t));
    c->key = blk;
    c->klen = (uint32_t)n;
    c->ids = (int32_t *)(void *)(blk + kal);
    c->nids = (uint32_t)nids;
    return AFD_OK;
}

static afd_status_t pieces_reserve(tok_t *t, int k, size_t n)
{
    if (n <= t->pcap[k]) return AFD_OK;
    size_t cap = t->pcap[k] ? t->pcap[k] : 256;
    while (cap < n)
        cap *= 2;
    tok_piece_t *p = realloc(t->pieces[k], cap * sizeof(*p));
    if (!p) return AFD_ERR_NOMEM;
    t->pieces[k] = p;
    t->pcap[k] = cap;
    return AFD_OK;
}

#define PUSH_PIECE(k, n, o, l)                                                                     \
    do {                                                                                           \
        if (pieces_reserve(t, k, (n) + 1)) return AFD_ERR_NOMEM;                                   \
        t->pieces[k][(n)++] = (tok_piece_t){(o), (l)};                                             \
    } while (0)

afd_status_t tok_pretokenize(tok_t *t, const char *text, size_t len, size_t *npieces)
{
    size_t n = 0;
    int cur = 0;
    if (len) PUSH_PIECE(0, n, 0, len);
    for (int s = 0; s < t->nsplit; s++) {
        int nx = cur ^ 1;
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            tok_piece_t pc = t->pieces[cur][i];
            const char *sub = text + pc.off;
            size_t last = 0, at = 0;
            while (at <= pc.len) {
                int rc = t->split[s].jit ? pcre2_jit_match(t->split[s].code, (PCRE2_SPTR)sub,
                                                           pc.len, at, 0, t->md, NULL)
                                         : pcre2_match(t->split[s].code, (PCRE2_SPTR)sub, pc.len,
                                                       at, 0, t->md, NULL);
                if (rc < 0) break; /* no match (or a limit): the rest is one gap */
                PCRE2_SIZE *ov = pcre2_get_ovector_pointer(t->md);
                size_t ms = ov[0], me = ov[1];
                if (me == ms) { /* empty match: produces nothing, move one character on */
                    at = ms + 1;
                    while (at < pc.len && ((unsigned char)sub[at] & 0xC0) == 0x80)
                        at++;
                    continue;
                }
                if (ms > last) PUSH_PIECE(nx, m, pc.off + last, ms - last);
                if (!t->split[s].removed) PUSH_PIECE(nx, m, pc.off + ms, me - ms);
                last = at = me;
            }
            if (last < pc.len) PUSH_PIECE(nx, m, pc.off + last, pc.len - last);
        }
        cur = nx;
        n = m;
    }
    t->cur = cur;
    *npieces = n;
    return AFD_OK;
}

/* Encodes a segment with no added token in it. */
static afd_status_t encode_plain(tok_t *t, const char *text, size_t len, tok_ids_t *out)
{
    size_t n;
    afd_status_t st = tok_pretokenize(t, text, len, &n);
    if (st) return st;
    const tok_piece_t *p = t->pieces[t->cur];
    for (size_t i = 0; i < n && !st; i++)
        st = bpe_cached(t, (const unsigned char *)text + p[i].off, p[i].len, out);
    return st;
}

afd_status_t tok_encode(tok_t *t, const char *text, size_t len, tok_ids_t *out)
{
    size_t seg = 0, i = 0;
    afd_status_t st;
    if (!t->nadded) return encode_plain(t, text, len, out);
    const unsigned char *u = (const unsigned char *)text;
    while (i < len) {
        if (!t->first[u[i]]) {
            i++;
            continue;
        }
        /* the longest added token starting here */
        int32_t node = 0, hit = -1;
        size_t hlen = 0;
        for (size_t k = i; k < len && (node = trie_child(t, node, u[k])) >= 0; k++)
            if (t->term[node] >= 0) hit = t->term[node], hlen = k + 1 - i;
        if (hit < 0) {
            i++;
            continue;
        }
        if (i > seg && (st = encode_plain(t, text + seg, i - seg, out))) return st;
        if ((st = ids_push(out, t->added[hit].id))) return st;
        i += hlen;
        seg = i;
    }
    return seg < len ? encode_plain(t, text + seg, len - seg, out) : AFD_OK;
}

/* ---- decode ---- */

afd_status_t tok_decode(const tok_t *t, const int32_t *ids, size_t n, int skip_special,
                        tok_buf_t *out)
{
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->nvocab || !(t->flags[id] & TOK_F_PRESENT)) return AFD_ERR_RANGE;
        if (skip_special && (t->flags[id] & TOK_F_SPECIAL)) continue;
        if (tok_buf_add(out, t->arena + t->off[id], t->len[id])) return AFD_ERR_NOMEM;
    }
    if (!out->p && tok_buf_add(out, "", 0)) return AFD_ERR_NOMEM;
    return AFD_OK;
}

size_t tok_token_text(const tok_t *t, int32_t id, const char **p)
{
    if (id < 0 || id >= t->nvocab || !(t->flags[id] & TOK_F_PRESENT)) return 0;
    *p = t->arena + t->off[id];
    return t->len[id];
}

/* byte-level spelling of raw bytes (as vocab keys are written) */
size_t tok_bytelevel_spell(const tok_t *t, const char *b, size_t n, char *o)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += utf8_put(t->b2c[(unsigned char)b[i]], o + k);
    return k;
}

afd_status_t tok_pretok_from_json(const cJSON *pretok, tok_t **out)
{
    tok_t *t = calloc(1, sizeof(*t));
    if (!t) return AFD_ERR_NOMEM;
    bytelevel_init(t->b2c, t->c2b);
    afd_status_t st = load_pretok(t, pretok, 0);
    if (!st && !(t->md = pcre2_match_data_create(8, NULL))) st = AFD_ERR_NOMEM;
    if (st) {
        tok_free(t);
        return st;
    }
    *out = t;
    return AFD_OK;
}
