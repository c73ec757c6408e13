/*
 * mdl_kv: the paged MFA KV cache: storage in the backend (kn_kv_t) and a free list
 * of blocks. Capacity comes from a memory budget. One block holds block_size
 * positions of the single shared KV head, for every layer.
 */
#ifndef MDL_KV_H
#define MDL_KV_H

#include "kn_ops.h"
#include "mdl_config.h"

typedef struct mdl_kv {
    kn_kv_t store;
    kn_backend_t *be;
    int32_t *free_list; /* stack of free block ids */
    int nfree;
} mdl_kv_t;

/* Bytes one block takes over all layers (K and V, and fp8 scales). */
size_t mdl_kv_block_bytes(const mdl_config_t *cfg, afd_dtype_t dt, int block_size);
/* Creates a cache of floor(budget / block bytes) blocks (at least 1 or an error). */
afd_status_t mdl_kv_create(kn_backend_t *be, const mdl_config_t *cfg, afd_dtype_t dt,
                           int block_size, size_t budget_bytes, mdl_kv_t **out);
void mdl_kv_destroy(mdl_kv_t *kv);
/* Takes n blocks, all or none: AFD_ERR_BUSY when fewer are free. */
afd_status_t mdl_kv_alloc(mdl_kv_t *kv, int n, int32_t *blocks);
void mdl_kv_release(mdl_kv_t *kv, const int32_t *blocks, int n);
/* Blocks needed to hold ntok positions. */
int mdl_kv_blocks_for(const mdl_kv_t *kv, int ntok);

#endif
