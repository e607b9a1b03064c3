// gpt_dataset.c: implementation of gpt_dataset.h (Megatron-Core GPTDataset, formats.md 1.7).
//
// Reference: megatron/core/datasets/gpt_dataset.py (_build_document_sample_shuffle_indices,
// _get_num_epochs, _build_document_index, _build_shuffle_index, _query_document_sample_
// shuffle_indices) and helpers.cpp (build_sample_idx). The indices are built in int64 and kept
// in Megatron's dtypes (int32 / uint32 where it picks them by size), so the cache files are
// the arrays Megatron would save.
#include "data/gpt_dataset.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/fileio.h"
#include "data/mt19937.h"

void nm_gpt_split_range(const double *weights, int n_weights, int k, int64_t n_seqs, int64_t *begin, int64_t *end) {
    NM_CHECK(n_weights >= 1 && n_weights <= 3 && k >= 0 && k < 3, "n_weights=%d k=%d", n_weights, k);
    double w[3] = {0, 0, 0}, sum = 0;
    for (int i = 0; i < n_weights; i++) {
        NM_CHECK(weights[i] >= 0, "split weight %d is %g", i, weights[i]);
        w[i] = weights[i];
    }
    for (int i = 0; i < 3; i++) sum += w[i];   // numpy's sum of <8 elements: left to right
    NM_CHECK(sum > 0, "split weights sum to 0");
    // Book-ends: [0, w0, w0+w1, w0+w1+w2] on the normalised weights, in Python float order.
    double ends[4] = {0, 0, 0, 0};
    for (int i = 0; i < 3; i++) ends[i + 1] = ends[i] + w[i] / sum;
    // int(round(x)) in Python 3 rounds half to even: nearbyint in the default rounding mode.
    *begin = (int64_t)nearbyint(ends[k] * (double)n_seqs);
    *end = (int64_t)nearbyint(ends[k + 1] * (double)n_seqs);
    if (*end > n_seqs) *end = n_seqs;
    if (*begin > *end) *begin = *end;
}

// document_index for `epochs` epochs: the split's sequence ids repeated epoch-major, then
// one in-place shuffle across all of them (_build_document_index with separate=False).
static void build_document_index(int32_t *out, const nm_gpt_config *c, int64_t epochs, nm_mt19937 *rng) {
    int64_t n = c->seq_end - c->seq_begin, k = 0;
    for (int64_t e = 0; e < epochs; e++) {
        for (int64_t i = 0; i < n; i++) out[k++] = (int32_t)(c->seq_begin + i);
    }
    nm_mt19937_shuffle_i32(rng, out, k);
}

// helpers.cpp build_sample_idx with drop_last_partial_sequence = true, into the (n + 1, 2)
// array at si, int32 or int64 (wide) as Megatron keeps it: written in its final dtype, so the
// builder holds 8 bytes a sample for it (16 when wide), not an int64 copy besides.
static void build_sample_index(const nm_gpt_dataset *g, void *si, int wide) {
    const nm_indexed *ds = g->ds;
    int64_t L = g->cfg.seq_len, x = g->cfg.add_extra_token;
    int64_t di = 0, off = 0;
    int32_t *s32 = wide ? NULL : si;
    int64_t *s64 = wide ? si : NULL;
#define NM_PUT(i, v) (wide ? (void)(s64[i] = (v)) : (void)(s32[i] = (int32_t)(v)))
    NM_PUT(0, 0);
    NM_PUT(1, 0);
    for (int64_t s = 1; s <= g->n_samples; s++) {
        int64_t remaining = L + x;
        while (remaining != 0) {
            int64_t len = nm_indexed_seq_len(ds, g->document_index[di]) - off;
            remaining -= len;
            if (remaining <= 0) {
                off += remaining + len - x;
                remaining = 0;
            } else {
                if (di == g->n_document_index - 1) {
                    // Out of documents: only the (dropped) partial last sample gets here.
                    NM_CHECK(s == g->n_samples, "%s: sample index ran out of documents at sample %lld of %lld", ds->name,
                             (long long)s, (long long)g->n_samples);
                    off = nm_indexed_seq_len(ds, g->document_index[di]) - x;
                    break;
                }
                di++;
                off = 0;
            }
        }
        NM_PUT(2 * s, di);
        NM_PUT(2 * s + 1, off);
    }
#undef NM_PUT
}

// The three indices in Megatron's dtypes, each built in place in its final one (the builder's
// memory: 4 bytes a document-epoch, 8 + 4 bytes a sample below 2^31 of them). One RandomState
// per dataset, drawn in Megatron's order: document shuffle(s), then shuffle-index shuffle(s).
// The sample index uses no randomness. numpy's shuffle draws the same positions whatever the
// element type, so the uint32 shuffle index is shuffled as 32-bit words (nm_mt19937_shuffle_i32
// moves bits, it never reads them as numbers).
static void build_indices(nm_gpt_dataset *g) {
    const nm_gpt_config *cfg = &g->cfg;
    int64_t E = g->n_epochs, n_split = cfg->seq_end - cfg->seq_begin, n = g->n_samples;
    int64_t T = g->tokens_per_epoch, L = cfg->seq_len, x = cfg->add_extra_token;
    int32_t *doc = nm_malloc(sizeof(int32_t) * (size_t)(g->n_document_index ? g->n_document_index : 1));
    nm_mt19937 rng;
    nm_mt19937_seed(&rng, cfg->seed);
    if (!g->separate_final_epoch) {
        build_document_index(doc, cfg, E, &rng);
    } else {
        build_document_index(doc, cfg, E - 1, &rng);
        build_document_index(doc + (E - 1) * n_split, cfg, 1, &rng);
    }
    g->document_index = doc;
    g->owned[0] = doc;
    void *sample = nm_malloc((g->sample_wide ? sizeof(int64_t) : sizeof(int32_t)) * 2 * (size_t)(n + 1));
    build_sample_index(g, sample, g->sample_wide);
    int64_t n_first = g->separate_final_epoch ? ((E - 1) * T - x) / L : n;
    void *shuffle;
    if (g->shuffle_wide) {
        int64_t *sh = nm_malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
        for (int64_t i = 0; i < n; i++) sh[i] = i;
        nm_mt19937_shuffle_i64(&rng, sh, n_first);
        if (n_first < n) nm_mt19937_shuffle_i64(&rng, sh + n_first, n - n_first);
        shuffle = sh;
    } else {
        uint32_t *sh = nm_malloc(sizeof(uint32_t) * (size_t)(n ? n : 1));
        for (int64_t i = 0; i < n; i++) sh[i] = (uint32_t)i;
        nm_mt19937_shuffle_i32(&rng, (int32_t *)sh, n_first);
        if (n_first < n) nm_mt19937_shuffle_i32(&rng, (int32_t *)sh + n_first, n - n_first);
        shuffle = sh;
    }
    g->sample_index = sample;
    g->shuffle_index = shuffle;
    g->owned[1] = sample;
    g->owned[2] = shuffle;
}

// --- the cache ----------------------------------------------------------------------------------
//
// Files <cache_dir>/<hash>-GPTDataset-{description.txt, document_index.npy, sample_index.npy,
// shuffle_index.npy}: the hash (FNV-1a 64, hex) of the description, which names everything
// the indices depend on. The description is written last, after the arrays: a cache is used
// only when its description equals this dataset's and every array has the expected dtype and
// shape and its file the exact size (nm_npy_map); else it is built and written again.

static const char *const cache_kinds[3] = {"document_index", "sample_index", "shuffle_index"};

static void describe(const nm_gpt_dataset *g, char *out, size_t cap) {
    const nm_gpt_config *c = &g->cfg;
    snprintf(out, cap,
             "{\"class\": \"GPTDataset\", \"dataset\": \"%s\", \"sequences\": %" PRId64 ", \"split\": [%" PRId64
             ", %" PRId64 "], \"split_tokens\": %" PRId64 ", \"sequence_length\": %" PRId64
             ", \"add_extra_token_to_sequence\": %d, \"random_seed\": %u, \"num_samples\": %" PRId64
             ", \"num_epochs\": %" PRId64 ", \"separate_final_epoch\": %d, \"format\": \"nano-megatron 1\"}\n",
             g->ds->name, g->ds->n_seqs, c->seq_begin, c->seq_end, g->tokens_per_epoch, c->seq_len, c->add_extra_token,
             (unsigned)c->seed, c->num_samples, g->n_epochs, g->separate_final_epoch);
}

static void cache_path(const nm_gpt_dataset *g, const char *kind, const char *ext, char *out, size_t cap) {
    snprintf(out, cap, "%s/%s-GPTDataset-%s.%s", g->cfg.cache_dir, g->cache_name, kind, ext);
}

static void name_cache(nm_gpt_dataset *g, const char *desc) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a 64
    for (const unsigned char *p = (const unsigned char *)desc; *p; p++) h = (h ^ *p) * 1099511628211ull;
    snprintf(g->cache_name, sizeof g->cache_name, "%016" PRIx64, h);
}

// 0: mapped from the cache; 1: no usable cache (build it); -1: err.
static int cache_open(nm_gpt_dataset *g, nm_error *err) {
    char desc[2048], path[4096];
    describe(g, desc, sizeof desc);
    name_cache(g, desc);
    cache_path(g, "description", "txt", path, sizeof path);
    char *saved = NULL;
    nm_error ignore;
    if (nm_file_read_all(path, &saved, NULL, &ignore) != 0) return 1;  // no cache yet: built quietly
    int same = strcmp(saved, desc) == 0;
    nm_free(saved);
    if (!same) {
        fprintf(stderr, "notice: %s describes other index mappings than %s's; rebuilding them\n", path, g->ds->name);
        return 1;
    }
    const int64_t rows[3] = {g->n_document_index, g->n_samples + 1, g->n_samples};
    const char *descr[3] = {"<i4", g->sample_wide ? "<i8" : "<i4", g->shuffle_wide ? "<i8" : "<u4"};
    for (int k = 0; k < 3; k++) {
        cache_path(g, cache_kinds[k], "npy", path, sizeof path);
        nm_npy *m = &g->maps[k];
        if (nm_npy_map(m, path, &ignore) != 0) {
            fprintf(stderr, "notice: %s; rebuilding the index mappings\n", ignore.msg);
            for (int j = 0; j < k; j++) nm_npy_unmap(&g->maps[j]);
            return 1;
        }
        if (strcmp(m->descr, descr[k]) != 0 || m->shape[0] != rows[k] || m->ndim != (k == 1 ? 2 : 1) ||
            (k == 1 && m->shape[1] != 2)) {
            fprintf(stderr, "notice: %s: dtype %s and %lld rows, expected %s and %lld; rebuilding the index mappings\n",
                    path, m->descr, (long long)m->shape[0], descr[k], (long long)rows[k]);
            for (int j = 0; j <= k; j++) nm_npy_unmap(&g->maps[j]);
            return 1;
        }
    }
    g->document_index = g->maps[0].data;
    g->sample_index = g->maps[1].data;
    g->shuffle_index = g->maps[2].data;
    g->from_cache = 1;
    (void)err;
    return 0;
}

static int cache_write(nm_gpt_dataset *g, nm_error *err) {
    char desc[2048], path[4096];
    describe(g, desc, sizeof desc);
    if (nm_mkdir_p(g->cfg.cache_dir, err) != 0) return nm_error_prefix(err, "data.cache_dir");
    const int64_t shapes[3][2] = {{g->n_document_index, 0}, {g->n_samples + 1, 2}, {g->n_samples, 0}};
    const char *descr[3] = {"<i4", g->sample_wide ? "<i8" : "<i4", g->shuffle_wide ? "<i8" : "<u4"};
    const void *data[3] = {g->document_index, g->sample_index, g->shuffle_index};
    for (int k = 0; k < 3; k++) {
        cache_path(g, cache_kinds[k], "npy", path, sizeof path);
        if (nm_npy_write(path, descr[k], shapes[k], k == 1 ? 2 : 1, data[k], err) != 0) return -1;
    }
    cache_path(g, "description", "txt", path, sizeof path);
    return nm_file_write_atomic(path, desc, strlen(desc), err);
}

int nm_gpt_dataset_create(nm_gpt_dataset **out, const nm_indexed *ds, const nm_gpt_config *cfg, nm_error *err) {
    NM_CHECK(cfg->seq_len >= 1 && (cfg->add_extra_token == 0 || cfg->add_extra_token == 1) && cfg->num_samples >= 0,
             "seq_len=%lld x=%d num_samples=%lld", (long long)cfg->seq_len, cfg->add_extra_token, (long long)cfg->num_samples);
    NM_CHECK(cfg->seq_begin >= 0 && cfg->seq_begin <= cfg->seq_end && cfg->seq_end <= ds->n_seqs, "split [%lld, %lld) of %lld",
             (long long)cfg->seq_begin, (long long)cfg->seq_end, (long long)ds->n_seqs);
    int64_t L = cfg->seq_len, x = cfg->add_extra_token;
    int64_t n_split = cfg->seq_end - cfg->seq_begin;
    int64_t T = 0;
    for (int64_t i = cfg->seq_begin; i < cfg->seq_end; i++) T += nm_indexed_seq_len(ds, i);
    if (T < L + x) {
        return nm_error_set(err,
                            "%s: sequences [%lld, %lld) hold %lld tokens, fewer than one sample of seq_len + %lld = %lld "
                            "tokens",
                            ds->name, (long long)cfg->seq_begin, (long long)cfg->seq_end, (long long)T, (long long)x,
                            (long long)(L + x));
    }
    // E = smallest e >= 1 with e T >= num_samples L + x (_get_num_epochs).
    int64_t E = 1;
    if (cfg->num_samples > 0) {
        int64_t need = cfg->num_samples * L + x;
        E = (need + T - 1) / T;
        if (E < 1) E = 1;
    }
    if (E * n_split > INT32_MAX) {
        // Megatron keeps document_index in int32; beyond that its own arithmetic breaks too.
        return nm_error_set(err, "%s: %lld epochs x %lld sequences exceed the int32 document_index", ds->name, (long long)E,
                            (long long)n_split);
    }
    int separate = 0;
    if (E > 1) {
        int64_t n_per_epoch = (T - x) / L;
        int64_t n_final = cfg->num_samples - ((E - 1) * T - x) / L;
        separate = n_final < (int64_t)(0.80 * (double)n_per_epoch);
    }
    nm_gpt_dataset *g = nm_calloc(1, sizeof(*g));
    g->ds = ds;
    g->cfg = *cfg;
    g->tokens_per_epoch = T;
    g->n_epochs = E;
    g->separate_final_epoch = separate;
    g->n_samples = (E * T - x) / L;
    g->n_document_index = E * n_split;
    // Megatron's dtypes: sample_index int32 while max(len(document_index), max(sizes)) fits
    // (helpers.py build_sample_idx), shuffle_index uint32 while n < 2^32 - 1 (_build_shuffle_index).
    int64_t longest = ds->max_len;
    g->sample_wide = (g->n_document_index > longest ? g->n_document_index : longest) > INT32_MAX;
    g->shuffle_wide = g->n_samples >= (int64_t)UINT32_MAX - 1;
    if (cfg->cache_dir) {
        int rc = cache_open(g, err);
        if (rc == 0) {
            *out = g;
            return 0;
        }
        if (rc < 0) {
            nm_gpt_dataset_destroy(g);
            return -1;
        }
    }
    build_indices(g);
    // said at every build into a cache (a large one takes minutes, and a rank that builds what
    // another should have built is worth seeing)
    if (cfg->cache_dir)
        fprintf(stderr, "data: built the index mappings of %s (%lld samples) into %s\n", ds->name,
                (long long)g->n_samples, cfg->cache_dir);
    if (cfg->cache_dir && cache_write(g, err) != 0) {
        nm_gpt_dataset_destroy(g);
        return -1;
    }
    *out = g;
    return 0;
}

void nm_gpt_dataset_destroy(nm_gpt_dataset *g) {
    if (!g) return;
    for (int k = 0; k < 3; k++) {
        nm_free(g->owned[k]);
        nm_npy_unmap(&g->maps[k]);
    }
    nm_free(g);
}

int nm_gpt_dataset_get(const nm_gpt_dataset *g, int64_t i, int32_t *out, nm_error *err) {
    NM_CHECK(i >= 0 && i < g->n_samples, "sample %lld of %lld", (long long)i, (long long)g->n_samples);
    int64_t x = g->cfg.add_extra_token, want = g->cfg.seq_len + x;
    int64_t j = nm_gpt_shuffle_at(g, i);
    int64_t d0 = nm_gpt_sample_at(g, 2 * j), o0 = nm_gpt_sample_at(g, 2 * j + 1);
    int64_t d1 = nm_gpt_sample_at(g, 2 * j + 2), o1 = nm_gpt_sample_at(g, 2 * j + 3);
    int64_t k = 0;
    for (int64_t d = d0; d <= d1; d++) {
        int64_t seq = g->document_index[d];
        int64_t beg = d == d0 ? o0 : 0;
        int64_t end = d == d1 ? o1 + x : nm_indexed_seq_len(g->ds, seq);
        NM_CHECK(end >= beg && k + (end - beg) <= want, "sample %lld: document_index[%lld] range [%lld, %lld)", (long long)i,
                 (long long)d, (long long)beg, (long long)end);
        if (nm_indexed_read(g->ds, seq, beg, end - beg, out + k, err) != 0) return -1;
        k += end - beg;
    }
    NM_CHECK(k == want, "sample %lld has %lld tokens, expected %lld", (long long)i, (long long)k, (long long)want);
    return 0;
}
