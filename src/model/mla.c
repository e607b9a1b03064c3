// mla.c: the attention half of a decoder block, Multi-head Latent Attention (dsv3-spec 3.2,
// 4.3): input_layernorm, the q (optionally LoRA) and compressed kv projections, rope on the
// rope parts, attention, o_proj and the residual add; forward and backward.
#include "model/blocks.h"

// q (rope part rotated) from the query latent cq_n (or from a without q-LoRA) and kv from the
// kv latent ckv_n: the up-projections, run by the forward and, under selective recomputation
// (recompute_mla_up_proj), again by the backward on the same saved inputs: the same calls in the
// same order, so the same bits.
static void up_projections(nm_model *m, const nm_layer_offsets *w, block_acts *b, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    const float *P = m->params;
    int64_t N = B * T, D = c->D, H = m->tp.H_loc, Dkv = c->Dn + c->Dv;
    nm_dtype at = nm_act_type(m);
    if (c->Rq > 0)
        nm_linear_forward(m, (nm_linear_args){.W = P + w->q_b, .N = N, .IC = c->Rq, .OC = H * c->Dqk, .x = b->cq_n,
                                              .x_type = at, .y = b->q});
    else
        nm_linear_forward(m, (nm_linear_args){.W = P + w->q, .N = N, .IC = D, .OC = H * c->Dqk, .x = b->a, .x_type = at,
                                              .y = b->q});
    nm_linear_forward(m, (nm_linear_args){.W = P + w->kv_b, .N = N, .IC = c->Rkv, .OC = H * Dkv, .x = b->ckv_n,
                                          .x_type = at, .y = b->kv});
    m->ops->rope_forward(m->ops, b->q, m->rope_cos, m->rope_sin, B, T, H, c->Dqk, c->Dn, c->Dr);
}

// a = RMSNorm(x_in) on this rank's rows, gathered whole under sequence parallelism and rounded
// for the bf16 GEMMs: the forward's first step, and under selective recomputation
// (recompute_layernorm) the backward's, with the same calls on the same saved input.
static void input_norm(nm_model *m, const nm_layer_offsets *w, block_acts *b, int64_t N) {
    const int64_t D = m->cfg.D;
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    m->ops->rmsnorm_forward(m->ops, b->a + s0 * D, b->a_rstd + s0, b->x_in + s0 * D, m->params + w->input_norm, n0, D,
                            (float)m->cfg.rms_eps);
    nm_sp_all_gather(m, b->a, N, D, NM_DT_F32);
    // a, cq_n and ckv_n feed only the projections (the norms' backward reads their inputs):
    // rounded once for the bf16 GEMMs of the forward and the weight gradients (fp8: bf16
    // values, which its GEMMs quantise)
    nm_round_saved(m, b->a, N * D);
}

void nm_mla_forward(nm_model *m, int64_t l, int64_t B, int64_t T) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *P = m->params;
    block_acts *b = &m->act.blocks[l];
    int64_t N = B * T, D = c->D, H = m->tp.H_loc;
    float eps = (float)c->rms_eps;

    // Sequence parallelism: the norm on this rank's rows, then every token's rows gathered for
    // the projections (all of it without: s0 = 0, n0 = N, the gather a no-op).
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    input_norm(m, w, b, N);
    nm_dtype at = nm_act_type(m);
    if (c->Rq > 0) {
        nm_linear_forward(m, (nm_linear_args){.W = P + w->q_a, .N = N, .IC = D, .OC = c->Rq, .x = b->a, .x_type = at,
                                              .y = b->cq});
        ops->rmsnorm_forward(ops, b->cq_n, b->cq_rstd, b->cq, P + w->q_a_norm, N, c->Rq, eps);
        nm_round_saved(m, b->cq_n, N * c->Rq);
    }
    // kv_a_proj_with_mqa rows [0, Rkv) give the latent, rows [Rkv, Rkv+Dr) the shared rope key.
    nm_linear_forward(m, (nm_linear_args){.W = P + w->kv_a, .N = N, .IC = D, .OC = c->Rkv, .x = b->a, .x_type = at,
                                          .y = b->ckv});
    nm_linear_forward(m, (nm_linear_args){.W = P + w->kv_a + (size_t)c->Rkv * D, .N = N, .IC = D, .OC = c->Dr,
                                          .x = b->a, .x_type = at, .y = b->k_pe});
    ops->rmsnorm_forward(ops, b->ckv_n, b->ckv_rstd, b->ckv, P + w->kv_a_norm, N, c->Rkv, eps);
    nm_round_saved(m, b->ckv_n, N * c->Rkv);
    up_projections(m, w, b, B, T);
    ops->rope_forward(ops, b->k_pe, m->rope_cos, m->rope_sin, B, T, 1, c->Dr, 0, c->Dr);
    ops->attention_forward(ops, b->att, b->lse, b->q, b->kv, b->k_pe, B, T, H, c->Dn, c->Dr, c->Dv,
                           (float)c->softmax_scale);
    // o_proj is row-parallel: each tp rank's local heads give part of every token's output
    nm_tp_row_output_begin(m, b->x_mid, b->x_in, N, D);
    nm_linear_forward(m, (nm_linear_args){.W = P + w->o, .N = N, .IC = H * c->Dv, .OC = D, .x = b->att, .y = b->x_mid,
                                          .beta = 1.0f});
    nm_tp_row_output_end(m, b->x_mid, b->x_in, N, D);
}

void nm_mla_backward(nm_model *m, int64_t l) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *P = m->params;
    float *G = m->grads;
    block_acts *b = &m->act.blocks[l];
    int64_t B = b->B, T = b->T, N = B * T, D = c->D, H = m->tp.H_loc;
    int64_t Dkv = c->Dn + c->Dv;
    float *d_res = m->scratch.d_res;
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    nm_sp_all_gather(m, d_res, N, D, NM_DT_F32);  // o_proj's backward reads every token's d(x_mid)
    // selective recomputation: a was not kept (one shared buffer holds the last block's)
    if (m->recompute.layernorm && !m->recompute.full) input_norm(m, w, b, N);

    // forward: x_mid = x_in + att . W_o^T
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w->o, .N = N, .IC = H * c->Dv, .OC = D, .dy = d_res,
                                                 .dx = m->scratch.d_att});
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->o, .N = N, .IC = H * c->Dv, .OC = D, .x = b->att,
                                                  .dy = d_res});
    // selective recomputation: q and kv were not kept (one shared pair holds the last block's)
    if (m->recompute.mla_up_proj && !m->recompute.full) up_projections(m, w, b, B, T);
    ops->attention_backward(ops, m->scratch.d_q, m->scratch.d_kv, m->scratch.d_k_pe, m->scratch.att_scratch,
                            m->scratch.d_att, b->q, b->kv, b->k_pe, b->att, b->lse, B, T, H, c->Dn, c->Dr, c->Dv,
                            (float)c->softmax_scale);
    ops->rope_backward(ops, m->scratch.d_q, m->rope_cos, m->rope_sin, B, T, H, c->Dqk, c->Dn, c->Dr);
    ops->rope_backward(ops, m->scratch.d_k_pe, m->rope_cos, m->rope_sin, B, T, 1, c->Dr, 0, c->Dr);
    // d_q, d_kv, d_k_pe, d_ckv and d_cq feed only the input- and weight-gradient GEMMs: rounded
    // once for both in bf16 (d_k_pe after its tp sum); a, cq_n and ckv_n were in the forward
    nm_dtype at = nm_act_type(m);
    nm_round_act(m, m->scratch.d_q, N * H * c->Dqk);
    nm_round_act(m, m->scratch.d_kv, N * H * Dkv);
    // kv = ckv_n . W_kv_b^T ; ckv_n = RMSNorm(ckv)
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->kv_b, .N = N, .IC = c->Rkv, .OC = H * Dkv, .x = b->ckv_n,
                                                  .x_type = at, .dy = m->scratch.d_kv, .dy_type = at});
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w->kv_b, .N = N, .IC = c->Rkv, .OC = H * Dkv,
                                                 .dy = m->scratch.d_kv, .dy_type = at, .dx = m->scratch.d_ckv_n});
    // Tensor parallelism: the local heads give part of d(ckv_n) (kv_b_proj is column-parallel)
    // and of d(k_pe) (the rope key all heads share); summed here, everything below is whole.
    nm_tp_all_reduce(m, m->scratch.d_ckv_n, N * c->Rkv);
    nm_tp_all_reduce(m, m->scratch.d_k_pe, N * c->Dr);
    nm_round_act(m, m->scratch.d_k_pe, N * c->Dr);
    ops->zero(ops, m->scratch.d_ckv, N * c->Rkv);
    ops->rmsnorm_backward(ops, m->scratch.d_ckv, G + w->kv_a_norm, m->scratch.d_ckv_n, b->ckv, P + w->kv_a_norm,
                          b->ckv_rstd, N, c->Rkv);
    nm_round_act(m, m->scratch.d_ckv, N * c->Rkv);
    // [ckv | k_pe] = a . W_kv_a^T: the rope key bypasses the latent norm
    size_t kv_a_pe = w->kv_a + (size_t)c->Rkv * D;
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->kv_a, .N = N, .IC = D, .OC = c->Rkv, .x = b->a,
                                                  .x_type = at, .dy = m->scratch.d_ckv, .dy_type = at});
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + kv_a_pe, .N = N, .IC = D, .OC = c->Dr, .x = b->a,
                                                  .x_type = at, .dy = m->scratch.d_k_pe, .dy_type = at});
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w->kv_a, .N = N, .IC = D, .OC = c->Rkv,
                                                 .dy = m->scratch.d_ckv, .dy_type = at, .dx = m->scratch.d_a});
    nm_linear_backward_input(m, (nm_linear_args){.W = P + kv_a_pe, .N = N, .IC = D, .OC = c->Dr,
                                                 .dy = m->scratch.d_k_pe, .dy_type = at, .dx = m->scratch.d_a,
                                                 .beta = 1.0f});
    if (c->Rq > 0) {
        // q = cq_n . W_q_b^T ; cq_n = RMSNorm(cq) ; cq = a . W_q_a^T
        nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->q_b, .N = N, .IC = c->Rq, .OC = H * c->Dqk,
                                                      .x = b->cq_n, .x_type = at, .dy = m->scratch.d_q, .dy_type = at});
        nm_linear_backward_input(m, (nm_linear_args){.W = P + w->q_b, .N = N, .IC = c->Rq, .OC = H * c->Dqk,
                                                     .dy = m->scratch.d_q, .dy_type = at, .dx = m->scratch.d_cq_n});
        nm_tp_all_reduce(m, m->scratch.d_cq_n, N * c->Rq);  // q_b_proj is column-parallel
        ops->zero(ops, m->scratch.d_cq, N * c->Rq);
        ops->rmsnorm_backward(ops, m->scratch.d_cq, G + w->q_a_norm, m->scratch.d_cq_n, b->cq, P + w->q_a_norm,
                              b->cq_rstd, N, c->Rq);
        nm_round_act(m, m->scratch.d_cq, N * c->Rq);
        nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->q_a, .N = N, .IC = D, .OC = c->Rq, .x = b->a,
                                                      .x_type = at, .dy = m->scratch.d_cq, .dy_type = at});
        nm_linear_backward_input(m, (nm_linear_args){.W = P + w->q_a, .N = N, .IC = D, .OC = c->Rq,
                                                     .dy = m->scratch.d_cq, .dy_type = at, .dx = m->scratch.d_a,
                                                     .beta = 1.0f});
    } else {
        nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->q, .N = N, .IC = D, .OC = H * c->Dqk, .x = b->a,
                                                      .x_type = at, .dy = m->scratch.d_q, .dy_type = at});
        if (m->tp.comm) {
            // q_proj is column-parallel: its part of d_a is summed over tp before joining the kv part
            nm_linear_backward_input(m, (nm_linear_args){.W = P + w->q, .N = N, .IC = D, .OC = H * c->Dqk,
                                                         .dy = m->scratch.d_q, .dy_type = at, .dx = m->tp.partial});
            nm_tp_all_reduce(m, m->tp.partial, N * D);
            ops->add_2d(ops, m->scratch.d_a, N * D, m->tp.partial, N * D, 1, N * D);
        } else {
            nm_linear_backward_input(m, (nm_linear_args){.W = P + w->q, .N = N, .IC = D, .OC = H * c->Dqk,
                                                         .dy = m->scratch.d_q, .dy_type = at, .dx = m->scratch.d_a,
                                                         .beta = 1.0f});
        }
    }
    // a = RMSNorm(x_in). d_a is whole on every rank (the tp sums above), so under sequence
    // parallelism each rank takes its rows: the all-gather's backward.
    ops->rmsnorm_backward(ops, d_res + s0 * D, G + w->input_norm, m->scratch.d_a + s0 * D, b->x_in + s0 * D,
                          P + w->input_norm, b->a_rstd + s0, n0, D);
}
