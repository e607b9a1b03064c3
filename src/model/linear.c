// linear.c: the model's linear layer, y = x W^T with PyTorch [out, in] weights, forward and
// both backward GEMMs, each dispatched to the fp32, bf16 or fp8 GEMM by the weight's precision
// (dsv3-spec 6.5, 9.10). Every block calls these; they call only the ops table. A bf16 GEMM's
// rounded activation operand is read from its bf16 twin where it has one (bf16_twin.c).
#include "model/model_state.h"

// The precision a weight's GEMMs run in. The router always stays fp32 (dsv3-spec 9.10); in
// the fp8 recipe the output head stays bf16 (dsv3-spec 6.5: embedding, head, gating, norms
// and attention are kept out of FP8).
static nm_precision weight_precision(const nm_model *m, size_t off) {
    if (m->precision == NM_PRECISION_FP32) return NM_PRECISION_FP32;
    for (int i = 0; i < m->routing.n_moe; i++) {
        if (off == m->table.layers[m->routing.layer_ids[i]].router) return NM_PRECISION_FP32;
    }
    // the head's rows [lm_head, lm_head + V*D): vocabulary tiles pass slices of it
    if (m->precision == NM_PRECISION_FP8 && off >= m->table.lm_head &&
        off < m->table.lm_head + (size_t)m->tp.V_loc * (size_t)m->cfg.D)
        return NM_PRECISION_BF16;
    return m->precision;
}

// The defaults of a call (model_state.h): a row stride of 0 is the matrix's width.
static nm_linear_args with_defaults(nm_linear_args a) {
    if (!a.ldw) a.ldw = a.IC;
    if (!a.ld_x) a.ld_x = a.IC;
    if (!a.ld_dx) a.ld_dx = a.IC;
    if (!a.ld_y) a.ld_y = a.OC;
    if (!a.ld_dy) a.ld_dy = a.OC;
    return a;
}

void nm_linear_forward(const nm_model *m, nm_linear_args a) {
    nm_ep_progress_partner(m);
    a = with_defaults(a);
    size_t off = (size_t)(a.W - m->params);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16: {
        nm_dtype x_type = a.x_type;
        const void *x = nm_bf16_operand(m, a.x, &x_type, a.N, a.IC, a.ld_x);
        m->ops->gemm_bf16(m->ops, NM_NO_TRANS, NM_TRANS, a.N, a.OC, a.IC, 1.0f, x, x_type, a.ld_x,
                          nm_weight_bf16(m, off), m->bf16.weights_type, a.ldw, a.beta, a.y, a.ld_y);
        break;
    }
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(m->ops, NM_NO_TRANS, NM_TRANS, a.N, a.OC, a.IC, 1.0f, a.x, a.ld_x, a.W, a.ldw, NM_FP8_WEIGHT,
                         a.beta, a.y, a.ld_y);
        break;
    default:
        m->ops->gemm(m->ops, NM_NO_TRANS, NM_TRANS, a.N, a.OC, a.IC, 1.0f, a.x, a.ld_x, a.W, a.ldw, a.beta, a.y,
                     a.ld_y);
    }
}

void nm_linear_backward_input(const nm_model *m, nm_linear_args a) {
    nm_ep_progress_partner(m);
    a = with_defaults(a);
    size_t off = (size_t)(a.W - m->params);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16: {
        nm_dtype dy_type = a.dy_type;
        const void *dy = nm_bf16_operand(m, a.dy, &dy_type, a.N, a.OC, a.ld_dy);
        m->ops->gemm_bf16(m->ops, NM_NO_TRANS, NM_NO_TRANS, a.N, a.IC, a.OC, 1.0f, dy, dy_type, a.ld_dy,
                          nm_weight_bf16(m, off), m->bf16.weights_type, a.ldw, a.beta, a.dx, a.ld_dx);
        break;
    }
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(m->ops, NM_NO_TRANS, NM_NO_TRANS, a.N, a.IC, a.OC, 1.0f, a.dy, a.ld_dy, a.W, a.ldw,
                         NM_FP8_WEIGHT, a.beta, a.dx, a.ld_dx);
        break;
    default:
        m->ops->gemm(m->ops, NM_NO_TRANS, NM_NO_TRANS, a.N, a.IC, a.OC, 1.0f, a.dy, a.ld_dy, a.W, a.ldw, a.beta, a.dx,
                     a.ld_dx);
    }
}

void nm_linear_backward_weight(const nm_model *m, nm_linear_args a) {
    nm_ep_progress_partner(m);
    a = with_defaults(a);
    size_t off = (size_t)(a.W - m->params);
    float *dW = m->grads + off;
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16: {
        nm_dtype dy_type = a.dy_type, x_type = a.x_type;
        const void *dy = nm_bf16_operand(m, a.dy, &dy_type, a.N, a.OC, a.ld_dy);
        const void *x = nm_bf16_operand(m, a.x, &x_type, a.N, a.IC, a.ld_x);
        m->ops->gemm_bf16(m->ops, NM_TRANS, NM_NO_TRANS, a.OC, a.IC, a.N, 1.0f, dy, dy_type, a.ld_dy, x, x_type, a.ld_x,
                          1.0f, dW, a.ldw);
        break;
    }
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(m->ops, NM_TRANS, NM_NO_TRANS, a.OC, a.IC, a.N, 1.0f, a.dy, a.ld_dy, a.x, a.ld_x,
                         NM_FP8_ACTIVATION, 1.0f, dW, a.ldw);
        break;
    default:
        m->ops->gemm(m->ops, NM_TRANS, NM_NO_TRANS, a.OC, a.IC, a.N, 1.0f, a.dy, a.ld_dy, a.x, a.ld_x, 1.0f, dW, a.ldw);
    }
}
