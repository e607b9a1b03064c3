#!/usr/bin/env bash
# bench/run.sh: our CPU training speed against the machine's peaks and a PyTorch peer, in one run.
#
#   1. builds (or reuses) $NM_BENCH_BUILD and compiles bench/peak.c next to it;
#   2. measures the fp32 (the better of OpenBLAS and oneDNN sgemm) and bf16 (oneDNN matmul) GEMM peaks;
#   3. per config (small, tiny): `nanomegatron init` one set of weights, trains them with our
#      binary and with bench/torch_peer.py (same weights, batch shape, threads), fp32 and bf16;
#   4. prints the table (tokens/s, model TFLOP/s from `inspect`'s flops_per_token, % of the
#      measured peak, ours/PyTorch), a 1-vs-T-thread scaling row, our forward/backward/optimizer
#      split from metrics.jsonl and a per-function profile of our timed steps (perf, when
#      present: a second, untimed run recorded only while its timed steps run).
# The LAST line is `speedup_fp32=<ours/torch tokens/s>` for the first config, the one before it
# `speedup_bf16=<x>` (ours bf16 over PyTorch bf16 autocast).
#
# Environment (defaults in brackets):
#   NM_BENCH_BUILD [build]        build directory holding nanomegatron (configured if absent)
#   NM_BENCH_THREADS [nproc]      threads for both sides
#   NM_BENCH_CONFIGS ["small tiny"]  names of configs/<name>-train.json
#   NM_BENCH_STEPS [2]            timed optimizer steps per run (small); NM_BENCH_TINY_STEPS [3]
#   NM_BENCH_WARMUP [1]           untimed steps before them
#   NM_BENCH_PRECISIONS ["fp32 bf16"]
#   NM_BENCH_SCALING [1]          the scaling row: ours on tiny at 1 then T threads, back to back, twice
#   NM_BENCH_PROFILE [1]          perf-profile our fp32 run of the first config (needs perf)
#   NM_BENCH_TORCH [1]            run the PyTorch peer
#   NM_BENCH_PYTHON               python with torch (default .venv/bin/python3, else /usr/bin/python3)
#   NM_BENCH_PEAK_MAX_N [4096]    largest square GEMM of the peak measurement
#   NM_BENCH_KEEP                 keep the scratch directory (printed) instead of deleting it
# Timings on a shared machine are noisy: the script prints the load average before and after.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${NM_BENCH_BUILD:-build}
THREADS=${NM_BENCH_THREADS:-$(nproc)}
CONFIGS=${NM_BENCH_CONFIGS:-"small tiny"}
STEPS=${NM_BENCH_STEPS:-2}
TINY_STEPS=${NM_BENCH_TINY_STEPS:-3}
WARMUP=${NM_BENCH_WARMUP:-1}
PRECISIONS=${NM_BENCH_PRECISIONS:-"fp32 bf16"}
SCALING=${NM_BENCH_SCALING:-1}
PROFILE=${NM_BENCH_PROFILE:-1}
TORCH=${NM_BENCH_TORCH:-1}
PEAK_MAX_N=${NM_BENCH_PEAK_MAX_N:-4096}
if [ -n "${NM_BENCH_PYTHON:-}" ]; then PY=$NM_BENCH_PYTHON
elif [ -x .venv/bin/python3 ]; then PY=.venv/bin/python3
else PY=/usr/bin/python3; fi

say() { printf '%s\n' "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

# --- build ------------------------------------------------------------------------------------
if [ ! -x "$BUILD/nanomegatron" ]; then
  say "bench: building $BUILD"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$BUILD" -j "$(nproc)" >/dev/null
fi
NM="$BUILD/nanomegatron"
mkdir -p "$BUILD/bench"
dnnl_flags=()
if [ -f /usr/include/oneapi/dnnl/dnnl.h ] || [ -f /usr/local/include/oneapi/dnnl/dnnl.h ]; then
  dnnl_flags=(-DNM_HAVE_DNNL -ldnnl)
fi
# shellcheck disable=SC2046
cc -std=c11 -O2 -march=native -Wall -Wextra bench/peak.c -o "$BUILD/bench/peak" \
   $(pkg-config --cflags --libs openblas) -fopenmp "${dnnl_flags[@]}"

# Our binary re-executes itself with OPENBLAS_CORETYPE set when OpenBLAS fell back to
# SSE3 kernels on a newer CPU (tools/nanomegatron.c). The PyTorch peer links the same
# libopenblas, so give the whole bench (peaks, peer) the same kernels, or the ratio
# would compare AVX-512 GEMMs against SSE3 ones.
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  read -r core_kv isa_kv < <("$BUILD/bench/peak" --core)
  case "${core_kv#openblas_core=}" in
    Prescott|Core2|Nehalem)
      if [ "${isa_kv#avx512f=}" = 1 ]; then export OPENBLAS_CORETYPE=SkylakeX
      elif grep -qw avx2 /proc/cpuinfo; then export OPENBLAS_CORETYPE=Haswell; fi
      [ -n "${OPENBLAS_CORETYPE:-}" ] && say "bench: OpenBLAS fell back to ${core_kv#openblas_core=} kernels; OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE for every side (as nanomegatron does itself)";;
  esac
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nm-bench.XXXXXX")
if [ -z "${NM_BENCH_KEEP:-}" ]; then trap 'rm -rf "$WORK"' EXIT; else say "bench: scratch in $WORK"; fi
RES="$WORK/results.jsonl"   # one JSON object per measurement; the report reads it
: > "$RES"
LOAD_BEFORE=$(load)
say "bench: $(nproc) cores, threads $THREADS, load average $LOAD_BEFORE, python $PY"

# --- peaks ------------------------------------------------------------------------------------
say "bench: measuring GEMM peaks"
"$BUILD/bench/peak" --threads "$THREADS" --max-n "$PEAK_MAX_N" | tee "$WORK/peak.txt" >&2
"$BUILD/bench/peak" --threads 1 --max-n 2048 --no-shapes > "$WORK/peak1.txt"

# --- one run of ours: prints {"impl","config","precision","threads",tokens_per_s,...} ----------
# metrics.jsonl's tokens_per_s is per step (global_batch*seq_len / step time); the warm-up
# steps are skipped and the rest combined as total tokens / total time.
ours() {  # config precision threads steps [perf [label]]: label names the result (default nanomegatron)
  local cfg=$1 prec=$2 thr=$3 steps=$4 prof=${5:-0} label=${6:-nanomegatron} out="$WORK/ours-$1-$2-$3" t0 t1
  [ "$label" != nanomegatron ] && out="$WORK/$label-$1-$2-$3"
  local cmd=("$NM" train --config "configs/$cfg-train.json" --out "$out" --steps $((WARMUP + steps))
             --set "threads=$thr" --set "precision=$prec" --set "init_from=$WORK/init-$cfg" --set model=null
             --set log.eval_every=0 --quiet)
  t0=$(date +%s.%N)
  if ! "${cmd[@]}" > "$out.log" 2>&1; then
    if grep -q "not implemented" "$out.log"; then
      printf '{"impl":"%s","config":"%s","precision":"%s","threads":%s,"status":"not implemented"}\n' \
        "$label" "$cfg" "$prec" "$thr" >> "$RES"
      return 0
    fi
    say "bench: our $cfg $prec run failed:"; cat "$out.log" >&2; return 1
  fi
  "$PY" - "$out/metrics.jsonl" "$cfg" "$prec" "$thr" "$WARMUP" "$label" >> "$RES" <<'EOF'
import json, statistics, sys
path, cfg, prec, thr, warm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
label = sys.argv[6]
rows = [json.loads(l) for l in open(path) if l.strip()]
timed = [r for r in rows if r["step"] > warm] or rows
tok = [r["tokens"] - p["tokens"] for p, r in zip([{"tokens": 0}] + rows, rows)]
tok = tok[len(rows) - len(timed):]
secs = [t / r["tokens_per_s"] for t, r in zip(tok, timed)]
med = lambda k: statistics.median(r[k] for r in timed)
print(json.dumps({"impl": label, "config": cfg, "precision": prec, "threads": thr, "status": "ok",
                  "tokens_per_s": sum(tok) / sum(secs), "step_s": secs,
                  "t_forward": med("time_forward_s"), "t_backward": med("time_backward_s"),
                  "t_optimizer": med("time_optimizer_s"), "t_data": med("time_data_s"),
                  "loss_first": rows[0]["loss"]}))
EOF
  t1=$(date +%s.%N)
  if [ "$prof" = 1 ]; then profile "$cfg" "$out" "$t0" "$t1" "${cmd[@]}"; fi
}

# profile CONFIG OUT T0 T1 CMD...: a second run of the timed command under perf, recording only
# while its timed steps run: perf starts after the first run's set-up (its wall time minus its
# steps, which also counts the final checkpoint, so the window starts a little late) plus the
# warm-up steps, and the run is killed after as many seconds as the first run's steps took,
# before any checkpoint. Set-up (parameter init, loading, the kernel timing) and the final
# save were a tenth of the samples of a profile of the whole run and showed as kernel and libm
# time that the steps do not spend.
profile() {
  local cfg=$1 out=$2 t0=$3 t1=$4 window i; shift 4
  local cmd=("$@")
  window=$("$PY" - "$out/metrics.jsonl" "$WARMUP" "$t0" "$t1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
warm, wall = int(sys.argv[2]), float(sys.argv[4]) - float(sys.argv[3])
tok = [r["tokens"] - p["tokens"] for p, r in zip([{"tokens": 0}] + rows, rows)]
secs = [t / r["tokens_per_s"] for t, r in zip(tok, rows)]
setup = wall - sum(secs)
print(int(1000 * (setup + sum(secs[:warm]))), "%.1f" % (setup + sum(secs)))
EOF
  )
  # the same command into another directory, with steps to spare (it is killed before the end)
  for i in "${!cmd[@]}"; do
    [ "${cmd[$i]}" = "$out" ] && cmd[i]="$out-perf"
    [ "${cmd[$i]}" = --steps ] && cmd[i + 1]=1000
  done
  # --foreground: the KILL goes to our binary only, not to timeout's process group (perf, this shell)
  perf record -q -F 499 -D "${window% *}" -o "$WORK/perf-$cfg.data" -- \
    timeout --foreground -s KILL "${window#* }" "${cmd[@]}" > "$out-perf.log" 2>&1 || true
  rm -rf "$out-perf"
}

peer() {  # config precision threads steps
  local cfg=$1 prec=$2 thr=$3 steps=$4 log="$WORK/torch-$1-$2.log"
  if "$PY" bench/torch_peer.py --model "$WORK/init-$cfg" --train-config "configs/$cfg-train.json" \
       --threads "$thr" --steps "$steps" --warmup "$WARMUP" --precision "$prec" > "$log" 2>&1; then
    tail -n 1 "$log" | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); d.update(impl="pytorch", config=sys.argv[1], status="ok"); print(json.dumps(d))' "$cfg" >> "$RES"
  else
    say "bench: torch peer $cfg $prec failed:"; tail -n 5 "$log" >&2
    printf '{"impl":"pytorch","config":"%s","precision":"%s","threads":%s,"status":"failed"}\n' "$cfg" "$prec" "$thr" >> "$RES"
  fi
}

# --- runs -------------------------------------------------------------------------------------
first=""
for cfg in $CONFIGS; do
  [ -z "$first" ] && first=$cfg
  n=$STEPS; [ "$cfg" = tiny ] && n=$TINY_STEPS
  model=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"])' "configs/$cfg-train.json")
  seq=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["seq_len"])' "configs/$cfg-train.json")
  seed=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("seed", 1234))' "configs/$cfg-train.json")
  "$NM" init --config "configs/$model" --out "$WORK/init-$cfg" --seed "$seed" > /dev/null
  # The trainer's own FLOP count (T = seq_len + 1 positions per window, as in trainer.c).
  "$NM" inspect --config "configs/$model" --seq-len $((seq + 1)) | tail -n 1 > "$WORK/inspect-$cfg.json"
  for prec in $PRECISIONS; do
    prof=0; [ "$PROFILE" = 1 ] && [ "$cfg" = "$first" ] && [ "$prec" = fp32 ] && command -v perf >/dev/null && prof=1
    say "bench: $cfg $prec: ours ($WARMUP + $n steps, $THREADS threads)$([ $prof = 1 ] && echo ', then again under perf')"
    ours "$cfg" "$prec" "$THREADS" "$n" "$prof"
    if [ "$TORCH" = 1 ]; then
      say "bench: $cfg $prec: pytorch peer"
      peer "$cfg" "$prec" "$THREADS" "$n"
    fi
  done
  if [ "$SCALING" = 1 ] && [ "$cfg" = tiny ] && [ "$THREADS" != 1 ]; then
    # 1 and T threads back to back, twice: on a shared machine runs minutes apart (the table's
    # T-thread run and a later 1-thread one) differ by the neighbours' load as much as by threads
    for pair in 1 2; do
      say "bench: $cfg fp32: ours at 1 then $THREADS threads (scaling pair $pair of 2)"
      ours "$cfg" fp32 1 "$n" 0 "pair$pair"
      ours "$cfg" fp32 "$THREADS" "$n" 0 "pair$pair"
    done
  fi
  rm -rf "$WORK"/*-"$cfg"-*/step_* # checkpoints written at the end of each run (ours, scaling pairs)
done

# --- profile buckets --------------------------------------------------------------------------
if [ -f "$WORK/perf-$first.data" ]; then
  perf report -i "$WORK/perf-$first.data" --stdio --no-children --sort dso,symbol -q 2>/dev/null \
    > "$WORK/perf-$first.txt" || true
fi

# The peak again at the end: on a shared machine the first measurement may have caught a busy
# moment; the report takes the better of the two (a peak is a best-of by definition).
"$BUILD/bench/peak" --threads "$THREADS" --max-n 2048 --no-shapes > "$WORK/peak-end.txt"
LOAD_AFTER=$(load)
"$PY" - "$WORK" "$first" "$LOAD_BEFORE" "$LOAD_AFTER" "$THREADS" <<'EOF'
import json, os, re, sys
work, first, load0, load1, threads = sys.argv[1:6]
res = [json.loads(l) for l in open(os.path.join(work, "results.jsonl")) if l.strip()]
def kv(path):
    d = {}
    for line in open(path):
        m = re.match(r"^(\w+)=(\S+)$", line.strip())
        if m: d[m.group(1)] = m.group(2)
    return d
pk, pk1 = kv(os.path.join(work, "peak.txt")), kv(os.path.join(work, "peak1.txt"))
pk2 = kv(os.path.join(work, "peak-end.txt"))
peak = {p: max(float(pk.get("%s_peak_gflops" % p, "nan")), float(pk2.get("%s_peak_gflops" % p, "nan")))
        for p in ("fp32", "bf16")}
print()
lib = {l: max(float(pk.get("fp32_%s_peak_gflops" % l, "nan")), float(pk2.get("fp32_%s_peak_gflops" % l, "nan")))
       for l in ("openblas", "onednn")}
print("peaks (%s threads, best of start and end): fp32 sgemm %.1f GFLOP/s (OpenBLAS %s kernels %.1f, oneDNN %.1f; 1 thread %.1f) | memory %s GB/s | bf16 %s" % (
    threads, peak["fp32"], pk.get("openblas_core", "?"), lib["openblas"], lib["onednn"],
    float(pk1.get("fp32_peak_gflops", "nan")), pk.get("memory_gbs", "?"),
    "%.1f GFLOP/s (%s)" % (peak["bf16"], pk.get("bf16_isa", "?")) if "bf16_peak_gflops" in pk else "unavailable"))
print("load average: %s before, %s after (on %d cores)" % (load0, load1, os.cpu_count()))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
print("cpu: %s (%s%s) | oneDNN ISA %s%s | OpenBLAS kernels %s" % (
    cpu, simd, ", avx512_bf16" if "avx512_bf16" in flags else "", pk.get("onednn_isa", "?"),
    " (capped by ONEDNN_MAX_CPU_ISA=%s)" % os.environ["ONEDNN_MAX_CPU_ISA"] if os.environ.get("ONEDNN_MAX_CPU_ISA") else "",
    pk.get("openblas_core", "?")))
tv = sorted({r.get("torch") for r in res if r["impl"] == "pytorch" and r.get("torch")})
if tv: print("pytorch peer: torch %s" % ", ".join(tv))  # the ratios depend on the version (docs/performance.md)
for d in sorted(os.listdir(work)):  # the pick each of our runs measured (src/ops/cpu/tuning.c)
    kj = os.path.join(work, d, "kernels.json")
    if d.startswith("ours-") and os.path.exists(kj):
        k = json.load(open(kj))
        print("kernels %-22s fp32 %-8s (onednn %.0f / openblas %.0f GFLOP/s)  bf16 %-6s (onednn %.0f / widen %.0f GFLOP/s)" % (
            d[5:], k["fp32"], k.get("fp32_onednn_gflops", 0), k.get("fp32_openblas_gflops", 0), k["bf16"],
            k.get("bf16_onednn_gflops", 0), k.get("bf16_widen_gflops", 0)))
print()
hdr = "%-6s %-5s %-13s %4s %10s %9s %8s %11s" % ("config", "prec", "impl", "thr", "tokens/s", "TFLOP/s", "%peak", "ours/torch")
print(hdr); print("-" * len(hdr))
speedups, speedups16 = {}, {}
def find(cfg, prec, impl, thr):
    for r in res:
        if r["config"] == cfg and r["precision"] == prec and r["impl"] == impl and int(r["threads"]) == int(thr):
            return r
cfgs = []
for r in res:
    if r["config"] not in cfgs: cfgs.append(r["config"])
for cfg in cfgs:
    fpt = json.load(open(os.path.join(work, "inspect-%s.json" % cfg)))["flops_per_token"]
    for prec in ("fp32", "bf16"):
        o, t = find(cfg, prec, "nanomegatron", threads), find(cfg, prec, "pytorch", threads)
        for r in (o, t):
            if r is None: continue
            if r["status"] != "ok":
                print("%-6s %-5s %-13s %4s %10s" % (cfg, prec, r["impl"], r["threads"], r["status"]))
                continue
            tf = r["tokens_per_s"] * fpt / 1e12
            ratio = ""
            if r is o and t and t["status"] == "ok":
                ratio = "%.2f" % (o["tokens_per_s"] / t["tokens_per_s"])
                (speedups if prec == "fp32" else speedups16)[cfg] = o["tokens_per_s"] / t["tokens_per_s"]
            print("%-6s %-5s %-13s %4s %10.1f %9.4f %7.1f%% %11s" % (cfg, prec, r["impl"], r["threads"],
                  r["tokens_per_s"], tf, 100 * tf * 1e3 / peak[prec], ratio))
    pairs = [(find(cfg, "fp32", "pair%d" % i, 1), find(cfg, "fp32", "pair%d" % i, threads)) for i in (1, 2)]
    pairs = [(a, b) for a, b in pairs if a and b and a["status"] == "ok" and b["status"] == "ok"]
    if pairs and int(threads) != 1:
        ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs]
        print("%-6s fp32  scaling       1->%s threads, back-to-back pairs: %s; mean %.2fx (ideal %sx)" % (
            cfg, threads, ", ".join("%.1f -> %.1f = %.2fx" % (a["tokens_per_s"], b["tokens_per_s"], r)
                                     for (a, b), r in zip(pairs, ratios)), sum(ratios) / len(ratios), threads))
kern = os.environ.get("NM_CPU_BF16_GEMM", "auto") or "auto"
if kern == "auto": kern = "onednn" if pk.get("bf16_amx_usable") == "1" else "widen"
kj = os.path.join(work, "ours-%s-bf16-%s" % (first, threads), "kernels.json")
if not os.environ.get("NM_CPU_BF16_GEMM") and os.path.exists(kj): kern = json.load(open(kj))["bf16"]  # measured pick
if kern == "widen" and any(r["impl"] == "nanomegatron" and r["precision"] == "bf16" for r in res):
    print("(our bf16 GEMMs ran the 'widen' kernel: bf16 operands widened to fp32 and multiplied on the fp32 FMA units,\n"
          " which outrun this CPU's bf16 dot products without AMX; so our bf16 %peak, against oneDNN's bf16 peak, can pass 100%.\n"
          " Against the fp32 peak: " + ", ".join("%s %.1f%%" % (r["config"], 100 * r["tokens_per_s"] * json.load(open(os.path.join(
              work, "inspect-%s.json" % r["config"])))["flops_per_token"] / 1e9 / peak["fp32"]) for r in res
              if r["impl"] == "nanomegatron" and r["precision"] == "bf16" and r["status"] == "ok" and int(r["threads"]) == int(threads)) + ")")
print("(FLOPs/token from `nanomegatron inspect` at T = seq_len + 1: %s)" % ", ".join(
    "%s %.4g" % (c, json.load(open(os.path.join(work, "inspect-%s.json" % c)))["flops_per_token"]) for c in cfgs))

print("\nour step, median seconds per phase (metrics.jsonl time_*_s):")
for r in res:
    if r["impl"] == "nanomegatron" and r["status"] == "ok":
        tot = r["t_forward"] + r["t_backward"] + r["t_optimizer"] + r["t_data"]
        print("  %-6s %s %2s thr: forward %.2f s (%.0f%%)  backward %.2f s (%.0f%%)  optimizer %.2f s (%.0f%%)  data %.3f s" % (
            r["config"], r["precision"], r["threads"], r["t_forward"], 100 * r["t_forward"] / tot, r["t_backward"],
            100 * r["t_backward"] / tot, r["t_optimizer"], 100 * r["t_optimizer"] / tot, r["t_data"]))

prof = os.path.join(work, "perf-%s.txt" % first)
if os.path.exists(prof):
    SETUP = "setup + final checkpoint (outside the timed steps; excluded below)"
    buckets = [  # (name, regex on "dso symbol"), first match wins
        (SETUP, r"nm_rng|nm_params_init|crc32c|safetensors|copy_folio|clear_page|__cos|__sin|rope_tables|"
                r"ext4|write|fsync|shmem"),
        # libm's log also runs in the init's Box-Muller (setup), which perf cannot tell from the step's
        ("libm exp/log (per-row log of attention and cross-entropy; the init's Box-Muller log)",
         r"libm\b|libm[.-]|__exp|__log|\bexpf?\b|\bexpf?@|\blog\b"),
        # oneDNN's sgemm runs code it generates at run time: perf shows it as "[JIT] tid N".
        ("GEMM (oneDNN / OpenBLAS sgemm)", r"\[JIT\]|libdnnl|libopenblas|sgemm|gemm_|_kernel_|sgemv|blas_thread|exec_blas"),
        ("attention fwd", r"nm_cpu_attention_forward"),
        ("attention bwd", r"nm_cpu_attention_backward"),
        ("MoE dispatch/combine", r"nm_cpu_moe_"),
        ("router + balance loss", r"router|balance|topk"),
        ("RMSNorm", r"rmsnorm"),
        ("SwiGLU", r"swiglu"),
        ("RoPE", r"rope|rotate"),
        ("cross-entropy", r"xent|row_stats"),
        ("embedding", r"embedding"),
        ("optimizer (AdamW, grad norm)", r"optim|adamw|chunk_sumsq"),
        ("copies/zeroing (memcpy/memset, copy_2d, add_2d)", r"memcpy|memset|memmove|copy_2d|add_2d|nm_cpu_zero|axpy"),
        ("thread runtime (OpenMP barrier spin, sched_yield)", r"libgomp|gomp_|sched_yield"),
        ("kernel (page faults, syscalls)", r"\[kernel|\[k\]"),
    ]
    tot, acc, other = 0.0, {b[0]: 0.0 for b in buckets}, []
    for line in open(prof):
        line = re.sub(r"\[JIT\] tid \d+", "[JIT]", line)
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if not m: continue
        pct, dso, sym = float(m.group(1)), m.group(2), re.sub(r"(\s+-)+\s*$", "", m.group(4)).strip()
        tot += pct
        key = "%s %s%s" % (dso, sym, " [k]" if m.group(3) == "k" else "")
        for name, rx in buckets:
            if re.search(rx, key):
                acc[name] += pct; break
        else:
            other.append((pct, key))
    step = max(tot - acc[SETUP], 1e-9)
    print("\nour %s fp32 steps by function (perf over the timed steps of a second run; %s threads; %% of the samples, "
          "%.1f%% set-up/checkpoint excluded):" % (first, threads, acc[SETUP]))
    for name, _ in sorted(buckets, key=lambda b: -acc[b[0]]):
        if name != SETUP and acc[name] >= 0.05: print("  %5.1f%%  %s" % (100 * acc[name] / step, name))
    o = sum(p for p, _ in other)
    print("  %5.1f%%  other (top: %s)" % (100 * o / step, ", ".join("%s %.1f%%" % (k, p) for p, k in sorted(other, reverse=True)[:4])))
print()
print("speedup_bf16=%.3f" % speedups16.get(first, next(iter(speedups16.values()), float("nan"))))
if first in speedups:
    print("speedup_fp32=%.3f" % speedups[first])
elif speedups:
    print("speedup_fp32=%.3f" % next(iter(speedups.values())))
else:
    print("speedup_fp32=nan")
EOF
