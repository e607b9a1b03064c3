// rmsnorm.c: reference RMSNorm (dsv3-spec 3.1, 7): out = w * (x * rstd), with
// rstd = 1 / sqrt(mean(x^2) + eps). Row sums are in double; rstd is stored in fp32 (the saved
// activation the backward reads, ops.h) and the outputs are formed from that fp32 rstd as the
// contract's formula reads.
#include <math.h>

#include "core/check.h"
#include "ops/ref/ref_ops.h"

// out(N,D) (=), rstd(N) (=); inp(N,D), w(D)
void nm_ref_rmsnorm_forward(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                            int64_t D, float eps) {
    NM_CHECK(N >= 0 && D > 0, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D;
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) ss += (double)x[d] * x[d];
        float r = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
        for (int64_t d = 0; d < D; d++) out[n * D + d] = w[d] * (x[d] * r);
        rstd[n] = r;
    }
}

// dinp(N,D) (+=), dw(D) (+=); dout(N,D), inp(N,D), w(D), rstd(N)
void nm_ref_rmsnorm_backward(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int64_t N, int64_t D) {
    NM_CHECK(N >= 0 && D > 0, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
    // out = w * xn with xn = x * rstd (rstd depends on x):
    //   g = dout * w;  dx = (g - xn * mean(g * xn)) * rstd;  dw = sum over rows of dout * xn
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D, *dy = dout + n * D;
        const double rs = rstd[n];
        double gxn = 0.0;
        for (int64_t d = 0; d < D; d++) gxn += (double)dy[d] * w[d] * (x[d] * rs);
        const double mean_gxn = gxn / (double)D;
        for (int64_t d = 0; d < D; d++) {
            double xn = x[d] * rs;
            dinp[n * D + d] += (float)(((double)dy[d] * w[d] - xn * mean_gxn) * rs);
        }
    }
    for (int64_t d = 0; d < D; d++) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++) acc += (double)dout[n * D + d] * (inp[n * D + d] * (double)rstd[n]);
        dw[d] += (float)acc;
    }
}
