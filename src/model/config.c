// config.c: loads a Hugging Face DeepseekV3 config.json into nm_model_config, validates it
// and derives the quantities every other module uses.
//
// Reference: transformers `DeepseekV3Config` (defaults of every missing key), the hub remote
// code (num_nextn_predict_layers, moe_layer_freq, scoring_func, topk_method), and
// `modeling_rope_utils._compute_yarn_parameters` for YaRN (dsv3-spec 1.1, 4.3, 9.4-9.6).
//
// Deliberately not supported (rejected with a message, never silently ignored):
// attention_bias true, hidden_act other than silu, rope_interleave false, rope types other than
// yarn/default, yarn "truncate": false, num_key_value_heads != num_attention_heads.
//
// One strictness beyond HF: with YaRN, max_position_embeddings must equal
// factor * original_max_position_embeddings. HF 4.5x uses max_pos/orig for the frequencies but
// `factor` for the softmax mscale, so a config breaking that identity means two different
// scalings inside one model (dsv3-spec 9.5); we refuse it rather than pick one.
#include "model/config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/strdist.h"
#include "core/check.h"
#include "core/fileio.h"

// --- key lists -------------------------------------------------------------------------------

// Keys read below. Anything in neither list is reported on stderr as unknown.
static const char *const read_keys[] = {
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_nextn_predict_layers", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "num_local_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "first_k_dense_replace", "moe_layer_freq", "routed_scaling_factor", "norm_topk_prob",
    "scoring_func", "topk_method", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "initializer_range", "bos_token_id",
    "eos_token_id", "attention_bias", "hidden_act", "rope_interleave", NULL,
};

// Keys that exist in real DeepSeek-V3-family configs (or every PretrainedConfig) but change
// nothing for training: accepted silently.
static const char *const ignored_keys[] = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "attention_dropout", "ep_size", "pretraining_tp", "aux_loss_alpha", "seq_aux",
    "pad_token_id", "quantization_config", "head_dim", "qk_head_dim", "_name_or_path",
    "name_or_path", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "is_encoder_decoder", "tie_encoder_decoder", "id2label", "label2id", "num_labels",
    "problem_type", "chunk_size_feed_forward", "sep_token_id", "decoder_start_token_id",
    "mlp_bias", "partial_rotary_factor", "generation_config", "layer_types", NULL,
};

static int in_list(const char *const *list, const char *key) {
    for (int i = 0; list[i]; i++) {
        if (strcmp(list[i], key) == 0) return 1;
    }
    return 0;
}

int nm_model_config_key_known(const char *key, const char **closest) {
    *closest = NULL;
    if (in_list(read_keys, key) || in_list(ignored_keys, key)) return 1;
    int best_d = 4;
    for (int i = 0; read_keys[i]; i++) {
        int d = nm_edit_distance(key, read_keys[i]);
        if (d < best_d) {
            best_d = d;
            *closest = read_keys[i];
        }
    }
    return 0;
}

// --- typed getters ---------------------------------------------------------------------------
// Each returns 0 and leaves *out at its default when the key is absent (or null where null
// means "use the default"); -1 with a message naming file, key and value on a wrong type.

static void describe(const cJSON *it, char *buf, size_t n) {
    char *s = cJSON_PrintUnformatted(it);
    snprintf(buf, n, "%s", s ? s : "?");
    if (s) cJSON_free(s);
    if (strlen(buf) > 60) strcpy(buf + 57, "...");
}

// pre: the enclosing dict's key ("rope_scaling") for nested keys, or NULL at the top level.
static int type_error(const char *path, const char *pre, const char *key, const cJSON *it, const char *want,
                      nm_error *err) {
    char v[80];
    describe(it, v, sizeof(v));
    return nm_error_set(err, "%s: key '%s%s%s' = %s: expected %s", path, pre ? pre : "", pre ? "." : "", key, v, want);
}

static int get_i64(const cJSON *obj, const char *pre, const char *key, const char *path, int64_t *out, nm_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || fabs(it->valuedouble) > 9.0e15) {
        return type_error(path, pre, key, it, "an integer", err);
    }
    *out = (int64_t)it->valuedouble;
    return 0;
}

static int get_f64(const cJSON *obj, const char *pre, const char *key, const char *path, double *out, nm_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsNumber(it)) return type_error(path, pre, key, it, "a number", err);
    *out = it->valuedouble;
    return 0;
}

static int get_bool(const cJSON *obj, const char *pre, const char *key, const char *path, int *out, nm_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsBool(it)) return type_error(path, pre, key, it, "true or false", err);
    *out = cJSON_IsTrue(it) ? 1 : 0;
    return 0;
}

// *out stays NULL when absent; the pointer borrows from the cJSON tree.
static int get_str(const cJSON *obj, const char *pre, const char *key, const char *path, const char **out,
                   nm_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsString(it)) return type_error(path, pre, key, it, "a string", err);
    *out = it->valuestring;
    return 0;
}

// bos/eos may be null (-1), an integer, or a list of integers (the first is used).
static int get_token_id(const cJSON *obj, const char *pre, const char *key, const char *path, int64_t *out,
                        nm_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it) return 0;
    if (cJSON_IsNull(it)) { *out = -1; return 0; }
    if (cJSON_IsArray(it)) {
        it = cJSON_GetArrayItem(it, 0);
        if (!it) { *out = -1; return 0; }
    }
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || it->valuedouble < 0 ||
        it->valuedouble > 9.0e15) {
        return type_error(path, pre, key, it, "a non-negative integer, a list of them, or null", err);
    }
    *out = (int64_t)it->valuedouble;
    return 0;
}

// --- YaRN helpers ----------------------------------------------------------------------------

// m(s, c) of dsv3-spec 4.3 (HF `get_mscale` / `yarn_get_mscale`).
static double yarn_m(double s, double c) { return s <= 1.0 ? 1.0 : 0.1 * c * log(s) + 1.0; }

// rope_scaling / rope_parameters. `rs` is the dict (may be NULL or null). `what` names the
// key in messages. Fills the yarn fields and rope_attn_factor; softmax scale is done later.
static int parse_rope_dict(nm_model_config *cfg, const cJSON *rs, const char *what, const char *path,
                           nm_error *err) {
    if (!rs || cJSON_IsNull(rs)) return 0;
    if (!cJSON_IsObject(rs)) return type_error(path, NULL, what, rs, "an object or null", err);
    const char *type = NULL, *rope_type = NULL;
    if (get_str(rs, what, "type", path, &type, err)) return -1;
    if (get_str(rs, what, "rope_type", path, &rope_type, err)) return -1;
    if (!rope_type) rope_type = type;
    // rope_parameters (transformers 5) also carries rope_theta.
    const cJSON *theta = cJSON_GetObjectItemCaseSensitive(rs, "rope_theta");
    if (theta && !cJSON_IsNull(theta)) {
        if (!cJSON_IsNumber(theta)) return type_error(path, what, "rope_theta", theta, "a number", err);
        cfg->rope_theta = theta->valuedouble;
    }
    if (!rope_type || strcmp(rope_type, "default") == 0) {
        if (!rope_type && !theta) {
            return nm_error_set(err, "%s: key '%s' has no 'type'/'rope_type' (only \"yarn\" is implemented)",
                                path, what);
        }
        return 0;
    }
    if (strcmp(rope_type, "yarn") != 0) {
        return nm_error_set(err,
                            "%s: key '%s.rope_type' = \"%s\": not implemented (only \"yarn\" or no scaling)",
                            path, what, rope_type);
    }
    static const char *const yarn_keys[] = {"type", "rope_type", "rope_theta", "factor",
                                            "original_max_position_embeddings", "beta_fast", "beta_slow",
                                            "mscale", "mscale_all_dim", "attention_factor", "truncate",
                                            "partial_rotary_factor", NULL};
    for (const cJSON *c = rs->child; c; c = c->next) {
        if (!in_list(yarn_keys, c->string)) fprintf(stderr, "%s: unknown key '%s.%s' ignored\n", path, what, c->string);
    }
    cfg->yarn = 1;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(rs, "factor");
    if (!f) return nm_error_set(err, "%s: key '%s.factor' is missing (yarn needs it)", path, what);
    if (!cJSON_IsNumber(f)) return type_error(path, what, "factor", f, "a number", err);
    cfg->yarn_factor = f->valuedouble;
    if (!(cfg->yarn_factor > 0)) {
        return nm_error_set(err, "%s: key '%s.factor' = %g: must be > 0", path, what, cfg->yarn_factor);
    }
    int has_orig = cJSON_GetObjectItemCaseSensitive(rs, "original_max_position_embeddings") != NULL;
    cfg->yarn_orig_max_pos = 0;
    if (get_i64(rs, what, "original_max_position_embeddings", path, &cfg->yarn_orig_max_pos, err)) return -1;
    // HF: `rope_scaling.get("beta_fast") or 32`, so 0 / null also mean the default.
    double bf = 0, bs = 0, ms = 0, msa = 0, af = 0;
    if (get_f64(rs, what, "beta_fast", path, &bf, err) || get_f64(rs, what, "beta_slow", path, &bs, err) ||
        get_f64(rs, what, "mscale", path, &ms, err) || get_f64(rs, what, "mscale_all_dim", path, &msa, err) ||
        get_f64(rs, what, "attention_factor", path, &af, err)) {
        return -1;
    }
    int truncate = 1;
    if (get_bool(rs, what, "truncate", path, &truncate, err)) return -1;
    if (!truncate) {
        return nm_error_set(err, "%s: key '%s.truncate' = false: not implemented (HF default true)", path, what);
    }
    cfg->yarn_beta_fast = bf != 0 ? bf : 32.0;
    cfg->yarn_beta_slow = bs != 0 ? bs : 1.0;
    cfg->yarn_mscale = ms != 0 ? ms : 1.0;
    cfg->yarn_mscale_all_dim = msa;
    if (!(cfg->yarn_beta_fast > cfg->yarn_beta_slow) || !(cfg->yarn_beta_slow > 0)) {
        return nm_error_set(err, "%s: keys '%s.beta_fast' = %g, 'beta_slow' = %g: need beta_fast > beta_slow > 0",
                            path, what, cfg->yarn_beta_fast, cfg->yarn_beta_slow);
    }
    // cos/sin multiplier, HF `_compute_yarn_parameters`: an explicit attention_factor wins;
    // else the mscale ratio when both keys are set (non-zero); else vanilla YaRN m(s, 1)
    // (dsv3-spec 9.6: a config without the mscale keys really does scale cos/sin).
    if (af != 0) cfg->rope_attn_factor = af;
    else if (ms != 0 && msa != 0) cfg->rope_attn_factor = yarn_m(cfg->yarn_factor, ms) / yarn_m(cfg->yarn_factor, msa);
    else cfg->rope_attn_factor = yarn_m(cfg->yarn_factor, 1.0);
    if (!has_orig) cfg->yarn_orig_max_pos = -1;  // resolved to max_pos after the top level is read
    return 0;
}

// --- parse -----------------------------------------------------------------------------------

#define NM_CONFIG_MAX_DIM ((int64_t)1 << 31)   // any size key
#define NM_CONFIG_MAX_LAYERS ((int64_t)1 << 16) // num_hidden_layers, num_nextn_predict_layers

static void set_defaults(nm_model_config *c) {
    // transformers DeepseekV3Config defaults (the 671B model) plus remote-code defaults.
    c->V = 129280; c->D = 7168; c->F = 18432; c->Fe = 2048; c->L = 61; c->M = 1;
    c->H = 128; c->H_kv = -1; c->Rq = 1536; c->Rkv = 512; c->Dn = 128; c->Dr = 64; c->Dv = 128;
    c->E = 256; c->n_shared = 1; c->K = 8; c->G = 8; c->Gk = 4; c->first_k_dense = 3;
    c->moe_layer_freq = 1; c->routed_scaling = 2.5; c->norm_topk_prob = 1;
    c->scoring = NM_SCORING_SIGMOID; c->topk_method = NM_TOPK_NOAUX_TC;
    c->rms_eps = 1e-6; c->rope_theta = 10000.0; c->max_pos = 4096; c->tie_embeddings = 0;
    c->init_std = 0.02; c->bos_id = 0; c->eos_id = 1;
    c->yarn = 0; c->yarn_factor = 1.0; c->yarn_orig_max_pos = 0; c->yarn_beta_fast = 32.0;
    c->yarn_beta_slow = 1.0; c->yarn_mscale = 1.0; c->yarn_mscale_all_dim = 0.0;
    c->rope_attn_factor = 1.0;
}

static int parse_all(nm_model_config *c, const cJSON *root, const char *path, nm_error *err) {
    for (const cJSON *it = root->child; it; it = it->next) {
        if (!in_list(read_keys, it->string) && !in_list(ignored_keys, it->string)) {
            fprintf(stderr, "%s: unknown key '%s' ignored\n", path, it->string);
        }
    }
    struct { const char *key; int64_t *dst; } ints[] = {
        {"vocab_size", &c->V}, {"hidden_size", &c->D}, {"intermediate_size", &c->F},
        {"moe_intermediate_size", &c->Fe}, {"num_hidden_layers", &c->L},
        {"num_nextn_predict_layers", &c->M}, {"num_attention_heads", &c->H},
        {"num_key_value_heads", &c->H_kv}, {"kv_lora_rank", &c->Rkv}, {"qk_nope_head_dim", &c->Dn},
        {"qk_rope_head_dim", &c->Dr}, {"v_head_dim", &c->Dv}, {"num_local_experts", &c->E},
        {"n_routed_experts", &c->E}, {"n_shared_experts", &c->n_shared},
        {"num_experts_per_tok", &c->K}, {"n_group", &c->G}, {"topk_group", &c->Gk},
        {"first_k_dense_replace", &c->first_k_dense}, {"moe_layer_freq", &c->moe_layer_freq},
        {"max_position_embeddings", &c->max_pos},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        if (get_i64(root, NULL, ints[i].key, path, ints[i].dst, err)) return -1;
    }
    // q_lora_rank: null or 0 mean "no q LoRA" (plain q_proj).
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "q_lora_rank");
    if (q && cJSON_IsNull(q)) c->Rq = 0;
    else if (get_i64(root, NULL, "q_lora_rank", path, &c->Rq, err)) return -1;

    struct { const char *key; double *dst; } nums[] = {
        {"routed_scaling_factor", &c->routed_scaling}, {"rms_norm_eps", &c->rms_eps},
        {"rope_theta", &c->rope_theta}, {"initializer_range", &c->init_std},
    };
    for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++) {
        if (get_f64(root, NULL, nums[i].key, path, nums[i].dst, err)) return -1;
    }
    if (get_bool(root, NULL, "norm_topk_prob", path, &c->norm_topk_prob, err)) return -1;
    if (get_bool(root, NULL, "tie_word_embeddings", path, &c->tie_embeddings, err)) return -1;
    if (get_token_id(root, NULL, "bos_token_id", path, &c->bos_id, err)) return -1;
    if (get_token_id(root, NULL, "eos_token_id", path, &c->eos_id, err)) return -1;

    int attention_bias = 0, rope_interleave = 1;
    if (get_bool(root, NULL, "attention_bias", path, &attention_bias, err)) return -1;
    if (attention_bias) {
        return nm_error_set(err, "%s: key 'attention_bias' = true: not implemented (llama.cpp has no slots for "
                                 "those biases either; use false)", path);
    }
    if (get_bool(root, NULL, "rope_interleave", path, &rope_interleave, err)) return -1;
    if (!rope_interleave) {
        return nm_error_set(err, "%s: key 'rope_interleave' = false: not implemented (DeepSeek-V3 checkpoints "
                                 "use adjacent-pair RoPE, dsv3-spec 4.2)", path);
    }
    const char *act = NULL, *scoring = NULL, *topk = NULL;
    if (get_str(root, NULL, "hidden_act", path, &act, err)) return -1;
    if (act && strcmp(act, "silu") != 0) {
        return nm_error_set(err, "%s: key 'hidden_act' = \"%s\": only \"silu\" (SwiGLU) is implemented", path, act);
    }
    if (get_str(root, NULL, "scoring_func", path, &scoring, err)) return -1;
    if (scoring) {
        if (strcmp(scoring, "sigmoid") == 0) c->scoring = NM_SCORING_SIGMOID;
        else if (strcmp(scoring, "softmax") == 0) c->scoring = NM_SCORING_SOFTMAX;
        else
            return nm_error_set(err, "%s: key 'scoring_func' = \"%s\": expected \"sigmoid\" or \"softmax\"", path,
                                scoring);
    }
    if (get_str(root, NULL, "topk_method", path, &topk, err)) return -1;
    if (topk) {
        if (strcmp(topk, "noaux_tc") == 0) c->topk_method = NM_TOPK_NOAUX_TC;
        else if (strcmp(topk, "greedy") == 0) c->topk_method = NM_TOPK_GREEDY;
        else if (strcmp(topk, "group_limited_greedy") == 0) c->topk_method = NM_TOPK_GROUP_LIMITED_GREEDY;
        else {
            return nm_error_set(err, "%s: key 'topk_method' = \"%s\": expected \"noaux_tc\", \"greedy\" or "
                                     "\"group_limited_greedy\"", path, topk);
        }
    }
    // transformers 5 folds rope_theta + rope_scaling into rope_parameters; it wins when both exist.
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    if (rp && !cJSON_IsNull(rp)) {
        if (parse_rope_dict(c, rp, "rope_parameters", path, err)) return -1;
    } else {
        if (parse_rope_dict(c, cJSON_GetObjectItemCaseSensitive(root, "rope_scaling"), "rope_scaling", path, err))
            return -1;
    }
    return 0;
}

// --- validate and derive -------------------------------------------------------------------

static int validate(nm_model_config *c, const char *path, nm_error *err) {
    if (c->H_kv < 0) c->H_kv = c->H;  // HF: num_key_value_heads defaults to num_attention_heads
    struct { const char *key; int64_t v; int64_t min; } mins[] = {
        {"vocab_size", c->V, 1}, {"hidden_size", c->D, 1}, {"num_hidden_layers", c->L, 1},
        {"num_attention_heads", c->H, 1}, {"kv_lora_rank", c->Rkv, 1}, {"qk_nope_head_dim", c->Dn, 1},
        {"qk_rope_head_dim", c->Dr, 2}, {"v_head_dim", c->Dv, 1}, {"num_nextn_predict_layers", c->M, 0},
        {"q_lora_rank", c->Rq, 0}, {"n_routed_experts", c->E, 0}, {"n_shared_experts", c->n_shared, 0},
        {"first_k_dense_replace", c->first_k_dense, 0}, {"moe_layer_freq", c->moe_layer_freq, 1},
        {"max_position_embeddings", c->max_pos, 1},
    };
    for (size_t i = 0; i < sizeof(mins) / sizeof(mins[0]); i++) {
        if (mins[i].v < mins[i].min) {
            return nm_error_set(err, "%s: key '%s' = %lld: must be >= %lld", path, mins[i].key,
                                (long long)mins[i].v, (long long)mins[i].min);
        }
    }
    // Upper bounds, so no product of two sizes overflows int64 and the per-layer loops below
    // (and in the model) stay short whatever the file says; found by tests/fuzz/fuzz_model_config.
    // Far above any real model (DeepSeek-V3: V 129280, F 18432, 61 + 1 layers).
    struct { const char *key; int64_t v; int64_t max; } maxs[] = {
        {"vocab_size", c->V, NM_CONFIG_MAX_DIM}, {"hidden_size", c->D, NM_CONFIG_MAX_DIM},
        {"intermediate_size", c->F, NM_CONFIG_MAX_DIM}, {"moe_intermediate_size", c->Fe, NM_CONFIG_MAX_DIM},
        {"num_hidden_layers", c->L, NM_CONFIG_MAX_LAYERS}, {"num_nextn_predict_layers", c->M, NM_CONFIG_MAX_LAYERS},
        {"num_attention_heads", c->H, NM_CONFIG_MAX_DIM}, {"q_lora_rank", c->Rq, NM_CONFIG_MAX_DIM},
        {"kv_lora_rank", c->Rkv, NM_CONFIG_MAX_DIM}, {"qk_nope_head_dim", c->Dn, NM_CONFIG_MAX_DIM},
        {"qk_rope_head_dim", c->Dr, NM_CONFIG_MAX_DIM}, {"v_head_dim", c->Dv, NM_CONFIG_MAX_DIM},
        {"n_routed_experts", c->E, NM_CONFIG_MAX_DIM}, {"n_shared_experts", c->n_shared, NM_CONFIG_MAX_DIM},
        {"max_position_embeddings", c->max_pos, NM_CONFIG_MAX_DIM},
    };
    for (size_t i = 0; i < sizeof(maxs) / sizeof(maxs[0]); i++) {
        if (maxs[i].v > maxs[i].max) {
            return nm_error_set(err, "%s: key '%s' = %lld: must be <= %lld", path, maxs[i].key,
                                (long long)maxs[i].v, (long long)maxs[i].max);
        }
    }
    if (c->H_kv != c->H) {
        return nm_error_set(err, "%s: key 'num_key_value_heads' = %lld: must equal num_attention_heads = %lld "
                                 "(MLA has no grouped KV heads; HF and llama.cpp assume equality)",
                            path, (long long)c->H_kv, (long long)c->H);
    }
    if (c->Dr % 2 != 0) {
        return nm_error_set(err, "%s: key 'qk_rope_head_dim' = %lld: must be even (RoPE rotates channel pairs)",
                            path, (long long)c->Dr);
    }
    int any_dense = 0, any_moe = 0;
    for (int64_t l = 0; l < c->L + c->M; l++) {
        if (nm_layer_is_moe(c, l)) any_moe = 1;
        else any_dense = 1;
    }
    if (any_dense && c->F < 1) {
        return nm_error_set(err, "%s: key 'intermediate_size' = %lld: must be >= 1 (there are dense layers)",
                            path, (long long)c->F);
    }
    if (any_moe) {
        if (c->Fe < 1) {
            return nm_error_set(err, "%s: key 'moe_intermediate_size' = %lld: must be >= 1", path, (long long)c->Fe);
        }
        if (c->K < 1 || c->K > c->E) {
            return nm_error_set(err, "%s: key 'num_experts_per_tok' = %lld: must be in [1, n_routed_experts = %lld]",
                                path, (long long)c->K, (long long)c->E);
        }
        if (c->G < 1 || c->E % c->G != 0) {
            return nm_error_set(err, "%s: key 'n_group' = %lld: must be >= 1 and divide n_routed_experts = %lld",
                                path, (long long)c->G, (long long)c->E);
        }
        if (c->Gk < 1 || c->Gk > c->G) {
            return nm_error_set(err, "%s: key 'topk_group' = %lld: must be in [1, n_group = %lld]", path,
                                (long long)c->Gk, (long long)c->G);
        }
        if (c->topk_method != NM_TOPK_GREEDY && c->Gk * (c->E / c->G) < c->K) {
            return nm_error_set(err, "%s: key 'topk_group' = %lld: the %lld kept groups of %lld experts hold fewer "
                                     "than num_experts_per_tok = %lld experts",
                                path, (long long)c->Gk, (long long)c->Gk, (long long)(c->E / c->G), (long long)c->K);
        }
        if (c->topk_method == NM_TOPK_NOAUX_TC && c->E / c->G < 2) {
            return nm_error_set(err, "%s: key 'n_group' = %lld: noaux_tc scores a group by the sum of its top-2 "
                                     "experts, so every group needs >= 2 experts (n_routed_experts = %lld)",
                                path, (long long)c->G, (long long)c->E);
        }
        if (!(c->routed_scaling > 0)) {
            return nm_error_set(err, "%s: key 'routed_scaling_factor' = %g: must be > 0", path, c->routed_scaling);
        }
    }
    if (!(c->rms_eps > 0)) return nm_error_set(err, "%s: key 'rms_norm_eps' = %g: must be > 0", path, c->rms_eps);
    if (!(c->rope_theta > 1)) return nm_error_set(err, "%s: key 'rope_theta' = %g: must be > 1", path, c->rope_theta);
    if (!(c->init_std >= 0)) {
        return nm_error_set(err, "%s: key 'initializer_range' = %g: must be >= 0", path, c->init_std);
    }
    if (c->bos_id >= c->V || c->eos_id >= c->V) {
        return nm_error_set(err, "%s: key '%s' = %lld: must be < vocab_size = %lld", path,
                            c->bos_id >= c->V ? "bos_token_id" : "eos_token_id",
                            (long long)(c->bos_id >= c->V ? c->bos_id : c->eos_id), (long long)c->V);
    }
    if (c->yarn) {
        if (c->yarn_orig_max_pos == -1) {
            c->yarn_orig_max_pos = c->max_pos;  // HF: falls back to max_position_embeddings
        } else {
            if (c->yarn_orig_max_pos < 1) {
                return nm_error_set(err, "%s: key 'rope_scaling.original_max_position_embeddings' = %lld: must be >= 1",
                                    path, (long long)c->yarn_orig_max_pos);
            }
            double want = c->yarn_factor * (double)c->yarn_orig_max_pos;
            if (fabs(want - (double)c->max_pos) > 1e-9 * want + 0.5) {
                return nm_error_set(err, "%s: key 'max_position_embeddings' = %lld: must equal rope_scaling factor %g "
                                         "x original_max_position_embeddings %lld = %.0f (HF uses the ratio for the "
                                         "frequencies and factor for the softmax scale; dsv3-spec 9.5)",
                                    path, (long long)c->max_pos, c->yarn_factor, (long long)c->yarn_orig_max_pos, want);
            }
        }
    }
    return 0;
}

static void derive(nm_model_config *c) {
    c->Dqk = c->Dn + c->Dr;
    c->Fs = c->n_shared * c->Fe;
    c->n_layers = c->L + c->M;
    c->softmax_scale = 1.0 / sqrt((double)c->Dqk);
    // HF DeepseekV3Attention: scaling *= m(factor, mscale_all_dim)^2 only when mscale_all_dim is set.
    if (c->yarn && c->yarn_mscale_all_dim != 0) {
        double m = yarn_m(c->yarn_factor, c->yarn_mscale_all_dim);
        c->softmax_scale *= m * m;
    }
    if (!c->yarn) c->rope_attn_factor = 1.0;
}

int nm_model_config_parse(nm_model_config *cfg, const char *json_text, const char *path, nm_error *err) {
    memset(cfg, 0, sizeof(*cfg));
    if (!path) path = "<config>";
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json_text, &end, 1);
    if (!root) {
        int line = 1, col = 1;
        for (const char *p = json_text; end && p < end && *p; p++) {
            if (*p == '\n') { line++; col = 1; } else col++;
        }
        return nm_error_set(err, "%s: malformed JSON near line %d column %d", path, line, col);
    }
    int rc = 0;
    if (!cJSON_IsObject(root)) {
        rc = nm_error_set(err, "%s: expected a JSON object at the top level", path);
    } else {
        set_defaults(cfg);
        rc = parse_all(cfg, root, path, err);
        if (rc == 0) rc = validate(cfg, path, err);
    }
    cJSON_Delete(root);
    if (rc != 0) {
        memset(cfg, 0, sizeof(*cfg));
        return -1;
    }
    derive(cfg);
    cfg->json_text = nm_strdup(json_text);
    cfg->source_path = nm_strdup(path);
    return 0;
}

int nm_model_config_load(nm_model_config *cfg, const char *path, nm_error *err) {
    memset(cfg, 0, sizeof(*cfg));
    char *text = NULL;
    if (nm_file_read_json(path, &text, NULL, err)) return -1;
    int rc = nm_model_config_parse(cfg, text, path, err);
    nm_free(text);
    return rc;
}

void nm_model_config_free(nm_model_config *cfg) {
    if (!cfg) return;
    nm_free(cfg->json_text);
    nm_free(cfg->source_path);
    cfg->json_text = NULL;
    cfg->source_path = NULL;
}

int nm_layer_is_moe(const nm_model_config *cfg, int64_t layer) {
    return cfg->E > 0 && layer >= cfg->first_k_dense && layer % cfg->moe_layer_freq == 0;
}

// dsv3-spec 4.1 / 4.3, HF `_compute_default_rope_parameters` and `_compute_yarn_parameters`
// (truncate = true). Computed in double; callers cast to fp32 as HF does.
void nm_rope_inv_freq(const nm_model_config *cfg, double *inv_freq /* (Dr/2) */) {
    const int64_t d = cfg->Dr, half = d / 2;
    const double base = cfg->rope_theta;
    for (int64_t i = 0; i < half; i++) inv_freq[i] = 1.0 / pow(base, (double)(2 * i) / (double)d);
    if (!cfg->yarn) return;
    const double s = cfg->yarn_factor, L0 = (double)cfg->yarn_orig_max_pos;
    const double two_pi = 6.283185307179586;
    double low = floor(d * log(L0 / (cfg->yarn_beta_fast * two_pi)) / (2.0 * log(base)));
    double high = ceil(d * log(L0 / (cfg->yarn_beta_slow * two_pi)) / (2.0 * log(base)));
    if (low < 0) low = 0;
    if (high > (double)(d - 1)) high = (double)(d - 1);
    if (low == high) high += 0.001;  // avoid a zero-width ramp (HF linear_ramp_factor)
    for (int64_t i = 0; i < half; i++) {
        double ramp = ((double)i - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        // ramp 0: keep the original (extrapolated) frequency; ramp 1: interpolate by 1/s.
        inv_freq[i] = inv_freq[i] * (1.0 - ramp) + (inv_freq[i] / s) * ramp;
    }
}
