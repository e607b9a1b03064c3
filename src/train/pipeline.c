// pipeline.c: stage layouts and the 1F1B schedule (see pipeline.h).
#include "train/pipeline.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KEY "pipeline_model_parallel_layout"
#define EVAL_TAG 16384  // validation forwards; training uses 2i and 2i + 1 below it

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// --- layout -----------------------------------------------------------------------------------

static int bad_layout(nm_error *err, const char *layout, const char *why) {
    return nm_error_set(err, KEY " \"%s\": %s", layout, why);
}

// A layout for L layers and M MTP layers on pp stages, for the error that asks for one: the
// layers spread evenly, the remainder on the middle stages (the first holds the embedding, the
// last the head, the MTP layers and the loss), e.g. DeepSeek-V3's 61 on 16:
// "Et*3|t*4|...|t*4|t*3mL". Empty when there are fewer layers than stages.
static void suggest_layout(char *out, size_t cap, int64_t L, int64_t M, int64_t pp) {
    out[0] = 0;
    if (L < pp || pp < 2 || pp > 1024) return;
    int64_t base = L / pp, extra = L % pp;
    size_t n = (size_t)snprintf(out, cap, "\"");
    for (int64_t s = 0; s < pp && n < cap; s++) {
        // the middle stages take one more each, stage 0 the last one when pp - 1 are over
        int64_t here = base + ((s > 0 && s < pp - 1 && s <= extra) || (s == 0 && extra == pp - 1) ? 1 : 0);
        n += (size_t)snprintf(out + n, cap - n, "%s%s", s ? "|" : "", s == 0 ? "E" : "");
        if (n < cap && here > 0) n += (size_t)snprintf(out + n, cap - n, here == 1 ? "t" : "t*%lld", (long long)here);
        if (n < cap && s == pp - 1 && M > 0)
            n += (size_t)snprintf(out + n, cap - n, M == 1 ? "m" : "m*%lld", (long long)M);
        if (n < cap && s == pp - 1) n += (size_t)snprintf(out + n, cap - n, "L\"");
    }
    if (n >= cap) out[0] = 0;
}

int nm_pipeline_layout(nm_model_stage *stages, int64_t pp, const char *layout, const nm_model_config *cfg,
                       nm_error *err) {
    const int64_t L = cfg->L, M = cfg->M;
    if (!layout || !*layout) {
        if (L % pp != 0 || L < pp) {
            char fix[64 + 16 * 1024] = "";
            suggest_layout(fix, sizeof fix, L, M, pp);
            return nm_error_set(err, "pipeline_parallel_size %lld does not divide the %lld decoder layers "
                                     "(num_hidden_layers): set " KEY " (plan: --pipeline-layout) to place them%s%s",
                                (long long)pp, (long long)L, fix[0] ? ", for example " : "", fix);
        }
        for (int64_t s = 0; s < pp; s++)
            stages[s] = (nm_model_stage){s * (L / pp), (s + 1) * (L / pp), s == 0, s == pp - 1};
        return 0;
    }
    char why[256];
    int64_t n_stages = 1;
    for (const char *p = layout; *p; p++) n_stages += *p == '|';
    if (n_stages != pp) {
        snprintf(why, sizeof(why), "has %lld stages, pipeline_parallel_size is %lld", (long long)n_stages, (long long)pp);
        return bad_layout(err, layout, why);
    }
    int64_t s = 0, layers = 0, mtp = 0, n_e = 0, n_l = 0, in_stage = 0;
    for (int64_t i = 0; i < pp; i++) stages[i] = (nm_model_stage){0, 0, 0, 0};
    stages[0].layer_begin = 0;
    for (const char *p = layout;; p++) {
        if (*p == ' ') continue;
        if (*p == '|' || *p == 0) {
            if (in_stage == 0) {
                snprintf(why, sizeof(why), "stage %lld is empty (empty stages are not supported)", (long long)s);
                return bad_layout(err, layout, why);
            }
            stages[s].layer_end = layers;
            if (*p == 0) break;
            s++;
            if (s < pp) stages[s].layer_begin = layers;
            in_stage = 0;
            continue;
        }
        char sym = *p;
        long n = 1;
        if (p[1] == '*') {
            char *end;
            n = strtol(p + 2, &end, 10);
            if (end == p + 2 || n < 1 || n > 100000) return bad_layout(err, layout, "'*' must be followed by a count >= 1");
            p = end - 1;
        }
        if (sym == 'E') {
            if (s != 0 || in_stage != 0 || n != 1 || n_e++)
                return bad_layout(err, layout, "'E' (the embedding) must appear once, first in the first stage");
            stages[0].first = 1;
        } else if (sym == 't') {
            if (mtp || n_l) return bad_layout(err, layout, "decoder layers 't' must come before 'm' and 'L'");
            layers += n;
        } else if (sym == 'm') {
            if (n_l) return bad_layout(err, layout, "'m' (MTP layers) must come before 'L'");
            mtp += n;
        } else if (sym == 'L') {
            if (n != 1 || n_l++) return bad_layout(err, layout, "'L' (the loss) must appear once");
        } else {
            snprintf(why, sizeof(why), "unknown symbol '%c' (E: embedding, t: decoder layer, m: MTP layer, L: loss, "
                                       "'|' between stages, 'X*n' repeats)", isprint((unsigned char)sym) ? sym : '?');
            return bad_layout(err, layout, why);
        }
        in_stage += n;
        if ((sym == 'm' || sym == 'L') && s != pp - 1) {
            snprintf(why, sizeof(why), "'%c' is on stage %lld: MTP layers and the loss belong to the last stage %lld",
                     sym, (long long)s, (long long)(pp - 1));
            return bad_layout(err, layout, why);
        }
    }
    if (!n_e || !n_l) return bad_layout(err, layout, "needs 'E' (embedding) in the first stage and 'L' (loss) in the last");
    if (layers != L || mtp != M) {
        snprintf(why, sizeof(why), "places %lld decoder layers 't' and %lld MTP layers 'm', the model has %lld "
                                   "(num_hidden_layers) and %lld (num_nextn_predict_layers)",
                 (long long)layers, (long long)mtp, (long long)L, (long long)M);
        return bad_layout(err, layout, why);
    }
    stages[pp - 1].last = 1;
    return 0;
}

void nm_pipeline_describe_stage(const nm_model_stage *s, const nm_model_config *cfg, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = 0;
#define PUT(str) n += (size_t)snprintf(buf + n, n < cap ? cap - n : 0, "%s%s", n ? " " : "", str)
    if (s->first) PUT("E");
    for (int64_t l = s->layer_begin; l < s->layer_end && n < cap; l++) PUT("t");
    for (int64_t k = 0; s->last && k < cfg->M && n < cap; k++) PUT("m");
    if (s->last) PUT("L");
#undef PUT
}

int64_t nm_pipeline_slots(int64_t pp, int64_t stage, int64_t m) {
    int64_t n = pp - stage;
    return n < m ? n : m;
}

// --- schedule ---------------------------------------------------------------------------------

int nm_pipeline_create(nm_pipeline **out, nm_comm *pp, nm_model *model, int64_t B, int64_t T, nm_error *err) {
    (void)err;
    nm_pipeline *p = nm_calloc(1, sizeof(*p));
    p->pp = pp;
    p->model = model;
    p->B = B;
    p->T = T;
    p->D = nm_model_cfg(model)->D;
    size_t n = (size_t)(B * T * p->D);
    p->recv_act = nm_aligned_alloc(n * sizeof(float));
    p->recv_grad = nm_aligned_alloc(n * sizeof(float));
    *out = p;
    return 0;
}

void nm_pipeline_destroy(nm_pipeline *p) {
    if (!p) return;
    nm_free(p->recv_act);
    nm_free(p->recv_grad);
    nm_free(p);
}

typedef struct run {
    nm_pipeline *p;
    const int32_t *tokens;
    int64_t m, slots;
    const nm_loss_options *opt;
    const nm_pipeline_hooks *hooks;
    nm_pipeline_times *times;
    int stage, n_stages;
} run;

static int64_t act_count(const nm_pipeline *p) { return p->B * p->T * p->D; }

static int xfer(run *r, int send, void *buf, int peer, int tag, nm_error *err) {
    double t0 = now_s();
    int rc = send ? nm_comm_send(r->p->pp, buf, act_count(r->p), NM_DT_F32, peer, tag, err)
                  : nm_comm_recv(r->p->pp, buf, act_count(r->p), NM_DT_F32, peer, tag, err);
    r->times->comm += now_s() - t0;
    return rc;
}

static int first_stage(const run *r) { return r->stage == 0; }
static int last_stage(const run *r) { return r->stage == r->n_stages - 1; }

static int recv_forward(run *r, int64_t i, nm_error *err) {
    return first_stage(r) ? 0 : xfer(r, 0, r->p->recv_act, r->stage - 1, (int)(2 * i), err);
}
static int send_forward(run *r, int64_t i, nm_error *err) {
    return last_stage(r) ? 0 : xfer(r, 1, (void *)nm_model_stage_output(r->p->model), r->stage + 1, (int)(2 * i), err);
}
static int recv_backward(run *r, int64_t i, nm_error *err) {
    return last_stage(r) ? 0 : xfer(r, 0, r->p->recv_grad, r->stage + 1, (int)(2 * i + 1), err);
}
static int send_backward(run *r, int64_t i, nm_error *err) {
    return first_stage(r) ? 0 : xfer(r, 1, (void *)nm_model_input_grad(r->p->model), r->stage - 1, (int)(2 * i + 1), err);
}

static int forward(run *r, int64_t i, nm_error *err) {
    nm_pipeline *p = r->p;
    double t0 = now_s();
    nm_loss_terms lt;
    if (nm_model_set_slot(p->model, i % r->slots, err) != 0) return -1;
    if (nm_model_forward_stage(p->model, r->tokens + i * p->B * p->T, first_stage(r) ? NULL : p->recv_act, p->B, p->T,
                               r->opt, &lt, NULL, err) != 0)
        return nm_error_prefix(err, "pipeline stage %d, micro-batch %lld", r->stage, (long long)i);
    r->times->forward += now_s() - t0;
    return r->hooks && r->hooks->after_forward ? r->hooks->after_forward(r->hooks->ctx, i, &lt, err) : 0;
}

static int backward(run *r, int64_t i, nm_error *err) {
    nm_pipeline *p = r->p;
    if (r->hooks && r->hooks->before_backward && r->hooks->before_backward(r->hooks->ctx, i, err) != 0) return -1;
    double t0 = now_s();
    if (nm_model_set_slot(p->model, i % r->slots, err) != 0) return -1;
    if (nm_model_backward_stage(p->model, last_stage(r) ? NULL : p->recv_grad, err) != 0)
        return nm_error_prefix(err, "pipeline stage %d, micro-batch %lld", r->stage, (long long)i);
    r->times->backward += now_s() - t0;
    return 0;
}

int nm_pipeline_train(nm_pipeline *p, const int32_t *tokens, int64_t m, const nm_loss_options *opt,
                      const nm_pipeline_hooks *hooks, nm_pipeline_times *times, nm_error *err) {
    memset(times, 0, sizeof(*times));
    if (2 * m + 1 >= EVAL_TAG)
        return nm_error_set(err, "pipeline: %lld micro-batches per step exceed the message tags (at most %d)",
                            (long long)m, EVAL_TAG / 2 - 1);
    run r = {.p = p, .tokens = tokens, .m = m, .opt = opt, .hooks = hooks, .times = times,
             .stage = p->pp->rank, .n_stages = p->pp->size};
    r.slots = nm_pipeline_slots(r.n_stages, r.stage, m);
    int64_t warm = r.n_stages - r.stage - 1;
    if (warm > m) warm = m;
    int64_t rest = m - warm;
    double t0 = now_s();
#define TRY(x) \
    do { if ((x) != 0) return -1; } while (0)
    for (int64_t i = 0; i < warm; i++) {
        TRY(recv_forward(&r, i, err));
        TRY(forward(&r, i, err));
        TRY(send_forward(&r, i, err));
    }
    if (rest > 0) TRY(recv_forward(&r, warm, err));
    for (int64_t j = 0; j < rest; j++) {
        int64_t fi = warm + j;
        TRY(forward(&r, fi, err));
        // send_forward_recv_backward with the next stage: the lower stage sends first
        TRY(send_forward(&r, fi, err));
        TRY(recv_backward(&r, j, err));
        TRY(backward(&r, j, err));
        if (j == rest - 1) {
            TRY(send_backward(&r, j, err));
        } else {
            // send_backward_recv_forward with the previous stage: the higher stage receives first
            TRY(recv_forward(&r, fi + 1, err));
            TRY(send_backward(&r, j, err));
        }
    }
    for (int64_t j = rest; j < m; j++) {
        TRY(recv_backward(&r, j, err));
        TRY(backward(&r, j, err));
        TRY(send_backward(&r, j, err));
    }
#undef TRY
    times->total = now_s() - t0;
    return 0;
}

int nm_pipeline_forward(nm_pipeline *p, const int32_t *tokens, const nm_loss_options *opt, nm_loss_terms *loss,
                        nm_error *err) {
    int s = p->pp->rank, S = p->pp->size;
    if (s > 0 && nm_comm_recv(p->pp, p->recv_act, act_count(p), NM_DT_F32, s - 1, EVAL_TAG, err) != 0) return -1;
    if (nm_model_set_slot(p->model, 0, err) != 0) return -1;
    if (nm_model_forward_stage(p->model, tokens, s > 0 ? p->recv_act : NULL, p->B, p->T, opt, loss, NULL, err) != 0)
        return -1;
    if (s < S - 1 &&
        nm_comm_send(p->pp, nm_model_stage_output(p->model), act_count(p), NM_DT_F32, s + 1, EVAL_TAG, err) != 0)
        return -1;
    return 0;
}
