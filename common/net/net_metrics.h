/*
 * net_metrics: a node's Prometheus endpoint. A small HTTP server (net_http on its own
 * libuv loop, in its own thread) serves GET /metrics with the text the node last
 * published, and GET /health; the node's own loop never blocks on a scrape. The text is
 * rendered from the same counters the node sends in its heartbeats.
 */
#ifndef NET_METRICS_H
#define NET_METRICS_H

#include "afd.pb-c.h"
#include "afd_sbuf.h"
#include "afd_status.h"

#include <stddef.h>

typedef struct net_metrics_server net_metrics_server_t;

/* Starts serving on host:port (port 0: any; see net_metrics_port). */
afd_status_t net_metrics_start(const char *host, int port, net_metrics_server_t **out);
int net_metrics_port(const net_metrics_server_t *s);
/* Replaces the text served (copied). */
void net_metrics_publish(net_metrics_server_t *s, const char *text, size_t len);
void net_metrics_stop(net_metrics_server_t *s);

/* Appends one peer's power-of-two-microsecond latency histogram as the Prometheus
 * histogram `name` with the given labels (no HELP/TYPE lines). */
void net_metrics_latency(afd_sbuf_t *b, const char *name, const char *labels,
                         const Afd__LatencyHist *h);
/* Renders a node's counters as Prometheus text into a malloc'd string. */
char *net_metrics_render_node(const Afd__NodeStats *st, const char *role, uint32_t node_id,
                              size_t *len);

#endif
