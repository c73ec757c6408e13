/*
 * ffn_exec: runs an FFN node's share of the model on one or more tensor-parallel ranks.
 * Each rank is a backend (cuda: one GPU) holding the intermediate slice tp_index of
 * tp_count of every expert, shared expert and dense MLP of the share; the ranks' partial
 * outputs are summed on rank 0 (kn_group_reduce: NCCL across GPUs). The node hands in the
 * A2F slices as they arrived (packed rows in the wire dtype) and takes the F2A answers out
 * packed in each attention node's reply dtype: on a host-memory backend the rows are
 * converted straight into and out of rank 0's buffers; on a device backend the packed
 * bytes are copied to every rank and unpacked there, and the answers packed on rank 0 and
 * copied into the (pinned) send buffers, so the host converts nothing.
 */
#ifndef FFN_EXEC_H
#define FFN_EXEC_H

#include "kn_ops.h"
#include "mdl_model.h"

#include <pthread.h>

#define FFN_EXEC_MAX_SLICES 64 /* A2F slices per run: one per attention node */

struct ffn_exec;
typedef struct ffn_rank_arg { /* what a rank's thread is started with */
    struct ffn_exec *x;
    int rank;
} ffn_rank_arg_t;

typedef struct ffn_exec {
    kn_group_t *grp;
    int tp;
    mdl_model_t *m[KN_GROUP_MAX];
    mdl_ws_t ws[KN_GROUP_MAX];
    float *g[KN_GROUP_MAX], *out[KN_GROUP_MAX]; /* each rank's memory (n, H) */
    void *d_in[KN_GROUP_MAX], *d_out;           /* device backends: packed rows (n x 4H bytes) */
    int32_t *ids;                               /* host (n, top_k) */
    float *wts;
    int cap;
    int hidden, topk;
    /* ranks 1.. run on threads of their own, so that every rank's launches are queued at
     * once (a host thread queues a few hundred per layer) */
    /* device backends: the A2F slices put since the last run, packed one after another in
     * rank 0's staging (d_in[0]) and broadcast to the other ranks at the run */
    int nslice;
    int slice_off[FFN_EXEC_MAX_SLICES], slice_ntok[FFN_EXEC_MAX_SLICES];
    afd_dtype_t slice_dt[FFN_EXEC_MAX_SLICES];
    size_t slice_at[FFN_EXEC_MAX_SLICES], in_bytes;
    pthread_t th[KN_GROUP_MAX];
    ffn_rank_arg_t arg[KN_GROUP_MAX];
    int nth;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned gen;
    int pending, quit, job_layer, job_n;
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
/* Makes room for n tokens: ids and wts hold n rows after it. */
afd_status_t ffn_exec_reserve(ffn_exec_t *x, int n);
/* Input rows [off, off + ntok) from a packed slice (afd_rows layout of dt) in host memory,
 * at most FFN_EXEC_MAX_SLICES per run; on a device backend src must stay untouched until
 * ffn_exec_wait (its bytes go to rank 0, reach the other ranks by one broadcast at the
 * run, NVLink rather than PCIe, and each rank unpacks them itself). */
void ffn_exec_put_rows(ffn_exec_t *x, int off, const void *src, int ntok, afd_dtype_t dt);
/* One layer over the n rows put and the routing in ids/wts; the ranks' outputs summed. */
void ffn_exec_run(ffn_exec_t *x, int layer, int n);
/* Output rows [off, off + ntok) packed in dt (bf16 or f32) into dst (host memory, from the
 * data plane's buffers), complete after ffn_exec_wait. */
void ffn_exec_get_rows(ffn_exec_t *x, int off, int ntok, afd_dtype_t dt, void *dst);
/* The same into dst in rank 0's device memory (ffn_exec_dev_alloc), for a data plane that
 * sends device memory; complete after ffn_exec_wait. */
void ffn_exec_get_rows_device(ffn_exec_t *x, int off, int ntok, afd_dtype_t dt, void *dst);
/* Rank 0's memory for such answers (a device backend's; NULL when out of memory). */
void *ffn_exec_dev_alloc(ffn_exec_t *x, size_t bytes);
void ffn_exec_dev_free(ffn_exec_t *x, void *p);
/* Waits until every get_rows copy has landed. */
void ffn_exec_wait(ffn_exec_t *x);
/* Checkpoint bytes the ranks read. */
uint64_t ffn_exec_bytes(const ffn_exec_t *x);
void ffn_exec_close(ffn_exec_t *x);

/* Parses a device list "0,1,2" (at most KN_GROUP_MAX, each 0..1023); returns the count
 * or -1 with a message in why. */
int ffn_parse_devices(const char *s, int *devices, char *why, size_t why_len);

#endif
