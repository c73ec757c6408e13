/*
 * mkseeds: writes the binary seed inputs of the fuzz targets (control-plane frames and
 * node sessions, data-plane messages, small safetensors files) under DIR/frame, DIR/ctrl,
 * DIR/wire and DIR/safetensors, with the encoders the daemons use. Usage: mkseeds DIR
 */
#define _GNU_SOURCE
#include "afd_dtype.h"
#include "afd_log.h"
#include "net_frame.h"
#include "net_wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int write_file(const char *dir, const char *sub, const char *name, const void *a,
                      size_t alen, const void *b, size_t blen)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, sub);
    mkdir(path, 0755);
    snprintf(path, sizeof(path), "%s/%s/%s", dir, sub, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(a, 1, alen, f) != alen || (blen && fwrite(b, 1, blen, f) != blen)) {
        afd_error("%s: %m", path);
        if (f) fclose(f);
        return -1;
    }
    return fclose(f) == 0 ? 0 : -1;
}

static int frame_seed(const char *dir, const char *name, Afd__Frame *f, int copies)
{
    uint8_t *b;
    size_t n;
    if (net_frame_encode(f, &b, &n)) return -1;
    uint8_t *all = malloc(n * (size_t)copies);
    if (!all) return -1;
    for (int i = 0; i < copies; i++)
        memcpy(all + n * (size_t)i, b, n);
    int rc = write_file(dir, "frame", name, all, n * (size_t)copies, NULL, 0);
    free(all);
    free(b);
    return rc;
}

static int frames(const char *dir)
{
    int rc = 0;
    Afd__Frame f = AFD__FRAME__INIT;

    Afd__Hello hello = AFD__HELLO__INIT;
    hello.protocol = 1;
    hello.cluster_token = "secret";
    hello.role = AFD__ROLE__ROLE_ATTN;
    hello.name = "node-0:1234";
    hello.model_id = "tiny-bf16";
    hello.pid = 1234;
    hello.kv_blocks = 512;
    hello.kv_block_size = 16;
    hello.max_batch_tokens = 256;
    f.body_case = AFD__FRAME__BODY_HELLO;
    f.hello = &hello;
    rc |= frame_seed(dir, "hello", &f, 1);

    Afd__Welcome wel = AFD__WELCOME__INIT;
    wel.node_id = 3;
    wel.epoch = 2;
    wel.ffn_count = 2;
    wel.expert_begin = 4;
    wel.expert_end = 8;
    wel.num_layers = 4;
    f.body_case = AFD__FRAME__BODY_WELCOME;
    f.welcome = &wel;
    rc |= frame_seed(dir, "welcome", &f, 1);

    uint8_t addr[24] = {1, 2, 3, 4, 5, 6, 7, 8};
    Afd__Ready ready = AFD__READY__INIT;
    ready.ucx_address.data = addr;
    ready.ucx_address.len = sizeof(addr);
    f.body_case = AFD__FRAME__BODY_READY;
    f.ready = &ready;
    rc |= frame_seed(dir, "ready", &f, 1);

    Afd__Peer p0 = AFD__PEER__INIT, p1 = AFD__PEER__INIT;
    p0.node_id = 1;
    p0.role = AFD__ROLE__ROLE_ATTN;
    p0.ucx_address = ready.ucx_address;
    p1.node_id = 2;
    p1.role = AFD__ROLE__ROLE_FFN;
    p1.expert_end = 8;
    p1.ucx_address = ready.ucx_address;
    Afd__Peer *peers[] = {&p0, &p1};
    Afd__PeerTable pt = AFD__PEER_TABLE__INIT;
    pt.epoch = 1;
    pt.n_peers = 2;
    pt.peers = peers;
    pt.num_attn = 1;
    pt.num_ffn = 1;
    f.body_case = AFD__FRAME__BODY_PEERS;
    f.peers = &pt;
    rc |= frame_seed(dir, "peers", &f, 1);

    Afd__Connected con = AFD__CONNECTED__INIT;
    con.epoch = 1;
    f.body_case = AFD__FRAME__BODY_CONNECTED;
    f.connected = &con;
    rc |= frame_seed(dir, "connected_x3", &f, 3);

    int32_t prompt[] = {0, 5, 9, 17};
    int32_t stops[] = {1};
    Afd__Sampling sp = AFD__SAMPLING__INIT;
    sp.temperature = 0.7f;
    sp.top_p = 0.9f;
    sp.top_k = 5;
    sp.seed = 42;
    sp.max_tokens = 8;
    sp.n_stop_token_ids = 1;
    sp.stop_token_ids = stops;
    Afd__SeqAdmit adm = AFD__SEQ_ADMIT__INIT;
    adm.seq_id = 7;
    adm.n_prompt = 4;
    adm.prompt = prompt;
    adm.sampling = &sp;
    Afd__SeqAdmit *admits[] = {&adm};
    uint64_t aborts[] = {3, 4};
    Afd__StepPlan plan = AFD__STEP_PLAN__INIT;
    plan.step = 100;
    plan.micro_batches = 2;
    plan.epoch = 1;
    plan.n_admit = 1;
    plan.admit = admits;
    plan.n_abort = 2;
    plan.abort = aborts;
    f.body_case = AFD__FRAME__BODY_PLAN;
    f.plan = &plan;
    rc |= frame_seed(dir, "plan", &f, 1);

    int32_t top_ids[] = {5, 6};
    float top_lp[] = {-0.1f, -2.5f};
    Afd__SeqToken tok = AFD__SEQ_TOKEN__INIT;
    tok.seq_id = 7;
    tok.token = 5;
    tok.logprob = -0.1f;
    tok.n_top_ids = 2;
    tok.top_ids = top_ids;
    tok.n_top_logprobs = 2;
    tok.top_logprobs = top_lp;
    tok.finish = AFD__FINISH__FINISH_LENGTH;
    tok.prompt_tokens = 4;
    Afd__SeqToken *toks[] = {&tok};
    Afd__StageTimes times = AFD__STAGE_TIMES__INIT;
    times.attn_us = 10;
    times.ffn_us = 20;
    times.step_us = 40;
    Afd__StepResult res = AFD__STEP_RESULT__INIT;
    res.step = 100;
    res.n_tokens = 1;
    res.tokens = toks;
    res.times = &times;
    res.tokens_in_step = 1;
    f.body_case = AFD__FRAME__BODY_RESULT;
    f.result = &res;
    rc |= frame_seed(dir, "result", &f, 1);

    uint64_t buckets[] = {0, 3, 9, 1};
    Afd__LatencyHist lh = AFD__LATENCY_HIST__INIT;
    lh.peer_id = 2;
    lh.n_buckets = 4;
    lh.buckets = buckets;
    lh.count = 13;
    lh.sum_us = 1000;
    Afd__LatencyHist *lhs[] = {&lh};
    Afd__NodeStats ns = AFD__NODE_STATS__INIT;
    ns.kv_blocks_used = 10;
    ns.kv_blocks_total = 512;
    ns.running = 2;
    ns.busy = &times;
    ns.n_peer_latency = 1;
    ns.peer_latency = lhs;
    Afd__Heartbeat hb = AFD__HEARTBEAT__INIT;
    hb.time_us = 123456789;
    hb.stats = &ns;
    f.body_case = AFD__FRAME__BODY_HEARTBEAT;
    f.heartbeat = &hb;
    rc |= frame_seed(dir, "heartbeat", &f, 1);
    return rc;
}

/* A control-plane session of an attention node and an FFN node, frames interleaved in the
 * order fuzz_ctrl deals them (even frames to the first connection, odd to the second). */
static int ctrl_session(const char *dir, const char *name, const char *token, int nframes)
{
    uint8_t addr[16] = {9, 8, 7, 6};
    Afd__Hello ha = AFD__HELLO__INIT, hf = AFD__HELLO__INIT;
    ha.protocol = hf.protocol = 1;
    ha.cluster_token = hf.cluster_token = (char *)token;
    ha.role = AFD__ROLE__ROLE_ATTN;
    ha.name = "attn-0";
    ha.kv_blocks = 64;
    ha.kv_block_size = 16;
    ha.max_batch_tokens = 256;
    hf.role = AFD__ROLE__ROLE_FFN;
    hf.name = "ffn-0";
    hf.ffn_share_held = 1;
    hf.ffn_share_count = 1;
    Afd__Ready rd = AFD__READY__INIT;
    rd.ucx_address.data = addr;
    rd.ucx_address.len = sizeof(addr);
    Afd__Connected con = AFD__CONNECTED__INIT;
    con.epoch = 1;
    Afd__StageTimes times = AFD__STAGE_TIMES__INIT;
    times.step_us = 5;
    Afd__NodeStats ns = AFD__NODE_STATS__INIT;
    ns.busy = &times;
    Afd__Heartbeat hb = AFD__HEARTBEAT__INIT;
    hb.time_us = 1;
    hb.stats = &ns;
    Afd__StepResult res = AFD__STEP_RESULT__INIT;
    res.step = 1;
    res.times = &times;
    Afd__Frame fr[10];
    for (int i = 0; i < 10; i++)
        afd__frame__init(&fr[i]);
    fr[0].body_case = AFD__FRAME__BODY_HELLO;
    fr[0].hello = &ha;
    fr[1].body_case = AFD__FRAME__BODY_HELLO;
    fr[1].hello = &hf;
    fr[2].body_case = fr[3].body_case = AFD__FRAME__BODY_READY;
    fr[2].ready = fr[3].ready = &rd;
    fr[4].body_case = fr[5].body_case = AFD__FRAME__BODY_CONNECTED;
    fr[4].connected = fr[5].connected = &con;
    fr[6].body_case = fr[7].body_case = AFD__FRAME__BODY_HEARTBEAT;
    fr[6].heartbeat = fr[7].heartbeat = &hb;
    fr[8].body_case = AFD__FRAME__BODY_RESULT;
    fr[8].result = &res;
    fr[9].body_case = AFD__FRAME__BODY_HELLO; /* a second hello */
    fr[9].hello = &hf;
    uint8_t *all = NULL;
    size_t total = 0;
    for (int i = 0; i < nframes && i < 10; i++) {
        uint8_t *b;
        size_t n;
        if (net_frame_encode(&fr[i], &b, &n)) return -1;
        uint8_t *na = realloc(all, total + n);
        if (!na) return -1;
        all = na;
        memcpy(all + total, b, n);
        total += n;
        free(b);
    }
    int rc = write_file(dir, "ctrl", name, all, total, NULL, 0);
    free(all);
    return rc;
}

static int ctrl(const char *dir)
{
    return ctrl_session(dir, "session", "secret", 10) | ctrl_session(dir, "join", "secret", 4) |
           ctrl_session(dir, "bad_token", "wrong", 2);
}

/* tiny model receiver: hidden 320, top-3 of 8 experts, 4 layers */
static int wire_seed(const char *dir, const char *name, int kind, afd_dtype_t dt, uint32_t ntok,
                     uint32_t topk)
{
    const uint32_t H = 320;
    net_wire_hdr_t h;
    memset(&h, 0, sizeof(h));
    h.magic = NET_WIRE_MAGIC;
    h.version = NET_WIRE_VERSION;
    h.kind = (uint16_t)kind;
    h.epoch = 1;
    h.src = 2;
    h.step = 100;
    h.layer = 1;
    h.mb = 0;
    h.nmb = 2;
    h.ntok = ntok;
    h.hidden = H;
    h.dtype = (uint8_t)dt;
    h.topk = (uint8_t)topk;
    h.reply_dtype = AFD_DTYPE_BF16;
    h.payload = net_wire_payload_bytes(kind, ntok, H, dt, topk);
    float *g = malloc(sizeof(float) * ntok * H);
    int32_t ids[64 * 3];
    float wts[64 * 3];
    uint8_t *pl = malloc(h.payload + 1);
    if (!g || !pl) return -1;
    for (size_t i = 0; i < (size_t)ntok * H; i++)
        g[i] = (float)((int)(i % 17) - 8) * 0.125f;
    for (uint32_t i = 0; i < ntok * topk; i++) {
        ids[i] = (int32_t)(i % 8);
        wts[i] = 1.0f / (float)(1 + i % 3);
    }
    if (kind == NET_WIRE_A2F)
        net_wire_pack_a2f(g, ntok, H, dt, ids, wts, topk, pl);
    else
        net_wire_pack_rows(g, (size_t)ntok * H, dt, pl);
    int rc = write_file(dir, "wire", name, &h, sizeof(h), pl, h.payload);
    free(g);
    free(pl);
    return rc;
}

static int wires(const char *dir)
{
    return wire_seed(dir, "a2f_bf16", NET_WIRE_A2F, AFD_DTYPE_BF16, 2, 3) |
           wire_seed(dir, "a2f_fp8", NET_WIRE_A2F, AFD_DTYPE_E4M3, 2, 3) |
           wire_seed(dir, "a2f_f32_dense", NET_WIRE_A2F, AFD_DTYPE_F32, 1, 0) |
           wire_seed(dir, "a2f_empty", NET_WIRE_A2F, AFD_DTYPE_BF16, 0, 3) |
           wire_seed(dir, "f2a_bf16", NET_WIRE_F2A, AFD_DTYPE_BF16, 2, 0) |
           wire_seed(dir, "f2a_f32", NET_WIRE_F2A, AFD_DTYPE_F32, 1, 0);
}

static int st_seed(const char *dir, const char *name, const char *json, size_t data_bytes)
{
    size_t jl = strlen(json);
    size_t total = 8 + jl + data_bytes;
    uint8_t *b = calloc(1, total);
    if (!b) return -1;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)jl >> (8 * i));
    memcpy(b + 8, json, jl);
    for (size_t i = 0; i < data_bytes; i++)
        b[8 + jl + i] = (uint8_t)(i * 7);
    int rc = write_file(dir, "safetensors", name, b, total, NULL, 0);
    free(b);
    return rc;
}

static int safetensors(const char *dir)
{
    return st_seed(dir, "two_tensors",
                   "{\"__metadata__\":{\"format\":\"pt\"},"
                   "\"model.norm.weight\":{\"dtype\":\"BF16\",\"shape\":[8],"
                   "\"data_offsets\":[0,16]},"
                   "\"lm_head.weight\":{\"dtype\":\"F32\",\"shape\":[2,4],"
                   "\"data_offsets\":[16,48]}}",
                   48) |
           st_seed(dir, "fp8_scale",
                   "{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[4,8],\"data_offsets\":[0,32]},"
                   "\"w_scale_inv\":{\"dtype\":\"F32\",\"shape\":[1,1],"
                   "\"data_offsets\":[32,36]},"
                   "\"e\":{\"dtype\":\"BF16\",\"shape\":[0,3],\"data_offsets\":[36,36]},"
                   "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[36,40]}}",
                   40) |
           st_seed(dir, "empty", "{}", 0) |
           st_seed(dir, "overlap",
                   "{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                   "\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[2,6]}}",
                   6);
}

int main(int argc, char **argv)
{
    afd_log_init("mkseeds");
    if (argc != 2) {
        fprintf(stderr, "usage: mkseeds DIR\n");
        return 2;
    }
    int rc = frames(argv[1]) | ctrl(argv[1]) | wires(argv[1]) | safetensors(argv[1]);
    return rc ? 1 : 0;
}
