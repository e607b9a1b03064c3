#!/usr/bin/env bash
# test_dist_pp.sh: pipeline parallelism under mpirun against one process on the same global
# batch: per-step loss, CE and gradient norm within the tolerance of tests/dist/compare_runs.py
# (2e-5 relative each; the expert-load statistic exactly), for pp2, pp4, pp2 x dp2,
# pp2 x dp2 x ep2, pp4 x dp2 x ep2 (8 ranks), explicit layouts, tied embeddings, overlapped
# reduction and recomputation; the interleaved schedule (pp2 with 2 virtual stages each, alone,
# with dp2 x ep2, tp2, overlap and recomputation, and its checkpoint resumed at plain pp2); paired
# micro-batches in 1F1B bit-identical to unpaired; the divergence guard; the bubble metrics; a pp2 checkpoint
# resumed at one process and at dp2; bad layouts refused naming the key and value.
# The model is tests/data/small-moe-model.json with 4 decoder layers (1 dense, 3 MoE) + 1 MTP.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

"$PY" - "$NM_ROOT/tests/data/small-moe-model.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["num_hidden_layers"] = 4
json.dump(m, open("model.json", "w"))
json.dump({
    "model": "model.json", "data": {"synthetic": True, "synthetic_tokens": 65536, "split": "90,10"},
    "seq_len": 32, "micro_batch": 1, "global_batch": 8, "steps": 6, "seed": 11, "threads": 1,
    "optimizer": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"warmup_steps": 2},
    "log": {"log_every": 1, "eval_every": 3, "eval_batches": 2},
    "checkpoint": {"save_every": 0}}, open("train.json", "w"))
PY
export OMP_NUM_THREADS=1
"$NM_BIN" train --config train.json --out ref --quiet >ref.log 2>&1 || { cat ref.log; fail "one process"; }
"$NM_BIN" train --config train.json --out ref_rc --quiet --recompute >ref_rc.log 2>&1 || { cat ref_rc.log; fail "one process --recompute"; }
# Megatron's key says the same as the flag: recompute_granularity full holds the same activation
# bytes and gives the same losses bit for bit
"$NM_BIN" train --config train.json --out ref_rg --quiet --set recompute_granularity=full >ref_rg.log 2>&1 \
  || { cat ref_rg.log; fail "one process recompute_granularity=full"; }
"$PY" - <<'PY' || fail "recompute_granularity=full differs from --recompute"
import json
a, b = json.load(open("ref_rc/memory.json")), json.load(open("ref_rg/memory.json"))
full = json.load(open("ref/memory.json"))
assert a["activation_bytes"] == b["activation_bytes"] < full["activation_bytes"], (a, b, full)
la = [json.loads(l).get("loss") for l in open("ref_rc/metrics.jsonl") if '"loss"' in l]
lb = [json.loads(l).get("loss") for l in open("ref_rg/metrics.jsonl") if '"loss"' in l]
assert la == lb and len(la) >= 6, (la, lb)
print(f"recompute_granularity=full: {b['activation_bytes']} activation bytes as --recompute (all: "
      f"{full['activation_bytes']}), the same {len(la)} losses")
PY

# name ranks options...
layout() {
  local name=$1 n=$2; shift 2
  nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" "$@" >"$name.log" 2>&1 \
    || { cat "$name.log"; fail "$name did not run"; }
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl "$name/metrics.jsonl" "$name"
}
layout pp2 2 --set pipeline_parallel_size=2
layout pp4 4 --set pipeline_parallel_size=4
layout pp2_dp2 4 --set pipeline_parallel_size=2
layout pp2_dp2_ep2 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2
# the split expert exchange (overlap_moe_expert_parallel_comm) on a pipeline stage's MoE blocks:
# bit-identical to the unsplit exchange (each expert's rows arrive whole, moe.c)
layout pp2_dp2_ep2_split 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2 \
  --set overlap_moe_expert_parallel_comm=true
"$PY" - <<'PY' || fail "pp2_dp2_ep2_split differs from pp2_dp2_ep2"
import json
rows, base = ([json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"loss"' in l] for d in
              ("pp2_dp2_ep2_split", "pp2_dp2_ep2"))
assert len(rows) == len(base) >= 6, (len(rows), len(base))
for r, b in zip(rows, base):
    assert r["ep_rounds"] == 2 and b["ep_rounds"] == 1, (r["step"], r["ep_rounds"], b["ep_rounds"])
    for k in ("loss", "ce_loss", "grad_norm"):
        assert r[k] == b[k], ("not bit-identical", r["step"], k, r[k], b[k])
print(f"pp2_dp2_ep2_split: {len(rows)} steps' losses, CE and gradient norms bit-identical to pp2_dp2_ep2")
PY
# Paired micro-batches (moe_pair_micro_batches) in 1F1B: one more warm-up forward than 1F1B,
# w = min(PP - stage, m), then each forward beside the backward w micro-batches before it, on a
# second activation set, the two taking turns at each expert all-to-all (pipeline.c). Forwards
# and backwards stay in micro-batch order, so every layout equals the unpaired run of the same
# layout bit for bit: every step's loss, CE, gradient norm and expert load, and the step-6
# checkpoints with `cmp`; the fp32 ones equal one process as the unpaired ones do. m = 4 at
# pp2 x dp2 (stage 0 pairs 2 micro-batches, stage 1 three), 8 at pp4 x dp2 x ep2.
source "$NM_ROOT/tests/dist/pair.sh"
pair_pp() { pair_compare "$1" "$2" 6 "${@:3}"; }  # name ranks options...
pair_pp pp2_dp2_ep2 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl pair_pp2_dp2_ep2/metrics.jsonl pair_pp2_dp2_ep2
pair_pp pp2_dp2_ep2_bf16_recompute 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2 --set precision=bf16 \
  --recompute --set overlap_moe_expert_parallel_comm=true
pair_pp pp2_dp2_ep2_fp8_optim_grads 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2 --set precision=fp8 \
  --set data_parallel_sharding_strategy=optim_grads --set overlap_grad_reduce=true --set bucket_mb=1
pair_pp tp2_pp2_ep2 8 --set pipeline_parallel_size=2 --set expert_parallel_size=2 --set tensor_parallel_size=2
pair_pp pp4_dp2_ep2 8 --set pipeline_parallel_size=4 --set expert_parallel_size=2 --set global_batch=16
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl pair_tp2_pp2_ep2/metrics.jsonl pair_tp2_pp2_ep2

# gradient sharding (ZeRO-2) inside the 1F1B schedule: every micro-batch's backward on a stage
# reduced over dp, the embedding pair's buckets once at the step's end after their sum
layout pp2_dp2_optim_grads 4 --set pipeline_parallel_size=2 --set data_parallel_sharding_strategy=optim_grads
layout pp2_ep2_optim_grads_buckets 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2 --set bucket_mb=1 \
  --set data_parallel_sharding_strategy=optim_grads
# and interleaved: each chunk's backward reduces its buckets; a bucket with rows of two chunks
# is reduced once at the step's end (tp2 x pp2 v2 is off by 3e-2 in the gradient norm when it
# is not: its sequence-parallel rows get summed over tp again)
layout pp2_v2_dp2_optim_grads 4 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=2 \
  --set data_parallel_sharding_strategy=optim_grads
layout tp2_pp2_v2_optim_grads 4 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=2 \
  --set tensor_parallel_size=2 --set data_parallel_sharding_strategy=optim_grads
layout pp4_dp2_ep2 8 --set pipeline_parallel_size=4 --set expert_parallel_size=2
# explicit layouts: 3 stages (2 + 2 ... uneven), the embedding alone on stage 0, the loss stage
# holding no decoder layer
layout pp3_layout 3 --set pipeline_parallel_size=3 --set 'pipeline_model_parallel_layout=Et|tt|tmL'
layout pp4_layout 4 --set pipeline_parallel_size=4 --set 'pipeline_model_parallel_layout=E|t*3|t|mL'
# tied embeddings: the last stage's head is its copy of the embedding
"$NM_BIN" train --config train.json --out ref_tied --quiet --set model_config.tie_word_embeddings=true >ref_tied.log 2>&1 \
  || { cat ref_tied.log; fail "one process, tied"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out pp2_tied --quiet --set pipeline_parallel_size=2 \
  --set model_config.tie_word_embeddings=true >pp2_tied.log 2>&1 || { cat pp2_tied.log; fail "pp2 tied"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref_tied/metrics.jsonl pp2_tied/metrics.jsonl pp2_tied
layout pp2_overlap 4 --set pipeline_parallel_size=2 --set bucket_mb=1 --set overlap_grad_reduce=true
nm_mpirun 2 "$NM_BIN" train --config train.json --out pp2_rc --quiet --recompute --set pipeline_parallel_size=2 \
  >pp2_rc.log 2>&1 || { cat pp2_rc.log; fail "pp2 --recompute"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref_rc/metrics.jsonl pp2_rc/metrics.jsonl pp2_recompute

# The interleaved schedule (virtual stages): 4 stages on 2 ranks, rank 0 holding stages 0 and 2,
# rank 1 stages 1 and 3; by the key (even split) or by a layout of 4 stages as Megatron reads
# it (the embedding alone on stage 0 here), with dp x ep, tp (sequence parallel), overlapped
# reduction and recomputation.
layout pp2_v2 2 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=2
layout pp2_v2_layout 2 --set pipeline_parallel_size=2 --set 'pipeline_model_parallel_layout=E|tt|t|tmL'
layout pp2_v2_dp2_ep2 4 --set pipeline_parallel_size=2 --set expert_parallel_size=2 --set 'pipeline_model_parallel_layout=Et|t|t|tmL'
layout tp2_pp2_v2 4 --set tensor_parallel_size=2 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=2
layout pp2_v2_overlap 4 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=2 --set bucket_mb=1 \
  --set overlap_grad_reduce=true
nm_mpirun 2 "$NM_BIN" train --config train.json --out pp2_v2_rc --quiet --recompute --set pipeline_parallel_size=2 \
  --set virtual_pipeline_model_parallel_size=2 >pp2_v2_rc.log 2>&1 || { cat pp2_v2_rc.log; fail "pp2 v2 --recompute"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref_rc/metrics.jsonl pp2_v2_rc/metrics.jsonl pp2_v2_recompute
grep -q "pipeline 4 stages on 2 ranks (2 virtual stages each), interleaved 1F1B over 8 micro-batches" pp2_v2.log \
  || { cat pp2_v2.log; fail "interleaved banner"; }
grep -q "E | t t | t | t m L" pp2_v2_layout.log || { cat pp2_v2_layout.log; fail "interleaved layout banner"; }

grep -q "pipeline 4 stages, 1F1B over 8 micro-batches" pp4.log || { cat pp4.log; fail "pp4 banner"; }
grep -q "E | t t t | t | m L" pp4_layout.log || { cat pp4_layout.log; fail "layout banner"; }

# Validation loss (the last stage's, broadcast) and the bubble metrics: one idle fraction per
# stage in [0, 1) and the 1F1B formula (PP-1)/(m+PP-1) with m micro-batches per step.
"$PY" - <<'PY'
import json
def rows(run): return [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ref = {d["step"]: d for d in rows("ref")}
for run, pp, m, v in (("pp2", 2, 8, 1), ("pp4", 4, 8, 1), ("pp2_dp2", 2, 4, 1), ("pp3_layout", 3, 8, 1),
                      ("pp2_v2", 2, 8, 2), ("pp2_v2_dp2_ep2", 2, 4, 2)):
    for d in rows(run):
        if "val_loss" in ref[d["step"]]:
            a, b = ref[d["step"]]["val_loss"], d.get("val_loss")
            assert b is not None and abs(a - b) <= 2e-5 * abs(a), (run, d["step"], a, b)
        assert abs(d["pp_bubble_theory"] - (pp - 1) / (v * m + pp - 1)) < 1e-12, (run, d["pp_bubble_theory"])
        idle = [d[f"pp_idle_fraction_stage{s}"] for s in range(pp)]
        assert all(0 <= x < 1 for x in idle), (run, idle)
        assert d["comm_pp_send_bytes"] > 0 and d["comm_pp_recv_bytes"] > 0, run
print("validation loss, bubble metrics and send/recv counters: ok")
PY

# The divergence guard: a gradient poisoned at step 3 on stage 0 only (layer 0's norm) makes
# every stage skip that update; the steps after it still match one process doing the same.
"$NM_BIN" train --config train.json --out ref_nan --quiet --inject-nan 3 >ref_nan.log 2>&1 || { cat ref_nan.log; fail "one process, nan"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out pp2_nan --quiet --inject-nan 3 --set pipeline_parallel_size=2 \
  >pp2_nan.log 2>&1 || { cat pp2_nan.log; fail "pp2 nan"; }
"$PY" - <<'PY'
import json
ref = {d["step"]: d for d in map(json.loads, open("ref_nan/metrics.jsonl"))}
run = {d["step"]: d for d in map(json.loads, open("pp2_nan/metrics.jsonl"))}
assert ref[3]["skipped"] == 1 and run[3]["skipped"] == 1, (ref[3]["skipped"], run[3]["skipped"])
for s in ref:
    assert run[s]["skipped"] == (s == 3), (s, run[s]["skipped"])
    for k in ("loss", "ce_loss"):
        assert abs(run[s][k] - ref[s][k]) <= 2e-5 * abs(ref[s][k]), (s, k, run[s][k], ref[s][k])
print("pp2 divergence guard: step 3 skipped on every stage, later steps match one process: ok")
PY

# A pp2 checkpoint resumes at one process and at dp2 and continues the one-process run.
nm_mpirun 2 "$NM_BIN" train --config train.json --out xl --quiet --set pipeline_parallel_size=2 --set exit_interval=2 \
  >xl.log 2>&1 || { cat xl.log; fail "pp2 part"; }
ls xl/step_000002/model-00002-of-00002.safetensors xl/step_000002/model.safetensors.index.json >/dev/null \
  || fail "no sharded checkpoint at pp2"
"$PY" - <<'PY'
import json
idx = json.load(open("xl/step_000002/model.safetensors.index.json"))["weight_map"]
# each tensor once: the embedding from stage 0 (the last stage's copy is not written twice)
assert idx["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors", idx["model.embed_tokens.weight"]
assert idx["lm_head.weight"] == "model-00002-of-00002.safetensors"
assert idx["model.layers.4.embed_tokens.weight"] == "model-00002-of-00002.safetensors"
print("pp2 checkpoint index: ok")
# The tie holds: stage 0 wrote model.embed_tokens.weight, the last stage its copy (as the MTP
# layer's embed_tokens); after 6 updates of both they are bit-identical.
import struct
def tensor(path, name):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        a, b = h[name]["data_offsets"]
        f.seek(8 + n + a)
        return f.read(b - a)
for run in ("pp2", "pp4", "pp2_tied"):
    d = f"{run}/step_000006"
    idx = json.load(open(f"{d}/model.safetensors.index.json"))["weight_map"]
    copy = "model.layers.4.embed_tokens.weight"
    e0 = tensor(f"{d}/{idx['model.embed_tokens.weight']}", "model.embed_tokens.weight")
    e1 = tensor(f"{d}/{idx[copy]}", copy)
    assert idx["model.embed_tokens.weight"] != idx[copy], (run, "written by one stage")
    assert e0 == e1, (run, "the last stage's embedding copy drifted from the first stage's")
print("embedding copies equal after training: ok")
PY
"$NM_BIN" train --config train.json --out xl --quiet --resume --set exit_interval=4 >xl1.log 2>&1 || { cat xl1.log; fail "1-process resume"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out xl --quiet --resume >xl2.log 2>&1 || { cat xl2.log; fail "dp2 resume"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xl/metrics.jsonl "pp2 -> 1 process -> dp2"
# an interleaved checkpoint (tensors by name, whatever chunks wrote them) resumes at plain pp2
nm_mpirun 2 "$NM_BIN" train --config train.json --out xv --quiet --set pipeline_parallel_size=2 \
  --set virtual_pipeline_model_parallel_size=2 --set exit_interval=3 >xv.log 2>&1 || { cat xv.log; fail "pp2 v2 part"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out xv --quiet --resume --set pipeline_parallel_size=2 >xv2.log 2>&1 \
  || { cat xv2.log; fail "pp2 resume of a v2 checkpoint"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xv/metrics.jsonl "pp2 v2 -> pp2"
# and a one-process checkpoint resumes at pp2
"$NM_BIN" train --config train.json --out back --quiet --set exit_interval=3 >back.log 2>&1 || { cat back.log; fail "1-process part"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out back --quiet --resume --set pipeline_parallel_size=2 >back2.log 2>&1 \
  || { cat back2.log; fail "pp2 resume"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl back/metrics.jsonl "1 process -> pp2"

# The 1F1B step loop allocates nothing either (activation sets and receive buffers are sized once).
if [ -n "${NM_BUILD:-}" ] && [ -x "$NM_BUILD/test_zero_alloc" ]; then
  nm_mpirun 2 "$NM_BUILD/test_zero_alloc" pipeline_parallel_size=2 >alloc.log 2>&1 || { cat alloc.log; fail "allocations in the pp2 step loop"; }
  [ "$(grep -c 'allocations during steps 3-6: 0' alloc.log)" = 2 ] || { cat alloc.log; fail "pp2 zero-allocation output"; }
  echo "pp2 step loop: no allocations on either stage"
  # the interleaved schedule's send buffers are added in the first step only
  nm_mpirun 2 "$NM_BUILD/test_zero_alloc" pipeline_parallel_size=2 virtual_pipeline_model_parallel_size=2 >alloc_v.log 2>&1 \
    || { cat alloc_v.log; fail "allocations in the pp2 v2 step loop"; }
  [ "$(grep -c 'allocations during steps 3-6: 0' alloc_v.log)" = 2 ] || { cat alloc_v.log; fail "pp2 v2 zero-allocation output"; }
  echo "pp2 v2 step loop: no allocations on either stage"
fi

# Bad layouts are refused before any work, naming the key and the value.
refuse() {
  local want=$1 n=$2; shift 2
  if nm_mpirun "$n" "$NM_BIN" train --config train.json --out bad --quiet "$@" >bad.log 2>&1; then fail "accepted: $*"; fi
  grep -qF "$want" bad.log || { cat bad.log; fail "message for $*: want '$want'"; }
}
refuse 'pipeline_model_parallel_layout "Ett|tmL": places 3 decoder layers' 2 --set pipeline_parallel_size=2 --set 'pipeline_model_parallel_layout=Ett|tmL'
refuse 'pipeline_model_parallel_layout "Et|tt|tmL" has 3 stages, not a multiple of pipeline_parallel_size 2' 2 --set pipeline_parallel_size=2 --set 'pipeline_model_parallel_layout=Et|tt|tmL'
refuse 'pipeline_model_parallel_layout "Et|tt|tmL" has 3 stages, pipeline_parallel_size x virtual_pipeline_model_parallel_size is 2 x 2 = 4' 2 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=2 --set 'pipeline_model_parallel_layout=Et|tt|tmL'
refuse "pipeline_parallel_size x virtual_pipeline_model_parallel_size 2 x 3 = 6 does not divide the 4 decoder layers" 2 --set pipeline_parallel_size=2 --set virtual_pipeline_model_parallel_size=3
refuse "virtual_pipeline_model_parallel_size 2 needs pipeline_parallel_size >= 2" 1 --set virtual_pipeline_model_parallel_size=2
refuse "8 micro-batches per step must be a multiple of it" 3 --set pipeline_parallel_size=3 --set 'pipeline_model_parallel_layout=E|t|t|t|t|mL'
refuse "'m' is on stage 0" 2 --set pipeline_parallel_size=2 --set 'pipeline_model_parallel_layout=Ettm|ttL'
refuse "unknown symbol 'x'" 2 --set pipeline_parallel_size=2 --set 'pipeline_model_parallel_layout=Etx|ttmL'
refuse "stage 1 is empty" 3 --set pipeline_parallel_size=3 --set 'pipeline_model_parallel_layout=Etttt||mL'
refuse "pipeline_parallel_size 3 does not divide the 4 decoder layers" 3 --set pipeline_parallel_size=3
[ ! -e bad/metrics.jsonl ] || fail "a refused layout wrote metrics"
echo "bad layouts refused: ok"
