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
// the remaining backwards. At most min(PP - s, m) micro-batches are in flight at stage s: the
// model holds that many activation sets (nm_model_options.act_slots).
//
// Interleaved (virtual stages, Megatron-Core's forward_backward_pipelining_with_interleaving):
// with `virtual_pipeline_model_parallel_size` v, the layers are cut into PP x v stages and rank
// r holds stages r, r + PP, ..., r + (v-1) PP (its model chunks 0 .. v-1; the layout string
// then has PP x v stages). The m micro-batches go through in groups of PP: chunk 0 forwards
// micro-batches 0 .. PP-1, then chunk 1 the same ones, ..., then the next group; backwards
// mirror it from chunk v-1 down. Rank r runs (PP - r - 1) x 2 + (v - 1) x PP warm-up
// forwards, then one forward and one backward at a time. The bubble falls from
// (PP-1)/(m+PP-1) to (PP-1)/(v m + PP-1); m must be a multiple of PP.
//
// Paired micro-batches (nm_pipeline_set_pair, 1F1B only): one more warm-up forward, then each
// forward beside an earlier micro-batch's backward on a second model (pipeline.c).
//
// Every chunk's backwards run in micro-batch order, as one process accumulates them, so the
// gradients are the same sums in the same order whatever v is. Activations (micro, T, D) go to
// the next stage (rank r + 1, or rank 0's next chunk from the last rank), their gradients back:
// sends are non-blocking (a copy in a send buffer, nm_comm_send_start), receives blocking and
// tagged by chunk and micro-batch, so a rank never waits on its own sends and no order of two
// neighbours' calls deadlocks (nm_pipeline_schedule's order is checked for that by
// tests/test_pipeline_schedule.c over many shapes).
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "comm/comm.h"
#include "model/model.h"

// The stage layout for pp x v stages (v virtual stages per rank, 1 without interleaving): layout
// NULL or "" splits the L decoder layers evenly (L divisible by pp x v). Fills stages (pp x v),
// in pipeline order. A bad layout is an error naming the key and value.
int nm_pipeline_layout(nm_model_stage *stages, int64_t pp, int64_t v, const char *layout, const nm_model_config *cfg,
                       nm_error *err);
// The virtual stages per rank: `vpp` (the config's virtual_pipeline_model_parallel_size; 0:
// unset) or, when unset, the layout's stage count / pp (1 without a layout). An error names
// the keys when they disagree or pp does not divide the layout's stages.
int nm_pipeline_virtual_size(int64_t pp, int64_t vpp, const char *layout, int64_t *v, nm_error *err);
// Rank r's chunks of stages (pp x v, pipeline order): out[c] = stages[c * pp + r].
void nm_pipeline_rank_chunks(const nm_model_stage *stages, int64_t pp, int64_t v, int64_t rank, nm_model_stage *out);
// Checks that m micro-batches suit the schedule (v > 1: m a multiple of pp).
int nm_pipeline_check_micro_batches(int64_t pp, int64_t v, int64_t m, nm_error *err);

// One step of a rank's schedule: the forward or backward of micro-batch `micro` on `chunk`.
typedef struct nm_pipeline_action {
    int backward;
    int64_t chunk, micro;
} nm_pipeline_action;
// Rank `rank`'s 2 x v x m actions in order (out holds 2 v m).
void nm_pipeline_schedule(nm_pipeline_action *out, int64_t pp, int64_t v, int64_t rank, int64_t m);
// Activation sets per chunk rank `rank` needs: the most micro-batches of one chunk in flight.
int64_t nm_pipeline_slots(int64_t pp, int64_t v, int64_t rank, int64_t m);
// "E t t | t t m L" style description of stage s, for the banner.
void nm_pipeline_describe_stage(const nm_model_stage *s, const nm_model_config *cfg, char *buf, size_t cap);

// Called by the schedule around micro-batch i's forward and backward on a chunk (may be NULL).
// The gradients of a chunk's layers are final after its backward of the last micro-batch.
typedef struct nm_pipeline_hooks {
    int (*after_forward)(void *ctx, int64_t micro, const nm_loss_terms *lt, nm_error *err);
    int (*before_backward)(void *ctx, int64_t micro, int64_t chunk, nm_error *err);
    int (*after_backward)(void *ctx, int64_t micro, int64_t chunk, nm_error *err);
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
    nm_model *model;            // borrowed, created with this rank's v chunks and nm_pipeline_slots slots
    int64_t v;                  // virtual stages (model chunks) per rank
    int64_t B, T, D;
    float *recv_act;            // (B, T, D) the previous stage's output
    float *recv_grad;           // (B, T, D) the next stage's gradient
    // Send buffers, each (B, T, D), with the send that uses it: as many as sends can be in
    // flight (v x (this rank's slots + the most slots of any rank), made before the first step);
    // a buffer is reused once its send has finished.
    float **send_buf;
    nm_comm_request *send_req;
    int n_send;
    nm_pipeline_action *plan;   // (2 v plan_m) this rank's schedule for plan_m micro-batches
    int64_t plan_m;
    nm_model *pair;             // paired micro-batches (nm_pipeline_set_pair): the second model, or NULL
    nm_coop *coop;
} nm_pipeline;

int nm_pipeline_create(nm_pipeline **out, nm_comm *pp, nm_model *model, int64_t v, int64_t B, int64_t T,
                       nm_error *err);
void nm_pipeline_destroy(nm_pipeline *p);

// One global batch's m micro-batches through forward and backward under 1F1B (interleaved with
// v > 1): tokens holds
// micro-batch i at tokens + i * B * T (every stage reads the same ones). Gradients accumulate
// into the model's grads.
int nm_pipeline_train(nm_pipeline *p, const int32_t *tokens, int64_t m, const nm_loss_options *opt,
                      const nm_pipeline_hooks *hooks, nm_pipeline_times *times, nm_error *err);
// Paired micro-batches (the trainer's moe_pair_micro_batches; v = 1): one more warm-up forward
// than 1F1B, w = min(PP - rank, m) (nm_pipeline_pair_slots), then each forward beside the
// backward w micro-batches before it, on the other of two models (pair: nm_model_create_pair of
// p->model, both with w activation sets), the two taking turns on one thread at each expert
// all-to-all (coop). Blocks of w micro-batches alternate between the models.
void nm_pipeline_set_pair(nm_pipeline *p, nm_model *pair, nm_coop *coop);
int64_t nm_pipeline_pair_slots(int64_t pp, int64_t rank, int64_t m);
// The model micro-batch `micro`'s forward and backward run on (p->model, or the pair's).
nm_model *nm_pipeline_model_of(const nm_pipeline *p, int64_t micro, int64_t m);
// Forward only of one micro-batch through all stages (validation): loss on the last stage.
int nm_pipeline_forward(nm_pipeline *p, const int32_t *tokens, const nm_loss_options *opt, nm_loss_terms *loss,
                        nm_error *err);
