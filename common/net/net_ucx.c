/*
 * net_ucx: the UCX data plane (see net_ucx.h for the contract).
 *
 * One ucp context (UCP_FEATURE_AM | UCP_FEATURE_WAKEUP) and one worker in
 * UCS_THREAD_MODE_SINGLE per net_ucx_t; every message is one active message with a
 * single AM id: the AM header is the caller's header, the AM payload is the data.
 *
 * Receive path (handler registered with UCP_AM_FLAG_WHOLE_MSG, so eager messages
 * arrive in one piece): the header is checked against max_hdr and the length against
 * max_payload (violations are dropped with a logged error and never reach the
 * application), copied into aligned memory and handed to alloc_cb.
 *   - eager: the payload is copied to the destination and recv_cb runs at once;
 *   - rendezvous: ucp_am_recv_data_nbx pulls the payload into the destination
 *     (with the region's memh when the destination lies in a net_ucx_mem_map
 *     region) and recv_cb runs from its completion, with the header saved in a
 *     pooled record. Dropping a rendezvous message is done by returning UCS_OK
 *     from the handler without starting the receive: UCX 1.13 then releases the
 *     descriptor itself and acks the sender, whose send completes with UCS_OK
 *     (calling ucp_am_data_release inside the handler would release it twice).
 * alloc_cb learns which of the two it is, and may return device memory for a rendezvous
 * payload (*device: the receive names the CUDA memory type, or host with device_host);
 * an eager payload given device memory is refused through recv_cb (no host memcpy into
 * device memory). A NET_UCX_DEVICE send names the payload's memory type too and forces
 * rendezvous, so a device payload always reaches the receiver's choice of buffer.
 * Every alloc_cb that returns non-NULL is matched by exactly one recv_cb (status
 * AFD_OK or the transfer error), unless the worker is destroyed with the transfer
 * still pending.
 *
 * Send path: ucp_am_send_nbx. UCX 1.13 has no UCP_AM_SEND_FLAG_COPY_HEADER (it came
 * in 1.14), and the header must stay valid until the send completes, so it is copied
 * into a pooled per-request record. Records (send and receive) come from free lists
 * refilled by slabs: no malloc per message once warm.
 *
 * Error handling mode: opts.err_mode_peer selects UCP_ERR_HANDLING_MODE_PEER, which
 * lets UCX detect a dead peer and call the endpoint's error handler (-> err_cb).
 * Note for UCX 1.13: in PEER mode the shared-memory transports (posix, sysv) are
 * excluded unless UCX_MM_ERROR_HANDLING=y (or UCX_POSIX_ERROR_HANDLING=y and
 * UCX_SYSV_ERROR_HANDLING=y) is set, so intra-node traffic falls back to tcp/cma and
 * loses bandwidth. This module never changes the environment: set the variable in
 * the daemon's environment if you want shm with peer-failure detection; dead peers
 * are then found by UCX keepalive, far more slowly than by a tcp reset (on the test
 * machine: not within 8 s even with UCX_KEEPALIVE_INTERVAL=1s, against ~50 ms for
 * tcp).
 *
 * Threading: single-threaded. All calls on one net_ucx_t (and its peers) must come
 * from one thread; callbacks run on that thread inside net_ucx_progress/wait/destroy,
 * and a send callback may also run inside net_ucx_send (immediate completion).
 * Callbacks must not call net_ucx_progress/wait/destroy (UCX forbids progress from
 * its callbacks); they may call net_ucx_send and net_ucx_disconnect (a disconnect from
 * inside a callback is carried out when the progress call returns).
 *
 * Other rules of use:
 *   - headers reach alloc_cb/recv_cb copied to max_align_t-aligned memory;
 *   - alloc_cb also runs for zero-length payloads: return any non-NULL pointer (it is
 *     not written) to accept the message, NULL to drop it;
 *   - net_ucx_progress/wait count user-visible events (deliveries, drops, send
 *     completions, peer failures), not UCX-internal progress;
 *   - disconnect returns at once; the flush runs in later progress calls. destroy
 *     closes what is left (forcibly for failed peers) and waits at most
 *     NET_UCX_CLOSE_WAIT_MS for closes and transfers in flight; pending send
 *     callbacks run during destroy, messages arriving meanwhile are dropped;
 *   - do not fork() while a net_ucx_t exists (UCX's async thread and its epoll set
 *     would be shared with the child); create it after forking.
 */
#define _GNU_SOURCE
#include "net_ucx.h"

#include "afd_log.h"

#include <errno.h>
#include <poll.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucp/api/ucp.h>

#define NET_UCX_AM_ID         17u   /* the one AM id every message uses */
#define NET_UCX_SLAB_RECS     64    /* records per slab */
#define NET_UCX_CLOSE_WAIT_MS 2000  /* destroy: bound on flushing and closing endpoints */
#define NET_UCX_MAX_ADDR_LEN  65536 /* sanity bound on a worker address */

typedef struct ucx_rec ucx_rec_t;
typedef struct ucx_slab ucx_slab_t;
typedef struct ucx_region ucx_region_t;

/* A send or rendezvous-receive in flight; the header bytes follow the record. */
struct ucx_rec {
    ucx_rec_t *next; /* free list */
    net_ucx_t *u;
    net_ucx_send_cb cb; /* send */
    void *arg;          /* send */
    void *dst;          /* receive */
    size_t len;         /* payload bytes */
    size_t hdr_len;
    uint32_t peer_id; /* send: for the log line */
};

struct ucx_slab {
    ucx_slab_t *next;
};

/* A net_ucx_mem_map registration; the memh handed to the caller points to it. */
struct ucx_region {
    ucx_region_t *next;
    ucp_mem_h memh;
    uintptr_t addr;
    size_t len;
};

struct net_ucx_peer {
    net_ucx_peer_t *next; /* u->peers while open, then u->deferred, then u->closing */
    net_ucx_t *u;
    ucp_ep_h ep;
    uint32_t id;
    int failed;       /* the error handler ran: close with force */
    int closing;      /* net_ucx_disconnect was called: no more err_cb */
    int state;        /* PEER_*: where closing stands */
    int req_released; /* destroy gave up waiting and released req */
    void *req;        /* the flush or close request in flight */
};

struct net_ucx {
    net_ucx_opts_t opts;
    ucp_context_h ctx;
    ucp_worker_h worker;
    ucp_address_t *addr;
    size_t addr_len;
    int efd;
    int destroying;
    size_t rec_size, hdr_off;
    ucx_rec_t *free_recs;
    ucx_slab_t *slabs;
    ucx_region_t *regions;
    net_ucx_peer_t *peers;
    net_ucx_peer_t *deferred; /* disconnected from inside a callback: closed after it */
    net_ucx_peer_t *closing;
    int in_progress;         /* inside ucp_worker_progress/destroy: UCX callbacks may run */
    unsigned closed_pending; /* closing peers whose request completed, not yet reaped */
    uint64_t outstanding;    /* sends and rendezvous receives in flight */
    uint64_t events;         /* user-visible events: completions, drops, peer errors */
    uint32_t last_err_peer;  /* last logged send failure, to log a burst once */
    ucs_status_t last_err_status;
    unsigned char *hdr_buf; /* aligned copy of an eager message's header */
    int cuda_memory;        /* the context's transports move CUDA device memory */
    net_ucx_stats_t st;
};

/* ---- helpers ---- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A UCX status as the project's status (for setup calls; transfers use xfer_status). */
static afd_status_t ucx_status(ucs_status_t s)
{
    switch (s) {
    case UCS_OK:
        return AFD_OK;
    case UCS_INPROGRESS:
        return AFD_INPROGRESS;
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
        return AFD_ERR_NOMEM;
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
        return AFD_ERR_INVALID;
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NO_DEVICE:
        return AFD_ERR_UNSUPPORTED;
    case UCS_ERR_BUSY:
        return AFD_ERR_BUSY;
    case UCS_ERR_CANCELED:
        return AFD_ERR_CANCELED;
    case UCS_ERR_TIMED_OUT:
        return AFD_ERR_TIMEOUT;
    case UCS_ERR_OUT_OF_RANGE:
    case UCS_ERR_EXCEEDS_LIMIT:
    case UCS_ERR_MESSAGE_TRUNCATED:
        return AFD_ERR_RANGE;
    case UCS_ERR_IO_ERROR:
        return AFD_ERR_IO;
    default:
        return AFD_ERR_PEER;
    }
}

/* A failed transfer's status: canceled stays canceled, anything else is the peer's. */
static afd_status_t xfer_status(ucs_status_t s)
{
    if (s == UCS_OK) return AFD_OK;
    if (s == UCS_ERR_CANCELED) return AFD_ERR_CANCELED;
    return AFD_ERR_PEER;
}

static unsigned char *rec_hdr(const net_ucx_t *u, ucx_rec_t *r)
{
    return (unsigned char *)r + u->hdr_off;
}

static ucx_rec_t *rec_get(net_ucx_t *u)
{
    if (!u->free_recs) {
        size_t slab_off =
            (sizeof(ucx_slab_t) + alignof(max_align_t) - 1) & ~(alignof(max_align_t) - 1);
        ucx_slab_t *s = malloc(slab_off + NET_UCX_SLAB_RECS * u->rec_size);
        if (!s) return NULL;
        s->next = u->slabs;
        u->slabs = s;
        for (int i = NET_UCX_SLAB_RECS - 1; i >= 0; i--) {
            ucx_rec_t *r = (ucx_rec_t *)((char *)s + slab_off + (size_t)i * u->rec_size);
            r->next = u->free_recs;
            u->free_recs = r;
        }
    }
    ucx_rec_t *r = u->free_recs;
    u->free_recs = r->next;
    r->u = u;
    return r;
}

static void rec_put(net_ucx_t *u, ucx_rec_t *r)
{
    r->next = u->free_recs;
    u->free_recs = r;
}

static int region_covers(const ucx_region_t *r, const void *p, size_t len)
{
    uintptr_t a = (uintptr_t)p;
    return a >= r->addr && len <= r->len && a - r->addr <= r->len - len;
}

/* A registered region holding [p, p + len), or NULL. */
static ucx_region_t *region_find(net_ucx_t *u, const void *p, size_t len)
{
    for (ucx_region_t *r = u->regions; r; r = r->next)
        if (region_covers(r, p, len)) return r;
    return NULL;
}

/* ---- receive ---- */

static void ucx_drop(net_ucx_t *u)
{
    u->st.rx_dropped++;
    u->events++;
}

static void ucx_recv_done(void *request, ucs_status_t status, size_t length, void *user_data)
{
    ucx_rec_t *r = user_data;
    net_ucx_t *u = r->u;
    afd_status_t st = xfer_status(status);
    if (status == UCS_OK && length != r->len) {
        afd_error("ucx: rendezvous receive got %zu bytes, expected %zu", length, r->len);
        st = AFD_ERR_PEER;
    } else if (status != UCS_OK) {
        afd_error("ucx: rendezvous receive of %zu bytes failed: %s", r->len,
                  ucs_status_string(status));
    }
    u->outstanding--;
    u->events++;
    if (st == AFD_OK) {
        u->st.rx_msgs++;
        u->st.rx_bytes += r->len;
        u->st.rx_rndv++;
    }
    ucp_request_free(request);
    u->opts.recv_cb(u->opts.arg, rec_hdr(u, r), r->hdr_len, r->dst, r->len, st);
    rec_put(u, r);
}

static ucs_status_t ucx_am_cb(void *arg, const void *header, size_t header_length, void *data,
                              size_t length, const ucp_am_recv_param_t *param)
{
    net_ucx_t *u = arg;
    int rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;

    if (u->destroying) { /* the application is going away: take nothing new */
        ucx_drop(u);
        return UCS_OK;
    }
    /* Returning UCS_OK drops either kind: UCX frees the eager data, and for rendezvous
     * it releases the descriptor and acks the sender (whose send then completes OK). */
    if (header_length > u->opts.max_hdr) {
        afd_error("ucx: dropping a message with a %zu-byte header (limit %zu)", header_length,
                  u->opts.max_hdr);
        ucx_drop(u);
        return UCS_OK;
    }
    if (length > u->opts.max_payload) {
        afd_error("ucx: dropping a message with a %zu-byte payload (limit %zu)", length,
                  u->opts.max_payload);
        ucx_drop(u);
        return UCS_OK;
    }

    int device = 0;
    if (!rndv) {
        if (header_length) memcpy(u->hdr_buf, header, header_length);
        void *dst = u->opts.alloc_cb(u->opts.arg, u->hdr_buf, header_length, length, 0, &device);
        if (!dst) {
            afd_warn("ucx: no buffer for a %zu-byte message: dropped", length);
            ucx_drop(u);
            return UCS_OK;
        }
        if (length && device && !u->opts.device_host) { /* not reachable by memcpy */
            afd_error("ucx: a device buffer for a %zu-byte eager message: dropped", length);
            u->st.rx_dropped++;
            u->events++;
            u->opts.recv_cb(u->opts.arg, u->hdr_buf, header_length, dst, length, AFD_ERR_INVALID);
            return UCS_OK;
        }
        if (length) memcpy(dst, data, length);
        u->st.rx_msgs++;
        u->st.rx_bytes += length;
        u->st.rx_eager++;
        u->events++;
        u->opts.recv_cb(u->opts.arg, u->hdr_buf, header_length, dst, length, AFD_OK);
        return UCS_OK;
    }

    ucx_rec_t *r = rec_get(u);
    if (!r) {
        afd_error("ucx: out of memory for a receive record: %zu-byte message dropped", length);
        ucx_drop(u);
        return UCS_OK;
    }
    unsigned char *hdr = rec_hdr(u, r);
    if (header_length) memcpy(hdr, header, header_length);
    r->hdr_len = header_length;
    r->len = length;
    r->dst = u->opts.alloc_cb(u->opts.arg, hdr, header_length, length, 1, &device);
    if (!r->dst) {
        afd_warn("ucx: no buffer for a %zu-byte message: dropped", length);
        rec_put(u, r);
        ucx_drop(u);
        return UCS_OK;
    }

    ucp_request_param_t rp = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.recv_am = ucx_recv_done,
        .user_data = r,
    };
    ucx_region_t *reg = device ? NULL : region_find(u, r->dst, length);
    if (reg) {
        rp.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        rp.memh = reg->memh;
    }
    if (device) {
        rp.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
        rp.memory_type = u->opts.device_host ? UCS_MEMORY_TYPE_HOST : UCS_MEMORY_TYPE_CUDA;
    }
    /* counted first: the completion callback may run inside ucp_am_recv_data_nbx */
    u->outstanding++;
    ucs_status_ptr_t sp = ucp_am_recv_data_nbx(u->worker, data, r->dst, length, &rp);
    if (sp != NULL && !UCS_PTR_IS_ERR(sp)) return UCS_INPROGRESS;
    /* completed (or failed) at once, no callback: UCX owns the descriptor either way */
    u->outstanding--;
    ucs_status_t s = UCS_PTR_STATUS(sp);
    afd_status_t st = xfer_status(s);
    if (s != UCS_OK) {
        afd_error("ucx: rendezvous receive of %zu bytes failed: %s", length, ucs_status_string(s));
    } else {
        u->st.rx_msgs++;
        u->st.rx_bytes += length;
        u->st.rx_rndv++;
    }
    u->events++;
    u->opts.recv_cb(u->opts.arg, hdr, header_length, r->dst, length, st);
    rec_put(u, r);
    return UCS_OK;
}

/* ---- create / destroy ---- */

afd_status_t net_ucx_create(const net_ucx_opts_t *opts, net_ucx_t **out)
{
    if (!opts || !out || !opts->alloc_cb || !opts->recv_cb) {
        afd_error("ucx: create needs options with alloc_cb and recv_cb");
        return AFD_ERR_INVALID;
    }
    ucs_status_t s;
    afd_status_t st = AFD_ERR_NOMEM;
    net_ucx_t *u = calloc(1, sizeof(*u));
    if (!u) {
        afd_error("ucx: out of memory");
        return AFD_ERR_NOMEM;
    }
    u->opts = *opts;
    u->efd = -1;
    const size_t al = alignof(max_align_t);
    u->hdr_off = (sizeof(ucx_rec_t) + al - 1) & ~(al - 1);
    u->rec_size = u->hdr_off + ((opts->max_hdr + al - 1) & ~(al - 1));
    u->hdr_buf = malloc(opts->max_hdr ? opts->max_hdr : 1);
    if (!u->hdr_buf) {
        afd_error("ucx: out of memory");
        goto err_free;
    }

    ucp_config_t *cfg;
    s = ucp_config_read(NULL, NULL, &cfg);
    if (s != UCS_OK) {
        afd_error("ucx: reading the UCX configuration failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_free;
    }
    ucp_params_t cp = {
        .field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
        .features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
        .name = "afd",
    };
    s = ucp_init(&cp, cfg, &u->ctx);
    ucp_config_release(cfg);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_init failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_free;
    }
    /* which memory the loaded transports can move: a UCX built with CUDA (cuda_copy,
     * cuda_ipc, gdr_copy) lists CUDA memory; Debian's does not */
    ucp_context_attr_t ca = {.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES};
    if (ucp_context_query(u->ctx, &ca) == UCS_OK)
        u->cuda_memory = (ca.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;

    ucp_worker_params_t wp = {
        .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_EVENTS,
        .thread_mode = UCS_THREAD_MODE_SINGLE,
        .events = UCP_WAKEUP_RX | UCP_WAKEUP_TX | UCP_WAKEUP_RMA, /* AM arrivals are RX */
    };
    s = ucp_worker_create(u->ctx, &wp, &u->worker);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_worker_create failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_cleanup;
    }

    ucp_worker_attr_t wa = {.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER};
    s = ucp_worker_query(u->worker, &wa);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_worker_query failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_worker;
    }
    if (opts->max_hdr > wa.max_am_header) {
        afd_error("ucx: max_hdr %zu exceeds the transports' active-message header limit %zu",
                  opts->max_hdr, wa.max_am_header);
        st = AFD_ERR_RANGE;
        goto err_worker;
    }

    s = ucp_worker_get_efd(u->worker, &u->efd);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_worker_get_efd failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_worker;
    }

    ucp_am_handler_param_t hp = {
        .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                      UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG,
        .id = NET_UCX_AM_ID,
        .flags = UCP_AM_FLAG_WHOLE_MSG,
        .cb = ucx_am_cb,
        .arg = u,
    };
    s = ucp_worker_set_am_recv_handler(u->worker, &hp);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_worker_set_am_recv_handler failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_worker;
    }

    s = ucp_worker_get_address(u->worker, &u->addr, &u->addr_len);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_worker_get_address failed: %s", ucs_status_string(s));
        st = ucx_status(s);
        goto err_worker;
    }
    *out = u;
    return AFD_OK;

err_worker:
    ucp_worker_destroy(u->worker);
err_cleanup:
    ucp_cleanup(u->ctx);
err_free:
    free(u->hdr_buf);
    free(u);
    return st;
}

/*
 * Closing an endpoint. A failed peer is closed with force at once. Otherwise, with
 * err_mode_peer: flush (ucp_ep_flush_nbx), then close with force, which also purges
 * whatever UCX still holds for the endpoint (a rendezvous receive from a peer that died
 * unnoticed would otherwise trip UCX 1.13's assertions in ucp_worker_destroy); without
 * it (force is refused then): ucp_ep_close_nbx in flush mode. Peers being closed sit on
 * u->closing; completions only mark them (they run inside UCX), ucx_reap acts on them.
 */
enum { PEER_FLUSHING = 1, PEER_CLOSING = 2, PEER_FLUSHED = 3, PEER_CLOSED = 4 };

/* A failure while closing is news only if the peer was not known to have failed. */
static void ucx_close_log(const net_ucx_peer_t *p, const char *what, ucs_status_t status)
{
    if (status == UCS_OK) return;
    if (p->failed)
        afd_debug("ucx: %s the endpoint of failed peer %u: %s", what, p->id,
                  ucs_status_string(status));
    else
        afd_error("ucx: %s the endpoint of peer %u failed: %s", what, p->id,
                  ucs_status_string(status));
}

static void ucx_flush_done(void *request, ucs_status_t status, void *user_data)
{
    net_ucx_peer_t *p = user_data;
    ucx_close_log(p, "flushing", status);
    if (!p->req_released) ucp_request_free(request);
    p->req = NULL;
    p->state = PEER_FLUSHED;
    p->u->closed_pending++;
}

static void ucx_close_done(void *request, ucs_status_t status, void *user_data)
{
    net_ucx_peer_t *p = user_data;
    ucx_close_log(p, "closing", status);
    if (!p->req_released) ucp_request_free(request);
    p->req = NULL;
    p->state = PEER_CLOSED;
    p->u->closed_pending++;
}

/* Closes p's endpoint with force (err_mode_peer only); the ep is gone on return. */
static void ucx_close_force(net_ucx_peer_t *p)
{
    ucp_request_param_t cp = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
        .flags = UCP_EP_CLOSE_FLAG_FORCE,
    };
    ucs_status_ptr_t sp = ucp_ep_close_nbx(p->ep, &cp);
    if (UCS_PTR_IS_PTR(sp))
        ucp_request_free(sp); /* not expected for force */
    else
        ucx_close_log(p, "closing", UCS_PTR_STATUS(sp));
}

/* Starts closing p's endpoint (already unlinked from u->peers); frees p when done. */
static void ucx_close_ep(net_ucx_t *u, net_ucx_peer_t *p)
{
    p->closing = 1;
    ucs_status_ptr_t sp;
    if (p->failed) {
        ucx_close_force(p);
        free(p);
        return;
    }
    if (u->opts.err_mode_peer) {
        ucp_request_param_t fp = {
            .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
            .cb.send = ucx_flush_done,
            .user_data = p,
        };
        sp = ucp_ep_flush_nbx(p->ep, &fp);
        if (!UCS_PTR_IS_PTR(sp)) {
            ucx_close_log(p, "flushing", UCS_PTR_STATUS(sp));
            ucx_close_force(p);
            free(p);
            return;
        }
        p->state = PEER_FLUSHING;
    } else {
        ucp_request_param_t cp = {
            .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
            .cb.send = ucx_close_done,
            .user_data = p,
        };
        sp = ucp_ep_close_nbx(p->ep, &cp);
        if (!UCS_PTR_IS_PTR(sp)) {
            /* done, or failed: the endpoint is released either way */
            ucx_close_log(p, "closing", UCS_PTR_STATUS(sp));
            free(p);
            return;
        }
        p->state = PEER_CLOSING;
    }
    p->req = sp;
    p->next = u->closing;
    u->closing = p;
}

/* Acts on closing peers whose flush or close completed (outside UCX callbacks). */
static void ucx_reap(net_ucx_t *u)
{
    net_ucx_peer_t **pp = &u->closing;
    while (*pp && u->closed_pending) {
        net_ucx_peer_t *p = *pp;
        if (p->state == PEER_FLUSHED || p->state == PEER_CLOSED) {
            *pp = p->next;
            u->closed_pending--;
            if (p->state == PEER_FLUSHED) ucx_close_force(p);
            free(p);
        } else {
            pp = &p->next;
        }
    }
}

/* One ucp_worker_progress, then the closes that callbacks asked for and the reaping of
 * finished closes. */
static unsigned ucx_progress(net_ucx_t *u)
{
    u->in_progress = 1;
    unsigned n = ucp_worker_progress(u->worker);
    u->in_progress = 0;
    while (u->deferred) {
        net_ucx_peer_t *p = u->deferred;
        u->deferred = p->next;
        ucx_close_ep(u, p);
    }
    if (u->closed_pending) ucx_reap(u);
    return n;
}

void net_ucx_destroy(net_ucx_t *u)
{
    if (!u) return;
    u->destroying = 1;
    while (u->peers) {
        net_ucx_peer_t *p = u->peers;
        u->peers = p->next;
        ucx_close_ep(u, p);
    }
    double deadline = now_ms() + NET_UCX_CLOSE_WAIT_MS;
    while ((u->closing || u->deferred || u->outstanding) && now_ms() < deadline)
        ucx_progress(u);

    /* What is left: peers that neither answer nor are known to be dead. UCX wants every
     * request released before the worker goes; records stay allocated until after
     * ucp_worker_destroy, which may still complete them. */
    net_ucx_peer_t *zombies = NULL;
    unsigned n = 0;
    while (u->closing) {
        net_ucx_peer_t *p = u->closing;
        u->closing = p->next;
        if (p->req) {
            p->req_released = 1;
            ucp_request_free(p->req);
            n++;
        }
        if (p->state == PEER_FLUSHING || p->state == PEER_FLUSHED) ucx_close_force(p);
        p->next = zombies;
        zombies = p;
    }
    if (n || u->outstanding)
        afd_warn("ucx: destroying with %u endpoint(s) still closing and %llu transfer(s) "
                 "pending after %d ms",
                 n, (unsigned long long)u->outstanding, NET_UCX_CLOSE_WAIT_MS);
    ucp_worker_release_address(u->worker, u->addr);
    u->in_progress = 1; /* leftover requests may complete in there */
    ucp_worker_destroy(u->worker);
    while (zombies) {
        net_ucx_peer_t *p = zombies;
        zombies = p->next;
        free(p);
    }
    while (u->regions) {
        ucx_region_t *r = u->regions;
        u->regions = r->next;
        ucp_mem_unmap(u->ctx, r->memh);
        free(r);
    }
    while (u->slabs) {
        ucx_slab_t *s = u->slabs;
        u->slabs = s->next;
        free(s);
    }
    ucp_cleanup(u->ctx);
    free(u->hdr_buf);
    free(u);
}

/* ---- worker ---- */

afd_status_t net_ucx_address(net_ucx_t *u, const void **addr, size_t *len)
{
    if (!u || !addr || !len) return AFD_ERR_INVALID;
    *addr = u->addr;
    *len = u->addr_len;
    return AFD_OK;
}

int net_ucx_fd(net_ucx_t *u)
{
    return u->efd;
}

afd_status_t net_ucx_arm(net_ucx_t *u)
{
    ucs_status_t s = ucp_worker_arm(u->worker);
    if (s == UCS_OK) return AFD_OK;
    if (s == UCS_ERR_BUSY) return AFD_ERR_BUSY;
    afd_error("ucx: ucp_worker_arm failed: %s", ucs_status_string(s));
    return ucx_status(s);
}

unsigned net_ucx_progress(net_ucx_t *u)
{
    uint64_t e0 = u->events;
    ucx_progress(u);
    return (unsigned)(u->events - e0);
}

unsigned net_ucx_wait(net_ucx_t *u, int busy_us, int timeout_ms)
{
    double t0 = now_ms();
    unsigned n = 0;
    do {
        n += net_ucx_progress(u);
        if (n) return n;
    } while (busy_us > 0 && (now_ms() - t0) * 1e3 < busy_us);

    double deadline = t0 + timeout_ms;
    for (;;) {
        double left = timeout_ms < 0 ? -1 : deadline - now_ms();
        if (timeout_ms >= 0 && left <= 0) return n;
        ucs_status_t s = ucp_worker_arm(u->worker);
        if (s == UCS_OK) {
            struct pollfd pfd = {.fd = u->efd, .events = POLLIN};
            int ms = left < 0 ? -1 : (int)(left + 0.999);
            if (poll(&pfd, 1, ms) < 0 && errno != EINTR) {
                afd_error("ucx: poll on the worker's event fd: %m");
                return n;
            }
        } else if (s != UCS_ERR_BUSY) {
            afd_error("ucx: ucp_worker_arm failed: %s", ucs_status_string(s));
            return n;
        }
        /* events pending (busy) or the fd fired: drain what is there */
        unsigned k;
        do {
            k = net_ucx_progress(u);
            n += k;
        } while (k);
        if (n) return n;
    }
}

/* ---- memory ---- */

afd_status_t net_ucx_mem_map(net_ucx_t *u, void *p, size_t len, void **memh)
{
    if (!u || !p || !len || !memh) {
        afd_error("ucx: mem_map needs a non-empty buffer");
        return AFD_ERR_INVALID;
    }
    ucx_region_t *r = malloc(sizeof(*r));
    if (!r) {
        afd_error("ucx: out of memory");
        return AFD_ERR_NOMEM;
    }
    ucp_mem_map_params_t mp = {
        .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
        .address = p,
        .length = len,
    };
    ucs_status_t s = ucp_mem_map(u->ctx, &mp, &r->memh);
    if (s != UCS_OK) {
        afd_error("ucx: ucp_mem_map of %zu bytes failed: %s", len, ucs_status_string(s));
        free(r);
        return ucx_status(s);
    }
    r->addr = (uintptr_t)p;
    r->len = len;
    r->next = u->regions;
    u->regions = r;
    *memh = r;
    return AFD_OK;
}

void net_ucx_mem_unmap(net_ucx_t *u, void *memh)
{
    if (!u || !memh) return;
    for (ucx_region_t **pp = &u->regions; *pp; pp = &(*pp)->next) {
        if (*pp != memh) continue;
        ucx_region_t *r = *pp;
        *pp = r->next;
        ucs_status_t s = ucp_mem_unmap(u->ctx, r->memh);
        if (s != UCS_OK) afd_error("ucx: ucp_mem_unmap failed: %s", ucs_status_string(s));
        free(r);
        return;
    }
    AFD_ASSERT(!"net_ucx_mem_unmap: unknown memory handle");
}

/* ---- endpoints ---- */

static void ucx_ep_err(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)ep;
    net_ucx_peer_t *p = arg;
    net_ucx_t *u = p->u;
    p->failed = 1;
    afd_error("ucx: peer %u failed: %s", p->id, ucs_status_string(status));
    if (p->closing || u->destroying) return; /* the caller is done with this peer */
    u->events++;
    /* the callback may disconnect p (deferred): do not touch p afterwards */
    if (u->opts.err_cb) u->opts.err_cb(u->opts.arg, p->id, xfer_status(status));
}

afd_status_t net_ucx_connect(net_ucx_t *u, const void *addr, size_t len, uint32_t peer_id,
                             net_ucx_peer_t **out)
{
    if (!u || !addr || !out || len == 0 || len > NET_UCX_MAX_ADDR_LEN) {
        afd_error("ucx: connect to peer %u: bad worker address (%zu bytes)", peer_id, len);
        return AFD_ERR_INVALID;
    }
    if (u->destroying) return AFD_ERR_SHUTDOWN;
    net_ucx_peer_t *p = calloc(1, sizeof(*p));
    if (!p) {
        afd_error("ucx: out of memory");
        return AFD_ERR_NOMEM;
    }
    p->u = u;
    p->id = peer_id;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .address = addr,
        .err_mode = u->opts.err_mode_peer ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE,
    };
    if (u->opts.err_mode_peer) {
        ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.err_handler.cb = ucx_ep_err;
        ep.err_handler.arg = p;
    }
    ucs_status_t s = ucp_ep_create(u->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        afd_error("ucx: connect to peer %u: ucp_ep_create failed: %s", peer_id,
                  ucs_status_string(s));
        free(p);
        return ucx_status(s);
    }
    p->next = u->peers;
    u->peers = p;
    *out = p;
    return AFD_OK;
}

void net_ucx_disconnect(net_ucx_peer_t *p)
{
    if (!p) return;
    net_ucx_t *u = p->u;
    if (u->destroying) return; /* destroy is closing every endpoint already */
    net_ucx_peer_t **pp = &u->peers;
    while (*pp && *pp != p)
        pp = &(*pp)->next;
    AFD_ASSERT(*pp == p); /* disconnecting twice is a bug */
    *pp = p->next;
    p->closing = 1;
    if (u->in_progress) {
        /* called from a callback (e.g. err_cb): UCX may still be using the endpoint */
        p->next = u->deferred;
        u->deferred = p;
        return;
    }
    ucx_close_ep(u, p);
}

/* ---- send ---- */

static void ucx_send_done(void *request, ucs_status_t status, void *user_data)
{
    ucx_rec_t *r = user_data;
    net_ucx_t *u = r->u;
    ucp_request_free(request);
    u->outstanding--;
    u->events++;
    if (status == UCS_OK) {
        u->st.tx_msgs++;
        u->st.tx_bytes += r->len;
    } else if (status != u->last_err_status || r->peer_id != u->last_err_peer) {
        /* a dead peer fails a whole window of sends: log the first one */
        afd_error("ucx: send of %zu bytes to peer %u failed: %s", r->len, r->peer_id,
                  ucs_status_string(status));
        u->last_err_status = status;
        u->last_err_peer = r->peer_id;
    }
    net_ucx_send_cb cb = r->cb;
    void *arg = r->arg;
    rec_put(u, r);
    if (cb) cb(arg, xfer_status(status));
}

afd_status_t net_ucx_send(net_ucx_peer_t *p, const void *hdr, size_t hdr_len, const void *data,
                          size_t len, void *memh, unsigned flags, net_ucx_send_cb cb, void *arg)
{
    if (!p || (hdr_len && !hdr) || (len && !data)) {
        afd_error("ucx: send: bad arguments");
        return AFD_ERR_INVALID;
    }
    net_ucx_t *u = p->u;
    if (hdr_len > u->opts.max_hdr) {
        afd_error("ucx: send to peer %u: %zu-byte header exceeds max_hdr %zu", p->id, hdr_len,
                  u->opts.max_hdr);
        return AFD_ERR_RANGE;
    }
    if (u->destroying) return AFD_ERR_SHUTDOWN;
    if (p->failed) return AFD_ERR_PEER; /* logged when the failure was seen */
    int device = (flags & NET_UCX_DEVICE) && len;
    if (device && !net_ucx_device_ok(u)) {
        afd_error("ucx: send to peer %u: a device payload, but this UCX does not move CUDA "
                  "memory",
                  p->id);
        return AFD_ERR_UNSUPPORTED;
    }

    ucx_region_t *reg = len ? memh : NULL; /* nothing to register for an empty payload */
    if (reg) {
        if (!region_covers(reg, data, len)) {
            afd_error("ucx: send to peer %u: the memory handle does not cover the payload", p->id);
            return AFD_ERR_INVALID;
        }
    } else if (len && u->regions) {
        reg = region_find(u, data, len);
    }

    ucx_rec_t *r = rec_get(u);
    if (!r) {
        afd_error("ucx: out of memory for a send record");
        return AFD_ERR_NOMEM;
    }
    unsigned char *h = rec_hdr(u, r);
    if (hdr_len) memcpy(h, hdr, hdr_len);
    r->hdr_len = hdr_len;
    r->len = len;
    r->cb = cb;
    r->arg = arg;
    r->peer_id = p->id;

    ucp_request_param_t sp_param = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = ucx_send_done,
        .user_data = r,
    };
    if (reg) {
        sp_param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        sp_param.memh = reg->memh;
    }
    if (device) {
        sp_param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_FLAGS;
        sp_param.memory_type = u->opts.device_host ? UCS_MEMORY_TYPE_HOST : UCS_MEMORY_TYPE_CUDA;
        sp_param.flags = UCP_AM_SEND_FLAG_RNDV;
    }
    u->outstanding++;
    ucs_status_ptr_t sp = ucp_am_send_nbx(p->ep, NET_UCX_AM_ID, h, hdr_len, data, len, &sp_param);
    if (sp == NULL) {
        u->outstanding--;
        rec_put(u, r);
        u->st.tx_msgs++;
        u->st.tx_bytes += len;
        if (cb) cb(arg, AFD_OK);
        return AFD_OK;
    }
    if (UCS_PTR_IS_ERR(sp)) {
        afd_error("ucx: send of %zu bytes to peer %u failed: %s", len, p->id,
                  ucs_status_string(UCS_PTR_STATUS(sp)));
        u->outstanding--;
        rec_put(u, r);
        return AFD_ERR_PEER;
    }
    return AFD_OK;
}

int net_ucx_cuda_memory(const net_ucx_t *u)
{
    return u->cuda_memory;
}

int net_ucx_device_ok(const net_ucx_t *u)
{
    return u->cuda_memory || u->opts.device_host;
}

void net_ucx_get_stats(net_ucx_t *u, net_ucx_stats_t *st)
{
    *st = u->st;
}

afd_status_t net_ucx_buf_reserve(net_ucx_t *u, net_ucx_buf_t *b, size_t need)
{
    if (need <= b->cap) return AFD_OK;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap += cap / 2 + 4096; /* grow by half: few re-registrations */
    cap = (cap + 63) & ~(size_t)63;
    uint8_t *p =
        u->opts.host_alloc ? u->opts.host_alloc(u->opts.host_arg, cap) : aligned_alloc(64, cap);
    if (!p) return AFD_ERR_NOMEM;
    net_ucx_buf_free(u, b);
    b->p = p;
    b->cap = cap;
    b->release = u->opts.host_alloc ? u->opts.host_free : NULL;
    b->release_arg = u->opts.host_arg;
    if (net_ucx_mem_map(u, p, cap, &b->memh) != AFD_OK) b->memh = NULL;
    return AFD_OK;
}

void net_ucx_buf_forget(net_ucx_buf_t *b)
{
    if (b->p) {
        if (b->release)
            b->release(b->release_arg, b->p);
        else
            free(b->p);
    }
    b->p = NULL;
    b->cap = 0;
    b->memh = NULL;
}

void net_ucx_buf_free(net_ucx_t *u, net_ucx_buf_t *b)
{
    if (b->memh) net_ucx_mem_unmap(u, b->memh);
    b->memh = NULL;
    net_ucx_buf_forget(b);
}
