// swiglu.cu: the CUDA backend's SwiGLU (dsv3-spec 3.3, 7; src/ops/ref/swiglu.c is the
// definition): out = silu(gate) * up, rows laid out [gate(F) | up(F)]. One thread per output
// element, evaluated in double and rounded once to fp32 as the reference; the _bf16 variants
// round that fp32 value to bf16 (bf16.h's rule) and write the bf16 twin when asked.
// Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

#define FOR_EACH(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static __device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// out(N,F) (=) silu(gate) * up; bf16: rounded in fp32 storage, bits (may be NULL) the bf16 twin
static __global__ void swiglu_forward_kernel(float *out, uint16_t *bits, const float *gate_up, int64_t N, int64_t F,
                                             int bf16) {
    FOR_EACH(i, N * F) {
        const int64_t n = i / F, c = i % F;
        const float a = gate_up[n * 2 * F + c], b = gate_up[n * 2 * F + F + c];
        float y = (float)(a * sigmoid(a) * b);
        if (bf16) {
            uint16_t h = nm_dev_f32_to_bf16(y);
            y = nm_dev_bf16_to_f32(h);
            if (bits) bits[i] = h;
        }
        out[i] = y;
    }
}

// dgate_up(N,2F) (=): out = a sig(a) b  =>  da = dout b sig(a) (1 + a (1 - sig(a))),  db = dout a sig(a)
static __global__ void swiglu_backward_kernel(float *dgate_up, uint16_t *bits, const float *dout,
                                              const float *gate_up, int64_t N, int64_t F, int bf16) {
    FOR_EACH(i, N * F) {
        const int64_t n = i / F, c = i % F;
        const float a = gate_up[n * 2 * F + c], b = gate_up[n * 2 * F + F + c], dy = dout[i];
        const double s = sigmoid(a);
        float da = (float)((double)dy * b * s * (1.0 + a * (1.0 - s)));
        float db = (float)((double)dy * a * s);
        const int64_t ia = n * 2 * F + c, ib = ia + F;
        if (bf16) {
            uint16_t ha = nm_dev_f32_to_bf16(da), hb = nm_dev_f32_to_bf16(db);
            da = nm_dev_bf16_to_f32(ha);
            db = nm_dev_bf16_to_f32(hb);
            if (bits) bits[ia] = ha, bits[ib] = hb;
        }
        dgate_up[ia] = da;
        dgate_up[ib] = db;
    }
}

#define GRID(n) nm_cuda_blocks((n), 256), 256, 0, NM_CUDA_STREAM

void nm_cuda_swiglu_forward(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    if (N * F > 0) swiglu_forward_kernel<<<GRID(N * F)>>>(out, NULL, gate_up, N, F, 0);
    NM_CUDA_OP_DONE("swiglu_forward");
}

void nm_cuda_swiglu_backward(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                             int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    if (N * F > 0) swiglu_backward_kernel<<<GRID(N * F)>>>(dgate_up, NULL, dout, gate_up, N, F, 0);
    NM_CUDA_OP_DONE("swiglu_backward");
}

void nm_cuda_swiglu_forward_bf16(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                 int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    if (N * F > 0) swiglu_forward_kernel<<<GRID(N * F)>>>(out, bits, gate_up, N, F, 1);
    NM_CUDA_OP_DONE("swiglu_forward_bf16");
}

void nm_cuda_swiglu_backward_bf16(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                  const float *gate_up, int64_t N, int64_t F) {
    NM_CHECK(N >= 0 && F >= 0, "swiglu shape");
    if (N * F > 0) swiglu_backward_kernel<<<GRID(N * F)>>>(dgate_up, bits, dout, gate_up, N, F, 1);
    NM_CUDA_OP_DONE("swiglu_backward_bf16");
}
