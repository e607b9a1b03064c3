// mt19937.c: implementation of mt19937.h (numpy legacy RandomState, formats.md 1.9).
#include "data/mt19937.h"

#include "core/check.h"

#define MT_N 624
#define MT_M 397

void nm_mt19937_seed(nm_mt19937 *r, uint32_t seed) {
    // init_genrand: key[i] = 1812433253 * (key[i-1] ^ (key[i-1] >> 30)) + i  (mod 2^32)
    r->key[0] = seed;
    for (int i = 1; i < MT_N; i++) {
        uint32_t prev = r->key[i - 1];
        r->key[i] = 1812433253u * (prev ^ (prev >> 30)) + (uint32_t)i;
    }
    r->pos = MT_N;
}

// The reference twist: regenerate all 624 words at once.
static void twist(nm_mt19937 *r) {
    static const uint32_t mag01[2] = {0u, 0x9908b0dfu};
    uint32_t *k = r->key;
    int i = 0;
    for (; i < MT_N - MT_M; i++) {
        uint32_t y = (k[i] & 0x80000000u) | (k[i + 1] & 0x7fffffffu);
        k[i] = k[i + MT_M] ^ (y >> 1) ^ mag01[y & 1u];
    }
    for (; i < MT_N - 1; i++) {
        uint32_t y = (k[i] & 0x80000000u) | (k[i + 1] & 0x7fffffffu);
        k[i] = k[i + (MT_M - MT_N)] ^ (y >> 1) ^ mag01[y & 1u];
    }
    uint32_t y = (k[MT_N - 1] & 0x80000000u) | (k[0] & 0x7fffffffu);
    k[MT_N - 1] = k[MT_M - 1] ^ (y >> 1) ^ mag01[y & 1u];
    r->pos = 0;
}

uint32_t nm_mt19937_next32(nm_mt19937 *r) {
    if (r->pos >= MT_N) twist(r);
    uint32_t y = r->key[r->pos++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint64_t nm_mt19937_next64(nm_mt19937 *r) {
    uint64_t hi = nm_mt19937_next32(r);   // sequenced explicitly: the first draw is the high word
    uint64_t lo = nm_mt19937_next32(r);
    return (hi << 32) | lo;
}

uint64_t nm_mt19937_interval(nm_mt19937 *r, uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t v;
    if (max <= 0xffffffffu) {
        while ((v = (nm_mt19937_next32(r) & mask)) > max) {}
    } else {
        while ((v = (nm_mt19937_next64(r) & mask)) > max) {}
    }
    return v;
}

void nm_mt19937_shuffle_i32(nm_mt19937 *r, int32_t *a, int64_t n) {
    NM_CHECK(n >= 0, "n=%lld", (long long)n);
    for (int64_t i = n - 1; i >= 1; i--) {
        int64_t j = (int64_t)nm_mt19937_interval(r, (uint64_t)i);
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

void nm_mt19937_shuffle_i64(nm_mt19937 *r, int64_t *a, int64_t n) {
    NM_CHECK(n >= 0, "n=%lld", (long long)n);
    for (int64_t i = n - 1; i >= 1; i--) {
        int64_t j = (int64_t)nm_mt19937_interval(r, (uint64_t)i);
        int64_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}
