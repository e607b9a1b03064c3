// test_safetensors.c: the safetensors reader/writer and the HF directory loader.
//  - random tensors round-trip exactly in F32 and within bf16 rounding in BF16 (RNE checked on
//    the tie cases); the formats.md 2.3 worked example is reproduced byte for byte; F16 decodes;
//  - corrupt files are refused with a message naming the file / tensor: truncated, header
//    length too big, data_offsets out of range or inconsistent, overlaps, gaps, trailing
//    bytes, duplicate names, bad JSON, FP8 tensors;
//  - HF directories: fp32 and bf16 round trips (router bias stays F32), sharded index,
//    missing and misshaped tensors refused, a differing MTP copy only warned about.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "core/rng.h"
#include "core/fileio.h"
#include "io/hf_dir.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"

#include "test_util.h"

static char dir[256];
static uint64_t seed;

static char *path_in(const char *name) {
    static char buf[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof(buf[k]), "%s/%s", dir, name);
    return buf[k];
}

// Writes 8-byte length + header (as given, no padding) + data.
static void write_raw(const char *path, const char *header, const void *data, size_t n, uint64_t len_override) {
    FILE *f = fopen(path, "wb");
    NM_CHECK(f, "cannot create %s", path);
    uint64_t N = len_override ? len_override : strlen(header);
    unsigned char len8[8];
    for (int b = 0; b < 8; b++) len8[b] = (unsigned char)(N >> (8 * b));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

static void expect_refused(const char *path, const char *needle, const char *what) {
    nm_safetensors *st = NULL;
    nm_error err = {{0}};
    int rc = nm_safetensors_open(&st, path, &err);
    EXPECT(rc != 0, "%s: accepted", what);
    if (rc == 0) { nm_safetensors_close(st); return; }
    EXPECT(strstr(err.msg, path) != NULL, "%s: message lacks the file: %s", what, err.msg);
    EXPECT(strstr(err.msg, needle) != NULL, "%s: message lacks '%s': %s", what, needle, err.msg);
}

static float *random_floats(int64_t n, uint64_t stream) {
    float *p = nm_malloc((size_t)n * sizeof(float));
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, stream, 0);
    // spread over several binades so the bf16 check is not one exponent
    for (int64_t i = 0; i < n; i++) p[i] = nm_rng_normal(key, (uint64_t)i) * powf(2.0f, (float)(i % 13) - 6.0f);
    return p;
}

// --- reader / writer -----------------------------------------------------------------------

static void test_round_trip(void) {
    const int n = 5;
    int64_t shapes[5][3] = {{7, 0, 0}, {33, 65, 0}, {3, 4, 5}, {1, 1, 0}, {0, 0, 0}};
    int ndims[5] = {1, 2, 3, 2, 0};  // last one is a scalar
    const char *names[5] = {"a.weight", "model.layers.0.mlp.experts.1.up_proj.weight", "x\"quote\\back", "one", "scalar"};
    nm_st_tensor ts[5];
    float *data[5];
    for (int i = 0; i < n; i++) {
        memset(&ts[i], 0, sizeof(ts[i]));
        int64_t numel = 1;
        for (int d = 0; d < ndims[i]; d++) numel *= shapes[i][d], ts[i].shape[d] = shapes[i][d];
        data[i] = random_floats(numel, (uint64_t)i);
        ts[i].name = names[i];
        ts[i].ndim = ndims[i];
        ts[i].data = data[i];
    }
    for (int bf = 0; bf < 2; bf++) {
        for (int i = 0; i < n; i++) ts[i].dtype = bf ? NM_ST_BF16 : NM_ST_F32;
        const char *p = path_in(bf ? "rt_bf16.safetensors" : "rt_f32.safetensors");
        nm_error err;
        EXPECT(nm_safetensors_write(p, ts, n, &err) == 0, "write: %s", err.msg);
        nm_safetensors *st;
        if (nm_safetensors_open(&st, p, &err)) { EXPECT(0, "open: %s", err.msg); continue; }
        EXPECT(nm_safetensors_count(st) == n, "count");
        // header: length multiple of 8, metadata first
        FILE *f = fopen(p, "rb");
        unsigned char head[48] = {0};
        EXPECT(f && fread(head, 1, sizeof(head), f) == sizeof(head), "read head");
        if (f) fclose(f);
        uint64_t N = 0;
        for (int b = 7; b >= 0; b--) N = (N << 8) | head[b];
        EXPECT(N % 8 == 0, "header length %llu not a multiple of 8", (unsigned long long)N);
        EXPECT(memcmp(head + 8, "{\"__metadata__\":{\"format\":\"pt\"}", 31) == 0, "metadata first");
        for (int i = 0; i < n; i++) {
            int k = nm_safetensors_find(st, names[i]);
            EXPECT(k == i, "find %s = %d (order kept)", names[i], k);
            if (k < 0) continue;
            int64_t shape[NM_ST_MAX_DIMS];
            int nd = nm_safetensors_shape(st, k, shape);
            EXPECT(nd == ndims[i], "%s ndim", names[i]);
            for (int d = 0; d < nd && d < 3; d++) EXPECT(shape[d] == shapes[i][d], "%s shape", names[i]);
            EXPECT(!strcmp(nm_safetensors_dtype_name(st, k), bf ? "BF16" : "F32"), "dtype");
            int64_t numel = nm_safetensors_numel(st, k);
            float *back = nm_malloc((size_t)(numel + 1) * sizeof(float));
            EXPECT(nm_safetensors_read_f32(st, k, back, numel, &err) == 0, "%s", err.msg);
            for (int64_t j = 0; j < numel; j++) {
                if (!bf) {
                    EXPECT(back[j] == data[i][j], "%s[%lld] %g vs %g", names[i], (long long)j, back[j], data[i][j]);
                } else {
                    // bf16 keeps 8 significant bits: RNE error <= 2^-9 relative; 2^-8 is the bound asked for
                    EXPECT(fabsf(back[j] - data[i][j]) <= ldexpf(fabsf(data[i][j]), -8), "%s[%lld] %g vs %g",
                           names[i], (long long)j, back[j], data[i][j]);
                }
            }
            EXPECT(numel == 0 || nm_safetensors_read_f32(st, k, back, numel - 1, &err) != 0, "wrong numel accepted");
            nm_free(back);
        }
        EXPECT(nm_safetensors_find(st, "nope") < 0, "found a missing name");
        nm_safetensors_close(st);
    }
    for (int i = 0; i < n; i++) nm_free(data[i]);
    // duplicate names are refused by the writer
    nm_st_tensor dup[2] = {{.name = "a", .ndim = 1, .shape = {1}, .data = (const float[]){1.0f}},
                           {.name = "a", .ndim = 1, .shape = {1}, .data = (const float[]){2.0f}}};
    nm_error err;
    EXPECT(nm_safetensors_write(path_in("dup.safetensors"), dup, 2, &err) != 0 && strstr(err.msg, "'a'"), "dup write");
    EXPECT(access(path_in("dup.safetensors"), F_OK) != 0, "refused write left a file");
}

static void test_bf16_rounding(void) {
    // ties go to even; just above a tie rounds up; NaN stays NaN; inf stays inf
    struct { uint32_t in; uint16_t out; } cases[] = {
        {0x3f808000u, 0x3f80}, {0x3f818000u, 0x3f82}, {0x3f808001u, 0x3f81}, {0x3f807fffu, 0x3f80},
        {0xbf818000u, 0xbf82}, {0x7f800000u, 0x7f80}, {0x7f7fffffu, 0x7f80},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        float x;
        memcpy(&x, &cases[i].in, 4);
        EXPECT(nm_f32_to_bf16(x) == cases[i].out, "bf16(0x%08x) = 0x%04x, want 0x%04x", cases[i].in, nm_f32_to_bf16(x),
               cases[i].out);
    }
    EXPECT(isnan(nm_bf16_to_f32(nm_f32_to_bf16(NAN))), "NaN");
    // F16 decoding, including a subnormal and the largest finite value
    struct { uint16_t h; float f; } f16[] = {{0x3c00, 1.0f}, {0xc000, -2.0f}, {0x0001, 5.9604645e-08f},
                                             {0x7bff, 65504.0f}, {0x3555, 0.33325195f}, {0x8000, -0.0f}};
    for (size_t i = 0; i < sizeof(f16) / sizeof(f16[0]); i++) {
        EXPECT(nm_f16_to_f32(f16[i].h) == f16[i].f, "f16 0x%04x -> %g, want %g", f16[i].h, nm_f16_to_f32(f16[i].h), f16[i].f);
    }
    EXPECT(isinf(nm_f16_to_f32(0x7c00)) && isnan(nm_f16_to_f32(0x7e00)), "f16 inf/nan");
}

static void test_worked_example(void) {
    // formats.md 2.3: a F32 [1, 2], b BF16 [1, -2] -> N = 144, 164 bytes.
    nm_st_tensor ts[2] = {{.name = "a", .ndim = 1, .shape = {2}, .data = (const float[]){1.0f, 2.0f}, .dtype = NM_ST_F32},
                          {.name = "b", .ndim = 1, .shape = {2}, .data = (const float[]){1.0f, -2.0f}, .dtype = NM_ST_BF16}};
    nm_error err;
    const char *p = path_in("example.safetensors");
    EXPECT(nm_safetensors_write(p, ts, 2, &err) == 0, "%s", err.msg);
    unsigned char got[200];
    FILE *f = fopen(p, "rb");
    size_t n = f ? fread(got, 1, sizeof(got), f) : 0;
    if (f) fclose(f);
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[8,12]}}    ";
    const unsigned char tail[12] = {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x80, 0x3f, 0x00, 0xc0};
    EXPECT(n == 164 && got[0] == 144 && got[1] == 0, "size %zu, N byte %u", n, got[0]);
    EXPECT(n == 164 && memcmp(got + 8, json, 144) == 0 && memcmp(got + 152, tail, 12) == 0, "bytes differ");
}

static void test_corrupt(void) {
    const float two[2] = {1.0f, 2.0f};
    char hdr[512];
    const char *p;

    // A valid file, then truncated by 4 bytes: the last tensor runs past the end.
    nm_st_tensor ts[2] = {{.name = "first", .ndim = 1, .shape = {2}, .data = two, .dtype = NM_ST_F32},
                          {.name = "second", .ndim = 2, .shape = {1, 2}, .data = two, .dtype = NM_ST_F32}};
    nm_error err;
    p = path_in("trunc.safetensors");
    EXPECT(nm_safetensors_write(p, ts, 2, &err) == 0, "%s", err.msg);
    {
        FILE *f = fopen(p, "rb");
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fclose(f);
        EXPECT(truncate(p, size - 4) == 0, "truncate");
    }
    expect_refused(p, "second", "truncated file");
    expect_refused(p, "truncated", "truncated file");

    p = path_in("short.safetensors");
    write_raw(p, "", NULL, 0, 0);
    EXPECT(truncate(p, 5) == 0, "truncate");
    expect_refused(p, "too short", "5-byte file");

    p = path_in("biglen.safetensors");
    write_raw(p, "{}", NULL, 0, 1000);
    expect_refused(p, "header length 1000", "header length beyond the file");
    write_raw(p, "{}", NULL, 0, 1ull << 40);
    expect_refused(p, "limit", "header length over 100 MB");

    p = path_in("offsets.safetensors");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", two, 8, 0);
    expect_refused(p, "'w'", "data_offsets beyond the data");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", two, 8, 0);
    expect_refused(p, "'w'", "data_offsets inconsistent with the shape");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", two, 8, 0);
    expect_refused(p, "'w'", "misshaped tensor vs data");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"v\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]}}", two, 8, 0);
    expect_refused(p, "overlaps", "overlapping tensors");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", two, 8, 0);
    expect_refused(p, "'w'", "gap before a tensor");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", two, 8, 0);
    expect_refused(p, "trailing", "trailing bytes");
    write_raw(p, "{\"w\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", two, 8, 0);
    expect_refused(p, "F33", "unknown dtype");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", two, 8, 0);
    expect_refused(p, "'w'", "negative dim");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", two, 8, 0);
    expect_refused(p, "twice", "duplicate name");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},}", two, 8, 0);
    expect_refused(p, "JSON", "bad JSON");
    snprintf(hdr, sizeof(hdr), "{\"__metadata__\":{\"format\":1},\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}");
    write_raw(p, hdr, two, 8, 0);
    expect_refused(p, "__metadata__", "non-string metadata");

    // Accepted oddities: leading whitespace, space padding, unaligned data start, F16.
    const uint16_t h[3] = {0x3c00, 0xc000, 0x3555};
    write_raw(p, "  {\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,6]}} ", h, 6, 0);
    nm_safetensors *st;
    if (nm_safetensors_open(&st, p, &err) == 0) {
        float back[3];
        EXPECT(nm_safetensors_read_f32(st, 0, back, 3, &err) == 0 && back[0] == 1.0f && back[1] == -2.0f &&
                   back[2] == 0.33325195f, "F16 read");
        nm_safetensors_close(st);
    } else {
        EXPECT(0, "padded F16 file refused: %s", err.msg);
    }
    // FP8 is refused at read time with a message naming the tensor and the dtype.
    const unsigned char fp8[2] = {0x38, 0x40};
    write_raw(p, "{\"q\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", fp8, 2, 0);
    if (nm_safetensors_open(&st, p, &err) == 0) {
        float back[2];
        EXPECT(nm_safetensors_read_f32(st, 0, back, 2, &err) != 0 && strstr(err.msg, "'q'") && strstr(err.msg, "F8_E4M3"),
               "fp8: %s", err.msg);
        nm_safetensors_close(st);
    } else {
        EXPECT(0, "fp8 file refused at open: %s", err.msg);
    }
}

// --- HF directories ----------------------------------------------------------------------------

static const char *tiny_json =
    "{\"vocab_size\": 96, \"hidden_size\": 64, \"intermediate_size\": 96, \"moe_intermediate_size\": 32,"
    "\"num_hidden_layers\": 2, \"num_nextn_predict_layers\": 1, \"num_attention_heads\": 2, \"num_key_value_heads\": 2,"
    "\"q_lora_rank\": 32, \"kv_lora_rank\": 16, \"qk_nope_head_dim\": 16, \"qk_rope_head_dim\": 8, \"v_head_dim\": 16,"
    "\"n_routed_experts\": 4, \"n_shared_experts\": 1, \"num_experts_per_tok\": 2, \"n_group\": 2, \"topk_group\": 1,"
    "\"first_k_dense_replace\": 1, \"initializer_range\": 0.02}";

static int capture_begin(char *tmpl) {
    fflush(stderr);
    int fd = mkstemp(tmpl);
    NM_CHECK(fd >= 0, "mkstemp");
    int saved = dup(2);
    dup2(fd, 2);
    close(fd);
    return saved;
}

static void capture_end(int saved, const char *tmpl, char *buf, size_t n) {
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fopen(tmpl, "rb");
    size_t k = f ? fread(buf, 1, n - 1, f) : 0;
    buf[k] = 0;
    if (f) fclose(f);
    unlink(tmpl);
}

// Writes the rows of t (tied copies too) into path, with an optional edit: skip a row, give it
// another shape, or perturb a tied copy.
static void write_rows(const char *path, const nm_param_table *t, const float *params, int skip, int reshape,
                       const float *tied_data, int tied_row, int extra) {
    nm_st_tensor *ts = nm_calloc((size_t)t->n_rows + 1, sizeof(nm_st_tensor));
    int n = 0;
    for (int r = 0; r < t->n_rows; r++) {
        if (r == skip) continue;
        nm_st_tensor *x = &ts[n++];
        x->name = t->rows[r].name;
        x->ndim = t->rows[r].ndim;
        x->shape[0] = t->rows[r].shape[0];
        x->shape[1] = t->rows[r].shape[1];
        if (r == reshape) { x->shape[0] = t->rows[r].shape[1]; x->shape[1] = t->rows[r].shape[0]; }
        x->data = r == tied_row ? tied_data : params + t->rows[r].offset;
        x->dtype = NM_ST_F32;
    }
    if (extra) ts[n++] = (nm_st_tensor){.name = "model.layers.0.self_attn.o_proj.bias", .ndim = 1, .shape = {64},
                                        .data = params, .dtype = NM_ST_F32};
    nm_error err;
    EXPECT(nm_safetensors_write(path, ts, n, &err) == 0, "%s", err.msg);
    nm_free(ts);
}

static void test_hf_dir(void) {
    nm_model_config c;
    nm_param_table t;
    nm_error err;
    if (nm_model_config_parse(&c, tiny_json, "tiny.json", &err) || nm_param_table_build(&t, &c, &err)) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    size_t bytes = t.n_floats * sizeof(float);
    float *p = nm_aligned_alloc(bytes), *q = nm_aligned_alloc(bytes);
    nm_params_init(p, &t, &c, seed);
    // make norms and the router bias non-trivial so the round trip checks them too
    for (int r = 0; r < t.n_rows; r++) {
        if (t.rows[r].flags & (NM_TENSOR_NORM | NM_TENSOR_ROUTER_BIAS)) {
            float *x = p + t.rows[r].offset;
            for (int64_t i = 0; i < t.rows[r].numel; i++) x[i] = 1.0f + 0.01f * (float)(i % 7) + 1e-4f * (float)r;
        }
    }

    // fp32 round trip
    char *d1 = path_in("hf32");
    EXPECT(nm_hf_dir_save(d1, &c, &t, p, 0, &err) == 0, "%s", err.msg);
    nm_model_config c2;
    EXPECT(nm_hf_dir_load_config(d1, &c2, &err) == 0 && !strcmp(c2.json_text, tiny_json), "config round trip");
    nm_model_config_free(&c2);
    memset(q, 0xff, bytes);
    EXPECT(nm_hf_dir_load_params(d1, &t, q, &err) == 0, "%s", err.msg);
    for (int r = 0; r < t.n_rows; r++) {
        const nm_tensor_spec *row = &t.rows[r];
        EXPECT(memcmp(p + row->offset, q + row->offset, (size_t)row->numel * 4) == 0, "fp32 %s differs", row->name);
    }
    EXPECT(nm_hf_dir_load_params(d1, &t, NULL, &err) == 0, "check-only: %s", err.msg);

    // bf16: router bias F32, everything else BF16, values within bf16 rounding
    char *d2 = path_in("hf16");
    EXPECT(nm_hf_dir_save(d2, &c, &t, p, 1, &err) == 0, "%s", err.msg);
    nm_safetensors *st;
    char *f2 = path_in("hf16/model.safetensors");
    if (nm_safetensors_open(&st, f2, &err) == 0) {
        EXPECT(nm_safetensors_count(st) == t.n_rows, "bf16 file has every row incl. tied copies");
        for (int r = 0; r < t.n_rows; r++) {
            int k = nm_safetensors_find(st, t.rows[r].name);
            int bias = (t.rows[r].flags & NM_TENSOR_ROUTER_BIAS) != 0;
            EXPECT(k >= 0 && !strcmp(nm_safetensors_dtype_name(st, k), bias ? "F32" : "BF16"), "%s dtype", t.rows[r].name);
        }
        nm_safetensors_close(st);
    } else {
        EXPECT(0, "%s", err.msg);
    }
    EXPECT(nm_hf_dir_load_params(d2, &t, q, &err) == 0, "%s", err.msg);
    for (size_t i = 0; i < t.n_floats; i++) {
        if (fabsf(q[i] - p[i]) > ldexpf(fabsf(p[i]), -8)) { EXPECT(0, "bf16 value %zu: %g vs %g", i, q[i], p[i]); break; }
    }

    // sharded: rows split over two files by the index
    char *d3 = path_in("sharded");
    EXPECT(nm_mkdir_p(d3, &err) == 0, "mkdir");
    {
        int half = t.n_rows / 2;
        nm_st_tensor *ts = nm_calloc((size_t)t.n_rows, sizeof(nm_st_tensor));
        for (int r = 0; r < t.n_rows; r++) {
            ts[r] = (nm_st_tensor){.name = t.rows[r].name, .ndim = t.rows[r].ndim,
                                   .shape = {t.rows[r].shape[0], t.rows[r].shape[1]}, .data = p + t.rows[r].offset,
                                   .dtype = NM_ST_F32};
        }
        EXPECT(nm_safetensors_write(path_in("sharded/model-00001-of-00002.safetensors"), ts, half, &err) == 0, "shard1");
        EXPECT(nm_safetensors_write(path_in("sharded/model-00002-of-00002.safetensors"), ts + half, t.n_rows - half,
                                    &err) == 0, "shard2");
        FILE *f = fopen(path_in("sharded/model.safetensors.index.json"), "w");
        fprintf(f, "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {");
        for (int r = 0; r < t.n_rows; r++) {
            fprintf(f, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", r ? ", " : "", t.rows[r].name, r < half ? 1 : 2);
        }
        fprintf(f, "}}\n");
        fclose(f);
        nm_free(ts);
        memset(q, 0, bytes);
        EXPECT(nm_hf_dir_load_params(d3, &t, q, &err) == 0, "sharded: %s", err.msg);
        for (int r = 0; r < t.n_rows; r++) {
            EXPECT(memcmp(p + t.rows[r].offset, q + t.rows[r].offset, (size_t)t.rows[r].numel * 4) == 0, "sharded %s",
                   t.rows[r].name);
        }
        // an index that names the wrong shard for a tensor is refused
        f = fopen(path_in("sharded/model.safetensors.index.json"), "w");
        fprintf(f, "{\"metadata\": {}, \"weight_map\": {");
        for (int r = 0; r < t.n_rows; r++) {
            fprintf(f, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", r ? ", " : "", t.rows[r].name, r <= half ? 1 : 2);
        }
        fprintf(f, "}}\n");
        fclose(f);
        EXPECT(nm_hf_dir_load_params(d3, &t, q, &err) != 0 && strstr(err.msg, t.rows[half].name), "bad index: %s", err.msg);
    }

    // missing tensor / misshaped tensor / no model file
    int kvb = nm_param_table_find(&t, "model.layers.1.self_attn.kv_b_proj.weight");
    char *d4 = path_in("broken");
    EXPECT(nm_mkdir_p(d4, &err) == 0, "mkdir");
    EXPECT(nm_hf_dir_load_params(d4, &t, q, &err) != 0 && strstr(err.msg, "model.safetensors"), "empty dir: %s", err.msg);
    char *f4 = path_in("broken/model.safetensors");
    write_rows(f4, &t, p, kvb, -1, NULL, -1, 0);
    EXPECT(nm_hf_dir_load_params(d4, &t, q, &err) != 0 && strstr(err.msg, "kv_b_proj") && strstr(err.msg, "missing") &&
               strstr(err.msg, f4), "missing: %s", err.msg);
    write_rows(f4, &t, p, -1, kvb, NULL, -1, 0);
    EXPECT(nm_hf_dir_load_params(d4, &t, q, &err) != 0 && strstr(err.msg, "kv_b_proj") && strstr(err.msg, "[16, 64]") &&
               strstr(err.msg, "[64, 16]"), "misshaped: %s", err.msg);
    EXPECT(nm_hf_dir_load_params(d4, &t, NULL, &err) != 0 && strstr(err.msg, "kv_b_proj"), "misshaped check-only");

    // a differing MTP copy and an unknown tensor: loaded, with warnings
    int te = nm_param_table_find(&t, "model.layers.2.embed_tokens.weight");
    float *copy = nm_malloc((size_t)t.rows[te].numel * sizeof(float));
    memcpy(copy, p + t.embed, (size_t)t.rows[te].numel * sizeof(float));
    copy[5] += 1.0f;
    write_rows(f4, &t, p, -1, -1, copy, te, 1);
    char tmpl[] = "test_safetensors_stderr_XXXXXX", buf[4096];
    int saved = capture_begin(tmpl);
    int rc = nm_hf_dir_load_params(d4, &t, q, &err);
    capture_end(saved, tmpl, buf, sizeof(buf));
    EXPECT(rc == 0, "differing MTP copy refused: %s", err.msg);
    EXPECT(strstr(buf, "model.layers.2.embed_tokens.weight") && strstr(buf, "differs"), "no copy warning: %s", buf);
    EXPECT(strstr(buf, "o_proj.bias"), "no unknown-tensor warning: %s", buf);
    EXPECT(memcmp(q + t.embed, p + t.embed, (size_t)t.rows[te].numel * 4) == 0, "main embedding replaced by the copy");
    nm_free(copy);

    nm_free(p);
    nm_free(q);
    nm_param_table_free(&t);
    nm_model_config_free(&c);
}

int main(void) {
    seed = (uint64_t)time(NULL);  // fresh inputs each run; printed so a failure can be replayed
    snprintf(dir, sizeof(dir), "test_safetensors_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    printf("test_safetensors: seed %llu, dir %s\n", (unsigned long long)seed, dir);
    test_round_trip();
    test_bf16_rounding();
    test_worked_example();
    test_corrupt();
    test_hf_dir();
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (failures == 0 && system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    if (failures) {
        fprintf(stderr, "test_safetensors: %d failure(s); files kept in %s\n", failures, dir);
        return 1;
    }
    printf("test_safetensors: ok\n");
    return 0;
}
