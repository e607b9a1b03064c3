// tp_shard.c: implementation of tp_shard.h.
#include "train/tp_shard.h"

#include <string.h>

// Copies shard (loc row r's shape) to or from its place in the full tensor of full row r.
// A row split (tp_dim 0) is one contiguous block of its tp_extent rows (the rows after them are
// vocabulary padding: never written to the full tensor, zeros in the shard); a column split
// is a strided one.
static void place(const nm_tensor_spec *lr, float *full_data, float *shard, int to_full) {
    if (lr->tp_dim < 0) {
        if (to_full) memcpy(full_data, shard, (size_t)lr->numel * sizeof(float));
        else memcpy(shard, full_data, (size_t)lr->numel * sizeof(float));
        return;
    }
    if (lr->tp_dim == 0) {
        size_t cols = (size_t)lr->shape[1], at = (size_t)lr->tp_start * cols, real = (size_t)lr->tp_extent * cols;
        if (to_full) {
            memcpy(full_data + at, shard, real * sizeof(float));
        } else {
            memcpy(shard, full_data + at, real * sizeof(float));
            memset(shard + real, 0, ((size_t)lr->numel - real) * sizeof(float));
        }
        return;
    }
    int64_t rows = lr->shape[0], cols = lr->shape[1], full_cols = lr->full_shape[1];
    for (int64_t i = 0; i < rows; i++) {
        float *f = full_data + i * full_cols + lr->tp_start, *s = shard + i * cols;
        if (to_full) memcpy(f, s, (size_t)cols * sizeof(float));
        else memcpy(s, f, (size_t)cols * sizeof(float));
    }
}

int nm_tp_gather_full(const nm_param_table *loc, const nm_param_table *full, const float *src,
                      const size_t *src_state, float *dst, const unsigned char *rows, nm_comm *tp, nm_error *err) {
    NM_CHECK(loc->n_rows == full->n_rows, "tensor-parallel table has %d rows, the full one %d", loc->n_rows,
             full->n_rows);
    int P = tp->size;
    int64_t *counts = nm_calloc((size_t)P, sizeof(int64_t));
    float *buf = NULL;
    size_t cap = 0;
    int rc = 0;
    for (int r = 0; r < loc->n_rows && rc == 0; r++) {
        const nm_tensor_spec *lr = &loc->rows[r];
        if ((lr->flags & NM_TENSOR_TIED) || (rows && !rows[r])) continue;
        size_t off = src_state ? src_state[r] : lr->offset;
        if (off == SIZE_MAX) continue;
        float *out = dst + full->rows[r].offset;
        if (lr->tp_dim < 0) {
            memcpy(out, src + off, (size_t)lr->numel * sizeof(float));
            continue;
        }
        // Every rank's shard, rank after rank, then each put in its place.
        size_t need = (size_t)lr->numel * (size_t)P;
        if (need > cap) {
            nm_free(buf);
            buf = nm_malloc(need * sizeof(float));
            cap = need;
        }
        for (int q = 0; q < P; q++) counts[q] = lr->numel;
        memcpy(buf + (size_t)tp->rank * (size_t)lr->numel, src + off, (size_t)lr->numel * sizeof(float));
        rc = nm_comm_all_gather(tp, buf, counts, NM_DT_F32, err);
        for (int q = 0; q < P && rc == 0; q++) {
            nm_tensor_spec shard = *lr;
            shard.tp_start = q * lr->shape[lr->tp_dim];
            int64_t left = lr->full_shape[lr->tp_dim] - shard.tp_start;
            shard.tp_extent = left < 0 ? 0 : left < lr->shape[lr->tp_dim] ? left : lr->shape[lr->tp_dim];
            place(&shard, out, buf + (size_t)q * (size_t)lr->numel, 1);
        }
    }
    nm_free(buf);
    nm_free(counts);
    return rc;
}

void nm_tp_slice_full(const nm_param_table *loc, const nm_param_table *full, const float *src, float *dst,
                      const size_t *dst_state) {
    NM_CHECK(loc->n_rows == full->n_rows, "tensor-parallel table has %d rows, the full one %d", loc->n_rows,
             full->n_rows);
    for (int r = 0; r < loc->n_rows; r++) {
        const nm_tensor_spec *lr = &loc->rows[r];
        if (lr->flags & NM_TENSOR_TIED) continue;
        size_t off = dst_state ? dst_state[r] : lr->offset;
        if (off == SIZE_MAX) continue;
        place(lr, (float *)(src + full->rows[r].offset), dst + off, 0);
    }
}
