// fuzz_quant_config.c: libFuzzer target for config.json's quantization_config (quant_method,
// fmt, weight_block_size; read by src/io/hf_dir.c when it loads DeepSeek's FP8 release), with
// the rest of config.json as src/model/config.c parses it, the two reads a command makes of
// one model directory (nm_hf_dir_load_config, then nm_hf_dir_load_model).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: the config.json text. Beside it, made once per process, model.safetensors holds
// fuzz_hf.h's one-layer model with every matrix F8_E4M3 and a single [1, 1] block scale each,
// which is right for every weight_block_size of at least 32 x 32 (the largest matrix), so a
// config reaches the dequantisation. Whatever the bytes, parsing and loading must not crash,
// leak or hit UB, and the check-only load (params NULL) must accept what the full one accepts.
#include "fuzz_hf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256];
static nm_model_config cfg;
static nm_param_table table;
static float *params;           // (n_floats)
static const char *const files[2] = {"config.json", "model.safetensors"};

static void cleanup(void) { fuzz_hf_rmdir(dir, files, 2); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        fuzz_hf_mkdtemp(dir, sizeof(dir), "fuzz_quant_config");
        atexit(cleanup);
        fuzz_hf_model(&cfg, &table);
        params = malloc(table.n_floats * sizeof(float));
        static fuzz_st s;
        for (int r = 0; r < table.n_rows; r++) fuzz_st_add_row(&s, NULL, &table, r, 1, 128, 128);
        fuzz_st_write(&s, dir, "model.safetensors");
    }
    fuzz_hf_write(dir, "config.json", data, size);
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    nm_model_config parsed;
    nm_error err;
    if (nm_model_config_parse(&parsed, text, "fuzz/config.json", &err) == 0) {
        nm_model_config_free(&parsed);
    } else if (getenv("NM_FUZZ_VERBOSE")) {
        fprintf(stderr, "config rejected: %s\n", err.msg);
    }
    free(text);
    int full = nm_hf_dir_load_model(dir, &table, &cfg, 7, params, &err);
    if (full != 0 && getenv("NM_FUZZ_VERBOSE")) fprintf(stderr, "load rejected: %s\n", err.msg);
    int check = nm_hf_dir_load_params(dir, &table, NULL, &err);
    if (full == 0 && check != 0) {
        fprintf(stderr, "fuzz_quant_config: the full load accepted what the check-only load refused: %s\n", err.msg);
        abort();
    }
    return 0;
}
