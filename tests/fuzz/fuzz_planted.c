// fuzz_planted.c: a fuzz target that fails on purpose, for tests/fuzz/check_runner.sh. It
// proves that the runner (run_fuzz_target.sh) turns every kind of libFuzzer finding into a
// test failure: libFuzzer's own exit code for a finding is 77 by default, the suite's
// SKIP_RETURN_CODE, so a crash once showed up as "Skipped".
//
// Any input that starts with "PLANT" fails in the way NM_FUZZ_PLANT names:
//   abort     abort(), as a failed property check in a target does
//   leak      a lost allocation (LeakSanitizer)
//   overflow  a heap read one byte past the end (AddressSanitizer)
//   ubsan     a signed integer overflow (UndefinedBehaviorSanitizer, -fno-sanitize-recover)
// Unset or empty (or any other input), the target does nothing: the runner must pass.
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

// Kept out of the optimiser's sight so the planted bugs happen at -O1.
static void *volatile sink;
static volatile int big = INT_MAX;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *mode = getenv("NM_FUZZ_PLANT");
    if (!mode || !*mode || size < 5 || memcmp(data, "PLANT", 5) != 0) return 0;
    if (!strcmp(mode, "abort")) {
        abort();
    } else if (!strcmp(mode, "leak")) {
        sink = malloc(64);
        sink = NULL;
    } else if (!strcmp(mode, "overflow")) {
        char *p = malloc(size);
        memcpy(p, data, size);
        sink = p;
        volatile char c = p[size];  // one past the end
        (void)c;
        free(p);
    } else if (!strcmp(mode, "ubsan")) {
        volatile int x = big + (int)data[0];  // INT_MAX + 'P' overflows
        (void)x;
    } else {
        fprintf(stderr, "fuzz_planted: NM_FUZZ_PLANT=%s is not one of abort, leak, overflow, ubsan\n", mode);
        abort();
    }
    return 0;
}
