/*
 * test_trace: common/util/afd_trace.h (the nodes' pipeline timelines).
 *   - the file is a JSON object whose traceEvents hold the process name and one complete
 *     event per span, with the arguments given and none of those left out (no step, -1);
 *   - the ring keeps the latest spans, in order, and counts all of them;
 *   - names are escaped; spans that end before they start get a zero duration;
 *   - bad arguments and an unwritable path are refused at open, a NULL trace is a no-op.
 * Files go to a mkdtemp directory under $TEST_TMP (default /tmp) and are parsed back with
 * cJSON.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_trace.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_dir[512];

static int group_setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TEST_TMP");
    snprintf(g_dir, sizeof(g_dir), "%s/afd_test_trace_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static cJSON *load(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    cJSON *root = cJSON_Parse(buf);
    if (!root) fail_msg("not JSON: %.200s", buf);
    return root;
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    if (!cJSON_IsNumber(v)) fail_msg("no number '%s'", k);
    return v->valuedouble;
}

static void test_file(void **state)
{
    (void)state;
    char path[600];
    snprintf(path, sizeof(path), "%s/a.trace.json", g_dir);
    afd_trace_t *t = NULL;
    assert_int_equal(afd_trace_open(&t, path, 16, "attn \"0\"", 42), AFD_OK);
    afd_trace_span(t, "attention", 1000, 1250, 7, 3, 1, 512);
    afd_trace_span(t, "wait", 1250, 1300, AFD_TRACE_NO_STEP, -1, -1, -1);
    afd_trace_span(t, "odd\\name\n", 2000, 1990, 0, -1, 2, -1);
    assert_int_equal(afd_trace_count(t), 3);
    assert_int_equal(afd_trace_close(t), AFD_OK);

    cJSON *root = load(path);
    const cJSON *ev = cJSON_GetObjectItem(root, "traceEvents");
    assert_true(cJSON_IsArray(ev));
    assert_int_equal(cJSON_GetArraySize(ev), 4);
    const cJSON *m = cJSON_GetArrayItem(ev, 0);
    assert_string_equal(cJSON_GetObjectItem(m, "ph")->valuestring, "M");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "args"), "name")->valuestring,
                        "attn \"0\"");
    assert_int_equal((int)num(m, "pid"), 42);

    const cJSON *a = cJSON_GetArrayItem(ev, 1), *args = cJSON_GetObjectItem(a, "args");
    assert_string_equal(cJSON_GetObjectItem(a, "ph")->valuestring, "X");
    assert_string_equal(cJSON_GetObjectItem(a, "name")->valuestring, "attention");
    assert_int_equal((int)num(a, "ts"), 1000);
    assert_int_equal((int)num(a, "dur"), 250);
    assert_int_equal((int)num(a, "pid"), 42);
    assert_int_equal((int)num(args, "step"), 7);
    assert_int_equal((int)num(args, "layer"), 3);
    assert_int_equal((int)num(args, "mb"), 1);
    assert_int_equal((int)num(args, "tokens"), 512);

    const cJSON *w = cJSON_GetArrayItem(ev, 2);
    assert_string_equal(cJSON_GetObjectItem(w, "name")->valuestring, "wait");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(w, "args")), 0);

    const cJSON *o = cJSON_GetArrayItem(ev, 3);
    args = cJSON_GetObjectItem(o, "args");
    assert_string_equal(cJSON_GetObjectItem(o, "name")->valuestring, "odd\\name\n");
    assert_int_equal((int)num(o, "dur"), 0);
    assert_int_equal((int)num(args, "step"), 0); /* step 0 is a step */
    assert_int_equal((int)num(args, "mb"), 2);
    assert_null(cJSON_GetObjectItem(args, "layer"));
    assert_null(cJSON_GetObjectItem(args, "tokens"));
    cJSON_Delete(root);
}

static void test_ring(void **state)
{
    (void)state;
    char path[600];
    snprintf(path, sizeof(path), "%s/ring.trace.json", g_dir);
    afd_trace_t *t = NULL;
    assert_int_equal(afd_trace_open(&t, path, 5, "ffn", 1), AFD_OK);
    for (int i = 0; i < 12; i++)
        afd_trace_span(t, "ffn", (uint64_t)i * 10, (uint64_t)i * 10 + 5, (uint64_t)i, 0, 0, i);
    assert_int_equal(afd_trace_count(t), 12);
    /* written twice: the second write replaces the first */
    assert_int_equal(afd_trace_write(t), AFD_OK);
    afd_trace_span(t, "ffn", 120, 125, 12, 0, 0, 12);
    assert_int_equal(afd_trace_close(t), AFD_OK);
    cJSON *root = load(path);
    const cJSON *ev = cJSON_GetObjectItem(root, "traceEvents");
    assert_int_equal(cJSON_GetArraySize(ev), 1 + 5);
    for (int i = 0; i < 5; i++) { /* the latest five, oldest first: steps 8..12 */
        const cJSON *e = cJSON_GetArrayItem(ev, 1 + i);
        assert_int_equal((int)num(cJSON_GetObjectItem(e, "args"), "step"), 8 + i);
        assert_int_equal((int)num(e, "ts"), (8 + i) * 10);
    }
    const cJSON *other = cJSON_GetObjectItem(root, "otherData");
    assert_int_equal((int)num(other, "spans"), 13);
    assert_int_equal((int)num(other, "kept"), 5);
    cJSON_Delete(root);
    char tmp[620];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    assert_int_not_equal(access(tmp, F_OK), 0); /* no temporary left behind */
}

static void test_refused(void **state)
{
    (void)state;
    char path[600];
    snprintf(path, sizeof(path), "%s/x.json", g_dir);
    afd_trace_t *t = (afd_trace_t *)0x1;
    assert_int_equal(afd_trace_open(&t, path, 0, "n", 1), AFD_ERR_INVALID);
    assert_int_equal(afd_trace_open(&t, path, (size_t)AFD_TRACE_MAX_EVENTS + 1, "n", 1),
                     AFD_ERR_INVALID);
    assert_int_equal(afd_trace_open(&t, "", 4, "n", 1), AFD_ERR_INVALID);
    assert_int_equal(afd_trace_open(&t, NULL, 4, "n", 1), AFD_ERR_INVALID);
    snprintf(path, sizeof(path), "%s/no/such/dir/x.json", g_dir);
    assert_int_equal(afd_trace_open(&t, path, 4, "n", 1), AFD_ERR_IO);
    assert_ptr_equal(t, (afd_trace_t *)0x1); /* untouched on errors */
    /* a NULL trace: every call is a no-op */
    afd_trace_span(NULL, "x", 0, 1, 0, 0, 0, 0);
    assert_int_equal(afd_trace_count(NULL), 0);
    assert_int_equal(afd_trace_close(NULL), AFD_OK);
    assert_int_equal(afd_trace_write(NULL), AFD_ERR_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_file),
        cmocka_unit_test(test_ring),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
