// mlp.c: the SwiGLU MLP (dsv3-spec 3.3), forward and backward: the dense FFN of the first
// first_k_dense_replace blocks and, with their own weights, the shared experts of a MoE block.
#include "model/blocks.h"

void nm_mlp_forward_up(nm_model *m, float *gate_up, float *act, const float *f, size_t w_gate_up, int64_t N,
                       int64_t F) {
    int64_t D = m->cfg.D;
    nm_linear_forward(m, gate_up, 2 * F, f, NM_F32, D, m->params + w_gate_up, D, N, D, 2 * F, 0.0f);
    nm_ep_progress(m);
    nm_swiglu_forward(m, act, gate_up, N, F);  // bf16: rounded, as only bf16 GEMMs read act
}

void nm_mlp_forward_down(nm_model *m, float *out, const float *act, size_t w_down, int64_t N, int64_t F) {
    int64_t D = m->cfg.D;
    nm_linear_forward(m, out, D, act, nm_act_type(m), F, m->params + w_down, F, N, F, D, 1.0f);
}

void nm_mlp_forward(nm_model *m, float *out, float *gate_up, float *act, const float *f, size_t w_gate_up,
                    size_t w_down, int64_t N, int64_t F) {
    nm_mlp_forward_up(m, gate_up, act, f, w_gate_up, N, F);
    nm_mlp_forward_down(m, out, act, w_down, N, F);
}

void nm_mlp_backward(nm_model *m, float *d_f, float beta, const float *d_out, const float *gate_up, const float *act,
                     const float *f, size_t w_gate_up, size_t w_down, int64_t N, int64_t F) {
    const float *P = m->params;
    float *G = m->grads;
    int64_t D = m->cfg.D;
    // out += act . W_down^T ; act = swiglu(gate_up) ; gate_up = f . W_gate_up^T
    // (nm_ep_progress: an expert all-to-all may be in flight behind the shared experts)
    nm_linear_backward_input(m, m->scratch.d_act, F, d_out, NM_F32, D, P + w_down, F, N, F, D, 0.0f);
    nm_ep_progress(m);
    nm_linear_backward_weight(m, G + w_down, F, d_out, NM_F32, D, act, nm_act_type(m), F, N, F, D);
    nm_ep_progress(m);
    nm_swiglu_backward(m, m->scratch.d_gate_up, m->scratch.d_act, gate_up, N, F);
    nm_linear_backward_weight(m, G + w_gate_up, D, m->scratch.d_gate_up, nm_act_type(m), 2 * F, f, NM_F32, D, N, D,
                              2 * F);
    nm_ep_progress(m);
    nm_linear_backward_input(m, d_f, D, m->scratch.d_gate_up, nm_act_type(m), 2 * F, P + w_gate_up, D, N, D, 2 * F,
                             beta);
}
