// test_parallel.c: nm_parallel_for (core/parallel.h), the host loops' threads: every index of
// [0, n) handed out exactly once, in pieces of at most `grain`, for n below, at and above the
// grain, 1 to 8 threads (and the default), n = 0; and nm_parallel_threads follows
// OMP_NUM_THREADS.
#include <stdatomic.h>
#include <stdlib.h>

#include "core/check.h"
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

int main(void) {
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
    printf("test_parallel: %zu shapes x 9 thread counts, every index once: ok\n",
           (sizeof sizes / sizeof *sizes) * (sizeof grains / sizeof *grains));
    return 0;
}
