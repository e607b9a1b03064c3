// table_io.c: implementation of table_io.h.
#include "io/table_io.h"

#include <string.h>

int nm_table_write_safetensors(const char *path, const nm_param_table *t, const float *buf, nm_error *err) {
    nm_st_tensor *ts = nm_calloc((size_t)t->n_rows, sizeof(nm_st_tensor));
    int n = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        ts[n].name = r->name;
        ts[n].ndim = r->ndim;
        for (int d = 0; d < r->ndim; d++) ts[n].shape[d] = r->shape[d];
        ts[n].data = buf + r->offset;
        ts[n].dtype = NM_ST_F32;
        n++;
    }
    int rc = nm_safetensors_write(path, ts, n, err);
    nm_free(ts);
    return rc;
}

int nm_table_read_row(const nm_safetensors *st, const nm_tensor_spec *r, float *dst, nm_error *err) {
    int j = nm_safetensors_find(st, r->name);
    if (j < 0) return nm_error_set(err, "%s: tensor '%s' is missing", nm_safetensors_path(st), r->name);
    int64_t shape[NM_ST_MAX_DIMS];
    int nd = nm_safetensors_shape(st, j, shape);
    int same = nd == r->ndim;
    for (int d = 0; same && d < nd; d++) same = shape[d] == r->shape[d];
    if (!same) {
        char want[64], got[64];
        return nm_error_set(err, "%s: tensor '%s' has shape %s, expected %s", nm_safetensors_path(st), r->name,
                            nm_shape_str(got, sizeof(got), nd, shape), nm_shape_str(want, sizeof(want), r->ndim, r->shape));
    }
    return nm_safetensors_read_f32(st, j, dst, r->numel, err);
}

int nm_table_read_safetensors(const char *path, const nm_param_table *t, float *buf, nm_error *err) {
    nm_safetensors *st;
    if (nm_safetensors_open(&st, path, err) != 0) return -1;
    int rc = 0;
    for (int i = 0; i < t->n_rows && rc == 0; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        rc = nm_table_read_row(st, r, buf + r->offset, err);
    }
    nm_safetensors_close(st);
    return rc;
}
