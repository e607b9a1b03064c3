// table_io.h: a buffer laid out by the parameter table, written to / read from one
// safetensors file under the HF tensor names. Used for gradients (forward --grads) and the
// optimizer state in checkpoints (AdamW m and v by parameter name, design.md 8).
#pragma once

#include "core/check.h"
#include "io/safetensors.h"
#include "model/params.h"

// Writes every non-tied row of buf (t->n_floats) to path, atomically, as F32.
int nm_table_write_safetensors(const char *path, const nm_param_table *t, const float *buf, nm_error *err);

// Reads every non-tied row of t from path into buf; a missing or misshaped tensor is an
// error naming the file, the tensor and the shapes.
// Reads row r's tensor (by name, shape checked) from st into dst (r->numel floats).
int nm_table_read_row(const nm_safetensors *st, const nm_tensor_spec *r, float *dst, nm_error *err);

int nm_table_read_safetensors(const char *path, const nm_param_table *t, float *buf, nm_error *err);
