// plan.h: what a parallel layout costs before it is launched (`nanomegatron plan`, design.md 6).
//
// Per rank: parameters, gradients, the bf16 weight copy, the ZeRO-1 optimizer shard, the
// activations held at the schedule's peak (the MoE receive side at moe_receive_capacity x the
// mean rows per round) and the communication buffers; per step: the bytes
// of each group and operation as the byte counters count them (docs/parallelism.md), and the
// compute time at a given FLOP/s.
//
// Nothing here has a formula of its own for a size: it builds the parameter table, the ZeRO-1
// ownership and buckets and the model's arena layout with the allocator's own code, handing
// it shape communicators (nm_comm_shape) for the groups, so the plan and a launched run
// cannot drift apart (tests/test_plan.sh checks both against a run's banner and counters).
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "core/precision.h"
#include "comm/mesh.h"
#include "model/config.h"

typedef struct nm_plan_request {
    int64_t world;              // processes
    int64_t tp, pp, ep;         // tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
    int64_t seq_len, micro_batch, global_batch;
    int recompute;
    int recompute_mla_up_proj;  // selective recomputation of the MLA up-projections (recompute_modules)
    int recompute_moe_act;      // ... of the routed experts' SwiGLU
    int recompute_layernorm;    // ... of the blocks' two RMSNorm outputs
    int sequence_parallel;      // under TP (the training config's sequence_parallel, default on)
    int64_t vocab_multiple;     // make_vocab_size_divisible_by (default 128)
    nm_precision precision;
    int64_t bucket_mb;          // ZeRO-1 bucket size (the training config's bucket_mb)
    double moe_receive_capacity; // the EP receive side per round, x the mean rows (0: the default)
    int exp_avg_bf16, exp_avg_sq_bf16; // AdamW m / v stored in bf16 (optimizer.exp_avg_dtype, ...)
    const char *pipeline_layout; // pipeline_model_parallel_layout (NULL or "": the even split)
    int64_t virtual_pipeline_size; // virtual_pipeline_model_parallel_size (0: from the layout, else 1)
    double flops;               // FLOP/s per rank for the compute time (0: not estimated)
    // The time model (plan_time.c): bytes/s per rank between ranks on one node and on two, the
    // latency of one message on each, and the ranks a node holds (the mesh's order fills nodes
    // with consecutive ranks). 0 bandwidth: the communication is not timed.
    double bw_intra, bw_inter, latency_intra, latency_inter;
    int64_t ranks_per_node;     // 0: all ranks on one node
    int overlap_grad_reduce;    // the dp / edp reduce-scatter starts inside the last backward (the
                                // training config's overlap_grad_reduce)
    int shard_grads;            // data_parallel_sharding_strategy optim_grads (ZeRO-2)
    int copy_fp32;              // the bf16 weight copy stored as fp32 holding bf16 values (the CPU's
                                // widen kernel: ops.h gemm_bf16_weight_type); 0: bf16 storage
    int overlap_ep;             // the expert all-to-all hidden behind compute: the trainer's
                                // overlap_moe_expert_parallel_comm (its second send buffer counted)
    int pair_micro_batches;     // the trainer's moe_pair_micro_batches: a second activation set, and
                                // the all-to-all behind the other micro-batch's compute
} nm_plan_request;

// Seconds per step on the ranks of one stage (plan_time.c).
typedef struct nm_plan_time {
    double compute_s;           // forward and backward of the stage's layers (again with recompute)
    double tp_s, ep_s, pp_s, dp_s; // each group's collectives (dp: dp and edp, reduce-scatter,
                                   // all-gather and the small all-reduces)
    double hidden_s;            // the part of them overlap hides
    double dp_exposed_s;        // the reduction's part not hidden, after the last backward
    double busy_s;              // compute + what is not hidden, without the pipeline bubble
} nm_plan_time;

// Bytes per rank and step, as metrics.jsonl's comm_* keys count them.
typedef struct nm_plan_comm {
    int64_t dp_reduce_scatter, dp_all_gather, dp_all_reduce;
    int64_t edp_reduce_scatter, edp_all_gather;
    int64_t ep_all_to_all;          // one rank's average share
    int64_t ep_all_to_all_job;      // the job's sum (comm_ep_all_to_all_bytes_job)
    int64_t tp_all_reduce, tp_reduce_scatter, tp_all_gather;
    int64_t pp_send, pp_recv;       // activations and their gradients to and from the neighbours
} nm_plan_comm;

// One pipeline stage: every rank of a stage holds the same sizes, except the optimizer shard
// (the distributed optimizer's equal ranges, within one NM_PARAM_ALIGN per piece), given for
// the rank with the largest one, the first rank and the mean.
typedef struct nm_plan_stage {
    int64_t first_layer, n_layers;  // decoder layers: n from first_layer on (in v chunks under the
                                    // interleaved schedule); the last stage also runs the MTP layers
    int64_t n_moe_layers;           // MoE blocks the rank runs (MTP ones included)
    int first, last;                // holds the embedding / the final norm, head, MTP layers and losses
    int64_t params_bytes;           // fp32 master weights (the parameter buffer)
    // The fp32 master weights resident: under bf16 at world > 1 the rows read only through the
    // bf16 copy are held in the rank's ranges alone (zero.h nm_zero_shard_master), the largest
    // over the stage's ranks and the first rank's; params_bytes otherwise. total_bytes counts it.
    int64_t params_resident_bytes, params_resident_bytes_first;
    int64_t grads_bytes;            // fp32 gradients (the buffer, whole)
    // Under gradient sharding (optim_grads at world > 1): the gradient buffer's most resident
    // bytes in a backward (zero.h nm_zero_sharded_resident_floats; the rest of it is released),
    // and the fp32 shard the micro-batches' sums wait in, the largest over the stage's ranks and
    // the first rank's. total_bytes counts these two instead of grads_bytes. 0 otherwise.
    int64_t grads_resident_bytes, grad_shard_bytes, grad_shard_bytes_first;
    int64_t bf16_copy_bytes;        // bf16 weights of the GEMMs (bf16 / fp8 runs)
    int64_t bf16_twin_bytes;        // bf16 copies of the activations only bf16 GEMMs read (bf16 runs)
    int64_t optimizer_bytes;        // AdamW m and v of the largest ZeRO-1 shard of the stage
    int64_t optimizer_bytes_first;  // the same for the stage's first rank (what its banner prints)
    int64_t optimizer_mean_bytes;   // the mean over the stage's ranks
    int64_t activation_bytes;       // the arena: one activation set per micro-batch in flight, and the
                                    // backward scratch they share
    int64_t in_flight;              // micro-batches whose activations the stage holds at its peak (1F1B;
                                    // per chunk under the interleaved schedule)
    int64_t ep_receive_rows;        // C: rows a rank's experts receive per round of the EP exchange
    int64_t ep_buffer_bytes;        // part of activation_bytes: the buffers sized by C
    int64_t total_bytes;            // params + grads (or their resident part and shard) + bf16 copies +
                                    // optimizer + activations
    nm_plan_comm comm;              // per rank of this stage and step (ep_all_to_all: the stage's layers)
    double flops_per_step_rank;     // training FLOPs of the stage's layers per rank and step
    nm_plan_time time;              // with a request's flops (and bandwidths)
} nm_plan_stage;


typedef struct nm_plan {
    nm_mesh_sizes n;
    int64_t accum;                  // micro-batches per step per data-parallel rank
    int64_t n_stages;               // pipeline ranks
    int64_t vpp;                    // virtual stages (model chunks) per pipeline rank
    nm_plan_stage *stages;          // (n_stages)
    nm_plan_comm comm;              // stage 0's (what rank 0's metrics.jsonl counts), with the job's all-to-all
    double flops_per_step_rank;     // training FLOPs per rank and step (the job's / world)
    double compute_s;               // flops_per_step_rank / request flops (0 when not given)
    // The time model (request flops > 0): the step on the slowest stage with the 1F1B bubble
    // (accum + PP - 1 micro-batch slots) and the exposed gradient reduction, what it gives per
    // rank, and the model FLOPs' share of flops x step (MFU).
    double step_s, bubble_fraction, tokens_per_s_rank, mfu;
} nm_plan;

// What moe_pair_micro_batches needs of a layout (the trainer's and the planner's check):
// expert parallelism, 1F1B if a pipeline (v virtual stages per rank: 1), 2 or more
// micro-batches a step, and each tensor-parallel group inside one expert-parallel group. -1
// with a message naming the key and the numbers.
int nm_pair_micro_batches_check(const nm_mesh_sizes *n, int64_t v, int64_t accum, int64_t global_batch,
                                int64_t micro_batch, nm_error *err);
// Fills p for cfg under r. Returns 0, or -1 with err naming what does not divide or is not
// supported.
int nm_plan_compute(nm_plan *p, const nm_model_config *cfg, const nm_plan_request *r, nm_error *err);
// The time model on a computed plan (nm_plan_compute calls it when r->flops > 0).
void nm_plan_time_compute(nm_plan *p, const nm_model_config *cfg, const nm_plan_request *r);
void nm_plan_free(nm_plan *p);
