// cmd_tokenizer.c: `nanomegatron tokenizer train|encode|decode`, thin wrappers over
// src/data/tokenizer.h.
//
//   tokenizer train  --input FILE... --vocab-size N --out tokenizer.json
//   tokenizer encode --tokenizer T.json|bytes (--text STR | --input FILE) [--jsonl] [--count-only]
//   tokenizer decode --tokenizer T.json|bytes --ids "1,2,3"
//
// encode prints the ids as one JSON array on the last line of stdout (a summary goes to
// stderr). With --jsonl every input line is a JSON string, encoded on its own, and every
// output line is its id array (one process for many strings: the interop tests use it).
// decode writes the exact bytes, nothing added (no newline), so output can be compared.
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "args.h"
#include "commands.h"
#include "data/tokenizer.h"
#include "core/fileio.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *usage =
    "usage: nanomegatron tokenizer train  --input FILE... --vocab-size N --out tokenizer.json\n"
    "       nanomegatron tokenizer encode --tokenizer T.json|bytes (--text STR | --input FILE) [--jsonl] [--count-only]\n"
    "       nanomegatron tokenizer decode --tokenizer T.json|bytes --ids \"1,2,3\"\n";

static void print_ids(const int32_t *ids, int64_t n) {
    putchar('[');
    for (int64_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    puts("]");
}

static int cmd_train(int argc, char **argv) {
    static const char *const vf[] = { "input...", "vocab-size", "out", NULL };
    nm_args a;
    if (nm_args_parse(&a, "tokenizer train", argc, argv, vf, NULL)) return 2;
    const char *out = nm_args_str(&a, "out", NULL);
    int64_t vocab;
    if (!nm_args_has(&a, "input") || !out || !nm_args_has(&a, "vocab-size")) {
        fputs(usage, stderr);
        return 2;
    }
    // 256 bytes + <|endoftext|> at least; the upper bound is the trainer's own.
    if (nm_args_i64_in(&a, "vocab-size", -1, 257, 1 << 30, &vocab)) return 2;
    int n_in;
    const char **inputs = nm_args_all(&a, "input", &n_in);
    nm_error err;
    nm_tokenizer_train_stats st;
    int rc = nm_tokenizer_train_ex(inputs, n_in, vocab, out, &st, &err);
    free(inputs);
    if (rc) {
        fprintf(stderr, "nanomegatron: %s\n", err.msg);
        return 1;
    }
    printf("tokenizer train: %lld bytes in %d file(s), %lld distinct pre-tokens\n", (long long)st.n_bytes, n_in,
           (long long)st.n_words);
    printf("  pre-tokenize+count %.3f s, %lld merges %.3f s, write %.3f s, total %.3f s\n", st.t_count,
           (long long)st.n_merges, st.t_merge, st.t_write, st.t_count + st.t_merge + st.t_write);
    printf("  vocab %lld (256 bytes + %lld merged + <|endoftext|>) -> %s\n", (long long)st.vocab_size,
           (long long)(st.vocab_size - 257), out);
    if (st.vocab_size < vocab)
        printf("  note: stopped below the requested %lld: no pair left to merge\n", (long long)vocab);
    return 0;
}

// --jsonl: one JSON string per line in, one id array per line out.
static int encode_jsonl(const nm_tokenizer *t, const char *data, size_t size, const char *src) {
    const char *p = data, *end = data + size;
    int64_t line = 0;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        line++;
        if (le > p) {
            cJSON *v = cJSON_ParseWithLength(p, (size_t)(le - p));
            if (!cJSON_IsString(v)) {
                fprintf(stderr, "nanomegatron: %s: line %lld is not a JSON string\n", src, (long long)line);
                cJSON_Delete(v);
                return 1;
            }
            int32_t *ids;
            int64_t n;
            nm_error err;
            int rc = nm_tokenizer_encode(t, v->valuestring, strlen(v->valuestring), &ids, &n, &err);
            cJSON_Delete(v);
            if (rc) {
                fprintf(stderr, "nanomegatron: %s: line %lld: %s\n", src, (long long)line, err.msg);
                return 1;
            }
            print_ids(ids, n);
            nm_free(ids);
        }
        p = le + 1;
    }
    return 0;
}

static int cmd_encode(int argc, char **argv) {
    static const char *const vf[] = { "tokenizer", "text", "input", NULL };
    static const char *const bf[] = { "jsonl", "count-only", NULL };
    nm_args a;
    if (nm_args_parse(&a, "tokenizer encode", argc, argv, vf, bf)) return 2;
    const char *tp = nm_args_str(&a, "tokenizer", NULL);
    const char *text = nm_args_str(&a, "text", NULL);
    const char *input = nm_args_str(&a, "input", NULL);
    if (!tp || (!text) == (!input) || (text && nm_args_has(&a, "jsonl"))) {
        fputs(usage, stderr);
        return 2;
    }
    nm_error err;
    nm_tokenizer *t;
    if (nm_tokenizer_load(&t, tp, &err)) {
        fprintf(stderr, "nanomegatron: %s\n", err.msg);
        return 1;
    }
    char *data = NULL;
    size_t size;
    if (input) {
        if (nm_file_read_all(input, &data, &size, &err)) {
            fprintf(stderr, "nanomegatron: %s\n", err.msg);
            nm_tokenizer_free(t);
            return 1;
        }
    } else {
        size = strlen(text);
    }
    int rc = 0;
    if (nm_args_has(&a, "jsonl")) {
        rc = encode_jsonl(t, data, size, input);
    } else {
        int32_t *ids;
        int64_t n;
        double t0 = now_s();
        if (nm_tokenizer_encode(t, data ? data : text, size, &ids, &n, &err)) {
            fprintf(stderr, "nanomegatron: %s\n", err.msg);
            rc = 1;
        } else {
            double dt = now_s() - t0;
            fprintf(stderr, "tokenizer encode: %zu bytes -> %lld tokens (%.2f bytes/token) in %.3f s, %.2f MB/s\n", size,
                    (long long)n, n ? (double)size / (double)n : 0.0, dt, dt > 0 ? (double)size / dt / 1e6 : 0.0);
            if (!nm_args_has(&a, "count-only")) print_ids(ids, n);
            nm_free(ids);
        }
    }
    nm_free(data);
    nm_tokenizer_free(t);
    return rc;
}

// Accepts "1,2,3", "1 2 3" and "[1, 2, 3]".
static int parse_ids(const char *s, int32_t **out, int64_t *n) {
    size_t cap = 16;
    int32_t *ids = nm_malloc(cap * sizeof(int32_t));
    int64_t k = 0;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '[' || *p == ']' || *p == '\n' || *p == '\t') p++;
        if (!*p) break;
        char *e;
        errno = 0;
        long long v = strtoll(p, &e, 10);
        if (e == p || errno || v < INT32_MIN || v > INT32_MAX) {
            fprintf(stderr, "tokenizer decode: --ids: cannot read an id at \"%.20s\"\n", p);
            nm_free(ids);
            return -1;
        }
        if ((size_t)k == cap) {
            cap *= 2;
            ids = nm_realloc(ids, cap * sizeof(int32_t));
        }
        ids[k++] = (int32_t)v;
        p = e;
    }
    *out = ids;
    *n = k;
    return 0;
}

static int cmd_decode(int argc, char **argv) {
    static const char *const vf[] = { "tokenizer", "ids", NULL };
    nm_args a;
    if (nm_args_parse(&a, "tokenizer decode", argc, argv, vf, NULL)) return 2;
    const char *tp = nm_args_str(&a, "tokenizer", NULL);
    const char *ids_s = nm_args_str(&a, "ids", NULL);
    if (!tp || !ids_s) {
        fputs(usage, stderr);
        return 2;
    }
    int32_t *ids;
    int64_t n;
    if (parse_ids(ids_s, &ids, &n)) return 2;
    nm_error err;
    nm_tokenizer *t;
    if (nm_tokenizer_load(&t, tp, &err)) {
        fprintf(stderr, "nanomegatron: %s\n", err.msg);
        nm_free(ids);
        return 1;
    }
    char *text;
    size_t len;
    int rc = 0;
    if (nm_tokenizer_decode(t, ids, n, &text, &len, &err)) {
        fprintf(stderr, "nanomegatron: %s\n", err.msg);
        rc = 1;
    } else {
        fwrite(text, 1, len, stdout);
        nm_free(text);
    }
    nm_free(ids);
    nm_tokenizer_free(t);
    return rc;
}

int nm_cmd_tokenizer(int argc, char **argv) {
    if (argc < 1) {
        fputs(usage, stderr);
        return 2;
    }
    if (!strcmp(argv[0], "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(argv[0], "encode")) return cmd_encode(argc - 1, argv + 1);
    if (!strcmp(argv[0], "decode")) return cmd_decode(argc - 1, argv + 1);
    if (!strcmp(argv[0], "help") || !strcmp(argv[0], "--help")) {
        fputs(usage, stdout);
        return 0;
    }
    fprintf(stderr, "tokenizer: unknown subcommand '%s'\n%s", argv[0], usage);
    return 2;
}
