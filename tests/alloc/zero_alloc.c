// zero_alloc.c: the training step loop allocates nothing.
//
// Linked with -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=aligned_alloc (see
// tests.cmake), so every heap allocation made by the project's code, in any module, is
// counted. Steps 1-2 may allocate (first use of each shape, the first validation pass);
// steps 3..N must not. Shared libraries (OpenBLAS, libgomp) are not counted: their
// allocations are not ours to control (nor MPI's: under mpirun, with extra overrides such as
// expert_parallel_size=2 on the command line, tests/test_dist_train.sh checks the
// parallel step loop the same way).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nanomegatron.h"

static long n_allocs;
void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t s);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t a, size_t n);
void *__wrap_malloc(size_t n) { n_allocs++; return __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t s) { n_allocs++; return __real_calloc(n, s); }
void *__wrap_realloc(void *p, size_t n) { n_allocs++; return __real_realloc(p, n); }
void *__wrap_aligned_alloc(size_t a, size_t n) { n_allocs++; return __real_aligned_alloc(a, n); }

// The run directory goes whatever the outcome: a test leaves nothing in /tmp.
static void remove_run_dir(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
}

int main(int argc, char **argv) {
    const char *root = getenv("NM_ROOT");
    if (!root) {
        fprintf(stderr, "NM_ROOT not set\n");
        return 1;
    }
    char dir[] = "/tmp/nm_zero_alloc_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char path[4096], model_path[4200];
    snprintf(path, sizeof(path), "%s/configs/tiny-train.json", root);
    snprintf(model_path, sizeof(model_path), "model=%s/configs/tiny.json", root);
    // Small shapes keep the test fast; eval every 2 steps exercises validation in the loop.
    const char *overrides[32] = {model_path, "seq_len=32", "micro_batch=2", "global_batch=4", "steps=6",
                                 "data.synthetic_tokens=65536", "log.eval_every=2", "log.eval_batches=1",
                                 "log.log_every=1", "checkpoint.save_every=0"};
    int n_over = 10;
    int recompute = 0;  // --recompute: the trainer's option of that name (whole blocks)
    for (int i = 1; i < argc && n_over < 32; i++) {
        if (strcmp(argv[i], "--recompute") == 0) recompute = 1;
        else overrides[n_over++] = argv[i];
    }
    nm_error err;
    nm_train_config cfg;
    if (nm_train_config_load(&cfg, path, overrides, n_over, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        remove_run_dir(dir);
        return 1;
    }
    nm_trainer_options opts = {.run_dir = dir, .quiet = 1, .recompute = recompute};
    nm_trainer *t;
    if (nm_trainer_create(&t, &cfg, &opts, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        nm_train_config_free(&cfg);
        remove_run_dir(dir);
        return 1;
    }
    nm_step_metrics m;
    int fail = 0;
    long before = 0;
    for (int step = 1; step <= 6; step++) {
        if (step == 3) before = n_allocs;
        if (nm_trainer_step(t, &m, &err) <= 0) {
            fprintf(stderr, "step %d: %s\n", step, err.msg);
            fail = 1;
            break;
        }
    }
    long during = n_allocs - before;
    printf("allocations during steps 3-6: %ld\n", during);
    if (!fail && during != 0) {
        fprintf(stderr, "FAIL: the step loop allocated %ld times\n", during);
        fail = 1;
    }
    // bf16: every activation a bf16 GEMM reads had its twin placed when the arena was laid out
    long long misses = (long long)nm_model_bf16_twin_misses(nm_trainer_model(t));
    printf("bf16 twins: %lld bytes, %lld roundings without one\n", (long long)nm_model_bf16_twin_bytes(nm_trainer_model(t)),
           misses);
    if (!fail && misses != 0) {
        fprintf(stderr, "FAIL: %lld roundings found no bf16 twin placed by the layout\n", misses);
        fail = 1;
    }
    nm_trainer_destroy(t);
    nm_train_config_free(&cfg);
    remove_run_dir(dir);
    return fail;
}
