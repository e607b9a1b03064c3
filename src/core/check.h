// check.h: the one fatal path, always-on checks, checked allocation and file helpers,
// and the recoverable error type used at every API boundary.
//
// Two kinds of failure (style.md 3.6):
//  - programmer errors and broken invariants panic (NM_CHECK), NDEBUG or not;
//  - bad user input (configs, files, flags) is returned as a non-zero status with an
//    nm_error filled with a message naming the file, field and value. Library code never
//    calls exit().
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// --- recoverable errors --------------------------------------------------------------------

typedef struct nm_error {
    char msg[2048];             // human readable, names file / field / value
} nm_error;

// Formats the message into err (if not NULL) and returns -1, so callers can write
// `return nm_error_set(err, "...");`.
int nm_error_set(nm_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Prefixes an existing message ("while loading X: <old message>"); returns -1.
int nm_error_prefix(nm_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// --- fatal path ----------------------------------------------------------------------------

_Noreturn void nm_panic(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define NM_PANIC(...) nm_panic(__FILE__, __LINE__, __VA_ARGS__)

// Reports "check failed: <cond>: <message>"; the condition text travels as an argument, not
// as part of the format, so a '%' in it (E % G == 0) is printed, not interpreted.
_Noreturn void nm_check_failed(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

// Always compiled in (unlike assert); wrapped in do/while unlike ggml's bare if.
#define NM_CHECK(cond, ...)                                                   \
    do {                                                                      \
        if (!(cond)) nm_check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__); \
    } while (0)

// --- checked allocation --------------------------------------------------------------------

void *nm_malloc_impl(size_t size, const char *file, int line);
void *nm_calloc_impl(size_t n, size_t size, const char *file, int line);
void *nm_realloc_impl(void *p, size_t size, const char *file, int line);
// 64-byte aligned (cache line / AVX-512), zero-filled; free with nm_free.
void *nm_aligned_alloc_impl(size_t size, const char *file, int line);

#define nm_malloc(size)          nm_malloc_impl((size), __FILE__, __LINE__)
#define nm_calloc(n, size)       nm_calloc_impl((n), (size), __FILE__, __LINE__)
#define nm_realloc(p, size)      nm_realloc_impl((p), (size), __FILE__, __LINE__)
#define nm_aligned_alloc(size)   nm_aligned_alloc_impl((size), __FILE__, __LINE__)
void nm_free(void *p);
// Sets bytes at p to zero and gives the whole pages among them back to the system (madvise
// MADV_DONTNEED on private anonymous memory: they read as zero and cost nothing until written
// again), so a buffer that is written, reduced and dropped once per micro-batch (ZeRO-2's
// gradients) stays resident only while it is in use.
void nm_host_discard(void *p, size_t bytes);

// Counts every allocation made through the wrappers above (the zero-allocations-in-the-
// step-loop test reads it).
uint64_t nm_alloc_count(void);

char *nm_strdup(const char *s);
