/*
 * fuzz_frame: a control-plane byte stream (common/net/net_frame.c and the protobuf-c code
 * generated from proto/afd.proto) as a node or the coordinator receives it: fed to the
 * frame reader in pieces, every whole frame taken out and decoded. A decoded frame is
 * encoded again and decoded again: the second encoding must equal the first (the codec
 * is stable once a frame went through it), so what a peer sends is what is read.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "fz_http.h"
#include "net_frame.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_frame: %s\n", what);
    abort();
}

static void roundtrip(Afd__Frame *f)
{
    uint8_t *b1, *b2;
    size_t n1, n2;
    if (net_frame_encode(f, &b1, &n1)) return; /* larger than a frame may be */
    net_frame_reader_t r;
    net_frame_reader_init(&r);
    Afd__Frame *g = NULL;
    if (net_frame_reader_feed(&r, b1, n1) || net_frame_reader_next(&r, &g) != AFD_OK)
        fail("a frame it encoded does not decode");
    if (r.len != 0) fail("bytes left after a whole frame");
    if (g->body_case != f->body_case) fail("the body changed in a round trip");
    if (net_frame_encode(g, &b2, &n2)) fail("a decoded frame does not encode");
    if (n1 != n2 || memcmp(b1, b2, n1) != 0) fail("encoding is not stable");
    free(b1);
    free(b2);
    net_frame_free(g);
    net_frame_reader_fini(&r);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_frame");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t piece = fz_piece_size(data, size);
    if (piece == 0) piece = size ? size : 1;
    net_frame_reader_t r;
    net_frame_reader_init(&r);
    int broken = 0;
    for (size_t off = 0; off < size && !broken; off += piece) {
        size_t n = size - off < piece ? size - off : piece;
        if (net_frame_reader_feed(&r, data + off, n)) break;
        for (;;) {
            Afd__Frame *f = NULL;
            afd_status_t st = net_frame_reader_next(&r, &f);
            if (st == AFD_INPROGRESS) break;
            if (st != AFD_OK) {
                broken = 1; /* the connection would be closed */
                break;
            }
            if (f->version != NET_FRAME_VERSION) fail("a frame of another version was accepted");
            roundtrip(f);
            net_frame_free(f);
        }
    }
    net_frame_reader_fini(&r);
    return 0;
}
