#!/usr/bin/env bash
# scripts/gpu-check.sh: the one script to run on a lent GPU machine (H100/H200, 16 cores, no
# network, no root) from a clean checkout, in under 8 minutes, build included:
#
#   1. build: configure Release with -DNM_CUDA=ON and build the CLI and test_backend_ops
#      (-j nproc); the device query (nvidia-smi -L when present);
#   2. ops: test_backend_ops, every op of every backend against ref, the cuda backend included
#      (a SKIP(machine) of cuda fails here: this script is for machines with a GPU);
#   3. train: tests/test_backend_cuda.sh, configs/tiny-train.json 20 steps on cuda against cpu
#      within test_precision.sh's tolerance;
#   4. resume: a 12-step run on cuda against the same run stopped at step 6 (exit_interval)
#      and resumed: every logged loss and grad norm equal as text, final weights and AdamW
#      moments equal byte for byte (tests/test_resume.sh's rule, without the kills);
#   5. bench: configs/small-train.json in bf16 on cuda, a few timed steps after warm-up:
#      tokens/s, model TFLOP/s, MFU against the backend's measured GEMM peak (the trainer's
#      own numbers, metrics.jsonl) and against the card's dense bf16 peak where the card is
#      known (H100/H200 SXM: 989 TFLOP/s).
#
# Every check is bounded by `timeout`, and a failing one does not stop the others. The LAST
# line is a one-line JSON summary: each check's pass/fail, the numbers, the card, the times.
# Nothing here needs the network or root. The device machine copies the working tree, not
# build outputs: the build starts from nothing (NM_GPU_BUILD, default build-gpu).
#
# Environment: NM_GPU_BUILD [build-gpu], NM_GPU_JOBS [nproc], NM_GPU_BENCH_STEPS [6] (timed
# steps after 2 warm-up steps).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${NM_GPU_BUILD:-build-gpu}
JOBS=${NM_GPU_JOBS:-$(nproc)}
BENCH_STEPS=${NM_GPU_BENCH_STEPS:-6}
PY=$(command -v python3 || true)
T0=$SECONDS
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT
unset NM_BACKEND
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$JOBS}

say() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - T0)); }
# run NAME LIMIT_S CMD...: output to the terminal and to $LOG/NAME.log; its exit status
run() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  return "${PIPESTATUS[0]}"
}

build=fail ops=fail train=fail resume=fail bench=fail
card=unknown build_s=0 tok_s=null tflops=null mfu=null mfu_card=null

# --- 1. build and the device query ------------------------------------------------------------
say "build ($BUILD, -j$JOBS)"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L || true
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
fi
t=$SECONDS
if run configure 300 cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DNM_CUDA=ON &&
   run build 400 cmake --build "$BUILD" -j "$JOBS" --target nanomegatron test_backend_ops; then
  build=pass
fi
build_s=$((SECONDS - t))
BIN=$ROOT/$BUILD/nanomegatron

if [ $build = pass ]; then
  # --- 2. every op against the reference ---------------------------------------------------------
  say "ops: test_backend_ops (cuda and cpu against ref)"
  if (cd "$BUILD" && run ops 240 ./test_backend_ops) && grep -q "^=== backend cuda" "$LOG/ops.log"; then
    ops=pass
  fi

  # --- 3. tiny-train on cuda against cpu -------------------------------------------------------------
  say "train: tests/test_backend_cuda.sh (tiny-train 20 steps, cuda vs cpu)"
  if NM_BIN=$BIN NM_ROOT=$ROOT NM_PYTHON=${PY:-python3} run train 300 bash tests/test_backend_cuda.sh &&
     grep -q "^cuda: first" "$LOG/train.log"; then
    train=pass
  fi

  # --- 4. resume bit for bit on cuda -----------------------------------------------------------------
  say "resume: 12 steps vs 6 + resumed 6, on cuda"
  r=$LOG/resume
  mkdir -p "$r"
  cp tests/data/small-moe-model.json "$r/model.json"
  cat > "$r/train.json" <<'EOF'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 65536},
  "seq_len": 32, "micro_batch": 2, "global_batch": 4, "steps": 12, "seed": 7, "backend": "cuda",
  "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "clip_grad": 1.0},
  "schedule": {"type": "cosine", "warmup_steps": 2},
  "mtp": {"weight": 0.3, "weight_after": 0.1, "switch_step": 8},
  "checkpoint": {"save_every": 3, "keep_last": 0},
  "log": {"log_every": 1, "eval_every": 0}
}
EOF
  extract() {  # step loss ce mtp aux grad_norm, as written (text equality = bit equality)
    sed -E 's/^\{"step": ([0-9]+), "loss": ([^,]+),.*"ce_loss": ([^,]+),.*"mtp_loss": ([^,]+),.*"aux_loss": ([^,]+),.*"grad_norm": ([^,]+),.*$/\1 \2 \3 \4 \5 \6/' "$1"
  }
  if (cd "$r" && run resume_a 180 "$BIN" train --config train.json --out A --quiet &&
      run resume_b1 180 "$BIN" train --config train.json --out B --quiet --set exit_interval=6 &&
      run resume_b2 180 "$BIN" train --config train.json --out B --quiet --resume); then
    extract "$r/A/metrics.jsonl" > "$r/A.cmp"
    extract "$r/B/metrics.jsonl" > "$r/B.cmp"
    same=1
    [ "$(wc -l < "$r/A.cmp")" -eq 12 ] || { echo "resume: run A logged $(wc -l < "$r/A.cmp") steps, want 12"; same=0; }
    diff "$r/A.cmp" "$r/B.cmp" || { echo "resume: losses / grad norms differ (< uninterrupted, > resumed)"; same=0; }
    for f in model.safetensors optim_m.safetensors optim_v.safetensors; do
      cmp "$r/A/step_000012/$f" "$r/B/step_000012/$f" || { echo "resume: step_000012/$f differs"; same=0; }
    done
    [ $same = 1 ] && resume=pass && echo "resume: 12 steps equal bit for bit"
  fi

  # --- 5. bench: small in bf16 on cuda ---------------------------------------------------------------
  say "bench: configs/small-train.json bf16 on cuda, 2 warm-up + $BENCH_STEPS timed steps"
  if run bench 300 "$BIN" train --config configs/small-train.json --out "$LOG/bench" --quiet --set backend=cuda \
       --set precision=bf16 --steps $((BENCH_STEPS + 2)) --set log.log_every=1 --set log.eval_every=0 \
       --set checkpoint.save_every=0 && [ -n "$PY" ]; then
    nums=$("$PY" - "$LOG/bench/metrics.jsonl" "$card" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
# every step has the same tokens: tokens/s over the timed steps = steps / sum of 1 / (tokens/s)
tps = len(rows) / sum(1.0 / r["tokens_per_s"] for r in rows)
tf = sum(r["tflops"] for r in rows) / len(rows)
mfu = sum(r["mfu"] for r in rows) / len(rows)
# a NaN or inf would print as "nan" / "inf", which the JSON summary line cannot hold
if not all(math.isfinite(x) for x in (tps, tf, mfu)):
    sys.exit("bench: non-finite rates in metrics.jsonl: %r %r %r" % (tps, tf, mfu))
card = sys.argv[2]
dense = 989.0 if ("H100" in card or "H200" in card) else None   # SXM dense bf16 TFLOP/s
mfu_card = "null" if dense is None else "%.4f" % (tf / dense)
print("%.1f %.2f %.4f %s" % (tps, tf, mfu, mfu_card))
PY
)
    if [ -n "$nums" ]; then
      read -r tok_s tflops mfu mfu_card <<< "$nums"
      bench=pass
      echo "bench small bf16 cuda: $tok_s tokens/s, $tflops TFLOP/s, MFU $mfu of the measured GEMM peak, $mfu_card of the card's dense bf16 peak"
    fi
  fi
fi

total=$((SECONDS - T0))
printf '\n{"script": "gpu-check", "card": "%s", "build": "%s", "build_s": %d, "backend_ops": "%s", "tiny_train_cuda_vs_cpu": "%s", "resume_bitexact": "%s", "bench_small_bf16": "%s", "tokens_per_s": %s, "tflops": %s, "mfu_measured_peak": %s, "mfu_card_dense_peak": %s, "total_s": %d}\n' \
  "$card" "$build" "$build_s" "$ops" "$train" "$resume" "$bench" "$tok_s" "$tflops" "$mfu" "$mfu_card" "$total"
[ $build = pass ] && [ $ops = pass ] && [ $train = pass ] && [ $resume = pass ] && [ $bench = pass ]
