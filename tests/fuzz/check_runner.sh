#!/usr/bin/env bash
# check_runner.sh: the fuzz runner reports every kind of finding as a failure, never as a skip.
# usage: check_runner.sh FUZZ_PLANTED_BINARY SOURCE_DIR (registered by tests/fuzz/tests.cmake)
#
# libFuzzer exits 77 on a crash, abort, leak or failed check unless given -error_exitcode, and
# 77 is the suite's SKIP_RETURN_CODE: every such finding once showed as "Skipped". Here
# fuzz_planted.c fails on purpose (NM_FUZZ_PLANT picks how) and run_fuzz_target.sh must exit
# non-zero and not 77, both when replaying a regression input (corpus/planted) and when the
# fuzzing stage meets it (a seed, planted_seed); the report must name the planted bug, so the
# failure is the one planted and not some other. Unplanted, the same runs must pass.
set -uo pipefail
bin=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }

for target in planted planted_seed; do
  rc=0
  env -u NM_FUZZ_PLANT bash "$src/tests/fuzz/run_fuzz_target.sh" "$bin" "$target" "$src" 200 >"$target-none.log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || { cat "$target-none.log"; fail "$target with nothing planted: the runner exited $rc, want 0"; }
  # mode | what the report must say
  for plant in "abort|deadly signal" "leak|LeakSanitizer" "overflow|heap-buffer-overflow" "ubsan|runtime error"; do
    mode=${plant%%|*}
    want=${plant#*|}
    rc=0
    NM_FUZZ_PLANT=$mode bash "$src/tests/fuzz/run_fuzz_target.sh" "$bin" "$target" "$src" 200 >"$target-$mode.log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ]; then
      cat "$target-$mode.log"
      fail "$target, planted $mode: the runner exited $rc, so ctest would report a found bug as $([ "$rc" -eq 0 ] && echo passed || echo skipped)"
    fi
    log=$(<"$target-$mode.log")
    [[ $log == *"$want"* ]] || { cat "$target-$mode.log"; fail "$target, planted $mode: the report lacks '$want'"; }
    [[ $log == *"FAIL: fuzz_$target"* ]] || { cat "$target-$mode.log"; fail "$target, planted $mode: no FAIL line"; }
    echo "$target, planted $mode: runner exited $rc ($want)"
  done
done
echo "check_runner: every planted finding fails the runner (exit 1, not 77)"
