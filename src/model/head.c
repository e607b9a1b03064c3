// head.c: the output head and cross-entropy over vocabulary tiles (dsv3-spec 11), forward and
// backward, for the main model and every MTP depth (they share lm_head), and the loss sums.
#include "model/blocks.h"

#include <math.h>
#include <string.h>

// --- vocabulary-parallel head (tensor parallelism, docs/parallelism.md) ------------------------
//
// Each tp rank holds lm_head rows [v_start, v_start + V_loc). Its tiles fold into per-row
// statistics as in the one-process tiled head (xent_tile_forward), run over a vocabulary of
// V_loc + 1 columns so that no local tile is the last: the statistics stay open (max, sum of
// exponentials, target logit) and are then combined over tp (max, then the sums rescaled to
// it, and the target logit, which only its owner has). The (N, V) logits never exist anywhere.

// Targets relative to this rank's rows: an id held elsewhere becomes V_valid, a column no local
// tile has, so only its owner records the target logit; -1 (no target) stays -1. Tiles run
// over the V_valid real rows only: padding rows never become logits.
static const int32_t *tp_local_targets(nm_model *m, const int32_t *targets, int64_t N) {
    for (int64_t i = 0; i < N; i++) {
        int64_t id = (int64_t)targets[i] - m->tp.v_start;
        m->tp.ids[i] = targets[i] < 0 ? -1 : id >= 0 && id < m->tp.V_valid ? (int32_t)id : (int32_t)m->tp.V_valid;
    }
    return m->tp.ids;
}

static void tp_head_forward(nm_model *m, float *losses, float *lse, float *logits, const float *h, nm_dtype h_t,
                            const int32_t *targets, int64_t N) {
    const nm_ops *ops = m->ops;
    int64_t Vl = m->tp.V_valid, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    const int32_t *lt = tp_local_targets(m, targets, N);
    double *st = m->act.head_stats, *mx = m->tp.red, *sums = m->tp.red + N;
    // an empty shard (all padding) adds nothing; the target logit where it is not held here
    ops->xent_stats_open(ops, st, N);
    for (int64_t v0 = 0; v0 < Vl; v0 += vt) {
        int64_t n_cols = v0 + vt < Vl ? vt : Vl - v0;
        nm_linear_forward(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .x = h, .x_type = h_t,
                                              .y = logits});
        ops->xent_tile_forward(ops, losses, lse, st, logits, n_cols, lt, N, Vl + 1, v0, n_cols);
    }
    ops->xent_stats_max(ops, mx, st, targets, N);
    nm_error e;
    if (!nm_model_faulted(m) && nm_comm_all_reduce(m->tp.comm, mx, N, NM_DT_F64, NM_RED_MAX, &e) != 0)
        nm_model_latch(m, NM_FAULT_TP, &e);
    ops->xent_stats_sums(ops, sums, st, mx, targets, N);
    if (!nm_model_faulted(m) && nm_comm_all_reduce(m->tp.comm, sums, 2 * N, NM_DT_F64, NM_RED_SUM, &e) != 0)
        nm_model_latch(m, NM_FAULT_TP, &e);
    ops->xent_stats_close(ops, losses, lse, sums, mx, targets, N);
}

// As nm_head_backward on this rank's rows; dh's part from them is summed over tp, except under
// sequence parallelism: there the caller reduce-scatters dh (with other parts it adds first).
static void tp_head_backward(nm_model *m, float *dh, float beta, float *logits, const float *lse, const float *h,
                             nm_dtype h_t, const int32_t *targets, float scale, int64_t N) {
    const nm_ops *ops = m->ops;
    int64_t Vl = m->tp.V_valid, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    const int32_t *lt = tp_local_targets(m, targets, N);
    float *part = beta == 0.0f || m->tp.sp ? dh : m->tp.partial;
    if (Vl == 0 && (part != dh || beta == 0.0f)) ops->zero(ops, part, N * D);  // an all-padding shard
    for (int64_t v0 = 0; v0 < Vl; v0 += vt) {
        int64_t n_cols = v0 + vt < Vl ? vt : Vl - v0;
        // one tile: the forward's logits are still there; else recompute each tile
        if (vt < Vl) nm_linear_forward(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .x = h,
                                                           .x_type = h_t, .y = logits});
        ops->xent_tile_backward(ops, logits, n_cols, logits, n_cols, lse, lt, scale, N, Vl + 1, v0, n_cols);
        nm_round_act(m, logits, N * n_cols);  // d logits: read by the two GEMMs below only
        nm_linear_backward_weight(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .x = h,
                                                      .x_type = h_t, .dy = logits, .dy_type = nm_act_type(m)});
        float b0 = part == dh ? beta : 0.0f;
        nm_linear_backward_input(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .dy = logits,
                                                     .dy_type = nm_act_type(m), .dx = part,
                                                     .beta = v0 == 0 ? b0 : 1.0f});
    }
    if (m->tp.sp) return;
    nm_tp_all_reduce(m, part, N * D);
    if (part != dh) ops->add_2d(ops, dh, N * D, part, N * D, 1, N * D);
}

// losses(N), lse(N) (=) of logits = h(N, D) . lm_head^T against targets(N). logits is the
// head's (N, vt) buffer; with vt == V it keeps the whole logits for head_backward, else each
// tile is computed, folded into the running max / exp-sum (xent_tile_forward) and dropped.
// logits_out (N, V) receives every tile when not NULL.
void nm_head_forward(nm_model *m, float *losses, float *lse, float *logits, const float *h, nm_dtype h_t,
                     const int32_t *targets, int64_t N, float *logits_out) {
    const nm_ops *ops = m->ops;
    int64_t V = m->cfg.V, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    if (m->tp.comm) {
        tp_head_forward(m, losses, lse, logits, h, h_t, targets, N);  // logits_out refused by nm_model_forward
        return;
    }
    if (vt == V) {
        nm_linear_forward(m, (nm_linear_args){.W = W, .N = N, .IC = D, .OC = V, .x = h, .x_type = h_t, .y = logits});
        if (logits_out) memcpy(logits_out, logits, (size_t)N * V * sizeof(float));
        ops->xent_forward(ops, losses, lse, logits, targets, N, V);
        return;
    }
    for (int64_t v0 = 0; v0 < V; v0 += vt) {
        int64_t n_cols = v0 + vt < V ? vt : V - v0;
        nm_linear_forward(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .x = h, .x_type = h_t,
                                              .y = logits});
        if (logits_out) ops->copy_2d(ops, logits_out + v0, V, logits, n_cols, N, n_cols);
        ops->xent_tile_forward(ops, losses, lse, m->act.head_stats, logits, n_cols, targets, N, V, v0, n_cols);
    }
}

// dh(N, D) (= or += by beta) and d lm_head (+=) for the loss scale * sum of losses; h and lse as
// in head_forward. With vt < V each tile's logits are recomputed (one more head GEMM: the
// price of never storing (N, V)).
void nm_head_backward(nm_model *m, float *dh, float beta, float *logits, const float *lse, const float *h,
                      nm_dtype h_t, const int32_t *targets, float scale, int64_t N) {
    const nm_ops *ops = m->ops;
    int64_t V = m->cfg.V, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    if (m->tp.comm) {
        tp_head_backward(m, dh, beta, logits, lse, h, h_t, targets, scale, N);
        return;
    }
    if (vt == V) {
        ops->xent_backward(ops, logits, logits, lse, targets, scale, N, V);
        nm_round_act(m, logits, N * V);
        nm_linear_backward_weight(m, (nm_linear_args){.W = W, .N = N, .IC = D, .OC = V, .x = h, .x_type = h_t,
                                                      .dy = logits, .dy_type = nm_act_type(m)});
        nm_linear_backward_input(m, (nm_linear_args){.W = W, .N = N, .IC = D, .OC = V, .dy = logits,
                                                     .dy_type = nm_act_type(m), .dx = dh, .beta = beta});
        return;
    }
    for (int64_t v0 = 0; v0 < V; v0 += vt) {
        int64_t n_cols = v0 + vt < V ? vt : V - v0;
        nm_linear_forward(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .x = h, .x_type = h_t,
                                              .y = logits});
        ops->xent_tile_backward(ops, logits, n_cols, logits, n_cols, lse, targets, scale, N, V, v0, n_cols);
        nm_round_act(m, logits, N * n_cols);
        nm_linear_backward_weight(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .x = h,
                                                      .x_type = h_t, .dy = logits, .dy_type = nm_act_type(m)});
        nm_linear_backward_input(m, (nm_linear_args){.W = W + v0 * D, .N = N, .IC = D, .OC = n_cols, .dy = logits,
                                                     .dy_type = nm_act_type(m), .dx = dh,
                                                     .beta = v0 == 0 ? beta : 1.0f});
    }
}

// Summed in double: the mean is taken by the caller over the positions that have a target.
double nm_head_sum_losses(const nm_model *m, const float *losses, int64_t n) {
    return m->ops->sum(m->ops, losses, n);
}
