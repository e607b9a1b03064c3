// fuzz_kernels_json.c: libFuzzer target for the reader of a run's kernels.json, the cached GEMM
// kernel pick (nm_kernels_parse, src/ops/cpu/tuning_parse.c; no oneDNN or OpenBLAS linked).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: the file's bytes (an exact-size copy without a NUL: the reader gets a length). Whatever
// the bytes, parsing must not crash, leak or hit UB; a pick for this run's key must name known
// kernels, one for another key must leave the outputs alone, and a refusal must name the file.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops/cpu/cpu_ops.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

// A key as tuning.c's make_key writes one; seeds.py uses the same.
#define FUZZ_KEY "Fuzz CPU | oneDNN 3.0.0 isa avx2 | OpenBLAS 0.3.21 | 2 threads | shapes NT64x16x16/1*1"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size ? size : 1);
    memcpy(text, data, size);
    char fp32[NM_KERNEL_NAME_SIZE] = "untouched", bf16[NM_KERNEL_NAME_SIZE] = "untouched";
    nm_error err;
    int rc = nm_kernels_parse(text, size, "run/kernels.json", FUZZ_KEY, fp32, bf16, &err);
    if (rc == 1) {
        if ((strcmp(fp32, "onednn") && strcmp(fp32, "openblas")) || (strcmp(bf16, "onednn") && strcmp(bf16, "widen"))) {
            fprintf(stderr, "fuzz_kernels_json: accepted unknown kernels fp32 '%s', bf16 '%s'\n", fp32, bf16);
            abort();
        }
    } else if (rc == 0) {
        if (strcmp(fp32, "untouched") || strcmp(bf16, "untouched")) abort();   // another run's pick is not ours
    } else if (rc == -1) {
        if (!strstr(err.msg, "run/kernels.json")) abort();
        if (getenv("NM_FUZZ_VERBOSE")) fprintf(stderr, "rejected: %s\n", err.msg);
    } else {
        abort();
    }
    free(text);
    return 0;
}
