// test_recompute.c: activation recomputation, whole blocks (recompute) and selective (the MLA
// up-projections, the routed experts' SwiGLU, the blocks' norm outputs, and all three), gives
// bit-identical losses and gradients with less activation memory, in fp32 and in bf16.
//
// Recomputation re-runs each block's forward inside the backward with the same inputs and
// the same deterministic kernels, so the result must be identical to the bit, not merely
// close; the memory saving is printed (it is the point of the feature) and must be real.
#include <stdio.h>
#include <string.h>

#include "core/rng.h"
#include "model/model.h"
#include "test_model_util.h"
#include "test_backend.h"


// mode 0: keep everything; 1: recompute whole blocks; 2: recompute the MLA up-projections;
// 3: the routed experts' SwiGLU; 4: both; 5: the norm outputs (layernorm); 6: all three.
static int run(int mode, nm_precision precision, const nm_model_config *cfg, const int32_t *tokens, int64_t B,
               int64_t T, float *grads_out, double *loss_out, size_t *act_bytes) {
    nm_error err;
    nm_model *m;
    nm_model_options o = {.recompute = mode == 1, .recompute_mla_up_proj = mode == 2 || mode == 4 || mode == 6,
                          .recompute_moe_act = mode == 3 || mode == 4 || mode == 6,
                          .recompute_layernorm = mode >= 5, .precision = precision};
    if (nm_model_create_ex(&m, cfg, test_backend("cpu"), B, T, &o, &err) != 0 ||
        nm_model_set_precision(m, precision, &err) != 0) {
        fprintf(stderr, "create: %s\n", err.msg);
        return -1;
    }
    nm_params_init(nm_model_params(m), nm_model_table(m), cfg, 7);
    nm_loss_options opt = {.mtp_weight = 0.3f, .aux_weight = 0.01f, .grad_scale = 1.0f};
    nm_loss_terms loss;
    nm_model_zero_grads(m);
    if (nm_model_forward(m, tokens, B, T, &opt, &loss, NULL, &err) != 0 || nm_model_backward(m, &err) != 0) {
        fprintf(stderr, "fb: %s\n", err.msg);
        nm_model_destroy(m);
        return -1;
    }
    memcpy(grads_out, nm_model_grads(m), nm_model_table(m)->n_floats * sizeof(float));
    *loss_out = loss.loss;
    *act_bytes = nm_model_activation_bytes(m);
    nm_model_destroy(m);
    return 0;
}

int main(void) {
    nm_model_config cfg;
    nm_param_table t;
    if (test_model_open(&cfg, &t, "test_recompute") != 0) return 1;
    const int64_t B = 3, T = 24;
    int32_t tokens[3 * 24];
    uint64_t key = nm_rng_key(11, NM_RNG_TEST, 0, 0);
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)(nm_rng_u64(key, (uint64_t)i) % (uint64_t)cfg.V);
    float *g0 = nm_calloc(t.n_floats, sizeof(float)), *g1 = nm_calloc(t.n_floats, sizeof(float));
    int fail = 0;
    const char *names[7] = {"", "recomputation", "selective recomputation (mla_up_proj)",
                            "selective recomputation (moe_act)", "selective recomputation (mla_up_proj, moe_act)",
                            "selective recomputation (layernorm)",
                            "selective recomputation (mla_up_proj, moe_act, layernorm)"};
    // the saving each mode must at least make, about half of what it measured: whole blocks
    // (40.3%), the up-projections' outputs, q and kv of this model's 2 heads (5.2%), the
    // experts' SwiGLU outputs (2.2%), both (7.4%), the norm outputs (5.9%), all three (13.3%)
    const double most[7] = {0, 0.80, 0.975, 0.99, 0.965, 0.97, 0.935};
    // fp8 keeps the experts' SwiGLU inputs in fp8 and makes the output again in every mode
    // (DeepSeek-V3's recipe), so moe_act saves nothing more there: exactly the bytes without it
    // (mode 3), and modes 4 and 6 at least what mla_up_proj, or layernorm, saves alone
    const double most_fp8[7] = {0, 0.80, 0.975, 1.0, 0.975, 0.97, 0.97};
    // bf16 and fp8 keep part of what they save in their own dtype without recomputation (the
    // GEMM-only activations in bf16, the experts' inputs in fp8): whole-block recomputation,
    // which keeps none of it, checks those copies bit for bit
    const char *pname[3] = {"fp32", "bf16", "fp8"};
    for (int prec = 0; prec < 3 && !fail; prec++) {
        nm_precision p = prec == 2 ? NM_PRECISION_FP8 : prec ? NM_PRECISION_BF16 : NM_PRECISION_FP32;
        double l0, l1;
        size_t bytes0, bytes1;
        fail = run(0, p, &cfg, tokens, B, T, g0, &l0, &bytes0);
        for (int mode = 1; mode <= 6 && !fail; mode++) {
            fail = run(mode, p, &cfg, tokens, B, T, g1, &l1, &bytes1);
            if (fail) break;
            if (l0 != l1) {
                fprintf(stderr, "FAIL: %s: loss %.17g vs %.17g with %s\n", pname[prec], l0, l1, names[mode]);
                fail = 1;
            }
            for (int r = 0; r < t.n_rows && !fail; r++) {
                const nm_tensor_spec *s = &t.rows[r];
                if (s->flags & NM_TENSOR_TIED) continue;
                if (memcmp(g0 + s->offset, g1 + s->offset, (size_t)s->numel * sizeof(float)) != 0) {
                    fprintf(stderr, "FAIL: %s: gradient of %s differs with %s\n", pname[prec], s->name, names[mode]);
                    fail = 1;
                }
            }
            printf("%s activations: %.2f MiB stored, %.2f MiB with %s (%.1f%% saved)\n", pname[prec],
                   bytes0 / 1048576.0, bytes1 / 1048576.0, names[mode], 100.0 * (1.0 - (double)bytes1 / (double)bytes0));
            int moe_act_only_fp8 = p == NM_PRECISION_FP8 && mode == 3;
            const double *at_most = p == NM_PRECISION_FP8 ? most_fp8 : most;
            if (moe_act_only_fp8 ? bytes1 != bytes0 : !(bytes1 < bytes0 * at_most[mode])) {
                fprintf(stderr, "FAIL: %s: %s saved %s memory\n", pname[prec], names[mode],
                        moe_act_only_fp8 ? "some (fp8 keeps no act per block anyway)" : "too little");
                fail = 1;
            }
        }
    }
    nm_free(g0);
    nm_free(g1);
    test_model_close(&cfg, &t);
    if (!fail) printf("OK: recomputation, whole and selective, is bit-identical in fp32, bf16 and fp8\n");
    return fail;
}
