// bf16_ref.h: the tests' own bf16 rounding, written apart from the library's (the bit trick
// of src/ops/bf16.h): nearest of the two truncation neighbours in double arithmetic.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return from_bits((uint32_t)h << 16); }

// Independent rounding for finite x: the two bf16 neighbours by truncation, the nearer one
// in exact double arithmetic, ties to the even significand.
static inline uint16_t ref_bf16(float x) {
    uint32_t lo = bits(x) >> 16;
    uint32_t hi = lo + 1;       // next one away from zero
    // When that is inf, rounding treats it as the next power of two, 2^128.
    double vhi = (hi & 0x7fffu) == 0x7f80u ? copysign(0x1p128, (double)x) : (double)bf16_to_f32((uint16_t)hi);
    double dlo = fabs((double)x - (double)bf16_to_f32((uint16_t)lo));
    double dhi = fabs((double)x - vhi);
    if (dlo < dhi) return (uint16_t)lo;
    if (dhi < dlo) return (uint16_t)hi;
    return (uint16_t)((lo & 1u) ? hi : lo);
}
