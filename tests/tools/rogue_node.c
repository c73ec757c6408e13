/*
 * rogue_node: a test peer that joins a cluster as an attention node (it knows the
 * cluster token) and then misbehaves on the data plane: for the first step plan it
 * sends every FFN node a message with a bad magic and one whose payload does not match
 * its header (both must be dropped), a valid empty slice for every layer before the
 * first MoE layer (so the step gets that far), and for the MoE layer a slice whose
 * expert ids are out of range (the FFN node must refuse to compute it). The step's
 * requests must fail with an explicit error at the deadline, and every daemon stay up.
 * Use it with one micro-batch.
 *   rogue_node --coordinator HOST:PORT --cluster-token T --layers L --hidden H --topk K
 *              [--moe-layer N]
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "net_node.h"
#include "net_ucx.h"
#include "net_wire.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t g_stop;
static void on_signal(int s)
{
    (void)s;
    g_stop = 1;
}

static void *no_alloc(void *arg, const void *hdr, size_t hl, size_t len, int rndv, int *device)
{
    (void)rndv;
    (void)device;
    (void)arg;
    (void)hdr;
    (void)hl;
    (void)len;
    return NULL;
}

static void no_recv(void *arg, const void *hdr, size_t hl, void *d, size_t len, afd_status_t st)
{
    (void)arg;
    (void)hdr;
    (void)hl;
    (void)d;
    (void)len;
    (void)st;
}

static void sent(void *arg, afd_status_t st)
{
    (void)st;
    (*(int *)arg)--;
}

int main(int argc, char **argv)
{
    afd_log_init("rogue_node");
    const char *coord = NULL, *token = NULL;
    int layers = 0, hidden = 0, topk = 0, moe_layer = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--coordinator"))
            coord = argv[i + 1];
        else if (!strcmp(argv[i], "--cluster-token"))
            token = argv[i + 1];
        else if (!strcmp(argv[i], "--layers"))
            layers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--hidden"))
            hidden = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--topk"))
            topk = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--moe-layer"))
            moe_layer = atoi(argv[i + 1]);
    }
    if (!coord || !token || layers < 1 || hidden < 1 || topk < 1) {
        fprintf(stderr, "usage: rogue_node --coordinator H:P --cluster-token T --layers L "
                        "--hidden H --topk K [--moe-layer N]\n");
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    net_node_t ctl;
    Afd__Hello hello = AFD__HELLO__INIT;
    hello.protocol = 1;
    hello.cluster_token = (char *)token;
    hello.role = AFD__ROLE__ROLE_ATTN;
    hello.name = "rogue";
    hello.model_id = "rogue";
    hello.kv_blocks = 1;
    hello.kv_block_size = 16;
    hello.max_batch_tokens = 16;
    Afd__Welcome *w;
    if (net_node_join(&ctl, coord, &hello, 10000, &w)) return 1;
    afd__welcome__free_unpacked(w, NULL);
    net_ucx_t *ucx;
    net_ucx_opts_t uo = {
        .max_hdr = 256, .max_payload = 1 << 20, .alloc_cb = no_alloc, .recv_cb = no_recv};
    if (net_ucx_create(&uo, &ucx) || net_node_send_ready(&ctl, ucx)) return 1;
    net_peer_set_t ffn = {0};
    uint32_t epoch = 0;
    int attacked = 0, pending = 0;
    static uint8_t payload[1 << 16];
    while (!g_stop) {
        Afd__Frame *in;
        afd_status_t st;
        while ((st = net_node_next(&ctl, &in)) == AFD_OK) {
            if (in->body_case == AFD__FRAME__BODY_PEERS) {
                if (net_peer_set_apply(&ffn, ucx, in->peers, AFD__ROLE__ROLE_FFN) == AFD_OK) {
                    epoch = in->peers->epoch;
                    net_node_send_connected(&ctl, epoch);
                }
            } else if (in->body_case == AFD__FRAME__BODY_PLAN && !attacked) {
                const Afd__StepPlan *p = in->plan;
                net_wire_hdr_t h = {.magic = NET_WIRE_MAGIC,
                                    .version = NET_WIRE_VERSION,
                                    .kind = NET_WIRE_A2F,
                                    .epoch = epoch,
                                    .src = ctl.node_id,
                                    .step = p->step,
                                    .layer = 0,
                                    .mb = 0,
                                    .nmb = (uint8_t)p->micro_batches,
                                    .ntok = 1,
                                    .hidden = (uint32_t)hidden,
                                    .dtype = AFD_DTYPE_F32,
                                    .topk = 0,
                                    .reply_dtype = AFD_DTYPE_BF16};
                for (int f = 0; f < ffn.n; f++) {
                    net_wire_hdr_t bad = h;
                    bad.magic = 0xdeadbeef;
                    bad.payload =
                        net_wire_payload_bytes(NET_WIRE_A2F, 1, (uint32_t)hidden, AFD_DTYPE_F32, 0);
                    pending++;
                    net_ucx_send(ffn.ep[f], &bad, sizeof(bad), payload, bad.payload, NULL, 0, sent,
                                 &pending);
                    net_wire_hdr_t lie = h; /* the header promises more than it carries */
                    lie.payload = 12345;
                    pending++;
                    net_ucx_send(ffn.ep[f], &lie, sizeof(lie), payload, 100, NULL, 0, sent,
                                 &pending);
                    for (int l = 0; l < moe_layer; l++) { /* valid, empty: the step goes on */
                        net_wire_hdr_t ok = h;
                        ok.layer = (uint16_t)l;
                        ok.ntok = 0;
                        ok.payload = 0;
                        pending++;
                        net_ucx_send(ffn.ep[f], &ok, sizeof(ok), payload, 0, NULL, 0, sent,
                                     &pending);
                    }
                    net_wire_hdr_t ids = h; /* expert ids out of range in a MoE layer */
                    ids.layer = (uint16_t)moe_layer;
                    ids.topk = (uint8_t)topk;
                    ids.payload = net_wire_payload_bytes(NET_WIRE_A2F, 1, (uint32_t)hidden,
                                                         AFD_DTYPE_F32, (uint32_t)topk);
                    memset(payload, 0x7f, sizeof(payload));
                    pending++;
                    net_ucx_send(ffn.ep[f], &ids, sizeof(ids), payload, ids.payload, NULL, 0, sent,
                                 &pending);
                }
                attacked = 1;
                printf("rogue: sent malformed A2F messages for step %llu\n",
                       (unsigned long long)p->step);
                fflush(stdout);
            }
            net_frame_free(in);
        }
        if (st == AFD_ERR_PEER) break;
        net_node_wait(&ctl, ucx, 0, 100);
    }
    net_peer_set_close(&ffn);
    net_node_close(&ctl);
    net_ucx_destroy(ucx);
    return 0;
}
