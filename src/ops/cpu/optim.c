// optim.c: the optimizer's ops on the CPU (ops.h: sumsq_chunks, scale_chunks, first_nonfinite,
// adamw_chunks, router_bias_update). train/optim.c makes the chunk list and forms the
// coefficients; these are the loops over the floats, one chunk per OpenMP iteration.
//
// Determinism: every float of the AdamW update is independent, so any thread split gives the
// same bits; the norm's partial of a chunk is computed by one thread in a fixed lane order, and
// the caller adds the partials in chunk order.
#include <math.h>

#include "core/check.h"
#include "ops/bf16.h"
#include "ops/cpu/cpu_ops.h"

// Sum of squares of one chunk in double. Eight interleaved accumulators added in a fixed
// order: the result depends only on the chunk, never on the thread that computes it, and the
// independent lanes let the compiler vectorise without -ffast-math.
static double chunk_sumsq(const float *g, size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) acc[k] += (double)g[i + k] * (double)g[i + k];
    }
    for (; i < n; i++) acc[i & 7] += (double)g[i] * (double)g[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void nm_cpu_sumsq_chunks(const nm_ops *be, double *partials, const float *x, const nm_optim_chunk *chunks, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c++) partials[c] = chunk_sumsq(x + chunks[c].offset, chunks[c].len);
}

void nm_cpu_scale_chunks(const nm_ops *be, float *x, float s, const nm_optim_chunk *chunks, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c++) {
        float *g = x + chunks[c].offset;
        for (size_t i = 0; i < chunks[c].len; i++) g[i] *= s;
    }
}

int64_t nm_cpu_first_nonfinite(const nm_ops *be, const float *x, int64_t n) {
    // Called only once a norm is not finite: a plain scan.
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

// The update of n floats. dm is the decay multiplier (1 for rows without decay). The loop
// vectorises (sqrtf is one vsqrtps because the project builds with -fno-math-errno; without it
// GCC 12 keeps a libm call for negative inputs in the loop and the update ran 2.5x slower,
// scalar); every operation is a correctly rounded IEEE op and nothing contracts to FMA
// (-std=c11), so the floats match torch's op-by-op order exactly.
static void adamw_run(float *p, float *mm, float *vv, const float *g, size_t n, float dm, const nm_adamw_coefs *k) {
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * k->grad_scale;                            // clip_grad_norm_: g.mul_(clip_coef)
        float pi = p[i] * dm;                                       // param.mul_(1 - lr*wd)
        float mi = mm[i] * k->b1 + gi * k->one_minus_b1;            // exp_avg.mul_(b1).add_(g, alpha=1-b1)
        float vi = vv[i] * k->b2 + k->one_minus_b2 * gi * gi;       // exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2)
        float denom = sqrtf(vi) / k->bc2_sqrt + k->eps;             // (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        p[i] = pi + k->neg_step_size * mi / denom;                  // param.addcdiv_(exp_avg, denom, value=-step_size)
        mm[i] = mi;
        vv[i] = vi;
    }
}

// bf16 moments go through fp32 blocks of this many floats on the stack: widened, updated by
// adamw_run, rounded back; each float's operations are those of the fp32 path.
#define MOMENT_BLOCK 1024

void nm_cpu_adamw_chunks(const nm_ops *be, float *params, void *m, nm_dtype m_type, void *v, nm_dtype v_type,
                         const float *grads, const nm_optim_chunk *chunks, int64_t n, const nm_adamw_coefs *k) {
    NM_CHECK((m_type == NM_F32 || m_type == NM_BF16) && (v_type == NM_F32 || v_type == NM_BF16),
             "adamw moment types %d %d", (int)m_type, (int)v_type);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c++) {
        const size_t off = chunks[c].offset, so = chunks[c].state, len = chunks[c].len;
        const float dm = chunks[c].decay ? k->decay_mul : 1.0f;
        if (m_type == NM_F32 && v_type == NM_F32) {
            adamw_run(params + off, (float *)m + so, (float *)v + so, grads + off, len, dm, k);
            continue;
        }
        float mb[MOMENT_BLOCK], vb[MOMENT_BLOCK];
        for (size_t at = 0; at < len; at += MOMENT_BLOCK) {
            const size_t nb = len - at < MOMENT_BLOCK ? len - at : MOMENT_BLOCK;
            uint16_t *m16 = m_type == NM_BF16 ? (uint16_t *)m + so + at : NULL;
            uint16_t *v16 = v_type == NM_BF16 ? (uint16_t *)v + so + at : NULL;
            float *mm = m16 ? mb : (float *)m + so + at, *vv = v16 ? vb : (float *)v + so + at;
            for (size_t i = 0; m16 && i < nb; i++) mm[i] = nm_bf16_to_f32(m16[i]);
            for (size_t i = 0; v16 && i < nb; i++) vv[i] = nm_bf16_to_f32(v16[i]);
            adamw_run(params + off + at, mm, vv, grads + off + at, nb, dm, k);
            for (size_t i = 0; m16 && i < nb; i++) m16[i] = nm_f32_to_bf16(mm[i]);
            for (size_t i = 0; v16 && i < nb; i++) v16[i] = nm_f32_to_bf16(vv[i]);
        }
    }
}

void nm_cpu_router_bias_update(const nm_ops *be, float *bias, const int64_t *counts, int64_t E, float gamma) {
    NM_CHECK(E > 0, "router_bias_update E = %lld", (long long)E);
    double sum = 0.0;
    for (int64_t i = 0; i < E; i++) sum += (double)counts[i];
    const double mean = sum / (double)E;
    for (int64_t i = 0; i < E; i++) {
        double d = mean - (double)counts[i];
        float sign = d > 0.0 ? 1.0f : (d < 0.0 ? -1.0f : 0.0f);
        bias[i] += gamma * sign;
    }
}
