/*
 * afd_opts: a program's options in one table (name, type, default, doc, field).
 * One parser reads, in increasing priority, the defaults, a config file given by
 * --config (lines "name = value", '#' comments), the environment (AFD_NAME with
 * dashes as underscores, upper case) and the command line (--name value or
 * --name=value). The same table prints --help and --print-config.
 */
#ifndef AFD_OPTS_H
#define AFD_OPTS_H

#include "afd_status.h"

#include <stddef.h>
#include <stdio.h>

typedef enum afd_opt_type {
    AFD_OPT_INT,    /* long, bounded by [min, max] */
    AFD_OPT_DOUBLE, /* double, bounded by [min, max] */
    AFD_OPT_STRING, /* char * (owned by the parsed struct; afd_opts_free releases) */
    AFD_OPT_BOOL,   /* int 0/1; "--name" alone sets it, "--name=false" clears it */
    AFD_OPT_LIST    /* afd_strlist_t; each occurrence appends (flags only) */
} afd_opt_type_t;

#define AFD_OPT_SECRET 0x1 /* value never printed by --print-config */
#define AFD_OPT_NOENV  0x2 /* not read from the environment */

typedef struct afd_strlist {
    char **v;
    int n;
} afd_strlist_t;

typedef struct afd_opt {
    const char *name; /* long flag without the dashes, e.g. "max-tokens" */
    afd_opt_type_t type;
    const char *def; /* default as text; NULL for none */
    size_t offset;   /* offsetof the field in the caller's struct */
    double min, max; /* bounds for numbers */
    int flags;
    const char *doc; /* one line for --help */
} afd_opt_t;

#define AFD_OPTS_END                                                                               \
    {                                                                                              \
        NULL, 0, NULL, 0, 0, 0, 0, NULL                                                            \
    }

/*
 * Parses the table into cfg. Non-option arguments are left in argv[*first_arg..argc)
 * (the parser permutes nothing: parsing stops at "--" or the first non-option).
 * --help prints help and returns AFD_ERR_CANCELED;
 * on any status but AFD_OK the strings and lists already parsed are freed;
 * --print-config prints the effective configuration likewise. Errors name the
 * option and are logged.
 */
afd_status_t afd_opts_parse(const afd_opt_t *table, void *cfg, int argc, char **argv,
                            const char *usage, int *first_arg);
void afd_opts_help(FILE *out, const afd_opt_t *table, const char *usage);
void afd_opts_print(FILE *out, const afd_opt_t *table, const void *cfg);
/* Frees the strings and lists the table owns in cfg. */
void afd_opts_free(const afd_opt_t *table, void *cfg);

/* Parses a comma list of ints ("1,2,3") with every value in [min, max]; *out is malloc'd. */
afd_status_t afd_parse_int_list(const char *s, long min, long max, int **out, int *n);

#endif
