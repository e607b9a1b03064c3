// tokenizer.c: loading a HF tokenizer.json (byte-level BPE), encoding and decoding.
//
// Reference behaviour: huggingface/tokenizers (0.20): `AddedVocabulary::find_matches`
// (added tokens, leftmost-longest, two passes), `NormalizedString::split` (Split behaviours),
// `ByteLevel::pre_tokenize` (prefix space, GPT-2 regex, byte -> char map), `BPE` with
// `Word::merge_all` (lowest rank first, leftmost on ties, via a min-heap that skips stale
// entries the same way), `ByteLevel::decode_chain`. formats.md section 4 restates the format.
// Regexes run on PCRE2 with UTF|UCP (HF uses Oniguruma; the one class difference known is
// that PCRE2's \s also matches U+180E).
//
// Not done here (refused at load time): normalizers other than null / empty Sequence,
// pre-tokenizers other than Split and ByteLevel, decoders other than ByteLevel, truncation,
// padding, BPE dropout, byte_fallback, continuing_subword_prefix / end_of_word_suffix, and
// unk tokens standing in for bytes missing from the vocab. Training lives in bpe_train.c.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/tokenizer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer_internal.h"
#include "core/fileio.h"

#define MAX_STEPS 8                 // pre-tokenizer steps in a Sequence
#define MAX_TOKEN_ID (1 << 24)      // largest id + 1 a tokenizer.json may use
#define CACHE_MAX_PIECE 48          // longer pre-tokens are not cached (rare, and cheap to miss)
#define CACHE_MAX_ENTRIES (1 << 16) // per call; the cache is reset when full

static const char *const BYTES_EOD = "<|endoftext|>";

enum { KIND_BYTES = 1, KIND_BPE, KIND_PRETOK };
enum { STEP_SPLIT, STEP_BYTELEVEL };
enum { BEH_REMOVED, BEH_ISOLATED, BEH_MERGED_PREV, BEH_MERGED_NEXT, BEH_CONTIGUOUS };

typedef struct pretok_step {
    int kind;                   // STEP_*
    pcre2_code *re;             // Split pattern, or the GPT-2 regex for ByteLevel(use_regex); NULL: no split
    int behavior;               // BEH_* (Split)
    int invert;                 // Split
    int add_prefix_space;       // ByteLevel
} pretok_step;

typedef struct added_token {
    int32_t id;
    char *content;              // plain UTF-8, not byte-level encoded
    size_t len;
    uint8_t single_word, lstrip, rstrip, normalized, special;
} added_token;

// Byte trie over added-token contents; children are a sibling list (few per node).
typedef struct trie_node {
    int32_t child;              // first child, -1 if none
    int32_t sibling;            // next sibling, -1 if none
    int32_t token;              // index into added[] when a content ends here, else -1
    uint8_t byte;
} trie_node;

typedef struct added_set {
    trie_node *nodes;           // nodes[0] is the root
    int32_t n, cap;
    int n_tokens;
    uint8_t first[256];         // 1 if some content starts with this byte
} added_set;

struct nm_tokenizer {
    int kind;                   // KIND_*
    int64_t vocab_size;         // max id + 1
    int32_t eod;                // -1 if none

    // decode table: token id -> bytes
    char *dec_blob;
    int64_t *dec_off;           // (vocab_size)
    int32_t *dec_len;           // (vocab_size) -1: no token has this id

    // BPE model
    int32_t byte_id[256];       // id of each byte's single-char token, -1 if absent (HF drops it)
    nm_u64map merges;           // (a << 32 | b) -> (rank << 32 | merged id)
    nm_strmap vocab;            // byte-level token string -> id
    int64_t n_vocab;            // entries in model.vocab (HF get_vocab_size)
    int ignore_merges;

    // added tokens
    added_token *added;         // one per distinct id
    int n_added;
    nm_strmap added_ids;        // content -> id
    added_set set_raw;          // normalized == false, matched first, on the raw text
    added_set set_norm;         // normalized == true, matched second, in what is left
    pcre2_code *re_word;        // Rust regex \w (single_word); NULL when no token needs it
    pcre2_code *re_space;       // Rust regex \s (lstrip/rstrip)

    // pre-tokenizer
    pretok_step steps[MAX_STEPS];
    int n_steps;
};

// --- UTF-8 ----------------------------------------------------------------------------------------

// Length of the valid UTF-8 sequence (RFC 3629: no overlongs, surrogates or > U+10FFFF, the
// same set Python accepts) starting at p, or 0 if none does.
static size_t utf8_valid_len(const uint8_t *p, size_t n) {
    uint8_t c = p[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) return (n >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c < 0xF0) {
        if (n < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && p[1] < 0xA0) return 0;
        if (c == 0xED && p[1] >= 0xA0) return 0;
        return 3;
    }
    if (c < 0xF5) {
        if (n < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && p[1] < 0x90) return 0;
        if (c == 0xF4 && p[1] >= 0x90) return 0;
        return 4;
    }
    return 0;
}

static uint32_t utf8_decode(const uint8_t *p, size_t k) {
    switch (k) {
    case 1: return p[0];
    case 2: return ((uint32_t)(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
    case 3: return ((uint32_t)(p[0] & 0x0F) << 12) | ((uint32_t)(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    default: return ((uint32_t)(p[0] & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12) | ((uint32_t)(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    }
}

// ByteLevel decoding of one token string (HF ByteLevel::decode_chain): the bytes its chars stand
// for if every char is in the alphabet, else the string's own bytes (how added tokens decode).
// Writes at most len bytes to out; returns the count.
static size_t bytelevel_decode(const char *s, size_t len, char *out) {
    const uint8_t *p = (const uint8_t *)s;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_valid_len(p + i, len - i);
        int b = k ? nm_bytelevel_byte(utf8_decode(p + i, k)) : -1;
        if (b < 0) { memcpy(out, s, len); return len; }
        out[o++] = (char)b;
        i += k;
    }
    return o;
}

// --- added-token trie -----------------------------------------------------------------------------

static int32_t trie_new_node(added_set *s, uint8_t byte) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->nodes = nm_realloc(s->nodes, (size_t)s->cap * sizeof(trie_node));
    }
    s->nodes[s->n] = (trie_node){ .child = -1, .sibling = -1, .token = -1, .byte = byte };
    return s->n++;
}

static void trie_insert(added_set *s, const char *content, size_t len, int32_t token) {
    if (!s->n) trie_new_node(s, 0);
    int32_t node = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t b = (uint8_t)content[i];
        int32_t c = s->nodes[node].child;
        while (c >= 0 && s->nodes[c].byte != b) c = s->nodes[c].sibling;
        if (c < 0) {
            c = trie_new_node(s, b);
            s->nodes[c].sibling = s->nodes[node].child;
            s->nodes[node].child = c;
        }
        node = c;
    }
    // Duplicate contents keep the first token, like the first pattern of an Aho-Corasick set.
    if (s->nodes[node].token < 0) {
        s->nodes[node].token = token;
        s->n_tokens++;
    }
    s->first[(uint8_t)content[0]] = 1;
}

// Longest content matching at p; returns its length (0 if none) and the token in *token.
static size_t trie_longest(const added_set *s, const uint8_t *p, size_t n, int32_t *token) {
    int32_t node = 0;
    size_t best = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = s->nodes[node].child;
        while (c >= 0 && s->nodes[c].byte != p[i]) c = s->nodes[c].sibling;
        if (c < 0) break;
        node = c;
        if (s->nodes[node].token >= 0) { best = i + 1; *token = s->nodes[node].token; }
    }
    return best;
}

// --- per-call scratch -----------------------------------------------------------------------------

typedef struct span {
    size_t a, b;                // [a, b) within the piece being split
    int m;                      // is a regex match (before behaviour), or "remove" (after)
} span;

typedef struct bpe_sym {
    int32_t c;                  // token id
    int32_t prev, next;         // neighbours, -1 at the ends
    int32_t len;                // bytes covered; 0 once merged into its left neighbour
} bpe_sym;

typedef struct bpe_merge {
    uint32_t rank;
    uint32_t pos;               // index of the left symbol
    int32_t new_id;
} bpe_merge;

typedef struct scratch {
    pcre2_match_data *md;
    pcre2_match_context *mctx;  // NULL until a match overflows the default JIT stack
    pcre2_jit_stack *jstack;
    span *lv[MAX_STEPS];        // split results per pre-tokenizer level
    size_t lv_cap[MAX_STEPS];
    uint8_t *arena;             // piece with its prefix space
    size_t arena_cap;
    bpe_sym *sym;
    size_t sym_cap;
    bpe_merge *heap;
    size_t heap_cap;
    char *bl;                   // byte-level string of a piece (ignore_merges lookups)
    size_t bl_cap;
    int32_t *ids;               // encode output
    int64_t n_ids, ids_cap;
    nm_strmap cache;            // pre-token bytes -> (offset in cache_ids << 8 | count)
    int32_t *cache_ids;
    size_t cache_n, cache_cap;
} scratch;

static void scratch_init(scratch *s) {
    memset(s, 0, sizeof(*s));
    s->md = pcre2_match_data_create(1, NULL);
    NM_CHECK(s->md, "pcre2_match_data_create failed");
}

static void scratch_free(scratch *s) {
    pcre2_match_data_free(s->md);
    if (s->mctx) pcre2_match_context_free(s->mctx);
    if (s->jstack) pcre2_jit_stack_free(s->jstack);
    for (int i = 0; i < MAX_STEPS; i++) nm_free(s->lv[i]);
    nm_free(s->arena);
    nm_free(s->sym);
    nm_free(s->heap);
    nm_free(s->bl);
    nm_free(s->ids);
    if (s->cache.n_slots) nm_strmap_free(&s->cache);
    nm_free(s->cache_ids);
}

// Grows *p (element size esz) to hold at least n elements.
static void ensure_cap(void **p, size_t *cap, size_t n, size_t esz) {
    if (n <= *cap) return;
    size_t c = *cap ? *cap : 16;
    while (c < n) c *= 2;
    *p = nm_realloc(*p, c * esz);
    *cap = c;
}

static void push_id(scratch *s, int32_t id) {
    if (s->n_ids == s->ids_cap) {
        s->ids_cap = s->ids_cap ? 2 * s->ids_cap : 256;
        s->ids = nm_realloc(s->ids, (size_t)s->ids_cap * sizeof(int32_t));
    }
    s->ids[s->n_ids++] = id;
}

// --- regex helpers --------------------------------------------------------------------------------

// One pcre2_match from offset off of the n-byte subject p (already checked UTF-8).
// Returns 1 with the match in [*ms, *me), 0 for no match, -1 on error.
static int re_match(const pcre2_code *re, scratch *s, const uint8_t *p, size_t n, size_t off, uint32_t opts,
                    size_t *ms, size_t *me, nm_error *err) {
    int rc = pcre2_match(re, p, n, off, opts | PCRE2_NO_UTF_CHECK, s->md, s->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !s->jstack) {
        // The 32 KiB default JIT stack can overflow on very long pieces; give this call a
        // large one (grown on demand by PCRE2) and retry.
        s->jstack = pcre2_jit_stack_create(32 * 1024, 256 * 1024 * 1024, NULL);
        s->mctx = pcre2_match_context_create(NULL);
        NM_CHECK(s->jstack && s->mctx, "pcre2 JIT stack allocation failed");
        pcre2_jit_stack_assign(s->mctx, NULL, s->jstack);
        rc = pcre2_match(re, p, n, off, opts | PCRE2_NO_UTF_CHECK, s->md, s->mctx);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        return nm_error_set(err, "tokenizer: regex match failed at byte %zu of a %zu-byte piece: %s", off, n,
                            (const char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(s->md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

static pcre2_code *re_compile(const char *pattern, size_t len, uint32_t extra, char *msg, size_t msg_size,
                              size_t *where) {
    int ec;
    PCRE2_SIZE eo;
    // PCRE2_LITERAL refuses UCP (meaningless without classes).
    uint32_t opts = PCRE2_UTF | extra | ((extra & PCRE2_LITERAL) ? 0 : PCRE2_UCP);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, len, opts, &ec, &eo, NULL);
    if (!re) {
        pcre2_get_error_message(ec, (PCRE2_UCHAR *)msg, msg_size);
        *where = eo;
        return NULL;
    }
    // JIT is an optimisation only: where it is unavailable pcre2_match interprets.
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    return re;
}

// --- character classes for added tokens (Rust regex \w and \s, Unicode) ---------------------------

// Whether the char starting at p (n bytes left) is in the class; invalid UTF-8 is in no class.
static int char_in(const nm_tokenizer *t, scratch *s, int word, const uint8_t *p, size_t n) {
    if (p[0] < 0x80) {
        uint8_t c = p[0];
        if (word) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        return c == ' ' || (c >= 0x09 && c <= 0x0D);
    }
    size_t k = utf8_valid_len(p, n);
    if (!k) return 0;
    size_t ms, me;
    return re_match(word ? t->re_word : t->re_space, s, p, k, 0, PCRE2_ANCHORED, &ms, &me, NULL) == 1;
}

// Start of the char ending at p + end (the last char of p[0, end)), or end if invalid.
static size_t last_char_start(const uint8_t *p, size_t end) {
    size_t i = end;
    for (int k = 0; k < 4 && i > 0; k++) {
        i--;
        if ((p[i] & 0xC0) != 0x80) return utf8_valid_len(p + i, end - i) == end - i ? i : end;
    }
    return end;
}

static int ends_with_word(const nm_tokenizer *t, scratch *s, const uint8_t *p, size_t end) {
    size_t i = last_char_start(p, end);
    return i < end && char_in(t, s, 1, p + i, end - i);
}

// Where the whitespace run that ends p[0, end) starts (HF space_leftmost_at_end).
static size_t space_leftmost_at_end(const nm_tokenizer *t, scratch *s, const uint8_t *p, size_t end) {
    while (end > 0) {
        size_t i = last_char_start(p, end);
        if (i == end || !char_in(t, s, 0, p + i, end - i)) break;
        end = i;
    }
    return end;
}

// Length of the whitespace run that starts p[0, n) (HF space_rightmost_at_start).
static size_t space_rightmost_at_start(const nm_tokenizer *t, scratch *s, const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_valid_len(p + i, n - i);
        if (!k || !char_in(t, s, 0, p + i, n - i)) break;
        i += k;
    }
    return i;
}

// --- pre-tokenization -----------------------------------------------------------------------------

typedef struct run_ctx {
    const nm_tokenizer *t;
    scratch *s;
    nm_pretok_fn fn;
    void *ctx;
    nm_error *err;
} run_ctx;

// HF Pattern::find_matches: the whole piece as alternating (gap, match) spans.
static int regex_spans(run_ctx *r, int level, const pcre2_code *re, int invert, const uint8_t *p, size_t n,
                       size_t *count) {
    scratch *s = r->s;
    size_t off = 0, prev = 0, k = 0;
    for (;;) {
        size_t ms, me;
        int rc = re_match(re, s, p, n, off, 0, &ms, &me, r->err);
        if (rc < 0) return -1;
        if (rc == 0) break;
        ensure_cap((void **)&s->lv[level], &s->lv_cap[level], k + 3, sizeof(span));
        if (ms != prev) s->lv[level][k++] = (span){ prev, ms, invert };
        s->lv[level][k++] = (span){ ms, me, !invert };
        prev = me;
        if (me == ms) {   // empty match: step one code point (none of the usual patterns does this)
            if (me >= n) break;
            size_t cl = utf8_valid_len(p + me, n - me);
            off = me + (cl ? cl : 1);
        } else {
            off = me;
        }
        if (off > n) break;
    }
    ensure_cap((void **)&s->lv[level], &s->lv_cap[level], k + 1, sizeof(span));
    if (prev != n) s->lv[level][k++] = (span){ prev, n, invert };
    *count = k;
    return 0;
}

// HF NormalizedString::split: turns (span, is_match) into (span, remove) per behaviour.
static size_t apply_behavior(span *v, size_t n, int beh) {
    size_t w = 0;
    int prev = 0;
    switch (beh) {
    case BEH_REMOVED:
        return n;
    case BEH_ISOLATED:
        for (size_t i = 0; i < n; i++) v[i].m = 0;
        return n;
    case BEH_MERGED_PREV:
        for (size_t i = 0; i < n; i++) {
            span c = v[i];
            if (c.m && !prev && w) v[w - 1].b = c.b;
            else v[w++] = (span){ c.a, c.b, 0 };
            prev = c.m;
        }
        return w;
    case BEH_CONTIGUOUS:
        for (size_t i = 0; i < n; i++) {
            span c = v[i];
            if (c.m == prev && w) v[w - 1].b = c.b;
            else v[w++] = (span){ c.a, c.b, 0 };
            prev = c.m;
        }
        return w;
    case BEH_MERGED_NEXT:   // the same fold from the right
        w = n;
        for (size_t i = n; i-- > 0;) {
            span c = v[i];
            if (c.m && !prev && w < n) v[w].a = c.a;
            else v[--w] = (span){ c.a, c.b, 0 };
            prev = c.m;
        }
        memmove(v, v + w, (n - w) * sizeof(span));
        return n - w;
    }
    return n;
}

static int steps_run(run_ctx *r, int level, const uint8_t *p, size_t n) {
    if (n == 0) return 0;   // HF drops empty splits
    const nm_tokenizer *t = r->t;
    if (level == t->n_steps) return r->fn(r->ctx, p, n, -1, r->err);
    const pretok_step *st = &t->steps[level];
    scratch *s = r->s;
    if (st->kind == STEP_BYTELEVEL) {
        // Load time guarantees ByteLevel is the last step, so the arena is not reused below.
        if (st->add_prefix_space && p[0] != ' ') {
            ensure_cap((void **)&s->arena, &s->arena_cap, n + 1, 1);
            s->arena[0] = ' ';
            memcpy(s->arena + 1, p, n);
            p = s->arena;
            n++;
        }
        if (!st->re) return steps_run(r, level + 1, p, n);
    }
    size_t k;
    if (regex_spans(r, level, st->re, st->invert, p, n, &k)) return -1;
    k = apply_behavior(s->lv[level], k, st->kind == STEP_BYTELEVEL ? BEH_ISOLATED : st->behavior);
    for (size_t i = 0; i < k; i++) {
        span c = s->lv[level][i];   // copy: deeper levels never touch lv[level], but be plain
        if (!c.m && c.b > c.a && steps_run(r, level + 1, p + c.a, c.b - c.a)) return -1;
    }
    return 0;
}

// A stretch without added tokens: valid UTF-8 runs go through the pre-tokenizer, each maximal
// run of invalid bytes is a pre-token of its own.
static int segment_run(run_ctx *r, const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n) {
            if (p[j] < 0x80) { j++; continue; }
            size_t k = utf8_valid_len(p + j, n - j);
            if (!k) break;
            j += k;
        }
        if (j > i && steps_run(r, 0, p + i, j - i)) return -1;
        i = j;
        while (j < n && !utf8_valid_len(p + j, n - j)) j++;
        if (j > i && r->fn(r->ctx, p + i, j - i, -1, r->err)) return -1;
        i = j;
    }
    return 0;
}

// HF AddedVocabulary::find_matches over one piece; pass 0 (non-normalized tokens) hands the
// gaps to pass 1 (normalized tokens), which hands its gaps to the pre-tokenizer.
static int added_run(run_ctx *r, int pass, const uint8_t *p, size_t n) {
    if (n == 0) return 0;
    const nm_tokenizer *t = r->t;
    const added_set *set = pass == 0 ? &t->set_raw : &t->set_norm;
    if (set->n_tokens == 0) return pass == 0 ? added_run(r, 1, p, n) : segment_run(r, p, n);
    size_t start_offset = 0, pos = 0;
    while (pos < n) {
        if (!set->first[p[pos]]) { pos++; continue; }
        int32_t tok = -1;
        size_t mlen = trie_longest(set, p + pos, n - pos, &tok);
        if (!mlen) { pos++; continue; }
        size_t start = pos, stop = pos + mlen;
        pos = stop;   // matches never overlap, whether or not this one is kept
        const added_token *a = &t->added[tok];
        if (a->single_word) {
            int start_space = start == 0 || !ends_with_word(t, r->s, p, start);
            int stop_space = stop == n || !char_in(t, r->s, 1, p + stop, n - stop);
            if (!start_space || !stop_space) continue;
        }
        if (a->lstrip) {
            size_t ns = space_leftmost_at_end(t, r->s, p, start);
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->rstrip) {
            stop += space_rightmost_at_start(t, r->s, p + stop, n - stop);
            pos = stop;   // HF would let a later match start inside the stripped spaces; we do not
        }
        if (start_offset < start) {
            int rc = pass == 0 ? added_run(r, 1, p + start_offset, start - start_offset)
                               : segment_run(r, p + start_offset, start - start_offset);
            if (rc) return -1;
        }
        if (r->fn(r->ctx, p + start, stop - start, a->id, r->err)) return -1;
        start_offset = stop;
    }
    if (start_offset < n) {
        return pass == 0 ? added_run(r, 1, p + start_offset, n - start_offset)
                         : segment_run(r, p + start_offset, n - start_offset);
    }
    return 0;
}

static int pretokenize_with(const nm_tokenizer *t, scratch *s, const char *text, size_t len, nm_pretok_fn fn,
                            void *ctx, nm_error *err) {
    run_ctx r = { .t = t, .s = s, .fn = fn, .ctx = ctx, .err = err };
    return added_run(&r, 0, (const uint8_t *)text, len);
}

int nm_tokenizer_pretokenize(const nm_tokenizer *t, const char *text, size_t len, nm_pretok_fn fn, void *ctx,
                             nm_error *err) {
    NM_CHECK(t && t->kind != KIND_BYTES, "pre-tokenize needs a BPE tokenizer");
    scratch s;
    scratch_init(&s);
    int rc = pretokenize_with(t, &s, text, len, fn, ctx, err);
    scratch_free(&s);
    return rc;
}

// --- BPE ------------------------------------------------------------------------------------------

static int merge_before(const bpe_merge *x, const bpe_merge *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(bpe_merge *h, size_t *n, bpe_merge m) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!merge_before(&m, &h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = m;
}

static bpe_merge heap_pop(bpe_merge *h, size_t *n) {
    bpe_merge top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && merge_before(&h[c + 1], &h[c])) c++;
        if (!merge_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

static int lookup_merge(const nm_tokenizer *t, int32_t a, int32_t b, bpe_merge *m, uint32_t pos) {
    const uint64_t *v = nm_u64map_get(&t->merges, ((uint64_t)(uint32_t)a << 32) | (uint32_t)b);
    if (!v) return 0;
    *m = (bpe_merge){ .rank = (uint32_t)(*v >> 32), .pos = pos, .new_id = (int32_t)(uint32_t)*v };
    return 1;
}

// HF Word::merge_all, step for step (including how stale heap entries are skipped).
static void bpe_word(const nm_tokenizer *t, scratch *s, const uint8_t *p, size_t n) {
    ensure_cap((void **)&s->sym, &s->sym_cap, n, sizeof(bpe_sym));
    ensure_cap((void **)&s->heap, &s->heap_cap, 3 * n + 1, sizeof(bpe_merge));
    bpe_sym *sym = s->sym;
    int32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[p[i]];
        if (id < 0) continue;   // no token for this byte and no unk: HF drops it silently
        sym[m] = (bpe_sym){ .c = id, .prev = m - 1, .next = -1, .len = 1 };
        if (m > 0) sym[m - 1].next = m;
        m++;
    }
    size_t hn = 0;
    bpe_merge mg;
    for (int32_t i = 0; i + 1 < m; i++) {
        if (lookup_merge(t, sym[i].c, sym[i + 1].c, &mg, (uint32_t)i)) heap_push(s->heap, &hn, mg);
    }
    while (hn) {
        bpe_merge top = heap_pop(s->heap, &hn);
        bpe_sym *cur = &sym[top.pos];
        if (cur->len == 0 || cur->next < 0) continue;
        bpe_sym right = sym[cur->next];
        if (!lookup_merge(t, cur->c, right.c, &mg, 0) || mg.new_id != top.new_id) continue;   // stale
        sym[cur->next].len = 0;
        cur->c = top.new_id;
        cur->len += right.len;
        cur->next = right.next;
        if (right.next >= 0) sym[right.next].prev = (int32_t)top.pos;
        if (cur->prev >= 0 && lookup_merge(t, sym[cur->prev].c, cur->c, &mg, (uint32_t)cur->prev))
            heap_push(s->heap, &hn, mg);
        if (cur->next >= 0 && lookup_merge(t, cur->c, sym[cur->next].c, &mg, top.pos))
            heap_push(s->heap, &hn, mg);
    }
    for (int32_t i = 0; i < m; i++) {
        if (sym[i].len) push_id(s, sym[i].c);
    }
}

static void bpe_piece(const nm_tokenizer *t, scratch *s, const uint8_t *p, size_t n) {
    if (t->ignore_merges) {   // a pre-token that is a whole vocab entry is emitted as is
        ensure_cap((void **)&s->bl, &s->bl_cap, 2 * n, 1);
        size_t k = 0;
        for (size_t i = 0; i < n; i++) k += (size_t)nm_bytelevel_utf8(p[i], s->bl + k);
        int64_t e = nm_strmap_find(&t->vocab, s->bl, k);
        if (e >= 0) { push_id(s, (int32_t)t->vocab.e[e].val); return; }
    }
    if (n == 1) {
        if (t->byte_id[p[0]] >= 0) push_id(s, t->byte_id[p[0]]);
        return;
    }
    if (n > CACHE_MAX_PIECE) { bpe_word(t, s, p, n); return; }
    if (!s->cache.n_slots) nm_strmap_init(&s->cache, 1024);
    int64_t e = nm_strmap_find(&s->cache, p, n);
    if (e >= 0) {
        uint64_t v = (uint64_t)s->cache.e[e].val;
        // A piece of bytes missing from the vocab gives no ids, and cache_ids may still be
        // NULL: no pointer arithmetic on it then (UB; found by tests/fuzz/fuzz_tokenizer).
        if ((v & 0xFF) == 0) return;
        const int32_t *src = s->cache_ids + (v >> 8);
        for (uint64_t i = 0; i < (v & 0xFF); i++) push_id(s, src[i]);
        return;
    }
    int64_t before = s->n_ids;
    bpe_word(t, s, p, n);
    size_t cnt = (size_t)(s->n_ids - before);
    if (s->cache.n >= CACHE_MAX_ENTRIES) { nm_strmap_clear(&s->cache); s->cache_n = 0; }
    ensure_cap((void **)&s->cache_ids, &s->cache_cap, s->cache_n + cnt, sizeof(int32_t));
    if (cnt) memcpy(s->cache_ids + s->cache_n, s->ids + before, cnt * sizeof(int32_t));
    int ins;
    e = nm_strmap_add(&s->cache, p, n, &ins);
    s->cache.e[e].val = (int64_t)(((uint64_t)s->cache_n << 8) | cnt);
    s->cache_n += cnt;
}

typedef struct encode_ctx {
    const nm_tokenizer *t;
    scratch *s;
} encode_ctx;

static int encode_piece(void *ctx, const uint8_t *p, size_t n, int32_t added_id, nm_error *err) {
    (void)err;
    encode_ctx *e = ctx;
    if (added_id >= 0) push_id(e->s, added_id);
    else bpe_piece(e->t, e->s, p, n);
    return 0;
}

int nm_tokenizer_encode(const nm_tokenizer *t, const char *text, size_t len, int32_t **ids, int64_t *n_ids,
                        nm_error *err) {
    NM_CHECK(t && ids && n_ids && (text || len == 0), "bad arguments");
    *ids = NULL;
    *n_ids = 0;
    if (t->kind == KIND_BYTES) {
        int32_t *out = nm_malloc((len ? len : 1) * sizeof(int32_t));
        for (size_t i = 0; i < len; i++) out[i] = (uint8_t)text[i];
        *ids = out;
        *n_ids = (int64_t)len;
        return 0;
    }
    if (t->kind != KIND_BPE) return nm_error_set(err, "tokenizer: this tokenizer has no model to encode with");
    scratch s;
    scratch_init(&s);
    s.ids_cap = (int64_t)(len / 3 + 16);
    s.ids = nm_malloc((size_t)s.ids_cap * sizeof(int32_t));
    encode_ctx ec = { .t = t, .s = &s };
    int rc = pretokenize_with(t, &s, text ? text : "", len, encode_piece, &ec, err);
    if (rc == 0) {
        *ids = s.ids;
        *n_ids = s.n_ids;
        s.ids = NULL;
    }
    scratch_free(&s);
    return rc ? -1 : 0;
}

// --- decode ---------------------------------------------------------------------------------------

int nm_tokenizer_decode(const nm_tokenizer *t, const int32_t *ids, int64_t n, char **text, size_t *len,
                        nm_error *err) {
    NM_CHECK(t && text && len && (ids || n == 0) && n >= 0, "bad arguments");
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size)
            return nm_error_set(err, "tokenizer decode: id %d at position %lld is out of range [0, %lld)", id,
                                (long long)i, (long long)t->vocab_size);
        if (t->kind == KIND_BYTES) total += id < 256 ? 1 : strlen(BYTES_EOD);
        else if (t->dec_len[id] < 0)
            return nm_error_set(err, "tokenizer decode: id %d at position %lld names no token (a gap in the vocab)",
                                id, (long long)i);
        else total += (size_t)t->dec_len[id];
    }
    char *out = nm_malloc(total + 1);
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (t->kind == KIND_BYTES) {
            if (id < 256) out[o++] = (char)id;
            else { memcpy(out + o, BYTES_EOD, strlen(BYTES_EOD)); o += strlen(BYTES_EOD); }
        } else {
            memcpy(out + o, t->dec_blob + t->dec_off[id], (size_t)t->dec_len[id]);
            o += (size_t)t->dec_len[id];
        }
    }
    out[o] = 0;
    *text = out;
    *len = o;
    return 0;
}

// --- accessors and lifetime -----------------------------------------------------------------------

int64_t nm_tokenizer_vocab_size(const nm_tokenizer *t) { return t->vocab_size; }
int32_t nm_tokenizer_eod(const nm_tokenizer *t) { return t->eod; }

void nm_tokenizer_free(nm_tokenizer *t) {
    if (!t) return;
    nm_free(t->dec_blob);
    nm_free(t->dec_off);
    nm_free(t->dec_len);
    if (t->merges.cap) nm_u64map_free(&t->merges);
    if (t->vocab.n_slots) nm_strmap_free(&t->vocab);
    if (t->added_ids.n_slots) nm_strmap_free(&t->added_ids);
    for (int i = 0; i < t->n_added; i++) nm_free(t->added[i].content);
    nm_free(t->added);
    nm_free(t->set_raw.nodes);
    nm_free(t->set_norm.nodes);
    if (t->re_word) pcre2_code_free(t->re_word);
    if (t->re_space) pcre2_code_free(t->re_space);
    for (int i = 0; i < t->n_steps; i++) {
        if (t->steps[i].re) pcre2_code_free(t->steps[i].re);
    }
    nm_free(t);
}

// --- loading: JSON helpers ------------------------------------------------------------------------

// The loader state: which file, for messages.
typedef struct loader {
    const char *path;
    nm_error *err;
} loader;

// Absent and null read as dflt; anything but a bool is an error naming the field.
static int get_bool(loader *L, const cJSON *obj, const char *where, const char *key, int dflt, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) { *out = dflt; return 0; }
    if (!cJSON_IsBool(v)) return nm_error_set(L->err, "%s: %s.%s: expected true or false", L->path, where, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

// A string field, or NULL when absent/null; a non-string is an error.
static int get_str(loader *L, const cJSON *obj, const char *where, const char *key, const char **out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = NULL;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v)) return nm_error_set(L->err, "%s: %s.%s: expected a string", L->path, where, key);
    *out = v->valuestring;
    return 0;
}

static int get_id(loader *L, const cJSON *v, const char *where, int32_t *out) {
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= (double)INT32_MAX ||
        v->valuedouble != floor(v->valuedouble))
        return nm_error_set(L->err, "%s: %s: expected a token id (integer in [0, 2^31-1))", L->path, where);
    *out = (int32_t)v->valuedouble;
    return 0;
}

static const char *type_of(const cJSON *obj) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

// --- loading: sections ----------------------------------------------------------------------------

static int load_normalizer(loader *L, const cJSON *n, const char *where) {
    if (!n || cJSON_IsNull(n)) return 0;
    const char *ty = cJSON_IsObject(n) ? type_of(n) : NULL;
    if (ty && !strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list)) return nm_error_set(L->err, "%s: %s.normalizers: expected an array", L->path, where);
        int i = 0;
        const cJSON *c;
        cJSON_ArrayForEach(c, list) {
            char sub[128];
            snprintf(sub, sizeof(sub), "%s.normalizers[%d]", where, i++);
            if (load_normalizer(L, c, sub)) return -1;
        }
        return 0;
    }
    return nm_error_set(L->err,
                        "%s: %s: normalizer type \"%s\" is not supported (only null or an empty Sequence, as "
                        "GPT-2 and DeepSeek-V3 use)",
                        L->path, where, ty ? ty : "?");
}

static int load_step(loader *L, nm_tokenizer *t, const cJSON *pt, const char *where) {
    const char *ty = cJSON_IsObject(pt) ? type_of(pt) : NULL;
    if (!ty) return nm_error_set(L->err, "%s: %s: expected an object with a \"type\"", L->path, where);
    if (t->n_steps == MAX_STEPS) return nm_error_set(L->err, "%s: %s: more than %d pre-tokenizers", L->path, where, MAX_STEPS);
    pretok_step *st = &t->steps[t->n_steps];
    memset(st, 0, sizeof(*st));
    char msg[256];
    size_t at;
    if (!strcmp(ty, "ByteLevel")) {
        int use_regex;
        st->kind = STEP_BYTELEVEL;
        if (get_bool(L, pt, where, "add_prefix_space", 1, &st->add_prefix_space)) return -1;
        if (get_bool(L, pt, where, "use_regex", 1, &use_regex)) return -1;
        if (use_regex) {
            st->re = re_compile(NM_GPT2_REGEX, strlen(NM_GPT2_REGEX), 0, msg, sizeof(msg), &at);
            NM_CHECK(st->re, "GPT-2 regex does not compile: %s", msg);
        }
        t->n_steps++;
        return 0;
    }
    if (!strcmp(ty, "Split")) {
        st->kind = STEP_SPLIT;
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(pt, "pattern");
        const cJSON *rx = cJSON_IsObject(pat) ? cJSON_GetObjectItemCaseSensitive(pat, "Regex") : NULL;
        const cJSON *lit = cJSON_IsObject(pat) ? cJSON_GetObjectItemCaseSensitive(pat, "String") : NULL;
        const cJSON *src = cJSON_IsString(rx) ? rx : cJSON_IsString(lit) ? lit : NULL;
        if (!src || !src->valuestring[0])
            return nm_error_set(L->err, "%s: %s.pattern: expected {\"Regex\": \"...\"} or {\"String\": \"...\"}",
                                L->path, where);
        const char *beh;
        if (get_str(L, pt, where, "behavior", &beh)) return -1;
        static const char *const names[] = { "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous" };
        st->behavior = -1;
        for (int i = 0; i < 5 && beh; i++) {
            if (!strcmp(beh, names[i])) st->behavior = i;
        }
        if (st->behavior < 0)
            return nm_error_set(L->err, "%s: %s.behavior: \"%s\" is not one of Removed, Isolated, MergedWithPrevious, "
                                "MergedWithNext, Contiguous", L->path, where, beh ? beh : "(missing)");
        if (get_bool(L, pt, where, "invert", 0, &st->invert)) return -1;
        st->re = re_compile(src->valuestring, strlen(src->valuestring), src == lit ? PCRE2_LITERAL : 0, msg,
                            sizeof(msg), &at);
        if (!st->re)
            return nm_error_set(L->err, "%s: %s.pattern: PCRE2 cannot compile /%s/ (at offset %zu): %s", L->path, where,
                                src->valuestring, at, msg);
        t->n_steps++;
        return 0;
    }
    return nm_error_set(L->err, "%s: %s: pre_tokenizer type \"%s\" is not supported (only ByteLevel, or a Sequence of "
                        "Split and a final ByteLevel)", L->path, where, ty);
}

static int load_pre_tokenizer(loader *L, nm_tokenizer *t, const cJSON *pt) {
    if (!pt || cJSON_IsNull(pt))
        return nm_error_set(L->err, "%s: pre_tokenizer: missing; byte-level BPE needs a ByteLevel pre_tokenizer", L->path);
    const char *ty = cJSON_IsObject(pt) ? type_of(pt) : NULL;
    if (ty && !strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pt, "pretokenizers");
        if (!cJSON_IsArray(list)) return nm_error_set(L->err, "%s: pre_tokenizer.pretokenizers: expected an array", L->path);
        int i = 0;
        const cJSON *c;
        cJSON_ArrayForEach(c, list) {
            char where[64];
            snprintf(where, sizeof(where), "pre_tokenizer.pretokenizers[%d]", i++);
            if (load_step(L, t, c, where)) return -1;
        }
    } else if (load_step(L, t, pt, "pre_tokenizer")) {
        return -1;
    }
    // The byte -> char mapping must come after every split (they see raw text), and exactly once.
    int n_bl = 0;
    for (int i = 0; i < t->n_steps; i++) n_bl += t->steps[i].kind == STEP_BYTELEVEL;
    if (n_bl != 1 || t->steps[t->n_steps - 1].kind != STEP_BYTELEVEL)
        return nm_error_set(L->err, "%s: pre_tokenizer: byte-level BPE needs exactly one ByteLevel, as the last step",
                            L->path);
    return 0;
}

static int load_model(loader *L, nm_tokenizer *t, const cJSON *model) {
    if (!model) return nm_error_set(L->err, "%s: missing field \"model\"", L->path);
    if (!cJSON_IsObject(model)) return nm_error_set(L->err, "%s: model: expected an object", L->path);
    const char *ty = type_of(model);
    if (ty && strcmp(ty, "BPE"))
        return nm_error_set(L->err, "%s: model.type: \"%s\" is not supported (only BPE)", L->path, ty);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble == 0.0))
        return nm_error_set(L->err, "%s: model.dropout: BPE dropout is not supported (must be null)", L->path);
    int flag;
    if (get_bool(L, model, "model", "byte_fallback", 0, &flag)) return -1;
    if (flag) return nm_error_set(L->err, "%s: model.byte_fallback: true is not supported", L->path);
    if (get_bool(L, model, "model", "ignore_merges", 0, &t->ignore_merges)) return -1;
    const char *s;
    if (get_str(L, model, "model", "continuing_subword_prefix", &s)) return -1;
    if (s && s[0]) return nm_error_set(L->err, "%s: model.continuing_subword_prefix: \"%s\" is not supported", L->path, s);
    if (get_str(L, model, "model", "end_of_word_suffix", &s)) return -1;
    if (s && s[0]) return nm_error_set(L->err, "%s: model.end_of_word_suffix: \"%s\" is not supported", L->path, s);
    const char *unk;
    if (get_str(L, model, "model", "unk_token", &unk)) return -1;

    // vocab: byte-level token string -> id
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!cJSON_IsObject(vocab)) return nm_error_set(L->err, "%s: model.vocab: missing or not an object", L->path);
    nm_strmap_init(&t->vocab, (size_t)cJSON_GetArraySize(vocab));
    const cJSON *c;
    cJSON_ArrayForEach(c, vocab) {
        char where[160];
        snprintf(where, sizeof(where), "model.vocab[\"%.100s\"]", c->string);
        int32_t id;
        if (get_id(L, c, where, &id)) return -1;
        int ins;
        int64_t e = nm_strmap_add(&t->vocab, c->string, strlen(c->string), &ins);
        if (!ins) return nm_error_set(L->err, "%s: %s: token appears twice", L->path, where);
        t->vocab.e[e].val = id;
    }
    t->n_vocab = (int64_t)t->vocab.n;
    int missing = 0;
    for (int b = 0; b < 256; b++) {
        char u[2];
        int k = nm_bytelevel_utf8((uint8_t)b, u);
        int64_t e = nm_strmap_find(&t->vocab, u, (size_t)k);
        t->byte_id[b] = e >= 0 ? (int32_t)t->vocab.e[e].val : -1;
        missing += e < 0;
    }
    if (missing && unk)
        return nm_error_set(L->err, "%s: model.unk_token: %d byte tokens are missing from the vocab and unk "
                            "substitution is not supported", L->path, missing);

    // merges: rank = position (after "#version" lines); a later duplicate pair wins, as in HF.
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsArray(merges)) return nm_error_set(L->err, "%s: model.merges: missing or not an array", L->path);
    nm_u64map_init(&t->merges, (size_t)cJSON_GetArraySize(merges));
    char *cat = NULL;
    size_t cat_cap = 0;
    uint32_t rank = 0;
    int i = 0;
    cJSON_ArrayForEach(c, merges) {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsString(c)) {
            const char *str = c->valuestring;
            if (!strncmp(str, "#version", 8)) { i++; continue; }
            const char *sp = strchr(str, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                nm_free(cat);
                return nm_error_set(L->err, "%s: model.merges[%d]: \"%.100s\" is not two tokens separated by one space",
                                    L->path, i, str);
            }
            a = str; la = (size_t)(sp - str);
            b = sp + 1; lb = strlen(b);
        } else if (cJSON_IsArray(c) && cJSON_GetArraySize(c) == 2 && cJSON_IsString(cJSON_GetArrayItem(c, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(c, 1))) {
            a = cJSON_GetArrayItem(c, 0)->valuestring; la = strlen(a);
            b = cJSON_GetArrayItem(c, 1)->valuestring; lb = strlen(b);
        } else {
            nm_free(cat);
            return nm_error_set(L->err, "%s: model.merges[%d]: expected \"a b\" or [\"a\", \"b\"]", L->path, i);
        }
        int64_t ea = nm_strmap_find(&t->vocab, a, la), eb = nm_strmap_find(&t->vocab, b, lb);
        ensure_cap((void **)&cat, &cat_cap, la + lb + 1, 1);
        memcpy(cat, a, la);
        memcpy(cat + la, b, lb);
        int64_t ec = nm_strmap_find(&t->vocab, cat, la + lb);
        if (ea < 0 || eb < 0 || ec < 0) {
            const char *bad = ea < 0 ? a : eb < 0 ? b : cat;
            int lbad = (int)(ea < 0 ? la : eb < 0 ? lb : la + lb);
            int rc = nm_error_set(L->err, "%s: model.merges[%d]: token \"%.*s\" is not in model.vocab", L->path, i,
                                  lbad > 100 ? 100 : lbad, bad);
            nm_free(cat);
            return rc;
        }
        uint64_t key = ((uint64_t)(uint32_t)t->vocab.e[ea].val << 32) | (uint32_t)t->vocab.e[eb].val;
        int ins;
        *nm_u64map_put(&t->merges, key, &ins) = ((uint64_t)rank << 32) | (uint32_t)t->vocab.e[ec].val;
        rank++;
        i++;
    }
    nm_free(cat);
    return 0;
}

// HF's id for a new added token (AddedVocabulary::add_tokens): an existing added token or model
// token of that content keeps its id; otherwise the next id after the model vocab and the
// added tokens so far.
static int64_t hf_added_id(const nm_tokenizer *t, const char *content, size_t len, int64_t max_added) {
    int64_t e = nm_strmap_find(&t->added_ids, content, len);
    if (e >= 0) return t->added_ids.e[e].val;
    e = nm_strmap_find(&t->vocab, content, len);
    if (e >= 0) return t->vocab.e[e].val;
    if (max_added < 0) return t->n_vocab;
    return (max_added >= t->n_vocab || t->n_vocab == 0) ? max_added + 1 : t->n_vocab;
}

static int load_added(loader *L, nm_tokenizer *t, const cJSON *list) {
    nm_strmap_init(&t->added_ids, 64);
    if (!list || cJSON_IsNull(list)) return 0;
    if (!cJSON_IsArray(list)) return nm_error_set(L->err, "%s: added_tokens: expected an array", L->path);
    t->added = nm_calloc((size_t)cJSON_GetArraySize(list) + 1, sizeof(added_token));
    int64_t max_added = -1;
    int i = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, list) {
        char where[64];
        snprintf(where, sizeof(where), "added_tokens[%d]", i++);
        if (!cJSON_IsObject(c)) return nm_error_set(L->err, "%s: %s: expected an object", L->path, where);
        const char *content;
        int32_t id;
        int sw, ls, rs, norm, special;
        if (get_str(L, c, where, "content", &content)) return -1;
        if (!content) return nm_error_set(L->err, "%s: %s.content: missing", L->path, where);
        const cJSON *idv = cJSON_GetObjectItemCaseSensitive(c, "id");
        char wid[80];
        snprintf(wid, sizeof(wid), "%s.id", where);
        if (get_id(L, idv, wid, &id)) return -1;
        if (get_bool(L, c, where, "special", 0, &special) || get_bool(L, c, where, "single_word", 0, &sw) ||
            get_bool(L, c, where, "lstrip", 0, &ls) || get_bool(L, c, where, "rstrip", 0, &rs) ||
            get_bool(L, c, where, "normalized", !special, &norm))
            return -1;
        size_t len = strlen(content);
        if (!len) continue;   // HF ignores empty added tokens
        int64_t hf = hf_added_id(t, content, len, max_added);
        if (hf != id)
            return nm_error_set(L->err, "%s: %s (\"%.100s\"): the file says id %d but HF tokenizers would give it "
                                "id %lld; refusing the inconsistent file", L->path, where, content, id, (long long)hf);
        int ins;
        int64_t e = nm_strmap_add(&t->added_ids, content, len, &ins);
        t->added_ids.e[e].val = id;
        if (id > max_added) max_added = id;
        // One entry per id; a later definition of the same id replaces the flags (HF's map).
        int k = 0;
        while (k < t->n_added && t->added[k].id != id) k++;
        if (k == t->n_added) t->n_added++;
        else nm_free(t->added[k].content);
        t->added[k] = (added_token){ .id = id, .content = nm_strdup(content), .len = len, .single_word = (uint8_t)sw,
                                     .lstrip = (uint8_t)ls, .rstrip = (uint8_t)rs, .normalized = (uint8_t)norm,
                                     .special = (uint8_t)special };
    }
    int need_word = 0, need_space = 0;
    for (int k = 0; k < t->n_added; k++) {
        added_token *a = &t->added[k];
        trie_insert(a->normalized ? &t->set_norm : &t->set_raw, a->content, a->len, k);
        need_word |= a->single_word;
        need_space |= a->lstrip || a->rstrip;
    }
    char msg[256];
    size_t at;
    // Rust regex (used by HF here) \w is [\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}], \s is \p{White_Space}.
    if (need_word) t->re_word = re_compile("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", PCRE2_ZERO_TERMINATED, 0, msg, sizeof(msg), &at);
    if (need_space) t->re_space = re_compile("\\p{White_Space}", PCRE2_ZERO_TERMINATED, 0, msg, sizeof(msg), &at);
    NM_CHECK((!need_word || t->re_word) && (!need_space || t->re_space), "class regex: %s", msg);
    return 0;
}

static int load_decoder(loader *L, const cJSON *d) {
    const char *ty = cJSON_IsObject(d) ? type_of(d) : NULL;
    if (!ty || strcmp(ty, "ByteLevel"))
        return nm_error_set(L->err, "%s: decoder: %s%s%s is not supported (byte-level BPE needs the ByteLevel decoder)",
                            L->path, ty ? "type \"" : "", ty ? ty : (d && !cJSON_IsNull(d) ? "this value" : "null"),
                            ty ? "\"" : "");
    return 0;
}

// Builds the id -> bytes table from the vocab and the added tokens (which win on shared ids).
static void build_decode_table(nm_tokenizer *t) {
    int64_t V = t->vocab_size;
    t->dec_off = nm_malloc((size_t)(V ? V : 1) * sizeof(int64_t));
    t->dec_len = nm_malloc((size_t)(V ? V : 1) * sizeof(int32_t));
    for (int64_t i = 0; i < V; i++) t->dec_len[i] = -1;
    size_t cap = t->vocab.blob_n + 1;
    for (int k = 0; k < t->n_added; k++) cap += t->added[k].len;
    t->dec_blob = nm_malloc(cap);
    size_t o = 0;
    for (size_t e = 0; e < t->vocab.n; e++) {
        int64_t id = t->vocab.e[e].val;
        t->dec_off[id] = (int64_t)o;
        size_t n = bytelevel_decode(nm_strmap_key(&t->vocab, (int64_t)e), t->vocab.e[e].len, t->dec_blob + o);
        t->dec_len[id] = (int32_t)n;
        o += n;
    }
    for (int k = 0; k < t->n_added; k++) {
        const added_token *a = &t->added[k];
        t->dec_off[a->id] = (int64_t)o;
        size_t n = bytelevel_decode(a->content, a->len, t->dec_blob + o);
        t->dec_len[a->id] = (int32_t)n;
        o += n;
    }
}

static int32_t find_token(const nm_tokenizer *t, const char *s) {
    int64_t e = nm_strmap_find(&t->added_ids, s, strlen(s));
    if (e >= 0) return (int32_t)t->added_ids.e[e].val;
    e = nm_strmap_find(&t->vocab, s, strlen(s));
    return e >= 0 ? (int32_t)t->vocab.e[e].val : -1;
}

// The eod rule of tokenizer.h: an adjacent tokenizer_config.json's eos_token, else known names.
static int32_t resolve_eod(const nm_tokenizer *t, const char *path) {
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path + 1) : 0;
    char *cfg_path = nm_malloc(dir_len + 32);
    memcpy(cfg_path, path, dir_len);
    strcpy(cfg_path + dir_len, "tokenizer_config.json");
    int32_t id = -1;
    char *data;
    size_t size;
    FILE *probe = fopen(cfg_path, "rb");
    if (probe) {
        fclose(probe);
        nm_error ignored;
        if (nm_file_read_all(cfg_path, &data, &size, &ignored) == 0) {
            cJSON *cfg = cJSON_ParseWithLength(data, size);
            const cJSON *eos = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "eos_token") : NULL;
            if (cJSON_IsObject(eos)) eos = cJSON_GetObjectItemCaseSensitive(eos, "content");
            if (cJSON_IsString(eos)) id = find_token(t, eos->valuestring);
            cJSON_Delete(cfg);
            nm_free(data);
        }
    }
    nm_free(cfg_path);
    static const char *const names[] = { "<|endoftext|>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "</s>" };
    for (int i = 0; i < 3 && id < 0; i++) id = find_token(t, names[i]);
    return id;
}

static int load_json(nm_tokenizer *t, const char *path, nm_error *err) {
    loader L = { .path = path, .err = err };
    char *data;
    size_t size;
    if (nm_file_read_json(path, &data, &size, err)) return nm_error_prefix(err, "loading tokenizer");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(data, size, &end, 0);
    if (!root) {
        size_t at = end && end >= data && end <= data + size ? (size_t)(end - data) : 0;
        nm_free(data);
        return nm_error_set(err, "%s: not valid JSON (parse error near byte %zu)", path, at);
    }
    nm_free(data);
    int rc = -1;
    const char *ver;
    if (!cJSON_IsObject(root)) { nm_error_set(err, "%s: the top level is not a JSON object", path); goto done; }
    if (get_str(&L, root, "tokenizer", "version", &ver)) goto done;
    if (ver && strcmp(ver, "1.0")) { nm_error_set(err, "%s: version: \"%s\" is unknown (expected \"1.0\")", path, ver); goto done; }
    static const char *const must_be_null[] = { "truncation", "padding" };
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, must_be_null[i]);
        if (v && !cJSON_IsNull(v)) {
            nm_error_set(err, "%s: %s: must be null (it would change what encode returns)", path, must_be_null[i]);
            goto done;
        }
    }
    if (load_model(&L, t, cJSON_GetObjectItemCaseSensitive(root, "model"))) goto done;
    if (load_added(&L, t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"))) goto done;
    if (load_normalizer(&L, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer")) goto done;
    if (load_pre_tokenizer(&L, t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"))) goto done;
    if (load_decoder(&L, cJSON_GetObjectItemCaseSensitive(root, "decoder"))) goto done;
    // post_processor only matters for add_special_tokens=True, which encode never does.
    int64_t max_id = -1;
    for (size_t e = 0; e < t->vocab.n; e++) max_id = t->vocab.e[e].val > max_id ? t->vocab.e[e].val : max_id;
    for (int k = 0; k < t->n_added; k++) max_id = t->added[k].id > max_id ? t->added[k].id : max_id;
    t->vocab_size = max_id + 1;
    // The id-indexed tables (decode, duplicate check) are vocab_size long: one stray id near
    // 2^31 would allocate gigabytes (found by tests/fuzz/fuzz_tokenizer). Real vocabularies
    // are below 2^20.
    if (max_id >= MAX_TOKEN_ID) {
        nm_error_set(err, "%s: token id %lld is too large (ids must be below %d)", path, (long long)max_id, MAX_TOKEN_ID);
        goto done;
    }
    // Two strings on one id would make decode ambiguous; HF keeps one silently, we refuse.
    {
        uint8_t *seen = nm_calloc((size_t)(t->vocab_size ? t->vocab_size : 1), 1);
        for (size_t e = 0; e < t->vocab.n; e++) {
            int64_t id = t->vocab.e[e].val;
            if (seen[id]) {
                nm_free(seen);
                nm_error_set(err, "%s: model.vocab: id %lld is used by more than one token (\"%.*s\" and another)", path,
                             (long long)id, (int)(t->vocab.e[e].len > 100 ? 100 : t->vocab.e[e].len),
                             nm_strmap_key(&t->vocab, (int64_t)e));
                goto done;
            }
            seen[id] = 1;
        }
        nm_free(seen);
    }
    build_decode_table(t);
    t->eod = resolve_eod(t, path);
    t->kind = KIND_BPE;
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int nm_tokenizer_load(nm_tokenizer **out, const char *path, nm_error *err) {
    NM_CHECK(out && path, "bad arguments");
    *out = NULL;
    nm_tokenizer *t = nm_calloc(1, sizeof(nm_tokenizer));
    t->eod = -1;
    if (!strcmp(path, "bytes")) {
        t->kind = KIND_BYTES;
        t->vocab_size = 257;
        t->eod = 256;
        *out = t;
        return 0;
    }
    if (load_json(t, path, err)) {
        nm_tokenizer_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

int nm_tokenizer_new_gpt2_pretok(nm_tokenizer **out, nm_error *err) {
    (void)err;
    nm_tokenizer *t = nm_calloc(1, sizeof(nm_tokenizer));
    t->kind = KIND_PRETOK;
    t->eod = -1;
    char msg[256];
    size_t at;
    t->steps[0] = (pretok_step){ .kind = STEP_BYTELEVEL, .add_prefix_space = 0,
                                 .re = re_compile(NM_GPT2_REGEX, strlen(NM_GPT2_REGEX), 0, msg, sizeof(msg), &at) };
    NM_CHECK(t->steps[0].re, "GPT-2 regex does not compile: %s", msg);
    t->n_steps = 1;
    t->added = nm_calloc(1, sizeof(added_token));
    t->added[0] = (added_token){ .id = 0, .content = nm_strdup(BYTES_EOD), .len = strlen(BYTES_EOD), .special = 1 };
    t->n_added = 1;
    trie_insert(&t->set_raw, t->added[0].content, t->added[0].len, 0);
    *out = t;
    return 0;
}
