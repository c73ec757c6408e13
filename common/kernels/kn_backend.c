/* kn_backend: backend selection by name. The cuda backend registers itself when built. */
#include "kn_ops.h"
#include "afd_log.h"

#include <string.h>

/* Defined by the cuda backend when it is linked in (CUDA=1); weak so the CPU build links. */
afd_status_t kn_cuda_create(int threads, kn_backend_t **out) __attribute__((weak));

afd_status_t kn_backend_create(const char *name, int threads, kn_backend_t **out)
{
    if (!name || !strcmp(name, "cpu")) return kn_cpu_create(threads, out);
    if (!strcmp(name, "cuda")) {
        if (!kn_cuda_create) {
            afd_error("backend cuda: this build has no CUDA support (build with CUDA=1)");
            return AFD_ERR_UNSUPPORTED;
        }
        return kn_cuda_create(threads, out);
    }
    afd_error("unknown backend '%s' (cpu or cuda)", name);
    return AFD_ERR_INVALID;
}

afd_status_t kn_moe_group(const int32_t *ids, const float *weights, int n, int k, int nexp, int e0,
                          int e1, int32_t *offsets, int32_t *rows, float *rw)
{
    if (n < 0 || k < 0 || e0 < 0 || e1 < e0 || e1 > nexp) return AFD_ERR_INVALID;
    int ne = e1 - e0;
    for (int e = 0; e <= ne; e++)
        offsets[e] = 0;
    size_t slots = (size_t)n * (size_t)k;
    /* counting sort: counts, then prefix sums, then a stable placement */
    for (size_t i = 0; i < slots; i++) {
        int id = ids[i];
        if (id < 0 || id >= nexp) return AFD_ERR_RANGE;
        if (id >= e0 && id < e1) offsets[id - e0 + 1]++;
    }
    for (int e = 0; e < ne; e++)
        offsets[e + 1] += offsets[e];
    /* offsets[e] doubles as the insertion cursor; restored below */
    for (size_t i = 0; i < slots; i++) {
        int id = ids[i];
        if (id < e0 || id >= e1) continue;
        int32_t at = offsets[id - e0]++;
        rows[at] = (int32_t)(i / (size_t)k);
        rw[at] = weights[i];
    }
    for (int e = ne; e > 0; e--)
        offsets[e] = offsets[e - 1];
    offsets[0] = 0;
    return AFD_OK;
}
