// dist_zero_check.c: the distributed optimizer's ranges and its checkpoint exchange
// (src/train/zero.h) at any world size, against closed forms computed here.
//
// The table is the small MoE test model with a 3,000-token tied embedding, so that the
// embedding is most of the dense floats and straddles 3 of 4 ranges. Checked: the ranges
// partition every group (each row's pieces sum to the row over the ranks; every range holds
// at most S = ceil(total / G) floats, the largest within 1.1x the mean); the buckets' pieces
// match the ranges; and moments with a known value per (row, float) survive ranges -> whole
// tensors -> ranges bit for bit, the whole tensors holding exactly the known values.
// Sharded master weights (bf16, nm_zero_shard_master): the GEMM rows' floats outside a rank's
// ranges read zero once released and their whole pages are not resident (mincore); after an
// update the bf16 copy holds every owner's values, the rows read in fp32 are whole, and a save's
// gather makes each whole-tensor owner's rows whole again.
#define _DEFAULT_SOURCE  // mincore
#include <math.h>
#include <sys/mman.h>
#include <unistd.h>

#include "comm/comm.h"
#include "model/config.h"
#include "model/params.h"
#include "train/optim.h"
#include "ops/bf16.h"
#include "train/zero.h"
#include "../test_util.h"
#include "../test_backend.h"

// The moment a float of a row holds: exact in fp32 (below 2^24).
static float known(int row, int64_t k) { return (float)(row * 10000 + (int)(k % 9973)); }

// Whole pages of [p, p + bytes) resident, and how many whole pages there are.
static size_t resident_pages(const void *p, size_t bytes, size_t *pages) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t first = ((uintptr_t)p + page - 1) / page * page, last = ((uintptr_t)p + bytes) / page * page;
    *pages = last > first ? (last - first) / page : 0;
    if (*pages == 0) return 0;
    unsigned char *vec = nm_malloc(*pages);
    EXPECT(mincore((void *)first, last - first, vec) == 0, "mincore failed");
    size_t n = 0;
    for (size_t i = 0; i < *pages; i++) n += vec[i] & 1;
    nm_free(vec);
    return n;
}

static void check_master(nm_zero *z, const nm_param_table *t, nm_comm *w) {
    nm_error err;
    const nm_ops *be = test_backend("cpu");
    int me = w->rank;
    unsigned char *copy_rows = nm_malloc((size_t)t->n_rows);
    int64_t kept = 0, copy_floats = 0;
    for (int i = 0; i < t->n_rows; i++) {
        copy_rows[i] = (unsigned char)nm_param_row_reads_copy(t, i);
        if (t->rows[i].flags & NM_TENSOR_TIED) continue;
        if (copy_rows[i]) copy_floats += t->rows[i].numel;
        else kept += t->rows[i].numel;
    }
    nm_zero_shard_master(z, copy_rows);
    int64_t mine = nm_zero_master_floats(z, me, me), all = mine;
    EXPECT(nm_comm_all_reduce(w, &all, 1, NM_DT_I64, NM_RED_SUM, &err) == 0, "%s", err.msg);
    EXPECT(all == (int64_t)w->size * kept + copy_floats, "master floats over the ranks %lld, want %lld",
           (long long)all, (long long)((int64_t)w->size * kept + copy_floats));
    // Every rank starts whole (known values) and updates its ranges to known + 1.
    float *params = be->alloc(be, t->n_floats * sizeof(float));
    uint16_t *copy = be->alloc(be, t->n_floats * sizeof(uint16_t));
    for (int i = 0; i < t->n_rows; i++) {
        if (t->rows[i].flags & NM_TENSOR_TIED) continue;
        for (int64_t k = 0; k < t->rows[i].numel; k++)
            params[t->rows[i].offset + (size_t)k] = known(i, k) + (k >= z->own_begin[i] && k < z->own_end[i]);
    }
    nm_zero_release_master(z, params, be);
    // the largest row wholly outside this rank's ranges: none of its whole pages resident (asked
    // before anything reads it: a read maps the zero page, which counts as resident)
    int bad = 0, big = -1;
    size_t resident = 0, pages = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (copy_rows[i] && !(r->flags & NM_TENSOR_TIED) && z->own_end[i] == z->own_begin[i] &&
            (big < 0 || r->numel > t->rows[big].numel))
            big = i;
    }
    if (big >= 0) {
        resident = resident_pages(params + t->rows[big].offset, (size_t)t->rows[big].numel * sizeof(float), &pages);
        EXPECT(pages >= 1 && resident == 0, "released row %s: %zu of %zu whole pages resident", t->rows[big].name,
               resident, pages);
    }
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (!copy_rows[i] || (r->flags & NM_TENSOR_TIED)) continue;
        for (int64_t k = 0; k < r->numel; k++)
            if (k < z->own_begin[i] || k >= z->own_end[i]) bad += params[r->offset + (size_t)k] != 0.0f;
    }
    EXPECT(bad == 0, "released master floats: %d not zero", bad);
    EXPECT(nm_zero_all_gather_updated(z, params, copy, NM_BF16, be, &err) == 0, "%s", err.msg);
    nm_zero_copy_whole_rows(z, params, copy, NM_BF16, be);
    int bad_copy = 0, bad_kept = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        for (int64_t k = 0; k < r->numel; k++) {
            float v = known(i, k) + 1.0f;
            bad_copy += copy[r->offset + (size_t)k] != nm_f32_to_bf16(v);
            if (!copy_rows[i]) bad_kept += params[r->offset + (size_t)k] != v;
        }
    }
    EXPECT(bad_copy == 0, "the gathered bf16 copy: %d wrong values", bad_copy);
    EXPECT(bad_kept == 0, "the rows read in fp32, gathered: %d wrong floats", bad_kept);
    EXPECT(nm_zero_gather_master(z, params, &err) == 0, "%s", err.msg);
    bad = 0;
    int64_t rows_whole = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (!z->owned[i] || (r->flags & (NM_TENSOR_TIED | NM_TENSOR_ROUTER_BIAS))) continue;
        rows_whole++;
        for (int64_t k = 0; k < r->numel; k++) bad += params[r->offset + (size_t)k] != known(i, k) + 1.0f;
    }
    EXPECT(bad == 0, "gathered for a save: %d wrong floats in this rank's whole tensors", bad);
    if (me == 0)
        printf("dist_zero_check: master weights: rank 0 keeps %lld of %lld floats; released row %s: %zu of %zu "
               "whole pages resident; copy, fp32 rows and the save's gather exact\n", (long long)mine,
               (long long)(kept + copy_floats), big >= 0 ? t->rows[big].name : "-", resident, pages);
    be->free(be, params);
    be->free(be, copy);
    nm_free(copy_rows);
}

int main(void) {
    nm_error err;
    nm_comm *w;
    if (nm_comm_init(&w, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int R = w->size, me = w->rank;
    const char *root = getenv("NM_ROOT");
    char path[4096];
    snprintf(path, sizeof(path), "%s/tests/data/small-moe-model.json", root ? root : ".");
    nm_model_config cfg;
    if (nm_model_config_load(&cfg, path, &err) != 0) {
        fprintf(stderr, "dist_zero_check: %s (set NM_ROOT to the repository)\n", err.msg);
        return 1;
    }
    cfg.V = 3000;
    cfg.tie_embeddings = 1;
    nm_param_table t;
    EXPECT(nm_param_table_build_tp(&t, &cfg, 0, 1, 0, 1, 1, &err) == 0, "%s", err.msg);
    nm_zero *z = NULL;
    EXPECT(nm_zero_create(&z, &t, w, w, 4096, &err) == 0, "%s", err.msg);
    if (me == 0) printf("dist_zero_check: %d rank(s), %lld dense floats, ranges of %lld, %s over %lld ranges\n", R,
                        (long long)z->total_floats[0], (long long)z->range_floats[0],
                        z->widest_row >= 0 ? t.rows[z->widest_row].name : "-", (long long)z->widest_ranges);
    if (R == 4)
        EXPECT(z->widest_row >= 0 && !strcmp(t.rows[z->widest_row].name, "model.embed_tokens.weight") &&
                   z->widest_ranges == 3,
               "at 4 ranks the embedding should span 3 ranges (widest: %lld)", (long long)z->widest_ranges);

    // Ranges: every row's pieces over the ranks sum to the row; each range within S.
    int64_t *pieces = nm_calloc((size_t)t.n_rows, sizeof(int64_t));
    for (int i = 0; i < t.n_rows; i++) pieces[i] = z->own_end[i] - z->own_begin[i];
    EXPECT(nm_comm_all_reduce(w, pieces, t.n_rows, NM_DT_I64, NM_RED_SUM, &err) == 0, "%s", err.msg);
    int bad = 0;
    for (int i = 0; i < t.n_rows; i++) {
        int64_t want = (t.rows[i].flags & NM_TENSOR_TIED) ? 0 : t.rows[i].numel;
        if (pieces[i] != want) bad++;
    }
    EXPECT(bad == 0, "%d rows whose pieces do not add up to the row", bad);
    int64_t most = z->owned_floats, sum = z->owned_floats;
    EXPECT(nm_comm_all_reduce(w, &most, 1, NM_DT_I64, NM_RED_MAX, &err) == 0, "%s", err.msg);
    EXPECT(nm_comm_all_reduce(w, &sum, 1, NM_DT_I64, NM_RED_SUM, &err) == 0, "%s", err.msg);
    EXPECT(sum == z->total_floats[0] + z->total_floats[1], "ranges hold %lld floats of %lld", (long long)sum,
           (long long)(z->total_floats[0] + z->total_floats[1]));
    EXPECT(most <= z->range_floats[0] + z->range_floats[1] && (double)most <= 1.1 * (double)sum / R + 64,
           "largest range %lld floats, mean %.1f", (long long)most, (double)sum / R);

    // Buckets: this rank's piece of each is exactly its range's floats there (plus padding).
    int64_t in_buckets = 0;
    for (int b = 0; b < z->n_buckets; b++) in_buckets += z->buckets[b].counts[me];
    EXPECT(in_buckets >= z->owned_floats && in_buckets <= z->owned_floats + 64 * (int64_t)t.n_rows,
           "bucket pieces %lld vs range %lld", (long long)in_buckets, (long long)z->owned_floats);

    // The checkpoint exchange, both ways, bit for bit.
    nm_adamw_config acfg = {0.9, 0.95, 1e-8, 0.1, 0, 0};
    nm_optimizer *o = NULL;
    EXPECT(nm_optimizer_create_ranges(&o, &t, &acfg, z->own_begin, z->own_end, test_backend("cpu"), &err) == 0, "%s", err.msg);
    for (int i = 0; i < t.n_rows; i++) {
        if (o->row_state[i] == SIZE_MAX) continue;
        for (int64_t k = z->own_begin[i]; k < z->own_end[i]; k++) o->m[o->row_state[i] + (size_t)(k - z->own_begin[i])] = known(i, k);
    }
    size_t nw = nm_optimizer_state_floats(&t, z->owned);
    float *whole = nm_malloc((nw ? nw : 1) * sizeof(float));
    size_t *whole_state = nm_malloc((size_t)t.n_rows * sizeof(size_t));
    nm_optimizer_state_offsets(&t, z->owned, whole_state);
    for (size_t i = 0; i < nw; i++) whole[i] = -1.0f;
    EXPECT(nm_zero_state_exchange(z, o->m, o->row_state, whole, whole_state, 1, &err) == 0, "%s", err.msg);
    bad = 0;
    int64_t whole_rows = 0;
    for (int i = 0; i < t.n_rows; i++) {
        if (whole_state[i] == SIZE_MAX) continue;
        whole_rows++;
        for (int64_t k = 0; k < t.rows[i].numel; k++) bad += whole[whole_state[i] + (size_t)k] != known(i, k);
    }
    EXPECT(bad == 0, "ranges -> whole tensors: %d wrong floats", bad);
    EXPECT(nm_comm_all_reduce(w, &whole_rows, 1, NM_DT_I64, NM_RED_SUM, &err) == 0, "%s", err.msg);
    for (size_t i = 0; i < o->n_state; i++) o->m[i] = 0.0f;
    EXPECT(nm_zero_state_exchange(z, o->m, o->row_state, whole, whole_state, 0, &err) == 0, "%s", err.msg);
    bad = 0;
    for (int i = 0; i < t.n_rows; i++) {
        if (o->row_state[i] == SIZE_MAX) continue;
        for (int64_t k = z->own_begin[i]; k < z->own_end[i]; k++)
            bad += o->m[o->row_state[i] + (size_t)(k - z->own_begin[i])] != known(i, k);
    }
    EXPECT(bad == 0, "whole tensors -> ranges: %d wrong floats", bad);
    if (me == 0) printf("dist_zero_check: %lld rows written whole over the ranks, round trip exact\n", (long long)whole_rows);

    check_master(z, &t, w);

    nm_free(whole);
    nm_free(whole_state);
    nm_free(pieces);
    nm_optimizer_destroy(o);
    nm_zero_destroy(z);
    nm_param_table_free(&t);
    nm_model_config_free(&cfg);
    int all_fail = failures;
    nm_comm_all_reduce(w, &all_fail, 1, NM_DT_I32, NM_RED_SUM, &err);
    if (me == 0) printf("dist_zero_check: %s\n", all_fail ? "FAILED" : "ok");
    nm_comm_destroy(w);
    return all_fail != 0;
}
