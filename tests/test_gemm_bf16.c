// test_gemm_bf16.c: the CPU bf16 GEMM and cast (src/ops/cpu/gemm_bf16.c, semantics in ops.h).
//
// 1. cast_bf16 against an independent rounding: the nearer of the two bf16 neighbours of x,
//    compared in double, ties to the even one; plus hand-picked ties, inf, overflow, NaN.
// 2. gemm_bf16 against a double-precision product of the bf16-rounded inputs, over all four
//    transpose combinations, fp32 and bf16 operands, padded leading dimensions, alpha != 1,
//    beta = 0 over a NaN-filled C, beta = 1 and beta = 0.5, M = 1, odd sizes, M/N/K = 0.
// 3. Against the unrounded fp32 inputs the error must be that of bf16 (~2^-9 per input),
//    which proves the operands are rounded rather than multiplied in fp32.
// 4. No allocation once the scratch has seen the largest shape (nm_alloc_count).
// 5. round_bf16 (in place and out of place, fp32 storage) and round_cast_bf16 (both of its outputs)
//    against the same independent rounding; operands of type NM_F32_BF16 (fp32 storage holding
//    bf16 values) in every case of 2.
// 6. gemm_bf16_grouped: groups of different row counts (0 included) with every operand type,
//    each group's C against the double-precision reference of 2.
// `test_gemm_bf16 --bench` prints GFLOP/s against cblas_sgemm on the same shapes.
//
// Tolerance. A product of two bf16 values (8-bit significands) is exact in fp32, so with the
// reference built from the same rounded inputs the only error is fp32 accumulation: each of
// the K additions adds at most u = 2^-24 relative to the running sum, bounded by
// S = |alpha| sum_k |a_ik b_kj| + |beta c_ij|, so |err| <= K u S in the worst case. We allow
// 1e-5 sqrt(K) S: above K u S for every K <= 27,000 (sqrt(K) <= 1e-5 / u), so it is a bound,
// not a statistical guess, for all sizes here, while skipping the rounding of the inputs
// would give errors ~2^-9 S, far above it for K < 10^5.
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/check.h"
#include "core/rng.h"
#include "ops/ops.h"

static double g_worst = 0.0;    // largest error / tolerance bound over all cases
static uint64_t g_key;
static uint64_t g_ctr = 0;
static const nm_ops *ops;

#include "test_util.h"
#include "bf16_ref.h"
#include "test_backend.h"

// --- helpers --------------------------------------------------------------------------------

static float *randn(int64_t n, float scale) {
    float *x = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = scale * nm_rng_normal(g_key, g_ctr++);
    return x;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

// --- 1. the cast ----------------------------------------------------------------------------

static void test_cast(void) {
    // Hand-picked: exact, ties to even both ways, just above a tie, largest finite rounding
    // up to inf, inf, -0, smallest subnormal.
    const uint32_t in[] = {0x3f800000u, 0x3f808000u, 0x3f818000u, 0x3f808001u, 0xbf80ffffu,
                           0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x80000000u, 0x00000001u};
    const uint16_t want[] = {0x3f80, 0x3f80, 0x3f82, 0x3f81, 0xbf81,
                             0x7f80, 0x7f80, 0xff80, 0x8000, 0x0000};
    enum { n_fixed = sizeof in / sizeof in[0] };
    float src[n_fixed];
    uint16_t dst[n_fixed];
    for (int i = 0; i < n_fixed; i++) src[i] = from_bits(in[i]);
    ops->cast_bf16(ops, dst, src, n_fixed);
    for (int i = 0; i < n_fixed; i++)
        EXPECT(dst[i] == want[i], "cast(0x%08x) = 0x%04x, want 0x%04x", in[i], dst[i], want[i]);

    // NaN stays NaN (a payload only in the dropped bits must not turn it into inf), sign kept.
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu};
    for (int i = 0; i < 4; i++) {
        float x = from_bits(nans[i]);
        uint16_t h;
        ops->cast_bf16(ops, &h, &x, 1);
        EXPECT(isnan(bf16_to_f32(h)) && (h >> 15) == (nans[i] >> 31), "cast(0x%08x) = 0x%04x not a NaN",
               nans[i], h);
    }

    // Random values over many binades, enough to take the parallel path.
    int64_t n = 1 << 17;
    float *x = nm_malloc((size_t)n * sizeof(float));
    uint16_t *h = nm_malloc((size_t)n * sizeof(uint16_t));
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = nm_rng_u64(g_key, g_ctr++);
        // random sign and significand, exponent in [2^-40, 2^40]
        x[i] = from_bits((uint32_t)(r & 0x807fffffu) | (uint32_t)((87 + (r >> 32) % 80) << 23));
    }
    ops->cast_bf16(ops, h, x, n);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += h[i] != ref_bf16(x[i]);
    EXPECT(bad == 0, "%lld of %lld random casts differ from the reference rounding", (long long)bad,
           (long long)n);
    nm_free(x);
    nm_free(h);
}

// --- 2. the GEMM ----------------------------------------------------------------------------

typedef struct gemm_case {
    nm_transpose ta, tb;
    int64_t M, N, K, pad;       // pad: extra columns in every leading dimension
    nm_dtype a_type, b_type;
    float alpha, beta;
} gemm_case;

// Stored operand (rows, cols) with leading dimension ld, as fp32 (x) and as its bf16 rounding
// (h, same layout), both initialised; the padding holds NaN, which must never be read.
static void make_operand(float **x, uint16_t **h, int64_t rows, int64_t cols, int64_t ld) {
    int64_t n = rows * ld;
    *x = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    *h = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(uint16_t));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < ld; c++) {
            float v = c < cols ? nm_rng_normal(g_key, g_ctr++) : NAN;
            (*x)[r * ld + c] = v;
            (*h)[r * ld + c] = c < cols ? ref_bf16(v) : 0x7fc0;
        }
}

// The operand as the case's type says: fp32 storage (x), bf16 storage (h), or fp32 storage
// holding the bf16 values (xr, made here; the caller frees it).
static const void *operand(nm_dtype type, const float *x, const uint16_t *h, int64_t n, float **xr) {
    *xr = NULL;
    if (type == NM_F32) return x;
    if (type == NM_BF16) return h;
    *xr = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) (*xr)[i] = bf16_to_f32(h[i]);  // the padding stays NaN
    return *xr;
}

// C (after the GEMM) against the double-precision product of the bf16-rounded inputs, within
// the bound of the header; returns the normwise relative error against the unrounded inputs.
static double check_case(const gemm_case *t, const float *A, const uint16_t *Ah, int64_t lda, const float *B,
                         const uint16_t *Bh, int64_t ldb, const float *C0, const float *C, int64_t ldc) {
    int64_t M = t->M, N = t->N, K = t->K;
    double err2 = 0.0, ref2 = 0.0, worst = 0.0;
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = 0; j < N; j++) {
            double acc = 0.0, acc_exact = 0.0, mag = 0.0;
            for (int64_t k = 0; k < K; k++) {
                int64_t ia = t->ta == NM_NO_TRANS ? i * lda + k : k * lda + i;
                int64_t ib = t->tb == NM_NO_TRANS ? k * ldb + j : j * ldb + k;
                double a = bf16_to_f32(Ah[ia]), b = bf16_to_f32(Bh[ib]);
                acc += a * b;
                acc_exact += (double)A[ia] * (double)B[ib];
                mag += fabs(a * b);
            }
            double c0 = t->beta == 0.0f ? 0.0 : (double)t->beta * C0[i * ldc + j];
            double ref = (double)t->alpha * acc + c0;
            double bound = 1e-5 * sqrt((double)(K > 0 ? K : 1)) * (fabs((double)t->alpha) * mag + fabs(c0)) + 1e-30;
            double got = C[i * ldc + j];
            double e = fabs(got - ref) / bound;
            if (!(e <= worst)) worst = e;    // NaN-propagating max
            double exact = (double)t->alpha * acc_exact + c0;
            err2 += (got - exact) * (got - exact);
            ref2 += exact * exact;
        }
        for (int64_t j = N; j < ldc; j++) {
            float was = C0[i * ldc + j], is = C[i * ldc + j];
            EXPECT(memcmp(&was, &is, sizeof was) == 0, "padding of C row %lld col %lld was written",
                   (long long)i, (long long)j);
        }
    }
    if (!(worst <= g_worst)) g_worst = worst;
    EXPECT(worst <= 1.0, "ta=%d tb=%d M=%lld N=%lld K=%lld pad=%lld types=%d,%d alpha=%g beta=%g: error %.3g x bound",
           (int)t->ta, (int)t->tb, (long long)M, (long long)N, (long long)K, (long long)t->pad,
           (int)t->a_type, (int)t->b_type, (double)t->alpha, (double)t->beta, worst);
    return ref2 > 0.0 ? sqrt(err2 / ref2) : 0.0;
}

// Runs one case; returns the normwise relative error against the unrounded fp32 inputs.
static double run_case(const gemm_case *t) {
    int64_t M = t->M, N = t->N, K = t->K;
    int64_t a_rows = t->ta == NM_NO_TRANS ? M : K, a_cols = t->ta == NM_NO_TRANS ? K : M;
    int64_t b_rows = t->tb == NM_NO_TRANS ? K : N, b_cols = t->tb == NM_NO_TRANS ? N : K;
    int64_t lda = a_cols + t->pad, ldb = b_cols + t->pad, ldc = N + t->pad;
    float *A, *B, *Ar, *Br;
    uint16_t *Ah, *Bh;
    make_operand(&A, &Ah, a_rows, a_cols, lda);
    make_operand(&B, &Bh, b_rows, b_cols, ldb);
    float *C0 = randn(M * ldc, 1.0f);
    if (t->beta == 0.0f)
        for (int64_t i = 0; i < M * ldc; i++) C0[i] = NAN;
    float *C = nm_malloc((size_t)(M * ldc > 0 ? M * ldc : 1) * sizeof(float));
    if (M * ldc > 0) memcpy(C, C0, (size_t)(M * ldc) * sizeof(float));

    const void *a = operand(t->a_type, A, Ah, a_rows * lda, &Ar), *b = operand(t->b_type, B, Bh, b_rows * ldb, &Br);
    ops->gemm_bf16(ops, t->ta, t->tb, M, N, K, t->alpha, a, t->a_type, lda, b, t->b_type, ldb, t->beta, C, ldc);
    double rel = check_case(t, A, Ah, lda, B, Bh, ldb, C0, C, ldc);
    nm_free(A);
    nm_free(B);
    nm_free(Ah);
    nm_free(Bh);
    nm_free(Ar);
    nm_free(Br);
    nm_free(C0);
    nm_free(C);
    return rel;
}

static void test_gemm(void) {
    const int64_t shapes[][3] = {{1, 1, 1},   {1, 37, 65},  {7, 13, 29},   {33, 1, 70},
                                 {64, 48, 96}, {129, 77, 257}, {5, 300, 3}};
    const float ab[][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {-0.75f, 0.5f}};
    int n_cases = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int tr = 0; tr < 4; tr++)
            for (int types = 0; types < 9; types++)
                for (int v = 0; v < 3; v++) {
                    gemm_case t = {(nm_transpose)(tr & 1), (nm_transpose)(tr >> 1), shapes[s][0],
                                   shapes[s][1], shapes[s][2], (s + (size_t)tr) % 2 ? 3 : 0,
                                   (nm_dtype)(types % 3), (nm_dtype)(types / 3), ab[v][0], ab[v][1]};
                    run_case(&t);
                    n_cases++;
                }
    printf("gemm_bf16: %d cases (4 transposes x fp32/bf16/bf16-valued fp32 operands x alpha/beta x 7 shapes)\n",
           n_cases);

    // Degenerate shapes: M = 0 and N = 0 touch nothing, K = 0 leaves beta * C (zeros over NaN).
    float c[6] = {NAN, NAN, NAN, NAN, NAN, NAN};
    float a1 = 1.0f;
    ops->gemm_bf16(ops, NM_NO_TRANS, NM_NO_TRANS, 0, 3, 4, 1.0f, &a1, NM_F32, 4, &a1, NM_F32, 3, 0.0f, c, 3);
    ops->gemm_bf16(ops, NM_NO_TRANS, NM_NO_TRANS, 2, 0, 4, 1.0f, &a1, NM_F32, 4, &a1, NM_F32, 1, 0.0f, c, 3);
    EXPECT(isnan(c[0]) && isnan(c[5]), "M = 0 or N = 0 wrote C");
    ops->gemm_bf16(ops, NM_TRANS, NM_NO_TRANS, 2, 3, 0, 1.0f, NULL, NM_F32, 2, NULL, NM_BF16, 3, 0.0f, c, 3);
    for (int i = 0; i < 6; i++) EXPECT(c[i] == 0.0f, "K = 0, beta = 0: c[%d] = %g", i, (double)c[i]);
    for (int i = 0; i < 6; i++) c[i] = 2.0f;
    ops->gemm_bf16(ops, NM_NO_TRANS, NM_TRANS, 2, 3, 0, 1.0f, NULL, NM_BF16, 1, NULL, NM_F32, 1, 0.5f, c, 3);
    for (int i = 0; i < 6; i++) EXPECT(c[i] == 1.0f, "K = 0, beta = 0.5: c[%d] = %g", i, (double)c[i]);

    // 3. Rounding happens: against the unrounded inputs the normwise error is that of bf16
    // inputs (each operand off by up to 2^-9 relative, ~2^-10 rms), far above fp32's ~1e-7.
    gemm_case big = {NM_NO_TRANS, NM_TRANS, 96, 80, 512, 0, NM_F32, NM_F32, 1.0f, 0.0f};
    double rel = run_case(&big);
    printf("gemm_bf16: error vs the unrounded fp32 product %.3g relative (2^%.2f)\n", rel, log2(rel));
    EXPECT(rel > 0x1p-12 && rel < 0x1p-7, "relative error %.3g vs fp32 inputs: not bf16 rounding", rel);

    // 4. Steady state allocates nothing: same and smaller shapes after the first call.
    gemm_case warm = {NM_TRANS, NM_NO_TRANS, 200, 64, 300, 0, NM_F32, NM_F32, 1.0f, 1.0f};
    run_case(&warm);
    int64_t M = 200, N = 64, K = 300;
    float *A = randn(K * M, 1.0f), *B = randn(K * N, 1.0f), *C = randn(M * N, 1.0f);
    uint64_t before = nm_alloc_count();
    for (int rep = 0; rep < 3; rep++) {
        ops->gemm_bf16(ops, NM_TRANS, NM_NO_TRANS, M, N, K, 1.0f, A, NM_F32, M, B, NM_F32, N, 0.0f, C, N);
        ops->gemm_bf16(ops, NM_TRANS, NM_NO_TRANS, M - rep - 1, N, K, 1.0f, A, NM_F32, M, B, NM_F32, N, 1.0f, C, N);
    }
    EXPECT(nm_alloc_count() == before, "%llu allocations in steady state",
           (unsigned long long)(nm_alloc_count() - before));
    nm_free(A);
    nm_free(B);
    nm_free(C);
}

// --- 5. round_bf16 ---------------------------------------------------------------------------

static void test_round(void) {
    int64_t n = (1 << 17) + 5;  // the parallel path, and a tail
    float *x = nm_malloc((size_t)n * sizeof(float)), *y = nm_malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = nm_rng_u64(g_key, g_ctr++);
        x[i] = from_bits((uint32_t)(r & 0x807fffffu) | (uint32_t)((87 + (r >> 32) % 80) << 23));
    }
    x[0] = from_bits(0x3f808000u);  // a tie, to even (down)
    x[1] = from_bits(0x3f818000u);  // a tie, to even (up)
    x[2] = NAN;
    x[3] = INFINITY;
    memcpy(y, x, (size_t)n * sizeof(float));
    ops->round_bf16(ops, y, y, n);
    int64_t bad = 0;
    for (int64_t i = 3; i < n; i++) bad += bits(y[i]) != (uint32_t)ref_bf16(x[i]) << 16;
    EXPECT(bad == 0, "%lld of %lld in-place roundings differ from the reference", (long long)bad, (long long)n);
    EXPECT(bits(y[0]) == 0x3f800000u && bits(y[1]) == 0x3f820000u, "ties: 0x%08x 0x%08x", bits(y[0]), bits(y[1]));
    EXPECT(isnan(y[2]), "NaN rounded to %g", (double)y[2]);
    // out of place: the same bits, the source untouched
    float *z = nm_malloc((size_t)n * sizeof(float));
    memcpy(z, x, (size_t)n * sizeof(float));
    float *w = nm_malloc((size_t)n * sizeof(float));
    ops->round_bf16(ops, w, z, n);
    EXPECT(memcmp(z, x, (size_t)n * sizeof(float)) == 0, "round_bf16 out of place wrote its source");
    EXPECT(memcmp(w, y, 2 * sizeof(float)) == 0 && memcmp(w + 3, y + 3, (size_t)(n - 3) * sizeof(float)) == 0 &&
               isnan(w[2]),
           "round_bf16 out of place differs from in place");
    nm_free(z);
    nm_free(w);
    // rounding a rounded value changes nothing
    memcpy(x, y, (size_t)n * sizeof(float));
    ops->round_bf16(ops, y, y, n);
    EXPECT(memcmp(x, y, (size_t)n * sizeof(float)) == 0, "round_bf16 is not idempotent");
    nm_free(x);
    nm_free(y);
}

// round_cast_bf16: fp32 storage rounded in place and the bf16 copy, both against the reference.
static void test_round_cast(void) {
    int64_t n = (1 << 17) + 7;  // the parallel path, and a tail
    float *x = nm_malloc((size_t)n * sizeof(float)), *y = nm_malloc((size_t)n * sizeof(float));
    uint16_t *h = nm_malloc((size_t)n * sizeof(uint16_t));
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = nm_rng_u64(g_key, g_ctr++);
        x[i] = from_bits((uint32_t)(r & 0x807fffffu) | (uint32_t)((87 + (r >> 32) % 80) << 23));
    }
    x[0] = from_bits(0x3f808000u);  // ties to even, down and up
    x[1] = from_bits(0x3f818000u);
    x[2] = NAN;
    memcpy(y, x, (size_t)n * sizeof(float));
    ops->round_cast_bf16(ops, y, h, n);
    int64_t bad_f = 0, bad_h = 0;
    for (int64_t i = 3; i < n; i++) {
        bad_f += bits(y[i]) != (uint32_t)ref_bf16(x[i]) << 16;
        bad_h += h[i] != ref_bf16(x[i]);
    }
    EXPECT(bad_f == 0 && bad_h == 0, "round_cast_bf16: %lld fp32 and %lld bf16 of %lld differ from the reference",
           (long long)bad_f, (long long)bad_h, (long long)n);
    EXPECT(h[0] == 0x3f80 && h[1] == 0x3f82 && bits(y[0]) == 0x3f800000u && bits(y[1]) == 0x3f820000u,
           "round_cast_bf16 ties: 0x%04x 0x%04x", h[0], h[1]);
    EXPECT(isnan(y[2]) && (h[2] & 0x7f80) == 0x7f80 && (h[2] & 0x7f) != 0, "round_cast_bf16 NaN: %g 0x%04x",
           (double)y[2], h[2]);
    nm_free(x);
    nm_free(y);
    nm_free(h);
}

// --- 6. grouped ------------------------------------------------------------------------------

// Experts-like groups: the same N, K per call, different row counts M (0 included) in forward
// shape, or the row count as K (weight-gradient shape, 0 included).
static void grouped_case(nm_transpose ta, nm_transpose tb, nm_dtype at, nm_dtype bt, float beta, int wgrad) {
    enum { n_groups = 6 };
    const int64_t rows[n_groups] = {37, 0, 130, 1, 64, 9};
    gemm_case t[n_groups];
    float *A[n_groups], *B[n_groups], *Ar[n_groups], *Br[n_groups], *C0[n_groups], *C[n_groups];
    uint16_t *Ah[n_groups], *Bh[n_groups];
    nm_gemm_group groups[n_groups];
    for (int g = 0; g < n_groups; g++) {
        int64_t M = wgrad ? 48 : rows[g], N = wgrad ? 40 : 72, K = wgrad ? rows[g] : 56;
        t[g] = (gemm_case){ta, tb, M, N, K, g % 2, at, bt, 1.0f, beta};
        int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
        int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
        int64_t lda = a_cols + t[g].pad, ldb = b_cols + t[g].pad, ldc = N + t[g].pad;
        make_operand(&A[g], &Ah[g], a_rows, a_cols, lda);
        make_operand(&B[g], &Bh[g], b_rows, b_cols, ldb);
        C0[g] = randn(M * ldc, 1.0f);
        if (beta == 0.0f)
            for (int64_t i = 0; i < M * ldc; i++) C0[g][i] = NAN;
        C[g] = nm_malloc((size_t)(M * ldc > 0 ? M * ldc : 1) * sizeof(float));
        if (M * ldc > 0) memcpy(C[g], C0[g], (size_t)(M * ldc) * sizeof(float));
        groups[g] = (nm_gemm_group){.M = M, .N = N, .K = K, .A = operand(at, A[g], Ah[g], a_rows * lda, &Ar[g]),
                                    .lda = lda, .B = operand(bt, B[g], Bh[g], b_rows * ldb, &Br[g]), .ldb = ldb,
                                    .C = C[g], .ldc = ldc};
    }
    ops->gemm_bf16_grouped(ops, ta, tb, 1.0f, beta, groups, n_groups, at, bt);
    for (int g = 0; g < n_groups; g++) {
        check_case(&t[g], A[g], Ah[g], groups[g].lda, B[g], Bh[g], groups[g].ldb, C0[g], C[g], groups[g].ldc);
        nm_free(A[g]);
        nm_free(B[g]);
        nm_free(Ah[g]);
        nm_free(Bh[g]);
        nm_free(Ar[g]);
        nm_free(Br[g]);
        nm_free(C0[g]);
        nm_free(C[g]);
    }
}

static void test_grouped(void) {
    int n = 0;
    for (int tr = 0; tr < 4; tr++)
        for (int types = 0; types < 9; types++)
            for (int wgrad = 0; wgrad < 2; wgrad++) {
                grouped_case((nm_transpose)(tr & 1), (nm_transpose)(tr >> 1), (nm_dtype)(types % 3),
                             (nm_dtype)(types / 3), wgrad ? 1.0f : 0.0f, wgrad);
                n++;
            }
    printf("gemm_bf16_grouped: %d calls of 6 groups (4 transposes x 3 x 3 operand types x forward/wgrad shapes)\n", n);
}

// --- threads --------------------------------------------------------------------------------

// The library runs on our OpenMP threads: 1 and 2 threads must both give correct results.
static void test_threads(void) {
    int saved = omp_get_max_threads();
    for (int nt = 1; nt <= 2; nt++) {
        omp_set_num_threads(nt);
        gemm_case t = {NM_NO_TRANS, NM_NO_TRANS, 257, 130, 300, 1, NM_F32, NM_BF16, 1.0f, 1.0f};
        run_case(&t);
    }
    omp_set_num_threads(saved);
}

// --- benchmark (--bench) --------------------------------------------------------------------

static void bench_threads(void);

// omp_set_num_threads, not only OMP_NUM_THREADS, must reach oneDNN: 1 thread, then 2.
static void bench(void) {
    int saved = omp_get_max_threads();
    for (int nt = 1; nt <= 2; nt++) {
        omp_set_num_threads(nt);
        bench_threads();
    }
    omp_set_num_threads(saved);
}

static void bench_threads(void) {
    const int64_t shapes[][3] = {{1024, 1024, 1024}, {2048, 2048, 2048}, {256, 256, 256},
                                 {1024, 1536, 512},  {64, 2048, 2048},   {1, 2048, 2048}};
    printf("threads %d; best of 5 runs of ~0.2 GFLOP each\n", omp_get_max_threads());
    printf("%6s %6s %6s | %12s %12s %12s\n", "M", "N", "K", "bf16 f32-in", "bf16 bf16-in", "sgemm");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *A = randn(M * K, 1.0f), *B = randn(K * N, 1.0f), *C = randn(M * N, 1.0f);
        uint16_t *Ah = nm_malloc((size_t)(M * K) * sizeof(uint16_t));
        uint16_t *Bh = nm_malloc((size_t)(K * N) * sizeof(uint16_t));
        ops->cast_bf16(ops, Ah, A, M * K);
        ops->cast_bf16(ops, Bh, B, K * N);
        double flop = 2.0 * (double)M * (double)N * (double)K;
        int reps = (int)(2e8 / flop);
        if (reps < 1) reps = 1;
        double best[3] = {1e30, 1e30, 1e30};
        for (int trial = 0; trial < 6; trial++) {
            for (int impl = 0; impl < 3; impl++) {
                double t0 = now();
                for (int r = 0; r < reps; r++) {
                    if (impl == 0) ops->gemm_bf16(ops, NM_NO_TRANS, NM_NO_TRANS, M, N, K, 1.0f, A, NM_F32, K, B, NM_F32, N, 0.0f, C, N);
                    if (impl == 1) ops->gemm_bf16(ops, NM_NO_TRANS, NM_NO_TRANS, M, N, K, 1.0f, Ah, NM_BF16, K, Bh, NM_BF16, N, 0.0f, C, N);
                    if (impl == 2) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)N, (int)K, 1.0f, A, (int)K, B, (int)N, 0.0f, C, (int)N);
                }
                double dt = (now() - t0) / reps;
                if (trial > 0 && dt < best[impl]) best[impl] = dt;   // trial 0 warms up
            }
        }
        printf("%6lld %6lld %6lld | %12.1f %12.1f %12.1f GFLOP/s\n", (long long)M, (long long)N, (long long)K,
               flop / best[0] * 1e-9, flop / best[1] * 1e-9, flop / best[2] * 1e-9);
        nm_free(A);
        nm_free(B);
        nm_free(C);
        nm_free(Ah);
        nm_free(Bh);
    }
}

static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx (AMX-BF16 tiles)";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16 (AVX512-BF16)";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni (bf16 emulated on AVX-512)";
    case dnnl_cpu_isa_avx512_core: return "avx512_core (bf16 emulated on AVX-512)";
    default: return "no bf16-capable ISA";
    }
}

int main(int argc, char **argv) {
    g_key = nm_rng_key(1234, NM_RNG_TEST, 16, 0);
    ops = test_backend("cpu");
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    const dnnl_version_t *v = dnnl_version();
    printf("oneDNN %d.%d.%d, cpu runtime %s, effective ISA 0x%x: %s\n", v->major, v->minor, v->patch,
           v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other", (unsigned)isa, isa_name(isa));
    // oneDNN's bf16 kernels need AVX-512 at least (native dot products from avx512_core_bf16);
    // the "widen" kernel (fp32 GEMM on widened operands) runs anywhere.
    const char *kernels = ops->kernel_names(ops);
    printf("kernels: %s\n", kernels);
    if (!strstr(kernels, "bf16 GEMM widen") && (isa & dnnl_cpu_isa_avx512_core) != dnnl_cpu_isa_avx512_core) {
        return test_skip_machine("oneDNN reports no bf16-capable ISA on this CPU (AVX-512 needed)");
    }
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        bench();
        return 0;
    }
    test_cast();
    test_gemm();
    test_round();
    test_round_cast();
    test_grouped();
    test_threads();
    printf("gemm_bf16: largest error %.3g of the tolerance bound\n", g_worst);
    if (failures) {
        fprintf(stderr, "test_gemm_bf16: %d failures\n", failures);
        return 1;
    }
    printf("test_gemm_bf16: OK\n");
    return 0;
}
