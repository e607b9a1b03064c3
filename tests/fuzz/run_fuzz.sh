#!/usr/bin/env bash
# Short libFuzzer run of the .idx parser (registered by tests/fuzz/tests.cmake).
# usage: run_fuzz.sh FUZZ_BINARY [RUNS]
# Seeds: the worked example of formats.md 1.5 (int32) and a uint16 index with an empty
# document, each prefixed by its .bin size (2 bytes LE), so the fuzzer starts from valid
# indices and mutates the fields the validator checks.
set -euo pipefail
bin=$1
runs=${2:-20000}
work=$(mktemp -d fuzz_indexed.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus"
# bin size 28 | magic | version 1 | dtype 4 | S=2 | Dc=3 | len 4,3 | ptr 0,16 | doc 0,1,2
printf '\x1c\x00MMIDIDX\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x04\x02\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00' > "$work/corpus/worked"
# bin size 6 | dtype 8 | S=1 | Dc=3 | len 3 | ptr 0 | doc 0,0,1 (an empty first document)
printf '\x06\x00MMIDIDX\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x08\x01\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00' > "$work/corpus/uint16"
"$bin" -runs="$runs" -max_total_time=30 -max_len=512 -seed=0 "$work/corpus" 2>&1 | tail -n 5
