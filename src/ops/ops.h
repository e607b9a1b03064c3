// ops.h: every numeric kernel the model uses, as forward/backward pairs over raw buffers
// with explicit shapes (design.md 3, style.md 3.5). A backend is a table of these functions
// plus its private state: an instance, created by name with nm_backend_create ("cpu": C +
// OpenMP, GEMMs through oneDNN / OpenBLAS; "ref": scalar C, the readable definition of every
// op; "cuda" where built) or nm_backend_select (NM_BACKEND, else the `backend` key), and
// destroyed by whoever created it with nm_backend_destroy. The model is written once against
// this table.
//
// Conventions
//  - All buffers are fp32, row-major, contiguous unless a leading dimension is given.
//  - Argument order: outputs, saved-for-backward outputs, inputs, weights, dims, options.
//    Backward: input grads, param grads, dout, saved activations, weights, dims.
//  - Gradient contract (llm.c's layernorm.cuh rule, stated once here):
//      * parameter gradients ACCUMULATE (+=), so micro-batches accumulate;
//      * activation gradients follow the per-op comment: "(=)" overwrites, "(+=)" accumulates.
//  - Token/row counts are int64_t; index arrays are int32_t (N*K < 2^31 is checked by the model).
//  - Ops never allocate; scratch space is passed in.
//  - Every slot takes the instance it was read from as its first argument, be (ops->gemm(ops,
//    ...)): the backend reaches its state (library handles, primitive caches, scratch) through
//    be->ctx, so two instances in one process share no mutable state.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "core/routing.h"

typedef enum nm_transpose { NM_NO_TRANS = 0, NM_TRANS = 1 } nm_transpose;

// Element type of a GEMM operand in memory. NM_F32_BF16 is fp32 storage whose values are
// bf16 already (rounded once where the activation was produced, ops->round_bf16): a bf16 GEMM
// reads it as it is, without rounding it again per call.
typedef enum nm_dtype { NM_F32 = 0, NM_BF16 = 1, NM_F32_BF16 = 2 } nm_dtype;

// What an fp8 GEMM operand is, which fixes its quantisation granularity (DeepSeek-V3
// recipe, dsv3-spec 6.5): activations and activation gradients in 1 x 128 tiles along the
// reduction dimension K, weights in 128 x 128 blocks.
typedef enum nm_fp8_operand { NM_FP8_ACTIVATION = 0, NM_FP8_WEIGHT = 1 } nm_fp8_operand;

// Router options (dsv3-spec 5).
typedef struct nm_router_params {
    int64_t N;                  // tokens
    int64_t E;                  // routed experts
    int64_t K;                  // experts per token
    int64_t G;                  // groups (1: no group limit)
    int64_t Gk;                 // groups kept
    nm_scoring scoring;         // sigmoid or softmax
    nm_topk_method method;      // noaux_tc / greedy / group_limited_greedy
    int norm_topk_prob;         // renormalise the K selected scores (+1e-20 in the denominator)
    float routed_scaling;       // applied after normalisation
} nm_router_params;

// One GEMM of a grouped call (MoE experts: one per expert, over its rows). A and B are
// float for gemm_grouped; gemm_bf16_grouped reads them as its a_type / b_type say.
typedef struct nm_gemm_group {
    int64_t M, N, K;            // op(A) is (M,K), op(B) is (K,N)
    const void *A;              // with lda (elements)
    const void *B;              // with ldb (elements)
    float *C;                   // (M,N) with ldc
    int64_t lda, ldb, ldc;
} nm_gemm_group;

// One GEMM call of a training step as the model makes it (nm_model_gemm_shapes), for a
// backend's kernel tuning: `groups` GEMMs of (M, N, K) in one grouped call (the routed experts
// of a layer, one group per expert) or a single GEMM (groups 1), made `count` times per step.
// B is a weight in the forward and input-gradient calls and an activation in the
// weight-gradient call; `rounded` activations are the routed experts', which the bf16 model
// rounds once where they are produced (NM_F32_BF16), where the dense layers' are fp32.
typedef struct nm_gemm_shape {
    nm_transpose ta, tb;
    int64_t M, N, K, groups, count;
    int b_is_weight, rounded;
} nm_gemm_shape;

// A contiguous run of one parameter tensor's floats: the unit of the optimizer's parallel work
// and of the gradient norm's fixed reduction order (train/optim.c makes the list).
typedef struct nm_optim_chunk {
    size_t offset;              // in floats, into params/grads
    size_t state;               // in floats, into m/v (== offset unless sharded)
    size_t len;                 // floats
    int row;                    // parameter table row
    int decay;                  // 1 when the row has weight decay
} nm_optim_chunk;

// AdamW's float coefficients of one step, formed once by the optimizer in double and rounded
// to float, as PyTorch forms them for a float tensor (train/optim.h has the update).
typedef struct nm_adamw_coefs {
    float grad_scale;           // clip factor, applied to g as it is read
    float b1, one_minus_b1;
    float b2, one_minus_b2;
    float neg_step_size;        // -lr / (1 - b1^t)
    float bc2_sqrt;             // sqrt(1 - b2^t)
    float eps;
    float decay_mul;            // 1 - lr * weight_decay, for chunks with decay
} nm_adamw_coefs;

typedef struct nm_ops nm_ops;

struct nm_ops {
    // --- the instance ---------------------------------------------------------------------------
    const char *name;           // the registry's name: "cpu", "ref", "cuda"
    // The backend's private state (a struct its own files define; NULL where it keeps none),
    // made by ctx_create when nm_backend_create makes the instance and freed by ctx_destroy
    // when nm_backend_destroy frees it. Ops read and grow it (scratch, caches): an instance is
    // used from one thread at a time, as every op already is.
    void *ctx;
    int (*ctx_create)(void **ctx, nm_error *err);   // NULL: the backend keeps no state
    void (*ctx_destroy)(void *ctx);                 // NULL-safe

    // Checks this machine and the backend's environment (kernel choices, libraries) before any
    // op runs: 0, or -1 with err naming what failed and what to do. nm_model_create calls it
    // (NULL: nothing to check), so a kernel the machine cannot run is refused at start, never
    // by an op's check mid-step. The model's sizes are checked against max_row_dim.
    int (*setup)(const nm_ops *be, nm_error *err);

    // Which kernels run the GEMMs, for banners and benchmarks: e.g. "fp32 GEMM onednn, bf16
    // GEMM widen (fp32 FMA units)". Call from one thread (it may read the environment once).
    const char *(*kernel_names)(const nm_ops *be);
    // Largest per-row dimension the ops keep in fixed scratch (routed experts E for the router,
    // the head dims Dn + Dr and Dv for attention); the model refuses a config beyond it when it
    // is created, with a message, instead of an op's check aborting mid-step.
    int64_t max_row_dim;

    // --- the backend's memory and process -------------------------------------------------------
    // Every buffer an op reads or writes (the model's weights, gradients, activations and
    // scratch; the optimizer's moments) comes from alloc: zero-filled, 64-byte aligned, at least
    // one byte, aborting with a message when the memory is not there (as nm_aligned_alloc). Host memory
    // on the CPU backends; device memory on a GPU one. Host-readable results (moe_permute's
    // offsets, sumsq_chunks's partials) are host memory the caller owns.
    void *(*alloc)(const nm_ops *be, size_t bytes);
    void (*free)(const nm_ops *be, void *p);      // NULL is a no-op
    // bytes from host memory into a buffer of alloc's, and back
    void (*copy_to_device)(const nm_ops *be, void *dst, const void *src, size_t bytes);
    void (*copy_to_host)(const nm_ops *be, void *dst, const void *src, size_t bytes);
    void (*memset)(const nm_ops *be, void *dst, int value, size_t bytes);
    // Sets bytes at dst to zero and lets the backend take the memory back until it is next
    // written (the CPU backend gives whole pages to the system): ZeRO-2's gradient buckets once
    // reduced. What it reads afterwards is zero, as after memset.
    void (*discard)(const nm_ops *be, void *dst, size_t bytes);
    // Waits until every op issued so far has finished (timings, host reads); a no-op where ops
    // complete before they return.
    void (*synchronize)(const nm_ops *be);
    // The threads the ops run on (train's `threads` key; 0 leaves the backend's default) and
    // how many that is, for the banner.
    void (*set_threads)(const nm_ops *be, int n);
    int (*threads)(const nm_ops *be);
    // The best rate, FLOP/s, of the backend's fp32 GEMM (and, with bf16, of its bf16 GEMM too)
    // on square GEMMs, measured now: the peak the MFU is against.
    double (*measure_peak)(const nm_ops *be, int bf16);
    // Tunes the backend's kernels for the GEMMs of one step (shapes, n_shapes), keeping its pick
    // in cache_dir so that a resume takes the same kernels; measure = 0 takes defaults (or the
    // cache) without timing. desc gets one line for the banner. NULL: nothing to tune.
    int (*tune)(const nm_ops *be, const nm_gemm_shape *shapes, int n_shapes, const char *cache_dir, int measure,
                char *desc, size_t desc_size, nm_error *err);

    // --- dense linear algebra ---------------------------------------------------------------
    // Row-major GEMM with BLAS semantics: C(M,N) = alpha * op(A) op(B) + beta * C.
    // op(A) is (M,K), op(B) is (K,N). beta == 0 ignores C's old contents (NaN-safe).
    void (*gemm)(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K,
                 float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
                 float beta, float *C, int64_t ldc);

    // n independent GEMMs with shared transposes, alpha and beta (each with gemm's contract),
    // run concurrently: the routed experts' small GEMMs of one layer in one call. Groups
    // with M, N == 0 are skipped. Results do not depend on the thread count.
    void (*gemm_grouped)(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                         const nm_gemm_group *groups, int64_t n);

    // bf16 GEMM: same contract as gemm, but A and B may be stored as bf16 (a_type/b_type);
    // fp32 operands are rounded to bf16 (round to nearest even) first, products are
    // accumulated in fp32 and C stays fp32. On the CPU: oneDNN on AMX tiles where AMX is
    // usable, else the operands widened to fp32 and multiplied on the fp32 FMA units, which
    // outrun AVX512-BF16's dot products (gemm_bf16.c says why). Scratch for the conversions is owned by the backend and grows only
    // when a larger shape is first seen (no allocation in steady state).
    void (*gemm_bf16)(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type, int64_t ldb,
                      float beta, float *C, int64_t ldc);
    // n independent bf16 GEMMs (gemm_bf16's contract, operand types shared by the groups),
    // the routed experts of one layer in one call, as gemm_grouped. Results do not depend on
    // the thread count.
    void (*gemm_bf16_grouped)(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                              const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type);
    // The storage gemm_bf16 reads a weight from fastest: NM_BF16, or NM_F32_BF16 where the
    // kernel multiplies on the fp32 units (CPU "widen") and would otherwise widen a bf16 weight
    // on every call. The model keeps its once-per-step weight copy in this type (twice the
    // bytes of a bf16 copy in the NM_F32_BF16 case). Call from one thread; the answer may
    // change when the kernel is chosen (before the first step), never during a step.
    nm_dtype (*gemm_bf16_weight_type)(const nm_ops *be);
    // dst(n) (=) bf16(src), kept in fp32 storage (round to nearest even; NaN stays NaN); dst
    // may be src. An activation rounded once where it is produced, then read as NM_F32_BF16;
    // the weight copy of an NM_F32_BF16 gemm_bf16_weight_type.
    void (*round_bf16)(const nm_ops *be, float *dst, const float *src, int64_t n);
    // fp8 (E4M3) GEMM, emulated: A is an activation quantised in 1 x 128 tiles along K; B is
    // quantised per b_kind (weights: 128 x 128 blocks of the stored matrix; activations:
    // 128 x 1 tiles along K); scale = max(amax, 1e-4) / 448 per tile/block, values rounded
    // to E4M3 (nearest even, saturating), dequantised, multiplied with fp32 accumulation.
    void (*gemm_fp8)(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, nm_fp8_operand b_kind,
                     float beta, float *C, int64_t ldc);
    // dst(n) (=) bf16 of src (round to nearest even).
    void (*cast_bf16)(const nm_ops *be, uint16_t *dst, const float *src, int64_t n);
    // dst(n) (=) src(n) widened to fp32 (exact: every bf16 is an fp32). widen_bf16 of cast_bf16
    // is round_bf16. The expert all-to-all's bf16 rows on arrival (moe.c).
    void (*widen_bf16)(const nm_ops *be, float *dst, const uint16_t *src, int64_t n);
    // x(n) (=) bf16(x) in fp32 storage and bits(n) (=) the same values as bf16, in one pass:
    // round_bf16(x, x, n) then cast_bf16(bits, x, n), without reading x twice.
    void (*round_cast_bf16)(const nm_ops *be, float *x, uint16_t *bits, int64_t n);

    // --- elementwise / memory ----------------------------------------------------------------
    void (*zero)(const nm_ops *be, float *x, int64_t n);
    // y (+=) alpha * x
    void (*axpy)(const nm_ops *be, float *y, const float *x, float alpha, int64_t n);
    // dst[r, 0:cols] (=) src[r, 0:cols] for r < rows, with leading dimensions (floats).
    void (*copy_2d)(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols);
    // dst[r, 0:cols] (+=) src[r, 0:cols]
    void (*add_2d)(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                   int64_t cols);

    // --- embedding ------------------------------------------------------------------------
    // out(N,D) (=) emb[tokens[n]]. Tokens are range-checked by the caller; a negative id (a
    // vocabulary row another tensor-parallel rank holds) gives a zero row.
    void (*embedding_forward)(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                              int64_t D);
    // demb (+=) scatter-add of dout rows; rows with a negative id are skipped.
    void (*embedding_backward)(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                               int64_t D);

    // --- RMSNorm: out = w * x / sqrt(mean(x^2) + eps) ----------------------------------------
    // out(N,D) (=), rstd(N) (=) saved 1/sqrt(mean(x^2)+eps).
    void (*rmsnorm_forward)(const nm_ops *be, float *out, float *rstd, const float *inp, const float *w,
                            int64_t N, int64_t D, float eps);
    // dinp(N,D) (+=), dw(D) (+=).
    void (*rmsnorm_backward)(const nm_ops *be, float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int64_t N, int64_t D);

    // --- SwiGLU: out = silu(gate) * up, with gate_up rows laid out [gate(F) | up(F)] ---------
    // out(N,F) (=); gate_up(N,2F).
    void (*swiglu_forward)(const nm_ops *be, float *out, const float *gate_up, int64_t N, int64_t F);
    // dgate_up(N,2F) (=).
    void (*swiglu_backward)(const nm_ops *be, float *dgate_up, const float *dout, const float *gate_up, int64_t N,
                            int64_t F);
    // bf16: the same, the output rounded to bf16 in its fp32 storage (as round_bf16 after the
    // op would) and, when bits is not NULL, also written as bf16 to bits (out's shape): the
    // rounding and the twin's cast (round_cast_bf16) without two more passes over the output.
    void (*swiglu_forward_bf16)(const nm_ops *be, float *out, uint16_t *bits, const float *gate_up, int64_t N,
                                int64_t F);
    void (*swiglu_backward_bf16)(const nm_ops *be, float *dgate_up, uint16_t *bits, const float *dout,
                                 const float *gate_up, int64_t N, int64_t F);

    // --- RoPE on adjacent pairs (dsv3-spec 4.2), in place -------------------------------------
    // x is (B, T, n_heads, head_dim); channels [offset, offset+Dr) of every head are rotated
    // by the angle of position t: pair i uses cos[t*Dr/2 + i], sin[t*Dr/2 + i].
    void (*rope_forward)(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                         int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);
    // dx in place: the inverse rotation of the incoming gradient.
    void (*rope_backward)(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr);

    // --- MLA causal attention ------------------------------------------------------------------
    // q(B,T,H,Dn+Dr) per head [q_nope | q_pe] (q_pe already rotated);
    // kv(B,T,H,Dn+Dv) per head [k_nope | v]; k_pe(B,T,Dr) rotated, shared by all heads.
    // score(i,j) = scale * (q_nope_i . k_nope_j + q_pe_i . k_pe_j), j <= i; softmax over j.
    // out(B,T,H,Dv) (=); lse(B,H,T) (=) saved log-sum-exp of the scaled scores.
    void (*attention_forward)(const nm_ops *be, float *out, float *lse, const float *q, const float *kv,
                              const float *k_pe, int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv,
                              float scale);
    // dq(B,T,H,Dn+Dr) (=), dkv(B,T,H,Dn+Dv) (=), dk_pe(B,T,Dr) (=) summed over heads.
    // scratch: at least B*H*T*Dr floats (per-head dk_pe before the sum over heads).
    void (*attention_backward)(const nm_ops *be, float *dq, float *dkv, float *dk_pe, float *scratch, const float *dout,
                               const float *q, const float *kv, const float *k_pe,
                               const float *out, const float *lse,
                               int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv, float scale);

    // --- cross-entropy --------------------------------------------------------------------------
    // losses(N) (=) -log softmax(logits[n])[targets[n]]; targets[n] < 0 means "no target": loss 0.
    // lse(N) (=) saved logsumexp(logits[n]) for the backward; unspecified for rows without a
    // target (the backward never reads it; the CPU backend writes 0).
    void (*xent_forward)(const nm_ops *be, float *losses, float *lse, const float *logits, const int32_t *targets,
                         int64_t N, int64_t V);
    // dlogits(N,V) (=) scale * (exp(logits[n] - lse[n]) - onehot(targets[n])), 0 for rows
    // without a target; lse from xent_forward on the same logits. dlogits may alias logits
    // (computed in place).
    void (*xent_backward)(const nm_ops *be, float *dlogits, const float *logits, const float *lse,
                          const int32_t *targets, float scale, int64_t N, int64_t V);
    // The same over vocabulary tiles, for a head whose (N, V) logits are never stored whole:
    // call with consecutive tiles [v0, v0 + Vt) covering [0, V) in order, logits(N, Vt) with
    // leading dimension ld. stats(N, 3) (running max, exp-sum, target logit) carries the rows'
    // state from tile to tile (written on the first tile, v0 == 0); losses and lse are (=) on
    // the last (v0 + Vt == V), as xent_forward's. One tile [0, V) equals xent_forward.
    void (*xent_tile_forward)(const nm_ops *be, float *losses, float *lse, double *stats, const float *logits,
                              int64_t ld, const int32_t *targets, int64_t N, int64_t V, int64_t v0, int64_t Vt);
    // dlogits(N, Vt) (=, leading dimension ld_d, may alias logits) for columns [v0, v0 + Vt):
    // xent_backward's formula with the one-hot restricted to the tile; lse from the forward.
    void (*xent_tile_backward)(const nm_ops *be, float *dlogits, int64_t ld_d, const float *logits, int64_t ld,
                               const float *lse, const int32_t *targets, float scale, int64_t N, int64_t V, int64_t v0,
                               int64_t Vt);
    // A vocabulary-parallel head (head.c under tensor parallelism) runs the tiles over its
    // shard, then combines the open stats(N, 3) over tp: the max, then the exp-sums rescaled
    // to it and the target logit, which only its owner has. These are the combine's steps
    // around its two all-reduces; rows with target < 0 give 0 throughout.
    // stats(N, 3) (=) opened as for a shard with no tile: max -inf, exp-sum 0, target logit 0.
    void (*xent_stats_open)(const nm_ops *be, double *stats, int64_t N);
    // mx(N) (=) each row's local max (the all-reduce MAX's input).
    void (*xent_stats_max)(const nm_ops *be, double *mx, const double *stats, const int32_t *targets, int64_t N);
    // sums(N, 2) (=) (exp-sum x exp(local max - mx), target logit) (the all-reduce SUM's input).
    void (*xent_stats_sums)(const nm_ops *be, double *sums, const double *stats, const double *mx,
                            const int32_t *targets, int64_t N);
    // losses(N), lse(N) (=) log(sum) + mx - target logit, log(sum) + mx, from the reduced ones.
    void (*xent_stats_close)(const nm_ops *be, float *losses, float *lse, const double *sums, const double *mx,
                             const int32_t *targets, int64_t N);
    // The double sum of x(n) in index order, returned to the host (the head's loss total).
    double (*sum)(const nm_ops *be, const float *x, int64_t n);

    // --- MoE router (dsv3-spec 5, 7) -----------------------------------------------------------
    // logits(N,E) = u W_gate^T (computed by gemm). scores(N,E) (=) sigmoid or softmax of logits;
    // bias(E) (may be NULL = zeros) is added for selection only, and only for noaux_tc; topk_idx(N,K) (=) selected
    // experts in descending biased-score order, ties to the lower index; topk_weight(N,K) (=)
    // unbiased scores, normalised if asked, times routed_scaling.
    void (*router_forward)(const nm_ops *be, int32_t *topk_idx, float *topk_weight, float *scores, const float *logits,
                           const float *bias, const nm_router_params *p);
    // dlogits(N,E) (=) from dtopk_weight(N,K), through normalisation and the score function;
    // the selected set is held fixed (non-differentiable).
    void (*router_backward)(const nm_ops *be, float *dlogits, const float *dtopk_weight, const float *scores,
                            const int32_t *topk_idx, const nm_router_params *p);

    // --- complementary sequence-wise balance loss (dsv3-spec 6.2, 11) ------------------------
    // scores(B*T,E) from router_forward. f(B,E) (=) saved f_i per sequence, from the plain
    // top-K of the scores (no bias, no group limit). Returns mean over the B sequences of
    // sum_i f_i * P_i, with P_i = mean_t s_i / sum_j s_j.
    double (*balance_loss_forward)(const nm_ops *be, float *f, const float *scores, int64_t B, int64_t T, int64_t E,
                                   int64_t K);
    // dlogits(B*T,E) (+=) dloss * d(balance loss)/d(logits) through the score function.
    void (*balance_loss_backward)(const nm_ops *be, float *dlogits, float dloss, const float *f, const float *scores,
                                  int64_t B, int64_t T, int64_t E, int64_t K, nm_scoring scoring);

    // --- MoE dispatch / combine --------------------------------------------------------------
    // Groups the N*K (token, slot) assignments by expert, stable in token order:
    // offsets(E+1) (=) start of each expert's rows; perm(N*K) (=) flat index n*K+k of the
    // assignment in permuted row r. offsets live in host-readable memory.
    void (*moe_permute)(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx,
                        int64_t N, int64_t K, int64_t E);
    // dst(N*K, D) (=) src[perm[r] / K] for every permuted row r.
    void (*moe_gather)(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                       int64_t D);
    // bf16: the same, the rows rounded to bf16 in dst's fp32 storage (as round_bf16 after the
    // gather would) and, when bits is not NULL, also written as bf16 to bits (dst's shape): the
    // routed experts' input, read by bf16 GEMMs only, produced in one pass.
    void (*moe_gather_bf16)(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                            int64_t N, int64_t K, int64_t D);
    // y(N,D) (+=) sum over rows r of topk_weight[perm[r]] * expert_out[r] into token perm[r]/K.
    void (*moe_combine_forward)(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                const int32_t *perm, int64_t N, int64_t K, int64_t D);
    // dexpert_out(N*K,D) (=) topk_weight * dy[token]; dtopk_weight(N,K) (=) <dy[token], expert_out[r]>.
    void (*moe_combine_backward)(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                 const float *expert_out, const float *topk_weight,
                                 const int32_t *perm, int64_t N, int64_t K, int64_t D);
    // dsrc(N,D) (+=) scatter-add of dst rows back to their tokens (the gather's backward).
    void (*moe_scatter_add)(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N, int64_t K,
                            int64_t D);

    // --- fp8 rows: the expert all-to-all's e4m3 transport (DeepSeek-V3's FP8 dispatch) ---------
    // Rows of x(rows, D) in 1 x 128 tiles along D (the last tile of a row may be shorter), the
    // activation quantisation of gemm_fp8: per tile s = max(amax, 1e-4) / 448 (fp32) and
    // q = e4m3(x / s) (fp8.h: nearest even, saturating; NaN kept).
    // q(rows, D) (=) the E4M3 codes; scales(rows, ceil(D/128)) (=) the tiles' s.
    void (*fp8_quantize_rows)(const nm_ops *be, uint8_t *q, float *scales, const float *x, int64_t rows, int64_t D);
    // x(rows, D) (=) decode(q) * s: the values gemm_fp8 would multiply.
    void (*fp8_dequantize_rows)(const nm_ops *be, float *x, const uint8_t *q, const float *scales, int64_t rows,
                                int64_t D);
    // x(rows, D) (=) fp8_dequantize_rows(fp8_quantize_rows(x)), in place, without the codes: what
    // the rows are after crossing as fp8, for a rank that holds its experts itself.
    void (*fp8_round_rows)(const nm_ops *be, float *x, int64_t rows, int64_t D);

    // --- optimizer (train/optim.c makes the chunks and drives these) ---------------------------
    // partials[c] (=) sum of x^2 over chunk c's floats, in double, eight lanes added in a fixed
    // order: the value depends on the chunk only, never on the thread count. partials is host
    // memory; the caller adds them up in chunk order.
    void (*sumsq_chunks)(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n);
    // x (*=) s over the chunks' floats (gradient clipping).
    void (*scale_chunks)(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n);
    // Index of the first non-finite float of x(n), or -1.
    int64_t (*first_nonfinite)(const nm_ops *be, const float *x, int64_t n);
    // One AdamW update over the chunks, torch.optim.AdamW's operations in its order in fp32
    // (train/optim.h): params (+=) the update, m and v (=) the new moments at each chunk's
    // state offset, stored as m_type / v_type (NM_F32, or NM_BF16: widened to fp32 for the
    // update, rounded back to nearest even).
    void (*adamw_chunks)(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                         const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k);
    // The aux-loss-free balance rule (DeepSeek-V3 2.1.2, Megatron-Core get_updated_expert_bias):
    // bias(E) (+=) gamma * sign(mean(counts) - counts[e]); counts(E) host memory.
    void (*router_bias_update)(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma);
};

// --- backends ---------------------------------------------------------------------------------

// An instance of the backend called name ("cpu", "ref", "cuda"): a copy of its table with its
// own state in ctx. 0 with *out set, or -1 with err naming the known backends (or what failed
// while the state was made). Whoever creates an instance destroys it, after every buffer its
// alloc returned has gone back through its free. Nothing is checked here that setup checks:
// the model calls setup when it is created.
int nm_backend_create(const nm_ops **out, const char *name, nm_error *err);
// The instance a program runs on: nm_backend_create of the environment variable NM_BACKEND
// when it is set and not empty, else of name (the `backend` key; NULL: "cpu"). A name that is
// no backend gives -1 with err: "environment variable NM_BACKEND: "x" is not a backend
// (known: ...)" or "backend "x" ...".
int nm_backend_select(const nm_ops **out, const char *name, nm_error *err);
// Frees the instance and its state. NULL is a no-op.
void nm_backend_destroy(const nm_ops *be);

// The backends' tables as the registry (registry.c) copies them into instances: ctx NULL, so
// not usable for ops that keep state. Nothing outside src/ops and its tests calls these.
// The CPU backend (src/ops/cpu): C + OpenMP, GEMMs through oneDNN / OpenBLAS.
const nm_ops *nm_ops_cpu(void);
// Its process settings (nm_ops_prepare_process calls it).
void nm_ops_cpu_prepare_process(char **argv);
// The reference backend (src/ops/ref): plain scalar C, double accumulation, no OpenMP, no BLAS:
// the definition the other backends are tested against (tests/test_backend_ops.c).
const nm_ops *nm_ops_ref(void);

// The CUDA backend (src/ops/cuda): cuBLASLt GEMMs and CUDA kernels on managed memory. Defined
// only in builds with the CUDA toolkit (NM_HAVE_CUDA; CMake's NM_CUDA option); its setup
// refuses, with a message, a machine without a usable GPU.
const nm_ops *nm_ops_cuda(void);

// The backends of this build by name ("cpu", "ref", and "cuda" with NM_HAVE_CUDA), NULL-terminated (backend_names.c: it
// depends on no backend, so the config parser can check a name without linking one).
extern const char *const nm_ops_backend_names[];
// 0 when name is a backend, else -1 with err: "<what> "<name>" is not a backend (known: cpu, ref)".
int nm_ops_check_backend(const char *name, const char *what, nm_error *err);

// Settings a backend needs in the environment before its libraries start (the CPU's OpenBLAS
// core type and OpenMP spin count): set, and the program re-executed once with argv, when one
// is missing. Call first thing in main.
void nm_ops_prepare_process(char **argv);
// The square-GEMM peak of ops (measure_peak's helper): the best of three n^3 GEMMs after one
// warm-up, fp32 or with bf16 operands, FLOP/s.
double nm_ops_time_square_gemm(const nm_ops *ops, int bf16, int n);
