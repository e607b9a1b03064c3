// gemm.c: the reference GEMM, row-major C(M,N) = alpha * op(A) op(B) + beta * C (ops.h), and
// its grouped form. Every product of two floats is exact in double (24 + 24 bits < 53), and
// the K products of an output are summed in double in k order, so the result is the exact
// value up to the double sums' rounding (~K * 1e-16 relative) and one final rounding to fp32.
//
// The loop nest is the definition, C[i][j] = sum_k op(A)[i][k] op(B)[k][j], with one change
// for speed: eight output columns are summed side by side. A single dot product is one chain
// of dependent double adds; eight independent chains keep the adder busy and vectorise: at
// 256^3 on one core 8-10 GFLOP/s against 1.7-2.7 with one column (4 and 16 columns measured
// 6-8), the difference between a tiny training step of ~6 s and ~25 s. Each output is still
// its own k-ordered sum: the blocking changes no bit.
#include "core/check.h"
#include "ops/ref/ref_ops.h"

#define COLS 8 // output columns summed side by side (see the file comment)

// Row-major op(X) (rows, cols) stored with leading dimension ld: element (r, c) is at
// X[r * (*rs) + c * (*cs)]; transposing swaps the strides instead of the data.
static void strides(nm_transpose t, int64_t ld, int64_t *rs, int64_t *cs) {
    *rs = t == NM_NO_TRANS ? ld : 1;
    *cs = t == NM_NO_TRANS ? 1 : ld;
}

// acc(nj) (+=) sum over k of op(A)(i, k) op(B)(k, j0 + j), each column's sum in k order. Called
// with nj == COLS, a constant after inlining, for all but the last columns: the compiler then
// keeps the COLS sums in registers instead of reloading them from memory for every k.
static inline void sum_cols(double *acc, int64_t nj, const float *a, int64_t acs, const float *b, int64_t brs,
                            int64_t bcs, int64_t K) {
    for (int64_t k = 0; k < K; k++) {
        const double ak = a[k * acs];
        for (int64_t j = 0; j < nj; j++) acc[j] += ak * b[k * brs + j * bcs];
    }
}

void nm_ref_gemm(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm dims M=%lld N=%lld K=%lld", (long long)M, (long long)N, (long long)K);
    NM_CHECK((ta == NM_NO_TRANS || ta == NM_TRANS) && (tb == NM_NO_TRANS || tb == NM_TRANS),
             "gemm transpose flags %d %d", (int)ta, (int)tb);
    if (M == 0 || N == 0) return;
    NM_CHECK(ldc >= N, "gemm ldc=%lld < N=%lld", (long long)ldc, (long long)N);
    // K == 0 or alpha == 0: A and B are not read (they may hold anything), C becomes beta * C.
    const int products = K > 0 && alpha != 0.0f;
    if (products) {
        NM_CHECK(lda >= (ta == NM_NO_TRANS ? K : M) && ldb >= (tb == NM_NO_TRANS ? N : K),
                 "gemm lda=%lld ldb=%lld too small for M=%lld N=%lld K=%lld", (long long)lda, (long long)ldb,
                 (long long)M, (long long)N, (long long)K);
    }
    int64_t ars, acs, brs, bcs;
    strides(ta, lda, &ars, &acs);
    strides(tb, ldb, &brs, &bcs);
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j0 = 0; j0 < N; j0 += COLS) {
            const int64_t nj = N - j0 < COLS ? N - j0 : COLS;
            double acc[COLS] = {0};
            if (products && nj == COLS) sum_cols(acc, COLS, A + i * ars, acs, B + j0 * bcs, brs, bcs, K);
            else if (products) sum_cols(acc, nj, A + i * ars, acs, B + j0 * bcs, brs, bcs, K);
            for (int64_t j = 0; j < nj; j++) {
                float *c = &C[i * ldc + j0 + j];
                // beta == 0 ignores the old C, which may be NaN (ops.h)
                const double c0 = beta == 0.0f ? 0.0 : (double)beta * *c;
                *c = (float)((double)alpha * acc[j] + c0);
            }
        }
    }
}

void nm_ref_gemm_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                         const nm_gemm_group *groups, int64_t n) {
    NM_CHECK(n >= 0, "gemm_grouped n=%lld", (long long)n);
    for (int64_t g = 0; g < n; g++) {
        const nm_gemm_group *x = &groups[g];
        nm_ref_gemm(be, ta, tb, x->M, x->N, x->K, alpha, x->A, x->lda, x->B, x->ldb, beta, x->C, x->ldc);
    }
}
