// cpu_ops.h: private declarations of the CPU backend's op implementations (src/ops/cpu/*.c).
// Only ops_cpu.c (which fills the nm_ops table) and the op files include this; everything
// else reaches the ops through an instance of the table (nm_backend_create(&be, "cpu", ...)).
// Semantics of every function: ops.h.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "ops/ops.h"

// Upper bound on small per-row dimensions that CPU ops keep in stack arrays (E for the
// router, head dims for attention). Ops never allocate (ops.h), so the bound is checked.
#define NM_CPU_MAX_STACK_DIM 1024

// --- the instance's state (ops.h: be->ctx) ---------------------------------------------------
// Everything the CPU ops keep between calls, one per instance (ops_cpu.c makes and frees it), so
// that two instances in one process share no mutable state. What stays process-wide is so by
// nature: OpenMP's and OpenBLAS's thread counts (set_threads), the environment the kernels are
// read from, and oneDNN's and OpenBLAS's own internal caches.
typedef struct nm_cpu_bf16_state nm_cpu_bf16_state;  // gemm_bf16.c: oneDNN engine, stream, primitives, scratch

typedef struct nm_cpu_ctx {
    int gemm_library;           // gemm.c: the fp32 GEMM library, 0 until NM_CPU_GEMM is read (first use)
    int64_t *grouped_order;     // gemm.c: gemm_grouped's largest-first order (grouped_cap)
    int64_t grouped_cap;
    nm_cpu_bf16_state *bf16;    // gemm_bf16.c
    float *fp8_scratch;         // fp8.c: the dequantised operands and their scales (fp8_floats)
    size_t fp8_floats;
    char kernel_names[96];      // ops_cpu.c: kernel_names's answer, made on the first call
} nm_cpu_ctx;

static inline nm_cpu_ctx *nm_cpu_ctx_of(const nm_ops *be) {
    NM_CHECK(be && be->ctx, "backend cpu: an op called through a table that is no instance (nm_backend_create)");
    return (nm_cpu_ctx *)be->ctx;
}

// gemm_bf16.c's part of the state: made empty (oneDNN starts at the first use or at setup),
// freed with everything it made.
nm_cpu_bf16_state *nm_cpu_bf16_state_create(void);
void nm_cpu_bf16_state_destroy(nm_cpu_bf16_state *s);

// --- gemm.c -------------------------------------------------------------------------------
// C(M,N) (=) beta * C; beta == 0 writes exact zeros (old contents may be NaN). Shared by the GEMMs.
void nm_cpu_scale_matrix(float *C, int64_t ldc, int64_t M, int64_t N, float beta);
void nm_cpu_gemm(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc);
// "onednn" or "openblas": the library nm_cpu_gemm calls (NM_CPU_GEMM, read once).
const char *nm_cpu_gemm_library(const nm_ops *be);
// Reads NM_CPU_GEMM; -1 with err for a value other than onednn or openblas.
int nm_cpu_gemm_setup(const nm_ops *be, nm_error *err);
// Sets the fp32 GEMM library by name (onednn|openblas); -1 for another name.
int nm_cpu_gemm_set_library(const nm_ops *be, const char *name);
void nm_cpu_gemm_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                         const nm_gemm_group *groups, int64_t n);

// --- gemm_bf16.c --------------------------------------------------------------------------
void nm_cpu_gemm_bf16(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type,
                      int64_t ldb, float beta, float *C, int64_t ldc);
void nm_cpu_cast_bf16(const nm_ops *be, uint16_t *dst, const float *src, int64_t n);
void nm_cpu_widen_bf16(const nm_ops *be, float *dst, const uint16_t *src, int64_t n);
void nm_cpu_round_bf16(const nm_ops *be, float *dst, const float *src, int64_t n);
void nm_cpu_round_cast_bf16(const nm_ops *be, float *x, uint16_t *bits, int64_t n);
nm_dtype nm_cpu_gemm_bf16_weight_type(const nm_ops *be);
void nm_cpu_gemm_bf16_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                              const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type);
// Reads NM_CPU_BF16_GEMM and sets up oneDNN; -1 with err for a bad value, or for onednn
// forced where oneDNN has no bf16 matmul. Called by the backend's setup (ops.h).
int nm_cpu_gemm_bf16_setup(const nm_ops *be, nm_error *err);
// 1 when oneDNN can run the bf16 matmul on this CPU (under any ONEDNN_MAX_CPU_ISA cap), else 0
// with the reason in why.
int nm_cpu_gemm_bf16_onednn_usable(const nm_ops *be, char *why, size_t why_size);
// oneDNN's effective ISA ("avx2", "avx512_core_bf16", ...).
const char *nm_cpu_isa_name(void);
// "onednn" or "widen": the kernel gemm_bf16 runs (NM_CPU_BF16_GEMM, AMX detection).
const char *nm_cpu_gemm_bf16_kernel(const nm_ops *be);
// Sets the bf16 GEMM kernel by name (onednn|widen); -1 for another name.
int nm_cpu_gemm_bf16_set_kernel(const nm_ops *be, const char *name);

// --- elementwise.c ------------------------------------------------------------------------
void nm_cpu_zero(const nm_ops *be, float *x, int64_t n);
void nm_cpu_axpy(const nm_ops *be, float *y, const float *x, float alpha, int64_t n);
void nm_cpu_copy_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols);
void nm_cpu_add_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                   int64_t cols);
void nm_cpu_embedding_forward(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                              int64_t D);
void nm_cpu_embedding_backward(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                               int64_t D);

// --- rmsnorm.c ----------------------------------------------------------------------------
void nm_cpu_rmsnorm_forward(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                            int64_t D, float eps);
void nm_cpu_rmsnorm_backward(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int64_t N, int64_t D);

// --- swiglu.c -----------------------------------------------------------------------------
void nm_cpu_swiglu_forward(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F);
void nm_cpu_swiglu_backward(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                            int64_t F);
void nm_cpu_swiglu_forward_bf16(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                int64_t F);
void nm_cpu_swiglu_backward_bf16(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                 const float *gate_up, int64_t N, int64_t F);

// --- rope.c -------------------------------------------------------------------------------
void nm_cpu_rope_forward(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                         int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);
void nm_cpu_rope_backward(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);

// --- attention.c --------------------------------------------------------------------------
void nm_cpu_attention_forward(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                              const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                              float scale);
void nm_cpu_attention_backward(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch, const float *dout,
                               const float *q, const float *kv, const float *k_pe, const float *out,
                               const float *lse, int64_t B, int64_t T, int64_t H, int64_t Dn,
                               int64_t Dr, int64_t Dv, float scale);

// --- xent.c -------------------------------------------------------------------------------
void nm_cpu_xent_forward(const nm_ops *be, float *losses, float *lse, const float *logits, const int32_t *targets,
                         int64_t N, int64_t V);
void nm_cpu_xent_backward(const nm_ops *be, float *dlogits, const float *logits, const float *lse,
                          const int32_t *targets, float scale, int64_t N, int64_t V);
void nm_cpu_xent_tile_forward(const nm_ops *be, float *losses, float *lse, double *stats, const float *logits,
                              int64_t ld, const int32_t *targets, int64_t N, int64_t V, int64_t v0, int64_t Vt);
void nm_cpu_xent_tile_backward(const nm_ops *be, float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                               const float *lse, const int32_t *targets, float scale, int64_t N, int64_t V, int64_t v0,
                               int64_t Vt);

// --- router.c -----------------------------------------------------------------------------
void nm_cpu_router_forward(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                           const float *bias, const nm_router_params *p);
void nm_cpu_router_backward(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                            const int32_t *topk_idx, const nm_router_params *p);
double nm_cpu_balance_loss_forward(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                   int64_t K);
void nm_cpu_balance_loss_backward(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                  int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring);

// --- moe_dispatch.c -----------------------------------------------------------------------
void nm_cpu_moe_permute(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx, int64_t N,
                        int64_t K, int64_t E);
void nm_cpu_moe_gather(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                       int64_t D);
void nm_cpu_moe_gather_bf16(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                            int64_t N, int64_t K, int64_t D);
void nm_cpu_moe_combine_forward(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                const int32_t *perm, int64_t N, int64_t K, int64_t D);
void nm_cpu_moe_combine_backward(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                 const float *expert_out, const float *topk_weight, const int32_t *perm,
                                 int64_t N, int64_t K, int64_t D);
void nm_cpu_moe_scatter_add(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N, int64_t K,
                            int64_t D);

// --- fp8.c (quantiser helpers for tests: fp8.h) ----------------------------------------------
void nm_cpu_gemm_fp8(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind,
                     float beta, float *C, int64_t ldc);

// --- optim.c --------------------------------------------------------------------------------
void nm_cpu_sumsq_chunks(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n);
void nm_cpu_scale_chunks(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n);
int64_t nm_cpu_first_nonfinite(const nm_ops *be, const float *x, int64_t n);
void nm_cpu_adamw_chunks(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                         const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k);
void nm_cpu_router_bias_update(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma);

// --- tuning.c: the hooks (ops.h: tune, measure_peak) ----------------------------------------
// Sets the fp32 (onednn|openblas) and bf16 (onednn|widen) GEMM kernels for this run.
// run_dir/kernels.json, when present and made for the same CPU model, libraries, threads
// and shape set, is reused as is (a resume picks what the run it continues picked); a file
// that does not parse is an error naming it. Otherwise, when `measure` is set, each
// candidate is timed on the shapes and the faster over the whole set wins; the file is then
// written atomically. NM_CPU_GEMM / NM_CPU_BF16_GEMM (not "auto") force a kernel and skip its
// measurement; NM_CPU_KERNELS=default never measures (static defaults). `desc` gets one line
// for the banner.
int nm_cpu_tune(const nm_ops *be, const nm_gemm_shape *shapes, int n_shapes, const char *run_dir, int measure,
                char *desc, size_t desc_size, nm_error *err);
double nm_cpu_measure_peak(const nm_ops *be, int bf16);

// Room for a kernel name ("onednn", "openblas", "widen") with its NUL.
#define NM_KERNEL_NAME_SIZE 16

// --- tuning_parse.c -------------------------------------------------------------------------
// Parses the text of a kernels.json (size bytes, NUL not needed) written for `key`: 1 when it
// is a pick for that key (fp32 and bf16, NM_KERNEL_NAME_SIZE bytes each, get the kernel
// names), 0 when it is one for another key (fp32 and bf16 untouched), -1 with err naming path
// when it is not a JSON object with string fields key, fp32 onednn|openblas and bf16
// onednn|widen (its own file, so it links without the GEMM libraries).
int nm_kernels_parse(const char *text, size_t size, const char *path, const char *key, char *fp32, char *bf16,
                     nm_error *err);

// --- fp8.c: rows for the expert all-to-all ----------------------------------------------------
void nm_cpu_fp8_quantize_rows(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D);
void nm_cpu_fp8_dequantize_rows(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                int64_t D);
void nm_cpu_fp8_round_rows(const nm_ops *be, float *x, int64_t rows, int64_t D);
