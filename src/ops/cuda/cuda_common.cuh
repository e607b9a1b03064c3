// cuda_common.cuh: what the CUDA backend's .cu files share: the checked-call macros (every CUDA
// and cuBLASLt call goes through one of them; an op cannot return an error, so a failure
// aborts through nm_panic naming the call and the library's error string, as the CPU alloc
// aborts on OOM), the end-of-op synchronisation, backend-owned scratch, and the device-side
// twins of the shared rounding rules (src/ops/bf16.h, src/ops/fp8.c), which must give the
// same bits as the host versions.
//
// Numerics: the .cu files are compiled with --fmad=false (CMakeLists.txt), so that a*b + c is
// two roundings as in the C reference (built without contraction); several ops are compared
// bit for bit with it (AdamW, the casts, the fp8 rounding). Divisions and square roots are the
// IEEE-rounded ones (no --use_fast_math, nvcc's default -prec-div/-prec-sqrt=true).
#pragma once

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "ops/cuda/cuda_ops.h"

// --- host: checked calls ------------------------------------------------------------------------

static inline void nm_cuda_check(cudaError_t e, const char *call, const char *file, int line) {
    if (e != cudaSuccess) nm_panic(file, line, "backend cuda: %s failed: %s (%s)", call, cudaGetErrorString(e),
                                   cudaGetErrorName(e));
}
#define NM_CUDA_CALL(call) nm_cuda_check((call), #call, __FILE__, __LINE__)

// After an op's launches: the launch error, then the stream's completion (ops.h: results are
// visible to the host when the op returns; cuda_ops.h says why this is per op for now).
void nm_cuda_op_done(const char *op, const char *file, int line);
#define NM_CUDA_OP_DONE(op) nm_cuda_op_done((op), __FILE__, __LINE__)

// The stream every op runs on (the legacy default stream for now: one stream, in order).
#define NM_CUDA_STREAM ((cudaStream_t)0)

// Device scratch owned by the backend instance (nm_cuda_ctx), slot by slot, grown (never
// shrunk) when a call needs more than it holds: no allocation in steady state (style.md 21).
// One calling thread, like every op. Slots:
enum {
    NM_CUDA_SCRATCH_A = 0,       // gemm_bf16 / gemm_fp8: operand A converted
    NM_CUDA_SCRATCH_B = 1,       // ... operand B converted
    NM_CUDA_SCRATCH_STAGE0 = 2,  // host arguments staged to the device (nm_cuda_readable)
    NM_CUDA_SCRATCH_STAGE1 = 3,
    NM_CUDA_SCRATCH_OUT = 4,     // small results copied back to host memory (partials, loss)
    NM_CUDA_SCRATCH_WORK = 5,    // per-op temporaries (moe_permute's counts, first_nonfinite)
    NM_CUDA_SCRATCH_SLOTS = 6,
};
void *nm_cuda_scratch(const nm_ops *be, int slot, size_t bytes);

// --- the instance's state (ops.h: be->ctx) -------------------------------------------------------
// Made by nm_cuda_ctx_create (runtime.cu) when the instance is, freed with everything it made
// by nm_cuda_ctx_destroy. Two instances share none of it; what is process-wide by nature is the
// current device (cudaSetDevice) and the legacy default stream every op runs on.
typedef struct nm_cuda_gemm_state nm_cuda_gemm_state;  // gemm.cu: the cuBLASLt handle and workspace

typedef struct nm_cuda_ctx {
    int setup_state;            // 0 not asked, 1 usable, -1 not (setup_error)
    nm_error setup_error;
    char device_desc[256];      // "NVIDIA H100 80GB HBM3, sm_90, 79 GiB", for kernel_names
    char kernel_names[512];     // kernel_names's answer, made on the first call
    nm_cuda_gemm_state *gemm;   // NULL until setup
    struct {
        void *data;
        size_t cap;             // bytes
    } scratch[NM_CUDA_SCRATCH_SLOTS];
} nm_cuda_ctx;

static inline nm_cuda_ctx *nm_cuda_ctx_of(const nm_ops *be) {
    NM_CHECK(be && be->ctx, "backend cuda: an op called through a table that is no instance (nm_backend_create)");
    return (nm_cuda_ctx *)be->ctx;
}

// gemm.cu: frees the cuBLASLt handle and workspace (NULL-safe).
void nm_cuda_gemm_state_destroy(nm_cuda_gemm_state *g);

// p itself when the device can read it (memory from alloc: managed; or device memory), else
// a copy of its `bytes` in scratch slot `slot`. For the arguments ops.h leaves in host memory
// (optimizer chunk lists) and the index arrays a caller may keep on the host (token ids).
const void *nm_cuda_readable(const nm_ops *be, const void *p, size_t bytes, int slot);

// Blocks for a grid-stride loop over n elements of `threads` per block.
static inline unsigned nm_cuda_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    const int64_t cap = 65536;  // enough to fill any GPU; the loop strides over the rest
    return (unsigned)(b < 1 ? 1 : b > cap ? cap : b);
}

#define NM_CUDA_THREADS 256      // threads per block of the row kernels (a power of two)

// --- device: the shared rounding rules, bit for bit --------------------------------------------

// bf16.h nm_f32_to_bf16: round to nearest even on the 16 dropped bits; NaN kept quiet.
static __device__ __forceinline__ uint16_t nm_dev_f32_to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
static __device__ __forceinline__ float nm_dev_bf16_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }
static __device__ __forceinline__ float nm_dev_bf16_round(float x) { return nm_dev_bf16_to_f32(nm_dev_f32_to_bf16(x)); }

// |x| and -x as bit operations. PTX leaves the NaN that abs.f32 / neg.f32 (what fabsf and unary
// minus compile to) return unspecified, and ptxas may lower them to an FADD that gives the
// canonical 0x7fffffff; the host clears or flips the sign bit and keeps the payload. The ops
// that pass a NaN through and are compared bit for bit (the fp8 rows) use these.
static __device__ __forceinline__ float nm_dev_abs(float x) {
    return __uint_as_float(__float_as_uint(x) & 0x7fffffffu);
}
static __device__ __forceinline__ float nm_dev_neg(float x) {
    return __uint_as_float(__float_as_uint(x) ^ 0x80000000u);
}

// fp8.c e4m3_round: nearest even, saturating at 448, NaN kept, sign of zero kept.
static __device__ __forceinline__ float nm_dev_e4m3_round(float x) {
    float a = nm_dev_abs(x), r;
    if (!(a < 448.0f)) {
        r = isnan(a) ? a : 448.0f;
    } else if (a < 0x1p-6f) {
        // the subnormal grid (step 2^-9) by an add whose ulp is 2^-9; __fadd_rn/__fsub_rn so
        // that no compiler pass folds the pair
        r = __fsub_rn(__fadd_rn(a, 0x1p14f), 0x1p14f);
    } else {
        uint32_t b = __float_as_uint(a);
        b += 0x7FFFFu + ((b >> 20) & 1u);
        b &= 0xFFF00000u;
        r = __uint_as_float(b);
    }
    return __uint_as_float(__float_as_uint(r) | (__float_as_uint(x) & 0x80000000u));  // copysignf(r, x); r >= 0
}

// fp8.c nm_fp8_e4m3_encode
static __device__ __forceinline__ uint8_t nm_dev_e4m3_encode(float x) {
    uint8_t sign = signbit(x) ? 0x80 : 0x00;
    if (isnan(x)) return (uint8_t)(sign | 0x7F);
    float a = nm_dev_abs(nm_dev_e4m3_round(x));
    if (a < 0x1p-6f) return (uint8_t)(sign | (uint8_t)(a * 512.0f));
    uint32_t b = __float_as_uint(a);
    uint32_t e = (b >> 23) - 127u + 7u;
    return (uint8_t)(sign | (e << 3) | ((b >> 20) & 7u));
}

// fp8_decode.c nm_fp8_e4m3_decode (exact)
static __device__ __forceinline__ float nm_dev_e4m3_decode(uint8_t code) {
    int e = (code >> 3) & 15, m = code & 7;
    float v;
    if (e == 15 && m == 7) v = __int_as_float(0x7fc00000);
    else if (e == 0) v = ldexpf((float)m, -9);
    else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return (code & 0x80) ? nm_dev_neg(v) : v;
}

// NaN bits as the host's SSE/AVX arithmetic makes them, for the ops compared bit for bit with
// the reference where a NaN flows through (the fp8 rows of a diverged tile): x86 returns the
// first NaN operand, quieted, or its default NaN 0xffc00000 for an invalid operation (0 * inf),
// where a GPU returns its canonical 0x7fffffff.
static __device__ __forceinline__ float nm_dev_x86_nan(float a, float b) {
    if (isnan(a)) return __uint_as_float(__float_as_uint(a) | 0x400000u);
    if (isnan(b)) return __uint_as_float(__float_as_uint(b) | 0x400000u);
    return __uint_as_float(0xffc00000u);
}
static __device__ __forceinline__ float nm_dev_div(float a, float b) {
    float r = __fdiv_rn(a, b);
    return isnan(r) ? nm_dev_x86_nan(a, b) : r;
}
static __device__ __forceinline__ float nm_dev_mul(float a, float b) {
    float r = __fmul_rn(a, b);
    return isnan(r) ? nm_dev_x86_nan(a, b) : r;
}

// fp8.c nm_fp8_scale, NM_FP8_SCALE_FP32: max(amax, 1e-4) / 448 as a compare (NaN stays NaN)
static __device__ __forceinline__ float nm_dev_fp8_scale(float amax) {
    float a = amax < 1e-4f ? 1e-4f : amax;
    return nm_dev_div(a, 448.0f);
}

// The amax step "a > m || a != a": a NaN gets in and is never replaced.
static __device__ __forceinline__ float nm_dev_amax(float m, float a) { return (a > m || a != a) ? a : m; }

// --- device: block reductions in a fixed order ---------------------------------------------------
// Every thread passes its partial; all get the total. A fixed tree over thread indices (no
// atomics), so the result is the same run to run. blockDim.x must be a power of two <= 1024;
// `shm` holds blockDim.x values. Ends with a barrier so shm can be reused at once.

static __device__ __forceinline__ double nm_dev_block_sum(double v, double *shm) {
    const int t = threadIdx.x;
    shm[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) shm[t] += shm[t + s];
        __syncthreads();
    }
    double total = shm[0];
    __syncthreads();
    return total;
}

static __device__ __forceinline__ double nm_dev_block_max(double v, double *shm) {
    const int t = threadIdx.x;
    shm[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) shm[t] = fmax(shm[t], shm[t + s]);
        __syncthreads();
    }
    double m = shm[0];
    __syncthreads();
    return m;
}

// amax with NaN propagation (nm_dev_amax), in float
static __device__ __forceinline__ float nm_dev_block_amax(float v, float *shm) {
    const int t = threadIdx.x;
    shm[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) shm[t] = nm_dev_amax(shm[t], shm[t + s]);
        __syncthreads();
    }
    float m = shm[0];
    __syncthreads();
    return m;
}
