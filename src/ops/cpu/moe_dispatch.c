// moe_dispatch.c: dropless MoE dispatch and combine on the CPU (dsv3-spec 5 step 9).
//
// The N*K (token, slot) assignments are grouped by expert with a stable counting sort, so
// every expert sees its tokens in token order and its rows are one contiguous block
// [offsets[e], offsets[e+1]) for the grouped expert GEMMs. perm[r] = n*K + k names the
// assignment in permuted row r; token = perm[r] / K.
//
// Determinism (design.md 5b): combine and scatter add several rows into one token row. They
// are parallelised over column slabs of the output, each thread walking the rows in
// permuted order, so every element receives its additions in the same order whatever the
// thread count (no atomics, no inverse map to allocate). Gather and combine-backward write
// disjoint rows and are row-parallel.
//
// Not here: expert parallelism's all-to-all (dist/), the expert GEMMs (gemm).
#include <string.h>

#include "core/check.h"
#include "ops/bf16.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/lanes.h"

#define SLAB 64 // columns per thread-owned slab in the scatter-adds

// offsets(E+1) (=), perm(N*K) (=); topk_idx(N,K)
void nm_cpu_moe_permute(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx, int64_t N,
                        int64_t K, int64_t E) {
    NM_CHECK(N >= 0 && K >= 1 && E >= 1 && N * K <= INT32_MAX, "moe_permute N=%lld K=%lld E=%lld",
             (long long)N, (long long)K, (long long)E);
    const int64_t NK = N * K;
    // pass 1: counts into offsets[e+1]
    for (int64_t e = 0; e <= E; e++) offsets[e] = 0;
    for (int64_t a = 0; a < NK; a++) {
        int32_t e = topk_idx[a];
        NM_CHECK(e >= 0 && e < E, "topk_idx[%lld] = %d outside [0, %lld)", (long long)a, e, (long long)E);
        offsets[e + 1]++;
    }
    // pass 2: exclusive prefix sum: offsets[e] = start of expert e
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    // pass 3: stable placement in flat order, using offsets[e] as expert e's write cursor
    // (no scratch); afterwards offsets[e] holds the end of e = the start of e+1 ...
    for (int64_t a = 0; a < NK; a++) perm[offsets[topk_idx[a]]++] = (int32_t)a;
    // ... so shift back by one expert to restore the starts.
    for (int64_t e = E; e > 0; e--) offsets[e] = offsets[e - 1];
    offsets[0] = 0;
}

// dst(N*K,D) (=) src(N,D)[perm[r] / K]
void nm_cpu_moe_gather(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                       int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe_gather shape");
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < N * K; r++)
        memcpy(dst + r * D, src + (int64_t)(perm[r] / K) * D, (size_t)D * sizeof(float));
}

// dst(N*K,D) (=) bf16(src(N,D)[perm[r] / K]) in fp32 storage; bits(N*K,D) (=) the same as bf16
// when not NULL. Under bf16 the gathered rows are read by the experts' bf16 GEMMs only, so they
// are rounded (and given their bf16 twin) here rather than by a second and third pass.
void nm_cpu_moe_gather_bf16(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                            int64_t N, int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe_gather shape");
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < N * K; r++) {
        const float *s = src + (int64_t)(perm[r] / K) * D;
        float *d = dst + r * D;
        for (int64_t c = 0; c < D; c++) d[c] = nm_bf16_round(s[c]);
        if (bits) nm_bf16_high_halves(bits + r * D, d, D);
    }
}

// y(N,D) (+=) sum_r topk_weight[perm[r]] * expert_out(N*K,D)[r] into token perm[r] / K
void nm_cpu_moe_combine_forward(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                const int32_t *perm, int64_t N, int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe_combine shape");
    int64_t n_slabs = (D + SLAB - 1) / SLAB;
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n_slabs; s++) {
        int64_t c0 = s * SLAB, c1 = c0 + SLAB < D ? c0 + SLAB : D;
        for (int64_t r = 0; r < N * K; r++) {
            float w = topk_weight[perm[r]];
            float *yn = y + (int64_t)(perm[r] / K) * D;
            const float *x = expert_out + r * D;
            for (int64_t c = c0; c < c1; c++) yn[c] += w * x[c];
        }
    }
}

// dexpert_out(N*K,D) (=), dtopk_weight(N,K) (=); dy(N,D), expert_out(N*K,D), topk_weight(N,K)
void nm_cpu_moe_combine_backward(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                 const float *expert_out, const float *topk_weight, const int32_t *perm,
                                 int64_t N, int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe_combine shape");
    // y[n] += w[a] * x[r] with a = perm[r], n = a / K  =>  dx[r] = w[a] dy[n], dw[a] = dy[n] . x[r]
    // perm is a permutation, so every r writes its own dx row and its own dw element.
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < N * K; r++) {
        int32_t a = perm[r];
        const float *g = dy + (int64_t)(a / K) * D, *x = expert_out + r * D;
        float w = topk_weight[a], *dx = dexpert_out + r * D;
        for (int64_t c = 0; c < D; c++) dx[c] = w * g[c];
        dtopk_weight[a] = (float)nm_cpu_dot_lanes(g, x, D);  // in lanes: a plain loop does not vectorise
    }
}

// dsrc(N,D) (+=) sum_r ddst(N*K,D)[r] into token perm[r] / K (the gather's backward)
void nm_cpu_moe_scatter_add(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N, int64_t K,
                            int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe_scatter_add shape");
    int64_t n_slabs = (D + SLAB - 1) / SLAB;
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n_slabs; s++) {
        int64_t c0 = s * SLAB, c1 = c0 + SLAB < D ? c0 + SLAB : D;
        for (int64_t r = 0; r < N * K; r++) {
            float *d = dsrc + (int64_t)(perm[r] / K) * D;
            const float *g = ddst + r * D;
            for (int64_t c = c0; c < c1; c++) d[c] += g[c];
        }
    }
}
