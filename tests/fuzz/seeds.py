#!/usr/bin/env python3
"""Seed corpora for the fuzz targets of tests/fuzz, made at test time from the repo's own files.

usage: seeds.py TARGET OUTDIR SOURCE_DIR
  indexed        the worked example of formats.md 1.5 (int32) and a uint16 index with an empty
                 document, each prefixed by its .bin size (2 bytes LE), so the fuzzer starts
                 from valid indices and mutates the fields the validator checks
  model_config   configs/*.json model configs and tests/data/*.json
  train_config   configs/*-train.json, each also with a few --set overrides (NUL-separated)
  safetensors    tiny files as the writer lays them out (F32, BF16, F16, F64, a scalar, an
                 empty tensor, metadata), written here by the format's rules (formats.md 2)
  tokenizer      a byte-level BPE tokenizer.json (256 byte tokens, a few merges, an added
                 special token) with and without a tokenizer_config.json
  trainer_json   trainer.json as checkpoint.c writes it, listing the fuzz target's fixed files
  planted        (check_runner.sh) a harmless input; the failing one is in corpus/planted
  planted_seed   (check_runner.sh) the failing input "PLANT" as a seed, for the fuzzing stage
"""
import glob
import json
import os
import struct
import sys
import zlib

target, out, src = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)


def put(name, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def is_train(p):
    return p.endswith("-train.json")


if target == "indexed":
    def idx(bin_size, dtype_code, lengths, pointers, docs):
        return (struct.pack("<H", bin_size) + b"MMIDIDX\0\0" + struct.pack("<QBQQ", 1, dtype_code, len(lengths), len(docs))
                + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
                + struct.pack(f"<{len(docs)}q", *docs))
    # .bin 28 bytes | int32 (code 4) | 2 sequences of 4 and 3 tokens | documents 0,1,2
    put("worked", idx(28, 4, [4, 3], [0, 16], [0, 1, 2]))
    # .bin 6 bytes | uint16 (code 8) | one sequence of 3 tokens | documents 0,0,1 (an empty first one)
    put("uint16", idx(6, 8, [3], [0], [0, 0, 1]))
elif target == "planted":
    put("harmless", b"hello")
elif target == "planted_seed":
    put("plant", b"PLANT")
elif target == "model_config":
    for p in sorted(glob.glob(f"{src}/configs/*.json") + glob.glob(f"{src}/tests/data/*.json")):
        if not is_train(p):
            put(os.path.basename(p), open(p, "rb").read())
elif target == "train_config":
    for p in sorted(glob.glob(f"{src}/configs/*-train.json")):
        text = open(p, "rb").read()
        put(os.path.basename(p), text)
        put(os.path.basename(p) + ".set", text + b"\0steps=5\0optimizer.lr=1e-3\0schedule.type=wsd\0model=null"
            b"\0init_from=hf/dir\0data.synthetic=false\0data.paths=[{\"prefix\": \"a/b\", \"weight\": 2}]\0precision=bf16")
elif target == "safetensors":
    def st(tensors, meta=True):
        hdr, blobs, at = {}, b"", 0
        if meta:
            hdr["__metadata__"] = {"format": "pt"}
        for name, dtype, shape, raw in tensors:
            hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
            blobs += raw
            at += len(raw)
        h = json.dumps(hdr).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + blobs
    put("f32", st([("a.weight", "F32", [2, 3], struct.pack("<6f", *range(6))),
                   ("b", "F32", [], struct.pack("<f", 1.5))]))
    put("mixed", st([("x", "BF16", [4], b"\x80\x3f" * 4), ("y", "F16", [2], b"\x00\x3c\x00\xbc"),
                     ("z", "F64", [1, 1], struct.pack("<d", -2.0)), ("e", "F32", [0, 5], b""),
                     ("i", "I32", [2], struct.pack("<2i", 7, -7))], meta=False))
    put("fp8", st([("w", "F8_E4M3", [2, 2], b"\x38\x38\x38\x38"), ("w_scale_inv", "F32", [1], struct.pack("<f", 1.0))]))
elif target == "tokenizer":
    # GPT-2's byte-to-unicode map (the ByteLevel alphabet).
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(bs, cs)}
    vocab = {byte_char[b]: b for b in range(256)}
    merges = [("H", "e"), ("l", "l"), ("He", "ll"), ("Ġ", "w"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eot = len(vocab)
    gpt2_re = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    put("bytelevel", json.dumps(tok, ensure_ascii=False))
    put("bytelevel_cfg", json.dumps(tok, ensure_ascii=False).encode() + b"\0" +
        json.dumps({"eos_token": {"content": "<|endoftext|>"}}).encode())
    # A Sequence pre-tokenizer (Split + ByteLevel without regex), as DeepSeek-V3's file has.
    tok2 = dict(tok)
    tok2["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gpt2_re}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok2["model"] = dict(tok["model"], merges=[[a, b] for a, b in merges])
    put("sequence", json.dumps(tok2, ensure_ascii=False))
elif target == "trainer_json":
    bodies = {"config.json": b"{}", "model.safetensors": b"m", "optim_m.safetensors": b"mm", "optim_v.safetensors": b"vvv"}
    def crc32c(data):   # CRC-32C (Castagnoli, reflected), as nm_crc32c
        c = 0xFFFFFFFF
        for b in data:
            c ^= b
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        return c ^ 0xFFFFFFFF
    assert crc32c(b"123456789") == 0xE3069283   # the standard check value
    files = {n: {"size": len(b), "crc32c": "%08x" % crc32c(b)} for n, b in bodies.items()}
    train_cfg = json.load(open(f"{src}/configs/tiny-train.json"))
    doc = {"format": 1, "step": 10, "tokens": 20480, "data_cursor": {"sample": 80}, "optimizer_step": 10,
           "skipped_steps": 0, "nan_streak": 0, "rng": {"seed": 1234, "generator": "splitmix64-counter"},
           "layout": {"data_parallel": 1, "tensor_parallel": 1, "expert_parallel": 1, "pipeline_parallel": 1},
           "tokenizer": "bytes", "train_config": train_cfg, "files": files}
    put("trainer", json.dumps(doc, indent=2))
    doc["train_config"] = None
    doc["tokenizer"] = "tok/tokenizer.json"
    put("trainer_null_config", json.dumps(doc))
else:
    sys.exit(f"seeds.py: unknown target {target}")
