// rmsnorm.cu: the CUDA backend's RMSNorm (dsv3-spec 3.1, 7; src/ops/ref/rmsnorm.c is the
// definition): out = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).
//
// One thread block per row for the forward and for the backward's input gradient: the row's
// sums in double (as the reference), reduced in a fixed tree (cuda_common.cuh), so results
// are the same run to run. The weight gradient dw(D) sums over the N rows: one thread per
// column walks the rows in order, in double (no atomics). Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

// --- kernels ----------------------------------------------------------------------------------------

// out(N,D) (=), rstd(N) (=): block n normalises row n
static __global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *inp, const float *w, int64_t D,
                                              float eps) {
    __shared__ double shm[NM_CUDA_THREADS];
    const int64_t n = blockIdx.x;
    const float *x = inp + n * D;
    // pass 1: sum of squares
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += (double)x[d] * x[d];
    ss = nm_dev_block_sum(ss, shm);
    const float r = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
    // pass 2: the outputs from the fp32 rstd, as the contract's formula reads
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) out[n * D + d] = w[d] * (x[d] * r);
    if (threadIdx.x == 0) rstd[n] = r;
}

// dinp(N,D) (+=): block n, row n. out = w * xn, xn = x * rstd:
//   g = dout * w;  dx = (g - xn * mean(g * xn)) * rstd
static __global__ void rmsnorm_dinp_kernel(float *dinp, const float *dout, const float *inp, const float *w,
                                           const float *rstd, int64_t D) {
    __shared__ double shm[NM_CUDA_THREADS];
    const int64_t n = blockIdx.x;
    const float *x = inp + n * D, *dy = dout + n * D;
    const double rs = rstd[n];
    double gxn = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) gxn += (double)dy[d] * w[d] * (x[d] * rs);
    const double mean_gxn = nm_dev_block_sum(gxn, shm) / (double)D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double xn = x[d] * rs;
        dinp[n * D + d] += (float)(((double)dy[d] * w[d] - xn * mean_gxn) * rs);
    }
}

// dw(D) (+=) sum over rows n of dout * xn: thread d walks the rows in order
static __global__ void rmsnorm_dw_kernel(float *dw, const float *dout, const float *inp, const float *rstd, int64_t N,
                                         int64_t D) {
    for (int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; d < D; d += (int64_t)gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++) acc += (double)dout[n * D + d] * (inp[n * D + d] * (double)rstd[n]);
        dw[d] += (float)acc;
    }
}

// --- launchers ----------------------------------------------------------------------------------------

void nm_cuda_rmsnorm_forward(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                             int64_t D, float eps) {
    NM_CHECK(N >= 0 && D > 0 && N <= INT32_MAX, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
    if (N > 0) rmsnorm_forward_kernel<<<(unsigned)N, NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(out, rstd, inp, w, D, eps);
    NM_CUDA_OP_DONE("rmsnorm_forward");
}

void nm_cuda_rmsnorm_backward(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                              const float *w, const float *rstd, int64_t N, int64_t D) {
    NM_CHECK(N >= 0 && D > 0 && N <= INT32_MAX, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
    if (N > 0) {
        rmsnorm_dinp_kernel<<<(unsigned)N, NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(dinp, dout, inp, w, rstd, D);
        rmsnorm_dw_kernel<<<nm_cuda_blocks(D, 128), 128, 0, NM_CUDA_STREAM>>>(dw, dout, inp, rstd, N, D);
    }
    NM_CUDA_OP_DONE("rmsnorm_backward");
}
