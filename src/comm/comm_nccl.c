// comm_nccl.c: the communicator table over NCCL (built when CMake finds nccl.h and libnccl
// next to the CUDA toolkit: NM_HAVE_NCCL). Compiled and linked here; NOT YET RUN ON A GPU.
//
// Bootstrap: every NCCL communicator sits on an MPI communicator of the same ranks (its
// "bootstrap", owned by it). Rank 0 makes the ncclUniqueId and MPI broadcasts it; a split is
// MPI's split of the bootstrap plus ncclCommSplit (a fresh id per group on NCCL < 2.18).
//
// Which library moves a buffer: NCCL moves device and managed memory (the cuda backend
// allocates with cudaMallocManaged), but the trainer also passes host scalars and host arrays
// (loss terms, the gradient norm, checkpoint names on the stack) which a GPU cannot read. So
// each call looks at its buffers (cudaPointerGetAttributes): all device-reachable -> NCCL;
// any plain host memory -> the bootstrap's MPI table (MPI reads managed memory from the host
// too); host and cudaMalloc memory mixed -> refused. Every rank of a job runs the same backend,
// so every rank picks the same library for the same call, which keeps the collectives matched.
//
// send / send_start / recv always go through MPI: they carry tags, which the pipeline uses to
// match messages out of order, and a send must never wait for its receiver; NCCL p2p matches
// by order only and a send kernel waits on its stream until the peer receives, so a send then
// a receive on one stream can deadlock two stages. Bytes are counted here all the same.
//
// Uneven pieces (ZeRO buckets, sequence-parallel rows): equal counts use ncclReduceScatter /
// ncclAllGather in place; uneven counts use one ncclReduce (root r) / ncclBroadcast (root r)
// per piece r, in place, inside one ncclGroupStart/End. Exact for any counts, with no padded
// copies of the bucket (padding would need scratch as large as the bucket and two copies);
// NCCL runs the grouped pieces concurrently, so the traffic is that of one reduce-scatter.
//
// Streams: one CUDA stream per process, shared by every NCCL communicator of the process, so
// NCCL kernels run in the order the program issues them (the same order on every rank): two
// groups' collectives can never wait on each other on the GPU. Non-blocking calls record an
// event after their work; test queries it, wait synchronises on it. Blocking calls synchronise
// the stream before returning, so the host may read the result, as with MPI.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>
#include <nccl.h>

#include "comm/comm.h"

typedef struct nccl_shared {
    cudaStream_t stream;
    int device;
    int users;                  // communicators using the stream; the last destroys it
} nccl_shared;

typedef struct nccl_impl {
    nm_comm *boot;              // the MPI communicator of the same ranks (owned)
    ncclComm_t comm;
    nccl_shared *shared;
    // Non-blocking calls: one event each until test or wait completes it. Slots are added
    // when all are busy (the first step) and kept, so a steady step loop creates none.
    cudaEvent_t *events;
    unsigned char *busy;
    int n_events;
} nccl_impl;

typedef struct nccl_request {
    int slot;
} nccl_request;
_Static_assert(sizeof(nccl_request) <= sizeof(((nm_comm_request *)0)->impl), "NCCL request fits the request");

static nccl_impl *impl_of(nm_comm *c) { return (nccl_impl *)c->impl; }

static int nccl_fail(nm_comm *c, const char *what, ncclResult_t r, nm_error *err) {
    return nm_error_set(err, "%s (%s group, rank %d of %d): NCCL error: %s", what, c->group, c->rank, c->size,
                        ncclGetErrorString(r));
}

static int cuda_fail(nm_comm *c, const char *what, cudaError_t e, nm_error *err) {
    return nm_error_set(err, "%s (%s group, rank %d of %d): CUDA error: %s", what, c->group, c->rank, c->size,
                        cudaGetErrorString(e));
}

#define NCCL_TRY(c, what, call)                                                                  \
    do {                                                                                         \
        ncclResult_t r_ = (call);                                                                \
        if (r_ != ncclSuccess) return nccl_fail((c), (what), r_, err);                          \
    } while (0)
#define CUDA_TRY(c, what, call)                                                                  \
    do {                                                                                         \
        cudaError_t e_ = (call);                                                                 \
        if (e_ != cudaSuccess) return cuda_fail((c), (what), e_, err);                          \
    } while (0)

// --- which library moves a call's buffers ---------------------------------------------------------

enum { PLACE_NONE, PLACE_HOST, PLACE_SHARED, PLACE_DEVICE };  // no buffer, host, managed, cudaMalloc

static int place_of(const void *p) {
    if (!p) return PLACE_NONE;
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();  // an unknown pointer is host memory; clear the error it left
        return PLACE_HOST;
    }
    switch (a.type) {
    case cudaMemoryTypeManaged: return PLACE_SHARED;
    case cudaMemoryTypeDevice: return PLACE_DEVICE;
    default: return PLACE_HOST;  // pageable or pinned host memory: MPI's
    }
}

enum { ROUTE_NCCL, ROUTE_MPI };

// NCCL when every buffer is device-reachable (no buffer at all counts as NCCL: the other ranks'
// buffers of the same call are the backend's), MPI when none is cudaMalloc memory.
static int route(nm_comm *c, const char *what, const void *a, const void *b, int *out, nm_error *err) {
    int pa = place_of(a), pb = place_of(b);
    int host = pa == PLACE_HOST || pb == PLACE_HOST, device = pa == PLACE_DEVICE || pb == PLACE_DEVICE;
    if (host && device)
        return nm_error_set(err, "%s (%s group): one buffer is host memory and one is device memory (cudaMalloc); "
                            "the nccl communicator takes device or managed memory, or host memory, not both", what,
                            c->group);
    *out = host ? ROUTE_MPI : ROUTE_NCCL;
    return 0;
}

// The bootstrap, named as its communicator (nm_comm_split names the table after split
// returns), so MPI's messages for routed calls say which group failed.
static nm_comm *boot_of(nm_comm *c) {
    nm_comm *boot = impl_of(c)->boot;
    memcpy(boot->group, c->group, sizeof boot->group);
    return boot;
}

static int nccl_type(nm_comm *c, const char *what, nm_comm_dtype dt, ncclDataType_t *out, nm_error *err) {
    switch (dt) {
    case NM_DT_F32: *out = ncclFloat32; return 0;
    case NM_DT_BF16: *out = ncclBfloat16; return 0;
    case NM_DT_I32: *out = ncclInt32; return 0;
    case NM_DT_I64: *out = ncclInt64; return 0;
    case NM_DT_F64: *out = ncclFloat64; return 0;
    case NM_DT_U8: break;
    }
    return nm_error_set(err, "%s (%s): byte buffers are moved, never reduced", what, c->group);
}

static int sync_stream(nm_comm *c, const char *what, nm_error *err) {
    CUDA_TRY(c, what, cudaStreamSynchronize(impl_of(c)->shared->stream));
    return 0;
}

static int all_equal(const int64_t *counts, int n) {
    for (int r = 1; r < n; r++)
        if (counts[r] != counts[0]) return 0;
    return 1;
}

// --- event slots for the non-blocking calls -----------------------------------------------------

static int take_event(nm_comm *c, int *slot, nm_error *err) {
    nccl_impl *im = impl_of(c);
    for (int i = 0; i < im->n_events; i++) {
        if (!im->busy[i]) {
            im->busy[i] = 1;
            *slot = i;
            return 0;
        }
    }
    int n = im->n_events ? 2 * im->n_events : 8;
    im->events = nm_realloc(im->events, (size_t)n * sizeof(cudaEvent_t));
    im->busy = nm_realloc(im->busy, (size_t)n);
    for (int i = im->n_events; i < n; i++) {
        im->busy[i] = 0;
        cudaError_t e = cudaEventCreateWithFlags(&im->events[i], cudaEventDisableTiming);
        if (e != cudaSuccess) {
            im->n_events = i;  // the ones made so far are kept (and destroyed with c)
            return cuda_fail(c, "event for a non-blocking call", e, err);
        }
    }
    *slot = im->n_events;
    im->busy[*slot] = 1;
    im->n_events = n;
    return 0;
}

// Records the request's event after the work just queued on the stream, and arms the request.
static int arm(nm_comm *c, int op, nm_comm_request *req, nm_error *err) {
    nccl_impl *im = impl_of(c);
    memset(req, 0, sizeof(*req));
    req->comm = c;
    req->op = op;
    nccl_request *nr = (nccl_request *)req->impl;
    if (take_event(c, &nr->slot, err) != 0) return -1;
    cudaError_t e = cudaEventRecord(im->events[nr->slot], im->shared->stream);
    if (e != cudaSuccess) {
        im->busy[nr->slot] = 0;
        return cuda_fail(c, nm_comm_op_name(op), e, err);
    }
    req->active = 1;
    return 0;
}

static void finish(nm_comm_request *req) {
    req->active = 0;
    impl_of(req->comm)->busy[((nccl_request *)req->impl)->slot] = 0;
}

// "reduce_scatter (wait)", for messages.
static const char *request_name(const nm_comm_request *req, const char *call) {
    static _Thread_local char name[48];
    snprintf(name, sizeof name, "%s (%s)", nm_comm_op_name(req->op), call);
    return name;
}

static int nccl_test(nm_comm_request *req, int *done, nm_error *err) {
    nm_comm *c = req->comm;
    cudaError_t e = cudaEventQuery(impl_of(c)->events[((nccl_request *)req->impl)->slot]);
    *done = e == cudaSuccess;
    if (e == cudaErrorNotReady) return 0;
    if (e != cudaSuccess) return cuda_fail(c, request_name(req, "test"), e, err);
    finish(req);
    return 0;
}

static int nccl_wait(nm_comm_request *req, nm_error *err) {
    nm_comm *c = req->comm;
    CUDA_TRY(c, request_name(req, "wait"), cudaEventSynchronize(impl_of(c)->events[((nccl_request *)req->impl)->slot]));
    finish(req);
    return 0;
}

// --- the collectives ------------------------------------------------------------------------------

static int nccl_all_reduce(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, nm_reduce_op op, nm_error *err) {
    nccl_impl *im = impl_of(c);
    int via;
    if (route(c, "all_reduce", buf, NULL, &via, err) != 0) return -1;
    nm_comm_count(c, NM_COMM_ALL_REDUCE, count * (int64_t)nm_comm_dtype_size(dt));
    if (via == ROUTE_MPI) return boot_of(c)->vt->all_reduce(im->boot, buf, count, dt, op, err);
    ncclDataType_t t = ncclFloat32;
    if (nccl_type(c, "all_reduce", dt, &t, err) != 0) return -1;
    ncclRedOp_t rop = op == NM_RED_SUM ? ncclSum : op == NM_RED_MAX ? ncclMax : ncclMin;
    NCCL_TRY(c, "all_reduce", ncclAllReduce(buf, buf, (size_t)count, t, rop, im->comm, im->shared->stream));
    return sync_stream(c, "all_reduce", err);
}

// Queues the in-place reduce-scatter of the bucket (module comment: equal pieces in one call,
// uneven ones as a group of reduces, each to the rank that keeps the piece).
static int queue_reduce_scatter(nm_comm *c, char *buf, const int64_t *counts, ncclDataType_t t, size_t es,
                                nm_error *err) {
    nccl_impl *im = impl_of(c);
    if (all_equal(counts, c->size)) {
        size_t n = (size_t)counts[0];
        NCCL_TRY(c, "reduce_scatter", ncclReduceScatter(buf, buf + (size_t)c->rank * n * es, n, t, ncclSum, im->comm,
                                                        im->shared->stream));
        return 0;
    }
    NCCL_TRY(c, "reduce_scatter (group start)", ncclGroupStart());
    ncclResult_t first = ncclSuccess;
    int64_t at = 0;
    for (int r = 0; r < c->size; r++) {
        char *piece = buf + (size_t)at * es;
        ncclResult_t rr = counts[r] > 0 ? ncclReduce(piece, piece, (size_t)counts[r], t, ncclSum, r, im->comm,
                                                     im->shared->stream)
                                        : ncclSuccess;
        if (first == ncclSuccess) first = rr;
        at += counts[r];
    }
    ncclResult_t end = ncclGroupEnd();  // always closes the group, even after a failed call
    if (first != ncclSuccess) return nccl_fail(c, "reduce_scatter", first, err);
    if (end != ncclSuccess) return nccl_fail(c, "reduce_scatter (group end)", end, err);
    return 0;
}

static int nccl_reduce_scatter_start(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt,
                                     nm_comm_request *req, nm_error *err) {
    nccl_impl *im = impl_of(c);
    int via;
    if (route(c, "reduce_scatter", buf, NULL, &via, err) != 0) return -1;
    if (via == ROUTE_MPI) {
        // MPI's request (req->comm is the bootstrap, whose test and wait finish it); the bytes here
        nm_comm_count(c, NM_COMM_REDUCE_SCATTER, nm_comm_sum_counts(counts, c->size) * (int64_t)nm_comm_dtype_size(dt));
        return boot_of(c)->vt->reduce_scatter_start(im->boot, buf, counts, dt, req, err);
    }
    ncclDataType_t t = ncclFloat32;
    if (nccl_type(c, "reduce_scatter", dt, &t, err) != 0) return -1;
    size_t es = nm_comm_dtype_size(dt);
    nm_comm_count(c, NM_COMM_REDUCE_SCATTER, nm_comm_sum_counts(counts, c->size) * (int64_t)es);
    if (queue_reduce_scatter(c, buf, counts, t, es, err) != 0) return -1;
    // In place: piece r already sits where rank r keeps it, so nothing moves at the end.
    if (arm(c, NM_COMM_REDUCE_SCATTER, req, err) != 0) return -1;
    req->buf = buf;
    req->count = counts[c->rank];
    req->elem = es;
    return 0;
}

// Equal pieces: ncclAllGather in place; uneven: one broadcast per piece from its owner.
static int nccl_all_gather(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err) {
    nccl_impl *im = impl_of(c);
    int via;
    if (route(c, "all_gather", buf, NULL, &via, err) != 0) return -1;
    size_t es = nm_comm_dtype_size(dt);
    nm_comm_count(c, NM_COMM_ALL_GATHER, nm_comm_sum_counts(counts, c->size) * (int64_t)es);
    if (via == ROUTE_MPI) return boot_of(c)->vt->all_gather(im->boot, buf, counts, dt, err);
    char *b = buf;
    if (all_equal(counts, c->size)) {
        size_t n = (size_t)counts[0] * es;  // bytes: moving needs no element type
        NCCL_TRY(c, "all_gather", ncclAllGather(b + (size_t)c->rank * n, b, n, ncclUint8, im->comm, im->shared->stream));
        return sync_stream(c, "all_gather", err);
    }
    NCCL_TRY(c, "all_gather (group start)", ncclGroupStart());
    ncclResult_t first = ncclSuccess;
    int64_t at = 0;
    for (int r = 0; r < c->size; r++) {
        char *piece = b + (size_t)at * es;
        ncclResult_t rr = counts[r] > 0 ? ncclBroadcast(piece, piece, (size_t)counts[r] * es, ncclUint8, r, im->comm,
                                                        im->shared->stream)
                                        : ncclSuccess;
        if (first == ncclSuccess) first = rr;
        at += counts[r];
    }
    ncclResult_t end = ncclGroupEnd();
    if (first != ncclSuccess) return nccl_fail(c, "all_gather", first, err);
    if (end != ncclSuccess) return nccl_fail(c, "all_gather (group end)", end, err);
    return sync_stream(c, "all_gather", err);
}

// Queues the exchange: a send and a receive per peer inside one group (NCCL matches them),
// this rank's own piece as a copy on the same stream.
static int queue_all_to_all(nm_comm *c, const char *send, const int64_t *send_counts, const int64_t *send_displs,
                            char *recv, const int64_t *recv_counts, const int64_t *recv_displs, size_t es,
                            nm_error *err) {
    nccl_impl *im = impl_of(c);
    const int me = c->rank;
    if (send_counts[me] != recv_counts[me])
        return nm_error_set(err, "all_to_all (%s): sending %lld elements to self but expecting %lld", c->group,
                            (long long)send_counts[me], (long long)recv_counts[me]);
    NCCL_TRY(c, "all_to_all (group start)", ncclGroupStart());
    ncclResult_t first = ncclSuccess;
    int64_t s_at = 0, r_at = 0, s_me = 0, r_me = 0;
    for (int r = 0; r < c->size; r++) {
        int64_t sd = send_displs ? send_displs[r] : s_at, rd = recv_displs ? recv_displs[r] : r_at;
        ncclResult_t rs = ncclSuccess, rr = ncclSuccess;
        if (r == me) {
            s_me = sd;
            r_me = rd;
        } else {
            if (send_counts[r] > 0)
                rs = ncclSend(send + (size_t)sd * es, (size_t)send_counts[r] * es, ncclUint8, r, im->comm,
                              im->shared->stream);
            if (recv_counts[r] > 0)
                rr = ncclRecv(recv + (size_t)rd * es, (size_t)recv_counts[r] * es, ncclUint8, r, im->comm,
                              im->shared->stream);
        }
        if (first == ncclSuccess) first = rs != ncclSuccess ? rs : rr;
        s_at += send_counts[r];
        r_at += recv_counts[r];
    }
    ncclResult_t end = ncclGroupEnd();
    if (first != ncclSuccess) return nccl_fail(c, "all_to_all", first, err);
    if (end != ncclSuccess) return nccl_fail(c, "all_to_all (group end)", end, err);
    if (send_counts[me] > 0 && send + (size_t)s_me * es != recv + (size_t)r_me * es)
        CUDA_TRY(c, "all_to_all (own piece)", cudaMemcpyAsync(recv + (size_t)r_me * es, send + (size_t)s_me * es,
                                                              (size_t)send_counts[me] * es, cudaMemcpyDefault,
                                                              im->shared->stream));
    return 0;
}

static int nccl_all_to_all(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                           void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                           nm_error *err) {
    nccl_impl *im = impl_of(c);
    int via;
    if (route(c, "all_to_all", send, recv, &via, err) != 0) return -1;
    size_t es = nm_comm_dtype_size(dt);
    // Every element handed to the exchange, this rank's own piece included (as comm_mpi.c counts).
    nm_comm_count(c, NM_COMM_ALL_TO_ALL, nm_comm_sum_counts(send_counts, c->size) * (int64_t)es);
    if (via == ROUTE_MPI)
        return boot_of(c)->vt->all_to_all(im->boot, send, send_counts, send_displs, recv, recv_counts, recv_displs, dt,
                                        err);
    if (queue_all_to_all(c, send, send_counts, send_displs, recv, recv_counts, recv_displs, es, err) != 0) return -1;
    return sync_stream(c, "all_to_all", err);
}

static int nccl_all_to_all_start(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                                 void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                                 nm_comm_request *req, nm_error *err) {
    nccl_impl *im = impl_of(c);
    int via;
    if (route(c, "all_to_all", send, recv, &via, err) != 0) return -1;
    size_t es = nm_comm_dtype_size(dt);
    nm_comm_count(c, NM_COMM_ALL_TO_ALL, nm_comm_sum_counts(send_counts, c->size) * (int64_t)es);
    if (via == ROUTE_MPI)
        return boot_of(c)->vt->all_to_all_start(im->boot, send, send_counts, send_displs, recv, recv_counts,
                                              recv_displs, dt, req, err);
    if (queue_all_to_all(c, send, send_counts, send_displs, recv, recv_counts, recv_displs, es, err) != 0) return -1;
    return arm(c, NM_COMM_ALL_TO_ALL, req, err);
}

static int nccl_broadcast(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int root, nm_error *err) {
    nccl_impl *im = impl_of(c);
    int via;
    if (route(c, "broadcast", buf, NULL, &via, err) != 0) return -1;
    size_t es = nm_comm_dtype_size(dt);
    nm_comm_count(c, NM_COMM_BROADCAST, count * (int64_t)es);
    if (via == ROUTE_MPI) return boot_of(c)->vt->broadcast(im->boot, buf, count, dt, root, err);
    NCCL_TRY(c, "broadcast", ncclBroadcast(buf, buf, (size_t)count * es, ncclUint8, root, im->comm, im->shared->stream));
    return sync_stream(c, "broadcast", err);
}

// Point to point: MPI, for the tags and the never-waiting send (module comment).
static int nccl_send(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    nm_comm *boot = boot_of(c);
    nm_comm_count(c, NM_COMM_SEND, count * (int64_t)nm_comm_dtype_size(dt));
    return boot->vt->send(boot, buf, count, dt, peer, tag, err);
}

static int nccl_send_start(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                           nm_comm_request *req, nm_error *err) {
    nm_comm *boot = boot_of(c);
    nm_comm_count(c, NM_COMM_SEND, count * (int64_t)nm_comm_dtype_size(dt));
    return boot->vt->send_start(boot, buf, count, dt, peer, tag, req, err);
}

static int nccl_recv(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    nm_comm *boot = boot_of(c);
    nm_comm_count(c, NM_COMM_RECV, count * (int64_t)nm_comm_dtype_size(dt));
    return boot->vt->recv(boot, buf, count, dt, peer, tag, err);
}

// Every call before has synchronised its stream (or is the caller's to wait for), so the
// ranks meeting is all a barrier means: MPI's.
static int nccl_barrier(nm_comm *c, nm_error *err) {
    nm_comm *boot = boot_of(c);
    return boot->vt->barrier(boot, err);
}

// --- making communicators -------------------------------------------------------------------------

static nccl_shared *shared_stream;  // the process's one stream for NCCL (module comment)

// This process's GPU: the node-local rank modulo the devices, chosen once. Every rank of boot
// learns whether all have one before any waits in NCCL, so a job with one GPU-less node
// refuses on every rank instead of leaving the others in the bootstrap.
static int pick_device(nm_comm *boot, int *device, nm_error *err) {
    enum { NO_DEVICE, TOO_FEW, USABLE };
    int n = 0, local = 0, local_size = 1;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) cudaGetLastError();
    if (nm_comm_mpi_local_rank(boot, &local, &local_size, err) != 0) return -1;
    int mine = e != cudaSuccess || n < 1 ? NO_DEVICE : local_size > n ? TOO_FEW : USABLE, all = mine;
    if (boot->vt->all_reduce(boot, &all, 1, NM_DT_I32, NM_RED_MIN, err) != 0) return -1;
    if (mine == NO_DEVICE)
        return nm_error_set(err, "communicator nccl: no CUDA device is usable (cudaGetDeviceCount: %s): use the mpi "
                            "communicator", e != cudaSuccess ? cudaGetErrorString(e) : "no device found");
    if (mine == TOO_FEW)
        return nm_error_set(err, "communicator nccl: %d ranks on this node but %d GPU(s); NCCL needs a GPU per rank: "
                            "launch at most %d ranks per node, or use the mpi communicator", local_size, n, n);
    if (all != USABLE)
        return nm_error_set(err, "communicator nccl: another rank has no usable GPU (see its message): use the mpi "
                            "communicator");
    *device = local % n;
    e = cudaSetDevice(*device);
    if (e != cudaSuccess)
        return nm_error_set(err, "communicator nccl: device %d is not usable (%s): use the mpi communicator", *device,
                            cudaGetErrorString(e));
    return 0;
}

// A new NCCL communicator over the ranks of boot: rank 0's unique id, shared over MPI (with
// rank 0's status first, so a failed id fails every rank instead of hanging them).
static int bootstrap(nm_comm *boot, ncclComm_t *out, nm_error *err) {
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    int32_t status = ncclSuccess;
    if (boot->rank == 0) status = (int32_t)ncclGetUniqueId(&id);
    if (boot->vt->broadcast(boot, &status, 1, NM_DT_I32, 0, err) != 0) return -1;
    if (status != ncclSuccess)
        return nm_error_set(err, "communicator nccl (%s group): rank 0 could not make the NCCL unique id: %s",
                            boot->group, ncclGetErrorString((ncclResult_t)status));
    if (boot->vt->broadcast(boot, &id, (int64_t)sizeof id, NM_DT_U8, 0, err) != 0) return -1;
    ncclResult_t r = ncclCommInitRank(out, boot->size, id, boot->rank);
    if (r != ncclSuccess)
        return nm_error_set(err, "communicator nccl (%s group, rank %d of %d): ncclCommInitRank: %s", boot->group,
                            boot->rank, boot->size, ncclGetErrorString(r));
    return 0;
}

static const nm_comm_vtable nccl_vtable;

// Wraps boot and comm (both owned from here); checks NCCL ranked the group as MPI did.
static int wrap(nm_comm *boot, ncclComm_t comm, int is_world, nm_comm **out, nm_error *err) {
    int rank = -1;
    ncclResult_t r = ncclCommUserRank(comm, &rank);
    if (r != ncclSuccess || rank != boot->rank) {
        ncclCommDestroy(comm);
        nm_comm_destroy(boot);
        return r != ncclSuccess ? nm_error_set(err, "communicator nccl: ncclCommUserRank: %s", ncclGetErrorString(r))
                                : nm_error_set(err, "communicator nccl: NCCL ranked this process %d, MPI %d", rank,
                                               boot->rank);
    }
    nm_comm *c = nm_calloc(1, sizeof(*c));
    nccl_impl *im = nm_calloc(1, sizeof(*im));
    im->boot = boot;
    im->comm = comm;
    im->shared = shared_stream;
    im->shared->users++;
    c->vt = &nccl_vtable;
    c->impl = im;
    c->rank = boot->rank;
    c->size = boot->size;
    c->is_world = is_world;
    snprintf(c->group, sizeof(c->group), "%s", boot->group);
    *out = c;
    return 0;
}

int nm_comm_init_nccl(nm_comm **out, nm_comm *mpi_world, nm_error *err) {
    *out = NULL;
    int device = 0;
    if (pick_device(mpi_world, &device, err) != 0) goto fail;
    if (!shared_stream) {
        cudaStream_t s;
        // non-blocking: the backend's work on the default stream does not serialise with it
        cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            nm_error_set(err, "communicator nccl: cudaStreamCreate on device %d: %s", device, cudaGetErrorString(e));
            goto fail;
        }
        shared_stream = nm_calloc(1, sizeof(*shared_stream));
        shared_stream->stream = s;
        shared_stream->device = device;
    }
    ncclComm_t comm;
    if (bootstrap(mpi_world, &comm, err) != 0) goto fail;
    return wrap(mpi_world, comm, mpi_world->is_world, out, err);
fail:
    nm_comm_destroy(mpi_world);
    return -1;
}

static int nccl_split(nm_comm *c, int color, int key, nm_comm **out, nm_error *err) {
    nccl_impl *im = impl_of(c);
    nm_comm *sub_boot;
    *out = NULL;
    if (im->boot->vt->split(im->boot, color, key, &sub_boot, err) != 0) return -1;
    ncclComm_t sub;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    // colours and keys order the ranks as MPI_Comm_split does (key, then parent rank)
    ncclResult_t r = ncclCommSplit(im->comm, color, key, &sub, NULL);
    if (r != ncclSuccess) {
        nm_comm_destroy(sub_boot);
        return nccl_fail(c, "split", r, err);
    }
#else
    if (bootstrap(sub_boot, &sub, err) != 0) {
        nm_comm_destroy(sub_boot);
        return -1;
    }
#endif
    return wrap(sub_boot, sub, 0, out, err);
}

static void nccl_destroy(nm_comm *c) {
    nccl_impl *im = impl_of(c);
    cudaStreamSynchronize(im->shared->stream);  // nothing of ours may still run on the buffers
    ncclCommDestroy(im->comm);
    for (int i = 0; i < im->n_events; i++) cudaEventDestroy(im->events[i]);
    nm_free(im->events);
    nm_free(im->busy);
    if (--im->shared->users == 0) {
        cudaStreamDestroy(im->shared->stream);
        nm_free(im->shared);
        shared_stream = NULL;
    }
    nm_comm_destroy(im->boot);
    nm_free(im);
    nm_free(c);
}

// NCCL first (a rank blocked in a kernel cannot reach MPI_Abort's teardown otherwise), then MPI,
// whose launcher stops every rank.
static _Noreturn void nccl_abort(nm_comm *c, int code) {
    nccl_impl *im = impl_of(c);
    ncclCommAbort(im->comm);
    im->boot->vt->abort(im->boot, code);
    _Exit(code ? code : 1);  // MPI's abort does not return; keep the promise if it ever does
}

static const nm_comm_vtable nccl_vtable = {
    .name = "nccl",
    .all_reduce = nccl_all_reduce,
    .reduce_scatter_start = nccl_reduce_scatter_start,
    .all_gather = nccl_all_gather,
    .all_to_all = nccl_all_to_all,
    .broadcast = nccl_broadcast,
    .all_to_all_start = nccl_all_to_all_start,
    .send = nccl_send,
    .send_start = nccl_send_start,
    .recv = nccl_recv,
    .barrier = nccl_barrier,
    .split = nccl_split,
    .test = nccl_test,
    .wait = nccl_wait,
    .destroy = nccl_destroy,
    .abort = nccl_abort,
};
