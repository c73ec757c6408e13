/* net_metrics: the node-side Prometheus endpoint and the rendering of node counters. */
#define _GNU_SOURCE
#include "net_metrics.h"
#include "afd_log.h"
#include "net_http.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

struct net_metrics_server {
    uv_loop_t loop;
    uv_async_t stop;
    net_http_server_t *http;
    pthread_t thread;
    pthread_mutex_t lock;
    char *text;
    size_t len;
    int port;
};

static void on_request(void *arg, net_http_req_t *req)
{
    net_metrics_server_t *s = arg;
    if (!strcmp(req->path, "/health")) {
        const char ok[] = "{\"status\":\"ok\"}";
        return net_http_respond(req, 200, "application/json", ok, sizeof(ok) - 1, NULL);
    }
    if (strcmp(req->path, "/metrics") != 0) {
        const char nf[] = "not found\n";
        return net_http_respond(req, 404, "text/plain", nf, sizeof(nf) - 1, NULL);
    }
    pthread_mutex_lock(&s->lock);
    char *copy = s->len ? malloc(s->len) : NULL;
    size_t n = copy ? s->len : 0;
    if (copy) memcpy(copy, s->text, n);
    pthread_mutex_unlock(&s->lock);
    net_http_respond(req, 200, "text/plain; version=0.0.4", copy ? copy : "", n, NULL);
    free(copy);
}

static void on_stop(uv_async_t *a)
{
    net_metrics_server_t *s = a->data;
    net_http_server_close(s->http);
    uv_close((uv_handle_t *)&s->stop, NULL);
}

static void *thread_main(void *arg)
{
    net_metrics_server_t *s = arg;
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return NULL;
}

afd_status_t net_metrics_start(const char *host, int port, net_metrics_server_t **out)
{
    net_metrics_server_t *s = calloc(1, sizeof(*s));
    if (!s) return AFD_ERR_NOMEM;
    pthread_mutex_init(&s->lock, NULL);
    uv_loop_init(&s->loop);
    uv_async_init(&s->loop, &s->stop, on_stop);
    s->stop.data = s;
    net_http_limits_t lim = {.max_header_bytes = 8192,
                             .max_headers = 32,
                             .max_body = 4096,
                             .max_conns = 64,
                             .idle_timeout_ms = 30000};
    afd_status_t st = net_http_server_create(&s->loop, host, port, &lim, on_request, s, &s->http);
    if (st) {
        afd_error("metrics port %s:%d: cannot listen", host, port);
        uv_close((uv_handle_t *)&s->stop, NULL);
        uv_run(&s->loop, UV_RUN_DEFAULT);
        uv_loop_close(&s->loop);
        free(s);
        return st;
    }
    s->port = net_http_port(s->http);
    if (pthread_create(&s->thread, NULL, thread_main, s)) {
        afd_error("metrics: cannot start its thread");
        net_http_server_close(s->http);
        uv_close((uv_handle_t *)&s->stop, NULL);
        uv_run(&s->loop, UV_RUN_DEFAULT);
        uv_loop_close(&s->loop);
        free(s);
        return AFD_ERR_NOMEM;
    }
    *out = s;
    return AFD_OK;
}

int net_metrics_port(const net_metrics_server_t *s)
{
    return s->port;
}

void net_metrics_publish(net_metrics_server_t *s, const char *text, size_t len)
{
    char *copy = malloc(len ? len : 1);
    if (!copy) return;
    memcpy(copy, text, len);
    pthread_mutex_lock(&s->lock);
    free(s->text);
    s->text = copy;
    s->len = len;
    pthread_mutex_unlock(&s->lock);
}

void net_metrics_stop(net_metrics_server_t *s)
{
    if (!s) return;
    uv_async_send(&s->stop);
    pthread_join(s->thread, NULL);
    uv_loop_close(&s->loop);
    pthread_mutex_destroy(&s->lock);
    free(s->text);
    free(s);
}

void net_metrics_latency(afd_sbuf_t *b, const char *name, const char *labels,
                         const Afd__LatencyHist *h)
{
    uint64_t cum = 0;
    /* the node's last bucket collects everything above the one before it */
    for (size_t q = 0; q + 1 < h->n_buckets; q++) {
        cum += h->buckets[q];
        afd_sbuf_printf(b, "%s_bucket{%s,peer=\"%u\",le=\"%g\"} %llu\n", name, labels, h->peer_id,
                        (double)(1ull << q) / 1e6, (unsigned long long)cum);
    }
    afd_sbuf_printf(b, "%s_bucket{%s,peer=\"%u\",le=\"+Inf\"} %llu\n", name, labels, h->peer_id,
                    (unsigned long long)h->count);
    afd_sbuf_printf(b, "%s_sum{%s,peer=\"%u\"} %.9g\n", name, labels, h->peer_id,
                    (double)h->sum_us / 1e6);
    afd_sbuf_printf(b, "%s_count{%s,peer=\"%u\"} %llu\n", name, labels, h->peer_id,
                    (unsigned long long)h->count);
}

char *net_metrics_render_node(const Afd__NodeStats *st, const char *role, uint32_t id, size_t *len)
{
    afd_sbuf_t b;
    if (afd_sbuf_init(&b, 4096)) return NULL;
    char lab[96];
    snprintf(lab, sizeof(lab), "node=\"%u\",role=\"%s\"", id, role);
    afd_sbuf_printf(&b,
                    "# HELP afd_node_info The node's identity.\n# TYPE afd_node_info gauge\n"
                    "afd_node_info{%s} 1\n",
                    lab);
    const Afd__StageTimes *t = st->busy;
    afd_sbuf_printf(&b, "# HELP afd_node_busy_seconds_total Time this node spent per stage.\n"
                        "# TYPE afd_node_busy_seconds_total counter\n");
    afd_sbuf_printf(&b, "afd_node_busy_seconds_total{%s,stage=\"compute\"} %.6f\n", lab,
                    t ? (double)(t->attn_us + t->ffn_us) / 1e6 : 0.0);
    afd_sbuf_printf(&b, "afd_node_busy_seconds_total{%s,stage=\"wait\"} %.6f\n", lab,
                    t ? (double)t->wait_us / 1e6 : 0.0);
    afd_sbuf_printf(&b, "afd_node_busy_seconds_total{%s,stage=\"transfer\"} %.6f\n", lab,
                    t ? (double)t->xfer_us / 1e6 : 0.0);
    afd_sbuf_printf(&b,
                    "# HELP afd_node_steps_total Steps this node completed.\n"
                    "# TYPE afd_node_steps_total counter\nafd_node_steps_total{%s} %llu\n",
                    lab, (unsigned long long)st->steps);
    afd_sbuf_printf(&b,
                    "# HELP afd_node_tokens_total Tokens this node computed.\n"
                    "# TYPE afd_node_tokens_total counter\nafd_node_tokens_total{%s} %llu\n",
                    lab, (unsigned long long)st->tokens);
    afd_sbuf_printf(&b,
                    "# HELP afd_node_data_plane_bytes_total Data-plane bytes by direction.\n"
                    "# TYPE afd_node_data_plane_bytes_total counter\n"
                    "afd_node_data_plane_bytes_total{%s,direction=\"a2f\"} %llu\n"
                    "afd_node_data_plane_bytes_total{%s,direction=\"f2a\"} %llu\n",
                    lab, (unsigned long long)st->a2f_bytes, lab, (unsigned long long)st->f2a_bytes);
    afd_sbuf_printf(&b,
                    "# HELP afd_node_data_plane_device 1 when A2F/F2A move from and into device "
                    "memory, 0 when staged through host memory (or a host backend).\n"
                    "# TYPE afd_node_data_plane_device gauge\nafd_node_data_plane_device{%s} %d\n",
                    lab, st->data_plane_device ? 1 : 0);
    if (!strcmp(role, "attention")) {
        afd_sbuf_printf(&b,
                        "# HELP afd_node_f2a_answers_total FFN answers added on a device "
                        "backend, by the memory they arrived in.\n"
                        "# TYPE afd_node_f2a_answers_total counter\n"
                        "afd_node_f2a_answers_total{%s,memory=\"device\"} %llu\n"
                        "afd_node_f2a_answers_total{%s,memory=\"host\"} %llu\n",
                        lab, (unsigned long long)st->f2a_in_device, lab,
                        (unsigned long long)st->f2a_staged);
        afd_sbuf_printf(&b,
                        "# HELP afd_node_kv_blocks KV cache blocks of this node, by state.\n"
                        "# TYPE afd_node_kv_blocks gauge\n"
                        "afd_node_kv_blocks{%s,state=\"used\"} %llu\n"
                        "afd_node_kv_blocks{%s,state=\"total\"} %llu\n",
                        lab, (unsigned long long)st->kv_blocks_used, lab,
                        (unsigned long long)st->kv_blocks_total);
        afd_sbuf_printf(&b,
                        "# HELP afd_node_running Sequences running on this node.\n"
                        "# TYPE afd_node_running gauge\nafd_node_running{%s} %u\n",
                        lab, st->running);
    }
    afd_sbuf_printf(
        &b, "# HELP afd_node_peer_latency_seconds One-way data-plane latency from each peer.\n"
            "# TYPE afd_node_peer_latency_seconds histogram\n");
    for (size_t k = 0; k < st->n_peer_latency; k++)
        net_metrics_latency(&b, "afd_node_peer_latency_seconds", lab, st->peer_latency[k]);
    *len = b.len;
    return b.p;
}
