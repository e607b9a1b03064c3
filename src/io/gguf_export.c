// gguf_export.c: implementation of gguf_export.h.
//
// Reference: formats.md 3.4-3.7; llama.cpp src/models/deepseek2.cpp (which tensors and keys
// the loader requires, shapes checked exactly), llama-context.cpp and deepseek2.cpp's graph
// (how the YaRN factors are derived), llama-graph.cpp build_moe_ffn (routing).
#include "io/gguf_export.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// --- tensor sources -----------------------------------------------------------------------------
// How one GGUF tensor's fp32 values (ggml order) are made from the parameter buffer. A PyTorch
// [out, in] matrix is already ggml's ne = {in, out} byte for byte, so most are plain copies.

typedef enum src_kind {
    SRC_COPY,                   // numel contiguous floats (p never NULL)
    SRC_PAD,                    // (rows, cols) matrix at p (NULL: zeros) zero-padded to (rows_out, cols_out)
    SRC_EXPERTS,                // n_mat (rows, cols) matrices at p + j*stride (NULL: zeros), stacked
    SRC_K_B,                    // kv_b (H*(Dn+Dv), C) -> k_b[h][c][n] = kv_b[h*(Dn+Dv) + n][c]
    SRC_V_B,                    // kv_b -> v_b[h][v][c] = kv_b[h*(Dn+Dv) + Dn + v][c]
} src_kind;

typedef struct src {
    src_kind kind;
    const float *p;
    int64_t rows, cols, rows_out, cols_out;
    int64_t n_mat;
    size_t stride;              // floats between experts
    int64_t H, Dn, Dv, C;       // SRC_K_B / SRC_V_B
} src;

static void fill(const void *ctx, float *dst, int64_t numel) {
    const src *s = ctx;
    switch (s->kind) {
    case SRC_COPY:
        memcpy(dst, s->p, (size_t)numel * sizeof(float));
        return;
    case SRC_PAD:
        for (int64_t r = 0; r < s->rows_out; r++) {
            for (int64_t c = 0; c < s->cols_out; c++) {
                dst[r * s->cols_out + c] = (s->p && r < s->rows && c < s->cols) ? s->p[r * s->cols + c] : 0.0f;
            }
        }
        return;
    case SRC_EXPERTS: {
        int64_t m = s->rows * s->cols;
        for (int64_t j = 0; j < s->n_mat; j++) {
            if (s->p) memcpy(dst + j * m, s->p + (size_t)j * s->stride, (size_t)m * sizeof(float));
            else memset(dst + j * m, 0, (size_t)m * sizeof(float));
        }
        return;
    }
    case SRC_K_B:
        for (int64_t h = 0; h < s->H; h++) {
            for (int64_t c = 0; c < s->C; c++) {
                for (int64_t n = 0; n < s->Dn; n++) {
                    dst[(h * s->C + c) * s->Dn + n] = s->p[(h * (s->Dn + s->Dv) + n) * s->C + c];
                }
            }
        }
        return;
    case SRC_V_B:
        for (int64_t h = 0; h < s->H; h++) {
            for (int64_t v = 0; v < s->Dv; v++) {
                memcpy(dst + (h * s->Dv + v) * s->C, s->p + (h * (s->Dn + s->Dv) + s->Dn + v) * s->C,
                       (size_t)s->C * sizeof(float));
            }
        }
        return;
    }
}

typedef struct exporter {
    nm_gguf_writer *w;
    src *srcs;                  // (cap) kept alive until the write
    int n, cap;
    nm_ggml_type dtype;
    int n_f16_fallback;
    char fallback_names[512];
    nm_error *err;
} exporter;

// Adds a tensor; keep_f32 for norms, 1-D tensors and the router. ne in ggml order.
static int add(exporter *x, const char *name, int n_dims, int64_t ne0, int64_t ne1, int64_t ne2, src s, int keep_f32) {
    NM_CHECK(x->n < x->cap, "GGUF source table full (%d)", x->cap);
    x->srcs[x->n] = s;
    int64_t ne[3] = {ne0, ne1, ne2};
    nm_ggml_type type = (keep_f32 || n_dims == 1) ? NM_GGML_F32 : x->dtype;
    if (type == NM_GGML_Q8_0 && ne0 % 32 != 0) {
        type = NM_GGML_F16;
        if (x->n_f16_fallback++ < 4) {
            size_t len = strlen(x->fallback_names);
            snprintf(x->fallback_names + len, sizeof(x->fallback_names) - len, "%s%s", len ? ", " : "", name);
        }
    }
    return nm_gguf_add_tensor(x->w, name, n_dims, ne, type, fill, &x->srcs[x->n++], x->err);
}

static src copy_of(const float *p) { return (src){.kind = SRC_COPY, .p = p}; }

static src padded(const float *p, int64_t rows, int64_t cols, int64_t rows_out, int64_t cols_out) {
    return (src){.kind = SRC_PAD, .p = p, .rows = rows, .cols = cols, .rows_out = rows_out, .cols_out = cols_out};
}

static src experts(const float *p, int64_t rows, int64_t cols, int64_t n, size_t stride) {
    return (src){.kind = SRC_EXPERTS, .p = p, .rows = rows, .cols = cols, .n_mat = n, .stride = stride};
}

// --- the model ----------------------------------------------------------------------------------

static int is_lite_layer_count(const nm_model_config *cfg) {
    // llama.cpp's deepseek2 loader: "lite variants" (no q_lora_rank read, plain attn_q expected).
    return cfg->L == 26 || cfg->L == 27 || (cfg->L == 48 && cfg->V == 128256);
}

static int check_supported(const nm_model_config *cfg, int limited, nm_error *err) {
    const char *src = cfg->source_path ? cfg->source_path : "config.json";
    if (cfg->Dn < 1) return nm_error_set(err, "%s: qk_nope_head_dim 0: llama.cpp's deepseek2 needs at least 1", src);
    if (cfg->Rq > 0 && is_lite_layer_count(cfg)) {
        return nm_error_set(err, "%s: num_hidden_layers %lld with q_lora_rank %lld: llama.cpp's deepseek2 loader takes a "
                                 "model of this depth for DeepSeek-V2-Lite (plain q_proj) and would refuse the file",
                            src, (long long)cfg->L, (long long)cfg->Rq);
    }
    if (cfg->E > 0 && limited && cfg->topk_method == NM_TOPK_GROUP_LIMITED_GREEDY) {
        return nm_error_set(err, "%s: topk_method \"group_limited_greedy\" with topk_group %lld < n_group %lld: llama.cpp "
                                 "ranks expert groups by their top-2 sum (noaux_tc) and cannot express the max rule",
                            src, (long long)cfg->Gk, (long long)cfg->G);
    }
    if (cfg->E > 0 && limited && cfg->E / cfg->G < 2) {
        return nm_error_set(err, "%s: n_group %lld leaves groups of one expert; llama.cpp's group score needs two", src,
                            (long long)cfg->G);
    }
    return 0;
}

static void add_hparams(exporter *x, const nm_model_config *cfg, int64_t n_lead, int64_t n_shared_out, int limited) {
    nm_gguf_writer *w = x->w;
    nm_gguf_add_str(w, "general.architecture", "deepseek2");
    nm_gguf_add_str(w, "general.type", "model");
    nm_gguf_add_str(w, "general.name", "nanomegatron export");
    uint32_t file_type = x->dtype == NM_GGML_F32 ? 0 : x->dtype == NM_GGML_F16 ? 1 : x->dtype == NM_GGML_Q8_0 ? 7 : 32;
    nm_gguf_add_u32(w, "general.file_type", file_type);
    nm_gguf_add_u32(w, "general.quantization_version", 2);
    nm_gguf_add_u32(w, "deepseek2.vocab_size", (uint32_t)cfg->V);
    nm_gguf_add_u32(w, "deepseek2.context_length", (uint32_t)cfg->max_pos);
    nm_gguf_add_u32(w, "deepseek2.embedding_length", (uint32_t)cfg->D);
    nm_gguf_add_u32(w, "deepseek2.block_count", (uint32_t)cfg->L);
    nm_gguf_add_u32(w, "deepseek2.feed_forward_length", (uint32_t)cfg->F);
    nm_gguf_add_u32(w, "deepseek2.leading_dense_block_count", (uint32_t)n_lead);
    // MLA stored as MQA over the latent (formats.md 3.4): one kv head of Rkv + Dr, values Rkv.
    nm_gguf_add_u32(w, "deepseek2.attention.head_count", (uint32_t)cfg->H);
    nm_gguf_add_u32(w, "deepseek2.attention.head_count_kv", 1);
    nm_gguf_add_u32(w, "deepseek2.attention.key_length", (uint32_t)(cfg->Rkv + cfg->Dr));
    nm_gguf_add_u32(w, "deepseek2.attention.value_length", (uint32_t)cfg->Rkv);
    nm_gguf_add_u32(w, "deepseek2.attention.key_length_mla", (uint32_t)cfg->Dqk);
    nm_gguf_add_u32(w, "deepseek2.attention.value_length_mla", (uint32_t)cfg->Dv);
    // Required by the loader even without q-LoRA (0 then selects attn_q).
    nm_gguf_add_u32(w, "deepseek2.attention.q_lora_rank", (uint32_t)cfg->Rq);
    nm_gguf_add_u32(w, "deepseek2.attention.kv_lora_rank", (uint32_t)cfg->Rkv);
    nm_gguf_add_f32(w, "deepseek2.attention.layer_norm_rms_epsilon", (float)cfg->rms_eps);
    nm_gguf_add_u32(w, "deepseek2.rope.dimension_count", (uint32_t)cfg->Dr);
    nm_gguf_add_f32(w, "deepseek2.rope.freq_base", (float)cfg->rope_theta);
    nm_gguf_add_u32(w, "deepseek2.expert_count", (uint32_t)cfg->E);
    nm_gguf_add_u32(w, "deepseek2.expert_used_count", (uint32_t)(cfg->E > 0 ? cfg->K : 0));
    nm_gguf_add_u32(w, "deepseek2.expert_shared_count", (uint32_t)n_shared_out);
    nm_gguf_add_u32(w, "deepseek2.expert_feed_forward_length", (uint32_t)cfg->Fe);
    nm_gguf_add_f32(w, "deepseek2.expert_weights_scale", (float)cfg->routed_scaling);
    nm_gguf_add_bool(w, "deepseek2.expert_weights_norm", cfg->norm_topk_prob);
    // LLAMA_EXPERT_GATING_FUNC_TYPE: 1 softmax, 2 sigmoid (absent means softmax).
    nm_gguf_add_u32(w, "deepseek2.expert_gating_func", cfg->scoring == NM_SCORING_SIGMOID ? 2 : 1);
    if (cfg->E > 0 && limited) {
        // llama.cpp asserts used < count; without a real limit the keys are left out (no groups).
        nm_gguf_add_u32(w, "deepseek2.expert_group_count", (uint32_t)cfg->G);
        nm_gguf_add_u32(w, "deepseek2.expert_group_used_count", (uint32_t)cfg->Gk);
    }
    if (cfg->yarn) {
        nm_gguf_add_str(w, "deepseek2.rope.scaling.type", "yarn");
        nm_gguf_add_f32(w, "deepseek2.rope.scaling.factor", (float)cfg->yarn_factor);
        nm_gguf_add_u32(w, "deepseek2.rope.scaling.original_context_length", (uint32_t)cfg->yarn_orig_max_pos);
        nm_gguf_add_f32(w, "deepseek2.rope.scaling.yarn_beta_fast", (float)cfg->yarn_beta_fast);
        nm_gguf_add_f32(w, "deepseek2.rope.scaling.yarn_beta_slow", (float)cfg->yarn_beta_slow);
        // llama.cpp (llama-context.cpp, deepseek2.cpp), with g(m) = 1 + 0.1 m ln(factor), the key
        // yarn_log_multiplier = 0.1 m (the loader divides by 0.1 again) and r = attn_factor:
        //   cos/sin multiplier = r                  (its mscale assumption cancels for any m)
        //   attention scale    = (r g(m))^2 / sqrt(Dqk)
        // Ours: cos/sin multiplier A = rope_attn_factor, attention scale softmax_scale. So
        // r = A and g(m) = sqrt(softmax_scale * sqrt(Dqk)) / A. With m = 0 the key must be absent
        // (it switches the branch), and llama.cpp then multiplies cos/sin by r g(1): r = A / g(1).
        double A = cfg->rope_attn_factor, S = cfg->softmax_scale * sqrt((double)cfg->Dqk);
        double lnf = log(cfg->yarn_factor);
        double m = lnf > 0 ? (sqrt(S) / A - 1.0) / (0.1 * lnf) : 0.0;
        if (fabs(m) > 1e-6) {
            nm_gguf_add_f32(w, "deepseek2.rope.scaling.yarn_log_multiplier", (float)(0.1 * m));
            nm_gguf_add_f32(w, "deepseek2.rope.scaling.attn_factor", (float)A);
        } else {
            nm_gguf_add_f32(w, "deepseek2.rope.scaling.attn_factor", (float)(A / (1.0 + 0.1 * (lnf > 0 ? lnf : 0.0))));
        }
        if (cfg->yarn_beta_fast != 32.0 || cfg->yarn_beta_slow != 1.0) {
            fprintf(stderr, "warning: YaRN beta_fast %g / beta_slow %g: llama.cpp's deepseek2 reads no beta keys and "
                            "uses 32 / 1, so its rotary frequencies will differ unless set at load time\n",
                    cfg->yarn_beta_fast, cfg->yarn_beta_slow);
        }
    }
}

static void add_vocab(exporter *x, const nm_model_config *cfg, const nm_export_vocab *v) {
    int64_t n = cfg->V;
    const char **toks = nm_malloc((size_t)n * sizeof(char *));
    int32_t *types = nm_malloc((size_t)n * sizeof(int32_t));
    char **pads = nm_calloc((size_t)n, sizeof(char *));
    for (int64_t i = 0; i < n; i++) {
        if (i < v->n && v->tokens[i]) {
            toks[i] = v->tokens[i];
            types[i] = v->types[i];
        } else {
            // Ids the tokenizer never produces (vocab_size is padded): the converter's names.
            pads[i] = nm_malloc(32);
            snprintf(pads[i], 32, "[PAD%lld]", (long long)i);
            toks[i] = pads[i];
            types[i] = NM_TOKEN_UNUSED;
        }
    }
    nm_gguf_writer *w = x->w;
    nm_gguf_add_str(w, "tokenizer.ggml.model", "gpt2");
    nm_gguf_add_str(w, "tokenizer.ggml.pre", v->pre);
    nm_gguf_add_arr_str(w, "tokenizer.ggml.tokens", toks, n);
    nm_gguf_add_arr_i32(w, "tokenizer.ggml.token_type", types, n);
    nm_gguf_add_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merges, v->n_merges);
    int64_t eos = v->eod >= 0 ? v->eod : cfg->eos_id;
    int64_t bos = (cfg->bos_id >= 0 && cfg->bos_id < v->n && v->tokens[cfg->bos_id]) ? cfg->bos_id : eos;
    if (bos >= 0) nm_gguf_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)bos);
    if (eos >= 0) nm_gguf_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)eos);
    // Our encoder adds nothing (bos/eos insertion is the data pipeline's job).
    nm_gguf_add_bool(w, "tokenizer.ggml.add_bos_token", 0);
    nm_gguf_add_bool(w, "tokenizer.ggml.add_eos_token", 0);
    for (int64_t i = 0; i < n; i++) nm_free(pads[i]);
    nm_free(pads);
    nm_free(toks);
    nm_free(types);
}

static int add_layer(exporter *x, const nm_model_config *cfg, const nm_param_table *t, const float *P, int64_t l,
                     int64_t n_lead, int64_t W) {
    const nm_layer_offsets *o = &t->layers[l];
    const int64_t D = cfg->D, H = cfg->H, Dqk = cfg->Dqk, Rq = cfg->Rq, Rkv = cfg->Rkv, Dr = cfg->Dr;
    const int64_t F = cfg->F, Fe = cfg->Fe, Fs = cfg->Fs, E = cfg->E;
    char name[96];
    int rc = 0;
#define ADD(suffix, nd, a, b, c, s, f32)                                       \
    do {                                                                     \
        snprintf(name, sizeof(name), "blk.%lld.%s", (long long)l, suffix);   \
        if (rc == 0) rc = add(x, name, nd, a, b, c, s, f32);                 \
    } while (0)
    ADD("attn_norm.weight", 1, D, 1, 1, copy_of(P + o->input_norm), 1);
    if (Rq > 0) {
        ADD("attn_q_a.weight", 2, D, Rq, 1, copy_of(P + o->q_a), 0);
        ADD("attn_q_a_norm.weight", 1, Rq, 1, 1, copy_of(P + o->q_a_norm), 1);
        ADD("attn_q_b.weight", 2, Rq, H * Dqk, 1, copy_of(P + o->q_b), 0);
    } else {
        ADD("attn_q.weight", 2, D, H * Dqk, 1, copy_of(P + o->q), 0);
    }
    ADD("attn_kv_a_mqa.weight", 2, D, Rkv + Dr, 1, copy_of(P + o->kv_a), 0);
    ADD("attn_kv_a_norm.weight", 1, Rkv, 1, 1, copy_of(P + o->kv_a_norm), 1);
    src kb = {.kind = SRC_K_B, .p = P + o->kv_b, .H = H, .Dn = cfg->Dn, .Dv = cfg->Dv, .C = Rkv};
    src vb = kb;
    vb.kind = SRC_V_B;
    ADD("attn_k_b.weight", 3, cfg->Dn, Rkv, H, kb, 0);
    ADD("attn_v_b.weight", 3, Rkv, cfg->Dv, H, vb, 0);
    ADD("attn_output.weight", 2, H * cfg->Dv, D, 1, copy_of(P + o->o), 0);
    ADD("ffn_norm.weight", 1, D, 1, 1, copy_of(P + o->post_norm), 1);
    if (l < n_lead) {
        ADD("ffn_gate.weight", 2, D, F, 1, copy_of(P + o->mlp_gate_up), 0);
        ADD("ffn_up.weight", 2, D, F, 1, copy_of(P + o->mlp_gate_up + (size_t)(F * D)), 0);
        ADD("ffn_down.weight", 2, F, D, 1, copy_of(P + o->mlp_down), 0);
        return rc;
    }
    int moe = nm_layer_is_moe(cfg, l);
    // A dense layer after the leading block: zero router and experts, the MLP as shared expert.
    const float *router = moe ? P + o->router : NULL;
    // Only noaux_tc reads the stored bias; llama.cpp adds exp_probs_b for every method, so the
    // others get zeros (a NULL source is written as zeros) to choose the experts we choose.
    const float *bias = moe && nm_routing_uses_bias(cfg) ? P + o->router_bias : NULL;
    const float *ex = moe ? P + o->experts : NULL;
    const float *sh_gate, *sh_up, *sh_down;
    int64_t sh_rows;
    if (moe) {
        sh_rows = Fs;
        sh_gate = Fs > 0 ? P + o->shared_gate_up : NULL;
        sh_up = Fs > 0 ? P + o->shared_gate_up + (size_t)(Fs * D) : NULL;
        sh_down = Fs > 0 ? P + o->shared_down : NULL;
    } else {
        sh_rows = F;
        sh_gate = P + o->mlp_gate_up;
        sh_up = P + o->mlp_gate_up + (size_t)(F * D);
        sh_down = P + o->mlp_down;
    }
    ADD("ffn_gate_inp.weight", 2, D, E, 1, padded(router, E, D, E, D), 1);
    ADD("exp_probs_b.bias", 1, E, 1, 1, padded(bias, 1, E, 1, E), 1);
    size_t st = moe ? o->expert_stride : 0;
    ADD("ffn_gate_exps.weight", 3, D, Fe, E, experts(ex, Fe, D, E, st), 0);
    ADD("ffn_up_exps.weight", 3, D, Fe, E, experts(ex ? ex + (size_t)(Fe * D) : NULL, Fe, D, E, st), 0);
    ADD("ffn_down_exps.weight", 3, Fe, D, E, experts(ex ? ex + (size_t)(2 * Fe * D) : NULL, D, Fe, E, st), 0);
    ADD("ffn_gate_shexp.weight", 2, D, W, 1, padded(sh_gate, sh_rows, D, W, D), 0);
    ADD("ffn_up_shexp.weight", 2, D, W, 1, padded(sh_up, sh_rows, D, W, D), 0);
    ADD("ffn_down_shexp.weight", 2, W, D, 1, padded(sh_down, D, sh_rows, D, W), 0);
#undef ADD
    return rc;
}

int nm_gguf_export(const char *path, const nm_model_config *cfg, const nm_param_table *t, const float *params,
                   const nm_export_vocab *vocab, nm_ggml_type dtype, nm_gguf_progress_fn progress, void *progress_ctx,
                   nm_error *err) {
    if (vocab->n > cfg->V) {
        return nm_error_set(err, "the tokenizer has %lld tokens but the model's vocab_size is %lld", (long long)vocab->n,
                            (long long)cfg->V);
    }
    int limited = cfg->E > 0 && cfg->G > 1 && cfg->Gk < cfg->G;
    if (check_supported(cfg, limited, err)) return -1;
    // Leading dense block, and whether dense layers follow it.
    int64_t n_lead = cfg->L;
    for (int64_t l = 0; l < cfg->L; l++) {
        if (cfg->E > 0 && nm_layer_is_moe(cfg, l)) { n_lead = l; break; }
    }
    int interleaved = 0;
    for (int64_t l = n_lead; l < cfg->L; l++) interleaved |= !nm_layer_is_moe(cfg, l);
    // Shared-expert width W = n_shared_out * Fe covering the real shared experts and, for
    // dense layers written as MoE, the MLP (see the header).
    int64_t n_shared_out = 0;
    if (cfg->E > 0) {
        n_shared_out = cfg->n_shared > 0 ? cfg->n_shared : 1;
        if (interleaved) {
            int64_t need = (cfg->F + cfg->Fe - 1) / cfg->Fe;
            if (need > n_shared_out) n_shared_out = need;
        }
    }
    int64_t W = n_shared_out * cfg->Fe;

    exporter x = {.w = nm_gguf_writer_create(), .dtype = dtype, .err = err};
    x.cap = (int)(20 * cfg->L + 8);
    x.srcs = nm_calloc((size_t)x.cap, sizeof(src));
    add_hparams(&x, cfg, n_lead, n_shared_out, limited);
    add_vocab(&x, cfg, vocab);
    int rc = add(&x, "token_embd.weight", 2, cfg->D, cfg->V, 1, copy_of(params + t->embed), 0);
    if (rc == 0) rc = add(&x, "output_norm.weight", 1, cfg->D, 1, 1, copy_of(params + t->final_norm), 1);
    // Tied embeddings: no output.weight, llama.cpp then reuses token_embd.
    if (rc == 0 && !cfg->tie_embeddings) rc = add(&x, "output.weight", 2, cfg->D, cfg->V, 1, copy_of(params + t->lm_head), 0);
    for (int64_t l = 0; l < cfg->L && rc == 0; l++) rc = add_layer(&x, cfg, t, params, l, n_lead, W);
    if (rc == 0 && x.n_f16_fallback) {
        fprintf(stderr, "note: %d tensor(s) with rows not a multiple of 32 stored as f16 (q8_0 needs 32-element "
                        "blocks): %s%s\n", x.n_f16_fallback, x.fallback_names, x.n_f16_fallback > 4 ? ", ..." : "");
    }
    if (rc == 0 && cfg->M > 0) {
        fprintf(stderr, "note: the %lld MTP block(s) are not exported (llama.cpp's converter drops them for DeepSeek too); "
                        "the main model is complete without them\n", (long long)cfg->M);
    }
    if (rc == 0 && interleaved) {
        fprintf(stderr, "note: dense layers after layer %lld written as MoE layers with zero routed experts and the MLP as "
                        "shared expert (llama.cpp's deepseek2 has only a leading dense block)\n", (long long)n_lead);
    }
    if (rc == 0) rc = nm_gguf_write(x.w, path, progress, progress_ctx, err);
    nm_gguf_writer_destroy(x.w);
    nm_free(x.srcs);
    return rc;
}
