// pipeline.h: pipeline parallelism (docs/parallelism.md): which layers each stage holds, and
// the 1F1B schedule over one global batch's micro-batches.
//
// Stages. The decoder layers are split over the PP stages evenly, or as the training-config
// key `pipeline_model_parallel_layout` places them, in Megatron-Core's string form:
// "Et|tt|tt|tmL" is E (embedding) and a decoder layer on stage 0, two layers on stages 1
// and 2, one layer, the MTP layer and the loss on stage 3. 'X*n' repeats a symbol. The first
// stage holds the embedding, the last the final norm, head, MTP layers and losses.
//
// Schedule (Megatron-Core's forward_backward_pipelining_without_interleaving): stage s of PP
// runs min(PP - s - 1, m) warm-up forwards, then one forward and one backward at a time, then
// the remaining backwards. Activations (micro, T, D) go to the next stage, their gradients
// back to the previous one, with the communicator's blocking send/recv; tag 2i is micro-batch
// i's activation, 2i + 1 its gradient. Where a step sends to and receives from the same
// neighbour, the lower stage of the pair sends first and the higher one receives first, so
// the two blocking calls of each pair meet in the same order on both sides (no deadlock
// whatever the MPI eager limit). At most min(PP - s, m) micro-batches are in flight at stage
// s: the model holds that many activation sets (nm_model_options.act_slots).
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "comm/comm.h"
#include "model/model.h"

// The stage layout for pp stages: layout NULL or "" splits the L decoder layers evenly (L
// divisible by pp). Fills stages (pp). A bad layout is an error naming the key and value.
int nm_pipeline_layout(nm_model_stage *stages, int64_t pp, const char *layout, const nm_model_config *cfg,
                       nm_error *err);
// "E t t | t t m L" style description of stage s, for the banner.
void nm_pipeline_describe_stage(const nm_model_stage *s, const nm_model_config *cfg, char *buf, size_t cap);
// Activation sets stage `stage` of pp needs for m micro-batches under 1F1B.
int64_t nm_pipeline_slots(int64_t pp, int64_t stage, int64_t m);

// Called by the schedule around micro-batch i's forward and backward (may be NULL).
typedef struct nm_pipeline_hooks {
    int (*after_forward)(void *ctx, int64_t micro, const nm_loss_terms *lt, nm_error *err);
    int (*before_backward)(void *ctx, int64_t micro, nm_error *err);
    void *ctx;
} nm_pipeline_hooks;

// Where one step's time went on this stage.
typedef struct nm_pipeline_times {
    double total;               // the whole schedule
    double forward, backward;   // compute
    double comm;                // inside send/recv: waiting on a neighbour (the bubble) plus copying
} nm_pipeline_times;

typedef struct nm_pipeline {
    nm_comm *pp;                // borrowed: rank = stage
    nm_model *model;            // borrowed, created with this stage and nm_pipeline_slots slots
    int64_t B, T, D;
    float *recv_act;            // (B, T, D) the previous stage's output
    float *recv_grad;           // (B, T, D) the next stage's gradient
} nm_pipeline;

int nm_pipeline_create(nm_pipeline **out, nm_comm *pp, nm_model *model, int64_t B, int64_t T, nm_error *err);
void nm_pipeline_destroy(nm_pipeline *p);

// One global batch's m micro-batches through forward and backward under 1F1B: tokens holds
// micro-batch i at tokens + i * B * T (every stage reads the same ones). Gradients accumulate
// into the model's grads.
int nm_pipeline_train(nm_pipeline *p, const int32_t *tokens, int64_t m, const nm_loss_options *opt,
                      const nm_pipeline_hooks *hooks, nm_pipeline_times *times, nm_error *err);
// Forward only of one micro-batch through all stages (validation): loss on the last stage.
int nm_pipeline_forward(nm_pipeline *p, const int32_t *tokens, const nm_loss_options *opt, nm_loss_terms *loss,
                        nm_error *err);
