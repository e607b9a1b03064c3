// pipeline_layout.c: the pipeline's stages and schedules as pure functions (see pipeline.h):
// the layout string parsed into stages (Megatron-Core's form), the virtual stages per rank, a
// rank's chunks, and the order of a rank's forwards and backwards (1F1B, interleaved) with the
// activation sets it needs. No model or communicator: the trainer, the planner, the schedule
// test and the layout's fuzz target share them. pipeline.c runs the schedule.
#include "train/pipeline.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KEY "pipeline_model_parallel_layout"

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

// "pipeline_parallel_size 4", or "pipeline_parallel_size x virtual_pipeline_model_parallel_size
// 4 x 2 = 8", for messages.
static const char *stages_phrase(char *buf, size_t cap, int64_t pp, int64_t v) {
    if (v > 1)
        snprintf(buf, cap, "pipeline_parallel_size x virtual_pipeline_model_parallel_size %lld x %lld = %lld",
                 (long long)pp, (long long)v, (long long)(pp * v));
    else snprintf(buf, cap, "pipeline_parallel_size %lld", (long long)pp);
    return buf;
}

int nm_pipeline_layout(nm_model_stage *stages, int64_t pp_ranks, int64_t v, const char *layout,
                       const nm_model_config *cfg, nm_error *err) {
    const int64_t L = cfg->L, M = cfg->M, pp = pp_ranks * v;  // pp: stages from here on
    char phrase[160];
    stages_phrase(phrase, sizeof phrase, pp_ranks, v);
    if (!layout || !*layout) {
        if (L % pp != 0 || L < pp) {
            char fix[64 + 16 * 1024] = "";
            suggest_layout(fix, sizeof fix, L, M, pp);
            return nm_error_set(err, "%s does not divide the %lld decoder layers "
                                     "(num_hidden_layers): set " KEY " (plan: --pipeline-layout) to place them%s%s",
                                phrase, (long long)L, fix[0] ? ", for example " : "", fix);
        }
        for (int64_t s = 0; s < pp; s++)
            stages[s] = (nm_model_stage){s * (L / pp), (s + 1) * (L / pp), s == 0, s == pp - 1};
        return 0;
    }
    char why[256];
    int64_t n_stages = 1;
    for (const char *p = layout; *p; p++) n_stages += *p == '|';
    if (n_stages != pp) {
        if (v > 1)
            snprintf(why, sizeof(why), "has %lld stages, pipeline_parallel_size x virtual_pipeline_model_parallel_size "
                     "is %lld x %lld = %lld", (long long)n_stages, (long long)pp_ranks, (long long)v, (long long)pp);
        else
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

static int64_t count_stages(const char *layout) {
    int64_t n = 1;
    for (const char *p = layout; *p; p++) n += *p == '|';
    return n;
}

int nm_pipeline_virtual_size(int64_t pp, int64_t vpp, const char *layout, int64_t *v, nm_error *err) {
    const int64_t n_layout = layout && *layout ? count_stages(layout) : 0;
    if (vpp < 0 || vpp > NM_MAX_MODEL_CHUNKS)
        return nm_error_set(err, "virtual_pipeline_model_parallel_size %lld: must be 1 .. %d (0 or unset: from " KEY
                                 ", else 1)", (long long)vpp, NM_MAX_MODEL_CHUNKS);
    if (vpp >= 1) {
        if (n_layout && n_layout != pp * vpp)
            return nm_error_set(err, KEY " \"%s\" has %lld stages, pipeline_parallel_size x "
                                     "virtual_pipeline_model_parallel_size is %lld x %lld = %lld",
                                layout, (long long)n_layout, (long long)pp, (long long)vpp, (long long)(pp * vpp));
        *v = vpp;
    } else if (n_layout) {
        // Megatron-Core reads a layout with more stages than ranks as virtual stages.
        if (n_layout % pp != 0)
            return nm_error_set(err, KEY " \"%s\" has %lld stages, not a multiple of pipeline_parallel_size %lld",
                                layout, (long long)n_layout, (long long)pp);
        *v = n_layout / pp;
    } else {
        *v = 1;
    }
    if (*v > NM_MAX_MODEL_CHUNKS)
        return nm_error_set(err, KEY " \"%s\": %lld virtual stages per rank, at most %d", layout, (long long)*v,
                            NM_MAX_MODEL_CHUNKS);
    if (*v > 1 && pp < 2)
        return nm_error_set(err, "virtual_pipeline_model_parallel_size %lld needs pipeline_parallel_size >= 2 "
                                 "(it is %lld)", (long long)*v, (long long)pp);
    return 0;
}

void nm_pipeline_rank_chunks(const nm_model_stage *stages, int64_t pp, int64_t v, int64_t rank, nm_model_stage *out) {
    for (int64_t c = 0; c < v; c++) out[c] = stages[c * pp + rank];
}

int nm_pipeline_check_micro_batches(int64_t pp, int64_t v, int64_t m, nm_error *err) {
    if (v > 1 && (m < pp || m % pp != 0))
        return nm_error_set(err, "the interleaved pipeline schedule (virtual_pipeline_model_parallel_size %lld) runs "
                                 "micro-batches in groups of pipeline_parallel_size %lld: global_batch / (micro_batch x "
                                 "data-parallel size) = %lld micro-batches per step must be a multiple of it",
                            (long long)v, (long long)pp, (long long)m);
    return 0;
}

// Virtual micro-batch k of the interleaved schedule (Megatron-Core's get_model_chunk_id and
// its micro-batch id): groups of pp micro-batches, each through chunk 0 .. v-1 in turn (the
// backward from chunk v-1 down).
static nm_pipeline_action virtual_micro(int64_t k, int64_t pp, int64_t v, int backward) {
    int64_t in_group = k % (pp * v), chunk = in_group / pp;
    return (nm_pipeline_action){.backward = backward, .chunk = backward ? v - 1 - chunk : chunk,
                                .micro = k / (pp * v) * pp + in_group % pp};
}

void nm_pipeline_schedule(nm_pipeline_action *out, int64_t pp, int64_t v, int64_t rank, int64_t m) {
    int64_t n = 0;
    if (v <= 1) {  // 1F1B
        int64_t warm = pp - rank - 1 < m ? pp - rank - 1 : m;
        for (int64_t i = 0; i < warm; i++) out[n++] = (nm_pipeline_action){0, 0, i};
        for (int64_t j = 0; j < m - warm; j++) {
            out[n++] = (nm_pipeline_action){0, 0, warm + j};
            out[n++] = (nm_pipeline_action){1, 0, j};
        }
        for (int64_t j = m - warm; j < m; j++) out[n++] = (nm_pipeline_action){1, 0, j};
        return;
    }
    const int64_t total = v * m;
    int64_t warm = m == pp ? total : (pp - rank - 1) * 2 + (v - 1) * pp;
    if (warm > total) warm = total;
    for (int64_t k = 0; k < warm; k++) out[n++] = virtual_micro(k, pp, v, 0);
    for (int64_t k = 0; k < total - warm; k++) {
        out[n++] = virtual_micro(warm + k, pp, v, 0);
        out[n++] = virtual_micro(k, pp, v, 1);
    }
    for (int64_t k = total - warm; k < total; k++) out[n++] = virtual_micro(k, pp, v, 1);
}

int64_t nm_pipeline_slots(int64_t pp, int64_t v, int64_t rank, int64_t m) {
    if (v < 1) v = 1;
    nm_pipeline_action *a = nm_malloc((size_t)(2 * v * m) * sizeof(*a));
    int64_t *live = nm_calloc((size_t)v, sizeof(int64_t)), most = 1;
    nm_pipeline_schedule(a, pp, v, rank, m);
    for (int64_t i = 0; i < 2 * v * m; i++) {
        live[a[i].chunk] += a[i].backward ? -1 : 1;
        if (live[a[i].chunk] > most) most = live[a[i].chunk];
    }
    nm_free(live);
    nm_free(a);
    return most;
}

