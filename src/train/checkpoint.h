// checkpoint.h: training checkpoints that survive kill -9 (design.md 8).
//
// Layout of a run directory:
//   RUN_DIR/step_000100/config.json         the model config (a checkpoint is also a HF model dir)
//   RUN_DIR/step_000100/model.safetensors   parameters by HF name, fp32 (router biases included)
//   RUN_DIR/step_000100/optim_m.safetensors AdamW first moments by parameter name
//   RUN_DIR/step_000100/optim_v.safetensors AdamW second moments by parameter name
//   RUN_DIR/step_000100/trainer.json        step, tokens, data cursor, optimizer step, seed,
//                                           counters, the effective training config, the
//                                           layout, and the size + CRC-32C of every file above
//   RUN_DIR/latest                          "step_000100\n", replaced atomically
//
// Save protocol: everything goes into RUN_DIR/step_000100.tmp.<pid>/ (each file fsync'd,
// trainer.json last), the directory is renamed into place and RUN_DIR fsync'd, then
// `latest` is replaced atomically, then checkpoints beyond keep_last are deleted. A kill at
// any point leaves `latest` naming a complete checkpoint (or no `latest` at all).
//
// Load protocol: `latest` first; if it is missing, unreadable, or its checkpoint fails a
// check (trainer.json unparsable, a file missing, a size or CRC mismatch), say so on stderr
// and try the next older step_* directory.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "model/config.h"
#include "model/params.h"

typedef struct nm_ckpt_state {
    int64_t step;               // optimizer steps completed
    int64_t tokens;             // training tokens consumed
    int64_t data_sample;        // train loader cursor (next global sample)
    int64_t optim_step;         // AdamW t
    int64_t skipped_steps;      // steps skipped by the divergence guard so far
    int64_t nan_streak;         // consecutive skipped steps at save time
    int64_t seed;
    int64_t world;              // data-parallel ranks the checkpoint was written with
    char *train_config_json;    // effective training config (owned; freed by nm_ckpt_state_free)
    char *tokenizer;            // "bytes" or a path (owned)
} nm_ckpt_state;

void nm_ckpt_state_free(nm_ckpt_state *st);

// Writes checkpoint `st->step` under run_dir. out_dir (may be NULL) receives its path.
int nm_checkpoint_save(const char *run_dir, const nm_ckpt_state *st, const nm_model_config *mcfg,
                       const nm_param_table *t, const float *params, const float *adam_m, const float *adam_v,
                       int64_t keep_last, char *out_dir, size_t out_cap, nm_error *err);

// Finds the newest valid checkpoint of run_dir and loads it into params / adam_m / adam_v
// (laid out by t) and st. Returns 1 when run_dir has no checkpoint at all (fresh start),
// 0 when one was loaded (its path in out_dir), -1 when checkpoints exist but none is
// valid or the one found does not fit t (err says which and why).
int nm_checkpoint_load_latest(const char *run_dir, nm_ckpt_state *st, const nm_param_table *t, float *params,
                              float *adam_m, float *adam_v, char *out_dir, size_t out_cap, nm_error *err);

// The check behind load: trainer.json's text (len bytes, need not be NUL-terminated) as read
// from dir/trainer.json, and the size + CRC of every file it lists in dir. Fills st (free
// with nm_ckpt_state_free) and returns 0, or -1 with err. Public for the fuzz target.
int nm_checkpoint_verify_trainer(const char *dir, const char *text, size_t len, nm_ckpt_state *st, nm_error *err);

// Path of the newest valid checkpoint directory (for `sample --model RUN_DIR`), or -1.
int nm_checkpoint_find_latest(const char *run_dir, char *out_dir, size_t out_cap, nm_error *err);
