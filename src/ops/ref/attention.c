// attention.c: reference MLA causal attention (dsv3-spec 3.2 steps 7-9, 7), the formulas of
// ops.h written out one query (or key) at a time, with every sum in double:
//
//   s_ij = scale * (q_nope_i . k_nope_j + q_pe_i . k_pe_j)   for j <= i (causal)
//   p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
//   out_i = sum_j p_ij v_j
//
// Layouts (ops.h): q(B,T,H,Dn+Dr) per head [q_nope | q_pe]; kv(B,T,H,Dn+Dv) per head
// [k_nope | v]; k_pe(B,T,Dr), one rope key shared by all heads (MLA's decoupled key).
//
// No T x T matrix is stored (ops never allocate and T is unbounded): a score is recomputed
// where it is needed, which costs a few extra dot products per (i, j) pair and keeps every
// output one plain sum. The backward is organised by output: dq_i sums over its keys j <= i,
// dk_j and dv_j over their queries i >= j, dk_pe_j over the heads as well. Its scratch
// argument is not needed.
#include <math.h>

#include "core/check.h"
#include "ops/ref/ref_ops.h"

typedef struct attn {
    const float *q, *kv, *k_pe;
    int64_t T, H, Dn, Dr, Dv;
    double scale;
} attn;

static const float *q_row(const attn *a, int64_t b, int64_t t, int64_t h) {
    return a->q + ((b * a->T + t) * a->H + h) * (a->Dn + a->Dr);
}
static const float *kv_row(const attn *a, int64_t b, int64_t t, int64_t h) {
    return a->kv + ((b * a->T + t) * a->H + h) * (a->Dn + a->Dv);
}
static const float *kpe_row(const attn *a, int64_t b, int64_t t) { return a->k_pe + (b * a->T + t) * a->Dr; }

// s_ij of head h in sequence b.
static double score(const attn *a, int64_t b, int64_t h, int64_t i, int64_t j) {
    const float *qi = q_row(a, b, i, h), *kj = kv_row(a, b, j, h), *pj = kpe_row(a, b, j);
    double d = 0.0;
    for (int64_t e = 0; e < a->Dn; e++) d += (double)qi[e] * kj[e];
    for (int64_t e = 0; e < a->Dr; e++) d += (double)qi[a->Dn + e] * pj[e];
    return a->scale * d;
}

static void check_shapes(int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv) {
    NM_CHECK(B >= 0 && T >= 0 && H >= 0 && Dn >= 0 && Dr >= 0 && Dv >= 0, "attention shape");
    NM_CHECK(Dn + Dr >= 1 && Dn + Dr <= NM_REF_MAX_ROW_DIM && Dv <= NM_REF_MAX_ROW_DIM,
             "attention head dims Dn+Dr=%lld Dv=%lld (1..%d)", (long long)(Dn + Dr), (long long)Dv,
             NM_REF_MAX_ROW_DIM);
}

// out(B,T,H,Dv) (=), lse(B,H,T) (=); q(B,T,H,Dn+Dr), kv(B,T,H,Dn+Dv), k_pe(B,T,Dr)
void nm_ref_attention_forward(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                              const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                              float scale) {
    check_shapes(B, T, H, Dn, Dr, Dv);
    const attn a = {q, kv, k_pe, T, H, Dn, Dr, Dv, scale};
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < T; i++) {
                // the row max first, so that no exp overflows
                double m = -INFINITY;
                for (int64_t j = 0; j <= i; j++) m = fmax(m, score(&a, b, h, i, j));
                double z = 0.0, o[NM_REF_MAX_ROW_DIM] = {0}; // (Dv) unnormalised output
                for (int64_t j = 0; j <= i; j++) {
                    double p = exp(score(&a, b, h, i, j) - m);
                    const float *v = kv_row(&a, b, j, h) + Dn;
                    z += p;
                    for (int64_t e = 0; e < Dv; e++) o[e] += p * v[e];
                }
                float *oi = out + ((b * T + i) * H + h) * Dv;
                for (int64_t e = 0; e < Dv; e++) oi[e] = (float)(o[e] / z);
                lse[(b * H + h) * T + i] = (float)(m + log(z));
            }
}

// ds_ij = p_ij (dp_ij - D_i) of head h in sequence b, with p_ij = exp(s_ij - lse_i) (*p gets it),
// dp_ij = dout_i . v_j and D_i = dout_i . out_i (= sum_j p_ij dp_ij). dout, out and lse as
// the backward receives them.
static double dscore(const attn *a, const float *dout, const float *out, const float *lse, int64_t b, int64_t h,
                     int64_t i, int64_t j, double *p) {
    const int64_t T = a->T, H = a->H, Dv = a->Dv;
    const float *g = dout + ((b * T + i) * H + h) * Dv, *oi = out + ((b * T + i) * H + h) * Dv;
    const float *vj = kv_row(a, b, j, h) + a->Dn;
    double Di = 0.0, dp = 0.0;
    for (int64_t e = 0; e < Dv; e++) Di += (double)g[e] * oi[e];
    for (int64_t e = 0; e < Dv; e++) dp += (double)g[e] * vj[e];
    *p = exp(score(a, b, h, i, j) - (double)lse[(b * H + h) * T + i]);
    return *p * (dp - Di);
}

// dq(B,T,H,Dn+Dr) (=), dkv(B,T,H,Dn+Dv) (=), dk_pe(B,T,Dr) (=); dout(B,T,H,Dv), q, kv, k_pe,
// out(B,T,H,Dv), lse(B,H,T) from the forward
void nm_ref_attention_backward(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch, const float *dout,
                               const float *q, const float *kv, const float *k_pe, const float *out,
                               const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr,
                               int64_t Dv, float scale) {
    (void)scratch;
    check_shapes(B, T, H, Dn, Dr, Dv);
    const attn a = {q, kv, k_pe, T, H, Dn, Dr, Dv, scale};
    const int64_t Dqk = Dn + Dr, Dkv = Dn + Dv;
    // s_ij = scale (q_i . k_j) and out_i = sum_j p_ij v_j give
    //   dq_i = scale sum_{j <= i} ds_ij [k_nope_j | k_pe_j]
    //   dk_nope_j = scale sum_{i >= j} ds_ij q_nope_i,   dv_j = sum_{i >= j} p_ij dout_i
    //   dk_pe_j = scale sum_h sum_{i >= j} ds_ij q_pe_i     (k_pe is every head's key)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < T; i++) {
                double acc[NM_REF_MAX_ROW_DIM] = {0}; // (Dqk)
                for (int64_t j = 0; j <= i; j++) {
                    double p, ds = dscore(&a, dout, out, lse, b, h, i, j, &p);
                    const float *kj = kv_row(&a, b, j, h), *pj = kpe_row(&a, b, j);
                    for (int64_t e = 0; e < Dn; e++) acc[e] += ds * kj[e];
                    for (int64_t e = 0; e < Dr; e++) acc[Dn + e] += ds * pj[e];
                }
                float *dqi = dq + ((b * T + i) * H + h) * Dqk;
                for (int64_t e = 0; e < Dqk; e++) dqi[e] = (float)(a.scale * acc[e]);
            }
            for (int64_t j = 0; j < T; j++) {
                double dk[NM_REF_MAX_ROW_DIM] = {0}, dv[NM_REF_MAX_ROW_DIM] = {0}; // (Dn), (Dv)
                for (int64_t i = j; i < T; i++) {
                    double p, ds = dscore(&a, dout, out, lse, b, h, i, j, &p);
                    const float *qi = q_row(&a, b, i, h), *g = dout + ((b * T + i) * H + h) * Dv;
                    for (int64_t e = 0; e < Dn; e++) dk[e] += ds * qi[e];
                    for (int64_t e = 0; e < Dv; e++) dv[e] += p * g[e];
                }
                float *dkvj = dkv + ((b * T + j) * H + h) * Dkv;
                for (int64_t e = 0; e < Dn; e++) dkvj[e] = (float)(a.scale * dk[e]);
                for (int64_t e = 0; e < Dv; e++) dkvj[Dn + e] = (float)dv[e];
            }
        }
        for (int64_t j = 0; j < T; j++) {
            double acc[NM_REF_MAX_ROW_DIM] = {0}; // (Dr)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = j; i < T; i++) {
                    double p, ds = dscore(&a, dout, out, lse, b, h, i, j, &p);
                    const float *qi = q_row(&a, b, i, h);
                    for (int64_t e = 0; e < Dr; e++) acc[e] += ds * qi[Dn + e];
                }
            for (int64_t e = 0; e < Dr; e++) dk_pe[(b * T + j) * Dr + e] = (float)(a.scale * acc[e]);
        }
    }
}
