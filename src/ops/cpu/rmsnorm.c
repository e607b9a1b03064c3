// rmsnorm.c: RMSNorm forward/backward on the CPU (dsv3-spec 3.1 and 7):
//   out = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32 with the sum of
//   squares accumulated in double (a D = 7168 row summed in fp32 loses ~3 digits).
// Matches torch.nn.functional.rms_norm / HF DeepseekV3RMSNorm in fp32 (HF's cast of the
// normalised x to the activation dtype is a no-op in fp32).
//
// The row sums run in 16 explicit double lanes (lane j takes the elements d = j mod 16),
// combined in lane order. Without -ffast-math GCC keeps a reduction in source order, so a
// plain `ss += x*x` loop runs one dependent double add per element; the written-out lanes
// vectorise (forward 3x faster at N = 2056, D = 512, one thread; the backward 2x together
// with the wider dw slabs below; both now run close to memory bandwidth), and the result is a fixed function of the input: the same bits
// with 8- or 16-wide vectors and any thread count.
//
// Backward is deterministic: dinp is row-parallel (rows are independent); dw sums over all
// rows, so it is column-parallel with every thread walking the rows in order.
#include <math.h>
#include <omp.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/lanes.h"

#define LANES NM_CPU_LANES // explicit partial sums of a row reduction (lanes.h)
#define SLAB_MIN 64  // columns per thread-owned slab of dw: at least (small D still splits)...
#define SLAB_MAX 512 // ...and at most (the slab's double accumulators live on the stack)

// sum_d (double)x[d] * x[d] (each square is exact in double: 24 + 24 bits < 53).
static double sum_sq(const float *x, int64_t D) { return nm_cpu_dot_lanes(x, x, D); }

// sum_d dy[d] * w[d] * (x[d] * rs), the same terms the plain loop summed, in lanes.
static double sum_gn(const float *dy, const float *w, const float *x, double rs, int64_t D) {
    double acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += (double)dy[d + j] * w[d + j] * (x[d + j] * rs);
    for (int j = 0; d + j < D; j++) acc[j] += (double)dy[d + j] * w[d + j] * (x[d + j] * rs);
    double s = 0.0;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

// out(N,D) (=), rstd(N) (=); inp(N,D), w(D)
void nm_cpu_rmsnorm_forward(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                            int64_t D, float eps) {
    NM_CHECK(N >= 0 && D > 0, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D;
        float r = (float)(1.0 / sqrt(sum_sq(x, D) / (double)D + (double)eps));
        float *o = out + n * D;
        for (int64_t d = 0; d < D; d++) o[d] = w[d] * (x[d] * r);
        rstd[n] = r;
    }
}

// dinp(N,D) (+=), dw(D) (+=); dout(N,D), inp(N,D), w(D), rstd(N)
void nm_cpu_rmsnorm_backward(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int64_t N, int64_t D) {
    NM_CHECK(N >= 0 && D > 0, "rmsnorm shape N=%lld D=%lld", (long long)N, (long long)D);
    // out = w * n, n = x * rstd:
    //   g = dout * w;  dx = (g - n * mean(g * n)) * rstd;  dw = sum_rows dout * n
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < N; r++) {
        const float *x = inp + r * D, *dy = dout + r * D;
        double rs = rstd[r];
        double mean_gn = sum_gn(dy, w, x, rs, D) / (double)D;
        float *dx = dinp + r * D;
        for (int64_t d = 0; d < D; d++) {
            double nd = x[d] * rs;
            dx[d] += (float)(((double)dy[d] * w[d] - nd * mean_gn) * rs);
        }
    }
    // Every column adds its rows in order into its own double, so dw does not depend on how
    // the columns are cut into slabs: the width is free, and one slab per thread (up to
    // SLAB_MAX columns) makes each row read one long run instead of many 256-byte pieces
    // (1.4x faster than 64-column slabs at D = 512, one thread). The columns of a slab are
    // independent, so the inner loop vectorises.
    int64_t slab = (D + omp_get_max_threads() - 1) / omp_get_max_threads();
    slab = (slab + 15) / 16 * 16;
    slab = slab < SLAB_MIN ? SLAB_MIN : slab > SLAB_MAX ? SLAB_MAX : slab;
    int64_t n_slabs = (D + slab - 1) / slab;
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n_slabs; s++) {
        int64_t c0 = s * slab, c1 = c0 + slab < D ? c0 + slab : D;
        double acc[SLAB_MAX] = {0};
        for (int64_t r = 0; r < N; r++) {
            const float *x = inp + r * D, *dy = dout + r * D;
            double rs = rstd[r];
            for (int64_t c = c0; c < c1; c++) acc[c - c0] += (double)dy[c] * (x[c] * rs);
        }
        for (int64_t c = c0; c < c1; c++) dw[c] += (float)acc[c - c0];
    }
}
