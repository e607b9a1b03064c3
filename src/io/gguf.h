// gguf.h: a writer for GGUF v3 files, the container llama.cpp loads (formats.md 3.1-3.2).
//
// What it does: collects key/value pairs and tensor descriptions in memory, then writes the
// header, the tensor infos and the tensor data in one pass, atomically (temporary file,
// fsync, rename). Tensor data is produced at write time, one tensor at a time, by a
// caller-supplied fill function that writes fp32 values in ggml element order (ne[0]
// fastest); the writer converts them to F32, F16, BF16 or Q8_0. So a model of any size needs
// one tensor's worth of scratch memory, not a second copy of the model.
//
// What it checks (what llama.cpp's reader refuses, formats.md 3.1): unique keys, unique tensor
// names shorter than 64 bytes, 1-4 dims, ne[0] a multiple of 32 for Q8_0.
// What it does not do: reading, nested arrays, split (multi-file) GGUF, types other than the
// four above.
//
// Reference: llama.cpp ggml/src/gguf.cpp (layout), ggml-quants.c quantize_row_q8_0_ref (Q8_0),
// gguf-py gguf_writer.py (key types).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

typedef enum nm_ggml_type {
    NM_GGML_F32 = 0,
    NM_GGML_F16 = 1,
    NM_GGML_Q8_0 = 8,
    NM_GGML_BF16 = 30,
} nm_ggml_type;

#define NM_GGUF_ALIGNMENT 32    // the default when general.alignment is absent
#define NM_GGUF_MAX_NAME 63     // GGML_MAX_NAME (64) less the NUL

typedef struct nm_gguf_writer nm_gguf_writer;

// Writes numel fp32 values (the tensor in ggml order) into dst. ctx is the pointer given to
// nm_gguf_add_tensor; it must stay valid until nm_gguf_write returns.
typedef void (*nm_gguf_fill_fn)(const void *ctx, float *dst /* (numel) */, int64_t numel);

// Called after each tensor with bytes of tensor data written so far and the total.
typedef void (*nm_gguf_progress_fn)(void *ctx, int64_t done_bytes, int64_t total_bytes, const char *tensor);

nm_gguf_writer *nm_gguf_writer_create(void);
void nm_gguf_writer_destroy(nm_gguf_writer *w);     // NULL-safe

// Key/value pairs, in the order added. A key added twice is an error reported by
// nm_gguf_write (so a sequence of adds needs one check at the end).
void nm_gguf_add_u32(nm_gguf_writer *w, const char *key, uint32_t v);
void nm_gguf_add_i32(nm_gguf_writer *w, const char *key, int32_t v);
void nm_gguf_add_f32(nm_gguf_writer *w, const char *key, float v);
void nm_gguf_add_bool(nm_gguf_writer *w, const char *key, int v);
void nm_gguf_add_str(nm_gguf_writer *w, const char *key, const char *v);
void nm_gguf_add_arr_str(nm_gguf_writer *w, const char *key, const char *const *v, int64_t n);
void nm_gguf_add_arr_i32(nm_gguf_writer *w, const char *key, const int32_t *v, int64_t n);
void nm_gguf_add_arr_u32(nm_gguf_writer *w, const char *key, const uint32_t *v, int64_t n);

// A tensor of n_dims (1-4) dims, ne in ggml order (ne[0] fastest: a PyTorch [out, in] weight
// is ne = {in, out}), stored as type. Returns 0, or -1 naming the tensor (bad name, dims,
// Q8_0 row length).
int nm_gguf_add_tensor(nm_gguf_writer *w, const char *name, int n_dims, const int64_t *ne, nm_ggml_type type,
                       nm_gguf_fill_fn fill, const void *ctx, nm_error *err);

// Bytes one tensor of numel elements takes as type (numel a multiple of 32 for Q8_0).
int64_t nm_ggml_nbytes(nm_ggml_type type, int64_t numel);
const char *nm_ggml_type_name(nm_ggml_type type);

// Writes the file atomically. progress may be NULL. Returns 0 or -1 with err filled.
int nm_gguf_write(nm_gguf_writer *w, const char *path, nm_gguf_progress_fn progress, void *progress_ctx,
                  nm_error *err);

// One Q8_0 block (exposed for tests): 32 values -> 34 bytes (f16 scale d = max|x|/127, then 32 int8 round(x/d)).
void nm_gguf_quantize_q8_0_block(const float *x /* (32) */, uint8_t out[34]);
