// tokenizer_internal.h: what tokenizer.c (load/encode/decode) and bpe_train.c (training)
// share and nobody else should use: the ByteLevel alphabet, two small hash maps, and the
// pre-tokenizer entry point, so that training splits text exactly as encoding does.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "data/tokenizer.h"

// --- ByteLevel alphabet (formats.md 4.6) -------------------------------------------------------
// Bytes 0x21-0x7E, 0xA1-0xAC, 0xAE-0xFF stand for themselves; the other 68 bytes, in increasing
// order, map to U+0100..U+0143.

uint32_t nm_bytelevel_cp(uint8_t b);
// Inverse: the byte a code point stands for, or -1 when cp is outside the alphabet.
int nm_bytelevel_byte(uint32_t cp);
// Writes the UTF-8 of byte b's code point (1 or 2 bytes) to out and returns its length.
int nm_bytelevel_utf8(uint8_t b, char out[2]);

// The GPT-2 pre-tokenizer regex as HF ByteLevel(use_regex=true) uses it (formats.md 4.5).
#define NM_GPT2_REGEX "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

// --- u64 -> u64 open-addressing map --------------------------------------------------------------
// Keys must not be UINT64_MAX (the empty marker). Used for merge pairs (a << 32 | b).

typedef struct nm_u64map {
    uint64_t *keys;             // (cap) UINT64_MAX = empty
    uint64_t *vals;             // (cap)
    size_t cap;                 // power of two
    size_t n;                   // live entries
} nm_u64map;

void nm_u64map_init(nm_u64map *m, size_t expected);
void nm_u64map_free(nm_u64map *m);
// Pointer to the value of key, or NULL if absent. Valid until the next insert.
uint64_t *nm_u64map_get(const nm_u64map *m, uint64_t key);
// Pointer to the value slot of key, inserting it with value 0 when absent (*inserted = 1).
uint64_t *nm_u64map_put(nm_u64map *m, uint64_t key, int *inserted);

// --- byte-string -> int64 map with entries in insertion order ------------------------------------

typedef struct nm_strmap_entry {
    uint64_t off;               // key bytes at blob + off
    uint32_t len;               // key length
    uint32_t hash;              // low bits of the key hash (cheap reject before memcmp)
    int64_t val;
} nm_strmap_entry;

typedef struct nm_strmap {
    char *blob;                 // all keys back to back
    size_t blob_n, blob_cap;
    nm_strmap_entry *e;         // (n) in insertion order
    size_t n, e_cap;
    int32_t *slots;             // (n_slots) entry index or -1
    size_t n_slots;             // power of two
} nm_strmap;

void nm_strmap_init(nm_strmap *m, size_t expected);
void nm_strmap_free(nm_strmap *m);
void nm_strmap_clear(nm_strmap *m);
// Entry index of key, or -1.
int64_t nm_strmap_find(const nm_strmap *m, const void *key, size_t len);
// Entry index of key, inserting it (val 0) when absent (*inserted = 1).
int64_t nm_strmap_add(nm_strmap *m, const void *key, size_t len, int *inserted);
static inline const char *nm_strmap_key(const nm_strmap *m, int64_t i) { return m->blob + m->e[i].off; }

// --- pre-tokenization ------------------------------------------------------------------------------

// Called once per piece of the input, in order: a pre-token (added_id == -1: its bytes, to be
// BPE-encoded) or an added-token match (added_id >= 0: the matched bytes, lstrip/rstrip
// whitespace included). Returns 0, or non-zero to stop (after filling err).
typedef int (*nm_pretok_fn)(void *ctx, const uint8_t *piece, size_t len, int32_t added_id, nm_error *err);

// Runs added-token extraction and the pre-tokenizer of t over text (any bytes).
int nm_tokenizer_pretokenize(const nm_tokenizer *t, const char *text, size_t len, nm_pretok_fn fn, void *ctx,
                             nm_error *err);

// A model-less tokenizer whose pre-tokenizer is GPT-2's (ByteLevel, use_regex, no prefix
// space) with "<|endoftext|>" as a special added token: what training splits text with.
// Only nm_tokenizer_pretokenize and nm_tokenizer_free may be called on it.
int nm_tokenizer_new_gpt2_pretok(nm_tokenizer **out, nm_error *err);
