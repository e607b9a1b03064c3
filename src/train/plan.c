// plan.c: the per-rank memory and per-step communication of a layout (see plan.h), from the
// allocator's own code run on shape communicators.
#include "train/plan.h"

#include "comm/comm.h"
#include "model/flops.h"
#include "model/model.h"
#include "model/params.h"
#include "train/optim.h"
#include "train/pipeline.h"
#include "train/zero.h"

// Whether a rank with chunks st[0..v) runs layer l (their decoder layers; the MTP layers with
// the last stage). v is 1 without the interleaved schedule.
static int stage_runs(const nm_model_config *c, const nm_model_stage *st, int64_t v, int64_t l) {
    if (nm_layer_is_mtp(c, l)) return st[v - 1].last;
    for (int64_t k = 0; k < v; k++)
        if (l >= st[k].layer_begin && l < st[k].layer_end) return 1;
    return 0;
}

static int64_t rows_of_layer(const nm_model_config *c, const nm_plan_request *r, int64_t l) {
    return r->micro_batch * (r->seq_len + 1 - (nm_layer_is_mtp(c, l) ? l - c->L + 1 : 0));
}

// The all-to-all bytes of the job per step (docs/parallelism.md): each MoE layer and
// micro-batch hands every token's K rows of D floats to the dispatch and gets as many back in
// the combine, twice more in the backward (three times each with recomputation, which also
// exchanges the counts twice), after E/EP int64 counts to each of the EP peers per rank. A
// layer runs on the W/PP ranks of its stage; under sequence parallelism each tp rank routes
// its own 1/TP of the tokens. A layer whose exchange takes more than one round sends its rows
// once more in the backward: counted where that is certain, when even the mean load (every
// rank's routed rows x K) exceeds the receive capacity C; a busier step than the mean adds
// that phase to more layers, which only a run can know. What a row costs depends on what it
// carries (moe.c, DeepSeek-V3's recipe): fp32 runs send 4 bytes per element everywhere; bf16
// runs send the rows to the experts (activations and gradients) as bf16 and get fp32 back;
// fp8 runs send the activations as e4m3 codes plus one fp32 scale per 1 x 128 tile
// (D + 4 ceil(D/128) bytes a row) and everything else as bf16.
static int64_t all_to_all_job_bytes(const nm_model_config *c, const nm_plan_request *r, int64_t accum,
                                    const nm_model_stage *st, int64_t v) {
    if (r->ep <= 1 || c->E == 0) return 0;
    int64_t phases = r->recompute ? 6 : 4, count_rounds = r->recompute ? 2 : 1, total = 0, W = r->world / r->pp;
    int sp = r->tp > 1 && r->sequence_parallel;
    int64_t routed_max = r->micro_batch * (r->seq_len + 1);  // the rows the buffers are sized for
    if (sp) routed_max = (routed_max + r->tp - 1) / r->tp;
    int64_t C = nm_moe_receive_rows(c, routed_max, r->ep, r->moe_receive_capacity);
    for (int64_t l = 0; l < c->n_layers; l++) {
        if (!nm_layer_is_moe(c, l) || (st && !stage_runs(c, st, v, l))) continue;
        int64_t routed_least = sp ? rows_of_layer(c, r, l) / r->tp : rows_of_layer(c, r, l);
        const int64_t D = c->D, extra = routed_least * c->K > C;
        const int fp8 = r->precision == NM_PRECISION_FP8, fp32 = r->precision == NM_PRECISION_FP32;
        const int64_t x_row = fp8 ? D + 4 * ((D + 127) / 128) : fp32 ? 4 * D : 2 * D;  // activations in
        const int64_t grad_row = fp32 ? 4 * D : 2 * D, back_row = fp8 ? 2 * D : 4 * D;
        // to the experts: the activations (again under recomputation and for the extra phase)
        // and the gradients once; back: every phase that went
        const int64_t row_bytes = (phases / 2 - 1 + extra) * x_row + grad_row + phases / 2 * back_row;
        total += count_rounds * W * c->E * 8 + (W / r->tp * rows_of_layer(c, r, l)) * c->K * row_bytes;
    }
    return accum * total;
}

// The tp group's bytes per step on a rank with stages st[0..v) (docs/parallelism.md, "Traffic"): a reduce-scatter
// or all-gather counts its whole (N, width) buffer, N = micro x (seq_len + 1) rows in a decoder
// block and micro x (seq_len + 1 - k) in MTP depth k; recomputation repeats each block's
// forward collectives. "FFN" is a dense block or a MoE block with shared experts.
static void tp_bytes(const nm_model_config *c, const nm_plan_request *r, int64_t accum, const nm_model_stage *st,
                     int64_t v, nm_plan_comm *out) {
    const int first = st[0].first, last = st[v - 1].last;
    if (r->tp <= 1) return;
    int sp = r->sequence_parallel, fwd = r->recompute ? 2 : 1;
    int64_t D = c->D, T = r->seq_len + 1, mb = r->micro_batch;
    int64_t ar = 0, rs = 0, ag = 0, ar_bytes = 0, n_moe = 0, n_blocks = 0;  // floats, except ar_bytes
    for (int64_t l = 0; l < c->n_layers; l++) {
        if (!stage_runs(c, st, v, l)) continue;
        int64_t N = rows_of_layer(c, r, l);
        int moe = nm_layer_is_moe(c, l), ffn = !moe || c->Fs > 0;
        n_moe += moe;
        n_blocks++;
        // attention backward: d(kv latent), d(rope key), d(q latent) (q_proj: its part of d(norm output))
        ar += N * c->Rkv + N * c->Dr + N * (c->Rq > 0 ? c->Rq : D);
        if (sp) {
            ag += fwd * (N * D + (moe ? N * c->E : 0) + (ffn ? N * D : 0)) + N * D + (ffn ? N * D : 0);
            // the norms recomputed in the backward (recompute_modules layernorm) gather again
            if (r->recompute_layernorm && !r->recompute) ag += N * D + (ffn ? N * D : 0);
            rs += fwd * (N * D + (ffn ? N * D : 0)) + (ffn ? N * D : 0);
        } else {
            ar += fwd * 2 * N * D + (ffn ? N * D : 0);
        }
    }
    for (int64_t k = 0; k <= c->M; k++) {  // the main embedding and head, then each MTP depth's
        int64_t N = mb * (T - k);
        int emb_here = k == 0 ? first : last, head_here = last;
        if (sp) {
            if (emb_here) rs += N * D, ag += N * D;    // the embedding; d(embedding output)
            if (head_here) rs += N * D, ag += N * D;   // the head's input; d(hidden)
            if (head_here && k >= 2) ag += mb * (T - k + 1) * D;  // h^{k-1}, gathered whole
        } else {
            if (emb_here) ar += N * D;
            if (head_here) ar += N * D;
        }
        if (head_here) ar_bytes += 8 * 3 * N;  // the cross-entropy statistics
    }
    int64_t per_step = 0;
    if (sp) {
        ar_bytes += 8 * n_moe * c->E;  // expert counts: each tp rank routed its own tokens
        // once per step, the gradients computed on each rank's tokens: the residual-stream
        // norms, the final norm, each depth's enorm / hnorm / head norm, the routers, eh_proj
        int64_t norms = 2 * n_blocks + (last ? 1 + 3 * c->M : 0);
        per_step = 4 * (norms * D + n_moe * c->E * D + (last ? c->M * 2 * D * D : 0));
    }
    out->tp_all_reduce = accum * (4 * ar + ar_bytes) + per_step;
    out->tp_reduce_scatter = accum * 4 * rs;
    out->tp_all_gather = accum * 4 * ag;
}

// The optimizer bytes of the largest shard of a stage, of its first rank, and the mean, in one
// pass over the rows and ranks (building the ranges once per rank made `plan` quadratic in
// the world size: 30 s at 32,768 ranks). The ranges are the same function of the group size on
// every rank (zero.h: row_pos, nm_zero_range_owner); rank g holds the replicated floats of dp
// range g % dp and the expert floats of edp range g % ne. Its m and v
// (nm_optimizer_create_ranges) put each held piece of a row at an NM_PARAM_ALIGN boundary:
// the sum of the pieces rounded up, less the last piece's rounding. Router biases and tied
// rows have no optimizer state.
static void largest_shard(nm_plan_stage *s, const nm_param_table *t, const nm_zero *z, int64_t dp, int64_t ne,
                          int sharded, int64_t bytes_per_float) {
    const int64_t B = bytes_per_float;
    if (!sharded) {
        s->optimizer_bytes = s->optimizer_bytes_first = s->optimizer_mean_bytes =
            (int64_t)nm_optimizer_state_floats(t, NULL) * B;
        return;
    }
    int64_t n_of[2] = {dp, ne};
    int64_t *sum[2] = {nm_calloc((size_t)dp, sizeof(int64_t)), nm_calloc((size_t)ne, sizeof(int64_t))};
    int *last[2] = {nm_malloc((size_t)dp * sizeof(int)), nm_malloc((size_t)ne * sizeof(int))};
    int64_t *last_len[2] = {nm_calloc((size_t)dp, sizeof(int64_t)), nm_calloc((size_t)ne, sizeof(int64_t))};
    for (int64_t i = 0; i < dp; i++) last[0][i] = -1;
    for (int64_t i = 0; i < ne; i++) last[1][i] = -1;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & (NM_TENSOR_ROUTER_BIAS | NM_TENSOR_TIED) || z->row_pos[i] < 0) continue;
        int g = (r->flags & NM_TENSOR_EXPERT) ? 1 : 0;
        int64_t G = n_of[g], total = z->total_floats[g], S = (total + G - 1) / G;
        for (int64_t k = 0; k < r->numel;) {
            int64_t q = nm_zero_range_owner(z->row_pos[i] + k, total, G);
            int64_t stop = (q + 1) * S - z->row_pos[i];
            if (q == G - 1 || stop > r->numel) stop = r->numel;
            sum[g][q] += (stop - k + NM_PARAM_ALIGN - 1) / NM_PARAM_ALIGN * NM_PARAM_ALIGN;
            last[g][q] = i;
            last_len[g][q] = stop - k;
            k = stop;
        }
    }
    int64_t G = dp > ne ? dp : ne;
    double all = 0;
    for (int64_t g = 0; g < G; g++) {
        int a = last[0][g % dp], b = last[1][g % ne], k = a > b ? 0 : 1, end = a > b ? a : b;
        int64_t floats = sum[0][g % dp] + sum[1][g % ne];
        if (end >= 0) {
            int64_t n = last_len[k][g % n_of[k]];
            floats -= (n + NM_PARAM_ALIGN - 1) / NM_PARAM_ALIGN * NM_PARAM_ALIGN - n;
        }
        all += (double)floats;
        if (floats * B > s->optimizer_bytes) s->optimizer_bytes = floats * B;
        if (g == 0) s->optimizer_bytes_first = floats * B;
    }
    s->optimizer_mean_bytes = (int64_t)(all / (double)G * (double)B);
    for (int k = 0; k < 2; k++) {
        nm_free(sum[k]);
        nm_free(last[k]);
        nm_free(last_len[k]);
    }
}

// Pipeline rank si, holding the stages st[0..v) (v > 1: the interleaved schedule's chunks).
static int stage_sizes(nm_plan *p, int64_t si, const nm_model_stage *st, int64_t v, const nm_model_config *cfg,
                       const nm_plan_request *r, nm_error *err) {
    nm_plan_stage *s = &p->stages[si];
    const int first = st[0].first, last = st[v - 1].last;
    int rc = -1;
    nm_param_table table = {0};
    nm_comm *ep = nm_comm_shape(0, (int)p->n.ep, "ep"), *tp = nm_comm_shape(0, (int)p->n.tp, "tp");
    int sp = p->n.tp > 1 && r->sequence_parallel;
    if (nm_param_table_build_tp(&table, cfg, 0, p->n.ep, 0, p->n.tp, r->vocab_multiple, err) != 0) goto done;
    if (p->n.pp > 1 && nm_param_table_restrict_chunks(&table, cfg, st, v, err) != 0) goto done;
    s->first_layer = st[0].layer_begin;
    s->n_layers = 0;
    for (int64_t k = 0; k < v; k++) s->n_layers += st[k].layer_end - st[k].layer_begin;
    s->first = first;
    s->last = last;
    s->params_bytes = (int64_t)table.n_floats * 4;
    s->grads_bytes = s->params_bytes;
    // 2 bytes per parameter: bf16 storage, as a GPU or an AMX CPU keeps it; the CPU "widen"
    // kernel keeps the copy as fp32 holding bf16 values, 4 bytes (ops.h gemm_bf16_weight_type)
    s->bf16_copy_bytes = r->precision == NM_PRECISION_FP32 ? 0 : (int64_t)table.n_floats * (r->copy_fp32 ? 4 : 2);
    s->params_resident_bytes = s->params_resident_bytes_first = s->params_bytes;
    // bf16 at world > 1: the GEMM rows' master weights sharded; the copy all-gathered in its storage
    const int shard_master = r->precision == NM_PRECISION_BF16 && p->n.world > 1;
    const int64_t copy_elem = r->copy_fp32 ? 4 : 2;
    // The largest ZeRO-1 shard over the ranks of the stage's dp and expert groups (routed
    // experts reduce over edp, or over dp under TP without sequence parallelism: the trainer's
    // choice).
    int experts_over_dp = p->n.tp > 1 && !sp;
    int64_t sharded_partial_floats = 0;
    int64_t n_expert_group = experts_over_dp ? p->n.dp : p->n.edp;
    {
        nm_comm *dp = nm_comm_shape(0, (int)p->n.dp, "dp");
        nm_comm *edp = nm_comm_shape(0, (int)n_expert_group, "edp");
        nm_zero *z = NULL;
        int zrc = nm_zero_create(&z, &table, dp, edp, r->bucket_mb * 262144, err);
        if (zrc == 0) {
            nm_adamw_config moments = {.exp_avg_bf16 = r->exp_avg_bf16, .exp_avg_sq_bf16 = r->exp_avg_sq_bf16};
            largest_shard(s, &table, z, p->n.dp, n_expert_group, p->n.world > 1,
                          nm_optimizer_state_bytes_per_float(&moments));
            if (shard_master) {
                unsigned char *copy_rows = nm_malloc((size_t)(table.n_rows > 0 ? table.n_rows : 1));
                for (int i = 0; i < table.n_rows; i++) copy_rows[i] = (unsigned char)nm_param_row_reads_copy(&table, i);
                nm_zero_shard_master(z, copy_rows);
                nm_free(copy_rows);
                int64_t G = p->n.dp > n_expert_group ? p->n.dp : n_expert_group;
                for (int64_t g = 0; g < G; g++) {
                    int64_t b = 4 * nm_zero_master_floats(z, g % p->n.dp, g % n_expert_group);
                    if (g == 0 || b > s->params_resident_bytes) s->params_resident_bytes = b;
                    if (g == 0) s->params_resident_bytes_first = b;
                }
                for (int b = 0; b < z->n_runs; b++) {  // copy rows in the copy's storage, the others in fp32
                    int64_t bytes_b = z->runs[b].n * (z->runs[b].copy ? copy_elem : 4);
                    if (z->runs[b].expert && !experts_over_dp) s->comm.edp_all_gather += bytes_b;
                    else s->comm.dp_all_gather += bytes_b;
                }
            }
            if (r->shard_grads && p->n.world > 1) {
                nm_zero_shard_grads(z, NULL, st, (int)v);  // the bucket bookkeeping only
                // the partial rows of sequence parallelism are summed over tp before every
                // micro-batch's reduction, except those of the buckets reduced once (zero.h)
                for (int i = 0; sp && i < table.n_rows; i++)
                    if ((table.rows[i].flags & NM_TENSOR_SEQ_PARTIAL) && !(table.rows[i].flags & NM_TENSOR_TIED) &&
                        !nm_zero_row_deferred(z, i))
                        sharded_partial_floats += table.rows[i].numel;
                s->grads_resident_bytes = 4 * nm_zero_sharded_resident_floats(z);
                int64_t G = p->n.dp > n_expert_group ? p->n.dp : n_expert_group;
                for (int64_t g = 0; g < G; g++) {
                    int64_t b = 4 * nm_zero_shard_floats(z, g % p->n.dp, g % n_expert_group);
                    if (b > s->grad_shard_bytes) s->grad_shard_bytes = b;
                    if (g == 0) s->grad_shard_bytes_first = b;
                }
            }
            for (int b = 0; p->n.world > 1 && b < z->n_buckets; b++) {
                int64_t bytes_b = z->buckets[b].n * 4, gather_b = shard_master ? 0 : bytes_b;  // else counted by runs
                // gradient sharding reduce-scatters every micro-batch's gradients, except the
                // buckets with a global row (zero.h): each chunk's backward reduces the buckets
                // whose lowest layer it reaches (ready_layer >= its first layer)
                int64_t reductions = 1;
                if (r->shard_grads && z->buckets[b].ready_layer >= 0) {
                    reductions = 0;
                    for (int64_t k = 0; k < v; k++) reductions += z->buckets[b].ready_layer >= st[k].layer_begin;
                    reductions *= p->accum;
                }
                if (z->buckets[b].expert && !experts_over_dp) {  // else the dp communicator counts them
                    s->comm.edp_reduce_scatter += reductions * bytes_b;
                    s->comm.edp_all_gather += gather_b;
                } else {
                    s->comm.dp_reduce_scatter += reductions * bytes_b;
                    s->comm.dp_all_gather += gather_b;
                }
            }
        }
        nm_zero_destroy(z);
        nm_comm_destroy(dp);
        nm_comm_destroy(edp);
        if (zrc != 0) goto done;
    }
    s->in_flight = p->n.pp > 1 ? nm_pipeline_slots(p->n.pp, v, si, p->accum) : 1;
    // paired micro-batches in 1F1B: w sets on each of two models (pipeline.c); doubled below
    if (p->n.pp > 1 && r->pair_micro_batches) s->in_flight = nm_pipeline_pair_slots(p->n.pp, si, p->accum);
    nm_model_options mo = {.recompute = r->recompute, .ep = ep, .tp = tp, .sequence_parallel = sp,
                           .vocab_multiple = r->vocab_multiple, .stage = p->n.pp > 1 ? st : NULL,
                           .n_chunks = p->n.pp > 1 ? v : 1, .act_slots = s->in_flight, .moe_receive_capacity = r->moe_receive_capacity,
                           .precision = r->precision, .recompute_mla_up_proj = r->recompute_mla_up_proj,
                           .recompute_layernorm = r->recompute_layernorm,
                           .recompute_moe_act = r->recompute_moe_act, .ep_split = r->overlap_ep ? 2 : 1};
    int64_t T = r->seq_len + 1;  // the trainer's rows: seq_len inputs and the last target
    size_t act = 0, twins = 0;
    if (nm_model_estimate_bytes(cfg, r->micro_batch, T, &mo, &act, &twins, err) != 0) goto done;
    s->activation_bytes = (int64_t)act;
    // bf16 copies of the activations only bf16 GEMMs read, stored as bf16 as the weight copy
    // above (where the bf16 GEMM reads fp32 storage, the CPU's widen kernel, there are none)
    s->bf16_twin_bytes = r->precision == NM_PRECISION_BF16 ? (int64_t)twins : 0;
    int64_t n_moe = 0;
    for (int64_t l = 0; l < cfg->n_layers; l++) n_moe += stage_runs(cfg, st, v, l) && nm_layer_is_moe(cfg, l);
    s->n_moe_layers = n_moe;
    if (p->n.ep > 1 && cfg->E > 0 && n_moe > 0) {
        // The buffers sized by the receive capacity C, in bytes per row: per MoE layer and
        // activation set (once with recomputation) x_loc (D), e_gate_up (2Fe) and e_act (Fe,
        // one shared buffer with recompute_modules moe_act); without whole-block recomputation
        // a bf16 run keeps x_loc and e_act in bf16 per set and one fp32 buffer of each, an fp8
        // run x_loc and e_gate_up as e4m3 codes and tile scales per set, one fp32 buffer of
        // each, and e_act in one shared buffer, made again in the backward (model_state.c
        // take_saved, take_expert_rows); once, the backward's d_e_out_loc, d_x_loc and the
        // exchange buffer (3D; 4D with the split exchange's combine rows), d_e_act and
        // d_e_gate_up (3Fe).
        int64_t rows = r->micro_batch * T;
        if (sp) rows = (rows + p->n.tp - 1) / p->n.tp;
        int64_t C = nm_moe_receive_rows(cfg, rows, p->n.ep, r->moe_receive_capacity);
        int64_t sets = r->recompute ? 1 : n_moe * s->in_flight;  // every chunk's slots hold its own layers
        s->ep_receive_rows = C;
        const int saved_bf16 = r->precision == NM_PRECISION_BF16 && !r->recompute;
        const int saved_fp8 = r->precision == NM_PRECISION_FP8 && !r->recompute;
        const int shared_act = (r->recompute_moe_act || saved_fp8) && !r->recompute;
        const int64_t x_set = saved_bf16 ? 2 * cfg->D : saved_fp8 ? cfg->D + 4 * ((cfg->D + 127) / 128) : 4 * cfg->D;
        const int64_t gate_set = saved_fp8 ? 2 * cfg->Fe + 4 * ((2 * cfg->Fe + 127) / 128) : 8 * cfg->Fe;
        int64_t per_set = x_set + gate_set + (shared_act ? 0 : (saved_bf16 ? 2 : 4) * cfg->Fe);
        int64_t once = 4 * ((r->overlap_ep ? 4 : 3) * cfg->D + 3 * cfg->Fe) + (shared_act ? 4 * cfg->Fe : 0) +
                       (saved_bf16 || saved_fp8 ? 4 * cfg->D : 0) + (saved_bf16 && !shared_act ? 4 * cfg->Fe : 0) +
                       (saved_fp8 ? 8 * cfg->Fe : 0);
        s->ep_buffer_bytes = (sets * per_set + once) * C;
    }
    if (r->pair_micro_batches) {  // the pair's second model: all of it again (nm_model_create_pair)
        s->activation_bytes *= 2;
        s->bf16_twin_bytes *= 2;
        s->ep_buffer_bytes *= 2;
    }
    int64_t grads = r->shard_grads && p->n.world > 1 ? s->grads_resident_bytes + s->grad_shard_bytes : s->grads_bytes;
    s->total_bytes = s->params_resident_bytes + grads + s->bf16_copy_bytes + s->bf16_twin_bytes + s->optimizer_bytes +
                     s->activation_bytes;
    if (p->n.world > 1) s->comm.dp_all_reduce = 5 * 8 + n_moe * cfg->E * 8;  // loss terms and finiteness, expert loads
    tp_bytes(cfg, r, p->accum, st, v, &s->comm);
    s->comm.tp_all_reduce += (p->accum - 1) * 4 * sharded_partial_floats;
    // the stage's share of the all-to-all (its MoE layers over its W/PP ranks) and of the FLOPs
    s->comm.ep_all_to_all = all_to_all_job_bytes(cfg, r, p->accum, st, v) / (p->n.world / p->n.pp);
    double per_token = last ? (double)(1 + cfg->M) * nm_model_head_flops_per_token(cfg) : 0.0;
    for (int64_t l = 0; l < cfg->n_layers; l++)
        if (stage_runs(cfg, st, v, l)) per_token += nm_model_layer_flops_per_token(cfg, l, r->seq_len);
    s->flops_per_step_rank = per_token * (double)(r->global_batch * r->seq_len) / (double)(p->n.dp * p->n.tp);
    if (p->n.pp > 1) {
        // one (micro, T, D) buffer per micro-batch and chunk: its output forward, but from the
        // last stage, and its input's gradient back, but from the first
        int64_t act_bytes = p->accum * r->micro_batch * T * cfg->D * 4;
        s->comm.pp_send = (v - last) * act_bytes + (v - first) * act_bytes;
        s->comm.pp_recv = s->comm.pp_send;
    }
    rc = 0;
done:
    nm_param_table_free(&table);
    nm_comm_destroy(ep);
    nm_comm_destroy(tp);
    return rc;
}

int nm_pair_micro_batches_check(const nm_mesh_sizes *n, int64_t v, int64_t accum, int64_t global_batch,
                                int64_t micro_batch, nm_error *err) {
    const char *key = "moe_pair_micro_batches";
    if (n->ep < 2)
        return nm_error_set(err, "%s: it hides the expert all-to-all, and expert_parallel_size %lld has none: set "
                            "expert_parallel_size to 2 or more, or %s to false", key, (long long)n->ep, key);
    if (n->pp > 1 && v > 1)
        return nm_error_set(err, "%s with %lld virtual pipeline stages per rank: the pairing runs in 1F1B, the "
                            "interleaved schedule's is not built: set virtual_pipeline_model_parallel_size to 1 (a "
                            "layout with pipeline_parallel_size stages) or %s to false", key, (long long)v, key);
    if (accum < 2)
        return nm_error_set(err, "%s needs at least 2 micro-batches a step, and global_batch %lld / (micro_batch %lld "
                            "x data_parallel_size %lld) is %lld: raise global_batch or lower micro_batch", key,
                            (long long)global_batch, (long long)micro_batch, (long long)n->dp, (long long)accum);
    // The two jobs take turns at each expert all-to-all, which every rank of an expert-parallel
    // group reaches together; the tensor-parallel collectives between them come in the same
    // order only on ranks of one such group.
    if (n->tp > 1 && n->ep % n->tp != 0)
        return nm_error_set(err, "%s with tensor_parallel_size %lld: each tensor-parallel group must lie inside one "
                            "expert-parallel group, and expert_parallel_size %lld is not a multiple of it", key,
                            (long long)n->tp, (long long)n->ep);
    return 0;
}

int nm_plan_compute(nm_plan *p, const nm_model_config *cfg, const nm_plan_request *r, nm_error *err) {
    *p = (nm_plan){0};
    if (r->seq_len < 1 || r->micro_batch < 1 || r->bucket_mb < 1)
        return nm_error_set(err, "seq_len %lld, micro_batch %lld and bucket_mb %lld must be >= 1",
                            (long long)r->seq_len, (long long)r->micro_batch, (long long)r->bucket_mb);
    if (nm_mesh_check(&p->n, r->world, r->tp, r->pp, r->ep, cfg->E, r->global_batch, r->micro_batch, err) != 0) return -1;
    if (r->tp > 1 && r->ep > 1 && !r->sequence_parallel)
        return nm_error_set(err, "tensor_parallel_size %lld with expert_parallel_size %lld needs sequence "
                                 "parallelism (the trainer refuses it without)", (long long)r->tp, (long long)r->ep);
    p->accum = r->global_batch / (r->micro_batch * p->n.dp);
    p->n_stages = p->n.pp;
    int64_t v = 1;
    int rc = nm_pipeline_virtual_size(p->n.pp, r->virtual_pipeline_size, r->pipeline_layout, &v, err);
    if (rc == 0) rc = nm_pipeline_check_micro_batches(p->n.pp, v, p->accum, err);
    if (rc == 0 && r->pair_micro_batches)
        rc = nm_pair_micro_batches_check(&p->n, v, p->accum, r->global_batch, r->micro_batch, err);
    if (rc != 0) return -1;
    p->vpp = v;
    nm_model_stage *stages = nm_calloc((size_t)(p->n_stages * v), sizeof(nm_model_stage));
    nm_model_stage *chunks = nm_calloc((size_t)v, sizeof(nm_model_stage));
    p->stages = nm_calloc((size_t)p->n_stages, sizeof(nm_plan_stage));
    rc = nm_pipeline_layout(stages, p->n.pp, v, r->pipeline_layout, cfg, err);
    for (int64_t s = 0; rc == 0 && s < p->n_stages; s++) {
        nm_pipeline_rank_chunks(stages, p->n.pp, v, s, chunks);
        rc = stage_sizes(p, s, chunks, v, cfg, r, err);
    }
    nm_free(chunks);
    nm_free(stages);
    if (rc != 0) {
        nm_plan_free(p);
        return -1;
    }
    p->comm = p->stages[0].comm;
    p->comm.ep_all_to_all_job = all_to_all_job_bytes(cfg, r, p->accum, NULL, 1);
    p->comm.ep_all_to_all = p->comm.ep_all_to_all_job / p->n.world;
    p->flops_per_step_rank = nm_model_flops_per_token(cfg, r->seq_len) * (double)(r->global_batch * r->seq_len) /
                             (double)p->n.world;
    p->compute_s = r->flops > 0 ? p->flops_per_step_rank / r->flops : 0.0;
    if (r->flops > 0) nm_plan_time_compute(p, cfg, r);
    return 0;
}

void nm_plan_free(nm_plan *p) {
    nm_free(p->stages);
    p->stages = NULL;
}
