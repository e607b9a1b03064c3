// plan.c: the per-rank memory and per-step communication of a layout (see plan.h), from the
// allocator's own code run on shape communicators.
#include "train/plan.h"

#include "dist/comm.h"
#include "model/flops.h"
#include "model/model.h"
#include "model/params.h"
#include "train/optim.h"
#include "train/zero.h"

// The all-to-all bytes of the job per step (docs/parallelism.md): each MoE layer and
// micro-batch hands every token's K rows of D floats to the dispatch and gets as many back in
// the combine, twice more in the backward (three times each with recomputation, which also
// exchanges the counts twice), after E/EP int64 counts to each of the EP peers per rank.
static int64_t all_to_all_job_bytes(const nm_model_config *c, const nm_plan_request *r, int64_t accum) {
    if (r->ep <= 1 || c->E == 0) return 0;
    int64_t phases = r->recompute ? 6 : 4, count_rounds = r->recompute ? 2 : 1, total = 0;
    for (int64_t l = 0; l < c->n_layers; l++) {
        if (!nm_layer_is_moe(c, l)) continue;
        int64_t T_l = r->seq_len + 1 - (nm_layer_is_mtp(c, l) ? l - c->L + 1 : 0);
        total += count_rounds * r->world * c->E * 8 + phases * (r->world * r->micro_batch * T_l) * c->K * c->D * 4;
    }
    return accum * total;
}

static int stage_sizes(nm_plan *p, nm_plan_stage *s, const nm_model_config *cfg, const nm_plan_request *r,
                       nm_error *err) {
    int rc = -1;
    nm_param_table table = {0};
    nm_comm *ep = nm_comm_shape(0, (int)p->n.ep, "ep");
    if (nm_param_table_build_ep(&table, cfg, 0, p->n.ep, err) != 0) goto done;
    s->first_layer = 0;
    s->n_layers = cfg->n_layers;
    s->params_bytes = (int64_t)table.n_floats * 4;
    s->grads_bytes = s->params_bytes;
    s->bf16_copy_bytes = r->precision == NM_PRECISION_FP32 ? 0 : (int64_t)table.n_floats * 2;
    // The largest ZeRO-1 shard over the ranks of the stage's dp and edp groups.
    int64_t G = p->n.dp > p->n.edp ? p->n.dp : p->n.edp;
    for (int64_t g = 0; g < G; g++) {
        nm_comm *dp = nm_comm_shape((int)(g % p->n.dp), (int)p->n.dp, "dp");
        nm_comm *edp = nm_comm_shape((int)(g % p->n.edp), (int)p->n.edp, "edp");
        nm_zero *z = NULL;
        int zrc = nm_zero_create(&z, &table, dp, edp, r->bucket_mb * 262144, err);
        if (zrc == 0) {
            int64_t bytes = (int64_t)nm_optimizer_state_floats(&table, p->n.world > 1 ? z->owned : NULL) * 8;
            if (bytes > s->optimizer_bytes) s->optimizer_bytes = bytes;
            if (g == 0) s->optimizer_bytes_first = bytes;
            if (g == 0 && p->n.world > 1) {
                for (int b = 0; b < z->n_buckets; b++) {
                    int64_t bytes_b = z->buckets[b].n * 4;
                    if (z->buckets[b].expert) {
                        p->comm.edp_reduce_scatter += bytes_b;
                        p->comm.edp_all_gather += bytes_b;
                    } else {
                        p->comm.dp_reduce_scatter += bytes_b;
                        p->comm.dp_all_gather += bytes_b;
                    }
                }
            }
        }
        nm_zero_destroy(z);
        nm_comm_destroy(dp);
        nm_comm_destroy(edp);
        if (zrc != 0) goto done;
    }
    nm_model_options mo = {.recompute = r->recompute, .ep = ep};
    int64_t T = r->seq_len + 1;  // the trainer's rows: seq_len inputs and the last target
    s->activation_bytes = (int64_t)nm_model_estimate_activation_bytes_ex(cfg, r->micro_batch, T, &mo);
    if (p->n.ep > 1 && cfg->E > 0) {
        // The receive-side buffers sized for R_max rows: x_loc, e_out_loc (per MoE layer, or
        // once with recomputation), and d_e_out_loc, d_x_loc and the exchange buffer.
        int64_t E_loc = cfg->E / p->n.ep, per = cfg->K < E_loc ? cfg->K : E_loc;
        int64_t R = p->n.ep * r->micro_batch * T * per, n_moe = 0;
        for (int64_t l = 0; l < cfg->n_layers; l++) n_moe += nm_layer_is_moe(cfg, l);
        s->ep_buffer_bytes = ((r->recompute ? 2 : 2 * n_moe) + 3) * R * cfg->D * 4;
    }
    s->in_flight = 1;
    s->total_bytes = s->params_bytes + s->grads_bytes + s->bf16_copy_bytes + s->optimizer_bytes +
                     s->in_flight * s->activation_bytes;
    rc = 0;
done:
    nm_param_table_free(&table);
    nm_comm_destroy(ep);
    return rc;
}

int nm_plan_compute(nm_plan *p, const nm_model_config *cfg, const nm_plan_request *r, nm_error *err) {
    *p = (nm_plan){0};
    if (r->seq_len < 1 || r->micro_batch < 1 || r->bucket_mb < 1)
        return nm_error_set(err, "plan: seq_len %lld, micro_batch %lld and bucket_mb %lld must be >= 1",
                            (long long)r->seq_len, (long long)r->micro_batch, (long long)r->bucket_mb);
    if (nm_mesh_check(&p->n, r->world, r->tp, r->pp, r->ep, cfg->E, r->global_batch, r->micro_batch, err) != 0) return -1;
    if (r->tp > 1 || r->pp > 1)
        return nm_error_set(err, "plan: tensor_parallel_size %lld, pipeline_parallel_size %lld: the model does not "
                                 "split over TP or PP yet, so there is no allocation to plan (docs/parallelism.md)",
                            (long long)r->tp, (long long)r->pp);
    p->accum = r->global_batch / (r->micro_batch * p->n.dp);
    p->n_stages = p->n.pp;
    p->stages = nm_calloc((size_t)p->n_stages, sizeof(nm_plan_stage));
    for (int64_t s = 0; s < p->n_stages; s++) {
        if (stage_sizes(p, &p->stages[s], cfg, r, err) != 0) {
            nm_plan_free(p);
            return -1;
        }
    }
    if (p->n.world > 1) {
        int64_t n_moe = 0;
        for (int64_t l = 0; l < cfg->n_layers; l++) n_moe += nm_layer_is_moe(cfg, l);
        p->comm.dp_all_reduce = 5 * 8 + n_moe * cfg->E * 8;  // loss terms and finiteness, expert loads
    }
    p->comm.ep_all_to_all_job = all_to_all_job_bytes(cfg, r, p->accum);
    p->comm.ep_all_to_all = p->comm.ep_all_to_all_job / p->n.world;
    p->flops_per_step_rank = nm_model_flops_per_token(cfg, r->seq_len) * (double)(r->global_batch * r->seq_len) /
                             (double)p->n.world;
    p->compute_s = r->flops > 0 ? p->flops_per_step_rank / r->flops : 0.0;
    return 0;
}

void nm_plan_free(nm_plan *p) {
    nm_free(p->stages);
    p->stages = NULL;
}
