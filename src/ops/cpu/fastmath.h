// fastmath.h: vectorisable fp32 elementary functions for the CPU ops (static inline, no state).
//
// nm_expf: e^x in fp32 by Cephes' expf (S. Moshier, Cephes Math Library, expf.c): range
// reduction x = n ln2 + r with |r| <= ln2/2 (ln2 split in two parts so n ln2 is exact for
// |n| <= 128), a degree-7 polynomial for e^r, then the scale by 2^n written into the exponent
// bits. Measured against double exp on every float in [-87, 88]: max error 1 ulp with
// round-to-nearest evaluation (no FMA needed, none assumed: the project builds with
// -std=c11, which leaves floating-point contraction off).
//
// Why not libm's expf: glibc's is correct to < 1 ulp but is a call per element, so a loop of
// exps does not vectorise without -ffast-math (which the project does not use: it breaks
// NaN/inf handling elsewhere). This one is branch-free integer/float arithmetic, so a plain
// loop over it auto-vectorises at -O2 -march=native -fvect-cost-model=dynamic (CMakeLists.txt;
// GCC 12's default -O2 cost model vectorises no loop that needs a remainder, so without the
// flag these loops ran scalar: 1.2x slower training on configs/small.json), and its result does not
// depend on the vector width: every lane runs the same fp32 operation sequence.
//
// Range: x < -87.33 returns 0 (the true value is below FLT_MIN; flushing it is harmless for
// the softmax sums that use this), x > 88.72 returns +inf, NaN propagates, -inf gives 0.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float nm_expf(float x) {
    const float lo = -87.33654f, hi = 88.72283f;
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    // n = round(x / ln2): adding 1.5 * 2^23 rounds to an integer in the low mantissa bits
    // (round-to-nearest mode), which then are n + 0x4B400000 as an integer.
    const float magic = 12582912.0f;
    float t = xc * 1.44269504088896341f + magic;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    float n = t - magic;
    float r = xc - n * 0.693359375f;       // ln2 high part (exact product for |n| <= 128)
    r = r - n * -2.12194440e-4f;           // ln2 low part
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    // 2^n as a float: n in [-126, 128]; n = 128 (x near hi) is done as 2 * 2^127.
    int32_t ni = (int32_t)(tb - 0x4B400000u);
    int32_t big = ni > 127;
    uint32_t eb = (uint32_t)(ni - big + 127) << 23;
    float pow2;
    memcpy(&pow2, &eb, sizeof pow2);
    float y = p * pow2 * (big ? 2.0f : 1.0f);
    y = x < lo ? 0.0f : y;
    y = x > hi ? (float)INFINITY : y;
    return y;
}
