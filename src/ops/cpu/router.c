// router.c: MoE routing on the CPU: scores, group-limited top-K selection, gate weights
// (dsv3-spec 5, 7) and the complementary sequence-wise balance loss (dsv3-spec 6.2, 7, 11).
//
// Reference: HF DeepseekV3TopkRouter / DeepseekV3MoE.route_tokens_to_experts with the fix
// of huggingface/transformers#45441: experts outside the kept groups are masked to -inf, not
// 0 (dsv3-spec 9.2), so a negatively biased expert in a dropped group can never win.
// Selection uses c = scores + bias for noaux_tc only; the gate weights use the unbiased scores
// (dsv3-spec 9.7). greedy and group_limited_greedy select on the plain scores and ignore the
// bias: HF modeling_deepseek.py MoEGate creates and reads e_score_correction_bias only when
// topk_method == "noaux_tc", and DeepSeek-V3's inference/model.py Gate has a bias only for V3's
// dimension (7168, a noaux_tc config); so a greedy model routes the same here and there.
// Ties are broken towards the lower index everywhere (groups and experts), so the routing is
// a pure function of the inputs. The group score of noaux_tc is the fp32 sum of the two
// largest c, as torch computes it, so exact ties resolve as they do there.
//
// Not here: the router GEMM (gemm), the bias update (trainer), expert dispatch (moe_dispatch.c).
#include <math.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"

// --- selection helpers ----------------------------------------------------------------------

// Inserts candidate (v, e) into the descending list vals/idx of *len <= cap entries. Candidates
// arrive in increasing e, and an equal value never moves ahead of an earlier one, so ties
// keep the lower index first.
static void topk_insert(float *vals, int32_t *idx, int64_t *len, int64_t cap, float v, int32_t e) {
    if (*len == cap && !(v > vals[cap - 1])) return;
    int64_t pos = *len < cap ? *len : cap - 1;
    while (pos > 0 && v > vals[pos - 1]) {
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        pos--;
    }
    vals[pos] = v;
    idx[pos] = e;
    if (*len < cap) (*len)++;
}

// idx(K) (=) the K largest of x(n), descending, ties to the lower index; vals(K) scratch.
static void topk(int32_t *idx, float *vals, const float *x, int64_t n, int64_t K) {
    int64_t len = 0;
    for (int64_t e = 0; e < n; e++) topk_insert(vals, idx, &len, K, x[e], (int32_t)e);
}

static inline double sigmoid_d(float z) { return 1.0 / (1.0 + exp(-(double)z)); }

// s(E) (=) score function of one token's logits z(E).
static void score_row(float *s, const float *z, int64_t E, nm_scoring scoring) {
    if (scoring == NM_SCORING_SIGMOID) {
        for (int64_t e = 0; e < E; e++) s[e] = (float)sigmoid_d(z[e]);
        return;
    }
    float m = -INFINITY;
    for (int64_t e = 0; e < E; e++) m = z[e] > m ? z[e] : m;
    double sum = 0.0;
    for (int64_t e = 0; e < E; e++) sum += exp((double)z[e] - m);
    for (int64_t e = 0; e < E; e++) s[e] = (float)(exp((double)z[e] - m) / sum);
}

static void check_params(const nm_router_params *p) {
    NM_CHECK(p->N >= 0 && p->E >= 1 && p->E <= NM_CPU_MAX_STACK_DIM, "router E=%lld (1..%d)",
             (long long)p->E, NM_CPU_MAX_STACK_DIM);
    NM_CHECK(p->K >= 1 && p->K <= p->E, "router K=%lld E=%lld", (long long)p->K, (long long)p->E);
    NM_CHECK(p->scoring == NM_SCORING_SIGMOID || p->scoring == NM_SCORING_SOFTMAX, "scoring %d",
             (int)p->scoring);
    if (p->method == NM_TOPK_GREEDY) return;
    NM_CHECK(p->method == NM_TOPK_NOAUX_TC || p->method == NM_TOPK_GROUP_LIMITED_GREEDY, "method %d",
             (int)p->method);
    // (NM_CHECK pastes the condition into its format string, so no '%' operator inside it)
    int64_t rem = p->G >= 1 ? p->E % p->G : 1;
    NM_CHECK(p->G >= 1 && rem == 0 && p->Gk >= 1 && p->Gk <= p->G,
             "router groups G=%lld Gk=%lld E=%lld", (long long)p->G, (long long)p->Gk, (long long)p->E);
    // The kept groups must hold at least K experts, else a -inf expert would be selected.
    NM_CHECK(p->K <= p->Gk * (p->E / p->G), "router K=%lld > experts in %lld kept groups",
             (long long)p->K, (long long)p->Gk);
    // noaux_tc's group score is a top-2 sum (HF's topk(2) needs E/G >= 2).
    NM_CHECK(p->method != NM_TOPK_NOAUX_TC || p->G == 1 || p->E / p->G >= 2,
             "noaux_tc needs E/G >= 2 (E=%lld G=%lld)", (long long)p->E, (long long)p->G);
}

// --- router -------------------------------------------------------------------------------

// topk_idx(N,K) (=), topk_weight(N,K) (=), scores(N,E) (=); logits(N,E), bias(E) may be NULL
void nm_cpu_router_forward(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                           const float *bias, const nm_router_params *p) {
    check_params(p);
    const int64_t N = p->N, E = p->E, K = p->K;
    const int grouped = p->method != NM_TOPK_GREEDY && p->G > 1 && p->Gk < p->G;
    const int64_t G = p->G, Eg = grouped ? E / G : E;
    const int use_bias = bias && p->method == NM_TOPK_NOAUX_TC;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float *s = scores + n * E;
        score_row(s, logits + n * E, E, p->scoring);
        float c[NM_CPU_MAX_STACK_DIM]; // (E) biased selection scores, -inf outside kept groups
        for (int64_t e = 0; e < E; e++) c[e] = use_bias ? s[e] + bias[e] : s[e];
        float vals[NM_CPU_MAX_STACK_DIM];
        if (grouped) {
            float gscore[NM_CPU_MAX_STACK_DIM]; // (G)
            for (int64_t g = 0; g < G; g++) {
                const float *cg = c + g * Eg;
                if (p->method == NM_TOPK_GROUP_LIMITED_GREEDY) {
                    float m = -INFINITY;
                    for (int64_t e = 0; e < Eg; e++) m = cg[e] > m ? cg[e] : m;
                    gscore[g] = m;
                } else {
                    int32_t i2[2];
                    float v2[2];
                    topk(i2, v2, cg, Eg, 2);
                    gscore[g] = v2[0] + v2[1];
                }
            }
            int32_t kept[NM_CPU_MAX_STACK_DIM]; // (Gk)
            topk(kept, vals, gscore, G, p->Gk);
            unsigned char keep[NM_CPU_MAX_STACK_DIM] = {0}; // (G)
            for (int64_t k = 0; k < p->Gk; k++) keep[kept[k]] = 1;
            for (int64_t g = 0; g < G; g++)
                if (!keep[g])
                    for (int64_t e = 0; e < Eg; e++) c[g * Eg + e] = -INFINITY;
        }
        int32_t *idx = topk_idx + n * K;
        topk(idx, vals, c, E, K);
        // w_k = s[idx_k]; w /= (sum w + 1e-20) if asked; w *= routed_scaling
        double sum = 1e-20;
        for (int64_t k = 0; k < K; k++) sum += s[idx[k]];
        double mul = p->norm_topk_prob ? (double)p->routed_scaling / sum : (double)p->routed_scaling;
        for (int64_t k = 0; k < K; k++) topk_weight[n * K + k] = (float)(s[idx[k]] * mul);
    }
}

// ds(E) -> dz(E) (=) through the score function, given one token's scores s(E).
static void score_backward(float *dz, const double *ds, const float *s, int64_t E, nm_scoring scoring) {
    if (scoring == NM_SCORING_SIGMOID) {
        // s = sigmoid(z)  =>  dz = ds * s (1 - s)
        for (int64_t e = 0; e < E; e++) dz[e] = (float)(ds[e] * s[e] * (1.0 - s[e]));
        return;
    }
    // s = softmax(z)  =>  dz_i = s_i (ds_i - sum_j ds_j s_j)
    double dot = 0.0;
    for (int64_t e = 0; e < E; e++) dot += ds[e] * s[e];
    for (int64_t e = 0; e < E; e++) dz[e] = (float)(s[e] * (ds[e] - dot));
}

// dlogits(N,E) (=); dtopk_weight(N,K), scores(N,E), topk_idx(N,K)
void nm_cpu_router_backward(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                            const int32_t *topk_idx, const nm_router_params *p) {
    check_params(p);
    const int64_t N = p->N, E = p->E, K = p->K;
    const double r = p->routed_scaling;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *s = scores + n * E, *a = dtopk_weight + n * K;
        const int32_t *idx = topk_idx + n * K;
        double ds[NM_CPU_MAX_STACK_DIM] = {0}; // (E) dL/dscores, non-zero on the selected set
        if (p->norm_topk_prob) {
            // w_k = r s_k / S, S = sum_j s_j + 1e-20  =>  ds_k = r (a_k / S - sum_j a_j s_j / S^2)
            double S = 1e-20, as = 0.0;
            for (int64_t k = 0; k < K; k++) {
                S += s[idx[k]];
                as += (double)a[k] * s[idx[k]];
            }
            for (int64_t k = 0; k < K; k++) ds[idx[k]] = r * (a[k] / S - as / (S * S));
        } else {
            // w_k = r s_k
            for (int64_t k = 0; k < K; k++) ds[idx[k]] = r * a[k];
        }
        score_backward(dlogits + n * E, ds, s, E, p->scoring);
    }
}

// --- complementary sequence-wise balance loss -----------------------------------------------

// f(B,E) (=); scores(B*T,E). Returns mean over b of sum_i f_i P_i.
double nm_cpu_balance_loss_forward(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                   int64_t K) {
    NM_CHECK(B >= 0 && T >= 1 && E >= 1 && E <= NM_CPU_MAX_STACK_DIM && K >= 1 && K <= E,
             "balance loss B=%lld T=%lld E=%lld K=%lld", (long long)B, (long long)T, (long long)E,
             (long long)K);
    // pass 1: f_i = E/(K T) * #tokens of the sequence whose plain top-K of s contains i
    // (no bias, no group limit, dsv3-spec 6.2). Counts are exact in fp32 below 2^24.
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        float *fb = f + b * E;
        for (int64_t e = 0; e < E; e++) fb[e] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            int32_t idx[NM_CPU_MAX_STACK_DIM];
            float vals[NM_CPU_MAX_STACK_DIM];
            topk(idx, vals, scores + (b * T + t) * E, E, K);
            for (int64_t k = 0; k < K; k++) fb[idx[k]] += 1.0f;
        }
        float mul = (float)((double)E / ((double)K * (double)T));
        for (int64_t e = 0; e < E; e++) fb[e] *= mul;
    }
    // pass 2: P_i = mean_t s_i / sum_j s_j, loss = mean_b sum_i f_i P_i; sequential (N*E
    // work) so the sum has one fixed order.
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double P[NM_CPU_MAX_STACK_DIM] = {0}; // (E)
        for (int64_t t = 0; t < T; t++) {
            const float *s = scores + (b * T + t) * E;
            double S = 0.0;
            for (int64_t e = 0; e < E; e++) S += s[e];
            for (int64_t e = 0; e < E; e++) P[e] += s[e] / S;
        }
        double lb = 0.0;
        for (int64_t e = 0; e < E; e++) lb += (double)f[b * E + e] * (P[e] / (double)T);
        total += lb;
    }
    return B > 0 ? total / (double)B : 0.0;
}

// dlogits(B*T,E) (+=); f(B,E), scores(B*T,E)
void nm_cpu_balance_loss_backward(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                  int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring) {
    NM_CHECK(B >= 0 && T >= 1 && E >= 1 && E <= NM_CPU_MAX_STACK_DIM && K >= 1 && K <= E,
             "balance loss B=%lld T=%lld E=%lld K=%lld", (long long)B, (long long)T, (long long)E,
             (long long)K);
    NM_CHECK(scoring == NM_SCORING_SIGMOID || scoring == NM_SCORING_SOFTMAX, "scoring %d", (int)scoring);
    // loss = 1/B sum_b sum_i f_bi 1/T sum_t s'_it,  s'_i = s_i / S,  S = sum_j s_j:
    //   g_i = dloss f_bi / (B T) = dloss/ds'_i;  ds_m = (g_m - sum_i g_i s'_i) / S,
    // then through the score function (for softmax S == 1 numerically, but the general
    // form is kept so the gradient is exact).
    const double gscale = (double)dloss / ((double)B * (double)T);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < B * T; n++) {
        const float *s = scores + n * E, *fb = f + (n / T) * E;
        double S = 0.0, gs = 0.0;
        for (int64_t e = 0; e < E; e++) S += s[e];
        for (int64_t e = 0; e < E; e++) gs += gscale * fb[e] * (s[e] / S);
        double ds[NM_CPU_MAX_STACK_DIM]; // (E)
        for (int64_t e = 0; e < E; e++) ds[e] = (gscale * fb[e] - gs) / S;
        float dz[NM_CPU_MAX_STACK_DIM]; // (E)
        score_backward(dz, ds, s, E, scoring);
        for (int64_t e = 0; e < E; e++) dlogits[n * E + e] += dz[e];
    }
}
