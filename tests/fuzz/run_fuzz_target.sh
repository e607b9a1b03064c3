#!/usr/bin/env bash
# Short libFuzzer run of one parser target (registered by tests/fuzz/tests.cmake).
# usage: run_fuzz_target.sh FUZZ_BINARY TARGET SOURCE_DIR [RUNS [MAX_LEN]]
# Seeds come from seeds.py (the repo's own configs and files made here); the regression
# inputs of tests/fuzz/corpus/TARGET (inputs that once crashed a parser) are replayed first.
#
# Exit 0 when nothing was found, 1 on any finding. libFuzzer's own exit code for a crash,
# abort, leak or failed check is 77 unless told otherwise, and 77 is the suite's
# SKIP_RETURN_CODE: such a finding once read as "Skipped". So the fuzzer gets
# -error_exitcode=1, and any non-zero exit becomes 1 here besides (tests/fuzz/check_runner.sh
# plants each kind of finding and checks this).
set -euo pipefail
bin=$1
target=$2
src=$3
runs=${4:-5000}
max_len=${5:-16384}
work=$(mktemp -d "fuzz_$target.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Failing inputs outlive the run, next to the build: `$bin FILE` replays one.
artifacts=$PWD/fuzz_artifacts/$target
mkdir -p "$artifacts"
python3 "$src/tests/fuzz/seeds.py" "$target" "$work/corpus" "$src"

# fuzz STAGE LINES ARGS...: one libFuzzer run; prints the last LINES of its output, or on a
# finding the report and a FAIL line, and exits 1.
fuzz() {
  local stage=$1 lines=$2 rc=0
  shift 2
  TMPDIR=$work "$bin" -error_exitcode=1 -timeout_exitcode=1 -artifact_prefix="$artifacts/" "$@" \
    >"$work/$stage.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 80 "$work/$stage.log"
    echo "FAIL: fuzz_$target ($stage) exited $rc: a crash, leak, sanitizer report or failed check;" \
         "the input is in $artifacts/ or named above (replay: $bin FILE)"
    exit 1
  fi
  tail -n "$lines" "$work/$stage.log"
}

regress=$src/tests/fuzz/corpus/$target
regress_files=()
[ -d "$regress" ] && regress_files=("$regress"/*)
if [ "${#regress_files[@]}" -gt 0 ] && [ -e "${regress_files[0]}" ]; then
  # A list of files: libFuzzer runs each once and fails on a crash, leak or sanitizer report.
  fuzz replay 3 "${regress_files[@]}"
fi
fuzz fuzz 5 -runs="$runs" -max_total_time=20 -max_len="$max_len" -seed=0 "$work/corpus"
