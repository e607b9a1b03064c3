// fuzz_fp8_block.c: libFuzzer target for the FP8 block reader of src/io/hf_dir.c (DeepSeek's
// FP8 release: F8_E4M3 matrices, each with a '<name>_scale_inv' tensor of one scale per
// weight_block_size block, dequantised on load), through nm_hf_dir_load_model on a model
// directory, as every command that reads a checkpoint calls it.
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: 2 bytes, then the model.safetensors file. The bytes are quantization_config's
// weight_block_size [rows, cols] written into config.json (fuzz_hf.h's one-layer model; both
// 0: no quantization_config, i.e. DeepSeek's 128 x 128), so blocks smaller than the tiny
// matrices, and not dividing them, are reached. Whatever the bytes, loading must not crash,
// leak or hit UB, and the check-only load (params NULL) must accept what the full load accepts.
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
        fuzz_hf_mkdtemp(dir, sizeof(dir), "fuzz_fp8_block");
        atexit(cleanup);
        fuzz_hf_model(&cfg, &table);
        params = malloc(table.n_floats * sizeof(float));
    }
    if (size < 2) return 0;
    char config[sizeof(FUZZ_HF_CONFIG) + 200];
    size_t n = strlen(FUZZ_HF_CONFIG) - 1;   // without the closing brace
    if (data[0] == 0 && data[1] == 0) {
        snprintf(config, sizeof(config), "%s", FUZZ_HF_CONFIG);
    } else {
        snprintf(config, sizeof(config), "%.*s, \"quantization_config\": {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", "
                 "\"activation_scheme\": \"dynamic\", \"weight_block_size\": [%d, %d]}}", (int)n, FUZZ_HF_CONFIG,
                 data[0], data[1]);
    }
    fuzz_hf_write(dir, "config.json", config, strlen(config));
    fuzz_hf_write(dir, "model.safetensors", data + 2, size - 2);
    nm_error err;
    int full = nm_hf_dir_load_model(dir, &table, &cfg, 7, params, &err);
    if (full != 0 && getenv("NM_FUZZ_VERBOSE")) fprintf(stderr, "rejected: %s\n", err.msg);
    int check = nm_hf_dir_load_params(dir, &table, NULL, &err);
    if (full == 0 && check != 0) {
        fprintf(stderr, "fuzz_fp8_block: the full load accepted what the check-only load refused: %s\n", err.msg);
        abort();
    }
    return 0;
}
