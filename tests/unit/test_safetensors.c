/*
 * test_safetensors: common/model/mdl_st.h (safetensors files and sharded checkpoints).
 * Small files with hand-built headers are written into a mkdtemp directory:
 *   - a good file with F32 / BF16 / F16 / F8_E4M3 tensors, a 0-d scalar, an empty tensor
 *     and __metadata__ (ignored): dtypes, shapes, byte counts, data pointers and bytes;
 *   - tensors at unaligned addresses (odd header length and offsets) read back correctly;
 *   - file errors, each with its status: shorter than 8 bytes, header length 0, larger than
 *     the file, above the 100 MB cap (a sparse file), header not JSON / not an object,
 *     offsets past the end (truncated file), begin > end, byte length != shape x dtype,
 *     overlapping tensors, unknown dtype, too many dims, bad shapes and offsets;
 *   - checkpoints: one model.safetensors, a sharded index, and its errors (tensor not in
 *     the shard the index names, shard name with '/', tensor in two shards, missing shard,
 *     bad index, neither index nor model.safetensors);
 *   - a seeded mutation fuzz loop over a valid file's header (through mdl_st_file_open and
 *     mdl_st_header_parse): every result is OK or an error status, and every OK result
 *     satisfies the loader's invariants (in-bounds, non-overlapping, sizes consistent).
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_dtype.h"
#include "mdl_st.h"

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char g_root[512];
static int g_case;

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int group_setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TEST_TMP");
    snprintf(g_root, sizeof(g_root), "%s/afd_test_st_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(g_root) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    return nftw(g_root, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static int quiet_begin(void)
{
    fflush(stderr);
    int saved = dup(2), nul = open("/dev/null", O_WRONLY);
    dup2(nul, 2);
    close(nul);
    return saved;
}
static void quiet_end(int saved)
{
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
}

/* a fresh directory for one case */
static const char *new_dir(char *buf, size_t len)
{
    snprintf(buf, len, "%s/case%d", g_root, g_case++);
    assert_int_equal(mkdir(buf, 0700), 0);
    return buf;
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* 8-byte little-endian header length, header, data */
static uint8_t *st_build(const char *header, uint64_t hlen, const uint8_t *data, size_t dlen,
                         size_t *out_len)
{
    size_t hl = strlen(header);
    uint8_t *b = malloc(8 + hl + dlen + 1);
    assert_non_null(b);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(hlen >> (8 * i));
    memcpy(b + 8, header, hl);
    if (dlen) memcpy(b + 8 + hl, data, dlen);
    *out_len = 8 + hl + dlen;
    return b;
}

static void write_st(const char *path, const char *header, const uint8_t *data, size_t dlen)
{
    size_t n;
    uint8_t *b = st_build(header, strlen(header), data, dlen, &n);
    write_bytes(path, b, n);
    free(b);
}

static uint8_t g_data[64];

/* the good header, padded with spaces to a multiple of 8 like the reference writer does */
static const char *good_header(void)
{
    static char h[1024];
    snprintf(h, sizeof(h), "%s",
             "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"ignored\"},"
             "\"a.f32\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
             "\"b.bf16\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
             "\"c.f16\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[32,40]},"
             "\"d.fp8\":{\"dtype\":\"F8_E4M3\",\"shape\":[3,5],\"data_offsets\":[40,55]},"
             "\"e.scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[56,60]},"
             "\"f.empty\":{\"dtype\":\"BF16\",\"shape\":[0,7],\"data_offsets\":[60,60]}}");
    while (strlen(h) % 8)
        strcat(h, " ");
    return h;
}

static void fill_data(void)
{
    float a[6] = {1.0f, -2.0f, 3.5f, 0.25f, 1e-3f, -7.0f};
    memcpy(g_data, a, 24);
    uint16_t bf[4] = {0x3f80, 0xc000, 0x4049, 0x0000}; /* 1, -2, 3.14, 0 */
    memcpy(g_data + 24, bf, 8);
    uint16_t h[4] = {0x3c00, 0xc000, 0x3800, 0x7bff}; /* 1, -2, 0.5, 65504 */
    memcpy(g_data + 32, h, 8);
    for (int i = 0; i < 15; i++)
        g_data[40 + i] = (uint8_t)(0x30 + i);
    g_data[55] = 0xee; /* a gap byte no tensor covers */
    float s = 42.0f;
    memcpy(g_data + 56, &s, 4);
}

static const mdl_st_tensor_t *find_in(const mdl_st_file_t *f, const char *name)
{
    for (int i = 0; i < f->ntensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

static void check_tensor(const mdl_st_file_t *f, const mdl_st_tensor_t *t, afd_dtype_t dt, int ndim,
                         const int64_t *shape, uint64_t begin, uint64_t nbytes)
{
    assert_non_null(t);
    assert_int_equal(t->dtype, dt);
    assert_int_equal(t->ndim, ndim);
    for (int i = 0; i < ndim; i++)
        assert_int_equal(t->shape[i], shape[i]);
    assert_int_equal(t->nbytes, nbytes);
    assert_ptr_equal(t->data, f->map + f->data_start + begin);
    assert_ptr_equal(t->file, f);
    assert_memory_equal(t->data, g_data + begin, nbytes);
}

static void check_good_file(const mdl_st_file_t *f)
{
    assert_int_equal(f->ntensors, 6); /* __metadata__ is not a tensor */
    assert_int_equal(f->data_start, 8 + strlen(good_header()));
    assert_int_equal(f->size, f->data_start + 60);
    assert_null(find_in(f, "__metadata__"));
    check_tensor(f, find_in(f, "a.f32"), AFD_DTYPE_F32, 2, (int64_t[]){2, 3}, 0, 24);
    check_tensor(f, find_in(f, "b.bf16"), AFD_DTYPE_BF16, 1, (int64_t[]){4}, 24, 8);
    check_tensor(f, find_in(f, "c.f16"), AFD_DTYPE_F16, 2, (int64_t[]){2, 2}, 32, 8);
    check_tensor(f, find_in(f, "d.fp8"), AFD_DTYPE_E4M3, 2, (int64_t[]){3, 5}, 40, 15);
    check_tensor(f, find_in(f, "e.scalar"), AFD_DTYPE_F32, 0, NULL, 56, 4);
    check_tensor(f, find_in(f, "f.empty"), AFD_DTYPE_BF16, 2, (int64_t[]){0, 7}, 60, 0);
    /* values through the dtype conversions */
    float v[6];
    afd_convert_to_f32(AFD_DTYPE_F32, find_in(f, "a.f32")->data, v, 6);
    assert_true(v[2] == 3.5f && v[5] == -7.0f);
    afd_convert_to_f32(AFD_DTYPE_BF16, find_in(f, "b.bf16")->data, v, 4);
    assert_true(v[0] == 1.0f && v[1] == -2.0f && v[3] == 0.0f);
    afd_convert_to_f32(AFD_DTYPE_F16, find_in(f, "c.f16")->data, v, 4);
    assert_true(v[2] == 0.5f && v[3] == 65504.0f);
    char sb[64];
    assert_string_equal(mdl_st_shape_str(find_in(f, "a.f32"), sb, sizeof(sb)), "[2, 3]");
    assert_string_equal(mdl_st_shape_str(find_in(f, "e.scalar"), sb, sizeof(sb)), "[]");
    char tiny[4];
    mdl_st_shape_str(find_in(f, "a.f32"), tiny, sizeof(tiny)); /* truncates, no overflow */
    assert_true(memchr(tiny, 0, sizeof(tiny)) != NULL);
}

static void test_good_file(void **state)
{
    (void)state;
    char dir[600], path[700];
    new_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/x.safetensors", dir);
    write_st(path, good_header(), g_data, 60);
    mdl_st_file_t *f = NULL;
    assert_int_equal(mdl_st_file_open(path, &f), AFD_OK);
    assert_string_equal(f->base, "x.safetensors");
    check_good_file(f);
    mdl_st_file_close(f);
    mdl_st_file_close(NULL);
}

/* writes header + dlen data bytes as one file and expects `want` from mdl_st_file_open */
static void expect_st(const char *header, size_t dlen, afd_status_t want)
{
    char dir[600], path[700];
    new_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/bad.safetensors", dir);
    uint8_t data[256] = {0};
    assert_true(dlen <= sizeof(data));
    write_st(path, header, data, dlen);
    mdl_st_file_t *f = (mdl_st_file_t *)(uintptr_t)0x1; /* outputs set only on success */
    afd_status_t st = mdl_st_file_open(path, &f);
    if (st == AFD_OK)
        mdl_st_file_close(f);
    else
        assert_ptr_equal(f, (mdl_st_file_t *)(uintptr_t)0x1);
    if (st != want)
        fail_msg("header %s: status %d (%s), want %d", header, st, afd_status_str(st), want);
}

static void test_header_length(void **state)
{
    (void)state;
    char dir[600], path[700];
    new_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/h.safetensors", dir);
    mdl_st_file_t *f;
    const char *h = "{}";
    size_t n;
    /* shorter than the 8-byte length */
    write_bytes(path, "\x02\0\0\0", 4);
    assert_int_equal(mdl_st_file_open(path, &f), AFD_ERR_FORMAT);
    write_bytes(path, "", 0);
    assert_int_equal(mdl_st_file_open(path, &f), AFD_ERR_FORMAT);
    /* length 0 */
    uint8_t *b = st_build(h, 0, NULL, 0, &n);
    write_bytes(path, b, n);
    free(b);
    assert_int_equal(mdl_st_file_open(path, &f), AFD_ERR_FORMAT);
    /* larger than the file by one byte, and absurdly large */
    const uint64_t lens[] = {3, 1ull << 40, UINT64_MAX};
    for (int i = 0; i < 3; i++) {
        b = st_build(h, lens[i], NULL, 0, &n);
        write_bytes(path, b, n);
        free(b);
        assert_int_equal(mdl_st_file_open(path, &f), AFD_ERR_FORMAT);
    }
    /* exactly the file: an empty tensor list is a valid file */
    b = st_build(h, 2, NULL, 0, &n);
    write_bytes(path, b, n);
    free(b);
    assert_int_equal(mdl_st_file_open(path, &f), AFD_OK);
    assert_int_equal(f->ntensors, 0);
    mdl_st_file_close(f);
    /* above the 100 MB cap while inside the file: a sparse file of 100 MB + 64 bytes */
    int fd = open(path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    uint8_t len8[8];
    uint64_t big = (uint64_t)MDL_ST_MAX_HEADER + 1;
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)(big >> (8 * i));
    assert_int_equal(write(fd, len8, 8), 8);
    assert_int_equal(ftruncate(fd, (off_t)MDL_ST_MAX_HEADER + 64), 0);
    close(fd);
    assert_int_equal(mdl_st_file_open(path, &f), AFD_ERR_FORMAT);
    unlink(path);
    /* a file that does not exist */
    assert_int_equal(mdl_st_file_open(path, &f), AFD_ERR_NOT_FOUND);
}

static void test_header_errors(void **state)
{
    (void)state;
    /* not JSON, not an object */
    expect_st("{\"a\":{\"dtype\":\"F32\",", 0, AFD_ERR_FORMAT);
    expect_st("not json", 0, AFD_ERR_FORMAT);
    expect_st("[1,2,3]", 0, AFD_ERR_FORMAT);
    expect_st("\"s\"", 0, AFD_ERR_FORMAT);
    expect_st("{\"__metadata__\":[1]}", 0, AFD_ERR_FORMAT);
    /* offsets past the data (a truncated file) */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 15,
              AFD_ERR_RANGE);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, AFD_OK);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[16,20]}}", 8,
              AFD_ERR_RANGE);
    /* begin > end */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 16,
              AFD_ERR_RANGE);
    /* byte length != shape x dtype */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,15]}}", 16,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 16,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[3],\"data_offsets\":[0,12]}}", 16,
              AFD_ERR_FORMAT);
    /* overlapping tensors, in either header order, and one inside another */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
              16, AFD_ERR_FORMAT);
    expect_st("{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
              "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
              16, AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"c\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]},"
              "\"b\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[2,4]}}",
              16, AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
              16, AFD_ERR_FORMAT);
    /* adjacent is fine */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
              16, AFD_OK);
    /* unknown dtype, missing dtype, dtype of the wrong type */
    expect_st("{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
              AFD_ERR_UNSUPPORTED);
    expect_st("{\"a\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 8,
              AFD_ERR_UNSUPPORTED);
    expect_st("{\"a\":{\"dtype\":\"F8_E5M2\",\"shape\":[1],\"data_offsets\":[0,1]}}", 8,
              AFD_ERR_UNSUPPORTED);
    expect_st("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 8, AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 8, AFD_ERR_FORMAT);
    /* too many dims: 8 allowed, 9 not */
    expect_st("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[1,1,1,1,1,1,1,2],\"data_offsets\":[0,2]}}",
              8, AFD_OK);
    expect_st(
        "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,2]}}", 8,
        AFD_ERR_FORMAT);
    /* bad shapes and offsets */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 8,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 8,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 8,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}}", 8, AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776],\"data_offsets\":["
              "0,4]}}",
              8, AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 8, AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.5]}}", 8,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e300]}}", 8,
              AFD_ERR_FORMAT);
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 8, AFD_ERR_FORMAT);
    expect_st("{\"a\":[1,2]}", 8, AFD_ERR_FORMAT);
    expect_st("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, AFD_ERR_FORMAT);
}

static void test_long_name(void **state)
{
    (void)state;
    char h[2048], name[MDL_ST_MAX_NAME + 2];
    memset(name, 'n', sizeof(name) - 1);
    name[MDL_ST_MAX_NAME] = 0; /* the longest allowed */
    snprintf(h, sizeof(h), "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             name);
    expect_st(h, 4, AFD_OK);
    name[MDL_ST_MAX_NAME] = 'n';
    name[MDL_ST_MAX_NAME + 1] = 0;
    snprintf(h, sizeof(h), "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             name);
    expect_st(h, 4, AFD_ERR_FORMAT);
}

/* safetensors does not require alignment: an odd header length and odd offsets put every
 * tensor at an unaligned address; the values must still read back (memcpy loads: the
 * SANITIZE=1 build would flag a misaligned typed load) */
static void test_unaligned_file(void **state)
{
    (void)state;
    char dir[600], path[700];
    new_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/u.safetensors", dir);
    char h[512];
    snprintf(h, sizeof(h), "%s",
             "{\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[1,7]},"
             "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[7,11]},"
             "\"f\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[11,19]}}");
    /* pad so that every tensor starts at an odd address: f at 8 + hlen + 11 = 1 mod 4 */
    while ((8 + strlen(h) + 11) % 4 != 1)
        strcat(h, " ");
    uint8_t d[19] = {0xaa};
    const uint16_t bf[3] = {0x3f80, 0xc040, 0x4120}; /* 1, -3, 10 */
    const uint16_t hf[2] = {0x3c00, 0xb800};         /* 1, -0.5 */
    const float ff[2] = {2.5f, -1e-3f};
    memcpy(d + 1, bf, 6);
    memcpy(d + 7, hf, 4);
    memcpy(d + 11, ff, 8);
    write_st(path, h, d, sizeof(d));
    mdl_st_file_t *f;
    assert_int_equal(mdl_st_file_open(path, &f), AFD_OK);
    float v[3];
    afd_convert_to_f32(AFD_DTYPE_BF16, find_in(f, "b")->data, v, 3);
    assert_true(v[0] == 1.0f && v[1] == -3.0f && v[2] == 10.0f);
    afd_convert_to_f32(AFD_DTYPE_F16, find_in(f, "h")->data, v, 2);
    assert_true(v[0] == 1.0f && v[1] == -0.5f);
    afd_convert_to_f32(AFD_DTYPE_F32, find_in(f, "f")->data, v, 2);
    assert_true(v[0] == 2.5f && v[1] == -1e-3f);
    int odd = ((uintptr_t)find_in(f, "b")->data & 1) && ((uintptr_t)find_in(f, "h")->data & 1) &&
              ((uintptr_t)find_in(f, "f")->data & 1);
    mdl_st_file_close(f);
    assert_true(odd); /* really unaligned */
}

/* ---- checkpoints ---- */

static void write_shard(const char *dir, const char *file, const char *const *names, int n,
                        uint8_t fillbyte)
{
    char h[4096] = "{", path[700];
    uint8_t data[1024];
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t nb = 8 * (size_t)(i + 1); /* F32 [2 * (i + 1)] */
        snprintf(h + strlen(h), sizeof(h) - strlen(h),
                 "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]}",
                 i ? "," : "", names[i], 2 * (i + 1), off, off + nb);
        memset(data + off, fillbyte + i, nb);
        off += nb;
    }
    strcat(h, "}");
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    write_st(path, h, data, off);
}

static void write_text(const char *dir, const char *file, const char *text)
{
    char path[700];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    write_bytes(path, text, strlen(text));
}

#define S1 "model-00001-of-00002.safetensors"
#define S2 "model-00002-of-00002.safetensors"

static void test_ckpt_single(void **state)
{
    (void)state;
    char dir[600], path[700];
    new_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    write_st(path, good_header(), g_data, 60);
    mdl_ckpt_t *ck = NULL;
    assert_int_equal(mdl_ckpt_open(dir, &ck), AFD_OK);
    assert_int_equal(ck->nfiles, 1);
    assert_int_equal(ck->ntensors, 6);
    assert_int_equal(ck->total_bytes, 24 + 8 + 8 + 15 + 4 + 0);
    check_good_file(ck->files[0]);
    const mdl_st_tensor_t *t = mdl_ckpt_find(ck, "d.fp8");
    assert_non_null(t);
    assert_ptr_equal(t, find_in(ck->files[0], "d.fp8"));
    assert_null(mdl_ckpt_find(ck, "d.fp"));
    assert_null(mdl_ckpt_find(ck, "__metadata__"));
    assert_null(mdl_ckpt_find(ck, ""));
    mdl_ckpt_close(ck);
    mdl_ckpt_close(NULL);
}

static void test_ckpt_sharded(void **state)
{
    (void)state;
    char dir[600];
    new_dir(dir, sizeof(dir));
    const char *n1[] = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"};
    const char *n2[] = {"lm_head.weight"};
    write_shard(dir, S1, n1, 2, 0x10);
    write_shard(dir, S2, n2, 1, 0x20);
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\":{\"total_size\":32},\"weight_map\":{"
               "\"model.embed_tokens.weight\":\"" S1 "\","
               "\"lm_head.weight\":\"" S2 "\","
               "\"model.layers.0.mlp.up_proj.weight\":\"" S1 "\"}}");
    mdl_ckpt_t *ck = NULL;
    assert_int_equal(mdl_ckpt_open(dir, &ck), AFD_OK);
    assert_int_equal(ck->nfiles, 2);
    assert_int_equal(ck->ntensors, 3);
    assert_int_equal(ck->total_bytes, 8 + 16 + 8);
    const mdl_st_tensor_t *a = mdl_ckpt_find(ck, "model.embed_tokens.weight"),
                          *b = mdl_ckpt_find(ck, "model.layers.0.mlp.up_proj.weight"),
                          *c = mdl_ckpt_find(ck, "lm_head.weight");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_string_equal(a->file->base, S1);
    assert_string_equal(b->file->base, S1);
    assert_string_equal(c->file->base, S2);
    assert_int_equal(b->shape[0], 4);
    assert_int_equal(b->data[0], 0x11);
    assert_int_equal(c->data[7], 0x20);
    mdl_ckpt_close(ck);
}

static void expect_ckpt(const char *dir, afd_status_t want)
{
    mdl_ckpt_t *ck = (mdl_ckpt_t *)(uintptr_t)0x1;
    afd_status_t st = mdl_ckpt_open(dir, &ck);
    if (st == AFD_OK)
        mdl_ckpt_close(ck);
    else
        assert_ptr_equal(ck, (mdl_ckpt_t *)(uintptr_t)0x1);
    if (st != want) fail_msg("%s: status %d (%s), want %d", dir, st, afd_status_str(st), want);
}

static void test_ckpt_errors(void **state)
{
    (void)state;
    char dir[600];
    const char *n1[] = {"a", "b"}, *n2[] = {"c"}, *n2dup[] = {"c", "a"};
    /* the index names a tensor under a shard that does not hold it */
    new_dir(dir, sizeof(dir));
    write_shard(dir, S1, n1, 2, 1);
    write_shard(dir, S2, n2, 1, 2);
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"b\":\"" S1 "\",\"c\":\"" S1 "\"}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);
    /* ... with both shards opened: b is in S1 but the index says S2 */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"b\":\"" S2 "\",\"c\":\"" S2 "\"}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);
    /* ... or a tensor no shard holds */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"c\":\"" S2 "\",\"zzz\":\"" S2 "\"}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);
    /* the same index without the bad entries opens */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"c\":\"" S2 "\"}}");
    expect_ckpt(dir, AFD_OK);
    /* a shard name with a '/' (or a dot name) is refused before it is opened */
    const char *bad_names[] = {"sub/x.safetensors", "../" S1, "/etc/passwd", "..", "."};
    for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
        char idx[512];
        snprintf(idx, sizeof(idx), "{\"weight_map\":{\"a\":\"%s\"}}", bad_names[i]);
        write_text(dir, "model.safetensors.index.json", idx);
        expect_ckpt(dir, AFD_ERR_FORMAT);
    }
    /* a shard the index names does not exist */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"q\":\"model-00003-of-00003.safetensors\"}}");
    expect_ckpt(dir, AFD_ERR_NOT_FOUND);
    /* bad index files */
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":");
    expect_ckpt(dir, AFD_ERR_FORMAT);
    write_text(dir, "model.safetensors.index.json", "{\"metadata\":{}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":[\"" S1 "\"]}");
    expect_ckpt(dir, AFD_ERR_FORMAT);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a\":1}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);

    /* a tensor in two shards */
    new_dir(dir, sizeof(dir));
    write_shard(dir, S1, n1, 2, 1);
    write_shard(dir, S2, n2dup, 2, 2);
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"b\":\"" S1 "\",\"c\":\"" S2 "\"}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);

    /* a bad shard fails the checkpoint with the shard's status */
    new_dir(dir, sizeof(dir));
    write_shard(dir, S1, n1, 2, 1);
    write_text(dir, S2, "garbage!garbage!");
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"" S1 "\",\"c\":\"" S2 "\"}}");
    expect_ckpt(dir, AFD_ERR_FORMAT);

    /* one file with the same tensor twice (duplicate JSON keys) */
    new_dir(dir, sizeof(dir));
    char path[700];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    write_st(path,
             "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
             "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
             g_data, 8);
    expect_ckpt(dir, AFD_ERR_FORMAT);

    /* neither the index nor model.safetensors; and a directory that does not exist */
    new_dir(dir, sizeof(dir));
    write_shard(dir, S1, n1, 2, 1); /* shards without an index are not found either */
    expect_ckpt(dir, AFD_ERR_NOT_FOUND);
    strcat(dir, "/nonexistent");
    expect_ckpt(dir, AFD_ERR_NOT_FOUND);
}

/* ---- fuzz ---- */

static uint64_t g_rng;
static uint64_t rnd(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void mutate(uint8_t *b, size_t n, size_t lo, size_t hi)
{
    static const char tokens[] = "{}[]\",:0123456789-.eE \\";
    int k = 1 + (int)(rnd() % 6);
    for (int j = 0; j < k; j++) {
        size_t at = lo + rnd() % (hi - lo);
        if (at >= n) continue;
        switch (rnd() % 4) {
        case 0:
            b[at] = (uint8_t)rnd();
            break;
        case 1:
            b[at] ^= (uint8_t)(1u << (rnd() % 8));
            break;
        default:
            b[at] = (uint8_t)tokens[rnd() % (sizeof(tokens) - 1)];
            break;
        }
    }
}

/* the loader's promises about an accepted file */
static void check_invariants(const mdl_st_file_t *f, size_t data_size)
{
    assert_true(f->ntensors >= 0);
    for (int i = 0; i < f->ntensors; i++) {
        const mdl_st_tensor_t *t = &f->tensors[i];
        assert_non_null(t->name);
        assert_true(strlen(t->name) >= 1 && strlen(t->name) <= MDL_ST_MAX_NAME);
        assert_true(t->dtype < AFD_DTYPE_COUNT);
        assert_true(t->ndim >= 0 && t->ndim <= MDL_ST_MAX_NDIM);
        uint64_t el = 1;
        for (int d = 0; d < t->ndim; d++) {
            assert_true(t->shape[d] >= 0);
            el *= (uint64_t)t->shape[d];
        }
        assert_int_equal(t->nbytes, el * afd_dtype_size(t->dtype));
        if (f->map) {
            const uint8_t *d0 = f->map + f->data_start;
            assert_true(t->data >= d0 && t->data + t->nbytes <= d0 + data_size);
            assert_true(f->data_start + data_size == f->size);
            for (int j = 0; j < i; j++) {
                const mdl_st_tensor_t *u = &f->tensors[j];
                if (t->nbytes && u->nbytes)
                    assert_true(t->data + t->nbytes <= u->data || u->data + u->nbytes <= t->data);
            }
        }
    }
}

static void test_fuzz_header(void **state)
{
    (void)state;
    char dir[600], path[700];
    new_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/fuzz.safetensors", dir);
    const char *h = good_header();
    size_t hl = strlen(h), n;
    uint8_t *good = st_build(h, hl, g_data, 60, &n);
    uint8_t *buf = malloc(n);
    assert_non_null(buf);
    g_rng = 20240601;
    int ok = 0, err = 0, q = quiet_begin();
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* through the file: the length field, header and truncation */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    for (int it = 0; it < 3000; it++) {
        memcpy(buf, good, n);
        size_t len = n;
        if (rnd() % 10 == 0) mutate(buf, n, 0, 8);
        mutate(buf, n, 8, 8 + hl);
        if (rnd() % 8 == 0) len = (size_t)(rnd() % n);
        assert_int_equal(pwrite(fd, buf, len, 0), (ssize_t)len);
        assert_int_equal(ftruncate(fd, (off_t)len), 0);
        mdl_st_file_t *f = NULL;
        afd_status_t st = mdl_st_file_open(path, &f);
        if (st == AFD_OK) {
            check_invariants(f, f->size - f->data_start);
            mdl_st_file_close(f);
            ok++;
        } else {
            assert_true(st < 0);
            err++;
        }
    }
    close(fd);
    struct timespec tm;
    clock_gettime(CLOCK_MONOTONIC, &tm);
    /* straight into the header parser: more iterations, heavier mutation */
    for (int it = 0; it < 20000; it++) {
        memcpy(buf, good, n);
        mutate(buf, n, 8, 8 + hl);
        if (rnd() % 2) mutate(buf, n, 8, 8 + hl);
        size_t plen = rnd() % 16 == 0 ? (size_t)(rnd() % hl) : hl;
        mdl_st_file_t *f = calloc(1, sizeof(*f));
        assert_non_null(f);
        f->base = "fuzz";
        afd_status_t st = mdl_st_header_parse(f, (const char *)buf + 8, plen, 60);
        if (st == AFD_OK) {
            check_invariants(f, 60);
            ok++;
        } else {
            assert_true(st < 0);
            err++;
        }
        mdl_st_file_close(f); /* frees the names and tensors; path and map are NULL */
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    quiet_end(q);
    print_message("fuzz: %d accepted, %d rejected; %.2f s through files, %.2f s in memory\n", ok,
                  err, (double)(tm.tv_sec - t0.tv_sec) + (tm.tv_nsec - t0.tv_nsec) * 1e-9,
                  (double)(t1.tv_sec - tm.tv_sec) + (t1.tv_nsec - tm.tv_nsec) * 1e-9);
    assert_true(ok > 100); /* the mutations keep some files valid: the OK path is exercised */
    assert_true(err > 1000);
    free(buf);
    free(good);
}

int main(void)
{
    fill_data();
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_file),
        cmocka_unit_test(test_header_length),
        cmocka_unit_test(test_header_errors),
        cmocka_unit_test(test_long_name),
        cmocka_unit_test(test_unaligned_file),
        cmocka_unit_test(test_ckpt_single),
        cmocka_unit_test(test_ckpt_sharded),
        cmocka_unit_test(test_ckpt_errors),
        cmocka_unit_test(test_fuzz_header),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
