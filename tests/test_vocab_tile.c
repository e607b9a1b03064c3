// test_vocab_tile.c: the output head computed over vocabulary tiles (the (N, V) logits never
// stored whole, each tile's logits recomputed in the backward) gives the losses, logits and
// gradients of the untiled head, in fp32, bf16 and fp8, with a remainder tile, and needs less
// activation memory.
//
// Tolerance. The same products are summed in the same order per element (a logit is one
// dot product over D whatever the tile), so the logits and the per-row log-sum-exp agree to
// a few ulps; what changes is the order of the sums across tiles: the exp-sum is combined
// tile by tile (rescaled in double), and dh = dlogits . W accumulates tile after tile in fp32
// (4-5 tiles here: a few ulps of each term's size). We allow 2e-6 relative on the loss terms
// and 1e-5 on the logits (relative to each row's largest), and per gradient tensor 1e-5 relative L2 in fp32. In bf16
// and fp8 the few-ulp differences of dlogits and dh reach GEMM inputs that are rounded to
// bf16 / fp8, where an element next to a rounding boundary flips by a whole ulp (2^-8 in
// bf16, 2^-3 in E4M3), and the blocks' gradients then differ by that noise (measured up to
// 2.6e-3 relative L2 in bf16, 4.7e-2 in fp8): there the test checks the losses, the logits
// and the head's own gradient (lm_head.weight, a bf16 GEMM in both recipes) to 2e-2. Dropping
// a tile or using a stale lse gives errors of order 1.
#include <math.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "core/rng.h"
#include "model/model.h"
#include "test_model_util.h"
#include "train/train_config.h"


#include "test_util.h"
#include "test_backend.h"

typedef struct result {
    nm_loss_terms loss;
    float *grads, *logits;
    size_t act_bytes;
} result;

static int run(int64_t vocab_tile, nm_precision prec, const nm_model_config *cfg, const int32_t *tokens, int64_t B,
               int64_t T, result *r) {
    nm_error err;
    nm_model *m;
    nm_model_options o = {.vocab_tile = vocab_tile};
    if (nm_model_create_ex(&m, cfg, test_backend("cpu"), B, T, &o, &err) != 0 || nm_model_set_precision(m, prec, &err) != 0) {
        fprintf(stderr, "create: %s\n", err.msg);
        return -1;
    }
    nm_params_init(nm_model_params(m), nm_model_table(m), cfg, 7);
    nm_loss_options opt = {.mtp_weight = 0.3f, .aux_weight = 0.01f, .grad_scale = 1.0f};
    nm_model_zero_grads(m);
    if (nm_model_forward(m, tokens, B, T, &opt, &r->loss, r->logits, &err) != 0 || nm_model_backward(m, &err) != 0) {
        fprintf(stderr, "forward/backward: %s\n", err.msg);
        nm_model_destroy(m);
        return -1;
    }
    memcpy(r->grads, nm_model_grads(m), nm_model_table(m)->n_floats * sizeof(float));
    r->act_bytes = nm_model_activation_bytes(m);
    nm_model_destroy(m);
    return 0;
}

static double rel(double a, double b) { return fabs(a - b) / (fabs(b) + 1e-30); }

int main(void) {
    // test_vocab_tile_onednn needs oneDNN's bf16 matmul, which needs AVX-512 (absent under
    // valgrind, which does not decode it): skip as test_gemm_bf16 does.
    const char *bf16_kernel = getenv("NM_CPU_BF16_GEMM");
    if (bf16_kernel && strcmp(bf16_kernel, "onednn") == 0 &&
        (dnnl_get_effective_cpu_isa() & dnnl_cpu_isa_avx512_core) != dnnl_cpu_isa_avx512_core) {
        return test_skip_machine("NM_CPU_BF16_GEMM=onednn and oneDNN reports no bf16-capable ISA on this CPU "
                                 "(AVX-512 needed)");
    }
    nm_model_config cfg;
    nm_param_table t;
    if (test_model_open(&cfg, &t, "test_vocab_tile") != 0) return 1;
    const int64_t B = 3, T = 24, N = B * T;
    int32_t tokens[3 * 24];
    uint64_t key = nm_rng_key(test_seed("test_vocab_tile"), NM_RNG_TEST, 0, 0);
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)(nm_rng_u64(key, (uint64_t)i) % (uint64_t)cfg.V);
    const nm_precision precs[3] = {NM_PRECISION_FP32, NM_PRECISION_BF16, NM_PRECISION_FP8};
    const int64_t tiles[2] = {64, 128};  // 300 = 4 x 64 + 44, 2 x 128 + 44
    for (int p = 0; p < 3; p++) {
        result whole = {.grads = nm_calloc(t.n_floats, sizeof(float)), .logits = nm_calloc((size_t)(N * cfg.V), sizeof(float))};
        EXPECT(run(0, precs[p], &cfg, tokens, B, T, &whole) == 0, "untiled run");
        for (int k = 0; k < 2; k++) {
            result tiled = {.grads = nm_calloc(t.n_floats, sizeof(float)),
                            .logits = nm_calloc((size_t)(N * cfg.V), sizeof(float))};
            EXPECT(run(tiles[k], precs[p], &cfg, tokens, B, T, &tiled) == 0, "tiled run");
            double e_loss = fmax(rel(tiled.loss.ce, whole.loss.ce), rel(tiled.loss.mtp, whole.loss.mtp));
            double e_logit = 0.0, e_grad = 0.0;
            int checked = 0;
            const char *worst = "";
            // per row, relative to the row's largest logit: a GEMM library may block a slice's
            // dot products differently (e.g. OpenBLAS's FMA kernels), which moves a logit by ulps
            // of the products' size, not of its own (a logit near 0 is a sum that cancelled)
            for (int64_t n = 0; n < N; n++) {
                double row_max = 0.0;
                for (int64_t v = 0; v < cfg.V; v++) row_max = fmax(row_max, fabs(whole.logits[n * cfg.V + v]));
                for (int64_t v = 0; v < cfg.V; v++)
                    e_logit = fmax(e_logit, fabs(tiled.logits[n * cfg.V + v] - whole.logits[n * cfg.V + v]) / row_max);
            }
            for (int r = 0; r < t.n_rows; r++) {
                const nm_tensor_spec *s = &t.rows[r];
                if (s->flags & NM_TENSOR_TIED) continue;
                if (precs[p] != NM_PRECISION_FP32 && strcmp(s->name, "lm_head.weight") != 0) continue;
                double d = 0.0, n = 0.0;
                for (int64_t i = 0; i < s->numel; i++) {
                    double a = tiled.grads[s->offset + i], b = whole.grads[s->offset + i];
                    d += (a - b) * (a - b), n += b * b;
                }
                double e = n > 0 ? sqrt(d / n) : sqrt(d);
                if (e > e_grad || !*worst) e_grad = e, worst = s->name;
                checked++;
            }
            printf("%s, tile %lld: loss rel err %.2e, logits %.2e, worst checked gradient rel L2 %.2e (%s); "
                   "activations %.2f -> %.2f MiB\n", nm_precision_name(precs[p]), (long long)tiles[k], e_loss, e_logit,
                   e_grad, worst, whole.act_bytes / 1048576.0, tiled.act_bytes / 1048576.0);
            EXPECT(e_loss < 2e-6, "%s tile %lld: loss rel err %.3e", nm_precision_name(precs[p]), (long long)tiles[k], e_loss);
            EXPECT(e_logit < 1e-5, "%s tile %lld: logits err %.3e", nm_precision_name(precs[p]), (long long)tiles[k], e_logit);
            double grad_tol = precs[p] == NM_PRECISION_FP32 ? 1e-5 : 2e-2;
            EXPECT(e_grad < grad_tol, "%s tile %lld: gradient of %s rel L2 %.3e", nm_precision_name(precs[p]),
                   (long long)tiles[k], worst, e_grad);
            EXPECT(checked > 0, "no gradient compared");
            EXPECT(tiled.act_bytes < whole.act_bytes, "tiling saved no activation memory");
            nm_free(tiled.grads), nm_free(tiled.logits);
        }
        nm_free(whole.grads), nm_free(whole.logits);
    }
    test_model_close(&cfg, &t);
    if (failures) return 1;
    printf("OK: the vocabulary-tiled head matches the untiled one\n");
    return 0;
}
