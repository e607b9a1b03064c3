// params.c: the parameter table (every tensor by its Hugging Face name, dsv3-spec 2) and the
// DeepSeek-V3 initialisation (dsv3-spec 11).
//
// Row order = file order = buffer order:
//   model.embed_tokens.weight
//   per layer 0..L+M-1, prefix model.layers.{i}.:
//     [MTP only] embed_tokens.weight (TIED -> embed), enorm, hnorm, eh_proj
//     input_layernorm, self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj},
//     self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}, post_attention_layernorm,
//     mlp.{gate_proj, up_proj, down_proj}                              (dense layer)
//     mlp.gate.weight, mlp.gate.e_score_correction_bias,
//     mlp.experts.{j}.{gate_proj, up_proj, down_proj}, mlp.shared_experts.{...}   (MoE layer)
//     [MTP only] shared_head.norm, shared_head.head.weight (TIED -> lm_head, or embed when tied)
//   model.norm.weight
//   lm_head.weight (absent with tie_word_embeddings)
//
// Alignment choice: every tensor starts on a multiple of NM_PARAM_ALIGN floats EXCEPT an
// up_proj, which is placed directly after its gate_proj so that [gate; up] is one (2F, D)
// matrix (the fused-GEMM promise of params.h wins). The up_proj offset is therefore aligned
// exactly when F*D (Fe*D, Fs*D) is a multiple of NM_PARAM_ALIGN, which holds whenever D is a
// multiple of 64 (every real and shipped config). Padding floats are zero.
#include "model/params.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/parallel.h"
#include "core/rng.h"

// --- table builder ---------------------------------------------------------------------------

typedef struct builder {
    nm_param_table *t;
    int cap;
    size_t cursor;              // next free float
    int skipped;                // rows of other ranks' experts left out so far (init_key offset)
    int64_t expert_first, expert_count;
    int64_t tp_rank, tp_size;
    int split;                  // tp_dim of the next row (consumed by add_row): -1, 0 or 1
    int64_t extent;             // > 0: the next row's full extent along split (a padded vocabulary)
} builder;

static size_t align_up(size_t x) { return (x + NM_PARAM_ALIGN - 1) / NM_PARAM_ALIGN * NM_PARAM_ALIGN; }

// Appends a row. packed: place it directly at the cursor (the up_proj after its gate);
// otherwise the cursor is first aligned. Returns the offset.
static size_t add_row(builder *b, int layer, unsigned flags, int packed, int ndim, int64_t d0, int64_t d1,
                      const char *fmt, ...) __attribute__((format(printf, 8, 9)));

static size_t add_row(builder *b, int layer, unsigned flags, int packed, int ndim, int64_t d0, int64_t d1,
                      const char *fmt, ...) {
    nm_param_table *t = b->t;
    if (t->n_rows == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 256;
        t->rows = nm_realloc(t->rows, (size_t)b->cap * sizeof(nm_tensor_spec));
    }
    nm_tensor_spec *r = &t->rows[t->n_rows++];
    memset(r, 0, sizeof(*r));
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(r->name, sizeof(r->name), fmt, ap);
    va_end(ap);
    NM_CHECK(n > 0 && (size_t)n < sizeof(r->name), "tensor name too long");
    r->ndim = ndim;
    r->shape[0] = r->full_shape[0] = d0;
    r->shape[1] = r->full_shape[1] = ndim == 2 ? d1 : 0;
    r->tp_dim = b->tp_size > 1 ? b->split : -1;
    b->split = -1;
    if (r->tp_dim >= 0) {
        // divisibility was checked (or the vocabulary padded) by nm_param_table_build_tp
        if (b->extent > 0) r->full_shape[r->tp_dim] = b->extent;
        r->shape[r->tp_dim] /= b->tp_size;
        r->tp_start = b->tp_rank * r->shape[r->tp_dim];
        int64_t left = r->full_shape[r->tp_dim] - r->tp_start;
        r->tp_extent = left < 0 ? 0 : left < r->shape[r->tp_dim] ? left : r->shape[r->tp_dim];
    }
    b->extent = 0;
    r->numel = ndim == 2 ? r->shape[0] * r->shape[1] : r->shape[0];
    r->flags = flags;
    r->layer = layer;
    r->owner = -1;
    r->init_key = t->n_rows - 1 + b->skipped;
    if (flags & NM_TENSOR_TIED) {
        r->offset = 0;  // fixed once the owner exists
        return 0;
    }
    if (!packed) b->cursor = align_up(b->cursor);
    r->offset = b->cursor;
    b->cursor += (size_t)r->numel;
    return r->offset;
}

#define MAT(layer, flags, d0, d1, ...) add_row(b, layer, NM_TENSOR_DECAY | (flags), 0, 2, d0, d1, __VA_ARGS__)
#define VEC(layer, flags, d0, ...) add_row(b, layer, (flags), 0, 1, d0, 0, __VA_ARGS__)
// Tensor-parallel matrices: rows split (column-parallel) or columns split (row-parallel).
#define MAT_COLPAR(layer, flags, d0, d1, ...) (b->split = 0, MAT(layer, flags, d0, d1, __VA_ARGS__))
#define MAT_ROWPAR(layer, flags, d0, d1, ...) (b->split = 1, MAT(layer, flags, d0, d1, __VA_ARGS__))

// One SwiGLU MLP: gate (F, D), up (F, D) right after it, down (D, F). Returns gate's offset.
// tp: gate and up column-parallel, down row-parallel (each rank's [gate; up] shard stays one
// (2F/TP, D) matrix: its gate rows, then its up rows); routed experts are never split.
static size_t add_mlp(builder *b, int layer, unsigned flags, int64_t F, int64_t D, const char *prefix,
                      size_t *down, int tp) {
    b->split = tp ? 0 : -1;
    size_t gate = add_row(b, layer, NM_TENSOR_DECAY | flags, 0, 2, F, D, "%sgate_proj.weight", prefix);
    b->split = tp ? 0 : -1;
    add_row(b, layer, NM_TENSOR_DECAY | flags, 1, 2, F, D, "%sup_proj.weight", prefix);
    b->split = tp ? 1 : -1;
    *down = add_row(b, layer, NM_TENSOR_DECAY | flags, 0, 2, D, F, "%sdown_proj.weight", prefix);
    return gate;
}

static void add_layer(builder *b, const nm_model_config *c, int l, int *tied_embed_row, int *tied_head_row) {
    nm_layer_offsets *o = &b->t->layers[l];
    for (size_t *p = (size_t *)o; p < (size_t *)(o + 1); p++) *p = NM_OFF_NONE;
    o->expert_stride = 0;
    const int mtp = nm_layer_is_mtp(c, l);
    const unsigned m = mtp ? NM_TENSOR_MTP : 0;
    const int64_t D = c->D, H = c->H;
    char pre[64];
    snprintf(pre, sizeof(pre), "model.layers.%d.", l);

    if (mtp) {
        *tied_embed_row = b->t->n_rows;
        b->split = 0, b->extent = c->V;
        add_row(b, l, NM_TENSOR_TIED | m, 0, 2, b->t->vocab_padded, D, "%sembed_tokens.weight", pre);
        o->enorm = VEC(l, NM_TENSOR_NORM | NM_TENSOR_SEQ_PARTIAL | m, D, "%senorm.weight", pre);
        o->hnorm = VEC(l, NM_TENSOR_NORM | NM_TENSOR_SEQ_PARTIAL | m, D, "%shnorm.weight", pre);
        o->eh_proj = MAT(l, NM_TENSOR_SEQ_PARTIAL | m, D, 2 * D, "%seh_proj.weight", pre);
    }
    o->input_norm = VEC(l, NM_TENSOR_NORM | NM_TENSOR_SEQ_PARTIAL | m, D, "%sinput_layernorm.weight", pre);
    if (c->Rq > 0) {
        o->q_a = MAT(l, m, c->Rq, D, "%sself_attn.q_a_proj.weight", pre);
        o->q_a_norm = VEC(l, NM_TENSOR_NORM | m, c->Rq, "%sself_attn.q_a_layernorm.weight", pre);
        o->q_b = MAT_COLPAR(l, m, H * c->Dqk, c->Rq, "%sself_attn.q_b_proj.weight", pre);
    } else {
        o->q = MAT_COLPAR(l, m, H * c->Dqk, D, "%sself_attn.q_proj.weight", pre);
    }
    o->kv_a = MAT(l, m, c->Rkv + c->Dr, D, "%sself_attn.kv_a_proj_with_mqa.weight", pre);
    o->kv_a_norm = VEC(l, NM_TENSOR_NORM | m, c->Rkv, "%sself_attn.kv_a_layernorm.weight", pre);
    o->kv_b = MAT_COLPAR(l, m, H * (c->Dn + c->Dv), c->Rkv, "%sself_attn.kv_b_proj.weight", pre);
    o->o = MAT_ROWPAR(l, m, D, H * c->Dv, "%sself_attn.o_proj.weight", pre);
    o->post_norm = VEC(l, NM_TENSOR_NORM | NM_TENSOR_SEQ_PARTIAL | m, D, "%spost_attention_layernorm.weight", pre);

    char name[96];
    if (!nm_layer_is_moe(c, l)) {
        snprintf(name, sizeof(name), "%smlp.", pre);
        o->mlp_gate_up = add_mlp(b, l, m, c->F, D, name, &o->mlp_down, 1);
    } else {
        o->router = MAT(l, NM_TENSOR_SEQ_PARTIAL | m, c->E, D, "%smlp.gate.weight", pre);
        // Only noaux_tc reads the bias; other methods carry it (HF's native DeepseekV3 always
        // has the buffer) but a checkpoint may lack it (DeepSeek's code never stores it there).
        const unsigned opt = nm_routing_uses_bias(c) ? 0 : NM_TENSOR_OPTIONAL;
        o->router_bias = VEC(l, NM_TENSOR_ROUTER_BIAS | opt | m, c->E, "%smlp.gate.e_score_correction_bias", pre);
        size_t down;
        int64_t e0 = b->expert_first, ne = b->expert_count;
        b->skipped += 3 * (int)e0;  // gate, up, down of each expert held elsewhere
        for (int64_t j = 0; j < ne; j++) {
            snprintf(name, sizeof(name), "%smlp.experts.%lld.", pre, (long long)(e0 + j));
            size_t gate = add_mlp(b, l, NM_TENSOR_EXPERT | m, c->Fe, D, name, &down, 0);
            if (j == 0) o->experts = gate;
            if (j == 1) o->expert_stride = gate - o->experts;
            // Every expert has the same padded size, so the stride is uniform.
            NM_CHECK(j < 2 || gate == o->experts + (size_t)j * o->expert_stride, "expert stride");
        }
        b->skipped += 3 * (int)(c->E - e0 - ne);
        if (ne == 1) o->expert_stride = align_up(b->cursor) - o->experts;
        if (c->n_shared > 0) {
            snprintf(name, sizeof(name), "%smlp.shared_experts.", pre);
            o->shared_gate_up = add_mlp(b, l, m, c->Fs, D, name, &o->shared_down, 1);
        }
    }
    if (mtp) {
        o->head_norm = VEC(l, NM_TENSOR_NORM | NM_TENSOR_SEQ_PARTIAL | m, D, "%sshared_head.norm.weight", pre);
        *tied_head_row = b->t->n_rows;
        b->split = 0, b->extent = c->V;
        add_row(b, l, NM_TENSOR_TIED | m, 0, 2, b->t->vocab_padded, D, "%sshared_head.head.weight", pre);
    }
}

int nm_param_table_build(nm_param_table *t, const nm_model_config *cfg, nm_error *err) {
    return nm_param_table_build_ep(t, cfg, 0, 1, err);
}

int nm_param_table_build_ep(nm_param_table *t, const nm_model_config *cfg, int64_t ep_rank, int64_t ep_size,
                            nm_error *err) {
    return nm_param_table_build_tp(t, cfg, ep_rank, ep_size, 0, 1, 1, err);
}

int nm_param_table_build_tp(nm_param_table *t, const nm_model_config *cfg, int64_t ep_rank, int64_t ep_size,
                            int64_t tp_rank, int64_t tp_size, int64_t vocab_multiple, nm_error *err) {
    memset(t, 0, sizeof(*t));
    if (vocab_multiple < 1)
        return nm_error_set(err, "make_vocab_size_divisible_by %lld: must be >= 1", (long long)vocab_multiple);
    // Megatron's padding: up to a multiple of make_vocab_size_divisible_by x TP (at TP 1 the
    // vocabulary stays as it is: nothing to divide).
    int64_t multiple = tp_size > 1 ? vocab_multiple * tp_size : 1;
    t->vocab_padded = (cfg->V + multiple - 1) / multiple * multiple;
    if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size)
        return nm_error_set(err, "tensor parallelism: rank %lld of %lld", (long long)tp_rank, (long long)tp_size);
    if (tp_size > 1) {
        // What the split needs, by config key (Megatron refuses the same).
        const char *src = cfg->source_path ? cfg->source_path : "model config";
        int has_dense = 0, has_moe = 0;
        for (int64_t l = 0; l < cfg->n_layers; l++) {
            if (nm_layer_is_moe(cfg, l)) has_moe = 1;
            else has_dense = 1;
        }
        if (cfg->H % tp_size != 0)
            return nm_error_set(err, "%s: num_attention_heads %lld is not divisible by tensor_parallel_size %lld",
                                src, (long long)cfg->H, (long long)tp_size);
        if (has_dense && cfg->F % tp_size != 0)
            return nm_error_set(err,
                                "%s: intermediate_size %lld (dense MLP) is not divisible by tensor_parallel_size %lld",
                                src, (long long)cfg->F, (long long)tp_size);
        if (has_moe && cfg->Fs > 0 && cfg->Fs % tp_size != 0)
            return nm_error_set(err,
                                "%s: n_shared_experts %lld x moe_intermediate_size %lld = %lld (shared experts) is "
                                "not divisible by tensor_parallel_size %lld",
                                src, (long long)cfg->n_shared, (long long)cfg->Fe, (long long)cfg->Fs,
                                (long long)tp_size);
    }
    if (ep_size < 1 || ep_rank < 0 || ep_rank >= ep_size || (cfg->E > 0 && cfg->E % ep_size != 0))
        return nm_error_set(err, "expert parallelism: rank %lld of %lld cannot hold an equal share of %lld experts",
                            (long long)ep_rank, (long long)ep_size, (long long)cfg->E);
    if (cfg->n_layers != cfg->L + cfg->M || cfg->Dqk != cfg->Dn + cfg->Dr || cfg->D < 1) {
        return nm_error_set(err, "%s: model config was not loaded through nm_model_config_load",
                            cfg->source_path ? cfg->source_path : "<config>");
    }
    if (cfg->n_layers > 100000)
        return nm_error_set(err, "%s: too many layers (%lld)", cfg->source_path, (long long)cfg->n_layers);
    int64_t E_local = cfg->E / ep_size;
    builder bb = {.t = t, .cap = 0, .cursor = 0, .expert_first = ep_rank * E_local, .expert_count = E_local,
                  .tp_rank = tp_rank, .tp_size = tp_size, .split = -1}, *b = &bb;
    t->tp_rank = tp_rank;
    t->tp_size = tp_size;
    t->expert_first = bb.expert_first;
    t->expert_count = E_local;
    t->layers = nm_calloc((size_t)cfg->n_layers, sizeof(nm_layer_offsets));
    int64_t L = cfg->L, n = cfg->n_layers;

    bb.extent = cfg->V;
    t->embed = MAT_COLPAR(-1, 0, t->vocab_padded, cfg->D, "model.embed_tokens.weight");
    int *tied_embed = nm_malloc((size_t)(cfg->M + 1) * sizeof(int));
    int *tied_head = nm_malloc((size_t)(cfg->M + 1) * sizeof(int));
    for (int64_t l = 0; l < n; l++) {
        int te = -1, th = -1;
        add_layer(b, cfg, (int)l, &te, &th);
        if (l >= L) { tied_embed[l - L] = te; tied_head[l - L] = th; }
    }
    t->final_norm = VEC(-1, NM_TENSOR_NORM | NM_TENSOR_SEQ_PARTIAL, cfg->D, "model.norm.weight");
    int head_row = 0;  // row 0 is the embedding
    if (!cfg->tie_embeddings) {
        head_row = t->n_rows;
        bb.extent = cfg->V;
        t->lm_head = MAT_COLPAR(-1, 0, t->vocab_padded, cfg->D, "lm_head.weight");
    } else {
        t->lm_head = t->embed;
    }
    for (int64_t k = 0; k < cfg->M; k++) {
        t->rows[tied_embed[k]].owner = 0;
        t->rows[tied_embed[k]].offset = t->embed;
        t->rows[tied_head[k]].owner = head_row;
        t->rows[tied_head[k]].offset = t->lm_head;
    }
    nm_free(tied_embed);
    nm_free(tied_head);
    t->n_floats = align_up(b->cursor);

    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        if (r->flags & NM_TENSOR_MTP) t->n_params_mtp += r->numel;
        else t->n_params_main += r->numel;
    }
    return 0;
}

void nm_param_table_free(nm_param_table *t) {
    if (!t) return;
    nm_free(t->rows);
    nm_free(t->layers);
    memset(t, 0, sizeof(*t));
}

// Rows of one layer are contiguous and layers ascend, with the three global rows at the ends
// (embed first; final norm and lm_head last). A V3 table has ~91k rows and a loader looks up
// every one of them, so search the layer's range instead of the whole table.
int nm_param_row_reads_copy(const nm_param_table *t, int i) {
    const nm_tensor_spec *r = &t->rows[i];
    if (r->flags & (NM_TENSOR_NORM | NM_TENSOR_ROUTER_BIAS | NM_TENSOR_TIED)) return 0;
    if (r->offset == t->embed) return 0;
    if (r->layer >= 0 && t->layers[r->layer].router == r->offset) return 0;
    return 1;
}

int nm_param_table_find(const nm_param_table *t, const char *name) {
    static const char prefix[] = "model.layers.";
    if (strncmp(name, prefix, sizeof(prefix) - 1) != 0) {
        for (int i = 0; i < t->n_rows; i++) {
            if (t->rows[i].layer < 0 && strcmp(t->rows[i].name, name) == 0) return i;
        }
        return -1;
    }
    char *end;
    long layer = strtol(name + sizeof(prefix) - 1, &end, 10);
    if (end == name + sizeof(prefix) - 1 || *end != '.') return -1;
    // first row with rows[i].layer >= layer among the rows whose layer >= 0 (all but the
    // embedding at row 0, when the table holds it, and the global rows at the end)
    int lo = t->n_rows > 0 && t->rows[0].layer < 0 ? 1 : 0, hi = t->n_rows;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int ml = t->rows[mid].layer < 0 ? 1 << 30 : t->rows[mid].layer;
        if (ml < layer) lo = mid + 1;
        else hi = mid;
    }
    for (int i = lo; i < t->n_rows && t->rows[i].layer == layer; i++) {
        if (strcmp(t->rows[i].name, name) == 0) return i;
    }
    return -1;
}

// --- initialisation --------------------------------------------------------------------------

// One matrix's N(0, std) elements: element i of the stored rows draws the counter of its place
// in the full tensor (full_cols columns; the shard starts at row row0, column col0); rows past
// rows_real (vocabulary padding) are zero.
typedef struct init_rows {
    float *p;
    uint64_t key;
    float std;
    int64_t cols, full_cols, row0, col0, rows_real;
} init_rows;

static void init_normal(void *ctx, int64_t begin, int64_t end) {
    const init_rows *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        int64_t full = (i / r->cols + r->row0) * r->full_cols + i % r->cols + r->col0;
        r->p[i] = i / r->cols < r->rows_real ? r->std * nm_rng_normal(r->key, (uint64_t)full) : 0.0f;
    }
}

void nm_params_init(float *params /* (n_floats) */, const nm_param_table *t, const nm_model_config *cfg,
                    uint64_t seed) {
    const float std = (float)cfg->init_std;
    size_t prev_end = 0;  // zero the alignment gaps too, so the buffer is fully defined
    for (int r = 0; r < t->n_rows; r++) {
        const nm_tensor_spec *row = &t->rows[r];
        if (row->flags & NM_TENSOR_TIED) continue;
        float *p = params + row->offset;
        const int64_t n = row->numel;
        if (row->offset > prev_end) memset(params + prev_end, 0, (row->offset - prev_end) * sizeof(float));
        if (row->flags & NM_TENSOR_NORM) {
            for (int64_t i = 0; i < n; i++) p[i] = 1.0f;
        } else if (row->flags & NM_TENSOR_ROUTER_BIAS) {
            memset(p, 0, (size_t)n * sizeof(float));
        } else {
            // Element i of row r is a pure function of (seed, r, i): any thread count gives
            // the same buffer.
            // A tensor-parallel shard draws the elements of its place in the full tensor, so every
            // layout initialises the one-process weights.
            const uint64_t key = nm_rng_key(seed, NM_RNG_INIT, (uint64_t)row->init_key, 0);
            const int64_t cols = row->ndim == 2 ? row->shape[1] : 1,
                          full_cols = row->ndim == 2 ? row->full_shape[1] : 1;
            const int64_t row0 = row->tp_dim == 0 ? row->tp_start : 0, col0 = row->tp_dim == 1 ? row->tp_start : 0;
            const int64_t rows_real = row->tp_dim == 0 ? row->tp_extent : n / cols;  // the rest: vocabulary padding
            init_rows ir = {p, key, std, cols, full_cols, row0, col0, rows_real};
            nm_parallel_for(n, 65536, 0, init_normal, &ir);
        }
        prev_end = row->offset + (size_t)n;
    }
    if (t->n_floats > prev_end) memset(params + prev_end, 0, (t->n_floats - prev_end) * sizeof(float));
}
