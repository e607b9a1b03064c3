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
// Under data/expert parallelism (shard->world of more than one rank) the same directory is an
// HF sharded checkpoint: rank k writes the tensors it owns (ZeRO-1, src/train/zero.h) into
// model-0000k-of-0000n.safetensors and its optimizer state into optim_m-/optim_v-0000k-of-
// 0000n.safetensors, in parallel; rank 0 then writes the three *.safetensors.index.json
// files, config.json and trainer.json (with every rank's sizes and CRCs) and commits. A rank
// that dies mid-save leaves only a .tmp directory behind: `latest` still names the previous
// checkpoint. Everything is by name, so any layout (or one process) resumes any other.
//
// Load protocol: `latest` first; if it is missing, unreadable, or its checkpoint fails a
// check (trainer.json unparsable, a file missing, a size or CRC mismatch), say so on stderr
// and try the next older step_* directory.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "comm/comm.h"
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

// How this rank takes part in a save or load; NULL (or world NULL / size 1 with owned NULL) is
// one process holding everything.
typedef struct nm_ckpt_shard {
    nm_comm *world;                 // every rank of the job calls save/load together
    const unsigned char *owned;     // (n_rows) rows this rank writes; NULL: all
    const size_t *row_state;        // (n_rows) offset of each row in adam_m / adam_v, SIZE_MAX when
                                    // not held here; NULL: the row offsets (unsharded state)
    int64_t tp, pp, ep;             // the layout, recorded in trainer.json
} nm_ckpt_shard;

// Writes checkpoint `st->step` under run_dir. out_dir (may be NULL) receives its path.
int nm_checkpoint_save(const char *run_dir, const nm_ckpt_state *st, const nm_model_config *mcfg,
                       const nm_param_table *t, const float *params, const float *adam_m, const float *adam_v,
                       const nm_ckpt_shard *shard, int64_t keep_last, char *out_dir, size_t out_cap, nm_error *err);

// Finds the newest valid checkpoint of run_dir and loads it into params / adam_m / adam_v
// (laid out by t) and st. Returns 1 when run_dir has no checkpoint at all (fresh start),
// 0 when one was loaded (its path in out_dir), -1 when checkpoints exist but none is
// valid or the one found does not fit t (err says which and why).
// Loads by name whatever layout wrote it: params gets every non-tied row of t, adam_m/adam_v
// the rows shard->row_state places (all rows when shard is NULL).
int nm_checkpoint_load_latest(const char *run_dir, nm_ckpt_state *st, const nm_param_table *t, float *params,
                              float *adam_m, float *adam_v, const nm_ckpt_shard *shard, char *out_dir,
                              size_t out_cap, nm_error *err);

// The check behind load: trainer.json's text (len bytes, need not be NUL-terminated) as read
// from dir/trainer.json, and the size + CRC of every file it lists in dir. Fills st (free
// with nm_ckpt_state_free) and returns 0, or -1 with err. Public for the fuzz target.
int nm_checkpoint_verify_trainer(const char *dir, const char *text, size_t len, nm_ckpt_state *st, nm_error *err);

// Path of the newest valid checkpoint directory (for `sample --model RUN_DIR`), or -1.
int nm_checkpoint_find_latest(const char *run_dir, char *out_dir, size_t out_cap, nm_error *err);
