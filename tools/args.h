// args.h: strict command-line flags for the subcommands. Each command names the flags it
// accepts; anything else is an error naming the flag. "--flag value" and "--flag=value" both
// work; a flag given several times keeps every value (for --input A B ... give it again,
// or list values until the next --flag).
#pragma once

#include <stdint.h>

typedef struct nm_args {
    const char *cmd;            // subcommand name, for messages
    int n;                      // parsed entries
    const char *keys[256];      // flag names without "--"
    const char *vals[256];      // value, or NULL for a boolean flag
    const char *positional[64]; // arguments that are not flags
    int n_positional;
} nm_args;

// value_flags: NULL-terminated names taking a value; bool_flags: NULL-terminated switches.
// Returns 0, or prints "<cmd>: unknown flag --x" and returns -1.
int nm_args_parse(nm_args *a, const char *cmd, int argc, char **argv, const char *const *value_flags,
                  const char *const *bool_flags);
const char *nm_args_str(const nm_args *a, const char *key, const char *dflt);
int nm_args_has(const nm_args *a, const char *key);
// Parse as integer/float; prints the flag and value and returns -1 on garbage.
int nm_args_i64(const nm_args *a, const char *key, int64_t dflt, int64_t *out);
int nm_args_f64(const nm_args *a, const char *key, double dflt, double *out);
// All values of a repeated flag (e.g. --input a --input b, or --input a b c).
int nm_args_all(const nm_args *a, const char *key, const char **out, int max);
