// tp_shard.h: moving tensors between a tensor-parallel rank's shards and the full (one-
// process) layout, for checkpoints and --init-from (docs/parallelism.md).
//
// A checkpoint is the same HF directory at every layout, so a tensor-parallel run writes and
// reads full tensors: before a save the shards are all-gathered over the tp group into the
// full table's layout (the table nm_param_table_build_tp gives at tp_size 1: same rows, same
// order, whole shapes) and tp rank 0 writes them; after a load each rank cuts its shard out.
#pragma once

#include <stddef.h>

#include "core/check.h"
#include "comm/comm.h"
#include "model/params.h"

// For every row r with rows[r] != 0 (rows NULL: every row) that has storage: full's data of r
// (in dst, at full's row offsets) from every tp rank's shard (in src at src_state[r], or at
// loc's row offset when src_state is NULL; a SIZE_MAX entry: the row is not held, skipped).
// Collective over tp: every rank passes the same rows. Rows not split are copied.
int nm_tp_gather_full(const nm_param_table *loc, const nm_param_table *full, const float *src,
                      const size_t *src_state, float *dst, const unsigned char *rows, nm_comm *tp, nm_error *err);

// The inverse, local: this rank's shard of every row of full (src, full's offsets) into dst
// (at dst_state[r], or loc's offsets when NULL; SIZE_MAX: skipped).
void nm_tp_slice_full(const nm_param_table *loc, const nm_param_table *full, const float *src, float *dst,
                      const size_t *dst_state);
