// optim.c: AdamW, gradient norm, clipping and non-finite detection (see optim.h).
//
// Reference: torch.optim.AdamW, torch 1.13 `_single_tensor_adamw`; clipping as
// torch.nn.utils.clip_grad_norm_ (clip_coef = max_norm / (total_norm + 1e-6), clamped to 1).
#include "train/optim.h"

#include <math.h>
#include <string.h>

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
                        const nm_ops *ops, nm_error *err) {
    return nm_optimizer_create_sharded(out, table, cfg, NULL, ops, err);
}

static int create(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg, const held_rows *h,
                  const nm_ops *ops, nm_error *err) {
    NM_CHECK(out && table && cfg && ops, "NULL argument");
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
    opt->ops = ops;
    opt->cfg = *cfg;
    opt->n_state = n_state;
    opt->row_state = row_state;
    // the moments live where the backend's ops run (nm_optimizer_destroy gives them back)
    size_t ns = n_state ? n_state : 1;
    if (cfg->exp_avg_bf16) opt->m16 = ops->alloc(ops, ns * sizeof(uint16_t));
    else opt->m = ops->alloc(ops, ns * sizeof(float));
    if (cfg->exp_avg_sq_bf16) opt->v16 = ops->alloc(ops, ns * sizeof(uint16_t));
    else opt->v = ops->alloc(ops, ns * sizeof(float));
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
                                const unsigned char *owned, const nm_ops *ops, nm_error *err) {
    held_rows h = {owned, NULL, NULL};
    return create(out, table, cfg, &h, ops, err);
}

int nm_optimizer_create_ranges(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                               const int64_t *begin, const int64_t *end, const nm_ops *ops, nm_error *err) {
    held_rows h = {NULL, begin, end};
    return create(out, table, cfg, &h, ops, err);
}

void nm_optimizer_destroy(nm_optimizer *opt) {
    if (!opt) return;
    opt->ops->free(opt->ops, opt->m);
    opt->ops->free(opt->ops, opt->v);
    opt->ops->free(opt->ops, opt->m16);
    opt->ops->free(opt->ops, opt->v16);
    nm_free(opt->chunks);
    nm_free(opt->partials);
    nm_free(opt->row_state);
    opt->m = opt->v = NULL;
    opt->chunks = NULL;
    opt->partials = NULL;
    nm_free(opt);
}

// --- gradient norm, non-finite detection, clipping -----------------------------------------

double nm_optimizer_grad_norm(nm_optimizer *opt, const float *grads) {
    return sqrt(nm_optimizer_grad_sumsq(opt, grads));
}

double nm_optimizer_grad_sumsq(nm_optimizer *opt, const float *grads) {
    return nm_optimizer_grad_sumsq_except(opt, grads, -1);
}

double nm_optimizer_grad_sumsq_except(nm_optimizer *opt, const float *grads, int skip_row) {
    // Each chunk's partial is the backend's (ops.h: eight lanes in a fixed order); the sum is
    // sequential in chunk order here: the norm is the same bits whatever the thread count.
    opt->ops->sumsq_chunks(opt->ops, opt->partials, grads, opt->chunks, opt->n_chunks);
    double sum = 0.0;
    for (int64_t c = 0; c < opt->n_chunks; c++)
        if (opt->chunks[c].row != skip_row) sum += opt->partials[c];
    return sum;
}

int nm_optimizer_first_nonfinite(const nm_optimizer *opt, const float *grads) {
    // Only called when the norm is not finite; chunks are in row order, so the first hit is
    // the first row.
    for (int64_t c = 0; c < opt->n_chunks; c++)
        if (opt->ops->first_nonfinite(opt->ops, grads + opt->chunks[c].offset, (int64_t)opt->chunks[c].len) >= 0)
            return opt->chunks[c].row;
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
    opt->ops->scale_chunks(opt->ops, grads, s, opt->chunks, opt->n_chunks);
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

void nm_optimizer_step_scaled(nm_optimizer *opt, float *params, const float *grads, float grad_scale, double lr) {
    opt->step += 1;
    const double t = (double)opt->step;
    const nm_adamw_config *c = &opt->cfg;
    // Scalars as PyTorch forms them: Python doubles, rounded to float when applied to a
    // float tensor.
    const double bc1 = 1.0 - pow(c->beta1, t);
    const double bc2 = 1.0 - pow(c->beta2, t);
    const nm_adamw_coefs k = {
        .grad_scale = grad_scale,
        .b1 = (float)c->beta1, .one_minus_b1 = (float)(1.0 - c->beta1),
        .b2 = (float)c->beta2, .one_minus_b2 = (float)(1.0 - c->beta2),
        .neg_step_size = (float)(-(lr / bc1)),
        .bc2_sqrt = (float)sqrt(bc2),
        .eps = (float)c->eps,
        .decay_mul = (float)(1.0 - lr * c->weight_decay),
    };
    // Every element is independent: the backend may split the chunks any way.
    opt->ops->adamw_chunks(opt->ops, params, opt->m16 ? (void *)opt->m16 : (void *)opt->m, opt->m16 ? NM_BF16 : NM_F32,
                           opt->v16 ? (void *)opt->v16 : (void *)opt->v, opt->v16 ? NM_BF16 : NM_F32, grads,
                           opt->chunks, opt->n_chunks, &k);
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
    // host memory, as the checkpoint writer reads it (the host backends' ops run on it)
    float *out = nm_aligned_alloc(n * sizeof(float));
    opt->ops->widen_bf16(opt->ops, out, h, (int64_t)opt->n_state);
    return out;
}

void nm_optimizer_moment_set(nm_optimizer *opt, int which, const float *src) {
    uint16_t *h = which ? opt->v16 : opt->m16;
    float *f = which ? opt->v : opt->m;
    if (h) opt->ops->cast_bf16(opt->ops, h, src, (int64_t)opt->n_state);
    else if (src != f) opt->ops->copy_to_device(opt->ops, f, src, opt->n_state * sizeof(float));
}
