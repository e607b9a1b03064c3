// trainer.h: the trainer, whole runs (create, step, save, evaluate, destroy), with its options
// and the metrics of a step. The public API (include/nanomegatron.h) re-exports it; it lives
// here so that the trainer's own code includes nothing above its layer.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "model/model.h"
#include "train/train_config.h"

typedef struct nm_trainer nm_trainer;

// Called by each step after the gradients are zeroed, before the first micro-batch's backward
// adds to them: a test installs one to plant a value (the CLI's --inject-nan poisons a
// gradient this way, tools/cmd_train.c). Returns 0, or -1 with err (the step fails).
typedef int (*nm_step_hook)(void *ctx, nm_model *model, int64_t step, nm_error *err);

typedef struct nm_trainer_options {
    const char *run_dir;        // checkpoints, metrics.jsonl, TensorBoard events, loss.svg
    int resume;                 // continue from run_dir's newest valid checkpoint, if any
    int quiet;                  // no progress line / banner on stdout
    int64_t max_nan_streak;     // stop after this many skipped steps in a row (default 5 if 0)
    nm_step_hook before_backward; // NULL, or a test's hook (above)
    void *hook_ctx;             // its first argument
    int recompute;              // activation recomputation per block (less memory, ~1/3 more compute)
    int allow_config_change;    // resume although the data, batch, sequence length or tokenizer changed
    int external_data;          // the caller hands in every micro-batch (nm_trainer_micro_batch, then
                                // nm_trainer_apply): no loaders are made, and run_dir may be NULL (no
                                // files then: no metrics, checkpoints or kernel cache)
} nm_trainer_options;

typedef struct nm_step_metrics {
    int64_t step;               // 1-based optimizer step just finished
    int64_t steps_total;
    double loss;                // total loss (ce + mtp_weight*mtp + aux_weight*aux), mean over micro-batches
    double ce_loss;
    double mtp_loss;
    double aux_loss;
    double grad_norm;           // before clipping
    double lr;
    double tokens_per_s;
    double tflops;              // model TFLOP/s (nm_model_flops_per_token x tokens/s)
    double mfu;                 // tflops / measured fp32 GEMM peak
    double load_max_over_mean;  // worst MoE layer's max/mean expert load this step
    double bias_min, bias_max;  // router bias range after the update
    double val_loss;            // validation CE at this step, NaN if not evaluated
    int skipped;                // 1 if the divergence guard skipped this step's update
    double t_data, t_forward, t_backward, t_optimizer;   // seconds per phase
    double t_comm;              // seconds in gradient reduce-scatter, parameter all-gather and the
                                // step's small all-reduces (EP dispatch is inside forward/backward)
    int64_t tokens;             // training tokens consumed so far (metrics.jsonl "tokens")
    double mtp_weight;          // MTP loss weight used this step
    int64_t skipped_total;      // steps skipped by the divergence guard so far, this one included
} nm_step_metrics;

int nm_trainer_create(nm_trainer **out, const nm_train_config *cfg, const nm_trainer_options *opts, nm_error *err);
// Runs one optimizer step. Returns 1 after a step, 0 when the configured steps are done,
// -1 on error (including divergence: too many non-finite steps in a row).
int nm_trainer_step(nm_trainer *t, nm_step_metrics *m, nm_error *err);
// The same step in the caller's hands (options.external_data; the Python layer's forward_backward
// and optimizer_step): nm_trainer_micro_batch runs one micro-batch's forward and backward on
// tokens (micro_batch, seq_len + 1), its gradients added to the step's with the trainer's
// scale 1 / (accum x dp), and returns its own loss terms; after accum of them (global_batch /
// (micro_batch x dp)), nm_trainer_apply reduces the gradients, checks and clips them, updates
// (lr >= 0 replaces the schedule's rate for this step) and gathers the parameters, exactly as
// nm_trainer_step after its own micro-batches; m gets the step's metrics over the job. 1 after
// an update, 0 for a step the divergence guard skipped, -1 on error (a call out of turn, a
// failed collective, too many non-finite steps). Not under pipeline parallelism.
int nm_trainer_micro_batch(nm_trainer *t, const int32_t *tokens, nm_loss_terms *lt, nm_error *err);
int nm_trainer_apply(nm_trainer *t, double lr, nm_step_metrics *m, nm_error *err);
// AdamW's hyper-parameters and the clipping norm from now on (the low-level create_optimizer):
// 0, or -1 with err naming a value out of range (as nm_optimizer_create checks them).
int nm_trainer_set_adamw(nm_trainer *t, double beta1, double beta2, double eps, double weight_decay, double clip_grad,
                         nm_error *err);
// Writes a checkpoint of the current state now.
int nm_trainer_save(nm_trainer *t, nm_error *err);
// The same checkpoint into another run directory (created if needed; its `latest` is
// updated and checkpoint.keep_last applies there): `train --out run_dir --resume` continues it.
int nm_trainer_save_to(nm_trainer *t, const char *run_dir, nm_error *err);
// The largest of every rank's `mine` (a collective over the whole job): how ranks agree at a
// step boundary to stop, e.g. on a signal only some of them received, so that all of them
// checkpoint the same step.
int nm_trainer_agree_stop(nm_trainer *t, int mine, int *any, nm_error *err);
// sizeof the public struct of that name (e.g. "nm_step_metrics"), 0 for a name it does not know:
// bindings that restate the structs (python/) compare their sizes with the library's at load.
size_t nm_struct_size(const char *name);
// Mean validation cross-entropy over cfg.log.eval_batches micro-batches of the held-out split.
int nm_trainer_evaluate(nm_trainer *t, double *val_loss, nm_error *err);
// Finishes the logs (loss.svg, metrics flush). Called by destroy too.
int nm_trainer_finish(nm_trainer *t, nm_error *err);
void nm_trainer_destroy(nm_trainer *t);

nm_model *nm_trainer_model(nm_trainer *t);
int64_t nm_trainer_step_count(const nm_trainer *t);
