// cmd_data.c: `nanomegatron prepare` (text/JSONL or the synthetic corpus -> .bin/.idx) and
// `nanomegatron inspect --data PREFIX` (counts, token statistics, a decoded sample, and for
// scripts: --doc N prints document N's token ids, --samples N prints the first N training
// samples of the loader stream, each as a JSON array on its own line, last on stdout).
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "args.h"
#include "commands.h"
#include "core/check.h"
#include "data/indexed.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/synthetic.h"
#include "data/tokenizer.h"

// --- prepare -----------------------------------------------------------------------------------

static const char *prepare_usage =
    "usage: nanomegatron prepare --input FILE... --tokenizer tokenizer.json|bytes --out PREFIX\n"
    "                            [--json-key text] [--jsonl] [--doc-per-file] [--append-eod] [--workers N]\n"
    "                            [--progress | --no-progress]\n"
    "       nanomegatron prepare --synthetic N_TOKENS --out PREFIX [--seed S]\n"
    "Plain text: one document per block of non-blank lines (--doc-per-file: one per file).\n"
    "JSONL (.jsonl/.json or --jsonl): one object per line, the --json-key field is the document.\n";

static int prepare_synthetic(const nm_args *a, const char *out) {
    int64_t n_tokens, seed;
    // 2^40 tokens (4 TB of int32) is more than any disk here: a typo'd exponent fails now,
    // not when the disk fills.
    if (nm_args_i64_in(a, "synthetic", 0, 1, (int64_t)1 << 40, &n_tokens) ||
        nm_args_i64_in(a, "seed", 1, 0, NM_ARGS_SEED_MAX, &seed)) return 2;
    nm_synthetic_params p;
    nm_synthetic_params_default(&p);
    p.seed = (uint64_t)seed;
    nm_error err;
    nm_synthetic *s;
    if (nm_synthetic_create(&s, &p, &err) != 0 || nm_synthetic_write(out, &p, n_tokens, &err) != 0) {
        fprintf(stderr, "prepare: %s\n", err.msg);
        return 1;
    }
    printf("prepare: wrote %s.bin/.idx: synthetic corpus seed %lld, >= %lld tokens, %d words, "
           "entropy floor %.6f nats/token\n",
           out, (long long)seed, (long long)n_tokens, nm_synthetic_n_words(s), nm_synthetic_entropy_floor(s));
    nm_synthetic_destroy(s);
    return 0;
}

// --- merge -------------------------------------------------------------------------------------

static const char *merge_usage =
    "usage: nanomegatron merge --input PREFIX|DIR... --out PREFIX\n"
    "Concatenates prepared datasets (a DIR: every PREFIX.idx in it, sorted) into PREFIX.bin/.idx,\n"
    "documents in the order given, as Megatron's tools/merge_datasets.py.\n";

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

// The prefixes in DIR (every NAME.idx, sorted), appended to *list.
static int prefixes_in(const char *dir, char ***list, int *n, nm_error *err) {
    DIR *d = opendir(dir);
    if (!d) return nm_error_set(err, "%s: cannot open the directory: %s", dir, strerror(errno));
    int first = *n;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len <= 4 || strcmp(e->d_name + len - 4, ".idx") != 0) continue;
        *list = nm_realloc(*list, sizeof(char *) * (size_t)(*n + 1));
        char *p = nm_malloc(strlen(dir) + len + 2);
        sprintf(p, "%s/%.*s", dir, (int)(len - 4), e->d_name);
        (*list)[(*n)++] = p;
    }
    closedir(d);
    if (*n == first) return nm_error_set(err, "%s holds no PREFIX.idx (no prepared dataset)", dir);
    qsort(*list + first, (size_t)(*n - first), sizeof(char *), by_name);
    return 0;
}

int nm_cmd_merge(int argc, char **argv) {
    static const char *const vflags[] = {"input...", "out", NULL};
    nm_args a;
    if (nm_args_parse(&a, "merge", argc, argv, vflags, NULL)) return 2;
    const char *out = nm_args_str(&a, "out", NULL);
    if (!out || !nm_args_has(&a, "input")) {
        fputs(merge_usage, stderr);
        return 2;
    }
    size_t n_out = strlen(out);
    if (n_out > 4 && (!strcmp(out + n_out - 4, ".bin") || !strcmp(out + n_out - 4, ".idx"))) {
        fprintf(stderr, "merge: --out %s: give the prefix without %s (--out %.*s writes %.*s.bin and %.*s.idx)\n", out,
                out + n_out - 4, (int)(n_out - 4), out, (int)(n_out - 4), out, (int)(n_out - 4), out);
        return 2;
    }
    int n_in, n = 0, rc = 0;
    const char **inputs = nm_args_all(&a, "input", &n_in);
    char **prefixes = NULL;
    nm_error err;
    for (int i = 0; i < n_in && rc == 0; i++) {
        struct stat st;
        if (stat(inputs[i], &st) == 0 && S_ISDIR(st.st_mode)) {
            rc = prefixes_in(inputs[i], &prefixes, &n, &err);
        } else {
            prefixes = nm_realloc(prefixes, sizeof(char *) * (size_t)(n + 1));
            prefixes[n++] = nm_strdup(inputs[i]);
        }
    }
    int64_t docs = 0, tokens = 0;
    if (rc == 0) rc = nm_indexed_merge((const char *const *)prefixes, n, out, &docs, &tokens, &err);
    if (rc != 0) fprintf(stderr, "merge: %s\n", err.msg);
    else printf("merge: wrote %s.bin/.idx: %d datasets, %lld documents, %lld tokens\n", out, n, (long long)docs,
                (long long)tokens);
    for (int i = 0; i < n; i++) nm_free(prefixes[i]);
    nm_free(prefixes);
    free(inputs);
    return rc != 0 ? 1 : 0;
}

int nm_cmd_prepare(int argc, char **argv) {
    static const char *const vflags[] = {"input...", "tokenizer", "out", "json-key", "workers", "synthetic", "seed", NULL};
    static const char *const bflags[] = {"append-eod", "doc-per-file", "jsonl", "progress", "no-progress", NULL};
    nm_args a;
    if (nm_args_parse(&a, "prepare", argc, argv, vflags, bflags)) return 2;
    const char *out = nm_args_str(&a, "out", NULL);
    if (!out) {
        fputs(prepare_usage, stderr);
        return 2;
    }
    size_t n_out = strlen(out);
    if (n_out > 4 && (!strcmp(out + n_out - 4, ".bin") || !strcmp(out + n_out - 4, ".idx"))) {
        fprintf(stderr, "prepare: --out %s: give the prefix without %s (--out %.*s writes %.*s.bin and %.*s.idx)\n", out,
                out + n_out - 4, (int)(n_out - 4), out, (int)(n_out - 4), out, (int)(n_out - 4), out);
        return 2;
    }
    if (nm_args_has(&a, "synthetic")) return prepare_synthetic(&a, out);
    const char *tokenizer = nm_args_str(&a, "tokenizer", NULL);
    int64_t workers;
    if (!nm_args_has(&a, "input") || !tokenizer) {
        fputs(prepare_usage, stderr);
        return 2;
    }
    if (nm_args_i64_in(&a, "workers", 0, 0, 4096, &workers)) return 2;
    int n_inputs;
    const char **inputs = nm_args_all(&a, "input", &n_inputs);
    nm_prepare_opts o = {
        .inputs = inputs,
        .n_inputs = n_inputs,
        .tokenizer = tokenizer,
        .out_prefix = out,
        .json_key = nm_args_str(&a, "json-key", "text"),
        .jsonl = nm_args_has(&a, "jsonl"),
        .doc_per_file = nm_args_has(&a, "doc-per-file"),
        .append_eod = nm_args_has(&a, "append-eod"),
        .workers = (int)workers,
        .progress = nm_args_has(&a, "no-progress") ? 0 : nm_args_has(&a, "progress") ? 1 : -1,
    };
    nm_prepare_stats st;
    nm_error err;
    int rc = nm_prepare_run(&o, &st, &err);
    free(inputs);
    if (rc != 0) {
        fprintf(stderr, "prepare: %s\n", err.msg);
        return 1;
    }
    double s = st.seconds > 1e-9 ? st.seconds : 1e-9;
    printf("prepare: wrote %s.bin/.idx: %lld documents, %lld sequences, %lld tokens (%s) from %.2f MB in %.2f s "
           "(%.1f MB/s, %.2fM tokens/s)\n",
           out, (long long)st.docs, (long long)st.seqs, (long long)st.tokens, nm_indexed_dtype_name(st.dtype),
           (double)st.bytes / 1e6, st.seconds, (double)st.bytes / 1e6 / s, (double)st.tokens / 1e6 / s);
    return 0;
}

// --- inspect -----------------------------------------------------------------------------------

static const char *inspect_usage =
    "usage: nanomegatron inspect --data PREFIX|'W1 PREFIX1 W2 PREFIX2 ...' [--doc N] [--tokenizer T]\n"
    "                            [--samples N --seq-len L [--seed S] [--num-samples M] [--split 99,1,0]\n"
    "                             [--which train|valid|test] [--start K] [--cache-dir D]]\n"
    "--doc N: the last stdout line is document N's token ids as a JSON array.\n"
    "--samples N: the last N stdout lines are loader samples K..K+N-1 (seq_len + 1 tokens each).\n"
    "--cache-dir D: the index mappings are read from (or built and written to) D, as train's data.cache_dir.\n"
    "--data 'W1 P1 W2 P2': a blend, as Megatron's --data-path (weight prefix pairs): with --samples only.\n";

// Megatron's --data-path: one prefix, or weight-prefix pairs separated by spaces. The pairs are
// written into the caller's arrays (at most cap), pointing into buf (a copy the caller frees).
// Returns the number of datasets, or -1 with a message on stderr.
static int parse_data_path(const char *text, char *buf, const char **prefixes, double *weights, int cap) {
    char *save = NULL, *tok[2 * 64 + 1];
    int n = 0;
    for (char *t = strtok_r(buf, " \t", &save); t && n <= 2 * cap; t = strtok_r(NULL, " \t", &save)) tok[n++] = t;
    if (n == 1) {
        prefixes[0] = tok[0];
        weights[0] = 1.0;
        return 1;
    }
    if (n == 0 || n % 2 || n > 2 * cap) {
        fprintf(stderr, "inspect: --data '%s': one prefix, or up to %d weight-prefix pairs\n", text, cap);
        return -1;
    }
    for (int i = 0; i < n / 2; i++) {
        char *end;
        weights[i] = strtod(tok[2 * i], &end);
        if (*end || !(weights[i] >= 0)) {
            fprintf(stderr, "inspect: --data '%s': '%s' is not a weight (expected weight-prefix pairs)\n", text, tok[2 * i]);
            return -1;
        }
        prefixes[i] = tok[2 * i + 1];
    }
    return n / 2;
}

static void print_json_ids(const int32_t *ids, int64_t n) {
    putchar('[');
    for (int64_t i = 0; i < n; i++) printf(i ? ",%d" : "%d", ids[i]);
    puts("]");
}

// Decoded text, with control bytes escaped so one sample stays readable on a terminal.
static void print_decoded(const nm_tokenizer *tok, const int32_t *ids, int64_t n) {
    char *text;
    size_t len;
    nm_error err;
    if (nm_tokenizer_decode(tok, ids, n, &text, &len, &err) != 0) {
        printf("  (cannot decode: %s)\n", err.msg);
        return;
    }
    fputs("  \"", stdout);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\n') fputs("\\n", stdout);
        else if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    puts("\"");
    nm_free(text);
}

static int parse_split(const char *s, double out[3]) {
    out[0] = out[1] = out[2] = 0;
    char *end;
    for (int k = 0; k < 3; k++) {
        out[k] = strtod(s, &end);
        if (end == s || !(out[k] >= 0)) return -1;
        if (*end == 0) return 0;
        if (*end != ',') return -1;
        s = end + 1;
    }
    return -1;
}

static int inspect_samples(const nm_args *a, const char *data) {
    int64_t n, L, seed, num_samples, start;
    // The same bounds as the training config's seq_len and seed (a uint32 shuffle seed here).
    if (nm_args_i64_in(a, "samples", 0, 1, 1 << 30, &n) || nm_args_i64_in(a, "seq-len", 0, 1, 1 << 24, &L) ||
        nm_args_i64_in(a, "seed", 1234, 0, 0xffffffffLL, &seed) ||
        nm_args_i64_in(a, "num-samples", 0, 0, NM_ARGS_SEED_MAX, &num_samples) ||
        nm_args_i64_in(a, "start", 0, 0, NM_ARGS_SEED_MAX, &start))
        return 2;
    const char *which_s = nm_args_str(a, "which", "train");
    int which = !strcmp(which_s, "train") ? NM_SPLIT_TRAIN : !strcmp(which_s, "valid") ? NM_SPLIT_VALID
              : !strcmp(which_s, "test") ? NM_SPLIT_TEST : -1;
    if (which < 0) {
        fprintf(stderr, "inspect: --which must be train, valid or test, got '%s'\n", which_s);
        return 2;
    }
    if (L < 1) {
        fprintf(stderr, "inspect: --samples %lld needs --seq-len L (the window the trainer reads)\n", (long long)n);
        return 2;
    }
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    char *buf = nm_strdup(data);
    const char *prefixes[64];
    double weights[64];
    spec.n_sources = parse_data_path(data, buf, prefixes, weights, 64);
    if (spec.n_sources < 0) {
        nm_free(buf);
        return 2;
    }
    spec.prefixes = prefixes;
    spec.weights = weights;
    spec.seq_len = L;
    spec.seed = (uint32_t)seed;
    spec.num_samples[which] = num_samples;
    spec.cache_dir = nm_args_str(a, "cache-dir", NULL);
    if (parse_split(nm_args_str(a, "split", "99,1,0"), spec.split) != 0) {
        fprintf(stderr, "inspect: --split expects up to 3 comma-separated weights, got '%s'\n", nm_args_str(a, "split", ""));
        return 2;
    }
    nm_loader *l;
    nm_error err;
    int created = nm_loader_create(&l, &spec, which, 0, 1, &err);
    nm_free(buf);  // the loader keeps no prefix
    if (created != 0) {
        fprintf(stderr, "inspect: %s\n", err.msg);
        return 1;
    }
    char desc[512];
    nm_loader_describe(l, desc, sizeof(desc));
    printf("samples: %s | seq_len %lld | seed %lld | num_samples %lld\n", desc, (long long)L, (long long)seed,
           (long long)num_samples);
    int32_t *row = nm_malloc(sizeof(int32_t) * (size_t)(L + 1));
    int rc = 0;
    for (int64_t s = start; s < start + n && rc == 0; s++) {
        if (nm_loader_sample(l, s, row, &err) != 0) {
            fprintf(stderr, "inspect: %s\n", err.msg);
            rc = 1;
        } else {
            print_json_ids(row, L + 1);
        }
    }
    nm_free(row);
    nm_loader_destroy(l);
    return rc;
}

int nm_cmd_inspect_data(int argc, char **argv) {
    static const char *const vflags[] = {"data", "doc", "tokenizer", "samples", "seq-len", "seed", "num-samples",
                                         "split", "which", "start", "cache-dir", NULL};
    nm_args a;
    if (nm_args_parse(&a, "inspect", argc, argv, vflags, NULL)) return 2;
    const char *prefix = nm_args_str(&a, "data", NULL);
    int64_t doc;
    if (!prefix) {
        fputs(inspect_usage, stderr);
        return 2;
    }
    if (nm_args_i64_in(&a, "doc", -1, 0, INT64_MAX, &doc)) return 2;
    if (strpbrk(prefix, " \t")) {  // a blend: its samples only (the statistics are one dataset's)
        if (!nm_args_has(&a, "samples")) {
            fprintf(stderr, "inspect: --data '%s' is a blend (weight-prefix pairs): give --samples N --seq-len L\n", prefix);
            return 2;
        }
        return inspect_samples(&a, prefix);
    }
    nm_indexed *ds;
    nm_error err;
    if (nm_indexed_open(&ds, prefix, &err) != 0) {
        fprintf(stderr, "inspect: %s\n", err.msg);
        return 1;
    }
    // Token statistics: one pass over .bin (sequential through the mapping).
    int32_t min_len = INT32_MAX, max_id = INT32_MIN, min_id = INT32_MAX;
    int64_t empty_docs = 0;
    int32_t *buf = nm_malloc(sizeof(int32_t) * (size_t)(ds->max_len > 0 ? ds->max_len : 1));
    int rc = 0;
    for (int64_t i = 0; i < ds->n_seqs && rc == 0; i++) {
        int32_t n = nm_indexed_seq_len(ds, i);
        if (n < min_len) min_len = n;
        if (nm_indexed_read(ds, i, 0, n, buf, &err) != 0) {
            fprintf(stderr, "inspect: %s\n", err.msg);
            rc = 1;
            break;
        }
        for (int32_t k = 0; k < n; k++) {
            if (buf[k] > max_id) max_id = buf[k];
            if (buf[k] < min_id) min_id = buf[k];
        }
    }
    for (int64_t d = 0; d < ds->n_docs; d++) empty_docs += nm_indexed_doc_index(ds, d + 1) == nm_indexed_doc_index(ds, d);
    if (rc == 0) {
        printf("data %s: %lld sequences, %lld documents (%lld empty), %lld tokens, dtype %s (code %d)\n", prefix,
               (long long)ds->n_seqs, (long long)ds->n_docs, (long long)empty_docs, (long long)ds->n_tokens,
               nm_indexed_dtype_name(ds->dtype), ds->dtype);
        if (ds->n_seqs > 0) {
            printf("sequence length: min %d, max %d, mean %.1f | token ids: min %d, max %d\n", min_len, ds->max_len,
                   (double)ds->n_tokens / (double)ds->n_seqs, ds->n_tokens ? min_id : 0, ds->n_tokens ? max_id : 0);
        }
    }
    if (rc == 0 && doc >= ds->n_docs) {
        fprintf(stderr, "inspect: --doc %lld, but %s has %lld documents\n", (long long)doc, prefix, (long long)ds->n_docs);
        rc = 1;
    }
    // A decoded look at the data: document --doc N, or the first document.
    const char *tok_path = nm_args_str(&a, "tokenizer", ds->n_tokens && max_id <= 256 && min_id >= 0 ? "bytes" : NULL);
    int64_t show = doc >= 0 ? doc : 0;
    int32_t *ids = NULL;
    int64_t n_ids = 0;
    if (rc == 0 && ds->n_docs > 0) {
        int64_t s0 = nm_indexed_doc_index(ds, show), s1 = nm_indexed_doc_index(ds, show + 1);
        for (int64_t i = s0; i < s1; i++) n_ids += nm_indexed_seq_len(ds, i);
        ids = nm_malloc(sizeof(int32_t) * (size_t)(n_ids ? n_ids : 1));
        int64_t k = 0;
        for (int64_t i = s0; i < s1 && rc == 0; i++) {
            int32_t n = nm_indexed_seq_len(ds, i);
            if (nm_indexed_read(ds, i, 0, n, ids + k, &err) != 0) {
                fprintf(stderr, "inspect: %s\n", err.msg);
                rc = 1;
            }
            k += n;
        }
    }
    if (rc == 0 && ids && tok_path) {
        nm_tokenizer *tok;
        if (nm_tokenizer_load(&tok, tok_path, &err) != 0) {
            fprintf(stderr, "inspect: %s\n", err.msg);
            rc = 1;
        } else {
            int64_t m = n_ids < 200 ? n_ids : 200;
            printf("document %lld (%lld tokens%s), decoded with %s:\n", (long long)show, (long long)n_ids,
                   m < n_ids ? ", first 200 shown" : "", tok_path);
            print_decoded(tok, ids, m);
            nm_tokenizer_free(tok);
        }
    }
    if (rc == 0 && doc >= 0) print_json_ids(ids, n_ids);
    nm_free(ids);
    nm_free(buf);
    nm_indexed_close(ds);
    if (rc == 0 && nm_args_has(&a, "samples")) rc = inspect_samples(&a, prefix);
    return rc;
}
