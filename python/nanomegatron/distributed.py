"""init_distributed: the process's place in the run, from the C library's own communicator.

It joins the communicator the CLI and nm_trainer_create use (nm_comm_init in src/comm/: MPI
when mpirun, mpiexec or srun started the process, else one process; NM_COMM=single|mpi|nccl forces
one), so `mpirun -np N python train.py` trains data-parallel (and expert-parallel with
expert_parallel_size) exactly as `mpirun -np N nanomegatron train` does.

With sizes, init_distributed(tensor_parallel_size=2, expert_parallel_size=2, ...) also places
the rank on the 4-D mesh as the trainer does (src/comm/mesh.h: rank = tp + TP x (dp + DP x pp),
expert parallelism folded out of dp x tp): the context carries every group's size and this
rank's coordinate, and create_model(config, ctx) builds this rank's shard of that layout.
"""
import ctypes
import os
import sys
from dataclasses import dataclass

from . import _lib
from ._lib import ConfigError, NMError, lib

_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # the mesh (sizes, then this rank's coordinates)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    edp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0

    @property
    def parallel(self):
        """True when the model is split or replicated over more than this process."""
        return self.world_size > 1

    def shutdown(self):
        """Waits for every rank (a barrier over the world). MPI itself is finalized by the library
        when the process exits; models and optimizers are freed when their last reference goes."""
        shutdown()


class _nm_comm_head(ctypes.Structure):
    # The leading fields of struct nm_comm (src/comm/comm.h): its vtable, then rank and size.
    _fields_ = [("vt", ctypes.c_void_p), ("rank", ctypes.c_int), ("size", ctypes.c_int)]


class _nm_mesh_sizes(ctypes.Structure):
    _fields_ = [(k, ctypes.c_int64) for k in ("world", "tp", "pp", "ep", "dp", "edp")]


lib.nm_comm_init.restype = ctypes.c_int
lib.nm_comm_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_lib.nm_error)]
lib.nm_comm_barrier_export.restype = ctypes.c_int
lib.nm_comm_barrier_export.argtypes = [ctypes.c_void_p, ctypes.POINTER(_lib.nm_error)]
lib.nm_comm_abort_job.restype = None
lib.nm_comm_abort_job.argtypes = [ctypes.c_int]
lib.nm_mesh_coords.restype = None
lib.nm_mesh_coords.argtypes = [ctypes.POINTER(_nm_mesh_sizes), ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 5

_world = None  # the library's world communicator, open for the process
_base = None   # (rank, world_size, local_rank)


def _abort_job_on_uncaught(previous):
    """sys.excepthook for a rank of a multi-process job: the traceback as usual, then the whole
    job stopped (nm_comm_abort_job, MPI_Abort), as the CLI stops it on a rank's error; the other
    ranks would otherwise wait in their next collective until the launcher's timeout."""
    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.write(f"rank {_base[0]}: {kind.__name__}: stopping every rank of the job\n")
        sys.stderr.flush()
        lib.nm_comm_abort_job(1)
    return hook


def _join():
    global _world, _base
    if _world is None:
        world = ctypes.c_void_p()
        err = _lib.nm_error()
        _lib.check(lib.nm_comm_init(ctypes.byref(world), err), err)
        head = _nm_comm_head.from_address(world.value)
        local = 0
        for var in _LOCAL_RANK_VARS:
            v = os.environ.get(var)
            if v and v.isdigit():
                local = int(v)
                break
        _world, _base = world, (head.rank, head.size, local)
        if head.size > 1:
            sys.excepthook = _abort_job_on_uncaught(sys.excepthook)
    return _base


def init_distributed(tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1):
    """The DistContext of this process: rank, world size, rank on its node, and its place on the
    mesh of the given sizes (data parallelism takes the rest of the world). Initialises MPI once
    when launched by an MPI launcher; raises NMError with the library's message on failure and
    ConfigError for sizes the world does not divide."""
    rank, world, local = _join()
    tp, pp, ep = int(tensor_parallel_size), int(pipeline_parallel_size), int(expert_parallel_size)
    if min(tp, pp, ep) < 1:
        raise ConfigError(f"init_distributed: sizes tp {tp}, pp {pp}, ep {ep} must be >= 1")
    if world % (tp * pp):
        raise ConfigError(f"init_distributed: world size {world} is not divisible by tensor_parallel_size {tp} x "
                          f"pipeline_parallel_size {pp}")
    dp = world // (tp * pp)
    if (dp * tp) % ep:
        raise ConfigError(f"init_distributed: expert_parallel_size {ep} does not divide data x tensor parallel "
                          f"{dp} x {tp} (experts fold out of them)")
    sizes = _nm_mesh_sizes(world, tp, pp, ep, dp, dp * tp // ep)
    c = [ctypes.c_int() for _ in range(5)]
    lib.nm_mesh_coords(ctypes.byref(sizes), rank, *[ctypes.byref(x) for x in c])
    return DistContext(rank=rank, world_size=world, local_rank=local, tp=tp, pp=pp, dp=dp, ep=ep, edp=sizes.edp,
                       tp_rank=c[0].value, dp_rank=c[1].value, pp_rank=c[2].value, ep_rank=c[3].value,
                       edp_rank=c[4].value)


def shutdown():
    """Waits for every rank of the job (a barrier over the library's world communicator)."""
    if _world is not None:
        err = _lib.nm_error()
        _lib.check(lib.nm_comm_barrier_export(_world, err), err)
