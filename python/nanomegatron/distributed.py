"""init_distributed: the process's place in the run, from the C library's own communicator.

It joins the communicator the CLI and nm_trainer_create use (nm_comm_init in src/comm/: MPI
when mpirun, mpiexec or srun started the process, else one process; NM_COMM=single|mpi forces
one), so `mpirun -np N python train.py` trains data-parallel (and expert-parallel with
expert_parallel_size) exactly as `mpirun -np N nanomegatron train` does.
"""
import ctypes
import os
from dataclasses import dataclass

from . import _lib
from ._lib import NMError, lib

_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


class _nm_comm_head(ctypes.Structure):
    # The leading fields of struct nm_comm (src/comm/comm.h): its vtable, then rank and size.
    _fields_ = [("vt", ctypes.c_void_p), ("rank", ctypes.c_int), ("size", ctypes.c_int)]


lib.nm_comm_init.restype = ctypes.c_int
lib.nm_comm_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_lib.nm_error)]

_context = None


def init_distributed():
    """The DistContext of this process (rank, world size, rank on its node). Initialises MPI
    once when launched by an MPI launcher; raises NMError with the library's message on failure."""
    global _context
    if _context is None:
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
        # The world handle stays open for the process (MPI is finalized at exit by the library).
        _context = DistContext(rank=head.rank, world_size=head.size, local_rank=local)
    return _context
