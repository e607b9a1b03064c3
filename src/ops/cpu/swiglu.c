// swiglu.c: the SwiGLU activation of the dense MLP and the experts (dsv3-spec 3.3, 7):
//   out = silu(gate) * up, silu(z) = z * sigmoid(z), rows laid out [gate(F) | up(F)].
// The GEMMs around it are not here. sigmoid is evaluated as 1/(1+exp(-z)): for z << 0 exp
// overflows to inf and sigmoid correctly becomes 0, no NaN.
//
// Under bf16 the outputs are read by bf16 GEMMs only, so the _bf16 variants round what they
// write (as round_bf16 would after them) and, given bits, also write the bf16 copy the GEMM
// reads (the activation's twin, model/bf16_twin.c): one pass over the output instead of three.
#include <math.h>

#include "core/check.h"
#include "ops/bf16.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/fastmath.h"

// nm_expf (vectorisable, ~1 ulp) rather than libm's expf, so these loops vectorise.
static inline float sigmoidf(float z) { return 1.0f / (1.0f + nm_expf(-z)); }

static inline float swiglu(float gate, float up) { return gate * sigmoidf(gate) * up; }

// out = a * sig(a) * b  =>  da = dout * b * sig(a) * (1 + a * (1 - sig(a))), db = dout * a * sig(a)
static inline void swiglu_grad(float a, float b, float dy, float *da, float *db) {
    float s = sigmoidf(a);
    *da = dy * b * s * (1.0f + a * (1.0f - s));
    *db = dy * a * s;
}

// out(N,F) (=); gate_up(N,2F)
void nm_cpu_swiglu_forward(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gate_up + n * 2 * F, *u = g + F;
        float *o = out + n * F;
        for (int64_t i = 0; i < F; i++) o[i] = swiglu(g[i], u[i]);
    }
}

// out(N,F) (=) bf16(swiglu) in fp32 storage; bits(N,F) (=) the same as bf16 when not NULL
void nm_cpu_swiglu_forward_bf16(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gate_up + n * 2 * F, *u = g + F;
        float *o = out + n * F;
        for (int64_t i = 0; i < F; i++) o[i] = nm_bf16_round(swiglu(g[i], u[i]));
        if (bits) nm_bf16_high_halves(bits + n * F, o, F);
    }
}

// dgate_up(N,2F) (=); dout(N,F), gate_up(N,2F)
void nm_cpu_swiglu_backward(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                            int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *a = gate_up + n * 2 * F, *b = a + F, *dy = dout + n * F;
        float *da = dgate_up + n * 2 * F, *db = da + F;
        for (int64_t i = 0; i < F; i++) swiglu_grad(a[i], b[i], dy[i], &da[i], &db[i]);
    }
}

// dgate_up(N,2F) (=) bf16 of the gradient in fp32 storage; bits(N,2F) (=) the same as bf16
// when not NULL
void nm_cpu_swiglu_backward_bf16(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                 const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *a = gate_up + n * 2 * F, *b = a + F, *dy = dout + n * F;
        float *da = dgate_up + n * 2 * F, *db = da + F;
        for (int64_t i = 0; i < F; i++) {
            float dai, dbi;
            swiglu_grad(a[i], b[i], dy[i], &dai, &dbi);
            da[i] = nm_bf16_round(dai);
            db[i] = nm_bf16_round(dbi);
        }
        if (bits) nm_bf16_high_halves(bits + n * 2 * F, da, 2 * F);
    }
}
