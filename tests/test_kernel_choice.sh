#!/usr/bin/env bash
# test_kernel_choice.sh: the GEMM kernels measured at trainer start (src/ops/cpu/tuning.c)
#  1. a fresh run measures, prints the pick in the banner and writes run_dir/kernels.json;
#  2. a resume reads the pick back instead of measuring, and follows the file: with the
#     pick flipped in it (same key) the resume runs the flipped kernels (deterministic
#     given the cache, whatever a new timing would say);
#  3. NM_CPU_BF16_GEMM / NM_CPU_GEMM override the cached pick;
#  4. a corrupt kernels.json stops the run with a message naming the file;
#  5. a bad NM_CPU_KERNELS is refused;
#  6. where oneDNN has no bf16 matmul (AVX2-only CPUs, or ONEDNN_MAX_CPU_ISA=AVX2, as the
#     test_kernel_choice_avx2 variant runs this script), the pick skips it and says so, and a
#     cached onednn pick is refused with the fix instead of aborting.
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
export OMP_WAIT_POLICY=passive
unset NM_CPU_GEMM NM_CPU_BF16_GEMM
export NM_CPU_KERNELS=measure  # the suite runs with =default
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
train() { "$NM_BIN" train --config train.json --out run --set precision=bf16 "$@"; }

# 1. fresh run
train > fresh.log 2>&1 || { cat fresh.log >&2; fail "fresh run failed"; }
grep -q "^kernels fp32 [a-z]*, bf16 [a-z]* measured on" fresh.log || { cat fresh.log >&2; fail "no measured pick in the banner"; }
[ -s run/kernels.json ] || fail "run/kernels.json was not written"
fp32=$(sed -n 's/^kernels fp32 \([a-z]*\),.*/\1/p' fresh.log)
bf16=$(sed -n 's/^kernels fp32 [a-z]*, bf16 \([a-z]*\) .*/\1/p' fresh.log)
grep -q "\"fp32\":[[:space:]]*\"$fp32\"" run/kernels.json || fail "kernels.json does not hold fp32 $fp32"

cp run/kernels.json fresh-kernels.json
fresh_text=$(cat fresh.log)
no_onednn16=0
[[ $fresh_text == *"bf16 onednn: not available on this CPU"* ]] && no_onednn16=1
. "$NM_ROOT/tests/isa_expect.sh"
[ "$no_onednn16" != "$nm_expect_onednn_bf16" ] \
  || { cat fresh.log >&2; fail "bf16 onednn available=$((1 - no_onednn16)), expected $nm_expect_onednn_bf16 from the CPU flags and the ISA cap"; }
[ "$no_onednn16" = 0 ] || [ "$bf16" = widen ] || fail "bf16 onednn is not available, yet $bf16 was picked"

# 2. resume reads the file; a flipped pick is followed (bf16 stays widen where onednn cannot run)
case $fp32 in onednn) other32=openblas;; *) other32=onednn;; esac
case $bf16 in onednn) other16=widen;; *) other16=onednn;; esac
[ "$no_onednn16" = 0 ] || other16=widen
sed -i "s/\"fp32\":\([[:space:]]*\)\"$fp32\"/\"fp32\":\1\"$other32\"/; s/\"bf16\":\([[:space:]]*\)\"$bf16\"/\"bf16\":\1\"$other16\"/" run/kernels.json
train --resume --set steps=2 > resume.log 2>&1 || { cat resume.log >&2; fail "resume failed"; }
grep -q "^kernels fp32 $other32, bf16 $other16 (from run/kernels.json)" resume.log \
  || { cat resume.log >&2; fail "the resume did not take the cached pick fp32 $other32, bf16 $other16"; }

# 3. the environment overrides the cache
NM_CPU_BF16_GEMM=$bf16 NM_CPU_GEMM=$fp32 train --resume --set steps=3 > forced.log 2>&1 || { cat forced.log >&2; fail "forced run failed"; }
grep -q "^kernels fp32 $fp32, bf16 $bf16 (from run/kernels.json) | forced by environment" forced.log \
  || { cat forced.log >&2; fail "the environment did not override the cache"; }

# 4. a corrupt file is refused, naming it
printf '{"key": "x", "fp32": "fastest"' > run/kernels.json
rc=0
train --resume --set steps=4 > corrupt.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "a corrupt kernels.json was accepted"
grep -q "run/kernels.json: not a kernel choice" corrupt.log || { cat corrupt.log >&2; fail "the error does not name run/kernels.json"; }

# 5. a bad NM_CPU_KERNELS is refused, naming it
rc=0
NM_CPU_KERNELS=fastest "$NM_BIN" train --config train.json --out bad > bad.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -q "NM_CPU_KERNELS=fastest" bad.log || { cat bad.log >&2; fail "NM_CPU_KERNELS=fastest was not refused by name"; }

# 6. a cached onednn bf16 pick where oneDNN cannot run it: refused, naming the file and the fix
if [ "$no_onednn16" = 1 ]; then
  sed 's/"bf16":\([[:space:]]*\)"widen"/"bf16":\1"onednn"/' fresh-kernels.json > run/kernels.json
  rc=0
  train --resume --set steps=5 > cached16.log 2>&1 || rc=$?
  text=$(cat cached16.log)
  [ "$rc" = 1 ] || { cat cached16.log >&2; fail "a cached onednn bf16 pick on a CPU without it exited $rc, expected 1"; }
  [[ $text == *"run/kernels.json: bf16 kernel onednn cannot run here"* && $text != *fatal* ]] \
    || { cat cached16.log >&2; fail "the refusal of a cached onednn pick does not name the file"; }
fi
echo "ok (bf16 onednn available: $((1 - no_onednn16)))"
