#!/usr/bin/env bash
# test_plan.sh: `nanomegatron plan` against launched runs of the same layouts: the per-rank
# allocation (parameters, gradients, optimizer shard, activations, and every pipeline stage's
# parameters and activations; RUN_DIR/memory.json) byte for byte, and the byte counters of
# metrics.jsonl (reduce-scatter, all-gather and all-reduce over dp and edp, the job's
# all-to-all, tp's three collectives, pp's send and receive) within 10%, for one process,
# dp2, dp2 x ep2, ep2 with recomputation, tp2, tp2 x ep2, tp2 without sequence parallelism with
# recomputation, pp2, pp2 x dp2 x ep2 and tp2 x pp2, each also interleaved (2 virtual stages a rank)
# (every stage's parameters and activations).
# Then refusals (a layout that does not divide, TP over more ranks than heads) and the
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

# name ranks ep recompute(0|1) [tp [sp(0|1) [pp layout]]]
check() {
  local name=$1 n=$2 ep=$3 rc=$4 tp=${5:-1} sp=${6:-1} pp=${7:-1} pl=${8:-} extra=() pextra=()
  if [ "$pp" != 1 ]; then
    extra+=(--set pipeline_parallel_size="$pp" --set "pipeline_model_parallel_layout=$pl")
    pextra+=(--pp "$pp" --pipeline-layout "$pl")
  fi
  [ "$rc" = 1 ] && extra+=(--recompute) && pextra+=(--recompute)
  [ "$sp" = 0 ] && extra+=(--set sequence_parallel=false) && pextra+=(--no-sequence-parallel)
  if [ -n "${PRECISION:-}" ]; then
    extra+=(--set precision="$PRECISION") && pextra+=(--precision "$PRECISION")
  fi
  if [ -n "${MODULES:-}" ]; then
    extra+=(--set recompute_modules="$MODULES") && pextra+=(--recompute-modules "$MODULES")
  fi
  if [ -n "${SHARDING:-}" ]; then
    extra+=(--set data_parallel_sharding_strategy="$SHARDING") && pextra+=(--data-parallel-sharding-strategy "$SHARDING")
  fi
  if [ -n "${SPLIT:-}" ]; then
    extra+=(--set overlap_moe_expert_parallel_comm=true) && pextra+=(--overlap-ep)
  fi
  if [ -n "${CAPACITY:-}" ]; then
    extra+=(--set moe_receive_capacity="$CAPACITY") && pextra+=(--moe-receive-capacity "$CAPACITY")
  fi
  if [ -n "${PAIR:-}" ]; then
    extra+=(--set moe_pair_micro_batches=true) && pextra+=(--pair-micro-batches)
  fi
  if [ "$n" = 1 ]; then
    "$NM_BIN" train --config train.json --out "$name" "${extra[@]}" >"$name.log" 2>&1 || { cat "$name.log"; fail "$name did not run"; }
  else
    nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" --set expert_parallel_size="$ep" \
      --set tensor_parallel_size="$tp" "${extra[@]}" \
      >"$name.log" 2>&1 || { cat "$name.log"; fail "$name did not run"; }
  fi
  # the bf16 weight copy's storage is the run's kernel's: bf16, or fp32 under the widen kernel
  # (memory.json's bf16_copy_bytes: 4 a parameter), as an AVX2-only machine runs it
  if [ -n "${PRECISION:-}" ] && [ "$PRECISION" != fp32 ]; then
    storage=$("$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print('fp32' if m['bf16_copy_bytes'] == m['params_bytes'] else 'bf16')" "$name/memory.json")
    pextra+=(--bf16-copy-storage "$storage")
  fi
  "$NM_BIN" plan --config model.json --world "$n" --ep "$ep" --tp "$tp" --seq-len 32 --micro-batch 2 --global-batch 8 \
    "${pextra[@]}" >"$name.plan" || fail "plan $name"
  "$PY" - "$name" <<'PY' || fail "$name: plan and run differ"
import json, re, sys
name = sys.argv[1]
plan = json.loads(open(f"{name}.plan").read().strip().splitlines()[-1])
log = open(f"{name}.log").read()
# what the run allocated, in bytes (RUN_DIR/memory.json, rank 0's buffers and every stage's):
# the plan must give the same numbers byte for byte
mem = json.load(open(f"{name}/memory.json"))
st = plan["stages"][0]
exact = {"params": (mem["params_bytes"], st["params_bytes"]), "grads": (mem["grads_bytes"], st["grads_bytes"]),
         "params resident": (mem["params_resident_bytes"], st["params_resident_bytes_first"]),
         "bf16 weight copy": (mem["bf16_copy_bytes"], st["bf16_copy_bytes"]),
         "optimizer shard": (mem["optimizer_bytes"], st["optimizer_bytes_first"]),
         "activations": (mem["activation_bytes"], st["activation_bytes"])}
# gradient sharding: the gradient buffer's resident bound and rank 0's shard
if mem["grad_shard_bytes"] or st["grad_shard_bytes"]:
    exact["grads resident"] = (mem["grads_resident_bytes"], st["grads_resident_bytes"])
    exact["grad shard"] = (mem["grad_shard_bytes"], st["grad_shard_bytes_first"])
assert len(mem["stages"]) == len(plan["stages"]), (name, len(mem["stages"]), len(plan["stages"]))
for s_, ms in enumerate(mem["stages"]):
    exact[f"stage {s_} params"] = (ms["params_bytes"], plan["stages"][s_]["params_bytes"])
    exact[f"stage {s_} activations"] = (ms["activation_bytes"], plan["stages"][s_]["activation_bytes"])
# bf16 activation copies: the plan counts them as bf16 storage; a run holds them where its bf16
# GEMM reads bf16 storage (oneDNN with AMX, a GPU), none with the widen kernel (fp32 storage)
if mem["bf16_twin_bytes"] > 0:
    exact["bf16 twins"] = (mem["bf16_twin_bytes"], st["bf16_twin_bytes"])
elif st["bf16_twin_bytes"] > 0:
    print(f"     {name} bf16 twins: none in this run (fp32, or a bf16 GEMM that reads fp32 storage); plan "
          f"{st['bf16_twin_bytes']} for bf16 storage")
for k, (run, planned) in exact.items():
    print(f"{'ok  ' if run == planned else 'FAIL'} {name} {k}: run {run} bytes, plan {planned} (exact)")
wrong = [k for k, (run, planned) in exact.items() if run != planned]
pairs = {}
# under PP the banner has every stage's micro-batches in flight
for s_, fl in enumerate(re.findall(r"stage (?:\d+): params [\d.]+ MiB, activations [\d.]+ MiB \((\d+) micro", log)):
    pairs[f"stage {s_} in flight"] = (float(fl), float(plan["stages"][s_]["in_flight"]))
assert len(plan["stages"]) == 1 or f"stage {len(plan['stages']) - 1} in flight" in pairs, f"{name}: no stage lines"
banner_keys = set()
rows = [json.loads(l) for l in open(f"{name}/metrics.jsonl") if l.strip()]
last = [r for r in rows if "comm_dp_reduce_scatter_bytes" in r or "loss" in r][-1]
c = plan["comm"]
for key, pk in [("comm_dp_reduce_scatter_bytes", "dp_reduce_scatter"), ("comm_dp_all_gather_bytes", "dp_all_gather"),
                ("comm_dp_all_reduce_bytes", "dp_all_reduce"), ("comm_edp_reduce_scatter_bytes", "edp_reduce_scatter"),
                ("comm_edp_all_gather_bytes", "edp_all_gather"), ("comm_ep_all_to_all_bytes_job", "ep_all_to_all_job"),
                ("comm_tp_all_reduce_bytes", "tp_all_reduce"), ("comm_tp_reduce_scatter_bytes", "tp_reduce_scatter"),
                ("comm_tp_all_gather_bytes", "tp_all_gather"), ("comm_pp_send_bytes", "pp_send"),
                ("comm_pp_recv_bytes", "pp_recv")]:
    pairs[key] = (float(last.get(key, 0)), float(c[pk]))
bad = []
for k, (run, planned) in pairs.items():
    # the banner prints MiB to one decimal: half of that digit on top of the 10%
    slack = 0.05 if k in banner_keys else 0.0
    ok = abs(run - planned) <= 0.10 * abs(run) + slack if run else planned <= slack
    print(f"{'ok  ' if ok else 'FAIL'} {name} {k}: run {run:.6g} plan {planned:.6g}")
    if not ok:
        bad.append(k)
sys.exit(1 if bad or wrong else 0)
PY
}
check one 1 1 0
check dp2 2 1 0
check dp2_ep2 4 2 0
check ep2_recompute 2 2 1
check tp2 2 1 0 2
check tp2_ep2 4 2 0 2
check tp2_nosp_recompute 2 1 1 2 0
check pp2 2 1 0 1 1 2 'Et|ttmL'
check pp2_dp2_ep2 4 2 0 1 1 2 'Ett|tmL'
check tp2_pp2 4 1 0 2 1 2 'Et|ttmL'
# selective recomputation of all three modules (shared buffers instead of per-block ones)
MODULES=mla_up_proj,moe_act,layernorm check dp2_ep2_modules 4 2 0
MODULES=mla_up_proj,moe_act,layernorm check tp2_pp2_modules 4 1 0 2 1 2 'Et|ttmL'
# the interleaved schedule: 4 stages on 2 pipeline ranks (2 chunks each), by the layout
check pp2_v2 2 1 0 1 1 2 'Et|t|t|mL'
check pp2_v2_dp2_ep2 4 2 0 1 1 2 'E|t|t|tmL'
check tp2_pp2_v2 4 1 0 2 1 2 'Et|t|t|mL'
# gradient sharding (ZeRO-2): every micro-batch reduce-scattered (2 per step here) but the
# buckets with a global row, the buffer's resident bound and the shard exact, in fp32 and bf16,
# with tp (sequence-parallel rows) and pp
SHARDING=optim_grads check dp2_ep2_optim_grads 4 2 0
SHARDING=optim_grads PRECISION=bf16 check dp4_optim_grads_bf16 4 1 0
SHARDING=optim_grads check tp2_dp2_optim_grads 4 1 0 2
SHARDING=optim_grads check tp2_optim_grads 2 1 0 2
SHARDING=optim_grads check pp2_dp2_optim_grads 4 1 0 1 1 2 'Et|ttmL'
SHARDING=optim_grads check tp2_pp2_v2_optim_grads 4 1 0 2 1 2 'Et|t|t|mL'
# the bounded EP exchange: receive buffers of half the mean rows (several rounds per layer)
CAPACITY=0.5 check ep2_capacity 2 2 0
CAPACITY=0.5 check tp2_ep2_capacity 4 2 1 2
# bf16: the master weights of the GEMMs sharded with the optimizer (the copy all-gathered in its
# storage, the rows read in fp32 in fp32), with ep, pp and the interleaved schedule
PRECISION=bf16 check dp2_ep2_bf16 4 2 0
PRECISION=bf16 check pp2_v2_dp2_ep2_bf16 4 2 0 1 1 2 'E|t|t|tmL'
# the split expert exchange (overlap_moe_expert_parallel_comm): one more send buffer of the
# receive capacity, the unsplit exchange's bytes
SPLIT=1 check ep2_split 2 2 0
SPLIT=1 PRECISION=bf16 check dp2_ep2_split_bf16 4 2 0
# paired micro-batches (moe_pair_micro_batches): a second activation set, its buffers and bf16
# copies all over again; the same bytes moved (ep2 and tp2 x ep2: 2 micro-batches a step)
PAIR=1 check ep2_pair 2 2 0
PAIR=1 PRECISION=bf16 check ep2_pair_bf16 2 2 0
PAIR=1 PRECISION=fp8 SPLIT=1 check ep2_pair_fp8_split 2 2 0
PAIR=1 check tp2_ep2_pair_recompute 4 2 1 2
# ... and in 1F1B: w = min(PP - stage, m) activation sets on each of two models
PAIR=1 check pp2_ep2_pair 4 2 0 1 1 2 'Ett|tmL'
# bf16: the rows to the experts cross as bf16 (2 bytes), the rest fp32
PRECISION=bf16 check ep2_bf16 2 2 0
PRECISION=bf16 CAPACITY=0.5 check ep2_bf16_capacity_recompute 2 2 1
# fp8: the experts' inputs saved as e4m3 codes and tile scales, the other GEMM-only saved
# activations (norm and SwiGLU outputs, the rows before the dispatch) in bf16, one fp32 buffer
# of each kind for all blocks; with whole blocks recomputed none of it
PRECISION=fp8 check one_fp8 1 1 0
PRECISION=fp8 check dp2_ep2_fp8 4 2 0
PRECISION=fp8 CAPACITY=0.5 check ep2_fp8_capacity_recompute 2 2 1

# Peak resident memory (getrusage, metrics.jsonl's rss_peak_bytes: the largest rank's) against
# the planner at ep4 on a model whose receive buffers dominate (moe_intermediate_size 512: 205
# of 309 MiB at micro_batch 8). The process's own memory (binary, OpenBLAS, oneDNN, OpenMPI and
# their buffers) is a fixed overhead: measured at micro_batch 1, then at 8 and 16 the peak must
# be the plan plus that overhead within 5% of the plan. Measured: overhead 87 MiB, and 87 MiB
# again at 8 (plan 309 MiB) and 16 (plan 605 MiB), so within 0.3%.
"$PY" -c "import json; m = json.load(open('model.json')); json.dump(dict(m, moe_intermediate_size=512), open('model_rx.json', 'w'))"
rss_run() {  # micro_batch -> "rss plan" in bytes
  local mb=$1
  nm_mpirun 4 "$NM_BIN" train --config train.json --out "rss$mb" --quiet --set model=model_rx.json --set seq_len=256 \
    --set micro_batch="$mb" --set global_batch=$((4 * mb)) --set expert_parallel_size=4 >"rss$mb.log" 2>&1 \
    || { cat "rss$mb.log"; fail "rss run at micro_batch $mb"; }
  "$NM_BIN" plan --config model_rx.json --world 4 --ep 4 --seq-len 256 --micro-batch "$mb" --global-batch $((4 * mb)) \
    >"rss$mb.plan" || fail "plan at micro_batch $mb"
  "$PY" - "$mb" <<'PY'
import json, sys
mb = sys.argv[1]
rss = max(json.loads(l)["rss_peak_bytes"] for l in open(f"rss{mb}/metrics.jsonl"))
plan = json.loads(open(f"rss{mb}.plan").read().strip().splitlines()[-1])["stages"][0]["total_bytes"]
print(rss, plan)
PY
}
read -r rss1 plan1 < <(rss_run 1)
for mb in 8 16; do
  read -r rss plan < <(rss_run "$mb")
  "$PY" - "$mb" "$rss" "$plan" "$rss1" "$plan1" <<'PY' || fail "peak memory at micro_batch $mb is not the plan plus the fixed overhead"
import sys
mb, rss, plan, rss1, plan1 = sys.argv[1], *map(int, sys.argv[2:])
over = rss1 - plan1
off = abs(rss - plan - over) / plan
print(f"ep4 micro_batch {mb}: peak RSS {rss / 2**20:.1f} MiB = plan {plan / 2**20:.1f} + overhead {over / 2**20:.1f} "
      f"(measured at micro_batch 1) {'+' if rss - plan - over >= 0 else '-'} {off:.2%} of the plan")
assert off <= 0.05, off
PY
done

# Refusals name the numbers.
if "$NM_BIN" plan --config model.json --world 3 --ep 2 >bad.out 2>bad.err; then fail "world 3 x ep 2 accepted"; fi
grep -q "expert_parallel_size 2" bad.err || { cat bad.err; fail "layout refusal does not name ep"; }
if "$NM_BIN" plan --config model.json --world 4 --tp 4 >bad.out 2>bad.err; then fail "tp4 over 2 heads accepted"; fi
grep -q "num_attention_heads 2" bad.err || { cat bad.err; fail "tp refusal does not name the heads"; }
# DeepSeek-V3 at the docs' layout: it must run and say whether it fits.
"$NM_BIN" plan --config "$NM_ROOT/configs/deepseek-v3.json" --world 2048 --ep 64 --seq-len 4096 --precision bf16 \
  --recompute >dsv3.out || fail "DeepSeek-V3 plan did not run"
grep -Eq "^(fits|does not fit) in 80 GiB" dsv3.out || { cat dsv3.out; fail "DeepSeek-V3 plan gives no verdict"; }
# DeepSeek-V3 at DeepSeek's own layout (docs/parallelism.md's table): with recomputation and
# the bounded EP exchange every stage fits in 72 GiB (the receive side C = 2 x 4,097 x 8 rows), and
# the distributed optimizer keeps every stage's largest shard within 1.1x its mean.
L="Et*3"; for i in $(seq 14); do L="$L|t*4"; done; L="$L|t*2mL"
"$NM_BIN" plan --config "$NM_ROOT/configs/deepseek-v3.json" --world 2048 --pp 16 --ep 64 --seq-len 4096 \
  --global-batch 15360 --precision bf16 --pipeline-layout "$L" --recompute >dsv3_pp16.out || fail "DeepSeek-V3 pp16 plan"
"$PY" - <<'PY' || { cat dsv3_pp16.out; fail "DeepSeek-V3 at DeepSeek's layout"; }
import json
p = json.loads(open("dsv3_pp16.out").read().strip().splitlines()[-1])
worst = max(s["total_bytes"] for s in p["stages"]) / 2**30
rows = {s["ep_receive_rows"] for s in p["stages"] if s["ep_receive_rows"]}
print(f"DeepSeek-V3 pp16 x ep64 x dp128 --recompute: largest stage {worst:.2f} GiB, receive rows {rows}")
assert p["fits"] and worst < 72, worst  # issue "Scale I": <= 72 GiB per rank
assert rows == {2 * 4097 * 8}, rows
# the distributed optimizer's equal ranges: every stage's largest shard within 1.1x its mean
for i, s in enumerate(p["stages"]):
    assert s["optimizer_bytes"] <= 1.1 * s["optimizer_mean_bytes"], (i, s["optimizer_bytes"], s["optimizer_mean_bytes"])
PY
# the paired micro-batches' layout refusals, the trainer's (each tensor-parallel group inside one
# expert-parallel group: 8 heads at tp4 over ep2 breaks it)
if "$NM_BIN" plan --config "$NM_ROOT/configs/small.json" --world 8 --tp 4 --ep 2 --global-batch 16 \
     --pair-micro-batches >bad.out 2>bad.err; then fail "pairing with tp4 over ep2 accepted"; fi
[[ $(cat bad.err) == *"moe_pair_micro_batches with tensor_parallel_size 4"*"expert_parallel_size 2 is not a multiple"* ]] \
  || { cat bad.err; fail "the pairing's tp refusal"; }
if "$NM_BIN" plan --config model.json --world 2 --ep 2 --micro-batch 2 --global-batch 4 --pair-micro-batches >bad.out 2>bad.err; then
  fail "pairing with one micro-batch a step accepted"; fi
[[ $(cat bad.err) == *"needs at least 2 micro-batches a step"* ]] || { cat bad.err; fail "the pairing's accum refusal"; }
if "$NM_BIN" plan --config model.json --world 2 --ep 2 --moe-receive-capacity 0 >bad.out 2>bad.err; then
  fail "--moe-receive-capacity 0 accepted"; fi
grep -q "moe-receive-capacity" bad.err || { cat bad.err; fail "the capacity refusal does not name the flag"; }
if "$NM_BIN" plan --config model.json --world 2 --exp-avg-dtype fp16 >bad.out 2>bad.err; then
  fail "--exp-avg-dtype fp16 accepted"; fi
grep -q "exp-avg-dtype must be fp32 or bf16, got 'fp16'" bad.err || { cat bad.err; fail "the moment dtype refusal"; }
# pp16 over DeepSeek-V3's 61 layers: the refusal suggests a layout for those 61 layers, which
# plan then takes (it used to suggest a 4-layer example)
rc=0
"$NM_BIN" plan --config "$NM_ROOT/configs/deepseek-v3.json" --world 2048 --pp 16 --ep 64 --seq-len 4096 \
  >pp16.out 2>pp16.err || rc=$?
[ "$rc" -ne 0 ] || fail "pp16 over 61 layers without a layout was accepted"
suggested=$(sed -n 's/.*for example "\([^"]*\)".*/\1/p' pp16.err)
[ -n "$suggested" ] || { cat pp16.err; fail "the pp16 refusal suggests no layout"; }
"$NM_BIN" plan --config "$NM_ROOT/configs/deepseek-v3.json" --world 2048 --pp 16 --ep 64 --seq-len 4096 \
  --pipeline-layout "$suggested" >pp16.out 2>pp16.err || { cat pp16.err; fail "the suggested layout $suggested is refused"; }
# linear in the world size: a million ranks is planned at once (it took minutes when each rank's
# ZeRO-1 ownership was built separately); the timeout fails a quadratic plan.
timeout 20 "$NM_BIN" plan --config model.json --world 1048576 >million.out 2>&1 || { cat million.out; fail "plan at 1,048,576 ranks did not finish in 20 s"; }

# The time model (src/train/plan_time.c, docs/parallelism.md "The time model"), recomputed here
# from the plan's own byte counts by the formulas of the docs: compute at --flops, each ring
# collective (n-1)/n of its bytes (twice for an all-reduce) at the group's bandwidth plus n-1
# latencies a call, the all-to-all's in-node and off-node shares at once, 1F1B's accum + PP - 1
# slots. Layouts: dp4 over 2 nodes of 2 ranks (dp crosses nodes), ep2 x dp2 on one node with
# both overlaps, pp2 x dp2, tp2 (latency only where the byte counts are exact).
cat > timecheck.py <<'PY'
import json, math, sys
p, args = json.loads(open(sys.argv[1]).read().splitlines()[-1]), json.loads(sys.argv[2])
R, bi, be, li, le = args["rpn"], args["bi"] * 1e9, args["be"] * 1e9, args["li"] * 1e-6, args["le"] * 1e-6
tp, dp, ep, pp, world = p["tp"], p["dp"], p["ep"], p["pp"], p["world"]
def nodes(stride, size):
    ns = {i * stride // R for i in range(size)} if R else {0}
    local = sum(1 for i in range(size) if (i * stride // R if R else 0) == 0)
    return len(ns), local
def link(stride, size):
    return (be, le) if nodes(stride, size)[0] > 1 else (bi, li)
def ring(b, n, calls, passes, l):
    return 0.0 if n <= 1 else passes * ((n - 1) / n * b / l[0] + calls * (n - 1) * l[1])
slot = reduce = 0.0
for s in p["stages"]:
    c, t = s["comm"], s["time"]
    compute = s["flops_per_step_rank"] * (4 / 3 if p["recompute"] else 1) / args["flops"]
    assert abs(compute - t["compute_s"]) <= 1e-9 * compute, (compute, t)
    if tp == 1:
        assert t["tp_s"] == 0
    n_ep = ep
    if n_ep > 1 and c["ep_all_to_all"] > 0:
        nn, local = nodes(1, n_ep)
        bw_part = max(c["ep_all_to_all"] * (local - 1) / n_ep / bi, c["ep_all_to_all"] * (n_ep - local) / n_ep / be if nn > 1 else 0)
        assert t["ep_s"] >= bw_part * (1 - 1e-9), (t["ep_s"], bw_part)
    edp = dp * tp // ep
    bucket = args["bucket_mb"] * 1048576
    dcalls, ecalls = math.ceil(c["dp_reduce_scatter"] / bucket), math.ceil(c["edp_reduce_scatter"] / bucket)
    rs = ring(c["dp_reduce_scatter"], dp, dcalls, 1, link(tp, dp)) + ring(c["edp_reduce_scatter"], edp, ecalls, 1, link(ep, edp))
    ag = ring(c["dp_all_gather"], dp, dcalls, 1, link(tp, dp)) + ring(c["edp_all_gather"], edp, ecalls, 1, link(ep, edp))
    dps = rs + ag + ring(c["dp_all_reduce"], world, 3, 2, link(tp, dp))
    assert abs(dps - t["dp_s"]) <= 1e-9 * max(dps, 1e-12), ("dp", dps, t["dp_s"])
    hidden_dp = min(rs, compute / p["accum"] * 2 / 3) if args["ogr"] else 0.0
    # the split exchange hides all of the all-to-all behind compute; the paired micro-batches all
    # but the first forward's and the last backward's, (accum - 1) / accum of it
    behind = t["ep_s"] if args["oep"] else t["ep_s"] * (p["accum"] - 1) / p["accum"] if args["pair"] else 0.0
    hidden_ep = min(behind, compute)
    assert abs(t["hidden_s"] - hidden_dp - hidden_ep) <= 1e-9 * max(t["hidden_s"], 1e-12), ("hidden", t)
    busy = compute + t["tp_s"] + t["ep_s"] + t["pp_s"] + dps - hidden_dp - hidden_ep
    assert abs(busy - t["busy_s"]) <= 1e-9 * busy, ("busy", busy, t["busy_s"])
    slot = max(slot, (busy - (dps - hidden_dp)) / p["accum"])
    reduce = max(reduce, dps - hidden_dp)
step = slot * (p["accum"] + pp - 1) + reduce
assert abs(step - p["step_s"]) <= 1e-9 * step, ("step", step, p["step_s"])
tokens = p["global_batch"] * p["seq_len"] / step / world
assert abs(tokens - p["tokens_per_s_rank"]) <= 1e-6 * tokens, (tokens, p["tokens_per_s_rank"])
assert 0 < p["mfu"] <= 1, p["mfu"]
# the stages' FLOPs add up to the job's: PP x the per-rank share
total = sum(s["flops_per_step_rank"] for s in p["stages"])
assert abs(total - pp * p["flops_per_step_rank"]) <= 1e-9 * total, (total, p["flops_per_step_rank"])
print(f"time model {sys.argv[3]}: step {step:.6g} s, {tokens:.4g} tokens/s per rank, MFU {p['mfu']:.3f}: ok")
PY
time_case() {  # label rpn flags...
  local label=$1 rpn=$2; shift 2
  local ogr=0 oep=0 pair=0
  [[ " $* " == *" --overlap-grad-reduce "* ]] && ogr=1
  [[ " $* " == *" --overlap-ep "* ]] && oep=1
  [[ " $* " == *" --pair-micro-batches "* ]] && pair=1
  "$NM_BIN" plan --config model.json --seq-len 32 --micro-batch 2 --flops 2e9 --bw-intra 3 --bw-inter 0.5 \
    --latency-intra 2 --latency-inter 20 --ranks-per-node "$rpn" "$@" >"time_$label.out" 2>&1 \
    || { cat "time_$label.out"; fail "plan $label did not run"; }
  "$PY" timecheck.py "time_$label.out" \
    "{\"rpn\": $rpn, \"bi\": 3, \"be\": 0.5, \"li\": 2, \"le\": 20, \"flops\": 2e9, \"bucket_mb\": 40, \"ogr\": $ogr, \"oep\": $oep, \"pair\": $pair}" "$label"
}
time_case dp4_two_nodes 2 --world 4 --global-batch 16
time_case dp2_ep2_overlap 4 --world 4 --ep 2 --global-batch 16 --overlap-grad-reduce --overlap-ep
time_case pp2_dp2_recompute 4 --world 4 --pp 2 --pipeline-layout "Et*2|tmL" --global-batch 16 --recompute
time_case tp2 2 --world 2 --tp 2 --global-batch 8
time_case dp2_ep2_pair 4 --world 4 --ep 2 --global-batch 16 --pair-micro-batches
# dp crossing nodes costs more than within one (same bytes, the slower link)
one=$("$PY" -c "import json;print(json.loads(open('time_dp4_two_nodes.out').read().splitlines()[-1])['stages'][0]['time']['dp_s'])")
"$NM_BIN" plan --config model.json --seq-len 32 --micro-batch 2 --flops 2e9 --bw-intra 3 --bw-inter 0.5 \
  --ranks-per-node 4 --world 4 --global-batch 16 >time_dp4_one_node.out
within=$("$PY" -c "import json;print(json.loads(open('time_dp4_one_node.out').read().splitlines()[-1])['stages'][0]['time']['dp_s'])")
"$PY" -c "assert $one > 3 * $within, ($one, $within)" || fail "dp over two nodes ($one s) is not slower than on one ($within s)"
# the bandwidths go together and need --flops
if "$NM_BIN" plan --config model.json --world 2 --bw-intra 3 >bad.out 2>bad.err; then fail "--bw-intra alone accepted"; fi
[[ $(cat bad.err) == *--bw-inter* ]] || { cat bad.err; fail "the refusal does not name --bw-inter"; }
echo "test_plan: all passed"
