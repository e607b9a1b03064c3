// test_config.c: config.json loading: defaults, every rejection rule (message must name the
// key), malformed JSON, unknown keys, q_lora null, softmax scoring, transformers-5
// rope_parameters, and the YaRN numbers of dsv3-spec 8 / 4.3.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/config.h"

#include "test_util.h"

// dsv3-spec 8 "dsv3-tiny" body (without braces); overrides are put in FRONT of it because the
// loader reads the first occurrence of a key.
static const char *tiny_body =
    "\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\", \"vocab_size\": 129280,"
    "\"hidden_size\": 256, \"intermediate_size\": 640, \"moe_intermediate_size\": 128, \"num_hidden_layers\": 4,"
    "\"num_nextn_predict_layers\": 1, \"num_attention_heads\": 4, \"num_key_value_heads\": 4, \"q_lora_rank\": 128,"
    "\"kv_lora_rank\": 64, \"qk_nope_head_dim\": 32, \"qk_rope_head_dim\": 16, \"v_head_dim\": 32,"
    "\"n_routed_experts\": 16, \"n_shared_experts\": 1, \"num_experts_per_tok\": 4, \"n_group\": 4, \"topk_group\": 2,"
    "\"routed_scaling_factor\": 2.5, \"norm_topk_prob\": true, \"scoring_func\": \"sigmoid\", \"topk_method\": \"noaux_tc\","
    "\"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, \"hidden_act\": \"silu\", \"rms_norm_eps\": 1e-06,"
    "\"rope_theta\": 10000.0, \"rope_scaling\": null, \"max_position_embeddings\": 4096, \"tie_word_embeddings\": false,"
    "\"attention_bias\": false, \"attention_dropout\": 0.0, \"initializer_range\": 0.006, \"bos_token_id\": 0,"
    "\"eos_token_id\": 1, \"use_cache\": true, \"torch_dtype\": \"bfloat16\"";

static char json[8192];

static const char *with(const char *overrides) {
    snprintf(json, sizeof(json), "{%s%s%s}", overrides, *overrides ? "," : "", tiny_body);
    return json;
}

static int parse(nm_model_config *c, const char *text, nm_error *err) {
    return nm_model_config_parse(c, text, "test.json", err);
}

// The override must be rejected and the message must contain `needle` (the key).
static void expect_reject(const char *overrides, const char *needle) {
    nm_model_config c;
    nm_error err = {{0}};
    int rc = parse(&c, with(overrides), &err);
    EXPECT(rc != 0, "accepted %s", overrides);
    if (rc == 0) { nm_model_config_free(&c); return; }
    EXPECT(strstr(err.msg, needle) != NULL, "message for %s lacks '%s': %s", overrides, needle, err.msg);
    EXPECT(strstr(err.msg, "test.json") != NULL, "message for %s lacks the file: %s", overrides, err.msg);
}

static void test_defaults(void) {
    nm_model_config c;
    nm_error err;
    EXPECT(parse(&c, "{}", &err) == 0, "%s", err.msg);
    EXPECT(c.V == 129280 && c.D == 7168 && c.F == 18432 && c.Fe == 2048 && c.L == 61 && c.M == 1, "sizes");
    EXPECT(c.H == 128 && c.H_kv == 128 && c.Rq == 1536 && c.Rkv == 512 && c.Dn == 128 && c.Dr == 64 && c.Dv == 128, "attn");
    EXPECT(c.E == 256 && c.n_shared == 1 && c.K == 8 && c.G == 8 && c.Gk == 4 && c.first_k_dense == 3, "moe");
    EXPECT(c.moe_layer_freq == 1 && c.routed_scaling == 2.5 && c.norm_topk_prob == 1, "moe2");
    EXPECT(c.scoring == NM_SCORING_SIGMOID && c.topk_method == NM_TOPK_NOAUX_TC, "routing");
    EXPECT(c.max_pos == 4096 && c.init_std == 0.02 && c.rms_eps == 1e-6 && c.rope_theta == 10000, "misc");
    EXPECT(!c.tie_embeddings && c.bos_id == 0 && c.eos_id == 1 && !c.yarn, "flags");
    EXPECT(c.Dqk == 192 && c.Fs == 2048 && c.n_layers == 62, "derived");
    EXPECT(fabs(c.softmax_scale - 1.0 / sqrt(192.0)) < 1e-15 && c.rope_attn_factor == 1.0, "scale %g", c.softmax_scale);
    EXPECT(c.json_text && strcmp(c.json_text, "{}") == 0, "json_text");
    nm_model_config_free(&c);
}

static void test_tiny(void) {
    nm_model_config c;
    nm_error err;
    EXPECT(parse(&c, with(""), &err) == 0, "%s", err.msg);
    EXPECT(c.D == 256 && c.Rq == 128 && c.E == 16 && c.K == 4 && c.n_layers == 5 && c.Dqk == 48, "tiny");
    // dsv3-spec 8: qk_head_dim 48 => softmax scale 0.144338 (6 digits given there)
    EXPECT(fabs(c.softmax_scale - 0.144338) < 5e-7, "scale %.7f", c.softmax_scale);
    EXPECT(!nm_layer_is_moe(&c, 0) && nm_layer_is_moe(&c, 1) && nm_layer_is_moe(&c, 3) && nm_layer_is_moe(&c, 4),
           "layer kinds");
    EXPECT(nm_layer_is_mtp(&c, 4) && !nm_layer_is_mtp(&c, 3), "mtp");
    // plain RoPE frequencies of the spec: [1, 0.316228, 0.1, ..., 0.000316228]
    double f[8];
    nm_rope_inv_freq(&c, f);
    for (int i = 0; i < 8; i++) {
        double want = pow(10000.0, -2.0 * i / 16.0);
        EXPECT(fabs(f[i] - want) < 1e-15 * want + 1e-18, "inv_freq[%d] %g vs %g", i, f[i], want);
    }
    nm_model_config_free(&c);

    EXPECT(parse(&c, with("\"q_lora_rank\": null"), &err) == 0 && c.Rq == 0, "q_lora null: %s", err.msg);
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"q_lora_rank\": 0"), &err) == 0 && c.Rq == 0, "q_lora 0");
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"scoring_func\": \"softmax\", \"topk_method\": \"greedy\""), &err) == 0 &&
               c.scoring == NM_SCORING_SOFTMAX && c.topk_method == NM_TOPK_GREEDY, "softmax: %s", err.msg);
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"topk_method\": \"group_limited_greedy\""), &err) == 0 &&
               c.topk_method == NM_TOPK_GROUP_LIMITED_GREEDY, "glg");
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"num_local_experts\": 32, \"n_routed_experts\": null"), &err) == 0 && c.E == 32,
           "num_local_experts alias: %s E=%lld", err.msg, (long long)c.E);
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"moe_layer_freq\": 2"), &err) == 0, "freq 2");
    EXPECT(!nm_layer_is_moe(&c, 1) && nm_layer_is_moe(&c, 2) && !nm_layer_is_moe(&c, 3) && nm_layer_is_moe(&c, 4),
           "freq 2 kinds");
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"eos_token_id\": [1, 2], \"bos_token_id\": null"), &err) == 0 && c.eos_id == 1 &&
               c.bos_id == -1, "token ids");
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"n_routed_experts\": 0"), &err) == 0 && !nm_layer_is_moe(&c, 2), "dense-only model");
    nm_model_config_free(&c);
}

static void test_rejections(void) {
    expect_reject("\"hidden_size\": 0", "hidden_size");
    expect_reject("\"vocab_size\": -5", "vocab_size");
    expect_reject("\"num_hidden_layers\": 0", "num_hidden_layers");
    expect_reject("\"num_attention_heads\": 0", "num_attention_heads");
    expect_reject("\"kv_lora_rank\": 0", "kv_lora_rank");
    expect_reject("\"v_head_dim\": -1", "v_head_dim");
    expect_reject("\"intermediate_size\": 0", "intermediate_size");
    expect_reject("\"moe_intermediate_size\": 0", "moe_intermediate_size");
    expect_reject("\"moe_layer_freq\": 0", "moe_layer_freq");
    expect_reject("\"num_nextn_predict_layers\": -1", "num_nextn_predict_layers");
    expect_reject("\"num_key_value_heads\": 2", "num_key_value_heads");
    expect_reject("\"qk_rope_head_dim\": 15", "qk_rope_head_dim");
    expect_reject("\"num_experts_per_tok\": 17", "num_experts_per_tok");
    expect_reject("\"num_experts_per_tok\": 0", "num_experts_per_tok");
    expect_reject("\"n_group\": 3", "n_group");
    expect_reject("\"topk_group\": 5", "topk_group");
    expect_reject("\"topk_group\": 0", "topk_group");
    expect_reject("\"topk_group\": 1, \"num_experts_per_tok\": 5", "topk_group");      // 1 group of 4 < 5
    expect_reject("\"n_group\": 16, \"topk_group\": 8", "n_group");                      // noaux_tc, 1 expert/group
    // Found by tests/fuzz/fuzz_model_config: an int64 conversion out of range (UB), an int64
    // product overflow (UB) and a per-layer validation loop of 9e15 iterations.
    expect_reject("\"eos_token_id\": 1e300", "eos_token_id");
    expect_reject("\"n_shared_experts\": 9e15, \"moe_intermediate_size\": 9e15", "must be <=");
    expect_reject("\"num_hidden_layers\": 9e15", "num_hidden_layers");
    expect_reject("\"vocab_size\": 4294967296", "vocab_size");
    expect_reject("\"attention_bias\": true", "attention_bias");
    expect_reject("\"attention_bias\": true", "not implemented");
    expect_reject("\"scoring_func\": \"relu\"", "scoring_func");
    expect_reject("\"topk_method\": \"sinkhorn\"", "topk_method");
    expect_reject("\"hidden_act\": \"gelu\"", "hidden_act");
    expect_reject("\"rope_interleave\": false", "rope_interleave");
    expect_reject("\"rms_norm_eps\": 0", "rms_norm_eps");
    expect_reject("\"routed_scaling_factor\": -1", "routed_scaling_factor");
    expect_reject("\"hidden_size\": \"abc\"", "hidden_size");
    expect_reject("\"num_hidden_layers\": 2.5", "num_hidden_layers");
    expect_reject("\"norm_topk_prob\": \"yes\"", "norm_topk_prob");
    expect_reject("\"rope_theta\": \"big\"", "rope_theta");
    expect_reject("\"scoring_func\": 3", "scoring_func");
    expect_reject("\"rope_scaling\": 4", "rope_scaling");
    expect_reject("\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2}", "rope_scaling");
    expect_reject("\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 0}", "factor");
    expect_reject("\"rope_scaling\": {\"type\": \"yarn\", \"factor\": -2}", "factor");
    expect_reject("\"rope_scaling\": {\"type\": \"yarn\"}", "factor");
    expect_reject("\"rope_scaling\": {\"type\": \"yarn\", \"factor\": \"4\"}", "factor");
    // 4 x 1024 != 8192 (dsv3-spec 9.5)
    expect_reject("\"max_position_embeddings\": 8192, \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4, "
                  "\"original_max_position_embeddings\": 1024}", "max_position_embeddings");
}

static void test_malformed(void) {
    nm_model_config c;
    nm_error err;
    EXPECT(parse(&c, "{\"hidden_size\": 256,,}", &err) != 0, "malformed accepted");
    EXPECT(strstr(err.msg, "test.json") && strstr(err.msg, "malformed"), "%s", err.msg);
    EXPECT(parse(&c, "[1, 2]", &err) != 0 && strstr(err.msg, "object"), "array top level: %s", err.msg);
    EXPECT(nm_model_config_load(&c, "no/such/config.json", &err) != 0 && strstr(err.msg, "no/such/config.json"),
           "missing file: %s", err.msg);
}

static void test_unknown_key(void) {
    // Capture stderr to check the one-line report.
    char tmpl[] = "test_config_stderr_XXXXXX";
    int fd = mkstemp(tmpl);
    EXPECT(fd >= 0, "mkstemp");
    if (fd < 0) return;
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    nm_model_config c;
    nm_error err;
    int rc = parse(&c, with("\"frobnicate_level\": 7, \"aux_loss_alpha\": 0.001, \"ep_size\": 1, \"seq_aux\": true"),
                   &err);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char buf[4096] = {0};
    lseek(fd, 0, SEEK_SET);
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    unlink(tmpl);
    EXPECT(rc == 0, "unknown key rejected: %s", err.msg);
    if (rc == 0) nm_model_config_free(&c);
    EXPECT(n > 0 && strstr(buf, "unknown key 'frobnicate_level'") && strstr(buf, "test.json"), "stderr: %s", buf);
    EXPECT(!strstr(buf, "aux_loss_alpha") && !strstr(buf, "ep_size") && !strstr(buf, "seq_aux"),
           "known keys reported: %s", buf);
}

static void test_yarn(void) {
    // dsv3-spec 8 YaRN variant: low = 1, high = 5, inv_freq as listed, cos/sin factor 1,
    // softmax scale 48^-1/2 * (0.1 ln 4 + 1)^2 = 0.187130. The spec prints 6 significant
    // digits, so compare to 5e-6 relative.
    nm_model_config c;
    nm_error err;
    EXPECT(parse(&c, with("\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": "
                          "1024, \"beta_fast\": 32, \"beta_slow\": 1, \"mscale\": 1.0, \"mscale_all_dim\": 1.0}"),
                 &err) == 0,
           "%s", err.msg);
    const double want[8] = {1, 0.316228, 0.08125, 0.0197642, 0.004375, 0.000790569, 0.00025, 7.90569e-05};
    double f[8];
    nm_rope_inv_freq(&c, f);
    for (int i = 0; i < 8; i++) EXPECT(fabs(f[i] - want[i]) <= 5e-6 * want[i], "yarn inv_freq[%d] %g vs %g", i, f[i], want[i]);
    EXPECT(c.yarn && c.yarn_factor == 4.0 && c.yarn_orig_max_pos == 1024, "yarn fields");
    EXPECT(fabs(c.softmax_scale - 0.187130) < 5e-7, "softmax scale %.7f", c.softmax_scale);
    EXPECT(fabs(c.rope_attn_factor - 1.0) < 1e-15, "attn factor %g", c.rope_attn_factor);
    nm_model_config_free(&c);

    // Same through transformers-5 rope_parameters (which also carries rope_theta).
    EXPECT(parse(&c, with("\"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 10000.0, \"factor\": 4.0, "
                          "\"original_max_position_embeddings\": 1024, \"beta_fast\": 32, \"beta_slow\": 1, "
                          "\"mscale\": 1.0, \"mscale_all_dim\": 1.0}, \"rope_theta\": 5"),
                 &err) == 0,
           "%s", err.msg);
    nm_rope_inv_freq(&c, f);
    for (int i = 0; i < 8; i++) EXPECT(fabs(f[i] - want[i]) <= 5e-6 * want[i], "v5 inv_freq[%d] %g", i, f[i]);
    EXPECT(c.rope_theta == 10000.0 && fabs(c.softmax_scale - 0.187130) < 5e-7, "v5 theta %g", c.rope_theta);
    nm_model_config_free(&c);
    EXPECT(parse(&c, with("\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 50000.0}"), &err) == 0 &&
               !c.yarn && c.rope_theta == 50000.0, "v5 default rope: %s", err.msg);
    nm_model_config_free(&c);

    // Missing mscale keys (dsv3-spec 9.6): cos/sin *= 0.1 ln 4 + 1, no softmax mscale.
    EXPECT(parse(&c, with("\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 1024}"),
                 &err) == 0, "%s", err.msg);
    EXPECT(fabs(c.rope_attn_factor - (0.1 * log(4.0) + 1.0)) < 1e-12, "fallback attn factor %g", c.rope_attn_factor);
    EXPECT(fabs(c.softmax_scale - 1.0 / sqrt(48.0)) < 1e-12, "fallback softmax %g", c.softmax_scale);
    nm_model_config_free(&c);
    // V2-Lite style mscale 0.707 on both: ratio 1, softmax m(s, 0.707)^2.
    EXPECT(parse(&c, with("\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 1024,"
                          "\"mscale\": 0.707, \"mscale_all_dim\": 0.707}"), &err) == 0, "%s", err.msg);
    double m = 0.1 * 0.707 * log(4.0) + 1.0;
    EXPECT(fabs(c.rope_attn_factor - 1.0) < 1e-12 && fabs(c.softmax_scale - m * m / sqrt(48.0)) < 1e-12, "0.707");
    nm_model_config_free(&c);
}

static void test_v3_file(void) {
    const char *root = getenv("NM_ROOT");
    char path[4096];
    snprintf(path, sizeof(path), "%s/configs/deepseek-v3.json", root ? root : "..");
    nm_model_config c;
    nm_error err;
    if (nm_model_config_load(&c, path, &err) != 0) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    // dsv3-spec 4.3: V3 softmax scale 0.135234; low = 10, high = 23 on the ramp.
    EXPECT(fabs(c.softmax_scale - 0.135234) < 5e-7, "V3 softmax scale %.7f", c.softmax_scale);
    EXPECT(fabs(c.rope_attn_factor - 1.0) < 1e-15, "V3 attn factor");
    double f[32];
    nm_rope_inv_freq(&c, f);
    for (int i = 0; i < 32; i++) {
        double orig = pow(10000.0, -2.0 * i / 64.0);
        if (i <= 10) EXPECT(fabs(f[i] - orig) < 1e-15, "V3 pair %d should keep its frequency", i);
        if (i >= 23) EXPECT(fabs(f[i] - orig / 40.0) < 1e-18, "V3 pair %d should be interpolated", i);
        if (i > 10 && i < 23) EXPECT(f[i] < orig && f[i] > orig / 40.0, "V3 pair %d should be on the ramp", i);
    }
    EXPECT(c.json_text && strstr(c.json_text, "\"DeepseekV3ForCausalLM\""), "json_text kept");
    EXPECT(c.source_path && strcmp(c.source_path, path) == 0, "source_path");
    nm_model_config_free(&c);
}

int main(void) {
    test_defaults();
    test_tiny();
    test_rejections();
    test_malformed();
    test_unknown_key();
    test_yarn();
    test_v3_file();
    if (failures) {
        fprintf(stderr, "test_config: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_config: ok\n");
    return 0;
}
