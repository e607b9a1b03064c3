// xent.c: reference softmax cross-entropy over the vocabulary (dsv3-spec 3.1, 7, 11):
//   lse_n = log sum_v exp(l_nv),  loss_n = lse_n - l_n[target_n],  loss 0 where target_n < 0;
//   dl_nv = scale * (exp(l_nv - lse_n) - [v == target_n]), with the forward's saved lse.
// Sums and exps in double; the row max is subtracted first so that no exp overflows.
//
// Vocabulary tiles (ops.h xent_tile_*): each tile's max m_t and sum s_t = sum exp(l - m_t)
// are merged into the row's running (m, s): m' = max(m, m_t), s' = s e^(m - m') + s_t e^(m_t - m').
#include <math.h>

#include "core/check.h"
#include "ops/ref/ref_ops.h"

// max and sum_v exp(l_v - max) of one row l(n)
static void row_stats(const float *l, int64_t n, double *max, double *sum) {
    double m = -INFINITY, s = 0.0;
    for (int64_t v = 0; v < n; v++) m = fmax(m, l[v]);
    for (int64_t v = 0; v < n; v++) s += exp(l[v] - m);
    *max = m;
    *sum = s;
}

static void check_targets(const int32_t *targets, int64_t N, int64_t V) {
    for (int64_t n = 0; n < N; n++)
        NM_CHECK(targets[n] < V, "target %lld is %d >= V=%lld", (long long)n, targets[n], (long long)V);
}

// losses(N) (=), lse(N) (=) (0 for rows without a target); logits(N,V), targets(N)
void nm_ref_xent_forward(const nm_ops *be, float *losses, float *lse, const float *logits, const int32_t *targets,
                         int64_t N, int64_t V) {
    NM_CHECK(N >= 0 && V > 0, "xent shape N=%lld V=%lld", (long long)N, (long long)V);
    check_targets(targets, N, V);
    for (int64_t n = 0; n < N; n++) {
        if (targets[n] < 0) {
            losses[n] = 0.0f;
            lse[n] = 0.0f;  // never read by the backward; written so the buffer is defined
            continue;
        }
        const float *l = logits + n * V;
        double m, s;
        row_stats(l, V, &m, &s);
        losses[n] = (float)(log(s) + m - l[targets[n]]);
        lse[n] = (float)(log(s) + m);
    }
}

// dlogits(N,V) (=), may alias logits; lse(N) from the forward; targets(N)
void nm_ref_xent_backward(const nm_ops *be, float *dlogits, const float *logits, const float *lse,
                          const int32_t *targets, float scale, int64_t N, int64_t V) {
    nm_ref_xent_tile_backward(be, dlogits, V, logits, V, lse, targets, scale, N, V, 0, V);
}

// losses(N), lse(N) (= on the last tile), stats(N,3) (running max, exp-sum, target logit);
// logits(N, Vt) with leading dimension ld: columns [v0, v0 + Vt) of V.
void nm_ref_xent_tile_forward(const nm_ops *be, float *losses, float *lse, double *stats, const float *logits,
                              int64_t ld, const int32_t *targets, int64_t N, int64_t V, int64_t v0, int64_t Vt) {
    NM_CHECK(N >= 0 && V > 0 && v0 >= 0 && Vt > 0 && v0 + Vt <= V && ld >= Vt,
             "xent tile shape N=%lld V=%lld v0=%lld Vt=%lld ld=%lld", (long long)N, (long long)V, (long long)v0,
             (long long)Vt, (long long)ld);
    check_targets(targets, N, V);
    const int first = v0 == 0, last = v0 + Vt == V;
    for (int64_t n = 0; n < N; n++) {
        const int32_t tgt = targets[n];
        double *st = stats + 3 * n;
        if (tgt < 0) {
            if (last) losses[n] = 0.0f, lse[n] = 0.0f;  // lse never read for these rows
            continue;
        }
        const float *l = logits + n * ld;
        double mt, s_t;
        row_stats(l, Vt, &mt, &s_t);
        if (first) {
            st[0] = mt;
            st[1] = s_t;
        } else {
            double m = fmax(st[0], mt);
            st[1] = st[1] * exp(st[0] - m) + s_t * exp(mt - m);
            st[0] = m;
        }
        if (tgt >= v0 && tgt < v0 + Vt) st[2] = l[tgt - v0];
        if (last) {
            losses[n] = (float)(log(st[1]) + st[0] - st[2]);
            lse[n] = (float)(log(st[1]) + st[0]);
        }
    }
}

// dlogits(N, Vt) (=) with leading dimension ld_d, may alias logits (ld); columns [v0, v0 + Vt).
void nm_ref_xent_tile_backward(const nm_ops *be, float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                               const float *lse, const int32_t *targets, float scale, int64_t N, int64_t V, int64_t v0,
                               int64_t Vt) {
    NM_CHECK(N >= 0 && V > 0 && v0 >= 0 && Vt > 0 && v0 + Vt <= V && ld >= Vt && ld_d >= Vt,
             "xent tile shape N=%lld V=%lld v0=%lld Vt=%lld", (long long)N, (long long)V, (long long)v0,
             (long long)Vt);
    check_targets(targets, N, V);
    for (int64_t n = 0; n < N; n++) {
        for (int64_t v = 0; v < Vt; v++) {
            // element v is read only to write v, so dlogits may alias logits
            double onehot = targets[n] == v0 + v ? 1.0 : 0.0;
            double p = exp((double)logits[n * ld + v] - lse[n]);
            dlogits[n * ld_d + v] = targets[n] < 0 ? 0.0f : (float)(scale * (p - onehot));
        }
    }
}
