# mpirun.sh: sourced by the multi-process tests. nm_mpirun N CMD... runs CMD on N ranks with
# Debian's OpenMPI on however few cores there are (--oversubscribe), as root too (CI runs as
# root: OpenMPI refuses that unless told), one OpenMP thread per rank, output tagged by rank.
source "$(dirname "${BASH_SOURCE[0]}")/skip.sh"
command -v mpirun >/dev/null || nm_skip "mpirun not found (apt-get install openmpi-bin)"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# No network probing inside containers: loopback and shared memory are all a test needs.
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_plm_rsh_agent=false
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
# Each call gets its own session directory: two mpiruns at once (ctest -j) otherwise share
# /tmp/ompi.HOST.UID, and one finishing removes it while the other creates its own inside
# ("mkdir ... File exists", orte_init failed), seen in `make test` with -j 2.
nm_mpirun() {
  local n=$1 rc=0 session; shift
  session=$(mktemp -d /tmp/nm-mpi.XXXXXX)
  mpirun --oversubscribe -np "$n" --mca orte_tmpdir_base "$session" -x OMP_NUM_THREADS=1 \
    -x OMP_WAIT_POLICY=passive "$@" || rc=$?
  rm -rf "$session"
  return $rc
}

# nm_compare_layout NAME RANKS CONFIG REF [options...]: trains CONFIG on RANKS ranks into NAME
# and compares its per-step metrics with the one-process run REF (tests/dist/compare_runs.py).
# Needs NM_BIN, PY, NM_ROOT and the caller's fail().
nm_compare_layout() {
  local name=$1 n=$2 cfg=$3 ref=$4; shift 4
  nm_mpirun "$n" "$NM_BIN" train --config "$cfg" --out "$name" --quiet "$@" >"$name.log" 2>&1 \
    || { cat "$name.log"; fail "$name did not run"; }
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" "$ref/metrics.jsonl" "$name/metrics.jsonl" "$name"
}
