// router.c: reference MoE routing (dsv3-spec 5, 7) and the complementary sequence-wise
// balance loss (dsv3-spec 6.2, 7, 11).
//
// Routing of one token with logits z(E):
//   s = sigmoid(z) or softmax(z);  c = s + bias (noaux_tc only; greedy methods ignore the bias)
//   groups (noaux_tc, group_limited_greedy, G > 1): a group's score is the sum of its two
//   largest c (noaux_tc) or its largest c; the Gk best groups are kept and every expert of the
//   others gets c = -inf (dsv3-spec 9.2: -inf, not 0)
//   topk_idx = the K largest c, in descending order;  w_k = s[idx_k], divided by
//   (sum_k w_k + 1e-20) if norm_topk_prob, times routed_scaling.
// Every "largest" here breaks ties towards the lower index, so routing is a pure function of
// its inputs. The scores are formed in double and rounded to fp32; c and the group scores are
// fp32 sums, as torch forms them, so exact ties resolve as there.
#include <math.h>

#include "core/check.h"
#include "ops/ref/ref_ops.h"

// idx(K) (=) the positions of the K largest of x(n), descending, ties to the lower index:
// each pass takes the largest not yet taken. `taken` (n) is scratch.
static void topk(int32_t *idx, unsigned char *taken, const float *x, int64_t n, int64_t K) {
    for (int64_t i = 0; i < n; i++) taken[i] = 0;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || x[i] > x[best])) best = i;
        taken[best] = 1;
        idx[k] = (int32_t)best;
    }
}

// s(E) (=) the score function of one token's logits z(E), in double.
static void score_row(float *s, const float *z, int64_t E, nm_scoring scoring) {
    if (scoring == NM_SCORING_SIGMOID) {
        for (int64_t e = 0; e < E; e++) s[e] = (float)(1.0 / (1.0 + exp(-(double)z[e])));
        return;
    }
    double m = -INFINITY, sum = 0.0;
    for (int64_t e = 0; e < E; e++) m = fmax(m, z[e]);
    for (int64_t e = 0; e < E; e++) sum += exp(z[e] - m);
    for (int64_t e = 0; e < E; e++) s[e] = (float)(exp(z[e] - m) / sum);
}

// dz(E) (=) ds(E) through the score function at the token's scores s(E).
static void score_backward(float *dz, const double *ds, const float *s, int64_t E, nm_scoring scoring) {
    if (scoring == NM_SCORING_SIGMOID) {
        // s = sigmoid(z)  =>  dz = ds s (1 - s)
        for (int64_t e = 0; e < E; e++) dz[e] = (float)(ds[e] * s[e] * (1.0 - s[e]));
        return;
    }
    // s = softmax(z)  =>  dz_i = s_i (ds_i - sum_j ds_j s_j)
    double dot = 0.0;
    for (int64_t e = 0; e < E; e++) dot += ds[e] * s[e];
    for (int64_t e = 0; e < E; e++) dz[e] = (float)(s[e] * (ds[e] - dot));
}

static void check_params(const nm_router_params *p) {
    NM_CHECK(p->N >= 0 && p->E >= 1 && p->E <= NM_REF_MAX_ROW_DIM, "router E=%lld (1..%d)", (long long)p->E,
             NM_REF_MAX_ROW_DIM);
    NM_CHECK(p->K >= 1 && p->K <= p->E, "router K=%lld E=%lld", (long long)p->K, (long long)p->E);
    NM_CHECK(p->scoring == NM_SCORING_SIGMOID || p->scoring == NM_SCORING_SOFTMAX, "scoring %d", (int)p->scoring);
    if (p->method == NM_TOPK_GREEDY) return;
    NM_CHECK(p->method == NM_TOPK_NOAUX_TC || p->method == NM_TOPK_GROUP_LIMITED_GREEDY, "method %d", (int)p->method);
    const int64_t rem = p->G >= 1 ? p->E % p->G : 1;
    NM_CHECK(p->G >= 1 && rem == 0 && p->Gk >= 1 && p->Gk <= p->G, "router groups G=%lld Gk=%lld E=%lld",
             (long long)p->G, (long long)p->Gk, (long long)p->E);
    // the kept groups must hold K experts, else a -inf expert would be selected
    NM_CHECK(p->K <= p->Gk * (p->E / p->G), "router K=%lld > experts in %lld kept groups", (long long)p->K,
             (long long)p->Gk);
    NM_CHECK(p->method != NM_TOPK_NOAUX_TC || p->G == 1 || p->E / p->G >= 2, "noaux_tc needs E/G >= 2 (E=%lld G=%lld)",
             (long long)p->E, (long long)p->G);
}

// topk_idx(N,K) (=), topk_weight(N,K) (=), scores(N,E) (=); logits(N,E), bias(E) may be NULL
void nm_ref_router_forward(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                           const float *bias, const nm_router_params *p) {
    check_params(p);
    const int64_t N = p->N, E = p->E, K = p->K;
    const int grouped = p->method != NM_TOPK_GREEDY && p->G > 1 && p->Gk < p->G;
    const int64_t G = p->G, Eg = grouped ? E / G : E;
    for (int64_t n = 0; n < N; n++) {
        float *s = scores + n * E;
        score_row(s, logits + n * E, E, p->scoring);
        float c[NM_REF_MAX_ROW_DIM];         // (E) selection scores
        unsigned char taken[NM_REF_MAX_ROW_DIM];
        for (int64_t e = 0; e < E; e++) c[e] = bias && p->method == NM_TOPK_NOAUX_TC ? s[e] + bias[e] : s[e];
        if (grouped) {
            float gscore[NM_REF_MAX_ROW_DIM]; // (G)
            for (int64_t g = 0; g < G; g++) {
                int32_t top2[2];
                topk(top2, taken, c + g * Eg, Eg, p->method == NM_TOPK_NOAUX_TC ? 2 : 1);
                gscore[g] = p->method == NM_TOPK_NOAUX_TC ? c[g * Eg + top2[0]] + c[g * Eg + top2[1]]
                                                          : c[g * Eg + top2[0]];
            }
            int32_t kept[NM_REF_MAX_ROW_DIM]; // (Gk)
            topk(kept, taken, gscore, G, p->Gk);
            for (int64_t g = 0; g < G; g++) {
                int keep = 0;
                for (int64_t k = 0; k < p->Gk; k++) keep |= kept[k] == g;
                for (int64_t e = 0; !keep && e < Eg; e++) c[g * Eg + e] = -INFINITY;
            }
        }
        int32_t *idx = topk_idx + n * K;
        topk(idx, taken, c, E, K);
        double sum = 1e-20;
        for (int64_t k = 0; k < K; k++) sum += s[idx[k]];
        double mul = p->norm_topk_prob ? (double)p->routed_scaling / sum : (double)p->routed_scaling;
        for (int64_t k = 0; k < K; k++) topk_weight[n * K + k] = (float)(s[idx[k]] * mul);
    }
}

// dlogits(N,E) (=); dtopk_weight(N,K), scores(N,E), topk_idx(N,K). The selection is held fixed.
void nm_ref_router_backward(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                            const int32_t *topk_idx, const nm_router_params *p) {
    check_params(p);
    const int64_t N = p->N, E = p->E, K = p->K;
    const double r = p->routed_scaling;
    for (int64_t n = 0; n < N; n++) {
        const float *s = scores + n * E, *a = dtopk_weight + n * K;
        const int32_t *idx = topk_idx + n * K;
        double ds[NM_REF_MAX_ROW_DIM] = {0}; // (E) dL/ds, non-zero on the selected experts
        if (p->norm_topk_prob) {
            // w_k = r s_k / S with S = sum_j s_j + 1e-20  =>  ds_k = r (a_k / S - sum_j a_j s_j / S^2)
            double S = 1e-20, as = 0.0;
            for (int64_t k = 0; k < K; k++) {
                S += s[idx[k]];
                as += (double)a[k] * s[idx[k]];
            }
            for (int64_t k = 0; k < K; k++) ds[idx[k]] = r * (a[k] / S - as / (S * S));
        } else {
            for (int64_t k = 0; k < K; k++) ds[idx[k]] = r * a[k];
        }
        score_backward(dlogits + n * E, ds, s, E, p->scoring);
    }
}

static void check_balance(int64_t B, int64_t T, int64_t E, int64_t K) {
    NM_CHECK(B >= 0 && T >= 1 && E >= 1 && E <= NM_REF_MAX_ROW_DIM && K >= 1 && K <= E,
             "balance loss B=%lld T=%lld E=%lld K=%lld", (long long)B, (long long)T, (long long)E, (long long)K);
}

// f(B,E) (=); scores(B*T,E). Returns the mean over sequences b of sum_i f_bi P_bi, with
//   f_bi = E / (K T) * #{tokens t of b whose plain top-K of s (no bias, no groups) holds i}
//   P_bi = 1/T sum_t s_ti / sum_j s_tj
double nm_ref_balance_loss_forward(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                   int64_t K) {
    check_balance(B, T, E, K);
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double count[NM_REF_MAX_ROW_DIM] = {0}, P[NM_REF_MAX_ROW_DIM] = {0}; // (E), (E)
        for (int64_t t = 0; t < T; t++) {
            const float *s = scores + (b * T + t) * E;
            int32_t idx[NM_REF_MAX_ROW_DIM];
            unsigned char taken[NM_REF_MAX_ROW_DIM];
            topk(idx, taken, s, E, K);
            for (int64_t k = 0; k < K; k++) count[idx[k]] += 1.0;
            double S = 0.0;
            for (int64_t e = 0; e < E; e++) S += s[e];
            for (int64_t e = 0; e < E; e++) P[e] += s[e] / S / (double)T;
        }
        for (int64_t e = 0; e < E; e++) {
            f[b * E + e] = (float)(count[e] * (double)E / ((double)K * (double)T));
            total += (double)f[b * E + e] * P[e];
        }
    }
    return B > 0 ? total / (double)B : 0.0;
}

// dlogits(B*T,E) (+=) dloss * d(balance loss)/d(logits) through the score function; f(B,E) and
// scores(B*T,E) from the forward (f is a constant: the selection is not differentiable).
void nm_ref_balance_loss_backward(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                  int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring) {
    check_balance(B, T, E, K);
    NM_CHECK(scoring == NM_SCORING_SIGMOID || scoring == NM_SCORING_SOFTMAX, "scoring %d", (int)scoring);
    // loss = 1/B sum_b sum_i f_bi 1/T sum_t s'_ti with s'_i = s_i / S, S = sum_j s_j:
    //   g_i = dloss f_bi / (B T) = dloss/ds'_i;  ds_m = (g_m - sum_i g_i s'_i) / S
    const double gscale = (double)dloss / ((double)B * (double)T);
    for (int64_t n = 0; n < B * T; n++) {
        const float *s = scores + n * E, *fb = f + (n / T) * E;
        double S = 0.0, gs = 0.0, ds[NM_REF_MAX_ROW_DIM];
        for (int64_t e = 0; e < E; e++) S += s[e];
        for (int64_t e = 0; e < E; e++) gs += gscale * fb[e] * (s[e] / S);
        for (int64_t e = 0; e < E; e++) ds[e] = (gscale * fb[e] - gs) / S;
        float dz[NM_REF_MAX_ROW_DIM];
        score_backward(dz, ds, s, E, scoring);
        for (int64_t e = 0; e < E; e++) dlogits[n * E + e] += dz[e];
    }
}
