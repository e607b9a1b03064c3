// optim.cu: the CUDA backend's optimizer ops (ops.h; src/ops/ref/optim.c is the definition;
// train/optim.c makes the chunk list and drives them).
//
// The chunk list is host memory (ops.h): staged to the device per call (a few thousand
// entries of 40 bytes). The gradient norm's partials follow the contract's eight lanes bit
// for bit: lane l of chunk c sums elements i = l mod 8 in increasing i, one thread per lane
// (a chunk is at most NM_OPTIM_CHUNK floats, so a lane is a few thousand adds), then the lanes
// are paired as the reference pairs them; the partials go back to the caller's host memory.
// AdamW is the reference's float operations in its order (--fmad=false keeps each one
// rounded), one thread per float. Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

// Chunk c = blockIdx.x (grid-stride over the chunks), its floats by the block's threads
#define FOR_CHUNKS(c, n) for (int64_t c = blockIdx.x; c < (n); c += gridDim.x)
#define CHUNK_GRID(n) (unsigned)((n) < 65536 ? (n) : 65536)

static __global__ void sumsq_kernel(double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n) {
    __shared__ double lane[8];
    FOR_CHUNKS(c, n) {
        const float *g = x + chunks[c].offset;
        const size_t len = chunks[c].len;
        double s = 0.0;
        for (size_t i = threadIdx.x; i < len; i += 8) s += (double)g[i] * (double)g[i];
        lane[threadIdx.x] = s;
        __syncthreads();
        if (threadIdx.x == 0)
            partials[c] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        __syncthreads();
    }
}

static __global__ void scale_kernel(float *x, float s, const nm_optim_chunk *chunks, int64_t n) {
    FOR_CHUNKS(c, n) {
        float *p = x + chunks[c].offset;
        for (size_t i = threadIdx.x; i < chunks[c].len; i += blockDim.x) p[i] *= s;
    }
}

// *first (=) min over non-finite i of i; atomicMin of an integer is order-free (deterministic)
static __global__ void nonfinite_kernel(unsigned long long *first, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        if (!isfinite(x[i])) atomicMin(first, (unsigned long long)i);
}

static __device__ __forceinline__ float load(const void *base, nm_dtype t, size_t i) {
    return t == NM_BF16 ? nm_dev_bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static __device__ __forceinline__ void store(void *base, nm_dtype t, size_t i, float x) {
    if (t == NM_BF16) ((uint16_t *)base)[i] = nm_dev_f32_to_bf16(x);
    else ((float *)base)[i] = x;
}

// torch.optim.AdamW's single-tensor update, one float per thread (train/optim.h)
static __global__ void adamw_kernel(float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                                    const float *grads, const nm_optim_chunk *chunks, int64_t n, nm_adamw_coefs k) {
    FOR_CHUNKS(c, n) {
        const float dm = chunks[c].decay ? k.decay_mul : 1.0f;
        for (size_t i = threadIdx.x; i < chunks[c].len; i += blockDim.x) {
            const size_t p = chunks[c].offset + i, s = chunks[c].state + i;
            float g = grads[p] * k.grad_scale;
            float mi = load(m, m_type, s) * k.b1 + g * k.one_minus_b1;
            float vi = load(v, v_type, s) * k.b2 + k.one_minus_b2 * g * g;
            float denom = sqrtf(vi) / k.bc2_sqrt + k.eps;
            params[p] = params[p] * dm + k.neg_step_size * mi / denom;
            store(m, m_type, s, mi);
            store(v, v_type, s, vi);
        }
    }
}

// bias(E) (+=) gamma * sign(mean(counts) - counts[e]); one block, the mean on thread 0 in the
// reference's order
static __global__ void bias_update_kernel(float *bias, const int64_t *counts, int64_t E, float gamma) {
    __shared__ double mean;
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (int64_t e = 0; e < E; e++) sum += (double)counts[e];
        mean = sum / (double)E;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        const double d = mean - (double)counts[e];
        bias[e] += gamma * (d > 0.0 ? 1.0f : d < 0.0 ? -1.0f : 0.0f);
    }
}

// --- launchers ----------------------------------------------------------------------------------------

static const nm_optim_chunk *device_chunks(const nm_ops *be, const nm_optim_chunk *chunks, int64_t n) {
    NM_CHECK(n >= 0, "optimizer chunks n=%lld", (long long)n);
    return (const nm_optim_chunk *)nm_cuda_readable(be, chunks, (size_t)n * sizeof(nm_optim_chunk), NM_CUDA_SCRATCH_STAGE1);
}

void nm_cuda_sumsq_chunks(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n) {
    const nm_optim_chunk *dc = device_chunks(be, chunks, n);
    if (n > 0) {
        double *d = (double *)nm_cuda_scratch(be, NM_CUDA_SCRATCH_OUT, (size_t)n * sizeof(double));
        sumsq_kernel<<<CHUNK_GRID(n), 8, 0, NM_CUDA_STREAM>>>(d, x, dc, n);
        // partials is the caller's host memory (ops.h)
        NM_CUDA_CALL(cudaMemcpyAsync(partials, d, (size_t)n * sizeof(double), cudaMemcpyDefault, NM_CUDA_STREAM));
    }
    NM_CUDA_OP_DONE("sumsq_chunks");
}

void nm_cuda_scale_chunks(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n) {
    const nm_optim_chunk *dc = device_chunks(be, chunks, n);
    if (n > 0) scale_kernel<<<CHUNK_GRID(n), 256, 0, NM_CUDA_STREAM>>>(x, s, dc, n);
    NM_CUDA_OP_DONE("scale_chunks");
}

int64_t nm_cuda_first_nonfinite(const nm_ops *be, const float *x, int64_t n) {
    NM_CHECK(n >= 0, "first_nonfinite n=%lld", (long long)n);
    if (n == 0) return -1;
    unsigned long long *d = (unsigned long long *)nm_cuda_scratch(be, NM_CUDA_SCRATCH_WORK, sizeof(unsigned long long));
    NM_CUDA_CALL(cudaMemsetAsync(d, 0xff, sizeof *d, NM_CUDA_STREAM));  // ULLONG_MAX: none found
    nonfinite_kernel<<<nm_cuda_blocks(n, 256), 256, 0, NM_CUDA_STREAM>>>(d, x, n);
    unsigned long long first = 0;
    NM_CUDA_CALL(cudaMemcpyAsync(&first, d, sizeof first, cudaMemcpyDeviceToHost, NM_CUDA_STREAM));
    NM_CUDA_OP_DONE("first_nonfinite");
    return first == ~0ull ? -1 : (int64_t)first;
}

void nm_cuda_adamw_chunks(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                          const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k) {
    NM_CHECK((m_type == NM_F32 || m_type == NM_BF16) && (v_type == NM_F32 || v_type == NM_BF16),
             "adamw moment types %d %d", (int)m_type, (int)v_type);
    const nm_optim_chunk *dc = device_chunks(be, chunks, n);
    if (n > 0) adamw_kernel<<<CHUNK_GRID(n), 256, 0, NM_CUDA_STREAM>>>(params, m, m_type, v, v_type, grads, dc, n, *k);
    NM_CUDA_OP_DONE("adamw_chunks");
}

void nm_cuda_router_bias_update(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma) {
    NM_CHECK(E > 0, "router_bias_update E = %lld", (long long)E);
    // counts is host memory (ops.h): staged
    const int64_t *dc = (const int64_t *)nm_cuda_readable(be, counts, (size_t)E * sizeof(int64_t), NM_CUDA_SCRATCH_STAGE0);
    bias_update_kernel<<<1, 256, 0, NM_CUDA_STREAM>>>(bias, dc, E, gamma);
    NM_CUDA_OP_DONE("router_bias_update");
}
