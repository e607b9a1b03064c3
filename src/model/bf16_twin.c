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
// Which tensors have twins is decided once, when the model lays out its arena: every tensor
// that only bf16 GEMMs read is taken with take_operand (model_state.c), which registers it
// here with its place in one bf16 pool. The pool is allocated by the first bf16 forward whose
// GEMM reads bf16 storage (the kernel is chosen after creation, before the first step), so a
// step never allocates a twin; with the widen kernel, fp32 or fp8 it is never allocated. An
// operand is any slice of a registered tensor (an expert's rows, a vocabulary tile): a twin
// holds the range last rounded, and a slice inside it maps to the same element offset.
// Rounding a tensor replaces its twin's range (the rest of its bytes may have changed), except
// a rounding of the rows right after that range, which extends it (the split expert exchange
// rounds its parts' rows one after another, moe.c; rows rewritten since their rounding and read
// again would be the bug below either way). A
// tensor rewritten without nm_round_act and then read as NM_F32_BF16 would be a bug before
// twins too (its values would not be bf16); debug builds check every swapped operand against
// its fp32 storage. A rounding of a tensor that was not registered gets no twin (its GEMMs
// cast it per call, the same values) and is counted (nm_bf16_twins_misses; tests expect 0).
#include "model/model_state.h"

#include <string.h>

//
// Saved in bf16 (a model created for bf16, without whole-block recomputation): the saved
// activations that only bf16 GEMMs read keep no fp32 copy per block. Their fp32 pointers in
// every block share one buffer per kind (nm_saved_operand), which the forward writes and rounds
// as before; the rounding's copy goes to the block's own bf16 storage (block_acts.saved), which
// the backward's GEMMs read, whatever the kernel (the widen kernel takes bf16 storage too, the
// same values). Each block's forward and backward binds its copies first (nm_bf16_bind); a
// lookup of a shared buffer that its bound copy does not cover is a bug, and stops.
//
// fp8 saves the same kinds the same way. DeepSeek-V3's recipe keeps its activations in bf16
// and quantises them per GEMM, so under fp8 these tensors are rounded to bf16 where they are
// produced (nm_round_saved, nm_swiglu_forward, nm_moe_gather: with or without recomputation,
// so that recomputation changes nothing) and every fp8 GEMM of the forward and the backward
// quantises those bf16 values. The fp8 GEMMs read fp32 storage: a block's backward first
// widens its copies into the shared buffers (nm_bf16_restore_block). No other tensor gets a
// copy under fp8 (the head's bf16 GEMMs cast their operands per call, as before).
typedef struct nm_bf16_twin {
    const float *base;          // a registered tensor's first element (fp32 storage, in the arena)
    int64_t cap;                // its elements
    int64_t pool_at;            // where its copy starts in the pool
    nm_bf16_copy own;           // its copy in the pool (bits set when the pool is reserved)
    int saved;                  // 1: a kind's shared buffer, saved in bf16
    nm_bf16_copy *bound;        // then: the bound block's copy (NULL: no block of this kind bound)
} nm_bf16_twin;

struct nm_bf16_twins {
    const nm_ops *ops;          // whose memory the pool is
    nm_bf16_twin *items;        // (count) in address order (the arena is laid out in order)
    int count, cap;
    int64_t elems;              // the pool's bf16 elements (each twin 64-byte aligned)
    uint16_t *pool;             // NULL until reserved
    int64_t misses;             // roundings of unregistered tensors
    int saved_item[NM_SAVED_N]; // the items of the kinds saved in bf16, -1 where none
};

nm_bf16_twins *nm_bf16_twins_create(const nm_ops *ops) {
    nm_bf16_twins *t = nm_calloc(1, sizeof(nm_bf16_twins));
    t->ops = ops;
    for (int k = 0; k < NM_SAVED_N; k++) t->saved_item[k] = -1;
    return t;
}

void nm_bf16_twins_destroy(nm_bf16_twins *t) {
    if (!t) return;
    t->ops->free(t->ops, t->pool);
    nm_free(t->items);
    nm_free(t);
}

int64_t nm_bf16_twins_pool_elems(int64_t n) { return (n + 31) & ~(int64_t)31; }

static nm_bf16_twin *add_item(nm_bf16_twins *t, const float *base, int64_t n) {
    NM_CHECK(!t->pool, "bf16 twins registered after the pool was reserved");
    NM_CHECK(t->count == 0 || t->items[t->count - 1].base + t->items[t->count - 1].cap <= base,
             "bf16 twins registered out of address order");
    if (t->count == t->cap) {
        int cap = t->cap ? 2 * t->cap : 64;
        nm_bf16_twin *items = nm_calloc((size_t)cap, sizeof(nm_bf16_twin));
        if (t->count) memcpy(items, t->items, (size_t)t->count * sizeof(nm_bf16_twin));
        nm_free(t->items);
        t->items = items;
        t->cap = cap;
    }
    t->items[t->count] = (nm_bf16_twin){.base = base, .cap = n};
    return &t->items[t->count++];
}

void nm_bf16_twins_register(nm_bf16_twins *t, const float *base, int64_t n) {
    nm_bf16_twin *w = add_item(t, base, n);
    w->pool_at = t->elems;
    t->elems += nm_bf16_twins_pool_elems(n);
}

void nm_bf16_twins_register_saved(nm_bf16_twins *t, const float *base, int64_t n, nm_saved_operand kind) {
    NM_CHECK(t->saved_item[kind] < 0, "saved operand kind %d registered twice", (int)kind);
    add_item(t, base, n)->saved = 1;
    t->saved_item[kind] = t->count - 1;
}

void nm_bf16_bind(const nm_model *m, block_acts *b) {
    nm_bf16_twins *t = m->bf16.twins;
    if (!m->bf16.saved_bf16 || !t) return;
    for (int k = 0; k < NM_SAVED_N; k++) {
        if (t->saved_item[k] >= 0) t->items[t->saved_item[k]].bound = b->saved[k].bits ? &b->saved[k] : NULL;
    }
}

int64_t nm_bf16_twins_misses(const nm_bf16_twins *t) { return t ? t->misses : 0; }

int64_t nm_bf16_twins_elems(const nm_bf16_twins *t) { return t->elems; }

void nm_bf16_twins_reserve(nm_bf16_twins *t) {
    if (t->pool || t->elems == 0) return;
    t->pool = t->ops->alloc(t->ops, (size_t)t->elems * sizeof(uint16_t));
    for (int i = 0; i < t->count; i++) {
        if (!t->items[i].saved) t->items[i].own.bits = t->pool + t->items[i].pool_at;
    }
}

// Twins only pay where the bf16 GEMM reads bf16 storage (its weight copy is bf16, as
// gemm_bf16_weight_type says); widen reads the rounded fp32 storage directly.
static int twins_in_use(const nm_model *m) {
    return m->precision == NM_PRECISION_BF16 && m->bf16.twins && m->bf16.twins->pool && m->bf16.weights &&
           m->bf16.weights_type == NM_BF16;
}

// The registered tensor holding [x, x + n), or NULL.
static nm_bf16_twin *find_twin(const nm_bf16_twins *t, const float *x, int64_t n) {
    int lo = 0, hi = t->count - 1;
    while (lo <= hi) {  // the last twin whose base is at or before x
        int mid = (lo + hi) / 2;
        if (t->items[mid].base <= x) lo = mid + 1;
        else hi = mid - 1;
    }
    if (hi < 0) return NULL;
    nm_bf16_twin *w = &t->items[hi];
    return x + n <= w->base + w->cap ? w : NULL;
}

// The copy of a registered tensor in use: a block's (saved in bf16), else its own in the pool
// where the GEMM reads bf16 storage; NULL when there is none.
static nm_bf16_copy *copy_of(const nm_model *m, nm_bf16_twin *w) {
    if (w->saved) return w->bound;
    return twins_in_use(m) ? &w->own : NULL;
}

// The bf16 storage for x(n), about to be rewritten with bf16 values (the copy now holds this
// range), or NULL: no copy is kept (fp32 and fp8 runs, a kernel that reads fp32 storage) or the
// tensor was not registered (counted).
static uint16_t *claim_twin(const nm_model *m, const float *x, int64_t n) {
    nm_bf16_twins *t = m->bf16.twins;
    if (!nm_saved_in_bf16(m) || n <= 0 || !t) return NULL;
    nm_bf16_twin *w = find_twin(t, x, n);
    if (!w) {
        if (twins_in_use(m)) t->misses++;
        return NULL;
    }
    if (m->precision == NM_PRECISION_FP8 && !w->saved) return NULL;  // fp8: only the saved kinds' copies
    NM_CHECK(!w->saved || w->bound, "a saved activation rounded with no block's copy bound (nm_bf16_bind)");
    nm_bf16_copy *c = copy_of(m, w);
    if (!c) return NULL;
    int64_t at = x - w->base;
    // The rows right after the range it holds (the split expert exchange rounds its parts one
    // after another): the copy holds both. Anything else replaces the range.
    if (c->n > 0 && at == c->at + c->n) {
        c->n += n;
    } else {
        c->at = at;
        c->n = n;
    }
    return c->bits + at;
}

int nm_saved_in_bf16(const nm_model *m) {
    return m->precision == NM_PRECISION_BF16 || m->precision == NM_PRECISION_FP8;
}

static void round_claimed(const nm_model *m, float *x, int64_t n) {
    uint16_t *bits = claim_twin(m, x, n);
    if (bits) m->ops->round_cast_bf16(m->ops, x, bits, n);
    else m->ops->round_bf16(m->ops, x, x, n);
}

void nm_round_act(const nm_model *m, float *x, int64_t n) {
    if (m->precision != NM_PRECISION_BF16 || n <= 0) return;
    round_claimed(m, x, n);
}

void nm_round_saved(const nm_model *m, float *x, int64_t n) {
    if (!nm_saved_in_bf16(m) || n <= 0) return;
    round_claimed(m, x, n);
}

void nm_swiglu_forward(const nm_model *m, float *act, const float *gate_up, int64_t N, int64_t F) {
    if (!nm_saved_in_bf16(m)) {
        m->ops->swiglu_forward(m->ops, act, gate_up, N, F);
        return;
    }
    m->ops->swiglu_forward_bf16(m->ops, act, claim_twin(m, act, N * F), gate_up, N, F);
}

void nm_swiglu_backward(const nm_model *m, float *d_gate_up, const float *d_act, const float *gate_up, int64_t N,
                        int64_t F) {
    if (m->precision != NM_PRECISION_BF16) {
        m->ops->swiglu_backward(m->ops, d_gate_up, d_act, gate_up, N, F);
        return;
    }
    m->ops->swiglu_backward_bf16(m->ops, d_gate_up, claim_twin(m, d_gate_up, N * 2 * F), d_act, gate_up, N, F);
}

void nm_moe_gather(const nm_model *m, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                   int64_t D) {
    if (!nm_saved_in_bf16(m)) {
        m->ops->moe_gather(m->ops, dst, src, perm, N, K, D);
        return;
    }
    m->ops->moe_gather_bf16(m->ops, dst, claim_twin(m, dst, N * K * D), src, perm, N, K, D);
}

void nm_bf16_restore(const nm_model *m, float *x) {
    nm_bf16_twins *t = m->bf16.twins;
    if (m->precision != NM_PRECISION_BF16 || !m->bf16.saved_bf16 || !t) return;  // fp8: nm_bf16_restore_block
    nm_bf16_twin *w = find_twin(t, x, 1);
    if (!w || !w->saved) return;
    NM_CHECK(w->bound && w->bound->n > 0, "a saved activation restored with no block's copy bound");
    m->ops->widen_bf16(m->ops, (float *)w->base + w->bound->at, w->bound->bits + w->bound->at, w->bound->n);
}

void nm_bf16_restore_block(const nm_model *m) {
    nm_bf16_twins *t = m->bf16.twins;
    if (m->precision != NM_PRECISION_FP8 || !m->bf16.saved_bf16 || !t) return;
    for (int k = 0; k < NM_SAVED_N; k++) {
        if (t->saved_item[k] < 0) continue;
        const nm_bf16_twin *w = &t->items[t->saved_item[k]];
        if (w->bound && w->bound->n > 0)
            m->ops->widen_bf16(m->ops, (float *)w->base + w->bound->at, w->bound->bits + w->bound->at, w->bound->n);
    }
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
    if (*type != NM_F32_BF16 || rows <= 0 || cols <= 0 || !m->bf16.twins) return x;
    int64_t span = (rows - 1) * ld + cols;
    nm_bf16_twin *w = find_twin(m->bf16.twins, x, span);
    const nm_bf16_copy *c = w ? copy_of(m, w) : NULL;
    if (c && c->n > 0 && x >= w->base + c->at && x + span <= w->base + c->at + c->n) {
        const uint16_t *bits = c->bits + (x - w->base);
        if (!w->saved) check_twin(x, bits, rows, cols, ld);  // a shared buffer holds the last block's
        *type = NM_BF16;
        return bits;
    }
    // saved in bf16, the fp32 buffer is another block's: only the bound copy has these values
    NM_CHECK(!w || !w->saved, "a saved activation read outside the range its bound copy holds (nm_bf16_bind)");
    return x;  // not rounded through nm_round_act (e.g. received from another rank): gemm_bf16 casts it
}

// Every group's operand swapped for its twin, or none (the groups share one operand type).
static void swap_all(const nm_model *m, nm_gemm_group *groups, int64_t n, int which, nm_transpose t,
                     nm_dtype *type) {
    if (*type != NM_F32_BF16 || !m->bf16.twins) return;
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
