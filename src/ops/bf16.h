// bf16.h: fp32 <-> bf16 conversion for every backend's ops (static inline, branch-free so loops
// over them vectorise): the one rounding rule of the bf16 GEMM's casts and of the ops that
// round what they write (SwiGLU and the MoE gather under bf16), in src/ops/cpu and src/ops/ref.
#pragma once

#include <stdint.h>
#include <string.h>

// Round to nearest even on the 16 dropped bits: adding 0x7fff plus the lowest kept bit
// carries into the kept half exactly when the dropped half is above 0x8000, or equal to it
// with an odd kept half. Overflow rounds to inf as it should. NaN would carry into the
// exponent (or turn into inf), so it is kept as a quiet NaN with its sign and top payload
// instead.
static inline uint16_t nm_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

static inline float nm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// x rounded to bf16, kept in fp32 storage
static inline float nm_bf16_round(float x) { return nm_bf16_to_f32(nm_f32_to_bf16(x)); }

// h(n) (=) the bf16 values of x(n), which holds bf16 values already: their high halves. The ops
// that round what they write call it as a second pass over a row still in L1, because one loop
// that writes both outputs does not vectorise (GCC 12 gives up on mixed 32- and 16-bit stores).
static inline void nm_bf16_high_halves(uint16_t *h, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        h[i] = (uint16_t)(u >> 16);
    }
}
