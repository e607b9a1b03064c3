// train_config.h: the training configuration (configs/*-train.json), parsed with cJSON into
// an immutable nm_train_config (style.md 23), with `--set a.b=value` overrides.
//
// Keys (defaults in parentheses; nm_train_config_describe prints this table):
//   model             HF config.json to build a fresh model from              (null)
//   init_from         HF model directory (config.json + safetensors) to start from (null)
//                     exactly one of model / init_from must be given
//   tokenizer         "bytes" or a tokenizer.json path                        ("bytes")
//   data.synthetic    use the generated corpus                        (true iff no paths)
//   data.synthetic_tokens                                                    (2097152)
//   data.paths        [{"prefix": ".../name_text_document", "weight": w}, ...]      ([])
//   data.split        Megatron "train,valid[,test]" weights                   ("99,1")
//   seq_len (256)  micro_batch (8)  global_batch (0: = micro_batch)  steps (1000)
//   precision         "fp32" | "bf16" | "fp8"                                 ("fp32")
//   backend           the ops backend, "cpu" | "ref" (ops.h); NM_BACKEND overrides  ("cpu")
//   communicator      "auto" | "single" | "mpi" | "nccl" (comm.h); NM_COMM overrides  ("auto")
//   seed (1234)  threads (0: OpenMP default)
//   optimizer.{lr 3e-4, min_lr 3e-5, beta1 0.9, beta2 0.95, eps 1e-8, weight_decay 0.1,
//              clip_grad 1.0 (0: off)}
//   schedule.{type "cosine" (constant|cosine|wsd|wsd-cosine), warmup_steps 0,
//             decay_start 0, decay_steps 0 (wsd-cosine), decay_fraction 0.2,
//             decay_shape "linear" (linear|1-sqrt) (wsd)}            -- see schedule.h
//   balance.{bias_update_speed 0.001, bias_update_stop_step 0 (0: never), aux_weight 1e-4}
//   mtp.{weight 0.3, weight_after 0.1, switch_step 0 (0: never)}
//   checkpoint.{save_every 0 (0: only at the end), keep_last 3 (0: keep all)}
//   log.{log_every 10, eval_every 0 (0: never), eval_batches 10}
//
// Path rule: a relative path read from the config file (model, init_from, tokenizer,
// data.paths prefixes) is relative to the directory holding that file, so a config and
// its inputs move together; a relative path given with --set is relative to the current
// directory, as on any command line. Absolute paths are kept. The struct holds the
// resolved paths (lexically normalised, e.g. "configs/tiny.json").
//
// Errors: unknown keys, duplicate keys, ill-typed values and out-of-range values are
// errors naming the file (or "--set"), the key and the value. --set values are
// type-checked against the key: integers, numbers, true/false, names of an enum, strings,
// `null` for model/init_from, and a JSON array for data.paths.
#pragma once

#include <stdint.h>
#include <stdio.h>

#include "core/check.h"
#include "core/precision.h"
#include "model/config.h"
#include "train/optim.h"
#include "train/schedule.h"

typedef struct nm_data_source {
    char *prefix;               // resolved path prefix of <prefix>.bin / <prefix>.idx
    double weight;              // blending weight, > 0
} nm_data_source;

typedef struct nm_train_config {
    // --- model ------------------------------------------------------------------------------
    char *model;                // resolved HF config.json, or NULL
    char *init_from;            // resolved HF model directory, or NULL
    char *tokenizer;            // "bytes" or a resolved tokenizer.json path
    char *model_set;            // JSON object of `--set model_config.KEY=VALUE` edits to `model`'s
                                // config (fresh models only), or NULL
    // --- data -------------------------------------------------------------------------------
    int data_synthetic;         // 1: generated corpus of data_synthetic_tokens tokens
    int64_t data_synthetic_tokens;
    nm_data_source *data_paths; // (n_data_paths)
    int n_data_paths;
    char *data_split;           // as given, e.g. "99,1"
    double data_split_frac[3];  // derived: train / valid / test fractions, summing to 1
    char *data_cache_dir;       // index mappings' cache; "": RUN_DIR/index_cache (datasets on disk)
    int data_cache_per_node;    // 1: the first rank of each node builds them (node-local disks); 0: rank 0
    // --- batch and run ----------------------------------------------------------------------
    int64_t seq_len;            // T of the training windows
    int64_t micro_batch;        // rows per forward/backward
    int64_t global_batch;       // rows per optimizer step (all ranks, all micro-batches)
    int64_t steps;              // optimizer steps
    nm_precision precision;
    char *backend;              // ops backend by name (nm_backend_select), after NM_BACKEND
    char *communicator;         // "auto" | "single" | "mpi" | "nccl" (nm_comm_init_as), after NM_COMM
    int64_t seed;               // in [0, 2^53], so JSON numbers hold it exactly
    int64_t threads;            // OpenMP threads, 0: the runtime's default
    // --- parallel layout (design.md 6; data_parallel_size = world / (tp * pp)) --------------
    int64_t tensor_parallel_size;   // 1
    int64_t pipeline_parallel_size; // 1
    char *pipeline_layout;          // pipeline_model_parallel_layout ("Et|tt|tmL"); "": even split
    int moe_shared_expert_overlap;  // the shared experts inside the expert all-to-all (moe.c)
    int overlap_moe_expert_parallel_comm; // the split expert exchange: each MoE block's dispatch and
                                          // combine in two parts, one's in flight while the other's
                                          // experts compute (moe.c)
    int moe_pair_micro_batches;     // micro-batch i+1's forward beside i's backward, each one's expert
                                    // all-to-alls in flight while the other computes (trainer_step.c)
    int64_t virtual_pipeline_size;  // virtual_pipeline_model_parallel_size: chunks per pipeline rank
                                    // (interleaved 1F1B); 0: from the layout's stage count, else 1
    int64_t expert_parallel_size;   // 1: routed experts sharded over this many ranks
    double moe_receive_capacity;    // EP receive buffers per round, x the mean rows per rank (2.0)
    char *recompute_granularity;  // "full", "selective" or "" (Megatron's --recompute-granularity)
    int recompute_full;         // derived: recompute_granularity is full (as the --recompute option)
    char *recompute_modules;    // selective recomputation, Megatron's module names, comma-separated
                                // ("mla_up_proj", "moe_act", "layernorm"); "": none
    int recompute_mla_up_proj;  // derived: recompute_modules names mla_up_proj
    int recompute_moe_act;      // derived: ... moe_act
    int recompute_layernorm;    // derived: ... layernorm
    int64_t bucket_mb;              // ZeRO-1 gradient bucket size in MiB of fp32 (40)
    int overlap_grad_reduce;        // 1: buckets start reducing during the last backward (default 0)
    int data_parallel_sharding_strategy; // 0 optim (ZeRO-1, default), 1 optim_grads (ZeRO-2)
    int sequence_parallel;          // 1 (default): with tensor_parallel_size > 1, sequence parallelism
    int64_t make_vocab_size_divisible_by; // 128: with TP, vocabulary padded to a multiple of this x TP
    int64_t exit_interval;          // stop (after a checkpoint) at a step divisible by this; 0: off
    struct {
        double lr, min_lr;      // schedule's lr_max / lr_min
        double beta1, beta2, eps, weight_decay;
        double clip_grad;       // max global grad norm, 0: off
        int exp_avg_dtype;      // AdamW m storage: 0 fp32 (default), 1 bf16 (Megatron --exp-avg-dtype)
        int exp_avg_sq_dtype;   // AdamW v storage: the same (--exp-avg-sq-dtype)
    } optimizer;
    struct {
        nm_lr_schedule_type type;
        int64_t warmup_steps;
        int64_t decay_start;    // wsd-cosine: last step at lr
        int64_t decay_steps;    // wsd-cosine: cosine length
        double decay_fraction;  // wsd
        nm_wsd_decay decay_shape; // wsd
    } schedule;
    struct {
        double bias_update_speed;     // gamma
        int64_t bias_update_stop_step; // 0: never stop
        double aux_weight;            // alpha of the sequence-wise balance loss
    } balance;
    struct {
        double weight, weight_after;  // lambda before / after switch_step
        int64_t switch_step;          // 0: never switch
    } mtp;
    struct {
        int64_t save_every;     // 0: only at the end of the run
        int64_t keep_last;      // 0: keep every checkpoint
    } checkpoint;
    struct {
        int64_t log_every;      // progress line + TensorBoard cadence (metrics.jsonl: every step)
        int64_t eval_every;     // 0: no evaluation
        int64_t eval_batches;   // micro-batches per evaluation
    } log;
    // --- derived ----------------------------------------------------------------------------
    int64_t accum_steps;        // global_batch / micro_batch on one data-parallel rank
    char *source_path;          // the file it came from (or the name given to parse)
} nm_train_config;

// Reads the file, applies the overrides ("a.b=value", in order, later ones win), checks
// everything. On error returns -1, fills err, and leaves cfg freed (nm_train_config_free
// is still safe to call).
int nm_train_config_load(nm_train_config *cfg, const char *path, const char *const *overrides, int n_overrides,
                         nm_error *err);
// Same from text; `name` is used in messages; relative paths in the text resolve against
// base_dir (NULL or "": the current directory, e.g. for a config read back from a
// checkpoint, whose paths are already resolved).
int nm_train_config_parse(nm_train_config *cfg, const char *json_text, const char *name, const char *base_dir,
                          const char *const *overrides, int n_overrides, nm_error *err);
void nm_train_config_free(nm_train_config *cfg);

// The effective configuration as formatted JSON with every key (resolved paths, derived
// defaults filled in); parsing it back gives the same config. Free with nm_free.
char *nm_train_config_to_json(const nm_train_config *cfg);

// Gradient-accumulation steps for dp_world data-parallel ranks: global_batch must be a
// multiple of micro_batch * dp_world. Returns 0 or -1 with err naming the three numbers.
int nm_train_config_accum_steps(const nm_train_config *cfg, int64_t dp_world, int64_t *accum, nm_error *err);

// The pieces other modules take.
void nm_train_config_lr_schedule(const nm_train_config *cfg, nm_lr_schedule *out);
void nm_train_config_adamw(const nm_train_config *cfg, nm_adamw_config *out);
// A recompute_modules list (comma-separated Megatron names: mla_up_proj, moe_act, layernorm)
// into the three flags. 0, or -1 with *bad and *bad_len naming the first entry that is none.
int nm_recompute_modules_parse(const char *list, int *mla_up_proj, int *moe_act, int *layernorm, const char **bad,
                                int *bad_len);
const char *nm_precision_name(nm_precision p);

// Prints every key with its type and default (for `train --help`).
void nm_train_config_describe(FILE *fp);

// The model config of the run: init_from's config.json, or `model` with the
// `--set model_config.KEY=VALUE` edits applied (the edited JSON is the config's json_text, so
// checkpoints record it). Returns 0 or -1 with err naming the file, key and value.
int nm_train_config_model_config(const nm_train_config *cfg, nm_model_config *out, nm_error *err);
