#!/usr/bin/env bash
# test_data_cache.sh: the index mappings of a dataset on disk are built once and memory-mapped
# (data.cache_dir; src/data/gpt_dataset.h). A dp2 run on a prepared corpus writes them into
# RUN_DIR/index_cache (rank 0 builds, rank 1 waits and maps); its training equals one process
# reading no cache (the built-in corpus is never cached, a dataset on disk always is, so the
# one-process run here uses its own cache directory); a resume maps the same files without
# rebuilding them; with data.cache_per_node each node's first rank builds its node's copy; a
# cache directory that cannot be created is refused naming the key.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }
export OMP_NUM_THREADS=1 NM_CPU_KERNELS=default

"$PY" - <<'PY'
import json, random
r = random.Random(7)
with open("corpus.jsonl", "w") as f:
    for _ in range(400):
        f.write(json.dumps({"text": "".join(r.choice("abcdefgh \n") for _ in range(r.randrange(1, 300)))}) + "\n")
PY
"$NM_BIN" prepare --input corpus.jsonl --tokenizer bytes --out corpus --append-eod >prep.log 2>&1 || { cat prep.log; fail "prepare"; }
cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat > train.json <<JSON
{"model": "model.json", "data": {"paths": [{"prefix": "$tmp/corpus", "weight": 1}]},
 "seq_len": 32, "micro_batch": 1, "global_batch": 4, "steps": 4, "seed": 5, "threads": 1,
 "log": {"log_every": 1, "eval_every": 2, "eval_batches": 1}, "checkpoint": {"save_every": 2}}
JSON
"$NM_BIN" train --config train.json --out one --quiet --set data.cache_dir="$tmp/elsewhere" >one.log 2>&1 \
  || { cat one.log; fail "one process"; }
ls elsewhere/*-GPTDataset-description.txt >/dev/null || fail "no cache in the given data.cache_dir"
[ ! -e one/index_cache ] || fail "data.cache_dir given, yet RUN_DIR/index_cache was written"
nm_mpirun 2 "$NM_BIN" train --config train.json --out dp2 --quiet --set exit_interval=2 >dp2.log 2>&1 \
  || { cat dp2.log; fail "dp2 to step 2"; }
# train and valid split: 2 datasets, 4 files each
n=$(ls dp2/index_cache | wc -l)
[ "$n" = 8 ] || { ls -l dp2/index_cache; fail "RUN_DIR/index_cache holds $n files, expected 8"; }
stamps() { stat -c '%n %Y %s %i' dp2/index_cache/*; }
before=$(stamps)
sleep 1
nm_mpirun 2 "$NM_BIN" train --config train.json --out dp2 --quiet --resume >dp2r.log 2>&1 \
  || { cat dp2r.log; fail "dp2 resumed"; }
[ "$(stamps)" = "$before" ] || { echo "$before"; stamps; fail "the resume rebuilt the cache instead of mapping it"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" one/metrics.jsonl dp2/metrics.jsonl "dp2 on the cached index mappings"
# data.cache_per_node: the first rank of each node builds into its node's directory, the others
# map it. Two stand-in nodes on this machine (NM_NODE_NAME; ranks 0-1 and 2-3), each with a
# cache directory of its own as on node-local disks: each directory is built once (its
# builder says so; ranks 1 and 3 build nothing), and training equals one process.
cat > pernode.sh <<SH
#!/usr/bin/env bash
node=n\$(( \${OMPI_COMM_WORLD_RANK:-0} / 2 ))
NM_NODE_NAME=\$node exec "$NM_BIN" train --config train.json --out pernode --quiet --set data.cache_per_node=true \\
  --set global_batch=8 --set data.cache_dir="$tmp/local_\$node" --set exit_interval=2 2>"pernode.\${OMPI_COMM_WORLD_RANK:-0}.err"
SH
chmod +x pernode.sh
nm_mpirun 4 ./pernode.sh >pernode.log 2>&1 || { cat pernode.log pernode.*.err; fail "4 ranks on two stand-in nodes"; }
for r in 0 1 2 3; do
  built=$(awk '/built the index mappings/ {n++} END {print n + 0}' "pernode.$r.err")
  want=0; { [ "$r" = 0 ] || [ "$r" = 2 ]; } && want=2   # train and valid, by the node's first rank
  [ "$built" = "$want" ] || { cat "pernode.$r.err"; fail "rank $r built $built index mappings, expected $want"; }
done
for node in n0 n1; do
  n=$(ls "local_$node" | wc -l)
  [ "$n" = 8 ] || { ls -l "local_$node"; fail "node $node's cache holds $n files, expected 8"; }
done
"$NM_BIN" train --config train.json --out one8 --quiet --set global_batch=8 --set exit_interval=2 \
  --set data.cache_dir="$tmp/elsewhere" >one8.log 2>&1 || { cat one8.log; fail "one process, global batch 8"; }
"$PY" "$NM_ROOT/tests/dist/compare_runs.py" one8/metrics.jsonl pernode/metrics.jsonl "4 ranks, per-node index caches"
# a cache directory that cannot be made (a file in the way) is refused, naming the key
echo x > blocker
rc=0
"$NM_BIN" train --config train.json --out bad --quiet --set data.cache_dir="$tmp/blocker/sub" >bad.log 2>&1 || rc=$?
text=$(<bad.log)
[ "$rc" = 1 ] || { echo "$text"; fail "an impossible data.cache_dir exited $rc, expected 1"; }
[[ $text == *"data.cache_dir"*"blocker"* ]] || { echo "$text"; fail "the refusal does not name data.cache_dir and the path"; }
echo "test_data_cache: ok"
