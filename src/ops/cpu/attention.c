// attention.c: MLA causal attention core on the CPU (dsv3-spec 3.2 steps 7-9, 7), flash style.
//
//   score(i,j) = scale * (q_nope_i . k_nope_j + q_pe_i . k_pe_j), j <= i;  P = softmax_j;
//   out_i = sum_j P_ij v_j;  lse_i = log sum_j exp(score(i,j)) saved for the backward.
//
// Layouts (ops.h): q(B,T,H,Dn+Dr) per head [q_nope | q_pe]; kv(B,T,H,Dn+Dv) per head
// [k_nope | v]; k_pe(B,T,Dr) shared by all heads (MLA's decoupled rope key). The RoPE and the
// projections around it are other ops.
//
// No T x T matrix is ever stored: the forward runs an online softmax (running max m and sum l,
// rescaling the output accumulator when m grows), the backward recomputes
// p_ij = exp(score(i,j) - lse_i). Every dot product and accumulator is double, so the fp32
// result is within a few ulps of a float64 reference (the only fp32 roundings are the inputs,
// the saved lse and the outputs); this file is the reference the CUDA kernels are tested
// against, and the cost (scalar double loops) is acceptable for the CPU path.
//
// Determinism without atomics: each output element is owned by exactly one loop iteration.
// dk/dv of key j are summed over queries i >= j inside the iteration that owns key j; the
// shared dk_pe gets per-head partials in scratch(B,H,T,Dr), summed over heads in head order.
#include <math.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"

// Unscaled q_i . k_j over the nope channels (k_nope from kv) and the rope channels (k_pe).
// The simd reductions allow the compiler to vectorise the double sums without -ffast-math;
// the summation order is fixed at compile time, so results stay deterministic.
static inline double qk_dot(const float *qi, const float *kv_j, const float *kpe_j, int64_t Dn, int64_t Dr) {
    double s = 0.0, t = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < Dn; d++) s += (double)qi[d] * kv_j[d];
#pragma omp simd reduction(+ : t)
    for (int64_t d = 0; d < Dr; d++) t += (double)qi[Dn + d] * kpe_j[d];
    return s + t;
}

static inline double dot_f(const float *a, const float *b, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; d++) s += (double)a[d] * b[d];
    return s;
}

static void check_shapes(int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv) {
    NM_CHECK(B >= 0 && T >= 0 && H >= 0 && Dn >= 0 && Dr >= 0 && Dv >= 0, "attention shape");
    NM_CHECK(Dn + Dr >= 1 && Dn + Dr <= NM_CPU_MAX_STACK_DIM && Dv <= NM_CPU_MAX_STACK_DIM,
             "attention head dims Dn+Dr=%lld Dv=%lld (1..%d)", (long long)(Dn + Dr), (long long)Dv,
             NM_CPU_MAX_STACK_DIM);
}

// out(B,T,H,Dv) (=), lse(B,H,T) (=); q(B,T,H,Dn+Dr), kv(B,T,H,Dn+Dv), k_pe(B,T,Dr)
void nm_cpu_attention_forward(float *out, float *lse, const float *q, const float *kv, const float *k_pe,
                              int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                              float scale) {
    check_shapes(B, T, H, Dn, Dr, Dv);
    const int64_t Dqk = Dn + Dr, Dkv = Dn + Dv;
    // Query rows are independent; causal rows have unequal cost, hence dynamic scheduling
    // (the result does not depend on the schedule).
#pragma omp parallel for collapse(3) schedule(dynamic, 8)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < T; i++) {
                const float *qi = q + ((b * T + i) * H + h) * Dqk;
                double acc[NM_CPU_MAX_STACK_DIM];   // (Dv) unnormalised sum_j e^(s_ij - m) v_j
                for (int64_t d = 0; d < Dv; d++) acc[d] = 0.0;
                double m = -INFINITY, l = 0.0;      // running max and sum of e^(s - m)
                for (int64_t j = 0; j <= i; j++) {
                    const float *kvj = kv + ((b * T + j) * H + h) * Dkv;
                    double s = scale * qk_dot(qi, kvj, k_pe + (b * T + j) * Dr, Dn, Dr);
                    if (s > m) {
                        // new running max: rescale what was summed under the old one
                        double c = exp(m - s);
                        l *= c;
                        for (int64_t d = 0; d < Dv; d++) acc[d] *= c;
                        m = s;
                    }
                    double p = exp(s - m);
                    l += p;
                    const float *vj = kvj + Dn;
                    for (int64_t d = 0; d < Dv; d++) acc[d] += p * vj[d];
                }
                float *oi = out + ((b * T + i) * H + h) * Dv;
                for (int64_t d = 0; d < Dv; d++) oi[d] = (float)(acc[d] / l);
                lse[(b * H + h) * T + i] = (float)(m + log(l));
            }
        }
    }
}

// dq(B,T,H,Dn+Dr) (=), dkv(B,T,H,Dn+Dv) (=), dk_pe(B,T,Dr) (=), scratch(B,H,T,Dr);
// dout(B,T,H,Dv), q, kv, k_pe, out(B,T,H,Dv), lse(B,H,T)
void nm_cpu_attention_backward(float *dq, float *dkv, float *dk_pe, float *scratch, const float *dout,
                               const float *q, const float *kv, const float *k_pe, const float *out,
                               const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn,
                               int64_t Dr, int64_t Dv, float scale) {
    check_shapes(B, T, H, Dn, Dr, Dv);
    const int64_t Dqk = Dn + Dr, Dkv = Dn + Dv;
    // Forward: s_ij = scale * q_i.k_j, p_ij = exp(s_ij - lse_i), out_i = sum_j p_ij v_j.
    //   dv_j = sum_i p_ij dout_i;  dp_ij = dout_i . v_j;
    //   ds_ij = p_ij (dp_ij - D_i) with D_i = sum_j p_ij dp_ij = dout_i . out_i;
    //   dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i.

    // pass 1: D_i for every (b, i, h), parked in dq[b, i, h, 0] (dq is written last, by the
    // iteration that owns the row and reads D_i first), so no extra scratch is needed.
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t bi = 0; bi < B * T; bi++) {
        for (int64_t h = 0; h < H; h++) {
            int64_t row = bi * H + h;
            dq[row * Dqk] = (float)dot_f(dout + row * Dv, out + row * Dv, Dv);
        }
    }

    // pass 2: per key j and head h, dk_nope and dv into dkv, the head's dk_pe into scratch.
#pragma omp parallel for collapse(3) schedule(dynamic, 8)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t j = 0; j < T; j++) {
                const float *kvj = kv + ((b * T + j) * H + h) * Dkv, *vj = kvj + Dn;
                const float *kpej = k_pe + (b * T + j) * Dr;
                double acc_k[NM_CPU_MAX_STACK_DIM]; // (Dn+Dr) sum_i ds_ij q_i
                double acc_v[NM_CPU_MAX_STACK_DIM]; // (Dv)    sum_i p_ij dout_i
                for (int64_t d = 0; d < Dqk; d++) acc_k[d] = 0.0;
                for (int64_t d = 0; d < Dv; d++) acc_v[d] = 0.0;
                for (int64_t i = j; i < T; i++) {
                    int64_t row = (b * T + i) * H + h;
                    const float *qi = q + row * Dqk, *doi = dout + row * Dv;
                    double p = exp(scale * qk_dot(qi, kvj, kpej, Dn, Dr) - lse[(b * H + h) * T + i]);
                    double ds = p * (dot_f(doi, vj, Dv) - dq[row * Dqk]);
                    for (int64_t d = 0; d < Dv; d++) acc_v[d] += p * doi[d];
                    for (int64_t d = 0; d < Dqk; d++) acc_k[d] += ds * qi[d];
                }
                float *dkvj = dkv + ((b * T + j) * H + h) * Dkv;
                for (int64_t d = 0; d < Dn; d++) dkvj[d] = (float)(scale * acc_k[d]);
                for (int64_t d = 0; d < Dv; d++) dkvj[Dn + d] = (float)acc_v[d];
                float *sc = scratch + ((b * H + h) * T + j) * Dr;
                for (int64_t d = 0; d < Dr; d++) sc[d] = (float)(scale * acc_k[Dn + d]);
            }
        }
    }

    // pass 3: dq per query row (overwrites the parked D_i).
#pragma omp parallel for collapse(3) schedule(dynamic, 8)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < T; i++) {
                int64_t row = (b * T + i) * H + h;
                const float *qi = q + row * Dqk, *doi = dout + row * Dv;
                double Di = dq[row * Dqk], li = lse[(b * H + h) * T + i];
                double acc[NM_CPU_MAX_STACK_DIM]; // (Dn+Dr) sum_j ds_ij k_j
                for (int64_t d = 0; d < Dqk; d++) acc[d] = 0.0;
                for (int64_t j = 0; j <= i; j++) {
                    const float *kvj = kv + ((b * T + j) * H + h) * Dkv;
                    const float *kpej = k_pe + (b * T + j) * Dr;
                    double p = exp(scale * qk_dot(qi, kvj, kpej, Dn, Dr) - li);
                    double ds = p * (dot_f(doi, kvj + Dn, Dv) - Di);
                    for (int64_t d = 0; d < Dn; d++) acc[d] += ds * kvj[d];
                    for (int64_t d = 0; d < Dr; d++) acc[Dn + d] += ds * kpej[d];
                }
                float *dqi = dq + row * Dqk;
                for (int64_t d = 0; d < Dqk; d++) dqi[d] = (float)(scale * acc[d]);
            }
        }
    }

    // pass 4: the shared k_pe's gradient is the sum over heads, in head order.
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
