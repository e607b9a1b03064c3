// test_accumulation.c: gradient accumulation is exact up to fp32 summation order, and the
// aux-loss-free bias update moves the biases the right way by exactly gamma.
//
// 1. One forward/backward over B = 4 rows (grad_scale 1) against two over rows 0-1 and 2-3
//    (grad_scale 0.5 each, accumulated into the same gradient buffer), as the trainer does
//    with micro_batch 2, global_batch 4. The main CE is a mean over B*(T-1) positions, the
//    MTP CE a mean over B*(T-1-k), the balance loss a mean over sequences, so the halves with
//    scale 0.5 are the same objective. Every op of the forward is row-independent, so the
//    activations are the same numbers; what differs is only the order in which the weight
//    gradients sum over the B*T rows (one GEMM over 64 rows, or two over 32 added
//    together) - a few fp32 roundings of partial sums, ~1e-7 relative per element,
//    up to ~1e-6 where a tensor's gradient is a near-cancelling sum. Hence per tensor
//    relative L2 <= 1e-5, the losses to 1e-6 relative, and the expert counts exactly.
// 2. One AdamW step from the same parameters with each variant's gradients gives the same
//    parameters to 1e-5 relative L2 per tensor. The first AdamW update of an element is
//    lr * g / (|g| + eps): insensitive to a relative error in g when |g| >> eps, but where a
//    gradient is a near-cancelling sum that ends up at |g| ~ eps = 1e-8, the absolute
//    rounding error of its O(1e-3) terms (~1e-10) is a few % of g and moves that update by
//    ~1e-2 lr. Seen here: one element of an expert matrix with g = 1.89e-8 vs 1.93e-8 makes
//    that tensor's relative L2 1.0e-6 with lr = 1e-3; all others are <= ~1e-7. 1e-5 leaves
//    room for a few such elements, while any real accumulation error (a missing scale, a
//    dropped micro-batch: >= 1e-2) is far above it.
// 3. nm_balance_update_bias with the counts of a real forward: experts above the mean load
//    get b - gamma, below the mean b + gamma, at the mean unchanged; with a large gamma the
//    next forward routes fewer tokens to the formerly overloaded experts.
// 4. A pair's second model (nm_model_create_pair, the trainer's moe_pair_micro_batches): the
//    second half's forward on it before the first half's backward gives one model's gradients,
//    losses and expert counts bit for bit, in fp32 and bf16; a pair is not paired again.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "nanomegatron.h"
#include "train/balance.h"

#include "test_util.h"
#include "test_backend.h"

// hidden 64, vocab 300, 1 dense + 2 MoE layers (8 experts, top-2, 4 groups, 2 kept), MTP 1.
// initializer_range 0.1 (instead of 0.006) so activations, routing and gradients are O(1)
// and not dominated by the norms.
static const char *model_json =
    "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\","
    " \"vocab_size\": 300, \"hidden_size\": 64, \"intermediate_size\": 128, \"moe_intermediate_size\": 32,"
    " \"num_hidden_layers\": 3, \"num_nextn_predict_layers\": 1,"
    " \"num_attention_heads\": 2, \"num_key_value_heads\": 2,"
    " \"q_lora_rank\": 32, \"kv_lora_rank\": 32, \"qk_nope_head_dim\": 16, \"qk_rope_head_dim\": 8,"
    " \"v_head_dim\": 16, \"n_routed_experts\": 8, \"n_shared_experts\": 1, \"num_experts_per_tok\": 2,"
    " \"n_group\": 4, \"topk_group\": 2, \"routed_scaling_factor\": 2.5, \"norm_topk_prob\": true,"
    " \"scoring_func\": \"sigmoid\", \"topk_method\": \"noaux_tc\", \"first_k_dense_replace\": 1,"
    " \"moe_layer_freq\": 1, \"hidden_act\": \"silu\", \"rms_norm_eps\": 1e-06, \"rope_theta\": 10000.0,"
    " \"rope_scaling\": null, \"max_position_embeddings\": 512, \"tie_word_embeddings\": false,"
    " \"attention_bias\": false, \"initializer_range\": 0.1, \"bos_token_id\": 0, \"eos_token_id\": 1,"
    " \"torch_dtype\": \"float32\"}";

enum { B = 4, T = 16 };

// Relative L2 distance of b from a over n floats (0 when both are zero, inf when only a is).
static double rel_l2(const float *a, const float *b, int64_t n) {
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)a[i] * (double)a[i];
    }
    if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

// Worst per-tensor relative L2 over the rows that own storage; names the worst row.
static double worst_row(const nm_param_table *t, const float *a, const float *b, unsigned skip_flags,
                        const char **name) {
    double worst = 0.0;
    *name = "(none)";
    for (int r = 0; r < t->n_rows; r++) {
        const nm_tensor_spec *s = &t->rows[r];
        if (s->flags & (NM_TENSOR_TIED | skip_flags)) continue;
        double e = rel_l2(a + s->offset, b + s->offset, s->numel);
        if (!(e <= worst)) {
            worst = e;
            *name = s->name;
        }
    }
    return worst;
}

// Forward a (rows 0-1) on m, forward b (rows 2-3) on its pair, backward a, backward b: the
// gradients, losses and expert counts must be those of one model running a then b (want_*,
// fp32), bit for bit; then the same in bf16 against one bf16 model.
static void check_pair(nm_model *m, const int32_t *tokens, const nm_loss_options *opt, const float *want_g,
                       const nm_loss_terms want_l[2], const int64_t *want_counts, int64_t n_counts) {
    nm_error err;
    nm_model_options o = {0};
    nm_model *pair, *again;
    if (nm_model_create_pair(&pair, m, &o, &err) != 0) {
        EXPECT(0, "nm_model_create_pair: %s", err.msg);
        return;
    }
    EXPECT(nm_model_create_pair(&again, pair, &o, &err) != 0 && strstr(err.msg, "cannot be paired again"),
           "a pair's second model was paired again");
    const size_t nf = nm_model_table(m)->n_floats;
    float *seq_g = malloc(nf * sizeof(float));
    int64_t *counts = calloc((size_t)n_counts, sizeof(int64_t));
    for (int bf16 = 0; bf16 < 2; bf16++) {
        nm_precision prec = bf16 ? NM_PRECISION_BF16 : NM_PRECISION_FP32;
        if (nm_model_set_precision(m, prec, &err) != 0 || nm_model_set_precision(pair, prec, &err) != 0) {
            EXPECT(0, "precision: %s", err.msg);
            break;
        }
        nm_loss_terms l[2], seq_l[2];
        if (bf16) {  // the reference: one bf16 model, a then b
            nm_model_zero_grads(m);
            for (int h = 0; h < 2; h++)
                if (nm_model_forward(m, tokens + h * (B / 2) * T, B / 2, T, opt, &seq_l[h], NULL, &err) != 0 ||
                    nm_model_backward(m, &err) != 0)
                    EXPECT(0, "bf16 half %d: %s", h, err.msg);
            memcpy(seq_g, nm_model_grads(m), nf * sizeof(float));
        } else {
            memcpy(seq_g, want_g, nf * sizeof(float));
            seq_l[0] = want_l[0], seq_l[1] = want_l[1];
        }
        nm_model_zero_grads(m);
        memset(counts, 0, (size_t)n_counts * sizeof(int64_t));
        if (nm_model_forward(m, tokens, B / 2, T, opt, &l[0], NULL, &err) != 0 ||
            nm_model_forward(pair, tokens + (B / 2) * T, B / 2, T, opt, &l[1], NULL, &err) != 0 ||
            nm_model_backward(m, &err) != 0 || nm_model_backward(pair, &err) != 0) {
            EXPECT(0, "paired halves: %s", err.msg);
            break;
        }
        for (int k = 0; k < 2; k++) {
            const int64_t *c = nm_model_expert_counts(k ? pair : m, NULL, NULL);
            for (int64_t i = 0; i < n_counts; i++) counts[i] += c[i];
        }
        EXPECT(nm_model_grads(pair) == nm_model_grads(m), "the pair has gradients of its own");
        EXPECT(memcmp(nm_model_grads(m), seq_g, nf * sizeof(float)) == 0,
               "%s: the paired halves' gradients differ from one model's", bf16 ? "bf16" : "fp32");
        EXPECT(l[0].loss == seq_l[0].loss && l[1].loss == seq_l[1].loss && l[1].mtp == seq_l[1].mtp,
               "%s: paired losses %.9g %.9g, one model's %.9g %.9g", bf16 ? "bf16" : "fp32", l[0].loss, l[1].loss,
               seq_l[0].loss, seq_l[1].loss);
        EXPECT(bf16 || memcmp(counts, want_counts, (size_t)n_counts * sizeof(int64_t)) == 0,
               "the paired halves' expert counts differ");
        printf("pair (%s): gradients, losses and expert counts bit-identical to one model\n", bf16 ? "bf16" : "fp32");
    }
    if (nm_model_set_precision(m, NM_PRECISION_FP32, &err) != 0) EXPECT(0, "precision back to fp32: %s", err.msg);
    nm_model_destroy(pair);
    free(seq_g);
    free(counts);
}

int main(void) {
    nm_error err;
    nm_model_config cfg;
    if (nm_model_config_parse(&cfg, model_json, "test_accumulation", &err) != 0) {
        fprintf(stderr, "config: %s\n", err.msg);
        return 1;
    }
    nm_model *m;
    if (nm_model_create(&m, &cfg, test_backend("cpu"), B, T, &err) != 0) {
        fprintf(stderr, "model: %s\n", err.msg);
        return 1;
    }
    const nm_param_table *tab = nm_model_table(m);
    const size_t nf = tab->n_floats;
    float *params = nm_model_params(m);
    nm_params_init(params, tab, &cfg, 42);
    // Non-trivial norms and router biases, so that every code path carries weight.
    uint64_t key = nm_rng_key(7, NM_RNG_TEST, 0, 0);
    uint64_t ctr = 0;
    for (int r = 0; r < tab->n_rows; r++) {
        const nm_tensor_spec *s = &tab->rows[r];
        if (s->flags & NM_TENSOR_TIED) continue;
        float *p = params + s->offset;
        if (s->flags & NM_TENSOR_NORM) {
            for (int64_t i = 0; i < s->numel; i++) p[i] = 1.0f + 0.1f * nm_rng_normal(key, ctr++);
        } else if (s->flags & NM_TENSOR_ROUTER_BIAS) {
            for (int64_t i = 0; i < s->numel; i++) p[i] = 0.05f * nm_rng_normal(key, ctr++);
        }
    }
    int32_t tokens[B * T];
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)(nm_rng_u64(key, 1000000 + (uint64_t)i) % (uint64_t)cfg.V);

    int n_moe;
    nm_model_expert_counts(m, &n_moe, NULL);
    const int64_t E = cfg.E;
    EXPECT(n_moe == 3, "expected 3 MoE layers (2 main + MTP), got %d", n_moe);
    int64_t *counts_full = calloc((size_t)(n_moe * E), sizeof(int64_t));
    int64_t *counts_acc = calloc((size_t)(n_moe * E), sizeof(int64_t));
    float *g_full = malloc(nf * sizeof(float)), *g_acc = malloc(nf * sizeof(float));

    // --- 1. full batch vs two accumulated halves ---------------------------------------------
    nm_loss_options full_opt = {.mtp_weight = 0.3f, .aux_weight = 1e-2f, .grad_scale = 1.0f};
    nm_loss_options half_opt = full_opt;
    half_opt.grad_scale = 0.5f;
    nm_loss_terms lf, lh[2];
    nm_model_zero_grads(m);
    if (nm_model_forward(m, tokens, B, T, &full_opt, &lf, NULL, &err) != 0 || nm_model_backward(m, &err) != 0) {
        fprintf(stderr, "full batch: %s\n", err.msg);
        return 1;
    }
    memcpy(counts_full, nm_model_expert_counts(m, NULL, NULL), (size_t)(n_moe * E) * sizeof(int64_t));
    memcpy(g_full, nm_model_grads(m), nf * sizeof(float));
    nm_model_zero_grads(m);
    for (int h = 0; h < 2; h++) {
        if (nm_model_forward(m, tokens + h * (B / 2) * T, B / 2, T, &half_opt, &lh[h], NULL, &err) != 0 ||
            nm_model_backward(m, &err) != 0) {
            fprintf(stderr, "half %d: %s\n", h, err.msg);
            return 1;
        }
        const int64_t *c = nm_model_expert_counts(m, NULL, NULL);
        for (int64_t i = 0; i < n_moe * E; i++) counts_acc[i] += c[i];
    }
    memcpy(g_acc, nm_model_grads(m), nf * sizeof(float));

    printf("full batch: loss %.9f ce %.9f mtp %.9f aux %.9f\n", lf.loss, lf.ce, lf.mtp, lf.aux);
    struct { const char *what; double full, a, b; } terms[] = {
        {"loss", lf.loss, lh[0].loss, lh[1].loss}, {"ce", lf.ce, lh[0].ce, lh[1].ce},
        {"mtp", lf.mtp, lh[0].mtp, lh[1].mtp}, {"aux", lf.aux, lh[0].aux, lh[1].aux},
    };
    for (int i = 0; i < 4; i++) {
        double mean = 0.5 * (terms[i].a + terms[i].b);
        double rel = fabs(mean - terms[i].full) / fabs(terms[i].full);
        printf("  %-4s mean of halves %.9f  rel diff %.2e\n", terms[i].what, mean, rel);
        EXPECT(rel <= 1e-6, "%s: full %.9g vs mean of halves %.9g (rel %.2e)", terms[i].what, terms[i].full, mean, rel);
    }
    EXPECT(lf.aux > 0.0 && lf.mtp > 0.0, "aux %g mtp %g: the test needs both terms", lf.aux, lf.mtp);
    EXPECT(memcmp(counts_full, counts_acc, (size_t)(n_moe * E) * sizeof(int64_t)) == 0,
           "expert counts of the full batch differ from the sum of the halves'");

    // every optimised tensor must have a gradient, or the comparison proves nothing
    int zero_rows = 0;
    for (int r = 0; r < tab->n_rows; r++) {
        const nm_tensor_spec *s = &tab->rows[r];
        if (s->flags & (NM_TENSOR_TIED | NM_TENSOR_ROUTER_BIAS)) continue;
        double sq = 0.0;
        for (int64_t i = 0; i < s->numel; i++) sq += (double)g_full[s->offset + i] * g_full[s->offset + i];
        if (sq == 0.0) {
            // an expert no token chose has no gradient; anything else must have one
            if (!(s->flags & NM_TENSOR_EXPERT)) fprintf(stderr, "no gradient in %s\n", s->name), failures++;
            zero_rows++;
        }
    }
    const char *worst_name;
    double worst = worst_row(tab, g_full, g_acc, NM_TENSOR_ROUTER_BIAS, &worst_name);
    printf("gradients: worst per-tensor relative L2 %.2e (%s); %d expert tensors without tokens\n", worst,
           worst_name, zero_rows);
    EXPECT(worst <= 1e-5, "accumulated gradient of %s differs by %.2e relative L2", worst_name, worst);
    for (size_t i = 0; i < nf; i++) {
        if (!isfinite(g_full[i]) || !isfinite(g_acc[i])) {
            EXPECT(0, "non-finite gradient at float %zu", i);
            break;
        }
    }

    // --- 4. a pair's second model (nm_model_create_pair: the trainer's moe_pair_micro_batches) --
    // The second half's forward on the pair before the first half's backward, as the paired
    // schedule runs them: the same gradients, losses and counts as one model, bit for bit, in
    // fp32 and in bf16 (the pair reads the first model's bf16 weight copy).
    check_pair(m, tokens, &half_opt, g_acc, lh, counts_acc, n_moe * E);

    // --- 2. one AdamW step after each --------------------------------------------------------
    nm_adamw_config acfg = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
    nm_optimizer *o1, *o2;
    if (nm_optimizer_create(&o1, tab, &acfg, test_backend("cpu"), &err) != 0 || nm_optimizer_create(&o2, tab, &acfg, test_backend("cpu"), &err) != 0) {
        fprintf(stderr, "optimizer: %s\n", err.msg);
        return 1;
    }
    float *p1 = malloc(nf * sizeof(float)), *p2 = malloc(nf * sizeof(float));
    memcpy(p1, params, nf * sizeof(float));
    memcpy(p2, params, nf * sizeof(float));
    nm_grad_report r1, r2;
    nm_optimizer_prepare_grads(o1, g_full, 1.0, &r1);
    nm_optimizer_prepare_grads(o2, g_acc, 1.0, &r2);
    EXPECT(r1.finite && r2.finite, "non-finite gradients");
    EXPECT(fabs(r1.norm - r2.norm) <= 1e-6 * r1.norm, "grad norm %.9g vs %.9g", r1.norm, r2.norm);
    nm_optimizer_step(o1, p1, g_full, 1e-3);
    nm_optimizer_step(o2, p2, g_acc, 1e-3);
    double pworst = worst_row(tab, p1, p2, 0, &worst_name);
    double moved = worst_row(tab, params, p1, NM_TENSOR_ROUTER_BIAS, &(const char *){NULL});
    printf("after AdamW: worst per-tensor relative L2 of the parameters %.2e (%s); the step moved them up to %.2e\n",
           pworst, worst_name, moved);
    EXPECT(pworst <= 1e-5, "parameters after AdamW differ in %s by %.2e relative L2", worst_name, pworst);
    EXPECT(moved > 1e-3, "the AdamW step hardly moved the parameters (%.2e)", moved);
    double mworst = worst_row(tab, o1->m, o2->m, NM_TENSOR_ROUTER_BIAS, &worst_name);
    EXPECT(mworst <= 1e-5, "AdamW first moment differs in %s by %.2e", worst_name, mworst);

    // --- 3. bias update direction -------------------------------------------------------------
    const int *ids;
    nm_model_expert_counts(m, &n_moe, &ids);
    const float gamma = 0.001f;
    int n_over = 0, n_under = 0, n_equal = 0;
    float *old_bias = malloc((size_t)E * sizeof(float));
    for (int l = 0; l < n_moe; l++) {
        float *bias = params + tab->layers[ids[l]].router_bias;
        const int64_t *c = counts_full + (size_t)l * E;
        int64_t sum = 0;
        for (int64_t i = 0; i < E; i++) sum += c[i];
        EXPECT(sum == (int64_t)B * (ids[l] < cfg.L ? T : T - 1) * cfg.K, "layer %d: %lld selections", ids[l],
               (long long)sum);
        memcpy(old_bias, bias, (size_t)E * sizeof(float));
        test_backend("cpu")->router_bias_update(test_backend("cpu"), bias, c, E, gamma);
        for (int64_t i = 0; i < E; i++) {
            // mean = sum/E; compare counts*E with sum to classify exactly
            int64_t d = sum - c[i] * E;
            float want = d > 0 ? old_bias[i] + gamma : (d < 0 ? old_bias[i] - gamma : old_bias[i]);
            n_over += d < 0;
            n_under += d > 0;
            n_equal += d == 0;
            EXPECT(bias[i] == want, "layer %d expert %lld: count %lld (mean %.2f): bias %.9g -> %.9g, want %.9g",
                   ids[l], (long long)i, (long long)c[i], (double)sum / (double)E, old_bias[i], bias[i], want);
        }
    }
    printf("bias update: %d overloaded experts -gamma, %d underloaded +gamma, %d at the mean unchanged\n", n_over,
           n_under, n_equal);
    EXPECT(n_over > 0 && n_under > 0, "the test needs both overloaded and underloaded experts");

    // A large gamma must shift load away from the overloaded experts in the next forward.
    // (params still hold the initial values, biases plus the gamma update above)
    for (int l = 0; l < n_moe; l++) {
        float *bias = params + tab->layers[ids[l]].router_bias;
        test_backend("cpu")->router_bias_update(test_backend("cpu"), bias, counts_full + (size_t)l * E, E, 0.5f);
    }
    if (nm_model_forward(m, tokens, B, T, &full_opt, &lf, NULL, &err) != 0) {
        fprintf(stderr, "forward after the bias update: %s\n", err.msg);
        return 1;
    }
    const int64_t *after = nm_model_expert_counts(m, NULL, NULL);
    for (int l = 0; l < n_moe; l++) {
        const int64_t *c = counts_full + (size_t)l * E, *a = after + (size_t)l * E;
        int64_t sum = 0, over_before = 0, over_after = 0;
        for (int64_t i = 0; i < E; i++) sum += c[i];
        for (int64_t i = 0; i < E; i++) {
            if (c[i] * E > sum) {
                over_before += c[i];
                over_after += a[i];
            }
        }
        printf("  layer %d: tokens on the overloaded experts %lld -> %lld after a gamma = 0.5 update\n", ids[l],
               (long long)over_before, (long long)over_after);
        EXPECT(over_after < over_before, "layer %d: load on the overloaded experts did not drop (%lld -> %lld)",
               ids[l], (long long)over_before, (long long)over_after);
    }

    free(old_bias);
    free(p1);
    free(p2);
    free(g_full);
    free(g_acc);
    free(counts_full);
    free(counts_acc);
    nm_optimizer_destroy(o1);
    nm_optimizer_destroy(o2);
    nm_model_destroy(m);
    nm_model_config_free(&cfg);
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("PASS test_accumulation\n");
    return 0;
}
