// flops.h: parameter and FLOP counts per token, shared by `inspect` and the trainer's MFU so
// that both always agree (one definition).
//
// Conventions (stated once, here):
//  - "active" parameters per token: the main model (MTP blocks excluded) minus the routed
//    experts a token does not select (E - K of them per MoE layer) and minus the embedding
//    table (a row lookup, not compute). lm_head, norms, router weight and router bias are
//    counted. This is DeepSeek's own convention: README_WEIGHTS.md gives "Activation
//    parameters: 36.6B (including 0.9B for the output Head)" for the main model, which the
//    report rounds to "37B activated"; this function gives 36.63B for V3. (Counting the
//    embedding too would give 37.55B.) With tied embeddings the shared matrix is counted
//    once, as the head.
//  - training FLOPs per token = 6 x (matmul weights a token passes through) + attention
//    scores/values. Matmul weights: every 2-D weight of the main model and of the MTP blocks
//    except the embedding (a lookup, not a GEMM), with K of E routed experts, the router
//    matrix included, and the output head counted once per head use (main + each MTP
//    depth). Attention (causal, fwd + bwd = 3 x fwd, 2 FLOPs per multiply-add): a query at
//    position t attends to t keys, T/2 on average, with Dqk MACs for QK^T and Dv for PV per
//    head:  6 * H * (Dqk + Dv) * T/2  per token per layer, for all L + M layers.
#pragma once

#include <stdint.h>

#include "model/config.h"
#include "ops/ops.h"

// Active parameters per token of the main model (convention above).
int64_t nm_model_params_active(const nm_model_config *cfg);

// Matmul weights one token passes through in training: main model + MTP blocks + every head
// use, embedding excluded, K of E routed experts (convention above).
int64_t nm_model_matmul_params_active(const nm_model_config *cfg);

// Forward + backward training FLOPs per token at sequence length T (convention above).
double nm_model_flops_per_token(const nm_model_config *cfg, int64_t T);
// Its parts, for a pipeline stage's share: decoder or MTP block l (an MTP block with its
// eh_proj), and one use of the output head (the main model's, and one per MTP depth). The
// blocks and 1 + M head uses add up to nm_model_flops_per_token.
double nm_model_layer_flops_per_token(const nm_model_config *cfg, int64_t l, int64_t T);
double nm_model_head_flops_per_token(const nm_model_config *cfg);

// The GEMM calls of one training step as the model makes them, for a backend's kernel tuning
// (ops.h: tune), into shapes (at most max; returns how many): for every weight (out, in)
// (attention projections, the dense MLP's fused [gate; up] and down, the shared experts, the
// head) the forward NT GEMM (rows, out, in), the input gradient NN (rows, in, out) and the
// weight gradient TN (out, in, rows), each counted as often as layers have it; the routed
// experts as the grouped calls moe.c makes (one per layer, E groups at the mean row count
// tokens * K / E, at most rows). rows: the GEMMs' token dimension (a tuner may pass fewer than
// a micro-batch has, to time quickly); tokens: the micro-batch's, for the experts' mean load.
#define NM_MODEL_MAX_GEMM_SHAPES 64
int nm_model_gemm_shapes(const nm_model_config *cfg, int64_t rows, int64_t tokens, nm_gemm_shape *shapes, int max);
