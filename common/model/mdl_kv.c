/* mdl_kv: paged KV cache allocation over backend memory. */
#include "mdl_kv.h"
#include "afd_log.h"

#include <stdlib.h>

size_t mdl_kv_block_bytes(const mdl_config_t *cfg, afd_dtype_t dt, int block_size)
{
    size_t per_tok = 2 * (size_t)cfg->head_dim * afd_dtype_size(dt);
    if (dt == AFD_DTYPE_E4M3) per_tok += 2 * sizeof(float);
    return per_tok * (size_t)block_size * (size_t)cfg->num_layers;
}

afd_status_t mdl_kv_create(kn_backend_t *be, const mdl_config_t *cfg, afd_dtype_t dt,
                           int block_size, size_t budget_bytes, mdl_kv_t **out)
{
    if (dt == AFD_DTYPE_COUNT || block_size < 1 || block_size > 4096) {
        afd_error("kv cache: block size %d must be in [1, 4096]", block_size);
        return AFD_ERR_INVALID;
    }
    size_t bb = mdl_kv_block_bytes(cfg, dt, block_size);
    size_t nb = budget_bytes / bb;
    if (nb < 1 || nb > (1u << 30)) {
        afd_error("kv cache: a budget of %zu bytes gives %zu blocks of %zu bytes", budget_bytes, nb,
                  bb);
        return AFD_ERR_RANGE;
    }
    mdl_kv_t *kv = calloc(1, sizeof(*kv));
    if (!kv) return AFD_ERR_NOMEM;
    kv->be = be;
    kn_kv_t *s = &kv->store;
    s->dtype = dt;
    s->num_layers = cfg->num_layers;
    s->num_blocks = (int)nb;
    s->block_size = block_size;
    s->head_dim = cfg->head_dim;
    size_t toks = (size_t)cfg->num_layers * nb * (size_t)block_size;
    size_t bytes = toks * (size_t)cfg->head_dim * afd_dtype_size(dt);
    s->k = be->ops->alloc(be, bytes);
    s->v = be->ops->alloc(be, bytes);
    if (dt == AFD_DTYPE_E4M3) {
        s->k_scale = be->ops->alloc(be, toks * sizeof(float));
        s->v_scale = be->ops->alloc(be, toks * sizeof(float));
    }
    kv->free_list = malloc(sizeof(int32_t) * nb);
    if (!s->k || !s->v || !kv->free_list ||
        (dt == AFD_DTYPE_E4M3 && (!s->k_scale || !s->v_scale))) {
        afd_error("kv cache: cannot allocate %zu blocks (%zu bytes)", nb, nb * bb);
        mdl_kv_destroy(kv);
        return AFD_ERR_NOMEM;
    }
    /* pop order 0, 1, 2, ... so block use is easy to follow in traces */
    for (size_t i = 0; i < nb; i++)
        kv->free_list[i] = (int32_t)(nb - 1 - i);
    kv->nfree = (int)nb;
    *out = kv;
    return AFD_OK;
}

void mdl_kv_destroy(mdl_kv_t *kv)
{
    if (!kv) return;
    kn_backend_t *be = kv->be;
    if (kv->store.k) be->ops->free(be, kv->store.k);
    if (kv->store.v) be->ops->free(be, kv->store.v);
    if (kv->store.k_scale) be->ops->free(be, kv->store.k_scale);
    if (kv->store.v_scale) be->ops->free(be, kv->store.v_scale);
    free(kv->free_list);
    free(kv);
}

afd_status_t mdl_kv_alloc(mdl_kv_t *kv, int n, int32_t *blocks)
{
    if (n < 0 || n > kv->nfree) return AFD_ERR_BUSY;
    for (int i = 0; i < n; i++)
        blocks[i] = kv->free_list[--kv->nfree];
    return AFD_OK;
}

void mdl_kv_release(mdl_kv_t *kv, const int32_t *blocks, int n)
{
    for (int i = 0; i < n; i++) {
        AFD_ASSERT(blocks[i] >= 0 && blocks[i] < kv->store.num_blocks &&
                   kv->nfree < kv->store.num_blocks);
        kv->free_list[kv->nfree++] = blocks[i];
    }
}

int mdl_kv_blocks_for(const mdl_kv_t *kv, int ntok)
{
    return (ntok + kv->store.block_size - 1) / kv->store.block_size;
}
