/*
 * fuzz_ctrl: the coordinator's control plane as two nodes drive it (coordinator/
 * coord_nodes.c over the frame reader: Hello with the cluster token, placement, Ready with
 * a UCX address, the peer table and its epoch, Connected, StepResult, Heartbeat, frames
 * out of order). The input is a stream of length-prefixed frames; they go in turn to two
 * node connections of the real listener (frame 0 to the first, frame 1 to the second, ...)
 * so that one input can form a cluster. The coordinator is configured for one attention
 * and one FFN node with the cluster token "secret"; its membership is reset after each
 * input.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "coord.h"
#include "fz_http.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const afd_opt_t coord_table[];

static coord_t g_c;
static uv_loop_t g_loop;
static int g_base;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_ctrl");
    char *args[] = {"fuzz_ctrl", "--cluster-token", "secret", "--attn", "1", "--ffn", "1", NULL};
    int first;
    if (afd_opts_parse(coord_table, &g_c.o, 7, args, "", &first)) abort();
    if (mdl_config_parse(fz_tiny_config, "tiny config", &g_c.cfg)) abort();
    coord_metrics_init(&g_c.metrics);
    g_c.bos_id = -1;
    g_c.micro_batches = 1;
    if (uv_loop_init(&g_loop) < 0) abort();
    g_c.loop = &g_loop;
    uv_timer_init(g_c.loop, &g_c.stop_timer);
    g_c.stop_timer.data = &g_c;
    g_c.o.ctrl_port = 0; /* any free port: nobody connects but the harness */
    if (coord_nodes_listen(&g_c)) abort();
    g_base = fz_loop_handles(&g_loop);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fds[2];
    if (fz_conn_open((uv_stream_t *)&g_c.ctrl, &fds[0])) abort();
    if (fz_conn_open((uv_stream_t *)&g_c.ctrl, &fds[1])) abort();
    size_t off = 0;
    for (int i = 0; off < size; i++) {
        size_t rest = size - off, chunk = rest;
        if (rest >= 4) {
            uint32_t n = (uint32_t)data[off] | (uint32_t)data[off + 1] << 8 |
                         (uint32_t)data[off + 2] << 16 | (uint32_t)data[off + 3] << 24;
            if ((size_t)n < rest - 4) chunk = 4 + (size_t)n;
        }
        fz_conn_send(&g_loop, fds[i & 1], data + off, chunk, 0);
        off += chunk;
    }
    fz_conns_finish(&g_loop, fds, 2, g_base, NULL, NULL);
    /* both nodes left: nothing of them may remain */
    for (int i = 0; i < COORD_MAX_NODES; i++)
        if (g_c.nodes[i].open || g_c.nodes[i].state != NODE_FREE) abort();
    if (g_c.reqs || g_c.ninflight) abort();
    g_c.epoch = 0;
    g_c.formed = 0;
    g_c.ready = 0;
    g_c.reconfig = 0;
    g_c.next_node_id = 0;
    return 0;
}
