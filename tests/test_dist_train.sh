#!/usr/bin/env bash
# test_dist_train.sh: data parallelism with ZeRO-1 and expert parallelism under mpirun against one process on the same global batch: per-step loss and
# gradient norm over 10 steps within the tolerance of tests/dist/compare_runs.py, expert
# loads identical; the bounded expert-parallel exchange in rounds (receive capacity below the
# mean, and every routed row forced to one rank by a router bias); the shared experts inside
# the exchange bit for bit equal to without. Then checkpoints across
# layouts, the refusal of impossible layouts, and a rank killed with SIGKILL mid-step.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}" "${NM_BUILD:?}"
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
  "seq_len": 32, "micro_batch": 1, "global_batch": 8, "steps": 10, "seed": 11, "threads": 1,
  "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
  "schedule": {"warmup_steps": 2},
  "log": {"log_every": 1, "eval_every": 0},
  "checkpoint": {"save_every": 0}
}
JSON
export OMP_NUM_THREADS=1
"$NM_BIN" train --config train.json --out ref --quiet >/dev/null

# name ranks options...
layout() {
  local name=$1 n=$2; shift 2
  nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" --quiet "$@" >"$name.log" 2>&1 \
    || { cat "$name.log"; fail "$name did not run"; }
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl "$name/metrics.jsonl" "$name"
}
layout dp2 2
layout dp4 4
# 1 MiB buckets: several per group, so some start while the backward still runs (overlap on)
# or all after it (off, the default); both equal one process.
layout dp2_buckets 2 --set bucket_mb=1 --set overlap_grad_reduce=true
layout dp2_buckets_no_overlap 2 --set bucket_mb=1 --set overlap_grad_reduce=false
# Expert parallelism always runs. It once ran only when `train --help | grep -q` found it: under
# pipefail grep -q's early exit killed the binary with SIGPIPE, and the block was skipped in
# 71 of 100 runs. The help text is captured whole and matched, never piped.
help=$("$NM_BIN" train --help 2>&1) || { echo "$help"; fail "train --help exited non-zero"; }
[[ $help == *expert_parallel_size* ]] || { echo "$help"; fail "train --help does not list expert_parallel_size"; }
layout ep2 2 --set expert_parallel_size=2
layout dp4_ep2 4 --set expert_parallel_size=2
layout dp4_ep4 4 --set expert_parallel_size=4
layout ep2_recompute 2 --set expert_parallel_size=2 --recompute
layout dp4_ep2_buckets 4 --set expert_parallel_size=2 --set bucket_mb=1 --set overlap_grad_reduce=true
# Gradient sharding (ZeRO-2, data_parallel_sharding_strategy optim_grads): every micro-batch's
# gradients reduce-scattered bucket by bucket (4 micro-batches per step at dp2, 2 at dp4) and
# summed in the owner's shard, the buckets' memory released; one process's numbers, with experts
# over edp and in the bounded exchange's rounds.
layout dp2_optim_grads 2 --set data_parallel_sharding_strategy=optim_grads
layout dp4_ep2_optim_grads 4 --set expert_parallel_size=2 --set bucket_mb=1 --set data_parallel_sharding_strategy=optim_grads
layout dp2_ep2_rounds_optim_grads 4 --set expert_parallel_size=2 --set moe_receive_capacity=0.25 \
  --set data_parallel_sharding_strategy=optim_grads
# The bounded exchange: receive buffers of a quarter of the mean rows per rank, so every MoE
# layer takes at least 4 rounds (the busiest receiver gets at least the mean), the backward
# re-dispatches and recomputes each round, and the result still equals one process.
layout ep2_rounds 2 --set expert_parallel_size=2 --set moe_receive_capacity=0.25
layout dp4_ep4_rounds 4 --set expert_parallel_size=4 --set moe_receive_capacity=0.25
layout ep2_rounds_recompute 2 --set expert_parallel_size=2 --set moe_receive_capacity=0.25 --recompute
# The shared experts inside the exchange (moe_shared_expert_overlap): the same operations in the
# same order, so the checkpoints equal the runs without it byte for byte, in fp32, bf16 and fp8,
# with rounds and recomputation, with dp, and under tp x ep (sequence parallel); the metrics say
# how long the all-to-alls kept rank 0 waiting and what share of their flight it computed.
overlap_pair() {  # name ranks options...
  local name=$1 n=$2; shift 2
  for ov in false true; do
    nm_mpirun "$n" "$NM_BIN" train --config train.json --out "${name}_$ov" --quiet --set checkpoint.save_every=10 \
      --set moe_shared_expert_overlap=$ov "$@" >"${name}_$ov.log" 2>&1 || { cat "${name}_$ov.log"; fail "$name overlap=$ov"; }
  done
  for f in "${name}_false"/step_000010/*.safetensors; do
    cmp "$f" "${name}_true/step_000010/${f##*/}" || fail "$name: ${f##*/} differs with the shared experts overlapped"
  done
  "$PY" - "${name}_false" "${name}_true" "$name" <<'PY'
import json, sys
off, on = ([json.loads(l) for l in open(f"{d}/metrics.jsonl")] for d in sys.argv[1:3])
for a, b in zip(off, on):
    assert a["loss"] == b["loss"], (sys.argv[3], a["step"], a["loss"], b["loss"])
    assert a["ep_a2a_hidden_fraction"] == 0.0, (sys.argv[3], "hidden without overlap", a["ep_a2a_hidden_fraction"])
    assert 0.0 < b["ep_a2a_hidden_fraction"] < 1.0, (sys.argv[3], "hidden with overlap", b["ep_a2a_hidden_fraction"])
    assert a["ep_a2a_exposed_s"] > 0 and b["ep_a2a_exposed_s"] > 0, sys.argv[3]
mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
print(f"{sys.argv[3]}: shared-expert overlap bit-identical; exposed all-to-all {mean(off, 'ep_a2a_exposed_s'):.4f} s -> "
      f"{mean(on, 'ep_a2a_exposed_s'):.4f} s, computed during {100 * mean(on, 'ep_a2a_hidden_fraction'):.0f}% of flight")
PY
}
overlap_pair ov_ep2 2 --set expert_parallel_size=2
overlap_pair ov_dp4_ep2_bf16 4 --set expert_parallel_size=2 --set precision=bf16
overlap_pair ov_ep2_fp8_rounds_rc 2 --set expert_parallel_size=2 --set precision=fp8 --set moe_receive_capacity=0.25 --recompute
overlap_pair ov_tp2_ep2 4 --set expert_parallel_size=2 --set tensor_parallel_size=2
# Selective recomputation of all three modules (the norms gathered again under sequence
# parallelism), and whole blocks (recompute_granularity full), against none: the same bytes, at
# tp2 x ep2 in bf16 and at ep2 in fp8. Without whole blocks a bf16 run keeps its GEMM-only
# saved activations in bf16, and an fp8 run its experts' inputs in fp8 and the rest of them in
# bf16; whole blocks keep neither, so the last comparison checks those copies.
modules_pair() {  # name ranks options...
  local name=$1 n=$2 v; shift 2
  for v in none mla_up_proj,moe_act,layernorm full; do
    local opt=(--set recompute_modules="$v")
    [ "$v" = none ] && opt=()
    [ "$v" = full ] && opt=(--set recompute_granularity=full)
    nm_mpirun "$n" "$NM_BIN" train --config train.json --out "${name}_$v" --quiet \
      --set checkpoint.save_every=10 "${opt[@]}" "$@" >"${name}_$v.log" 2>&1 \
      || { cat "${name}_$v.log"; fail "$name recompute $v"; }
  done
  for v in mla_up_proj,moe_act,layernorm full; do
    for f in "${name}_none"/step_000010/*.safetensors; do
      cmp "$f" "${name}_$v/step_000010/${f##*/}" || fail "$name: ${f##*/} differs with recompute $v"
    done
  done
  echo "$name: selective recomputation of all three modules and of whole blocks bit-identical"
}
modules_pair rm_tp2_ep2_bf16 4 --set expert_parallel_size=2 --set tensor_parallel_size=2 --set precision=bf16
modules_pair rm_ep2_fp8 2 --set expert_parallel_size=2 --set precision=fp8
# and in rounds (capacity 0.25): the backward sends x_perm again from the block's bf16 copy and
# rounds the recomputed gate_up to fp8, where the single round reads the kept codes
modules_pair rm_ep2_fp8_rounds 2 --set expert_parallel_size=2 --set precision=fp8 --set moe_receive_capacity=0.25
# precision TOLERANCES [compare_runs env...]: one process of that precision, then ep2 and ep2 with
# rounds and recomputation against it
precision_runs() {
  local p=$1 tol=$2; shift 2
  "$NM_BIN" train --config train.json --out "ref_$p" --quiet --set precision="$p" >/dev/null
  for spec in "ep2_$p 2 --set expert_parallel_size=2" \
              "ep2_rounds_recompute_$p 2 --set expert_parallel_size=2 --set moe_receive_capacity=0.25 --recompute"; do
    local -a a; read -r -a a <<<"$spec"
    local name=${a[0]} n=${a[1]}
    nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" --quiet --set precision="$p" "${a[@]:2}" \
      >"$name.log" 2>&1 || { cat "$name.log"; fail "$name did not run"; }
    env NM_COMPARE_TOL="$tol" "$@" "$PY" "$NM_ROOT/tests/dist/compare_runs.py" "ref_$p/metrics.jsonl" \
      "$name/metrics.jsonl" "$name"
  done
}
# bf16: the rows to the experts cross as bf16 (the expert side rounds them to bf16 anyway),
# against one bf16 process. A bf16 run on 2 ranks differs from one process by more than an
# fp32 one (a sum that moves by an ulp can move a rounding to bf16 by a bf16 step): measured
# at dp2 (no all-to-all at all) and ep2 alike, loss 5.6e-6, CE 7.3e-6, gradient norm 3.3e-5
# over 10 steps, so 10x that here.
precision_runs bf16 6e-5,3e-4
# fp8 (DeepSeek-V3's FP8 dispatch): the activations cross as e4m3 codes with a scale per 1 x 128
# tile, the gradients and the way back as bf16; one process applies the same roundings
# (moe.c). fp8 layouts still differ by more than bf16 ones: an ulp of an fp32 GEMM over another
# grouping of rows can cross an e4m3 rounding (compare_runs.py, NM_COMPARE_LOAD). Measured over
# 10 steps, against one fp8 process: ep2 loss 8.6e-5, CE 9.4e-5, gradient norm 3.5e-4; with
# rounds and recomputation 5.3e-5, 9.6e-5, 3.1e-4 (with fp32 saved activations and gate_up:
# up to 1.4e-4, 1.7e-4, 1.1e-3, and dp2 with no all-to-all at all 1.1e-4, 1.3e-4, 9.4e-4).
# Bounds about 10x of the largest. The transport itself is checked exactly: the codes, scales
# and round trip in test_backend_ops, the bytes against the formula below.
precision_runs fp8 1e-3,4e-3 NM_COMPARE_LOAD=report

# The split expert exchange (overlap_moe_expert_parallel_comm): each MoE block's exchange in two
# parts, each a half of every rank's local experts; one part's dispatch and combine in flight
# while the other's experts compute (moe.c). Each expert's rows arrive whole and in the unsplit
# order, so its GEMMs and its weight gradient's sum are the unsplit ones: every layout and
# precision equals the unsplit run of the same layout bit for bit (every step's loss, CE and
# gradient norm, and the step-10 checkpoints where that run saved them), and so fp32 equals one
# process within compare_runs' tolerance as the unsplit one does. Every step's exchange takes 2
# rounds (the parts), moves the unsplit exchange's bytes, and the experts computed during part of
# the flight.
# same_checkpoint RUN REFERENCE WHAT: RUN's step-10 checkpoint is REFERENCE's, file by file, byte
# for byte (`cmp`); WHAT names the reference in the failure.
same_checkpoint() {
  local run=$1 ref=$2 what=$3 f
  for f in "$ref"/step_000010/*.safetensors; do
    cmp "$f" "$run/step_000010/${f##*/}" || fail "$run: ${f##*/} differs from $what"
  done
}
split_run() {  # name ranks reference unsplit-run options...
  local name=$1 n=$2 ref=$3 unsplit=$4; shift 4
  nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" --quiet --set overlap_moe_expert_parallel_comm=true \
    --set checkpoint.save_every=10 "$@" >"$name.log" 2>&1 || { cat "$name.log"; fail "$name did not run"; }
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" "$ref/metrics.jsonl" "$name/metrics.jsonl" "$name"
  [ ! -d "$unsplit/step_000010" ] || same_checkpoint "$name" "$unsplit" "the unsplit exchange's"
  "$PY" - "$name" "$unsplit" <<'PY'
import json, os, sys
name, unsplit = sys.argv[1:3]
rows, base = ([json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"loss"' in l] for d in (name, unsplit))
assert len(rows) == len(base) == 10, (name, len(rows), len(base))
for r, b in zip(rows, base):
    assert r["ep_rounds"] == 2 and b["ep_rounds"] == 1, (name, r["step"], r["ep_rounds"], b["ep_rounds"])
    assert r["comm_ep_all_to_all_bytes_job"] == b["comm_ep_all_to_all_bytes_job"], (name, r["step"])
    for k in ("loss", "ce_loss", "grad_norm"):
        assert r[k] == b[k], (name, "not bit-identical to the unsplit exchange", r["step"], k, r[k], b[k])
hidden = sum(r["ep_a2a_hidden_fraction"] for r in rows) / len(rows)
assert hidden > 0.0, (name, "no expert compute while an all-to-all was in flight")
ckpt = "and checkpoints " if os.path.isdir(f"{unsplit}/step_000010") else ""
print(f"{name}: losses, CE, gradient norms {ckpt}bit-identical to {unsplit}; 2 parts every step, the unsplit "
      f"bytes, computed during {100 * hidden:.0f}% of the flight")
PY
}
split_run sp_ep2 2 ref ep2 --set expert_parallel_size=2
split_run sp_dp4_ep2 4 ref dp4_ep2 --set expert_parallel_size=2
split_run sp_ep2_recompute_shared 2 ref ep2_recompute --set expert_parallel_size=2 --recompute --set moe_shared_expert_overlap=true
split_run sp_tp2_ep2 4 ref ov_tp2_ep2_false --set expert_parallel_size=2 --set tensor_parallel_size=2
split_run sp_ep2_bf16 2 ep2_bf16 ep2_bf16 --set expert_parallel_size=2 --set precision=bf16
NM_COMPARE_LOAD=report split_run sp_ep2_fp8 2 ep2_fp8 ep2_fp8 --set expert_parallel_size=2 --set precision=fp8

# Paired micro-batches (moe_pair_micro_batches, DeepSeek-V3's DualPipe overlap; in 1F1B in
# tests/test_dist_pp.sh): micro-batch i+1's forward runs beside micro-batch i's backward on a second
# activation set, the two taking turns on one thread at each expert all-to-all, so that one's
# all-to-all is in flight while the other computes (trainer_step.c). A forward writes nothing a
# backward reads and the backwards add into the gradients in micro-batch order, so every layout
# and precision equals the unpaired run of the same layout bit for bit: every step's loss, CE,
# gradient norm and expert load, and the step-10 checkpoints with `cmp`. The other micro-batch
# computed during part of every step's flight, and the run holds two activation sets
# (memory.json: twice the unpaired run's bytes). 2 micro-batches a step at dp2 and dp4 x ep2
# (micro 1, global 8 over 4 data-parallel ranks), 4 at ep2.
source "$NM_ROOT/tests/dist/pair.sh"
pair_run() { PAIR_HIDDEN=1 pair_compare "$1" "$2" 10 "${@:3}"; }  # name ranks options...
pair_run ep2 2 --set expert_parallel_size=2
pair_run dp4_ep2 4 --set expert_parallel_size=2
pair_run ep2_bf16 2 --set expert_parallel_size=2 --set precision=bf16
pair_run ep2_fp8 2 --set expert_parallel_size=2 --set precision=fp8
# with the split exchange and the shared experts inside the exchange, whole blocks recomputed
pair_run ep2_split_shared_recompute 2 --set expert_parallel_size=2 --set overlap_moe_expert_parallel_comm=true \
  --set moe_shared_expert_overlap=true --recompute
# tensor parallelism inside each expert group; the exchange in rounds (capacity a quarter of the
# mean); gradient sharding with its reduce-scatters inside the backward; selective recomputation
pair_run tp2_ep2 4 --set expert_parallel_size=2 --set tensor_parallel_size=2
pair_run ep2_rounds 2 --set expert_parallel_size=2 --set moe_receive_capacity=0.25
pair_run dp4_ep2_optim_grads 4 --set expert_parallel_size=2 --set bucket_mb=1 --set overlap_grad_reduce=true \
  --set data_parallel_sharding_strategy=optim_grads
pair_run ep2_bf16_modules 2 --set expert_parallel_size=2 --set precision=bf16 --set recompute_granularity=selective \
  --set recompute_modules=mla_up_proj,moe_act,layernorm
# What the pairing cannot take is refused before any work, naming the key and the numbers.
pair_refused() {  # name ranks expected-message options...
  local name=$1 n=$2 want=$3; shift 3
  if nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$name" --quiet --set moe_pair_micro_batches=true "$@" \
       >"$name.log" 2>&1; then
    fail "$name: accepted"
  fi
  [[ $(cat "$name.log") == *"$want"* ]] || { cat "$name.log"; fail "$name: the refusal does not say: $want"; }
  [ ! -e "$name/metrics.jsonl" ] || fail "$name: a refused run wrote metrics"
}
pair_refused pair_accum1 2 "moe_pair_micro_batches needs at least 2 micro-batches a step, and global_batch 2 / (micro_batch 1 x data_parallel_size 2) is 1" \
  --set expert_parallel_size=2 --set global_batch=2
pair_refused pair_pp2_v2 4 "moe_pair_micro_batches with 2 virtual pipeline stages per rank" \
  --set expert_parallel_size=2 --set pipeline_parallel_size=2 --set "pipeline_model_parallel_layout=Et|t|t|mL"
pair_refused pair_ep1 2 "moe_pair_micro_batches: it hides the expert all-to-all, and expert_parallel_size 1 has none"

# Every routed row forced to one EP rank: a router bias of 100 on experts 0 and 1 (EP rank 0's
# pair at ep4, half of rank 0's four at ep2) outweighs any affinity, so all N x K rows of every
# rank go to rank 0, the dropless worst case. ep4 receives 4 x N x 2 rows against C = 2 x N x 2:
# two rounds; dp2 x ep2 exactly C: one. Both equal one process from the same start. The split
# exchange at dp2 x ep2 (its receiver fits, so it splits): part 0 (rank 0's experts 0 and 1) has
# every row and part 1 none, on every rank; bit for bit the unsplit run's.
"$NM_BIN" train --config train.json --out bias0 --quiet --set steps=1 >/dev/null
"$PY" - <<'PY'
import json, os, shutil, struct
os.makedirs("biased", exist_ok=True)
for f in ("config.json",):
    shutil.copy(f"bias0/step_000001/{f}", f"biased/{f}")
raw = open("bias0/step_000001/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = bytearray(raw[8 + n:])
hits = 0
for name, t in header.items():
    if name.endswith("mlp.gate.e_score_correction_bias"):
        assert t["dtype"] == "F32", t
        a, _ = t["data_offsets"]
        for e in (0, 1):
            data[a + 4 * e:a + 4 * e + 4] = struct.pack("<f", 100.0)
        hits += 1
assert hits == 3, hits  # two MoE decoder layers and the MTP layer
open("biased/model.safetensors", "wb").write(raw[:8 + n] + bytes(data))
c = json.load(open("train.json"))
c.pop("model")
json.dump(dict(c, init_from="biased", steps=6), open("biased.json", "w"))
PY
"$NM_BIN" train --config biased.json --out ref_biased --quiet >/dev/null
for spec in "ep4_one_rank 4 --set expert_parallel_size=4" "dp2_ep2_one_rank 4 --set expert_parallel_size=2" \
            "dp2_ep2_one_rank_split 4 --set expert_parallel_size=2 --set overlap_moe_expert_parallel_comm=true"; do
  set -- $spec; name=$1; n=$2; shift 2
  nm_mpirun "$n" "$NM_BIN" train --config biased.json --out "$name" --quiet "$@" >"$name.log" 2>&1 \
    || { cat "$name.log"; fail "$name did not run"; }
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref_biased/metrics.jsonl "$name/metrics.jsonl" "$name"
done
"$PY" - <<'PY'
import json
for run, rounds in (("ep4_one_rank", 2), ("dp2_ep2_one_rank", 1), ("dp2_ep2_one_rank_split", 2)):
    ep = 4 if run.startswith("ep4") else 2
    for line in open(f"{run}/metrics.jsonl"):
        d = json.loads(line)
        # the busiest receiver got all of it: EP times the mean
        assert d["ep_rounds"] == rounds and abs(d["ep_recv_max_over_mean"] - ep) < 1e-12, (run, d["step"], d["ep_rounds"], d["ep_recv_max_over_mean"])
    print(f"{run}: every row to one rank, {rounds} round(s) per layer: ok")
split, whole = ([json.loads(l) for l in open(f"{r}/metrics.jsonl") if '"loss"' in l] for r in
                ("dp2_ep2_one_rank_split", "dp2_ep2_one_rank"))
assert len(split) == len(whole) == 6, (len(split), len(whole))
for a, b in zip(split, whole):
    for k in ("loss", "ce_loss", "grad_norm"):
        assert a[k] == b[k], ("dp2_ep2_one_rank_split not bit-identical", a["step"], k, a[k], b[k])
print("dp2_ep2_one_rank_split: one part with every row, one with none: bit-identical to the unsplit run")
PY

# The ZeRO-1 byte counters against the formula of docs/parallelism.md: per step each rank
# reduce-scatters and all-gathers every float of the buffer once (the tensors plus at most 63
# floats of alignment padding each), split between the dp group (replicated tensors) and the
# edp group (routed experts).
"$PY" - <<'PY'
import json, struct
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h
ts = tensors("ref/step_000010/model.safetensors")
def numel(v):
    p = 1
    for d in v["shape"]: p *= d
    return p
# MTP copies of the embedding and head are written as copies but have no storage of their own.
tied = [k for k in ts if k.endswith("embed_tokens.weight") and k != "model.embed_tokens.weight"
        or k.endswith("shared_head.head.weight")]
dense = sum(numel(v) for k, v in ts.items() if ".mlp.experts." not in k and k not in tied)
expert = sum(numel(v) for k, v in ts.items() if ".mlp.experts." in k)
n_dense = sum(1 for k in ts if ".mlp.experts." not in k and k not in tied)
n_expert = sum(1 for k in ts if ".mlp.experts." in k)
for run in ("dp2", "dp4"):
    for line in open(f"{run}/metrics.jsonl"):
        d = json.loads(line)
        for op in ("reduce_scatter", "all_gather"):
            got_d, got_e = d[f"comm_dp_{op}_bytes"], d[f"comm_edp_{op}_bytes"]
            assert 4 * dense <= got_d <= 4 * (dense + 63 * n_dense), (run, op, got_d, 4 * dense)
            assert 4 * expert <= got_e <= 4 * (expert + 63 * n_expert), (run, op, got_e, 4 * expert)
# under ep2 each rank holds (and reduces over edp) half of the experts
for line in open("dp4_ep2/metrics.jsonl"):
    d = json.loads(line)
    got_e = d["comm_edp_reduce_scatter_bytes"]
    assert 4 * expert // 2 <= got_e <= 4 * (expert // 2 + 63 * n_expert // 2), ("dp4_ep2", got_e, 4 * expert // 2)
    assert d["comm_ep_all_to_all_bytes"] > 0, "ep2 moved no token rows"
print(f"byte counters: dp {4*dense} + edp {4*expert} bytes of tensors per reduce-scatter/all-gather: ok")

# Overlap: with 1 MiB buckets some buckets start inside the backward (all decoder-layer
# buckets can; those holding the embedding, final norm or head cannot), none when it is off.
for run, on in (("dp2_buckets", True), ("dp2_buckets_no_overlap", False), ("dp4_ep2_buckets", True)):
    for line in open(f"{run}/metrics.jsonl"):
        d = json.loads(line)
        n, early = d["grad_buckets"], d["grad_buckets_started_in_backward"]
        assert n >= 3, (run, "expected several 1 MiB buckets", n)
        if on: assert 0 < early < n and 0 < d["grad_reduce_overlap_fraction"] < 1, (run, early, n)
        else: assert early == 0 and d["grad_reduce_overlap_fraction"] == 0, (run, early)
print("overlap: buckets started during the backward when on, none when off: ok")

# The all-to-all bytes of the job per step, from the configuration alone (docs/parallelism.md):
# dropless routing hands each token's K rows (D floats) to the dispatch, and the expert side
# returns the same rows in the combine; the backward moves both again; each MoE layer first
# exchanges E/EP int64 counts with each of EP peers. Per MoE layer and micro-batch, over the
# job: W*E*8 + 4 phases * (W*micro*T_l) * K * D * 4 bytes, where T_l = seq_len + 1 positions
# in the decoder and seq_len + 1 - k in MTP depth k. Recomputation re-runs each block's
# forward (its counts, dispatch and combine) inside the backward. A layer whose exchange took
# more than one round (its receive capacity) sends its rows once more in the backward, to
# recompute the expert side of each round: one more phase.
m = json.load(open("model.json")); c = json.load(open("train.json"))
L, M = m["num_hidden_layers"], m.get("num_nextn_predict_layers", 0)
E, K, D = m["n_routed_experts"], m["num_experts_per_tok"], m["hidden_size"]
dense_first, freq = m["first_k_dense_replace"], m.get("moe_layer_freq", 1)
T = c["seq_len"] + 1
def a2a(world, recompute, rounds, precision="fp32"):
    # (the job's bytes, one rank's counts + dispatches: a lower bound of its own share). Bytes of
    # a row of D by what it carries: the activations to the experts (fp8: e4m3 codes + a 4-byte
    # scale per 128; bf16: 2 per element; fp32: 4), the gradients to them (2, or 4 in fp32) and
    # everything coming back (2 in fp8, else 4).
    x_row = {"fp8": D + 4 * ((D + 127) // 128), "bf16": 2 * D, "fp32": 4 * D}[precision]
    grad_row, back_row = (4 * D if precision == "fp32" else 2 * D), (2 * D if precision == "fp8" else 4 * D)
    micro, accum = c["micro_batch"], c["global_batch"] // (c["micro_batch"] * world)
    total = own = 0
    for l in range(L + M):
        if l < dense_first or l % freq != 0: continue
        T_l = T if l < L else T - (l - L + 1)
        phases, counts = (6, 2) if recompute else (4, 1)
        x_phases = phases // 2 - 1
        own += counts * E * 8 + micro * T_l * K * (x_phases * x_row + grad_row)
        row_bytes = (x_phases + (rounds > 1)) * x_row + grad_row + phases // 2 * back_row
        total += counts * world * E * 8 + world * micro * T_l * K * row_bytes
    return accum * total, accum * own
runs = (("ep2", 2, False, 1), ("dp4_ep2", 4, False, 1), ("dp4_ep4", 4, False, 1), ("ep2_recompute", 2, True, 1),
        ("ep2_rounds", 2, False, 4), ("dp4_ep4_rounds", 4, False, 4), ("ep2_rounds_recompute", 2, True, 4),
        ("ep2_bf16", 2, False, 1), ("ep2_rounds_recompute_bf16", 2, True, 4),
        ("ep2_fp8", 2, False, 1), ("ep2_rounds_recompute_fp8", 2, True, 4))
for run, world, rec, least in runs:
    disp = run.rsplit("_", 1)[-1] if run.endswith(("bf16", "fp8")) else "fp32"
    seen = []
    for line in open(f"{run}/metrics.jsonl"):
        d = json.loads(line)
        rounds, over = d["ep_rounds"], d["ep_recv_max_over_mean"]
        seen.append((rounds, over))
        assert rounds >= least and over >= 1.0, (run, d["step"], rounds, over)
        if rounds == 1 or least > 1:  # else some layers took one round, some more: between the two
            want, own = a2a(world, rec, rounds, disp)
            assert d["comm_ep_all_to_all_bytes_job"] == want, (run, d["step"], d["comm_ep_all_to_all_bytes_job"], want)
        else:
            lo, own = a2a(world, rec, 1, disp)
            want = a2a(world, rec, 2, disp)[0]
            assert lo < d["comm_ep_all_to_all_bytes_job"] <= want, (run, d["step"], d["comm_ep_all_to_all_bytes_job"])
        assert own <= d["comm_ep_all_to_all_bytes"] < want, (run, d["step"], d["comm_ep_all_to_all_bytes"], own)
    print(f"{run}: all-to-all {want} bytes per step over the job; rounds, busiest receiver / mean per step: "
          + " ".join(f"{r}:{o:.2f}" for r, o in seen) + ": ok")
# fp8's dispatch (the activations' rows, counted exactly above) against fp32's: at most 0.3x
fp8_x, fp32_x = D + 4 * ((D + 127) // 128), 4 * D
assert fp8_x / fp32_x <= 0.3, (fp8_x, fp32_x)
print(f"fp8 dispatch: {fp8_x} bytes a row against {fp32_x} in fp32 ({fp8_x / fp32_x:.3f}x): ok")
PY

# Checkpoints across layouts: 4 ranks (dp4 x ep2: each rank holds half the experts) -> 1
# process -> 2 ranks equals the uninterrupted run.
ep_xl=(--set expert_parallel_size=2)
nm_mpirun 4 "$NM_BIN" train --config train.json --out xl --quiet --set exit_interval=4 "${ep_xl[@]}" >xl.log 2>&1 \
  || { cat xl.log; fail "4-rank part"; }
ls xl/step_000004/model-00004-of-00004.safetensors xl/step_000004/model.safetensors.index.json >/dev/null \
  || fail "no sharded HF checkpoint at 4 ranks"
"$NM_BIN" train --config train.json --out xl --quiet --resume --set exit_interval=7 >xl1.log 2>&1 \
  || { cat xl1.log; fail "1-process resume"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out xl --quiet --resume >xl2.log 2>&1 || { cat xl2.log; fail "2-rank resume"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xl/metrics.jsonl "4 ranks ${ep_xl[*]} -> 1 -> 2 ranks"
# a gradient-sharded run's checkpoint is the same directory (the shard lives within a step):
# dp4 x ep2 under optim_grads -> dp2 under optim equals the uninterrupted run
nm_mpirun 4 "$NM_BIN" train --config train.json --out xz --quiet --set exit_interval=4 "${ep_xl[@]}" \
  --set data_parallel_sharding_strategy=optim_grads >xz.log 2>&1 || { cat xz.log; fail "optim_grads part"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out xz --quiet --resume >xz1.log 2>&1 \
  || { cat xz1.log; fail "optim resume of an optim_grads checkpoint"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xz/metrics.jsonl "4 ranks optim_grads -> 2 ranks optim"
# the 4-rank checkpoint is an HF directory that one process loads
"$PY" -c "import struct; open('tok.bin','wb').write(struct.pack('<32i', *[(7*i) % 300 for i in range(32)]))"
"$NM_BIN" forward --model xl/step_000004 --tokens tok.bin --batch 2 >fwd.log 2>&1 || { cat fwd.log; fail "forward on the 4-rank checkpoint"; }
grep -q '"loss"' fwd.log || fail "forward printed no loss"

# The distributed optimizer's ranges cut through tensors: with a 3,000-token tied embedding
# (most of the dense floats) dp4's equal ranges split it over 3 ranks (the banner says so).
# A checkpoint moves the moments to whole-tensor owners and back (nm_zero_state_exchange):
# dp4 stopped at step 4 and resumed at dp4 equals the uninterrupted dp4 run bit for bit
# (metrics as text, every safetensors file of step 8), and dp4 -> 1 process -> dp2 equals
# one process within compare_runs' tolerance.
"$PY" - <<'PY'
import json
m = json.load(open("model.json"))
json.dump(dict(m, vocab_size=3000, tie_word_embeddings=True), open("model_tied.json", "w"))
c = json.load(open("train.json"))
json.dump(dict(c, model="model_tied.json", steps=8), open("tied.json", "w"))
PY
"$NM_BIN" train --config tied.json --out tied_ref --quiet >/dev/null
nm_mpirun 4 "$NM_BIN" train --config tied.json --out tied_dp4 >tied_dp4.log 2>&1 || { cat tied_dp4.log; fail "tied dp4"; }
banner=$(<tied_dp4.log)
[[ $banner == *"model.embed_tokens.weight spans 3 of them"* ]] || { echo "$banner"; fail "the embedding does not straddle 3 ranges at dp4"; }
# A dp4 run (PREFIX_dp4, run already) stopped at step 4 and resumed (PREFIX_rs) equals it bit for
# bit (metrics as text, every safetensors file of step 8); a dp4 checkpoint continued at one
# process and then at dp2 (PREFIX_x) equals one process (PREFIX_ref) within compare_runs'
# tolerance (NM_COMPARE_TOL from the caller).
resume_straddling() {  # config prefix label
  local cfg=$1 p=$2 label=$3
  nm_mpirun 4 "$NM_BIN" train --config "$cfg" --out "${p}_rs" --quiet --set exit_interval=4 >"${p}_rs.log" 2>&1 \
    || { cat "${p}_rs.log"; fail "$label: dp4 to step 4"; }
  nm_mpirun 4 "$NM_BIN" train --config "$cfg" --out "${p}_rs" --quiet --resume >"${p}_rs2.log" 2>&1 \
    || { cat "${p}_rs2.log"; fail "$label: dp4 resumed"; }
  "$PY" "$NM_ROOT/tests/dist/same_steps.py" "${p}_dp4/metrics.jsonl" "${p}_rs/metrics.jsonl" "$label, stopped and resumed"
  for f in "${p}_dp4"/step_000008/*.safetensors; do
    cmp "$f" "${p}_rs/step_000008/${f##*/}" || fail "$label resumed: ${f##*/} differs from the uninterrupted run"
  done
  echo "$label: resumed run's step-8 checkpoint identical to the uninterrupted one"
  nm_mpirun 4 "$NM_BIN" train --config "$cfg" --out "${p}_x" --quiet --set exit_interval=4 >"${p}_x.log" 2>&1 \
    || { cat "${p}_x.log"; fail "$label: dp4 part"; }
  "$NM_BIN" train --config "$cfg" --out "${p}_x" --quiet --resume --set exit_interval=6 >"${p}_x1.log" 2>&1 \
    || { cat "${p}_x1.log"; fail "$label: 1-process resume"; }
  nm_mpirun 2 "$NM_BIN" train --config "$cfg" --out "${p}_x" --quiet --resume >"${p}_x2.log" 2>&1 \
    || { cat "${p}_x2.log"; fail "$label: dp2 resume"; }
  "$PY" "$NM_ROOT/tests/dist/compare_runs.py" "${p}_ref/metrics.jsonl" "${p}_x/metrics.jsonl" "$label -> 1 -> dp2"
}
resume_straddling tied.json tied "dp4 straddling"
# The AdamW moments in bf16 (optimizer.exp_avg_dtype / exp_avg_sq_dtype, DeepSeek-V3's choice):
# a checkpoint holds them as fp32 (exact), so stopping and resuming changes no bit, at one
# process and at dp4 with the straddling ranges; the banner's optimizer shard is half.
bf16m=(--set optimizer.exp_avg_dtype=bf16 --set optimizer.exp_avg_sq_dtype=bf16)
for n in 1 4; do
  run() { if [ "$n" = 1 ]; then "$NM_BIN" "$@"; else nm_mpirun "$n" "$NM_BIN" "$@"; fi; }
  run train --config tied.json --out "bm$n" "${bf16m[@]}" >"bm$n.log" 2>&1 || { cat "bm$n.log"; fail "bf16 moments, $n rank(s)"; }
  run train --config tied.json --out "bm${n}_rs" --quiet "${bf16m[@]}" --set exit_interval=4 >"bm${n}_rs.log" 2>&1 \
    || { cat "bm${n}_rs.log"; fail "bf16 moments, $n rank(s), to step 4"; }
  run train --config tied.json --out "bm${n}_rs" --quiet "${bf16m[@]}" --resume >"bm${n}_rs2.log" 2>&1 \
    || { cat "bm${n}_rs2.log"; fail "bf16 moments, $n rank(s), resumed"; }
  "$PY" "$NM_ROOT/tests/dist/same_steps.py" "bm$n/metrics.jsonl" "bm${n}_rs/metrics.jsonl" "bf16 moments, $n rank(s), stopped and resumed"
  for f in "bm$n"/step_000008/*.safetensors; do
    cmp "$f" "bm${n}_rs/step_000008/${f##*/}" || fail "bf16 moments, $n rank(s): ${f##*/} differs after the resume"
  done
done
"$PY" - <<'PY'
import re
shard = lambda path: float(re.search(r"optimizer shard ([\d.]+) MiB", open(path).read())[1])
full, half = shard("tied_dp4.log"), shard("bm4.log")
print(f"dp4 optimizer shard: fp32 moments {full} MiB, bf16 moments {half} MiB")
assert abs(half - full / 2) <= 0.1, (full, half)
PY

# bf16 shards the GEMMs' fp32 master weights with the optimizer (zero.h nm_zero_shard_master):
# a rank keeps only its ranges of them, the bf16 copy is all-gathered, and a save gathers each
# tensor to its writer. With a 3,000-token untied head (a GEMM row straddling 3 ranges at dp4):
# the resident master weights are below the buffer (memory.json); dp4 stopped at step 4 and
# resumed equals the uninterrupted dp4 run bit for bit; dp4 -> 1 process -> dp2 equals one
# bf16 process within precision_runs' bf16 bounds (measured here: loss 1.5e-5, gradient norm 8.3e-5).
"$PY" - <<'PY'
import json
m = json.load(open("model.json"))
json.dump(dict(m, vocab_size=3000, tie_word_embeddings=False), open("model_head.json", "w"))
c = json.load(open("train.json"))
json.dump(dict(c, model="model_head.json", steps=8, precision="bf16"), open("head.json", "w"))
PY
"$NM_BIN" train --config head.json --out mst_ref --quiet >/dev/null
nm_mpirun 4 "$NM_BIN" train --config head.json --out mst_dp4 --quiet >mst_dp4.log 2>&1 || { cat mst_dp4.log; fail "bf16 dp4"; }
"$PY" - <<'PY' || fail "bf16 dp4: the master weights are not sharded"
import json
m = json.load(open("mst_dp4/memory.json"))
print(f"bf16 dp4: rank 0 keeps {m['params_resident_bytes']} of {m['params_bytes']} master-weight bytes")
assert m["params_resident_bytes"] < 0.6 * m["params_bytes"], m
PY
NM_COMPARE_TOL=6e-5,3e-4 resume_straddling head.json mst "bf16 dp4 sharded master"

# The step loop allocates nothing under dp2 x ep2 either (dispatch buffers are sized once).
# (tests/alloc/tests.cmake builds it with the suite.)
[ -x "$NM_BUILD/test_zero_alloc" ] || fail "$NM_BUILD/test_zero_alloc is missing (cmake --build builds it)"
nm_mpirun 2 "$NM_BUILD/test_zero_alloc" expert_parallel_size=2 >alloc.log 2>&1 || { cat alloc.log; fail "allocations in the ep2 step loop"; }
[ "$(grep -c 'allocations during steps 3-6: 0' alloc.log)" = 2 ] || { cat alloc.log; fail "ep2 zero-allocation output"; }
echo "ep2 step loop: no allocations on either rank"
nm_mpirun 2 "$NM_BUILD/test_zero_alloc" expert_parallel_size=2 moe_receive_capacity=0.25 >alloc_rounds.log 2>&1 \
  || { cat alloc_rounds.log; fail "allocations in the ep2 step loop with rounds"; }
[ "$(grep -c 'allocations during steps 3-6: 0' alloc_rounds.log)" = 2 ] || { cat alloc_rounds.log; fail "ep2 rounds zero-allocation output"; }
echo "ep2 step loop in rounds: no allocations on either rank"
# bf16: the activations' twins are placed when the arena is laid out, so the step loop
# allocates none either, and every rounding finds its twin (test_zero_alloc fails on a miss);
# where the bf16 GEMM reads fp32 storage (the widen kernel) there are no twins to find
nm_mpirun 2 "$NM_BUILD/test_zero_alloc" expert_parallel_size=2 precision=bf16 \
  recompute_modules=mla_up_proj,moe_act,layernorm >alloc_bf16.log 2>&1 || { cat alloc_bf16.log; fail "ep2 bf16 step loop"; }
[ "$(grep -c 'allocations during steps 3-6: 0' alloc_bf16.log)" = 2 ] || { cat alloc_bf16.log; fail "ep2 bf16 zero-allocation output"; }
grep "bf16 twins" alloc_bf16.log | head -1
nm_mpirun 2 "$NM_BUILD/test_zero_alloc" tensor_parallel_size=2 precision=bf16 --recompute >alloc_tp_bf16.log 2>&1 \
  || { cat alloc_tp_bf16.log; fail "tp2 bf16 step loop with recomputation"; }
[ "$(grep -c 'allocations during steps 3-6: 0' alloc_tp_bf16.log)" = 2 ] || { cat alloc_tp_bf16.log; fail "tp2 bf16 zero-allocation output"; }
echo "ep2 and tp2 bf16 step loops: no allocations, every bf16 rounding found its twin"
# gradient sharding at dp2 with 2 micro-batches a step: its shard and bucket state are made once
nm_mpirun 2 "$NM_BUILD/test_zero_alloc" data_parallel_sharding_strategy=optim_grads global_batch=8 \
  >alloc_zero2.log 2>&1 || { cat alloc_zero2.log; fail "dp2 optim_grads step loop"; }
[ "$(grep -c 'allocations during steps 3-6: 0' alloc_zero2.log)" = 2 ] || { cat alloc_zero2.log; fail "dp2 optim_grads zero-allocation output"; }
echo "dp2 optim_grads step loop: no allocations on either rank"

# Impossible layouts are refused before any work, naming the numbers.
if nm_mpirun 3 "$NM_BIN" train --config train.json --out bad3 --quiet >bad3.log 2>&1; then fail "world 3 accepted"; fi
grep -q "global_batch 8 is not divisible by micro_batch 1 x data_parallel_size 3" bad3.log || { cat bad3.log; fail "world 3 message"; }
if nm_mpirun 2 "$NM_BIN" train --config train.json --out bad_ep --quiet --set expert_parallel_size=3 >bad_ep.log 2>&1; then
  fail "ep 3 at world 2 accepted"; fi
grep -q "expert_parallel_size 3 does not divide" bad_ep.log || { cat bad_ep.log; fail "ep message"; }
[ ! -e bad3/metrics.jsonl ] || fail "a refused layout wrote metrics"

# A rank killed with SIGKILL mid-run: every process is gone within 30 s, the last checkpoint
# is intact and --resume continues to the end.
"$PY" - <<'PY'
import json
c = json.load(open("train.json"))
c.update(steps=400, checkpoint={"save_every": 3}, data={"synthetic": True, "synthetic_tokens": 262144})
json.dump(c, open("long.json", "w"))
PY
nm_mpirun 2 "$NM_BIN" train --config long.json --out kill --quiet >kill.log 2>&1 &
launcher=$!
for _ in $(seq 1 300); do [ -e kill/latest ] && break; sleep 0.1; done
[ -e kill/latest ] || { kill -9 $launcher 2>/dev/null; cat kill.log; fail "no checkpoint before the kill"; }
victim=$(pgrep -f "nanomegatron train --config long.json --out kill" | tail -1)
[ -n "$victim" ] || fail "no rank to kill"
start=$(date +%s)
kill -9 "$victim"
if wait $launcher; then fail "the job survived a killed rank"; fi
waited=$(( $(date +%s) - start ))
sleep 1
if pgrep -f "nanomegatron train --config long.json --out kill" >/dev/null; then fail "ranks left running after a kill"; fi
[ "$waited" -le 30 ] || fail "the job took ${waited}s to stop"
echo "killed rank $victim: job stopped in ${waited}s"
# The run saves every 3 of its millisecond steps, so the kill lands at whatever step it reached
# (a fixed end of 12 failed when the last checkpoint was already past it): the resume goes 3
# steps beyond the newest checkpoint.
ck=$(cat kill/latest)
target=$(( 10#${ck#step_} + 3 ))
nm_mpirun 2 "$NM_BIN" train --config long.json --out kill --quiet --resume --set steps=$target >kill2.log 2>&1 \
  || { cat kill2.log; fail "resume after the kill"; }
last=$("$PY" -c "import json; print([json.loads(l)['step'] for l in open('kill/metrics.jsonl')][-1])")
[ "$last" = "$target" ] || fail "resumed run ended at step $last, not $target ($ck + 3)"

# A rank killed in the middle of a save (its shard files written, nothing committed): the
# job stops, `latest` still names the previous checkpoint, and --resume continues from it.
NM_TEST_KILL_IN_SAVE=1:6 nm_mpirun 2 "$NM_BIN" train --config long.json --out midsave --quiet --set steps=9 \
  >midsave.log 2>&1 && fail "the job survived a rank killed mid-save"
grep -q "step_000003" midsave/latest || fail "latest is not step 3 after a mid-save kill: $(ls midsave)"
[ ! -e midsave/step_000006 ] || fail "a half-saved step 6 became a checkpoint"
nm_mpirun 2 "$NM_BIN" train --config long.json --out midsave --quiet --resume --set steps=9 >midsave2.log 2>&1 \
  || { cat midsave2.log; fail "resume after the mid-save kill"; }
"$PY" - <<'PY'
import json
steps = [json.loads(l)["step"] for l in open("midsave/metrics.jsonl")]
assert steps == list(range(1, 10)), steps  # steps 4-6 of the killed run are replaced
PY
echo "rank killed mid-save: latest stayed at step 3, resumed to step 9"
echo "test_dist_train: ok"
