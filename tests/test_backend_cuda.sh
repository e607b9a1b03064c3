#!/usr/bin/env bash
# test_backend_cuda.sh: the cuda backend from the host side, wherever the build has it.
#
#  - A build without CUDA (NM_CUDA=OFF, or no toolkit found): skips, saying so (under CI=true
#    that is a failure: CI has the toolkit, so its build must have the backend).
#  - No GPU (the build machines): `train --set backend=cuda` and NM_BACKEND=cuda run the device
#    query (the backend's setup) and must exit non-zero with the backend's message, "backend
#    cuda: no CUDA device is usable (...)", and nothing that looks like a crash (no signal, no
#    "check failed", no panic's file:line, no core dump).
#  - A GPU: configs/tiny-train.json for 20 steps on cuda and on cpu, from the same init and data
#    (test_backend_ref.sh's pattern, test_precision.sh's tolerance): the first step's CE within
#    1e-4 relative (one forward over the same weights, only the ops differ: fp32 cuBLASLt
#    against oneDNN/OpenBLAS; the bound is a guess until a GPU run measures it), the mean CE of
#    the last 10 steps within 3% of cpu's, both runs having learned.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
source "$NM_ROOT/tests/skip.sh"
PY=${NM_PYTHON:-python3}
unset NM_BACKEND  # the runs name their backend; the environment variable would override both
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

common=(--config "$NM_ROOT/configs/tiny-train.json" --steps 20 --quiet --set log.eval_every=0
        --set checkpoint.save_every=0)

# --- the device query, through the trainer (the backend's setup runs before anything else) --------
set +e
"$NM_BIN" train "${common[@]}" --out "$work/cuda" --set backend=cuda > "$work/cuda.log" 2>&1
rc=$?
set -e
if grep -q "this build has no CUDA backend" "$work/cuda.log"; then
  nm_skip "this build has no CUDA backend (configure with -DNM_CUDA=ON on a machine with the CUDA toolkit)"
fi

crash_free() {  # $1 log, $2 rc: a clean refusal, not a crash
  local log=$1 code=$2
  if [ "$code" -eq 0 ] || [ "$code" -ge 128 ]; then echo "FAIL: exit status $code, want a clean non-zero exit" >&2; return 1; fi
  if grep -Eiq "check failed|NM_CHECK|panic|core dumped|Aborted|Segmentation|\.c:[0-9]+|\.cu:[0-9]+" "$log"; then
    echo "FAIL: the refusal looks like a crash:" >&2; cat "$log" >&2; return 1
  fi
  if ! grep -q "backend cuda: no CUDA device is usable (cudaGetDeviceCount: .*): train on backend cpu, or run on a machine with an NVIDIA GPU" "$log"; then
    echo "FAIL: the refusal does not carry the backend's message:" >&2; cat "$log" >&2; return 1
  fi
}

if [ "$rc" -ne 0 ]; then
  echo "no usable GPU: train --set backend=cuda exited $rc with:"
  sed 's/^/  /' "$work/cuda.log"
  crash_free "$work/cuda.log" "$rc"
  set +e
  NM_BACKEND=cuda "$NM_BIN" train "${common[@]}" --out "$work/cuda_env" > "$work/env.log" 2>&1
  rc=$?
  set -e
  echo "NM_BACKEND=cuda: exit $rc"
  crash_free "$work/env.log" "$rc"
  [ ! -e "$work/cuda/metrics.jsonl" ] || { echo "FAIL: the refused run wrote metrics" >&2; exit 1; }
  echo "test_backend_cuda: passed (the refusal; the comparison with cpu runs on a GPU: scripts/gpu-check.sh)"
  exit 0
fi

# --- a GPU: cuda against cpu -------------------------------------------------------------------------
command -v nvidia-smi > /dev/null && nvidia-smi -L || true
"$NM_BIN" train "${common[@]}" --out "$work/cpu" --set backend=cpu
"$PY" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def ce(b):
    return [json.loads(l)["ce_loss"] for l in open(f"{work}/{b}/metrics.jsonl")]
cuda, cpu = ce("cuda"), ce("cpu")
assert len(cuda) == 20 and len(cpu) == 20, (len(cuda), len(cpu))
tail = lambda xs: sum(xs[-10:]) / 10
first = abs(cuda[0] - cpu[0]) / cpu[0]
rel = abs(tail(cuda) - tail(cpu)) / tail(cpu)
worst = max(abs(a - b) / b for a, b in zip(cuda, cpu))
print(f"cuda: first {cuda[0]:.6f} last-10 mean {tail(cuda):.6f}")
print(f"cpu:  first {cpu[0]:.6f} last-10 mean {tail(cpu):.6f}")
print(f"first step rel. diff {first:.2e} (tol 1e-4), last-10 mean rel. diff {rel:.2e} (tol 3e-2), worst step {worst:.2e}")
ok = first < 1e-4 and rel < 0.03 and tail(cuda) < 0.6 * cuda[0] and tail(cpu) < 0.6 * cpu[0]
print("test_backend_cuda: " + ("passed" if ok else "FAILED"))
sys.exit(0 if ok else 1)
PY
