// params.h: the parameter table: every tensor of the model, by its exact Hugging Face name,
// with its shape, its offset in the one contiguous fp32 buffer, and flags.
//
// One buffer per role (params, grads, AdamW m and v) all share this layout, so the optimizer,
// gradient norm, checkpoints and export are loops over rows (style.md 13-16).
//
// Layout promises the model relies on (for fused GEMMs):
//  - within a SwiGLU MLP (dense mlp, shared_experts, each routed expert) gate_proj is
//    immediately followed by up_proj, so [gate; up] is one (2F, D) matrix;
//  - the E routed experts of a layer are stored back to back, expert j at
//    experts0 + j * expert_stride, each as gate (Fe, D), up (Fe, D), down (D, Fe);
//  - every tensor offset is a multiple of NM_PARAM_ALIGN floats.
// MTP copies of the embedding and head (`model.layers.{L+k}.embed_tokens.weight`,
// `.shared_head.head.weight`) are NM_TENSOR_TIED rows: no storage of their own, they point
// at their owner row; they are written to files as copies and checked on load.
// With tie_word_embeddings there is no `lm_head.weight` row and head == embed.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"

#define NM_PARAM_ALIGN 64       // floats (256 bytes)
#define NM_OFF_NONE SIZE_MAX    // a tensor this layer does not have

enum {
    NM_TENSOR_DECAY = 1u << 0,      // AdamW weight decay applies (matrices only)
    NM_TENSOR_TIED = 1u << 1,       // no storage; `owner` is the row holding the data
    NM_TENSOR_NORM = 1u << 2,       // RMSNorm weight: initialised to ones
    NM_TENSOR_ROUTER_BIAS = 1u << 3, // e_score_correction_bias: zeros, no gradient, no optimizer
    NM_TENSOR_EXPERT = 1u << 4,     // a routed expert's matrix
    NM_TENSOR_MTP = 1u << 5,        // belongs to an MTP block
    NM_TENSOR_OPTIONAL = 1u << 6,   // may be absent from a checkpoint (zeros then): the router bias
                                    // of greedy / group_limited_greedy, which selection ignores
    NM_TENSOR_SEQ_PARTIAL = 1u << 7, // computed on a rank's tokens under sequence parallelism (norms
                                    // of the residual stream, router, MTP eh_proj): its gradient is
                                    // a partial sum over the tp group, not split
};

typedef struct nm_tensor_spec {
    char name[112];             // exact HF name, e.g. "model.layers.3.mlp.experts.7.up_proj.weight"
    int ndim;                   // 1 or 2
    int64_t shape[2];           // PyTorch order: [out, in] for matrices
    int64_t numel;
    size_t offset;              // in floats, into the parameter buffer (owner's offset when tied)
    unsigned flags;             // NM_TENSOR_*
    int layer;                  // decoder layer index, -1 for global tensors
    int owner;                  // row index of the owner when TIED, else -1
    int init_key;               // the row's index in the full (one-process) table: the counter of
                                // its initialisation, so a rank holding a subset of the experts
                                // initialises them exactly as one process does
    // Tensor parallelism (docs/parallelism.md): shape above is this rank's shard of the HF
    // tensor full_shape, split along tp_dim (0: rows, a column-parallel linear's output
    // features or a vocabulary shard; 1: columns, a row-parallel linear's input features;
    // -1: not split, full_shape == shape), starting at row/column tp_start of the full tensor.
    // A padded vocabulary (Megatron's make_vocab_size_divisible_by) gives the embedding and
    // lm_head shards of V_padded / TP rows; tp_extent of them (tp_dim 0: rows) are rows of the
    // full tensor, the rest is padding: zeros, no gradient, never in a file or a loss.
    int tp_dim;
    int64_t full_shape[2];
    int64_t tp_start;
    int64_t tp_extent;
} nm_tensor_spec;

// Offsets (in floats) of one decoder block's tensors; NM_OFF_NONE when absent.
typedef struct nm_layer_offsets {
    size_t input_norm;          // (D)
    size_t q_a;                 // (Rq, D)            q_lora only
    size_t q_a_norm;            // (Rq)               q_lora only
    size_t q_b;                 // (H*Dqk, Rq)        q_lora only
    size_t q;                   // (H*Dqk, D)         no q_lora only
    size_t kv_a;                // (Rkv+Dr, D)
    size_t kv_a_norm;           // (Rkv)
    size_t kv_b;                // (H*(Dn+Dv), Rkv)
    size_t o;                   // (D, H*Dv)
    size_t post_norm;           // (D)
    // dense SwiGLU (non-MoE layers)
    size_t mlp_gate_up;         // (2F, D): gate rows then up rows
    size_t mlp_down;            // (D, F)
    // MoE
    size_t router;              // (E, D)
    size_t router_bias;         // (E)
    size_t experts;             // expert 0's gate; expert j at experts + j*expert_stride
    size_t expert_stride;       // floats between consecutive experts (>= 3*Fe*D)
    size_t shared_gate_up;      // (2Fs, D), NM_OFF_NONE when n_shared == 0
    size_t shared_down;         // (D, Fs)
    // MTP block extras
    size_t enorm;               // (D)
    size_t hnorm;               // (D)
    size_t eh_proj;             // (D, 2D): columns [0,D) act on enorm(emb), [D,2D) on hnorm(h)
    size_t head_norm;           // (D) shared_head.norm
} nm_layer_offsets;

typedef struct nm_param_table {
    nm_tensor_spec *rows;       // (n_rows)
    int n_rows;
    size_t n_floats;            // size of the buffer, padded
    int64_t n_params_main;      // unique parameters of the main model (MTP excluded)
    int64_t n_params_mtp;       // unique parameters of the MTP blocks (tied copies excluded)
    size_t embed;               // (V, D) model.embed_tokens.weight
    size_t final_norm;          // (D)    model.norm.weight
    size_t lm_head;             // (V, D) lm_head.weight (== embed when tied)
    nm_layer_offsets *layers;   // (L + M)
    int64_t expert_first;       // global index of the first routed expert held (expert parallelism)
    int64_t expert_count;       // routed experts held per MoE layer (E without expert parallelism);
                                // layers[l].experts is expert expert_first's gate
    int64_t tp_rank, tp_size;   // tensor-parallel shard held (0 of 1 without it)
    int64_t vocab_padded;       // rows of the (padded) vocabulary the shards divide (V without tp)
    int embed_copy;             // 1: the embedding row is the last pipeline stage's copy of the first
                                // stage's (for MTP or a tied head): its gradient is summed with the
                                // first stage's, and a checkpoint holds it once (the first stage's)
} nm_param_table;

// The part of the model one pipeline stage holds (docs/parallelism.md): main decoder layers
// [layer_begin, layer_end), the embedding when first, the final norm, head, MTP layers and
// losses when last. The whole model is {0, L, 1, 1}. Under the interleaved schedule a rank
// holds several such stages (virtual stages, or model chunks), each one of these.
typedef struct nm_model_stage {
    int64_t layer_begin, layer_end;
    int first, last;
} nm_model_stage;

// The most virtual stages (model chunks) one rank may hold (nm_model_options.n_chunks).
#define NM_MAX_MODEL_CHUNKS 32

// Builds the table from a validated config. Returns 0 or -1 with err filled.
int nm_param_table_build(nm_param_table *t, const nm_model_config *cfg, nm_error *err);
// The table of expert-parallel rank ep_rank of ep_size: every tensor, but of the routed experts
// only [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size) of each MoE layer (names keep the global
// expert index). ep_size must divide E.
int nm_param_table_build_ep(nm_param_table *t, const nm_model_config *cfg, int64_t ep_rank, int64_t ep_size,
                            nm_error *err);
// The table of tensor-parallel rank tp_rank of tp_size (and expert-parallel rank ep_rank of
// ep_size): the same rows in the same order as one process, with column-parallel matrices
// (q_b_proj / q_proj, kv_b_proj, dense and shared gate_proj / up_proj) holding 1/tp_size of
// their rows, row-parallel ones (o_proj, dense and shared down_proj) 1/tp_size of their
// columns, the embedding and lm_head 1/tp_size of the vocabulary; everything else whole.
// Refuses (naming the config key) a head count or FFN width tp_size does not divide.
// vocab_multiple (tp_size > 1 only): the vocabulary is padded up to a multiple of
// vocab_multiple x tp_size rows, as Megatron's make_vocab_size_divisible_by (1: to a multiple of
// tp_size, i.e. only when tp_size does not divide it).
int nm_param_table_build_tp(nm_param_table *t, const nm_model_config *cfg, int64_t ep_rank, int64_t ep_size,
                            int64_t tp_rank, int64_t tp_size, int64_t vocab_multiple, nm_error *err);
// Keeps only what stage s holds (params_stage.c): other layers' rows and the global tensors it
// does not hold are dropped, the buffer is re-packed (offsets inside a layer keep their
// alignment) and absent offsets become NM_OFF_NONE. Names and init_key are unchanged, so a
// stage initialises and loads its tensors exactly as one process does. The last stage keeps
// the embedding as a copy (embed_copy) when MTP or a tied head reads it and it is not first.
int nm_param_table_restrict_stage(nm_param_table *t, const nm_model_config *cfg, const nm_model_stage *s,
                                  nm_error *err);
// The same for a rank that holds the n stages s[0..n) (the interleaved schedule's model chunks,
// in layer order): every row one of them keeps, in the one-process order.
int nm_param_table_restrict_chunks(nm_param_table *t, const nm_model_config *cfg, const nm_model_stage *s, int64_t n,
                                   nm_error *err);
void nm_param_table_free(nm_param_table *t);
// Row index by exact name, or -1.
int nm_param_table_find(const nm_param_table *t, const char *name);
// 1 when a bf16 run reads row i only through the bf16 weight copy: the GEMM weights (linear.c
// weight_precision, the experts, the head). 0 for the rows it reads in fp32: the norms, the
// router and its bias (dsv3-spec 9.10), the embedding (its lookup), and tied rows (no storage).
// The distributed optimizer keeps the first kind's fp32 master weights only in their owners'
// ranges (train/zero.h).
int nm_param_row_reads_copy(const nm_param_table *t, int i);

// DeepSeek-V3 initialisation: N(0, init_std) for matrices, ones for norms, zeros for the
// router bias; deterministic from seed via the counter-based generator (tensor row index
// and element index are the counter), independent of thread count.
void nm_params_init(float *params /* (n_floats) */, const nm_param_table *t,
                    const nm_model_config *cfg, uint64_t seed);
