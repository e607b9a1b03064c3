// gpt_dataset.h: Megatron-Core's GPTDataset, from sequences to training samples
// (formats.md 1.7: split, epochs, document_index, sample_index, shuffle_index).
//
// A sample is L + x tokens (x = add_extra_token_to_sequence, 1 by default: inputs are
// tokens[0:L], labels tokens[1:L+1]) cut from the concatenation of the split's sequences in
// shuffled order; consecutive samples overlap by x tokens. Given the same .bin/.idx, split,
// seq_len, seed and num_samples, sample i here is Megatron's sample i (checked against a
// numpy re-implementation by tests/interop/test_megatron_compat.py).
//
// Two uses:
//  - compat: num_samples = what Megatron would request (train_iters * global_batch, ...),
//    which fixes the epoch count E and the separate-final-epoch rule exactly as Megatron;
//  - one epoch (num_samples = 0): E = 1, the unbounded stream of loader.h chains such
//    one-epoch datasets, each seeded from (seed, epoch).
// The partial last sample is always dropped (Megatron's default for train and valid), so
// no padding is ever needed.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "data/indexed.h"
#include "io/npy.h"

typedef struct nm_gpt_config {
    int64_t seq_len;            // L
    int add_extra_token;        // x: 1 (Megatron default) or 0
    uint32_t seed;              // numpy RandomState seed (Megatron --seed, default 1234)
    int64_t num_samples;        // samples requested (compat); 0 = exactly one epoch
    int64_t seq_begin, seq_end; // the split: sequence indices [seq_begin, seq_end) of the dataset
    const char *cache_dir;      // NULL: the indices are built in memory. Else they are read from
                                // (or, when absent or not matching, built and written to) .npy
                                // files there, named by a hash of the dataset's description
                                // (docs/formats.md 1.7 j), and memory-mapped read-only
} nm_gpt_config;

typedef struct nm_gpt_dataset {
    const nm_indexed *ds;       // borrowed
    nm_gpt_config cfg;
    int64_t tokens_per_epoch;   // T = sum of the split's sequence lengths
    int64_t n_epochs;           // E
    int separate_final_epoch;   // Megatron's 0.80 rule
    int64_t n_samples;          // n = (E T - x) // L  (>= num_samples in compat mode)
    // The indices in Megatron's dtypes (formats.md 1.7 f-h), in memory or mapped from the cache.
    const int32_t *document_index; // (E * |split|,) sequence ids, shuffled
    int64_t n_document_index;
    const void *sample_index;   // (n + 1, 2) (position in document_index, token offset): int32, or
    int sample_wide;            //   int64 when max(len(document_index), max sequence length) > INT32_MAX
    const void *shuffle_index;  // (n,): uint32, or int64 when n >= 2^32 - 1 (shuffle_wide)
    int shuffle_wide;
    int from_cache;             // 1: mapped from cache_dir's files, not built
    char cache_name[32];        // the files' hash prefix (cache_dir set)
    void *owned[3];             // the built arrays (not from the cache)
    nm_npy maps[3];             // the mapped files (from the cache)
} nm_gpt_dataset;

// Builds the three indices, or maps them from cfg->cache_dir (written there when built). Fails
// (naming the dataset and numbers) when the split holds fewer than L + x tokens, since not
// even one sample exists then, or when the cache directory cannot be written.
int nm_gpt_dataset_create(nm_gpt_dataset **out, const nm_indexed *ds, const nm_gpt_config *cfg, nm_error *err);
void nm_gpt_dataset_destroy(nm_gpt_dataset *g);

// shuffle_index[i] and the flat sample_index[k] (row k / 2, column k % 2), whatever their dtype.
static inline int64_t nm_gpt_shuffle_at(const nm_gpt_dataset *g, int64_t i) {
    return g->shuffle_wide ? ((const int64_t *)g->shuffle_index)[i] : (int64_t)((const uint32_t *)g->shuffle_index)[i];
}
static inline int64_t nm_gpt_sample_at(const nm_gpt_dataset *g, int64_t k) {
    return g->sample_wide ? ((const int64_t *)g->sample_index)[k] : (int64_t)((const int32_t *)g->sample_index)[k];
}

// Sample i in [0, n_samples): writes L + x tokens.
int nm_gpt_dataset_get(const nm_gpt_dataset *g, int64_t i, int32_t *out, nm_error *err);

// Megatron's split (formats.md 1.7 a): weights normalised, book-ends accumulated, and
// split k = [round(beg * N), round(end * N)) with Python's round-half-to-even. n_weights <= 3
// (train, valid, test; missing ones are 0).
void nm_gpt_split_range(const double *weights, int n_weights, int k, int64_t n_seqs, int64_t *begin, int64_t *end);
