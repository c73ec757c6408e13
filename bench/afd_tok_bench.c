/*
 * afd_tok_bench: tokenizer throughput. For a few kinds of text, each about --mb MB, it
 * prints encode MB/s and tokens/s (a first pass with an empty word cache, then the best
 * of --reps passes), decode MB/s and streaming-detokenizer MB/s (one token at a time, as
 * the coordinator runs it). Kinds: the bundled sample repeated (mixed prose, code, digits,
 * CJK, emoji), its ASCII prose lines, its code lines, its CJK lines, and "fresh": words
 * drawn at random from several alphabets so that few repeat (the word cache rarely hits).
 * The tokenizer is --tokenizer FILE, or one trained over the sample with --vocab ids.
 *
 *   afd_tok_bench [--tokenizer FILE | --vocab N] [--mb MB] [--reps N]
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "afd_opts.h"
#include "tok.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct bench_opts {
    char *tokenizer;
    long vocab, reps;
    double mb;
} bench_opts_t;

#define O(f) offsetof(bench_opts_t, f)
static const afd_opt_t bench_table[] = {
    {"tokenizer", AFD_OPT_STRING, NULL, O(tokenizer), 0, 0, AFD_OPT_NOENV,
     "tokenizer.json to measure (default: one trained over the bundled sample)"},
    {"vocab", AFD_OPT_INT, "8192", O(vocab), 300, 1 << 20, AFD_OPT_NOENV,
     "ids of the trained tokenizer"},
    {"mb", AFD_OPT_DOUBLE, "3", O(mb), 0.01, 1024, AFD_OPT_NOENV, "MB of text per kind"},
    {"reps", AFD_OPT_INT, "3", O(reps), 1, 100, AFD_OPT_NOENV, "timed passes after the first"},
    AFD_OPTS_END};
#undef O

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Repeats the sample's lines that pass keep() until n bytes. */
static int build_kind(tok_buf_t *out, size_t n, int (*keep)(const char *, size_t))
{
    size_t len;
    const char *s = tok_sample_text(&len);
    int any = 0;
    while (out->len < n) {
        for (const char *p = s; p < s + len;) {
            const char *e = memchr(p, '\n', (size_t)(s + len - p));
            size_t l = e ? (size_t)(e - p) + 1 : (size_t)(s + len - p);
            if (keep(p, l)) {
                if (tok_buf_add(out, p, l)) return -1;
                any = 1;
            }
            p += l;
        }
        if (!any) return -1;
    }
    return 0;
}

static int keep_all(const char *p, size_t n)
{
    (void)p;
    return n > 0;
}

static int keep_prose(const char *p, size_t n)
{
    if (n < 20 || p[0] == ' ') return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] >= 0x80) return 0;
    return 1;
}

static int keep_code(const char *p, size_t n)
{
    return n > 4 && !memcmp(p, "    ", 4);
}

static int keep_cjk(const char *p, size_t n)
{
    int cjk = 0;
    for (size_t i = 0; i + 2 < n; i++)
        cjk += (unsigned char)p[i] >= 0xE3 && (unsigned char)p[i] <= 0xED;
    return cjk > 5;
}

/* words from mixed alphabets, few repeating */
static int build_fresh(tok_buf_t *out, size_t n)
{
    static const char *const alpha[] = {"a", "b", "c",  "d",  "e",  "f",  "g",  "h", "i", "k",
                                        "l", "m", "n",  "o",  "p",  "r",  "s",  "t", "u", "w",
                                        "y", "z", "中", "文", "本", "日", "語", "é", "ß", "ж",
                                        "λ", "😀", "7",  "4",  "0",  ",",  ".",  "-"};
    uint64_t x = 0x9E3779B97F4A7C15ull;
    while (out->len < n) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int wl = 2 + (int)(x % 9);
        for (int k = 0; k < wl; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            const char *c = alpha[x % (sizeof(alpha) / sizeof(*alpha))];
            if (tok_buf_add(out, c, strlen(c))) return -1;
        }
        if (tok_buf_add(out, (x >> 20) % 11 ? " " : "\n", 1)) return -1;
    }
    return 0;
}

static void run_kind(tok_t *t, const char *name, const tok_buf_t *text, long reps)
{
    double mb = (double)text->len / 1e6;
    tok_ids_t ids = {0};
    double t0 = now_s();
    if (tok_encode(t, text->p, text->len, &ids)) {
        afd_error("%s: encode failed", name);
        return;
    }
    double cold = now_s() - t0, best = cold;
    for (long r = 0; r < reps; r++) {
        ids.n = 0;
        t0 = now_s();
        tok_encode(t, text->p, text->len, &ids);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    tok_buf_t out = {0};
    double dbest = 1e30;
    for (long r = 0; r < reps + 1; r++) {
        out.len = 0;
        t0 = now_s();
        tok_decode(t, ids.v, ids.n, 0, &out);
        double dt = now_s() - t0;
        if (dt < dbest) dbest = dt;
    }
    int same = out.len == text->len && !memcmp(out.p, text->p, text->len);
    tok_stream_t ts;
    const char *stops[] = {"<|EOT|>"};
    double sbest = 1e30;
    for (long r = 0; r < reps + 1; r++) {
        tok_stream_init(&ts, t, stops, 1, 1);
        t0 = now_s();
        const char *d;
        size_t dl;
        for (size_t i = 0; i < ids.n; i++)
            tok_stream_push(&ts, ids.v[i], &d, &dl);
        tok_stream_flush(&ts, &d, &dl);
        double dt = now_s() - t0;
        if (dt < sbest) sbest = dt;
        tok_stream_fini(&ts);
    }
    printf("%-7s %6.2f MB %9zu tok %5.2f B/tok | encode %7.1f MB/s cold %7.1f MB/s warm "
           "%6.2f Mtok/s | decode %7.1f MB/s | stream %6.1f MB/s | round trip %s\n",
           name, mb, ids.n, (double)text->len / (double)(ids.n ? ids.n : 1), mb / cold, mb / best,
           (double)ids.n / best / 1e6, mb / dbest, mb / sbest, same ? "exact" : "DIFFERS");
    tok_buf_free(&out);
    tok_ids_free(&ids);
}

int main(int argc, char **argv)
{
    afd_log_init("afd_tok_bench");
    bench_opts_t o = {0};
    int first;
    afd_status_t st = afd_opts_parse(bench_table, &o, argc, argv,
                                     "usage: afd_tok_bench [--tokenizer FILE | --vocab N] "
                                     "[--mb MB] [--reps N]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    /* the trained tokenizer goes to a directory under $TMPDIR, removed on every exit */
    char dir[PATH_MAX], path[PATH_MAX + 32];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/afd_tok_bench.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    const char *file = o.tokenizer;
    int trained = 0, rc = 1;
    tok_t *t = NULL;
    if (!file) {
        static const tok_special_t sp[] = {{"<｜begin▁of▁sentence｜>", 1},
                                           {"<｜end▁of▁sentence｜>", 1},
                                           {"<|BOT|>", 1},
                                           {"<|EOT|>", 1}};
        size_t n;
        const char *s = tok_sample_text(&n);
        int nm;
        if (!mkdtemp(dir)) {
            afd_error("%s: %s", dir, strerror(errno));
            goto out;
        }
        trained = 1;
        snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
        if (tok_train_write(s, n, (int)o.vocab, sp, 4, path, &nm)) goto out;
        file = path;
        printf("tokenizer: trained over the bundled sample, %ld ids (%d merges)\n", o.vocab, nm);
    }
    double t0 = now_s();
    if (tok_load(file, &t)) goto out;
    printf("tokenizer: %s, %d ids, loaded in %.1f ms\n", file, tok_vocab_size(t),
           (now_s() - t0) * 1e3);
    size_t n = (size_t)(o.mb * 1e6);
    struct {
        const char *name;
        int (*keep)(const char *, size_t);
    } kinds[] = {{"mixed", keep_all},
                 {"prose", keep_prose},
                 {"code", keep_code},
                 {"cjk", keep_cjk},
                 {"fresh", NULL}};
    for (size_t k = 0; k < sizeof(kinds) / sizeof(*kinds); k++) {
        tok_buf_t text = {0};
        int bad = kinds[k].keep ? build_kind(&text, n, kinds[k].keep) : build_fresh(&text, n);
        if (bad) {
            afd_error("%s: no text", kinds[k].name);
            tok_buf_free(&text);
            goto out;
        }
        /* a fresh tokenizer per kind: the first pass starts with an empty word cache */
        tok_t *tk;
        if (tok_load(file, &tk)) {
            tok_buf_free(&text);
            goto out;
        }
        run_kind(tk, kinds[k].name, &text, o.reps);
        tok_free(tk);
        tok_buf_free(&text);
    }
    rc = 0;
out:
    if (t) tok_free(t);
    if (trained) {
        unlink(path);
        rmdir(dir);
    }
    afd_opts_free(bench_table, &o);
    return rc;
}
