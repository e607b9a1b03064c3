#!/usr/bin/env bash
# test_export_dist.sh: `export` of a run whose checkpoint two ranks wrote (expert parallel:
# model-0000k-of-00002.safetensors + model.safetensors.index.json). The f32 HF export must
# hold every tensor of the shards, bit for bit (read back with numpy from the raw files, not
# through our reader), and the GGUF export of the same run must be written and carry every layer.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail() { echo "FAIL: $*" >&2; exit 1; }

cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat > train.json <<'JSON'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 16384},
  "seq_len": 16, "micro_batch": 1, "global_batch": 2, "steps": 2, "seed": 5, "threads": 1,
  "optimizer": {"lr": 3e-3},
  "log": {"log_every": 1, "eval_every": 0},
  "checkpoint": {"save_every": 2}
}
JSON
export OMP_NUM_THREADS=1
nm_mpirun 2 "$NM_BIN" train --config train.json --out run --quiet --set expert_parallel_size=2 >train.log 2>&1 \
  || { cat train.log; fail "2-rank training"; }
ls run/step_000002/model-00002-of-00002.safetensors run/step_000002/model.safetensors.index.json >/dev/null \
  || { ls -R run; fail "no rank-sharded checkpoint"; }

"$NM_BIN" export --model run --format hf --dtype f32 --out hf >hf.log 2>&1 || { cat hf.log; fail "hf export of a rank-sharded run"; }
"$NM_BIN" export --model run --format gguf --dtype f32 --out m.gguf >gguf.log 2>&1 || { cat gguf.log; fail "gguf export"; }

"$PY" - <<'PY'
import json, struct, sys, glob, os
import numpy as np

def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", (path, k, v["dtype"])
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype="<f4").reshape(v["shape"])
    return out

index = json.load(open("run/step_000002/model.safetensors.index.json"))["weight_map"]
ckpt = {}
for shard in sorted(set(index.values())):
    for k, v in tensors(os.path.join("run/step_000002", shard)).items():
        assert index[k] == shard, (k, shard)
        assert k not in ckpt, k
        ckpt[k] = v
assert len(ckpt) == len(index), (len(ckpt), len(index))
files = glob.glob("hf/*.safetensors")
exp = {}
for f in files:
    exp.update(tensors(f))
missing = sorted(set(ckpt) - set(exp))
extra = sorted(set(exp) - set(ckpt))
if missing or extra:
    sys.exit(f"FAIL: names differ: missing {missing[:5]} extra {extra[:5]}")
bad = [k for k in ckpt if not np.array_equal(ckpt[k], exp[k])]
if bad:
    sys.exit(f"FAIL: {len(bad)} tensors differ, e.g. {bad[:3]}")
experts = [k for k in ckpt if ".mlp.experts." in k]
print(f"hf export of the 2-rank checkpoint: {len(ckpt)} tensors ({len(experts)} expert tensors from 2 shards) equal bit for bit: ok")
PY
grep -q 'blk.2.ffn_gate_exps' m.gguf || fail "gguf export lacks layer 2's experts"
echo "test_export_dist: ok"
