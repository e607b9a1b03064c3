#!/usr/bin/env bash
# bench/prepare.sh: tokenising throughput, side by side in one run: `nanomegatron prepare` and
# Hugging Face `tokenizers` (Tokenizer.encode_batch, the Rust library's parallel batch path) on
# the same JSONL corpus with the same tokenizer.json and the same thread count; prints MB/s
# and tokens/s for both, ours over theirs, and checks that the ids are identical document by
# document (ours read back from the .bin/.idx). Information, not a test.
#
# Environment (defaults in brackets):
#   NM_BENCH_BUILD [build]          build directory holding nanomegatron (configured if absent)
#   NM_BENCH_THREADS [nproc]        threads for both (prepare --workers; RAYON_NUM_THREADS)
#   NM_BENCH_MB [32]                corpus size in MB: the repository's docs and sources as
#                                   paragraphs, repeated (real English and code, not random)
#   NM_BENCH_CORPUS                 a JSONL file of {"text": ...} to use instead
#   NM_BENCH_TOKENIZER              a tokenizer.json to use; default: one trained here by
#                                   `nanomegatron tokenizer train --vocab-size 16000` on the corpus
#   NM_BENCH_PYTHON                 python with tokenizers (default .venv/bin/python3)
#   NM_BENCH_KEEP                   keep the scratch directory (printed)
# The last line is `prepare_over_tokenizers=<ours/theirs MB/s>`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${NM_BENCH_BUILD:-build}
T=${NM_BENCH_THREADS:-$(nproc)}
MB=${NM_BENCH_MB:-32}
PY=${NM_BENCH_PYTHON:-$ROOT/.venv/bin/python3}
[ -x "$PY" ] || { echo "bench/prepare.sh: $PY not found: make test builds .venv (or set NM_BENCH_PYTHON)" >&2; exit 1; }
"$PY" -c "import tokenizers, numpy" || { echo "bench/prepare.sh: $PY lacks tokenizers/numpy (scripts/deps.sh --with-venv)" >&2; exit 1; }
[ -x "$BUILD/nanomegatron" ] || { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build "$BUILD" -j "$T" >/dev/null; }
BIN=$ROOT/$BUILD/nanomegatron
work=$(mktemp -d /tmp/nm_bench_prepare.XXXXXX)
[ -n "${NM_BENCH_KEEP:-}" ] && echo "scratch: $work" || trap 'rm -rf "$work"' EXIT

corpus=${NM_BENCH_CORPUS:-$work/corpus.jsonl}
if [ -z "${NM_BENCH_CORPUS:-}" ]; then
  "$PY" - "$ROOT" "$corpus" "$MB" <<'PY'
import glob, json, os, sys
root, out, mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
paras = []
for f in sorted(glob.glob(f"{root}/docs/*.md") + glob.glob(f"{root}/src/*/*.c") + glob.glob(f"{root}/README.md")):
    paras += [p for p in open(f, encoding="utf-8").read().split("\n\n") if p.strip()]
size, want = 0, mb * 1e6
with open(out, "w", encoding="utf-8") as w:
    while size < want:
        for p in paras:
            line = json.dumps({"text": p}, ensure_ascii=False) + "\n"
            w.write(line)
            size += len(line.encode())
            if size >= want:
                break
PY
fi
tok=${NM_BENCH_TOKENIZER:-$work/tokenizer.json}
if [ -z "${NM_BENCH_TOKENIZER:-}" ]; then
  "$PY" -c "
import json, sys
with open(sys.argv[2], 'w') as w:
    for i, line in enumerate(open(sys.argv[1])):
        if i >= 20000: break
        w.write(json.loads(line)['text'] + '\n\n')" "$corpus" "$work/train.txt"
  "$BIN" tokenizer train --input "$work/train.txt" --vocab-size 16000 --out "$tok" >/dev/null
fi
bytes=$(stat -c %s "$corpus")
echo "corpus: $corpus, $(awk "BEGIN{printf \"%.1f\", $bytes/1e6}") MB | tokenizer: $tok | threads: $T | load: $(cut -d' ' -f1-3 /proc/loadavg)"

start=$(date +%s.%N)
"$BIN" prepare --input "$corpus" --tokenizer "$tok" --out "$work/ours" --workers "$T" --no-progress >/dev/null
ours_s=$(awk "BEGIN{print $(date +%s.%N) - $start}")

RAYON_NUM_THREADS=$T "$PY" - "$corpus" "$tok" "$work/ours" "$bytes" "$ours_s" <<'PY'
import json, sys, time
import numpy as np
from tokenizers import Tokenizer
corpus, tok_path, ours, nbytes, ours_s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
t0 = time.perf_counter()
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
t1 = time.perf_counter()
tok = Tokenizer.from_file(tok_path)
encs = tok.encode_batch(texts, add_special_tokens=False)
t2 = time.perf_counter()
theirs_ids = [e.ids for e in encs]
# ours, read back: the .idx's sequence lengths split the .bin's tokens (one sequence per document)
idx = open(ours + ".idx", "rb").read()
code, n_seqs = idx[17], int.from_bytes(idx[18:26], "little")
lengths = np.frombuffer(idx, dtype="<i4", count=n_seqs, offset=34)
dtype = {8: "<u2", 4: "<i4"}[code]
toks = np.fromfile(ours + ".bin", dtype=dtype)
ends = np.cumsum(lengths)
ours_ids = np.split(toks, ends[:-1]) if n_seqs else []
# prepare drops documents that are empty after tokenisation from the sequences, not here
theirs_nonempty = [ids for ids in theirs_ids if ids]
same = len(ours_ids) == len(theirs_nonempty) and all(np.array_equal(a, b) for a, b in zip(ours_ids, theirs_nonempty))
n_tok = int(lengths.sum())
theirs_s = t2 - t1 + (t1 - t0)   # parsing the JSONL is part of both
print(f"{'':14s} {'seconds':>8s} {'MB/s':>8s} {'Mtok/s':>8s}")
print(f"{'prepare':14s} {ours_s:8.2f} {nbytes / 1e6 / ours_s:8.1f} {n_tok / 1e6 / ours_s:8.2f}   (read, tokenise, write .bin/.idx)")
print(f"{'tokenizers':14s} {theirs_s:8.2f} {nbytes / 1e6 / theirs_s:8.1f} {n_tok / 1e6 / theirs_s:8.2f}   "
      f"(json.loads {t1 - t0:.2f} s + encode_batch {t2 - t1:.2f} s; no output written)")
print(f"ids identical: {'yes' if same else 'NO'} ({len(ours_ids)} documents, {n_tok} tokens)")
print(f"prepare_over_tokenizers={theirs_s / ours_s:.3f}")
if not same:
    sys.exit(1)
PY
