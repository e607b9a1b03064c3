// args.c: implementation of args.h.
#include "args.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The entry of `list` named name[0..len), or NULL. *multi is set when it ends in "...".
static const char *find_flag(const char *const *list, const char *name, size_t len, int *multi) {
    for (int i = 0; list && list[i]; i++) {
        size_t l = strlen(list[i]);
        int dots = l > 3 && !strcmp(list[i] + l - 3, "...");
        if (dots) l -= 3;
        if (l == len && strncmp(list[i], name, len) == 0) {
            if (multi) *multi = dots;
            return list[i];
        }
    }
    return NULL;
}

// A bare word no flag takes: say which word, after what, and the likely fix.
static void unexpected_word(const nm_args *a, const char *word, const char *prev_flag, const char *prev_val) {
    if (!prev_flag) {
        fprintf(stderr, "%s: unexpected argument '%s': every argument is a --flag or its value (see `nanomegatron help`)\n",
                a->cmd, word);
    } else if (!prev_val) {
        fprintf(stderr, "%s: unexpected argument '%s' after --%s: --%s is a switch and takes no value (drop '%s')\n",
                a->cmd, word, prev_flag, prev_flag, word);
    } else {
        fprintf(stderr, "%s: unexpected argument '%s' after --%s %s (quote a value with spaces: --%s \"%s %s\")\n",
                a->cmd, word, prev_flag, prev_val, prev_flag, prev_val, word);
    }
}

// Every parse's arrays, reachable from here until the process ends (args.h: a command reads its
// flags to the end, so they are never freed). Held only by the caller's stack nm_args, they
// would read as leaked to LeakSanitizer once the command returns (`make sanitize` runs every
// command through tests/test_cli_contract.sh).
typedef struct kept_parse {
    struct kept_parse *next;
    const char **keys, **vals;
} kept_parse;
static kept_parse *kept;

int nm_args_parse(nm_args *a, const char *cmd, int argc, char **argv, const char *const *value_flags,
                  const char *const *bool_flags) {
    memset(a, 0, sizeof(*a));
    a->cmd = cmd;
    a->keys = calloc((size_t)argc + 1, sizeof(char *));
    a->vals = calloc((size_t)argc + 1, sizeof(char *));
    kept_parse *k = malloc(sizeof(*k));
    if (!a->keys || !a->vals || !k) { fprintf(stderr, "%s: out of memory\n", cmd); return -1; }
    *k = (kept_parse){kept, a->keys, a->vals};
    kept = k;
    int multi = 0;              // the last flag takes further bare words
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == 0) {
            if (multi) {
                a->keys[a->n] = a->keys[a->n - 1];
                a->vals[a->n++] = arg;
                continue;
            }
            unexpected_word(a, arg, a->n ? a->keys[a->n - 1] : NULL, a->n ? a->vals[a->n - 1] : NULL);
            return -1;
        }
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        char *key = malloc(len + 1);
        if (!key) { fprintf(stderr, "%s: out of memory\n", cmd); return -1; }
        memcpy(key, name, len);
        key[len] = 0;
        a->keys[a->n] = key;    // reachable (kept) on the error returns below too
        if (find_flag(value_flags, name, len, &multi)) {
            const char *val = eq ? eq + 1 : NULL;
            if (!val) {
                if (i + 1 >= argc) { fprintf(stderr, "%s: flag --%s needs a value\n", cmd, key); return -1; }
                val = argv[++i];
            }
            a->keys[a->n] = key;
            a->vals[a->n++] = val;
        } else if (find_flag(bool_flags, name, len, NULL)) {
            if (eq) {
                fprintf(stderr, "%s: --%s is a switch and takes no value, got '%s' (give --%s alone)\n", cmd, key, arg, key);
                return -1;
            }
            multi = 0;
            a->keys[a->n] = key;
            a->vals[a->n++] = NULL;
        } else {
            fprintf(stderr, "%s: unknown flag --%s (see `nanomegatron help`)\n", cmd, key);
            return -1;
        }
    }
    return 0;
}

const char *nm_args_str(const nm_args *a, const char *key, const char *dflt) {
    for (int i = a->n - 1; i >= 0; i--) {
        if (strcmp(a->keys[i], key) == 0) return a->vals[i] ? a->vals[i] : dflt;
    }
    return dflt;
}

int nm_args_has(const nm_args *a, const char *key) {
    for (int i = 0; i < a->n; i++) {
        if (strcmp(a->keys[i], key) == 0) return 1;
    }
    return 0;
}

int nm_args_i64(const nm_args *a, const char *key, int64_t dflt, int64_t *out) {
    return nm_args_i64_in(a, key, dflt, INT64_MIN, INT64_MAX, out);
}

int nm_args_f64(const nm_args *a, const char *key, double dflt, double *out) {
    return nm_args_f64_in(a, key, dflt, -HUGE_VAL, HUGE_VAL, out);
}

int nm_args_i64_in(const nm_args *a, const char *key, int64_t dflt, int64_t lo, int64_t hi, int64_t *out) {
    const char *v = nm_args_str(a, key, NULL);
    if (!v) { *out = dflt; return 0; }
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end) {
        fprintf(stderr, "%s: --%s expects an integer, got '%s'\n", a->cmd, key, v);
        return -1;
    }
    if (errno == ERANGE || x < lo || x > hi) {
        fprintf(stderr, "%s: --%s %s is out of range: give an integer from %" PRId64 " to %" PRId64 "\n", a->cmd, key, v,
                lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

int nm_args_f64_in(const nm_args *a, const char *key, double dflt, double lo, double hi, double *out) {
    const char *v = nm_args_str(a, key, NULL);
    if (!v) { *out = dflt; return 0; }
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end) {
        fprintf(stderr, "%s: --%s expects a number, got '%s'\n", a->cmd, key, v);
        return -1;
    }
    // strtod reads "nan" and "inf" as numbers; no flag means either.
    if (!isfinite(x)) {
        fprintf(stderr, "%s: --%s expects a finite number, got '%s'\n", a->cmd, key, v);
        return -1;
    }
    if (x < lo || x > hi) {
        fprintf(stderr, "%s: --%s %s is out of range: give a number from %g to %g\n", a->cmd, key, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

const char **nm_args_all(const nm_args *a, const char *key, int *n) {
    *n = 0;
    const char **out = NULL;
    for (int i = 0; i < a->n; i++) {
        if (strcmp(a->keys[i], key) != 0 || !a->vals[i]) continue;
        if (!out) out = calloc((size_t)a->n, sizeof(char *));
        if (!out) { fprintf(stderr, "%s: out of memory\n", a->cmd); exit(1); }
        out[(*n)++] = a->vals[i];
    }
    return out;
}
