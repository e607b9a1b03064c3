// gemm.c: the CPU GEMM, row-major C(M,N) = alpha * op(A) op(B) + beta * C, through OpenBLAS
// (cblas_sgemm, fp32). Not here: bf16/AMX (oneDNN) and fp8 emulation, which are other ops.
//
// Degenerate shapes are handled before BLAS: M or N == 0 touches nothing, K == 0 only scales
// C (BLAS implementations disagree on whether they accept K == 0 with small leading dims).
// beta == 0 must ignore C's old contents even when they are NaN (ops.h); OpenBLAS's beta
// kernel zero-fills when beta == 0, and test_ops checks that with a NaN-filled C.
#include <cblas.h>
#include <limits.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"

// C(M,N) (=) beta * C, beta == 0 writing exact zeros (the old contents may be NaN).
void nm_cpu_scale_matrix(float *C, int64_t ldc, int64_t M, int64_t N, float beta) {
    for (int64_t i = 0; i < M; i++) {
        float *c = C + i * ldc;
        if (beta == 0.0f) {
            for (int64_t j = 0; j < N; j++) c[j] = 0.0f;
        } else {
            for (int64_t j = 0; j < N; j++) c[j] *= beta;
        }
    }
}

void nm_cpu_gemm(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm dims M=%lld N=%lld K=%lld", (long long)M,
             (long long)N, (long long)K);
    if (M == 0 || N == 0) return;
    NM_CHECK(ldc >= N, "gemm ldc=%lld < N=%lld", (long long)ldc, (long long)N);
    if (K == 0 || alpha == 0.0f) {
        nm_cpu_scale_matrix(C, ldc, M, N, beta);
        return;
    }
    // Row-major op(A) is (M,K): stored (M,lda>=K) untransposed, (K,lda>=M) transposed.
    int64_t a_cols = ta == NM_NO_TRANS ? K : M;
    int64_t b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm lda=%lld (need %lld) ldb=%lld (need %lld)",
             (long long)lda, (long long)a_cols, (long long)ldb, (long long)b_cols);
    // cblas takes int dimensions (blasint is 32-bit in Debian's OpenBLAS).
    NM_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                 ldc <= INT_MAX,
             "gemm dimension exceeds the BLAS int range");
    cblas_sgemm(CblasRowMajor, ta == NM_TRANS ? CblasTrans : CblasNoTrans,
                tb == NM_TRANS ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K, alpha, A, (int)lda,
                B, (int)ldb, beta, C, (int)ldc);
}

// Experts of one layer: each group is one single-threaded BLAS call (OpenBLAS's OpenMP build
// runs single-threaded inside a parallel region), groups spread over the threads. For MoE
// shapes (a few hundred rows per expert) this scales where one multi-threaded call per
// expert does not: each small GEMM split over threads spends its time synchronising.
// Every group writes only its own C, so the result is independent of the schedule.
void nm_cpu_gemm_grouped(nm_transpose ta, nm_transpose tb, float alpha, float beta, const nm_gemm_group *groups,
                         int64_t n) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t g = 0; g < n; g++) {
        const nm_gemm_group *x = &groups[g];
        nm_cpu_gemm(ta, tb, x->M, x->N, x->K, alpha, x->A, x->lda, x->B, x->ldb, beta, x->C, x->ldc);
    }
}
