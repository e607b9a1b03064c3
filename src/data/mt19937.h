// mt19937.h: numpy's legacy RandomState(seed).shuffle, bit for bit (formats.md 1.9).
//
// Megatron-LM shuffles its document and sample indices with numpy.random.RandomState(seed).
// To give the same sample order as Megatron for the same data and seed, we re-implement
// exactly the pieces it touches: the MT19937 generator with numpy's integer seeding
// (init_genrand), random_interval (rejection sampling with a bit mask), and the
// Fisher-Yates loop of RandomState.shuffle on a 1-D array. Nothing else of numpy
// (floats, distributions, init_by_array seeding for seeds >= 2^32) is provided.
//
// Reference: numpy/random/src/mt19937/mt19937.c (mt19937_seed, mt19937_gen),
// numpy/random/src/distributions/distributions.c (random_interval),
// numpy/random/mtrand.pyx (_shuffle_raw). Checked against numpy itself by
// tests/test_gpt_dataset.c (known outputs) and tests/interop/test_megatron_compat.py.
#pragma once

#include <stdint.h>

typedef struct nm_mt19937 {
    uint32_t key[624];          // the MT19937 state words
    int pos;                    // next word to temper; 624 = twist before the next draw
} nm_mt19937;

// RandomState(seed) for an integer seed (numpy accepts 0 .. 2^32-1 for this path).
void nm_mt19937_seed(nm_mt19937 *r, uint32_t seed);
uint32_t nm_mt19937_next32(nm_mt19937 *r);
// Two 32-bit draws, the first one as the high word (numpy's mt19937_next64).
uint64_t nm_mt19937_next64(nm_mt19937 *r);
// Uniform integer in [0, max] by masked rejection (numpy's random_interval).
uint64_t nm_mt19937_interval(nm_mt19937 *r, uint64_t max);

// RandomState.shuffle on a 1-D array of n elements: for i = n-1 .. 1 swap a[i], a[interval(i)].
// The element type does not change the draws, so one function per type we shuffle.
void nm_mt19937_shuffle_i32(nm_mt19937 *r, int32_t *a, int64_t n);
void nm_mt19937_shuffle_i64(nm_mt19937 *r, int64_t *a, int64_t n);
