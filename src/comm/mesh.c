// mesh.c: the process mesh (see mesh.h).
#include "comm/mesh.h"

#include <stdio.h>
#include <string.h>

int nm_mesh_check(nm_mesh_sizes *n, int64_t world, int64_t tp, int64_t pp, int64_t ep, int64_t n_experts,
                  int64_t global_batch, int64_t micro_batch, nm_error *err) {
    memset(n, 0, sizeof(*n));
    if (world < 1 || tp < 1 || pp < 1 || ep < 1) {
        return nm_error_set(err, "parallel layout: world %lld, tensor_parallel_size %lld, pipeline_parallel_size %lld, "
                            "expert_parallel_size %lld: every size must be >= 1",
                            (long long)world, (long long)tp, (long long)pp, (long long)ep);
    }
    if (world % (tp * pp) != 0) {
        return nm_error_set(err, "parallel layout: world size %lld is not divisible by tensor_parallel_size %lld x "
                            "pipeline_parallel_size %lld = %lld",
                            (long long)world, (long long)tp, (long long)pp, (long long)(tp * pp));
    }
    int64_t dp = world / (tp * pp);
    if ((dp * tp) % ep != 0) {
        return nm_error_set(err, "parallel layout: expert_parallel_size %lld does not divide data_parallel_size %lld x "
                            "tensor_parallel_size %lld = %lld (world %lld / pipeline_parallel_size %lld)",
                            (long long)ep, (long long)dp, (long long)tp, (long long)(dp * tp), (long long)world,
                            (long long)pp);
    }
    if (ep > 1 && n_experts <= 0) {
        return nm_error_set(err, "parallel layout: expert_parallel_size %lld but the model has no routed experts "
                            "(n_routed_experts 0)", (long long)ep);
    }
    if (n_experts > 0 && n_experts % ep != 0) {
        return nm_error_set(err, "parallel layout: expert_parallel_size %lld does not divide the %lld routed experts "
                            "(n_routed_experts)", (long long)ep, (long long)n_experts);
    }
    if (micro_batch < 1 || global_batch % (micro_batch * dp) != 0) {
        // The fix: the largest micro-batch below the given one that divides, else a global batch
        int64_t fit = micro_batch - 1;
        while (fit >= 1 && global_batch % (fit * dp) != 0) fit--;
        int64_t mb = micro_batch < 1 ? 1 : micro_batch;
        char fix[160];
        if (fit >= 1) snprintf(fix, sizeof fix, "--set micro_batch=%lld", (long long)fit);
        else snprintf(fix, sizeof fix, "--set global_batch=%lld", (long long)(((global_batch + mb * dp - 1) / (mb * dp)) * mb * dp));
        return nm_error_set(err, "parallel layout: global_batch %lld is not divisible by micro_batch %lld x "
                            "data_parallel_size %lld = %lld (world %lld / (tensor_parallel_size %lld x "
                            "pipeline_parallel_size %lld)); for example %s",
                            (long long)global_batch, (long long)micro_batch, (long long)dp,
                            (long long)(micro_batch * dp), (long long)world, (long long)tp, (long long)pp, fix);
    }
    n->world = world;
    n->tp = tp;
    n->pp = pp;
    n->ep = ep;
    n->dp = dp;
    n->edp = dp * tp / ep;
    return 0;
}

void nm_mesh_coords(const nm_mesh_sizes *n, int rank, int *tp, int *dp, int *pp, int *ep, int *edp) {
    int64_t per_stage = n->tp * n->dp;
    int64_t local = rank % per_stage;
    *tp = (int)(local % n->tp);
    *dp = (int)(local / n->tp);
    *pp = (int)(rank / per_stage);
    *ep = (int)(local % n->ep);
    *edp = (int)(local / n->ep);
}

int nm_mesh_create(nm_mesh **out, nm_comm *world, const nm_mesh_sizes *n, nm_error *err) {
    *out = NULL;
    NM_CHECK(n->world == world->size, "mesh sizes are for %lld ranks, the world has %d", (long long)n->world,
             world->size);
    nm_mesh *m = nm_calloc(1, sizeof(*m));
    m->n = *n;
    m->rank = world->rank;
    m->world = world;
    nm_mesh_coords(n, world->rank, &m->tp_rank, &m->dp_rank, &m->pp_rank, &m->ep_rank, &m->edp_rank);
    int tp = m->tp_rank, dp = m->dp_rank, pp = m->pp_rank, ep = m->ep_rank, edp = m->edp_rank;
    int64_t DP = n->dp, PP = n->pp, EP = n->ep;
    // color = the coordinates the group shares; key = the rank inside it.
    int rc = nm_comm_split(world, (int)(dp + DP * pp), tp, "tp", &m->tp, err);
    if (rc == 0) rc = nm_comm_split(world, (int)(tp + n->tp * pp), dp, "dp", &m->dp, err);
    if (rc == 0) rc = nm_comm_split(world, (int)(tp + n->tp * dp), pp, "pp", &m->pp, err);
    if (rc == 0) rc = nm_comm_split(world, (int)(edp + n->edp * pp), ep, "ep", &m->ep, err);
    if (rc == 0) rc = nm_comm_split(world, (int)(ep + EP * pp), edp, "edp", &m->edp, err);
    (void)PP;
    if (rc != 0) {
        nm_mesh_destroy(m);
        return -1;
    }
    *out = m;
    return 0;
}

void nm_mesh_destroy(nm_mesh *m) {
    if (!m) return;
    nm_comm_destroy(m->tp);
    nm_comm_destroy(m->dp);
    nm_comm_destroy(m->pp);
    nm_comm_destroy(m->ep);
    nm_comm_destroy(m->edp);
    nm_free(m);
}

void nm_mesh_describe(const nm_mesh_sizes *n, char *buf, size_t cap) {
    snprintf(buf, cap, "%lld rank%s: tp%lld x pp%lld x dp%lld, experts ep%lld x edp%lld", (long long)n->world,
             n->world == 1 ? "" : "s", (long long)n->tp, (long long)n->pp, (long long)n->dp, (long long)n->ep,
             (long long)n->edp);
}
