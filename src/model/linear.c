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

// out(N, OC) (= or += by beta) inp(N, IC) . W(OC, IC)^T, with leading dimensions.
void nm_linear_forward(const nm_model *m, float *out, int64_t ld_out, const float *inp, nm_dtype inp_t,
                       int64_t ld_inp, const float *W, int64_t ldw, int64_t N, int64_t IC, int64_t OC, float beta) {
    size_t off = (size_t)(W - m->params);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16: {
        const void *a = nm_bf16_operand(m, inp, &inp_t, N, IC, ld_inp);
        m->ops->gemm_bf16(NM_NO_TRANS, NM_TRANS, N, OC, IC, 1.0f, a, inp_t, ld_inp, nm_weight_bf16(m, off),
                          m->bf16.weights_type, ldw, beta, out, ld_out);
        break;
    }
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(NM_NO_TRANS, NM_TRANS, N, OC, IC, 1.0f, inp, ld_inp, W, ldw, NM_FP8_WEIGHT, beta, out, ld_out);
        break;
    default:
        m->ops->gemm(NM_NO_TRANS, NM_TRANS, N, OC, IC, 1.0f, inp, ld_inp, W, ldw, beta, out, ld_out);
    }
}

// dinp(N, IC) (= or += by beta) dout(N, OC) . W(OC, IC)      (Dgrad)
void nm_linear_backward_input(const nm_model *m, float *dinp, int64_t ld_dinp, const float *dout, nm_dtype dout_t,
                              int64_t ld_dout, const float *W, int64_t ldw, int64_t N, int64_t IC, int64_t OC,
                              float beta) {
    size_t off = (size_t)(W - m->params);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16: {
        const void *a = nm_bf16_operand(m, dout, &dout_t, N, OC, ld_dout);
        m->ops->gemm_bf16(NM_NO_TRANS, NM_NO_TRANS, N, IC, OC, 1.0f, a, dout_t, ld_dout, nm_weight_bf16(m, off),
                          m->bf16.weights_type, ldw, beta, dinp, ld_dinp);
        break;
    }
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(NM_NO_TRANS, NM_NO_TRANS, N, IC, OC, 1.0f, dout, ld_dout, W, ldw, NM_FP8_WEIGHT, beta, dinp,
                         ld_dinp);
        break;
    default:
        m->ops->gemm(NM_NO_TRANS, NM_NO_TRANS, N, IC, OC, 1.0f, dout, ld_dout, W, ldw, beta, dinp, ld_dinp);
    }
}

// dW(OC, IC) += dout(N, OC)^T . inp(N, IC)      (Wgrad: both operands are activations)
void nm_linear_backward_weight(const nm_model *m, float *dW, int64_t ldw, const float *dout, nm_dtype dout_t,
                               int64_t ld_dout, const float *inp, nm_dtype inp_t, int64_t ld_inp, int64_t N,
                               int64_t IC, int64_t OC) {
    size_t off = (size_t)(dW - m->grads);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16: {
        const void *a = nm_bf16_operand(m, dout, &dout_t, N, OC, ld_dout);
        const void *b = nm_bf16_operand(m, inp, &inp_t, N, IC, ld_inp);
        m->ops->gemm_bf16(NM_TRANS, NM_NO_TRANS, OC, IC, N, 1.0f, a, dout_t, ld_dout, b, inp_t, ld_inp, 1.0f, dW, ldw);
        break;
    }
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(NM_TRANS, NM_NO_TRANS, OC, IC, N, 1.0f, dout, ld_dout, inp, ld_inp, NM_FP8_ACTIVATION, 1.0f,
                         dW, ldw);
        break;
    default:
        m->ops->gemm(NM_TRANS, NM_NO_TRANS, OC, IC, N, 1.0f, dout, ld_dout, inp, ld_inp, 1.0f, dW, ldw);
    }
}
