// fp8.c: the E4M3 quantiser of DeepSeek-V3's FP8 recipe (fp8.h): rounding, scales and the
// block quantisation of an emulated fp8 GEMM's operands (dsv3-spec 6.5; the rules follow
// DeepSeek-V3's inference/kernel.py act_quant and DeepGEMM's per_token_cast_to_fp8 /
// per_block_cast_to_fp8). Backend-neutral (no BLAS, no oneDNN): the CPU GEMM
// (src/ops/cpu/fp8.c) quantises its operands with nm_fp8_quantize_blocks; the reference
// backend (src/ops/ref/fp8.c) writes the block loop out plainly on the same rounding and
// scale rules (nm_fp8_e4m3_round, nm_fp8_scale), so the two agree bit for bit on what the GEMM
// multiplies and a blocking mistake in either shows in tests/test_backend_ops.c.
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "core/check.h"
#include "ops/fp8.h"

// --- E4M3 rounding -------------------------------------------------------------------------

// Smallest normal E4M3 value; below it the grid is uniform with step 2^-9 (subnormals m 2^-9,
// and 2^-6 = 8 * 2^-9 continues that grid, so the subnormal branch may round up into it).
#define E4M3_MIN_NORMAL 0x1p-6f

static inline float e4m3_round(float x) {
    float a = fabsf(x);
    float r;
    if (!(a < NM_FP8_E4M3_MAX)) {
        // Saturate (clamp before rounding; 448 itself is exact). NaN fails the compare too.
        r = isnan(a) ? a : NM_FP8_E4M3_MAX;
    } else if (a < E4M3_MIN_NORMAL) {
        // Adding 2^14 puts a in a binade whose fp32 ulp is 2^(14-23) = 2^-9, so the hardware
        // add rounds a to the subnormal grid with ties-to-even; subtracting is exact. Valid
        // because the build has no -ffast-math (the pair is not folded) and C11 evaluates
        // float in float (FLT_EVAL_METHOD 0 on SSE/NEON).
        r = (a + 0x1p14f) - 0x1p14f;
    } else {
        // Normal: keep 3 of fp32's 23 mantissa bits, round to nearest even on the 20 dropped
        // bits. A carry out of the mantissa moves into the exponent, which is the correct next
        // binade; a < 448 cannot round past 448 (the next E4M3 value up would be 480).
        uint32_t b;
        memcpy(&b, &a, sizeof b);
        b += 0x7FFFFu + ((b >> 20) & 1u);
        b &= 0xFFF00000u;
        memcpy(&r, &b, sizeof r);
    }
    return copysignf(r, x);
}

float nm_fp8_e4m3_round(float x) { return e4m3_round(x); }

uint8_t nm_fp8_e4m3_encode(float x) {
    uint8_t sign = signbit(x) ? 0x80 : 0x00;
    if (isnan(x)) return (uint8_t)(sign | 0x7F);
    float a = fabsf(e4m3_round(x));
    if (a < E4M3_MIN_NORMAL) return (uint8_t)(sign | (uint8_t)(a * 512.0f));  // exact m
    uint32_t b;
    memcpy(&b, &a, sizeof b);
    uint32_t e = (b >> 23) - 127u + 7u;        // rebias 127 -> 7: 1..15 for 2^-6..448
    return (uint8_t)(sign | (e << 3) | ((b >> 20) & 7u));
}

// --- scales and tile quantisation ------------------------------------------------------------

// 2^ceil(log2 s): rounding the scale UP keeps amax / s <= 448 (DeepGEMM's ceil_to_ue8m0).
static float pow2_ceil(float s) {
    if (!isfinite(s) || s == 0.0f) return s;
    int e;
    float m = frexpf(s, &e);                   // s = m 2^e, m in [0.5, 1)
    return m == 0.5f ? s : ldexpf(1.0f, e);
}

float nm_fp8_scale(float amax, nm_fp8_scale_mode mode) {
    // Written as a compare, not fmaxf, so that a NaN amax stays NaN (fmaxf would drop it).
    float a = amax < NM_FP8_AMAX_FLOOR ? NM_FP8_AMAX_FLOOR : amax;
    float s = a / NM_FP8_E4M3_MAX;             // fp32 division, as amax / 448. in kernel.py
    return mode == NM_FP8_SCALE_UE8M0 ? pow2_ceil(s) : s;
}

void nm_fp8_quantize_blocks(float *deq, int64_t ld_deq, float *scales, const float *x, int64_t ldx,
                            int64_t rows, int64_t cols, int64_t br, int64_t bc, nm_fp8_scale_mode mode) {
    NM_CHECK(rows >= 0 && cols >= 0 && br > 0 && bc > 0, "fp8 quantize rows=%lld cols=%lld block %lldx%lld",
             (long long)rows, (long long)cols, (long long)br, (long long)bc);
    NM_CHECK(ldx >= cols && ld_deq >= cols, "fp8 quantize ldx=%lld ld_deq=%lld < cols=%lld", (long long)ldx,
             (long long)ld_deq, (long long)cols);
    const int64_t nrb = (rows + br - 1) / br, ncb = (cols + bc - 1) / bc;
    // One block row ("strip") per iteration: the strip's scale row first collects the block
    // amaxes, then holds the scales. Walking the strip row by row keeps memory access
    // sequential for every block shape, including the column tiles (br = 128, bc = 1).
#pragma omp parallel for schedule(static)
    for (int64_t rb = 0; rb < nrb; rb++) {
        float *srow = scales + rb * ncb;
        const int64_t r0 = rb * br, r1 = r0 + br < rows ? r0 + br : rows;
        for (int64_t j = 0; j < ncb; j++) srow[j] = 0.0f;
        // pass 1: amax per block. "a > m || a != a" lets a NaN in, and once m is NaN no
        // compare replaces it, so a NaN anywhere in the block reaches the scale.
        for (int64_t r = r0; r < r1; r++) {
            const float *xr = x + r * ldx;
            for (int64_t j = 0; j < ncb; j++) {
                const int64_t c0 = j * bc, c1 = c0 + bc < cols ? c0 + bc : cols;
                float m = srow[j];
                for (int64_t c = c0; c < c1; c++) {
                    float a = fabsf(xr[c]);
                    m = (a > m || a != a) ? a : m;
                }
                srow[j] = m;
            }
        }
        // pass 2: scale = max(amax, 1e-4) / 448; value = e4m3(x / s) * s. Division, not
        // multiplication by 448 / amax, as in kernel.py's y = x / s.
        for (int64_t j = 0; j < ncb; j++) srow[j] = nm_fp8_scale(srow[j], mode);
        for (int64_t r = r0; r < r1; r++) {
            const float *xr = x + r * ldx;
            float *dr = deq + r * ld_deq;
            for (int64_t j = 0; j < ncb; j++) {
                const int64_t c0 = j * bc, c1 = c0 + bc < cols ? c0 + bc : cols;
                const float s = srow[j];
                for (int64_t c = c0; c < c1; c++) dr[c] = e4m3_round(xr[c] / s) * s;
            }
        }
    }
}

void nm_fp8_quantize_tiles(float *deq, int64_t ld_deq, float *scales, const float *x, int64_t ldx,
                           int64_t rows, int64_t cols, nm_fp8_scale_mode mode) {
    nm_fp8_quantize_blocks(deq, ld_deq, scales, x, ldx, rows, cols, 1, NM_FP8_TILE, mode);
}
