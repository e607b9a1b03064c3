"""`nanomegatron export --format hf` against Hugging Face transformers (the independent
implementation: its native DeepseekV3ForCausalLM, no remote code) and tokenizers.

For fresh random models of several configs (export_util.VARIANTS):
1. the exported directory loads with AutoModelForCausalLM as DeepseekV3ForCausalLM, and its
   logits on a random batch equal ours. The comparison is on identical weights: for bf16 and
   f16 exports ours are computed from the exported directory itself (our loader widens them to
   fp32 as transformers does with torch_dtype=float32), so the tolerance is that of two fp32
   implementations: |diff| <= 1e-5 * max|logit| (LOGITS_TOL: measured at most 8.3e-7);
2. configs transformers' native class cannot compute (softmax scores, moe_layer_freq 2) are
   exported with a warning that says so, and load back into nanomegatron unchanged;
3. a small --max-shard-size gives shards + model.safetensors.index.json that both
   transformers and our loader read;
4. AutoTokenizer on the export encodes like our tokenizer (a trained BPE and the byte
   tokenizer) on texts with spaces, tabs, digits, punctuation and non-ASCII;
5. bad requests fail with a message: q8_0 for hf, an existing non-empty --out.
Each variant's model carries a nonzero stored e_score_correction_bias (export_util.biased_copy):
noaux_tc exports it as stored; greedy routing, which our router runs without the bias, is
exported as noaux_tc over one group and so must get an all-zero bias for transformers' logits
to equal ours (checked on the tensors and by 1.).

Needs transformers >= 4.51 with torch >= 2 (the .venv of scripts/deps.sh); exit 77 without.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_util as U  # noqa: E402

U.need_bin()
try:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import DeepseekV3ForCausalLM  # noqa: F401  (native class, >= 4.51)
    from safetensors import safe_open
except Exception as e:  # ImportError, or transformers refusing an old torch
    skip(f"transformers with DeepseekV3 not available ({e}): scripts/deps.sh --with-venv installs it")

transformers.logging.set_verbosity_error()
SEED, rng = U.seed_and_rng("test_export_hf")
print(f"transformers {transformers.__version__}, torch {torch.__version__}")
failures = []
# Two fp32 implementations on the same weights: over 15 seeds (135 comparisons) at most 8.3e-7
# of max|logit| (was 1e-4).
LOGITS_TOL = 1e-5


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)


def hf_logits(out_dir, ids):
    m = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    assert type(m).__name__ == "DeepseekV3ForCausalLM", type(m).__name__
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


with tempfile.TemporaryDirectory() as tmp:
    ids = rng.integers(0, 257, size=(2, 16)).astype(np.int32)
    for name in U.VARIANTS:
        cfg, native = U.make_config(name)
        plain = U.init_model(tmp, name, cfg, int(rng.integers(1, 1 << 30)))
        mdir, st = U.biased_copy(tmp, plain, name, rng)
        ours = U.our_logits(tmp, mdir, ids)
        noaux = cfg["topk_method"] == "noaux_tc"
        if not noaux:
            check(np.array_equal(ours, U.our_logits(tmp, plain, ids)),
                  f"{name}: our {cfg['topk_method']} logits do not depend on the stored bias")
        for dtype in ["fp32", "bf16", "f16"]:
            out = os.path.join(tmp, f"{name}_hf_{dtype}")
            p = U.run(["export", "--model", mdir, "--out", out, "--format", "hf", "--dtype", dtype])
            files = sorted(os.listdir(out))
            check(all(f in files for f in ["config.json", "generation_config.json", "model.safetensors",
                                           "tokenizer.json", "tokenizer_config.json"]), f"{name} {dtype}: files {files}")
            # Only the (fp32) bias rows: numpy has no bfloat16.
            with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
                got = {k: f.get_tensor(k) for k in f.keys() if k.endswith("e_score_correction_bias")}
            bad = [k for k in st if k.endswith("e_score_correction_bias") and not np.array_equal(
                got[k], st[k] if noaux else np.zeros_like(st[k]))]
            check(not bad and any(k.endswith("e_score_correction_bias") for k in got),
                  f"{name} {dtype}: e_score_correction_bias {'as stored' if noaux else 'all zero'} "
                  f"{', '.join(bad[:2])}")
            ref = ours if dtype == "fp32" else U.our_logits(tmp, out, ids)
            if dtype != "fp32":
                # The rounding really happened (else the check below would not test the dtype).
                check(rel_err(ref, ours) > 1e-6, f"{name} {dtype}: rounded weights change our logits "
                      f"({rel_err(ref, ours):.2e})")
            if native:
                e = rel_err(hf_logits(out, ids), ref)
                check(e <= LOGITS_TOL, f"{name} {dtype}: transformers logits vs ours rel err {e:.2e} (tol {LOGITS_TOL:g})")
            else:
                warned = b"transformers' native DeepseekV3ForCausalLM" in p.stderr
                check(warned, f"{name} {dtype}: export warns that native transformers differs")
                e = rel_err(U.our_logits(tmp, out, ids), ref)
                check(e == 0.0 if dtype == "fp32" else e <= 1e-6, f"{name} {dtype}: export loads back into nanomegatron")
            with open(os.path.join(out, "config.json")) as f:
                c = json.load(f)
            check(c["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
                  and c["model_type"] == "deepseek_v3", f"{name} {dtype}: config.json dtype / model_type")

    # Sharded export.
    cfg, _ = U.make_config("v3_like")
    mdir = U.init_model(tmp, "shard", cfg, int(rng.integers(1, 1 << 30)))
    out = os.path.join(tmp, "sharded")
    U.run(["export", "--model", mdir, "--out", out, "--format", "hf", "--max-shard-size", "300KB"])
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    check(len(shards) > 2 and "model.safetensors" not in shards and set(index["weight_map"].values()) == set(shards)
          and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", f"sharded: {len(shards)} shards + index")
    ours = U.our_logits(tmp, mdir, ids)
    e = rel_err(hf_logits(out, ids), ours)
    check(e <= LOGITS_TOL, f"sharded: transformers logits vs ours rel err {e:.2e} (tol {LOGITS_TOL:g})")
    check(rel_err(U.our_logits(tmp, out, ids), ours) == 0.0, "sharded: our loader reads it back exactly")

    # Tokenizers.
    trained = U.train_tokenizer(tmp, rng, 290)
    for tok in [trained, "bytes"]:
        out = os.path.join(tmp, f"tok_{os.path.basename(tok)}")
        U.run(["export", "--model", mdir, "--out", out, "--format", "hf", "--tokenizer", tok])
        hf = AutoTokenizer.from_pretrained(out)
        want = U.our_encode(tok, U.TEXTS)
        got = [hf.encode(t, add_special_tokens=False) for t in U.TEXTS]
        check(got == want, f"AutoTokenizer encodes like our {os.path.basename(tok)} tokenizer")
        with open(os.path.join(out, "generation_config.json")) as f:
            g = json.load(f)
        check(g.get("eos_token_id") == hf.convert_tokens_to_ids("<|endoftext|>"), f"{tok}: eos is <|endoftext|>")

    # Refusals.
    p = U.run(["export", "--model", mdir, "--out", os.path.join(tmp, "x"), "--format", "hf", "--dtype", "q8_0"], check=False)
    check(p.returncode == 2 and b"q8_0" in p.stderr, "hf --dtype q8_0 refused")
    p = U.run(["export", "--model", mdir, "--out", out, "--format", "hf"], check=False)
    check(p.returncode == 1 and b"not an empty directory" in p.stderr, "existing --out refused")

print(f"{len(failures)} failed" if failures else "all passed")
sys.exit(1 if failures else 0)
