// train_loop.c: a complete training run through the public API only (design.md 9).
//
//   build/train_loop configs/tiny-train.json runs/example [steps]
#include <stdio.h>
#include <stdlib.h>

#include "nanomegatron.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TRAIN_CONFIG RUN_DIR [steps]\n", argv[0]);
        return 2;
    }
    char steps_override[64];
    const char *overrides[1];
    int n_overrides = 0;
    if (argc > 3) {
        snprintf(steps_override, sizeof(steps_override), "steps=%s", argv[3]);
        overrides[n_overrides++] = steps_override;
    }
    nm_error err;
    nm_train_config cfg;
    if (nm_train_config_load(&cfg, argv[1], overrides, n_overrides, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    nm_trainer_options opts = {.run_dir = argv[2], .quiet = 1};
    nm_trainer *t;
    if (nm_trainer_create(&t, &cfg, &opts, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        nm_train_config_free(&cfg);
        return 1;
    }
    nm_step_metrics m;
    int rc;
    while ((rc = nm_trainer_step(t, &m, &err)) > 0) {
        if (m.step % 10 == 0 || m.step == m.steps_total) {
            printf("step=%lld loss=%.4f grad_norm=%.3f tokens/s=%.0f\n", (long long)m.step, m.loss, m.grad_norm,
                   m.tokens_per_s);
        }
    }
    if (rc == 0 && nm_trainer_save(t, &err) != 0) rc = -1;
    if (rc < 0) fprintf(stderr, "%s\n", err.msg);
    nm_trainer_destroy(t);
    nm_train_config_free(&cfg);
    return rc < 0 ? 1 : 0;
}
