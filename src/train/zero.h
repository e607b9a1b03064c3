// zero.h: ZeRO-1 over the data-parallel groups (design.md 6, docs/parallelism.md).
//
// Every tensor with storage has one owner in its gradient group: replicated tensors in the
// dp group, routed experts in the expert-data-parallel (edp) group. Owners are assigned by
// whole tensors over the group's rows in table order, balanced by size (each rank owns a
// contiguous run of about 1/G of the group's floats), so a rank's shard of the optimizer
// state is a set of whole tensors: it writes them into a checkpoint by name with nothing
// to gather, and a resume at another layout reads them back by name.
//
// One step: gradients are reduce-scattered in buckets (runs of consecutive rows of one
// group, at most bucket_floats each, the pieces cut at owner boundaries), each rank updates
// the rows it owns, and the parameters are all-gathered over the same buckets.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "comm/comm.h"
#include "model/params.h"

typedef struct nm_zero_bucket {
    size_t offset;              // first float of the bucket in the param/grad buffer
    int64_t n;                  // floats
    int expert;                 // 1: reduced over edp, else over dp
    int64_t *counts;            // (group size) floats of each owner's piece, in rank order
    int first_row, last_row;    // table rows covered
    int ready_layer;            // lowest decoder-layer index of its rows; -1 when a row is global
                                // (embedding, final norm, head: final only when the backward ends)
} nm_zero_bucket;

typedef struct nm_zero {
    const nm_param_table *table; // borrowed
    nm_comm *dp, *edp;          // borrowed
    int *row_owner;             // (n_rows) owner's rank in the row's group; -1 for tied rows
    unsigned char *owned;       // (n_rows) 1 when this rank owns the row
    nm_zero_bucket *buckets;
    int n_buckets;
    int64_t owned_floats;       // parameters this rank owns (its optimizer shard)
    int64_t total_floats[2];    // floats in the dense / expert group
    // one step's reduction (nm_zero_begin .. nm_zero_finish)
    float *grads;               // borrowed
    nm_comm_request *reqs;      // (n_buckets)
    unsigned char *started;     // (n_buckets)
    int n_started_early;        // buckets started before the backward ended
    int64_t floats_started_early;
} nm_zero;

int nm_zero_create(nm_zero **out, const nm_param_table *t, nm_comm *dp, nm_comm *edp, int64_t bucket_floats,
                   nm_error *err);
void nm_zero_destroy(nm_zero *z);

// Sums the gradients over each bucket's group; afterwards this rank's owned rows hold the
// sums (the other rows are undefined). In three calls, so the reductions overlap the last
// micro-batch's backward:
//   nm_zero_begin       before that backward;
//   nm_zero_layer_done  each time the backward has finished a decoder layer (the model's
//                       backward hook; layers finish in decreasing index, MTP layers first),
//                       starts every bucket whose rows all lie in finished layers, and lets
//                       the started ones progress;
//   nm_zero_finish      after the backward: starts the rest and waits for all.
// Buckets start in the same order on every rank (the layer order is the model's), as
// non-blocking collectives on one communicator require.
void nm_zero_begin(nm_zero *z, float *grads /* (n_floats) */);
int nm_zero_layer_done(nm_zero *z, int layer, nm_error *err);
int nm_zero_finish(nm_zero *z, nm_error *err);
// All three at once, after a backward (nothing overlaps).
int nm_zero_reduce_scatter_grads(nm_zero *z, float *grads /* (n_floats) */, nm_error *err);
// Copies every owner's rows to the whole group.
int nm_zero_all_gather_params(nm_zero *z, float *params /* (n_floats) */, nm_error *err);
