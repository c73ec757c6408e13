/*
 * tok_train: a small byte-level BPE trainer. The text is split with the DeepSeek-V3
 * pre-tokenizer, distinct words are counted, then the most frequent adjacent pair (ties:
 * the smaller pair of ids) is merged until the vocabulary is full or no pair is left. The
 * result is written as a tokenizer.json of the DeepSeek-V3 shape.
 */
#define _GNU_SOURCE
#include "tok_int.h"
#include "afd_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct tr_word {
    int32_t *sym;
    int n;
    long count;
} tr_word_t;

typedef struct tr_pair {
    uint64_t key; /* 0: empty (pairs of id 0 never occur: id 0 is a special token) */
    long count;
} tr_pair_t;

typedef struct tr_tok {
    char *b; /* bytes */
    size_t n;
} tr_tok_t;

static cJSON *pretok_json(void)
{
    cJSON *p = cJSON_CreateObject(), *l;
    cJSON_AddStringToObject(p, "type", "Sequence");
    l = cJSON_AddArrayToObject(p, "pretokenizers");
    for (int i = 0; i < 3; i++) {
        cJSON *s = cJSON_CreateObject();
        cJSON_AddStringToObject(s, "type", "Split");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(s, "pattern"), "Regex",
                                tok_deepseek_patterns[i]);
        cJSON_AddStringToObject(s, "behavior", "Isolated");
        cJSON_AddFalseToObject(s, "invert");
        cJSON_AddItemToArray(l, s);
    }
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "ByteLevel");
    cJSON_AddFalseToObject(b, "add_prefix_space");
    cJSON_AddTrueToObject(b, "trim_offsets");
    cJSON_AddFalseToObject(b, "use_regex");
    cJSON_AddItemToArray(l, b);
    return p;
}

static cJSON *bytelevel_json(int trim)
{
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "type", "ByteLevel");
    cJSON_AddTrueToObject(d, "add_prefix_space");
    cJSON_AddBoolToObject(d, "trim_offsets", trim);
    cJSON_AddTrueToObject(d, "use_regex");
    return d;
}

/* the spelling of a token's bytes in the file */
static char *spell(const tok_t *pt, const tr_tok_t *k)
{
    char *o = malloc(k->n * 2 + 1);
    if (!o) return NULL;
    size_t n = tok_bytelevel_spell(pt, k->b, k->n, o);
    o[n] = 0;
    return o;
}

afd_status_t tok_train_write(const char *text, size_t len, int vocab_size,
                             const tok_special_t *specials, int nspecial, const char *path,
                             int *nmerges)
{
    if (nspecial < 1 || vocab_size < nspecial + 256 || vocab_size > TOK_MAX_VOCAB) {
        afd_error("tokenizer: vocab_size %d has no room for %d special tokens and 256 bytes",
                  vocab_size, nspecial);
        return AFD_ERR_RANGE;
    }
    cJSON *pj = pretok_json();
    tok_t *pt = NULL;
    afd_status_t st = tok_pretok_from_json(pj, &pt);
    if (st) {
        cJSON_Delete(pj);
        return st;
    }
    size_t np;
    tr_word_t *words = NULL;
    tr_tok_t *toks = calloc((size_t)vocab_size, sizeof(*toks));
    tr_pair_t *pairs = NULL;
    char **mstr = NULL;
    size_t nw = 0, wcap = 1024;
    int ntok = nspecial + 256, nm = 0;
    cJSON *root = NULL;
    st = AFD_ERR_NOMEM;
    if (!toks || !(words = calloc(wcap, sizeof(*words)))) goto out;
    if ((st = tok_pretokenize(pt, text, len, &np))) goto out;
    st = AFD_ERR_NOMEM;
    for (int b = 0; b < 256; b++) {
        if (!(toks[nspecial + b].b = malloc(1))) goto out;
        toks[nspecial + b].b[0] = (char)b;
        toks[nspecial + b].n = 1;
    }
    /* distinct words and their counts (a linear probe over a hash of the bytes) */
    {
        size_t hcap = 16;
        while (hcap < np * 2)
            hcap *= 2;
        int32_t *wh = malloc(hcap * sizeof(*wh));
        if (!wh) goto out;
        memset(wh, 0xff, hcap * sizeof(*wh));
        const tok_piece_t *p = pt->pieces[pt->cur];
        for (size_t i = 0; i < np; i++) {
            const unsigned char *w = (const unsigned char *)text + p[i].off;
            size_t h = tok_hash(w, p[i].len) & (hcap - 1);
            for (;; h = (h + 1) & (hcap - 1)) {
                int32_t k = wh[h];
                if (k < 0) break;
                if ((size_t)words[k].n == p[i].len) {
                    int same = 1;
                    for (size_t j = 0; j < p[i].len && same; j++)
                        same = words[k].sym[j] == nspecial + w[j];
                    if (same) break;
                }
            }
            if (wh[h] >= 0) {
                words[wh[h]].count++;
                continue;
            }
            if (nw == wcap) {
                tr_word_t *nwp = realloc(words, wcap * 2 * sizeof(*words));
                if (!nwp) {
                    free(wh);
                    goto out;
                }
                words = nwp, wcap *= 2;
            }
            tr_word_t *nwd = &words[nw];
            if (!(nwd->sym = malloc(p[i].len * sizeof(int32_t)))) {
                free(wh);
                goto out;
            }
            for (size_t j = 0; j < p[i].len; j++)
                nwd->sym[j] = nspecial + w[j];
            nwd->n = (int)p[i].len;
            nwd->count = 1;
            wh[h] = (int32_t)nw++;
        }
        free(wh);
    }
    size_t pcap = 1 << 16;
    pairs = malloc(pcap * sizeof(*pairs));
    mstr = calloc((size_t)vocab_size, sizeof(*mstr));
    if (!pairs || !mstr) goto out;
    while (ntok < vocab_size) {
        /* count the pairs */
        memset(pairs, 0, pcap * sizeof(*pairs));
        size_t used = 0;
        uint64_t best = 0;
        long bestc = 0;
        for (size_t i = 0; i < nw; i++)
            for (int j = 0; j + 1 < words[i].n; j++) {
                uint64_t key =
                    ((uint64_t)(uint32_t)words[i].sym[j] << 32) | (uint32_t)words[i].sym[j + 1];
                size_t h = tok_hash(&key, 8) & (pcap - 1);
                while (pairs[h].key && pairs[h].key != key)
                    h = (h + 1) & (pcap - 1);
                if (!pairs[h].key) {
                    pairs[h].key = key;
                    if (++used * 2 > pcap) { /* grow and start the count over */
                        tr_pair_t *np2 = realloc(pairs, pcap * 2 * sizeof(*pairs));
                        if (!np2) goto out;
                        pairs = np2, pcap *= 2;
                        i = (size_t)-1;
                        memset(pairs, 0, pcap * sizeof(*pairs));
                        used = 0, best = 0, bestc = 0;
                        break;
                    }
                }
                pairs[h].count += words[i].count;
                if (pairs[h].count > bestc || (pairs[h].count == bestc && key < best))
                    best = key, bestc = pairs[h].count;
            }
        if (!bestc) break; /* every word is one token */
        int32_t a = (int32_t)(best >> 32), b = (int32_t)(best & 0xffffffffu);
        tr_tok_t nt = {malloc(toks[a].n + toks[b].n), toks[a].n + toks[b].n};
        if (!nt.b) goto out;
        memcpy(nt.b, toks[a].b, toks[a].n);
        memcpy(nt.b + toks[a].n, toks[b].b, toks[b].n);
        int32_t res = -1;
        for (int k = nspecial; k < ntok && res < 0; k++)
            if (toks[k].n == nt.n && !memcmp(toks[k].b, nt.b, nt.n)) res = k;
        if (res < 0) {
            res = ntok;
            toks[ntok++] = nt;
        } else {
            free(nt.b);
        }
        char *sa = spell(pt, &toks[a]), *sb = spell(pt, &toks[b]);
        if (!sa || !sb || asprintf(&mstr[nm], "%s %s", sa, sb) < 0) {
            free(sa);
            free(sb);
            goto out;
        }
        free(sa);
        free(sb);
        nm++;
        for (size_t i = 0; i < nw; i++) {
            int o = 0;
            for (int j = 0; j < words[i].n; j++) {
                if (j + 1 < words[i].n && words[i].sym[j] == a && words[i].sym[j + 1] == b) {
                    words[i].sym[o++] = res;
                    j++;
                } else
                    words[i].sym[o++] = words[i].sym[j];
            }
            words[i].n = o;
        }
        if (nm >= vocab_size) break;
    }
    /* the file */
    root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddNullToObject(root, "truncation");
    cJSON_AddNullToObject(root, "padding");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    char ph[96];
    for (int i = 0; i < vocab_size; i++) {
        const char *content;
        int special = 1;
        if (i < nspecial) {
            content = specials[i].content;
            special = specials[i].special;
        } else if (i >= ntok) {
            snprintf(
                ph, sizeof(ph),
                "<\xEF\xBD\x9Cplace\xE2\x96\x81holder\xE2\x96\x81no\xE2\x96\x81%d\xEF\xBD\x9C>",
                i - ntok);
            content = ph;
        } else
            continue;
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", i);
        cJSON_AddStringToObject(a, "content", content);
        cJSON_AddFalseToObject(a, "single_word");
        cJSON_AddFalseToObject(a, "lstrip");
        cJSON_AddFalseToObject(a, "rstrip");
        cJSON_AddBoolToObject(a, "normalized", !special);
        cJSON_AddBoolToObject(a, "special", special);
        cJSON_AddItemToArray(added, a);
    }
    cJSON_AddNullToObject(root, "normalizer");
    cJSON_AddItemToObject(root, "pre_tokenizer", pj);
    pj = NULL;
    cJSON_AddItemToObject(root, "post_processor", bytelevel_json(0));
    cJSON_AddItemToObject(root, "decoder", bytelevel_json(1));
    cJSON *m = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(m, "type", "BPE");
    cJSON_AddNullToObject(m, "dropout");
    cJSON_AddNullToObject(m, "unk_token");
    cJSON_AddNullToObject(m, "continuing_subword_prefix");
    cJSON_AddNullToObject(m, "end_of_word_suffix");
    cJSON_AddFalseToObject(m, "fuse_unk");
    cJSON_AddFalseToObject(m, "byte_fallback");
    cJSON_AddFalseToObject(m, "ignore_merges");
    cJSON *v = cJSON_AddObjectToObject(m, "vocab");
    for (int i = 0; i < ntok; i++) {
        if (i < nspecial) {
            cJSON_AddNumberToObject(v, specials[i].content, i);
            continue;
        }
        char *s = spell(pt, &toks[i]);
        if (!s) goto out;
        cJSON_AddNumberToObject(v, s, i);
        free(s);
    }
    cJSON *ml = cJSON_AddArrayToObject(m, "merges");
    for (int i = 0; i < nm; i++)
        cJSON_AddItemToArray(ml, cJSON_CreateString(mstr[i]));
    char *txt = cJSON_Print(root);
    if (!txt) goto out;
    FILE *f = fopen(path, "w");
    st = AFD_OK;
    if (!f || fputs(txt, f) < 0 || fputc('\n', f) < 0) {
        afd_error("%s: %m", path);
        st = AFD_ERR_IO;
    }
    if (f && fclose(f)) st = AFD_ERR_IO;
    free(txt);
    if (!st && nmerges) *nmerges = nm;
out:
    cJSON_Delete(root);
    cJSON_Delete(pj);
    if (words)
        for (size_t i = 0; i < nw; i++)
            free(words[i].sym);
    free(words);
    if (toks)
        for (int i = 0; i < vocab_size; i++)
            free(toks[i].b);
    free(toks);
    if (mstr)
        for (int i = 0; i < nm; i++)
            free(mstr[i]);
    free(mstr);
    free(pairs);
    tok_free(pt);
    return st;
}
