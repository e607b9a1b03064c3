// memcheck.h: refuse a training layout that cannot fit this machine's memory before anything
// is allocated. Without it a model far above the RAM ended in an allocator abort, and one just
// above it passed malloc and was killed by the kernel while its buffers were zero-filled, with
// no message at all.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "model/config.h"
#include "train/train_config.h"

// Bytes this process may still take: MemAvailable of /proc/meminfo, lowered to the cgroup's
// memory.max - memory.current where a limit is set. -1 where neither can be read.
int64_t nm_memory_available_bytes(void);
// This process's peak resident memory so far in bytes (getrusage's ru_maxrss), or -1.
int64_t nm_memory_peak_rss_bytes(void);

// Processes of the job on this machine: the launcher's count (OpenMPI's
// OMPI_COMM_WORLD_LOCAL_SIZE, MPICH's MPI_LOCALNRANKS, Slurm's SLURM_NTASKS_PER_NODE), else
// the whole world (one machine).
int64_t nm_local_ranks(int64_t world);

// Compares the planner's per-rank total for this run (nm_plan_compute: the sizes the allocator
// will take, for the stage pp_rank holds) with available / local_ranks. 0 when it fits or the
// check is switched off (NM_MEMORY_CHECK=off); -1 with err giving the breakdown and the ways
// out (more ranks, recompute, a smaller micro-batch, `nanomegatron plan`).
int nm_train_check_memory(const nm_train_config *cfg, const nm_model_config *m, int64_t world, int recompute,
                          int64_t pp_rank, nm_error *err);
