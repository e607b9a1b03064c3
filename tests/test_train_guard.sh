#!/usr/bin/env bash
# test_train_guard.sh: the trainer's guards and a learning smoke test.
#  1. Divergence guard, one bad step: `--inject-nan 3` poisons a gradient at step 3. Step 3 is
#     reported skipped (stderr, metrics.jsonl "skipped": 1, grad_norm null), the parameters,
#     router biases and AdamW moments are exactly those of step 2 (checkpoints 2 and 3 are
#     byte-identical), steps 1-3 have the losses of a clean run, and training continues.
#  2. Divergence guard, a streak: a model whose final norm holds a NaN (patched into the
#     init_from safetensors) gives a non-finite loss at every step; the trainer skips them and
#     stops with an error after max_nan_streak = 5 in a row.
#  3. Bad configuration: an unknown --set key, an ill-typed --set value and an unknown key in
#     the config file each exit non-zero naming the key.
#  4. `make train`-like smoke: configs/tiny-train.json (shrunk) learns: the cross-entropy of
#     the last steps of 30 is well below ln(vocab), the loss of a uniform prediction.
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
export OMP_WAIT_POLICY=passive   # spinning OpenMP threads on a busy 2-core machine are ~10x slower
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

# The small model shared with test_resume.sh (hidden 64, vocab 300, 1 dense + 2 MoE, MTP 1).
cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat > train.json <<'EOF'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 65536},
  "seq_len": 32, "micro_batch": 2, "global_batch": 4, "steps": 8, "seed": 11,
  "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "clip_grad": 1.0},
  "schedule": {"type": "cosine", "warmup_steps": 2},
  "checkpoint": {"save_every": 1, "keep_last": 0},
  "log": {"log_every": 1}
}
EOF
# value of "key" in the metrics line of step $2 of file $1 (text as written)
field() { grep "^{\"step\": $2," "$1" | sed -E "s/.*\"$3\": ([^,}]+).*/\1/"; }

# --- 1. one poisoned step ---------------------------------------------------------------------
"$NM_BIN" train --config train.json --out clean --quiet
"$NM_BIN" train --config train.json --out nan --quiet --inject-nan 3 2> nan.err || { cat nan.err >&2; fail "run with --inject-nan 3 failed"; }
grep -q 'step 3: non-finite gradient.*skipped' nan.err || { cat nan.err >&2; fail "no 'step 3 ... skipped' line on stderr"; }
[ "$(grep -c 'skipped' nan.err)" -eq 1 ] || { cat nan.err >&2; fail "more than one step reported skipped"; }
[ "$(wc -l < nan/metrics.jsonl)" -eq 8 ] || fail "the run with a skipped step did not finish its 8 steps"
for s in 1 2 3 4 5 6 7 8; do
    want=0; [ $s -eq 3 ] && want=1
    [ "$(field nan/metrics.jsonl $s skipped)" = "$want" ] || fail "step $s: \"skipped\" is $(field nan/metrics.jsonl $s skipped), want $want"
done
[ "$(field nan/metrics.jsonl 8 skipped_total)" = 1 ] || fail "skipped_total at step 8 is not 1"
[ "$(field nan/metrics.jsonl 3 grad_norm)" = null ] || fail "step 3's grad_norm should be null (non-finite)"
for f in model.safetensors optim_m.safetensors optim_v.safetensors; do
    cmp nan/step_000002/$f nan/step_000003/$f || fail "the skipped step 3 changed $f"
done
cmp -s nan/step_000003/model.safetensors nan/step_000004/model.safetensors && fail "step 4 did not update the parameters"
for s in 1 2 3; do   # before the skipped update takes effect the runs are the same
    [ "$(field nan/metrics.jsonl $s loss)" = "$(field clean/metrics.jsonl $s loss)" ] || fail "step $s: loss differs from the clean run"
done
[ "$(field nan/metrics.jsonl 4 loss)" != "$(field clean/metrics.jsonl 4 loss)" ] || fail "step 4: same loss as the clean run, so step 3's update was not skipped"
for s in 4 5 6 7 8; do
    l=$(field nan/metrics.jsonl $s loss)
    [ "$l" != null ] || fail "step $s: loss not finite after the skipped step"
done
echo "inject-nan 3: step 3 skipped, state unchanged by it, training continued"

# --- 2. five non-finite steps in a row stop the run -------------------------------------------
"$NM_BIN" init --config model.json --out poisoned --seed 5 > /dev/null
st=poisoned/model.safetensors
hl=$(od -An -tu8 -N8 "$st" | tr -d ' ')
off=$(head -c $((8 + hl)) "$st" | tail -c "$hl" | grep -o '"model.norm.weight":{[^}]*}' | sed -E 's/.*"data_offsets":\[([0-9]+),.*/\1/')
[ -n "$off" ] || fail "cannot find model.norm.weight in the safetensors header"
printf '\000\000\300\177' | dd of="$st" bs=1 seek=$((8 + hl + off)) conv=notrunc status=none   # fp32 NaN
if "$NM_BIN" train --config train.json --out div --quiet --steps 20 --set model=null --set init_from=poisoned 2> div.err; then
    fail "a run whose every step is non-finite did not stop"
fi
grep -q 'diverged: 5 consecutive non-finite steps' div.err || { cat div.err >&2; fail "no 'diverged: 5 consecutive' message"; }
[ "$(grep -c 'update skipped' div.err)" -eq 5 ] || { cat div.err >&2; fail "expected 5 skipped-step lines"; }
grep -q 'update skipped (5 in a row)' div.err || fail "the streak count is not reported"
if grep -q '^{"step": 6,' div/metrics.jsonl; then fail "the run went on past step 5"; fi
echo "NaN streak: stopped after 5 non-finite steps"

# --- 3. bad configuration keys ----------------------------------------------------------------
expect_error() {  # name, grep pattern, command...
    local name=$1 pat=$2; shift 2
    if "$@" > bad.out 2> bad.err; then fail "$name: exit status 0"; fi
    grep -q -- "$pat" bad.err || { cat bad.err >&2; fail "$name: stderr does not name $pat"; }
    [ ! -f bad_run/metrics.jsonl ] || fail "$name: training started anyway"
}
expect_error "--set nosuch.key=1" "nosuch.key" "$NM_BIN" train --config train.json --out bad_run --set nosuch.key=1
expect_error "--set seq_len=abc" "seq_len" "$NM_BIN" train --config train.json --out bad_run --set seq_len=abc
grep -q 'abc' bad.err || fail "--set seq_len=abc: the bad value is not quoted"
sed 's/"seed": 11,/"seed": 11, "optimiser": {"lr": 1e-3},/' train.json > typo.json
expect_error "unknown key in the file" "optimiser" "$NM_BIN" train --config typo.json --out bad_run
grep -q 'typo.json' bad.err || fail "unknown key in the file: the file is not named"
sed 's/"clip_grad": 1.0/"clip_grad": 1.0, "betas": [0.9, 0.95]/' train.json > typo2.json
expect_error "unknown nested key" "optimizer.betas" "$NM_BIN" train --config typo2.json --out bad_run
expect_error "--set optimizer.lr=-1" "optimizer.lr" "$NM_BIN" train --config train.json --out bad_run --set optimizer.lr=-1
echo "bad config keys: rejected with the key named"

# --- 4. smoke: it learns ----------------------------------------------------------------------
"$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --out smoke --quiet --steps 30 \
    --set seq_len=32 --set micro_batch=4 --set global_batch=4 --set data.synthetic_tokens=65536 \
    --set checkpoint.save_every=0 --set log.eval_every=0 --set schedule.warmup_steps=5
vocab=$(sed -nE 's/.*"vocab_size": *([0-9]+).*/\1/p' "$NM_ROOT/configs/tiny.json")
[ "$(wc -l < smoke/metrics.jsonl)" -eq 30 ] || fail "smoke run: not 30 metrics lines"
first=$(field smoke/metrics.jsonl 1 ce_loss)
last=$(for s in 26 27 28 29 30; do field smoke/metrics.jsonl $s ce_loss; done | awk '{s += $1} END {printf "%.6f", s / NR}')
echo "smoke: ln(vocab) = $(awk -v v="$vocab" 'BEGIN {printf "%.4f", log(v)}'), step-1 ce $first, mean ce of steps 26-30 $last"
awk -v f="$first" -v v="$vocab" 'BEGIN {exit !(f > log(v) - 0.3 && f < log(v) + 0.3)}' || fail "initial ce $first is not about ln($vocab)"
awk -v l="$last" -v v="$vocab" 'BEGIN {exit !(l < log(v) - 1.5)}' || fail "after 30 steps the ce $last is not well below ln($vocab)"
# --- 5. a second run into the same directory is refused (nothing of the first is lost) ------
before=$(md5sum smoke/metrics.jsonl)
if "$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --out smoke --quiet --steps 2 2> again.err; then
    fail "training into a run directory with checkpoints without --resume was not refused"
fi
grep -q -- '--resume' again.err || fail "the refusal does not point to --resume: $(cat again.err)"
[ "$(md5sum smoke/metrics.jsonl)" = "$before" ] || fail "the refused run touched the first run's metrics"
echo "second run into the same directory: refused"
echo "PASS test_train_guard"
