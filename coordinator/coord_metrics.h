/*
 * coord_metrics: the coordinator's Prometheus metrics. The request-level names mirror
 * vLLM's with an `afd_` prefix (so a vLLM dashboard ports by changing the prefix); the
 * AFD-specific ones describe the stages, the data plane and the pipeline.
 */
#ifndef COORD_METRICS_H
#define COORD_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define COORD_HIST_MAX 24

typedef struct coord_hist {
    const double *bounds; /* upper bounds in seconds, ascending */
    int n;
    uint64_t counts[COORD_HIST_MAX + 1]; /* the last one is +Inf */
    double sum;
    uint64_t count;
} coord_hist_t;

typedef struct coord_metrics {
    coord_hist_t ttft, itl, e2e, queue, prefill_to_first;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t success_stop, success_length, success_abort, failed, preemptions;
} coord_metrics_t;

void coord_metrics_init(coord_metrics_t *m);
void coord_hist_observe(coord_hist_t *h, double seconds);

struct coord;
/* Renders the Prometheus text exposition of every metric into a malloc'd string. */
char *coord_metrics_render(struct coord *c, size_t *len);

#endif
