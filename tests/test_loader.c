// test_loader.c: the trainer's sample stream (src/data/loader.c, blend.c):
//  - blend proportions: every prefix of the stream within one sample of weight * prefix_len;
//  - a restored cursor continues exactly the uninterrupted stream (across epochs, blended);
//  - train and valid splits use disjoint sequences, each inside its book-ends;
//  - rank slices are disjoint and together are the world-1 batch, row for row;
//  - compat mode: the first num_samples samples are GPTDataset's with that num_samples;
//  - the synthetic corpus needs no files; errors name the dataset;
//  - the blend's index mappings cached as Megatron's arrays give the same stream.
// Datasets are random (fresh seed, printed; NM_TEST_SEED reproduces) and every token encodes
// (dataset, sequence, position), so each row tells where it came from.
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "core/rng.h"
#include "data/blend.h"
#include "data/gpt_dataset.h"
#include "data/indexed.h"
#include "data/loader.h"
#include "io/npy.h"

#include "test_util.h"

static uint64_t key, ctr;
static uint64_t rnd(uint64_t n) { return nm_rng_u64(key, ctr++) % n; }
static char dir[64];

// token = dataset * 10^8 + sequence * 1000 + position
#define TOK(d, s, p) ((int32_t)((d) * 100000000 + (s) * 1000 + (p)))
static int tok_dataset(int32_t t) { return t / 100000000; }
static int tok_seq(int32_t t) { return (t % 100000000) / 1000; }

static void write_dataset(const char *prefix, int d, int S, int max_len) {
    nm_indexed_writer *w;
    nm_error err;
    NM_CHECK(nm_indexed_writer_create(&w, prefix, NM_IDX_INT32, &err) == 0, "%s", err.msg);
    int32_t buf[1000];
    for (int s = 0; s < S; s++) {
        int len = 1 + (int)rnd((uint64_t)max_len);
        for (int p = 0; p < len; p++) buf[p] = TOK(d, s, p);
        NM_CHECK(nm_indexed_writer_add_document(w, buf, len, &err) == 0, "%s", err.msg);
    }
    NM_CHECK(nm_indexed_writer_finalize(w, &err) == 0, "%s", err.msg);
    nm_indexed_writer_destroy(w);
}

static nm_loader *make(const nm_data_spec *spec, int which, int rank, int world) {
    nm_loader *l;
    nm_error err;
    NM_CHECK(nm_loader_create(&l, spec, which, rank, world, &err) == 0, "%s", err.msg);
    return l;
}

// Deviation of the counts from w * prefix_len, split by sign.
static void track(const int64_t *counts, const double *w, int n, int64_t len, double *over, double *under) {
    for (int i = 0; i < n; i++) {
        double d = (double)counts[i] - w[i] * (double)len;
        if (d > *over) *over = d;
        if (-d > *under) *under = -d;
    }
}

// Megatron's greedy (formats.md 1.8) picks a dataset only when its deficit w_i * s - count_i is
// >= 0, so no dataset is ever more than 1 sample ahead of w_i * prefix_len (provable). With
// two datasets that also bounds the lag by 1. With three or more, its lagged rule
// (t = max(s, 1), not s + 1) lets a dataset fall behind by more than 1: up to ~1.35 samples
// measured for weights like these (and ~1.8 for very skewed ones). We keep Megatron's rule
// for exact compatibility and check lag < 2 there.
static void check_bounds(int n, double over, double under, const char *what) {
    EXPECT(over <= 1.0 + 1e-9, "%s: a dataset of %d ran %.3f samples ahead of its weight", what, n, over);
    EXPECT(under <= (n == 2 ? 1.0 + 1e-9 : 2.0), "%s: a dataset of %d fell %.3f samples behind its weight", what, n, under);
}

static void test_blend_indices(void) {
    // Megatron's greedy rule on random weights, every prefix of the stream.
    for (int it = 0; it < 20; it++) {
        int n = 2 + (int)rnd(6);
        double raw[8], w[8];
        for (int i = 0; i < n; i++) raw[i] = 0.01 + (double)rnd(1000);
        NM_CHECK(nm_blend_normalize(raw, n, w) == 0, "normalize");
        int64_t size = 20000;
        int16_t *di = nm_malloc(sizeof(int16_t) * (size_t)size);
        int64_t *dsi = nm_malloc(sizeof(int64_t) * (size_t)size);
        nm_blend_build_indices(w, n, size, di, dsi);
        int64_t counts[8] = {0};
        double over = 0, under = 0;
        for (int64_t s = 0; s < size; s++) {
            EXPECT(dsi[s] == counts[di[s]], "sample index of %lld", (long long)s);
            counts[di[s]]++;
            track(counts, w, n, s + 1, &over, &under);
        }
        check_bounds(n, over, under, "build_blending_indices");
        nm_free(di);
        nm_free(dsi);
    }
    double bad[2] = {1, -1}, out[2];
    EXPECT(nm_blend_normalize(bad, 2, out) != 0, "negative weight accepted");
    // Ties go to the lowest index: equal weights alternate 0, 1, 0, 1 after the first pick.
    double eq[2] = {0.5, 0.5};
    int16_t di[6];
    int64_t dsi[6];
    nm_blend_build_indices(eq, 2, 6, di, dsi);
    EXPECT(di[0] == 0 && di[1] == 1 && di[2] == 0 && di[3] == 1, "tie order %d %d %d %d", di[0], di[1], di[2], di[3]);
    EXPECT(nm_blend_dataset_size(0.3, 1000, 0.005) == 302, "dataset size %lld", (long long)nm_blend_dataset_size(0.3, 1000, 0.005));
}

static void test_blend_stream(const nm_data_spec *spec) {
    nm_loader *l = make(spec, NM_SPLIT_TRAIN, 0, 1);
    int64_t L = spec->seq_len, n = 3000, counts[3] = {0};
    double w[3], over = 0, under = 0;
    nm_blend_normalize(spec->weights, 3, w);
    int32_t *row = nm_malloc(sizeof(int32_t) * (size_t)(L + 1));
    nm_error err;
    for (int64_t s = 0; s < n; s++) {
        NM_CHECK(nm_loader_next_batch(l, row, 1, &err) == 0, "%s", err.msg);
        int d = tok_dataset(row[0]);
        for (int64_t k = 1; k <= L; k++) EXPECT(tok_dataset(row[k]) == d, "row mixes datasets");
        counts[d]++;
        track(counts, w, 3, s + 1, &over, &under);
    }
    check_bounds(3, over, under, "loader");
    nm_free(row);
    nm_loader_destroy(l);
}

// Reads `steps` batches of B rows into out (steps * B rows).
static void read_rows(nm_loader *l, int64_t steps, int64_t B, int32_t *out) {
    int64_t row = nm_loader_seq_len(l) + 1;
    nm_error err;
    for (int64_t s = 0; s < steps; s++) NM_CHECK(nm_loader_next_batch(l, out + s * B * row, B, &err) == 0, "%s", err.msg);
}

static void test_resume(const nm_data_spec *spec, const char *what) {
    int64_t B = 3, total = 400, cut = 150 + (int64_t)rnd(100);   // well past one epoch of the small datasets
    int64_t row = spec->seq_len + 1;
    int32_t *a = nm_malloc(sizeof(int32_t) * (size_t)(total * B * row));
    int32_t *b = nm_malloc(sizeof(int32_t) * (size_t)((total - cut) * B * row));
    nm_loader *l = make(spec, NM_SPLIT_TRAIN, 0, 1);
    read_rows(l, total, B, a);
    nm_loader_destroy(l);
    l = make(spec, NM_SPLIT_TRAIN, 0, 1);
    int32_t *skip = nm_malloc(sizeof(int32_t) * (size_t)(cut * B * row));
    read_rows(l, cut, B, skip);
    nm_data_cursor c = nm_loader_get_cursor(l);
    EXPECT(c.sample == cut * B, "%s: cursor %lld after %lld samples", what, (long long)c.sample, (long long)(cut * B));
    nm_loader_destroy(l);
    l = make(spec, NM_SPLIT_TRAIN, 0, 1);
    nm_loader_set_cursor(l, c);
    read_rows(l, total - cut, B, b);
    EXPECT(memcmp(a + cut * B * row, b, sizeof(int32_t) * (size_t)((total - cut) * B * row)) == 0,
           "%s: resumed stream differs from the uninterrupted one", what);
    // Random access agrees with the stream too.
    int32_t *one = nm_malloc(sizeof(int32_t) * (size_t)row);
    nm_error err;
    int64_t s = (int64_t)rnd((uint64_t)(total * B));
    NM_CHECK(nm_loader_sample(l, s, one, &err) == 0, "%s", err.msg);
    EXPECT(memcmp(one, a + s * row, sizeof(int32_t) * (size_t)row) == 0, "%s: nm_loader_sample(%lld)", what, (long long)s);
    // The stream really went through several epochs (chunks): every sample is still valid.
    for (int64_t r = 0; r < total * B; r++) {
        for (int64_t k = 1; k < row; k++) {
            int32_t p = a[r * row + k - 1], q = a[r * row + k];
            // Inside a row, tokens follow each other within a sequence, or a sequence starts
            // (possibly the same one again: a multi-epoch document_index can repeat it).
            EXPECT(q == p + 1 || q % 1000 == 0, "%s: row %lld not contiguous (%d after %d)", what, (long long)r, q, p);
        }
    }
    nm_free(one);
    nm_free(skip);
    nm_free(a);
    nm_free(b);
    nm_loader_destroy(l);
}

static void test_ranks(const nm_data_spec *spec) {
    int world = 3;
    int64_t B = 2, steps = 50, row = spec->seq_len + 1;
    int32_t *ref = nm_malloc(sizeof(int32_t) * (size_t)(steps * B * world * row));
    nm_loader *l = make(spec, NM_SPLIT_TRAIN, 0, 1);
    read_rows(l, steps, B * world, ref);
    nm_loader_destroy(l);
    int32_t *mine = nm_malloc(sizeof(int32_t) * (size_t)(steps * B * row));
    for (int r = 0; r < world; r++) {
        l = make(spec, NM_SPLIT_TRAIN, r, world);
        read_rows(l, steps, B, mine);
        EXPECT(nm_loader_get_cursor(l).sample == steps * B * world, "rank %d cursor", r);
        for (int64_t s = 0; s < steps; s++) {
            // Rank r holds rows [r B, (r+1) B) of each global micro-batch of B * world rows.
            EXPECT(memcmp(mine + s * B * row, ref + (s * B * world + r * B) * row, sizeof(int32_t) * (size_t)(B * row)) == 0,
                   "rank %d step %lld: rows are not its slice of the global batch", r, (long long)s);
        }
        nm_loader_destroy(l);
    }
    nm_free(mine);
    nm_free(ref);
}

static void test_split(const char *prefix, int S) {
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    spec.n_sources = 1;
    spec.prefixes = &prefix;
    spec.seq_len = 16;
    spec.split[0] = 80;
    spec.split[1] = 20;
    int64_t bound = (int64_t)nearbyint(0.8 * S);
    char *seen = calloc((size_t)S, 1);
    for (int which = 0; which < 2; which++) {
        nm_loader *l = make(&spec, which, 0, 1);
        int64_t row = spec.seq_len + 1;
        int32_t *buf = nm_malloc(sizeof(int32_t) * (size_t)row);
        nm_error err;
        int64_t n = nm_loader_tokens(l) / spec.seq_len;   // one epoch's worth
        for (int64_t s = 0; s < n; s++) {
            NM_CHECK(nm_loader_next_batch(l, buf, 1, &err) == 0, "%s", err.msg);
            for (int64_t k = 0; k < row; k++) {
                int q = tok_seq(buf[k]);
                EXPECT(which == 0 ? q < bound : q >= bound, "%s sample uses sequence %d (boundary %lld)", which ? "valid" : "train",
                       q, (long long)bound);
                if (q >= 0 && q < S) {
                    EXPECT(!(seen[q] & (1 << (1 - which))), "sequence %d in both splits", q);
                    seen[q] |= (char)(1 << which);
                }
            }
        }
        nm_free(buf);
        nm_loader_destroy(l);
    }
    free(seen);
    // An empty split is an error naming it.
    spec.split[0] = 100;
    spec.split[1] = 0;
    nm_loader *l;
    nm_error err;
    EXPECT(nm_loader_create(&l, &spec, NM_SPLIT_VALID, 0, 1, &err) != 0 && strstr(err.msg, "valid split is empty"), "%s", err.msg);
}

static void test_compat(const char *prefix) {
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    spec.n_sources = 1;
    spec.prefixes = &prefix;
    spec.seq_len = 24;
    spec.seed = (uint32_t)rnd(1u << 31);
    spec.num_samples[NM_SPLIT_TRAIN] = 500 + (int64_t)rnd(2000);
    nm_loader *l = make(&spec, NM_SPLIT_TRAIN, 0, 1);
    nm_indexed *ds;
    nm_error err;
    NM_CHECK(nm_indexed_open(&ds, prefix, &err) == 0, "%s", err.msg);
    nm_gpt_config c = {.seq_len = 24, .add_extra_token = 1, .seed = spec.seed, .num_samples = spec.num_samples[0]};
    nm_gpt_split_range(spec.split, 3, 0, ds->n_seqs, &c.seq_begin, &c.seq_end);
    nm_gpt_dataset *g;
    NM_CHECK(nm_gpt_dataset_create(&g, ds, &c, &err) == 0, "%s", err.msg);
    int32_t a[25], b[25];
    for (int64_t s = 0; s < c.num_samples; s++) {
        NM_CHECK(nm_loader_next_batch(l, a, 1, &err) == 0, "%s", err.msg);
        NM_CHECK(nm_gpt_dataset_get(g, s, b, &err) == 0, "%s", err.msg);
        if (memcmp(a, b, sizeof(a)) != 0) {
            EXPECT(0, "compat sample %lld differs from GPTDataset(num_samples=%lld)", (long long)s, (long long)c.num_samples);
            break;
        }
    }
    nm_gpt_dataset_destroy(g);
    nm_indexed_close(ds);
    nm_loader_destroy(l);
}

static void test_synthetic_and_errors(void) {
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    spec.synthetic_tokens = 100000;
    spec.seq_len = 64;
    nm_loader *l = make(&spec, NM_SPLIT_TRAIN, 0, 1);
    double floor = nm_loader_entropy_floor(l);
    EXPECT(floor > 0.1 && floor < 2.0, "synthetic floor %g", floor);
    char desc[256];
    nm_loader_describe(l, desc, sizeof(desc));
    EXPECT(strstr(desc, "synthetic") != NULL, "describe: %s", desc);
    int32_t rows[2 * 65];
    nm_error err;
    NM_CHECK(nm_loader_next_batch(l, rows, 2, &err) == 0, "%s", err.msg);
    for (int k = 0; k < 2 * 65; k++) EXPECT(rows[k] >= 0 && rows[k] <= 256, "synthetic token %d", rows[k]);
    nm_loader_destroy(l);
    static const char *const missing = "no/such/dataset";
    spec.n_sources = 1;
    spec.prefixes = &missing;
    EXPECT(nm_loader_create(&l, &spec, NM_SPLIT_TRAIN, 0, 1, &err) != 0 && strstr(err.msg, "no/such/dataset.idx"), "%s", err.msg);
}

// A blend of thousands of sources (real blends list thousands of shards; the spec once held
// at most 64 and the trainer copied past the end): 5000 copies of one dataset with equal
// weights must load and give the blend's round-robin order.
static void test_many_sources(const char *prefix) {
    enum { N = 5000 };
    const char **list = nm_malloc(N * sizeof(char *));
    double *w = nm_malloc(N * sizeof(double));
    for (int i = 0; i < N; i++) list[i] = prefix, w[i] = 1.0;
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    spec.n_sources = N;
    spec.prefixes = list;
    spec.weights = w;
    spec.seq_len = 8;
    nm_loader *l = make(&spec, NM_SPLIT_TRAIN, 0, 1);
    nm_free(list);   // borrowed during create only
    nm_free(w);
    int32_t rows[4 * 9];
    nm_error err;
    NM_CHECK(nm_loader_next_batch(l, rows, 4, &err) == 0, "%s", err.msg);
    // Equal weights: samples 0..N-1 take one from each source in turn, so the first samples are
    // every copy's sample 0, identical rows.
    for (int r = 1; r < 4; r++) EXPECT(!memcmp(rows, rows + r * 9, 9 * sizeof(int32_t)), "row %d differs from row 0", r);
    EXPECT(nm_loader_get_cursor(l).sample == 4, "cursor %lld", (long long)nm_loader_get_cursor(l).sample);
    nm_loader_destroy(l);
}

// The blend's index mappings cached (data.cache_dir with a known size, loader.c): the stream,
// random access and cursors anywhere (inside the arrays and past them, where the greedy rule
// takes over) equal the uncached loader's; the files are Megatron's BlendedDataset arrays
// (int16 dataset_index, int64 dataset_sample_index, equal to build_blending_indices); a second
// loader maps them unchanged; a truncated one is rebuilt, and the stream is still the same.
static void test_blend_cache(const nm_data_spec *base) {
    char cache[128];
    snprintf(cache, sizeof cache, "%s/blend_cache", dir);
    nm_data_spec plain = *base, cached = *base;
    const int64_t size = 500, B = 4, steps = 200;   // 800 samples: the last 300 past the arrays
    plain.num_samples[NM_SPLIT_TRAIN] = cached.num_samples[NM_SPLIT_TRAIN] = size;
    cached.cache_dir = cache;
    int64_t row = base->seq_len + 1;
    int32_t *a = nm_malloc(sizeof(int32_t) * (size_t)(steps * B * row)), *b = nm_malloc(sizeof(int32_t) * (size_t)(steps * B * row));
    nm_loader *lp = make(&plain, NM_SPLIT_TRAIN, 0, 1), *lc = make(&cached, NM_SPLIT_TRAIN, 0, 1);
    read_rows(lp, steps, B, a);
    read_rows(lc, steps, B, b);
    int64_t first_diff = -1;
    for (int64_t r = 0; r < steps * B && first_diff < 0; r++)
        if (memcmp(a + r * row, b + r * row, sizeof(int32_t) * (size_t)row)) first_diff = r;
    EXPECT(first_diff < 0, "cached blend: sample %lld of the stream differs from the greedy one (dataset %d vs %d)",
           (long long)first_diff, first_diff >= 0 ? tok_dataset(a[first_diff * row]) : -1,
           first_diff >= 0 ? tok_dataset(b[first_diff * row]) : -1);
    // the files, against the builder
    char idx_path[512] = "", smp_path[512] = "";
    DIR *dd = opendir(cache);
    EXPECT(dd != NULL, "no blend cache directory %s", cache);
    for (struct dirent *e; dd && (e = readdir(dd));) {
        if (strstr(e->d_name, "-BlendedDataset-dataset_index.npy")) snprintf(idx_path, sizeof idx_path, "%s/%s", cache, e->d_name);
        if (strstr(e->d_name, "-BlendedDataset-dataset_sample_index.npy")) snprintf(smp_path, sizeof smp_path, "%s/%s", cache, e->d_name);
    }
    if (dd) closedir(dd);
    EXPECT(idx_path[0] && smp_path[0], "the blend's .npy files are missing from %s", cache);
    nm_npy mi = {0}, ms = {0};
    nm_error err;
    double w[3];
    nm_blend_normalize(base->weights, 3, w);
    // Megatron's blend size for the split: sum_i ceil(S w_i)
    int64_t blend_size = 0;
    for (int i = 0; i < 3; i++) blend_size += (int64_t)ceil((double)size * w[i]);
    if (idx_path[0] && smp_path[0]) {
        NM_CHECK(nm_npy_map(&mi, idx_path, &err) == 0 && nm_npy_map(&ms, smp_path, &err) == 0, "%s", err.msg);
        int16_t *di = nm_malloc(sizeof(int16_t) * (size_t)blend_size);
        int64_t *dsi = nm_malloc(sizeof(int64_t) * (size_t)blend_size);
        nm_blend_build_indices(w, 3, blend_size, di, dsi);
        EXPECT(!strcmp(mi.descr, "<i2") && !strcmp(ms.descr, "<i8") && mi.shape[0] == blend_size &&
                   ms.shape[0] == blend_size,
               "blend arrays: %s %lld / %s %lld, expected %lld rows", mi.descr, (long long)mi.shape[0], ms.descr,
               (long long)ms.shape[0], (long long)blend_size);
        EXPECT(!memcmp(mi.data, di, sizeof(int16_t) * (size_t)blend_size) &&
                   !memcmp(ms.data, dsi, sizeof(int64_t) * (size_t)blend_size),
               "the cached blend arrays differ from build_blending_indices");
        nm_free(di);
        nm_free(dsi);
        nm_npy_unmap(&mi);
        nm_npy_unmap(&ms);
    }
    // cursors inside and past the arrays, and random access
    int64_t at[4] = {0, 123, blend_size, blend_size + 77};
    int32_t *one = nm_malloc(sizeof(int32_t) * (size_t)(B * row));
    for (int k = 0; k < 4; k++) {
        nm_loader_set_cursor(lc, (nm_data_cursor){.sample = at[k]});
        NM_CHECK(nm_loader_next_batch(lc, one, B, &err) == 0, "%s", err.msg);
        EXPECT(!memcmp(one, a + at[k] * row, sizeof(int32_t) * (size_t)(B * row)), "cached blend: cursor %lld differs",
               (long long)at[k]);
        NM_CHECK(nm_loader_sample(lc, at[k] + 1, one, &err) == 0, "%s", err.msg);
        EXPECT(!memcmp(one, a + (at[k] + 1) * row, sizeof(int32_t) * (size_t)row), "cached blend: sample %lld differs",
               (long long)(at[k] + 1));
    }
    nm_loader_destroy(lc);
    // a truncated array is rebuilt (with a notice on stderr), and the stream is the same
    if (idx_path[0]) NM_CHECK(truncate(idx_path, 100) == 0, "truncate %s", idx_path);
    lc = make(&cached, NM_SPLIT_TRAIN, 0, 1);
    read_rows(lc, steps, B, b);
    EXPECT(!memcmp(a, b, sizeof(int32_t) * (size_t)(steps * B * row)), "rebuilt blend cache: the stream differs");
    NM_CHECK(nm_npy_map(&mi, idx_path, &err) == 0, "the truncated blend array was not rebuilt: %s", err.msg);
    nm_npy_unmap(&mi);
    nm_free(one);
    nm_free(a);
    nm_free(b);
    nm_loader_destroy(lp);
    nm_loader_destroy(lc);
}

int main(void) {
    uint64_t seed = test_seed("test_loader");
    key = nm_rng_key(seed, NM_RNG_TEST, 3, 0);
    snprintf(dir, sizeof(dir), "test_loader_XXXXXX");
    NM_CHECK(mkdtemp(dir), "mkdtemp");
    char prefixes[3][128];
    int sizes[3] = {40 + (int)rnd(40), 20 + (int)rnd(40), 60 + (int)rnd(100)};
    for (int d = 0; d < 3; d++) {
        snprintf(prefixes[d], sizeof(prefixes[d]), "%s/ds%d", dir, d);
        write_dataset(prefixes[d], d, sizes[d], 80);
    }
    const char *prefix_list[3];
    double weights[3];
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    spec.n_sources = 3;
    for (int d = 0; d < 3; d++) {
        prefix_list[d] = prefixes[d];
        weights[d] = 1 + (double)rnd(10);
    }
    spec.prefixes = prefix_list;
    spec.weights = weights;
    spec.seq_len = 8 + (int64_t)rnd(24);
    spec.seed = (uint32_t)rnd(1u << 31);

    test_blend_indices();
    test_blend_stream(&spec);
    test_resume(&spec, "blend of 3");
    nm_data_spec one = spec;
    one.n_sources = 1;
    test_resume(&one, "one dataset");
    one.num_samples[NM_SPLIT_TRAIN] = 300;   // compat chunk 0, then one-epoch chunks
    test_resume(&one, "one dataset, compat");
    test_ranks(&spec);
    test_split(prefixes[2], sizes[2]);
    test_compat(prefixes[2]);
    test_synthetic_and_errors();
    test_many_sources(prefixes[2]);
    test_blend_cache(&spec);
    test_remove_tree(dir);
    if (failures) {
        fprintf(stderr, "test_loader: %d failures (seed %llu)\n", failures, (unsigned long long)seed);
        return 1;
    }
    printf("test_loader: ok\n");
    return 0;
}
