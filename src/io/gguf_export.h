// gguf_export.h: `nanomegatron export --format gguf`: a model as one GGUF file for llama.cpp's
// `deepseek2` architecture in its MLA layout (formats.md 3.4-3.6), with the tokenizer.
//
// Every key the deepseek2 loader reads is written (dimensions, MLA ranks and head dims,
// leading dense blocks, routed/shared experts, top-k, gating function, weight normalisation
// and scale, expert groups, YaRN); kv_b_proj is split into attn_k_b (transposed per head) and
// attn_v_b as current llama.cpp requires; routed experts are stacked per layer.
//
// Where llama.cpp's graph is narrower than our configs, the file is written so that its
// computation is still exactly ours, or refused:
//  - no shared experts: llama.cpp always adds a shared expert, so one of width Fe with zero
//    weights is written (it adds exactly 0);
//  - dense layers after the first MoE layer (moe_layer_freq > 1): llama.cpp's dense layers
//    are a leading block only, so such a layer is written as a MoE layer whose routed experts
//    and router are zero (routed output exactly 0) and whose shared expert is the dense MLP;
//    the shared-expert width is then max(n_shared * Fe, F) rounded up to a multiple of Fe,
//    narrower shared experts and MLPs zero-padded (padded units output exactly 0);
//  - YaRN: llama.cpp derives the attention scale and the cos/sin factor from
//    rope.scaling.yarn_log_multiplier and rope.scaling.attn_factor with its own assumptions on
//    mscale; both keys are solved for so that llama.cpp's two factors equal ours;
//  - refused with a message: group_limited_greedy routing with a real group limit (llama.cpp
//    ranks groups by the top-2 sum, i.e. noaux_tc), groups of one expert under a limit, a
//    26/27-layer model with q_lora (llama.cpp takes it for DeepSeek-V2-Lite), qk_nope 0.
// llama.cpp reads no YaRN beta keys for deepseek2 (it uses 32 and 1): other values are
// written anyway and warned about.
//
// MTP blocks are not exported (llama.cpp's own converter drops them for DeepSeek: skip_mtp),
// and nextn_predict_layers is not written; the main model is complete without them.
//
// Tensor types: 1-D tensors, norms and the router (ffn_gate_inp, exp_probs_b) stay F32, as the
// converter keeps them; the others get dtype, except that with Q8_0 a tensor whose rows are
// not a multiple of 32 is stored as F16 (listed on stderr).
#pragma once

#include "core/check.h"
#include "io/export_vocab.h"
#include "io/gguf.h"
#include "model/config.h"
#include "model/params.h"

int nm_gguf_export(const char *path, const nm_model_config *cfg, const nm_param_table *t,
                   const float *params /* (n_floats) */, const nm_export_vocab *vocab, nm_ggml_type dtype,
                   nm_gguf_progress_fn progress, void *progress_ctx, nm_error *err);
