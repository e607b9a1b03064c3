// gguf.c: implementation of gguf.h (byte layout: formats.md 3.1, worked example 3.3).
#include "io/gguf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "io/safetensors.h"

enum {  // gguf_type (formats.md 3.1)
    GGUF_UINT32 = 4,
    GGUF_INT32 = 5,
    GGUF_FLOAT32 = 6,
    GGUF_BOOL = 7,
    GGUF_STRING = 8,
    GGUF_ARRAY = 9,
};

typedef struct bytes {
    uint8_t *p;
    size_t n, cap;
} bytes;

static void put(bytes *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 256;
        b->p = nm_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void put_u32(bytes *b, uint32_t v) {
    uint8_t le[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    put(b, le, 4);
}

static void put_u64(bytes *b, uint64_t v) {
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)(v >> (8 * i));
    put(b, le, 8);
}

static void put_str(bytes *b, const char *s) {
    size_t n = strlen(s);
    put_u64(b, n);
    put(b, s, n);
}

typedef struct gguf_tensor {
    char name[NM_GGUF_MAX_NAME + 1];
    int n_dims;
    int64_t ne[4];
    int64_t numel;
    nm_ggml_type type;
    nm_gguf_fill_fn fill;
    const void *ctx;
} gguf_tensor;

struct nm_gguf_writer {
    bytes kv;                   // serialized key/value pairs
    int64_t n_kv;
    char **keys;                // (n_kv) for the duplicate check
    gguf_tensor *tensors;       // (n_tensors)
    int64_t n_tensors, cap_tensors;
};

nm_gguf_writer *nm_gguf_writer_create(void) { return nm_calloc(1, sizeof(nm_gguf_writer)); }

void nm_gguf_writer_destroy(nm_gguf_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) nm_free(w->keys[i]);
    nm_free(w->keys);
    nm_free(w->kv.p);
    nm_free(w->tensors);
    nm_free(w);
}

static void add_key(nm_gguf_writer *w, const char *key, uint32_t type) {
    w->keys = nm_realloc(w->keys, (size_t)(w->n_kv + 1) * sizeof(char *));
    w->keys[w->n_kv++] = nm_strdup(key);
    put_str(&w->kv, key);
    put_u32(&w->kv, type);
}

void nm_gguf_add_u32(nm_gguf_writer *w, const char *key, uint32_t v) {
    add_key(w, key, GGUF_UINT32);
    put_u32(&w->kv, v);
}

void nm_gguf_add_i32(nm_gguf_writer *w, const char *key, int32_t v) {
    add_key(w, key, GGUF_INT32);
    put_u32(&w->kv, (uint32_t)v);
}

void nm_gguf_add_f32(nm_gguf_writer *w, const char *key, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    add_key(w, key, GGUF_FLOAT32);
    put_u32(&w->kv, u);
}

void nm_gguf_add_bool(nm_gguf_writer *w, const char *key, int v) {
    uint8_t b = v ? 1 : 0;
    add_key(w, key, GGUF_BOOL);
    put(&w->kv, &b, 1);
}

void nm_gguf_add_str(nm_gguf_writer *w, const char *key, const char *v) {
    add_key(w, key, GGUF_STRING);
    put_str(&w->kv, v);
}

void nm_gguf_add_arr_str(nm_gguf_writer *w, const char *key, const char *const *v, int64_t n) {
    add_key(w, key, GGUF_ARRAY);
    put_u32(&w->kv, GGUF_STRING);
    put_u64(&w->kv, (uint64_t)n);
    for (int64_t i = 0; i < n; i++) put_str(&w->kv, v[i]);
}

void nm_gguf_add_arr_i32(nm_gguf_writer *w, const char *key, const int32_t *v, int64_t n) {
    add_key(w, key, GGUF_ARRAY);
    put_u32(&w->kv, GGUF_INT32);
    put_u64(&w->kv, (uint64_t)n);
    for (int64_t i = 0; i < n; i++) put_u32(&w->kv, (uint32_t)v[i]);
}

void nm_gguf_add_arr_u32(nm_gguf_writer *w, const char *key, const uint32_t *v, int64_t n) {
    add_key(w, key, GGUF_ARRAY);
    put_u32(&w->kv, GGUF_UINT32);
    put_u64(&w->kv, (uint64_t)n);
    for (int64_t i = 0; i < n; i++) put_u32(&w->kv, v[i]);
}

const char *nm_ggml_type_name(nm_ggml_type type) {
    switch (type) {
    case NM_GGML_F32: return "f32";
    case NM_GGML_F16: return "f16";
    case NM_GGML_Q8_0: return "q8_0";
    case NM_GGML_BF16: return "bf16";
    }
    return "?";
}

int64_t nm_ggml_nbytes(nm_ggml_type type, int64_t numel) {
    switch (type) {
    case NM_GGML_F32: return numel * 4;
    case NM_GGML_F16:
    case NM_GGML_BF16: return numel * 2;
    case NM_GGML_Q8_0: return numel / 32 * 34;
    }
    NM_PANIC("unknown ggml type %d", (int)type);
}

int nm_gguf_add_tensor(nm_gguf_writer *w, const char *name, int n_dims, const int64_t *ne, nm_ggml_type type,
                       nm_gguf_fill_fn fill, const void *ctx, nm_error *err) {
    if (!*name || strlen(name) > NM_GGUF_MAX_NAME) {
        return nm_error_set(err, "GGUF tensor name '%s' is empty or longer than %d bytes", name, NM_GGUF_MAX_NAME);
    }
    if (n_dims < 1 || n_dims > 4) return nm_error_set(err, "GGUF tensor '%s': %d dims (1-4 allowed)", name, n_dims);
    for (int64_t i = 0; i < w->n_tensors; i++) {
        if (!strcmp(w->tensors[i].name, name)) return nm_error_set(err, "GGUF tensor '%s' added twice", name);
    }
    gguf_tensor t = {.n_dims = n_dims, .numel = 1, .type = type, .fill = fill, .ctx = ctx};
    snprintf(t.name, sizeof(t.name), "%s", name);
    for (int d = 0; d < 4; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] < 0) return nm_error_set(err, "GGUF tensor '%s': negative dim", name);
        t.numel *= t.ne[d];
    }
    if (type == NM_GGML_Q8_0 && t.ne[0] % 32 != 0) {
        return nm_error_set(err, "GGUF tensor '%s': q8_0 needs ne[0] a multiple of 32, got %lld", name,
                            (long long)t.ne[0]);
    }
    if (w->n_tensors == w->cap_tensors) {
        w->cap_tensors = w->cap_tensors * 2 + 64;
        w->tensors = nm_realloc(w->tensors, (size_t)w->cap_tensors * sizeof(gguf_tensor));
    }
    w->tensors[w->n_tensors++] = t;
    return 0;
}

// --- element conversion ---------------------------------------------------------------------

void nm_gguf_quantize_q8_0_block(const float *x, uint8_t out[34]) {
    // quantize_row_q8_0_ref: d = amax / 127 computed in f32, id = 1/d, q = roundf(x * id)
    // (round half away from zero); d itself is stored as f16.
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t dh = nm_f32_to_f16(d);
    out[0] = (uint8_t)dh;
    out[1] = (uint8_t)(dh >> 8);
    for (int j = 0; j < 32; j++) out[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
}

static void convert(nm_ggml_type type, const float *src, int64_t numel, uint8_t *dst) {
    switch (type) {
    case NM_GGML_F32:
        memcpy(dst, src, (size_t)numel * 4);  // little-endian host (x86-64, aarch64)
        return;
    case NM_GGML_F16:
    case NM_GGML_BF16:
        for (int64_t i = 0; i < numel; i++) {
            uint16_t h = type == NM_GGML_F16 ? nm_f32_to_f16(src[i]) : nm_f32_to_bf16(src[i]);
            dst[2 * i] = (uint8_t)h;
            dst[2 * i + 1] = (uint8_t)(h >> 8);
        }
        return;
    case NM_GGML_Q8_0:
        for (int64_t b = 0; b < numel / 32; b++) nm_gguf_quantize_q8_0_block(src + 32 * b, dst + 34 * b);
        return;
    }
    NM_PANIC("unknown ggml type %d", (int)type);
}

// --- write ----------------------------------------------------------------------------------

static int64_t pad_to(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

int nm_gguf_write(nm_gguf_writer *w, const char *path, nm_gguf_progress_fn progress, void *progress_ctx,
                  nm_error *err) {
    for (int64_t i = 0; i < w->n_kv; i++) {
        for (int64_t j = 0; j < i; j++) {
            if (!strcmp(w->keys[i], w->keys[j])) return nm_error_set(err, "%s: GGUF key '%s' added twice", path, w->keys[i]);
        }
    }
    bytes hdr = {0};
    put(&hdr, "GGUF", 4);
    put_u32(&hdr, 3);
    put_u64(&hdr, (uint64_t)w->n_tensors);
    put_u64(&hdr, (uint64_t)w->n_kv);
    put(&hdr, w->kv.p, w->kv.n);
    // Tensor infos; offsets are contiguous in info order, each tensor padded to the alignment
    // (llama.cpp refuses any other offset: formats.md 3.1).
    int64_t offset = 0, max_numel = 0, max_bytes = 0;
    for (int64_t i = 0; i < w->n_tensors; i++) {
        const gguf_tensor *t = &w->tensors[i];
        put_str(&hdr, t->name);
        put_u32(&hdr, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) put_u64(&hdr, (uint64_t)t->ne[d]);
        put_u32(&hdr, (uint32_t)t->type);
        put_u64(&hdr, (uint64_t)offset);
        int64_t nb = nm_ggml_nbytes(t->type, t->numel);
        offset += pad_to(nb, NM_GGUF_ALIGNMENT);
        if (t->numel > max_numel) max_numel = t->numel;
        if (nb > max_bytes) max_bytes = nb;
    }
    const int64_t total = offset;
    static const uint8_t zeros[NM_GGUF_ALIGNMENT] = {0};
    put(&hdr, zeros, (size_t)(pad_to((int64_t)hdr.n, NM_GGUF_ALIGNMENT) - (int64_t)hdr.n));

    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err)) {
        nm_free(hdr.p);
        return -1;
    }
    int rc = nm_fwrite_all(f.fp, hdr.p, hdr.n, path, err);
    nm_free(hdr.p);
    float *scratch = nm_malloc((size_t)(max_numel > 0 ? max_numel : 1) * sizeof(float));
    uint8_t *out = nm_malloc((size_t)(max_bytes > 0 ? max_bytes : 1));
    int64_t done = 0;
    for (int64_t i = 0; i < w->n_tensors && rc == 0; i++) {
        const gguf_tensor *t = &w->tensors[i];
        int64_t nb = nm_ggml_nbytes(t->type, t->numel);
        t->fill(t->ctx, scratch, t->numel);
        convert(t->type, scratch, t->numel, out);
        rc = nm_fwrite_all(f.fp, out, (size_t)nb, path, err);
        if (rc == 0) rc = nm_fwrite_all(f.fp, zeros, (size_t)(pad_to(nb, NM_GGUF_ALIGNMENT) - nb), path, err);
        done += pad_to(nb, NM_GGUF_ALIGNMENT);
        if (progress) progress(progress_ctx, done, total, t->name);
    }
    nm_free(scratch);
    nm_free(out);
    if (rc == 0) return nm_atomic_commit(&f, err);
    nm_atomic_abort(&f);
    return -1;
}
