// gemm.cu: the CUDA backend's fp32 and bf16 GEMMs (ops.h gemm, gemm_grouped, gemm_bf16,
// gemm_bf16_grouped) through cuBLASLt, and the one matmul call the fp8 GEMM shares.
//
// Row-major through column-major: cuBLASLt is column-major, and a row-major matrix X stored
// with leading dimension ld is the column-major matrix X^T with the same ld. So the row-major
// C(M,N) = op(A) op(B) is computed as the column-major C^T(N,M) = op(B)^T op(A)^T: cuBLASLt's
// "A" is our B (transposed as tb says), its "B" is our A (as ta says), m = N, n = M, k = K.
//
// fp32 runs with CUBLAS_COMPUTE_32F: true fp32 products and sums, no TF32 (the CPU backends
// multiply in fp32; TF32 would be a precision choice of its own). bf16 runs bf16 x bf16 with
// fp32 accumulation into an fp32 C, the operands converted on the device into backend scratch
// when they arrive as fp32 (NM_F32 rounded to nearest even, NM_F32_BF16 taken as it is).
//
// Not here yet: cached algorithm choices per shape (each call asks cuBLASLt's heuristic, a few
// microseconds), grouped GEMMs as one cuBLASLt grouped call (the groups run one after another
// on the stream), TF32 as an option. Compiled, not yet run on a GPU.
#include <cublasLt.h>

#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/cuda_gemm.cuh"

// The instance's part of nm_cuda_ctx: made at setup, freed with the instance.
struct nm_cuda_gemm_state {
    cublasLtHandle_t lt;
    void *workspace;            // workspace_bytes of device memory
};

static const size_t workspace_bytes = (size_t)32 << 20;  // cuBLAS's own advice for Hopper: 32 MiB

static void lt_check(cublasStatus_t s, const char *call, const char *file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS)
        nm_panic(file, line, "backend cuda: %s failed: %s (%s)", call, cublasLtGetStatusString(s),
                 cublasLtGetStatusName(s));
}
#define NM_LT_CALL(call) lt_check((call), #call, __FILE__, __LINE__)

int nm_cuda_gemm_setup(const nm_ops *be, nm_error *err) {
    nm_cuda_ctx *ctx = nm_cuda_ctx_of(be);
    if (ctx->gemm) return 0;
    nm_cuda_gemm_state *g = (nm_cuda_gemm_state *)nm_calloc(1, sizeof *g);
    cublasStatus_t s = cublasLtCreate(&g->lt);
    if (s != CUBLAS_STATUS_SUCCESS) {
        nm_free(g);
        return nm_error_set(err, "backend cuda: cublasLtCreate failed: %s", cublasLtGetStatusString(s));
    }
    cudaError_t e = cudaMalloc(&g->workspace, workspace_bytes);
    if (e != cudaSuccess) {
        cublasLtDestroy(g->lt);
        nm_free(g);
        return nm_error_set(err, "backend cuda: cudaMalloc of the cuBLASLt workspace (%zu bytes) failed: %s",
                            workspace_bytes, cudaGetErrorString(e));
    }
    ctx->gemm = g;
    return 0;
}

void nm_cuda_gemm_state_destroy(nm_cuda_gemm_state *g) {
    if (!g) return;
    if (g->workspace) NM_CUDA_CALL(cudaFree(g->workspace));
    NM_LT_CALL(cublasLtDestroy(g->lt));
    nm_free(g);
}

// The largest power of two (<= 256) the address is a multiple of: cuBLASLt's heuristic assumes
// 256-byte aligned operands unless told otherwise, and the grouped GEMMs' operands start at
// arbitrary rows of a larger matrix.
static uint32_t alignment(const void *p) {
    uint32_t a = 256;
    while (a > 1 && ((uintptr_t)p % a) != 0) a >>= 1;
    return a;
}


// --- kernels ----------------------------------------------------------------------------------------

// C(M,N) (=) beta * C, or 0 where beta == 0 (the old C may be NaN): a GEMM with nothing to
// multiply (K == 0 or alpha == 0).
static __global__ void scale_kernel(int64_t M, int64_t N, float beta, float *C, int64_t ldc) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * N; i += (int64_t)gridDim.x * blockDim.x) {
        float *c = &C[(i / N) * ldc + i % N];
        *c = beta == 0.0f ? 0.0f : beta * *c;
    }
}

// dst(rows, cols) packed (=) bf16 of src(rows, cols; ld) stored as `type` (NM_F32: rounded to
// nearest even; NM_F32_BF16: holds bf16 values, the same rounding keeps them as they are).
static __global__ void to_bf16_kernel(uint16_t *dst, const float *src, int64_t rows, int64_t cols, int64_t ld) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * cols;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = nm_dev_f32_to_bf16(src[(i / cols) * ld + i % cols]);
}

static void scale_kernel_launch(int64_t M, int64_t N, float beta, float *C, int64_t ldc) {
    scale_kernel<<<nm_cuda_blocks(M * N, 256), 256, 0, NM_CUDA_STREAM>>>(M, N, beta, C, ldc);
}

// --- the matmul -----------------------------------------------------------------------------------

void nm_cuda_lt_matmul(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                       const void *A, int64_t lda, const void *B, int64_t ldb, int bf16, float beta, float *C,
                       int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm dims M=%lld N=%lld K=%lld", (long long)M, (long long)N, (long long)K);
    NM_CHECK((ta == NM_NO_TRANS || ta == NM_TRANS) && (tb == NM_NO_TRANS || tb == NM_TRANS),
             "gemm transpose flags %d %d", (int)ta, (int)tb);
    if (M == 0 || N == 0) return;
    NM_CHECK(ldc >= N, "gemm ldc=%lld < N=%lld", (long long)ldc, (long long)N);
    if (K == 0 || alpha == 0.0f) {
        // A and B are not read (they may hold anything): C becomes beta * C
        scale_kernel_launch(M, N, beta, C, ldc);
        return;
    }
    NM_CHECK(lda >= (ta == NM_NO_TRANS ? K : M) && ldb >= (tb == NM_NO_TRANS ? N : K),
             "gemm lda=%lld ldb=%lld too small for M=%lld N=%lld K=%lld", (long long)lda, (long long)ldb,
             (long long)M, (long long)N, (long long)K);
    const nm_cuda_gemm_state *g = nm_cuda_ctx_of(be)->gemm;
    NM_CHECK(g != NULL, "backend cuda: a GEMM before setup (be->setup)");
    // beta == 0 ignores C's old contents, which may be NaN (ops.h): C is cleared first, so the
    // answer does not depend on whether a cuBLASLt kernel reads C when beta is 0.
    if (beta == 0.0f)
        NM_CUDA_CALL(cudaMemset2DAsync(C, (size_t)ldc * sizeof(float), 0, (size_t)N * sizeof(float), (size_t)M,
                                       NM_CUDA_STREAM));
    const cudaDataType_t ab = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    NM_LT_CALL(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // cuBLASLt's A is our B, its B our A (the file comment): the transposes swap with them
    const cublasOperation_t op_a = tb == NM_TRANS ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = ta == NM_TRANS ? CUBLAS_OP_T : CUBLAS_OP_N;
    NM_LT_CALL(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    NM_LT_CALL(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    // column-major shapes as stored: our B is (K,N) row-major untransposed = (N,K) column-major
    NM_LT_CALL(cublasLtMatrixLayoutCreate(&la, ab, tb == NM_NO_TRANS ? N : K, tb == NM_NO_TRANS ? K : N, ldb));
    NM_LT_CALL(cublasLtMatrixLayoutCreate(&lb, ab, ta == NM_NO_TRANS ? K : M, ta == NM_NO_TRANS ? M : K, lda));
    NM_LT_CALL(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, N, M, ldc));
    cublasLtMatmulPreference_t pref;
    NM_LT_CALL(cublasLtMatmulPreferenceCreate(&pref));
    NM_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                    sizeof workspace_bytes));
    const uint32_t al_a = alignment(B), al_b = alignment(A), al_c = alignment(C);
    NM_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
    NM_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
    NM_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c));
    NM_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c));
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    // "no algorithm" comes back either as found == 0 or as CUBLAS_STATUS_NOT_SUPPORTED: both get
    // the message that names the GEMM
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(g->lt, desc, la, lb, lc, lc, pref, 1, &heur, &found);
    if (hs != CUBLAS_STATUS_SUCCESS || found < 1)
        nm_panic(__FILE__, __LINE__, "backend cuda: cuBLASLt has no %s algorithm for %c%c M=%lld N=%lld K=%lld "
                 "lda=%lld ldb=%lld ldc=%lld (alignments A %u B %u C %u bytes): %s", bf16 ? "bf16" : "fp32",
                 ta ? 'T' : 'N', tb ? 'T' : 'N', (long long)M, (long long)N, (long long)K, (long long)lda,
                 (long long)ldb, (long long)ldc, al_b, al_a, al_c,
                 hs != CUBLAS_STATUS_SUCCESS ? cublasLtGetStatusString(hs) : "no algorithm returned");
    NM_LT_CALL(cublasLtMatmul(g->lt, desc, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &heur.algo, g->workspace,
                              workspace_bytes, NM_CUDA_STREAM));
    NM_LT_CALL(cublasLtMatmulPreferenceDestroy(pref));
    NM_LT_CALL(cublasLtMatrixLayoutDestroy(lc));
    NM_LT_CALL(cublasLtMatrixLayoutDestroy(lb));
    NM_LT_CALL(cublasLtMatrixLayoutDestroy(la));
    NM_LT_CALL(cublasLtMatmulDescDestroy(desc));
}

// --- fp32 -------------------------------------------------------------------------------------------

void nm_cuda_gemm(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                  const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    nm_cuda_lt_matmul(be, ta, tb, M, N, K, alpha, A, lda, B, ldb, 0, beta, C, ldc);
    NM_CUDA_OP_DONE("gemm");
}

void nm_cuda_gemm_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                          const nm_gemm_group *groups, int64_t n) {
    NM_CHECK(n >= 0, "gemm_grouped n=%lld", (long long)n);
    // groups is host memory (the model's table of the layer's experts): read here, on the host
    for (int64_t g = 0; g < n; g++) {
        const nm_gemm_group *x = &groups[g];
        nm_cuda_lt_matmul(be, ta, tb, x->M, x->N, x->K, alpha, x->A, x->lda, x->B, x->ldb, 0, beta, x->C, x->ldc);
    }
    NM_CUDA_OP_DONE("gemm_grouped");
}

// --- bf16 -------------------------------------------------------------------------------------------

// The operand as the bf16 GEMM reads it: NM_BF16 storage directly (with its ld); fp32 storage
// converted into scratch `slot`, packed (*ld_out = stored columns).
static const void *bf16_operand(const nm_ops *be, const void *x, nm_dtype type, int64_t rows, int64_t cols, int64_t ld,
                                int slot, int64_t *ld_out) {
    NM_CHECK(type == NM_F32 || type == NM_BF16 || type == NM_F32_BF16, "gemm_bf16 operand type %d", (int)type);
    if (type == NM_BF16) {
        *ld_out = ld;
        return x;
    }
    uint16_t *d = (uint16_t *)nm_cuda_scratch(be, slot, (size_t)(rows * cols > 0 ? rows * cols : 1) * sizeof(uint16_t));
    to_bf16_kernel<<<nm_cuda_blocks(rows * cols, 256), 256, 0, NM_CUDA_STREAM>>>(d, (const float *)x, rows, cols, ld);
    *ld_out = cols;
    return d;
}

static void gemm_bf16_one(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K,
                          float alpha, const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type,
                          int64_t ldb, float beta, float *C, int64_t ldc) {
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_bf16 dims M=%lld N=%lld K=%lld", (long long)M, (long long)N,
             (long long)K);
    if (M == 0 || N == 0 || K == 0 || alpha == 0.0f) {
        // nothing is read from A or B: the fp32 GEMM's handling of C is the whole answer
        nm_cuda_lt_matmul(be, ta, tb, M, N, K, alpha, NULL, lda, NULL, ldb, 1, beta, C, ldc);
        return;
    }
    // stored shapes: op(A) (M,K) is stored (M,K) or, transposed, (K,M); op(B) likewise
    const int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
    const int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm_bf16 lda=%lld (need %lld) ldb=%lld (need %lld)", (long long)lda,
             (long long)a_cols, (long long)ldb, (long long)b_cols);
    int64_t la, lb;
    const void *a = bf16_operand(be, A, a_type, a_rows, a_cols, lda, NM_CUDA_SCRATCH_A, &la);
    const void *b = bf16_operand(be, B, b_type, b_rows, b_cols, ldb, NM_CUDA_SCRATCH_B, &lb);
    nm_cuda_lt_matmul(be, ta, tb, M, N, K, alpha, a, la, b, lb, 1, beta, C, ldc);
}

void nm_cuda_gemm_bf16(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                       const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type, int64_t ldb,
                       float beta, float *C, int64_t ldc) {
    gemm_bf16_one(be, ta, tb, M, N, K, alpha, A, a_type, lda, B, b_type, ldb, beta, C, ldc);
    NM_CUDA_OP_DONE("gemm_bf16");
}

void nm_cuda_gemm_bf16_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                               const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type) {
    NM_CHECK(n >= 0, "gemm_bf16_grouped n=%lld", (long long)n);
    // One group after another on the stream: group g + 1's conversion into the same scratch is
    // ordered after group g's matmul has read it.
    for (int64_t g = 0; g < n; g++) {
        const nm_gemm_group *x = &groups[g];
        gemm_bf16_one(be, ta, tb, x->M, x->N, x->K, alpha, x->A, a_type, x->lda, x->B, b_type, x->ldb, beta, x->C, x->ldc);
    }
    NM_CUDA_OP_DONE("gemm_bf16_grouped");
}

// cuBLASLt multiplies bf16 storage directly: the model's weight copy is best kept as bf16
// (half the bytes of the NM_F32_BF16 copy, no conversion per call).
nm_dtype nm_cuda_gemm_bf16_weight_type(const nm_ops *be) { return NM_BF16; }
