#!/usr/bin/env bash
# Runs every unit-labelled test under valgrind memcheck (invalid accesses and definite leaks
# are errors). Valgrind 3.19 does not decode AVX-512, so this uses its own build for x86-64-v3
# and asks OpenBLAS for its AVX2 kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-vg -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g -march=x86-64-v3" >/dev/null
cmake --build build-vg -j "$(nproc)"
cd build-vg
tests=$(ctest -L unit -N | sed -n 's/^ *Test *#[0-9]*: *//p')
fail=0
for t in $tests; do
  rc=0
  OPENBLAS_CORETYPE=Haswell OMP_NUM_THREADS=1 NM_ROOT=.. NM_BIN=./nanomegatron \
    valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite "./$t" >"$t.valgrind.log" 2>&1 || rc=$?
  case $rc in
    0) echo "valgrind: $t ok" ;;
    77) echo "valgrind: $t skipped (it says why in build-vg/$t.valgrind.log; e.g. no bf16 ISA under valgrind)" ;;
    *) echo "valgrind: $t FAILED (build-vg/$t.valgrind.log)"; fail=1 ;;
  esac
done
exit $fail
