// parallel.c: nm_parallel_for on POSIX threads (parallel.h).
#include "core/parallel.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/check.h"

typedef struct loop {
    int64_t n, grain;
    void (*body)(void *ctx, int64_t begin, int64_t end);
    void *ctx;
    atomic_int_fast64_t next;   // the first index nobody has taken
} loop;

static void *worker(void *arg) {
    loop *l = arg;
    for (;;) {
        int64_t begin = atomic_fetch_add(&l->next, l->grain);
        if (begin >= l->n) return NULL;
        l->body(l->ctx, begin, begin + l->grain < l->n ? begin + l->grain : l->n);
    }
}

int nm_parallel_threads(void) {
    const char *env = getenv("OMP_NUM_THREADS");
    long n = env ? strtol(env, NULL, 10) : 0;  // "4,2" (nested lists) reads as 4
    if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 1024 ? 1024 : (int)n;
}

void nm_parallel_for(int64_t n, int64_t grain, int threads, void (*body)(void *ctx, int64_t begin, int64_t end),
                     void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (threads <= 0) threads = nm_parallel_threads();
    int64_t pieces = (n + grain - 1) / grain;
    if (threads > pieces) threads = (int)pieces;
    if (threads <= 1) {
        body(ctx, 0, n);
        return;
    }
    loop l = {.n = n, .grain = grain, .body = body, .ctx = ctx};
    atomic_init(&l.next, 0);
    pthread_t *ids = nm_malloc((size_t)(threads - 1) * sizeof(pthread_t));
    int started = 0;
    // A thread that cannot start leaves its share to the others (the caller always works).
    for (int i = 0; i < threads - 1; i++)
        if (pthread_create(&ids[started], NULL, worker, &l) == 0) started++;
    worker(&l);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
    nm_free(ids);
}
