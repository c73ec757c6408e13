/*
 * net_ucx: the UCX data plane. One ucp context and worker per daemon; endpoints
 * made from worker addresses exchanged through the coordinator; active messages
 * (ucp_am_send_nbx) carrying a small header (the wire header) and a payload. On
 * arrival the application chooses the destination buffer (alloc callback): eager
 * payloads are copied there, rendezvous payloads land there zero-copy through
 * ucp_am_recv_data_nbx. Progress is driven by the caller: net_ucx_progress() in a
 * busy loop while micro-batches are in flight, or net_ucx_wait() / the event fd
 * (ucp_worker_get_efd + ucp_worker_arm) when idle.
 * UCX_TLS, UCX_NET_DEVICES and the other UCX_* variables are honoured as usual.
 */
#ifndef NET_UCX_H
#define NET_UCX_H

#include "afd_status.h"

#include <stddef.h>
#include <stdint.h>

typedef struct net_ucx net_ucx_t;
typedef struct net_ucx_peer net_ucx_peer_t;

/*
 * Called from inside progress when a message arrives: returns where its `len` payload
 * bytes must go (NULL drops the message: the transport logs it and discards the data).
 * hdr is valid only during the call. rndv is 1 when the payload is still at the sender
 * (rendezvous: it is pulled straight into the buffer), 0 when it arrived with the header
 * (eager: it is copied). Setting *device to 1 says the buffer is device memory (see
 * net_ucx_device_ok); only a rendezvous payload may go there unless the options'
 * device_host says device memory is host memory.
 */
typedef void *(*net_ucx_alloc_cb)(void *arg, const void *hdr, size_t hdr_len, size_t len, int rndv,
                                  int *device);
/* Called from inside progress once the payload is in `data` (the alloc result); status is
 * AFD_OK or the transfer error (then data holds garbage). hdr is a copy valid during the
 * call. */
typedef void (*net_ucx_recv_cb)(void *arg, const void *hdr, size_t hdr_len, void *data, size_t len,
                                afd_status_t status);
/* Called from inside progress when an endpoint fails (peer died, connection reset). */
typedef void (*net_ucx_peer_err_cb)(void *arg, uint32_t peer_id, afd_status_t status);
/* Called when a send completes; the payload buffer may be reused from then on. */
typedef void (*net_ucx_send_cb)(void *arg, afd_status_t status);

typedef struct net_ucx_opts {
    int err_mode_peer;  /* 1: UCP_ERR_HANDLING_MODE_PEER (peer failure detection) */
    size_t max_hdr;     /* largest header accepted (bytes), e.g. 256 */
    size_t max_payload; /* largest payload accepted; larger messages are dropped */
    net_ucx_alloc_cb alloc_cb;
    net_ucx_recv_cb recv_cb;
    net_ucx_peer_err_cb err_cb;
    void *arg;
    /* where net_ucx_buf_reserve takes its memory (NULL: aligned_alloc/free), e.g. pinned
     * host memory a device backend copies into and out of directly */
    void *(*host_alloc)(void *host_arg, size_t bytes);
    void (*host_free)(void *host_arg, void *p);
    void *host_arg;
    /* device buffers (NET_UCX_DEVICE sends, alloc_cb's *device) are host memory after all
     * (a backend that only takes the device code paths, or the CPU emulator of CUDA):
     * they are moved as host memory, and by any UCX */
    int device_host;
} net_ucx_opts_t;

afd_status_t net_ucx_create(const net_ucx_opts_t *opts, net_ucx_t **out);
/* Flushes and closes every endpoint, then releases the worker and context. */
void net_ucx_destroy(net_ucx_t *u);

/* This worker's address (valid until destroy). */
afd_status_t net_ucx_address(net_ucx_t *u, const void **addr, size_t *len);
/* The event fd to poll for readability when idle (call net_ucx_arm first). */
int net_ucx_fd(net_ucx_t *u);
/*
 * Arms the event fd: returns AFD_OK when it is safe to sleep on the fd, AFD_ERR_BUSY when
 * events are pending and the caller must progress again first.
 */
afd_status_t net_ucx_arm(net_ucx_t *u);
/* Progresses communication once; returns the number of events processed. */
unsigned net_ucx_progress(net_ucx_t *u);
/* Progresses until something happened or timeout_ms passed (spins busy_us first, then
 * sleeps on the event fd). Returns the number of events processed. */
unsigned net_ucx_wait(net_ucx_t *u, int busy_us, int timeout_ms);

/* Registers memory for zero-copy transfers (optional; unregistered memory works too). */
afd_status_t net_ucx_mem_map(net_ucx_t *u, void *p, size_t len, void **memh);
void net_ucx_mem_unmap(net_ucx_t *u, void *memh);

/* A message buffer registered once with net_ucx_mem_map, re-registered only when it grows. */
typedef struct net_ucx_buf {
    uint8_t *p;
    size_t cap;
    void *memh; /* NULL when registration failed: transfers still work, unregistered */
    void (*release)(void *arg, void *p); /* how p is freed (the opts' host_free, or NULL) */
    void *release_arg;
} net_ucx_buf_t;

/* Makes b hold at least need bytes; must not be called while a transfer uses b. */
afd_status_t net_ucx_buf_reserve(net_ucx_t *u, net_ucx_buf_t *b, size_t need);
void net_ucx_buf_free(net_ucx_t *u, net_ucx_buf_t *b);
/* Frees b's memory once its worker is gone (the registration went with it). */
void net_ucx_buf_forget(net_ucx_buf_t *b);

/* Creates an endpoint to a worker address; peer_id is the caller's name for it (passed
 * to err_cb). */
afd_status_t net_ucx_connect(net_ucx_t *u, const void *addr, size_t len, uint32_t peer_id,
                             net_ucx_peer_t **out);
/* Closes an endpoint (forcefully when the peer failed). */
void net_ucx_disconnect(net_ucx_peer_t *p);

/* net_ucx_send flags */
#define NET_UCX_DEVICE                                                                             \
    1u /* the payload is device memory: always rendezvous, so that the                             \
        * receiver can pull it straight into its own device buffer */

/*
 * Sends hdr (copied before return) and the payload (must stay valid until cb) to a peer;
 * memh is the payload's registration or NULL. cb may run before this returns (immediate
 * completion). Large payloads use rendezvous. A NET_UCX_DEVICE send needs
 * net_ucx_device_ok (else AFD_ERR_UNSUPPORTED).
 */
afd_status_t net_ucx_send(net_ucx_peer_t *p, const void *hdr, size_t hdr_len, const void *data,
                          size_t len, void *memh, unsigned flags, net_ucx_send_cb cb, void *arg);

/* Counters, for metrics and benchmarks. */
typedef struct net_ucx_stats {
    uint64_t tx_msgs, tx_bytes, rx_msgs, rx_bytes, rx_dropped, rx_eager, rx_rndv;
} net_ucx_stats_t;
void net_ucx_get_stats(net_ucx_t *u, net_ucx_stats_t *st);

/* 1 when the UCX in use can move CUDA device memory (its context lists the CUDA memory
 * type: a build with cuda_copy, cuda_ipc or gdr_copy), else 0. */
int net_ucx_cuda_memory(const net_ucx_t *u);
/* 1 when device buffers can be sent and received: the UCX moves CUDA memory, or the
 * options' device_host says device memory is host memory. */
int net_ucx_device_ok(const net_ucx_t *u);

#endif
