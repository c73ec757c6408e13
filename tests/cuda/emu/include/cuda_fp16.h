/* The CPU emulator's half type: the conversions the kernels use, round to nearest even. */
#ifndef KN_EMU_CUDA_FP16_H
#define KN_EMU_CUDA_FP16_H

#include <stdint.h>
#include <string.h>

struct __half_raw {
    unsigned short x;
};

struct __half {
    unsigned short __x;
    __half() = default;
    __half(__half_raw r) : __x(r.x) {}
};

static inline __half __float2half_rn(float f)
{
    _Float16 h = (_Float16)f; /* IEEE binary16, round to nearest even */
    __half r;
    memcpy(&r.__x, &h, 2);
    return r;
}

static inline float __half2float(__half h)
{
    _Float16 v;
    memcpy(&v, &h.__x, 2);
    return (float)v;
}

static inline __half __ushort_as_half(unsigned short u)
{
    __half r;
    r.__x = u;
    return r;
}

#endif
