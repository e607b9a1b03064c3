// fuzz_model_config.c: libFuzzer target for the HF config.json parser (src/model/config.c).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: the config.json text. Whatever the bytes, parsing must not crash, leak or hit UB; an
// accepted config must give finite rotary frequencies and a layer-kind answer for every layer.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    nm_model_config cfg;
    nm_error err;
    if (nm_model_config_parse(&cfg, text, "fuzz/config.json", &err) == 0) {
        if (cfg.Dr > 0 && cfg.Dr <= 1 << 16) {
            double *f = malloc(sizeof(double) * (size_t)(cfg.Dr / 2 + 1));
            nm_rope_inv_freq(&cfg, f);
            for (int64_t i = 0; i < cfg.Dr / 2; i++) {
                if (!isfinite(f[i])) abort();   // a validated config must give finite frequencies
            }
            free(f);
        }
        for (int64_t l = 0; l < cfg.n_layers && l < 4096; l++) (void)nm_layer_is_moe(&cfg, l);
        nm_model_config_free(&cfg);
    } else if (getenv("NM_FUZZ_VERBOSE")) {
        fprintf(stderr, "rejected: %s\n", err.msg);
    }
    free(text);
    return 0;
}
