"""Megatron-LM compatibility of the data pipeline, against numpy re-implementations of
Megatron's own code paths (written from formats.md section 1, not from our C):

1. a pair written by a numpy copy of Megatron's IndexedDatasetBuilder/_IndexWriter (the
   worked example of formats.md 1.5 byte for byte, then random documents in int32 and
   uint16) is read by `nanomegatron inspect --data P --doc N`;
2. pairs written by `nanomegatron prepare` (plain text, JSONL with sentence lists,
   --append-eod) are parsed by a numpy copy of Megatron's _IndexReader (np.frombuffer at the
   documented offsets) and hold exactly the expected tokens;
3. the training samples of our loader (`inspect --samples`) equal Megatron's GPTDataset
   (RandomState(seed).shuffle of the int32 document_index, the build_sample_idx walk, the
   shuffled shuffle_index, separate final epoch) for several seeds, seq_lens, num_samples
   and both train and valid splits;
4. the index mappings our loader caches (`inspect --cache-dir`, train's data.cache_dir) are,
   read with numpy.load, Megatron's own arrays with Megatron's dtypes (int32 document_index
   and sample_index, uint32 shuffle_index at these sizes); a second run maps them without
   rebuilding; a truncated or foreign cache is rebuilt.

Needs numpy (exit 77 = skipped without it). Inputs are random, from a fresh seed that is
printed (NM_TEST_SEED reproduces a run).
"""
import json
import os
import random
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

try:
    import numpy as np
except ImportError:
    skip("numpy not available (apt-get install python3-numpy)")

NM_BIN = os.environ.get("NM_BIN")
if not NM_BIN or not os.path.exists(NM_BIN):
    skip(f"NM_BIN ({NM_BIN}) not set or missing: build it (make)")

SEED = int(os.environ.get("NM_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
print(f"test_megatron_compat: seed {SEED} (NM_TEST_SEED to reproduce)")
rnd = random.Random(SEED)

# ---------------------------------------------------------------------------------------------
# numpy copies of Megatron's IndexedDataset writer and reader (formats.md 1.2-1.4)

_MAGIC = b"MMIDIDX\x00\x00"
_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
_DTYPES = {v: k for k, v in _CODES.items()}


class Builder:
    """IndexedDatasetBuilder: .bin streamed, lists kept, .idx written by finalize."""

    def __init__(self, bin_path, dtype):
        self.f = open(bin_path, "wb")
        self.dtype = dtype
        self.sequence_lengths = []
        self.document_indices = [0]

    def add_document(self, tokens, lengths):
        self.f.write(np.array(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path):
        self.f.close()
        with open(idx_path, "wb") as w:
            w.write(_MAGIC)
            w.write(struct.pack("<Q", 1))
            w.write(struct.pack("<B", _CODES[self.dtype]))
            lengths = np.array(self.sequence_lengths, dtype=np.int32)
            itemsize = np.dtype(self.dtype).itemsize
            pointers = np.zeros(len(lengths), dtype=np.int64)
            if len(lengths) > 1:
                pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * itemsize)
            w.write(struct.pack("<Q", len(lengths)))
            w.write(struct.pack("<Q", len(self.document_indices)))
            w.write(lengths.tobytes(order="C"))
            w.write(pointers.tobytes(order="C"))
            w.write(np.array(self.document_indices, dtype=np.int64).tobytes(order="C"))


class Reader:
    """_IndexReader + IndexedDataset.get: header fields, then np.frombuffer at fixed offsets."""

    def __init__(self, prefix):
        buf = open(prefix + ".idx", "rb").read()
        assert buf[:9] == _MAGIC, "magic"
        assert struct.unpack("<Q", buf[9:17])[0] == 1, "version"
        self.dtype = _DTYPES[struct.unpack("<B", buf[17:18])[0]]
        S = struct.unpack("<Q", buf[18:26])[0]
        Dc = struct.unpack("<Q", buf[26:34])[0]
        off = 34
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=S, offset=off)
        off += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=S, offset=off)
        off += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=Dc, offset=off)
        assert off + self.document_indices.nbytes == len(buf), "idx size"
        assert self.document_indices[-1] == S
        self.bin = np.memmap(prefix + ".bin", mode="r", order="C")

    def get(self, i, offset=0, length=None):
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        itemsize = np.dtype(self.dtype).itemsize
        return np.frombuffer(self.bin, dtype=self.dtype, count=length,
                             offset=int(self.sequence_pointers[i]) + offset * itemsize)

    def document(self, d):
        a, b = int(self.document_indices[d]), int(self.document_indices[d + 1])
        parts = [self.get(i) for i in range(a, b)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def run(*args):
    p = subprocess.run([NM_BIN, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


def last_lines(out, n):
    return [json.loads(l) for l in out.strip().split("\n")[-n:]]


# ---------------------------------------------------------------------------------------------
# 1. Megatron-written pairs read by us

WORKED_IDX = bytes.fromhex(
    "4d4d4944494458000001000000000000"
    "00040200000000000000030000000000"
    "00000400000003000000000000000000"
    "00001000000000000000000000000000"
    "00000100000000000000020000000000"
    "0000")


def test_megatron_written(tmp):
    p = os.path.join(tmp, "worked")
    b = Builder(p + ".bin", np.int32)
    b.add_document([10, 11, 12, 1], [4])
    b.add_document([20, 21, 1], [3])
    b.finalize(p + ".idx")
    got = open(p + ".idx", "rb").read()
    assert got == WORKED_IDX, f"numpy writer disagrees with formats.md 1.5:\n{got.hex()}"
    assert open(p + ".bin", "rb").read() == np.array([10, 11, 12, 1, 20, 21, 1], "<i4").tobytes()
    assert last_lines(run("inspect", "--data", p, "--doc", "1"), 1)[0] == [20, 21, 1]

    for dtype, hi in ((np.int32, 200000), (np.uint16, 65535)):
        p = os.path.join(tmp, f"meg_{np.dtype(dtype).name}")
        b = Builder(p + ".bin", dtype)
        docs = []
        for _ in range(rnd.randrange(20, 60)):
            n_sent = rnd.choice([0, 1, 1, 1, 2, 3])
            lengths = [rnd.randrange(1, 40) for _ in range(n_sent)]
            toks = [rnd.randrange(0, hi + 1) for _ in range(sum(lengths))]
            b.add_document(toks, lengths)
            docs.append(toks)
        b.finalize(p + ".idx")
        for d in rnd.sample(range(len(docs)), 8) + [len(docs) - 1]:
            got = last_lines(run("inspect", "--data", p, "--doc", str(d)), 1)[0]
            assert got == docs[d], f"{np.dtype(dtype).name} document {d}: {got[:10]} != {docs[d][:10]}"
    print("1. Megatron-written pairs: ok")


# ---------------------------------------------------------------------------------------------
# 2. our pairs read by Megatron's reader

WORDS = ["alpha", "beta", "gamma", "delta", "héllo", "naïve", "zeta", "x", "quick", "fox"]


def random_text_block():
    lines = []
    for _ in range(rnd.randrange(1, 4)):
        lines.append(" ".join(rnd.choice(WORDS) for _ in range(rnd.randrange(1, 9))))
    return "\n".join(lines)


def test_ours_read_by_megatron(tmp):
    # Plain text: blocks separated by blank lines (one with spaces), --append-eod.
    blocks = [random_text_block() for _ in range(rnd.randrange(30, 80))]
    text = ""
    for i, blk in enumerate(blocks):
        text += blk + "\n" + rnd.choice(["\n", "  \n", "\n\n\n"])
    src = os.path.join(tmp, "plain.txt")
    with open(src, "w", encoding="utf-8") as f:
        f.write(text)
    p = os.path.join(tmp, "ours_plain")
    run("prepare", "--input", src, "--tokenizer", "bytes", "--out", p, "--append-eod", "--workers", "2")
    r = Reader(p)
    assert r.dtype == np.uint16, r.dtype   # vocab 257 < 65500: optimal_dtype = uint16
    assert len(r.document_indices) == len(blocks) + 1
    for d, blk in enumerate(blocks):
        want = list(blk.encode("utf-8")) + [256]
        got = r.document(d).tolist()
        assert got == want, f"plain document {d}: {got[:12]} != {want[:12]}"

    # JSONL: strings and sentence lists; empty sentences dropped, EOD on the last sentence.
    src = os.path.join(tmp, "docs.jsonl")
    want_docs, want_lens = [], []
    with open(src, "w", encoding="utf-8") as f:
        for _ in range(rnd.randrange(30, 80)):
            if rnd.random() < 0.5:
                s = random_text_block() if rnd.random() < 0.9 else ""
                f.write(json.dumps({"id": 1, "text": s}) + "\n")
                sents = [s]
            else:
                sents = [rnd.choice(["", random_text_block()]) for _ in range(rnd.randrange(1, 4))]
                f.write(json.dumps({"text": sents, "meta": {"a": [1, 2]}}) + "\n")
            ids = [list(s.encode("utf-8")) for s in sents if s]
            if ids:
                ids[-1].append(256)
            want_docs.append([t for s in ids for t in s])
            want_lens.append([len(s) for s in ids])
            if rnd.random() < 0.1:
                f.write("\n")   # blank lines are skipped
    p = os.path.join(tmp, "ours_jsonl")
    run("prepare", "--input", src, "--tokenizer", "bytes", "--out", p, "--append-eod")
    r = Reader(p)
    assert len(r.document_indices) == len(want_docs) + 1
    for d in range(len(want_docs)):
        a, b = int(r.document_indices[d]), int(r.document_indices[d + 1])
        assert r.sequence_lengths[a:b].tolist() == want_lens[d], f"jsonl document {d} sentence lengths"
        assert r.document(d).tolist() == want_docs[d], f"jsonl document {d} tokens"

    # A bad JSONL line is an error naming file:line.
    bad = os.path.join(tmp, "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"text": "ok"}\n{"text": 3}\n')
    proc = subprocess.run([NM_BIN, "prepare", "--input", bad, "--tokenizer", "bytes", "--out", os.path.join(tmp, "bad")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "bad.jsonl:2" in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(tmp, "bad.idx")), "a failed prepare left an index"
    print("2. our pairs read by Megatron's reader: ok")


# ---------------------------------------------------------------------------------------------
# 3. GPTDataset sample order (megatron/core/datasets/gpt_dataset.py + helpers.cpp)

def megatron_split(split, N, which):
    w = np.array(split, dtype=np.float64)
    w = (w / np.sum(w)).tolist()
    ends = [0.0]
    for v in w:
        ends.append(ends[-1] + v)
    return np.arange(int(round(ends[which] * float(N))), int(round(ends[which + 1] * float(N))), dtype=np.int32)


def build_document_index(documents, num_epochs, rs, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        d = np.mgrid[0:num_epochs, 0:len(documents)][1]
        d[:] = documents
        d = d.reshape(-1).astype(np.int32)
        rs.shuffle(d)
        return d
    first = build_document_index(documents, num_epochs - 1, rs, False)
    last = build_document_index(documents, 1, rs, False)
    return np.concatenate((first, last))


def build_sample_idx(sizes, document_index, L, num_epochs, tokens_per_epoch, x):
    n = (num_epochs * tokens_per_epoch - x) // L
    out = np.zeros((n + 1, 2), dtype=np.int64)
    di, off = 0, 0
    for s in range(1, n + 1):
        remaining = L + x
        while remaining != 0:
            length = int(sizes[document_index[di]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - x
                remaining = 0
            else:
                if di == len(document_index) - 1:
                    off = int(sizes[document_index[di]]) - x
                    break
                di += 1
                off = 0
        out[s] = (di, off)
    return out


def build_shuffle_index(num_samples, total_size, rs):
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rs.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rs.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset:
    def __init__(self, reader, split, which, L, seed, num_samples, x=1):
        self.r, self.L, self.x = reader, L, x
        sizes = reader.sequence_lengths
        indices = megatron_split(split, len(sizes), which)
        T = int(np.sum(sizes[indices]))
        E, tokens = 1, T
        while tokens < num_samples * L + x:
            tokens += T
            E += 1
        separate = False
        if E > 1:
            per_epoch = (T - x) // L
            final = num_samples - (((E - 1) * T - x) // L)
            separate = final < int(0.80 * per_epoch)
        rs = np.random.RandomState(seed)
        self.document_index = build_document_index(indices, E, rs, separate)
        self.sample_index = build_sample_idx(sizes, self.document_index, L, E, T, x)
        n = self.sample_index.shape[0] - 1
        n_first = ((E - 1) * T - x) // L if separate else n
        self.shuffle_index = build_shuffle_index(n_first, n, rs)
        self.E, self.separate, self.n = E, separate, n

    def __getitem__(self, i):
        j = self.shuffle_index[i]
        d0, o0 = self.sample_index[j]
        d1, o1 = self.sample_index[j + 1]
        if d0 == d1:
            parts = [self.r.get(self.document_index[d0], offset=int(o0), length=int(o1 - o0 + self.x))]
        else:
            parts = []
            for d in range(d0, d1 + 1):
                off = 0 if d > d0 else int(o0)
                length = None if d < d1 else int(o1 + self.x)
                parts.append(self.r.get(self.document_index[d], offset=off, length=length))
        return np.concatenate(parts).astype(np.int64).tolist()


def test_sample_order(tmp):
    # A corpus with documents of very different lengths (some empty after EOD: none; some tiny).
    src = os.path.join(tmp, "corpus.jsonl")
    with open(src, "w") as f:
        for _ in range(300):
            n = rnd.choice([1, 3, 20, 100, 400])
            f.write(json.dumps({"text": "".join(rnd.choice("abcdefgh \n") for _ in range(rnd.randrange(1, n + 1)))}) + "\n")
    p = os.path.join(tmp, "corpus")
    run("prepare", "--input", src, "--tokenizer", "bytes", "--out", p, "--append-eod")
    r = Reader(p)
    kinds = set()
    cases = [(rnd.randrange(1 << 31), rnd.choice([7, 32, 64, 128]), which, mult)
             for which in (0, 1) for mult in (0.0, 0.5, 2.1, 2.75, 3.95)]
    cases.append((1234, 64, 0, 1.0))
    for seed, L, which, mult in cases:
        split = [95, 5, 0]
        idx = megatron_split(split, len(r.sequence_lengths), which)
        per_epoch = (int(np.sum(r.sequence_lengths[idx])) - 1) // L
        num_samples = int(mult * per_epoch)
        ref = GPTDataset(r, split, which, L, seed, num_samples)
        kinds.add((ref.E > 1, ref.separate))
        K = min(12, ref.n)   # a small valid split may hold fewer samples than that
        starts = [0]
        if num_samples > K:
            starts.append(num_samples - K)   # the tail: the separate final epoch when there is one
        for start in starts:
            out = run("inspect", "--data", p, "--samples", str(K), "--start", str(start), "--seq-len", str(L),
                      "--seed", str(seed), "--num-samples", str(num_samples), "--split", "95,5,0",
                      "--which", ["train", "valid"][which])
            got = last_lines(out, K)
            for k in range(K):
                want = ref[start + k]
                assert got[k] == want, (f"seed {seed} L {L} split {which} num_samples {num_samples} "
                                        f"(E {ref.E}, separate {ref.separate}): sample {start + k} differs:\n"
                                        f"  ours     {got[k][:16]}\n  megatron {want[:16]}")
    assert (True, True) in kinds and (True, False) in kinds and (False, False) in kinds, kinds
    print(f"3. GPTDataset sample order: ok ({len(cases)} configurations)")
    test_cache(tmp, p, r, cases)
    test_blend_cache(tmp, p)


def cache_files(d):
    names = sorted(os.listdir(d))
    assert len(names) == 4, names
    prefix = names[0].split("-GPTDataset-")[0]
    return {k: os.path.join(d, f"{prefix}-GPTDataset-{k}.npy") for k in ("document_index", "sample_index", "shuffle_index")}


def test_cache(tmp, p, r, cases):
    for n, (seed, L, which, mult) in enumerate(cases):
        split = [95, 5, 0]
        idx = megatron_split(split, len(r.sequence_lengths), which)
        num_samples = int(mult * ((int(np.sum(r.sequence_lengths[idx])) - 1) // L))
        ref = GPTDataset(r, split, which, L, seed, num_samples)
        d = os.path.join(tmp, f"cache{n}")
        args = ("inspect", "--data", p, "--samples", "2", "--seq-len", str(L), "--seed", str(seed), "--num-samples",
                str(num_samples), "--split", "95,5,0", "--which", ["train", "valid"][which], "--cache-dir", d)
        first = last_lines(run(*args), 2)
        files = cache_files(d)
        got = {k: np.load(f) for k, f in files.items()}
        # Megatron's dtypes: sample_index int32 while max(len(document_index), max(sizes)) fits
        # int32, shuffle_index uint32 while n < 2^32 - 1; document_index always int32
        assert got["document_index"].dtype == np.int32 and got["sample_index"].dtype == np.int32, got
        assert got["shuffle_index"].dtype == np.uint32, got["shuffle_index"].dtype
        assert np.array_equal(got["document_index"], ref.document_index), f"case {n}: document_index differs"
        assert np.array_equal(got["sample_index"], ref.sample_index), f"case {n}: sample_index differs"
        assert np.array_equal(got["shuffle_index"], ref.shuffle_index), f"case {n}: shuffle_index differs"
        # reused: a second run maps the files (untouched) and gives the same samples
        stamps = {k: os.stat(f).st_mtime_ns for k, f in files.items()}
        assert last_lines(run(*args), 2) == first
        assert {k: os.stat(f).st_mtime_ns for k, f in files.items()} == stamps, f"case {n}: cache rebuilt"
    # a truncated array is rebuilt, never read (same samples, full size again)
    with open(files["sample_index"], "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(size - 8)
    assert last_lines(run(*args), 2) == first
    assert os.path.getsize(files["sample_index"]) == size, "a truncated cache was not rebuilt"
    # a cache written for another dataset under the same name (description differs) is rebuilt
    desc = files["sample_index"].replace("sample_index.npy", "description.txt")
    with open(desc, "a") as f:
        f.write(" ")
    assert last_lines(run(*args), 2) == first
    assert open(desc).read().endswith("}\n"), "a cache with another description was trusted"
    print(f"4. index mappings cached as Megatron's arrays, reused, rebuilt when truncated or foreign: ok "
          f"({len(cases)} configurations)")


# megatron/core/datasets/helpers.cpp build_blending_indices, written from it independently:
# sample s goes to the dataset with the largest w_i * max(s, 1) - count_i (the first on ties).
def build_blending_indices(weights, size):
    w = np.array(weights, dtype=np.float64)
    w = w / np.sum(w)
    counts = [0] * len(w)
    di, dsi = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
    for s in range(size):
        t = max(float(s), 1.0)
        best, best_err = 0, w[0] * t - counts[0]
        for i in range(1, len(w)):
            e = w[i] * t - counts[i]
            if e > best_err:
                best, best_err = i, e
        di[s], dsi[s] = best, counts[best]
        counts[best] += 1
    return di, dsi


def test_blend_cache(tmp, p):
    """The blend's index mappings (BlendedDataset's dataset_index and dataset_sample_index) in the
    cache equal Megatron's builder for two weightings; a second run maps them; a foreign one is
    rebuilt."""
    for n, (weights, size) in enumerate((([0.3, 0.7], 2000), ([5, 1, 2], 3001))):
        d = os.path.join(tmp, f"blend{n}")
        data = " ".join(f"{w} {p}" for w in weights)
        args = ("inspect", "--data", data, "--samples", "3", "--start", str(size - 2), "--seq-len", "16",
                "--num-samples", str(size), "--cache-dir", d)
        first = last_lines(run(*args), 3)
        names = [x for x in os.listdir(d) if "-BlendedDataset-" in x]
        assert len(names) == 3, names
        stem = os.path.join(d, names[0].split("-BlendedDataset-")[0] + "-BlendedDataset-")
        di, dsi = np.load(stem + "dataset_index.npy"), np.load(stem + "dataset_sample_index.npy")
        # Megatron's blend size for a split of `size` samples: sum_i ceil(size * w_i) (formats.md 1.8)
        w = np.array(weights, dtype=np.float64) / np.sum(np.array(weights, dtype=np.float64))
        ref_di, ref_dsi = build_blending_indices(weights, int(sum(int(np.ceil(size * x)) for x in w)))
        assert di.dtype == np.int16 and dsi.dtype == np.int64, (di.dtype, dsi.dtype)
        assert np.array_equal(di, ref_di) and np.array_equal(dsi, ref_dsi), f"blend {weights}: arrays differ"
        stamp = os.stat(stem + "dataset_index.npy").st_mtime_ns
        assert last_lines(run(*args), 3) == first
        assert os.stat(stem + "dataset_index.npy").st_mtime_ns == stamp, f"blend {weights}: cache rebuilt"
    with open(stem + "description.txt", "a") as f:
        f.write(" ")
    proc = subprocess.run([NM_BIN, *args], capture_output=True, text=True)
    assert proc.returncode == 0 and "describes another blend" in proc.stderr, proc.stderr
    assert last_lines(proc.stdout, 3) == first
    print("5. the blend's index mappings cached as Megatron's BlendedDataset arrays, reused, a foreign one "
          "rebuilt with a notice: ok (2 weightings)")


def main():
    with tempfile.TemporaryDirectory(prefix="nm_megatron_compat_") as tmp:
        test_megatron_written(tmp)
        test_ours_read_by_megatron(tmp)
        test_sample_order(tmp)
    print("test_megatron_compat: ok")


if __name__ == "__main__":
    main()
