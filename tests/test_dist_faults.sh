#!/usr/bin/env bash
# test_dist_faults.sh: faults in a 2-rank data-parallel run (ZeRO-1) cost nothing but time:
# after each one, --resume reproduces the uninterrupted run bit for bit (every step's loss
# terms, gradient norm, learning rate and skip flag equal as text, steps 1..12 once each, and
# the final checkpoint's shard files byte-identical).
#   1. rank 1 killed with SIGKILL from outside, mid-run (the job stops within 30 s);
#   2. rank 1 killed in step 6's save, its shards written, before rank 0 commits;
#   3. rank 0 killed in the commit: the temporary directory complete, not renamed;
#   4. rank 0 killed after the rename, before `latest` names the new checkpoint;
#   5. the newest checkpoint corrupt (a byte flipped in rank 1's model shard; rank 0's AdamW
#      shard truncated): every rank rejects it and falls back to the previous one;
#   6. a NaN produced on rank 1 alone, before any reduction: every rank skips that step, ends
#      with the same parameters, and the run equals one where every rank had the NaN.
# Every rank runs under `timeout` (mpi2): a hang fails the test instead of stalling it.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}" "${NM_BUILD:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
# The MFU's peak is not under test: skip its start-up GEMM timing in each of the ~15 runs.
export NM_PEAK_GFLOPS=100
tmp=$(mktemp -d)
here=$(cd "$tmp" && pwd -P)
launcher=
# On an early exit, the background job's mpirun and ranks are killed.
cleanup() {
  set +e  # only cleaning up: the result is decided already
  local p
  if [[ -n $launcher ]]; then
    for p in $(pgrep -P "$launcher") $(ranks_here); do kill -9 "$p" 2>/dev/null; done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"
# ranks_here: the pids of the nanomegatron processes working in this directory (fails if none).
ranks_here() {
  local p out=
  for p in $(pgrep -x nanomegatron); do
    [[ $(readlink "/proc/$p/cwd" 2>/dev/null) == "$here" ]] && out+="$p "
  done
  [[ -n $out ]] && echo "$out"
}
fail() { echo "FAIL: $*" >&2; exit 1; }
t_start=$SECONDS
GUARD=$NM_BUILD/dist_guard_check
[[ -x $GUARD ]] || fail "$GUARD is not built (tests/dist/tests.cmake builds it)"

cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
# keep_last 0 keeps every checkpoint: a corrupt newest one needs an older one to fall back to.
cat > train.json <<'JSON'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 65536},
  "seq_len": 32, "micro_batch": 1, "global_batch": 4, "steps": 12, "seed": 11, "threads": 1,
  "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "clip_grad": 1.0},
  "schedule": {"warmup_steps": 2},
  "log": {"log_every": 1, "eval_every": 0},
  "checkpoint": {"save_every": 3, "keep_last": 0}
}
JSON

# mpi2 CMD...: CMD on 2 ranks, each under `timeout` (a run here takes seconds): a rank stuck
# in a collective exits 124 (137 if SIGTERM did not end it), and mpirun then stops the job.
limit=${NM_FAULTS_TIMEOUT:-120}
mpi2() { nm_mpirun 2 timeout -k 5 "$limit" "$@"; }
# ran NAME RC: fails, with NAME's log, unless the job NAME exited with status 0.
ran() {
  [[ $2 == 0 ]] && return
  cat "$1.log"
  [[ $2 != 124 && $2 != 137 ]] || fail "$1: mpirun exited with $2: a rank ran past ${limit} s (a hang?)"
  fail "$1: mpirun exited with $2"
}
# train2 NAME [options...]: 2 ranks train into NAME, log in NAME.log; fails unless it succeeds.
train2() {
  local name=$1 rc=0; shift
  mpi2 "$NM_BIN" train --config train.json --out "$name" "$@" >"$name.log" 2>&1 || rc=$?
  ran "$name" $rc
}
# same_as_ref NAME LABEL: NAME's metrics equal ref's as text, and its final checkpoint's
# shard files (parameters and both AdamW moments of each rank) equal ref's byte for byte.
same_as_ref() {
  local name=$1 label=$2 f
  "$PY" "$NM_ROOT/tests/dist/same_steps.py" ref/metrics.jsonl "$name/metrics.jsonl" "$label"
  local files=(ref/step_000012/*.safetensors)
  [[ ${#files[@]} == 6 ]] || fail "ref/step_000012 holds ${#files[@]} shard files, want 6 (3 per rank)"
  for f in "${files[@]}"; do
    cmp "$f" "$name/step_000012/${f##*/}" || fail "$label: final ${f##*/} differs from the uninterrupted run's"
  done
}
# resumed NAME STEP: NAME resumed (not quiet, so rank 0 says from where) from step STEP.
resumed() {
  local name=$1 step=$2 log
  train2 "$name" --resume
  log=$(<"$name.log")
  [[ $log == *"resume: continuing from $name/step_$(printf %06d "$step") (step $step)"* ]] \
    || { echo "$log"; fail "$name did not resume from step $step"; }
}
# latest_is NAME STEP
latest_is() {
  local got
  got=$(<"$1/latest")
  [[ $got == "step_$(printf %06d "$2")" ]] || fail "$1/latest names '$got', want step $2 (files: $(ls "$1"))"
}

# --- the uninterrupted run ------------------------------------------------------------------
train2 ref --quiet
echo "reference: 12 steps on 2 ranks, $((SECONDS - t_start)) s"

# --- 1. rank 1 killed with SIGKILL from outside ---------------------------------------------
mpi2 "$NM_BIN" train --config train.json --out kill --quiet >kill.log 2>&1 &
launcher=$!
for _ in $(seq 1 600); do [[ -e kill/latest ]] && break; sleep 0.05; done
[[ -e kill/latest ]] || { cat kill.log; fail "no checkpoint after 30 s"; }
# rank 1: a process named nanomegatron working in this test's directory (other tests may run
# at the same time) with rank 1's environment
victim=
if pids=$(ranks_here); then
  for p in $pids; do
    env=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null) || continue
    [[ $'\n'$env$'\n' == *$'\nOMPI_COMM_WORLD_RANK=1\n'* ]] && victim=$p
  done
fi
[[ -n $victim ]] || { cat kill.log; fail "rank 1 not found among [${pids:-}]"; }
stop=$SECONDS
kill -9 "$victim"
rc=0; wait "$launcher" || rc=$?
launcher=
waited=$((SECONDS - stop))
[[ $rc != 0 ]] || { cat kill.log; fail "the job finished normally: the kill came after its end"; }
[[ $waited -le 30 ]] || fail "the job took ${waited} s to stop after rank 1 was killed"
for _ in $(seq 1 50); do
  left=$(ranks_here) || break
  sleep 0.1
done
[[ -z $left ]] || fail "processes left running 5 s after the job stopped: $left"
ckpt=$(<kill/latest)
echo "1. rank 1 (pid $victim) killed after ${ckpt}: job stopped in ${waited} s (mpirun status $rc)"
resumed kill "$((10#${ckpt#step_}))"
same_as_ref kill "1. killed rank 1, resumed"

# --- 2-4. a rank killed at a point of step 6's save (NM_TEST_KILL_IN_SAVE=RANK:STEP:PHASE) ----
# kill_in_save NAME SPEC: the job must die there; checks of the directory follow per case.
kill_in_save() {
  local name=$1 spec=$2 rc=0 start=$SECONDS
  NM_TEST_KILL_IN_SAVE=$spec mpi2 "$NM_BIN" train --config train.json --out "$name" --quiet \
    >"$name.log" 2>&1 || rc=$?
  [[ $rc != 0 ]] || { cat "$name.log"; fail "$name: the job survived NM_TEST_KILL_IN_SAVE=$spec"; }
  [[ $((SECONDS - start)) -lt $limit ]] || fail "$name: the job hung after NM_TEST_KILL_IN_SAVE=$spec (stopped by timeout)"
}
n_tmp() { local d n=0; for d in "$1"/step_000006.tmp.*; do [[ -e $d ]] && n=$((n + 1)); done; echo $n; }

kill_in_save shards 1:6:shards
latest_is shards 3
[[ ! -e shards/step_000006 ]] || fail "rank 1 died before the commit, yet step_000006 exists"
[[ $(n_tmp shards) == 1 ]] || fail "no half-written step_000006.tmp.* after rank 1 died mid-save: $(ls shards)"
resumed shards 3
[[ $(n_tmp shards) == 0 ]] || fail "the resumed run's save left the stale temporary directory"
same_as_ref shards "2. rank 1 killed in the save before the commit, resumed"

kill_in_save commit 0:6:commit
latest_is commit 3
[[ ! -e commit/step_000006 ]] || fail "rank 0 died before the rename, yet step_000006 exists"
tmpd=(commit/step_000006.tmp.*)
[[ -e ${tmpd[0]}/trainer.json ]] || fail "the kill was not in the commit: no trainer.json in ${tmpd[*]}"
resumed commit 3
same_as_ref commit "3. rank 0 killed in the commit (before the rename), resumed"

kill_in_save renamed 0:6:latest
latest_is renamed 3
[[ -e renamed/step_000006/trainer.json ]] || fail "the kill was not after the rename: $(ls renamed)"
resumed renamed 3
latest_is renamed 12
same_as_ref renamed "4. rank 0 killed between the rename and latest, resumed"

# --- 5. a corrupt newest checkpoint: every rank falls back to the previous one -------------
# corrupt_resume NAME: resumes NAME, whose step 12 was damaged, and checks each rank's report.
corrupt_resume() {
  local name=$1 log
  resumed "$name" 9
  log=$(<"$name.log")
  "$PY" - "$name" "$log" <<'PY'
import sys
name, log = sys.argv[1], sys.argv[2]
bad = [l for l in log.splitlines() if f"checkpoint: {name}/step_000012 is not usable" in l]
use = [l for l in log.splitlines() if f"checkpoint: using {name}/step_000009 instead" in l]
# find_valid runs on every rank: two reports each means both ranks rejected step 12 and took step 9
if len(bad) != 2 or len(use) != 2:
    sys.exit(f"FAIL {name}: want 2 ranks rejecting step 12 and using step 9, got {len(bad)} and {len(use)}:\n{log}")
print(f"{name}: both ranks: {bad[0].split(': ', 2)[-1][:110]}")
PY
}
cp -r ref flip
f=flip/step_000012/model-00002-of-00002.safetensors
"$PY" -c "import sys; b = bytearray(open(sys.argv[1], 'rb').read()); b[len(b) // 2] ^= 1; open(sys.argv[1], 'wb').write(b)" "$f"
if cmp -s "$f" ref/step_000012/model-00002-of-00002.safetensors; then fail "the byte flip did not change $f"; fi
corrupt_resume flip
same_as_ref flip "5a. rank 1's model shard of step 12 with a flipped byte, resumed"

cp -r ref trunc
truncate -s -8 trunc/step_000012/optim_v-00001-of-00002.safetensors
corrupt_resume trunc
same_as_ref trunc "5b. rank 0's AdamW shard of step 12 truncated, resumed"

# --- 6. a NaN on rank 1 alone, before any reduction ------------------------------------------
# dist_guard_check poisons a gradient at step 5 before the backward (the hook of --inject-nan)
# and writes each rank's skipped steps and parameter CRC to RUN/rank_<r>.txt.
guard2() {
  local name=$1 rc=0
  mpi2 "$GUARD" train.json "$name" 5 checkpoint.save_every=0 >"$name.log" 2>&1 || rc=$?
  ran "$name" $rc
}
guard2 nan_all
NM_TEST_INJECT_NAN_RANK=1 guard2 nan_rank1
for run in nan_all nan_rank1; do
  r0=$(<"$run/rank_0.txt"); r1=$(<"$run/rank_1.txt")
  [[ $r0 == "skipped steps: 5"$'\n'* ]] || fail "$run: rank 0 did not skip exactly step 5: $r0"
  [[ $r1 == "$r0" ]] || fail "$run: the ranks disagree:"$'\n'"rank 0: $r0"$'\n'"rank 1: $r1"
done
all=$(<nan_all/rank_0.txt); one=$(<nan_rank1/rank_0.txt)
[[ $one == "$all" ]] || fail "NaN on rank 1 only vs on every rank: $one / $all"
log=$(<nan_rank1.log)
[[ $log == *"step 5: non-finite gradient (first in model.layers.0.input_layernorm.weight); update skipped"* ]] \
  || { echo "$log"; fail "nan_rank1: the skip of step 5 was not reported"; }
"$PY" "$NM_ROOT/tests/dist/same_steps.py" nan_all/metrics.jsonl nan_rank1/metrics.jsonl "6. NaN on rank 1 only"
echo "6. NaN on rank 1 at step 5: both ranks skipped step 5 only; $(sed -n 2p nan_rank1/rank_0.txt) on both"

echo "test_dist_faults: ok ($((SECONDS - t_start)) s)"
