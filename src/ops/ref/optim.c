// optim.c: the reference optimizer ops (ops.h): one loop per op in the order the contract
// reads, one thread. The norm's partials use the contract's eight lanes, so they are the
// definition the CPU backend's must equal bit for bit.
#include <math.h>

#include "core/check.h"
#include "ops/bf16.h"
#include "ops/ref/ref_ops.h"

void nm_ref_sumsq_chunks(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n) {
    for (int64_t c = 0; c < n; c++) {
        const float *g = x + chunks[c].offset;
        double lane[8] = {0};
        for (size_t i = 0; i < chunks[c].len; i++) lane[i % 8] += (double)g[i] * (double)g[i];
        partials[c] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
}

void nm_ref_scale_chunks(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n) {
    for (int64_t c = 0; c < n; c++)
        for (size_t i = 0; i < chunks[c].len; i++) x[chunks[c].offset + i] *= s;
}

int64_t nm_ref_first_nonfinite(const nm_ops *be, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

static float load(const void *base, nm_dtype t, size_t i) {
    return t == NM_BF16 ? nm_bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static void store(void *base, nm_dtype t, size_t i, float x) {
    if (t == NM_BF16) ((uint16_t *)base)[i] = nm_f32_to_bf16(x);
    else ((float *)base)[i] = x;
}

// torch.optim.AdamW's single-tensor update, one float at a time (train/optim.h).
void nm_ref_adamw_chunks(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                         const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k) {
    NM_CHECK((m_type == NM_F32 || m_type == NM_BF16) && (v_type == NM_F32 || v_type == NM_BF16),
             "adamw moment types %d %d", (int)m_type, (int)v_type);
    for (int64_t c = 0; c < n; c++) {
        const float dm = chunks[c].decay ? k->decay_mul : 1.0f;
        for (size_t i = 0; i < chunks[c].len; i++) {
            const size_t p = chunks[c].offset + i, s = chunks[c].state + i;
            float g = grads[p] * k->grad_scale;
            float mi = load(m, m_type, s) * k->b1 + g * k->one_minus_b1;
            float vi = load(v, v_type, s) * k->b2 + k->one_minus_b2 * g * g;
            float denom = sqrtf(vi) / k->bc2_sqrt + k->eps;
            params[p] = params[p] * dm + k->neg_step_size * mi / denom;
            store(m, m_type, s, mi);
            store(v, v_type, s, vi);
        }
    }
}

void nm_ref_router_bias_update(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma) {
    NM_CHECK(E > 0, "router_bias_update E = %lld", (long long)E);
    double sum = 0.0;
    for (int64_t e = 0; e < E; e++) sum += (double)counts[e];
    const double mean = sum / (double)E;
    for (int64_t e = 0; e < E; e++) {
        const double d = mean - (double)counts[e];
        bias[e] += gamma * (d > 0.0 ? 1.0f : d < 0.0 ? -1.0f : 0.0f);
    }
}
