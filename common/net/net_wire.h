/*
 * net_wire: the data-plane messages between attention and FFN nodes, one per
 * (step, layer, micro-batch, peer). Version 1; documented in docs/wire.md.
 *   A2F payload: rows (ntok, hidden) in `dtype` [+ fp8 scales (ntok, ceil(hidden/128))
 *                f32] + expert ids (ntok, topk) i32 + weights (ntok, topk) f32
 *   F2A payload: rows (ntok, hidden) in `dtype` (the partial FFN output)
 * Every field is checked by net_wire_check before anything is used.
 */
#ifndef NET_WIRE_H
#define NET_WIRE_H

#include "afd_dtype.h"
#include "afd_status.h"

#include <stddef.h>
#include <stdint.h>

#define NET_WIRE_MAGIC   0x31444641u /* "AFD1" little-endian */
#define NET_WIRE_VERSION 1
#define NET_WIRE_MAX_MB  8

enum net_wire_kind { NET_WIRE_A2F = 1, NET_WIRE_F2A = 2 };

typedef struct net_wire_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    uint32_t epoch; /* placement epoch the sender works in */
    uint32_t src;   /* sender's node id */
    uint64_t step;
    uint16_t layer;
    uint8_t mb;  /* micro-batch index */
    uint8_t nmb; /* micro-batches in the step */
    uint32_t ntok;
    uint32_t hidden;
    uint8_t dtype;       /* afd_dtype_t of the rows */
    uint8_t topk;        /* A2F: experts per token (0 for dense layers) */
    uint8_t reply_dtype; /* A2F: the dtype the F2A answer must use */
    uint8_t pad;
    uint64_t payload; /* bytes that follow */
    uint64_t send_ns; /* sender's CLOCK_REALTIME at send */
} net_wire_hdr_t;

_Static_assert(sizeof(net_wire_hdr_t) == 56, "wire header layout");

/* What a receiver expects; the header must agree with it. */
typedef struct net_wire_limits {
    uint32_t hidden;
    uint32_t topk;
    uint32_t num_layers;
    uint32_t max_tok;
} net_wire_limits_t;

/* Bytes of the payload for a header's kind, ntok, hidden, dtype, topk; 0 on bad dtype. */
uint64_t net_wire_payload_bytes(int kind, uint32_t ntok, uint32_t hidden, afd_dtype_t dt,
                                uint32_t topk);
/* Validates a received header of hdr_len bytes; `why` gets a reason on error. */
afd_status_t net_wire_check(const void *hdr, size_t hdr_len, const net_wire_limits_t *lim,
                            const char **why);

/* A2F: packs g rows (float, already rounded to dt) + ids + weights into dst. */
void net_wire_pack_a2f(const float *g, uint32_t ntok, uint32_t hidden, afd_dtype_t dt,
                       const int32_t *ids, const float *wts, uint32_t topk, void *dst);
/* A2F: unpacks rows into g (float) and ids/weights (bounds-checked against nexp: ids
 * outside [0, nexp) are an error). */
/* Only the routing part of an A2F payload (ids, weights), range-checked as below; the
 * rows (afd_rows_bytes of dt) are left to the caller (afd_rows_decode, or a backend). */
afd_status_t net_wire_unpack_routing(const void *src, uint32_t ntok, uint32_t hidden,
                                     afd_dtype_t dt, uint32_t topk, uint32_t nexp, int32_t *ids,
                                     float *wts);
afd_status_t net_wire_unpack_a2f(const void *src, uint32_t ntok, uint32_t hidden, afd_dtype_t dt,
                                 uint32_t topk, uint32_t nexp, float *g, int32_t *ids, float *wts);
/* F2A: packs / unpacks rows; unpack adds into out (the attention side sums partials). */
void net_wire_pack_rows(const float *x, size_t n, afd_dtype_t dt, void *dst);
void net_wire_add_rows(const void *src, size_t n, afd_dtype_t dt, float *out);

uint64_t net_wire_now_ns(void);

#endif
