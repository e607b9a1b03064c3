// rope.c: rotary position embedding on adjacent channel pairs (dsv3-spec 4.2), in place.
//   y_{2i} = x_{2i} cos - x_{2i+1} sin,  y_{2i+1} = x_{2i} sin + x_{2i+1} cos
// on channels [offset, offset+Dr) of every head, angle from the token's position t (0-based
// within its sequence). Half-split (NeoX) rotation is deliberately not offered: it breaks HF
// and llama.cpp parity on the checkpoint layout (dsv3-spec 9.1). cos/sin tables (T, Dr/2)
// already include any YaRN attention factor.
#include "core/check.h"
#include "ops/cpu/cpu_ops.h"

// x(B,T,n_heads,head_dim) rotated in place by +angle (sign = 1) or -angle (sign = -1).
static void rotate(float *x, const float *cos, const float *sin, int64_t B, int64_t T, int64_t n_heads,
                   int64_t head_dim, int64_t offset, int64_t Dr, float sign) {
    NM_CHECK(B >= 0 && T >= 0 && n_heads >= 0, "rope shape");
    // (NM_CHECK pastes the condition into its format string, so no '%' operator inside it)
    int64_t dr_odd = Dr % 2;
    NM_CHECK(Dr >= 0 && dr_odd == 0 && offset >= 0 && offset + Dr <= head_dim,
             "rope channels [%lld, %lld) of head_dim %lld (Dr must be even)", (long long)offset,
             (long long)(offset + Dr), (long long)head_dim);
    int64_t half = Dr / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T; t++) {
            const float *c = cos + t * half, *s = sin + t * half;
            for (int64_t h = 0; h < n_heads; h++) {
                float *v = x + ((b * T + t) * n_heads + h) * head_dim + offset;
                for (int64_t i = 0; i < half; i++) {
                    float x0 = v[2 * i], x1 = v[2 * i + 1], si = sign * s[i];
                    v[2 * i] = x0 * c[i] - x1 * si;
                    v[2 * i + 1] = x0 * si + x1 * c[i];
                }
            }
        }
    }
}

void nm_cpu_rope_forward(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                         int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr) {
    rotate(x, cos, sin, B, T, n_heads, head_dim, offset, Dr, 1.0f);
}

// The rotation is orthogonal, so its backward is the transpose = the rotation by -angle:
//   dx_{2i} = g_{2i} cos + g_{2i+1} sin,  dx_{2i+1} = -g_{2i} sin + g_{2i+1} cos.
void nm_cpu_rope_backward(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr) {
    rotate(dx, cos, sin, B, T, n_heads, head_dim, offset, Dr, -1.0f);
}
