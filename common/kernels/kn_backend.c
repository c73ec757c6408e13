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
