// ref_ops.h: private declarations of the reference backend's ops (src/ops/ref/*.c). Only
// ops_ref.c (which fills the nm_ops table) and the op files include this; everything else
// reaches the ops through an instance of the table (nm_backend_create(&be, "ref", ...)).
// Semantics of every function: ops.h.
//
// What the reference backend is: the readable definition of every op, in the manner of
// llm.c's train_gpt2.c: plain scalar C, one straightforward loop nest per op, sums over a
// reduction dimension accumulated in double, no OpenMP, no BLAS. It is the oracle the other
// backends are compared with (tests/test_backend_ops.c) and a second implementation of the
// nm_ops seam that trains without any library (train --set backend=ref), slowly.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ops/ops.h"

// Largest small per-row dimension (routed experts E, head dims Dn + Dr and Dv) the ops keep in
// stack arrays: ops never allocate (ops.h), so the bound is checked, as the CPU backend's.
#define NM_REF_MAX_ROW_DIM 1024

// The instance's state (ops.h: be->ctx): the scratch the bf16 and fp8 GEMMs round their
// operands into, one per instance so that two instances share none of it.
typedef struct nm_ref_ctx {
    struct {
        float *data;
        size_t cap;             // floats
    } scratch[2];               // nm_ref_scratch's slots: operand A, operand B
} nm_ref_ctx;

// --- gemm.c -------------------------------------------------------------------------------
void nm_ref_gemm(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
void nm_ref_gemm_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                         const nm_gemm_group *groups, int64_t n);

// --- gemm_bf16.c --------------------------------------------------------------------------
void nm_ref_gemm_bf16(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type, int64_t ldb,
                      float beta, float *C, int64_t ldc);
void nm_ref_gemm_bf16_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                              const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type);
nm_dtype nm_ref_gemm_bf16_weight_type(const nm_ops *be);
void nm_ref_round_bf16(const nm_ops *be, float *dst, const float *src, int64_t n);
void nm_ref_cast_bf16(const nm_ops *be, uint16_t *dst, const float *src, int64_t n);
void nm_ref_widen_bf16(const nm_ops *be, float *dst, const uint16_t *src, int64_t n);
void nm_ref_round_cast_bf16(const nm_ops *be, float *x, uint16_t *bits, int64_t n);
// Scratch of at least n floats, owned by the module and grown only when a larger n is first
// asked for (slot 0 or 1: the two operands of one GEMM). Shared by the bf16 and fp8 GEMMs,
// which hold their operands' rounded values in it; one calling thread, like every op.
float *nm_ref_scratch(const nm_ops *be, int slot, size_t n);

// --- fp8.c --------------------------------------------------------------------------------
void nm_ref_gemm_fp8(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind, float beta,
                     float *C, int64_t ldc);

// --- elementwise.c ------------------------------------------------------------------------
void nm_ref_zero(const nm_ops *be, float *x, int64_t n);
void nm_ref_axpy(const nm_ops *be, float *y, const float *x, float alpha, int64_t n);
void nm_ref_copy_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols);
void nm_ref_add_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                   int64_t cols);
void nm_ref_embedding_forward(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                              int64_t D);
void nm_ref_embedding_backward(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                               int64_t D);

// --- rmsnorm.c ----------------------------------------------------------------------------
void nm_ref_rmsnorm_forward(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                            int64_t D, float eps);
void nm_ref_rmsnorm_backward(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int64_t N, int64_t D);

// --- swiglu.c -----------------------------------------------------------------------------
void nm_ref_swiglu_forward(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F);
void nm_ref_swiglu_backward(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                            int64_t F);
void nm_ref_swiglu_forward_bf16(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                int64_t F);
void nm_ref_swiglu_backward_bf16(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                 const float *gate_up, int64_t N, int64_t F);

// --- rope.c -------------------------------------------------------------------------------
void nm_ref_rope_forward(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                         int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);
void nm_ref_rope_backward(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);

// --- attention.c --------------------------------------------------------------------------
void nm_ref_attention_forward(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                              const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                              float scale);
void nm_ref_attention_backward(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch, const float *dout,
                               const float *q, const float *kv, const float *k_pe, const float *out,
                               const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr,
                               int64_t Dv, float scale);

// --- xent.c -------------------------------------------------------------------------------
void nm_ref_xent_forward(const nm_ops *be, float *losses, float *lse, const float *logits, const int32_t *targets,
                         int64_t N, int64_t V);
void nm_ref_xent_backward(const nm_ops *be, float *dlogits, const float *logits, const float *lse,
                          const int32_t *targets, float scale, int64_t N, int64_t V);
void nm_ref_xent_tile_forward(const nm_ops *be, float *losses, float *lse, double *stats, const float *logits,
                              int64_t ld, const int32_t *targets, int64_t N, int64_t V, int64_t v0, int64_t Vt);
void nm_ref_xent_tile_backward(const nm_ops *be, float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                               const float *lse, const int32_t *targets, float scale, int64_t N, int64_t V, int64_t v0,
                               int64_t Vt);

// --- router.c -----------------------------------------------------------------------------
void nm_ref_router_forward(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                           const float *bias, const nm_router_params *p);
void nm_ref_router_backward(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                            const int32_t *topk_idx, const nm_router_params *p);
double nm_ref_balance_loss_forward(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                   int64_t K);
void nm_ref_balance_loss_backward(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                  int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring);

// --- moe_dispatch.c -----------------------------------------------------------------------
void nm_ref_moe_permute(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx, int64_t N,
                        int64_t K, int64_t E);
void nm_ref_moe_gather(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                       int64_t D);
void nm_ref_moe_gather_bf16(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                            int64_t N, int64_t K, int64_t D);
void nm_ref_moe_combine_forward(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                const int32_t *perm, int64_t N, int64_t K, int64_t D);
void nm_ref_moe_combine_backward(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                 const float *expert_out, const float *topk_weight, const int32_t *perm, int64_t N,
                                 int64_t K, int64_t D);
void nm_ref_moe_scatter_add(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N, int64_t K,
                            int64_t D);

// --- optim.c --------------------------------------------------------------------------------
void nm_ref_sumsq_chunks(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n);
void nm_ref_scale_chunks(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n);
int64_t nm_ref_first_nonfinite(const nm_ops *be, const float *x, int64_t n);
void nm_ref_adamw_chunks(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                         const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k);
void nm_ref_router_bias_update(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma);

// --- fp8.c: rows for the expert all-to-all ----------------------------------------------------
void nm_ref_fp8_quantize_rows(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D);
void nm_ref_fp8_dequantize_rows(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                int64_t D);
void nm_ref_fp8_round_rows(const nm_ops *be, float *x, int64_t rows, int64_t D);
