// fuzz_train_config.c: libFuzzer target for the training-config parser (src/train/train_config.c),
// `--set` overrides included.
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: NUL-separated parts: the JSON text, then up to 8 overrides "a.b=value". Whatever the
// bytes, parsing must not crash, leak or hit UB; an accepted config must print as JSON that
// parses back (nm_train_config_to_json's promise).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/train_config.h"
#include "core/fileio.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size + 1);
    memcpy(buf, data, size);
    buf[size] = 0;
    const char *ov[8];
    int n_ov = 0;
    for (char *p = buf; p < buf + size && n_ov < 8; p++) {
        if (*p == 0) ov[n_ov++] = p + 1;
    }
    nm_train_config cfg;
    nm_error err;
    if (nm_train_config_parse(&cfg, buf, "fuzz-train.json", "fuzzdir", ov, n_ov, &err) == 0) {
        char *json = nm_train_config_to_json(&cfg);
        nm_train_config back;
        if (nm_train_config_parse(&back, json, "fuzz-back.json", NULL, NULL, 0, &err) != 0) {
            // The effective config must always read back.
            __builtin_trap();
        }
        nm_train_config_free(&back);
        nm_free(json);
        nm_train_config_free(&cfg);
    } else if (getenv("NM_FUZZ_VERBOSE")) {
        fprintf(stderr, "rejected: %s\n", err.msg);
    }
    free(buf);
    return 0;
}
