"""test_tokenizer_hf.py: our byte-level BPE against Hugging Face `tokenizers`.

(a) A tokenizer trained by our CLI (`nanomegatron tokenizer train`) loads in HF and both
    encode a few hundred random strings to identical ids.
(b) Tokenizers trained by HF's BpeTrainer load in ours (through `tokenizer encode --jsonl`)
    and encode identically: GPT-2 style (ByteLevel pre-tokenizer; once with an lstrip/rstrip
    added token, once with add_prefix_space), DeepSeek-V3 style (Sequence of the three Split
    regexes of formats.md 4.5 plus ByteLevel(use_regex=false), its special tokens and two
    non-special added tokens), the same with legacy "a b" merges, and with ignore_merges=true.
Decoding: ours equals HF decode(ids, skip_special_tokens=False) (after HF's lossy UTF-8) and,
without a prefix space, gives back the exact input bytes.
Random strings are fresh each run (seed printed; NM_TEST_SEED=... reproduces). They avoid
NUL, surrogates and U+180E (formats.md 4.8 flags it as a possible PCRE2/Oniguruma \\s
difference; this tokenizers build agreed with us on it when checked).
Skips (77) only when `tokenizers` is not importable.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

try:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
except ImportError as e:  # pragma: no cover
    skip(f"{e}: scripts/deps.sh --with-venv installs tokenizers")

NM_BIN = os.environ.get("NM_BIN") or os.path.join(os.environ.get("NM_BUILD", "."), "nanomegatron")

# DeepSeek-V3 pre-tokenizer regexes (formats.md 4.5), as pattern text.
DSV3_R1 = r"\p{N}{1,3}"
DSV3_R2 = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
DSV3_R3 = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
           r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
DSV3_SPECIALS = ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                 "<\uff5c\u2581pad\u2581\uff5c>"]

WORDS = ["the", "and", "token", "izer", "Hello", "WORLD", "don't", "we'll", "I'm", "naïve", "café", "über",
         "straße", "москва", "привет", "αβγ", "東京", "我想在", "工作", "ひらがな", "カタカナ", "한국어",
         "مرحبا", "שלום", "हिन्दी", "😀", "👍🏽", "🇫🇷", "x²", "½", "∑", "→", "…", "«quote»", "e\u0301"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "--", "'s", "'t", "'re", "?!"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u3000", "\u00a0", "\u2003", "    \n"]
# Code-point blocks stable since long before Unicode 14 (PCRE2 10.42's tables).
BLOCKS = [(0x20, 0x7E), (0xA1, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
          (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F),
          (0x2000, 0x206F), (0x2190, 0x22FF), (0xFF01, 0xFF5E)]


def rand_string(rng, specials):
    parts = []
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(WORDS))
        elif r < 0.5:
            parts.append(rng.choice(SPACES))
        elif r < 0.6:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        elif r < 0.7:
            parts.append(rng.choice(PUNCT))
        elif r < 0.9:
            lo, hi = rng.choice(BLOCKS)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        elif r < 0.95 and specials:
            parts.append(rng.choice(specials))
        else:
            parts.append(" " * rng.randint(1, 20) + rng.choice(WORDS))
    return "".join(parts).replace("\u180e", " ")


def corpus(rng, n_bytes):
    docs, size = [], 0
    while size < n_bytes:
        doc = " ".join(rand_string(rng, []) for _ in range(rng.randint(5, 40)))
        docs.append(doc)
        size += len(doc.encode())
    return docs


def run(args):
    """Runs the CLI; on failure shows its stderr (the message names the problem)."""
    r = subprocess.run([NM_BIN] + args, capture_output=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr.decode(errors="replace"))
        raise RuntimeError(f"nanomegatron {' '.join(args[:2])} exited with {r.returncode}")
    return r.stdout


def ours_encode(tok_path, strings, tmp):
    path = os.path.join(tmp, "strings.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for s in strings:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    out = run(["tokenizer", "encode", "--tokenizer", tok_path, "--input", path, "--jsonl"]).decode()
    lines = out.splitlines()
    assert len(lines) == len(strings), (len(lines), len(strings))
    return [json.loads(line) for line in lines]


def ours_decode(tok_path, ids):
    return run(["tokenizer", "decode", "--tokenizer", tok_path, "--ids", ",".join(map(str, ids))])


def compare(name, tok_path, strings, tmp, exact_round_trip, rng):
    hf = Tokenizer.from_file(tok_path)
    want = [hf.encode(s, add_special_tokens=False).ids for s in strings]
    got = ours_encode(tok_path, strings, tmp)
    bad = [i for i in range(len(strings)) if want[i] != got[i]]
    for i in bad[:5]:
        print(f"{name}: MISMATCH on {strings[i]!r}\n  hf   {want[i]}\n  ours {got[i]}")
    assert not bad, f"{name}: {len(bad)} of {len(strings)} strings encode differently"
    # Decode: a sample through the CLI (one process each), the longest ones included.
    order = sorted(range(len(strings)), key=lambda i: -len(strings[i]))
    for i in order[:3] + rng.sample(order, 12):
        raw = ours_decode(tok_path, got[i])
        assert raw.decode("utf-8", "replace") == hf.decode(want[i], skip_special_tokens=False), (name, strings[i])
        if exact_round_trip:
            assert raw == strings[i].encode(), (name, strings[i], raw)
    n_tok = sum(len(x) for x in got)
    n_byte = sum(len(s.encode()) for s in strings)
    print(f"{name}: {len(strings)} strings, {n_byte} bytes -> {n_tok} tokens, identical to HF")


def hf_train(docs, pre, vocab, specials, normalizer=None):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def main():
    if not os.path.exists(NM_BIN):
        print(f"FAIL: {NM_BIN} not built")
        return 1
    seed = int(os.environ.get("NM_TEST_SEED", time.time_ns() % 2 ** 32))
    print(f"test_tokenizer_hf: seed {seed} (NM_TEST_SEED to reproduce)")
    rng = random.Random(seed)
    docs = corpus(rng, 150_000)
    with tempfile.TemporaryDirectory() as tmp:
        # (a) ours trained, HF loads
        text_path = os.path.join(tmp, "train.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write("<|endoftext|>".join(docs))
        ours_path = os.path.join(tmp, "ours.json")
        run(["tokenizer", "train", "--input", text_path, "--vocab-size", "1200", "--out", ours_path])
        hf = Tokenizer.from_file(ours_path)
        assert hf.get_vocab_size() == 1200, hf.get_vocab_size()
        assert hf.token_to_id("<|endoftext|>") == 1199
        strings = [rand_string(rng, ["<|endoftext|>"]) for _ in range(300)] + docs[:5]
        compare("ours-trained", ours_path, strings, tmp, True, rng)

        # (b) HF trained, ours loads
        gpt2 = hf_train(docs, pre_tokenizers.ByteLevel(add_prefix_space=False), 1000, ["<|endoftext|>"])
        gpt2.add_tokens([AddedToken("[mark]", lstrip=True, rstrip=True, normalized=False)])
        p = os.path.join(tmp, "gpt2.json")
        gpt2.save(p)
        strings = [rand_string(rng, ["<|endoftext|>", "[mark]"]) for _ in range(300)]
        compare("hf-gpt2", p, strings, tmp, False, rng)   # lstrip/rstrip swallow spaces

        gpt2p = hf_train(docs, pre_tokenizers.ByteLevel(add_prefix_space=True), 800, ["<|endoftext|>"])
        p = os.path.join(tmp, "gpt2_prefix.json")
        gpt2p.save(p)
        strings = [rand_string(rng, ["<|endoftext|>"]) for _ in range(200)]
        compare("hf-gpt2-prefix-space", p, strings, tmp, False, rng)

        dsv3_pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(DSV3_R1), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(DSV3_R2), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(DSV3_R3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        dsv3 = hf_train(docs, dsv3_pre, 1500, DSV3_SPECIALS, normalizers.Sequence([]))
        dsv3.add_tokens(["<think>", "</think>"])
        p = os.path.join(tmp, "dsv3.json")
        dsv3.save(p)
        js = json.load(open(p, encoding="utf-8"))
        assert js["pre_tokenizer"]["type"] == "Sequence" and len(js["pre_tokenizer"]["pretokenizers"]) == 4
        strings = [rand_string(rng, DSV3_SPECIALS + ["<think>", "</think>"]) for _ in range(300)]
        compare("hf-dsv3", p, strings, tmp, True, rng)

        # the same with legacy "a b" merges (byte-level tokens never contain a space)
        merges = js["model"]["merges"]
        if merges and isinstance(merges[0], list):
            js["model"]["merges"] = [" ".join(m) for m in merges]
        p2 = os.path.join(tmp, "dsv3_legacy.json")
        json.dump(js, open(p2, "w", encoding="utf-8"), ensure_ascii=False)
        compare("hf-dsv3-legacy-merges", p2, strings[:150], tmp, True, rng)

        js["model"]["ignore_merges"] = True
        p3 = os.path.join(tmp, "dsv3_ignore.json")
        json.dump(js, open(p3, "w", encoding="utf-8"), ensure_ascii=False)
        compare("hf-dsv3-ignore-merges", p3, strings[150:], tmp, True, rng)
    print("test_tokenizer_hf: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
