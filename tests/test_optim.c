// test_optim.c: AdamW steps against hand-computed values, skipped rows, the gradient norm
// (value, excluded rows, thread-count invariance), clipping and non-finite detection, and the
// clip factor applied inside the update against clipping in memory, bit for bit.
//
// With `--dump FILE` it instead runs 5 clipped AdamW steps on random data and writes the
// inputs and results for tests/interop/test_optim_torch.py, which replays them with
// torch.optim.AdamW and torch.nn.utils.clip_grad_norm_.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "ops/bf16.h"
#include "train/optim.h"

#include "test_util.h"
#include "test_backend.h"

// Values below are exact in decimal; float keeps ~7 digits and each step does a handful
// of roundings, so 1e-6 absolute on O(1) parameters is a few ulps.
#define TOL 1e-6

// --- a small hand-made parameter table ---------------------------------------------------------

// rows: 0 "w" (3, DECAY) at 0, 1 "model.norm.weight" (2) at 64, 2 "bias" (2, ROUTER_BIAS) at
// 128, 3 "w_tied" (TIED to row 0, offset 0). Floats 3..63 and 66..127 are padding.
static nm_tensor_spec rows4[4];
static nm_param_table small_table(void) {
    memset(rows4, 0, sizeof(rows4));
    rows4[0] = (nm_tensor_spec){"w", 1, {3, 0}, 3, 0, NM_TENSOR_DECAY, -1, -1, 0, -1, {0, 0}, 0, 0};
    rows4[1] = (nm_tensor_spec){"model.norm.weight", 1, {2, 0}, 2, 64, NM_TENSOR_NORM, -1, -1, 0, -1, {0, 0}, 0, 0};
    rows4[2] = (nm_tensor_spec){"bias", 1, {2, 0}, 2, 128, NM_TENSOR_ROUTER_BIAS, 0, -1, 0, -1, {0, 0}, 0, 0};
    rows4[3] = (nm_tensor_spec){"w_tied", 1, {3, 0}, 3, 0, NM_TENSOR_TIED | NM_TENSOR_DECAY, -1, 0, 0, -1, {0, 0}, 0, 0};
    nm_param_table t;
    memset(&t, 0, sizeof(t));
    t.rows = rows4;
    t.n_rows = 4;
    t.n_floats = 192;
    return t;
}

static const nm_adamw_config default_cfg = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};

static void test_hand_steps(void) {
    nm_param_table t = small_table();
    nm_optimizer *opt;
    nm_error err;
    EXPECT(nm_optimizer_create(&opt, &t, &default_cfg, test_backend("cpu"), &err) == 0, "%s", err.msg);
    EXPECT(opt->n_params == 5, "n_params %lld (only w and the norm are optimised)", (long long)opt->n_params);

    float p[192], g[192];
    for (int i = 0; i < 192; i++) p[i] = 7.0f;  // padding and skipped rows must stay 7
    // w: decayed; norm: not decayed.
    p[0] = 1.0f; p[1] = -2.0f; p[2] = 0.5f;
    p[64] = 1.0f; p[65] = 1.0f;
    const float gs[3][5] = {
        {0.5f, -0.25f, 0.0f, 0.5f, 0.5f},
        {-0.5f, -0.25f, 0.0f, -0.5f, 0.5f},
        {1.0f, -0.25f, 0.0f, 1.0f, 0.5f},
    };
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < 192; i++) g[i] = 100.0f;  // garbage outside the optimised rows
        g[0] = gs[step][0]; g[1] = gs[step][1]; g[2] = gs[step][2];
        g[64] = gs[step][3]; g[65] = gs[step][4];
        nm_optimizer_step(opt, p, g, 0.1);
        EXPECT(opt->step == step + 1, "step count %lld", (long long)opt->step);
        if (step == 0) {
            // t = 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g).
            //   w[0] = 1 * (1 - 0.1*0.1) - 0.1 = 0.89;  w[1] = -2 * 0.99 + 0.1 = -1.88
            //   w[2]: g = 0 -> m = v = 0 -> update 0/eps = 0; only the decay: 0.5 * 0.99 = 0.495
            //   norm (no decay): 1 - 0.1 = 0.9 twice
            EXPECT(fabs(p[0] - 0.89) < TOL, "step 1 w[0] = %.9g, want 0.89", p[0]);
            EXPECT(fabs(p[1] - -1.88) < TOL, "step 1 w[1] = %.9g, want -1.88", p[1]);
            EXPECT(fabs(p[2] - 0.495) < TOL, "step 1 w[2] = %.9g, want 0.495", p[2]);
            EXPECT(fabs(p[64] - 0.9) < TOL, "step 1 norm[0] = %.9g, want 0.9", p[64]);
            EXPECT(fabs(p[65] - 0.9) < TOL, "step 1 norm[1] = %.9g, want 0.9", p[65]);
            EXPECT(fabs(opt->m[0] - 0.05) < 1e-9 && fabs(opt->v[0] - 0.0125) < 1e-9, "m %g v %g", opt->m[0],
                   opt->v[0]);
        }
    }
    // t = 3 with g = 0.5, -0.5, 1.0 (lr 0.1, b1 0.9, b2 0.95):
    //   m: 0.05, -0.005, 0.0955       v: 0.0125, 0.024375, 0.07315625
    //   t=2: m_hat = -0.005/0.19, v_hat = 0.024375/0.0975 = 0.25 -> update -0.1*0.0263157895/0.5
    //   t=3: m_hat = 0.0955/0.271 = 0.352398524, v_hat = 0.07315625/0.142625 = 0.512927257
    //        update 0.1 * 0.352398524 / 0.716189959 = 0.0492046544
    //   norm[0] (no decay): 1 - 0.1 + 0.0052631579 - 0.0492046544 = 0.856058503
    //   w[0] (decay 0.99 per step): ((0.99 - 0.1) * 0.99 + 0.0052631579) * 0.99 - 0.0492046544 = 0.828294874
    //   constant g (w[1], norm[1]): the update is lr * sign(g) every step:
    //   w[1] = ((-2*0.99 + 0.1)*0.99 + 0.1)*0.99 + 0.1 = -1.643588;  norm[1] = 1 - 0.3 = 0.7
    //   w[2] (g = 0 always): 0.5 * 0.99^3 = 0.48514950
    EXPECT(fabs(p[64] - 0.856058505) < TOL, "step 3 norm[0] = %.9g, want 0.856058505", p[64]);
    EXPECT(fabs(p[0] - 0.828294874) < TOL, "step 3 w[0] = %.9g, want 0.828294874", p[0]);
    EXPECT(fabs(p[1] - -1.643588) < TOL, "step 3 w[1] = %.9g, want -1.643588", p[1]);
    EXPECT(fabs(p[65] - 0.7) < TOL, "step 3 norm[1] = %.9g, want 0.7", p[65]);
    EXPECT(fabs(p[2] - 0.4851495) < TOL, "step 3 w[2] = %.9g, want 0.4851495", p[2]);
    // Router bias, padding: untouched. (The tied row shares w's storage: had it been updated
    // too, w would have moved twice and the values above would be off.)
    int untouched = 1;
    for (int i = 3; i < 64; i++) untouched &= p[i] == 7.0f;
    for (int i = 66; i < 192; i++) untouched &= p[i] == 7.0f;
    EXPECT(untouched, "padding or router bias changed (bias %g %g)", p[128], p[129]);
    EXPECT(opt->m[128] == 0.0f && opt->v[128] == 0.0f, "router bias got optimizer state");
    nm_optimizer_destroy(opt);
}

static void test_bad_config(void) {
    nm_param_table t = small_table();
    nm_optimizer *opt = NULL;
    nm_error err;
    nm_adamw_config c = default_cfg;
    c.beta2 = 1.0;
    EXPECT(nm_optimizer_create(&opt, &t, &c, test_backend("cpu"), &err) != 0 && strstr(err.msg, "beta2"), "beta2=1 accepted: %s", err.msg);
    EXPECT(opt == NULL, "optimizer returned on error");
    c = default_cfg;
    c.eps = 0.0;
    EXPECT(nm_optimizer_create(&opt, &t, &c, test_backend("cpu"), &err) != 0 && strstr(err.msg, "eps"), "eps=0 accepted");
}

// --- norm, clipping, non-finite ------------------------------------------------------------------

static void test_norm_clip_nonfinite(void) {
    nm_param_table t = small_table();
    nm_optimizer *opt;
    nm_error err;
    EXPECT(nm_optimizer_create(&opt, &t, &default_cfg, test_backend("cpu"), &err) == 0, "%s", err.msg);
    float g[192];
    for (int i = 0; i < 192; i++) g[i] = 1000.0f;  // padding, router bias: excluded
    g[0] = 3.0f; g[1] = 0.0f; g[2] = 0.0f;         // w
    g[64] = 0.0f; g[65] = 4.0f;                    // norm
    double norm = nm_optimizer_grad_norm(opt, g);
    EXPECT(norm == 5.0, "norm %.17g, want 5 (tied row counted once, bias and padding excluded)", norm);

    // Below the limit: untouched, scale 1.
    nm_grad_report rep;
    nm_optimizer_check_grads(opt, g, 10.0, &rep);
    EXPECT(rep.finite && rep.norm == 5.0 && rep.clip_scale == 1.0f, "check: no-clip case");
    // check_grads reports the factor but leaves the gradients alone.
    nm_optimizer_check_grads(opt, g, 1.0, &rep);
    EXPECT(rep.finite && rep.clip_scale == (float)(1.0 / (5.0 + 1e-6)) && g[0] == 3.0f && g[65] == 4.0f,
           "check: scale %.9g, grads %g %g", rep.clip_scale, g[0], g[65]);
    nm_optimizer_prepare_grads(opt, g, 10.0, &rep);
    EXPECT(rep.finite && rep.norm == 5.0 && rep.clip_scale == 1.0f && g[0] == 3.0f, "no-clip case");
    // max_norm 0: disabled.
    nm_optimizer_prepare_grads(opt, g, 0.0, &rep);
    EXPECT(rep.clip_scale == 1.0f && g[0] == 3.0f, "clipping with max_norm 0");
    // Above: scaled by 1/(5 + 1e-6); the new norm is 1 up to the 1e-6 guard.
    nm_optimizer_prepare_grads(opt, g, 1.0, &rep);
    EXPECT(fabsf(rep.clip_scale - (float)(1.0 / (5.0 + 1e-6))) == 0.0f, "scale %.9g", rep.clip_scale);
    EXPECT(fabs(g[0] - 0.6) < 1e-6 && fabs(g[65] - 0.8) < 1e-6, "clipped grads %g %g", g[0], g[65]);
    EXPECT(fabs(nm_optimizer_grad_norm(opt, g) - 1.0) < 1e-6, "norm after clip %g", nm_optimizer_grad_norm(opt, g));
    EXPECT(g[128] == 1000.0f && g[10] == 1000.0f, "clip touched excluded floats");

    // Non-finite: NaN in the second row is named; nothing is scaled.
    g[65] = NAN;
    g[0] = 3.0f;
    nm_optimizer_prepare_grads(opt, g, 1.0, &rep);
    EXPECT(!rep.finite && rep.bad_row == 1 && rep.bad_name && !strcmp(rep.bad_name, "model.norm.weight"),
           "NaN not reported: finite %d row %d", rep.finite, rep.bad_row);
    EXPECT(g[0] == 3.0f, "grads scaled despite NaN");
    nm_optimizer_check_grads(opt, g, 1.0, &rep);
    EXPECT(!rep.finite && rep.bad_row == 1 && rep.clip_scale == 1.0f, "check: NaN not reported");
    // Inf in the first row wins (table order).
    g[2] = -INFINITY;
    nm_optimizer_prepare_grads(opt, g, 1.0, &rep);
    EXPECT(!rep.finite && rep.bad_name && !strcmp(rep.bad_name, "w"), "Inf in w not named first");
    // NaN in the router bias is not a gradient we use: ignored.
    g[2] = 0.0f;
    g[65] = 4.0f;
    g[128] = NAN;
    nm_optimizer_prepare_grads(opt, g, 10.0, &rep);
    EXPECT(rep.finite && rep.bad_row == -1, "NaN in the router bias counted");
    nm_optimizer_destroy(opt);
}

// --- larger random buffer: reference in double, thread-count invariance ---------------------------

static void fill_random(float *x, size_t n, uint64_t key, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * nm_rng_normal(key, i);
}

static void test_random_and_threads(uint64_t seed) {
    // Two rows spanning several chunks each, one decayed, one not.
    const int64_t na = 3 * NM_OPTIM_CHUNK + 1234, nb = NM_OPTIM_CHUNK + 7;
    nm_tensor_spec rows[2] = {
        {"a", 1, {na, 0}, na, 0, NM_TENSOR_DECAY, 0, -1, 0, -1, {0, 0}, 0, 0},
        {"b", 1, {nb, 0}, nb, (size_t)((na + 63) / 64 * 64), 0, 0, -1, 0, -1, {0, 0}, 0, 0},
    };
    nm_param_table t;
    memset(&t, 0, sizeof(t));
    t.rows = rows;
    t.n_rows = 2;
    t.n_floats = rows[1].offset + (size_t)nb;
    size_t n = t.n_floats;
    float *p0 = nm_malloc(n * 4), *g = nm_malloc(n * 4);
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, 1, 0);
    fill_random(p0, n, key, 0.02f);
    fill_random(g, n, key + 1, 1e-3f);

    // Norm: our chunked double sum vs a plain sequential double sum (different order, so
    // equal to ~1e-15 relative, not bit for bit).
    double ref = 0.0;
    for (int r = 0; r < 2; r++)
        for (int64_t i = 0; i < rows[r].numel; i++) ref += (double)g[rows[r].offset + i] * g[rows[r].offset + i];
    ref = sqrt(ref);

    double norms[3];
    const int threads[3] = {1, 2, 3};
    float *outs[3], *ms[3];
    for (int k = 0; k < 3; k++) {
        omp_set_num_threads(threads[k]);
        nm_optimizer *opt;
        nm_error err;
        EXPECT(nm_optimizer_create(&opt, &t, &default_cfg, test_backend("cpu"), &err) == 0, "%s", err.msg);
        norms[k] = nm_optimizer_grad_norm(opt, g);
        outs[k] = nm_malloc(n * 4);
        memcpy(outs[k], p0, n * 4);
        for (int s = 1; s <= 3; s++) nm_optimizer_step(opt, outs[k], g, 1e-3 * s);
        ms[k] = nm_malloc(n * 4);
        memcpy(ms[k], opt->m, n * 4);
        nm_optimizer_destroy(opt);
    }
    EXPECT(fabs(norms[0] - ref) <= 1e-12 * ref, "norm %.17g vs reference %.17g", norms[0], ref);
    EXPECT(norms[0] == norms[1] && norms[1] == norms[2], "norm depends on thread count: %.17g %.17g %.17g", norms[0],
           norms[1], norms[2]);
    EXPECT(!memcmp(outs[0], outs[1], n * 4) && !memcmp(outs[0], outs[2], n * 4), "params depend on thread count");
    EXPECT(!memcmp(ms[0], ms[1], n * 4) && !memcmp(ms[0], ms[2], n * 4), "m depends on thread count");

    // Spot-check elements against the formula evaluated in double (three steps, same g).
    double maxerr = 0.0;
    for (size_t i = 0; i < n; i += 997) {
        int decay = i < (size_t)na;
        if (!decay && i < rows[1].offset) continue;  // padding
        double p = p0[i], m = 0, v = 0, gi = g[i];
        for (int s = 1; s <= 3; s++) {
            double lr = 1e-3 * s;
            if (decay) p *= 1.0 - lr * 0.1;
            m = 0.9 * m + 0.1 * gi;
            v = 0.95 * v + 0.05 * gi * gi;
            p -= lr * (m / (1 - pow(0.9, s))) / (sqrt(v / (1 - pow(0.95, s))) + 1e-8);
        }
        double e = fabs(p - outs[0][i]);
        if (e > maxerr) maxerr = e;
    }
    // |p| ~ 0.02..0.1 and the updates are ~lr: float rounding is ~1e-8 absolute.
    EXPECT(maxerr < 1e-7, "max |C - double reference| = %g", maxerr);
    for (int k = 0; k < 3; k++) {
        nm_free(ms[k]);
        nm_free(outs[k]);
    }
    nm_free(p0);
    nm_free(g);
}

// --- clip factor inside the update vs clipping in memory ------------------------------------------

// torch's update in fp32, one element at a time: the plain loop the optimizer's vectorised loop
// must reproduce bit for bit (same expressions, same order; the build does not contract to FMA).
static void ref_adamw(float *p, float *m, float *v, const float *g, size_t n, float dm, double lr, int64_t t) {
    const double bc1 = 1.0 - pow(default_cfg.beta1, (double)t), bc2 = 1.0 - pow(default_cfg.beta2, (double)t);
    const float b1 = (float)default_cfg.beta1, omb1 = (float)(1.0 - default_cfg.beta1);
    const float b2 = (float)default_cfg.beta2, omb2 = (float)(1.0 - default_cfg.beta2);
    const float nss = (float)(-(lr / bc1)), bc2s = (float)sqrt(bc2), eps = (float)default_cfg.eps;
    for (size_t i = 0; i < n; i++) {
        float pi = p[i] * dm;
        float mi = m[i] * b1 + g[i] * omb1;
        float vi = v[i] * b2 + omb2 * g[i] * g[i];
        p[i] = pi + nss * mi / (sqrtf(vi) / bc2s + eps);
        m[i] = mi;
        v[i] = vi;
    }
}

static void test_fused_clip(uint64_t seed) {
    // Odd lengths and offsets: every row has a vector body, a remainder and unaligned starts;
    // row c is shorter than one vector, so it is all remainder.
    const int64_t na = 2 * NM_OPTIM_CHUNK + 13, nb = 1001, nc = 3;
    nm_tensor_spec rows[3] = {
        {"a", 1, {na, 0}, na, 5, NM_TENSOR_DECAY, 0, -1, 0, -1, {0, 0}, 0, 0},
        {"b", 1, {nb, 0}, nb, (size_t)na + 100, 0, 0, -1, 0, -1, {0, 0}, 0, 0},
        {"c", 1, {nc, 0}, nc, (size_t)(na + nb) + 203, NM_TENSOR_DECAY, 0, -1, 0, -1, {0, 0}, 0, 0},
    };
    nm_param_table t;
    memset(&t, 0, sizeof(t));
    t.rows = rows;
    t.n_rows = 3;
    t.n_floats = rows[2].offset + (size_t)nc + 7;
    const size_t n = t.n_floats;
    float *p0 = nm_malloc(n * 4), *g = nm_malloc(n * 4), *gc = nm_malloc(n * 4);
    float *pa = nm_malloc(n * 4), *pb = nm_malloc(n * 4), *pr = nm_calloc(n, 4), *mr = nm_calloc(n, 4),
          *vr = nm_calloc(n, 4);
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, 3, 0);
    fill_random(p0, n, key, 0.02f);
    memcpy(pa, p0, n * 4);
    memcpy(pb, p0, n * 4);
    memcpy(pr, p0, n * 4);
    nm_optimizer *oa, *ob;
    nm_error err;
    EXPECT(nm_optimizer_create(&oa, &t, &default_cfg, test_backend("cpu"), &err) == 0, "%s", err.msg);
    EXPECT(nm_optimizer_create(&ob, &t, &default_cfg, test_backend("cpu"), &err) == 0, "%s", err.msg);
    const double lrs[3] = {1e-3, 3e-3, 2e-3};
    int clipped = 0;
    for (int s = 0; s < 3; s++) {
        // Large gradients on steps 0 and 2 (clipped), small on step 1 (not).
        fill_random(g, n, key + 1 + (uint64_t)s, s == 1 ? 1e-5f : 0.1f);
        memcpy(gc, g, n * 4);
        nm_grad_report ra, rb;
        nm_optimizer_prepare_grads(oa, gc, 1.0, &ra);  // old sequence: clip in memory, then step
        nm_optimizer_step(oa, pa, gc, lrs[s]);
        nm_optimizer_check_grads(ob, g, 1.0, &rb);     // trainer's: the factor goes into the step
        nm_optimizer_step_scaled(ob, pb, g, rb.clip_scale, lrs[s]);
        EXPECT(ra.finite && rb.finite && ra.norm == rb.norm && ra.clip_scale == rb.clip_scale,
               "step %d: reports differ", s);
        clipped += rb.clip_scale < 1.0f;
        for (int r = 0; r < 3; r++) {
            const size_t o = rows[r].offset;
            const float dm = r == 1 ? 1.0f : (float)(1.0 - lrs[s] * default_cfg.weight_decay);
            ref_adamw(pr + o, mr + o, vr + o, gc + o, (size_t)rows[r].numel, dm, lrs[s], s + 1);
        }
    }
    EXPECT(clipped == 2, "the test should clip two of its three steps (%d)", clipped);
    EXPECT(!memcmp(pa, pb, n * 4) && !memcmp(oa->m, ob->m, n * 4) && !memcmp(oa->v, ob->v, n * 4),
           "clip factor inside the update differs from clipping in memory");
    size_t first_bad = n;
    for (size_t i = 0; i < n && first_bad == n; i++) {
        if (memcmp(&pb[i], &pr[i], 4) || memcmp(&ob->m[i], &mr[i], 4) || memcmp(&ob->v[i], &vr[i], 4)) first_bad = i;
    }
    EXPECT(first_bad == n, "float %zu differs from the plain fp32 loop: p %.9g vs %.9g", first_bad,
           first_bad < n ? pb[first_bad] : 0.0f, first_bad < n ? pr[first_bad] : 0.0f);
    nm_optimizer_destroy(oa);
    nm_optimizer_destroy(ob);
    nm_free(p0);
    nm_free(g);
    nm_free(gc);
    nm_free(pa);
    nm_free(pb);
    nm_free(pr);
    nm_free(mr);
    nm_free(vr);
}

// --- bf16 moments ----------------------------------------------------------------------------------

// With m and v stored in bf16 (DeepSeek-V3's choice) the update is the fp32 one with the new m and
// v rounded to bf16 (nearest even) as they are stored: ref_adamw plus that rounding, bit for bit,
// over 3 steps of a row longer than two chunks; the moments read back through
// nm_optimizer_moment_f32 and set through nm_optimizer_moment_set unchanged; and the state is
// 4 bytes a float.
static void test_bf16_moments(uint64_t seed) {
    const int64_t na = 2 * NM_OPTIM_CHUNK + 77;
    nm_tensor_spec rows[1] = {{"a", 1, {na, 0}, na, 0, NM_TENSOR_DECAY, 0, -1, 0, -1, {0, 0}, 0, 0}};
    nm_param_table t;
    memset(&t, 0, sizeof(t));
    t.rows = rows;
    t.n_rows = 1;
    t.n_floats = (size_t)na;
    const size_t n = t.n_floats;
    float *p = nm_malloc(n * 4), *g = nm_malloc(n * 4), *pr = nm_malloc(n * 4), *mr = nm_calloc(n, 4),
          *vr = nm_calloc(n, 4);
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, 4, 0);
    fill_random(p, n, key, 0.02f);
    memcpy(pr, p, n * 4);
    nm_adamw_config cfg = default_cfg;
    cfg.exp_avg_bf16 = cfg.exp_avg_sq_bf16 = 1;
    nm_optimizer *o;
    nm_error err;
    EXPECT(nm_optimizer_create(&o, &t, &cfg, test_backend("cpu"), &err) == 0, "%s", err.msg);
    EXPECT(o->m == NULL && o->v == NULL && o->m16 && o->v16, "bf16 moments should have no fp32 storage");
    EXPECT(nm_optimizer_state_bytes_per_float(&cfg) == 4, "bf16 moments: %lld bytes a float",
           (long long)nm_optimizer_state_bytes_per_float(&cfg));
    const double lrs[3] = {1e-3, 3e-3, 2e-3};
    for (int s = 0; s < 3; s++) {
        fill_random(g, n, key + 1 + (uint64_t)s, 0.1f);
        nm_optimizer_step(o, p, g, lrs[s]);
        ref_adamw(pr, mr, vr, g, n, (float)(1.0 - lrs[s] * default_cfg.weight_decay), lrs[s], s + 1);
        for (size_t i = 0; i < n; i++) mr[i] = nm_bf16_round(mr[i]), vr[i] = nm_bf16_round(vr[i]);
    }
    int cm, cv;
    float *m = nm_optimizer_moment_f32(o, 0, &cm), *v = nm_optimizer_moment_f32(o, 1, &cv);
    EXPECT(cm && cv, "bf16 moments read back as copies");
    EXPECT(!memcmp(p, pr, n * 4), "bf16 moments: parameters differ from fp32 AdamW with m, v rounded each step");
    EXPECT(!memcmp(m, mr, n * 4) && !memcmp(v, vr, n * 4), "bf16 moments: m or v differ from the rounded reference");
    nm_optimizer_moment_set(o, 0, m);  // a checkpoint's round trip: exact for bf16 values
    nm_optimizer_moment_set(o, 1, v);
    float *m2 = nm_optimizer_moment_f32(o, 0, &cm), *v2 = nm_optimizer_moment_f32(o, 1, &cv);
    EXPECT(!memcmp(m2, mr, n * 4) && !memcmp(v2, vr, n * 4), "bf16 moments: set after read is not the identity");
    nm_free(m), nm_free(v), nm_free(m2), nm_free(v2);
    nm_optimizer_destroy(o);
    nm_free(p), nm_free(g), nm_free(pr), nm_free(mr), nm_free(vr);
}

// --- --dump: data for the PyTorch comparison ------------------------------------------------------

static int dump(const char *path, uint64_t seed) {
    const int64_t na = 1000, nb = 300, steps = 5;
    nm_tensor_spec rows[2] = {
        {"a", 2, {40, 25}, na, 0, NM_TENSOR_DECAY, 0, -1, 0, -1, {0, 0}, 0, 0},
        {"b", 1, {nb, 0}, nb, 1024, 0, 0, -1, 0, -1, {0, 0}, 0, 0},
    };
    nm_param_table t;
    memset(&t, 0, sizeof(t));
    t.rows = rows;
    t.n_rows = 2;
    t.n_floats = 1024 + (size_t)nb;
    const double lrs[5] = {1e-2, 3e-2, 2e-2, 1e-2, 5e-3};
    const double max_norm = 1.0;
    float *p = nm_calloc(t.n_floats, 4), *g = nm_calloc(t.n_floats, 4);
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, 2, 0);
    fill_random(p, t.n_floats, key, 0.5f);
    nm_optimizer *opt;
    nm_error err;
    if (nm_optimizer_create(&opt, &t, &default_cfg, test_backend("cpu"), &err)) return fprintf(stderr, "%s\n", err.msg), 1;

    FILE *fp = fopen(path, "wb");
    if (!fp) return perror(path), 1;
    // Layout (little-endian): "NMOPTDMP", i64 na, nb, steps, f64 beta1, beta2, eps, wd,
    // max_norm, f64 lr[steps], f32 p0[na+nb], then per step: f32 g[na+nb] (before clipping),
    // f64 norm; finally f32 p[na+nb], m[na+nb], v[na+nb].
    int64_t hdr[3] = {na, nb, steps};
    double hp[5] = {default_cfg.beta1, default_cfg.beta2, default_cfg.eps, default_cfg.weight_decay, max_norm};
    fwrite("NMOPTDMP", 1, 8, fp);
    fwrite(hdr, 8, 3, fp);
    fwrite(hp, 8, 5, fp);
    fwrite(lrs, 8, 5, fp);
    fwrite(p, 4, (size_t)na, fp);
    fwrite(p + 1024, 4, (size_t)nb, fp);
    for (int s = 0; s < steps; s++) {
        // Grad scales straddle max_norm: steps 0, 2, 4 are clipped, 1 and 3 are not.
        float scale = (s % 2 == 0) ? 0.2f : 0.005f;
        fill_random(g, t.n_floats, key + 10 + (uint64_t)s, scale);
        fwrite(g, 4, (size_t)na, fp);
        fwrite(g + 1024, 4, (size_t)nb, fp);
        // The trainer's sequence: the clip factor is applied inside the update.
        nm_grad_report rep;
        nm_optimizer_check_grads(opt, g, max_norm, &rep);
        fwrite(&rep.norm, 8, 1, fp);
        nm_optimizer_step_scaled(opt, p, g, rep.clip_scale, lrs[s]);
    }
    const float *outs[3] = {p, opt->m, opt->v};
    for (int k = 0; k < 3; k++) {
        fwrite(outs[k], 4, (size_t)na, fp);
        fwrite(outs[k] + 1024, 4, (size_t)nb, fp);
    }
    int bad = ferror(fp);
    fclose(fp);
    nm_optimizer_destroy(opt);
    nm_free(p);
    nm_free(g);
    return bad;
}

int main(int argc, char **argv) {
    uint64_t seed = (uint64_t)time(NULL);
    if (getenv("NM_TEST_SEED")) seed = strtoull(getenv("NM_TEST_SEED"), NULL, 10);
    if (argc == 3 && !strcmp(argv[1], "--dump")) return dump(argv[2], seed);
    printf("test_optim: seed %llu (set NM_TEST_SEED to replay)\n", (unsigned long long)seed);
    test_hand_steps();
    test_bad_config();
    test_norm_clip_nonfinite();
    test_random_and_threads(seed);
    test_fused_clip(seed);
    test_bf16_moments(seed);
    if (failures) {
        fprintf(stderr, "test_optim: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_optim: ok\n");
    return 0;
}
