// rng.h: counter-based random numbers (design.md 5b).
//
// Every draw is a pure function of (key, counter): no hidden state, so initialisation,
// shuffling and sampling are reproducible in any order, on any number of threads or ranks,
// and resume after a checkpoint needs only the step number. The mixer is SplitMix64's
// finaliser applied twice over the key and counter (a strong 64-bit avalanche hash); it is
// not cryptographic and does not need to be.
#pragma once

#include <stdint.h>

// Derive a key from a seed and up to three purpose words (e.g. purpose id, step, rank).
uint64_t nm_rng_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c);

// 64 random bits for counter `i` under `key`.
uint64_t nm_rng_u64(uint64_t key, uint64_t i);

// Uniform in [0, 1) with 24 bits (float) / 53 bits (double).
float nm_rng_uniform_f32(uint64_t key, uint64_t i);
double nm_rng_uniform_f64(uint64_t key, uint64_t i);

// Standard normal for counter i (Box-Muller on the two halves of one 64-bit draw pair).
float nm_rng_normal(uint64_t key, uint64_t i);

// Purpose ids for nm_rng_key, so two uses of the same seed never share a stream.
enum {
    NM_RNG_INIT = 1,
    NM_RNG_DATA = 2,
    NM_RNG_SAMPLE = 3,
    NM_RNG_TEST = 4,
};
