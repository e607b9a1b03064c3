// rmsnorm.c: RMSNorm forward/backward on the CPU (dsv3-spec 3.1 and 7):
//   out = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32 with the sum of
//   squares accumulated in double (a D = 7168 row summed in fp32 loses ~3 digits).
// Matches torch.nn.functional.rms_norm / HF DeepseekV3RMSNorm in fp32 (HF's cast of the
// normalised x to the activation dtype is a no-op in fp32).
//
// Backward is deterministic: dinp is row-parallel (rows are independent); dw sums over all
// rows, so it is column-parallel with every thread walking the rows in order.
#include <math.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"

#define SLAB 64 // columns per thread-owned slab of dw

// out(N,D) (=), rstd(N) (=); inp(N,D), w(D)
void nm_cpu_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int64_t N,
                            int64_t D, float eps) {
    NM_CHECK(N >= 0 && D > 0, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D;
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) ss += (double)x[d] * x[d];
        float r = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
        float *o = out + n * D;
        for (int64_t d = 0; d < D; d++) o[d] = w[d] * (x[d] * r);
        rstd[n] = r;
    }
}

// dinp(N,D) (+=), dw(D) (+=); dout(N,D), inp(N,D), w(D), rstd(N)
void nm_cpu_rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int64_t N, int64_t D) {
    NM_CHECK(N >= 0 && D > 0, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
    // out = w * n, n = x * rstd:
    //   g = dout * w;  dx = (g - n * mean(g * n)) * rstd;  dw = sum_rows dout * n
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < N; r++) {
        const float *x = inp + r * D, *dy = dout + r * D;
        double rs = rstd[r], gn = 0.0;
        for (int64_t d = 0; d < D; d++) gn += (double)dy[d] * w[d] * (x[d] * rs);
        double mean_gn = gn / (double)D;
        float *dx = dinp + r * D;
        for (int64_t d = 0; d < D; d++) {
            double nd = x[d] * rs;
            dx[d] += (float)(((double)dy[d] * w[d] - nd * mean_gn) * rs);
        }
    }
    int64_t n_slabs = (D + SLAB - 1) / SLAB;
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n_slabs; s++) {
        int64_t c0 = s * SLAB, c1 = c0 + SLAB < D ? c0 + SLAB : D;
        double acc[SLAB] = {0};
        for (int64_t r = 0; r < N; r++) {
            const float *x = inp + r * D, *dy = dout + r * D;
            double rs = rstd[r];
            for (int64_t c = c0; c < c1; c++) acc[c - c0] += (double)dy[c] * (x[c] * rs);
        }
        for (int64_t c = c0; c < c1; c++) dw[c] += (float)acc[c - c0];
    }
}
