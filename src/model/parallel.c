// parallel.c: tensor and sequence parallelism as the blocks use it (model_state.h): the
// all-reduce over the tp group, the vocabulary-parallel embedding, and the sequence-parallel
// row split with its all-gather and reduce-scatter, and the model's failure latch. A failed
// collective is latched in the model and reported when the forward or backward returns.
#include "model/model_state.h"

void nm_model_latch(nm_model *m, nm_model_fault kind, const nm_error *e) {
    if (m->latch.kind != NM_FAULT_NONE) return;
    m->latch.kind = kind;
    m->latch.err = *e;
}

int nm_model_report_fault(nm_model *m, const char *pass, nm_error *err) {
    static const char *const what[] = {"", "tensor-parallel collective", "expert-parallel exchange", "layer hook"};
    if (m->latch.kind == NM_FAULT_NONE) return 0;
    *err = m->latch.err;
    nm_model_fault kind = m->latch.kind;
    m->latch.kind = NM_FAULT_NONE;
    return nm_error_prefix(err, "%s: %s", pass, what[kind]);
}

void nm_tp_all_reduce(nm_model *m, float *buf, int64_t n) {
    if (!m->tp.comm || nm_model_faulted(m)) return;
    nm_error e;
    if (nm_comm_all_reduce(m->tp.comm, buf, n, NM_DT_F32, NM_RED_SUM, &e) != 0) nm_model_latch(m, NM_FAULT_TP, &e);
}

// Token ids relative to this rank's vocabulary rows, -1 for rows held elsewhere.
static const int32_t *tp_local_ids(nm_model *m, const int32_t *tokens, int64_t N) {
    if (!m->tp.comm) return tokens;
    for (int64_t i = 0; i < N; i++) {
        int64_t id = (int64_t)tokens[i] - m->tp.v_start;
        m->tp.ids[i] = id >= 0 && id < m->tp.V_valid ? (int32_t)id : -1;
    }
    return m->tp.ids;
}

void nm_tp_embedding_forward(nm_model *m, float *out, const int32_t *tokens, int64_t N) {
    int64_t D = m->cfg.D;
    m->ops->embedding_forward(m->ops, out, tp_local_ids(m, tokens, N), m->params + m->table.embed, N, D);
    // sequence parallelism: each rank keeps the summed rows of its own tokens (Megatron's
    // reduce-scatter into the sequence-parallel region)
    nm_tp_sum_parts(m, out, N, D);
}

void nm_sp_rows(const nm_model *m, int64_t N, int64_t *start, int64_t *n) {
    if (!m->tp.sp) {
        *start = 0, *n = N;
        return;
    }
    int64_t P = m->tp.comm->size, q = m->tp.comm->rank;
    *start = q * N / P;
    *n = (q + 1) * N / P - *start;
}

static void sp_counts(nm_model *m, int64_t N, int64_t width) {
    int64_t P = m->tp.comm->size;
    for (int64_t q = 0; q < P; q++) m->tp.sp_counts[q] = ((q + 1) * N / P - q * N / P) * width;
}

void nm_sp_all_gather(nm_model *m, void *buf, int64_t N, int64_t width, nm_comm_dtype dt) {
    if (!m->tp.sp || nm_model_faulted(m)) return;
    sp_counts(m, N, width);
    nm_error e;
    if (nm_comm_all_gather(m->tp.comm, buf, m->tp.sp_counts, dt, &e) != 0) nm_model_latch(m, NM_FAULT_TP, &e);
}

void nm_sp_reduce_scatter(nm_model *m, float *buf, int64_t N, int64_t width) {
    if (!m->tp.sp || nm_model_faulted(m)) return;
    sp_counts(m, N, width);
    nm_error e;
    if (nm_comm_reduce_scatter(m->tp.comm, buf, m->tp.sp_counts, NM_DT_F32, &e) != 0)
        nm_model_latch(m, NM_FAULT_TP, &e);
}

void nm_tp_sum_parts(nm_model *m, float *buf, int64_t N, int64_t D) {
    if (m->tp.sp) nm_sp_reduce_scatter(m, buf, N, D);
    else nm_tp_all_reduce(m, buf, N * D);
}

void nm_tp_row_output_begin(nm_model *m, float *out, const float *residual, int64_t N, int64_t D) {
    if (!m->tp.sp && nm_tp_lead(m)) m->ops->copy_2d(m->ops, out, N * D, residual, N * D, 1, N * D);
    else m->ops->zero(m->ops, out, N * D);
}

void nm_tp_row_output_end(nm_model *m, float *out, const float *residual, int64_t N, int64_t D) {
    nm_tp_sum_parts(m, out, N, D);
    if (!m->tp.sp) return;
    int64_t s0, n0;
    nm_sp_rows(m, N, &s0, &n0);
    m->ops->add_2d(m->ops, out + s0 * D, D, residual + s0 * D, D, n0, D);
}

void nm_tp_embedding_backward(nm_model *m, const float *dout, const int32_t *tokens, int64_t N) {
    m->ops->embedding_backward(m->ops, m->grads + m->table.embed, dout, tp_local_ids(m, tokens, N), N, m->cfg.D);
}

void nm_ep_progress_partner(const nm_model *m) {
    nm_model *p = m->ep.partner;
    if (!p || !p->ep.in_flight || nm_model_faulted(p)) return;
    int done = 0;
    nm_error e;
    if (nm_comm_test(p->ep.in_flight, &done, &e) != 0) nm_model_latch(p, NM_FAULT_EP, &e);
}

void nm_ep_progress(nm_model *m) {
    if (nm_model_faulted(m)) return;
    int done = 0;
    nm_error e;
    if (m->ep.in_flight && nm_comm_test(m->ep.in_flight, &done, &e) != 0) nm_model_latch(m, NM_FAULT_EP, &e);
    for (int i = 0; i < 4 && !nm_model_faulted(m); i++)
        if (m->ep.pending[i] && nm_comm_test(m->ep.pending[i], &done, &e) != 0) nm_model_latch(m, NM_FAULT_EP, &e);
}
