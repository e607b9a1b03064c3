// test_ops.c: unit tests of the CPU ops (src/ops/cpu, semantics in ops.h).
//
// 1. Finite differences for every op with a backward (style.md 51, ggml grad mode): a scalar
//    loss L = sum(out * r) with a fixed random cotangent r, accumulated in double, differentiated
//    by a 4-point central stencil (error O(h^4)) and compared with the op's backward on every
//    input and parameter. Routing is not differentiable at top-K boundaries: a coordinate
//    whose perturbation changes the selection is skipped (ggml grad_expect).
// 2. The "(=)" / "(+=)" contract of ops.h: overwritten outputs are pre-filled with NaN,
//    accumulated ones with random values that are subtracted afterwards.
// 3. Direct checks: gemm and gemm_grouped against a naive loop (4 transpose combinations, padded leading dims,
//    degenerate shapes, beta = 0 over NaN), attention against a naive double softmax(QK^T)V,
//    hand-built routing cases (-inf group masking, tie-breaks, greedy vs group-limited),
//    moe_permute stability, bit-identical results for 1 and 2 threads, RMSNorm and
//    cross-entropy at DeepSeek-V3 widths (D = 7168, V = 129280) against double.
//
// Tolerances. The forward runs in fp32: each output carries ~6e-8 relative rounding, so L
// carries ~1e-7 * sqrt(n_out) * |out| of noise, which the stencil divides by ~h. With h = 1e-2
// relative to inputs of scale 1 that is ~1e-5 of the gradient and the stencil's truncation
// error is ~h^4 = 1e-8, so a correct backward lands around 1e-5 in relative L2 error
// (measured worst: 2.4e-5), while formula mistakes give 1e-3 .. 1e0: FD_TOL = 5e-4.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/rng.h"
#include "ops/ops.h"

static uint64_t g_key;
static uint64_t g_ctr = 0;
static const nm_ops *ops;

#define FD_TOL 5e-4
#define FD_H 1e-2

#include "test_util.h"
#include "bf16_ref.h"
#include "test_backend.h"

// --- helpers --------------------------------------------------------------------------------

static float *randn(int64_t n, float scale) {
    float *x = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = scale * nm_rng_normal(g_key, g_ctr++);
    return x;
}

static float *nans(int64_t n) {
    float *x = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = NAN;
    return x;
}

static float *copyf(const float *src, int64_t n) {
    float *x = nm_malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    memcpy(x, src, (size_t)n * sizeof(float));
    return x;
}

static double dot_r(const float *out, const float *r, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)out[i] * r[i];
    return s;
}

// grad (=) after - before, for "(+=)" outputs pre-filled with `before`.
static void sub_base(float *grad, const float *after, const float *before, int64_t n) {
    for (int64_t i = 0; i < n; i++) grad[i] = after[i] - before[i];
}

static int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

// Loss of the op under test as a function of its (mutable) inputs; NaN means "this point is
// not comparable" (routing selection changed).
typedef double (*loss_fn)(void *ctx);

// Checks grad(n) against 4-point central differences of f with respect to x(n). Step h is
// relative to max(|x_i|, 1) so it scales with the input.
static void fd_check(const char *name, loss_fn f, void *ctx, float *x, int64_t n, const float *grad) {
    double num = 0.0, den = 0.0, max_abs = 0.0;
    int64_t skipped = 0;
    for (int64_t i = 0; i < n; i++) {
        float x0 = x[i];
        double h = FD_H * (fabs(x0) > 1.0 ? fabs(x0) : 1.0);
        double fv[4];
        const double offs[4] = {-2.0, -1.0, 1.0, 2.0};
        for (int s = 0; s < 4; s++) {
            x[i] = (float)(x0 + offs[s] * h);
            fv[s] = f(ctx);
        }
        x[i] = x0;
        if (isnan(fv[0]) || isnan(fv[1]) || isnan(fv[2]) || isnan(fv[3])) {
            skipped++;
            continue;
        }
        double fd = (fv[0] - 8.0 * fv[1] + 8.0 * fv[2] - fv[3]) / (12.0 * h);
        double d = fd - grad[i];
        num += d * d;
        den += fd * fd;
        max_abs = fabs(d) > max_abs ? fabs(d) : max_abs;
    }
    double rel = sqrt(num) / (sqrt(den) > 1e-30 ? sqrt(den) : 1e-30);
    printf("  fd %-34s n=%-4lld skipped=%-3lld |g|=%.3e rel_l2=%.2e max_abs=%.2e\n", name, (long long)n,
           (long long)skipped, sqrt(den), rel, max_abs);
    EXPECT(sqrt(den) > 1e-6, "%s: gradient is zero, the check cannot fail", name);
    EXPECT(skipped * 2 <= n, "%s: %lld of %lld coordinates skipped", name, (long long)skipped, (long long)n);
    EXPECT(rel <= FD_TOL, "%s: relative L2 error %.3e > %.1e", name, rel, FD_TOL);
    EXPECT(all_finite(grad, n), "%s: non-finite gradient", name);
}

// --- gemm -----------------------------------------------------------------------------------

// Entries of C (M,N; ldc) that differ from alpha op(A) op(B) + beta C0 computed in double
// beyond the fp32 bound, plus padding entries (columns N..ldc) that changed; *max_err gets
// the largest error.
static int gemm_bad(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *Bm, int64_t ldb, float beta, const float *C, const float *C0,
                    int64_t ldc, double *max_err) {
    int bad = 0;
    *max_err = 0.0;
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = 0; j < N; j++) {
            double s = 0.0, sabs = 0.0;
            for (int64_t k = 0; k < K; k++) {
                double a = ta == NM_NO_TRANS ? A[i * lda + k] : A[k * lda + i];
                double b = tb == NM_NO_TRANS ? Bm[k * ldb + j] : Bm[j * ldb + k];
                s += a * b;
                sabs += fabs(a * b);
            }
            double c0 = beta == 0.0f ? 0.0 : C0[i * ldc + j];
            double ref = alpha * s + beta * c0;
            double err = fabs(C[i * ldc + j] - ref);
            // fp32 GEMM: error bounded by ~K ulps of the sum of |terms| (1e-6 covers K <= 64
            // with blocked summation); plus the rounding of beta*C.
            double tol = 1e-6 * (fabs(alpha) * sabs * (double)(K > 8 ? K / 8 : 1) + fabs(beta * c0)) + 1e-30;
            if (!(err <= tol)) bad++;
            *max_err = err > *max_err ? err : *max_err;
        }
    }
    // the padding between rows of C must be untouched
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = N; j < ldc; j++)
            if (memcmp(&C[i * ldc + j], &C0[i * ldc + j], sizeof(float)) != 0) bad++;
    return bad;
}

static void test_gemm_case(nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                           float beta, int nan_c) {
    int64_t ar = ta == NM_NO_TRANS ? M : K, ac = ta == NM_NO_TRANS ? K : M;
    int64_t br = tb == NM_NO_TRANS ? K : N, bc = tb == NM_NO_TRANS ? N : K;
    int64_t lda = ac + 3, ldb = bc + 2, ldc = N + 5;   // padded: exercises the strides
    float *A = randn(ar * lda, 1.0f), *Bm = randn(br * ldb, 1.0f);
    float *C = nan_c ? nans(M * ldc) : randn(M * ldc, 1.0f);
    float *C0 = copyf(C, M * ldc);
    ops->gemm(ops, ta, tb, M, N, K, alpha, A, lda, Bm, ldb, beta, C, ldc);
    double max_err;
    int bad = gemm_bad(ta, tb, M, N, K, alpha, A, lda, Bm, ldb, beta, C, C0, ldc, &max_err);
    EXPECT(bad == 0, "gemm ta=%d tb=%d M=%lld N=%lld K=%lld beta=%g nan_c=%d: %d bad, max err %.3e", ta, tb,
           (long long)M, (long long)N, (long long)K, beta, nan_c, bad, max_err);
    nm_free(A), nm_free(Bm), nm_free(C), nm_free(C0);
}

static void test_gemm(void) {
    printf("gemm\n");
    for (int ta = 0; ta < 2; ta++) {
        for (int tb = 0; tb < 2; tb++) {
            test_gemm_case(ta, tb, 5, 7, 6, 1.0f, 0.0f, 1);
            test_gemm_case(ta, tb, 5, 7, 6, 0.5f, 0.75f, 0);
            test_gemm_case(ta, tb, 67, 45, 33, 1.25f, 0.0f, 1);
            test_gemm_case(ta, tb, 67, 45, 33, 1.0f, 1.0f, 0);
            test_gemm_case(ta, tb, 3, 4, 0, 1.0f, 0.5f, 0);   // K = 0: C = beta * C
            test_gemm_case(ta, tb, 3, 4, 0, 1.0f, 0.0f, 1);   // K = 0, beta = 0 over NaN
        }
    }
    // M = 0 and N = 0 touch nothing (NULL pointers are fine).
    ops->gemm(ops, NM_NO_TRANS, NM_NO_TRANS, 0, 4, 3, 1.0f, NULL, 3, NULL, 4, 0.0f, NULL, 4);
    ops->gemm(ops, NM_NO_TRANS, NM_NO_TRANS, 4, 0, 3, 1.0f, NULL, 3, NULL, 1, 0.0f, NULL, 1);
}

// gemm_grouped: experts-like groups of uneven work (an empty one, and the heaviest last, so the
// largest-first order has to move it), each group's C against the double reference; the
// padding of every C untouched. Forward shape (rows as M, beta 0 over NaN) and weight-gradient
// shape (rows as K, beta 1), every transpose pair.
static void test_gemm_grouped(void) {
    printf("gemm_grouped\n");
    enum { G = 7 };
    const int64_t rows[G] = {9, 0, 3, 17, 1, 5, 41};
    for (int shape = 0; shape < 2; shape++) {
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                nm_gemm_group g[G];
                float *A[G], *Bm[G], *C[G], *C0[G];
                float beta = shape == 0 ? 0.0f : 1.0f;
                for (int i = 0; i < G; i++) {
                    int64_t M = shape == 0 ? rows[i] : 12, N = 10, K = shape == 0 ? 24 : rows[i];
                    int64_t ar = ta == NM_NO_TRANS ? M : K, ac = ta == NM_NO_TRANS ? K : M;
                    int64_t br = tb == NM_NO_TRANS ? K : N, bc = tb == NM_NO_TRANS ? N : K;
                    int64_t lda = ac + 1, ldb = bc + 2, ldc = N + 3;
                    A[i] = randn(ar * lda + 1, 1.0f), Bm[i] = randn(br * ldb + 1, 1.0f);
                    C[i] = shape == 0 ? nans(M * ldc + 1) : randn(M * ldc + 1, 1.0f);
                    C0[i] = copyf(C[i], M * ldc + 1);
                    g[i] = (nm_gemm_group){.M = M, .N = N, .K = K, .A = A[i], .lda = lda, .B = Bm[i], .ldb = ldb,
                                           .C = C[i], .ldc = ldc};
                }
                ops->gemm_grouped(ops, ta, tb, 1.0f, beta, g, G);
                for (int i = 0; i < G; i++) {
                    double max_err;
                    int bad = gemm_bad(ta, tb, g[i].M, g[i].N, g[i].K, 1.0f, A[i], g[i].lda, Bm[i], g[i].ldb, beta, C[i],
                                       C0[i], g[i].ldc, &max_err);
                    EXPECT(bad == 0, "gemm_grouped shape %d ta=%d tb=%d group %d (M=%lld K=%lld): %d bad, max err %.3e",
                           shape, ta, tb, i, (long long)g[i].M, (long long)g[i].K, bad, max_err);
                    nm_free(A[i]), nm_free(Bm[i]), nm_free(C[i]), nm_free(C0[i]);
                }
            }
        }
    }
}

// --- elementwise / memory -------------------------------------------------------------------

static void test_memory_ops(void) {
    printf("zero / axpy / copy_2d / add_2d\n");
    float *x = randn(37, 1.0f), *y = randn(37, 1.0f), *y0 = copyf(y, 37);
    ops->axpy(ops, y, x, -0.5f, 37);
    int bad = 0;
    for (int i = 0; i < 37; i++) bad += y[i] != y0[i] + -0.5f * x[i];
    EXPECT(bad == 0, "axpy: %d wrong", bad);
    ops->zero(ops, y, 37);
    bad = 0;
    for (int i = 0; i < 37; i++) bad += y[i] != 0.0f;
    EXPECT(bad == 0, "zero: %d nonzero", bad);
    // 4 x 5 block between leading dims 9 (dst) and 7 (src)
    float *dst = randn(4 * 9, 1.0f), *dst0 = copyf(dst, 36), *src = randn(4 * 7, 1.0f);
    ops->copy_2d(ops, dst, 9, src, 7, 4, 5);
    bad = 0;
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 9; c++) bad += dst[r * 9 + c] != (c < 5 ? src[r * 7 + c] : dst0[r * 9 + c]);
    EXPECT(bad == 0, "copy_2d: %d wrong", bad);
    memcpy(dst0, dst, sizeof(float) * 36);
    ops->add_2d(ops, dst, 9, src, 7, 4, 5);
    bad = 0;
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 9; c++)
            bad += dst[r * 9 + c] != (c < 5 ? dst0[r * 9 + c] + src[r * 7 + c] : dst0[r * 9 + c]);
    EXPECT(bad == 0, "add_2d: %d wrong", bad);
    nm_free(x), nm_free(y), nm_free(y0), nm_free(dst), nm_free(dst0), nm_free(src);
}

// --- embedding --------------------------------------------------------------------------------

typedef struct {
    float *emb, *out, *r;
    const int32_t *tok;
    int64_t N, D;
} emb_ctx;

static double emb_loss(void *p) {
    emb_ctx *c = p;
    ops->embedding_forward(ops, c->out, c->tok, c->emb, c->N, c->D);
    return dot_r(c->out, c->r, c->N * c->D);
}

static void test_embedding(void) {
    printf("embedding\n");
    enum { V = 5, N = 9, D = 6 };
    const int32_t tok[N] = {3, 1, 3, 0, 4, 3, 1, 2, 0}; // repeated ids: the backward must add
    emb_ctx c = {randn(V * D, 1.0f), nans(N * D), randn(N * D, 1.0f), tok, N, D};
    float *base = randn(V * D, 1.0f), *demb = copyf(base, V * D), *g = nans(V * D);
    ops->embedding_backward(ops, demb, c.r, tok, N, D);
    sub_base(g, demb, base, V * D);
    fd_check("embedding d(emb)", emb_loss, &c, c.emb, V * D, g);
    nm_free(c.emb), nm_free(c.out), nm_free(c.r), nm_free(base), nm_free(demb), nm_free(g);
}

// --- rmsnorm ----------------------------------------------------------------------------------

typedef struct {
    float *x, *w, *out, *rstd, *r;
    int64_t N, D;
    float eps;
} rms_ctx;

static double rms_loss(void *p) {
    rms_ctx *c = p;
    ops->rmsnorm_forward(ops, c->out, c->rstd, c->x, c->w, c->N, c->D, c->eps);
    return dot_r(c->out, c->r, c->N * c->D);
}

static void test_rmsnorm(void) {
    printf("rmsnorm\n");
    enum { N = 5, D = 16 };
    rms_ctx c = {randn(N * D, 1.5f), randn(D, 1.0f), nans(N * D), nans(N), randn(N * D, 1.0f), N, D, 1e-5f};
    rms_loss(&c);
    // rstd against its definition
    double max_err = 0.0;
    for (int n = 0; n < N; n++) {
        double ss = 0.0;
        for (int d = 0; d < D; d++) ss += (double)c.x[n * D + d] * c.x[n * D + d];
        double ref = 1.0 / sqrt(ss / D + 1e-5);
        max_err = fmax(max_err, fabs(c.rstd[n] - ref) / ref);
    }
    printf("  rstd max rel err %.3e\n", max_err);
    EXPECT(max_err < 1e-6, "rstd rel err %.3e", max_err);
    float *bx = randn(N * D, 1.0f), *bw = randn(D, 1.0f);
    float *dx = copyf(bx, N * D), *dw = copyf(bw, D), *gx = nans(N * D), *gw = nans(D);
    ops->rmsnorm_backward(ops, dx, dw, c.r, c.x, c.w, c.rstd, N, D);
    sub_base(gx, dx, bx, N * D);
    sub_base(gw, dw, bw, D);
    fd_check("rmsnorm d(inp)", rms_loss, &c, c.x, N * D, gx);
    fd_check("rmsnorm d(w)", rms_loss, &c, c.w, D, gw);
    nm_free(c.x), nm_free(c.w), nm_free(c.out), nm_free(c.rstd), nm_free(c.r), nm_free(bx), nm_free(bw), nm_free(dx), nm_free(dw);
    nm_free(gx), nm_free(gw);
}

// --- swiglu -----------------------------------------------------------------------------------

typedef struct {
    float *gu, *out, *r;
    int64_t N, F;
} swi_ctx;

static double swi_loss(void *p) {
    swi_ctx *c = p;
    ops->swiglu_forward(ops, c->out, c->gu, c->N, c->F);
    return dot_r(c->out, c->r, c->N * c->F);
}

static void test_swiglu(void) {
    printf("swiglu\n");
    enum { N = 4, F = 9 };
    swi_ctx c = {randn(N * 2 * F, 2.0f), nans(N * F), randn(N * F, 1.0f), N, F};
    float *g = nans(N * 2 * F);
    ops->swiglu_backward(ops, g, c.r, c.gu, N, F);
    fd_check("swiglu d(gate_up)", swi_loss, &c, c.gu, N * 2 * F, g);
    // far tails stay finite (sigmoid(-100) must not produce NaN)
    float gu[2] = {-100.0f, 3.0f}, o, dgu[2], one = 1.0f;
    ops->swiglu_forward(ops, &o, gu, 1, 1);
    ops->swiglu_backward(ops, dgu, &one, gu, 1, 1);
    EXPECT(isfinite(o) && isfinite(dgu[0]) && isfinite(dgu[1]), "swiglu tail: %g %g %g", o, dgu[0], dgu[1]);
    nm_free(c.gu), nm_free(c.out), nm_free(c.r), nm_free(g);
}

// The bf16 variants: bit for bit the fp32 op's output rounded by the tests' own rounding, in
// the fp32 storage and (when asked) the bf16 copy; with NaN in and out. Exact, not a tolerance:
// rounding is deterministic, and the fp32 op is the one checked above.
static int64_t bf16_mismatches(const float *rounded, const uint16_t *h, const float *exact, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(exact[i])) {
            bad += !isnan(rounded[i]) || (h && !isnan(bf16_to_f32(h[i])));
            continue;
        }
        uint16_t want = ref_bf16(exact[i]);
        bad += bits(rounded[i]) != (uint32_t)want << 16 || (h && h[i] != want);
    }
    return bad;
}

static void test_swiglu_bf16(void) {
    printf("swiglu bf16\n");
    enum { N = 37, F = 67 };  // odd sizes: vector tails
    float *gu = randn(N * 2 * F, 3.0f), *dout = randn(N * F, 1.0f);
    gu[5] = NAN;
    float *out = nans(N * F), *ref = nans(N * F), *dgu = nans(N * 2 * F), *dref = nans(N * 2 * F);
    uint16_t *h = nm_malloc(N * 2 * F * sizeof(uint16_t));
    ops->swiglu_forward(ops, ref, gu, N, F);
    ops->swiglu_backward(ops, dref, dout, gu, N, F);
    for (int with_bits = 0; with_bits < 2; with_bits++) {
        uint16_t *hb = with_bits ? h : NULL;
        ops->swiglu_forward_bf16(ops, out, hb, gu, N, F);
        int64_t bad = bf16_mismatches(out, hb, ref, N * F);
        EXPECT(bad == 0, "swiglu_forward_bf16 (bits %d): %lld of %d differ from bf16(swiglu_forward)", with_bits,
               (long long)bad, N * F);
        ops->swiglu_backward_bf16(ops, dgu, hb, dout, gu, N, F);
        bad = bf16_mismatches(dgu, hb, dref, N * 2 * F);
        EXPECT(bad == 0, "swiglu_backward_bf16 (bits %d): %lld of %d differ from bf16(swiglu_backward)", with_bits,
               (long long)bad, N * 2 * F);
    }
    EXPECT(isnan(out[5]) && isnan(dgu[5]) && isnan(dgu[F + 5]), "swiglu bf16 NaN: %g %g %g", (double)out[5],
           (double)dgu[5], (double)dgu[F + 5]);
    nm_free(gu), nm_free(dout), nm_free(out), nm_free(ref), nm_free(dgu), nm_free(dref), nm_free(h);
}

// --- rope -------------------------------------------------------------------------------------

typedef struct {
    float *x, *y, *cos, *sin, *r;
    int64_t B, T, H, hd, off, Dr;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    int64_t n = c->B * c->T * c->H * c->hd;
    memcpy(c->y, c->x, (size_t)n * sizeof(float));
    ops->rope_forward(ops, c->y, c->cos, c->sin, c->B, c->T, c->H, c->hd, c->off, c->Dr);
    return dot_r(c->y, c->r, n);
}

static void test_rope(void) {
    printf("rope\n");
    enum { B = 2, T = 3, H = 2, HD = 7, OFF = 3, DR = 4 };
    int64_t n = B * T * H * HD;
    float cs[T * DR / 2], sn[T * DR / 2];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < DR / 2; i++) {
            double ang = t * pow(10000.0, -2.0 * i / DR) + 0.3; // +0.3: t = 0 also rotates
            cs[t * DR / 2 + i] = (float)cos(ang);
            sn[t * DR / 2 + i] = (float)sin(ang);
        }
    rope_ctx c = {randn(n, 1.0f), nans(n), cs, sn, randn(n, 1.0f), B, T, H, HD, OFF, DR};
    rope_loss(&c);
    // direct: adjacent pairs inside [OFF, OFF+DR), everything else untouched
    int bad = 0;
    for (int64_t row = 0; row < B * T * H; row++) {
        int64_t t = (row / H) % T;
        for (int d = 0; d < HD; d++) {
            float x = c.x[row * HD + d], y = c.y[row * HD + d];
            if (d < OFF || d >= OFF + DR) {
                bad += x != y;
                continue;
            }
            int i = (d - OFF) / 2;
            double co = cs[t * DR / 2 + i], si = sn[t * DR / 2 + i];
            double x0 = c.x[row * HD + OFF + 2 * i], x1 = c.x[row * HD + OFF + 2 * i + 1];
            double ref = (d - OFF) % 2 == 0 ? x0 * co - x1 * si : x0 * si + x1 * co;
            bad += fabs(y - ref) > 1e-6 * (fabs(x0) + fabs(x1));
        }
    }
    EXPECT(bad == 0, "rope forward: %d wrong", bad);
    float *g = copyf(c.r, n);
    ops->rope_backward(ops, g, cs, sn, B, T, H, HD, OFF, DR);
    fd_check("rope d(x)", rope_loss, &c, c.x, n, g);
    nm_free(c.x), nm_free(c.y), nm_free(c.r), nm_free(g);
}

// --- attention --------------------------------------------------------------------------------

typedef struct {
    float *q, *kv, *kpe, *out, *lse, *r;
    int64_t B, T, H, Dn, Dr, Dv;
    float scale;
} attn_ctx;

static double attn_loss(void *p) {
    attn_ctx *c = p;
    ops->attention_forward(ops, c->out, c->lse, c->q, c->kv, c->kpe, c->B, c->T, c->H, c->Dn, c->Dr, c->Dv, c->scale);
    return dot_r(c->out, c->r, c->B * c->T * c->H * c->Dv);
}

// Naive double reference: the full score row, max-subtracted softmax, weighted sum of v.
// mag(like out) (=) sum_j p_ij |v_j|: the size of the terms behind each output, which is what
// fp32 rounding errors scale with (an output near 0 made of large cancelling terms carries
// errors of the terms' size, not of its own).
static void attn_naive(double *out, double *mag, double *lse, double *lse_mag, const attn_ctx *c) {
    int64_t T = c->T, H = c->H, Dn = c->Dn, Dr = c->Dr, Dv = c->Dv, Dqk = Dn + Dr, Dkv = Dn + Dv;
    double *s = nm_malloc(sizeof(double) * (size_t)T);
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < T; i++) {
                const float *qi = c->q + ((b * T + i) * H + h) * Dqk;
                double m = -INFINITY, z = 0.0;
                for (int64_t j = 0; j <= i; j++) {
                    const float *k = c->kv + ((b * T + j) * H + h) * Dkv, *kp = c->kpe + (b * T + j) * Dr;
                    double d = 0.0;
                    for (int64_t e = 0; e < Dn; e++) d += (double)qi[e] * k[e];
                    for (int64_t e = 0; e < Dr; e++) d += (double)qi[Dn + e] * kp[e];
                    s[j] = c->scale * d;
                    m = fmax(m, s[j]);
                }
                for (int64_t j = 0; j <= i; j++) z += exp(s[j] - m);
                for (int64_t e = 0; e < Dv; e++) {
                    double o = 0.0, a = 0.0;
                    for (int64_t j = 0; j <= i; j++) {
                        double pv = exp(s[j] - m) / z * c->kv[((b * T + j) * H + h) * Dkv + Dn + e];
                        o += pv;
                        a += fabs(pv);
                    }
                    out[((b * T + i) * H + h) * Dv + e] = o;
                    mag[((b * T + i) * H + h) * Dv + e] = a;
                }
                lse[(b * H + h) * T + i] = m + log(z);
                // lse's error scale: the max score's ulps plus log z's absolute ulps.
                lse_mag[(b * H + h) * T + i] = fabs(m) + log(z) + 1.0;
            }
    nm_free(s);
}

static void test_attention(void) {
    printf("attention\n");
    enum { B = 2, T = 6, H = 2, DN = 3, DR = 2, DV = 4 };
    const int64_t nq = B * T * H * (DN + DR), nkv = B * T * H * (DN + DV), nkp = B * T * DR, no = B * T * H * DV;
    attn_ctx c = {randn(nq, 1.0f), randn(nkv, 1.0f), randn(nkp, 1.0f), nans(no), nans(B * H * T), randn(no, 1.0f),
                  B, T, H, DN, DR, DV, (float)(1.0 / sqrt(DN + DR))};
    attn_loss(&c);
    double *ro = nm_malloc(sizeof(double) * no), *rm = nm_malloc(sizeof(double) * no),
           *rl = nm_malloc(sizeof(double) * B * H * T), *rlm = nm_malloc(sizeof(double) * B * H * T);
    attn_naive(ro, rm, rl, rlm, &c);
    double eo = 0.0, el = 0.0;
    for (int64_t i = 0; i < no; i++) eo = fmax(eo, fabs(c.out[i] - ro[i]) / (rm[i] + 1e-30));
    for (int64_t i = 0; i < B * H * T; i++) el = fmax(el, fabs(c.lse[i] - rl[i]) / rlm[i]);
    printf("  naive double softmax(QK^T)V: max rel err out %.2e lse %.2e\n", eo, el);
    // fp32 sgemm scores, 1-ulp fp32 exp and fp32 sums over <= T = 6 keys: a few ulps of the
    // terms' size sum_j p_ij |v_j| on out, of |max score| + log z + 1 on lse (measured <= 3e-7
    // and <= 2e-7 over 40 seeds; the whole of test_ops passed 100 fresh seeds).
    EXPECT(eo < 2e-6 && el < 2e-6, "attention vs naive: out %.3e lse %.3e", eo, el);
    nm_free(ro), nm_free(rm), nm_free(rl), nm_free(rlm);

    float *dq = nans(nq), *dkv = nans(nkv), *dkp = nans(nkp), *scratch = nans(B * H * T * DR);
    ops->attention_backward(ops, dq, dkv, dkp, scratch, c.r, c.q, c.kv, c.kpe, c.out, c.lse, B, T, H, DN, DR, DV, c.scale);
    fd_check("attention d(q)", attn_loss, &c, c.q, nq, dq);
    fd_check("attention d(kv)", attn_loss, &c, c.kv, nkv, dkv);
    fd_check("attention d(k_pe)", attn_loss, &c, c.kpe, nkp, dkp);

    // bit-identical with 1 and 2 threads (no atomics, fixed reduction orders)
    float *dq1 = nans(nq), *dkv1 = nans(nkv), *dkp1 = nans(nkp), *o1 = nans(no);
    attn_loss(&c);
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    ops->attention_forward(ops, o1, scratch, c.q, c.kv, c.kpe, B, T, H, DN, DR, DV, c.scale);
    ops->attention_backward(ops, dq1, dkv1, dkp1, scratch, c.r, c.q, c.kv, c.kpe, c.out, c.lse, B, T, H, DN, DR, DV, c.scale);
    omp_set_num_threads(nt > 1 ? nt : 2);
    ops->attention_backward(ops, dq, dkv, dkp, scratch, c.r, c.q, c.kv, c.kpe, c.out, c.lse, B, T, H, DN, DR, DV, c.scale);
    omp_set_num_threads(nt);
    EXPECT(!memcmp(o1, c.out, sizeof(float) * no) && !memcmp(dq1, dq, sizeof(float) * nq) &&
               !memcmp(dkv1, dkv, sizeof(float) * nkv) && !memcmp(dkp1, dkp, sizeof(float) * nkp),
           "attention differs between 1 and %d threads", nt > 1 ? nt : 2);
    nm_free(c.q), nm_free(c.kv), nm_free(c.kpe), nm_free(c.out), nm_free(c.lse), nm_free(c.r);
    nm_free(dq), nm_free(dkv), nm_free(dkp), nm_free(scratch), nm_free(dq1), nm_free(dkv1), nm_free(dkp1), nm_free(o1);
}

// --- cross-entropy ----------------------------------------------------------------------------

typedef struct {
    float *logits, *losses, *lse;
    const int32_t *tgt;
    int64_t N, V;
    float scale;
} xent_ctx;

static double xent_loss(void *p) {
    xent_ctx *c = p;
    ops->xent_forward(ops, c->losses, c->lse, c->logits, c->tgt, c->N, c->V);
    double s = 0.0;
    for (int64_t n = 0; n < c->N; n++) s += c->losses[n];
    return c->scale * s;
}

static void test_xent(void) {
    printf("xent\n");
    enum { N = 6, V = 11 };
    const int32_t tgt[N] = {3, -1, 0, 10, 7, 3};
    xent_ctx c = {randn(N * V, 2.0f), nans(N), nans(N), tgt, N, V, 0.37f};
    xent_loss(&c);
    EXPECT(c.losses[1] == 0.0f, "ignored row loss %g", c.losses[1]);
    double max_err = 0.0, lse_err = 0.0;
    for (int n = 0; n < N; n++) {
        if (tgt[n] < 0) continue;
        double z = 0.0;
        for (int v = 0; v < V; v++) z += exp((double)c.logits[n * V + v]);
        double ref = log(z) - c.logits[n * V + tgt[n]];
        max_err = fmax(max_err, fabs(c.losses[n] - ref) / fabs(ref));
        lse_err = fmax(lse_err, fabs(c.lse[n] - log(z)) / fabs(log(z)));
    }
    printf("  V=%d: loss max rel err %.3e, lse max rel err %.3e\n", V, max_err, lse_err);
    EXPECT(max_err < 1e-6, "xent loss rel err %.3e", max_err);
    EXPECT(lse_err < 1e-6, "xent lse rel err %.3e", lse_err);
    float *g = nans(N * V);
    ops->xent_backward(ops, g, c.logits, c.lse, tgt, c.scale, N, V);
    int bad = 0;
    for (int v = 0; v < V; v++) bad += g[1 * V + v] != 0.0f;
    EXPECT(bad == 0, "ignored row has a gradient");
    fd_check("xent d(logits)", xent_loss, &c, c.logits, N * V, g);
    // in place gives the same bits (fd_check's last forward saw perturbed logits: redo lse);
    // huge logits stay finite (max subtraction)
    xent_loss(&c);
    float *inplace = copyf(c.logits, N * V);
    ops->xent_backward(ops, inplace, inplace, c.lse, tgt, c.scale, N, V);
    EXPECT(!memcmp(inplace, g, sizeof(float) * N * V), "in-place backward differs");
    for (int i = 0; i < V; i++) c.logits[i] = 1000.0f + (float)i;
    xent_loss(&c);
    // loss = 1010 + log(sum_k e^-k, k = 0..10) - 1003
    EXPECT(fabs(c.losses[0] - (7.0 + log((1 - exp(-11.0)) / (1 - exp(-1.0))))) < 1e-4,
           "large logits loss %g", c.losses[0]);
    nm_free(c.logits), nm_free(c.losses), nm_free(c.lse), nm_free(g), nm_free(inplace);
}

// --- router -----------------------------------------------------------------------------------

typedef struct {
    float *logits, *bias, *w, *s, *r;
    int32_t *idx, *idx_ref;
    nm_router_params p;
} router_ctx;

static double router_loss(void *vp) {
    router_ctx *c = vp;
    ops->router_forward(ops, c->idx, c->w, c->s, c->logits, c->bias, &c->p);
    if (memcmp(c->idx, c->idx_ref, sizeof(int32_t) * (size_t)(c->p.N * c->p.K))) return NAN;
    return dot_r(c->w, c->r, c->p.N * c->p.K);
}

static void test_router_fd(nm_scoring scoring, nm_topk_method method, int norm, const char *name) {
    nm_router_params p = {.N = 6, .E = 8, .K = 3, .G = 4, .Gk = 2, .scoring = scoring, .method = method,
                          .norm_topk_prob = norm, .routed_scaling = 2.5f};
    int64_t N = p.N, E = p.E, K = p.K;
    router_ctx c = {randn(N * E, 1.5f), randn(E, 0.3f), nans(N * K), nans(N * E), randn(N * K, 1.0f),
                    nm_malloc(sizeof(int32_t) * N * K), nm_malloc(sizeof(int32_t) * N * K), p};
    ops->router_forward(ops, c.idx_ref, c.w, c.s, c.logits, c.bias, &c.p);
    float *g = nans(N * E);
    ops->router_backward(ops, g, c.r, c.s, c.idx_ref, &c.p);
    fd_check(name, router_loss, &c, c.logits, N * E, g);
    nm_free(c.logits), nm_free(c.bias), nm_free(c.w), nm_free(c.s), nm_free(c.r), nm_free(c.idx), nm_free(c.idx_ref), nm_free(g);
}

static float logit(double prob) { return (float)log(prob / (1.0 - prob)); }

// Hand-built selections. Scores are chosen through logit() so sigmoid(logits) = prob.
static void test_router_selection(void) {
    printf("router selection\n");
    int32_t idx[8];
    float w[8], s[16];
    // (a) masked groups are -inf, never 0: E=8 in G=4 groups, keep 2. Groups 0,1 have the
    //     largest group scores but negative biased scores; with 0-fill an expert of a
    //     dropped group (c = 0 > c_kept) would win.
    {
        float lg[8], bias[8];
        const double pr[8] = {0.6, 0.5, 0.55, 0.4, 0.3, 0.2, 0.1, 0.2};
        for (int e = 0; e < 8; e++) lg[e] = logit(pr[e]), bias[e] = e < 4 ? -2.0f : -3.0f;
        nm_router_params p = {1, 8, 2, 4, 2, NM_SCORING_SIGMOID, NM_TOPK_NOAUX_TC, 1, 1.0f};
        ops->router_forward(ops, idx, w, s, lg, bias, &p);
        EXPECT(idx[0] == 0 && idx[1] == 2, "noaux_tc -inf masking: got %d %d, want 0 2", idx[0], idx[1]);
        // weights are the unbiased scores, normalised
        EXPECT(fabsf(w[0] - 0.6f / 1.15f) < 1e-6f && fabsf(w[1] - 0.55f / 1.15f) < 1e-6f, "weights %g %g", w[0], w[1]);
        p.method = NM_TOPK_GROUP_LIMITED_GREEDY;
        ops->router_forward(ops, idx, w, s, lg, bias, &p);
        EXPECT(idx[0] == 0 && idx[1] == 2, "group-limited -inf masking: got %d %d", idx[0], idx[1]);
    }
    // (b) ties: equal scores everywhere -> groups 0,1 kept, experts 0,1,2 in index order
    {
        float lg[8] = {0};
        nm_router_params p = {1, 8, 3, 4, 2, NM_SCORING_SIGMOID, NM_TOPK_NOAUX_TC, 0, 1.0f};
        ops->router_forward(ops, idx, w, s, lg, NULL, &p);
        EXPECT(idx[0] == 0 && idx[1] == 1 && idx[2] == 2, "ties: %d %d %d", idx[0], idx[1], idx[2]);
        EXPECT(w[0] == 0.5f && w[2] == 0.5f, "unnormalised weight %g", w[0]);
        // equal group scores but a tie inside the selection crossing groups: group 1 wins on
        // its top-2 sum, experts 2 and 3 are equal -> 2 first
        const double pr[8] = {0.9, 0.1, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1};
        for (int e = 0; e < 8; e++) lg[e] = logit(pr[e]);
        p.K = 2, p.Gk = 1;
        ops->router_forward(ops, idx, w, s, lg, NULL, &p);
        EXPECT(idx[0] == 2 && idx[1] == 3, "tie order: %d %d", idx[0], idx[1]);
    }
    // (c) the three methods differ: group 0 = {0.9, 0.1}, group 1 = {0.8, 0.7}, keep 1 group.
    {
        float lg[4];
        const double pr[4] = {0.9, 0.1, 0.8, 0.7};
        for (int e = 0; e < 4; e++) lg[e] = logit(pr[e]);
        nm_router_params p = {1, 4, 2, 2, 1, NM_SCORING_SIGMOID, NM_TOPK_NOAUX_TC, 1, 2.0f};
        ops->router_forward(ops, idx, w, s, lg, NULL, &p);
        EXPECT(idx[0] == 2 && idx[1] == 3, "noaux_tc (top-2 sum): %d %d", idx[0], idx[1]);
        EXPECT(fabsf(w[0] - 2.0f * 0.8f / 1.5f) < 1e-6f, "scaled weight %g", w[0]);
        p.method = NM_TOPK_GROUP_LIMITED_GREEDY;
        ops->router_forward(ops, idx, w, s, lg, NULL, &p);
        EXPECT(idx[0] == 0 && idx[1] == 1, "group_limited_greedy (max): %d %d", idx[0], idx[1]);
        p.method = NM_TOPK_GREEDY;
        ops->router_forward(ops, idx, w, s, lg, NULL, &p);
        EXPECT(idx[0] == 0 && idx[1] == 2, "greedy: %d %d", idx[0], idx[1]);
        // greedy ignores the bias (DeepSeek's MoEGate reads it for noaux_tc only)
        float bias[4] = {0.0f, 0.0f, 0.0f, 0.5f};
        ops->router_forward(ops, idx, w, s, lg, bias, &p);
        EXPECT(idx[0] == 0 && idx[1] == 2, "greedy ignores the bias: %d %d", idx[0], idx[1]);
        p.method = NM_TOPK_GROUP_LIMITED_GREEDY;
        ops->router_forward(ops, idx, w, s, lg, bias, &p);
        EXPECT(idx[0] == 0 && idx[1] == 1, "group_limited_greedy ignores the bias: %d %d", idx[0], idx[1]);
        // noaux_tc with every group kept: the bias moves the selection but not the weights
        p.method = NM_TOPK_NOAUX_TC;
        p.Gk = 2;
        ops->router_forward(ops, idx, w, s, lg, bias, &p);
        EXPECT(idx[0] == 3 && idx[1] == 0, "noaux_tc + bias: %d %d", idx[0], idx[1]);
        EXPECT(fabsf(w[0] - 2.0f * 0.7f / 1.6f) < 1e-6f, "biased weight %g", w[0]);
    }
    // (d) softmax scoring: scores sum to 1, weights are the softmax probabilities
    {
        float lg[4] = {1.0f, 3.0f, 2.0f, 0.0f};
        nm_router_params p = {1, 4, 2, 1, 1, NM_SCORING_SOFTMAX, NM_TOPK_GREEDY, 0, 1.0f};
        ops->router_forward(ops, idx, w, s, lg, NULL, &p);
        double z = exp(1.0) + exp(3.0) + exp(2.0) + 1.0;
        EXPECT(idx[0] == 1 && idx[1] == 2 && fabs(w[0] - exp(3.0) / z) < 1e-7, "softmax: %d %d %g", idx[0], idx[1], w[0]);
    }
}

// --- balance loss -----------------------------------------------------------------------------

typedef struct {
    float *logits, *s, *f, *f_ref, *w;
    int32_t *idx;
    nm_router_params p;
    int64_t B, T;
    float dloss;
} bal_ctx;

static double bal_loss(void *vp) {
    bal_ctx *c = vp;
    ops->router_forward(ops, c->idx, c->w, c->s, c->logits, NULL, &c->p);
    double l = ops->balance_loss_forward(ops, c->f, c->s, c->B, c->T, c->p.E, c->p.K);
    if (memcmp(c->f, c->f_ref, sizeof(float) * (size_t)(c->B * c->p.E))) return NAN;
    return c->dloss * l;
}

static void test_balance_loss(nm_scoring scoring, const char *name) {
    enum { B = 2, T = 5, E = 6, K = 2 };
    nm_router_params p = {B * T, E, K, 1, 1, scoring, NM_TOPK_GREEDY, 1, 1.0f};
    bal_ctx c = {randn(B * T * E, 1.5f), nans(B * T * E), nans(B * E), nans(B * E), nans(B * T * K),
                 nm_malloc(sizeof(int32_t) * B * T * K), p, B, T, 0.7f};
    ops->router_forward(ops, c.idx, c.w, c.s, c.logits, NULL, &c.p);
    double l = ops->balance_loss_forward(ops, c.f_ref, c.s, B, T, E, K);
    // direct: f and the loss from their definitions (plain top-K of s, ties lower index)
    double ref = 0.0;
    int bad = 0;
    for (int b = 0; b < B; b++) {
        double cnt[E] = {0}, P[E] = {0};
        for (int t = 0; t < T; t++) {
            const float *s = c.s + (b * T + t) * E;
            double S = 0.0;
            for (int e = 0; e < E; e++) S += s[e];
            for (int e = 0; e < E; e++) {
                int above = 0; // experts ranked ahead of e
                for (int j = 0; j < E; j++) above += s[j] > s[e] || (s[j] == s[e] && j < e);
                cnt[e] += above < K;
                P[e] += s[e] / S / T;
            }
        }
        for (int e = 0; e < E; e++) {
            double fe = (double)E / (K * T) * cnt[e];
            bad += fabs(c.f_ref[b * E + e] - fe) > 1e-6 * fe;
            ref += fe * P[e] / B;
        }
    }
    EXPECT(bad == 0 && fabs(l - ref) < 1e-6 * ref, "%s forward: f bad %d, loss %.9g ref %.9g", name, bad, l, ref);
    float *base = randn(B * T * E, 1.0f), *dl = copyf(base, B * T * E), *g = nans(B * T * E);
    ops->balance_loss_backward(ops, dl, c.dloss, c.f_ref, c.s, B, T, E, K, scoring);
    sub_base(g, dl, base, B * T * E);
    fd_check(name, bal_loss, &c, c.logits, B * T * E, g);
    nm_free(c.logits), nm_free(c.s), nm_free(c.f), nm_free(c.f_ref), nm_free(c.w), nm_free(c.idx), nm_free(base), nm_free(dl), nm_free(g);
}

// --- MoE dispatch -----------------------------------------------------------------------------

static void test_moe_permute(void) {
    printf("moe_permute\n");
    enum { N = 9, K = 3, E = 5 };
    int32_t idx[N * K], perm[N * K], off[E + 1], seen[N * K] = {0};
    for (int n = 0; n < N; n++)      // K distinct experts per token, expert 4 never used
        for (int k = 0; k < K; k++) idx[n * K + k] = (int32_t)((nm_rng_u64(g_key, g_ctr + n) + k) % 4);
    g_ctr += N;
    ops->moe_permute(ops, off, perm, idx, N, K, E);
    int bad = 0;
    EXPECT(off[0] == 0 && off[E] == N * K && off[4] == off[5], "offsets ends %d %d", off[0], off[E]);
    for (int e = 0; e < E; e++) {
        int cnt = 0;
        for (int a = 0; a < N * K; a++) cnt += idx[a] == e;
        bad += off[e + 1] - off[e] != cnt;
        for (int r = off[e]; r < off[e + 1]; r++) {
            bad += idx[perm[r]] != e;                          // row belongs to its expert
            bad += r > off[e] && perm[r] <= perm[r - 1];       // stable: flat order n*K+k
            seen[perm[r]]++;
        }
    }
    for (int a = 0; a < N * K; a++) bad += seen[a] != 1;      // a permutation
    EXPECT(bad == 0, "moe_permute: %d violations", bad);
}

typedef struct {
    float *src, *dst, *r, *eo, *tw, *y, *y0;
    const int32_t *perm;
    int64_t N, K, D;
} moe_ctx;

static double gather_loss(void *vp) {
    moe_ctx *c = vp;
    ops->moe_gather(ops, c->dst, c->src, c->perm, c->N, c->K, c->D);
    return dot_r(c->dst, c->r, c->N * c->K * c->D);
}

static double combine_loss(void *vp) {
    moe_ctx *c = vp;
    memcpy(c->y, c->y0, sizeof(float) * (size_t)(c->N * c->D));
    ops->moe_combine_forward(ops, c->y, c->eo, c->tw, c->perm, c->N, c->K, c->D);
    return dot_r(c->y, c->r, c->N * c->D);
}

static void test_moe_dispatch(void) {
    printf("moe gather / combine / scatter\n");
    enum { N = 5, K = 2, E = 3, D = 70 }; // D > 64: two column slabs
    int32_t idx[N * K], perm[N * K], off[E + 1];
    for (int n = 0; n < N; n++) idx[n * K] = n % E, idx[n * K + 1] = (n + 1 + n / 3) % E;
    ops->moe_permute(ops, off, perm, idx, N, K, E);
    moe_ctx c = {randn(N * D, 1.0f), nans(N * K * D), randn(N * K * D, 1.0f), randn(N * K * D, 1.0f),
                 randn(N * K, 1.0f), nans(N * D), randn(N * D, 1.0f), perm, N, K, D};
    // gather: dsrc (+=) scatter-add of the cotangent
    float *base = randn(N * D, 1.0f), *ds = copyf(base, N * D), *g = nans(N * D);
    ops->moe_scatter_add(ops, ds, c.r, perm, N, K, D);
    sub_base(g, ds, base, N * D);
    fd_check("moe_gather/scatter_add d(src)", gather_loss, &c, c.src, N * D, g);
    // combine: y (+=), dexpert_out (=), dtopk_weight (=)
    nm_free(c.r);
    c.r = randn(N * D, 1.0f);
    float *deo = nans(N * K * D), *dtw = nans(N * K);
    ops->moe_combine_backward(ops, deo, dtw, c.r, c.eo, c.tw, perm, N, K, D);
    fd_check("moe_combine d(expert_out)", combine_loss, &c, c.eo, N * K * D, deo);
    fd_check("moe_combine d(topk_weight)", combine_loss, &c, c.tw, N * K, dtw);
    // deterministic across thread counts
    float *y1 = copyf(c.y0, N * D);
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    ops->moe_combine_forward(ops, y1, c.eo, c.tw, perm, N, K, D);
    omp_set_num_threads(nt > 1 ? nt : 2);
    combine_loss(&c);
    omp_set_num_threads(nt);
    EXPECT(!memcmp(y1, c.y, sizeof(float) * N * D), "moe_combine differs between thread counts");
    // bf16 gather: bf16 of the fp32 gather bit for bit (the rounding is deterministic and the
    // fp32 gather is checked above), with and without the bf16 copy; a NaN stays NaN
    c.src[D + 3] = NAN;
    float *gref = nans(N * K * D), *gb = nans(N * K * D);
    uint16_t *gh = nm_malloc(N * K * D * sizeof(uint16_t));
    ops->moe_gather(ops, gref, c.src, perm, N, K, D);
    for (int with_bits = 0; with_bits < 2; with_bits++) {
        ops->moe_gather_bf16(ops, gb, with_bits ? gh : NULL, c.src, perm, N, K, D);
        int64_t bad = bf16_mismatches(gb, with_bits ? gh : NULL, gref, N * K * D);
        EXPECT(bad == 0, "moe_gather_bf16 (bits %d): %lld of %d differ from bf16(moe_gather)", with_bits,
               (long long)bad, N * K * D);
    }
    nm_free(gref), nm_free(gb), nm_free(gh);
    nm_free(c.src), nm_free(c.dst), nm_free(c.r), nm_free(c.eo), nm_free(c.tw), nm_free(c.y), nm_free(c.y0);
    nm_free(base), nm_free(ds), nm_free(g), nm_free(deo), nm_free(dtw), nm_free(y1);
}

// --- full-width rows -------------------------------------------------------------------------
// RMSNorm and cross-entropy sum their rows in 16 explicit lanes (blocks of 1024 for xent):
// check them at DeepSeek-V3's widths, with lane and block tails, against double, and check
// that the thread count does not change a bit. Run last so the other tests' random draws stay
// as they were.

// Vocabulary tiles: xent_tile_forward over uneven tiles (1000, 1000, 37) of V = 2037 gives
// xent_forward's losses and lse to fp32 rounding (the exp-sums are combined in double), and
// xent_tile_backward per tile gives xent_backward's dlogits bit for bit (the same formula per
// element); rows without a target and targets in every tile included.
static void test_xent_tiles(void) {
    printf("xent over vocabulary tiles\n");
    enum { N = 7, V = 2037 };
    const int32_t tgt[N] = {5, -1, 999, 1000, 2036, 1500, 0};
    const int64_t cuts[4] = {0, 1000, 2000, V};
    float *lg = randn(N * V, 3.0f), *loss = nans(N), *lse = nans(N), *loss_t = nans(N), *lse_t = nans(N);
    double *stats = nm_malloc(sizeof(double) * 3 * N);
    ops->xent_forward(ops, loss, lse, lg, tgt, N, V);
    float *tile = nans(N * 1000), *dl = nans(N * V), *dl_t = nans(N * V);
    for (int k = 0; k < 3; k++) {
        int64_t v0 = cuts[k], w = cuts[k + 1] - cuts[k];
        for (int n = 0; n < N; n++) memcpy(tile + n * w, lg + n * V + v0, sizeof(float) * (size_t)w);
        ops->xent_tile_forward(ops, loss_t, lse_t, stats, tile, w, tgt, N, V, v0, w);
    }
    double e = 0.0;
    for (int n = 0; n < N; n++) {
        if (tgt[n] < 0) {
            EXPECT(loss_t[n] == 0.0f, "tiled loss of a row without target %g", loss_t[n]);
            continue;
        }
        e = fmax(e, fmax(fabs(loss_t[n] - loss[n]) / fabs(loss[n]), fabs(lse_t[n] - lse[n]) / fabs(lse[n])));
    }
    printf("  3 tiles vs whole rows: loss/lse max rel diff %.2e\n", e);
    EXPECT(e < 4e-7, "tiled xent loss/lse rel diff %.3e", e);
    ops->xent_backward(ops, dl, lg, lse, tgt, 0.37f, N, V);
    for (int k = 0; k < 3; k++) {
        int64_t v0 = cuts[k], w = cuts[k + 1] - cuts[k];
        ops->xent_tile_backward(ops, dl_t + v0, V, lg + v0, V, lse, tgt, 0.37f, N, V, v0, w);
    }
    EXPECT(!memcmp(dl, dl_t, sizeof(float) * N * V), "tiled xent backward differs from the whole-row one");
    nm_free(lg), nm_free(loss), nm_free(lse), nm_free(loss_t), nm_free(lse_t), nm_free(stats);
    nm_free(tile), nm_free(dl), nm_free(dl_t);
}

static void test_wide_rows(void) {
    printf("full-width rows\n");
    // V3's width plus a lane tail: the 16-lane double sum keeps rstd at fp32 rounding
    enum { NV = 3, DV = 7175 };
    float *vx = randn(NV * DV, 1.5f), *vw = randn(DV, 1.0f), *vo = nans(NV * DV), *vr = nans(NV);
    ops->rmsnorm_forward(ops, vo, vr, vx, vw, NV, DV, 1e-5f);
    double rms_err = 0.0;
    for (int n = 0; n < NV; n++) {
        double ss = 0.0;
        for (int d = 0; d < DV; d++) ss += (double)vx[n * DV + d] * vx[n * DV + d];
        double ref = 1.0 / sqrt(ss / DV + 1e-5);
        rms_err = fmax(rms_err, fabs(vr[n] - ref) / ref);
    }
    printf("  rmsnorm D=%d: rstd max rel err %.3e\n", DV, rms_err);
    EXPECT(rms_err < 1e-6, "rstd rel err %.3e at D=%d", rms_err, DV);
    nm_free(vx), nm_free(vw), nm_free(vo), nm_free(vr);
    // bit-identical with 1 and 2 threads; at D = 600 the two counts cut dw into different
    // column slabs (512 + 88 vs 304 + 296), which must not matter
    enum { NT = 37, DT = 600 };
    float *tx = randn(NT * DT, 1.5f), *tw = randn(DT, 1.0f), *tdy = randn(NT * DT, 1.0f);
    float *to[2], *tr[2], *tdx[2], *tdw[2];
    int nt = omp_get_max_threads();
    for (int k = 0; k < 2; k++) {
        omp_set_num_threads(k == 0 ? 1 : nt > 1 ? nt : 2);
        to[k] = nans(NT * DT), tr[k] = nans(NT), tdx[k] = copyf(tdy, NT * DT), tdw[k] = copyf(tw, DT);
        ops->rmsnorm_forward(ops, to[k], tr[k], tx, tw, NT, DT, 1e-5f);
        ops->rmsnorm_backward(ops, tdx[k], tdw[k], tdy, tx, tw, tr[k], NT, DT);
    }
    omp_set_num_threads(nt);
    EXPECT(!memcmp(to[0], to[1], sizeof(float) * NT * DT) && !memcmp(tr[0], tr[1], sizeof(float) * NT) &&
               !memcmp(tdx[0], tdx[1], sizeof(float) * NT * DT) && !memcmp(tdw[0], tdw[1], sizeof(float) * DT),
           "rmsnorm differs between 1 and %d threads", nt > 1 ? nt : 2);
    for (int k = 0; k < 2; k++) nm_free(to[k]), nm_free(tr[k]), nm_free(tdx[k]), nm_free(tdw[k]);
    nm_free(tx), nm_free(tw), nm_free(tdy);
    // V3's vocabulary (129280 = 126 blocks of 1024 plus a partial one) against double
    enum { VV = 129280 };
    const int32_t vtgt[2] = {17, VV - 1};
    float *vl = randn(2 * VV, 2.0f), *vloss = nans(2), *vlse = nans(2);
    ops->xent_forward(ops, vloss, vlse, vl, vtgt, 2, VV);
    double loss_err = 0.0, lse_err = 0.0;
    for (int n = 0; n < 2; n++) {
        double z = 0.0;
        for (int v = 0; v < VV; v++) z += exp((double)vl[n * VV + v]);
        double ref = log(z) - vl[n * VV + vtgt[n]];
        loss_err = fmax(loss_err, fabs(vloss[n] - ref) / fabs(ref));
        lse_err = fmax(lse_err, fabs(vlse[n] - log(z)) / fabs(log(z)));
    }
    nm_free(vl), nm_free(vloss), nm_free(vlse);
    printf("  xent V=%d: loss max rel err %.3e, lse max rel err %.3e\n", VV, loss_err, lse_err);
    EXPECT(loss_err < 1e-6 && lse_err < 1e-6, "xent rel err at V=%d: loss %.3e lse %.3e", VV, loss_err,
           lse_err);
}

int main(void) {
    g_key = nm_rng_key(test_seed("test_ops"), NM_RNG_TEST, 0, 0);
    ops = test_backend("cpu");
    test_gemm();
    test_gemm_grouped();
    test_memory_ops();
    test_embedding();
    test_rmsnorm();
    test_swiglu();
    test_swiglu_bf16();
    test_rope();
    test_attention();
    test_xent();
    test_router_selection();
    printf("router / balance loss\n");
    test_router_fd(NM_SCORING_SIGMOID, NM_TOPK_NOAUX_TC, 1, "router sigmoid noaux_tc norm");
    test_router_fd(NM_SCORING_SIGMOID, NM_TOPK_GROUP_LIMITED_GREEDY, 0, "router sigmoid group_limited");
    test_router_fd(NM_SCORING_SOFTMAX, NM_TOPK_GREEDY, 0, "router softmax greedy");
    test_router_fd(NM_SCORING_SOFTMAX, NM_TOPK_NOAUX_TC, 1, "router softmax noaux_tc norm");
    test_balance_loss(NM_SCORING_SIGMOID, "balance loss sigmoid");
    test_balance_loss(NM_SCORING_SOFTMAX, "balance loss softmax");
    test_moe_permute();
    test_moe_dispatch();
    test_wide_rows();
    test_xent_tiles();
    if (failures) {
        fprintf(stderr, "test_ops: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_ops: all passed\n");
    return 0;
}
