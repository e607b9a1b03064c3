// plan_time.c: the time model of `plan` (plan.h: nm_plan_time_compute): a step's seconds per
// pipeline stage from its FLOPs and each group's bytes (plan.c counts both as the run's
// counters do), the placement of the groups on nodes, the 1F1B bubble and what overlap hides.
//
// The model, stated once (docs/parallelism.md "The time model" has the derivation and its
// validation on this project's machines):
//  - compute: the stage's training FLOPs per rank and step (a recomputed forward adds a third)
//    at the request's FLOP/s, the rate the step's kernels sustain;
//  - a collective over n ranks moves, per rank, what a ring moves: (n-1)/n of the buffer for a
//    reduce-scatter or all-gather, twice that for an all-reduce, at the group's bandwidth, plus
//    n-1 message latencies per call. A group all of whose ranks share a node runs at bw_intra,
//    any other at bw_inter (its slowest link). The mesh (comm/mesh.h) places rank
//    tp + TP (dp + DP pp): tp and ep groups are consecutive ranks, dp strides TP, edp EP, pp TP DP;
//  - the all-to-all: each rank's bytes (its own piece included, as the counter counts them)
//    spread evenly over the n destinations; those on the rank's node cross at bw_intra, the
//    others at bw_inter, at once: the slower of the two. The trainer sends a token's K rows to
//    their K experts without merging rows bound for one node, so node-limited routing
//    (topk_group) bounds which nodes a token reaches but not the bytes that cross;
//  - the pipeline: the stage's time per micro-batch, the slowest stage setting the pace of
//    accum + PP - 1 slots (1F1B); with v virtual stages per rank a slot is a chunk's share,
//    1/v of that time, and there are v accum + PP - 1 of them (interleaved 1F1B); the gradient reduction after the last backward, its
//    reduce-scatter hidden behind the last micro-batch's backward with overlap_grad_reduce
//    (behind every micro-batch's under gradient sharding, whose reduce-scatters are accum x);
//    with overlap_ep the all-to-all behind the stage's compute (the trainer's split exchange,
//    overlap_moe_expert_parallel_comm, hides it behind the experts' compute where the
//    collectives progress), or with pair_micro_batches (moe_pair_micro_batches) the all-to-all
//    of every paired half behind the other micro-batch's compute; tensor-parallel and pipeline transfers are never hidden. The optimizer's own
//    time is not modelled.
#include <math.h>

#include "train/plan.h"

// How many nodes the group of rank 0 (size ranks, stride apart) touches, and how many of its
// ranks share rank 0's node, with R ranks per node (R <= 0: one node).
static void placement(int64_t stride, int64_t size, int64_t R, int64_t *nodes, int64_t *local) {
    *nodes = 1;
    *local = size;
    if (R <= 0 || size <= 1) return;
    int64_t last_node = -1;
    *nodes = 0;
    *local = 0;
    for (int64_t i = 0; i < size; i++) {
        int64_t node = i * stride / R;
        if (node != last_node) (*nodes)++;
        last_node = node;
        *local += node == 0;
    }
}

typedef struct link {
    double bw, latency;
} link;

static link group_link(const nm_plan_request *r, int64_t stride, int64_t size) {
    int64_t nodes, local;
    placement(stride, size, r->ranks_per_node, &nodes, &local);
    return nodes > 1 ? (link){r->bw_inter, r->latency_inter} : (link){r->bw_intra, r->latency_intra};
}

// One rank's seconds in `calls` ring collectives moving `bytes` in all over n ranks;
// `passes`: 1 for reduce-scatter and all-gather, 2 for all-reduce.
static double ring_s(double bytes, int64_t n, int64_t calls, int passes, link l) {
    if (n <= 1 || (bytes <= 0 && calls <= 0)) return 0.0;
    double frac = (double)(n - 1) / (double)n;
    return (double)passes * (frac * bytes / l.bw + (double)calls * (double)(n - 1) * l.latency);
}

// The all-to-all: bytes handed in by one rank in `calls` exchanges over the ep group.
static double all_to_all_s(const nm_plan_request *r, double bytes, int64_t n, int64_t calls) {
    if (n <= 1 || bytes <= 0) return 0.0;
    int64_t nodes, local;
    placement(1, n, r->ranks_per_node, &nodes, &local);
    double in_node = bytes * (double)(local - 1) / (double)n / r->bw_intra;
    double off_node = nodes > 1 ? bytes * (double)(n - local) / (double)n / r->bw_inter : 0.0;
    double lat = (double)calls * ((double)(local - 1) * r->latency_intra + (double)(n - local) * r->latency_inter);
    return fmax(in_node, off_node) + lat;
}

// Calls per step of one stage's ranks, for the latencies: per block and micro-batch the
// tensor-parallel collectives (forward: two all-reduces, or an all-gather and a
// reduce-scatter around attention and the FFN; backward as many plus three all-reduces of
// the attention's input gradients), the expert exchanges (counts, dispatch, combine, each
// again in the backward and the recomputed forward) and the two pipeline transfers.
static void stage_times(nm_plan *p, nm_plan_stage *s, const nm_model_config *cfg, const nm_plan_request *r) {
    nm_plan_time *t = &s->time;
    const nm_plan_comm *c = &s->comm;
    const int64_t TP = p->n.tp, DP = p->n.dp, EP = p->n.ep, accum = p->accum;
    const int fwd = r->recompute ? 2 : 1, sp = TP > 1 && r->sequence_parallel;
    const int64_t n_moe = s->n_moe_layers;
    const int64_t blocks = s->n_layers + (s->last ? cfg->M : 0);
    t->compute_s = s->flops_per_step_rank * (r->recompute ? 4.0 / 3.0 : 1.0) / r->flops;
    if (r->bw_intra > 0 && r->bw_inter > 0) {
        const link tp = group_link(r, 1, TP), dp = group_link(r, TP, DP), edp = group_link(r, EP, DP * TP / EP);
        const int64_t tp_calls = blocks * accum * (fwd * (sp ? 4 : 2) + (sp ? 4 : 2) + 3);
        // tp bytes count each collective's whole buffer; an all-reduce is two ring passes
        t->tp_s = ring_s((double)c->tp_all_reduce, TP, tp_calls, 2, tp) +
                  ring_s((double)(c->tp_reduce_scatter + c->tp_all_gather), TP, 0, 1, tp);
        t->ep_s = all_to_all_s(r, (double)c->ep_all_to_all, EP, n_moe * accum * (fwd * 3 + 2));
        const double bucket = (double)r->bucket_mb * 1048576.0;
        const int64_t dp_calls = (int64_t)ceil((double)c->dp_reduce_scatter / bucket),
                      edp_calls = (int64_t)ceil((double)c->edp_reduce_scatter / bucket);
        const double dp_rs = ring_s((double)c->dp_reduce_scatter, DP, dp_calls, 1, dp) +
                             ring_s((double)c->edp_reduce_scatter, DP * TP / EP, edp_calls, 1, edp);
        const double dp_ag = ring_s((double)c->dp_all_gather, DP, dp_calls, 1, dp) +
                             ring_s((double)c->edp_all_gather, DP * TP / EP, edp_calls, 1, edp);
        t->dp_s = dp_rs + dp_ag + ring_s((double)c->dp_all_reduce, p->n.world > 1 ? p->n.world : 1, 3, 2, dp);
        if (p->n.pp > 1) {
            const link pp = group_link(r, TP * DP, 2);  // a stage and its neighbour
            const int64_t msgs = accum * ((s->first ? 0 : 1) + (s->last ? 0 : 1));
            t->pp_s = (double)c->pp_send / pp.bw + (double)msgs * pp.latency;
        }
        // hidden: the reduce-scatter behind the last micro-batch's backward (two thirds of its
        // compute), or under gradient sharding behind every micro-batch's; the all-to-all
        // behind the whole compute
        double hidden_dp = r->shard_grads           ? fmin(dp_rs, t->compute_s * 2.0 / 3.0)
                           : r->overlap_grad_reduce ? fmin(dp_rs, t->compute_s / (double)accum * 2.0 / 3.0)
                                                    : 0.0;
        // paired micro-batches: all but the first forward's and the last backward's, (accum-1)/accum
        double ep_behind = r->overlap_ep           ? t->ep_s
                           : r->pair_micro_batches ? t->ep_s * (double)(accum - 1) / (double)accum
                                                   : 0.0;
        double hidden_ep = fmin(ep_behind, t->compute_s);
        t->hidden_s = hidden_dp + hidden_ep;
        t->dp_exposed_s = t->dp_s - hidden_dp;
    }
    t->busy_s = t->compute_s + t->tp_s + t->ep_s + t->pp_s + t->dp_s - t->hidden_s;
}

void nm_plan_time_compute(nm_plan *p, const nm_model_config *cfg, const nm_plan_request *r) {
    double slot = 0.0, reduce = 0.0;
    for (int64_t i = 0; i < p->n_stages; i++) {
        nm_plan_stage *s = &p->stages[i];
        stage_times(p, s, cfg, r);
        const nm_plan_time *t = &s->time;
        // the reduction's exposed part comes after the last backward, outside the slots
        slot = fmax(slot, (t->busy_s - t->dp_exposed_s) / (double)p->accum);
        reduce = fmax(reduce, t->dp_exposed_s);
    }
    const double v = p->vpp > 1 ? (double)p->vpp : 1.0, m = (double)p->accum, pp = (double)p->n.pp;
    p->bubble_fraction = p->n.pp > 1 ? (pp - 1) / (v * m + pp - 1) : 0.0;
    p->step_s = slot / v * (v * m + pp - 1) + reduce;
    double tokens = (double)(r->global_batch * r->seq_len);
    p->tokens_per_s_rank = p->step_s > 0 ? tokens / p->step_s / (double)p->n.world : 0.0;
    p->mfu = p->step_s > 0 ? p->flops_per_step_rank / (p->step_s * r->flops) : 0.0;
}
