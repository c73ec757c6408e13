/*
 * The CPU emulator's e4m3 conversions as the hardware defines them: round to nearest
 * even; with __NV_SATFINITE, magnitudes past 448 saturate to 448 and NaN stays NaN (0x7f).
 * Written from the format (bias 7, 3 mantissa bits, subnormal step 2^-9, no infinities).
 */
#ifndef KN_EMU_CUDA_FP8_H
#define KN_EMU_CUDA_FP8_H

#include "cuda_fp16.h"

#include <math.h>

typedef unsigned char __nv_fp8_storage_t;
typedef enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 } __nv_fp8_interpretation_t;
typedef enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE } __nv_saturation_t;

static inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float f, __nv_saturation_t sat,
                                                       __nv_fp8_interpretation_t kind)
{
    (void)kind; /* e4m3 only */
    unsigned char sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (isnan(f)) return (unsigned char)(sign | 0x7f);
    if (a > 464.0f) /* rounds past 448 (464 ties to it): saturate, or NaN */
        return (unsigned char)(sign | (sat == __NV_SATFINITE ? 0x7e : 0x7f));
    int e;
    frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    e -= 1;        /* a in [2^e, 2^(e+1)) */
    if (a == 0.0f || e < -6) {
        int q = (int)nearbyintf(a * 512.0f); /* subnormal steps of 2^-9; 8 is 2^-6 */
        return (unsigned char)(sign | q);
    }
    int m = (int)nearbyintf(ldexpf(a, 3 - e)); /* in [8, 16] */
    if (m == 16) {
        m = 8;
        e += 1;
    }
    int code = ((e + 7) << 3) | (m - 8);
    if (code > 0x7e) code = 0x7e; /* 448 is the largest finite value */
    return (unsigned char)(sign | code);
}

static inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t x,
                                                 __nv_fp8_interpretation_t kind)
{
    (void)kind;
    int s = x >> 7, e = (x >> 3) & 15, m = x & 7;
    float v;
    if (e == 15 && m == 7)
        v = NAN;
    else
        v = e ? ldexpf(1.0f + (float)m / 8.0f, e - 7) : ldexpf((float)m / 8.0f, -6);
    __half h = __float2half_rn(s ? -v : v);
    __half_raw r;
    r.x = h.__x;
    return r;
}

#endif
