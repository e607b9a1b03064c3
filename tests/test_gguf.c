// test_gguf.c: the GGUF writer (src/io/gguf.h) against the byte-level facts of formats.md 3:
//  - the worked example of 3.3 (two keys, one F32 tensor) byte for byte;
//  - Q8_0 on the block -16..15 of 3.2 (d = f16 0x3008, qs = -127, -119, -111, ..., 119);
//  - f32 -> f16 on values whose binary16 encodings are known (IEEE 754: 1, -2, 65504, the
//    smallest subnormal 2^-24, ties to even at 1 + 2^-11, overflow to inf, NaN), and on fresh
//    random values: the f16 chosen is the nearest of its neighbours (decoded by the reader's
//    nm_f16_to_f32), ties to the even one;
//  - the refusals llama.cpp's reader would otherwise make (duplicate key or tensor, q8_0 row
//    not a multiple of 32, a name of 64 bytes).
#include <math.h>

#include "core/fileio.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "test_util.h"

static void fill_ones(const void *ctx, float *dst, int64_t n) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++) dst[i] = 1.0f;
}

static void worked_example(const char *dir) {
    static const uint8_t want[] = {
        0x47, 0x47, 0x55, 0x46, 0x03, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0,
        0x02, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0, 0,
        'g', 'e', 'n', 'e', 'r', 'a', 'l', '.', 'a', 'r', 'c', 'h', 'i', 't', 'e', 'c',
        't', 'u', 'r', 'e', 0x08, 0, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0,
        'd', 'e', 'e', 'p', 's', 'e', 'e', 'k', '2', 0x11, 0, 0, 0, 0, 0, 0,
        0, 'g', 'e', 'n', 'e', 'r', 'a', 'l', '.', 'a', 'l', 'i', 'g', 'n', 'm', 'e',
        'n', 't', 0x04, 0, 0, 0, 0x20, 0, 0, 0, 0x12, 0, 0, 0, 0, 0,
        0, 0, 'o', 'u', 't', 'p', 'u', 't', '_', 'n', 'o', 'r', 'm', '.', 'w', 'e',
        'i', 'g', 'h', 't', 0x01, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0x80, 0x3f, 0, 0, 0x80, 0x3f, 0, 0, 0x80, 0x3f, 0, 0, 0x80, 0x3f,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    };
    char path[512];
    snprintf(path, sizeof(path), "%s/example.gguf", dir);
    nm_gguf_writer *w = nm_gguf_writer_create();
    nm_error err;
    nm_gguf_add_str(w, "general.architecture", "deepseek2");
    nm_gguf_add_u32(w, "general.alignment", 32);
    int64_t ne[1] = {4};
    EXPECT(nm_gguf_add_tensor(w, "output_norm.weight", 1, ne, NM_GGML_F32, fill_ones, NULL, &err) == 0, "%s", err.msg);
    EXPECT(nm_gguf_write(w, path, NULL, NULL, &err) == 0, "write: %s", err.msg);
    nm_gguf_writer_destroy(w);
    char *got = NULL;
    size_t n = 0;
    EXPECT(nm_file_read_all(path, &got, &n, &err) == 0, "read: %s", err.msg);
    EXPECT(n == sizeof(want), "worked example: %zu bytes, want %zu", n, sizeof(want));
    for (size_t i = 0; got && i < n && i < sizeof(want); i++) {
        if ((uint8_t)got[i] != want[i]) {
            EXPECT(0, "worked example: byte 0x%zx is %02x, want %02x", i, (uint8_t)got[i], want[i]);
            break;
        }
    }
    nm_free(got);
}

static void q8_0_block(void) {
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)(j - 16);
    uint8_t out[34];
    nm_gguf_quantize_q8_0_block(x, out);
    EXPECT(out[0] == 0x08 && out[1] == 0x30, "q8_0 d bytes %02x %02x, want 08 30", out[0], out[1]);
    // qs = round(x * 127/16): -127, -119, -111, ... (formats.md 3.2)
    for (int j = 0; j < 32; j++) {
        int want = (int)roundf((float)(j - 16) * (1.0f / (16.0f / 127.0f)));
        EXPECT((int8_t)out[2 + j] == want, "q8_0 qs[%d] = %d, want %d", j, (int8_t)out[2 + j], want);
    }
    EXPECT((int8_t)out[2] == -127 && (int8_t)out[3] == -119 && (int8_t)out[4] == -111 && (int8_t)out[33] == 119,
           "q8_0 qs ends %d %d %d .. %d", (int8_t)out[2], (int8_t)out[3], (int8_t)out[4], (int8_t)out[33]);
}

static void f16_known(void) {
    struct { float x; uint16_t h; } cases[] = {
        {1.0f, 0x3c00}, {-2.0f, 0xc000}, {65504.0f, 0x7bff}, {65520.0f, 0x7c00}, {1e9f, 0x7c00},
        {-INFINITY, 0xfc00}, {0x1p-24f, 0x0001}, {0x1p-25f, 0x0000}, {0x1.8p-25f, 0x0001}, {0x1p-14f, 0x0400},
        {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 0x1.8p-10f, 0x3c02}, {-0.0f, 0x8000}, {0.5f, 0x3800},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint16_t h = nm_f32_to_f16(cases[i].x);
        EXPECT(h == cases[i].h, "f16(%a) = 0x%04x, want 0x%04x", (double)cases[i].x, h, cases[i].h);
    }
    uint16_t nan = nm_f32_to_f16(NAN);
    EXPECT((nan & 0x7c00) == 0x7c00 && (nan & 0x3ff) != 0, "f16(NaN) = 0x%04x is not a NaN", nan);
}

static void f16_random(uint64_t seed) {
    srand((unsigned)seed);
    for (int i = 0; i < 200000; i++) {
        // Magnitudes across the subnormal and normal range.
        float x = ((float)rand() / (float)RAND_MAX - 0.5f) * ldexpf(1.0f, rand() % 40 - 26);
        uint16_t h = nm_f32_to_f16(x);
        double v = nm_f16_to_f32(h), err = fabs(v - (double)x);
        for (int d = -1; d <= 1; d += 2) {
            uint16_t nb = (uint16_t)(h + d);
            if ((nb & 0x7fff) >= 0x7c00 || ((h & 0x7fff) == 0 && d < 0)) continue;
            double e2 = fabs((double)nm_f16_to_f32(nb) - (double)x);
            if (e2 < err || (e2 == err && (h & 1))) {
                EXPECT(0, "f16(%a) = 0x%04x but 0x%04x is nearer (or the even tie)", (double)x, h, nb);
                return;
            }
        }
    }
}

static void refusals(const char *dir) {
    nm_error err;
    int64_t ne[2] = {48, 2};
    nm_gguf_writer *w = nm_gguf_writer_create();
    EXPECT(nm_gguf_add_tensor(w, "a.weight", 2, ne, NM_GGML_Q8_0, fill_ones, NULL, &err) != 0 && strstr(err.msg, "32"),
           "q8_0 with ne[0] = 48 accepted");
    char longname[80];
    memset(longname, 'x', 64);
    longname[64] = 0;
    EXPECT(nm_gguf_add_tensor(w, longname, 2, ne, NM_GGML_F32, fill_ones, NULL, &err) != 0, "64-byte name accepted");
    EXPECT(nm_gguf_add_tensor(w, "b.weight", 2, ne, NM_GGML_F32, fill_ones, NULL, &err) == 0, "%s", err.msg);
    EXPECT(nm_gguf_add_tensor(w, "b.weight", 2, ne, NM_GGML_F16, fill_ones, NULL, &err) != 0, "duplicate tensor accepted");
    nm_gguf_add_u32(w, "k", 1);
    nm_gguf_add_f32(w, "k", 1.0f);
    char path[512];
    snprintf(path, sizeof(path), "%s/dup.gguf", dir);
    EXPECT(nm_gguf_write(w, path, NULL, NULL, &err) != 0 && strstr(err.msg, "'k'"), "duplicate key accepted");
    EXPECT(access(path, F_OK) != 0, "a refused file was left behind");
    nm_gguf_writer_destroy(w);
}

int main(void) {
    uint64_t seed = test_seed("test_gguf");
    char dir[256];
    snprintf(dir, sizeof(dir), "test_gguf.%d", (int)getpid());
    test_remove_tree(dir);
    nm_error err;
    if (nm_mkdir_p(dir, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    worked_example(dir);
    q8_0_block();
    f16_known();
    f16_random(seed);
    refusals(dir);
    test_remove_tree(dir);
    printf("test_gguf: %s\n", failures ? "FAILED" : "ok");
    return failures != 0;
}
