#!/usr/bin/env bash
# bench/dist.sh: multi-process scaling on one machine, in one run: the small config's training
# speed on 1 rank x T threads against T ranks x 1 thread (data, expert, tensor and pipeline parallel),
# same global batch, same seed.
# Prints tokens/s, the efficiency against the 1-rank run, and where each step's time goes
# (forward, backward, communication after the backward, optimizer) from metrics.jsonl
# (the mean over the steps after the warm-up ones; rank 0's view).
#
# Environment: NM_BENCH_BUILD [build], NM_BENCH_THREADS [nproc], NM_BENCH_STEPS [4],
#   NM_BENCH_WARMUP [1], NM_BENCH_CONFIG [small].
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${NM_BENCH_BUILD:-build}
T=${NM_BENCH_THREADS:-$(nproc)}
STEPS=${NM_BENCH_STEPS:-4}
WARMUP=${NM_BENCH_WARMUP:-1}
CONFIG=${NM_BENCH_CONFIG:-small}
NM=$(realpath "$BUILD/nanomegatron")
ROOT=$PWD
source tests/mpirun.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
cp "$ROOT/configs/$CONFIG.json" "$ROOT/configs/$CONFIG-train.json" .
common=(--config "$CONFIG-train.json" --quiet --set steps=$((STEPS + WARMUP)) --set checkpoint.save_every=0
        --set log.eval_every=0 --set exit_interval=0)
echo "bench/dist: $CONFIG, global batch $(python3 -c "import json;print(json.load(open('$CONFIG-train.json'))['global_batch'])"), $STEPS timed steps after $WARMUP, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
summary() {  # run_dir label
  python3 - "$1" "$2" "$WARMUP" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")][int(sys.argv[3]):]
mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)
tok = mean("tokens_per_s")
step = sum(mean(k) for k in ("time_data_s", "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s"))
print(f"{sys.argv[2]:<26} {tok:9.0f} tokens/s | step {step:6.3f} s: forward {mean('time_forward_s'):.3f}, "
      f"backward {mean('time_backward_s'):.3f}, comm {mean('time_comm_s'):.3f}, optimizer {mean('time_optimizer_s'):.3f}, "
      f"a2a {mean('comm_ep_all_to_all_bytes')/1e6:.1f} MB, reduce started in backward "
      f"{100*mean('grad_reduce_overlap_fraction'):.0f}% | inside collectives: dp {mean('comm_dp_s'):.3f} s, "
      f"edp {mean('comm_edp_s'):.3f}, ep {mean('comm_ep_s'):.3f}, tp {mean('comm_tp_s'):.3f}, pp {mean('comm_pp_s'):.3f}")
open(sys.argv[1] + ".tok", "w").write(f"{tok}\n")
PY
}
OMP_NUM_THREADS=$T "$NM" train "${common[@]}" --out one --set threads="$T" >/dev/null
summary one "1 rank x $T threads"
nm_mpirun "$T" "$NM" train "${common[@]}" --out dp --set threads=1 >dp.log 2>&1 || { cat dp.log; exit 1; }
summary dp "$T ranks x 1 (dp$T)"
# the same with buckets starting during the backward (overlap_grad_reduce on)
nm_mpirun "$T" "$NM" train "${common[@]}" --out dp_overlap --set threads=1 --set overlap_grad_reduce=true >dp_overlap.log 2>&1 \
  || { cat dp_overlap.log; exit 1; }
summary dp_overlap "$T ranks x 1 (dp$T, overlap)"
# gradient sharding (ZeRO-2): every micro-batch reduce-scattered; its peer is the dp run above
nm_mpirun "$T" "$NM" train "${common[@]}" --out dp_zero2 --set threads=1 --set data_parallel_sharding_strategy=optim_grads \
  >dp_zero2.log 2>&1 || { cat dp_zero2.log; exit 1; }
summary dp_zero2 "$T ranks x 1 (dp$T, optim_grads)"
python3 -c "import json;a,b=([json.loads(l) for l in open(d+'/metrics.jsonl')][-1] for d in ('dp','dp_zero2'));print('dp$T peak RSS optim %.0f MiB, optim_grads %.0f MiB (%.2fx); reduce-scatter %.0f -> %.0f MB per step' % (a['rss_peak_bytes']/2**20, b['rss_peak_bytes']/2**20, b['rss_peak_bytes']/a['rss_peak_bytes'], a['comm_dp_reduce_scatter_bytes']/1e6, b['comm_dp_reduce_scatter_bytes']/1e6))"
if nm_mpirun "$T" "$NM" train "${common[@]}" --out ep --set threads=1 --set expert_parallel_size="$T" >ep.log 2>&1; then
  summary ep "$T ranks x 1 (dp$T ep$T)"
else
  echo "ep$T: $(grep -m1 -o 'expert parallelism.*' ep.log || tail -1 ep.log)"
fi
# the same with the shared experts run while each expert all-to-all is in flight
if nm_mpirun "$T" "$NM" train "${common[@]}" --out ep_overlap --set threads=1 --set expert_parallel_size="$T" \
     --set moe_shared_expert_overlap=true >ep_overlap.log 2>&1; then
  summary ep_overlap "$T ranks x 1 (dp$T ep$T, shared overlap)"
  python3 -c "import json;rows=[json.loads(l) for l in open('ep_overlap/metrics.jsonl')][$WARMUP:];print('ep all-to-all exposed %.3f s/step, computed during %.0f%% of its flight' % (sum(r['ep_a2a_exposed_s'] for r in rows)/len(rows), 100*sum(r['ep_a2a_hidden_fraction'] for r in rows)/len(rows)))"
fi
# the split expert exchange: two parts, one's all-to-alls in flight while the other's experts compute
if nm_mpirun "$T" "$NM" train "${common[@]}" --out ep_split --set threads=1 --set expert_parallel_size="$T" \
     --set overlap_moe_expert_parallel_comm=true >ep_split.log 2>&1; then
  summary ep_split "$T ranks x 1 (dp$T ep$T, split exchange)"
  python3 -c "import json;rows=[json.loads(l) for l in open('ep_split/metrics.jsonl')][$WARMUP:];print('ep all-to-all exposed %.3f s/step, computed during %.0f%% of its flight' % (sum(r['ep_a2a_exposed_s'] for r in rows)/len(rows), 100*sum(r['ep_a2a_hidden_fraction'] for r in rows)/len(rows)))"
fi
# paired micro-batches: one micro-batch's forward beside the previous one's backward, each one's
# all-to-alls in flight while the other computes. It needs 2 or more micro-batches a step: both
# runs at half the config's micro-batch, its peer (ep_half) unpaired, run right before it
half=$(( $(python3 -c "import json;print(json.load(open('$CONFIG-train.json'))['micro_batch'])") / 2 ))
[ "$half" -ge 1 ] || half=1
if nm_mpirun "$T" "$NM" train "${common[@]}" --out ep_half --set threads=1 --set expert_parallel_size="$T" \
     --set micro_batch="$half" >ep_half.log 2>&1 &&
   nm_mpirun "$T" "$NM" train "${common[@]}" --out ep_pair --set threads=1 --set expert_parallel_size="$T" \
     --set micro_batch="$half" --set moe_pair_micro_batches=true >ep_pair.log 2>&1; then
  summary ep_half "$T ranks x 1 (dp$T ep$T, micro $half)"
  summary ep_pair "$T ranks x 1 (dp$T ep$T, micro $half, paired)"
  python3 -c "import json;rows=[json.loads(l) for l in open('ep_pair/metrics.jsonl')][$WARMUP:];print('paired: ep all-to-all exposed %.3f s/step, the other micro-batch computing during %.0f%% of its flight; %.2fx the unpaired run' % (sum(r['ep_a2a_exposed_s'] for r in rows)/len(rows), 100*sum(r['ep_a2a_hidden_fraction'] for r in rows)/len(rows), float(open('ep_pair.tok').read())/float(open('ep_half.tok').read())))"
else
  echo "ep$T paired: $(tail -1 ep_half.log) $(tail -1 ep_pair.log)"
fi
# tensor parallelism (sequence parallelism on, the default) over all T ranks
if nm_mpirun "$T" "$NM" train "${common[@]}" --out tp --set threads=1 --set tensor_parallel_size="$T" >tp.log 2>&1; then
  summary tp "$T ranks x 1 (tp$T)"
else
  echo "tp$T: $(tail -1 tp.log)"
fi
# pipeline parallelism (even split; 1F1B over the step's micro-batches, then interleaved)
if nm_mpirun "$T" "$NM" train "${common[@]}" --out pp --set threads=1 --set pipeline_parallel_size="$T" >pp.log 2>&1; then
  summary pp "$T ranks x 1 (pp$T)"
  python3 -c "import json;r=[json.loads(l) for l in open('pp/metrics.jsonl')][-1];print('pp idle fractions:', {k: round(v, 3) for k, v in r.items() if k.startswith('pp_idle') or k == 'pp_bubble_theory'})"
else
  echo "pp$T: $(tail -1 pp.log)"
fi
# the interleaved schedule: 2 virtual stages per rank, the same micro-batches
if nm_mpirun "$T" "$NM" train "${common[@]}" --out pp_v2 --set threads=1 --set pipeline_parallel_size="$T" \
     --set virtual_pipeline_model_parallel_size=2 >pp_v2.log 2>&1; then
  summary pp_v2 "$T ranks x 1 (pp$T, 2 virtual)"
  python3 -c "import json;r=[json.loads(l) for l in open('pp_v2/metrics.jsonl')][-1];print('pp idle fractions:', {k: round(v, 3) for k, v in r.items() if k.startswith('pp_idle') or k == 'pp_bubble_theory'})"
else
  echo "pp$T v2: $(tail -1 pp_v2.log)"
fi
for r in dp dp_overlap dp_zero2 ep ep_overlap ep_split ep_half ep_pair tp pp pp_v2; do
  [ -f $r.tok ] && python3 -c "print(f'efficiency $r: {float(open(\"$r.tok\").read())/float(open(\"one.tok\").read()):.2f} of 1 rank x $T threads')"
done
