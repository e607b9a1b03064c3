// moe.c: the mixture-of-experts FFN of a MoE block (dsv3-spec 5, 6.2): router, top-k routing,
// the sequence-wise balance loss, the routed experts (permute, gather, grouped GEMMs, combine)
// and the shared experts; forward and backward.
//
// The routed path is gather -> experts -> combine, each step its own call, so that expert
// parallelism can put the token dispatch (all-to-all) between gather and experts and its
// reverse between experts and combine; nm_moe_experts_forward/backward see only the rows
// gathered for them and the expert offsets.
#include "model/blocks.h"

#include <string.h>

static nm_router_params router_params(const nm_model_config *c, int64_t N) {
    nm_router_params p = {
        .N = N, .E = c->E, .K = c->K, .G = c->G, .Gk = c->Gk, .scoring = c->scoring,
        .method = c->topk_method, .norm_topk_prob = c->norm_topk_prob,
        .routed_scaling = (float)c->routed_scaling,
    };
    return p;
}

// --- routed experts ---------------------------------------------------------------------------

// Grouped-GEMM descriptors, one per expert e over its rows [offsets[e], offsets[e+1]).
// Forward / Dgrad shape: C_e(rows, N) = op(A_e(rows, K)) op(W_e), W_e = W + e * w_stride
// elements of w_elem bytes (fp32 weights, or their bf16 copy).
static void groups_rows(nm_model *m, const int32_t *offsets, int64_t N, int64_t K, const float *A, int64_t lda,
                        const void *W, size_t w_elem, size_t w_stride, int64_t ldw, float *C, int64_t ldc) {
    for (int64_t e = 0; e < m->ep.E_loc; e++) {
        int64_t r0 = offsets[e];
        m->scratch.groups[e] = (nm_gemm_group){.M = offsets[e + 1] - r0, .N = N, .K = K, .A = A + r0 * lda, .lda = lda,
                                       .B = (const char *)W + (size_t)e * w_stride * w_elem, .ldb = ldw,
                                       .C = C + r0 * ldc, .ldc = ldc};
    }
}

// Wgrad shape: dW_e(M, N) += A_e(rows, M)^T B_e(rows, N), a reduction over the expert's rows.
static void groups_wgrad(nm_model *m, const int32_t *offsets, int64_t M, int64_t N, const float *A, int64_t lda,
                         const float *B, int64_t ldb, float *dW, size_t w_stride, int64_t ldw) {
    for (int64_t e = 0; e < m->ep.E_loc; e++) {
        int64_t r0 = offsets[e];
        m->scratch.groups[e] = (nm_gemm_group){.M = M, .N = N, .K = offsets[e + 1] - r0, .A = A + r0 * lda, .lda = lda,
                                       .B = B + r0 * ldb, .ldb = ldb, .C = dW + (size_t)e * w_stride, .ldc = ldw};
    }
}

// The experts' groups in m->scratch.groups through the fp32 or the bf16 grouped GEMM (alpha 1).
// bf16: rounded activation operands are read from their bf16 twins where they have them.
static void grouped(nm_model *m, nm_transpose ta, nm_transpose tb, float beta, nm_dtype a_type, nm_dtype b_type) {
    nm_ep_progress_partner(m);
    if (m->precision == NM_PRECISION_BF16) {
        nm_bf16_operand_groups(m, m->scratch.groups, m->ep.E_loc, ta, tb, &a_type, &b_type);
        m->ops->gemm_bf16_grouped(m->ops, ta, tb, 1.0f, beta, m->scratch.groups, m->ep.E_loc, a_type, b_type);
    } else m->ops->gemm_grouped(m->ops, ta, tb, 1.0f, beta, m->scratch.groups, m->ep.E_loc);
}

// gate_up = x . W_gate_up^T ; act = swiglu(gate_up) ; out = act . W_down^T, per expert over
// its rows. fp32 and bf16 run the experts as grouped GEMMs (concurrently); fp8 goes expert by
// expert through the precision-aware linear helpers.
//
// bf16: x and act are read by nothing but the expert GEMMs (here and their weight gradients in
// the backward), and a bf16 GEMM rounds its fp32 operands to bf16 anyway. So they are rounded
// once, in place, where they are produced (as Megatron keeps them in bf16): x by the caller's
// gather (or after the expert-parallel dispatch), act by SwiGLU; every GEMM reads them as they
// are (NM_F32_BF16): the same operand values as rounding per GEMM call.
// act (=) swiglu(gate_up) over rows as the experts' forward makes it (bf16: rounded, with its
// twin); the backward makes it again under selective recomputation ("moe_act"), the same bits.
static void experts_act(nm_model *m, float *act, const float *gate_up, int64_t rows, int64_t Fe) {
    nm_swiglu_forward(m, act, gate_up, rows, Fe);  // bf16 and fp8: rounded, with its copy
}

void nm_moe_experts_forward(nm_model *m, const nm_layer_offsets *w, const int32_t *offsets, float *x,
                            float *gate_up, float *act, float *out) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    int64_t E = m->ep.E_loc, D = c->D, Fe = c->Fe, rows = offsets[E];
    size_t stride = w->expert_stride, down = (size_t)2 * Fe * D;
    const float *W0 = m->params + w->experts;
    if (m->precision == NM_PRECISION_FP32) {
        groups_rows(m, offsets, 2 * Fe, D, x, D, W0, sizeof(float), stride, D, gate_up, 2 * Fe);
        ops->gemm_grouped(ops, NM_NO_TRANS, NM_TRANS, 1.0f, 0.0f, m->scratch.groups, E);
        experts_act(m, act, gate_up, rows, Fe);
        groups_rows(m, offsets, D, Fe, act, Fe, W0 + down, sizeof(float), stride, Fe, out, D);
        ops->gemm_grouped(ops, NM_NO_TRANS, NM_TRANS, 1.0f, 0.0f, m->scratch.groups, E);
        return;
    }
    if (m->precision == NM_PRECISION_BF16) {
        const char *Wb = nm_weight_bf16(m, w->experts);
        nm_dtype w_t = m->bf16.weights_type;
        size_t elem = w_t == NM_BF16 ? sizeof(uint16_t) : sizeof(float);
        groups_rows(m, offsets, 2 * Fe, D, x, D, Wb, elem, stride, D, gate_up, 2 * Fe);
        grouped(m, NM_NO_TRANS, NM_TRANS, 0.0f, NM_F32_BF16, w_t);
        experts_act(m, act, gate_up, rows, Fe);  // rounded
        groups_rows(m, offsets, D, Fe, act, Fe, Wb + down * elem, elem, stride, Fe, out, D);
        grouped(m, NM_NO_TRANS, NM_TRANS, 0.0f, NM_F32_BF16, w_t);
        return;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;  // [gate; up] (2Fe, D), then down (D, Fe)
        nm_linear_forward(m, (nm_linear_args){.W = We, .N = n, .IC = D, .OC = 2 * Fe, .x = x + r0 * D,
                                              .y = gate_up + r0 * 2 * Fe});
    }
    experts_act(m, act, gate_up, rows, Fe);
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;
        nm_linear_forward(m, (nm_linear_args){.W = We + down, .N = n, .IC = Fe, .OC = D, .x = act + r0 * Fe,
                                              .y = out + r0 * D});
    }
}

// bf16: x and act arrive rounded by the forward; d_out and d_gate_up are read by nothing but
// the expert GEMMs below, so they are rounded once in place as well (see the forward).
void nm_moe_experts_backward(nm_model *m, const nm_layer_offsets *w, const int32_t *offsets, const float *x,
                             const float *gate_up, float *act, float *d_out, float *d_act,
                             float *d_gate_up, float *d_x) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    int64_t E = m->ep.E_loc, D = c->D, Fe = c->Fe, rows = offsets[E];
    // selective recomputation ("moe_act"): act was not kept (a shared buffer holds another block's);
    // fp8: made again from gate_up's fp8 rounding, as the caller leaves it (fp8_gate_up_backward)
    if (m->precision == NM_PRECISION_FP8 || (m->recompute.moe_act && !m->recompute.full))
        experts_act(m, act, gate_up, rows, Fe);
    size_t stride = w->expert_stride, down = (size_t)2 * Fe * D;
    const float *W0 = m->params + w->experts;
    float *dW0 = m->grads + w->experts;
    if (m->precision == NM_PRECISION_FP32 || m->precision == NM_PRECISION_BF16) {
        int bf16 = m->precision == NM_PRECISION_BF16;
        const void *Wrows = bf16 ? nm_weight_bf16(m, w->experts) : (const void *)W0;
        nm_dtype act_t = bf16 ? NM_F32_BF16 : NM_F32, w_t = bf16 ? m->bf16.weights_type : NM_F32;
        size_t elem = w_t == NM_BF16 ? sizeof(uint16_t) : sizeof(float);
        nm_round_act(m, d_out, rows * D);  // no-op in fp32
        // out = act . W_down^T: d_act = d_out . W_down ; dW_down += d_out^T act
        groups_rows(m, offsets, Fe, D, d_out, D, (const char *)Wrows + down * elem, elem, stride, Fe, d_act, Fe);
        grouped(m, NM_NO_TRANS, NM_NO_TRANS, 0.0f, act_t, w_t);
        groups_wgrad(m, offsets, D, Fe, d_out, D, act, Fe, dW0 + down, stride, Fe);
        grouped(m, NM_TRANS, NM_NO_TRANS, 1.0f, act_t, act_t);
        nm_swiglu_backward(m, d_gate_up, d_act, gate_up, rows, Fe);  // rounded in bf16
        // gate_up = x . W_gate_up^T: dW_gate_up += d_gate_up^T x ; d_x = d_gate_up . W_gate_up
        groups_wgrad(m, offsets, 2 * Fe, D, d_gate_up, 2 * Fe, x, D, dW0, stride, D);
        grouped(m, NM_TRANS, NM_NO_TRANS, 1.0f, act_t, act_t);
        groups_rows(m, offsets, D, 2 * Fe, d_gate_up, 2 * Fe, Wrows, elem, stride, D, d_x, D);
        grouped(m, NM_NO_TRANS, NM_NO_TRANS, 0.0f, act_t, w_t);
        return;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;
        nm_linear_backward_input(m, (nm_linear_args){.W = We + down, .N = n, .IC = Fe, .OC = D, .dy = d_out + r0 * D,
                                                     .dx = d_act + r0 * Fe});
        nm_linear_backward_weight(m, (nm_linear_args){.W = We + down, .N = n, .IC = Fe, .OC = D, .x = act + r0 * Fe,
                                                      .dy = d_out + r0 * D});
    }
    ops->swiglu_backward(ops, d_gate_up, d_act, gate_up, rows, Fe);
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;
        nm_linear_backward_weight(m, (nm_linear_args){.W = We, .N = n, .IC = D, .OC = 2 * Fe, .x = x + r0 * D,
                                                      .dy = d_gate_up + r0 * 2 * Fe});
        nm_linear_backward_input(m, (nm_linear_args){.W = We, .N = n, .IC = D, .OC = 2 * Fe,
                                                     .dy = d_gate_up + r0 * 2 * Fe, .dx = d_x + r0 * D});
    }
}

// --- the experts' input rows saved in fp8 -------------------------------------------------------
//
// A model created for fp8 keeps each block's expert input rows as the expert GEMM quantises
// them (e4m3 codes and tile scales, block_acts.x_codes) and one fp32 buffer for all blocks: the
// forward quantises into the block's codes and dequantises into the buffer (fp8_round_rows's
// values, by its definition), the backward dequantises them again before the experts read them.

// rows x D of x (=) their fp8 rounding, kept in b's codes when it has them.
static void fp8_round_saved(nm_model *m, block_acts *b, float *x, int64_t rows) {
    const int64_t D = m->cfg.D;
    if (!b->x_codes) {
        m->ops->fp8_round_rows(m->ops, x, rows, D);
        return;
    }
    m->ops->fp8_quantize_rows(m->ops, b->x_codes, b->x_scales, x, rows, D);
    m->ops->fp8_dequantize_rows(m->ops, x, b->x_codes, b->x_scales, rows, D);
}

// rows x D of x (=) b's saved rows (no-op unless saved in fp8).
static void fp8_restore_saved(nm_model *m, const block_acts *b, float *x, int64_t rows) {
    if (b->x_codes && rows > 0) m->ops->fp8_dequantize_rows(m->ops, x, b->x_codes, b->x_scales, rows, m->cfg.D);
}

// The routed experts' SwiGLU inputs under fp8, as DeepSeek-V3 keeps them: cached in fp8 (1 x 128
// tiles) and the SwiGLU output made again from them in the backward. So the backward reads
// gate_up's fp8 rounding in every mode: from the block's codes where the forward kept them, else
// (recomputation, more rounds than one) rounded in place from the recomputed values.

// Forward: rows [base, base + rows) of b's gate_up kept as codes (saved in fp8; else no-op).
static void fp8_gate_up_keep(nm_model *m, block_acts *b, int64_t base, int64_t rows) {
    const int64_t G = 2 * m->cfg.Fe, tiles = (G + 127) / 128;
    if (!b->g_codes || rows <= 0) return;
    m->ops->fp8_quantize_rows(m->ops, b->g_codes + base * G, b->g_scales + base * tiles, b->e_gate_up + base * G, rows,
                              G);
}

// Backward: rows [base, base + rows) of b's gate_up (=) their fp8 rounding, from the codes when
// `kept` (the forward kept these rows), else in place. No-op outside fp8.
static void fp8_gate_up_backward(nm_model *m, const block_acts *b, int64_t base, int64_t rows, int kept) {
    const int64_t G = 2 * m->cfg.Fe, tiles = (G + 127) / 128;
    if (m->precision != NM_PRECISION_FP8 || rows <= 0) return;
    float *g = b->e_gate_up + base * G;
    if (kept && b->g_codes)
        m->ops->fp8_dequantize_rows(m->ops, g, b->g_codes + base * G, b->g_scales + base * tiles, rows, G);
    else
        m->ops->fp8_round_rows(m->ops, g, rows, G);
}

// --- expert parallelism: dispatch and combine, in bounded rounds ------------------------------
//
// After routing, x_perm holds this rank's N*K rows sorted by global expert, so the rows for EP
// rank q (experts [q*El, (q+1)*El)) are one contiguous block. The per-(q, local expert) counts
// go first (all_to_all of El counts per peer), then every rank's per-peer row totals (an
// all_gather of EP int64: the EP x EP matrix P[s][r] of rows s sends r), so every rank knows
// what each receiver gets in all.
//
// The receive side holds at most C = ep.cap rows (moe_receive_capacity x the mean rows per
// rank, docs/parallelism.md), not the worst case. Receiver r lays its incoming rows out in one
// source-major sequence (source s's block at sum_{s' < s} P[s'][r]); round k moves rows
// [k*C, (k+1)*C) of that sequence, so each source sends a contiguous slice of its block per
// round, straight from x_perm (all_to_all_v's displacements), and no receiver ever holds more
// than C. rounds = max over receivers of ceil(received / C), the same on every rank of the
// group. Each round reorders what arrived expert-major, runs the local experts on it and
// sends the outputs back into their slice of e_out: no token is ever dropped. With one round
// (the usual case) this is exactly the unbounded exchange.
//
// The backward repeats the rounds: d_e_out travels like x_perm, d_x_loc returns like e_out.
// With one round the expert side's saved activations (x_loc, e_gate_up, e_act) are those of
// the forward; with more, only the last round's would be left, so each backward round sends
// its x_perm slice again and recomputes them (one more row phase; docs/parallelism.md).

// Copies blocks between source-major (s, j) and expert-major (j, s) order. to_expert: src is
// source-major, dst expert-major; else the reverse. counts[s*El + j] rows per block of D
// elements of elem bytes (fp32 rows, bf16 ones, fp8 codes or, D = tiles, their scales).
static void ep_reorder(const nm_model *m, void *dst_v, const void *src_v, const int64_t *counts, int to_expert,
                       size_t elem, int64_t D) {
    int64_t EP = m->ep.comm->size, El = m->ep.E_loc;
    char *dst = dst_v;
    const char *src = src_v;
    int64_t src_at = 0;
    for (int64_t s = 0; s < EP; s++) {
        for (int64_t j = 0; j < El; j++) {
            // expert-major position of block (s, j): all rows of experts < j, then sources < s of j
            int64_t exp_at = 0;
            for (int64_t jj = 0; jj < j; jj++)
                for (int64_t ss = 0; ss < EP; ss++) exp_at += counts[ss * El + jj];
            for (int64_t ss = 0; ss < s; ss++) exp_at += counts[ss * El + j];
            int64_t n = counts[s * El + j];
            if (n > 0) {
                size_t bytes = (size_t)(n * D) * elem;
                if (to_expert) memcpy(dst + (size_t)(exp_at * D) * elem, src + (size_t)(src_at * D) * elem, bytes);
                else memcpy(dst + (size_t)(src_at * D) * elem, src + (size_t)(exp_at * D) * elem, bytes);
            }
            src_at += n;
        }
    }
}

static void ep_fail(nm_model *m, const nm_error *e) { nm_model_latch(m, NM_FAULT_EP, e); }

// Work that runs while the next all-to-all of the exchange is in flight
// (moe_shared_expert_overlap, as Megatron-Core's): the shared experts' part that touches
// nothing the exchange reads or writes. Set for one exchange; the first all-to-all takes it.
struct ep_overlap {
    void (*work)(nm_model *m, void *ctx);
    void *ctx;
};
typedef struct ep_overlap ep_overlap;

// Paired micro-batches: the other micro-batch runs until it waits too, while this model's
// all-to-all req is in flight (its seconds counted as overlapped); the other's GEMMs test req
// meanwhile (nm_ep_progress_partner). A no-op unpaired.
static void ep_pause(nm_model *m, nm_comm_request *req) {
    if (!m->ep.coop) return;
    nm_comm_request *was = m->ep.in_flight;
    m->ep.in_flight = req;
    m->ep.overlap_s += nm_coop_pause(m->ep.coop);
    m->ep.in_flight = was;
}

// One all-to-all of the exchange (nm_comm_all_to_all_v's arguments), the pending overlap work
// done while it is in flight. Either way the work runs exactly once and the same operations
// run in the same order, so results do not depend on the overlap.
static void ep_a2a(nm_model *m, const void *send, const int64_t *send_counts, const int64_t *send_at, void *recv,
                   const int64_t *recv_counts, const int64_t *recv_at, nm_comm_dtype dt) {
    const ep_overlap *o = m->ep.overlap;
    nm_error e;
    if (!o && !m->ep.coop) {
        if (!nm_model_faulted(m) &&
            nm_comm_all_to_all_v(m->ep.comm, send, send_counts, send_at, recv, recv_counts, recv_at, dt, &e) != 0)
            ep_fail(m, &e);
        return;
    }
    m->ep.overlap = NULL;
    nm_comm_request req;
    if (nm_model_faulted(m) || nm_comm_all_to_all_v_start(m->ep.comm, send, send_counts, send_at, recv, recv_counts,
                                                          recv_at, dt, &req, &e) != 0) {
        if (!nm_model_faulted(m)) ep_fail(m, &e);
        if (o) o->work(m, o->ctx);
        return;
    }
    if (o) {
        double t0 = nm_comm_clock();
        m->ep.in_flight = &req;
        o->work(m, o->ctx);
        m->ep.in_flight = NULL;
        m->ep.overlap_s += nm_comm_clock() - t0;
    }
    ep_pause(m, &req);
    if (nm_comm_wait(&req, &e) != 0) ep_fail(m, &e);
}

// Runs `work` inside the block's next exchange when the overlap is on, else right away.
static void ep_overlap_set(nm_model *m, ep_overlap *o) {
    if (m->ep.shared_expert_overlap) m->ep.overlap = o;
    else o->work(m, o->ctx);
}

// After the exchange: work an exchange did not take (none ran) runs now.
static void ep_overlap_flush(nm_model *m, const ep_overlap *o) {
    if (m->ep.overlap != o) return;
    m->ep.overlap = NULL;
    o->work(m, o->ctx);
}

static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

// Exchanges the counts of block b (forward only; the backward reuses them): b->ep_counts
// (per source and local expert), b->ep_pairs (the EP x EP row totals) and b->ep_rounds.
static void ep_exchange_counts(nm_model *m, block_acts *b) {
    int64_t EP = m->ep.comm->size, El = m->ep.E_loc, me = m->ep.comm->rank;
    for (int64_t q = 0; q < EP; q++) {
        m->ep.send[q] = 0;
        for (int64_t j = 0; j < El; j++) {
            int64_t e = q * El + j;
            m->ep.cnt_send[q * El + j] = b->offsets[e + 1] - b->offsets[e];
            m->ep.send[q] += m->ep.cnt_send[q * El + j];
        }
    }
    int64_t *per = m->ep.recv;  // El counts to and from every peer
    for (int64_t q = 0; q < EP; q++) per[q] = El;
    nm_error e;
    if (!nm_model_faulted(m) &&
        nm_comm_all_to_all(m->ep.comm, m->ep.cnt_send, per, b->ep_counts, per, NM_DT_I64, &e) != 0)
        ep_fail(m, &e);
    for (int64_t q = 0; q < EP; q++) {
        b->ep_pairs[me * EP + q] = m->ep.send[q];
        per[q] = EP;
    }
    if (!nm_model_faulted(m) && nm_comm_all_gather(m->ep.comm, b->ep_pairs, per, NM_DT_I64, &e) != 0) ep_fail(m, &e);
    int64_t most = 0, total = 0;
    for (int64_t r = 0; r < EP; r++) {
        int64_t in = 0;
        for (int64_t s = 0; s < EP; s++) in += b->ep_pairs[s * EP + r];
        if (in > most) most = in;
        total += in;
    }
    // The split exchange: an exchange whose busiest receiver fits the receive side runs as parts,
    // each a group of every rank's local experts (at most `split`, at most one a local expert),
    // laid out one after another there
    const int64_t parts = m->ep.split < El ? m->ep.split : El;
    b->ep_split = parts > 1 && most > 1 && most <= m->ep.cap;
    b->ep_cap = m->ep.cap;
    b->ep_rounds = b->ep_split ? parts : most > 0 ? (most + b->ep_cap - 1) / b->ep_cap : 1;
    if (b->ep_rounds > m->ep.stats_rounds) m->ep.stats_rounds = b->ep_rounds;
    double over = total > 0 ? (double)most * (double)EP / (double)total : 1.0;
    if (over > m->ep.stats_over_mean) m->ep.stats_over_mean = over;
}

// The local experts' row offsets of a round (m->ep.round_offsets, El + 1) from its counts.
static void round_offsets(nm_model *m) {
    const int64_t EP = m->ep.comm->size, El = m->ep.E_loc;
    m->ep.round_offsets[0] = 0;
    for (int64_t j = 0; j < El; j++) {
        int64_t n = 0;
        for (int64_t s = 0; s < EP; s++) n += m->ep.round_counts[s * El + j];
        m->ep.round_offsets[j + 1] = m->ep.round_offsets[j] + (int32_t)n;
    }
}

// Round k of block b's exchange: element counts and displacements of this rank's pieces as a
// source (m->ep.send / ep_send_at, into x_perm's order) and as a receiver (m->ep.recv, back to
// back in ep.buf from row 0), the round's rows per (source, local expert) in m->ep.round_counts,
// and the local experts' row offsets in m->ep.round_offsets (El+1). Returns the rows received.
static int64_t ep_round(nm_model *m, const block_acts *b, int64_t k) {
    int64_t EP = m->ep.comm->size, El = m->ep.E_loc, D = m->cfg.D, me = m->ep.comm->rank, C = b->ep_cap;
    const int64_t *P = b->ep_pairs;
    for (int64_t q = 0; q < EP; q++) {  // as a source: my slice of my block for q
        int64_t off = 0;
        for (int64_t s = 0; s < me; s++) off += P[s * EP + q];
        int64_t n = P[me * EP + q];
        int64_t lo = clamp64(k * C - off, 0, n), hi = clamp64((k + 1) * C - off, 0, n);
        m->ep.send[q] = (hi - lo) * D;
        m->ep.send_at[q] = ((int64_t)b->offsets[q * El] + lo) * D;
    }
    int64_t off = 0, got = 0;
    for (int64_t s = 0; s < EP; s++) {  // as a receiver: each source's slice, split by local expert
        int64_t n = P[s * EP + me];
        int64_t lo = clamp64(k * C - off, 0, n), hi = clamp64((k + 1) * C - off, 0, n);
        m->ep.recv[s] = (hi - lo) * D;
        m->ep.recv_at[s] = got * D;
        got += hi - lo;
        int64_t at = 0;  // rows of source s's block before local expert j
        for (int64_t j = 0; j < El; j++) {
            int64_t c = b->ep_counts[s * El + j];
            int64_t a = clamp64(lo, at, at + c), z = clamp64(hi, at, at + c);
            m->ep.round_counts[s * El + j] = z - a;
            at += c;
        }
        off += n;
    }
    round_offsets(m);
    return got;
}

// Part k of block b's split exchange (its ep_rounds parts): the rows of every rank's local
// experts [j0, j1) = [k El / parts, (k+1) El / parts), laid out as ep_round lays out a round,
// but from row `base` on the expert side (the rows of the earlier parts). Each expert's rows
// arrive whole, in the order one round gives them, so its GEMMs (and its weight gradient's sum)
// are those of the unsplit exchange.
static int64_t ep_part(nm_model *m, const block_acts *b, int64_t k, int64_t base) {
    const int64_t EP = m->ep.comm->size, El = m->ep.E_loc, D = m->cfg.D, parts = b->ep_rounds;
    const int64_t j0 = k * El / parts, j1 = (k + 1) * El / parts;
    for (int64_t q = 0; q < EP; q++) {  // as a source: my rows for q's experts [j0, j1)
        int64_t lo = b->offsets[q * El + j0], hi = b->offsets[q * El + j1];
        m->ep.send[q] = (hi - lo) * D;
        m->ep.send_at[q] = lo * D;
    }
    int64_t got = 0;
    for (int64_t s = 0; s < EP; s++) {  // as a receiver: each source's rows for them
        int64_t n = 0;
        for (int64_t j = 0; j < El; j++) {
            int64_t c = j >= j0 && j < j1 ? b->ep_counts[s * El + j] : 0;
            m->ep.round_counts[s * El + j] = c;
            n += c;
        }
        m->ep.recv[s] = n * D;
        m->ep.recv_at[s] = (base + got) * D;
        got += n;
    }
    round_offsets(m);
    return got;
}

// What crosses the expert all-to-all, by precision (DeepSeek-V3's recipe): under bf16 the
// rows to the experts (activations and gradients) cross as bf16 and come back in fp32; under
// fp8 the activations cross as e4m3 codes with one scale per 1 x 128 tile (the quantisation
// the expert GEMM applies to them anyway), the gradients to the experts and everything coming
// back as bf16. The values are those of one process: moe_round_* below give a rank that keeps
// its experts the same roundings, so every layout computes the same numbers.
typedef enum ep_payload { EP_ACTIVATIONS, EP_GRADIENTS } ep_payload;

// One all-to-all of the exchange started without waiting (the split exchange), or, req NULL,
// run through ep_a2a (blocking, with the overlap work). A failure is latched.
static void ep_a2a_start(nm_model *m, const void *send, const int64_t *send_counts, const int64_t *send_at, void *recv,
                         const int64_t *recv_counts, const int64_t *recv_at, nm_comm_dtype dt, nm_comm_request *req) {
    if (!req) {
        ep_a2a(m, send, send_counts, send_at, recv, recv_counts, recv_at, dt);
        return;
    }
    nm_error e;
    memset(req, 0, sizeof(*req));
    if (!nm_model_faulted(m) &&
        nm_comm_all_to_all_v_start(m->ep.comm, send, send_counts, send_at, recv, recv_counts, recv_at, dt, req, &e) != 0)
        ep_fail(m, &e);
}

static void ep_a2a_wait(nm_model *m, nm_comm_request *req) {
    nm_error e;
    if (req) ep_pause(m, req);
    if (req && nm_comm_wait(req, &e) != 0 && !nm_model_faulted(m)) ep_fail(m, &e);
}

// The fp8 dispatch of this round, started: each peer's slice of rows quantised into ep_send8 and
// ep_send_scales at the rows' own places, codes and scales exchanged (two all-to-alls, the
// scales' counts in ep.scale_counts; req: their two requests, or NULL to wait for them here).
static void ep_dispatch_fp8_start(nm_model *m, const float *rows, nm_comm_request *req) {
    const int64_t EP = m->ep.comm->size, D = m->cfg.D, tiles = (D + 127) / 128;
    int64_t *s_send = m->ep.scale_counts, *s_send_at = s_send + EP, *s_recv = s_send + 2 * EP,
            *s_recv_at = s_send + 3 * EP;
    for (int64_t q = 0; q < EP; q++) {
        const int64_t at = m->ep.send_at[q] / D, n = m->ep.send[q] / D;
        m->ops->fp8_quantize_rows(m->ops, m->ep.send8 + at * D, m->ep.send_scales + at * tiles, rows + at * D, n, D);
        s_send[q] = n * tiles, s_send_at[q] = at * tiles;
        s_recv[q] = m->ep.recv[q] / D * tiles, s_recv_at[q] = m->ep.recv_at[q] / D * tiles;
    }
    ep_a2a_start(m, m->ep.send8, m->ep.send, m->ep.send_at, m->ep.recv8, m->ep.recv, m->ep.recv_at, NM_DT_U8, req);
    ep_a2a_start(m, m->ep.send_scales, s_send, s_send_at, m->ep.recv_scales, s_recv, s_recv_at, NM_DT_F32,
                 req ? req + 1 : NULL);
}

// ... and finished: the codes and scales from row `base` on reordered expert-major into ep.buf
// (codes, then scales) at that row, and dequantised into expert_rows there.
static void ep_dispatch_fp8_finish(nm_model *m, float *expert_rows, int64_t base, int64_t n_in) {
    const int64_t D = m->cfg.D, tiles = (D + 127) / 128;
    uint8_t *codes = (uint8_t *)m->ep.buf;  // (C, D) bytes, then the scales at a float boundary
    float *scales = m->ep.buf + (m->ep.cap * D + 3) / 4;
    ep_reorder(m, codes + base * D, m->ep.recv8 + base * D, m->ep.round_counts, 1, 1, D);
    ep_reorder(m, scales + base * tiles, m->ep.recv_scales + base * tiles, m->ep.round_counts, 1, sizeof(float),
               tiles);
    m->ops->fp8_dequantize_rows(m->ops, expert_rows + base * D, codes + base * D, scales + base * tiles, n_in, D);
}

// Saved in fp8: the rows this round's fp8 dispatch left in ep.buf (codes, then scales; n_in
// rows from row base, expert-major) into block b's codes and scales at the same rows.
static void ep_keep_fp8(nm_model *m, block_acts *b, int64_t base, int64_t n_in) {
    const int64_t D = m->cfg.D, tiles = (D + 127) / 128;
    memcpy(b->x_codes + base * D, (uint8_t *)m->ep.buf + base * D, (size_t)(n_in * D));
    memcpy(b->x_scales + base * tiles, m->ep.buf + (m->ep.cap * D + 3) / 4 + base * tiles,
           (size_t)(n_in * tiles) * sizeof(float));
}

// This round's slices of the source rows (N*K, D, x_perm order) -> expert-major rows here
// (n_in of them, from row base), in the payload's dtype (above), in two halves: the start sends
// (req: the round's requests, or NULL to wait in it), the finish lays the rows out. bf16 rows
// arrive in the upper half of ep.buf's bytes, are reordered into the lower half and widened
// into expert_rows.
static void ep_dispatch_start(nm_model *m, const float *rows, ep_payload what, nm_comm_request *req) {
    if (m->precision == NM_PRECISION_FP8 && what == EP_ACTIVATIONS) {
        ep_dispatch_fp8_start(m, rows, req);
        return;
    }
    if (m->precision == NM_PRECISION_FP32) {
        ep_a2a_start(m, rows, m->ep.send, m->ep.send_at, m->ep.buf, m->ep.recv, m->ep.recv_at, NM_DT_F32, req);
        return;
    }
    for (int64_t q = 0; q < m->ep.comm->size; q++)
        m->ops->cast_bf16(m->ops, m->ep.send16 + m->ep.send_at[q], rows + m->ep.send_at[q], m->ep.send[q]);
    uint16_t *upper = (uint16_t *)m->ep.buf + m->ep.cap * m->cfg.D;
    ep_a2a_start(m, m->ep.send16, m->ep.send, m->ep.send_at, upper, m->ep.recv, m->ep.recv_at, NM_DT_BF16, req);
}

static void ep_dispatch_finish(nm_model *m, float *expert_rows, int64_t base, int64_t n_in, ep_payload what,
                               nm_comm_request *req) {
    const int64_t D = m->cfg.D;
    int fp8 = m->precision == NM_PRECISION_FP8 && what == EP_ACTIVATIONS;
    ep_a2a_wait(m, req);
    if (fp8) ep_a2a_wait(m, req ? req + 1 : NULL);
    if (fp8) {
        ep_dispatch_fp8_finish(m, expert_rows, base, n_in);
    } else if (m->precision == NM_PRECISION_FP32) {
        ep_reorder(m, expert_rows + base * D, m->ep.buf + base * D, m->ep.round_counts, 1, sizeof(float), D);
    } else {
        uint16_t *lower = (uint16_t *)m->ep.buf, *upper = lower + m->ep.cap * D;
        ep_reorder(m, lower + base * D, upper + base * D, m->ep.round_counts, 1, sizeof(uint16_t), D);
        m->ops->widen_bf16(m->ops, expert_rows + base * D, lower + base * D, n_in * D);
    }
}

static void ep_dispatch(nm_model *m, const float *rows, float *expert_rows, int64_t n_in, ep_payload what) {
    ep_dispatch_start(m, rows, what, NULL);
    ep_dispatch_finish(m, expert_rows, 0, n_in, what, NULL);
}

// Expert-major rows of this round (from row base) -> back into their slices of rows (x_perm
// order) at the sources, through `out` (the send rows: ep.buf, or buf2 under the split
// exchange): fp32, or under fp8 bf16 (cast into ep.half, reordered into out, received into
// ep.send16 at the rows' places and widened there by the finish).
static void ep_combine_start(nm_model *m, const float *expert_rows, int64_t base, float *out, float *rows,
                             nm_comm_request *req) {
    const int64_t D = m->cfg.D;
    if (m->precision != NM_PRECISION_FP8) {
        ep_reorder(m, out + base * D, expert_rows + base * D, m->ep.round_counts, 0, sizeof(float), D);
        ep_a2a_start(m, out, m->ep.recv, m->ep.recv_at, rows, m->ep.send, m->ep.send_at, NM_DT_F32, req);
        return;
    }
    m->ops->cast_bf16(m->ops, m->ep.half + base * D, expert_rows + base * D,
                      (int64_t)m->ep.round_offsets[m->ep.E_loc] * D);
    ep_reorder(m, (uint16_t *)out + base * D, m->ep.half + base * D, m->ep.round_counts, 0, sizeof(uint16_t), D);
    ep_a2a_start(m, out, m->ep.recv, m->ep.recv_at, m->ep.send16, m->ep.send, m->ep.send_at, NM_DT_BF16, req);
}

static void ep_combine_finish(nm_model *m, float *rows, nm_comm_request *req) {
    ep_a2a_wait(m, req);
    if (m->precision != NM_PRECISION_FP8) return;
    for (int64_t q = 0; q < m->ep.comm->size; q++)
        m->ops->widen_bf16(m->ops, rows + m->ep.send_at[q], m->ep.send16 + m->ep.send_at[q], m->ep.send[q]);
}

static void ep_combine(nm_model *m, const float *expert_rows, float *rows) {
    ep_combine_start(m, expert_rows, 0, m->ep.buf, rows, NULL);
    ep_combine_finish(m, rows, NULL);
}

// --- the split exchange (overlap_moe_expert_parallel_comm) ---------------------------------------
//
// An exchange whose busiest receiver fits the receive side (one round) runs as parts: part k the
// rows of every rank's local experts [k El / parts, (k+1) El / parts), parts = min(ep.split, El)
// (ep_exchange_counts, ep_part). A part's rows land at their own place after the earlier parts'
// (ep_part's base), so every part's expert-side activations stay for the backward as one round's
// do, and the parts pipeline: while part k's experts compute, part k+1's dispatch and part k-1's
// combine are in flight (non-blocking all-to-alls, tested between the expert GEMMs:
// nm_ep_progress). The data moved is the one round's. Each expert's rows arrive whole and in the
// order one round gives them, and the experts' GEMMs are per expert, so every GEMM and every
// weight gradient's sum is the unsplit exchange's: the results are bit for bit those without it.

struct nm_ep_plan {
    int64_t *send, *send_at, *recv, *recv_at; // (EP) ep_part's counts for this part
    int64_t *round_counts;                    // (EP * E_loc)
    int32_t *round_offsets;                   // (E_loc + 1)
    int64_t base, rows;                       // its first row on the expert side, and how many
    nm_comm_request dispatch[2], combine;     // its all-to-alls (two for the fp8 dispatch)
};

void nm_ep_plans_create(nm_model *m) {
    const int64_t EP = m->ep.comm->size, El = m->ep.E_loc;
    m->ep.plans = nm_calloc((size_t)m->ep.split, sizeof(nm_ep_plan));
    for (int i = 0; i < m->ep.split; i++) {
        nm_ep_plan *p = &m->ep.plans[i];
        p->send = nm_calloc((size_t)(4 * EP + EP * El), sizeof(int64_t));
        p->send_at = p->send + EP, p->recv = p->send + 2 * EP, p->recv_at = p->send + 3 * EP;
        p->round_counts = p->send + 4 * EP;
        p->round_offsets = nm_calloc((size_t)El + 1, sizeof(int32_t));
    }
}

void nm_ep_plans_destroy(nm_model *m) {
    for (int i = 0; m->ep.plans && i < m->ep.split; i++) {
        nm_free(m->ep.plans[i].send);
        nm_free(m->ep.plans[i].round_offsets);
    }
    nm_free(m->ep.plans);
}

// The exchange functions read the current round from m->ep: a part's counts in and out of it.
static void plan_io(nm_model *m, nm_ep_plan *p, int save) {
    const size_t EP = (size_t)m->ep.comm->size, El = (size_t)m->ep.E_loc, n = EP * sizeof(int64_t);
    int64_t *mine[] = {p->send, p->send_at, p->recv, p->recv_at}, *cur[] = {m->ep.send, m->ep.send_at, m->ep.recv,
                                                                            m->ep.recv_at};
    for (int i = 0; i < 4; i++) memcpy(save ? mine[i] : cur[i], save ? cur[i] : mine[i], n);
    memcpy(save ? p->round_counts : m->ep.round_counts, save ? m->ep.round_counts : p->round_counts, n * El);
    memcpy(save ? p->round_offsets : m->ep.round_offsets, save ? m->ep.round_offsets : p->round_offsets,
           (El + 1) * sizeof(int32_t));
}

// Every part's counts, and the rows they bring, one after another from row 0.
static int64_t split_plans(nm_model *m, const block_acts *b) {
    int64_t base = 0;
    for (int64_t k = 0; k < b->ep_rounds; k++) {
        nm_ep_plan *p = &m->ep.plans[k];
        p->base = base;
        p->rows = ep_part(m, b, k, base);
        plan_io(m, p, 1);
        base += p->rows;
    }
    return base;
}

// The block's pending overlap work (moe_shared_expert_overlap) with the first part's dispatch in
// flight, as the first all-to-all of an unsplit exchange would run it.
static void split_overlap_work(nm_model *m, nm_comm_request *req) {
    const ep_overlap *o = m->ep.overlap;
    if (!o) return;
    m->ep.overlap = NULL;
    double t0 = nm_comm_clock();
    m->ep.in_flight = req;
    o->work(m, o->ctx);
    m->ep.in_flight = NULL;
    m->ep.overlap_s += nm_comm_clock() - t0;
}

// Part k's experts (forward or backward: `run`) with part k+1's dispatch and part k-1's combine
// in flight: tested between the GEMMs, the seconds counted as overlapped.
static void split_compute(nm_model *m, const block_acts *b, int64_t k, void (*run)(nm_model *, void *), void *ctx) {
    nm_ep_plan *P = m->ep.plans;
    int n = 0;
    if (k + 1 < b->ep_rounds) {
        m->ep.pending[n++] = &P[k + 1].dispatch[0];
        m->ep.pending[n++] = &P[k + 1].dispatch[1];
    }
    if (k > 0) m->ep.pending[n++] = &P[k - 1].combine;
    double t0 = nm_comm_clock();
    run(m, ctx);
    if (n > 0) m->ep.overlap_s += nm_comm_clock() - t0;
    for (int i = 0; i < 4; i++) m->ep.pending[i] = NULL;
}

typedef struct split_ctx {
    const nm_layer_offsets *w;
    block_acts *b;
    nm_ep_plan *p;
} split_ctx;

static void split_forward_part(nm_model *m, void *ctx) {
    split_ctx *c = ctx;
    int64_t base = c->p->base, D = m->cfg.D, Fe = m->cfg.Fe;
    nm_moe_experts_forward(m, c->w, c->p->round_offsets, c->b->x_loc + base * D, c->b->e_gate_up + base * 2 * Fe,
                           c->b->e_act + base * Fe, m->ep.d_x_loc + base * D);
    fp8_gate_up_keep(m, c->b, base, c->p->rows);
}

static void split_backward_part(nm_model *m, void *ctx) {
    split_ctx *c = ctx;
    int64_t base = c->p->base, D = m->cfg.D, Fe = m->cfg.Fe;
    nm_moe_experts_backward(m, c->w, c->p->round_offsets, c->b->x_loc + base * D, c->b->e_gate_up + base * 2 * Fe,
                            c->b->e_act + base * Fe, m->ep.d_e_out_loc + base * D, m->scratch.d_e_act,
                            m->scratch.d_e_gate_up, m->ep.d_x_loc + base * D);
}

// The pipeline over the parts. Forward: src = x_perm, the dispatch lands in x_loc (rounded, and
// kept in fp8 where the block keeps its rows so), the combine returns into e_out. Backward: src =
// d_e_out into d_e_out_loc, the combine returns d_x_loc into d_x_perm.
static void split_exchange(nm_model *m, const nm_layer_offsets *w, block_acts *b, int backward) {
    nm_ep_plan *P = m->ep.plans;
    const int64_t R = b->ep_rounds, D = m->cfg.D;
    const ep_payload what = backward ? EP_GRADIENTS : EP_ACTIVATIONS;
    const float *src = backward ? m->scratch.d_e_out : b->x_perm;
    float *dst = backward ? m->ep.d_e_out_loc : b->x_loc, *back = backward ? m->scratch.d_x_perm : b->e_out;
    plan_io(m, &P[0], 0);
    ep_dispatch_start(m, src, what, P[0].dispatch);
    split_overlap_work(m, &P[0].dispatch[0]);
    for (int64_t k = 0; k < R; k++) {
        plan_io(m, &P[k], 0);
        ep_dispatch_finish(m, dst, P[k].base, P[k].rows, what, P[k].dispatch);
        if (!backward) {
            nm_round_act(m, b->x_loc + P[k].base * D, P[k].rows * D);
            if (b->x_codes) ep_keep_fp8(m, b, P[k].base, P[k].rows);
        }
        if (k + 1 < R) {
            plan_io(m, &P[k + 1], 0);
            ep_dispatch_start(m, src, what, P[k + 1].dispatch);
            plan_io(m, &P[k], 0);
        }
        split_ctx c = {w, b, &P[k]};
        split_compute(m, b, k, backward ? split_backward_part : split_forward_part, &c);
        ep_combine_start(m, m->ep.d_x_loc, P[k].base, m->ep.buf2, back, &P[k].combine);
    }
    for (int64_t k = 0; k < R; k++) {
        plan_io(m, &P[k], 0);
        ep_combine_finish(m, back, &P[k].combine);
    }
}

// The routed experts of block b over the expert-parallel group, round by round.
static void ep_experts_forward(nm_model *m, const nm_layer_offsets *w, block_acts *b) {
    ep_exchange_counts(m, b);
    if (b->ep_split) {
        split_plans(m, b);
        split_exchange(m, w, b, 0);
        return;
    }
    for (int64_t k = 0; k < b->ep_rounds; k++) {
        int64_t rows = ep_round(m, b, k);
        // the experts' rank rounds what it received (bf16: values that crossed as bf16)
        ep_dispatch(m, b->x_perm, b->x_loc, rows, EP_ACTIVATIONS);
        nm_round_act(m, b->x_loc, rows * m->cfg.D);
        // saved in fp8: one round's rows are the backward's, kept as they crossed (with more
        // rounds the backward sends them again)
        if (b->x_codes && b->ep_rounds == 1) ep_keep_fp8(m, b, 0, rows);
        // the outputs of the round go back at once: the backward's d_x_loc holds them meanwhile
        nm_moe_experts_forward(m, w, m->ep.round_offsets, b->x_loc, b->e_gate_up, b->e_act, m->ep.d_x_loc);
        if (b->ep_rounds == 1) fp8_gate_up_keep(m, b, 0, rows);
        ep_combine(m, m->ep.d_x_loc, b->e_out);
    }
}

static void ep_experts_backward(nm_model *m, const nm_layer_offsets *w, block_acts *b) {
    if (b->ep_split) {  // every part's rows kept: fp8 saves them as codes, restored whole
        int64_t rows = split_plans(m, b);
        fp8_restore_saved(m, b, b->x_loc, rows);
        fp8_gate_up_backward(m, b, 0, rows, 1);
        split_exchange(m, w, b, 1);
        return;
    }
    // the rounds send x_perm again: saved in bf16, its fp32 buffer holds another block's rows
    // (fp8 widened it with the block's other copies, nm_bf16_restore_block)
    if (b->ep_rounds > 1) nm_bf16_restore(m, b->x_perm);
    for (int64_t k = 0; k < b->ep_rounds; k++) {
        int64_t rows = ep_round(m, b, k);
        if (b->ep_rounds > 1) {  // the forward's expert-side activations of this round are gone
            ep_dispatch(m, b->x_perm, b->x_loc, rows, EP_ACTIVATIONS);
            nm_round_act(m, b->x_loc, rows * m->cfg.D);
            nm_moe_experts_forward(m, w, m->ep.round_offsets, b->x_loc, b->e_gate_up, b->e_act, m->ep.d_x_loc);
        }
        if (b->ep_rounds == 1) fp8_restore_saved(m, b, b->x_loc, rows);  // saved in fp8: this block's rows
        fp8_gate_up_backward(m, b, 0, rows, b->ep_rounds == 1);
        ep_dispatch(m, m->scratch.d_e_out, m->ep.d_e_out_loc, rows, EP_GRADIENTS);
        nm_moe_experts_backward(m, w, m->ep.round_offsets, b->x_loc, b->e_gate_up, b->e_act, m->ep.d_e_out_loc,
                                m->scratch.d_e_act, m->scratch.d_e_gate_up, m->ep.d_x_loc);
        ep_combine(m, m->ep.d_x_loc, m->scratch.d_x_perm);
    }
}

// --- the MoE FFN ------------------------------------------------------------------------------

// The shared experts' work that can run while the expert exchange is in flight.
typedef struct shared_work {
    const nm_layer_offsets *w;
    block_acts *b;
    int64_t N;
} shared_work;

// Forward, first half: under sequence parallelism every token's f (the shared experts are
// column/row-parallel on every token), then gate_up and act. Reads f, writes its other ranks'
// rows, s_gate_up and s_act; the dispatch sends x_perm, gathered from this rank's rows before.
static void shared_forward_up(nm_model *m, void *ctx) {
    shared_work *s = ctx;
    if (m->tp.sp) nm_sp_all_gather(m, s->b->f, s->N, m->cfg.D, NM_DT_F32);
    nm_mlp_forward_up(m, s->b->s_gate_up, s->b->s_act, s->b->f, s->w->shared_gate_up, s->N, m->tp.Fs_loc);
}

// Backward: d_f (zeroed) gets the shared experts' part and their weights their gradients; each
// tp rank's columns gave part of d_f, summed over tp (reduce-scattered to its rows under
// sequence parallelism). Reads d_res (gathered whole under sequence parallelism: its own rows
// are unchanged), writes d_f, m->scratch.d_act and m->scratch.d_gate_up, none of which the exchange touches.
static void shared_backward(nm_model *m, void *ctx) {
    shared_work *s = ctx;
    const int64_t N = s->N, D = m->cfg.D;
    nm_sp_all_gather(m, m->scratch.d_res, N, D, NM_DT_F32);  // the shared experts saw every token
    nm_mlp_backward(m, m->scratch.d_f, 1.0f, m->scratch.d_res, s->b->s_gate_up, s->b->s_act, s->b->f,
                    s->w->shared_gate_up, s->w->shared_down, N, m->tp.Fs_loc);
    nm_tp_sum_parts(m, m->scratch.d_f, N, D);
}

static void no_work(nm_model *m, void *ctx) {
    (void)m;
    (void)ctx;
}

// Route, run each expert on its rows, combine with the gate weights, add the shared experts.
double nm_moe_forward(nm_model *m, int64_t l, int64_t B, int64_t T, int64_t *counts) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *P = m->params;
    block_acts *b = &m->act.blocks[l];
    int64_t N = B * T, D = c->D, E = c->E, K = c->K;
    // Sequence parallelism: router and routed experts on this rank's rows [s0, s0 + n0) (its
    // own tokens into the expert all-to-all); all rows without it.
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    const float *f = b->f + s0 * D;
    nm_router_params rp = router_params(c, n0);
    nm_linear_forward(m, (nm_linear_args){.W = P + w->router, .N = n0, .IC = D, .OC = E, .x = f,
                                          .y = b->router_logits + s0 * E});
    ops->router_forward(ops, b->topk_idx + s0 * K, b->topk_w + s0 * K, b->scores + s0 * E, b->router_logits + s0 * E,
                        P + w->router_bias, &rp);
    // the sequence-wise balance loss needs whole sequences: every rank's scores
    nm_sp_all_gather(m, b->scores, N, E, NM_DT_F32);
    double bal = ops->balance_loss_forward(ops, b->bal_f, b->scores, B, T, E, K);
    ops->moe_permute(ops, b->offsets, b->perm, b->topk_idx + s0 * K, n0, K, E);
    if (counts) {
        for (int64_t e = 0; e < E; e++) counts[e] += b->offsets[e + 1] - b->offsets[e];
    }
    shared_work sw = {w, b, N};
    ep_overlap up = {c->Fs > 0 ? shared_forward_up : no_work, &sw};
    if (m->ep.comm) {
        // bf16: rounded (with its bf16 copy) as the dispatch would round it anyway, so that the
        // backward's repeated dispatch finds it saved in bf16 (nm_bf16_restore); fp8: rounded
        // too, as without expert parallelism, before the dispatch quantises it
        nm_moe_gather(m, b->x_perm, f, b->perm, n0, K, D);
        ep_overlap_set(m, &up);  // the shared experts' first half inside the dispatch
        ep_experts_forward(m, w, b);
        ep_overlap_flush(m, &up);
    } else {
        up.work(m, up.ctx);
        nm_moe_gather(m, b->x_perm, f, b->perm, n0, K, D);  // bf16: rounded, with its twin
        // fp8: the rows and the outputs as they would have crossed the all-to-all (ep_dispatch)
        if (m->precision == NM_PRECISION_FP8) fp8_round_saved(m, b, b->x_perm, n0 * K);
        nm_moe_experts_forward(m, w, b->offsets, b->x_perm, b->e_gate_up, b->e_act, b->e_out);
        fp8_gate_up_keep(m, b, 0, n0 * K);
        if (m->precision == NM_PRECISION_FP8) ops->round_bf16(ops, b->e_out, b->e_out, n0 * K * D);
    }
    // x_out = x_mid + the routed experts + the shared experts, summed over tp. Under sequence
    // parallelism the routed experts ran on this rank's rows, which take the residual and
    // them, and the shared experts (row-parallel on every token) are reduce-scattered into
    // them. Without it every tp rank routed and ran the (whole) routed experts on the same
    // tokens: tp rank 0 alone adds them with the residual, the others their shared part,
    // and the all-reduce sums them.
    if (m->tp.sp) {
        ops->copy_2d(ops, b->x_out + s0 * D, D, b->x_mid + s0 * D, D, n0, D);
        ops->moe_combine_forward(ops, b->x_out + s0 * D, b->e_out, b->topk_w + s0 * K, b->perm, n0, K, D);
        if (c->Fs > 0) {  // the shared experts' second half, added after the routed ones as always
            ops->zero(ops, m->tp.partial, N * D);
            nm_mlp_forward_down(m, m->tp.partial, b->s_act, w->shared_down, N, m->tp.Fs_loc);
            nm_tp_sum_parts(m, m->tp.partial, N, D);
            ops->add_2d(ops, b->x_out + s0 * D, D, m->tp.partial + s0 * D, D, n0, D);
        }
        return bal;
    }
    nm_tp_row_output_begin(m, b->x_out, b->x_mid, N, D);
    if (nm_tp_lead(m)) ops->moe_combine_forward(ops, b->x_out, b->e_out, b->topk_w, b->perm, N, K, D);
    if (c->Fs > 0) nm_mlp_forward_down(m, b->x_out, b->s_act, w->shared_down, N, m->tp.Fs_loc);
    nm_tp_row_output_end(m, b->x_out, b->x_mid, N, D);
    return bal;
}

void nm_moe_backward(nm_model *m, int64_t l, float aux_seed) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *P = m->params;
    block_acts *b = &m->act.blocks[l];
    int64_t B = b->B, T = b->T, N = B * T, D = c->D, E = c->E, K = c->K;
    float *d_res = m->scratch.d_res;
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    const float *f = b->f + s0 * D;
    nm_router_params rp = router_params(c, n0);
    ops->zero(ops, m->scratch.d_f, N * D);
    // x_out += sum_k w_k * e_out[row(n,k)] (reads this rank's rows of d_res only)
    ops->moe_combine_backward(ops, m->scratch.d_e_out, m->scratch.d_topk_w, d_res + s0 * D, b->e_out,
                              b->topk_w + s0 * K, b->perm, n0, K, D);
    // The shared experts' backward (into d_f first, the routed part added below), inside the
    // exchange's first all-to-all with moe_shared_expert_overlap.
    shared_work sw = {w, b, N};
    ep_overlap back = {c->Fs > 0 ? shared_backward : no_work, &sw};
    if (m->ep.comm) {
        ep_overlap_set(m, &back);
        ep_experts_backward(m, w, b);
        ep_overlap_flush(m, &back);
    } else {
        back.work(m, back.ctx);
        // fp8: the gradients as they would have crossed the all-to-all, both ways (ep_dispatch)
        if (m->precision == NM_PRECISION_FP8) ops->round_bf16(ops, m->scratch.d_e_out, m->scratch.d_e_out, n0 * K * D);
        fp8_restore_saved(m, b, b->x_perm, n0 * K);  // saved in fp8: this block's rows again
        fp8_gate_up_backward(m, b, 0, n0 * K, 1);
        nm_moe_experts_backward(m, w, b->offsets, b->x_perm, b->e_gate_up, b->e_act, m->scratch.d_e_out,
                                m->scratch.d_e_act, m->scratch.d_e_gate_up, m->scratch.d_x_perm);
        if (m->precision == NM_PRECISION_FP8)
            ops->round_bf16(ops, m->scratch.d_x_perm, m->scratch.d_x_perm, n0 * K * D);
    }
    // x_perm = gather(f)
    ops->moe_scatter_add(ops, m->scratch.d_f + s0 * D, m->scratch.d_x_perm, b->perm, n0, K, D);
    // gate weights <- scores <- router logits = f . W_router^T (bias: selection only, no gradient)
    ops->router_backward(ops, m->scratch.d_router + s0 * E, m->scratch.d_topk_w, b->scores + s0 * E,
                         b->topk_idx + s0 * K, &rp);
    if (aux_seed != 0.0f) {
        // every token's (the scores were gathered); this rank uses its rows
        ops->balance_loss_backward(ops, m->scratch.d_router, aux_seed, b->bal_f, b->scores, B, T, E, K, c->scoring);
    }
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w->router, .N = n0, .IC = D, .OC = E, .x = f,
                                                  .dy = m->scratch.d_router + s0 * E});
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w->router, .N = n0, .IC = D, .OC = E,
                                                 .dy = m->scratch.d_router + s0 * E, .dx = m->scratch.d_f + s0 * D,
                                                 .beta = 1.0f});
}
