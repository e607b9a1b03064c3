// safetensors.h: reader and writer for the safetensors format (formats.md 2).
//
// Reader: the file is mmap'd; the header is validated the way the reference Rust reader does
// (header length, JSON, dtype / shape / data_offsets of every tensor, tensors tiling the data
// area exactly: no gaps, no overlaps, no trailing or missing bytes, so a truncated file is
// refused at open). F32, BF16, F16 and F64 tensors are read as fp32. FP8 tensors
// (the DeepSeek-V3 release) are refused with a message: dequantise them with their
// weight_scale_inv first.
//
// Writer: F32, BF16 or F16 (round to nearest even) per tensor, tensors in the order given,
// `__metadata__` {"format":"pt"} (transformers needs it), header padded with spaces to a
// multiple of 8, written atomically (temporary file + rename).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

#define NM_ST_MAX_DIMS 8

typedef enum nm_st_dtype {
    NM_ST_F32 = 0,
    NM_ST_BF16 = 1,
    NM_ST_F16 = 2,
    NM_ST_F64 = 3,
    NM_ST_OTHER = 4,            // a valid safetensors dtype we cannot convert to fp32 (ints, FP8, ...)
} nm_st_dtype;

// --- reader ----------------------------------------------------------------------------------

typedef struct nm_safetensors nm_safetensors;

// Opens and validates path. Returns 0, or -1 with a message naming the file (and tensor).
int nm_safetensors_open(nm_safetensors **out, const char *path, nm_error *err);
void nm_safetensors_close(nm_safetensors *st);   // NULL-safe

const char *nm_safetensors_path(const nm_safetensors *st);
int nm_safetensors_count(const nm_safetensors *st);
// Tensor index by exact name (hashed), or -1.
int nm_safetensors_find(const nm_safetensors *st, const char *name);
const char *nm_safetensors_name(const nm_safetensors *st, int i);
// Number of dims (0 for a scalar); shape filled with ndim entries.
int nm_safetensors_shape(const nm_safetensors *st, int i, int64_t shape[NM_ST_MAX_DIMS]);
int64_t nm_safetensors_numel(const nm_safetensors *st, int i);
nm_st_dtype nm_safetensors_dtype(const nm_safetensors *st, int i);
const char *nm_safetensors_dtype_name(const nm_safetensors *st, int i);   // "F32", "BF16", ...
// Raw little-endian bytes inside the mapping (valid until close).
const void *nm_safetensors_data(const nm_safetensors *st, int i, size_t *nbytes);
// Converts tensor i to fp32 into dst (numel). numel must equal the tensor's element count.
int nm_safetensors_read_f32(const nm_safetensors *st, int i, float *dst /* (numel) */, int64_t numel,
                            nm_error *err);

// "[a, b, c]" into buf, for messages.
const char *nm_shape_str(char *buf, size_t n, int ndim, const int64_t *shape);

// --- writer ----------------------------------------------------------------------------------

typedef struct nm_st_tensor {
    const char *name;
    int ndim;                           // 0..NM_ST_MAX_DIMS
    int64_t shape[NM_ST_MAX_DIMS];
    const float *data;                  // (numel) fp32 source, converted on write
    nm_st_dtype dtype;                  // NM_ST_F32, NM_ST_BF16 or NM_ST_F16: how it is stored
} nm_st_tensor;

// Writes n tensors to path atomically. Returns 0 or -1 with err filled.
int nm_safetensors_write(const char *path, const nm_st_tensor *tensors, int n, nm_error *err);

// fp32 <-> bf16 bit conversions (round to nearest even; NaN stays NaN).
uint16_t nm_f32_to_bf16(float x);
float nm_bf16_to_f32(uint16_t h);
float nm_f16_to_f32(uint16_t h);
uint16_t nm_f32_to_f16(float x);       // IEEE binary16, round to nearest even, NaN stays NaN
