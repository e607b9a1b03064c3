// cuda_ops.h: private declarations of the CUDA backend's ops (src/ops/cuda/*.cu) and of its
// runtime (runtime.cu). Only ops_cuda.c (which fills the nm_ops table) and the .cu files
// include this; everything else reaches the ops through an instance (nm_backend_create(&be, "cuda", ...)).
// Semantics of every function: ops.h. Plain C declarations, so the table is built by the C
// compiler while the .cu files (C++ under nvcc) define them with C linkage.
//
// What the backend is today (issue 29, first step): every op on the device, correct first.
// Memory is CUDA managed memory (cudaMallocManaged), so the model's few host-side reads
// (loss sums, expert offsets, checkpoint reads) keep working unchanged; and every op
// synchronises its stream before it returns, so that what it wrote is visible to the host
// the moment it returns, as on the CPU backends. That synchronisation is the first, slow step:
// it serialises host and device at every op. It goes once the host reads go through the
// table's copy ops and the loss sums stay on the device (docs/architecture.md, backends).
// Compiled and linked in every build with the toolkit; NOT yet run on a GPU.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define _Noreturn [[noreturn]]  // check.h is C11; nvcc compiles .cu files as C++
extern "C" {
#endif

#include "ops/ops.h"

// Largest per-row dimension kept in fixed per-block scratch (routed experts E for the router,
// head dims for attention): the reference backend's bound, so that one config runs on both.
#define NM_CUDA_MAX_ROW_DIM 1024

// --- runtime.cu -----------------------------------------------------------------------------
// The instance's state (cuda_common.cuh: nm_cuda_ctx): made empty, the device probed at setup.
int nm_cuda_ctx_create(void **ctx, nm_error *err);
void nm_cuda_ctx_destroy(void *ctx);
int nm_cuda_setup(const nm_ops *be, nm_error *err);
const char *nm_cuda_kernel_names(const nm_ops *be);
void *nm_cuda_alloc(const nm_ops *be, size_t bytes);
void nm_cuda_free(const nm_ops *be, void *p);
void nm_cuda_copy(const nm_ops *be, void *dst, const void *src, size_t bytes);
void nm_cuda_memset(const nm_ops *be, void *dst, int value, size_t bytes);
void nm_cuda_discard(const nm_ops *be, void *dst, size_t bytes);
void nm_cuda_synchronize(const nm_ops *be);
double nm_cuda_measure_peak(const nm_ops *be, int bf16);

// --- gemm.cu --------------------------------------------------------------------------------
void nm_cuda_gemm(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                  const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
void nm_cuda_gemm_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                          const nm_gemm_group *groups, int64_t n);
void nm_cuda_gemm_bf16(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                       const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type, int64_t ldb,
                       float beta, float *C, int64_t ldc);
void nm_cuda_gemm_bf16_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                               const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type);
nm_dtype nm_cuda_gemm_bf16_weight_type(const nm_ops *be);

// --- fp8.cu ---------------------------------------------------------------------------------
void nm_cuda_gemm_fp8(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind, float beta,
                      float *C, int64_t ldc);
void nm_cuda_fp8_quantize_rows(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D);
void nm_cuda_fp8_dequantize_rows(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                 int64_t D);
void nm_cuda_fp8_round_rows(const nm_ops *be, float *x, int64_t rows, int64_t D);

// --- elementwise.cu -------------------------------------------------------------------------
void nm_cuda_round_bf16(const nm_ops *be, float *dst, const float *src, int64_t n);
void nm_cuda_cast_bf16(const nm_ops *be, uint16_t *dst, const float *src, int64_t n);
void nm_cuda_widen_bf16(const nm_ops *be, float *dst, const uint16_t *src, int64_t n);
void nm_cuda_round_cast_bf16(const nm_ops *be, float *x, uint16_t *bits, int64_t n);
void nm_cuda_zero(const nm_ops *be, float *x, int64_t n);
void nm_cuda_axpy(const nm_ops *be, float *y, const float *x, float alpha, int64_t n);
void nm_cuda_copy_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                     int64_t cols);
void nm_cuda_add_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols);
void nm_cuda_embedding_forward(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                               int64_t D);
void nm_cuda_embedding_backward(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                                int64_t D);

// --- rmsnorm.cu -----------------------------------------------------------------------------
void nm_cuda_rmsnorm_forward(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                             int64_t D, float eps);
void nm_cuda_rmsnorm_backward(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                              const float *w, const float *rstd, int64_t N, int64_t D);

// --- swiglu.cu ------------------------------------------------------------------------------
void nm_cuda_swiglu_forward(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F);
void nm_cuda_swiglu_backward(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                             int64_t F);
void nm_cuda_swiglu_forward_bf16(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                 int64_t F);
void nm_cuda_swiglu_backward_bf16(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                  const float *gate_up, int64_t N, int64_t F);

// --- rope.cu --------------------------------------------------------------------------------
void nm_cuda_rope_forward(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);
void nm_cuda_rope_backward(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                           int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);

// --- attention.cu ---------------------------------------------------------------------------
void nm_cuda_attention_forward(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                               const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                               float scale);
void nm_cuda_attention_backward(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch,
                                const float *dout, const float *q, const float *kv, const float *k_pe, const float *out,
                                const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                                float scale);

// --- xent.cu --------------------------------------------------------------------------------
void nm_cuda_xent_forward(const nm_ops *be, float *losses, float *lse, const float *logits, const int32_t *targets,
                          int64_t N, int64_t V);
void nm_cuda_xent_backward(const nm_ops *be, float *dlogits, const float *logits, const float *lse,
                           const int32_t *targets, float scale, int64_t N, int64_t V);
void nm_cuda_xent_tile_forward(const nm_ops *be, float *losses, float *lse, double *stats, const float *logits,
                               int64_t ld, const int32_t *targets, int64_t N, int64_t V, int64_t v0, int64_t Vt);
void nm_cuda_xent_tile_backward(const nm_ops *be, float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                                const float *lse, const int32_t *targets, float scale, int64_t N, int64_t V, int64_t v0,
                                int64_t Vt);

// --- router.cu ------------------------------------------------------------------------------
void nm_cuda_router_forward(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                            const float *bias, const nm_router_params *p);
void nm_cuda_router_backward(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                             const int32_t *topk_idx, const nm_router_params *p);
double nm_cuda_balance_loss_forward(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                    int64_t K);
void nm_cuda_balance_loss_backward(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                   int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring);

// --- moe_dispatch.cu ------------------------------------------------------------------------
void nm_cuda_moe_permute(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx, int64_t N,
                         int64_t K, int64_t E);
void nm_cuda_moe_gather(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                        int64_t D);
void nm_cuda_moe_gather_bf16(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                             int64_t N, int64_t K, int64_t D);
void nm_cuda_moe_combine_forward(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                 const int32_t *perm, int64_t N, int64_t K, int64_t D);
void nm_cuda_moe_combine_backward(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                  const float *expert_out, const float *topk_weight, const int32_t *perm, int64_t N,
                                  int64_t K, int64_t D);
void nm_cuda_moe_scatter_add(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N,
                             int64_t K, int64_t D);

// --- optim.cu -------------------------------------------------------------------------------
void nm_cuda_sumsq_chunks(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n);
void nm_cuda_scale_chunks(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n);
int64_t nm_cuda_first_nonfinite(const nm_ops *be, const float *x, int64_t n);
void nm_cuda_adamw_chunks(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                          const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k);
void nm_cuda_router_bias_update(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma);

#ifdef __cplusplus
}
#endif
