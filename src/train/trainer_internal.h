// trainer_internal.h: the trainer's state, shared by its phases: trainer.c (create, destroy),
// trainer_step.c (one optimizer step), trainer_report.c (the banner, metrics.jsonl, TensorBoard,
// the progress line) and trainer_ckpt.c (resume and save). Nothing outside src/train/trainer*.c
// includes it: the rest of the project sees trainer.h.
#pragma once

#include "train/trainer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/fileio.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "comm/comm.h"
#include "comm/mesh.h"
#include "io/hf_dir.h"
#include "model/config.h"
#include "model/flops.h"
#include "model/model.h"
#include "ops/ops.h"
#include "train/balance.h"
#include "train/checkpoint.h"
#include "train/memcheck.h"
#include "train/metrics.h"
#include "train/optim.h"
#include "train/pipeline.h"
#include "train/run_lock.h"
#include "train/schedule.h"
#include "train/tensorboard.h"
#include "train/tp_shard.h"
#include "train/train_config.h"
#include "train/zero.h"


struct nm_trainer {
    nm_train_config cfg;        // borrowed, immutable
    nm_trainer_options opts;
    nm_model_config mcfg;
    nm_model *model;
    nm_model *model_pair;       // moe_pair_micro_batches: the second activation set (its weights and
                                // gradients are model's), else NULL
    nm_coop *coop;              // ... and the two jobs' stacks
    nm_optimizer *optim;
    const nm_ops *ops;          // the backend instance (cfg.backend, NM_BACKEND), owned: destroyed last
    nm_comm *world;             // owned
    nm_mesh *mesh;              // groups of the layout
    nm_zero *zero;              // ZeRO-1 ownership and buckets (world > 1)
    nm_param_table full_table;  // tensor parallelism: the one-process table (checkpoint layout)
    int sp;                     // sequence parallelism (tp > 1 and sequence_parallel)
    unsigned char *tp_summed;   // (n_rows) sequence-parallel partial rows already summed over tp this step
    int rank0;                  // this process prints and writes the logs
    int64_t comm_seen[5][NM_COMM_N_OPS]; // dp / edp / ep / tp / pp byte counters at the last step's end
    double comm_time_seen[5];   // their seconds inside collectives, all operations
    double ep_a2a_seen;         // the ep group's seconds inside all-to-alls (starts and waits included)
    double ep_overlap_s;        // the step's compute run with an expert all-to-all in flight
    // pipeline parallelism (NULL / 0 without it)
    nm_pipeline *pipe;
    nm_model_stage *stages;     // (pp x vpp) every stage's layers, in pipeline order
    int64_t vpp;                // virtual stages (model chunks) per pipeline rank: 1, or interleaved
    nm_model_stage *chunks;     // (vpp) this rank's: stages[c * pp + pp_rank]
    nm_comm *emb;               // embedding group: first and last stage of this pipeline (2 ranks), else 1
    int32_t *tokens_all;        // (accum, micro_batch, T) the step's micro-batches, read by every stage
    double *pp_idle;            // (pp) each stage's idle fraction of the last step
    char (*pp_keys)[48];        // (pp) their metric names
    nm_metric *step_kv;         // (STEP_METRICS + pp) one step's metrics.jsonl entries
    int embed_copy_row;         // the table row of the last stage's embedding copy (left out of the norm), else -1
    nm_loader *train_data;
    nm_loader *valid_data;      // NULL when there is no validation split
    nm_lr_schedule sched;
    int64_t T;                  // model sequence length = seq_len + 1 (inputs and shifted targets)
    int64_t accum;
    int32_t *tokens;            // (micro_batch, T)
    int64_t *step_counts;       // (n_moe, E) expert selections summed over the step's micro-batches
    const float *model_params_readonly; // the parameters, for reading without marking them changed
    const float **bias_ptrs;    // (n_moe) router bias of each MoE layer

    int64_t step;               // optimizer steps completed
    // the caller's step (options.external_data: nm_trainer_micro_batch, nm_trainer_apply)
    int64_t ext_micro;          // micro-batches handed in for the step under way
    nm_step_metrics ext_m;      // its metrics so far
    nm_loss_options ext_opt;    // its loss options
    int ext_finite;             // every micro-batch's loss was finite
    double ext_t0;              // when its first micro-batch began
    int64_t tokens_seen;
    int64_t skipped_steps;
    int64_t nan_streak;
    char nan_first[256];        // tensor where the current streak's first non-finite value appeared

    double flops_per_token;
    double peak_flops;          // measured fp32 GEMM FLOP/s, summed over the ranks (raised by a faster step)
    int peak_raised;            // the note that the start-up peak was low has been printed
    char kernels[640];          // the backend's kernels and how they were chosen (ops->tune), for the banner
    double t_start;             // wall clock at create (for ETA)
    int64_t step_at_start;

    nm_metrics_writer *metrics;
    nm_tb_writer *tb;
    int tty;
    double *hist_step, *hist_loss;     // (cfg.steps) train loss per step, for loss.svg
    double *hist_vstep, *hist_vloss;   // (cfg.steps + 1) validation points
    int64_t n_hist, n_vhist;
    int finished;
    int run_lock;               // rank 0: the open RUN_DIR/.lock it holds an flock on (-1: none)
};

// metrics.jsonl entries of a step besides the per-stage ones: 20 always, up to 20 from
// comm_metrics, the four ep_ ones, pp_bubble_theory and val_loss; with room to spare.
#define STEP_METRICS 64

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// trainer.c: distinct validation batches the evaluation runs (at most log.eval_batches).
int64_t nm_trainer_eval_batches(const nm_trainer *t);
// trainer_ckpt.c: --resume from the newest valid checkpoint; *resumed = 1 when there was one.
int nm_trainer_resume(nm_trainer *t, const char *metrics_path, int *resumed, nm_error *err);
// trainer_report.c: the start-up banner (stage_mem: (2 pp) per-stage parameter and activation
// bytes under pipeline parallelism, else NULL) and one step's report.
void nm_trainer_banner(nm_trainer *t, const double *stage_mem);
int nm_trainer_report_step(nm_trainer *t, const nm_step_metrics *m, int64_t ep_rounds, double ep_over, int diverged,
                           nm_error *err);

// The activations this rank holds: the model's, and the pair's under moe_pair_micro_batches.
static inline int64_t nm_trainer_activation_bytes(const nm_trainer *t) {
    return (int64_t)nm_model_activation_bytes(t->model) +
           (t->model_pair ? (int64_t)nm_model_activation_bytes(t->model_pair) : 0);
}
