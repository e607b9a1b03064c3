// elementwise.c: memory and elementwise ops of the CPU backend (zero, axpy, 2-D copy/add) and
// the token embedding (forward gather, backward scatter-add). Plain loops the compiler
// vectorises, OpenMP on the outer loop.
//
// Determinism (design.md 5b): the embedding backward adds many token rows into the same
// vocabulary row, so it must not race or depend on the thread count. It is parallelised over
// column slabs of demb: every thread walks all N tokens in order but owns its columns, so each
// element receives its additions in token order whatever the number of threads.
#include <string.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"

// Columns per slab of the column-parallel scatter-adds: 64 floats = 4 cache lines, so two
// threads never write the same line when rows are 64-byte aligned.
#define SLAB 64

void nm_cpu_zero(const nm_ops *be, float *x, int64_t n) {
    NM_CHECK(n >= 0, "n=%lld", (long long)n);
    if (n == 0) return;
    memset(x, 0, (size_t)n * sizeof(float));
}

void nm_cpu_axpy(const nm_ops *be, float *y, const float *x, float alpha, int64_t n) {
    NM_CHECK(n >= 0, "n=%lld", (long long)n);
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

void nm_cpu_copy_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols) {
    NM_CHECK(rows >= 0 && cols >= 0 && ld_dst >= cols && ld_src >= cols, "copy_2d shape");
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; r++) memcpy(dst + r * ld_dst, src + r * ld_src, (size_t)cols * sizeof(float));
}

void nm_cpu_add_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                   int64_t cols) {
    NM_CHECK(rows >= 0 && cols >= 0 && ld_dst >= cols && ld_src >= cols, "add_2d shape");
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        float *d = dst + r * ld_dst;
        const float *s = src + r * ld_src;
        for (int64_t c = 0; c < cols; c++) d[c] += s[c];
    }
}

// --- embedding --------------------------------------------------------------------------------

// out(N,D) (=) emb(V,D)[tokens(N)]
void nm_cpu_embedding_forward(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                              int64_t D) {
    NM_CHECK(N >= 0 && D >= 0, "embedding shape");
#pragma omp parallel for schedule(static) if (N * D > (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        // A negative id is a row another vocabulary-parallel rank holds: zeros here.
        if (tokens[n] < 0) memset(out + n * D, 0, (size_t)D * sizeof(float));
        else memcpy(out + n * D, emb + (int64_t)tokens[n] * D, (size_t)D * sizeof(float));
    }
}

// Forward: out[n] = emb[tokens[n]]  =>  demb[tokens[n]] += dout[n], in token order per column.
void nm_cpu_embedding_backward(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                               int64_t D) {
    NM_CHECK(N >= 0 && D >= 0, "embedding shape");
    int64_t n_slabs = (D + SLAB - 1) / SLAB;
#pragma omp parallel for schedule(static) if (N * D > (1 << 16))
    for (int64_t s = 0; s < n_slabs; s++) {
        int64_t c0 = s * SLAB, c1 = c0 + SLAB < D ? c0 + SLAB : D;
        for (int64_t n = 0; n < N; n++) {
            if (tokens[n] < 0) continue;  // held by another vocabulary-parallel rank
            float *d = demb + (int64_t)tokens[n] * D;
            const float *g = dout + n * D;
            for (int64_t c = c0; c < c1; c++) d[c] += g[c];
        }
    }
}
