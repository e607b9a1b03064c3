#!/usr/bin/env bash
# test_dist_4d.sh: tensor x pipeline parallelism, alone and with data and expert parallelism,
# under mpirun against one process on the same global batch (per-step loss, CE and grad norm
# within tests/dist/compare_runs.py's tolerance, expert loads equal): tp2 x pp2, tp2 x pp2
# without sequence parallelism, tp2 x pp2 with recomputation and overlapped 1 MiB buckets,
# tp2 x pp4 (8 ranks), tp2 x pp2 x dp2 x ep2 (8 ranks, also with the EP exchange in rounds),
# tp4 x pp2 (8 ranks, a 4-head copy of the model), and dp2 x ep2 and tp2 x pp2 over TCP only. Then checkpoints: saved at tp2 x pp2, resumed at one process and at dp4 x ep4,
# each continuing the one-process run; and the zero-allocation step loop at tp2 x pp2.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
"$PY" - <<'PY'
import json
c = json.load(open("model.json"))
c["num_attention_heads"] = c["num_key_value_heads"] = 4  # for tp4
json.dump(c, open("model4.json", "w"))
t = {"model": "model.json", "data": {"synthetic": True, "synthetic_tokens": 65536},
     "seq_len": 32, "micro_batch": 1, "global_batch": 8, "steps": 6, "seed": 11, "threads": 1,
     "optimizer": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"warmup_steps": 2},
     "log": {"log_every": 1, "eval_every": 0}, "checkpoint": {"save_every": 0}}
json.dump(t, open("train.json", "w"))
t["model"] = "model4.json"
json.dump(t, open("train4.json", "w"))
PY
export OMP_NUM_THREADS=1
"$NM_BIN" train --config train.json --out ref --quiet >/dev/null
"$NM_BIN" train --config train4.json --out ref4 --quiet >/dev/null

# name ranks config ref options... (the model has 3 decoder layers + 1 MTP layer: an explicit
# layout places them over the stages)
layout() { nm_compare_layout "$@"; }
PP2=(--set pipeline_parallel_size=2 --set 'pipeline_model_parallel_layout=Et|ttmL')
layout tp2_pp2 4 train.json ref --set tensor_parallel_size=2 "${PP2[@]}"
layout tp2_pp2_nosp 4 train.json ref --set tensor_parallel_size=2 --set sequence_parallel=false "${PP2[@]}"
layout tp2_pp2_recompute_buckets 4 train.json ref --set tensor_parallel_size=2 "${PP2[@]}" --recompute \
  --set bucket_mb=1 --set overlap_grad_reduce=true
layout tp2_pp4 8 train.json ref --set tensor_parallel_size=2 --set pipeline_parallel_size=4 \
  --set 'pipeline_model_parallel_layout=Et|t|t|mL'
layout tp2_pp2_dp2_ep2 8 train.json ref --set tensor_parallel_size=2 "${PP2[@]}" --set expert_parallel_size=2
# the bounded EP exchange in rounds (a quarter of the mean rows per round) under all four axes
layout tp2_pp2_dp2_ep2_rounds 8 train.json ref --set tensor_parallel_size=2 "${PP2[@]}" --set expert_parallel_size=2 \
  --set moe_receive_capacity=0.25
layout tp4_pp2 8 train4.json ref4 --set tensor_parallel_size=4 "${PP2[@]}"
# Off the shared-memory path, as between nodes: OpenMPI's ob1 over TCP only (loopback, which
# its TCP transport skips unless told), for dp2 x ep2 and tp2 x pp2. With vader excluded and
# the pml pinned, every message between ranks crosses a TCP socket.
OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo \
  layout tcp_dp2_ep2 4 train.json ref --set expert_parallel_size=2
OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo \
  layout tcp_tp2_pp2 4 train.json ref --set tensor_parallel_size=2 "${PP2[@]}"

# A tp2 x pp2 checkpoint is an HF directory: it resumes at one process, and at dp4 x ep4.
nm_mpirun 4 "$NM_BIN" train --config train.json --out xl --quiet --set tensor_parallel_size=2 "${PP2[@]}" \
  --set exit_interval=2 >xl.log 2>&1 || { cat xl.log; fail "tp2 x pp2 part"; }
"$NM_BIN" train --config train.json --out xl --quiet --resume --set exit_interval=4 >xl1.log 2>&1 \
  || { cat xl1.log; fail "1-process resume of a tp2 x pp2 checkpoint"; }
nm_mpirun 4 "$NM_BIN" train --config train.json --out xl --quiet --resume --set expert_parallel_size=4 >xl2.log 2>&1 \
  || { cat xl2.log; fail "dp4 x ep4 resume"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xl/metrics.jsonl "tp2 x pp2 -> 1 process -> dp4 x ep4"
nm_mpirun 4 "$NM_BIN" train --config train.json --out xm --quiet --set tensor_parallel_size=2 "${PP2[@]}" \
  --set exit_interval=3 >xm.log 2>&1 || { cat xm.log; fail "tp2 x pp2 part"; }
nm_mpirun 4 "$NM_BIN" train --config train.json --out xm --quiet --resume --set expert_parallel_size=4 >xm2.log 2>&1 \
  || { cat xm2.log; fail "dp4 x ep4 resume of a tp2 x pp2 checkpoint"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xm/metrics.jsonl "tp2 x pp2 -> dp4 x ep4"

if [ -n "${NM_BUILD:-}" ] && [ -x "$NM_BUILD/test_zero_alloc" ]; then
  nm_mpirun 4 "$NM_BUILD/test_zero_alloc" tensor_parallel_size=2 pipeline_parallel_size=2 \
    >alloc.log 2>&1 || { cat alloc.log; fail "allocations in the tp2 x pp2 step loop"; }
  [ "$(grep -c 'allocations during steps 3-6: 0' alloc.log)" = 4 ] || { cat alloc.log; fail "tp2 x pp2 zero-allocation output"; }
  echo "tp2 x pp2 step loop: no allocations on any rank"
fi
echo "test_dist_4d: all passed"
