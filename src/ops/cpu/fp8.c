// fp8.c: the CPU backend's EMULATED fp8 GEMM (ops.h gemm_fp8), on the backend-neutral E4M3
// quantiser (src/ops/fp8.c, fp8.h), so that the effect of DeepSeek-V3's FP8 recipe on the loss can be studied on a CPU
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
// Scratch: the dequantised operands and their scales live in one buffer of the backend
// instance (nm_cpu_ctx.fp8_scratch) that grows (free + aligned alloc) only when a GEMM needs
// more than any earlier one, so the step loop allocates nothing once every shape has been
// seen. Consequence: gemm_fp8 is not reentrant on one instance; like every op it is called
// from one thread (its parallelism is OpenMP inside).
#include <math.h>
#include <stddef.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/fp8.h"

// --- the GEMM --------------------------------------------------------------------------------

// The instance's scratch (see the file comment), at least n floats.
static float *scratch_get(const nm_ops *be, size_t n) {
    nm_cpu_ctx *ctx = nm_cpu_ctx_of(be);
    if (n > ctx->fp8_floats) {
        nm_free(ctx->fp8_scratch);
        ctx->fp8_scratch = nm_aligned_alloc(n * sizeof(float));
        ctx->fp8_floats = n;
    }
    return ctx->fp8_scratch;
}

static size_t cdiv(int64_t a, int64_t b) { return (size_t)((a + b - 1) / b); }

void nm_cpu_gemm_fp8(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind,
                     float beta, float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_fp8 dims M=%lld N=%lld K=%lld", (long long)M, (long long)N,
             (long long)K);
    NM_CHECK(b_kind == NM_FP8_ACTIVATION || b_kind == NM_FP8_WEIGHT, "gemm_fp8 b_kind=%d", (int)b_kind);
    // Nothing is read from A or B in these cases, so the fp32 GEMM's handling (C untouched, or
    // only scaled by beta) is exactly ours.
    if (M == 0 || N == 0 || K == 0 || alpha == 0.0f) {
        nm_cpu_gemm(be, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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
    float *s = scratch_get(be, na + nb + nsa + nsb);
    float *qa = s, *qb = s + na, *sa = qb + nb, *sb = sa + nsa;

    nm_fp8_quantize_blocks(qa, a_cols, sa, A, lda, a_rows, a_cols, a_br, a_bc, NM_FP8_SCALE_FP32);
    nm_fp8_quantize_blocks(qb, b_cols, sb, B, ldb, b_rows, b_cols, b_br, b_bc, NM_FP8_SCALE_FP32);
    nm_cpu_gemm(be, ta, tb, M, N, K, alpha, qa, a_cols, qb, b_cols, beta, C, ldc);
}

// --- fp8 rows (ops.h: fp8_quantize_rows, fp8_dequantize_rows, fp8_round_rows) ------------------

// The scale of x[c0, c1): max |x| with NaN winning (as nm_fp8_quantize_blocks), then the rule.
static float tile_scale(const float *x, int64_t c0, int64_t c1) {
    float m = 0.0f;
    for (int64_t c = c0; c < c1; c++) {
        float a = fabsf(x[c]);
        m = (a > m || a != a) ? a : m;
    }
    return nm_fp8_scale(m, NM_FP8_SCALE_FP32);
}

void nm_cpu_fp8_quantize_rows(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "fp8_quantize_rows rows=%lld D=%lld", (long long)rows, (long long)D);
    const int64_t nt = (D + NM_FP8_TILE - 1) / NM_FP8_TILE;
#pragma omp parallel for schedule(static) if (rows * D > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        for (int64_t t = 0; t < nt; t++) {
            const int64_t c0 = t * NM_FP8_TILE, c1 = c0 + NM_FP8_TILE < D ? c0 + NM_FP8_TILE : D;
            const float s = tile_scale(xr, c0, c1);
            scales[r * nt + t] = s;
            for (int64_t c = c0; c < c1; c++) q[r * D + c] = nm_fp8_e4m3_encode(xr[c] / s);
        }
    }
}

void nm_cpu_fp8_dequantize_rows(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "fp8_dequantize_rows rows=%lld D=%lld", (long long)rows, (long long)D);
    const int64_t nt = (D + NM_FP8_TILE - 1) / NM_FP8_TILE;
#pragma omp parallel for schedule(static) if (rows * D > 65536)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < D; c++) x[r * D + c] = nm_fp8_e4m3_decode(q[r * D + c]) * scales[r * nt + c / NM_FP8_TILE];
}

void nm_cpu_fp8_round_rows(const nm_ops *be, float *x, int64_t rows, int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "fp8_round_rows rows=%lld D=%lld", (long long)rows, (long long)D);
    const int64_t nt = (D + NM_FP8_TILE - 1) / NM_FP8_TILE;
#pragma omp parallel for schedule(static) if (rows * D > 65536)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * D;
        for (int64_t t = 0; t < nt; t++) {
            const int64_t c0 = t * NM_FP8_TILE, c1 = c0 + NM_FP8_TILE < D ? c0 + NM_FP8_TILE : D;
            const float s = tile_scale(xr, c0, c1);
            for (int64_t c = c0; c < c1; c++) xr[c] = nm_fp8_e4m3_round(xr[c] / s) * s;
        }
    }
}
