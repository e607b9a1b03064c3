#!/usr/bin/env bash
# test_dist_comm.sh: the communicator table and the mesh (tests/dist/dist_comm_check.c) on
# 1 process (the single table), then on 2, 3 and 4 MPI ranks.
set -euo pipefail
: "${NM_BUILD:?}" "${NM_ROOT:?}"
source "$NM_ROOT/tests/mpirun.sh"
"$NM_BUILD/dist_comm_check"
for n in 2 3 4; do nm_mpirun "$n" "$NM_BUILD/dist_comm_check"; done
echo "test_dist_comm: ok"
