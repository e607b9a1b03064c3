// attention.c: MLA causal attention core on the CPU (dsv3-spec 3.2 steps 7-9, 7), FlashAttention-2
// style: tiles of queries against chunks of keys, the inner products through BLAS.
//
//   score(i,j) = scale * (q_nope_i . k_nope_j + q_pe_i . k_pe_j), j <= i;  P = softmax_j;
//   out_i = sum_j P_ij v_j;  lse_i = log sum_j exp(score(i,j)) saved for the backward.
//
// Layouts (ops.h): q(B,T,H,Dn+Dr) per head [q_nope | q_pe]; kv(B,T,H,Dn+Dv) per head
// [k_nope | v]; k_pe(B,T,Dr) shared by all heads (MLA's decoupled rope key). The RoPE and the
// projections around it are other ops. Reference: FlashAttention-2 (Dao 2023) Algorithms 1-2;
// the test oracle is a naive float64 softmax(QK^T)V (tests/test_ops.c) and PyTorch float64.
//
// Work unit: one (b, h) pair and a tile of NM_ATTN_BQ query rows, against keys in chunks of
// NM_ATTN_BK. Every product is an sgemm on strided views of the (B,T,H,*) tensors (leading
// dims H*(Dn+Dr), H*(Dn+Dv), Dr), called inside the OpenMP region, where OpenBLAS's OpenMP
// build runs single-threaded. The S/P tile lives in a fixed stack buffer (ops never allocate),
// so no T x T matrix is stored and T is unbounded: the forward runs an online softmax over the
// key chunks (running max m and sum l, rescaling the output rows when m grows), the backward
// recomputes p_ij = exp(score(i,j) - lse_i).
//
// Precision: fp32 throughout (sgemm, fp32 exp accurate to 1 ulp from fastmath.h, fp32 row
// sums), except the few per-row scalars (D_i, lse, the sum of dk_pe over heads), which are
// double. The scalar-double version this replaced spent ~45% of a tiny training step here
// (20-70x slower than this at T = 129..257). Measured against it (B=8, H=2..8, T up to 700,
// several chunks): max abs error / max |ref| <= 7e-7 on out, lse, dq, dkv and dk_pe.
//
// Determinism without atomics, for any thread count: each output element is written by
// exactly one work unit, in a fixed order. The forward's unit owns its out/lse rows; the
// backward's unit is a whole (b, h) pair, which owns dq and dkv of head h for batch b (dk/dv
// of key j accumulate over the query tiles in tile order); the shared dk_pe gets per-head
// partials in scratch(B,H,T,Dr), summed over heads in head order. sgemm's result does not
// depend on which thread calls it, so schedule(dynamic) is safe and balances the causal tiles.
#include <math.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/fastmath.h"

// Tile sizes: 64 x 256 fp32 = 64 KB per tile buffer (the backward keeps two), well inside an
// OpenMP thread's stack; T <= 256 then takes one key chunk, i.e. no online rescaling, for the
// tiny/small configs. 64 query rows keep the sgemm calls big enough to amortise their overhead
// while the causal waste (the masked upper half of diagonal tiles) stays ~BQ/2 keys per row.
#define NM_ATTN_BQ 64
#define NM_ATTN_BK 256

static void check_shapes(int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv) {
    NM_CHECK(B >= 0 && T >= 0 && H >= 0 && Dn >= 0 && Dr >= 0 && Dv >= 0, "attention shape");
    NM_CHECK(Dn + Dr >= 1 && Dn + Dr <= NM_CPU_MAX_STACK_DIM && Dv <= NM_CPU_MAX_STACK_DIM,
             "attention head dims Dn+Dr=%lld Dv=%lld (1..%d)", (long long)(Dn + Dr), (long long)Dv,
             NM_CPU_MAX_STACK_DIM);
}

// S(bq, bk) (=) scale * (q_nope . k_nope^T + q_pe . k_pe^T) for the query tile at
// q (row stride H*Dqk) and the key chunk at kv (row stride H*Dkv) / kpe (row stride Dr).
static void scores(const nm_ops *be, float *S, const float *q, const float *kv, const float *kpe, int64_t bq,
                   int64_t bk, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv, float scale) {
    const int64_t Dqk = Dn + Dr, Dkv = Dn + Dv;
    nm_cpu_gemm(be, NM_NO_TRANS, NM_TRANS, bq, bk, Dn, scale, q, H * Dqk, kv, H * Dkv, 0.0f, S, NM_ATTN_BK);
    nm_cpu_gemm(be, NM_NO_TRANS, NM_TRANS, bq, bk, Dr, scale, q + Dn, H * Dqk, kpe, Dr, 1.0f, S, NM_ATTN_BK);
}

// out(B,T,H,Dv) (=), lse(B,H,T) (=); q(B,T,H,Dn+Dr), kv(B,T,H,Dn+Dv), k_pe(B,T,Dr)
void nm_cpu_attention_forward(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                              const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                              float scale) {
    check_shapes(B, T, H, Dn, Dr, Dv);
    const int64_t Dqk = Dn + Dr, Dkv = Dn + Dv, n_tiles = (T + NM_ATTN_BQ - 1) / NM_ATTN_BQ;
    // Heaviest (last) query tiles first, so the dynamic schedule ends on light ones.
#pragma omp parallel for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t tile = n_tiles - 1; tile >= 0; tile--) {
                _Alignas(64) float S[NM_ATTN_BQ * NM_ATTN_BK]; // scores, then p, of one key chunk
                float m[NM_ATTN_BQ], l[NM_ATTN_BQ];           // running max, sum of e^(s - m)
                const int64_t i0 = tile * NM_ATTN_BQ, bq = T - i0 < NM_ATTN_BQ ? T - i0 : NM_ATTN_BQ;
                const int64_t k_end = i0 + bq;                 // causal: keys < k_end
                const float *qt = q + ((b * T + i0) * H + h) * Dqk;
                // The output rows are the P.V accumulator (fp32, row stride H*Dv).
                float *ot = out + ((b * T + i0) * H + h) * Dv;
                for (int64_t r = 0; r < bq; r++) m[r] = -INFINITY, l[r] = 0.0f;
                for (int64_t j0 = 0; j0 < k_end; j0 += NM_ATTN_BK) {
                    const int64_t bk = k_end - j0 < NM_ATTN_BK ? k_end - j0 : NM_ATTN_BK;
                    const float *kvc = kv + ((b * T + j0) * H + h) * Dkv;
                    // pass 1: scaled scores of the tile against the chunk (two sgemms)
                    scores(be, S, qt, kvc, k_pe + (b * T + j0) * Dr, bq, bk, H, Dn, Dr, Dv, scale);
                    // pass 2: per row, causal mask, new max, p = e^(s - m), rescale l and out
                    for (int64_t r = 0; r < bq; r++) {
                        float *s = S + r * NM_ATTN_BK;
                        int64_t n = i0 + r + 1 - j0; // visible keys of this row in the chunk
                        n = n < 0 ? 0 : n > bk ? bk : n;
                        float mx = m[r];
#pragma omp simd reduction(max : mx)
                        for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
                        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                        for (int64_t j = 0; j < n; j++) {
                            s[j] = nm_expf(s[j] - mx);
                            sum += s[j];
                        }
                        for (int64_t j = n; j < bk; j++) s[j] = 0.0f;
                        if (n > 0 && j0 > 0 && mx > m[r]) {
                            // the max grew: what was summed under the old one shrinks by e^(m - mx)
                            float c = nm_expf(m[r] - mx), *o = ot + r * H * Dv;
                            l[r] *= c;
                            for (int64_t d = 0; d < Dv; d++) o[d] *= c;
                        }
                        l[r] += sum;
                        m[r] = mx;
                    }
                    // pass 3: out_tile (+)= P . V_chunk (the first chunk overwrites)
                    nm_cpu_gemm(be, NM_NO_TRANS, NM_NO_TRANS, bq, Dv, bk, 1.0f, S, NM_ATTN_BK, kvc + Dn, H * Dkv,
                                j0 == 0 ? 0.0f : 1.0f, ot, H * Dv);
                }
                // pass 4: normalise, save lse (row i always sees key 0, so l >= 1)
                for (int64_t r = 0; r < bq; r++) {
                    float *o = ot + r * H * Dv, inv = 1.0f / l[r];
                    for (int64_t d = 0; d < Dv; d++) o[d] *= inv;
                    lse[(b * H + h) * T + i0 + r] = (float)((double)m[r] + log((double)l[r]));
                }
            }
        }
    }
}

// dq(B,T,H,Dn+Dr) (=), dkv(B,T,H,Dn+Dv) (=), dk_pe(B,T,Dr) (=), scratch(B,H,T,Dr);
// dout(B,T,H,Dv), q, kv, k_pe, out(B,T,H,Dv), lse(B,H,T)
void nm_cpu_attention_backward(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch, const float *dout,
                               const float *q, const float *kv, const float *k_pe, const float *out,
                               const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn,
                               int64_t Dr, int64_t Dv, float scale) {
    check_shapes(B, T, H, Dn, Dr, Dv);
    const int64_t Dqk = Dn + Dr, Dkv = Dn + Dv;
    // Forward: s_ij = scale * q_i.k_j, p_ij = exp(s_ij - lse_i), out_i = sum_j p_ij v_j.
    //   dv_j = sum_i p_ij dout_i;  dp_ij = dout_i . v_j;
    //   ds_ij = p_ij (dp_ij - D_i) with D_i = sum_j p_ij dp_ij = dout_i . out_i;
    //   dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i.
    // One unit per (b, h): it owns dq/dkv of head h in batch b and scratch(b, h), so dk and dv
    // accumulate across query tiles in a fixed order without atomics. (Splitting the query
    // tiles of one head over threads would need a second reduction; B*H units suffice here.)
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            _Alignas(64) float P[NM_ATTN_BQ * NM_ATTN_BK];  // scores, then p
            _Alignas(64) float dS[NM_ATTN_BQ * NM_ATTN_BK]; // dp, then ds
            float Di[NM_ATTN_BQ], Li[NM_ATTN_BQ];
            float *dkpe = scratch + (b * H + h) * T * Dr; // (T, Dr) this head's dk_pe
            for (int64_t t = 0; t < T; t++) {
                float *dkvt = dkv + ((b * T + t) * H + h) * Dkv;
                for (int64_t d = 0; d < Dkv; d++) dkvt[d] = 0.0f;
            }
            for (int64_t x = 0; x < T * Dr; x++) dkpe[x] = 0.0f;
            for (int64_t i0 = 0; i0 < T; i0 += NM_ATTN_BQ) {
                const int64_t bq = T - i0 < NM_ATTN_BQ ? T - i0 : NM_ATTN_BQ, k_end = i0 + bq;
                const float *qt = q + ((b * T + i0) * H + h) * Dqk, *dot = dout + ((b * T + i0) * H + h) * Dv;
                float *dqt = dq + ((b * T + i0) * H + h) * Dqk;
                // pass 1: D_i = dout_i . out_i (double: it is subtracted from dp of similar size)
                for (int64_t r = 0; r < bq; r++) {
                    const float *o = out + ((b * T + i0 + r) * H + h) * Dv, *g = dot + r * H * Dv;
                    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                    for (int64_t d = 0; d < Dv; d++) acc += (double)g[d] * o[d];
                    Di[r] = (float)acc;
                    Li[r] = lse[(b * H + h) * T + i0 + r];
                }
                for (int64_t j0 = 0; j0 < k_end; j0 += NM_ATTN_BK) {
                    const int64_t bk = k_end - j0 < NM_ATTN_BK ? k_end - j0 : NM_ATTN_BK;
                    const float *kvc = kv + ((b * T + j0) * H + h) * Dkv, *kpec = k_pe + (b * T + j0) * Dr;
                    // pass 2: recompute p = exp(s - lse) under the causal mask
                    scores(be, P, qt, kvc, kpec, bq, bk, H, Dn, Dr, Dv, scale);
                    // pass 3: dp = dout_tile . V_chunk^T
                    nm_cpu_gemm(be, NM_NO_TRANS, NM_TRANS, bq, bk, Dv, 1.0f, dot, H * Dv, kvc + Dn, H * Dkv, 0.0f, dS,
                                NM_ATTN_BK);
                    // pass 4: ds = p (dp - D_i); masked entries are 0 in both
                    for (int64_t r = 0; r < bq; r++) {
                        float *p = P + r * NM_ATTN_BK, *ds = dS + r * NM_ATTN_BK, L = Li[r], D = Di[r];
                        int64_t n = i0 + r + 1 - j0;
                        n = n < 0 ? 0 : n > bk ? bk : n;
#pragma omp simd
                        for (int64_t j = 0; j < n; j++) {
                            p[j] = nm_expf(p[j] - L);
                            ds[j] = p[j] * (ds[j] - D);
                        }
                        for (int64_t j = n; j < bk; j++) p[j] = 0.0f, ds[j] = 0.0f;
                    }
                    // pass 5: key-side gradients of the chunk, accumulated over query tiles:
                    // dv += P^T dout_tile, dk_nope += scale dS^T q_nope, dk_pe(h) += scale dS^T q_pe
                    float *dkvc = dkv + ((b * T + j0) * H + h) * Dkv;
                    nm_cpu_gemm(be, NM_TRANS, NM_NO_TRANS, bk, Dv, bq, 1.0f, P, NM_ATTN_BK, dot, H * Dv, 1.0f, dkvc + Dn,
                                H * Dkv);
                    nm_cpu_gemm(be, NM_TRANS, NM_NO_TRANS, bk, Dn, bq, scale, dS, NM_ATTN_BK, qt, H * Dqk, 1.0f, dkvc,
                                H * Dkv);
                    nm_cpu_gemm(be, NM_TRANS, NM_NO_TRANS, bk, Dr, bq, scale, dS, NM_ATTN_BK, qt + Dn, H * Dqk, 1.0f,
                                dkpe + j0 * Dr, Dr);
                    // pass 6: dq_tile (+)= scale dS [k_nope | k_pe] (the first chunk overwrites)
                    float beta = j0 == 0 ? 0.0f : 1.0f;
                    nm_cpu_gemm(be, NM_NO_TRANS, NM_NO_TRANS, bq, Dn, bk, scale, dS, NM_ATTN_BK, kvc, H * Dkv, beta, dqt,
                                H * Dqk);
                    nm_cpu_gemm(be, NM_NO_TRANS, NM_NO_TRANS, bq, Dr, bk, scale, dS, NM_ATTN_BK, kpec, Dr, beta, dqt + Dn,
                                H * Dqk);
                }
            }
        }
    }

    // pass 7: the shared k_pe's gradient is the sum over heads, in head order.
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; bt++) {
        int64_t b = bt / T, t = bt % T;
        for (int64_t d = 0; d < Dr; d++) {
            double s = 0.0;
            for (int64_t h = 0; h < H; h++) s += scratch[((b * H + h) * T + t) * Dr + d];
            dk_pe[bt * Dr + d] = (float)s;
        }
    }
}
