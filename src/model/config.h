// config.h: the model architecture, loaded from a Hugging Face DeepseekV3 config.json.
//
// Shape letters used in every comment and argument name of the project (style.md 11):
//   B  batch rows            T   sequence length (of the block being run)
//   N  tokens = B*T          D   hidden_size
//   V  vocab_size            L   num_hidden_layers (main model)
//   H  num_attention_heads   Dn / Dr / Dv  qk_nope / qk_rope / v head dims, Dqk = Dn + Dr
//   Rq q_lora_rank (0: plain q_proj)        Rkv kv_lora_rank
//   F  intermediate_size (dense MLP)        Fe  moe_intermediate_size (one routed expert)
//   Fs shared expert width = n_shared * Fe  E   n_routed_experts, K num_experts_per_tok
//   G  n_group, Gk topk_group               M   num_nextn_predict_layers (MTP depth)
//
// Immutable after nm_model_config_load (which validates and derives).
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "core/routing.h"


typedef struct nm_model_config {
    // --- keys of config.json --------------------------------------------------------------
    int64_t V;                  // vocab_size
    int64_t D;                  // hidden_size
    int64_t F;                  // intermediate_size (dense layers)
    int64_t Fe;                 // moe_intermediate_size
    int64_t L;                  // num_hidden_layers
    int64_t M;                  // num_nextn_predict_layers
    int64_t H;                  // num_attention_heads
    int64_t H_kv;               // num_key_value_heads (must equal H)
    int64_t Rq;                 // q_lora_rank, 0 when null/0 (plain q_proj)
    int64_t Rkv;                // kv_lora_rank
    int64_t Dn;                 // qk_nope_head_dim
    int64_t Dr;                 // qk_rope_head_dim (even)
    int64_t Dv;                 // v_head_dim
    int64_t E;                  // n_routed_experts (0: no MoE layers at all)
    int64_t n_shared;           // n_shared_experts (may be 0)
    int64_t K;                  // num_experts_per_tok
    int64_t G;                  // n_group
    int64_t Gk;                 // topk_group
    int64_t first_k_dense;      // first_k_dense_replace
    int64_t moe_layer_freq;     // MoE iff layer >= first_k_dense && layer % freq == 0
    double routed_scaling;      // routed_scaling_factor
    int norm_topk_prob;         // renormalise the K selected scores
    nm_scoring scoring;         // scoring_func
    nm_topk_method topk_method; // topk_method
    double rms_eps;             // rms_norm_eps (also used for the latent norms; see dsv3-spec 9.12)
    double rope_theta;          // rope_theta
    int64_t max_pos;            // max_position_embeddings
    int tie_embeddings;         // tie_word_embeddings
    double init_std;            // initializer_range
    int64_t bos_id, eos_id;     // bos_token_id / eos_token_id (-1 when null)

    // rope_scaling (yarn or none)
    int yarn;                   // 1 if rope_scaling.type/rope_type == "yarn"
    double yarn_factor;         // factor
    int64_t yarn_orig_max_pos;  // original_max_position_embeddings
    double yarn_beta_fast;      // beta_fast (default 32)
    double yarn_beta_slow;      // beta_slow (default 1)
    double yarn_mscale;         // mscale (default 1; see dsv3-spec 9.6 for the missing-key case)
    double yarn_mscale_all_dim; // mscale_all_dim (default 0)

    // --- derived (nm_model_config_load fills these) -----------------------------------------
    int64_t Dqk;                // Dn + Dr
    int64_t Fs;                 // n_shared * Fe
    int64_t n_layers;           // L + M: every decoder block, MTP blocks last
    double softmax_scale;       // Dqk^-1/2 * mscale^2 (YaRN)
    double rope_attn_factor;    // multiplier on cos/sin (YaRN "attention_scaling"), 1 otherwise
    char *json_text;            // the config.json text as loaded (written back verbatim by init)
    char *source_path;          // where it came from, for messages
} nm_model_config;

// Loads and validates a config.json. Missing keys take the Hugging Face defaults of
// DeepseekV3Config; unknown keys are reported once on stderr; impossible values are
// rejected with the key, the value and why. Returns 0 or -1 with err filled.
int nm_model_config_load(nm_model_config *cfg, const char *path, nm_error *err);
// Same from a JSON string (path is used only in messages).
int nm_model_config_parse(nm_model_config *cfg, const char *json_text, const char *path, nm_error *err);
void nm_model_config_free(nm_model_config *cfg);

// Layer kinds. Layers [0, L) are the main model; [L, L+M) are MTP blocks (always MoE
// when E > 0 and the index rule says so, as in DeepSeek-V3 where layer 61 is MoE).
int nm_layer_is_moe(const nm_model_config *cfg, int64_t layer);
static inline int nm_layer_is_mtp(const nm_model_config *cfg, int64_t layer) { return layer >= cfg->L; }

// Rotary inverse frequencies (Dr/2 of them), YaRN-corrected when configured (dsv3-spec 4.3).
void nm_rope_inv_freq(const nm_model_config *cfg, double *inv_freq /* (Dr/2) */);

// 1 when key is a config.json key the model reads or knowingly ignores; else 0 with closest the
// nearest key it reads (within 3 edits) or NULL.
int nm_model_config_key_known(const char *key, const char **closest);

// Whether the router adds e_score_correction_bias to its selection scores (and the trainer
// updates it): DeepSeek-V3's aux-loss-free balancing, topk_method noaux_tc only, as in
// DeepSeek's code. Every place outside the router asks this instead of naming the method.
static inline int nm_routing_uses_bias(const nm_model_config *c) { return c->topk_method == NM_TOPK_NOAUX_TC; }
