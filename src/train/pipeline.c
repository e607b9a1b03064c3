// pipeline.c: the schedule run (see pipeline.h): a rank's forwards and backwards in the order
// pipeline_layout.c makes, with the activations and their gradients sent between the stages.
#include "train/pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EVAL_TAG 16384  // validation forwards; training uses 2i and 2i + 1 below it

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// --- schedule ---------------------------------------------------------------------------------

int nm_pipeline_create(nm_pipeline **out, nm_comm *pp, nm_model *model, int64_t v, int64_t B, int64_t T,
                       nm_error *err) {
    (void)err;
    const nm_ops *ops = nm_model_ops(model);
    nm_pipeline *p = nm_calloc(1, sizeof(*p));
    p->pp = pp;
    p->model = model;
    p->v = v > 1 ? v : 1;
    p->B = B;
    p->T = T;
    p->D = nm_model_cfg(model)->D;
    size_t n = (size_t)(B * T * p->D);
    p->recv_act = ops->alloc(ops, n * sizeof(float));
    p->recv_grad = ops->alloc(ops, n * sizeof(float));
    *out = p;
    return 0;
}

void nm_pipeline_destroy(nm_pipeline *p) {
    if (!p) return;
    const nm_ops *ops = nm_model_ops(p->model);
    ops->free(ops, p->recv_act);
    ops->free(ops, p->recv_grad);
    for (int i = 0; i < p->n_send; i++) ops->free(ops, p->send_buf[i]);
    nm_free(p->send_buf);
    nm_free(p->send_req);
    nm_free(p->plan);
    nm_free(p);
}

typedef struct run {
    nm_pipeline *p;
    const int32_t *tokens;
    int64_t m, slots;
    int64_t w;                  // paired micro-batches (p->pair): warm-up forwards, 0 otherwise
    const nm_loss_options *opt;
    const nm_pipeline_hooks *hooks;
    nm_pipeline_times *times;
    int rank, n_ranks;
} run;

static int64_t act_count(const nm_pipeline *p) { return p->B * p->T * p->D; }

// Virtual stage c * PP + rank is the first or the last of the pipeline.
static int first_stage(const run *r, int64_t chunk) { return r->rank == 0 && chunk == 0; }
static int last_stage(const run *r, int64_t chunk) { return r->rank == r->n_ranks - 1 && chunk == r->p->v - 1; }
// Tags name the receiving chunk and the micro-batch: 2 (c m + i) for an activation, + 1 for a
// gradient (below EVAL_TAG: nm_pipeline_train checks).
static int act_tag(const run *r, int64_t chunk, int64_t micro) { return (int)(2 * (chunk * r->m + micro)); }

// A send buffer whose last send has finished, or a new one.
static void add_send_buffer(nm_pipeline *p) {
    p->send_buf = nm_realloc(p->send_buf, (size_t)(p->n_send + 1) * sizeof(float *));
    p->send_req = nm_realloc(p->send_req, (size_t)(p->n_send + 1) * sizeof(nm_comm_request));
    memset(&p->send_req[p->n_send], 0, sizeof(nm_comm_request));
    p->send_buf[p->n_send] = nm_model_ops(p->model)->alloc(nm_model_ops(p->model), (size_t)act_count(p) * sizeof(float));
    p->n_send++;
}

// Send buffers for the most sends a rank can have in flight with m micro-batches, made before
// the first step. A forward's output is received before this chunk's backward of the same
// micro-batch (that backward needs the next stage's gradient), so at most the chunk's slots
// are out; an input gradient is received by the previous stage's backward, while it still
// holds that micro-batch in a slot. So v x (this rank's slots + the most any rank holds)
// bound the sends in flight, whatever the timing; a step never adds one (test_zero_alloc).
static void reserve_send_buffers(nm_pipeline *p, int64_t m) {
    int64_t most = 1;
    for (int64_t r = 0; r < p->pp->size; r++) {
        int64_t s = nm_pipeline_slots(p->pp->size, p->v, r, m);
        most = s > most ? s : most;
    }
    int64_t want = p->v * (nm_pipeline_slots(p->pp->size, p->v, p->pp->rank, m) + most);
    if (p->pair) want += 2;  // paired: one more forward in flight here and at each neighbour
    while (p->n_send < want) add_send_buffer(p);
}

static int send_buffer(nm_pipeline *p, int *slot, nm_error *err) {
    for (int i = 0; i < p->n_send; i++) {
        int done = 1;
        if (nm_comm_test(&p->send_req[i], &done, err) != 0) return -1;
        if (done) {
            *slot = i;
            return 0;
        }
    }
    add_send_buffer(p);  // beyond the bound above: never waits on a send (that could deadlock)
    *slot = p->n_send - 1;
    return 0;
}

// src (B, T, D) to peer, without waiting for it to be received.
static int send_to(run *r, const float *src, int peer, int tag, nm_error *err) {
    nm_pipeline *p = r->p;
    double t0 = now_s();
    int i;
    if (send_buffer(p, &i, err) != 0) return -1;
    int64_t n = act_count(p);
    nm_model_ops(p->model)->copy_2d(nm_model_ops(p->model), p->send_buf[i], n, src, n, 1, n);
    int rc = nm_comm_send_start(p->pp, p->send_buf[i], n, NM_DT_F32, peer, tag, &p->send_req[i], err);
    r->times->comm += now_s() - t0;
    return rc;
}

static int recv_from(run *r, float *dst, int peer, int tag, nm_error *err) {
    double t0 = now_s();
    int rc = nm_comm_recv(r->p->pp, dst, act_count(r->p), NM_DT_F32, peer, tag, err);
    r->times->comm += now_s() - t0;
    return rc;
}

// The model micro-batch i runs on: one, or with paired micro-batches blocks of w micro-batches
// in turn on the two (so a forward and the backward w micro-batches before it never share one).
static nm_model *model_of(const run *r, int64_t micro) { return nm_pipeline_model_of(r->p, micro, r->m); }

// A chunk's micro-batches are in flight first in, first out, so micro % slots never names a
// slot still holding one (paired: micro % w on its model, whose in-flight ones are consecutive).
static int select_slot(run *r, int64_t chunk, int64_t micro, nm_error *err) {
    if (r->w > 0) return nm_model_set_slot(model_of(r, micro), micro % r->w, err);
    return nm_model_set_slot(r->p->model, chunk * r->slots + micro % r->slots, err);
}

// Micro-batch i's forward on chunk c: its input from the previous stage (rank - 1, or the last
// rank's previous chunk), its output to the next.
static int forward(run *r, int64_t c, int64_t i, nm_error *err) {
    nm_pipeline *p = r->p;
    int prev = (r->rank + r->n_ranks - 1) % r->n_ranks, next = (r->rank + 1) % r->n_ranks;
    if (!first_stage(r, c) && recv_from(r, p->recv_act, prev, act_tag(r, c, i), err) != 0) return -1;
    double t0 = now_s();
    nm_loss_terms lt;
    if (select_slot(r, c, i, err) != 0) return -1;
    if (nm_model_forward_stage(model_of(r, i), r->tokens + i * p->B * p->T, first_stage(r, c) ? NULL : p->recv_act,
                               p->B, p->T, r->opt, &lt, NULL, err) != 0)
        return nm_error_prefix(err, "pipeline stage %lld, micro-batch %lld", (long long)(c * r->n_ranks + r->rank),
                               (long long)i);
    r->times->forward += now_s() - t0;
    if (r->hooks && r->hooks->after_forward && r->hooks->after_forward(r->hooks->ctx, i, &lt, err) != 0) return -1;
    if (last_stage(r, c)) return 0;
    int64_t to_chunk = r->rank == r->n_ranks - 1 ? c + 1 : c;
    return send_to(r, nm_model_stage_output(model_of(r, i)), next, act_tag(r, to_chunk, i), err);
}

// Micro-batch i's backward on chunk c: the gradient of its output from the next stage, the
// gradient of its input to the previous one.
static int backward(run *r, int64_t c, int64_t i, nm_error *err) {
    nm_pipeline *p = r->p;
    int prev = (r->rank + r->n_ranks - 1) % r->n_ranks, next = (r->rank + 1) % r->n_ranks;
    if (!last_stage(r, c) && recv_from(r, p->recv_grad, next, act_tag(r, c, i) + 1, err) != 0) return -1;
    if (r->hooks && r->hooks->before_backward && r->hooks->before_backward(r->hooks->ctx, i, c, err) != 0) return -1;
    double t0 = now_s();
    if (select_slot(r, c, i, err) != 0) return -1;
    if (nm_model_backward_stage(model_of(r, i), last_stage(r, c) ? NULL : p->recv_grad, err) != 0)
        return nm_error_prefix(err, "pipeline stage %lld, micro-batch %lld", (long long)(c * r->n_ranks + r->rank),
                               (long long)i);
    r->times->backward += now_s() - t0;
    if (r->hooks && r->hooks->after_backward && r->hooks->after_backward(r->hooks->ctx, i, c, err) != 0) return -1;
    if (first_stage(r, c)) return 0;
    int64_t to_chunk = r->rank == 0 ? c - 1 : c;
    return send_to(r, nm_model_input_grad(model_of(r, i)), prev, act_tag(r, to_chunk, i) + 1, err);
}

// --- paired micro-batches (nm_pipeline_set_pair) ---------------------------------------------
//
// 1F1B with one more warm-up forward, w = min(PP - rank, m), then micro-batch i + w's forward
// paired with micro-batch i's backward (the two jobs taking turns at each expert all-to-all,
// core/coop.h), then the remaining backwards. Both inputs are received before a pair and both
// outputs sent after it: stage s's pair i needs stage s-1's pair i-1 (its forward of i + w) and
// stage s+1's pair i (its backward of i), which needs stage s's pair i-1, so no two pairs wait
// for each other (the last stage pairs i + 1 with i, which plain 1F1B's w = PP - s - 1 could
// not). Forwards and every chunk's backwards stay in micro-batch order: one process's numbers.

// Micro-batch f's forward beside micro-batch b's backward (chunk 0).
static int forward_backward_pair(run *r, int64_t f, int64_t b, nm_error *err) {
    nm_pipeline *p = r->p;
    int prev = (r->rank + r->n_ranks - 1) % r->n_ranks, next = (r->rank + 1) % r->n_ranks;
    if (!first_stage(r, 0) && recv_from(r, p->recv_act, prev, act_tag(r, 0, f), err) != 0) return -1;
    if (!last_stage(r, 0) && recv_from(r, p->recv_grad, next, act_tag(r, 0, b) + 1, err) != 0) return -1;
    if (r->hooks && r->hooks->before_backward && r->hooks->before_backward(r->hooks->ctx, b, 0, err) != 0) return -1;
    if (select_slot(r, 0, f, err) != 0 || select_slot(r, 0, b, err) != 0) return -1;
    nm_model *mf = model_of(r, f), *mb = model_of(r, b);
    nm_loss_terms lt;
    double ran[2];
    if (nm_model_pair_run(p->coop, mf, r->tokens + f * p->B * p->T, first_stage(r, 0) ? NULL : p->recv_act, p->B,
                          p->T, r->opt, &lt, mb, last_stage(r, 0) ? NULL : p->recv_grad, ran, err) != 0)
        return nm_error_prefix(err, "pipeline stage %lld, micro-batches %lld (forward) and %lld (backward)",
                               (long long)r->rank, (long long)f, (long long)b);
    r->times->forward += ran[0];
    r->times->backward += ran[1];
    if (r->hooks && r->hooks->after_forward && r->hooks->after_forward(r->hooks->ctx, f, &lt, err) != 0) return -1;
    if (r->hooks && r->hooks->after_backward && r->hooks->after_backward(r->hooks->ctx, b, 0, err) != 0) return -1;
    if (!last_stage(r, 0) && send_to(r, nm_model_stage_output(mf), next, act_tag(r, 0, f), err) != 0) return -1;
    if (!first_stage(r, 0) && send_to(r, nm_model_input_grad(mb), prev, act_tag(r, 0, b) + 1, err) != 0) return -1;
    return 0;
}

static int train_paired(run *r, nm_error *err) {
    const int64_t m = r->m, w = r->w;
    int rc = 0;
    for (int64_t i = 0; rc == 0 && i < w; i++) rc = forward(r, 0, i, err);
    for (int64_t i = 0; rc == 0 && i + w < m; i++) rc = forward_backward_pair(r, i + w, i, err);
    for (int64_t i = m - w; rc == 0 && i < m; i++) rc = backward(r, 0, i, err);
    return rc;
}

int64_t nm_pipeline_pair_slots(int64_t pp, int64_t rank, int64_t m) { return pp - rank < m ? pp - rank : m; }

nm_model *nm_pipeline_model_of(const nm_pipeline *p, int64_t micro, int64_t m) {
    if (!p->pair) return p->model;
    int64_t w = nm_pipeline_pair_slots(p->pp->size, p->pp->rank, m);
    return (micro / w) % 2 ? p->pair : p->model;
}

void nm_pipeline_set_pair(nm_pipeline *p, nm_model *pair, nm_coop *coop) {
    p->pair = pair;
    p->coop = coop;
}

int nm_pipeline_train(nm_pipeline *p, const int32_t *tokens, int64_t m, const nm_loss_options *opt,
                      const nm_pipeline_hooks *hooks, nm_pipeline_times *times, nm_error *err) {
    memset(times, 0, sizeof(*times));
    if (2 * p->v * m + 1 >= EVAL_TAG)
        return nm_error_set(err, "pipeline: %lld micro-batches x %lld virtual stages per step exceed the message tags "
                                 "(at most %d)", (long long)m, (long long)p->v, EVAL_TAG / 2 - 1);
    run r = {.p = p, .tokens = tokens, .m = m, .opt = opt, .hooks = hooks, .times = times,
             .rank = p->pp->rank, .n_ranks = p->pp->size};
    if (nm_pipeline_check_micro_batches(r.n_ranks, p->v, m, err) != 0) return -1;
    r.slots = nm_model_slots_per_chunk(p->model);
    if (p->pair) {  // paired micro-batches: train_paired's order, not a plan
        if (p->v > 1)
            return nm_error_set(err, "pipeline: paired micro-batches under the interleaved schedule are not built");
        r.w = nm_pipeline_pair_slots(r.n_ranks, r.rank, m);
        if (r.slots < r.w || nm_model_slots_per_chunk(p->pair) < r.w)
            return nm_error_set(err, "pipeline: %lld paired micro-batches need %lld activation sets on each model, "
                                     "they have %lld and %lld", (long long)m, (long long)r.w, (long long)r.slots,
                                (long long)nm_model_slots_per_chunk(p->pair));
        if (p->plan_m != m) reserve_send_buffers(p, m), p->plan_m = m;
    } else if (p->plan_m != m) {  // the schedule of m micro-batches, made once (a step allocates nothing)
        int64_t need = nm_pipeline_slots(r.n_ranks, p->v, r.rank, m);
        if (r.slots < need)
            return nm_error_set(err, "pipeline: %lld micro-batches need %lld activation sets per chunk, the model has "
                                     "%lld", (long long)m, (long long)need, (long long)r.slots);
        p->plan = nm_realloc(p->plan, (size_t)(2 * p->v * m) * sizeof(*p->plan));
        nm_pipeline_schedule(p->plan, r.n_ranks, p->v, r.rank, m);
        p->plan_m = m;
        reserve_send_buffers(p, m);
    }
    const int64_t n = 2 * p->v * m;
    const nm_pipeline_action *plan = p->plan;
    double t0 = now_s();
    int rc = p->pair ? train_paired(&r, err) : 0;
    for (int64_t k = 0; !p->pair && rc == 0 && k < n; k++)
        rc = plan[k].backward ? backward(&r, plan[k].chunk, plan[k].micro, err)
                              : forward(&r, plan[k].chunk, plan[k].micro, err);
    // Every send has been received once the neighbours' schedules are done with them.
    double tw = now_s();
    for (int i = 0; rc == 0 && i < p->n_send; i++) rc = nm_comm_wait(&p->send_req[i], err);
    times->comm += now_s() - tw;
    times->total = now_s() - t0;
    return rc;
}

int nm_pipeline_forward(nm_pipeline *p, const int32_t *tokens, const nm_loss_options *opt, nm_loss_terms *loss,
                        nm_error *err) {
    int s = p->pp->rank, S = p->pp->size;
    int prev = (s + S - 1) % S, next = (s + 1) % S;
    for (int64_t c = 0; c < p->v; c++) {
        int first = s == 0 && c == 0, last = s == S - 1 && c == p->v - 1;
        if (!first && nm_comm_recv(p->pp, p->recv_act, act_count(p), NM_DT_F32, prev, EVAL_TAG + (int)c, err) != 0)
            return -1;
        if (nm_model_set_slot(p->model, c * nm_model_slots_per_chunk(p->model), err) != 0) return -1;
        if (nm_model_forward_stage(p->model, tokens, first ? NULL : p->recv_act, p->B, p->T, opt, loss, NULL, err) != 0)
            return -1;
        int64_t to_chunk = s == S - 1 ? c + 1 : c;
        if (!last && nm_comm_send(p->pp, nm_model_stage_output(p->model), act_count(p), NM_DT_F32, next,
                                  EVAL_TAG + (int)to_chunk, err) != 0)
            return -1;
    }
    return 0;
}
