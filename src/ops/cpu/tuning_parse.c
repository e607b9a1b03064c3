// tuning_parse.c: the reader of run_dir/kernels.json, the CPU backend's cached GEMM kernel pick
// (cpu_ops.h). Its own file, apart from the measurement in tuning.c, so that the parser of this outside
// input links without oneDNN, OpenBLAS or OpenMP (tests/fuzz/fuzz_kernels_json.c fuzzes it).
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "ops/cpu/cpu_ops.h"

int nm_kernels_parse(const char *text, size_t size, const char *path, const char *key, char *fp32, char *bf16,
                     nm_error *err) {
    cJSON *j = cJSON_ParseWithLength(text, size);
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(j, "key");
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "fp32");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "bf16");
    int ok = cJSON_IsObject(j) && cJSON_IsString(k) && cJSON_IsString(f) && cJSON_IsString(b) &&
             (strcmp(f->valuestring, "onednn") == 0 || strcmp(f->valuestring, "openblas") == 0) &&
             (strcmp(b->valuestring, "onednn") == 0 || strcmp(b->valuestring, "widen") == 0);
    if (!ok) {
        cJSON_Delete(j);
        return nm_error_set(err, "%s: not a kernel choice (expected a JSON object with string fields key, fp32 "
                            "onednn|openblas and bf16 onednn|widen); delete it to measure again", path);
    }
    int same = strcmp(k->valuestring, key) == 0;
    if (same) {
        snprintf(fp32, NM_KERNEL_NAME_SIZE, "%s", f->valuestring);
        snprintf(bf16, NM_KERNEL_NAME_SIZE, "%s", b->valuestring);
    }
    cJSON_Delete(j);
    return same;
}
