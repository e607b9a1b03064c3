// xent.cu: the CUDA backend's softmax cross-entropy over the vocabulary (dsv3-spec 3.1, 7, 11;
// src/ops/ref/xent.c is the definition):
//   lse_n = log sum_v exp(l_nv),  loss_n = lse_n - l_n[target_n],  loss 0 where target_n < 0;
//   dl_nv = scale * (exp(l_nv - lse_n) - [v == target_n]), with the forward's saved lse.
// One thread block per row for the forward (max, then exp-sum, in double, fixed-order block
// reductions), one thread per element for the backward. Vocabulary tiles merge each tile's
// (max, sum) into the row's running stats(N, 3) (double, in the caller's buffer) as the
// reference does. Targets are checked against V on the host, as the reference checks them:
// they live in host-readable memory (managed, or the caller's host buffer, staged for the
// kernels). Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

// --- kernels ----------------------------------------------------------------------------------------

// Block n: losses[n], lse[n] from the tile logits(n, 0:Vt) (ld); whole-row xent is one tile.
// stats may be NULL (whole row: first and last at once).
static __global__ void xent_forward_kernel(float *losses, float *lse, double *stats, const float *logits, int64_t ld,
                                           const int32_t *targets, int64_t v0, int64_t Vt, int first, int last) {
    __shared__ double red[NM_CUDA_THREADS];
    const int64_t n = blockIdx.x;
    const int32_t tgt = targets[n];
    if (tgt < 0) {  // block-uniform: the whole block leaves together
        if (last && threadIdx.x == 0) losses[n] = 0.0f, lse[n] = 0.0f;  // lse never read for these rows
        return;
    }
    const float *l = logits + n * ld;
    // pass 1: the tile's max; pass 2: its exp-sum
    double m = -INFINITY;
    for (int64_t v = threadIdx.x; v < Vt; v += blockDim.x) m = fmax(m, (double)l[v]);
    const double mt = nm_dev_block_max(m, red);
    double s = 0.0;
    for (int64_t v = threadIdx.x; v < Vt; v += blockDim.x) s += exp(l[v] - mt);
    const double st = nm_dev_block_sum(s, red);
    if (threadIdx.x != 0) return;
    double run_m = mt, run_s = st, run_t = 0.0;
    if (stats) {
        double *S = stats + 3 * n;
        if (first) {
            S[0] = mt;
            S[1] = st;
        } else {
            // m' = max(m, m_t), s' = s e^(m - m') + s_t e^(m_t - m')
            double mm = fmax(S[0], mt);
            S[1] = S[1] * exp(S[0] - mm) + st * exp(mt - mm);
            S[0] = mm;
        }
        if (tgt >= v0 && tgt < v0 + Vt) S[2] = l[tgt - v0];
        run_m = S[0], run_s = S[1], run_t = S[2];
    } else {
        run_t = l[tgt];
    }
    if (last) {
        losses[n] = (float)(log(run_s) + run_m - run_t);
        lse[n] = (float)(log(run_s) + run_m);
    }
}

// dlogits(N, Vt) (=, ld_d; may alias logits: element v is read only to write v)
static __global__ void xent_backward_kernel(float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                                            const float *lse, const int32_t *targets, float scale, int64_t N,
                                            int64_t v0, int64_t Vt) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * Vt; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = i / Vt, v = i % Vt;
        const int32_t tgt = targets[n];
        double onehot = tgt == v0 + v ? 1.0 : 0.0;
        double p = exp((double)logits[n * ld + v] - lse[n]);
        dlogits[n * ld_d + v] = tgt < 0 ? 0.0f : (float)(scale * (p - onehot));
    }
}

// --- launchers ----------------------------------------------------------------------------------------

// targets(N) < V, read on the host (file comment); the device's copy returned
static const int32_t *device_targets(const nm_ops *be, const int32_t *targets, int64_t N, int64_t V) {
    for (int64_t n = 0; n < N; n++)
        NM_CHECK(targets[n] < V, "target %lld is %d >= V=%lld", (long long)n, targets[n], (long long)V);
    return (const int32_t *)nm_cuda_readable(be, targets, (size_t)N * sizeof(int32_t), NM_CUDA_SCRATCH_STAGE0);
}

void nm_cuda_xent_forward(const nm_ops *be, float *losses, float *lse, const float *logits, const int32_t *targets,
                          int64_t N, int64_t V) {
    NM_CHECK(N >= 0 && V > 0 && N <= INT32_MAX, "xent shape N=%lld V=%lld", (long long)N, (long long)V);
    const int32_t *t = device_targets(be, targets, N, V);
    if (N > 0)
        xent_forward_kernel<<<(unsigned)N, NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(losses, lse, NULL, logits, V, t, 0, V,
                                                                                 1, 1);
    NM_CUDA_OP_DONE("xent_forward");
}

void nm_cuda_xent_backward(const nm_ops *be, float *dlogits, const float *logits, const float *lse,
                           const int32_t *targets, float scale, int64_t N, int64_t V) {
    nm_cuda_xent_tile_backward(be, dlogits, V, logits, V, lse, targets, scale, N, V, 0, V);
}

void nm_cuda_xent_tile_forward(const nm_ops *be, float *losses, float *lse, double *stats, const float *logits,
                               int64_t ld, const int32_t *targets, int64_t N, int64_t V, int64_t v0, int64_t Vt) {
    NM_CHECK(N >= 0 && V > 0 && v0 >= 0 && Vt > 0 && v0 + Vt <= V && ld >= Vt && N <= INT32_MAX,
             "xent tile shape N=%lld V=%lld v0=%lld Vt=%lld ld=%lld", (long long)N, (long long)V, (long long)v0,
             (long long)Vt, (long long)ld);
    const int32_t *t = device_targets(be, targets, N, V);
    if (N > 0)
        xent_forward_kernel<<<(unsigned)N, NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(losses, lse, stats, logits, ld, t, v0,
                                                                                 Vt, v0 == 0, v0 + Vt == V);
    NM_CUDA_OP_DONE("xent_tile_forward");
}

void nm_cuda_xent_tile_backward(const nm_ops *be, float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                                const float *lse, const int32_t *targets, float scale, int64_t N, int64_t V, int64_t v0,
                                int64_t Vt) {
    NM_CHECK(N >= 0 && V > 0 && v0 >= 0 && Vt > 0 && v0 + Vt <= V && ld >= Vt && ld_d >= Vt,
             "xent tile shape N=%lld V=%lld v0=%lld Vt=%lld", (long long)N, (long long)V, (long long)v0,
             (long long)Vt);
    const int32_t *t = device_targets(be, targets, N, V);
    if (N * Vt > 0)
        xent_backward_kernel<<<nm_cuda_blocks(N * Vt, 256), 256, 0, NM_CUDA_STREAM>>>(dlogits, ld_d, logits, ld, lse, t,
                                                                                     scale, N, v0, Vt);
    NM_CUDA_OP_DONE("xent_tile_backward");
}
