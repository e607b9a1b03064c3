#!/usr/bin/env bash
# test_memory_check.sh: a run that cannot fit this machine's memory is refused before anything
# is allocated (src/train/memcheck.c), with the planner's breakdown and the ways out, where it
# used to abort in the allocator (DeepSeek-V3 on one process: "fatal: model.c: out of memory
# allocating 2730545949696 aligned bytes") or be killed by the kernel with no message.
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

refused() {  # name, then train's arguments: exit 1, no abort, the breakdown and the ways out
  local name=$1 rc=0
  shift
  "$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --out "run-$name" --steps 1 "$@" > "$name.log" 2>&1 || rc=$?
  local text
  text=$(cat "$name.log")
  [ "$rc" = 1 ] || { echo "$text" >&2; fail "$name: exit $rc, expected 1"; }
  [[ $text != *fatal* ]] || { echo "$text" >&2; fail "$name: aborted"; }
  [[ $text == *"GiB per rank (planner: params"*"available for"*"--recompute"*"nanomegatron plan"* ]] \
    || { echo "$text" >&2; fail "$name: the refusal lacks the planner's breakdown or the ways out"; }
  [ ! -e "run-$name/latest" ] || fail "$name: a checkpoint was written"
}

refused deepseek-v3 --set model="$NM_ROOT/configs/deepseek-v3.json"
refused activations --set micro_batch=4096 --set global_batch=4096 --set seq_len=2048
# the same run fits with the shipped batch: the check does not refuse what fits
"$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --out fits --steps 1 > fits.log 2>&1 \
  || { cat fits.log >&2; fail "the tiny run was refused"; }
echo "ok: runs above the machine's memory are refused with the planner's numbers"
