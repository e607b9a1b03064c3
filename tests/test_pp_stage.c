// test_pp_stage.c: pipeline stages in one process, against the whole model.
//
//  1. Layouts: the even split and Megatron layout strings parse to the expected layer ranges
//     ('*' repeats included); bad strings are refused naming the key and value.
//  2. Stage tables: over the stages of a layout every tensor of the one-process table appears
//     exactly once (plus the last stage's embedding copy), under its name and shape, aligned,
//     and initialised to the same floats as one process; absent layers have no offsets. Also
//     for ranks holding two stages each (the interleaved schedule's chunks, one table a rank).
//  3. A chain of stage models (stage s's output is stage s+1's input, the input gradient of
//     s+1 is the output gradient of s) with two micro-batches in flight (forward A, forward B,
//     backward A, backward B, in separate activation sets): CE and MTP are bit-identical to the
//     whole model's, and so is every gradient except the embedding's, which is split between
//     the first stage (main path) and the last stage's copy (MTP path) and summed in a
//     different order: within 1e-6 of the largest gradient element (a few fp32 roundings of
//     four terms), and the balance loss, a double sum split over stages, within 1e-12.
//     Run with and without recomputation.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/rng.h"
#include "model/model.h"
#include "test_model_util.h"
#include "test_util.h"
#include "train/pipeline.h"
#include "test_backend.h"

static void test_layouts(const nm_model_config *c) {
    nm_error err;
    nm_model_stage s[4];
    // test model: 3 decoder layers, 2 MTP depths
    EXPECT(nm_pipeline_layout(s, 3, 1, NULL, c, &err) == 0, "even 3: %s", err.msg);
    EXPECT(s[0].layer_begin == 0 && s[0].layer_end == 1 && s[0].first && !s[0].last, "even stage 0");
    EXPECT(s[2].layer_begin == 2 && s[2].layer_end == 3 && !s[2].first && s[2].last, "even stage 2");
    EXPECT(nm_pipeline_layout(s, 2, 1, NULL, c, &err) != 0 && strstr(err.msg, "does not divide the 3 decoder layers"), "uneven: %s", err.msg);
    EXPECT(nm_pipeline_layout(s, 2, 1, "E t*2 | t m*2 L", c, &err) == 0, "repeat: %s", err.msg);
    EXPECT(s[0].layer_begin == 0 && s[0].layer_end == 2 && s[1].layer_begin == 2 && s[1].layer_end == 3, "repeat ranges");
    EXPECT(nm_pipeline_layout(s, 3, 1, "E|ttt|mmL", c, &err) == 0, "E alone: %s", err.msg);
    EXPECT(s[0].layer_end == 0 && s[0].first && s[1].layer_begin == 0 && s[1].layer_end == 3 && s[2].layer_begin == 3 &&
           s[2].layer_end == 3 && s[2].last, "E alone ranges");
    static const char *bad[][2] = {
        {"Ett|tmL", "places 3 decoder layers 't' and 1 MTP layers 'm'"},
        {"Et|tt|mmL", "has 3 stages, pipeline_parallel_size is 2"},
        {"tEt|tmmL", "'E' (the embedding) must appear once"},
        {"Ettm|tmL", "'m' is on stage 0"},
        {"Ett|tmm", "needs 'E'"},
        {"Ett|tmmLL", "'L' (the loss) must appear once"},
        {"Ett|tmmq", "unknown symbol 'q'"},
        {"Et*0t|tmmL", "'*' must be followed by a count >= 1"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = nm_pipeline_layout(s, 2, 1, bad[i][0], c, &err);
        EXPECT(rc != 0 && strstr(err.msg, "pipeline_model_parallel_layout \"") && strstr(err.msg, bad[i][1]),
               "%s: %s", bad[i][0], rc ? err.msg : "accepted");
    }
}

// pp ranks of v stages each (v > 1: the interleaved schedule's chunks, rank r holding stages
// r, r + pp, ...): each rank's one table holds its chunks' tensors.
static void test_tables(const nm_model_config *c, const nm_param_table *full, const char *layout, int64_t pp, int64_t v) {
    nm_error err;
    nm_model_stage all[8], st[8], chunks[8][4];
    if (nm_pipeline_layout(all, pp, v, layout, c, &err) != 0) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    for (int64_t r = 0; r < pp; r++) {
        nm_pipeline_rank_chunks(all, pp, v, r, chunks[r]);
        st[r] = (nm_model_stage){chunks[r][0].layer_begin, chunks[r][v - 1].layer_end, chunks[r][0].first,
                                 chunks[r][v - 1].last};
    }
    float *ref = nm_aligned_alloc(full->n_floats * sizeof(float));
    nm_params_init(ref, full, c, 99);
    int *seen = nm_calloc((size_t)full->n_rows, sizeof(int));
    for (int64_t s = 0; s < pp; s++) {
        nm_param_table t;
        if (nm_param_table_build(&t, c, &err) != 0 || nm_param_table_restrict_chunks(&t, c, chunks[s], v, &err) != 0) {
            EXPECT(0, "%s", err.msg);
            continue;
        }
        float *p = nm_aligned_alloc(t.n_floats * sizeof(float));
        nm_params_init(p, &t, c, 99);
        size_t prev_end = 0;
        for (int i = 0; i < t.n_rows; i++) {
            const nm_tensor_spec *r = &t.rows[i];
            int j = nm_param_table_find(full, r->name);
            EXPECT(j >= 0, "%s: %s not in the full table", layout, r->name);
            if (j < 0) continue;
            const nm_tensor_spec *f = &full->rows[j];
            EXPECT(r->numel == f->numel && r->shape[0] == f->shape[0] && r->shape[1] == f->shape[1] && r->flags == f->flags,
                   "%s: %s shape/flags", layout, r->name);
            if (r->flags & NM_TENSOR_TIED) {
                EXPECT(r->offset == t.rows[r->owner].offset && !strcmp(t.rows[r->owner].name, full->rows[f->owner].name),
                       "%s: tied %s owner", layout, r->name);
                continue;
            }
            int copy = t.embed_copy && r->offset == t.embed && r->layer < 0;
            if (!copy) seen[j]++;
            int packed = strstr(r->name, "up_proj") != NULL;
            EXPECT(packed || r->offset % NM_PARAM_ALIGN == 0, "%s: %s misaligned", layout, r->name);
            EXPECT(r->offset >= prev_end && r->offset + (size_t)r->numel <= t.n_floats, "%s: %s overlaps", layout, r->name);
            prev_end = r->offset + (size_t)r->numel;
            EXPECT(memcmp(p + r->offset, ref + f->offset, (size_t)r->numel * sizeof(float)) == 0,
                   "%s: %s initialised differently from one process", layout, r->name);
        }
        for (int64_t l = 0; l < c->n_layers; l++) {
            int held = l >= c->L ? st[s].last : 0;
            for (int64_t k = 0; k < v && l < c->L; k++)
                held |= l >= chunks[s][k].layer_begin && l < chunks[s][k].layer_end;
            char name[128];
            snprintf(name, sizeof(name), "model.layers.%lld.input_layernorm.weight", (long long)l);
            int i = nm_param_table_find(&t, name);
            EXPECT(held ? (i >= 0 && t.layers[l].input_norm == t.rows[i].offset) : (i < 0 && t.layers[l].input_norm == NM_OFF_NONE),
                   "%s stage %lld layer %lld offsets", layout, (long long)s, (long long)l);
        }
        EXPECT((t.embed != NM_OFF_NONE) == (st[s].first || st[s].last), "%s stage %lld embedding", layout, (long long)s);
        EXPECT(t.embed_copy == (st[s].last && !st[s].first), "%s stage %lld embed_copy", layout, (long long)s);
        EXPECT((t.final_norm != NM_OFF_NONE) == st[s].last, "%s stage %lld final norm", layout, (long long)s);
        nm_free(p);
        nm_param_table_free(&t);
    }
    for (int j = 0; j < full->n_rows; j++) {
        if (full->rows[j].flags & NM_TENSOR_TIED) continue;
        EXPECT(seen[j] == 1, "%s: %s held by %d stages", layout, full->rows[j].name, seen[j]);
    }
    nm_free(seen);
    nm_free(ref);
}

// The whole model on micro-batches A then B (grads accumulate), and the stage chain with
// both in flight; compares losses and gradients by name.
static void test_chain(const nm_model_config *c, const nm_param_table *full, const char *layout, int64_t pp,
                       int recompute, uint64_t seed) {
    nm_error err;
    nm_model_stage st[8];
    if (nm_pipeline_layout(st, pp, 1, layout, c, &err) != 0) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    const int64_t B = 2, T = 20, N = B * T;
    int failures_before = failures;
    int32_t tok[2][40];
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, 1, 0);
    for (int i = 0; i < 2 * N; i++) tok[i / N][i % N] = (int32_t)(nm_rng_u64(key, (uint64_t)i) % (uint64_t)c->V);
    nm_loss_options opt = {.mtp_weight = 0.3f, .aux_weight = 0.01f, .grad_scale = 0.5f};
    nm_model_options fo = {.recompute = recompute};
    nm_model *whole;
    if (nm_model_create_ex(&whole, c, test_backend("cpu"), B, T, &fo, &err) != 0) {
        EXPECT(0, "%s", err.msg);
        return;
    }
    nm_params_init(nm_model_params(whole), nm_model_table(whole), c, 5);
    nm_model_zero_grads(whole);
    nm_loss_terms lw[2];
    for (int k = 0; k < 2; k++) {
        EXPECT(nm_model_forward(whole, tok[k], B, T, &opt, &lw[k], NULL, &err) == 0 && nm_model_backward(whole, &err) == 0,
               "whole: %s", err.msg);
    }
    nm_model *m[8];
    for (int64_t s = 0; s < pp; s++) {
        nm_model_options so = {.recompute = recompute, .stage = &st[s], .act_slots = 2};
        if (nm_model_create_ex(&m[s], c, test_backend("cpu"), B, T, &so, &err) != 0) {
            EXPECT(0, "%s", err.msg);
            return;
        }
        nm_params_init(nm_model_params(m[s]), nm_model_table(m[s]), c, 5);
        nm_model_zero_grads(m[s]);
    }
    nm_loss_terms ls[2];
    memset(ls, 0, sizeof(ls));
    for (int k = 0; k < 2; k++) {  // both forwards first: two micro-batches in flight
        double aux = 0.0;
        for (int64_t s = 0; s < pp; s++) {
            nm_loss_terms lt;
            EXPECT(nm_model_set_slot(m[s], k, &err) == 0, "%s", err.msg);
            const float *in = s > 0 ? nm_model_stage_output(m[s - 1]) : NULL;
            EXPECT(nm_model_forward_stage(m[s], tok[k], in, B, T, &opt, &lt, NULL, &err) == 0, "stage %lld: %s", (long long)s, err.msg);
            aux += lt.aux;
            if (s == pp - 1) ls[k] = lt;
        }
        ls[k].aux = aux;
    }
    for (int k = 0; k < 2; k++) {
        for (int64_t s = pp - 1; s >= 0; s--) {
            EXPECT(nm_model_set_slot(m[s], k, &err) == 0, "%s", err.msg);
            const float *d = s < pp - 1 ? nm_model_input_grad(m[s + 1]) : NULL;
            EXPECT(nm_model_backward_stage(m[s], d, &err) == 0, "stage %lld: %s", (long long)s, err.msg);
        }
    }
    for (int k = 0; k < 2; k++) {
        // CE and MTP are computed on the last stage exactly as one process does; the balance
        // loss is a double sum over layers that the stages split (another association: 1e-12).
        EXPECT(ls[k].ce == lw[k].ce && ls[k].mtp == lw[k].mtp && fabs(ls[k].aux - lw[k].aux) <= 1e-12 * fabs(lw[k].aux),
               "%s rc%d micro %d: ce %.17g/%.17g mtp %.17g/%.17g aux %.17g/%.17g", layout, recompute, k, ls[k].ce,
               lw[k].ce, ls[k].mtp, lw[k].mtp, ls[k].aux, lw[k].aux);
    }
    // gradients by name; the embedding as the sum of its holders
    const float *gw = nm_model_grads(whole);
    int64_t VD = c->V * c->D;
    float *emb = nm_calloc((size_t)VD, sizeof(float));
    int n_checked = 0;
    for (int64_t s = 0; s < pp; s++) {
        const nm_param_table *t = nm_model_table(m[s]);
        const float *g = nm_model_grads(m[s]);
        for (int i = 0; i < t->n_rows; i++) {
            const nm_tensor_spec *r = &t->rows[i];
            if (r->flags & NM_TENSOR_TIED) continue;
            const nm_tensor_spec *f = &full->rows[nm_param_table_find(full, r->name)];
            if (r->layer < 0 && r->offset == t->embed) {
                for (int64_t e = 0; e < VD; e++) emb[e] += g[r->offset + (size_t)e];
                continue;
            }
            EXPECT(memcmp(g + r->offset, gw + f->offset, (size_t)r->numel * sizeof(float)) == 0,
                   "%s rc%d: gradient of %s differs from the whole model's", layout, recompute, r->name);
            n_checked++;
        }
    }
    double worst = 0.0, gmax = 0.0;
    const float *ge = gw + full->embed;
    for (int64_t e = 0; e < VD; e++) {
        worst = fmax(worst, fabs((double)emb[e] - (double)ge[e]));
        gmax = fmax(gmax, fabs((double)ge[e]));
    }
    EXPECT(gmax > 0 && worst <= 1e-6 * gmax, "%s rc%d: embedding gradient off by %.3g (max %.3g)", layout, recompute, worst, gmax);
    if (failures == failures_before)
        printf("%s%s: %d tensors' gradients bit-identical, embedding within %.2g of %.2g, CE and MTP identical\n",
               layout ? layout : "even split",
           recompute ? " (recompute)" : "", n_checked, worst, gmax);
    nm_free(emb);
    for (int64_t s = 0; s < pp; s++) nm_model_destroy(m[s]);
    nm_model_destroy(whole);
}

int main(void) {
    nm_model_config cfg;
    nm_param_table full;
    if (test_model_open(&cfg, &full, "test_pp_stage") != 0) return 1;
    uint64_t seed = test_seed("test_pp_stage");
    test_layouts(&cfg);
    test_tables(&cfg, &full, NULL, 3, 1);
    test_tables(&cfg, &full, "Ett|tmmL", 2, 1);
    test_tables(&cfg, &full, "E|ttt|mmL", 3, 1);
    test_tables(&cfg, &full, "Et|t|t|mmL", 2, 2);    // rank 0: layers 0 and 2, rank 1: 1, MTP and loss
    test_tables(&cfg, &full, "E|tt|t|mmL", 2, 2);     // rank 0: the embedding and layer 2, rank 1: 0-1 and the rest
    test_chain(&cfg, &full, "Ett|tmmL", 2, 0, seed);
    test_chain(&cfg, &full, NULL, 3, 0, seed);
    test_chain(&cfg, &full, "E|ttt|mmL", 3, 1, seed);
    test_model_close(&cfg, &full);
    if (failures) {
        fprintf(stderr, "test_pp_stage: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_pp_stage: ok\n");
    return 0;
}
