/* coord_metrics: histograms, counters and the Prometheus text exposition. */
#define _GNU_SOURCE
#include "coord_metrics.h"
#include "coord.h"
#include "net_metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* the bucket bounds vLLM uses for the same metrics */
static const double ttft_b[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double itl_b[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                               0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double e2e_b[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                               5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

static void hist_init(coord_hist_t *h, const double *b, int n)
{
    memset(h, 0, sizeof(*h));
    h->bounds = b;
    h->n = n;
}

void coord_metrics_init(coord_metrics_t *m)
{
    memset(m, 0, sizeof(*m));
    hist_init(&m->ttft, ttft_b, (int)(sizeof(ttft_b) / sizeof(ttft_b[0])));
    hist_init(&m->itl, itl_b, (int)(sizeof(itl_b) / sizeof(itl_b[0])));
    hist_init(&m->e2e, e2e_b, (int)(sizeof(e2e_b) / sizeof(e2e_b[0])));
    hist_init(&m->queue, e2e_b, (int)(sizeof(e2e_b) / sizeof(e2e_b[0])));
}

void coord_hist_observe(coord_hist_t *h, double s)
{
    int i = 0;
    while (i < h->n && s > h->bounds[i])
        i++;
    h->counts[i]++;
    h->count++;
    h->sum += s;
}

static void hist_render(afd_sbuf_t *b, const char *name, const char *help, const char *labels,
                        const coord_hist_t *h)
{
    afd_sbuf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->counts[i];
        afd_sbuf_printf(b, "%s_bucket{%s,le=\"%g\"} %llu\n", name, labels, h->bounds[i],
                        (unsigned long long)cum);
    }
    cum += h->counts[h->n];
    afd_sbuf_printf(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, labels, (unsigned long long)cum);
    afd_sbuf_printf(b, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, labels, h->sum, name, labels,
                    (unsigned long long)h->count);
}

char *coord_metrics_render(coord_t *c, size_t *len)
{
    afd_sbuf_t b;
    if (afd_sbuf_init(&b, 16384)) return NULL;
    const coord_metrics_t *m = &c->metrics;
    char lab[160];
    snprintf(lab, sizeof(lab), "model_name=\"%s\"", c->o.model_name);
    afd_sbuf_printf(&b,
                    "# HELP afd_build_info Build information.\n# TYPE afd_build_info gauge\n"
                    "afd_build_info{version=\"%s\",wire_version=\"1\"} 1\n",
                    AFD_VERSION);
    afd_sbuf_printf(&b,
                    "# HELP afd_num_requests_running Sequences running on the attention nodes.\n"
                    "# TYPE afd_num_requests_running gauge\nafd_num_requests_running{%s} %d\n",
                    lab, c->nrunning);
    afd_sbuf_printf(&b,
                    "# HELP afd_num_requests_waiting Sequences waiting for admission.\n"
                    "# TYPE afd_num_requests_waiting gauge\nafd_num_requests_waiting{%s} %d\n",
                    lab, c->nwaiting);
    uint64_t kv_total = 0, kv_res = 0;
    for (int i = 0; i < COORD_MAX_NODES; i++)
        if (c->nodes[i].open && c->nodes[i].role == AFD__ROLE__ROLE_ATTN &&
            c->nodes[i].state == NODE_CONNECTED) {
            kv_total += c->nodes[i].kv_blocks;
            kv_res += c->nodes[i].kv_reserved;
        }
    afd_sbuf_printf(&b,
                    "# HELP afd_kv_cache_usage_perc KV cache blocks in use, 0 to 1.\n"
                    "# TYPE afd_kv_cache_usage_perc gauge\nafd_kv_cache_usage_perc{%s} %.6g\n",
                    lab, kv_total ? (double)kv_res / (double)kv_total : 0.0);
    afd_sbuf_printf(&b,
                    "# HELP afd_prompt_tokens_total Prefill tokens processed.\n"
                    "# TYPE afd_prompt_tokens_total counter\nafd_prompt_tokens_total{%s} %llu\n",
                    lab, (unsigned long long)m->prompt_tokens);
    afd_sbuf_printf(
        &b,
        "# HELP afd_generation_tokens_total Tokens generated.\n"
        "# TYPE afd_generation_tokens_total counter\nafd_generation_tokens_total{%s} %llu\n",
        lab, (unsigned long long)m->generation_tokens);
    afd_sbuf_printf(&b, "# HELP afd_request_success_total Requests finished, by reason.\n"
                        "# TYPE afd_request_success_total counter\n");
    afd_sbuf_printf(&b, "afd_request_success_total{%s,finished_reason=\"stop\"} %llu\n", lab,
                    (unsigned long long)m->success_stop);
    afd_sbuf_printf(&b, "afd_request_success_total{%s,finished_reason=\"length\"} %llu\n", lab,
                    (unsigned long long)m->success_length);
    afd_sbuf_printf(&b, "afd_request_success_total{%s,finished_reason=\"abort\"} %llu\n", lab,
                    (unsigned long long)m->success_abort);
    afd_sbuf_printf(
        &b,
        "# HELP afd_request_failure_total Requests that ended with an error.\n"
        "# TYPE afd_request_failure_total counter\nafd_request_failure_total{%s} %llu\n",
        lab, (unsigned long long)m->failed);
    afd_sbuf_printf(&b,
                    "# HELP afd_num_preemptions_total Sequences preempted for KV blocks and "
                    "recomputed.\n# TYPE afd_num_preemptions_total counter\n"
                    "afd_num_preemptions_total{%s} %llu\n",
                    lab, (unsigned long long)m->preemptions);
    hist_render(&b, "afd_time_to_first_token_seconds", "Time to first token.", lab, &m->ttft);
    hist_render(&b, "afd_inter_token_latency_seconds", "Time between tokens of a sequence.", lab,
                &m->itl);
    hist_render(&b, "afd_e2e_request_latency_seconds", "End-to-end request latency.", lab, &m->e2e);
    hist_render(&b, "afd_request_queue_time_seconds", "Time a request waited for admission.", lab,
                &m->queue);
    /* AFD: the pipeline, the stages of every node, the data plane */
    afd_sbuf_printf(&b,
                    "# HELP afd_micro_batches Micro-batches per step.\n"
                    "# TYPE afd_micro_batches gauge\nafd_micro_batches %d\n",
                    c->micro_batches);
    afd_sbuf_printf(&b,
                    "# HELP afd_cluster_ready Whether every node is connected (1) or not (0).\n"
                    "# TYPE afd_cluster_ready gauge\nafd_cluster_ready %d\n",
                    c->ready);
    afd_sbuf_printf(&b,
                    "# HELP afd_steps_total Steps completed by every attention node.\n"
                    "# TYPE afd_steps_total counter\nafd_steps_total %llu\n",
                    (unsigned long long)c->steps_done);
    afd_sbuf_printf(&b,
                    "# HELP afd_step_seconds_mean Mean time from sending a plan to its last "
                    "result.\n# TYPE afd_step_seconds_mean gauge\nafd_step_seconds_mean %.9g\n",
                    c->steps_done ? (double)c->step_us_sum / 1e6 / (double)c->steps_done : 0.0);
    afd_sbuf_printf(&b, "# HELP afd_stage_busy_seconds_total Busy time of each node's stage.\n"
                        "# TYPE afd_stage_busy_seconds_total counter\n");
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        const coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state == NODE_FREE || !n->last_hb || !n->last_hb->stats ||
            !n->last_hb->stats->busy)
            continue;
        const Afd__StageTimes *t = n->last_hb->stats->busy;
        const char *role = n->role == AFD__ROLE__ROLE_ATTN ? "attention" : "ffn";
        afd_sbuf_printf(
            &b, "afd_stage_busy_seconds_total{node=\"%u\",role=\"%s\",stage=\"compute\"} %.6f\n",
            n->id, role, (double)(n->role == AFD__ROLE__ROLE_ATTN ? t->attn_us : t->ffn_us) / 1e6);
        afd_sbuf_printf(
            &b, "afd_stage_busy_seconds_total{node=\"%u\",role=\"%s\",stage=\"wait\"} %.6f\n",
            n->id, role, (double)t->wait_us / 1e6);
        if (n->role == AFD__ROLE__ROLE_ATTN)
            afd_sbuf_printf(
                &b,
                "afd_stage_busy_seconds_total{node=\"%u\",role=\"%s\",stage=\"transfer\"} %.6f\n",
                n->id, role, (double)t->xfer_us / 1e6);
    }
    afd_sbuf_printf(&b, "# HELP afd_data_plane_bytes_total Bytes each node sent or received, by "
                        "direction.\n# TYPE afd_data_plane_bytes_total counter\n");
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        const coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state == NODE_FREE || !n->last_hb || !n->last_hb->stats) continue;
        afd_sbuf_printf(&b, "afd_data_plane_bytes_total{node=\"%u\",direction=\"a2f\"} %llu\n",
                        n->id, (unsigned long long)n->last_hb->stats->a2f_bytes);
        afd_sbuf_printf(&b, "afd_data_plane_bytes_total{node=\"%u\",direction=\"f2a\"} %llu\n",
                        n->id, (unsigned long long)n->last_hb->stats->f2a_bytes);
    }
    afd_sbuf_printf(&b, "# HELP afd_peer_latency_seconds One-way data-plane latency each node sees "
                        "from each peer.\n# TYPE afd_peer_latency_seconds histogram\n");
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        const coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state == NODE_FREE || !n->last_hb || !n->last_hb->stats) continue;
        const Afd__NodeStats *st = n->last_hb->stats;
        char nl[32];
        snprintf(nl, sizeof(nl), "node=\"%u\"", n->id);
        for (size_t k = 0; k < st->n_peer_latency; k++)
            net_metrics_latency(&b, "afd_peer_latency_seconds", nl, st->peer_latency[k]);
    }
    afd_sbuf_printf(&b, "# HELP afd_peer_answer_seconds Attention nodes: time from a micro-batch's "
                        "A2F sent to each FFN peer's answer back (a straggler stands out).\n"
                        "# TYPE afd_peer_answer_seconds summary\n");
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        const coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state == NODE_FREE || !n->last_hb || !n->last_hb->stats) continue;
        const Afd__NodeStats *st = n->last_hb->stats;
        for (size_t k = 0; k < st->n_peer_latency; k++) {
            const Afd__LatencyHist *h = st->peer_latency[k];
            if (!h->answer_count) continue;
            afd_sbuf_printf(&b,
                            "afd_peer_answer_seconds_sum{node=\"%u\",peer=\"%u\"} %.6f\n"
                            "afd_peer_answer_seconds_count{node=\"%u\",peer=\"%u\"} %llu\n",
                            n->id, h->peer_id, (double)h->answer_sum_us / 1e6, n->id, h->peer_id,
                            (unsigned long long)h->answer_count);
        }
    }
    *len = b.len;
    return b.p;
}
