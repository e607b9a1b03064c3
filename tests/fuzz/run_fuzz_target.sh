#!/usr/bin/env bash
# Short libFuzzer run of one parser target (registered by tests/fuzz/tests.cmake).
# usage: run_fuzz_target.sh FUZZ_BINARY TARGET SOURCE_DIR [RUNS]
# Seeds come from seeds.py (the repo's own configs and files made here); the regression
# inputs of tests/fuzz/corpus/TARGET (inputs that once crashed a parser) are replayed first.
set -euo pipefail
bin=$1
target=$2
src=$3
runs=${4:-5000}
work=$(mktemp -d "fuzz_$target.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 "$src/tests/fuzz/seeds.py" "$target" "$work/corpus" "$src"
regress=$src/tests/fuzz/corpus/$target
if [ -d "$regress" ] && [ -n "$(ls -A "$regress")" ]; then
  # A list of files: libFuzzer runs each once and fails on a crash, leak or sanitizer report.
  "$bin" "$regress"/* 2>&1 | tail -n 3
fi
TMPDIR=$work "$bin" -runs="$runs" -max_total_time=20 -max_len=16384 -seed=0 "$work/corpus" 2>&1 | tail -n 5
