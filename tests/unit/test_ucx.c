/*
 * test_ucx: common/net/net_ucx.h, on real UCX workers.
 *   - two workers in one process: messages of 0 B .. 16 MiB both ways (eager and
 *     rendezvous), content and header checked, stats; a header above the sender's
 *     max_hdr is refused with AFD_ERR_RANGE; a memh that does not cover the payload
 *     is refused; device payloads (NET_UCX_DEVICE) always go by rendezvous into the
 *     receiver's device buffers, and are refused where they cannot be moved (and the
 *     nodes' --data-plane choice follows what the UCX moves); destroying a worker
 * while a rendezvous receive is in flight and the sender is not progressing returns in bounded time
 * and still ends the receive with one recv_cb;
 *   - a fork()ed peer (addresses exchanged over a socketpair), under the default
 *     transports and under UCX_TLS=tcp UCX_NET_DEVICES=lo:
 *       * sizes 0, 1, 100, 8 KiB, 1 MiB, 16 MiB sent both ways at once, from
 *         registered (memh given or looked up) and unregistered buffers into
 *         registered and malloc'd destinations; every message arrives intact;
 *       * drops: alloc_cb returning NULL (eager and rendezvous), a header longer
 *         than the receiver's max_hdr (alloc_cb never sees it), a payload above
 *         max_payload; the sender's sends all complete, later messages arrive,
 *         the drop counter is exact;
 *       * idle: net_ucx_wait with nothing to do sleeps ~timeout using far less CPU
 *         than wall time (getrusage), and wakes up early when a message arrives;
 *   - a peer that _exit()s mid-transfer with err_mode_peer triggers err_cb with its
 *     peer_id within a bounded time (UCX_TLS=tcp, and the default transports, where
 *     PEER mode leaves shm out unless UCX_MM_ERROR_HANDLING=y); the rendezvous receive
 *     cut short still ends in exactly one recv_cb; sends to it fail; err_cb may
 *     disconnect the peer itself (tcp case).
 * Every wait has a deadline; a child that goes wrong exits non-zero and the parent
 * fails the test. The whole file runs in a few seconds. TEST_FILTER / TEST_SKIP
 * (cmocka patterns, e.g. '*_tcp') select tests.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "net_node.h"
#include "net_ucx.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define T_MAGIC  0x58444641u
#define TF_DROP  1u
#define MAX_MSGS 16
#define DEADLINE 10000 /* ms, for any one wait */
#define KiB      1024u
#define MiB      (1024u * 1024u)

typedef struct thdr {
    uint32_t magic, seq;
    uint64_t len;
    uint32_t flags, pad;
} thdr_t;

typedef struct side {
    net_ucx_t *u;
    net_ucx_peer_t *peer;
    int sock;
    /* receive */
    unsigned char *arena; /* registered destination memory */
    size_t arena_len, arena_used;
    void *arena_memh;
    int n_alloc, n_recv, n_recv_err, n_bad;
    int n_rndv;    /* alloc_cb calls for rendezvous payloads */
    int dev_rndv;  /* alloc_cb: rendezvous payloads go to "device" buffers */
    int dev_eager; /* alloc_cb: eager payloads too */
    uint32_t recv_mask;
    unsigned char dummy;
    /* send */
    int n_sent_ok, n_sent_err;
    unsigned send_flags; /* net_ucx_send flags of t_send */
    /* peer errors */
    int n_peer_err;
    uint32_t err_peer;
    afd_status_t err_status;
    int disconnect_in_err; /* err_cb disconnects the peer itself (from inside progress) */
} side_t;

static const size_t k_sizes[] = {0, 1, 100, 8 * KiB, 1 * MiB, 16 * MiB};
#define N_SIZES ((int)(sizeof(k_sizes) / sizeof(k_sizes[0])))

static pid_t g_child = -1;
static char *g_orig_tls, *g_orig_dev;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Threads that existed when main() started: the test binary links OpenBLAS (the
 * Makefile's LDLIBS), whose worker threads spin for a while after start-up. They are
 * not ours, so they are left out of the CPU time charged to an idle wait. */
static pid_t g_foreign[64];
static int g_nforeign;

static int task_foreign(pid_t tid)
{
    for (int i = 0; i < g_nforeign; i++)
        if (g_foreign[i] == tid) return 1;
    return 0;
}

/* Calls fn(tid, cpu_ms) for every thread of this process but the calling one. */
static void for_each_task(void (*fn)(pid_t tid, double cpu, void *arg), void *arg)
{
    DIR *d = opendir("/proc/self/task");
    if (!d) return;
    struct dirent *e;
    double tick_ms = 1e3 / (double)sysconf(_SC_CLK_TCK);
    while ((e = readdir(d))) {
        pid_t tid = (pid_t)atoi(e->d_name);
        if (tid <= 0 || tid == gettid()) continue;
        char path[300], buf[1024];
        snprintf(path, sizeof(path), "/proc/self/task/%s/stat", e->d_name);
        FILE *fp = fopen(path, "r");
        if (!fp) continue;
        unsigned long ut = 0, st = 0;
        char *p = fgets(buf, sizeof(buf), fp) ? strrchr(buf, ')') : NULL;
        if (p &&
            sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
            fn(tid, (double)(ut + st) * tick_ms, arg);
        fclose(fp);
    }
    closedir(d);
}

static void note_foreign(pid_t tid, double cpu, void *arg)
{
    (void)cpu;
    (void)arg;
    if (g_nforeign < 64) g_foreign[g_nforeign++] = tid;
}

static void add_cpu(pid_t tid, double cpu, void *arg)
{
    if (!task_foreign(tid)) *(double *)arg += cpu;
}

/* CPU time (ms) of this thread and of every thread started since main() (UCX's). */
static double cpu_ms(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    double ms = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
                (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
    for_each_task(add_cpu, &ms);
    return ms;
}

/* Workers created by the parent, destroyed by the teardown when a test fails half-way:
 * a live UCX context must never be inherited by the next test's fork(). */
static net_ucx_t *g_live[4];

static net_ucx_t *track(net_ucx_t *u)
{
    for (int i = 0; i < 4; i++)
        if (!g_live[i]) {
            g_live[i] = u;
            break;
        }
    return u;
}

static void t_destroy(net_ucx_t *u)
{
    for (int i = 0; i < 4; i++)
        if (g_live[i] == u) g_live[i] = NULL;
    net_ucx_destroy(u);
}

static uint8_t pat(size_t i, uint32_t seq)
{
    return (uint8_t)((i * 131u) ^ (i >> 11) ^ (seq * 29u + 7u));
}

static void fill(unsigned char *p, size_t len, uint32_t seq)
{
    for (size_t i = 0; i < len; i++)
        p[i] = pat(i, seq);
}

static int check(const unsigned char *p, size_t len, uint32_t seq)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != pat(i, seq)) return 0;
    return 1;
}

/* Sets the transports for the contexts created next (children inherit them). */
static void use_tls(int tcp)
{
    if (tcp) {
        setenv("UCX_TLS", "tcp", 1);
        setenv("UCX_NET_DEVICES", "lo", 1);
        return;
    }
    if (g_orig_tls)
        setenv("UCX_TLS", g_orig_tls, 1);
    else
        unsetenv("UCX_TLS");
    if (g_orig_dev)
        setenv("UCX_NET_DEVICES", g_orig_dev, 1);
    else
        unsetenv("UCX_NET_DEVICES");
}

/* ---- callbacks ---- */

static void *t_alloc(void *arg, const void *hdr, size_t hdr_len, size_t len, int rndv, int *device)
{
    side_t *s = arg;
    s->n_alloc++;
    s->n_rndv += rndv;
    if (rndv ? s->dev_rndv : s->dev_eager) *device = 1;
    thdr_t h;
    if (hdr_len < sizeof(h)) {
        s->n_bad++;
        return NULL;
    }
    memcpy(&h, hdr, sizeof(h));
    if (h.magic != T_MAGIC || h.len != len || h.seq >= MAX_MSGS) {
        s->n_bad++;
        return NULL;
    }
    if (h.flags & TF_DROP) return NULL;
    if (len == 0) return &s->dummy;
    /* even seqs into the registered arena (memh path), odd ones into malloc'd memory */
    if (h.seq % 2 == 0 && s->arena && s->arena_len - s->arena_used >= len) {
        void *p = s->arena + s->arena_used;
        s->arena_used += (len + 63) & ~(size_t)63;
        return p;
    }
    return malloc(len);
}

static void t_recv(void *arg, const void *hdr, size_t hdr_len, void *data, size_t len,
                   afd_status_t st)
{
    side_t *s = arg;
    thdr_t h;
    int in_arena = s->arena && (unsigned char *)data >= s->arena &&
                   (unsigned char *)data < s->arena + s->arena_len;
    if (st != AFD_OK) {
        s->n_recv_err++;
    } else if (hdr_len < sizeof(h)) {
        s->n_bad++;
    } else {
        memcpy(&h, hdr, sizeof(h));
        const unsigned char *extra = (const unsigned char *)hdr + sizeof(h);
        int ok = h.magic == T_MAGIC && h.len == len && h.seq < MAX_MSGS &&
                 !(s->recv_mask & (1u << h.seq)) && check(data, len, h.seq);
        for (size_t j = 0; ok && j < hdr_len - sizeof(h); j++)
            ok = extra[j] == (uint8_t)(j * 7 + h.seq);
        if (ok) {
            s->recv_mask |= 1u << h.seq;
            s->n_recv++;
        } else {
            s->n_bad++;
        }
    }
    if (len && !in_arena && data != &s->dummy) free(data);
}

static void t_err(void *arg, uint32_t peer_id, afd_status_t st)
{
    side_t *s = arg;
    s->n_peer_err++;
    s->err_peer = peer_id;
    s->err_status = st;
    if (s->disconnect_in_err && s->peer) {
        net_ucx_disconnect(s->peer);
        s->peer = NULL;
    }
}

static void t_sent(void *arg, afd_status_t st)
{
    side_t *s = arg;
    if (st == AFD_OK)
        s->n_sent_ok++;
    else
        s->n_sent_err++;
}

static net_ucx_opts_t t_opts(side_t *s, int err_peer, size_t max_hdr, size_t max_payload)
{
    net_ucx_opts_t o = {
        .err_mode_peer = err_peer,
        .max_hdr = max_hdr,
        .max_payload = max_payload,
        .alloc_cb = t_alloc,
        .recv_cb = t_recv,
        .err_cb = t_err,
        .arg = s,
    };
    return o;
}

/* Sends message seq of len bytes from buf with a header of hdr_len (>= sizeof(thdr_t)). */
static afd_status_t t_send(side_t *s, uint32_t seq, size_t len, size_t hdr_len, uint32_t flags,
                           const unsigned char *buf, void *memh)
{
    unsigned char hdr[1024];
    thdr_t h = {.magic = T_MAGIC, .seq = seq, .len = len, .flags = flags};
    memcpy(hdr, &h, sizeof(h));
    for (size_t j = 0; j + sizeof(h) < hdr_len; j++)
        hdr[sizeof(h) + j] = (uint8_t)(j * 7 + seq);
    return net_ucx_send(s->peer, hdr, hdr_len, buf, len, memh, s->send_flags, t_sent, s);
}

#define PUMP_UNTIL(s, cond, ms)                                                                    \
    ({                                                                                             \
        double d_ = now_ms() + (ms);                                                               \
        while (!(cond) && now_ms() < d_)                                                           \
            net_ucx_wait((s)->u, 50, 10);                                                          \
        (cond);                                                                                    \
    })

/* ---- the forked peer ---- */

#define CCHECK(c)                                                                                  \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "child: %s:%d: check failed: %s\n", __FILE__, __LINE__, #c);           \
            _exit(2);                                                                              \
        }                                                                                          \
    } while (0)

static int sock_write(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t k = write(fd, c, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

static int sock_read(int fd, void *p, size_t n)
{
    char *c = p;
    while (n) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, DEADLINE) <= 0) return -1;
        ssize_t k = read(fd, c, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Creates the worker and connects it to the other process's (peer_id: the other side). */
static int side_setup(side_t *s, const net_ucx_opts_t *o, uint32_t peer_id)
{
    if (net_ucx_create(o, &s->u) != AFD_OK) return -1;
    track(s->u);
    const void *addr;
    size_t len;
    if (net_ucx_address(s->u, &addr, &len) != AFD_OK) return -1;
    uint32_t l32 = (uint32_t)len, r32;
    if (sock_write(s->sock, &l32, 4) || sock_write(s->sock, addr, len)) return -1;
    if (sock_read(s->sock, &r32, 4) || r32 == 0 || r32 > 65536) return -1;
    void *raddr = malloc(r32);
    if (!raddr || sock_read(s->sock, raddr, r32)) return -1;
    afd_status_t st = net_ucx_connect(s->u, raddr, r32, peer_id, &s->peer);
    free(raddr);
    return st == AFD_OK ? 0 : -1;
}

/* Child: waits (progressing) for the parent's go-ahead byte, then tears down and exits. */
static _Noreturn void child_finish(side_t *s)
{
    double d = now_ms() + DEADLINE;
    for (;;) {
        struct pollfd pfd = {.fd = s->sock, .events = POLLIN};
        if (poll(&pfd, 1, 0) > 0) break;
        CCHECK(now_ms() < d);
        net_ucx_wait(s->u, 0, 5);
    }
    net_ucx_disconnect(s->peer);
    net_ucx_destroy(s->u);
    free(s->arena);
    close(s->sock);
    _exit(0); /* a fork of the test process: its inherited heap is not ours to leak-check */
}

typedef void (*child_fn)(side_t *s, void *arg);

/* Forks a child running fn on its own side (created with opts co); the parent's side is
 * created with opts po. Returns in the parent only. */
static void pair_start(side_t *ps, net_ucx_opts_t po, side_t *cs, net_ucx_opts_t co, child_fn fn,
                       void *arg)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(sv[0]);
        cs->sock = sv[1];
        co.arg = cs;
        CCHECK(side_setup(cs, &co, 0) == 0);
        fn(cs, arg);
        child_finish(cs);
    }
    g_child = pid;
    close(sv[1]);
    ps->sock = sv[0];
    po.arg = ps;
    assert_int_equal(side_setup(ps, &po, 1), 0);
}

/* Parent: closes its endpoint, lets the child close its own and exit (both sides stay
 * alive while the flushes run), checks the child's exit status, tears down. */
static void pair_finish(side_t *s)
{
    net_ucx_disconnect(s->peer);
    s->peer = NULL;
    char go = 'g';
    assert_int_equal(sock_write(s->sock, &go, 1), 0);
    int status = 0;
    double d = now_ms() + DEADLINE;
    pid_t r;
    while ((r = waitpid(g_child, &status, WNOHANG)) == 0 && now_ms() < d)
        net_ucx_wait(s->u, 0, 5);
    assert_int_equal(r, g_child);
    g_child = -1;
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    double t0 = now_ms();
    t_destroy(s->u);
    assert_true(now_ms() - t0 < 1500);
    close(s->sock);
}

/* After a failed test: no child left behind, no worker inherited by the next fork. */
static int teardown(void **state)
{
    (void)state;
    if (g_child > 0) {
        kill(g_child, SIGKILL);
        waitpid(g_child, NULL, 0);
        g_child = -1;
    }
    for (int i = 0; i < 4; i++)
        if (g_live[i]) t_destroy(g_live[i]);
    return 0;
}

/* ---- sizes, both ways at once ---- */

/* Posts every size from one registered block (memh given for even seqs, looked up by
 * address for odd ones). */
static unsigned char *post_sizes(side_t *s, void **memh)
{
    size_t total = 0;
    for (int i = 0; i < N_SIZES; i++)
        total += (k_sizes[i] + 63) & ~(size_t)63;
    unsigned char *buf = malloc(total);
    if (!buf || net_ucx_mem_map(s->u, buf, total, memh) != AFD_OK) return NULL;
    size_t off = 0;
    for (int i = 0; i < N_SIZES; i++) {
        unsigned char *p = buf + off;
        fill(p, k_sizes[i], (uint32_t)i);
        void *mh = (i % 2 == 0 && k_sizes[i]) ? *memh : NULL;
        if (t_send(s, (uint32_t)i, k_sizes[i], sizeof(thdr_t) + (size_t)i * 8, 0, p, mh) != AFD_OK)
            return NULL;
        off += (k_sizes[i] + 63) & ~(size_t)63;
    }
    return buf;
}

static void child_sizes(side_t *s, void *arg)
{
    (void)arg;
    void *memh;
    unsigned char *buf = post_sizes(s, &memh);
    CCHECK(buf);
    uint32_t all = (1u << N_SIZES) - 1;
    CCHECK(PUMP_UNTIL(s, s->n_sent_ok + s->n_sent_err == N_SIZES && s->recv_mask == all, DEADLINE));
    CCHECK(s->n_sent_ok == N_SIZES && s->n_bad == 0 && s->n_recv_err == 0);
    net_ucx_mem_unmap(s->u, memh);
    free(buf);
}

static void run_sizes(int tcp)
{
    use_tls(tcp);
    side_t ps = {0}, cs = {0};
    ps.arena_len = cs.arena_len = 20 * MiB;
    ps.arena = malloc(ps.arena_len);
    cs.arena = malloc(cs.arena_len);
    assert_non_null(ps.arena);
    pair_start(&ps, t_opts(&ps, 0, 256, 64 * MiB), &cs, t_opts(&cs, 0, 256, 64 * MiB), child_sizes,
               NULL);
    assert_int_equal(net_ucx_mem_map(ps.u, ps.arena, ps.arena_len, &ps.arena_memh), AFD_OK);
    void *memh;
    unsigned char *buf = post_sizes(&ps, &memh);
    assert_non_null(buf);
    uint32_t all = (1u << N_SIZES) - 1;
    PUMP_UNTIL(&ps, ps.n_sent_ok + ps.n_sent_err == N_SIZES && ps.recv_mask == all, DEADLINE);
    assert_int_equal(ps.n_bad, 0);
    assert_int_equal(ps.n_recv_err, 0);
    assert_int_equal(ps.n_sent_ok, N_SIZES);
    assert_int_equal(ps.recv_mask, all);
    net_ucx_stats_t st;
    net_ucx_get_stats(ps.u, &st);
    uint64_t bytes = 0;
    for (int i = 0; i < N_SIZES; i++)
        bytes += k_sizes[i];
    assert_int_equal(st.rx_msgs, N_SIZES);
    assert_int_equal(st.tx_msgs, N_SIZES);
    assert_int_equal(st.rx_bytes, bytes);
    assert_int_equal(st.tx_bytes, bytes);
    assert_int_equal(st.rx_dropped, 0);
    assert_int_equal(st.rx_eager + st.rx_rndv, N_SIZES);
    assert_true(st.rx_rndv >= 1); /* 16 MiB goes by rendezvous on any transport */
    net_ucx_mem_unmap(ps.u, memh);
    net_ucx_mem_unmap(ps.u, ps.arena_memh);
    pair_finish(&ps);
    free(buf);
    free(ps.arena);
    free(cs.arena);
}

static void test_sizes_default(void **state)
{
    (void)state;
    run_sizes(0);
}

static void test_sizes_tcp(void **state)
{
    (void)state;
    run_sizes(1);
}

/* ---- drops ---- */

enum { DROP_SENDS = 8 };

static void child_drops(side_t *s, void *arg)
{
    (void)arg;
    struct {
        size_t len, hdr;
        uint32_t flags;
    } m[DROP_SENDS] = {
        {100, sizeof(thdr_t), TF_DROP},     /* 0: alloc_cb NULL, eager */
        {1 * MiB, sizeof(thdr_t), TF_DROP}, /* 1: alloc_cb NULL, rendezvous */
        {100, 200, 0},                      /* 2: header over the receiver's max_hdr, eager */
        {1 * MiB, 200, 0},                  /* 3: header over max_hdr, rendezvous */
        {8 * MiB, sizeof(thdr_t), 0},       /* 4: payload over max_payload */
        {100, sizeof(thdr_t), 0},           /* 5..7: delivered */
        {1 * MiB, 40, 0},
        {0, sizeof(thdr_t), 0},
    };
    unsigned char *bufs[DROP_SENDS];
    for (int i = 0; i < DROP_SENDS; i++) {
        bufs[i] = malloc(m[i].len ? m[i].len : 1);
        CCHECK(bufs[i]);
        fill(bufs[i], m[i].len, (uint32_t)i);
        CCHECK(t_send(s, (uint32_t)i, m[i].len, m[i].hdr, m[i].flags, bufs[i], NULL) == AFD_OK);
    }
    /* dropped rendezvous messages are acked by the receiver: every send completes OK */
    CCHECK(PUMP_UNTIL(s, s->n_sent_ok + s->n_sent_err == DROP_SENDS, DEADLINE));
    CCHECK(s->n_sent_ok == DROP_SENDS);
    for (int i = 0; i < DROP_SENDS; i++)
        free(bufs[i]);
}

static void run_drops(int tcp)
{
    use_tls(tcp);
    side_t ps = {0}, cs = {0};
    pair_start(&ps, t_opts(&ps, 0, 64, 4 * MiB), &cs, t_opts(&cs, 0, 1024, 64 * MiB), child_drops,
               NULL);
    uint32_t want = (1u << 5) | (1u << 6) | (1u << 7);
    net_ucx_stats_t st;
    PUMP_UNTIL(&ps, (net_ucx_get_stats(ps.u, &st), st.rx_dropped == 5 && ps.recv_mask == want),
               DEADLINE);
    assert_int_equal(ps.recv_mask, want);
    assert_int_equal(ps.n_recv, 3);
    assert_int_equal(ps.n_bad, 0);
    assert_int_equal(ps.n_recv_err, 0);
    /* alloc_cb saw 0, 1 (returned NULL), 5, 6, 7: never the oversized ones */
    assert_int_equal(ps.n_alloc, 5);
    net_ucx_get_stats(ps.u, &st);
    assert_int_equal(st.rx_dropped, 5);
    assert_int_equal(st.rx_msgs, 3);
    assert_int_equal(st.rx_bytes, 100 + 1 * MiB);
    pair_finish(&ps);
}

static void test_drops_default(void **state)
{
    (void)state;
    run_drops(0);
}

static void test_drops_tcp(void **state)
{
    (void)state;
    run_drops(1);
}

/* ---- idle wait and wake-up ---- */

static void child_idle(side_t *s, void *arg)
{
    (void)arg;
    /* stay quiet (but responsive) for 500 ms, then send one message */
    double d = now_ms() + 500;
    while (now_ms() < d)
        net_ucx_wait(s->u, 0, 20);
    unsigned char b[100];
    fill(b, sizeof(b), 3);
    CCHECK(t_send(s, 3, sizeof(b), sizeof(thdr_t), 0, b, NULL) == AFD_OK);
    CCHECK(PUMP_UNTIL(s, s->n_sent_ok == 1, DEADLINE));
}

static void run_idle(int tcp)
{
    use_tls(tcp);
    side_t ps = {0}, cs = {0};
    double t_start = now_ms();
    pair_start(&ps, t_opts(&ps, 0, 256, MiB), &cs, t_opts(&cs, 0, 256, MiB), child_idle, NULL);

    /* nothing to do: ~200 ms asleep on the event fd, not spinning */
    double w0 = now_ms(), c0 = cpu_ms();
    unsigned n = net_ucx_wait(ps.u, 100, 200);
    double wall = now_ms() - w0, cpu = cpu_ms() - c0;
    print_message("idle wait: %u events, %.1f ms wall, %.1f ms cpu\n", n, wall, cpu);
    assert_int_equal(n, 0);
    assert_true(wall >= 195 && wall < 1000);
    assert_true(cpu < 0.25 * wall);

    /* the message sent ~500 ms after the start wakes a long wait early */
    w0 = now_ms();
    c0 = cpu_ms();
    while (ps.n_recv == 0 && now_ms() - w0 < 5000)
        net_ucx_wait(ps.u, 0, 5000);
    wall = now_ms() - w0;
    cpu = cpu_ms() - c0;
    print_message("woken after %.1f ms (%.1f ms since start), %.1f ms cpu\n", wall,
                  now_ms() - t_start, cpu);
    assert_int_equal(ps.n_recv, 1);
    assert_true(wall < 2000);
    assert_true(cpu < 0.5 * wall + 20);

    /* arm/fd interface: after draining, arm says OK (or BUSY) and the fd is valid */
    assert_true(net_ucx_fd(ps.u) >= 0);
    afd_status_t a = net_ucx_arm(ps.u);
    assert_true(a == AFD_OK || a == AFD_ERR_BUSY);
    pair_finish(&ps);
}

static void test_idle_default(void **state)
{
    (void)state;
    run_idle(0);
}

static void test_idle_tcp(void **state)
{
    (void)state;
    run_idle(1);
}

/* ---- peer failure ---- */

static void child_dies(side_t *s, void *arg)
{
    (void)arg;
    unsigned char b[100];
    fill(b, sizeof(b), 0);
    CCHECK(t_send(s, 0, sizeof(b), sizeof(thdr_t), 0, b, NULL) == AFD_OK);
    CCHECK(PUMP_UNTIL(s, s->n_sent_ok == 1, DEADLINE));
    /* wait for the parent's ack so that it has seen message 0, start a 16 MiB send and
     * die in the middle of it */
    char c;
    CCHECK(sock_read(s->sock, &c, 1) == 0);
    size_t len = 16 * MiB;
    unsigned char *big = malloc(len);
    CCHECK(big);
    fill(big, len, 1);
    CCHECK(t_send(s, 1, len, sizeof(thdr_t), 0, big, NULL) == AFD_OK);
    for (int i = 0; i < 3; i++)
        net_ucx_progress(s->u);
    _exit(0);
}

static void run_peer_exit(int tcp, int disconnect_in_err)
{
    use_tls(tcp);
    side_t ps = {.disconnect_in_err = disconnect_in_err}, cs = {0};
    pair_start(&ps, t_opts(&ps, 1, 256, 64 * MiB), &cs, t_opts(&cs, 1, 256, 64 * MiB), child_dies,
               NULL);
    assert_true(PUMP_UNTIL(&ps, ps.n_recv == 1, DEADLINE));
    char c = 'a';
    assert_int_equal(sock_write(ps.sock, &c, 1), 0);
    double t0 = now_ms();
    PUMP_UNTIL(&ps, ps.n_peer_err > 0, 8000);
    double dt = now_ms() - t0;
    int status;
    assert_int_equal(waitpid(g_child, &status, 0), g_child);
    g_child = -1;
    print_message("err_cb after %.1f ms (status %s); 16 MiB message: %d alloc, %d ok, %d failed\n",
                  dt, afd_status_str(ps.err_status), ps.n_alloc - 1, ps.n_recv - 1, ps.n_recv_err);
    assert_int_equal(ps.n_peer_err, 1);
    assert_int_equal(ps.err_peer, 1);
    assert_int_equal(ps.err_status, AFD_ERR_PEER);
    assert_true(dt < 8000);
    assert_int_equal(ps.n_bad, 0);
    /* every accepted message ends in exactly one recv_cb, even the one cut short */
    PUMP_UNTIL(&ps, ps.n_alloc == ps.n_recv + ps.n_recv_err, 3000);
    assert_int_equal(ps.n_alloc, ps.n_recv + ps.n_recv_err);
    if (disconnect_in_err) {
        assert_null(ps.peer);
        for (int i = 0; i < 10; i++)
            net_ucx_progress(ps.u); /* the deferred close runs */
    } else {
        /* a send to the failed peer fails, now or through its callback */
        unsigned char b[10] = {0};
        afd_status_t st = t_send(&ps, 2, sizeof(b), sizeof(thdr_t), 0, b, NULL);
        if (st == AFD_OK)
            assert_true(PUMP_UNTIL(&ps, ps.n_sent_err == 1, DEADLINE));
        else
            assert_int_equal(st, AFD_ERR_PEER);
        net_ucx_disconnect(ps.peer);
    }
    double d0 = now_ms();
    t_destroy(ps.u);
    assert_true(now_ms() - d0 < 2500);
    close(ps.sock);
}

static void test_peer_exit_tcp(void **state)
{
    (void)state;
    run_peer_exit(1, 1);
}

static void test_peer_exit_default(void **state)
{
    (void)state;
    run_peer_exit(0, 0);
}

/* ---- two workers in one process ---- */

static void pump2(side_t *a, side_t *b)
{
    net_ucx_progress(a->u);
    net_ucx_progress(b->u);
}

static void test_two_workers(void **state)
{
    (void)state;
    use_tls(0);
    side_t a = {0}, b = {0};
    net_ucx_opts_t oa = t_opts(&a, 0, 128, 64 * MiB), ob = t_opts(&b, 0, 128, 64 * MiB);
    assert_int_equal(net_ucx_create(&oa, &a.u), AFD_OK);
    track(a.u);
    assert_int_equal(net_ucx_create(&ob, &b.u), AFD_OK);
    track(b.u);
    const void *aa, *ba;
    size_t al, bl;
    assert_int_equal(net_ucx_address(a.u, &aa, &al), AFD_OK);
    assert_int_equal(net_ucx_address(b.u, &ba, &bl), AFD_OK);
    assert_int_equal(net_ucx_connect(a.u, ba, bl, 2, &a.peer), AFD_OK);
    assert_int_equal(net_ucx_connect(b.u, aa, al, 1, &b.peer), AFD_OK);
    assert_int_equal(net_ucx_connect(a.u, ba, 0, 2, &(net_ucx_peer_t *){NULL}), AFD_ERR_INVALID);

    /* header limits and memh checks on the sending side */
    unsigned char big[200] = {0};
    assert_int_equal(net_ucx_send(a.peer, big, 129, NULL, 0, NULL, 0, t_sent, &a), AFD_ERR_RANGE);
    unsigned char *reg = malloc(4096), *other = malloc(4096);
    void *mh;
    assert_int_equal(net_ucx_mem_map(a.u, reg, 4096, &mh), AFD_OK);
    assert_int_equal(t_send(&a, 0, 4096, sizeof(thdr_t), 0, other, mh), AFD_ERR_INVALID);
    assert_int_equal(t_send(&a, 0, 100, sizeof(thdr_t), 0, reg + 4000, mh), AFD_ERR_INVALID);
    net_ucx_mem_unmap(a.u, mh);
    assert_int_equal(a.n_sent_ok + a.n_sent_err, 0);
    free(reg);
    free(other);

    unsigned char *bufs[N_SIZES];
    for (int i = 0; i < N_SIZES; i++) {
        bufs[i] = malloc(k_sizes[i] ? k_sizes[i] : 1);
        assert_non_null(bufs[i]);
        fill(bufs[i], k_sizes[i], (uint32_t)i);
        assert_int_equal(t_send(&a, (uint32_t)i, k_sizes[i], sizeof(thdr_t) + 8, 0, bufs[i], NULL),
                         AFD_OK);
        assert_int_equal(t_send(&b, (uint32_t)i, k_sizes[i], sizeof(thdr_t), 0, bufs[i], NULL),
                         AFD_OK);
    }
    uint32_t all = (1u << N_SIZES) - 1;
    double d = now_ms() + DEADLINE;
    while ((a.recv_mask != all || b.recv_mask != all || a.n_sent_ok + b.n_sent_ok < 2 * N_SIZES) &&
           now_ms() < d)
        pump2(&a, &b);
    assert_int_equal(a.recv_mask, all);
    assert_int_equal(b.recv_mask, all);
    assert_int_equal(a.n_sent_ok, N_SIZES);
    assert_int_equal(b.n_sent_ok, N_SIZES);
    assert_int_equal(a.n_bad + b.n_bad + a.n_recv_err + b.n_recv_err, 0);
    net_ucx_disconnect(a.peer);
    net_ucx_disconnect(b.peer);
    for (int i = 0; i < 50; i++)
        pump2(&a, &b);
    t_destroy(a.u);
    t_destroy(b.u);
    for (int i = 0; i < N_SIZES; i++)
        free(bufs[i]);
}

/* Destroy while a rendezvous receive is in flight and the sender is not progressing:
 * bounded, no crash, the receive still ends in exactly one recv_cb. */
static void test_destroy_midway(void **state)
{
    (void)state;
    use_tls(0);
    side_t a = {0}, b = {0};
    net_ucx_opts_t oa = t_opts(&a, 1, 128, 64 * MiB), ob = t_opts(&b, 1, 128, 64 * MiB);
    assert_int_equal(net_ucx_create(&oa, &a.u), AFD_OK);
    track(a.u);
    assert_int_equal(net_ucx_create(&ob, &b.u), AFD_OK);
    track(b.u);
    const void *aa, *ba;
    size_t al, bl;
    assert_int_equal(net_ucx_address(a.u, &aa, &al), AFD_OK);
    assert_int_equal(net_ucx_address(b.u, &ba, &bl), AFD_OK);
    assert_int_equal(net_ucx_connect(a.u, ba, bl, 2, &a.peer), AFD_OK);
    assert_int_equal(net_ucx_connect(b.u, aa, al, 1, &b.peer), AFD_OK);
    size_t len = 16 * MiB;
    unsigned char *buf = malloc(len);
    assert_non_null(buf);
    fill(buf, len, 1);
    assert_int_equal(t_send(&a, 1, len, sizeof(thdr_t), 0, buf, NULL), AFD_OK);
    double d = now_ms() + DEADLINE;
    while (b.n_alloc == 0 && now_ms() < d)
        pump2(&a, &b);
    assert_int_equal(b.n_alloc, 1);
    double t0 = now_ms();
    t_destroy(b.u); /* a is not progressed meanwhile */
    assert_true(now_ms() - t0 < 2500);
    assert_int_equal(b.n_recv + b.n_recv_err, 1);
    assert_int_equal(b.n_bad, 0);
    t0 = now_ms();
    t_destroy(a.u);
    assert_true(now_ms() - t0 < 2500);
    assert_int_equal(a.n_sent_ok + a.n_sent_err, 1); /* the send callback ran, either way */
    free(buf);
}

/* An idle worker with no endpoint at all sleeps too. */
static void test_idle_alone(void **state)
{
    (void)state;
    use_tls(0);
    side_t a = {0};
    net_ucx_opts_t o = t_opts(&a, 0, 64, MiB);
    assert_int_equal(net_ucx_create(&o, &a.u), AFD_OK);
    track(a.u);
    double w0 = now_ms(), c0 = cpu_ms();
    assert_int_equal(net_ucx_wait(a.u, 1000, 150), 0);
    double wall = now_ms() - w0, cpu = cpu_ms() - c0;
    assert_true(wall >= 145 && wall < 1000);
    assert_true(cpu < 0.25 * wall); /* only the 1 ms busy phase spins */
    w0 = now_ms();
    assert_int_equal(net_ucx_wait(a.u, 0, 0), 0);
    assert_true(now_ms() - w0 < 50);
    t_destroy(a.u);
}

/* Two connected workers in this process; device_host as given. */
static void pair_up(side_t *a, side_t *b, int device_host)
{
    net_ucx_opts_t oa = t_opts(a, 0, 128, 64 * MiB), ob = t_opts(b, 0, 128, 64 * MiB);
    oa.device_host = ob.device_host = device_host;
    assert_int_equal(net_ucx_create(&oa, &a->u), AFD_OK);
    track(a->u);
    assert_int_equal(net_ucx_create(&ob, &b->u), AFD_OK);
    track(b->u);
    const void *aa, *ba;
    size_t al, bl;
    assert_int_equal(net_ucx_address(a->u, &aa, &al), AFD_OK);
    assert_int_equal(net_ucx_address(b->u, &ba, &bl), AFD_OK);
    assert_int_equal(net_ucx_connect(a->u, ba, bl, 2, &a->peer), AFD_OK);
    assert_int_equal(net_ucx_connect(b->u, aa, al, 1, &b->peer), AFD_OK);
}

static void pair_down(side_t *a, side_t *b)
{
    net_ucx_disconnect(a->peer);
    net_ucx_disconnect(b->peer);
    for (int i = 0; i < 50; i++)
        pump2(a, b);
    t_destroy(a->u);
    t_destroy(b->u);
}

/*
 * Device payloads (NET_UCX_DEVICE) on workers whose device memory is host memory
 * (device_host, as for a backend that only takes the device code paths): every size, even
 * 1 byte, goes by rendezvous and lands in the receiver's "device" buffer intact. Without
 * device_host, on a UCX that does not move CUDA memory, such a send is refused before
 * anything goes out; and an eager payload handed a device buffer ends in one recv_cb
 * with an error instead of a host copy into device memory.
 */
static void test_device_buffers(void **state)
{
    (void)state;
    use_tls(0);
    side_t a = {0}, b = {0};
    pair_up(&a, &b, 1);
    assert_true(net_ucx_device_ok(a.u));
    a.send_flags = NET_UCX_DEVICE;
    b.dev_rndv = 1;
    unsigned char *bufs[N_SIZES];
    int nonempty = 0;
    for (int i = 0; i < N_SIZES; i++) {
        bufs[i] = malloc(k_sizes[i] ? k_sizes[i] : 1);
        assert_non_null(bufs[i]);
        fill(bufs[i], k_sizes[i], (uint32_t)i);
        nonempty += k_sizes[i] > 0;
        assert_int_equal(t_send(&a, (uint32_t)i, k_sizes[i], sizeof(thdr_t), 0, bufs[i], NULL),
                         AFD_OK);
    }
    uint32_t all = (1u << N_SIZES) - 1;
    double d = now_ms() + DEADLINE;
    while ((b.recv_mask != all || a.n_sent_ok < N_SIZES) && now_ms() < d)
        pump2(&a, &b);
    assert_int_equal(b.recv_mask, all);
    assert_int_equal(a.n_sent_ok, N_SIZES);
    assert_int_equal(b.n_rndv, nonempty); /* an empty payload has nothing to pull */
    assert_int_equal(b.n_bad + b.n_recv_err, 0);
    pair_down(&a, &b);

    side_t c = {0}, e = {0};
    pair_up(&c, &e, 0);
    if (!net_ucx_cuda_memory(c.u)) {
        assert_false(net_ucx_device_ok(c.u));
        c.send_flags = NET_UCX_DEVICE;
        assert_int_equal(t_send(&c, 0, 100, sizeof(thdr_t), 0, bufs[2], NULL), AFD_ERR_UNSUPPORTED);
        assert_int_equal(c.n_sent_ok + c.n_sent_err, 0);
        c.send_flags = 0;
    }
    e.dev_eager = 1; /* a 100-byte payload comes eager */
    assert_int_equal(t_send(&c, 2, k_sizes[2], sizeof(thdr_t), 0, bufs[2], NULL), AFD_OK);
    d = now_ms() + DEADLINE;
    while (e.n_recv + e.n_recv_err + e.n_bad == 0 && now_ms() < d)
        pump2(&c, &e);
    if (e.n_rndv == 0) { /* (a transport that sends even 100 bytes by rendezvous: no eager) */
        assert_int_equal(e.n_recv_err, 1);
        assert_int_equal(e.n_recv, 0);
    }
    pair_down(&c, &e);
    for (int i = 0; i < N_SIZES; i++)
        free(bufs[i]);
}

/* The nodes' --data-plane choice: host always stages; auto takes device memory only on a
 * CUDA backend whose UCX moves it; device needs a UCX that moves the backend's memory,
 * which any UCX does for device memory that is host memory (cpu-dev). */
static void test_plane_choice(void **state)
{
    (void)state;
    use_tls(0);
    assert_true(net_plane_mode_ok("auto") && net_plane_mode_ok("host") &&
                net_plane_mode_ok("device"));
    assert_false(net_plane_mode_ok("gpu") || net_plane_mode_ok("") || net_plane_mode_ok(NULL));
    unsetenv("AFD_UCX_DEVICE_HOST");
    assert_int_equal(net_plane_device_host(0, 0), 0); /* host memory: nothing to stage */
    assert_int_equal(net_plane_device_host(1, 0), 1); /* cpu-dev */
    assert_int_equal(net_plane_device_host(1, 1), 0); /* CUDA memory */
    setenv("AFD_UCX_DEVICE_HOST", "1", 1);            /* the CPU emulator of CUDA */
    assert_int_equal(net_plane_device_host(1, 1), 1);
    unsetenv("AFD_UCX_DEVICE_HOST");
    side_t a = {0}, h = {0};
    net_ucx_opts_t o = t_opts(&a, 0, 64, MiB), oh = t_opts(&h, 0, 64, MiB);
    oh.device_host = 1;
    assert_int_equal(net_ucx_create(&o, &a.u), AFD_OK);
    track(a.u);
    assert_int_equal(net_ucx_create(&oh, &h.u), AFD_OK);
    track(h.u);
    int cm = net_ucx_cuda_memory(a.u);
    for (int dev = 0; dev < 2; dev++)
        for (int cuda = 0; cuda < 2; cuda++) {
            assert_int_equal(net_plane_choose("host", dev, cuda, a.u), 0);
            assert_int_equal(net_plane_choose("auto", dev, cuda, a.u), dev && cuda && cm);
        }
    assert_int_equal(net_plane_choose("device", 0, 0, a.u), 0); /* a cpu backend */
    assert_int_equal(net_plane_choose("device", 1, 1, a.u), cm ? 1 : -1);
    assert_int_equal(net_plane_choose("device", 1, 0, h.u), 1);
    assert_int_equal(net_plane_choose("device", 1, 1, h.u), 1);
    t_destroy(a.u);
    t_destroy(h.u);
}

/* Whether this UCX moves CUDA memory agrees with ucx_info, an independent view of the same
 * installation: a CUDA memory domain (cuda_cpy, cuda_ipc, gdr_copy) in `ucx_info -d`. */
static void test_cuda_memory(void **state)
{
    (void)state;
    use_tls(0);
    FILE *p = popen("ucx_info -d 2>/dev/null", "r");
    if (!p) skip();
    char line[512];
    int lines = 0, cuda_md = 0;
    while (fgets(line, sizeof(line), p)) {
        lines++;
        if (strstr(line, "Memory domain:") && (strstr(line, "cuda") || strstr(line, "gdr")))
            cuda_md = 1;
    }
    if (pclose(p) != 0 || lines == 0) skip(); /* no ucx_info here */
    side_t a = {0};
    net_ucx_opts_t o = t_opts(&a, 0, 64, MiB);
    assert_int_equal(net_ucx_create(&o, &a.u), AFD_OK);
    track(a.u);
    assert_int_equal(net_ucx_cuda_memory(a.u), cuda_md);
    t_destroy(a.u);
}

int main(void)
{
    const char *t = getenv("UCX_TLS"), *dv = getenv("UCX_NET_DEVICES");
    g_orig_tls = t ? strdup(t) : NULL;
    g_orig_dev = dv ? strdup(dv) : NULL;
    for_each_task(note_foreign, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_idle_alone, teardown),
        cmocka_unit_test_teardown(test_cuda_memory, teardown),
        cmocka_unit_test_teardown(test_device_buffers, teardown),
        cmocka_unit_test_teardown(test_plane_choice, teardown),
        cmocka_unit_test_teardown(test_two_workers, teardown),
        cmocka_unit_test_teardown(test_destroy_midway, teardown),
        cmocka_unit_test_teardown(test_sizes_default, teardown),
        cmocka_unit_test_teardown(test_drops_default, teardown),
        cmocka_unit_test_teardown(test_idle_default, teardown),
        cmocka_unit_test_teardown(test_peer_exit_default, teardown),
        cmocka_unit_test_teardown(test_sizes_tcp, teardown),
        cmocka_unit_test_teardown(test_drops_tcp, teardown),
        cmocka_unit_test_teardown(test_idle_tcp, teardown),
        cmocka_unit_test_teardown(test_peer_exit_tcp, teardown),
    };
    if (getenv("TEST_FILTER")) cmocka_set_test_filter(getenv("TEST_FILTER"));
    if (getenv("TEST_SKIP")) cmocka_set_skip_filter(getenv("TEST_SKIP"));
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    use_tls(0);
    free(g_orig_tls);
    free(g_orig_dev);
    return rc;
}
