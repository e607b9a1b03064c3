#!/usr/bin/env bash
# test_prepare.sh: `nanomegatron prepare` and `inspect --data` end to end.
#  - plain text blocks -> one document each, tokens = the block's bytes (+ EOD 256);
#  - the output does not depend on --workers; --doc-per-file; JSONL with a bad line fails
#    naming file:line and leaves no files; --synthetic; a truncated index is refused naming
#    the field; no temporary files are left behind; .gz / .zst inputs streamed in chunks give
#    the plain files' output byte for byte, name a bad line and refuse a truncated stream;
#  - prints the throughput on a few MB of generated text (information, not a check).
# Env: NM_BIN (the binary), NM_PYTHON (any python3, used to build inputs and check JSON).
set -euo pipefail
BIN=${NM_BIN:?NM_BIN not set}
PY=${NM_PYTHON:-python3}
work=$(mktemp -d test_prepare.XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

seed=${NM_TEST_SEED:-$RANDOM$RANDOM}
echo "test_prepare: seed $seed (NM_TEST_SEED to reproduce)"

# Random text: blocks of lines separated by one or more blank (or whitespace-only) lines.
"$PY" - "$work" "$seed" <<'PYEOF'
import json, random, sys
work, seed = sys.argv[1], int(sys.argv[2])
r = random.Random(seed)
words = ["the", "king", "said", "to", "his", "fool", "naïve", "café", "x", "And", "so", "on,"]
blocks = []
for _ in range(r.randrange(100, 300)):
    lines = [" ".join(r.choice(words) for _ in range(r.randrange(1, 12))) for _ in range(r.randrange(1, 5))]
    blocks.append("\n".join(lines))
text = ""
for b in blocks:
    text += b + "\n" + r.choice(["\n", "\n\n", " \t\n", "\r\n"])
open(f"{work}/in.txt", "w", encoding="utf-8").write(text)
json.dump([list(b.encode("utf-8")) for b in blocks], open(f"{work}/want.json", "w"))
# A few MB for the throughput line.
big = (text * (1 + 4_000_000 // max(1, len(text))))
open(f"{work}/big.txt", "w", encoding="utf-8").write(big)
PYEOF

n_blocks=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$work/want.json")

# 1. plain text, --append-eod
"$BIN" prepare --input "$work/in.txt" --tokenizer bytes --out "$work/a" --append-eod --workers 1 > "$work/prep.log"
grep -q "$n_blocks documents" "$work/prep.log" || fail "prepare summary: $(cat "$work/prep.log") (want $n_blocks documents)"
for d in 0 $((n_blocks / 2)) $((n_blocks - 1)); do
  "$BIN" inspect --data "$work/a" --doc "$d" > "$work/doc.out"
  "$PY" - "$work" "$d" <<'PYEOF' || fail "document $d differs"
import json, sys
work, d = sys.argv[1], int(sys.argv[2])
want = json.load(open(f"{work}/want.json"))[d] + [256]
got = json.loads(open(f"{work}/doc.out").read().strip().split("\n")[-1])
sys.exit(0 if got == want else 1)
PYEOF
done
grep -q "dtype uint16" "$work/doc.out" || fail "byte tokenizer data should be uint16: $(head -2 "$work/doc.out")"

# 2. the worker count does not change the output
"$BIN" prepare --input "$work/in.txt" --tokenizer bytes --out "$work/b" --append-eod --workers 2 > /dev/null
cmp -s "$work/a.bin" "$work/b.bin" && cmp -s "$work/a.idx" "$work/b.idx" || fail "--workers 1 and 2 differ"

# 3. --doc-per-file: two files, two documents
"$BIN" prepare --input "$work/in.txt" "$work/want.json" --tokenizer bytes --out "$work/c" --doc-per-file --jsonl > /dev/null 2>&1 \
  && fail "--jsonl on a JSON array file should fail"
printf 'hello\n\nworld\n' > "$work/f1.txt"
printf 'second file' > "$work/f2.txt"
"$BIN" prepare --input "$work/f1.txt" "$work/f2.txt" --tokenizer bytes --out "$work/c" --doc-per-file > /dev/null
"$BIN" inspect --data "$work/c" --doc 1 > "$work/c.out"
grep -q "2 documents" "$work/c.out" || fail "--doc-per-file: $(head -1 "$work/c.out")"
[ "$(tail -n 1 "$work/c.out")" = "[115,101,99,111,110,100,32,102,105,108,101]" ] || fail "--doc-per-file doc 1: $(tail -n 1 "$work/c.out")"

# 4. JSONL with a bad line: error names file:line, no output appears
printf '{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n' > "$work/bad.jsonl"
if "$BIN" prepare --input "$work/bad.jsonl" --tokenizer bytes --out "$work/bad" 2> "$work/bad.err"; then fail "bad JSONL accepted"; fi
grep -q "bad.jsonl:3" "$work/bad.err" || fail "bad JSONL message: $(cat "$work/bad.err")"
[ ! -e "$work/bad.bin" ] && [ ! -e "$work/bad.idx" ] || fail "failed prepare left output files"
if "$BIN" prepare --input "$work/missing.txt" --tokenizer bytes --out "$work/m" 2> "$work/m.err"; then fail "missing input accepted"; fi
grep -q "missing.txt" "$work/m.err" || fail "missing input message: $(cat "$work/m.err")"

# 5. synthetic corpus
"$BIN" prepare --synthetic 100000 --out "$work/syn" --seed 3 > "$work/syn.log"
grep -q "entropy floor" "$work/syn.log" || fail "synthetic summary: $(cat "$work/syn.log")"
"$BIN" inspect --data "$work/syn" > "$work/syn.out"
tokens=$(sed -n 's/.* documents (0 empty), \([0-9]*\) tokens.*/\1/p' "$work/syn.out")
[ -n "$tokens" ] && [ "$tokens" -ge 100000 ] || fail "synthetic tokens: $(head -1 "$work/syn.out")"

# 6. a truncated index is refused, naming the field and the file
head -c 50 "$work/a.idx" > "$work/t.idx"
cp "$work/a.bin" "$work/t.bin"
if "$BIN" inspect --data "$work/t" 2> "$work/t.err"; then fail "truncated index accepted"; fi
grep -q "t.idx: truncated index" "$work/t.err" || fail "truncated index message: $(cat "$work/t.err")"

# 7. nothing temporary left behind
# (Not `ls | grep -q`: under pipefail grep's early exit can kill ls with SIGPIPE, and the
# failed pipeline then reads as "nothing found".)
listing=$(ls "$work")
if [[ $listing == *.tmp.* ]]; then fail "temporary files left: $listing"; fi

# 8. compressed corpora, streamed in 4 MiB chunks (src/data/prepare.c): .jsonl.gz, .jsonl.zst and
# .txt.gz of files larger than a chunk (documents and blocks cross the chunk boundaries) give
# the plain files' .bin/.idx byte for byte; a bad JSONL line past the first chunk is named with
# its line number; truncated streams are refused naming the file.
"$PY" - "$work" "$seed" <<'PYEOF'
import gzip, json, random, sys
work, seed = sys.argv[1], int(sys.argv[2])
r = random.Random(seed)
with open(f"{work}/z.jsonl", "w") as f:
    for _ in range(24000):
        f.write(json.dumps({"text": "".join(r.choice("abcdefgh \n") for _ in range(r.randrange(1, 700)))}) + "\n")
with open(f"{work}/z.txt", "w") as f:
    for _ in range(40000):
        f.write("".join(r.choice("abcdefgh ") for _ in range(r.randrange(1, 250))) + ("\n\n" if r.random() < 0.3 else "\n"))
for name in ("z.jsonl", "z.txt"):
    with open(f"{work}/{name}", "rb") as src, gzip.open(f"{work}/{name}.gz", "wb") as dst:
        dst.write(src.read())
lines = open(f"{work}/z.jsonl").read().splitlines()
lines[20000] = '{"text": '
with gzip.open(f"{work}/bad.jsonl.gz", "wt") as f:
    f.write("\n".join(lines) + "\n")
PYEOF
command -v zstd >/dev/null || fail "the zstd tool is missing (apt-get install zstd; scripts/deps.sh installs it)"
zstd -q -f "$work/z.jsonl" -o "$work/z.jsonl.zst"
[ "$(stat -c %s "$work/z.jsonl")" -gt $((2 * 4194304)) ] || fail "the JSONL input does not span several 4 MiB chunks"
for f in z.jsonl z.jsonl.gz z.jsonl.zst z.txt z.txt.gz; do
  "$BIN" prepare --input "$work/$f" --tokenizer bytes --out "$work/o_$f" --append-eod --no-progress > "$work/o_$f.log" 2>&1 \
    || { cat "$work/o_$f.log"; fail "prepare $f"; }
done
for f in z.jsonl.gz z.jsonl.zst; do
  cmp "$work/o_z.jsonl.bin" "$work/o_$f.bin" && cmp "$work/o_z.jsonl.idx" "$work/o_$f.idx" || fail "$f differs from z.jsonl"
done
cmp "$work/o_z.txt.bin" "$work/o_z.txt.gz.bin" && cmp "$work/o_z.txt.idx" "$work/o_z.txt.gz.idx" || fail "z.txt.gz differs from z.txt"
# a pipe streams the same way (it used to be read whole into memory)
"$BIN" prepare --input <(cat "$work/z.jsonl") --jsonl --tokenizer bytes --out "$work/o_pipe" --append-eod --no-progress \
  > "$work/o_pipe.log" 2>&1 || { cat "$work/o_pipe.log"; fail "prepare from a pipe"; }
cmp "$work/o_z.jsonl.bin" "$work/o_pipe.bin" && cmp "$work/o_z.jsonl.idx" "$work/o_pipe.idx" || fail "a pipe differs from the file"
if "$BIN" prepare --input "$work/bad.jsonl.gz" --tokenizer bytes --out "$work/o_bad" --no-progress 2> "$work/bad.err"; then
  fail "a bad line in a .gz accepted"; fi
grep -q "bad.jsonl.gz:20001: not valid JSON" "$work/bad.err" || fail "bad line message: $(cat "$work/bad.err")"
head -c 300000 "$work/z.jsonl.gz" > "$work/t.jsonl.gz"
head -c 300000 "$work/z.jsonl.zst" > "$work/t.jsonl.zst"
for f in t.jsonl.gz t.jsonl.zst; do
  if "$BIN" prepare --input "$work/$f" --tokenizer bytes --out "$work/o_$f" --no-progress 2> "$work/$f.err"; then
    fail "truncated $f accepted"; fi
  grep -q "$f: .*truncated" "$work/$f.err" || fail "truncated $f message: $(cat "$work/$f.err")"
done
echo "streamed inputs: .jsonl.gz, .jsonl.zst, .txt.gz and a pipe equal the plain files; bad line and truncation named: ok"

# 9. merge, as Megatron's merge_datasets.py: z.jsonl and z.txt prepared apart and merged equal
# them prepared together, byte for byte (by prefixes, and by a directory of the two).
"$BIN" prepare --input "$work/z.jsonl" "$work/z.txt" --tokenizer bytes --out "$work/both" --append-eod --no-progress \
  > "$work/both.log" 2>&1 || { cat "$work/both.log"; fail "prepare both"; }
"$BIN" merge --input "$work/o_z.jsonl" "$work/o_z.txt" --out "$work/merged" > "$work/merge.log" 2>&1 \
  || { cat "$work/merge.log"; fail "merge"; }
cmp "$work/both.bin" "$work/merged.bin" && cmp "$work/both.idx" "$work/merged.idx" || fail "merge differs from preparing both"
mkdir "$work/pair"
cp "$work/o_z.jsonl.bin" "$work/pair/1.bin"; cp "$work/o_z.jsonl.idx" "$work/pair/1.idx"
cp "$work/o_z.txt.bin" "$work/pair/2.bin"; cp "$work/o_z.txt.idx" "$work/pair/2.idx"
"$BIN" merge --input "$work/pair" --out "$work/merged_dir" > "$work/merge2.log" 2>&1 || { cat "$work/merge2.log"; fail "merge DIR"; }
cmp "$work/both.bin" "$work/merged_dir.bin" && cmp "$work/both.idx" "$work/merged_dir.idx" || fail "merge of a directory differs"
if "$BIN" merge --input "$work/nothing_here" --out "$work/m3" 2> "$work/m3.err"; then fail "merge of a missing dataset accepted"; fi
grep -q "nothing_here" "$work/m3.err" || fail "merge of a missing dataset: $(cat "$work/m3.err")"
echo "merge: two datasets merged equal them prepared together (prefixes and a directory): ok"

# Throughput (information only)
"$BIN" prepare --input "$work/big.txt" --tokenizer bytes --out "$work/big" --no-progress | sed 's/^/throughput: /'
echo "test_prepare: ok"
