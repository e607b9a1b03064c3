// zero.h: the distributed optimizer over the data-parallel groups (design.md 6,
// docs/parallelism.md), as Megatron's: equal ranges of a flat buffer.
//
// Each group's tensors (replicated ones over dp, routed experts over the expert-data-parallel
// group edp) are read as one concatenation in table order, and that is cut into G equal
// ranges of S = ceil(floats / G): rank r holds the AdamW state of floats [r S, (r+1) S) of
// it, so a tensor may straddle ranks and every rank's share is within one S of the mean.
//
// One step: gradients are reduce-scattered in buckets (runs of consecutive rows of one
// group, at most bucket_floats each, the pieces cut at range boundaries), each rank updates
// the floats of its range, and the parameters are all-gathered over the same buckets. With
// gradient sharding (ZeRO-2, nm_zero_shard_grads) the buckets are reduce-scattered after
// every micro-batch's backward and the sums wait in this rank's range, the buckets' memory
// released in between.
//
// Checkpoints stay Hugging Face directories of whole tensors by name. For them each tensor
// also has a whole-tensor owner (the rank whose 1/G share of the group's floats holds the
// tensor's middle): at a save the moments move from the ranges to those owners (an
// all-to-all per group, nm_zero_state_exchange), which write them by name; a load reads them
// by name at any layout and moves them back into the ranges.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "comm/comm.h"
#include "model/params.h"
#include "ops/ops.h"

typedef struct nm_zero_bucket {
    size_t offset;              // first float of the bucket in the param/grad buffer
    int64_t n;                  // floats
    int expert;                 // 1: reduced over edp, else over dp
    int64_t *counts;            // (group size) floats of each owner's piece, in rank order
    int first_row, last_row;    // table rows covered
    int ready_layer;            // lowest decoder-layer index of its rows; -1 when a row is global
                                // (embedding, final norm, head: final only when the backward ends)
    int copy;                   // sharded master weights' runs (nm_zero_shard_master): 1 for rows read
                                // through the bf16 copy (gathered in its storage), 0 for rows read in fp32
} nm_zero_bucket;

typedef struct nm_zero {
    const nm_param_table *table; // borrowed
    nm_comm *dp, *edp;          // borrowed
    int64_t *row_pos;           // (n_rows) the row's first float in its group's concatenation; -1: tied
    int64_t range_floats[2];    // S of the dense / expert group
    int64_t *own_begin, *own_end; // (n_rows) the row's floats [begin, end) in this rank's range
    int64_t owned_floats;       // floats of this rank's ranges (its optimizer shard)
    int64_t total_floats[2];    // floats in the dense / expert group
    int widest_row;             // the row whose floats span the most ranges (-1: none), and how many
    int64_t widest_ranges;
    // the checkpoint's whole-tensor layout
    int *row_owner;             // (n_rows) whole-tensor owner's rank in the row's group; -1 for tied rows
    unsigned char *owned;       // (n_rows) 1 when this rank writes the row's moments whole
    nm_zero_bucket *buckets;
    int n_buckets;
    // one step's reduction (nm_zero_begin .. nm_zero_finish)
    float *grads;               // borrowed
    nm_comm_request *reqs;      // (n_buckets)
    unsigned char *started;     // (n_buckets)
    int n_started_early;        // buckets started before the backward ended
    int64_t floats_started_early;
    int in_flight;              // between nm_zero_begin and nm_zero_finish
    // Gradient sharding (ZeRO-2, nm_zero_shard_grads): every micro-batch's gradients are
    // reduce-scattered; this rank's pieces are summed here in micro-batch order and each bucket's
    // floats released (the backend's discard) once reduced, so the whole gradient buffer is
    // resident only while a backward is filling it.
    const nm_ops *be;           // borrowed; NULL: ZeRO-1
    float *acc;                 // (acc_floats) this rank's piece of every bucket, in bucket order
    int64_t acc_floats;
    int64_t *acc_at;            // (n_buckets) where bucket b's piece starts in acc
    int64_t *mine_at;           // (n_buckets) where this rank's piece starts within bucket b
    unsigned char *reduced;     // (n_buckets) its reduction completed (and, sharding, was folded into acc)
    unsigned char *folded;      // (n_buckets) acc holds a sum of it this step
    int *row_bucket;            // (n_rows) the bucket holding row i (-1: none, as tied rows)
    // Sharded master weights (nm_zero_shard_master, bf16 runs): the fp32 values of the rows the
    // model reads only through its bf16 weight copy live in their owners' ranges alone.
    unsigned char *copy_rows;   // (n_rows) 1: such a row; NULL: every row whole (ZeRO-1 as before)
    nm_zero_bucket *runs;       // the buckets cut where a row's kind changes: the parameter
    int n_runs;                 // all-gather's pieces (copy rows in the copy, the others in fp32)
    int params_whole;           // 1: the copy rows' fp32 values outside the ranges are held (after
                                // an init, a load or a save); nm_zero_release_master gives them back
} nm_zero;

// The group rank whose range holds position pos of a group of total floats over G ranks.
static inline int64_t nm_zero_range_owner(int64_t pos, int64_t total, int64_t G) {
    int64_t S = (total + G - 1) / G;
    int64_t r = S > 0 ? pos / S : 0;
    return r < G ? r : G - 1;
}

int nm_zero_create(nm_zero **out, const nm_param_table *t, nm_comm *dp, nm_comm *edp, int64_t bucket_floats,
                   nm_error *err);
void nm_zero_destroy(nm_zero *z);

// Turns on gradient sharding (data_parallel_sharding_strategy optim_grads): the reduction
// below runs after every micro-batch's backward, not only the last (nm_zero_begin before it,
// nm_zero_wait_started after it); each rank sums its pieces in an fp32 shard (its optimizer
// range's size) and the reduced buckets read zero and hold no memory. The buckets holding a
// global row (embedding, final norm, head; the pipeline's embedding pair sums those between
// stages first) are not started by the layers, so they add up in the buffer and are reduced
// once, by nm_zero_finish at the step's end; so are those with rows of two of the rank's
// chunks under the interleaved schedule (chunks: its n_chunks stages in layer order; each
// chunk's backward reduces the buckets it finished). be: the backend whose memory the
// gradients are (NULL: the bookkeeping alone, as plan needs it; nothing is reduced then).
void nm_zero_shard_grads(nm_zero *z, const nm_ops *be, const nm_model_stage *chunks, int n_chunks);
// 1 when row i lies in a bucket that only nm_zero_finish reduces (sharding: a bucket with a
// global row); its gradient adds up over the micro-batches in the buffer, so what is summed
// over tensor parallelism in place must be summed once, at the step's end.
int nm_zero_row_deferred(const nm_zero *z, int row);
// Waits for every started bucket (sharding: folds and releases each).
int nm_zero_wait_started(nm_zero *z, nm_error *err);

// Under gradient sharding, for the ranks dp_rank of the dp group and edp_rank of the expert
// group: the floats of its shard (the pieces it receives of every bucket), and the most
// gradient floats resident at once in a backward: the global rows (embedding, final norm,
// head: their buckets finish with the backward) and, while layer l's backward runs, every row
// of layers >= l whose bucket has not been waited for (buckets wait at the next layer's end).
// Whole tensors, before the page rounding of the released spans. No communicator is used.
int64_t nm_zero_shard_floats(const nm_zero *z, int64_t dp_rank, int64_t edp_rank);
// The resident bound needs nm_zero_shard_grads first (it reads the buckets its rows lie in).
int64_t nm_zero_sharded_resident_floats(const nm_zero *z);

// Sums the gradients over each bucket's group; afterwards this rank's owned rows hold the
// sums (the other rows are undefined). In three calls, so the reductions overlap the last
// micro-batch's backward (under gradient sharding, every micro-batch's; first: it is the
// step's first, the shard starts again):
//   nm_zero_begin       before that backward;
//   nm_zero_layer_done  each time the backward has finished a decoder layer (the model's
//                       backward hook; layers finish in decreasing index, MTP layers first),
//                       starts every bucket whose rows all lie in finished layers, and lets
//                       the started ones progress;
//   nm_zero_finish      after the backward: starts the rest and waits for all (a no-op
//                       when no reduction is in flight); sharding: then copies the shard's
//                       sums into this rank's pieces of the buffer.
// Buckets start in the same order on every rank (the layer order is the model's), as
// non-blocking collectives on one communicator require.
void nm_zero_begin(nm_zero *z, float *grads /* (n_floats) */, int first);
int nm_zero_layer_done(nm_zero *z, int layer, nm_error *err);
int nm_zero_finish(nm_zero *z, nm_error *err);
// All three at once, after a backward (nothing overlaps).
int nm_zero_reduce_scatter_grads(nm_zero *z, float *grads /* (n_floats) */, nm_error *err);
// Copies every owner's rows to the whole group.
int nm_zero_all_gather_params(nm_zero *z, float *params /* (n_floats) */, nm_error *err);

// Sharded master weights, as Megatron's distributed optimizer keeps them under bf16: the rows
// with copy_rows[i] = 1 (nm_param_row_reads_copy: read by the model only through its bf16
// weight copy) hold fp32 values only in this rank's ranges; after an update the owners round
// their pieces into the copy and the copy is all-gathered (2 bytes a value for bf16 storage,
// half of fp32's), while the rows read in fp32 (norms, router, embedding) are all-gathered in
// fp32 as before: each bucket's runs of one kind, each gathered once, in its own buffer. The other floats of the copy rows are released (the backend's discard) and
// never read again: a save first gathers each tensor to its whole-tensor owner.
void nm_zero_shard_master(nm_zero *z, const unsigned char *copy_rows /* (n_rows) */);
// The fp32 parameter floats rank (dp_rank, edp_rank) keeps: its ranges of the copy rows and every
// other row whole (tied rows none). Before the page rounding of the released spans.
int64_t nm_zero_master_floats(const nm_zero *z, int64_t dp_rank, int64_t edp_rank);
// After an update: this rank's pieces of the copy rows rounded into copy (copy_type: NM_BF16
// storage, or NM_F32_BF16, fp32 holding bf16 values), the copy all-gathered over the buckets,
// the other rows' fp32 values over theirs.
int nm_zero_all_gather_updated(nm_zero *z, float *params, void *copy, nm_dtype copy_type, const nm_ops *ops,
                               nm_error *err);
// Rounds the rows read in fp32 whole into the copy (their few GEMM readers: a tied head reads
// the embedding's copy), once their fp32 values are final.
void nm_zero_copy_whole_rows(const nm_zero *z, const float *params, void *copy, nm_dtype copy_type,
                             const nm_ops *ops);
// Gives back the copy rows' floats outside this rank's ranges (when params_whole; clears it).
void nm_zero_release_master(nm_zero *z, float *params, const nm_ops *ops);
// For a save: every tensor with optimizer state whole on its whole-tensor owner (owned[i]), its
// pieces moved from the range owners (nm_zero_state_exchange on params); sets params_whole.
int nm_zero_gather_master(nm_zero *z, float *params, nm_error *err);

// Moves one optimizer-state buffer between the layouts: range_buf holds the floats of this
// rank's ranges, row i's piece [own_begin[i], own_end[i]) at range_state[i]; whole_buf the
// whole rows this rank owns for checkpoints (owned[i]), row i at whole_state[i] (SIZE_MAX:
// none, as rows without optimizer state). to_whole: ranges -> whole rows, else back. One
// all-to-all over each group (dp, then edp), every rank of the job together.
int nm_zero_state_exchange(nm_zero *z, float *range_buf, const size_t *range_state, float *whole_buf,
                           const size_t *whole_state, int to_whole, nm_error *err);
