// model.h: the DeepSeek-V3 model: parameters, gradients, activations and the hand-written
// forward and backward passes, written once against the nm_ops table.
//
// Usage:
//   const nm_ops *be;  nm_backend_create(&be, "cpu", &err);  (destroyed after the model)
//   nm_model *m;  nm_model_create(&m, &cfg, be, B_max, T_max, &err);
//   nm_params_init(nm_model_params(m), nm_model_table(m), &cfg, seed);   // or load a file
//   nm_model_forward(m, tokens, B, T, &opt, &loss, NULL, &err);          // loss terms
//   nm_model_backward(m, &err);    // of that forward: grads += opt.grad_scale * d(loss)/d(params)
// All memory is allocated by nm_model_create; forward/backward never allocate.
#pragma once

#include <stdint.h>

#include "core/coop.h"
#include "core/precision.h"
#include "comm/comm.h"
#include "model/config.h"
#include "model/params.h"
#include "ops/ops.h"

typedef struct nm_model nm_model;

typedef struct nm_loss_options {
    float mtp_weight;           // lambda: total += mtp_weight * mean over depths of MTP CE
    float aux_weight;           // alpha:  total += aux_weight * balance loss (summed over MoE layers)
    float grad_scale;           // multiplies every gradient of the backward (1/accumulation steps)
    int inference;              // 1: main model only (no MTP, T >= 1 allowed), no backward after
} nm_loss_options;

typedef struct nm_loss_terms {
    double loss;                // ce + mtp_weight * mtp + aux_weight * aux
    double ce;                  // mean CE over the B*(T-1) next-token positions
    double mtp;                 // mean over depths of each depth's mean CE (0 when M == 0)
    double aux;                 // balance loss summed over MoE layers (MTP layers included)
    int64_t tokens;             // B*T input tokens
} nm_loss_terms;

typedef struct nm_model_options {
    int recompute;              // activation recomputation per block: keep only block inputs and
                                // outputs, re-run each block's forward inside the backward
    nm_comm *ep;                // expert-parallel group (NULL or 1 rank: every routed expert here);
                                // its rank holds experts [rank * E/size, (rank + 1) * E/size) and
                                // every forward/backward exchanges token rows with the group
    nm_comm *tp;                // tensor-parallel group (NULL or 1 rank: no split). Its rank holds
                                // the shards of nm_param_table_build_tp: local heads, FFN columns
                                // and vocabulary rows; every forward/backward all-reduces over it
                                // (docs/parallelism.md). Routed experts stay whole (and are
                                // computed on every rank of the group: no sequence parallelism)
    int sequence_parallel;      // with tp: Megatron's sequence parallelism. The residual stream,
                                // norms, router and routed experts on 1/TP of the B*T tokens
                                // (contiguous rows), all-gathered before the column-parallel
                                // linears, reduce-scattered after the row-parallel ones. The
                                // gradients of the rows flagged NM_TENSOR_SEQ_PARTIAL are then
                                // partial sums over tp (the caller sums them); routed experts
                                // see distinct tokens per tp rank
    int64_t vocab_multiple;     // with tp: Megatron's make_vocab_size_divisible_by, the vocabulary
                                // padded to a multiple of it x TP (0 or 1: of TP); padding rows are
                                // zeros outside every file and loss
    int64_t vocab_tile;         // output-head columns per tile: 0 picks one (the whole vocabulary
                                // while N x V logits fit in 64 MiB); below V the (N, V) logits are
                                // never stored and the backward recomputes each tile's logits
    const nm_model_stage *stage;  // pipeline stage (params.h): only its layers and tensors are held;
                                  // NULL: the whole model. With n_chunks > 1: the n_chunks stages
                                  // (model chunks of the interleaved schedule, in layer order) this
                                  // rank holds; one table holds them all
    int64_t n_chunks;           // 0 or 1: one stage
    int64_t act_slots;          // activation sets per chunk, one per micro-batch in flight
                                // (nm_model_set_slot: slot s is chunk s / act_slots's); 0 or 1: one
    double moe_receive_capacity;  // with ep: the rows a rank's experts receive per round of the
                                  // dropless exchange, as a multiple of the mean (routed rows x K);
                                  // a busier rank takes more rounds, nothing is dropped
                                  // (docs/parallelism.md). 0: NM_MOE_RECEIVE_CAPACITY
    nm_precision precision;     // the precision the run will set (nm_model_set_precision): with
                                // ep, bf16 allocates the send buffer of the bf16 dispatch
    int recompute_mla_up_proj;  // selective recomputation (Megatron's recompute_modules
                                // "mla_up_proj", as DeepSeek-V3 recomputes them): the MLA
                                // up-projections' outputs q and kv, the largest tensors a block
                                // saves, are not kept per block but recomputed from the saved
                                // latents before the attention's backward; bit for bit the same
                                // results. No effect under recompute (everything is recomputed).
    int recompute_moe_act;      // the same for "moe_act": the routed experts' SwiGLU output, read
                                // only by the down-projection's weight gradient, is recomputed from
                                // the saved gate_up in the backward (one shared buffer)
    int recompute_layernorm;    // the same for "layernorm": each block's input_layernorm and
                                // post_attention_layernorm outputs (N x D each) are not kept per block
                                // but recomputed from the saved block input and x_mid (and gathered
                                // again under sequence parallelism) before the backward reads them
    int shared_expert_overlap;  // with ep: Megatron's moe_shared_expert_overlap. The shared
                                // experts' first half (forward) and their backward run while the
                                // exchange's first all-to-all of each MoE block is in flight (a
                                // non-blocking all-to-all); the same operations in the same order,
                                // so results are bit for bit those without it
    int ep_split;               // with ep: Megatron's overlap_moe_expert_parallel_comm as parts (0 or
                                // 1: off; 2 from the training config). Each MoE block's exchange that
                                // fits the receive side runs as this many parts (at most one a local
                                // expert), pipelined: one part's dispatch and combine in flight while
                                // another's experts compute (moe.c, "the split exchange"); bit for bit
                                // the results without it; one more (C, D) send buffer
} nm_model_options;

#define NM_MOE_RECEIVE_CAPACITY 2.0

// C, the rows a rank's experts receive per round of the expert-parallel exchange: capacity
// (0: NM_MOE_RECEIVE_CAPACITY) x the mean rows_routed x K, at least 1, at most what the group
// could send (ep_size x rows_routed x min(K, E/ep_size)). rows_routed: the tokens each rank
// routes (B x T, or its 1/TP share under sequence parallelism).
int64_t nm_moe_receive_rows(const nm_model_config *cfg, int64_t rows_routed, int64_t ep_size, double capacity);

// Allocates parameters, gradients and activations for batches up to (B_max, T_max). The model
// borrows ops, a backend instance (ops.h: nm_backend_create), which must outlive it.
int nm_model_create(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max,
                    int64_t T_max, nm_error *err);
int nm_model_create_ex(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max,
                       int64_t T_max, const nm_model_options *opts, nm_error *err);
void nm_model_destroy(nm_model *m);

// Paired micro-batches (the trainer's moe_pair_micro_batches): a second model for one
// micro-batch's forward while `owner` runs the previous one's backward. It has activations,
// scratch and exchange buffers of its own and uses owner's parameters, gradients and bf16
// weight copy (written through owner; owner outlives it). opts: owner's options. The
// precision is owner's.
int nm_model_create_pair(nm_model **out, nm_model *owner, const nm_model_options *opts, nm_error *err);
// With c set (NULL: off), each expert all-to-all of m's forward and backward, once started,
// hands the thread to the other job of c (nm_coop_pause) before m waits for it: the other
// micro-batch, on partner, computes while it is in flight, and its GEMMs test it (MPI moves a
// non-blocking collective only inside MPI calls). The seconds count as overlapped
// (nm_model_ep_stats).
void nm_model_set_coop(nm_model *m, nm_coop *c, nm_model *partner);
// One micro-batch's forward on fwd (nm_model_forward_stage's arguments; lt gets its loss terms)
// beside another's backward on back (nm_model_backward_stage's d_output), two models of a pair,
// taking turns on this thread at each expert all-to-all (c; nm_model_set_coop). ran[0], ran[1]:
// the seconds each ran. -1 with err naming which failed.
int nm_model_pair_run(nm_coop *c, nm_model *fwd, const int32_t *tokens, const float *input, int64_t B, int64_t T,
                      const nm_loss_options *opt, nm_loss_terms *lt, nm_model *back, const float *d_output,
                      double ran[2], nm_error *err);

float *nm_model_params(nm_model *m);                    // (table.n_floats); marks the weights changed
const float *nm_model_params_view(const nm_model *m);   // the same, for reading only (marks nothing)
float *nm_model_grads(nm_model *m);                     // (table.n_floats)
const nm_param_table *nm_model_table(const nm_model *m);
// The backend the model was created on (its buffers are that backend's memory).
const nm_ops *nm_model_ops(const nm_model *m);
const nm_model_config *nm_model_cfg(const nm_model *m);
size_t nm_model_activation_bytes(const nm_model *m);
// Bytes of the bf16 copies of the activations that only bf16 GEMMs read (their twins), as the
// first bf16 forward allocates them: under bf16 where the backend's bf16 GEMM reads bf16
// storage (gemm_bf16_weight_type, known once its kernels are chosen), else 0. And how many
// roundings found no twin placed for them (0 unless a tensor was left out of the layout's list;
// their GEMMs then cast per call, the same values).
int64_t nm_model_bf16_twin_bytes(const nm_model *m);
int64_t nm_model_bf16_twin_misses(const nm_model *m);
// What nm_model_create_ex would allocate for activations, without allocating it.
size_t nm_model_estimate_activation_bytes(const nm_model_config *cfg, int64_t B_max, int64_t T_max, int recompute);
// The same under opts (recompute, vocab_tile, the groups' sizes and ranks: shape
// communicators, nm_comm_shape, are enough): the planner's activation number. Returns 0, or
// -1 with err when the options do not fit the config.
int nm_model_estimate_activation_bytes_ex(const nm_model_config *cfg, int64_t B_max, int64_t T_max,
                                          const nm_model_options *opts, size_t *bytes, nm_error *err);
// And the bf16 activation twins' bytes under bf16 with a GEMM that reads bf16 storage
// (nm_model_bf16_twin_bytes of such a model); NULL skips either.
int nm_model_estimate_bytes(const nm_model_config *cfg, int64_t B_max, int64_t T_max, const nm_model_options *opts,
                            size_t *activation_bytes, size_t *bf16_twin_bytes, nm_error *err);
void nm_model_zero_grads(nm_model *m);

// Forward over tokens (B, T), B <= B_max, 2 <= T <= T_max (1 <= T with opt->inference). Token ids outside [0, V) are an
// error naming the position and value. logits_out (B, T, V) may be NULL.
int nm_model_forward(nm_model *m, const int32_t *tokens, int64_t B, int64_t T, const nm_loss_options *opt,
                     nm_loss_terms *loss, float *logits_out, nm_error *err);
// Compute precision of the linear layers (default fp32). bf16 and fp8 keep a copy of the
// weights rounded to bf16, refreshed once per step: before a forward, whenever
// nm_model_params() was called since the last refresh (callers write parameters only through
// that pointer). It is 2 bytes per parameter, or 4 where the backend's bf16 GEMM multiplies
// on the fp32 units (ops->gemm_bf16_weight_type), and is allocated by the first forward.
int nm_model_set_precision(nm_model *m, nm_precision p, nm_error *err);
// That copy (NULL before the first bf16 or fp8 forward allocates it) and its storage: NM_BF16,
// or NM_F32_BF16 (fp32 holding bf16 values). For the distributed optimizer (train/zero.h),
// which writes it itself from master weights it keeps sharded.
void *nm_model_weight_copy(nm_model *m, nm_dtype *type);
// Allocates and rounds the copy now, as the next forward would (the backend's kernels chosen).
int nm_model_weight_copy_prepare(nm_model *m, nm_error *err);
// The caller wrote the whole copy from the current weights: the next forward uses it as it is.
// partial 1: the fp32 weights of the rows read only through the copy (nm_param_row_reads_copy)
// are not whole here, so a forward that would round the copy from them again (the parameters
// written through nm_model_params() after this) fails with an error instead; 0 ends that.
void nm_model_weight_copy_written(nm_model *m, int partial);
// 1 while that partial mark stands (the fp32 weights of the copy-only rows are not whole here).
int nm_model_weights_sharded(const nm_model *m);

// Backward of the last forward: gradients of loss (scaled by grad_scale) ACCUMULATE into grads.
int nm_model_backward(nm_model *m, nm_error *err);

// --- pipeline stages (docs/parallelism.md) ------------------------------------------------
// A model created with opts->stage runs only its part. Its forward reads tokens (B, T) on
// every stage (the first embeds them, the last takes targets and MTP inputs from them) and,
// on a stage that is not first, the previous stage's output `input` (B, T, D). A stage that
// is not last returns only its balance loss (loss->aux, loss->loss = aux_weight * aux; ce
// and mtp 0); its output is nm_model_stage_output. The backward of a stage that is not last
// starts from d_output = dLoss/d(output) (B, T, D); afterwards nm_model_input_grad is
// dLoss/d(input), for the previous stage (valid until the next backward).
int nm_model_forward_stage(nm_model *m, const int32_t *tokens, const float *input, int64_t B, int64_t T,
                           const nm_loss_options *opt, nm_loss_terms *loss, float *logits_out, nm_error *err);
int nm_model_backward_stage(nm_model *m, const float *d_output, nm_error *err);
const float *nm_model_stage_output(const nm_model *m);  // (B, T, D) of the current slot's last forward
const float *nm_model_input_grad(const nm_model *m);    // (B, T, D)
// Selects activation set s (0 .. n_chunks x act_slots - 1), and with it the chunk s / act_slots
// whose layers the next forward and backward run: the next forward fills it, the next backward
// differentiates the forward that filled it. Several micro-batches can be in flight at once.
int nm_model_set_slot(nm_model *m, int64_t s, nm_error *err);
int64_t nm_model_slots_per_chunk(const nm_model *m);  // act_slots (at least 1)
const nm_model_stage *nm_model_get_stage(const nm_model *m);

// Called inside nm_model_backward each time decoder layer `layer`'s gradients are final:
// layers finish in decreasing index, the MTP blocks (L .. L+M-1) first, then L-1 .. 0; the
// embedding, final norm and head are final only when the backward returns. The data-parallel
// reduction uses it to start reducing finished gradients while the backward goes on. A hook
// error is not acted on mid-backward: the backward completes, calls no further hook, and
// returns that error. fn NULL removes the hook.
typedef int (*nm_backward_hook)(void *ctx, int layer, nm_error *err);
void nm_model_set_backward_hook(nm_model *m, nm_backward_hook fn, void *ctx);

// 1 when the model can shard its routed experts over an expert-parallel group.
int nm_model_supports_expert_parallel(void);
// 1 when the model can shard attention, dense FFNs and the vocabulary over a tensor-parallel group.
int nm_model_supports_tensor_parallel(void);

// The expert-parallel exchanges since the last call (then reset): the most rounds any took,
// and the most rows any receiver of the group got over the group's mean (1.0: even load), and
// the seconds of compute this rank ran with an all-to-all in flight (shared_expert_overlap).
// All 0 without ep or before a forward.
void nm_model_ep_stats(nm_model *m, int64_t *rounds, double *recv_max_over_mean, double *overlap_s);

// Router statistics of the last forward, for the bias update and the metrics:
// counts (n_moe_layers, E) of selected (token, expert) pairs, bias and group limit included.
// layer_ids (n_moe_layers) gives the decoder layer index of each row.
const int64_t *nm_model_expert_counts(const nm_model *m, int *n_moe_layers, const int **layer_ids);
