// test_tokenizer.c: byte-level BPE tokenizer (src/data/tokenizer.c, bpe_train.c).
//  - "bytes": random bytes (invalid UTF-8 included) encode to themselves and decode back;
//    out-of-range ids are refused with the id in the message;
//  - a tokenizer trained here on generated text (vocab 600): it compresses its training text,
//    and decode(encode(x)) == x for random byte strings (invalid UTF-8, long space runs,
//    digits, CJK, emoji), also when encoding from several threads at once;
//  - hand-written tokenizer.json files, where the expected ids follow from the rules alone:
//    BPE merge ranks, ignore_merges, add_prefix_space, Split behaviours, added tokens
//    (leftmost-longest, single_word, lstrip/rstrip, normalized), the HF added-token id rule;
//  - malformed files refused with a message naming the file and the field.
// HF equality on real tokenizers is tests/interop/test_tokenizer_hf.py.
// Random inputs come from a fresh seed each run (printed; NM_TEST_SEED=... reproduces one).
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "core/rng.h"
#include "data/tokenizer.h"
#include "core/fileio.h"

#include "test_util.h"

static uint64_t key;
static uint64_t ctr;
static uint64_t rnd(uint64_t n) { return nm_rng_u64(key, ctr++) % n; }

static char dir[64];

static void path_of(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/%s", dir, name); }

static void write_file(const char *path, const char *data, size_t len) {
    FILE *fp = fopen(path, "wb");
    NM_CHECK(fp, "cannot write %s", path);
    NM_CHECK(fwrite(data, 1, len, fp) == len, "short write");
    fclose(fp);
}

// --- a growable byte buffer -----------------------------------------------------------------------

typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static void buf_add(buf *b, const void *data, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->p = nm_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void buf_str(buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_utf8(buf *b, uint32_t cp) {
    char u[4];
    size_t k;
    if (cp < 0x80) { u[0] = (char)cp; k = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xC0 | (cp >> 6)); u[1] = (char)(0x80 | (cp & 0x3F)); k = 2; }
    else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12)); u[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); u[2] = (char)(0x80 | (cp & 0x3F)); k = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18)); u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); u[3] = (char)(0x80 | (cp & 0x3F)); k = 4;
    }
    buf_add(b, u, k);
}

// --- helpers --------------------------------------------------------------------------------------

static int ids_equal(const int32_t *a, int64_t na, const int32_t *b, int64_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, (size_t)na * sizeof(int32_t)) == 0);
}

static void print_ids(const char *what, const int32_t *ids, int64_t n) {
    fprintf(stderr, "  %s:", what);
    for (int64_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", ids[i]);
    fputc('\n', stderr);
}

// Encodes text and compares with want (n_want ids).
static void expect_encode(const nm_tokenizer *t, const char *text, const int32_t *want, int64_t n_want,
                          const char *what) {
    int32_t *ids;
    int64_t n;
    nm_error err;
    int rc = nm_tokenizer_encode(t, text, strlen(text), &ids, &n, &err);
    EXPECT(rc == 0, "%s: %s", what, err.msg);
    if (rc) return;
    int ok = ids_equal(ids, n, want, n_want);
    EXPECT(ok, "%s: encode(\"%s\") differs", what, text);
    if (!ok) { print_ids("got ", ids, n); print_ids("want", want, n_want); }
    nm_free(ids);
}

// ids = the bytes of s, appended to v (byte vocabularies have id == byte).
static int64_t add_bytes(int32_t *v, int64_t n, const char *s) {
    for (size_t i = 0; s[i]; i++) v[n++] = (uint8_t)s[i];
    return n;
}

// Round trip of len random bytes of a given flavour through t.
static void random_text(buf *b, size_t len) {
    b->n = 0;
    while (b->n < len) {
        switch (rnd(9)) {
        case 0: { uint8_t x = (uint8_t)rnd(256); buf_add(b, &x, 1); break; }             // any byte
        case 1: { static const uint8_t bad[] = { 0xC0, 0x80, 0xED, 0xA0, 0x80, 0xF5, 0xFF, 0xE2, 0x82 };
                  buf_add(b, bad, 1 + rnd(sizeof(bad))); break; }                          // invalid runs
        case 2: { size_t k = 1 + rnd(40); for (size_t i = 0; i < k; i++) buf_str(b, rnd(4) ? " " : "\n"); break; }
        case 3: { size_t k = 1 + rnd(12); for (size_t i = 0; i < k; i++) buf_utf8(b, '0' + (uint32_t)rnd(10)); break; }
        case 4: buf_utf8(b, 0x4E00 + (uint32_t)rnd(0x5000)); break;                        // CJK
        case 5: buf_utf8(b, 0x1F600 + (uint32_t)rnd(80)); break;                           // emoji
        case 6: buf_utf8(b, 0xA0 + (uint32_t)rnd(0x300)); break;                           // Latin-1, accents
        case 7: buf_str(b, rnd(2) ? "<|endoftext|>" : "'s"); break;
        default: { static const char *w[] = { "the", " and", " to", "ing", " qu", "'ll", ",", ".", "!?", "\t" };
                   buf_str(b, w[rnd(10)]); break; }
        }
    }
}

static void expect_round_trip(const nm_tokenizer *t, const char *data, size_t len, const char *what) {
    int32_t *ids;
    int64_t n;
    nm_error err;
    if (nm_tokenizer_encode(t, data, len, &ids, &n, &err)) {
        EXPECT(0, "%s: encode failed: %s", what, err.msg);
        return;
    }
    int64_t V = nm_tokenizer_vocab_size(t);
    for (int64_t i = 0; i < n; i++) EXPECT(ids[i] >= 0 && ids[i] < V, "%s: id %d out of range", what, ids[i]);
    char *back;
    size_t blen;
    if (nm_tokenizer_decode(t, ids, n, &back, &blen, &err)) {
        EXPECT(0, "%s: decode failed: %s", what, err.msg);
    } else {
        EXPECT(blen == len && memcmp(back, data, len) == 0, "%s: round trip of %zu bytes gave %zu bytes", what, len, blen);
        nm_free(back);
    }
    nm_free(ids);
}

// --- bytes ----------------------------------------------------------------------------------------

static void test_bytes(void) {
    nm_tokenizer *t;
    nm_error err;
    NM_CHECK(nm_tokenizer_load(&t, "bytes", &err) == 0, "%s", err.msg);
    EXPECT(nm_tokenizer_vocab_size(t) == 257, "vocab %lld", (long long)nm_tokenizer_vocab_size(t));
    EXPECT(nm_tokenizer_eod(t) == 256, "eod %d", nm_tokenizer_eod(t));
    buf b = { 0 };
    for (int it = 0; it < 50; it++) {
        random_text(&b, rnd(600));
        int32_t *ids;
        int64_t n;
        NM_CHECK(nm_tokenizer_encode(t, b.p, b.n, &ids, &n, &err) == 0, "%s", err.msg);
        EXPECT(n == (int64_t)b.n, "bytes: %lld ids for %zu bytes", (long long)n, b.n);
        for (int64_t i = 0; i < n && i < (int64_t)b.n; i++) EXPECT(ids[i] == (uint8_t)b.p[i], "bytes: id %d at %lld", ids[i], (long long)i);
        nm_free(ids);
        expect_round_trip(t, b.p, b.n, "bytes");
    }
    int32_t eod_ids[] = { 'a', 256, 'b' };
    char *text;
    size_t len;
    NM_CHECK(nm_tokenizer_decode(t, eod_ids, 3, &text, &len, &err) == 0, "%s", err.msg);
    EXPECT(len == 15 && !memcmp(text, "a<|endoftext|>b", 15), "bytes: eod decodes to '%s'", text);
    nm_free(text);
    int32_t bad[] = { 1, 2, 257 };
    EXPECT(nm_tokenizer_decode(t, bad, 3, &text, &len, &err) != 0 && strstr(err.msg, "257"), "bytes: id 257 accepted");
    int32_t neg[] = { -5 };
    EXPECT(nm_tokenizer_decode(t, neg, 1, &text, &len, &err) != 0 && strstr(err.msg, "-5"), "bytes: id -5 accepted");
    nm_free(b.p);
    nm_tokenizer_free(t);
}

// --- trained --------------------------------------------------------------------------------------

// Generated "language": words made of random syllables, with punctuation, numbers, accents,
// CJK and documents separated by <|endoftext|>.
static void gen_corpus(buf *b, size_t len) {
    static const char *syl[] = { "ka", "ro", "mi", "te", "su", "lo", "an", "ve", "qu", "is", "th", "er", "ou", "ne" };
    char *words[300];
    for (int i = 0; i < 300; i++) {
        char w[32] = "";
        int k = 1 + (int)rnd(4);
        for (int j = 0; j < k; j++) strcat(w, syl[rnd(14)]);
        words[i] = nm_strdup(w);
    }
    b->n = 0;
    while (b->n < len) {
        uint64_t r = rnd(100);
        // Zipf-like: low word indices far more common
        const char *w = words[rnd(1 + rnd(300))];
        if (r < 3) buf_str(b, ".\n");
        else if (r < 5) buf_str(b, ", ");
        else if (r < 6) { char num[16]; snprintf(num, sizeof(num), " %d", (int)rnd(100000)); buf_str(b, num); }
        else if (r < 7) { buf_str(b, " "); buf_utf8(b, 0x4E00 + (uint32_t)rnd(40)); buf_utf8(b, 0x4E00 + (uint32_t)rnd(40)); }
        else if (r < 8) { buf_str(b, " caf"); buf_utf8(b, 0xE9); }
        else if (r < 9) buf_str(b, "\n<|endoftext|>");
        else { buf_str(b, " "); buf_str(b, w); }
    }
    for (int i = 0; i < 300; i++) nm_free(words[i]);
}

typedef struct sample {
    char *text;
    size_t len;
    int32_t *ids;
    int64_t n;
} sample;

static void test_trained(void) {
    char corpus1[128], corpus2[128], out[128];
    path_of(corpus1, sizeof(corpus1), "corpus1.txt");
    path_of(corpus2, sizeof(corpus2), "corpus2.txt");
    path_of(out, sizeof(out), "trained.json");
    buf b = { 0 };
    gen_corpus(&b, 150000);
    write_file(corpus1, b.p, b.n / 2);
    write_file(corpus2, b.p + b.n / 2, b.n - b.n / 2);
    const char *files[] = { corpus1, corpus2 };
    nm_error err;
    nm_tokenizer_train_stats st;
    NM_CHECK(nm_tokenizer_train_ex(files, 2, 600, out, &st, &err) == 0, "%s", err.msg);
    printf("  trained 600 on %lld bytes: %lld words, %lld merges, %.3f s\n", (long long)st.n_bytes, (long long)st.n_words,
           (long long)st.n_merges, st.t_count + st.t_merge + st.t_write);
    EXPECT(st.vocab_size == 600, "trained vocab %lld", (long long)st.vocab_size);
    char tmp_left[160];
    snprintf(tmp_left, sizeof(tmp_left), "%s.tmp.%ld", out, (long)getpid());
    EXPECT(access(tmp_left, F_OK) != 0, "temporary file left behind");

    nm_tokenizer *t;
    NM_CHECK(nm_tokenizer_load(&t, out, &err) == 0, "%s", err.msg);
    EXPECT(nm_tokenizer_vocab_size(t) == 600, "vocab %lld", (long long)nm_tokenizer_vocab_size(t));
    EXPECT(nm_tokenizer_eod(t) == 599, "eod %d", nm_tokenizer_eod(t));

    // It learned something: the training text compresses well below one token per byte, and
    // "<|endoftext|>" comes out as the eod id, never as pieces.
    int32_t *ids;
    int64_t n;
    NM_CHECK(nm_tokenizer_encode(t, b.p, b.n, &ids, &n, &err) == 0, "%s", err.msg);
    EXPECT((double)b.n / (double)n > 2.5, "trained: only %.2f bytes per token", (double)b.n / (double)n);
    int64_t n_eod = 0, want_eod = 0;
    for (int64_t i = 0; i < n; i++) n_eod += ids[i] == 599;
    for (const char *p = b.p; (p = strstr(p, "<|endoftext|>")); p++) want_eod++;
    EXPECT(n_eod == want_eod, "trained: %lld eod ids for %lld separators", (long long)n_eod, (long long)want_eod);
    nm_free(ids);
    expect_round_trip(t, b.p, b.n, "trained corpus");

    // Arbitrary bytes round-trip exactly.
    enum { N = 300 };
    sample s[N];
    for (int i = 0; i < N; i++) {
        random_text(&b, rnd(i < 10 ? 5000 : 400));
        s[i].text = nm_malloc(b.n + 1);
        memcpy(s[i].text, b.p ? b.p : "", b.n);
        s[i].len = b.n;
        expect_round_trip(t, s[i].text, s[i].len, "trained random");
        NM_CHECK(nm_tokenizer_encode(t, s[i].text, s[i].len, &s[i].ids, &s[i].n, &err) == 0, "%s", err.msg);
    }
    expect_round_trip(t, "", 0, "empty text");
    // A 200 kB run of spaces and one of digits (long regex matches, long BPE words).
    size_t big = 200000;
    char *run = nm_malloc(big);
    memset(run, ' ', big);
    expect_round_trip(t, run, big, "space run");
    for (size_t i = 0; i < big; i++) run[i] = (char)('0' + rnd(10));
    expect_round_trip(t, run, big, "digit run");
    nm_free(run);

    // Concurrent encodes on one tokenizer give what serial ones gave.
    int mismatches = 0;
#pragma omp parallel for num_threads(4) schedule(dynamic) reduction(+ : mismatches)
    for (int i = 0; i < N; i++) {
        int32_t *pids;
        int64_t pn;
        nm_error perr;
        if (nm_tokenizer_encode(t, s[i].text, s[i].len, &pids, &pn, &perr) != 0 || !ids_equal(pids, pn, s[i].ids, s[i].n))
            mismatches++;
        else nm_free(pids);
    }
    EXPECT(mismatches == 0, "%d concurrent encodes differ from serial ones", mismatches);
    for (int i = 0; i < N; i++) { nm_free(s[i].text); nm_free(s[i].ids); }

    int32_t bad[] = { 5, 600 };
    char *text;
    size_t len;
    EXPECT(nm_tokenizer_decode(t, bad, 2, &text, &len, &err) != 0 && strstr(err.msg, "600"), "id 600 accepted");
    nm_tokenizer_free(t);

    char bad_out[128];
    path_of(bad_out, sizeof(bad_out), "never.json");
    EXPECT(nm_tokenizer_train(files, 2, 100, bad_out, &err) != 0 && strstr(err.msg, "100"), "vocab 100 accepted");
    const char *missing[] = { "no_such_file.txt" };
    EXPECT(nm_tokenizer_train(missing, 1, 600, bad_out, &err) != 0 && strstr(err.msg, "no_such_file.txt"),
           "missing input accepted: %s", err.msg);
    EXPECT(access(bad_out, F_OK) != 0, "failed training left %s", bad_out);
    nm_free(b.p);
}

// --- hand-written tokenizer.json ------------------------------------------------------------------

// GPT-2 bytes_to_unicode, written out independently of the library's table.
static uint32_t b2u(int b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return (uint32_t)b;
    int n = 0;
    for (int x = 0; x < b; x++) {
        if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) n++;
    }
    return 256u + (uint32_t)n;
}

// Appends the JSON string of raw bytes s in the byte-level alphabet.
static void json_bl(buf *b, const char *s) {
    buf_str(b, "\"");
    for (size_t i = 0; s[i]; i++) {
        uint32_t cp = b2u((uint8_t)s[i]);
        if (cp == '"' || cp == '\\') buf_str(b, "\\");
        buf_utf8(b, cp);
    }
    buf_str(b, "\"");
}

// A tokenizer.json: vocab = the 256 bytes (id = byte) then `extra` (raw strings, ids 256...),
// merges = pairs of raw strings, plus the given JSON fragments verbatim.
typedef struct spec {
    const char *extra[8];
    const char *merges[8][2];
    const char *added;          // JSON array text
    const char *pre;            // pre_tokenizer JSON
    const char *model_extra;    // ", \"ignore_merges\": true" etc.
    const char *normalizer;
    const char *decoder;
} spec;

static char *make_json(const spec *sp) {
    buf b = { 0 };
    buf_str(&b, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": ");
    buf_str(&b, sp->added ? sp->added : "[]");
    buf_str(&b, ", \"normalizer\": ");
    buf_str(&b, sp->normalizer ? sp->normalizer : "null");
    buf_str(&b, ", \"pre_tokenizer\": ");
    buf_str(&b, sp->pre ? sp->pre : "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}");
    buf_str(&b, ", \"post_processor\": null, \"decoder\": ");
    buf_str(&b, sp->decoder ? sp->decoder : "{\"type\": \"ByteLevel\"}");
    buf_str(&b, ", \"model\": {\"type\": \"BPE\", \"unk_token\": null");
    if (sp->model_extra) buf_str(&b, sp->model_extra);
    buf_str(&b, ", \"vocab\": {");
    char one[2] = { 0, 0 }, num[32];
    for (int i = 0; i < 256; i++) {
        one[0] = (char)i;
        if (i == 0) {   // NUL cannot sit in a C string; its byte-level char is U+0100
            buf_str(&b, "\"\xc4\x80\"");
        } else {
            json_bl(&b, one);
        }
        snprintf(num, sizeof(num), ": %d, ", i);
        buf_str(&b, num);
    }
    int id = 256;
    for (int i = 0; i < 8 && sp->extra[i]; i++) {
        json_bl(&b, sp->extra[i]);
        snprintf(num, sizeof(num), ": %d, ", id++);
        buf_str(&b, num);
    }
    b.n -= 2;   // drop the last ", "
    buf_str(&b, "}, \"merges\": [");
    for (int i = 0; i < 8 && sp->merges[i][0]; i++) {
        buf_str(&b, i ? ", [" : "[");
        json_bl(&b, sp->merges[i][0]);
        buf_str(&b, ", ");
        json_bl(&b, sp->merges[i][1]);
        buf_str(&b, "]");
    }
    buf_str(&b, "]}}");
    return b.p;
}

static nm_tokenizer *load_spec(const spec *sp, const char *name) {
    char path[128];
    path_of(path, sizeof(path), name);
    char *json = make_json(sp);
    write_file(path, json, strlen(json));
    nm_free(json);
    nm_tokenizer *t;
    nm_error err;
    if (nm_tokenizer_load(&t, path, &err)) {
        EXPECT(0, "%s: %s", name, err.msg);
        return NULL;
    }
    return t;
}

static void test_bpe_rules(void) {
    int32_t w[64];
    // Merge ranks decide: "ab" (rank 0) before "bc" (rank 1), and the other way round.
    spec s1 = { .extra = { "ab", "bc" }, .merges = { { "a", "b" }, { "b", "c" } } };
    nm_tokenizer *t = load_spec(&s1, "rank1.json");
    if (t) {
        w[0] = 256; w[1] = 'c';
        expect_encode(t, "abc", w, 2, "rank ab first");
        w[0] = 256; w[1] = 256;
        expect_encode(t, "abab", w, 2, "rank abab");
        EXPECT(nm_tokenizer_vocab_size(t) == 258 && nm_tokenizer_eod(t) == -1, "rank1 vocab/eod");
        nm_tokenizer_free(t);
    }
    spec s2 = { .extra = { "ab", "bc" }, .merges = { { "b", "c" }, { "a", "b" } } };
    if ((t = load_spec(&s2, "rank2.json"))) {
        w[0] = 'a'; w[1] = 257;
        expect_encode(t, "abc", w, 2, "rank bc first");
        nm_tokenizer_free(t);
    }
    // Chains, and ties broken leftmost: "aaa" with only a+a gives [aa, a].
    spec s3 = { .extra = { "aa", "aaaa" }, .merges = { { "a", "a" }, { "aa", "aa" } } };
    if ((t = load_spec(&s3, "chain.json"))) {
        w[0] = 256; w[1] = 'a';
        expect_encode(t, "aaa", w, 2, "leftmost tie");
        w[0] = 257; w[1] = 256; w[2] = 'a';
        expect_encode(t, "aaaaaaa", w, 3, "chain");
        nm_tokenizer_free(t);
    }
    // ignore_merges: a pre-token that is a vocab entry is taken whole.
    spec s4 = { .extra = { "ab", "abc" }, .merges = { { "a", "b" } }, .model_extra = ", \"ignore_merges\": true" };
    if ((t = load_spec(&s4, "ignore.json"))) {
        w[0] = 257;
        expect_encode(t, "abc", w, 1, "ignore_merges");
        nm_tokenizer_free(t);
    }
    s4.model_extra = ", \"ignore_merges\": false";
    if ((t = load_spec(&s4, "noignore.json"))) {
        w[0] = 256; w[1] = 'c';
        expect_encode(t, "abc", w, 2, "ignore_merges false");
        nm_tokenizer_free(t);
    }
    // The GPT-2 regex keeps " b" apart from "a": merge (a, space) never applies across it.
    spec s5 = { .extra = { "a ", " b" }, .merges = { { "a", " " }, { " ", "b" } } };
    if ((t = load_spec(&s5, "gpt2.json"))) {
        w[0] = 'a'; w[1] = 257;
        expect_encode(t, "a b", w, 2, "gpt2 split");
        w[0] = 'a'; w[1] = ' '; w[2] = 257;
        expect_encode(t, "a  b", w, 3, "gpt2 space run keeps the last space for the word");
        nm_tokenizer_free(t);
    }
    // add_prefix_space prepends a space to the text (and to each piece between added tokens).
    s5.pre = "{\"type\": \"ByteLevel\", \"add_prefix_space\": true}";
    s5.added = "[{\"id\": 258, \"content\": \"<s>\", \"special\": true}]";
    if ((t = load_spec(&s5, "prefix.json"))) {
        w[0] = 257; w[1] = 258; w[2] = 257;
        expect_encode(t, "b<s>b", w, 3, "add_prefix_space");
        nm_tokenizer_free(t);
    }
    // Split behaviours on pattern " " (no regex in ByteLevel).
    static const struct { const char *beh; int invert; int32_t want[4]; int n; } cases[] = {
        { "Removed", 0, { 'a', 'b' }, 2 },
        { "Isolated", 0, { 'a', ' ', 'b' }, 3 },
        { "MergedWithPrevious", 0, { 256, 'b' }, 2 },
        { "MergedWithNext", 0, { 'a', 257 }, 2 },
        { "Removed", 1, { ' ' }, 1 },
    };
    for (int i = 0; i < 5; i++) {
        char pre[512];
        snprintf(pre, sizeof(pre),
                 "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"String\": \" \"}, "
                 "\"behavior\": \"%s\", \"invert\": %s}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
                 "\"use_regex\": false}]}", cases[i].beh, cases[i].invert ? "true" : "false");
        spec s6 = { .extra = { "a ", " b" }, .merges = { { "a", " " }, { " ", "b" } }, .pre = pre,
                    .normalizer = "{\"type\": \"Sequence\", \"normalizers\": []}" };
        if ((t = load_spec(&s6, "split.json"))) {
            expect_encode(t, "a b", cases[i].want, cases[i].n, cases[i].beh);
            nm_tokenizer_free(t);
        }
    }
    // Without the split, use_regex false leaves "a b" whole: the rank-0 merge (a, space) wins.
    spec s7 = { .extra = { "a ", " b" }, .merges = { { "a", " " }, { " ", "b" } },
                .pre = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false}" };
    if ((t = load_spec(&s7, "noregex.json"))) {
        w[0] = 256; w[1] = 'b';
        expect_encode(t, "a b", w, 2, "no regex");
        nm_tokenizer_free(t);
    }
}

static void test_added_tokens(void) {
    spec sp = {
        .added = "["
                 "{\"id\": 256, \"content\": \"<|endoftext|>\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true},"
                 "{\"id\": 257, \"content\": \"<|end|>\", \"special\": true, \"normalized\": false},"
                 "{\"id\": 258, \"content\": \"<mask>\", \"single_word\": true, \"special\": true, \"normalized\": false},"
                 "{\"id\": 259, \"content\": \"[X]\", \"lstrip\": true, \"rstrip\": true, \"special\": true, \"normalized\": false},"
                 "{\"id\": 260, \"content\": \"tag\", \"special\": false, \"normalized\": true},"
                 "{\"id\": 261, \"content\": \"\xc3\xa9t\xc3\xa9\", \"special\": false}"
                 "]",
    };
    nm_tokenizer *t = load_spec(&sp, "added.json");
    if (!t) return;
    EXPECT(nm_tokenizer_vocab_size(t) == 262, "vocab %lld", (long long)nm_tokenizer_vocab_size(t));
    EXPECT(nm_tokenizer_eod(t) == 256, "eod %d", nm_tokenizer_eod(t));
    int32_t w[128];
    int64_t n;
    // leftmost-longest: "<|endoftext|>" beats "<|end|>" where both could match
    n = add_bytes(w, 0, "a"); w[n++] = 256; n = add_bytes(w, n, "b"); w[n++] = 257; n = add_bytes(w, n, "c");
    expect_encode(t, "a<|endoftext|>b<|end|>c", w, n, "longest match");
    // single_word (HF's own test case): only free-standing <mask> matches
    n = 0; w[n++] = 258; n = add_bytes(w, n, " My name "); w[n++] = 258;
    n = add_bytes(w, n, " A<mask> <mask>ony "); w[n++] = 258;
    expect_encode(t, "<mask> My name <mask> A<mask> <mask>ony <mask>", w, n, "single_word");
    // lstrip/rstrip swallow the whitespace around the token
    n = add_bytes(w, 0, "Hi"); w[n++] = 259; n = add_bytes(w, n, "there"); w[n++] = 259;
    expect_encode(t, "Hi  [X]\tthere\n[X] ", w, n, "lstrip/rstrip");
    // normalized tokens match too (the normalizer is the identity), also inside words
    n = add_bytes(w, 0, "a "); w[n++] = 260; n = add_bytes(w, n, "s "); w[n++] = 261; w[n++] = 261;
    expect_encode(t, "a tags \xc3\xa9t\xc3\xa9\xc3\xa9t\xc3\xa9", w, n, "normalized");
    // decode gives the contents back, through the ByteLevel char map like HF: "été" is made of
    // chars of the byte alphabet, so it decodes to the bytes E9 74 E9 (HF then shows U+FFFD).
    int32_t d[] = { 'x', 259, 256, 261 };
    char *text;
    size_t len;
    nm_error err;
    NM_CHECK(nm_tokenizer_decode(t, d, 4, &text, &len, &err) == 0, "%s", err.msg);
    EXPECT(len == strlen("x[X]<|endoftext|>\xe9t\xe9") && !memcmp(text, "x[X]<|endoftext|>\xe9t\xe9", len),
           "decode added: '%s'", text);
    nm_free(text);
    nm_tokenizer_free(t);

    // DeepSeek-V3's end-of-sentence token is found by name when there is no <|endoftext|>.
    spec ds = { .added = "[{\"id\": 256, \"content\": \"<\uff5cbegin\u2581of\u2581sentence\uff5c>\", \"special\": true},"
                         " {\"id\": 257, \"content\": \"<\uff5cend\u2581of\u2581sentence\uff5c>\", \"special\": true}]" };
    if ((t = load_spec(&ds, "dsv3_eod.json"))) {
        EXPECT(nm_tokenizer_eod(t) == 257, "DeepSeek eod: %d", nm_tokenizer_eod(t));
        int32_t want[] = { 256, 'h', 'i', 257 };
        expect_encode(t, "<\uff5cbegin\u2581of\u2581sentence\uff5c>hi<\uff5cend\u2581of\u2581sentence\uff5c>", want, 4,
                      "DeepSeek specials");
        nm_tokenizer_free(t);
    }

    // The eod of an adjacent tokenizer_config.json wins over the name rule.
    char cfg[128];
    path_of(cfg, sizeof(cfg), "tokenizer_config.json");
    const char *cj = "{\"eos_token\": {\"content\": \"<|end|>\", \"special\": true}}";
    write_file(cfg, cj, strlen(cj));
    if ((t = load_spec(&sp, "added.json"))) {
        EXPECT(nm_tokenizer_eod(t) == 257, "eod from tokenizer_config.json: %d", nm_tokenizer_eod(t));
        nm_tokenizer_free(t);
    }
    remove(cfg);
}

// --- malformed files ------------------------------------------------------------------------------

static void expect_refused(const char *name, const char *json, const char *needle) {
    char path[128];
    path_of(path, sizeof(path), name);
    write_file(path, json, strlen(json));
    nm_tokenizer *t = NULL;
    nm_error err = { { 0 } };
    int rc = nm_tokenizer_load(&t, path, &err);
    EXPECT(rc != 0 && t == NULL, "%s: accepted", name);
    if (rc != 0) {
        EXPECT(strstr(err.msg, path) != NULL, "%s: message does not name the file: %s", name, err.msg);
        EXPECT(strstr(err.msg, needle) != NULL, "%s: message lacks '%s': %s", name, needle, err.msg);
    }
    nm_tokenizer_free(t);
}

static void test_malformed(void) {
    expect_refused("badjson.json", "{\"model\": {\"type\": \"BPE\", ", "not valid JSON");
    expect_refused("array.json", "[1, 2]", "not a JSON object");
    expect_refused("nomodel.json", "{\"version\": \"1.0\", \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "\"model\"");
    expect_refused("wordpiece.json", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", "WordPiece");

    spec sp = { .extra = { "ab" }, .merges = { { "a", "zz" } } };
    char *j = make_json(&sp);
    expect_refused("badmerge.json", j, "merges[0]");
    expect_refused("badmerge2.json", j, "zz");
    nm_free(j);

    static const struct { const char *name; spec sp; const char *needle; } cases[] = {
        { "pre_ws.json", { .pre = "{\"type\": \"Whitespace\"}" }, "Whitespace" },
        { "pre_noblevel.json", { .pre = "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
                                        "{\"Regex\": \"a\"}, \"behavior\": \"Isolated\"}]}" }, "ByteLevel" },
        { "pre_badre.json", { .pre = "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
                                     "{\"Regex\": \"(a\"}, \"behavior\": \"Isolated\"}, {\"type\": \"ByteLevel\"}]}" }, "pattern" },
        { "pre_badbeh.json", { .pre = "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
                                      "{\"Regex\": \"a\"}, \"behavior\": \"Sideways\"}, {\"type\": \"ByteLevel\"}]}" }, "Sideways" },
        { "norm.json", { .normalizer = "{\"type\": \"Lowercase\"}" }, "Lowercase" },
        { "dec.json", { .decoder = "{\"type\": \"WordPiece\"}" }, "decoder" },
        { "dropout.json", { .model_extra = ", \"dropout\": 0.1" }, "dropout" },
        { "fallback.json", { .model_extra = ", \"byte_fallback\": true" }, "byte_fallback" },
        { "badid.json", { .added = "[{\"id\": 300, \"content\": \"<x>\", \"special\": true}]" }, "added_tokens[0]" },
        { "badflag.json", { .added = "[{\"id\": 256, \"content\": \"<x>\", \"special\": \"yes\"}]" }, "special" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        j = make_json(&cases[i].sp);
        expect_refused(cases[i].name, j, cases[i].needle);
        nm_free(j);
    }
    // One stray id near 2^31 made the loader allocate 16 GiB of id tables (found by fuzz_tokenizer).
    expect_refused("hugeid.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 2147483000}, \"merges\": []}, "
                   "\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"decoder\": {\"type\": \"ByteLevel\"}}",
                   "token id 2147483000 is too large");
    nm_tokenizer *t = NULL;
    nm_error err;
    EXPECT(nm_tokenizer_load(&t, "no_such_tokenizer.json", &err) != 0 && strstr(err.msg, "no_such_tokenizer.json"),
           "missing file accepted");
}

int main(void) {
    uint64_t seed = test_seed("test_tokenizer");
    key = nm_rng_key(seed, NM_RNG_TEST, 7, 0);
    snprintf(dir, sizeof(dir), "test_tokenizer_XXXXXX");
    NM_CHECK(mkdtemp(dir), "mkdtemp");
    test_bytes();
    test_trained();
    test_bpe_rules();
    test_added_tokens();
    test_malformed();
    test_remove_tree(dir);
    if (failures) {
        fprintf(stderr, "test_tokenizer: %d failures (seed %llu)\n", failures, (unsigned long long)seed);
        return 1;
    }
    printf("test_tokenizer: ok\n");
    return 0;
}
