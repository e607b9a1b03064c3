#!/usr/bin/env bash
# test_dist_nccl.sh: the nccl communicator (src/comm/comm_nccl.c) under mpirun -np 2.
#
# First, on every machine, NM_COMM=nccl with configs/tiny-train.json on 2 ranks (2 steps, the
# config's backend), and the same chosen by the config key (--set communicator=nccl). What must happen depends on
# the machine, and the test tells which from the answer:
#  - a build without NCCL: both refuse, "communicator nccl: this build has no NCCL"; exit 0;
#  - no GPU (the build machines): both refuse, "communicator nccl: no CUDA device is usable
#    (...): use the mpi communicator"; exit 0;
#  - one GPU: both refuse, "2 ranks on this node but 1 GPU(s)"; then SKIP(machine): one GPU;
#  - two GPUs or more: the run trains. dp2 and dp2 x ep2 (expert all-to-all, uneven buckets)
#    on nccl against the same on mpi (backend cuda both): per-step metrics within
#    tests/dist/compare_runs.py's tolerance (two ranks: a sum of two values does not depend on
#    the order, so the runs should agree far inside it).
# A refusal must be clean: a non-zero exit, no signal, no assertion or file:line in the output.
# Not yet run on a GPU: the two-GPU branch is written, not measured.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
unset NM_COMM NM_BACKEND  # each run names its own
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

# The refusal runs keep the config's backend (a build without CUDA refuses backend cuda before
# it reads the communicator); the comparisons run on cuda.
common=(--config "$NM_ROOT/configs/tiny-train.json" --quiet --set log.log_every=1 --set log.eval_every=0
        --set checkpoint.save_every=0)
cuda=(--steps 20 --set backend=cuda)

# name env... -- options...: a 2-rank run into $name (each rank started under env with the given
# variables), its exit status in $name.rc
run2() {
  local name=$1 rc=0; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  NM_MPIRUN_TIMEOUT=300 nm_mpirun 2 env "${envs[@]}" "$NM_BIN" train "${common[@]}" --out "$name" "$@" \
    >"$name.log" 2>&1 || rc=$?
  echo "$rc" >"$name.rc"
}

refused_cleanly() {  # name pattern: a clean refusal carrying pattern
  local name=$1 want=$2 rc
  rc=$(cat "$name.rc")
  if [ "$rc" -eq 0 ] || [ "$rc" -ge 128 ]; then cat "$name.log" >&2; fail "$name: exit status $rc, want a clean non-zero exit"; fi
  if grep -Eiq "check failed|NM_CHECK|panic|core dumped|Segmentation|signal 11|\.c:[0-9]+|\.cu:[0-9]+" "$name.log"; then
    cat "$name.log" >&2; fail "$name: the refusal looks like a crash"
  fi
  grep -Eq "$want" "$name.log" || { cat "$name.log" >&2; fail "$name: the refusal does not say: $want"; }
  [ ! -e "$name/metrics.jsonl" ] || fail "$name: the refused run wrote metrics"
}

run2 nccl_env NM_COMM=nccl -- --steps 2
run2 nccl_key NM_COMM= -- --steps 2 --set communicator=nccl
no_nccl="communicator nccl: this build has no NCCL"
no_gpu="communicator nccl: no CUDA device is usable \(cudaGetDeviceCount: .*\): use the mpi communicator"
one_gpu="communicator nccl: 2 ranks on this node but 1 GPU\(s\)"
if [ "$(cat nccl_env.rc)" -ne 0 ]; then
  for kind in no_nccl no_gpu one_gpu; do
    grep -Eq "${!kind}" nccl_env.log || continue
    refused_cleanly nccl_env "${!kind}"
    refused_cleanly nccl_key "${!kind}"
    echo "nccl refusal, as NM_COMM=nccl and as --set communicator=nccl (mpirun -np 2, tiny-train):"
    grep -Em1 "${!kind}" nccl_env.log | sed 's/^/  /'
    case $kind in
      no_nccl) echo "test_dist_nccl: passed (this build has no NCCL: checked the clean refusal of both ways to ask for it)"; exit 0 ;;
      no_gpu) echo "test_dist_nccl: passed (no GPU: checked the clean refusal; dp2 nccl against mpi needs two GPUs)"; exit 0 ;;
      one_gpu) nm_skip_machine "one GPU (checked the clean refusal of 2 ranks on it; dp2 nccl against mpi needs two)" ;;
    esac
  done
  cat nccl_env.log >&2
  fail "NM_COMM=nccl on 2 ranks failed, and not with a refusal this test knows"
fi

# --- two GPUs or more: nccl against mpi --------------------------------------------------------------
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
[ "$(cat nccl_key.rc)" -eq 0 ] || { cat nccl_key.log >&2; fail "--set communicator=nccl did not run where NM_COMM=nccl did"; }
compare() {  # name: nccl against mpi, same options
  local name=$1; shift
  run2 "${name}_nccl" NM_COMM=nccl -- "${cuda[@]}" "$@"
  run2 "${name}_mpi" NM_COMM=mpi -- "${cuda[@]}" "$@"
  for c in nccl mpi; do
    [ "$(cat "${name}_$c.rc")" -eq 0 ] || { cat "${name}_$c.log" >&2; fail "$name on $c did not run"; }
  done
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" "${name}_mpi/metrics.jsonl" "${name}_nccl/metrics.jsonl" "$name nccl vs mpi"
}
compare dp2
compare dp2_ep2 --set expert_parallel_size=2
echo "test_dist_nccl: passed (dp2 and dp2 x ep2 on nccl within compare_runs.py's tolerance of mpi)"
