// xent.c: softmax cross-entropy over the vocabulary (dsv3-spec 3.1, 7, 11), CPU.
//   loss_n = logsumexp(logits_n) - logits_n[target_n];  targets < 0 mean "no target": 0.
// Numerically stable: the row max is subtracted before exp and the exp-sum is accumulated
// in double (V = 129280 terms) from fp32 partial sums of 64 terms. Each term is nm_expf(l - m)
// (fastmath.h: vectorisable, ~1 ulp);
// the terms that dominate the sum have small |l - m|, so the loss keeps ~1e-7 relative accuracy. The mean over valid positions is the caller's scale.
// The backward may run in place (dlogits == logits): each row is fully read (max, sum)
// before any of its elements is overwritten, and only element v is read when writing v.
#include <math.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/fastmath.h"

// Row max and sum_v exp(l_v - max) of one row of V logits.
static void row_stats(const float *l, int64_t V, float *max_out, double *sum_out) {
    float m = -INFINITY;
    for (int64_t v = 0; v < V; v++) m = l[v] > m ? l[v] : m;
    double s = 0.0;
    for (int64_t v0 = 0; v0 < V; v0 += 64) {
        int64_t v1 = v0 + 64 < V ? v0 + 64 : V;
        float part = 0.0f;
        for (int64_t v = v0; v < v1; v++) part += nm_expf(l[v] - m);
        s += part;
    }
    *max_out = m;
    *sum_out = s;
}

// losses(N) (=); logits(N,V), targets(N)
void nm_cpu_xent_forward(float *losses, const float *logits, const int32_t *targets, int64_t N, int64_t V) {
    NM_CHECK(N >= 0 && V > 0, "xent shape N=%lld V=%lld", (long long)N, (long long)V);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int32_t tgt = targets[n];
        NM_CHECK(tgt < V, "target %lld is %d >= V=%lld", (long long)n, tgt, (long long)V);
        if (tgt < 0) {
            losses[n] = 0.0f;
            continue;
        }
        const float *l = logits + n * V;
        float m;
        double s;
        row_stats(l, V, &m, &s);
        losses[n] = (float)(log(s) + m - l[tgt]);
    }
}

// dlogits(N,V) (=), may alias logits; targets(N)
void nm_cpu_xent_backward(float *dlogits, const float *logits, const int32_t *targets, float scale,
                          int64_t N, int64_t V) {
    NM_CHECK(N >= 0 && V > 0, "xent shape N=%lld V=%lld", (long long)N, (long long)V);
    // loss = log sum exp(l) - l[tgt]  =>  dl_v = scale * (softmax(l)_v - [v == tgt])
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int32_t tgt = targets[n];
        NM_CHECK(tgt < V, "target %lld is %d >= V=%lld", (long long)n, tgt, (long long)V);
        const float *l = logits + n * V;
        float *dl = dlogits + n * V;
        if (tgt < 0) {
            for (int64_t v = 0; v < V; v++) dl[v] = 0.0f;
            continue;
        }
        float m;
        double s;
        row_stats(l, V, &m, &s);
        float inv = (float)(1.0 / s);
        for (int64_t v = 0; v < V; v++) dl[v] = scale * (nm_expf(l[v] - m) * inv);
        dl[tgt] -= scale;
    }
}
