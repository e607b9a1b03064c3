// params_stage.c: the parameter table of one pipeline stage (params.h,
// nm_param_table_restrict_stage): the one-process table with the rows of other stages
// dropped and the buffer re-packed.
//
// Why re-packing keeps every layout promise: what is dropped is always whole layers or whole
// global tensors, and each of those starts on an NM_PARAM_ALIGN boundary (a layer's first
// stored row is a norm vector, placed aligned; the packed up_proj never begins a layer). So a
// dropped run spans [aligned start, next kept row's aligned start), every kept row moves
// down by a multiple of NM_PARAM_ALIGN, and offsets inside a kept layer (gate/up packing,
// expert stride) are unchanged relative to each other.
#include <string.h>

#include "model/params.h"

// Held by the chunks s[0..n): first is the first chunk's, last the last one's.
static int row_kept(const nm_param_table *t, const nm_model_config *c, const nm_model_stage *s, int64_t n,
                    int need_embed, const nm_tensor_spec *r) {
    int last = s[n - 1].last;
    if (r->layer >= 0) {
        if (r->layer >= c->L) return last;  // MTP layers live with the losses
        for (int64_t k = 0; k < n; k++)
            if (r->layer >= s[k].layer_begin && r->layer < s[k].layer_end) return 1;
        return 0;
    }
    if (!(r->flags & NM_TENSOR_TIED) && r->offset == t->embed) return need_embed;
    return last;  // model.norm.weight, lm_head.weight
}

int nm_param_table_restrict_stage(nm_param_table *t, const nm_model_config *c, const nm_model_stage *s,
                                  nm_error *err) {
    return nm_param_table_restrict_chunks(t, c, s, 1, err);
}

int nm_param_table_restrict_chunks(nm_param_table *t, const nm_model_config *c, const nm_model_stage *chunks,
                                   int64_t n_chunks, nm_error *err) {
    for (int64_t k = 0; k < n_chunks; k++) {
        const nm_model_stage *s = &chunks[k];
        if (s->layer_begin < 0 || s->layer_end < s->layer_begin || s->layer_end > c->L ||
            (k > 0 && s->layer_begin < chunks[k - 1].layer_end))
            return nm_error_set(err, "pipeline stage: layers [%lld, %lld) outside the model's %lld decoder layers "
                                     "or before the previous chunk's",
                                (long long)s->layer_begin, (long long)s->layer_end, (long long)c->L);
    }
    // Only what the table needs below: whether the rank is first (embedding) and last (head).
    const nm_model_stage held = {.first = chunks[0].first, .last = chunks[n_chunks - 1].last}, *s = &held;
    // The last stage reads the embedding for MTP's shifted tokens, and as the head when tied.
    int last_needs_embed = c->M > 0 || c->tie_embeddings;
    int need_embed = s->first || (s->last && last_needs_embed);
    int n = t->n_rows;
    int *map = nm_malloc((size_t)n * sizeof(int));
    size_t *shift_at = nm_malloc((size_t)n * sizeof(size_t));
    // Each stored row's piece runs to the next stored row's start (its padding goes with it).
    size_t removed = 0;
    int kept = 0;
    for (int i = 0; i < n; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        int keep = row_kept(t, c, chunks, n_chunks, need_embed, r);
        map[i] = keep ? kept++ : -1;
        shift_at[i] = removed;
        if (keep || (r->flags & NM_TENSOR_TIED)) continue;
        size_t next = t->n_floats;
        for (int j = i + 1; j < n; j++) {
            if (!(t->rows[j].flags & NM_TENSOR_TIED)) {
                next = t->rows[j].offset;
                break;
            }
        }
        removed += next - r->offset;
    }
    NM_CHECK(removed % NM_PARAM_ALIGN == 0, "stage re-packing moved rows by %zu floats", removed);
    // Global offsets first (they are read below through the old rows).
    size_t embed = t->embed, final_norm = t->final_norm, lm_head = t->lm_head;
    int embed_row = -1, head_row = -1, norm_row = -1;
    for (int i = 0; i < n; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->layer >= 0 || (r->flags & NM_TENSOR_TIED)) continue;
        if (r->offset == embed) embed_row = i;
        else if (r->offset == final_norm) norm_row = i;
        else if (r->offset == lm_head) head_row = i;
    }
    t->embed = embed_row >= 0 && map[embed_row] >= 0 ? embed - shift_at[embed_row] : NM_OFF_NONE;
    t->final_norm = norm_row >= 0 && map[norm_row] >= 0 ? final_norm - shift_at[norm_row] : NM_OFF_NONE;
    if (c->tie_embeddings) t->lm_head = s->last ? t->embed : NM_OFF_NONE;
    else t->lm_head = head_row >= 0 && map[head_row] >= 0 ? lm_head - shift_at[head_row] : NM_OFF_NONE;
    t->embed_copy = s->last && !s->first && last_needs_embed;

    // Per-layer offsets: a kept layer moves by the shift at its first row; others are absent.
    for (int64_t l = 0; l < c->n_layers; l++) {
        nm_layer_offsets *o = &t->layers[l];
        int first_row = -1;
        for (int i = 0; i < n && first_row < 0; i++) {
            if (t->rows[i].layer == l && !(t->rows[i].flags & NM_TENSOR_TIED)) first_row = i;
        }
        int keep = first_row >= 0 && map[first_row] >= 0;
        size_t stride = o->expert_stride;
        for (size_t *p = (size_t *)o; p < (size_t *)(o + 1); p++) {
            if (p == &o->expert_stride) continue;
            if (!keep) *p = NM_OFF_NONE;
            else if (*p != NM_OFF_NONE) *p -= shift_at[first_row];
        }
        o->expert_stride = keep ? stride : 0;
    }

    // Rows, compacted in order; tied rows follow their owner.
    int w = 0;
    for (int i = 0; i < n; i++) {
        if (map[i] < 0) continue;
        nm_tensor_spec r = t->rows[i];
        if (r.flags & NM_TENSOR_TIED) {
            int owner = r.owner >= 0 ? map[r.owner] : -1;
            if (owner < 0) {
                nm_free(map);
                nm_free(shift_at);
                return nm_error_set(err, "pipeline stage: %s is tied to a tensor the stage does not hold", r.name);
            }
            r.owner = owner;
        } else {
            r.offset -= shift_at[i];
            NM_CHECK(r.offset % NM_PARAM_ALIGN == t->rows[i].offset % NM_PARAM_ALIGN, "stage re-packing of %s", r.name);
        }
        t->rows[w++] = r;
    }
    t->n_rows = w;
    for (int i = 0; i < w; i++) {
        if (t->rows[i].flags & NM_TENSOR_TIED) t->rows[i].offset = t->rows[t->rows[i].owner].offset;
    }
    t->n_floats -= removed;
    t->n_params_main = t->n_params_mtp = 0;
    for (int i = 0; i < w; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        if (r->flags & NM_TENSOR_MTP) t->n_params_mtp += r->numel;
        else t->n_params_main += r->numel;
    }
    nm_free(map);
    nm_free(shift_at);
    return 0;
}
