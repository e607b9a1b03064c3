// args.h: strict command-line flags for the subcommands. Each command names the flags it
// accepts; anything else is an error naming the flag. "--flag value" and "--flag=value" both
// work. A flag given several times keeps every value (nm_args_all); the single-value getters
// take the last one. Only a flag listed with a trailing "..." (e.g. "input...") also takes the
// bare words that follow it (--input a b c); any other bare word is an error naming it and the
// flag before it, so `--prompt hello world` or `--resume yes` cannot silently mean something
// else.
#pragma once

#include <stdint.h>

typedef struct nm_args {
    const char *cmd;            // subcommand name, for messages
    int n;                      // parsed entries
    const char **keys;          // (n) flag names without "--"
    const char **vals;          // (n) value, or NULL for a boolean flag
} nm_args;
// The arrays hold at most argc entries, allocated once per parse and kept until the process
// ends (a command parses once; its strings point into argv).

// value_flags: NULL-terminated names taking a value ("name..." takes several); bool_flags:
// NULL-terminated switches. Returns 0, or prints "<cmd>: ..." naming the offending argument
// and returns -1 (exit status 2: usage).
int nm_args_parse(nm_args *a, const char *cmd, int argc, char **argv, const char *const *value_flags,
                  const char *const *bool_flags);
const char *nm_args_str(const nm_args *a, const char *key, const char *dflt);
int nm_args_has(const nm_args *a, const char *key);
// Parse as integer/float; print the flag and value and return -1 on garbage. Floats must be
// finite (nan and inf are refused).
int nm_args_i64(const nm_args *a, const char *key, int64_t dflt, int64_t *out);
int nm_args_f64(const nm_args *a, const char *key, double dflt, double *out);
// The same, and the value must lie in [lo, hi]; the message gives the range.
int nm_args_i64_in(const nm_args *a, const char *key, int64_t dflt, int64_t lo, int64_t hi, int64_t *out);
int nm_args_f64_in(const nm_args *a, const char *key, double dflt, double lo, double hi, double *out);
// Every value of a repeated flag (--input a --input b, or --input a b c), in order: a heap
// array of *n entries (free with free()), or NULL when there are none.
const char **nm_args_all(const nm_args *a, const char *key, int *n);

// The largest seed a flag accepts: 2^53, so a seed written to JSON (trainer.json, metrics)
// reads back exactly.
#define NM_ARGS_SEED_MAX ((int64_t)1 << 53)
