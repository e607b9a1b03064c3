// zero.c: ZeRO-1 ownership, buckets, reduce-scatter and all-gather (see zero.h).
#include "train/zero.h"

#include <limits.h>
#include <string.h>

static int row_group(const nm_tensor_spec *r) { return (r->flags & NM_TENSOR_EXPERT) ? 1 : 0; }

static nm_comm *group_comm(const nm_zero *z, int g) { return g ? z->edp : z->dp; }

// The range owner of float k of row i (k within the row).
static int64_t owner_of(const nm_zero *z, int i, int64_t k) {
    int g = row_group(&z->table->rows[i]);
    return nm_zero_range_owner(z->row_pos[i] + k, z->total_floats[g], group_comm(z, g)->size);
}

// Bucket b: rows first..last of one group, the floats of each owner counted.
static void fill_bucket(nm_zero *z, nm_zero_bucket *b, int first, int last, int group) {
    const nm_param_table *t = z->table;
    nm_comm *c = group_comm(z, group);
    b->first_row = first;
    b->last_row = last;
    b->expert = group;
    b->offset = t->rows[first].offset;
    b->n = (int64_t)(t->rows[last].offset + (size_t)t->rows[last].numel - b->offset);
    b->counts = nm_calloc((size_t)c->size, sizeof(int64_t));
    b->ready_layer = INT_MAX;
    for (int i = first; i <= last; i++) {
        if (t->rows[i].layer < b->ready_layer) b->ready_layer = t->rows[i].layer;
    }
    // Each row's floats go to the ranges that hold them; the alignment padding up to the next
    // row's start goes with the row's last float. Ranges follow table order, so the owners'
    // pieces are contiguous and in rank order, as a reduce-scatter needs.
    int prev = -1;
    for (int i = first; i <= last; i++) {
        if (t->rows[i].flags & NM_TENSOR_TIED) continue;
        if (prev >= 0) {
            int64_t end = t->rows[prev].numel, pad = (int64_t)(t->rows[i].offset - t->rows[prev].offset) - end;
            b->counts[owner_of(z, prev, end > 0 ? end - 1 : 0)] += pad;
        }
        for (int64_t k = 0; k < t->rows[i].numel;) {
            int64_t q = owner_of(z, i, k), S = z->range_floats[group];
            int64_t stop = (q + 1) * S - z->row_pos[i];  // the range's end, within the row
            if (q == c->size - 1 || stop > t->rows[i].numel) stop = t->rows[i].numel;
            b->counts[q] += stop - k;
            k = stop;
        }
        prev = i;
    }
}

static void add_bucket(nm_zero *z, int first, int last, int group, int cap) {
    NM_CHECK(z->n_buckets < cap, "bucket list overflow");
    fill_bucket(z, &z->buckets[z->n_buckets++], first, last, group);
}

int nm_zero_create(nm_zero **out, const nm_param_table *t, nm_comm *dp, nm_comm *edp, int64_t bucket_floats,
                   nm_error *err) {
    *out = NULL;
    nm_zero *z = nm_calloc(1, sizeof(*z));
    z->table = t;
    z->dp = dp;
    z->edp = edp;
    z->row_owner = nm_malloc((size_t)t->n_rows * sizeof(int));
    z->owned = nm_calloc((size_t)t->n_rows, 1);
    z->row_pos = nm_malloc((size_t)t->n_rows * sizeof(int64_t));
    z->own_begin = nm_calloc((size_t)t->n_rows, sizeof(int64_t));
    z->own_end = nm_calloc((size_t)t->n_rows, sizeof(int64_t));
    z->widest_row = -1;
    for (int i = 0; i < t->n_rows; i++) {
        if (t->rows[i].flags & NM_TENSOR_TIED) continue;
        z->total_floats[row_group(&t->rows[i])] += t->rows[i].numel;
    }
    for (int g = 0; g < 2; g++) {
        int64_t G = group_comm(z, g)->size;
        z->range_floats[g] = (z->total_floats[g] + G - 1) / G;
    }
    // Positions in each group's concatenation; the ranges, and the whole-tensor owner = the
    // group rank whose 1/G share of the group's floats holds the row's middle.
    int64_t seen[2] = {0, 0};
    size_t last_end = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        z->row_owner[i] = -1;
        z->row_pos[i] = -1;
        if (r->flags & NM_TENSOR_TIED) continue;
        NM_CHECK(r->offset >= last_end, "table rows are not in buffer order at %s", r->name);
        last_end = r->offset + (size_t)r->numel;
        int g = row_group(r);
        nm_comm *c = group_comm(z, g);
        int64_t G = c->size, S = z->range_floats[g];
        z->row_pos[i] = seen[g];
        int64_t lo = c->rank * S - seen[g], hi = (c->rank + 1) * S - seen[g];
        if (c->rank == G - 1) hi = r->numel;
        z->own_begin[i] = lo < 0 ? 0 : lo > r->numel ? r->numel : lo;
        z->own_end[i] = hi < z->own_begin[i] ? z->own_begin[i] : hi > r->numel ? r->numel : hi;
        z->owned_floats += z->own_end[i] - z->own_begin[i];
        int64_t mid2 = 2 * seen[g] + r->numel;  // twice the row's middle, in floats
        int64_t owner = mid2 * G / (2 * (z->total_floats[g] > 0 ? z->total_floats[g] : 1));
        z->row_owner[i] = (int)(owner < G ? owner : G - 1);
        seen[g] += r->numel;
        z->owned[i] = z->row_owner[i] == c->rank;
        if (r->numel > 0) {
            int64_t span = owner_of(z, i, r->numel - 1) - owner_of(z, i, 0) + 1;
            if (span > z->widest_ranges) {
                z->widest_ranges = span;
                z->widest_row = i;
            }
        }
    }
    // Buckets: runs of consecutive rows of one group, cut at bucket_floats.
    int cap = t->n_rows + 1;
    z->buckets = nm_calloc((size_t)cap, sizeof(nm_zero_bucket));
    int first = -1, last = -1, group = -1;
    int64_t size = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        int g = row_group(r);
        if (first >= 0 && (g != group || size + r->numel > bucket_floats)) {
            add_bucket(z, first, last, group, cap);
            first = -1;
        }
        if (first < 0) {
            first = i;
            group = g;
            size = 0;
        }
        last = i;
        size += r->numel;
    }
    if (first >= 0) add_bucket(z, first, last, group, cap);
    z->reqs = nm_calloc((size_t)(z->n_buckets > 0 ? z->n_buckets : 1), sizeof(nm_comm_request));
    z->started = nm_calloc((size_t)(z->n_buckets > 0 ? z->n_buckets : 1), 1);
    z->reduced = nm_calloc((size_t)(z->n_buckets > 0 ? z->n_buckets : 1), 1);
    (void)err;
    *out = z;
    return 0;
}

// The chunk (of n, in increasing layer order) that decoder or MTP layer l lies in.
static int chunk_of(const nm_model_stage *chunks, int n, int l) {
    int k = 0;
    while (k + 1 < n && chunks[k + 1].layer_begin <= l) k++;
    return k;
}

void nm_zero_shard_grads(nm_zero *z, const nm_ops *be, const nm_model_stage *chunks, int n_chunks) {
    z->be = be;
    // Under the interleaved schedule each chunk's backward reduces what it finished; a bucket
    // with rows of two chunks would be reduced while the other chunk still adds to it: it is
    // reduced once, at the step's end, as a global one.
    for (int b = 0; n_chunks > 1 && b < z->n_buckets; b++) {
        nm_zero_bucket *k = &z->buckets[b];
        int first_chunk = -1;
        for (int i = k->first_row; i <= k->last_row && k->ready_layer >= 0; i++) {
            int c = chunk_of(chunks, n_chunks, z->table->rows[i].layer);
            if (first_chunk < 0) first_chunk = c;
            else if (c != first_chunk) k->ready_layer = -1;
        }
    }
    z->acc_at = nm_calloc((size_t)(z->n_buckets > 0 ? z->n_buckets : 1), sizeof(int64_t));
    z->mine_at = nm_calloc((size_t)(z->n_buckets > 0 ? z->n_buckets : 1), sizeof(int64_t));
    for (int b = 0; b < z->n_buckets; b++) {
        const nm_zero_bucket *k = &z->buckets[b];
        int me = (k->expert ? z->edp : z->dp)->rank;
        for (int q = 0; q < me; q++) z->mine_at[b] += k->counts[q];
        z->acc_at[b] = z->acc_floats;
        z->acc_floats += k->counts[me];
    }
    z->folded = nm_calloc((size_t)(z->n_buckets > 0 ? z->n_buckets : 1), 1);
    z->row_bucket = nm_malloc((size_t)(z->table->n_rows > 0 ? z->table->n_rows : 1) * sizeof(int));
    for (int i = 0; i < z->table->n_rows; i++) z->row_bucket[i] = -1;
    for (int b = 0; b < z->n_buckets; b++)
        for (int i = z->buckets[b].first_row; i <= z->buckets[b].last_row; i++) z->row_bucket[i] = b;
    if (be) z->acc = be->alloc(be, (size_t)(z->acc_floats > 0 ? z->acc_floats : 1) * sizeof(float));
}

int nm_zero_row_deferred(const nm_zero *z, int row) {
    return z->row_bucket && z->row_bucket[row] >= 0 && z->buckets[z->row_bucket[row]].ready_layer < 0;
}

int64_t nm_zero_shard_floats(const nm_zero *z, int64_t dp_rank, int64_t edp_rank) {
    int64_t n = 0;
    for (int b = 0; b < z->n_buckets; b++) n += z->buckets[b].counts[z->buckets[b].expert ? edp_rank : dp_rank];
    return n;
}

int64_t nm_zero_sharded_resident_floats(const nm_zero *z) {
    const nm_param_table *t = z->table;
    const int *bucket_of = z->row_bucket;
    int top = -1;
    for (int i = 0; i < t->n_rows; i++)
        if (t->rows[i].layer > top) top = t->rows[i].layer;
    int64_t most = 0;
    for (int l = top; l >= 0; l--) {  // while layer l's backward runs
        int64_t n = 0;
        for (int i = 0; i < t->n_rows; i++) {
            const nm_tensor_spec *r = &t->rows[i];
            if ((r->flags & NM_TENSOR_TIED) || bucket_of[i] < 0) continue;
            int ready = z->buckets[bucket_of[i]].ready_layer;
            // a bucket with a global row is reduced once, at the step's end: its rows stay from
            // the first micro-batch's backward on
            int written = r->layer < 0 || r->layer >= l || ready < 0, released = ready >= l + 2;
            if (written && !released) n += r->numel;
        }
        if (n > most) most = n;
    }
    return most;
}

void nm_zero_destroy(nm_zero *z) {
    if (!z) return;
    if (z->be) z->be->free(z->be, z->acc);
    nm_free(z->acc_at);
    nm_free(z->mine_at);
    nm_free(z->reduced);
    nm_free(z->folded);
    nm_free(z->row_bucket);
    for (int b = 0; b < z->n_buckets; b++) nm_free(z->buckets[b].counts);
    nm_free(z->buckets);
    for (int b = 0; b < z->n_runs; b++) nm_free(z->runs[b].counts);
    nm_free(z->runs);
    nm_free(z->copy_rows);
    nm_free(z->reqs);
    nm_free(z->started);
    nm_free(z->row_owner);
    nm_free(z->owned);
    nm_free(z->row_pos);
    nm_free(z->own_begin);
    nm_free(z->own_end);
    nm_free(z);
}

void nm_zero_begin(nm_zero *z, float *grads, int first) {
    z->grads = grads;
    memset(z->started, 0, (size_t)(z->n_buckets > 0 ? z->n_buckets : 1));
    memset(z->reduced, 0, (size_t)(z->n_buckets > 0 ? z->n_buckets : 1));
    z->n_started_early = 0;
    z->floats_started_early = 0;
    if (first && z->be) memset(z->folded, 0, (size_t)(z->n_buckets > 0 ? z->n_buckets : 1));
    z->in_flight = 1;
}

// Gradient sharding, once bucket b's reduce-scatter has completed: this rank's piece of the
// sum goes into acc (the step's first reduction of the bucket is copied, later ones added in
// order), and the whole bucket is released; nm_zero_finish puts acc where the optimizer reads.
static void bucket_reduced(nm_zero *z, int b) {
    if (z->reduced[b]) return;
    z->reduced[b] = 1;
    if (!z->be) return;
    const nm_ops *be = z->be;
    const nm_zero_bucket *k = &z->buckets[b];
    int64_t n = k->counts[(k->expert ? z->edp : z->dp)->rank];
    float *bucket = z->grads + k->offset, *piece = bucket + z->mine_at[b], *acc = z->acc + z->acc_at[b];
    if (n > 0) {
        if (!z->folded[b]) be->copy_2d(be, acc, n, piece, n, 1, n);
        else be->axpy(be, acc, piece, 1.0f, n);
    }
    z->folded[b] = 1;
    be->discard(be, bucket, (size_t)k->n * sizeof(float));
}

static int start_bucket(nm_zero *z, int b, nm_error *err) {
    nm_zero_bucket *k = &z->buckets[b];
    z->started[b] = 1;
    return nm_comm_reduce_scatter_start(k->expert ? z->edp : z->dp, z->grads + k->offset, k->counts, NM_DT_F32,
                                        &z->reqs[b], err);
}

// Gradient sharding: the buckets started at an earlier layer have had that layer's backward
// to move; they are finished now, so their memory is back before the next layer writes its
// gradients, and at most one layer's buckets are ever in flight (plan counts that bound).
int nm_zero_wait_started(nm_zero *z, nm_error *err) {
    for (int b = z->n_buckets - 1; b >= 0; b--) {
        if (!z->started[b] || z->reduced[b]) continue;
        if (nm_comm_wait(&z->reqs[b], err) != 0) return -1;
        bucket_reduced(z, b);
    }
    return 0;
}

int nm_zero_layer_done(nm_zero *z, int layer, nm_error *err) {
    if (z->be && nm_zero_wait_started(z, err) != 0) return -1;
    // Buckets in decreasing table order: the order in which the backward finishes them.
    for (int b = z->n_buckets - 1; b >= 0; b--) {
        if (z->started[b] || z->buckets[b].ready_layer < layer) continue;
        if (start_bucket(z, b, err) != 0) return -1;
        z->n_started_early++;
        z->floats_started_early += z->buckets[b].n;
    }
    // MPI moves a non-blocking collective along only inside MPI calls: test the ones in flight.
    for (int b = 0; b < z->n_buckets; b++) {
        int done = 0;
        if (!z->started[b] || z->reduced[b]) continue;
        if (nm_comm_test(&z->reqs[b], &done, err) != 0) return -1;
        if (done) bucket_reduced(z, b);
    }
    return 0;
}

int nm_zero_finish(nm_zero *z, nm_error *err) {
    if (!z->in_flight) return 0;
    z->in_flight = 0;
    int rc = 0;
    // At most two buckets in flight: a non-blocking reduce-scatter holds temporaries of its
    // bucket's size inside MPI until it completes, and starting all at once held a second
    // gradient buffer's worth (measured: 270 MiB more peak RSS at dp2, 430 at dp4, small config).
    for (int b = z->n_buckets - 1, prev = -1; b >= 0 && rc == 0; b--) {
        if (z->started[b]) continue;
        rc = start_bucket(z, b, err);
        for (int o = z->n_buckets - 1; o >= 0 && rc == 0; o--) {
            if (o == b || o == prev || !z->started[o] || z->reduced[o]) continue;
            if (nm_comm_wait(&z->reqs[o], err) != 0) rc = -1;
            else bucket_reduced(z, o);
        }
        prev = b;
    }
    // Every started request is completed, even after an error, so none is left in flight.
    for (int b = 0; b < z->n_buckets; b++) {
        nm_error wait_err;
        if (!z->started[b] || z->reduced[b]) continue;
        if (nm_comm_wait(&z->reqs[b], rc == 0 ? err : &wait_err) != 0) rc = -1;
        else if (rc == 0) bucket_reduced(z, b);
    }
    // Gradient sharding: every bucket was reduced at least once this step; its summed piece
    // goes where the optimizer reads it (the only part of the buffer written until the next
    // backward).
    for (int b = 0; z->be && rc == 0 && b < z->n_buckets; b++) {
        const nm_zero_bucket *k = &z->buckets[b];
        int64_t n = k->counts[(k->expert ? z->edp : z->dp)->rank];
        if (n > 0 && z->folded[b])
            z->be->copy_2d(z->be, z->grads + k->offset + z->mine_at[b], n, z->acc + z->acc_at[b], n, 1, n);
    }
    return rc;
}

int nm_zero_reduce_scatter_grads(nm_zero *z, float *grads, nm_error *err) {
    nm_zero_begin(z, grads, 1);
    return nm_zero_finish(z, err);
}

int nm_zero_all_gather_params(nm_zero *z, float *params, nm_error *err) {
    for (int b = 0; b < z->n_buckets; b++) {
        nm_zero_bucket *k = &z->buckets[b];
        if (nm_comm_all_gather(k->expert ? z->edp : z->dp, params + k->offset, k->counts, NM_DT_F32, err) != 0)
            return -1;
    }
    return 0;
}

// --- sharded master weights ---------------------------------------------------------------------

void nm_zero_shard_master(nm_zero *z, const unsigned char *copy_rows) {
    const nm_param_table *t = z->table;
    z->copy_rows = nm_malloc((size_t)(t->n_rows > 0 ? t->n_rows : 1));
    memcpy(z->copy_rows, copy_rows, (size_t)t->n_rows);
    // every bucket cut where the kind changes (tied rows have no floats: skipped)
    z->runs = nm_calloc((size_t)(t->n_rows + z->n_buckets + 1), sizeof(nm_zero_bucket));
    for (int b = 0; b < z->n_buckets; b++) {
        const nm_zero_bucket *k = &z->buckets[b];
        int first = -1, last = -1;
        for (int i = k->first_row; i <= k->last_row + 1; i++) {
            if (i <= k->last_row && (t->rows[i].flags & NM_TENSOR_TIED)) continue;
            if (first >= 0 && (i > k->last_row || copy_rows[i] != copy_rows[first])) {
                nm_zero_bucket *r = &z->runs[z->n_runs++];
                fill_bucket(z, r, first, last, k->expert);
                r->copy = copy_rows[first];
                first = -1;
            }
            if (i <= k->last_row && first < 0) first = i;
            last = i;
        }
    }
    z->params_whole = 1;
}

// Floats of row i in group rank q's range.
static int64_t row_range_floats(const nm_zero *z, int i, int64_t q) {
    int g = row_group(&z->table->rows[i]);
    int64_t G = group_comm(z, g)->size, S = z->range_floats[g], n = z->table->rows[i].numel;
    int64_t lo = q * S - z->row_pos[i], hi = q == G - 1 ? n : (q + 1) * S - z->row_pos[i];
    lo = lo < 0 ? 0 : lo > n ? n : lo;
    hi = hi < lo ? lo : hi > n ? n : hi;
    return hi - lo;
}

int64_t nm_zero_master_floats(const nm_zero *z, int64_t dp_rank, int64_t edp_rank) {
    const nm_param_table *t = z->table;
    int64_t n = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        if (!z->copy_rows || !z->copy_rows[i]) n += r->numel;
        else n += row_range_floats(z, i, row_group(r) ? edp_rank : dp_rank);
    }
    return n;
}

// params[off, off + n) rounded into the copy at the same element offset.
static void round_into_copy(const float *params, void *copy, nm_dtype copy_type, const nm_ops *ops, size_t off,
                            int64_t n) {
    if (n <= 0) return;
    if (copy_type == NM_BF16) ops->cast_bf16(ops, (uint16_t *)copy + off, params + off, n);
    else ops->round_bf16(ops, (float *)copy + off, params + off, n);
}

int nm_zero_all_gather_updated(nm_zero *z, float *params, void *copy, nm_dtype copy_type, const nm_ops *ops,
                               nm_error *err) {
    const nm_param_table *t = z->table;
    for (int i = 0; i < t->n_rows; i++) {
        if (z->copy_rows[i] && !(t->rows[i].flags & NM_TENSOR_TIED))
            round_into_copy(params, copy, copy_type, ops, t->rows[i].offset + (size_t)z->own_begin[i],
                            z->own_end[i] - z->own_begin[i]);
    }
    nm_comm_dtype dt = copy_type == NM_BF16 ? NM_DT_BF16 : NM_DT_F32;
    size_t elem = copy_type == NM_BF16 ? sizeof(uint16_t) : sizeof(float);
    for (int b = 0; b < z->n_runs; b++) {
        nm_zero_bucket *k = &z->runs[b];
        void *buf = k->copy ? (void *)((char *)copy + k->offset * elem) : (void *)(params + k->offset);
        if (nm_comm_all_gather(k->expert ? z->edp : z->dp, buf, k->counts, k->copy ? dt : NM_DT_F32, err) != 0)
            return -1;
    }
    return 0;
}

void nm_zero_copy_whole_rows(const nm_zero *z, const float *params, void *copy, nm_dtype copy_type,
                             const nm_ops *ops) {
    const nm_param_table *t = z->table;
    for (int i = 0; i < t->n_rows; i++) {
        if (!z->copy_rows[i] && !(t->rows[i].flags & NM_TENSOR_TIED))
            round_into_copy(params, copy, copy_type, ops, t->rows[i].offset, t->rows[i].numel);
    }
}

void nm_zero_release_master(nm_zero *z, float *params, const nm_ops *ops) {
    const nm_param_table *t = z->table;
    if (!z->copy_rows || !z->params_whole) return;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (!z->copy_rows[i] || (r->flags & NM_TENSOR_TIED)) continue;
        float *row = params + r->offset;
        if (z->own_begin[i] > 0) ops->discard(ops, row, (size_t)z->own_begin[i] * sizeof(float));
        if (z->own_end[i] < r->numel)
            ops->discard(ops, row + z->own_end[i], (size_t)(r->numel - z->own_end[i]) * sizeof(float));
    }
    z->params_whole = 0;
}

int nm_zero_gather_master(nm_zero *z, float *params, nm_error *err) {
    const nm_param_table *t = z->table;
    size_t *range_state = nm_malloc((size_t)(t->n_rows > 0 ? t->n_rows : 1) * sizeof(size_t));
    size_t *whole_state = nm_malloc((size_t)(t->n_rows > 0 ? t->n_rows : 1) * sizeof(size_t));
    for (int i = 0; i < t->n_rows; i++) {
        range_state[i] = t->rows[i].offset + (size_t)z->own_begin[i];
        whole_state[i] = z->owned[i] ? t->rows[i].offset : SIZE_MAX;
    }
    int rc = nm_zero_state_exchange(z, params, range_state, params, whole_state, 1, err);
    nm_free(range_state);
    nm_free(whole_state);
    z->params_whole = 1;
    return rc;
}

// --- the checkpoint's whole-tensor layout ------------------------------------------------------

static int has_state(const nm_tensor_spec *r) { return !(r->flags & (NM_TENSOR_ROUTER_BIAS | NM_TENSOR_TIED)); }

// Copies between this rank's range pieces of group g's rows (range_buf at range_state) and a
// message buffer laid out by whole-tensor owner (each owner's part from at[owner], rows in
// table order). pack: into the message, else out of it.
static void range_walk(const nm_zero *z, int g, float *msg, const int64_t *at, float *range_buf,
                       const size_t *range_state, int pack) {
    const nm_param_table *t = z->table;
    int64_t G = group_comm(z, g)->size;
    int64_t *pos = nm_malloc((size_t)G * sizeof(int64_t));
    memcpy(pos, at, (size_t)G * sizeof(int64_t));
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        int64_t n = z->own_end[i] - z->own_begin[i];
        if (!has_state(r) || row_group(r) != g || n == 0) continue;
        float *mine = range_buf + range_state[i], *there = msg + pos[z->row_owner[i]];
        memcpy(pack ? there : mine, pack ? mine : there, (size_t)n * sizeof(float));
        pos[z->row_owner[i]] += n;
    }
    nm_free(pos);
}

// The same for the whole rows this rank owns (whole_buf at whole_state), cut by range owner.
// counts (may be NULL): adds each range owner's floats instead of copying.
static void whole_walk(const nm_zero *z, int g, float *msg, const int64_t *at, float *whole_buf,
                       const size_t *whole_state, int pack, int64_t *counts) {
    const nm_param_table *t = z->table;
    int64_t G = group_comm(z, g)->size, S = z->range_floats[g];
    int64_t *pos = nm_calloc((size_t)G, sizeof(int64_t));
    if (at) memcpy(pos, at, (size_t)G * sizeof(int64_t));
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (!has_state(r) || row_group(r) != g || !z->owned[i]) continue;
        for (int64_t k = 0; k < r->numel;) {
            int64_t q = owner_of(z, i, k);
            int64_t stop = (q + 1) * S - z->row_pos[i];
            if (q == G - 1 || stop > r->numel) stop = r->numel;
            if (counts) {
                counts[q] += stop - k;
            } else {
                float *mine = whole_buf + whole_state[i] + k, *there = msg + pos[q];
                memcpy(pack ? there : mine, pack ? mine : there, (size_t)(stop - k) * sizeof(float));
                pos[q] += stop - k;
            }
            k = stop;
        }
    }
    nm_free(pos);
}

// One group's exchange: a range owner's piece of row i goes to (or comes from) the row's
// whole owner. Both sides know every range and owner, so the counts and the order need no
// message of their own.
static int exchange_group(nm_zero *z, int g, float *range_buf, const size_t *range_state, float *whole_buf,
                          const size_t *whole_state, int to_whole, nm_error *err) {
    const nm_param_table *t = z->table;
    nm_comm *c = group_comm(z, g);
    int64_t G = c->size;
    // cnt_r[q]: floats between my ranges and q's whole rows; cnt_w[q]: between my whole rows and q's ranges
    int64_t *cnt_r = nm_calloc((size_t)G, sizeof(int64_t)), *cnt_w = nm_calloc((size_t)G, sizeof(int64_t));
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (has_state(r) && row_group(r) == g) cnt_r[z->row_owner[i]] += z->own_end[i] - z->own_begin[i];
    }
    whole_walk(z, g, NULL, NULL, NULL, NULL, 0, cnt_w);
    int64_t n_r = 0, n_w = 0;
    int64_t *at_r = nm_calloc((size_t)G, sizeof(int64_t)), *at_w = nm_calloc((size_t)G, sizeof(int64_t));
    for (int64_t q = 0; q < G; q++) {
        at_r[q] = n_r;
        at_w[q] = n_w;
        n_r += cnt_r[q];
        n_w += cnt_w[q];
    }
    float *msg_r = nm_malloc((size_t)(n_r > 0 ? n_r : 1) * sizeof(float));
    float *msg_w = nm_malloc((size_t)(n_w > 0 ? n_w : 1) * sizeof(float));
    int rc;
    if (to_whole) {
        range_walk(z, g, msg_r, at_r, range_buf, range_state, 1);
        rc = nm_comm_all_to_all_v(c, msg_r, cnt_r, at_r, msg_w, cnt_w, at_w, NM_DT_F32, err);
        if (rc == 0) whole_walk(z, g, msg_w, at_w, whole_buf, whole_state, 0, NULL);
    } else {
        whole_walk(z, g, msg_w, at_w, whole_buf, whole_state, 1, NULL);
        rc = nm_comm_all_to_all_v(c, msg_w, cnt_w, at_w, msg_r, cnt_r, at_r, NM_DT_F32, err);
        if (rc == 0) range_walk(z, g, msg_r, at_r, range_buf, range_state, 0);
    }
    nm_free(cnt_r);
    nm_free(cnt_w);
    nm_free(at_r);
    nm_free(at_w);
    nm_free(msg_r);
    nm_free(msg_w);
    return rc;
}

int nm_zero_state_exchange(nm_zero *z, float *range_buf, const size_t *range_state, float *whole_buf,
                           const size_t *whole_state, int to_whole, nm_error *err) {
    for (int g = 0; g < 2; g++) {
        if (exchange_group(z, g, range_buf, range_state, whole_buf, whole_state, to_whole, err) != 0) return -1;
    }
    return 0;
}
