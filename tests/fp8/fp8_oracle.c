// fp8_oracle.c: runs the E4M3 quantiser (src/ops/fp8.h) on values read from a
// file and writes the results, so that tests/reference/test_fp8_torch.py can compare them with
// an independent Python implementation of OCP E4M3FN rounding and of the DeepSeek-V3 scale
// rule. A test tool, built into the build directory as nm_fp8_oracle; not installed.
//
//   nm_fp8_oracle round <in.f32> <out.f32>
//       out[i] = nm_fp8_e4m3_round(in[i])
//   nm_fp8_oracle blocks <rows> <cols> <br> <bc> <mode> <in.f32> <deq.f32> <scales.f32>
//       nm_fp8_quantize_blocks on in(rows, cols), mode 0 = fp32 scales, 1 = ue8m0
//
// Files are raw little-endian float32 arrays, no header (the sizes travel on the command line
// or follow from the file size).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/fileio.h"
#include "ops/fp8.h"

static float *read_f32(const char *path, size_t *n) {
    nm_error err;
    char *buf;
    size_t size;
    if (nm_file_read_all(path, &buf, &size, &err)) NM_PANIC("%s", err.msg);
    NM_CHECK(size % sizeof(float) == 0, "%s: %zu bytes is not a float32 array", path, size);
    *n = size / sizeof(float);
    float *x = nm_malloc(size > 0 ? size : 1);
    memcpy(x, buf, size);
    nm_free(buf);
    return x;
}

static void write_f32(const char *path, const float *x, size_t n) {
    FILE *fp = fopen(path, "wb");
    NM_CHECK(fp != NULL, "cannot open %s", path);
    nm_error err;
    if (nm_fwrite_all(fp, x, n * sizeof(float), path, &err)) NM_PANIC("%s", err.msg);
    NM_CHECK(fclose(fp) == 0, "closing %s", path);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "round") == 0) {
        size_t n;
        float *x = read_f32(argv[2], &n);
        for (size_t i = 0; i < n; i++) x[i] = nm_fp8_e4m3_round(x[i]);
        write_f32(argv[3], x, n);
        nm_free(x);
        return 0;
    }
    if (argc == 10 && strcmp(argv[1], "blocks") == 0) {
        int64_t rows = atoll(argv[2]), cols = atoll(argv[3]), br = atoll(argv[4]), bc = atoll(argv[5]);
        int mode = atoi(argv[6]);
        NM_CHECK(rows > 0 && cols > 0 && br > 0 && bc > 0 && (mode == 0 || mode == 1), "bad blocks arguments");
        size_t n;
        float *x = read_f32(argv[7], &n);
        NM_CHECK(n == (size_t)(rows * cols), "%s holds %zu values, want %lld", argv[7], n, (long long)(rows * cols));
        size_t ns = (size_t)(((rows + br - 1) / br) * ((cols + bc - 1) / bc));
        float *deq = nm_malloc(n * sizeof(float)), *sc = nm_malloc(ns * sizeof(float));
        nm_fp8_quantize_blocks(deq, cols, sc, x, cols, rows, cols, br, bc,
                               mode ? NM_FP8_SCALE_UE8M0 : NM_FP8_SCALE_FP32);
        write_f32(argv[8], deq, n);
        write_f32(argv[9], sc, ns);
        nm_free(x);
        nm_free(deq);
        nm_free(sc);
        return 0;
    }
    fprintf(stderr, "usage: nm_fp8_oracle round <in> <out> | blocks <rows> <cols> <br> <bc> <mode> <in> <deq> <scales>\n");
    return 2;
}
