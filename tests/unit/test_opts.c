/*
 * test_opts: common/util/afd_opts.h (table-driven options).
 *   - defaults for every type; --x v and --x=v; bool flags (--flag, --flag=false/yes/off);
 *     where parsing stops ("--", the first non-option) and *first_arg;
 *   - the environment (AFD_NAME, dashes as underscores, upper case; AFD_OPT_NOENV);
 *   - priority: flag > environment > config file > default, each layer checked alone;
 *   - the config file: comments, blank lines, spaces, --config=FILE, and its errors
 *     (missing file, a line without '=', unknown name, bad value, out of bounds);
 *   - bounds and malformed numbers, unknown options, a missing value;
 *   - list options accumulate; --help and --print-config return AFD_ERR_CANCELED;
 *     --print-config hides secrets; help lists every option with its default;
 *   - afd_parse_int_list edge cases.
 * Tests named test_regression_* pin library bugs found while writing this file (now fixed;
 * the comment above each names the place and the expected result).
 * Every test sets and clears its own environment variables; strings are freed with
 * afd_opts_free so the sanitizer build stays leak-free.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_opts.h"

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct cfg {
    long port;
    long max_tokens;
    long workers; /* no bounds (min = max = 0) */
    double ratio;
    char *name;
    char *token;
    int verbose;
    int color;
    afd_strlist_t peers;
    char *nodef; /* no default */
    long local;  /* never read from the environment */
} cfg_t;

#define O(f) offsetof(cfg_t, f)
static const afd_opt_t table[] = {
    {"port", AFD_OPT_INT, "8080", O(port), 1, 65535, 0, "listen port"},
    {"max-tokens", AFD_OPT_INT, "256", O(max_tokens), 1, 1 << 20, 0, "tokens per request"},
    {"workers", AFD_OPT_INT, "-3", O(workers), 0, 0, 0, "unbounded"},
    {"ratio", AFD_OPT_DOUBLE, "0.5", O(ratio), 0, 1, 0, "a fraction"},
    {"name", AFD_OPT_STRING, "afd", O(name), 0, 0, 0, "a name"},
    {"token", AFD_OPT_STRING, "hunter2", O(token), 0, 0, AFD_OPT_SECRET, "a secret"},
    {"verbose", AFD_OPT_BOOL, "0", O(verbose), 0, 0, 0, "chatty"},
    {"color", AFD_OPT_BOOL, "true", O(color), 0, 0, 0, "colour"},
    {"peer", AFD_OPT_LIST, NULL, O(peers), 0, 0, 0, "a peer"},
    {"nodef", AFD_OPT_STRING, NULL, O(nodef), 0, 0, 0, "no default"},
    {"local", AFD_OPT_INT, "7", O(local), 0, 100, AFD_OPT_NOENV, "not from the environment"},
    AFD_OPTS_END,
};

static const char *env_names[] = {"AFD_PORT", "AFD_MAX_TOKENS", "AFD_WORKERS", "AFD_RATIO",
                                  "AFD_NAME", "AFD_TOKEN",      "AFD_VERBOSE", "AFD_COLOR",
                                  "AFD_PEER", "AFD_NODEF",      "AFD_LOCAL",   "AFD_MAX-TOKENS"};

static int clear_env(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(env_names) / sizeof(env_names[0]); i++)
        unsetenv(env_names[i]);
    return 0;
}

static char g_dir[512];

static int group_setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TEST_TMP");
    snprintf(g_dir, sizeof(g_dir), "%s/afd_test_opts_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(g_dir) ? clear_env(state) : -1;
}

static char g_files[16][600];
static int g_nfiles;

static int group_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_nfiles; i++)
        unlink(g_files[i]);
    rmdir(g_dir);
    return 0;
}

/* writes text to a new file in the test directory and returns its path */
static const char *conf(const char *text)
{
    assert_true(g_nfiles < 16);
    char *p = g_files[g_nfiles];
    snprintf(p, sizeof(g_files[0]), "%s/c%d.conf", g_dir, g_nfiles);
    g_nfiles++;
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

/* parses argv (NULL-terminated, argv[0] included) into a zeroed cfg */
static afd_status_t parse(cfg_t *c, int *first, char **argv)
{
    int argc = 0;
    while (argv[argc])
        argc++;
    memset(c, 0, sizeof(*c));
    return afd_opts_parse(table, c, argc, argv, "usage: test [options]", first);
}

#define ARGV(...) ((char *[]){"prog", __VA_ARGS__, NULL})
#define ARGV0     ((char *[]){"prog", NULL})

/* runs f with stdout going to /dev/null (help text) */
static afd_status_t parse_quiet(cfg_t *c, int *first, char **argv)
{
    fflush(stdout);
    int saved = dup(1), nul = open("/dev/null", O_WRONLY);
    dup2(nul, 1);
    close(nul);
    afd_status_t st = parse(c, first, argv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    return st;
}

static void test_defaults(void **state)
{
    (void)state;
    cfg_t c;
    int first = -1;
    assert_int_equal(parse(&c, &first, ARGV0), AFD_OK);
    assert_int_equal(first, 1);
    assert_int_equal(c.port, 8080);
    assert_int_equal(c.max_tokens, 256);
    assert_int_equal(c.workers, -3);
    assert_true(c.ratio == 0.5);
    assert_string_equal(c.name, "afd");
    assert_string_equal(c.token, "hunter2");
    assert_int_equal(c.verbose, 0);
    assert_int_equal(c.color, 1);
    assert_int_equal(c.peers.n, 0);
    assert_null(c.nodef);
    assert_int_equal(c.local, 7);
    afd_opts_free(table, &c);
    assert_null(c.name);
    assert_null(c.token);
    /* first_arg may be NULL */
    memset(&c, 0, sizeof(c));
    assert_int_equal(afd_opts_parse(table, &c, 1, ARGV0, NULL, NULL), AFD_OK);
    afd_opts_free(table, &c);
}

static void test_flags(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    assert_int_equal(parse(&c, &first,
                           ARGV("--port", "9000", "--max-tokens=17", "--ratio", "0.25",
                                "--name=x=y", "--nodef", "", "--workers", "-99999999")),
                     AFD_OK);
    assert_int_equal(first, 11);
    assert_int_equal(c.port, 9000);
    assert_int_equal(c.max_tokens, 17);
    assert_true(c.ratio == 0.25);
    assert_string_equal(c.name, "x=y"); /* only the first '=' separates */
    assert_string_equal(c.nodef, "");
    assert_int_equal(c.workers, -99999999); /* min = max = 0: unbounded */
    afd_opts_free(table, &c);
    /* the last occurrence wins; strings are replaced without leaking */
    assert_int_equal(parse(&c, &first, ARGV("--name", "a", "--name", "b", "--port=1", "--port=2")),
                     AFD_OK);
    assert_string_equal(c.name, "b");
    assert_int_equal(c.port, 2);
    afd_opts_free(table, &c);
    /* parsing stops at the first non-option, and after "--" */
    assert_int_equal(parse(&c, &first, ARGV("--port", "81", "model.bin", "--port", "82")), AFD_OK);
    assert_int_equal(first, 3);
    assert_int_equal(c.port, 81);
    afd_opts_free(table, &c);
    assert_int_equal(parse(&c, &first, ARGV("--port", "81", "--", "--port", "82")), AFD_OK);
    assert_int_equal(first, 4);
    assert_int_equal(c.port, 81);
    afd_opts_free(table, &c);
    assert_int_equal(parse(&c, &first, ARGV("-", "x")), AFD_OK); /* "-" is an argument */
    assert_int_equal(first, 1);
    afd_opts_free(table, &c);
    /* numbers: hex is accepted for ints, exponents for doubles */
    assert_int_equal(parse(&c, &first, ARGV("--port", "0x50", "--ratio", "2.5e-1")), AFD_OK);
    assert_int_equal(c.port, 80);
    assert_true(c.ratio == 0.25);
    afd_opts_free(table, &c);
}

static void test_bool(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    assert_int_equal(parse(&c, &first, ARGV("--verbose", "--color=false")), AFD_OK);
    assert_int_equal(c.verbose, 1);
    assert_int_equal(c.color, 0);
    assert_int_equal(first, 3);
    afd_opts_free(table, &c);
    const char *yes[] = {"1", "true", "TRUE", "yes", "On"},
               *no[] = {"0", "false", "No", "off", "OFF"};
    for (int i = 0; i < 5; i++) {
        char a[64], b[64];
        snprintf(a, sizeof(a), "--verbose=%s", yes[i]);
        snprintf(b, sizeof(b), "--color=%s", no[i]);
        assert_int_equal(parse(&c, &first, ARGV(a, b)), AFD_OK);
        assert_int_equal(c.verbose, 1);
        assert_int_equal(c.color, 0);
        afd_opts_free(table, &c);
    }
    /* a bool flag never takes the next argument as its value */
    assert_int_equal(parse(&c, &first, ARGV("--verbose", "false")), AFD_OK);
    assert_int_equal(c.verbose, 1);
    assert_int_equal(first, 2);
    afd_opts_free(table, &c);
    assert_int_equal(parse(&c, &first, ARGV("--verbose=maybe")), AFD_ERR_INVALID);
    afd_opts_free(table, &c);
    assert_int_equal(parse(&c, &first, ARGV("--verbose=")), AFD_ERR_INVALID);
    afd_opts_free(table, &c);
}

static void test_env(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    setenv("AFD_PORT", "9001", 1);
    setenv("AFD_MAX_TOKENS", "99", 1); /* dash -> underscore, upper case */
    setenv("AFD_NAME", "from-env", 1);
    setenv("AFD_VERBOSE", "yes", 1);
    setenv("AFD_LOCAL", "55", 1);     /* NOENV: ignored */
    setenv("AFD_PEER", "p1", 1);      /* lists are flags only */
    setenv("AFD_MAX-TOKENS", "5", 1); /* not the spelling the parser looks for */
    assert_int_equal(parse(&c, &first, ARGV0), AFD_OK);
    assert_int_equal(c.port, 9001);
    assert_int_equal(c.max_tokens, 99);
    assert_string_equal(c.name, "from-env");
    assert_int_equal(c.verbose, 1);
    assert_int_equal(c.local, 7);
    assert_int_equal(c.peers.n, 0);
    afd_opts_free(table, &c);
    /* a bad value in the environment is an error naming it */
    setenv("AFD_PORT", "http", 1);
    assert_int_equal(parse(&c, &first, ARGV0), AFD_ERR_INVALID);
    afd_opts_free(table, &c);
    setenv("AFD_PORT", "70000", 1);
    assert_int_equal(parse(&c, &first, ARGV0), AFD_ERR_RANGE);
    afd_opts_free(table, &c);
    clear_env(NULL);
}

static void test_priority(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    const char *file = conf("port = 1111\nratio = 0.125\nname = from-file\n");
    /* default only */
    assert_int_equal(parse(&c, &first, ARGV0), AFD_OK);
    assert_int_equal(c.port, 8080);
    afd_opts_free(table, &c);
    /* config file over default */
    assert_int_equal(parse(&c, &first, ARGV("--config", (char *)file)), AFD_OK);
    assert_int_equal(c.port, 1111);
    assert_true(c.ratio == 0.125);
    assert_string_equal(c.name, "from-file");
    assert_int_equal(first, 3);
    afd_opts_free(table, &c);
    /* environment over config file */
    setenv("AFD_PORT", "2222", 1);
    assert_int_equal(parse(&c, &first, ARGV("--config", (char *)file)), AFD_OK);
    assert_int_equal(c.port, 2222);
    assert_true(c.ratio == 0.125); /* untouched fields keep the file's value */
    afd_opts_free(table, &c);
    /* flag over environment, whether it comes before or after --config */
    assert_int_equal(parse(&c, &first, ARGV("--port", "3333", "--config", (char *)file)), AFD_OK);
    assert_int_equal(c.port, 3333);
    assert_string_equal(c.name, "from-file");
    afd_opts_free(table, &c);
    char cf[700];
    snprintf(cf, sizeof(cf), "--config=%s", file);
    assert_int_equal(parse(&c, &first, ARGV(cf, "--port=4444")), AFD_OK);
    assert_int_equal(c.port, 4444);
    afd_opts_free(table, &c);
    clear_env(NULL);
}

static void test_config_file(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    const char *file = conf("# a comment\n"
                            "\n"
                            "   \t\n"
                            "  # an indented comment\n"
                            "port=8443\n"
                            "  max-tokens   =   12  \n"
                            "name = two words  \n"
                            "verbose = on\n"
                            "color = off\n"
                            "peer = a\n"
                            "nodef =\n"
                            "token = s3cret"); /* no newline at the end */
    assert_int_equal(parse(&c, &first, ARGV("--config", (char *)file)), AFD_OK);
    assert_int_equal(c.port, 8443);
    assert_int_equal(c.max_tokens, 12);
    assert_string_equal(c.name, "two words");
    assert_int_equal(c.verbose, 1);
    assert_int_equal(c.color, 0);
    assert_int_equal(c.peers.n, 1);
    assert_string_equal(c.peers.v[0], "a");
    assert_string_equal(c.nodef, "");
    assert_string_equal(c.token, "s3cret");
    afd_opts_free(table, &c);

    /* errors */
    char missing[700];
    snprintf(missing, sizeof(missing), "%s/does-not-exist.conf", g_dir);
    assert_int_equal(parse(&c, &first, ARGV("--config", missing)), AFD_ERR_IO);
    afd_opts_free(table, &c);
    struct {
        const char *text;
        afd_status_t want;
    } bad[] = {
        {"port 8080\n", AFD_ERR_FORMAT},
        {"# ok\nport = 80\njust words\n", AFD_ERR_FORMAT},
        {"colour = 1\n", AFD_ERR_INVALID},
        {"= 5\n", AFD_ERR_INVALID},
        {"port = eighty\n", AFD_ERR_INVALID},
        {"port = 80 # trailing comments are not comments\n", AFD_ERR_INVALID},
        {"port = 0\n", AFD_ERR_RANGE},
        {"ratio = 1.5\n", AFD_ERR_RANGE},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *f = conf(bad[i].text);
        afd_status_t st = parse(&c, &first, ARGV("--config", (char *)f));
        if (st != bad[i].want)
            fail_msg("config '%s': status %d, want %d", bad[i].text, st, bad[i].want);
        afd_opts_free(table, &c);
    }
}

static void test_bounds_and_errors(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    struct {
        const char *a, *b;
        afd_status_t want;
    } cases[] = {
        {"--port", "0", AFD_ERR_RANGE},
        {"--port", "65536", AFD_ERR_RANGE},
        {"--port", "-1", AFD_ERR_RANGE},
        {"--port", "65535", AFD_OK},
        {"--port", "1", AFD_OK},
        {"--ratio", "1.0000001", AFD_ERR_RANGE},
        {"--ratio", "-0.1", AFD_ERR_RANGE},
        {"--ratio", "1", AFD_OK},
        {"--port", "abc", AFD_ERR_INVALID},
        {"--port", "12abc", AFD_ERR_INVALID},
        {"--port", "", AFD_ERR_INVALID},
        {"--port", "1.5", AFD_ERR_INVALID},
        {"--port", "99999999999999999999999", AFD_ERR_INVALID}, /* overflows long */
        {"--ratio", "nan", AFD_ERR_INVALID},
        {"--ratio", "inf", AFD_ERR_INVALID},
        {"--ratio", "1e999", AFD_ERR_INVALID},
        {"--ratio", "0.5x", AFD_ERR_INVALID},
        {"--ratio", "", AFD_ERR_INVALID},
        {"--max-tokens", "1048577", AFD_ERR_RANGE},
        {"--bogus", "1", AFD_ERR_INVALID}, /* unknown option */
        {"--por", "1", AFD_ERR_INVALID},   /* no prefix matching */
        {"--port-number", "1", AFD_ERR_INVALID},
        {"---port", "1", AFD_ERR_INVALID},
        {"--PORT", "1", AFD_ERR_INVALID},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        afd_status_t st = parse(&c, &first, ARGV((char *)cases[i].a, (char *)cases[i].b));
        if (st != cases[i].want)
            fail_msg("%s %s: status %d, want %d", cases[i].a, cases[i].b, st, cases[i].want);
        afd_opts_free(table, &c);
    }
    /* an option that needs a value at the end of the line */
    assert_int_equal(parse(&c, &first, ARGV("--port")), AFD_ERR_INVALID);
    afd_opts_free(table, &c);
    assert_int_equal(parse(&c, &first, ARGV("--verbose", "--name")), AFD_ERR_INVALID);
    afd_opts_free(table, &c);
    /* an error in a default is reported too */
    static const afd_opt_t bad_def[] = {
        {"port", AFD_OPT_INT, "0", O(port), 1, 10, 0, "bad default"},
        AFD_OPTS_END,
    };
    memset(&c, 0, sizeof(c));
    assert_int_equal(afd_opts_parse(bad_def, &c, 1, ARGV0, NULL, NULL), AFD_ERR_RANGE);
}

/* Regression (fixed; common/util/afd_opts.c:175-178): "--config" as the last argument has no value;
 * the pre-scan skips it and the main loop does i++ past argc, so parsing succeeds and *first_arg =
 * argc + 1, past the end of argv. Expected: AFD_ERR_INVALID ("needs a value"). */
static void test_regression_config_without_value(void **state)
{
    (void)state;
    cfg_t c;
    int first = -1;
    afd_status_t st = parse(&c, &first, ARGV("--port", "81", "--config"));
    afd_opts_free(table, &c);
    if (st == AFD_OK) assert_true(first <= 4); /* never past argc */
    assert_int_equal(st, AFD_ERR_INVALID);
}

/* Regression (fixed; common/util/afd_opts.c:137-144): the pre-scan for --config runs over the whole
 * argv, while option parsing stops at the first non-option ("model.bin" here), so a --config that
 * belongs to the program's arguments is still read and applied. Expected: options after the
 * first non-option are left alone (port stays 8080, first_arg = 1). */
static void test_regression_config_after_argument(void **state)
{
    (void)state;
    cfg_t c;
    int first = -1;
    const char *file = conf("port = 1234\n");
    afd_status_t st = parse(&c, &first, ARGV("model.bin", "--config", (char *)file));
    long port = c.port;
    afd_opts_free(table, &c);
    assert_int_equal(st, AFD_OK);
    assert_int_equal(first, 1);
    assert_int_equal(port, 8080);
    /* "--config" as the separate value of --name is a name, not a file to read */
    st = parse(&c, &first, ARGV("--name", "--config", "--port", "9"));
    int name_ok = st == AFD_OK && c.name && !strcmp(c.name, "--config");
    port = c.port;
    afd_opts_free(table, &c);
    assert_true(name_ok);
    assert_int_equal(port, 9);
    assert_int_equal(first, 5);
    /* a bool flag takes no separate value: a --config right after it is still read */
    st = parse(&c, &first, ARGV("--verbose", "--config", (char *)file));
    port = c.port;
    afd_opts_free(table, &c);
    assert_int_equal(st, AFD_OK);
    assert_int_equal(port, 1234);
}

static void test_list(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    assert_int_equal(
        parse(&c, &first, ARGV("--peer", "a:1", "--port", "5", "--peer=b:2", "--peer", "")),
        AFD_OK);
    assert_int_equal(c.peers.n, 3);
    assert_string_equal(c.peers.v[0], "a:1");
    assert_string_equal(c.peers.v[1], "b:2");
    assert_string_equal(c.peers.v[2], "");
    afd_opts_free(table, &c);
    assert_int_equal(c.peers.n, 0);
    assert_null(c.peers.v);
    /* many entries (the array grows) */
    char *argv[2 * 40 + 2];
    argv[0] = "prog";
    char vals[40][8];
    for (int i = 0; i < 40; i++) {
        snprintf(vals[i], sizeof(vals[i]), "n%d", i);
        argv[1 + 2 * i] = "--peer";
        argv[2 + 2 * i] = vals[i];
    }
    argv[81] = NULL;
    assert_int_equal(parse(&c, &first, argv), AFD_OK);
    assert_int_equal(c.peers.n, 40);
    assert_string_equal(c.peers.v[39], "n39");
    afd_opts_free(table, &c);
}

static void test_help_and_print(void **state)
{
    (void)state;
    cfg_t c;
    int first;
    assert_int_equal(parse_quiet(&c, &first, ARGV("--help")), AFD_ERR_CANCELED);
    afd_opts_free(table, &c);
    assert_int_equal(parse_quiet(&c, &first, ARGV("--port", "5", "--help", "--bogus")),
                     AFD_ERR_CANCELED);
    afd_opts_free(table, &c);
    assert_int_equal(parse_quiet(&c, &first, ARGV("--print-config", "--port", "5")),
                     AFD_ERR_CANCELED);
    afd_opts_free(table, &c);

    /* help: every option with its default, secrets' defaults hidden */
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    afd_opts_help(m, table, "usage: test");
    fclose(m);
    assert_non_null(strstr(buf, "usage: test"));
    assert_non_null(strstr(buf, "--port N"));
    assert_non_null(strstr(buf, "--ratio X"));
    assert_non_null(strstr(buf, "--name S"));
    assert_non_null(strstr(buf, "(default: 8080)"));
    assert_non_null(strstr(buf, "--max-tokens N"));
    assert_non_null(strstr(buf, "(repeatable)"));
    assert_non_null(strstr(buf, "--help"));
    assert_null(strstr(buf, "hunter2"));
    free(buf);

    /* print: effective values, the secret replaced */
    assert_int_equal(
        parse(&c, &first, ARGV("--port", "5", "--peer", "a", "--peer", "b", "--verbose")), AFD_OK);
    buf = NULL;
    m = open_memstream(&buf, &len);
    afd_opts_print(m, table, &c);
    fclose(m);
    assert_non_null(strstr(buf, "port = 5\n"));
    assert_non_null(strstr(buf, "ratio = 0.5\n"));
    assert_non_null(strstr(buf, "name = afd\n"));
    assert_non_null(strstr(buf, "verbose = true\n"));
    assert_non_null(strstr(buf, "color = true\n"));
    assert_non_null(strstr(buf, "peer = a b\n"));
    assert_non_null(strstr(buf, "token = (set)\n"));
    assert_null(strstr(buf, "hunter2"));
    free(buf);
    afd_opts_free(table, &c);
}

static void test_int_list(void **state)
{
    (void)state;
    int *v = NULL, n = -1;
    assert_int_equal(afd_parse_int_list("1,2,3", 0, 10, &v, &n), AFD_OK);
    assert_int_equal(n, 3);
    assert_int_equal(v[0], 1);
    assert_int_equal(v[2], 3);
    free(v);
    assert_int_equal(afd_parse_int_list(" 4 , 5 ,6 ", 0, 10, &v, &n), AFD_OK);
    assert_int_equal(n, 3);
    assert_int_equal(v[1], 5);
    free(v);
    assert_int_equal(afd_parse_int_list("-3,0,3", -3, 3, &v, &n), AFD_OK);
    assert_int_equal(v[0], -3);
    free(v);
    assert_int_equal(afd_parse_int_list("7", 7, 7, &v, &n), AFD_OK);
    assert_int_equal(n, 1);
    free(v);
    /* the empty string is the empty list */
    v = NULL;
    assert_int_equal(afd_parse_int_list("", 0, 10, &v, &n), AFD_OK);
    assert_int_equal(n, 0);
    free(v);
    /* many values: the array grows past its first 16 */
    char big[1024] = "";
    for (int i = 0; i < 100; i++)
        snprintf(big + strlen(big), sizeof(big) - strlen(big), "%s%d", i ? "," : "", i);
    assert_int_equal(afd_parse_int_list(big, 0, 99, &v, &n), AFD_OK);
    assert_int_equal(n, 100);
    for (int i = 0; i < 100; i++)
        assert_int_equal(v[i], i);
    free(v);
    /* errors leave the outputs alone */
    struct {
        const char *s;
        afd_status_t want;
    } bad[] = {
        {"1,,2", AFD_ERR_INVALID},
        {"1,", AFD_ERR_INVALID},
        {",1", AFD_ERR_INVALID},
        {"a", AFD_ERR_INVALID},
        {"1 2", AFD_ERR_INVALID},
        {"1;2", AFD_ERR_INVALID},
        {"0x10", AFD_ERR_INVALID},
        {"1.5", AFD_ERR_INVALID},
        {" ", AFD_ERR_INVALID},
        {"11", AFD_ERR_RANGE},
        {"-1", AFD_ERR_RANGE},
        {"3,4,99", AFD_ERR_RANGE},
        {"99999999999999999999999", AFD_ERR_RANGE},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int *o = (int *)(uintptr_t)0x1, cnt = -7;
        afd_status_t st = afd_parse_int_list(bad[i].s, 0, 10, &o, &cnt);
        if (st != bad[i].want) fail_msg("'%s': status %d, want %d", bad[i].s, st, bad[i].want);
        assert_ptr_equal(o, (int *)(uintptr_t)0x1);
        assert_int_equal(cnt, -7);
    }
}

/* Regression (fixed; common/util/afd_opts.c:283 and 295): values are stored in int but only checked
 * against the caller's long bounds, so with bounds wider than int (e.g. [LONG_MIN, LONG_MAX])
 * "3000000000" is accepted and silently truncated. Expected: AFD_ERR_RANGE for any value
 * outside [INT_MIN, INT_MAX]. */
static void test_regression_int_list_int_overflow(void **state)
{
    (void)state;
    int *v = NULL, n = 0;
    afd_status_t st = afd_parse_int_list("1,3000000000", LONG_MIN, LONG_MAX, &v, &n);
    if (st == AFD_OK) {
        long got = v[1];
        free(v);
        fail_msg("3000000000 accepted as %ld", got);
    }
    assert_int_equal(st, AFD_ERR_RANGE);
}

int main(void)
{
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_defaults, clear_env),
        cmocka_unit_test_setup(test_flags, clear_env),
        cmocka_unit_test_setup(test_bool, clear_env),
        cmocka_unit_test_setup(test_env, clear_env),
        cmocka_unit_test_setup(test_priority, clear_env),
        cmocka_unit_test_setup(test_config_file, clear_env),
        cmocka_unit_test_setup(test_bounds_and_errors, clear_env),
        cmocka_unit_test_setup(test_regression_config_without_value, clear_env),
        cmocka_unit_test_setup(test_regression_config_after_argument, clear_env),
        cmocka_unit_test_setup(test_list, clear_env),
        cmocka_unit_test_setup(test_help_and_print, clear_env),
        cmocka_unit_test_setup(test_int_list, clear_env),
        cmocka_unit_test_setup(test_regression_int_list_int_overflow, clear_env),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
