// elementwise.c: the reference memory and elementwise ops (zero, axpy, 2-D copy and add) and the
// token embedding. Each is one plain loop in the order the contract reads; the embedding's
// backward adds token rows into vocabulary rows in token order (ops.h).
#include "core/check.h"
#include "ops/ref/ref_ops.h"

void nm_ref_zero(const nm_ops *be, float *x, int64_t n) {
    NM_CHECK(n >= 0, "zero n=%lld", (long long)n);
    for (int64_t i = 0; i < n; i++) x[i] = 0.0f;
}

// y (+=) alpha * x, in fp32 as the contract states it (one rounding per element, no sum to
// carry in double)
void nm_ref_axpy(const nm_ops *be, float *y, const float *x, float alpha, int64_t n) {
    NM_CHECK(n >= 0, "axpy n=%lld", (long long)n);
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

void nm_ref_copy_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                    int64_t cols) {
    NM_CHECK(rows >= 0 && cols >= 0 && ld_dst >= cols && ld_src >= cols, "copy_2d shape");
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[r * ld_dst + c] = src[r * ld_src + c];
}

void nm_ref_add_2d(const nm_ops *be, float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
                   int64_t cols) {
    NM_CHECK(rows >= 0 && cols >= 0 && ld_dst >= cols && ld_src >= cols, "add_2d shape");
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[r * ld_dst + c] += src[r * ld_src + c];
}

// out(N,D) (=) emb[tokens[n]]; a negative id (a row another vocabulary-parallel rank holds)
// gives a zero row.
void nm_ref_embedding_forward(const nm_ops *be, float *out, const int32_t *tokens, const float *emb, int64_t N,
                              int64_t D) {
    NM_CHECK(N >= 0 && D >= 0, "embedding shape");
    for (int64_t n = 0; n < N; n++)
        for (int64_t d = 0; d < D; d++) out[n * D + d] = tokens[n] < 0 ? 0.0f : emb[(int64_t)tokens[n] * D + d];
}

// demb (+=) dout rows scattered to their tokens' rows, in token order; negative ids skipped.
void nm_ref_embedding_backward(const nm_ops *be, float *demb, const float *dout, const int32_t *tokens, int64_t N,
                               int64_t D) {
    NM_CHECK(N >= 0 && D >= 0, "embedding shape");
    for (int64_t n = 0; n < N; n++) {
        if (tokens[n] < 0) continue;
        for (int64_t d = 0; d < D; d++) demb[(int64_t)tokens[n] * D + d] += dout[n * D + d];
    }
}
