// bpe_train.c: learning a byte-level BPE (GPT-2 style) and writing it as HF tokenizer.json.
//
// The algorithm is the classic one (Sennrich et al. 2016; HF tokenizers `BpeTrainer`):
//  1. pre-tokenize every file with the GPT-2 regex (the same code path encode uses, so training
//     and encoding see identical pre-tokens) and count distinct pre-tokens ("words");
//  2. count adjacent symbol pairs over the words, weighted by word count, keeping for every
//     pair the list of words it occurs in;
//  3. repeatedly take the most frequent pair from a lazy max-heap, merge it in only the words
//     that contain it, and update the counts of the neighbouring pairs incrementally.
// Step 3 costs time proportional to the words touched, not to the corpus, which is what makes
// 1 MB -> 4k vocab take well under a second instead of minutes.
//
// Ties between equally frequent pairs go to the smaller (left id, right id); this only has to
// be deterministic: what encode does is defined by the written merges, not by the trainer.
// Not done: min_frequency, limit_alphabet, initial_alphabet options, parallel counting.
#include <string.h>
#include <time.h>

#include "data/tokenizer.h"
#include "data/tokenizer_internal.h"
#include "core/fileio.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// --- word counting --------------------------------------------------------------------------------

static int count_piece(void *ctx, const uint8_t *p, size_t n, int32_t added_id, nm_error *err) {
    (void)err;
    if (added_id >= 0) return 0;   // "<|endoftext|>" separates documents; it is not text
    nm_strmap *words = ctx;
    int ins;
    int64_t e = nm_strmap_add(words, p, n, &ins);
    words->e[e].val++;
    return 0;
}

// --- pairs ----------------------------------------------------------------------------------------

typedef struct pair_info {
    int32_t a, b;               // token ids
    int64_t count;              // occurrences, weighted by word counts
    int32_t *words;             // words it occurs in (duplicates possible, checked on use)
    int32_t n_words, cap_words;
    uint32_t stamp;             // last merge step that queued it for a heap push
} pair_info;

typedef struct heap_entry {
    int64_t count;
    int32_t a, b;
    int32_t pair;
} heap_entry;

typedef struct trainer {
    // words
    int32_t *sym;               // all words' symbols back to back
    int64_t *w_off;             // (n_words) start in sym
    int32_t *w_len;             // (n_words) current length (shrinks as merges apply)
    int64_t *w_cnt;             // (n_words) occurrences
    uint32_t *w_stamp;          // (n_words) last merge step that rewrote it
    int64_t n_words;
    // pairs
    nm_u64map pair_idx;         // (a << 32 | b) -> index into pairs
    pair_info *pairs;
    int64_t n_pairs, cap_pairs;
    heap_entry *heap;
    int64_t n_heap, cap_heap;
    int32_t *dirty;             // pairs whose count grew in this step
    int64_t n_dirty, cap_dirty;
    uint32_t stamp;
} trainer;

static uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

// Max-heap order: higher count first, then smaller (a, b).
static int heap_above(const heap_entry *x, const heap_entry *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static void heap_push(trainer *tr, int32_t p) {
    if (tr->n_heap == tr->cap_heap) {
        tr->cap_heap = tr->cap_heap ? 2 * tr->cap_heap : 1024;
        tr->heap = nm_realloc(tr->heap, (size_t)tr->cap_heap * sizeof(heap_entry));
    }
    heap_entry e = { .count = tr->pairs[p].count, .a = tr->pairs[p].a, .b = tr->pairs[p].b, .pair = p };
    int64_t i = tr->n_heap++;
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (!heap_above(&e, &tr->heap[parent])) break;
        tr->heap[i] = tr->heap[parent];
        i = parent;
    }
    tr->heap[i] = e;
}

static heap_entry heap_pop(trainer *tr) {
    heap_entry *h = tr->heap;
    heap_entry top = h[0], last = h[--tr->n_heap];
    int64_t i = 0, n = tr->n_heap;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_above(&h[c + 1], &h[c])) c++;
        if (!heap_above(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (n) h[i] = last;
    return top;
}

static int32_t pair_get_or_add(trainer *tr, int32_t a, int32_t b) {
    int ins;
    uint64_t *v = nm_u64map_put(&tr->pair_idx, pair_key(a, b), &ins);
    if (!ins) return (int32_t)*v;
    if (tr->n_pairs == tr->cap_pairs) {
        tr->cap_pairs = tr->cap_pairs ? 2 * tr->cap_pairs : 4096;
        tr->pairs = nm_realloc(tr->pairs, (size_t)tr->cap_pairs * sizeof(pair_info));
    }
    NM_CHECK(tr->n_pairs < INT32_MAX, "too many pairs");
    tr->pairs[tr->n_pairs] = (pair_info){ .a = a, .b = b };
    *v = (uint64_t)tr->n_pairs;
    return (int32_t)tr->n_pairs++;
}

static void pair_add_word(pair_info *p, int32_t w) {
    if (p->n_words && p->words[p->n_words - 1] == w) return;
    if (p->n_words == p->cap_words) {
        p->cap_words = p->cap_words ? 2 * p->cap_words : 4;
        p->words = nm_realloc(p->words, (size_t)p->cap_words * sizeof(int32_t));
    }
    p->words[p->n_words++] = w;
}

// Applies a count change to pair (a, b) caused by word w.
static void pair_delta(trainer *tr, int32_t a, int32_t b, int64_t d, int32_t w) {
    int32_t pi;
    if (d > 0) {
        pi = pair_get_or_add(tr, a, b);
    } else {
        const uint64_t *v = nm_u64map_get(&tr->pair_idx, pair_key(a, b));
        NM_CHECK(v, "pair (%d, %d) lost its count", a, b);
        pi = (int32_t)*v;
    }
    pair_info *p = &tr->pairs[pi];
    p->count += d;
    if (d > 0) {
        pair_add_word(p, w);
        if (p->stamp != tr->stamp) {
            p->stamp = tr->stamp;
            if (tr->n_dirty == tr->cap_dirty) {
                tr->cap_dirty = tr->cap_dirty ? 2 * tr->cap_dirty : 1024;
                tr->dirty = nm_realloc(tr->dirty, (size_t)tr->cap_dirty * sizeof(int32_t));
            }
            tr->dirty[tr->n_dirty++] = pi;
        }
    }
}

// Merges every (a, b) in every word listed for pair pi into nid, left to right without
// overlap (HF Word::merge), and updates the neighbouring pair counts.
static void apply_merge(trainer *tr, int32_t pi, int32_t nid) {
    pair_info *p = &tr->pairs[pi];
    int32_t a = p->a, b = p->b;
    int32_t *list = p->words;
    int32_t n_list = p->n_words;
    p->words = NULL;
    p->n_words = p->cap_words = 0;
    p->count = 0;
    tr->stamp++;
    tr->n_dirty = 0;
    for (int32_t k = 0; k < n_list; k++) {
        int32_t w = list[k];
        if (tr->w_stamp[w] == tr->stamp) continue;
        tr->w_stamp[w] = tr->stamp;
        int32_t *s = tr->sym + tr->w_off[w];
        int32_t len = tr->w_len[w], o = 0;
        int64_t c = tr->w_cnt[w];
        for (int32_t i = 0; i < len;) {
            if (i + 1 < len && s[i] == a && s[i + 1] == b) {
                // The pair itself is dropped wholesale (count = 0 above), so only its
                // neighbours change: (prev, a) -> (prev, new) and (b, next) -> (new, next).
                if (o > 0) {
                    if (pair_key(s[o - 1], a) != pair_key(a, b)) pair_delta(tr, s[o - 1], a, -c, w);
                    pair_delta(tr, s[o - 1], nid, c, w);
                }
                if (i + 2 < len) {
                    if (pair_key(b, s[i + 2]) != pair_key(a, b)) pair_delta(tr, b, s[i + 2], -c, w);
                    pair_delta(tr, nid, s[i + 2], c, w);
                }
                s[o++] = nid;
                i += 2;
            } else {
                s[o++] = s[i++];
            }
        }
        tr->w_len[w] = o;
    }
    nm_free(list);
    tr->pairs[pi].count = 0;   // deltas on (a, b) itself were skipped; make sure
    for (int64_t i = 0; i < tr->n_dirty; i++) {
        if (tr->pairs[tr->dirty[i]].count > 0) heap_push(tr, tr->dirty[i]);
    }
}

static void trainer_free(trainer *tr) {
    nm_free(tr->sym);
    nm_free(tr->w_off);
    nm_free(tr->w_len);
    nm_free(tr->w_cnt);
    nm_free(tr->w_stamp);
    if (tr->pair_idx.cap) nm_u64map_free(&tr->pair_idx);
    for (int64_t i = 0; i < tr->n_pairs; i++) nm_free(tr->pairs[i].words);
    nm_free(tr->pairs);
    nm_free(tr->heap);
    nm_free(tr->dirty);
}

// --- JSON output ----------------------------------------------------------------------------------

// Writes a token's byte-level string as a JSON string literal.
static void write_token(FILE *fp, const char *raw, size_t len) {
    fputc('"', fp);
    for (size_t i = 0; i < len; i++) {
        char u[2];
        int k = nm_bytelevel_utf8((uint8_t)raw[i], u);
        if (k == 1 && (u[0] == '"' || u[0] == '\\')) fputc('\\', fp);
        fwrite(u, 1, (size_t)k, fp);   // no control chars: bytes < 0x21 map to U+0100 and up
    }
    fputc('"', fp);
}

static int write_json(const char *out_path, const nm_strmap *toks, const int32_t *merges, int64_t n_merges,
                      nm_error *err) {
    nm_atomic_file f;
    if (nm_atomic_open(&f, out_path, err)) return -1;
    FILE *fp = f.fp;
    int64_t eod = (int64_t)toks->n;
    fprintf(fp,
            "{\n"
            "  \"version\": \"1.0\",\n"
            "  \"truncation\": null,\n"
            "  \"padding\": null,\n"
            "  \"added_tokens\": [\n"
            "    {\"id\": %lld, \"content\": \"<|endoftext|>\", \"single_word\": false, \"lstrip\": false, "
            "\"rstrip\": false, \"normalized\": false, \"special\": true}\n"
            "  ],\n"
            "  \"normalizer\": null,\n"
            "  \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, "
            "\"use_regex\": true},\n"
            "  \"post_processor\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": false, "
            "\"use_regex\": true},\n"
            "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, "
            "\"use_regex\": true},\n"
            "  \"model\": {\n"
            "    \"type\": \"BPE\",\n"
            "    \"dropout\": null,\n"
            "    \"unk_token\": null,\n"
            "    \"continuing_subword_prefix\": null,\n"
            "    \"end_of_word_suffix\": null,\n"
            "    \"fuse_unk\": false,\n"
            "    \"byte_fallback\": false,\n"
            "    \"ignore_merges\": false,\n"
            "    \"vocab\": {\n",
            (long long)eod);
    for (size_t i = 0; i < toks->n; i++) {
        fputs("      ", fp);
        write_token(fp, nm_strmap_key(toks, (int64_t)i), toks->e[i].len);
        fprintf(fp, ": %zu%s\n", i, i + 1 < toks->n ? "," : "");
    }
    fputs("    },\n    \"merges\": [\n", fp);
    for (int64_t i = 0; i < n_merges; i++) {
        int32_t a = merges[2 * i], b = merges[2 * i + 1];
        fputs("      [", fp);
        write_token(fp, nm_strmap_key(toks, a), toks->e[a].len);
        fputs(", ", fp);
        write_token(fp, nm_strmap_key(toks, b), toks->e[b].len);
        fprintf(fp, "]%s\n", i + 1 < n_merges ? "," : "");
    }
    fputs("    ]\n  }\n}\n", fp);
    if (ferror(fp)) {
        nm_atomic_abort(&f);
        return nm_error_set(err, "%s: write failed", out_path);
    }
    return nm_atomic_commit(&f, err);
}

// --- training -------------------------------------------------------------------------------------

int nm_tokenizer_train_ex(const char *const *files, int n_files, int64_t vocab_size, const char *out_path,
                          nm_tokenizer_train_stats *stats, nm_error *err) {
    NM_CHECK(files && out_path, "bad arguments");
    if (n_files < 1) return nm_error_set(err, "tokenizer train: no input files");
    if (vocab_size < 257 || vocab_size > (1 << 30))
        return nm_error_set(err, "tokenizer train: vocab size %lld must be in [257, 2^30] (256 bytes + "
                            "<|endoftext|> at least)", (long long)vocab_size);
    nm_tokenizer_train_stats st = { 0 };
    double t0 = now_s();

    // 1. words
    nm_tokenizer *pt;
    if (nm_tokenizer_new_gpt2_pretok(&pt, err)) return -1;
    nm_strmap words;
    nm_strmap_init(&words, 1 << 16);
    for (int i = 0; i < n_files; i++) {
        char *data;
        size_t size;
        if (nm_file_read_all(files[i], &data, &size, err)) {
            nm_tokenizer_free(pt);
            nm_strmap_free(&words);
            return nm_error_prefix(err, "tokenizer train");
        }
        // As prepare: an empty input is a failed download or a wrong path far more often than
        // intended, and a tokenizer learnt from nothing is bytes only.
        if (size == 0) {
            nm_free(data);
            nm_tokenizer_free(pt);
            nm_strmap_free(&words);
            return nm_error_set(err, "tokenizer train: %s is empty: no text to learn merges from (remove it from --input)",
                                files[i]);
        }
        int rc = nm_tokenizer_pretokenize(pt, data, size, count_piece, &words, err);
        nm_free(data);
        st.n_bytes += (int64_t)size;
        if (rc) {
            nm_tokenizer_free(pt);
            nm_strmap_free(&words);
            return nm_error_prefix(err, "tokenizer train: %s", files[i]);
        }
    }
    nm_tokenizer_free(pt);
    st.n_words = (int64_t)words.n;
    double t1 = now_s();

    // 2. symbols and pair counts; token ids 0..255 are the bytes
    trainer tr;
    memset(&tr, 0, sizeof(tr));
    tr.n_words = (int64_t)words.n;
    size_t nw = words.n ? words.n : 1;
    tr.sym = nm_malloc((words.blob_n ? words.blob_n : 1) * sizeof(int32_t));
    tr.w_off = nm_malloc(nw * sizeof(int64_t));
    tr.w_len = nm_malloc(nw * sizeof(int32_t));
    tr.w_cnt = nm_malloc(nw * sizeof(int64_t));
    tr.w_stamp = nm_calloc(nw, sizeof(uint32_t));
    nm_u64map_init(&tr.pair_idx, 1 << 16);
    int64_t off = 0;
    for (int64_t w = 0; w < tr.n_words; w++) {
        const uint8_t *key = (const uint8_t *)nm_strmap_key(&words, w);
        uint32_t len = words.e[w].len;
        NM_CHECK(len < INT32_MAX, "pre-token of %u bytes", len);
        tr.w_off[w] = off;
        tr.w_len[w] = (int32_t)len;
        tr.w_cnt[w] = words.e[w].val;
        for (uint32_t i = 0; i < len; i++) tr.sym[off + i] = key[i];
        for (uint32_t i = 0; i + 1 < len; i++) {
            int32_t pi = pair_get_or_add(&tr, key[i], key[i + 1]);
            tr.pairs[pi].count += tr.w_cnt[w];
            pair_add_word(&tr.pairs[pi], (int32_t)w);
        }
        off += len;
    }
    nm_strmap_free(&words);
    for (int64_t i = 0; i < tr.n_pairs; i++) heap_push(&tr, (int32_t)i);

    nm_strmap toks;   // raw token bytes -> id (== entry index)
    nm_strmap_init(&toks, (size_t)vocab_size);
    for (int b = 0; b < 256; b++) {
        uint8_t byte = (uint8_t)b;
        int ins;
        nm_strmap_add(&toks, &byte, 1, &ins);
    }
    // A merge can rebuild a token that already exists ("a"+"bc" after "ab"+"c"), so there may
    // be more merges than new tokens: the list grows.
    int64_t cap_merges = vocab_size - 256;
    int32_t *merges = nm_malloc((size_t)(2 * cap_merges) * sizeof(int32_t));
    nm_u64map done;   // merges already written: a pair that reappears is merged but not re-listed
    nm_u64map_init(&done, (size_t)cap_merges);
    char *cat = NULL;
    size_t cat_cap = 0;

    // 3. merges
    while ((int64_t)toks.n < vocab_size - 1 && tr.n_heap > 0) {
        heap_entry top = heap_pop(&tr);
        pair_info *p = &tr.pairs[top.pair];
        if (p->count != top.count) {   // stale entry: requeue with the current count
            if (p->count > 0) heap_push(&tr, top.pair);
            continue;
        }
        if (p->count <= 0) continue;
        size_t la = toks.e[p->a].len, lb = toks.e[p->b].len;
        if (la + lb > cat_cap) {
            cat_cap = 2 * (la + lb);
            cat = nm_realloc(cat, cat_cap);
        }
        memcpy(cat, nm_strmap_key(&toks, p->a), la);
        memcpy(cat + la, nm_strmap_key(&toks, p->b), lb);
        int ins;
        int32_t nid = (int32_t)nm_strmap_add(&toks, cat, la + lb, &ins);
        int fresh;
        nm_u64map_put(&done, pair_key(p->a, p->b), &fresh);
        if (fresh) {
            if (st.n_merges == cap_merges) {
                cap_merges *= 2;
                merges = nm_realloc(merges, (size_t)(2 * cap_merges) * sizeof(int32_t));
            }
            merges[2 * st.n_merges] = p->a;
            merges[2 * st.n_merges + 1] = p->b;
            st.n_merges++;
        }
        apply_merge(&tr, top.pair, nid);
    }
    nm_free(cat);
    nm_u64map_free(&done);
    trainer_free(&tr);
    double t2 = now_s();

    int rc = write_json(out_path, &toks, merges, st.n_merges, err);
    st.vocab_size = (int64_t)toks.n + 1;
    nm_free(merges);
    nm_strmap_free(&toks);
    double t3 = now_s();
    st.t_count = t1 - t0;
    st.t_merge = t2 - t1;
    st.t_write = t3 - t2;
    if (stats) *stats = st;
    return rc ? nm_error_prefix(err, "tokenizer train") : 0;
}

int nm_tokenizer_train(const char *const *files, int n_files, int64_t vocab_size, const char *out_path,
                       nm_error *err) {
    return nm_tokenizer_train_ex(files, n_files, vocab_size, out_path, NULL, err);
}
