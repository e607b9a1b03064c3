#!/usr/bin/env bash
# test_dist_tp.sh: tensor parallelism under mpirun against one process on the same global
# batch: per-step loss and gradient norm over 10 steps within the tolerance of
# tests/dist/compare_runs.py, with sequence parallelism (the default: tp2, tp4, tp2 x dp2,
# tp2 x ep2, tp2 x dp2 x ep2, tp2 x ep4, recomputation, overlapped 1 MiB buckets, a model
# without q-LoRA and with tied embeddings) and without it (tp2, the model without q-LoRA,
# tp4); padded and unpadded vocabularies (make_vocab_size_divisible_by); the tp byte counters
# of every step against the formulas of docs/parallelism.md; checkpoints (tp2 x dp2
# -> 1 process -> tp2, tp2 x ep2 -> 1 process, the same full HF tensors as one process,
# --init-from at tp2); and the refusals.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }
export OMP_NUM_THREADS=1

# The small MoE model with 4 heads (tp4 needs them): a dense layer, 2 MoE layers with a shared
# expert, one MTP depth; vocab 300 = 2 x 150 = 4 x 75. Variant b: plain q_proj, tied head.
"$PY" - "$NM_ROOT/tests/data/small-moe-model.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m.update(num_attention_heads=4, num_key_value_heads=4)
json.dump(m, open("model.json", "w"))
json.dump(dict(m, q_lora_rank=None, tie_word_embeddings=True), open("model_b.json", "w"))
json.dump(dict(m, vocab_size=301), open("model_v301.json", "w"))
t = {"model": "model.json", "data": {"synthetic": True, "synthetic_tokens": 65536},
     "seq_len": 32, "micro_batch": 1, "global_batch": 8, "steps": 10, "seed": 11, "threads": 1,
     "optimizer": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"warmup_steps": 2},
     "log": {"log_every": 1, "eval_every": 0}, "checkpoint": {"save_every": 0}}
json.dump(t, open("train.json", "w"))
json.dump(dict(t, model="model_b.json"), open("train_b.json", "w"))
json.dump(dict(t, model="model_v301.json"), open("train_v301.json", "w"))
t.pop("model")
json.dump(dict(t, init_from="ref/step_000010", steps=4), open("train_init.json", "w"))
PY
"$NM_BIN" train --config train.json --out ref --quiet >/dev/null
"$NM_BIN" train --config train_b.json --out ref_b --quiet >/dev/null

# name ranks config ref options...
layout() { nm_compare_layout "$@"; }
layout tp2 2 train.json ref --set tensor_parallel_size=2
layout tp4 4 train.json ref --set tensor_parallel_size=4
layout tp2_dp2 4 train.json ref --set tensor_parallel_size=2
layout tp2_ep2 2 train.json ref --set tensor_parallel_size=2 --set expert_parallel_size=2
layout tp2_dp2_ep2 4 train.json ref --set tensor_parallel_size=2 --set expert_parallel_size=2
layout tp2_ep4 4 train.json ref --set tensor_parallel_size=2 --set expert_parallel_size=4
# the bounded EP exchange in rounds on each tp rank's own tokens (sequence parallelism)
layout tp2_ep2_rounds_recompute 2 train.json ref --set tensor_parallel_size=2 --set expert_parallel_size=2 \
  --set moe_receive_capacity=0.25 --recompute
layout tp2_recompute 2 train.json ref --set tensor_parallel_size=2 --recompute
layout tp2_dp2_ep2_buckets 4 train.json ref --set tensor_parallel_size=2 --set expert_parallel_size=2 \
  --set bucket_mb=1 --set overlap_grad_reduce=true
# gradient sharding (ZeRO-2): the partial rows of sequence parallelism summed over tp before
# every micro-batch's reduce-scatter over dp
layout tp2_dp2_optim_grads 4 train.json ref --set tensor_parallel_size=2 --set bucket_mb=1 \
  --set data_parallel_sharding_strategy=optim_grads
# one bucket holds the embedding and the first layers' norms and router: those add up over the
# micro-batches and are summed over tp once (summed at every micro-batch, they were off by 3e-3)
layout tp2_optim_grads 2 train.json ref --set tensor_parallel_size=2 --set data_parallel_sharding_strategy=optim_grads
layout tp2_noqlora_tied 2 train_b.json ref_b --set tensor_parallel_size=2
layout tp2_nosp 2 train.json ref --set tensor_parallel_size=2 --set sequence_parallel=false
layout tp2_noqlora_tied_nosp 2 train_b.json ref_b --set tensor_parallel_size=2 --set sequence_parallel=false
# The vocabulary: 300 is padded to 512 by default (make_vocab_size_divisible_by 128 x TP: at tp4
# the last shard is all padding), not at all with 1 (300 = 2 x 150); 301 to 302 or 512.
layout tp2_nopad 2 train.json ref --set tensor_parallel_size=2 --set make_vocab_size_divisible_by=1
"$NM_BIN" train --config train_v301.json --out ref_v301 --quiet >/dev/null
# On an AVX-512/AMX machine (Sapphire Rapids class) tp2_v301 differs from one process by 1e-9
# to 2.6e-7 for 9 steps, then by loss 4.9e-6, CE 6.1e-6, gradient norm 2.4e-6 at step 10 (a
# near-tie in one token's routing that the ulp-level differences tip; the expert loads stay
# equal): the same bounds as tp4_v301_nosp, 10x that measurement.
NM_COMPARE_TOL=6e-5,2e-5 layout tp2_v301 2 train_v301.json ref_v301 --set tensor_parallel_size=2 \
  --set make_vocab_size_divisible_by=1
# measured loss 5.1e-6, CE 6.4e-6, gradient norm 2.1e-6 (compare_runs.py says why this one)
NM_COMPARE_TOL=6e-5,2e-5 layout tp4_v301_nosp 4 train_v301.json ref_v301 --set tensor_parallel_size=4 \
  --set sequence_parallel=false

# The tp bytes of every step, from the configuration alone (docs/parallelism.md has the
# derivation). N = micro x (seq_len + 1) tokens per micro-batch, N_k = micro x (seq_len + 1 - k)
# in MTP depth k; a reduce-scatter or all-gather counts its whole (N, width) buffer.
"$PY" - <<'PY'
import json
def want(model, train, dp, recompute, sp):
    m, c = json.load(open(model)), json.load(open(train))
    L, M, D, E = m["num_hidden_layers"], m["num_nextn_predict_layers"], m["hidden_size"], m["n_routed_experts"]
    Rq, Rkv, Dr = m["q_lora_rank"] or 0, m["kv_lora_rank"], m["qk_rope_head_dim"]
    shared = m["n_shared_experts"] > 0
    T, micro = c["seq_len"] + 1, c["micro_batch"]
    accum = c["global_batch"] // (micro * dp)
    ar = rs = ag = 0                      # floats (all-reduce), buffer floats (reduce-scatter, all-gather)
    ar_bytes = 0                          # int64 / double all-reduces
    n_moe = 0
    for l in range(L + M):
        N = micro * (T if l < L else T - (l - L + 1))
        moe = l >= m["first_k_dense_replace"] and l % m.get("moe_layer_freq", 1) == 0
        n_moe += moe
        # backward of attention: d(kv latent), d(rope key), d(q latent) (or q_proj's part of d(norm output))
        ar += N * Rkv + N * Dr + (N * Rq if Rq else N * D)
        if sp:
            f_ag = N * D + (N * E if moe else 0) + (N * D if (not moe or shared) else 0)  # a; scores; f
            f_rs = N * D + (N * D if (not moe or shared) else 0)                         # attn out; ffn out
            ag += f_ag * (2 if recompute else 1) + N * D + (N * D if (not moe or shared) else 0)  # + d(x) gathers
            rs += f_rs * (2 if recompute else 1) + (N * D if (not moe or shared) else 0)        # + d(ffn input)
        else:
            ar += 2 * N * D * (2 if recompute else 1) + (N * D if (not moe or shared) else 0)
    heads = [micro * T] + [micro * (T - k) for k in range(1, M + 1)]
    for N in heads:
        if sp:
            rs += N * D + N * D       # embedding forward; d(hidden) of the head
            ag += N * D + N * D       # the head's input (final norm / shared_head.norm); d(embedding) in backward
        else:
            ar += N * D + N * D       # embedding forward; d(hidden) of the head
        ar_bytes += 8 * 3 * N         # the cross-entropy statistics
    ag += sum(micro * (T - k + 1) for k in range(2, M + 1)) * D if sp else 0  # h^{k-1} of deeper depths
    if sp:
        ar_bytes += 8 * n_moe * E     # expert counts (each rank routed its own tokens)
    per_step = 0
    if sp:                            # once per step: the gradients of the sequence-parallel rows
        norms = 2 * (L + M) + 1 + 3 * M
        per_step = 4 * (norms * D + n_moe * E * D + M * 2 * D * D)
    return accum * (4 * ar + ar_bytes) + per_step, accum * 4 * rs, accum * 4 * ag
runs = [("tp2", "model.json", 2, 2, False, True), ("tp4", "model.json", 4, 4, False, True),
        ("tp2_dp2", "model.json", 2, 4, False, True), ("tp2_recompute", "model.json", 2, 2, True, True),
        ("tp2_noqlora_tied", "model_b.json", 2, 2, False, True), ("tp2_ep2", "model.json", 2, 2, False, True),
        ("tp2_nosp", "model.json", 2, 2, False, False),
        ("tp2_noqlora_tied_nosp", "model_b.json", 2, 2, False, False)]
for run, model, tp, world, rec, sp in runs:
    w_ar, w_rs, w_ag = want(model, "train.json", world // tp, rec, sp)
    for line in open(f"{run}/metrics.jsonl"):
        d = json.loads(line)
        got = (d["comm_tp_all_reduce_bytes"], d["comm_tp_reduce_scatter_bytes"], d["comm_tp_all_gather_bytes"])
        assert got == (w_ar, w_rs, w_ag), (run, d["step"], got, (w_ar, w_rs, w_ag))
    print(f"{run}: tp all-reduce {w_ar}, reduce-scatter {w_rs}, all-gather {w_ag} bytes per step: ok")
PY

# Checkpoints across layouts: tp2 x dp2 -> 1 process -> tp2 equals the uninterrupted run.
nm_mpirun 4 "$NM_BIN" train --config train.json --out xl --quiet --set exit_interval=4 --set tensor_parallel_size=2 \
  >xl.log 2>&1 || { cat xl.log; fail "tp2 x dp2 part"; }
"$NM_BIN" train --config train.json --out xl --quiet --resume --set exit_interval=7 >xl1.log 2>&1 \
  || { cat xl1.log; fail "1-process resume of a tp2 checkpoint"; }
nm_mpirun 2 "$NM_BIN" train --config train.json --out xl --quiet --resume --set tensor_parallel_size=2 >xl2.log 2>&1 \
  || { cat xl2.log; fail "tp2 resume of a 1-process checkpoint"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xl/metrics.jsonl "tp2 x dp2 -> 1 -> tp2"
# tp2 x ep2 (each rank half the experts, its own tokens) -> 1 process
nm_mpirun 2 "$NM_BIN" train --config train.json --out xe --quiet --set exit_interval=5 --set tensor_parallel_size=2 \
  --set expert_parallel_size=2 >xe.log 2>&1 || { cat xe.log; fail "tp2 x ep2 part"; }
"$NM_BIN" train --config train.json --out xe --quiet --resume >xe1.log 2>&1 || { cat xe1.log; fail "1-process resume of tp2 x ep2"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" ref/metrics.jsonl xe/metrics.jsonl "tp2 x ep2 -> 1"

# The tp2 x dp2 checkpoint holds the one-process tensors: every name, its HF shape, never a
# shard (nor vocabulary padding). Values: (1) after 4 steps within 2e-3 of each tensor's largest value of the one-
# process run's: the runs differ by fp32 summation order only, but AdamW's first steps move
# an element by about lr x sign(gradient), so a gradient near zero turns rounding into a
# visible difference (measured worst: 2e-4 at dp2, which the suite already accepts, 4.5e-4 at
# tp2 x dp2); a shard in the wrong place is off by the tensor's own size. (2) Exactly: loaded
# at tp2 x dp2, one step at lr 1e-30 (no weight moves), saved again: the same bits as one
# process writes, and the first moments (0.1 x the gradient) within 1e-5.
"$NM_BIN" train --config train.json --out ref4 --quiet --set exit_interval=4 >/dev/null
"$NM_BIN" train --config train_init.json --out lr0_ref --quiet --set steps=1 --set optimizer.lr=1e-30 \
  --set optimizer.min_lr=1e-30 >/dev/null
nm_mpirun 4 "$NM_BIN" train --config train_init.json --out lr0_tp --quiet --set steps=1 --set optimizer.lr=1e-30 \
  --set optimizer.min_lr=1e-30 --set tensor_parallel_size=2 >lr0.log 2>&1 || { cat lr0.log; fail "lr 1e-30 at tp2 x dp2"; }
"$PY" - <<'PY'
import array, glob, json, struct
def read(d, kind):
    out = {}
    files = sorted(glob.glob(f"{d}/{kind}-*.safetensors")) or [f"{d}/{kind}.safetensors"]
    for p in files:
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            h = json.loads(f.read(n)); body = f.read()
        h.pop("__metadata__", None)
        for k, v in h.items():
            assert v["dtype"] == "F32", (k, v["dtype"])
            a, b = v["data_offsets"]
            assert k not in out, ("written twice", k, p)
            out[k] = (v["shape"], array.array("f", body[a:b]))
    return out
def compare(ref, run, kind, tol):
    a, b = read(ref, kind), read(run, kind)
    assert sorted(a) == sorted(b), (kind, set(a) ^ set(b))
    worst = 0.0
    for k in a:
        (sa, xa), (sb, xb) = a[k], b[k]
        assert sa == sb, (kind, k, sa, sb)
        scale = max(max(abs(v) for v in xa), 1e-30)
        worst = max(worst, max(abs(u - v) for u, v in zip(xa, xb)) / scale)
    assert worst <= tol, (run, kind, worst, tol)
    print(f"{run} {kind}: {len(a)} tensors, HF shapes, worst diff {worst:.1e} of each tensor's max (tolerance {tol}): ok")
for kind in ("model", "optim_m", "optim_v"):
    compare("ref4/step_000004", "xl/step_000004", kind, 2e-3)
compare("lr0_ref/step_000001", "lr0_tp/step_000001", "model", 0.0)
compare("lr0_ref/step_000001", "lr0_tp/step_000001", "optim_m", 1e-5)
PY

# --init-from a checkpoint at tp2 equals --init-from at one process.
"$NM_BIN" train --config train_init.json --out init1 --quiet >/dev/null
layout init_tp2 2 train_init.json init1 --set tensor_parallel_size=2

# What tensor parallelism cannot split is refused before any work, naming the key and numbers.
refuse() {
  local name=$1 n=$2 cfg=$3 msg=$4; shift 4
  if nm_mpirun "$n" "$NM_BIN" train --config "$cfg" --out "$name" --quiet "$@" >"$name.log" 2>&1; then
    fail "$name accepted"; fi
  grep -q "$msg" "$name.log" || { cat "$name.log"; fail "$name message"; }
  [ ! -e "$name/metrics.jsonl" ] || fail "refused $name wrote metrics"
}
cp "$NM_ROOT/tests/data/small-moe-model.json" model_h2.json
"$PY" -c "import json; t=json.load(open('train.json')); t['model']='model_h2.json'; json.dump(t, open('train_h2.json','w'))"
refuse bad_heads 4 train_h2.json "num_attention_heads 2 is not divisible by tensor_parallel_size 4" \
  --set tensor_parallel_size=4
refuse bad_tp_ep 2 train.json "needs sequence parallelism" --set tensor_parallel_size=2 --set expert_parallel_size=2 \
  --set sequence_parallel=false
echo "test_dist_tp: ok"
