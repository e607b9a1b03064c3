// test_parallel.c: nm_parallel_for (core/parallel.h), the host loops' threads: every index of
// [0, n) handed out exactly once, in pieces of at most `grain`, for n below, at and above the
// grain, 1 to 8 threads (and the default), n = 0; and nm_parallel_threads follows
// OMP_NUM_THREADS. And nm_coop (core/coop.h), the paired micro-batches' two jobs on one thread:
// the turns in the order the pauses give them, a pause after the other job has returned a no-op,
// deep recursion on a job's stack, many runs on one context.
#include <stdatomic.h>
#include <string.h>
#include <stdlib.h>

#include "core/check.h"
#include "core/coop.h"
#include "core/parallel.h"
#include "test_util.h"

typedef struct seen {
    atomic_int *hits;           // (n) how often each index ran
    int64_t grain;
    atomic_int too_long;        // pieces longer than grain
} seen;

static void mark(void *ctx, int64_t begin, int64_t end) {
    seen *s = ctx;
    if (end - begin > s->grain) atomic_fetch_add(&s->too_long, 1);
    for (int64_t i = begin; i < end; i++) atomic_fetch_add(&s->hits[i], 1);
}

static void check(int64_t n, int64_t grain, int threads) {
    seen s = {.hits = nm_calloc((size_t)(n > 0 ? n : 1), sizeof(atomic_int)), .grain = grain};
    atomic_init(&s.too_long, 0);
    nm_parallel_for(n, grain, threads, mark, &s);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; i++) wrong += atomic_load(&s.hits[i]) != 1;
    EXPECT(wrong == 0, "n %lld grain %lld threads %d: %lld indices not run exactly once", (long long)n,
           (long long)grain, threads, (long long)wrong);
    // one thread (or one piece) runs the whole range in one call, by the contract (threads 0:
    // the default, one where OMP_NUM_THREADS=1 as under valgrind.sh)
    int effective = threads > 0 ? threads : nm_parallel_threads();
    int whole = effective == 1 || n <= grain;
    EXPECT(whole || atomic_load(&s.too_long) == 0, "n %lld grain %lld threads %d: pieces longer than the grain",
           (long long)n, (long long)grain, threads);
    nm_free(s.hits);
}

// A job that writes its steps into a shared log, pausing `pauses` times.
typedef struct coop_log {
    nm_coop *c;
    char *log;
    int *at;
    char name;
    int pauses;
    int depth;                  // recursion on the job's stack before the pauses
} coop_log;

static int deep(int n) {
    volatile char frame[1024];  // 1 KiB a frame
    memset((char *)frame, n & 0x7f, sizeof frame);
    return n == 0 ? frame[0] : deep(n - 1) + frame[1];
}

static void coop_job_fn(void *ctx) {
    coop_log *j = ctx;
    if (j->depth) deep(j->depth);
    for (int i = 0; i < j->pauses; i++) {
        j->log[(*j->at)++] = j->name;
        nm_coop_pause(j->c);
    }
    j->log[(*j->at)++] = (char)(j->name - 'a' + 'A');  // its end
}

static void check_coop(void) {
    nm_coop *c;
    nm_error err;
    EXPECT(nm_coop_create(&c, 0, &err) == 0, "nm_coop_create: %s", err.msg);
    EXPECT(nm_coop_pause(c) == 0.0, "a pause outside a run did something");
    // a pauses 3 times, b twice: a b a b a B A (b ends first; a's last pause returns at once)
    const struct { int pa, pb; const char *want; } cases[] = {
        {3, 2, "ababaBA"}, {0, 2, "AbbB"}, {2, 0, "aBaA"}, {0, 0, "AB"}, {1, 1, "abAB"},
    };
    for (int round = 0; round < 50; round++) {  // one context, many runs
        for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
            char log[32] = {0};
            int at = 0;
            coop_log a = {c, log, &at, 'a', cases[k].pa, round == 0 ? 4096 : 0};  // 4 MiB deep on its stack
            coop_log b = {c, log, &at, 'b', cases[k].pb, 0};
            double ran[2] = {-1, -1};
            nm_coop_run(c, coop_job_fn, &a, coop_job_fn, &b, ran);
            EXPECT(strcmp(log, cases[k].want) == 0, "coop case %zu: turns %s, expected %s", k, log, cases[k].want);
            EXPECT(ran[0] >= 0 && ran[1] >= 0, "coop case %zu: run seconds %g %g", k, ran[0], ran[1]);
        }
    }
    nm_coop_destroy(c);
}

int main(void) {
    check_coop();
    const int64_t sizes[] = {0, 1, 7, 64, 65, 1000, 100003};
    const int64_t grains[] = {1, 4, 64, 4096};
    for (size_t a = 0; a < sizeof sizes / sizeof *sizes; a++)
        for (size_t b = 0; b < sizeof grains / sizeof *grains; b++)
            for (int threads = 0; threads <= 8; threads++) check(sizes[a], grains[b], threads);
    setenv("OMP_NUM_THREADS", "3", 1);
    EXPECT(nm_parallel_threads() == 3, "OMP_NUM_THREADS=3 gave %d", nm_parallel_threads());
    setenv("OMP_NUM_THREADS", "0", 1);
    EXPECT(nm_parallel_threads() >= 1, "OMP_NUM_THREADS=0 gave %d", nm_parallel_threads());
    if (failures) {
        fprintf(stderr, "test_parallel: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_parallel: %zu shapes x 9 thread counts, every index once; coop turns: ok\n",
           (sizeof sizes / sizeof *sizes) * (sizeof grains / sizeof *grains));
    return 0;
}
