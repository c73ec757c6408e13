/* net_frame: length-prefixed protobuf frames for the control plane. */
#define _GNU_SOURCE
#include "net_frame.h"
#include "afd_log.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

void net_frame_reader_init(net_frame_reader_t *r)
{
    memset(r, 0, sizeof(*r));
}

void net_frame_reader_fini(net_frame_reader_t *r)
{
    free(r->buf);
    memset(r, 0, sizeof(*r));
}

afd_status_t net_frame_reader_feed(net_frame_reader_t *r, const void *data, size_t n)
{
    if (r->len + n > NET_FRAME_MAX + 4 + 65536 && r->len >= 4) {
        /* more buffered than one maximal frame: the peer ignores framing */
        return AFD_ERR_RANGE;
    }
    if (r->len + n > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n)
            cap *= 2;
        uint8_t *nb = realloc(r->buf, cap);
        if (!nb) return AFD_ERR_NOMEM;
        r->buf = nb;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, data, n);
    r->len += n;
    return AFD_OK;
}

/* protobuf-c accepts field number 0 (never valid) when its tag takes more than one byte,
 * keeps it as an unknown field and writes it back as a one-byte tag that it refuses: a
 * frame holding one, at any depth, is malformed. */
static int frame_tags_ok(const ProtobufCMessage *m, int depth)
{
    if (depth > 16) return 0;
    for (unsigned i = 0; i < m->n_unknown_fields; i++)
        if (m->unknown_fields[i].tag == 0) return 0;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *fd = &d->fields[i];
        if (fd->type != PROTOBUF_C_TYPE_MESSAGE) continue;
        const char *field = (const char *)m + fd->offset;
        if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(const void *)((const char *)m + fd->quantifier_offset);
            ProtobufCMessage *const *v = *(ProtobufCMessage *const *const *)(const void *)field;
            for (size_t k = 0; k < n; k++)
                if (!frame_tags_ok(v[k], depth + 1)) return 0;
            continue;
        }
        if ((fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)(const void *)((const char *)m + fd->quantifier_offset) != fd->id)
            continue;
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)(const void *)field;
        if (sub && !frame_tags_ok(sub, depth + 1)) return 0;
    }
    return 1;
}

afd_status_t net_frame_reader_next(net_frame_reader_t *r, Afd__Frame **out)
{
    if (r->len < 4) return AFD_INPROGRESS;
    uint32_t n = (uint32_t)r->buf[0] | (uint32_t)r->buf[1] << 8 | (uint32_t)r->buf[2] << 16 |
                 (uint32_t)r->buf[3] << 24;
    if (n > NET_FRAME_MAX) return AFD_ERR_RANGE;
    if (r->len < 4 + (size_t)n) return AFD_INPROGRESS;
    Afd__Frame *f = afd__frame__unpack(NULL, n, r->buf + 4);
    memmove(r->buf, r->buf + 4 + n, r->len - 4 - n);
    r->len -= 4 + n;
    if (!f) return AFD_ERR_FORMAT;
    if (f->version != NET_FRAME_VERSION || f->body_case == AFD__FRAME__BODY__NOT_SET ||
        !frame_tags_ok(&f->base, 0)) {
        afd__frame__free_unpacked(f, NULL);
        return AFD_ERR_FORMAT;
    }
    *out = f;
    return AFD_OK;
}

void net_frame_free(Afd__Frame *f)
{
    if (f) afd__frame__free_unpacked(f, NULL);
}

afd_status_t net_frame_encode(Afd__Frame *f, uint8_t **buf, size_t *len)
{
    f->version = NET_FRAME_VERSION;
    size_t n = afd__frame__get_packed_size(f);
    if (n > NET_FRAME_MAX) return AFD_ERR_RANGE;
    uint8_t *b = malloc(4 + n);
    if (!b) return AFD_ERR_NOMEM;
    b[0] = (uint8_t)n;
    b[1] = (uint8_t)(n >> 8);
    b[2] = (uint8_t)(n >> 16);
    b[3] = (uint8_t)(n >> 24);
    afd__frame__pack(f, b + 4);
    *buf = b;
    *len = 4 + n;
    return AFD_OK;
}

afd_status_t net_frame_send_fd(int fd, Afd__Frame *f)
{
    uint8_t *b;
    size_t n, off = 0;
    afd_status_t st = net_frame_encode(f, &b, &n);
    if (st) return st;
    while (off < n) {
        ssize_t w = send(fd, b + off, n - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 5000) <= 0) {
                free(b);
                return AFD_ERR_TIMEOUT;
            }
            continue;
        }
        if (w <= 0) {
            free(b);
            return AFD_ERR_PEER;
        }
        off += (size_t)w;
    }
    free(b);
    return AFD_OK;
}

afd_status_t net_frame_pump_fd(int fd, net_frame_reader_t *r)
{
    uint8_t tmp[65536];
    for (;;) {
        ssize_t n = recv(fd, tmp, sizeof(tmp), MSG_DONTWAIT);
        if (n > 0) {
            afd_status_t st = net_frame_reader_feed(r, tmp, (size_t)n);
            if (st) return st;
            continue;
        }
        if (n == 0) return AFD_ERR_PEER;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return AFD_OK;
        return AFD_ERR_PEER;
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

afd_status_t net_frame_recv_fd(int fd, net_frame_reader_t *r, int timeout_ms, Afd__Frame **out)
{
    int64_t end = now_ms() + timeout_ms;
    for (;;) {
        afd_status_t st = net_frame_reader_next(r, out);
        if (st != AFD_INPROGRESS) return st;
        int64_t left = end - now_ms();
        if (left <= 0) return AFD_ERR_TIMEOUT;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int pr = poll(&p, 1, (int)left);
        if (pr < 0 && errno != EINTR) return AFD_ERR_IO;
        if (pr > 0 && (st = net_frame_pump_fd(fd, r))) {
            /* the peer closed after its last frame: hand that frame out first */
            return net_frame_reader_next(r, out) == AFD_OK ? AFD_OK : st;
        }
    }
}

afd_status_t net_parse_hostport(const char *s, char *host, size_t hostlen, int *port)
{
    const char *colon = strrchr(s, ':');
    const char *ps = colon ? colon + 1 : s;
    size_t hl = colon ? (size_t)(colon - s) : 0;
    char *end;
    long p = strtol(ps, &end, 10);
    if (*ps == 0 || *end || p < 1 || p > 65535 || hl >= hostlen) return AFD_ERR_INVALID;
    if (hl == 0)
        snprintf(host, hostlen, "127.0.0.1");
    else {
        memcpy(host, s, hl);
        host[hl] = 0;
    }
    *port = (int)p;
    return AFD_OK;
}

afd_status_t net_tcp_connect(const char *hostport, int timeout_ms, int *fd_out)
{
    char host[256], port_s[16];
    int port;
    if (net_parse_hostport(hostport, host, sizeof(host), &port)) {
        afd_error("'%s' is not host:port", hostport);
        return AFD_ERR_INVALID;
    }
    snprintf(port_s, sizeof(port_s), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int gai = getaddrinfo(host, port_s, &hints, &ai);
    if (gai) {
        afd_error("%s: %s", hostport, gai_strerror(gai));
        return AFD_ERR_NOT_FOUND;
    }
    int fd = -1;
    afd_status_t st = AFD_ERR_PEER;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc < 0 && errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int err = 0;
            socklen_t el = sizeof(err);
            if (poll(&p, 1, timeout_ms) == 1 &&
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0)
                rc = 0;
        }
        if (rc == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            st = AFD_OK;
            break;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (st) return st;
    *fd_out = fd;
    return AFD_OK;
}
