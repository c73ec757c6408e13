/* net_wire: data-plane header validation and payload packing. */
#define _GNU_SOURCE
#include "net_wire.h"

#include <string.h>
#include <time.h>

uint64_t net_wire_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int wire_dtype_ok(int kind, int dt)
{
    if (kind == NET_WIRE_A2F)
        return dt == AFD_DTYPE_F32 || dt == AFD_DTYPE_BF16 || dt == AFD_DTYPE_E4M3;
    return dt == AFD_DTYPE_F32 || dt == AFD_DTYPE_BF16;
}

uint64_t net_wire_payload_bytes(int kind, uint32_t ntok, uint32_t hidden, afd_dtype_t dt,
                                uint32_t topk)
{
    if (!wire_dtype_ok(kind, dt)) return 0;
    uint64_t rows = (uint64_t)ntok * hidden * afd_dtype_size(dt);
    if (kind == NET_WIRE_F2A) return rows;
    if (dt == AFD_DTYPE_E4M3)
        rows += (uint64_t)ntok * ((hidden + AFD_FP8_GROUP - 1) / AFD_FP8_GROUP) * 4;
    return rows + (uint64_t)ntok * topk * 8;
}

afd_status_t net_wire_check(const void *hdr, size_t hdr_len, const net_wire_limits_t *lim,
                            const char **why)
{
    net_wire_hdr_t h;
    if (hdr_len != sizeof(h)) {
        *why = "header size";
        return AFD_ERR_FORMAT;
    }
    memcpy(&h, hdr, sizeof(h));
    if (h.magic != NET_WIRE_MAGIC) {
        *why = "bad magic";
        return AFD_ERR_FORMAT;
    }
    if (h.version != NET_WIRE_VERSION) {
        *why = "unsupported version";
        return AFD_ERR_UNSUPPORTED;
    }
    if (h.kind != NET_WIRE_A2F && h.kind != NET_WIRE_F2A) {
        *why = "unknown kind";
        return AFD_ERR_FORMAT;
    }
    if (h.nmb < 1 || h.nmb > NET_WIRE_MAX_MB || h.mb >= h.nmb) {
        *why = "micro-batch index out of range";
        return AFD_ERR_RANGE;
    }
    if (h.layer >= lim->num_layers) {
        *why = "layer out of range";
        return AFD_ERR_RANGE;
    }
    if (h.hidden != lim->hidden) {
        *why = "hidden size mismatch";
        return AFD_ERR_FORMAT;
    }
    if (h.ntok > lim->max_tok) {
        *why = "too many tokens";
        return AFD_ERR_RANGE;
    }
    if (!wire_dtype_ok(h.kind, h.dtype)) {
        *why = "bad dtype";
        return AFD_ERR_FORMAT;
    }
    if (h.kind == NET_WIRE_A2F) {
        if (h.topk != 0 && h.topk != lim->topk) {
            *why = "top-k mismatch";
            return AFD_ERR_FORMAT;
        }
        if (!wire_dtype_ok(NET_WIRE_F2A, h.reply_dtype)) {
            *why = "bad reply dtype";
            return AFD_ERR_FORMAT;
        }
    }
    if (h.payload != net_wire_payload_bytes(h.kind, h.ntok, h.hidden, h.dtype, h.topk)) {
        *why = "payload size does not match the header";
        return AFD_ERR_FORMAT;
    }
    return AFD_OK;
}

void net_wire_pack_rows(const float *x, size_t n, afd_dtype_t dt, void *dst)
{
    afd_rows_encode(dt, x, 1, n, dst);
}

void net_wire_add_rows(const void *src, size_t n, afd_dtype_t dt, float *out)
{
    afd_rows_add(dt, src, 1, n, out);
}

void net_wire_pack_a2f(const float *g, uint32_t ntok, uint32_t hidden, afd_dtype_t dt,
                       const int32_t *ids, const float *wts, uint32_t topk, void *dst)
{
    uint8_t *p = dst;
    afd_rows_encode(dt, g, ntok, hidden, p);
    p += afd_rows_bytes(dt, ntok, hidden);
    memcpy(p, ids, (size_t)ntok * topk * 4);
    memcpy(p + (size_t)ntok * topk * 4, wts, (size_t)ntok * topk * 4);
}

afd_status_t net_wire_unpack_routing(const void *src, uint32_t ntok, uint32_t hidden,
                                     afd_dtype_t dt, uint32_t topk, uint32_t nexp, int32_t *ids,
                                     float *wts)
{
    const uint8_t *p = (const uint8_t *)src + afd_rows_bytes(dt, ntok, hidden);
    memcpy(ids, p, (size_t)ntok * topk * 4);
    memcpy(wts, p + (size_t)ntok * topk * 4, (size_t)ntok * topk * 4);
    for (size_t i = 0; i < (size_t)ntok * topk; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= nexp || !(wts[i] >= 0.0f && wts[i] <= 1.0f))
            return AFD_ERR_RANGE;
    return AFD_OK;
}

afd_status_t net_wire_unpack_a2f(const void *src, uint32_t ntok, uint32_t hidden, afd_dtype_t dt,
                                 uint32_t topk, uint32_t nexp, float *g, int32_t *ids, float *wts)
{
    afd_rows_decode(dt, src, ntok, hidden, g);
    return net_wire_unpack_routing(src, ntok, hidden, dt, topk, nexp, ids, wts);
}
