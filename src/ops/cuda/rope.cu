// rope.cu: the CUDA backend's rotary position embedding on adjacent channel pairs
// (dsv3-spec 4.2; src/ops/ref/rope.c is the definition), in place: pair i of channels
// [offset, offset + Dr) of every head at position t rotated by the angle whose cos and sin are
// cos[t * Dr/2 + i], sin[t * Dr/2 + i]; the backward rotates by minus the angle. One thread
// per pair, each output formed in double and rounded once. Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

// x(B,T,n_heads,head_dim): pair index p = ((b T + t) n_heads + h) half + i
static __global__ void rope_kernel(float *x, const float *cos, const float *sin, int64_t T, int64_t n_heads,
                                   int64_t head_dim, int64_t offset, int64_t half, int64_t pairs, double sign) {
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs; p += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = p % half, row = p / half;  // row = (b T + t) n_heads + h
        const int64_t t = (row / n_heads) % T;
        float *v = x + row * head_dim + offset;
        const double c = cos[t * half + i], s = sign * sin[t * half + i], x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i] = (float)(x0 * c - x1 * s);
        v[2 * i + 1] = (float)(x0 * s + x1 * c);
    }
}

static void rotate(const char *op, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                   int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr, double sign) {
    NM_CHECK(B >= 0 && T >= 0 && n_heads >= 0, "rope shape");
    const int64_t dr_odd = Dr % 2;
    NM_CHECK(Dr >= 0 && dr_odd == 0 && offset >= 0 && offset + Dr <= head_dim,
             "rope channels [%lld, %lld) of head_dim %lld (Dr must be even)", (long long)offset,
             (long long)(offset + Dr), (long long)head_dim);
    const int64_t half = Dr / 2, pairs = B * T * n_heads * half;
    if (pairs > 0)
        rope_kernel<<<nm_cuda_blocks(pairs, 256), 256, 0, NM_CUDA_STREAM>>>(x, cos, sin, T, n_heads, head_dim, offset,
                                                                           half, pairs, sign);
    NM_CUDA_OP_DONE(op);
}

void nm_cuda_rope_forward(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr) {
    rotate("rope_forward", x, cos, sin, B, T, n_heads, head_dim, offset, Dr, 1.0);
}

void nm_cuda_rope_backward(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                           int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr) {
    rotate("rope_backward", dx, cos, sin, B, T, n_heads, head_dim, offset, Dr, -1.0);
}
