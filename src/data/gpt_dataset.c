// gpt_dataset.c: implementation of gpt_dataset.h (Megatron-Core GPTDataset, formats.md 1.7).
//
// Reference: megatron/core/datasets/gpt_dataset.py (_build_document_sample_shuffle_indices,
// _get_num_epochs, _build_document_index, _build_shuffle_index, _query_document_sample_
// shuffle_indices) and helpers.cpp (build_sample_idx). Index dtypes differ (we keep int64
// where Megatron picks int32/uint32 by size); the values are the same.
#include "data/gpt_dataset.h"

#include <math.h>
#include <string.h>

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

// helpers.cpp build_sample_idx with drop_last_partial_sequence = true.
static void build_sample_index(nm_gpt_dataset *g) {
    const nm_indexed *ds = g->ds;
    int64_t L = g->cfg.seq_len, x = g->cfg.add_extra_token;
    int64_t *si = g->sample_index;
    int64_t di = 0, off = 0;
    si[0] = 0;
    si[1] = 0;
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
        si[2 * s] = di;
        si[2 * s + 1] = off;
    }
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
    g->document_index = nm_malloc(sizeof(int32_t) * (size_t)(g->n_document_index ? g->n_document_index : 1));
    g->sample_index = nm_malloc(sizeof(int64_t) * 2 * (size_t)(g->n_samples + 1));
    g->shuffle_index = nm_malloc(sizeof(int64_t) * (size_t)g->n_samples);

    // One RandomState per dataset, drawn in Megatron's order: document shuffle(s), then
    // shuffle-index shuffle(s). The sample index uses no randomness.
    nm_mt19937 rng;
    nm_mt19937_seed(&rng, cfg->seed);
    if (!separate) {
        build_document_index(g->document_index, cfg, E, &rng);
    } else {
        build_document_index(g->document_index, cfg, E - 1, &rng);
        build_document_index(g->document_index + (E - 1) * n_split, cfg, 1, &rng);
    }
    build_sample_index(g);
    int64_t n_first = separate ? ((E - 1) * T - x) / L : g->n_samples;
    for (int64_t i = 0; i < g->n_samples; i++) g->shuffle_index[i] = i;
    nm_mt19937_shuffle_i64(&rng, g->shuffle_index, n_first);
    if (n_first < g->n_samples) nm_mt19937_shuffle_i64(&rng, g->shuffle_index + n_first, g->n_samples - n_first);
    *out = g;
    return 0;
}

void nm_gpt_dataset_destroy(nm_gpt_dataset *g) {
    if (!g) return;
    nm_free(g->document_index);
    nm_free(g->sample_index);
    nm_free(g->shuffle_index);
    nm_free(g);
}

int nm_gpt_dataset_get(const nm_gpt_dataset *g, int64_t i, int32_t *out, nm_error *err) {
    NM_CHECK(i >= 0 && i < g->n_samples, "sample %lld of %lld", (long long)i, (long long)g->n_samples);
    int64_t x = g->cfg.add_extra_token, want = g->cfg.seq_len + x;
    int64_t j = g->shuffle_index[i];
    int64_t d0 = g->sample_index[2 * j], o0 = g->sample_index[2 * j + 1];
    int64_t d1 = g->sample_index[2 * j + 2], o1 = g->sample_index[2 * j + 3];
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
