#!/usr/bin/env python3
"""Seed corpora for the fuzz targets of tests/fuzz, made at test time from the repo's own files.

usage: seeds.py TARGET OUTDIR SOURCE_DIR
  indexed        the worked example of formats.md 1.5 (int32) and a uint16 index with an empty
                 document, each prefixed by its .bin size (2 bytes LE), so the fuzzer starts
                 from valid indices and mutates the fields the validator checks
  model_config   configs/*.json model configs and tests/data/*.json
  train_config   configs/*-train.json, each also with a few --set overrides (NUL-separated), and
                 tiny-train.json with data.paths lists of 0, 1, 65, 1000 and 5000 weighted entries
                 (the last two need the target's max_len of 256 KiB, tests.cmake)
  safetensors    tiny files as the writer lays them out (F32, BF16, F16, F64, a scalar, an
                 empty tensor, metadata), written here by the format's rules (formats.md 2)
  tokenizer      a byte-level BPE tokenizer.json (256 byte tokens, a few merges, an added
                 special token) with and without a tokenizer_config.json
  trainer_json   trainer.json as checkpoint.c writes it, listing the fuzz target's fixed files
  hf_index       model.safetensors.index.json for fuzz_hf_index's two fixed shards (TINY_ROWS):
                 the correct weight_map and a few wrong ones (wrong shard, missing entry, a
                 missing shard, a path outside the directory)
  quant_config   the fixture model's config.json with DeepSeek's quantization_config and
                 variants (other block sizes, methods, formats, malformed weight_block_size)
  fp8_block      2 bytes of weight_block_size, then a model.safetensors of the fixture model with
                 F8_E4M3 matrices and their '_scale_inv' block scales (128 x 128, small and
                 non-dividing blocks, BF16 scales, a wrong scale shape or dtype, a 1-D F8 tensor)
  kernels_json   kernels.json as src/ops/cpu/tuning.c writes it (fuzz_kernels_json.c's key), another
                 run's, and a few refusals
  pipeline_layout 4 bytes (pipeline ranks, virtual stages, decoder and MTP layers), then a
                 pipeline_model_parallel_layout string: the docs' and tests' layouts, interleaved
                 ones, DeepSeek-V3's 61 layers on 16 stages, and refusals
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


def st(tensors, meta=True):
    """A safetensors file of (name, dtype, shape, raw bytes) tensors, as the writer lays it out."""
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


# The fixture model of tests/fuzz/fuzz_hf.h (FUZZ_HF_CONFIG: one dense layer, no MTP): its
# parameter table's rows in order. Change both together.
TINY_CONFIG = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 8,
               "num_hidden_layers": 1, "num_nextn_predict_layers": 0, "num_attention_heads": 2,
               "num_key_value_heads": 2, "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
               "qk_rope_head_dim": 4, "v_head_dim": 4, "n_routed_experts": 4, "n_shared_experts": 1,
               "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
               "moe_layer_freq": 1, "rope_scaling": None, "max_position_embeddings": 64,
               "tie_word_embeddings": False, "initializer_range": 0.02}
_L = "model.layers.0."
TINY_ROWS = [("model.embed_tokens.weight", [32, 16]), (_L + "input_layernorm.weight", [16]),
             (_L + "self_attn.q_a_proj.weight", [8, 16]), (_L + "self_attn.q_a_layernorm.weight", [8]),
             (_L + "self_attn.q_b_proj.weight", [16, 8]), (_L + "self_attn.kv_a_proj_with_mqa.weight", [12, 16]),
             (_L + "self_attn.kv_a_layernorm.weight", [8]), (_L + "self_attn.kv_b_proj.weight", [16, 8]),
             (_L + "self_attn.o_proj.weight", [16, 8]), (_L + "post_attention_layernorm.weight", [16]),
             (_L + "mlp.gate_proj.weight", [32, 16]), (_L + "mlp.up_proj.weight", [32, 16]),
             (_L + "mlp.down_proj.weight", [16, 32]), ("model.norm.weight", [16]), ("lm_head.weight", [32, 16])]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def f32(n, start=0):
    return struct.pack(f"<{n}f", *[((i + start) % 13 - 6) / 8 for i in range(n)])


def bf16(n):
    return b"".join(struct.pack("<f", 0.25 + 0.125 * (i % 5))[2:] for i in range(n))


def tiny_model(fp8=lambda name, shape: len(shape) == 2, block=(128, 128), scale_dtype="F32", only=None,
               scale_shape=None):
    """model.safetensors of TINY_ROWS: the rows fp8() picks as F8_E4M3 codes with their
    '<name>_scale_inv' of ceil(O/bo) x ceil(I/bi) scales (scale_shape overrides), the rest F32."""
    tensors = []
    for r, (name, shape) in enumerate(TINY_ROWS):
        if only is not None and r not in only:
            continue
        n = numel(shape)
        if fp8(name, shape):
            tensors.append((name, "F8_E4M3", shape, bytes((i * 37 + r) % 0x7e for i in range(n))))
            if len(shape) == 2:
                sh = scale_shape or [-(-shape[0] // block[0]), -(-shape[1] // block[1])]
                raw = bf16(numel(sh)) if scale_dtype == "BF16" else (
                    bytes(numel(sh)) if scale_dtype == "F8_E4M3" else f32(numel(sh)))
                tensors.append((name + "_scale_inv", scale_dtype, sh, raw))
        else:
            tensors.append((name, "F32", shape, f32(n, r)))
    return st(tensors)


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
    # data.paths of any length, weighted (the CLI trains on 1000 and 5000 entries).
    base = json.load(open(f"{src}/configs/tiny-train.json"))
    for n in (0, 1, 65, 1000, 5000):
        cfg = dict(base, data={"paths": [{"prefix": f"d/{i}", "weight": 0.5 + i % 7} for i in range(n)],
                               "split": "99,1"})
        put(f"paths_{n}.json", json.dumps(cfg, separators=(",", ":")))
    put("paths_65.set", json.dumps(base).encode() + b"\0data.synthetic=false\0data.paths=" + json.dumps(
        [{"prefix": f"p{i}", "weight": i + 1} for i in range(65)]).encode())
elif target == "safetensors":
    put("f32", st([("a.weight", "F32", [2, 3], struct.pack("<6f", *range(6))),
                   ("b", "F32", [], struct.pack("<f", 1.5))]))
    put("mixed", st([("x", "BF16", [4], b"\x80\x3f" * 4), ("y", "F16", [2], b"\x00\x3c\x00\xbc"),
                     ("z", "F64", [1, 1], struct.pack("<d", -2.0)), ("e", "F32", [0, 5], b""),
                     ("i", "I32", [2], struct.pack("<2i", 7, -7))], meta=False))
    put("fp8", st([("w", "F8_E4M3", [2, 2], b"\x38\x38\x38\x38"), ("w_scale_inv", "F32", [1], struct.pack("<f", 1.0))]))
elif target == "hf_index":
    # The shards as fuzz_hf_index.c writes them: rows 0-6 and down_proj's scales in the first,
    # rows 7-14 (o_proj and down_proj F8_E4M3, o_proj's scales) in the second.
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    wmap = {name: (s1 if r < 7 else s2) for r, (name, _) in enumerate(TINY_ROWS)}
    wmap[_L + "mlp.down_proj.weight_scale_inv"] = s1
    wmap[_L + "self_attn.o_proj.weight_scale_inv"] = s2
    put("index", json.dumps({"metadata": {"total_size": 9000}, "weight_map": wmap}, indent=2))
    put("index_reversed", json.dumps({"weight_map": dict(reversed(list(wmap.items())))}))
    def variant(name, **change):
        m = dict(wmap)
        for k, v in change.items():
            key = {"scale": _L + "mlp.down_proj.weight_scale_inv", "embed": "model.embed_tokens.weight",
                   "head": "lm_head.weight"}[k]
            if v is None:
                del m[key]
            else:
                m[key] = v
        put(name, json.dumps({"metadata": {}, "weight_map": m}))
    variant("wrong_shard", scale=s2)          # down_proj's scales are in the first shard
    variant("unlisted", head=None)            # lm_head in a shard but not in the map
    variant("no_shard", embed="model-00003-of-00003.safetensors")
    variant("outside", embed="../" + s1)
    put("extra_entry", json.dumps({"weight_map": dict(wmap, **{"model.extra.weight": s1})}))
    put("not_object", json.dumps({"weight_map": [s1, s2]}))
elif target == "quant_config":
    deepseek = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    put("deepseek", json.dumps(dict(TINY_CONFIG, quantization_config=deepseek), indent=2))
    put("none", json.dumps(TINY_CONFIG))
    put("null", json.dumps(dict(TINY_CONFIG, quantization_config=None)))
    for name, q in [("block32", dict(deepseek, weight_block_size=[32, 32])),
                    ("block16", dict(deepseek, weight_block_size=[16, 16])),     # the [1, 1] scales then mismatch
                    ("no_fmt", {"quant_method": "fp8", "weight_block_size": [64, 128]}),
                    ("no_block", {"quant_method": "fp8", "fmt": "e4m3"}),
                    ("method", dict(deepseek, quant_method="bitsandbytes")),
                    ("fmt", dict(deepseek, fmt="e5m2")),
                    ("block_1d", dict(deepseek, weight_block_size=[128])),
                    ("block_zero", dict(deepseek, weight_block_size=[0, 128])),
                    ("block_frac", dict(deepseek, weight_block_size=[1.5, 128])),
                    ("block_str", dict(deepseek, weight_block_size="128")),
                    ("array", [deepseek])]:
        put(name, json.dumps(dict(TINY_CONFIG, quantization_config=q)))
elif target == "fp8_block":
    # The first 2 bytes are weight_block_size [rows, cols] (both 0: no quantization_config).
    put("all_fp8", b"\0\0" + tiny_model())
    put("blocks_4x8_bf16", bytes([4, 8]) + tiny_model(block=(4, 8), scale_dtype="BF16"))
    put("blocks_3x5", bytes([3, 5]) + tiny_model(block=(3, 5)))
    put("blocks_2x2_mixed", bytes([2, 2]) + tiny_model(fp8=lambda n, s: "proj" in n, block=(2, 2)))
    put("embed_only", bytes([128, 128]) + tiny_model(only={0}))
    put("all_f32", b"\0\0" + tiny_model(fp8=lambda n, s: False))
    put("scale_shape", b"\0\0" + tiny_model(only={0}, scale_shape=[2, 1]))
    put("scale_fp8", b"\0\0" + tiny_model(only={0}, scale_dtype="F8_E4M3"))
    put("norm_fp8", b"\0\0" + tiny_model(fp8=lambda n, s: "layernorm" in n or len(s) == 2))
elif target == "pipeline_layout":
    def lay(pp, v, L, M, text):
        # the bytes the target reads back as pp, v, L, M (pp - 1 and L - 1: stored modulo)
        return bytes([pp - 1, v, L - 1, M]) + text.encode()
    put("even", lay(2, 0, 4, 1, ""))
    put("docs", lay(3, 0, 4, 1, "Et|tt|tmL"))
    put("repeat", lay(2, 0, 4, 2, "E t*2 | t*2 m*2 L"))
    put("interleaved", lay(2, 0, 4, 1, "Et|t|t|tmL"))
    put("interleaved_key", lay(2, 2, 4, 1, ""))
    put("embedding_alone", lay(2, 0, 4, 1, "E|tt|t|tmL"))
    put("dsv3", lay(16, 0, 61, 1, "Et*3|" + "|".join(["t*4"] * 14) + "|t*2mL"))
    put("wrong_count", lay(2, 0, 4, 1, "Et|tt|tmL"))
    put("mtp_early", lay(2, 0, 4, 1, "Ettm|ttL"))
    put("empty_stage", lay(3, 0, 4, 1, "Etttt||mL"))
    put("bad_symbol", lay(2, 0, 4, 1, "Etx|ttmL"))
    put("bad_repeat", lay(2, 0, 4, 1, "Et*|ttmL"))
elif target == "kernels_json":
    key = "Fuzz CPU | oneDNN 3.0.0 isa avx2 | OpenBLAS 0.3.21 | 2 threads | shapes NT64x16x16/1*1"
    pick = {"key": key, "fp32": "onednn", "bf16": "widen", "fp32_onednn_gflops": 168.2,
            "fp32_openblas_gflops": 173.9, "bf16_widen_gflops": 119.0}
    put("pick", json.dumps(pick, indent="\t") + "\n")
    put("pick_openblas", json.dumps(dict(pick, fp32="openblas", bf16="onednn", bf16_onednn_gflops=224.5)))
    put("other_key", json.dumps(dict(pick, key="Another CPU | 8 threads")))
    put("bad_kernel", json.dumps(dict(pick, fp32="mkl")))
    put("not_object", json.dumps([pick]))
    put("empty", b"")
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
