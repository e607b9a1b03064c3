// test_gpt_dataset.c: numpy's legacy shuffle (src/data/mt19937.c) against the check values of
// formats.md 1.9, and GPTDataset (src/data/gpt_dataset.c) invariants on random datasets:
// the epoch count and separate-final-epoch rule, document_index multiplicities,
// shuffle_index a permutation (final epoch last when separate), samples of L+1 tokens that in
// sample_index order tile the shuffled document stream with one token of overlap, and the
// split book-ends with Python's half-to-even rounding. Exact agreement with a numpy
// re-implementation of Megatron is tests/interop/test_megatron_compat.py.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "core/rng.h"
#include "data/gpt_dataset.h"
#include "data/mt19937.h"

#include "test_util.h"

static uint64_t key, ctr;
static uint64_t rnd(uint64_t n) { return nm_rng_u64(key, ctr++) % n; }

static void test_numpy_check_values(void) {
    nm_mt19937 r;
    nm_mt19937_seed(&r, 5489);
    uint32_t first = nm_mt19937_next32(&r);
    EXPECT(first == 3499211612u, "seed 5489 first output %u", first);
    // RandomState(s).shuffle(arange(10)) (numpy's documented permutation for seed 0).
    static const int32_t want0[10] = {2, 8, 4, 9, 1, 6, 7, 3, 0, 5};
    static const int32_t want1234[10] = {7, 2, 9, 1, 0, 8, 4, 5, 6, 3};
    int32_t a[10];
    int64_t b[10];
    for (int pass = 0; pass < 2; pass++) {
        const int32_t *want = pass ? want1234 : want0;
        for (int i = 0; i < 10; i++) a[i] = i, b[i] = i;
        nm_mt19937_seed(&r, pass ? 1234 : 0);
        nm_mt19937_shuffle_i32(&r, a, 10);
        nm_mt19937_seed(&r, pass ? 1234 : 0);
        nm_mt19937_shuffle_i64(&r, b, 10);
        for (int i = 0; i < 10; i++) {
            EXPECT(a[i] == want[i] && b[i] == want[i], "seed %d position %d: %d / %lld, want %d", pass ? 1234 : 0, i, a[i],
                   (long long)b[i], want[i]);
        }
    }
    // random_interval stays in range, and its 64-bit path (max > 2^32-1) too.
    nm_mt19937_seed(&r, 7);
    for (int i = 0; i < 1000; i++) {
        uint64_t m = 1 + rnd(1000), big = ((uint64_t)1 << 40) + rnd(1000);
        EXPECT(nm_mt19937_interval(&r, m) <= m, "interval(%llu)", (unsigned long long)m);
        EXPECT(nm_mt19937_interval(&r, big) <= big, "interval(%llu)", (unsigned long long)big);
    }
}

static void test_split(void) {
    double w[3] = {99, 1, 0};
    int64_t b, e;
    nm_gpt_split_range(w, 3, 0, 1000, &b, &e);
    EXPECT(b == 0 && e == 990, "99,1,0 train [%lld,%lld)", (long long)b, (long long)e);
    nm_gpt_split_range(w, 3, 1, 1000, &b, &e);
    EXPECT(b == 990 && e == 1000, "99,1,0 valid [%lld,%lld)", (long long)b, (long long)e);
    nm_gpt_split_range(w, 3, 2, 1000, &b, &e);
    EXPECT(b == e, "99,1,0 test not empty");
    // 1,1 of 5: the book-end 2.5 rounds half to even (Python round) -> 2.
    double h[2] = {1, 1};
    nm_gpt_split_range(h, 2, 0, 5, &b, &e);
    EXPECT(b == 0 && e == 2, "1,1 of 5 train [%lld,%lld), want [0,2)", (long long)b, (long long)e);
    nm_gpt_split_range(h, 2, 1, 7, &b, &e);
    EXPECT(b == 4 && e == 7, "1,1 of 7 valid [%lld,%lld), want [4,7)", (long long)b, (long long)e);
    // Splits of random weights tile [0, N) without overlap.
    for (int it = 0; it < 100; it++) {
        double r[3] = {(double)rnd(100), (double)rnd(100), (double)(1 + rnd(100))};
        int64_t n = (int64_t)rnd(10000), prev = 0;
        for (int k = 0; k < 3; k++) {
            nm_gpt_split_range(r, 3, k, n, &b, &e);
            EXPECT(b == prev && e >= b, "split %d of %g,%g,%g: [%lld,%lld) after %lld", k, r[0], r[1], r[2], (long long)b,
                   (long long)e, (long long)prev);
            prev = e;
        }
        EXPECT(prev == n, "splits end at %lld of %lld", (long long)prev, (long long)n);
    }
}

// A random in-memory dataset of S sequences (some empty) with token = 1000 * seq + position,
// so every token says where it came from.
static nm_indexed *random_dataset(int64_t S, int max_len) {
    int32_t *lens = nm_malloc(sizeof(int32_t) * (size_t)S);
    int64_t *docs = nm_malloc(sizeof(int64_t) * (size_t)(S + 1));
    int64_t total = 0;
    for (int64_t i = 0; i < S; i++) {
        lens[i] = rnd(8) == 0 ? 0 : 1 + (int32_t)rnd((uint64_t)max_len);
        total += lens[i];
        docs[i] = i;
    }
    docs[S] = S;
    int32_t *bin = nm_malloc(sizeof(int32_t) * (size_t)(total ? total : 1));
    int64_t k = 0;
    for (int64_t i = 0; i < S; i++) {
        for (int32_t p = 0; p < lens[i]; p++) bin[k++] = (int32_t)(1000 * i + p);
    }
    uint8_t *idx;
    size_t idx_size;
    nm_indexed_build_idx(NM_IDX_INT32, lens, S, docs, S + 1, &idx, &idx_size);
    nm_indexed *ds;
    nm_error err;
    NM_CHECK(nm_indexed_open_memory(&ds, "random", idx, idx_size, bin, sizeof(int32_t) * (size_t)total, 1, &err) == 0, "%s",
             err.msg);
    nm_free(lens);
    nm_free(docs);
    return ds;
}

static int seen_separate, seen_joined;   // multi-epoch datasets of each kind checked

static void check_dataset(const nm_indexed *ds, const nm_gpt_config *c) {
    nm_gpt_dataset *g;
    nm_error err;
    NM_CHECK(nm_gpt_dataset_create(&g, ds, c, &err) == 0, "%s", err.msg);
    int64_t L = c->seq_len, x = c->add_extra_token, N = c->seq_end - c->seq_begin, T = 0;
    for (int64_t i = c->seq_begin; i < c->seq_end; i++) T += nm_indexed_seq_len(ds, i);
    // Epochs and the separate-final-epoch rule, restated from formats.md 1.7 (c, d).
    int64_t E = 1;
    while (c->num_samples > 0 && E * T < c->num_samples * L + x) E++;
    int sep = 0;
    if (E > 1) sep = c->num_samples - ((E - 1) * T - x) / L < (int64_t)(0.8 * (double)((T - x) / L));
    EXPECT(g->n_epochs == E && g->separate_final_epoch == sep && g->tokens_per_epoch == T, "E %lld/%lld sep %d/%d",
           (long long)g->n_epochs, (long long)E, g->separate_final_epoch, sep);
    seen_separate += E > 1 && sep;
    seen_joined += E > 1 && !sep;
    EXPECT(g->n_samples == (E * T - x) / L && g->n_samples >= c->num_samples, "n_samples %lld", (long long)g->n_samples);
    // document_index: each split sequence E times; with separate, E-1 times in the first part.
    int64_t *mult = nm_calloc((size_t)N, sizeof(int64_t));
    int64_t head = sep ? (E - 1) * N : E * N;
    for (int64_t k = 0; k < g->n_document_index; k++) {
        int64_t s = g->document_index[k];
        EXPECT(s >= c->seq_begin && s < c->seq_end, "document_index[%lld] = %lld outside the split", (long long)k, (long long)s);
        if (s >= c->seq_begin && s < c->seq_end && k < head) mult[s - c->seq_begin]++;
    }
    for (int64_t i = 0; i < N; i++) EXPECT(mult[i] == (sep ? E - 1 : E), "sequence %lld appears %lld times", (long long)i, (long long)mult[i]);
    nm_free(mult);
    // shuffle_index: a permutation; when separate the final epoch's samples come last.
    int64_t n = g->n_samples, n_first = sep ? ((E - 1) * T - x) / L : n;
    int64_t *inv = nm_malloc(sizeof(int64_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++) inv[i] = -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t j = nm_gpt_shuffle_at(g, i);
        EXPECT(j >= 0 && j < n && inv[j] < 0, "shuffle_index[%lld] = %lld", (long long)i, (long long)j);
        if (j >= 0 && j < n) inv[j] = i;
        EXPECT((i < n_first) == (j < n_first), "shuffle_index[%lld] = %lld crosses the final-epoch boundary %lld", (long long)i,
               (long long)j, (long long)n_first);
    }
    // Samples in sample_index order tile the document stream, overlapping by x tokens.
    int32_t *stream = nm_malloc(sizeof(int32_t) * (size_t)(E * T + 1));
    int64_t m = 0;
    for (int64_t k = 0; k < g->n_document_index; k++) {
        int64_t s = g->document_index[k];
        int32_t len = nm_indexed_seq_len(ds, s);
        NM_CHECK(nm_indexed_read(ds, s, 0, len, stream + m, &err) == 0, "%s", err.msg);
        m += len;
    }
    int32_t *sample = nm_malloc(sizeof(int32_t) * (size_t)(L + x));
    for (int64_t j = 0; j < n && failures < 20; j++) {
        if (inv[j] < 0) continue;
        NM_CHECK(nm_gpt_dataset_get(g, inv[j], sample, &err) == 0, "%s", err.msg);
        EXPECT(memcmp(sample, stream + j * L, sizeof(int32_t) * (size_t)(L + x)) == 0,
               "sample at sample_index position %lld is not stream[%lld:%lld]", (long long)j, (long long)(j * L),
               (long long)(j * L + L + x));
    }
    nm_free(sample);
    nm_free(stream);
    nm_free(inv);
    nm_gpt_dataset_destroy(g);
}

static void test_gpt(void) {
    // Worked example of formats.md 1.7: sizes [5,3,7], L=4, x=1 -> T=15, n=3.
    int32_t lens[3] = {5, 3, 7};
    int64_t docs[4] = {0, 1, 2, 3};
    int32_t bin[15];
    for (int i = 0; i < 15; i++) bin[i] = i;
    uint8_t *idx;
    size_t idx_size;
    nm_indexed_build_idx(NM_IDX_INT32, lens, 3, docs, 4, &idx, &idx_size);
    nm_indexed *ds;
    nm_error err;
    NM_CHECK(nm_indexed_open_memory(&ds, "worked", idx, idx_size, bin, sizeof(bin), 0, &err) == 0, "%s", err.msg);
    nm_gpt_config c = {.seq_len = 4, .add_extra_token = 1, .seed = 1234, .num_samples = 0, .seq_begin = 0, .seq_end = 3};
    nm_gpt_dataset *g;
    NM_CHECK(nm_gpt_dataset_create(&g, ds, &c, &err) == 0, "%s", err.msg);
    EXPECT(g->n_samples == 3 && g->tokens_per_epoch == 15, "worked example n=%lld", (long long)g->n_samples);
    nm_gpt_dataset_destroy(g);
    check_dataset(ds, &c);
    c.seq_len = 20;   // 15 tokens < one sample of 21
    EXPECT(nm_gpt_dataset_create(&g, ds, &c, &err) != 0 && strstr(err.msg, "fewer than one sample"), "%s", err.msg);
    nm_indexed_close(ds);
    nm_free(idx);

    // Random datasets: one epoch, many epochs with and without a separate final epoch, x = 0.
    for (int it = 0; it < 12; it++) {
        ds = random_dataset(20 + (int64_t)rnd(200), 1 + (int)rnd(60));
        nm_gpt_config cfg = {.add_extra_token = it % 4 == 3 ? 0 : 1, .seed = (uint32_t)rnd(1u << 31),
                             .seq_begin = (int64_t)rnd(5), .seq_end = ds->n_seqs};
        int64_t T = 0;
        for (int64_t i = cfg.seq_begin; i < cfg.seq_end; i++) T += nm_indexed_seq_len(ds, i);
        int64_t max_L = T / 3 < 40 ? T / 3 : 40;
        cfg.seq_len = 1 + (int64_t)rnd((uint64_t)(max_L > 1 ? max_L : 1));
        int64_t per_epoch = T / cfg.seq_len;
        switch (it % 3) {
        case 0: cfg.num_samples = 0; break;
        case 1: cfg.num_samples = per_epoch * (2 + (int64_t)rnd(3)) + per_epoch / 10; break;   // small final epoch
        default: cfg.num_samples = per_epoch * (2 + (int64_t)rnd(3)) - per_epoch / 20 - 2; break;   // nearly full
        }
        if (cfg.num_samples < 0) cfg.num_samples = 0;
        check_dataset(ds, &cfg);
        nm_indexed_close(ds);
    }
    // The random cases are built to hit both sides of the 0.80 rule; make sure they did.
    EXPECT(seen_separate > 0 && seen_joined > 0, "separate %d, joined %d multi-epoch cases", seen_separate, seen_joined);
}

int main(void) {
    uint64_t seed = test_seed("test_gpt_dataset");
    key = nm_rng_key(seed, NM_RNG_TEST, 2, 0);
    test_numpy_check_values();
    test_split();
    test_gpt();
    if (failures) {
        fprintf(stderr, "test_gpt_dataset: %d failures (seed %llu)\n", failures, (unsigned long long)seed);
        return 1;
    }
    printf("test_gpt_dataset: ok\n");
    return 0;
}
