/*
 * test_tok: common/tok (tokenizer, streaming detokenizer, chat templates, trainer).
 *   - a tokenizer trained over the bundled sample has exactly the asked vocab_size (with
 *     placeholder special tokens when the sample holds fewer merges than room);
 *   - decode(encode(x)) == x byte for byte on varied text, invalid UTF-8 bytes included;
 *   - the ranked-merge BPE equals a naive reference written here (rescan every pair for
 *     the lowest rank, merge the leftmost) on every piece of the sample and other text,
 *     with merges and vocabulary read from the JSON file by this test;
 *   - added tokens are matched before BPE and never split; partial ones are plain text;
 *   - the stream never hands out broken UTF-8, invalid bytes become U+FFFD as Python's
 *     errors="replace" does, and stop strings cut across token boundaries;
 *   - the Jinja subset renders to the strings Jinja gives (trim_blocks, lstrip_blocks,
 *     whitespace control, loops, set scoping, filters, tests), and refuses what it lacks;
 *   - unsupported tokenizer.json features are load errors;
 *   - seeded mutations of a template parse or fail cleanly and render or fail cleanly;
 *     random bytes round-trip.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "tok.h"
#include "tok_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_dir[64], g_path[128];
static tok_t *g_tok;
static cJSON *g_json;

static const tok_special_t specials[] = {
    {"<｜begin▁of▁sentence｜>", 1},
    {"<｜end▁of▁sentence｜>", 1},
    {"<|BOT|>", 1},
    {"<|EOT|>", 1},
    {"<think>", 0},
    {"</think>", 0},
};
#define NSPECIAL 6

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/test_tok.XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    snprintf(g_path, sizeof(g_path), "%s/tokenizer.json", g_dir);
    size_t n;
    const char *text = tok_sample_text(&n);
    int nm;
    if (tok_train_write(text, n, 1024, specials, NSPECIAL, g_path, &nm)) return -1;
    if (tok_load(g_path, &g_tok)) return -1;
    char *j = read_all(g_path);
    g_json = j ? cJSON_Parse(j) : NULL;
    free(j);
    return g_json ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    tok_free(g_tok);
    cJSON_Delete(g_json);
    unlink(g_path);
    rmdir(g_dir);
    return 0;
}

static void encode(const char *s, size_t n, tok_ids_t *ids)
{
    ids->n = 0;
    assert_int_equal(tok_encode(g_tok, s, n, ids), AFD_OK);
}

static void test_vocab_size(void **state)
{
    (void)state;
    assert_int_equal(tok_vocab_size(g_tok), 1024);
    assert_int_equal(tok_token_id(g_tok, "<|BOT|>"), 2);
    assert_true(tok_is_special(g_tok, 0));
    assert_false(tok_is_special(g_tok, 4)); /* <think> decodes as text */
    /* more room than the sample has merges: placeholders fill it exactly */
    char path[160];
    snprintf(path, sizeof(path), "%s/big.json", g_dir);
    size_t n;
    const char *text = tok_sample_text(&n);
    int nm;
    assert_int_equal(tok_train_write(text, n, 9000, specials, NSPECIAL, path, &nm), AFD_OK);
    tok_t *t;
    assert_int_equal(tok_load(path, &t), AFD_OK);
    assert_int_equal(tok_vocab_size(t), 9000);
    assert_true(nm < 9000 - 256 - NSPECIAL);
    assert_true(tok_is_special(t, 8999));
    tok_buf_t b = {0};
    int32_t last = 8999;
    assert_int_equal(tok_decode(t, &last, 1, 1, &b), AFD_OK);
    assert_int_equal(b.len, 0);
    tok_buf_free(&b);
    tok_free(t);
    unlink(path);
}

static void test_roundtrip(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        size_t n;
    } cases[] = {
#define C(x) {x, sizeof(x) - 1}
        C("Hello, world! The quick brown fox."),
        C("中文文本，日本語のテキスト、한국어"),
        C("emoji 😀🎉 👨‍👩‍👧‍👦 🇫🇷 1️⃣"),
        C("combining e\xcc\x81 a\xcc\x88 and \xe0\xa4\xb9\xe0\xa4\xbf\xe0\xa4\x82"),
        C("   runs    of\t\twhitespace\n\n\n\r\n  "),
        C("0123456789 3.14159 1,000,000 -42"),
        C("invalid \xff\xfe bytes \x80\x81 and a cut \xe4\xb8"),
        C("\xed\xa0\x80 surrogate, \xc0\xaf overlong, \xf5\x80\x80\x80 too high"),
        C("a\0b NUL inside"),
        C("<|BOT|>user\n<think>x</think><|EOT|>"),
        C("\xe4"),
        C(""),
#undef C
    };
    tok_ids_t ids = {0};
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        encode(cases[i].s, cases[i].n, &ids);
        tok_buf_t b = {0};
        assert_int_equal(tok_decode(g_tok, ids.v, ids.n, 0, &b), AFD_OK);
        assert_int_equal(b.len, cases[i].n);
        assert_memory_equal(b.p, cases[i].s, cases[i].n);
        tok_buf_free(&b);
    }
    /* the whole sample, and compression on it */
    size_t n;
    const char *text = tok_sample_text(&n);
    encode(text, n, &ids);
    assert_true(ids.n < n / 2);
    tok_buf_t b = {0};
    assert_int_equal(tok_decode(g_tok, ids.v, ids.n, 0, &b), AFD_OK);
    assert_int_equal(b.len, n);
    assert_memory_equal(b.p, text, n);
    tok_buf_free(&b);
    tok_ids_free(&ids);
}

/* ---- the naive reference BPE ---- */

/* the byte-level spelling of a byte (GPT-2's table, computed independently) */
static void spell_byte(unsigned char b, char *o)
{
    int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    unsigned cp = (unsigned)b;
    if (!printable) {
        unsigned k = 0;
        for (unsigned x = 0; x < b; x++)
            k += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174);
        cp = 256 + k;
    }
    if (cp < 0x80) {
        o[0] = (char)cp, o[1] = 0;
    } else {
        o[0] = (char)(0xC0 | (cp >> 6)), o[1] = (char)(0x80 | (cp & 0x3F)), o[2] = 0;
    }
}

static void reference_bpe(const char *w, size_t n, tok_ids_t *out)
{
    const cJSON *model = cJSON_GetObjectItem(g_json, "model");
    const cJSON *vocab = cJSON_GetObjectItem(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItem(model, "merges");
    char **sym = calloc(n, sizeof(char *));
    size_t ns = n;
    for (size_t i = 0; i < n; i++) {
        sym[i] = calloc(1, 4096);
        spell_byte((unsigned char)w[i], sym[i]);
    }
    for (;;) {
        int best = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < ns; i++) {
            char pair[8192];
            snprintf(pair, sizeof(pair), "%s %s", sym[i], sym[i + 1]);
            int r = 0;
            const cJSON *m;
            cJSON_ArrayForEach(m, merges)
            {
                if (best >= 0 && r >= best) break;
                if (!strcmp(m->valuestring, pair)) {
                    best = r;
                    at = i;
                    break;
                }
                r++;
            }
        }
        if (best < 0) break;
        strcat(sym[at], sym[at + 1]);
        free(sym[at + 1]);
        memmove(&sym[at + 1], &sym[at + 2], (ns - at - 2) * sizeof(char *));
        ns--;
    }
    for (size_t i = 0; i < ns; i++) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(vocab, sym[i]);
        assert_non_null(id);
        out->v[out->n++] = (int32_t)id->valuedouble;
        free(sym[i]);
    }
    free(sym);
}

static void check_against_reference(const char *text, size_t len)
{
    size_t np;
    assert_int_equal(tok_pretokenize(g_tok, text, len, &np), AFD_OK);
    tok_piece_t *p = malloc(np * sizeof(*p) + 1);
    memcpy(p, g_tok->pieces[g_tok->cur], np * sizeof(*p));
    size_t covered = 0;
    tok_ids_t ours = {0};
    tok_ids_t ref = {malloc(sizeof(int32_t) * 4096), 0, 4096};
    for (size_t i = 0; i < np; i++) {
        assert_int_equal(p[i].off, covered); /* the pieces tile the text */
        covered += p[i].len;
        encode(text + p[i].off, p[i].len, &ours);
        ref.n = 0;
        reference_bpe(text + p[i].off, p[i].len, &ref);
        assert_int_equal(ours.n, ref.n);
        assert_memory_equal(ours.v, ref.v, ref.n * sizeof(int32_t));
    }
    assert_int_equal(covered, len);
    free(p);
    tok_ids_free(&ours);
    tok_ids_free(&ref);
}

static void test_bpe_reference(void **state)
{
    (void)state;
    size_t n;
    const char *text = tok_sample_text(&n);
    check_against_reference(text, n);
    const char *more = "Unseen words: antidisestablishmentarianism, zxqv, ЁЖЩ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, "
                       "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 1234567 \xff";
    check_against_reference(more, strlen(more));
}

static void test_added_tokens(void **state)
{
    (void)state;
    tok_ids_t ids = {0};
    encode("<|BOT|>", 7, &ids);
    assert_int_equal(ids.n, 1);
    assert_int_equal(ids.v[0], 2);
    const char *s = "x<|EOT|>y<|EOT|><think>";
    encode(s, strlen(s), &ids);
    int eot = 0, think = 0;
    for (size_t i = 0; i < ids.n; i++) {
        eot += ids.v[i] == 3;
        think += ids.v[i] == 4;
    }
    assert_int_equal(eot, 2);
    assert_int_equal(think, 1);
    assert_int_equal(ids.v[ids.n - 1], 4);
    s = "<|BO <|EOT| <thin";
    encode(s, strlen(s), &ids);
    for (size_t i = 0; i < ids.n; i++)
        assert_true(ids.v[i] >= NSPECIAL);
    /* skip_special drops specials, keeps <think> */
    s = "<|BOT|>a<think>b<|EOT|>";
    encode(s, strlen(s), &ids);
    tok_buf_t b = {0};
    assert_int_equal(tok_decode(g_tok, ids.v, ids.n, 1, &b), AFD_OK);
    assert_string_equal(b.p, "a<think>b");
    tok_buf_free(&b);
    tok_ids_free(&ids);
}

/* ---- streaming ---- */

static int32_t byte_token(unsigned char c)
{
    tok_ids_t ids = {0};
    encode((const char *)&c, 1, &ids);
    assert_int_equal(ids.n, 1);
    int32_t id = ids.v[0];
    tok_ids_free(&ids);
    return id;
}

/* Pushes the bytes of s one byte token at a time (every multibyte character split);
 * checks each delta is valid UTF-8; returns the concatenation. */
static void stream_bytes(const char *s, size_t n, const char *const *stops, size_t nstop,
                         tok_buf_t *all, int *stopped)
{
    tok_stream_t ts;
    assert_int_equal(tok_stream_init(&ts, g_tok, stops, nstop, 1), AFD_OK);
    const char *d;
    size_t dl;
    int bad;
    for (size_t i = 0; i < n && !ts.stopped; i++) {
        assert_int_equal(tok_stream_push(&ts, byte_token((unsigned char)s[i]), &d, &dl), AFD_OK);
        assert_int_equal(tok_utf8_valid_prefix(d, dl, &bad), dl);
        tok_buf_add(all, d, dl);
    }
    assert_int_equal(tok_stream_flush(&ts, &d, &dl), AFD_OK);
    assert_int_equal(tok_utf8_valid_prefix(d, dl, &bad), dl);
    tok_buf_add(all, d, dl);
    *stopped = ts.stopped;
    tok_stream_fini(&ts);
}

static void test_stream_utf8(void **state)
{
    (void)state;
    const char *s = "héllo 世界 😀 👨‍👩‍👧 end";
    tok_buf_t all = {0};
    int stopped;
    stream_bytes(s, strlen(s), NULL, 0, &all, &stopped);
    assert_false(stopped);
    assert_string_equal(all.p, s);
    tok_buf_free(&all);
    /* invalid bytes: one U+FFFD per maximal invalid subpart, as Python's "replace" */
    const char bad[] = "a\xff b\xe4\xb8 c\xed\xa0\x80 d\xf0\x9f\x98";
    stream_bytes(bad, sizeof(bad) - 1, NULL, 0, &all, &stopped);
    assert_string_equal(all.p, "a\xef\xbf\xbd b\xef\xbf\xbd c\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                               " d\xef\xbf\xbd");
    tok_buf_t whole = {0};
    assert_int_equal(tok_utf8_clean(bad, sizeof(bad) - 1, &whole), AFD_OK);
    assert_string_equal(whole.p, all.p);
    tok_buf_free(&whole);
    tok_buf_free(&all);
    /* real tokens: the deltas add up to the decoded text */
    size_t n;
    const char *text = tok_sample_text(&n);
    tok_ids_t ids = {0};
    encode(text, n, &ids);
    tok_stream_t ts;
    assert_int_equal(tok_stream_init(&ts, g_tok, NULL, 0, 1), AFD_OK);
    for (size_t i = 0; i < ids.n; i++) {
        const char *d;
        size_t dl;
        int b;
        assert_int_equal(tok_stream_push(&ts, ids.v[i], &d, &dl), AFD_OK);
        assert_int_equal(tok_utf8_valid_prefix(d, dl, &b), dl);
        tok_buf_add(&all, d, dl);
    }
    assert_int_equal(all.len, n);
    assert_memory_equal(all.p, text, n);
    tok_stream_fini(&ts);
    tok_buf_free(&all);
    tok_ids_free(&ids);
}

static void test_stop_strings(void **state)
{
    (void)state;
    const char *s = "Hello world, this is a test. 世界 again";
    const char *stops1[] = {"never", "is a"};
    tok_buf_t all = {0};
    int stopped;
    stream_bytes(s, strlen(s), stops1, 2, &all, &stopped);
    assert_true(stopped);
    assert_string_equal(all.p, "Hello world, this ");
    tok_buf_free(&all);
    /* a stop string inside a multibyte run */
    const char *stops2[] = {"界 a"};
    stream_bytes(s, strlen(s), stops2, 1, &all, &stopped);
    assert_true(stopped);
    assert_string_equal(all.p, "Hello world, this is a test. 世");
    tok_buf_free(&all);
    /* a partial match that never completes is handed out in the end */
    const char *stops3[] = {"again!"};
    stream_bytes(s, strlen(s), stops3, 1, &all, &stopped);
    assert_false(stopped);
    assert_string_equal(all.p, s);
    tok_buf_free(&all);
    /* the earliest of two matches wins */
    const char *stops4[] = {"test", "world"};
    stream_bytes(s, strlen(s), stops4, 2, &all, &stopped);
    assert_true(stopped);
    assert_string_equal(all.p, "Hello ");
    tok_buf_free(&all);
    /* bounds */
    tok_stream_t ts;
    const char *empty[] = {""};
    assert_int_not_equal(tok_stream_init(&ts, g_tok, empty, 1, 1), AFD_OK);
}

/* ---- templates ---- */

static void render_eq(const char *tmpl, const char *ctx_json, const char *want)
{
    char err[256] = "";
    tok_tmpl_t *t;
    afd_status_t st = tok_tmpl_parse(tmpl, &t, err, sizeof(err));
    if (st) fail_msg("parse: %s", err);
    cJSON *ctx = cJSON_Parse(ctx_json);
    assert_non_null(ctx);
    tok_buf_t out = {0};
    st = tok_tmpl_render(t, ctx, &out, err, sizeof(err));
    if (st) fail_msg("render: %s", err);
    assert_string_equal(out.p, want);
    tok_buf_free(&out);
    cJSON_Delete(ctx);
    tok_tmpl_free(t);
}

static const char step3_like[] =
    "{{- bos_token -}}\n"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- if not loop.first -%}{{- '<|BOT|>system\\n' + message['content'] + '<|EOT|>' -}}"
    "{%- endif -%}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{- '<|BOT|>user\\n' + message['content'] + '<|EOT|>' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '<|BOT|>assistant\\n' + (message['content'] if message['content'] else '') + "
    "'<|EOT|>' -}}\n"
    "{%- else -%}{{- raise_exception('unknown role: ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|BOT|>assistant\\n<think>\\n' -}}{%- endif -%}";

static void test_template_render(void **state)
{
    (void)state;
    render_eq(step3_like,
              "{\"bos_token\": \"<s>\", \"add_generation_prompt\": true, \"messages\": ["
              "{\"role\": \"system\", \"content\": \"Be brief.\"},"
              "{\"role\": \"user\", \"content\": \"Hi\"},"
              "{\"role\": \"assistant\", \"content\": \"\"},"
              "{\"role\": \"user\", \"content\": \"世界?\"}]}",
              "<s>Be brief.<|BOT|>user\nHi<|EOT|><|BOT|>assistant\n<|EOT|><|BOT|>user\n世界?"
              "<|EOT|><|BOT|>assistant\n<think>\n");
    render_eq(step3_like,
              "{\"bos_token\": \"\", \"messages\": [{\"role\": \"user\", "
              "\"content\": \"x\"}]}",
              "<|BOT|>user\nx<|EOT|>");
    /* trim_blocks and lstrip_blocks as Hugging Face renders */
    render_eq("{% for m in messages %}\n  {{ m.role }}\n  {% if loop.last %}end{% endif %}\n"
              "{% endfor %}",
              "{\"messages\": [{\"role\": \"a\"}, {\"role\": \"b\"}]}", "  a\n  b\nend");
    /* loop variables, filters, tests, in, slices, ~, set scoping */
    render_eq("{% set x = 'out' %}{% for m in items %}{% set x = 'in' %}{{ loop.index0 }}"
              "{{ loop.index }}{{ '!' if loop.first }}{{ m | upper }}{% endfor %}|{{ x }}|"
              "{{ items | length }}|{{ '  pad  ' | trim }}|{{ items[1:] | join(',') }}|"
              "{{ missing is defined }}{{ items is defined }}|{{ 'b' in items }}"
              "{{ 'z' not in items }}|{{ 1 ~ 'a' ~ none }}|{{ items[-1] }}|{{ 7 % 4 + 2 * 3 }}|"
              "{{ (undefinedvar | default('dflt')) }}|{{ '  x '.strip() }}|"
              "{{ 'abc'.startswith('ab') and not 'abc'.endswith('b') }}{# comment #}",
              "{\"items\": [\"a\", \"b\", \"c\"]}",
              "01!A12B23C|out|3|pad|b,c|FalseTrue|TrueTrue|1aNone|c|9|dflt|x|True");
    /* macros (called after their definition), replace */
    render_eq("{%- macro show(c, sep) -%}{%- if c is string -%}{{ c.replace('\\n', sep) }}"
              "{%- else -%}{%- for p in c -%}{{ p.text }}{{ sep }}{%- endfor -%}{%- endif -%}"
              "{%- endmacro -%}[{{ show(a, '/') }}][{{ show(b, '+') }}]{{ show(a, '') | length }}",
              "{\"a\": \"x\\ny\\nz\", \"b\": [{\"text\": \"p\"}, {\"text\": \"q\"}]}",
              "[x/y/z][p+q+]3");
    /* strings index and slice by character, as Python's str */
    render_eq("{{ s[1] }}|{{ s[1:3] }}|{{ s[-1] }}|{{ s | length }}",
              "{\"s\": \"h\u00e9\u4e16lo\"}", "\xc3\xa9|\xc3\xa9\xe4\xb8\x96|o|5");
    render_eq("{%- if a == 1 %}one{% elif a == 2 %}two{% else %}other{% endif -%}", "{\"a\": 2}",
              "two");
    render_eq("{{ d.k }}{{ d['k'] }}{% for key in d %}{{ key }}{% endfor %}",
              "{\"d\": {\"k\": \"v\"}}", "vvk");
}

static void test_template_errors(void **state)
{
    (void)state;
    static const char *bad[] = {
        "{% macro f(a=1) %}x{% endmacro %}",
        "{{ later() }}{% macro later() %}{% endmacro %}",
        "{% macro m() %}unclosed",
        /* a macro defined in a macro's body (it would take the outer one's slot) */
        "{% macro a() %}{% macro b() %}x{% endmacro %}{% endmacro %}{{ a() }}",
        "{{ x | shuffle }}",
        "{% if x %}unclosed",
        "{{ foo( }}",
        "{% for a, b in x %}{% endfor %}",
        "{{ x is odd }}",
        "{% set ns.a = 1 %}",
        "{{ 'unterminated }}",
        "{% include 'x' %}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        char err[256] = "";
        tok_tmpl_t *t = NULL;
        assert_int_not_equal(tok_tmpl_parse(bad[i], &t, err, sizeof(err)), AFD_OK);
        assert_true(strlen(err) > 0);
    }
    char err[256] = "";
    tok_tmpl_t *t;
    assert_int_equal(tok_tmpl_parse(step3_like, &t, err, sizeof(err)), AFD_OK);
    cJSON *ctx = cJSON_Parse("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}");
    tok_buf_t out = {0};
    assert_int_not_equal(tok_tmpl_render(t, ctx, &out, err, sizeof(err)), AFD_OK);
    assert_non_null(strstr(err, "unknown role: robot"));
    tok_buf_free(&out);
    cJSON_Delete(ctx);
    tok_tmpl_free(t);
    /* indexes far out of a long's range are errors, not undefined behaviour */
    static const char *huge[] = {"{{ messages[-58888888888888888888888888888888888888] }}",
                                 "{{ messages[1e300:] }}", "{{ messages[0.5] }}"};
    for (size_t i = 0; i < sizeof(huge) / sizeof(*huge); i++) {
        assert_int_equal(tok_tmpl_parse(huge[i], &t, err, sizeof(err)), AFD_OK);
        ctx = cJSON_Parse("{\"messages\": [1, 2]}");
        assert_int_not_equal(tok_tmpl_render(t, ctx, &out, err, sizeof(err)), AFD_OK);
        assert_non_null(strstr(err, "index"));
        tok_buf_free(&out);
        cJSON_Delete(ctx);
        tok_tmpl_free(t);
    }
    /* a template that would grow without bound stops at a limit */
    assert_int_equal(tok_tmpl_parse("{% for a in l %}{% for b in l %}{% for c in l %}{% for d "
                                    "in l %}{{ s }}{% endfor %}{% endfor %}{% endfor %}"
                                    "{% endfor %}",
                                    &t, err, sizeof(err)),
                     AFD_OK);
    char *big = malloc(200000);
    strcpy(big, "{\"s\": \"");
    memset(big + 7, 'x', 60000);
    strcpy(big + 60007, "\", \"l\": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}");
    ctx = cJSON_Parse(big);
    free(big);
    assert_int_not_equal(tok_tmpl_render(t, ctx, &out, err, sizeof(err)), AFD_OK);
    tok_buf_free(&out);
    cJSON_Delete(ctx);
    tok_tmpl_free(t);
}

/* Seeded mutations of a template (bytes flipped, cut, tags inserted): parsing and, when it
 * parses, rendering either succeed or fail with a message, never crash or hang; random
 * byte strings round-trip through encode and decode. */
static void test_fuzz(void **state)
{
    (void)state;
    uint64_t x = 20261128;
#define RND() (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x)
    static const char *bits[] = {"{{", "}}",   "{%",    "%}",    "{#",       "#}",
                                 "-",  "'",    "\"",    "(",     ")",        "[",
                                 "]",  " if ", " for ", " in ",  "endif",    "endfor",
                                 "|",  ".",    "loop",  "macro", "endmacro", "render_content(",
                                 ":",  ","};
    cJSON *ctx = cJSON_Parse("{\"bos_token\": \"<s>\", \"add_generation_prompt\": true, "
                             "\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, "
                             "{\"role\": \"user\", \"content\": [{\"type\": \"text\", "
                             "\"text\": \"u\"}]}]}");
    size_t base = strlen(step3_like);
    int parsed = 0;
    for (int it = 0; it < 3000; it++) {
        char buf[4096];
        size_t n = base < sizeof(buf) - 64 ? base : sizeof(buf) - 64;
        memcpy(buf, step3_like, n);
        for (int k = 0; k < 1 + (int)(RND() % 3); k++) {
            size_t at = n ? RND() % n : 0;
            uint64_t op = RND() % 3;
            if (op == 0) {
                buf[at] = (char)(RND() % 128);
            } else if (op == 1) {
                n = at;
            } else {
                const char *b = bits[RND() % (sizeof(bits) / sizeof(*bits))];
                size_t bl = strlen(b);
                if (n + bl < sizeof(buf) - 1) {
                    memmove(buf + at + bl, buf + at, n - at);
                    memcpy(buf + at, b, bl);
                    n += bl;
                }
            }
        }
        buf[n] = 0;
        char err[256] = "";
        tok_tmpl_t *t = NULL;
        if (tok_tmpl_parse(buf, &t, err, sizeof(err)) != AFD_OK) {
            assert_true(err[0] != 0);
            continue;
        }
        parsed++;
        tok_buf_t out = {0};
        err[0] = 0;
        if (tok_tmpl_render(t, ctx, &out, err, sizeof(err)) != AFD_OK) assert_true(err[0] != 0);
        tok_buf_free(&out);
        tok_tmpl_free(t);
    }
    assert_true(parsed > 0);
    cJSON_Delete(ctx);
    tok_ids_t ids = {0};
    for (int it = 0; it < 300; it++) {
        char b[300];
        size_t n = RND() % sizeof(b);
        for (size_t i = 0; i < n; i++)
            b[i] = RND() % 4 ? (char)(RND() % 256) : "<|> \n"[RND() % 5];
        encode(b, n, &ids);
        tok_buf_t d = {0};
        assert_int_equal(tok_decode(g_tok, ids.v, ids.n, 0, &d), AFD_OK);
        assert_int_equal(d.len, n);
        if (n) assert_memory_equal(d.p, b, n);
        tok_buf_free(&d);
    }
    tok_ids_free(&ids);
#undef RND
}

/* ---- load errors ---- */

static afd_status_t load_mutated(void (*mut)(cJSON *))
{
    cJSON *j = cJSON_Duplicate(g_json, 1);
    mut(j);
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    tok_t *t = NULL;
    afd_status_t st = tok_load_json(txt, strlen(txt), &t);
    free(txt);
    tok_free(t);
    return st;
}

static void m_none(cJSON *j)
{
    (void)j;
}
static void m_wordpiece(cJSON *j)
{
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(j, "model"), "type",
                              cJSON_CreateString("WordPiece"));
}
static void m_byte_fallback(cJSON *j)
{
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(j, "model"), "byte_fallback", cJSON_CreateTrue());
}
static void m_nfc(cJSON *j)
{
    cJSON *n = cJSON_CreateObject();
    cJSON_AddStringToObject(n, "type", "NFC");
    cJSON_ReplaceItemInObject(j, "normalizer", n);
}
static void m_behavior(cJSON *j)
{
    cJSON *s = cJSON_GetArrayItem(
        cJSON_GetObjectItem(cJSON_GetObjectItem(j, "pre_tokenizer"), "pretokenizers"), 0);
    cJSON_ReplaceItemInObject(s, "behavior", cJSON_CreateString("MergedWithPrevious"));
}
static void m_bad_regex(cJSON *j)
{
    cJSON *s = cJSON_GetArrayItem(
        cJSON_GetObjectItem(cJSON_GetObjectItem(j, "pre_tokenizer"), "pretokenizers"), 0);
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(s, "pattern"), "Regex",
                              cJSON_CreateString("(unclosed"));
}
static void m_no_byte(cJSON *j)
{
    cJSON_DeleteItemFromObjectCaseSensitive(
        cJSON_GetObjectItem(cJSON_GetObjectItem(j, "model"), "vocab"), "a");
}
static void m_bad_merge(cJSON *j)
{
    cJSON_AddItemToArray(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "model"), "merges"),
                         cJSON_CreateString("zzzz qqqq"));
}
static void m_decoder(cJSON *j)
{
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "type", "Metaspace");
    cJSON_ReplaceItemInObject(j, "decoder", d);
}
static void m_lstrip(cJSON *j)
{
    cJSON_ReplaceItemInObject(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "added_tokens"), 0),
                              "lstrip", cJSON_CreateTrue());
}

static void test_load_errors(void **state)
{
    (void)state;
    assert_int_equal(load_mutated(m_none), AFD_OK);
    void (*muts[])(cJSON *) = {m_wordpiece, m_byte_fallback, m_nfc,     m_behavior, m_bad_regex,
                               m_no_byte,   m_bad_merge,     m_decoder, m_lstrip};
    for (size_t i = 0; i < sizeof(muts) / sizeof(*muts); i++)
        assert_int_not_equal(load_mutated(muts[i]), AFD_OK);
    tok_t *t;
    assert_int_not_equal(tok_load_json("{", 1, &t), AFD_OK);
    assert_int_not_equal(tok_load("/nonexistent/tokenizer.json", &t), AFD_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vocab_size),      cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_bpe_reference),   cmocka_unit_test(test_added_tokens),
        cmocka_unit_test(test_stream_utf8),     cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_template_render), cmocka_unit_test(test_template_errors),
        cmocka_unit_test(test_load_errors),     cmocka_unit_test(test_fuzz),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
