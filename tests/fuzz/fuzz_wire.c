/*
 * fuzz_wire: one data-plane message (common/net/net_wire.c) as an FFN or attention node
 * receives it: a 56-byte header checked by net_wire_check against the receiver's limits,
 * then, when the header is accepted and the payload has exactly the size it announces,
 * the payload unpacked (A2F: rows, fp8 scales, expert ids and weights) or summed (F2A).
 * Input: the header bytes (any length; the first 56 when longer), then the payload.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "net_wire.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* a receiver of the tiny model (hidden 320, top-3 of 8 experts, 4 layers) */
static const net_wire_limits_t g_lim = {.hidden = 320, .topk = 3, .num_layers = 4, .max_tok = 64};
#define FZ_NEXP 8

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_wire");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *why = NULL;
    size_t hlen = size < sizeof(net_wire_hdr_t) ? size : sizeof(net_wire_hdr_t);
    /* a header of the wrong length is refused, whatever it holds */
    if (size != sizeof(net_wire_hdr_t) && net_wire_check(data, size, &g_lim, &why) == AFD_OK)
        abort();
    if (net_wire_check(data, hlen, &g_lim, &why) != AFD_OK) {
        if (!why) abort(); /* every refusal says why */
        return 0;
    }
    net_wire_hdr_t h;
    memcpy(&h, data, sizeof(h));
    size_t plen = size - sizeof(h);
    if (h.payload != plen) return 0; /* the receiver drops a message of the wrong length */
    /* payloads land in aligned receive buffers */
    void *p = malloc(plen ? plen : 1);
    if (!p) return 0;
    memcpy(p, data + sizeof(h), plen);
    size_t rows = (size_t)h.ntok * h.hidden;
    float *g = calloc(rows ? rows : 1, sizeof(float));
    int32_t *ids = calloc((size_t)h.ntok * h.topk + 1, sizeof(int32_t));
    float *wts = calloc((size_t)h.ntok * h.topk + 1, sizeof(float));
    if (g && ids && wts) {
        if (h.kind == NET_WIRE_A2F) {
            if (net_wire_unpack_a2f(p, h.ntok, h.hidden, h.dtype, h.topk, FZ_NEXP, g, ids, wts) ==
                AFD_OK) {
                for (size_t i = 0; i < (size_t)h.ntok * h.topk; i++)
                    if (ids[i] < 0 || ids[i] >= FZ_NEXP || !(wts[i] >= 0.0f && wts[i] <= 1.0f))
                        abort();
            }
        } else {
            net_wire_add_rows(p, rows, h.dtype, g);
        }
    }
    free(g);
    free(ids);
    free(wts);
    free(p);
    return 0;
}
