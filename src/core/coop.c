// coop.c: two jobs on one thread (coop.h), on ucontext: each job on a stack of its own, mapped
// once with a guard page below it; the caller's context waits while a run is in progress.
#define _DEFAULT_SOURCE  // MAP_ANONYMOUS, MAP_NORESERVE (Linux, BSDs)
#include "core/coop.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "core/check.h"

// AddressSanitizer tracks one stack per thread: told of each switch, it checks the job's stack
// as the stack it is (else it reports the other's frames as overflows).
#if defined(__SANITIZE_ADDRESS__)
#define NM_COOP_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NM_COOP_ASAN 1
#endif
#endif
#ifdef NM_COOP_ASAN
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old, size_t *size_old);
#endif

typedef struct coop_job {
    ucontext_t ctx;
    void *map;                  // the mapping: a guard page, then the stack
    char *stack;
    size_t stack_bytes;
    void (*fn)(void *);
    void *arg;
    int done;
    double ran_s;
} coop_job;

struct nm_coop {
    ucontext_t caller;
    coop_job job[2];
    int current;                // the job running now (during a run)
    int running;                // a run is in progress
    int from_caller;            // the switch in progress comes from the caller
    double since;               // when the current job got the thread
    size_t page;
#ifdef NM_COOP_ASAN
    const void *caller_bottom;  // the caller's stack, for the switches back to it
    size_t caller_size;
#endif
};

static double coop_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// The switch from the context `from` to `to`, whose stack is (bottom, size) (the caller's
// stack: NULL, as AddressSanitizer recorded it).
static void coop_switch(nm_coop *c, ucontext_t *from, ucontext_t *to, const void *bottom, size_t size) {
#ifdef NM_COOP_ASAN
    void *fake = NULL;
    if (!bottom) bottom = c->caller_bottom, size = c->caller_size;
    __sanitizer_start_switch_fiber(&fake, bottom, size);
    swapcontext(from, to);
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#else
    (void)c, (void)bottom, (void)size;
    swapcontext(from, to);
#endif
}

static _Thread_local nm_coop *coop_starting;

static void coop_entry(void) {
    nm_coop *c = coop_starting;
#ifdef NM_COOP_ASAN
    // the first switch into a job: the stack it came from is the caller's when the run started it
    const void *from_bottom;
    size_t from_size;
    __sanitizer_finish_switch_fiber(NULL, &from_bottom, &from_size);
    if (c->from_caller) c->caller_bottom = from_bottom, c->caller_size = from_size;
#endif
    coop_job *j = &c->job[c->current];
    j->fn(j->arg);
    j->done = 1;
    double now = coop_clock();
    j->ran_s += now - c->since;
    c->since = now;
    // back to the caller (uc_link), which hands the thread to the other job if it is not done
#ifdef NM_COOP_ASAN
    __sanitizer_start_switch_fiber(NULL, c->caller_bottom, c->caller_size);
#endif
}

int nm_coop_create(nm_coop **out, size_t stack_bytes, nm_error *err) {
    nm_coop *c = nm_calloc(1, sizeof(nm_coop));
    long page = sysconf(_SC_PAGESIZE);
    c->page = page > 0 ? (size_t)page : 4096;
    if (stack_bytes == 0) stack_bytes = (size_t)16 << 20;
    stack_bytes = (stack_bytes + c->page - 1) / c->page * c->page;
    for (int i = 0; i < 2; i++) {
        void *p = mmap(NULL, stack_bytes + c->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            nm_coop_destroy(c);
            return nm_error_set(err, "paired micro-batches: mapping a %zu MiB stack failed: %s", stack_bytes >> 20,
                                strerror(e));
        }
        c->job[i].map = p;
        c->job[i].stack = (char *)p + c->page;
        c->job[i].stack_bytes = stack_bytes;
        if (mprotect(p, c->page, PROT_NONE) != 0) {  // a job that overflows its stack faults here
            int e = errno;
            nm_coop_destroy(c);
            return nm_error_set(err, "paired micro-batches: protecting a stack's guard page failed: %s", strerror(e));
        }
    }
    *out = c;
    return 0;
}

void nm_coop_destroy(nm_coop *c) {
    if (!c) return;
    for (int i = 0; i < 2; i++)
        if (c->job[i].map) munmap(c->job[i].map, c->job[i].stack_bytes + c->page);
    nm_free(c);
}

// Job i's context, made to start at coop_entry on its stack and to return to the caller.
static void coop_prepare(nm_coop *c, int i, void (*fn)(void *), void *arg) {
    coop_job *j = &c->job[i];
    j->fn = fn;
    j->arg = arg;
    j->done = 0;
    j->ran_s = 0.0;
    NM_CHECK(getcontext(&j->ctx) == 0, "getcontext failed");
    j->ctx.uc_stack.ss_sp = j->stack;
    j->ctx.uc_stack.ss_size = j->stack_bytes;
    j->ctx.uc_link = &c->caller;
    makecontext(&j->ctx, coop_entry, 0);
}

void nm_coop_run(nm_coop *c, void (*first)(void *), void *first_ctx, void (*second)(void *), void *second_ctx,
                 double run_s[2]) {
    NM_CHECK(!c->running, "nm_coop_run inside a run");
    coop_prepare(c, 0, first, first_ctx);
    coop_prepare(c, 1, second, second_ctx);
    int started[2] = {0, 0};
    c->running = 1;
    c->current = 0;
    c->since = coop_clock();
    // Each return here is a job's end (uc_link): the other, if not done, gets the thread.
    while (!(c->job[0].done && c->job[1].done)) {
        int i = c->job[c->current].done ? 1 - c->current : c->current;
        c->current = i;
        if (!started[i]) started[i] = 1, coop_starting = c;
        c->from_caller = 1;
        coop_switch(c, &c->caller, &c->job[i].ctx, c->job[i].stack, c->job[i].stack_bytes);
    }
    c->running = 0;
    if (run_s) run_s[0] = c->job[0].ran_s, run_s[1] = c->job[1].ran_s;
}

double nm_coop_pause(nm_coop *c) {
    if (!c || !c->running) return 0.0;
    int me = c->current, other = 1 - me;
    if (c->job[other].done) return 0.0;
    double now = coop_clock();
    c->job[me].ran_s += now - c->since;
    c->since = now;
    coop_starting = c;  // read by coop_entry if the other job starts now
    c->from_caller = 0;
    c->current = other;
    coop_switch(c, &c->job[me].ctx, &c->job[other].ctx, c->job[other].stack, c->job[other].stack_bytes);
    // back: the other job paused or returned (its seconds are counted)
    return coop_clock() - now;
}
