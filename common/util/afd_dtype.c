/* afd_dtype: float conversions for bf16, f16 and fp8 e4m3, and fp8 row quantisation. */
#include "afd_dtype.h"

#include "afd_status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

size_t afd_dtype_size(afd_dtype_t dt)
{
    switch (dt) {
    case AFD_DTYPE_F32:
        return 4;
    case AFD_DTYPE_BF16:
    case AFD_DTYPE_F16:
        return 2;
    case AFD_DTYPE_E4M3:
        return 1;
    default:
        return 0;
    }
}

const char *afd_dtype_name(afd_dtype_t dt)
{
    static const char *names[] = {"f32", "bf16", "f16", "fp8"};
    return dt < AFD_DTYPE_COUNT ? names[dt] : "invalid";
}

afd_dtype_t afd_dtype_parse(const char *s)
{
    if (!s) return AFD_DTYPE_COUNT;
    if (!strcmp(s, "f32") || !strcmp(s, "fp32") || !strcmp(s, "float32")) return AFD_DTYPE_F32;
    if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16")) return AFD_DTYPE_BF16;
    if (!strcmp(s, "f16") || !strcmp(s, "fp16") || !strcmp(s, "float16")) return AFD_DTYPE_F16;
    if (!strcmp(s, "fp8") || !strcmp(s, "e4m3")) return AFD_DTYPE_E4M3;
    return AFD_DTYPE_COUNT;
}

afd_dtype_t afd_dtype_from_safetensors(const char *s)
{
    if (!strcmp(s, "F32")) return AFD_DTYPE_F32;
    if (!strcmp(s, "BF16")) return AFD_DTYPE_BF16;
    if (!strcmp(s, "F16")) return AFD_DTYPE_F16;
    if (!strcmp(s, "F8_E4M3")) return AFD_DTYPE_E4M3;
    return AFD_DTYPE_COUNT;
}

const char *afd_dtype_safetensors_name(afd_dtype_t dt)
{
    static const char *names[] = {"F32", "BF16", "F16", "F8_E4M3"};
    return dt < AFD_DTYPE_COUNT ? names[dt] : "INVALID";
}

float afd_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union {
        uint32_t u;
        float f;
    } v;
    if (exp == 0) {
        float m = ldexpf((float)man, -24);
        return sign ? -m : m;
    }
    if (exp == 31)
        v.u = sign | 0x7f800000u | (man << 13);
    else
        v.u = sign | ((exp + 112) << 23) | (man << 13);
    return v.f;
}

uint16_t afd_f32_to_f16(float f)
{
    union {
        float f;
        uint32_t u;
    } v = {.f = f};
    uint16_t sign = (uint16_t)((v.u >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f)) return sign | 0x7e00;
    if (a >= 65520.0f) return sign | 0x7c00; /* rounds to infinity */
    if (a < ldexpf(1.0f, -14)) {             /* subnormal: multiples of 2^-24 */
        float m = nearbyintf(a * 16777216.0f);
        return sign | (uint16_t)m;
    }
    int e;
    float m = frexpf(a, &e);                /* a = m * 2^e, m in [0.5, 1) */
    float scaled = nearbyintf(m * 2048.0f); /* 11 significant bits */
    if (scaled >= 2048.0f) {
        scaled /= 2;
        e++;
    }
    uint16_t exp = (uint16_t)(e - 1 + 15);
    return sign | (uint16_t)(exp << 10) | ((uint16_t)scaled & 0x3ff);
}

/* generated from the E4M3FN definition; see tests/unit/test_dtype.c for the check */
const float afd_e4m3_table[256] = {
    0.0f,
    0x1.0000000000000p-9f,
    0x1.0000000000000p-8f,
    0x1.8000000000000p-8f,
    0x1.0000000000000p-7f,
    0x1.4000000000000p-7f,
    0x1.8000000000000p-7f,
    0x1.c000000000000p-7f,
    0x1.0000000000000p-6f,
    0x1.2000000000000p-6f,
    0x1.4000000000000p-6f,
    0x1.6000000000000p-6f,
    0x1.8000000000000p-6f,
    0x1.a000000000000p-6f,
    0x1.c000000000000p-6f,
    0x1.e000000000000p-6f,
    0x1.0000000000000p-5f,
    0x1.2000000000000p-5f,
    0x1.4000000000000p-5f,
    0x1.6000000000000p-5f,
    0x1.8000000000000p-5f,
    0x1.a000000000000p-5f,
    0x1.c000000000000p-5f,
    0x1.e000000000000p-5f,
    0x1.0000000000000p-4f,
    0x1.2000000000000p-4f,
    0x1.4000000000000p-4f,
    0x1.6000000000000p-4f,
    0x1.8000000000000p-4f,
    0x1.a000000000000p-4f,
    0x1.c000000000000p-4f,
    0x1.e000000000000p-4f,
    0x1.0000000000000p-3f,
    0x1.2000000000000p-3f,
    0x1.4000000000000p-3f,
    0x1.6000000000000p-3f,
    0x1.8000000000000p-3f,
    0x1.a000000000000p-3f,
    0x1.c000000000000p-3f,
    0x1.e000000000000p-3f,
    0x1.0000000000000p-2f,
    0x1.2000000000000p-2f,
    0x1.4000000000000p-2f,
    0x1.6000000000000p-2f,
    0x1.8000000000000p-2f,
    0x1.a000000000000p-2f,
    0x1.c000000000000p-2f,
    0x1.e000000000000p-2f,
    0x1.0000000000000p-1f,
    0x1.2000000000000p-1f,
    0x1.4000000000000p-1f,
    0x1.6000000000000p-1f,
    0x1.8000000000000p-1f,
    0x1.a000000000000p-1f,
    0x1.c000000000000p-1f,
    0x1.e000000000000p-1f,
    1.0f,
    0x1.2000000000000p+0f,
    0x1.4000000000000p+0f,
    0x1.6000000000000p+0f,
    0x1.8000000000000p+0f,
    0x1.a000000000000p+0f,
    0x1.c000000000000p+0f,
    0x1.e000000000000p+0f,
    2.0f,
    0x1.2000000000000p+1f,
    0x1.4000000000000p+1f,
    0x1.6000000000000p+1f,
    3.0f,
    0x1.a000000000000p+1f,
    0x1.c000000000000p+1f,
    0x1.e000000000000p+1f,
    4.0f,
    0x1.2000000000000p+2f,
    5.0f,
    0x1.6000000000000p+2f,
    6.0f,
    0x1.a000000000000p+2f,
    7.0f,
    0x1.e000000000000p+2f,
    8.0f,
    9.0f,
    10.0f,
    11.0f,
    12.0f,
    13.0f,
    14.0f,
    15.0f,
    16.0f,
    18.0f,
    20.0f,
    22.0f,
    24.0f,
    26.0f,
    28.0f,
    30.0f,
    32.0f,
    36.0f,
    40.0f,
    44.0f,
    48.0f,
    52.0f,
    56.0f,
    60.0f,
    64.0f,
    72.0f,
    80.0f,
    88.0f,
    96.0f,
    104.0f,
    112.0f,
    120.0f,
    128.0f,
    144.0f,
    160.0f,
    176.0f,
    192.0f,
    208.0f,
    224.0f,
    240.0f,
    256.0f,
    288.0f,
    320.0f,
    352.0f,
    384.0f,
    416.0f,
    448.0f,
    NAN,
    -0.0f,
    -0x1.0000000000000p-9f,
    -0x1.0000000000000p-8f,
    -0x1.8000000000000p-8f,
    -0x1.0000000000000p-7f,
    -0x1.4000000000000p-7f,
    -0x1.8000000000000p-7f,
    -0x1.c000000000000p-7f,
    -0x1.0000000000000p-6f,
    -0x1.2000000000000p-6f,
    -0x1.4000000000000p-6f,
    -0x1.6000000000000p-6f,
    -0x1.8000000000000p-6f,
    -0x1.a000000000000p-6f,
    -0x1.c000000000000p-6f,
    -0x1.e000000000000p-6f,
    -0x1.0000000000000p-5f,
    -0x1.2000000000000p-5f,
    -0x1.4000000000000p-5f,
    -0x1.6000000000000p-5f,
    -0x1.8000000000000p-5f,
    -0x1.a000000000000p-5f,
    -0x1.c000000000000p-5f,
    -0x1.e000000000000p-5f,
    -0x1.0000000000000p-4f,
    -0x1.2000000000000p-4f,
    -0x1.4000000000000p-4f,
    -0x1.6000000000000p-4f,
    -0x1.8000000000000p-4f,
    -0x1.a000000000000p-4f,
    -0x1.c000000000000p-4f,
    -0x1.e000000000000p-4f,
    -0x1.0000000000000p-3f,
    -0x1.2000000000000p-3f,
    -0x1.4000000000000p-3f,
    -0x1.6000000000000p-3f,
    -0x1.8000000000000p-3f,
    -0x1.a000000000000p-3f,
    -0x1.c000000000000p-3f,
    -0x1.e000000000000p-3f,
    -0x1.0000000000000p-2f,
    -0x1.2000000000000p-2f,
    -0x1.4000000000000p-2f,
    -0x1.6000000000000p-2f,
    -0x1.8000000000000p-2f,
    -0x1.a000000000000p-2f,
    -0x1.c000000000000p-2f,
    -0x1.e000000000000p-2f,
    -0x1.0000000000000p-1f,
    -0x1.2000000000000p-1f,
    -0x1.4000000000000p-1f,
    -0x1.6000000000000p-1f,
    -0x1.8000000000000p-1f,
    -0x1.a000000000000p-1f,
    -0x1.c000000000000p-1f,
    -0x1.e000000000000p-1f,
    -1.0f,
    -0x1.2000000000000p+0f,
    -0x1.4000000000000p+0f,
    -0x1.6000000000000p+0f,
    -0x1.8000000000000p+0f,
    -0x1.a000000000000p+0f,
    -0x1.c000000000000p+0f,
    -0x1.e000000000000p+0f,
    -2.0f,
    -0x1.2000000000000p+1f,
    -0x1.4000000000000p+1f,
    -0x1.6000000000000p+1f,
    -3.0f,
    -0x1.a000000000000p+1f,
    -0x1.c000000000000p+1f,
    -0x1.e000000000000p+1f,
    -4.0f,
    -0x1.2000000000000p+2f,
    -5.0f,
    -0x1.6000000000000p+2f,
    -6.0f,
    -0x1.a000000000000p+2f,
    -7.0f,
    -0x1.e000000000000p+2f,
    -8.0f,
    -9.0f,
    -10.0f,
    -11.0f,
    -12.0f,
    -13.0f,
    -14.0f,
    -15.0f,
    -16.0f,
    -18.0f,
    -20.0f,
    -22.0f,
    -24.0f,
    -26.0f,
    -28.0f,
    -30.0f,
    -32.0f,
    -36.0f,
    -40.0f,
    -44.0f,
    -48.0f,
    -52.0f,
    -56.0f,
    -60.0f,
    -64.0f,
    -72.0f,
    -80.0f,
    -88.0f,
    -96.0f,
    -104.0f,
    -112.0f,
    -120.0f,
    -128.0f,
    -144.0f,
    -160.0f,
    -176.0f,
    -192.0f,
    -208.0f,
    -224.0f,
    -240.0f,
    -256.0f,
    -288.0f,
    -320.0f,
    -352.0f,
    -384.0f,
    -416.0f,
    -448.0f,
    NAN,
};

uint8_t afd_f32_to_e4m3(float f)
{
    union {
        float f;
        uint32_t u;
    } v = {.f = f};
    uint8_t sign = (uint8_t)((v.u >> 24) & 0x80);
    uint32_t abs = v.u & 0x7fffffffu;
    if (abs > 0x7f800000u) return 0x7f;         /* NaN */
    if (abs >= 0x43e00000u) return sign | 0x7e; /* >= 448 (and inf): saturate */
    if (abs < 0x3c800000u) {                    /* below 2^-6: subnormal steps of 2^-9 */
        float m = nearbyintf(v.f < 0 ? -v.f * 512.0f : v.f * 512.0f); /* 0..8; 8 = 2^-6 */
        return sign | (uint8_t)m;
    }
    /* normal: rebias the exponent (127 -> 7) and round the mantissa to 3 bits, ties to even;
     * a carry out of the mantissa bumps the exponent, as it should */
    uint32_t x = abs - (120u << 23);
    x = (x + 0x7ffffu + ((x >> 20) & 1u)) >> 20;
    if (x > 0x7e) x = 0x7e;
    return sign | (uint8_t)x;
}

void afd_convert_to_f32(afd_dtype_t dt, const void *src, float *dst, size_t n)
{
    switch (dt) {
    case AFD_DTYPE_F32:
        memcpy(dst, src, n * 4);
        break;
    /* checkpoint tensors need not be aligned (safetensors does not require it): load
     * elements with memcpy, which compiles to plain loads */
    case AFD_DTYPE_BF16: {
        const uint8_t *s = src;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = afd_bf16_to_f32(h);
        }
        break;
    }
    case AFD_DTYPE_F16: {
        const uint8_t *s = src;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = afd_f16_to_f32(h);
        }
        break;
    }
    case AFD_DTYPE_E4M3: {
        const uint8_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = afd_e4m3_table[s[i]];
        break;
    }
    default:
        AFD_ASSERT(0 && "invalid dtype");
    }
}

void afd_convert_from_f32(afd_dtype_t dt, const float *src, void *dst, size_t n)
{
    switch (dt) {
    case AFD_DTYPE_F32:
        memcpy(dst, src, n * 4);
        break;
    case AFD_DTYPE_BF16: {
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = afd_f32_to_bf16(src[i]);
        break;
    }
    case AFD_DTYPE_F16: {
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = afd_f32_to_f16(src[i]);
        break;
    }
    case AFD_DTYPE_E4M3: {
        uint8_t *d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = afd_f32_to_e4m3(src[i]);
        break;
    }
    default:
        AFD_ASSERT(0 && "invalid dtype");
    }
}

void afd_fp8_quantize_rows(const float *x, size_t rows, size_t dim, uint8_t *q, float *scales)
{
    size_t groups = (dim + AFD_FP8_GROUP - 1) / AFD_FP8_GROUP;
    for (size_t r = 0; r < rows; r++) {
        for (size_t g = 0; g < groups; g++) {
            size_t c0 = g * AFD_FP8_GROUP, c1 = c0 + AFD_FP8_GROUP < dim ? c0 + AFD_FP8_GROUP : dim;
            const float *xr = x + r * dim;
            float amax = 0;
            for (size_t c = c0; c < c1; c++)
                amax = afd_maxf(amax, fabsf(xr[c]));
            float scale = amax > 0 ? amax / AFD_E4M3_MAX : 1.0f;
            float inv = 1.0f / scale;
            for (size_t c = c0; c < c1; c++)
                q[r * dim + c] = afd_f32_to_e4m3(xr[c] * inv);
            scales[r * groups + g] = scale;
        }
    }
}

void afd_fp8_dequantize_rows(const uint8_t *q, const float *scales, size_t rows, size_t dim,
                             float *x)
{
    size_t groups = (dim + AFD_FP8_GROUP - 1) / AFD_FP8_GROUP;
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < dim; c++)
            x[r * dim + c] =
                afd_e4m3_table[q[r * dim + c]] * scales[r * groups + c / AFD_FP8_GROUP];
}

void afd_fp8_round_rows(float *x, size_t rows, size_t dim)
{
    for (size_t r = 0; r < rows; r++) {
        float *xr = x + r * dim;
        for (size_t c0 = 0; c0 < dim; c0 += AFD_FP8_GROUP) {
            size_t c1 = c0 + AFD_FP8_GROUP < dim ? c0 + AFD_FP8_GROUP : dim;
            float amax = 0;
            for (size_t c = c0; c < c1; c++)
                amax = afd_maxf(amax, fabsf(xr[c]));
            float scale = amax > 0 ? amax / AFD_E4M3_MAX : 1.0f;
            float inv = 1.0f / scale;
            for (size_t c = c0; c < c1; c++)
                xr[c] = afd_e4m3_table[afd_f32_to_e4m3(xr[c] * inv)] * scale;
        }
    }
}

size_t afd_rows_bytes(afd_dtype_t dt, size_t rows, size_t dim)
{
    size_t b = rows * dim * afd_dtype_size(dt);
    if (dt == AFD_DTYPE_E4M3) b += rows * ((dim + AFD_FP8_GROUP - 1) / AFD_FP8_GROUP) * 4;
    return b;
}

/* The scales of packed e4m3 rows sit right after rows * dim bytes, so they need not be
 * 4-byte aligned: through an aligned copy when they are not. */
void afd_rows_encode(afd_dtype_t dt, const float *x, size_t rows, size_t dim, void *dst)
{
    if (dt != AFD_DTYPE_E4M3) {
        afd_convert_from_f32(dt, x, dst, rows * dim);
        return;
    }
    uint8_t *q = dst, *sp = q + rows * dim;
    size_t ns = rows * ((dim + AFD_FP8_GROUP - 1) / AFD_FP8_GROUP);
    if (((uintptr_t)sp & 3) == 0) {
        afd_fp8_quantize_rows(x, rows, dim, q, (float *)(void *)sp);
        return;
    }
    float *sc = malloc(sizeof(float) * (ns ? ns : 1));
    AFD_ASSERT(sc);
    afd_fp8_quantize_rows(x, rows, dim, q, sc);
    memcpy(sp, sc, sizeof(float) * ns);
    free(sc);
}

void afd_rows_decode(afd_dtype_t dt, const void *src, size_t rows, size_t dim, float *x)
{
    if (dt != AFD_DTYPE_E4M3) {
        afd_convert_to_f32(dt, src, x, rows * dim);
        return;
    }
    const uint8_t *q = src, *sp = q + rows * dim;
    size_t ns = rows * ((dim + AFD_FP8_GROUP - 1) / AFD_FP8_GROUP);
    if (((uintptr_t)sp & 3) == 0) {
        afd_fp8_dequantize_rows(q, (const float *)(const void *)sp, rows, dim, x);
        return;
    }
    float *sc = malloc(sizeof(float) * (ns ? ns : 1));
    AFD_ASSERT(sc);
    memcpy(sc, sp, sizeof(float) * ns);
    afd_fp8_dequantize_rows(q, sc, rows, dim, x);
    free(sc);
}

void afd_rows_add(afd_dtype_t dt, const void *src, size_t rows, size_t dim, float *out)
{
    size_t n = rows * dim;
    if (dt == AFD_DTYPE_F32) {
        const float *s = src;
        for (size_t i = 0; i < n; i++)
            out[i] += s[i];
    } else if (dt == AFD_DTYPE_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            out[i] += afd_bf16_to_f32(s[i]);
    } else { /* rare: through the unpacked rows */
        float *t = malloc(sizeof(float) * (n ? n : 1));
        AFD_ASSERT(t);
        afd_rows_decode(dt, src, rows, dim, t);
        for (size_t i = 0; i < n; i++)
            out[i] += t[i];
        free(t);
    }
}
