// rng.c: implementation of rng.h.
#include "core/rng.h"

#include <math.h>

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t nm_rng_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
    uint64_t k = mix64(seed + 0x9e3779b97f4a7c15ULL);
    k = mix64(k ^ (a + 0x632be59bd9b4e019ULL));
    k = mix64(k ^ (b + 0x85157af5ULL));
    k = mix64(k ^ (c + 0x2545f4914f6cdd1dULL));
    return k;
}

uint64_t nm_rng_u64(uint64_t key, uint64_t i) {
    return mix64(mix64(key ^ (i * 0x9e3779b97f4a7c15ULL)) + i);
}

float nm_rng_uniform_f32(uint64_t key, uint64_t i) {
    return (float)(nm_rng_u64(key, i) >> 40) * (1.0f / 16777216.0f);
}

double nm_rng_uniform_f64(uint64_t key, uint64_t i) {
    return (double)(nm_rng_u64(key, i) >> 11) * (1.0 / 9007199254740992.0);
}

float nm_rng_normal(uint64_t key, uint64_t i) {
    uint64_t r = nm_rng_u64(key, i);
    // u1 in (0, 1] so log never sees 0; u2 in [0, 1).
    double u1 = ((double)(r >> 32) + 1.0) / 4294967296.0;
    double u2 = (double)(r & 0xffffffffULL) / 4294967296.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
