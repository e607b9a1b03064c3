// router.cu: the CUDA backend's MoE routing (dsv3-spec 5, 7) and the complementary
// sequence-wise balance loss (dsv3-spec 6.2, 7, 11); src/ops/ref/router.c is the definition,
// its rules (ties to the lower index, -inf for dropped groups, fp32 selection scores) apply
// here unchanged.
//
// One thread block per token. The per-expert work (the score function, the gradient through
// it) runs on the block's threads side by side; the selections (top-k, group scores, kept
// groups) and the few sums over E whose order the reference fixes (softmax's exp-sum, the
// normalisation) run on thread 0 in the reference's order, over the token's row in shared
// memory: E is at most a few hundred, so a token's routing is a few thousand steps. Simple
// and exact (the selections must equal the reference's), not fast: a warp-level top-k is the
// faster form. Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

#define RT 64  // threads per token block (a power of two)

// idx(K) (=) the positions of the K largest of x(n), descending, ties to the lower index (one
// thread: the reference's topk). taken(n) is scratch.
static __device__ void topk(int32_t *idx, unsigned char *taken, const float *x, int64_t n, int64_t K) {
    for (int64_t i = 0; i < n; i++) taken[i] = 0;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || x[i] > x[best])) best = i;
        taken[best] = 1;
        idx[k] = (int32_t)best;
    }
}

// s(E) (=) the score function of z(E), in double, rounded to fp32 (block-wide; ends with a barrier)
static __device__ void score_row(float *s, const float *z, int64_t E, nm_scoring scoring, double *sh) {
    if (scoring == NM_SCORING_SIGMOID) {
        for (int64_t e = threadIdx.x; e < E; e += blockDim.x) s[e] = (float)(1.0 / (1.0 + exp(-(double)z[e])));
        __syncthreads();
        return;
    }
    if (threadIdx.x == 0) {  // max and exp-sum in the reference's order
        double m = -INFINITY, sum = 0.0;
        for (int64_t e = 0; e < E; e++) m = fmax(m, (double)z[e]);
        for (int64_t e = 0; e < E; e++) sum += exp(z[e] - m);
        sh[0] = m, sh[1] = sum;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) s[e] = (float)(exp(z[e] - sh[0]) / sh[1]);
    __syncthreads();
}

// dz(E) (= or += as acc) ds(E) through the score function at the token's scores s(E)
static __device__ void score_backward(float *dz, const double *ds, const float *s, int64_t E, nm_scoring scoring,
                                      int acc, double *sh) {
    double dot = 0.0;
    if (scoring == NM_SCORING_SOFTMAX) {
        // s = softmax(z)  =>  dz_i = s_i (ds_i - sum_j ds_j s_j)
        if (threadIdx.x == 0) {
            for (int64_t e = 0; e < E; e++) dot += ds[e] * s[e];
            sh[0] = dot;
        }
        __syncthreads();
        dot = sh[0];
    }
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        // s = sigmoid(z)  =>  dz = ds s (1 - s)
        const float d = scoring == NM_SCORING_SIGMOID ? (float)(ds[e] * s[e] * (1.0 - s[e])) : (float)(s[e] * (ds[e] - dot));
        if (acc) dz[e] += d;
        else dz[e] = d;
    }
    __syncthreads();
}

// --- forward: block n routes token n -----------------------------------------------------------------

static __global__ void router_forward_kernel(int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                                             const float *bias, nm_router_params p) {
    __shared__ float c[NM_CUDA_MAX_ROW_DIM], gscore[NM_CUDA_MAX_ROW_DIM];  // (E) selection scores, (G)
    __shared__ unsigned char taken[NM_CUDA_MAX_ROW_DIM];
    __shared__ int32_t kept[NM_CUDA_MAX_ROW_DIM];                          // (Gk)
    __shared__ double sh[2];
    const int64_t n = blockIdx.x, E = p.E, K = p.K;
    float *s = scores + n * E;
    score_row(s, logits + n * E, E, p.scoring, sh);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) c[e] = bias && p.method == NM_TOPK_NOAUX_TC ? s[e] + bias[e] : s[e];
    __syncthreads();
    if (threadIdx.x != 0) return;
    const int grouped = p.method != NM_TOPK_GREEDY && p.G > 1 && p.Gk < p.G;
    const int64_t G = p.G, Eg = grouped ? E / G : E;
    if (grouped) {
        for (int64_t g = 0; g < G; g++) {
            int32_t top2[2];
            topk(top2, taken, c + g * Eg, Eg, p.method == NM_TOPK_NOAUX_TC ? 2 : 1);
            gscore[g] = p.method == NM_TOPK_NOAUX_TC ? c[g * Eg + top2[0]] + c[g * Eg + top2[1]] : c[g * Eg + top2[0]];
        }
        topk(kept, taken, gscore, G, p.Gk);
        for (int64_t g = 0; g < G; g++) {
            int keep = 0;
            for (int64_t k = 0; k < p.Gk; k++) keep |= kept[k] == g;
            for (int64_t e = 0; !keep && e < Eg; e++) c[g * Eg + e] = -INFINITY;
        }
    }
    int32_t *idx = topk_idx + n * K;
    topk(idx, taken, c, E, K);
    double sum = 1e-20;
    for (int64_t k = 0; k < K; k++) sum += s[idx[k]];
    double mul = p.norm_topk_prob ? (double)p.routed_scaling / sum : (double)p.routed_scaling;
    for (int64_t k = 0; k < K; k++) topk_weight[n * K + k] = (float)(s[idx[k]] * mul);
}

// --- backward: block n, the selection held fixed -------------------------------------------------------

static __global__ void router_backward_kernel(float *dlogits, const float *dtopk_weight, const float *scores,
                                              const int32_t *topk_idx, nm_router_params p) {
    __shared__ double ds[NM_CUDA_MAX_ROW_DIM], sh[1];  // (E) dL/ds, non-zero on the selected experts
    const int64_t n = blockIdx.x, E = p.E, K = p.K;
    const float *s = scores + n * E, *a = dtopk_weight + n * K;
    const int32_t *idx = topk_idx + n * K;
    const double r = p.routed_scaling;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) ds[e] = 0.0;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (p.norm_topk_prob) {
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
    }
    __syncthreads();
    score_backward(dlogits + n * E, ds, s, E, p.scoring, 0, sh);
}

// --- balance loss ------------------------------------------------------------------------------------

// Block b, sequence b: f(b, E) (=) and prod(b, E) (=) f_be * P_be (double, summed on the host in
// the reference's order), with
//   f_be = E / (K T) * #{tokens t of b whose plain top-K of s holds e},  P_be = 1/T sum_t s_te / S_t
static __global__ void balance_forward_kernel(float *f, double *prod, const float *scores, int64_t T, int64_t E,
                                              int64_t K) {
    __shared__ double count[NM_CUDA_MAX_ROW_DIM], P[NM_CUDA_MAX_ROW_DIM], S;  // (E), (E)
    __shared__ int32_t idx[NM_CUDA_MAX_ROW_DIM];
    __shared__ unsigned char taken[NM_CUDA_MAX_ROW_DIM];
    const int64_t b = blockIdx.x;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0.0, P[e] = 0.0;
    for (int64_t t = 0; t < T; t++) {
        const float *s = scores + (b * T + t) * E;
        __syncthreads();
        if (threadIdx.x == 0) {
            topk(idx, taken, s, E, K);
            double sum = 0.0;
            for (int64_t e = 0; e < E; e++) sum += s[e];
            S = sum;
        }
        __syncthreads();
        for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
            for (int64_t k = 0; k < K; k++) count[e] += idx[k] == e ? 1.0 : 0.0;
            P[e] += s[e] / S / (double)T;
        }
    }
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        const float fe = (float)(count[e] * (double)E / ((double)K * (double)T));
        f[b * E + e] = fe;
        prod[b * E + e] = (double)fe * P[e];
    }
}

// Block n: dlogits(n, E) (+=). loss = 1/B sum_b sum_i f_bi 1/T sum_t s'_ti, s'_i = s_i / S:
//   g_i = dloss f_bi / (B T);  ds_m = (g_m - sum_i g_i s'_i) / S
static __global__ void balance_backward_kernel(float *dlogits, double gscale, const float *f, const float *scores,
                                               int64_t T, int64_t E, nm_scoring scoring) {
    __shared__ double ds[NM_CUDA_MAX_ROW_DIM], sh[2];
    const int64_t n = blockIdx.x;
    const float *s = scores + n * E, *fb = f + (n / T) * E;
    if (threadIdx.x == 0) {
        double S = 0.0, gs = 0.0;
        for (int64_t e = 0; e < E; e++) S += s[e];
        for (int64_t e = 0; e < E; e++) gs += gscale * fb[e] * (s[e] / S);
        sh[0] = S, sh[1] = gs;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) ds[e] = (gscale * fb[e] - sh[1]) / sh[0];
    __syncthreads();  // every thread has read sh before score_backward reuses it
    score_backward(dlogits + n * E, ds, s, E, scoring, 1, sh);
}

// --- launchers ----------------------------------------------------------------------------------------

static void check_params(const nm_router_params *p) {
    NM_CHECK(p->N >= 0 && p->N <= INT32_MAX && p->E >= 1 && p->E <= NM_CUDA_MAX_ROW_DIM, "router N=%lld E=%lld (1..%d)",
             (long long)p->N, (long long)p->E, NM_CUDA_MAX_ROW_DIM);
    NM_CHECK(p->K >= 1 && p->K <= p->E, "router K=%lld E=%lld", (long long)p->K, (long long)p->E);
    NM_CHECK(p->scoring == NM_SCORING_SIGMOID || p->scoring == NM_SCORING_SOFTMAX, "scoring %d", (int)p->scoring);
    if (p->method == NM_TOPK_GREEDY) return;
    NM_CHECK(p->method == NM_TOPK_NOAUX_TC || p->method == NM_TOPK_GROUP_LIMITED_GREEDY, "method %d", (int)p->method);
    const int64_t rem = p->G >= 1 ? p->E % p->G : 1;
    NM_CHECK(p->G >= 1 && rem == 0 && p->Gk >= 1 && p->Gk <= p->G, "router groups G=%lld Gk=%lld E=%lld",
             (long long)p->G, (long long)p->Gk, (long long)p->E);
    NM_CHECK(p->K <= p->Gk * (p->E / p->G), "router K=%lld > experts in %lld kept groups", (long long)p->K,
             (long long)p->Gk);
    NM_CHECK(p->method != NM_TOPK_NOAUX_TC || p->G == 1 || p->E / p->G >= 2, "noaux_tc needs E/G >= 2 (E=%lld G=%lld)",
             (long long)p->E, (long long)p->G);
}

void nm_cuda_router_forward(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                            const float *bias, const nm_router_params *p) {
    check_params(p);
    if (p->N > 0)
        router_forward_kernel<<<(unsigned)p->N, RT, 0, NM_CUDA_STREAM>>>(topk_idx, topk_weight, scores, logits, bias, *p);
    NM_CUDA_OP_DONE("router_forward");
}

void nm_cuda_router_backward(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                             const int32_t *topk_idx, const nm_router_params *p) {
    check_params(p);
    if (p->N > 0)
        router_backward_kernel<<<(unsigned)p->N, RT, 0, NM_CUDA_STREAM>>>(dlogits, dtopk_weight, scores, topk_idx, *p);
    NM_CUDA_OP_DONE("router_backward");
}

static void check_balance(int64_t B, int64_t T, int64_t E, int64_t K) {
    NM_CHECK(B >= 0 && B * T <= INT32_MAX && T >= 1 && E >= 1 && E <= NM_CUDA_MAX_ROW_DIM && K >= 1 && K <= E,
             "balance loss B=%lld T=%lld E=%lld K=%lld", (long long)B, (long long)T, (long long)E, (long long)K);
}

double nm_cuda_balance_loss_forward(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                    int64_t K) {
    check_balance(B, T, E, K);
    if (B == 0) return 0.0;
    double *prod = (double *)nm_cuda_scratch(be, NM_CUDA_SCRATCH_OUT, (size_t)(B * E) * sizeof(double));
    balance_forward_kernel<<<(unsigned)B, RT, 0, NM_CUDA_STREAM>>>(f, prod, scores, T, E, K);
    NM_CUDA_OP_DONE("balance_loss_forward");
    // The B x E products summed on the host in the reference's order (b, then e): a small
    // array (B sequences of E experts), one copy back, and the loss is the reference's bits.
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double row[64];
        for (int64_t e0 = 0; e0 < E; e0 += 64) {
            const int64_t ne = E - e0 < 64 ? E - e0 : 64;
            NM_CUDA_CALL(cudaMemcpy(row, prod + b * E + e0, (size_t)ne * sizeof(double), cudaMemcpyDeviceToHost));
            for (int64_t e = 0; e < ne; e++) total += row[e];
        }
    }
    return total / (double)B;
}

void nm_cuda_balance_loss_backward(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                   int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring) {
    check_balance(B, T, E, K);
    NM_CHECK(scoring == NM_SCORING_SIGMOID || scoring == NM_SCORING_SOFTMAX, "scoring %d", (int)scoring);
    const double gscale = (double)dloss / ((double)B * (double)T);
    if (B * T > 0)
        balance_backward_kernel<<<(unsigned)(B * T), RT, 0, NM_CUDA_STREAM>>>(dlogits, gscale, f, scores, T, E, scoring);
    NM_CUDA_OP_DONE("balance_loss_backward");
}
