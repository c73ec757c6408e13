/*
 * tok_tmpl: a bounded Jinja subset for chat templates (tokenizer_config.json's
 * chat_template), rendered as Hugging Face does (trim_blocks and lstrip_blocks on).
 *
 * Supported: text, {{ expr }}, {# comments #}, whitespace control (-), {% if/elif/else %},
 * {% for x in expr %} with loop.index/index0/first/last/length/revindex, {% set x = expr %}
 * (scoped to the loop body as in Jinja), literals (strings, numbers, true/false/none,
 * lists), variables, .attr and [index] access, slices [a:b], + - * / % ~, comparisons,
 * in / not in, not/and/or, "a if c else b", tests (is [not] defined, undefined, none,
 * string, number, mapping, sequence, iterable, boolean), filters (trim, length, count,
 * upper, lower, default/d, string, first, last, join, tojson), string methods (strip,
 * lstrip, rstrip, upper, lower, startswith, endswith, replace), raise_exception(msg) and
 * {% macro name(params) %} (no defaults; callable after its definition). Anything else is
 * a parse error. Rendering is bounded in steps, output size, memory and nesting.
 */
#define _GNU_SOURCE
#include "tok_int.h"
#include "afd_file.h"
#include "afd_log.h"

#include <ctype.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TMPL_MAX_SRC   (1u << 20)
#define TMPL_MAX_OUT   (16u << 20)
#define TMPL_MAX_STEPS 20000000L
#define TMPL_MAX_MEM   (256u << 20)
#define TMPL_MAX_DEPTH 64
#define TMPL_MAX_VARS  256

/* ---- syntax tree ---- */

enum {
    E_LIT_STR,
    E_LIT_NUM,
    E_LIT_BOOL,
    E_LIT_NONE,
    E_VAR,
    E_ATTR,
    E_INDEX,
    E_SLICE,
    E_BIN,
    E_NOT,
    E_NEG,
    E_TEST,
    E_FILTER,
    E_COND,
    E_CALL,
    E_METHOD,
    E_LIST,
    E_MACRO
};
enum {
    OP_OR,
    OP_AND,
    OP_EQ,
    OP_NE,
    OP_LT,
    OP_GT,
    OP_LE,
    OP_GE,
    OP_IN,
    OP_NOTIN,
    OP_ADD,
    OP_SUB,
    OP_MUL,
    OP_DIV,
    OP_MOD,
    OP_CAT
};

typedef struct expr {
    int kind, op, neg;
    char *name; /* variable, attribute, test, filter, method; string literal */
    size_t nlen;
    double num;
    struct expr *a, *b, *c; /* operands */
    struct expr **args;
    int nargs;
} expr_t;

enum { N_TEXT, N_OUT, N_IF, N_FOR, N_SET };

typedef struct node node_t;
typedef struct body {
    node_t **v;
    int n;
} body_t;

struct node {
    int kind;
    char *text; /* N_TEXT */
    size_t tlen;
    expr_t *e; /* N_OUT, N_SET value, N_FOR iterable */
    char *var; /* N_FOR, N_SET */
    /* N_IF: conds[i] -> bodies[i]; else_body */
    expr_t **conds;
    body_t *bodies;
    int nconds;
    body_t body, else_body;
};

#define TMPL_MAX_MACROS 32
#define TMPL_MAX_PARAMS 8

typedef struct macro {
    char *name;
    char *params[TMPL_MAX_PARAMS];
    int nparams;
    body_t body;
} macro_t;

struct tok_tmpl {
    body_t top;
    macro_t macros[TMPL_MAX_MACROS];
    int nmacros;
    /* everything the parse allocated, freed together */
    void **allocs;
    size_t nalloc, acap;
};

/* ---- parse ---- */

typedef struct parser {
    tok_tmpl_t *t;
    const char *src;
    /* chunks */
    const char *p, *end;
    /* the current tag's expression text */
    const char *x, *xend;
    int line;
    char *err;
    size_t errlen;
    jmp_buf jb;
    int depth;
    int in_macro; /* parsing a macro's body: its slot in t->macros is not taken yet */
} parser_t;

static void perr(parser_t *ps, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));
static void perr(parser_t *ps, const char *fmt, ...)
{
    char m[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof(m), fmt, ap);
    va_end(ap);
    snprintf(ps->err, ps->errlen, "chat template line %d: %s", ps->line, m);
    longjmp(ps->jb, 1);
}

static void *palloc(parser_t *ps, size_t n)
{
    tok_tmpl_t *t = ps->t;
    if (t->nalloc == t->acap) {
        size_t cap = t->acap ? t->acap * 2 : 64;
        void **a = realloc(t->allocs, cap * sizeof(*a));
        if (!a) perr(ps, "out of memory");
        t->allocs = a, t->acap = cap;
    }
    void *p = calloc(1, n ? n : 1);
    if (!p) perr(ps, "out of memory");
    t->allocs[t->nalloc++] = p;
    return p;
}

static char *pstrndup(parser_t *ps, const char *s, size_t n)
{
    char *p = palloc(ps, n + 1);
    memcpy(p, s, n);
    return p;
}

/* expression lexer over [x, xend) */
static void skip_ws(parser_t *ps)
{
    while (ps->x < ps->xend && isspace((unsigned char)*ps->x)) {
        if (*ps->x == '\n') ps->line++;
        ps->x++;
    }
}

static int at_end(parser_t *ps)
{
    skip_ws(ps);
    return ps->x >= ps->xend;
}

/* Accepts an operator or punctuation s. */
static int accept(parser_t *ps, const char *s)
{
    skip_ws(ps);
    size_t n = strlen(s);
    if ((size_t)(ps->xend - ps->x) < n || memcmp(ps->x, s, n)) return 0;
    /* "=" must not take the start of "==", "<" of "<=" */
    if (n == 1 && (s[0] == '=' || s[0] == '<' || s[0] == '>' || s[0] == '!') &&
        ps->x + 1 < ps->xend && ps->x[1] == '=')
        return 0;
    if (n == 1 && s[0] == '/' && ps->x + 1 < ps->xend && ps->x[1] == '/') return 0;
    ps->x += n;
    return 1;
}

static int is_ident_char(char c)
{
    return isalnum((unsigned char)c) || c == '_';
}

/* Accepts the keyword w (a whole identifier). */
static int accept_kw(parser_t *ps, const char *w)
{
    skip_ws(ps);
    size_t n = strlen(w);
    if ((size_t)(ps->xend - ps->x) < n || memcmp(ps->x, w, n)) return 0;
    if (ps->x + n < ps->xend && is_ident_char(ps->x[n])) return 0;
    ps->x += n;
    return 1;
}

static void expect(parser_t *ps, const char *s)
{
    if (!accept(ps, s)) perr(ps, "expected '%s' at '%.20s'", s, ps->x);
}

static char *ident(parser_t *ps)
{
    skip_ws(ps);
    const char *s = ps->x;
    if (s >= ps->xend || !(isalpha((unsigned char)*s) || *s == '_'))
        perr(ps, "expected a name at '%.20s'", s);
    while (ps->x < ps->xend && is_ident_char(*ps->x))
        ps->x++;
    return pstrndup(ps, s, (size_t)(ps->x - s));
}

static expr_t *mk(parser_t *ps, int kind)
{
    expr_t *e = palloc(ps, sizeof(*e));
    e->kind = kind;
    return e;
}

static expr_t *bin(parser_t *ps, int op, expr_t *a, expr_t *b)
{
    expr_t *e = mk(ps, E_BIN);
    e->op = op, e->a = a, e->b = b;
    return e;
}

static expr_t *p_expr(parser_t *ps);

static expr_t *p_string(parser_t *ps)
{
    char q = *ps->x++;
    char *buf = palloc(ps, (size_t)(ps->xend - ps->x) + 1);
    size_t n = 0;
    while (ps->x < ps->xend && *ps->x != q) {
        char c = *ps->x++;
        if (c == '\\' && ps->x < ps->xend) {
            c = *ps->x++;
            switch (c) {
            case 'n':
                c = '\n';
                break;
            case 't':
                c = '\t';
                break;
            case 'r':
                c = '\r';
                break;
            case '\\':
            case '\'':
            case '"':
                break;
            default:
                buf[n++] = '\\';
                break;
            }
        }
        buf[n++] = c;
    }
    if (ps->x >= ps->xend) perr(ps, "unterminated string");
    ps->x++;
    expr_t *e = mk(ps, E_LIT_STR);
    e->name = buf, e->nlen = n;
    return e;
}

static void p_args(parser_t *ps, expr_t *e)
{
    expr_t *tmp[16];
    int n = 0;
    if (!accept(ps, ")")) {
        do {
            if (n == 16) perr(ps, "too many arguments");
            tmp[n++] = p_expr(ps);
        } while (accept(ps, ","));
        expect(ps, ")");
    }
    e->args = palloc(ps, sizeof(expr_t *) * (size_t)(n ? n : 1));
    memcpy(e->args, tmp, sizeof(expr_t *) * (size_t)n);
    e->nargs = n;
}

static expr_t *p_primary(parser_t *ps)
{
    skip_ws(ps);
    if (ps->x >= ps->xend) perr(ps, "expression expected");
    char c = *ps->x;
    expr_t *e;
    if (c == '\'' || c == '"') {
        e = p_string(ps);
        skip_ws(ps);
        while (ps->x < ps->xend && (*ps->x == '\'' || *ps->x == '"')) { /* "a" "b" */
            expr_t *f = p_string(ps);
            char *s = palloc(ps, e->nlen + f->nlen + 1);
            memcpy(s, e->name, e->nlen);
            memcpy(s + e->nlen, f->name, f->nlen);
            e->name = s, e->nlen += f->nlen;
            skip_ws(ps);
        }
        return e;
    }
    if (isdigit((unsigned char)c)) {
        char *endp;
        e = mk(ps, E_LIT_NUM);
        e->num = strtod(ps->x, &endp);
        ps->x = endp;
        return e;
    }
    if (accept(ps, "(")) {
        e = p_expr(ps);
        expect(ps, ")");
        return e;
    }
    if (accept(ps, "[")) {
        e = mk(ps, E_LIST);
        expr_t *tmp[64];
        int n = 0;
        if (!accept(ps, "]")) {
            do {
                if (n == 64) perr(ps, "list literal too long");
                tmp[n++] = p_expr(ps);
            } while (accept(ps, ","));
            expect(ps, "]");
        }
        e->args = palloc(ps, sizeof(expr_t *) * (size_t)(n ? n : 1));
        memcpy(e->args, tmp, sizeof(expr_t *) * (size_t)n);
        e->nargs = n;
        return e;
    }
    char *id = ident(ps);
    if (!strcmp(id, "true") || !strcmp(id, "True") || !strcmp(id, "false") ||
        !strcmp(id, "False")) {
        e = mk(ps, E_LIT_BOOL);
        e->num = id[0] == 't' || id[0] == 'T';
        return e;
    }
    if (!strcmp(id, "none") || !strcmp(id, "None")) return mk(ps, E_LIT_NONE);
    skip_ws(ps);
    if (ps->x < ps->xend && *ps->x == '(') {
        for (int m = 0; m < ps->t->nmacros; m++)
            if (!strcmp(ps->t->macros[m].name, id)) {
                ps->x++;
                e = mk(ps, E_MACRO);
                e->name = id;
                e->num = m;
                p_args(ps, e);
                if (e->nargs > ps->t->macros[m].nparams)
                    perr(ps, "macro %s takes %d arguments", id, ps->t->macros[m].nparams);
                return e;
            }
        if (strcmp(id, "raise_exception"))
            perr(ps, "function '%s' is not supported (nor a macro defined before)", id);
        ps->x++;
        e = mk(ps, E_CALL);
        e->name = id;
        p_args(ps, e);
        if (e->nargs != 1) perr(ps, "raise_exception takes one argument");
        return e;
    }
    e = mk(ps, E_VAR);
    e->name = id;
    return e;
}

static const char *const filters[] = {"trim",    "length", "count",  "upper", "lower",
                                      "default", "d",      "string", "first", "last",
                                      "join",    "tojson", NULL};
static const char *const tests[] = {"defined", "undefined", "none",     "string",  "number",
                                    "mapping", "sequence",  "iterable", "boolean", NULL};
static const char *const methods[] = {"strip",      "lstrip",   "rstrip",  "upper", "lower",
                                      "startswith", "endswith", "replace", NULL};

static int in_list(const char *const *l, const char *s)
{
    for (; *l; l++)
        if (!strcmp(*l, s)) return 1;
    return 0;
}

static expr_t *p_postfix(parser_t *ps)
{
    expr_t *e = p_primary(ps);
    for (;;) {
        if (accept(ps, ".")) {
            char *name = ident(ps);
            skip_ws(ps);
            if (ps->x < ps->xend && *ps->x == '(') {
                ps->x++;
                if (!in_list(methods, name)) perr(ps, "method '%s' is not supported", name);
                expr_t *m = mk(ps, E_METHOD);
                m->a = e, m->name = name;
                p_args(ps, m);
                e = m;
            } else {
                expr_t *a = mk(ps, E_ATTR);
                a->a = e, a->name = name;
                e = a;
            }
        } else if (accept(ps, "[")) {
            expr_t *lo = NULL, *hi = NULL;
            int slice = 0;
            if (!accept(ps, ":")) {
                lo = p_expr(ps);
                slice = accept(ps, ":");
            } else
                slice = 1;
            if (slice) {
                skip_ws(ps);
                if (ps->x < ps->xend && *ps->x != ']') hi = p_expr(ps);
                expr_t *s = mk(ps, E_SLICE);
                s->a = e, s->b = lo, s->c = hi;
                e = s;
            } else {
                expr_t *s = mk(ps, E_INDEX);
                s->a = e, s->b = lo;
                e = s;
            }
            expect(ps, "]");
        } else if (accept(ps, "|")) {
            expr_t *f = mk(ps, E_FILTER);
            f->a = e, f->name = ident(ps);
            if (!in_list(filters, f->name)) perr(ps, "filter '%s' is not supported", f->name);
            if (accept(ps, "(")) p_args(ps, f);
            e = f;
        } else if (accept_kw(ps, "is")) {
            expr_t *f = mk(ps, E_TEST);
            f->neg = accept_kw(ps, "not");
            f->a = e, f->name = ident(ps);
            if (!in_list(tests, f->name)) perr(ps, "test '%s' is not supported", f->name);
            e = f;
        } else
            return e;
    }
}

static expr_t *p_unary(parser_t *ps)
{
    if (accept(ps, "-")) {
        expr_t *e = mk(ps, E_NEG);
        e->a = p_unary(ps);
        return e;
    }
    return p_postfix(ps);
}

static expr_t *p_mul(parser_t *ps)
{
    expr_t *e = p_unary(ps);
    for (;;) {
        if (accept(ps, "*"))
            e = bin(ps, OP_MUL, e, p_unary(ps));
        else if (accept(ps, "/"))
            e = bin(ps, OP_DIV, e, p_unary(ps));
        else if (accept(ps, "%"))
            e = bin(ps, OP_MOD, e, p_unary(ps));
        else
            return e;
    }
}

static expr_t *p_cat(parser_t *ps)
{
    expr_t *e = p_mul(ps);
    while (accept(ps, "~"))
        e = bin(ps, OP_CAT, e, p_mul(ps));
    return e;
}

static expr_t *p_add(parser_t *ps)
{
    expr_t *e = p_cat(ps);
    for (;;) {
        if (accept(ps, "+"))
            e = bin(ps, OP_ADD, e, p_cat(ps));
        else if (accept(ps, "-"))
            e = bin(ps, OP_SUB, e, p_cat(ps));
        else
            return e;
    }
}

static expr_t *p_cmp(parser_t *ps)
{
    expr_t *e = p_add(ps);
    for (;;) {
        const char *save = ps->x;
        if (accept(ps, "=="))
            e = bin(ps, OP_EQ, e, p_add(ps));
        else if (accept(ps, "!="))
            e = bin(ps, OP_NE, e, p_add(ps));
        else if (accept(ps, "<="))
            e = bin(ps, OP_LE, e, p_add(ps));
        else if (accept(ps, ">="))
            e = bin(ps, OP_GE, e, p_add(ps));
        else if (accept(ps, "<"))
            e = bin(ps, OP_LT, e, p_add(ps));
        else if (accept(ps, ">"))
            e = bin(ps, OP_GT, e, p_add(ps));
        else if (accept_kw(ps, "in"))
            e = bin(ps, OP_IN, e, p_add(ps));
        else if (accept_kw(ps, "not")) {
            if (!accept_kw(ps, "in")) {
                ps->x = save;
                return e;
            }
            e = bin(ps, OP_NOTIN, e, p_add(ps));
        } else
            return e;
    }
}

static expr_t *p_not(parser_t *ps)
{
    if (accept_kw(ps, "not")) {
        expr_t *e = mk(ps, E_NOT);
        e->a = p_not(ps);
        return e;
    }
    return p_cmp(ps);
}

static expr_t *p_and(parser_t *ps)
{
    expr_t *e = p_not(ps);
    while (accept_kw(ps, "and"))
        e = bin(ps, OP_AND, e, p_not(ps));
    return e;
}

static expr_t *p_or(parser_t *ps)
{
    expr_t *e = p_and(ps);
    while (accept_kw(ps, "or"))
        e = bin(ps, OP_OR, e, p_and(ps));
    return e;
}

static expr_t *p_expr(parser_t *ps)
{
    if (++ps->depth > TMPL_MAX_DEPTH) perr(ps, "expression nested too deeply");
    expr_t *e = p_or(ps);
    if (accept_kw(ps, "if")) {
        expr_t *c = mk(ps, E_COND);
        c->a = e;
        c->b = p_or(ps);
        c->c = accept_kw(ps, "else") ? p_expr(ps) : NULL;
        e = c;
    }
    ps->depth--;
    return e;
}

/* ---- template structure ---- */

/* Finds the next tag from ps->p: the text before it goes to *text; returns the tag kind
 * ('{' expression, '%' statement, 0 end), with [x, xend) its inside. */
static int next_tag(parser_t *ps, const char **text, size_t *tlen, int *strip_before,
                    int *strip_after)
{
    const char *s = ps->p;
    for (;;) {
        const char *o = s;
        while (o + 1 < ps->end && !(o[0] == '{' && (o[1] == '{' || o[1] == '%' || o[1] == '#')))
            o++;
        *text = ps->p;
        if (o + 1 >= ps->end) {
            *tlen = (size_t)(ps->end - ps->p);
            ps->p = ps->end;
            return 0;
        }
        *tlen = (size_t)(o - ps->p);
        char kind = o[1];
        const char *in = o + 2;
        *strip_before = in < ps->end && *in == '-';
        if (*strip_before || (in < ps->end && *in == '+')) in++;
        const char *close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        const char *c = in;
        while (c + 1 < ps->end && !(c[0] == close[0] && c[1] == close[1])) {
            if (kind != '#' && (*c == '\'' || *c == '"')) { /* a closing mark inside a string */
                char q = *c++;
                while (c < ps->end && *c != q)
                    c += (*c == '\\') ? 2 : 1;
            }
            c++;
        }
        if (c + 1 >= ps->end) perr(ps, "unclosed tag");
        *strip_after = c > in && c[-1] == '-';
        ps->x = in;
        ps->xend = *strip_after ? c - 1 : c;
        ps->p = c + 2;
        if (kind == '#') {
            /* a comment: its text is kept, the comment dropped */
            (void)s;
            return '#';
        }
        return kind;
    }
}

static void body_add(parser_t *ps, body_t *b, node_t *n)
{
    node_t **v = palloc(ps, sizeof(node_t *) * (size_t)(b->n + 1));
    if (b->n) memcpy(v, b->v, sizeof(node_t *) * (size_t)b->n);
    v[b->n++] = n;
    b->v = v;
}

/* text between tags: trimmed as the surrounding tags ask */
typedef struct pending {
    node_t *text; /* the last text node, for a following {%- to trim */
} pending_t;

static void rstrip_node(node_t *n, int lstrip_blocks_only)
{
    if (!n) return;
    size_t l = n->tlen;
    if (lstrip_blocks_only) { /* spaces and tabs back to the line start, only if all blank */
        size_t k = l;
        while (k > 0 && (n->text[k - 1] == ' ' || n->text[k - 1] == '\t'))
            k--;
        if (k == 0 || n->text[k - 1] == '\n') n->tlen = k;
        return;
    }
    while (l > 0 && isspace((unsigned char)n->text[l - 1]))
        l--;
    n->tlen = l;
}

/* Parses nodes until a statement among stop (space-separated) or the end; returns that
 * statement's keyword (or NULL at the end) with ps->x after it. */
static const char *p_body(parser_t *ps, body_t *out, const char *const *stop, pending_t *pd,
                          int *lstrip_next)
{
    if (++ps->depth > TMPL_MAX_DEPTH) perr(ps, "blocks nested too deeply");
    for (;;) {
        const char *text;
        size_t tlen;
        int sb = 0, sa = 0;
        int kind = next_tag(ps, &text, &tlen, &sb, &sa);
        if (*lstrip_next == 1) { /* after -%}/-}}: drop leading whitespace */
            while (tlen && isspace((unsigned char)*text)) {
                if (*text == '\n') ps->line++;
                text++, tlen--;
            }
        } else if (*lstrip_next == 2 && tlen && *text == '\n') { /* trim_blocks */
            text++, tlen--;
            ps->line++;
        }
        node_t *tn = NULL;
        if (tlen) {
            tn = palloc(ps, sizeof(*tn));
            tn->kind = N_TEXT;
            tn->text = pstrndup(ps, text, tlen);
            tn->tlen = tlen;
            for (size_t i = 0; i < tlen; i++)
                ps->line += text[i] == '\n';
            body_add(ps, out, tn);
        }
        pd->text = tn;
        if (sb)
            rstrip_node(tn, 0);
        else if (kind == '%' || kind == '#')
            rstrip_node(tn, 1); /* lstrip_blocks */
        *lstrip_next = sa ? 1 : (kind == '%' || kind == '#') ? 2 : 0;
        if (!kind) {
            if (stop) perr(ps, "missing {%% %s %%}", stop[0]);
            ps->depth--;
            return NULL;
        }
        if (kind == '#') continue;
        if (kind == '{') {
            node_t *n = palloc(ps, sizeof(*n));
            n->kind = N_OUT;
            n->e = p_expr(ps);
            if (!at_end(ps)) perr(ps, "unexpected '%.20s' in {{ }}", ps->x);
            body_add(ps, out, n);
            continue;
        }
        char *kw = ident(ps);
        if (stop)
            for (const char *const *s = stop; *s; s++)
                if (!strcmp(kw, *s)) {
                    ps->depth--;
                    return *s;
                }
        node_t *n = palloc(ps, sizeof(*n));
        if (!strcmp(kw, "if")) {
            static const char *const st[] = {"endif", "elif", "else", NULL};
            static const char *const st2[] = {"endif", NULL};
            n->kind = N_IF;
            expr_t *conds[64];
            body_t bodies[64];
            int nc = 0;
            const char *end = "elif";
            while (!strcmp(end, "elif")) {
                if (nc == 64) perr(ps, "too many elif");
                conds[nc] = p_expr(ps);
                if (!at_end(ps)) perr(ps, "unexpected '%.20s' after the condition", ps->x);
                memset(&bodies[nc], 0, sizeof(body_t));
                end = p_body(ps, &bodies[nc], st, pd, lstrip_next);
                nc++;
            }
            if (!strcmp(end, "else")) {
                if (!at_end(ps)) perr(ps, "unexpected text after else");
                p_body(ps, &n->else_body, st2, pd, lstrip_next);
            }
            if (!at_end(ps)) perr(ps, "unexpected text after endif");
            n->conds = palloc(ps, sizeof(expr_t *) * (size_t)nc);
            n->bodies = palloc(ps, sizeof(body_t) * (size_t)nc);
            memcpy(n->conds, conds, sizeof(expr_t *) * (size_t)nc);
            memcpy(n->bodies, bodies, sizeof(body_t) * (size_t)nc);
            n->nconds = nc;
        } else if (!strcmp(kw, "for")) {
            static const char *const st[] = {"endfor", "else", NULL};
            static const char *const st2[] = {"endfor", NULL};
            n->kind = N_FOR;
            n->var = ident(ps);
            if (accept(ps, ",")) perr(ps, "for with several loop variables is not supported");
            if (!accept_kw(ps, "in")) perr(ps, "expected 'in' in for");
            n->e = p_expr(ps);
            if (!at_end(ps))
                perr(ps,
                     "unexpected '%.20s' in for (loop filters and recursive "
                     "are not supported)",
                     ps->x);
            const char *end = p_body(ps, &n->body, st, pd, lstrip_next);
            if (!strcmp(end, "else")) p_body(ps, &n->else_body, st2, pd, lstrip_next);
        } else if (!strcmp(kw, "set")) {
            n->kind = N_SET;
            n->var = ident(ps);
            if (accept(ps, ".")) perr(ps, "set of an attribute (namespace) is not supported");
            if (!accept(ps, "="))
                perr(ps, "block set ({%% set x %%}...{%% endset %%}) is not supported");
            n->e = p_expr(ps);
            if (!at_end(ps)) perr(ps, "unexpected '%.20s' in set", ps->x);
        } else if (!strcmp(kw, "macro")) {
            static const char *const st[] = {"endmacro", NULL};
            tok_tmpl_t *t = ps->t;
            if (ps->in_macro) perr(ps, "a macro defined inside a macro is not supported");
            if (t->nmacros == TMPL_MAX_MACROS) perr(ps, "more than %d macros", TMPL_MAX_MACROS);
            macro_t *m = &t->macros[t->nmacros];
            memset(m, 0, sizeof(*m));
            m->name = ident(ps);
            expect(ps, "(");
            if (!accept(ps, ")")) {
                do {
                    if (m->nparams == TMPL_MAX_PARAMS) perr(ps, "too many macro parameters");
                    m->params[m->nparams++] = ident(ps);
                    if (accept(ps, "=")) perr(ps, "macro parameter defaults are not supported");
                } while (accept(ps, ","));
                expect(ps, ")");
            }
            if (!at_end(ps)) perr(ps, "unexpected '%.20s' in macro", ps->x);
            ps->in_macro = 1;
            p_body(ps, &m->body, st, pd, lstrip_next);
            ps->in_macro = 0;
            t->nmacros++; /* callable after its definition (no recursion) */
            continue;
        } else if (!strcmp(kw, "generation") || !strcmp(kw, "endgeneration")) {
            continue; /* training-mask markers: no output of their own */
        } else {
            perr(ps, "statement '%s' is not supported", kw);
        }
        body_add(ps, out, n);
    }
}

void tok_tmpl_free(tok_tmpl_t *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->nalloc; i++)
        free(t->allocs[i]);
    free(t->allocs);
    free(t);
}

afd_status_t tok_tmpl_parse(const char *src, tok_tmpl_t **out, char *err, size_t errlen)
{
    size_t n = strlen(src);
    if (n > TMPL_MAX_SRC) {
        snprintf(err, errlen, "chat template longer than %u bytes", TMPL_MAX_SRC);
        return AFD_ERR_RANGE;
    }
    tok_tmpl_t *t = calloc(1, sizeof(*t));
    if (!t) return AFD_ERR_NOMEM;
    parser_t *ps = calloc(1, sizeof(*ps));
    if (!ps) {
        free(t);
        return AFD_ERR_NOMEM;
    }
    ps->t = t, ps->src = src, ps->p = src, ps->end = src + n, ps->line = 1;
    ps->err = err, ps->errlen = errlen;
    if (setjmp(ps->jb)) {
        free(ps);
        tok_tmpl_free(t);
        return AFD_ERR_FORMAT;
    }
    pending_t pd = {0};
    int lstrip_next = 0;
    p_body(ps, &t->top, NULL, &pd, &lstrip_next);
    free(ps);
    *out = t;
    return AFD_OK;
}

/* ---- values ---- */

enum { V_UNDEF, V_NONE, V_BOOL, V_NUM, V_STR, V_JSON, V_LIST, V_LOOP };

typedef struct val {
    int k;
    double n;
    const char *s; /* V_STR */
    size_t sl;
    const cJSON *j;    /* V_JSON: an array or object */
    struct val *items; /* V_LIST */
    size_t ni;
} val_t;

typedef struct var {
    const char *name;
    val_t v;
    int scope;
} var_t;

typedef struct rctx {
    const tok_tmpl_t *t;
    tok_buf_t bufs[TMPL_MAX_DEPTH]; /* macro calls' output, freed at the end */
    int nbufs;
    const cJSON *globals;
    var_t vars[TMPL_MAX_VARS];
    int nvars, scope;
    tok_buf_t *out;
    long steps;
    size_t mem;
    void **allocs;
    size_t nalloc, acap;
    char *err;
    size_t errlen;
    jmp_buf jb;
} rctx_t;

static void rerr(rctx_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void rerr(rctx_t *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, r->errlen, fmt, ap);
    va_end(ap);
    longjmp(r->jb, 1);
}

static void *ralloc(rctx_t *r, size_t n)
{
    r->mem += n;
    if (r->mem > TMPL_MAX_MEM)
        rerr(r, "chat template: rendering needs more than %u MB", TMPL_MAX_MEM >> 20);
    if (r->nalloc == r->acap) {
        size_t cap = r->acap ? r->acap * 2 : 256;
        void **a = realloc(r->allocs, cap * sizeof(*a));
        if (!a) rerr(r, "out of memory");
        r->allocs = a, r->acap = cap;
    }
    void *p = malloc(n ? n : 1);
    if (!p) rerr(r, "out of memory");
    r->allocs[r->nalloc++] = p;
    return p;
}

static val_t vstr(const char *s, size_t n)
{
    val_t v = {.k = V_STR, .s = s, .sl = n};
    return v;
}

static val_t vnum(double d)
{
    val_t v = {.k = V_NUM, .n = d};
    return v;
}

static val_t vbool(int b)
{
    val_t v = {.k = V_BOOL, .n = b ? 1 : 0};
    return v;
}

static val_t from_json(const cJSON *j)
{
    val_t v = {0};
    if (!j) return v;
    if (cJSON_IsString(j)) return vstr(j->valuestring, strlen(j->valuestring));
    if (cJSON_IsNumber(j)) return vnum(j->valuedouble);
    if (cJSON_IsBool(j)) return vbool(cJSON_IsTrue(j));
    if (cJSON_IsNull(j)) {
        v.k = V_NONE;
        return v;
    }
    v.k = V_JSON;
    v.j = j;
    return v;
}

static const char *kind_name(const val_t *v)
{
    static const char *n[] = {"undefined", "none", "boolean", "number",
                              "string",    "json", "list",    "loop"};
    if (v->k == V_JSON) return cJSON_IsArray(v->j) ? "list" : "mapping";
    return n[v->k];
}

static int truthy(const val_t *v)
{
    switch (v->k) {
    case V_BOOL:
    case V_NUM:
        return v->n != 0;
    case V_STR:
        return v->sl > 0;
    case V_JSON:
        return cJSON_GetArraySize(v->j) > 0;
    case V_LIST:
        return v->ni > 0;
    case V_LOOP:
        return 1;
    default:
        return 0;
    }
}

static void emit(rctx_t *r, tok_buf_t *o, const char *s, size_t n)
{
    if (o->len + n > TMPL_MAX_OUT)
        rerr(r, "chat template: output larger than %u MB", TMPL_MAX_OUT >> 20);
    if (tok_buf_add(o, s, n)) rerr(r, "out of memory");
}

/* The value as text (Jinja's str()). */
static val_t to_str(rctx_t *r, const val_t *v)
{
    char b[64];
    switch (v->k) {
    case V_STR:
        return *v;
    case V_UNDEF:
        return vstr("", 0);
    case V_NONE:
        return vstr("None", 4);
    case V_BOOL:
        return v->n ? vstr("True", 4) : vstr("False", 5);
    case V_NUM: {
        int n = v->n == floor(v->n) && fabs(v->n) < 1e15 ? snprintf(b, sizeof(b), "%.0f", v->n)
                                                         : snprintf(b, sizeof(b), "%g", v->n);
        char *s = ralloc(r, (size_t)n + 1);
        memcpy(s, b, (size_t)n + 1);
        return vstr(s, (size_t)n);
    }
    case V_JSON: {
        char *j = cJSON_PrintUnformatted(v->j);
        if (!j) rerr(r, "out of memory");
        size_t n = strlen(j);
        char *s = ralloc(r, n + 1);
        memcpy(s, j, n + 1);
        free(j);
        return vstr(s, n);
    }
    default:
        rerr(r, "chat template: cannot print a %s", kind_name(v));
    }
}

static int veq(const val_t *a, const val_t *b)
{
    if ((a->k == V_NUM || a->k == V_BOOL) && (b->k == V_NUM || b->k == V_BOOL)) return a->n == b->n;
    if (a->k != b->k) return 0;
    switch (a->k) {
    case V_STR:
        return a->sl == b->sl && !memcmp(a->s, b->s, a->sl);
    case V_JSON:
        return a->j == b->j;
    case V_UNDEF:
    case V_NONE:
        return 1;
    default:
        return 0;
    }
}

static size_t seq_len(rctx_t *r, const val_t *v)
{
    if (v->k == V_STR) {
        size_t n = 0; /* characters, not bytes */
        for (size_t i = 0; i < v->sl; i++)
            n += ((unsigned char)v->s[i] & 0xC0) != 0x80;
        return n;
    }
    if (v->k == V_JSON) return (size_t)cJSON_GetArraySize(v->j);
    if (v->k == V_LIST) return v->ni;
    rerr(r, "chat template: a %s has no length", kind_name(v));
}

/* A number used as an index or a slice bound: an integer within reach. */
static long to_index(rctx_t *r, const val_t *v)
{
    if (v->k != V_NUM || !(v->n >= -1e12 && v->n <= 1e12) || v->n != floor(v->n))
        rerr(r, "chat template: an index must be an integer of at most 1e12");
    return (long)v->n;
}

/* Byte offset of character k (0..count) in a UTF-8 string. */
static size_t char_offset(const val_t *v, long k)
{
    size_t i = 0;
    for (long c = 0; i < v->sl; i++) {
        if (((unsigned char)v->s[i] & 0xC0) == 0x80) continue;
        if (c++ == k) return i;
    }
    return v->sl;
}

static val_t seq_item(rctx_t *r, const val_t *v, long i)
{
    val_t u = {0};
    if (v->k == V_JSON && cJSON_IsArray(v->j)) {
        long n = cJSON_GetArraySize(v->j);
        if (i < 0) i += n;
        return i >= 0 && i < n ? from_json(cJSON_GetArrayItem(v->j, (int)i)) : u;
    }
    if (v->k == V_LIST) {
        long n = (long)v->ni;
        if (i < 0) i += n;
        return i >= 0 && i < n ? v->items[i] : u;
    }
    if (v->k == V_STR) { /* characters, as Python indexes a str */
        long n = (long)seq_len(r, v);
        if (i < 0) i += n;
        if (i < 0 || i >= n) return u;
        size_t a = char_offset(v, i), b = char_offset(v, i + 1);
        return vstr(v->s + a, b - a);
    }
    rerr(r, "chat template: cannot index a %s with a number", kind_name(v));
}

static val_t eval(rctx_t *r, const expr_t *e);
static void exec_body(rctx_t *r, const body_t *b);

static val_t lookup(rctx_t *r, const char *name)
{
    for (int i = r->nvars - 1; i >= 0; i--)
        if (!strcmp(r->vars[i].name, name)) return r->vars[i].v;
    return from_json(cJSON_GetObjectItemCaseSensitive(r->globals, name));
}

static void set_var(rctx_t *r, const char *name, val_t v)
{
    for (int i = r->nvars - 1; i >= 0 && r->vars[i].scope == r->scope; i--)
        if (!strcmp(r->vars[i].name, name)) {
            r->vars[i].v = v;
            return;
        }
    if (r->nvars == TMPL_MAX_VARS) rerr(r, "chat template: too many variables");
    r->vars[r->nvars++] = (var_t){name, v, r->scope};
}

static val_t attr(rctx_t *r, const val_t *o, const char *name)
{
    val_t u = {0};
    if (o->k == V_LOOP) {
        long i = (long)o->n, n = (long)o->sl;
        if (!strcmp(name, "index0")) return vnum((double)i);
        if (!strcmp(name, "index")) return vnum((double)i + 1);
        if (!strcmp(name, "first")) return vbool(i == 0);
        if (!strcmp(name, "last")) return vbool(i == n - 1);
        if (!strcmp(name, "length")) return vnum((double)n);
        if (!strcmp(name, "revindex")) return vnum((double)(n - i));
        if (!strcmp(name, "revindex0")) return vnum((double)(n - i - 1));
        rerr(r, "chat template: loop.%s is not supported", name);
    }
    if (o->k == V_JSON && cJSON_IsObject(o->j))
        return from_json(cJSON_GetObjectItemCaseSensitive(o->j, name));
    (void)r;
    return u;
}

static val_t cat(rctx_t *r, const val_t *a, const val_t *b)
{
    char *s = ralloc(r, a->sl + b->sl + 1);
    memcpy(s, a->s, a->sl);
    memcpy(s + a->sl, b->s, b->sl);
    return vstr(s, a->sl + b->sl);
}

static int contains(rctx_t *r, const val_t *hay, const val_t *x)
{
    if (hay->k == V_STR) {
        if (x->k != V_STR) rerr(r, "chat template: 'in' a string needs a string");
        if (!x->sl) return 1;
        return memmem(hay->s, hay->sl, x->s, x->sl) != NULL;
    }
    if (hay->k == V_JSON && cJSON_IsObject(hay->j))
        return x->k == V_STR && cJSON_GetObjectItemCaseSensitive(hay->j, x->s) != NULL;
    size_t n = seq_len(r, hay);
    for (size_t i = 0; i < n; i++) {
        val_t it = seq_item(r, hay, (long)i);
        if (veq(&it, x)) return 1;
    }
    return 0;
}

static val_t strip(rctx_t *r, val_t v, int left, int right)
{
    if (v.k != V_STR) rerr(r, "chat template: strip/trim of a %s", kind_name(&v));
    while (left && v.sl && isspace((unsigned char)v.s[0]))
        v.s++, v.sl--;
    while (right && v.sl && isspace((unsigned char)v.s[v.sl - 1]))
        v.sl--;
    return v;
}

static val_t casefold(rctx_t *r, val_t v, int up)
{
    if (v.k != V_STR) rerr(r, "chat template: upper/lower of a %s", kind_name(&v));
    char *s = ralloc(r, v.sl + 1);
    for (size_t i = 0; i < v.sl; i++)
        s[i] = (char)(up ? toupper((unsigned char)v.s[i]) : tolower((unsigned char)v.s[i]));
    return vstr(s, v.sl);
}

static val_t filter(rctx_t *r, const expr_t *e)
{
    const char *f = e->name;
    val_t v = eval(r, e->a);
    if (!strcmp(f, "default") || !strcmp(f, "d")) {
        if (e->nargs < 1) rerr(r, "chat template: default needs a value");
        return v.k == V_UNDEF ? eval(r, e->args[0]) : v;
    }
    if (!strcmp(f, "trim")) return strip(r, v, 1, 1);
    if (!strcmp(f, "length") || !strcmp(f, "count")) return vnum((double)seq_len(r, &v));
    if (!strcmp(f, "upper") || !strcmp(f, "lower")) return casefold(r, v, f[0] == 'u');
    if (!strcmp(f, "string")) return to_str(r, &v);
    if (!strcmp(f, "first")) return seq_item(r, &v, 0);
    if (!strcmp(f, "last")) return seq_item(r, &v, -1);
    if (!strcmp(f, "tojson")) {
        if (v.k == V_JSON) return to_str(r, &v);
        cJSON *j = v.k == V_STR    ? cJSON_CreateString(to_str(r, &v).s)
                   : v.k == V_NUM  ? cJSON_CreateNumber(v.n)
                   : v.k == V_BOOL ? cJSON_CreateBool(v.n != 0)
                                   : cJSON_CreateNull();
        char *p = j ? cJSON_PrintUnformatted(j) : NULL;
        cJSON_Delete(j);
        if (!p) rerr(r, "out of memory");
        size_t n = strlen(p);
        char *s = ralloc(r, n + 1);
        memcpy(s, p, n + 1);
        free(p);
        return vstr(s, n);
    }
    /* join */
    val_t sep = e->nargs ? eval(r, e->args[0]) : vstr("", 0);
    sep = to_str(r, &sep);
    size_t n = seq_len(r, &v);
    val_t acc = vstr("", 0);
    for (size_t i = 0; i < n; i++) {
        val_t it = seq_item(r, &v, (long)i);
        it = to_str(r, &it);
        if (i) acc = cat(r, &acc, &sep);
        acc = cat(r, &acc, &it);
    }
    return acc;
}

static int test(rctx_t *r, const expr_t *e)
{
    val_t v = eval(r, e->a);
    const char *t = e->name;
    int res;
    if (!strcmp(t, "defined"))
        res = v.k != V_UNDEF;
    else if (!strcmp(t, "undefined"))
        res = v.k == V_UNDEF;
    else if (!strcmp(t, "none"))
        res = v.k == V_NONE;
    else if (!strcmp(t, "string"))
        res = v.k == V_STR;
    else if (!strcmp(t, "number"))
        res = v.k == V_NUM;
    else if (!strcmp(t, "boolean"))
        res = v.k == V_BOOL;
    else if (!strcmp(t, "mapping"))
        res = v.k == V_JSON && cJSON_IsObject(v.j);
    else /* sequence, iterable */
        res = v.k == V_STR || v.k == V_LIST || v.k == V_JSON;
    return res != e->neg;
}

static val_t eval(rctx_t *r, const expr_t *e)
{
    if (++r->steps > TMPL_MAX_STEPS) rerr(r, "chat template: too many steps");
    val_t a, b, u = {0};
    switch (e->kind) {
    case E_LIT_STR:
        return vstr(e->name, e->nlen);
    case E_LIT_NUM:
        return vnum(e->num);
    case E_LIT_BOOL:
        return vbool(e->num != 0);
    case E_LIT_NONE:
        u.k = V_NONE;
        return u;
    case E_VAR:
        return lookup(r, e->name);
    case E_ATTR:
        a = eval(r, e->a);
        return attr(r, &a, e->name);
    case E_INDEX:
        a = eval(r, e->a);
        b = eval(r, e->b);
        if (b.k == V_STR) {
            char *k = ralloc(r, b.sl + 1);
            memcpy(k, b.s, b.sl);
            k[b.sl] = 0;
            return attr(r, &a, k);
        }
        if (b.k != V_NUM) rerr(r, "chat template: an index must be a number or a string");
        return seq_item(r, &a, to_index(r, &b));
    case E_SLICE: {
        a = eval(r, e->a);
        long n = (long)seq_len(r, &a), lo = 0, hi = n;
        if (e->b) {
            b = eval(r, e->b);
            lo = to_index(r, &b);
        }
        if (e->c) {
            b = eval(r, e->c);
            hi = to_index(r, &b);
        }
        if (lo < 0) lo += n;
        if (hi < 0) hi += n;
        if (lo < 0) lo = 0;
        if (hi > n) hi = n;
        if (hi < lo) hi = lo;
        if (a.k == V_STR) {
            size_t from = char_offset(&a, lo), to = char_offset(&a, hi);
            return vstr(a.s + from, to - from);
        }
        val_t l = {.k = V_LIST, .ni = (size_t)(hi - lo)};
        l.items = ralloc(r, sizeof(val_t) * (l.ni ? l.ni : 1));
        for (long i = lo; i < hi; i++)
            l.items[i - lo] = seq_item(r, &a, i);
        return l;
    }
    case E_LIST: {
        val_t l = {.k = V_LIST, .ni = (size_t)e->nargs};
        l.items = ralloc(r, sizeof(val_t) * (l.ni ? l.ni : 1));
        for (int i = 0; i < e->nargs; i++)
            l.items[i] = eval(r, e->args[i]);
        return l;
    }
    case E_NOT:
        a = eval(r, e->a);
        return vbool(!truthy(&a));
    case E_NEG:
        a = eval(r, e->a);
        if (a.k != V_NUM) rerr(r, "chat template: '-' of a %s", kind_name(&a));
        return vnum(-a.n);
    case E_COND:
        b = eval(r, e->b);
        if (truthy(&b)) return eval(r, e->a);
        return e->c ? eval(r, e->c) : u;
    case E_TEST:
        return vbool(test(r, e));
    case E_FILTER:
        return filter(r, e);
    case E_CALL:
        a = eval(r, e->args[0]);
        a = to_str(r, &a);
        rerr(r, "%.*s", (int)(a.sl > 400 ? 400 : a.sl), a.s);
    case E_MACRO: {
        const macro_t *m = &r->t->macros[(int)e->num];
        val_t args[TMPL_MAX_PARAMS] = {0};
        for (int i = 0; i < e->nargs; i++)
            args[i] = eval(r, e->args[i]);
        if (r->nbufs == TMPL_MAX_DEPTH) rerr(r, "chat template: macro calls nested too deeply");
        tok_buf_t *save = r->out, *buf = &r->bufs[r->nbufs++];
        buf->len = 0;
        int nv = r->nvars;
        r->scope++;
        for (int i = 0; i < m->nparams; i++)
            set_var(r, m->params[i], args[i]);
        r->out = buf;
        exec_body(r, &m->body);
        r->out = save;
        r->scope--;
        r->nvars = nv;
        char *str = ralloc(r, buf->len + 1);
        if (buf->len) memcpy(str, buf->p, buf->len);
        r->nbufs--;
        return vstr(str, buf->len);
    }
    case E_METHOD: {
        a = eval(r, e->a);
        const char *m = e->name;
        if (!strcmp(m, "strip")) return strip(r, a, 1, 1);
        if (!strcmp(m, "lstrip")) return strip(r, a, 1, 0);
        if (!strcmp(m, "rstrip")) return strip(r, a, 0, 1);
        if (!strcmp(m, "upper") || !strcmp(m, "lower")) return casefold(r, a, m[0] == 'u');
        if (!strcmp(m, "replace")) {
            if (e->nargs != 2) rerr(r, "chat template: replace takes two arguments");
            b = eval(r, e->args[0]);
            val_t c2 = eval(r, e->args[1]);
            if (a.k != V_STR || b.k != V_STR || c2.k != V_STR || !b.sl)
                rerr(r, "chat template: replace needs strings (a non-empty one to find)");
            val_t acc = vstr("", 0);
            size_t i = 0;
            for (const char *f; (f = memmem(a.s + i, a.sl - i, b.s, b.sl));) {
                val_t pre = vstr(a.s + i, (size_t)(f - (a.s + i)));
                acc = cat(r, &acc, &pre);
                acc = cat(r, &acc, &c2);
                i = (size_t)(f - a.s) + b.sl;
            }
            val_t rest = vstr(a.s + i, a.sl - i);
            return cat(r, &acc, &rest);
        }
        if (e->nargs != 1) rerr(r, "chat template: %s takes one argument", m);
        b = eval(r, e->args[0]);
        if (a.k != V_STR || b.k != V_STR) rerr(r, "chat template: %s needs strings", m);
        if (b.sl > a.sl) return vbool(0);
        return vbool(!memcmp(m[0] == 's' ? a.s : a.s + a.sl - b.sl, b.s, b.sl));
    }
    case E_BIN:
        break;
    }
    if (e->op == OP_OR) {
        a = eval(r, e->a);
        return truthy(&a) ? a : eval(r, e->b);
    }
    if (e->op == OP_AND) {
        a = eval(r, e->a);
        return !truthy(&a) ? a : eval(r, e->b);
    }
    a = eval(r, e->a);
    b = eval(r, e->b);
    switch (e->op) {
    case OP_EQ:
        return vbool(veq(&a, &b));
    case OP_NE:
        return vbool(!veq(&a, &b));
    case OP_IN:
        return vbool(contains(r, &b, &a));
    case OP_NOTIN:
        return vbool(!contains(r, &b, &a));
    case OP_CAT:
        a = to_str(r, &a);
        b = to_str(r, &b);
        return cat(r, &a, &b);
    case OP_ADD:
        if (a.k == V_STR && b.k == V_STR) return cat(r, &a, &b);
        break;
    case OP_LT:
    case OP_GT:
    case OP_LE:
    case OP_GE:
        if (a.k == V_STR && b.k == V_STR) {
            size_t m = a.sl < b.sl ? a.sl : b.sl;
            int c = memcmp(a.s, b.s, m);
            if (!c) c = a.sl < b.sl ? -1 : a.sl > b.sl;
            a = vnum(c), b = vnum(0);
        }
        break;
    }
    if (a.k != V_NUM || b.k != V_NUM)
        rerr(r, "chat template: cannot apply an operator to a %s and a %s", kind_name(&a),
             kind_name(&b));
    switch (e->op) {
    case OP_ADD:
        return vnum(a.n + b.n);
    case OP_SUB:
        return vnum(a.n - b.n);
    case OP_MUL:
        return vnum(a.n * b.n);
    case OP_DIV:
        if (b.n == 0) rerr(r, "chat template: division by zero");
        return vnum(a.n / b.n);
    case OP_MOD:
        if (b.n == 0) rerr(r, "chat template: division by zero");
        return vnum(fmod(a.n, b.n));
    case OP_LT:
        return vbool(a.n < b.n);
    case OP_GT:
        return vbool(a.n > b.n);
    case OP_LE:
        return vbool(a.n <= b.n);
    default:
        return vbool(a.n >= b.n);
    }
}

static void exec_body(rctx_t *r, const body_t *b);

static void exec_node(rctx_t *r, const node_t *n)
{
    if (++r->steps > TMPL_MAX_STEPS) rerr(r, "chat template: too many steps");
    switch (n->kind) {
    case N_TEXT:
        emit(r, r->out, n->text, n->tlen);
        return;
    case N_OUT: {
        val_t v = eval(r, n->e);
        v = to_str(r, &v);
        emit(r, r->out, v.s, v.sl);
        return;
    }
    case N_SET:
        set_var(r, n->var, eval(r, n->e));
        return;
    case N_IF:
        for (int i = 0; i < n->nconds; i++) {
            val_t c = eval(r, n->conds[i]);
            if (truthy(&c)) return exec_body(r, &n->bodies[i]);
        }
        return exec_body(r, &n->else_body);
    case N_FOR: {
        val_t it = eval(r, n->e);
        if (it.k == V_UNDEF || it.k == V_NONE) it = (val_t){.k = V_LIST};
        int keys = it.k == V_JSON && cJSON_IsObject(it.j);
        size_t len = keys ? (size_t)cJSON_GetArraySize(it.j) : seq_len(r, &it);
        if (!len) return exec_body(r, &n->else_body);
        if (r->scope >= TMPL_MAX_DEPTH) rerr(r, "chat template: loops nested too deeply");
        int save = r->nvars;
        r->scope++;
        const cJSON *kj = keys ? it.j->child : NULL;
        for (size_t i = 0; i < len; i++) {
            r->nvars = save;
            val_t x;
            if (keys) {
                x = vstr(kj->string, strlen(kj->string));
                kj = kj->next;
            } else
                x = seq_item(r, &it, (long)i);
            set_var(r, n->var, x);
            set_var(r, "loop", (val_t){.k = V_LOOP, .n = (double)i, .sl = len});
            exec_body(r, &n->body);
        }
        r->scope--;
        r->nvars = save;
        return;
    }
    }
}

static void exec_body(rctx_t *r, const body_t *b)
{
    for (int i = 0; i < b->n; i++)
        exec_node(r, b->v[i]);
}

afd_status_t tok_tmpl_render(const tok_tmpl_t *t, const cJSON *ctx, tok_buf_t *out, char *err,
                             size_t errlen)
{
    rctx_t *r = calloc(1, sizeof(*r));
    if (!r) return AFD_ERR_NOMEM;
    r->t = t;
    r->globals = ctx;
    r->out = out;
    r->err = err, r->errlen = errlen;
    volatile afd_status_t st = AFD_OK;
    if (setjmp(r->jb))
        st = AFD_ERR_INVALID;
    else {
        exec_body(r, &t->top);
        if (!out->p && tok_buf_add(out, "", 0)) st = AFD_ERR_NOMEM;
    }
    for (size_t i = 0; i < r->nalloc; i++)
        free(r->allocs[i]);
    for (int i = 0; i < TMPL_MAX_DEPTH; i++)
        tok_buf_free(&r->bufs[i]);
    free(r->allocs);
    free(r);
    return st;
}

/* ---- tokenizer_config.json ---- */

static char *token_string(const cJSON *v)
{
    if (cJSON_IsString(v)) return strdup(v->valuestring);
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content"); /* AddedToken form */
    return cJSON_IsString(c) ? strdup(c->valuestring) : NULL;
}

afd_status_t tok_chat_load(const char *config_path, tok_chat_t *out)
{
    char *text;
    size_t len;
    memset(out, 0, sizeof(*out));
    afd_status_t st = afd_read_file(config_path, TOK_MAX_FILE, &text, &len);
    if (st) return st;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root) {
        afd_error("%s: not valid JSON", config_path);
        return AFD_ERR_FORMAT;
    }
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(root, "chat_template");
    if (cJSON_IsArray(ct)) { /* named templates: the "default" one */
        const cJSON *e, *found = NULL;
        cJSON_ArrayForEach(e, ct)
        {
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(e, "name");
            if (cJSON_IsString(nm) && !strcmp(nm->valuestring, "default"))
                found = cJSON_GetObjectItemCaseSensitive(e, "template");
        }
        ct = found;
    }
    char err[512];
    if (ct && !cJSON_IsNull(ct) && !cJSON_IsString(ct)) {
        afd_error("%s: chat_template must be a string or a list of named templates", config_path);
        cJSON_Delete(root);
        return AFD_ERR_FORMAT;
    }
    st =
        cJSON_IsString(ct) ? tok_tmpl_parse(ct->valuestring, &out->tmpl, err, sizeof(err)) : AFD_OK;
    if (st) {
        afd_error("%s: %s", config_path, err);
        cJSON_Delete(root);
        return st;
    }
    out->bos_token = token_string(cJSON_GetObjectItemCaseSensitive(root, "bos_token"));
    out->eos_token = token_string(cJSON_GetObjectItemCaseSensitive(root, "eos_token"));
    out->add_bos_token = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "add_bos_token"));
    cJSON_Delete(root);
    return AFD_OK;
}

void tok_chat_fini(tok_chat_t *c)
{
    tok_tmpl_free(c->tmpl);
    free(c->bos_token);
    free(c->eos_token);
    memset(c, 0, sizeof(*c));
}
