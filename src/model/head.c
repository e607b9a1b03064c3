// head.c: the output head and cross-entropy over vocabulary tiles (dsv3-spec 11), forward and
// backward, for the main model and every MTP depth (they share lm_head), and the loss sums.
#include "model/model_internal.h"

#include <string.h>

// losses(N), lse(N) (=) of logits = h(N, D) . lm_head^T against targets(N). logits is the
// head's (N, vt) buffer; with vt == V it keeps the whole logits for head_backward, else each
// tile is computed, folded into the running max / exp-sum (xent_tile_forward) and dropped.
// logits_out (N, V) receives every tile when not NULL.
void nm_head_forward(nm_model *m, float *losses, float *lse, float *logits, const float *h,
                     const int32_t *targets, int64_t N, float *logits_out) {
    const nm_ops *ops = m->ops;
    int64_t V = m->cfg.V, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    if (vt == V) {
        nm_linear_forward(m, logits, V, h, D, W, D, N, D, V, 0.0f);
        if (logits_out) memcpy(logits_out, logits, (size_t)N * V * sizeof(float));
        ops->xent_forward(losses, lse, logits, targets, N, V);
        return;
    }
    for (int64_t v0 = 0; v0 < V; v0 += vt) {
        int64_t n_cols = v0 + vt < V ? vt : V - v0;
        nm_linear_forward(m, logits, n_cols, h, D, W + v0 * D, D, N, D, n_cols, 0.0f);
        if (logits_out) ops->copy_2d(logits_out + v0, V, logits, n_cols, N, n_cols);
        ops->xent_tile_forward(losses, lse, m->head_stats, logits, n_cols, targets, N, V, v0, n_cols);
    }
}

// dh(N, D) (= or += by beta) and d lm_head (+=) for the loss scale * sum of losses; h and lse as
// in head_forward. With vt < V each tile's logits are recomputed (one more head GEMM: the
// price of never storing (N, V)).
void nm_head_backward(nm_model *m, float *dh, float beta, float *logits, const float *lse, const float *h,
                      const int32_t *targets, float scale, int64_t N) {
    const nm_ops *ops = m->ops;
    int64_t V = m->cfg.V, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    float *dW = m->grads + m->table.lm_head;
    if (vt == V) {
        ops->xent_backward(logits, logits, lse, targets, scale, N, V);
        nm_linear_backward_weight(m, dW, D, logits, V, h, D, N, D, V);
        nm_linear_backward_input(m, dh, D, logits, V, W, D, N, D, V, beta);
        return;
    }
    for (int64_t v0 = 0; v0 < V; v0 += vt) {
        int64_t n_cols = v0 + vt < V ? vt : V - v0;
        nm_linear_forward(m, logits, n_cols, h, D, W + v0 * D, D, N, D, n_cols, 0.0f);
        ops->xent_tile_backward(logits, n_cols, logits, n_cols, lse, targets, scale, N, V, v0, n_cols);
        nm_linear_backward_weight(m, dW + v0 * D, D, logits, n_cols, h, D, N, D, n_cols);
        nm_linear_backward_input(m, dh, D, logits, n_cols, W + v0 * D, D, N, D, n_cols, v0 == 0 ? beta : 1.0f);
    }
}

// Summed in double: the mean is taken by the caller over the positions that have a target.
double nm_head_sum_losses(const float *losses, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += losses[i];
    return s;
}
