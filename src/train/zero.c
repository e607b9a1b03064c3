// zero.c: ZeRO-1 ownership, buckets, reduce-scatter and all-gather (see zero.h).
#include "train/zero.h"

#include <limits.h>
#include <string.h>

static int row_group(const nm_tensor_spec *r) { return (r->flags & NM_TENSOR_EXPERT) ? 1 : 0; }

static void add_bucket(nm_zero *z, int first, int last, int group, int cap) {
    NM_CHECK(z->n_buckets < cap, "bucket list overflow");
    const nm_param_table *t = z->table;
    nm_comm *c = group ? z->edp : z->dp;
    nm_zero_bucket *b = &z->buckets[z->n_buckets++];
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
    // Each row's piece runs to the next row's start (alignment padding goes with the row before it).
    int prev = -1;
    for (int i = first; i <= last; i++) {
        if (t->rows[i].flags & NM_TENSOR_TIED) continue;
        if (prev >= 0) b->counts[z->row_owner[prev]] += (int64_t)(t->rows[i].offset - t->rows[prev].offset);
        prev = i;
    }
    b->counts[z->row_owner[prev]] += t->rows[prev].numel;
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
    for (int i = 0; i < t->n_rows; i++) {
        if (t->rows[i].flags & NM_TENSOR_TIED) continue;
        z->total_floats[row_group(&t->rows[i])] += t->rows[i].numel;
    }
    // Owner = the group rank whose 1/G share of the group's floats holds the row's middle.
    int64_t seen[2] = {0, 0};
    size_t last_end = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        z->row_owner[i] = -1;
        if (r->flags & NM_TENSOR_TIED) continue;
        NM_CHECK(r->offset >= last_end, "table rows are not in buffer order at %s", r->name);
        last_end = r->offset + (size_t)r->numel;
        int g = row_group(r);
        int64_t G = (g ? edp : dp)->size;
        int64_t mid2 = 2 * seen[g] + r->numel;  // twice the row's middle, in floats
        int64_t owner = mid2 * G / (2 * (z->total_floats[g] > 0 ? z->total_floats[g] : 1));
        z->row_owner[i] = (int)(owner < G ? owner : G - 1);
        seen[g] += r->numel;
        z->owned[i] = z->row_owner[i] == (g ? edp : dp)->rank;
        if (z->owned[i]) z->owned_floats += r->numel;
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
    (void)err;
    *out = z;
    return 0;
}

void nm_zero_destroy(nm_zero *z) {
    if (!z) return;
    for (int b = 0; b < z->n_buckets; b++) nm_free(z->buckets[b].counts);
    nm_free(z->buckets);
    nm_free(z->reqs);
    nm_free(z->started);
    nm_free(z->row_owner);
    nm_free(z->owned);
    nm_free(z);
}

void nm_zero_begin(nm_zero *z, float *grads) {
    z->grads = grads;
    memset(z->started, 0, (size_t)(z->n_buckets > 0 ? z->n_buckets : 1));
    z->n_started_early = 0;
    z->floats_started_early = 0;
}

static int start_bucket(nm_zero *z, int b, nm_error *err) {
    nm_zero_bucket *k = &z->buckets[b];
    z->started[b] = 1;
    return nm_comm_reduce_scatter_start(k->expert ? z->edp : z->dp, z->grads + k->offset, k->counts, NM_DT_F32,
                                        &z->reqs[b], err);
}

int nm_zero_layer_done(nm_zero *z, int layer, nm_error *err) {
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
        if (z->started[b] && nm_comm_test(&z->reqs[b], &done, err) != 0) return -1;
    }
    return 0;
}

int nm_zero_finish(nm_zero *z, nm_error *err) {
    int rc = 0;
    for (int b = z->n_buckets - 1; b >= 0 && rc == 0; b--) {
        if (!z->started[b]) rc = start_bucket(z, b, err);
    }
    // Every started request is completed, even after an error, so none is left in flight.
    for (int b = 0; b < z->n_buckets; b++) {
        nm_error wait_err;
        if (z->started[b] && nm_comm_wait(&z->reqs[b], rc == 0 ? err : &wait_err) != 0) rc = -1;
    }
    return rc;
}

int nm_zero_reduce_scatter_grads(nm_zero *z, float *grads, nm_error *err) {
    nm_zero_begin(z, grads);
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
