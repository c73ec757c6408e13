/*
 * mdl_st: safetensors files (read by mmap, strictly validated) and sharded
 * checkpoints (model.safetensors.index.json, or one model.safetensors).
 * Nothing is read from a tensor's bytes until a caller touches them.
 */
#ifndef MDL_ST_H
#define MDL_ST_H

#include "afd_dtype.h"
#include "afd_status.h"

#include <stddef.h>
#include <stdint.h>

#define MDL_ST_MAX_NDIM    8
#define MDL_ST_MAX_HEADER  (100u << 20) /* bytes of JSON header */
#define MDL_ST_MAX_TENSORS (1 << 20)
#define MDL_ST_MAX_SHARDS  4096
#define MDL_ST_MAX_NAME    512

typedef struct mdl_st_tensor {
    char *name;
    afd_dtype_t dtype;
    int ndim;
    int64_t shape[MDL_ST_MAX_NDIM];
    const uint8_t *data; /* in the mapping */
    uint64_t nbytes;
    struct mdl_st_file *file;
} mdl_st_tensor_t;

typedef struct mdl_st_file {
    char *path;
    const char *base; /* file name without the directory, for messages */
    uint8_t *map;
    size_t size;
    size_t data_start; /* 8 + header length */
    int ntensors;
    mdl_st_tensor_t *tensors;
} mdl_st_file_t;

/* Maps and validates one safetensors file: header size, JSON, dtypes, shapes, offsets in
 * bounds and without overlap, shape x dtype = byte length. Errors name the file and tensor. */
afd_status_t mdl_st_file_open(const char *path, mdl_st_file_t **out);
void mdl_st_file_close(mdl_st_file_t *f);
/* Parses a header given as bytes (exposed for the fuzz target); data_size is the number of
 * data bytes that follow the header. */
afd_status_t mdl_st_header_parse(mdl_st_file_t *f, const char *json, size_t len,
                                 uint64_t data_size);

typedef struct mdl_ckpt {
    char *dir;
    int nfiles;
    mdl_st_file_t **files;
    /* name -> tensor hash table (open addressing) */
    mdl_st_tensor_t **slots;
    size_t nslots;
    size_t ntensors;
    uint64_t total_bytes;
} mdl_ckpt_t;

/* Opens DIR: the index and all its shards, or DIR/model.safetensors. Every tensor the index
 * names must be in the shard it names; a tensor in two shards is an error. */
afd_status_t mdl_ckpt_open(const char *dir, mdl_ckpt_t **out);
void mdl_ckpt_close(mdl_ckpt_t *ck);
/* Returns the tensor or NULL. */
const mdl_st_tensor_t *mdl_ckpt_find(const mdl_ckpt_t *ck, const char *name);

/* Writes "[a, b, c]" into buf (for messages). */
const char *mdl_st_shape_str(const mdl_st_tensor_t *t, char *buf, size_t len);

#endif
