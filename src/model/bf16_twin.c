// bf16_twin.c: bf16 activations rounded once where they are produced, and stored once in bf16
// for a bf16 GEMM that reads bf16 storage (model_state.h, nm_round_act).
//
// An activation that only bf16 GEMMs read is rounded in place (fp32 storage holding bf16
// values, NM_F32_BF16). The "widen" kernel multiplies such storage as it is; oneDNN's bf16
// matmul needs bf16 storage, so it used to cast every NM_F32_BF16 operand into scratch on every
// call: the same tensor two or three times per step (forward, weight gradient, recompute), 2.0
// of the 2.4 G elements it cast in two small-config bf16 steps. Here the rounding also writes
// a bf16 copy (the twin), and the GEMM callers swap an NM_F32_BF16 operand for its twin when
// one covers it: read with nm_bf16_operand, written with nm_round_act.
//
// Twins are found by address: an operand is any slice of a rounded tensor (an expert's rows, a
// vocabulary tile), so a twin covers the tensor's range and a slice maps to the same element
// offset in it. Rounding a range drops every other twin it overlaps (their bytes changed);
// storage is kept per start address and grows only, so a training loop allocates in its first
// step only. A tensor rewritten without nm_round_act and then read as NM_F32_BF16 would be a
// bug before twins too (its values would not be bf16); debug builds check every swapped operand
// against its fp32 storage.
#include "model/model_state.h"

#include <string.h>

typedef struct nm_bf16_twin {
    const float *base;          // the rounded fp32 tensor's first element
    int64_t n;                  // elements covered; 0: a dropped twin, storage free for reuse
    uint16_t *bits;             // (cap) the bf16 copy
    int64_t cap;
} nm_bf16_twin;

struct nm_bf16_twins {
    const nm_ops *ops;          // whose memory the bf16 copies are
    nm_bf16_twin *items;
    int count, cap;
    int64_t bytes;              // storage held, for the memory report
};

nm_bf16_twins *nm_bf16_twins_create(const nm_ops *ops) {
    nm_bf16_twins *t = nm_calloc(1, sizeof(nm_bf16_twins));
    t->ops = ops;
    return t;
}

void nm_bf16_twins_destroy(nm_bf16_twins *t) {
    if (!t) return;
    for (int i = 0; i < t->count; i++) t->ops->free(t->items[i].bits);
    nm_free(t->items);
    nm_free(t);
}

int64_t nm_bf16_twins_bytes(const nm_bf16_twins *t) { return t ? t->bytes : 0; }

// Twins only pay where the bf16 GEMM reads bf16 storage (its weight copy is bf16, as
// gemm_bf16_weight_type says); widen reads the rounded fp32 storage directly.
static int twins_in_use(const nm_model *m) {
    return m->precision == NM_PRECISION_BF16 && m->bf16.twins && m->bf16.weights && m->bf16.weights_type == NM_BF16;
}

static int overlaps(const nm_bf16_twin *w, const float *x, int64_t n) {
    return w->n > 0 && x < w->base + w->n && w->base < x + n;
}

// The twin slot for a tensor starting at x: its own, else a dropped one large enough, else new.
static nm_bf16_twin *twin_slot(nm_bf16_twins *t, const float *x, int64_t n) {
    nm_bf16_twin *spare = NULL;
    for (int i = 0; i < t->count; i++) {
        nm_bf16_twin *w = &t->items[i];
        if (w->base == x) return w;
        if (w->n == 0 && w->cap >= n && (!spare || w->cap < spare->cap)) spare = w;
    }
    if (spare) return spare;
    if (t->count == t->cap) {
        int cap = t->cap ? 2 * t->cap : 32;
        nm_bf16_twin *items = nm_calloc((size_t)cap, sizeof(nm_bf16_twin));
        if (t->count) memcpy(items, t->items, (size_t)t->count * sizeof(nm_bf16_twin));
        nm_free(t->items);
        t->items = items;
        t->cap = cap;
    }
    nm_bf16_twin *w = &t->items[t->count++];
    *w = (nm_bf16_twin){0};
    return w;
}

// The twin of x(n) about to be rewritten with bf16 values: every other twin it overlaps is
// dropped (their bytes change), its own storage grown if needed.
static uint16_t *claim_twin(nm_bf16_twins *t, const float *x, int64_t n) {
    for (int i = 0; i < t->count; i++) {
        if (t->items[i].base != x && overlaps(&t->items[i], x, n)) t->items[i].n = 0;
    }
    nm_bf16_twin *w = twin_slot(t, x, n);
    if (w->cap < n) {
        t->bytes -= w->cap * (int64_t)sizeof(uint16_t);
        t->ops->free(w->bits);
        w->bits = t->ops->alloc((size_t)n * sizeof(uint16_t));
        w->cap = n;
        t->bytes += n * (int64_t)sizeof(uint16_t);
    }
    w->base = x;
    w->n = n;
    return w->bits;
}

void nm_round_act(const nm_model *m, float *x, int64_t n) {
    if (m->precision != NM_PRECISION_BF16 || n <= 0) return;
    if (!twins_in_use(m)) {
        m->ops->round_bf16(x, x, n);
        return;
    }
    m->ops->round_cast_bf16(x, claim_twin(m->bf16.twins, x, n), n);
}

void nm_swiglu_forward(const nm_model *m, float *act, const float *gate_up, int64_t N, int64_t F) {
    if (m->precision != NM_PRECISION_BF16) {
        m->ops->swiglu_forward(act, gate_up, N, F);
        return;
    }
    uint16_t *bits = twins_in_use(m) && N * F > 0 ? claim_twin(m->bf16.twins, act, N * F) : NULL;
    m->ops->swiglu_forward_bf16(act, bits, gate_up, N, F);
}

void nm_swiglu_backward(const nm_model *m, float *d_gate_up, const float *d_act, const float *gate_up, int64_t N,
                        int64_t F) {
    if (m->precision != NM_PRECISION_BF16) {
        m->ops->swiglu_backward(d_gate_up, d_act, gate_up, N, F);
        return;
    }
    uint16_t *bits = twins_in_use(m) && N * F > 0 ? claim_twin(m->bf16.twins, d_gate_up, N * 2 * F) : NULL;
    m->ops->swiglu_backward_bf16(d_gate_up, bits, d_act, gate_up, N, F);
}

void nm_moe_gather(const nm_model *m, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                   int64_t D) {
    if (m->precision != NM_PRECISION_BF16) {
        m->ops->moe_gather(dst, src, perm, N, K, D);
        return;
    }
    uint16_t *bits = twins_in_use(m) && N * K * D > 0 ? claim_twin(m->bf16.twins, dst, N * K * D) : NULL;
    m->ops->moe_gather_bf16(dst, bits, src, perm, N, K, D);
}

// Debug builds: the twin holds exactly the bf16 values of the fp32 storage it stands for.
static void check_twin(const float *x, const uint16_t *bits, int64_t rows, int64_t cols, int64_t ld) {
#ifndef NDEBUG
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            uint32_t u;
            memcpy(&u, x + r * ld + c, sizeof u);
            NM_CHECK(u == (uint32_t)bits[r * ld + c] << 16,
                     "bf16 twin is stale at row %lld col %lld: fp32 storage 0x%08x, twin 0x%04x (an activation "
                     "rewritten after nm_round_act and read as NM_F32_BF16)",
                     (long long)r, (long long)c, (unsigned)u, (unsigned)bits[r * ld + c]);
        }
    }
#else
    (void)x, (void)bits, (void)rows, (void)cols, (void)ld;
#endif
}

const void *nm_bf16_operand(const nm_model *m, const float *x, nm_dtype *type, int64_t rows, int64_t cols,
                            int64_t ld) {
    if (*type != NM_F32_BF16 || rows <= 0 || cols <= 0 || !twins_in_use(m)) return x;
    const nm_bf16_twins *t = m->bf16.twins;
    int64_t span = (rows - 1) * ld + cols;
    for (int i = 0; i < t->count; i++) {
        const nm_bf16_twin *w = &t->items[i];
        if (w->n == 0 || x < w->base || x + span > w->base + w->n) continue;
        const uint16_t *bits = w->bits + (x - w->base);
        check_twin(x, bits, rows, cols, ld);
        *type = NM_BF16;
        return bits;
    }
    return x;  // not rounded through nm_round_act (e.g. received from another rank): gemm_bf16 casts it
}

// Every group's operand swapped for its twin, or none (the groups share one operand type).
static void swap_all(const nm_model *m, nm_gemm_group *groups, int64_t n, int which, nm_transpose t,
                     nm_dtype *type) {
    if (*type != NM_F32_BF16 || !twins_in_use(m)) return;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t i = 0; i < n; i++) {
            nm_gemm_group *g = &groups[i];
            if (g->M == 0 || g->N == 0 || g->K == 0) continue;
            // row-major op(A) (M,K) is stored (M,K) or (K,M); op(B) (K,N) as (K,N) or (N,K)
            int64_t rows = which == 0 ? (t == NM_NO_TRANS ? g->M : g->K) : (t == NM_NO_TRANS ? g->K : g->N);
            int64_t cols = which == 0 ? (t == NM_NO_TRANS ? g->K : g->M) : (t == NM_NO_TRANS ? g->N : g->K);
            const void **p = which == 0 ? &g->A : &g->B;
            nm_dtype ty = NM_F32_BF16;
            const void *q = nm_bf16_operand(m, *p, &ty, rows, cols, which == 0 ? g->lda : g->ldb);
            if (ty != NM_BF16) return;  // pass 0 found one without a twin: leave them all as they are
            if (pass == 1) *p = q;
        }
    }
    *type = NM_BF16;
}

void nm_bf16_operand_groups(const nm_model *m, nm_gemm_group *groups, int64_t n, nm_transpose ta, nm_transpose tb,
                            nm_dtype *a_type, nm_dtype *b_type) {
    swap_all(m, groups, n, 0, ta, a_type);
    swap_all(m, groups, n, 1, tb, b_type);
}
