#!/usr/bin/env bash
# test_run_lock.sh: one trainer per run directory (src/train/run_lock.h).
#   1. While a run trains in RUN, a second `train --out RUN --resume` (a requeued job, a resume
#      loop started twice) and a second `train --out RUN` both exit non-zero at start, naming
#      the holder's pid and host, and leave RUN's metrics.jsonl whole (every line one step,
#      steps 1..n once each).
#   2. The holder killed with SIGKILL: its lock goes with it (the .lock file stays), and a
#      new `train --out RUN --resume` starts and finishes.
#   3. Under mpirun (two ranks, when there is one): a second job on a run dir in use is refused
#      the same way, from rank 0.
# Every process runs under `timeout`: a hang fails the test.
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
# The GEMM kernels of the static table, not measured per run dir: runs compared bit for bit
# must round alike (ctest sets this too).
export NM_CPU_KERNELS=${NM_CPU_KERNELS:-default}
LIMIT=300
tmp=$(mktemp -d)
bg=
. "$NM_ROOT/tests/bg_run.sh"  # kill_tree, the EXIT trap, n_steps, wait_steps, child_of
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

# ~50 ms steps, a checkpoint every 2; the holder has far more steps than the test waits for.
train=("$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --quiet --set seq_len=32 --set micro_batch=2
       --set global_batch=4 --set log.log_every=1 --set log.eval_every=0 --set checkpoint.save_every=2)
# Runs "$@" (a second trainer on run dir $1, in use) and checks it is refused naming pid $2.
refused() {
    local dir=$1 holder=$2 rc=0; shift 2
    timeout -k 10 $LIMIT "$@" > second.out 2>&1 || rc=$?
    [ $rc -ne 124 ] || fail "the second trainer hung"
    [ $rc -ne 0 ] || { cat second.out >&2; fail "a second trainer on a run dir in use started"; }
    grep -qF "$dir is in use by pid $holder on host $(hostname) (started " second.out \
        || { cat second.out >&2; fail "the refusal does not name the holder (pid $holder, host $(hostname))"; }
    grep -q "wait for it to finish or choose another --out" second.out || { cat second.out >&2; fail "the refusal says no way out"; }
}
metrics_whole() {   # every line of $1/metrics.jsonl one step's record, steps 1..n in order
    local n
    n=$(n_steps "$1")
    [ "$(grep -c '^{"step": [0-9]*, .*}$' "$1/metrics.jsonl")" -eq "$n" ] || fail "$1/metrics.jsonl has torn lines"
    [ "$(sed -E 's/^\{"step": ([0-9]+),.*/\1/' "$1/metrics.jsonl" | tr '\n' ' ')" = "$(seq 1 "$n" | tr '\n' ' ')" ] \
        || fail "$1/metrics.jsonl does not hold steps 1..$n once each"
}

# --- 1. a second trainer is refused -----------------------------------------------------------
timeout -k 10 $LIMIT "${train[@]}" --steps 100000 --out run > run.log 2>&1 & bg=$!
wait_steps run 3
holder=$(child_of "$bg")
grep -q "^pid $holder on host $(hostname) (started " run/.lock || { cat run/.lock >&2; fail "run/.lock does not name the holder"; }
refused run "$holder" "${train[@]}" --steps 100000 --out run --resume
refused run "$holder" "${train[@]}" --steps 100000 --out run
kill -0 "$holder" 2>/dev/null || { cat run.log >&2; fail "the holder did not survive the second trainers"; }
echo "a second trainer (with and without --resume) refused: pid $holder on host $(hostname)"

# --- 2. SIGKILL releases the lock -------------------------------------------------------------
wait_steps run 5
kill -9 "$holder"
wait "$bg" 2>/dev/null || true
bg=
[ -f run/.lock ] || fail "the lock file went with its holder (it should stay, unlocked)"
k=$(sed -E 's/step_0*//' run/latest)
rc=0
timeout -k 10 $LIMIT "${train[@]}" --steps $((k + 3)) --out run --resume > resume.log 2>&1 || rc=$?
[ $rc -eq 0 ] || { cat resume.log >&2; fail "train --resume after the holder's SIGKILL exited $rc"; }
[ "$(cat run/latest)" = "step_$(printf %06d $((k + 3)))" ] || fail "the resumed run did not reach step $((k + 3))"
metrics_whole run
echo "holder killed with SIGKILL at a checkpoint of step $k: --resume started and trained to step $((k + 3))"

# --- 3. two ranks -----------------------------------------------------------------------------
if ! command -v mpirun >/dev/null; then
    echo "note: mpirun not found, two-rank case skipped"
    echo "PASS test_run_lock"
    exit 0
fi
source "$NM_ROOT/tests/mpirun.sh"
session=$(mktemp -d /tmp/nm-mpi.XXXXXX)
trap 'cleanup; rm -rf "$session"' EXIT
mpi=(mpirun --oversubscribe -np 2 --mca orte_tmpdir_base "$session" -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=passive)
timeout -k 10 $LIMIT "${train[@]}" --steps 100000 --out dp > dp.log 2>&1 & bg=$!
wait_steps dp 2
holder=$(child_of "$bg")
refused dp "$holder" "${mpi[@]}" "${train[@]}" --steps 100000 --out dp --resume
grep -q "rank 0 of 2: dp is in use" second.out || { cat second.out >&2; fail "the refusal under mpirun is not rank 0's"; }
kill_tree "$bg"
wait "$bg" 2>/dev/null || true
bg=
metrics_whole dp
echo "a two-rank job on a run dir in use refused by rank 0"
echo "PASS test_run_lock"
