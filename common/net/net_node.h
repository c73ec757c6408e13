/*
 * net_node: what attention and FFN nodes share on the node side of the control
 * plane: joining the coordinator (Hello / Welcome), reading its frames without
 * blocking, heartbeats, and one wait that sleeps on both the control socket and
 * the UCX event fd (after an optional short busy-poll).
 */
#ifndef NET_NODE_H
#define NET_NODE_H

#include "net_frame.h"
#include "net_ucx.h"

#include <signal.h>

typedef struct net_node {
    int fd;
    net_frame_reader_t rd;
    uint32_t node_id;
    char coord[256];
} net_node_t;

/* Connects to the coordinator, sends hello and waits for the welcome (free it with
 * afd__welcome__free_unpacked(w, NULL)); a refusal is an
 * error (AFD_ERR_AUTH for a bad token) with the coordinator's reason logged. */
afd_status_t net_node_join(net_node_t *n, const char *coord, Afd__Hello *hello, int timeout_ms,
                           Afd__Welcome **welcome);
/* net_node_join, tried again (backing off from 200 ms to 5 s) while the coordinator cannot
 * be reached or drops the connection, for at most wait_s seconds or until *stop is set; a
 * refusal for a bad token ends it at once. */
afd_status_t net_node_join_wait(net_node_t *n, const char *coord, Afd__Hello *hello, long wait_s,
                                const volatile sig_atomic_t *stop, Afd__Welcome **welcome);
void net_node_close(net_node_t *n);
afd_status_t net_node_send(net_node_t *n, Afd__Frame *f);
/* Next frame already received (AFD_INPROGRESS when none; AFD_ERR_PEER when the
 * coordinator is gone or spoke garbage). */
afd_status_t net_node_next(net_node_t *n, Afd__Frame **out);
/*
 * Progresses ucx (when not NULL) and returns as soon as it did something, the control
 * socket became readable, or timeout_ms passed; spins for busy_us before sleeping.
 */
void net_node_wait(net_node_t *n, net_ucx_t *ucx, int busy_us, int timeout_ms);

uint64_t net_now_us(void);

/* Pins the calling process to one CPU (cpu < 0: no-op); a failure is logged, not fatal. */
void net_node_pin_cpu(long cpu);
/* Sends Ready with this node's UCX worker address. */
afd_status_t net_node_send_ready(net_node_t *n, net_ucx_t *ucx);

/*
 * The A2F/F2A data plane of a node on a device backend: staged through pinned host
 * buffers, or straight from and into device memory (net_ucx NET_UCX_DEVICE).
 * net_plane_device_host: the net_ucx_opts device_host a node sets, 1 when its device
 * memory is host memory (a backend taking the device code paths on the host, or
 * AFD_UCX_DEVICE_HOST=1 for the CPU emulator of CUDA).
 * net_plane_choose: for --data-plane MODE (auto, host or device) on a backend with
 * device memory (device_backend) that is CUDA memory (cuda_backend): 1 device, 0 host,
 * -1 (logged) when device was asked for and cannot be had. auto takes device memory
 * when the backend's is CUDA memory and the UCX in use moves it.
 */
int net_plane_device_host(int device_backend, int cuda_backend);
int net_plane_choose(const char *mode, int device_backend, int cuda_backend, const net_ucx_t *u);
/* 1 when MODE is one of auto, host, device */
int net_plane_mode_ok(const char *mode);
/* Sends a heartbeat carrying the node's counters. */
afd_status_t net_node_send_heartbeat(net_node_t *n, Afd__NodeStats *stats);
/* Sends Connected for an epoch. */
afd_status_t net_node_send_connected(net_node_t *n, uint32_t epoch);

/* Per-peer one-way latency: counts per power-of-two microsecond bucket. */
#define NET_LAT_BUCKETS 24
typedef struct net_lat_hist {
    uint32_t peer_id;
    uint64_t buckets[NET_LAT_BUCKETS];
    uint64_t count, sum_us;
    uint64_t answer_count, answer_sum_us, answer_max_us; /* see LatencyHist in afd.proto */
} net_lat_hist_t;

/* The data-plane peers of one role, by index (attention index or FFN share). */
#define NET_MAX_PEERS 64
typedef struct net_peer_set {
    int n;    /* indexes 0..n-1; a node that left leaves a hole (ep NULL) */
    int live; /* peers connected */
    uint32_t ids[NET_MAX_PEERS];
    net_ucx_peer_t *ep[NET_MAX_PEERS];
    net_lat_hist_t lat[NET_MAX_PEERS];
} net_peer_set_t;

/* Closes the old endpoints and connects to every peer of `role` in the table. */
afd_status_t net_peer_set_apply(net_peer_set_t *ps, net_ucx_t *ucx, const Afd__PeerTable *pt,
                                Afd__Role role);
void net_peer_set_close(net_peer_set_t *ps);
/* The index of a node id, or -1. */
int net_peer_set_index(const net_peer_set_t *ps, uint32_t id);

/* Records how long a peer took to answer (attention nodes: A2F out to F2A back). */
void net_lat_answer(net_lat_hist_t *h, uint64_t us);
/* Records a message sent at send_ns (sender's CLOCK_REALTIME) and received now. */
void net_lat_record(net_lat_hist_t *h, uint64_t send_ns);
/* Fills a heartbeat's latency entries (pb and pp hold n entries) from n histograms. */
void net_lat_to_proto(net_lat_hist_t *h, int n, Afd__LatencyHist *pb, Afd__LatencyHist **pp);

#endif
