"""init_distributed: the process's place in the run.

The C library has no communicator yet (the trainer runs with world 1), so this reports one
process, and refuses to pretend when a launcher (mpirun, srun) started several: N copies of
a single-process run would each train the whole model on the whole batch and write the same
run directory. Once the library's MPI layer lands, this is where its communicator is joined
(the same one the CLI uses).
"""
import os
from dataclasses import dataclass

from ._lib import NMError

# What mpirun (Open MPI, MPICH / Intel MPI / PMI) and srun set in every rank's environment.
_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _launcher_world():
    for var in _WORLD_VARS:
        v = os.environ.get(var)
        if v and v.isdigit() and int(v) > 1:
            if var == "SLURM_NTASKS" and "SLURM_PROCID" not in os.environ:
                continue  # an sbatch allocation, not an srun step
            return var, int(v)
    return None, 1


def init_distributed():
    """The DistContext of this process: rank 0 of 1. Raises NMError under a multi-process launch,
    which this build of the library cannot serve yet."""
    var, world = _launcher_world()
    if world > 1:
        raise NMError(f"init_distributed: {var}={world}: launched as {world} processes, but the C library has no "
                      f"MPI communicator yet (data/tensor/expert/pipeline parallelism is not implemented); "
                      f"run one process")
    return DistContext()
