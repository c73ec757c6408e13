/*
 * ffn_exec: runs an FFN node's share of the model on one or more tensor-parallel ranks.
 * Each rank is a backend (cuda: one GPU) holding the intermediate slice tp_index of
 * tp_count of every expert, shared expert and dense MLP of the share; the ranks' partial
 * outputs are summed on rank 0 (kn_group_reduce: NCCL across GPUs). The node fills host
 * rows (A2F unpacking writes straight into them) and gets host rows back (F2A packing reads
 * them): on a host-memory backend these are rank 0's own buffers, on a device backend
 * pinned staging buffers that are uploaded to every rank and downloaded from rank 0.
 */
#ifndef FFN_EXEC_H
#define FFN_EXEC_H

#include "kn_ops.h"
#include "mdl_model.h"

typedef struct ffn_exec {
    kn_group_t *grp;
    int tp;
    mdl_model_t *m[KN_GROUP_MAX];
    mdl_ws_t ws[KN_GROUP_MAX];
    float *g[KN_GROUP_MAX], *out[KN_GROUP_MAX]; /* each rank's memory (n, H) */
    float *h_g, *h_out;                         /* host rows in and out (n, H) */
    int32_t *ids;                               /* host (n, top_k) */
    float *wts;
    int cap;
    int hidden, topk;
} ffn_exec_t;

/* Opens tp ranks of `backend`, rank i on devices[i] (NULL: the default device and the
 * ones after it). */
afd_status_t ffn_exec_open(ffn_exec_t *x, const char *backend, int threads, int tp,
                           const int *devices);
/* Loads the share `role` (its tp fields are set per rank) on every rank. */
afd_status_t ffn_exec_load(ffn_exec_t *x, const mdl_ckpt_t *ck, const mdl_config_t *cfg,
                           const mdl_role_t *role, int progress);
/* Frees the weights and buffers (ffn_exec_load may follow). */
void ffn_exec_unload(ffn_exec_t *x);
/* Makes room for n tokens: h_g, ids and wts hold n rows after it. */
afd_status_t ffn_exec_reserve(ffn_exec_t *x, int n);
/* One layer over the n rows in h_g/ids/wts; returns the summed output rows (host, n x H),
 * valid until the next call. */
const float *ffn_exec_run(ffn_exec_t *x, int layer, int n);
/* Checkpoint bytes the ranks read. */
uint64_t ffn_exec_bytes(const ffn_exec_t *x);
void ffn_exec_close(ffn_exec_t *x);

/* Parses a device list "0,1,2" (at most KN_GROUP_MAX, each 0..1023); returns the count
 * or -1 with a message in why. */
int ffn_parse_devices(const char *s, int *devices, char *why, size_t why_len);

#endif
