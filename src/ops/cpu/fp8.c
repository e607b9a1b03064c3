// fp8.c: the CPU backend's EMULATED fp8 GEMM (ops.h gemm_fp8) and its E4M3 quantiser
// (fp8.h), so that the effect of DeepSeek-V3's FP8 recipe on the loss can be studied on a CPU
// (dsv3-spec 6.5; DeepSeek-V3 report section 3.3; the rules below follow DeepSeek-V3's
// inference/kernel.py act_quant/weight layout and DeepGEMM's per_token_cast_to_fp8 /
// per_block_cast_to_fp8).
//
// What it does: quantise A (an activation, op(A) is (M,K)) in 1 x 128 tiles along K, and B
// (op(B) is (K,N)) either as a weight, in 128 x 128 blocks of the matrix as STORED (a PyTorch
// [out, in] weight, whatever the transpose flag: DeepSeek's weight_scale_inv is
// [ceil(out/128), ceil(in/128)]), or as an activation in 128 x 1 tiles along K (the Wgrad
// GEMM's "re-quantised as 128x1 tiles"). Each tile/block gets s = max(amax, 1e-4) / 448 and
// its values become e4m3(x / s) * s in fp32 scratch, which cblas_sgemm multiplies with fp32
// accumulation (nm_cpu_gemm, identical contract: row-major, leading dimensions, beta == 0
// ignores C, M/N/K == 0 allowed).
//
// What it deliberately does not emulate: the Tensor Core's ~14-bit accumulator inside each
// N_C = 128 chunk of K (DeepSeek promotes to fp32 every 128 elements precisely to make that
// error small; we accumulate in fp32 throughout, so our error is the quantisation error
// only), fp8 storage (values are kept dequantised in fp32) and E5M2 (the recipe has none).
//
// Scratch: the dequantised operands and their scales live in one module-owned buffer that
// grows (free + aligned alloc) only when a GEMM needs more than any earlier one, so the step
// loop allocates nothing once every shape has been seen. Consequence: gemm_fp8 is not
// reentrant; like every op it is called from one thread (its parallelism is OpenMP inside).
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/fp8.h"

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

// --- the GEMM --------------------------------------------------------------------------------

static float *g_scratch = NULL;                // module scratch, see the file comment
static size_t g_scratch_floats = 0;

static float *scratch_get(size_t n) {
    if (n > g_scratch_floats) {
        nm_free(g_scratch);
        g_scratch = nm_aligned_alloc(n * sizeof(float));
        g_scratch_floats = n;
    }
    return g_scratch;
}

static size_t cdiv(int64_t a, int64_t b) { return (size_t)((a + b - 1) / b); }

void nm_cpu_gemm_fp8(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind,
                     float beta, float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_fp8 dims M=%lld N=%lld K=%lld", (long long)M, (long long)N,
             (long long)K);
    NM_CHECK(b_kind == NM_FP8_ACTIVATION || b_kind == NM_FP8_WEIGHT, "gemm_fp8 b_kind=%d", (int)b_kind);
    // Nothing is read from A or B in these cases, so the fp32 GEMM's handling (C untouched, or
    // only scaled by beta) is exactly ours.
    if (M == 0 || N == 0 || K == 0 || alpha == 0.0f) {
        nm_cpu_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    // Stored shapes: A is (M,K) or, transposed, (K,M); B is (K,N) or (N,K).
    const int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
    const int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm_fp8 lda=%lld (need %lld) ldb=%lld (need %lld)",
             (long long)lda, (long long)a_cols, (long long)ldb, (long long)b_cols);

    // Block shapes on the STORED matrices. The K direction is along stored columns when an
    // operand is (.., K) in memory and along stored rows otherwise.
    const int64_t T = NM_FP8_TILE;
    const int64_t a_br = ta == NM_NO_TRANS ? 1 : T, a_bc = ta == NM_NO_TRANS ? T : 1;
    int64_t b_br, b_bc;
    if (b_kind == NM_FP8_WEIGHT) {
        b_br = T;                              // 128 x 128 blocks of the stored weight
        b_bc = T;
    } else {
        b_br = tb == NM_NO_TRANS ? T : 1;      // 128 x 1 tiles of op(B) along K
        b_bc = tb == NM_NO_TRANS ? 1 : T;
    }

    const size_t na = (size_t)a_rows * (size_t)a_cols, nb = (size_t)b_rows * (size_t)b_cols;
    const size_t nsa = cdiv(a_rows, a_br) * cdiv(a_cols, a_bc), nsb = cdiv(b_rows, b_br) * cdiv(b_cols, b_bc);
    float *s = scratch_get(na + nb + nsa + nsb);
    float *qa = s, *qb = s + na, *sa = qb + nb, *sb = sa + nsa;

    nm_fp8_quantize_blocks(qa, a_cols, sa, A, lda, a_rows, a_cols, a_br, a_bc, NM_FP8_SCALE_FP32);
    nm_fp8_quantize_blocks(qb, b_cols, sb, B, ldb, b_rows, b_cols, b_br, b_bc, NM_FP8_SCALE_FP32);
    nm_cpu_gemm(ta, tb, M, N, K, alpha, qa, a_cols, qb, b_cols, beta, C, ldc);
}
