#!/usr/bin/env bash
# test_kernel_env.sh: the environment variables that pick the CPU GEMM kernels
# (NM_CPU_GEMM, NM_CPU_BF16_GEMM; src/ops/cpu/gemm*.c) are checked, never guessed:
#  1. a value outside the list stops the run with a message naming the variable and the value
#     (no silent fallback to a default kernel);
#  2. each listed value trains, and the banner names the kernels that ran; where oneDNN has no
#     bf16 matmul (below AVX-512: AVX2-only CPUs, or the test_kernel_env_avx2 variant's cap)
#     NM_CPU_BF16_GEMM=onednn is refused with the fix instead (exit 1, no abort).
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
export OMP_WAIT_POLICY=passive
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat > train.json <<'JSON'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 16384},
  "seq_len": 16, "micro_batch": 2, "global_batch": 2, "steps": 1, "seed": 3,
  "log": {"log_every": 1, "eval_every": 0},
  "checkpoint": {"save_every": 0}
}
JSON

# 1. bad values
for var in NM_CPU_GEMM NM_CPU_BF16_GEMM; do
  rc=0
  env "$var=fastest" "$NM_BIN" train --config train.json --out "bad-$var" --set precision=bf16 > "bad-$var.log" 2>&1 || rc=$?
  [ "$rc" -ne 0 ] || fail "$var=fastest was accepted"
  grep -q "$var=fastest" "bad-$var.log" || { cat "bad-$var.log" >&2; fail "the error does not name $var=fastest"; }
done

# 2. every listed value runs and is reported
. "$NM_ROOT/tests/isa_expect.sh"
for gemm in onednn openblas; do
  for bf16 in onednn widen; do
    if [ "$bf16" = onednn ] && [ "$nm_expect_onednn_bf16" = 0 ]; then
      rc=0
      NM_CPU_GEMM=$gemm NM_CPU_BF16_GEMM=onednn "$NM_BIN" train --config train.json --out "run-$gemm-$bf16" \
        --set precision=bf16 > "run-$gemm-$bf16.log" 2>&1 || rc=$?
      text=$(cat "run-$gemm-$bf16.log")
      [ "$rc" = 1 ] && [[ $text == *"NM_CPU_BF16_GEMM=onednn: oneDNN"*"has no bf16 matmul"*"NM_CPU_BF16_GEMM=widen"* ]] &&
        [[ $text != *fatal* ]] || { cat "run-$gemm-$bf16.log" >&2; fail "NM_CPU_BF16_GEMM=onednn below AVX-512: exit $rc, expected 1 with the fix"; }
      continue
    fi
    NM_CPU_GEMM=$gemm NM_CPU_BF16_GEMM=$bf16 "$NM_BIN" train --config train.json --out "run-$gemm-$bf16" \
      --set precision=bf16 > "run-$gemm-$bf16.log" 2>&1 || { cat "run-$gemm-$bf16.log" >&2; fail "$gemm/$bf16 run failed"; }
    grep -q "fp32 GEMM $gemm, bf16 GEMM $bf16" "run-$gemm-$bf16.log" ||
      { cat "run-$gemm-$bf16.log" >&2; fail "the banner does not name fp32 GEMM $gemm, bf16 GEMM $bf16"; }
  done
done
echo "OK: kernel selection is checked and reported"
