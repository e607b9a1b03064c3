// comm.h: the communicator, a small table of collectives over contiguous buffers
// (design.md 6). The model and the trainer call only this table, never MPI or NCCL
// directly, so a backend is a new table (single process, MPI; NCCL in CUDA builds, comm_nccl.c).
//
// Usage:
//   nm_comm *world;  nm_comm_init(&world, &err);          // MPI when launched by mpirun/srun
//   nm_comm_all_reduce(world, buf, n, NM_DT_F32, NM_RED_SUM, &err);
//   nm_comm *dp;  nm_comm_split(world, color, key, "dp", &dp, &err);
//   ...  nm_comm_destroy(dp);  nm_comm_destroy(world);   // the world last (finalises MPI)
//
// Semantics every implementation keeps:
//  - counts are in elements of the dtype; per-rank count arrays have size() entries and the
//    pieces of a buffer are laid out rank after rank (displacement = prefix sum of counts);
//  - reduce_scatter and all_gather work in place on one contiguous buffer, the layout of a
//    ZeRO-1 gradient bucket: reduce_scatter leaves the sum over ranks of piece r in piece r
//    of rank r's buffer (the other pieces are undefined afterwards); all_gather reads piece r
//    from rank r and leaves every piece on every rank;
//  - sums are reduced in an order fixed by the ranks (MPI: the implementation's order for a
//    given size), so a run is bit-reproducible on the same layout;
//  - every operation counts the bytes it moves (nm_comm_counters, per group and operation,
//    formulas in docs/parallelism.md) so tests can check traffic against the planner;
//  - errors return -1 with err filled; nm_comm_abort stops every rank of the job.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "core/check.h"

// NM_DT_U8: raw bytes (fp8 codes on their way to the experts); moved, never reduced.
typedef enum nm_comm_dtype { NM_DT_F32, NM_DT_BF16, NM_DT_I32, NM_DT_I64, NM_DT_F64, NM_DT_U8 } nm_comm_dtype;
typedef enum nm_reduce_op { NM_RED_SUM, NM_RED_MAX, NM_RED_MIN } nm_reduce_op;

enum {
    NM_COMM_ALL_REDUCE,
    NM_COMM_REDUCE_SCATTER,
    NM_COMM_ALL_GATHER,
    NM_COMM_ALL_TO_ALL,
    NM_COMM_BROADCAST,
    NM_COMM_SEND,
    NM_COMM_RECV,
    NM_COMM_N_OPS,
};

// Bytes each operation moved on this rank, and how many calls (see docs/parallelism.md):
// all_reduce, broadcast, send, recv: the buffer; reduce_scatter, all_gather: the whole
// bucket (sum of counts); all_to_all: the bytes sent to the other ranks (own piece excluded).
typedef struct nm_comm_counters {
    int64_t bytes[NM_COMM_N_OPS];
    int64_t calls[NM_COMM_N_OPS];
    double seconds[NM_COMM_N_OPS];      // wall time inside the calls (a non-blocking reduce-scatter:
                                        // its start, tests and wait), so a step can say how long
                                        // each group kept the rank waiting
} nm_comm_counters;

typedef struct nm_comm nm_comm;
typedef struct nm_comm_request nm_comm_request;

typedef struct nm_comm_vtable {
    const char *name;                   // "single", "mpi", "nccl"
    int (*all_reduce)(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, nm_reduce_op op, nm_error *err);
    int (*reduce_scatter_start)(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_comm_request *req,
                                nm_error *err);
    int (*all_gather)(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err);
    // send_displs / recv_displs: where each rank's piece starts (elements); NULL: the prefix
    // sums of the counts (pieces back to back).
    int (*all_to_all)(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                      void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                      nm_error *err);
    // all_to_all, started: the buffers are the caller's until test says done or wait returns
    int (*all_to_all_start)(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                            void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                            nm_comm_request *req, nm_error *err);
    int (*broadcast)(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int root, nm_error *err);
    int (*send)(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err);
    int (*recv)(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err);
    // A non-blocking send: buf must stay untouched until test says done or wait returns.
    int (*send_start)(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                      nm_comm_request *req, nm_error *err);
    int (*barrier)(nm_comm *c, nm_error *err);
    int (*split)(nm_comm *c, int color, int key, nm_comm **out, nm_error *err);
    int (*test)(nm_comm_request *req, int *done, nm_error *err);    // progress, non-blocking
    int (*wait)(nm_comm_request *req, nm_error *err);
    void (*destroy)(nm_comm *c);
    void (*abort)(nm_comm *c, int code);  // does not return
} nm_comm_vtable;

struct nm_comm {
    const nm_comm_vtable *vt;
    int rank, size;
    char group[16];                     // "world", "dp", "ep", "edp", "tp", "pp", ...
    nm_comm_counters counters;
    void *impl;                         // the implementation's handle
    int is_world;
};

// A started non-blocking operation. Plain storage owned by the caller; at most one
// operation per request at a time.
struct nm_comm_request {
    nm_comm *comm;
    int active;
    int op;                             // NM_COMM_REDUCE_SCATTER, NM_COMM_ALL_TO_ALL or NM_COMM_SEND: what
                                        // test and wait finish (their time counts as that op's)
    void *buf;                          // reduce_scatter: the bucket, and where this rank's piece goes
    int64_t offset, count;              // this rank's piece in elements
    size_t elem;
    unsigned char impl[64];             // the implementation's request handle
};

size_t nm_comm_dtype_size(nm_comm_dtype dt);

// The world communicator: MPI when the process was started by an MPI launcher (mpirun,
// mpiexec or srun: OMPI_COMM_WORLD_SIZE, PMI_SIZE / PMIX_RANK or SLURM_NTASKS > 1 in the
// environment), else the single-process table. NM_COMM=single|mpi forces one.
int nm_comm_init(nm_comm **world, nm_error *err);
// The same with the communicator named by the caller (the training config's 'communicator'):
// "single", "mpi", "nccl", or NULL / "" / "auto" for the launcher's choice above. NM_COMM is
// not read here (the config applies it before).
int nm_comm_init_as(nm_comm **world, const char *name, nm_error *err);
// Whether name is a communicator this build can make (auto, single, mpi; nccl only in builds
// with NCCL); what prefixes the message ("key 'communicator':").
int nm_comm_check_name(const char *name, const char *what, nm_error *err);
// The NCCL table over the ranks of an MPI communicator (world or a split), which it keeps as
// its bootstrap and owns (destroyed with it): picks this process's GPU (node-local rank modulo
// the devices), shares rank 0's ncclUniqueId over MPI. Without a usable GPU, or in a build
// without NCCL, every rank refuses with a message (and mpi_world is destroyed).
int nm_comm_init_nccl(nm_comm **out, nm_comm *mpi_world, nm_error *err);
// This process's rank among the ranks of c on its node, and their number (comm_mpi.c: the
// launcher's variables, else MPI's shared-memory split of c).
int nm_comm_mpi_local_rank(nm_comm *c, int *local_rank, int *local_size, nm_error *err);
// The single-process table, always available (tests, tools that never distribute).
nm_comm *nm_comm_single(void);
// A communicator with a rank and a size that refuses every operation: what the planner hands
// to the code that sizes buffers and shards (model, ZeRO-1), so it runs the allocator's own
// formulas for a layout without launching it. nm_comm_destroy frees it.
nm_comm *nm_comm_shape(int rank, int size, const char *group);

static inline double nm_comm_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
// Adds the time since t0 to c's op (the wrappers below time every call).
static inline int nm_comm_timed(nm_comm *c, int op, double t0, int rc) {
    c->counters.seconds[op] += nm_comm_clock() - t0;
    return rc;
}

static inline int nm_comm_all_reduce(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, nm_reduce_op op,
                                     nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_ALL_REDUCE, t0, c->vt->all_reduce(c, buf, count, dt, op, err));
}
static inline int nm_comm_reduce_scatter_start(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt,
                                               nm_comm_request *req, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_REDUCE_SCATTER, t0, c->vt->reduce_scatter_start(c, buf, counts, dt, req, err));
}
static inline int nm_comm_test(nm_comm_request *req, int *done, nm_error *err) {
    if (!req->active) {
        *done = 1;
        return 0;
    }
    nm_comm *c = req->comm;
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, req->op, t0, c->vt->test(req, done, err));
}
static inline int nm_comm_wait(nm_comm_request *req, nm_error *err) {
    if (!req->active) return 0;
    nm_comm *c = req->comm;
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, req->op, t0, c->vt->wait(req, err));
}
static inline int nm_comm_reduce_scatter(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err) {
    nm_comm_request req = {0};
    if (c->vt->reduce_scatter_start(c, buf, counts, dt, &req, err) != 0) return -1;
    return nm_comm_wait(&req, err);
}
static inline int nm_comm_all_gather(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_ALL_GATHER, t0, c->vt->all_gather(c, buf, counts, dt, err));
}
static inline int nm_comm_all_to_all(nm_comm *c, const void *send, const int64_t *send_counts, void *recv,
                                     const int64_t *recv_counts, nm_comm_dtype dt, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_ALL_TO_ALL, t0,
                         c->vt->all_to_all(c, send, send_counts, NULL, recv, recv_counts, NULL, dt, err));
}
// The same with explicit displacements (elements): rank r's piece is sent from
// send + send_displs[r] and received at recv + recv_displs[r], so pieces may have gaps (the
// bounded expert exchange sends a slice of each peer's block per round, in place).
static inline int nm_comm_all_to_all_v(nm_comm *c, const void *send, const int64_t *send_counts,
                                       const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                                       const int64_t *recv_displs, nm_comm_dtype dt, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_ALL_TO_ALL, t0,
                         c->vt->all_to_all(c, send, send_counts, send_displs, recv, recv_counts, recv_displs, dt, err));
}
// nm_comm_all_to_all_v started (the expert dispatch while the shared experts compute): send and
// recv are the caller's until nm_comm_test says done or nm_comm_wait returns.
static inline int nm_comm_all_to_all_v_start(nm_comm *c, const void *send, const int64_t *send_counts,
                                             const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                                             const int64_t *recv_displs, nm_comm_dtype dt, nm_comm_request *req,
                                             nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_ALL_TO_ALL, t0,
                         c->vt->all_to_all_start(c, send, send_counts, send_displs, recv, recv_counts, recv_displs,
                                                 dt, req, err));
}
static inline int nm_comm_broadcast(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int root, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_BROADCAST, t0, c->vt->broadcast(c, buf, count, dt, root, err));
}
static inline int nm_comm_send(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                               nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_SEND, t0, c->vt->send(c, buf, count, dt, peer, tag, err));
}
// Starts a send of buf to peer (matched by a recv with the same tag) and returns: the pipeline
// sends without waiting for its neighbour, so no order of the two stages' calls can deadlock.
// Counted as a send; nm_comm_test / nm_comm_wait finish it (buf is the caller's until then).
static inline int nm_comm_send_start(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                                     nm_comm_request *req, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_SEND, t0, c->vt->send_start(c, buf, count, dt, peer, tag, req, err));
}
static inline int nm_comm_recv(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    double t0 = nm_comm_clock();
    return nm_comm_timed(c, NM_COMM_RECV, t0, c->vt->recv(c, buf, count, dt, peer, tag, err));
}
static inline int nm_comm_barrier(nm_comm *c, nm_error *err) { return c->vt->barrier(c, err); }
// The same as a linked symbol, for bindings that cannot call an inline function (python/).
int nm_comm_barrier_export(nm_comm *c, nm_error *err);
// Ranks with the same color form a group, ordered by key (then by rank). group names it
// in the byte counters and messages.
int nm_comm_split(nm_comm *c, int color, int key, const char *group, nm_comm **out, nm_error *err);
_Noreturn void nm_comm_abort(nm_comm *c, int code);
// For a program's error path: under a multi-rank MPI job, MPI_Abort (the launcher stops every
// rank, so none is left waiting in a collective); otherwise exit(code). Needs no handle.
_Noreturn void nm_comm_abort_job(int code);
// This process's world rank and the job's size (0 and 1 outside an MPI job).
void nm_comm_job_position(int *rank, int *size);
// Destroys a communicator (MPI itself is finalised at exit).
void nm_comm_destroy(nm_comm *c);

// Adds the counters of c to total (for reports over several groups).
void nm_comm_counters_add(nm_comm_counters *total, const nm_comm *c);
const char *nm_comm_op_name(int op);

// Shared by the implementations: sum of n counts.
int64_t nm_comm_sum_counts(const int64_t *counts, int n);
int nm_comm_init_mpi(nm_comm **world, nm_error *err);  // comm_mpi.c
// Shared by the implementations: records one operation of `bytes` bytes.
static inline void nm_comm_count(nm_comm *c, int op, int64_t bytes) {
    c->counters.bytes[op] += bytes;
    c->counters.calls[op] += 1;
}
