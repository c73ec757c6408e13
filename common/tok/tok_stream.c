/*
 * tok_stream: incremental detokenization for streamed answers. Bytes of an incomplete
 * UTF-8 sequence are held back until the token that completes them arrives (an invalid
 * sequence becomes U+FFFD), and text that could be the start of a stop string is held
 * back until it is known not to be one; a stop string cuts the text before it.
 */
#define _GNU_SOURCE
#include "tok_int.h"

#include <stdlib.h>
#include <string.h>

afd_status_t tok_stream_init(tok_stream_t *s, const tok_t *t, const char *const *stops,
                             size_t nstop, int skip_special)
{
    memset(s, 0, sizeof(*s));
    s->matched = -1;
    s->t = t;
    s->skip_special = skip_special;
    if (nstop > TOK_MAX_STOPS) return AFD_ERR_RANGE;
    for (size_t i = 0; i < nstop; i++) {
        size_t n = strlen(stops[i]);
        if (n == 0 || n > TOK_MAX_STOP_LEN) {
            tok_stream_fini(s);
            return AFD_ERR_RANGE;
        }
        if (!(s->stops[i] = strdup(stops[i]))) {
            tok_stream_fini(s);
            return AFD_ERR_NOMEM;
        }
        s->stop_len[i] = n;
        s->nstop = i + 1;
        if (n > s->max_stop) s->max_stop = n;
    }
    if (tok_buf_add(&s->text, "", 0)) {
        tok_stream_fini(s);
        return AFD_ERR_NOMEM;
    }
    return AFD_OK;
}

void tok_stream_fini(tok_stream_t *s)
{
    for (size_t i = 0; i < s->nstop; i++)
        free(s->stops[i]);
    tok_buf_free(&s->text);
    memset(s, 0, sizeof(*s));
}

/* After text grew from old bytes: cut at the earliest stop string, else return how many
 * bytes at the end must be held back as a possible start of one. */
static size_t check_stops(tok_stream_t *s, size_t old)
{
    const char *p = s->text.p;
    size_t n = s->text.len, best = n;
    int which = -1;
    for (size_t k = 0; k < s->nstop; k++) {
        size_t sl = s->stop_len[k];
        size_t from = old >= sl - 1 ? old - (sl - 1) : 0;
        if (from < s->emitted) from = s->emitted;
        for (size_t i = from; i + sl <= n && i < best; i++)
            if (p[i] == s->stops[k][0] && !memcmp(p + i, s->stops[k], sl)) {
                best = i;
                which = (int)k;
                break;
            }
    }
    if (best < n) {
        s->text.len = best;
        s->text.p[best] = 0;
        s->stopped = 1;
        s->matched = which;
        return 0;
    }
    size_t hold = 0;
    for (size_t k = 0; k < s->nstop; k++) {
        size_t sl = s->stop_len[k];
        for (size_t h = sl - 1; h > hold; h--)
            if (h <= n - s->emitted && p[n - 1] == s->stops[k][h - 1] &&
                !memcmp(p + n - h, s->stops[k], h)) {
                hold = h;
                break;
            }
    }
    return hold;
}

static afd_status_t add_bytes(tok_stream_t *s, const char *b, size_t n, const char **delta,
                              size_t *dlen, int final)
{
    *delta = s->text.p + s->emitted;
    *dlen = 0;
    if (s->stopped) return AFD_OK;
    size_t old = s->text.len;
    /* the held bytes and the new ones, cleaned up to an incomplete tail */
    char tmp[8 + 64];
    const char *src = b;
    size_t len = n;
    char *heap = NULL;
    if (s->nraw) {
        if (s->nraw + n <= sizeof(tmp)) {
            src = tmp;
        } else if (!(heap = malloc(s->nraw + n))) {
            return AFD_ERR_NOMEM;
        } else {
            src = heap;
        }
        memcpy((char *)src, s->raw, s->nraw);
        memcpy((char *)src + s->nraw, b, n);
        len = s->nraw + n;
        s->nraw = 0;
    }
    size_t i = 0;
    afd_status_t st = AFD_OK;
    while (i < len && !st) {
        int bad;
        size_t k = tok_utf8_valid_prefix(src + i, len - i, &bad);
        st = tok_buf_add(&s->text, src + i, k);
        i += k;
        if (i == len) break;
        if (!bad && !final && len - i < sizeof(s->raw)) { /* incomplete: wait for more */
            memcpy(s->raw, src + i, len - i);
            s->nraw = len - i;
            break;
        }
        if (!st) st = tok_buf_add(&s->text, "\xEF\xBF\xBD", 3);
        i += tok_utf8_bad_len(src + i, len - i);
    }
    free(heap);
    if (st) return st;
    size_t hold = s->nstop ? check_stops(s, old) : 0;
    if (final && !s->stopped) hold = 0;
    size_t upto = s->text.len - hold;
    if (upto < s->emitted) upto = s->emitted;
    *delta = s->text.p + s->emitted;
    *dlen = upto - s->emitted;
    s->emitted = upto;
    return AFD_OK;
}

afd_status_t tok_stream_push(tok_stream_t *s, int32_t id, const char **delta, size_t *dlen)
{
    const char *p = "";
    size_t n = 0;
    if (!(s->skip_special && tok_is_special(s->t, id))) {
        n = tok_token_text(s->t, id, &p);
        if (!n && !(id >= 0 && id < s->t->nvocab)) return AFD_ERR_RANGE;
    }
    return add_bytes(s, p, n, delta, dlen, 0);
}

afd_status_t tok_stream_flush(tok_stream_t *s, const char **delta, size_t *dlen)
{
    return add_bytes(s, "", 0, delta, dlen, 1);
}
