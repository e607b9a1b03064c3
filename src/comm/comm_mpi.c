// comm_mpi.c: the communicator table over MPI (Debian's OpenMPI; any MPI-3 library).
//
// One MPI communicator per nm_comm. Counts travel as int (MPI's count type): a piece over
// INT_MAX elements is refused with a message rather than truncated; buckets and dispatch
// buffers are far below that. bf16 moves as 16-bit integers; reductions run in fp32, fp64 or
// integers only (the CPU path never reduces bf16).
//
// Failure: nm_comm_abort calls MPI_Abort on the world, which makes the launcher (mpirun,
// srun) kill every rank of the job; a rank killed by a signal makes mpirun do the same.
// Errors inside MPI are returned (MPI_ERRORS_RETURN), not fatal, so they reach the caller's
// message.
#include <limits.h>
#include <stdlib.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>

#include "comm/comm.h"

_Static_assert(sizeof(MPI_Request) <= sizeof(((nm_comm_request *)0)->impl), "MPI_Request fits the request");

static MPI_Comm handle(const nm_comm *c) { return *(const MPI_Comm *)c->impl; }

static MPI_Datatype mpi_type(nm_comm_dtype dt) {
    switch (dt) {
    case NM_DT_F32: return MPI_FLOAT;
    case NM_DT_BF16: return MPI_UINT16_T;
    case NM_DT_I32: return MPI_INT32_T;
    case NM_DT_I64: return MPI_INT64_T;
    case NM_DT_F64: return MPI_DOUBLE;
    case NM_DT_U8: return MPI_UINT8_T;
    }
    NM_PANIC("unknown dtype %d", (int)dt);
}

static int mpi_fail(nm_comm *c, const char *what, int code, nm_error *err) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, msg, &len);
    return nm_error_set(err, "%s (%s group, rank %d of %d): MPI error: %.*s", what, c->group, c->rank, c->size, len,
                        msg);
}

static int fits_int(nm_comm *c, const char *what, int64_t n, nm_error *err) {
    if (n >= 0 && n <= INT_MAX) return 0;
    return nm_error_set(err, "%s (%s group): %lld elements do not fit an MPI count (at most %d per piece)", what,
                        c->group, (long long)n, INT_MAX);
}

// counts (int64) -> int counts + displacements, in caller-provided scratch of size c->size.
static int to_int_counts(nm_comm *c, const char *what, const int64_t *counts, int *icounts, int *displs,
                         nm_error *err) {
    int64_t at = 0;
    for (int r = 0; r < c->size; r++) {
        if (fits_int(c, what, counts[r], err) != 0 || fits_int(c, what, at, err) != 0) return -1;
        icounts[r] = (int)counts[r];
        displs[r] = (int)at;
        at += counts[r];
    }
    return 0;
}

typedef struct mpi_impl {
    MPI_Comm comm;
    int *icounts, *displs;      // (size) scratch
    int *icounts2, *displs2;    // (size) scratch for all_to_all's receive side
    // MPI must not see a non-blocking operation's count array change before it completes, and
    // several reduce-scatters are in flight at once: each takes a slot of (size) ints until
    // its test or wait completes it. Slots are added when all are busy (the first step) and
    // kept, so a steady step loop allocates nothing.
    int **slots;                // (n_slots) each (size) counts
    unsigned char *slot_busy;   // (n_slots)
    int n_slots;
} mpi_impl;

// The handle a request carries in its impl bytes.
typedef struct mpi_request {
    MPI_Request handle;
    int slot;
} mpi_request;
_Static_assert(sizeof(mpi_request) <= sizeof(((nm_comm_request *)0)->impl), "MPI request does not fit nm_comm_request");

static int take_slot(mpi_impl *im, int size) {
    for (int i = 0; i < im->n_slots; i++) {
        if (!im->slot_busy[i]) {
            im->slot_busy[i] = 1;
            return i;
        }
    }
    int n = im->n_slots ? 2 * im->n_slots : 8;
    im->slots = nm_realloc(im->slots, (size_t)n * sizeof(int *));
    im->slot_busy = nm_realloc(im->slot_busy, (size_t)n);
    for (int i = im->n_slots; i < n; i++) {
        im->slots[i] = nm_calloc((size_t)(4 * size), sizeof(int));  // an all-to-all's four arrays
        im->slot_busy[i] = 0;
    }
    int got = im->n_slots;
    im->n_slots = n;
    im->slot_busy[got] = 1;
    return got;
}

static mpi_impl *impl_of(nm_comm *c) { return (mpi_impl *)c->impl; }

static int mpi_all_reduce(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, nm_reduce_op op, nm_error *err) {
    if (dt == NM_DT_BF16 || dt == NM_DT_U8)
        return nm_error_set(err, "all_reduce (%s): %s reductions are not supported on MPI", c->group,
                            dt == NM_DT_U8 ? "byte" : "bf16");
    MPI_Op mop = op == NM_RED_SUM ? MPI_SUM : op == NM_RED_MAX ? MPI_MAX : MPI_MIN;
    size_t es = nm_comm_dtype_size(dt);
    nm_comm_count(c, NM_COMM_ALL_REDUCE, count * (int64_t)es);
    // In pieces of at most 2^30 elements so any count works.
    for (int64_t at = 0; at < count; at += (int64_t)1 << 30) {
        int64_t n = count - at < ((int64_t)1 << 30) ? count - at : ((int64_t)1 << 30);
        int rc = MPI_Allreduce(MPI_IN_PLACE, (char *)buf + (size_t)at * es, (int)n, mpi_type(dt), mop, handle(c));
        if (rc != MPI_SUCCESS) return mpi_fail(c, "all_reduce", rc, err);
    }
    return 0;
}

static int mpi_reduce_scatter_start(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_comm_request *req,
                                    nm_error *err) {
    if (dt == NM_DT_BF16 || dt == NM_DT_U8)
        return nm_error_set(err, "reduce_scatter (%s): %s reductions are not supported on MPI", c->group,
                            dt == NM_DT_U8 ? "byte" : "bf16");
    mpi_impl *im = impl_of(c);
    if (to_int_counts(c, "reduce_scatter", counts, im->icounts, im->displs, err) != 0) return -1;
    memset(req, 0, sizeof(*req));
    req->comm = c;
    req->op = NM_COMM_REDUCE_SCATTER;
    req->buf = buf;
    req->offset = im->displs[c->rank];
    req->count = counts[c->rank];
    req->elem = nm_comm_dtype_size(dt);
    nm_comm_count(c, NM_COMM_REDUCE_SCATTER, nm_comm_sum_counts(counts, c->size) * (int64_t)req->elem);
    mpi_request *mr = (mpi_request *)req->impl;
    mr->slot = take_slot(im, c->size);
    memcpy(im->slots[mr->slot], im->icounts, (size_t)c->size * sizeof(int));
    // In place: the input is the whole bucket, MPI leaves this rank's reduced piece at the
    // start of buf; wait moves it to its own place.
    int rc = MPI_Ireduce_scatter(MPI_IN_PLACE, buf, im->slots[mr->slot], mpi_type(dt), MPI_SUM, handle(c),
                                 &mr->handle);
    if (rc != MPI_SUCCESS) {
        im->slot_busy[mr->slot] = 0;
        return mpi_fail(c, "reduce_scatter", rc, err);
    }
    req->active = 1;
    return 0;
}

static void finish_request(nm_comm_request *req) {
    req->active = 0;
    int slot = ((mpi_request *)req->impl)->slot;
    if (slot >= 0) impl_of(req->comm)->slot_busy[slot] = 0;  // a send holds none
    if (req->op != NM_COMM_REDUCE_SCATTER) return;          // nothing to move
    if (req->offset > 0 && req->count > 0) {
        memmove((char *)req->buf + (size_t)req->offset * req->elem, req->buf, (size_t)req->count * req->elem);
    }
}

// "send (wait)", for messages.
static const char *request_name(const nm_comm_request *req, const char *call) {
    static _Thread_local char name[48];
    snprintf(name, sizeof name, "%s (%s)", nm_comm_op_name(req->op), call);
    return name;
}

static int mpi_test(nm_comm_request *req, int *done, nm_error *err) {
    int flag = 0;
    int rc = MPI_Test(&((mpi_request *)req->impl)->handle, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return mpi_fail(req->comm, request_name(req, "test"), rc, err);
    if (flag) finish_request(req);
    *done = flag;
    return 0;
}

static int mpi_wait(nm_comm_request *req, nm_error *err) {
    int rc = MPI_Wait(&((mpi_request *)req->impl)->handle, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return mpi_fail(req->comm, request_name(req, "wait"), rc, err);
    finish_request(req);
    return 0;
}

static int mpi_all_gather(nm_comm *c, void *buf, const int64_t *counts, nm_comm_dtype dt, nm_error *err) {
    mpi_impl *im = impl_of(c);
    if (to_int_counts(c, "all_gather", counts, im->icounts, im->displs, err) != 0) return -1;
    nm_comm_count(c, NM_COMM_ALL_GATHER, nm_comm_sum_counts(counts, c->size) * (int64_t)nm_comm_dtype_size(dt));
    int rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, im->icounts, im->displs, mpi_type(dt), handle(c));
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "all_gather", rc, err);
}

// Explicit displacements replace the prefix sums to_int_counts wrote (each checked to fit an int).
static int set_displs(nm_comm *c, const int64_t *displs, int *idispls, nm_error *err) {
    for (int r = 0; displs && r < c->size; r++) {
        if (fits_int(c, "all_to_all", displs[r], err) != 0) return -1;
        idispls[r] = (int)displs[r];
    }
    return 0;
}

static int mpi_all_to_all(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                          void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                          nm_error *err) {
    mpi_impl *im = impl_of(c);
    if (to_int_counts(c, "all_to_all", send_counts, im->icounts, im->displs, err) != 0) return -1;
    if (to_int_counts(c, "all_to_all", recv_counts, im->icounts2, im->displs2, err) != 0) return -1;
    if (set_displs(c, send_displs, im->displs, err) != 0 || set_displs(c, recv_displs, im->displs2, err) != 0) return -1;
    // Every element handed to the exchange, this rank's own piece included (docs/parallelism.md).
    int64_t sent = nm_comm_sum_counts(send_counts, c->size);
    nm_comm_count(c, NM_COMM_ALL_TO_ALL, sent * (int64_t)nm_comm_dtype_size(dt));
    int rc = MPI_Alltoallv(send, im->icounts, im->displs, mpi_type(dt), recv, im->icounts2, im->displs2, mpi_type(dt),
                           handle(c));
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "all_to_all", rc, err);
}

// The same, started: MPI_Ialltoallv with its four count arrays in a slot until it completes.
static int mpi_all_to_all_start(nm_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                                void *recv, const int64_t *recv_counts, const int64_t *recv_displs, nm_comm_dtype dt,
                                nm_comm_request *req, nm_error *err) {
    mpi_impl *im = impl_of(c);
    const int n = c->size;
    if (to_int_counts(c, "all_to_all", send_counts, im->icounts, im->displs, err) != 0) return -1;
    if (to_int_counts(c, "all_to_all", recv_counts, im->icounts2, im->displs2, err) != 0) return -1;
    if (set_displs(c, send_displs, im->displs, err) != 0 || set_displs(c, recv_displs, im->displs2, err) != 0) return -1;
    memset(req, 0, sizeof(*req));
    req->comm = c;
    req->op = NM_COMM_ALL_TO_ALL;
    nm_comm_count(c, NM_COMM_ALL_TO_ALL, nm_comm_sum_counts(send_counts, n) * (int64_t)nm_comm_dtype_size(dt));
    mpi_request *mr = (mpi_request *)req->impl;
    mr->slot = take_slot(im, n);
    int *a = im->slots[mr->slot];
    memcpy(a, im->icounts, (size_t)n * sizeof(int));
    memcpy(a + n, im->displs, (size_t)n * sizeof(int));
    memcpy(a + 2 * n, im->icounts2, (size_t)n * sizeof(int));
    memcpy(a + 3 * n, im->displs2, (size_t)n * sizeof(int));
    int rc = MPI_Ialltoallv(send, a, a + n, mpi_type(dt), recv, a + 2 * n, a + 3 * n, mpi_type(dt), handle(c),
                            &mr->handle);
    if (rc != MPI_SUCCESS) {
        im->slot_busy[mr->slot] = 0;
        return mpi_fail(c, "all_to_all", rc, err);
    }
    req->active = 1;
    return 0;
}

static int mpi_broadcast(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int root, nm_error *err) {
    if (fits_int(c, "broadcast", count, err) != 0) return -1;
    nm_comm_count(c, NM_COMM_BROADCAST, count * (int64_t)nm_comm_dtype_size(dt));
    int rc = MPI_Bcast(buf, (int)count, mpi_type(dt), root, handle(c));
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "broadcast", rc, err);
}

static int mpi_send(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    if (fits_int(c, "send", count, err) != 0) return -1;
    nm_comm_count(c, NM_COMM_SEND, count * (int64_t)nm_comm_dtype_size(dt));
    int rc = MPI_Send(buf, (int)count, mpi_type(dt), peer, tag, handle(c));
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "send", rc, err);
}

static int mpi_send_start(nm_comm *c, const void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag,
                          nm_comm_request *req, nm_error *err) {
    if (fits_int(c, "send", count, err) != 0) return -1;
    memset(req, 0, sizeof(*req));
    req->comm = c;
    req->op = NM_COMM_SEND;
    nm_comm_count(c, NM_COMM_SEND, count * (int64_t)nm_comm_dtype_size(dt));
    mpi_request *mr = (mpi_request *)req->impl;
    mr->slot = -1;
    int rc = MPI_Isend(buf, (int)count, mpi_type(dt), peer, tag, handle(c), &mr->handle);
    if (rc != MPI_SUCCESS) return mpi_fail(c, "send", rc, err);
    req->active = 1;
    return 0;
}

static int mpi_recv(nm_comm *c, void *buf, int64_t count, nm_comm_dtype dt, int peer, int tag, nm_error *err) {
    if (fits_int(c, "recv", count, err) != 0) return -1;
    nm_comm_count(c, NM_COMM_RECV, count * (int64_t)nm_comm_dtype_size(dt));
    int rc = MPI_Recv(buf, (int)count, mpi_type(dt), peer, tag, handle(c), MPI_STATUS_IGNORE);
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "recv", rc, err);
}

static int mpi_barrier(nm_comm *c, nm_error *err) {
    int rc = MPI_Barrier(handle(c));
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "barrier", rc, err);
}

static nm_comm *mpi_wrap(MPI_Comm comm, int is_world);

static int mpi_split(nm_comm *c, int color, int key, nm_comm **out, nm_error *err) {
    MPI_Comm sub;
    int rc = MPI_Comm_split(handle(c), color, key, &sub);
    if (rc != MPI_SUCCESS) return mpi_fail(c, "split", rc, err);
    MPI_Comm_set_errhandler(sub, MPI_ERRORS_RETURN);
    *out = mpi_wrap(sub, 0);
    return 0;
}

static void mpi_destroy(nm_comm *c) {
    mpi_impl *im = impl_of(c);
    // The world handle is only a wrapper: MPI itself is finalised at exit (finalize_at_exit),
    // so a library user may create and destroy trainers one after another.
    if (!c->is_world) MPI_Comm_free(&im->comm);
    nm_free(im->icounts);
    nm_free(im->displs);
    nm_free(im->icounts2);
    nm_free(im->displs2);
    for (int i = 0; i < im->n_slots; i++) nm_free(im->slots[i]);
    nm_free(im->slots);
    nm_free(im->slot_busy);
    nm_free(im);
    nm_free(c);
}

static _Noreturn void mpi_abort(nm_comm *c, int code) {
    fflush(stdout);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    _Exit(code ? code : 1);  // MPI_Abort does not return; keep the promise if it ever does
}

static const nm_comm_vtable mpi_vtable = {
    .name = "mpi",
    .all_reduce = mpi_all_reduce,
    .reduce_scatter_start = mpi_reduce_scatter_start,
    .all_gather = mpi_all_gather,
    .all_to_all = mpi_all_to_all,
    .broadcast = mpi_broadcast,
    .all_to_all_start = mpi_all_to_all_start,
    .send = mpi_send,
    .send_start = mpi_send_start,
    .recv = mpi_recv,
    .barrier = mpi_barrier,
    .split = mpi_split,
    .test = mpi_test,
    .wait = mpi_wait,
    .destroy = mpi_destroy,
    .abort = mpi_abort,
};

static nm_comm *mpi_wrap(MPI_Comm comm, int is_world) {
    nm_comm *c = nm_calloc(1, sizeof(*c));
    mpi_impl *im = nm_calloc(1, sizeof(*im));
    im->comm = comm;
    c->vt = &mpi_vtable;
    c->impl = im;
    c->is_world = is_world;
    MPI_Comm_rank(comm, &c->rank);
    MPI_Comm_size(comm, &c->size);
    im->icounts = nm_calloc((size_t)c->size, sizeof(int));
    im->displs = nm_calloc((size_t)c->size, sizeof(int));
    im->icounts2 = nm_calloc((size_t)c->size, sizeof(int));
    im->displs2 = nm_calloc((size_t)c->size, sizeof(int));
    snprintf(c->group, sizeof(c->group), "%s", is_world ? "world" : "split");
    return c;
}

static void finalize_at_exit(void) {
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized) MPI_Finalize();
}

void nm_comm_job_position(int *rank, int *size) {
    int inited = 0, finalized = 0;
    *rank = 0;
    *size = 1;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized) {
        MPI_Comm_rank(MPI_COMM_WORLD, rank);
        MPI_Comm_size(MPI_COMM_WORLD, size);
    }
}

_Noreturn void nm_comm_abort_job(int code) {
    int inited = 0, finalized = 0, size = 1;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &size);
    fflush(stdout);
    fflush(stderr);
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    exit(code);
}

int nm_comm_init_mpi(nm_comm **world, nm_error *err) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        // Only the main thread calls MPI (OpenMP threads compute between calls).
        int provided = 0;
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) return nm_error_set(err, "MPI_Init_thread failed (code %d)", rc);
        atexit(finalize_at_exit);
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    *world = mpi_wrap(MPI_COMM_WORLD, 1);
    return 0;
}

// --- choosing the implementation (here, so that comm.c alone needs no MPI) --------------------------------------------------------------

static int launched_by_mpi(void) {
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        if (getenv(vars[i])) return 1;
    }
    // srun without an MPI plugin still sets the task count; more than one task is a job.
    const char *ntasks = getenv("SLURM_NTASKS");
    return ntasks && atoi(ntasks) > 1 && getenv("SLURM_PROCID");
}

int nm_comm_init_as(nm_comm **world, const char *name, nm_error *err) {
    *world = NULL;
    if (nm_comm_check_name(name, "communicator:", err) != 0) return -1;
    int auto_pick = !name || !*name || !strcmp(name, "auto");
    if (auto_pick ? !launched_by_mpi() : !strcmp(name, "single")) {
        *world = nm_comm_single();
        return 0;
    }
    if (nm_comm_init_mpi(world, err) != 0) return -1;
    if (auto_pick || strcmp(name, "nccl") != 0) return 0;
    // NCCL bootstraps over the MPI world, which it then owns.
    nm_comm *mpi = *world;
    *world = NULL;
    return nm_comm_init_nccl(world, mpi, err);
}

int nm_comm_init(nm_comm **world, nm_error *err) {
    *world = NULL;
    const char *force = getenv("NM_COMM");
    if (force && *force && nm_comm_check_name(force, "NM_COMM:", err) != 0) return -1;
    return nm_comm_init_as(world, force, err);
}

// The launcher's node-local rank when it gives one (OpenMPI, MPICH/Hydra, Slurm), else MPI's
// shared-memory split of c; the size from the same split, so both come from one answer when
// the variables are absent.
int nm_comm_mpi_local_rank(nm_comm *c, int *local_rank, int *local_size, nm_error *err) {
    MPI_Comm node;
    int rc = MPI_Comm_split_type(handle(c), MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node);
    if (rc != MPI_SUCCESS) return mpi_fail(c, "split_type (node-local ranks)", rc, err);
    MPI_Comm_rank(node, local_rank);
    MPI_Comm_size(node, local_size);
    MPI_Comm_free(&node);
    static const char *const vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) {
            *local_rank = atoi(v);
            break;
        }
    }
    return 0;
}
