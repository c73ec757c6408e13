/* afd_opts: table-driven options from defaults, a config file, the environment and flags. */
#define _GNU_SOURCE
#include "afd_opts.h"
#include "afd_log.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const afd_opt_t *opt_find(const afd_opt_t *t, const char *name, size_t len)
{
    for (; t->name; t++)
        if (strlen(t->name) == len && strncmp(t->name, name, len) == 0) return t;
    return NULL;
}

static afd_status_t opt_set(const afd_opt_t *o, void *cfg, const char *val, const char *from)
{
    char *field = (char *)cfg + o->offset;
    char *end;
    switch (o->type) {
    case AFD_OPT_INT: {
        errno = 0;
        long v = strtol(val, &end, 0);
        if (errno || end == val || *end) {
            afd_error("option %s (%s): '%s' is not an integer", o->name, from, val);
            return AFD_ERR_INVALID;
        }
        if ((o->min != 0 || o->max != 0) && (v < o->min || v > o->max)) {
            afd_error("option %s (%s): %ld is outside [%.0f, %.0f]", o->name, from, v, o->min,
                      o->max);
            return AFD_ERR_RANGE;
        }
        *(long *)field = v;
        return AFD_OK;
    }
    case AFD_OPT_DOUBLE: {
        errno = 0;
        double v = strtod(val, &end);
        if (errno || end == val || *end || !isfinite(v)) {
            afd_error("option %s (%s): '%s' is not a number", o->name, from, val);
            return AFD_ERR_INVALID;
        }
        if ((o->min != 0 || o->max != 0) && (v < o->min || v > o->max)) {
            afd_error("option %s (%s): %g is outside [%g, %g]", o->name, from, v, o->min, o->max);
            return AFD_ERR_RANGE;
        }
        *(double *)field = v;
        return AFD_OK;
    }
    case AFD_OPT_BOOL:
        if (!strcmp(val, "1") || !strcasecmp(val, "true") || !strcasecmp(val, "yes") ||
            !strcasecmp(val, "on"))
            *(int *)field = 1;
        else if (!strcmp(val, "0") || !strcasecmp(val, "false") || !strcasecmp(val, "no") ||
                 !strcasecmp(val, "off"))
            *(int *)field = 0;
        else {
            afd_error("option %s (%s): '%s' is not a boolean", o->name, from, val);
            return AFD_ERR_INVALID;
        }
        return AFD_OK;
    case AFD_OPT_STRING: {
        char *dup = strdup(val);
        if (!dup) return AFD_ERR_NOMEM;
        free(*(char **)field);
        *(char **)field = dup;
        return AFD_OK;
    }
    case AFD_OPT_LIST: {
        afd_strlist_t *l = (afd_strlist_t *)field;
        char **nv = realloc(l->v, sizeof(char *) * (size_t)(l->n + 1));
        if (!nv) return AFD_ERR_NOMEM;
        l->v = nv;
        if (!(l->v[l->n] = strdup(val))) return AFD_ERR_NOMEM;
        l->n++;
        return AFD_OK;
    }
    }
    return AFD_ERR_INVALID;
}

static afd_status_t opts_file(const afd_opt_t *table, void *cfg, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        afd_error("config file %s: %m", path);
        return AFD_ERR_IO;
    }
    char line[4096];
    int lineno = 0;
    afd_status_t st = AFD_OK;
    while (st == AFD_OK && fgets(line, sizeof(line), f)) {
        lineno++;
        char *p = line;
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '#' || *p == 0) continue;
        char *eq = strchr(p, '=');
        if (!eq) {
            afd_error("config file %s:%d: expected 'name = value'", path, lineno);
            st = AFD_ERR_FORMAT;
            break;
        }
        char *ne = eq;
        while (ne > p && isspace((unsigned char)ne[-1]))
            ne--;
        char *v = eq + 1;
        while (isspace((unsigned char)*v))
            v++;
        char *ve = v + strlen(v);
        while (ve > v && isspace((unsigned char)ve[-1]))
            ve--;
        *ve = 0;
        const afd_opt_t *o = opt_find(table, p, (size_t)(ne - p));
        if (!o) {
            afd_error("config file %s:%d: unknown option '%.*s'", path, lineno, (int)(ne - p), p);
            st = AFD_ERR_INVALID;
            break;
        }
        char from[64];
        snprintf(from, sizeof(from), "config line %d", lineno);
        st = opt_set(o, cfg, v, from);
    }
    fclose(f);
    return st;
}

static afd_status_t opts_parse(const afd_opt_t *table, void *cfg, int argc, char **argv,
                               const char *usage, int *first_arg)
{
    afd_status_t st;
    for (const afd_opt_t *o = table; o->name; o++)
        if (o->def && o->type != AFD_OPT_LIST && (st = opt_set(o, cfg, o->def, "default")))
            return st;

    /* a config file first, so that the environment and flags override it */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--") || strncmp(argv[i], "--", 2) != 0) break; /* the options end */
        if (!strcmp(argv[i], "--config")) {
            if (i + 1 >= argc) {
                afd_error("option --config needs a file");
                return AFD_ERR_INVALID;
            }
            if ((st = opts_file(table, cfg, argv[++i]))) return st;
        } else if (!strncmp(argv[i], "--config=", 9)) {
            if ((st = opts_file(table, cfg, argv[i] + 9))) return st;
        } else if (!strchr(argv[i], '=')) {
            /* skip an option's separate value so it is not taken for the end of options */
            const afd_opt_t *o = opt_find(table, argv[i] + 2, strlen(argv[i] + 2));
            if (o && o->type != AFD_OPT_BOOL && i + 1 < argc) i++;
        }
    }
    for (const afd_opt_t *o = table; o->name; o++) {
        if ((o->flags & AFD_OPT_NOENV) || o->type == AFD_OPT_LIST) continue;
        char env[128] = "AFD_";
        size_t k = 4;
        for (const char *c = o->name; *c && k < sizeof(env) - 1; c++)
            env[k++] = *c == '-' ? '_' : (char)toupper((unsigned char)*c);
        env[k] = 0;
        const char *v = getenv(env);
        if (v && (st = opt_set(o, cfg, v, env))) return st;
    }

    int print = 0, i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        if (strncmp(a, "--", 2) != 0) break;
        a += 2;
        if (!strcmp(a, "help")) {
            afd_opts_help(stdout, table, usage);
            return AFD_ERR_CANCELED;
        }
        if (!strcmp(a, "print-config")) {
            print = 1;
            continue;
        }
        const char *eq = strchr(a, '=');
        size_t len = eq ? (size_t)(eq - a) : strlen(a);
        if (len == 6 && !strncmp(a, "config", 6)) {
            if (!eq) i++;
            continue;
        }
        const afd_opt_t *o = opt_find(table, a, len);
        if (!o) {
            afd_error("unknown option --%.*s (see --help)", (int)len, a);
            return AFD_ERR_INVALID;
        }
        const char *val;
        if (eq)
            val = eq + 1;
        else if (o->type == AFD_OPT_BOOL)
            val = "1";
        else if (i + 1 < argc)
            val = argv[++i];
        else {
            afd_error("option --%s needs a value", o->name);
            return AFD_ERR_INVALID;
        }
        char from[80];
        snprintf(from, sizeof(from), "--%s", o->name);
        if ((st = opt_set(o, cfg, val, from))) return st;
    }
    if (first_arg) *first_arg = i;
    if (print) {
        afd_opts_print(stdout, table, cfg);
        return AFD_ERR_CANCELED;
    }
    return AFD_OK;
}

afd_status_t afd_opts_parse(const afd_opt_t *table, void *cfg, int argc, char **argv,
                            const char *usage, int *first_arg)
{
    afd_status_t st = opts_parse(table, cfg, argc, argv, usage, first_arg);
    /* --help, --print-config and errors end the program: nothing parsed is kept */
    if (st != AFD_OK) afd_opts_free(table, cfg);
    return st;
}

void afd_opts_help(FILE *out, const afd_opt_t *table, const char *usage)
{
    if (usage)
        fprintf(out,
                "%s\n\noptions (also AFD_<NAME> in the environment, or name = value in --config "
                "FILE):\n",
                usage);
    for (const afd_opt_t *o = table; o->name; o++) {
        const char *arg = o->type == AFD_OPT_BOOL     ? ""
                          : o->type == AFD_OPT_INT    ? " N"
                          : o->type == AFD_OPT_DOUBLE ? " X"
                                                      : " S";
        char left[64];
        snprintf(left, sizeof(left), "--%s%s", o->name, arg);
        fprintf(out, "  %-26s %s", left, o->doc ? o->doc : "");
        if (o->def && !(o->flags & AFD_OPT_SECRET)) fprintf(out, " (default: %s)", o->def);
        if (o->type == AFD_OPT_LIST) fprintf(out, " (repeatable)");
        fputc('\n', out);
    }
    fprintf(out, "  %-26s %s\n  %-26s %s\n  %-26s %s\n", "--config FILE", "read options from FILE",
            "--print-config", "print the effective options and exit", "--help",
            "print this help and exit");
}

void afd_opts_print(FILE *out, const afd_opt_t *table, const void *cfg)
{
    for (const afd_opt_t *o = table; o->name; o++) {
        const char *field = (const char *)cfg + o->offset;
        fprintf(out, "%s = ", o->name);
        if (o->flags & AFD_OPT_SECRET) {
            fprintf(out, "%s\n", *(char *const *)field ? "(set)" : "");
            continue;
        }
        switch (o->type) {
        case AFD_OPT_INT:
            fprintf(out, "%ld\n", *(const long *)field);
            break;
        case AFD_OPT_DOUBLE:
            fprintf(out, "%g\n", *(const double *)field);
            break;
        case AFD_OPT_BOOL:
            fprintf(out, "%s\n", *(const int *)field ? "true" : "false");
            break;
        case AFD_OPT_STRING: {
            const char *s = *(char *const *)field;
            fprintf(out, "%s\n", s ? s : "");
            break;
        }
        case AFD_OPT_LIST: {
            const afd_strlist_t *l = (const afd_strlist_t *)field;
            for (int k = 0; k < l->n; k++)
                fprintf(out, "%s%s", k ? " " : "", l->v[k]);
            fputc('\n', out);
            break;
        }
        }
    }
}

void afd_opts_free(const afd_opt_t *table, void *cfg)
{
    for (const afd_opt_t *o = table; o->name; o++) {
        char *field = (char *)cfg + o->offset;
        if (o->type == AFD_OPT_STRING) {
            free(*(char **)field);
            *(char **)field = NULL;
        } else if (o->type == AFD_OPT_LIST) {
            afd_strlist_t *l = (afd_strlist_t *)field;
            for (int k = 0; k < l->n; k++)
                free(l->v[k]);
            free(l->v);
            l->v = NULL;
            l->n = 0;
        }
    }
}

afd_status_t afd_parse_int_list(const char *s, long min, long max, int **out, int *n)
{
    int cap = 16, cnt = 0;
    int *v = malloc(sizeof(int) * (size_t)cap);
    if (!v) return AFD_ERR_NOMEM;
    const char *p = s;
    while (*p) {
        while (isspace((unsigned char)*p))
            p++;
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || x < min || x > max || x < INT_MIN || x > INT_MAX) {
            free(v);
            return end == p ? AFD_ERR_INVALID : AFD_ERR_RANGE;
        }
        if (cnt == cap) {
            int *nv = realloc(v, sizeof(int) * (size_t)(cap *= 2));
            if (!nv) {
                free(v);
                return AFD_ERR_NOMEM;
            }
            v = nv;
        }
        v[cnt++] = (int)x;
        p = end;
        while (isspace((unsigned char)*p))
            p++;
        if (*p == ',') {
            p++;
            if (!*p) {
                free(v);
                return AFD_ERR_INVALID;
            }
        } else if (*p) {
            free(v);
            return AFD_ERR_INVALID;
        }
    }
    *out = v;
    *n = cnt;
    return AFD_OK;
}
