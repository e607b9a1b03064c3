// fuzz_pipeline_layout.c: libFuzzer target for the pipeline layout string
// (pipeline_model_parallel_layout, Megatron-Core's "Et|tt|tmL" form) with the virtual stages
// per rank (src/train/pipeline_layout.c).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: 4 bytes (pipeline ranks 1-16, virtual_pipeline_model_parallel_size 0-4, decoder layers
// 1-64, MTP layers 0-3), then the layout string (up to its first NUL). Whatever the bytes, no
// crash, leak or UB; an accepted layout must cover the decoder layers once, in order, over
// pp x v non-empty stages with the embedding first and the loss last, and each rank's chunks
// and schedule must be well formed; a refusal must name the key it is about.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/pipeline.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_accepted(const nm_model_stage *st, int64_t pp, int64_t v, const nm_model_config *cfg) {
    int64_t n = pp * v, next = 0;
    for (int64_t s = 0; s < n; s++) {
        if (st[s].layer_begin != next || st[s].layer_end < st[s].layer_begin) abort();  // in order, no gaps
        if (st[s].first != (s == 0) || st[s].last != (s == n - 1)) abort();
        if (st[s].layer_end == st[s].layer_begin && !st[s].first && !st[s].last) abort();  // empty stage
        next = st[s].layer_end;
    }
    if (next != cfg->L) abort();
    nm_model_stage chunks[NM_MAX_MODEL_CHUNKS];
    nm_pipeline_action plan[2 * 4 * 16 * 2];
    for (int64_t r = 0; r < pp; r++) {
        nm_pipeline_rank_chunks(st, pp, v, r, chunks);
        for (int64_t c = 1; c < v; c++)
            if (chunks[c].layer_begin < chunks[c - 1].layer_end) abort();
        int64_t m = 2 * pp;  // a multiple of pp, as the interleaved schedule needs
        nm_error err;
        if (nm_pipeline_check_micro_batches(pp, v, m, &err) != 0) abort();
        nm_pipeline_schedule(plan, pp, v, r, m);
        int64_t slots = nm_pipeline_slots(pp, v, r, m);
        if (slots < 1 || slots > m) abort();
        for (int64_t k = 0; k < 2 * v * m; k++)
            if (plan[k].chunk < 0 || plan[k].chunk >= v || plan[k].micro < 0 || plan[k].micro >= m) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4) return 0;
    nm_model_config cfg = {0};
    int64_t pp = data[0] % 16 + 1, vpp = data[1] % 5;
    cfg.L = data[2] % 64 + 1;
    cfg.M = data[3] % 4;
    cfg.n_layers = cfg.L + cfg.M;
    char *layout = malloc(size - 4 + 1);
    memcpy(layout, data + 4, size - 4);
    layout[size - 4] = 0;
    nm_error err;
    int64_t v = 0;
    nm_model_stage *st = NULL;
    int rc = nm_pipeline_virtual_size(pp, vpp, layout, &v, &err);
    if (rc == 0) {
        if (v < 1 || v > NM_MAX_MODEL_CHUNKS || (v > 1 && pp < 2)) abort();
        st = calloc((size_t)(pp * v), sizeof(*st));
        rc = nm_pipeline_layout(st, pp, v, layout, &cfg, &err);
        if (rc == 0) check_accepted(st, pp, v, &cfg);
    }
    if (rc != 0) {
        if (!strstr(err.msg, "pipeline_model_parallel_layout") && !strstr(err.msg, "pipeline_parallel_size")) abort();
        if (getenv("NM_FUZZ_VERBOSE")) fprintf(stderr, "rejected: %s\n", err.msg);
    }
    free(st);
    free(layout);
    return 0;
}
