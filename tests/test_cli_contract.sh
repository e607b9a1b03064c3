#!/usr/bin/env bash
# test_cli_contract.sh: the command line's contract with careless and hostile input. Every
# command, given each class of bad argument (a directory, a FIFO, an empty file or a missing
# one where a file belongs; a file where a directory belongs; a dataset prefix with its
# extension; a bare word after a flag; nan, inf, negative and huge numbers; an unknown flag),
# must exit 1 or 2 (no signal, no abort), print no 'fatal', and name the argument in its
# message; `--help` on every command exits 0 with its usage. And what must work does: a config read from a pipe or a FIFO, text prepared from
# one, and 1,000 and 5,000 data.paths entries training a step.
#
# Each case is one line of a table: the text its message must contain, then the command, with
# @ standing for the bad value where a loop supplies several. Every command runs under a
# timeout (a FIFO nobody writes would otherwise hang it); outputs are captured first and the
# verdict taken from the captured exit status and text, never from a pipe. `make sanitize` runs
# it on the ASan/UBSan build (label sanitize), where a sanitizer report also fails a case.
set -u
: "${NM_BIN:?NM_BIN not set}" "${NM_ROOT:?NM_ROOT not set}"
tmp=$(mktemp -d "${NM_BUILD:-${TMPDIR:-/tmp}}/test_cli_contract.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp" || exit 1
N=$NM_BIN
failures=0
cases=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# --- the verdicts -------------------------------------------------------------------------------

# A sanitizer's report in out (an ASan/UBSan build, `make sanitize`): its environment makes a
# report abort, but by default UBSan carries on and ASan exits 1, which would pass for a refusal.
sanitizer_report() {
    [[ $1 == *"runtime error:"* || $1 == *"ERROR: AddressSanitizer"* || $1 == *"ERROR: LeakSanitizer"* ]]
}

# refused NEEDLE CMD...: exit 1 or 2, no 'fatal', no sanitizer report, NEEDLE in the output.
refused() {
    local needle=$1 out rc
    shift
    cases=$((cases + 1))
    out=$(timeout 120 "$@" 2>&1 </dev/null)
    rc=$?
    if sanitizer_report "$out"; then
        fail "sanitizer report from: $*"$'\n'"$out"
    elif [ "$rc" -ne 1 ] && [ "$rc" -ne 2 ]; then
        fail "exit $rc (want 1 or 2; 124 is a hang, >= 128 a signal): $*"$'\n'"$out"
    elif [[ $out == *fatal* ]]; then
        fail "'fatal' in the output of: $*"$'\n'"$out"
    elif [[ $out != *"$needle"* ]]; then
        fail "message lacks '$needle': $*"$'\n'"$out"
    fi
}

# works CMD...: exit 0, no sanitizer report.
works() {
    local out rc
    cases=$((cases + 1))
    out=$(timeout 300 "$@" 2>&1 </dev/null)
    rc=$?
    if sanitizer_report "$out"; then
        fail "sanitizer report from: $*"$'\n'"$out"
    elif [ "$rc" -ne 0 ]; then
        fail "exit $rc (want 0): $*"$'\n'"$out"
    fi
}

# each NEEDLE VALUE CMD...: refused with every @ in CMD replaced by VALUE (NEEDLE "@": VALUE).
each() {
    local needle=$1 value=$2 a args=()
    shift 2
    for a in "$@"; do args+=("${a//@/$value}"); done
    refused "${needle//@/$value}" "${args[@]}"
}

# A FIFO whose writer sends $2 (empty: nothing) and goes away; the writer gives up after 30 s
# when no command opens the FIFO, so nothing is left behind.
fifo_with() {
    rm -f "$1"
    mkfifo "$1"
    (timeout 30 sh -c 'printf "%s" "$1" > "$2"' sh "$2" "$1" >/dev/null 2>&1 &)
}

# --- fixtures -----------------------------------------------------------------------------------

mkdir adir
: >empty.json
printf 'some text\n\nanother document\n' >text.txt
printf '\001\000\000\000\002\000\000\000\003\000\000\000\004\000\000\000' >toks.bin   # 4 int32 ids
printf 'GGUF' >model.gguf
"$N" init --config "$NM_ROOT/configs/tiny.json" --out model --seed 7 >/dev/null || { echo "FAIL: init fixture" >&2; exit 1; }
"$N" prepare --synthetic 20000 --out ds >/dev/null || { echo "FAIL: prepare fixture" >&2; exit 1; }
cat >train.json <<EOF
{"model": "$NM_ROOT/configs/tiny.json", "steps": 1, "seq_len": 16, "micro_batch": 1,
 "data": {"synthetic_tokens": 20000}, "log": {"log_every": 1}}
EOF
"$N" train --config train.json --out run --quiet >/dev/null || { echo "FAIL: train fixture" >&2; exit 1; }
TINY=$NM_ROOT/configs/tiny.json

# --- 1. a path that is not a readable file where a file belongs --------------------------------
# Every argument that names an input file; @ is the bad path.
file_cases=(
    "init --out new_init --config @"
    "inspect --config @"
    "plan --world 1 --config @"
    "train --out run_x --config @"
    "tokenizer encode --text hi --tokenizer @"
    "tokenizer decode --ids 1,2 --tokenizer @"
    "tokenizer train --vocab-size 300 --out tok.json --input @"
    "prepare --tokenizer bytes --out p --input @"
    "prepare --tokenizer @ --out p --input text.txt"
    "forward --model model --batch 1 --tokens @"
    "sample --model model --prompt hi --tokens 1 --tokenizer @"
    "export --model model --out e.gguf --format gguf --tokenizer @"
)
for row in "${file_cases[@]}"; do
    read -r -a cmd <<<"$row"
    each "adir" adir "$N" "${cmd[@]}"                        # a directory
    each "empty.json" empty.json "$N" "${cmd[@]}"            # an empty file
    each "missing.json" missing.json "$N" "${cmd[@]}"        # no such file
    fifo_with fifo ""                                        # a FIFO that ends at once
    each "fifo" fifo "$N" "${cmd[@]}"
done
# tokenizer encode --input reads any text, an empty one included; a directory is not text.
each "adir" adir "$N" tokenizer encode --tokenizer bytes --input @
each "missing.txt" missing.txt "$N" tokenizer encode --tokenizer bytes --input @

# --- 2. a file (or nothing) where a model directory or a dataset prefix belongs -----------------
dir_cases=(
    "inspect --model @"
    "forward --model @ --batch 1 --tokens toks.bin"
    "eval --model @ --data ds"
    "sample --model @ --prompt hi --tokens 1"
    "export --model @ --out e.gguf --format gguf"
    "plan --world 1 --model @"
    "train --config train.json --out run_y --init-from @"
)
for row in "${dir_cases[@]}"; do
    read -r -a cmd <<<"$row"
    each "text.txt is a file, not a model directory" text.txt "$N" "${cmd[@]}"
    each "model.gguf is a GGUF file" model.gguf "$N" "${cmd[@]}"
    each "missing_dir" missing_dir "$N" "${cmd[@]}"
done
for row in "inspect --data @" "eval --model model --data @"; do
    read -r -a cmd <<<"$row"
    each "without .bin" ds.bin "$N" "${cmd[@]}"
    each "without .idx" ds.idx "$N" "${cmd[@]}"
    each "adir is a directory" adir "$N" "${cmd[@]}"
    each "missing_ds" missing_ds "$N" "${cmd[@]}"
done
# merge takes a dataset prefix or a directory of them
each "without .bin" ds.bin "$N" merge --out merged --input @
each "without .idx" ds.idx "$N" merge --out merged --input @
each "adir holds no PREFIX.idx" adir "$N" merge --out merged --input @
each "missing_ds" missing_ds "$N" merge --out merged --input @
refused "give the prefix without .bin" "$N" merge --input ds --out merged.bin

# --- 3. a bare word after a flag ------------------------------------------------------------------
refused "unexpected argument 'world' after --prompt hello" "$N" sample --model model --prompt hello world
refused "unexpected argument '3' after --steps 2" "$N" train --config train.json --out run_z --steps 2 3
refused "unexpected argument 'yes' after --resume" "$N" train --config train.json --out run --resume yes
refused "--resume is a switch" "$N" train --config train.json --out run --resume=yes
refused "unexpected argument 'extra' after --seed 1" "$N" init --config "$TINY" --out o --seed 1 extra
refused "unexpected argument 'extra' after --config" "$N" inspect --config "$TINY" extra
refused "unexpected argument 'extra' after --data ds" "$N" inspect --data ds extra
refused "unexpected argument 'extra' after --batch 1" "$N" forward --model model --tokens toks.bin --batch 1 extra
refused "unexpected argument 'extra' after --append-eod" "$N" prepare --input text.txt --tokenizer bytes --out p --append-eod extra
refused "unexpected argument 'extra' after --text hi" "$N" tokenizer encode --tokenizer bytes --text hi extra
refused "unexpected argument '3' after --ids 1,2" "$N" tokenizer decode --tokenizer bytes --ids 1,2 3
refused "unexpected argument 'extra' after --data ds" "$N" eval --model model --data ds extra
refused "unexpected argument 'hf' after --format gguf" "$N" export --model model --out e.gguf --format gguf hf
refused "unexpected argument 'yes' after --recompute" "$N" plan --config "$TINY" --world 1 --recompute yes
refused "unexpected argument 'stray'" "$N" plan stray --config "$TINY" --world 1

# --- 4. numbers: nan, inf, negative, huge ----------------------------------------------------------
# "command prefix|flag": integer flags; each gets the four classes.
int_flags=(
    "init --config $TINY --out o|seed"
    "inspect --config $TINY|seq-len"
    "inspect --data ds|doc"
    "inspect --data ds --seq-len 8|samples"
    "forward --model model --tokens toks.bin|batch"
    "prepare --out p|synthetic"
    "prepare --input text.txt --tokenizer bytes --out p|workers"
    "tokenizer train --input text.txt --out tok.json|vocab-size"
    "train --config train.json --out run_n|steps"
    "train --config train.json --out run_n|save-every"
    "train --config train.json --out run_n|seed"
    "eval --model model --data ds|seq-len"
    "eval --model model --data ds|batch"
    "eval --model model --data ds|seed"
    "sample --model model|tokens"
    "sample --model model|seed"
    "export --model run --out e.gguf --format gguf|step"
    "plan --config $TINY --world 1|tp"
    "plan --config $TINY|world"
    "plan --config $TINY --world 1|seq-len"
    "plan --config $TINY --world 1|ranks-per-node"
    "plan --config $TINY --world 1|virtual-pipeline-size"
)
for row in "${int_flags[@]}"; do
    read -r -a cmd <<<"${row%|*}"
    flag=--${row##*|}
    refused "$flag expects an integer, got 'nan'" "$N" "${cmd[@]}" "$flag" nan
    refused "$flag expects an integer, got 'inf'" "$N" "${cmd[@]}" "$flag" inf
    refused "$flag -5 is out of range" "$N" "${cmd[@]}" "$flag" -5
    refused "$flag 99999999999999999999 is out of range" "$N" "${cmd[@]}" "$flag" 99999999999999999999
done
float_flags=(
    "sample --model model|temperature"
    "sample --model model|top-p"
    "forward --model model --tokens toks.bin --batch 1|mtp-weight"
    "forward --model model --tokens toks.bin --batch 1|aux-weight"
    "plan --config $TINY --world 1|memory-gib"
    "plan --config $TINY --world 1|flops"
    "plan --config $TINY --world 1 --flops 1e12 --bw-inter 1|bw-intra"
    "plan --config $TINY --world 1 --flops 1e12 --bw-intra 1|bw-inter"
    "plan --config $TINY --world 1 --flops 1e12 --bw-intra 1 --bw-inter 1|latency-intra"
    "plan --config $TINY --world 1 --flops 1e12 --bw-intra 1 --bw-inter 1|latency-inter"
)
for row in "${float_flags[@]}"; do
    read -r -a cmd <<<"${row%|*}"
    flag=--${row##*|}
    refused "$flag expects a finite number, got 'nan'" "$N" "${cmd[@]}" "$flag" nan
    refused "$flag expects a finite number, got '-inf'" "$N" "${cmd[@]}" "$flag" -inf
    refused "$flag -5 is out of range" "$N" "${cmd[@]}" "$flag" -5
    refused "$flag 1e300 is out of range" "$N" "${cmd[@]}" "$flag" 1e300
done
refused "--top-p 0 keeps no token" "$N" sample --model model --top-p 0
# the newer flags' own refusals: the time model's inputs go together, selective recomputation
# names its modules, a blend on inspect's --data is weight-prefix pairs and needs --samples
refused "--bw-intra and --bw-inter go together" "$N" plan --config "$TINY" --world 1 --bw-intra 1
refused "'mlp' is not one of mla_up_proj, moe_act, layernorm" "$N" plan --config "$TINY" --world 1 \
    --recompute-modules mla_up_proj,mlp
refused "one prefix, or up to 64 weight-prefix pairs" "$N" inspect --data "0.5 ds 0.5" --samples 1 --seq-len 8
refused "'x' is not a weight" "$N" inspect --data "x ds 1 ds" --samples 1 --seq-len 8
refused "is a blend (weight-prefix pairs): give --samples" "$N" inspect --data "1 ds 1 ds"
refused "'recompute_modules'" "$N" train --config train.json --out run_s --set recompute_modules=core_attn
refused "'recompute_granularity' = \"partial\": expected full or selective" "$N" train --config train.json \
    --out run_s --set recompute_granularity=partial
refused "'recompute_granularity' = \"selective\" but 'recompute_modules' names no module" "$N" train \
    --config train.json --out run_s --set recompute_granularity=selective
refused "\"no_shard\" is not one of optim, optim_grads" "$N" train --config train.json --out run_s \
    --set data_parallel_sharding_strategy=no_shard
refused "--data-parallel-sharding-strategy must be optim or optim_grads, got 'zero2'" "$N" plan --config "$TINY" \
    --world 2 --data-parallel-sharding-strategy zero2
refused "--bf16-copy-storage must be bf16 or fp32, got 'fp16'" "$N" plan --config "$TINY" --world 2 \
    --precision bf16 --bf16-copy-storage fp16
refused "'data.cache_per_node'" "$N" train --config train.json --out run_s --set data.cache_per_node=2
refused "needs pipeline_parallel_size >= 2" "$N" train --config train.json --out run_s \
    --set virtual_pipeline_model_parallel_size=2
refused "\"foo\" is not a communicator (known: auto, single, mpi, nccl)" "$N" train --config train.json --out run_s \
    --set communicator=foo
refused "key 'moe_shared_expert_overlap': expected true or false" "$N" train --config train.json --out run_s \
    --set moe_shared_expert_overlap=2
refused "key 'overlap_moe_expert_parallel_comm': expected true or false" "$N" train --config train.json \
    --out run_s --set overlap_moe_expert_parallel_comm=yes
refused "key 'moe_pair_micro_batches': expected true or false" "$N" train --config train.json \
    --out run_s --set moe_pair_micro_batches=1.5
refused "moe_pair_micro_batches: it hides the expert all-to-all, and expert_parallel_size 1 has none" "$N" train \
    --config train.json --out run_s --set moe_pair_micro_batches=true
refused "moe_pair_micro_batches: it hides the expert all-to-all, and expert_parallel_size 1 has none" "$N" plan \
    --config "$TINY" --world 2 --pair-micro-batches
refused "needs pipeline_parallel_size >= 2" "$N" plan --config "$TINY" --world 1 --virtual-pipeline-size 2
# --set keys of the training config: the key and the range, integers printed as integers.
for kv in optimizer.lr=nan optimizer.lr=inf optimizer.lr=-1 optimizer.lr=1e300 seq_len=nan seq_len=-4 \
          micro_batch=1e30 steps=0 checkpoint.save_every=-1 seed=-1 virtual_pipeline_model_parallel_size=-1 \
          virtual_pipeline_model_parallel_size=33 virtual_pipeline_model_parallel_size=nan; do
    refused "--set $kv" "$N" train --config train.json --out run_s --set "$kv"
done
refused "give an integer from 2 to 16777216" "$N" train --config train.json --out run_s --set seq_len=99999999

# --- 5. unknown flags, on every command -------------------------------------------------------------
for cmd in init inspect forward prepare merge train eval sample export plan "tokenizer train" "tokenizer encode" \
           "tokenizer decode"; do
    read -r -a c <<<"$cmd"
    refused "unknown flag --no-such-flag" "$N" "${c[@]}" --no-such-flag 1
done

# --- 5b. --help, on every command: exit 0 with the command's usage on stdout ----------------------
for cmd in init inspect forward prepare merge train eval sample export plan tokenizer; do
    cases=$((cases + 1))
    out=$(timeout 60 "$N" $cmd --help 2>/dev/null </dev/null)
    rc=$?
    [ "$rc" -eq 0 ] || fail "$cmd --help exited $rc (want 0)"
    [[ $out == *"$cmd"* ]] || fail "$cmd --help does not show the command's usage: $out"
done

# --- 6. outputs that must not clobber -----------------------------------------------------------
refused "run is a training run directory" "$N" init --config "$TINY" --out run
[ -e run/config.json ] && fail "init wrote into the run directory"
refused "choose a new --out" "$N" init --config "$TINY" --out model
refused "adir is a directory" "$N" export --model model --out adir --format gguf
leftover=$(find . -maxdepth 1 -name '*.tmp.*')
[ -z "$leftover" ] || fail "export left temporary files: $leftover"
refused "give the prefix without .bin" "$N" prepare --input text.txt --tokenizer bytes --out p.bin

# --- 7. a model config given to train; no doubled prefixes -------------------------------------------
refused "is a model config (it has 'architectures')" "$N" train --config "$TINY" --out run_m
out=$(timeout 60 "$N" plan --config "$TINY" --world 3 --tp 2 2>&1)
[[ $out == *"plan: plan:"* ]] && fail "doubled prefix: $out"
out=$(timeout 60 "$N" prepare --input adir --tokenizer bytes --out p 2>&1)
[[ $out == *"prepare: prepare:"* ]] && fail "doubled prefix: $out"

# --- 8. what must work ------------------------------------------------------------------------------
works "$N" inspect --config <(cat "$TINY")
fifo_with cfg_fifo "$(cat "$TINY")"
works "$N" inspect --config cfg_fifo
fifo_with text_fifo $'text from a fifo\n\nand a second document\n'
works "$N" prepare --input text_fifo --tokenizer bytes --out from_fifo
works "$N" prepare --input <(printf 'piped text\n') --tokenizer bytes --out from_pipe
works "$N" tokenizer encode --tokenizer bytes --input <(printf 'hi')
refused "nothing to prepare" "$N" prepare --input <(printf '') --tokenizer bytes --out p
# 1,000 and 5,000 entries in data.paths (the same small dataset, equal weights) train a step:
# they overflowed fixed arrays of 64 (stack corruption, SIGBUS, SIGSEGV).
for n in 1000 5000; do
    {
        printf '{"model": "%s", "steps": 1, "seq_len": 16, "micro_batch": 1, "data": {"paths": [' "$TINY"
        sep=""
        for ((i = 0; i < n; i++)); do
            printf '%s{"prefix": "%s", "weight": 1}' "$sep" "$tmp/ds"
            sep=", "
        done
        printf ']}}\n'
    } >"paths$n.json"
    works "$N" train --config "paths$n.json" --out "run_paths$n" --quiet
done

echo "$cases cases, $failures failures"
[ "$failures" -eq 0 ] || exit 1
echo "OK"
