/*
 * afd_dtype: the element types that appear in checkpoints, on the wire and in
 * the KV cache, and exact conversions between them and float32.
 *   bf16: upper 16 bits of an IEEE float32, rounded to nearest even.
 *   f16:  IEEE binary16.
 *   e4m3: OCP fp8 E4M3FN (bias 7, no infinities, 0x7f/0xff are NaN, max 448);
 *         conversion from float rounds to nearest even and saturates to +-448.
 */
#ifndef AFD_DTYPE_H
#define AFD_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum afd_dtype {
    AFD_DTYPE_F32 = 0,
    AFD_DTYPE_BF16 = 1,
    AFD_DTYPE_F16 = 2,
    AFD_DTYPE_E4M3 = 3,
    AFD_DTYPE_COUNT
} afd_dtype_t;

#define AFD_E4M3_MAX  448.0f
#define AFD_FP8_GROUP 128 /* activation quantisation group (elements per scale) */
#define AFD_FP8_BLOCK 128 /* weight quantisation block edge (128 x 128) */

/* Bytes per element; 0 for an invalid dtype. */
size_t afd_dtype_size(afd_dtype_t dt);
/* Short name ("f32", "bf16", "f16", "fp8"). */
const char *afd_dtype_name(afd_dtype_t dt);
/* Parses "f32|fp32|bf16|f16|fp16|fp8|e4m3"; returns AFD_DTYPE_COUNT when unknown. */
afd_dtype_t afd_dtype_parse(const char *s);
/* Parses a safetensors dtype string ("F32", "BF16", "F16", "F8_E4M3"). */
afd_dtype_t afd_dtype_from_safetensors(const char *s);
const char *afd_dtype_safetensors_name(afd_dtype_t dt);

/* max(m, v) for running maxima that start from a number: a NaN v leaves m, as fmaxf
 * does, but this inlines (fmaxf is a libm call without -ffast-math). */
static inline float afd_maxf(float m, float v)
{
    return v > m ? v : m;
}

static inline float afd_bf16_to_f32(uint16_t h)
{
    union {
        uint32_t u;
        float f;
    } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline uint16_t afd_f32_to_bf16(float f)
{
    union {
        float f;
        uint32_t u;
    } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

static inline float afd_round_bf16(float f)
{
    return afd_bf16_to_f32(afd_f32_to_bf16(f));
}

float afd_f16_to_f32(uint16_t h);
uint16_t afd_f32_to_f16(float f);

extern const float afd_e4m3_table[256];
static inline float afd_e4m3_to_f32(uint8_t x)
{
    return afd_e4m3_table[x];
}
uint8_t afd_f32_to_e4m3(float f);

/* Converts n elements of type dt at src to float32. */
void afd_convert_to_f32(afd_dtype_t dt, const void *src, float *dst, size_t n);
/* Converts n floats to type dt (e4m3 without scaling). */
void afd_convert_from_f32(afd_dtype_t dt, const float *src, void *dst, size_t n);

/*
 * Quantises rows of `dim` floats to e4m3 with one float32 scale per group of
 * AFD_FP8_GROUP elements (the last group of a row may be short): value ~= q * scale,
 * scale = amax(group) / 448 (1 for an all-zero group). scales holds
 * rows * ceil(dim / 128) entries.
 */
void afd_fp8_quantize_rows(const float *x, size_t rows, size_t dim, uint8_t *q, float *scales);
void afd_fp8_dequantize_rows(const uint8_t *q, const float *scales, size_t rows, size_t dim,
                             float *x);
/* In place: x <- dequant(quant(x)) with the per-group scheme above. */
void afd_fp8_round_rows(float *x, size_t rows, size_t dim);

/*
 * Packed rows: `rows` rows of `dim` values in dtype dt, as the data plane sends them. For
 * e4m3 the rows * dim bytes are followed by the rows * ceil(dim / 128) float32 scales
 * (afd_fp8_quantize_rows); bf16, f16 and f32 are the plain converted rows. The size in
 * bytes of such a block:
 */
size_t afd_rows_bytes(afd_dtype_t dt, size_t rows, size_t dim);
/* dst (afd_rows_bytes) <- x packed; x <- the packed rows unpacked; out += unpacked rows */
void afd_rows_encode(afd_dtype_t dt, const float *x, size_t rows, size_t dim, void *dst);
void afd_rows_decode(afd_dtype_t dt, const void *src, size_t rows, size_t dim, float *x);
void afd_rows_add(afd_dtype_t dt, const void *src, size_t rows, size_t dim, float *out);

#endif
