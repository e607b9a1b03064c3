// fp8.c: the reference emulated fp8 GEMM (ops.h gemm_fp8; DeepSeek-V3 recipe, dsv3-spec 6.5).
//
// Definition: every tile or block of an operand gets the scale s = max(amax, 1e-4) / 448 of
// its largest |x|, each value becomes e4m3(x / s) * s (nm_fp8_scale and nm_fp8_e4m3_round,
// src/ops/fp8.c, the rounding every backend shares), and the dequantised operands are
// multiplied by the reference fp32 GEMM (gemm.c: exact products, double sums). Blocks are cut
// from the matrices as STORED: A, the activation, in 1 x 128 tiles along K; B as a weight in
// 128 x 128 blocks of the stored [out, in] matrix whatever the transpose flag, or as an
// activation in 128 x 1 tiles along K (the weight-gradient GEMM). The last tile of a row or
// column may be shorter.
//
// The block loop is written out here instead of calling nm_fp8_quantize_blocks (the CPU
// backend's, strip-parallel): this is the plain statement of which values share a scale, and
// tests/test_backend_ops.c compares the two.
#include <math.h>

#include "core/check.h"
#include "ops/fp8.h"
#include "ops/ref/ref_ops.h"

// deq(rows, cols) packed (=) x(rows, cols; leading dimension ld) quantised in blocks of
// br x bc elements of the stored matrix.
static void quantize(float *deq, const float *x, int64_t ld, int64_t rows, int64_t cols, int64_t br, int64_t bc) {
    for (int64_t r0 = 0; r0 < rows; r0 += br) {
        for (int64_t c0 = 0; c0 < cols; c0 += bc) {
            const int64_t r1 = r0 + br < rows ? r0 + br : rows, c1 = c0 + bc < cols ? c0 + bc : cols;
            // amax of the block. A NaN gets in (a != a) and no compare replaces it afterwards,
            // so a NaN anywhere makes the scale and the whole block NaN, as DeepSeek's
            // amax-based kernels do: a diverged value is never hidden.
            float amax = 0.0f;
            for (int64_t r = r0; r < r1; r++)
                for (int64_t c = c0; c < c1; c++) {
                    float a = fabsf(x[r * ld + c]);
                    if (a > amax || a != a) amax = a;
                }
            const float s = nm_fp8_scale(amax, NM_FP8_SCALE_FP32);
            for (int64_t r = r0; r < r1; r++)
                for (int64_t c = c0; c < c1; c++) deq[r * cols + c] = nm_fp8_e4m3_round(x[r * ld + c] / s) * s;
        }
    }
}

void nm_ref_gemm_fp8(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind, float beta,
                     float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_fp8 dims M=%lld N=%lld K=%lld", (long long)M, (long long)N,
             (long long)K);
    NM_CHECK(b_kind == NM_FP8_ACTIVATION || b_kind == NM_FP8_WEIGHT, "gemm_fp8 b_kind=%d", (int)b_kind);
    if (M == 0 || N == 0 || K == 0 || alpha == 0.0f) {
        // nothing is read from A or B: the fp32 GEMM's handling of C is the whole answer
        nm_ref_gemm(be, ta, tb, M, N, K, alpha, NULL, lda, NULL, ldb, beta, C, ldc);
        return;
    }
    // Stored shapes: op(A) (M,K) is stored (M,K) or, transposed, (K,M); op(B) (K,N) likewise.
    const int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
    const int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm_fp8 lda=%lld (need %lld) ldb=%lld (need %lld)", (long long)lda,
             (long long)a_cols, (long long)ldb, (long long)b_cols);
    // Block shapes on the stored matrices: K runs along the stored columns of an untransposed
    // A and a transposed B, along the stored rows otherwise.
    const int64_t T = NM_FP8_TILE;
    const int64_t a_br = ta == NM_NO_TRANS ? 1 : T, a_bc = ta == NM_NO_TRANS ? T : 1;
    int64_t b_br = T, b_bc = T;
    if (b_kind == NM_FP8_ACTIVATION) {
        b_br = tb == NM_NO_TRANS ? T : 1;
        b_bc = tb == NM_NO_TRANS ? 1 : T;
    }
    float *a = nm_ref_scratch(be, 0, (size_t)(a_rows * a_cols));
    float *b = nm_ref_scratch(be, 1, (size_t)(b_rows * b_cols));
    quantize(a, A, lda, a_rows, a_cols, a_br, a_bc);
    quantize(b, B, ldb, b_rows, b_cols, b_br, b_bc);
    nm_ref_gemm(be, ta, tb, M, N, K, alpha, a, a_cols, b, b_cols, beta, C, ldc);
}

// --- fp8 rows (ops.h): one 1 x 128 tile at a time, the rule written out --------------------------

static float ref_tile_scale(const float *x, int64_t n) {
    float amax = 0.0f;
    for (int64_t c = 0; c < n; c++) {
        float a = fabsf(x[c]);
        if (a > amax || a != a) amax = a;
    }
    return nm_fp8_scale(amax, NM_FP8_SCALE_FP32);
}

void nm_ref_fp8_quantize_rows(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "fp8_quantize_rows rows=%lld D=%lld", (long long)rows, (long long)D);
    const int64_t nt = (D + NM_FP8_TILE - 1) / NM_FP8_TILE;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < nt; t++) {
            const int64_t c0 = t * NM_FP8_TILE, n = D - c0 < NM_FP8_TILE ? D - c0 : NM_FP8_TILE;
            const float s = ref_tile_scale(x + r * D + c0, n);
            scales[r * nt + t] = s;
            for (int64_t c = 0; c < n; c++) q[r * D + c0 + c] = nm_fp8_e4m3_encode(x[r * D + c0 + c] / s);
        }
}

void nm_ref_fp8_dequantize_rows(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "fp8_dequantize_rows rows=%lld D=%lld", (long long)rows, (long long)D);
    const int64_t nt = (D + NM_FP8_TILE - 1) / NM_FP8_TILE;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < D; c++) x[r * D + c] = nm_fp8_e4m3_decode(q[r * D + c]) * scales[r * nt + c / NM_FP8_TILE];
}

void nm_ref_fp8_round_rows(const nm_ops *be, float *x, int64_t rows, int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "fp8_round_rows rows=%lld D=%lld", (long long)rows, (long long)D);
    const int64_t nt = (D + NM_FP8_TILE - 1) / NM_FP8_TILE;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < nt; t++) {
            const int64_t c0 = t * NM_FP8_TILE, n = D - c0 < NM_FP8_TILE ? D - c0 : NM_FP8_TILE;
            float *xt = x + r * D + c0;
            const float s = ref_tile_scale(xt, n);
            for (int64_t c = 0; c < n; c++) xt[c] = nm_fp8_e4m3_round(xt[c] / s) * s;
        }
}
