// hf_export.h: `nanomegatron export --format hf`: a model as a Hugging Face directory that
// transformers loads as DeepseekV3ForCausalLM without remote code (formats.md 2.4-2.6).
//
// Writes config.json, model.safetensors (or shards model-0000i-of-0000n.safetensors with
// model.safetensors.index.json once the tensors exceed max_shard_bytes), generation_config.json,
// tokenizer.json and tokenizer_config.json. The whole directory is built under a temporary
// name next to out_dir and renamed into place, so out_dir is either absent or complete; an
// existing non-empty out_dir is refused.
//
// config.json is the model's own, with architectures / model_type / torch_dtype set and
// quantization_config dropped. transformers' native DeepseekV3 implements only sigmoid
// scores with noaux_tc routing and dense-then-MoE layers (first_k_dense_replace, no
// moe_layer_freq). So: greedy and group-limited routing without an effective group limit are
// rewritten as the identical noaux_tc with n_group = topk_group = 1; what native transformers
// cannot compute (softmax scores, group_limited_greedy with a limit, moe_layer_freq > 1) is
// written unchanged (DeepSeek's remote code and our loader read it) with a warning on stderr
// saying transformers' native class will compute something else.
//
// Every parameter row is written (MTP blocks included, so the directory loads back into
// nanomegatron; transformers ignores them with an "unused weights" note), tied MTP copies as
// copies; the router bias stays F32 whatever the dtype.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "io/export_vocab.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"

// Called after each safetensors file with bytes written so far and the total.
typedef void (*nm_export_progress_fn)(void *ctx, int64_t done_bytes, int64_t total_bytes, const char *what);

// dtype: NM_ST_F32, NM_ST_BF16 or NM_ST_F16. max_shard_bytes <= 0: never shard.
int nm_hf_export(const char *out_dir, const nm_model_config *cfg, const nm_param_table *t,
                 const float *params /* (n_floats) */, const nm_export_vocab *vocab, nm_st_dtype dtype,
                 int64_t max_shard_bytes, nm_export_progress_fn progress, void *progress_ctx, nm_error *err);

