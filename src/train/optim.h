// optim.h: AdamW over the flat parameter buffer, global gradient norm, clipping and
// non-finite detection, all driven by the parameter table (style.md 13-14).
//
// What it implements:
//  - torch.optim.AdamW (torch 1.13 `_single_tensor_adamw`, amsgrad off, maximize off) in the
//    same order of operations, element by element in fp32 with the scalar coefficients
//    computed in double and rounded to float once, as PyTorch does for a float tensor:
//        p  = p * (1 - lr*wd)                            (rows with NM_TENSOR_DECAY only)
//        m  = m * b1 + (1 - b1) * g
//        v  = v * b2 + (1 - b2) * g * g
//        p  = p + (-lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//    PyTorch's vectorised CPU kernels use FMA for some of these, so agreement is to a few
//    ulps, not bit for bit (tests/interop/test_optim_torch.py measures it).
//  - the global L2 norm of the gradients in double with a fixed chunking, so the value is
//    bit-identical for any OpenMP thread count; clipping as torch.nn.utils.clip_grad_norm_.
//    The training step applies the clip factor inside the AdamW update (g * clip_scale as g
//    is read, nm_optimizer_step_scaled) instead of rewriting the gradients in a pass of its
//    own: the same floats, one read-modify-write of the whole buffer less per step.
//
// What it deliberately does not do:
//  - touch rows flagged NM_TENSOR_ROUTER_BIAS (updated by the balance rule, balance.h) or
//    NM_TENSOR_TIED (no storage of their own; the owner row is updated once). Those rows
//    are also left out of the gradient norm;
//  - communicate. Under the distributed optimizer (src/train/zero.h) it is created for the
//    floats of this rank's ranges (nm_optimizer_create_ranges): m and v hold only those,
//    packed, and the norm here is this rank's part (nm_optimizer_grad_sumsq); the trainer
//    reduces it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "model/params.h"
#include "ops/ops.h"

typedef struct nm_adamw_config {
    double beta1;               // 0.9
    double beta2;               // 0.95
    double eps;                 // 1e-8
    double weight_decay;        // 0.1, applied to NM_TENSOR_DECAY rows only
    int exp_avg_bf16;           // 1: m stored in bf16 (DeepSeek-V3's choice; Megatron's
                                // --exp-avg-dtype bf16); the update itself runs in fp32 and
                                // rounds the new m to bf16 (nearest even) as it stores it
    int exp_avg_sq_bf16;        // the same for v (--exp-avg-sq-dtype bf16)
} nm_adamw_config;

// The optimizer's unit of work is nm_optim_chunk (ops.h): a run of at most NM_OPTIM_CHUNK floats
// of one row.
#define NM_OPTIM_CHUNK 65536    // floats per chunk: large enough to amortise OpenMP, small
                                // enough to balance threads on a few large matrices

typedef struct nm_optimizer {
    const nm_param_table *table; // borrowed; must outlive the optimizer
    nm_adamw_config cfg;
    float *m;                   // (n_state) first moment: params' layout, or the owned rows packed
    float *v;                   // (n_state) second moment
    size_t n_state;             // floats of m and v
    size_t *row_state;          // (table->n_rows) offset of each row in m/v; SIZE_MAX: not held here
    int64_t step;               // number of updates applied so far (t of the next update - 1)
    nm_optim_chunk *chunks;     // (n_chunks) every optimised float, in table row order
    int64_t n_chunks;
    double *partials;           // (n_chunks) scratch for the norm, allocated once
    int64_t n_params;           // floats covered by the chunks
    uint16_t *m16, *v16;        // (n_state) the moments in bf16 storage (cfg.exp_avg_bf16 /
                                // exp_avg_sq_bf16); then m / v are NULL
    const nm_ops *ops;          // the backend that holds m, v and runs the update (borrowed)
} nm_optimizer;

// Result of nm_optimizer_check_grads and nm_optimizer_prepare_grads.
typedef struct nm_grad_report {
    double norm;                // global L2 norm before clipping (NaN/Inf when not finite)
    float clip_scale;           // clip factor for the gradients (1: not clipped)
    int finite;                 // 0 when some gradient is NaN/Inf (then nothing was scaled)
    int bad_row;                // first table row holding a non-finite gradient, -1 if none
    const char *bad_name;       // that row's HF name (points into the table), NULL if none
} nm_grad_report;

// Allocates m and v (zeroed, with ops->alloc) and the chunk list; the update, the norm and the
// clipping run as ops's (ops.h: adamw_chunks, sumsq_chunks, scale_chunks), on params and grads
// of that backend. Returns 0, or -1 with err filled when the hyper-parameters are out of range
// (names the field and value).
int nm_optimizer_create(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                        const nm_ops *ops, nm_error *err);
void nm_optimizer_destroy(nm_optimizer *opt);
// The ZeRO-1 form: state for the rows with owned[row] != 0 only (owned: (table->n_rows)),
// packed in row order; NULL owned means every row (= nm_optimizer_create).
int nm_optimizer_create_sharded(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                                const unsigned char *owned, const nm_ops *ops, nm_error *err);
// The distributed optimizer's form (zero.h): state for the floats [begin[row], end[row]) of
// every row (begin, end: (table->n_rows)), packed in row order; row_state[row] is where the
// row's first held float's state sits.
int nm_optimizer_create_ranges(nm_optimizer **out, const nm_param_table *table, const nm_adamw_config *cfg,
                               const int64_t *begin, const int64_t *end, const nm_ops *ops, nm_error *err);
// Floats of m (and of v) that nm_optimizer_create_sharded allocates for these rows, without
// allocating them (the planner's number).
size_t nm_optimizer_state_floats(const nm_param_table *table, const unsigned char *owned);
// Where nm_optimizer_create_sharded puts each row's state (row_state: (table->n_rows),
// SIZE_MAX for rows without it): the checkpoint's whole-tensor layout.
void nm_optimizer_state_offsets(const nm_param_table *table, const unsigned char *owned, size_t *row_state);

// Bytes of optimizer state per held float: 8, or 6 / 4 with one or both moments in bf16.
int64_t nm_optimizer_state_bytes_per_float(const nm_adamw_config *cfg);

// Moment `which` (0: m, 1: v) as fp32 in the state layout (n_state floats): the optimizer's
// own buffer (*copy = 0), or, in bf16 storage, a widened copy in host memory the caller frees
// with nm_free (*copy = 1).
float *nm_optimizer_moment_f32(const nm_optimizer *opt, int which, int *copy);
// Stores fp32 values into moment `which`: rounded to bf16 in bf16 storage; in fp32 copied
// unless src is the optimizer's own buffer.
void nm_optimizer_moment_set(nm_optimizer *opt, int which, const float *src);

// Sum of squares of the optimised gradients in double, fixed order (the norm's square).
double nm_optimizer_grad_sumsq(nm_optimizer *opt, const float *grads /* (n_floats) */);

// The same without table row skip_row (-1: none): a pipeline stage's copy of a tensor that
// another stage also holds (the last stage's embedding), counted once in the norm.
double nm_optimizer_grad_sumsq_except(nm_optimizer *opt, const float *grads, int skip_row);

// Global L2 norm over the optimised rows, sqrt of a double sum; deterministic.
double nm_optimizer_grad_norm(nm_optimizer *opt, const float *grads /* (n_floats) */);

// First row (table order) holding a NaN or Inf gradient, or -1.
int nm_optimizer_first_nonfinite(const nm_optimizer *opt, const float *grads /* (n_floats) */);

// Multiplies the optimised gradients by max_norm / (norm + 1e-6) when that is < 1
// (torch.nn.utils.clip_grad_norm_). max_norm <= 0 disables clipping. Returns the scale.
float nm_optimizer_clip_grads(nm_optimizer *opt, float *grads, double norm, double max_norm);

// The pre-step checks, gradients untouched: norm, then either the name of the first
// non-finite row (rep->finite = 0; the caller skips the step) or the factor that clips to
// max_norm (rep->clip_scale, for nm_optimizer_step_scaled).
void nm_optimizer_check_grads(nm_optimizer *opt, const float *grads, double max_norm, nm_grad_report *rep);

// nm_optimizer_check_grads, then, when finite, multiplies the gradients by rep->clip_scale
// in place, for callers that want the clipped gradients in memory (then step with
// nm_optimizer_step). The trainer does not: it passes the factor to the step instead.
void nm_optimizer_prepare_grads(nm_optimizer *opt, float *grads, double max_norm, nm_grad_report *rep);

// One AdamW update with learning rate lr (from schedule.h) on the gradients times
// grad_scale (rep->clip_scale; 1 for gradients already clipped). Bit for bit the update
// nm_optimizer_step gives after nm_optimizer_clip_grads with the same factor: the product
// is rounded to float exactly as the clipping pass stores it. Increments opt->step first,
// so the bias corrections use t = opt->step after the call, as PyTorch's state["step"].
void nm_optimizer_step_scaled(nm_optimizer *opt, float *params /* (n_floats) */, const float *grads /* (n_floats) */,
                              float grad_scale, double lr);

// nm_optimizer_step_scaled with grad_scale 1.
void nm_optimizer_step(nm_optimizer *opt, float *params /* (n_floats) */, const float *grads /* (n_floats) */,
                       double lr);
