// test_schedule.c: learning-rate schedules at hand-computed steps, the MTP-weight and
// bias-speed switches, and the aux-loss-free bias update (balance.h).
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/rng.h"
#include "ops/ops.h"
#include "train/balance.h"
#include "train/schedule.h"

#include "test_util.h"
#include "test_backend.h"

// The schedules are double arithmetic on small integers: agreement to 1e-12 is exact
// up to the last few bits of cos/sqrt.
static void expect_lr(const nm_lr_schedule *s, int64_t step, double want, int line) {
    double got = nm_lr_at(s, step);
    if (!(fabs(got - want) <= 1e-12)) {
        fprintf(stderr, "FAIL line %d: %s lr(%lld) = %.15g, want %.15g\n", line, nm_lr_schedule_name(s->type),
                (long long)step, got, want);
        failures++;
    }
}
#define LR(s, step, want) expect_lr(&(s), (step), (want), __LINE__)

static void test_lr(void) {
    // lr_max 1, lr_min 0.1 so the values read directly: lr = 0.1 + 0.9 * shape.
    nm_lr_schedule s = {.type = NM_LR_CONSTANT, .lr_max = 1.0, .lr_min = 0.1, .warmup_steps = 10, .total_steps = 110};
    LR(s, 1, 0.1);   // 1/10 of the way: the first step already moves
    LR(s, 5, 0.5);
    LR(s, 10, 1.0);  // warm-up ends exactly at lr_max
    LR(s, 11, 1.0);
    LR(s, 1000, 1.0);

    s.type = NM_LR_COSINE;  // W = 10, cosine over steps 10..110
    LR(s, 3, 0.3);
    LR(s, 10, 1.0);
    LR(s, 35, 0.868198051533946);  // p = 1/4: 0.1 + 0.45 (1 + cos(pi/4))
    LR(s, 60, 0.55);               // p = 1/2: midpoint
    LR(s, 110, 0.1);               // end: lr_min
    LR(s, 500, 0.1);               // past the end: stays at lr_min

    s.type = NM_LR_WSD;  // S = 100 (decay 20% = steps 81..100, from start 80)
    s.total_steps = 100;
    s.decay_fraction = 0.2;
    s.wsd_decay = NM_WSD_LINEAR;
    LR(s, 10, 1.0);
    LR(s, 50, 1.0);
    LR(s, 80, 1.0);   // last stable step
    LR(s, 85, 0.775); // p = 1/4: 1 - 0.9/4
    LR(s, 90, 0.55);
    LR(s, 100, 0.1);
    s.wsd_decay = NM_WSD_SQRT;
    LR(s, 85, 0.55);                // 0.1 + 0.9 (1 - sqrt(1/4))
    LR(s, 90, 0.363603896932107);   // 0.1 + 0.9 (1 - sqrt(1/2))
    LR(s, 100, 0.1);
    LR(s, 120, 0.1);

    s.type = NM_LR_WSD_COSINE;  // W 10, stable through 50, cosine over 40 steps, then lr_min
    s.decay_start = 50;
    s.decay_steps = 40;
    s.total_steps = 100;
    LR(s, 7, 0.7);
    LR(s, 50, 1.0);
    LR(s, 51, 0.998612800179908);  // 0.1 + 0.45 (1 + cos(pi/40))
    LR(s, 70, 0.55);
    LR(s, 90, 0.1);
    LR(s, 100, 0.1);
}

static void test_lr_no_warmup(void) {
    // Cosine with W = 0 over S = 4 steps: p = s/4, lr = (1 + cos(pi s/4)) (lr_max 2, lr_min 0).
    nm_lr_schedule c = {.type = NM_LR_COSINE, .lr_max = 2.0, .lr_min = 0.0, .warmup_steps = 0, .total_steps = 4};
    LR(c, 1, 1.707106781186548);  // p = 1/4: 1 + cos(pi/4)
    LR(c, 2, 1.0);                // p = 1/2
    LR(c, 4, 0.0);
    LR(c, 0, 2.0);  // p = 0 (before the first step)
}

static void test_names(void) {
    for (int t = 0; t < 4; t++) {
        nm_lr_schedule_type back;
        EXPECT(nm_lr_schedule_parse(nm_lr_schedule_name((nm_lr_schedule_type)t), &back) == 0 && (int)back == t,
               "schedule name round trip %d", t);
    }
    nm_lr_schedule_type x;
    EXPECT(nm_lr_schedule_parse("cosine ", &x) != 0, "near-miss name accepted");
    nm_wsd_decay d;
    EXPECT(nm_wsd_decay_parse("1-sqrt", &d) == 0 && d == NM_WSD_SQRT, "1-sqrt");
    EXPECT(nm_wsd_decay_parse("sqrt", &d) != 0, "sqrt accepted");
}

static void test_switches(void) {
    EXPECT(nm_mtp_weight_at(0.3, 0.1, 100, 1) == 0.3, "mtp step 1");
    EXPECT(nm_mtp_weight_at(0.3, 0.1, 100, 100) == 0.3, "mtp last step before the switch");
    EXPECT(nm_mtp_weight_at(0.3, 0.1, 100, 101) == 0.1, "mtp after the switch");
    EXPECT(nm_mtp_weight_at(0.3, 0.1, 0, 1000000) == 0.3, "mtp switch 0 = never");
    EXPECT(nm_bias_gamma_at(0.001, 50, 50) == 0.001, "gamma at the stop step");
    EXPECT(nm_bias_gamma_at(0.001, 50, 51) == 0.0, "gamma after the stop step");
    EXPECT(nm_bias_gamma_at(0.001, 0, 1000000) == 0.001, "gamma stop 0 = never");
}

// --- balance ---------------------------------------------------------------------------------------


// The balance rule as the trainer applies it, the backend's op (ops.h: router_bias_update): the
// CPU backend's, checked equal bit for bit to the reference backend's on the same input.
static void bias_update(float *bias, const int64_t *counts, int64_t E, float gamma) {
    float ref[64];
    EXPECT(E <= 64, "E = %lld", (long long)E);
    memcpy(ref, bias, (size_t)E * sizeof(float));
    test_backend("ref")->router_bias_update(test_backend("ref"), ref, counts, E, gamma);
    test_backend("cpu")->router_bias_update(test_backend("cpu"), bias, counts, E, gamma);
    EXPECT(memcmp(ref, bias, (size_t)E * sizeof(float)) == 0, "router_bias_update: cpu and ref differ");
}

static void test_bias_update(void) {
    // mean 20: expert 0 underloaded (+gamma), 1 overloaded (-gamma), 2 and 3 exactly at the
    // mean (sign 0: unchanged, bit for bit).
    float b[4] = {0.0f, 0.5f, -0.25f, 1.0f};
    const int64_t counts[4] = {10, 30, 20, 20};
    bias_update(b, counts, 4, 0.001f);
    EXPECT(b[0] == 0.0f + 0.001f, "underloaded: %.9g", b[0]);
    EXPECT(b[1] == 0.5f - 0.001f, "overloaded: %.9g", b[1]);
    EXPECT(b[2] == -0.25f && b[3] == 1.0f, "at the mean: %.9g %.9g", b[2], b[3]);
    // The magnitude is gamma whatever the imbalance (sign, not difference).
    float c[2] = {0, 0};
    const int64_t lop[2] = {0, 1000000};
    bias_update(c, lop, 2, 0.25f);
    EXPECT(c[0] == 0.25f && c[1] == -0.25f, "magnitude: %g %g", c[0], c[1]);
    // A non-integer mean (1.5) and counts near 1e15 where a float mean would blur: the mean
    // is a double, so 1e15 is recognised as exactly average.
    const int64_t big[3] = {1000000000000001, 1000000000000000, 999999999999999};
    float d[3] = {0, 0, 0};
    bias_update(d, big, 3, 1.0f);
    EXPECT(d[0] == -1.0f && d[1] == 0.0f && d[2] == 1.0f, "large counts: %g %g %g", d[0], d[1], d[2]);
    // gamma 0 (after the stop step) changes nothing.
    bias_update(b, counts, 4, 0.0f);
    EXPECT(b[0] == 0.001f, "gamma 0 changed the bias");
}

// Invariant (style.md 54): routing to argmax(affinity + bias) with expert 0 favoured, the
// update drives the load towards balance.
static void test_bias_balances(void) {
    enum { E = 4, N = 2000, ITERS = 300 };
    float bias[E] = {0};
    int64_t counts[E];
    uint64_t key = nm_rng_key(7, NM_RNG_TEST, 3, 0);
    nm_balance_stats first = {0}, last = {0};
    for (int it = 0; it < ITERS; it++) {
        memset(counts, 0, sizeof(counts));
        for (int t = 0; t < N; t++) {
            int best = 0;
            float best_s = -1e30f;
            for (int e = 0; e < E; e++) {
                float s = nm_rng_uniform_f32(key, (uint64_t)(t * E + e)) + (e == 0 ? 0.3f : 0.0f) + bias[e];
                if (s > best_s) best_s = s, best = e;
            }
            counts[best]++;
        }
        const float *bp = bias;
        nm_balance_compute_stats(it == 0 ? &first : &last, counts, &bp, 1, E);
        bias_update(bias, counts, E, 0.005f);
    }
    EXPECT(first.load_max_over_mean > 2.0, "setup: expert 0 should start overloaded (%g)", first.load_max_over_mean);
    EXPECT(last.load_max_over_mean < 1.1, "bias update did not balance: max/mean %g", last.load_max_over_mean);
    EXPECT(bias[0] < bias[1] && bias[0] < bias[2] && bias[0] < bias[3], "favoured expert's bias not the lowest");
}

static void test_stats(void) {
    const int64_t counts[8] = {10, 30, 20, 20, 0, 0, 0, 0};  // second layer saw no tokens
    const float b0[4] = {0.1f, -0.2f, 0, 0}, b1[4] = {0.3f, 0, 0, 0};
    const float *biases[2] = {b0, b1};
    nm_balance_stats st;
    nm_balance_compute_stats(&st, counts, biases, 2, 4);
    EXPECT(st.load_max_over_mean == 1.5, "max/mean %g", st.load_max_over_mean);
    EXPECT(st.bias_min == (double)-0.2f && st.bias_max == (double)0.3f, "bias range %g %g", st.bias_min, st.bias_max);
}

int main(void) {
    test_lr();
    test_lr_no_warmup();
    test_names();
    test_switches();
    test_bias_update();
    test_bias_balances();
    test_stats();
    if (failures) {
        fprintf(stderr, "test_schedule: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_schedule: ok\n");
    return 0;
}
