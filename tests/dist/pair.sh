# tests/dist/pair.sh: sourced by the multi-process tests (after tests/mpirun.sh; they define
# fail, PY, NM_BIN and train.json). pair_compare NAME RANKS STEP OPTIONS... trains the layout
# twice, unpaired (unpaired_NAME) and with moe_pair_micro_batches (pair_NAME), saving at step
# STEP, and requires the paired run to equal the unpaired one bit for bit: every step's loss
# terms, gradient norm, expert load and bias range, validation loss and all-to-all bytes, and
# the step-STEP checkpoint (`cmp`); and to hold exactly twice its activation bytes
# (memory.json: the second model's set). PAIR_HIDDEN=1: also some compute during rank 0's
# all-to-alls every step (rank 0's stage has MoE blocks and pairs something).
pair_compare() {
  local name=$1 n=$2 step=$3 run f; shift 3
  for run in "unpaired_$name" "pair_$name"; do
    local -a more=()
    [ "$run" = "unpaired_$name" ] || more=(--set moe_pair_micro_batches=true)
    nm_mpirun "$n" "$NM_BIN" train --config train.json --out "$run" --quiet --set checkpoint.save_every="$step" \
      "$@" "${more[@]}" >"$run.log" 2>&1 || { cat "$run.log"; fail "$run did not run"; }
  done
  printf -v step_dir 'step_%06d' "$step"
  for f in "unpaired_$name/$step_dir"/*.safetensors; do
    cmp "$f" "pair_$name/$step_dir/${f##*/}" || fail "pair_$name: ${f##*/} differs from the unpaired run's"
  done
  "$PY" - "$name" "${PAIR_HIDDEN:-0}" <<'PY' || fail "pair_$name differs from unpaired_$name"
import json, sys
name, hidden_needed = sys.argv[1], sys.argv[2] == "1"
rows, base = ([json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"loss"' in l] for d in
              (f"pair_{name}", f"unpaired_{name}"))
assert len(rows) == len(base) >= 6, (len(rows), len(base))
for r, b in zip(rows, base):
    for k in ("loss", "ce_loss", "mtp_loss", "aux_loss", "grad_norm", "expert_load_max_over_mean", "bias_min",
              "bias_max", "val_loss", "comm_ep_all_to_all_bytes_job"):
        assert r.get(k) == b.get(k), ("not bit-identical to the unpaired run", r["step"], k, r.get(k), b.get(k))
    assert not hidden_needed or r["ep_a2a_hidden_fraction"] > 0, (r["step"], "no compute during the all-to-alls")
mem, base_mem = (json.load(open(f"{d}/memory.json")) for d in (f"pair_{name}", f"unpaired_{name}"))
assert mem["activation_bytes"] == 2 * base_mem["activation_bytes"], (mem["activation_bytes"], base_mem["activation_bytes"])
hidden = sum(r["ep_a2a_hidden_fraction"] for r in rows) / len(rows)
print(f"pair_{name}: {len(rows)} steps' losses, gradient norms, loads and the checkpoint bit-identical to "
      f"unpaired_{name}; two activation sets; rank 0 computed during {100 * hidden:.0f}% of its all-to-alls' flight")
PY
}
