/* afd_trace: a ring of spans, written as a Chrome trace. */
#define _GNU_SOURCE
#include "afd_trace.h"

#include "afd_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct afd_trace_ev {
    const char *name;
    uint64_t t0, dur, step;
    int32_t layer, mb, ntok;
} afd_trace_ev_t;

struct afd_trace {
    char *path, *process;
    uint32_t pid;
    afd_trace_ev_t *ev;
    size_t cap;
    uint64_t n; /* spans recorded; the ring holds the latest min(n, cap) */
};

static void trace_free(afd_trace_t *t)
{
    free(t->ev);
    free(t->path);
    free(t->process);
    free(t);
}

afd_status_t afd_trace_open(afd_trace_t **out, const char *path, size_t max_events,
                            const char *process, uint32_t pid)
{
    if (!path || !*path || max_events < 1 || max_events > AFD_TRACE_MAX_EVENTS)
        return AFD_ERR_INVALID;
    afd_trace_t *t = calloc(1, sizeof(*t));
    if (!t) return AFD_ERR_NOMEM;
    t->path = strdup(path);
    t->process = strdup(process ? process : "node");
    t->ev = malloc(sizeof(*t->ev) * max_events);
    if (!t->path || !t->process || !t->ev) {
        trace_free(t);
        return AFD_ERR_NOMEM;
    }
    t->cap = max_events;
    t->pid = pid;
    /* the file must be writable: better to know at start than at exit */
    FILE *fp = fopen(path, "w");
    if (!fp) {
        afd_error("trace file %s: cannot write", path);
        trace_free(t);
        return AFD_ERR_IO;
    }
    fputs("{\"traceEvents\":[]}\n", fp);
    fclose(fp);
    *out = t;
    return AFD_OK;
}

void afd_trace_span(afd_trace_t *t, const char *name, uint64_t t0_us, uint64_t t1_us, uint64_t step,
                    int layer, int mb, int ntok)
{
    if (!t) return;
    afd_trace_ev_t *e = &t->ev[t->n % t->cap];
    e->name = name;
    e->t0 = t0_us;
    e->dur = t1_us > t0_us ? t1_us - t0_us : 0;
    e->step = step;
    e->layer = layer;
    e->mb = mb;
    e->ntok = ntok;
    t->n++;
}

uint64_t afd_trace_count(const afd_trace_t *t)
{
    return t ? t->n : 0;
}

/* Writes s as a JSON string body (quotes and control characters escaped). */
static void put_str(FILE *fp, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(fp, "\\%c", c);
        else if (c < 0x20)
            fprintf(fp, "\\u%04x", c);
        else
            fputc(c, fp);
    }
}

afd_status_t afd_trace_write(const afd_trace_t *t)
{
    if (!t) return AFD_ERR_INVALID;
    size_t plen = strlen(t->path) + 8;
    char *tmp = malloc(plen);
    if (!tmp) return AFD_ERR_NOMEM;
    snprintf(tmp, plen, "%s.tmp", t->path);
    FILE *fp = fopen(tmp, "w");
    if (!fp) {
        afd_error("trace file %s: cannot write", tmp);
        free(tmp);
        return AFD_ERR_IO;
    }
    fprintf(fp,
            "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"clock\":\"CLOCK_MONOTONIC\","
            "\"spans\":%llu,\"kept\":%llu},\"traceEvents\":[\n",
            (unsigned long long)t->n, (unsigned long long)(t->n < t->cap ? t->n : t->cap));
    fprintf(fp,
            "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":%u,\"tid\":0,\"args\":{\"name\":\"",
            t->pid);
    put_str(fp, t->process);
    fputs("\"}}", fp);
    uint64_t first = t->n > t->cap ? t->n - t->cap : 0;
    for (uint64_t i = first; i < t->n; i++) {
        const afd_trace_ev_t *e = &t->ev[i % t->cap];
        fputs(",\n{\"ph\":\"X\",\"name\":\"", fp);
        put_str(fp, e->name);
        fprintf(fp, "\",\"pid\":%u,\"tid\":0,\"ts\":%llu,\"dur\":%llu,\"args\":{", t->pid,
                (unsigned long long)e->t0, (unsigned long long)e->dur);
        const char *sep = "";
        if (e->step != AFD_TRACE_NO_STEP) {
            fprintf(fp, "\"step\":%llu", (unsigned long long)e->step);
            sep = ",";
        }
        const char *key[3] = {"layer", "mb", "tokens"};
        int32_t val[3] = {e->layer, e->mb, e->ntok};
        for (int k = 0; k < 3; k++) {
            if (val[k] < 0) continue; /* not given */
            fprintf(fp, "%s\"%s\":%d", sep, key[k], val[k]);
            sep = ",";
        }
        fputs("}}", fp);
    }
    fputs("\n]}\n", fp);
    int bad = ferror(fp);
    bad |= fclose(fp) != 0;
    if (bad || rename(tmp, t->path) != 0) {
        afd_error("trace file %s: write failed", t->path);
        remove(tmp);
        free(tmp);
        return AFD_ERR_IO;
    }
    free(tmp);
    return AFD_OK;
}

afd_status_t afd_trace_close(afd_trace_t *t)
{
    if (!t) return AFD_OK;
    afd_status_t st = afd_trace_write(t);
    trace_free(t);
    return st;
}
