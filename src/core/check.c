// check.c: implementation of check.h.
#define _GNU_SOURCE
#include "core/check.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

static _Atomic uint64_t alloc_count;

int nm_error_set(nm_error *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return -1;
}

int nm_error_prefix(nm_error *err, const char *fmt, ...) {
    if (err) {
        char old[sizeof(err->msg)];
        memcpy(old, err->msg, sizeof(old));
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n + 2 < sizeof(err->msg)) {
            // Append ": <old>" by hand; snprintf with both strings trips -Wformat-truncation.
            size_t room = sizeof(err->msg) - (size_t)n - 3;
            size_t len = strnlen(old, room);
            memcpy(err->msg + n, ": ", 2);
            memcpy(err->msg + n + 2, old, len);
            err->msg[n + 2 + len] = 0;
        }
    }
    return -1;
}

void nm_panic(const char *file, int line, const char *fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "nanomegatron: fatal: %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    abort();
}

void nm_check_failed(const char *file, int line, const char *cond, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    nm_panic(file, line, "check failed: %s: %s", cond, msg);
}

void *nm_malloc_impl(size_t size, const char *file, int line) {
    void *p = malloc(size ? size : 1);
    if (!p) nm_panic(file, line, "out of memory allocating %zu bytes", size);
    atomic_fetch_add(&alloc_count, 1);
    return p;
}

void *nm_calloc_impl(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) nm_panic(file, line, "out of memory allocating %zu x %zu bytes", n, size);
    atomic_fetch_add(&alloc_count, 1);
    return p;
}

void *nm_realloc_impl(void *p, size_t size, const char *file, int line) {
    void *q = realloc(p, size ? size : 1);
    if (!q) nm_panic(file, line, "out of memory reallocating %zu bytes", size);
    atomic_fetch_add(&alloc_count, 1);
    return q;
}

void *nm_aligned_alloc_impl(size_t size, const char *file, int line) {
    size_t rounded = (size + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (!p) nm_panic(file, line, "out of memory allocating %zu aligned bytes", size);
    memset(p, 0, rounded);
    atomic_fetch_add(&alloc_count, 1);
    return p;
}

void nm_free(void *p) { free(p); }

void nm_host_discard(void *p, size_t bytes) {
    if (!bytes) return;
    long page_size = sysconf(_SC_PAGESIZE);
    size_t page = page_size > 0 ? (size_t)page_size : 4096;
    uintptr_t lo = (uintptr_t)p, hi = lo + bytes;
    uintptr_t first = (lo + page - 1) / page * page, last = hi / page * page;  // whole pages inside
    if (first >= last) {
        memset(p, 0, bytes);
        return;
    }
    memset(p, 0, first - lo);
    memset((void *)last, 0, hi - last);
    // Where the kernel refuses (memory not ours to advise), the zeros are written instead: the
    // contract is the zeros, the memory given back is the bonus.
    if (madvise((void *)first, last - first, MADV_DONTNEED) != 0) memset((void *)first, 0, last - first);
}

uint64_t nm_alloc_count(void) { return atomic_load(&alloc_count); }

char *nm_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = nm_malloc(n);
    memcpy(d, s, n);
    return d;
}
