// test_backend_ops.c: every op of every backend against the reference backend (src/ops/ref),
// over the shapes and dtypes the model uses (ggml's test-backend-ops). Each op runs on both
// backends with the same inputs; every output is compared. The cuda backend (builds with the
// CUDA toolkit) is tested when its setup finds a GPU; without one its part prints a
// SKIP(machine) line and the CPU part decides the result. Its tolerances are the CPU's until a
// GPU run has measured its own (the ops sum in the reference's order where they can).
//
// Inputs: fresh random values per run (NM_TEST_SEED replays one), at the widths of
// configs/tiny.json (D 256, 4 heads of 32 + 16 / 32, 16 experts of 128, top-4 in 4 groups,
// V 512, F 640) over B = 2 sequences of T = 65 tokens (seq_len 64 + 1), plus DeepSeek-V3's
// widest rows (D = 7175: 7168 and a tail; V = 129280) and attention over T = 300 (the CPU
// backend's key chunks are 256). Every dtype the model hands an op is used: fp32, fp32 storage
// holding bf16 values (NM_F32_BF16) and bf16 storage, and both fp8 operand kinds.
//
// Outputs: "(=)" outputs start as NaN on both sides, so an element one backend leaves unwritten
// fails; "(+=)" outputs start from the same random values. Integer outputs (selections,
// permutations, offsets) and outputs that only move or round values must match exactly.
// Floating-point outputs are compared by err = max |x - ref| / max |ref| over the tensor;
// outputs rounded to bf16 by the op itself are compared in bf16 steps (ulps): the two
// backends' fp32 values differ by ~1e-7, so a value next to a rounding boundary may round
// either way, by one step (check_bf16_out says what else it allows).
//
// Tolerances: about 10x the worst err measured over 60 runs (20 seeds each under the CPU
// backend's default kernels, NM_CPU_BF16_GEMM=onednn and NM_CPU_GEMM=openblas; an AMD EPYC
// with AVX512-BF16, 2 threads); each TOL_* below says its measured value. A formula mistake shows as 1e-4 or
// more. Planted into the CPU backend, each of these failed the test: `* 0.999f` in SwiGLU's
// backward (err 1.0e-3), fp8 weight blocks of 64 rows instead of 128 (3.2e-2), the router's
// bias subtracted instead of added (other experts selected).
#define _DEFAULT_SOURCE  // mincore (test_util.h defines it too, later)
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/check.h"
#include "core/rng.h"
#include "ops/bf16.h"
#include "ops/fp8.h"
#include "ops/ops.h"

#include "test_util.h"

// --- tolerances (max |x - ref| / max |ref|), measured worst of 60 runs beside each -----------
// Where the CPU op sums in the reference's order and rounds once, the measured error is 0; the
// tolerance 1e-6 there (a few fp32 roundings of the largest value) leaves room for a reordered
// sum while a formula mistake (1e-4 and up) still fails.
#define TOL_GEMM 1e-5         // fp32 GEMM and grouped, K <= 300: 9.9e-7
#define TOL_GEMM_BF16 5e-6    // bf16 GEMM and grouped, operands rounded alike: 5.5e-7
#define TOL_GEMM_FP8 1e-5     // fp8 GEMM, operands quantised alike: 9.3e-7
#define TOL_SAME_ORDER 1e-6   // axpy, add_2d, embedding and MoE scatter-adds, RMSNorm, router, balance loss: 0
#define TOL_SWIGLU 5e-6       // 4.5e-7 (the CPU's fp32 exp of 1 ulp against double)
#define TOL_ROPE 2e-6         // 1.5e-7
#define TOL_ATTENTION 5e-6    // forward 3.4e-7, backward 6.6e-7
#define TOL_XENT 5e-6         // loss, lse 1.2e-7; dlogits 6.0e-7 (per vocabulary tile row)
#define MAX_BF16_STEPS 1      // outputs the op rounds to bf16: 1

static uint64_t g_key, g_ctr;
static const nm_ops *ref, *be;  // the reference and the backend under test
static int n_checks;
static double worst;            // largest err / tol seen, for the summary
static char worst_name[128];

// --- buffers --------------------------------------------------------------------------------

// Every buffer an op sees comes from the backend under test's alloc (ops.h: "every buffer an op
// reads or writes comes from alloc"): host memory on the CPU backends, managed memory on the
// CUDA one, which the host (and the reference backend) reads and writes as well. Zero-filled.
// Host-only scratch of the comparisons stays nm_malloc.
static void *buf_alloc(size_t bytes) { return be->alloc(be, bytes); }
static void buf_free(void *p) { be->free(be, p); }

static float *randn(int64_t n, float scale) {
    float *x = buf_alloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = scale * nm_rng_normal(g_key, g_ctr++);
    return x;
}

static float *filled(int64_t n, float v) {
    float *x = buf_alloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = v;
    return x;
}

static float *nans(int64_t n) { return filled(n, NAN); }

static float *copyf(const float *src, int64_t n) {
    float *x = buf_alloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (n > 0) memcpy(x, src, (size_t)n * sizeof(float));
    return x;
}

static int32_t *ints(int64_t n) { return buf_alloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t)); }

static uint16_t *halves(int64_t n) { return buf_alloc((size_t)(n > 0 ? n : 1) * sizeof(uint16_t)); }

static int32_t rand_below(int64_t n) { return (int32_t)(nm_rng_u64(g_key, g_ctr++) % (uint64_t)n); }

// --- comparisons ----------------------------------------------------------------------------

static void note(const char *op, const char *what, double err, double tol) {
    n_checks++;
    char name[128];
    snprintf(name, sizeof name, "%s %s", op, what);
    double r = tol > 0 ? err / tol : (err > 0 ? INFINITY : 0);
    if (r > worst || !worst_name[0]) {
        worst = r;
        snprintf(worst_name, sizeof worst_name, "%s", name);
    }
    printf("  %-44s err %.2e (tol %.0e)%s\n", name, err, tol, err <= tol ? "" : "  FAIL");
}

// max |x - r| / max |r| over (n) elements; infinite when either side holds a NaN (an unwritten
// "(=)" element, or a wrong one).
static double rel_err(const float *x, const float *r, int64_t n) {
    double e = 0.0, m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i] || r[i] != r[i]) return INFINITY;
        e = fmax(e, fabs((double)x[i] - r[i]));
        m = fmax(m, fabs((double)r[i]));
    }
    return m > 0 ? e / m : e;
}

// x against the reference r, both (n): rel_err within tol.
static void check_f32(const char *op, const char *what, const float *x, const float *r, int64_t n, double tol) {
    double err = rel_err(x, r, n);
    note(op, what, err, tol);
    EXPECT(err <= tol, "%s %s: err %.3e > tol %.0e", op, what, err, tol);
}

// The same for strided matrices (rows, cols) with leading dimension ld; the padding columns
// [cols, ld) must be equal bit for bit on both sides (an op must not touch them).
static void check_f32_2d(const char *op, const char *what, const float *x, const float *r, int64_t rows,
                         int64_t cols, int64_t ld, double tol) {
    const size_t bytes = (size_t)(rows * cols + 1) * sizeof(float);
    float *xp = nm_malloc(bytes), *rp = nm_malloc(bytes);
    int pad = 0;
    for (int64_t i = 0; i < rows; i++) {
        memcpy(xp + i * cols, x + i * ld, (size_t)cols * sizeof(float));
        memcpy(rp + i * cols, r + i * ld, (size_t)cols * sizeof(float));
        pad += memcmp(x + i * ld + cols, r + i * ld + cols, (size_t)(ld - cols) * sizeof(float)) != 0;
    }
    check_f32(op, what, xp, rp, rows * cols, tol);
    EXPECT(pad == 0, "%s %s: %d rows' padding differs", op, what, pad);
    nm_free(xp), nm_free(rp);
}

static void check_exact(const char *op, const char *what, const void *x, const void *r, size_t bytes) {
    int same = memcmp(x, r, bytes) == 0;
    note(op, what, same ? 0.0 : INFINITY, 0.0);
    EXPECT(same, "%s %s: differs (must be exact)", op, what);
}

// Position of a bf16 value on the number line in steps (sign-magnitude to ordered integers;
// both zeros are 0), so that neighbours differ by 1 across binades and across zero.
static int64_t bf16_ordinal(uint16_t h) { return (h & 0x8000) ? -(int64_t)(h & 0x7fff) : (int64_t)h; }

// Outputs the op rounds to bf16 (fp32 storage x, r; bf16 copies xb, rb or NULL): every element
// within MAX_BF16_STEPS bf16 steps of the reference, or within tol of the largest |r| (the fp32
// op's tolerance: a value formed by cancellation, like SwiGLU's 1 + a (1 - sigmoid(a)) near 0,
// carries an fp32 error of many bf16 steps of its own small size); and each side's bf16 copy
// its own storage's value exactly.
static void check_bf16_out(const char *op, const char *what, const float *x, const float *r, const uint16_t *xb,
                           const uint16_t *rb, int64_t n, double tol) {
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)r[i]));
    int64_t worst_steps = 0, copies = 0;
    for (int64_t i = 0; i < n; i++) {
        uint16_t hx = nm_f32_to_bf16(x[i]), hr = nm_f32_to_bf16(r[i]);
        int64_t steps = llabs(bf16_ordinal(hx) - bf16_ordinal(hr));
        if (fabs((double)x[i] - r[i]) <= tol * m) steps = 0;
        // NaN, or storage that is not a bf16 value (the op did not round it): no step count
        if (x[i] != x[i] || r[i] != r[i] || nm_bf16_to_f32(hx) != x[i]) steps = INT32_MAX;
        worst_steps = steps > worst_steps ? steps : worst_steps;
        if (xb && rb) copies += xb[i] != hx || rb[i] != hr;
    }
    n_checks++;
    char name[128];
    snprintf(name, sizeof name, "%s %s", op, what);
    printf("  %-44s %lld bf16 step(s) (tol %d)%s\n", name, (long long)worst_steps, MAX_BF16_STEPS,
           worst_steps <= MAX_BF16_STEPS && copies == 0 ? "" : "  FAIL");
    EXPECT(worst_steps <= MAX_BF16_STEPS, "%s %s: %lld bf16 steps from the reference", op, what,
           (long long)worst_steps);
    EXPECT(copies == 0, "%s %s: %lld bf16 copies differ from their fp32 storage", op, what, (long long)copies);
}

// --- dense linear algebra -------------------------------------------------------------------

// One GEMM on both backends with padded leading dimensions; C starts as NaN when beta == 0.
static void gemm_case(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    const int64_t ar = ta == NM_NO_TRANS ? M : K, ac = ta == NM_NO_TRANS ? K : M;
    const int64_t br = tb == NM_NO_TRANS ? K : N, bc = tb == NM_NO_TRANS ? N : K;
    const int64_t lda = ac + 3, ldb = bc + 1, ldc = N + 2;
    float *A = randn(ar * lda, 1.0f), *B = randn(br * ldb, 1.0f);
    float *C = beta == 0.0f ? nans(M * ldc) : randn(M * ldc, 1.0f), *Cr = copyf(C, M * ldc);
    be->gemm(be, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    ref->gemm(ref, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cr, ldc);
    char what[96];
    snprintf(what, sizeof what, "%c%c %lldx%lldx%lld a%g b%g", ta ? 'T' : 'N', tb ? 'T' : 'N', (long long)M,
             (long long)N, (long long)K, alpha, beta);
    check_f32_2d("gemm", what, C, Cr, M, N, ldc, TOL_GEMM);
    buf_free(A), buf_free(B), buf_free(C), buf_free(Cr);
}

static void test_gemm(void) {
    printf("gemm\n");
    // the model's three GEMMs of a weight (out 192, in 256) over 130 rows: forward NT, input
    // gradient NN, weight gradient TN accumulating; attention's scaled NT; degenerate shapes
    gemm_case(NM_NO_TRANS, NM_TRANS, 130, 192, 256, 1.0f, 0.0f);
    gemm_case(NM_NO_TRANS, NM_NO_TRANS, 130, 256, 192, 1.0f, 0.0f);
    gemm_case(NM_TRANS, NM_NO_TRANS, 192, 256, 130, 1.0f, 1.0f);
    gemm_case(NM_TRANS, NM_TRANS, 64, 48, 100, 1.0f, 0.0f);
    gemm_case(NM_NO_TRANS, NM_TRANS, 65, 65, 48, 0.14433756f, 1.0f);
    gemm_case(NM_NO_TRANS, NM_TRANS, 130, 512, 256, 1.0f, 0.5f);
    gemm_case(NM_NO_TRANS, NM_NO_TRANS, 7, 5, 0, 1.0f, 0.5f);
    gemm_case(NM_NO_TRANS, NM_NO_TRANS, 7, 5, 3, 0.0f, 0.0f);
    gemm_case(NM_NO_TRANS, NM_NO_TRANS, 0, 5, 3, 1.0f, 0.0f);
}

// Expert groups of uneven rows (one empty), as moe.c calls them: forward NT (beta 0) and weight
// gradient TN (beta 1). fp32, or bf16 with a_type / b_type.
static void grouped_case(int bf16, nm_transpose ta, nm_transpose tb, float beta, nm_dtype a_type, nm_dtype b_type) {
    enum { E = 16, F2 = 256, D = 256 };
    int64_t rows[E];
    for (int e = 0; e < E; e++) rows[e] = e == 3 ? 0 : 8 + rand_below(60);
    nm_gemm_group g[E], gr[E];
    float *a[E], *b[E], *c[E], *cr[E];
    for (int e = 0; e < E; e++) {
        // forward: C(rows, F2) = X(rows, D) W(F2, D)^T; weight gradient: C(F2, D) = dY(rows, F2)^T X(rows, D)
        const int fwd = ta == NM_NO_TRANS;
        int64_t M = fwd ? rows[e] : F2, N = fwd ? F2 : D, K = fwd ? D : rows[e];
        int64_t ar = ta == NM_NO_TRANS ? M : K, ac = ta == NM_NO_TRANS ? K : M;
        int64_t br = tb == NM_NO_TRANS ? K : N, bc = tb == NM_NO_TRANS ? N : K;
        a[e] = randn(ar * ac, 1.0f);
        b[e] = randn(br * bc, 0.1f);
        if (a_type != NM_F32) ref->round_bf16(ref, a[e], a[e], ar * ac);
        if (b_type != NM_F32) ref->round_bf16(ref, b[e], b[e], br * bc);
        if (b_type == NM_BF16) ref->cast_bf16(ref, (uint16_t *)b[e], b[e], br * bc);  // in place: packs the halves
        c[e] = beta == 0.0f ? nans(M * N) : randn(M * N, 1.0f);
        cr[e] = copyf(c[e], M * N);
        g[e] = (nm_gemm_group){M, N, K, a[e], b[e], c[e], ac, bc, N};
        gr[e] = g[e];
        gr[e].C = cr[e];
    }
    if (bf16) {
        be->gemm_bf16_grouped(be, ta, tb, 1.0f, beta, g, E, a_type, b_type);
        ref->gemm_bf16_grouped(ref, ta, tb, 1.0f, beta, gr, E, a_type, b_type);
    } else {
        be->gemm_grouped(be, ta, tb, 1.0f, beta, g, E);
        ref->gemm_grouped(ref, ta, tb, 1.0f, beta, gr, E);
    }
    double err = 0.0;  // the worst group's
    for (int e = 0; e < E; e++) {
        err = fmax(err, rel_err(c[e], cr[e], g[e].M * g[e].N));
        buf_free(a[e]), buf_free(b[e]), buf_free(c[e]), buf_free(cr[e]);
    }
    char what[64];
    snprintf(what, sizeof what, "%c%c %d experts, 0..67 rows", ta ? 'T' : 'N', tb ? 'T' : 'N', E);
    const char *op = bf16 ? "gemm_bf16_grouped" : "gemm_grouped";
    const double tol = bf16 ? TOL_GEMM_BF16 : TOL_GEMM;
    note(op, what, err, tol);
    EXPECT(err <= tol, "%s %s: worst group err %.3e > tol %.0e", op, what, err, tol);
}

static void test_gemm_grouped(void) {
    printf("gemm_grouped\n");
    grouped_case(0, NM_NO_TRANS, NM_TRANS, 0.0f, NM_F32, NM_F32);
    grouped_case(0, NM_TRANS, NM_NO_TRANS, 1.0f, NM_F32, NM_F32);
}

// A bf16 GEMM with operands of the given storage types (values generated in fp32, rounded for
// NM_F32_BF16, rounded and packed for NM_BF16; NM_F32 operands are rounded by the op).
static void gemm_bf16_case(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float beta,
                           nm_dtype a_type, nm_dtype b_type) {
    const int64_t ar = ta == NM_NO_TRANS ? M : K, ac = ta == NM_NO_TRANS ? K : M;
    const int64_t br = tb == NM_NO_TRANS ? K : N, bc = tb == NM_NO_TRANS ? N : K;
    const int64_t lda = ac + 2, ldb = bc + 4, ldc = N + 1;
    float *A = randn(ar * lda, 1.0f), *B = randn(br * ldb, 0.1f);
    if (a_type != NM_F32) ref->round_bf16(ref, A, A, ar * lda);
    if (b_type != NM_F32) ref->round_bf16(ref, B, B, br * ldb);
    if (a_type == NM_BF16) ref->cast_bf16(ref, (uint16_t *)A, A, ar * lda);
    if (b_type == NM_BF16) ref->cast_bf16(ref, (uint16_t *)B, B, br * ldb);
    float *C = beta == 0.0f ? nans(M * ldc) : randn(M * ldc, 1.0f), *Cr = copyf(C, M * ldc);
    be->gemm_bf16(be, ta, tb, M, N, K, 1.0f, A, a_type, lda, B, b_type, ldb, beta, C, ldc);
    ref->gemm_bf16(ref, ta, tb, M, N, K, 1.0f, A, a_type, lda, B, b_type, ldb, beta, Cr, ldc);
    static const char *const tn[] = {"f32", "bf16", "f32_bf16"};
    char what[96];
    snprintf(what, sizeof what, "%c%c %lldx%lldx%lld %s x %s b%g", ta ? 'T' : 'N', tb ? 'T' : 'N', (long long)M,
             (long long)N, (long long)K, tn[a_type], tn[b_type], beta);
    check_f32_2d("gemm_bf16", what, C, Cr, M, N, ldc, TOL_GEMM_BF16);
    buf_free(A), buf_free(B), buf_free(C), buf_free(Cr);
}

static void test_gemm_bf16(void) {
    printf("gemm_bf16\n");
    // the weight copy in either storage (the backend's gemm_bf16_weight_type), fp32 dense
    // activations rounded by the op, rounded activations (NM_F32_BF16) of the experts
    const nm_dtype weights[2] = {NM_F32_BF16, NM_BF16};
    for (int w = 0; w < 2; w++) {
        gemm_bf16_case(NM_NO_TRANS, NM_TRANS, 130, 192, 256, 0.0f, NM_F32, weights[w]);
        gemm_bf16_case(NM_NO_TRANS, NM_NO_TRANS, 130, 256, 192, 0.0f, NM_F32, weights[w]);
        gemm_bf16_case(NM_NO_TRANS, NM_TRANS, 130, 512, 256, 1.0f, NM_F32_BF16, weights[w]);
    }
    gemm_bf16_case(NM_TRANS, NM_NO_TRANS, 192, 256, 130, 1.0f, NM_F32, NM_F32);
    gemm_bf16_case(NM_TRANS, NM_NO_TRANS, 256, 128, 130, 1.0f, NM_F32_BF16, NM_F32_BF16);
    gemm_bf16_case(NM_NO_TRANS, NM_NO_TRANS, 7, 5, 0, 0.5f, NM_F32, NM_F32);
    printf("gemm_bf16_grouped\n");
    grouped_case(1, NM_NO_TRANS, NM_TRANS, 0.0f, NM_F32_BF16, NM_F32_BF16);
    grouped_case(1, NM_NO_TRANS, NM_TRANS, 0.0f, NM_F32_BF16, NM_BF16);
    grouped_case(1, NM_TRANS, NM_NO_TRANS, 1.0f, NM_F32_BF16, NM_F32_BF16);
    EXPECT(be->gemm_bf16_weight_type(be) == NM_BF16 || be->gemm_bf16_weight_type(be) == NM_F32_BF16,
           "gemm_bf16_weight_type %d", (int)be->gemm_bf16_weight_type(be));
}

// The casts share one rounding rule: bit for bit, NaN and infinities included.
static void test_casts(void) {
    printf("round_bf16 / cast_bf16 / round_cast_bf16 / widen_bf16\n");
    const int64_t n = 4099;
    float *x = randn(n, 3.0f);
    x[0] = NAN, x[1] = INFINITY, x[2] = -0.0f, x[3] = 3.4e38f, x[4] = 1.0f + 0x1p-8f;  // overflow, a tie
    float *y = nans(n), *yr = nans(n), *z = copyf(x, n), *zr = copyf(x, n);
    uint16_t *h = halves(n), *hr = halves(n), *k = halves(n), *kr = halves(n);
    be->round_bf16(be, y, x, n);
    ref->round_bf16(ref, yr, x, n);
    be->cast_bf16(be, h, x, n);
    ref->cast_bf16(ref, hr, x, n);
    be->round_cast_bf16(be, z, k, n);
    ref->round_cast_bf16(ref, zr, kr, n);
    check_exact("round_bf16", "", y, yr, (size_t)n * sizeof(float));
    check_exact("cast_bf16", "", h, hr, (size_t)n * sizeof(uint16_t));
    check_exact("round_cast_bf16", "x", z, zr, (size_t)n * sizeof(float));
    check_exact("round_cast_bf16", "bits", k, kr, (size_t)n * sizeof(uint16_t));
    // widen_bf16 of cast_bf16 is round_bf16, on both backends
    float *w = nans(n), *wr = nans(n);
    be->widen_bf16(be, w, h, n);
    ref->widen_bf16(ref, wr, hr, n);
    check_exact("widen_bf16", "of cast_bf16 vs round_bf16", w, yr, (size_t)n * sizeof(float));
    check_exact("widen_bf16", "ref", wr, yr, (size_t)n * sizeof(float));
    buf_free(w), buf_free(wr);
    buf_free(x), buf_free(y), buf_free(yr), buf_free(z), buf_free(zr), buf_free(h), buf_free(hr), buf_free(k), buf_free(kr);
}

// The fp8 GEMMs of linear.c: forward NT and input gradient NN on a weight, weight gradient TN on
// two activations; K not a multiple of the 128 tile, a weight of partial 128 x 128 blocks.
static void fp8_case(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, nm_fp8_operand kind,
                     float beta) {
    const int64_t ar = ta == NM_NO_TRANS ? M : K, ac = ta == NM_NO_TRANS ? K : M;
    const int64_t br = tb == NM_NO_TRANS ? K : N, bc = tb == NM_NO_TRANS ? N : K;
    const int64_t lda = ac + 1, ldb = bc + 3, ldc = N + 2;
    float *A = randn(ar * lda, 1.0f), *B = randn(br * ldb, 0.05f);
    // a few large values, so that tiles get different scales
    for (int i = 0; i < 8; i++) A[rand_below(ar * lda)] *= 30.0f, B[rand_below(br * ldb)] *= 30.0f;
    float *C = beta == 0.0f ? nans(M * ldc) : randn(M * ldc, 1.0f), *Cr = copyf(C, M * ldc);
    be->gemm_fp8(be, ta, tb, M, N, K, 1.0f, A, lda, B, ldb, kind, beta, C, ldc);
    ref->gemm_fp8(ref, ta, tb, M, N, K, 1.0f, A, lda, B, ldb, kind, beta, Cr, ldc);
    char what[96];
    snprintf(what, sizeof what, "%c%c %lldx%lldx%lld %s b%g", ta ? 'T' : 'N', tb ? 'T' : 'N', (long long)M,
             (long long)N, (long long)K, kind == NM_FP8_WEIGHT ? "weight" : "activation", beta);
    check_f32_2d("gemm_fp8", what, C, Cr, M, N, ldc, TOL_GEMM_FP8);
    buf_free(A), buf_free(B), buf_free(C), buf_free(Cr);
}

static void test_gemm_fp8(void) {
    printf("gemm_fp8\n");
    fp8_case(NM_NO_TRANS, NM_TRANS, 130, 200, 300, NM_FP8_WEIGHT, 0.0f);
    fp8_case(NM_NO_TRANS, NM_NO_TRANS, 130, 300, 200, NM_FP8_WEIGHT, 1.0f);
    fp8_case(NM_TRANS, NM_NO_TRANS, 200, 300, 130, NM_FP8_ACTIVATION, 1.0f);
    fp8_case(NM_TRANS, NM_TRANS, 64, 72, 260, NM_FP8_ACTIVATION, 0.0f);
}

// The fp8 rows of the expert all-to-all: codes, scales, the dequantised values and the in-place
// round, at DeepSeek-V3's width with a short last tile (7175 = 56 x 128 + 7) and at the small
// model's (64: one short tile), with a zero row (the 1e-4 floor), a NaN and values past 448 x s.
// Everything is exact: both backends apply fp8.h's one rounding rule, and the round trip must
// equal the GEMM's own activation quantisation (nm_fp8_quantize_tiles).
static void fp8_rows_case(int64_t rows, int64_t D) {
    const int64_t tiles = (D + 127) / 128;
    float *x = randn(rows * D, 3.0f);
    for (int64_t c = 0; c < D; c++) x[c] = 0.0f;                  // row 0: all zero
    if (rows > 2) x[2 * D + D / 2] = NAN, x[2 * D + 1] = 1e6f;     // row 2: a NaN, a huge value
    uint8_t *q = buf_alloc((size_t)(rows * D)), *qr = buf_alloc((size_t)(rows * D));
    float *sc = nans(rows * tiles), *scr = nans(rows * tiles);
    be->fp8_quantize_rows(be, q, sc, x, rows, D);
    ref->fp8_quantize_rows(ref, qr, scr, x, rows, D);
    char what[64];
    snprintf(what, sizeof what, "%lldx%lld", (long long)rows, (long long)D);
    check_exact("fp8_quantize_rows codes", what, q, qr, (size_t)(rows * D));
    check_exact("fp8_quantize_rows scales", what, sc, scr, (size_t)(rows * tiles) * sizeof(float));
    float *d = nans(rows * D), *dr = nans(rows * D);
    be->fp8_dequantize_rows(be, d, q, sc, rows, D);
    ref->fp8_dequantize_rows(ref, dr, qr, scr, rows, D);
    check_exact("fp8_dequantize_rows", what, d, dr, (size_t)(rows * D) * sizeof(float));
    float *r = copyf(x, rows * D), *rr = copyf(x, rows * D);
    be->fp8_round_rows(be, r, rows, D);
    ref->fp8_round_rows(ref, rr, rows, D);
    check_exact("fp8_round_rows", what, r, rr, (size_t)(rows * D) * sizeof(float));
    // the transport's values are the GEMM's: round trip == in-place round == quantize_tiles
    float *t = nans(rows * D), *ts = nans(rows * tiles);
    nm_fp8_quantize_tiles(t, D, ts, x, D, rows, D, NM_FP8_SCALE_FP32);
    // (a NaN tile is NaN both ways, its payload bits need not agree)
    int64_t differ = 0;
    for (int64_t i = 0; i < rows * D; i++) differ += (r[i] != d[i]) && !(r[i] != r[i] && d[i] != d[i]);
    note("fp8 round == dequantize(quantize)", what, differ ? INFINITY : 0.0, 0.0);
    EXPECT(differ == 0, "fp8 round trip: %lld values differ from the in-place round", (long long)differ);
    check_exact("fp8 round == nm_fp8_quantize_tiles", what, r, t, (size_t)(rows * D) * sizeof(float));
    check_exact("fp8 scales == nm_fp8_quantize_tiles", what, sc, ts, (size_t)(rows * tiles) * sizeof(float));
    buf_free(x), buf_free(q), buf_free(qr), buf_free(sc), buf_free(scr), buf_free(d), buf_free(dr), buf_free(r), buf_free(rr);
    buf_free(t), buf_free(ts);
}

static void test_fp8_rows(void) {
    printf("fp8_quantize_rows / fp8_dequantize_rows / fp8_round_rows\n");
    fp8_rows_case(5, 7175);
    fp8_rows_case(70, 64);
}

// --- elementwise / memory / embedding ---------------------------------------------------------

static void test_memory_ops(void) {
    printf("zero / axpy / copy_2d / add_2d\n");
    const int64_t n = 5000, rows = 33, cols = 70, ld = 75;
    float *x = randn(n, 1.0f), *y = randn(n, 1.0f), *yr = copyf(y, n);
    be->axpy(be, y, x, -0.37f, n);
    ref->axpy(ref, yr, x, -0.37f, n);
    check_f32("axpy", "", y, yr, n, TOL_SAME_ORDER);
    be->zero(be, y, n);
    ref->zero(ref, yr, n);
    check_exact("zero", "", y, yr, (size_t)n * sizeof(float));
    float *s = randn(rows * ld, 1.0f), *d = randn(rows * ld, 1.0f), *dr = copyf(d, rows * ld);
    be->copy_2d(be, d, ld, s, ld, rows, cols);
    ref->copy_2d(ref, dr, ld, s, ld, rows, cols);
    check_exact("copy_2d", "", d, dr, (size_t)(rows * ld) * sizeof(float));
    be->add_2d(be, d, ld, x, ld, rows, cols);
    ref->add_2d(ref, dr, ld, x, ld, rows, cols);
    check_f32_2d("add_2d", "", d, dr, rows, cols, ld, TOL_SAME_ORDER);
    buf_free(x), buf_free(y), buf_free(yr), buf_free(s), buf_free(d), buf_free(dr);
}

// discard: the bytes read as zero afterwards and nothing outside them changes; on the cpu
// backend the whole pages inside are no longer resident (mincore), which is what ZeRO-2's
// gradient buckets count on.
static void test_backend_discard(void) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), n = 8 * page + 333, lo = 100, hi = n - 250;
    unsigned char *d = be->alloc(be, n), *h = nm_malloc(n), *back = nm_malloc(n);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 13 + 5) | 1;
    be->copy_to_device(be, d, h, n);
    be->discard(be, d + lo, hi - lo);
    be->synchronize(be);
    be->copy_to_host(be, back, d, n);
    memset(h + lo, 0, hi - lo);
    check_exact("discard", "", back, h, n);
    if (strcmp(be->name, "cpu") == 0) {
        // Discard again after the read above faulted the pages back in, then ask the kernel.
        be->discard(be, d + lo, hi - lo);
        uintptr_t first = ((uintptr_t)d + lo + page - 1) / page * page, last = ((uintptr_t)d + hi) / page * page;
        size_t pages = (last - first) / page, resident = 0;
        unsigned char *vec = nm_malloc(pages ? pages : 1);
        EXPECT(mincore((void *)first, last - first, vec) == 0, "mincore failed");
        for (size_t i = 0; i < pages; i++) resident += vec[i] & 1;
        printf("  discard: %zu of %zu whole pages still resident (expected 0)\n", resident, pages);
        EXPECT(pages >= 6 && resident == 0, "discard left %zu of %zu whole pages resident", resident, pages);
        nm_free(vec);
    }
    be->free(be, d);
    nm_free(h), nm_free(back);
}

// The backend's memory: alloc zero-filled and 64-byte aligned, the copies both ways, memset,
// synchronize; the thread hooks answer.
static void test_backend_memory(void) {
    printf("alloc / copies / memset / threads\n");
    const size_t n = 1000;
    unsigned char *d = be->alloc(be, n), *h = nm_malloc(n), *back = nm_malloc(n);
    EXPECT(((uintptr_t)d & 63) == 0, "alloc is not 64-byte aligned");
    be->copy_to_host(be, back, d, n);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += back[i] != 0;
    EXPECT(nonzero == 0, "alloc left %zu of %zu bytes non-zero", nonzero, n);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 7 + 1);
    be->copy_to_device(be, d, h, n);
    be->memset(be, d + 10, 0xab, 20);
    be->synchronize(be);
    be->copy_to_host(be, back, d, n);
    for (size_t i = 10; i < 30; i++) h[i] = 0xab;
    check_exact("copy_to_device / memset / copy_to_host", "", back, h, n);
    be->free(be, d);
    be->free(be, NULL);
    EXPECT(be->threads(be) >= 1, "threads() = %d", be->threads(be));
    nm_free(h), nm_free(back);
    test_backend_discard();
}

// The optimizer's ops over chunks as train/optim.c makes them: pieces of rows, a gap between
// them (floats no chunk covers must stay untouched), sharded state offsets, rows with and
// without decay, moments in fp32 and bf16.
static void test_optimizer_ops(void) {
    printf("sumsq_chunks / scale_chunks / first_nonfinite / adamw_chunks / router_bias_update\n");
    const int64_t n = 70000;  // floats of params and grads
    const nm_optim_chunk chunks[] = {
        {.offset = 0, .state = 0, .len = 65536, .row = 0, .decay = 1},
        {.offset = 65536, .state = 65536, .len = 1000, .row = 0, .decay = 1},
        {.offset = 66600, .state = 66560, .len = 3, .row = 1, .decay = 0},
        {.offset = 66610, .state = 66576, .len = 3390, .row = 2, .decay = 1},
    };
    const int64_t nc = (int64_t)(sizeof chunks / sizeof chunks[0]), n_state = 66576 + 3390;
    float *g = randn(n, 1e-2f);
    double part[4], part_r[4];
    be->sumsq_chunks(be, part, g, chunks, nc);
    ref->sumsq_chunks(ref, part_r, g, chunks, nc);
    check_exact("sumsq_chunks", "(fixed lanes: exact)", part, part_r, sizeof part);
    float *gs = copyf(g, n), *gsr = copyf(g, n);
    be->scale_chunks(be, gs, 0.37f, chunks, nc);
    ref->scale_chunks(ref, gsr, 0.37f, chunks, nc);
    check_exact("scale_chunks", "(gap untouched)", gs, gsr, (size_t)n * sizeof(float));
    EXPECT(gs[66599] == g[66599], "scale_chunks wrote a float outside the chunks");
    gs[4321] = NAN;
    gs[9000] = INFINITY;
    EXPECT(be->first_nonfinite(be, gs, n) == 4321 && ref->first_nonfinite(ref, gs, n) == 4321 &&
               be->first_nonfinite(be, g, n) == -1,
           "first_nonfinite: %lld", (long long)be->first_nonfinite(be, gs, n));
    note("first_nonfinite", "", 0.0, 0.0);
    const nm_adamw_coefs k = {.grad_scale = 0.8f, .b1 = 0.9f, .one_minus_b1 = 0.1f, .b2 = 0.95f,
                              .one_minus_b2 = 0.05f, .neg_step_size = -3e-3f, .bc2_sqrt = 0.3f, .eps = 1e-8f,
                              .decay_mul = 0.9997f};
    for (int bf = 0; bf < 2; bf++) {
        const nm_dtype mt = bf ? NM_BF16 : NM_F32;
        const size_t msize = bf ? 2 : 4;
        float *p = randn(n, 1.0f), *pr = copyf(p, n);
        float *m0 = randn(n_state, 1e-2f), *v0 = randn(n_state, 1e-4f);
        for (int64_t i = 0; i < n_state; i++) v0[i] = fabsf(v0[i]);
        // m in the dtype under test, v in fp32 (the both-bf16 case follows)
        void *m = buf_alloc((size_t)n_state * msize), *v = copyf(v0, n_state);
        if (bf) ref->cast_bf16(ref, m, m0, n_state);
        else memcpy(m, m0, (size_t)n_state * 4);
        void *mr = buf_alloc((size_t)n_state * msize), *vr = copyf(v0, n_state);
        memcpy(mr, m, (size_t)n_state * msize);
        for (int step = 0; step < 2; step++) {
            be->adamw_chunks(be, p, m, mt, v, NM_F32, g, chunks, nc, &k);
            ref->adamw_chunks(ref, pr, mr, mt, vr, NM_F32, g, chunks, nc, &k);
        }
        // The contract fixes every float operation and its order (torch's): exact.
        const char *what = bf ? "m bf16, v fp32" : "m, v fp32";
        check_exact("adamw_chunks params", what, p, pr, (size_t)n * sizeof(float));
        check_exact("adamw_chunks m", what, m, mr, (size_t)n_state * msize);
        check_exact("adamw_chunks v", what, v, vr, (size_t)n_state * 4);
        buf_free(p), buf_free(pr), buf_free(m0), buf_free(v0), buf_free(m), buf_free(v), buf_free(mr), buf_free(vr);
    }
    {   // both moments bf16
        float *p = randn(n, 1.0f), *pr = copyf(p, n);
        uint16_t *m = halves(n_state), *v = halves(n_state), *mr = halves(n_state), *vr = halves(n_state);
        be->adamw_chunks(be, p, m, NM_BF16, v, NM_BF16, g, chunks, nc, &k);
        ref->adamw_chunks(ref, pr, mr, NM_BF16, vr, NM_BF16, g, chunks, nc, &k);
        check_exact("adamw_chunks params", "m, v bf16", p, pr, (size_t)n * sizeof(float));
        check_exact("adamw_chunks m", "bf16", m, mr, (size_t)n_state * 2);
        check_exact("adamw_chunks v", "bf16", v, vr, (size_t)n_state * 2);
        buf_free(p), buf_free(pr), buf_free(m), buf_free(v), buf_free(mr), buf_free(vr);
    }
    const int64_t E = 16;
    int64_t counts[16];
    for (int64_t e = 0; e < E; e++) counts[e] = e % 5 == 0 ? 100 : 30 + (e % 3) * 20;  // some at the mean
    float *b = randn(E, 1e-3f), *br = copyf(b, E);
    be->router_bias_update(be, b, counts, E, 1e-3f);
    ref->router_bias_update(ref, br, counts, E, 1e-3f);
    check_exact("router_bias_update", "", b, br, (size_t)E * sizeof(float));
    buf_free(g), buf_free(gs), buf_free(gsr), buf_free(b), buf_free(br);
}

static void test_embedding(void) {
    printf("embedding\n");
    const int64_t N = 130, D = 256, V = 512;
    int32_t *tok = ints(N);
    // repeated ids (into few rows), and ids another vocabulary-parallel rank holds (-1)
    for (int64_t n = 0; n < N; n++) tok[n] = n % 17 == 5 ? -1 : rand_below(n % 3 ? V : 8);
    float *emb = randn(V * D, 1.0f), *out = nans(N * D), *outr = nans(N * D);
    be->embedding_forward(be, out, tok, emb, N, D);
    ref->embedding_forward(ref, outr, tok, emb, N, D);
    check_exact("embedding_forward", "out", out, outr, (size_t)(N * D) * sizeof(float));
    float *dout = randn(N * D, 1.0f), *demb = randn(V * D, 1.0f), *dembr = copyf(demb, V * D);
    be->embedding_backward(be, demb, dout, tok, N, D);
    ref->embedding_backward(ref, dembr, dout, tok, N, D);
    check_f32("embedding_backward", "demb", demb, dembr, V * D, TOL_SAME_ORDER);
    buf_free(tok), buf_free(emb), buf_free(out), buf_free(outr), buf_free(dout), buf_free(demb), buf_free(dembr);
}

// --- rmsnorm / swiglu / rope --------------------------------------------------------------------

static void rmsnorm_case(int64_t N, int64_t D) {
    float *x = randn(N * D, 2.0f), *w = randn(D, 1.0f), *dy = randn(N * D, 1.0f);
    float *out = nans(N * D), *outr = nans(N * D), *rs = nans(N), *rsr = nans(N);
    be->rmsnorm_forward(be, out, rs, x, w, N, D, 1e-6f);
    ref->rmsnorm_forward(ref, outr, rsr, x, w, N, D, 1e-6f);
    char what[64];
    snprintf(what, sizeof what, "N=%lld D=%lld", (long long)N, (long long)D);
    check_f32("rmsnorm_forward out", what, out, outr, N * D, TOL_SAME_ORDER);
    check_f32("rmsnorm_forward rstd", what, rs, rsr, N, TOL_SAME_ORDER);
    float *dx = randn(N * D, 1.0f), *dxr = copyf(dx, N * D), *dw = randn(D, 1.0f), *dwr = copyf(dw, D);
    // both from the reference's rstd: the backward is compared, not the forward again
    be->rmsnorm_backward(be, dx, dw, dy, x, w, rsr, N, D);
    ref->rmsnorm_backward(ref, dxr, dwr, dy, x, w, rsr, N, D);
    check_f32("rmsnorm_backward dinp", what, dx, dxr, N * D, TOL_SAME_ORDER);
    check_f32("rmsnorm_backward dw", what, dw, dwr, D, TOL_SAME_ORDER);
    buf_free(x), buf_free(w), buf_free(dy), buf_free(out), buf_free(outr), buf_free(rs), buf_free(rsr);
    buf_free(dx), buf_free(dxr), buf_free(dw), buf_free(dwr);
}

static void test_rmsnorm(void) {
    printf("rmsnorm\n");
    rmsnorm_case(130, 256);
    rmsnorm_case(4, 7175);
}

static void swiglu_case(int64_t N, int64_t F) {
    char what[64];
    snprintf(what, sizeof what, "N=%lld F=%lld", (long long)N, (long long)F);
    float *gu = randn(N * 2 * F, 3.0f), *dy = randn(N * F, 1.0f);
    float *out = nans(N * F), *outr = nans(N * F), *dg = nans(N * 2 * F), *dgr = nans(N * 2 * F);
    be->swiglu_forward(be, out, gu, N, F);
    ref->swiglu_forward(ref, outr, gu, N, F);
    check_f32("swiglu_forward out", what, out, outr, N * F, TOL_SWIGLU);
    be->swiglu_backward(be, dg, dy, gu, N, F);
    ref->swiglu_backward(ref, dgr, dy, gu, N, F);
    check_f32("swiglu_backward dgate_up", what, dg, dgr, N * 2 * F, TOL_SWIGLU);
    uint16_t *h = halves(N * 2 * F), *hr = halves(N * 2 * F);
    be->swiglu_forward_bf16(be, out, h, gu, N, F);
    ref->swiglu_forward_bf16(ref, outr, hr, gu, N, F);
    check_bf16_out("swiglu_forward_bf16 out", what, out, outr, h, hr, N * F, TOL_SWIGLU);
    be->swiglu_backward_bf16(be, dg, h, dy, gu, N, F);
    ref->swiglu_backward_bf16(ref, dgr, hr, dy, gu, N, F);
    check_bf16_out("swiglu_backward_bf16 dgate_up", what, dg, dgr, h, hr, N * 2 * F, TOL_SWIGLU);
    be->swiglu_forward_bf16(be, out, NULL, gu, N, F);  // without the bf16 copy
    ref->swiglu_forward_bf16(ref, outr, NULL, gu, N, F);
    check_bf16_out("swiglu_forward_bf16 out", "no bits", out, outr, NULL, NULL, N * F, TOL_SWIGLU);
    buf_free(gu), buf_free(dy), buf_free(out), buf_free(outr), buf_free(dg), buf_free(dgr), buf_free(h), buf_free(hr);
}

static void test_swiglu(void) {
    printf("swiglu\n");
    swiglu_case(130, 640);  // the dense MLP
    swiglu_case(520, 128);  // the experts' rows (N K) at F = 128
}

static void rope_case(int64_t B, int64_t T, int64_t H, int64_t hd, int64_t off, int64_t Dr) {
    float *cs = buf_alloc((size_t)(T * Dr / 2) * sizeof(float)), *sn = buf_alloc((size_t)(T * Dr / 2) * sizeof(float));
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < Dr / 2; i++) {
            double ang = (double)t * pow(10000.0, -2.0 * (double)i / (double)Dr);
            cs[t * Dr / 2 + i] = (float)cos(ang);
            sn[t * Dr / 2 + i] = (float)sin(ang);
        }
    const int64_t n = B * T * H * hd;
    float *x = randn(n, 1.0f), *xr = copyf(x, n);
    be->rope_forward(be, x, cs, sn, B, T, H, hd, off, Dr);
    ref->rope_forward(ref, xr, cs, sn, B, T, H, hd, off, Dr);
    char what[64];
    snprintf(what, sizeof what, "H=%lld head_dim=%lld [%lld, %lld)", (long long)H, (long long)hd, (long long)off,
             (long long)(off + Dr));
    check_f32("rope_forward", what, x, xr, n, TOL_ROPE);
    be->rope_backward(be, x, cs, sn, B, T, H, hd, off, Dr);
    ref->rope_backward(ref, xr, cs, sn, B, T, H, hd, off, Dr);
    check_f32("rope_backward", what, x, xr, n, TOL_ROPE);
    buf_free(cs), buf_free(sn), buf_free(x), buf_free(xr);
}

static void test_rope(void) {
    printf("rope\n");
    rope_case(2, 65, 4, 48, 32, 16);  // q_pe of every head
    rope_case(2, 65, 1, 16, 0, 16);   // the shared k_pe
}

// --- attention ----------------------------------------------------------------------------------

static void attention_case(int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv) {
    const int64_t nq = B * T * H * (Dn + Dr), nkv = B * T * H * (Dn + Dv), nkp = B * T * Dr, no = B * T * H * Dv;
    const float scale = (float)(1.0 / sqrt((double)(Dn + Dr)));
    float *q = randn(nq, 1.0f), *kv = randn(nkv, 1.0f), *kp = randn(nkp, 1.0f), *dout = randn(no, 1.0f);
    float *o = nans(no), *outr = nans(no), *l = nans(B * H * T), *lr = nans(B * H * T);
    be->attention_forward(be, o, l, q, kv, kp, B, T, H, Dn, Dr, Dv, scale);
    ref->attention_forward(ref, outr, lr, q, kv, kp, B, T, H, Dn, Dr, Dv, scale);
    char what[64];
    snprintf(what, sizeof what, "B=%lld T=%lld H=%lld", (long long)B, (long long)T, (long long)H);
    check_f32("attention_forward out", what, o, outr, no, TOL_ATTENTION);
    check_f32("attention_forward lse", what, l, lr, B * H * T, TOL_ATTENTION);
    float *dq = nans(nq), *dqr = nans(nq), *dkv = nans(nkv), *dkvr = nans(nkv), *dkp = nans(nkp), *dkpr = nans(nkp);
    float *scratch = nans(B * H * T * Dr);
    // both from the reference's forward: the backward is compared, not the forward again
    be->attention_backward(be, dq, dkv, dkp, scratch, dout, q, kv, kp, outr, lr, B, T, H, Dn, Dr, Dv, scale);
    ref->attention_backward(ref, dqr, dkvr, dkpr, scratch, dout, q, kv, kp, outr, lr, B, T, H, Dn, Dr, Dv, scale);
    check_f32("attention_backward dq", what, dq, dqr, nq, TOL_ATTENTION);
    check_f32("attention_backward dkv", what, dkv, dkvr, nkv, TOL_ATTENTION);
    check_f32("attention_backward dk_pe", what, dkp, dkpr, nkp, TOL_ATTENTION);
    buf_free(q), buf_free(kv), buf_free(kp), buf_free(dout), buf_free(o), buf_free(outr), buf_free(l), buf_free(lr);
    buf_free(dq), buf_free(dqr), buf_free(dkv), buf_free(dkvr), buf_free(dkp), buf_free(dkpr), buf_free(scratch);
}

static void test_attention(void) {
    printf("attention\n");
    attention_case(2, 65, 4, 32, 16, 32);
    attention_case(1, 300, 2, 32, 16, 32);  // more than one of the CPU backend's 256-key chunks
}

// --- cross-entropy ------------------------------------------------------------------------------

static void xent_case(int64_t N, int64_t V, int64_t tile) {
    float *lg = randn(N * V, 3.0f);
    int32_t *tgt = ints(N);
    for (int64_t n = 0; n < N; n++) tgt[n] = n % 11 == 3 ? -1 : rand_below(V);
    const float scale = 1.0f / (float)N;
    char what[64];
    snprintf(what, sizeof what, "N=%lld V=%lld", (long long)N, (long long)V);
    float *loss = nans(N), *lossr = nans(N), *lse = nans(N), *lser = nans(N);
    float *dl = nans(N * V), *dlr = nans(N * V);
    be->xent_forward(be, loss, lse, lg, tgt, N, V);
    ref->xent_forward(ref, lossr, lser, lg, tgt, N, V);
    check_f32("xent_forward losses", what, loss, lossr, N, TOL_XENT);
    check_f32("xent_forward lse", what, lse, lser, N, TOL_XENT);
    be->xent_backward(be, dl, lg, lser, tgt, scale, N, V);
    ref->xent_backward(ref, dlr, lg, lser, tgt, scale, N, V);
    check_f32("xent_backward dlogits", what, dl, dlr, N * V, TOL_XENT);
    // in place, as the model runs it
    float *inpl = copyf(lg, N * V);
    be->xent_backward(be, inpl, inpl, lser, tgt, scale, N, V);
    check_f32("xent_backward dlogits", "in place", inpl, dlr, N * V, TOL_XENT);
    buf_free(inpl);
    if (tile > 0) {
        // vocabulary tiles of `tile` columns (the last one shorter), logits with a leading
        // dimension wider than the tile as the head's tile buffer
        double *st = buf_alloc((size_t)(3 * N) * sizeof(double)), *str = buf_alloc((size_t)(3 * N) * sizeof(double));
        float *tl = nans(N), *tlr = nans(N), *tz = nans(N), *tzr = nans(N);
        const int64_t ld = tile + 5;
        float *buf = buf_alloc((size_t)(N * ld) * sizeof(float)), *bufr = buf_alloc((size_t)(N * ld) * sizeof(float));
        for (int64_t v0 = 0; v0 < V; v0 += tile) {
            const int64_t vt = V - v0 < tile ? V - v0 : tile;
            for (int64_t n = 0; n < N; n++) memcpy(buf + n * ld, lg + n * V + v0, (size_t)vt * sizeof(float));
            be->xent_tile_forward(be, tl, tz, st, buf, ld, tgt, N, V, v0, vt);
            ref->xent_tile_forward(ref, tlr, tzr, str, buf, ld, tgt, N, V, v0, vt);
        }
        check_f32("xent_tile_forward losses", what, tl, tlr, N, TOL_XENT);
        check_f32("xent_tile_forward lse", what, tz, tzr, N, TOL_XENT);
        double err = 0.0;  // the worst tile's
        int pad = 0;
        for (int64_t v0 = 0; v0 < V; v0 += tile) {
            const int64_t vt = V - v0 < tile ? V - v0 : tile;
            for (int64_t i = 0; i < N * ld; i++) buf[i] = bufr[i] = -1.0f;  // the padding an op must not touch
            for (int64_t n = 0; n < N; n++) {
                memcpy(buf + n * ld, lg + n * V + v0, (size_t)vt * sizeof(float));
                memcpy(bufr + n * ld, lg + n * V + v0, (size_t)vt * sizeof(float));
            }
            be->xent_tile_backward(be, buf, ld, buf, ld, tzr, tgt, scale, N, V, v0, vt);  // in place, as the head runs it
            ref->xent_tile_backward(ref, bufr, ld, bufr, ld, tzr, tgt, scale, N, V, v0, vt);
            for (int64_t n = 0; n < N; n++) {
                err = fmax(err, rel_err(buf + n * ld, bufr + n * ld, vt));
                pad += memcmp(buf + n * ld + vt, bufr + n * ld + vt, (size_t)(ld - vt) * sizeof(float)) != 0;
            }
        }
        note("xent_tile_backward dlogits", what, err, TOL_XENT);
        EXPECT(err <= TOL_XENT && pad == 0, "xent_tile_backward %s: worst tile row err %.3e, %d rows' padding touched",
               what, err, pad);
        buf_free(st), buf_free(str), buf_free(tl), buf_free(tlr), buf_free(tz), buf_free(tzr), buf_free(buf), buf_free(bufr);
    }
    buf_free(lg), buf_free(tgt), buf_free(loss), buf_free(lossr), buf_free(lse), buf_free(lser), buf_free(dl), buf_free(dlr);
}

// The vocabulary-parallel head's combine (xent_stats_*) over two shards of the vocabulary, as
// two tp ranks run it (their all-reduces done here by hand), equals the whole row's
// xent_forward; and sum, the loss total, equals the row sum in double.
static void xent_stats_case(int64_t N, int64_t V, int64_t tile) {
    char what[64];
    snprintf(what, sizeof what, "N=%lld V=%lld, 2 shards, tile %lld", (long long)N, (long long)V, (long long)tile);
    float *lg = randn(N * V, 3.0f), *loss = nans(N), *lse = nans(N);
    int32_t *tgt = ints(N), *lt = ints(N);
    for (int64_t n = 0; n < N; n++) tgt[n] = n % 7 == 3 ? -1 : rand_below(V);  // some rows without a target
    ref->xent_forward(ref, loss, lse, lg, tgt, N, V);
    const int64_t ld = tile + 3, half = V / 2;
    float *buf = buf_alloc((size_t)(N * ld) * sizeof(float)), *tl = nans(N), *tz = nans(N);
    double *st[2], *mx[2], *sm[2];
    for (int s = 0; s < 2; s++) {
        st[s] = buf_alloc((size_t)(3 * N) * sizeof(double));
        mx[s] = buf_alloc((size_t)N * sizeof(double));
        sm[s] = buf_alloc((size_t)(2 * N) * sizeof(double));
        const int64_t v_start = s ? half : 0, Vs = s ? V - half : half;
        for (int64_t n = 0; n < N; n++) {  // the head's local targets: Vs where the other shard holds it
            int64_t id = tgt[n] - v_start;
            lt[n] = tgt[n] < 0 ? -1 : id >= 0 && id < Vs ? (int32_t)id : (int32_t)Vs;
        }
        be->xent_stats_open(be, st[s], N);
        for (int64_t v0 = 0; v0 < Vs; v0 += tile) {
            const int64_t vt = Vs - v0 < tile ? Vs - v0 : tile;
            for (int64_t n = 0; n < N; n++) memcpy(buf + n * ld, lg + n * V + v_start + v0, (size_t)vt * sizeof(float));
            be->xent_tile_forward(be, tl, tz, st[s], buf, ld, lt, N, Vs + 1, v0, vt);  // Vs + 1: no tile is the last
        }
        be->xent_stats_max(be, mx[s], st[s], tgt, N);
    }
    for (int64_t n = 0; n < N; n++) mx[0][n] = mx[1][n] = fmax(mx[0][n], mx[1][n]);  // the all-reduce (max)
    for (int s = 0; s < 2; s++) be->xent_stats_sums(be, sm[s], st[s], mx[s], tgt, N);
    for (int64_t i = 0; i < 2 * N; i++) sm[0][i] += sm[1][i];  // the all-reduce (sum)
    float *l2 = nans(N), *z2 = nans(N);
    be->xent_stats_close(be, l2, z2, sm[0], mx[0], tgt, N);
    check_f32("xent_stats_* losses", what, l2, loss, N, TOL_XENT);
    check_f32("xent_stats_* lse", what, z2, lse, N, TOL_XENT);
    double total = be->sum(be, loss, N), want = 0.0;
    for (int64_t n = 0; n < N; n++) want += loss[n];
    note("sum", what, fabs(total - want) / fmax(fabs(want), 1e-300), 1e-15);  // the same order: 0
    EXPECT(total == want, "sum %s: %.17g, the double sum in index order is %.17g", what, total, want);
    for (int s = 0; s < 2; s++) buf_free(st[s]), buf_free(mx[s]), buf_free(sm[s]);
    buf_free(lg), buf_free(loss), buf_free(lse), buf_free(tgt), buf_free(lt), buf_free(buf), buf_free(tl), buf_free(tz);
    buf_free(l2), buf_free(z2);
}

static void test_xent(void) {
    printf("xent\n");
    xent_case(130, 512, 200);
    xent_case(4, 129280, 384);  // DeepSeek-V3's vocabulary; the head's tile at that width
    xent_stats_case(130, 512, 100);
}

// --- router / balance loss ----------------------------------------------------------------------

static void router_case(const char *name, int64_t N, int64_t E, int64_t K, int64_t G, int64_t Gk, nm_scoring sc,
                        nm_topk_method method, int norm, int bias, float rs) {
    nm_router_params p = {N, E, K, G, Gk, sc, method, norm, rs};
    float *lg = randn(N * E, 1.5f), *b = bias ? randn(E, 0.2f) : NULL, *dw = randn(N * K, 1.0f);
    int32_t *idx = ints(N * K), *idxr = ints(N * K);
    float *w = nans(N * K), *wr = nans(N * K), *s = nans(N * E), *sr = nans(N * E);
    be->router_forward(be, idx, w, s, lg, b, &p);
    ref->router_forward(ref, idxr, wr, sr, lg, b, &p);
    check_exact("router_forward topk_idx", name, idx, idxr, (size_t)(N * K) * sizeof(int32_t));
    check_f32("router_forward scores", name, s, sr, N * E, TOL_SAME_ORDER);
    check_f32("router_forward topk_weight", name, w, wr, N * K, TOL_SAME_ORDER);
    float *dl = nans(N * E), *dlr = nans(N * E);
    be->router_backward(be, dl, dw, sr, idxr, &p);
    ref->router_backward(ref, dlr, dw, sr, idxr, &p);
    check_f32("router_backward dlogits", name, dl, dlr, N * E, TOL_SAME_ORDER);
    buf_free(lg), buf_free(b), buf_free(dw), buf_free(idx), buf_free(idxr), buf_free(w), buf_free(wr), buf_free(s), buf_free(sr);
    buf_free(dl), buf_free(dlr);
}

static void balance_case(const char *name, int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring sc) {
    // scores as the router makes them (the reference's, so that both ops see the same)
    nm_router_params p = {B * T, E, K, 1, 1, sc, NM_TOPK_GREEDY, 0, 1.0f};
    float *lg = randn(B * T * E, 1.5f), *s = nans(B * T * E), *w = nans(B * T * K);
    int32_t *idx = ints(B * T * K);
    ref->router_forward(ref, idx, w, s, lg, NULL, &p);
    float *f = nans(B * E), *fr = nans(B * E);
    double loss = be->balance_loss_forward(be, f, s, B, T, E, K), lossr = ref->balance_loss_forward(ref, fr, s, B, T, E, K);
    check_f32("balance_loss_forward f", name, f, fr, B * E, TOL_SAME_ORDER);
    float l1 = (float)loss, l1r = (float)lossr;
    check_f32("balance_loss_forward loss", name, &l1, &l1r, 1, TOL_SAME_ORDER);
    float *dl = randn(B * T * E, 1e-3f), *dlr = copyf(dl, B * T * E);
    be->balance_loss_backward(be, dl, 0.37f, fr, s, B, T, E, K, sc);
    ref->balance_loss_backward(ref, dlr, 0.37f, fr, s, B, T, E, K, sc);
    check_f32("balance_loss_backward dlogits", name, dl, dlr, B * T * E, TOL_SAME_ORDER);
    buf_free(lg), buf_free(s), buf_free(w), buf_free(idx), buf_free(f), buf_free(fr), buf_free(dl), buf_free(dlr);
}

static void test_router(void) {
    printf("router / balance loss\n");
    // configs/tiny.json's routing, then the other scorings and methods
    router_case("sigmoid noaux_tc", 130, 16, 4, 4, 2, NM_SCORING_SIGMOID, NM_TOPK_NOAUX_TC, 1, 1, 2.5f);
    router_case("sigmoid group_limited", 130, 16, 4, 4, 2, NM_SCORING_SIGMOID, NM_TOPK_GROUP_LIMITED_GREEDY, 1, 0,
                1.0f);
    router_case("softmax greedy", 130, 16, 2, 1, 1, NM_SCORING_SOFTMAX, NM_TOPK_GREEDY, 0, 0, 1.0f);
    router_case("softmax noaux_tc 256 experts", 16, 256, 8, 8, 4, NM_SCORING_SOFTMAX, NM_TOPK_NOAUX_TC, 1, 1, 2.5f);
    balance_case("sigmoid", 2, 65, 16, 4, NM_SCORING_SIGMOID);
    balance_case("softmax", 2, 65, 16, 4, NM_SCORING_SOFTMAX);
}

// --- MoE dispatch ---------------------------------------------------------------------------------

static void test_moe(void) {
    printf("moe dispatch / combine\n");
    const int64_t N = 130, K = 4, E = 16, D = 256, R = N * K;
    int32_t *idx = ints(R);
    for (int64_t n = 0; n < N; n++)  // K distinct experts per token, expert 5 never chosen
        for (int64_t k = 0; k < K; k++) {
            int32_t e;
            int dup;
            do {
                e = rand_below(E);
                dup = e == 5;
                for (int64_t j = 0; j < k; j++) dup |= idx[n * K + j] == e;
            } while (dup);
            idx[n * K + k] = e;
        }
    int32_t *off = ints(E + 1), *offr = ints(E + 1), *perm = ints(R), *permr = ints(R);
    be->moe_permute(be, off, perm, idx, N, K, E);
    ref->moe_permute(ref, offr, permr, idx, N, K, E);
    check_exact("moe_permute", "offsets", off, offr, (size_t)(E + 1) * sizeof(int32_t));
    check_exact("moe_permute", "perm", perm, permr, (size_t)R * sizeof(int32_t));
    float *src = randn(N * D, 1.0f), *g = nans(R * D), *gr = nans(R * D);
    be->moe_gather(be, g, src, permr, N, K, D);
    ref->moe_gather(ref, gr, src, permr, N, K, D);
    check_exact("moe_gather", "", g, gr, (size_t)(R * D) * sizeof(float));
    uint16_t *h = halves(R * D), *hr = halves(R * D);
    be->moe_gather_bf16(be, g, h, src, permr, N, K, D);
    ref->moe_gather_bf16(ref, gr, hr, src, permr, N, K, D);
    check_exact("moe_gather_bf16", "dst", g, gr, (size_t)(R * D) * sizeof(float));
    check_exact("moe_gather_bf16", "bits", h, hr, (size_t)(R * D) * sizeof(uint16_t));
    float *eo = randn(R * D, 1.0f), *tw = randn(R, 1.0f), *y = randn(N * D, 1.0f), *yr = copyf(y, N * D);
    be->moe_combine_forward(be, y, eo, tw, permr, N, K, D);
    ref->moe_combine_forward(ref, yr, eo, tw, permr, N, K, D);
    check_f32("moe_combine_forward", "y", y, yr, N * D, TOL_SAME_ORDER);
    float *dy = randn(N * D, 1.0f), *de = nans(R * D), *der = nans(R * D), *dtw = nans(R), *dtwr = nans(R);
    be->moe_combine_backward(be, de, dtw, dy, eo, tw, permr, N, K, D);
    ref->moe_combine_backward(ref, der, dtwr, dy, eo, tw, permr, N, K, D);
    check_f32("moe_combine_backward", "dexpert_out", de, der, R * D, TOL_SAME_ORDER);
    check_f32("moe_combine_backward", "dtopk_weight", dtw, dtwr, R, TOL_SAME_ORDER);
    float *ds = randn(N * D, 1.0f), *dsr = copyf(ds, N * D);
    be->moe_scatter_add(be, ds, eo, permr, N, K, D);
    ref->moe_scatter_add(ref, dsr, eo, permr, N, K, D);
    check_f32("moe_scatter_add", "dsrc", ds, dsr, N * D, TOL_SAME_ORDER);
    buf_free(idx), buf_free(off), buf_free(offr), buf_free(perm), buf_free(permr), buf_free(src), buf_free(g), buf_free(gr);
    buf_free(h), buf_free(hr), buf_free(eo), buf_free(tw), buf_free(y), buf_free(yr), buf_free(dy), buf_free(de), buf_free(der);
    buf_free(dtw), buf_free(dtwr), buf_free(ds), buf_free(dsr);
}

// --- instances ----------------------------------------------------------------------------------

// Two instances of the backend under test share no state (ops.h): each grows its own scratch
// on its first bf16 and fp8 GEMMs, and one keeps working, with the same bits, after the other
// is destroyed (under ASan, a scratch the two shared would be read after its free).
static void test_instances(const char *name) {
    printf("two instances of %s\n", name);
    const nm_ops *x, *y, *under_test = be;
    nm_error err;
    EXPECT(nm_backend_create(&x, name, &err) == 0 && nm_backend_create(&y, name, &err) == 0, "%s", err.msg);
    EXPECT(x != y && (x->ctx != y->ctx || x->ctx == NULL), "backend %s: two instances share a context", name);
    EXPECT(strcmp(x->name, name) == 0, "instance of %s is named %s", name, x->name);
    if (x->setup) EXPECT(x->setup(x, &err) == 0 && y->setup(y, &err) == 0, "%s", err.msg);
    const int64_t M = 70, N = 96, K = 200;
    be = x;  // randn and nans allocate through be
    float *A = randn(M * K, 1.0f), *B = randn(K * N, 1.0f), *c16 = nans(M * N), *c8 = nans(M * N);
    be = y;
    float *d16 = nans(M * N), *d8 = nans(M * N);
    x->gemm_bf16(x, NM_NO_TRANS, NM_NO_TRANS, M, N, K, 1.0f, A, NM_F32, K, B, NM_F32, N, 0.0f, c16, N);
    x->gemm_fp8(x, NM_NO_TRANS, NM_NO_TRANS, M, N, K, 1.0f, A, K, B, N, NM_FP8_ACTIVATION, 0.0f, c8, N);
    float *A3 = y->alloc(y, (size_t)(M * K) * sizeof(float)), *B3 = y->alloc(y, (size_t)(K * N) * sizeof(float));
    y->copy_to_device(y, A3, A, (size_t)(M * K) * sizeof(float));
    y->copy_to_device(y, B3, B, (size_t)(K * N) * sizeof(float));
    float *c16h = malloc((size_t)(M * N) * sizeof(float)), *c8h = malloc((size_t)(M * N) * sizeof(float));
    x->copy_to_host(x, c16h, c16, (size_t)(M * N) * sizeof(float));
    x->copy_to_host(x, c8h, c8, (size_t)(M * N) * sizeof(float));
    x->free(x, A), x->free(x, B), x->free(x, c16), x->free(x, c8);
    nm_backend_destroy(x);
    y->gemm_bf16(y, NM_NO_TRANS, NM_NO_TRANS, M, N, K, 1.0f, A3, NM_F32, K, B3, NM_F32, N, 0.0f, d16, N);
    y->gemm_fp8(y, NM_NO_TRANS, NM_NO_TRANS, M, N, K, 1.0f, A3, K, B3, N, NM_FP8_ACTIVATION, 0.0f, d8, N);
    float *d16h = malloc((size_t)(M * N) * sizeof(float)), *d8h = malloc((size_t)(M * N) * sizeof(float));
    y->copy_to_host(y, d16h, d16, (size_t)(M * N) * sizeof(float));
    y->copy_to_host(y, d8h, d8, (size_t)(M * N) * sizeof(float));
    EXPECT(memcmp(c16h, d16h, (size_t)(M * N) * sizeof(float)) == 0, "backend %s: gemm_bf16 differs between instances",
           name);
    EXPECT(memcmp(c8h, d8h, (size_t)(M * N) * sizeof(float)) == 0, "backend %s: gemm_fp8 differs between instances",
           name);
    y->free(y, A3), y->free(y, B3), y->free(y, d16), y->free(y, d8);
    free(c16h), free(c8h), free(d16h), free(d8h);
    nm_backend_destroy(y);
    nm_backend_destroy(NULL);  // NULL-safe
    be = under_test;
}

// --- main ---------------------------------------------------------------------------------------

int main(void) {
    uint64_t seed = test_seed("test_backend_ops");
    nm_error err;
    if (nm_backend_create(&ref, "ref", &err) != 0) {
        fprintf(stderr, "test_backend_ops: %s\n", err.msg);
        return 1;
    }
    EXPECT(strcmp(ref->name, "ref") == 0, "the registry's \"ref\" is named %s", ref->name);
    int tested = 0, skipped = 0;
    for (int b = 0; nm_ops_backend_names[b]; b++) {
        const char *name = nm_ops_backend_names[b];
        if (strcmp(name, "ref") == 0) continue;
        EXPECT(nm_backend_create(&be, name, &err) == 0, "backend %s listed but not in the registry: %s", name, err.msg);
        if (!be) continue;
        if (be->setup && be->setup(be, &err) != 0) {
            const char *forced = getenv("NM_CPU_BF16_GEMM");
            nm_backend_destroy(be);
            if (forced && strstr(err.msg, "NM_CPU_BF16_GEMM")) {  // test_backend_ops_onednn without oneDNN's bf16
                nm_backend_destroy(ref);
                return test_skip_machine("%s", err.msg);
            }
            if (strcmp(name, "cuda") == 0) {
                // no GPU here: the CPU backends' part still runs and decides the result
                printf("SKIP(machine): %s\n", err.msg);
                skipped++;
                continue;
            }
            EXPECT(0, "backend %s: setup failed: %s", name, err.msg);
            continue;
        }
        printf("=== backend %s (%s) against ref\n", name, be->kernel_names(be));
        g_key = nm_rng_key(seed, NM_RNG_TEST, (uint64_t)b, 0);
        g_ctr = 0;
        test_gemm();
        test_gemm_grouped();
        test_gemm_bf16();
        test_casts();
        test_gemm_fp8();
        test_fp8_rows();
        test_memory_ops();
        test_backend_memory();
        test_optimizer_ops();
        test_embedding();
        test_rmsnorm();
        test_swiglu();
        test_rope();
        test_attention();
        test_xent();
        test_router();
        test_moe();
        test_instances(name);
        nm_backend_destroy(be);
        be = NULL;
        tested++;
    }
    be = ref;
    test_instances("ref");
    be = NULL;
    nm_backend_destroy(ref);
    EXPECT(tested > 0, "no backend besides ref to test");
#ifdef NM_HAVE_CUDA
    {
        // an instance is made without touching the device (setup probes it)
        const nm_ops *cuda = NULL;
        EXPECT(nm_backend_create(&cuda, "cuda", &err) == 0 && strcmp(cuda->name, "cuda") == 0,
               "a build with CUDA has the \"cuda\" backend in its registry");
        nm_backend_destroy(cuda);
    }
#else
    EXPECT(nm_ops_check_backend("cuda", "backend", &err) != 0 && strstr(err.msg, "no CUDA backend"),
           "a build without CUDA says why \"cuda\" is not a backend");
#endif
    EXPECT(nm_ops_check_backend("gpu", "backend", &err) != 0 && strstr(err.msg, "cpu, ref"),
           "an unknown backend name is refused, listing the known ones");
    printf("%d comparisons over %d backend(s)%s; closest to its tolerance: %s (%.2f of it)\n", n_checks, tested,
           skipped ? " (cuda skipped: no GPU)" : "", worst_name, worst);
    if (failures) {
        fprintf(stderr, "test_backend_ops: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_backend_ops: all passed\n");
    return 0;
}
