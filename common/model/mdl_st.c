/* mdl_st: safetensors parsing over mmap, and the sharded checkpoint index. */
#define _GNU_SOURCE
#include "mdl_st.h"
#include "afd_log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

const char *mdl_st_shape_str(const mdl_st_tensor_t *t, char *buf, size_t len)
{
    size_t k = 0;
    k += (size_t)snprintf(buf + k, len - k, "[");
    for (int i = 0; i < t->ndim && k < len; i++)
        k += (size_t)snprintf(buf + k, len - k, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (k < len) snprintf(buf + k, len - k, "]");
    return buf;
}

typedef struct span {
    uint64_t begin, end;
    int idx;
} span_t;

static int span_cmp(const void *a, const void *b)
{
    const span_t *x = a, *y = b;
    return x->begin < y->begin   ? -1
           : x->begin > y->begin ? 1
                                 : (x->end > y->end) - (x->end < y->end);
}

static int parse_u64(const cJSON *v, uint64_t *out)
{
    /* JSON numbers are doubles in cJSON: exact up to 2^53, far beyond any shard */
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0 ||
        v->valuedouble != floor(v->valuedouble))
        return -1;
    *out = (uint64_t)v->valuedouble;
    return 0;
}

afd_status_t mdl_st_header_parse(mdl_st_file_t *f, const char *json, size_t len, uint64_t data_size)
{
    const char *fn = f->base;
    afd_status_t st = AFD_ERR_FORMAT;
    cJSON *root = cJSON_ParseWithLength(json, len);
    span_t *spans = NULL;
    if (!root || !cJSON_IsObject(root)) {
        afd_error("%s: header is not a JSON object", fn);
        goto out;
    }
    int n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) if (strcmp(e->string, "__metadata__") != 0) n++;
    if (n > MDL_ST_MAX_TENSORS) {
        afd_error("%s: header lists %d tensors (at most %d)", fn, n, MDL_ST_MAX_TENSORS);
        st = AFD_ERR_RANGE;
        goto out;
    }
    f->tensors = calloc((size_t)(n ? n : 1), sizeof(*f->tensors));
    spans = calloc((size_t)(n ? n : 1), sizeof(*spans));
    if (!f->tensors || !spans) {
        st = AFD_ERR_NOMEM;
        goto out;
    }
    int i = 0;
    cJSON_ArrayForEach(e, root)
    {
        if (!strcmp(e->string, "__metadata__")) {
            if (!cJSON_IsObject(e)) {
                afd_error("%s: __metadata__ is not an object", fn);
                goto out;
            }
            continue;
        }
        const char *name = e->string;
        mdl_st_tensor_t *t = &f->tensors[i];
        if (strlen(name) == 0 || strlen(name) > MDL_ST_MAX_NAME) {
            afd_error("%s: tensor name of length %zu (1..%d allowed)", fn, strlen(name),
                      MDL_ST_MAX_NAME);
            goto out;
        }
        if (!(t->name = strdup(name))) {
            st = AFD_ERR_NOMEM;
            goto out;
        }
        f->ntensors = i + 1;
        t->file = f;
        if (!cJSON_IsObject(e)) {
            afd_error("%s: tensor '%s': entry is not an object", fn, name);
            goto out;
        }
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
        const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsString(dt) ||
            (t->dtype = afd_dtype_from_safetensors(dt->valuestring)) == AFD_DTYPE_COUNT) {
            afd_error("%s: tensor '%s': unsupported dtype %s", fn, name,
                      cJSON_IsString(dt) ? dt->valuestring : "(missing)");
            st = cJSON_IsString(dt) ? AFD_ERR_UNSUPPORTED : AFD_ERR_FORMAT;
            goto out;
        }
        if (!cJSON_IsArray(sh) || cJSON_GetArraySize(sh) > MDL_ST_MAX_NDIM) {
            afd_error("%s: tensor '%s': shape is not a list of at most %d sizes", fn, name,
                      MDL_ST_MAX_NDIM);
            goto out;
        }
        uint64_t elems = 1;
        const cJSON *d;
        t->ndim = 0;
        cJSON_ArrayForEach(d, sh)
        {
            uint64_t v;
            if (parse_u64(d, &v) || v > (1ull << 40)) {
                afd_error("%s: tensor '%s': bad dimension in shape", fn, name);
                goto out;
            }
            t->shape[t->ndim++] = (int64_t)v;
            if (v && elems > (1ull << 50) / v) {
                afd_error("%s: tensor '%s': shape too large", fn, name);
                goto out;
            }
            elems *= v;
        }
        uint64_t b, en;
        if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
            parse_u64(cJSON_GetArrayItem(off, 0), &b) ||
            parse_u64(cJSON_GetArrayItem(off, 1), &en)) {
            afd_error("%s: tensor '%s': data_offsets is not [begin, end]", fn, name);
            goto out;
        }
        if (b > en || en > data_size) {
            afd_error("%s: tensor '%s': data_offsets [%llu, %llu] outside the %llu data bytes "
                      "(truncated file?)",
                      fn, name, (unsigned long long)b, (unsigned long long)en,
                      (unsigned long long)data_size);
            st = AFD_ERR_RANGE;
            goto out;
        }
        uint64_t want = elems * afd_dtype_size(t->dtype);
        if (en - b != want) {
            char sb[128];
            afd_error("%s: tensor '%s': shape %s of %s needs %llu bytes, data_offsets give %llu",
                      fn, name, mdl_st_shape_str(t, sb, sizeof(sb)), dt->valuestring,
                      (unsigned long long)want, (unsigned long long)(en - b));
            goto out;
        }
        t->nbytes = want;
        t->data = f->map ? f->map + f->data_start + b : NULL;
        spans[i] = (span_t){b, en, i};
        i++;
    }
    qsort(spans, (size_t)n, sizeof(*spans), span_cmp);
    for (int k = 1; k < n; k++) {
        if (spans[k].begin < spans[k - 1].end) {
            afd_error("%s: tensor '%s' overlaps tensor '%s'", fn, f->tensors[spans[k].idx].name,
                      f->tensors[spans[k - 1].idx].name);
            goto out;
        }
    }
    st = AFD_OK;
out:
    free(spans);
    cJSON_Delete(root);
    return st;
}

afd_status_t mdl_st_file_open(const char *path, mdl_st_file_t **out)
{
    afd_status_t st;
    mdl_st_file_t *f = calloc(1, sizeof(*f));
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return AFD_ERR_NOMEM;
    }
    const char *slash = strrchr(f->path, '/');
    f->base = slash ? slash + 1 : f->path;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        afd_error("%s: %m", path);
        st = errno == ENOENT ? AFD_ERR_NOT_FOUND : AFD_ERR_IO;
        goto err_free;
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        afd_error("%s: fstat: %m", path);
        st = AFD_ERR_IO;
        goto err_close;
    }
    f->size = (size_t)sb.st_size;
    if (f->size < 8) {
        afd_error("%s: %zu bytes, too short for a safetensors header", f->base, f->size);
        st = AFD_ERR_FORMAT;
        goto err_close;
    }
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        afd_error("%s: mmap: %m", path);
        st = AFD_ERR_IO;
        goto err_close;
    }
    close(fd);
    fd = -1;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | f->map[i];
    if (hlen == 0 || hlen > MDL_ST_MAX_HEADER || hlen > f->size - 8) {
        afd_error("%s: header length %llu is not within the file (%zu bytes) and %u", f->base,
                  (unsigned long long)hlen, f->size, MDL_ST_MAX_HEADER);
        st = AFD_ERR_FORMAT;
        goto err_unmap;
    }
    f->data_start = 8 + (size_t)hlen;
    if ((st = mdl_st_header_parse(f, (const char *)f->map + 8, (size_t)hlen,
                                  f->size - f->data_start)))
        goto err_unmap;
    *out = f;
    return AFD_OK;
err_unmap:
err_close:
    if (fd >= 0) close(fd);
err_free:
    mdl_st_file_close(f);
    return st;
}

void mdl_st_file_close(mdl_st_file_t *f)
{
    if (!f) return;
    for (int i = 0; i < f->ntensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    if (f->map) munmap(f->map, f->size);
    free(f->path);
    free(f);
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static mdl_st_tensor_t **ckpt_slot(const mdl_ckpt_t *ck, const char *name)
{
    size_t i = hash_str(name) & (ck->nslots - 1);
    while (ck->slots[i] && strcmp(ck->slots[i]->name, name) != 0)
        i = (i + 1) & (ck->nslots - 1);
    return &ck->slots[i];
}

const mdl_st_tensor_t *mdl_ckpt_find(const mdl_ckpt_t *ck, const char *name)
{
    return *ckpt_slot(ck, name);
}

static afd_status_t ckpt_add_file(mdl_ckpt_t *ck, const char *name)
{
    if (strchr(name, '/') || !strcmp(name, "..") || !strcmp(name, ".")) {
        afd_error("%s: shard name '%s' must be a plain file name", ck->dir, name);
        return AFD_ERR_FORMAT;
    }
    for (int i = 0; i < ck->nfiles; i++)
        if (!strcmp(ck->files[i]->base, name)) return AFD_OK;
    if (ck->nfiles == MDL_ST_MAX_SHARDS) {
        afd_error("%s: more than %d shards", ck->dir, MDL_ST_MAX_SHARDS);
        return AFD_ERR_RANGE;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", ck->dir, name);
    mdl_st_file_t *f;
    afd_status_t st = mdl_st_file_open(path, &f);
    if (st) return st;
    mdl_st_file_t **nf = realloc(ck->files, sizeof(*nf) * (size_t)(ck->nfiles + 1));
    if (!nf) {
        mdl_st_file_close(f);
        return AFD_ERR_NOMEM;
    }
    ck->files = nf;
    ck->files[ck->nfiles++] = f;
    return AFD_OK;
}

static afd_status_t ckpt_build_table(mdl_ckpt_t *ck)
{
    size_t n = 0;
    for (int i = 0; i < ck->nfiles; i++)
        n += (size_t)ck->files[i]->ntensors;
    ck->nslots = 16;
    while (ck->nslots < 2 * n)
        ck->nslots <<= 1;
    if (!(ck->slots = calloc(ck->nslots, sizeof(*ck->slots)))) return AFD_ERR_NOMEM;
    for (int i = 0; i < ck->nfiles; i++) {
        mdl_st_file_t *f = ck->files[i];
        for (int k = 0; k < f->ntensors; k++) {
            mdl_st_tensor_t **s = ckpt_slot(ck, f->tensors[k].name);
            if (*s) {
                afd_error("%s: tensor '%s' is in both %s and %s", ck->dir, f->tensors[k].name,
                          (*s)->file->base, f->base);
                return AFD_ERR_FORMAT;
            }
            *s = &f->tensors[k];
            ck->ntensors++;
            ck->total_bytes += f->tensors[k].nbytes;
        }
    }
    return AFD_OK;
}

static char *read_small_file(const char *path, size_t max, afd_status_t *st)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        *st = errno == ENOENT ? AFD_ERR_NOT_FOUND : AFD_ERR_IO;
        return NULL;
    }
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, fp) : 0;
    fclose(fp);
    if (!buf) {
        *st = AFD_ERR_NOMEM;
        return NULL;
    }
    if (n > max) {
        free(buf);
        *st = AFD_ERR_RANGE;
        return NULL;
    }
    buf[n] = 0;
    *st = AFD_OK;
    return buf;
}

afd_status_t mdl_ckpt_open(const char *dir, mdl_ckpt_t **out)
{
    afd_status_t st;
    mdl_ckpt_t *ck = calloc(1, sizeof(*ck));
    if (!ck || !(ck->dir = strdup(dir))) {
        free(ck);
        return AFD_ERR_NOMEM;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    char *idx = read_small_file(path, 64u << 20, &st);
    cJSON *root = NULL;
    if (!idx && st == AFD_ERR_NOT_FOUND) {
        if ((st = ckpt_add_file(ck, "model.safetensors"))) {
            if (st == AFD_ERR_NOT_FOUND)
                afd_error("%s: neither model.safetensors.index.json nor model.safetensors", dir);
            goto err;
        }
    } else if (!idx) {
        afd_error("%s: cannot read (%s)", path, afd_status_str(st));
        goto err;
    } else {
        root = cJSON_Parse(idx);
        const cJSON *wm = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
        if (!cJSON_IsObject(wm)) {
            afd_error("%s: %s", path, root ? "no 'weight_map' object" : "invalid JSON");
            st = AFD_ERR_FORMAT;
            goto err;
        }
        const cJSON *e;
        cJSON_ArrayForEach(e, wm)
        {
            if (!cJSON_IsString(e)) {
                afd_error("%s: weight_map entry '%s' is not a file name", path, e->string);
                st = AFD_ERR_FORMAT;
                goto err;
            }
            if ((st = ckpt_add_file(ck, e->valuestring))) goto err;
        }
    }
    if ((st = ckpt_build_table(ck))) goto err;
    if (root) {
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(root, "weight_map"))
        {
            const mdl_st_tensor_t *t = mdl_ckpt_find(ck, e->string);
            if (!t || strcmp(t->file->base, e->valuestring) != 0) {
                afd_error("%s: tensor '%s' is listed in the index under %s but is not there", dir,
                          e->string, e->valuestring);
                st = AFD_ERR_FORMAT;
                goto err;
            }
        }
    }
    cJSON_Delete(root);
    free(idx);
    *out = ck;
    return AFD_OK;
err:
    cJSON_Delete(root);
    free(idx);
    mdl_ckpt_close(ck);
    return st;
}

void mdl_ckpt_close(mdl_ckpt_t *ck)
{
    if (!ck) return;
    for (int i = 0; i < ck->nfiles; i++)
        mdl_st_file_close(ck->files[i]);
    free(ck->files);
    free(ck->slots);
    free(ck->dir);
    free(ck);
}
