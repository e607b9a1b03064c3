// elementwise.cu: the CUDA backend's fp32 <-> bf16 casts, memory ops (zero, axpy, 2-D copy
// and add) and the token embedding (ops.h). Grid-stride loops, one element per thread per
// step; the casts apply bf16.h's rounding bit for bit (cuda_common.cuh).
//
// The embedding's backward adds token rows into vocabulary rows in token order, as the
// reference does, without atomics: one thread per column d walks the N tokens in order. That
// is D threads of N steps each: simple and deterministic, not fast (a sort of the tokens by id
// and one block per vocabulary row is the faster form). Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

#define GRID(n) nm_cuda_blocks((n), 256), 256, 0, NM_CUDA_STREAM
#define FOR_EACH(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// --- kernels ----------------------------------------------------------------------------------------

static __global__ void round_bf16_kernel(float *dst, const float *src, int64_t n) {
    FOR_EACH(i, n) dst[i] = nm_dev_bf16_round(src[i]);
}

static __global__ void cast_bf16_kernel(uint16_t *dst, const float *src, int64_t n) {
    FOR_EACH(i, n) dst[i] = nm_dev_f32_to_bf16(src[i]);
}

static __global__ void widen_bf16_kernel(float *dst, const uint16_t *src, int64_t n) {
    FOR_EACH(i, n) dst[i] = nm_dev_bf16_to_f32(src[i]);
}

static __global__ void round_cast_bf16_kernel(float *x, uint16_t *bits, int64_t n) {
    FOR_EACH(i, n) {
        uint16_t h = nm_dev_f32_to_bf16(x[i]);
        bits[i] = h;
        x[i] = nm_dev_bf16_to_f32(h);
    }
}

static __global__ void zero_kernel(float *x, int64_t n) {
    FOR_EACH(i, n) x[i] = 0.0f;
}

// y (+=) alpha * x: one product, one sum, each rounded (--fmad=false), as the reference
static __global__ void axpy_kernel(float *y, const float *x, float alpha, int64_t n) {
    FOR_EACH(i, n) y[i] += alpha * x[i];
}

// dst[r, c] (=) or (+=) src[r, c] over (rows, cols)
static __global__ void copy_2d_kernel(float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                                      int64_t cols, int add) {
    FOR_EACH(i, rows * cols) {
        const int64_t r = i / cols, c = i % cols;
        if (add) dst[r * ld_dst + c] += src[r * ld_src + c];
        else dst[r * ld_dst + c] = src[r * ld_src + c];
    }
}

// out(N,D) (=) emb[tokens[n]], zero rows for negative ids
static __global__ void embedding_forward_kernel(float *out, const int32_t *tokens, const float *emb, int64_t N,
                                                int64_t D) {
    FOR_EACH(i, N * D) {
        const int32_t t = tokens[i / D];
        out[i] = t < 0 ? 0.0f : emb[(int64_t)t * D + i % D];
    }
}

// demb (+=) dout rows into their tokens' rows: thread d walks the tokens in order (file comment)
static __global__ void embedding_backward_kernel(float *demb, const float *dout, const int32_t *tokens, int64_t N,
                                                 int64_t D) {
    FOR_EACH(d, D) {
        for (int64_t n = 0; n < N; n++) {
            const int32_t t = tokens[n];
            if (t >= 0) demb[(int64_t)t * D + d] += dout[n * D + d];
        }
    }
}

// --- launchers ----------------------------------------------------------------------------------------

void nm_cuda_round_bf16(const nm_ops *be, float *dst, const float *src, int64_t n) {
    NM_CHECK(n >= 0, "round_bf16 n=%lld", (long long)n);
    if (n > 0) round_bf16_kernel<<<GRID(n)>>>(dst, src, n);
    NM_CUDA_OP_DONE("round_bf16");
}

void nm_cuda_cast_bf16(const nm_ops *be, uint16_t *dst, const float *src, int64_t n) {
    NM_CHECK(n >= 0, "cast_bf16 n=%lld", (long long)n);
    if (n > 0) cast_bf16_kernel<<<GRID(n)>>>(dst, src, n);
    NM_CUDA_OP_DONE("cast_bf16");
}

void nm_cuda_widen_bf16(const nm_ops *be, float *dst, const uint16_t *src, int64_t n) {
    NM_CHECK(n >= 0, "widen_bf16 n=%lld", (long long)n);
    if (n > 0) widen_bf16_kernel<<<GRID(n)>>>(dst, src, n);
    NM_CUDA_OP_DONE("widen_bf16");
}

void nm_cuda_round_cast_bf16(const nm_ops *be, float *x, uint16_t *bits, int64_t n) {
    NM_CHECK(n >= 0, "round_cast_bf16 n=%lld", (long long)n);
    if (n > 0) round_cast_bf16_kernel<<<GRID(n)>>>(x, bits, n);
    NM_CUDA_OP_DONE("round_cast_bf16");
}

void nm_cuda_zero(const nm_ops *be, float *x, int64_t n) {
    NM_CHECK(n >= 0, "zero n=%lld", (long long)n);
    if (n > 0) zero_kernel<<<GRID(n)>>>(x, n);
    NM_CUDA_OP_DONE("zero");
}

void nm_cuda_axpy(const nm_ops *be, float *y, const float *x, float alpha, int64_t n) {
    NM_CHECK(n >= 0, "axpy n=%lld", (long long)n);
    if (n > 0) axpy_kernel<<<GRID(n)>>>(y, x, alpha, n);
    NM_CUDA_OP_DONE("axpy");
}

void nm_cuda_copy_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                     int64_t cols) {
    NM_CHECK(rows >= 0 && cols >= 0 && ld_dst >= cols && ld_src >= cols, "copy_2d shape");
    if (rows > 0 && cols > 0)
        NM_CUDA_CALL(cudaMemcpy2DAsync(dst, (size_t)ld_dst * sizeof(float), src, (size_t)ld_src * sizeof(float),
                                       (size_t)cols * sizeof(float), (size_t)rows, cudaMemcpyDefault, NM_CUDA_STREAM));
    NM_CUDA_OP_DONE("copy_2d");
}

void nm_cuda_add_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols) {
    NM_CHECK(rows >= 0 && cols >= 0 && ld_dst >= cols && ld_src >= cols, "add_2d shape");
    if (rows > 0 && cols > 0) copy_2d_kernel<<<GRID(rows * cols)>>>(dst, ld_dst, src, ld_src, rows, cols, 1);
    NM_CUDA_OP_DONE("add_2d");
}

void nm_cuda_embedding_forward(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                               int64_t D) {
    NM_CHECK(N >= 0 && D >= 0, "embedding shape");
    if (N > 0 && D > 0) {
        // token ids may be host memory (the trainer's batch): staged when they are
        const int32_t *t = (const int32_t *)nm_cuda_readable(be, tokens, (size_t)N * sizeof(int32_t), NM_CUDA_SCRATCH_STAGE0);
        embedding_forward_kernel<<<GRID(N * D)>>>(out, t, emb, N, D);
    }
    NM_CUDA_OP_DONE("embedding_forward");
}

void nm_cuda_embedding_backward(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                                int64_t D) {
    NM_CHECK(N >= 0 && D >= 0, "embedding shape");
    if (N > 0 && D > 0) {
        const int32_t *t = (const int32_t *)nm_cuda_readable(be, tokens, (size_t)N * sizeof(int32_t), NM_CUDA_SCRATCH_STAGE0);
        embedding_backward_kernel<<<GRID(D)>>>(demb, dout, t, N, D);
    }
    NM_CUDA_OP_DONE("embedding_backward");
}
