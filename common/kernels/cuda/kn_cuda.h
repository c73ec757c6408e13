/*
 * kn_cuda: the cuda backend's entry. The backend lives in its own shared library
 * (libafdcuda.so, with cudart and cuBLASLt behind it) that kn_cuda_create loads on
 * demand, so programs start, and CPU runs cost nothing, on machines without a GPU.
 * Both sides include this header: it fixes the library's name and entry point.
 */
#ifndef KN_CUDA_H
#define KN_CUDA_H

#include "afd_status.h"
#include "kn_ops.h"

#define KN_CUDA_LIB      "libafdcuda.so"
#define KN_CUDA_OPEN_SYM "kn_cuda_open"
#define KN_CUDA_ABI      2

/* What the loading program lends the library (the library keeps no copy of common/). */
typedef struct kn_cuda_env {
    int abi;                                 /* KN_CUDA_ABI */
    void (*log)(int level, const char *msg); /* an afd_log level and one line */
} kn_cuda_env_t;

typedef afd_status_t (*kn_cuda_open_fn)(const kn_cuda_env_t *env, int threads, int device,
                                        kn_backend_t **out);

/* The library's entry: creates the backend on `device` (kn_ops.h: an index, or
 * KN_DEVICE_NEXT(k) for the k-th after AFD_CUDA_DEVICE, else 0); AFD_ERR_UNSUPPORTED with
 * a logged reason when there is no usable device. */
afd_status_t kn_cuda_open(const kn_cuda_env_t *env, int threads, int device, kn_backend_t **out);

/* Loads the library (next to the program: ../lib/, or AFD_CUDA_LIB) and opens it. */
afd_status_t kn_cuda_create(int threads, int device, kn_backend_t **out);

#endif
