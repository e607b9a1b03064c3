// swiglu.c: the SwiGLU activation of the dense MLP and the experts (dsv3-spec 3.3, 7):
//   out = silu(gate) * up, silu(z) = z * sigmoid(z), rows laid out [gate(F) | up(F)].
// The GEMMs around it are not here. sigmoid is evaluated as 1/(1+exp(-z)): for z << 0 exp
// overflows to inf and sigmoid correctly becomes 0, no NaN.
#include <math.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/fastmath.h"

// nm_expf (vectorisable, ~1 ulp) rather than libm's expf, so these loops vectorise.
static inline float sigmoidf(float z) { return 1.0f / (1.0f + nm_expf(-z)); }

// out(N,F) (=); gate_up(N,2F)
void nm_cpu_swiglu_forward(float *out, const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gate_up + n * 2 * F, *u = g + F;
        float *o = out + n * F;
        for (int64_t i = 0; i < F; i++) o[i] = g[i] * sigmoidf(g[i]) * u[i];
    }
}

// dgate_up(N,2F) (=); dout(N,F), gate_up(N,2F)
void nm_cpu_swiglu_backward(float *dgate_up, const float *dout, const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    // out = a * sig(a) * b  =>  da = dout * b * sig(a) * (1 + a * (1 - sig(a))),
    //                           db = dout * a * sig(a)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *a = gate_up + n * 2 * F, *b = a + F, *dy = dout + n * F;
        float *da = dgate_up + n * 2 * F, *db = da + F;
        for (int64_t i = 0; i < F; i++) {
            float s = sigmoidf(a[i]);
            float dai = dy[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
            float dbi = dy[i] * a[i] * s;
            da[i] = dai;
            db[i] = dbi;
        }
    }
}
