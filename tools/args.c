// args.c: implementation of args.h.
#include "args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int in_list(const char *const *list, const char *name, size_t len) {
    for (int i = 0; list && list[i]; i++) {
        if (strlen(list[i]) == len && strncmp(list[i], name, len) == 0) return 1;
    }
    return 0;
}

int nm_args_parse(nm_args *a, const char *cmd, int argc, char **argv, const char *const *value_flags,
                  const char *const *bool_flags) {
    memset(a, 0, sizeof(*a));
    a->cmd = cmd;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0) {
            // A bare word after a value flag is another value of that flag (--input a b c).
            if (a->n > 0 && a->vals[a->n - 1] && in_list(value_flags, a->keys[a->n - 1], strlen(a->keys[a->n - 1]))) {
                if (a->n >= 256) { fprintf(stderr, "%s: too many flags\n", cmd); return -1; }
                a->keys[a->n] = a->keys[a->n - 1];
                a->vals[a->n++] = arg;
                continue;
            }
            if (a->n_positional >= 64) { fprintf(stderr, "%s: too many arguments\n", cmd); return -1; }
            a->positional[a->n_positional++] = arg;
            continue;
        }
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        if (a->n >= 256) { fprintf(stderr, "%s: too many flags\n", cmd); return -1; }
        if (in_list(value_flags, name, len)) {
            const char *val = eq ? eq + 1 : NULL;
            if (!val) {
                if (i + 1 >= argc) { fprintf(stderr, "%s: flag --%.*s needs a value\n", cmd, (int)len, name); return -1; }
                val = argv[++i];
            }
            char *key = malloc(len + 1);
            memcpy(key, name, len);
            key[len] = 0;
            a->keys[a->n] = key;   // lives as long as the process; flags are few
            a->vals[a->n++] = val;
        } else if (!eq && in_list(bool_flags, name, len)) {
            a->keys[a->n] = name;
            a->vals[a->n++] = NULL;
        } else {
            fprintf(stderr, "%s: unknown flag --%.*s (see `nanomegatron help`)\n", cmd, (int)len, name);
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
    const char *v = nm_args_str(a, key, NULL);
    if (!v) { *out = dflt; return 0; }
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end) {
        fprintf(stderr, "%s: --%s expects an integer, got '%s'\n", a->cmd, key, v);
        return -1;
    }
    *out = x;
    return 0;
}

int nm_args_f64(const nm_args *a, const char *key, double dflt, double *out) {
    const char *v = nm_args_str(a, key, NULL);
    if (!v) { *out = dflt; return 0; }
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end) {
        fprintf(stderr, "%s: --%s expects a number, got '%s'\n", a->cmd, key, v);
        return -1;
    }
    *out = x;
    return 0;
}

int nm_args_all(const nm_args *a, const char *key, const char **out, int max) {
    int n = 0;
    for (int i = 0; i < a->n && n < max; i++) {
        if (strcmp(a->keys[i], key) == 0 && a->vals[i]) out[n++] = a->vals[i];
    }
    return n;
}
