// attention.cu: the CUDA backend's MLA causal attention (dsv3-spec 3.2 steps 7-9, 7;
// src/ops/ref/attention.c is the definition, with its formulas):
//
//   s_ij = scale * (q_nope_i . k_nope_j + q_pe_i . k_pe_j)   for j <= i (causal)
//   p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij),  out_i = sum_j p_ij v_j
//
// A straightforward kernel, correct first: one thread block per (b, h, query row i) for the
// forward and dq, per (b, h, key row j) for dk_nope and dv, per (b, key row j) for dk_pe (summed
// over the heads). Scores are recomputed where needed (no T x T matrix: ops never allocate),
// each one by one thread in double in the reference's order; the threads take the keys (or
// queries) of a chunk of NM_CUDA_THREADS side by side, then each output channel is summed by
// its own thread over the chunk in key order, so every output is the reference's sum in the
// reference's order. Only the softmax's max and exp-sum go through a block reduction.
//
// What is to come instead (issue 29): cuDNN's fused SDPA (q/k head dim 192, v 128 as
// DeepSeek-V3 has them) and a tiled flash-style kernel of our own where cuDNN does not take
// the shape. This one does O(T^2 (Dn + Dr + Dv)) work per head with no reuse through shared
// memory: a reference on the device, not a fast path. The scratch argument is not needed.
// Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

typedef struct attn {
    const float *q, *kv, *k_pe, *dout, *out, *lse;
    int64_t T, H, Dn, Dr, Dv;
    double scale;
} attn;

#define CH NM_CUDA_THREADS  // keys (or queries) per chunk: one per thread

static __device__ const float *q_row(const attn &a, int64_t b, int64_t t, int64_t h) {
    return a.q + ((b * a.T + t) * a.H + h) * (a.Dn + a.Dr);
}
static __device__ const float *kv_row(const attn &a, int64_t b, int64_t t, int64_t h) {
    return a.kv + ((b * a.T + t) * a.H + h) * (a.Dn + a.Dv);
}
static __device__ const float *kpe_row(const attn &a, int64_t b, int64_t t) { return a.k_pe + (b * a.T + t) * a.Dr; }

// s_ij of head h in sequence b, summed as the reference sums it
static __device__ double score(const attn &a, int64_t b, int64_t h, int64_t i, int64_t j) {
    const float *qi = q_row(a, b, i, h), *kj = kv_row(a, b, j, h), *pj = kpe_row(a, b, j);
    double d = 0.0;
    for (int64_t e = 0; e < a.Dn; e++) d += (double)qi[e] * kj[e];
    for (int64_t e = 0; e < a.Dr; e++) d += (double)qi[a.Dn + e] * pj[e];
    return a.scale * d;
}

// ds_ij = p_ij (dp_ij - D_i), *p = p_ij = exp(s_ij - lse_i), dp_ij = dout_i . v_j,
// D_i = dout_i . out_i: the reference's dscore
static __device__ double dscore(const attn &a, int64_t b, int64_t h, int64_t i, int64_t j, double *p) {
    const int64_t T = a.T, H = a.H, Dv = a.Dv;
    const float *g = a.dout + ((b * T + i) * H + h) * Dv, *oi = a.out + ((b * T + i) * H + h) * Dv;
    const float *vj = kv_row(a, b, j, h) + a.Dn;
    double Di = 0.0, dp = 0.0;
    for (int64_t e = 0; e < Dv; e++) Di += (double)g[e] * oi[e];
    for (int64_t e = 0; e < Dv; e++) dp += (double)g[e] * vj[e];
    *p = exp(score(a, b, h, i, j) - (double)a.lse[(b * H + h) * T + i]);
    return *p * (dp - Di);
}

// --- forward: block (b, h, i) -------------------------------------------------------------------------

static __global__ void attention_forward_kernel(float *out, float *lse, attn a) {
    __shared__ double red[CH], pj[CH], o[NM_CUDA_MAX_ROW_DIM];  // o: (Dv) unnormalised output
    const int64_t i = blockIdx.x % a.T, h = (blockIdx.x / a.T) % a.H, b = blockIdx.x / (a.T * a.H);
    const int t = threadIdx.x;
    // pass 1: the row max, so that no exp overflows
    double m = -INFINITY;
    for (int64_t j = t; j <= i; j += CH) m = fmax(m, score(a, b, h, i, j));
    m = nm_dev_block_max(m, red);
    for (int64_t e = t; e < a.Dv; e += CH) o[e] = 0.0;
    // pass 2: chunk by chunk, p_j by thread j, then o[e] += p_j v_j[e] by thread e in key order
    double z = 0.0;
    for (int64_t j0 = 0; j0 <= i; j0 += CH) {
        const int64_t j = j0 + t;
        pj[t] = j <= i ? exp(score(a, b, h, i, j) - m) : 0.0;
        z += pj[t];
        __syncthreads();
        const int64_t nj = i - j0 + 1 < CH ? i - j0 + 1 : CH;
        for (int64_t e = t; e < a.Dv; e += CH)
            for (int64_t jj = 0; jj < nj; jj++) o[e] += pj[jj] * kv_row(a, b, j0 + jj, h)[a.Dn + e];
        __syncthreads();
    }
    z = nm_dev_block_sum(z, red);
    float *oi = out + ((b * a.T + i) * a.H + h) * a.Dv;
    for (int64_t e = t; e < a.Dv; e += CH) oi[e] = (float)(o[e] / z);
    if (t == 0) lse[(b * a.H + h) * a.T + i] = (float)(m + log(z));
}

// --- backward -----------------------------------------------------------------------------------------
// s_ij = scale (q_i . k_j) and out_i = sum_j p_ij v_j give
//   dq_i = scale sum_{j <= i} ds_ij [k_nope_j | k_pe_j]
//   dk_nope_j = scale sum_{i >= j} ds_ij q_nope_i,   dv_j = sum_{i >= j} p_ij dout_i
//   dk_pe_j = scale sum_h sum_{i >= j} ds_ij q_pe_i     (k_pe is every head's key)

// dq: block (b, h, i)
static __global__ void attention_dq_kernel(float *dq, attn a) {
    __shared__ double dsj[CH], acc[NM_CUDA_MAX_ROW_DIM];  // acc: (Dn + Dr)
    const int64_t i = blockIdx.x % a.T, h = (blockIdx.x / a.T) % a.H, b = blockIdx.x / (a.T * a.H);
    const int t = threadIdx.x;
    const int64_t Dqk = a.Dn + a.Dr;
    for (int64_t e = t; e < Dqk; e += CH) acc[e] = 0.0;
    for (int64_t j0 = 0; j0 <= i; j0 += CH) {
        const int64_t j = j0 + t;
        double p;
        dsj[t] = j <= i ? dscore(a, b, h, i, j, &p) : 0.0;
        __syncthreads();
        const int64_t nj = i - j0 + 1 < CH ? i - j0 + 1 : CH;
        for (int64_t e = t; e < Dqk; e += CH)
            for (int64_t jj = 0; jj < nj; jj++) {
                const float k = e < a.Dn ? kv_row(a, b, j0 + jj, h)[e] : kpe_row(a, b, j0 + jj)[e - a.Dn];
                acc[e] += dsj[jj] * k;
            }
        __syncthreads();
    }
    float *dqi = dq + ((b * a.T + i) * a.H + h) * Dqk;
    for (int64_t e = t; e < Dqk; e += CH) dqi[e] = (float)(a.scale * acc[e]);
}

// dk_nope and dv: block (b, h, j), queries i >= j in order
static __global__ void attention_dkv_kernel(float *dkv, attn a) {
    __shared__ double dsi[CH], pi[CH], dk[NM_CUDA_MAX_ROW_DIM], dv[NM_CUDA_MAX_ROW_DIM];  // (Dn), (Dv)
    const int64_t j = blockIdx.x % a.T, h = (blockIdx.x / a.T) % a.H, b = blockIdx.x / (a.T * a.H);
    const int t = threadIdx.x;
    for (int64_t e = t; e < a.Dn; e += CH) dk[e] = 0.0;
    for (int64_t e = t; e < a.Dv; e += CH) dv[e] = 0.0;
    for (int64_t i0 = j; i0 < a.T; i0 += CH) {
        const int64_t i = i0 + t;
        double p = 0.0;
        dsi[t] = i < a.T ? dscore(a, b, h, i, j, &p) : 0.0;
        pi[t] = p;
        __syncthreads();
        const int64_t ni = a.T - i0 < CH ? a.T - i0 : CH;
        for (int64_t e = t; e < a.Dn; e += CH)
            for (int64_t ii = 0; ii < ni; ii++) dk[e] += dsi[ii] * q_row(a, b, i0 + ii, h)[e];
        for (int64_t e = t; e < a.Dv; e += CH)
            for (int64_t ii = 0; ii < ni; ii++) dv[e] += pi[ii] * a.dout[((b * a.T + i0 + ii) * a.H + h) * a.Dv + e];
        __syncthreads();
    }
    float *dkvj = dkv + ((b * a.T + j) * a.H + h) * (a.Dn + a.Dv);
    for (int64_t e = t; e < a.Dn; e += CH) dkvj[e] = (float)(a.scale * dk[e]);
    for (int64_t e = t; e < a.Dv; e += CH) dkvj[a.Dn + e] = (float)dv[e];
}

// dk_pe: block (b, j), heads in order, queries i >= j in order within each
static __global__ void attention_dkpe_kernel(float *dk_pe, attn a) {
    __shared__ double dsi[CH], acc[NM_CUDA_MAX_ROW_DIM];  // acc: (Dr)
    const int64_t j = blockIdx.x % a.T, b = blockIdx.x / a.T;
    const int t = threadIdx.x;
    for (int64_t e = t; e < a.Dr; e += CH) acc[e] = 0.0;
    for (int64_t h = 0; h < a.H; h++)
        for (int64_t i0 = j; i0 < a.T; i0 += CH) {
            const int64_t i = i0 + t;
            double p;
            dsi[t] = i < a.T ? dscore(a, b, h, i, j, &p) : 0.0;
            __syncthreads();
            const int64_t ni = a.T - i0 < CH ? a.T - i0 : CH;
            for (int64_t e = t; e < a.Dr; e += CH)
                for (int64_t ii = 0; ii < ni; ii++) acc[e] += dsi[ii] * q_row(a, b, i0 + ii, h)[a.Dn + e];
            __syncthreads();
        }
    for (int64_t e = t; e < a.Dr; e += CH) dk_pe[(b * a.T + j) * a.Dr + e] = (float)(a.scale * acc[e]);
}

// --- launchers ----------------------------------------------------------------------------------------

static void check_shapes(int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv) {
    NM_CHECK(B >= 0 && T >= 0 && H >= 0 && Dn >= 0 && Dr >= 0 && Dv >= 0, "attention shape");
    NM_CHECK(Dn + Dr >= 1 && Dn + Dr <= NM_CUDA_MAX_ROW_DIM && Dv <= NM_CUDA_MAX_ROW_DIM,
             "attention head dims Dn+Dr=%lld Dv=%lld (1..%d)", (long long)(Dn + Dr), (long long)Dv,
             NM_CUDA_MAX_ROW_DIM);
    NM_CHECK(B * H * T <= INT32_MAX, "attention: B*H*T = %lld blocks", (long long)(B * H * T));
}

void nm_cuda_attention_forward(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                               const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                               float scale) {
    check_shapes(B, T, H, Dn, Dr, Dv);
    const attn a = {q, kv, k_pe, NULL, NULL, NULL, T, H, Dn, Dr, Dv, scale};
    if (B * H * T > 0) attention_forward_kernel<<<(unsigned)(B * H * T), CH, 0, NM_CUDA_STREAM>>>(out, lse, a);
    NM_CUDA_OP_DONE("attention_forward");
}

void nm_cuda_attention_backward(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch,
                                const float *dout, const float *q, const float *kv, const float *k_pe, const float *out,
                                const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                                float scale) {
    (void)scratch;
    check_shapes(B, T, H, Dn, Dr, Dv);
    const attn a = {q, kv, k_pe, dout, out, lse, T, H, Dn, Dr, Dv, scale};
    if (B * H * T > 0) {
        attention_dq_kernel<<<(unsigned)(B * H * T), CH, 0, NM_CUDA_STREAM>>>(dq, a);
        attention_dkv_kernel<<<(unsigned)(B * H * T), CH, 0, NM_CUDA_STREAM>>>(dkv, a);
    }
    if (B * T > 0) attention_dkpe_kernel<<<(unsigned)(B * T), CH, 0, NM_CUDA_STREAM>>>(dk_pe, a);
    NM_CUDA_OP_DONE("attention_backward");
}
