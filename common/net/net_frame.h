/*
 * net_frame: control-plane framing. A frame is [u32 little-endian length][an
 * afd.Frame protobuf of that length], length <= NET_FRAME_MAX. The reader takes
 * bytes as they come and yields whole, decoded, version-checked frames; anything
 * malformed is a protocol error for that connection only.
 */
#ifndef NET_FRAME_H
#define NET_FRAME_H

#include "afd.pb-c.h"
#include "afd_status.h"

#include <stddef.h>
#include <stdint.h>

#define NET_FRAME_MAX     (16u << 20)
#define NET_FRAME_VERSION 1

typedef struct net_frame_reader {
    uint8_t *buf;
    size_t len, cap;
} net_frame_reader_t;

void net_frame_reader_init(net_frame_reader_t *r);
void net_frame_reader_fini(net_frame_reader_t *r);
/* Appends received bytes (AFD_ERR_RANGE if a frame under way would exceed the maximum). */
afd_status_t net_frame_reader_feed(net_frame_reader_t *r, const void *data, size_t n);
/*
 * Takes the next whole frame: AFD_OK with *out (free with net_frame_free),
 * AFD_INPROGRESS when more bytes are needed, AFD_ERR_FORMAT / AFD_ERR_RANGE when the
 * stream is malformed (the connection should be closed).
 */
afd_status_t net_frame_reader_next(net_frame_reader_t *r, Afd__Frame **out);
void net_frame_free(Afd__Frame *f);

/* Serialises a frame (version is set here) into a malloc'd [length][bytes] buffer. */
afd_status_t net_frame_encode(Afd__Frame *f, uint8_t **buf, size_t *len);

/* Blocking helpers for a socket fd (nodes): send a whole frame; read until one frame is
 * available or timeout_ms passes (AFD_ERR_TIMEOUT), AFD_ERR_PEER on EOF. */
afd_status_t net_frame_send_fd(int fd, Afd__Frame *f);
afd_status_t net_frame_recv_fd(int fd, net_frame_reader_t *r, int timeout_ms, Afd__Frame **out);
/* Reads whatever is available without blocking (AFD_ERR_PEER on EOF or error). */
afd_status_t net_frame_pump_fd(int fd, net_frame_reader_t *r);

/* Connects a TCP socket to "host:port" (blocking, with a timeout). */
afd_status_t net_tcp_connect(const char *hostport, int timeout_ms, int *fd_out);
/* Splits "host:port"; host defaults to 127.0.0.1 for ":port" or "port". */
afd_status_t net_parse_hostport(const char *s, char *host, size_t hostlen, int *port);

#endif
