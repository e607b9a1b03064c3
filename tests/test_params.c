// test_params.c: the parameter table (names, shapes, order, flags, layout promises, counts)
// against dsv3-spec 2 / 8, the active-parameter and FLOP counters against the table, and the
// initialisation (deterministic, seed-dependent, thread-count independent, right statistics).
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/check.h"
#include "model/config.h"
#include "model/flops.h"
#include "model/params.h"

#include "test_util.h"

// dsv3-spec 8 "dsv3-tiny" (real V3 vocab). %s slots let variants change q_lora / tying.
static const char *tiny_fmt =
    "{\"vocab_size\": 129280, \"hidden_size\": 256, \"intermediate_size\": 640, \"moe_intermediate_size\": 128,"
    "\"num_hidden_layers\": 4, \"num_nextn_predict_layers\": 1, \"num_attention_heads\": 4, \"num_key_value_heads\": 4,"
    "\"q_lora_rank\": %s, \"kv_lora_rank\": 64, \"qk_nope_head_dim\": 32, \"qk_rope_head_dim\": 16, \"v_head_dim\": 32,"
    "\"n_routed_experts\": 16, \"n_shared_experts\": 1, \"num_experts_per_tok\": 4, \"n_group\": 4, \"topk_group\": 2,"
    "\"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, \"rope_scaling\": null, \"max_position_embeddings\": 4096,"
    "\"tie_word_embeddings\": %s, \"initializer_range\": 0.006}";

static int load_tiny(nm_model_config *c, nm_param_table *t, const char *q_lora, const char *tie) {
    char json[2048];
    nm_error err;
    snprintf(json, sizeof(json), tiny_fmt, q_lora, tie);
    if (nm_model_config_parse(c, json, "tiny.json", &err) || nm_param_table_build(t, c, &err)) {
        EXPECT(0, "%s", err.msg);
        return -1;
    }
    return 0;
}

static const nm_tensor_spec *row(const nm_param_table *t, const char *name) {
    int i = nm_param_table_find(t, name);
    EXPECT(i >= 0, "row '%s' missing", name);
    return i >= 0 ? &t->rows[i] : NULL;
}

static void expect_shape(const nm_param_table *t, const char *name, int64_t d0, int64_t d1) {
    const nm_tensor_spec *r = row(t, name);
    if (!r) return;
    int nd = d1 ? 2 : 1;
    EXPECT(r->ndim == nd && r->shape[0] == d0 && (nd == 1 || r->shape[1] == d1), "%s: [%lld, %lld], want [%lld, %lld]",
           name, (long long)r->shape[0], (long long)r->shape[1], (long long)d0, (long long)d1);
    EXPECT(r->numel == d0 * (d1 ? d1 : 1), "%s numel", name);
}

// Offsets aligned, non-overlapping, inside the buffer; tied rows point at their owner.
static void check_layout(const nm_param_table *t) {
    size_t prev_end = 0;
    const nm_tensor_spec *prev = NULL;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) {
            EXPECT(r->owner >= 0 && r->owner < t->n_rows && !(t->rows[r->owner].flags & NM_TENSOR_TIED), "%s owner", r->name);
            if (r->owner >= 0) {
                EXPECT(r->offset == t->rows[r->owner].offset && r->numel == t->rows[r->owner].numel, "%s tied view", r->name);
            }
            continue;
        }
        EXPECT(r->owner == -1, "%s owner set", r->name);
        int is_up = strstr(r->name, "up_proj.weight") != NULL;
        // Only an up_proj may be unaligned (placed right after its gate); D=256 keeps it aligned.
        EXPECT(r->offset % NM_PARAM_ALIGN == 0, "%s offset %zu unaligned", r->name, r->offset);
        if (is_up && prev) {
            EXPECT(strstr(prev->name, "gate_proj.weight") && r->offset == prev->offset + (size_t)prev->numel,
                   "%s not directly after its gate_proj", r->name);
        }
        EXPECT(r->offset >= prev_end, "%s overlaps the previous row", r->name);
        prev_end = r->offset + (size_t)r->numel;
        EXPECT(prev_end <= t->n_floats, "%s beyond n_floats", r->name);
        prev = r;
    }
    EXPECT(t->n_floats % NM_PARAM_ALIGN == 0, "n_floats");
}

static void check_layer_offsets(const nm_model_config *c, const nm_param_table *t) {
    char name[160];
    for (int64_t l = 0; l < c->n_layers; l++) {
        const nm_layer_offsets *o = &t->layers[l];
#define OFF(field, suffix)                                                                          \
    do {                                                                                            \
        snprintf(name, sizeof(name), "model.layers.%lld.%s", (long long)l, suffix);                 \
        int i_ = nm_param_table_find(t, name);                                                      \
        EXPECT(i_ >= 0 ? o->field == t->rows[i_].offset : o->field == NM_OFF_NONE, "%s vs layers[%lld].%s", \
               name, (long long)l, #field);                                                         \
    } while (0)
        OFF(input_norm, "input_layernorm.weight");
        OFF(q_a, "self_attn.q_a_proj.weight");
        OFF(q_a_norm, "self_attn.q_a_layernorm.weight");
        OFF(q_b, "self_attn.q_b_proj.weight");
        OFF(q, "self_attn.q_proj.weight");
        OFF(kv_a, "self_attn.kv_a_proj_with_mqa.weight");
        OFF(kv_a_norm, "self_attn.kv_a_layernorm.weight");
        OFF(kv_b, "self_attn.kv_b_proj.weight");
        OFF(o, "self_attn.o_proj.weight");
        OFF(post_norm, "post_attention_layernorm.weight");
        OFF(mlp_gate_up, "mlp.gate_proj.weight");
        OFF(mlp_down, "mlp.down_proj.weight");
        OFF(router, "mlp.gate.weight");
        OFF(router_bias, "mlp.gate.e_score_correction_bias");
        OFF(experts, "mlp.experts.0.gate_proj.weight");
        OFF(shared_gate_up, "mlp.shared_experts.gate_proj.weight");
        OFF(shared_down, "mlp.shared_experts.down_proj.weight");
        OFF(enorm, "enorm.weight");
        OFF(hnorm, "hnorm.weight");
        OFF(eh_proj, "eh_proj.weight");
        OFF(head_norm, "shared_head.norm.weight");
#undef OFF
        if (nm_layer_is_moe(c, l)) {
            EXPECT(o->expert_stride >= (size_t)(3 * c->Fe * c->D) && o->expert_stride % NM_PARAM_ALIGN == 0, "stride");
            for (int64_t j = 0; j < c->E; j++) {
                static const char *parts[3] = {"gate_proj", "up_proj", "down_proj"};
                for (int p = 0; p < 3; p++) {
                    snprintf(name, sizeof(name), "model.layers.%lld.mlp.experts.%lld.%s.weight", (long long)l,
                             (long long)j, parts[p]);
                    const nm_tensor_spec *r = row(t, name);
                    size_t want = o->experts + (size_t)j * o->expert_stride + (p ? (size_t)(c->Fe * c->D) : 0);
                    if (r && p < 2) EXPECT(r->offset == want, "%s at %zu, want %zu", name, r->offset, want);
                    if (r) EXPECT((r->flags & NM_TENSOR_EXPERT) && (r->flags & NM_TENSOR_DECAY), "%s flags", name);
                }
            }
        }
    }
}

// Independent counts from the table: active = main rows, embedding excluded, routed experts
// scaled by K/E; matmul = 2-D rows incl. MTP, embedding excluded, K/E of routed, head 1+M times.
static void check_counters(const nm_model_config *c, const nm_param_table *t) {
    double active = 0, matmul = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        if (i == 0) continue;  // embedding lookup
        double n = (double)r->numel * ((r->flags & NM_TENSOR_EXPERT) ? (double)c->K / (double)c->E : 1.0);
        if (!(r->flags & NM_TENSOR_MTP)) active += n;
        if (r->ndim == 2) matmul += n;
    }
    if (c->tie_embeddings) active += (double)(c->V * c->D), matmul += (double)(c->V * c->D);
    matmul += (double)(c->M * c->V * c->D);
    EXPECT(fabs(active - (double)nm_model_params_active(c)) < 0.5, "active %.0f vs %lld", active,
           (long long)nm_model_params_active(c));
    EXPECT(fabs(matmul - (double)nm_model_matmul_params_active(c)) < 0.5, "matmul %.0f vs %lld", matmul,
           (long long)nm_model_matmul_params_active(c));
    double T = 1024;
    double want = 6.0 * matmul + 6.0 * (double)(c->H * (c->Dqk + c->Dv)) * T / 2.0 * (double)c->n_layers;
    EXPECT(fabs(nm_model_flops_per_token(c, 1024) - want) <= 1e-12 * want, "flops");
}

static void test_tiny_table(void) {
    nm_model_config c;
    nm_param_table t;
    if (load_tiny(&c, &t, "128", "false")) return;
    // dsv3-spec 8 derived shapes
    expect_shape(&t, "model.embed_tokens.weight", 129280, 256);
    expect_shape(&t, "model.layers.0.self_attn.q_a_proj.weight", 128, 256);
    expect_shape(&t, "model.layers.0.self_attn.q_a_layernorm.weight", 128, 0);
    expect_shape(&t, "model.layers.0.self_attn.q_b_proj.weight", 192, 128);
    expect_shape(&t, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 80, 256);
    expect_shape(&t, "model.layers.0.self_attn.kv_a_layernorm.weight", 64, 0);
    expect_shape(&t, "model.layers.0.self_attn.kv_b_proj.weight", 256, 64);
    expect_shape(&t, "model.layers.0.self_attn.o_proj.weight", 256, 128);
    expect_shape(&t, "model.layers.0.mlp.gate_proj.weight", 640, 256);
    expect_shape(&t, "model.layers.0.mlp.up_proj.weight", 640, 256);
    expect_shape(&t, "model.layers.0.mlp.down_proj.weight", 256, 640);
    expect_shape(&t, "model.layers.2.mlp.gate.weight", 16, 256);
    expect_shape(&t, "model.layers.2.mlp.gate.e_score_correction_bias", 16, 0);
    expect_shape(&t, "model.layers.3.mlp.experts.15.gate_proj.weight", 128, 256);
    expect_shape(&t, "model.layers.3.mlp.experts.15.down_proj.weight", 256, 128);
    expect_shape(&t, "model.layers.1.mlp.shared_experts.up_proj.weight", 128, 256);
    expect_shape(&t, "model.layers.1.mlp.shared_experts.down_proj.weight", 256, 128);
    expect_shape(&t, "model.layers.4.eh_proj.weight", 256, 512);
    expect_shape(&t, "model.layers.4.enorm.weight", 256, 0);
    expect_shape(&t, "model.layers.4.mlp.experts.0.up_proj.weight", 128, 256);  // MTP layer is MoE
    expect_shape(&t, "model.norm.weight", 256, 0);
    expect_shape(&t, "lm_head.weight", 129280, 256);
    EXPECT(nm_param_table_find(&t, "model.layers.0.mlp.gate.weight") < 0, "dense layer has a router");
    EXPECT(nm_param_table_find(&t, "model.layers.1.mlp.gate_proj.weight") < 0, "MoE layer has a dense MLP");
    EXPECT(nm_param_table_find(&t, "model.layers.0.self_attn.q_proj.weight") < 0, "q_proj with q_lora");
    EXPECT(nm_param_table_find(&t, "model.layers.5.input_layernorm.weight") < 0, "layer 5 exists");
    EXPECT(nm_param_table_find(&t, "model.layers.x.input_layernorm.weight") < 0, "bad name found");

    // Order: embed first, then layers ascending, final norm and lm_head last; MTP layer order.
    EXPECT(!strcmp(t.rows[0].name, "model.embed_tokens.weight"), "row 0 %s", t.rows[0].name);
    EXPECT(!strcmp(t.rows[t.n_rows - 1].name, "lm_head.weight"), "last row %s", t.rows[t.n_rows - 1].name);
    EXPECT(!strcmp(t.rows[t.n_rows - 2].name, "model.norm.weight"), "row n-2");
    EXPECT(!strcmp(t.rows[1].name, "model.layers.0.input_layernorm.weight"), "row 1 %s", t.rows[1].name);
    for (int i = 2; i < t.n_rows - 2; i++) EXPECT(t.rows[i].layer >= t.rows[i - 1].layer, "layer order at %d", i);
    int e = nm_param_table_find(&t, "model.layers.4.embed_tokens.weight");
    int h = nm_param_table_find(&t, "model.layers.4.shared_head.head.weight");
    int en = nm_param_table_find(&t, "model.layers.4.enorm.weight");
    int hn = nm_param_table_find(&t, "model.layers.4.hnorm.weight");
    int eh = nm_param_table_find(&t, "model.layers.4.eh_proj.weight");
    int in = nm_param_table_find(&t, "model.layers.4.input_layernorm.weight");
    int sn = nm_param_table_find(&t, "model.layers.4.shared_head.norm.weight");
    EXPECT(e >= 0 && en == e + 1 && hn == en + 1 && eh == hn + 1 && in == eh + 1, "MTP prologue order");
    EXPECT(sn >= 0 && h == sn + 1 && !strcmp(t.rows[h + 1].name, "model.norm.weight"), "MTP epilogue order");
    if (e >= 0 && h >= 0) {
        EXPECT((t.rows[e].flags & NM_TENSOR_TIED) && t.rows[e].owner == 0, "MTP embed tied to embed");
        EXPECT((t.rows[h].flags & NM_TENSOR_TIED) && t.rows[h].owner == t.n_rows - 1, "MTP head tied to lm_head");
        EXPECT(t.rows[h].offset == t.lm_head && t.rows[e].offset == t.embed, "tied offsets");
    }
    int up = nm_param_table_find(&t, "model.layers.1.self_attn.q_b_proj.weight");
    EXPECT(up >= 0 && t.rows[up - 1].flags & NM_TENSOR_NORM && !strcmp(t.rows[up - 1].name,
           "model.layers.1.self_attn.q_a_layernorm.weight"), "attention order");

    // Flags
    for (int i = 0; i < t.n_rows; i++) {
        const nm_tensor_spec *r = &t.rows[i];
        int is_norm = strstr(r->name, "norm.weight") != NULL, is_bias = strstr(r->name, "e_score_correction_bias") != NULL;
        int tied = (r->flags & NM_TENSOR_TIED) != 0;
        EXPECT(!!(r->flags & NM_TENSOR_NORM) == is_norm, "%s NORM flag", r->name);
        EXPECT(!!(r->flags & NM_TENSOR_ROUTER_BIAS) == is_bias, "%s ROUTER_BIAS flag", r->name);
        EXPECT(!!(r->flags & NM_TENSOR_DECAY) == (r->ndim == 2 && !tied), "%s DECAY flag", r->name);
        EXPECT(!!(r->flags & NM_TENSOR_MTP) == (r->layer == 4), "%s MTP flag", r->name);
        EXPECT(!!(r->flags & NM_TENSOR_EXPERT) == (strstr(r->name, ".mlp.experts.") != NULL), "%s EXPERT flag", r->name);
        EXPECT(r->layer == -1 ? strncmp(r->name, "model.layers.", 13) != 0 : 1, "%s layer", r->name);
        EXPECT(nm_param_table_find(&t, r->name) == i, "find(%s)", r->name);
    }
    check_layout(&t);
    check_layer_offsets(&c, &t);
    check_counters(&c, &t);

    // Exact count from the spec-8 shapes by hand: attention 127168 (latent norms included) + 2 norms 512 per layer (x4),
    // dense MLP 3*640*256, per MoE layer router 4096 + bias 16 + 16 experts 3*128*256 each +
    // shared 3*128*256 (x3), final norm 256, embedding + head 2*129280*256 = 66.2M.
    // (dsv3-spec 8 gives 72.22M from these shapes; the notes it was drawn from said "~72.1M", truncated.)
    printf("tiny: main %lld, MTP %lld, rows %d, n_floats %zu\n", (long long)t.n_params_main, (long long)t.n_params_mtp,
           t.n_rows, t.n_floats);
    int64_t want_main = 4 * (127168 + 512) + 3 * 640 * 256 + 3 * (4096 + 16 + 16 * 3 * 128 * 256 + 3 * 128 * 256) + 256 +
                        2 * 129280 * 256;
    EXPECT(t.n_params_main == want_main, "tiny main %lld, want %lld", (long long)t.n_params_main, (long long)want_main);
    EXPECT(fabs((double)t.n_params_main - 72.1e6) < 0.15e6, "tiny main %lld", (long long)t.n_params_main);
    EXPECT(fabs((double)t.n_params_mtp - 1.9e6) < 0.05e6, "tiny mtp %lld", (long long)t.n_params_mtp);
    int64_t mtp_layer = 0;  // the MTP block = one decoder layer + eh_proj + 3 norms
    for (int i = 0; i < t.n_rows; i++) {
        if (t.rows[i].layer == 3) mtp_layer += t.rows[i].numel;
    }
    EXPECT(t.n_params_mtp == mtp_layer + 256 * 512 + 3 * 256, "MTP = MoE layer + eh_proj + enorm/hnorm/head norm");
    nm_param_table_free(&t);
    nm_model_config_free(&c);
}

static void test_variants(void) {
    nm_model_config c, c0;
    nm_param_table t, t0;
    if (load_tiny(&c0, &t0, "128", "false")) return;
    if (load_tiny(&c, &t, "null", "false") == 0) {
        expect_shape(&t, "model.layers.0.self_attn.q_proj.weight", 192, 256);
        expect_shape(&t, "model.layers.4.self_attn.q_proj.weight", 192, 256);
        EXPECT(nm_param_table_find(&t, "model.layers.0.self_attn.q_a_proj.weight") < 0, "q_a with q_lora null");
        EXPECT(nm_param_table_find(&t, "model.layers.0.self_attn.q_b_proj.weight") < 0, "q_b with q_lora null");
        EXPECT(t.layers[0].q != NM_OFF_NONE && t.layers[0].q_a == NM_OFF_NONE && t.layers[0].q_b == NM_OFF_NONE, "offs");
        int64_t per_layer = 192 * 256 - (128 * 256 + 128 + 192 * 128);
        EXPECT(t.n_params_main == t0.n_params_main + 4 * per_layer, "q_lora null count");
        check_layout(&t);
        check_layer_offsets(&c, &t);
        check_counters(&c, &t);
        nm_param_table_free(&t);
        nm_model_config_free(&c);
    }
    if (load_tiny(&c, &t, "128", "true") == 0) {
        EXPECT(nm_param_table_find(&t, "lm_head.weight") < 0, "tied model has lm_head");
        EXPECT(t.lm_head == t.embed, "tied lm_head offset");
        int h = nm_param_table_find(&t, "model.layers.4.shared_head.head.weight");
        EXPECT(h >= 0 && t.rows[h].owner == 0, "tied MTP head owner");
        EXPECT(t.n_params_main == t0.n_params_main - 129280 * 256, "tied count");
        EXPECT(!strcmp(t.rows[t.n_rows - 1].name, "model.norm.weight"), "tied last row");
        check_layout(&t);
        check_counters(&c, &t);
        nm_param_table_free(&t);
        nm_model_config_free(&c);
    }
    nm_param_table_free(&t0);
    nm_model_config_free(&c0);
}

static void test_deepseek_v3(void) {
    const char *root = getenv("NM_ROOT");
    char path[4096];
    snprintf(path, sizeof(path), "%s/configs/deepseek-v3.json", root ? root : "..");
    nm_model_config c;
    nm_param_table t;
    nm_error err;
    if (nm_model_config_load(&c, path, &err) || nm_param_table_build(&t, &c, &err)) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    int64_t active = nm_model_params_active(&c);
    printf("deepseek-v3: main %lld (%.4fB), MTP %lld (%.3fB), active %lld (%.3fB), rows %d, flops/token(T=4096) %.4g\n",
           (long long)t.n_params_main, t.n_params_main / 1e9, (long long)t.n_params_mtp, t.n_params_mtp / 1e9,
           (long long)active, active / 1e9, t.n_rows, nm_model_flops_per_token(&c, 4096));
    // dsv3-spec 2: "main model 671.03B params, MTP unique 11.6B"
    EXPECT(fabs((double)t.n_params_main - 671.03e9) < 0.01e9, "V3 main %lld", (long long)t.n_params_main);
    EXPECT(fabs((double)t.n_params_mtp - 11.6e9) < 0.05e9, "V3 MTP %lld", (long long)t.n_params_mtp);
    // DeepSeek README_WEIGHTS.md: "Activation parameters: 36.6B (including 0.9B for the output Head)"
    // (one decimal given, so 0.1B tolerance).
    EXPECT(fabs((double)active - 36.6e9) < 0.1e9, "V3 active %lld", (long long)active);
    check_layout(&t);
    check_counters(&c, &t);
    expect_shape(&t, "model.layers.61.mlp.experts.255.down_proj.weight", 7168, 2048);
    expect_shape(&t, "model.layers.61.shared_head.head.weight", 129280, 7168);
    expect_shape(&t, "model.layers.2.mlp.down_proj.weight", 7168, 18432);
    expect_shape(&t, "model.layers.3.self_attn.kv_b_proj.weight", 32768, 512);
    nm_param_table_free(&t);
    nm_model_config_free(&c);
}

static void test_init(void) {
    const char *root = getenv("NM_ROOT");
    char path[4096];
    snprintf(path, sizeof(path), "%s/configs/tiny.json", root ? root : "..");
    nm_model_config c;
    nm_param_table t;
    nm_error err;
    if (nm_model_config_load(&c, path, &err) || nm_param_table_build(&t, &c, &err)) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    size_t bytes = t.n_floats * sizeof(float);
    float *a = nm_aligned_alloc(bytes), *b = nm_aligned_alloc(bytes), *d = nm_aligned_alloc(bytes);
    // Dirty the buffers so the test sees whether init defines every float (padding included).
    memset(a, 0x7f, bytes);
    memset(b, 0x55, bytes);
    uint64_t seed = 1000 + (uint64_t)rand();  // fresh seed per run is fine: every property is seed-free
    omp_set_num_threads(1);
    nm_params_init(a, &t, &c, seed);
    omp_set_num_threads(2);
    nm_params_init(b, &t, &c, seed);
    EXPECT(memcmp(a, b, bytes) == 0, "init depends on the thread count or leaves bytes undefined");
    nm_params_init(d, &t, &c, seed + 1);
    int64_t same = 0;
    for (int i = 0; i < t.n_rows; i++) {
        const nm_tensor_spec *r = &t.rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        const float *p = a + r->offset;
        if (r->flags & NM_TENSOR_NORM) {
            for (int64_t k = 0; k < r->numel; k++) EXPECT(p[k] == 1.0f, "%s not ones", r->name);
        } else if (r->flags & NM_TENSOR_ROUTER_BIAS) {
            for (int64_t k = 0; k < r->numel; k++) EXPECT(p[k] == 0.0f, "%s not zeros", r->name);
        } else {
            for (int64_t k = 0; k < r->numel; k++) same += p[k] == d[r->offset + k];
        }
    }
    EXPECT(same < 10, "seed change left %lld values equal", (long long)same);
    // Padding is zero.
    size_t prev_end = 0;
    for (int i = 0; i < t.n_rows; i++) {
        const nm_tensor_spec *r = &t.rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        for (size_t k = prev_end; k < r->offset; k++) EXPECT(a[k] == 0.0f, "padding at %zu", k);
        prev_end = r->offset + (size_t)r->numel;
    }
    // Statistics of the largest matrices: the embedding (V*D = 131072 values) and one layer's
    // routed experts. Standard errors: mean std/sqrt(n), std std/sqrt(2n); allow 5 of them.
    const nm_tensor_spec *rows[2] = {row(&t, "model.embed_tokens.weight"), row(&t, "model.layers.2.mlp.experts.3.up_proj.weight")};
    for (int q = 0; q < 2; q++) {
        if (!rows[q]) continue;
        const float *p = a + rows[q]->offset;
        double s = 0, s2 = 0, n = (double)rows[q]->numel;
        for (int64_t k = 0; k < rows[q]->numel; k++) s += p[k], s2 += (double)p[k] * p[k];
        double mean = s / n, sd = sqrt(s2 / n - mean * mean);
        EXPECT(fabs(mean) < 5 * c.init_std / sqrt(n), "%s mean %g", rows[q]->name, mean);
        EXPECT(fabs(sd - c.init_std) < 5 * c.init_std / sqrt(2 * n), "%s std %g vs %g", rows[q]->name, sd, c.init_std);
    }
    // Two rows never share a stream.
    const float *e = a + t.embed, *h = a + t.lm_head;
    EXPECT(memcmp(e, h, 64 * sizeof(float)) != 0, "embed and lm_head start identical");
    nm_free(a);
    nm_free(b);
    nm_free(d);
    nm_param_table_free(&t);
    nm_model_config_free(&c);
}

int main(void) {
    srand((unsigned)time(NULL));
    test_tiny_table();
    test_variants();
    test_deepseek_v3();
    test_init();
    if (failures) {
        fprintf(stderr, "test_params: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_params: ok\n");
    return 0;
}
