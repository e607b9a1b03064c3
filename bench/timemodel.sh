#!/usr/bin/env bash
# bench/timemodel.sh: `plan`'s time model (src/train/plan_time.c) against measured step times
# on this machine, for dp2, ep2, tp2, pp2 and dp2 x ep2 of the small config.
#
# What the model is given, measured here first:
#  - the FLOP/s one rank sustains: a one-process, one-thread run of the same training config
#    (the model FLOPs per second it reports, the mean after the warm-up steps). A rank of a
#    layout with more ranks than cores gets its share of the cores;
#  - the bandwidth and latency of MPI between ranks on this machine, for 2 and for 4 ranks
#    (bench/comm_bw.c: an all-reduce's bus bandwidth, an 8-byte message's one-way time),
#    under the MCA settings the test suite and these runs use (tests/mpirun.sh).
# Then each layout runs for real and the measured step (global batch x seq / tokens per second,
# the mean after the warm-up) is printed beside the prediction.
#
# Environment: NM_BENCH_BUILD [build], NM_BENCH_STEPS [4], NM_BENCH_WARMUP [1].
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${NM_BENCH_BUILD:-build}
STEPS=${NM_BENCH_STEPS:-4}
WARMUP=${NM_BENCH_WARMUP:-1}
NM=$(realpath "$BUILD/nanomegatron")
ROOT=$PWD
source tests/mpirun.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
cores=$(nproc)
cp "$ROOT/configs/small.json" model.json
SEQ=256 MICRO=4 GLOBAL=16
cat > train.json <<JSON
{"model": "model.json", "data": {"synthetic": true, "synthetic_tokens": 1048576},
 "seq_len": $SEQ, "micro_batch": $MICRO, "global_batch": $GLOBAL, "steps": $((STEPS + WARMUP)), "seed": 1,
 "threads": 1, "log": {"log_every": 1, "eval_every": 0}, "checkpoint": {"save_every": 0}}
JSON
mpicc -O2 "$ROOT/bench/comm_bw.c" -o comm_bw
echo "bench/timemodel: small, seq $SEQ, micro $MICRO, global $GLOBAL, $STEPS steps after $WARMUP, $cores cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
mean() {  # run_dir key: the mean after the warm-up steps
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')][int(sys.argv[3]):]; print(sum(x[sys.argv[2]] for x in r)/len(r))" "$1" "$2" "$WARMUP"
}
"$NM" train --config train.json --out one --quiet >/dev/null
F1=$(python3 -c "print($(mean one tflops) * 1e12)")
echo "one rank, one thread: $(python3 -c "print(f'{$F1/1e9:.2f}')") GFLOP/s sustained (model FLOPs)"
declare -A BW LAT
for n in 2 4; do
  out=$(nm_mpirun $n ./comm_bw 64 | grep -o '{.*}')
  BW[$n]=$(python3 -c "import json;print(json.loads('$out')['bus_gbps'])")
  LAT[$n]=$(python3 -c "import json;print(json.loads('$out')['latency_us'])")
  echo "MPI, $n ranks: ${BW[$n]} GB/s bus bandwidth per rank, ${LAT[$n]} us one way"
done
printf "%-10s %10s %10s %8s   %s\n" layout predicted measured ratio "prediction: compute | tp | ep | pp | dp (s per step)"
for spec in "dp2 2" "ep2 2 --ep 2:expert_parallel_size=2" "tp2 2 --tp 2:tensor_parallel_size=2" \
            "pp2 2 --pp 2:pipeline_parallel_size=2" "dp2_ep2 4 --ep 2:expert_parallel_size=2"; do
  name=${spec%% *}; rest=${spec#* }; n=${rest%% *}; flags=""; sets=()
  if [[ $rest == *:* ]]; then flags=${rest#* }; flags=${flags%%:*}; sets=(--set "${rest##*:}"); fi
  nm_mpirun "$n" "$NM" train --config train.json --out "$name" --quiet "${sets[@]}" >"$name.log" 2>&1 \
    || { cat "$name.log"; echo "$name did not run" >&2; exit 1; }
  measured=$(python3 -c "print($GLOBAL * $SEQ / $(mean "$name" tokens_per_s))")
  share=$(python3 -c "print($F1 * min(1.0, $cores / $n))")
  json=$("$NM" plan --config model.json --world "$n" $flags --seq-len $SEQ --micro-batch $MICRO --global-batch $GLOBAL \
         --flops "$share" --bw-intra "${BW[$n]}" --bw-inter "${BW[$n]}" --latency-intra "${LAT[$n]}" \
         --latency-inter "${LAT[$n]}" | tail -1)
  python3 - "$name" "$measured" "$json" <<'PY'
import json, sys
name, measured, p = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
t = max((s["time"] for s in p["stages"]), key=lambda t: t["busy_s"])
parts = " | ".join(f"{t[k]:.3f}" for k in ("compute_s", "tp_s", "ep_s", "pp_s", "dp_s"))
print(f"{name:<10} {p['step_s']:9.3f}s {measured:9.3f}s {p['step_s'] / measured:8.2f}   {parts}")
PY
done
