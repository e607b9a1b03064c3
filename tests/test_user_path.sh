#!/usr/bin/env bash
# test_user_path.sh: the path a user walks, with the environment a user has. The rest of the
# suite pins NM_CPU_KERNELS=default so that separate runs compare bit for bit; a user does not,
# so here nothing is overridden: a fresh `train` on the shipped tiny config measures the
# kernels (src/ops/cpu/tuning.c) and trains in fp32, bf16 and fp8, and the Python Trainer
# trains fresh. tests/isa/tests.cmake runs this script again with oneDNN capped at AVX2 and at
# AVX512_CORE, so every kind of x86-64 walks it on any machine (an AVX2-only CPU aborted here
# before: oneDNN 2.6 has no bf16 matmul there).
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
: "${NM_PYTHON:?NM_PYTHON must point to the test Python}"
unset NM_CPU_KERNELS NM_CPU_GEMM NM_CPU_BF16_GEMM NM_PEAK_GFLOPS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }
isa="${ONEDNN_MAX_CPU_ISA:-native}"

for precision in fp32 bf16 fp8; do
  rc=0
  "$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --out "run-$precision" --steps 3 \
    --set precision=$precision > "$precision.log" 2>&1 || rc=$?
  text=$(cat "$precision.log")
  [ "$rc" = 0 ] || { echo "$text" >&2; fail "fresh train, precision $precision, oneDNN ISA $isa: exit $rc"; }
  [[ $text == *"measured on"*"model GEMM shapes"* ]] || { echo "$text" >&2; fail "$precision: kernels not measured"; }
  [[ $text == *"step 3/3"* && $text == *"saved run-$precision/step_000003"* ]] \
    || { echo "$text" >&2; fail "$precision: no step 3 or no checkpoint"; }
  lines=$(wc -l < "run-$precision/metrics.jsonl")
  [ "$lines" -ge 3 ] || fail "$precision: metrics.jsonl has $lines lines, expected >= 3"
done

# The Python Trainer, fresh, from the installed package (make test installs it into .venv).
if ! "$NM_PYTHON" -c 'import nanomegatron' 2> import.log; then
  cat import.log >&2
  fail "the Python package does not import in $NM_PYTHON (make test installs it: scripts/deps.sh --with-venv)"
fi
"$NM_PYTHON" - > python.log 2>&1 <<'PY' || { cat python.log >&2; fail "Python Trainer, oneDNN ISA $isa"; }
from nanomegatron import Trainer, TrainConfig, DataConfig
config = TrainConfig(data=DataConfig(path=None, seq_len=32), batch_size=4, micro_batch_size=4, max_steps=2,
                     precision="bf16", eval_every=0, save_every=0)
losses = []
with Trainer(config, run_dir="py-run") as trainer:
    for step, metrics in trainer.train():
        losses.append(metrics.loss)
assert len(losses) == 2 and all(l == l and l > 0 for l in losses), losses
print("python losses", losses)
PY
echo "ok: fp32, bf16, fp8 and the Python Trainer trained fresh (oneDNN ISA $isa)"
