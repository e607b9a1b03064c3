#!/usr/bin/env bash
# test_resume_config.sh: --resume continues the same data stream, so a changed corpus, batch,
# sequence length or tokenizer is refused naming each change (it used to continue without a
# word, on other samples than the cursor counted), and --allow-config-change lets it through.
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
: "${NM_ROOT:?NM_ROOT must point to the repository}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }
train() { "$NM_BIN" train --config "$NM_ROOT/configs/tiny-train.json" --out run --set log.eval_every=0 "$@"; }

train --steps 2 > first.log 2>&1 || { cat first.log >&2; fail "first run failed"; }
refused() {  # expected text in the refusal, then the changed settings
  local want=$1 rc=0 text
  shift
  train --steps 3 --resume "$@" > refused.log 2>&1 || rc=$?
  text=$(cat refused.log)
  [ "$rc" = 1 ] || { echo "$text" >&2; fail "resume with $* exited $rc, expected 1"; }
  [[ $text == *"resume: the config differs from the checkpoint"*"$want"*"--allow-config-change"* ]] \
    || { echo "$text" >&2; fail "resume with $*: the refusal does not name '$want'"; }
}
refused "seq_len 128 -> 64" --set seq_len=64
refused "global_batch 16 -> 32" --set global_batch=32
refused '"synthetic_tokens":1048576' --set data.synthetic_tokens=500000
refused '"split":"99,1"' --set data.split=98,2
# unchanged: resumes; changed with --allow-config-change: resumes and says what changed
train --steps 3 --resume > same.log 2>&1 || { cat same.log >&2; fail "unchanged resume failed"; }
train --steps 4 --resume --set seq_len=64 --allow-config-change > allowed.log 2>&1 \
  || { cat allowed.log >&2; fail "--allow-config-change did not let the resume through"; }
text=$(cat allowed.log)
[[ $text == *"continuing with a changed config (--allow-config-change): seq_len 128 -> 64"* ]] \
  || { echo "$text" >&2; fail "the allowed change is not named"; }
echo "ok: changed resumes are refused by name, and allowed on request"
