/*
 * coord: the AFD coordinator's shared state. One libuv loop runs everything:
 * the control-plane server the nodes join (coord_nodes.c), the scheduler that
 * admits requests and sends step plans ahead (coord_sched.c), and the HTTP API
 * (coord_api.c).
 */
#ifndef COORD_H
#define COORD_H

#include "afd.pb-c.h"
#include "afd_opts.h"
#include "coord_metrics.h"
#include "mdl_config.h"
#include "net_frame.h"
#include "net_http.h"
#include "tok.h"

#include <stdint.h>
#include <uv.h>

#ifndef AFD_VERSION
#define AFD_VERSION "0.1.0"
#endif

#define COORD_MAX_NODES      256
#define COORD_MAX_PLAN_AHEAD 4
#define COORD_MAX_RECOVERIES 3 /* node losses one sequence is recomputed after */

typedef struct coord_opts {
    char *host, *cluster_token, *model, *model_name, *micro_batches, *api_key, *api_keys_file,
        *admin_token, *tokenizer;
    long port, ctrl_port, attn, ffn, plan_ahead, max_waiting, max_running, max_body_kb, max_prompt,
        node_timeout_ms, default_max_tokens, drain_timeout_s, request_timeout_s, admin_port,
        recovery_timeout_s;
    double kv_overcommit;
} coord_opts_t;

enum coord_node_state { NODE_FREE = 0, NODE_HELLO, NODE_READY, NODE_CONNECTED };

typedef struct coord_node {
    int state;
    uint32_t id;
    Afd__Role role;
    int index; /* attention index or FFN share */
    char name[64];
    uv_tcp_t tcp;
    int open; /* tcp handle initialised and not yet closed */
    net_frame_reader_t rd;
    uint8_t *ucx_addr;
    size_t ucx_len;
    uint32_t epoch_connected;
    uint64_t kv_blocks, kv_reserved;
    uint32_t kv_block_size, max_batch_tokens, max_seqs; /* max_seqs: the node's --max-seqs */
    char backend[16]; /* what it computes on, as it says (letters, digits, '-') */
    uint32_t ranks;   /* its tensor-parallel ranks (1 when it did not say) */
    int running;      /* sequences placed on it */
    uint64_t last_seen_us;
    Afd__Heartbeat *last_hb;
    uint32_t expert_begin, expert_end;
    int member;  /* in the current epoch's peer table */
    int drained; /* attention node: admits no new sequences; leaves the data plane
                  * once its sequences are done */
    struct coord *c;
} coord_node_t;

typedef struct coord_seq {
    uint64_t id;
    struct coord_req *req;
    int choice;
    int node; /* attention node slot, -1 while waiting */
    int nblocks;
    int32_t *out; /* generated ids */
    float *lp;
    int32_t *top_ids; /* (max_tokens, logprobs) */
    float *top_lp;
    int ngen, done;
    uint64_t t_last_us; /* when its last token arrived */
    int32_t *resume;    /* after a preemption: prompt + tokens so far, re-admitted as a prompt */
    int resume_len;
    Afd__Sampling resume_sp;   /* the request's sampling with the tokens still to go */
    int recoveries;            /* times a node loss sent it back to the queue */
    uint64_t recover_until_us; /* waiting after a node loss: ends with recover_error then */
    char *recover_error;
    const char *finish;
    char *error;
    struct coord_seq *next_wait;
    tok_stream_t *ts; /* the generated text, when a tokenizer is loaded */
    int stop_hit;     /* a stop string ended the text: finish_reason "stop" */
} coord_seq_t;

enum coord_api_kind { COORD_API_COMPLETIONS = 0, COORD_API_CHAT = 1, COORD_API_MESSAGES = 2 };

typedef struct coord_req {
    uint64_t id;
    int api;              /* enum coord_api_kind: how tokens and answers are rendered */
    net_http_req_t *http; /* NULL once the client is gone or answered */
    int stream, logprobs, nseq, ndone, aborted, failed, finished;
    int32_t **prompts;
    int *prompt_len;
    Afd__Sampling sp;
    int32_t *stop_ids;
    coord_seq_t *seqs;
    char *stops[TOK_MAX_STOPS]; /* stop strings */
    int nstops;
    int stop_pending; /* a sequence met a stop string: end it outside the token callback */
    uint64_t created, t_arrival_us, t_first_us;
    struct coord_req *next;
} coord_req_t;

typedef struct coord {
    coord_opts_t o;
    uv_loop_t *loop;
    mdl_config_t cfg;
    uv_tcp_t ctrl;
    uv_timer_t tick;
    net_http_server_t *http;  /* the API: /v1/..., /health, /ready, /metrics */
    net_http_server_t *admin; /* the admin API afdctl uses, with its own token */
    char **api_keys;          /* accepted API keys (none: the API is open) */
    int napi_keys;
    coord_node_t nodes[COORD_MAX_NODES];
    uint32_t next_node_id;
    uint32_t epoch;
    int ready;
    int formed;   /* the cluster has served once: membership may change since */
    int reconfig; /* a new epoch is due: no new plans until none is in flight */
    int micro_batches;
    int mb_auto; /* --micro-batches auto: refined from measured stage times */
    uint64_t auto_ffn_us, auto_units, auto_last_us;
    /* scheduler */
    coord_req_t *reqs; /* all live requests */
    coord_seq_t *wait_head, *wait_tail;
    int nwaiting, nrunning;
    uint64_t next_seq_id, next_req_id;
    uint64_t next_step; /* next plan to send */
    uint64_t inflight[COORD_MAX_PLAN_AHEAD];
    int inflight_results[COORD_MAX_PLAN_AHEAD];
    uint64_t inflight_sent_us[COORD_MAX_PLAN_AHEAD];
    int ninflight;
    uint64_t *aborts[COORD_MAX_NODES];
    int naborts[COORD_MAX_NODES];
    coord_metrics_t metrics;
    tok_t *tok;            /* NULL: no tokenizer, token ids only */
    tok_chat_t chat;       /* tokenizer_config.json: the chat template (tmpl NULL: none) */
    int32_t bos_id;        /* prepended to text prompts when add_bos_token; -1: none */
    uv_timer_t stop_timer; /* ends sequences that met a stop string */
    int draining;          /* SIGTERM or drain: no new requests; in-flight ones finish */
    uint64_t drain_deadline_us;
    int stop_after_drain; /* leave the loop once drained (SIGTERM) */
    /* stats */
    uint64_t steps_done, req_ok, req_err, step_us_sum, sched_us_sum;
    double last_step_ms;
} coord_t;

/* coord_nodes.c */
afd_status_t coord_nodes_listen(coord_t *c);
void coord_nodes_send(coord_node_t *n, Afd__Frame *f);
void coord_nodes_check_timeouts(coord_t *c);
/* Publishes a new epoch's peer table to its members (every ready node but drained attention
 * nodes with nothing running) when the FFN shares are complete and an attention node
 * remains; returns 1 when it did. */
int coord_nodes_publish(coord_t *c);

/* coord_sched.c */
void coord_sched_kick(coord_t *c);
void coord_sched_on_result(coord_t *c, coord_node_t *n, const Afd__StepResult *r);
void coord_sched_node_lost(coord_t *c, coord_node_t *n, const char *why);
void coord_sched_abort_req(coord_t *c, coord_req_t *r);
/* Ends one running or waiting sequence at once with `finish` (a static string). */
void coord_sched_abort_seq(coord_t *c, coord_seq_t *s, const char *finish);
/* Ends every live request with an explicit error (drain timeout, shutdown). */
void coord_sched_abort_all(coord_t *c, const char *why);
/* Ends the requests older than the per-request timeout. */
void coord_sched_expire(coord_t *c);
/* Frees the requests that are answered and done. */
void coord_sched_reap(coord_t *c);
afd_status_t coord_sched_submit(coord_t *c, coord_req_t *r, const char **why);

/* coord_api.c */
void coord_api_handle(void *arg, net_http_req_t *req);
void coord_admin_handle(void *arg, net_http_req_t *req);
/* Loads the API keys from --api-key, AFD_API_KEY and --api-keys-file (one per line). */
afd_status_t coord_api_keys_load(coord_t *c);
void coord_api_token(coord_t *c, coord_req_t *r, coord_seq_t *s);
void coord_api_finish(coord_t *c, coord_req_t *r);
void coord_req_free(coord_req_t *r);

uint64_t coord_now_us(void);

#endif
