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

#endif
