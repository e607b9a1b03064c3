// test_indexed.c: Megatron .bin/.idx reader and writer (src/data/indexed.c).
//  - the worked example of formats.md 1.5, byte for byte;
//  - round trip of random documents (empty ones, multi-sentence ones) in uint16 and int32;
//  - every readable dtype code through an in-memory index;
//  - every corrupt-input case refused with a message naming the field;
//  - random byte mutations never crash the parser, and what it accepts reads in bounds;
//  - the writer is atomic: nothing under the final names before finalize, nothing left on abort.
// Random inputs come from a fresh seed each run (printed; NM_TEST_SEED=... reproduces one).
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "core/rng.h"
#include "data/indexed.h"
#include "core/fileio.h"

#include "test_util.h"

static uint64_t key;
static uint64_t ctr;
static uint64_t rnd(uint64_t n) { return nm_rng_u64(key, ctr++) % n; }

static char dir[64];

static void path_of(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/%s", dir, name); }

// --- worked example (formats.md 1.5) -------------------------------------------------------------

static void test_worked_example(void) {
    static const uint8_t want_idx[82] = {
        0x4d, 0x4d, 0x49, 0x44, 0x49, 0x44, 0x58, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00};
    char prefix[128], p[160];
    path_of(prefix, sizeof(prefix), "worked");
    nm_error err;
    nm_indexed_writer *w;
    NM_CHECK(nm_indexed_writer_create(&w, prefix, NM_IDX_INT32, &err) == 0, "%s", err.msg);
    int32_t d0[] = {10, 11, 12, 1}, d1[] = {20, 21, 1};
    NM_CHECK(nm_indexed_writer_add_document(w, d0, 4, &err) == 0, "%s", err.msg);
    NM_CHECK(nm_indexed_writer_add_document(w, d1, 3, &err) == 0, "%s", err.msg);
    NM_CHECK(nm_indexed_writer_finalize(w, &err) == 0, "%s", err.msg);
    nm_indexed_writer_destroy(w);
    char *data;
    size_t size;
    snprintf(p, sizeof(p), "%s.idx", prefix);
    NM_CHECK(nm_file_read_all(p, &data, &size, &err) == 0, "%s", err.msg);
    EXPECT(size == 82 && memcmp(data, want_idx, 82) == 0, "worked example .idx differs (%zu bytes)", size);
    nm_free(data);
    snprintf(p, sizeof(p), "%s.bin", prefix);
    NM_CHECK(nm_file_read_all(p, &data, &size, &err) == 0, "%s", err.msg);
    int32_t want_bin[7] = {10, 11, 12, 1, 20, 21, 1};
    EXPECT(size == 28 && memcmp(data, want_bin, 28) == 0, "worked example .bin differs (%zu bytes)", size);
    nm_free(data);
}

// --- round trip --------------------------------------------------------------------------------

static void test_round_trip(int dtype) {
    char prefix[128];
    path_of(prefix, sizeof(prefix), dtype == NM_IDX_UINT16 ? "rt16" : "rt32");
    int n_docs = 50 + (int)rnd(150);
    // Reference: per document a list of sentences.
    int *n_sent = calloc((size_t)n_docs, sizeof(int));
    int32_t **toks = NULL;
    int *lens = NULL, n_seqs = 0;
    nm_error err;
    nm_indexed_writer *w;
    NM_CHECK(nm_indexed_writer_create(&w, prefix, dtype, &err) == 0, "%s", err.msg);
    for (int d = 0; d < n_docs; d++) {
        int kind = (int)rnd(10);   // 1 in 10 empty, 2 in 10 multi-sentence
        n_sent[d] = kind == 0 ? 0 : kind <= 2 ? 1 + (int)rnd(4) : 1;
        for (int s = 0; s < n_sent[d]; s++) {
            int len = (int)rnd(300);
            toks = realloc(toks, sizeof(*toks) * (size_t)(n_seqs + 1));
            lens = realloc(lens, sizeof(*lens) * (size_t)(n_seqs + 1));
            toks[n_seqs] = malloc(sizeof(int32_t) * (size_t)(len + 1));
            lens[n_seqs] = len;
            for (int k = 0; k < len; k++) {
                toks[n_seqs][k] = dtype == NM_IDX_UINT16 ? (int32_t)rnd(65536) : (int32_t)(uint32_t)nm_rng_u64(key, ctr++);
            }
            if (n_sent[d] == 1 && kind > 2) {
                NM_CHECK(nm_indexed_writer_add_document(w, toks[n_seqs], len, &err) == 0, "%s", err.msg);
            } else {
                NM_CHECK(nm_indexed_writer_add_item(w, toks[n_seqs], len, &err) == 0, "%s", err.msg);
            }
            n_seqs++;
        }
        if (!(n_sent[d] == 1 && kind > 2)) NM_CHECK(nm_indexed_writer_end_document(w, &err) == 0, "%s", err.msg);
    }
    if (dtype == NM_IDX_UINT16) {
        int32_t bad = 70000;
        EXPECT(nm_indexed_writer_add_item(w, &bad, 1, &err) != 0 && strstr(err.msg, "70000"), "uint16 accepted 70000");
        // The failed item wrote nothing it counts; the writer is still consistent enough to abort.
        nm_indexed_writer_destroy(w);
        NM_CHECK(nm_indexed_writer_create(&w, prefix, dtype, &err) == 0, "%s", err.msg);
        int s = 0;
        for (int d = 0; d < n_docs; d++) {
            for (int k = 0; k < n_sent[d]; k++, s++) NM_CHECK(nm_indexed_writer_add_item(w, toks[s], lens[s], &err) == 0, "%s", err.msg);
            NM_CHECK(nm_indexed_writer_end_document(w, &err) == 0, "%s", err.msg);
        }
    }
    NM_CHECK(nm_indexed_writer_finalize(w, &err) == 0, "%s", err.msg);
    nm_indexed_writer_destroy(w);

    nm_indexed *ds;
    NM_CHECK(nm_indexed_open(&ds, prefix, &err) == 0, "%s", err.msg);
    EXPECT(ds->dtype == dtype && ds->n_seqs == n_seqs && ds->n_docs == n_docs, "counts %lld %lld", (long long)ds->n_seqs,
           (long long)ds->n_docs);
    int s = 0;
    int32_t buf[400];
    for (int d = 0; d < n_docs; d++) {
        EXPECT(nm_indexed_doc_index(ds, d) == s, "doc %d starts at %lld, want %d", d, (long long)nm_indexed_doc_index(ds, d), s);
        for (int k = 0; k < n_sent[d]; k++, s++) {
            EXPECT(nm_indexed_seq_len(ds, s) == lens[s], "seq %d len", s);
            NM_CHECK(nm_indexed_read(ds, s, 0, lens[s], buf, &err) == 0, "%s", err.msg);
            EXPECT(memcmp(buf, toks[s], sizeof(int32_t) * (size_t)lens[s]) == 0, "seq %d tokens differ", s);
            if (lens[s] > 2) {   // partial read, Megatron's get(idx, offset, length)
                NM_CHECK(nm_indexed_read(ds, s, 1, lens[s] - 2, buf, &err) == 0, "%s", err.msg);
                EXPECT(memcmp(buf, toks[s] + 1, sizeof(int32_t) * (size_t)(lens[s] - 2)) == 0, "seq %d partial read", s);
            }
        }
    }
    EXPECT(nm_indexed_doc_index(ds, n_docs) == n_seqs, "last doc index");
    nm_indexed_close(ds);
    for (int i = 0; i < n_seqs; i++) free(toks[i]);
    free(toks);
    free(lens);
    free(n_sent);
}

// --- all dtype codes -----------------------------------------------------------------------------

static void test_dtypes(void) {
    int codes[] = {NM_IDX_UINT8, NM_IDX_INT8, NM_IDX_INT16, NM_IDX_INT32, NM_IDX_INT64, NM_IDX_UINT16};
    int64_t vals[] = {0, 1, 127, -128, -1, 255, 32767, -32768, 65535, 2147483647, -2147483647 - 1};
    for (size_t c = 0; c < sizeof(codes) / sizeof(codes[0]); c++) {
        int code = codes[c], isz = nm_indexed_itemsize(code);
        int64_t keep[16];
        int n = 0;
        for (size_t v = 0; v < sizeof(vals) / sizeof(vals[0]); v++) {
            int64_t x = vals[v];
            int ok = code == NM_IDX_UINT8 ? x >= 0 && x <= 255 : code == NM_IDX_INT8 ? x >= -128 && x <= 127
                   : code == NM_IDX_INT16 ? x >= -32768 && x <= 32767 : code == NM_IDX_UINT16 ? x >= 0 && x <= 65535 : 1;
            if (ok) keep[n++] = x;
        }
        uint8_t *bin = nm_malloc((size_t)(n * isz));
        for (int k = 0; k < n; k++) memcpy(bin + k * isz, &keep[k], (size_t)isz);   // little-endian truncation
        int32_t len = n;
        int64_t docs[2] = {0, 1};
        uint8_t *idx;
        size_t idx_size;
        nm_indexed_build_idx(code, &len, 1, docs, 2, &idx, &idx_size);
        nm_indexed *ds;
        nm_error err;
        NM_CHECK(nm_indexed_open_memory(&ds, "dtype", idx, idx_size, bin, (size_t)(n * isz), 1, &err) == 0, "%s", err.msg);
        int32_t out[16];
        NM_CHECK(nm_indexed_read(ds, 0, 0, n, out, &err) == 0, "%s", err.msg);
        for (int k = 0; k < n; k++) EXPECT(out[k] == keep[k], "code %d value %lld read as %d", code, (long long)keep[k], out[k]);
        nm_indexed_close(ds);
    }
    // int64 tokens outside int32 are a read error, not a silent wrap.
    int64_t big = (int64_t)1 << 40;
    int32_t len = 1;
    int64_t docs[2] = {0, 1};
    uint8_t *idx;
    size_t idx_size;
    nm_indexed_build_idx(NM_IDX_INT64, &len, 1, docs, 2, &idx, &idx_size);
    nm_indexed *ds;
    nm_error err;
    NM_CHECK(nm_indexed_open_memory(&ds, "big", idx, idx_size, &big, 8, 0, &err) == 0, "%s", err.msg);
    int32_t out;
    EXPECT(nm_indexed_read(ds, 0, 0, 1, &out, &err) != 0 && strstr(err.msg, "outside int32"), "int64 2^40 read as %d", out);
    nm_indexed_close(ds);
    nm_free(idx);   // borrowed (own = 0): still ours after close
}

// --- corrupt inputs ----------------------------------------------------------------------------

// A valid 3-document int32 pair in memory: lengths {3, 0, 2} (one empty sequence).
typedef struct pair { uint8_t *idx; size_t idx_size; uint8_t *bin; size_t bin_size; } pair;

static pair make_pair(void) {
    int32_t lens[3] = {3, 0, 2};
    int64_t docs[4] = {0, 1, 2, 3};
    pair p;
    nm_indexed_build_idx(NM_IDX_INT32, lens, 3, docs, 4, &p.idx, &p.idx_size);
    p.bin_size = 5 * 4;
    p.bin = nm_malloc(p.bin_size);
    for (int k = 0; k < 5; k++) memcpy(p.bin + 4 * k, &k, 4);
    return p;
}

// Offsets into the pair's .idx (S = 3, Dc = 4).
#define OFF_VERSION 9
#define OFF_DTYPE 17
#define OFF_LEN(i) (34 + 4 * (i))
#define OFF_PTR(i) (34 + 12 + 8 * (i))
#define OFF_DOC(d) (34 + 36 + 8 * (d))

static void put64(uint8_t *p, int64_t v) { memcpy(p, &v, 8); }
static void put32(uint8_t *p, int32_t v) { memcpy(p, &v, 4); }

// Applies `edit` to a fresh pair and expects open to fail naming every word in `want`.
static void expect_refused(const char *what, void (*edit)(pair *), const char *want1, const char *want2) {
    pair p = make_pair();
    edit(&p);
    nm_indexed *ds = NULL;
    nm_error err = {{0}};
    int rc = nm_indexed_open_memory(&ds, "corrupt", p.idx, p.idx_size, p.bin, p.bin_size, 1, &err);
    EXPECT(rc != 0, "%s: accepted", what);
    if (rc == 0) {
        nm_indexed_close(ds);
        return;
    }
    EXPECT(strstr(err.msg, want1) != NULL, "%s: message lacks '%s': %s", what, want1, err.msg);
    if (want2) EXPECT(strstr(err.msg, want2) != NULL, "%s: message lacks '%s': %s", what, want2, err.msg);
}

static void e_magic(pair *p) { p->idx[3] = 'X'; }
static void e_version(pair *p) { put64(p->idx + OFF_VERSION, 2); }
static void e_dtype_float(pair *p) { p->idx[OFF_DTYPE] = NM_IDX_FLOAT32; }
static void e_dtype_unknown(pair *p) { p->idx[OFF_DTYPE] = 9; }
static void e_trunc_idx(pair *p) { p->idx_size -= 1; }
static void e_trunc_header(pair *p) { p->idx_size = 20; }
static void e_extra_idx(pair *p) { p->idx = nm_realloc(p->idx, p->idx_size + 7); p->idx_size += 7; }
static void e_huge_S(pair *p) { put64(p->idx + 18, (int64_t)1 << 61); }
static void e_trunc_bin(pair *p) { p->bin_size -= 4; }
static void e_long_bin(pair *p) { p->bin = nm_realloc(p->bin, p->bin_size + 4); p->bin_size += 4; }
static void e_neg_len(pair *p) { put32(p->idx + OFF_LEN(0), -1); }
static void e_ptr_outside(pair *p) { put64(p->idx + OFF_PTR(2), 1000); }
static void e_ptr_negative(pair *p) { put64(p->idx + OFF_PTR(1), -8); }
static void e_ptr_not_sum(pair *p) { put64(p->idx + OFF_PTR(2), 4); }
static void e_doc0(pair *p) { put64(p->idx + OFF_DOC(0), 1); }
static void e_doc_nonmono(pair *p) { put64(p->idx + OFF_DOC(2), 0); }
static void e_doc_last(pair *p) { put64(p->idx + OFF_DOC(3), 2); }
static void e_doc_count0(pair *p) { put64(p->idx + 26, 0); p->idx_size -= 32; }

static void test_corrupt(void) {
    // Sanity: the unedited pair opens.
    pair p = make_pair();
    nm_indexed *ds;
    nm_error err;
    NM_CHECK(nm_indexed_open_memory(&ds, "ok", p.idx, p.idx_size, p.bin, p.bin_size, 1, &err) == 0, "%s", err.msg);
    nm_indexed_close(ds);

    expect_refused("bad magic", e_magic, "magic", "corrupt.idx");
    expect_refused("bad version", e_version, "version", "2");
    expect_refused("float dtype", e_dtype_float, "dtype", "7");
    expect_refused("unknown dtype", e_dtype_unknown, "dtype", "9");
    expect_refused("truncated idx", e_trunc_idx, "truncated", "S=3");
    expect_refused("truncated header", e_trunc_header, "truncated", "header");
    expect_refused("trailing idx bytes", e_extra_idx, "index is", "bytes");
    expect_refused("huge S", e_huge_S, "truncated", "S=");
    expect_refused("truncated bin", e_trunc_bin, "corrupt.bin", "truncated");
    expect_refused("long bin", e_long_bin, "corrupt.bin", "24 bytes");
    expect_refused("negative length", e_neg_len, "sequence_lengths[0]", "-1");
    expect_refused("pointer outside bin", e_ptr_outside, "sequence_pointers[2]", "1000");
    expect_refused("negative pointer", e_ptr_negative, "sequence_pointers[1]", "-8");
    expect_refused("pointer not running sum", e_ptr_not_sum, "sequence_pointers[2]", "12");
    expect_refused("doc index 0", e_doc0, "document_indices[0]", "1");
    expect_refused("doc index decreasing", e_doc_nonmono, "document_indices[2]", "decrease");
    expect_refused("last doc index", e_doc_last, "document_indices[3]", "S = 3");
    expect_refused("no doc index", e_doc_count0, "Dc=0", NULL);

    // On disk: the message names the real path.
    char prefix[128], path[160];
    path_of(prefix, sizeof(prefix), "trunc");
    p = make_pair();
    snprintf(path, sizeof(path), "%s.idx", prefix);
    FILE *f = fopen(path, "wb");
    fwrite(p.idx, 1, p.idx_size - 9, f);
    fclose(f);
    snprintf(path, sizeof(path), "%s.bin", prefix);
    f = fopen(path, "wb");
    fwrite(p.bin, 1, p.bin_size, f);
    fclose(f);
    snprintf(path, sizeof(path), "%s.idx", prefix);
    EXPECT(nm_indexed_open(&ds, prefix, &err) != 0 && strstr(err.msg, path) && strstr(err.msg, "truncated"),
           "truncated file on disk: %s", err.msg);
    EXPECT(nm_indexed_open(&ds, "no/such/prefix", &err) != 0 && strstr(err.msg, "no/such/prefix.idx"), "missing: %s", err.msg);
    nm_free(p.idx);
    nm_free(p.bin);
}

// Random byte edits of a valid index: never a crash, and an accepted index reads in bounds
// (AddressSanitizer builds turn any overread into a failure).
static void test_mutations(void) {
    pair base = make_pair();
    int32_t buf[64];
    int accepted = 0;
    for (int it = 0; it < 20000; it++) {
        uint8_t *idx = nm_malloc(base.idx_size);
        memcpy(idx, base.idx, base.idx_size);
        int edits = 1 + (int)rnd(3);
        for (int e = 0; e < edits; e++) idx[rnd(base.idx_size)] = (uint8_t)rnd(256);
        size_t size = rnd(8) == 0 ? rnd(base.idx_size + 1) : base.idx_size;
        nm_indexed *ds;
        nm_error err;
        if (nm_indexed_open_memory(&ds, "mut", idx, size, base.bin, base.bin_size, 0, &err) == 0) {
            accepted++;
            for (int64_t i = 0; i < ds->n_seqs; i++) {
                int32_t n = nm_indexed_seq_len(ds, i);
                EXPECT(n <= 64, "accepted length %d", n);
                if (n <= 64) nm_indexed_read(ds, i, 0, n, buf, &err);
            }
            nm_indexed_close(ds);
        }
        nm_free(idx);
    }
    // Edits inside token values of an index are rare (there are none here), so few pass.
    printf("mutations: %d of 20000 accepted\n", accepted);
    nm_free(base.idx);
    nm_free(base.bin);
}

// --- atomic writer -------------------------------------------------------------------------------

static int count_entries(const char *d) {
    DIR *dp = opendir(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dp))) n += e->d_name[0] != '.';
    closedir(dp);
    return n;
}

static void test_atomic(void) {
    char sub[128], prefix[160], path[192];
    path_of(sub, sizeof(sub), "atomic");
    nm_error err;
    NM_CHECK(nm_mkdir_p(sub, &err) == 0, "%s", err.msg);
    snprintf(prefix, sizeof(prefix), "%s/data", sub);
    nm_indexed_writer *w;
    NM_CHECK(nm_indexed_writer_create(&w, prefix, NM_IDX_UINT16, &err) == 0, "%s", err.msg);
    int32_t t[3] = {1, 2, 3};
    NM_CHECK(nm_indexed_writer_add_document(w, t, 3, &err) == 0, "%s", err.msg);
    snprintf(path, sizeof(path), "%s.bin", prefix);
    EXPECT(access(path, F_OK) != 0, "%s exists before finalize", path);
    nm_indexed_writer_destroy(w);   // abort
    EXPECT(count_entries(sub) == 0, "abort left %d files", count_entries(sub));
    NM_CHECK(nm_indexed_writer_create(&w, prefix, NM_IDX_UINT16, &err) == 0, "%s", err.msg);
    NM_CHECK(nm_indexed_writer_add_document(w, t, 3, &err) == 0, "%s", err.msg);
    NM_CHECK(nm_indexed_writer_finalize(w, &err) == 0, "%s", err.msg);
    nm_indexed_writer_destroy(w);
    EXPECT(count_entries(sub) == 2, "finalize left %d files, want .bin and .idx", count_entries(sub));
}

int main(void) {
    uint64_t seed = test_seed("test_indexed");
    key = nm_rng_key(seed, NM_RNG_TEST, 1, 0);
    snprintf(dir, sizeof(dir), "test_indexed_XXXXXX");
    NM_CHECK(mkdtemp(dir), "mkdtemp");
    test_worked_example();
    test_round_trip(NM_IDX_UINT16);
    test_round_trip(NM_IDX_INT32);
    test_dtypes();
    test_corrupt();
    test_mutations();
    test_atomic();
    test_remove_tree(dir);
    if (failures) {
        fprintf(stderr, "test_indexed: %d failures (seed %llu)\n", failures, (unsigned long long)seed);
        return 1;
    }
    printf("test_indexed: ok\n");
    return 0;
}
