// test_util.h: what every C test shares: a non-fatal EXPECT that counts failures (each test
// returns failures != 0 at the end, after reporting every broken expectation, not just the
// first). One translation unit per test, so the static counter is per test program.
#pragma once

#define _DEFAULT_SOURCE  // dirent's d_name, getpid
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
