/*
 * kn_ops: the kernel interface. One ops table, one implementation per backend
 * (cpu: fp32 compute over OpenBLAS; cuda: cuBLASLt and custom kernels). The
 * model code calls only these; every pointer an op takes lives in the backend's
 * memory (host for cpu, device for cuda). Activations are float32, row-major.
 */
#ifndef KN_OPS_H
#define KN_OPS_H

#include "afd_dtype.h"
#include "afd_status.h"

#include <stddef.h>
#include <stdint.h>

/*
 * A 2-D weight slice as it sits in a checkpoint: rows [row0, row0+rows) and columns
 * [col0, col0+cols) of a [full_rows, full_cols] matrix of dtype `dtype` at `data`
 * (one expert's matrix for fused 3-D tensors). For block-fp8, `scale` points at the
 * matrix's [ceil(full_rows/128), ceil(full_cols/128)] float32 block scales.
 */
typedef struct kn_src {
    afd_dtype_t dtype;
    const void *data;
    int64_t full_rows, full_cols;
    int64_t row0, rows, col0, cols;
    const float *scale; /* NULL unless dtype is e4m3; may be unaligned: read with memcpy */
} kn_src_t;

/* A weight owned by a backend: logically [rows, cols] = [out, in]. */
typedef struct kn_weight {
    int64_t rows, cols;
    void *data; /* cpu: float (rows, cols) */
    void *aux;  /* backend-private (scales, descriptors) */
} kn_weight_t;

/*
 * The paged KV cache storage: one shared KV head per layer.
 *   k, v:       (layer, block, block_size, head_dim) elements of dtype
 *   k_scale, v_scale: (layer, block, block_size) float32, only for fp8 (one scale per
 *               token vector)
 */
typedef struct kn_kv {
    afd_dtype_t dtype;
    int num_layers, num_blocks, block_size, head_dim;
    void *k, *v;
    float *k_scale, *v_scale;
} kn_kv_t;

/* One sequence's view for attention: its block table (host memory; a device backend
 * uploads it) and positions. */
typedef struct kn_seq {
    const int32_t *block_table; /* blocks covering positions [0, pos0 + ntok) */
    int pos0;                   /* position of the first new token (tokens already cached) */
    int ntok;                   /* new tokens in this call */
} kn_seq_t;

typedef struct kn_backend kn_backend_t;

/* The most candidates logits_top hands over per row. */
#define KN_TOP_K_MAX 64

typedef struct kn_ops {
    const char *name;
    int host_memory; /* buffers are plain host memory (no upload/download needed to read) */
    int cuda_memory; /* buffers are CUDA device memory (what a CUDA-aware UCX can move) */
    void (*destroy)(kn_backend_t *be);
    /* memory in the backend's space; alloc returns zeroed memory or NULL */
    void *(*alloc)(kn_backend_t *be, size_t bytes);
    void (*free)(kn_backend_t *be, void *p);
    void (*upload)(kn_backend_t *be, void *dst, const void *src, size_t bytes);
    void (*download)(kn_backend_t *be, void *dst, const void *src, size_t bytes);
    void (*zero)(kn_backend_t *be, void *p, size_t bytes);
    /* waits until all queued work is done (cpu: no-op) */
    void (*sync)(kn_backend_t *be);

    /* weights: dequantise/convert a checkpoint slice into the backend's format */
    afd_status_t (*weight_load)(kn_backend_t *be, const kn_src_t *src, kn_weight_t *w);
    void (*weight_free)(kn_backend_t *be, kn_weight_t *w);

    /* y[n, w.rows] = x[n, w.cols] . w^T (+ y when accumulate) */
    void (*matmul)(kn_backend_t *be, const float *x, int n, const kn_weight_t *w, float *y,
                   int accumulate);
    /* out[n, dim] = x / sqrt(mean(x^2) + eps) * weight */
    void (*rmsnorm)(kn_backend_t *be, const float *x, int n, int dim, const float *weight,
                    float eps, float *out);
    /* NeoX rotary embedding over all of head_dim, in place, x: (n, nheads, head_dim) */
    void (*rope)(kn_backend_t *be, float *x, int n, int nheads, int head_dim, const int32_t *pos,
                 double theta);
    /* gathers rows: out[i] = table[ids[i]] (table: weight [vocab, dim]) */
    void (*embed)(kn_backend_t *be, const kn_weight_t *table, const int32_t *ids, int n,
                  float *out);
    /* out[i] = silu(gate[i]) * up[i] for i in [0, n) */
    void (*swiglu)(kn_backend_t *be, const float *gate, const float *up, size_t n, float *out);
    /* dst[i] = src[rows[i]] for i < n (rows of dim floats) */
    void (*gather)(kn_backend_t *be, const float *src, int dim, const int32_t *rows, int n,
                   float *dst);
    /* dst[rows[i]] += scale[i] * src[i] for i < n; rows may repeat */
    void (*scatter_add)(kn_backend_t *be, float *dst, int dim, const int32_t *rows,
                        const float *scale, int n, const float *src);
    /* y[i] += x[i] */
    void (*add)(kn_backend_t *be, float *y, const float *x, size_t n);
    /*
     * softmax over nexp logits in float32, then the top k by probability (ties to the
     * lower id); weights are the probabilities, divided by their sum when renorm.
     */
    void (*router_topk)(kn_backend_t *be, const float *logits, int n, int nexp, int k, int renorm,
                        int32_t *ids, float *weights);
    /* writes k, v (ntok, head_dim) of a sequence at positions pos0.. into the cache */
    void (*kv_write)(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seq,
                     const float *k, const float *v);
    /*
     * causal attention for one sequence: q (ntok, nheads, head_dim) at positions
     * pos0.. against the cached positions [0, pos0 + ntok); out like q.
     */
    void (*attention)(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seq,
                      const float *q, int nheads, float scale, float *out);
    /* x <- dequant(quant(x)) in dtype (fp8 with per-128 scales, bf16, or f32: no-op) */
    void (*round)(kn_backend_t *be, float *x, int rows, int dim, afd_dtype_t dt);
    /*
     * Optional (NULL: the caller runs matmul per segment): the GEMMs of a MoE layer's experts
     * at once.
     * Rows [off[s], off[s+1]) of x times w[s]^T into the same rows of y, for s < nseg;
     * every w[s] has the same shape. A device backend converts or quantises x once for
     * all rows and widens every output in one pass.
     */
    void (*matmul_segments)(kn_backend_t *be, const float *x, const int32_t *off, int nseg,
                            const kn_weight_t *w, float *y);
    /*
     * Optional (NULL: kv_write / attention per sequence): the same for a batch of nseq
     * sequences whose rows follow each other in k, v, q and out (seqs[i].ntok rows each),
     * in as few launches as the backend can (cuda: one KV write, and one decode-attention
     * launch per run of one-token sequences).
     */
    void (*kv_write_batch)(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seqs,
                           int nseq, const float *k, const float *v);
    void (*attention_batch)(kn_backend_t *be, const kn_kv_t *kv, int layer, const kn_seq_t *seqs,
                            int nseq, const float *q, int nheads, float scale, float *out);

    /*
     * Optional: a sibling on the same device with its own queue (cuda: its own stream)
     * that shares the memory space: buffers, weights and the KV cache of either are used
     * by both; each frees what it allocated, and the sibling is destroyed first. NULL for
     * backends without queues (every op has finished when it returns).
     */
    kn_backend_t *(*fork)(kn_backend_t *be);
    /* Optional (NULL for host-memory backends: memcpy): queues a copy inside the backend's
     * memory, ordered like any op. */
    void (*copy)(kn_backend_t *be, void *dst, const void *src, size_t bytes);
    /* Optional (NULL: download): queues a copy to the host that an event recorded after it
     * reports done; dst should come from host_alloc. */
    void (*download_async)(kn_backend_t *be, void *dst, const void *src, size_t bytes);
    /* Optional events (NULL: everything queued is done at once): record marks the point
     * after the work queued so far; done tells, without waiting, whether it is reached. */
    void *(*event_new)(kn_backend_t *be);
    void (*event_record)(kn_backend_t *be, void *ev);
    int (*event_done)(kn_backend_t *be, void *ev);
    void (*event_free)(kn_backend_t *be, void *ev);
    /*
     * Optional packed-row codec in the backend's memory (afd_rows_* layout: e4m3 bytes then
     * per-128 float32 scales, bf16, or f32), queued like any op. NULL for host-memory
     * backends: kn_rows_* run afd_rows_* on the caller's thread.
     *   encode: dst (afd_rows_bytes) <- x (rows, dim); dt e4m3, bf16 or f32
     *   decode: x (rows, dim) <- src;                  dt e4m3, bf16 or f32
     *   add:    y (rows, dim) += src;                  dt bf16 or f32
     */
    void (*rows_encode)(kn_backend_t *be, afd_dtype_t dt, const float *x, int rows, int dim,
                        void *dst);
    void (*rows_decode)(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim,
                        float *x);
    void (*rows_add)(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim,
                     float *y);
    /*
     * Optional (NULL, or an error: the caller downloads the rows and samples on the host):
     * for each logits row (rows, vocab) in backend memory, its k best ids and logits by
     * (logit descending, id ascending) and its log-sum-exp, into host arrays (rows, k) and
     * (rows); returns once they are there. k <= KN_TOP_K_MAX.
     */
    afd_status_t (*logits_top)(kn_backend_t *be, const float *logits, int rows, int vocab, int k,
                               int32_t *top_ids, float *top_logits, double *lse);
    /* Optional (NULL: malloc/free): host memory the backend copies from and to fastest
     * (cuda: pinned), for staging buffers. */
    void *(*host_alloc)(kn_backend_t *be, size_t bytes);
    void (*host_free)(kn_backend_t *be, void *p);
    /*
     * Optional, for a tensor-parallel group of backends of this kind (kn_group): open
     * takes the n ranks (rank 0 first); reduce sums bufs[i] (count floats in rank i's
     * memory) into bufs[0], queued behind each rank's work so far, and each rank's later
     * work waits for it (a rank may overwrite its buffer next). NULL for host-memory
     * backends: the group sums with add on rank 0.
     */
    afd_status_t (*group_open)(kn_backend_t *const *ranks, int n, void **grp);
    void (*group_reduce)(void *grp, float *const *bufs, size_t count);
    /* bufs[i] <- bufs[0] (bytes) for every rank i > 0, queued behind rank 0's work so
     * far; each rank's later work waits for its copy, and rank 0's for all of them */
    void (*group_bcast)(void *grp, void *const *bufs, size_t bytes);
    void (*group_close)(void *grp);

    /*
     * Optional (NULL: none), for replaying a decode layer as a CUDA graph.
     * batch_prepare puts a batch's per-step tables (KV slots, block tables, context
     * lengths) on the device, so that kv_write_batch and attention_batch called with the
     * same seqs and nseq (until the next batch_prepare, which the caller makes before
     * changing seqs) do no host work. It returns 1 when it did (every sequence decodes one
     * token) and sets *shape to a signature of everything its launches depend on, else 0
     * (those ops then work as before).
     * graph_begin: from now the backend records its work instead of queueing it; 1, or 0
     * when it does not (graphs disabled: AFD_CUDA_GRAPHS=1 enables them on cuda).
     * graph_end: what was recorded, as a graph; NULL when some of it could not be recorded
     * (an upload, a sync, a workspace that had to grow): nothing of it ran, and the caller
     * runs it again directly. graph_launch queues a graph: 0, or -1 when memory the graph
     * refers to has since been replaced (free it and record again).
     */
    int (*batch_prepare)(kn_backend_t *be, const kn_kv_t *kv, const kn_seq_t *seqs, int nseq,
                         int nheads, uint64_t *shape);
    int (*graph_begin)(kn_backend_t *be);
    void *(*graph_end)(kn_backend_t *be);
    int (*graph_launch)(kn_backend_t *be, void *graph);
    void (*graph_free)(kn_backend_t *be, void *graph);
} kn_ops_t;

struct kn_backend {
    const kn_ops_t *ops;
    int threads;
};

/* Creates the cpu backend; threads is the OpenBLAS thread count (0: leave as is). */
afd_status_t kn_cpu_create(int threads, kn_backend_t **out);
/* The cpu backend presenting itself as a device backend ("cpu-dev"): the same numbers,
 * the device code paths of its callers (for testing them without a GPU). */
afd_status_t kn_cpu_dev_create(int threads, kn_backend_t **out);
/* Creates a backend by name ("cpu", "cuda"); cuda fails with UNSUPPORTED in a CPU build. */
afd_status_t kn_backend_create(const char *name, int threads, kn_backend_t **out);

/* Device arguments: an index >= 0, or KN_DEVICE_NEXT(k): the k-th device after the
 * default one (cuda: AFD_CUDA_DEVICE, else 0); KN_DEVICE_DEFAULT is the default itself.
 * Backends without devices ignore it. */
#define KN_DEVICE_DEFAULT (-1)
#define KN_DEVICE_NEXT(k) (-1 - (k))
afd_status_t kn_backend_create_on(const char *name, int threads, int device, kn_backend_t **out);

/*
 * A tensor-parallel group: n backends of one kind, rank i on devices[i] (NULL: rank i on
 * KN_DEVICE_NEXT(i)), and a sum across them (cuda: NCCL when the ranks are on distinct
 * devices and libnccl loads, else peer copies and an add on rank 0).
 */
#define KN_GROUP_MAX 16
typedef struct kn_group {
    int n;
    kn_backend_t *rank[KN_GROUP_MAX];
    void *impl; /* the backend's group_open state, or NULL */
} kn_group_t;

afd_status_t kn_group_create(const char *name, int threads, int n, const int *devices,
                             kn_group_t **out);
/* bufs[0] <- sum of bufs[i], i < n (count floats each, in rank i's memory). */
void kn_group_reduce(kn_group_t *g, float *const *bufs, size_t count);
/* bufs[i] <- bufs[0] (bytes) for i < n (cuda: NCCL across GPUs, else device copies). */
void kn_group_bcast(kn_group_t *g, void *const *bufs, size_t bytes);
void kn_group_destroy(kn_group_t *g);

/* A queue of its own on be's device (ops->fork; on the cpu a new backend, its ops
 * finishing in order anyway); NULL on failure or without the op. Destroy it before be. */
kn_backend_t *kn_fork(kn_backend_t *be);
/* The optional asynchronous ops with their synchronous meaning where a backend has none:
 * kn_event_new may return NULL (then kn_event_done is always 1). */
void kn_download_async(kn_backend_t *be, void *dst, const void *src, size_t bytes);
void kn_copy(kn_backend_t *be, void *dst, const void *src, size_t bytes);
void *kn_event_new(kn_backend_t *be);
void kn_event_record(kn_backend_t *be, void *ev);
int kn_event_done(kn_backend_t *be, void *ev);
void kn_event_free(kn_backend_t *be, void *ev);

/* The packed-row codec on a backend (its op, or afd_rows_* for host memory). */
void kn_rows_encode(kn_backend_t *be, afd_dtype_t dt, const float *x, int rows, int dim, void *dst);
void kn_rows_decode(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim, float *x);
void kn_rows_add(kn_backend_t *be, afd_dtype_t dt, const void *src, int rows, int dim, float *y);

/* host staging memory of a backend (pinned where it has such a thing) */
void *kn_host_alloc(kn_backend_t *be, size_t bytes);
void kn_host_free(kn_backend_t *be, void *p);
/* The same as allocator callbacks (be passed as the callback's argument). */
void *kn_host_alloc_cb(void *be, size_t bytes);
void kn_host_free_cb(void *be, void *p);

/*
 * The routed rows of a MoE layer grouped by local expert (tokens sorted by expert), so each
 * expert's rows are one contiguous segment: from ids/weights (n, k) keeps the slots whose
 * expert is in [e0, e1) and sorts them by expert, stable in token order. offsets[0..ne]
 * (ne = e1 - e0) are the segment starts, rows[i] the token of sorted slot i, rw[i] its
 * routing weight; rows and rw hold n * k. AFD_ERR_RANGE for an id outside [0, nexp).
 */
afd_status_t kn_moe_group(const int32_t *ids, const float *weights, int n, int k, int nexp, int e0,
                          int e1, int32_t *offsets, int32_t *rows, float *rw);

/* The float32 value of element (r, c) of a checkpoint slice, for reference code and tests. */
float kn_src_get(const kn_src_t *src, int64_t r, int64_t c);
/* Dequantises a whole slice into dst (rows, cols) float32 on the host. */
void kn_src_dequant(const kn_src_t *src, float *dst);

#endif
