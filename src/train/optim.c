// optim.c: AdamW, gradient norm, clipping and non-finite detection (see optim.h).
//
// Reference: torch.optim.AdamW, torch 1.13 `_single_tensor_adamw`; clipping as
// torch.nn.utils.clip_grad_norm_ (clip_coef = max_norm / (total_norm + 1e-6), clamped to 1).
#include "train/optim.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/bf16.h"

// The OpenMP team's size and this thread's place in it (1 and 0 where the file is built
// without OpenMP, as the fuzz targets build it).
static int team_max(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int team_rank(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// --- lifecycle ---------------------------------------------------------------------------------

static int row_is_optimised(const nm_tensor_spec *r) {
    return !(r->flags & (NM_TENSOR_ROUTER_BIAS | NM_TENSOR_TIED));
}

// The floats [lo, hi) of row i this optimizer holds: all of it unsharded, all or nothing by
// owned (whole rows), or the range pieces begin/end (the distributed optimizer).
typedef struct held_rows {
    const unsigned char *owned; // (n_rows) or NULL
    const int64_t *begin, *end; // (n_rows) or NULL
} held_rows;

static void held(const held_rows *h, const nm_param_table *t, int i, int64_t *lo, int64_t *hi) {
    const nm_tensor_spec *r = &t->rows[i];
    *lo = 0;
    *hi = row_is_optimised(r) ? r->numel : 0;
    if (h->owned && !h->owned[i]) *hi = 0;
    if (h->begin && *hi > 0) {
        *lo = h->begin[i];
        *hi = h->end[i];
    }
}

// Where each row's m and v start (row_state, may be NULL; the state of the row's first held
// float) and how many floats they take. Unsharded, m and v share the parameters' layout
// (checkpoints index them by row offset); sharded, the held pieces are packed, each at an
// NM_PARAM_ALIGN boundary.
static size_t state_layout(const nm_param_table *table, const held_rows *h, size_t *row_state) {
    int sharded = h->owned || h->begin;
    size_t n_state = sharded ? 0 : table->n_floats;
    for (int i = 0; i < table->n_rows; i++) {
        if (row_state) row_state[i] = SIZE_MAX;
        int64_t lo, hi;
        held(h, table, i, &lo, &hi);
        if (hi <= lo) continue;
        if (!sharded) {
            if (row_state) row_state[i] = table->rows[i].offset;
            continue;
        }
        n_state = (n_state + NM_PARAM_ALIGN - 1) / NM_PARAM_ALIGN * NM_PARAM_ALIGN;
        if (row_state) row_state[i] = n_state;
        n_state += (size_t)(hi - lo);
    }
    return n_state;
}

size_t nm_optimizer_state_floats(const nm_param_table *table, const unsigned char *owned) {
    held_rows h = {owned, NULL, NULL};
    return state_layout(table, &h, NULL);
}

void nm_optimizer_state_offsets(const nm_param_table *table, const unsigned char *owned, size_t *row_state) {
    held_rows h = {owned, NULL, NULL};
    state_layout(table, &h, row_state);
}

int nm_optimizer_create(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                        nm_error *err) {
    return nm_optimizer_create_sharded(out, table, cfg, NULL, err);
}

static int create(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg, const held_rows *h,
                  nm_error *err) {
    NM_CHECK(out && table && cfg, "NULL argument");
    *out = NULL;
    if (!(cfg->beta1 >= 0.0 && cfg->beta1 < 1.0))
        return nm_error_set(err, "optimizer: beta1 = %g must be in [0, 1)", cfg->beta1);
    if (!(cfg->beta2 >= 0.0 && cfg->beta2 < 1.0))
        return nm_error_set(err, "optimizer: beta2 = %g must be in [0, 1)", cfg->beta2);
    if (!(cfg->eps > 0.0 && isfinite(cfg->eps)))
        return nm_error_set(err, "optimizer: eps = %g must be > 0", cfg->eps);
    if (!(cfg->weight_decay >= 0.0 && isfinite(cfg->weight_decay)))
        return nm_error_set(err, "optimizer: weight_decay = %g must be >= 0", cfg->weight_decay);

    // Count chunks first so the list is allocated exactly once.
    int64_t n_chunks = 0;
    for (int i = 0; i < table->n_rows; i++) {
        const nm_tensor_spec *r = &table->rows[i];
        int64_t lo, hi;
        held(h, table, i, &lo, &hi);
        if (hi <= lo) continue;
        NM_CHECK(r->offset + (size_t)r->numel <= table->n_floats && lo >= 0 && hi <= r->numel,
                 "row %s overruns the buffer", r->name);
        n_chunks += (hi - lo + NM_OPTIM_CHUNK - 1) / NM_OPTIM_CHUNK;
    }
    size_t *row_state = nm_malloc((size_t)(table->n_rows > 0 ? table->n_rows : 1) * sizeof(size_t));
    size_t n_state = state_layout(table, h, row_state);

    nm_optimizer *opt = nm_calloc(1, sizeof(*opt));
    opt->table = table;
    opt->cfg = *cfg;
    opt->n_state = n_state;
    opt->row_state = row_state;
    size_t ns = n_state ? n_state : 1;
    if (cfg->exp_avg_bf16) opt->m16 = nm_aligned_alloc(ns * sizeof(uint16_t));
    else opt->m = nm_aligned_alloc(ns * sizeof(float));
    if (cfg->exp_avg_sq_bf16) opt->v16 = nm_aligned_alloc(ns * sizeof(uint16_t));
    else opt->v = nm_aligned_alloc(ns * sizeof(float));
    if (opt->m16 || opt->v16) {
        opt->n_threads = team_max();
        opt->scratch = nm_aligned_alloc((size_t)opt->n_threads * 2 * NM_OPTIM_CHUNK * sizeof(float));
    }
    opt->chunks = nm_calloc((size_t)(n_chunks ? n_chunks : 1), sizeof(nm_optim_chunk));
    opt->partials = nm_calloc((size_t)(n_chunks ? n_chunks : 1), sizeof(double));
    opt->n_chunks = n_chunks;

    int64_t c = 0;
    for (int i = 0; i < table->n_rows; i++) {
        const nm_tensor_spec *r = &table->rows[i];
        int64_t lo, hi;
        held(h, table, i, &lo, &hi);
        for (size_t at = 0; hi > lo && at < (size_t)(hi - lo); at += NM_OPTIM_CHUNK) {
            size_t len = (size_t)(hi - lo) - at;
            if (len > NM_OPTIM_CHUNK) len = NM_OPTIM_CHUNK;
            opt->chunks[c++] = (nm_optim_chunk){r->offset + (size_t)lo + at, row_state[i] + at, len, i,
                                                (r->flags & NM_TENSOR_DECAY) != 0};
            opt->n_params += (int64_t)len;
        }
    }
    NM_CHECK(c == n_chunks, "chunk count mismatch");
    *out = opt;
    return 0;
}

int nm_optimizer_create_sharded(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                                const unsigned char *owned, nm_error *err) {
    held_rows h = {owned, NULL, NULL};
    return create(out, table, cfg, &h, err);
}

int nm_optimizer_create_ranges(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                               const int64_t *begin, const int64_t *end, nm_error *err) {
    held_rows h = {NULL, begin, end};
    return create(out, table, cfg, &h, err);
}

void nm_optimizer_destroy(nm_optimizer *opt) {
    if (!opt) return;
    nm_free(opt->m);
    nm_free(opt->v);
    nm_free(opt->m16);
    nm_free(opt->v16);
    nm_free(opt->scratch);
    nm_free(opt->chunks);
    nm_free(opt->partials);
    nm_free(opt->row_state);
    opt->m = opt->v = NULL;
    opt->chunks = NULL;
    opt->partials = NULL;
    nm_free(opt);
}

// --- gradient norm, non-finite detection, clipping -----------------------------------------

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

double nm_optimizer_grad_norm(nm_optimizer *opt, const float *grads) {
    return sqrt(nm_optimizer_grad_sumsq(opt, grads));
}

double nm_optimizer_grad_sumsq(nm_optimizer *opt, const float *grads) {
    const nm_optim_chunk *chunks = opt->chunks;
    double *partials = opt->partials;
    int64_t n = opt->n_chunks;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c++) partials[c] = chunk_sumsq(grads + chunks[c].offset, chunks[c].len);
    // The final reduction is sequential in chunk order: fixed, whatever the thread count.
    double sum = 0.0;
    for (int64_t c = 0; c < n; c++) sum += partials[c];
    return sum;
}

double nm_optimizer_grad_sumsq_except(nm_optimizer *opt, const float *grads, int skip_row) {
    const nm_optim_chunk *chunks = opt->chunks;
    double *partials = opt->partials;
    int64_t n = opt->n_chunks;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c++)
        partials[c] = chunks[c].row == skip_row ? 0.0 : chunk_sumsq(grads + chunks[c].offset, chunks[c].len);
    double sum = 0.0;
    for (int64_t c = 0; c < n; c++) sum += partials[c];
    return sum;
}

int nm_optimizer_first_nonfinite(const nm_optimizer *opt, const float *grads) {
    // Only called when the norm is not finite, so a plain sequential scan is fine; chunks are
    // in row order, so the first hit is the first row.
    for (int64_t c = 0; c < opt->n_chunks; c++) {
        const float *g = grads + opt->chunks[c].offset;
        for (size_t i = 0; i < opt->chunks[c].len; i++) {
            if (!isfinite(g[i])) return opt->chunks[c].row;
        }
    }
    return -1;
}

// torch.nn.utils.clip_grad_norm_'s factor, or 1 when the norm is within max_norm.
static float clip_coef(double norm, double max_norm) {
    if (!(max_norm > 0.0)) return 1.0f;
    // torch computes the coefficient from the float32 norm tensor; doing it in double differs
    // by at most an ulp of the coefficient and keeps the whole norm path in one precision.
    double coef = max_norm / (norm + 1e-6);
    return coef < 1.0 ? (float)coef : 1.0f;
}

float nm_optimizer_clip_grads(nm_optimizer *opt, float *grads, double norm, double max_norm) {
    float s = clip_coef(norm, max_norm);
    if (s == 1.0f) return s;
    const nm_optim_chunk *chunks = opt->chunks;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < opt->n_chunks; c++) {
        float *g = grads + chunks[c].offset;
        for (size_t i = 0; i < chunks[c].len; i++) g[i] *= s;
    }
    return s;
}

void nm_optimizer_check_grads(nm_optimizer *opt, const float *grads, double max_norm, nm_grad_report *rep) {
    memset(rep, 0, sizeof(*rep));
    rep->norm = nm_optimizer_grad_norm(opt, grads);
    rep->clip_scale = 1.0f;
    rep->bad_row = -1;
    // float values squared in double cannot overflow (max ~1e77 per element), so a
    // non-finite sum means a non-finite gradient.
    if (!isfinite(rep->norm)) {
        rep->finite = 0;
        rep->bad_row = nm_optimizer_first_nonfinite(opt, grads);
        if (rep->bad_row >= 0) rep->bad_name = opt->table->rows[rep->bad_row].name;
        return;
    }
    rep->finite = 1;
    rep->clip_scale = clip_coef(rep->norm, max_norm);
}

void nm_optimizer_prepare_grads(nm_optimizer *opt, float *grads, double max_norm, nm_grad_report *rep) {
    nm_optimizer_check_grads(opt, grads, max_norm, rep);
    if (rep->finite) nm_optimizer_clip_grads(opt, grads, rep->norm, max_norm);
}

// --- AdamW step --------------------------------------------------------------------------------

// The update's float coefficients, formed once per step (see nm_optimizer_step_scaled).
typedef struct adamw_coefs {
    float grad_scale;           // clip factor, applied to g as it is read
    float b1, one_minus_b1;
    float b2, one_minus_b2;
    float neg_step_size;        // -lr / (1 - b1^t)
    float bc2_sqrt;             // sqrt(1 - b2^t)
    float eps;
} adamw_coefs;

// The update of the n floats of one chunk. dm is the decay multiplier (1 for rows without
// decay). The loop vectorises (sqrtf is one vsqrtps because the project builds with
// -fno-math-errno; without it GCC 12 keeps a libm call for negative inputs in the loop and
// the update ran 2.5x slower, scalar); every operation is a correctly rounded IEEE op and
// nothing contracts to FMA (-std=c11), so the floats match torch's op-by-op order exactly.
static void adamw_chunk(float *p, float *mm, float *vv, const float *g, size_t n, float dm, const adamw_coefs *k) {
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

void nm_optimizer_step_scaled(nm_optimizer *opt, float *params, const float *grads, float grad_scale, double lr) {
    opt->step += 1;
    const double t = (double)opt->step;
    const nm_adamw_config *c = &opt->cfg;
    // Scalars as PyTorch forms them: Python doubles, rounded to float when applied to a
    // float tensor.
    const double bc1 = 1.0 - pow(c->beta1, t);
    const double bc2 = 1.0 - pow(c->beta2, t);
    const float decay_mul = (float)(1.0 - lr * c->weight_decay);
    const adamw_coefs k = {
        .grad_scale = grad_scale,
        .b1 = (float)c->beta1, .one_minus_b1 = (float)(1.0 - c->beta1),
        .b2 = (float)c->beta2, .one_minus_b2 = (float)(1.0 - c->beta2),
        .neg_step_size = (float)(-(lr / bc1)),
        .bc2_sqrt = (float)sqrt(bc2),
        .eps = (float)c->eps,
    };
    float *m = opt->m, *v = opt->v;
    const nm_optim_chunk *chunks = opt->chunks;
    if ((opt->m16 || opt->v16) && team_max() > opt->n_threads) {  // more threads than at create
        nm_free(opt->scratch);
        opt->n_threads = team_max();
        opt->scratch = nm_aligned_alloc((size_t)opt->n_threads * 2 * NM_OPTIM_CHUNK * sizeof(float));
    }

    // Every element is independent, so any thread split gives the same bits.
#pragma omp parallel for schedule(static)
    for (int64_t ci = 0; ci < opt->n_chunks; ci++) {
        const size_t off = chunks[ci].offset, so = chunks[ci].state, len = chunks[ci].len;
        // bf16 moments: widened into this thread's scratch, updated in fp32, rounded back
        float *own = opt->scratch ? opt->scratch + (size_t)team_rank() * 2 * NM_OPTIM_CHUNK : NULL;
        float *mm = opt->m16 ? own : m + so, *vv = opt->v16 ? own + NM_OPTIM_CHUNK : v + so;
        for (size_t i = 0; opt->m16 && i < len; i++) mm[i] = nm_bf16_to_f32(opt->m16[so + i]);
        for (size_t i = 0; opt->v16 && i < len; i++) vv[i] = nm_bf16_to_f32(opt->v16[so + i]);
        adamw_chunk(params + off, mm, vv, grads + off, len, chunks[ci].decay ? decay_mul : 1.0f, &k);
        for (size_t i = 0; opt->m16 && i < len; i++) opt->m16[so + i] = nm_f32_to_bf16(mm[i]);
        for (size_t i = 0; opt->v16 && i < len; i++) opt->v16[so + i] = nm_f32_to_bf16(vv[i]);
    }
}

void nm_optimizer_step(nm_optimizer *opt, float *params, const float *grads, double lr) {
    nm_optimizer_step_scaled(opt, params, grads, 1.0f, lr);
}

// --- the moments' storage ----------------------------------------------------------------------

int64_t nm_optimizer_state_bytes_per_float(const nm_adamw_config *cfg) {
    return (cfg->exp_avg_bf16 ? 2 : 4) + (cfg->exp_avg_sq_bf16 ? 2 : 4);
}

float *nm_optimizer_moment_f32(const nm_optimizer *opt, int which, int *copy) {
    const uint16_t *h = which ? opt->v16 : opt->m16;
    *copy = h != NULL;
    if (!h) return which ? opt->v : opt->m;
    size_t n = opt->n_state ? opt->n_state : 1;
    float *out = nm_aligned_alloc(n * sizeof(float));
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < opt->n_state; i++) out[i] = nm_bf16_to_f32(h[i]);
    return out;
}

void nm_optimizer_moment_set(nm_optimizer *opt, int which, const float *src) {
    uint16_t *h = which ? opt->v16 : opt->m16;
    float *f = which ? opt->v : opt->m;
    if (h) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < opt->n_state; i++) h[i] = nm_f32_to_bf16(src[i]);
    } else if (src != f) {
        memcpy(f, src, opt->n_state * sizeof(float));
    }
}
