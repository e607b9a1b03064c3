// blocks.h: the blocks of the decoder (mla.c, mlp.c, moe.c, head.c, mtp.c), above the state
// (model_state.h) and below the composition (model.c). Not a public header.
#pragma once

#include "model/model_state.h"

// --- attention half of a decoder block (mla.c, dsv3-spec 3.2) ---------------------------------

// b->x_mid = b->x_in + MLA(RMSNorm(b->x_in)) for block l over (B, T); saves what the backward reads.
void nm_mla_forward(nm_model *m, int64_t l, int64_t B, int64_t T);
// On entry m->scratch.d_res holds dLoss/d(x_mid); on exit dLoss/d(x_in). Weight grads +=.
void nm_mla_backward(nm_model *m, int64_t l);

// --- dense SwiGLU MLP (mlp.c, dsv3-spec 3.3) --------------------------------------------------

// out(N, D) += swiglu(f . W_gate_up^T) . W_down^T with W_gate_up (2F, D) at params + gate_up,
// W_down (D, F) at params + down; gate_up (N, 2F) and act (N, F) are saved for the backward.
void nm_mlp_forward(nm_model *m, float *out, float *gate_up, float *act, const float *f, size_t w_gate_up,
                    size_t w_down, int64_t N, int64_t F);
// Its two halves (the MoE block runs the shared experts' first half while the expert
// all-to-all is in flight): gate_up and act, then out +=.
void nm_mlp_forward_up(nm_model *m, float *gate_up, float *act, const float *f, size_t w_gate_up, int64_t N,
                       int64_t F);
void nm_mlp_forward_down(nm_model *m, float *out, const float *act, size_t w_down, int64_t N, int64_t F);
// From d_out (N, D) to d_f (N, D) (= or += by beta) and the two weight grads (+=); uses the
// shared scratch m->scratch.d_act, m->scratch.d_gate_up.
void nm_mlp_backward(nm_model *m, float *d_f, float beta, const float *d_out, const float *gate_up, const float *act,
                     const float *f, size_t w_gate_up, size_t w_down, int64_t N, int64_t F);

// --- mixture of experts (moe.c, dsv3-spec 5, 6.2) ---------------------------------------------

// b->x_out += MoE(b->f) for block l over (B, T). Returns the block's balance loss and adds its
// expert counts to counts (E, may be NULL).
double nm_moe_forward(nm_model *m, int64_t l, int64_t B, int64_t T, int64_t *counts);
// From d_out = m->scratch.d_res (dLoss/d(x_out)) to m->scratch.d_f (=); aux_seed is dLoss/d(balance loss).
void nm_moe_backward(nm_model *m, int64_t l, float aux_seed);
// The routed experts on rows already gathered into expert order: expert e owns rows
// [offsets[e], offsets[e+1]) of x (rows, D); out (rows, D) (=). gate_up (rows, 2Fe) and act
// (rows, Fe) are saved for the backward. w: the layer whose experts run. In bf16, x arrives
// rounded (nm_moe_gather or nm_round_act) and act is rounded where SwiGLU writes it (they feed
// only the expert GEMMs).
void nm_moe_experts_forward(nm_model *m, const nm_layer_offsets *w, const int32_t *offsets, float *x,
                            float *gate_up, float *act, float *out);
// Backward of nm_moe_experts_forward: d_x (=) from d_out, experts' weight grads (+=); d_act and
// d_gate_up are scratch of the same shapes as act and gate_up. In bf16, d_out is rounded in place.
// Under selective recomputation of "moe_act" act is rewritten from gate_up first.
void nm_moe_experts_backward(nm_model *m, const nm_layer_offsets *w, const int32_t *offsets, const float *x,
                             const float *gate_up, float *act, float *d_out, float *d_act,
                             float *d_gate_up, float *d_x);

// --- output head + cross-entropy (head.c, dsv3-spec 11) ---------------------------------------

// h's type as for nm_linear_forward: the main head's h0 stays fp32 (MTP depth 1's RMSNorm reads
// it), an MTP head's g is rounded by its caller. The backward rounds d logits in place.
void nm_head_forward(nm_model *m, float *losses, float *lse, float *logits, const float *h, nm_dtype h_t,
                     const int32_t *targets, int64_t N, float *logits_out);
void nm_head_backward(nm_model *m, float *dh, float beta, float *logits, const float *lse, const float *h,
                      nm_dtype h_t, const int32_t *targets, float scale, int64_t N);
double nm_head_sum_losses(const nm_model *m, const float *losses, int64_t n);

// --- one multi-token-prediction depth (mtp.c, dsv3-spec 6.3, 11) ------------------------------
// Split around the depth's decoder block, which the composition (model.c) runs in between:
//   input_forward -> block L+k-1 -> output_forward ; output_backward -> block -> input_backward

// Depth k (1..M) of tokens (B, T): builds block L+k-1's input x_in from h^{k-1} and the tokens
// shifted by k (embedding, enorm, hnorm, eh_proj).
void nm_mtp_input_forward(nm_model *m, int64_t k, const int32_t *tokens, int64_t B, int64_t T);
// Shared head norm + head on block L+k-1's output; returns the depth's summed token losses.
double nm_mtp_output_forward(nm_model *m, int64_t k, int64_t B, int64_t T);
// Head and head norm backward of depth k with loss scale `scale`; leaves dLoss/d(h^k) in m->scratch.d_res.
void nm_mtp_output_backward(nm_model *m, int64_t k, int64_t B, int64_t T, float scale);
// From m->scratch.d_res = dLoss/d(x_in of block L+k-1) through eh_proj, the norms and the embedding;
// the h^{k-1} part is added to m->scratch.d_h0 (k == 1) or the previous depth's dh.
void nm_mtp_input_backward(nm_model *m, int64_t k, int64_t B, int64_t T);
