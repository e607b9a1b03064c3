// mlp.c: the SwiGLU MLP (dsv3-spec 3.3), forward and backward: the dense FFN of the first
// first_k_dense_replace blocks and, with their own weights, the shared experts of a MoE block.
#include "model/blocks.h"

void nm_mlp_forward_up(nm_model *m, float *gate_up, float *act, const float *f, size_t w_gate_up, int64_t N,
                       int64_t F) {
    int64_t D = m->cfg.D;
    nm_linear_forward(m, (nm_linear_args){.W = m->params + w_gate_up, .N = N, .IC = D, .OC = 2 * F, .x = f,
                                          .y = gate_up});
    nm_ep_progress(m);
    nm_swiglu_forward(m, act, gate_up, N, F);  // bf16: rounded, as only bf16 GEMMs read act
}

void nm_mlp_forward_down(nm_model *m, float *out, const float *act, size_t w_down, int64_t N, int64_t F) {
    int64_t D = m->cfg.D;
    nm_linear_forward(m, (nm_linear_args){.W = m->params + w_down, .N = N, .IC = F, .OC = D, .x = act,
                                          .x_type = nm_act_type(m), .y = out, .beta = 1.0f});
}

void nm_mlp_forward(nm_model *m, float *out, float *gate_up, float *act, const float *f, size_t w_gate_up,
                    size_t w_down, int64_t N, int64_t F) {
    nm_mlp_forward_up(m, gate_up, act, f, w_gate_up, N, F);
    nm_mlp_forward_down(m, out, act, w_down, N, F);
}

void nm_mlp_backward(nm_model *m, float *d_f, float beta, const float *d_out, const float *gate_up, const float *act,
                     const float *f, size_t w_gate_up, size_t w_down, int64_t N, int64_t F) {
    const float *P = m->params;
    int64_t D = m->cfg.D;
    // out += act . W_down^T ; act = swiglu(gate_up) ; gate_up = f . W_gate_up^T
    // (nm_ep_progress: an expert all-to-all may be in flight behind the shared experts)
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w_down, .N = N, .IC = F, .OC = D, .dy = d_out,
                                                 .dx = m->scratch.d_act});
    nm_ep_progress(m);
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w_down, .N = N, .IC = F, .OC = D, .x = act,
                                                  .x_type = nm_act_type(m), .dy = d_out});
    nm_ep_progress(m);
    nm_swiglu_backward(m, m->scratch.d_gate_up, m->scratch.d_act, gate_up, N, F);
    nm_linear_backward_weight(m, (nm_linear_args){.W = P + w_gate_up, .N = N, .IC = D, .OC = 2 * F, .x = f,
                                                  .dy = m->scratch.d_gate_up, .dy_type = nm_act_type(m)});
    nm_ep_progress(m);
    nm_linear_backward_input(m, (nm_linear_args){.W = P + w_gate_up, .N = N, .IC = D, .OC = 2 * F,
                                                 .dy = m->scratch.d_gate_up, .dy_type = nm_act_type(m), .dx = d_f,
                                                 .beta = beta});
}
