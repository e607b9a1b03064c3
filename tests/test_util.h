// test_util.h: what every C test shares: a non-fatal EXPECT that counts failures (each test
// returns failures != 0 at the end, after reporting every broken expectation, not just the
// first). One translation unit per test, so the static counter is per test program.
#pragma once

#include <stdio.h>

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
