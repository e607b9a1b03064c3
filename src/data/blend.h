// blend.h: Megatron's BlendedDataset selection (formats.md 1.8), the deterministic greedy
// interleave of several datasets by weight.
//
// Sample s goes to the dataset i with the largest w_i * max(s, 1) - count_i (ties to the
// lowest i), and is that dataset's sample count_i; then count_i += 1. No randomness: all
// shuffling comes from each dataset's own shuffle index. The rule keeps every prefix of the
// stream within one sample of w_i * prefix_len for every i.
//
// Reference: megatron/core/datasets/helpers.cpp build_blending_indices,
// blended_megatron_dataset_builder.py _get_size_per_split_per_dataset.
#pragma once

#include <stdint.h>

// Megatron's normalisation: w_i / sum(w) in float64. Returns -1 if a weight is negative,
// not finite, or all are zero.
int nm_blend_normalize(const double *weights, int n, double *out);

// The greedy state: counts per dataset and the next sample position.
typedef struct nm_blend_state {
    int n;                      // datasets
    const double *weights;      // (n,) normalised, borrowed
    int64_t next;               // next blended sample position s
    int64_t *counts;            // (n,) samples taken so far from each dataset (caller owns)
} nm_blend_state;

// Picks the dataset for sample state->next, advances; returns the dataset, *sample_in_ds = its sample.
int nm_blend_next(nm_blend_state *st, int64_t *sample_in_ds);

// build_blending_indices for `size` samples: dataset_index (size,), dataset_sample_index (size,).
void nm_blend_build_indices(const double *weights, int n, int64_t size, int16_t *dataset_index,
                            int64_t *dataset_sample_index);

// Samples Megatron builds per dataset for a split of `target` samples:
// ceil(ceil(target * w_i) * (1 + surplus)); surplus is 0.005 by default.
int64_t nm_blend_dataset_size(double weight, int64_t target, double surplus);
