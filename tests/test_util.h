// test_util.h: what every C test shares: a non-fatal EXPECT that counts failures (each test
// returns failures != 0 at the end, after reporting every broken expectation, not just the
// first). One translation unit per test, so the static counter is per test program.
#pragma once

#ifndef _DEFAULT_SOURCE  // a test may have asked for it first, before its own includes
#define _DEFAULT_SOURCE  // dirent's d_name, getpid
#endif
#include <dirent.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static int failures;

#define EXPECT(cond, ...)                                                     \
    do {                                                                      \
        if (!(cond)) {                                                        \
            failures++;                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)

// The test's random seed: NM_TEST_SEED if set (to replay a failure), else fresh per run
// (tests use fresh random inputs); printed either way.
static inline uint64_t test_seed(const char *test_name) {
    const char *env = getenv("NM_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
    printf("%s: seed %llu (NM_TEST_SEED to reproduce)\n", test_name, (unsigned long long)seed);
    return seed;
}

// rm -rf of a test's scratch directory.
static inline void test_remove_tree(const char *dir) {
    DIR *dp = opendir(dir);
    if (!dp) return;
    struct dirent *e;
    char p[1024];
    while ((e = readdir(dp))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (strlen(dir) + strlen(e->d_name) + 2 > sizeof(p)) continue;  // test dirs are short
        snprintf(p, sizeof(p), "%.700s/%.255s", dir, e->d_name);
        if (unlink(p) != 0) test_remove_tree(p);
    }
    closedir(dp);
    rmdir(dir);
}

// --- skipping: return test_skip...(...) from main (77 is ctest's SKIP_RETURN_CODE) ----------
// Two kinds of skip (tests/skip.sh and tests/nm_skip.py are the shell and Python twins).
// test_skip_machine: a reason no setup fixes on this machine (the CPU lacks an ISA, no GPU);
// prints "SKIP(machine): <reason>" and returns 77, in CI too. test_skip: anything else (a
// missing package, binary or file); prints "SKIP: <reason>" and returns 77, but under CI=true
// prints a FAIL line and returns 1: CI is where the suite runs whole, and a dependency missing
// there is a setup bug that a skip would hide.
static inline int test_in_ci(void) {
    const char *ci = getenv("CI");
    return ci && (strcasecmp(ci, "true") == 0 || strcmp(ci, "1") == 0);
}

static inline int test_skip_machine(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("SKIP(machine): ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    return 77;
}

static inline int test_skip(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int ci = test_in_ci();
    FILE *out = ci ? stderr : stdout;
    fprintf(out, ci ? "FAIL: skipped under CI=true: " : "SKIP: ");
    vfprintf(out, fmt, ap);
    fprintf(out, ci ? " (in CI only a machine reason may skip: install what is missing)\n" : "\n");
    va_end(ap);
    return ci ? 1 : 77;
}
