// cmd_forward.c: `nanomegatron forward`: one forward (and optionally backward) pass of a
// model directory on a token file, for inspection and for the reference tests.
//
//   forward --model DIR --tokens T.bin --batch B [--logits OUT] [--grads G.safetensors]
//           [--mtp-weight W] [--aux-weight A]
// T.bin is little-endian int32, B rows of equal length. Logits are float32 (B, T, V)
// row-major. The last stdout line is one JSON object with the loss terms.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "model_dir.h"
#include "commands.h"
#include "core/fileio.h"
#include "io/hf_dir.h"
#include "io/table_io.h"
#include "model/model.h"

static int fail(const nm_error *err) {
    // The model's own messages start "forward: " (they name the pass for train's messages).
    const char *msg = strncmp(err->msg, "forward: ", 9) ? err->msg : err->msg + 9;
    fprintf(stderr, "nanomegatron forward: %s\n", msg);
    return 1;
}

int nm_cmd_forward(int argc, char **argv) {
    static const char *const value_flags[] = {"model", "tokens", "batch", "logits", "grads", "mtp-weight", "aux-weight", NULL};
    nm_args a;
    if (nm_args_parse(&a, "forward", argc, argv, value_flags, NULL) != 0) return 2;
    const char *dir = nm_args_str(&a, "model", NULL), *tok_path = nm_args_str(&a, "tokens", NULL);
    int64_t B;
    double mtp_weight, aux_weight;
    if (!dir || !tok_path || !nm_args_has(&a, "batch")) {
        fprintf(stderr, "forward: --model, --tokens and --batch are required\n");
        return 2;
    }
    // The training config's bounds for micro_batch, mtp.weight and balance.aux_weight.
    if (nm_args_i64_in(&a, "batch", 1, 1, 1 << 24, &B) || nm_args_f64_in(&a, "mtp-weight", 0.3, 0, 1e3, &mtp_weight) ||
        nm_args_f64_in(&a, "aux-weight", 1e-4, 0, 1e3, &aux_weight)) return 2;

    nm_error err = {{0}};
    char *raw;
    size_t size;
    if (nm_file_read_all(tok_path, &raw, &size, &err) != 0) return fail(&err);
    if (size % 4 != 0 || size / 4 % (size_t)B != 0 || size / 4 / (size_t)B < 2) {
        fprintf(stderr, "forward: %s: %zu bytes is not %lld rows of >= 2 int32 tokens\n", tok_path, size, (long long)B);
        nm_free(raw);
        return 1;
    }
    int64_t T = (int64_t)(size / 4 / (size_t)B);
    int32_t *tokens = nm_malloc(size);
    memcpy(tokens, raw, size);  // little-endian host assumed (x86-64, aarch64)
    nm_free(raw);

    nm_model_config cfg;
    const nm_ops *ops = NULL;
    nm_model *m = NULL;
    int rc = 1;
    char model_dir[4400];
    if (nm_resolve_model_dir(dir, -1, model_dir, sizeof model_dir, NULL, 0, &err) != 0) {
        nm_free(tokens);
        return fail(&err);
    }
    dir = model_dir;
    if (nm_hf_dir_load_config(dir, &cfg, &err) != 0) {
        nm_free(tokens);
        return fail(&err);
    }
    // NM_BACKEND, else the CPU backend; destroyed after the model
    if (nm_backend_select(&ops, NULL, &err) != 0 || nm_model_create(&m, &cfg, ops, B, T, &err) != 0) goto done;
    if (nm_hf_dir_load_model(dir, nm_model_table(m), &cfg, 0, nm_model_params(m), &err) != 0) goto done;

    nm_loss_options opt = {.mtp_weight = (float)mtp_weight, .aux_weight = (float)aux_weight, .grad_scale = 1.0f};
    nm_loss_terms loss;
    const char *logits_path = nm_args_str(&a, "logits", NULL), *grads_path = nm_args_str(&a, "grads", NULL);
    float *logits = logits_path ? nm_malloc((size_t)(B * T * cfg.V) * sizeof(float)) : NULL;
    if (nm_model_forward(m, tokens, B, T, &opt, &loss, logits, &err) != 0) {
        nm_free(logits);
        goto done;
    }
    if (logits_path) {
        nm_atomic_file f;
        int bad = nm_atomic_open(&f, logits_path, &err) ||
                  nm_fwrite_all(f.fp, logits, (size_t)(B * T * cfg.V) * sizeof(float), logits_path, &err);
        if (bad) nm_atomic_abort(&f);
        else bad = nm_atomic_commit(&f, &err);
        nm_free(logits);
        if (bad) goto done;
    }
    if (grads_path) {
        nm_model_zero_grads(m);
        if (nm_model_backward(m, &err) != 0) goto done;
        if (nm_table_write_safetensors(grads_path, nm_model_table(m), nm_model_grads(m), &err) != 0) goto done;
    }
    printf("{\"loss\": %.9g, \"ce_loss\": %.9g, \"mtp_loss\": %.9g, \"aux_loss\": %.9g, \"tokens\": %lld}\n",
           loss.loss, loss.ce, loss.mtp, loss.aux, (long long)loss.tokens);
    rc = 0;
done:
    if (rc != 0) fail(&err);
    nm_model_destroy(m);
    nm_backend_destroy(ops);
    nm_model_config_free(&cfg);
    nm_free(tokens);
    return rc;
}
