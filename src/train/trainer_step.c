// trainer_step.c: one optimizer step (trainer_internal.h; the sequence is trainer.c's header):
// the micro-batches (or the pipeline schedule), the gradient reduction over the data-parallel
// groups, the checks every rank agrees on, the divergence guard or the update, the step's
// statistics and evaluation; trainer_report.c writes what it measured.
#define _GNU_SOURCE

#include "train/trainer_internal.h"

// The name the lowest rank holding one gave, on every rank ("" when no rank has one).
static int first_bad_name(nm_trainer *t, const char *mine, char out[128], nm_error *err) {
    out[0] = 0;
    if (t->world->size == 1) {
        if (mine) snprintf(out, 128, "%s", mine);
        return 0;
    }
    int32_t who = mine ? t->world->rank : INT32_MAX;
    if (nm_comm_all_reduce(t->world, &who, 1, NM_DT_I32, NM_RED_MIN, err) != 0) return -1;
    if (who == INT32_MAX) return 0;
    int32_t words[32] = {0};
    if (t->world->rank == who) snprintf((char *)words, sizeof(words), "%s", mine);
    if (nm_comm_broadcast(t->world, words, 32, NM_DT_I32, who, err) != 0) return -1;
    snprintf(out, 128, "%s", (const char *)words);
    return 0;
}

// Sequence parallelism: the rows computed on each rank's tokens (norms, router, eh_proj;
// NM_TENSOR_SEQ_PARTIAL) hold partial gradients; they are summed over tp once per step, after
// the last micro-batch's backward has finished their layer (layer -1: the global rows), and
// before any bucket holding them starts reducing over dp.
static int tp_sum_partial_rows(nm_trainer *t, int layer, nm_error *err) {
    if (!t->sp) return 0;
    const nm_param_table *table = nm_model_table(t->model);
    float *g = nm_model_grads(t->model);
    for (int r = 0; r < table->n_rows; r++) {
        const nm_tensor_spec *row = &table->rows[r];
        if (!(row->flags & NM_TENSOR_SEQ_PARTIAL) || (row->flags & NM_TENSOR_TIED) || t->tp_summed[r]) continue;
        if (layer != -2 && row->layer != layer) continue;  // -2: every row not summed yet
        // gradient sharding: a row that adds up in the buffer over the micro-batches is summed at the end
        if (layer != -2 && t->zero && nm_zero_row_deferred(t->zero, r)) continue;
        if (nm_comm_all_reduce(t->mesh->tp, g + row->offset, row->numel, NM_DT_F32, NM_RED_SUM, err) != 0) return -1;
        t->tp_summed[r] = 1;
    }
    return 0;
}

static int zero_backward_hook(void *trainer, int layer, nm_error *err) {
    nm_trainer *t = trainer;
    if (tp_sum_partial_rows(t, layer, err) != 0) return -1;
    return nm_zero_layer_done(t->zero, layer, err);
}

// Floats of this rank's embedding (its vocabulary shard under TP), which the embedding group
// of the first and last pipeline stage sums and keeps equal.
static int64_t embed_floats(const nm_trainer *t) {
    const nm_param_table *tb = nm_model_table(t->model);
    int row = nm_param_table_find(tb, "model.embed_tokens.weight");
    NM_CHECK(row >= 0, "embedding group without an embedding row");
    return tb->rows[row].numel;
}

// After the micro-batches: gradients reduce-scattered to their owners, and the loss terms,
// the finiteness flag and the expert loads all-reduced, so every rank decides the same.
static int reduce_step(nm_trainer *t, nm_step_metrics *m, int n_moe, int *finite, nm_error *err) {
    if (t->world->size == 1) return 0;
    if (tp_sum_partial_rows(t, -2, err) != 0) return -1;
    if (t->emb && t->emb->size > 1) {
        // The embedding's gradient summed over the first stage and the last stage's copy (each
        // dp rank with its peer, before the dp reduction), so both hold the one-process
        // gradient and their AdamW updates keep the two copies equal. Under TP each holds the
        // same vocabulary shard.
        if (nm_comm_all_reduce(t->emb, nm_model_grads(t->model) + nm_model_table(t->model)->embed, embed_floats(t),
                               NM_DT_F32, NM_RED_SUM, err) != 0)
            return -1;
    }
    if (nm_zero_finish(t->zero, err) != 0) return -1;
    nm_comm *dp = t->mesh->dp;
    double dpn = (double)t->mesh->n.dp;
    double terms[5] = {m->loss, m->ce_loss, m->mtp_loss, m->aux_loss, *finite ? 0.0 : 1.0};
    if (nm_comm_all_reduce(dp, terms, 5, NM_DT_F64, NM_RED_SUM, err) != 0) return -1;
    // Over the stages: CE and MTP live on the last stage (the others add 0), each stage adds its
    // layers' balance loss, and a non-finite value on any stage counts everywhere.
    if (t->pipe && nm_comm_all_reduce(t->mesh->pp, terms, 5, NM_DT_F64, NM_RED_SUM, err) != 0) return -1;
    m->loss = terms[0] / dpn;
    m->ce_loss = terms[1] / dpn;
    m->mtp_loss = terms[2] / dpn;
    m->aux_loss = terms[3] / dpn;
    *finite = terms[4] == 0.0;
    int64_t E = t->mcfg.E;
    if (n_moe > 0 && nm_comm_all_reduce(dp, t->step_counts, (int64_t)n_moe * E, NM_DT_I64, NM_RED_SUM, err) != 0)
        return -1;
    return 0;
}

// This rank's part of the squared gradient norm: the rows it owns, except that a tensor
// tensor parallelism does not split is held alike by every tp rank and counted on tp rank 0
// only (the shards of a split one are distinct and each counts).
static double tp_grad_sumsq(nm_trainer *t) {
    const float *g = nm_model_grads(t->model);
    if (t->mesh->n.tp == 1) return nm_optimizer_grad_sumsq_except(t->optim, g, t->embed_copy_row);
    const nm_optimizer *o = t->optim;
    const nm_param_table *table = nm_model_table(t->model);
    double sum = 0.0;
    for (int64_t c = 0; c < o->n_chunks; c++) {
        if (o->chunks[c].row == t->embed_copy_row) continue;  // the last stage's copy: counted on the first
        const nm_tensor_spec *row = &table->rows[o->chunks[c].row];
        // under sequence parallelism the routed experts are owned over edp (tp included): once
        if (t->mesh->tp_rank != 0 && row->tp_dim < 0 && !(t->sp && (row->flags & NM_TENSOR_EXPERT))) continue;
        const float *x = g + o->chunks[c].offset;
        double part = 0.0;
        for (size_t i = 0; i < o->chunks[c].len; i++) part += (double)x[i] * (double)x[i];
        sum += part;
    }
    return sum;
}

// The pre-step checks over the whole job: the norm from every rank's owned rows (each tensor
// is owned once in the world), clipping from it, and the first non-finite tensor's name.
static int check_grads(nm_trainer *t, double max_norm, nm_grad_report *rep, nm_error *err) {
    if (t->world->size == 1) {
        nm_optimizer_check_grads(t->optim, nm_model_grads(t->model), max_norm, rep);
        return 0;
    }
    memset(rep, 0, sizeof(*rep));
    double sumsq = tp_grad_sumsq(t);
    if (nm_comm_all_reduce(t->world, &sumsq, 1, NM_DT_F64, NM_RED_SUM, err) != 0) return -1;
    rep->norm = sqrt(sumsq);
    rep->bad_row = -1;
    rep->clip_scale = 1.0f;
    if (!isfinite(rep->norm)) {
        rep->finite = 0;
        int row = nm_optimizer_first_nonfinite(t->optim, nm_model_grads(t->model));
        static char name[128];
        if (first_bad_name(t, row >= 0 ? nm_model_table(t->model)->rows[row].name : NULL, name, err) != 0) return -1;
        rep->bad_name = name[0] ? name : NULL;
        return 0;
    }
    rep->finite = 1;
    if (max_norm > 0.0) {
        double coef = max_norm / (rep->norm + 1e-6);
        rep->clip_scale = coef < 1.0 ? (float)coef : 1.0f;
    }
    return 0;
}

// --- pipeline parallelism -------------------------------------------------------------------

typedef struct pp_step {
    nm_trainer *t;
    nm_step_metrics *m;
    int n_moe;
    int *finite;
    int reducing;               // the gradient reduction has begun (the first final backward)
} pp_step;

// After a micro-batch's forward on `model`: its expert loads into the step's.
static void add_expert_counts(nm_trainer *t, nm_model *model, int n_moe) {
    const int64_t *counts = nm_model_expert_counts(model, NULL, NULL);
    for (int64_t i = 0; i < (int64_t)n_moe * t->mcfg.E; i++) t->step_counts[i] += counts[i];
}

// Its loss terms into the step's, in micro-batch order.
static void add_loss_terms(nm_trainer *t, nm_step_metrics *m, const nm_loss_terms *lt, int *finite) {
    m->loss += lt->loss / (double)t->accum;
    m->ce_loss += lt->ce / (double)t->accum;
    m->mtp_loss += lt->mtp / (double)t->accum;
    m->aux_loss += lt->aux / (double)t->accum;
    if (!isfinite(lt->loss)) *finite = 0;
}

// After micro-batch i's forward on this stage: its loss terms (the last stage's CE and MTP,
// every stage's balance loss) and expert loads, summed in micro-batch order as one process does.
static int pp_after_forward(void *ctx, int64_t micro, const nm_loss_terms *lt, nm_error *err) {
    (void)err;
    pp_step *ps = ctx;
    add_expert_counts(ps->t, nm_pipeline_model_of(ps->t->pipe, micro, ps->t->accum), ps->n_moe);
    add_loss_terms(ps->t, ps->m, lt, ps->finite);
    return 0;
}

// The last micro-batch's backward on a chunk finishes that chunk's gradients (as in the
// one-stage loop). Chunks finish from the last down, so layers still finish in decreasing
// order; the hook is off in between, while other chunks' earlier micro-batches still add.
static int pp_before_backward(void *ctx, int64_t micro, int64_t chunk, nm_error *err) {
    (void)err;
    (void)chunk;
    pp_step *ps = ctx;
    nm_trainer *t = ps->t;
    nm_model *model = nm_pipeline_model_of(t->pipe, micro, t->accum);  // (paired: either of two)
    if (t->zero && t->zero->be) {
        // gradient sharding (one chunk per rank): every micro-batch's backward is reduced
        nm_zero_begin(t->zero, nm_model_grads(t->model), !ps->reducing);
        memset(t->tp_summed, 0, (size_t)nm_model_table(t->model)->n_rows);
        ps->reducing = 1;
        nm_model_set_backward_hook(model, zero_backward_hook, t);
    } else if (micro == t->accum - 1 && t->zero) {
        if (!ps->reducing) {
            nm_zero_begin(t->zero, nm_model_grads(t->model), 1);
            memset(t->tp_summed, 0, (size_t)nm_model_table(t->model)->n_rows);
            ps->reducing = 1;
        }
        if (t->cfg.overlap_grad_reduce) nm_model_set_backward_hook(model, zero_backward_hook, t);
    }
    return 0;
}

static int pp_after_backward(void *ctx, int64_t micro, int64_t chunk, nm_error *err) {
    (void)chunk;
    (void)err;
    pp_step *ps = ctx;
    nm_model_set_backward_hook(nm_pipeline_model_of(ps->t->pipe, micro, ps->t->accum), NULL, NULL);
    if (ps->t->zero && ps->t->zero->be) return nm_zero_wait_started(ps->t->zero, err);
    return 0;
}

// The step's micro-batches through this stage under 1F1B; the stages' idle fractions (time in
// send/recv over the schedule's time) gathered for the metrics.
static int pipeline_micro_batches(nm_trainer *t, const nm_loss_options *opt, nm_step_metrics *m, int n_moe,
                                  int *finite, nm_error *err) {
    const nm_train_config *c = &t->cfg;
    int64_t BT = c->micro_batch * t->T;
    double ta = now_s();
    for (int64_t i = 0; i < t->accum; i++) {
        if (nm_loader_next_batch(t->train_data, t->tokens_all + i * BT, c->micro_batch, err) != 0) return -1;
    }
    m->t_data = now_s() - ta;
    pp_step ps = {t, m, n_moe, finite, 0};
    nm_pipeline_hooks hooks = {pp_after_forward, pp_before_backward, pp_after_backward, &ps};
    nm_pipeline_times times;
    int rc = nm_pipeline_train(t->pipe, t->tokens_all, t->accum, opt, &hooks, &times, err);
    nm_model_set_backward_hook(t->model, NULL, NULL);
    if (t->model_pair) nm_model_set_backward_hook(t->model_pair, NULL, NULL);
    if (rc != 0) return -1;
    m->t_forward = times.forward;
    m->t_backward = times.backward;
    memset(t->pp_idle, 0, (size_t)t->mesh->n.pp * sizeof(double));
    if (t->mesh->dp_rank == 0 && t->mesh->tp_rank == 0)
        t->pp_idle[t->mesh->pp_rank] = times.total > 0 ? times.comm / times.total : 0.0;
    return nm_comm_all_reduce(t->world, t->pp_idle, t->mesh->n.pp, NM_DT_F64, NM_RED_SUM, err);
}

// The expert-load and bias statistics over every stage's MoE layers (max, min, max); a stage
// without MoE layers contributes nothing.
static int pipeline_balance_stats(nm_trainer *t, nm_balance_stats *bs, int n_moe, nm_error *err) {
    double mx[2] = {bs->load_max_over_mean, n_moe > 0 && isfinite(bs->bias_max) ? bs->bias_max : -INFINITY};
    double mn = n_moe > 0 && isfinite(bs->bias_min) ? bs->bias_min : INFINITY;
    if (nm_comm_all_reduce(t->mesh->pp, mx, 2, NM_DT_F64, NM_RED_MAX, err) != 0 ||
        nm_comm_all_reduce(t->mesh->pp, &mn, 1, NM_DT_F64, NM_RED_MIN, err) != 0)
        return -1;
    bs->load_max_over_mean = mx[0];
    // No finite bias anywhere: a dense model (0, as one process reports) or a router that
    // ignores the bias (NaN, likewise).
    int moe_anywhere = 0;
    for (int64_t l = 0; l < t->mcfg.n_layers; l++) moe_anywhere |= nm_layer_is_moe(&t->mcfg, l);
    double none = !moe_anywhere || nm_routing_uses_bias(&t->mcfg) ? 0.0 : NAN;
    bs->bias_max = isfinite(mn) ? mx[1] : none;
    bs->bias_min = isfinite(mn) ? mn : none;
    return 0;
}

int nm_trainer_evaluate(nm_trainer *t, double *val_loss, nm_error *err) {
    *val_loss = NAN;
    if (!t->valid_data) return 0;
    // The same held-out batches every time, so successive values are comparable.
    nm_loader_set_cursor(t->valid_data, (nm_data_cursor){.sample = 0});
    nm_loss_options opt = {.mtp_weight = 0.0f, .aux_weight = 0.0f, .grad_scale = 1.0f};
    double sum = 0.0;
    const int64_t n_batches = nm_trainer_eval_batches(t);
    for (int64_t i = 0; i < n_batches; i++) {
        nm_loss_terms lt;
        if (nm_loader_next_batch(t->valid_data, t->tokens, t->cfg.micro_batch, err) != 0) return -1;
        if (t->pipe) {
            if (nm_pipeline_forward(t->pipe, t->tokens, &opt, &lt, err) != 0) return -1;
        } else if (nm_model_forward(t->model, t->tokens, t->cfg.micro_batch, t->T, &opt, &lt, NULL, err) != 0) {
            return -1;
        }
        sum += lt.ce;
    }
    *val_loss = sum / (double)n_batches;
    // The loss is the last stage's; every stage reports it.
    if (t->pipe && nm_comm_broadcast(t->mesh->pp, val_loss, 1, NM_DT_F64, (int)t->mesh->n.pp - 1, err) != 0) return -1;
    return 0;
}

// Before micro-batch `micro`'s backward on `model`. The last one's finishes the gradients:
// buckets start reducing as soon as their layers are done (overlap_grad_reduce), the rest in
// reduce_step. Under gradient sharding (optim_grads) every micro-batch's backward is reduced so.
static void backward_begin(nm_trainer *t, nm_model *model, int64_t micro) {
    int last = micro == t->accum - 1, shard_grads = t->zero && t->zero->be;
    if (t->zero && (last || shard_grads)) {
        nm_zero_begin(t->zero, nm_model_grads(t->model), micro == 0);
        memset(t->tp_summed, 0, (size_t)nm_model_table(t->model)->n_rows);
        if (t->cfg.overlap_grad_reduce || shard_grads) nm_model_set_backward_hook(model, zero_backward_hook, t);
    }
}

// ... and after it (rc: the backward's): under gradient sharding its buckets are waited for,
// folded into this rank's shard and released (the global rows' buckets wait for reduce_step).
static int backward_end(nm_trainer *t, nm_model *model, int rc, nm_error *err) {
    nm_model_set_backward_hook(model, NULL, NULL);
    if (rc != 0) return -1;
    if (t->zero && t->zero->be && nm_zero_wait_started(t->zero, err) != 0) return -1;
    return 0;
}

// One micro-batch outside the pipeline: forward -> backward (grads +=) on tokens (micro_batch,
// T). *lt gets the micro-batch's own loss terms.
static int accumulate_micro_batch(nm_trainer *t, int64_t micro, const int32_t *tokens, const nm_loss_options *opt,
                                  nm_step_metrics *m, int n_moe, int *finite, nm_loss_terms *lt, nm_error *err) {
    double tb = now_s();
    if (nm_model_forward(t->model, tokens, t->cfg.micro_batch, t->T, opt, lt, NULL, err) != 0) return -1;
    add_expert_counts(t, t->model, n_moe);
    double tc = now_s();
    backward_begin(t, t->model, micro);
    if (backward_end(t, t->model, nm_model_backward(t->model, err), err) != 0) return -1;
    double td = now_s();
    m->t_forward += tc - tb;
    m->t_backward += td - tc;
    add_loss_terms(t, m, lt, finite);
    return 0;
}

// --- paired micro-batches (moe_pair_micro_batches) -------------------------------------------
//
// DeepSeek-V3's DualPipe overlap without a pipeline (pipeline.c pairs them in 1F1B; Megatron-Core's
// combined 1F1B): micro-batch i+1's forward runs beside micro-batch i's backward, on a second
// model holding its activations (nm_model_create_pair; the same weights and gradients), as two
// jobs on this thread (core/coop.h). Each job runs until it has started an expert all-to-all and
// would wait for it, then the other computes meanwhile. A forward writes nothing a backward reads
// and the backwards still add into the gradients in micro-batch order, so every number is the
// one of forward -> backward one micro-batch at a time.

static int paired_micro_batches(nm_trainer *t, const nm_loss_options *opt, nm_step_metrics *m, int n_moe,
                                int *finite, nm_error *err) {
    nm_model *model[2] = {t->model, t->model_pair};
    double ta = now_s();
    if (nm_loader_next_batch(t->train_data, t->tokens, t->cfg.micro_batch, err) != 0) return -1;
    double tb = now_s();
    m->t_data += tb - ta;
    nm_loss_terms lt;
    if (nm_model_forward(model[0], t->tokens, t->cfg.micro_batch, t->T, opt, &lt, NULL, err) != 0) return -1;
    add_expert_counts(t, model[0], n_moe);
    add_loss_terms(t, m, &lt, finite);
    m->t_forward += now_s() - tb;
    for (int64_t i = 0; i < t->accum; i++) {
        nm_model *back = model[i % 2], *fwd = model[(i + 1) % 2];
        backward_begin(t, back, i);
        if (i + 1 == t->accum) {  // the last backward, alone
            double tc = now_s();
            if (backward_end(t, back, nm_model_backward(back, err), err) != 0) return -1;
            m->t_backward += now_s() - tc;
            break;
        }
        ta = now_s();
        if (nm_loader_next_batch(t->train_data, t->tokens, t->cfg.micro_batch, err) != 0) return -1;
        m->t_data += now_s() - ta;
        double ran[2] = {0, 0};
        int rc = nm_model_pair_run(t->coop, fwd, t->tokens, NULL, t->cfg.micro_batch, t->T, opt, &lt, back, NULL, ran,
                                   err);
        m->t_forward += ran[0];
        m->t_backward += ran[1];
        if (backward_end(t, back, rc, err) != 0) return -1;
        add_expert_counts(t, fwd, n_moe);
        add_loss_terms(t, m, &lt, finite);
    }
    return 0;
}

// The divergence guard, or the update: a non-finite loss or gradient skips the step
// (parameters, moments and biases untouched), names where it started and counts the streak
// (*diverged once it reaches max_nan_streak); else AdamW with the clip factor inside, the
// parameters all-gathered over the ranges, and the aux-loss-free bias update. *t_comm gets
// the all-gather's seconds.
static int guard_or_update(nm_trainer *t, int64_t step, int finite, const nm_grad_report *rep, nm_step_metrics *m,
                           int n_moe, int *diverged, double *t_comm, nm_error *err) {
    const nm_train_config *c = &t->cfg;
    int64_t E = t->mcfg.E;
    *diverged = 0;
    *t_comm = 0.0;
    if (!finite || !rep->finite) {
        // Name where it started: a non-finite parameter if the loss itself is not finite (a NaN
        // weight poisons every gradient), else the first tensor with a non-finite gradient.
        m->skipped = 1;
        t->skipped_steps++;
        const char *where = rep->bad_name;
        char where_buf[128];
        if (!finite) {
            int row = nm_optimizer_first_nonfinite(t->optim, t->model_params_readonly);
            if (first_bad_name(t, row >= 0 ? nm_model_table(t->model)->rows[row].name : NULL, where_buf, err) != 0)
                return -1;
            where = where_buf[0] ? where_buf : NULL;
        }
        char what[200];
        if (where) snprintf(what, sizeof(what), "%s (first in %s)", finite ? "gradient" : "loss; non-finite parameter", where);
        else snprintf(what, sizeof(what), "%s", finite ? "gradient" : "loss");
        if (t->nan_streak++ == 0) snprintf(t->nan_first, sizeof(t->nan_first), "%s", what);
        if (t->rank0)
            fprintf(stderr, "step %lld: non-finite %s; update skipped (%lld in a row)\n", (long long)step, what,
                    (long long)t->nan_streak);
        *diverged = t->nan_streak >= t->opts.max_nan_streak;
        return 0;
    }
    t->nan_streak = 0;
    nm_optimizer_step_scaled(t->optim, nm_model_params(t->model), nm_model_grads(t->model), rep->clip_scale, m->lr);
    if (t->zero) {
        double tg = now_s();
        float *params = nm_model_params(t->model);
        nm_dtype copy_type = NM_F32;
        void *copy = t->zero->copy_rows ? nm_model_weight_copy(t->model, &copy_type) : NULL;
        if (copy ? nm_zero_all_gather_updated(t->zero, params, copy, copy_type, t->ops, err)
                 : nm_zero_all_gather_params(t->zero, params, err))
            return -1;
        // Both embedding holders applied the same gradient; at dp > 2 MPI may sum it in
        // another order for the two stages' buckets, so the first stage's weights are
        // copied over the last stage's: the tie then holds exactly, whatever the order.
        if (t->emb && t->emb->size > 1 &&
            nm_comm_broadcast(t->emb, params + nm_model_table(t->model)->embed, embed_floats(t), NM_DT_F32, 0, err) != 0)
            return -1;
        if (copy) {  // sharded master weights: the copy is written here, not by the next forward
            nm_zero_copy_whole_rows(t->zero, params, copy, copy_type, t->ops);
            nm_zero_release_master(t->zero, params, t->ops);
            nm_model_weight_copy_written(t->model, 1);
        }
        *t_comm = now_s() - tg;
    }
    float gamma = (float)nm_bias_gamma_at(c->balance.bias_update_speed, c->balance.bias_update_stop_step, step);
    // Aux-loss-free balancing exists for noaux_tc only: other methods never read the bias.
    if (gamma > 0.0f && nm_routing_uses_bias(&t->mcfg)) {
        for (int i = 0; i < n_moe; i++)
            t->ops->router_bias_update(t->ops, (float *)t->bias_ptrs[i], t->step_counts + (size_t)i * E, E, gamma);
    }
    return 0;
}

// tokens/s, TFLOP/s and MFU of a step of dt seconds. The peak is one short timing at start-up
// (measure_gemm_peak, the backend's measure_peak); a step whose whole rate beats it proves it low (the machine was busy
// while it was timed: 103-107% MFU was seen for 300 steps), so the peak rises to that rate and
// the MFU never exceeds 100%.
static void throughput(nm_trainer *t, nm_step_metrics *m, int64_t step, double dt) {
    int64_t step_tokens = t->cfg.global_batch * t->cfg.seq_len;
    t->tokens_seen += step_tokens;
    m->tokens_per_s = (double)step_tokens / dt;
    m->tflops = t->flops_per_token * m->tokens_per_s / 1e12;
    double achieved = t->flops_per_token * m->tokens_per_s;
    if (achieved > t->peak_flops) {
        if (t->rank0 && !t->peak_raised)
            fprintf(stderr, "note: step %lld ran at %.1f GFLOP/s, above the %.1f GFLOP/s peak timed at start-up (the "
                    "machine was busy then); the MFU's peak is raised to the best rate seen\n", (long long)step,
                    achieved / 1e9, t->peak_flops / 1e9);
        t->peak_raised = 1;
        t->peak_flops = achieved;
    }
    m->mfu = achieved / t->peak_flops;
}

// The step's routing statistics over the job: expert loads and biases, and the expert-parallel
// exchange (before an evaluation adds its own): the most rounds any MoE layer took and the
// busiest receiver over the mean.
static int routing_stats(nm_trainer *t, nm_step_metrics *m, int n_moe, int64_t *ep_rounds, double *ep_over,
                         nm_error *err) {
    nm_balance_stats bs = {1.0, 0.0, 0.0};
    if (n_moe > 0)
        nm_balance_compute_stats(&bs, t->step_counts, nm_routing_uses_bias(&t->mcfg) ? t->bias_ptrs : NULL, n_moe,
                                 t->mcfg.E);
    if (t->pipe && pipeline_balance_stats(t, &bs, n_moe, err) != 0) return -1;
    m->load_max_over_mean = bs.load_max_over_mean;
    m->bias_min = bs.bias_min;
    m->bias_max = bs.bias_max;
    *ep_rounds = 0;
    *ep_over = 0.0;
    if (t->mesh->n.ep > 1) {
        nm_model_ep_stats(t->model, ep_rounds, ep_over, &t->ep_overlap_s);
        if (t->model_pair) {  // the paired micro-batches' second model: its exchanges too
            int64_t rounds2;
            double over2, overlap2;
            nm_model_ep_stats(t->model_pair, &rounds2, &over2, &overlap2);
            if (rounds2 > *ep_rounds) *ep_rounds = rounds2;
            if (over2 > *ep_over) *ep_over = over2;
            t->ep_overlap_s += overlap2;
        }
        if (nm_comm_all_reduce(t->world, ep_rounds, 1, NM_DT_I64, NM_RED_MAX, err) != 0 ||
            nm_comm_all_reduce(t->world, ep_over, 1, NM_DT_F64, NM_RED_MAX, err) != 0)
            return -1;
    }
    return 0;
}

// The step's start: metrics and expert counts cleared, the loss options of this step, the
// gradients zeroed.
static void step_begin(nm_trainer *t, int64_t step, nm_step_metrics *m, nm_loss_options *opt, int *n_moe) {
    const nm_train_config *c = &t->cfg;
    memset(m, 0, sizeof(*m));
    m->step = step;
    m->steps_total = c->steps;
    m->val_loss = NAN;
    nm_model_expert_counts(t->model, n_moe, NULL);
    memset(t->step_counts, 0, (size_t)*n_moe * (size_t)(t->mcfg.E > 0 ? t->mcfg.E : 1) * sizeof(int64_t));
    *opt = (nm_loss_options){
        .mtp_weight = (float)nm_mtp_weight_at(c->mtp.weight, c->mtp.weight_after, c->mtp.switch_step, step),
        .aux_weight = (float)c->balance.aux_weight,
        // Each rank's gradients are summed over the data-parallel group: 1/(accum x dp) makes the
        // sum the mean over the global batch, as one process computes it.
        .grad_scale = 1.0f / (float)(t->accum * t->mesh->n.dp),
    };
    // Under gradient sharding the buffer's pages are given back, not written with zeros: it is
    // resident only while a backward fills it.
    if (t->zero && t->zero->be) t->ops->discard(t->ops, nm_model_grads(t->model), nm_model_table(t->model)->n_floats * sizeof(float));
    else nm_model_zero_grads(t->model);
}

// The step after its micro-batches: gradients reduced, checked and clipped, the guard or the
// update (lr: the schedule's rate unless >= 0), throughput and routing statistics. t0: when the
// step began. *diverged, *ep_rounds and *ep_over for the report.
static int step_finish(nm_trainer *t, int64_t step, nm_step_metrics *m, const nm_loss_options *opt, int n_moe,
                       int finite, double t0, double lr, int *diverged, int64_t *ep_rounds, double *ep_over,
                       nm_error *err) {
    const nm_train_config *c = &t->cfg;
    double te = now_s();
    if (reduce_step(t, m, n_moe, &finite, err) != 0) return -1;
    double t_comm = now_s() - te, t_gather = 0.0;
    te = now_s();
    nm_grad_report rep;
    // The clip factor is applied inside the AdamW update: nothing reads the clipped
    // gradients, so they are not rewritten in a pass of their own.
    if (check_grads(t, c->optimizer.clip_grad, &rep, err) != 0) return -1;
    m->grad_norm = rep.norm;
    m->lr = lr >= 0 ? lr : nm_lr_at(&t->sched, step);
    if (guard_or_update(t, step, finite, &rep, m, n_moe, diverged, &t_gather, err) != 0) return -1;
    double tf = now_s();
    m->t_comm = t_comm + t_gather;
    m->t_optimizer = tf - te - t_gather;
    t->step = step;
    throughput(t, m, step, tf - t0);
    m->tokens = t->tokens_seen;
    m->mtp_weight = opt->mtp_weight;
    m->skipped_total = t->skipped_steps;
    return routing_stats(t, m, n_moe, ep_rounds, ep_over, err);
}

int nm_trainer_step(nm_trainer *t, nm_step_metrics *m, nm_error *err) {
    const nm_train_config *c = &t->cfg;
    if (t->opts.external_data)
        return nm_error_set(err, "trainer: created with external_data: hand it micro-batches (nm_trainer_micro_batch, "
                                 "nm_trainer_apply)");
    if (t->step >= c->steps) return 0;
    // Megatron's --exit-interval: end this process at such a step (the caller saves), leaving
    // the schedule and the data order those of the full run.
    if (c->exit_interval > 0 && t->step > t->step_at_start && t->step % c->exit_interval == 0) return 0;
    int64_t step = t->step + 1;
    int n_moe;
    nm_loss_options opt;
    double t0 = now_s();
    step_begin(t, step, m, &opt, &n_moe);
    if (t->opts.before_backward && t->opts.before_backward(t->opts.hook_ctx, t->model, step, err) != 0) return -1;
    int finite = 1;
    if (t->pipe && pipeline_micro_batches(t, &opt, m, n_moe, &finite, err) != 0) return -1;
    if (t->model_pair && !t->pipe && paired_micro_batches(t, &opt, m, n_moe, &finite, err) != 0) return -1;
    for (int64_t micro = 0; !t->pipe && !t->model_pair && micro < t->accum; micro++) {
        double ta = now_s();
        if (nm_loader_next_batch(t->train_data, t->tokens, c->micro_batch, err) != 0) return -1;
        m->t_data += now_s() - ta;
        nm_loss_terms lt;
        if (accumulate_micro_batch(t, micro, t->tokens, &opt, m, n_moe, &finite, &lt, err) != 0) return -1;
    }
    int diverged;
    int64_t ep_rounds;
    double ep_over;
    if (step_finish(t, step, m, &opt, n_moe, finite, t0, -1.0, &diverged, &ep_rounds, &ep_over, err) != 0) return -1;

    int eval_now = c->log.eval_every > 0 && (step % c->log.eval_every == 0 || step == c->steps);
    if (eval_now && t->valid_data) {
        if (nm_trainer_evaluate(t, &m->val_loss, err) != 0) return -1;
        t->hist_vstep[t->n_vhist] = (double)step;
        t->hist_vloss[t->n_vhist++] = m->val_loss;
    }
    if (t->n_hist < c->steps) {
        t->hist_step[t->n_hist] = (double)step;
        t->hist_loss[t->n_hist++] = m->ce_loss;
    }
    if (nm_trainer_report_step(t, m, ep_rounds, ep_over, diverged, err) != 0) return -1;
    if (c->checkpoint.save_every > 0 && step % c->checkpoint.save_every == 0) {
        if (nm_trainer_save(t, err) != 0) return -1;
    }
    return 1;
}

// --- the caller's step (options.external_data) -----------------------------------------------

int nm_trainer_micro_batch(nm_trainer *t, const int32_t *tokens, nm_loss_terms *lt, nm_error *err) {
    if (!t->opts.external_data)
        return nm_error_set(err, "trainer: micro-batches come from its own data (create it with external_data)");
    if (t->pipe)
        return nm_error_set(err, "trainer: a caller's micro-batches under pipeline parallelism are not supported: the "
                                 "1F1B schedule interleaves them (train with Trainer or the CLI)");
    if (t->ext_micro == 0) {
        int n_moe;
        t->ext_t0 = now_s();
        t->ext_finite = 1;
        step_begin(t, t->step + 1, &t->ext_m, &t->ext_opt, &n_moe);
    }
    if (t->ext_micro >= t->accum)
        return nm_error_set(err, "trainer: micro-batch %lld of a step that takes %lld (global_batch %lld / (micro_batch "
                                 "%lld x dp %lld)): apply the step first", (long long)(t->ext_micro + 1),
                            (long long)t->accum, (long long)t->cfg.global_batch, (long long)t->cfg.micro_batch,
                            (long long)t->mesh->n.dp);
    int n_moe;
    nm_model_expert_counts(t->model, &n_moe, NULL);
    if (accumulate_micro_batch(t, t->ext_micro, tokens, &t->ext_opt, &t->ext_m, n_moe, &t->ext_finite, lt, err) != 0)
        return -1;
    t->ext_micro++;
    return 0;
}

int nm_trainer_apply(nm_trainer *t, double lr, nm_step_metrics *m, nm_error *err) {
    if (!t->opts.external_data)
        return nm_error_set(err, "trainer: nm_trainer_apply is for a caller's micro-batches (external_data)");
    if (t->ext_micro != t->accum)
        return nm_error_set(err, "trainer: the step has %lld of its %lld micro-batches (global_batch %lld / (micro_batch "
                                 "%lld x dp %lld))", (long long)t->ext_micro, (long long)t->accum,
                            (long long)t->cfg.global_batch, (long long)t->cfg.micro_batch, (long long)t->mesh->n.dp);
    int n_moe, diverged;
    int64_t ep_rounds;
    double ep_over;
    nm_model_expert_counts(t->model, &n_moe, NULL);
    t->ext_micro = 0;
    if (step_finish(t, t->step + 1, &t->ext_m, &t->ext_opt, n_moe, t->ext_finite, t->ext_t0, lr, &diverged,
                    &ep_rounds, &ep_over, err) != 0)
        return -1;
    *m = t->ext_m;
    if (diverged)
        return nm_error_set(err, "training diverged: %lld non-finite steps in a row (first: %s)",
                            (long long)t->nan_streak, t->nan_first);
    return m->skipped ? 0 : 1;
}

int nm_trainer_set_adamw(nm_trainer *t, double beta1, double beta2, double eps, double weight_decay, double clip_grad,
                         nm_error *err) {
    if (!(beta1 >= 0.0 && beta1 < 1.0)) return nm_error_set(err, "optimizer: beta1 = %g must be in [0, 1)", beta1);
    if (!(beta2 >= 0.0 && beta2 < 1.0)) return nm_error_set(err, "optimizer: beta2 = %g must be in [0, 1)", beta2);
    if (!(eps > 0.0 && isfinite(eps))) return nm_error_set(err, "optimizer: eps = %g must be > 0", eps);
    if (!(weight_decay >= 0.0 && isfinite(weight_decay)))
        return nm_error_set(err, "optimizer: weight_decay = %g must be >= 0", weight_decay);
    if (!(clip_grad >= 0.0 && isfinite(clip_grad)))
        return nm_error_set(err, "optimizer: clip_grad = %g must be >= 0 (0: no clipping)", clip_grad);
    t->optim->cfg.beta1 = beta1, t->optim->cfg.beta2 = beta2, t->optim->cfg.eps = eps;
    t->optim->cfg.weight_decay = weight_decay;
    t->cfg.optimizer.clip_grad = clip_grad;
    return 0;
}
