// cuda_gemm.cuh: the cuBLASLt matmul the CUDA backend's GEMMs share (gemm.cu), for fp8.cu.
#pragma once

#include "ops/cuda/cuda_ops.h"

// gemm.cu: the cuBLASLt handle and workspace, made once at setup.
int nm_cuda_gemm_setup(const nm_ops *be, nm_error *err);

// Row-major C(M,N) (ldc) = alpha op(A) op(B) + beta C, A and B fp32 (bf16 == 0) or bf16
// storage (bf16 == 1), fp32 compute; ops.h gemm's contract (beta == 0 ignores C, K == 0 or
// alpha == 0 reads neither A nor B). Launches on the stream and returns; no synchronisation.
void nm_cuda_lt_matmul(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                       const void *A, int64_t lda, const void *B, int64_t ldb, int bf16, float beta, float *C,
                       int64_t ldc);
