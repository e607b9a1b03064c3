// gemm_bf16.c: the reference bf16 GEMM (ops.h gemm_bf16) and the fp32 <-> bf16 casts.
//
// Definition: both operands are rounded to bf16 (round to nearest even, src/ops/bf16.h; bf16
// storage is widened, which is exact; NM_F32_BF16 storage holds bf16 values already), then
// multiplied by the reference fp32 GEMM (gemm.c). A product of two bf16 values is exact in
// fp32 and in double, and gemm.c sums the products in double, so the result is the exact
// bf16 GEMM up to the double sums' rounding: the accumulation a hardware bf16 GEMM
// approximates in fp32.
//
// The rounded operands are written to the instance's scratch (nm_ref_scratch), packed, and handed to
// the fp32 GEMM; the scratch grows only when a larger operand is first seen. An operand
// labelled NM_F32_BF16 is checked to hold bf16 values (the low 16 bits of every element zero)
// on every call: the reference backend is where a mislabelled operand should be caught, and
// one pass over the operand is small next to the GEMM that reads it M or N times.
#include "core/check.h"
#include "ops/bf16.h"
#include "ops/ref/ref_ops.h"

// --- scratch -----------------------------------------------------------------------------------

float *nm_ref_scratch(const nm_ops *be, int slot, size_t n) {
    NM_CHECK(slot == 0 || slot == 1, "ref scratch slot %d", slot);
    NM_CHECK(be && be->ctx, "backend ref: an op called through a table that is no instance (nm_backend_create)");
    nm_ref_ctx *ctx = be->ctx;
    if (n > ctx->scratch[slot].cap) {
        nm_free(ctx->scratch[slot].data);
        ctx->scratch[slot].data = nm_aligned_alloc((n ? n : 1) * sizeof(float));
        ctx->scratch[slot].cap = n;
    }
    return ctx->scratch[slot].data;
}

// --- fp32 <-> bf16 -------------------------------------------------------------------------------

void nm_ref_round_bf16(const nm_ops *be, float *dst, const float *src, int64_t n) {
    NM_CHECK(n >= 0, "round_bf16 n=%lld", (long long)n);
    for (int64_t i = 0; i < n; i++) dst[i] = nm_bf16_round(src[i]);
}

void nm_ref_cast_bf16(const nm_ops *be, uint16_t *dst, const float *src, int64_t n) {
    NM_CHECK(n >= 0, "cast_bf16 n=%lld", (long long)n);
    for (int64_t i = 0; i < n; i++) dst[i] = nm_f32_to_bf16(src[i]);
}

void nm_ref_widen_bf16(const nm_ops *be, float *dst, const uint16_t *src, int64_t n) {
    NM_CHECK(n >= 0, "widen_bf16 n=%lld", (long long)n);
    for (int64_t i = 0; i < n; i++) dst[i] = nm_bf16_to_f32(src[i]);
}

void nm_ref_round_cast_bf16(const nm_ops *be, float *x, uint16_t *bits, int64_t n) {
    NM_CHECK(n >= 0, "round_cast_bf16 n=%lld", (long long)n);
    for (int64_t i = 0; i < n; i++) {
        bits[i] = nm_f32_to_bf16(x[i]);
        x[i] = nm_bf16_to_f32(bits[i]);
    }
}

// The reference GEMM reads fp32, so bf16 operands are best handed to it as bf16 values in fp32
// storage (no conversion at all for the weights the model keeps that way).
nm_dtype nm_ref_gemm_bf16_weight_type(const nm_ops *be) { return NM_F32_BF16; }

// --- the GEMM --------------------------------------------------------------------------------------

// dst(rows, cols) packed (=) the bf16 value of operand x (rows, cols) stored with leading
// dimension ld as `type` says.
static void bf16_values(float *dst, const void *x, nm_dtype type, int64_t rows, int64_t cols, int64_t ld) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            float v;
            if (type == NM_BF16) {
                v = nm_bf16_to_f32(((const uint16_t *)x)[r * ld + c]);
            } else if (type == NM_F32) {
                v = nm_bf16_round(((const float *)x)[r * ld + c]);
            } else {
                v = ((const float *)x)[r * ld + c];
                NM_CHECK(nm_bf16_round(v) == v || v != v,
                         "gemm_bf16: operand labelled NM_F32_BF16 holds %.9g at row %lld col %lld, not a bf16 value "
                         "(round it with round_bf16 first)", (double)v, (long long)r, (long long)c);
            }
            dst[r * cols + c] = v;
        }
    }
}

void nm_ref_gemm_bf16(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type, int64_t ldb,
                      float beta, float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_bf16 dims M=%lld N=%lld K=%lld", (long long)M, (long long)N,
             (long long)K);
    NM_CHECK((a_type == NM_F32 || a_type == NM_BF16 || a_type == NM_F32_BF16) &&
                 (b_type == NM_F32 || b_type == NM_BF16 || b_type == NM_F32_BF16),
             "gemm_bf16 operand types %d %d", (int)a_type, (int)b_type);
    if (M == 0 || N == 0 || K == 0 || alpha == 0.0f) {
        // nothing is read from A or B: the fp32 GEMM's handling of C is the whole answer
        nm_ref_gemm(be, ta, tb, M, N, K, alpha, NULL, lda, NULL, ldb, beta, C, ldc);
        return;
    }
    // Stored shapes: op(A) (M,K) is stored (M,K) or, transposed, (K,M); op(B) likewise.
    const int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
    const int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm_bf16 lda=%lld (need %lld) ldb=%lld (need %lld)", (long long)lda,
             (long long)a_cols, (long long)ldb, (long long)b_cols);
    float *a = nm_ref_scratch(be, 0, (size_t)(a_rows * a_cols));
    float *b = nm_ref_scratch(be, 1, (size_t)(b_rows * b_cols));
    bf16_values(a, A, a_type, a_rows, a_cols, lda);
    bf16_values(b, B, b_type, b_rows, b_cols, ldb);
    nm_ref_gemm(be, ta, tb, M, N, K, alpha, a, a_cols, b, b_cols, beta, C, ldc);
}

void nm_ref_gemm_bf16_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                              const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type) {
    NM_CHECK(n >= 0, "gemm_bf16_grouped n=%lld", (long long)n);
    for (int64_t g = 0; g < n; g++) {
        const nm_gemm_group *x = &groups[g];
        nm_ref_gemm_bf16(be, ta, tb, x->M, x->N, x->K, alpha, x->A, a_type, x->lda, x->B, b_type, x->ldb, beta, x->C,
                         x->ldc);
    }
}
