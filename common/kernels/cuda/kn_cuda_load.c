/*
 * kn_cuda_load: kn_cuda_create, linked into every program of a CUDA build. It loads
 * libafdcuda.so only when the cuda backend is asked for: programs never map cudart
 * or cuBLASLt otherwise (cuBLASLt alone takes a few hundred milliseconds to load).
 */
#define _GNU_SOURCE
#include "kn_cuda.h"
#include "afd_log.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void kn_cuda_log(int level, const char *msg)
{
    afd_log((afd_log_level_t)level, "%s", msg);
}

static void *kn_cuda_dlopen(char *tried, size_t tried_len)
{
    const char *env = getenv("AFD_CUDA_LIB");
    if (env && *env) {
        snprintf(tried, tried_len, "%s", env);
        return dlopen(env, RTLD_NOW | RTLD_LOCAL);
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            /* build layout: BUILD/bin/prog and BUILD/tests/prog next to BUILD/lib */
            snprintf(tried, tried_len, "%s/../lib/" KN_CUDA_LIB, exe);
            void *h = dlopen(tried, RTLD_NOW | RTLD_LOCAL);
            if (h) return h;
        }
    }
    snprintf(tried, tried_len, KN_CUDA_LIB);
    return dlopen(KN_CUDA_LIB, RTLD_NOW | RTLD_LOCAL);
}

afd_status_t kn_cuda_create(int threads, int device, kn_backend_t **out)
{
    static const kn_cuda_env_t env = {.abi = KN_CUDA_ABI, .log = kn_cuda_log};
    char tried[PATH_MAX + 32];
    void *h = kn_cuda_dlopen(tried, sizeof(tried));
    if (!h) {
        afd_error("backend cuda: cannot load %s: %s", tried, dlerror());
        return AFD_ERR_UNSUPPORTED;
    }
    kn_cuda_open_fn open_fn;
    *(void **)&open_fn = dlsym(h, KN_CUDA_OPEN_SYM);
    if (!open_fn) {
        afd_error("backend cuda: %s has no %s", tried, KN_CUDA_OPEN_SYM);
        dlclose(h);
        return AFD_ERR_UNSUPPORTED;
    }
    /* the library stays loaded: the backend's code lives there */
    return open_fn(&env, threads, device, out);
}
