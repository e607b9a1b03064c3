// tokenizer_util.c: the ByteLevel alphabet and the two hash maps the tokenizer and the BPE
// trainer share (tokenizer_internal.h). Plain open addressing with linear probing: the maps
// hold at most a few million entries and are read far more often than written.
#include "data/tokenizer_internal.h"

#include <string.h>

// --- ByteLevel alphabet ---------------------------------------------------------------------------

// True for the 188 bytes that stand for themselves (GPT-2 bytes_to_unicode).
static int bytelevel_printable(unsigned b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

uint32_t nm_bytelevel_cp(uint8_t b) {
    if (bytelevel_printable(b)) return b;
    // The non-printable bytes, in increasing order, take U+0100 + their rank among them:
    // 0x00-0x20 are ranks 0-32, 0x7F-0xA0 are 33-66, 0xAD is 67.
    if (b <= 0x20) return 0x100u + b;
    if (b <= 0xA0) return 0x100u + 33u + (uint32_t)(b - 0x7F);
    return 0x100u + 67u;   // 0xAD
}

int nm_bytelevel_byte(uint32_t cp) {
    if (cp < 0x100) return bytelevel_printable(cp) ? (int)cp : -1;
    if (cp > 0x143) return -1;
    uint32_t r = cp - 0x100;
    if (r <= 32) return (int)r;
    if (r <= 66) return (int)(0x7F + r - 33);
    return 0xAD;
}

int nm_bytelevel_utf8(uint8_t b, char out[2]) {
    uint32_t cp = nm_bytelevel_cp(b);
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

// --- hashing --------------------------------------------------------------------------------------

static uint64_t mix64(uint64_t x) {   // splitmix64 finalizer
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t hash_bytes(const void *key, size_t len) {
    const uint8_t *p = key;
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)len;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 29;
        p += 8; len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    return mix64(h ^ w);
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

// --- u64 map --------------------------------------------------------------------------------------

void nm_u64map_init(nm_u64map *m, size_t expected) {
    m->cap = pow2_at_least(expected * 2 + 1);
    m->n = 0;
    m->keys = nm_malloc(m->cap * sizeof(uint64_t));
    m->vals = nm_malloc(m->cap * sizeof(uint64_t));
    memset(m->keys, 0xFF, m->cap * sizeof(uint64_t));
}

void nm_u64map_free(nm_u64map *m) {
    nm_free(m->keys);
    nm_free(m->vals);
    memset(m, 0, sizeof(*m));
}

uint64_t *nm_u64map_get(const nm_u64map *m, uint64_t key) {
    if (!m->cap) return NULL;
    size_t mask = m->cap - 1;
    for (size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
        if (m->keys[i] == key) return &m->vals[i];
        if (m->keys[i] == UINT64_MAX) return NULL;
    }
}

static void u64map_grow(nm_u64map *m) {
    nm_u64map old = *m;
    nm_u64map_init(m, old.cap);   // doubles: init sizes for 2x expected
    for (size_t i = 0; i < old.cap; i++) {
        if (old.keys[i] == UINT64_MAX) continue;
        int ins;
        *nm_u64map_put(m, old.keys[i], &ins) = old.vals[i];
    }
    nm_u64map_free(&old);
}

uint64_t *nm_u64map_put(nm_u64map *m, uint64_t key, int *inserted) {
    NM_CHECK(key != UINT64_MAX, "reserved key");
    if (!m->cap) nm_u64map_init(m, 16);
    if ((m->n + 1) * 2 > m->cap) u64map_grow(m);
    size_t mask = m->cap - 1;
    for (size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
        if (m->keys[i] == key) { *inserted = 0; return &m->vals[i]; }
        if (m->keys[i] == UINT64_MAX) {
            m->keys[i] = key;
            m->vals[i] = 0;
            m->n++;
            *inserted = 1;
            return &m->vals[i];
        }
    }
}

// --- string map -----------------------------------------------------------------------------------

void nm_strmap_init(nm_strmap *m, size_t expected) {
    memset(m, 0, sizeof(*m));
    m->n_slots = pow2_at_least(expected * 2 + 1);
    m->slots = nm_malloc(m->n_slots * sizeof(int32_t));
    memset(m->slots, 0xFF, m->n_slots * sizeof(int32_t));
    m->e_cap = expected > 16 ? expected : 16;
    m->e = nm_malloc(m->e_cap * sizeof(nm_strmap_entry));
    m->blob_cap = m->e_cap * 8;
    m->blob = nm_malloc(m->blob_cap);
}

void nm_strmap_free(nm_strmap *m) {
    nm_free(m->blob);
    nm_free(m->e);
    nm_free(m->slots);
    memset(m, 0, sizeof(*m));
}

void nm_strmap_clear(nm_strmap *m) {
    memset(m->slots, 0xFF, m->n_slots * sizeof(int32_t));
    m->n = 0;
    m->blob_n = 0;
}

static int64_t strmap_probe(const nm_strmap *m, const void *key, size_t len, uint64_t h, size_t *slot) {
    size_t mask = m->n_slots - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        int32_t k = m->slots[i];
        if (k < 0) { *slot = i; return -1; }
        const nm_strmap_entry *e = &m->e[k];
        if (e->hash == (uint32_t)(h >> 32) && e->len == len && memcmp(m->blob + e->off, key, len) == 0) {
            *slot = i;
            return k;
        }
    }
}

int64_t nm_strmap_find(const nm_strmap *m, const void *key, size_t len) {
    if (!m->n_slots) return -1;
    size_t slot;
    return strmap_probe(m, key, len, hash_bytes(key, len), &slot);
}

int64_t nm_strmap_add(nm_strmap *m, const void *key, size_t len, int *inserted) {
    NM_CHECK(len <= UINT32_MAX, "key of %zu bytes", len);
    if (!m->n_slots) nm_strmap_init(m, 16);
    uint64_t h = hash_bytes(key, len);
    size_t slot;
    int64_t k = strmap_probe(m, key, len, h, &slot);
    if (k >= 0) { *inserted = 0; return k; }
    NM_CHECK(m->n < INT32_MAX, "string map full");
    if ((m->n + 1) * 2 > m->n_slots) {   // grow the slot table and re-probe
        nm_free(m->slots);
        m->n_slots *= 2;
        m->slots = nm_malloc(m->n_slots * sizeof(int32_t));
        memset(m->slots, 0xFF, m->n_slots * sizeof(int32_t));
        size_t mask = m->n_slots - 1;
        for (size_t j = 0; j < m->n; j++) {
            const nm_strmap_entry *e = &m->e[j];
            uint64_t eh = hash_bytes(m->blob + e->off, e->len);
            size_t i = eh & mask;
            while (m->slots[i] >= 0) i = (i + 1) & mask;
            m->slots[i] = (int32_t)j;
        }
        strmap_probe(m, key, len, h, &slot);
    }
    if (m->n == m->e_cap) {
        m->e_cap *= 2;
        m->e = nm_realloc(m->e, m->e_cap * sizeof(nm_strmap_entry));
    }
    if (m->blob_n + len > m->blob_cap) {
        while (m->blob_n + len > m->blob_cap) m->blob_cap *= 2;
        m->blob = nm_realloc(m->blob, m->blob_cap);
    }
    memcpy(m->blob + m->blob_n, key, len);
    m->e[m->n] = (nm_strmap_entry){ .off = m->blob_n, .len = (uint32_t)len, .hash = (uint32_t)(h >> 32), .val = 0 };
    m->blob_n += len;
    m->slots[slot] = (int32_t)m->n;
    *inserted = 1;
    return (int64_t)m->n++;
}
