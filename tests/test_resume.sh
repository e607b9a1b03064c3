#!/usr/bin/env bash
# test_resume.sh: a run killed with SIGKILL (repeatedly, at random moments, some of them in
# the middle of a checkpoint save) and resumed continues bit for bit (design.md 5b, 8):
#   A: 12 uninterrupted steps, checkpoints every 3.
#   B: the same run killed after >= 5 logged steps; resumed (checkpointing every step) and
#      killed the moment a checkpoint save is in progress (its temporary directory exists),
#      twice; then a crash loop that kills each resumed run at a random moment shortly
#      after its next checkpoint, until one finishes.
#   Every step's loss / ce / mtp / aux / grad_norm in B's metrics.jsonl equals A's as text
#   (shortest round-trip decimal, so bit for bit), steps 1..12 once each, and the final
#   model.safetensors and AdamW moments of B are byte-identical to A's.
# Also: --resume on an empty run dir starts fresh (and says so); a corrupted / truncated
# newest checkpoint is detected by its CRC / size and the previous one is used, again
# continuing bit for bit.
set -euo pipefail

: "${NM_BIN:?NM_BIN must point to the nanomegatron binary}"
# Oversubscribed OpenMP/OpenBLAS threads that spin make a busy 2-core machine ~10x slower.
export OMP_WAIT_POLICY=passive
tmp=$(mktemp -d)
bg_pid=
cleanup() {
    if [ -n "$bg_pid" ]; then kill -9 "$bg_pid" 2>/dev/null || true; wait "$bg_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"

fail() { echo "FAIL: $*" >&2; exit 1; }

# --- configs: a small model (hidden 64, vocab 300, 1 dense + 2 MoE layers, 4 groups, MTP 1) ---
cp "${NM_ROOT:?NM_ROOT must point to the repository}/tests/data/small-moe-model.json" model.json
# keep_last 0 keeps every checkpoint (the corruption test needs an older one to fall back to);
# cosine schedule with warm-up and clipping so that the step number matters everywhere.
cat > train.json <<'EOF'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 65536},
  "seq_len": 32, "micro_batch": 2, "global_batch": 4, "steps": 12, "seed": 7,
  "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "clip_grad": 1.0},
  "schedule": {"type": "cosine", "warmup_steps": 2},
  "mtp": {"weight": 0.3, "weight_after": 0.1, "switch_step": 8},
  "checkpoint": {"save_every": 3, "keep_last": 0},
  "log": {"log_every": 1}
}
EOF
STEPS=12
# (an array, not a function: a backgrounded function would be a subshell, and kill -9 of its
# pid would leave the trainer running)
train=("$NM_BIN" train --config train.json --steps $STEPS --quiet)

# "step loss ce mtp aux grad_norm" per line, numbers as written (text equality = bit equality).
extract() {
    sed -E 's/^\{"step": ([0-9]+), "loss": ([^,]+),.*"ce_loss": ([^,]+),.*"mtp_loss": ([^,]+),.*"aux_loss": ([^,]+),.*"grad_norm": ([^,]+),.*$/\1 \2 \3 \4 \5 \6/' "$1"
}
# Fails unless run dir $1 has exactly steps 1..$STEPS, each equal to run A's.
check_same_as_a() {
    local dir=$1 what=$2
    extract "$dir/metrics.jsonl" > "$dir.cmp"
    [ "$(wc -l < "$dir.cmp")" -eq $STEPS ] || { cat "$dir/metrics.jsonl" >&2; fail "$what: $(wc -l < "$dir.cmp") metrics lines, want $STEPS"; }
    [ "$(cut -d' ' -f1 "$dir.cmp" | tr '\n' ' ')" = "$(seq 1 $STEPS | tr '\n' ' ')" ] || fail "$what: steps are not 1..$STEPS once each"
    if ! diff A.cmp "$dir.cmp" >&2; then fail "$what: losses / grad norms differ from the uninterrupted run (< A, > $what)"; fi
    local last
    last=$(printf 'step_%06d' $STEPS)
    for f in model.safetensors optim_m.safetensors optim_v.safetensors; do
        cmp "A/$last/$f" "$dir/$last/$f" || fail "$what: $last/$f differs from the uninterrupted run's"
    done
}

# --- A: uninterrupted ------------------------------------------------------------------------
t0=$SECONDS
"${train[@]}" --out A
extract A/metrics.jsonl > A.cmp
[ "$(wc -l < A.cmp)" -eq $STEPS ] || fail "run A wrote $(wc -l < A.cmp) metrics lines"
grep -q '"skipped": 0' A/metrics.jsonl || fail "run A: no skipped field"
# a resumed run of a finished run does nothing more and changes nothing
cp -r A A2
"${train[@]}" --out A2 --resume 2>/dev/null
cmp A/metrics.jsonl A2/metrics.jsonl || fail "resuming a finished run changed its metrics"
rm -rf A2
echo "run A: $STEPS steps in $((SECONDS - t0)) s"

# --- --resume on an empty run dir starts fresh --------------------------------------------
"$NM_BIN" train --config train.json --steps 2 --out E --resume > E.out 2> E.err || { cat E.err >&2; fail "--resume on an empty dir failed"; }
grep -qi 'starting fresh' E.out || { cat E.out E.err >&2; fail "--resume on an empty dir does not say it starts fresh"; }
[ "$(wc -l < E/metrics.jsonl)" -eq 2 ] || fail "--resume on an empty dir: expected 2 metrics lines"
[ "$(extract E/metrics.jsonl | head -1)" = "$(head -1 A.cmp)" ] || fail "fresh start via --resume: step 1 differs from run A"

# --- B: killed once after >= 5 logged steps, then a crash loop ----------------------------
t0=$SECONDS
"${train[@]}" --out B & bg_pid=$!
for _ in $(seq 1 600); do
    if [ -f B/metrics.jsonl ] && [ "$(wc -l < B/metrics.jsonl)" -ge 5 ]; then break; fi
    kill -0 "$bg_pid" 2>/dev/null || break
    sleep 0.01
done
kill -9 "$bg_pid" 2>/dev/null || true
wait "$bg_pid" 2>/dev/null || true
bg_pid=
n_first=$(wc -l < B/metrics.jsonl)
[ -f B/latest ] || fail "no checkpoint after the first kill"
[ "$n_first" -lt $STEPS ] || echo "note: the first kill came after the run had finished (machine very slow?)"
echo "first kill after $n_first logged steps, latest = $(cat B/latest)"

n_tmp() { find "$1" -maxdepth 1 -name 'step_*.tmp.*' | wc -l; }
# Waits (bounded) until the run $bg_pid has a checkpoint save in progress - a temporary
# directory beyond the $2 left over from earlier kills - and kills it right then. Returns 0
# when the kill left that temporary directory behind (it landed inside the save).
kill_inside_save() {
    local dir=$1 before=$2
    for _ in $(seq 1 4000); do
        [ "$(n_tmp "$dir")" -gt "$before" ] && break
        kill -0 "$bg_pid" 2>/dev/null || break
        sleep 0.005
    done
    kill -9 "$bg_pid" 2>/dev/null || true
    wait "$bg_pid" 2>/dev/null || true
    bg_pid=
    [ "$(n_tmp "$dir")" -gt "$before" ]
}

# Kills inside a checkpoint save: resume saving every step, watch for the save's temporary
# directory, kill -9 the moment it appears. A few tries (the save may finish between the
# look and the kill).
in_save=0
for _ in 1 2 3 4 5 6; do
    "${train[@]}" --out B --resume --save-every 1 2>> B.err & bg_pid=$!
    if kill_inside_save B "$(n_tmp B)"; then
        in_save=$((in_save + 1))
        [ $in_save -ge 2 ] && break
    fi
done
echo "killed $in_save time(s) inside a checkpoint save; latest = $(cat B/latest)"

# Crash loop: resume (checkpointing every step), wait for the next checkpoint to appear,
# then kill -9 at a random moment 0-60 ms later (inside the next step or its save), until a
# run gets to finish; bounded, then one last uninterrupted resume.
kills=0 done_b=0
RANDOM=4242
for _ in $(seq 1 30); do
    start_ckpt=$(cat B/latest 2>/dev/null || true)
    "${train[@]}" --out B --resume --save-every 1 2>> B.err & bg_pid=$!
    for _ in $(seq 1 3000); do
        [ "$(cat B/latest 2>/dev/null || true)" != "$start_ckpt" ] && break
        kill -0 "$bg_pid" 2>/dev/null || break
        sleep 0.01
    done
    sleep "0.0$(printf '%02d' $((RANDOM % 60)))"
    if kill -9 "$bg_pid" 2>/dev/null; then
        wait "$bg_pid" 2>/dev/null || true
        bg_pid=
        kills=$((kills + 1))
    else
        rc=0; wait "$bg_pid" || rc=$?
        bg_pid=
        [ "$rc" -eq 0 ] || { cat B.err >&2; fail "resumed run exited with $rc"; }
        done_b=1
        break
    fi
done
if [ $done_b -eq 0 ]; then
    echo "crash loop ended at $(cat B/latest 2>/dev/null || echo 'no checkpoint'); one last resume"
    "${train[@]}" --out B --resume 2>> B.err || { cat B.err >&2; fail "final resume failed"; }
fi
# Every kill inside a save left its temporary directory step_N.tmp.<pid> behind (nothing
# removes those; resume must ignore them).
echo "run B: 1 + $in_save + $kills kills, $(n_tmp B) interrupted saves left behind, $((SECONDS - t0)) s"
if grep -q 'is not usable' B.err; then echo "(a kill left an unusable checkpoint that resume skipped:)"; grep -m 3 'is not usable' B.err; fi
check_same_as_a B "killed-and-resumed run B"
echo "B matches A bit for bit: $STEPS steps, model and AdamW moments"
[ $in_save -ge 1 ] || echo "note: no kill landed inside a checkpoint save on this machine (saves too fast to catch)"

# --- corrupt / truncated newest checkpoint: fall back to the previous one -----------------
cp -r A C
ck=C/step_000012/model.safetensors
off=$(( $(stat -c %s "$ck") - 100 ))
byte=$(od -An -tu1 -j "$off" -N1 "$ck" | tr -d ' ')
printf "$(printf '\\%03o' $(( byte ^ 1 )))" | dd of="$ck" bs=1 seek="$off" conv=notrunc status=none
cmp -s A/step_000012/model.safetensors "$ck" && fail "the byte flip did not change the file"
"${train[@]}" --out C --resume 2> C.err || { cat C.err >&2; fail "resume with a corrupt newest checkpoint failed"; }
grep -Eqi 'crc|checksum|corrupt' C.err || { cat C.err >&2; fail "corruption not reported on stderr"; }
grep -q 'step_000012' C.err || { cat C.err >&2; fail "the corrupt checkpoint is not named"; }
grep -Eq 'using .*step_000009' C.err || { cat C.err >&2; fail "stderr does not say the previous checkpoint (step 9) is used"; }
check_same_as_a C "run resumed from the checkpoint before a corrupt one"
echo "corrupt step 12 -> resumed from step 9, steps 10-12 and the final state match A"

# truncated files in the two newest checkpoints: falls back two steps
cp -r A D
truncate -s 1000 D/step_000012/optim_v.safetensors
truncate -s -4 D/step_000009/model.safetensors
"${train[@]}" --out D --resume 2> D.err || { cat D.err >&2; fail "resume with truncated checkpoints failed"; }
grep -q 'step_000012.*size' D.err || { cat D.err >&2; fail "truncation of step 12 not reported"; }
grep -q 'step_000009.*size' D.err || { cat D.err >&2; fail "truncation of step 9 not reported"; }
grep -Eq 'using .*step_000006' D.err || { cat D.err >&2; fail "stderr does not say step 6 is used"; }
check_same_as_a D "run resumed from step 6 after two truncated checkpoints"
echo "truncated steps 12 and 9 -> resumed from step 6, bit for bit"

# nothing valid at all: a clear error, not a fresh start
cp -r A F
for d in F/step_*; do truncate -s 10 "$d/model.safetensors"; done
if "${train[@]}" --out F --resume 2> F.err; then fail "resume with no valid checkpoint succeeded"; fi
grep -q 'no valid checkpoint' F.err || { cat F.err >&2; fail "no 'no valid checkpoint' message"; }
echo "PASS test_resume"
