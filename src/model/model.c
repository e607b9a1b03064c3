// model.c: the composition, on top of the blocks: the decoder block as MLA + FFN (dense MLP
// or MoE), and the whole-model forward and backward over this stage's layers (dsv3-spec 3,
// 6.3 and 11 for the loss definitions, the backward of 7). Below it: the blocks (blocks.h:
// mla.c 3.2, mlp.c 3.3, moe.c 5 and 6.2, mtp.c 6.3, head.c the output head and
// cross-entropy), and under them the state (model_state.h, model_state.c), the linear layer
// (linear.c, bf16_twin.c) and the tensor/sequence-parallel helpers (parallel.c).
//
// Not here: the optimizer and the bias update (src/train/), file I/O (src/io/), kernels
// (src/ops/).
#include "model/blocks.h"

#include <math.h>
#include <string.h>

// --- one decoder block ------------------------------------------------------------------------

// Runs block l on b->x_in (B, T); writes b->x_out. Returns the block's balance loss (0 for
// dense blocks) and adds its expert counts to counts (E, may be NULL) when it is a MoE block.
static double block_forward(nm_model *m, int64_t l, int64_t B, int64_t T, int64_t *counts) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    block_acts *b = &m->act.blocks[l];
    int64_t N = B * T, D = c->D;
    b->B = B;
    b->T = T;
    nm_bf16_bind(m, b);  // saved in bf16: this block's copies

    nm_mla_forward(m, l, B, T);
    // FFN: x_out = x_mid + FFN(RMSNorm(x_mid)), the norm on this rank's rows (sequence
    // parallelism), else all of them.
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    ops->rmsnorm_forward(ops, b->f + s0 * D, b->f_rstd + s0, b->x_mid + s0 * D, m->params + w->post_norm, n0, D,
                         (float)c->rms_eps);
    if (nm_layer_is_moe(c, l)) return nm_moe_forward(m, l, B, T, counts);  // routed on this rank's rows
    // the dense MLP: column-parallel gate/up on every token, row-parallel down
    nm_sp_all_gather(m, b->f, N, D, NM_DT_F32);
    nm_tp_row_output_begin(m, b->x_out, b->x_mid, N, D);
    nm_mlp_forward(m, b->x_out, b->gate_up, b->act, b->f, w->mlp_gate_up, w->mlp_down, N, m->tp.F_loc);
    nm_tp_row_output_end(m, b->x_out, b->x_mid, N, D);
    return 0.0;
}

// On entry m->scratch.d_res (N, D) holds dLoss/d(x_out); on exit it holds dLoss/d(x_in).
// aux_seed is dLoss/d(balance loss of this block). With recomputation the block's
// intermediates are rebuilt first (same inputs, same deterministic ops: same values).
static void block_backward(nm_model *m, int64_t l, float aux_seed) {
    nm_bf16_bind(m, &m->act.blocks[l]);  // saved in bf16: this block's copies
    nm_bf16_restore_block(m);            // fp8: widened for its GEMMs
    if (m->recompute.full) block_forward(m, l, m->act.blocks[l].B, m->act.blocks[l].T, NULL);
    const nm_model_config *c = &m->cfg;
    const nm_layer_offsets *w = &m->table.layers[l];
    block_acts *b = &m->act.blocks[l];
    int64_t N = b->B * b->T, D = c->D;

    // FFN.  forward: x_out = x_mid + FFN(f), f = RMSNorm(x_mid)
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    if (m->recompute.layernorm && !m->recompute.full) {
        // selective recomputation: f was not kept (one shared buffer holds the last block's); the
        // forward's norm again, and every token's rows where the forward gathered them (a dense
        // block, or the shared experts, under sequence parallelism)
        m->ops->rmsnorm_forward(m->ops, b->f + s0 * D, b->f_rstd + s0, b->x_mid + s0 * D, m->params + w->post_norm, n0,
                                D, (float)c->rms_eps);
        if (!nm_layer_is_moe(c, l) || c->Fs > 0) nm_sp_all_gather(m, b->f, N, D, NM_DT_F32);
    }
    if (!nm_layer_is_moe(c, l)) {
        nm_sp_all_gather(m, m->scratch.d_res, N, D, NM_DT_F32);  // d(x_out) of every token (sequence parallelism)
        nm_mlp_backward(m, m->scratch.d_f, 0.0f, m->scratch.d_res, b->gate_up, b->act, b->f, w->mlp_gate_up,
                        w->mlp_down, N, m->tp.F_loc);
        nm_tp_sum_parts(m, m->scratch.d_f, N, D);  // each rank's gate/up rows gave part of d_f
    } else {
        nm_moe_backward(m, l, aux_seed);
    }
    // f = RMSNorm(x_mid); the residual path already carries d_res into x_mid.
    m->ops->rmsnorm_backward(m->ops, m->scratch.d_res + s0 * D, m->grads + w->post_norm, m->scratch.d_f + s0 * D,
                             b->x_mid + s0 * D, m->params + w->post_norm, b->f_rstd + s0, n0, D);

    // MLA
    nm_mla_backward(m, l);
}

// --- whole model ------------------------------------------------------------------------------

// The bf16 weight copy, rounded once per step (the optimizer wrote the weights through
// nm_model_params) in the storage the bf16 GEMM reads fastest. That storage is known only
// once the kernel is chosen (before the first step), so the copy is allocated here, on the
// first forward, and again only if the kernel changed; so is the activations' twin pool.
static int refresh_weights_bf16(nm_model *m, nm_error *err) {
    if (m->owner) {  // a pair's second model: the first's copy, refreshed there
        if (refresh_weights_bf16(m->owner, err) != 0) return -1;
        m->bf16.weights = m->owner->bf16.weights;
        m->bf16.weights_type = m->owner->bf16.weights_type;
        m->bf16.stale = 0;
        if (m->bf16.weights_type == NM_BF16 && m->precision == NM_PRECISION_BF16) nm_bf16_twins_reserve(m->bf16.twins);
        return 0;
    }
    nm_dtype type = m->ops->gemm_bf16_weight_type(m->ops);
    if (m->bf16.partial && (m->bf16.stale || type != m->bf16.weights_type))
        return nm_error_set(err, "forward: the weights were written through nm_model_params() while the distributed "
                                 "optimizer holds their fp32 values sharded over the data-parallel ranks (bf16): only "
                                 "the trainer's update may change them");
    if (!m->bf16.weights || type != m->bf16.weights_type) {
        m->ops->free(m->ops, m->bf16.weights);
        m->bf16.weights =
            m->ops->alloc(m->ops, m->table.n_floats * (type == NM_BF16 ? sizeof(uint16_t) : sizeof(float)));
        m->bf16.weights_type = type;
        m->bf16.stale = 1;
    }
    // and the activations' twins, placed when the arena was laid out (bf16_twin.c), once
    if (type == NM_BF16 && m->precision == NM_PRECISION_BF16) nm_bf16_twins_reserve(m->bf16.twins);
    if (!m->bf16.stale) return 0;
    if (type == NM_BF16) m->ops->cast_bf16(m->ops, m->bf16.weights, m->params, (int64_t)m->table.n_floats);
    else m->ops->round_bf16(m->ops, m->bf16.weights, m->params, (int64_t)m->table.n_floats);
    m->bf16.stale = 0;
    return 0;
}

void *nm_model_weight_copy(nm_model *m, nm_dtype *type) {
    *type = m->bf16.weights_type;
    return m->bf16.weights;
}

int nm_model_weight_copy_prepare(nm_model *m, nm_error *err) {
    if (m->precision == NM_PRECISION_FP32) return nm_error_set(err, "weight copy: an fp32 model keeps none");
    return refresh_weights_bf16(m, err);
}

void nm_model_weight_copy_written(nm_model *m, int partial) {
    m->bf16.stale = 0;
    m->bf16.partial = partial;
}

int nm_model_forward(nm_model *m, const int32_t *tokens, int64_t B, int64_t T, const nm_loss_options *opt,
                     nm_loss_terms *loss, float *logits_out, nm_error *err) {
    return nm_model_forward_stage(m, tokens, NULL, B, T, opt, loss, logits_out, err);
}

// The end of every stage's forward: the expert counts of its chunk's layers summed over tp (each
// tp rank routed its own tokens under sequence parallelism), then any collective failure inside
// it reported.
static int forward_done(nm_model *m, const nm_loss_options *opt, nm_error *err) {
    const int first_row = m->pipe.chunk_moe_row[m->pipe.chunk],
              rows = m->pipe.chunk_moe_row[m->pipe.chunk + 1] - first_row;
    nm_error e;
    if (m->tp.sp && rows > 0 && !nm_model_faulted(m) &&
        nm_comm_all_reduce(m->tp.comm, m->routing.expert_counts + (size_t)first_row * (size_t)m->cfg.E,
                           (int64_t)rows * m->cfg.E, NM_DT_I64, NM_RED_SUM, &e) != 0)
        nm_model_latch(m, NM_FAULT_TP, &e);
    if (nm_model_report_fault(m, "forward", err) != 0) return -1;
    m->act.have_forward = !opt->inference;
    return 0;
}

int nm_model_forward_stage(nm_model *m, const int32_t *tokens, const float *input, int64_t B, int64_t T,
                           const nm_loss_options *opt, nm_loss_terms *loss, float *logits_out, nm_error *err) {
    const nm_model_config *c = &m->cfg;
    const nm_model_stage *st = &m->pipe.stage;
    if (!st->first && !input)
        return nm_error_set(err, "forward: this pipeline stage needs the previous stage's output");
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    int64_t D = c->D, V = c->V, N = B * T;
    m->act.have_forward = 0;
    int64_t T_min = opt->inference ? 1 : 2;
    if (B < 1 || B > m->B_max || T < T_min || T > m->T_max) {
        return nm_error_set(err, "forward: batch %lld x seq %lld outside the allocated 1..%lld x %lld..%lld",
                            (long long)B, (long long)T, (long long)m->B_max, (long long)T_min, (long long)m->T_max);
    }
    if (!opt->inference && T < c->M + 2) {
        return nm_error_set(err, "forward: sequence length %lld too short for %lld MTP depths (needs >= %lld)",
                            (long long)T, (long long)c->M, (long long)(c->M + 2));
    }
    if (m->tp.comm && logits_out) {
        return nm_error_set(err, "forward: the logits of a tensor-parallel model are split over the vocabulary "
                                 "(tensor_parallel_size %d); gather them or run the forward at one process",
                            m->tp.comm->size);
    }
    for (int64_t i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) {
            return nm_error_set(err,
                                "forward: token id %d at row %lld position %lld is outside the vocabulary [0, %lld)",
                                tokens[i], (long long)(i / T), (long long)(i % T), (long long)V);
        }
    }
    if (m->precision != NM_PRECISION_FP32 && refresh_weights_bf16(m, err) != 0) return -1;
    m->act.B = B;
    m->act.T = T;
    m->act.opt = *opt;
    memcpy(m->act.tokens, tokens, (size_t)N * sizeof(int32_t));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T; t++) m->act.targets[b * T + t] = t + 1 < T ? tokens[b * T + t + 1] : -1;
    }
    memset(m->routing.expert_counts, 0, (size_t)m->routing.n_moe * (size_t)(c->E > 0 ? c->E : 1) * sizeof(int64_t));

    // main stack (this stage's part of it)
    double aux = 0.0;
    int moe_row = m->pipe.chunk_moe_row[m->pipe.chunk];  // this chunk's rows (zeroed above: the others add 0)
    if (st->first) nm_tp_embedding_forward(m, m->act.stage_in, tokens, N);
    else ops->copy_2d(ops, m->act.stage_in, N * D, input, N * D, 1, N * D);
    for (int64_t l = st->layer_begin; l < st->layer_end; l++) {
        int64_t *counts = nm_layer_is_moe(c, l) ? m->routing.expert_counts + (size_t)(moe_row++) * c->E : NULL;
        aux += block_forward(m, l, B, T, counts);
    }
    if (!st->last) {
        *loss = (nm_loss_terms){.loss = (double)opt->aux_weight * aux, .aux = aux, .tokens = N};
        return forward_done(m, opt, err);
    }
    const float *h_last = m->act.stage_out;
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    ops->rmsnorm_forward(ops, m->act.h0 + s0 * D, m->act.h0_rstd + s0, h_last + s0 * D, P + m->table.final_norm, n0, D,
                         (float)c->rms_eps);
    nm_sp_all_gather(m, m->act.h0, N, D, NM_DT_F32);  // the vocabulary-parallel head reads every token
    nm_head_forward(m, m->act.losses, m->act.lse, m->act.logits, m->act.h0, NM_F32, m->act.targets, N, logits_out);
    double ce = T > 1 ? nm_head_sum_losses(m, m->act.losses, N) / (double)(B * (T - 1)) : 0.0;

    // multi-token prediction (dsv3-spec 6.3, 11): depth k reads h^{k-1} and tokens shifted by k
    double mtp = 0.0;
    int64_t M = opt->inference ? 0 : c->M;
    for (int64_t k = 1; k <= M; k++) {
        int64_t l = c->L + k - 1, Tk = T - k;
        nm_mtp_input_forward(m, k, tokens, B, T);
        int64_t *counts = nm_layer_is_moe(c, l) ? m->routing.expert_counts + (size_t)(moe_row++) * c->E : NULL;
        aux += block_forward(m, l, B, Tk, counts);
        mtp += nm_mtp_output_forward(m, k, B, T) / (double)(B * (Tk - 1));
    }
    if (M > 0) mtp /= (double)M;

    loss->ce = ce;
    loss->mtp = mtp;
    loss->aux = aux;
    loss->loss = ce + (double)opt->mtp_weight * mtp + (double)opt->aux_weight * aux;
    loss->tokens = N;
    return forward_done(m, opt, err);
}

void nm_model_set_backward_hook(nm_model *m, nm_backward_hook fn, void *ctx) {
    m->hook = fn;
    m->hook_ctx = ctx;
}

static void layer_finished(nm_model *m, int64_t l) {
    nm_error e;
    if (m->hook && !nm_model_faulted(m) && m->hook(m->hook_ctx, (int)l, &e) != 0) nm_model_latch(m, NM_FAULT_HOOK, &e);
}

int nm_model_backward(nm_model *m, nm_error *err) { return nm_model_backward_stage(m, NULL, err); }

int nm_model_backward_stage(nm_model *m, const float *d_output, nm_error *err) {
    const nm_model_stage *st = &m->pipe.stage;
    if (!st->last && !d_output)
        return nm_error_set(err, "backward: this pipeline stage needs the gradient of its output");
    if (!m->act.have_forward) return nm_error_set(err, "backward: no forward pass to differentiate");
    m->act.have_forward = 0;  // activations are consumed (logits are overwritten in place)
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    float *G = m->grads;
    int64_t B = m->act.B, T = m->act.T, N = B * T, D = c->D;
    float gs = m->act.opt.grad_scale;
    float aux_seed = m->act.opt.aux_weight * gs;

    if (!st->last) {
        ops->copy_2d(ops, m->scratch.d_res, N * D, d_output, N * D, 1, N * D);
        goto main_blocks;
    }
    // MTP depths, deepest first: depth k's block output also feeds depth k+1's hnorm.
    ops->zero(ops, m->scratch.d_h0, N * D);
    for (int64_t k = c->M; k >= 1; k--) {
        int64_t l = c->L + k - 1, Tk = T - k;
        float scale = m->act.opt.mtp_weight / (float)c->M / (float)(B * (Tk - 1)) * gs;
        nm_mtp_output_backward(m, k, B, T, scale);
        block_backward(m, l, aux_seed);
        nm_mtp_input_backward(m, k, B, T);
        layer_finished(m, l);
    }

    // main head: logits = h0 . lm_head^T ; h0 = RMSNorm(h_L)
    nm_head_backward(m, m->scratch.d_h0, 1.0f, m->act.logits, m->act.lse, m->act.h0, NM_F32, m->act.targets,
                     gs / (float)(B * (T - 1)), N);
    // sequence parallelism: d_h0 holds each rank's part for every token (its vocabulary rows,
    // the MTP rows it holds); summed, each rank keeps its rows
    nm_sp_reduce_scatter(m, m->scratch.d_h0, N, D);
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    ops->zero(ops, m->scratch.d_res, N * D);
    ops->rmsnorm_backward(ops, m->scratch.d_res + s0 * D, G + m->table.final_norm, m->scratch.d_h0 + s0 * D,
                          m->act.stage_out + s0 * D, P + m->table.final_norm, m->act.h0_rstd + s0, n0, D);
main_blocks:
    for (int64_t l = st->layer_end - 1; l >= st->layer_begin; l--) {
        block_backward(m, l, aux_seed);
        layer_finished(m, l);
    }
    // d_res is now dLoss/d(stage input): the embedding's gradient, or the previous stage's
    if (st->first) {
        nm_sp_all_gather(m, m->scratch.d_res, N, D, NM_DT_F32);  // this rank's vocabulary rows see every token
        nm_tp_embedding_backward(m, m->scratch.d_res, m->act.tokens, N);
    }
    return nm_model_report_fault(m, "backward", err);
}

// --- paired micro-batches ---------------------------------------------------------------------

typedef struct pair_job {
    nm_model *m;
    const int32_t *tokens;
    const float *io;            // forward: the stage's input; backward: d(output)
    int64_t B, T;
    const nm_loss_options *opt;
    nm_loss_terms *lt;
    int rc;
    nm_error err;
} pair_job;

static void pair_forward(void *ctx) {
    pair_job *j = ctx;
    j->rc = nm_model_forward_stage(j->m, j->tokens, j->io, j->B, j->T, j->opt, j->lt, NULL, &j->err);
}

static void pair_backward(void *ctx) {
    pair_job *j = ctx;
    j->rc = nm_model_backward_stage(j->m, j->io, &j->err);
}

int nm_model_pair_run(nm_coop *c, nm_model *fwd, const int32_t *tokens, const float *input, int64_t B, int64_t T,
                      const nm_loss_options *opt, nm_loss_terms *lt, nm_model *back, const float *d_output,
                      double ran[2], nm_error *err) {
    if (fwd == back) return nm_error_set(err, "paired micro-batches: the forward and the backward need two models");
    pair_job jf = {.m = fwd, .tokens = tokens, .io = input, .B = B, .T = T, .opt = opt, .lt = lt};
    pair_job jb = {.m = back, .io = d_output};
    nm_model_set_coop(fwd, c, back);
    nm_model_set_coop(back, c, fwd);
    nm_coop_run(c, pair_forward, &jf, pair_backward, &jb, ran);
    nm_model_set_coop(fwd, NULL, NULL);
    nm_model_set_coop(back, NULL, NULL);
    if (jf.rc != 0) {
        *err = jf.err;
        return nm_error_prefix(err, "the paired forward");
    }
    if (jb.rc != 0) {
        *err = jb.err;
        return nm_error_prefix(err, "the paired backward");
    }
    return 0;
}
