// coop.h: two jobs on one thread, taking turns where one would wait (cooperative coroutines).
//
// The paired micro-batches (the trainer's moe_pair_micro_batches, DeepSeek's DualPipe overlap)
// run one micro-batch's forward beside the previous one's backward: each job runs until it has
// started an all-to-all and would wait for it, then hands the thread to the other
// (nm_coop_pause), so that one job's all-to-all is in flight while the other computes. The
// turns are taken at the same points on every rank, whatever the timing, so every rank issues
// its collectives in the same order. One OS thread: the backends' thread pools and MPI's
// thread level (funneled) see one caller, and only one job runs at a time.
#pragma once

#include "core/check.h"

typedef struct nm_coop nm_coop;

// A pair's context: stacks for the two jobs (stack_bytes each; 0: 16 MiB), reusable for any
// number of runs. Returns -1 with err set if the stacks cannot be mapped.
int nm_coop_create(nm_coop **out, size_t stack_bytes, nm_error *err);
void nm_coop_destroy(nm_coop *c);

// Runs first(first_ctx) and second(second_ctx) to their ends: first starts, and each pause
// hands the thread to the other job unless it has returned. Returns when both have. run_s[0]
// and run_s[1] (may be NULL) get the seconds each job ran.
void nm_coop_run(nm_coop *c, void (*first)(void *), void *first_ctx, void (*second)(void *), void *second_ctx,
                 double run_s[2]);

// From inside a job of c: the other job runs until it pauses or returns; a no-op once it has
// returned, and outside a run (c NULL, or no run in progress). Returns the seconds the other
// job ran meanwhile.
double nm_coop_pause(nm_coop *c);
