/*
 * Unit tests for mdl_model (role loading, sliced reads, FFN partial sums), mdl_kv and
 * mdl_runner on the cpu backend. At start the tests write two tiny checkpoints (bf16 and
 * fp8) with the afd_mkmodel binary ($BIN, default build/bin) into a mkdtemp directory,
 * removed at the end.
 *
 * Tolerances:
 *   - sliced weights (FFN shares vs the full model, and vs the raw checkpoint bytes):
 *     exact (bit-identical floats).
 *   - partial sums: the sum over shares (and over the tensor-parallel ranks of each share)
 *     of mdl_ffn outputs for F x T = 2x1, 3x1, 1x2, 2x2, 1x3 equals mdl_ffn of F = 1 to
 *     max|sum - ref| <= 1e-4 * max|ref| (relative to the largest output element).
 *   - runner: batched vs alone logits agree to max|a - b| <= 1e-4 * max(1, max|alone|).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "afd_dtype.h"
#include "afd_status.h"
#include "kn_ops.h"
#include "mdl_config.h"
#include "mdl_kv.h"
#include "mdl_model.h"
#include "mdl_runner.h"
#include "mdl_st.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { DT_BF16 = 0, DT_FP8 = 1, NDT = 2 };
static const char *dt_names[NDT] = {"bf16", "fp8"};

static char g_root[4096];
static char g_dir[NDT][4200];
static kn_backend_t *g_be;

/* ---- setup ---- */

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_setup(void **state)
{
    (void)state;
    const char *bin = getenv("BIN");
    if (!bin || !*bin) bin = "build/bin";
    const char *tmp = getenv("TEST_TMP");
    snprintf(g_root, sizeof(g_root), "%s/test_model.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_root)) {
        perror("mkdtemp");
        return -1;
    }
    for (int d = 0; d < NDT; d++) {
        snprintf(g_dir[d], sizeof(g_dir[d]), "%s/tiny-%s", g_root, dt_names[d]);
        char cmd[9000];
        snprintf(cmd, sizeof(cmd),
                 "'%s/afd_mkmodel' --out '%s' --preset tiny --dtype %s --force >/dev/null", bin,
                 g_dir[d], dt_names[d]);
        if (system(cmd) != 0) {
            fprintf(stderr, "test_model: '%s' failed\n", cmd);
            return -1;
        }
    }
    if (kn_cpu_create(1, &g_be) != AFD_OK) return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (g_be) g_be->ops->destroy(g_be);
    g_be = NULL;
    if (g_root[0]) nftw(g_root, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* ---- helpers ---- */

typedef struct ck {
    mdl_config_t cfg;
    mdl_ckpt_t *ck;
} ck_t;

static void ck_open(const char *dir, ck_t *c)
{
    assert_int_equal(mdl_config_load(dir, &c->cfg), AFD_OK);
    assert_int_equal(mdl_ckpt_open(dir, &c->ck), AFD_OK);
}

static void ck_close(ck_t *c)
{
    mdl_ckpt_close(c->ck);
    c->ck = NULL;
}

static mdl_model_t *load_role(const ck_t *c, int attn, int ffn, int i, int n)
{
    mdl_role_t r = {.attn = attn, .ffn = ffn, .ffn_index = i, .ffn_count = n};
    mdl_model_t *m = NULL;
    assert_int_equal(mdl_model_load(c->ck, &c->cfg, g_be, &r, 0, &m), AFD_OK);
    assert_non_null(m);
    return m;
}

static mdl_model_t *load_ffn_tp(const ck_t *c, int i, int n, int t, int tn)
{
    mdl_role_t r = {.ffn = 1, .ffn_index = i, .ffn_count = n, .tp_index = t, .tp_count = tn};
    mdl_model_t *m = NULL;
    assert_int_equal(mdl_model_load(c->ck, &c->cfg, g_be, &r, 0, &m), AFD_OK);
    assert_non_null(m);
    return m;
}

static mdl_model_t *load_ffn(const ck_t *c, int i, int n)
{
    return load_role(c, 0, 1, i, n);
}

static const float *wdata(const kn_weight_t *w)
{
    return (const float *)w->data;
}

/* a == b bit for bit */
static void assert_weight_eq(const kn_weight_t *a, const kn_weight_t *b)
{
    assert_non_null(a->data);
    assert_non_null(b->data);
    assert_int_equal(a->rows, b->rows);
    assert_int_equal(a->cols, b->cols);
    assert_memory_equal(a->data, b->data, sizeof(float) * (size_t)(a->rows * a->cols));
}

/* share (rows [r0, r0+share.rows) of full) bit for bit */
static void assert_rows_of(const kn_weight_t *share, const kn_weight_t *full, int64_t r0)
{
    assert_int_equal(share->cols, full->cols);
    assert_true(r0 >= 0 && r0 + share->rows <= full->rows);
    assert_memory_equal(share->data, wdata(full) + r0 * full->cols,
                        sizeof(float) * (size_t)(share->rows * share->cols));
}

/* share (columns [c0, c0+share.cols) of full) bit for bit */
static void assert_cols_of(const kn_weight_t *share, const kn_weight_t *full, int64_t c0)
{
    assert_int_equal(share->rows, full->rows);
    assert_true(c0 >= 0 && c0 + share->cols <= full->cols);
    for (int64_t r = 0; r < share->rows; r++)
        assert_memory_equal(wdata(share) + r * share->cols, wdata(full) + r * full->cols + c0,
                            sizeof(float) * (size_t)share->cols);
}

static int weight_finite(const kn_weight_t *w)
{
    const float *d = wdata(w);
    for (int64_t i = 0; i < w->rows * w->cols; i++)
        if (!isfinite(d[i])) return 0;
    return 1;
}

/* the value of element (e, r, c) of a [E, R, C] (or [R, C] with e = 0) checkpoint tensor,
 * decoded from the raw bytes independently of the loader */
static float raw_get(const mdl_ckpt_t *ck, const char *name, int64_t e, int64_t r, int64_t c)
{
    const mdl_st_tensor_t *t = mdl_ckpt_find(ck, name);
    assert_non_null(t);
    int64_t R = t->shape[t->ndim - 2], C = t->shape[t->ndim - 1];
    size_t idx = (size_t)((e * R + r) * C + c);
    if (t->dtype == AFD_DTYPE_BF16) {
        uint16_t h;
        memcpy(&h, t->data + 2 * idx, 2);
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    assert_int_equal(t->dtype, AFD_DTYPE_E4M3);
    char sn[MDL_ST_MAX_NAME + 16];
    snprintf(sn, sizeof(sn), "%s_scale_inv", name);
    const mdl_st_tensor_t *s = mdl_ckpt_find(ck, sn);
    assert_non_null(s);
    int64_t br = (R + 127) / 128, bc = (C + 127) / 128;
    float sc;
    memcpy(&sc, s->data + 4 * (size_t)(e * br * bc + (r / 128) * bc + c / 128), 4);
    return afd_e4m3_to_f32(t->data[idx]) * sc;
}

/* deterministic random numbers */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double urand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}

/* ---- role loading ---- */

static uint64_t ffn_bytes_expected(const ck_t *c, const mdl_model_t *m)
{
    uint64_t b = 0;
    char n[256];
    const mdl_config_t *cfg = &c->cfg;
    int64_t H = cfg->hidden_size;
    for (int l = 0; l < cfg->num_layers; l++) {
        const mdl_ffn_layer_t *f = &m->ffn[l];
        const char *pre = f->is_moe ? "share_expert" : "mlp";
        snprintf(n, sizeof(n), "model.layers.%d.%s.gate_proj.weight", l, pre);
        const mdl_st_tensor_t *t = mdl_ckpt_find(c->ck, n);
        assert_non_null(t);
        b += 3 * (uint64_t)(f->i1 - f->i0) * (uint64_t)H * afd_dtype_size(t->dtype);
        if (!f->is_moe) continue;
        snprintf(n, sizeof(n), "model.layers.%d.moe.gate_proj.weight", l);
        assert_non_null(t = mdl_ckpt_find(c->ck, n));
        b += 3 * (uint64_t)(f->e1 - f->e0) * (uint64_t)(f->ei1 - f->ei0) * (uint64_t)H *
             afd_dtype_size(t->dtype);
    }
    return b;
}

static void test_role_loading(void **state)
{
    int dt = (int)(intptr_t)*state;
    ck_t c;
    ck_open(g_dir[dt], &c);
    const mdl_config_t *cfg = &c.cfg;
    int L = cfg->num_layers, E = cfg->num_experts, H = cfg->hidden_size;
    assert_true(E >= 3 && mdl_config_num_moe(cfg) > 0 && mdl_config_num_moe(cfg) < L);

    /* attention role: attention weights, no FFN */
    mdl_model_t *a = load_role(&c, 1, 0, 0, 0);
    assert_null(a->ffn);
    assert_non_null(a->attn);
    assert_non_null(a->embed.data);
    assert_non_null(a->lm_head.data);
    assert_non_null(a->final_norm);
    for (int l = 0; l < L; l++) {
        assert_non_null(a->attn[l].q_proj.data);
        assert_non_null(a->attn[l].o_proj.data);
        if (cfg->is_moe[l]) {
            assert_non_null(a->attn[l].router.data);
            assert_int_equal(a->attn[l].router.rows, E);
            assert_int_equal(a->attn[l].router.cols, H);
        } else {
            assert_null(a->attn[l].router.data);
        }
    }
    assert_true(a->bytes_loaded > 0);

    /* the full FFN (F = 1) against the raw checkpoint bytes */
    mdl_model_t *full = load_ffn(&c, 0, 1);
    assert_null(full->attn);
    assert_null(full->embed.data);
    assert_null(full->lm_head.data);
    assert_null(full->final_norm);
    uint64_t ffn_total = full->bytes_loaded;
    assert_int_equal(ffn_total, ffn_bytes_expected(&c, full));
    for (int l = 0; l < L; l++) {
        const mdl_ffn_layer_t *f = &full->ffn[l];
        assert_int_equal(f->is_moe, cfg->is_moe[l]);
        int I = f->is_moe ? cfg->share_expert_dim : cfg->dense_inter;
        assert_int_equal(f->i0, 0);
        assert_int_equal(f->i1, I);
        char n[256];
        const char *pre = f->is_moe ? "share_expert" : "mlp";
        snprintf(n, sizeof(n), "model.layers.%d.%s.down_proj.weight", l, pre);
        for (int r = 0; r < H; r += 7)
            for (int k = 0; k < I; k += 5)
                assert_true(wdata(&f->down)[(size_t)r * I + k] == raw_get(c.ck, n, 0, r, k));
        if (!f->is_moe) continue;
        assert_int_equal(f->e0, 0);
        assert_int_equal(f->e1, E);
        static const char *proj[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int p = 0; p < 3; p++) {
            snprintf(n, sizeof(n), "model.layers.%d.moe.%s.weight", l, proj[p]);
            for (int e = 0; e < E; e++) {
                const kn_weight_t *w = p == 0 ? &f->egate[e] : p == 1 ? &f->eup[e] : &f->edown[e];
                assert_int_equal(w->rows, p == 2 ? H : cfg->moe_inter);
                assert_int_equal(w->cols, p == 2 ? cfg->moe_inter : H);
                for (int64_t r = 0; r < w->rows; r++)
                    for (int64_t k = 0; k < w->cols; k++)
                        if (wdata(w)[r * w->cols + k] != raw_get(c.ck, n, e, r, k))
                            fail_msg("%s %s expert %d (%lld, %lld): loaded %g, raw %g",
                                     dt_names[dt], n, e, (long long)r, (long long)k,
                                     (double)wdata(w)[r * w->cols + k],
                                     (double)raw_get(c.ck, n, e, r, k));
            }
        }
    }

    for (int F = 1; F <= 3; F++) {
        uint64_t sum = 0;
        int prev_e1[MDL_MAX_LAYERS] = {0}, prev_i1[MDL_MAX_LAYERS] = {0};
        for (int i = 0; i < F; i++) {
            mdl_model_t *m = load_ffn(&c, i, F);
            assert_null(m->attn);
            assert_null(m->embed.data);
            assert_null(m->lm_head.data);
            for (int l = 0; l < L; l++) {
                const mdl_ffn_layer_t *f = &m->ffn[l], *g = &full->ffn[l];
                int I = f->is_moe ? cfg->share_expert_dim : cfg->dense_inter;
                /* the slices tile the intermediate dimension */
                assert_int_equal(f->i0, (int)((long)i * I / F));
                assert_int_equal(f->i1, (int)((long)(i + 1) * I / F));
                assert_int_equal(f->i0, prev_i1[l]);
                prev_i1[l] = f->i1;
                if (i == F - 1) assert_int_equal(f->i1, I);
                assert_int_equal(f->gate.rows, f->i1 - f->i0);
                assert_int_equal(f->down.cols, f->i1 - f->i0);
                assert_rows_of(&f->gate, &g->gate, f->i0);
                assert_rows_of(&f->up, &g->up, f->i0);
                assert_cols_of(&f->down, &g->down, f->i0);
                if (!f->is_moe) continue;
                /* the expert ranges tile [0, E) */
                assert_int_equal(f->e0, (int)((long)i * E / F));
                assert_int_equal(f->e1, (int)((long)(i + 1) * E / F));
                assert_int_equal(f->e0, prev_e1[l]);
                prev_e1[l] = f->e1;
                if (i == F - 1) assert_int_equal(f->e1, E);
                for (int e = f->e0; e < f->e1; e++) {
                    assert_weight_eq(&f->egate[e - f->e0], &g->egate[e]);
                    assert_weight_eq(&f->eup[e - f->e0], &g->eup[e]);
                    assert_weight_eq(&f->edown[e - f->e0], &g->edown[e]);
                }
            }
            /* bytes: exactly this share's slices; about 1/F of the FFN bytes */
            assert_int_equal(m->bytes_loaded, ffn_bytes_expected(&c, m));
            double frac = (double)m->bytes_loaded / (double)ffn_total;
            if (fabs(frac - 1.0 / F) > 1.0 / E)
                fail_msg("%s share %d/%d read %.3f of the FFN bytes, want about %.3f", dt_names[dt],
                         i, F, frac, 1.0 / F);
            sum += m->bytes_loaded;
            mdl_model_free(m);
        }
        assert_int_equal(sum, ffn_total);
    }
    /* tensor-parallel ranks inside a share: their slices tile the share's slice of the
     * shared expert / dense MLP and all of moe_inter, and their bytes sum to the share's */
    for (int T = 2; T <= 3; T++) {
        int F = 2;
        uint64_t total = 0;
        for (int i = 0; i < F; i++) {
            mdl_model_t *share = load_ffn(&c, i, F);
            int prev_i1[MDL_MAX_LAYERS], prev_ei1[MDL_MAX_LAYERS] = {0};
            for (int l = 0; l < L; l++)
                prev_i1[l] = share->ffn[l].i0;
            for (int t = 0; t < T; t++) {
                mdl_model_t *m = load_ffn_tp(&c, i, F, t, T);
                for (int l = 0; l < L; l++) {
                    const mdl_ffn_layer_t *f = &m->ffn[l], *g = &full->ffn[l], *s = &share->ffn[l];
                    assert_int_equal(f->i0, prev_i1[l]);
                    assert_true(f->i1 > f->i0);
                    prev_i1[l] = f->i1;
                    if (t == T - 1) assert_int_equal(f->i1, s->i1);
                    assert_rows_of(&f->gate, &g->gate, f->i0);
                    assert_rows_of(&f->up, &g->up, f->i0);
                    assert_cols_of(&f->down, &g->down, f->i0);
                    if (!f->is_moe) continue;
                    assert_int_equal(f->e0, s->e0);
                    assert_int_equal(f->e1, s->e1);
                    assert_int_equal(f->ei0, prev_ei1[l]);
                    assert_true(f->ei1 > f->ei0);
                    prev_ei1[l] = f->ei1;
                    if (t == T - 1) assert_int_equal(f->ei1, cfg->moe_inter);
                    for (int e = f->e0; e < f->e1; e++) {
                        assert_int_equal(f->egate[e - f->e0].rows, f->ei1 - f->ei0);
                        assert_int_equal(f->edown[e - f->e0].cols, f->ei1 - f->ei0);
                        assert_rows_of(&f->egate[e - f->e0], &g->egate[e], f->ei0);
                        assert_rows_of(&f->eup[e - f->e0], &g->eup[e], f->ei0);
                        assert_cols_of(&f->edown[e - f->e0], &g->edown[e], f->ei0);
                    }
                }
                assert_int_equal(m->bytes_loaded, ffn_bytes_expected(&c, m));
                total += m->bytes_loaded;
                mdl_model_free(m);
            }
            mdl_model_free(share);
        }
        assert_int_equal(total, ffn_total);
    }
    /* whole 128-column units when the dimension has enough of them */
    int d0, d1;
    mdl_role_slice_aligned(5120, 3, 8, 128, &d0, &d1);
    assert_int_equal(d0, 1920);
    assert_int_equal(d1, 2560);
    mdl_role_slice_aligned(5120, 7, 8, 128, &d0, &d1);
    assert_int_equal(d1, 5120);
    mdl_role_slice_aligned(192, 1, 2, 128, &d0, &d1); /* 1.5 units: plain halves */
    assert_int_equal(d0, 96);
    assert_int_equal(d1, 192);
    mdl_role_slice_aligned(1280, 1, 3, 128, &d0, &d1); /* 10 units over 3 ranks */
    assert_int_equal(d0, 384);
    assert_int_equal(d1, 768);
    mdl_model_free(full);
    mdl_model_free(a);
    ck_close(&c);
}

/* ---- only the needed bytes are read ---- */

static void copy_dir(const char *src, const char *dst)
{
    assert_int_equal(mkdir(dst, 0755), 0);
    DIR *d = opendir(src);
    assert_non_null(d);
    struct dirent *de;
    static char buf[1 << 16];
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char a[8400], b[8400];
        snprintf(a, sizeof(a), "%s/%s", src, de->d_name);
        snprintf(b, sizeof(b), "%s/%s", dst, de->d_name);
        int in = open(a, O_RDONLY), out = open(b, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        assert_true(in >= 0 && out >= 0);
        ssize_t n;
        while ((n = read(in, buf, sizeof(buf))) > 0)
            assert_int_equal(write(out, buf, (size_t)n), n);
        assert_int_equal(n, 0);
        close(in);
        close(out);
    }
    closedir(d);
}

/* overwrites [off, off+len) of tensor t's bytes in the copy at dir with 0x7f */
static void poison(const char *dir, const mdl_st_tensor_t *t, uint64_t off, uint64_t len)
{
    if (!len) return;
    assert_true(off + len <= t->nbytes);
    char p[8400];
    snprintf(p, sizeof(p), "%s/%s", dir, t->file->base);
    int fd = open(p, O_WRONLY);
    assert_true(fd >= 0);
    uint8_t *junk = malloc(len);
    assert_non_null(junk);
    memset(junk, 0x7f, len);
    off_t at = (off_t)(t->data - t->file->map) + (off_t)off;
    assert_int_equal(pwrite(fd, junk, len, at), (ssize_t)len);
    free(junk);
    close(fd);
}

/* poisons every expert outside [e0, e1) of a fused tensor (and its scales) */
static void poison_experts(const char *dir, const mdl_ckpt_t *ck, const char *name, int e0, int e1)
{
    char sn[MDL_ST_MAX_NAME + 16];
    snprintf(sn, sizeof(sn), "%s_scale_inv", name);
    const char *names[2] = {name, sn};
    for (int k = 0; k < 2; k++) {
        const mdl_st_tensor_t *t = mdl_ckpt_find(ck, names[k]);
        if (!t) {
            assert_int_equal(k, 1); /* bf16: no scales */
            continue;
        }
        uint64_t per = t->nbytes / (uint64_t)t->shape[0];
        poison(dir, t, 0, (uint64_t)e0 * per);
        poison(dir, t, (uint64_t)e1 * per, t->nbytes - (uint64_t)e1 * per);
    }
}

/* poisons rows outside [i0, i1) of gate/up [I, H] and columns outside of down [H, I] */
static void poison_slice(const char *dir, const mdl_ckpt_t *ck, int l, const char *pre, int i0,
                         int i1)
{
    char n[256];
    static const char *gu[2] = {"gate_proj", "up_proj"};
    for (int k = 0; k < 2; k++) {
        snprintf(n, sizeof(n), "model.layers.%d.%s.%s.weight", l, pre, gu[k]);
        const mdl_st_tensor_t *t = mdl_ckpt_find(ck, n);
        assert_non_null(t);
        uint64_t row = t->nbytes / (uint64_t)t->shape[0];
        poison(dir, t, 0, (uint64_t)i0 * row);
        poison(dir, t, (uint64_t)i1 * row, t->nbytes - (uint64_t)i1 * row);
    }
    snprintf(n, sizeof(n), "model.layers.%d.%s.down_proj.weight", l, pre);
    const mdl_st_tensor_t *t = mdl_ckpt_find(ck, n);
    assert_non_null(t);
    uint64_t es = afd_dtype_size(t->dtype), I = (uint64_t)t->shape[1];
    for (int64_t r = 0; r < t->shape[0]; r++) {
        poison(dir, t, (uint64_t)r * I * es, (uint64_t)i0 * es);
        poison(dir, t, ((uint64_t)r * I + (uint64_t)i1) * es, (I - (uint64_t)i1) * es);
    }
}

static void test_only_needed_bytes(void **state)
{
    int dt = (int)(intptr_t)*state;
    ck_t c;
    ck_open(g_dir[dt], &c);
    const mdl_config_t *cfg = &c.cfg;
    static const int shares[][2] = {{0, 2}, {1, 2}, {0, 3}, {1, 3}, {2, 3}};
    mdl_model_t *intact = load_ffn(&c, 0, 1);
    for (size_t s = 0; s < sizeof(shares) / sizeof(shares[0]); s++) {
        int i = shares[s][0], F = shares[s][1];
        char dir[4400];
        snprintf(dir, sizeof(dir), "%s/poison-%s-%d-of-%d", g_root, dt_names[dt], i, F);
        copy_dir(g_dir[dt], dir);
        int e0, e1;
        mdl_role_experts(cfg, i, F, &e0, &e1);
        for (int l = 0; l < cfg->num_layers; l++) {
            char n[256];
            int I = cfg->is_moe[l] ? cfg->share_expert_dim : cfg->dense_inter, i0, i1;
            mdl_role_slice(I, i, F, &i0, &i1);
            poison_slice(dir, c.ck, l, cfg->is_moe[l] ? "share_expert" : "mlp", i0, i1);
            if (!cfg->is_moe[l]) continue;
            static const char *proj[3] = {"gate_proj", "up_proj", "down_proj"};
            for (int p = 0; p < 3; p++) {
                snprintf(n, sizeof(n), "model.layers.%d.moe.%s.weight", l, proj[p]);
                poison_experts(dir, c.ck, n, e0, e1);
            }
        }
        ck_t pc;
        ck_open(dir, &pc);
        mdl_model_t *good = load_ffn(&c, i, F), *got = load_ffn(&pc, i, F);
        for (int l = 0; l < cfg->num_layers; l++) {
            const mdl_ffn_layer_t *a = &got->ffn[l], *b = &good->ffn[l];
            assert_weight_eq(&a->gate, &b->gate);
            assert_weight_eq(&a->up, &b->up);
            assert_weight_eq(&a->down, &b->down);
            assert_true(weight_finite(&a->gate) && weight_finite(&a->up) &&
                        weight_finite(&a->down));
            if (!a->is_moe) continue;
            assert_int_equal(a->e0, b->e0);
            assert_int_equal(a->e1, b->e1);
            for (int e = 0; e < a->e1 - a->e0; e++) {
                assert_weight_eq(&a->egate[e], &b->egate[e]);
                assert_weight_eq(&a->eup[e], &b->eup[e]);
                assert_weight_eq(&a->edown[e], &b->edown[e]);
                assert_true(weight_finite(&a->egate[e]) && weight_finite(&a->eup[e]) &&
                            weight_finite(&a->edown[e]));
            }
        }
        /* the poison is real: that expert of the full FFN read from the copy differs */
        mdl_model_t *all = load_ffn(&pc, 0, 1);
        int l = 0;
        while (!cfg->is_moe[l])
            l++;
        int other = e0 > 0 ? 0 : e1; /* an expert outside the share */
        const kn_weight_t *pw = &all->ffn[l].egate[other], *iw = &intact->ffn[l].egate[other];
        assert_true(memcmp(pw->data, iw->data, sizeof(float) * (size_t)(pw->rows * pw->cols)));
        if (dt == DT_FP8) assert_false(weight_finite(pw)); /* 0x7f is NaN in e4m3 */
        mdl_model_free(all);
        mdl_model_free(got);
        mdl_model_free(good);
        ck_close(&pc);
        nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    }
    mdl_model_free(intact);
    ck_close(&c);
}

/* ---- FFN partial sums ---- */

#define NTOK 5

static double max_abs(const float *x, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs((double)x[i]));
    return m;
}

/* out <- sum over the F shares of mdl_ffn(layer) */
static void ffn_sum(mdl_model_t **shares, int F, int layer, const float *g, const int32_t *ids,
                    const float *wts, float *out)
{
    int H = shares[0]->cfg.hidden_size;
    float *part = malloc(sizeof(float) * NTOK * (size_t)H);
    assert_non_null(part);
    memset(out, 0, sizeof(float) * NTOK * (size_t)H);
    for (int i = 0; i < F; i++) {
        mdl_ws_t ws = {0};
        assert_int_equal(mdl_ws_reserve(shares[i], &ws, NTOK), AFD_OK);
        for (size_t k = 0; k < NTOK * (size_t)H; k++)
            part[k] = NAN; /* must be overwritten */
        mdl_ffn(shares[i], &ws, layer, g, NTOK, ids, wts, part);
        for (size_t k = 0; k < NTOK * (size_t)H; k++)
            out[k] += part[k];
        mdl_ws_free(shares[i], &ws);
    }
    free(part);
}

static void test_partial_sums(void **state)
{
    int dt = (int)(intptr_t)*state;
    ck_t c;
    ck_open(g_dir[dt], &c);
    const mdl_config_t *cfg = &c.cfg;
    int H = cfg->hidden_size, E = cfg->num_experts, K = cfg->top_k;
    mdl_model_t *attn = load_role(&c, 1, 0, 0, 0);
    /* (F shares) x (T tensor-parallel ranks each); configuration 0 is the reference */
    static const int FT[][2] = {{1, 1}, {2, 1}, {3, 1}, {1, 2}, {2, 2}, {1, 3}};
    enum { NCONF = sizeof(FT) / sizeof(FT[0]), MAXR = 4 };
    mdl_model_t *sh[NCONF][MAXR] = {{NULL}};
    for (int q = 0; q < NCONF; q++)
        for (int i = 0; i < FT[q][0]; i++)
            for (int t = 0; t < FT[q][1]; t++)
                sh[q][i * FT[q][1] + t] = load_ffn_tp(&c, i, FT[q][0], t, FT[q][1]);
    float *g = malloc(sizeof(float) * NTOK * (size_t)H);
    float *logits = malloc(sizeof(float) * NTOK * (size_t)E);
    float *ref = malloc(sizeof(float) * NTOK * (size_t)H);
    float *sum = malloc(sizeof(float) * NTOK * (size_t)H);
    int32_t ids[NTOK * 8];
    float wts[NTOK * 8];
    assert_true(K <= 8);
    assert_true(g && logits && ref && sum);
    for (int rep = 0; rep < 2; rep++) {
        for (int l = 0; l < cfg->num_layers; l++) {
            /* a random input with unit RMS per row */
            for (int t = 0; t < NTOK; t++) {
                double ss = 0;
                for (int k = 0; k < H; k++) {
                    g[t * H + k] = (float)(2 * urand() - 1);
                    ss += (double)g[t * H + k] * g[t * H + k];
                }
                float s = (float)(1.0 / sqrt(ss / H));
                for (int k = 0; k < H; k++)
                    g[t * H + k] *= s;
            }
            if (cfg->is_moe[l] && rep == 0) {
                /* routing from the attention model's router on g */
                g_be->ops->matmul(g_be, g, NTOK, &attn->attn[l].router, logits, 0);
                g_be->ops->router_topk(g_be, logits, NTOK, E, K, cfg->norm_expert_weight, ids, wts);
            } else if (cfg->is_moe[l]) {
                /* random valid routing: k distinct experts per token */
                for (int t = 0; t < NTOK; t++)
                    for (int j = 0; j < K; j++) {
                        int e, dup;
                        do {
                            e = (int)(urand() * E);
                            dup = 0;
                            for (int q = 0; q < j; q++)
                                dup |= ids[t * K + q] == e;
                        } while (dup);
                        ids[t * K + j] = e;
                        wts[t * K + j] = (float)urand();
                    }
            }
            for (int t = 0; t < NTOK && cfg->is_moe[l]; t++)
                for (int j = 0; j < K; j++)
                    assert_true(ids[t * K + j] >= 0 && ids[t * K + j] < E);
            ffn_sum(sh[0], 1, l, g, ids, wts, ref);
            double scale = max_abs(ref, NTOK * (size_t)H);
            assert_true(scale > 0 && isfinite(scale));
            for (int q = 1; q < NCONF; q++) {
                int F = FT[q][0], T = FT[q][1];
                ffn_sum(sh[q], F * T, l, g, ids, wts, sum);
                double err = 0;
                for (size_t k = 0; k < NTOK * (size_t)H; k++)
                    err = fmax(err, fabs((double)sum[k] - ref[k]));
                if (!(err <= 1e-4 * scale))
                    fail_msg("%s layer %d (%s, %s routing): sum of %d shares x %d ranks differs "
                             "from F=1 by %.3g (max |ref| %.3g, tolerance 1e-4 relative)",
                             dt_names[dt], l, cfg->is_moe[l] ? "MoE" : "dense",
                             rep ? "random" : "router", F, T, err, scale);
            }
        }
    }
    free(g);
    free(logits);
    free(ref);
    free(sum);
    for (int q = 0; q < NCONF; q++)
        for (int r = 0; r < MAXR; r++)
            mdl_model_free(sh[q][r]);
    mdl_model_free(attn);
    ck_close(&c);
}

/* ---- KV cache ---- */

static void test_kv(void **state)
{
    (void)state;
    mdl_config_t cfg;
    assert_int_equal(mdl_config_load(g_dir[DT_BF16], &cfg), AFD_OK);
    static const afd_dtype_t dts[3] = {AFD_DTYPE_BF16, AFD_DTYPE_E4M3, AFD_DTYPE_F32};
    for (int d = 0; d < 3; d++) {
        int bs = 16;
        size_t bb = mdl_kv_block_bytes(&cfg, dts[d], bs);
        size_t per_tok = 2 * (size_t)cfg.head_dim * afd_dtype_size(dts[d]) +
                         (dts[d] == AFD_DTYPE_E4M3 ? 2 * sizeof(float) : 0);
        assert_int_equal(bb, per_tok * (size_t)bs * (size_t)cfg.num_layers);
        mdl_kv_t *kv = NULL;
        /* floor(budget / block bytes) */
        static const size_t budgets[][2] = {{1, 1}, {5, 0}, {5, 1}, {6, 0}};
        for (int b = 0; b < 4; b++) {
            size_t budget = budgets[b][0] * bb + (budgets[b][1] ? bb - 1 : 0);
            assert_int_equal(mdl_kv_create(g_be, &cfg, dts[d], bs, budget, &kv), AFD_OK);
            assert_int_equal(kv->store.num_blocks, (int)budgets[b][0]);
            assert_int_equal(kv->nfree, (int)budgets[b][0]);
            assert_int_equal(kv->store.block_size, bs);
            assert_int_equal(kv->store.num_layers, cfg.num_layers);
            assert_int_equal(kv->store.head_dim, cfg.head_dim);
            assert_non_null(kv->store.k);
            assert_non_null(kv->store.v);
            if (dts[d] == AFD_DTYPE_E4M3) {
                assert_non_null(kv->store.k_scale);
                assert_non_null(kv->store.v_scale);
            }
            mdl_kv_destroy(kv);
            kv = NULL;
        }
        /* less than one block: an error, not an empty cache */
        mdl_kv_t *none = NULL;
        assert_int_not_equal(mdl_kv_create(g_be, &cfg, dts[d], bs, bb - 1, &none), AFD_OK);
        assert_null(none);
        assert_int_not_equal(mdl_kv_create(g_be, &cfg, dts[d], 0, 100 * bb, &none), AFD_OK);
        assert_null(none);

        assert_int_equal(mdl_kv_create(g_be, &cfg, dts[d], bs, 5 * bb + bb / 2, &kv), AFD_OK);
        assert_int_equal(kv->store.num_blocks, 5);
        assert_int_equal(mdl_kv_blocks_for(kv, 0), 0);
        assert_int_equal(mdl_kv_blocks_for(kv, 1), 1);
        assert_int_equal(mdl_kv_blocks_for(kv, bs), 1);
        assert_int_equal(mdl_kv_blocks_for(kv, bs + 1), 2);
        int32_t a[5], b[5], x[5];
        for (int k = 0; k < 5; k++)
            a[k] = b[k] = x[k] = -7;
        assert_int_equal(mdl_kv_alloc(kv, 3, a), AFD_OK);
        assert_int_equal(kv->nfree, 2);
        /* all or nothing: 3 more do not fit, nothing is taken or written */
        assert_int_equal(mdl_kv_alloc(kv, 3, x), AFD_ERR_BUSY);
        assert_int_equal(kv->nfree, 2);
        for (int k = 0; k < 5; k++)
            assert_int_equal(x[k], -7);
        assert_int_equal(mdl_kv_alloc(kv, 2, b), AFD_OK);
        assert_int_equal(kv->nfree, 0);
        assert_int_equal(mdl_kv_alloc(kv, 1, x), AFD_ERR_BUSY);
        assert_int_equal(mdl_kv_alloc(kv, 0, x), AFD_OK);
        /* the 5 blocks are distinct ids in [0, 5) */
        int seen[5] = {0};
        for (int k = 0; k < 5; k++) {
            int id = k < 3 ? a[k] : b[k - 3];
            assert_true(id >= 0 && id < 5);
            assert_false(seen[id]);
            seen[id] = 1;
        }
        /* release returns them */
        mdl_kv_release(kv, a, 3);
        assert_int_equal(kv->nfree, 3);
        assert_int_equal(mdl_kv_alloc(kv, 4, x), AFD_ERR_BUSY);
        assert_int_equal(mdl_kv_alloc(kv, 3, x), AFD_OK);
        int got = 0;
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 3; j++)
                got += x[k] == a[j];
        assert_int_equal(got, 3); /* exactly the released blocks came back */
        mdl_kv_release(kv, x, 3);
        mdl_kv_release(kv, b, 2);
        assert_int_equal(kv->nfree, 5);
        assert_int_equal(mdl_kv_alloc(kv, 5, x), AFD_OK);
        mdl_kv_release(kv, x, 5);
        mdl_kv_destroy(kv);
    }
}

/* ---- runner: batching does not change a sequence's logits ---- */

#define NDEC 3

typedef struct seqdef {
    int plen;
    int32_t prompt[8];
    int32_t dec[NDEC];
} seqdef_t;

static const seqdef_t SEQS[2] = {
    {6, {5, 6, 7, 8, 9, 10}, {11, 12, 13}},
    {3, {300, 301, 302}, {21, 22, 23}},
};

/* runs the given sequences together (prefill then NDEC decode steps, each sequence's
 * prefill optionally in chunks of `chunk` tokens); logits[s][step] (vocab) of each
 * sequence after its prompt (step 0) and after each decoded token */
static void run_seqs(mdl_runner_t *r, const mdl_config_t *cfg, afd_dtype_t kvdt, const int *which,
                     int nsel, int chunk, float *logits[2][NDEC + 1])
{
    int V = cfg->vocab_size, bs = 4;
    mdl_kv_t *kv = NULL;
    assert_int_equal(
        mdl_kv_create(g_be, cfg, kvdt, bs, 16 * mdl_kv_block_bytes(cfg, kvdt, bs), &kv), AFD_OK);
    int32_t blocks[2][8];
    /* burn one block so the block ids differ between the runs */
    int32_t spare;
    if (nsel == 1 && which[0] == 1) assert_int_equal(mdl_kv_alloc(kv, 1, &spare), AFD_OK);
    for (int s = 0; s < nsel; s++) {
        const seqdef_t *q = &SEQS[which[s]];
        int nb = mdl_kv_blocks_for(kv, q->plen + NDEC);
        assert_true(nb <= 8);
        assert_int_equal(mdl_kv_alloc(kv, nb, blocks[s]), AFD_OK);
    }
    float *out = malloc(sizeof(float) * 2 * (size_t)V);
    assert_non_null(out);
    /* prefill: each step takes up to `chunk` tokens of every sequence's prompt */
    int done[2] = {0, 0};
    for (;;) {
        int32_t tok[32], pos[32], rows[2];
        kn_seq_t ks[2];
        int ntok = 0, nks = 0, nrows = 0, rs[2];
        for (int s = 0; s < nsel; s++) {
            const seqdef_t *q = &SEQS[which[s]];
            int take = q->plen - done[s];
            if (take > chunk) take = chunk;
            if (take <= 0) continue;
            ks[nks++] = (kn_seq_t){blocks[s], done[s], take};
            for (int k = 0; k < take; k++) {
                tok[ntok + k] = q->prompt[done[s] + k];
                pos[ntok + k] = done[s] + k;
            }
            ntok += take;
            done[s] += take;
            if (done[s] == q->plen) {
                rs[nrows] = s;
                rows[nrows++] = ntok - 1;
            }
        }
        if (!nks) break;
        mdl_batch_t b = {.nseq = nks, .ntok = ntok, .tokens = tok, .pos = pos, .seqs = ks};
        assert_int_equal(mdl_runner_step(r, &kv->store, &b, rows, nrows, out), AFD_OK);
        for (int k = 0; k < nrows; k++)
            memcpy(logits[which[rs[k]]][0], out + (size_t)k * V, sizeof(float) * (size_t)V);
    }
    for (int d = 0; d < NDEC; d++) {
        int32_t tok[2], pos[2], rows[2];
        kn_seq_t ks[2];
        for (int s = 0; s < nsel; s++) {
            const seqdef_t *q = &SEQS[which[s]];
            tok[s] = q->dec[d];
            pos[s] = q->plen + d;
            ks[s] = (kn_seq_t){blocks[s], q->plen + d, 1};
            rows[s] = s;
        }
        mdl_batch_t b = {.nseq = nsel, .ntok = nsel, .tokens = tok, .pos = pos, .seqs = ks};
        assert_int_equal(mdl_runner_step(r, &kv->store, &b, rows, nsel, out), AFD_OK);
        for (int s = 0; s < nsel; s++)
            memcpy(logits[which[s]][d + 1], out + (size_t)s * V, sizeof(float) * (size_t)V);
    }
    free(out);
    mdl_kv_destroy(kv);
}

static void compare_logits(float *a[2][NDEC + 1], float *b[2][NDEC + 1], int V, const char *what)
{
    for (int s = 0; s < 2; s++)
        for (int d = 0; d <= NDEC; d++) {
            double scale = fmax(1.0, max_abs(b[s][d], (size_t)V)), err = 0;
            for (int k = 0; k < V; k++) {
                assert_true(isfinite(a[s][d][k]));
                err = fmax(err, fabs((double)a[s][d][k] - b[s][d][k]));
            }
            if (!(err <= 1e-4 * scale))
                fail_msg("%s: sequence %d step %d: logits differ by %.3g (scale %.3g)", what, s, d,
                         err, scale);
        }
}

static void test_runner_batching(void **state)
{
    int dt = (int)(intptr_t)*state;
    ck_t c;
    ck_open(g_dir[dt], &c);
    int V = c.cfg.vocab_size;
    mdl_model_t *m = load_role(&c, 1, 1, 0, 1);
    mdl_runner_t r;
    assert_int_equal(mdl_runner_init(&r, m, AFD_DTYPE_F32, AFD_DTYPE_F32), AFD_OK);
    float *together[2][NDEC + 1], *alone[2][NDEC + 1], *chunked[2][NDEC + 1];
    for (int s = 0; s < 2; s++)
        for (int d = 0; d <= NDEC; d++) {
            together[s][d] = calloc((size_t)V, sizeof(float));
            alone[s][d] = calloc((size_t)V, sizeof(float));
            chunked[s][d] = calloc((size_t)V, sizeof(float));
            assert_true(together[s][d] && alone[s][d] && chunked[s][d]);
        }
    static const afd_dtype_t kvdts[2] = {AFD_DTYPE_F32, AFD_DTYPE_BF16};
    for (int kd = 0; kd < 2; kd++) {
        int both[2] = {0, 1}, only0[1] = {0}, only1[1] = {1};
        run_seqs(&r, &c.cfg, kvdts[kd], both, 2, 1 << 20, together);
        run_seqs(&r, &c.cfg, kvdts[kd], only0, 1, 1 << 20, alone);
        run_seqs(&r, &c.cfg, kvdts[kd], only1, 1, 1 << 20, alone);
        /* chunked prefill (4 tokens a step) of both together */
        run_seqs(&r, &c.cfg, kvdts[kd], both, 2, 4, chunked);
        char what[64];
        snprintf(what, sizeof(what), "%s, kv %s: batched vs alone", dt_names[dt],
                 afd_dtype_name(kvdts[kd]));
        compare_logits(together, alone, V, what);
        snprintf(what, sizeof(what), "%s, kv %s: chunked vs alone", dt_names[dt],
                 afd_dtype_name(kvdts[kd]));
        compare_logits(chunked, alone, V, what);
        /* the two sequences really differ (the comparison is not vacuous) */
        assert_true(memcmp(alone[0][0], alone[1][0], sizeof(float) * (size_t)V) != 0);
    }
    for (int s = 0; s < 2; s++)
        for (int d = 0; d <= NDEC; d++) {
            free(together[s][d]);
            free(alone[s][d]);
            free(chunked[s][d]);
        }
    mdl_runner_fini(&r);
    mdl_model_free(m);
    ck_close(&c);
}

/* ---- bad roles ---- */

static void test_bad_roles(void **state)
{
    (void)state;
    ck_t c;
    ck_open(g_dir[DT_BF16], &c);
    int E = c.cfg.num_experts;
    static const int bad[][2] = {{0, 0},    {1, 0},          {-1, 0},        {0, -1},
                                 {1, 1},    {2, 2},          {3, 2},         {-1, 2},
                                 {0, 9999}, {0, 0x7fffffff}, {0x7fffffff, 1}};
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        for (int attn = 0; attn <= 1; attn++) {
            mdl_role_t r = {.attn = attn, .ffn = 1, .ffn_index = bad[k][0], .ffn_count = bad[k][1]};
            mdl_model_t *m = NULL;
            afd_status_t st = mdl_model_load(c.ck, &c.cfg, g_be, &r, 0, &m);
            if (st == AFD_OK) {
                mdl_model_free(m);
                fail_msg("role attn %d ffn share %d of %d was accepted", attn, bad[k][0],
                         bad[k][1]);
            }
            assert_null(m);
        }
    }
    /* more shares than experts */
    mdl_role_t r = {.ffn = 1, .ffn_index = 0, .ffn_count = E + 1};
    mdl_model_t *m = NULL;
    assert_int_not_equal(mdl_model_load(c.ck, &c.cfg, g_be, &r, 0, &m), AFD_OK);
    assert_null(m);
    r.ffn_index = E;
    assert_int_not_equal(mdl_model_load(c.ck, &c.cfg, g_be, &r, 0, &m), AFD_OK);
    assert_null(m);
    /* exactly as many shares as experts: one expert each */
    r.ffn_count = E;
    r.ffn_index = E - 1;
    assert_int_equal(mdl_model_load(c.ck, &c.cfg, g_be, &r, 0, &m), AFD_OK);
    for (int l = 0; l < c.cfg.num_layers; l++)
        if (c.cfg.is_moe[l]) {
            assert_int_equal(m->ffn[l].e0, E - 1);
            assert_int_equal(m->ffn[l].e1, E);
        }
    /* the single-process runner needs the whole model */
    mdl_runner_t run;
    assert_int_not_equal(mdl_runner_init(&run, m, AFD_DTYPE_F32, AFD_DTYPE_F32), AFD_OK);
    mdl_runner_fini(&run);
    mdl_model_free(m);
    mdl_model_t *a = load_role(&c, 1, 0, 0, 0);
    assert_int_not_equal(mdl_runner_init(&run, a, AFD_DTYPE_F32, AFD_DTYPE_F32), AFD_OK);
    mdl_runner_fini(&run);
    mdl_model_free(a);
    /* tensor-parallel ranks: in range, and no more than the smallest slice has columns */
    static const int badtp[][2] = {{2, 2}, {-1, 2}, {0, 97}, {5, 3}, {0, 0x7fffffff}};
    for (size_t k = 0; k < sizeof(badtp) / sizeof(badtp[0]); k++) {
        mdl_role_t rt = {.ffn = 1,
                         .ffn_index = 0,
                         .ffn_count = 2,
                         .tp_index = badtp[k][0],
                         .tp_count = badtp[k][1]};
        m = NULL;
        if (mdl_model_load(c.ck, &c.cfg, g_be, &rt, 0, &m) == AFD_OK)
            fail_msg("tensor-parallel rank %d of %d was accepted", badtp[k][0], badtp[k][1]);
        assert_null(m);
    }
    mdl_role_t rt = {.ffn = 1, .ffn_index = 1, .ffn_count = 2, .tp_index = 95, .tp_count = 96};
    assert_int_equal(mdl_model_load(c.ck, &c.cfg, g_be, &rt, 0, &m), AFD_OK); /* 1 column */
    mdl_model_free(m);
    /* an attention-only role ignores the (meaningless) share fields */
    mdl_role_t ra = {.attn = 1, .ffn = 0, .ffn_index = 5, .ffn_count = 0};
    assert_int_equal(mdl_model_load(c.ck, &c.cfg, g_be, &ra, 0, &m), AFD_OK);
    assert_null(m->ffn);
    mdl_model_free(m);
    ck_close(&c);
}

#define BOTH(f)                                                                                    \
    cmocka_unit_test_prestate(f, (void *)(intptr_t)DT_BF16),                                       \
        cmocka_unit_test_prestate(f, (void *)(intptr_t)DT_FP8)

int main(void)
{
    const struct CMUnitTest tests[] = {
        BOTH(test_role_loading),   BOTH(test_only_needed_bytes), BOTH(test_partial_sums),
        cmocka_unit_test(test_kv), BOTH(test_runner_batching),   cmocka_unit_test(test_bad_roles),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
