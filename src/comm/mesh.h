// mesh.h: the 4-D process mesh (design.md 6), laid out as Megatron-Core's default order.
//
//   world = PP x DP x TP, TP fastest:   rank = tp + TP * (dp + DP * pp)
//   expert layers fold EP out of DP x TP (Megatron-Core "MoE parallel folding", expert-tensor-
//   parallel 1): inside a pipeline stage, local = tp + TP * dp = ep + EP * edp, so an EP group is
//   EP consecutive ranks and expert-data-parallel EDP = DP * TP / EP.
//
// Groups: tp (same dp, pp), dp (same tp, pp), pp (same tp, dp), ep (same edp, pp), edp (same
// ep, pp). Gradients of replicated (non-expert) tensors reduce over dp; those of routed
// experts over edp (docs/parallelism.md); under TP without sequence parallelism (EP 1) the
// routed experts are replicated over tp and reduce over dp too. PP splits the layers into
// stages (train/pipeline.h).
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "comm/comm.h"

typedef struct nm_mesh_sizes {
    int64_t world;              // processes in the job
    int64_t tp, pp, ep;         // tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
    int64_t dp, edp;            // derived: world / (tp * pp), dp * tp / ep
} nm_mesh_sizes;

typedef struct nm_mesh {
    nm_mesh_sizes n;
    int rank;                   // in the world
    int tp_rank, dp_rank, pp_rank, ep_rank, edp_rank;
    nm_comm *world;             // borrowed
    nm_comm *tp, *dp, *pp, *ep, *edp;   // owned
} nm_mesh;

// Checks a layout before any work: world divisible by tp * pp, ep dividing dp * tp and the
// routed experts, the global batch divisible by micro_batch * dp. Fills n (derived sizes)
// and returns 0, or -1 with a message naming every number involved. n_experts 0 = dense model.
int nm_mesh_check(nm_mesh_sizes *n, int64_t world, int64_t tp, int64_t pp, int64_t ep, int64_t n_experts,
                  int64_t global_batch, int64_t micro_batch, nm_error *err);

// Coordinates of a world rank under sizes n (no communication).
void nm_mesh_coords(const nm_mesh_sizes *n, int rank, int *tp, int *dp, int *pp, int *ep, int *edp);

// Splits world into the groups (collective over world). n from nm_mesh_check.
int nm_mesh_create(nm_mesh **out, nm_comm *world, const nm_mesh_sizes *n, nm_error *err);
void nm_mesh_destroy(nm_mesh *m);

// "dp2 x ep2 (edp1)" style description for banners.
void nm_mesh_describe(const nm_mesh_sizes *n, char *buf, size_t cap);
