#!/usr/bin/env bash
# test_model_set.sh: the training config against the model, checked at start.
#  1. --set model_config.KEY=VALUE edits a fresh model's config.json without copying it: the
#     run's checkpoint config.json carries the edited value.
#  2. A tokenizer with more ids than the model's vocab_size (the byte tokenizer's 257 against
#     vocab_size 200) is refused before the first step, naming both numbers and the fix.
#  3. A greedy-routed model with a bias update speed gets the one-line notice that aux-loss-free
#     balancing needs noaux_tc, and its router biases stay zero while it trains.
#  4. model_config.* with init_from is refused (the checkpoint's config is used as it is).
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
export OMP_WAIT_POLICY=passive
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat > train.json <<'JSON'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 16384},
  "seq_len": 16, "micro_batch": 2, "global_batch": 2, "steps": 2, "seed": 3,
  "balance": {"bias_update_speed": 0.01},
  "log": {"log_every": 1}
}
JSON

# --- 1. --set model_config edits ---------------------------------------------------------------
"$NM_BIN" train --config train.json --out run1 --quiet --set model_config.vocab_size=320 >out1 2>err1 ||
    fail "train with --set model_config.vocab_size=320: $(cat err1)"
cks=(run1/*/)
ck=${cks[0]}
grep -q '"vocab_size":[[:space:]]*320' "$ck/config.json" || fail "checkpoint config.json lacks vocab_size 320: $(cat "$ck/config.json")"
grep -q '"vocab_size":[[:space:]]*300' model.json || fail "model.json was modified"
if "$NM_BIN" train --config train.json --out run_bad --quiet --set model_config.vocab_size=abc >out 2>err; then
    fail "vocab_size=abc accepted"
fi
grep -q "vocab_size" err || fail "bad model_config value: message does not name the key: $(cat err)"

# --- 2. tokenizer against vocab_size -----------------------------------------------------------
if "$NM_BIN" train --config train.json --out run2 --quiet --set model_config.vocab_size=200 >out2 2>err2; then
    fail "a 257-id tokenizer was accepted for vocab_size 200"
fi
grep -q "257" err2 && grep -q "200" err2 && grep -q "model_config.vocab_size=257" err2 ||
    fail "tokenizer/vocab message lacks the numbers or the fix: $(cat err2)"
grep -q "step 1" out2 err2 && fail "the run started before refusing: $(cat out2 err2)"

# --- 3. greedy + bias update speed --------------------------------------------------------------
"$NM_BIN" train --config train.json --out run3 --quiet --set model_config.topk_method=greedy \
    --set model_config.n_group=1 --set model_config.topk_group=1 >out3 2>err3 || fail "greedy train: $(cat err3)"
[ "$(grep -c "aux-loss-free balancing needs" err3)" = 1 ] || fail "no single notice for greedy + bias speed: $(cat err3)"
cks=(run3/*/)
ck3=${cks[-1]}
python3 - "$ck3" <<'PY' || fail "router biases moved in the greedy run"
import json, struct, sys
b = open(sys.argv[1] + "/model.safetensors", "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
names = [k for k in h if k.endswith("e_score_correction_bias")]
bad = [k for k in names if any(b[8 + n + h[k]["data_offsets"][0]:8 + n + h[k]["data_offsets"][1]])]
print("greedy run: %d router bias tensors, %d non-zero" % (len(names), len(bad)))
sys.exit(1 if bad or not names else 0)
PY
"$NM_BIN" train --config train.json --out run3b --quiet >out3b 2>err3b || fail "noaux_tc train: $(cat err3b)"
grep -q "aux-loss-free balancing needs" err3b && fail "notice printed for noaux_tc"

# --- 4. model_config with init_from --------------------------------------------------------------
cat > init.json <<JSON
{"init_from": "$ck", "data": {"synthetic": true, "synthetic_tokens": 16384},
 "seq_len": 16, "micro_batch": 2, "global_batch": 2, "steps": 1}
JSON
if "$NM_BIN" train --config init.json --out run4 --quiet --set model_config.vocab_size=400 >out4 2>err4; then
    fail "model_config.* accepted with init_from"
fi
grep -q "init_from" err4 || fail "init_from + model_config message: $(cat err4)"
echo "OK"
