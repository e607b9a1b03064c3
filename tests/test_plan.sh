#!/usr/bin/env bash
# test_plan.sh: `nanomegatron plan` against launched runs of the same layouts: the banner's
# per-rank allocation (parameters, gradients, optimizer shard, activations) and the byte
# counters of metrics.jsonl (reduce-scatter, all-gather and all-reduce over dp and edp, the
# job's all-to-all) within 10%, for one process, dp2, dp2 x ep2 and ep2 with recomputation.
# Then refusals (a layout that does not divide, TP/PP while the model cannot split) and the
# DeepSeek-V3 layout of the docs (runs, says whether it fits).
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat > train.json <<'JSON'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 65536},
  "seq_len": 32, "micro_batch": 2, "global_batch": 8, "steps": 2, "seed": 3, "threads": 1,
  "log": {"log_every": 1, "eval_every": 0},
  "checkpoint": {"save_every": 0}
}
JSON
export OMP_NUM_THREADS=1 NM_CPU_KERNELS=default

# name ranks ep recompute(0|1)
check() {
  local name=$1 n=$2 ep=$3 rc=$4 extra=() pextra=()
  [ "$rc" = 1 ] && extra+=(--recompute) && pextra+=(--recompute)
  if [ "$n" = 1 ]; then
    "$NM_BIN" train --config train.json --out "$name" "${extra[@]}" >"$name.log" 2>&1 || { cat "$name.log"; fail "$name did not run"; }
  else
    nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" --set expert_parallel_size="$ep" "${extra[@]}" \
      >"$name.log" 2>&1 || { cat "$name.log"; fail "$name did not run"; }
  fi
  "$NM_BIN" plan --config model.json --world "$n" --ep "$ep" --seq-len 32 --micro-batch 2 --global-batch 8 \
    "${pextra[@]}" >"$name.plan" || fail "plan $name"
  "$PY" - "$name" <<'PY' || fail "$name: plan and run differ"
import json, re, sys
name = sys.argv[1]
plan = json.loads(open(f"{name}.plan").read().strip().splitlines()[-1])
log = open(f"{name}.log").read()
m = re.search(r"per rank: params ([\d.]+) MiB, grads ([\d.]+) MiB, optimizer shard ([\d.]+) MiB.*activations ([\d.]+) MiB", log)
assert m, f"{name}: no memory banner in the log"
st = plan["stages"][0]
MiB = 1048576.0
pairs = {"params": (float(m[1]), st["params_bytes"] / MiB), "grads": (float(m[2]), st["grads_bytes"] / MiB),
         "optimizer shard": (float(m[3]), st["optimizer_bytes_first"] / MiB),
         "activations": (float(m[4]), st["activation_bytes"] / MiB)}
rows = [json.loads(l) for l in open(f"{name}/metrics.jsonl") if l.strip()]
last = [r for r in rows if "comm_dp_reduce_scatter_bytes" in r or "loss" in r][-1]
c = plan["comm"]
for key, pk in [("comm_dp_reduce_scatter_bytes", "dp_reduce_scatter"), ("comm_dp_all_gather_bytes", "dp_all_gather"),
                ("comm_dp_all_reduce_bytes", "dp_all_reduce"), ("comm_edp_reduce_scatter_bytes", "edp_reduce_scatter"),
                ("comm_edp_all_gather_bytes", "edp_all_gather"), ("comm_ep_all_to_all_bytes_job", "ep_all_to_all_job")]:
    pairs[key] = (float(last.get(key, 0)), float(c[pk]))
bad = []
for k, (run, planned) in pairs.items():
    ok = abs(run - planned) <= 0.10 * max(abs(run), 1e-9) if run else planned == 0
    print(f"{'ok  ' if ok else 'FAIL'} {name} {k}: run {run:.6g} plan {planned:.6g}")
    if not ok:
        bad.append(k)
sys.exit(1 if bad else 0)
PY
}
check one 1 1 0
check dp2 2 1 0
check dp2_ep2 4 2 0
check ep2_recompute 2 2 1

# Refusals name the numbers.
if "$NM_BIN" plan --config model.json --world 3 --ep 2 >bad.out 2>bad.err; then fail "world 3 x ep 2 accepted"; fi
grep -q "expert_parallel_size 2" bad.err || { cat bad.err; fail "layout refusal does not name ep"; }
if "$NM_BIN" plan --config model.json --world 4 --tp 2 >bad.out 2>bad.err; then
  grep -q '"tp": 2' bad.out || fail "tp2 plan has no tp in its JSON"
else
  grep -q "tensor_parallel_size 2" bad.err || { cat bad.err; fail "tp refusal does not name the key"; }
fi
# DeepSeek-V3 at the docs' layout: it must run and say whether it fits.
"$NM_BIN" plan --config "$NM_ROOT/configs/deepseek-v3.json" --world 2048 --ep 64 --seq-len 4096 --precision bf16 \
  --recompute >dsv3.out || fail "DeepSeek-V3 plan did not run"
grep -Eq "^(fits|does not fit) in 80 GiB" dsv3.out || { cat dsv3.out; fail "DeepSeek-V3 plan gives no verdict"; }
echo "test_plan: all passed"
