// mtp.c: one multi-token-prediction depth (dsv3-spec 6.3, 11), forward and backward, in the
// two halves around the depth's decoder block: the input half (embedding of the tokens
// shifted by k, enorm(emb) and hnorm(h^{k-1}), eh_proj) and the output half (the shared
// head's norm, then the output head shared with the main model). The composition (model.c)
// runs block L+k-1 in between, so this file never calls the block.
#include "model/model_internal.h"

void nm_mtp_input_forward(nm_model *m, int64_t k, const int32_t *tokens, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    int64_t D = c->D, l = c->L + k - 1, Tk = T - k, Nk = B * Tk;
    mtp_acts *t = &m->mtp[k - 1];
    block_acts *blk = &m->blocks[l];
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *h_src = k == 1 ? m->h0 : m->blocks[l - 1].x_out;
    int64_t T_src = T - k + 1;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = 0; i < Tk; i++) {
            t->tokens_in[b * Tk + i] = tokens[b * T + i + k];
            t->targets[b * Tk + i] = i + k + 1 < T ? tokens[b * T + i + k + 1] : -1;
        }
    }
    ops->copy_2d(t->h_prev, Tk * D, h_src, T_src * D, B, Tk * D);
    nm_tp_embedding_forward(m, t->emb, t->tokens_in, Nk);
    ops->rmsnorm_forward(t->emb_n, t->emb_rstd, t->emb, P + w->enorm, Nk, D, (float)c->rms_eps);
    ops->rmsnorm_forward(t->h_n, t->h_rstd, t->h_prev, P + w->hnorm, Nk, D, (float)c->rms_eps);
    // eh_proj (D, 2D): columns [0, D) take enorm(emb), [D, 2D) take hnorm(h)
    nm_linear_forward(m, blk->x_in, D, t->emb_n, D, P + w->eh_proj, 2 * D, Nk, D, D, 0.0f);
    nm_linear_forward(m, blk->x_in, D, t->h_n, D, P + w->eh_proj + D, 2 * D, Nk, D, D, 1.0f);
}

double nm_mtp_output_forward(nm_model *m, int64_t k, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    int64_t D = c->D, l = c->L + k - 1, Nk = B * (T - k);
    mtp_acts *t = &m->mtp[k - 1];
    const nm_layer_offsets *w = &m->table.layers[l];
    m->ops->rmsnorm_forward(t->g, t->g_rstd, m->blocks[l].x_out, m->params + w->head_norm, Nk, D, (float)c->rms_eps);
    nm_head_forward(m, t->losses, t->lse, t->logits, t->g, t->targets, Nk, NULL);
    return nm_head_sum_losses(t->losses, Nk);
}

void nm_mtp_output_backward(nm_model *m, int64_t k, int64_t B, int64_t T, float scale) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    int64_t D = c->D, l = c->L + k - 1, Nk = B * (T - k);
    mtp_acts *t = &m->mtp[k - 1];
    const nm_layer_offsets *w = &m->table.layers[l];
    // logits_k = g . lm_head^T ; g = RMSNorm(h^k)
    nm_head_backward(m, m->d_tmp, 0.0f, t->logits, t->lse, t->g, t->targets, scale, Nk);
    // d_res = dh^k (from depth k+1, zero for the deepest) + head-norm path
    if (k == c->M) ops->zero(m->d_res, Nk * D);
    else ops->copy_2d(m->d_res, Nk * D, t->dh, Nk * D, 1, Nk * D);
    ops->rmsnorm_backward(m->d_res, m->grads + w->head_norm, m->d_tmp, m->blocks[l].x_out, m->params + w->head_norm,
                          t->g_rstd, Nk, D);
}

void nm_mtp_input_backward(nm_model *m, int64_t k, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    float *G = m->grads;
    int64_t D = c->D, l = c->L + k - 1, Tk = T - k, Nk = B * Tk;
    mtp_acts *t = &m->mtp[k - 1];
    const nm_layer_offsets *w = &m->table.layers[l];
    // x_in = emb_n . W_eh[:, :D]^T + h_n . W_eh[:, D:]^T
    nm_linear_backward_weight(m, G + w->eh_proj, 2 * D, m->d_res, D, t->emb_n, D, Nk, D, D);
    nm_linear_backward_weight(m, G + w->eh_proj + D, 2 * D, m->d_res, D, t->h_n, D, Nk, D, D);
    nm_linear_backward_input(m, m->d_tmp, D, m->d_res, D, P + w->eh_proj, 2 * D, Nk, D, D, 0.0f);
    ops->zero(m->d_emb, Nk * D);
    ops->rmsnorm_backward(m->d_emb, G + w->enorm, m->d_tmp, t->emb, P + w->enorm, t->emb_rstd, Nk, D);
    nm_tp_embedding_backward(m, m->d_emb, t->tokens_in, Nk);
    nm_linear_backward_input(m, m->d_tmp, D, m->d_res, D, P + w->eh_proj + D, 2 * D, Nk, D, D, 0.0f);
    ops->zero(m->d_emb, Nk * D);
    ops->rmsnorm_backward(m->d_emb, G + w->hnorm, m->d_tmp, t->h_prev, P + w->hnorm, t->h_rstd, Nk, D);
    // h_prev = first Tk positions of h^{k-1} (h0 for k == 1)
    if (k == 1) {
        ops->add_2d(m->d_h0, T * D, m->d_emb, Tk * D, B, Tk * D);
    } else {
        mtp_acts *prev = &m->mtp[k - 2];
        int64_t T_src = T - k + 1;
        ops->zero(prev->dh, B * T_src * D);
        ops->add_2d(prev->dh, T_src * D, m->d_emb, Tk * D, B, Tk * D);
    }
}
