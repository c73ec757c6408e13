/*
 * fuzz_safetensors: a whole safetensors file (common/model/mdl_st.c: the 8-byte header
 * length, the JSON header, dtypes, shapes, data offsets in bounds and without overlap)
 * opened through mdl_st_file_open, from an in-memory file so that the mapping path is the
 * real one. Every tensor of an accepted file must lie inside the mapping with the byte
 * length its shape and dtype give; its first and last bytes are read.
 */
#define _GNU_SOURCE
#include "afd_log.h"
#include "mdl_st.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int g_fd = -1;
static char g_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    afd_log_init("fuzz_safetensors");
    g_fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
    if (g_fd < 0) abort();
    snprintf(g_path, sizeof(g_path), "/proc/self/fd/%d", g_fd);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (ftruncate(g_fd, 0) < 0 || pwrite(g_fd, data, size, 0) != (ssize_t)size) abort();
    mdl_st_file_t *f = NULL;
    if (mdl_st_file_open(g_path, &f) != AFD_OK) return 0;
    volatile uint8_t sink = 0;
    for (int i = 0; i < f->ntensors; i++) {
        const mdl_st_tensor_t *t = &f->tensors[i];
        if (!t->name || !t->name[0] || t->ndim < 0 || t->ndim > MDL_ST_MAX_NDIM) abort();
        uint64_t elems = 1;
        for (int d = 0; d < t->ndim; d++)
            elems *= (uint64_t)t->shape[d];
        if (t->nbytes != elems * afd_dtype_size(t->dtype)) abort();
        if (t->data < f->map + f->data_start || t->data + t->nbytes > f->map + f->size) abort();
        if (t->nbytes) sink ^= t->data[0] ^ t->data[t->nbytes - 1];
    }
    (void)sink;
    mdl_st_file_close(f);
    return 0;
}
