// mtp.c: one multi-token-prediction depth (dsv3-spec 6.3, 11), forward and backward, in the
// two halves around the depth's decoder block: the input half (embedding of the tokens
// shifted by k, enorm(emb) and hnorm(h^{k-1}), eh_proj) and the output half (the shared
// head's norm, then the output head shared with the main model). The composition (model.c)
// runs block L+k-1 in between, so this file never calls the block.
#include "model/blocks.h"

void nm_mtp_input_forward(nm_model *m, int64_t k, const int32_t *tokens, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    int64_t D = c->D, l = c->L + k - 1, Tk = T - k, Nk = B * Tk;
    mtp_acts *t = &m->act.mtp[k - 1];
    block_acts *blk = &m->act.blocks[l];
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *h_src = k == 1 ? m->act.h0 : m->act.blocks[l - 1].x_out;
    int64_t T_src = T - k + 1;
    // Sequence parallelism: depth k's rows [s0, s0 + n0) of its B x (T - k); h^{k-1} is needed
    // at other rows than the previous depth's chunk, so it is gathered whole first (h0 is
    // already: the head read it).
    int64_t s0, n0;
    nm_sp_rows(m, Nk, &s0, &n0);
    if (k > 1) nm_sp_all_gather(m, m->act.blocks[l - 1].x_out, B * T_src, D, NM_DT_F32);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = 0; i < Tk; i++) {
            t->tokens_in[b * Tk + i] = tokens[b * T + i + k];
            t->targets[b * Tk + i] = i + k + 1 < T ? tokens[b * T + i + k + 1] : -1;
        }
    }
    ops->copy_2d(ops, t->h_prev, Tk * D, h_src, T_src * D, B, Tk * D);
    nm_tp_embedding_forward(m, t->emb, t->tokens_in, Nk);
    size_t r0 = (size_t)(s0 * D);
    ops->rmsnorm_forward(ops, t->emb_n + r0, t->emb_rstd + s0, t->emb + r0, P + w->enorm, n0, D, (float)c->rms_eps);
    ops->rmsnorm_forward(ops, t->h_n + r0, t->h_rstd + s0, t->h_prev + r0, P + w->hnorm, n0, D, (float)c->rms_eps);
    nm_round_act(m, t->emb_n + r0, n0 * D);  // both feed eh_proj only
    nm_round_act(m, t->h_n + r0, n0 * D);
    // eh_proj (D, 2D): columns [0, D) take enorm(emb), [D, 2D) take hnorm(h)
    nm_linear_forward(m, (nm_linear_args){.W = P + w->eh_proj, .ldw = 2 * D, .N = n0, .IC = D, .OC = D,
                                          .x = t->emb_n + r0, .x_type = nm_act_type(m), .y = blk->x_in + r0});
    nm_linear_forward(m, (nm_linear_args){.W = P + w->eh_proj + D, .ldw = 2 * D, .N = n0, .IC = D, .OC = D,
                                          .x = t->h_n + r0, .x_type = nm_act_type(m), .y = blk->x_in + r0,
                                          .beta = 1.0f});
}

double nm_mtp_output_forward(nm_model *m, int64_t k, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    int64_t D = c->D, l = c->L + k - 1, Nk = B * (T - k);
    mtp_acts *t = &m->act.mtp[k - 1];
    const nm_layer_offsets *w = &m->table.layers[l];
    int64_t s0, n0;
    nm_sp_rows(m, Nk, &s0, &n0);
    m->ops->rmsnorm_forward(m->ops, t->g + s0 * D, t->g_rstd + s0, m->act.blocks[l].x_out + s0 * D,
                            m->params + w->head_norm, n0, D, (float)c->rms_eps);
    nm_sp_all_gather(m, t->g, Nk, D, NM_DT_F32);  // the vocabulary-parallel head reads every token
    nm_round_act(m, t->g, Nk * D);                // and nothing else does
    nm_head_forward(m, t->losses, t->lse, t->logits, t->g, nm_act_type(m), t->targets, Nk, NULL);
    return nm_head_sum_losses(m, t->losses, Nk);
}

void nm_mtp_output_backward(nm_model *m, int64_t k, int64_t B, int64_t T, float scale) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    int64_t D = c->D, l = c->L + k - 1, Nk = B * (T - k);
    mtp_acts *t = &m->act.mtp[k - 1];
    const nm_layer_offsets *w = &m->table.layers[l];
    int64_t s0, n0;
    nm_sp_rows(m, Nk, &s0, &n0);
    size_t r0 = (size_t)(s0 * D);
    // logits_k = g . lm_head^T ; g = RMSNorm(h^k). Under sequence parallelism d_tmp and dh hold
    // each rank's part for every token: summed, each rank keeps its rows.
    nm_head_backward(m, m->scratch.d_tmp, 0.0f, t->logits, t->lse, t->g, nm_act_type(m), t->targets, scale, Nk);
    nm_sp_reduce_scatter(m, m->scratch.d_tmp, Nk, D);
    // d_res = dh^k (from depth k+1, zero for the deepest) + head-norm path
    if (k == c->M) {
        ops->zero(ops, m->scratch.d_res, Nk * D);
    } else {
        nm_sp_reduce_scatter(m, t->dh, Nk, D);
        ops->copy_2d(ops, m->scratch.d_res + r0, D, t->dh + r0, D, n0, D);
    }
    ops->rmsnorm_backward(ops, m->scratch.d_res + r0, m->grads + w->head_norm, m->scratch.d_tmp + r0,
                          m->act.blocks[l].x_out + r0, m->params + w->head_norm, t->g_rstd + s0, n0, D);
}

void nm_mtp_input_backward(nm_model *m, int64_t k, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    float *G = m->grads;
    int64_t D = c->D, l = c->L + k - 1, Tk = T - k, Nk = B * Tk;
    mtp_acts *t = &m->act.mtp[k - 1];
    const nm_layer_offsets *w = &m->table.layers[l];
    // Sequence parallelism: this rank's rows [s0, s0 + n0) (all rows without it).
    int64_t s0, n0;
    nm_sp_rows(m, Nk, &s0, &n0);
    size_t r0 = (size_t)(s0 * D);
    const float *d_x = m->scratch.d_res + r0;
    // x_in = emb_n . W_eh[:, :D]^T + h_n . W_eh[:, D:]^T
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->eh_proj, .ldw = 2 * D, .N = n0, .IC = D, .OC = D,
                                                  .x = t->emb_n + r0, .x_type = nm_act_type(m), .dy = d_x});
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->eh_proj + D, .ldw = 2 * D, .N = n0, .IC = D, .OC = D,
                                                  .x = t->h_n + r0, .x_type = nm_act_type(m), .dy = d_x});
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w->eh_proj, .ldw = 2 * D, .N = n0, .IC = D, .OC = D,
                                                 .dy = d_x, .dx = m->scratch.d_tmp + r0});
    ops->zero(ops, m->scratch.d_emb, Nk * D);
    ops->rmsnorm_backward(ops, m->scratch.d_emb + r0, G + w->enorm, m->scratch.d_tmp + r0, t->emb + r0, P + w->enorm,
                          t->emb_rstd + s0, n0, D);
    nm_sp_all_gather(m, m->scratch.d_emb, Nk, D, NM_DT_F32);  // this rank's vocabulary rows see every token
    nm_tp_embedding_backward(m, m->scratch.d_emb, t->tokens_in, Nk);
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w->eh_proj + D, .ldw = 2 * D, .N = n0, .IC = D, .OC = D,
                                                 .dy = d_x, .dx = m->scratch.d_tmp + r0});
    ops->zero(ops, m->scratch.d_emb, Nk * D);
    ops->rmsnorm_backward(ops, m->scratch.d_emb + r0, G + w->hnorm, m->scratch.d_tmp + r0, t->h_prev + r0, P + w->hnorm,
                          t->h_rstd + s0, n0, D);
    // h_prev = first Tk positions of h^{k-1} (h0 for k == 1). Under sequence parallelism only
    // this rank's rows are non-zero: the sum over tp (the caller's reduce-scatter) completes it.
    if (k == 1) {
        ops->add_2d(ops, m->scratch.d_h0, T * D, m->scratch.d_emb, Tk * D, B, Tk * D);
    } else {
        mtp_acts *prev = &m->act.mtp[k - 2];
        int64_t T_src = T - k + 1;
        ops->zero(ops, prev->dh, B * T_src * D);
        ops->add_2d(ops, prev->dh, T_src * D, m->scratch.d_emb, Tk * D, B, Tk * D);
    }
}
