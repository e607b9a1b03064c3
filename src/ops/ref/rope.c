// rope.c: reference rotary position embedding on adjacent channel pairs (dsv3-spec 4.2), in
// place: channels [offset, offset + Dr) of every head, pair i of position t rotated by the
// angle whose cos and sin are cos[t * Dr/2 + i], sin[t * Dr/2 + i]:
//   y_2i = x_2i cos - x_2i+1 sin,   y_2i+1 = x_2i sin + x_2i+1 cos
// The backward is the transpose of the rotation, the rotation by minus the angle.
#include "core/check.h"
#include "ops/ref/ref_ops.h"

// x(B,T,n_heads,head_dim) rotated in place by +angle (sign = 1) or -angle (sign = -1), each
// output formed in double and rounded once.
static void rotate(float *x, const float *cos, const float *sin, int64_t B, int64_t T, int64_t n_heads,
                   int64_t head_dim, int64_t offset, int64_t Dr, double sign) {
    NM_CHECK(B >= 0 && T >= 0 && n_heads >= 0, "rope shape");
    // (NM_CHECK pastes the condition into its message, so no '%' operator inside it)
    const int64_t dr_odd = Dr % 2;
    NM_CHECK(Dr >= 0 && dr_odd == 0 && offset >= 0 && offset + Dr <= head_dim,
             "rope channels [%lld, %lld) of head_dim %lld (Dr must be even)", (long long)offset,
             (long long)(offset + Dr), (long long)head_dim);
    const int64_t half = Dr / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < n_heads; h++) {
                float *v = x + ((b * T + t) * n_heads + h) * head_dim + offset;
                for (int64_t i = 0; i < half; i++) {
                    double c = cos[t * half + i], s = sign * sin[t * half + i], x0 = v[2 * i], x1 = v[2 * i + 1];
                    v[2 * i] = (float)(x0 * c - x1 * s);
                    v[2 * i + 1] = (float)(x0 * s + x1 * c);
                }
            }
}

void nm_ref_rope_forward(const nm_ops *be, float *x, const float *cos, const float *sin, int64_t B, int64_t T,
                         int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr) {
    rotate(x, cos, sin, B, T, n_heads, head_dim, offset, Dr, 1.0);
}

void nm_ref_rope_backward(const nm_ops *be, float *dx, const float *cos, const float *sin, int64_t B, int64_t T,
                          int64_t n_heads, int64_t head_dim, int64_t offset, int64_t Dr) {
    rotate(dx, cos, sin, B, T, n_heads, head_dim, offset, Dr, -1.0);
}
