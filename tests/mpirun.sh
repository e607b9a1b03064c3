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
# Each call is also cut off after NM_MPIRUN_TIMEOUT seconds (default 180), so a hung
# collective fails its test with a message instead of stalling `make test`: of the suite's 84
# mpiruns the longest took 18 s (8 ranks, tp2 x pp2 x dp2 x ep2 in test_dist_4d, on 2 busy
# cores); the ctest TIMEOUT of each test, in CMakeLists.txt, is the backstop. mpirun's own
# --timeout aborts the job, ranks included. coreutils timeout alone would not do: sent SIGTERM,
# mpirun 4.1.4 exits and leaves its ranks running; here it fires 30 s later, only for an
# mpirun that hangs itself.
nm_mpirun() {
  local n=$1 rc=0 session limit=${NM_MPIRUN_TIMEOUT:-180} start=$SECONDS; shift
  session=$(mktemp -d /tmp/nm-mpi.XXXXXX)
  timeout -k 10 $((limit + 30)) mpirun --timeout "$limit" --oversubscribe -np "$n" --mca orte_tmpdir_base "$session" \
    -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=passive "$@" || rc=$?
  rm -rf "$session"
  # (mpirun exits non-zero then; a rank that fails on its own does too, so the clock decides)
  if [ "$rc" -ne 0 ] && [ $((SECONDS - start)) -ge "$limit" ]; then
    echo "FAIL: mpirun -np $n $* ran past ${limit} s and was stopped (a hang? NM_MPIRUN_TIMEOUT sets the limit)" >&2
  fi
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
