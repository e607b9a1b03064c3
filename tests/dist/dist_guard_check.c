// dist_guard_check.c: what each rank decided, for tests/test_dist_faults.sh.
//
//   mpirun -np N dist_guard_check CONFIG RUN_DIR NAN_STEP [key=value...]
//
// Trains CONFIG into RUN_DIR (metrics.jsonl as `train` writes it) with the divergence guard's
// test hook poisoning a gradient at NAN_STEP (0: never; NM_TEST_INJECT_NAN_RANK=R: on rank R
// only), then each rank writes RUN_DIR/rank_<r>.txt: the steps it skipped and the CRC-32C of
// its whole parameter buffer. Every rank holds all the parameters after the ZeRO-1
// all-gather, so at data parallelism equal files mean every rank skipped the same steps and
// ended with the same weights; `train` alone cannot show that (only rank 0 logs).
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/fileio.h"
#include "nanomegatron.h"

// The guard's test hook, installed in the trainer: a NaN in one gradient of the first block at
// step *ctx, on every rank or on NM_TEST_INJECT_NAN_RANK's rank only.
static int nan_at(void *ctx, nm_model *model, int64_t step, nm_error *err) {
    (void)err;
    const char *only = getenv("NM_TEST_INJECT_NAN_RANK");
    int rank, world;
    nm_comm_job_position(&rank, &world);
    if (step != *(const int64_t *)ctx || (only && *only && atoi(only) != rank)) return 0;
    size_t off = nm_model_table(model)->layers[0].input_norm;
    if (off != NM_OFF_NONE) nm_model_grads(model)[off] = NAN;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: dist_guard_check CONFIG RUN_DIR NAN_STEP [key=value...]\n");
        return 2;
    }
    const char *overrides[64];
    int n_over = 0;
    for (int i = 4; i < argc && n_over < 64; i++) overrides[n_over++] = argv[i];
    nm_error err;
    nm_train_config cfg;
    if (nm_train_config_load(&cfg, argv[1], overrides, n_over, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int64_t nan_step = atoll(argv[3]);
    nm_trainer_options opts = {.run_dir = argv[2], .quiet = 1, .before_backward = nan_step > 0 ? nan_at : NULL,
                               .hook_ctx = &nan_step};
    nm_trainer *t;
    if (nm_trainer_create(&t, &cfg, &opts, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    char skipped[4096] = "";
    size_t used = 0;
    nm_step_metrics m;
    int s;
    while ((s = nm_trainer_step(t, &m, &err)) > 0) {
        if (m.skipped && used < sizeof(skipped) - 32)
            used += (size_t)snprintf(skipped + used, sizeof(skipped) - used, " %" PRId64, m.step);
    }
    if (s < 0 || nm_trainer_finish(t, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int rank, world;
    nm_comm_job_position(&rank, &world);
    nm_model *model = nm_trainer_model(t);
    size_t n = nm_model_table(model)->n_floats;
    uint32_t crc = nm_crc32c(0, nm_model_params(model), n * sizeof(float));
    char path[4200];
    snprintf(path, sizeof(path), "%s/rank_%d.txt", argv[2], rank);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return 1;
    }
    fprintf(f, "skipped steps:%s\nparameters: %zu floats, crc32c %08x\n", skipped[0] ? skipped : " none", n, crc);
    int bad = fclose(f) != 0;
    nm_trainer_destroy(t);
    nm_train_config_free(&cfg);
    return bad;
}
