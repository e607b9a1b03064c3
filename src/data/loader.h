// loader.h: the sample stream the trainer reads: one or more Megatron datasets (or the
// built-in synthetic corpus), blended by weight, split into train/valid/test, and sliced
// across data-parallel ranks. Every sample is seq_len + 1 tokens (inputs = row[0:L],
// labels = row[1:L+1]).
//
// The stream. Global sample s of a split is a pure function of (spec, split, s):
//   - blending (blend.h, Megatron's build_blending_indices) picks dataset i and its
//     sample j for s; with one dataset, j = s;
//   - dataset i's samples come in chunks of GPTDataset indices (gpt_dataset.h). Chunk 0 is
//     exactly Megatron's GPTDataset for this split with num_samples = spec.num_samples[split]
//     (compat mode; with a blend, Megatron's per-dataset ceil(ceil(N w_i) * 1.005)), or one
//     epoch when num_samples is 0. Later chunks are one epoch each, reshuffled with the
//     numpy seed derived from (seed, chunk), so the stream never ends.
// So with num_samples[TRAIN] = train_iters * global_batch, the first num_samples samples are
// Megatron's, in Megatron's order (checked by tests/interop/test_megatron_compat.py).
//
// Splits are ranges of sequence indices (Megatron --split, formats.md 1.7 a), so no sample
// straddles train and valid.
//
// Ranks. Each nm_loader_next_batch call consumes B * world consecutive global samples
// (one micro-batch on every data-parallel rank); rank r gets the contiguous rows
// [r B, (r+1) B) of them, as Megatron's MegatronPretrainingSampler does. Every rank must
// call with the same B. A step with gradient accumulation k thus consumes the
// global batch [step * gbs, (step+1) * gbs) with gbs = k * B * world, the same samples
// for any world size.
//
// Resume. The cursor is the next global sample position of the split's stream: a single
// integer (stored in a checkpoint as a JSON number). Setting it and continuing gives
// exactly the stream an uninterrupted run would have seen.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

enum { NM_SPLIT_TRAIN = 0, NM_SPLIT_VALID = 1, NM_SPLIT_TEST = 2 };

// No cap on the number of sources: real blends list thousands of shards, so the lists are
// the caller's arrays, read during nm_loader_create only.
typedef struct nm_data_spec {
    int n_sources;                              // 0: the built-in synthetic corpus
    const char *const *prefixes;                // (n_sources) PREFIX of PREFIX.bin/.idx
    const double *weights;                      // (n_sources) blend weights, any positive scale (may be NULL for 1 source)
    int64_t synthetic_tokens;                   // corpus size when n_sources == 0 (default 2^21)
    uint64_t synthetic_seed;                    // corpus seed, default 1 (fixes the corpus and its entropy floor)
    uint32_t seed;                              // shuffle seed (Megatron --seed), default 1234
    int64_t seq_len;                            // L, tokens per sample = L + 1
    double split[3];                            // train, valid, test weights (Megatron --split), default 99,1,0
    int64_t num_samples[3];                     // compat: samples Megatron builds per split; 0 = one epoch per chunk
    double blend_surplus;                       // Megatron --mid-level-dataset-surplus, default 0.005
    const char *cache_dir;                      // NULL: indices in memory; else cached there as .npy
                                                // (gpt_dataset.h), copied at create
} nm_data_spec;

// The resume point of a loader: the next global sample position of its split's stream.
typedef struct nm_data_cursor {
    int64_t sample;             // global samples consumed by all ranks together
} nm_data_cursor;

typedef struct nm_loader nm_loader;

void nm_data_spec_default(nm_data_spec *spec);

// which: NM_SPLIT_*; rank in [0, world). Opens (mmaps) the datasets, builds the first chunk
// of indices for each. Fails with a message naming the dataset for missing or corrupt
// files, an empty split or a split with fewer than seq_len + 1 tokens.
int nm_loader_create(nm_loader **out, const nm_data_spec *spec, int which, int rank, int world, nm_error *err);
void nm_loader_destroy(nm_loader *l);

// The next micro-batch of this rank: tokens is (B, seq_len + 1). Advances the cursor by
// B * world. Fails only on a read error of the underlying data (e.g. int64 tokens out of
// int32 range).
int nm_loader_next_batch(nm_loader *l, int32_t *tokens, int64_t B, nm_error *err);

nm_data_cursor nm_loader_get_cursor(const nm_loader *l);
// Inside the blend's cached index arrays (cache_dir with a known num_samples) a lookup; else
// replays the blend counts up to cursor.sample (O(sample * n_sources), a fraction of a second
// for 10^8 samples of a few datasets).
void nm_loader_set_cursor(nm_loader *l, nm_data_cursor cursor);

// Global sample s of the split's stream (any order; does not move the cursor).
int nm_loader_sample(nm_loader *l, int64_t s, int32_t *out, nm_error *err);

int64_t nm_loader_seq_len(const nm_loader *l);
// Tokens in this split, summed over the datasets (one epoch).
int64_t nm_loader_tokens(const nm_loader *l);
// The synthetic corpus's exact entropy floor in nats/token, or NAN for real data.
double nm_loader_entropy_floor(const nm_loader *l);
// One line for the run banner, e.g. "synthetic corpus, 2.1M tokens (floor 0.350 nats/token)".
void nm_loader_describe(const nm_loader *l, char *buf, size_t size);
