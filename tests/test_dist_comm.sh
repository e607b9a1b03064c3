#!/usr/bin/env bash
# test_dist_comm.sh: the communicator table and the mesh (tests/dist/dist_comm_check.c) on
# 1 process (the single table), then on 2, 3 and 4 MPI ranks; the same for the distributed
# optimizer's ranges and checkpoint exchange (tests/dist/dist_zero_check.c).
set -euo pipefail
: "${NM_BUILD:?}" "${NM_ROOT:?}"
source "$NM_ROOT/tests/mpirun.sh"
"$NM_BUILD/dist_comm_check"
for n in 2 3 4; do nm_mpirun "$n" "$NM_BUILD/dist_comm_check"; done
# the distributed optimizer's ranges and checkpoint exchange (tests/dist/dist_zero_check.c)
"$NM_BUILD/dist_zero_check"
for n in 2 3 4; do nm_mpirun "$n" "$NM_BUILD/dist_zero_check"; done
echo "test_dist_comm: ok"
