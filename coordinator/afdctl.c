/*
 * afdctl: the operator CLI.
 *   afdctl local-up --model DIR --attn N --ffn M [--port P] [--micro-batches m] [--pin]
 *       starts a whole cluster on loopback as child processes, waits until it is
 *       ready, prints "ready: http://127.0.0.1:P", stays in the foreground and
 *       stops everything on SIGINT/SIGTERM (or when a daemon dies).
 *   afdctl status [--url URL] [-o json]
 *       nodes, roles, experts, KV usage, running and waiting requests.
 * Exit codes: 0 success, 1 failure, 2 usage error, 3 cluster unreachable.
 */
#define _GNU_SOURCE
#include "afd_file.h"
#include "afd_log.h"
#include "afd_opts.h"
#include "net_frame.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- a tiny blocking HTTP client ---- */

static int http_req(const char *method, const char *url, const char *path, const char *token,
                    const char *body, int timeout_ms, int *status, char **out)
{
    const char *hp = strncmp(url, "http://", 7) == 0 ? url + 7 : url;
    char hostport[256];
    snprintf(hostport, sizeof(hostport), "%s", hp);
    char *slash = strchr(hostport, '/');
    if (slash) *slash = 0;
    int fd;
    if (net_tcp_connect(hostport, timeout_ms, &fd)) return -1;
    char auth[600] = "";
    if (token && *token) snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", token);
    size_t blen = body ? strlen(body) : 0;
    char head[1024];
    int n = snprintf(head, sizeof(head),
                     "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     method, path, hostport, auth, blen);
    if (send(fd, head, (size_t)n, MSG_NOSIGNAL) != n ||
        (blen && send(fd, body, blen, MSG_NOSIGNAL) != (ssize_t)blen)) {
        close(fd);
        return -1;
    }
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, timeout_ms) <= 0) break;
        if (len + 4096 > cap) {
            if (cap > (64u << 20)) break;
            buf = realloc(buf, cap *= 2);
        }
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = 0;
    char *sp = strchr(buf, ' '), *hdr_end = strstr(buf, "\r\n\r\n");
    if (strncmp(buf, "HTTP/1.", 7) != 0 || !sp || !hdr_end) {
        free(buf);
        return -1;
    }
    *status = atoi(sp + 1);
    *out = strdup(hdr_end + 4);
    free(buf);
    return 0;
}

static int http_get(const char *url, const char *path, int timeout_ms, int *status, char **body)
{
    return http_req("GET", url, path, NULL, NULL, timeout_ms, status, body);
}

/* ---- local-up ---- */

typedef struct up_opts {
    char *model, *micro_batches, *cluster_token, *api_key, *a2f_dtype, *f2a_dtype, *kv_dtype,
        *backend, *log_dir, *trace_dir, *ffn_devices;
    long attn, ffn, ffn_tp, port, ctrl_port, threads, kv_budget_mb, ready_timeout_s, busy_poll_us,
        max_batch_tokens, admin_port;
    char *admin_token;
    int pin;
} up_opts_t;

#define O(f) offsetof(up_opts_t, f)
static const afd_opt_t up_table[] = {
    {"model", AFD_OPT_STRING, NULL, O(model), 0, 0, 0, "checkpoint directory (required)"},
    {"attn", AFD_OPT_INT, "1", O(attn), 1, 64, 0, "attention nodes"},
    {"ffn", AFD_OPT_INT, "1", O(ffn), 1, 64, 0, "FFN nodes"},
    {"ffn-tp", AFD_OPT_INT, "1", O(ffn_tp), 1, 16, 0,
     "tensor-parallel ranks per FFN node (ffn_node --tp; cuda: GPUs 0.. each)"},
    {"ffn-devices", AFD_OPT_STRING, NULL, O(ffn_devices), 0, 0, 0,
     "the devices of every FFN node's ranks, comma-separated (ffn_node --devices)"},
    {"port", AFD_OPT_INT, "8000", O(port), 1, 65535, 0, "HTTP API port"},
    {"admin-port", AFD_OPT_INT, "0", O(admin_port), 0, 65535, 0, "admin API port (0: --port + 1)"},
    {"admin-token", AFD_OPT_STRING, NULL, O(admin_token), 0, 0, AFD_OPT_SECRET,
     "admin API token (none: open on loopback)"},
    {"ctrl-port", AFD_OPT_INT, "0", O(ctrl_port), 0, 65535, 0,
     "control-plane port (0: a free one)"},
    {"micro-batches", AFD_OPT_STRING, "3", O(micro_batches), 0, 0, 0, "1..8 or auto"},
    {"pin", AFD_OPT_BOOL, "false", O(pin), 0, 0, 0,
     "give each node its own core when there are enough"},
    {"cluster-token", AFD_OPT_STRING, NULL, O(cluster_token), 0, 0, AFD_OPT_SECRET,
     "cluster token (default: a random one)"},
    {"api-key", AFD_OPT_STRING, NULL, O(api_key), 0, 0, AFD_OPT_SECRET, "API key for clients"},
    {"a2f-dtype", AFD_OPT_STRING, "fp8", O(a2f_dtype), 0, 0, 0, "attention->FFN: fp8, bf16, f32"},
    {"f2a-dtype", AFD_OPT_STRING, "bf16", O(f2a_dtype), 0, 0, 0, "FFN->attention: bf16, f32"},
    {"kv-dtype", AFD_OPT_STRING, "bf16", O(kv_dtype), 0, 0, 0, "KV cache: bf16, fp8, f32"},
    {"kv-budget-mb", AFD_OPT_INT, "256", O(kv_budget_mb), 1, 1 << 24, 0,
     "KV cache per attention node (MiB)"},
    {"max-batch-tokens", AFD_OPT_INT, "512", O(max_batch_tokens), 1, 1 << 20, 0,
     "prefill tokens per step on each attention node"},
    {"backend", AFD_OPT_STRING, "cpu", O(backend), 0, 0, 0,
     "cpu or cuda (cpu-dev: the cpu backend taking the device code paths, for tests)"},
    {"threads", AFD_OPT_INT, "1", O(threads), 0, 1024, 0, "GEMM threads per node"},
    {"busy-poll-us", AFD_OPT_INT, "-1", O(busy_poll_us), -1, 1000000, 0,
     "data-plane busy-poll per node (-1: the nodes' default, 0 when not pinned)"},
    {"ready-timeout-s", AFD_OPT_INT, "120", O(ready_timeout_s), 1, 3600, 0,
     "give up when not ready by then"},
    {"log-dir", AFD_OPT_STRING, NULL, O(log_dir), 0, 0, 0,
     "write each daemon's log to DIR/NAME.log (default: inherit stderr)"},
    {"trace-dir", AFD_OPT_STRING, NULL, O(trace_dir), 0, 0, 0,
     "each node writes its pipeline timeline to DIR/NAME.trace.json when it stops "
     "(merge them with afdctl trace-merge)"},
    AFD_OPTS_END};
#undef O

#define UP_MAX_CHILD 160
static pid_t g_child[UP_MAX_CHILD];
static const char *g_child_name[UP_MAX_CHILD];
static int g_nchild;
static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void bin_dir(char *out, size_t len)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) {
        snprintf(out, len, ".");
        return;
    }
    exe[n] = 0;
    char *s = strrchr(exe, '/');
    if (s) *s = 0;
    snprintf(out, len, "%s", exe);
}

static pid_t spawn(const char *log_dir, const char *name, char **argv)
{
    pid_t pid = fork();
    if (pid < 0) {
        afd_error("fork: %m");
        return -1;
    }
    if (pid == 0) {
        if (log_dir) {
            char path[PATH_MAX];
            snprintf(path, sizeof(path), "%s/%s.log", log_dir, name);
            if (!freopen(path, "w", stderr)) _exit(127);
            dup2(2, 1);
        }
        signal(SIGINT, SIG_IGN); /* the foreground ctrl-c goes to afdctl, which stops us */
        execv(argv[0], argv);
        fprintf(stderr, "afdctl: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    if (g_nchild < UP_MAX_CHILD) {
        g_child[g_nchild] = pid;
        g_child_name[g_nchild++] = strdup(name);
    }
    return pid;
}

static void stop_all(void)
{
    for (int i = g_nchild - 1; i >= 0; i--)
        if (g_child[i] > 0) kill(g_child[i], SIGTERM);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int alive = 0;
        for (int i = 0; i < g_nchild; i++) {
            if (g_child[i] <= 0) continue;
            if (waitpid(g_child[i], NULL, WNOHANG) == g_child[i])
                g_child[i] = 0;
            else
                alive++;
        }
        if (!alive) return;
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec >= 5) break;
        usleep(20000);
    }
    for (int i = 0; i < g_nchild; i++)
        if (g_child[i] > 0) {
            afd_warn("%s did not stop in 5 s: killing it", g_child_name[i]);
            kill(g_child[i], SIGKILL);
            waitpid(g_child[i], NULL, 0);
            g_child[i] = 0;
        }
}

/* a child that died: its name, or NULL */
static const char *reap_dead(int *status)
{
    for (int i = 0; i < g_nchild; i++)
        if (g_child[i] > 0 && waitpid(g_child[i], status, WNOHANG) == g_child[i]) {
            g_child[i] = 0;
            return g_child_name[i];
        }
    return NULL;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

static int cmd_local_up(int argc, char **argv)
{
    up_opts_t o;
    memset(&o, 0, sizeof(o));
    int first;
    afd_status_t st = afd_opts_parse(up_table, &o, argc, argv,
                                     "usage: afdctl local-up --model DIR --attn N --ffn M "
                                     "[--port P] [--micro-batches m] [--pin] [options]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (!o.model) {
        afd_error("--model DIR is required");
        return 2;
    }
    char dir[PATH_MAX], bin[PATH_MAX + 32];
    bin_dir(dir, sizeof(dir));
    const char *dirs[2] = {o.log_dir, o.trace_dir};
    for (int i = 0; i < 2; i++) { /* made when missing (one level), so children can write */
        if (dirs[i] && mkdir(dirs[i], 0755) != 0 && errno != EEXIST) {
            afd_error("%s: cannot create the directory: %s", dirs[i], strerror(errno));
            return 1;
        }
    }
    char token[64];
    if (!o.cluster_token) {
        FILE *ur = fopen("/dev/urandom", "rb");
        unsigned char r[16] = {0};
        if (!ur || fread(r, 1, sizeof(r), ur) != sizeof(r)) afd_warn("no /dev/urandom: weak token");
        if (ur) fclose(ur);
        for (int i = 0; i < 16; i++)
            sprintf(token + 2 * i, "%02x", r[i] ^ (unsigned)(getpid() >> (i % 4)));
    } else {
        snprintf(token, sizeof(token), "%s", o.cluster_token);
    }
    int ctrl = o.ctrl_port ? (int)o.ctrl_port : free_port();
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int pin = o.pin && ncpu >= o.attn + o.ffn;
    if (o.pin && !pin)
        afd_warn("--pin: %ld cores for %ld nodes: not pinning", ncpu, o.attn + o.ffn);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    char sport[24], sctrl[32], sthreads[24], skv[24], sbusy[24], scpu[24], coordaddr[64], smbt[24];
    snprintf(smbt, sizeof(smbt), "%ld", o.max_batch_tokens);
    snprintf(sport, sizeof(sport), "%ld", o.port);
    snprintf(sctrl, sizeof(sctrl), "%d", ctrl);
    snprintf(coordaddr, sizeof(coordaddr), "127.0.0.1:%d", ctrl);
    snprintf(sthreads, sizeof(sthreads), "%ld", o.threads);
    snprintf(skv, sizeof(skv), "%ld", o.kv_budget_mb);
    /* nodes that share cores must not spin */
    snprintf(sbusy, sizeof(sbusy), "%ld", o.busy_poll_us >= 0 ? o.busy_poll_us : (pin ? 200 : 0));
    snprintf(bin, sizeof(bin), "%s/afd_coordinator", dir);
    char *cargv[40];
    int k = 0;
    cargv[k++] = bin;
    cargv[k++] = "--model";
    cargv[k++] = o.model;
    cargv[k++] = "--port";
    cargv[k++] = sport;
    cargv[k++] = "--ctrl-port";
    cargv[k++] = sctrl;
    cargv[k++] = "--cluster-token";
    cargv[k++] = token;
    char sa[24], sf[24];
    snprintf(sa, sizeof(sa), "%ld", o.attn);
    snprintf(sf, sizeof(sf), "%ld", o.ffn);
    cargv[k++] = "--attn";
    cargv[k++] = sa;
    cargv[k++] = "--ffn";
    cargv[k++] = sf;
    cargv[k++] = "--micro-batches";
    cargv[k++] = o.micro_batches;
    if (o.api_key) {
        cargv[k++] = "--api-key";
        cargv[k++] = o.api_key;
    }
    char sadmin[24];
    snprintf(sadmin, sizeof(sadmin), "%ld", o.admin_port ? o.admin_port : o.port + 1);
    cargv[k++] = "--admin-port";
    cargv[k++] = sadmin;
    if (o.admin_token) {
        cargv[k++] = "--admin-token";
        cargv[k++] = o.admin_token;
    }
    cargv[k] = NULL;
    if (spawn(o.log_dir, "coordinator", cargv) < 0) return 1;
    usleep(100000);
    int cpu = 0;
    for (int role = 0; role < 2; role++) {
        long cnt = role == 0 ? o.ffn : o.attn;
        for (long i = 0; i < cnt; i++) {
            char nbin[PATH_MAX + 32], name[32];
            snprintf(nbin, sizeof(nbin), "%s/%s", dir, role == 0 ? "ffn_node" : "attn_node");
            snprintf(name, sizeof(name), "%s-%ld", role == 0 ? "ffn" : "attn", i);
            char *nargv[40];
            int j = 0;
            nargv[j++] = nbin;
            nargv[j++] = "--model";
            nargv[j++] = o.model;
            nargv[j++] = "--coordinator";
            nargv[j++] = coordaddr;
            nargv[j++] = "--cluster-token";
            nargv[j++] = token;
            nargv[j++] = "--name";
            nargv[j++] = name;
            nargv[j++] = "--backend";
            nargv[j++] = o.backend;
            nargv[j++] = "--threads";
            nargv[j++] = sthreads;
            nargv[j++] = "--busy-poll-us";
            nargv[j++] = sbusy;
            if (pin) {
                snprintf(scpu, sizeof(scpu), "%d", cpu++);
                nargv[j++] = "--cpu";
                nargv[j++] = strdup(scpu);
            }
            char trace[PATH_MAX];
            if (o.trace_dir) {
                snprintf(trace, sizeof(trace), "%s/%s.trace.json", o.trace_dir, name);
                nargv[j++] = "--trace-file";
                nargv[j++] = trace;
            }
            char stp[24];
            if (role == 0 && o.ffn_tp > 1) {
                snprintf(stp, sizeof(stp), "%ld", o.ffn_tp);
                nargv[j++] = "--tp";
                nargv[j++] = stp;
            }
            if (role == 0 && o.ffn_devices) {
                nargv[j++] = "--devices";
                nargv[j++] = o.ffn_devices;
            }
            if (role == 1) {
                nargv[j++] = "--a2f-dtype";
                nargv[j++] = o.a2f_dtype;
                nargv[j++] = "--f2a-dtype";
                nargv[j++] = o.f2a_dtype;
                nargv[j++] = "--kv-dtype";
                nargv[j++] = o.kv_dtype;
                nargv[j++] = "--kv-budget-mb";
                nargv[j++] = skv;
                nargv[j++] = "--max-batch-tokens";
                nargv[j++] = smbt;
            }
            nargv[j] = NULL;
            if (spawn(o.log_dir, name, nargv) < 0) {
                stop_all();
                return 1;
            }
        }
    }
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%ld", o.port);
    time_t t0 = time(NULL);
    int ready = 0, status;
    while (!g_stop && time(NULL) - t0 < o.ready_timeout_s) {
        const char *dead = reap_dead(&status);
        if (dead) {
            afd_error("%s exited before the cluster was ready (status %d)", dead,
                      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            stop_all();
            return 1;
        }
        int code;
        char *body;
        if (http_get(url, "/ready", 1000, &code, &body) == 0) {
            free(body);
            if (code == 200) {
                ready = 1;
                break;
            }
        }
        usleep(100000);
    }
    if (!ready) {
        if (!g_stop) afd_error("the cluster was not ready within %ld s", o.ready_timeout_s);
        stop_all();
        return g_stop ? 0 : 1;
    }
    printf("ready: %s\nadmin: http://127.0.0.1:%s\n", url, sadmin);
    fflush(stdout);
    int rc = 0;
    while (!g_stop) {
        const char *dead = reap_dead(&status);
        if (dead) {
            afd_error("%s exited (status %d): stopping the cluster", dead,
                      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            rc = 1;
            break;
        }
        usleep(100000);
    }
    stop_all();
    afd_opts_free(up_table, &o);
    return rc;
}

/* ---- the admin commands ---- */

typedef struct admin_args {
    const char *url, *token;
    int json;
    int all, undrain;
    long timeout_s, node;
} admin_args_t;

/* Exit codes scripts can rely on. */
enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2, EXIT_UNREACHABLE = 3, EXIT_DENIED = 4 };

static const char *cmd_help(const char *cmd)
{
    if (!strcmp(cmd, "status")) return "the cluster, its nodes and the request counts";
    if (!strcmp(cmd, "nodes")) return "every node: role, index, state, KV use, busy time, latency";
    if (!strcmp(cmd, "placement")) return "which FFN node hosts which experts, under which epoch";
    if (!strcmp(cmd, "requests")) return "running and waiting sequences";
    if (!strcmp(cmd, "drain"))
        return "stop admitting requests; in-flight ones finish (--all), or admit again (--undrain)";
    if (!strcmp(cmd, "metrics")) return "the Prometheus metrics, as text";
    if (!strcmp(cmd, "config")) return "the coordinator's effective configuration";
    return NULL;
}

static int admin_parse(const char *cmd, int argc, char **argv, admin_args_t *a)
{
    a->url = getenv("AFD_ADMIN_URL") ? getenv("AFD_ADMIN_URL") : "http://127.0.0.1:8001";
    a->token = getenv("AFD_ADMIN_TOKEN");
    a->json = a->all = a->undrain = 0;
    a->timeout_s = -1;
    a->node = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--url") && i + 1 < argc)
            a->url = argv[++i];
        else if (!strcmp(argv[i], "--token") && i + 1 < argc)
            a->token = argv[++i];
        else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            if (strcmp(argv[i + 1], "json") && strcmp(argv[i + 1], "table")) {
                afd_error("-o takes json or table");
                return EXIT_USAGE;
            }
            a->json = !strcmp(argv[++i], "json");
        } else if (!strcmp(cmd, "drain") && !strcmp(argv[i], "--all"))
            a->all = 1;
        else if (!strcmp(cmd, "drain") && !strcmp(argv[i], "--undrain"))
            a->undrain = 1;
        else if (!strcmp(cmd, "drain") && !strcmp(argv[i], "--timeout") && i + 1 < argc)
            a->timeout_s = atol(argv[++i]);
        else if (!strcmp(cmd, "drain") && argv[i][0] >= '0' && argv[i][0] <= '9')
            a->node = atol(argv[i]);
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: afdctl %s [--url URL] [--token TOKEN] [-o json|table]%s\n  %s\n"
                   "  --url URL      the coordinator's admin API (default $AFD_ADMIN_URL or "
                   "http://127.0.0.1:8001)\n"
                   "  --token TOKEN  the admin token (default $AFD_ADMIN_TOKEN)\n"
                   "  -o json        print the JSON the coordinator returns\n%s"
                   "exit codes: 0 ok, 1 failure, 2 usage, 3 coordinator unreachable, 4 token "
                   "refused\n",
                   cmd, !strcmp(cmd, "drain") ? " (NODE | --all [--timeout S]) [--undrain]" : "",
                   cmd_help(cmd),
                   !strcmp(cmd, "drain")
                       ? "  NODE           an attention node id: it takes no new sequences and "
                         "leaves the data plane once its own are done (then it may be stopped)\n"
                         "  --all          stop admitting; in-flight requests finish\n"
                         "  --timeout S    then end what is left after S seconds\n"
                         "  --undrain      admit requests again\n"
                       : "");
            return -1;
        } else {
            afd_error("unknown argument '%s' (see afdctl %s --help)", argv[i], cmd);
            return EXIT_USAGE;
        }
    }
    if (!strcmp(cmd, "drain") && a->node < 0 && a->all == a->undrain) {
        afd_error("drain needs NODE, --all or --undrain (see afdctl drain --help)");
        return EXIT_USAGE;
    }
    return EXIT_OK;
}

/* GET or POST an admin path; on success *out holds the body. */
static int admin_call(const admin_args_t *a, const char *method, const char *path, const char *body,
                      char **out)
{
    int code;
    if (http_req(method, a->url, path, a->token, body, 10000, &code, out)) {
        afd_error("cannot reach the coordinator's admin API at %s", a->url);
        return EXIT_UNREACHABLE;
    }
    if (code == 401) {
        afd_error("%s refused the admin token (--token or AFD_ADMIN_TOKEN)", a->url);
        free(*out);
        return EXIT_DENIED;
    }
    if (code != 200) {
        afd_error("%s%s answered %d: %s", a->url, path, code, *out);
        free(*out);
        return EXIT_FAIL;
    }
    return EXIT_OK;
}

static const char *jstr(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsString(v) ? v->valuestring : "-";
}

static double jnum(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static void print_nodes(const cJSON *root)
{
    printf("%-4s %-10s %-5s %-14s %-8s %-10s %-6s %-12s %-16s %-8s %-16s %s\n", "ID", "ROLE",
           "INDEX", "NAME", "STATE", "BACKEND", "PLANE", "EXPERTS", "KV USED/TOTAL", "RUNNING",
           "BUSY/WAIT s", "PEER: LATENCY[/ANSWER] (mean us)");
    const cJSON *n;
    cJSON_ArrayForEach(n, cJSON_GetObjectItem(root, "nodes"))
    {
        char experts[32] = "-", kv[32] = "-", run[16] = "-", lat[256] = "", busy[48] = "-",
             backend[32] = "-";
        if (*jstr(n, "backend"))
            snprintf(backend, sizeof(backend), jnum(n, "ranks") > 1 ? "%s x%.0f" : "%s",
                     jstr(n, "backend"), jnum(n, "ranks"));
        const cJSON *e = cJSON_GetObjectItem(n, "experts");
        if (e)
            snprintf(experts, sizeof(experts), "%d..%d", cJSON_GetArrayItem(e, 0)->valueint,
                     cJSON_GetArrayItem(e, 1)->valueint - 1);
        if (cJSON_GetObjectItem(n, "kv_blocks_total"))
            snprintf(kv, sizeof(kv), "%.0f/%.0f", jnum(n, "kv_blocks_used"),
                     jnum(n, "kv_blocks_total"));
        if (cJSON_GetObjectItem(n, "running"))
            snprintf(run, sizeof(run), "%.0f", jnum(n, "running"));
        const cJSON *b = cJSON_GetObjectItem(n, "busy");
        if (b) {
            int is_ffn = !strcmp(jstr(n, "role"), "ffn");
            snprintf(busy, sizeof(busy), "%.1f/%.1f", jnum(b, is_ffn ? "ffn_us" : "attn_us") / 1e6,
                     jnum(b, "wait_us") / 1e6);
        }
        size_t k = 0;
        const cJSON *l;
        cJSON_ArrayForEach(l, cJSON_GetObjectItem(n, "peer_latency")) k += (size_t)snprintf(
            lat + k, sizeof(lat) - k,
            cJSON_GetObjectItem(l, "answer_mean_us") ? "%s%.0f:%.0f/%.0f" : "%s%.0f:%.0f",
            k ? " " : "", jnum(l, "peer"), jnum(l, "mean_us"), jnum(l, "answer_mean_us"));
        printf("%-4.0f %-10s %-5.0f %-14s %-8s %-10s %-6s %-12s %-16s %-8s %-16s %s\n",
               jnum(n, "id"), jstr(n, "role"), jnum(n, "index"), jstr(n, "name"), jstr(n, "state"),
               backend, *jstr(n, "data_plane") ? jstr(n, "data_plane") : "-", experts, kv, run,
               busy, lat);
    }
}

static int cmd_admin(const char *cmd, int argc, char **argv)
{
    admin_args_t a;
    int rc = admin_parse(cmd, argc, argv, &a);
    if (rc < 0) return EXIT_OK; /* --help */
    if (rc) return rc;
    char *body = NULL;
    if (!strcmp(cmd, "metrics")) {
        if ((rc = admin_call(&a, "GET", "/metrics", NULL, &body))) return rc;
        fputs(body, stdout);
        free(body);
        return EXIT_OK;
    }
    if (!strcmp(cmd, "drain")) {
        char req[128];
        if (a.node >= 0)
            snprintf(req, sizeof(req), "{\"node\": %ld, \"undrain\": %s}", a.node,
                     a.undrain ? "true" : "false");
        else if (a.undrain)
            snprintf(req, sizeof(req), "{\"undrain\": true}");
        else if (a.timeout_s >= 0)
            snprintf(req, sizeof(req), "{\"all\": true, \"timeout_s\": %ld}", a.timeout_s);
        else
            snprintf(req, sizeof(req), "{\"all\": true}");
        if ((rc = admin_call(&a, "POST", "/admin/drain", req, &body))) return rc;
    } else {
        const char *path = !strcmp(cmd, "requests") ? "/admin/requests"
                           : !strcmp(cmd, "config") ? "/admin/config"
                                                    : "/admin/status";
        if ((rc = admin_call(&a, "GET", path, NULL, &body))) return rc;
    }
    if (a.json) {
        printf("%s\n", body);
        free(body);
        return EXIT_OK;
    }
    cJSON *root = cJSON_Parse(body);
    free(body);
    if (!root) {
        afd_error("the coordinator's answer is not JSON");
        return EXIT_FAIL;
    }
    if (!strcmp(cmd, "status")) {
        const cJSON *cl = cJSON_GetObjectItem(root, "cluster"),
                    *rq = cJSON_GetObjectItem(root, "requests");
        printf("cluster: %s%s, epoch %.0f, %.0f micro-batches, %.0f steps, model %s\n",
               cJSON_IsTrue(cJSON_GetObjectItem(cl, "ready")) ? "ready" : "NOT READY",
               cJSON_IsTrue(cJSON_GetObjectItem(cl, "draining")) ? " (draining)" : "",
               jnum(cl, "epoch"), jnum(cl, "micro_batches"), jnum(cl, "steps"), jstr(cl, "model"));
        printf("requests: %.0f running, %.0f waiting, %.0f succeeded, %.0f failed\n",
               jnum(rq, "running"), jnum(rq, "waiting"), jnum(rq, "succeeded"), jnum(rq, "failed"));
        print_nodes(root);
    } else if (!strcmp(cmd, "nodes")) {
        print_nodes(root);
    } else if (!strcmp(cmd, "placement")) {
        const cJSON *cl = cJSON_GetObjectItem(root, "cluster");
        printf("epoch %.0f\n%-8s %-6s %-14s %s\n", jnum(cl, "epoch"), "FFN", "NODE", "NAME",
               "EXPERTS");
        const cJSON *n;
        cJSON_ArrayForEach(n, cJSON_GetObjectItem(root, "nodes"))
        {
            const cJSON *e = cJSON_GetObjectItem(n, "experts");
            if (!e) continue;
            printf("%-8.0f %-6.0f %-14s %d..%d\n", jnum(n, "index"), jnum(n, "id"), jstr(n, "name"),
                   cJSON_GetArrayItem(e, 0)->valueint, cJSON_GetArrayItem(e, 1)->valueint - 1);
        }
    } else if (!strcmp(cmd, "requests")) {
        printf("%-16s %-8s %-8s %-6s %-8s %-10s %-8s %s\n", "REQUEST", "SEQ", "STATE", "NODE",
               "PROMPT", "GENERATED", "STREAM", "AGE s");
        const cJSON *r;
        cJSON_ArrayForEach(r, cJSON_GetObjectItem(root, "requests"))
        {
            char node[16] = "-";
            if (cJSON_GetObjectItem(r, "node"))
                snprintf(node, sizeof(node), "%.0f", jnum(r, "node"));
            printf("%-16s %-8.0f %-8s %-6s %-8.0f %-4.0f/%-5.0f %-8s %.1f\n", jstr(r, "request"),
                   jnum(r, "sequence"), jstr(r, "state"), node, jnum(r, "prompt_tokens"),
                   jnum(r, "generated"), jnum(r, "max_tokens"),
                   cJSON_IsTrue(cJSON_GetObjectItem(r, "stream")) ? "yes" : "no", jnum(r, "age_s"));
        }
    } else if (!strcmp(cmd, "config")) {
        const cJSON *o;
        cJSON_ArrayForEach(o, cJSON_GetObjectItem(root, "options"))
            printf("%s = %s\n", o->string, cJSON_IsString(o) ? o->valuestring : "");
    } else if (!strcmp(cmd, "drain") && a.node >= 0) {
        printf("node %.0f: %s, %.0f running%s\n", jnum(root, "node"),
               cJSON_IsTrue(cJSON_GetObjectItem(root, "draining")) ? "draining" : "admitting",
               jnum(root, "running"),
               cJSON_IsTrue(cJSON_GetObjectItem(root, "member")) ? "" : ", out of the data plane");
    } else if (!strcmp(cmd, "drain")) {
        printf("%s: %.0f running, %.0f waiting\n",
               cJSON_IsTrue(cJSON_GetObjectItem(root, "draining")) ? "draining" : "admitting",
               jnum(root, "running"), jnum(root, "waiting"));
    }
    cJSON_Delete(root);
    return EXIT_OK;
}

/* ---- trace-merge ---- */

#define TRACE_MAX_FILE   (1ull << 30)
#define TRACE_MAX_INPUTS 256
#define TRACE_MAX_NAMES  32

/* Merges the nodes' timelines into one Chrome trace and prints, per node, the time its
 * spans cover by name over the span of its timeline. */
static int cmd_trace_merge(int argc, char **argv)
{
    const char *out = NULL;
    const char *in[TRACE_MAX_INPUTS];
    int nin = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            out = argv[++i];
        } else if (!strcmp(argv[i], "--help")) {
            printf("usage: afdctl trace-merge -o OUT.json NODE.trace.json...\n  %s\n",
                   "one Chrome trace of the nodes' timelines (--trace-file, local-up "
                   "--trace-dir), and each node's time by span");
            return EXIT_OK;
        } else if (argv[i][0] == '-' || nin == TRACE_MAX_INPUTS) {
            afd_error("trace-merge: unexpected '%s' (at most %d inputs)", argv[i],
                      TRACE_MAX_INPUTS);
            return EXIT_USAGE;
        } else {
            in[nin++] = argv[i];
        }
    }
    if (!out || !nin) {
        afd_error("usage: afdctl trace-merge -o OUT.json NODE.trace.json...");
        return EXIT_USAGE;
    }
    cJSON *all = cJSON_CreateObject(), *evs = cJSON_AddArrayToObject(all, "traceEvents");
    if (!all || !evs) return EXIT_FAIL;
    cJSON_AddStringToObject(all, "displayTimeUnit", "ms");
    int rc = EXIT_OK;
    for (int f = 0; f < nin; f++) {
        size_t len = 0;
        char *text = NULL;
        cJSON *root = afd_read_file(in[f], TRACE_MAX_FILE, &text, &len) == AFD_OK
                          ? cJSON_ParseWithLength(text, len)
                          : NULL;
        free(text);
        cJSON *list = root ? cJSON_GetObjectItem(root, "traceEvents") : NULL;
        if (!cJSON_IsArray(list)) {
            afd_error("%s: not a trace file (unreadable, over 1 GiB, or no traceEvents)", in[f]);
            cJSON_Delete(root);
            rc = EXIT_FAIL;
            continue;
        }
        const char *names[TRACE_MAX_NAMES];
        double tot[TRACE_MAX_NAMES] = {0}, lo = -1, hi = -1;
        int nn = 0;
        const char *proc = in[f];
        cJSON *e;
        while ((e = cJSON_DetachItemFromArray(list, 0))) {
            const cJSON *ph = cJSON_GetObjectItem(e, "ph"), *nm = cJSON_GetObjectItem(e, "name");
            const cJSON *ts = cJSON_GetObjectItem(e, "ts"), *du = cJSON_GetObjectItem(e, "dur");
            if (cJSON_IsString(ph) && !strcmp(ph->valuestring, "M")) {
                const cJSON *args = cJSON_GetObjectItem(e, "args");
                const cJSON *pn = args ? cJSON_GetObjectItem(args, "name") : NULL;
                if (cJSON_IsString(pn)) proc = pn->valuestring;
            } else if (cJSON_IsString(ph) && !strcmp(ph->valuestring, "X") && cJSON_IsString(nm) &&
                       cJSON_IsNumber(ts) && cJSON_IsNumber(du)) {
                int k = 0;
                while (k < nn && strcmp(names[k], nm->valuestring))
                    k++;
                if (k == nn && nn < TRACE_MAX_NAMES) names[nn++] = nm->valuestring;
                if (k < nn) tot[k] += du->valuedouble;
                if (lo < 0 || ts->valuedouble < lo) lo = ts->valuedouble;
                if (ts->valuedouble + du->valuedouble > hi) hi = ts->valuedouble + du->valuedouble;
            }
            cJSON_AddItemToArray(evs, e); /* names stay valid: the item moved, not copied */
        }
        double span = hi > lo ? hi - lo : 0;
        printf("%s (%s): %.3f s of timeline\n", proc, in[f], span / 1e6);
        for (int k = 0; k < nn; k++)
            printf("  %-16s %10.3f s  %5.1f%%\n", names[k], tot[k] / 1e6,
                   span > 0 ? 100 * tot[k] / span : 0);
        cJSON_Delete(root);
    }
    char *txt = cJSON_PrintUnformatted(all);
    FILE *fp = txt ? fopen(out, "w") : NULL;
    int bad = !fp || fputs(txt, fp) < 0;
    if (fp && fclose(fp) != 0) bad = 1;
    if (bad) {
        afd_error("%s: cannot write", out);
        rc = EXIT_FAIL;
    }
    free(txt);
    cJSON_Delete(all);
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: afdctl COMMAND [options]   (afdctl COMMAND --help for each)\n\n"
               "commands:\n"
               "  local-up     start a whole cluster on loopback\n"
               "  trace-merge  one timeline from the nodes' trace files\n");
    static const char *cmds[] = {"status", "nodes",   "placement", "requests",
                                 "drain",  "metrics", "config"};
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        fprintf(f, "  %-12s %s\n", cmds[i], cmd_help(cmds[i]));
    fprintf(f,
            "exit codes: 0 ok, 1 failure, 2 usage, 3 coordinator unreachable, 4 token refused\n");
}

int main(int argc, char **argv)
{
    afd_log_init("afdctl");
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (!strcmp(argv[1], "local-up")) return cmd_local_up(argc - 1, argv + 1);
    if (!strcmp(argv[1], "trace-merge")) return cmd_trace_merge(argc - 1, argv + 1);
    if (cmd_help(argv[1])) return cmd_admin(argv[1], argc - 1, argv + 1);
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return EXIT_OK;
    }
    afd_error("unknown command '%s'", argv[1]);
    usage(stderr);
    return EXIT_USAGE;
}
