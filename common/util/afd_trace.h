/*
 * afd_trace: a timeline of what a node's pipeline thread did (attention, FFN, sends,
 * waits), kept in a bounded ring of the latest events and written as a Chrome trace
 * (JSON, `ph: X` complete events) that Perfetto or chrome://tracing open. Timestamps
 * are CLOCK_MONOTONIC microseconds, the clock every process on one host shares, so
 * the files of the nodes of one host line up once merged (`afdctl trace-merge`).
 */
#ifndef AFD_TRACE_H
#define AFD_TRACE_H

#include "afd_status.h"

#include <stddef.h>
#include <stdint.h>

#define AFD_TRACE_MAX_EVENTS (1u << 24)
#define AFD_TRACE_NO_STEP    UINT64_MAX /* a span of no step (a wait) */

typedef struct afd_trace afd_trace_t;

/* Keeps the latest max_events spans (1..AFD_TRACE_MAX_EVENTS) for `path`; `process`
 * names the node in the viewer, `pid` keeps nodes apart once merged. */
afd_status_t afd_trace_open(afd_trace_t **out, const char *path, size_t max_events,
                            const char *process, uint32_t pid);

/* Records a span [t0_us, t1_us) named `name` (a string that outlives the trace) for
 * micro-batch mb of (step, layer), which carries ntok tokens; layer, mb or ntok < 0, or
 * step AFD_TRACE_NO_STEP: not shown. NULL trace: nothing. */
void afd_trace_span(afd_trace_t *t, const char *name, uint64_t t0_us, uint64_t t1_us, uint64_t step,
                    int layer, int mb, int ntok);

/* Spans recorded so far (also those the ring dropped). */
uint64_t afd_trace_count(const afd_trace_t *t);

/* Writes the file (to a temporary name, then renamed over `path`). */
afd_status_t afd_trace_write(const afd_trace_t *t);

/* Writes the file and frees the trace; NULL: nothing. */
afd_status_t afd_trace_close(afd_trace_t *t);

#endif
