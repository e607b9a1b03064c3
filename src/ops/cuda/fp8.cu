// fp8.cu: the CUDA backend's emulated fp8 GEMM (ops.h gemm_fp8; DeepSeek-V3 recipe,
// dsv3-spec 6.5) and the fp8 rows of the expert all-to-all (fp8_quantize_rows,
// fp8_dequantize_rows, fp8_round_rows).
//
// The emulated path, bit-comparable with src/ops/ref/fp8.c: every tile or block of an operand
// (A in 1 x 128 tiles along K; B as a weight in 128 x 128 blocks of the stored matrix, as an
// activation in 128 x 1 tiles along K) gets s = max(amax, 1e-4) / 448, each value becomes
// e4m3(x / s) * s (cuda_common.cuh: fp8.c's rounding, bit for bit), and the dequantised
// operands are multiplied by the fp32 cuBLASLt GEMM (gemm.cu).
//
// The fast path to add once it can be run on a GPU: cuBLASLt's block-scaled fp8 GEMM on e4m3
// operands, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F (1 x 128 activation scales) and
// CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F (128 x 128 weight scales) on Hopper's fp8
// tensor cores: exactly DeepSeek's scales, with its own accumulation (not bit-comparable with
// the reference, so it needs its own tolerance in tests/test_backend_ops.c).
// Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/cuda_gemm.cuh"

#define TILE 128  // NM_FP8_TILE (fp8.h)

// --- kernels ----------------------------------------------------------------------------------------

// deq(rows, cols) packed (=) x(rows, cols; ld) quantised in blocks of br x bc of the stored
// matrix, one thread block per block (block index = block row * ncb + block column).
// pass 1: the block's amax (NaN propagates); pass 2: e4m3(x / s) * s.
static __global__ void quantize_blocks_kernel(float *deq, const float *x, int64_t ld, int64_t rows, int64_t cols,
                                              int64_t br, int64_t bc, int64_t ncb) {
    __shared__ float shm[NM_CUDA_THREADS];
    const int64_t rb = blockIdx.x / ncb, cb = blockIdx.x % ncb;
    const int64_t r0 = rb * br, c0 = cb * bc;
    const int64_t h = rows - r0 < br ? rows - r0 : br, w = cols - c0 < bc ? cols - c0 : bc;
    float m = 0.0f;
    for (int64_t i = threadIdx.x; i < h * w; i += blockDim.x)
        m = nm_dev_amax(m, nm_dev_abs(x[(r0 + i / w) * ld + c0 + i % w]));
    const float s = nm_dev_fp8_scale(nm_dev_block_amax(m, shm));
    for (int64_t i = threadIdx.x; i < h * w; i += blockDim.x) {
        const int64_t r = r0 + i / w, c = c0 + i % w;
        deq[r * cols + c] = nm_dev_mul(nm_dev_e4m3_round(nm_dev_div(x[r * ld + c], s)), s);
    }
}

// One 1 x 128 tile of a row per thread block (blockDim.x == TILE): block index = row * nt +
// tile. mode 0: q and scales (quantize_rows); mode 1: x in place (round_rows).
static __global__ void rows_kernel(uint8_t *q, float *scales, float *x, int64_t D, int64_t nt, int mode) {
    __shared__ float shm[TILE];
    const int64_t r = blockIdx.x / nt, t = blockIdx.x % nt, c = t * TILE + threadIdx.x;
    const int in = c < D;
    const float v = in ? x[r * D + c] : 0.0f;
    const float s = nm_dev_fp8_scale(nm_dev_block_amax(in ? nm_dev_abs(v) : 0.0f, shm));
    if (mode == 0) {
        if (threadIdx.x == 0) scales[r * nt + t] = s;
        if (in) q[r * D + c] = nm_dev_e4m3_encode(nm_dev_div(v, s));
    } else if (in) {
        x[r * D + c] = nm_dev_mul(nm_dev_e4m3_round(nm_dev_div(v, s)), s);
    }
}

static __global__ void dequantize_rows_kernel(float *x, const uint8_t *q, const float *scales, int64_t rows,
                                              int64_t D, int64_t nt) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * D; i += (int64_t)gridDim.x * blockDim.x)
        x[i] = nm_dev_mul(nm_dev_e4m3_decode(q[i]), scales[(i / D) * nt + (i % D) / TILE]);
}

// --- launchers ----------------------------------------------------------------------------------------

static float *quantize(const nm_ops *be, const float *x, int64_t ld, int64_t rows, int64_t cols, int64_t br, int64_t bc,
                       int slot) {
    float *deq = (float *)nm_cuda_scratch(be, slot, (size_t)(rows * cols) * sizeof(float));
    const int64_t nrb = (rows + br - 1) / br, ncb = (cols + bc - 1) / bc;
    NM_CHECK(nrb * ncb <= INT32_MAX, "gemm_fp8: %lld blocks", (long long)(nrb * ncb));
    quantize_blocks_kernel<<<(unsigned)(nrb * ncb), NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(deq, x, ld, rows, cols, br,
                                                                                          bc, ncb);
    return deq;
}

void nm_cuda_gemm_fp8(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind, float beta,
                      float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_fp8 dims M=%lld N=%lld K=%lld", (long long)M, (long long)N,
             (long long)K);
    NM_CHECK(b_kind == NM_FP8_ACTIVATION || b_kind == NM_FP8_WEIGHT, "gemm_fp8 b_kind=%d", (int)b_kind);
    if (M == 0 || N == 0 || K == 0 || alpha == 0.0f) {
        // nothing is read from A or B: the fp32 GEMM's handling of C is the whole answer
        nm_cuda_lt_matmul(be, ta, tb, M, N, K, alpha, NULL, lda, NULL, ldb, 0, beta, C, ldc);
        NM_CUDA_OP_DONE("gemm_fp8");
        return;
    }
    // stored shapes: op(A) (M,K) is stored (M,K) or, transposed, (K,M); op(B) (K,N) likewise
    const int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
    const int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm_fp8 lda=%lld (need %lld) ldb=%lld (need %lld)", (long long)lda,
             (long long)a_cols, (long long)ldb, (long long)b_cols);
    // block shapes on the stored matrices: K runs along the stored columns of an untransposed
    // A and a transposed B, along the stored rows otherwise (src/ops/ref/fp8.c)
    const int64_t a_br = ta == NM_NO_TRANS ? 1 : TILE, a_bc = ta == NM_NO_TRANS ? TILE : 1;
    int64_t b_br = TILE, b_bc = TILE;
    if (b_kind == NM_FP8_ACTIVATION) {
        b_br = tb == NM_NO_TRANS ? TILE : 1;
        b_bc = tb == NM_NO_TRANS ? 1 : TILE;
    }
    const float *a = quantize(be, A, lda, a_rows, a_cols, a_br, a_bc, NM_CUDA_SCRATCH_A);
    const float *b = quantize(be, B, ldb, b_rows, b_cols, b_br, b_bc, NM_CUDA_SCRATCH_B);
    nm_cuda_lt_matmul(be, ta, tb, M, N, K, alpha, a, a_cols, b, b_cols, 0, beta, C, ldc);
    NM_CUDA_OP_DONE("gemm_fp8");
}

static void check_rows(const char *op, int64_t rows, int64_t D) {
    NM_CHECK(rows >= 0 && D > 0, "%s rows=%lld D=%lld", op, (long long)rows, (long long)D);
    NM_CHECK(rows * ((D + TILE - 1) / TILE) <= INT32_MAX, "%s: %lld rows of %lld", op, (long long)rows, (long long)D);
}

void nm_cuda_fp8_quantize_rows(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D) {
    check_rows("fp8_quantize_rows", rows, D);
    const int64_t nt = (D + TILE - 1) / TILE;
    if (rows > 0) rows_kernel<<<(unsigned)(rows * nt), TILE, 0, NM_CUDA_STREAM>>>(q, scales, (float *)x, D, nt, 0);
    NM_CUDA_OP_DONE("fp8_quantize_rows");
}

void nm_cuda_fp8_dequantize_rows(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                 int64_t D) {
    check_rows("fp8_dequantize_rows", rows, D);
    const int64_t nt = (D + TILE - 1) / TILE;
    if (rows > 0) dequantize_rows_kernel<<<nm_cuda_blocks(rows * D, 256), 256, 0, NM_CUDA_STREAM>>>(x, q, scales, rows, D, nt);
    NM_CUDA_OP_DONE("fp8_dequantize_rows");
}

void nm_cuda_fp8_round_rows(const nm_ops *be, float *x, int64_t rows, int64_t D) {
    check_rows("fp8_round_rows", rows, D);
    const int64_t nt = (D + TILE - 1) / TILE;
    if (rows > 0) rows_kernel<<<(unsigned)(rows * nt), TILE, 0, NM_CUDA_STREAM>>>(NULL, NULL, x, D, nt, 1);
    NM_CUDA_OP_DONE("fp8_round_rows");
}
