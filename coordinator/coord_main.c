/*
 * afd_coordinator: the AFD cluster's coordinator daemon. One libuv event loop:
 * nodes join over the control plane, clients use the OpenAI-compatible HTTP API,
 * and the scheduler pipelines step plans to the attention nodes.
 */
#define _GNU_SOURCE
#include "coord.h"
#include "afd_log.h"
#include "afd_plan.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define O(f) offsetof(coord_opts_t, f)
const afd_opt_t coord_table[] = {
    {"host", AFD_OPT_STRING, "127.0.0.1", O(host), 0, 0, 0, "address to listen on"},
    {"port", AFD_OPT_INT, "8000", O(port), 0, 65535, 0, "HTTP API port (0: any)"},
    {"ctrl-port", AFD_OPT_INT, "7000", O(ctrl_port), 1, 65535, 0, "control-plane port for nodes"},
    {"cluster-token", AFD_OPT_STRING, NULL, O(cluster_token), 0, 0, AFD_OPT_SECRET,
     "token nodes must present to join (required)"},
    {"api-key", AFD_OPT_STRING, NULL, O(api_key), 0, 0, AFD_OPT_SECRET,
     "an API key clients send as 'Authorization: Bearer KEY' (no key at all: the API is open)"},
    {"api-keys-file", AFD_OPT_STRING, NULL, O(api_keys_file), 0, 0, 0,
     "a file of API keys, one per line ('#' comments)"},
    {"admin-port", AFD_OPT_INT, "8001", O(admin_port), 0, 65535, 0,
     "admin API port (afdctl; 0: any)"},
    {"admin-token", AFD_OPT_STRING, NULL, O(admin_token), 0, 0, AFD_OPT_SECRET,
     "token the admin API requires as 'Authorization: Bearer TOKEN' (none: open)"},
    {"model", AFD_OPT_STRING, NULL, O(model), 0, 0, 0,
     "checkpoint directory (its config.json bounds requests) (required)"},
    {"model-name", AFD_OPT_STRING, "step3", O(model_name), 0, 0, 0, "the name /v1/models shows"},
    {"tokenizer", AFD_OPT_STRING, "auto", O(tokenizer), 0, 0, 0,
     "tokenizer.json (or its directory, with tokenizer_config.json for the chat template) for "
     "text prompts and answers; auto: the model directory's when it has one; none: token ids "
     "only"},
    {"attn", AFD_OPT_INT, "1", O(attn), 1, 128, 0, "attention nodes the cluster needs"},
    {"ffn", AFD_OPT_INT, "1", O(ffn), 1, 128, 0, "FFN nodes the cluster needs"},
    {"micro-batches", AFD_OPT_STRING, "3", O(micro_batches), 0, 0, 0,
     "micro-batches per step: 1..8, or auto"},
    {"plan-ahead", AFD_OPT_INT, "2", O(plan_ahead), 1, COORD_MAX_PLAN_AHEAD, 0,
     "step plans in flight"},
    {"max-waiting", AFD_OPT_INT, "4096", O(max_waiting), 1, 1 << 20, 0,
     "waiting sequences before 429"},
    {"max-running", AFD_OPT_INT, "1024", O(max_running), 1, 1 << 20, 0,
     "running sequences per attention node"},
    {"max-prompt", AFD_OPT_INT, "32768", O(max_prompt), 1, 1 << 24, 0, "prompt tokens at most"},
    {"max-body-kb", AFD_OPT_INT, "8192", O(max_body_kb), 1, 1 << 20, 0, "request body limit"},
    {"default-max-tokens", AFD_OPT_INT, "16", O(default_max_tokens), 1, 1 << 20, 0,
     "max_tokens when a request has none"},
    {"node-timeout-ms", AFD_OPT_INT, "10000", O(node_timeout_ms), 100, 3600000, 0,
     "a node silent this long is dropped"},
    {"drain-timeout-s", AFD_OPT_INT, "30", O(drain_timeout_s), 0, 86400, 0,
     "on SIGTERM: finish in-flight requests for up to this long, then end the rest with an "
     "error and exit"},
    {"kv-overcommit", AFD_OPT_DOUBLE, "1", O(kv_overcommit), 1, 64, 0,
     "admit up to this many times the KV blocks prompt + max_tokens would need; when a node "
     "runs out, its latest sequences are preempted and recomputed later (1: never preempt)"},
    {"request-timeout-s", AFD_OPT_INT, "0", O(request_timeout_s), 0, 86400 * 7, 0,
     "end a request still running after this long with an error (0: never)"},
    {"recovery-timeout-s", AFD_OPT_INT, "60", O(recovery_timeout_s), 0, 3600, 0,
     "sequences running when a node is lost are recomputed once the cluster is whole again; "
     "those still waiting after this long end with the error (0: end them at once)"},
    AFD_OPTS_END};
#undef O

/*
 * --micro-batches auto: every few seconds, m = ceil(2 (1 + T_c / T_f)) from the nodes'
 * heartbeats: T_f is the FFN busy time per (layer, micro-batch) of the last window, T_c the
 * mean one-way F2A latency the attention nodes see.
 */
static void auto_micro_batches(coord_t *c)
{
    uint64_t now = coord_now_us();
    if (!c->mb_auto || !c->ready || now - c->auto_last_us < 2000000) return;
    uint64_t ffn_us = 0, steps = 0, lat_sum = 0, lat_n = 0;
    int nffn = 0;
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state != NODE_CONNECTED || !n->last_hb || !n->last_hb->stats) continue;
        const Afd__NodeStats *st = n->last_hb->stats;
        if (n->role == AFD__ROLE__ROLE_FFN) {
            ffn_us += st->busy ? st->busy->ffn_us : 0;
            nffn++;
        } else {
            if (st->steps > steps) steps = st->steps;
            for (size_t k = 0; k < st->n_peer_latency; k++) {
                lat_sum += st->peer_latency[k]->sum_us;
                lat_n += st->peer_latency[k]->count;
            }
        }
    }
    if (!nffn) return;
    ffn_us /= (uint64_t)nffn;
    uint64_t units = steps * (uint64_t)c->cfg.num_layers * (uint64_t)c->micro_batches;
    if (units > c->auto_units + 10 * (uint64_t)c->cfg.num_layers && ffn_us > c->auto_ffn_us) {
        double tf = (double)(ffn_us - c->auto_ffn_us) / (double)(units - c->auto_units);
        double tc = lat_n ? (double)lat_sum / (double)lat_n : 0;
        int m = afd_plan_micro_batches(tc, tf, 2, 4);
        if (m != c->micro_batches)
            afd_info("micro-batches %d -> %d (FFN %.0f us, transfer %.0f us per micro-batch)",
                     c->micro_batches, m, tf, tc);
        c->micro_batches = m;
    }
    c->auto_ffn_us = ffn_us;
    c->auto_units = units;
    c->auto_last_us = now;
}

/* Draining: finished when nothing is in flight; at the deadline the rest ends with an
 * error, and the loop stops once those answers are written. */
static void drain_tick(coord_t *c)
{
    if (!c->draining) return;
    if (c->nrunning == 0 && c->nwaiting == 0 && !c->reqs) {
        if (c->stop_after_drain) {
            afd_info("drained: exiting");
            uv_stop(c->loop);
        }
        return;
    }
    if (c->drain_deadline_us && coord_now_us() > c->drain_deadline_us) {
        afd_warn("drain timeout: ending %d running and %d waiting sequences", c->nrunning,
                 c->nwaiting);
        coord_sched_abort_all(c, "the server is shutting down (drain timeout)");
        c->drain_deadline_us = 0;
    }
}

/* The tokenizer and chat template: --tokenizer, or the model directory's (auto). */
static afd_status_t load_tokenizer(coord_t *c)
{
    char path[4096], cfg[4096];
    struct stat sb;
    const char *opt = c->o.tokenizer ? c->o.tokenizer : "auto";
    c->bos_id = -1;
    if (!strcmp(opt, "none")) {
        afd_info("no tokenizer (--tokenizer none): token ids only");
        return AFD_OK;
    }
    int is_auto = !strcmp(opt, "auto");
    const char *base = is_auto ? c->o.model : opt;
    if (is_auto || (stat(base, &sb) == 0 && S_ISDIR(sb.st_mode)))
        snprintf(path, sizeof(path), "%s/tokenizer.json", base);
    else
        snprintf(path, sizeof(path), "%s", base);
    if (is_auto && stat(path, &sb) != 0) {
        afd_info("%s: none: token ids only", path);
        return AFD_OK;
    }
    afd_status_t st = tok_load(path, &c->tok);
    if (st) return st;
    if (tok_vocab_size(c->tok) > c->cfg.vocab_size) {
        afd_error("%s: %d token ids, more than the model's vocab_size %d", path,
                  tok_vocab_size(c->tok), c->cfg.vocab_size);
        return AFD_ERR_RANGE;
    }
    /* tokenizer_config.json beside it */
    snprintf(cfg, sizeof(cfg), "%s", path);
    char *slash = strrchr(cfg, '/');
    snprintf(slash ? slash + 1 : cfg, sizeof(cfg) - (size_t)(slash ? slash + 1 - cfg : 0),
             "tokenizer_config.json");
    if (stat(cfg, &sb) == 0) {
        if ((st = tok_chat_load(cfg, &c->chat))) return st;
        if (c->chat.add_bos_token && c->chat.bos_token)
            c->bos_id = tok_token_id(c->tok, c->chat.bos_token);
    }
    afd_info("tokenizer %s: %d ids; chat template: %s", path, tok_vocab_size(c->tok),
             c->chat.tmpl ? "yes" : "none (chat needs token-id content)");
    return AFD_OK;
}

static void on_tick(uv_timer_t *t)
{
    coord_t *c = t->data;
    auto_micro_batches(c);
    coord_sched_expire(c);
    drain_tick(c);
    coord_nodes_check_timeouts(c);
    coord_sched_reap(c);
    coord_sched_kick(c);
}

static uv_signal_t g_sigint, g_sigterm;
/* The first SIGTERM/SIGINT drains (no new requests; in-flight ones finish within
 * --drain-timeout-s), a second one stops at once. */
static void on_signal(uv_signal_t *s, int sig)
{
    coord_t *c = s->data;
    if (c->draining && c->stop_after_drain) {
        afd_info("signal %d again: stopping now", sig);
        coord_sched_abort_all(c, "the server is shutting down");
        uv_stop(s->loop);
        return;
    }
    afd_info("signal %d: draining (%d running, %d waiting; at most %ld s)", sig, c->nrunning,
             c->nwaiting, c->o.drain_timeout_s);
    c->draining = 1;
    c->stop_after_drain = 1;
    c->drain_deadline_us = coord_now_us() + (uint64_t)c->o.drain_timeout_s * 1000000u + 1;
    drain_tick(c);
}

int main(int argc, char **argv)
{
    afd_log_init("afd_coordinator");
    static coord_t c;
    int first;
    afd_status_t st = afd_opts_parse(coord_table, &c.o, argc, argv,
                                     "usage: afd_coordinator --model DIR --cluster-token T "
                                     "[--attn N --ffn M] [options]",
                                     &first);
    if (st == AFD_ERR_CANCELED) return 0;
    if (st) return 2;
    if (!c.o.cluster_token || !c.o.cluster_token[0] || !c.o.model) {
        afd_error("--cluster-token and --model are required");
        return 2;
    }
    if (!strcmp(c.o.micro_batches, "auto")) {
        c.micro_batches = 3; /* refined from measured stage times as steps run */
        c.mb_auto = 1;
    } else {
        char *end;
        long m = strtol(c.o.micro_batches, &end, 10);
        if (*end || m < 1 || m > 8) {
            afd_error("--micro-batches must be 1..8 or auto");
            return 2;
        }
        c.micro_batches = (int)m;
    }
    if (mdl_config_load(c.o.model, &c.cfg)) return 1;
    if (load_tokenizer(&c)) return 1;
    coord_metrics_init(&c.metrics);
    if (c.o.ffn > c.cfg.num_experts && c.cfg.num_experts > 0) {
        afd_error("--ffn %ld: more FFN nodes than experts (%d)", c.o.ffn, c.cfg.num_experts);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    c.loop = uv_default_loop();
    if (coord_nodes_listen(&c)) return 1;
    net_http_limits_t lim = {.max_header_bytes = 16384,
                             .max_headers = 64,
                             .max_body = (size_t)c.o.max_body_kb << 10,
                             .max_conns = 4096,
                             .idle_timeout_ms = 120000};
    if (net_http_server_create(c.loop, c.o.host, (int)c.o.port, &lim, coord_api_handle, &c,
                               &c.http))
        return 1;
    if (coord_api_keys_load(&c)) return 2;
    if (net_http_server_create(c.loop, c.o.host, (int)c.o.admin_port, &lim, coord_admin_handle, &c,
                               &c.admin))
        return 1;
    if (!c.o.admin_token || !c.o.admin_token[0])
        afd_warn("the admin API on port %d has no token (--admin-token)", net_http_port(c.admin));
    uv_timer_init(c.loop, &c.stop_timer);
    c.stop_timer.data = &c;
    uv_timer_init(c.loop, &c.tick);
    c.tick.data = &c;
    uv_timer_start(&c.tick, on_tick, 200, 200);
    uv_signal_init(c.loop, &g_sigint);
    uv_signal_init(c.loop, &g_sigterm);
    g_sigint.data = g_sigterm.data = &c;
    uv_signal_start(&g_sigint, on_signal, SIGINT);
    uv_signal_start(&g_sigterm, on_signal, SIGTERM);
    afd_info("listening: API http://%s:%d, admin http://%s:%d, nodes on port %ld; waiting for "
             "%ld attention + %ld FFN nodes",
             c.o.host, net_http_port(c.http), c.o.host, net_http_port(c.admin), c.o.ctrl_port,
             c.o.attn, c.o.ffn);
    uv_run(c.loop, UV_RUN_DEFAULT);
    /* let the last answers (aborts included) reach their clients */
    for (int i = 0; i < 20; i++)
        uv_run(c.loop, UV_RUN_NOWAIT);
    net_http_server_close(c.http);
    net_http_server_close(c.admin);
    uv_close((uv_handle_t *)&c.ctrl, NULL);
    uv_close((uv_handle_t *)&c.tick, NULL);
    uv_close((uv_handle_t *)&c.stop_timer, NULL);
    uv_close((uv_handle_t *)&g_sigint, NULL);
    uv_close((uv_handle_t *)&g_sigterm, NULL);
    for (int i = 0; i < COORD_MAX_NODES; i++)
        if (c.nodes[i].open && !uv_is_closing((uv_handle_t *)&c.nodes[i].tcp))
            uv_close((uv_handle_t *)&c.nodes[i].tcp, NULL);
    uv_run(c.loop, UV_RUN_DEFAULT);
    afd_opts_free(coord_table, &c.o);
    tok_chat_fini(&c.chat);
    tok_free(c.tok);
    return 0;
}
