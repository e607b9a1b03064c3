// gemm.c: the CPU GEMM, row-major C(M,N) = alpha * op(A) op(B) + beta * C in fp32, through
// oneDNN's sgemm (default) or OpenBLAS's cblas_sgemm. Not here: bf16/AMX (gemm_bf16.c) and
// fp8 emulation, which are other ops.
//
// Which library: NM_CPU_GEMM=onednn|openblas, read once; anything else is an error, not a
// fallback. oneDNN is the default because it trains faster: on configs/small.json (2 threads,
// AVX-512 Xeon) the whole step ran ~10% faster with every GEMM through dnnl_sgemm than through
// OpenBLAS 0.3.21's SkylakeX kernels (alternating runs; docs/performance.md). At the model's
// own shapes bench/peak measured oneDNN 2-20% ahead (the 16-column router GEMM 2.8x), and
// inside the step OpenBLAS also pays a separate pass to zero C when beta == 0. That is the
// default of a bare call; the trainer measures both on the model's shapes (kernels.c) and
// sets the faster, caching the pick in the run directory so a resume reuses it (a fresh
// timing could differ between two runs and break bit-exact resume).
//
// Degenerate shapes are handled before either library: M or N == 0 touches nothing, K == 0
// only scales C (BLAS implementations disagree on whether they accept K == 0 with small
// leading dims). beta == 0 must ignore C's old contents even when they are NaN (ops.h); both
// libraries write C without reading it then, and test_ops checks that with a NaN-filled C
// under each library.
//
// Threads: both are the OpenMP builds and run on the caller's OpenMP team; called inside a
// parallel region (grouped GEMMs, attention tiles) each call runs on its own thread.
#include <cblas.h>
#include <omp.h>
#include <limits.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <stdlib.h>
#include <string.h>

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

typedef enum gemm_library { GEMM_UNSET = 0, GEMM_ONEDNN, GEMM_OPENBLAS } gemm_library;

static gemm_library parse_library(nm_error *err) {
    const char *v = getenv("NM_CPU_GEMM");
    if (!v || !*v || strcmp(v, "onednn") == 0) return GEMM_ONEDNN;
    if (strcmp(v, "openblas") == 0) return GEMM_OPENBLAS;
    nm_error_set(err, "environment variable NM_CPU_GEMM=%s: expected onednn or openblas (or unset it)", v);
    return GEMM_UNSET;
}

int nm_cpu_gemm_setup(const nm_ops *be, nm_error *err) { return parse_library(err) == GEMM_UNSET ? -1 : 0; }

// The first call may come from inside a parallel region (attention tiles), so the one-time
// read into the instance (nm_cpu_ctx.gemm_library) is guarded; the value never changes after it.
static gemm_library library(const nm_ops *be) {
    nm_cpu_ctx *ctx = nm_cpu_ctx_of(be);
    int l;
#pragma omp atomic read
    l = ctx->gemm_library;
    if (l != GEMM_UNSET) return (gemm_library)l;
    nm_error err;
    l = (int)parse_library(&err);
    // nm_cpu_gemm_setup (ops->setup at model creation) reported a bad value already
    if (l == GEMM_UNSET) nm_check_failed(__FILE__, __LINE__, "NM_CPU_GEMM valid", "%s", err.msg);
#pragma omp atomic write
    ctx->gemm_library = l;
    return (gemm_library)l;
}

const char *nm_cpu_gemm_library(const nm_ops *be) { return library(be) == GEMM_ONEDNN ? "onednn" : "openblas"; }

// The measured choice (kernels.c) sets the library from outside any parallel region, before
// the step loop; NM_CPU_GEMM, when set, is honoured by the caller never calling this.
int nm_cpu_gemm_set_library(const nm_ops *be, const char *name) {
    nm_cpu_ctx *ctx = nm_cpu_ctx_of(be);
    if (strcmp(name, "onednn") == 0) ctx->gemm_library = GEMM_ONEDNN;
    else if (strcmp(name, "openblas") == 0) ctx->gemm_library = GEMM_OPENBLAS;
    else return -1;
    return 0;
}

void nm_cpu_gemm(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
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
    if (library(be) == GEMM_ONEDNN) {
        // dnnl_sgemm is row-major with 64-bit dimensions, the same contract as here.
        dnnl_status_t st = dnnl_sgemm(ta == NM_TRANS ? 'T' : 'N', tb == NM_TRANS ? 'T' : 'N', M, N, K, alpha, A,
                                      lda, B, ldb, beta, C, ldc);
        NM_CHECK(st == dnnl_success, "dnnl_sgemm(%c%c M=%lld N=%lld K=%lld) failed: %s", ta == NM_TRANS ? 'T' : 'N',
                 tb == NM_TRANS ? 'T' : 'N', (long long)M, (long long)N, (long long)K, dnnl_status2str(st));
        return;
    }
    // cblas takes int dimensions (blasint is 32-bit in Debian's OpenBLAS).
    NM_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                 ldc <= INT_MAX,
             "gemm dimension exceeds the BLAS int range");
    cblas_sgemm(CblasRowMajor, ta == NM_TRANS ? CblasTrans : CblasNoTrans,
                tb == NM_TRANS ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K, alpha, A, (int)lda,
                B, (int)ldb, beta, C, (int)ldc);
}

// Experts of one layer: each group is one single-threaded GEMM call (both libraries run
// single-threaded inside a parallel region), groups spread over the threads. For MoE
// shapes (a few hundred rows per expert) this scales where one multi-threaded call per
// expert does not: each small GEMM split over threads spends its time synchronising.
// Every group writes only its own C, so the result is independent of the schedule.
//
// The groups are handed out largest first (by M*N*K; longest-processing-time order): expert
// loads are uneven (max/mean 3.2 at the first step of configs/small-train.json), and in index
// order a heavy expert near the end runs alone while the other threads wait. Measured on 16
// experts (512 x 512 weights, 8,224 rows, one expert at 3.2x the mean), 2 threads: 1.10-1.16x
// faster when the heavy one is among the last, equal when it is first. Each group is still one
// whole call, so the order changes no result. The order buffer is the instance's
// (nm_cpu_ctx.grouped_order): call from one thread (the model's), not inside a parallel region.

void nm_cpu_gemm_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                         const nm_gemm_group *groups, int64_t n) {
    NM_CHECK(n >= 0, "gemm_grouped n=%lld", (long long)n);
    NM_CHECK(!omp_in_parallel(), "gemm_grouped keeps one order buffer: call it from one thread");
    nm_cpu_ctx *ctx = nm_cpu_ctx_of(be);
    if (n > ctx->grouped_cap) {  // grows only: a training loop sees its largest n in its first step
        nm_free(ctx->grouped_order);
        ctx->grouped_order = nm_malloc((size_t)n * sizeof(int64_t));
        ctx->grouped_cap = n;
    }
    int64_t *order = ctx->grouped_order;
    // insertion sort by work, descending (n is the experts per layer: tens to a few hundred)
    for (int64_t i = 0; i < n; i++) {
        double w = (double)groups[i].M * (double)groups[i].N * (double)groups[i].K;
        int64_t j = i;
        while (j > 0) {
            const nm_gemm_group *y = &groups[order[j - 1]];
            if ((double)y->M * (double)y->N * (double)y->K >= w) break;
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; i++) {
        const nm_gemm_group *x = &groups[order[i]];
        nm_cpu_gemm(be, ta, tb, x->M, x->N, x->K, alpha, (const float *)x->A, x->lda, (const float *)x->B, x->ldb, beta,
                    x->C, x->ldc);
    }
}
