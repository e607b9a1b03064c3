// fuzz_hf_index.c: libFuzzer target for the index of a sharded Hugging Face checkpoint,
// model.safetensors.index.json (its weight_map, as src/io/hf_dir.c's open_sharded reads it),
// through the loader every command that reads a checkpoint calls (nm_hf_dir_load_model).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: the index text. The directory around it is made once per process: config.json
// (fuzz_hf.h's one-layer model) and two shards, model-00001-of-00002.safetensors (rows 0-6 of
// the parameter table, F32, and the block scales of down_proj) and model-00002-of-00002 (rows
// 7-14, o_proj and down_proj as F8_E4M3, o_proj's scales), so an index can pair an FP8 weight
// with scales in another shard. seeds.py writes the index that matches them.
// Whatever the bytes, loading must not crash, leak or hit UB; an accepted index must give
// exactly the parameters the correct index gives (the shards hold each tensor once, so no
// index can legitimately change a value), and the check-only load (params NULL) must accept
// what the full load accepts.
#include "fuzz_hf.h"

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256];
static nm_model_config cfg;
static nm_param_table table;
static float *ref, *params;     // (n_floats) the correct index's load; this input's
static const char *const shards[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
static const char *const files[4] = {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors"};

static void cleanup(void) { fuzz_hf_rmdir(dir, files, 4); }

// The correct weight_map of the two shards, from their own headers.
static char *correct_index(void) {
    size_t cap = 16384, len = 0;
    char *s = malloc(cap);
    len += (size_t)snprintf(s, cap, "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {");
    int first = 1;
    for (int f = 0; f < 2; f++) {
        char p[512];
        snprintf(p, sizeof(p), "%s/%s", dir, shards[f]);
        nm_safetensors *st;
        nm_error err;
        if (nm_safetensors_open(&st, p, &err)) {
            fprintf(stderr, "fuzz_hf_index: fixture shard: %s\n", err.msg);
            abort();
        }
        for (int k = 0; k < nm_safetensors_count(st); k++) {
            len += (size_t)snprintf(s + len, cap - len, "%s\"%s\": \"%s\"", first ? "" : ", ",
                                    nm_safetensors_name(st, k), shards[f]);
            first = 0;
        }
        nm_safetensors_close(st);
    }
    snprintf(s + len, cap - len, "}}");
    return s;
}

static void setup(void) {
    fuzz_hf_mkdtemp(dir, sizeof(dir), "fuzz_hf_index");
    atexit(cleanup);
    fuzz_hf_model(&cfg, &table);
    fuzz_hf_write(dir, "config.json", FUZZ_HF_CONFIG, strlen(FUZZ_HF_CONFIG));
    static fuzz_st s1, s2;
    for (int r = 0; r < table.n_rows; r++) {
        const char *nm = table.rows[r].name;
        int fp8 = strstr(nm, "o_proj") || strstr(nm, "down_proj");
        fuzz_st_add_row(r < 7 ? &s1 : &s2, strstr(nm, "down_proj") ? &s1 : NULL, &table, r, fp8, 128, 128);
    }
    fuzz_st_write(&s1, dir, shards[0]);
    fuzz_st_write(&s2, dir, shards[1]);
    ref = malloc(table.n_floats * sizeof(float));
    params = malloc(table.n_floats * sizeof(float));
    char *index = correct_index();
    fuzz_hf_write(dir, "model.safetensors.index.json", index, strlen(index));
    free(index);
    nm_error err;
    if (nm_hf_dir_load_model(dir, &table, &cfg, 7, ref, &err)) {
        fprintf(stderr, "fuzz_hf_index: the fixture's own index is refused: %s\n", err.msg);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) setup();
    fuzz_hf_write(dir, "model.safetensors.index.json", data, size);
    nm_error err;
    int full = nm_hf_dir_load_model(dir, &table, &cfg, 7, params, &err);
    if (full != 0 && getenv("NM_FUZZ_VERBOSE")) fprintf(stderr, "rejected: %s\n", err.msg);
    int check = nm_hf_dir_load_params(dir, &table, NULL, &err);
    if (full == 0 && memcmp(params, ref, table.n_floats * sizeof(float)) != 0) {
        fprintf(stderr, "fuzz_hf_index: an accepted index loaded other values than the correct one\n");
        abort();
    }
    if (full == 0 && check != 0) {
        fprintf(stderr, "fuzz_hf_index: the full load accepted what the check-only load refused: %s\n", err.msg);
        abort();
    }
    return 0;
}
