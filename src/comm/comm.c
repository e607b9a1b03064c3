// comm.c: what every communicator shares, and the single-process table: one rank, every
// collective is the identity (all_to_all copies its one piece), nothing to link.
#include "comm/comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

size_t nm_comm_dtype_size(nm_comm_dtype dt) {
    switch (dt) {
    case NM_DT_F32: return 4;
    case NM_DT_BF16: return 2;
    case NM_DT_I32: return 4;
    case NM_DT_I64: return 8;
    case NM_DT_F64: return 8;
    case NM_DT_U8: return 1;
    }
    NM_PANIC("unknown dtype %d", (int)dt);
}

const char *nm_comm_op_name(int op) {
    static const char *const names[NM_COMM_N_OPS] = {"all_reduce", "reduce_scatter", "all_gather", "all_to_all",
                                                     "broadcast",  "send",           "recv"};
    return op >= 0 && op < NM_COMM_N_OPS ? names[op] : "?";
}

void nm_comm_counters_add(nm_comm_counters *total, const nm_comm *c) {
    for (int i = 0; i < NM_COMM_N_OPS; i++) {
        total->bytes[i] += c->counters.bytes[i];
        total->calls[i] += c->counters.calls[i];
        total->seconds[i] += c->counters.seconds[i];
    }
}

int64_t nm_comm_sum_counts(const int64_t *counts, int n) {
    int64_t s = 0;
    for (int i = 0; i < n; i++) s += counts[i];
    return s;
}

// Here, not beside nm_comm_init (comm_mpi.c), so the config parser checks names without MPI.
int nm_comm_check_name(const char *name, const char *what, nm_error *err) {
    if (!name || !*name || !strcmp(name, "auto") || !strcmp(name, "single") || !strcmp(name, "mpi")) return 0;
    if (!strcmp(name, "nccl")) {
#ifdef NM_HAVE_NCCL
        return 0;
#else
        return nm_error_set(err, "%s communicator nccl: this build has no NCCL (it needs the CUDA toolkit with "
                            "nccl.h and libnccl at configure time): use the mpi communicator", what);
#endif
    }
    return nm_error_set(err, "%s \"%s\" is not a communicator (known: auto, single, mpi, nccl)", what, name);
}

#ifndef NM_HAVE_NCCL
// Builds without NCCL: comm_nccl.c is not compiled; asking for it is refused (nm_comm_check_name
// says so first, with the same words).
int nm_comm_init_nccl(nm_comm **out, nm_comm *mpi_world, nm_error *err) {
    *out = NULL;
    nm_comm_destroy(mpi_world);
    return nm_error_set(err, "communicator nccl: this build has no NCCL (it needs the CUDA toolkit with nccl.h and "
                        "libnccl at configure time): use the mpi communicator");
}
#endif

int nm_comm_split(nm_comm *c, int color, int key, const char *group, nm_comm **out, nm_error *err) {
    *out = NULL;
    if (c->vt->split(c, color, key, out, err) != 0) return -1;
    snprintf((*out)->group, sizeof((*out)->group), "%s", group);
    return 0;
}

_Noreturn void nm_comm_abort(nm_comm *c, int code) {
    c->vt->abort(c, code);
    _Exit(code ? code : 1);
}

void nm_comm_destroy(nm_comm *c) {
    if (c) c->vt->destroy(c);
}

// --- the single-process table -----------------------------------------------------------------

static int single_all_reduce(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, nm_reduce_op op, nm_error *err) {
    nm_comm_count(c, NM_COMM_ALL_REDUCE, count * (int64_t)nm_comm_dtype_size(dt));
    return 0;
}

static int single_reduce_scatter_start(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt,
                                       nm_comm_request *req, nm_error *err) {
    nm_comm_count(c, NM_COMM_REDUCE_SCATTER, counts[0] * (int64_t)nm_comm_dtype_size(dt));
    memset(req, 0, sizeof(*req));
    return 0;
}

static int single_all_gather(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err) {
    nm_comm_count(c, NM_COMM_ALL_GATHER, counts[0] * (int64_t)nm_comm_dtype_size(dt));
    return 0;
}

static int single_all_to_all(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                             void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                             nm_error *err) {
    if (send_counts[0] != recv_counts[0]) {
        return nm_error_set(err, "all_to_all (%s): sending %lld elements to self but expecting %lld", c->group,
                            (long long)send_counts[0], (long long)recv_counts[0]);
    }
    size_t elem = nm_comm_dtype_size(dt);
    const char *from = (const char *)send + (send_displs ? (size_t)send_displs[0] * elem : 0);
    char *to = (char *)recv + (recv_displs ? (size_t)recv_displs[0] * elem : 0);
    if (from != to && send_counts[0] > 0) memmove(to, from, (size_t)send_counts[0] * elem);
    nm_comm_count(c, NM_COMM_ALL_TO_ALL, send_counts[0] * (int64_t)nm_comm_dtype_size(dt));
    return 0;
}

static int single_broadcast(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int root, nm_error *err) {
    if (root != 0) return nm_error_set(err, "broadcast (%s): root %d outside the 1-rank group", c->group, root);
    nm_comm_count(c, NM_COMM_BROADCAST, count * (int64_t)nm_comm_dtype_size(dt));
    return 0;
}

static int single_send(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    return nm_error_set(err, "send (%s): no peer %d in a 1-rank group", c->group, peer);
}

// One rank: the exchange is a copy, done at once (the request is left inactive).
static int single_all_to_all_start(nm_comm *c, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, nm_comm_dtype dt, nm_comm_request *req, nm_error *err) {
    memset(req, 0, sizeof(*req));
    return single_all_to_all(c, send, send_counts, send_displs, recv, recv_counts, recv_displs, dt, err);
}

static int single_send_start(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                             nm_comm_request *req, nm_error *err) {
    return nm_error_set(err, "send (%s): no peer %d in a 1-rank group", c->group, peer);
}

static int single_recv(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    return nm_error_set(err, "recv (%s): no peer %d in a 1-rank group", c->group, peer);
}

static int single_barrier(nm_comm *c, nm_error *err) { return 0; }

static nm_comm *single_new(const char *group, int is_world);

static int single_split(nm_comm *c, int color, int key, nm_comm **out, nm_error *err) {
    *out = single_new("split", 0);
    return 0;
}

static int single_test(nm_comm_request *req, int *done, nm_error *err) {
    *done = 1;
    return 0;
}

static int single_wait(nm_comm_request *req, nm_error *err) { return 0; }

static void single_destroy(nm_comm *c) {
    if (!c->is_world) nm_free(c);
}

static _Noreturn void single_abort(nm_comm *c, int code) { exit(code); }

static const nm_comm_vtable single_vtable = {
    .name = "single",
    .all_reduce = single_all_reduce,
    .reduce_scatter_start = single_reduce_scatter_start,
    .all_gather = single_all_gather,
    .all_to_all = single_all_to_all,
    .broadcast = single_broadcast,
    .all_to_all_start = single_all_to_all_start,
    .send = single_send,
    .send_start = single_send_start,
    .recv = single_recv,
    .barrier = single_barrier,
    .split = single_split,
    .test = single_test,
    .wait = single_wait,
    .destroy = single_destroy,
    .abort = single_abort,
};

static nm_comm *single_new(const char *group, int is_world) {
    nm_comm *c = nm_calloc(1, sizeof(*c));
    c->vt = &single_vtable;
    c->rank = 0;
    c->size = 1;
    c->is_world = is_world;
    snprintf(c->group, sizeof(c->group), "%s", group);
    return c;
}

nm_comm *nm_comm_single(void) { return single_new("world", 0); }


// --- shapes: a rank and a size, no communication (the planner) ---------------------------------

static int shape_refuse(nm_comm *c, nm_error *err) {
    return nm_error_set(err, "communicator '%s' is a shape for planning (rank %d of %d): it cannot communicate",
                        c->group, c->rank, c->size);
}
static int shape_all_reduce(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, nm_reduce_op op, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_reduce_scatter_start(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt,
                                      nm_comm_request *req, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_all_gather(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_all_to_all(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                            void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                            nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_broadcast(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int root, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_send(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_all_to_all_start(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                                  void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                                  nm_comm_request *req, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_send_start(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                            nm_comm_request *req, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_recv(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    return shape_refuse(c, err);
}
static int shape_barrier(nm_comm *c, nm_error *err) { return shape_refuse(c, err); }
static int shape_split(nm_comm *c, int color, int key, nm_comm **out, nm_error *err) {
    *out = NULL;
    return shape_refuse(c, err);
}
static int shape_test(nm_comm_request *req, int *done, nm_error *err) { return shape_refuse(req->comm, err); }
static int shape_wait(nm_comm_request *req, nm_error *err) { return shape_refuse(req->comm, err); }
static void shape_destroy(nm_comm *c) { nm_free(c); }
static _Noreturn void shape_abort(nm_comm *c, int code) { exit(code); }

static const nm_comm_vtable shape_vtable = {
    .name = "shape",
    .all_reduce = shape_all_reduce,
    .reduce_scatter_start = shape_reduce_scatter_start,
    .all_gather = shape_all_gather,
    .all_to_all = shape_all_to_all,
    .broadcast = shape_broadcast,
    .all_to_all_start = shape_all_to_all_start,
    .send = shape_send,
    .send_start = shape_send_start,
    .recv = shape_recv,
    .barrier = shape_barrier,
    .split = shape_split,
    .test = shape_test,
    .wait = shape_wait,
    .destroy = shape_destroy,
    .abort = shape_abort,
};

nm_comm *nm_comm_shape(int rank, int size, const char *group) {
    nm_comm *c = nm_calloc(1, sizeof(*c));
    c->vt = &shape_vtable;
    c->rank = rank;
    c->size = size;
    snprintf(c->group, sizeof(c->group), "%s", group);
    return c;
}

int nm_comm_barrier_export(nm_comm *c, nm_error *err) { return nm_comm_barrier(c, err); }
