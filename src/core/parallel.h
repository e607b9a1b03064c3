// parallel.h: a parallel loop for the host-side work outside the backends (parameter
// initialisation, dtype conversion on load, prepare's tokenizer workers). The numeric kernels
// thread inside their backend (src/ops/); these loops are the few others, and they take their
// threads from here (POSIX threads) so that no layer but the CPU backend speaks OpenMP.
#pragma once

#include <stdint.h>

// body(ctx, begin, end) over [0, n) in pieces of `grain` indices (the last may be shorter),
// handed out in order to up to `threads` threads as each finishes its piece (0: nm_parallel_threads()).
// The caller's thread takes part. One thread, or n <= grain, runs body(ctx, 0, n) in the
// caller. A body must not depend on which thread runs which piece.
void nm_parallel_for(int64_t n, int64_t grain, int threads, void (*body)(void *ctx, int64_t begin, int64_t end),
                     void *ctx);

// The default thread count: OMP_NUM_THREADS when it is a positive number (the one setting a
// user already gives for the whole program), else the online CPUs.
int nm_parallel_threads(void);
