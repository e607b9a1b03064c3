#!/usr/bin/env bash
# Runs every unit-labelled test under valgrind memcheck (invalid accesses and definite leaks
# are errors). Valgrind 3.19 does not decode AVX-512, so this uses its own build for x86-64-v3
# and asks OpenBLAS for its AVX2 kernels. The fp32 GEMM runs through OpenBLAS here
# (NM_CPU_GEMM=openblas unless a test sets it): oneDNN's sgemm runs code it generates at run
# time, whose vector loads read a few bytes past the end of oneDNN's own packing buffers
# (seen as "Invalid read of size 32" at ??? inside blocks oneDNN allocated); memcheck cannot
# tell that from a bug and has no stack to suppress it by. The oneDNN path is covered by
# `make sanitize` (ASan instruments our code around it) and by every other test.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-vg -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g -march=x86-64-v3" >/dev/null
cmake --build build-vg -j "$(nproc)"
cd build-vg
# One line per unit test: name, then its command, then its extra environment (NM_CPU_GEMM=...
# variants run an existing test binary under another kernel), tab-separated, from ctest's JSON.
tests=$(ctest -L unit --show-only=json-v1 | python3 -c '
import json, sys
for t in json.load(sys.stdin)["tests"]:
    env = [e for p in t.get("properties", []) if p["name"] == "ENVIRONMENT" for e in p["value"]
           if e.startswith(("NM_CPU_GEMM=", "NM_CPU_BF16_GEMM="))]
    print("\t".join([t["name"], " ".join(["./" + t["command"][0].split("/")[-1]] + t["command"][1:]), " ".join(env)]))
')
fail=0
while IFS=$'\t' read -r t cmd extra_env; do
  rc=0
  # shellcheck disable=SC2086
  env NM_CPU_GEMM=openblas $extra_env OPENBLAS_CORETYPE=Haswell OMP_NUM_THREADS=1 NM_ROOT=.. NM_BIN=./nanomegatron \
    valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
      --suppressions=../scripts/valgrind.supp $cmd >"$t.valgrind.log" 2>&1 || rc=$?
  case $rc in
    0) echo "valgrind: $t ok" ;;
    77) echo "valgrind: $t skipped (it says why in build-vg/$t.valgrind.log; e.g. no bf16 ISA under valgrind)" ;;
    *) echo "valgrind: $t FAILED (build-vg/$t.valgrind.log)"; fail=1 ;;
  esac
done <<< "$tests"
exit $fail
