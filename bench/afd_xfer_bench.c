/*
 * afd_xfer_bench: one-way bandwidth of net_ucx_send between two processes, the way
 * ucx_perftest -t ucp_am_bw measures UCP active messages, so that the two can be put
 * side by side (bench/xfer_bench.sh does). The process forks before touching UCX;
 * the parent sends, the child receives; worker addresses go over a socketpair. The
 * transports are whatever the environment selects (UCX_TLS, UCX_NET_DEVICES, ...).
 *
 * For each size: --warmup messages, then N messages (N = --bytes / size, at least
 * --min-iters) with at most --window sends outstanding, all from one registered send
 * buffer (memh passed); the receiver's alloc callback hands out --rx-slots registered
 * slots in turn and acknowledges the last message of a phase with a header-only
 * message. Time runs from the first measured send to that acknowledgement. Both sides
 * busy-poll net_ucx_progress. MB/s is 2^20 bytes per second, like ucx_perftest.
 *
 *   afd_xfer_bench [--sizes 64K,256K,1M,4M] [--window 32] [--bytes 512M]
 *                  [--min-iters 200] [--warmup 50] [--rx-slots 1] [--err-peer]
 *                  [--cpus SENDER,RECEIVER]
 * --cpus pins the two processes (like ucx_perftest -c), which steadies the numbers on
 * a small machine.
 *
 * Output: a comment line, then one line per size: "size iters seconds MB/s".
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "net_ucx.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BENCH_MAGIC 0x42584641u
#define MAX_SIZES   32

enum { PH_WARMUP = 0, PH_MEASURE = 1, PH_QUIT = 2, PH_ACK = 3 };

typedef struct bhdr {
    uint32_t magic, phase;
    uint64_t size, count; /* messages of this (phase, size) that will be sent */
} bhdr_t;

typedef struct bench {
    net_ucx_t *u;
    net_ucx_peer_t *peer;
    unsigned char *buf; /* send buffer or receive slots */
    size_t buf_len, slot_len;
    void *memh;
    long rx_slots, next_slot;
    /* receiver */
    uint64_t rx_count;
    uint32_t rx_phase;
    uint64_t rx_size;
    int quit;
    int ack_pending;
    bhdr_t ack;
    /* sender */
    uint64_t inflight;
    int acked;
    int failed;
} bench_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int parse_size(const char *s, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s) return -1;
    if (*end == 'K' || *end == 'k')
        v <<= 10, end++;
    else if (*end == 'M' || *end == 'm')
        v <<= 20, end++;
    else if (*end == 'G' || *end == 'g')
        v <<= 30, end++;
    if (*end) return -1;
    *out = (size_t)v;
    return 0;
}

static int xfer(int fd, void *p, size_t n, int wr)
{
    char *c = p;
    while (n) {
        ssize_t k = wr ? write(fd, c, n) : read(fd, c, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

/* ---- receiver ---- */

static void *rx_alloc(void *arg, const void *hdr, size_t hdr_len, size_t len, int rndv, int *device)
{
    (void)hdr;
    (void)rndv;
    (void)device;
    bench_t *b = arg;
    if (hdr_len != sizeof(bhdr_t) || len > b->slot_len) return NULL;
    if (len == 0) return b->buf;
    void *p = b->buf + (size_t)b->next_slot * b->slot_len;
    b->next_slot = (b->next_slot + 1) % b->rx_slots;
    return p;
}

static void rx_recv(void *arg, const void *hdr, size_t hdr_len, void *data, size_t len,
                    afd_status_t st)
{
    (void)data;
    (void)len;
    (void)hdr_len;
    bench_t *b = arg;
    bhdr_t h;
    memcpy(&h, hdr, sizeof(h));
    if (st != AFD_OK || h.magic != BENCH_MAGIC) {
        b->failed = 1;
        return;
    }
    if (h.phase == PH_QUIT) {
        b->quit = 1;
        return;
    }
    if (h.phase != b->rx_phase || h.size != b->rx_size) {
        b->rx_phase = h.phase;
        b->rx_size = h.size;
        b->rx_count = 0;
    }
    if (++b->rx_count == h.count) {
        /* sent from the main loop: the receive callback runs inside progress */
        b->ack = h;
        b->ack.phase = PH_ACK;
        b->ack_pending = 1;
    }
}

static int run_receiver(bench_t *b)
{
    while (!b->quit && !b->failed) {
        net_ucx_progress(b->u);
        if (b->ack_pending) {
            b->ack_pending = 0;
            if (net_ucx_send(b->peer, &b->ack, sizeof(b->ack), NULL, 0, NULL, 0, NULL, NULL) !=
                AFD_OK)
                return 1;
        }
    }
    return b->failed;
}

/* ---- sender ---- */

static void *tx_alloc(void *arg, const void *hdr, size_t hdr_len, size_t len, int rndv, int *device)
{
    (void)hdr;
    (void)hdr_len;
    (void)len;
    (void)rndv;
    (void)device;
    return arg; /* only acks come this way: no payload, any non-NULL pointer accepts */
}

static void tx_recv(void *arg, const void *hdr, size_t hdr_len, void *data, size_t len,
                    afd_status_t st)
{
    (void)hdr_len;
    (void)len;
    (void)data;
    bench_t *b = arg;
    bhdr_t h;
    memcpy(&h, hdr, sizeof(h));
    if (st == AFD_OK && h.magic == BENCH_MAGIC && h.phase == PH_ACK)
        b->acked = 1;
    else
        b->failed = 1;
}

static void tx_done(void *arg, afd_status_t st)
{
    bench_t *b = arg;
    b->inflight--;
    if (st != AFD_OK) b->failed = 1;
}

/* Sends count messages of size bytes, window outstanding; waits for the ack. */
static int send_phase(bench_t *b, uint32_t phase, size_t size, uint64_t count, long window)
{
    bhdr_t h = {.magic = BENCH_MAGIC, .phase = phase, .size = size, .count = count};
    b->acked = 0;
    for (uint64_t i = 0; i < count && !b->failed;) {
        if (b->inflight < (uint64_t)window) {
            b->inflight++;
            if (net_ucx_send(b->peer, &h, sizeof(h), b->buf, size, b->memh, 0, tx_done, b) !=
                AFD_OK)
                return -1;
            i++;
        } else {
            net_ucx_progress(b->u);
        }
    }
    while (!b->failed && (!b->acked || b->inflight))
        net_ucx_progress(b->u);
    return b->failed ? -1 : 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: afd_xfer_bench [--sizes 64K,256K,1M,4M] [--window 32] "
                    "[--bytes 512M] [--min-iters 200] [--warmup 50] [--rx-slots 1] "
                    "[--err-peer] [--cpus SENDER,RECEIVER]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    afd_log_init(argv[0]);
    size_t sizes[MAX_SIZES];
    int nsizes = 0;
    const char *size_list = "64K,256K,1M,4M";
    long window = 32, min_iters = 200, warmup = 50, rx_slots = 1;
    size_t bytes = (size_t)512 << 20;
    int err_peer = 0, cpu_tx = -1, cpu_rx = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--err-peer")) {
            err_peer = 1;
            continue;
        }
        if (!v) usage();
        i++;
        if (!strcmp(a, "--sizes"))
            size_list = v;
        else if (!strcmp(a, "--window"))
            window = atol(v);
        else if (!strcmp(a, "--min-iters"))
            min_iters = atol(v);
        else if (!strcmp(a, "--warmup"))
            warmup = atol(v);
        else if (!strcmp(a, "--rx-slots"))
            rx_slots = atol(v);
        else if (!strcmp(a, "--cpus")) {
            if (sscanf(v, "%d,%d", &cpu_tx, &cpu_rx) != 2 || cpu_tx < 0 || cpu_rx < 0) usage();
        } else if (!strcmp(a, "--bytes")) {
            if (parse_size(v, &bytes)) usage();
        } else
            usage();
    }
    char *list = strdup(size_list);
    for (char *t = strtok(list, ","); t; t = strtok(NULL, ",")) {
        if (nsizes == MAX_SIZES || parse_size(t, &sizes[nsizes]) || sizes[nsizes] == 0) usage();
        nsizes++;
    }
    free(list);
    if (nsizes == 0 || window < 1 || min_iters < 1 || warmup < 0 || rx_slots < 1) usage();
    size_t max_size = 0;
    for (int i = 0; i < nsizes; i++)
        if (sizes[i] > max_size) max_size = sizes[i];

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) {
        afd_error("socketpair: %m");
        return 1;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        afd_error("fork: %m");
        return 1;
    }
    int rx = pid == 0, sock = rx ? sv[1] : sv[0];
    close(rx ? sv[0] : sv[1]);
    if (cpu_tx >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(rx ? cpu_rx : cpu_tx, &set);
        if (sched_setaffinity(0, sizeof(set), &set)) afd_warn("sched_setaffinity: %m");
    }

    bench_t b = {.rx_slots = rx ? rx_slots : 1, .slot_len = max_size, .rx_phase = UINT32_MAX};
    b.buf_len = b.slot_len * (size_t)b.rx_slots;
    b.buf = aligned_alloc(4096, (b.buf_len + 4095) & ~(size_t)4095);
    if (!b.buf) {
        afd_error("out of memory");
        return 1;
    }
    memset(b.buf, rx ? 0 : 0x5a, b.buf_len);
    net_ucx_opts_t o = {
        .err_mode_peer = err_peer,
        .max_hdr = sizeof(bhdr_t),
        .max_payload = max_size,
        .alloc_cb = rx ? rx_alloc : tx_alloc,
        .recv_cb = rx ? rx_recv : tx_recv,
        .arg = &b,
    };
    const void *addr;
    size_t alen;
    if (net_ucx_create(&o, &b.u) || net_ucx_address(b.u, &addr, &alen) ||
        net_ucx_mem_map(b.u, b.buf, b.buf_len, &b.memh))
        return 1;
    uint32_t l32 = (uint32_t)alen, r32;
    if (xfer(sock, &l32, 4, 1) || xfer(sock, (void *)addr, alen, 1) || xfer(sock, &r32, 4, 0) ||
        r32 == 0 || r32 > 65536) {
        afd_error("address exchange failed");
        return 1;
    }
    void *raddr = malloc(r32);
    if (!raddr || xfer(sock, raddr, r32, 0) ||
        net_ucx_connect(b.u, raddr, r32, rx ? 0 : 1, &b.peer) != AFD_OK)
        return 1;
    free(raddr);

    int rc = 0;
    if (rx) {
        rc = run_receiver(&b);
    } else {
        const char *tls = getenv("UCX_TLS");
        printf("# afd_xfer_bench: UCX_TLS=%s, window %ld, registered buffers, rx slots %ld, "
               "err_mode %s, cpus %d,%d; MB = 2^20 bytes\n",
               tls ? tls : "(default)", window, rx_slots, err_peer ? "peer" : "none", cpu_tx,
               cpu_rx);
        printf("# %10s %8s %9s %10s\n", "size", "iters", "seconds", "MB/s");
        for (int i = 0; i < nsizes && rc == 0; i++) {
            size_t sz = sizes[i];
            uint64_t iters = bytes / sz;
            if (iters < (uint64_t)min_iters) iters = (uint64_t)min_iters;
            if (warmup && send_phase(&b, PH_WARMUP, sz, (uint64_t)warmup, window)) {
                rc = 1;
                break;
            }
            double t0 = now_s();
            if (send_phase(&b, PH_MEASURE, sz, iters, window)) {
                rc = 1;
                break;
            }
            double dt = now_s() - t0;
            printf("  %10zu %8llu %9.4f %10.1f\n", sz, (unsigned long long)iters, dt,
                   (double)sz * (double)iters / dt / 1048576.0);
            fflush(stdout);
        }
        if (rc) afd_error("transfer failed");
        bhdr_t q = {.magic = BENCH_MAGIC, .phase = PH_QUIT};
        b.inflight++;
        if (net_ucx_send(b.peer, &q, sizeof(q), NULL, 0, NULL, 0, tx_done, &b) == AFD_OK) {
            double d = now_s() + 5;
            while (b.inflight && now_s() < d)
                net_ucx_progress(b.u);
        }
    }
    /* both sides close their endpoint before either goes away */
    net_ucx_disconnect(b.peer);
    char c = 'x';
    if (xfer(sock, &c, 1, 1) == 0) {
        struct pollfd pfd = {.fd = sock, .events = POLLIN};
        double d = now_s() + 5;
        while (now_s() < d && poll(&pfd, 1, 0) == 0)
            net_ucx_wait(b.u, 0, 10);
    }
    net_ucx_mem_unmap(b.u, b.memh);
    net_ucx_destroy(b.u);
    free(b.buf);
    close(sock);
    if (rx) _exit(rc);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) {
        afd_error("receiver failed (status %d)", status);
        rc = 1;
    }
    return rc;
}
