// swiglu.c: reference SwiGLU (dsv3-spec 3.3, 7): out = silu(gate) * up with silu(z) =
// z * sigmoid(z), rows laid out [gate(F) | up(F)]. Evaluated in double and rounded once to
// fp32; the _bf16 variants round that fp32 value to bf16 (src/ops/bf16.h) in the fp32 output
// and, given bits, write the same value as bf16.
#include <math.h>

#include "core/check.h"
#include "ops/bf16.h"
#include "ops/ref/ref_ops.h"

// 1 / (1 + e^-z): for z << 0 the exp overflows to inf and the sigmoid correctly becomes 0.
static double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

static float swiglu(float gate, float up) { return (float)(gate * sigmoid(gate) * up); }

// out = a sig(a) b  =>  da = dout b sig(a) (1 + a (1 - sig(a))),  db = dout a sig(a)
static void swiglu_grad(float a, float b, float dy, float *da, float *db) {
    double s = sigmoid(a);
    *da = (float)((double)dy * b * s * (1.0 + a * (1.0 - s)));
    *db = (float)((double)dy * a * s);
}

// out(N,F) (=); gate_up(N,2F)
void nm_ref_swiglu_forward(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < F; i++) out[n * F + i] = swiglu(gate_up[n * 2 * F + i], gate_up[n * 2 * F + F + i]);
}

// out(N,F) (=) bf16(swiglu) in fp32 storage; bits(N,F) (=) the same as bf16 when not NULL
void nm_ref_swiglu_forward_bf16(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    for (int64_t n = 0; n < N; n++) {
        for (int64_t i = 0; i < F; i++) {
            uint16_t h = nm_f32_to_bf16(swiglu(gate_up[n * 2 * F + i], gate_up[n * 2 * F + F + i]));
            out[n * F + i] = nm_bf16_to_f32(h);
            if (bits) bits[n * F + i] = h;
        }
    }
}

// dgate_up(N,2F) (=); dout(N,F), gate_up(N,2F)
void nm_ref_swiglu_backward(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                            int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    for (int64_t n = 0; n < N; n++) {
        const float *a = gate_up + n * 2 * F, *b = a + F;
        float *da = dgate_up + n * 2 * F, *db = da + F;
        for (int64_t i = 0; i < F; i++) swiglu_grad(a[i], b[i], dout[n * F + i], &da[i], &db[i]);
    }
}

// dgate_up(N,2F) (=) bf16 of the gradient in fp32 storage; bits(N,2F) (=) the same as bf16
// when not NULL
void nm_ref_swiglu_backward_bf16(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                 const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    nm_ref_swiglu_backward(be, dgate_up, dout, gate_up, N, F);
    for (int64_t i = 0; i < N * 2 * F; i++) {
        uint16_t h = nm_f32_to_bf16(dgate_up[i]);
        dgate_up[i] = nm_bf16_to_f32(h);
        if (bits) bits[i] = h;
    }
}
