// hf_dir.h: Hugging Face model directories (formats.md 2.4-2.5): config.json plus
// model.safetensors, or shards listed by model.safetensors.index.json.
//
// Loading maps file tensors onto the parameter table by exact HF name: every non-tied row
// must be present with exactly its shape, except NM_TENSOR_OPTIONAL rows (zeros when absent)
// and the MTP blocks as a whole (left as params holds them, with a notice); F8_E4M3 matrices
// are dequantised with their '<name>_scale_inv' 128 x 128 block scales; MTP copies of the embedding / head (tied rows)
// are compared with their owner and only warned about if they differ (dsv3-spec 11); file
// tensors the table does not know are listed in a warning. Saving writes every row,
// tied copies included (as copies), so the directory loads in transformers and llama.cpp.
#pragma once

#include "core/check.h"
#include "model/config.h"
#include "model/params.h"

// 0 when dir is a directory; otherwise an error naming it and what was expected (a file, a
// GGUF file, a missing path). run_ok: the command also takes a training run directory.
int nm_model_dir_check(const char *dir, int run_ok, nm_error *err);

// Reads DIR/config.json (after nm_model_dir_check).
int nm_hf_dir_load_config(const char *dir, nm_model_config *cfg, nm_error *err);

// Loads every non-tied row of t from DIR/model.safetensors or the sharded set into params
// (t->n_floats), converting BF16/F16 to fp32. params may be NULL: then names, shapes and
// file integrity are checked and nothing is read. Returns 0 or -1 with a message naming the
// file and tensor (expected vs found shape). Warnings go to stderr.
int nm_hf_dir_load_params(const char *dir, const nm_param_table *t, float *params /* (n_floats) or NULL */,
                          nm_error *err);

// What every command that reads a checkpoint calls: params get the fresh initialisation of
// cfg and seed (nm_params_init), then nm_hf_dir_load_params overwrites what the directory
// holds. Accepted: F32/BF16/F16, FP8 E4M3 with 128 x 128 block scales ('<name>_scale_inv',
// DeepSeek's release), sharded sets; MTP blocks absent as a whole keep their fresh values
// (a notice says so); the router bias of greedy / group_limited_greedy may be absent (zeros).
int nm_hf_dir_load_model(const char *dir, const nm_param_table *t, const nm_model_config *cfg, uint64_t seed,
                         float *params /* (n_floats) */, nm_error *err);

// Writes DIR/config.json (cfg->json_text verbatim) and DIR/model.safetensors (every row,
// tied copies included; BF16 when bf16 != 0 except the router bias, which stays F32),
// creating DIR if needed; each file is written atomically.
int nm_hf_dir_save(const char *dir, const nm_model_config *cfg, const nm_param_table *t,
                   const float *params /* (n_floats) */, int bf16, nm_error *err);
