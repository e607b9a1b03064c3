// fuzz_trainer_json.c: libFuzzer target for the checkpoint's trainer.json reader
// (nm_checkpoint_verify_trainer in src/train/checkpoint.c), and the training config it
// carries (read back with nm_train_config_parse, as a resumed run does).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: the trainer.json text. The files it lists are four small fixed files in a
// temporary directory made once per process (config.json "{}", model.safetensors "m",
// optim_m.safetensors "mm", optim_v.safetensors "vvv"), so a seed can carry their real sizes
// and CRCs and the fuzzer can reach the code after the checks.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train/checkpoint.h"
#include "train/train_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256];
static const char *const names[4] = {"config.json", "model.safetensors", "optim_m.safetensors", "optim_v.safetensors"};
static const char *const bodies[4] = {"{}", "m", "mm", "vvv"};

static void cleanup(void) {
    char p[400];
    for (int i = 0; i < 4; i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        snprintf(dir, sizeof(dir), "%s/fuzz_ckpt.XXXXXX", tmp);
        if (!mkdtemp(dir)) abort();
        for (int i = 0; i < 4; i++) {
            char p[400];
            snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
            FILE *fp = fopen(p, "wb");
            if (!fp || fputs(bodies[i], fp) < 0 || fclose(fp) != 0) abort();
        }
        atexit(cleanup);
    }
    // Exact-size heap copy without a NUL, so ASan catches a read past the text.
    char *text = malloc(size ? size : 1);
    memcpy(text, data, size);
    nm_ckpt_state st;
    nm_error err;
    if (nm_checkpoint_verify_trainer(dir, text, size, &st, &err) == 0) {
        if (st.train_config_json) {
            nm_train_config cfg;
            if (nm_train_config_parse(&cfg, st.train_config_json, "trainer.json:train_config", NULL, NULL, 0, &err) == 0) {
                nm_train_config_free(&cfg);
            }
        }
        nm_ckpt_state_free(&st);
    } else if (getenv("NM_FUZZ_VERBOSE")) {
        fprintf(stderr, "rejected: %s\n", err.msg);
    }
    free(text);
    return 0;
}
