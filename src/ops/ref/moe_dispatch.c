// moe_dispatch.c: reference dropless MoE dispatch and combine (dsv3-spec 5 step 9).
//
// The N*K assignments a = n*K + k (token n's k-th expert, topk_idx[a]) are grouped by expert:
// permuted row r holds assignment perm[r], expert e's rows are [offsets[e], offsets[e+1]), and
// within an expert the assignments keep their flat order (a stable sort by expert). Rows add
// into their tokens in permuted-row order.
#include "core/check.h"
#include "ops/bf16.h"
#include "ops/ref/ref_ops.h"

static void check_shape(int64_t N, int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe shape N=%lld K=%lld D=%lld", (long long)N, (long long)K, (long long)D);
}

// offsets(E+1) (=), perm(N*K) (=); topk_idx(N,K)
void nm_ref_moe_permute(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx, int64_t N,
                        int64_t K, int64_t E) {
    NM_CHECK(N >= 0 && K >= 1 && E >= 1 && N * K <= INT32_MAX, "moe_permute N=%lld K=%lld E=%lld", (long long)N,
             (long long)K, (long long)E);
    for (int64_t a = 0; a < N * K; a++)
        NM_CHECK(topk_idx[a] >= 0 && topk_idx[a] < E, "topk_idx[%lld] = %d outside [0, %lld)", (long long)a,
                 topk_idx[a], (long long)E);
    // expert 0's assignments in flat order, then expert 1's, ...
    int64_t r = 0;
    for (int64_t e = 0; e < E; e++) {
        offsets[e] = (int32_t)r;
        for (int64_t a = 0; a < N * K; a++)
            if (topk_idx[a] == e) perm[r++] = (int32_t)a;
    }
    offsets[E] = (int32_t)r;
}

// dst(N*K,D) (=) src(N,D)[perm[r] / K]
void nm_ref_moe_gather(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                       int64_t D) {
    check_shape(N, K, D);
    for (int64_t r = 0; r < N * K; r++)
        for (int64_t d = 0; d < D; d++) dst[r * D + d] = src[(int64_t)(perm[r] / K) * D + d];
}

// dst(N*K,D) (=) bf16 of src(N,D)[perm[r] / K] in fp32 storage; bits(N*K,D) (=) the same as
// bf16 when not NULL
void nm_ref_moe_gather_bf16(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                            int64_t N, int64_t K, int64_t D) {
    check_shape(N, K, D);
    for (int64_t r = 0; r < N * K; r++)
        for (int64_t d = 0; d < D; d++) {
            uint16_t h = nm_f32_to_bf16(src[(int64_t)(perm[r] / K) * D + d]);
            dst[r * D + d] = nm_bf16_to_f32(h);
            if (bits) bits[r * D + d] = h;
        }
}

// y(N,D) (+=) topk_weight[perm[r]] * expert_out[r] into token perm[r] / K, for r in order
void nm_ref_moe_combine_forward(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                const int32_t *perm, int64_t N, int64_t K, int64_t D) {
    check_shape(N, K, D);
    for (int64_t r = 0; r < N * K; r++) {
        const float w = topk_weight[perm[r]];
        float *yn = y + (int64_t)(perm[r] / K) * D;
        for (int64_t d = 0; d < D; d++) yn[d] += w * expert_out[r * D + d];
    }
}

// dexpert_out(N*K,D) (=) topk_weight * dy[token]; dtopk_weight(N,K) (=) dy[token] . expert_out[r]
void nm_ref_moe_combine_backward(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                 const float *expert_out, const float *topk_weight, const int32_t *perm, int64_t N,
                                 int64_t K, int64_t D) {
    check_shape(N, K, D);
    for (int64_t r = 0; r < N * K; r++) {
        const int32_t a = perm[r];
        const float *g = dy + (int64_t)(a / K) * D;
        double dot = 0.0;
        for (int64_t d = 0; d < D; d++) {
            dexpert_out[r * D + d] = topk_weight[a] * g[d];
            dot += (double)g[d] * expert_out[r * D + d];
        }
        dtopk_weight[a] = (float)dot;
    }
}

// dsrc(N,D) (+=) ddst(N*K,D)[r] into token perm[r] / K, for r in order (the gather's backward)
void nm_ref_moe_scatter_add(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N, int64_t K,
                            int64_t D) {
    check_shape(N, K, D);
    for (int64_t r = 0; r < N * K; r++)
        for (int64_t d = 0; d < D; d++) dsrc[(int64_t)(perm[r] / K) * D + d] += ddst[r * D + d];
}
