// test_recompute.c: activation recomputation gives bit-identical losses and gradients with
// less activation memory.
//
// Recomputation re-runs each block's forward inside the backward with the same inputs and
// the same deterministic kernels, so the result must be identical to the bit, not merely
// close; the memory saving is printed (it is the point of the feature) and must be real.
#include <stdio.h>
#include <string.h>

#include "core/rng.h"
#include "model/model.h"
#include "test_model_util.h"


static int run(int recompute, const nm_model_config *cfg, const int32_t *tokens, int64_t B, int64_t T,
               float *grads_out, double *loss_out, size_t *act_bytes) {
    nm_error err;
    nm_model *m;
    nm_model_options o = {.recompute = recompute};
    if (nm_model_create_ex(&m, cfg, nm_ops_cpu(), B, T, &o, &err) != 0) {
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
    double l0, l1;
    size_t bytes0, bytes1;
    int fail = run(0, &cfg, tokens, B, T, g0, &l0, &bytes0) || run(1, &cfg, tokens, B, T, g1, &l1, &bytes1);
    if (!fail) {
        if (l0 != l1) {
            fprintf(stderr, "FAIL: loss %.17g vs %.17g with recomputation\n", l0, l1);
            fail = 1;
        }
        for (int r = 0; r < t.n_rows && !fail; r++) {
            const nm_tensor_spec *s = &t.rows[r];
            if (s->flags & NM_TENSOR_TIED) continue;
            if (memcmp(g0 + s->offset, g1 + s->offset, (size_t)s->numel * sizeof(float)) != 0) {
                fprintf(stderr, "FAIL: gradient of %s differs with recomputation\n", s->name);
                fail = 1;
            }
        }
        printf("activations: %.2f MiB stored, %.2f MiB with recomputation (%.0f%% saved)\n", bytes0 / 1048576.0,
               bytes1 / 1048576.0, 100.0 * (1.0 - (double)bytes1 / (double)bytes0));
        if (!(bytes1 < bytes0 * 0.75)) {
            fprintf(stderr, "FAIL: recomputation saved too little memory\n");
            fail = 1;
        }
    }
    nm_free(g0);
    nm_free(g1);
    test_model_close(&cfg, &t);
    if (!fail) printf("OK: recomputation is bit-identical\n");
    return fail;
}
